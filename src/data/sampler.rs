//! Episode sampling: (seed, episode index) → query image, class, K supports, augmentation stream.
//!
//! Query order. Training walks the query list like a shuffled PyTorch `DataLoader`: episode
//! positions are cut into passes of N (the number of query images) and pass p visits the images in
//! a permutation drawn from (seed, p), so epoch e of E episodes is indices e·E..(e+1)·E and, when
//! E = N (the default), sees every image once. Validation visits the list in order (the reference's
//! `shuffle=False`), wrapping around. Everything else is drawn from the episode's own stream:
//! the class, uniform among the split's classes present in the query's label; K distinct supports
//! from that class's eligible images, never the query; then every augmentation choice.
//!
//! Replacement. When an episode cannot be loaded (a bad file), attempt r = 1, 2, ... of the same
//! index takes the query of position index + r (the next episode's) and draws from stream r, so the
//! substitute is itself a pure function of (seed, index).

use super::dataset::FewShotDataset;
use super::episode::{EpisodeDraw, Split};
use super::rng::EpisodeRng;

/// Stream tag of the per-pass query permutations (attempt numbers use 0, 1, ...).
const PERMUTATION_STREAM: u64 = u64::MAX;

/// Draws episodes of one dataset under one seed. Keeps the current pass's permutation, so a worker
/// walking consecutive indices shuffles once per pass.
pub struct EpisodeSampler<'a> {
    dataset: &'a FewShotDataset,
    seed: u64,
    permutation: Option<(u64, Vec<u32>)>,
}

impl<'a> EpisodeSampler<'a> {
    pub fn new(dataset: &'a FewShotDataset, seed: u64) -> EpisodeSampler<'a> {
        EpisodeSampler {
            dataset,
            seed,
            permutation: None,
        }
    }

    /// The query item of episode position `position`.
    fn query_at(&mut self, position: u64) -> usize {
        let n = self.dataset.query_count() as u64;
        let (pass, offset) = (position / n, (position % n) as usize);
        if self.dataset.split() == Split::Val {
            return offset;
        }
        if self.permutation.as_ref().is_none_or(|(p, _)| *p != pass) {
            let mut rng = EpisodeRng::new(self.seed, PERMUTATION_STREAM, pass);
            let mut order: Vec<u32> = (0..n as u32).collect();
            for i in (1..order.len()).rev() {
                order.swap(i, rng.below(i + 1));
            }
            self.permutation = Some((pass, order));
        }
        self.permutation.as_ref().expect("set above").1[offset] as usize
    }

    /// Episode `index`, or its replacement number `attempt` (0 = the episode itself).
    pub fn draw(&mut self, index: u64, attempt: u64) -> EpisodeDraw {
        let query = self.query_at(index + attempt);
        let mut rng = EpisodeRng::new(self.seed, attempt, index);
        let present = self.dataset.query_classes(query);
        let class_id = present[rng.below(present.len())];
        let candidates = self.dataset.support_list(class_id);
        // `open` guarantees shot + 1 eligible images per class, so K others than the query exist.
        let mut supports: Vec<usize> = Vec::with_capacity(self.dataset.shot());
        while supports.len() < self.dataset.shot() {
            let item = candidates[rng.below(candidates.len())];
            if item != query && !supports.contains(&item) {
                supports.push(item);
            }
        }
        EpisodeDraw {
            index,
            query,
            class_id,
            supports,
            rng,
        }
    }
}
