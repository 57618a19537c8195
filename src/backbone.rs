//! Dilated ResNet / VGG backbones exposing layer0..layer4, each convolution full-rank or SVD form.
//!
//! Variables carry PFENet's names (`layer0.0.weight`, `layer1.0.conv1.weight`, SVD form
//! `layer2.0.conv1.conv_U.weight`, `.conv_V.weight`, `.vector_S`), derived from the structure:
//! every stage is a sequence whose positions are the names, as in PyTorch.

mod layers;
pub(crate) mod onednn;
mod resnet;
mod vgg;
mod weights;

use std::path::PathBuf;

use tch::{nn, Tensor};

use crate::config::Config;
use crate::svf::SvfOptions;
pub(crate) use layers::BatchNormState;
pub use layers::Init;
use layers::{Scope, Stage};
use resnet::ResNetLayout;
pub use weights::{
    backbone_variables, decompose_pretrained, load_pretrained, read_backbone_weights,
    write_weights, WeightMismatch,
};

/// Why a backbone could not be built or loaded.
#[derive(Debug, thiserror::Error)]
pub enum BackboneError {
    #[error("config key `layers`: {0} is not a ResNet depth this project builds (18, 34, 50, 101); or set `vgg: true`")]
    UnsupportedDepth(usize),
    #[error(transparent)]
    Read(#[from] crate::checkpoint::CheckpointError),
    #[error("backbone weights {path} do not fit the configured backbone ({backbone}){mismatch}; {advice}")]
    Mismatch {
        path: PathBuf,
        backbone: String,
        mismatch: Box<WeightMismatch>,
        /// What to change: the config keys, or the file when no key can make it fit.
        advice: String,
    },
    #[error("backbone weights {path} are decomposed with truncated ranks ({layers}): recomposed, they are not the pretrained weights a full-rank backbone (`svf: false`) starts from; give the full-rank file that svf-decompose read (see README \"Pretrained weights\"), or set `svf: true`")]
    TruncatedFactors { path: PathBuf, layers: String },
    #[error("--out {out} is the --weights file {input}: the decomposition is lossy and would replace the original; write it elsewhere")]
    OutputIsInput { out: PathBuf, input: PathBuf },
    #[error("--out {0} exists; pass --overwrite to replace it, or write elsewhere")]
    OutputExists(PathBuf),
    #[error("{0}")]
    UnknownSvfPrefix(crate::svf::UnknownPrefix),
    #[error(
        "{path} is already decomposed (it has `vector_S` entries); give the full-rank weights"
    )]
    AlreadyDecomposed { path: PathBuf },
}

/// The backbone of PFENet: five stages run one at a time, because the head taps layer2, layer3
/// and layer4 and runs layer4 on masked features.
#[derive(Debug)]
pub struct Backbone {
    stages: Vec<Stage>,
    out_channels: [i64; 5],
}

impl Backbone {
    /// Variables under `root` with PFENet's names (`layer0.0.weight`, `layer1.0.conv1.weight`, ...;
    /// SVF form: `layer2.0.conv1.conv_U.weight`, `.conv_V.weight`, `.vector_S`). Random init
    /// (kaiming; SVF form = decomposition of a random full-rank weight). Shape from config:
    /// `layers` (18/34/50/101), `vgg`, `backbone_width`, `svf*` keys. Only the variables that
    /// [`crate::svf::is_trainable`] names are created trainable.
    pub fn new(root: &nn::Path, config: &Config) -> Result<Backbone, BackboneError> {
        Backbone::with_init(root, config, Init::Random)
    }

    /// [`Backbone::new`] with the convolutions started as `init` says: [`Init::Zeros`] when
    /// weights are loaded right after, which skips an SVD per convolution (seconds for ResNet-50).
    pub fn with_init(
        root: &nn::Path,
        config: &Config,
        init: Init,
    ) -> Result<Backbone, BackboneError> {
        let options = config.svf.then(|| SvfOptions::from_config(config));
        Backbone::build(root, config, init, options.as_ref(), options.as_ref())
    }

    /// The full-rank form of the configured backbone, its `svf_exclude` and `svf_layer_ratios`
    /// prefixes checked as for the SVF form: what a full-rank file is checked against before it
    /// is decomposed with those options.
    pub(crate) fn full_rank_checked(
        root: &nn::Path,
        config: &Config,
        init: Init,
    ) -> Result<Backbone, BackboneError> {
        let full_rank = Config {
            svf: false,
            ..config.clone()
        };
        let options = SvfOptions::from_config(config);
        Backbone::build(root, &full_rank, init, None, Some(&options))
    }

    /// Builds the stages, decomposing the convolutions that `svf` selects, and checks the
    /// prefixes of `prefixes` against the convolutions' names.
    fn build(
        root: &nn::Path,
        config: &Config,
        init: Init,
        svf: Option<&SvfOptions>,
        prefixes: Option<&SvfOptions>,
    ) -> Result<Backbone, BackboneError> {
        let conv_names = std::cell::RefCell::new(Vec::new());
        let scope = Scope::root(root, svf, init, &conv_names);
        let (stages, out_channels) = if config.vgg {
            vgg::build(&scope, config.backbone_width)
        } else {
            let layout = ResNetLayout::of_depth(config.layers)
                .ok_or(BackboneError::UnsupportedDepth(config.layers))?;
            resnet::build(&scope, layout, config.backbone_width, config.dilation)
        };
        if let Some(options) = prefixes {
            options
                .check_prefixes(&conv_names.borrow())
                .map_err(BackboneError::UnknownSvfPrefix)?;
        }
        Ok(Backbone {
            stages,
            out_channels,
        })
    }

    /// Output channels of layer0..layer4.
    pub fn out_channels(&self) -> [i64; 5] {
        self.out_channels
    }

    /// Per residual block of stage `index` (0..=4): its main-path convolutions' geometry and its
    /// shortcut's. Empty for VGG and the stem.
    #[cfg(test)]
    pub(crate) fn block_geometries(
        &self,
        index: usize,
    ) -> Vec<(
        Vec<crate::svf::ConvGeometry>,
        Option<crate::svf::ConvGeometry>,
    )> {
        self.stages[index]
            .blocks()
            .map(|b| (b.conv_geometries(), b.downsample_geometry()))
            .collect()
    }

    /// How far around a position stage `index`'s output reads its input (see `Stage::reach`):
    /// 12 for PFENet's ResNet layer4 (three 3×3 convolutions at dilation 4). `None` where the
    /// stage changes the size or is not made of residual blocks (stems, VGG).
    pub fn layer_reach(&self, index: usize) -> Option<i64> {
        self.stages[index].reach()
    }

    /// Runs stage `index` (0..=4). `bn_train`: BatchNorm in training mode (false with fix_bn).
    pub fn forward_layer(&self, index: usize, x: &Tensor, bn_train: bool) -> Tensor {
        self.stages[index].forward(x, bn_train)
    }
}

/// Whether backbone BatchNorm runs in training mode: only while training and without `fix_bn`
/// (BAM's default keeps it in eval mode; PFENet let its statistics drift).
pub fn batch_norm_training(config: &Config, training: bool) -> bool {
    training && !config.fix_bn
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn small(layers: usize, svf: bool) -> Config {
        Config {
            layers,
            backbone_width: 0.25,
            svf,
            ..Config::default()
        }
    }

    fn shapes(backbone: &Backbone, size: i64) -> Vec<Vec<i64>> {
        tch::no_grad(|| {
            let mut x = Tensor::randn([1, 3, size, size], (Kind::Float, Device::Cpu));
            (0..5)
                .map(|i| {
                    x = backbone.forward_layer(i, &x, false);
                    x.size()
                })
                .collect()
        })
    }

    #[test]
    fn svf_prefixes_must_name_a_convolution_and_layer_ratios_set_ranks() {
        let build = |config: Config| {
            let vs = nn::VarStore::new(Device::Cpu);
            Backbone::with_init(&vs.root(), &config, Init::Zeros).map(|_| vs)
        };
        for (exclude, ratios) in [
            (vec!["layer9".to_string()], vec![]),
            (vec!["layer1.0.conv".to_string()], vec![]),
            (vec![], vec![("layer4.9".to_string(), 0.5)]),
        ] {
            let config = Config {
                svf_exclude: exclude.clone(),
                svf_layer_ratios: ratios.into_iter().collect(),
                ..small(18, true)
            };
            let err = build(config).unwrap_err();
            assert!(
                matches!(err, BackboneError::UnknownSvfPrefix(_)),
                "{exclude:?}: {err}"
            );
        }
        let config = Config {
            svf_exclude: vec!["layer0.0".into(), "layer1.0.conv1".into()],
            svf_layer_ratios: [("layer4".to_string(), 0.5)].into_iter().collect(),
            ..small(18, true)
        };
        let variables = build(config).unwrap().variables();
        assert!(variables.contains_key("layer0.0.weight"));
        assert!(variables.contains_key("layer1.0.conv1.weight"));
        assert!(variables.contains_key("layer1.0.conv2.vector_S"));
        // ResNet-18 at width 1/4: layer4's 3×3 convs are 128 → 128, full rank 128, halved to 64.
        assert_eq!(variables["layer4.0.conv2.vector_S"].size(), [1, 64, 1, 1]);
        assert_eq!(variables["layer3.0.conv2.vector_S"].size(), [1, 64, 1, 1]);
    }

    #[test]
    fn small_resnet_has_output_stride_8() {
        for svf in [false, true] {
            let vs = nn::VarStore::new(Device::Cpu);
            let backbone = Backbone::new(&vs.root(), &small(18, svf)).unwrap();
            assert_eq!(backbone.out_channels(), [32, 16, 32, 64, 128]);
            assert_eq!(
                shapes(&backbone, 65),
                [
                    vec![1, 32, 17, 17],
                    vec![1, 16, 17, 17],
                    vec![1, 32, 9, 9],
                    vec![1, 64, 9, 9],
                    vec![1, 128, 9, 9]
                ]
            );
        }
    }

    #[test]
    fn small_bottleneck_and_vgg_shapes() {
        let vs = nn::VarStore::new(Device::Cpu);
        let backbone = Backbone::new(&vs.root(), &small(50, true)).unwrap();
        assert_eq!(backbone.out_channels(), [32, 64, 128, 256, 512]);
        assert_eq!(shapes(&backbone, 65)[4], [1, 512, 9, 9]);
        let vs = nn::VarStore::new(Device::Cpu);
        let config = Config {
            vgg: true,
            ..small(50, false)
        };
        let backbone = Backbone::new(&vs.root(), &config).unwrap();
        assert_eq!(backbone.out_channels(), [16, 32, 64, 128, 128]);
        // Ceil-mode max-pools: 65 → 33 → 17 → 9 → 5, layer4 without pool.
        let sizes: Vec<i64> = shapes(&backbone, 65).iter().map(|s| s[2]).collect();
        assert_eq!(sizes, [33, 17, 9, 5, 5]);
    }

    #[test]
    fn zero_init_has_the_random_init_variables_and_computes_the_same_once_loaded() {
        for svf in [false, true] {
            let config = small(50, svf);
            let random_vs = nn::VarStore::new(Device::Cpu);
            let random = Backbone::new(&random_vs.root(), &config).unwrap();
            let zero_vs = nn::VarStore::new(Device::Cpu);
            let zero = Backbone::with_init(&zero_vs.root(), &config, Init::Zeros).unwrap();
            let random_vars = random_vs.variables();
            let zero_vars = zero_vs.variables();
            assert_eq!(random_vars.len(), zero_vars.len());
            for (name, var) in &zero_vars {
                assert_eq!(var.size(), random_vars[name].size(), "{name}");
                assert_eq!(
                    var.requires_grad(),
                    random_vars[name].requires_grad(),
                    "{name}"
                );
            }
            let conv_weight = if svf {
                "layer2.0.conv1.conv_V.weight"
            } else {
                "layer2.0.conv1.weight"
            };
            assert_eq!(
                zero_vars[conv_weight]
                    .abs()
                    .sum(Kind::Float)
                    .double_value(&[]),
                0.0
            );
            tch::no_grad(|| {
                for (name, var) in &zero_vars {
                    var.shallow_clone().copy_(&random_vars[name]);
                }
            });
            let x = Tensor::randn([1, 3, 33, 33], (Kind::Float, Device::Cpu));
            let run = |b: &Backbone| {
                tch::no_grad(|| {
                    (0..5).fold(x.shallow_clone(), |x, i| b.forward_layer(i, &x, false))
                })
            };
            assert!(
                run(&random).allclose(&run(&zero), 0.0, 0.0, false),
                "svf {svf}"
            );
        }
    }

    #[test]
    fn torchvision_dilation_changes_only_the_first_blocks_of_layer3_and_layer4() {
        use crate::config::DilationPattern;
        for (layers, svf) in [(50, false), (50, true), (18, true)] {
            let mut backbones = Vec::new();
            for pattern in [DilationPattern::Pfenet, DilationPattern::Torchvision] {
                let config = Config {
                    dilation: pattern,
                    ..small(layers, svf)
                };
                let vs = nn::VarStore::new(Device::Cpu);
                let backbone = Backbone::with_init(&vs.root(), &config, Init::Zeros).unwrap();
                // Same variables either way: checkpoints move between the two patterns.
                let mut names: Vec<String> = vs.variables().into_keys().collect();
                names.sort();
                // Output stride 8 either way.
                assert_eq!(shapes(&backbone, 65)[4][2..], [9, 9], "{pattern:?}");
                backbones.push((pattern, backbone, names));
            }
            assert_eq!(backbones[0].2, backbones[1].2);
            for (pattern, backbone, _) in &backbones {
                for (index, stage) in [(3, 2), (4, 4)] {
                    for (block, (convs, downsample)) in
                        backbone.block_geometries(index).iter().enumerate()
                    {
                        let expected = match (pattern, block) {
                            (DilationPattern::Torchvision, 0) => stage / 2,
                            _ => stage,
                        };
                        // The 3x3 convs carry the dilation (conv2 of a bottleneck, both of a
                        // basic block), with "same" padding and stride 1; 1x1 convs stay plain.
                        for g in convs {
                            assert_eq!(g.stride, 1, "{pattern:?} layer{index}.{block}");
                            let is_3x3 = g.padding > 0;
                            let want = if is_3x3 { expected } else { 1 };
                            assert_eq!(g.dilation, want, "{pattern:?} layer{index}.{block}");
                            assert_eq!(g.padding, if is_3x3 { want } else { 0 });
                        }
                        assert_eq!(
                            convs.iter().filter(|g| g.padding > 0).count(),
                            if layers == 50 { 1 } else { 2 }
                        );
                        if let Some(d) = downsample {
                            assert_eq!((d.stride, d.dilation), (1, 1));
                        }
                    }
                }
                // layer1/layer2 never dilate.
                for index in [1, 2] {
                    assert!(backbone
                        .block_geometries(index)
                        .iter()
                        .all(|(c, _)| c.iter().all(|g| g.dilation == 1)));
                }
            }
        }
    }

    #[test]
    fn unsupported_depth_names_the_key() {
        let vs = nn::VarStore::new(Device::Cpu);
        let err = Backbone::new(&vs.root(), &small(152, false)).unwrap_err();
        assert!(err.to_string().contains("`layers`"), "{err}");
    }
}
