//! `svf-eval`: fixed-seed episodic evaluation (mIoU, FB-IoU).
use clap::Parser;
use svf::cli::{ConfigArgs, RuntimeArgs};

/// Evaluate a trained few-shot segmentation model on the novel classes of a fold.
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
    svf::logging::init(cli.runtime.verbose, None)?;
    let device = cli.runtime.device.resolve()?;
    svf::device::log_startup(device);
    anyhow::bail!(
        "evaluation is not implemented yet (config {} is valid)",
        cli.config.config.display()
    )
}
