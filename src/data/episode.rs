//! What an episode is: the split it comes from, its draw (which images, which class, the
//! augmentation stream) before any file is read, and the decoded, transformed result. Shared by
//! the dataset that loads episodes and the sampler that draws them.

use std::path::PathBuf;

use super::raster::{LabelMap, RgbImage};
use super::rng::EpisodeRng;

/// Training episodes (the fold's training classes, augmented) or validation episodes (its novel
/// classes, resized only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Val,
}

impl Split {
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
        }
    }
}

/// What one episode is made of, before any file is read.
#[derive(Debug, Clone)]
pub struct EpisodeDraw {
    pub index: u64,
    /// Query item (position in the dataset's query list).
    pub query: usize,
    pub class_id: usize,
    /// Support items, distinct and different from the query.
    pub supports: Vec<usize>,
    /// The rest of the episode's stream, for the augmentation.
    pub rng: EpisodeRng,
}

/// One transformed image of an episode, not yet normalised.
#[derive(Debug, Clone)]
pub struct EpisodeImage {
    pub path: PathBuf,
    pub image: RgbImage,
    /// Binarised: 1 = the episode's class, 0 = anything else, 255 = ignore.
    pub label: LabelMap,
}

/// A decoded, transformed episode.
#[derive(Debug, Clone)]
pub struct Episode {
    pub index: u64,
    pub class_id: usize,
    pub query: EpisodeImage,
    pub supports: Vec<EpisodeImage>,
    /// Validation only: the query's binarised label at its original size.
    pub original_label: Option<LabelMap>,
}
