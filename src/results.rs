//! An evaluation's figures: what was evaluated ([`EvalSetting`]), per-seed and per-class IoU, and
//! their mean ± std over seeds ([`EvalResult`]), written as `eval.json` (read back by the report)
//! and `eval.md` (for people). Apart from the evaluation itself, so that the report reads results
//! without depending on how they were computed.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::metrics::IoUAccumulator;

/// Why a result could not be summarised, stored or read.
#[derive(Debug, thiserror::Error)]
pub enum ResultError {
    #[error("cannot write {path}: {source}; check that the output directory is writable")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read evaluation result {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not an evaluation result written by svf-eval: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("no seeds given: pass --seeds with at least one seed")]
    NoSeeds,
}

/// What was evaluated: enough to place the result in a paper table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalSetting {
    /// `PASCAL-5i` or `COCO-20i`.
    pub dataset: String,
    pub fold: usize,
    pub shot: usize,
    /// `PFENet`, `PFENet+SVF`, `BAM` or `BAM+SVF`, with † after the method when trained on BAM's
    /// lists (`train_filter: bam`: `PFENet†+SVF`, `BAM†`), as the paper names those rows.
    pub method: String,
    /// `ResNet-50`, `VGG-16`, ... (with the width when reduced).
    pub backbone: String,
    /// Episodes per seed.
    pub episodes: u64,
    /// Compared at the original label resolution.
    pub ori_resize: bool,
    pub val_size: i64,
}

impl EvalSetting {
    /// The setting of evaluating `config`'s model with `shot` supports for `episodes` episodes.
    pub fn new(config: &Config, shot: usize, episodes: u64, ori_resize: bool) -> EvalSetting {
        let dataset = if config.use_coco {
            "COCO-20i"
        } else {
            "PASCAL-5i"
        };
        // † marks training on BAM's filtered lists, as the paper's tables do.
        let method = format!(
            "{}{}{}",
            match config.method {
                crate::config::Method::Pfenet => "PFENet",
                crate::config::Method::Bam => "BAM",
            },
            if config.train_filter == crate::config::TrainFilter::Bam {
                "†"
            } else {
                ""
            },
            if config.svf { "+SVF" } else { "" }
        );
        let mut backbone = if config.vgg {
            "VGG-16".to_string()
        } else {
            format!("ResNet-{}", config.layers)
        };
        if config.backbone_width < 1.0 {
            backbone.push_str(&format!(" x{}", config.backbone_width));
        }
        EvalSetting {
            dataset: dataset.to_string(),
            fold: config.split,
            shot,
            method,
            backbone,
            episodes,
            ori_resize,
            val_size: config.val_size,
        }
    }
}

/// One class's IoU and how many episodes it was met in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassIoU {
    pub class_id: usize,
    pub iou: f64,
    pub episodes: u64,
}

/// The result of one seed's episodes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeedResult {
    pub seed: u64,
    pub miou: f64,
    pub fb_iou: f64,
    pub class_iou: Vec<ClassIoU>,
}

impl SeedResult {
    /// The figures of `accumulator` after the seed's episodes.
    pub fn from_accumulator(seed: u64, accumulator: &IoUAccumulator) -> SeedResult {
        SeedResult {
            seed,
            miou: accumulator.miou(),
            fb_iou: accumulator.fb_iou(),
            class_iou: accumulator
                .class_iou()
                .into_iter()
                .zip(accumulator.class_episodes())
                .map(|((class_id, iou), (_, episodes))| ClassIoU {
                    class_id,
                    iou,
                    episodes,
                })
                .collect(),
        }
    }
}

/// Mean and population standard deviation over seeds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MeanStd {
    pub mean: f64,
    pub std: f64,
}

impl MeanStd {
    fn of(values: impl Iterator<Item = f64> + Clone) -> MeanStd {
        let n = values.clone().count().max(1) as f64;
        let mean = values.clone().sum::<f64>() / n;
        let var = values.map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
        MeanStd {
            mean,
            std: var.sqrt(),
        }
    }
}

/// An evaluation's figures (fractions in [0, 1]): per seed, and mean ± std over seeds. Written as
/// `eval.json` (read back by the report) and `eval.md` (for people).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalResult {
    pub setting: EvalSetting,
    pub seeds: Vec<SeedResult>,
    pub miou: MeanStd,
    pub fb_iou: MeanStd,
    /// Each class's IoU averaged over seeds; `episodes` summed over seeds.
    pub class_iou: Vec<ClassIoU>,
    /// Episodes evaluated per second of wall time (loading included).
    pub episodes_per_second: f64,
}

impl EvalResult {
    /// Summarises the seeds' results.
    pub fn from_seeds(
        setting: EvalSetting,
        seeds: Vec<SeedResult>,
        episodes_per_second: f64,
    ) -> Result<EvalResult, ResultError> {
        let first = seeds.first().ok_or(ResultError::NoSeeds)?;
        let class_iou = first
            .class_iou
            .iter()
            .enumerate()
            .map(|(slot, class)| ClassIoU {
                class_id: class.class_id,
                iou: MeanStd::of(seeds.iter().map(|s| s.class_iou[slot].iou)).mean,
                episodes: seeds.iter().map(|s| s.class_iou[slot].episodes).sum(),
            })
            .collect();
        Ok(EvalResult {
            miou: MeanStd::of(seeds.iter().map(|s| s.miou)),
            fb_iou: MeanStd::of(seeds.iter().map(|s| s.fb_iou)),
            setting,
            seeds,
            class_iou,
            episodes_per_second,
        })
    }

    /// Writes `eval.json` and `eval.md` into `dir` (created if needed). An earlier result there
    /// (another shot count, protocol or checkpoint, say) is kept as `eval.N.json` / `eval.N.md`,
    /// N the first number free, which the report does not read.
    pub fn write(&self, dir: &Path) -> Result<(), ResultError> {
        let write = |path: PathBuf, text: String| {
            std::fs::create_dir_all(dir)
                .and_then(|()| std::fs::write(&path, text))
                .map_err(|source| ResultError::Write { path, source })
        };
        let json_path = dir.join("eval.json");
        if json_path.exists() {
            let kept = (1..)
                .map(|n| dir.join(format!("eval.{n}.json")))
                .find(|p| !p.exists() && !p.with_extension("md").exists())
                .expect("a free number");
            let rename = |from: &Path, to: &Path| {
                std::fs::rename(from, to).map_err(|source| ResultError::Write {
                    path: to.to_path_buf(),
                    source,
                })
            };
            rename(&json_path, &kept)?;
            let markdown = dir.join("eval.md");
            if markdown.exists() {
                rename(&markdown, &kept.with_extension("md"))?;
            }
            tracing::warn!(
                "{} held an earlier result: kept as {}",
                json_path.display(),
                kept.display()
            );
        }
        let json = serde_json::to_string_pretty(self).expect("an EvalResult always serialises");
        write(json_path, json + "\n")?;
        write(dir.join("eval.md"), self.to_markdown())
    }

    /// Reads an `eval.json`.
    pub fn read(path: &Path) -> Result<EvalResult, ResultError> {
        let text = std::fs::read_to_string(path).map_err(|source| ResultError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| ResultError::Parse {
            path: path.to_path_buf(),
            source,
        })
    }

    /// The result table: per seed and mean ± std of mIoU and FB-IoU (in %), then per-class IoU.
    pub fn to_markdown(&self) -> String {
        let s = &self.setting;
        let resolution = if s.ori_resize {
            "compared at the original label resolution".to_string()
        } else {
            format!("compared at {0}x{0}", s.val_size)
        };
        let mut md = format!(
            "# {} ({}) on {} fold {}, {}-shot\n\n{} episodes per seed, {} seed(s), {}; {:.2} episodes/s.\n\n",
            s.method,
            s.backbone,
            s.dataset,
            s.fold,
            s.shot,
            s.episodes,
            self.seeds.len(),
            resolution,
            self.episodes_per_second
        );
        md.push_str("| Seed | mIoU (%) | FB-IoU (%) |\n|---:|---:|---:|\n");
        for seed in &self.seeds {
            md.push_str(&format!(
                "| {} | {:.2} | {:.2} |\n",
                seed.seed,
                100.0 * seed.miou,
                100.0 * seed.fb_iou
            ));
        }
        md.push_str(&format!(
            "| mean ± std | {:.2} ± {:.2} | {:.2} ± {:.2} |\n\n",
            100.0 * self.miou.mean,
            100.0 * self.miou.std,
            100.0 * self.fb_iou.mean,
            100.0 * self.fb_iou.std
        ));
        md.push_str("| Class | IoU (%) | Episodes |\n|---:|---:|---:|\n");
        for class in &self.class_iou {
            md.push_str(&format!(
                "| {} | {:.2} | {} |\n",
                class.class_id,
                100.0 * class.iou,
                class.episodes
            ));
        }
        md
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed(seed: u64, miou: f64, fb_iou: f64, class_iou: [f64; 2]) -> SeedResult {
        SeedResult {
            seed,
            miou,
            fb_iou,
            class_iou: vec![
                ClassIoU {
                    class_id: 6,
                    iou: class_iou[0],
                    episodes: 3,
                },
                ClassIoU {
                    class_id: 7,
                    iou: class_iou[1],
                    episodes: 2,
                },
            ],
        }
    }

    fn sample_result() -> EvalResult {
        let config = Config {
            split: 1,
            svf: true,
            ..Config::default()
        };
        EvalResult::from_seeds(
            EvalSetting::new(&config, 5, 1000, true),
            vec![seed(1, 0.5, 0.7, [0.4, 0.6]), seed(2, 0.7, 0.8, [0.6, 0.8])],
            12.5,
        )
        .unwrap()
    }

    #[test]
    fn methods_are_named_as_the_papers_rows() {
        use crate::config::{Method, TrainFilter};
        let name = |method, train_filter, svf| {
            let config = Config {
                method,
                train_filter,
                svf,
                ..Config::default()
            };
            EvalSetting::new(&config, 1, 1000, true).method
        };
        assert_eq!(name(Method::Pfenet, TrainFilter::Pfenet, false), "PFENet");
        assert_eq!(name(Method::Pfenet, TrainFilter::Bam, true), "PFENet†+SVF");
        assert_eq!(name(Method::Bam, TrainFilter::Bam, false), "BAM†");
        assert_eq!(name(Method::Bam, TrainFilter::Bam, true), "BAM†+SVF");
        assert_eq!(name(Method::Bam, TrainFilter::Pfenet, true), "BAM+SVF");
    }

    #[test]
    fn summary_is_mean_and_population_std_over_seeds() {
        let result = sample_result();
        assert!((result.miou.mean - 0.6).abs() < 1e-12);
        assert!((result.miou.std - 0.1).abs() < 1e-12);
        assert!((result.fb_iou.mean - 0.75).abs() < 1e-12);
        assert!((result.class_iou[1].iou - 0.7).abs() < 1e-12);
        assert_eq!(result.class_iou[0].episodes, 6);
        assert_eq!(result.setting.method, "PFENet+SVF");
        assert_eq!(result.setting.backbone, "ResNet-50");
        assert_eq!(result.setting.dataset, "PASCAL-5i");
        assert!(matches!(
            EvalResult::from_seeds(result.setting.clone(), vec![], 1.0),
            Err(ResultError::NoSeeds)
        ));
    }

    #[test]
    fn json_round_trips_and_markdown_shows_every_seed() {
        let dir = std::env::temp_dir().join(format!("svf-eval-write-{}", std::process::id()));
        let result = sample_result();
        result.write(&dir).unwrap();
        assert_eq!(EvalResult::read(&dir.join("eval.json")).unwrap(), result);
        let md = std::fs::read_to_string(dir.join("eval.md")).unwrap();
        assert!(md.contains("| 1 | 50.00 | 70.00 |"), "{md}");
        assert!(
            md.contains("| mean ± std | 60.00 ± 10.00 | 75.00 ± 5.00 |"),
            "{md}"
        );
        assert!(md.contains("| 7 | 70.00 | 4 |"), "{md}");
        std::fs::write(dir.join("bad.json"), "{}").unwrap();
        let message = EvalResult::read(&dir.join("bad.json"))
            .unwrap_err()
            .to_string();
        assert!(message.contains("bad.json"), "{message}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_earlier_result_is_kept_beside_the_new_one() {
        let dir = std::env::temp_dir().join(format!("svf-eval-keep-{}", std::process::id()));
        let first = sample_result();
        let mut second = sample_result();
        second.setting.shot = 5;
        let mut third = sample_result();
        third.setting.episodes = 7;
        for result in [&first, &second, &third] {
            result.write(&dir).unwrap();
        }
        assert_eq!(EvalResult::read(&dir.join("eval.json")).unwrap(), third);
        assert_eq!(EvalResult::read(&dir.join("eval.1.json")).unwrap(), first);
        assert_eq!(EvalResult::read(&dir.join("eval.2.json")).unwrap(), second);
        let md = std::fs::read_to_string(dir.join("eval.1.md")).unwrap();
        assert_eq!(md, first.to_markdown());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
