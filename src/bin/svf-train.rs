//! `svf-train`: training of PFENet or BAM (+ SVF) from a YAML config, BAM's base stage included.
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use svf::cli::{ConfigArgs, RuntimeArgs};

/// Train a few-shot segmentation model (PFENet or BAM, optionally with Singular Value
/// Fine-tuning), or BAM's base learner (`method: bam`, `stage: base`).
///
/// The run directory (`save_path`) receives config.yaml, log.txt, metrics.jsonl and the `last` /
/// `best` checkpoints. Ctrl-C (or SIGTERM) saves `last` and exits with status 130 (143), also
/// during a validation, which the resumed run then does first; a second Ctrl-C quits at once
/// without saving. `--resume RUN_DIR` continues exactly where `last` stands.
#[derive(Parser, Debug)]
#[command(
    version,
    about,
    override_usage = "svf-train --config FILE [--set KEY=VALUE]... [OPTIONS]\n       svf-train --resume RUN_DIR [OPTIONS]"
)]
struct Cli {
    #[command(flatten)]
    config: Option<ConfigArgs>,
    /// Continue the run in this directory from its `last` checkpoint, with its config.yaml.
    #[arg(long, value_name = "RUN_DIR", conflicts_with_all = ["config", "overrides"])]
    resume: Option<PathBuf>,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

fn main() -> ExitCode {
    svf::cli::exit_status(run())
}

fn run() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    let config = match (&cli.resume, &cli.config) {
        (Some(run_dir), _) => svf::train::resume_config(run_dir)?,
        (None, Some(args)) => args.load()?,
        (None, None) => {
            anyhow::bail!("give --config FILE to start a run or --resume RUN_DIR to continue one")
        }
    };
    let device = cli.runtime.start_run(Some(&config.save_path))?;
    let interrupt = svf::cli::stop_on_signals()?;
    let hooks = svf::train::TrainHooks {
        interrupt: Some(&interrupt),
        ..Default::default()
    };
    let summary = svf::train::train(&config, device, cli.resume.as_deref(), hooks)?;
    if summary.already_finished {
        return Ok(ExitCode::SUCCESS);
    }
    let state = &summary.state;
    let percent = |m: Option<f64>| m.map_or("-".to_string(), |m| format!("{:.2}", 100.0 * m));
    if summary.interrupted {
        println!(
            "stopped at {}; continue with: svf-train --resume {}",
            state.position(),
            summary.run_dir.display()
        );
        return Ok(ExitCode::from(svf::cli::interrupted_status()));
    } else {
        if summary.stopped_early {
            println!(
                "stopped early: {} epochs without a new best validation mIoU (stop_interval {})",
                state.epochs_without_improvement, config.stop_interval
            );
        }
        println!(
            "trained {} epochs ({} iterations, {:.2} {}/s); mIoU untrained {} -> best {} (epoch {}); checkpoints in {}",
            state.epochs_done(),
            state.iteration,
            summary.episodes_per_second,
            match config.stage {
                svf::config::Stage::Base => "images",
                svf::config::Stage::Meta => "episodes",
            },
            percent(summary.untrained_miou),
            percent(state.best_miou),
            state.best_epoch.map_or("-".to_string(), |e| e.to_string()),
            summary.run_dir.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}
