//! Few-shot semantic segmentation with Singular Value Fine-tuning (SVF) on libtorch.
//!
//! The pipeline, one module per concept: [`config`] → [`data`] → [`backbone`] + [`svf`] →
//! [`model`] (PFENet head) → [`train`] / [`eval`] (+ [`metrics`]). Binaries under `src/bin/` only
//! parse arguments and call into here.

pub mod amp;
pub mod backbone;
pub mod bench;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod data;
pub mod device;
pub mod dir_lock;
pub mod eval;
pub mod inference;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod plot;
pub mod predict;
pub mod report;
pub mod results;
pub mod svf;
pub mod train;
pub mod visual;
