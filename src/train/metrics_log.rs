//! `metrics.jsonl`: one JSON object per logged training iteration and per validation.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::plot::{write_panels, Panel, PlotError, Series};

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum MetricsRecord {
    /// A training iteration (every `print_freq`).
    Train {
        epoch: usize,
        /// Global 1-based iteration.
        iteration: u64,
        loss: f64,
        main_loss: f64,
        aux_loss: f64,
        /// The base learning rate (each group's is its `*_lr_scale` times this).
        lr: f64,
        episodes_per_second: f64,
    },
    /// A validation on the novel classes after `epoch` epochs (0 = before training), or with
    /// `mid_epoch` in the middle of epoch `epoch` (1-based; `val_half_epoch`).
    Val {
        epoch: usize,
        iteration: u64,
        miou: f64,
        fb_iou: f64,
        /// Whether this became the best checkpoint.
        best: bool,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        mid_epoch: bool,
    },
}

/// Appends records to a run's `metrics.jsonl`.
pub struct MetricsLog {
    path: PathBuf,
    file: File,
}

impl MetricsLog {
    /// The file name inside a run directory.
    pub const FILE_NAME: &'static str = "metrics.jsonl";

    /// Opens `run_dir/metrics.jsonl` for appending. On resume, `keep` says which existing records
    /// the checkpoint covers; the others (written after it, then lost) are dropped so that the file
    /// reads as one uninterrupted run.
    pub fn open(
        run_dir: &Path,
        keep: Option<&dyn Fn(&MetricsRecord) -> bool>,
    ) -> std::io::Result<MetricsLog> {
        let path = run_dir.join(Self::FILE_NAME);
        if let (Some(keep), true) = (keep, path.exists()) {
            let text = std::fs::read_to_string(&path)?;
            let kept: String = text
                .lines()
                .filter(|line| {
                    serde_json::from_str::<MetricsRecord>(line).is_ok_and(|record| keep(&record))
                })
                .map(|line| format!("{line}\n"))
                .collect();
            let tmp = run_dir.join(format!("{}.tmp", Self::FILE_NAME));
            std::fs::write(&tmp, kept)?;
            std::fs::rename(&tmp, &path)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        Ok(MetricsLog { path, file })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn append(&mut self, record: &MetricsRecord) -> std::io::Result<()> {
        let line = serde_json::to_string(record).expect("a metrics record serialises");
        writeln!(self.file, "{line}")
    }
}

/// The training curves beside `metrics.jsonl` in a run directory.
pub const CURVES_FILE: &str = "curves.png";

/// Draws `records` as four panels: loss and learning rate against iterations, validation mIoU and
/// FB-IoU (%) against epochs.
pub fn write_curves(records: &[MetricsRecord], path: &Path) -> Result<(), PlotError> {
    let (mut loss, mut main_loss, mut lr) = (Vec::new(), Vec::new(), Vec::new());
    let (mut miou, mut fb_iou) = (Vec::new(), Vec::new());
    for record in records {
        match *record {
            MetricsRecord::Train {
                iteration,
                loss: total,
                main_loss: main,
                lr: rate,
                ..
            } => {
                let x = iteration as f64;
                loss.push((x, total));
                main_loss.push((x, main));
                lr.push((x, rate));
            }
            MetricsRecord::Val {
                epoch,
                miou: m,
                fb_iou: f,
                mid_epoch,
                ..
            } => {
                // A mid-epoch validation's `epoch` is the (1-based) epoch in progress.
                let x = epoch as f64 - if mid_epoch { 0.5 } else { 0.0 };
                miou.push((x, 100.0 * m));
                fb_iou.push((x, 100.0 * f));
            }
        }
    }
    let panel = |title, x_label, series, log_y| Panel {
        title,
        x_label,
        series,
        log_y,
    };
    let series = |name, points| Series { name, points };
    let panels = [
        panel(
            "training loss",
            "iteration",
            vec![series("total", loss), series("main", main_loss)],
            false,
        ),
        panel(
            "learning rate (base)",
            "iteration",
            vec![series("base lr", lr)],
            true,
        ),
        panel(
            "validation mIoU (%)",
            "epoch",
            vec![series("mIoU", miou)],
            false,
        ),
        panel(
            "validation FB-IoU (%)",
            "epoch",
            vec![series("FB-IoU", fb_iou)],
            false,
        ),
    ];
    write_panels(path, &panels, 2)
}

/// Reads every record of a `metrics.jsonl`, skipping lines that are not records.
pub fn read_metrics(path: &Path) -> std::io::Result<Vec<MetricsRecord>> {
    Ok(std::fs::read_to_string(path)?
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn train(iteration: u64) -> MetricsRecord {
        MetricsRecord::Train {
            epoch: 1,
            iteration,
            loss: 0.5,
            main_loss: 0.3,
            aux_loss: 0.2,
            lr: 0.01,
            episodes_per_second: 3.0,
        }
    }

    #[test]
    fn lines_are_tagged_json_and_resume_drops_records_after_the_checkpoint() {
        let dir = std::env::temp_dir().join(format!("svf-metrics-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut log = MetricsLog::open(&dir, None).unwrap();
        for i in [5, 10, 15] {
            log.append(&train(i)).unwrap();
        }
        let text = std::fs::read_to_string(log.path()).unwrap();
        assert!(
            text.starts_with(r#"{"kind":"train","epoch":1,"iteration":5,"#),
            "{text}"
        );
        drop(log);
        let keep = |r: &MetricsRecord| matches!(r, MetricsRecord::Train { iteration, .. } if *iteration <= 10);
        let mut log = MetricsLog::open(&dir, Some(&keep)).unwrap();
        log.append(&train(15)).unwrap();
        let records = read_metrics(log.path()).unwrap();
        assert_eq!(records, [train(5), train(10), train(15)]);
    }
}
