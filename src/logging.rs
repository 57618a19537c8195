//! Logging through `tracing` to the terminal and to the run directory's `log.txt`, and progress
//! bars that log lines do not tear.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::sync::{Mutex, OnceLock};

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::{Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

static PROGRESS: OnceLock<MultiProgress> = OnceLock::new();

/// The target of log lines that report progress as the progress bars do (training's line every
/// `print_freq` iterations): always in `log.txt`, on the terminal only when the bars are hidden
/// (stderr not a terminal: nohup, `| tee`, CI), where they are the only sign of life.
pub const PROGRESS_TARGET: &str = "progress";

fn progress() -> &'static MultiProgress {
    PROGRESS.get_or_init(MultiProgress::new)
}

/// A bar with ETA for `len` steps of long work; hidden when stderr is not a terminal.
pub fn progress_bar(len: u64, what: &str) -> ProgressBar {
    let bar = progress().add(ProgressBar::new(len));
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {per_sec} ETA {eta} {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(what.to_string());
    bar
}

/// Terminal writer that pauses the progress bars while a line is printed.
#[derive(Clone, Copy)]
struct TerminalWriter;

impl Write for TerminalWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        progress().suspend(|| std::io::stderr().write_all(buf))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> MakeWriter<'a> for TerminalWriter {
    type Writer = TerminalWriter;
    fn make_writer(&'a self) -> Self::Writer {
        *self
    }
}

/// Installs the global subscriber: level from `RUST_LOG`, else `debug` with `verbose`, else `info`.
/// With `run_dir`, also appends to `run_dir/log.txt` (created if needed). Call once per process.
pub fn init(verbose: bool, run_dir: Option<&Path>) -> anyhow::Result<()> {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(if verbose { "debug" } else { "info" }));
    let bars_shown = std::io::stderr().is_terminal();
    let terminal = tracing_subscriber::fmt::layer()
        .with_writer(TerminalWriter)
        .with_target(false)
        .with_filter(filter_fn(move |meta| {
            !(bars_shown && meta.target() == PROGRESS_TARGET)
        }));
    let file = match run_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).map_err(|e| {
                anyhow::anyhow!("cannot create run directory {}: {e}", dir.display())
            })?;
            let path = dir.join("log.txt");
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| anyhow::anyhow!("cannot open log file {}: {e}", path.display()))?;
            Some(
                tracing_subscriber::fmt::layer()
                    .with_writer(Mutex::new(file))
                    .with_ansi(false)
                    .with_target(false),
            )
        }
        None => None,
    };
    // A second init (tests, or a library user with their own subscriber) keeps the first one.
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(terminal)
        .with(file)
        .try_init();
    Ok(())
}
