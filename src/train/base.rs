//! BAM's first stage (`train_base.py`): the PSPNet base learner trained by ordinary supervised
//! segmentation on whole training images, labels mapped to the fold's base classes
//! ([`crate::data::segmentation`]). BatchNorm trains in this stage, as in BAM; the backbone at the
//! base rate (`backbone_lr_scale`), `ppm` and `cls` at `head_lr_scale` (BAM's `index_split: 0`:
//! 10×). Validation: mIoU over the base classes (background excluded), every `val_freq` epochs.
//!
//! The run directory holds `config.yaml`, the checkpoints `base_last` and `base_best` whose
//! metadata ([`BaseLearnerMeta`]) records the dataset, fold and base classes: BAM's meta stage
//! checks them ([`BaseLearnerMeta::check_against`]).
//!
//! Not yet: resume, the progress bar and metrics log of episodic training (a run directory with a
//! `base_last` checkpoint is refused rather than overwritten).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};

use crate::backbone::{self, Init};
use crate::checkpoint;
use crate::config::Config;
use crate::data::rng::EpisodeRng;
use crate::data::segmentation::{BaseClassMap, SegmentationDataset};
use crate::data::Split;
use crate::metrics::IoUAccumulator;
use crate::model::pspnet::PspNet;

use super::{LrSchedule, Sgd, TrainError};

/// Checkpoint names of the base stage.
pub const BASE_LAST: &str = "base_last";
pub const BASE_BEST: &str = "base_best";
/// RNG stream of the per-epoch image order.
const ORDER_STREAM: u64 = 0xBA5E_0001;

/// What a base learner checkpoint says about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BaseLearnerMeta {
    /// `pascal` or `coco`.
    pub dataset: String,
    pub use_split_coco: bool,
    pub fold: usize,
    /// The fold's base classes (dataset ids) in channel order (channel i + 1).
    pub base_classes: Vec<usize>,
    pub iteration: u64,
    pub epoch: usize,
    /// Validation mIoU over the base classes at this checkpoint, if validated.
    pub val_miou: Option<f64>,
}

impl BaseLearnerMeta {
    fn of(config: &Config) -> BaseLearnerMeta {
        BaseLearnerMeta {
            dataset: dataset_name(config).into(),
            use_split_coco: config.use_split_coco,
            fold: config.split,
            base_classes: BaseClassMap::of(config).base,
            iteration: 0,
            epoch: 0,
            val_miou: None,
        }
    }

    /// `Err(message)` naming `path` and every difference when this base learner was trained for
    /// another dataset, COCO split scheme or fold than `config`'s.
    pub fn check_against(&self, config: &Config, path: &Path) -> Result<(), String> {
        let want = BaseLearnerMeta::of(config);
        let mut differences = Vec::new();
        if self.dataset != want.dataset {
            differences.push(format!(
                "dataset {} (the config: {})",
                self.dataset, want.dataset
            ));
        }
        if self.use_split_coco != want.use_split_coco && want.dataset == "coco" {
            differences.push(format!(
                "use_split_coco {} (the config: {})",
                self.use_split_coco, want.use_split_coco
            ));
        }
        if self.fold != want.fold {
            differences.push(format!(
                "fold {} (the config's split: {})",
                self.fold, want.fold
            ));
        }
        if differences.is_empty() && self.base_classes != want.base_classes {
            differences.push(format!(
                "base classes {:?} (the config's: {:?})",
                self.base_classes, want.base_classes
            ));
        }
        if differences.is_empty() {
            return Ok(());
        }
        Err(format!(
            "base learner {} was trained for {}; train the base stage for this fold (configs/bam/*_base.yaml) or point at the right checkpoint",
            path.display(),
            differences.join(", ")
        ))
    }
}

fn dataset_name(config: &Config) -> &'static str {
    if config.use_coco {
        "coco"
    } else {
        "pascal"
    }
}

/// How a base-stage run ended.
#[derive(Debug)]
pub struct BaseSummary {
    pub iterations: u64,
    pub last_loss: f64,
    /// The best validation mIoU over the base classes (when validated).
    pub best_miou: Option<f64>,
    pub dir: PathBuf,
}

/// Validation mIoU over the base classes of `model` on `data` (batches of `batch_size`).
pub fn base_miou(
    model: &PspNet,
    data: &SegmentationDataset,
    batch_size: usize,
    device: Device,
) -> Result<f64, TrainError> {
    let map = data.class_map();
    let mut iou = IoUAccumulator::new(&map.base);
    let indices: Vec<usize> = (0..data.len()).collect();
    for chunk in indices.chunks(batch_size) {
        let batch = data.batch(chunk, 0, 0)?;
        let labels = batch.labels.to_device(device);
        let pred =
            tch::no_grad(|| model.forward(&batch.images.to_device(device), false)).argmax(1, false);
        let ignored = labels.eq(255);
        for (i, &class) in map.base.iter().enumerate() {
            let channel = (i + 1) as i64;
            let binary_label = labels
                .eq(channel)
                .to_kind(Kind::Int64)
                .masked_fill(&ignored, 255);
            iou.add(&pred.eq(channel).to_kind(Kind::Int64), &binary_label, class);
        }
    }
    Ok(iou.miou())
}

/// Trains the base learner of `config` on `device` into `config.save_path`.
pub fn train_base(config: &Config, device: Device) -> Result<BaseSummary, TrainError> {
    let dir = config.save_path.clone();
    std::fs::create_dir_all(&dir).map_err(super::run_dir_error(&dir))?;
    if checkpoint::exists(&dir, BASE_LAST)? {
        return Err(TrainError::RunExists { dir });
    }
    let data = SegmentationDataset::open(config, Split::Train)?;
    let val = match config.val_freq {
        0 => None,
        _ => Some(SegmentationDataset::open(config, Split::Val)?),
    };
    let per_epoch = (data.len() / config.batch_size) as u64;
    if per_epoch == 0 {
        return Err(TrainError::EpochTooShort {
            episodes: data.len(),
            batch_size: config.batch_size,
        });
    }
    let path = dir.join(super::CONFIG_FILE);
    std::fs::write(&path, config.to_yaml()).map_err(super::run_dir_error(&path))?;

    tch::manual_seed(config.manual_seed as i64);
    let vs = nn::VarStore::new(device);
    let full_rank = Config {
        svf: false,
        ..config.clone()
    };
    let init = if config.backbone_weights.is_some() {
        Init::Zeros
    } else {
        Init::Random
    };
    let model = PspNet::new(
        &vs.root(),
        &full_rank,
        data.class_map().classes() as i64,
        init,
    )?;
    if let Some(path) = &config.backbone_weights {
        let report = backbone::load_pretrained(&vs, path, &full_rank)?;
        tracing::info!("backbone weights from {}: {report}", path.display());
    }
    let mut sgd = Sgd::new(
        trainable_parameters(&vs, config),
        config.momentum,
        config.weight_decay,
    );
    let schedule = LrSchedule::from_config(config, per_epoch);
    let mut meta = BaseLearnerMeta::of(config);
    let (mut iteration, mut last_loss, mut best) = (0u64, f64::NAN, None::<f64>);
    for epoch in 0..config.epochs {
        let order = shuffled(data.len(), config.manual_seed, epoch as u64);
        for step in 0..per_epoch as usize {
            let indices = &order[step * config.batch_size..(step + 1) * config.batch_size];
            let batch = data.batch(
                indices,
                config.manual_seed,
                iteration * config.batch_size as u64,
            )?;
            iteration += 1;
            let logits = model.forward(&batch.images.to_device(device), true);
            let loss = PspNet::loss(&logits, &batch.labels.to_device(device));
            sgd.zero_grad();
            loss.backward();
            sgd.step(schedule.lr(iteration));
            last_loss = loss.double_value(&[]);
            if iteration % config.print_freq as u64 == 0 {
                tracing::info!(
                    "base stage epoch {} iteration {iteration}: loss {last_loss:.4}",
                    epoch + 1
                );
            }
        }
        meta.iteration = iteration;
        meta.epoch = epoch + 1;
        meta.val_miou = None;
        if let Some(val) = &val {
            if (epoch + 1) % config.val_freq == 0 {
                let miou = base_miou(&model, val, config.batch_size_val, device)?;
                tracing::info!(
                    "base stage epoch {}: validation mIoU over the base classes {:.2}",
                    epoch + 1,
                    100.0 * miou
                );
                meta.val_miou = Some(miou);
                if best.is_none_or(|b| miou > b) {
                    best = Some(miou);
                    checkpoint::save(
                        &dir,
                        BASE_BEST,
                        &crate::model::model_weights(&vs),
                        None,
                        &meta,
                    )?;
                }
            }
        }
        checkpoint::save(
            &dir,
            BASE_LAST,
            &crate::model::model_weights(&vs),
            None,
            &meta,
        )?;
    }
    Ok(BaseSummary {
        iterations: iteration,
        last_loss,
        best_miou: best,
        dir,
    })
}

/// Every parameter (BatchNorm statistics aside) with its LR multiplier: the backbone's
/// `backbone_lr_scale`, `ppm` and `cls` `head_lr_scale`.
fn trainable_parameters(vs: &nn::VarStore, config: &Config) -> Vec<(String, Tensor, f64)> {
    crate::model::model_weights(vs)
        .into_iter()
        .filter(|(name, _)| {
            !["running_mean", "running_var", "num_batches_tracked"]
                .iter()
                .any(|b| name.ends_with(b))
        })
        .map(|(name, tensor)| {
            let scale = if name.starts_with("layer") {
                config.backbone_lr_scale
            } else {
                config.head_lr_scale
            };
            let tensor = tensor.set_requires_grad(true);
            (name, tensor, scale)
        })
        .collect()
}

/// A permutation of `0..len` for epoch `epoch` (Fisher–Yates on the run's seed).
fn shuffled(len: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut rng = EpisodeRng::new(seed, ORDER_STREAM, epoch);
    let mut order: Vec<usize> = (0..len).collect();
    for i in (1..len).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_check_names_file_and_every_difference() {
        let config = Config::default();
        let meta = BaseLearnerMeta::of(&config);
        meta.check_against(&config, Path::new("x")).unwrap();
        let other = Config {
            use_coco: true,
            split: 2,
            ..Config::default()
        };
        let message = meta
            .check_against(&other, Path::new("runs/b/base_best"))
            .unwrap_err();
        assert!(message.contains("runs/b/base_best"), "{message}");
        assert!(
            message.contains("dataset pascal") && message.contains("fold 0"),
            "{message}"
        );
    }

    #[test]
    fn shuffle_is_a_seeded_permutation() {
        let a = shuffled(10, 1, 0);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
        assert_eq!(a, shuffled(10, 1, 0));
        assert_ne!(a, shuffled(10, 1, 1));
    }
}
