//! The evaluation protocol: fixed-seed episodes, original-resolution comparison, result tables.
//!
//! Follows PFENet's and BAM's `test.py` (REFERENCE §6): the episodes of a seed are a pure function of
//! (seed, index), so every run sees the same ones; each prediction is compared with the episode's
//! label at its original size; BAM's protocol repeats this for several seeds and reports the mean.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tch::{Device, Tensor};

use crate::amp;
use crate::config::Config;
use crate::data::rng::EpisodeRng;
use crate::data::{DataError, EpisodeBatch, EpisodeLoader, FewShotDataset, Split};
use crate::inference::{inference_logits, original_resolution};
use crate::metrics::IoUAccumulator;
use crate::model::FewShotModel;
use crate::results::{EvalResult, EvalSetting, ResultError, SeedResult};
use crate::visual::{self, VisualError};

/// Why an evaluation could not run or its results could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("cannot write {path}: {source}; check that the output directory is writable")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Result(#[from] ResultError),
    #[error(transparent)]
    Panel(#[from] VisualError),
    /// The caller's stop flag was raised (Ctrl-C during training's validation).
    #[error("evaluation stopped before its end")]
    Stopped,
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
    model: &FewShotModel,
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
    evaluate_on(model, &dataset, &config, device, options, None)
}

/// [`evaluate`] on a dataset already opened (training validates every epoch on the same one).
/// Raising `stop` ends it at the next batch with [`EvalError::Stopped`], so that Ctrl-C need not
/// wait for a validation of minutes.
/// `dataset` must be the validation split with `options.shot` supports.
pub fn evaluate_on(
    model: &FewShotModel,
    dataset: &Arc<FewShotDataset>,
    config: &Config,
    device: Device,
    options: &EvalOptions,
    stop: Option<&AtomicBool>,
) -> Result<EvalResult, EvalError> {
    if options.seeds.is_empty() {
        return Err(ResultError::NoSeeds.into());
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
            if stop.is_some_and(|s| s.load(Ordering::SeqCst)) {
                bar.abandon();
                return Err(EvalError::Stopped);
            }
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
    Ok(EvalResult::from_seeds(
        setting,
        seeds,
        evaluated as f64 / start.elapsed().as_secs_f64().max(1e-9),
    )?)
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
        let query = visual::denormalise(&batch.query_image.get(e as i64));
        let support_images = batch.support_images.get(e as i64);
        let support_labels = batch.support_labels.get(e as i64);
        let support = visual::denormalise(&support_images.get(0));
        let colour = visual::MASK_COLOUR;
        let tiles = [
            (
                "SUPPORT",
                visual::overlay(
                    &support,
                    &visual::mask_image(&support_labels.get(0)),
                    colour,
                ),
            ),
            (
                "GROUND TRUTH",
                visual::overlay(
                    &query,
                    &visual::mask_image(&batch.query_label.get(e as i64)),
                    colour,
                ),
            ),
            (
                "PREDICTION",
                visual::overlay(
                    &query,
                    &visual::mask_image(&episode_logits.argmax(0, false)),
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
        visual::write_rgb_png(
            &dir.join(format!("episode_{index:05}.png")),
            &visual::qualitative_panel(&title, &tiles),
        )?;
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
