//! Command-line arguments shared by every binary.

use std::path::PathBuf;
use std::process::{ExitCode, Termination};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use clap::Args;

use crate::config::Config;
use crate::device::DeviceArg;

/// The signal that stopped the run, set in the signal handler itself ([`stop_on_signals`]); 0
/// while none has.
static STOP_SIGNAL: OnceLock<Arc<AtomicUsize>> = OnceLock::new();

fn stop_signal() -> &'static Arc<AtomicUsize> {
    STOP_SIGNAL.get_or_init(Arc::default)
}

/// Exit status of a run stopped before its end by Ctrl-C or SIGTERM, as a shell reports a command
/// killed by that signal (128 + its number: 130, 143): `svf-train … && svf-eval …` must not go on
/// to evaluate an unfinished model.
pub fn interrupted_status() -> u8 {
    let signal = match stop_signal().load(Ordering::SeqCst) {
        0 => signal_hook::consts::SIGINT as usize,
        signal => signal,
    };
    128 + signal as u8
}

/// Every binary's `main` ends here (`fn main() -> ExitCode { exit_status(run()) }`): an error is
/// reported once, as its chain of causes (`{:#}`) and never with a backtrace (which
/// `RUST_BACKTRACE=1` would add to anyhow's report of a user mistake), through the log once
/// logging is set up (so that it reaches the run's `log.txt` too), else on stderr; exit code 1.
pub fn exit_status(result: anyhow::Result<impl Termination>) -> ExitCode {
    match result {
        Ok(outcome) => outcome.report(),
        Err(error) => {
            let report = error_report(&error);
            if tracing::dispatcher::has_been_set() {
                tracing::error!("{report}");
            } else {
                eprintln!("Error: {report}");
            }
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, `: `-separated as anyhow's `{:#}`, but a cause that the text before
/// it already says is left out: an error whose message quotes its `source` would repeat it.
fn error_report(error: &anyhow::Error) -> String {
    let mut report = error.to_string();
    for cause in error.chain().skip(1) {
        let cause = cause.to_string();
        if !report.contains(&cause) {
            report.push_str(": ");
            report.push_str(&cause);
        }
    }
    report
}

/// A flag raised by the first SIGINT (Ctrl-C) or SIGTERM (`kill`, `timeout`, a batch scheduler's
/// pre-emption), for svf-train to save `last` and stop; the signal is acknowledged in the log at
/// once, since a validation can take minutes to notice it. A second signal exits at once with
/// [`interrupted_status`]'s status, without saving.
pub fn stop_on_signals() -> anyhow::Result<Arc<AtomicBool>> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let flag = Arc::new(AtomicBool::new(false));
    for signal in [SIGINT, SIGTERM] {
        // Registered first: the shutdown fires only when the flag is already raised.
        signal_hook::flag::register_conditional_shutdown(signal, 128 + signal, flag.clone())?;
        // The signal is recorded before the flag is raised, so the exit status names it.
        signal_hook::flag::register_usize(signal, stop_signal().clone(), signal as usize)?;
        signal_hook::flag::register(signal, flag.clone())?;
    }
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
    std::thread::spawn(move || {
        if let Some(signal) = signals.forever().next() {
            let (name, again) = if signal == SIGTERM {
                ("SIGTERM", "a second signal")
            } else {
                ("Ctrl-C", "Ctrl-C again")
            };
            tracing::warn!("{name}: saving `last` and stopping ({again} quits without saving)");
        }
    });
    Ok(flag)
}

/// `--device`, `--threads` and `--verbose`, which every command takes.
#[derive(Debug, Clone, Args)]
pub struct RuntimeArgs {
    /// Compute device: auto (first CUDA GPU if any, else CPU), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto", value_parser = clap::value_parser!(DeviceArg))]
    pub device: DeviceArg,
    /// Debug-level logging (RUST_LOG, when set, takes precedence).
    #[arg(short, long)]
    pub verbose: bool,
    /// libtorch intra-op threads on the CPU [default: libtorch's, one per physical core, or
    /// OMP_NUM_THREADS]. Fewer than the cores helps when other work shares the machine:
    /// libtorch's threads wait for the slowest one.
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..))]
    pub threads: Option<i32>,
}

impl RuntimeArgs {
    /// The start of every command that runs a model: logging to the terminal (and to `log_dir`'s
    /// `log.txt`), `--threads`, `--device` resolved, and the start-up line.
    pub fn start(&self, log_dir: Option<&std::path::Path>) -> anyhow::Result<tch::Device> {
        let device = self.start_run(log_dir)?;
        crate::logging::open_run_log()?;
        Ok(device)
    }

    /// [`RuntimeArgs::start`] for a run that may still be refused: the lines for `run_dir`'s
    /// `log.txt` wait until [`crate::logging::open_run_log`] (svf-train's trainer calls it once the
    /// run may start), so that a refused start leaves the run directory untouched.
    pub fn start_run(&self, run_dir: Option<&std::path::Path>) -> anyhow::Result<tch::Device> {
        crate::logging::init(self.verbose, run_dir);
        crate::device::keep_freed_host_memory();
        if let Some(threads) = self.threads {
            tch::set_num_threads(threads);
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            if let Some(warning) = crate::device::warn_oversubscribed(threads, cores) {
                tracing::warn!("{warning}");
            }
        }
        let device = self.device.resolve()?;
        crate::device::log_startup(device);
        Ok(device)
    }
}

impl clap::builder::ValueParserFactory for DeviceArg {
    type Parser = fn(&str) -> Result<DeviceArg, String>;
    fn value_parser() -> Self::Parser {
        |s| s.parse()
    }
}

/// `--weights`, which the commands that run a trained model take.
#[derive(Debug, Clone, Args)]
pub struct WeightsArgs {
    /// Weights: a .safetensors checkpoint, or a run directory (its best, else last, checkpoint).
    #[arg(long)]
    pub weights: PathBuf,
}

impl WeightsArgs {
    /// The weights file (see [`crate::inference::resolve_weights`]).
    pub fn resolve(&self) -> anyhow::Result<PathBuf> {
        Ok(crate::inference::resolve_weights(&self.weights)?)
    }
}

/// `--config FILE` and repeated `--set key=value`.
#[derive(Debug, Clone, Args)]
pub struct ConfigArgs {
    /// Experiment YAML file (see configs/pascal_split0.yaml for every key).
    #[arg(long, short)]
    pub config: PathBuf,
    /// Override a config key, in YAML syntax: --set shot=5 --set ppm_scales=[30,15]. Repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
}

impl ConfigArgs {
    /// Reads and validates the configuration.
    pub fn load(&self) -> anyhow::Result<Config> {
        self.load_with(&[])
    }

    /// Like [`ConfigArgs::load`], with a command's own flags that set config keys (`("shot",
    /// Some(5))` for `--shot 5`) applied after every `--set`, so that they pass the same
    /// validation as the file and are reported the same way.
    pub fn load_with(&self, flags: &[(&str, Option<String>)]) -> anyhow::Result<Config> {
        let overrides: Vec<String> = self
            .overrides
            .iter()
            .cloned()
            .chain(
                flags
                    .iter()
                    .filter_map(|(key, value)| value.as_ref().map(|v| format!("{key}={v}"))),
            )
            .collect();
        Ok(Config::load(&self.config, &overrides)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_report_says_each_cause_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("cannot read a.yaml: {source}; check --config")]
        struct Quoting {
            source: std::io::Error,
        }
        let io = || std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let quoting = anyhow::Error::new(Quoting { source: io() }).context("loading the run");
        assert_eq!(
            error_report(&quoting),
            "loading the run: cannot read a.yaml: no such file; check --config"
        );
        // Causes that are not quoted are all there, in order, as in anyhow's `{:#}`.
        let chained = anyhow::Error::new(io())
            .context("reading a.yaml")
            .context("loading the run");
        assert_eq!(error_report(&chained), format!("{chained:#}"));
        assert_eq!(
            error_report(&chained),
            "loading the run: reading a.yaml: no such file"
        );
    }
}
