//! Worker threads that decode and augment episodes ahead of the trainer, and the batches they make.
//!
//! Workers claim whole batches in order from a window of at most [`PREFETCH_PER_WORKER`] batches per
//! worker ahead of the consumer (the bounded queue), build them, and send them back; the consumer
//! hands them out in index order. Episodes are pure functions of (seed, index), so the batches do
//! not depend on the number of workers.
//!
//! A file that fails to decode is logged by name and its episode replaced (see
//! [`super::sampler`]); more than 1% of failed episodes (counted over at least
//! [`MIN_FAILURE_BASE`] episodes) ends the iteration with [`DataError::TooManyFailures`].

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use tch::kind::Element;
use tch::{Device, Tensor};

use super::dataset::FewShotDataset;
use super::episode::Episode;
use super::raster::LabelMap;
use super::sampler::EpisodeSampler;
use super::transform::normalise_into;
use super::DataError;

/// Batches each worker may build ahead of the consumer.
const PREFETCH_PER_WORKER: u64 = 2;
/// Replacement attempts for one episode before the loader gives up on it.
const MAX_ATTEMPTS: u64 = 16;
/// The 1% failure rule counts over at least this many episodes, so that one early failure in a
/// short range does not abort a run.
const MIN_FAILURE_BASE: u64 = 100;

/// A batch of episodes as CPU tensors.
#[derive(Debug)]
pub struct EpisodeBatch {
    /// [B, 3, H, W] f32, normalised.
    pub query_image: Tensor,
    /// [B, H, W] i64 in {0, 1, 255}.
    pub query_label: Tensor,
    /// [B, K, 3, H, W] f32, normalised.
    pub support_images: Tensor,
    /// [B, K, H, W] i64 in {0, 1, 255}.
    pub support_labels: Tensor,
    /// Dataset class id of each episode.
    pub class_ids: Vec<usize>,
    /// Validation: each query's binarised label at its original size, [h, w] i64; train: empty.
    pub original_labels: Vec<Tensor>,
    pub query_paths: Vec<PathBuf>,
    pub support_paths: Vec<Vec<PathBuf>>,
    pub episode_indices: Vec<u64>,
}

/// A new CPU tensor of `shape` written by `fill`, without running a libtorch kernel on this thread:
/// `Tensor::from_slice` zero-fills through OpenMP, and every loader thread would start its own
/// OpenMP team, spinning against the trainer's (a 5-10x slowdown measured on 2 cores).
fn cpu_tensor<T: Element>(shape: &[i64], fill: impl FnOnce(&mut [T])) -> Tensor {
    let numel = shape.iter().product::<i64>() as usize;
    let tensor = Tensor::empty(shape, (T::KIND, Device::Cpu));
    if numel > 0 {
        // SAFETY: `empty` just allocated a contiguous CPU buffer of `numel` elements of kind T,
        // owned by `tensor` alone, which outlives this slice.
        let data = unsafe { std::slice::from_raw_parts_mut(tensor.data_ptr() as *mut T, numel) };
        fill(data);
    }
    tensor
}

/// Writes label values widened to the contract's i64.
fn widen(label: &LabelMap, out: &mut [i64]) {
    for (o, &v) in out.iter_mut().zip(&label.data) {
        *o = v as i64;
    }
}

impl EpisodeBatch {
    /// Stacks and normalises episodes that share one image size and shot.
    pub fn from_episodes(episodes: &[Episode]) -> EpisodeBatch {
        let first = &episodes[0].query;
        let (h, w) = (first.image.height, first.image.width);
        let (b, k) = (episodes.len(), episodes[0].supports.len());
        let plane = h * w;
        let (bi, ki, hi, wi) = (b as i64, k as i64, h as i64, w as i64);
        let supports = || episodes.iter().flat_map(|e| &e.supports);
        EpisodeBatch {
            query_image: cpu_tensor(&[bi, 3, hi, wi], |out| {
                for (e, chunk) in episodes.iter().zip(out.chunks_exact_mut(3 * plane)) {
                    normalise_into(&e.query.image, chunk);
                }
            }),
            query_label: cpu_tensor(&[bi, hi, wi], |out| {
                for (e, chunk) in episodes.iter().zip(out.chunks_exact_mut(plane)) {
                    widen(&e.query.label, chunk);
                }
            }),
            support_images: cpu_tensor(&[bi, ki, 3, hi, wi], |out| {
                for (s, chunk) in supports().zip(out.chunks_exact_mut(3 * plane)) {
                    normalise_into(&s.image, chunk);
                }
            }),
            support_labels: cpu_tensor(&[bi, ki, hi, wi], |out| {
                for (s, chunk) in supports().zip(out.chunks_exact_mut(plane)) {
                    widen(&s.label, chunk);
                }
            }),
            class_ids: episodes.iter().map(|e| e.class_id).collect(),
            original_labels: episodes
                .iter()
                .filter_map(|e| e.original_label.as_ref())
                .map(|l| cpu_tensor(&[l.height as i64, l.width as i64], |out| widen(l, out)))
                .collect(),
            query_paths: episodes.iter().map(|e| e.query.path.clone()).collect(),
            support_paths: episodes
                .iter()
                .map(|e| e.supports.iter().map(|s| s.path.clone()).collect())
                .collect(),
            episode_indices: episodes.iter().map(|e| e.index).collect(),
        }
    }
}

/// A built batch, how many of its episodes had to be replaced, and the last failure's message.
struct Built {
    batch: EpisodeBatch,
    replaced: u64,
    last_failure: Option<String>,
}

impl Built {
    /// The batch's tensors copied to host memory pinned for `device` (a CUDA device).
    fn pinned(mut self, device: tch::Device) -> Built {
        let batch = &mut self.batch;
        for tensor in [
            &mut batch.query_image,
            &mut batch.query_label,
            &mut batch.support_images,
            &mut batch.support_labels,
        ] {
            *tensor = tensor.pin_memory(device);
        }
        for label in &mut batch.original_labels {
            *label = label.pin_memory(device);
        }
        self
    }
}

/// Builds episode `index`, replacing it while its files fail to load; `last_failure` receives the
/// message of the last failed attempt.
fn build_episode(
    dataset: &FewShotDataset,
    sampler: &mut EpisodeSampler,
    index: u64,
    last_failure: &mut Option<String>,
) -> Result<Episode, DataError> {
    for attempt in 0..MAX_ATTEMPTS {
        match dataset.load_episode(sampler.draw(index, attempt)) {
            Ok(episode) => return Ok(episode),
            Err(e) if e.is_bad_file() => {
                tracing::warn!(
                    "episode {index} (attempt {attempt}): {e}; replaced by the next query"
                );
                *last_failure = Some(e.to_string());
            }
            Err(e) => return Err(e),
        }
    }
    Err(DataError::EpisodeFailed {
        index,
        attempts: MAX_ATTEMPTS as usize,
        last: last_failure.clone().unwrap_or_default(),
    })
}

/// Which batches workers may claim: `next_claim < consumed + window`, until `stopped`.
///
/// The stop flag lives under the same lock as the claim state, so a worker that checks it and then
/// waits cannot miss the wake-up of a stop raised in between: a lost wake-up would leave `join()`
/// blocked for ever when a loader is dropped early.
struct Window {
    next_claim: u64,
    consumed: u64,
    stopped: bool,
}

struct Shared {
    window: Mutex<Window>,
    changed: Condvar,
}

/// Iterator over batched episodes `episodes` of a dataset, built by worker threads; see the module
/// documentation. The last batch is smaller when the range is not a multiple of the batch size.
pub struct EpisodeLoader {
    shared: Arc<Shared>,
    results: Option<Receiver<(u64, Result<Built, DataError>)>>,
    pending: BTreeMap<u64, Result<Built, DataError>>,
    next_batch: u64,
    batches: u64,
    workers: Vec<JoinHandle<()>>,
    episodes_done: u64,
    failed: u64,
    finished: bool,
}

impl EpisodeLoader {
    /// Starts `workers` threads building `episodes` (each a pure function of (seed, index)) in
    /// batches of `batch_size`.
    pub fn new(
        dataset: Arc<FewShotDataset>,
        seed: u64,
        episodes: Range<u64>,
        batch_size: usize,
        workers: usize,
    ) -> EpisodeLoader {
        Self::for_device(
            dataset,
            seed,
            episodes,
            batch_size,
            workers,
            tch::Device::Cpu,
        )
    }

    /// [`EpisodeLoader::new`] for a model on `device`: for CUDA, the workers put each batch's
    /// tensors in pinned (page-locked) host memory, so that the step's non-blocking copies to the
    /// device overlap with computation (issue 14).
    pub fn for_device(
        dataset: Arc<FewShotDataset>,
        seed: u64,
        episodes: Range<u64>,
        batch_size: usize,
        workers: usize,
        device: tch::Device,
    ) -> EpisodeLoader {
        let pin = device.is_cuda().then_some(device);
        assert!(batch_size > 0, "batch_size must be at least 1");
        let workers = workers.max(1);
        let batch = batch_size as u64;
        let batches = (episodes.end.saturating_sub(episodes.start)).div_ceil(batch);
        let shared = Arc::new(Shared {
            window: Mutex::new(Window {
                next_claim: 0,
                consumed: 0,
                stopped: false,
            }),
            changed: Condvar::new(),
        });
        let (sender, receiver) = channel();
        let window = PREFETCH_PER_WORKER * workers as u64;
        let handles = (0..workers)
            .map(|w| {
                let (dataset, shared, sender): (_, _, Sender<_>) =
                    (dataset.clone(), shared.clone(), sender.clone());
                let range = episodes.clone();
                std::thread::Builder::new()
                    .name(format!("episode-loader-{w}"))
                    .spawn(move || {
                        let mut sampler = EpisodeSampler::new(&dataset, seed);
                        while let Some(b) = claim(&shared, window, batches) {
                            let start = range.start + b * batch;
                            let indices = start..(start + batch).min(range.end);
                            let built =
                                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                    build_batch(&dataset, &mut sampler, indices)
                                }))
                                .unwrap_or_else(|panic| {
                                    Err(DataError::WorkerPanicked {
                                        message: panic_message(&*panic),
                                    })
                                });
                            let built = match built {
                                Ok(built) => Ok(match pin {
                                    Some(device) => built.pinned(device),
                                    None => built,
                                }),
                                other => other,
                            };
                            if sender.send((b, built)).is_err() {
                                return;
                            }
                        }
                    })
                    .expect("cannot spawn a loader thread")
            })
            .collect();
        EpisodeLoader {
            shared,
            results: Some(receiver),
            pending: BTreeMap::new(),
            next_batch: 0,
            batches,
            workers: handles,
            episodes_done: 0,
            failed: 0,
            finished: false,
        }
    }

    /// Episodes replaced because a file failed to load, so far.
    pub fn failed_episodes(&self) -> u64 {
        self.failed
    }

    fn stop(&mut self) {
        self.finished = true;
        // A poisoned lock means a worker panicked while holding it; the flag must still be raised.
        let mut window = self
            .shared
            .window
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        window.stopped = true;
        drop(window);
        self.shared.changed.notify_all();
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// The next batch number a worker may build, waiting while the window is full; `None` at the end.
fn claim(shared: &Shared, window: u64, batches: u64) -> Option<u64> {
    let mut state = shared.window.lock().expect("loader window lock");
    loop {
        if state.stopped || state.next_claim >= batches {
            return None;
        }
        if state.next_claim < state.consumed + window {
            state.next_claim += 1;
            return Some(state.next_claim - 1);
        }
        state = shared.changed.wait(state).expect("loader window lock");
    }
}

fn build_batch(
    dataset: &FewShotDataset,
    sampler: &mut EpisodeSampler,
    indices: Range<u64>,
) -> Result<Built, DataError> {
    let mut replaced = 0;
    let mut last_failure = None;
    let mut episodes = Vec::with_capacity(indices.clone().count());
    for index in indices {
        let mut failure = None;
        episodes.push(build_episode(dataset, sampler, index, &mut failure)?);
        if failure.is_some() {
            replaced += 1;
            last_failure = failure;
        }
    }
    Ok(Built {
        batch: EpisodeBatch::from_episodes(&episodes),
        replaced,
        last_failure,
    })
}

impl Iterator for EpisodeLoader {
    type Item = Result<EpisodeBatch, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.finished || self.next_batch >= self.batches {
            return None;
        }
        let result = loop {
            if let Some(result) = self.pending.remove(&self.next_batch) {
                break result;
            }
            match self
                .results
                .as_ref()
                .expect("receiver lives until drop")
                .recv()
            {
                Ok((b, result)) => {
                    self.pending.insert(b, result);
                }
                Err(_) => {
                    self.stop();
                    return Some(Err(DataError::WorkerPanicked {
                        message: "every loader worker stopped before the range was done".into(),
                    }));
                }
            }
        };
        self.next_batch += 1;
        self.shared
            .window
            .lock()
            .expect("loader window lock")
            .consumed = self.next_batch;
        self.shared.changed.notify_all();
        let built = match result {
            Ok(built) => built,
            Err(e) => {
                self.stop();
                return Some(Err(e));
            }
        };
        self.episodes_done += built.batch.episode_indices.len() as u64;
        if let Some(last) = &built.last_failure {
            self.failed += built.replaced;
            tracing::warn!(
                "{} of {} episodes replaced so far because of unreadable files",
                self.failed,
                self.episodes_done
            );
            if self.failed * 100 > self.episodes_done.max(MIN_FAILURE_BASE) {
                self.stop();
                return Some(Err(DataError::TooManyFailures {
                    failed: self.failed,
                    episodes: self.episodes_done,
                    last: last.clone(),
                }));
            }
        }
        Some(Ok(built.batch))
    }
}

impl Drop for EpisodeLoader {
    fn drop(&mut self) {
        self.stop();
        // Dropping the receiver makes a worker's next send fail, so none outlives the loader.
        self.results = None;
        for handle in self.workers.drain(..) {
            let _ = handle.join();
        }
    }
}
