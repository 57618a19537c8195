//! Running a trained model for inference, shared by `svf-eval`, the validation inside `svf-train`,
//! `svf-predict` and `svf-bench`: which file `--weights` names, loading it, folding SVD convolutions
//! back into full-rank ones, the inference forward pass, and the comparison at the original label
//! resolution.

use std::path::{Path, PathBuf};

use tch::{nn, Device, Kind, Tensor};

use crate::amp;
use crate::backbone::Init;
use crate::checkpoint::{self, CheckpointError, CheckpointFiles};
use crate::config::{Config, ConfigRecord};
use crate::data::IGNORE_LABEL;
use crate::model::{FewShotModel, ModelError};

/// Why a model could not be loaded for inference.
#[derive(Debug, thiserror::Error)]
pub enum InferenceError {
    #[error("no weights in {dir}: neither {best} nor {last} exists; pass the checkpoint file to --weights")]
    NoWeights {
        dir: PathBuf,
        best: PathBuf,
        last: PathBuf,
    },
    #[error("{weights} was trained with `{key}: {trained}` ({config}) but this evaluation has `{key}: {evaluated}`: its novel classes were training classes; evaluate under the training setting (--set {key}={trained}), or give weights trained with `{key}: {evaluated}`")]
    OtherSetting {
        weights: PathBuf,
        config: PathBuf,
        key: &'static str,
        trained: String,
        evaluated: String,
    },
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
}

/// The logits `[B, 2, H, W]` of `model` for inference (svf-eval, validation, svf-predict): eval
/// mode, no autograd, under the config's `amp`, returned in float32 for the metrics.
pub fn inference_logits(
    model: &FewShotModel,
    config: &Config,
    query: &Tensor,
    supports: &Tensor,
    support_labels: &Tensor,
) -> Tensor {
    tch::no_grad(|| {
        amp::autocast(config, query.device(), || {
            model.logits(query, supports, support_labels)
        })
        .to_kind(Kind::Float)
    })
}

/// The weights file `--weights` names: a file as is; a run directory's `best` checkpoint, else its
/// `last`.
pub fn resolve_weights(path: &Path) -> Result<PathBuf, InferenceError> {
    if !path.is_dir() {
        return Ok(path.to_path_buf());
    }
    let best = CheckpointFiles::new(path, checkpoint::BEST).weights;
    let last = CheckpointFiles::new(path, checkpoint::LAST).weights;
    if best.is_file() {
        Ok(best)
    } else if last.is_file() {
        Ok(last)
    } else {
        Err(InferenceError::NoWeights {
            dir: path.to_path_buf(),
            best,
            last,
        })
    }
}

/// Refuses to evaluate `weights` under another fold or dataset than they were trained on: a fold's
/// novel classes are other folds' training classes, so such a score looks fine and means nothing.
/// What they were trained on is the config their checkpoint recorded (`<name>.json`'s `config`,
/// which a later edit of config.yaml does not change), else their run's `config.yaml` beside them;
/// weights with neither are not checked.
pub fn check_trained_for(config: &Config, weights: &Path) -> Result<(), InferenceError> {
    let Some((trained, source)) = trained_config(weights) else {
        return Ok(());
    };
    let keys = [
        ("split", trained.split.to_string(), config.split.to_string()),
        (
            "use_coco",
            trained.use_coco.to_string(),
            config.use_coco.to_string(),
        ),
        (
            "use_split_coco",
            trained.use_split_coco.to_string(),
            config.use_split_coco.to_string(),
        ),
    ];
    match keys.into_iter().find(|(_, t, e)| t != e) {
        Some((key, trained, evaluated)) => Err(InferenceError::OtherSetting {
            weights: weights.to_path_buf(),
            config: source,
            key,
            trained,
            evaluated,
        }),
        None => Ok(()),
    }
}

/// The config `weights` were trained with and the file that says so (see [`check_trained_for`]).
/// One that this version cannot read (an older run's, say) leaves the check undone, said.
fn trained_config(weights: &Path) -> Option<(Config, PathBuf)> {
    let unchecked = |source: &Path, e: &dyn std::fmt::Display| {
        tracing::warn!(
            "fold of {} not checked: {}: {e}",
            weights.display(),
            source.display()
        );
        None
    };
    // The checkpoint's metadata, when it has a config record (not one from before configs were
    // recorded, nor some other JSON file beside a user's weights).
    let recorded = CheckpointFiles::of_weights(weights).and_then(|files| {
        let text = std::fs::read_to_string(&files.state).ok()?;
        let mut meta = serde_json::from_str::<serde_json::Value>(&text).ok()?;
        Some((meta.get_mut("config")?.take(), files.state))
    });
    if let Some((recorded, record)) = recorded {
        return match serde_json::from_value::<ConfigRecord>(recorded)
            .map_err(|e| e.to_string())
            .and_then(|recorded| recorded.to_config())
        {
            Ok(trained) => Some((trained, record)),
            Err(e) => unchecked(&record, &e),
        };
    }
    let run_config = weights
        .parent()
        .unwrap_or(Path::new("."))
        .join("config.yaml");
    if !run_config.exists() {
        return None;
    }
    match Config::load(&run_config, &[]) {
        Ok(trained) => Some((trained, run_config)),
        Err(e) => unchecked(&run_config, &e),
    }
}

/// A model for inference with the weights of `weights` (a checkpoint or any state dict of the
/// config's model, strictly matched; for BAM also BAM's released naming), which `--weights` named. With `fuse` and an SVF
/// config, the model is [`fuse`]d.
pub fn load_model(
    config: &Config,
    weights: &Path,
    device: Device,
    fuse: bool,
) -> Result<(nn::VarStore, FewShotModel), InferenceError> {
    let vs = nn::VarStore::new(device);
    let model = FewShotModel::new(&vs.root(), config, Init::Zeros)?;
    model.load_weights(&vs, weights, config.svf, "--weights")?;
    if fuse && config.svf {
        Ok(self::fuse(&vs, config)?)
    } else {
        for_inference(&vs);
        Ok((vs, model))
    }
}

/// Lays an inference model's variables out for the CPU's convolutions
/// ([`crate::model::channels_last_on_cpu`]) and freezes them all: nothing trains it, and frozen
/// convolutions run with their weights prepacked for oneDNN on the CPU.
fn for_inference(vs: &nn::VarStore) {
    crate::model::channels_last_on_cpu(vs, |_| true);
    let _ = crate::model::freeze_all_but(vs, |_| false);
}

/// The SVF model held in `vs` with its SVD convolutions folded back into full-rank weights
/// (`svf::recompose`), built full-rank on the same device: the same function, one convolution
/// per layer instead of two, for inference (frozen, channels-last on the CPU). For BAM+SVF the meta
/// branch's copy is folded; the base learner is full-rank already.
pub fn fuse(
    vs: &nn::VarStore,
    config: &Config,
) -> Result<(nn::VarStore, FewShotModel), ModelError> {
    let full: Vec<(String, Tensor)> = crate::svf::recompose(&vs.variables()).into_iter().collect();
    let fused_vs = nn::VarStore::new(vs.device());
    let fused = FewShotModel::fused(&fused_vs.root(), config)?;
    crate::model::copy_into(&fused_vs, &full, Path::new("the recomposed model"))
        .expect("recomposing an SVF model gives exactly the full-rank model's variables");
    for_inference(&fused_vs);
    Ok((fused_vs, fused))
}

/// Prediction and target at the original label resolution, as PFENet/BAM's `ori_resize` compares
/// them: the binarised original label `[h,w]` is padded to a square of its longer side with 255
/// (bottom and right, where the validation canvas was padded), the logits `[2,S,S]` of the whole
/// canvas are bilinearly resized (align_corners = true) to that square, and argmax gives the
/// prediction. Returns `(prediction, target)`, both `[L,L]` i64 on the logits' device.
pub fn original_resolution(logits: &Tensor, original_label: &Tensor) -> (Tensor, Tensor) {
    let (h, w) = original_label.size2().expect("the original label is [h,w]");
    let side = h.max(w);
    let device = logits.device();
    let target = Tensor::full([side, side], i64::from(IGNORE_LABEL), (Kind::Int64, device));
    target
        .narrow(0, 0, h)
        .narrow(1, 0, w)
        .copy_(&original_label.to_device_(device, original_label.kind(), true, false));
    let prediction = logits
        .unsqueeze(0)
        .upsample_bilinear2d([side, side], true, None, None)
        .argmax(1, false)
        .squeeze_dim(0);
    (prediction, target)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::IoUAccumulator;

    #[test]
    fn perfect_prediction_scores_one_on_non_square_images() {
        // A 5x3 and a 2x7 original label; the network saw a 9x9 canvas with the image at the
        // top-left, scaled so that its longer side fills the canvas.
        let mut acc = IoUAccumulator::new(&[1, 2]);
        for (class, (h, w)) in [(1usize, (5i64, 3i64)), (2, (2, 7))] {
            let label = Tensor::zeros([h, w], (Kind::Int64, Device::Cpu));
            let _ = label.narrow(0, 0, h - 1).narrow(1, 1, w - 1).fill_(1);
            let _ = label.get(0).get(0).fill_(255);
            // Logits of a perfect network: the padded label upsampled to a canvas whose grid holds
            // the square's grid points exactly (side - 1 divides canvas - 1), so resizing back
            // recovers it.
            let side = h.max(w);
            let square = Tensor::zeros([side, side], (Kind::Int64, Device::Cpu));
            square
                .narrow(0, 0, h)
                .narrow(1, 0, w)
                .copy_(&label.clamp_max(1));
            let canvas = 4 * (side - 1) + 1;
            let fg = square
                .to_kind(Kind::Float)
                .view([1, 1, side, side])
                .upsample_bilinear2d([canvas, canvas], true, None, None)
                .squeeze_dim(0);
            let logits = Tensor::cat(&[-(&fg - 0.5), fg - 0.5], 0);
            assert_eq!(logits.size(), vec![2, canvas, canvas]);
            let (pred, target) = original_resolution(&logits, &label);
            assert_eq!(target.size(), vec![side, side]);
            assert_eq!(
                i64::try_from(target.eq(255).sum(Kind::Int64)).unwrap(),
                side * side - h * w + 1,
                "padding and the one ignored pixel are 255"
            );
            acc.add(&pred, &target, class);
        }
        assert!((acc.miou() - 1.0).abs() < 1e-9, "{}", acc.miou());
        assert!((acc.fb_iou() - 1.0).abs() < 1e-9, "{}", acc.fb_iou());
    }

    #[test]
    fn cpu_inference_models_are_channels_last_frozen_and_compute_the_same_logits() {
        let dir = std::env::temp_dir().join(format!("svf-inference-cl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let opts = (Kind::Float, Device::Cpu);
        for (method, svf) in [
            (crate::config::Method::Pfenet, true),
            (crate::config::Method::Pfenet, false),
            (crate::config::Method::Bam, true),
        ] {
            let config = Config {
                method,
                svf,
                layers: 18,
                backbone_width: 0.25,
                reduce_dim: 8,
                ppm_scales: vec![4, 2],
                ..Config::default()
            };
            tch::manual_seed(3);
            let vs = nn::VarStore::new(Device::Cpu);
            let reference = FewShotModel::new(&vs.root(), &config, Init::Random).unwrap();
            let path = dir.join("weights.safetensors");
            Tensor::write_safetensors(&crate::model::model_weights(&vs), &path).unwrap();
            // Tracking gradients, the reference runs libtorch's convolutions, BatchNorm folded in
            // the graph; the loaded models are frozen and run oneDNN's prepacked ones.
            for variable in vs.variables().into_values() {
                if variable.kind() == Kind::Float {
                    let _ = variable.set_requires_grad(true);
                }
            }
            let query = Tensor::randn([1, 3, 65, 65], opts);
            let supports = Tensor::randn([1, 1, 3, 65, 65], opts);
            let labels = Tensor::randint(2, [1, 1, 65, 65], (Kind::Int64, Device::Cpu));
            let expected = inference_logits(&reference, &config, &query, &supports, &labels);
            for fuse in [false, true] {
                let (loaded_vs, loaded) = load_model(&config, &path, Device::Cpu, fuse).unwrap();
                let convs: Vec<Tensor> = loaded_vs
                    .variables()
                    .into_values()
                    .filter(|v| v.dim() == 4 && v.size()[1] > 1 && v.size()[2] > 1)
                    .collect();
                assert!(!convs.is_empty());
                assert!(convs.iter().all(|v| v.stride()[1] == 1), "NHWC strides");
                assert!(loaded_vs.variables().values().all(|v| !v.requires_grad()));
                let logits = inference_logits(&loaded, &config, &query, &supports, &labels);
                let scale = expected.abs().max().double_value(&[]);
                let diff = (&logits - &expected).abs().max().double_value(&[]);
                assert!(
                    diff < 1e-5 * scale.max(1.0),
                    "{method:?} svf {svf} fuse {fuse}: {diff}"
                );
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn logits_are_resized_with_aligned_corners() {
        // Foreground scores 0 | 1 across a 2x2 canvas, resized to 4x4: aligned corners sample at
        // 0, 1/3, 2/3, 1 (half-pixel centres would give 0, 1/4, 3/4, 1), so a background score of
        // 0.3 leaves only the first column as background.
        let fg = Tensor::from_slice(&[0.0f32, 1.0, 0.0, 1.0]).view([1, 2, 2]);
        let logits = Tensor::cat(&[fg.full_like(0.3), fg], 0);
        let label = Tensor::zeros([4, 3], (Kind::Int64, Device::Cpu));
        let (pred, target) = original_resolution(&logits, &label);
        let pred = Vec::<Vec<i64>>::try_from(&pred).unwrap();
        assert_eq!(pred, vec![vec![0, 1, 1, 1]; 4]);
        let target = Vec::<Vec<i64>>::try_from(&target).unwrap();
        assert_eq!(target, vec![vec![0, 0, 0, 255]; 4]);
    }

    #[test]
    fn weights_are_refused_under_another_fold_than_they_were_trained_on() {
        let dir = std::env::temp_dir().join(format!("svf-inference-fold-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let weights = dir.join("best.safetensors");
        let trained = Config::default();
        // No config beside the weights: nothing to compare.
        assert!(check_trained_for(&trained, &weights).is_ok());
        std::fs::write(dir.join("config.yaml"), trained.to_yaml()).unwrap();
        assert!(check_trained_for(&trained, &weights).is_ok());
        let other_fold = Config {
            split: 1,
            ..Config::default()
        };
        let message = check_trained_for(&other_fold, &weights)
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("`split: 0`") && message.contains("`split: 1`"),
            "{message}"
        );
        assert!(message.contains("--set split=0"), "{message}");
        let coco = Config {
            use_coco: true,
            ..Config::default()
        };
        let message = check_trained_for(&coco, &weights).unwrap_err().to_string();
        assert!(message.contains("`use_coco: false`"), "{message}");
        // A run config this version cannot read leaves the check undone, not the evaluation.
        std::fs::write(dir.join("config.yaml"), "no_such_key: 1\n").unwrap();
        assert!(check_trained_for(&other_fold, &weights).is_ok());
        // The checkpoint's own record says what it was trained on, whatever config.yaml says now
        // (edited for a resume that was then refused, say).
        std::fs::write(dir.join("config.yaml"), other_fold.to_yaml()).unwrap();
        let meta = serde_json::json!({"iteration": 4, "config": ConfigRecord::of(&trained)});
        std::fs::write(dir.join("best.json"), meta.to_string()).unwrap();
        let message = check_trained_for(&other_fold, &weights)
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("`split: 0` (") && message.contains("best.json"),
            "{message}"
        );
        assert!(check_trained_for(&trained, &weights).is_ok());
        // Metadata without a record (an older checkpoint): config.yaml decides.
        std::fs::write(dir.join("best.json"), r#"{"iteration": 4}"#).unwrap();
        assert!(check_trained_for(&other_fold, &weights).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
