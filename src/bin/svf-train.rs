//! `svf-train`: episodic training of PFENet (+ SVF) from a YAML config.
use clap::Parser;
use svf::cli::{ConfigArgs, RuntimeArgs};

/// Train a few-shot segmentation model (PFENet, optionally with Singular Value Fine-tuning).
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    config: ConfigArgs,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = cli.config.load()?;
    svf::logging::init(cli.runtime.verbose, Some(&config.save_path))?;
    let device = cli.runtime.device.resolve()?;
    svf::device::log_startup(device);
    anyhow::bail!(
        "training is not implemented yet (config {} is valid)",
        cli.config.config.display()
    )
}
