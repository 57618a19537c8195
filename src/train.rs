//! Episodic training: optimiser, LR schedule, run directory, resume.
//!
//! A run directory (`save_path`) holds everything needed to continue or audit a run:
//! `config.yaml` (the resolved config), `log.txt`, `metrics.jsonl`, and the checkpoints `last` and
//! `best` (see [`crate::checkpoint`]: `NAME.safetensors` with the model's PyTorch `state_dict`
//! names, `NAME.json` with [`TrainState`], and for `last` also `last.optim.safetensors` with the
//! SGD momentum buffers named after their parameters).
//!
//! Exact resume. Episode `i` of the training split is a pure function of (seed, i); epoch `e`
//! covers episodes `e·E .. e·E + n·B` (E episodes per epoch, n = ⌊E/B⌋ iterations of batch B,
//! the reference's `drop_last`). Before every iteration the libtorch generator (dropout) is
//! re-seeded from (seed, iteration). So the iteration count, the weights and the momentum buffers
//! are the whole state: a resumed run repeats the same episodes, dropout masks and LRs, given the
//! same config: the checkpoints record it ([`ConfigRecord`]), and a resume whose config.yaml
//! changes more than [`RESUMABLE_KEYS`] (e.g. `epochs`, to extend the run) is refused.
//!
//! Validation and stopping. The model is validated before training and after every `val_freq`
//! epochs (with `val_half_epoch` also at the middle iteration of those epochs); the best mIoU over
//! all of them is the `best` checkpoint. `stop_interval` ends the run after that many epochs
//! without a new best; the count is part of [`TrainState`], so a resumed run continues it and a
//! run that stopped early stays stopped.

pub mod base;
mod metrics_log;
mod schedule;
mod sgd;

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tch::{nn, Device, Tensor};

pub use metrics_log::{read_metrics, write_curves, MetricsLog, MetricsRecord, CURVES_FILE};
pub use schedule::LrSchedule;
pub use sgd::{Sgd, SgdStateError};

use crate::amp;
use crate::backbone::{self, BackboneError, Init};
use crate::checkpoint::{self, CheckpointError, CheckpointFiles, BEST, LAST};
use crate::config::{
    Config, ConfigError, ConfigRecord, KeyChange, LrScheduleKind, Method, Stage, RESUMABLE_KEYS,
};
use crate::data::{DataError, EpisodeBatch, EpisodeLoader, FewShotDataset, Split};
use crate::dir_lock::{lock_dir, DirLock, DirLockError};
use crate::eval::{self, EvalError, EvalOptions};
use crate::model::{self, FewShotModel, ModelError};

use base::{BaseLearnerMeta, BaseTask};

/// The resolved configuration inside a run directory.
pub const CONFIG_FILE: &str = "config.yaml";
/// The file of a run directory that the svf-train training it holds locked (with its pid inside).
pub const LOCK_FILE: &str = "svf-train.lock";
/// Stream tag of the per-iteration libtorch seeds (the data's streams are 0, 1, ... and u64::MAX).
const STEP_SEED_STREAM: u64 = u64::MAX - 1;

/// Why training could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Backbone(#[from] BackboneError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Eval(#[from] EvalError),
    #[error("{0}; the checkpoint does not belong to this configuration")]
    OptimizerState(#[from] SgdStateError),
    #[error("cannot write {path}: {source}; check that save_path is writable")]
    RunDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("run directory {dir} is in use by another svf-train (pid {pid}); wait for it or choose another save_path")]
    RunDirInUse { dir: PathBuf, pid: String },
    #[error("run directory {dir} already holds a checkpoint; continue it with `svf-train --resume {dir}` or set another save_path (--set save_path=...)")]
    RunExists { dir: PathBuf },
    #[error("base learner {path} does not fit this config: {detail}; train the base stage for this dataset and fold (configs/bam/*_base.yaml), or point `base_learner` at its run directory")]
    BaseLearner { path: PathBuf, detail: String },
    #[error("config key `base_learner` is not set: BAM's meta stage needs a trained base learner; train it first (svf-train --config configs/bam/<dataset>_split<N>_base.yaml) and set base_learner to its run directory, or set `weight` to a whole BAM checkpoint")]
    NoBaseLearner,
    #[error("cannot resume the run in {dir}: {reason}")]
    CannotResume { dir: PathBuf, reason: String },
    #[error("the training split gives {items} {unit} per epoch, fewer than batch_size {batch_size}: lower batch_size or raise train_episodes")]
    EpochTooShort {
        items: usize,
        unit: &'static str,
        batch_size: usize,
    },
    #[error("iteration {iteration} (epoch {epoch}) failed inside libtorch: {message}. The weights of the last completed iteration are saved in {saved}; continue with `svf-train --resume {dir}`. If it ran out of memory, lower `batch_size`, set `amp: bf16` (CUDA), or lower `train_h`/`train_w`")]
    StepFailed {
        iteration: u64,
        epoch: usize,
        message: String,
        saved: String,
        dir: PathBuf,
    },
    #[error("loss is {loss} at iteration {iteration} (epoch {epoch}); stopped before updating the weights. Last good checkpoint: {last_good}. Training is deterministic, so resuming would diverge at the same point: lower base_lr or set warmup_steps and start a new run")]
    NonFiniteLoss {
        loss: f64,
        iteration: u64,
        epoch: usize,
        last_good: String,
    },
}

/// The state saved beside the weights (`last.json`, `best.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Iterations completed (global; epoch `e` ends at `e · iterations_per_epoch`).
    pub iteration: u64,
    pub iterations_per_epoch: u64,
    /// The last epoch whose end-of-epoch validation is done (0 = the one before training).
    pub validated_epoch: Option<usize>,
    /// The iteration of the last validation done, at the end or in the middle of an epoch.
    #[serde(default)]
    pub validated_iteration: Option<u64>,
    pub best_miou: Option<f64>,
    /// The epoch of the best validation (a mid-epoch validation counts for the epoch it is in).
    pub best_epoch: Option<usize>,
    /// Epochs trained since `best_epoch`, as of the last end-of-epoch validation; the run stops
    /// when it reaches `stop_interval`. Saved with the checkpoint, so `--resume` keeps counting.
    #[serde(default)]
    pub epochs_without_improvement: usize,
    /// The base LR of the last iteration done.
    pub lr: f64,
    /// BAM's base stage: what the base learner was trained for (the meta stage checks it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_learner: Option<BaseLearnerMeta>,
    /// The config keys that decide what the run learns, which `--resume` checks config.yaml
    /// against. (Absent in checkpoints written before they were recorded.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<ConfigRecord>,
}

impl TrainState {
    /// Epochs fully trained.
    pub fn epochs_done(&self) -> usize {
        (self.iteration / self.iterations_per_epoch) as usize
    }

    /// Where the run stands, in the one numbering of every stop and resume message (epochs from
    /// 1, as the progress bar and the epoch lines): "iteration 37 (epoch 1, 37/40)", "iteration 40
    /// (end of epoch 1)".
    pub fn position(&self) -> String {
        let (done, into) = (
            self.epochs_done(),
            self.iteration % self.iterations_per_epoch,
        );
        match (into, done) {
            (0, 0) => "iteration 0 (before training)".to_string(),
            (0, _) => format!("iteration {} (end of epoch {done})", self.iteration),
            _ => format!(
                "iteration {} (epoch {}, {into}/{})",
                self.iteration,
                done + 1,
                self.iterations_per_epoch
            ),
        }
    }
}

/// What a finished (or stopped) run reports.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub run_dir: PathBuf,
    pub state: TrainState,
    /// Validation mIoU before any training (epoch 0), when the run validated then.
    pub untrained_miou: Option<f64>,
    /// Mean loss of the last epoch trained in this process.
    pub last_epoch_loss: Option<f64>,
    /// Training throughput of this process (validation excluded).
    pub episodes_per_second: f64,
    /// Stopped by Ctrl-C (or [`TrainHooks::stop_after`]) before the last epoch.
    pub interrupted: bool,
    /// Stopped because `stop_interval` epochs passed without a new best validation mIoU.
    pub stopped_early: bool,
    /// A resumed run that had already trained and validated its last epoch: nothing was done.
    pub already_finished: bool,
}

/// Ways to observe and steer a run from the library (Ctrl-C, tests).
#[derive(Default)]
pub struct TrainHooks<'a> {
    /// When raised, the run saves `last` after the current iteration and returns.
    pub interrupt: Option<&'a AtomicBool>,
    /// Stop as on Ctrl-C once this many iterations are done (in total).
    pub stop_after: Option<u64>,
    /// Replaces the loss of an iteration (1-based) before the finiteness check, e.g. with NaN.
    pub map_loss: Option<LossMap<'a>>,
}

/// `(iteration, loss) -> loss`, see [`TrainHooks::map_loss`].
pub type LossMap<'a> = Box<dyn FnMut(u64, Tensor) -> Tensor + 'a>;

/// The configuration of the run in `run_dir` (its `config.yaml`), with `save_path` pointing at
/// `run_dir` wherever the directory now lives.
pub fn resume_config(run_dir: &Path) -> Result<Config, TrainError> {
    let path = run_dir.join(CONFIG_FILE);
    if !path.exists() {
        return Err(TrainError::CannotResume {
            dir: run_dir.to_path_buf(),
            reason: format!("{} does not exist", path.display()),
        });
    }
    let mut config = Config::load(&path, &[])?;
    config.save_path = run_dir.to_path_buf();
    Ok(config)
}

/// The libtorch seed of iteration `iteration` (0-based): dropout is reproducible across resume.
fn step_seed(seed: u64, iteration: u64) -> i64 {
    crate::data::rng::EpisodeRng::new(seed, STEP_SEED_STREAM, iteration).next_u64() as i64
}

/// What a run trains, behind one interface, so that the run directory, resume, progress,
/// metrics, validation and stopping are written once: the few-shot model on episodes
/// ([`EpisodicTask`]) or BAM's base learner on whole images ([`BaseTask`]).
trait TrainingTask {
    type Batch;
    /// What one training item is, in messages (`episodes`, `images`).
    const ITEMS: &'static str;
    /// Training items per epoch.
    fn items_per_epoch(&self) -> usize;
    /// The variables checkpoints hold.
    fn vs(&self) -> &nn::VarStore;
    /// Freezes everything but the trained parameters and returns those with their LR scale.
    fn trainable(&self) -> Vec<(String, Tensor, f64)>;
    /// The batches of items `items` (0-based within epoch `epoch`).
    fn batches(
        &self,
        epoch: usize,
        items: Range<u64>,
    ) -> Box<dyn Iterator<Item = Result<Self::Batch, DataError>>>;
    /// One optimiser step at `lr` (none when the loss is not finite).
    fn step(
        &self,
        batch: &Self::Batch,
        sgd: &mut Sgd,
        lr: f64,
        map_loss: Option<&mut dyn FnMut(Tensor) -> Tensor>,
    ) -> Losses;
    /// `(mIoU, FB-IoU)` of the current weights on the validation data; `None` when `stop` was
    /// raised before the end.
    fn validate(&self, stop: Option<&AtomicBool>) -> Result<Option<(f64, f64)>, TrainError>;
}

/// The few-shot model (PFENet, or BAM's meta stage) trained on episodes.
struct EpisodicTask<'a> {
    config: &'a Config,
    device: Device,
    vs: nn::VarStore,
    net: FewShotModel,
    train: Arc<FewShotDataset>,
    /// The validation split, opened once (`None` when `val_freq` is 0).
    val: Option<Arc<FewShotDataset>>,
}

impl<'a> EpisodicTask<'a> {
    /// `initialise`: load `backbone_weights`/`weight`/`base_learner` (a resumed run loads its
    /// checkpoint instead). Everything that can fail on the data fails here, before training.
    fn open(config: &'a Config, device: Device, initialise: bool) -> Result<Self, TrainError> {
        let train = Arc::new(FewShotDataset::open(config, Split::Train)?);
        let val = match config.val_freq {
            0 => None,
            _ => Some(Arc::new(FewShotDataset::open(config, Split::Val)?)),
        };
        let (vs, net) = build_model(config, device, initialise)?;
        Ok(EpisodicTask {
            config,
            device,
            vs,
            net,
            train,
            val,
        })
    }
}

/// The model of `config` with its variable store; see [`EpisodicTask::open`] for `initialise`.
fn build_model(
    config: &Config,
    device: Device,
    initialise: bool,
) -> Result<(nn::VarStore, FewShotModel), TrainError> {
    tch::manual_seed(config.manual_seed as i64);
    let vs = nn::VarStore::new(device);
    // A backbone loaded next (pretrained, `weight`, the base learner or the checkpoint) needs no
    // random start.
    let loaded = !initialise
        || config.backbone_weights.is_some()
        || config.weight.is_some()
        || config.method == Method::Bam;
    let init = if loaded { Init::Zeros } else { Init::Random };
    let net = FewShotModel::new(&vs.root(), config, init)?;
    // Frozen convolutions channels-last on the CPU (the trainable ones keep their layout, as do
    // their gradients and the optimiser's buffers).
    model::channels_last_on_cpu(&vs, |name| !is_trainable(config, name));
    if !initialise {
        return Ok((vs, net));
    }
    if let Some(path) = &config.weight {
        net.load_weights(&vs, path, config.svf, "config key `weight`")?;
        tracing::info!("model weights from {}", path.display());
        return Ok((vs, net));
    }
    match &net {
        FewShotModel::Pfenet(_) => {
            if let Some(path) = &config.backbone_weights {
                let report = backbone::load_pretrained(&vs, path, config)?;
                tracing::info!("backbone weights from {}: {report}", path.display());
            }
        }
        FewShotModel::Bam(bam) => {
            let path = config
                .base_learner
                .as_deref()
                .ok_or(TrainError::NoBaseLearner)?;
            base::load_base_learner(&vs, config, path)?;
            bam.decompose_base_into_meta(&vs, config);
        }
    }
    Ok((vs, net))
}

impl TrainingTask for EpisodicTask<'_> {
    type Batch = EpisodeBatch;
    const ITEMS: &'static str = "episodes";

    fn items_per_epoch(&self) -> usize {
        self.train.episodes_per_epoch()
    }

    fn vs(&self) -> &nn::VarStore {
        &self.vs
    }

    fn trainable(&self) -> Vec<(String, Tensor, f64)> {
        trainable_parameters(&self.vs, self.config)
    }

    fn batches(
        &self,
        epoch: usize,
        items: Range<u64>,
    ) -> Box<dyn Iterator<Item = Result<EpisodeBatch, DataError>>> {
        // Epoch e is the data's epoch e (episodes e·E..), less the incomplete last batch.
        let start = epoch as u64 * self.train.episodes_per_epoch() as u64;
        Box::new(EpisodeLoader::for_device(
            self.train.clone(),
            self.config.manual_seed,
            start + items.start..start + items.end,
            self.config.batch_size,
            self.config.workers,
            self.device,
        ))
    }

    fn step(
        &self,
        batch: &EpisodeBatch,
        sgd: &mut Sgd,
        lr: f64,
        map_loss: Option<&mut dyn FnMut(Tensor) -> Tensor>,
    ) -> Losses {
        let inputs = StepInputs {
            query_image: &batch.query_image,
            query_label: &batch.query_label,
            support_images: &batch.support_images,
            support_labels: &batch.support_labels,
            class_ids: &batch.class_ids,
        };
        train_step(
            &self.net,
            sgd,
            self.config,
            self.device,
            &inputs,
            lr,
            map_loss,
        )
    }

    fn validate(&self, stop: Option<&AtomicBool>) -> Result<Option<(f64, f64)>, TrainError> {
        let val = self
            .val
            .as_ref()
            .expect("validation is due only with val_freq > 0");
        let options = EvalOptions::for_validation(self.config);
        // Validate as svf-eval evaluates: SVD convolutions folded, a fifth less work per episode.
        let fused = if self.config.svf {
            Some(crate::inference::fuse(&self.vs, self.config)?)
        } else {
            None
        };
        let model = fused.as_ref().map_or(&self.net, |(_, net)| net);
        match eval::evaluate_on(model, val, self.config, self.device, &options, stop) {
            Ok(result) => Ok(Some((result.miou.mean, result.fb_iou.mean))),
            Err(EvalError::Stopped) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

/// Everything one run keeps while training.
struct Run<'a, T: TrainingTask> {
    config: &'a Config,
    dir: PathBuf,
    task: T,
    sgd: Sgd,
    schedule: LrSchedule,
    state: TrainState,
    metrics: MetricsLog,
    /// The iteration at which `last` was last written (for error messages).
    last_saved: Option<u64>,
    untrained_miou: Option<f64>,
}

/// Trains `config` on `device`: the few-shot model, or with `method: bam` and `stage: base` BAM's
/// base learner. `resume`: continue the run in that directory (its config must be `config`, see
/// [`resume_config`]). `hooks.interrupt` is how a binary passes Ctrl-C in.
pub fn train(
    config: &Config,
    device: Device,
    resume: Option<&Path>,
    mut hooks: TrainHooks,
) -> Result<TrainSummary, TrainError> {
    amp::prepare(config, device);
    let dir = resume.map_or_else(|| config.save_path.clone(), Path::to_path_buf);
    match config.stage {
        Stage::Meta => {
            let task = EpisodicTask::open(config, device, resume.is_none())?;
            let _lock = claim_run_dir(&dir, resume.is_none())?;
            run(task, config, dir, resume.is_some(), &mut hooks)
        }
        Stage::Base => {
            let task = BaseTask::open(config, device)?;
            let _lock = claim_run_dir(&dir, resume.is_none())?;
            run(task, config, dir, resume.is_some(), &mut hooks)
        }
    }
}

/// Takes `dir` for a run whose data opened: created and locked, refused for a `fresh` start over
/// a run's checkpoint, and only then given the log's lines: a start that fails on its data creates
/// nothing, a refused one writes nothing but the lock file.
fn claim_run_dir(dir: &Path, fresh: bool) -> Result<DirLock, TrainError> {
    std::fs::create_dir_all(dir).map_err(run_dir_error(dir))?;
    let lock = lock_run_dir(dir)?;
    if fresh && checkpoint::exists(dir, LAST)? {
        return Err(TrainError::RunExists {
            dir: dir.to_path_buf(),
        });
    }
    crate::logging::open_run_log().map_err(|e| TrainError::RunDir {
        path: e.path,
        source: e.source,
    })?;
    Ok(lock)
}

/// Trains `task` in `dir`, continuing its `last` checkpoint when `resume`.
fn run<T: TrainingTask>(
    task: T,
    config: &Config,
    dir: PathBuf,
    resume: bool,
    hooks: &mut TrainHooks,
) -> Result<TrainSummary, TrainError> {
    let items_per_epoch = task.items_per_epoch();
    let iterations_per_epoch = (items_per_epoch / config.batch_size) as u64;
    if iterations_per_epoch == 0 {
        return Err(TrainError::EpochTooShort {
            items: items_per_epoch,
            unit: T::ITEMS,
            batch_size: config.batch_size,
        });
    }
    let mut sgd = optimiser_over(task.trainable(), config);
    let state = if resume {
        restore(&dir, config, task.vs(), &mut sgd, iterations_per_epoch)?
    } else {
        let path = dir.join(CONFIG_FILE);
        std::fs::write(&path, config.to_yaml()).map_err(run_dir_error(&path))?;
        TrainState {
            iteration: 0,
            iterations_per_epoch,
            validated_epoch: None,
            validated_iteration: None,
            best_miou: None,
            best_epoch: None,
            epochs_without_improvement: 0,
            lr: 0.0,
            base_learner: (config.stage == Stage::Base).then(|| BaseLearnerMeta::of(config)),
            config: Some(ConfigRecord::of(config)),
        }
    };
    // On resume, records written after the checkpoint (then lost) are dropped.
    let covered = |record: &MetricsRecord| match record {
        MetricsRecord::Train { iteration, .. } => *iteration <= state.iteration,
        MetricsRecord::Val {
            iteration,
            mid_epoch: true,
            ..
        } => state.validated_iteration.is_some_and(|v| *iteration <= v),
        MetricsRecord::Val { epoch, .. } => state.validated_epoch.is_some_and(|v| *epoch <= v),
    };
    let keep = resume.then_some(&covered as &dyn Fn(&MetricsRecord) -> bool);
    let metrics =
        MetricsLog::open(&dir, keep).map_err(run_dir_error(&dir.join(MetricsLog::FILE_NAME)))?;
    let schedule = LrSchedule::from_config(config, iterations_per_epoch);
    // A finished run has no next iteration to give the rates of.
    if state.iteration < iterations_per_epoch * config.epochs as u64 {
        log_learning_rates(&sgd, &schedule, config.weight_decay, state.iteration + 1);
    }
    let mut run = Run {
        config,
        schedule,
        last_saved: resume.then_some(state.iteration),
        state,
        dir,
        task,
        sgd,
        metrics,
        untrained_miou: None,
    };
    run.train_epochs(hooks)
}

/// Locks run directory `dir` (its [`LOCK_FILE`]) for as long as the value lives: two processes
/// training into one directory would mix their checkpoints, metrics and config.yaml. Refused with
/// the pid of the process that holds it.
pub fn lock_run_dir(dir: &Path) -> Result<DirLock, TrainError> {
    lock_dir(dir, LOCK_FILE).map_err(|e| match e {
        DirLockError::Held { pid, .. } => TrainError::RunDirInUse {
            dir: dir.to_path_buf(),
            pid,
        },
        DirLockError::Io { path, source } => TrainError::RunDir { path, source },
    })
}

fn run_dir_error(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError {
    let path = path.to_path_buf();
    move |source| TrainError::RunDir { path, source }
}

/// The LR multiplier of trainable parameter `name`: `backbone_lr_scale` for the backbone's
/// (`layer0.`..`layer4.`: SVF's `vector_S`, which the SVF paper trains at a tenth of the head's
/// rate; every backbone parameter in BAM's base stage), else `head_lr_scale` (PFENet's head, BAM's
/// meta modules, the base learner's pyramid and classifier).
pub fn lr_scale(config: &Config, name: &str) -> f64 {
    match lr_group(name) {
        "backbone" => config.backbone_lr_scale,
        _ => config.head_lr_scale,
    }
}

/// The name of the LR group of parameter `name` in logs.
fn lr_group(name: &str) -> &'static str {
    if name.starts_with("layer") {
        "backbone"
    } else {
        "head"
    }
}

/// States in the run log the rate each group starts at, so that a run's recipe can be checked
/// from its log alone.
fn log_learning_rates(sgd: &Sgd, schedule: &LrSchedule, weight_decay: f64, iteration: u64) {
    let mut groups: Vec<(&str, f64, usize)> = Vec::new();
    for (name, scale) in sgd.lr_scales() {
        let group = lr_group(name);
        match groups
            .iter_mut()
            .find(|(g, s, _)| *g == group && *s == scale)
        {
            Some((_, _, count)) => *count += 1,
            None => groups.push((group, scale, 1)),
        }
    }
    let base = schedule.lr(iteration);
    for (group, scale, count) in groups {
        tracing::info!(
            "learning rate of the {group} ({count} tensors) at iteration {iteration}: {:.4e} = {base:.4e} x {scale}, {} schedule, weight decay {weight_decay}",
            base * scale,
            match schedule.kind {
                LrScheduleKind::Poly => "poly",
                LrScheduleKind::Constant => "constant",
            }
        );
    }
}

/// The few-shot model's trained parameters in `vs` (everything else is frozen: PFENet's head and
/// BAM's meta modules, + layer2..4 `vector_S` with SVF; never BAM's base learner), each with its
/// [`lr_scale`].
pub fn trainable_parameters(vs: &nn::VarStore, config: &Config) -> Vec<(String, Tensor, f64)> {
    let trainable = model::freeze_all_but(vs, |name| is_trainable(config, name));
    with_lr_scales(trainable, config)
}

/// Whether training updates variable `name` of `config`'s model (PFENet's or BAM's rule).
pub fn is_trainable(config: &Config, name: &str) -> bool {
    match config.method {
        Method::Pfenet => crate::svf::is_trainable(name, config.svf),
        Method::Bam => model::bam::is_trainable(name, config.svf),
    }
}

/// `parameters` with their [`lr_scale`].
fn with_lr_scales(
    parameters: Vec<(String, Tensor)>,
    config: &Config,
) -> Vec<(String, Tensor, f64)> {
    parameters
        .into_iter()
        .map(|(name, tensor)| {
            let scale = lr_scale(config, &name);
            (name, tensor, scale)
        })
        .collect()
}

/// The trainer's optimiser for the few-shot model in `vs`: SGD over exactly
/// [`trainable_parameters`].
pub fn optimiser(vs: &nn::VarStore, config: &Config) -> Sgd {
    optimiser_over(trainable_parameters(vs, config), config)
}

/// SGD over `parameters` (name, tensor, LR scale), logged.
fn optimiser_over(parameters: Vec<(String, Tensor, f64)>, config: &Config) -> Sgd {
    let parameter_count: i64 = parameters.iter().map(|(_, t, _)| t.numel() as i64).sum();
    tracing::info!(
        tensors = parameters.len(),
        parameters = parameter_count,
        svf = config.svf,
        "trainable set"
    );
    Sgd::new(parameters, config.momentum, config.weight_decay)
}

/// Loads `dir/last` into the model and the optimiser and returns its state, once `config` is found
/// to be the config the checkpoint was trained with (see [`check_config`]).
fn restore(
    dir: &Path,
    config: &Config,
    vs: &nn::VarStore,
    sgd: &mut Sgd,
    iterations_per_epoch: u64,
) -> Result<TrainState, TrainError> {
    let nothing = |reason: String| TrainError::CannotResume {
        dir: dir.to_path_buf(),
        reason,
    };
    let saved = checkpoint::load::<TrainState>(dir, LAST).map_err(|e| match e {
        CheckpointError::Missing { missing, .. } => {
            nothing(format!("{} does not exist", missing.display()))
        }
        other => other.into(),
    })?;
    check_config(dir, config, saved.state.config.as_ref()).map_err(nothing)?;
    if saved.state.iterations_per_epoch != iterations_per_epoch {
        return Err(nothing(format!(
            "the checkpoint has {} iterations per epoch but the data now gives {}; the dataset or batch_size changed",
            saved.state.iterations_per_epoch, iterations_per_epoch
        )));
    }
    crate::model::copy_into(vs, &saved.weights, &CheckpointFiles::new(dir, LAST).weights)?;
    sgd.load_state(saved.optimizer.unwrap_or_default())?;
    tracing::info!("resuming {} at {}", dir.display(), saved.state.position());
    // An unrecorded checkpoint's later ones record the config it goes on with.
    Ok(TrainState {
        config: Some(ConfigRecord::of(config)),
        ..saved.state
    })
}

/// `Err(reason)` naming every key, with its recorded and current value, that `config` changes
/// from the run's `recorded` config: continuing would train the checkpoint's weights under
/// another recipe, and config.yaml would then describe a model it did not make (another fold's
/// model, say, that has learned the fold's novel classes). A checkpoint without a record resumes
/// with a warning.
fn check_config(
    dir: &Path,
    config: &Config,
    recorded: Option<&ConfigRecord>,
) -> Result<(), String> {
    let resumable = RESUMABLE_KEYS.join(", ");
    let Some(recorded) = recorded else {
        tracing::warn!(
            "checkpoint `{LAST}` in {} records no config (written before checkpoints did): cannot check that {CONFIG_FILE} still describes the run; make sure that only {resumable} changed since it started",
            dir.display()
        );
        return Ok(());
    };
    let changes = recorded.changes_to(config)?;
    if changes.is_empty() {
        return Ok(());
    }
    let listed =
        |f: &dyn Fn(&KeyChange) -> String| changes.iter().map(f).collect::<Vec<_>>().join(", ");
    Err(format!(
        "{CONFIG_FILE} changes what the run learns since its checkpoint: {}. A change of these needs a new run: start one with another save_path. To continue this run, put the recorded values back in {} ({}); only {resumable} may change on resume",
        listed(&|c| format!("`{}` {} -> {}", c.key, c.recorded, c.now)),
        dir.join(CONFIG_FILE).display(),
        listed(&|c| format!("{}: {}", c.key, c.recorded)),
    ))
}

thread_local! {
    /// Whether a panic on this thread is reported by [`silencing_panics`]'s caller instead.
    static PANICS_SILENCED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with the panic hook silent for panics on this thread only (the caller turns them into
/// an error); other threads' panics, e.g. other runs in the same process, are still reported.
fn silencing_panics<R>(f: impl FnOnce() -> R) -> R {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !PANICS_SILENCED.with(|s| s.get()) {
                previous(info);
            }
        }));
    });
    PANICS_SILENCED.with(|s| s.set(true));
    let result = f();
    PANICS_SILENCED.with(|s| s.set(false));
    result
}

/// What a due validation point came to.
#[derive(PartialEq)]
enum Validation {
    NotDue,
    Done,
    /// Stopped by Ctrl-C before its end; nothing recorded, still due.
    Stopped,
}

/// How an epoch ended.
enum EpochEnd {
    Finished {
        mean_loss: f64,
    },
    /// Ctrl-C or [`TrainHooks::stop_after`]; `last` is saved.
    Stopped,
}

/// Training throughput of this process (validation excluded).
#[derive(Default)]
struct Throughput {
    episodes: u64,
    seconds: f64,
}

impl<T: TrainingTask> Run<'_, T> {
    fn train_epochs(&mut self, hooks: &mut TrainHooks) -> Result<TrainSummary, TrainError> {
        let mut throughput = Throughput::default();
        // Validation before training (epoch 0), or of an epoch whose run stopped between its last
        // iteration and its validation.
        match self.validate_if_due(self.state.epochs_done(), hooks.interrupt)? {
            Validation::Done => self.save_last()?,
            Validation::Stopped => {
                self.stop()?;
                return Ok(self.summary(true, None, &throughput));
            }
            Validation::NotDue if self.state.epochs_done() >= self.config.epochs => {
                tracing::info!(
                    "run already finished (epoch {0}/{0}); nothing to do",
                    self.config.epochs
                );
                return Ok(TrainSummary {
                    already_finished: true,
                    ..self.summary(false, None, &throughput)
                });
            }
            Validation::NotDue => {}
        }
        let mut last_epoch_loss = None;
        for epoch in self.state.epochs_done()..self.config.epochs {
            // Also on resume: a run that stopped early stays stopped.
            if self.stop_interval_reached() {
                return Ok(self.summary(false, last_epoch_loss, &throughput));
            }
            match self.train_epoch(epoch, hooks, &mut throughput)? {
                EpochEnd::Stopped => {
                    return Ok(self.summary(true, last_epoch_loss, &throughput));
                }
                EpochEnd::Finished { mean_loss } => last_epoch_loss = Some(mean_loss),
            }
            // `last` then holds the epoch's end with its validation still to do, which a resumed
            // run does first.
            if self.validate_if_due(epoch + 1, hooks.interrupt)? == Validation::Stopped {
                self.stop()?;
                return Ok(self.summary(true, last_epoch_loss, &throughput));
            }
            self.save_last()?;
        }
        Ok(self.summary(false, last_epoch_loss, &throughput))
    }

    /// Whether `stop_interval` epochs passed without a new best validation mIoU (logged once,
    /// when it happens).
    fn stop_interval_reached(&self) -> bool {
        let interval = self.config.stop_interval;
        let reached = interval > 0 && self.state.epochs_without_improvement >= interval;
        if reached {
            tracing::info!(
                "stopping early after epoch {}: {} epochs without a new best validation mIoU (stop_interval {interval}; best {:.2} after epoch {})",
                self.state.epochs_done(),
                self.state.epochs_without_improvement,
                100.0 * self.state.best_miou.unwrap_or(0.0),
                self.state.best_epoch.unwrap_or(0)
            );
        }
        reached
    }

    /// The rest of epoch `epoch` (0-based) from the current iteration.
    fn train_epoch(
        &mut self,
        epoch: usize,
        hooks: &mut TrainHooks,
        throughput: &mut Throughput,
    ) -> Result<EpochEnd, TrainError> {
        let config = self.config;
        let per_epoch = self.state.iterations_per_epoch;
        let total = per_epoch * config.epochs as u64;
        let batch = config.batch_size as u64;
        let first = self.state.iteration - epoch as u64 * per_epoch;
        let bar = crate::logging::progress_bar(
            per_epoch * batch,
            &format!("epoch {}/{}", epoch + 1, config.epochs),
        );
        bar.set_position(first * batch);
        // A run resumed exactly at the middle of the epoch may not have validated there yet.
        if self.validate_mid_epoch_if_due(epoch, hooks.interrupt)? == Validation::Stopped {
            bar.abandon();
            self.stop()?;
            return Ok(EpochEnd::Stopped);
        }
        let started = Instant::now();
        let (mut loss_sum, mut steps) = (0.0, 0u64);
        for next in self.task.batches(epoch, first * batch..per_epoch * batch) {
            let batch_items = match next {
                Ok(items) => items,
                Err(e) => return Err(self.saving_last(e.into())),
            };
            let losses = self.guarded_step(&batch_items, epoch, hooks)?;
            loss_sum += losses.total;
            steps += 1;
            // A validation stopped by Ctrl-C stops the run just below.
            self.validate_mid_epoch_if_due(epoch, hooks.interrupt)?;
            bar.inc(batch);
            bar.set_message(format!("loss {:.4} lr {:.2e}", losses.total, self.state.lr));
            let rate = (steps * batch) as f64 / started.elapsed().as_secs_f64();
            if self
                .state
                .iteration
                .is_multiple_of(config.print_freq as u64)
            {
                self.log_iteration(epoch, &losses, rate)?;
            }
            let stop = hooks.interrupt.is_some_and(|f| f.load(Ordering::SeqCst))
                || hooks.stop_after == Some(self.state.iteration);
            if stop && self.state.iteration < total {
                bar.abandon();
                throughput.episodes += steps * batch;
                throughput.seconds += started.elapsed().as_secs_f64();
                self.stop()?;
                return Ok(EpochEnd::Stopped);
            }
            // The epoch's last iteration is saved after its validation, once.
            let epoch_end = self.state.iteration == (epoch as u64 + 1) * per_epoch;
            if self.state.iteration.is_multiple_of(config.save_freq as u64) && !epoch_end {
                self.save_last()?;
            }
        }
        bar.finish_and_clear();
        let seconds = started.elapsed().as_secs_f64();
        throughput.episodes += steps * batch;
        throughput.seconds += seconds;
        let mean_loss = loss_sum / steps.max(1) as f64;
        tracing::info!(
            "epoch {}/{}: loss {:.4}, lr {:.2e}, {:.2} {}/s",
            epoch + 1,
            config.epochs,
            mean_loss,
            self.state.lr,
            (steps * batch) as f64 / seconds,
            T::ITEMS
        );
        Ok(EpochEnd::Finished { mean_loss })
    }

    fn summary(
        &self,
        interrupted: bool,
        last_epoch_loss: Option<f64>,
        throughput: &Throughput,
    ) -> TrainSummary {
        TrainSummary {
            run_dir: self.dir.clone(),
            state: self.state.clone(),
            untrained_miou: self.untrained_miou,
            last_epoch_loss,
            episodes_per_second: throughput.episodes as f64 / throughput.seconds.max(1e-9),
            interrupted,
            stopped_early: self.config.stop_interval > 0
                && self.state.epochs_without_improvement >= self.config.stop_interval,
            already_finished: false,
        }
    }

    /// [`Run::step`], turning a libtorch error inside it (out of memory, a device fault), which
    /// tch raises as a panic, into [`TrainError::StepFailed`] after saving `last`: the work since
    /// the last checkpoint is kept. While the step runs, panics on this thread are not reported by
    /// the panic hook, so that the user sees the one error message instead of a panic report.
    fn guarded_step(
        &mut self,
        batch: &T::Batch,
        epoch: usize,
        hooks: &mut TrainHooks,
    ) -> Result<Losses, TrainError> {
        let outcome = silencing_panics(|| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.step(batch, epoch, hooks)
            }))
        });
        let panic = match outcome {
            Ok(result) => return result,
            Err(panic) => panic,
        };
        let message = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown error".into());
        let iteration = self.state.iteration + 1;
        // A failure inside the optimiser's update could leave it half applied; every other part
        // of the step changes no weight, so `last` holds the previous iteration's weights.
        self.save_last()?;
        Err(TrainError::StepFailed {
            iteration,
            epoch: epoch + 1,
            message,
            saved: format!(
                "{} (iteration {})",
                CheckpointFiles::new(&self.dir, LAST).weights.display(),
                self.state.iteration
            ),
            dir: self.dir.clone(),
        })
    }

    /// One optimiser step on a batch; the loss is checked before the weights change.
    fn step(
        &mut self,
        batch: &T::Batch,
        epoch: usize,
        hooks: &mut TrainHooks,
    ) -> Result<Losses, TrainError> {
        let iteration = self.state.iteration + 1;
        tch::manual_seed(step_seed(self.config.manual_seed, self.state.iteration));
        let lr = self.schedule.lr(iteration);
        let mut map_loss = hooks
            .map_loss
            .as_mut()
            .map(|map| move |loss: Tensor| map(iteration, loss));
        let losses = self.task.step(
            batch,
            &mut self.sgd,
            lr,
            map_loss
                .as_mut()
                .map(|map| map as &mut dyn FnMut(Tensor) -> Tensor),
        );
        if !losses.total.is_finite() {
            let last_good = match self.last_saved {
                Some(at) => format!(
                    "{} (iteration {at})",
                    CheckpointFiles::new(&self.dir, LAST).weights.display()
                ),
                None => "none yet (no checkpoint was written before this iteration)".to_string(),
            };
            return Err(TrainError::NonFiniteLoss {
                loss: losses.total,
                iteration,
                epoch: epoch + 1,
                last_good,
            });
        }
        self.state.iteration = iteration;
        self.state.lr = lr;
        Ok(losses)
    }

    fn log_iteration(
        &mut self,
        epoch: usize,
        losses: &Losses,
        rate: f64,
    ) -> Result<(), TrainError> {
        let epoch_end = (epoch as u64 + 1) * self.state.iterations_per_epoch;
        let left = (epoch_end - self.state.iteration) * self.config.batch_size as u64;
        tracing::info!(
            target: crate::logging::PROGRESS_TARGET,
            "epoch {}/{} iteration {}: loss {:.4} (main {:.4}, aux {:.4}), lr {:.3e}, {rate:.2} {}/s, epoch ETA {}",
            epoch + 1,
            self.config.epochs,
            self.state.iteration,
            losses.total,
            losses.main,
            losses.aux,
            self.state.lr,
            T::ITEMS,
            indicatif::HumanDuration(std::time::Duration::from_secs_f64(left as f64 / rate.max(1e-9)))
        );
        self.append(&MetricsRecord::Train {
            epoch: epoch + 1,
            iteration: self.state.iteration,
            loss: losses.total,
            main_loss: losses.main,
            aux_loss: losses.aux,
            lr: self.state.lr,
            episodes_per_second: rate,
        })
    }

    fn append(&mut self, record: &MetricsRecord) -> Result<(), TrainError> {
        let path = self.metrics.path().to_path_buf();
        self.metrics
            .append(record)
            .map_err(|source| TrainError::RunDir { path, source })
    }

    /// After `epoch` epochs (0 = before training): validates when due and not yet done, and keeps
    /// the best checkpoint.
    fn validate_if_due(
        &mut self,
        epoch: usize,
        stop: Option<&AtomicBool>,
    ) -> Result<Validation, TrainError> {
        let due =
            self.validates_after(epoch) && self.state.validated_epoch.is_none_or(|v| v < epoch);
        if !due {
            return Ok(Validation::NotDue);
        }
        self.validate(epoch, false, stop)
    }

    /// Whether the end of epoch `epoch` (1-based; 0 = before training) is a validation point.
    fn validates_after(&self, epoch: usize) -> bool {
        let config = self.config;
        config.val_freq > 0 && (epoch.is_multiple_of(config.val_freq) || epoch == config.epochs)
    }

    /// With `val_half_epoch`, validates at the middle iteration of epoch `epoch` (0-based) of an
    /// epoch whose end validates, once.
    fn validate_mid_epoch_if_due(
        &mut self,
        epoch: usize,
        stop: Option<&AtomicBool>,
    ) -> Result<Validation, TrainError> {
        let per_epoch = self.state.iterations_per_epoch;
        // An epoch of one iteration has no middle apart from its end.
        if !self.config.val_half_epoch || per_epoch < 2 || !self.validates_after(epoch + 1) {
            return Ok(Validation::NotDue);
        }
        let middle = epoch as u64 * per_epoch + per_epoch / 2;
        let due = self.state.iteration == middle
            && self.state.validated_iteration.is_none_or(|v| v < middle);
        if !due {
            return Ok(Validation::NotDue);
        }
        self.validate(epoch + 1, true, stop)
    }

    /// Validates now, as of epoch `epoch` (the epochs done, or for `mid_epoch` the epoch in
    /// progress, 1-based), keeps the best checkpoint and updates the early-stopping count. Raising
    /// `stop` abandons it with nothing recorded, so that it stays due.
    fn validate(
        &mut self,
        epoch: usize,
        mid_epoch: bool,
        stop: Option<&AtomicBool>,
    ) -> Result<Validation, TrainError> {
        let (miou, fb_iou) = match self.task.validate(stop) {
            Ok(Some(scores)) => scores,
            Ok(None) => return Ok(Validation::Stopped),
            Err(e) => return Err(self.saving_last(e)),
        };
        let best = self.state.best_miou.is_none_or(|b| miou > b);
        if epoch == 0 {
            self.untrained_miou = Some(miou);
        }
        tracing::info!(
            "validation {} epoch {epoch}: mIoU {:.2}, FB-IoU {:.2}{}",
            if mid_epoch {
                "in the middle of"
            } else {
                "after"
            },
            100.0 * miou,
            100.0 * fb_iou,
            if best { " (best so far)" } else { "" }
        );
        self.state.validated_iteration = Some(self.state.iteration);
        if !mid_epoch {
            self.state.validated_epoch = Some(epoch);
        }
        if best {
            self.state.best_miou = Some(miou);
            self.state.best_epoch = Some(epoch);
            self.state.epochs_without_improvement = 0;
            let weights = crate::model::model_weights(self.task.vs());
            checkpoint::save(&self.dir, BEST, &weights, None, &self.state)?;
        } else if !mid_epoch {
            self.state.epochs_without_improvement =
                epoch.saturating_sub(self.state.best_epoch.unwrap_or(0));
        }
        self.append(&MetricsRecord::Val {
            epoch,
            iteration: self.state.iteration,
            miou,
            fb_iou,
            best,
            mid_epoch,
        })?;
        self.redraw_curves();
        Ok(Validation::Done)
    }

    /// Redraws `curves.png` from `metrics.jsonl`. A picture that cannot be drawn is worth a warning,
    /// not the run.
    fn redraw_curves(&self) {
        let path = self.dir.join(CURVES_FILE);
        let drawn = read_metrics(self.metrics.path())
            .map_err(|e| e.to_string())
            .and_then(|records| write_curves(&records, &path).map_err(|e| e.to_string()));
        if let Err(message) = drawn {
            tracing::warn!("training curves not drawn: {message}");
        }
    }

    /// Saves `last` and says how to continue: the end of a run stopped by Ctrl-C or `stop_after`.
    fn stop(&mut self) -> Result<(), TrainError> {
        self.save_last()?;
        tracing::warn!(
            "stopped at {}; continue with `svf-train --resume {}`",
            self.state.position(),
            self.dir.display()
        );
        Ok(())
    }

    /// `error`, after saving `last` when iterations were done since it was last saved: for errors
    /// between iterations (data, validation), where the weights and the state agree.
    fn saving_last(&mut self, error: TrainError) -> TrainError {
        if self.last_saved.unwrap_or(0) == self.state.iteration {
            return error;
        }
        match self.save_last() {
            Ok(()) => tracing::warn!(
                "saved `last` at {} before stopping; once the error below is fixed, continue with `svf-train --resume {}`",
                self.state.position(),
                self.dir.display()
            ),
            Err(e) => tracing::warn!("could not save `last` before stopping: {e}"),
        }
        error
    }

    fn save_last(&mut self) -> Result<(), TrainError> {
        let weights = crate::model::model_weights(self.task.vs());
        let buffers = self.sgd.state();
        checkpoint::save(&self.dir, LAST, &weights, Some(&buffers), &self.state)?;
        self.last_saved = Some(self.state.iteration);
        Ok(())
    }
}

pub struct Losses {
    pub total: f64,
    pub main: f64,
    pub aux: f64,
}

// --- issue 14: the one train step (svf-train and svf-bench) ------------------------------------

/// One batch of episodes for [`train_step`], on any device (copied to the model's when elsewhere).
pub struct StepInputs<'a> {
    pub query_image: &'a Tensor,
    pub query_label: &'a Tensor,
    pub support_images: &'a Tensor,
    pub support_labels: &'a Tensor,
    /// Each episode's class (BAM's ensemble leaves its base-learner channel out in training).
    pub class_ids: &'a [usize],
}

/// One training iteration, as `svf-train` runs it and `svf-bench` times it: inputs copied to
/// `device` (non-blocking: the loader pins its batches when the device is CUDA), forward in train
/// mode under [`amp::autocast`], loss (`main + aux_weight·aux`, then `map_loss`), backward, and the
/// optimiser step at `lr` only when the loss is finite; a non-finite loss leaves every weight as it
/// was (the caller reports it).
///
/// The one host synchronisation is the loss read back after `backward()` (as the reference's
/// `loss.item()` after its backward): the device never drains between forward and backward.
pub fn train_step(
    net: &FewShotModel,
    sgd: &mut Sgd,
    config: &Config,
    device: Device,
    inputs: &StepInputs,
    lr: f64,
    map_loss: Option<impl FnOnce(Tensor) -> Tensor>,
) -> Losses {
    let query_label = upload(inputs.query_label, device);
    let (main, aux) = amp::autocast(config, device, || {
        net.loss_terms(
            &upload(inputs.query_image, device),
            &upload(inputs.support_images, device),
            &upload(inputs.support_labels, device),
            inputs.class_ids,
            &query_label,
        )
    });
    optimise(sgd, main, aux, config.aux_weight, lr, map_loss)
}

/// A (pinned) host tensor copied to `device` without waiting for the copy.
fn upload(t: &Tensor, device: Device) -> Tensor {
    t.to_device_(device, t.kind(), true, false)
}

/// The update of every training step: loss `main + aux_weight·aux` (then `map_loss`), backward,
/// the three values read back once after `backward()`, and the optimiser step at `lr` only when
/// the loss is finite.
fn optimise(
    sgd: &mut Sgd,
    main: Tensor,
    aux: Tensor,
    aux_weight: f64,
    lr: f64,
    map_loss: Option<impl FnOnce(Tensor) -> Tensor>,
) -> Losses {
    let mut loss = &main + &aux * aux_weight;
    if let Some(map) = map_loss {
        loss = map(loss);
    }
    sgd.zero_grad();
    loss.backward();
    let values =
        Tensor::stack(&[loss.detach(), main.detach(), aux.detach()], 0).to_device(Device::Cpu);
    let losses = Losses {
        total: values.double_value(&[0]),
        main: values.double_value(&[1]),
        aux: values.double_value(&[2]),
    };
    if losses.total.is_finite() {
        sgd.step(lr);
    }
    losses
}
