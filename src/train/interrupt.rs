//! Ctrl-C during training: the first SIGINT asks the trainer to save a checkpoint and stop at the
//! end of the current iteration; a second one exits at once.

use std::sync::atomic::{AtomicBool, Ordering};

static REQUESTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_signal: libc::c_int) {
    // Only async-signal-safe operations here: an atomic swap and `_exit`.
    if REQUESTED.swap(true, Ordering::SeqCst) {
        // SAFETY: `_exit` is async-signal-safe and never returns.
        unsafe { libc::_exit(130) };
    }
}

/// Installs the SIGINT handler (idempotent) and returns the flag it raises, lowered: a run started
/// after an earlier one stopped on Ctrl-C in the same process does not stop at once.
pub fn install_ctrl_c_handler() -> &'static AtomicBool {
    REQUESTED.store(false, Ordering::SeqCst);
    let handler: extern "C" fn(libc::c_int) = on_sigint;
    // SAFETY: the handler only touches an atomic and calls `_exit`, both async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, handler as libc::sighandler_t);
    }
    &REQUESTED
}
