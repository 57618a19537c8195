//! The evaluation protocol: fixed-seed episodes, original-resolution comparison, result tables.
//!
//! Follows PFENet's and BAM's `test.py` (REFERENCE §6): the episodes of a seed are a pure function of
//! (seed, index), so every run sees the same ones; each prediction is compared with the episode's
//! label at its original size; BAM's protocol repeats this for several seeds and reports the mean.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};

use crate::amp;
use crate::backbone::Init;
use crate::checkpoint::{self, CheckpointError, CheckpointFiles};
use crate::config::Config;
use crate::data::rng::EpisodeRng;
use crate::data::IGNORE_LABEL;
use crate::data::{DataError, EpisodeBatch, EpisodeLoader, FewShotDataset, Split};
use crate::metrics::IoUAccumulator;
use crate::model::{ModelError, PfeNet};
use crate::predict::{self, PredictError};
use crate::report;

/// Why an evaluation could not run or its results could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
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
    #[error("no weights in {dir}: neither {best} nor {last} exists; pass the checkpoint file to --weights")]
    NoWeights {
        dir: PathBuf,
        best: PathBuf,
        last: PathBuf,
    },
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Panel(#[from] PredictError),
}

/// How to evaluate: which episodes, how many seeds, and what to write besides the figures.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalOptions {
    /// Episodes per seed.
    pub episodes: u64,
    /// One evaluation per seed; the result reports each and their mean ± std.
    pub seeds: Vec<u64>,
    /// Support images per episode.
    pub shot: usize,
    /// Compare at the original label resolution (else at the `val_size` canvas).
    pub ori_resize: bool,
    /// Episodes per forward pass.
    pub batch_size: usize,
    /// Loader threads; the result does not depend on them.
    pub workers: usize,
    /// Write a qualitative panel for each of the first `.1` episodes of the first seed into `.0`.
    pub panels: Option<(PathBuf, usize)>,
}

/// The seeds of the SVF paper's test (BAM's `test.py`: `numpy.random.seed(123);
/// numpy.random.randint(0, 1000, 5)`), used literally: [`draw_seeds`] draws other values.
pub const PAPER_SEEDS: [u64; 5] = [510, 365, 382, 322, 988];
/// Episodes per seed of the paper's test, PASCAL-5i and COCO-20i alike.
pub const PAPER_EPISODES: u64 = 1000;

/// How `svf-eval` evaluates by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Protocol {
    /// PFENet's: one seed (the config's `manual_seed`), 1000 episodes for PASCAL-5i and 4000
    /// for COCO-20i.
    #[default]
    Pfenet,
    /// The SVF paper's (BAM's test): 1000 episodes for each of the seeds 510, 365, 382, 322, 988;
    /// the mean is the reported figure.
    Paper,
}

impl EvalOptions {
    /// The options of `protocol` for `config`'s model.
    pub fn for_protocol(config: &Config, protocol: Protocol) -> EvalOptions {
        match protocol {
            Protocol::Pfenet => EvalOptions::for_test(config),
            Protocol::Paper => EvalOptions {
                episodes: PAPER_EPISODES,
                seeds: PAPER_SEEDS.to_vec(),
                ..EvalOptions::for_validation(config)
            },
        }
    }

    /// `svf-eval`'s defaults: 1000 episodes for PASCAL-5i and 4000 for COCO-20i, one seed (the
    /// config's `manual_seed`), the config's shot, `ori_resize`, `batch_size_val` and `workers`.
    pub fn for_test(config: &Config) -> EvalOptions {
        EvalOptions {
            episodes: if config.use_coco { 4000 } else { 1000 },
            ..EvalOptions::for_validation(config)
        }
    }

    /// The validation inside training: `val_episodes` episodes, otherwise as [`EvalOptions::for_test`].
    pub fn for_validation(config: &Config) -> EvalOptions {
        EvalOptions {
            episodes: config.val_episodes as u64,
            seeds: vec![config.manual_seed],
            shot: config.shot,
            ori_resize: config.ori_resize,
            batch_size: config.batch_size_val,
            workers: config.workers,
            panels: None,
        }
    }
}

/// Evaluates `model` on the novel classes of `config`'s fold (validation list), once per seed.
/// The model runs in eval mode (no dropout, BatchNorm running statistics) without autograd.
pub fn evaluate(
    model: &PfeNet,
    config: &Config,
    device: Device,
    options: &EvalOptions,
) -> Result<EvalResult, EvalError> {
    let config = Config {
        shot: options.shot,
        ..config.clone()
    };
    let dataset = Arc::new(FewShotDataset::open(&config, Split::Val)?);
    amp::prepare(&config, device);
    evaluate_on(model, &dataset, &config, device, options)
}

/// [`evaluate`] on a dataset already opened (training validates every epoch on the same one).
/// `dataset` must be the validation split with `options.shot` supports.
pub fn evaluate_on(
    model: &PfeNet,
    dataset: &Arc<FewShotDataset>,
    config: &Config,
    device: Device,
    options: &EvalOptions,
) -> Result<EvalResult, EvalError> {
    if options.seeds.is_empty() {
        return Err(EvalError::NoSeeds);
    }
    let bar = crate::logging::progress_bar(options.episodes * options.seeds.len() as u64, "eval");
    let start = Instant::now();
    let mut seeds = Vec::with_capacity(options.seeds.len());
    for (run, &seed) in options.seeds.iter().enumerate() {
        let mut accumulator = IoUAccumulator::new(dataset.classes());
        let loader = EpisodeLoader::for_device(
            dataset.clone(),
            seed,
            0..options.episodes,
            options.batch_size,
            options.workers,
            device,
        );
        for batch in loader {
            let batch = batch?;
            let logits = inference_logits(
                model,
                config,
                &batch
                    .query_image
                    .to_device_(device, batch.query_image.kind(), true, false),
                &batch
                    .support_images
                    .to_device_(device, batch.support_images.kind(), true, false),
                &batch
                    .support_labels
                    .to_device_(device, batch.support_labels.kind(), true, false),
            );
            if options.ori_resize {
                // Counts stay on the device until the seed ends (one read per seed).
                for (e, original) in batch.original_labels.iter().enumerate() {
                    let (pred, target) = original_resolution(&logits.get(e as i64), original);
                    accumulator.add_deferred(&pred, &target, &batch.class_ids[e..=e]);
                }
            } else {
                accumulator.add_episodes(
                    &logits.argmax(1, false),
                    &batch
                        .query_label
                        .to_device_(device, batch.query_label.kind(), true, false),
                    &batch.class_ids,
                );
            }
            if let (0, Some((dir, count))) = (run, &options.panels) {
                write_panels(dir, *count, &batch, &logits, options.ori_resize)?;
            }
            bar.inc(batch.class_ids.len() as u64);
        }
        accumulator.flush();
        let result = SeedResult::from_accumulator(seed, &accumulator);
        tracing::info!(
            seed,
            episodes = options.episodes,
            "mIoU {:.2}  FB-IoU {:.2}",
            100.0 * result.miou,
            100.0 * result.fb_iou
        );
        seeds.push(result);
    }
    bar.finish_and_clear();
    let evaluated = options.episodes * options.seeds.len() as u64;
    let setting = EvalSetting::new(config, options.shot, options.episodes, options.ori_resize);
    EvalResult::from_seeds(
        setting,
        seeds,
        evaluated as f64 / start.elapsed().as_secs_f64().max(1e-9),
    )
}

/// The logits `[B, 2, H, W]` of `model` for inference (svf-eval, validation, svf-predict): eval
/// mode, no autograd, under the config's `amp`, returned in float32 for the metrics.
pub fn inference_logits(
    model: &PfeNet,
    config: &Config,
    query: &Tensor,
    supports: &Tensor,
    support_labels: &Tensor,
) -> Tensor {
    tch::no_grad(|| {
        amp::autocast(config, query.device(), || {
            model.forward(query, supports, support_labels, false)
        })
        .logits
        .to_kind(Kind::Float)
    })
}

/// Panels of the batch's episodes whose index is below `count`: the first support with its mask,
/// the query with its ground truth, the query with the prediction; the episode's foreground IoU
/// (at the evaluation's resolution) in the title.
fn write_panels(
    dir: &Path,
    count: usize,
    batch: &EpisodeBatch,
    logits: &Tensor,
    ori_resize: bool,
) -> Result<(), EvalError> {
    for (e, &index) in batch.episode_indices.iter().enumerate() {
        if index >= count as u64 {
            continue;
        }
        let class = batch.class_ids[e];
        let episode_logits = logits.get(e as i64);
        let mut one = IoUAccumulator::new(&[class]);
        if ori_resize {
            let (pred, target) = original_resolution(&episode_logits, &batch.original_labels[e]);
            one.add(&pred, &target, class);
        } else {
            one.add(
                &episode_logits.argmax(0, false),
                // The label on the prediction's device (GPU-NOTES 1).
                &batch
                    .query_label
                    .get(e as i64)
                    .to_device(episode_logits.device()),
                class,
            );
        }
        let query = predict::denormalise(&batch.query_image.get(e as i64));
        let support_images = batch.support_images.get(e as i64);
        let support_labels = batch.support_labels.get(e as i64);
        let support = predict::denormalise(&support_images.get(0));
        let colour = predict::MASK_COLOUR;
        let tiles = [
            (
                "SUPPORT",
                predict::overlay(
                    &support,
                    &predict::mask_image(&support_labels.get(0)),
                    colour,
                ),
            ),
            (
                "GROUND TRUTH",
                predict::overlay(
                    &query,
                    &predict::mask_image(&batch.query_label.get(e as i64)),
                    colour,
                ),
            ),
            (
                "PREDICTION",
                predict::overlay(
                    &query,
                    &predict::mask_image(&episode_logits.argmax(0, false)),
                    colour,
                ),
            ),
        ];
        let tiles: Vec<(&str, &image::RgbImage)> = tiles.iter().map(|(c, t)| (*c, t)).collect();
        let title = format!(
            "EPISODE {index} CLASS {class} IOU {:.1}%",
            100.0 * one.miou()
        );
        std::fs::create_dir_all(dir).map_err(|source| EvalError::Write {
            path: dir.to_path_buf(),
            source,
        })?;
        predict::write_png(
            &dir.join(format!("episode_{index:05}.png")),
            &report::qualitative_panel(&title, &tiles),
        )?;
    }
    Ok(())
}

/// The weights file `--weights` names: a file as is; a run directory's `best` checkpoint, else its
/// `last`.
pub fn resolve_weights(path: &Path) -> Result<PathBuf, EvalError> {
    if !path.is_dir() {
        return Ok(path.to_path_buf());
    }
    let best = CheckpointFiles::new(path, checkpoint::BEST).weights;
    let last = CheckpointFiles::new(path, checkpoint::LAST).weights;
    if best.is_file() {
        Ok(best)
    } else if last.is_file() {
        Ok(last)
    } else {
        Err(EvalError::NoWeights {
            dir: path.to_path_buf(),
            best,
            last,
        })
    }
}

/// A model for inference with the weights of `weights` (a checkpoint or any state dict of the
/// config's model, strictly matched). With `fuse` and an SVF config, the model is [`fuse`]d.
pub fn load_model(
    config: &Config,
    weights: &Path,
    device: Device,
    fuse: bool,
) -> Result<(nn::VarStore, PfeNet), EvalError> {
    let vs = nn::VarStore::new(device);
    let model = PfeNet::with_backbone_init(&vs.root(), config, Init::Zeros)?;
    checkpoint::load_weights(&vs, weights)?;
    if fuse && config.svf {
        Ok(self::fuse(&vs, config)?)
    } else {
        Ok((vs, model))
    }
}

/// The SVF model held in `vs` with its SVD convolutions folded back into full-rank weights
/// (`svf::recompose`), built full-rank on the same device: the same function, one convolution
/// per layer instead of two, for inference.
pub fn fuse(vs: &nn::VarStore, config: &Config) -> Result<(nn::VarStore, PfeNet), ModelError> {
    let full: Vec<(String, Tensor)> = crate::svf::recompose(&vs.variables()).into_iter().collect();
    let full_config = Config {
        svf: false,
        ..config.clone()
    };
    let fused_vs = nn::VarStore::new(vs.device());
    let fused = PfeNet::with_backbone_init(&fused_vs.root(), &full_config, Init::Zeros)?;
    checkpoint::copy_into(&fused_vs, &full, Path::new("the recomposed model"))
        .expect("recomposing an SVF model gives exactly the full-rank model's variables");
    Ok((fused_vs, fused))
}

/// Prediction and target at the original label resolution, as PFENet/BAM's `ori_resize` compares
/// them: the binarised original label `[h,w]` is padded to a square of its longer side with 255
/// (bottom and right, where the validation canvas was padded), the logits `[2,S,S]` of the whole
/// canvas are bilinearly resized (align_corners = true) to that square, and argmax gives the
/// prediction. Returns `(prediction, target)`, both `[L,L]` i64 on the logits' device.
pub fn original_resolution(logits: &Tensor, original_label: &Tensor) -> (Tensor, Tensor) {
    let (h, w) = original_label.size2().expect("the original label is [h,w]");
    let side = h.max(w);
    let device = logits.device();
    let target = Tensor::full([side, side], i64::from(IGNORE_LABEL), (Kind::Int64, device));
    target
        .narrow(0, 0, h)
        .narrow(1, 0, w)
        .copy_(&original_label.to_device_(device, original_label.kind(), true, false));
    let prediction = logits
        .unsqueeze(0)
        .upsample_bilinear2d([side, side], true, None, None)
        .argmax(1, false)
        .squeeze_dim(0);
    (prediction, target)
}

/// Seeds of BAM's protocol: `count` distinct seeds in 0..1000 drawn from `master` (BAM: 5 from
/// 123). The draw is the episodes' generator's, not numpy's, so the values differ from BAM's
/// ([`PAPER_SEEDS`] are BAM's own); what matters is that they are fixed.
pub fn draw_seeds(master: u64, count: usize) -> Vec<u64> {
    /// Stream tag of the seed draw, apart from the episodes' streams.
    const SEED_STREAM: u64 = 0x5EED;
    let mut rng = EpisodeRng::new(master, SEED_STREAM, 0);
    let mut seeds = Vec::with_capacity(count);
    while seeds.len() < count.min(1000) {
        let seed = rng.below(1000) as u64;
        if !seeds.contains(&seed) {
            seeds.push(seed);
        }
    }
    seeds
}

/// What was evaluated: enough to place the result in a paper table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalSetting {
    /// `PASCAL-5i` or `COCO-20i`.
    pub dataset: String,
    pub fold: usize,
    pub shot: usize,
    /// `PFENet` or `PFENet+SVF`; `PFENet†`, `PFENet†+SVF` when trained on BAM's lists
    /// (`train_filter: bam`), as the paper names those rows.
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
            "PFENet{}{}",
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
    ) -> Result<EvalResult, EvalError> {
        let first = seeds.first().ok_or(EvalError::NoSeeds)?;
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

    /// Writes `eval.json` and `eval.md` into `dir` (created if needed).
    pub fn write(&self, dir: &Path) -> Result<(), EvalError> {
        let write = |path: PathBuf, text: String| {
            std::fs::create_dir_all(dir)
                .and_then(|()| std::fs::write(&path, text))
                .map_err(|source| EvalError::Write { path, source })
        };
        let json = serde_json::to_string_pretty(self).expect("an EvalResult always serialises");
        write(dir.join("eval.json"), json + "\n")?;
        write(dir.join("eval.md"), self.to_markdown())
    }

    /// Reads an `eval.json`.
    pub fn read(path: &Path) -> Result<EvalResult, EvalError> {
        let text = std::fs::read_to_string(path).map_err(|source| EvalError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| EvalError::Parse {
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

    #[test]
    fn perfect_prediction_scores_one_on_non_square_images() {
        // A 5x3 and a 2x7 original label; the network saw a 9x9 canvas with the image at the
        // top-left, scaled so that its longer side fills the canvas.
        let mut acc = IoUAccumulator::new(&[1, 2]);
        for (class, (h, w)) in [(1usize, (5i64, 3i64)), (2, (2, 7))] {
            let label = Tensor::zeros([h, w], (Kind::Int64, Device::Cpu));
            let _ = label.narrow(0, 0, h - 1).narrow(1, 1, w - 1).fill_(1);
            let _ = label.get(0).get(0).fill_(255);
            // Logits of a perfect network: the padded label upsampled to a canvas whose grid holds
            // the square's grid points exactly (side - 1 divides canvas - 1), so resizing back
            // recovers it.
            let side = h.max(w);
            let square = Tensor::zeros([side, side], (Kind::Int64, Device::Cpu));
            square
                .narrow(0, 0, h)
                .narrow(1, 0, w)
                .copy_(&label.clamp_max(1));
            let canvas = 4 * (side - 1) + 1;
            let fg = square
                .to_kind(Kind::Float)
                .view([1, 1, side, side])
                .upsample_bilinear2d([canvas, canvas], true, None, None)
                .squeeze_dim(0);
            let logits = Tensor::cat(&[-(&fg - 0.5), fg - 0.5], 0);
            assert_eq!(logits.size(), vec![2, canvas, canvas]);
            let (pred, target) = original_resolution(&logits, &label);
            assert_eq!(target.size(), vec![side, side]);
            assert_eq!(
                i64::try_from(target.eq(255).sum(Kind::Int64)).unwrap(),
                side * side - h * w + 1,
                "padding and the one ignored pixel are 255"
            );
            acc.add(&pred, &target, class);
        }
        assert!((acc.miou() - 1.0).abs() < 1e-9, "{}", acc.miou());
        assert!((acc.fb_iou() - 1.0).abs() < 1e-9, "{}", acc.fb_iou());
    }

    #[test]
    fn logits_are_resized_with_aligned_corners() {
        // Foreground scores 0 | 1 across a 2x2 canvas, resized to 4x4: aligned corners sample at
        // 0, 1/3, 2/3, 1 (half-pixel centres would give 0, 1/4, 3/4, 1), so a background score of
        // 0.3 leaves only the first column as background.
        let fg = Tensor::from_slice(&[0.0f32, 1.0, 0.0, 1.0]).view([1, 2, 2]);
        let logits = Tensor::cat(&[fg.full_like(0.3), fg], 0);
        let label = Tensor::zeros([4, 3], (Kind::Int64, Device::Cpu));
        let (pred, target) = original_resolution(&logits, &label);
        let pred = Vec::<Vec<i64>>::try_from(&pred).unwrap();
        assert_eq!(pred, vec![vec![0, 1, 1, 1]; 4]);
        let target = Vec::<Vec<i64>>::try_from(&target).unwrap();
        assert_eq!(target, vec![vec![0, 0, 0, 255]; 4]);
    }

    #[test]
    fn seeds_are_fixed_distinct_and_below_1000() {
        let seeds = draw_seeds(123, 5);
        assert_eq!(seeds, draw_seeds(123, 5));
        assert_ne!(seeds, draw_seeds(124, 5));
        assert!(seeds.iter().all(|&s| s < 1000));
        let mut unique = seeds.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), 5);
    }

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
            Err(EvalError::NoSeeds)
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
}
