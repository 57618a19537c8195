//! BAM's second stage (the meta learner, `train.py`; BAM+SVF: the SVF authors' `train_BAM.py`):
//! the base learner of the first stage ([`super::base`]) loaded, checked against the config's
//! dataset and fold, frozen; with `svf` its backbone decomposed into the meta branch's copy whose
//! layer2..4 `vector_S` train at `backbone_lr_scale`, the meta modules at `head_lr_scale`.
//!
//! Not yet wired to `svf-train`/`svf-eval` (`method: bam` in the config): [`train_meta`] and
//! [`novel_miou`] are the library entry points, used by the synthetic end-to-end test. Without
//! resume, validation during training or the metrics log of episodic training.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tch::{nn, Device, Kind, Tensor};

use crate::backbone::Init;
use crate::checkpoint;
use crate::config::Config;
use crate::data::segmentation::BaseClassMap;
use crate::data::{EpisodeLoader, FewShotDataset, Split};
use crate::metrics::IoUAccumulator;
use crate::model::bam::{self, Bam, BASE_LEARNER};

use super::base::BaseLearnerMeta;
use super::{LrSchedule, Sgd, TrainError};

/// Checkpoint name of the meta stage's last state.
pub const BAM_LAST: &str = "bam_last";

/// Builds BAM on `device` with the base learner of checkpoint `name` in `dir` (a base stage's run
/// directory): its metadata must match `config`'s dataset and fold, else one error naming the
/// checkpoint and the mismatch. With `svf`, the meta copy is decomposed from it. Every variable
/// but the meta stage's trainable ones is frozen.
pub fn load_meta_model(
    config: &Config,
    dir: &Path,
    name: &str,
    device: Device,
) -> Result<(nn::VarStore, Bam), TrainError> {
    let saved = checkpoint::load::<BaseLearnerMeta>(dir, name)?;
    let path = dir.join(name);
    saved
        .state
        .check_against(config, &path)
        .map_err(|detail| TrainError::BaseLearner {
            path: path.clone(),
            detail,
        })?;
    let vs = nn::VarStore::new(device);
    let model = Bam::new(&vs.root(), config, Init::Zeros)?;
    // The meta modules start as PyTorch's defaults would (Init::Zeros only spares the backbones).
    let prefixed: Vec<(String, Tensor)> = saved
        .weights
        .into_iter()
        .map(|(n, t)| (format!("{BASE_LEARNER}.{n}"), t))
        .collect();
    let variables = vs.variables();
    let missing: Vec<&String> = variables
        .keys()
        .filter(|n| n.starts_with(&format!("{BASE_LEARNER}.")))
        .filter(|n| !prefixed.iter().any(|(p, _)| p == *n))
        .collect();
    if let Some(first) = missing.first() {
        return Err(TrainError::BaseLearner {
            path,
            detail: format!(
                "{} base learner variable(s) missing, e.g. `{first}`; check `layers`, `vgg` and `backbone_width`",
                missing.len()
            ),
        });
    }
    tch::no_grad(|| -> Result<(), TrainError> {
        for (name, tensor) in &prefixed {
            let Some(var) = variables.get(name) else {
                return Err(TrainError::BaseLearner {
                    path: path.clone(),
                    detail: format!("`{name}` is not a base learner variable of this config"),
                });
            };
            var.shallow_clone()
                .f_copy_(&tensor.to_device(device))
                .map_err(|e| TrainError::BaseLearner {
                    path: path.clone(),
                    detail: format!("`{name}`: {e}"),
                })?;
        }
        Ok(())
    })?;
    model.decompose_base_into_meta(&vs, config);
    bam::freeze_all_but_trainable(&vs, config.svf);
    Ok((vs, model))
}

/// The base learner's channel of each episode class (1-based among the base classes): BAM leaves
/// it out of the base evidence in training.
fn exclude_channels(map: &BaseClassMap, class_ids: &[usize]) -> Tensor {
    let channels: Vec<i64> = class_ids
        .iter()
        .map(|&c| {
            map.channel(c)
                .unwrap_or_else(|| panic!("training class {c} is a base class")) as i64
        })
        .collect();
    Tensor::from_slice(&channels)
}

/// How a meta-stage run ended.
#[derive(Debug)]
pub struct MetaSummary {
    pub iterations: u64,
    pub last_loss: f64,
    pub dir: PathBuf,
}

/// Trains BAM's meta stage of `config` with the base learner `base_name` of `base_dir`, writing
/// `config.yaml` and the [`BAM_LAST`] checkpoint (after every epoch) into `config.save_path`.
pub fn train_meta(
    config: &Config,
    base_dir: &Path,
    base_name: &str,
    device: Device,
) -> Result<MetaSummary, TrainError> {
    let dir = config.save_path.clone();
    std::fs::create_dir_all(&dir).map_err(super::run_dir_error(&dir))?;
    if checkpoint::exists(&dir, BAM_LAST)? {
        return Err(TrainError::RunExists { dir });
    }
    let dataset = Arc::new(FewShotDataset::open(config, Split::Train)?);
    let per_epoch = (dataset.episodes_per_epoch() / config.batch_size) as u64;
    if per_epoch == 0 {
        return Err(TrainError::EpochTooShort {
            episodes: dataset.episodes_per_epoch(),
            batch_size: config.batch_size,
        });
    }
    let path = dir.join(super::CONFIG_FILE);
    std::fs::write(&path, config.to_yaml()).map_err(super::run_dir_error(&path))?;
    tch::manual_seed(config.manual_seed as i64);
    let (vs, model) = load_meta_model(config, base_dir, base_name, device)?;
    let parameters = bam::freeze_all_but_trainable(&vs, config.svf)
        .into_iter()
        .map(|(name, tensor)| {
            let scale = if name.contains("vector_S") {
                config.backbone_lr_scale
            } else {
                config.head_lr_scale
            };
            (name, tensor, scale)
        })
        .collect();
    let mut sgd = Sgd::new(parameters, config.momentum, config.weight_decay);
    let schedule = LrSchedule::from_config(config, per_epoch);
    let map = BaseClassMap::of(config);
    let (mut iteration, mut last_loss) = (0u64, f64::NAN);
    let episodes = dataset.episodes_per_epoch() as u64;
    for epoch in 0..config.epochs as u64 {
        let loader = EpisodeLoader::new(
            dataset.clone(),
            config.manual_seed,
            epoch * episodes..epoch * episodes + per_epoch * config.batch_size as u64,
            config.batch_size,
            config.workers,
        );
        for batch in loader {
            let batch = batch?;
            iteration += 1;
            let exclude = exclude_channels(&map, &batch.class_ids).to_device(device);
            let out = model.forward(
                &batch.query_image.to_device(device),
                &batch.support_images.to_device(device),
                &batch.support_labels.to_device(device),
                Some(&exclude),
                true,
            );
            let loss = model.loss(&out, &batch.query_label.to_device(device));
            sgd.zero_grad();
            loss.backward();
            sgd.step(schedule.lr(iteration));
            last_loss = loss.double_value(&[]);
            if iteration % config.print_freq as u64 == 0 {
                tracing::info!(
                    "meta stage epoch {} iteration {iteration}: loss {last_loss:.4}",
                    epoch + 1
                );
            }
        }
        checkpoint::save(
            &dir,
            BAM_LAST,
            &crate::model::model_weights(&vs),
            None,
            &serde_json::json!({ "iteration": iteration, "epoch": epoch + 1 }),
        )?;
    }
    Ok(MetaSummary {
        iterations: iteration,
        last_loss,
        dir,
    })
}

/// Novel-class mIoU of `model` over `episodes` validation episodes drawn with `seed`, scored at
/// the validation canvas (ignoring 255).
pub fn novel_miou(
    model: &Bam,
    config: &Config,
    episodes: u64,
    seed: u64,
    device: Device,
) -> Result<f64, TrainError> {
    let dataset = Arc::new(FewShotDataset::open(config, Split::Val)?);
    let mut iou = IoUAccumulator::new(dataset.classes());
    let loader = EpisodeLoader::new(
        dataset.clone(),
        seed,
        0..episodes,
        config.batch_size_val,
        config.workers,
    );
    for batch in loader {
        let batch = batch?;
        let logits = tch::no_grad(|| {
            model
                .forward(
                    &batch.query_image.to_device(device),
                    &batch.support_images.to_device(device),
                    &batch.support_labels.to_device(device),
                    None,
                    false,
                )
                .logits
        });
        iou.add_episodes(
            &logits.argmax(1, false).to_kind(Kind::Int64),
            &batch.query_label.to_device(device),
            &batch.class_ids,
        );
    }
    Ok(iou.miou())
}
