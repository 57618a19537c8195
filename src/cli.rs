//! Command-line arguments shared by every binary.

use std::path::PathBuf;

use clap::Args;

use crate::config::Config;
use crate::device::DeviceArg;

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
        crate::logging::init(self.verbose, log_dir)?;
        crate::device::keep_freed_host_memory();
        if let Some(threads) = self.threads {
            tch::set_num_threads(threads);
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
