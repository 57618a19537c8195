//! Benchmarks: loader, train step, eval and decomposition throughput.
//!
//! Every timing is the median of `repeats` runs after `warmup` unmeasured ones (the first runs pay
//! for allocator growth, oneDNN/cuDNN algorithm selection and page faults); on CUDA the device is
//! synchronised before the clock stops. The train and eval steps run on synthetic episodes (random
//! images and masks already on the device): their cost does not depend on image content, so no
//! dataset is needed, and the loader is measured on its own to show whether it can keep up.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use tch::{nn, Device, Kind, Tensor};

use crate::amp;
use crate::backbone::{self, Backbone, BackboneError, Init};
use crate::config::{Config, Method, Stage};
use crate::data::segmentation::BaseClassMap;
use crate::data::{DataError, EpisodeLoader, FewShotDataset, Split};
use crate::inference::InferenceError;
use crate::model::{FewShotModel, ModelError};
use crate::svf::{self, SvfOptions};
use crate::train;

/// Why a benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Backbone(#[from] BackboneError),
    #[error(transparent)]
    Inference(#[from] InferenceError),
    #[error("loader benchmark: cannot load the config's dataset (data_root, train_list, val_list); only `--what loader` needs it")]
    Data(#[from] DataError),
    /// A `--size` or `--shot` that the config's rules reject.
    #[error("--size / --shot: {0}")]
    Shape(crate::config::ConfigError),
    #[error("cannot write the benchmark's temporary weights {path}: {source}; set TMPDIR to a writable folder")]
    Weights {
        path: PathBuf,
        source: tch::TchError,
    },
    /// A section with no counterpart in BAM's base stage.
    #[error("--what {0}: `stage: base` (BAM's base learner, trained on whole images) has no {1}; svf-bench times its train step and evaluation (--what train,eval), or set stage: meta")]
    BaseStage(&'static str, &'static str),
}

/// How to time: where, and how often.
#[derive(Debug, Clone, Copy)]
pub struct BenchOptions {
    pub device: Device,
    /// Unmeasured runs first.
    pub warmup: usize,
    /// Measured runs; the median is reported.
    pub repeats: usize,
    /// Train step only: autograd through every weight, as a model that freezes nothing pays
    /// (the "before" of freezing).
    pub track_frozen: bool,
}

/// Seconds of one run: the median and spread of the wall-clock time, and the median CPU time.
#[derive(Debug, Clone, Serialize)]
pub struct Timing {
    pub median_s: f64,
    pub min_s: f64,
    pub max_s: f64,
    /// CPU seconds of the process (all threads) per run, median. On a machine shared with other
    /// work, wall time inflates while CPU time stays closer to the work done; on CUDA it is the
    /// host's share only.
    pub cpu_median_s: f64,
    pub repeats: usize,
}

/// The median of a non-empty sample (sorted in place).
fn median(samples: &mut [f64]) -> f64 {
    samples.sort_by(f64::total_cmp);
    let n = samples.len();
    (samples[(n - 1) / 2] + samples[n / 2]) / 2.0
}

/// User + system CPU seconds this process has used so far.
fn process_cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes the rusage struct it is given, which lives on this stack.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

impl Timing {
    /// Runs `work` `warmup + repeats` times and times the last `repeats`.
    fn measure(options: &BenchOptions, mut work: impl FnMut()) -> Timing {
        let finish = || {
            if let Device::Cuda(index) = options.device {
                tch::Cuda::synchronize(index as i64);
            }
        };
        for _ in 0..options.warmup {
            work();
        }
        finish();
        let (mut wall, mut cpu): (Vec<f64>, Vec<f64>) = (0..options.repeats.max(1))
            .map(|_| {
                let (start, cpu_start) = (Instant::now(), process_cpu_seconds());
                work();
                finish();
                (
                    start.elapsed().as_secs_f64(),
                    process_cpu_seconds() - cpu_start,
                )
            })
            .unzip();
        Timing {
            median_s: median(&mut wall),
            min_s: wall[0],
            max_s: wall[wall.len() - 1],
            cpu_median_s: median(&mut cpu),
            repeats: wall.len(),
        }
    }
}

/// Peak resident memory of this process (VmHWM), in MiB, when the kernel reports it.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Restarts the peak-RSS count from the current RSS (Linux ≥ 4.0), so that each measurement
/// reports its own peak. Freed heap memory is handed back to the kernel first, or the memory an
/// earlier measurement freed would count as resident. Where the kernel refuses the reset,
/// measurements report the process's peak so far.
fn reset_peak_rss() {
    // SAFETY: malloc_trim only releases free memory at the top of glibc's heaps; no pointer is
    // handed over and nothing in use is touched.
    unsafe { libc::malloc_trim(0) };
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Device memory in use on a CUDA device, MiB: `total − free` of the runtime's `cudaMemGetInfo`
/// (GPU-NOTES 12), for the current CUDA device (device 0 unless set otherwise). libtorch's caching
/// allocator keeps the blocks it has reserved, so after a timed step this is the process's peak
/// reserved memory so far plus the CUDA context (a few hundred MiB) and whatever other processes hold
/// on the device: run one shape per process for per-shape figures. tch does not expose the
/// allocator's own statistics (they sit behind a C++ virtual interface); the runtime's C function is
/// looked up at run time in the CUDA runtime libtorch loaded. `None` off CUDA or when not found.
pub fn cuda_memory_in_use_mib(device: Device) -> Option<f64> {
    if !device.is_cuda() {
        return None;
    }
    type MemGetInfo = unsafe extern "C" fn(*mut usize, *mut usize) -> i32;
    // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name only looks a symbol up.
    let symbol = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"cudaMemGetInfo".as_ptr()) };
    if symbol.is_null() {
        return None;
    }
    // SAFETY: `cudaMemGetInfo(size_t* free, size_t* total)` returns a `cudaError_t` (an int).
    let mem_get_info: MemGetInfo =
        unsafe { std::mem::transmute::<*mut libc::c_void, MemGetInfo>(symbol) };
    let (mut free, mut total) = (0usize, 0usize);
    // SAFETY: both pointers are valid for the call.
    let status = unsafe { mem_get_info(&mut free, &mut total) };
    (status == 0).then(|| (total - free) as f64 / (1024.0 * 1024.0))
}

/// Episodes per second of one step that processes `batch_size` episodes.
#[derive(Debug, Clone, Serialize)]
pub struct StepThroughput {
    /// Image side (square images).
    pub size: i64,
    pub shot: usize,
    pub batch_size: usize,
    /// Seconds to build the model once, before timing (for SVF this includes an SVD of every
    /// decomposed layer).
    pub setup_s: f64,
    pub timing: Timing,
    pub seconds_per_episode: f64,
    pub episodes_per_second: f64,
    /// Peak resident memory while timing this shape, MiB: the section's models (for eval both the
    /// unfused and the fused one) plus what the step allocates.
    pub peak_rss_mib: Option<f64>,
    /// Train only: the parameters autograd tracks in the step (the trainable set, or every weight
    /// with `--track-frozen`).
    pub tracked_parameters: Option<i64>,
    /// CUDA only: device memory in use after timing, MiB (see [`cuda_memory_in_use_mib`]).
    pub device_mib: Option<f64>,
}

impl StepThroughput {
    fn new(
        size: i64,
        shot: usize,
        batch_size: usize,
        setup_s: f64,
        timing: Timing,
    ) -> StepThroughput {
        let seconds_per_episode = timing.median_s / batch_size as f64;
        StepThroughput {
            size,
            shot,
            batch_size,
            setup_s,
            timing,
            seconds_per_episode,
            episodes_per_second: 1.0 / seconds_per_episode,
            peak_rss_mib: peak_rss_mib(),
            tracked_parameters: None,
            device_mib: None,
        }
    }
}

/// A batch of random episodes on the device: `(query, query_label, supports, support_labels)`,
/// random images and labels in {0, 1, 255}.
fn synthetic_episodes(batch: usize, shot: usize, size: i64, device: Device) -> [Tensor; 4] {
    let (b, k) = (batch as i64, shot as i64);
    let opts = (Kind::Float, device);
    // One square object of half the side (a quarter of the image), background, and a 4-pixel
    // ignored band at one edge: the labels of the reference harness (`ref-bench/ref_bench.py`),
    // shaped like real ones. (Noise labels would make every support position foreground, which
    // no real label does, and hide what the masked prior saves.)
    let (start, side) = (size / 4, size / 2);
    let query_label = Tensor::zeros([b, size, size], (Kind::Int64, device));
    let _ = query_label
        .narrow(1, start, side)
        .narrow(2, (start + 8).min(size - side), side)
        .fill_(1);
    let _ = query_label.narrow(2, 0, 4).fill_(255);
    let support_labels = Tensor::zeros([b, k, size, size], (Kind::Int64, device));
    let _ = support_labels
        .narrow(2, (start - 10).max(0), side)
        .narrow(3, start, side)
        .fill_(1);
    let _ = support_labels.narrow(3, size - 4, 4).fill_(255);
    [
        Tensor::randn([b, 3, size, size], opts),
        query_label,
        Tensor::randn([b, k, 3, size, size], opts),
        support_labels,
    ]
}

/// The geometry of the episodes a step is timed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpisodeShape {
    /// Side of the square images.
    pub size: i64,
    /// Supports per episode (K).
    pub shot: usize,
}

impl EpisodeShape {
    /// `config` with its episodes of this shape, validated as a config file's values are (a
    /// `--size` of 64 or a `--shot` of 0 is reported like `train_h: 64` or `shot: 0`).
    pub fn apply(&self, config: &Config) -> Result<Config, BenchError> {
        let shaped = Config {
            shot: self.shot,
            train_h: self.size,
            train_w: self.size,
            val_size: self.size,
            ..config.clone()
        };
        shaped.validate("svf-bench").map_err(BenchError::Shape)?;
        Ok(shaped)
    }
}

/// The config of the model that runs `shot`-shot episodes: BAM's K-shot reweighting is built for
/// one K, while one PFENet serves every K.
fn config_for_shot(config: &Config, shot: usize) -> Config {
    match config.method {
        Method::Bam => Config {
            shot,
            ..config.clone()
        },
        Method::Pfenet => config.clone(),
    }
}

/// A model being trained by the benchmark, with its optimiser and the seconds they took to build.
struct TrainModel {
    vs: nn::VarStore,
    net: FewShotModel,
    sgd: train::Sgd,
    setup_s: f64,
}

impl TrainModel {
    fn build(config: &Config, options: &BenchOptions) -> Result<Self, BenchError> {
        let setup = Instant::now();
        tch::manual_seed(config.manual_seed as i64);
        let vs = nn::VarStore::new(options.device);
        let net = FewShotModel::new(&vs.root(), config, Init::Random)?;
        // As training lays its frozen convolutions out (`train::train`'s model).
        crate::model::channels_last_on_cpu(&vs, |name| !train::is_trainable(config, name));
        let sgd = train::optimiser(&vs, config);
        if options.track_frozen {
            for (name, variable) in vs.variables() {
                let statistic = name.contains(".running_") || name.ends_with("num_batches_tracked");
                if !statistic {
                    let _ = variable.set_requires_grad(true);
                }
            }
        }
        Ok(TrainModel {
            vs,
            net,
            sgd,
            setup_s: setup.elapsed().as_secs_f64(),
        })
    }
}

/// Random whole images `[batch, 3, size, size]` and labels in {0, 1, 255} as the episodes' queries
/// (for BAM's base stage, which trains on images, not episodes).
fn synthetic_images(batch: usize, size: i64, device: Device) -> (Tensor, Tensor) {
    let [images, labels, _, _] = synthetic_episodes(batch, 0, size, device);
    (images, labels)
}

/// The sizes of `shapes`, each once, as shapes of no supports (BAM's base stage: whole images).
fn image_shapes(shapes: &[EpisodeShape]) -> Vec<EpisodeShape> {
    let mut sizes: Vec<EpisodeShape> = Vec::new();
    for shape in shapes {
        if !sizes.iter().any(|s| s.size == shape.size) {
            sizes.push(EpisodeShape {
                size: shape.size,
                shot: 0,
            });
        }
    }
    sizes
}

/// BAM's base stage: [`train::base::train_step`] itself (the PSPNet base learner, forward in train
/// mode, loss, backward, a step of [`train::base::optimiser`]) on `batch_size` random whole images
/// per size (one row per size, shot 0).
fn base_step_throughput(
    config: &Config,
    options: &BenchOptions,
    shapes: &[EpisodeShape],
) -> Result<Vec<StepThroughput>, BenchError> {
    let setup = Instant::now();
    tch::manual_seed(config.manual_seed as i64);
    let vs = nn::VarStore::new(options.device);
    let net = train::base::base_learner(&vs, config, Init::Random)?;
    let mut sgd = train::base::optimiser(&vs, config);
    let setup_s = setup.elapsed().as_secs_f64();
    let tracked: i64 = vs
        .variables()
        .values()
        .filter(|v| v.requires_grad())
        .map(|v| v.numel() as i64)
        .sum();
    let batch = config.batch_size;
    let mut results = Vec::new();
    for shape in image_shapes(shapes) {
        let (images, labels) = synthetic_images(batch, shape.size, options.device);
        reset_peak_rss();
        let timing = Timing::measure(options, || {
            let no_map: Option<fn(Tensor) -> Tensor> = None;
            train::base::train_step(
                &net,
                &mut sgd,
                config,
                options.device,
                &images,
                &labels,
                config.base_lr,
                no_map,
            );
        });
        results.push(StepThroughput {
            tracked_parameters: Some(tracked),
            device_mib: cuda_memory_in_use_mib(options.device),
            ..StepThroughput::new(shape.size, 0, batch, setup_s, timing)
        });
    }
    Ok(results)
}

/// BAM's base stage: [`train::base::predict`] (as its validation runs) on `batch_size_val` random
/// whole images per size (one row per size, shot 0).
fn base_eval_throughput(
    config: &Config,
    options: &BenchOptions,
    shapes: &[EpisodeShape],
) -> Result<Vec<EvalThroughput>, BenchError> {
    let setup = Instant::now();
    tch::manual_seed(config.manual_seed as i64);
    let vs = nn::VarStore::new(options.device);
    let net = train::base::base_learner(&vs, config, Init::Random)?;
    let setup_s = setup.elapsed().as_secs_f64();
    let batch = config.batch_size_val;
    let mut results = Vec::new();
    for shape in image_shapes(shapes) {
        let (images, _) = synthetic_images(batch, shape.size, options.device);
        reset_peak_rss();
        let timing = Timing::measure(options, || {
            let _ = train::base::predict(&net, &images);
        });
        results.push(EvalThroughput {
            unfused: StepThroughput {
                device_mib: cuda_memory_in_use_mib(options.device),
                ..StepThroughput::new(shape.size, 0, batch, setup_s, timing)
            },
            fused: None,
            fused_max_abs_diff: None,
        });
    }
    Ok(results)
}

/// One training iteration, [`train::train_step`] itself (forward in train mode, loss, backward, the
/// loss read back, a step of [`train::optimiser`]) on a random batch of
/// `batch_size` episodes, for each shape. The model is built once (BAM: once per shot, each
/// dropped before the next is built).
pub fn train_step_throughput(
    config: &Config,
    options: &BenchOptions,
    shapes: &[EpisodeShape],
) -> Result<Vec<StepThroughput>, BenchError> {
    if config.stage == Stage::Base {
        return base_step_throughput(config, options, shapes);
    }
    let batch = config.batch_size;
    let mut model: Option<(Config, TrainModel)> = None;
    let mut results = Vec::with_capacity(shapes.len());
    for &EpisodeShape { size, shot } in shapes {
        let model_config = config_for_shot(config, shot);
        if model.as_ref().map(|(c, _)| c.shot) != Some(model_config.shot) {
            // The previous model goes first, so that peak memory counts one model.
            drop(model.take());
            let built = TrainModel::build(&model_config, options)?;
            model = Some((model_config, built));
        }
        let (model_config, model) = model.as_mut().expect("built above");
        let tracked: i64 = model
            .vs
            .variables()
            .values()
            .filter(|v| v.requires_grad())
            .map(|v| v.numel() as i64)
            .sum();
        let [query, query_label, supports, support_labels] =
            synthetic_episodes(batch, shot, size, options.device);
        reset_peak_rss();
        // Training episodes are of base classes (BAM's ensemble leaves the class's channel out).
        let class_ids = vec![BaseClassMap::of(config).base[0]; batch];
        let inputs = train::StepInputs {
            query_image: &query,
            query_label: &query_label,
            support_images: &supports,
            support_labels: &support_labels,
            class_ids: &class_ids,
        };
        let timing = Timing::measure(options, || {
            let no_map: Option<fn(Tensor) -> Tensor> = None;
            train::train_step(
                &model.net,
                &mut model.sgd,
                model_config,
                options.device,
                &inputs,
                config.base_lr,
                no_map,
            );
        });
        results.push(StepThroughput {
            tracked_parameters: Some(tracked),
            device_mib: cuda_memory_in_use_mib(options.device),
            ..StepThroughput::new(size, shot, batch, model.setup_s, timing)
        });
    }
    Ok(results)
}

/// Evaluation throughput of the model as `svf-eval` runs it (eval mode, no autograd, argmax of
/// the logits), unfused and, for SVF, fused.
#[derive(Debug, Clone, Serialize)]
pub struct EvalThroughput {
    /// The model as trained (SVD convolutions as U·S·V for SVF).
    pub unfused: StepThroughput,
    /// SVF only: the SVD convolutions folded back into one convolution each (`svf-eval`'s path).
    pub fused: Option<StepThroughput>,
    /// SVF only: the largest |fused − unfused| logit on the timed episodes.
    pub fused_max_abs_diff: Option<f64>,
}

/// A model loaded for evaluation, with the seconds [`inference::load_model`] took.
struct EvalModel {
    _vs: nn::VarStore,
    net: FewShotModel,
    setup_s: f64,
}

impl EvalModel {
    fn load(
        config: &Config,
        weights: &Path,
        options: &BenchOptions,
        fuse: bool,
    ) -> Result<Self, BenchError> {
        let setup = Instant::now();
        let (vs, net) = crate::inference::load_model(config, weights, options.device, fuse)?;
        Ok(EvalModel {
            _vs: vs,
            net,
            setup_s: setup.elapsed().as_secs_f64(),
        })
    }

    /// Times the logits and argmax of one batch as [`eval::evaluate`] computes them; returns the
    /// timing and the logits.
    fn measure(
        &self,
        config: &Config,
        options: &BenchOptions,
        episodes: &[Tensor; 4],
        shape: EpisodeShape,
    ) -> (StepThroughput, Tensor) {
        let [query, _, supports, support_labels] = episodes;
        let logits = || {
            crate::inference::inference_logits(&self.net, config, query, supports, support_labels)
        };
        reset_peak_rss();
        let timing = Timing::measure(options, || {
            let _ = logits().argmax(1, false);
        });
        let batch = query.size()[0] as usize;
        let throughput = StepThroughput {
            device_mib: cuda_memory_in_use_mib(options.device),
            ..StepThroughput::new(shape.size, shape.shot, batch, self.setup_s, timing)
        };
        (throughput, logits())
    }
}

/// The models of one shot count loaded for evaluation: unfused and (SVF) fused.
struct EvalModels {
    unfused: EvalModel,
    fused: Option<EvalModel>,
}

impl EvalModels {
    /// Loads `config`'s model from random weights written to a temporary file.
    fn load(config: &Config, options: &BenchOptions) -> Result<Self, BenchError> {
        let weights = std::env::temp_dir().join(format!(
            "svf-bench-{}-weights.safetensors",
            std::process::id()
        ));
        let models = write_random_weights(config, &weights).and_then(|()| {
            let unfused = EvalModel::load(config, &weights, options, false)?;
            let fused = match config.svf {
                true => Some(EvalModel::load(config, &weights, options, true)?),
                false => None,
            };
            Ok(EvalModels { unfused, fused })
        });
        let _ = std::fs::remove_file(&weights);
        models
    }
}

/// Times one evaluation forward pass of `batch_size_val` random episodes for each shape, for the
/// model loaded by [`inference::load_model`] without and (SVF) with fusion, from random weights
/// written to a temporary file. The models are loaded once (BAM: once per shot).
pub fn eval_throughput(
    config: &Config,
    options: &BenchOptions,
    shapes: &[EpisodeShape],
) -> Result<Vec<EvalThroughput>, BenchError> {
    if config.stage == Stage::Base {
        return base_eval_throughput(config, options, shapes);
    }
    let mut models: Option<(Config, EvalModels)> = None;
    let mut results = Vec::with_capacity(shapes.len());
    for &shape in shapes {
        let model_config = config_for_shot(config, shape.shot);
        if models.as_ref().map(|(c, _)| c.shot) != Some(model_config.shot) {
            drop(models.take());
            let loaded = EvalModels::load(&model_config, options)?;
            models = Some((model_config, loaded));
        }
        let (model_config, loaded) = models.as_ref().expect("loaded above");
        let episodes = synthetic_episodes(
            config.batch_size_val,
            shape.shot,
            shape.size,
            options.device,
        );
        let (unfused, unfused_logits) =
            loaded
                .unfused
                .measure(model_config, options, &episodes, shape);
        let (fused, diff) = match &loaded.fused {
            Some(model) => {
                let (fused, fused_logits) = model.measure(model_config, options, &episodes, shape);
                let diff = (fused_logits - unfused_logits)
                    .abs()
                    .max()
                    .double_value(&[]);
                (Some(fused), Some(diff))
            }
            None => (None, None),
        };
        results.push(EvalThroughput {
            unfused,
            fused,
            fused_max_abs_diff: diff,
        });
    }
    Ok(results)
}

/// Writes the weights of a randomly initialised model of `config` (seeded) to `path`.
fn write_random_weights(config: &Config, path: &Path) -> Result<(), BenchError> {
    tch::manual_seed(config.manual_seed as i64);
    let vs = nn::VarStore::new(Device::Cpu);
    FewShotModel::new(&vs.root(), config, Init::Random)?;
    Tensor::write_safetensors(&crate::model::model_weights(&vs), path).map_err(|source| {
        BenchError::Weights {
            path: path.to_path_buf(),
            source,
        }
    })
}

/// Time to decompose the configured backbone's full-rank weights with its `svf_*` options, as
/// loading pretrained weights into an SVF model does.
#[derive(Debug, Clone, Serialize)]
pub struct DecomposeTiming {
    /// Layers decomposed.
    pub layers: usize,
    /// Parameters of the decomposed backbone.
    pub parameters: i64,
    pub timing: Timing,
    pub peak_rss_mib: Option<f64>,
}

/// Times [`svf::decompose_weights`] on a random full-rank backbone of `config`'s shape.
pub fn decompose_timing(
    config: &Config,
    options: &BenchOptions,
) -> Result<DecomposeTiming, BenchError> {
    reset_peak_rss();
    tch::manual_seed(config.manual_seed as i64);
    let full_rank = Config {
        svf: false,
        ..config.clone()
    };
    let vs = nn::VarStore::new(options.device);
    Backbone::new(&vs.root(), &full_rank)?;
    let weights = backbone::backbone_variables(&vs);
    let svf_options = SvfOptions::from_config(config);
    let mut report = None;
    let timing = Timing::measure(options, || {
        report = Some(svf::decompose_weights(&weights, &svf_options).1);
    });
    let report = report.expect("measure runs the work at least once");
    Ok(DecomposeTiming {
        layers: report.layers.len(),
        parameters: report.parameters,
        timing,
        peak_rss_mib: peak_rss_mib(),
    })
}

/// Episodes per second the loader delivers for one split and worker count.
#[derive(Debug, Clone, Serialize)]
pub struct LoaderThroughput {
    pub split: &'static str,
    pub workers: usize,
    pub batch_size: usize,
    pub shot: usize,
    /// Episode image (height, width).
    pub size: (usize, usize),
    pub episodes: u64,
    pub seconds: f64,
    pub episodes_per_second: f64,
}

/// Times `episodes` episodes of `split` (batches of the config's `batch_size` / `batch_size_val`)
/// for each worker count, from the loader's start (so including the first batch's latency).
pub fn loader_throughput(
    config: &Config,
    split: Split,
    workers: &[usize],
    episodes: u64,
) -> Result<Vec<LoaderThroughput>, DataError> {
    let dataset = Arc::new(FewShotDataset::open(config, split)?);
    let batch_size = match split {
        Split::Train => config.batch_size,
        Split::Val => config.batch_size_val,
    };
    workers
        .iter()
        .map(|&w| {
            let start = Instant::now();
            let mut delivered = 0;
            for batch in EpisodeLoader::new(
                dataset.clone(),
                config.manual_seed,
                0..episodes,
                batch_size,
                w,
            ) {
                delivered += batch?.episode_indices.len() as u64;
            }
            let seconds = start.elapsed().as_secs_f64();
            Ok(LoaderThroughput {
                split: split.name(),
                workers: w,
                batch_size,
                shot: config.shot,
                size: dataset.output_size(),
                episodes: delivered,
                seconds,
                episodes_per_second: delivered as f64 / seconds,
            })
        })
        .collect()
}

/// A part of the pipeline `svf-bench` can time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Section {
    /// Episode loading (decode + augment + batch), train and val transforms.
    Loader,
    /// One training iteration (forward, backward, optimiser).
    Train,
    /// One evaluation forward pass, unfused and (SVF) fused.
    Eval,
    /// SVD decomposition of the backbone.
    Decompose,
}

/// The sections `svf-bench` runs without `--what`: all of them, or for BAM's base stage the ones
/// it has (train, eval).
pub fn default_sections(config: &Config) -> Vec<Section> {
    match config.stage {
        Stage::Base => vec![Section::Train, Section::Eval],
        Stage::Meta => <Section as clap::ValueEnum>::value_variants().to_vec(),
    }
}

/// What to time: the sections, for every image size × shot.
#[derive(Debug, Clone)]
pub struct BenchPlan {
    pub sections: Vec<Section>,
    /// Square image sides (train crop, val canvas); empty: the config's `train_h` and `val_size`.
    pub sizes: Vec<i64>,
    /// Support counts; empty: the config's `shot`.
    pub shots: Vec<usize>,
    pub options: BenchOptions,
    /// Loader worker counts.
    pub loader_workers: Vec<usize>,
    /// Episodes per loader measurement.
    pub loader_episodes: u64,
}

/// Everything one `svf-bench` run measured; serialised as its JSON line.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// `PFENet` or `PFENet+SVF`.
    pub method: String,
    /// `ResNet-50`, `VGG-16`, ... (with the width when reduced).
    pub backbone: String,
    /// BAM's `base` stage times the base learner on whole images (shot 0, one item an image);
    /// `meta` the few-shot model on episodes.
    pub stage: Stage,
    pub device: String,
    /// libtorch intra-op threads.
    pub threads: i32,
    /// Whether the train step tracked every weight (`--track-frozen`).
    pub track_frozen: bool,
    pub warmup: usize,
    pub repeats: usize,
    pub train: Vec<StepThroughput>,
    pub eval: Vec<EvalThroughput>,
    pub loader: Vec<LoaderThroughput>,
    pub decompose: Option<DecomposeTiming>,
}

/// Runs `plan` on `config`: train and eval for every size × shot (default: the config's
/// `train_h` resp. `val_size` and `shot`), the loader likewise with the size as train crop and
/// validation canvas, and the decomposition once.
pub fn run(config: &Config, plan: &BenchPlan) -> Result<BenchReport, BenchError> {
    amp::prepare(config, plan.options.device);
    let shapes = |default_size: i64| -> Vec<EpisodeShape> {
        let sizes = match plan.sizes.is_empty() {
            true => vec![default_size],
            false => plan.sizes.clone(),
        };
        let shots = match plan.shots.is_empty() {
            true => vec![config.shot],
            false => plan.shots.clone(),
        };
        sizes
            .iter()
            .flat_map(|&size| shots.iter().map(move |&shot| EpisodeShape { size, shot }))
            .collect()
    };
    for shape in shapes(config.train_h)
        .iter()
        .chain(&shapes(config.val_size))
    {
        shape.apply(config)?;
    }
    if config.stage == Stage::Base {
        for section in &plan.sections {
            match section {
                Section::Loader => return Err(BenchError::BaseStage("loader", "episode loader")),
                Section::Decompose => {
                    return Err(BenchError::BaseStage("decompose", "SVD decomposition"))
                }
                Section::Train | Section::Eval => {}
            }
        }
    }
    let setting = crate::results::EvalSetting::new(config, config.shot, 0, false);
    let mut report = BenchReport {
        method: match config.stage {
            Stage::Base => "BAM base learner (PSPNet)".into(),
            Stage::Meta => setting.method,
        },
        stage: config.stage,
        backbone: setting.backbone,
        device: crate::device::name(plan.options.device),
        threads: tch::get_num_threads(),
        track_frozen: plan.options.track_frozen,
        warmup: plan.options.warmup,
        repeats: plan.options.repeats.max(1),
        train: Vec::new(),
        eval: Vec::new(),
        loader: Vec::new(),
        decompose: None,
    };
    for section in &plan.sections {
        match section {
            Section::Train => {
                report.train =
                    train_step_throughput(config, &plan.options, &shapes(config.train_h))?
            }
            Section::Eval => {
                report.eval = eval_throughput(config, &plan.options, &shapes(config.val_size))?
            }
            Section::Loader => {
                for shape in shapes(config.train_h) {
                    let config = shape.apply(config)?;
                    for split in [Split::Train, Split::Val] {
                        report.loader.extend(loader_throughput(
                            &config,
                            split,
                            &plan.loader_workers,
                            plan.loader_episodes,
                        )?);
                    }
                }
            }
            Section::Decompose => report.decompose = Some(decompose_timing(config, &plan.options)?),
        }
    }
    Ok(report)
}

impl std::fmt::Display for BenchReport {
    /// A small table: one row per measurement.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} {} on {} ({} threads), median of {} after {} warm-up{}",
            self.method,
            self.backbone,
            self.device,
            self.threads,
            self.repeats,
            self.warmup,
            if self.track_frozen {
                ", autograd through every weight"
            } else {
                ""
            }
        )?;
        if self.stage == Stage::Base {
            writeln!(
                f,
                "stage: base: whole images, not episodes (one image per \"episode\", shot 0)"
            )?;
        }
        let has_rows = !(self.train.is_empty() && self.eval.is_empty() && self.loader.is_empty());
        if has_rows {
            writeln!(
                f,
                "{:<12} {:>5} {:>4} {:>5} {:>10} {:>10} {:>10} {:>9} {:>8} {:>10}",
                "section",
                "size",
                "shot",
                "batch",
                "s/step",
                "s/episode",
                "episodes/s",
                "peak MiB",
                "setup s",
                "CPU s/step"
            )?;
        }
        let mib = |m: Option<f64>| m.map_or("n/a".to_string(), |m| format!("{m:.0}"));
        let mut row = |name: &str, s: &StepThroughput| {
            writeln!(
                f,
                "{:<12} {:>5} {:>4} {:>5} {:>10.4} {:>10.4} {:>10.2} {:>9} {:>8.2} {:>10.4}",
                name,
                s.size,
                s.shot,
                s.batch_size,
                s.timing.median_s,
                s.seconds_per_episode,
                s.episodes_per_second,
                mib(s.peak_rss_mib),
                s.setup_s,
                s.timing.cpu_median_s
            )
        };
        for s in &self.train {
            row("train", s)?;
        }
        for e in &self.eval {
            row("eval", &e.unfused)?;
            if let Some(fused) = &e.fused {
                row("eval fused", fused)?;
            }
        }
        for l in &self.loader {
            writeln!(
                f,
                "{:<12} {:>5} {:>4} {:>5} {:>10} {:>10} {:>10.2}   ({} workers, {} episodes)",
                format!("loader {}", l.split),
                l.size.0,
                l.shot,
                l.batch_size,
                "",
                format!("{:.4}", 1.0 / l.episodes_per_second),
                l.episodes_per_second,
                l.workers,
                l.episodes
            )?;
        }
        for e in &self.eval {
            if let Some(diff) = e.fused_max_abs_diff {
                writeln!(
                    f,
                    "fused vs unfused logits at {}: max |diff| {diff:.2e}",
                    e.unfused.size
                )?;
            }
        }
        if let Some(d) = &self.decompose {
            writeln!(
                f,
                "decompose: {} layers ({} parameters) in {:.3} s, peak {} MiB",
                d.layers,
                d.parameters,
                d.timing.median_s,
                mib(d.peak_rss_mib)
            )?;
        }
        if self.device.starts_with("cuda") {
            let rows = self
                .train
                .iter()
                .map(|s| ("train", s))
                .chain(self.eval.iter().flat_map(|e| {
                    std::iter::once(("eval", &e.unfused))
                        .chain(e.fused.iter().map(|s| ("eval fused", s)))
                }));
            for (name, s) in rows {
                writeln!(
                    f,
                    "GPU memory in use after {name} {}/{}-shot: {} MiB (cudaMemGetInfo: peak reserved so far + context)",
                    s.size,
                    s.shot,
                    mib(s.device_mib)
                )?;
            }
        }
        Ok(())
    }
}
