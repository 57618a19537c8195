//! Few-shot semantic segmentation with Singular Value Fine-tuning (SVF) on libtorch.
//!
//! The pipeline, one module per concept: [`config`] → [`data`] → [`backbone`] + [`svf`] →
//! [`model`] (PFENet head) → [`train`] / [`eval`] (+ [`metrics`]). Binaries under `src/bin/` only
//! parse arguments and call into here.

pub mod cli;
pub mod config;
pub mod device;
pub mod logging;
