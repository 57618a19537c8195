//! `svf-predict`: segment your own images from a few annotated supports.
use std::path::PathBuf;

use clap::Parser;
use svf::cli::{ConfigArgs, RuntimeArgs, WeightsArgs};
use svf::predict::{Job, SupportExample};

/// Segment query images given support images and their masks.
///
/// A mask is a PNG of its support image's size: any non-zero pixel is the object, zero is
/// background. For each query NAME.ext, writes OUT/NAME_mask.png (255 = object, 0 = background, at
/// the query's size) and OUT/NAME_overlay.png (the query with the object tinted). It never writes
/// over an input, nor over an existing file it did not write itself unless --overwrite is given.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
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
    /// Mask of the support image given at the same position (PNG, non-zero = object).
    #[arg(long = "mask", required = true)]
    masks: Vec<PathBuf>,
    /// Query images to segment.
    #[arg(long = "query", required = true)]
    queries: Vec<PathBuf>,
    /// Output folder for NAME_mask.png and NAME_overlay.png.
    #[arg(long)]
    out: PathBuf,
    /// Replace existing output files that svf-predict did not write (never an input).
    #[arg(long)]
    overwrite: bool,
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
    let job = Job::new(&config, supports, &cli.queries, &cli.out, cli.overwrite)?;
    let weights = cli.weights.resolve()?;
    let (_vs, model) = svf::inference::load_model(&config, &weights, device, true)?;
    for p in svf::predict::predict(&model, &config, device, &job)? {
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
