//! PSPNet, BAM's base learner (Lang et al., CVPR 2022, `model/PSPNet.py`): the dilated backbone,
//! a pyramid pooling module over layer4 (bins 1, 2, 3, 6) and a classifier over the fold's base
//! classes plus background. Trained in BAM's first stage by ordinary supervised segmentation;
//! frozen and gradient-free in the second (see [`super::bam`]).
//!
//! Variables carry the names of BAM's PSPNet `state_dict`: `layer0.*`..`layer4.*` (the backbone,
//! always full-rank), `ppm.features.{i}.1.weight` and `.2.*` (1×1 conv, BatchNorm per bin),
//! `cls.0.weight`, `cls.1.*`, `cls.4.weight`, `cls.4.bias`; so a released
//! `initmodel/PSPNet/.../best.pth`, once converted, loads as is.

use tch::nn::{self, Module};
use tch::{Reduction, Tensor};

use crate::backbone::{Backbone, BatchNormState, Init};
use crate::config::Config;
use crate::data::IGNORE_LABEL;

use super::head::{conv, resize, HeadConv};
use super::ModelError;

/// PSPNet's pyramid of adaptive-pooling bins.
pub const PPM_BINS: [i64; 4] = [1, 2, 3, 6];
/// Hidden width of PSPNet's classifier.
const CLS_HIDDEN: i64 = 512;
/// Dropout2d inside the classifier.
const CLS_DROPOUT: f64 = 0.1;

/// Channel count of the base learner's classifier: the fold's base classes and background (16 on
/// PASCAL-5i, 61 on COCO-20i).
pub fn base_learner_classes(config: &Config) -> i64 {
    let classes = config.dataset_classes();
    (classes - classes / 4 + 1) as i64
}

/// BatchNorm2d on an [`nn::Path`] (the backbone's lives inside its naming scope).
fn batch_norm(p: nn::Path, channels: i64) -> BatchNormState {
    let add = |name: &str, tensor: Tensor, is_parameter| {
        p.add(name, tensor.set_requires_grad(false), is_parameter)
    };
    BatchNormState::new(channels, p.device(), add)
}

/// One bin of the pyramid: adaptive average pooling, 1×1 conv, BatchNorm, ReLU.
struct PyramidBin {
    bin: i64,
    conv: HeadConv,
    bn: BatchNormState,
}

/// PSPNet's head on layer4 (BAM's `learner_base`): the pyramid pooling module and the classifier.
pub struct PspHead {
    bins: Vec<PyramidBin>,
    cls_conv: HeadConv,
    cls_bn: BatchNormState,
    cls_out: HeadConv,
}

impl PspHead {
    /// `in_channels`: layer4's channels (2048 for ResNet-50, 512 for VGG-16); `classes`:
    /// output channels (base classes + background).
    pub fn new(root: &nn::Path, in_channels: i64, classes: i64) -> PspHead {
        let reduction = in_channels / PPM_BINS.len() as i64;
        let features = root / "ppm" / "features";
        let bins = PPM_BINS
            .iter()
            .enumerate()
            .map(|(i, &bin)| PyramidBin {
                bin,
                conv: conv(&features / i / "1", in_channels, reduction, 1, false),
                bn: batch_norm(&features / i / "2", reduction),
            })
            .collect();
        let cls = root / "cls";
        let pooled = in_channels + reduction * PPM_BINS.len() as i64;
        PspHead {
            bins,
            cls_conv: conv(&cls / "0", pooled, CLS_HIDDEN, 3, false),
            cls_bn: batch_norm(&cls / "1", CLS_HIDDEN),
            cls_out: conv(&cls / "4", CLS_HIDDEN, classes, 1, true),
        }
    }

    /// Class logits `[B, classes, h, w]` at layer4's resolution. `train`: BatchNorm in training
    /// mode and dropout on.
    pub fn forward(&self, feat4: &Tensor, train: bool) -> Tensor {
        self.forward_t(feat4, train, train)
    }

    /// [`PspHead::forward`] with BatchNorm's mode and dropout set apart: BAM's meta stage runs the
    /// frozen base learner with BatchNorm fixed (`fix_bn`) while `model.train()` leaves its
    /// dropout on.
    pub fn forward_t(&self, feat4: &Tensor, bn_train: bool, dropout: bool) -> Tensor {
        let size = feat4.size();
        let spatial = [size[2], size[3]];
        let mut pyramid = vec![feat4.shallow_clone()];
        for bin in &self.bins {
            let pooled = feat4.adaptive_avg_pool2d([bin.bin, bin.bin]);
            let reduced = bin.bn.forward(&bin.conv.forward(&pooled), bn_train).relu();
            pyramid.push(resize(&reduced, spatial));
        }
        let hidden = self
            .cls_bn
            .forward(&self.cls_conv.forward(&Tensor::cat(&pyramid, 1)), bn_train)
            .relu()
            .feature_dropout(CLS_DROPOUT, dropout);
        self.cls_out.forward(&hidden)
    }
}

/// PSPNet: backbone and [`PspHead`] under one root with BAM's PSPNet names.
pub struct PspNet {
    pub backbone: Backbone,
    pub head: PspHead,
}

impl PspNet {
    /// The base learner of `config`'s dataset and fold: always a full-rank backbone (the `svf*`
    /// keys shape only BAM's meta branch), `classes` outputs (see [`base_learner_classes`]).
    pub fn new(
        root: &nn::Path,
        config: &Config,
        classes: i64,
        init: Init,
    ) -> Result<PspNet, ModelError> {
        let full_rank = Config {
            svf: false,
            ..config.clone()
        };
        let backbone = Backbone::with_init(root, &full_rank, init)?;
        let head = PspHead::new(root, backbone.out_channels()[4], classes);
        Ok(PspNet { backbone, head })
    }

    /// layer4 of `images`; `bn_train`: backbone BatchNorm in training mode.
    pub fn encode(&self, images: &Tensor, bn_train: bool) -> Tensor {
        (0..5).fold(images.shallow_clone(), |x, i| {
            self.backbone.forward_layer(i, &x, bn_train)
        })
    }

    /// Class logits `[B, classes, H, W]` at the input size (bilinear, align_corners, BAM's zoom
    /// factor 8). `train`: BatchNorm in training mode (BAM trains it in the base stage), dropout.
    pub fn forward(&self, images: &Tensor, train: bool) -> Tensor {
        let size = images.size();
        let logits = self.head.forward(&self.encode(images, train), train);
        resize(&logits, [size[2], size[3]])
    }

    /// Cross-entropy over the classes, ignoring label 255 (BAM's base-stage loss).
    pub fn loss(logits: &Tensor, label: &Tensor) -> Tensor {
        let size = label.size();
        resize(logits, [size[1], size[2]]).cross_entropy_loss::<Tensor>(
            label,
            None,
            Reduction::Mean,
            i64::from(IGNORE_LABEL),
            0.0,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn names_are_bam_pspnet_names_and_shapes_follow_the_bins() {
        let vs = nn::VarStore::new(Device::Cpu);
        let config = Config {
            layers: 18,
            backbone_width: 0.25,
            svf: true,
            ..Config::default()
        };
        let model = PspNet::new(&vs.root(), &config, 16, Init::Random).unwrap();
        let vars = vs.variables();
        let c4 = model.backbone.out_channels()[4];
        assert_eq!(vars["ppm.features.0.1.weight"].size(), [c4 / 4, c4, 1, 1]);
        assert!(vars.contains_key("ppm.features.3.2.num_batches_tracked"));
        assert_eq!(vars["cls.0.weight"].size(), [512, 2 * c4, 3, 3]);
        assert_eq!(vars["cls.4.bias"].size(), [16]);
        // The base learner is full-rank even when the run decomposes the meta branch.
        assert!(vars.keys().all(|n| !n.contains("vector_S")));
        let out = tch::no_grad(|| {
            model.forward(
                &Tensor::randn([2, 3, 65, 65], (Kind::Float, Device::Cpu)),
                false,
            )
        });
        assert_eq!(out.size(), [2, 16, 65, 65]);
    }

    #[test]
    fn base_classes_with_background() {
        assert_eq!(base_learner_classes(&Config::default()), 16);
        let coco = Config {
            use_coco: true,
            ..Config::default()
        };
        assert_eq!(base_learner_classes(&coco), 61);
    }
}
