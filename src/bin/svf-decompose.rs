//! `svf-decompose`: SVD-decomposes full-rank backbone weights with the config's SVF options.
use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use svf::cli::{ConfigArgs, RuntimeArgs};

/// Decompose a full-rank backbone (PSPNet, torchvision VGG or PFENet names) into SVF form and print
/// per-layer ranks and reconstruction errors. The backbone shape (`layers`, `vgg`,
/// `backbone_width`) and the `svf_*` options come from the config.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// Full-rank backbone weights (safetensors; see scripts/convert_weights.py for .pth files).
    #[arg(long)]
    weights: PathBuf,
    /// Where to write the decomposed weights (safetensors, PFENet names); never the --weights file.
    #[arg(long)]
    out: PathBuf,
    /// Replace --out when it exists.
    #[arg(long)]
    overwrite: bool,
    #[command(flatten)]
    config: ConfigArgs,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

fn main() -> std::process::ExitCode {
    svf::cli::exit_status(run())
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = cli.config.load()?;
    let device = cli.runtime.start(None)?;
    let start = Instant::now();
    let report = svf::backbone::decompose_pretrained(
        &cli.weights,
        &cli.out,
        cli.overwrite,
        &config,
        device,
    )?;
    println!("{report}");
    println!(
        "decomposed {} layers in {:.2} s; wrote {}",
        report.layers.len(),
        start.elapsed().as_secs_f64(),
        cli.out.display()
    );
    Ok(())
}
