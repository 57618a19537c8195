//! `svf-predict`: segment your own images from a few annotated supports.
use std::path::PathBuf;

use clap::Parser;
use svf::cli::{ConfigArgs, RuntimeArgs, WeightsArgs};
use svf::predict::SupportExample;

/// Segment query images given support images and their masks (PNG, any non-zero pixel = object).
/// Writes, per query, NAME_mask.png (at the query's size) and NAME_overlay.png.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    config: ConfigArgs,
    #[command(flatten)]
    runtime: RuntimeArgs,
    #[command(flatten)]
    weights: WeightsArgs,
    /// Support image; repeat for K-shot, each followed by its --mask.
    #[arg(long = "support", required = true)]
    supports: Vec<PathBuf>,
    /// Mask of the support image given at the same position.
    #[arg(long = "mask", required = true)]
    masks: Vec<PathBuf>,
    /// Query images to segment.
    #[arg(long = "query", required = true)]
    queries: Vec<PathBuf>,
    /// Output folder.
    #[arg(long)]
    out: PathBuf,
}

fn main() -> std::process::ExitCode {
    svf::cli::exit_status(run())
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = cli.config.load()?;
    let device = cli.runtime.start(None)?;
    anyhow::ensure!(
        cli.supports.len() == cli.masks.len(),
        "{} --support image(s) but {} --mask(s): give one mask per support, in the same order",
        cli.supports.len(),
        cli.masks.len()
    );
    let supports: Vec<SupportExample> = cli
        .supports
        .iter()
        .zip(&cli.masks)
        .map(|(image, mask)| SupportExample {
            image: image.clone(),
            mask: mask.clone(),
        })
        .collect();
    let weights = cli.weights.resolve()?;
    let (_vs, model) = svf::inference::load_model(&config, &weights, device, true)?;
    for p in svf::predict::predict(&model, &config, device, &supports, &cli.queries, &cli.out)? {
        tracing::info!(
            "{}: {:.1}% object -> {}, {}",
            p.query.display(),
            100.0 * p.foreground,
            p.mask.display(),
            p.overlay.display()
        );
    }
    Ok(())
}
