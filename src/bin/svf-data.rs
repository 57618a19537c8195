//! `svf-data`: writes a synthetic PASCAL-layout dataset, converts the downloaded PASCAL VOC + SBD or
//! COCO 2014 into the layout the configs read, checks a dataset before training, or exports the
//! fold lists in BAM's formats.
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use svf::cli::ConfigArgs;
use svf::data::check::check_dataset;
use svf::data::prepare::coco::{prepare_coco, CocoOptions, CrowdLabel};
use svf::data::prepare::pascal::{prepare_pascal, PascalOptions};
use svf::data::prepare::{ImageMode, PrepareSummary};
use svf::data::synth::{write_dataset, SynthOptions, MIN_IMAGES, MIN_SIZE};

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
        /// Images in the train list; at least 40, two of each class (a 1-shot episode's query and
        /// support).
        #[arg(long, default_value_t = SynthOptions::default().train_images as u64, value_parser = clap::value_parser!(u64).range(MIN_IMAGES..))]
        images: u64,
        /// Images in the val list (default: 30% of --images, at least 40; 120 = 6 large objects
        /// of each class, enough for 5-shot).
        #[arg(long, value_parser = clap::value_parser!(u64).range(MIN_IMAGES..))]
        val_images: Option<u64>,
        /// Longer image side in pixels.
        #[arg(long, default_value_t = SynthOptions::default().size as u64, value_parser = clap::value_parser!(u64).range(MIN_SIZE as u64..))]
        size: u64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Convert a downloaded dataset into the layout the shipped configs read (labels, images, lists).
    /// Resumable: a rerun keeps the files made from the same inputs and options, writes the rest.
    #[command(subcommand)]
    Prepare(Prepare),
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

#[derive(Subcommand, Debug)]
enum Prepare {
    /// PASCAL-5i from VOC 2012 + SBD: SegmentationClassAug/, JPEGImages/ and PFENet's lists
    /// (voc_sbd_merge_noduplicate.txt, 5953 images; val.txt, 1449).
    Pascal {
        /// The VOC2012 folder of VOCtrainval_11-May-2012.tar (VOCdevkit/VOC2012).
        #[arg(long)]
        voc: PathBuf,
        /// The dataset folder of SBD's benchmark.tgz (benchmark_RELEASE/dataset).
        #[arg(long)]
        sbd: PathBuf,
        /// SBD ids of the training list [default: SBD/train_noval.txt, from the SBD page].
        #[arg(long)]
        sbd_list: Option<PathBuf>,
        /// Output folder: the `data_root` of the PASCAL configs.
        #[arg(long, default_value = "data/VOCdevkit2012/VOC2012")]
        out: PathBuf,
        /// Folder of the list files, relative to the current directory like --out (the default
        /// is where the PASCAL configs look for them, from the repository root).
        #[arg(long, default_value = "data/lists/pascal")]
        lists: PathBuf,
        #[command(flatten)]
        common: PrepareArgs,
    },
    /// COCO-20i from COCO 2014: annotations/{train,val}2014/*.png and the lists
    /// train_data_list.txt / val_data_list.txt.
    Coco {
        /// The COCO 2014 folder: train2014/, val2014/, annotations/instances_{train,val}2014.json.
        #[arg(long)]
        coco: PathBuf,
        /// Output folder: the `data_root` of the COCO configs (may be the --coco folder itself).
        #[arg(long, default_value = "data/MSCOCO2014")]
        out: PathBuf,
        /// Folder of the list files, relative to the current directory like --out (the default
        /// is where the COCO configs look for them, from the repository root).
        #[arg(long, default_value = "data/lists/coco")]
        lists: PathBuf,
        /// What crowd regions become: their class (as the usual pycocotools label loop) or 255.
        #[arg(long, value_enum, default_value_t = Crowd::Class)]
        crowd: Crowd,
        #[command(flatten)]
        common: PrepareArgs,
    },
}

#[derive(Args, Debug)]
struct PrepareArgs {
    /// Symlink the images into the output folder (the default).
    #[arg(long, conflicts_with = "copy")]
    link: bool,
    /// Copy the images instead of linking them.
    #[arg(long)]
    copy: bool,
    /// Worker threads [default: one per core].
    #[arg(long)]
    threads: Option<usize>,
}

impl PrepareArgs {
    fn images(&self) -> ImageMode {
        if self.copy {
            ImageMode::Copy
        } else {
            ImageMode::Link
        }
    }

    fn threads(&self) -> usize {
        self.threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
            .max(1)
    }
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum Crowd {
    Class,
    Ignore,
}

fn print_summary(summary: &PrepareSummary) {
    print!("{summary}");
    println!("# config keys:");
    println!("data_root: {}", summary.data_root.display());
    for (key, list) in ["train_list", "val_list"].iter().zip(&summary.lists) {
        println!("{key}: {}", list.path.display());
    }
}

fn main() -> std::process::ExitCode {
    svf::cli::exit_status(run())
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    svf::logging::init(cli.verbose, None);
    match cli.command {
        Command::Synth {
            out,
            images,
            val_images,
            size,
            seed,
        } => {
            let options = SynthOptions {
                train_images: images as usize,
                val_images: val_images.unwrap_or((images * 3 / 10).max(MIN_IMAGES)) as usize,
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
        Command::Prepare(Prepare::Pascal {
            voc,
            sbd,
            sbd_list,
            out,
            lists,
            common,
        }) => {
            let summary = prepare_pascal(&PascalOptions {
                voc,
                sbd,
                sbd_list,
                out,
                lists,
                images: common.images(),
                threads: common.threads(),
            })?;
            print_summary(&summary);
        }
        Command::Prepare(Prepare::Coco {
            coco,
            out,
            lists,
            crowd,
            common,
        }) => {
            let summary = prepare_coco(&CocoOptions {
                coco,
                out,
                lists,
                images: common.images(),
                crowd: match crowd {
                    Crowd::Class => CrowdLabel::Class,
                    Crowd::Ignore => CrowdLabel::Ignore,
                },
                threads: common.threads(),
            })?;
            print_summary(&summary);
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
