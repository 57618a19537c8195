//! PFENet's head (Tian et al., TPAMI 2020, `model/PFENet.py`): prototype by masked average pooling,
//! the training-free prior mask from layer-4 features, and the inter-scale feature enrichment module
//! over a pyramid of bins. Variables carry PFENet's `state_dict` names (`down_query.0.weight`,
//! `init_merge.0.0.weight`, ..., `cls.3.bias`).

use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use crate::backbone::onednn::{Epilogue, PackCache};
use crate::svf::ConvGeometry;

/// The head's top-level modules, i.e. the first component of every head parameter's name.
pub const HEAD_MODULES: [&str; 9] = [
    "down_query",
    "down_supp",
    "init_merge",
    "alpha_conv",
    "beta_conv",
    "inner_cls",
    "res1",
    "res2",
    "cls",
];

/// Whether a model variable (full PyTorch name) belongs to the head rather than the backbone.
pub fn is_head_parameter(name: &str) -> bool {
    let module = name.split('.').next().unwrap_or(name);
    HEAD_MODULES.contains(&module)
}

/// Added to the mask area in the masked average pooling (PFENet's `Weighted_GAP`).
const AREA_EPS: f64 = 0.0005;
/// Added to denominators of the cosine similarity and of the prior's min-max normalisation.
const COSINE_EPS: f64 = 1e-7;
/// Dropout2d after the down projections.
const DOWN_DROPOUT: f64 = 0.5;
/// Dropout2d inside the classifiers (`inner_cls`, `cls`).
const CLS_DROPOUT: f64 = 0.1;

/// Query features from the backbone.
pub struct QueryFeatures {
    /// `cat(layer3, layer2)` at the layer-3 resolution, `[B, mid_channels, h, w]`.
    pub mid: Tensor,
    /// layer4 of the query, `[B, C4, h4, w4]`.
    pub high: Tensor,
}

/// One support shot's features from the backbone.
pub struct SupportFeatures {
    /// `cat(layer3, layer2)` at the layer-3 resolution.
    pub mid: Tensor,
    /// layer4 of the support's layer3 features multiplied by the mask.
    pub high: Tensor,
    /// Foreground mask `[B, 1, h, w]`, 1.0 on the class and 0.0 elsewhere, bilinearly resized to
    /// layer 3's resolution (any resolution works: the head resizes it where it differs).
    pub mask: Tensor,
}

/// Logits at the feature resolution.
pub struct HeadOutput {
    /// `[B, 2, h, w]`.
    pub logits: Tensor,
    /// One `[B, 2, bin, bin]` per pyramid bin (the auxiliary classifiers); empty unless asked for.
    pub aux_logits: Vec<Tensor>,
}

/// A convolution with PyTorch's default initialisation (`kaiming_uniform_(a=√5)`, i.e. weights
/// and bias uniform in ±1/√fan_in), as PFENet's head gets it (and BAM's PSPNet and meta modules).
pub(crate) fn conv(p: nn::Path, c_in: i64, c_out: i64, kernel: i64, bias: bool) -> HeadConv {
    let bound = 1.0 / ((c_in * kernel * kernel) as f64).sqrt();
    let init = nn::Init::Uniform {
        lo: -bound,
        up: bound,
    };
    let conv = nn::conv2d(
        p,
        c_in,
        c_out,
        kernel,
        nn::ConvConfig {
            padding: kernel / 2,
            bias,
            ws_init: init,
            bs_init: init,
            ..Default::default()
        },
    );
    HeadConv::new(
        conv,
        ConvGeometry {
            stride: 1,
            padding: kernel / 2,
            dilation: 1,
        },
    )
}

/// A head convolution: tch's `nn::Conv2D` (PyTorch's variable names), run through oneDNN's
/// prepacked kernel where it is frozen on the CPU (evaluation; issue 14).
#[derive(Debug)]
pub struct HeadConv {
    conv: nn::Conv2D,
    geometry: ConvGeometry,
    packed: PackCache,
}

impl HeadConv {
    /// `conv` with the stride, padding and dilation it was made with (tch keeps them private).
    pub(crate) fn new(conv: nn::Conv2D, geometry: ConvGeometry) -> HeadConv {
        HeadConv {
            conv,
            geometry,
            packed: PackCache::default(),
        }
    }

    /// `relu(conv(x))`, the ReLU fused into the convolution where it can be.
    pub(crate) fn forward_relu(&self, x: &Tensor) -> Tensor {
        self.forward_with(
            x,
            Epilogue {
                add: None,
                relu: true,
            },
        )
    }

    fn forward_with(&self, x: &Tensor, epilogue: Epilogue) -> Tensor {
        self.packed.conv2d(
            x,
            &self.conv.ws,
            self.conv.bs.as_ref(),
            self.geometry,
            epilogue,
        )
    }
}

impl Module for HeadConv {
    fn forward(&self, x: &Tensor) -> Tensor {
        self.forward_with(x, Epilogue::NONE)
    }
}

/// `3×3 conv, ReLU, Dropout2d(0.1), 1×1 conv → 2` (PFENet's `cls` and `inner_cls` layout).
struct Classifier {
    hidden: HeadConv,
    out: HeadConv,
}

impl Classifier {
    fn new(p: nn::Path, dim: i64) -> Classifier {
        Classifier {
            hidden: conv(&p / "0", dim, dim, 3, false),
            out: conv(&p / "3", dim, 2, 1, true),
        }
    }

    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        self.out.forward(
            &self
                .hidden
                .forward_relu(x)
                .feature_dropout(CLS_DROPOUT, train),
        )
    }
}

/// Two `3×3 conv, ReLU` (PFENet's `beta_conv` and `res2`).
struct DoubleConv {
    first: HeadConv,
    second: HeadConv,
}

impl DoubleConv {
    fn new(p: nn::Path, dim: i64) -> DoubleConv {
        DoubleConv {
            first: conv(&p / "0", dim, dim, 3, false),
            second: conv(&p / "2", dim, dim, 3, false),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        self.second.forward_relu(&self.first.forward_relu(x))
    }
}

/// The PFENet head.
pub struct PfeHead {
    down_query: HeadConv,
    down_supp: HeadConv,
    init_merge: Vec<HeadConv>,
    alpha_conv: Vec<HeadConv>,
    beta_conv: Vec<DoubleConv>,
    inner_cls: Vec<Classifier>,
    res1: HeadConv,
    res2: DoubleConv,
    cls: Classifier,
    bins: Vec<i64>,
}

impl PfeHead {
    /// `mid_channels`: channels of `cat(layer3, layer2)`; `reduce_dim`: the head width (PFENet 256);
    /// `bins`: the pyramid (PFENet 60, 30, 15, 8).
    pub fn new(root: &nn::Path, mid_channels: i64, reduce_dim: i64, bins: &[i64]) -> PfeHead {
        let d = reduce_dim;
        let indexed = |name: &str, i: usize| root / name / i;
        PfeHead {
            down_query: conv(root / "down_query" / "0", mid_channels, d, 1, false),
            down_supp: conv(root / "down_supp" / "0", mid_channels, d, 1, false),
            // Query bin, prototype and prior: 2d + 1 channels.
            init_merge: (0..bins.len())
                .map(|i| conv(indexed("init_merge", i) / "0", 2 * d + 1, d, 1, false))
                .collect(),
            alpha_conv: (1..bins.len())
                .map(|i| conv(indexed("alpha_conv", i - 1) / "0", 2 * d, d, 1, false))
                .collect(),
            beta_conv: (0..bins.len())
                .map(|i| DoubleConv::new(indexed("beta_conv", i), d))
                .collect(),
            inner_cls: (0..bins.len())
                .map(|i| Classifier::new(indexed("inner_cls", i), d))
                .collect(),
            res1: conv(root / "res1" / "0", d * bins.len() as i64, d, 1, false),
            res2: DoubleConv::new(root / "res2", d),
            cls: Classifier::new(root / "cls", d),
            bins: bins.to_vec(),
        }
    }

    /// Segments the query given K ≥ 1 support shots; `train` enables dropout. `with_aux` also
    /// runs the bins' auxiliary classifiers, which only the training loss reads (PFENet runs them
    /// in evaluation too, for nothing).
    pub fn forward(
        &self,
        query: &QueryFeatures,
        supports: &[SupportFeatures],
        train: bool,
        with_aux: bool,
    ) -> HeadOutput {
        assert!(
            !supports.is_empty(),
            "PFENet needs at least one support shot"
        );
        let query_feat = self
            .down_query
            .forward_relu(&query.mid)
            .feature_dropout(DOWN_DROPOUT, train);
        let feat_size = spatial_size(&query_feat);
        let mut prototypes = Vec::with_capacity(supports.len());
        let mut priors = Vec::with_capacity(supports.len());
        for support in supports {
            let supp_feat = self
                .down_supp
                .forward_relu(&support.mid)
                .feature_dropout(DOWN_DROPOUT, train);
            let mask = resize(&support.mask, spatial_size(&supp_feat));
            prototypes.push(weighted_gap(&supp_feat, &mask));
            let prior = prior_mask(&query.high, &support.high, &support.mask);
            priors.push(resize(&prior, spatial_size(&query.mid)));
        }
        // K-shot: the mean prior and the mean prototype.
        let prior = resize(
            &Tensor::cat(&priors, 1).mean_dim(1, true, Kind::Float),
            feat_size,
        );
        let prototype = Tensor::stack(&prototypes, 0).mean_dim(0, false, Kind::Float);

        let mut pyramid: Vec<Tensor> = Vec::with_capacity(self.bins.len());
        let mut aux_logits = Vec::with_capacity(self.bins.len());
        for (idx, &bin) in self.bins.iter().enumerate() {
            let query_bin = query_feat.adaptive_avg_pool2d([bin, bin]);
            let prototype_bin = prototype.expand([-1, -1, bin, bin], false);
            let prior_bin = resize(&prior, [bin, bin]);
            let mut merged = self.init_merge[idx]
                .forward_relu(&Tensor::cat(&[query_bin, prototype_bin, prior_bin], 1));
            if idx >= 1 {
                let previous = resize(&pyramid[idx - 1], [bin, bin]);
                merged = self.alpha_conv[idx - 1]
                    .forward_relu(&Tensor::cat(&[&merged, &previous], 1))
                    + &merged;
            }
            merged = self.beta_conv[idx].forward(&merged) + &merged;
            if with_aux {
                aux_logits.push(self.inner_cls[idx].forward(&merged, train));
            }
            pyramid.push(resize(&merged, feat_size));
        }
        let fused = self.res1.forward_relu(&Tensor::cat(&pyramid, 1));
        let fused = self.res2.forward(&fused) + &fused;
        HeadOutput {
            logits: self.cls.forward(&fused, train),
            aux_logits,
        }
    }
}

fn spatial_size(x: &Tensor) -> [i64; 2] {
    let size = x.size();
    [size[size.len() - 2], size[size.len() - 1]]
}

/// Bilinear resize with `align_corners = true`, as everywhere in PFENet.
pub(crate) fn resize(x: &Tensor, size: [i64; 2]) -> Tensor {
    if spatial_size(x) == size {
        return x.shallow_clone();
    }
    x.upsample_bilinear2d(size, true, None, None)
}

/// Masked average pooling: `Σ feat·mask / (Σ mask + 0.0005)` per channel, `[B, C, 1, 1]`.
pub fn weighted_gap(feat: &Tensor, mask: &Tensor) -> Tensor {
    let area = mask.sum_dim_intlist(&[2i64, 3][..], true, Kind::Float) + AREA_EPS;
    (feat * mask).sum_dim_intlist(&[2i64, 3][..], true, Kind::Float) / area
}

/// PFENet's prior: for every query layer-4 position, the highest cosine similarity to a support
/// layer-4 position inside the (resized) mask, min-max normalised per query, `[B, 1, h4, w4]`.
///
/// Same values and gradients as the reference's formula (`bmm(s, q) / (bmm(‖s‖, ‖q‖) + 1e-7)`, then
/// the max over support positions), computed faster (issue 14): the full `Nq × Ns` similarity runs
/// without autograd on unit vectors (no division of the matrix) and only picks, per query position,
/// the best support position; that pair's cosine is then recomputed with the reference's formula and
/// eps, with autograd, from a gather of one support vector per query position. The gradient of a max
/// reaches only the selected pair, so the backward needs no matrix product. Where two support
/// positions tie within float rounding the pick may differ from the reference's, with the same value.
/// Always float32 (GPU-NOTES 6): autocast is off inside and the inputs are cast up.
pub fn prior_mask(query_high: &Tensor, support_high: &Tensor, mask: &Tensor) -> Tensor {
    crate::amp::without_autocast(|| {
        prior_mask_f32(
            &query_high.to_kind(Kind::Float),
            &support_high.to_kind(Kind::Float),
            &mask.to_kind(Kind::Float),
        )
    })
}

fn prior_mask_f32(query_high: &Tensor, support_high: &Tensor, mask: &Tensor) -> Tensor {
    let [h, w] = spatial_size(query_high);
    let size = query_high.size();
    let (batch, channels) = (size[0], size[1]);
    let support = support_high * resize(mask, spatial_size(support_high));
    // [B, C, Nq] and [B, Ns, C].
    let query = query_high.reshape([batch, channels, -1]);
    let support = support.reshape([batch, channels, -1]).permute([0, 2, 1]);
    let query_norm = query.norm_scalaropt_dim(2, [1], true); // [B, 1, Nq]
    let support_norm = support.norm_scalaropt_dim(2, [2], true); // [B, Ns, 1]
                                                                 // Which support position each query position's max comes from. Zero vectors (outside the mask)
                                                                 // stay zero (similarity 0, as in the reference) instead of 0/0.
    let best_index = tch::no_grad(|| {
        let unit_query =
            query.detach() / query_norm.detach().clamp_min(f64::from(f32::MIN_POSITIVE));
        let unit_support = support.detach()
            / support_norm
                .detach()
                .clamp_min(f64::from(f32::MIN_POSITIVE));
        if query.device() == tch::Device::Cpu {
            best_masked_support(&unit_support, &unit_query, &support_norm.detach())
        } else {
            unit_support.bmm(&unit_query).argmax(1, false) // [B, Nq]
        }
    });
    // The selected pairs' cosine, with the reference's formula and eps, with autograd.
    let picked = support.gather(
        1,
        &best_index.unsqueeze(2).expand([-1, -1, channels], false),
        false,
    );
    let picked_norm = support_norm.squeeze_dim(2).gather(1, &best_index, false); // [B, Nq]
    let dot = (picked * query.permute([0, 2, 1])).sum_dim_intlist(&[2i64][..], false, Kind::Float);
    let best = dot / (picked_norm * query_norm.squeeze_dim(1) + COSINE_EPS); // [B, Nq]
    let low = best.amin([1], true);
    let high = best.amax([1], true);
    ((best - &low) / (high - &low + COSINE_EPS)).reshape([batch, 1, h, w])
}

/// `argmax` over support positions of `unit_support [B, Ns, C] · unit_query [B, C, Nq]`, `[B, Nq]`,
/// multiplying only the support vectors that are not zero. Outside the mask every support vector
/// is zero, with similarity exactly 0: a query position whose best masked similarity is negative
/// picks such a position (value 0, as the full product's max would), and the rest of the product
/// is never needed. On the CPU only: finding the masked positions reads them back to the host,
/// which would stall a GPU stream, where the full product is cheap anyway.
fn best_masked_support(
    unit_support: &Tensor,
    unit_query: &Tensor,
    support_norm: &Tensor,
) -> Tensor {
    let picks: Vec<Tensor> = (0..unit_support.size()[0])
        .map(|b| {
            let (support, query) = (unit_support.get(b), unit_query.get(b));
            let nonzero = support_norm.get(b).squeeze_dim(1).gt(0.0);
            let kept = nonzero.nonzero().squeeze_dim(1); // [n]
            let positions = nonzero.size()[0];
            match kept.size()[0] {
                n if n == positions => support.mm(&query).argmax(0, false),
                0 => Tensor::zeros([query.size()[1]], (Kind::Int64, query.device())),
                _ => {
                    let (best, index) = support.index_select(0, &kept).mm(&query).max_dim(0, false);
                    let zero_position = nonzero.logical_not().to_kind(Kind::Int64).argmax(0, false);
                    kept.index_select(0, &index)
                        .where_self(&best.ge(0.0), &zero_position)
                }
            }
        })
        .collect();
    Tensor::stack(&picks, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// The reference's prior as written (full similarity matrix with autograd): what
    /// [`prior_mask`] is tested against.
    fn prior_mask_reference(query_high: &Tensor, support_high: &Tensor, mask: &Tensor) -> Tensor {
        let [h, w] = spatial_size(query_high);
        let size = query_high.size();
        let (batch, channels) = (size[0], size[1]);
        let support = support_high * resize(mask, spatial_size(support_high));
        let query = query_high.reshape([batch, channels, -1]);
        let support = support.reshape([batch, channels, -1]).permute([0, 2, 1]);
        let query_norm = query.norm_scalaropt_dim(2, [1], true);
        let support_norm = support.norm_scalaropt_dim(2, [2], true);
        let similarity = support.bmm(&query) / (support_norm.bmm(&query_norm) + COSINE_EPS);
        let best = similarity.amax([1], false);
        let low = best.amin([1], true);
        let high = best.amax([1], true);
        ((best - &low) / (high - &low + COSINE_EPS)).reshape([batch, 1, h, w])
    }

    #[test]
    fn fast_prior_matches_the_reference_formula_in_values_and_gradients() {
        tch::manual_seed(7);
        // PFENet-like: ReLU features, a support mask at a finer resolution, two batch items, a
        // query grid different from the support's. Masks: scattered pixels (most support
        // positions keep some), one object in item 0 and none in item 1 (most positions zero: the
        // product over the masked positions only), or everything (no zero position at all);
        // signed features give negative best similarities, where masked-out zero vectors win.
        #[derive(Clone, Copy)]
        enum Mask {
            Scattered,
            Object,
            Full,
        }
        let cases = [
            (64, 12, 12, Mask::Scattered, false),
            (32, 9, 7, Mask::Scattered, false),
            (64, 12, 12, Mask::Object, false),
            (32, 9, 7, Mask::Object, true),
            (32, 9, 7, Mask::Full, true),
        ];
        for (channels, side_q, side_s, mask_kind, signed) in cases {
            let features = |side: i64| {
                let x = Tensor::randn([2, channels, side, side], OPTS);
                if signed {
                    x
                } else {
                    x.relu()
                }
            };
            let (query, support) = (features(side_q), features(side_s));
            let shape = [2, 1, 4 * side_s, 4 * side_s];
            let mask = match mask_kind {
                Mask::Scattered => Tensor::rand(shape, OPTS).gt(0.6).to_kind(Kind::Float),
                Mask::Object => {
                    let mask = Tensor::zeros(shape, OPTS);
                    let _ = mask.get(0).narrow(1, 4, 8).narrow(2, 6, 9).fill_(1.0);
                    mask
                }
                Mask::Full => Tensor::ones(shape, OPTS),
            };
            let weights = Tensor::randn([2, 1, side_q, side_q], OPTS);
            let run = |f: fn(&Tensor, &Tensor, &Tensor) -> Tensor| {
                let q = query.copy().set_requires_grad(true);
                let s = support.copy().set_requires_grad(true);
                let prior = f(&q, &s, &mask);
                (&prior * &weights).sum(Kind::Float).backward();
                (prior.detach(), q.grad(), s.grad())
            };
            let (fast, fast_dq, fast_ds) = run(prior_mask);
            let (reference, ref_dq, ref_ds) = run(prior_mask_reference);
            assert!(max_abs_diff(&fast, &reference) < 1e-6, "values");
            let scale = ref_dq.abs().max().double_value(&[]);
            assert!(
                max_abs_diff(&fast_dq, &ref_dq) < 1e-5 * scale,
                "query gradient"
            );
            let scale = ref_ds.abs().max().double_value(&[]);
            assert!(
                max_abs_diff(&fast_ds, &ref_ds) < 1e-5 * scale,
                "support gradient"
            );
        }
    }

    const OPTS: (Kind, Device) = (Kind::Float, Device::Cpu);

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    #[test]
    fn weighted_gap_is_the_masked_mean() {
        // Channel 0 holds 1..16, channel 1 holds 2·(1..16); the mask keeps the top two rows.
        let base = Tensor::arange_start(1, 17, OPTS).reshape([1, 1, 4, 4]);
        let feat = Tensor::cat(&[&base, &(&base * 2.0)], 1);
        let mask = Tensor::zeros([1, 1, 4, 4], OPTS);
        let _ = mask.narrow(2, 0, 2).fill_(1.0);
        let pooled = weighted_gap(&feat, &mask);
        assert_eq!(pooled.size(), [1, 2, 1, 1]);
        // Σ(1..8) = 36 over an area of 8.
        let expected = Tensor::from_slice(&[36.0 / 8.0005, 72.0 / 8.0005]).to_kind(Kind::Float);
        assert!(max_abs_diff(&pooled.flatten(0, -1), &expected) < 1e-5);
    }

    #[test]
    fn prior_is_the_min_max_normalised_best_cosine_over_the_masked_support() {
        // Support: one foreground position with feature e0; the masked-out positions become zero
        // vectors of similarity 0, which the max also sees (as in the reference). Query positions:
        // e0 (similarity 1), e0+e1 (1/√2), e1 (0) and -e0 (-1, so its max is the masked 0).
        let support = Tensor::zeros([1, 2, 2, 2], OPTS);
        let _ = support.get(0).get(0).get(0).get(0).fill_(1.0);
        let _ = support.get(0).get(1).get(1).get(1).fill_(5.0);
        let mask = Tensor::zeros([1, 1, 2, 2], OPTS);
        let _ = mask.get(0).get(0).get(0).get(0).fill_(1.0);
        let query =
            Tensor::from_slice(&[1.0f32, 1.0, 0.0, -1.0, 0.0, 1.0, 1.0, 0.0]).reshape([1, 2, 2, 2]);
        let prior = prior_mask(&query, &support, &mask);
        assert_eq!(prior.size(), [1, 1, 2, 2]);
        // Maxima {1, 1/√2, 0, 0} are already in [0, 1].
        let s = std::f64::consts::FRAC_1_SQRT_2;
        let expected = Tensor::from_slice(&[1.0, s, 0.0, 0.0]).to_kind(Kind::Float);
        assert!(
            max_abs_diff(&prior.flatten(0, -1), &expected) < 1e-5,
            "{prior}"
        );
    }

    fn random_features(
        batch: i64,
        mid: i64,
        high: i64,
        side: i64,
        image: i64,
    ) -> (QueryFeatures, SupportFeatures) {
        let query = QueryFeatures {
            mid: Tensor::randn([batch, mid, side, side], OPTS),
            high: Tensor::randn([batch, high, side, side], OPTS).relu(),
        };
        let mask = Tensor::rand([batch, 1, image, image], OPTS)
            .gt(0.5)
            .to_kind(Kind::Float);
        let support = SupportFeatures {
            mid: Tensor::randn([batch, mid, side, side], OPTS),
            high: Tensor::randn([batch, high, side, side], OPTS).relu(),
            mask,
        };
        (query, support)
    }

    #[test]
    fn names_follow_pfenet_state_dict() {
        let vs = nn::VarStore::new(Device::Cpu);
        let _head = PfeHead::new(&vs.root(), 24, 8, &[4, 2]);
        let mut names: Vec<String> = vs.variables().into_keys().collect();
        names.sort();
        let expected = [
            "alpha_conv.0.0.weight",
            "beta_conv.0.0.weight",
            "beta_conv.0.2.weight",
            "beta_conv.1.0.weight",
            "beta_conv.1.2.weight",
            "cls.0.weight",
            "cls.3.bias",
            "cls.3.weight",
            "down_query.0.weight",
            "down_supp.0.weight",
            "init_merge.0.0.weight",
            "init_merge.1.0.weight",
            "inner_cls.0.0.weight",
            "inner_cls.0.3.bias",
            "inner_cls.0.3.weight",
            "inner_cls.1.0.weight",
            "inner_cls.1.3.bias",
            "inner_cls.1.3.weight",
            "res1.0.weight",
            "res2.0.weight",
            "res2.2.weight",
        ];
        assert_eq!(names, expected);
        assert!(names.iter().all(|n| is_head_parameter(n)));
        assert!(!is_head_parameter("layer2.0.conv1.vector_S"));
        assert!(!is_head_parameter("classifier.weight"));
        let variables = vs.variables();
        assert_eq!(variables["init_merge.1.0.weight"].size(), [8, 17, 1, 1]);
        assert_eq!(variables["alpha_conv.0.0.weight"].size(), [8, 16, 1, 1]);
        assert_eq!(variables["res1.0.weight"].size(), [8, 16, 1, 1]);
        assert_eq!(variables["cls.3.weight"].size(), [2, 8, 1, 1]);
        // PyTorch's default bound 1/√fan_in (fan_in 8·9 for the 3×3 convs).
        let bound = 1.0 / 72f64.sqrt();
        let max = variables["res2.0.weight"].abs().max().double_value(&[]);
        assert!(max <= bound && max > 0.5 * bound, "{max} vs {bound}");
    }

    #[test]
    fn output_shapes_for_shots_batches_and_bins_larger_than_the_map() {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        // Bin 12 is larger than the 9×9 map: adaptive pooling enlarges it, as in the reference.
        let head = PfeHead::new(&vs.root(), 24, 8, &[12, 4, 2]);
        for (batch, shots) in [(1, 1), (2, 3)] {
            let (query, _) = random_features(batch, 24, 6, 9, 65);
            let supports: Vec<SupportFeatures> = (0..shots)
                .map(|_| random_features(batch, 24, 6, 9, 65).1)
                .collect();
            let out = head.forward(&query, &supports, true, true);
            assert_eq!(out.logits.size(), [batch, 2, 9, 9]);
            let aux: Vec<Vec<i64>> = out.aux_logits.iter().map(Tensor::size).collect();
            assert_eq!(
                aux,
                [
                    vec![batch, 2, 12, 12],
                    vec![batch, 2, 4, 4],
                    vec![batch, 2, 2, 2]
                ]
            );
        }
    }

    #[test]
    fn identical_shots_give_the_one_shot_result_and_eval_is_deterministic() {
        tch::manual_seed(1);
        let vs = nn::VarStore::new(Device::Cpu);
        let head = PfeHead::new(&vs.root(), 24, 8, &[4, 2]);
        let (query, support) = random_features(2, 24, 6, 9, 65);
        let copy = |s: &SupportFeatures| SupportFeatures {
            mid: s.mid.copy(),
            high: s.high.copy(),
            mask: s.mask.copy(),
        };
        let one = head.forward(&query, &[copy(&support)], false, false).logits;
        let again = head.forward(&query, &[copy(&support)], false, false).logits;
        let shots: Vec<SupportFeatures> = (0..5).map(|_| copy(&support)).collect();
        let five = head.forward(&query, &shots, false, false).logits;
        assert_eq!(max_abs_diff(&one, &again), 0.0);
        assert!(max_abs_diff(&one, &five) < 1e-5);
    }
}
