//! The few-shot model a config's `method` names (PFENet or BAM, each with or without SVF), as
//! training, validation, `svf-eval`, `svf-predict` and `svf-bench` use it: one type, so that
//! everything around the model (episodes, optimiser, checkpoints, metrics) is written once.

use std::path::Path;

use tch::{nn, Tensor};

use crate::backbone::Init;
use crate::config::{Config, Method};

use super::bam::{self, Bam};
use super::{ModelError, PfeNet};

/// PFENet or BAM (see [`crate::config::Method`]).
pub enum FewShotModel {
    // Boxed: the models are kilobytes of module handles.
    Pfenet(Box<PfeNet>),
    Bam(Box<Bam>),
}

impl FewShotModel {
    /// The model of `config` under `root`; `init` starts the backbones' convolutions
    /// ([`Init::Zeros`] when weights are loaded next).
    pub fn new(root: &nn::Path, config: &Config, init: Init) -> Result<FewShotModel, ModelError> {
        Ok(match config.method {
            Method::Pfenet => {
                FewShotModel::Pfenet(Box::new(PfeNet::with_backbone_init(root, config, init)?))
            }
            Method::Bam => FewShotModel::Bam(Box::new(Bam::new(root, config, init)?)),
        })
    }

    /// The inference model of an SVF `config`: every SVD convolution full-rank, as
    /// [`crate::svf::recompose`] names them, to be loaded next (see `inference::fuse`).
    pub fn fused(root: &nn::Path, config: &Config) -> Result<FewShotModel, ModelError> {
        Ok(match config.method {
            Method::Pfenet => {
                let full_rank = Config {
                    svf: false,
                    ..config.clone()
                };
                FewShotModel::Pfenet(Box::new(PfeNet::with_backbone_init(
                    root,
                    &full_rank,
                    Init::Zeros,
                )?))
            }
            Method::Bam => FewShotModel::Bam(Box::new(Bam::fused(root, config)?)),
        })
    }

    /// The training loss's two terms for a batch of episodes in training mode: PFENet's main
    /// cross-entropy and the mean of its bins'; BAM's ensemble cross-entropy and its meta
    /// learner's. `class_ids`: each episode's class (BAM leaves its base-learner channel out).
    pub fn loss_terms(
        &self,
        query: &Tensor,
        supports: &Tensor,
        support_labels: &Tensor,
        class_ids: &[usize],
        query_label: &Tensor,
    ) -> (Tensor, Tensor) {
        match self {
            FewShotModel::Pfenet(net) => {
                let out = net.forward(query, supports, support_labels, true);
                net.loss_terms(&out, query_label)
            }
            FewShotModel::Bam(net) => {
                let exclude = net.exclude_channels(class_ids, query.device());
                let out = net.forward(query, supports, support_labels, Some(&exclude), true);
                net.loss_terms(&out, query_label)
            }
        }
    }

    /// The prediction's logits `[B, 2, H, W]` in eval mode (no dropout); BAM's are the ensemble's.
    pub fn logits(&self, query: &Tensor, supports: &Tensor, support_labels: &Tensor) -> Tensor {
        match self {
            FewShotModel::Pfenet(net) => net.forward(query, supports, support_labels, false).logits,
            FewShotModel::Bam(net) => {
                net.forward(query, supports, support_labels, None, false)
                    .logits
            }
        }
    }

    /// Loads a whole-model weights file into `vs` (which holds this model), strictly. BAM also
    /// takes BAM's and the SVF authors' released checkpoints (after `scripts/convert_weights.py`),
    /// recognised by their names ([`bam::from_released_name`]). `origin` names where `path` came
    /// from (`--weights`, a config key) for the messages.
    pub fn load_weights(
        &self,
        vs: &nn::VarStore,
        path: &Path,
        svf: bool,
        origin: &str,
    ) -> Result<(), ModelError> {
        let weights = crate::checkpoint::read_tensors(path, origin)?;
        let weights = match self {
            FewShotModel::Bam(_) if bam::is_released_naming(&weights) => {
                tracing::info!("{}: BAM's released naming, mapped", path.display());
                weights
                    .into_iter()
                    .map(|(name, t)| (bam::from_released_name(&name, svf), t))
                    .collect()
            }
            _ => weights,
        };
        super::copy_into(vs, &weights, path)
    }
}
