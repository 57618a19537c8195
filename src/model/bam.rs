//! BAM (Lang et al., "Learning What Not to Segment", CVPR 2022, `model/BAM.py`) and BAM+SVF (the
//! SVF authors' `model/BAM.py`).
//!
//! Two learners share the query: the *base learner* ([`PspNet`], trained on the fold's base
//! classes in a first stage) says where base classes are, and the *meta learner* (PFENet's
//! features, prior and prototype, an ASPP decoder) segments the support's class. The Gram-matrix
//! difference of query and support layer2 features measures how far the scenes differ and
//! adjusts the meta prediction; the *ensemble* merges the meta background with the base learner's
//! evidence of any base class. K supports are weighted by a small learnt map of their sorted Gram
//! differences.
//!
//! Variables: the base learner under `base.` with its PSPNet names (`base.layer0.*`,
//! `base.ppm.*`, `base.cls.*`: a stage-1 checkpoint with a `base.` prefix); BAM's meta modules at
//! the root with BAM's names (`down_query.0`, `down_supp.0`, `init_merge.0`, `ASPP_meta.layer6_*`,
//! `res1_meta.0`, `res2_meta.{0,2}`, `cls_meta.{0,3}`, `gram_merge`, `cls_merge`, `kshot_rw.{0,2}`).
//! Plain BAM's meta branch reads the base learner's backbone; with SVF it has its own
//! SVD-decomposed copy at the root (`layer0.*`..`layer4.*`, SVF names), as the authors' code keeps
//! the originals (`layer*p`) for the base learner and decomposes a copy.
//!
//! The base learner is frozen and runs without autograd. BAM's loss has a third term, the base
//! learner's cross-entropy on base-class labels; it carries no gradient while the base learner is
//! frozen, so it is left out here.

use tch::nn::{self, Module};
use tch::{Kind, Reduction, Tensor};

use crate::backbone::{Backbone, Init};
use crate::config::Config;
use crate::data::segmentation::BaseClassMap;
use crate::data::IGNORE_LABEL;
use crate::svf::ConvGeometry;

use super::head::{conv, prior_mask, resize, weighted_gap, HeadConv};
use super::pspnet::{base_learner_classes, PspNet};
use super::ModelError;

/// The base learner's variables live under this path component.
pub const BASE_LEARNER: &str = "base";
/// Added to the Gram matrix's denominator (BAM's `get_gram_matrix`).
const GRAM_EPS: f64 = 1e-7;
const DOWN_DROPOUT: f64 = 0.5;
const CLS_DROPOUT: f64 = 0.1;
/// Dilations of BAM's ASPP branches after the global and the 1×1 one.
const ASPP_DILATIONS: [i64; 3] = [6, 12, 18];
/// BAM's `kshot_trans_dim` (its configs' 2): the hidden width of the K-shot reweighting map.
pub const KSHOT_TRANS_DIM: i64 = 2;

/// BAM's ASPP: a global-average branch, a 1×1 and three dilated 3×3 branches (6, 12, 18), each
/// conv with bias and ReLU, concatenated (5·d channels). Weights kaiming-normal as BAM's
/// `_init_weight`.
struct Aspp {
    global: HeadConv,
    branches: Vec<HeadConv>,
}

impl Aspp {
    fn new(p: nn::Path, d: i64) -> Aspp {
        let make = |name: &str, kernel: i64, dilation: i64| {
            let fan_in = (d * kernel * kernel) as f64;
            let bound = 1.0 / fan_in.sqrt();
            let conv = nn::conv2d(
                &p / name / "0",
                d,
                d,
                kernel,
                nn::ConvConfig {
                    padding: dilation * (kernel / 2),
                    dilation,
                    bias: true,
                    ws_init: nn::Init::Randn {
                        mean: 0.0,
                        stdev: (2.0 / fan_in).sqrt(),
                    },
                    bs_init: nn::Init::Uniform {
                        lo: -bound,
                        up: bound,
                    },
                    ..Default::default()
                },
            );
            let geometry = ConvGeometry {
                stride: 1,
                padding: dilation * (kernel / 2),
                dilation,
            };
            HeadConv::new(conv, geometry)
        };
        let mut branches = vec![make("layer6_1", 1, 1)];
        for (i, &dilation) in ASPP_DILATIONS.iter().enumerate() {
            branches.push(make(&format!("layer6_{}", i + 2), 3, dilation));
        }
        Aspp {
            global: make("layer6_0", 1, 1),
            branches,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let size = x.size();
        let global = self
            .global
            .forward_relu(&x.mean_dim(&[2i64, 3][..], true, Kind::Float))
            .expand([-1, -1, size[2], size[3]], false);
        let mut outs = vec![global];
        outs.extend(self.branches.iter().map(|b| b.forward_relu(x)));
        Tensor::cat(&outs, 1)
    }
}

/// BAM's `get_gram_matrix`: `[B, C, C]`, `F·Fᵀ / (‖F_i‖·‖F_j‖ + 1e-7)` over the flattened
/// spatial positions of `feat` `[B, C, H, W]`.
pub fn gram_matrix(feat: &Tensor) -> Tensor {
    let size = feat.size();
    let flat = feat.reshape([size[0], size[1], -1]);
    let norm = flat.norm_scalaropt_dim(2, [2], true);
    let flat_t = flat.permute([0, 2, 1]);
    flat.bmm(&flat_t) / (norm.bmm(&norm.permute([0, 2, 1])) + GRAM_EPS)
}

/// The scene difference of each support: `‖G(query) − G(support)‖_F / C` (C = `‖1‖_F` of a
/// `C×C` matrix, BAM's `norm_max`), `[B, K, 1, 1]`.
pub fn gram_differences(query_low: &Tensor, supports_low: &[Tensor]) -> Tensor {
    let query_gram = gram_matrix(query_low);
    let batch = query_gram.size()[0];
    let norm_max = query_gram.size()[1] as f64;
    let diffs: Vec<Tensor> = supports_low
        .iter()
        .map(|s| {
            (&query_gram - gram_matrix(s))
                .norm_scalaropt_dim(2, [1, 2], false)
                .reshape([batch, 1, 1, 1])
                / norm_max
        })
        .collect();
    Tensor::cat(&diffs, 1)
}

/// BAM's K-shot reweighting map: a 1×1 conv over the K sorted Gram differences
/// (`kshot_trans_dim` 0), or 1×1 conv to `kshot_trans_dim`, ReLU, 1×1 conv back to K.
pub enum KShotReweighting {
    Linear(HeadConv),
    Hidden(HeadConv, HeadConv),
}

impl KShotReweighting {
    /// `shots` ≥ 2; `trans_dim` BAM's `kshot_trans_dim` (0: one K×K map started at 1/K).
    pub fn new(p: nn::Path, shots: i64, trans_dim: i64) -> KShotReweighting {
        if trans_dim == 0 {
            let linear = nn::conv2d(
                p,
                shots,
                shots,
                1,
                nn::ConvConfig {
                    bias: false,
                    ws_init: nn::Init::Const(1.0 / shots as f64),
                    ..Default::default()
                },
            );
            KShotReweighting::Linear(HeadConv::new(linear, ConvGeometry::PLAIN))
        } else {
            KShotReweighting::Hidden(
                conv(&p / "0", shots, trans_dim, 1, true),
                conv(&p / "2", trans_dim, shots, 1, true),
            )
        }
    }

    /// Softmax weights `[B, K, 1, 1]` of the shots from their Gram differences `[B, K, 1, 1]`:
    /// the map sees the differences in ascending order, and its outputs go back to the shots'.
    pub fn weights(&self, differences: &Tensor) -> Tensor {
        let (sorted, order) = differences.sort(1, false);
        let (_, back) = order.sort(1, false);
        let mapped = match self {
            KShotReweighting::Linear(c) => c.forward(&sorted),
            KShotReweighting::Hidden(a, b) => b.forward(&a.forward_relu(&sorted)),
        };
        mapped.gather(1, &back, false).softmax(1, Kind::Float)
    }
}

/// A `Conv2d(2, 1, 1, bias=False)` started at weights `[1, 0]` (BAM's `gram_merge`, `cls_merge`):
/// the first input passes through unchanged until training moves it.
fn merge_conv(p: nn::Path) -> nn::Conv2D {
    let conv = nn::conv2d(
        &p,
        2,
        1,
        1,
        nn::ConvConfig {
            bias: false,
            ..Default::default()
        },
    );
    tch::no_grad(|| {
        let init = Tensor::from_slice(&[1.0f32, 0.0]).reshape([1, 2, 1, 1]);
        conv.ws.shallow_clone().copy_(&init.to_device(p.device()));
    });
    conv
}

/// Combines the two learners (BAM's "classifier ensemble"): `meta` logits `[B, 2, h, w]`, `base`
/// logits `[B, 1 + base classes, h, w]`, the Gram estimate `[B, 1, 1, 1]`. The base evidence is
/// the base learner's probability of any base class, without the episode's own class channel
/// where `exclude_channel` `[B]` (1-based) gives it (BAM does in training, where the episode's class
/// is a base class). Returns `[merged background, adjusted foreground]`, `[B, 2, h, w]`.
pub fn ensemble(
    meta: &Tensor,
    base: &Tensor,
    estimate: &Tensor,
    exclude_channel: Option<&Tensor>,
    gram_merge: &nn::Conv2D,
    cls_merge: &nn::Conv2D,
) -> Tensor {
    let meta_soft = meta.softmax(1, Kind::Float);
    let base_soft = base.softmax(1, Kind::Float);
    let channels = base.size()[1];
    let keep = Tensor::ones([1, channels, 1, 1], (Kind::Float, base.device()));
    let _ = keep.narrow(1, 0, 1).fill_(0.0);
    let keep = match exclude_channel {
        None => keep,
        Some(channel) => {
            let batch = base.size()[0];
            let one_hot = channel
                .to_kind(Kind::Int64)
                .one_hot(channels)
                .to_kind(Kind::Float)
                .reshape([batch, channels, 1, 1]);
            keep - one_hot
        }
    };
    let base_map = (base_soft * keep).sum_dim_intlist(&[1i64][..], true, Kind::Float);
    let estimate = estimate.expand_as(&meta_soft.narrow(1, 0, 1));
    let adjust =
        |map: Tensor| gram_merge.forward(&Tensor::cat(&[map, estimate.shallow_clone()], 1));
    let meta_bg = adjust(meta_soft.narrow(1, 0, 1));
    let meta_fg = adjust(meta_soft.narrow(1, 1, 1));
    let merged_bg = cls_merge.forward(&Tensor::cat(&[meta_bg, base_map], 1));
    Tensor::cat(&[merged_bg, meta_fg], 1)
}

/// Backbone features of one image batch, as BAM's meta learner uses them.
pub struct MetaFeatures {
    /// layer2 at layer3's resolution (the Gram matrix's input; VGG's layer2 resized).
    pub low: Tensor,
    /// `cat(layer3, layer2)`.
    pub mid: Tensor,
    /// layer4 (of the masked layer3 for a support).
    pub high: Tensor,
}

/// BAM's outputs at the input size.
pub struct BamOutput {
    /// The ensemble's prediction `[B, 2, H, W]` (what evaluation scores).
    pub logits: Tensor,
    /// The meta learner's own logits `[B, 2, H, W]`.
    pub meta_logits: Tensor,
    /// The base learner's logits `[B, 1 + base classes, H, W]`.
    pub base_logits: Tensor,
}

/// BAM (+ SVF when `config.svf`).
pub struct Bam {
    pub base: PspNet,
    /// The meta branch's SVD-decomposed copy of the base backbone (BAM+SVF); `None`: the meta
    /// learner reads the base learner's backbone.
    pub meta_backbone: Option<Backbone>,
    down_query: HeadConv,
    down_supp: HeadConv,
    init_merge: HeadConv,
    aspp: Aspp,
    res1: HeadConv,
    res2: (HeadConv, HeadConv),
    cls_hidden: HeadConv,
    cls_out: HeadConv,
    gram_merge: nn::Conv2D,
    cls_merge: nn::Conv2D,
    kshot: Option<KShotReweighting>,
    aux_weight: f64,
    /// The fold's base classes, for the episode class's channel that training leaves out.
    base_classes: BaseClassMap,
}

/// What the meta branch reads its features from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum MetaCopy {
    /// The base learner's backbone (plain BAM).
    Shared,
    /// Its own SVD-decomposed copy (BAM+SVF, training).
    Decomposed,
    /// Its own full-rank copy: BAM+SVF's copy with the SVD convolutions folded, for inference.
    FullRank,
}

impl Bam {
    /// BAM for `config`'s dataset and shot count; `init` starts the backbones' convolutions
    /// ([`Init::Zeros`] when the base learner's weights are loaded next; the SVF copy is then
    /// decomposed from them by [`crate::backbone::decompose_pretrained`]).
    pub fn new(root: &nn::Path, config: &Config, init: Init) -> Result<Bam, ModelError> {
        let copy = if config.svf {
            MetaCopy::Decomposed
        } else {
            MetaCopy::Shared
        };
        Bam::build(root, config, init, copy)
    }

    /// BAM+SVF for inference: the meta copy full-rank (`layer0.*`.. as
    /// [`crate::svf::recompose`] names the folded SVD convolutions), to be loaded next; plain BAM
    /// as [`Bam::new`].
    pub fn fused(root: &nn::Path, config: &Config) -> Result<Bam, ModelError> {
        let copy = if config.svf {
            MetaCopy::FullRank
        } else {
            MetaCopy::Shared
        };
        Bam::build(root, config, Init::Zeros, copy)
    }

    fn build(
        root: &nn::Path,
        config: &Config,
        init: Init,
        copy: MetaCopy,
    ) -> Result<Bam, ModelError> {
        let base = PspNet::new(
            &(root / BASE_LEARNER),
            config,
            base_learner_classes(config),
            init,
        )?;
        let meta_backbone = match copy {
            MetaCopy::Shared => None,
            MetaCopy::Decomposed => Some(Backbone::with_init(root, config, init)?),
            MetaCopy::FullRank => {
                let full_rank = Config {
                    svf: false,
                    ..config.clone()
                };
                Some(Backbone::with_init(root, &full_rank, init)?)
            }
        };
        let channels = base.backbone.out_channels();
        let (mid, d) = (channels[3] + channels[2], config.reduce_dim);
        let shots = config.shot as i64;
        Ok(Bam {
            base,
            meta_backbone,
            down_query: conv(root / "down_query" / "0", mid, d, 1, false),
            down_supp: conv(root / "down_supp" / "0", mid, d, 1, false),
            init_merge: conv(root / "init_merge" / "0", 2 * d + 1, d, 1, false),
            aspp: Aspp::new(root / "ASPP_meta", d),
            res1: conv(root / "res1_meta" / "0", 5 * d, d, 1, false),
            res2: (
                conv(root / "res2_meta" / "0", d, d, 3, false),
                conv(root / "res2_meta" / "2", d, d, 3, false),
            ),
            cls_hidden: conv(root / "cls_meta" / "0", d, d, 3, false),
            cls_out: conv(root / "cls_meta" / "3", d, 2, 1, true),
            gram_merge: merge_conv(root / "gram_merge"),
            cls_merge: merge_conv(root / "cls_merge"),
            kshot: (shots > 1)
                .then(|| KShotReweighting::new(root / "kshot_rw", shots, KSHOT_TRANS_DIM)),
            aux_weight: config.aux_weight,
            base_classes: BaseClassMap::of(config),
        })
    }

    /// Copies a base learner's weights (a base stage's checkpoint: PSPNet names, no prefix) into
    /// this model's base learner in `vs`, strictly; `origin` names the file in errors.
    pub fn load_base_learner(
        vs: &nn::VarStore,
        weights: Vec<(String, Tensor)>,
        origin: &std::path::Path,
    ) -> Result<(), ModelError> {
        let prefix = format!("{BASE_LEARNER}.");
        let prefixed: Vec<(String, Tensor)> = weights
            .into_iter()
            .map(|(name, t)| (format!("{prefix}{name}"), t))
            .collect();
        super::weights::copy_into_part(vs, &prefixed, origin, |name| name.starts_with(&prefix))
    }

    /// The base learner's channel of each episode class (1-based among the fold's base classes),
    /// `[B]` on `device`: BAM leaves it out of the base evidence in training, where every episode
    /// class is a base class.
    pub fn exclude_channels(&self, class_ids: &[usize], device: tch::Device) -> Tensor {
        let channels: Vec<i64> = class_ids
            .iter()
            .map(|&c| {
                self.base_classes.channel(c).unwrap_or_else(|| {
                    panic!("training episode class {c} is not a base class of the fold")
                }) as i64
            })
            .collect();
        Tensor::from_slice(&channels).to_device(device)
    }

    /// BAM+SVF: sets the meta branch's decomposed backbone to the SVD of the base learner's
    /// current (loaded) backbone, with the config's `svf_*` options; nothing without SVF. Call it
    /// after loading the base learner.
    pub fn decompose_base_into_meta(&self, vs: &nn::VarStore, config: &Config) {
        if self.meta_backbone.is_none() {
            return;
        }
        let prefix = format!("{BASE_LEARNER}.");
        let variables = vs.variables();
        let full_rank: std::collections::HashMap<String, Tensor> = variables
            .iter()
            .filter_map(|(name, t)| {
                let name = name.strip_prefix(&prefix)?;
                name.starts_with("layer")
                    .then(|| (name.to_string(), t.detach()))
            })
            .collect();
        let options = crate::svf::SvfOptions::from_config(config);
        let (decomposed, _) = crate::svf::decompose_weights(&full_rank, &options);
        tch::no_grad(|| {
            for (name, value) in &decomposed {
                let target = variables.get(name).unwrap_or_else(|| {
                    panic!("the meta copy has `{name}`, built from the same config")
                });
                target.shallow_clone().copy_(value);
            }
        });
    }

    fn meta_layer(&self, index: usize, x: &Tensor) -> Tensor {
        // BatchNorm fixed (BAM's fix_bn): the backbones are pretrained and frozen but for vector_S.
        match &self.meta_backbone {
            Some(b) => b.forward_layer(index, x, false),
            None => tch::no_grad(|| self.base.backbone.forward_layer(index, x, false)),
        }
    }

    /// Meta-branch features of `images`; with `mask` (a support, at the input size) layer4 sees
    /// layer3 multiplied by the mask resized to layer3's size.
    pub fn meta_features(&self, images: &Tensor, mask: Option<&Tensor>) -> MetaFeatures {
        let feat2 = self.meta_layer(2, &self.meta_layer(1, &self.meta_layer(0, images)));
        let feat3 = self.meta_layer(3, &feat2);
        let size = [feat3.size()[2], feat3.size()[3]];
        let layer4 = |x: &Tensor| self.meta_layer(4, x);
        let high = match mask {
            Some(mask) => {
                let mask = resize(mask, size);
                let backbone = self.meta_backbone.as_ref().unwrap_or(&self.base.backbone);
                super::support_layer4(backbone, &layer4, &(&feat3 * &mask), &mask, true)
            }
            None => layer4(&feat3),
        };
        let low = resize(&feat2, size);
        MetaFeatures {
            mid: Tensor::cat(&[&feat3, &low], 1),
            low,
            high,
        }
    }

    /// The frozen base learner's logits at layer4's resolution, without autograd. Its BatchNorm
    /// stays fixed; `dropout` as BAM's `model.train()` leaves it on in training.
    pub fn base_logits(&self, images: &Tensor, dropout: bool) -> Tensor {
        tch::no_grad(|| {
            let feat4 = self.base.encode(images, false);
            self.base.head.forward_t(&feat4, false, dropout)
        })
    }

    /// Segments `query` `[B, 3, H, W]` given `supports` `[B, K, 3, H, W]` and their labels
    /// `[B, K, H, W]` (1 = class). `exclude_channel` `[B]`: the episode class's channel of the base
    /// learner (1-based index among the fold's base classes), given in training as BAM does.
    /// `train` enables dropout.
    pub fn forward(
        &self,
        query: &Tensor,
        supports: &Tensor,
        support_labels: &Tensor,
        exclude_channel: Option<&Tensor>,
        train: bool,
    ) -> BamOutput {
        let size = query.size();
        let (height, width) = (size[2], size[3]);
        assert!(
            (height - 1) % 8 == 0 && (width - 1) % 8 == 0,
            "BAM input {height}×{width} must satisfy (H - 1) % 8 == 0 and (W - 1) % 8 == 0"
        );
        let query_features = self.meta_features(query, None);
        let shots = supports.size()[1];
        let masks: Vec<Tensor> = (0..shots)
            .map(|k| {
                support_labels
                    .select(1, k)
                    .eq(1)
                    .to_kind(Kind::Float)
                    .unsqueeze(1)
            })
            .collect();
        let support_features: Vec<MetaFeatures> = masks
            .iter()
            .enumerate()
            .map(|(k, mask)| self.meta_features(&supports.select(1, k as i64), Some(mask)))
            .collect();
        let base = self.base_logits(query, train);
        let out = self.head(
            &query_features,
            &support_features,
            &masks,
            &base,
            exclude_channel,
            train,
        );
        let up = |x: &Tensor| resize(x, [height, width]);
        BamOutput {
            logits: up(&out.logits),
            meta_logits: up(&out.meta_logits),
            base_logits: up(&out.base_logits),
        }
    }

    /// Everything after the backbones, at layer3's resolution: `masks` are the supports'
    /// foreground masks at the input size, `base` the base learner's logits.
    pub fn head(
        &self,
        query: &MetaFeatures,
        supports: &[MetaFeatures],
        masks: &[Tensor],
        base: &Tensor,
        exclude_channel: Option<&Tensor>,
        train: bool,
    ) -> BamOutput {
        let down =
            |c: &HeadConv, x: &Tensor| c.forward_relu(x).feature_dropout(DOWN_DROPOUT, train);
        let query_feat = down(&self.down_query, &query.mid);
        let mid_size = [query_feat.size()[2], query_feat.size()[3]];
        let lows: Vec<Tensor> = supports.iter().map(|s| s.low.shallow_clone()).collect();
        let differences = gram_differences(&query.low, &lows);
        let weights = match &self.kshot {
            Some(k) => k.weights(&differences),
            None => {
                // BAM's model is built for one K; only the 1-shot one has no reweighting.
                assert_eq!(
                    supports.len(),
                    1,
                    "a 1-shot BAM given {} supports: build the model for that shot",
                    supports.len()
                );
                differences.ones_like()
            }
        };
        let estimate = (&weights * &differences).sum_dim_intlist(&[1i64][..], true, Kind::Float);
        let mut prototypes = Vec::new();
        let mut priors = Vec::new();
        for (support, mask) in supports.iter().zip(masks) {
            let feat = down(&self.down_supp, &support.mid);
            prototypes.push(weighted_gap(&feat, &resize(mask, mid_size)));
            priors.push(resize(
                &prior_mask(&query.high, &support.high, mask),
                mid_size,
            ));
        }
        let prior =
            (Tensor::cat(&priors, 1) * &weights).sum_dim_intlist(&[1i64][..], true, Kind::Float);
        // [B, d, K, 1] weighted by [B, 1, K, 1].
        let prototype = (Tensor::cat(&prototypes, 2) * weights.permute([0, 2, 1, 3]))
            .sum_dim_intlist(&[2i64][..], true, Kind::Float);
        let merged = self.init_merge.forward_relu(&Tensor::cat(
            &[&query_feat, &prototype.expand_as(&query_feat), &prior],
            1,
        ));
        let fused = self.res1.forward_relu(&self.aspp.forward(&merged));
        let refined = self.res2.1.forward_relu(&self.res2.0.forward_relu(&fused)) + &fused;
        let meta = self.cls_out.forward(
            &self
                .cls_hidden
                .forward_relu(&refined)
                .feature_dropout(CLS_DROPOUT, train),
        );
        let base = resize(base, mid_size);
        let logits = ensemble(
            &meta,
            &base,
            &estimate,
            exclude_channel,
            &self.gram_merge,
            &self.cls_merge,
        );
        BamOutput {
            logits,
            meta_logits: meta,
            base_logits: base,
        }
    }

    /// BAM's loss `CE(ensemble) + aux_weight1 · CE(meta)`, ignoring label 255. (The base learner's
    /// term is left out: it carries no gradient while the base learner is frozen.)
    pub fn loss(&self, out: &BamOutput, query_label: &Tensor) -> Tensor {
        let (main, aux) = self.loss_terms(out, query_label);
        main + aux * self.aux_weight
    }

    /// The two terms of [`Bam::loss`]: the ensemble's cross-entropy and the meta learner's.
    pub fn loss_terms(&self, out: &BamOutput, query_label: &Tensor) -> (Tensor, Tensor) {
        let ce = |logits: &Tensor| {
            let size = query_label.size();
            resize(logits, [size[1], size[2]]).cross_entropy_loss::<Tensor>(
                query_label,
                None,
                Reduction::Mean,
                i64::from(IGNORE_LABEL),
                0.0,
            )
        };
        (ce(&out.logits), ce(&out.meta_logits))
    }
}

/// The name in this model of a variable of BAM's released meta-stage checkpoints (after
/// `scripts/convert_weights.py`, which strips DistributedDataParallel's `module.`): BAM keeps the
/// base learner's backbone at the root (`layer0.*`..`layer4.*`) and its head as `learner_base.0.*`
/// (the pyramid pooling) and `learner_base.1.*` (the classifier); here they live under `base.` with
/// PSPNet's names. The meta modules keep their names. With `svf` (the SVF authors' BAM+SVF
/// checkpoints) the full-rank originals are `layer0p.*`.. and map likewise, while the decomposed
/// copy `layer0.*`.. stays at the root.
pub fn from_released_name(name: &str, svf: bool) -> String {
    if let Some(rest) = name.strip_prefix("learner_base.0.") {
        return format!("{BASE_LEARNER}.ppm.{rest}");
    }
    if let Some(rest) = name.strip_prefix("learner_base.1.") {
        return format!("{BASE_LEARNER}.cls.{rest}");
    }
    for stage in 0..5 {
        let original = format!("layer{stage}p.");
        if let Some(rest) = name.strip_prefix(&original) {
            return format!("{BASE_LEARNER}.layer{stage}.{rest}");
        }
        if !svf && name.starts_with(&format!("layer{stage}.")) {
            return format!("{BASE_LEARNER}.{name}");
        }
    }
    name.to_string()
}

/// A base learner saved by BAM's `train_base.py` (converted by `scripts/convert_weights.py`):
/// its PSPNet registers the backbone twice, as `layer0`..`layer4` and as `encoder.0`..`encoder.4`,
/// so the state dict holds every backbone tensor under both names. Keeps ours, `layer{i}.*`.
pub fn without_encoder_aliases(weights: Vec<(String, Tensor)>) -> Vec<(String, Tensor)> {
    let names: std::collections::HashSet<String> =
        weights.iter().map(|(name, _)| name.clone()).collect();
    weights
        .into_iter()
        .filter_map(|(name, t)| {
            let Some((stage, rest)) = name
                .strip_prefix("encoder.")
                .and_then(|rest| rest.split_once('.'))
            else {
                return Some((name, t));
            };
            let ours = format!("layer{stage}.{rest}");
            (!names.contains(&ours)).then_some((ours, t))
        })
        .collect()
}

/// Whether a state dict uses the naming of BAM's released checkpoints (`learner_base.*`, or the
/// SVF authors' full-rank originals `layer0p.*`..) rather than ours.
pub fn is_released_naming(weights: &[(String, Tensor)]) -> bool {
    weights.iter().any(|(name, _)| {
        name.starts_with("learner_base.")
            || (0..5).any(|stage| name.starts_with(&format!("layer{stage}p.")))
    })
}

/// Whether a BAM variable is trained in the meta stage: never the base learner (`base.`), the
/// SVF copy as [`crate::svf::is_trainable`] says (layer2..4 `vector_S`), every meta module.
pub fn is_trainable(name: &str, svf_enabled: bool) -> bool {
    !name.starts_with(&format!("{BASE_LEARNER}.")) && crate::svf::is_trainable(name, svf_enabled)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    const OPTS: (Kind, Device) = (Kind::Float, Device::Cpu);

    #[test]
    fn encoder_aliases_of_a_released_base_learner_are_dropped() {
        let t = |v: f64| Tensor::from_slice(&[v]);
        let weights = vec![
            ("layer1.0.conv1.weight".to_string(), t(1.0)),
            ("encoder.1.0.conv1.weight".to_string(), t(1.0)),
            ("encoder.2.0.conv1.weight".to_string(), t(2.0)),
            ("ppm.features.0.1.weight".to_string(), t(3.0)),
        ];
        let kept: Vec<(String, f64)> = without_encoder_aliases(weights)
            .into_iter()
            .map(|(n, t)| (n, t.double_value(&[0])))
            .collect();
        assert_eq!(
            kept,
            [
                ("layer1.0.conv1.weight".to_string(), 1.0),
                ("layer2.0.conv1.weight".to_string(), 2.0),
                ("ppm.features.0.1.weight".to_string(), 3.0),
            ]
        );
    }

    #[test]
    fn released_names_map_onto_ours_and_cover_the_model() {
        let cases = [
            ("layer0.0.weight", false, "base.layer0.0.weight"),
            (
                "layer3.2.bn2.running_var",
                false,
                "base.layer3.2.bn2.running_var",
            ),
            (
                "learner_base.0.features.3.1.weight",
                false,
                "base.ppm.features.3.1.weight",
            ),
            ("learner_base.1.4.bias", false, "base.cls.4.bias"),
            (
                "ASPP_meta.layer6_2.0.weight",
                false,
                "ASPP_meta.layer6_2.0.weight",
            ),
            ("layer2.0.conv1.vector_S", true, "layer2.0.conv1.vector_S"),
            ("layer4p.1.conv2.weight", true, "base.layer4.1.conv2.weight"),
        ];
        for (name, svf, ours) in cases {
            assert_eq!(from_released_name(name, svf), ours, "{name}");
        }
        // BAM's state_dict names (ours with the base learner written BAM's way) map back onto
        // exactly our variables.
        let vs = nn::VarStore::new(Device::Cpu);
        let config = Config {
            layers: 18,
            backbone_width: 0.25,
            shot: 5,
            ..Config::default()
        };
        Bam::new(&vs.root(), &config, Init::Zeros).unwrap();
        let ours: std::collections::BTreeSet<String> = vs.variables().into_keys().collect();
        let released: Vec<String> = ours
            .iter()
            .map(|n| {
                n.replace("base.ppm.", "learner_base.0.")
                    .replace("base.cls.", "learner_base.1.")
                    .replace("base.layer", "layer")
            })
            .collect();
        let mapped: std::collections::BTreeSet<String> = released
            .iter()
            .map(|n| from_released_name(n, false))
            .collect();
        assert_eq!(mapped, ours);
    }

    #[test]
    fn gram_of_orthogonal_channels_is_the_identity() {
        // Channel 0 lives on the left half, channel 1 on the right: cosine 0 between them.
        let feat = Tensor::zeros([1, 2, 2, 2], OPTS);
        let _ = feat.select(1, 0).narrow(2, 0, 1).fill_(3.0);
        let _ = feat.select(1, 1).narrow(2, 1, 1).fill_(2.0);
        let gram = gram_matrix(&feat);
        let expected = Tensor::eye(2, OPTS).unsqueeze(0);
        assert!((gram - expected).abs().max().double_value(&[]) < 1e-6);
    }

    #[test]
    fn ensemble_starts_as_the_meta_prediction_plus_base_evidence() {
        let meta = Tensor::randn([2, 2, 3, 3], OPTS);
        let base = Tensor::randn([2, 4, 3, 3], OPTS);
        let estimate = Tensor::rand([2, 1, 1, 1], OPTS);
        let vs = nn::VarStore::new(Device::Cpu);
        let (g, c) = (merge_conv(vs.root() / "g"), merge_conv(vs.root() / "c"));
        let out = ensemble(&meta, &base, &estimate, None, &g, &c);
        let meta_soft = meta.softmax(1, Kind::Float);
        let base_soft = base.softmax(1, Kind::Float);
        // Weights [1, 0]: the Gram estimate and the base evidence do not count yet.
        assert!(
            (out.select(1, 1) - meta_soft.select(1, 1))
                .abs()
                .max()
                .double_value(&[])
                < 1e-6
        );
        // Excluding channel 2 of the first image and 3 of the second changes nothing at [1, 0] …
        let exclude = Tensor::from_slice(&[2i64, 3]);
        let excluded = ensemble(&meta, &base, &estimate, Some(&exclude), &g, &c);
        assert!((&excluded - &out).abs().max().double_value(&[]) < 1e-6);
        // … but does once cls_merge weighs the base evidence: bg = base evidence alone.
        tch::no_grad(|| {
            c.ws.shallow_clone()
                .copy_(&Tensor::from_slice(&[0.0f32, 1.0]).reshape([1, 2, 1, 1]));
        });
        let evidence = ensemble(&meta, &base, &estimate, Some(&exclude), &g, &c);
        let expected0 =
            base_soft
                .get(0)
                .narrow(0, 1, 1)
                .sum_dim_intlist(&[0i64][..], false, Kind::Float)
                + base_soft.get(0).select(0, 3);
        assert!(
            (evidence.get(0).select(0, 0) - expected0)
                .abs()
                .max()
                .double_value(&[])
                < 1e-6
        );
    }
}
