//! `svf-bench`: throughput of the pipeline's parts, printed as a small table (stderr) and one
//! JSON line (stdout).
use clap::Parser;
use svf::bench::{self, BenchOptions, BenchPlan, Section};
use svf::cli::{ConfigArgs, RuntimeArgs};

/// Time the train step, evaluation, loader and SVD decomposition of a config's model: median of
/// repeated runs after warm-up, on synthetic episodes (the loader reads the config's dataset).
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    config: ConfigArgs,
    #[command(flatten)]
    runtime: RuntimeArgs,
    /// Sections to run, comma-separated or repeated; default: all.
    #[arg(long, value_enum, value_delimiter = ',')]
    what: Vec<Section>,
    /// Square image sizes, comma-separated, e.g. 233,353,473 (default: the config's train_h and
    /// val_size).
    #[arg(long, value_delimiter = ',')]
    size: Vec<i64>,
    /// Shots, comma-separated, e.g. 1,5 (default: the config's shot).
    #[arg(long, value_delimiter = ',')]
    shot: Vec<usize>,
    /// Unmeasured runs before timing.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Timed runs; the median is reported.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    repeats: u64,
    /// Episodes per loader measurement.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..))]
    episodes: u64,
    /// Loader worker counts to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2", value_parser = clap::value_parser!(u64).range(1..))]
    workers: Vec<u64>,
    /// Train step with autograd through every weight, as a model that freezes nothing: the
    /// "before" of freezing.
    #[arg(long)]
    track_frozen: bool,
}

fn main() -> std::process::ExitCode {
    svf::cli::exit_status(run())
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = cli.config.load()?;
    let device = cli.runtime.start(None)?;
    let plan = BenchPlan {
        sections: if cli.what.is_empty() {
            bench::default_sections(&config)
        } else {
            cli.what
        },
        sizes: cli.size,
        shots: cli.shot,
        options: BenchOptions {
            device,
            warmup: cli.warmup,
            repeats: cli.repeats as usize,
            track_frozen: cli.track_frozen,
        },
        loader_workers: cli.workers.iter().map(|&w| w as usize).collect(),
        loader_episodes: cli.episodes,
    };
    let report = bench::run(&config, &plan)?;
    eprint!("{report}");
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
