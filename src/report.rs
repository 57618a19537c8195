//! Paper tables: aggregation of eval results beside the published numbers, and qualitative panels.
//!
//! `svf-report DIR` reads every `eval.json` under `DIR` and lays them out as the paper does: one
//! table per dataset and metric, rows = method × backbone × shot, columns = folds 0-3 and their mean,
//! with the published mean (the SVF paper, Sun et al., NeurIPS 2022, Tables 1 and 2) and our
//! difference to it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::plot::{write_bar_chart, BarChart, BarGroup, PlotError};
use crate::results::{EvalResult, ResultError};

/// Why the results could not be gathered.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("cannot list {path}: {source}; pass the output folder of the evaluation runs")]
    List {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Result(#[from] ResultError),
    #[error("no eval.json under {0}; run svf-eval (or scripts/reproduce_tables.sh) first")]
    NoResults(PathBuf),
}

/// A published result: mIoU (%) per fold when the paper gives them, and the mean of the folds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Published {
    pub dataset: &'static str,
    pub method: &'static str,
    pub backbone: &'static str,
    pub shot: usize,
    /// Folds 0..3; the VGG-16 rows publish only the mean.
    pub folds: Option<[f64; 4]>,
    pub miou: f64,
}

const fn published(
    dataset: &'static str,
    method: &'static str,
    backbone: &'static str,
    shot: usize,
    folds: Option<[f64; 4]>,
    miou: f64,
) -> Published {
    Published {
        dataset,
        method,
        backbone,
        shot,
        folds,
        miou,
    }
}

const PASCAL: &str = "PASCAL-5i";
const COCO: &str = "COCO-20i";
const R50: &str = "ResNet-50";
const VGG: &str = "VGG-16";

/// The SVF paper's (Sun et al., NeurIPS 2022) Tables 1 and 2 (mIoU). † = trained on BAM's filtered lists
/// (`train_filter: bam`).
pub const PUBLISHED: &[Published] = &[
    published(
        PASCAL,
        "PFENet",
        R50,
        1,
        Some([61.7, 69.5, 55.4, 56.3]),
        60.8,
    ),
    published(
        PASCAL,
        "PFENet",
        R50,
        5,
        Some([63.1, 70.7, 55.8, 57.9]),
        61.9,
    ),
    published(
        PASCAL,
        "PFENet†",
        R50,
        1,
        Some([66.61, 72.55, 65.33, 60.91]),
        66.35,
    ),
    published(
        PASCAL,
        "PFENet†",
        R50,
        5,
        Some([70.93, 75.32, 69.60, 68.96]),
        71.20,
    ),
    published(
        PASCAL,
        "PFENet†+SVF",
        R50,
        1,
        Some([69.27, 73.55, 67.49, 62.30]),
        68.15,
    ),
    published(
        PASCAL,
        "PFENet†+SVF",
        R50,
        5,
        Some([71.82, 74.92, 70.97, 69.58]),
        71.82,
    ),
    published(
        PASCAL,
        "BAM†",
        R50,
        1,
        Some([68.97, 73.59, 67.55, 61.13]),
        67.81,
    ),
    published(
        PASCAL,
        "BAM†",
        R50,
        5,
        Some([70.59, 75.05, 70.79, 67.20]),
        70.91,
    ),
    published(
        PASCAL,
        "BAM†+SVF",
        R50,
        1,
        Some([69.38, 74.51, 68.80, 63.09]),
        68.95,
    ),
    published(
        PASCAL,
        "BAM†+SVF",
        R50,
        5,
        Some([72.05, 76.17, 71.97, 68.91]),
        72.28,
    ),
    published(
        COCO,
        "PFENet†",
        R50,
        1,
        Some([44.93, 50.32, 44.68, 44.26]),
        46.05,
    ),
    published(
        COCO,
        "PFENet†",
        R50,
        5,
        Some([52.29, 59.34, 51.50, 53.53]),
        54.17,
    ),
    published(
        COCO,
        "PFENet†+SVF",
        R50,
        1,
        Some([46.88, 50.86, 47.69, 46.64]),
        48.02,
    ),
    published(
        COCO,
        "PFENet†+SVF",
        R50,
        5,
        Some([52.72, 58.14, 52.52, 54.15]),
        54.38,
    ),
    published(
        COCO,
        "BAM†",
        R50,
        1,
        Some([43.41, 50.59, 47.49, 43.42]),
        46.23,
    ),
    published(
        COCO,
        "BAM†",
        R50,
        5,
        Some([49.26, 54.20, 51.63, 49.55]),
        51.16,
    ),
    published(
        COCO,
        "BAM†+SVF",
        R50,
        1,
        Some([46.87, 53.80, 48.43, 44.78]),
        48.47,
    ),
    published(
        COCO,
        "BAM†+SVF",
        R50,
        5,
        Some([52.25, 57.83, 51.97, 53.41]),
        53.87,
    ),
    published(PASCAL, "PFENet†", VGG, 1, None, 63.35),
    published(PASCAL, "PFENet†", VGG, 5, None, 69.36),
    published(PASCAL, "PFENet†+SVF", VGG, 1, None, 64.33),
    published(PASCAL, "PFENet†+SVF", VGG, 5, None, 69.80),
    published(PASCAL, "BAM†", VGG, 1, None, 64.41),
    published(PASCAL, "BAM†", VGG, 5, None, 68.76),
    published(PASCAL, "BAM†+SVF", VGG, 1, None, 64.87),
    published(PASCAL, "BAM†+SVF", VGG, 5, None, 69.11),
    published(COCO, "PFENet†", VGG, 1, None, 41.97),
    published(COCO, "PFENet†", VGG, 5, None, 48.36),
    published(COCO, "PFENet†+SVF", VGG, 1, None, 42.24),
    published(COCO, "PFENet†+SVF", VGG, 5, None, 49.49),
    published(COCO, "BAM†", VGG, 1, None, 43.50),
    published(COCO, "BAM†", VGG, 5, None, 49.34),
    published(COCO, "BAM†+SVF", VGG, 1, None, 43.76),
    published(COCO, "BAM†+SVF", VGG, 5, None, 49.07),
];

/// The results under `dir` to tabulate: every `eval.json` (recursively), one per table cell
/// (dataset, method, backbone, shot, fold). Where several files fill one cell the later-modified
/// one is kept (the newer evaluation) and a warning names the files and which one is shown.
pub fn find_results(dir: &Path) -> Result<FoundResults, ReportError> {
    let mut paths = Vec::new();
    collect_eval_files(dir, &mut paths)?;
    paths.sort();
    if paths.is_empty() {
        return Err(ReportError::NoResults(dir.to_path_buf()));
    }
    let results = paths
        .into_iter()
        .map(|path| {
            let result = EvalResult::read(&path)?;
            Ok((path, result))
        })
        .collect::<Result<Vec<_>, ReportError>>()?;
    Ok(one_per_cell(results))
}

/// What [`find_results`] gathered.
#[derive(Debug)]
pub struct FoundResults {
    /// One per table cell, each with the file it came from, in cell order.
    pub results: Vec<(PathBuf, EvalResult)>,
    /// One line per cell filled by more than one file.
    pub warnings: Vec<String>,
}

impl FoundResults {
    /// The results alone, as [`paper_tables`] and [`write_paper_chart`] take them.
    pub fn evaluations(&self) -> Vec<EvalResult> {
        self.results.iter().map(|(_, r)| r.clone()).collect()
    }
}

fn collect_eval_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), ReportError> {
    let list_error = |source| ReportError::List {
        path: dir.to_path_buf(),
        source,
    };
    for entry in std::fs::read_dir(dir).map_err(list_error)? {
        let path = entry.map_err(list_error)?.path();
        if path.is_dir() {
            collect_eval_files(&path, out)?;
        } else if path.file_name().is_some_and(|n| n == "eval.json") {
            out.push(path);
        }
    }
    Ok(())
}

/// A table cell: dataset, method, backbone, shot, fold.
type CellKey = (String, String, String, usize, usize);

/// One result per table cell, the later-modified file of several, with a warning per duplicate.
fn one_per_cell(results: Vec<(PathBuf, EvalResult)>) -> FoundResults {
    let modified = |path: &Path| std::fs::metadata(path).and_then(|m| m.modified()).ok();
    // Each kept file with its modification time, read once.
    type Kept = (PathBuf, Option<std::time::SystemTime>, EvalResult);
    let mut cells: BTreeMap<CellKey, Kept> = BTreeMap::new();
    let mut warnings = Vec::new();
    for (path, result) in results {
        let s = &result.setting;
        let key = (
            s.dataset.clone(),
            s.method.clone(),
            s.backbone.clone(),
            s.shot,
            s.fold,
        );
        let time = modified(&path);
        if let Some((other, other_time, _)) = cells.get(&key) {
            let newer = time >= *other_time;
            let (kept, dropped) = if newer {
                (&path, other)
            } else {
                (other, &path)
            };
            warnings.push(format!(
                "{} and {} both fill {} {} {} {}-shot fold {}; showing {} (the later-modified), not {}",
                dropped.display(),
                kept.display(),
                key.0,
                key.1,
                key.2,
                key.3,
                key.4,
                kept.display(),
                dropped.display()
            ));
            if !newer {
                continue;
            }
        }
        cells.insert(key, (path, time, result));
    }
    FoundResults {
        results: cells
            .into_values()
            .map(|(path, _, result)| (path, result))
            .collect(),
        warnings,
    }
}

/// How a cell was measured, for its footnote.
fn protocol_of(result: &EvalResult) -> String {
    format!(
        "mean over {} seed(s) of {} episodes{}",
        result.seeds.len(),
        result.setting.episodes,
        if result.setting.ori_resize {
            " at the original label resolution"
        } else {
            ""
        }
    )
}

/// A row of a paper table.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct RowKey {
    method: String,
    backbone: String,
    shot: usize,
}

/// A table's rows: row → fold → result.
type Rows<'a> = BTreeMap<RowKey, BTreeMap<usize, &'a EvalResult>>;

/// Metric of a table.
#[derive(Debug, Clone, Copy)]
enum Metric {
    MIoU,
    FbIoU,
}

impl Metric {
    fn name(self) -> &'static str {
        match self {
            Metric::MIoU => "mIoU",
            Metric::FbIoU => "FB-IoU",
        }
    }

    /// Mean over seeds, in %.
    fn of(self, result: &EvalResult) -> f64 {
        100.0
            * match self {
                Metric::MIoU => result.miou.mean,
                Metric::FbIoU => result.fb_iou.mean,
            }
    }
}

/// Datasets (PASCAL-5i, then COCO-20i, then any other) → rows → folds. Expects one result per
/// cell ([`find_results`] chooses and warns); of several, the last would be shown.
fn table_grid(results: &[EvalResult]) -> BTreeMap<(usize, String), Rows<'_>> {
    let mut grid: BTreeMap<(usize, String), Rows> = BTreeMap::new();
    for result in results {
        let s = &result.setting;
        let order = match s.dataset.as_str() {
            "PASCAL-5i" => 0,
            "COCO-20i" => 1,
            _ => 2,
        };
        let row = RowKey {
            method: s.method.clone(),
            backbone: s.backbone.clone(),
            shot: s.shot,
        };
        grid.entry((order, s.dataset.clone()))
            .or_default()
            .entry(row)
            .or_default()
            .insert(s.fold, result);
    }
    grid
}

/// The comparison as a chart (PNG): for every table row, our mIoU mean over the folds evaluated
/// beside the published mean, when the paper has the row.
pub fn write_paper_chart(results: &[EvalResult], path: &Path) -> Result<(), PlotError> {
    let mut groups = Vec::new();
    for ((_, dataset), rows) in &table_grid(results) {
        for (row, folds) in rows {
            let mean = folds.values().map(|r| Metric::MIoU.of(r)).sum::<f64>() / folds.len() as f64;
            let short_dataset = dataset.split('-').next().unwrap_or(dataset);
            groups.push(BarGroup {
                label: format!(
                    "{short_dataset} {} {} {}-shot{}",
                    row.method,
                    row.backbone.replace("ResNet-", "R").replace("VGG-", "VGG"),
                    row.shot,
                    if folds.len() < 4 { "*" } else { "" }
                ),
                values: vec![Some(mean), published_miou(dataset, row)],
            });
        }
    }
    write_bar_chart(
        path,
        &BarChart {
            title: "mIoU: ours vs published (mean over folds; * = not all four folds)",
            y_label: "mIoU (%)",
            legend: vec!["ours", "paper"],
            groups,
        },
    )
}

/// The Markdown tables of `results`: per dataset (PASCAL-5i, then COCO-20i, then any other), one
/// mIoU and one FB-IoU table. Expects one result per cell ([`find_results`]).
pub fn paper_tables(results: &[EvalResult]) -> String {
    let grid = table_grid(results);
    // One protocol: one sentence for all cells; several: a marker per cell and a footnote each.
    let mut protocols: Vec<String> = Vec::new();
    for result in results {
        let protocol = protocol_of(result);
        if !protocols.contains(&protocol) {
            protocols.push(protocol);
        }
    }
    let marker = |result: &EvalResult| match protocols.len() {
        1 => String::new(),
        _ => {
            let index = protocols.iter().position(|p| *p == protocol_of(result));
            format!(" ({})", char::from(b'a' + index.unwrap_or(0) as u8))
        }
    };
    let mut md = String::new();
    let mut partial = false;
    for ((_, dataset), rows) in &grid {
        for metric in [Metric::MIoU, Metric::FbIoU] {
            let with_paper = matches!(metric, Metric::MIoU);
            md.push_str(&format!("## {dataset}: {} (%)\n\n", metric.name()));
            md.push_str("| Method | Backbone | Shot | Fold-0 | Fold-1 | Fold-2 | Fold-3 | Mean |");
            md.push_str(if with_paper { " Paper | Δ |\n" } else { "\n" });
            md.push_str("|---|---|---:|---:|---:|---:|---:|---:|");
            md.push_str(if with_paper { "---:|---:|\n" } else { "\n" });
            for (row, folds) in rows {
                let mut line = format!("| {} | {} | {} |", row.method, row.backbone, row.shot);
                for fold in 0..4 {
                    match folds.get(&fold) {
                        Some(result) => {
                            line.push_str(&format!(" {:.2}{} |", metric.of(result), marker(result)))
                        }
                        None => line.push_str(" – |"),
                    }
                }
                let mean = folds.values().map(|r| metric.of(r)).sum::<f64>() / folds.len() as f64;
                let mark = if folds.len() < 4 {
                    partial = true;
                    "*"
                } else {
                    ""
                };
                line.push_str(&format!(" {mean:.2}{mark} |"));
                if with_paper {
                    match published_miou(dataset, row) {
                        Some(paper) => {
                            line.push_str(&format!(" {paper:.2} | {:+.2}{mark} |", mean - paper))
                        }
                        None => line.push_str(" – | – |"),
                    }
                }
                md.push_str(&line);
                md.push('\n');
            }
            md.push('\n');
        }
        md.push_str(&beside_paper(dataset, rows));
    }
    if partial {
        md.push_str("\\* mean over the folds evaluated, not all four.\n\n");
    }
    let summary = match protocols.as_slice() {
        [] => String::new(),
        [one] => format!("Each cell: {one}. "),
        several => {
            for (i, protocol) in several.iter().enumerate() {
                md.push_str(&format!("({}) {protocol}.\n", char::from(b'a' + i as u8)));
            }
            md.push('\n');
            "Cells were measured differently, see (a), (b), ... above; a mean mixes them. "
                .to_string()
        }
    };
    md.push_str(&format!(
        "{summary}Paper: published mean over the four folds (SVF paper, Sun et al., NeurIPS 2022, Tables 1 and 2); Δ = ours − paper; † = trained on BAM's filtered lists (`train_filter: bam`).\n"
    ));
    md
}

fn published_row(dataset: &str, row: &RowKey) -> Option<&'static Published> {
    PUBLISHED.iter().find(|p| {
        p.dataset == dataset
            && p.method == row.method
            && p.backbone == row.backbone
            && p.shot == row.shot
    })
}

fn published_miou(dataset: &str, row: &RowKey) -> Option<f64> {
    published_row(dataset, row).map(|p| p.miou)
}

/// `ours / paper (Δ)`, or what is missing.
fn beside(ours: Option<f64>, paper: Option<f64>) -> String {
    match (ours, paper) {
        (Some(ours), Some(paper)) => format!("{ours:.2} / {paper:.2} ({:+.2})", ours - paper),
        (Some(ours), None) => format!("{ours:.2} / –"),
        (None, Some(paper)) => format!("– / {paper:.2}"),
        (None, None) => "–".to_string(),
    }
}

/// The mIoU rows that have a published counterpart, every cell beside it: `ours / paper (Δ)` per
/// fold and for the mean (of the folds evaluated; `*` when not all four). Empty when no row has one.
fn beside_paper(dataset: &str, rows: &Rows) -> String {
    let mut lines = String::new();
    for (row, folds) in rows {
        let Some(paper) = published_row(dataset, row) else {
            continue;
        };
        let mut line = format!("| {} | {} | {} |", row.method, row.backbone, row.shot);
        for fold in 0..4 {
            let ours = folds.get(&fold).map(|r| Metric::MIoU.of(r));
            line.push_str(&format!(
                " {} |",
                beside(ours, paper.folds.map(|f| f[fold]))
            ));
        }
        let mean = folds.values().map(|r| Metric::MIoU.of(r)).sum::<f64>() / folds.len() as f64;
        let mark = if folds.len() < 4 { "*" } else { "" };
        line.push_str(&format!(
            " {}{mark} |\n",
            beside(Some(mean), Some(paper.miou))
        ));
        lines.push_str(&line);
    }
    if lines.is_empty() {
        return lines;
    }
    format!(
        "## {dataset}: mIoU beside the paper (%)\n\nEach cell: ours / published (ours − published).\n\n\
         | Method | Backbone | Shot | Fold-0 | Fold-1 | Fold-2 | Fold-3 | Mean |\n\
         |---|---|---:|---:|---:|---:|---:|---:|\n{lines}\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::results::{EvalSetting, SeedResult};

    fn result(dataset_coco: bool, svf: bool, shot: usize, fold: usize, miou: f64) -> EvalResult {
        // COCO rows are published for BAM's lists only (†).
        let train_filter = if dataset_coco {
            crate::config::TrainFilter::Bam
        } else {
            crate::config::TrainFilter::Pfenet
        };
        let config = Config {
            use_coco: dataset_coco,
            svf,
            split: fold,
            train_filter,
            ..Config::default()
        };
        EvalResult::from_seeds(
            EvalSetting::new(&config, shot, 1000, true),
            vec![SeedResult {
                seed: 1,
                miou,
                fb_iou: miou + 0.1,
                class_iou: vec![],
            }],
            1.0,
        )
        .unwrap()
    }

    #[test]
    fn tables_place_folds_means_and_published_differences() {
        let mut results: Vec<EvalResult> = (0..4)
            .map(|fold| result(true, true, 1, fold, 0.40 + 0.02 * fold as f64))
            .collect();
        results.push(result(false, false, 1, 2, 0.5));
        let md = paper_tables(&results);
        // COCO PFENet†+SVF R50 1-shot: folds 40, 42, 44, 46; mean 43.00; paper 48.02.
        assert!(
            md.contains("| PFENet†+SVF | ResNet-50 | 1 | 40.00 | 42.00 | 44.00 | 46.00 | 43.00 | 48.02 | -5.02 |"),
            "{md}"
        );
        assert!(
            md.contains(
                "| PFENet†+SVF | ResNet-50 | 1 | 50.00 | 52.00 | 54.00 | 56.00 | 53.00 |\n"
            ),
            "FB-IoU row: {md}"
        );
        // Every cell beside the paper's: 46.88 / 50.86 / 47.69 / 46.64.
        assert!(
            md.contains("| PFENet†+SVF | ResNet-50 | 1 | 40.00 / 46.88 (-6.88) | 42.00 / 50.86 (-8.86) | 44.00 / 47.69 (-3.69) | 46.00 / 46.64 (-0.64) | 43.00 / 48.02 (-5.02) |"),
            "{md}"
        );
        // A BAM+SVF result lands on the paper's BAM†+SVF row (PASCAL R50 1-shot fold 0: 69.38).
        let bam = Config {
            method: crate::config::Method::Bam,
            train_filter: crate::config::TrainFilter::Bam,
            svf: true,
            ..Config::default()
        };
        let bam_result = EvalResult {
            setting: EvalSetting::new(&bam, 1, 1000, true),
            ..result(false, true, 1, 0, 0.70)
        };
        let md_bam = paper_tables(std::slice::from_ref(&bam_result));
        assert!(
            md_bam.contains("| BAM†+SVF | ResNet-50 | 1 | 70.00 / 69.38 (+0.62) | – / 74.51 |"),
            "{md_bam}"
        );
        // PASCAL PFENet with only fold 2: partial mean, marked.
        assert!(
            md.contains(
                "| PFENet | ResNet-50 | 1 | – | – | 50.00 | – | 50.00* | 60.80 | -10.80* |"
            ),
            "{md}"
        );
        assert!(
            md.contains("| PFENet | ResNet-50 | 1 | – / 61.70 | – / 69.50 | 50.00 / 55.40 (-5.40) | – / 56.30 | 50.00 / 60.80 (-10.80)* |"),
            "{md}"
        );
        assert!(md.contains("\\* mean over the folds evaluated"));
        assert!(md.find("## PASCAL-5i: mIoU").unwrap() < md.find("## COCO-20i: mIoU").unwrap());
    }

    #[test]
    fn chart_has_a_group_per_row_with_the_published_bar() {
        let dir = std::env::temp_dir().join(format!("svf-report-chart-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("report.png");
        let results = [
            result(false, true, 1, 0, 0.5),
            result(false, false, 1, 0, 0.4),
        ];
        write_paper_chart(&results, &path).unwrap();
        let image = image::open(&path).unwrap().to_rgb8();
        // Two groups: the minimum width.
        assert_eq!(image.dimensions(), (640, 480));
        // PFENet (ResNet-50, 1-shot) is published (60.8): its bar is drawn in the second colour.
        let paper_bar = image.pixels().filter(|p| p.0 == [255, 127, 14]).count();
        assert!(paper_bar > 1000, "{paper_bar} pixels of the paper's bar");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn published_means_agree_with_their_folds() {
        for p in PUBLISHED {
            if let Some(folds) = p.folds {
                let mean = folds.iter().sum::<f64>() / 4.0;
                // PFENet's own paper rounded from unrounded folds: 60.725 is printed 60.8.
                assert!((mean - p.miou).abs() < 0.08, "{p:?}: folds give {mean}");
            }
        }
        // Every row of the paper's grid is there: 2 datasets x 4 methods x 2 backbones x 2 shots,
        // plus PFENet's own PASCAL ResNet-50 rows.
        assert_eq!(PUBLISHED.len(), 2 * 4 * 2 * 2 + 2);
    }

    #[test]
    fn finds_results_recursively_and_reports_an_empty_folder() {
        let dir = std::env::temp_dir().join(format!("svf-report-find-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        assert!(matches!(find_results(&dir), Err(ReportError::NoResults(_))));
        result(false, true, 5, 3, 0.25)
            .write(&dir.join("a/b"))
            .unwrap();
        result(false, false, 5, 3, 0.5)
            .write(&dir.join("c"))
            .unwrap();
        let found = find_results(&dir).unwrap();
        assert_eq!(found.results.len(), 2);
        assert!(found.warnings.is_empty(), "{:?}", found.warnings);
        // In cell order (PFENet before PFENet+SVF), each with its file.
        assert_eq!(found.results[0].0, dir.join("c/eval.json"));
        assert_eq!(found.results[0].1.setting.method, "PFENet");
        assert_eq!(found.results[1].0, dir.join("a/b/eval.json"));
        assert_eq!(found.results[1].1.setting.method, "PFENet+SVF");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn one_result_per_cell_the_newer_shown_and_differing_protocols_footnoted() {
        let dir = std::env::temp_dir().join(format!("svf-report-cells-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let paper = result(false, true, 1, 0, 0.7);
        let mut quick = result(false, true, 1, 0, 0.8);
        quick.setting.episodes = 5;
        paper.write(&dir.join("paper")).unwrap();
        quick.write(&dir.join("quick")).unwrap();
        // The paper protocol's file is the newer one, though found first.
        let later = std::time::SystemTime::now() + std::time::Duration::from_secs(60);
        std::fs::File::options()
            .write(true)
            .open(dir.join("paper/eval.json"))
            .unwrap()
            .set_modified(later)
            .unwrap();
        let FoundResults {
            results: kept,
            warnings,
        } = find_results(&dir).unwrap();
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].0, dir.join("paper/eval.json"));
        assert_eq!(kept[0].1.miou.mean, 0.7);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        let shown = dir.join("paper/eval.json").display().to_string();
        let hidden = dir.join("quick/eval.json").display().to_string();
        assert!(
            warnings[0].contains(&format!(
                "showing {shown} (the later-modified), not {hidden}"
            )),
            "{warnings:?}"
        );
        // Different cells measured differently: each cell names its protocol.
        let mut fold1 = quick.clone();
        fold1.setting.fold = 1;
        let md = paper_tables(&[paper, fold1]);
        assert!(md.contains("| 70.00 (a) | 80.00 (b) |"), "{md}");
        assert!(
            md.contains(
                "(a) mean over 1 seed(s) of 1000 episodes at the original label resolution."
            ),
            "{md}"
        );
        assert!(
            md.contains("(b) mean over 1 seed(s) of 5 episodes at the original label resolution."),
            "{md}"
        );
        assert!(!md.contains("Each cell"), "{md}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
