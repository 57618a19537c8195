//! The PFENet few-shot segmentation model: the backbone ([`crate::backbone`]) and PFENet's head
//! ([`PfeHead`]) in one variable tree, named like PFENet's PyTorch `state_dict`.

pub mod bam;
mod few_shot;
mod head;
pub mod pspnet;
mod weights;

pub use few_shot::FewShotModel;
pub use head::{
    is_head_parameter, prior_mask, weighted_gap, HeadOutput, PfeHead, QueryFeatures,
    SupportFeatures, HEAD_MODULES,
};
pub use weights::{copy_into, model_weights};

use tch::{nn, Kind, Reduction, Tensor};

use crate::backbone::{self, Backbone, BackboneError, Init};
use crate::config::Config;
use crate::data::IGNORE_LABEL;

/// Why a model could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Backbone(#[from] BackboneError),
    #[error(transparent)]
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
    #[error("weights file {path} does not match the model{mismatch}; check that the config (layers, backbone_width, svf, reduce_dim, ppm_scales, vgg) is the one the weights were trained with")]
    Mismatch {
        path: std::path::PathBuf,
        mismatch: crate::backbone::WeightMismatch,
    },
    #[error("cannot copy `{name}` of {path} into the model: {source}")]
    Copy {
        path: std::path::PathBuf,
        name: String,
        source: tch::TchError,
    },
}

/// PFENet's outputs for a batch of episodes.
pub struct PfeNetOutput {
    /// Main logits `[B, 2, H, W]` at the input size (bilinear, align_corners).
    pub logits: Tensor,
    /// The pyramid bins' auxiliary logits, `[B, 2, bin, bin]` each, at their bin size; computed in
    /// training passes only (`train`), empty otherwise.
    pub aux_logits: Vec<Tensor>,
}

/// PFENet (+ SVF when `config.svf`): backbone variables at the root (`layer0.*`..`layer4.*`), head
/// variables at the root with PFENet's names.
pub struct PfeNet {
    pub backbone: Backbone,
    head: PfeHead,
    /// Whether backbone BatchNorm is in training mode while training (not with `fix_bn`).
    bn_train_when_training: bool,
    aux_weight: f64,
}

impl PfeNet {
    /// Builds the model with random weights (PyTorch's default initialisation for the head).
    pub fn new(root: &nn::Path, config: &Config) -> Result<PfeNet, ModelError> {
        PfeNet::with_backbone_init(root, config, Init::Random)
    }

    /// [`PfeNet::new`] with the backbone's convolutions started as `init` says
    /// ([`Init::Zeros`] when its weights are loaded next).
    pub fn with_backbone_init(
        root: &nn::Path,
        config: &Config,
        init: Init,
    ) -> Result<PfeNet, ModelError> {
        let backbone = Backbone::with_init(root, config, init)?;
        let channels = backbone.out_channels();
        let head = PfeHead::new(
            root,
            channels[3] + channels[2],
            config.reduce_dim,
            &config.ppm_scales,
        );
        Ok(PfeNet {
            backbone,
            head,
            bn_train_when_training: backbone::batch_norm_training(config, true),
            aux_weight: config.aux_weight,
        })
    }

    /// Segments `query` `[B, 3, H, W]` given `supports` `[B, K, 3, H, W]` and their labels
    /// `[B, K, H, W]` (1 = class, 255 = ignore, else background). `(H - 1) % 8 == 0`. `train`
    /// enables dropout (and backbone BatchNorm training without `fix_bn`).
    pub fn forward(
        &self,
        query: &Tensor,
        supports: &Tensor,
        support_labels: &Tensor,
        train: bool,
    ) -> PfeNetOutput {
        let size = query.size();
        let (height, width) = (size[2], size[3]);
        assert!(
            (height - 1) % 8 == 0 && (width - 1) % 8 == 0,
            "PFENet input {height}×{width} must satisfy (H - 1) % 8 == 0 and (W - 1) % 8 == 0"
        );
        let (query_mid, query_high, _) = self.features(query, None, train);
        let support_features = self.support_features(supports, support_labels, train);
        let query_features = QueryFeatures {
            mid: query_mid,
            high: query_high,
        };
        // The auxiliary classifiers feed only the training loss.
        let out = self
            .head
            .forward(&query_features, &support_features, train, train);
        PfeNetOutput {
            logits: head::resize(&out.logits, [height, width]),
            aux_logits: out.aux_logits,
        }
    }

    /// The features of each of the K shots, shot by shot as PFENet computes them. (One backbone
    /// batch of all B·K supports was measured slower on the CPU: 32.4 s against 21.5 s per 5-shot
    /// training step at 473 with ResNet-50, 8.1 s against 7.3 s per fused 5-shot evaluation.)
    fn support_features(
        &self,
        supports: &Tensor,
        support_labels: &Tensor,
        train: bool,
    ) -> Vec<SupportFeatures> {
        (0..supports.size()[1])
            .map(|k| {
                let mask = support_labels
                    .select(1, k)
                    .eq(1)
                    .to_kind(Kind::Float)
                    .unsqueeze(1);
                let (mid, high, mask) = self.features(&supports.select(1, k), Some(&mask), train);
                let mask = mask.expect("a support's mask comes back resized");
                SupportFeatures { mid, high, mask }
            })
            .collect()
    }

    /// `cat(layer3, layer2)` and layer4 of `images`; with `mask` (a support), layer4 sees the
    /// layer3 features multiplied by the mask resized to layer3's size, which is returned too
    /// (the head's masked pooling and prior work at that size, so it is resized once).
    fn features(
        &self,
        images: &Tensor,
        mask: Option<&Tensor>,
        train: bool,
    ) -> (Tensor, Tensor, Option<Tensor>) {
        let bn_train = train && self.bn_train_when_training;
        let layer = |index: usize, x: &Tensor| self.backbone.forward_layer(index, x, bn_train);
        let layer4 = |x: &Tensor| layer(4, x);
        // Frozen weights do not require gradients (see `train::trainable_parameters`), so autograd
        // records nothing before the first trainable `vector_S` (layer2 with SVF; never without
        // it, as PFENet's no_grad backbone) and keeps no activations for layer0..1.
        let feat1 = layer(1, &layer(0, images));
        let feat2 = layer(2, &feat1);
        let feat3 = layer(3, &feat2);
        let layer3_size = [feat3.size()[2], feat3.size()[3]];
        let mask = mask.map(|mask| head::resize(mask, layer3_size));
        let feat4 = match &mask {
            // The mask in the features' dtype (bf16 under autocast: GPU-NOTES 10).
            Some(mask) => support_layer4(
                &self.backbone,
                &layer4,
                &(&feat3 * mask.to_kind(feat3.kind())),
                mask,
                !bn_train,
            ),
            None => layer4(&feat3),
        };
        // VGG's layer2 is at twice layer3's resolution; ResNet's already matches.
        let mid = Tensor::cat(&[feat3, head::resize(&feat2, layer3_size)], 1);
        (mid, feat4, mask)
    }

    /// Cross-entropy of the main logits (ignore 255) and the mean of the bins' cross-entropies,
    /// each bin's logits resized to the label size first.
    pub fn loss_terms(&self, out: &PfeNetOutput, query_label: &Tensor) -> (Tensor, Tensor) {
        let size = query_label.size();
        let label_size = [size[1], size[2]];
        let main = cross_entropy(&head::resize(&out.logits, label_size), query_label);
        let aux = out
            .aux_logits
            .iter()
            .map(|logits| cross_entropy(&head::resize(logits, label_size), query_label))
            .reduce(|a, b| a + b)
            .expect("the pyramid has at least one bin")
            / out.aux_logits.len() as f64;
        (main, aux)
    }

    /// The training loss: `CE(main) + aux_weight · mean CE(aux)`, ignoring label 255.
    pub fn loss(&self, out: &PfeNetOutput, query_label: &Tensor) -> Tensor {
        let (main, aux) = self.loss_terms(out, query_label);
        main + aux * self.aux_weight
    }
}

fn cross_entropy(logits: &Tensor, label: &Tensor) -> Tensor {
    logits.cross_entropy_loss::<Tensor>(label, None, Reduction::Mean, i64::from(IGNORE_LABEL), 0.0)
}

/// Layer4 of a support's masked layer3 features `input`, where only its values under `mask`
/// (`[B, 1, h, w]`, layer3's size) matter: the prior multiplies the rest by 0. `layer4` runs
/// `backbone`'s layer4 (or a copy's). On the CPU, for a size-keeping layer4 (the dilated ResNet),
/// with `boxed` (BatchNorm frozen: training-mode statistics would see every position), each
/// support's layer4 runs on the mask's bounding box widened by the stage's reach (12 positions for
/// ResNet-50), which gives the uncropped values on the box, and the rest is zero; a support without
/// foreground gets zeros. Same prior and gradients, less work for supports whose object does not
/// span the map. Elsewhere (GPU: the box would be read back to the host; VGG) the whole map.
pub(crate) fn support_layer4(
    backbone: &Backbone,
    layer4: &impl Fn(&Tensor) -> Tensor,
    input: &Tensor,
    mask: &Tensor,
    boxed: bool,
) -> Tensor {
    let reach = match backbone.layer_reach(4) {
        Some(reach) if boxed && input.device() == tch::Device::Cpu => reach,
        _ => return layer4(input),
    };
    let [_, _, height, width] = input.size()[..] else {
        unreachable!("layer3 features are [B, C, h, w]")
    };
    let boxes: Vec<Option<[i64; 4]>> = (0..input.size()[0])
        .map(|b| foreground_box(&mask.get(b).get(0), reach))
        .collect();
    if boxes.iter().all(|b| *b == Some([0, height, 0, width])) {
        return layer4(input);
    }
    let channels = backbone.out_channels()[4];
    let samples: Vec<Tensor> = boxes
        .iter()
        .enumerate()
        .map(|(b, bounds)| match *bounds {
            None => Tensor::zeros([1, channels, height, width], (input.kind(), input.device())),
            Some([top, bottom, left, right]) => layer4(
                &input
                    .narrow(0, b as i64, 1)
                    .narrow(2, top, bottom - top)
                    .narrow(3, left, right - left),
            )
            .constant_pad_nd([left, width - right, top, height - bottom]),
        })
        .collect();
    Tensor::cat(&samples, 0)
}

/// The rows `[top, bottom)` and columns `[left, right)` of `mask` `[h, w]`'s positions above 0,
/// widened by `reach` on every side within the map; `None` when nothing is above 0.
fn foreground_box(mask: &Tensor, reach: i64) -> Option<[i64; 4]> {
    let above = mask.gt(0.0);
    let span = |dim: i64| -> Option<(i64, i64)> {
        let present =
            Vec::<bool>::try_from(above.any_dim(dim, false)).expect("a boolean vector reads back");
        let first = present.iter().position(|&p| p)? as i64;
        let last = present.iter().rposition(|&p| p)? as i64;
        Some((
            (first - reach).max(0),
            (last + 1 + reach).min(present.len() as i64),
        ))
    };
    let (top, bottom) = span(1)?;
    let (left, right) = span(0)?;
    Some([top, bottom, left, right])
}

/// Freezes every variable of `vs` but those `trainable` names and returns those, by name in name
/// order (the one freezing mechanism of PFENet and BAM).
pub fn freeze_all_but(
    vs: &nn::VarStore,
    trainable_name: impl Fn(&str) -> bool,
) -> Vec<(String, Tensor)> {
    let mut trainable = Vec::new();
    for (name, tensor) in model_weights(vs) {
        if trainable_name(&name) {
            trainable.push((name, tensor.set_requires_grad(true)));
        } else if tensor.requires_grad() {
            let _ = tensor.set_requires_grad(false);
        }
    }
    trainable
}

/// On the CPU, gives every 4-D variable (convolution weight) of `vs` whose name `select` picks
/// channels-last (NHWC) strides. oneDNN then keeps the activations in that layout from layer to
/// layer instead of reordering them at every convolution (ResNet-50 + SVF, 2 cores, svf-bench:
/// fused evaluation 2.71 → 2.34 s at 473, at 233 within run-to-run noise; the train step with the
/// frozen weights converted 5.64 → 5.2–5.4 s at 473, 1.72 → 1.53–1.59 s at 233). Names and values are unchanged, the function the same within float rounding; copies
/// into the variables (loading, resuming) keep the layout and checkpoints are written contiguous.
/// CUDA keeps the default layout (not measured there).
pub fn channels_last_on_cpu(vs: &nn::VarStore, select: impl Fn(&str) -> bool) {
    if vs.device() != tch::Device::Cpu {
        return;
    }
    tch::no_grad(|| {
        for (name, variable) in vs.variables() {
            if variable.dim() == 4 && select(&name) {
                let nhwc = variable.permute([0, 2, 3, 1]).contiguous();
                variable
                    .shallow_clone()
                    .set_data(&nhwc.permute([0, 3, 1, 2]));
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::svf;
    use tch::Device;

    const OPTS: (Kind, Device) = (Kind::Float, Device::Cpu);

    fn tiny(svf: bool) -> Config {
        Config {
            layers: 18,
            backbone_width: 0.25,
            reduce_dim: 16,
            ppm_scales: vec![8, 4],
            svf,
            ..Config::default()
        }
    }

    fn episode(batch: i64, shots: i64, size: i64) -> (Tensor, Tensor, Tensor) {
        let labels = Tensor::rand([batch, shots, size, size], OPTS)
            .gt(0.5)
            .to_kind(Kind::Int64);
        (
            Tensor::randn([batch, 3, size, size], OPTS),
            Tensor::randn([batch, shots, 3, size, size], OPTS),
            labels,
        )
    }

    #[test]
    fn output_shapes_for_one_and_five_shots_two_batches_and_two_sizes() {
        tch::manual_seed(0);
        for shots in [1, 5] {
            let vs = nn::VarStore::new(Device::Cpu);
            let model = PfeNet::new(
                &vs.root(),
                &Config {
                    shot: shots as usize,
                    ..tiny(true)
                },
            )
            .unwrap();
            for (batch, size) in [(1, 65), (2, 65), (1, 81), (2, 81)] {
                let (query, supports, labels) = episode(batch, shots, size);
                let out = tch::no_grad(|| model.forward(&query, &supports, &labels, false));
                assert_eq!(out.logits.size(), [batch, 2, size, size]);
                // The auxiliary classifiers run in training passes only.
                assert!(out.aux_logits.is_empty());
                let out = tch::no_grad(|| model.forward(&query, &supports, &labels, true));
                let aux: Vec<Vec<i64>> = out.aux_logits.iter().map(Tensor::size).collect();
                assert_eq!(aux, [vec![batch, 2, 8, 8], vec![batch, 2, 4, 4]]);
            }
        }
    }

    #[test]
    fn foreground_box_is_widened_within_the_map() {
        let mask = Tensor::zeros([5, 6], OPTS);
        assert_eq!(foreground_box(&mask, 1), None);
        let _ = mask.get(1).get(4).fill_(0.25);
        assert_eq!(foreground_box(&mask, 1), Some([0, 3, 3, 6]));
        let _ = mask.get(4).get(0).fill_(1.0);
        assert_eq!(foreground_box(&mask, 0), Some([1, 5, 0, 5]));
    }

    /// Layer4 on each support's mask box (the CPU path) against layer4 on the whole map: the same
    /// values under the mask and the same `vector_S` gradients, for a small object, no object and
    /// an object covering the map in one batch; outside its box the small object's output is 0.
    #[test]
    fn support_layer4_on_the_mask_box_equals_the_whole_map_under_the_mask() {
        let vs = nn::VarStore::new(Device::Cpu);
        let model = PfeNet::new(&vs.root(), &tiny(true)).unwrap();
        let trainable = freeze_all_but(&vs, |n| svf::is_trainable(n, true));
        // ResNet-18's layer4: two blocks of two 3×3 convolutions at dilation 4.
        let reach = model
            .backbone
            .layer_reach(4)
            .expect("a dilated ResNet layer4");
        assert_eq!(reach, 16);
        assert_eq!(model.backbone.layer_reach(0), None, "the stem pools");
        let size = 2 * reach + 8;
        let channels = model.backbone.out_channels()[3];
        let input = Tensor::randn([3, channels, size, size], OPTS);
        let mask = Tensor::zeros([3, 1, size, size], OPTS);
        let _ = mask
            .get(0)
            .get(0)
            .narrow(0, 2, 3)
            .narrow(1, 4, 2)
            .fill_(0.5);
        let _ = mask.get(2).fill_(1.0);
        let weights = Tensor::randn([3, model.backbone.out_channels()[4], size, size], OPTS);
        let run = |boxed: bool| {
            for (_, t) in &trainable {
                t.shallow_clone().zero_grad();
            }
            let out = if boxed {
                let layer4 = |x: &Tensor| model.backbone.forward_layer(4, x, false);
                support_layer4(&model.backbone, &layer4, &input, &mask, true)
            } else {
                model.backbone.forward_layer(4, &input, false)
            };
            (&out * &mask * &weights).sum(Kind::Float).backward();
            let grads: Vec<Tensor> = trainable
                .iter()
                .filter(|(name, _)| name.starts_with("layer4."))
                .map(|(_, t)| t.grad().copy())
                .collect();
            (out.detach(), grads)
        };
        let (boxed, boxed_grads) = run(true);
        let (whole, whole_grads) = run(false);
        let relative = |a: &Tensor, b: &Tensor| {
            let scale = b.abs().max().double_value(&[]).max(1e-12);
            (a - b).abs().max().double_value(&[]) / scale
        };
        assert!(relative(&(&boxed * &mask), &(&whole * &mask)) < 1e-5);
        assert!(!whole_grads.is_empty());
        // Gradients: sums over positions in another order (see the channels-last test), 1e-3.
        for (a, b) in boxed_grads.iter().zip(&whole_grads) {
            assert!(relative(a, b) < 1e-3, "vector_S gradient");
        }
        // Rows below the small object's box (its last row 4, plus the reach) and the empty
        // support were never computed.
        let below = |t: &Tensor| {
            t.get(0)
                .narrow(1, 5 + reach, size - 5 - reach)
                .abs()
                .max()
                .double_value(&[])
        };
        assert_eq!(below(&boxed), 0.0);
        assert!(below(&whole) > 0.0);
        assert_eq!(boxed.get(1).abs().max().double_value(&[]), 0.0);
    }

    #[test]
    #[should_panic(expected = "(H - 1) % 8 == 0")]
    fn input_size_off_the_8n_plus_1_grid_is_refused() {
        let vs = nn::VarStore::new(Device::Cpu);
        let model = PfeNet::new(&vs.root(), &tiny(false)).unwrap();
        let (query, supports, labels) = episode(1, 1, 64);
        model.forward(&query, &supports, &labels, false);
    }

    #[test]
    fn loss_is_the_closed_form_cross_entropy_without_ignored_pixels() {
        let vs = nn::VarStore::new(Device::Cpu);
        let model = PfeNet::new(
            &vs.root(),
            &Config {
                aux_weight: 0.4,
                ..tiny(false)
            },
        )
        .unwrap();
        // Main logits (0, a) everywhere: CE is ln(1 + e^-a) on class 1 and ln(1 + e^a) on class 0.
        let a = 1.5f64;
        let logits = Tensor::cat(
            &[
                Tensor::zeros([1, 1, 9, 9], OPTS),
                Tensor::full([1, 1, 9, 9], a, OPTS),
            ],
            1,
        );
        // Aux logits all zero (at a smaller bin size): CE ln 2 wherever counted.
        let aux = Tensor::zeros([1, 2, 4, 4], OPTS);
        let out = PfeNetOutput {
            logits,
            aux_logits: vec![aux.copy(), aux],
        };
        // 81 pixels: 30 foreground, 40 background, 11 ignored.
        let label = Tensor::cat(
            &[
                Tensor::ones([30], (Kind::Int64, Device::Cpu)),
                Tensor::zeros([40], (Kind::Int64, Device::Cpu)),
                Tensor::full([11], 255, (Kind::Int64, Device::Cpu)),
            ],
            0,
        )
        .reshape([1, 9, 9]);
        let main = (30.0 * (1.0 + (-a).exp()).ln() + 40.0 * (1.0 + a.exp()).ln()) / 70.0;
        let (got_main, got_aux) = model.loss_terms(&out, &label);
        assert!((got_main.double_value(&[]) - main).abs() < 1e-6);
        assert!((got_aux.double_value(&[]) - 2f64.ln()).abs() < 1e-6);
        let total = model.loss(&out, &label).double_value(&[]);
        assert!((total - (main + 0.4 * 2f64.ln())).abs() < 1e-6);
    }

    #[test]
    fn trainable_set_is_the_head_plus_svf_singular_values_of_layer2_to_4() {
        for svf in [false, true] {
            let vs = nn::VarStore::new(Device::Cpu);
            let _model = PfeNet::new(&vs.root(), &tiny(svf)).unwrap();
            let trainable = freeze_all_but(&vs, |n| svf::is_trainable(n, svf));
            let names: Vec<&str> = trainable.iter().map(|(n, _)| n.as_str()).collect();
            let singular: Vec<&&str> = names.iter().filter(|n| n.ends_with("vector_S")).collect();
            assert_eq!(!singular.is_empty(), svf);
            assert!(singular.iter().all(|n| ["layer2.", "layer3.", "layer4."]
                .iter()
                .any(|s| n.starts_with(s))));
            for stage in ["layer2.", "layer3.", "layer4."] {
                assert_eq!(
                    singular.iter().any(|n| n.starts_with(stage)),
                    svf,
                    "{stage}"
                );
            }
            assert!(names
                .iter()
                .filter(|n| !n.ends_with("vector_S"))
                .all(|n| is_head_parameter(n)));
            let head_count = vs
                .variables()
                .keys()
                .filter(|n| is_head_parameter(n))
                .count();
            assert_eq!(names.len() - singular.len(), head_count);
            for (name, tensor) in vs.variables() {
                assert_eq!(
                    tensor.requires_grad(),
                    names.contains(&name.as_str()),
                    "{name}"
                );
            }
        }
    }

    #[test]
    fn svf_gradient_reaches_every_stage_from_2_to_4_and_never_0_or_1() {
        tch::manual_seed(2);
        let vs = nn::VarStore::new(Device::Cpu);
        let model = PfeNet::new(&vs.root(), &tiny(true)).unwrap();
        let trainable = freeze_all_but(&vs, |n| svf::is_trainable(n, true));
        let (query, supports, labels) = episode(2, 1, 65);
        let out = model.forward(&query, &supports, &labels, true);
        model.loss(&out, &labels.select(1, 0)).backward();
        for (name, tensor) in &trainable {
            let grad = tensor.grad();
            assert!(grad.defined(), "{name} got no gradient");
            assert!(
                grad.abs().sum(Kind::Float).double_value(&[]) > 0.0,
                "{name} has a zero gradient"
            );
        }
        for (name, tensor) in vs.variables() {
            if name.starts_with("layer0.") || name.starts_with("layer1.") {
                assert!(!tensor.grad().defined(), "{name}");
            }
        }
    }

    #[test]
    fn channels_last_frozen_convolutions_train_the_same() {
        // Two identical PFENet+SVF models; the second's frozen convolutions channels-last. The
        // main loss and every trainable gradient agree within float rounding (dropout off:
        // eval-mode forward, as the train step's arithmetic is the same without it; the auxiliary
        // classifiers, which eval mode skips, are plain convolutions of the head).
        let build = || {
            let vs = nn::VarStore::new(Device::Cpu);
            let model = PfeNet::new(&vs.root(), &tiny(true)).unwrap();
            let trainable = freeze_all_but(&vs, |n| svf::is_trainable(n, true));
            (vs, model, trainable)
        };
        let (plain_vs, plain, plain_trainable) = build();
        let (mut last_vs, last, last_trainable) = build();
        channels_last_on_cpu(&last_vs, |name| !svf::is_trainable(name, true));
        // The same weights whatever other tests drew from the global generator meanwhile (the
        // copy keeps the destination's layout).
        last_vs.copy(&plain_vs).unwrap();
        let converted = last_vs
            .variables()
            .into_iter()
            .filter(|(_, v)| v.dim() == 4 && v.size()[1] > 1 && v.size()[2] > 1)
            .filter(|(_, v)| v.stride()[1] == 1)
            .count();
        assert!(converted > 0, "some 3x3 convolution is channels-last");
        let (query, supports, labels) = episode(2, 1, 65);
        let mut losses = Vec::new();
        for model in [&plain, &last] {
            let out = model.forward(&query, &supports, &labels, false);
            let loss = cross_entropy(&out.logits, &labels.select(1, 0));
            loss.backward();
            losses.push(loss.double_value(&[]));
        }
        assert!(
            (losses[0] - losses[1]).abs() < 1e-5 * losses[0].abs(),
            "{losses:?}"
        );
        for ((name, a), (_, b)) in plain_trainable.iter().zip(&last_trainable) {
            assert_eq!(a.grad().defined(), b.grad().defined(), "{name}");
            if !a.grad().defined() {
                assert!(name.starts_with("inner_cls"), "{name} got no gradient");
                continue;
            }
            // The layouts sum in different orders (and oneDNN splits its reductions by the
            // threads free at the time), and a `vector_S` gradient is a sum over every position
            // that can cancel to a small fraction of its terms: 1e-3 of the largest entry (a
            // layout mix-up differs by the whole value; 1e-4 failed once in a parallel test run).
            let scale = a.grad().abs().max().double_value(&[]).max(1e-12);
            let diff = (a.grad() - b.grad()).abs().max().double_value(&[]);
            assert!(diff < 1e-3 * scale, "{name}: {diff} of {scale}");
        }
    }
}
