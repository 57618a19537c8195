//! Singular Value Fine-tuning: SVD factorisation of convolution and linear weights.
//!
//! A full-rank weight `W` (`[out, in, kh, kw]` reshaped to `[out, in·kh·kw]`) is replaced by
//! `U[:, :r] · diag(S[:r]) · Vᵀ[:r]`, stored under the reference's names (`conv_U`, `conv_V`,
//! `vector_S`; `fc_U`, `fc_V`, `vector_S` for linear layers) so checkpoints stay interchangeable
//! with the PyTorch tool (`zechao-li/SVF-pytorch`). Only `vector_S` is fine-tuned.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use tch::{Kind, Tensor};

use crate::config::Config;

/// Backbone stages; a parameter under one of them belongs to the backbone.
const BACKBONE_STAGES: [&str; 5] = ["layer0.", "layer1.", "layer2.", "layer3.", "layer4."];

/// Whether a model parameter (full PyTorch name) is trained: backbone names (`layer0.`..`layer4.`)
/// only `vector_S` of layer2..4 when `svf_enabled`, never otherwise; every other name (the head) yes.
/// BatchNorm buffers are never trained.
pub fn is_trainable(name: &str, svf_enabled: bool) -> bool {
    if is_buffer(name) {
        return false;
    }
    match BACKBONE_STAGES.iter().position(|s| name.starts_with(s)) {
        None => true,
        // The reference freezes layer0 and layer1 entirely, even their singular values.
        Some(0 | 1) => false,
        Some(_) => svf_enabled && name.contains("vector_S"),
    }
}

/// Whether a state-dict entry is a BatchNorm buffer (statistics, not a parameter).
fn is_buffer(name: &str) -> bool {
    ["running_mean", "running_var", "num_batches_tracked"]
        .iter()
        .any(|b| name.ends_with(b))
}

/// The reference's rank rule: `floor(floor(full · ratio) / multiple) · multiple`, clamped to
/// `[1, full]`. With `multiple` 4 (the reference) a full rank that is not a multiple of 4 is
/// truncated: the stem conv 3→64 (full rank 27) keeps 24 singular values.
pub fn rank_rule(full_rank: i64, ratio: f64, multiple: usize) -> i64 {
    let multiple = multiple.max(1) as i64;
    let scaled = (full_rank as f64 * ratio).floor() as i64;
    (scaled / multiple * multiple).clamp(1, full_rank)
}

/// Which layers are decomposed and to what rank (the `svf_*` config keys).
#[derive(Debug, Clone, PartialEq)]
pub struct SvfOptions {
    /// Fraction of the full rank kept (the reference's `global_low_rank_ratio`).
    pub rank_ratio: f64,
    /// Rank rounded down to a multiple of this (4 = the reference, 1 = exact).
    pub rank_multiple: usize,
    /// Leave 1×1 convolutions (and linear layers, as the reference does) full-rank.
    pub skip_1x1: bool,
    /// Leave convolutions with a larger kernel full-rank.
    pub skip_3x3: bool,
    /// Layer-name prefixes left full-rank (`layer0.0` excludes that conv; `layer4` a whole stage).
    pub exclude: Vec<String>,
    /// Per-layer rank ratios by layer-name prefix; the longest matching prefix wins.
    pub layer_ratios: Vec<(String, f64)>,
}

impl Default for SvfOptions {
    /// The reference: every conv decomposed at full ratio, ranks rounded to multiples of 4.
    fn default() -> Self {
        SvfOptions {
            rank_ratio: 1.0,
            rank_multiple: 4,
            skip_1x1: false,
            skip_3x3: false,
            exclude: Vec::new(),
            layer_ratios: Vec::new(),
        }
    }
}

/// `prefix` names `name` itself or one of its ancestors (`layer1.1` matches `layer1.1.conv1`,
/// not `layer1.10.conv1`).
fn has_prefix(name: &str, prefix: &str) -> bool {
    let prefix = prefix.trim_end_matches('.');
    name == prefix || (name.starts_with(prefix) && name.as_bytes().get(prefix.len()) == Some(&b'.'))
}

impl SvfOptions {
    /// The options of the `svf_*` config keys.
    pub fn from_config(config: &Config) -> SvfOptions {
        SvfOptions {
            rank_ratio: config.svf_rank_ratio,
            rank_multiple: config.svf_rank_multiple,
            skip_1x1: config.svf_skip_1x1,
            skip_3x3: config.svf_skip_3x3,
            exclude: config.svf_exclude.clone(),
            layer_ratios: config
                .svf_layer_ratios
                .iter()
                .map(|(prefix, ratio)| (prefix.clone(), *ratio))
                .collect(),
        }
    }

    /// Checks that every `svf_exclude` and `svf_layer_ratios` prefix names at least one of
    /// `conv_names` (the backbone's convolutions): a misspelt prefix would otherwise change
    /// nothing, silently.
    pub fn check_prefixes(&self, conv_names: &[String]) -> Result<(), UnknownPrefix> {
        let prefixes = self.exclude.iter().map(|p| ("svf_exclude", p)).chain(
            self.layer_ratios
                .iter()
                .map(|(p, _)| ("svf_layer_ratios", p)),
        );
        for (key, prefix) in prefixes {
            if !conv_names.iter().any(|name| has_prefix(name, prefix)) {
                return Err(UnknownPrefix {
                    key,
                    prefix: prefix.clone(),
                    examples: conv_names.iter().take(3).cloned().collect(),
                });
            }
        }
        Ok(())
    }

    /// The rank layer `name` with weight shape `shape` (`[out, in, kh, kw]` or linear `[out, in]`)
    /// is decomposed to, or `None` when it stays full-rank.
    ///
    /// A weight `[out, 1, kh, kw]` with a kernel larger than 1×1 is taken for a depthwise conv and
    /// left alone, like the reference (which looks at the squeezed shape); other grouped convs
    /// must not be passed here (the backbones have none).
    pub fn rank_for(&self, name: &str, shape: &[i64]) -> Option<i64> {
        if self.exclude.iter().any(|p| has_prefix(name, p)) {
            return None;
        }
        let (is_1x1, full_rank) = match *shape {
            [out, inp] => (true, out.min(inp)),
            [out, inp, kh, kw] => {
                if inp == 1 && kh * kw > 1 {
                    return None;
                }
                (kh == 1 && kw == 1, out.min(inp * kh * kw))
            }
            _ => return None,
        };
        if (is_1x1 && self.skip_1x1) || (!is_1x1 && self.skip_3x3) {
            return None;
        }
        let ratio = self
            .layer_ratios
            .iter()
            .filter(|(prefix, _)| has_prefix(name, prefix))
            .max_by_key(|(prefix, _)| prefix.len())
            .map_or(self.rank_ratio, |(_, ratio)| *ratio);
        Some(rank_rule(full_rank, ratio, self.rank_multiple))
    }
}

/// A layer-name prefix of `svf_exclude` or `svf_layer_ratios` that names no convolution.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "config key `{key}`: `{prefix}` names no convolution of the backbone; prefixes are \
     PyTorch parameter names without `.weight`, such as {examples:?}, or a stage such as `layer4`"
)]
pub struct UnknownPrefix {
    pub key: &'static str,
    pub prefix: String,
    pub examples: Vec<String>,
}

/// A weight `W ≈ U · diag(S) · V` truncated to rank r, in the shapes the SVD layers store.
#[derive(Debug)]
pub struct SvdFactors {
    /// `conv_U.weight` `[out, r, 1, 1]` (conv) or `fc_U.weight` `[out, r]` (linear).
    pub u: Tensor,
    /// `vector_S` `[1, r, 1, 1]` (conv) or `[1, r]` (linear).
    pub s: Tensor,
    /// `conv_V.weight` `[r, in, kh, kw]` (conv) or `fc_V.weight` `[r, in]` (linear).
    pub v: Tensor,
}

/// Thin float32 SVD of `matrix` `[out, n]` truncated to `rank`: `(U [out,r], S [r], Vᵀ [r,n])`.
fn truncated_svd(matrix: &Tensor, rank: i64) -> (Tensor, Tensor, Tensor) {
    let (u, s, v) = matrix.to_kind(Kind::Float).svd(true, true);
    (
        u.narrow(1, 0, rank).contiguous(),
        s.narrow(0, 0, rank).contiguous(),
        v.narrow(1, 0, rank).tr().contiguous(),
    )
}

/// Decomposes a conv weight `[out, in, kh, kw]` to `rank` (the reference's `d_nsvd`).
pub fn decompose_conv(weight: &Tensor, rank: i64) -> SvdFactors {
    let shape = weight.size();
    let (out, rest) = (shape[0], shape[1..].to_vec());
    let (u, s, vt) = tch::no_grad(|| truncated_svd(&weight.reshape([out, -1]), rank));
    SvdFactors {
        u: u.reshape([out, rank, 1, 1]),
        s: s.reshape([1, rank, 1, 1]),
        v: vt.reshape([&[rank][..], &rest].concat()),
    }
}

/// Decomposes a linear weight `[out, in]` to `rank`: for weight files with linear layers
/// ([`decompose_weights`]); the backbones themselves have none.
pub fn decompose_linear(weight: &Tensor, rank: i64) -> SvdFactors {
    let (u, s, vt) = tch::no_grad(|| truncated_svd(weight, rank));
    SvdFactors {
        u,
        s: s.reshape([1, rank]),
        v: vt,
    }
}

/// `U · diag(S) · V` back in the original weight's shape (conv or linear factors).
pub fn compose(factors: &SvdFactors) -> Tensor {
    let v_shape = factors.v.size();
    let out = factors.u.size()[0];
    let rank = v_shape[0];
    let u_scaled = factors.u.reshape([out, rank]) * factors.s.reshape([1, rank]);
    let w = u_scaled.matmul(&factors.v.reshape([rank, -1]));
    w.reshape([&[out][..], &v_shape[1..]].concat())
}

/// `‖W − U·diag(S)·V‖_F / ‖W‖_F`.
fn relative_error(weight: &Tensor, factors: &SvdFactors) -> f64 {
    tch::no_grad(|| {
        let weight = weight.to_kind(Kind::Float);
        let diff = (&weight - compose(factors)).norm().double_value(&[]);
        diff / weight.norm().double_value(&[]).max(f64::MIN_POSITIVE)
    })
}

/// Stride, padding and dilation of a square convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGeometry {
    pub stride: i64,
    pub padding: i64,
    pub dilation: i64,
}

impl ConvGeometry {
    /// Stride 1, no padding, no dilation (the geometry of `conv_U`).
    pub const PLAIN: ConvGeometry = ConvGeometry {
        stride: 1,
        padding: 0,
        dilation: 1,
    };

    /// A full-rank convolution with this geometry.
    pub fn conv2d(&self, x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Tensor {
        x.conv2d(
            weight,
            bias,
            [self.stride],
            [self.padding],
            [self.dilation],
            1,
        )
    }
}

/// The SVD form of a convolution: `conv_U(conv_V(x) · vector_S)`. `conv_V` carries the original
/// stride, padding and dilation; `conv_U` is a plain 1×1 with the original bias.
#[derive(Debug)]
pub struct SvdConv2d {
    /// `conv_V.weight` `[r, in, kh, kw]`.
    pub conv_v: Tensor,
    /// `vector_S` `[1, r, 1, 1]`.
    pub vector_s: Tensor,
    /// `conv_U.weight` `[out, r, 1, 1]`.
    pub conv_u: Tensor,
    /// `conv_U.bias` `[out]`, the original conv's bias.
    pub conv_u_bias: Option<Tensor>,
    /// The original conv's geometry, applied by `conv_V`.
    pub geometry: ConvGeometry,
}

impl SvdConv2d {
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let h = self.geometry.conv2d(x, &self.conv_v, None);
        // `vector_S` in the activation's dtype (bf16 under autocast: GPU-NOTES 10), so the product
        // stays in that dtype; the gradient still reaches the float32 parameter.
        let h = &h * self.vector_s.to_kind(h.kind());
        ConvGeometry::PLAIN.conv2d(&h, &self.conv_u, self.conv_u_bias.as_ref())
    }
}

/// One decomposed layer in a [`DecompositionReport`].
#[derive(Debug, Clone, PartialEq)]
pub struct LayerDecomposition {
    /// Layer name (`layer2.0.conv1`).
    pub name: String,
    /// The full-rank weight's shape.
    pub shape: Vec<i64>,
    /// `min(out, in·kh·kw)`.
    pub full_rank: i64,
    /// Singular values kept.
    pub rank: i64,
    /// `‖W − U·diag(S)·V‖_F / ‖W‖_F`; `None` when the weights arrived already decomposed.
    pub relative_error: Option<f64>,
}

/// What a decomposition did: every decomposed layer and the parameter totals.
#[derive(Debug, Clone, PartialEq)]
pub struct DecompositionReport {
    /// Decomposed layers in name order.
    pub layers: Vec<LayerDecomposition>,
    /// Parameters (not BatchNorm statistics) of the decomposed weights.
    pub parameters: i64,
    /// Parameters of the same model with every layer full-rank.
    pub full_rank_parameters: i64,
    /// Parameters that SVF trains ([`is_trainable`] with SVF on).
    pub trainable_parameters: i64,
}

impl DecompositionReport {
    /// The report of weights that are already in their final form (decomposed or not): layers
    /// are read off the `vector_S` entries, without reconstruction errors.
    pub fn describe(weights: &HashMap<String, Tensor>, svf_enabled: bool) -> DecompositionReport {
        let mut layers = Vec::new();
        for (name, s) in weights {
            let Some(layer) = name.strip_suffix(".vector_S") else {
                continue;
            };
            let v_name = [".conv_V.weight", ".fc_V.weight"]
                .iter()
                .map(|suffix| format!("{layer}{suffix}"))
                .find(|n| weights.contains_key(n));
            let u_name = [".conv_U.weight", ".fc_U.weight"]
                .iter()
                .map(|suffix| format!("{layer}{suffix}"))
                .find(|n| weights.contains_key(n));
            let (Some(v_name), Some(u_name)) = (v_name, u_name) else {
                continue;
            };
            let (v, u) = (weights[&v_name].size(), weights[&u_name].size());
            let shape: Vec<i64> = [&[u[0]][..], &v[1..]].concat();
            layers.push(LayerDecomposition {
                name: layer.to_string(),
                full_rank: shape[0].min(shape[1..].iter().product()),
                shape,
                rank: s.size()[1],
                relative_error: None,
            });
        }
        layers.sort_by(|a, b| a.name.cmp(&b.name));
        Self::with_totals(layers, weights, svf_enabled)
    }

    fn with_totals(
        layers: Vec<LayerDecomposition>,
        weights: &HashMap<String, Tensor>,
        svf_enabled: bool,
    ) -> DecompositionReport {
        let parameters_of = |trainable_only: bool| -> i64 {
            weights
                .iter()
                .filter(|(name, _)| !is_buffer(name))
                .filter(|(name, _)| !trainable_only || is_trainable(name, svf_enabled))
                .map(|(_, t)| t.numel() as i64)
                .sum()
        };
        let parameters = parameters_of(false);
        let factor_parameters: i64 = layers
            .iter()
            .map(|l| l.rank * (l.shape[0] + 1 + l.shape[1..].iter().product::<i64>()))
            .sum();
        let full_weights: i64 = layers.iter().map(|l| l.shape.iter().product::<i64>()).sum();
        DecompositionReport {
            full_rank_parameters: parameters - factor_parameters + full_weights,
            trainable_parameters: parameters_of(true),
            parameters,
            layers,
        }
    }
}

impl fmt::Display for DecompositionReport {
    /// A table: one row per decomposed layer (no table when none is), then the totals.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let width = self.layers.iter().map(|l| l.name.len()).max().unwrap_or(5);
        if !self.layers.is_empty() {
            writeln!(
                f,
                "{:<width$}  {:>16}  {:>9}  {:>5}  {:>10}",
                "layer", "shape", "full rank", "rank", "rel. error"
            )?;
        }
        for layer in &self.layers {
            let shape: Vec<String> = layer.shape.iter().map(i64::to_string).collect();
            let error = layer
                .relative_error
                .map_or_else(|| "-".to_string(), |e| format!("{e:.3e}"));
            writeln!(
                f,
                "{:<width$}  {:>16}  {:>9}  {:>5}  {:>10}",
                layer.name,
                shape.join("x"),
                layer.full_rank,
                layer.rank,
                error
            )?;
        }
        writeln!(f, "decomposed layers: {}", self.layers.len())?;
        writeln!(
            f,
            "parameters: {} (full rank: {})",
            self.parameters, self.full_rank_parameters
        )?;
        write!(f, "trainable (SVF): {}", self.trainable_parameters)
    }
}

/// Decomposes every conv (4-D `.weight`) and linear (2-D `.weight`) layer of a full-rank weight map
/// that `options` selects, renaming to the reference's names (`<layer>.conv_U.weight`,
/// `.conv_U.bias`, `.conv_V.weight`, `.vector_S`; `fc_*` for linear layers). Everything else
/// (BatchNorm) is kept as is. Pass only the backbone's entries: every layer found is a candidate.
pub fn decompose_weights(
    weights: &HashMap<String, Tensor>,
    options: &SvfOptions,
) -> (HashMap<String, Tensor>, DecompositionReport) {
    let mut out: HashMap<String, Tensor> = HashMap::new();
    let mut layers = Vec::new();
    let mut decomposed: BTreeMap<&str, i64> = BTreeMap::new();
    for (name, weight) in weights {
        let Some(layer) = name.strip_suffix(".weight") else {
            continue;
        };
        if let Some(rank) = options.rank_for(layer, &weight.size()) {
            decomposed.insert(layer, rank);
        }
    }
    for (&layer, &rank) in &decomposed {
        let weight = &weights[&format!("{layer}.weight")];
        let shape = weight.size();
        let (factors, prefix) = if shape.len() == 4 {
            (decompose_conv(weight, rank), "conv")
        } else {
            (decompose_linear(weight, rank), "fc")
        };
        layers.push(LayerDecomposition {
            name: layer.to_string(),
            full_rank: shape[0].min(shape[1..].iter().product()),
            shape,
            rank,
            relative_error: Some(relative_error(weight, &factors)),
        });
        if let Some(bias) = weights.get(&format!("{layer}.bias")) {
            out.insert(format!("{layer}.{prefix}_U.bias"), bias.shallow_clone());
        }
        out.insert(format!("{layer}.{prefix}_U.weight"), factors.u);
        out.insert(format!("{layer}.{prefix}_V.weight"), factors.v);
        out.insert(format!("{layer}.vector_S"), factors.s);
    }
    for (name, tensor) in weights {
        let layer = name
            .strip_suffix(".weight")
            .or_else(|| name.strip_suffix(".bias"));
        if !layer.is_some_and(|l| decomposed.contains_key(l)) {
            out.insert(name.clone(), tensor.shallow_clone());
        }
    }
    let report = DecompositionReport::with_totals(layers, &out, true);
    (out, report)
}

/// Folds every SVD conv back into one full-rank weight (W = U·diag(S)·V): a decomposed weight map
/// becomes the full-rank map of the same model, for fast inference.
pub fn recompose(weights: &HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    let mut out = HashMap::new();
    let mut folded = Vec::new();
    for (name, s) in weights {
        let Some(layer) = name.strip_suffix(".vector_S") else {
            continue;
        };
        for prefix in ["conv", "fc"] {
            let (u_name, v_name, b_name) = (
                format!("{layer}.{prefix}_U.weight"),
                format!("{layer}.{prefix}_V.weight"),
                format!("{layer}.{prefix}_U.bias"),
            );
            let (Some(u), Some(v)) = (weights.get(&u_name), weights.get(&v_name)) else {
                continue;
            };
            let factors = SvdFactors {
                u: u.shallow_clone(),
                s: s.shallow_clone(),
                v: v.shallow_clone(),
            };
            out.insert(
                format!("{layer}.weight"),
                tch::no_grad(|| compose(&factors)),
            );
            if let Some(bias) = weights.get(&b_name) {
                out.insert(format!("{layer}.bias"), bias.shallow_clone());
                folded.push(b_name);
            }
            folded.extend([name.clone(), u_name, v_name]);
        }
    }
    for (name, tensor) in weights {
        if !folded.contains(name) {
            out.insert(name.clone(), tensor.shallow_clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_without_decomposed_layers_prints_no_empty_table() {
        let weights: HashMap<String, Tensor> = [(
            "layer0.0.weight".to_string(),
            Tensor::zeros([4, 3, 3, 3], (tch::Kind::Float, tch::Device::Cpu)),
        )]
        .into_iter()
        .collect();
        let text = DecompositionReport::describe(&weights, false).to_string();
        assert!(!text.contains("rel. error"), "{text}");
        assert!(text.starts_with("decomposed layers: 0"), "{text}");
        let (decomposed, _) = decompose_weights(&weights, &SvfOptions::default());
        let text = DecompositionReport::describe(&decomposed, true).to_string();
        assert!(
            text.contains("rel. error") && text.contains("layer0.0 "),
            "{text}"
        );
    }

    #[test]
    fn rank_rule_matches_reference_examples() {
        // Stem conv 3→64 3×3: full rank min(64, 27) = 27 → 24.
        assert_eq!(rank_rule(27, 1.0, 4), 24);
        assert_eq!(rank_rule(27, 1.0, 1), 27);
        assert_eq!(rank_rule(64, 1.0, 4), 64);
        assert_eq!(rank_rule(64, 0.5, 4), 32);
        // floor(10·0.33)=3 → 0 → clamped to 1.
        assert_eq!(rank_rule(10, 0.33, 4), 1);
        assert_eq!(rank_rule(3, 1.0, 4), 1);
    }

    #[test]
    fn rank_for_applies_skips_exclusions_and_overrides() {
        let mut options = SvfOptions::default();
        assert_eq!(options.rank_for("layer0.0", &[64, 3, 3, 3]), Some(24));
        assert_eq!(options.rank_for("fc", &[10, 6]), Some(4));
        // Depthwise conv: never.
        assert_eq!(options.rank_for("dw", &[32, 1, 3, 3]), None);
        options.skip_1x1 = true;
        assert_eq!(options.rank_for("layer1.0.conv1", &[64, 128, 1, 1]), None);
        assert_eq!(options.rank_for("fc", &[10, 6]), None);
        assert_eq!(
            options.rank_for("layer1.0.conv2", &[64, 64, 3, 3]),
            Some(64)
        );
        options.skip_1x1 = false;
        options.skip_3x3 = true;
        assert_eq!(options.rank_for("layer1.0.conv2", &[64, 64, 3, 3]), None);
        assert_eq!(
            options.rank_for("layer1.0.conv1", &[64, 128, 1, 1]),
            Some(64)
        );
        options.skip_3x3 = false;
        options.exclude = vec!["layer1.1".into()];
        assert_eq!(options.rank_for("layer1.1.conv1", &[64, 64, 1, 1]), None);
        assert_eq!(
            options.rank_for("layer1.10.conv1", &[64, 64, 1, 1]),
            Some(64)
        );
        options.layer_ratios = vec![("layer2".into(), 0.5), ("layer2.0.conv1".into(), 0.25)];
        assert_eq!(
            options.rank_for("layer2.1.conv1", &[64, 64, 1, 1]),
            Some(32)
        );
        assert_eq!(
            options.rank_for("layer2.0.conv1", &[64, 64, 1, 1]),
            Some(16)
        );
        assert_eq!(
            options.rank_for("layer3.0.conv1", &[64, 64, 1, 1]),
            Some(64)
        );
    }

    #[test]
    fn trainable_set_follows_reference_freezing() {
        for svf in [true, false] {
            assert!(!is_trainable("layer0.0.vector_S", svf));
            assert!(!is_trainable("layer1.0.conv1.vector_S", svf));
            assert!(!is_trainable("layer2.0.bn1.weight", svf));
            assert!(!is_trainable("layer3.0.conv2.conv_U.weight", svf));
            assert!(is_trainable("down_query.0.weight", svf));
            assert!(is_trainable("cls.3.bias", svf));
        }
        assert!(is_trainable("layer2.0.conv1.vector_S", true));
        assert!(is_trainable("layer4.2.downsample.0.vector_S", true));
        assert!(!is_trainable("layer4.2.downsample.0.vector_S", false));
    }

    fn max_rel_err(a: &Tensor, b: &Tensor) -> f64 {
        let diff = (a - b).abs().max().double_value(&[]);
        diff / b.abs().max().double_value(&[])
    }

    #[test]
    fn linear_decomposition_is_exact_at_full_rank() {
        tch::manual_seed(3);
        let weight = Tensor::randn([7, 5], (Kind::Float, tch::Device::Cpu));
        let bias = Tensor::randn([7], (Kind::Float, tch::Device::Cpu));
        let x = Tensor::randn([4, 5], (Kind::Float, tch::Device::Cpu));
        let factors = decompose_linear(&weight, 5);
        assert_eq!(factors.s.size(), [1, 5]);
        // svf.py's linear form, fc_U(fc_V(x) · vector_S), as a weight file would be run.
        let h = x.linear::<&Tensor>(&factors.v, None) * &factors.s;
        let decomposed = h.linear(&factors.u, Some(&bias));
        let expected = x.linear(&weight, Some(&bias));
        assert!(max_rel_err(&decomposed, &expected) < 1e-5);
    }

    #[test]
    fn decompose_then_recompose_restores_the_map() {
        tch::manual_seed(4);
        let opts = (Kind::Float, tch::Device::Cpu);
        let weights: HashMap<String, Tensor> = [
            ("conv.weight", Tensor::randn([8, 3, 3, 3], opts)),
            ("conv.bias", Tensor::randn([8], opts)),
            ("fc.weight", Tensor::randn([6, 8], opts)),
            ("bn.weight", Tensor::randn([8], opts)),
            ("bn.running_var", Tensor::ones([8], opts)),
        ]
        .into_iter()
        .map(|(n, t)| (n.to_string(), t))
        .collect();
        let options = SvfOptions {
            rank_multiple: 1,
            ..SvfOptions::default()
        };
        let (decomposed, report) = decompose_weights(&weights, &options);
        let mut names: Vec<&String> = decomposed.keys().collect();
        names.sort();
        assert_eq!(
            names,
            [
                "bn.running_var",
                "bn.weight",
                "conv.conv_U.bias",
                "conv.conv_U.weight",
                "conv.conv_V.weight",
                "conv.vector_S",
                "fc.fc_U.weight",
                "fc.fc_V.weight",
                "fc.vector_S"
            ]
        );
        assert_eq!(report.layers.len(), 2);
        assert_eq!(report.layers[0].rank, 8);
        assert!(report.layers[0].relative_error.unwrap() < 1e-5);
        // conv: 8·(8+27+1) + bias 8; fc: 6·(6+8+1); bn.weight 8.
        assert_eq!(report.parameters, 8 * 36 + 8 + 6 * 15 + 8);
        assert_eq!(report.full_rank_parameters, 8 * 27 + 8 + 48 + 8);
        assert_eq!(
            DecompositionReport::describe(&decomposed, true).layers,
            report
                .layers
                .iter()
                .map(|l| LayerDecomposition {
                    relative_error: None,
                    ..l.clone()
                })
                .collect::<Vec<_>>()
        );
        let back = recompose(&decomposed);
        let mut back_names: Vec<&String> = back.keys().collect();
        back_names.sort();
        let mut orig_names: Vec<&String> = weights.keys().collect();
        orig_names.sort();
        assert_eq!(back_names, orig_names);
        for (name, t) in &weights {
            assert!(max_rel_err(&back[name], t) < 1e-5, "{name}");
        }
    }
}
