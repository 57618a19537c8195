//! `svf-data`: writes a synthetic PASCAL-layout dataset, checks a dataset before training, or
//! exports the fold lists in BAM's formats.
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use svf::cli::ConfigArgs;
use svf::data::check::check_dataset;
use svf::data::synth::{write_dataset, SynthOptions, MIN_SIZE};

/// Dataset tools for few-shot segmentation.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Debug-level logging.
    #[arg(short, long, global = true)]
    verbose: bool,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Write a small learnable dataset (20 classes) in PASCAL layout.
    Synth {
        /// Output folder (becomes `data_root`).
        #[arg(long)]
        out: PathBuf,
        /// Images in the train list.
        #[arg(long, default_value_t = SynthOptions::default().train_images)]
        images: usize,
        /// Images in the val list (default: 30% of --images, at least 40; 120 = 6 large objects
        /// of each class, enough for 5-shot).
        #[arg(long)]
        val_images: Option<usize>,
        /// Longer image side in pixels.
        #[arg(long, default_value_t = SynthOptions::default().size as u64, value_parser = clap::value_parser!(u64).range(MIN_SIZE as u64..))]
        size: u64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Validate the dataset of a config: every file of both lists, per-class counts of the fold.
    /// Exits non-zero with one line per problem.
    Check {
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Write every fold's lists in BAM's formats (OUT/{train,val}/data_list_{fold}.txt and
    /// sub_class_file_list_{fold}.txt): training images under the config's `train_filter`,
    /// validation under PFENet's rule. Either file works as train_list / val_list.
    Lists {
        #[command(flatten)]
        config: ConfigArgs,
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    svf::logging::init(cli.verbose, None)?;
    match cli.command {
        Command::Synth {
            out,
            images,
            val_images,
            size,
            seed,
        } => {
            let options = SynthOptions {
                train_images: images,
                val_images: val_images.unwrap_or((images * 3 / 10).max(40)),
                size: size as usize,
                seed,
            };
            let (train, val) = write_dataset(&out, &options)?;
            println!(
                "# {} train and {} val images; config keys:",
                options.train_images, options.val_images
            );
            println!("data_root: {}", out.display());
            println!("train_list: {}", train.display());
            println!("val_list: {}", val.display());
        }
        Command::Check { config: args } => {
            let config = args.load()?;
            let report = check_dataset(&config);
            for list in &report.lists {
                println!(
                    "{} list {}: {} images; {} classes of fold {} (eligible / present images):",
                    list.split.name(),
                    list.list.display(),
                    list.images,
                    list.split.name(),
                    config.split
                );
                for count in &list.classes {
                    println!(
                        "  class {:3}: {:6} / {:6}",
                        count.class, count.eligible, count.present
                    );
                }
            }
            for problem in &report.problems {
                eprintln!("{problem}");
            }
            if !report.is_clean() {
                eprintln!("{} problem(s) found in the dataset", report.problems.len());
                std::process::exit(1);
            }
            println!("dataset OK");
        }
        Command::Lists { config: args, out } => {
            let config = args.load()?;
            for lists in svf::data::write_bam_fold_lists(&config, &out)? {
                println!(
                    "{} fold {}: {} images -> {}, {}",
                    lists.split.name(),
                    lists.fold,
                    lists.images,
                    lists.data_list.display(),
                    lists.sub_class_list.display()
                );
            }
        }
    }
    Ok(())
}
