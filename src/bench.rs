//! Benchmarks: loader, train step, eval and decomposition throughput.

use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::config::Config;
use crate::data::{DataError, EpisodeLoader, FewShotDataset, Split};

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
