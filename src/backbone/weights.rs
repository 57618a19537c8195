//! Pretrained backbone weights: PSPNet / torchvision / PFENet names mapped to PFENet's, full-rank
//! or already decomposed, checked strictly against the configured backbone.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use tch::{nn, Device, Tensor};

use super::vgg::FEATURE_STARTS;
use super::{Backbone, BackboneError, Init};
use crate::config::Config;
use crate::svf::{self, DecompositionReport, SvfOptions};

/// PSPNet's stem module names and their positions in PFENet's `layer0`.
const PSPNET_STEM: [(&str, usize); 6] = [
    ("conv1", 0),
    ("bn1", 1),
    ("conv2", 3),
    ("bn2", 4),
    ("conv3", 6),
    ("bn3", 7),
];

/// Classifier heads of the ImageNet checkpoints, which the backbone does not use.
const CLASSIFIERS: [&str; 2] = ["fc", "classifier"];

/// How the weights in a file differ from the backbone's variables.
#[derive(Debug, Default)]
pub struct WeightMismatch {
    /// Backbone variables the file lacks.
    pub missing: Vec<String>,
    /// File entries the backbone has no variable for.
    pub unexpected: Vec<String>,
    /// `(name, shape in the file, shape in the model)`.
    pub shape_mismatches: Vec<(String, Vec<i64>, Vec<i64>)>,
}

/// At most this many names of each kind in a message; the counts are always complete.
const NAMES_SHOWN: usize = 40;

fn write_names(f: &mut fmt::Formatter<'_>, what: &str, names: &[String]) -> fmt::Result {
    if names.is_empty() {
        return Ok(());
    }
    let shown = names[..names.len().min(NAMES_SHOWN)].join(", ");
    write!(f, "; {what} ({}): {shown}", names.len())?;
    if names.len() > NAMES_SHOWN {
        write!(f, ", ... and {} more", names.len() - NAMES_SHOWN)?;
    }
    Ok(())
}

impl fmt::Display for WeightMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_names(f, "missing", &self.missing)?;
        write_names(f, "unexpected", &self.unexpected)?;
        let shapes: Vec<String> = self
            .shape_mismatches
            .iter()
            .map(|(name, file, model)| format!("{name} file {file:?} vs model {model:?}"))
            .collect();
        write_names(f, "shape mismatches", &shapes)
    }
}

impl WeightMismatch {
    /// Compares `given` with the `expected` variables; `None` when they match. Expected names for
    /// which `optional` holds may be absent.
    pub(crate) fn between(
        expected: &HashMap<String, Tensor>,
        given: &HashMap<String, Tensor>,
        optional: impl Fn(&str) -> bool,
    ) -> Option<WeightMismatch> {
        let mut mismatch = WeightMismatch::default();
        for (name, var) in expected {
            match given.get(name) {
                None if optional(name) => {}
                None => mismatch.missing.push(name.clone()),
                Some(t) if t.size() != var.size() => {
                    mismatch
                        .shape_mismatches
                        .push((name.clone(), t.size(), var.size()))
                }
                Some(_) => {}
            }
        }
        mismatch.unexpected = given
            .keys()
            .filter(|n| !expected.contains_key(*n))
            .cloned()
            .collect();
        mismatch.missing.sort();
        mismatch.unexpected.sort();
        mismatch.shape_mismatches.sort();
        let clean = mismatch.missing.is_empty()
            && mismatch.unexpected.is_empty()
            && mismatch.shape_mismatches.is_empty();
        (!clean).then_some(mismatch)
    }
}

/// BatchNorm's `num_batches_tracked`, which old PyTorch checkpoints such as PSPNet's lack.
fn batch_counter(name: &str) -> bool {
    name.ends_with("num_batches_tracked")
}

/// PFENet's name of a checkpoint entry, `None` for entries the backbone does not use (the
/// ImageNet classifier). PSPNet's stem (`conv1`, `bn1`, ...) moves into `layer0`; torchvision's
/// VGG `features.N` into the stage holding index N; other names are kept.
fn pfenet_name(name: &str) -> Option<String> {
    let (head, rest) = name.split_once('.').unwrap_or((name, ""));
    if CLASSIFIERS.contains(&head) {
        return None;
    }
    if let Some((_, position)) = PSPNET_STEM.iter().find(|(stem, _)| *stem == head) {
        return Some(format!("layer0.{position}.{rest}"));
    }
    if head == "features" {
        let (index, leaf) = rest.split_once('.').unwrap_or((rest, ""));
        if let Ok(index) = index.parse::<usize>() {
            if let Some(stage) = (0..5).find(|&s| index < FEATURE_STARTS[s + 1]) {
                let position = index - FEATURE_STARTS[stage];
                return Some(format!("layer{stage}.{position}.{leaf}"));
            }
        }
    }
    Some(name.to_string())
}

/// Reads a safetensors file (refused, naming `origin`, when missing, damaged or not safetensors)
/// and maps its names to PFENet's.
pub fn read_backbone_weights(
    path: &Path,
    origin: &str,
) -> Result<HashMap<String, Tensor>, BackboneError> {
    let entries = crate::checkpoint::read_tensors(path, origin)?;
    Ok(entries
        .into_iter()
        .filter_map(|(name, t)| pfenet_name(&name).map(|n| (n, t)))
        .collect())
}

/// Writes a weight map as safetensors (names sorted so files are reproducible), atomically: a
/// reader, or a write that fails, never leaves half a file at `path`.
pub fn write_weights(weights: &HashMap<String, Tensor>, path: &Path) -> Result<(), BackboneError> {
    let mut entries: Vec<(String, Tensor)> = weights
        .iter()
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect();
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(crate::checkpoint::write_tensors_atomically(&entries, path)?)
}

/// The backbone's variables of `vs` (names under `layer0.`..`layer4.`: the backbone sits at the
/// var store's root, as in PFENet).
pub fn backbone_variables(vs: &nn::VarStore) -> HashMap<String, Tensor> {
    vs.variables()
        .into_iter()
        .filter(|(name, _)| (0..5).any(|i| name.starts_with(&format!("layer{i}."))))
        .collect()
}

/// Whether a weight map holds SVD factors.
fn is_decomposed(weights: &HashMap<String, Tensor>) -> bool {
    weights.keys().any(|n| n.ends_with("vector_S"))
}

/// A short description of the configured backbone, for messages.
fn describe(config: &Config) -> String {
    let arch = if config.vgg {
        "VGG16-BN".to_string()
    } else {
        format!("ResNet-{}", config.layers)
    };
    let form = if config.svf { "SVF" } else { "full-rank" };
    format!("{arch}, width {}, {form}", config.backbone_width)
}

/// What to do about weights that do not fit: when no config key can make `file` fit (a 7×7-stem
/// ResNet, a whole model), what file to give instead; else the keys that shape the backbone.
fn mismatch_advice(config: &Config, file: &HashMap<String, Tensor>) -> String {
    let stem_kernel = file
        .get("layer0.0.weight")
        .map(|t| t.size())
        .filter(|s| s.len() == 4)
        .map(|s| s[2]);
    if !config.vgg && stem_kernel == Some(7) {
        return "the file's stem is a single 7x7 convolution (torchvision's ResNet), but this \
                project's ResNets are PSPNet's deep-stem ones (three 3x3 convolutions): use \
                PSPNet's resnet50_v2 / resnet101_v2 weights (torchvision names are accepted for \
                VGG only); see README \"Pretrained weights\""
            .to_string();
    }
    // Every backbone's variables live under its stages layer0..layer4 (ResNet's and VGG's alike);
    // other names, once the file's naming is mapped, are a model's head.
    let mut outside: Vec<&String> = file
        .keys()
        .filter(|n| !n.split('.').next().is_some_and(|m| m.starts_with("layer")))
        .collect();
    if !outside.is_empty() {
        outside.sort();
        return format!(
            "the file holds parameters outside the backbone (`{}`, ...): a whole trained model \
             goes under the config key `weight:`, not `backbone_weights:`",
            outside[0]
        );
    }
    "check the keys `layers`, `vgg`, `backbone_width` and `svf*`".to_string()
}

fn mismatch_error(
    path: &Path,
    config: &Config,
    file: &HashMap<String, Tensor>,
    mismatch: WeightMismatch,
) -> BackboneError {
    BackboneError::Mismatch {
        path: path.to_path_buf(),
        backbone: describe(config),
        advice: mismatch_advice(config, file),
        mismatch: Box::new(mismatch),
    }
}

/// Checks a full-rank `file` against the full-rank form of the configured backbone, with the
/// file's own names (before any decomposition renames them), and the config's `svf_exclude` /
/// `svf_layer_ratios` prefixes against the backbone's convolutions.
fn check_full_rank_file(
    path: &Path,
    file: &HashMap<String, Tensor>,
    config: &Config,
) -> Result<(), BackboneError> {
    let vs = nn::VarStore::new(Device::Cpu);
    Backbone::full_rank_checked(&vs.root(), config, Init::Zeros)?;
    match WeightMismatch::between(&backbone_variables(&vs), file, batch_counter) {
        Some(mismatch) => {
            let full_rank = Config {
                svf: false,
                ..config.clone()
            };
            Err(mismatch_error(path, &full_rank, file, mismatch))
        }
        None => Ok(()),
    }
}

/// Refuses a decomposed `file` for a full-rank backbone when some of its layers keep fewer
/// singular values than their full rank: recomposed, those layers are not the pretrained weights
/// (the reference's rank rule truncates the stem conv, rank 27, to 24), and a full-rank baseline
/// started from them would be silently off.
fn check_not_truncated(path: &Path, file: &HashMap<String, Tensor>) -> Result<(), BackboneError> {
    let truncated: Vec<String> = DecompositionReport::describe(file, true)
        .layers
        .iter()
        .filter(|l| l.rank < l.full_rank)
        .map(|l| format!("{}: rank {} of {}", l.name, l.rank, l.full_rank))
        .collect();
    if truncated.is_empty() {
        return Ok(());
    }
    let shown = truncated.len().min(NAMES_SHOWN);
    let mut layers = truncated[..shown].join(", ");
    if truncated.len() > shown {
        layers.push_str(&format!(", ... and {} more", truncated.len() - shown));
    }
    Err(BackboneError::TruncatedFactors {
        path: path.to_path_buf(),
        layers,
    })
}

/// Copies pretrained backbone weights (PSPNet or PFENet names, full-rank or already decomposed) from a
/// safetensors file into the backbone's variables of `vs`, decomposing when the model is SVF. Strict.
/// A decomposed file is recomposed for a full-rank model only when no layer's rank is truncated.
pub fn load_pretrained(
    vs: &nn::VarStore,
    path: &Path,
    config: &Config,
) -> Result<DecompositionReport, BackboneError> {
    // Decompose where the model lives: on a GPU the SVDs are much faster.
    let file: HashMap<String, Tensor> =
        read_backbone_weights(path, "config key `backbone_weights`")?
            .into_iter()
            .map(|(n, t)| (n, t.to_device(vs.device())))
            .collect();
    let (weights, report) = match (is_decomposed(&file), config.svf) {
        (false, true) => {
            check_full_rank_file(path, &file, config)?;
            svf::decompose_weights(&file, &SvfOptions::from_config(config))
        }
        (true, false) => {
            check_not_truncated(path, &file)?;
            let full = svf::recompose(&file);
            let report = DecompositionReport::describe(&full, false);
            (full, report)
        }
        _ => {
            let report = DecompositionReport::describe(&file, config.svf);
            (file, report)
        }
    };
    let variables = backbone_variables(vs);
    if let Some(mismatch) = WeightMismatch::between(&variables, &weights, batch_counter) {
        return Err(mismatch_error(path, config, &weights, mismatch));
    }
    tch::no_grad(|| {
        for (name, var) in &variables {
            if let Some(value) = weights.get(name) {
                var.shallow_clone().copy_(&value.to_kind(var.kind()));
            }
        }
    });
    Ok(report)
}

/// Whether `a` and `b` name the same existing file (through links or other spellings too).
fn same_file(a: &Path, b: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        match (std::fs::metadata(a), std::fs::metadata(b)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        }
    }
    #[cfg(not(unix))]
    {
        matches!((a.canonicalize(), b.canonicalize()), (Ok(a), Ok(b)) if a == b)
    }
}

/// Refuses an `output` that is the `input` file, and an existing `output` unless `overwrite`.
fn check_output(input: &Path, output: &Path, overwrite: bool) -> Result<(), BackboneError> {
    if same_file(input, output) {
        return Err(BackboneError::OutputIsInput {
            out: output.to_path_buf(),
            input: input.to_path_buf(),
        });
    }
    if !overwrite && std::fs::symlink_metadata(output).is_ok() {
        return Err(BackboneError::OutputExists(output.to_path_buf()));
    }
    Ok(())
}

/// Decomposes a full-rank backbone file (`svf-decompose`): checks it strictly against the full-rank
/// form of the configured backbone (and the `svf_*` prefixes against its convolutions), decomposes
/// with the config's `svf_*` options on `device` and writes the decomposed weights (PFENet names)
/// to `output`, atomically. `output` may not be `input`, nor exist unless `overwrite`.
pub fn decompose_pretrained(
    input: &Path,
    output: &Path,
    overwrite: bool,
    config: &Config,
    device: Device,
) -> Result<DecompositionReport, BackboneError> {
    check_output(input, output, overwrite)?;
    let weights: HashMap<String, Tensor> = read_backbone_weights(input, "--weights")?
        .into_iter()
        .map(|(n, t)| (n, t.to_device(device)))
        .collect();
    if is_decomposed(&weights) {
        return Err(BackboneError::AlreadyDecomposed {
            path: input.to_path_buf(),
        });
    }
    check_full_rank_file(input, &weights, config)?;
    let (decomposed, report) = svf::decompose_weights(&weights, &SvfOptions::from_config(config));
    write_weights(&decomposed, output)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pspnet_torchvision_and_pfenet_names_map_to_pfenet() {
        let cases = [
            ("conv1.weight", Some("layer0.0.weight")),
            ("bn1.running_mean", Some("layer0.1.running_mean")),
            ("conv2.weight", Some("layer0.3.weight")),
            ("bn2.bias", Some("layer0.4.bias")),
            ("conv3.weight", Some("layer0.6.weight")),
            (
                "bn3.num_batches_tracked",
                Some("layer0.7.num_batches_tracked"),
            ),
            ("conv1.conv_U.weight", Some("layer0.0.conv_U.weight")),
            ("layer1.0.conv1.weight", Some("layer1.0.conv1.weight")),
            ("layer0.3.weight", Some("layer0.3.weight")),
            ("fc.weight", None),
            ("classifier.6.bias", None),
            ("features.0.weight", Some("layer0.0.weight")),
            ("features.8.running_var", Some("layer1.1.running_var")),
            ("features.14.weight", Some("layer2.0.weight")),
            ("features.41.weight", Some("layer4.7.weight")),
            ("something.else", Some("something.else")),
        ];
        for (name, expected) in cases {
            assert_eq!(pfenet_name(name).as_deref(), expected, "{name}");
        }
    }
}
