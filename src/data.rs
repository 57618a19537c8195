//! Episodic PASCAL-5i / COCO-20i data: lists, class index, episode sampling, transforms, loader.
//!
//! The path of an episode: a list file ([`lists`]) names image/label pairs; the class index
//! ([`index`], cached on disk) records which classes each label holds; a [`FewShotDataset`] keeps the
//! fold's query images and per-class support lists ([`classes`]); the [`EpisodeSampler`] turns
//! (seed, episode index) into a query, a class and K supports; [`transform`] augments them; the
//! [`EpisodeLoader`] does all of it on worker threads and hands out batched tensors.
//! [`synth`] writes a small learnable dataset, [`prepare`] converts the downloaded PASCAL VOC + SBD or
//! COCO 2014 into that layout, [`check`] validates a dataset before training.

pub mod check;
pub mod classes;
pub mod dataset;
pub mod episode;
pub mod index;
pub mod lists;
pub mod loader;
pub mod prepare;
pub mod raster;
pub mod rng;
pub mod sampler;
pub mod segmentation;
pub mod synth;
pub mod transform;

use std::path::{Path, PathBuf};

pub use classes::FoldClasses;
pub use dataset::{write_bam_fold_lists, ExportedLists, FewShotDataset};
pub use episode::{Episode, EpisodeDraw, EpisodeImage, Split};
pub use loader::{EpisodeBatch, EpisodeLoader};
pub use sampler::EpisodeSampler;
pub use transform::IGNORE_LABEL;

/// Why data could not be read or an episode not built. Every variant names the file and the fix.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read list file {path}: {source}; check `{key}` in the config")]
    ListRead {
        path: PathBuf,
        key: &'static str,
        source: std::io::Error,
    },
    #[error(
        "data_root {data_root} is not a folder, and list {list} names files relative to it; \
         set `data_root` in the config (or --set data_root=DIR) to the dataset's folder"
    )]
    DataRoot { data_root: PathBuf, list: PathBuf },
    #[error(
        "list file {list} holds absolute paths of which none exists here (e.g. {example}): it was \
         written on another machine, as BAM's shipped lists are, with their authors' data_root in \
         every path; make the paths relative to `data_root` by stripping that folder{}",
        strip_command(.list, .prefix.as_deref())
    )]
    ForeignPaths {
        list: PathBuf,
        example: PathBuf,
        /// The folder common to every path, when deeper than the root.
        prefix: Option<PathBuf>,
    },
    #[error("list file {path}, line {line}: {message}")]
    ListLine {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("cannot read {path}: {message}")]
    Unreadable { path: PathBuf, message: String },
    #[error("label {path} {message}")]
    BadLabel { path: PathBuf, message: String },
    #[error(
        "size mismatch: image {image} is {}x{} but its label {label} is {}x{} (width x height); \
         an image and its label must have the same size",
        .image_size.1, .image_size.0, .label_size.1, .label_size.0
    )]
    SizeMismatch {
        image: PathBuf,
        label: PathBuf,
        /// (height, width), as [`raster::read_image_size`] returns it.
        image_size: (usize, usize),
        label_size: (usize, usize),
    },
    #[error(
        "class {class} has {found} eligible image(s) (at least {min_pixels} pixels of the class) in \
         {list}, but {split} episodes with shot {shot} need {needed} (K supports besides the \
         query); add images of the class to the list, lower `shot`, or choose another `split`"
    )]
    TooFewImages {
        class: usize,
        found: usize,
        needed: usize,
        min_pixels: u32,
        list: PathBuf,
        split: &'static str,
        shot: usize,
    },
    #[error(
        "episode {index}: {attempts} attempts failed to load, the last with: {last}; \
         run `svf-data check` on the config to find the bad files"
    )]
    EpisodeFailed {
        index: u64,
        attempts: usize,
        last: String,
    },
    #[error(
        "{failed} of {episodes} episodes failed to load (more than 1%), the last with: {last}; \
         run `svf-data check` on the config to find the bad files"
    )]
    TooManyFailures {
        failed: u64,
        episodes: u64,
        last: String,
    },
    #[error("a loader worker panicked: {message}")]
    WorkerPanicked { message: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// `, e.g. `sed …`` removing `prefix` from every path of `list`, as the README advises.
fn strip_command(list: &Path, prefix: Option<&Path>) -> String {
    prefix.map_or(String::new(), |prefix| {
        format!(
            ", e.g. `sed -i 's|{}/||g' {}`",
            prefix.display(),
            list.display()
        )
    })
}

impl DataError {
    /// Errors of one file (unreadable, malformed, mismatched) that a replacement episode avoids.
    pub fn is_bad_file(&self) -> bool {
        matches!(
            self,
            DataError::Unreadable { .. }
                | DataError::BadLabel { .. }
                | DataError::SizeMismatch { .. }
        )
    }
}
