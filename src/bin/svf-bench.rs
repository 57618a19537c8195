//! `svf-bench`: throughput figures of the pipeline's parts, one section per `--what`.
use clap::{Parser, ValueEnum};
use svf::bench::loader_throughput;
use svf::cli::ConfigArgs;
use svf::data::Split;

/// Measure throughput (episodes per second) of the pipeline's parts on a config's dataset.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    config: ConfigArgs,
    /// Sections to run (repeatable); default: all.
    #[arg(long, value_enum)]
    what: Vec<What>,
    /// Episodes per measurement.
    #[arg(long, default_value_t = 200)]
    episodes: u64,
    /// Loader worker counts to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    workers: Vec<usize>,
    /// Debug-level logging.
    #[arg(short, long)]
    verbose: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum What {
    /// Episode loading (decode + augment + batch) for train and val.
    Loader,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = cli.config.load()?;
    svf::logging::init(cli.verbose, None)?;
    let sections = if cli.what.is_empty() {
        What::value_variants().to_vec()
    } else {
        cli.what.clone()
    };
    for section in sections {
        match section {
            What::Loader => {
                for split in [Split::Train, Split::Val] {
                    for r in loader_throughput(&config, split, &cli.workers, cli.episodes)? {
                        println!(
                            "loader {:5} {}x{} shot {} batch {} workers {}: {:8.1} episodes/s ({} episodes in {:.2} s)",
                            r.split,
                            r.size.0,
                            r.size.1,
                            r.shot,
                            r.batch_size,
                            r.workers,
                            r.episodes_per_second,
                            r.episodes,
                            r.seconds
                        );
                    }
                }
            }
        }
    }
    Ok(())
}
