//! BAM's first stage (`train_base.py`): the PSPNet base learner trained by ordinary supervised
//! segmentation on whole training images, labels mapped to the fold's base classes
//! ([`crate::data::segmentation`]), as a [`TrainingTask`] of the common run (same run directory,
//! checkpoints `last`/`best`, resume, progress, metrics, validation and stopping as episodic
//! training). BatchNorm trains in this stage, as in BAM; the backbone at `backbone_lr_scale`,
//! `ppm` and `cls` at `head_lr_scale` (BAM's `index_split: 0`: 10×). Validation: mIoU over the
//! base classes (background excluded).
//!
//! The checkpoints' state records the dataset, fold and base classes ([`BaseLearnerMeta`]); BAM's
//! meta stage checks them when it loads the base learner ([`load_base_learner`]).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};

use crate::amp;
use crate::backbone::{self, Init};
use crate::checkpoint::{self, CheckpointFiles};
use crate::config::{Config, DilationPattern};
use crate::data::rng::EpisodeRng;
use crate::data::segmentation::{BaseClassMap, SegmentationBatch, SegmentationDataset};
use crate::data::{DataError, Split};
use crate::metrics::IoUAccumulator;
use crate::model::bam::{without_encoder_aliases, Bam, BASE_LEARNER};
use crate::model::pspnet::PspNet;
use crate::model::ModelError;

use super::{optimise, upload, with_lr_scales, Losses, Sgd, TrainError, TrainState, TrainingTask};

/// RNG stream of the per-epoch image order.
const ORDER_STREAM: u64 = 0xBA5E_0001;

/// What a base learner checkpoint says it was trained for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BaseLearnerMeta {
    /// `pascal` or `coco`.
    pub dataset: String,
    pub use_split_coco: bool,
    pub fold: usize,
    /// The fold's base classes (dataset ids) in channel order (channel i + 1).
    pub base_classes: Vec<usize>,
    /// The backbone's dilation: BAM+SVF's copy and BAM's meta features run the base learner's
    /// layers, which only give its features with its dilation. (Absent in checkpoints written
    /// before it was recorded: PFENet's, the only pattern then.)
    #[serde(default)]
    pub dilation: DilationPattern,
    /// The backbone, as results name it (`ResNet-18 x0.25`, `VGG-16`): the meta stage builds its
    /// base learner from its own config's `layers`, `vgg` and `backbone_width`. (Absent in
    /// checkpoints written before it was recorded: [`load_base_learner`] then compares the
    /// weights' shapes.)
    #[serde(default)]
    pub backbone: Option<String>,
}

impl BaseLearnerMeta {
    /// The base learner `config` trains.
    pub fn of(config: &Config) -> BaseLearnerMeta {
        BaseLearnerMeta {
            dataset: dataset_name(config).into(),
            use_split_coco: config.use_split_coco,
            fold: config.split,
            base_classes: BaseClassMap::of(config).base,
            dilation: config.dilation,
            backbone: Some(backbone_name(config)),
        }
    }

    /// `Err(message)` naming `path` and every difference when this base learner was trained for
    /// another dataset, COCO split scheme or fold than `config`'s.
    pub fn check_against(&self, config: &Config) -> Result<(), String> {
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
        // VGG-16 has no dilated stages.
        if self.dilation != want.dilation && !config.vgg {
            // The YAML words: `pfenet`, `torchvision`.
            let word = |d: DilationPattern| format!("{d:?}").to_lowercase();
            differences.push(format!(
                "dilation {} (the config: {})",
                word(self.dilation),
                word(want.dilation)
            ));
        }
        if let (Some(have), Some(want)) = (&self.backbone, &want.backbone) {
            if have != want {
                differences.push(format!("backbone {have} (the config: {want})"));
            }
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
        Err(format!("it was trained for {}", differences.join(", ")))
    }
}

/// `config`'s backbone as results name it.
fn backbone_name(config: &Config) -> String {
    crate::results::EvalSetting::new(config, config.shot, 0, false).backbone
}

/// A line for a base learner whose backbone tensors do not match the ones `config` builds in `vs`
/// (names or shapes), to put before the list of missing or mismatched names: a base learner of
/// another depth, VGG or width, whose record (if any) predates the backbone's.
fn backbone_mismatch_hint(
    vs: &nn::VarStore,
    weights: &[(String, Tensor)],
    config: &Config,
) -> Option<String> {
    let prefix = format!("{BASE_LEARNER}.");
    let ours: std::collections::HashMap<String, Vec<i64>> = vs
        .variables()
        .into_iter()
        .filter_map(|(name, t)| {
            let name = name.strip_prefix(&prefix)?;
            (name.starts_with("layer") && name.ends_with(".weight"))
                .then(|| (name.to_string(), t.size()))
        })
        .collect();
    let theirs: std::collections::HashMap<&str, Vec<i64>> = weights
        .iter()
        .filter(|(name, _)| name.starts_with("layer") && name.ends_with(".weight"))
        .map(|(name, t)| (name.as_str(), t.size()))
        .collect();
    let same = ours.len() == theirs.len()
        && ours
            .iter()
            .all(|(name, shape)| theirs.get(name.as_str()) == Some(shape));
    (!same).then(|| {
        format!(
            "its backbone differs from the config's {} (`layers: {}`, `vgg: {}`, `backbone_width: {}`)",
            backbone_name(config),
            config.layers,
            config.vgg,
            config.backbone_width
        )
    })
}

fn dataset_name(config: &Config) -> &'static str {
    if config.use_coco {
        "coco"
    } else {
        "pascal"
    }
}

/// Validation `(mIoU over the base classes, FB-IoU)` of `model` on `data` (batches of
/// `batch_size`). Each base class is scored as a binary map, so FB-IoU is the mean of the
/// background and foreground IoU over those maps. `None` when `stop` was raised before the end.
pub fn base_miou(
    model: &PspNet,
    data: &SegmentationDataset,
    batch_size: usize,
    workers: usize,
    device: Device,
    stop: Option<&AtomicBool>,
) -> Result<Option<(f64, f64)>, DataError> {
    let map = data.class_map();
    let mut iou = IoUAccumulator::new(&map.base);
    let indices: Vec<usize> = (0..data.len()).collect();
    for chunk in indices.chunks(batch_size) {
        if stop.is_some_and(|s| s.load(Ordering::SeqCst)) {
            return Ok(None);
        }
        let batch = data.batch(chunk, 0, 0, workers)?;
        let labels = batch.labels.to_device(device);
        let pred = predict(model, &batch.images.to_device(device));
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
    Ok(Some((iou.miou(), iou.fb_iou())))
}

/// The base learner's prediction for `images` `[B, 3, H, W]`, as validation computes it: eval
/// mode, no autograd, the argmax over its classes `[B, H, W]`.
pub fn predict(model: &PspNet, images: &Tensor) -> Tensor {
    tch::no_grad(|| model.forward(images, false)).argmax(1, false)
}

/// The base learner `config`'s base stage trains, in `vs`: PSPNet with a channel per base class
/// of the fold (and background), full rank.
pub fn base_learner(vs: &nn::VarStore, config: &Config, init: Init) -> Result<PspNet, ModelError> {
    let full_rank = Config {
        svf: false,
        ..config.clone()
    };
    let classes = BaseClassMap::of(config).classes() as i64;
    PspNet::new(&vs.root(), &full_rank, classes, init)
}

/// The parameters the base stage trains, with their LR scale: every one (BatchNorm statistics
/// aside).
fn trainable_parameters(vs: &nn::VarStore, config: &Config) -> Vec<(String, Tensor, f64)> {
    let parameters = crate::model::freeze_all_but(vs, |name| {
        !["running_mean", "running_var", "num_batches_tracked"]
            .iter()
            .any(|b| name.ends_with(b))
    });
    with_lr_scales(parameters, config)
}

/// The base stage's optimiser over [`base_learner`]'s parameters in `vs` (which it unfreezes), as
/// `svf-train` builds it.
pub fn optimiser(vs: &nn::VarStore, config: &Config) -> Sgd {
    super::optimiser_over(trainable_parameters(vs, config), config)
}

/// One iteration of the base stage, as `svf-train` runs it and `svf-bench` times it: a batch of
/// whole images `[B, 3, H, W]` and their base-class labels `[B, H, W]` copied to `device`,
/// forward in train mode (BatchNorm included) under [`amp::autocast`], PSPNet's loss (then
/// `map_loss`), backward, and the optimiser step at `lr` when the loss is finite.
#[allow(clippy::too_many_arguments)]
pub fn train_step(
    net: &PspNet,
    sgd: &mut Sgd,
    config: &Config,
    device: Device,
    images: &Tensor,
    labels: &Tensor,
    lr: f64,
    map_loss: Option<impl FnOnce(Tensor) -> Tensor>,
) -> Losses {
    let labels = upload(labels, device);
    let loss = amp::autocast(config, device, || {
        let logits = net.forward(&upload(images, device), true);
        PspNet::loss(&logits, &labels)
    });
    let no_aux = loss.zeros_like();
    optimise(sgd, loss, no_aux, 0.0, lr, map_loss)
}

/// BAM's base stage: the PSPNet base learner on whole images.
pub(super) struct BaseTask<'a> {
    config: &'a Config,
    device: Device,
    vs: nn::VarStore,
    net: PspNet,
    train: Arc<SegmentationDataset>,
    val: Option<SegmentationDataset>,
}

impl<'a> BaseTask<'a> {
    /// The base learner of `config` (its backbone from `backbone_weights`; a resumed run loads its
    /// checkpoint over it) and the fold's data.
    pub(super) fn open(config: &'a Config, device: Device) -> Result<Self, TrainError> {
        let train = Arc::new(SegmentationDataset::open(config, Split::Train)?);
        let val = match config.val_freq {
            0 => None,
            _ => Some(SegmentationDataset::open(config, Split::Val)?),
        };
        tch::manual_seed(config.manual_seed as i64);
        let vs = nn::VarStore::new(device);
        let init = if config.backbone_weights.is_some() {
            Init::Zeros
        } else {
            Init::Random
        };
        let net = base_learner(&vs, config, init)?;
        if let Some(path) = &config.backbone_weights {
            let full_rank = Config {
                svf: false,
                ..config.clone()
            };
            let report = backbone::load_pretrained(&vs, path, &full_rank)?;
            tracing::info!("backbone weights from {}: {report}", path.display());
        }
        Ok(BaseTask {
            config,
            device,
            vs,
            net,
            train,
            val,
        })
    }
}

impl TrainingTask for BaseTask<'_> {
    type Batch = SegmentationBatch;
    const ITEMS: &'static str = "images";

    fn items_per_epoch(&self) -> usize {
        self.train.len()
    }

    fn vs(&self) -> &nn::VarStore {
        &self.vs
    }

    /// Every parameter (BatchNorm statistics aside).
    fn trainable(&self) -> Vec<(String, Tensor, f64)> {
        trainable_parameters(&self.vs, self.config)
    }

    /// Epoch `epoch` shows every image once in a seeded order; image `j` of the epoch gets the
    /// augmentation draw `epoch · len + j`, so a resumed run sees the same crops.
    fn batches(
        &self,
        epoch: usize,
        items: std::ops::Range<u64>,
    ) -> Box<dyn Iterator<Item = Result<SegmentationBatch, DataError>>> {
        let (data, config) = (self.train.clone(), self.config);
        let (seed, batch, workers) = (config.manual_seed, config.batch_size, config.workers);
        let order = shuffled(data.len(), seed, epoch as u64);
        let epoch_start = (epoch * data.len()) as u64;
        let starts = (items.start..items.end).step_by(batch);
        Box::new(starts.map(move |start| {
            let end = (start + batch as u64).min(items.end);
            let indices = &order[start as usize..end as usize];
            data.batch(indices, seed, epoch_start + start, workers)
        }))
    }

    fn step(
        &self,
        batch: &SegmentationBatch,
        sgd: &mut Sgd,
        lr: f64,
        map_loss: Option<&mut dyn FnMut(Tensor) -> Tensor>,
    ) -> Losses {
        train_step(
            &self.net,
            sgd,
            self.config,
            self.device,
            &batch.images,
            &batch.labels,
            lr,
            map_loss,
        )
    }

    fn validate(&self, stop: Option<&AtomicBool>) -> Result<Option<(f64, f64)>, TrainError> {
        let val = self
            .val
            .as_ref()
            .expect("validation is due only with val_freq > 0");
        Ok(base_miou(
            &self.net,
            val,
            self.config.batch_size_val,
            self.config.workers,
            self.device,
            stop,
        )?)
    }
}

/// Loads the base learner `path` names (a base stage's run directory: its `best` checkpoint, else
/// `last`; or a weights file) into BAM's base learner in `vs`. A checkpoint of ours must have been
/// trained for `config`'s dataset, COCO split scheme, fold and base classes; a file without our
/// state (BAM's released base learners) is taken with a warning, its classifier's size checked.
pub fn load_base_learner(
    vs: &nn::VarStore,
    config: &Config,
    path: &Path,
) -> Result<(), TrainError> {
    let weights_path =
        crate::inference::resolve_weights(path).map_err(|e| TrainError::BaseLearner {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
    let refused = |detail: String| TrainError::BaseLearner {
        path: weights_path.clone(),
        detail,
    };
    let state_path = weights_path.with_extension("json");
    let weights = if state_path.is_file() {
        let dir = weights_path.parent().unwrap_or(Path::new("."));
        let name = weights_path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let saved = checkpoint::load::<TrainState>(dir, &name)?;
        let meta = saved.state.base_learner.ok_or_else(|| {
            refused(format!(
                "{} is not a base stage's checkpoint (no base learner record)",
                CheckpointFiles::new(dir, &name).state.display()
            ))
        })?;
        meta.check_against(config).map_err(refused)?;
        saved.weights
    } else {
        // Read first: a missing or damaged file is an error, not a released base learner.
        let weights = checkpoint::read_tensors(&weights_path, "config key `base_learner`")?;
        tracing::warn!(
            "{} has no checkpoint state beside it (a released or converted base learner): its fold cannot be checked; make sure it was trained for fold {}",
            weights_path.display(),
            config.split
        );
        without_encoder_aliases(weights)
    };
    let hint = backbone_mismatch_hint(vs, &weights, config);
    Bam::load_base_learner(vs, weights, &weights_path).map_err(|e| {
        refused(match &hint {
            Some(hint) => format!("{hint}: {e}"),
            None => e.to_string(),
        })
    })?;
    tracing::info!("base learner from {}", weights_path.display());
    Ok(())
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
    fn meta_check_names_every_difference() {
        let config = Config::default();
        let meta = BaseLearnerMeta::of(&config);
        meta.check_against(&config).unwrap();
        let other = Config {
            use_coco: true,
            split: 2,
            ..Config::default()
        };
        let message = meta.check_against(&other).unwrap_err();
        assert!(
            message.contains("dataset pascal") && message.contains("fold 0"),
            "{message}"
        );
        // The dilation matters for ResNets, not for VGG-16.
        let torchvision = Config {
            dilation: DilationPattern::Torchvision,
            ..Config::default()
        };
        let message = meta.check_against(&torchvision).unwrap_err();
        assert!(
            message.contains("dilation pfenet (the config: torchvision)"),
            "{message}"
        );
        let vgg = |dilation| Config {
            vgg: true,
            dilation,
            ..Config::default()
        };
        BaseLearnerMeta::of(&vgg(DilationPattern::Pfenet))
            .check_against(&vgg(DilationPattern::Torchvision))
            .unwrap();
        // The backbone: depth, VGG, width.
        let deeper = Config {
            layers: 101,
            ..Config::default()
        };
        let message = meta.check_against(&deeper).unwrap_err();
        assert!(
            message.contains("backbone ResNet-50 (the config: ResNet-101)"),
            "{message}"
        );
        let older = BaseLearnerMeta {
            backbone: None,
            ..meta.clone()
        };
        older.check_against(&deeper).unwrap();
        // A record written before the dilation was kept reads as PFENet's.
        let old: BaseLearnerMeta = serde_json::from_str(
            r#"{"dataset":"pascal","use_split_coco":false,"fold":0,"base_classes":[6,7]}"#,
        )
        .unwrap();
        assert_eq!(old.dilation, DilationPattern::Pfenet);
    }

    /// A base learner without a backbone record (released, converted or older) of another depth
    /// is refused with a line saying so before the missing names.
    #[test]
    fn another_backbone_without_a_record_is_named_before_the_missing_weights() {
        let meta_config = |layers| Config {
            method: crate::config::Method::Bam,
            layers,
            backbone_width: 0.25,
            reduce_dim: 16,
            ppm_scales: vec![8, 4],
            backbone_weights: None,
            ..Config::default()
        };
        let dir = std::env::temp_dir().join(format!("svf-base-hint-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("resnet18.safetensors");
        let base = nn::VarStore::new(Device::Cpu);
        let classes = BaseClassMap::of(&meta_config(18)).classes() as i64;
        PspNet::new(&base.root(), &meta_config(18), classes, Init::Random).unwrap();
        Tensor::write_safetensors(&crate::model::model_weights(&base), &path).unwrap();

        let vs = nn::VarStore::new(Device::Cpu);
        let config = meta_config(34);
        crate::model::FewShotModel::new(&vs.root(), &config, Init::Random).unwrap();
        let message = load_base_learner(&vs, &config, &path)
            .unwrap_err()
            .to_string();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            message
                .contains("its backbone differs from the config's ResNet-34 x0.25 (`layers: 34`"),
            "{message}"
        );
        // The same depth loads.
        let vs = nn::VarStore::new(Device::Cpu);
        crate::model::FewShotModel::new(&vs.root(), &meta_config(18), Init::Random).unwrap();
        let base = nn::VarStore::new(Device::Cpu);
        PspNet::new(&base.root(), &meta_config(18), classes, Init::Random).unwrap();
        std::fs::create_dir_all(&dir).unwrap();
        Tensor::write_safetensors(&crate::model::model_weights(&base), &path).unwrap();
        let loaded = load_base_learner(&vs, &meta_config(18), &path);
        let _ = std::fs::remove_dir_all(&dir);
        loaded.unwrap();
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
