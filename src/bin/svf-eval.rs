//! `svf-eval`: fixed-seed episodic evaluation (mIoU, FB-IoU).
use std::path::PathBuf;

use clap::Parser;
use svf::cli::{ConfigArgs, RuntimeArgs, WeightsArgs};
use svf::eval::{self, EvalOptions, Protocol};

/// Evaluate a trained few-shot segmentation model on the novel classes of a fold.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    config: ConfigArgs,
    #[command(flatten)]
    runtime: RuntimeArgs,
    #[command(flatten)]
    weights: WeightsArgs,
    /// pfenet: one seed (the config's manual_seed), 1000 episodes for PASCAL-5i and 4000 for
    /// COCO-20i. paper: the SVF paper's test, 1000 episodes for each of the seeds 510, 365, 382,
    /// 322, 988, mean and per-seed results.
    #[arg(long, value_enum, default_value_t = Protocol::Pfenet)]
    protocol: Protocol,
    /// Episodes per seed [default: the protocol's].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    episodes: Option<u64>,
    /// Seeds, comma-separated; one evaluation each [default: the protocol's].
    #[arg(long, value_delimiter = ',', conflicts_with = "master_seed")]
    seeds: Vec<u64>,
    /// Draw --seed-count seeds from this master seed, with this project's generator: BAM's test
    /// draws 5 from 123 with numpy (510, 365, 382, 322, 988, which --protocol paper uses), and this
    /// draw does not give those.
    #[arg(long, requires = "seed_count")]
    master_seed: Option<u64>,
    /// Number of seeds drawn from --master-seed.
    #[arg(long, requires = "master_seed", value_parser = clap::value_parser!(u64).range(1..))]
    seed_count: Option<u64>,
    /// Support images per episode [default: the config's shot].
    #[arg(long)]
    shot: Option<usize>,
    /// Where eval.json, eval.md and the panels go [default: the config's save_path].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Write N qualitative panels (support, ground truth, prediction) into OUT/vis.
    #[arg(long, value_name = "N", default_value_t = 0)]
    save_vis: usize,
    /// Loader threads [default: the config's workers]; results do not depend on it.
    #[arg(long)]
    workers: Option<usize>,
    /// Run SVF models with their SVD convolutions instead of folding them into full-rank weights.
    #[arg(long)]
    no_fuse: bool,
}

fn main() -> std::process::ExitCode {
    svf::cli::exit_status(run())
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if cli.protocol == Protocol::Paper && (!cli.seeds.is_empty() || cli.master_seed.is_some()) {
        anyhow::bail!("--protocol paper fixes the seeds (510, 365, 382, 322, 988); drop --seeds / --master-seed, or use --protocol pfenet with them");
    }
    if let Some(seed) = (1..cli.seeds.len()).find_map(|i| {
        cli.seeds[..i]
            .contains(&cli.seeds[i])
            .then_some(cli.seeds[i])
    }) {
        anyhow::bail!("--seeds lists {seed} twice; each seed is one evaluation, so it would count twice in the mean");
    }
    // --shot and --workers are config keys: validated as the file's values are.
    let config = cli.config.load_with(&[
        ("shot", cli.shot.map(|s| s.to_string())),
        ("workers", cli.workers.map(|w| w.to_string())),
    ])?;
    let out = cli.out.clone().unwrap_or_else(|| config.save_path.clone());
    let device = cli.runtime.start(Some(&out))?;

    let mut options = EvalOptions::for_protocol(&config, cli.protocol);
    if let Some(episodes) = cli.episodes {
        options.episodes = episodes;
    }
    if let (Some(master), Some(count)) = (cli.master_seed, cli.seed_count) {
        options.seeds = eval::draw_seeds(master, count as usize);
    } else if !cli.seeds.is_empty() {
        options.seeds = cli.seeds.clone();
    }
    if cli.save_vis > 0 {
        options.panels = Some((out.join("vis"), cli.save_vis));
        if cli.save_vis as u64 > options.episodes {
            tracing::warn!(
                "--save-vis {}: the panels are the first seed's episodes, {} of them",
                cli.save_vis,
                options.episodes
            );
        }
    }

    let weights = cli.weights.resolve()?;
    svf::inference::check_trained_for(&config, &weights)?;
    tracing::info!(weights = %weights.display(), seeds = ?options.seeds, episodes = options.episodes, "evaluating");
    let (_vs, model) = svf::inference::load_model(&config, &weights, device, !cli.no_fuse)?;
    let result = eval::evaluate(&model, &config, device, &options)?;
    result.write(&out)?;
    print!("{}", result.to_markdown());
    tracing::info!("wrote {} and eval.md", out.join("eval.json").display());
    Ok(())
}
