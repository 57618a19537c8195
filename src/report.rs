//! Paper tables: aggregation of eval results beside the published numbers, and qualitative panels.
//!
//! `svf-report DIR` reads every `eval.json` under `DIR` and lays them out as the paper does: one
//! table per dataset and metric, rows = method × backbone × shot, columns = folds 0-3 and their mean,
//! with the published mean (REFERENCE §7) and our difference to it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use image::{Rgb, RgbImage};

use crate::eval::{EvalError, EvalResult};

/// Why the results could not be gathered.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("cannot list {path}: {source}; pass the output folder of the evaluation runs")]
    List {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Eval(#[from] EvalError),
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

/// REFERENCE §7: the SVF paper's Tables 1 and 2 (mIoU). † = trained on BAM's filtered lists
/// (`train_filter: bam`); BAM rows are there for reference, this project trains PFENet only.
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

/// Every `eval.json` under `dir` (recursively), in path order.
pub fn find_results(dir: &Path) -> Result<Vec<(PathBuf, EvalResult)>, ReportError> {
    let mut paths = Vec::new();
    collect_eval_files(dir, &mut paths)?;
    paths.sort();
    if paths.is_empty() {
        return Err(ReportError::NoResults(dir.to_path_buf()));
    }
    paths
        .into_iter()
        .map(|path| {
            let result = EvalResult::read(&path)?;
            Ok((path, result))
        })
        .collect()
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

/// The Markdown tables of `results`: per dataset (PASCAL-5i, then COCO-20i, then any other), one
/// mIoU and one FB-IoU table. A later result for the same dataset, row and fold replaces an earlier
/// one (results come in path order).
pub fn paper_tables(results: &[EvalResult]) -> String {
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
                        Some(result) => line.push_str(&format!(" {:.2} |", metric.of(result))),
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
    let summary = results
        .first()
        .map(|r| {
            format!(
                "Each cell: mean over {} seed(s) of {} episodes{}. ",
                r.seeds.len(),
                r.setting.episodes,
                if r.setting.ori_resize {
                    " at the original label resolution"
                } else {
                    ""
                }
            )
        })
        .unwrap_or_default();
    md.push_str(&format!(
        "{summary}Paper: published mean over the four folds (REFERENCE §7); Δ = ours − paper; † = trained on BAM's filtered lists (`train_filter: bam`).\n"
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

/// Glyphs of a 5×7 bitmap font, one row per byte (bit 4 = leftmost pixel): digits, capitals and a
/// little punctuation, enough for titles such as `CLASS 7  IOU 54.2%`. Lower case draws as upper
/// case; anything else as `?`.
fn glyph(c: char) -> [u8; 7] {
    match c.to_ascii_uppercase() {
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        'A' => [0x0E, 0x11, 0x11, 0x11, 0x1F, 0x11, 0x11],
        'B' => [0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E],
        'C' => [0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E],
        'D' => [0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C],
        'E' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F],
        'F' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10],
        'G' => [0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F],
        'H' => [0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'I' => [0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'J' => [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C],
        'K' => [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11],
        'L' => [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F],
        'M' => [0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11],
        'N' => [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11],
        'O' => [0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'P' => [0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10],
        'Q' => [0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D],
        'R' => [0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11],
        'S' => [0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E],
        'T' => [0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04],
        'U' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'V' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'W' => [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A],
        'X' => [0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11],
        'Y' => [0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04],
        'Z' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F],
        ' ' => [0; 7],
        '.' => [0, 0, 0, 0, 0, 0x0C, 0x0C],
        ',' => [0, 0, 0, 0, 0x0C, 0x04, 0x08],
        ':' => [0, 0x0C, 0x0C, 0, 0x0C, 0x0C, 0],
        '-' => [0, 0, 0, 0x1F, 0, 0, 0],
        '+' => [0, 0x04, 0x04, 0x1F, 0x04, 0x04, 0],
        '=' => [0, 0, 0x1F, 0, 0x1F, 0, 0],
        '%' => [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03],
        '/' => [0, 0x01, 0x02, 0x04, 0x08, 0x10, 0],
        '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02],
        ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08],
        '_' => [0, 0, 0, 0, 0, 0, 0x1F],
        _ => [0x0E, 0x11, 0x01, 0x02, 0x04, 0, 0x04],
    }
}

/// Width in pixels of `text` drawn at `scale` (5 pixels per glyph and 1 of spacing, times scale).
pub fn text_width(text: &str, scale: u32) -> u32 {
    (text.chars().count() as u32 * 6).saturating_sub(1) * scale
}

/// Draws `text` with its top-left corner at (x, y), each font pixel a `scale`×`scale` square;
/// what falls outside the image is clipped.
pub fn draw_text(image: &mut RgbImage, x: u32, y: u32, text: &str, scale: u32, color: Rgb<u8>) {
    for (index, c) in text.chars().enumerate() {
        let left = x + index as u32 * 6 * scale;
        for (row, bits) in glyph(c).iter().enumerate() {
            for col in 0..5u32 {
                if bits & (0x10 >> col) == 0 {
                    continue;
                }
                for dy in 0..scale {
                    for dx in 0..scale {
                        let (px, py) = (left + col * scale + dx, y + row as u32 * scale + dy);
                        if px < image.width() && py < image.height() {
                            image.put_pixel(px, py, color);
                        }
                    }
                }
            }
        }
    }
}

/// Tiles narrower than this are enlarged (nearest, by an integer factor) so that the panel stays
/// readable for small validation sizes and its captions fit.
const MIN_TILE_WIDTH: u32 = 160;

/// A qualitative panel: the tiles (e.g. support with its mask, query with the ground truth, query
/// with the prediction) side by side under a title strip holding `title` and each tile's caption.
pub fn qualitative_panel(title: &str, tiles: &[(&str, &RgbImage)]) -> RgbImage {
    const GAP: u32 = 4;
    const SCALE: u32 = 2;
    let tiles: Vec<(&str, RgbImage)> = tiles
        .iter()
        .map(|(caption, tile)| {
            let factor = MIN_TILE_WIDTH.div_ceil(tile.width().max(1)).max(1);
            let enlarged = image::imageops::resize(
                *tile,
                tile.width() * factor,
                tile.height() * factor,
                image::imageops::FilterType::Nearest,
            );
            (*caption, enlarged)
        })
        .collect();
    let line = 7 * SCALE + 2 * GAP;
    let strip = 2 * line;
    let width = tiles.iter().map(|(_, t)| t.width() + GAP).sum::<u32>() + GAP;
    let height = strip + tiles.iter().map(|(_, t)| t.height()).max().unwrap_or(0) + GAP;
    let width = width.max(text_width(title, SCALE) + 2 * GAP);
    let mut panel = RgbImage::from_pixel(width, height, Rgb([255, 255, 255]));
    let ink = Rgb([0, 0, 0]);
    draw_text(&mut panel, GAP, GAP, title, SCALE, ink);
    let mut x = GAP;
    for (caption, tile) in &tiles {
        draw_text(&mut panel, x, line + GAP, caption, SCALE, ink);
        image::imageops::replace(&mut panel, tile, x as i64, strip as i64);
        x += tile.width() + GAP;
    }
    panel
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::eval::{EvalSetting, SeedResult};

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
        assert_eq!(found.len(), 2);
        assert_eq!(found[0].0, dir.join("a/b/eval.json"));
        assert_eq!(found[0].1.setting.method, "PFENet+SVF");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn text_is_drawn_from_the_glyphs() {
        let mut image = RgbImage::new(20, 10);
        let ink = Rgb([255, 0, 0]);
        draw_text(&mut image, 1, 1, "1-", 1, ink);
        // '1': rows 0x04, 0x0C, then 0x04...: pixel (x=1+2, y=1) lit, (1+1, 1+1) lit, (1, 1) not.
        assert_eq!(*image.get_pixel(3, 1), ink);
        assert_eq!(*image.get_pixel(2, 2), ink);
        assert_eq!(*image.get_pixel(1, 1), Rgb([0, 0, 0]));
        // '-' starts 6 pixels further: its middle row (y=1+3) spans x=7..=11.
        assert!((7..12).all(|x| *image.get_pixel(x, 4) == ink));
        assert_eq!(*image.get_pixel(7, 3), Rgb([0, 0, 0]));
        let lit = image.pixels().filter(|p| **p == ink).count();
        assert_eq!(lit, 10 + 5, "'1' has 10 pixels, '-' 5");
        // Scaled text stays clipped inside the image and has the announced width.
        draw_text(&mut image, 15, 5, "88", 3, ink);
        assert_eq!(text_width("88", 3), 33);
        // Every digit and letter is a distinct glyph.
        let mut glyphs: Vec<[u8; 7]> = ('0'..='9').chain('A'..='Z').map(glyph).collect();
        glyphs.sort();
        glyphs.dedup();
        assert_eq!(glyphs.len(), 36);
    }

    #[test]
    fn panel_places_tiles_under_the_title_strip() {
        let red = RgbImage::from_pixel(200, 8, Rgb([255, 0, 0]));
        // 60 wide: enlarged 3 times to 180 x 18.
        let blue = RgbImage::from_pixel(60, 6, Rgb([0, 0, 255]));
        let panel = qualitative_panel("IOU 50.0%", &[("A", &red), ("B", &blue)]);
        let strip = 2 * (14 + 8);
        assert_eq!(panel.height(), strip + 18 + 4);
        assert_eq!(panel.width(), 4 + 200 + 4 + 180 + 4);
        assert_eq!(*panel.get_pixel(4, strip), Rgb([255, 0, 0]));
        assert_eq!(*panel.get_pixel(4, strip + 8), Rgb([255, 255, 255]));
        assert_eq!(*panel.get_pixel(208 + 179, strip + 17), Rgb([0, 0, 255]));
        // Title ink is in the strip.
        assert!((0..strip)
            .any(|y| (0..panel.width()).any(|x| *panel.get_pixel(x, y) == Rgb([0, 0, 0]))));
    }
}
