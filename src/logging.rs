//! Logging through `tracing` to the terminal and to the run directory's `log.txt`, and progress
//! bars that log lines do not tear.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
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

/// The log file of a run directory (svf-train's `save_path`, svf-eval's `--out`).
pub const LOG_FILE: &str = "log.txt";

/// The `log.txt` that [`init`] was given. Its lines wait in memory until [`open_run_log`], so that
/// a start that fails or is refused (a bad data list, a run directory in use) leaves the directory
/// as it was.
enum RunLog {
    Waiting { dir: PathBuf, lines: Vec<u8> },
    Open(std::fs::File),
}

static RUN_LOG: Mutex<Option<RunLog>> = Mutex::new(None);

fn run_log() -> std::sync::MutexGuard<'static, Option<RunLog>> {
    RUN_LOG
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Writer of the file layer: into [`RUN_LOG`], waiting or open.
#[derive(Clone, Copy)]
struct RunLogWriter;

impl Write for RunLogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match run_log().as_mut() {
            Some(RunLog::Waiting { lines, .. }) => lines.extend_from_slice(buf),
            Some(RunLog::Open(file)) => file.write_all(buf)?,
            None => {}
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for RunLogWriter {
    type Writer = RunLogWriter;
    fn make_writer(&'a self) -> Self::Writer {
        *self
    }
}

/// The run's `log.txt` could not be written.
#[derive(Debug, thiserror::Error)]
#[error("cannot write {path}: {source}; check that the run directory is writable")]
pub struct RunLogError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

/// Creates the run directory [`init`] was given and appends to its [`LOG_FILE`] the lines logged
/// so far, then every later one. Nothing without a run directory, or when already open.
pub fn open_run_log() -> Result<(), RunLogError> {
    let mut log = run_log();
    let Some(RunLog::Waiting { dir, lines }) = log.as_ref() else {
        return Ok(());
    };
    let path = dir.join(LOG_FILE);
    let opened = std::fs::create_dir_all(dir)
        .and_then(|()| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
        })
        .and_then(|mut file| file.write_all(lines).map(|()| file));
    match opened {
        Ok(file) => {
            *log = Some(RunLog::Open(file));
            Ok(())
        }
        Err(source) => Err(RunLogError { path, source }),
    }
}

/// Installs the global subscriber: level from `RUST_LOG`, else `debug` with `verbose`, else `info`.
/// With `run_dir`, also to `run_dir/log.txt`, from [`open_run_log`] on (with the lines before it).
/// Call once per process.
pub fn init(verbose: bool, run_dir: Option<&Path>) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(if verbose { "debug" } else { "info" }));
    let bars_shown = std::io::stderr().is_terminal();
    let terminal = tracing_subscriber::fmt::layer()
        .with_writer(TerminalWriter)
        .with_target(false)
        .with_filter(filter_fn(move |meta| {
            !(bars_shown && meta.target() == PROGRESS_TARGET)
        }));
    let file = run_dir.map(|_| {
        tracing_subscriber::fmt::layer()
            .with_writer(RunLogWriter)
            .with_ansi(false)
            .with_target(false)
    });
    // A second init (tests, or a library user with their own subscriber) keeps the first one,
    // and its run directory: no log.txt is opened for a subscriber that is not installed.
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(terminal)
        .with(file)
        .try_init()
        .is_ok();
    if let (true, Some(dir)) = (installed, run_dir) {
        *run_log() = Some(RunLog::Waiting {
            dir: dir.to_path_buf(),
            lines: Vec::new(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_second_init_opens_no_run_log() {
        let dir = std::env::temp_dir().join(format!("svf-log-second-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        // The first init of this process installs the subscriber (or another test's did).
        init(false, None);
        init(false, Some(&dir));
        open_run_log().unwrap();
        assert!(!dir.exists(), "{} was created", dir.display());
    }
}
