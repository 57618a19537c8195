//! `svf-report`: the paper's tables from every `eval.json` under a folder.
use std::path::PathBuf;

use clap::Parser;

/// Aggregate evaluation results into Markdown tables laid out like the paper's (folds and mean,
/// mIoU and FB-IoU), beside the published numbers, and draw the comparison as a chart (PNG).
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// Folder searched recursively for eval.json files (e.g. the output of reproduce_tables.sh).
    dir: PathBuf,
    /// Also write the tables to this file (and the chart beside it, as .png).
    #[arg(long)]
    out: Option<PathBuf>,
}

fn main() -> std::process::ExitCode {
    svf::cli::exit_status(run())
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let found = svf::report::find_results(&cli.dir)?;
    for warning in &found.warnings {
        eprintln!("warning: {warning}");
    }
    let results = found.evaluations();
    let tables = svf::report::paper_tables(&results);
    if let Some(out) = &cli.out {
        std::fs::write(out, &tables)
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", out.display()))?;
    }
    print!("{tables}");
    // The chart: beside --out, else in DIR.
    let chart = match &cli.out {
        Some(out) => out.with_extension("png"),
        None => cli.dir.join("report.png"),
    };
    svf::report::write_paper_chart(&results, &chart)?;
    eprintln!("chart: {}", chart.display());
    Ok(())
}
