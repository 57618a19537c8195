//! The building blocks of the backbones: convolutions (full-rank or SVD form), BatchNorm, residual
//! blocks, and the sequential stages that give every variable its PyTorch name by position.

use tch::{nn, Kind, Tensor};

use super::onednn::{Epilogue, PackCache};
use crate::svf::{self, ConvGeometry, SvdConv2d, SvdFactors, SvfOptions};

/// Where variables are created: a var-store path plus the name relative to the backbone root,
/// which decides decomposition (`svf_exclude`, per-layer ratios) and trainability independently
/// of where the caller mounted the backbone.
#[derive(Clone)]
pub(crate) struct Scope<'a> {
    path: nn::Path<'a>,
    name: String,
    svf: Option<&'a SvfOptions>,
    init: Init,
    /// Every convolution built under the root, by name: what `svf_exclude` and
    /// `svf_layer_ratios` prefixes are checked against.
    conv_names: &'a std::cell::RefCell<Vec<String>>,
}

/// How convolution weights start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Init {
    /// Kaiming-normal; in SVD form the decomposition of such a weight (one SVD per convolution).
    Random,
    /// Zeros of the right shapes, for weights that are loaded next: no random draw, no SVD.
    Zeros,
}

impl<'a> Scope<'a> {
    /// The backbone root; `svf` is `Some` when convolutions are decomposed.
    pub(crate) fn root(
        path: &nn::Path<'a>,
        svf: Option<&'a SvfOptions>,
        init: Init,
        conv_names: &'a std::cell::RefCell<Vec<String>>,
    ) -> Scope<'a> {
        Scope {
            path: path.clone(),
            name: String::new(),
            svf,
            init,
            conv_names,
        }
    }

    pub(crate) fn sub(&self, component: impl ToString) -> Scope<'a> {
        let component = component.to_string();
        Scope {
            path: self.path.sub(&component),
            name: self.qualified(&component),
            svf: self.svf,
            init: self.init,
            conv_names: self.conv_names,
        }
    }

    fn qualified(&self, leaf: &str) -> String {
        if self.name.is_empty() {
            leaf.to_string()
        } else {
            format!("{}.{leaf}", self.name)
        }
    }

    /// Registers `tensor` as variable `leaf`, trainable only where [`svf::is_trainable`] says so
    /// (so autograd never tracks frozen weights).
    fn add(&self, leaf: &str, tensor: Tensor) -> Tensor {
        let trainable = svf::is_trainable(&self.qualified(leaf), self.svf.is_some());
        self.path
            .add(leaf, tensor.set_requires_grad(false), trainable)
    }

    /// Registers a BatchNorm statistic: never trained.
    fn add_buffer(&self, leaf: &str, tensor: Tensor) -> Tensor {
        self.path.add(leaf, tensor.set_requires_grad(false), false)
    }

    fn device(&self) -> tch::Device {
        self.path.device()
    }
}

/// What a convolution computes, before it is created full-rank or in SVD form.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConvSpec {
    pub in_channels: i64,
    pub out_channels: i64,
    pub kernel: i64,
    pub geometry: ConvGeometry,
    pub bias: bool,
}

impl ConvSpec {
    /// `kernel`×`kernel`, no bias, stride 1, padding = dilation (a "same" conv when odd).
    pub(crate) fn new(in_channels: i64, out_channels: i64, kernel: i64) -> ConvSpec {
        ConvSpec {
            in_channels,
            out_channels,
            kernel,
            geometry: ConvGeometry {
                stride: 1,
                padding: kernel / 2,
                dilation: 1,
            },
            bias: false,
        }
    }

    pub(crate) fn stride(mut self, stride: i64) -> ConvSpec {
        self.geometry.stride = stride;
        self
    }

    /// Dilation with the padding that keeps the size (PFENet's layer3/layer4 change).
    pub(crate) fn dilation(mut self, dilation: i64) -> ConvSpec {
        self.geometry.dilation = dilation;
        self.geometry.padding = dilation * (self.kernel / 2);
        self
    }

    pub(crate) fn with_bias(mut self) -> ConvSpec {
        self.bias = true;
        self
    }
}

/// A convolution, full-rank or in SVD form (chosen at construction by the SVF options). The SVD
/// form keeps `conv_V` prepacked for oneDNN where it runs frozen ([`PackCache`]).
#[derive(Debug)]
pub(crate) enum Conv2d {
    Full {
        weight: Tensor,
        bias: Option<Tensor>,
        geometry: ConvGeometry,
    },
    Svd(SvdConv2d, PackCache),
}

impl Conv2d {
    /// With [`Init::Random`], Kaiming-normal (fan-out, ReLU) weights and zero bias like PSPNet's
    /// init; in SVD form the decomposition of such a random full-rank weight.
    pub(crate) fn new(scope: &Scope, spec: ConvSpec) -> Conv2d {
        let shape = [
            spec.out_channels,
            spec.in_channels,
            spec.kernel,
            spec.kernel,
        ];
        let float = (Kind::Float, scope.device());
        let bias = spec.bias.then(|| Tensor::zeros([spec.out_channels], float));
        let random = || {
            let std = (2.0 / (spec.out_channels * spec.kernel * spec.kernel) as f64).sqrt();
            Tensor::randn(shape, float) * std
        };
        scope.conv_names.borrow_mut().push(scope.name.clone());
        let rank = scope.svf.and_then(|o| o.rank_for(&scope.name, &shape));
        match rank {
            None => Conv2d::Full {
                weight: scope.add(
                    "weight",
                    match scope.init {
                        Init::Random => random(),
                        Init::Zeros => Tensor::zeros(shape, float),
                    },
                ),
                bias: bias.map(|b| scope.add("bias", b)),
                geometry: spec.geometry,
            },
            Some(rank) => {
                let factors = match scope.init {
                    Init::Random => svf::decompose_conv(&random(), rank),
                    Init::Zeros => SvdFactors {
                        u: Tensor::zeros([spec.out_channels, rank, 1, 1], float),
                        s: Tensor::zeros([1, rank, 1, 1], float),
                        v: Tensor::zeros([rank, spec.in_channels, spec.kernel, spec.kernel], float),
                    },
                };
                let u_scope = scope.sub("conv_U");
                let svd = SvdConv2d {
                    conv_u: u_scope.add("weight", factors.u),
                    conv_u_bias: bias.map(|b| u_scope.add("bias", b)),
                    conv_v: scope.sub("conv_V").add("weight", factors.v),
                    vector_s: scope.add("vector_S", factors.s),
                    geometry: spec.geometry,
                };
                Conv2d::Svd(svd, PackCache::default())
            }
        }
    }

    /// How far around a position its output reads the input (`dilation·(kernel/2)`), when the
    /// convolution keeps the size: stride 1 and that much padding. `None` otherwise.
    fn reach(&self) -> Option<i64> {
        let (geometry, kernel) = match self {
            Conv2d::Full {
                weight, geometry, ..
            } => (*geometry, weight.size()[2]),
            Conv2d::Svd(svd, _) => (svd.geometry, svd.conv_v.size()[2]),
        };
        let reach = geometry.dilation * (kernel / 2);
        (geometry.stride == 1 && geometry.padding == reach).then_some(reach)
    }

    /// Stride, padding and dilation (of `conv_V` in SVD form; `conv_U` is always plain).
    #[cfg(test)]
    pub(crate) fn geometry(&self) -> ConvGeometry {
        match self {
            Conv2d::Full { geometry, .. } => *geometry,
            Conv2d::Svd(svd, _) => svd.geometry,
        }
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            Conv2d::Full {
                weight,
                bias,
                geometry,
            } => geometry.conv2d(x, weight, bias.as_ref()),
            Conv2d::Svd(svd, _) => svd.forward(x),
        }
    }

    /// `epilogue(bn(conv(x)))`. With BatchNorm in eval mode (`fix_bn`, evaluation) the BatchNorm
    /// is folded into the convolution at use time (issue 14): its per-channel `scale·y + shift`
    /// scales the output rows of the weight (`conv_U`'s in SVD form, which comes after `vector_S`,
    /// so the fold is exact) and becomes the bias. The variables keep their values and names; the
    /// fold is part of the forward graph, so gradients reach `vector_S` (and any trainable weight)
    /// as before, and no activation is kept for a BatchNorm backward. Where nothing tracks
    /// gradients on the CPU the folded weight is also prepacked for oneDNN ([`PackCache`]), with
    /// the epilogue fused into the convolution.
    pub(crate) fn forward_bn(
        &self,
        x: &Tensor,
        bn: &BatchNorm2d,
        bn_train: bool,
        epilogue: Epilogue,
    ) -> Tensor {
        if bn_train {
            return epilogue.apply(bn.forward(&self.forward(x), true));
        }
        match self {
            Conv2d::Full {
                weight,
                bias,
                geometry,
            } => {
                let (weight, bias) = bn.fold(weight, bias.as_ref());
                bn.folded_packed
                    .conv2d(x, &weight, Some(&bias), *geometry, epilogue)
            }
            Conv2d::Svd(svd, packed_v) => {
                let h = packed_v.conv2d(x, &svd.conv_v, None, svd.geometry, Epilogue::NONE);
                let h = &h * svd.vector_s.to_kind(h.kind()); // as in `SvdConv2d::forward`
                let (weight, bias) = bn.fold(&svd.conv_u, svd.conv_u_bias.as_ref());
                bn.folded_packed
                    .conv2d(&h, &weight, Some(&bias), ConvGeometry::PLAIN, epilogue)
            }
        }
    }
}

/// PyTorch's BatchNorm2d eps.
const BN_EPS: f64 = 1e-5;

/// BatchNorm2d's state under PyTorch's names (`weight`, `bias`, `running_mean`, `running_var`,
/// `num_batches_tracked`, so state dicts map one to one), momentum 0.1, eps 1e-5: the backbone's
/// BatchNorm and the heads' (PSPNet's pyramid and classifier).
#[derive(Debug)]
pub(crate) struct BatchNormState {
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor,
}

impl BatchNormState {
    /// PyTorch's initial values, each registered by `add(name, tensor, is_parameter)` (the
    /// statistics with `is_parameter` false), which decides where it lives and whether it trains.
    pub(crate) fn new(
        channels: i64,
        device: tch::Device,
        add: impl Fn(&str, Tensor, bool) -> Tensor,
    ) -> BatchNormState {
        let float = (Kind::Float, device);
        BatchNormState {
            weight: add("weight", Tensor::ones([channels], float), true),
            bias: add("bias", Tensor::zeros([channels], float), true),
            running_mean: add("running_mean", Tensor::zeros([channels], float), false),
            running_var: add("running_var", Tensor::ones([channels], float), false),
            num_batches_tracked: add(
                "num_batches_tracked",
                Tensor::zeros([], (Kind::Int64, device)),
                false,
            ),
        }
    }

    /// `train`: batch statistics, and the running ones updated (PyTorch's training mode).
    pub(crate) fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        if train {
            tch::no_grad(|| {
                let _ = self.num_batches_tracked.shallow_clone().g_add_scalar_(1);
            });
        }
        x.batch_norm(
            Some(&self.weight),
            Some(&self.bias),
            Some(&self.running_mean),
            Some(&self.running_var),
            train,
            0.1,
            BN_EPS,
            true,
        )
    }

    /// Eval-mode BatchNorm as `y·scale + shift` per channel: `scale = weight / √(running_var + eps)`,
    /// `shift = bias − running_mean·scale`.
    fn eval_affine(&self) -> (Tensor, Tensor) {
        let scale = &self.weight * (&self.running_var + BN_EPS).rsqrt();
        let shift = &self.bias - &self.running_mean * &scale;
        (scale, shift)
    }
}

/// The backbone's BatchNorm2d: its [`BatchNormState`] and, for the eval mode, the preceding
/// convolution with it folded in.
#[derive(Debug)]
pub(crate) struct BatchNorm2d {
    state: BatchNormState,
    /// [`BatchNorm2d::fold`]'s last frozen result: (key, weight, bias).
    folded: std::sync::Mutex<Option<FoldedConv>>,
    /// The folded weight prepacked for oneDNN, for frozen use on the CPU.
    folded_packed: PackCache,
}

type FoldedConv = (Vec<i64>, Tensor, Tensor);

impl BatchNorm2d {
    pub(crate) fn new(scope: &Scope, channels: i64) -> BatchNorm2d {
        let add = |leaf: &str, tensor, is_parameter| match is_parameter {
            true => scope.add(leaf, tensor),
            false => scope.add_buffer(leaf, tensor),
        };
        BatchNorm2d {
            state: BatchNormState::new(channels, scope.device(), add),
            folded: std::sync::Mutex::new(None),
            folded_packed: PackCache::default(),
        }
    }

    /// The preceding conv's `weight` and `bias` with this eval-mode BatchNorm folded in: rows scaled
    /// by `scale`, bias `bias·scale + shift`. When nothing involved tracks gradients (frozen weights
    /// and statistics: `fix_bn` training, evaluation) the result is kept and reused until one of the
    /// tensors changes (their version counters and storage are the key, so loading weights, which
    /// copies into the variables, refreshes it); otherwise it is computed in the graph every time.
    fn fold(&self, weight: &Tensor, bias: Option<&Tensor>) -> (Tensor, Tensor) {
        let compute = || {
            let (scale, shift) = self.state.eval_affine();
            let folded_weight = weight * scale.reshape([-1, 1, 1, 1]);
            let folded_bias = match bias {
                Some(bias) => bias * &scale + &shift,
                None => shift,
            };
            (folded_weight, folded_bias)
        };
        let inputs = [
            Some(weight),
            bias,
            Some(&self.state.weight),
            Some(&self.state.bias),
            Some(&self.state.running_mean),
            Some(&self.state.running_var),
        ];
        if inputs.iter().flatten().any(|t| t.requires_grad()) {
            return compute();
        }
        let key: Vec<i64> = inputs
            .iter()
            .flat_map(|t| match t {
                Some(t) => [t.internal_version(), t.data_ptr() as i64],
                None => [-1, -1],
            })
            .collect();
        let mut cache = self.folded.lock().unwrap_or_else(|e| e.into_inner());
        match &*cache {
            Some((cached_key, w, b)) if *cached_key == key => {
                (w.shallow_clone(), b.shallow_clone())
            }
            _ => {
                let (w, b) = tch::no_grad(compute);
                *cache = Some((key, w.shallow_clone(), b.shallow_clone()));
                (w, b)
            }
        }
    }

    /// `train`: batch statistics, and the running ones updated (PyTorch's training mode).
    pub(crate) fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        self.state.forward(x, train)
    }
}

/// A residual block: conv→BN(→ReLU) pairs named `conv1`/`bn1`, `conv2`/`bn2`(, `conv3`/`bn3`),
/// plus the shortcut `downsample.0` (1×1 conv) / `downsample.1` (BN) when the shape changes.
#[derive(Debug)]
pub(crate) struct ResidualBlock {
    convs: Vec<(Conv2d, BatchNorm2d)>,
    downsample: Option<(Conv2d, BatchNorm2d)>,
}

impl ResidualBlock {
    pub(crate) fn new(
        scope: &Scope,
        specs: &[ConvSpec],
        downsample: Option<ConvSpec>,
    ) -> ResidualBlock {
        let convs = specs
            .iter()
            .enumerate()
            .map(|(i, spec)| {
                (
                    Conv2d::new(&scope.sub(format!("conv{}", i + 1)), *spec),
                    BatchNorm2d::new(&scope.sub(format!("bn{}", i + 1)), spec.out_channels),
                )
            })
            .collect();
        let downsample = downsample.map(|spec| {
            let scope = scope.sub("downsample");
            (
                Conv2d::new(&scope.sub(0), spec),
                BatchNorm2d::new(&scope.sub(1), spec.out_channels),
            )
        });
        ResidualBlock { convs, downsample }
    }

    /// How far around a position the block's output reads its input: the main path's reaches
    /// added up (the shortcut, a 1×1 or nothing, reads no further). `None` unless every
    /// convolution keeps the size.
    fn reach(&self) -> Option<i64> {
        let shortcut_keeps_size = match &self.downsample {
            Some((conv, _)) => conv.reach() == Some(0),
            None => true,
        };
        let main: Option<i64> = self.convs.iter().map(|(conv, _)| conv.reach()).sum();
        main.filter(|_| shortcut_keeps_size)
    }

    /// The geometry of the block's main-path convolutions (`conv1`, `conv2`, ...) in order.
    #[cfg(test)]
    pub(crate) fn conv_geometries(&self) -> Vec<ConvGeometry> {
        self.convs.iter().map(|(conv, _)| conv.geometry()).collect()
    }

    /// The shortcut convolution's geometry, when the block has one.
    #[cfg(test)]
    pub(crate) fn downsample_geometry(&self) -> Option<ConvGeometry> {
        self.downsample.as_ref().map(|(conv, _)| conv.geometry())
    }

    /// `relu(main(x) + shortcut(x))`, the ReLUs in place as the reference's ReLU(inplace=True):
    /// conv and BatchNorm keep no output for their backward.
    pub(crate) fn forward(&self, x: &Tensor, bn_train: bool) -> Tensor {
        let shortcut = match &self.downsample {
            Some((conv, bn)) => conv.forward_bn(x, bn, bn_train, Epilogue::NONE),
            None => x.shallow_clone(),
        };
        let mut h = x.shallow_clone();
        let last = self.convs.len() - 1;
        for (i, (conv, bn)) in self.convs.iter().enumerate() {
            let epilogue = Epilogue {
                add: (i == last).then_some(&shortcut),
                relu: true,
            };
            h = conv.forward_bn(&h, bn, bn_train, epilogue);
        }
        h
    }
}

/// One element of a stage; its position in the stage is its name (`layer0.3` = the 4th).
#[derive(Debug)]
pub(crate) enum Unit {
    Conv(Conv2d),
    BatchNorm(BatchNorm2d),
    Relu,
    MaxPool {
        kernel: i64,
        stride: i64,
        padding: i64,
        ceil_mode: bool,
    },
    Block(ResidualBlock),
}

/// A stage (`layer0`..`layer4`) under construction: units run in order, like `nn.Sequential`.
pub(crate) struct Sequential<'a> {
    scope: Scope<'a>,
    units: Vec<Unit>,
}

/// A built stage, detached from the var store paths.
#[derive(Debug)]
pub(crate) struct Stage {
    units: Vec<Unit>,
}

impl<'a> Sequential<'a> {
    pub(crate) fn new(scope: Scope<'a>) -> Sequential<'a> {
        Sequential {
            scope,
            units: Vec::new(),
        }
    }

    /// The scope the next unit's variables go in.
    pub(crate) fn next_scope(&self) -> Scope<'a> {
        self.scope.sub(self.units.len())
    }

    pub(crate) fn push(&mut self, unit: Unit) {
        self.units.push(unit);
    }

    /// conv, BatchNorm, ReLU: three positions, like the reference's stems.
    pub(crate) fn conv_bn_relu(&mut self, spec: ConvSpec) {
        self.units
            .push(Unit::Conv(Conv2d::new(&self.next_scope(), spec)));
        self.units.push(Unit::BatchNorm(BatchNorm2d::new(
            &self.next_scope(),
            spec.out_channels,
        )));
        self.units.push(Unit::Relu);
    }

    pub(crate) fn finish(self) -> Stage {
        Stage { units: self.units }
    }
}

impl Stage {
    /// How far (in positions) around a position the stage's output reads its input, for a stage
    /// of size-keeping residual blocks (PFENet's dilated layer3 and layer4): outputs more than
    /// that far inside a crop of the input equal the uncropped stage's. `None` for stems, VGG
    /// stages and strided blocks.
    pub(crate) fn reach(&self) -> Option<i64> {
        self.units
            .iter()
            .map(|unit| match unit {
                Unit::Block(block) => block.reach(),
                _ => None,
            })
            .sum()
    }

    /// The residual blocks of the stage, in order (none in a stem or VGG stage).
    #[cfg(test)]
    pub(crate) fn blocks(&self) -> impl Iterator<Item = &ResidualBlock> {
        self.units.iter().filter_map(|unit| match unit {
            Unit::Block(block) => Some(block),
            _ => None,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor, bn_train: bool) -> Tensor {
        let mut h = x.shallow_clone();
        let mut units = self.units.iter().peekable();
        while let Some(unit) = units.next() {
            h = match unit {
                Unit::Conv(conv) => match units.peek() {
                    Some(Unit::BatchNorm(bn)) => {
                        units.next();
                        let relu = matches!(units.peek(), Some(Unit::Relu));
                        if relu {
                            units.next();
                        }
                        let epilogue = Epilogue { add: None, relu };
                        conv.forward_bn(&h, bn, bn_train, epilogue)
                    }
                    _ => conv.forward(&h),
                },
                Unit::BatchNorm(bn) => bn.forward(&h, bn_train),
                // In place: what precedes a ReLU here (conv, BatchNorm) keeps no output for its
                // backward, so nothing autograd saved is overwritten.
                Unit::Relu => {
                    let _ = h.relu_();
                    h
                }
                Unit::MaxPool {
                    kernel,
                    stride,
                    padding,
                    ceil_mode,
                } => h.max_pool2d([*kernel], [*stride], [*padding], [1], *ceil_mode),
                Unit::Block(block) => block.forward(&h, bn_train),
            };
        }
        h
    }
}

// --- issue 14: BatchNorm folding -------------------------------------------------------------
#[cfg(test)]
mod fold_tests {
    use super::*;
    use tch::Device;

    fn max_rel_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[]) / b.abs().max().double_value(&[])
    }

    /// The folded conv+BatchNorm against the two run one after the other, for a full-rank and an
    /// SVD conv (with and without bias), in values and in the gradients of `vector_S` and the input.
    #[test]
    fn folded_batch_norm_equals_conv_then_batch_norm() {
        tch::manual_seed(3);
        let vs = nn::VarStore::new(Device::Cpu);
        let names = std::cell::RefCell::new(Vec::new());
        let options = SvfOptions {
            exclude: vec!["layer2.full".into()],
            ..SvfOptions::default()
        };
        let root = Scope::root(&vs.root(), Some(&options), Init::Random, &names);
        let stage = root.sub("layer2");
        let spec = ConvSpec::new(8, 12, 3).stride(2).dilation(2);
        let cases = [
            ("full", spec),
            ("svd", spec),
            ("svd_bias", spec.with_bias()),
        ];
        for (name, spec) in cases {
            let scope = stage.sub(name);
            let conv = Conv2d::new(&scope.sub("conv"), spec);
            let bn = BatchNorm2d::new(&scope.sub("bn"), spec.out_channels);
            tch::no_grad(|| {
                let float = (Kind::Float, Device::Cpu);
                let c = spec.out_channels;
                bn.state
                    .weight
                    .shallow_clone()
                    .copy_(&(Tensor::rand([c], float) + 0.5));
                bn.state
                    .bias
                    .shallow_clone()
                    .copy_(&Tensor::randn([c], float));
                bn.state
                    .running_mean
                    .shallow_clone()
                    .copy_(&Tensor::randn([c], float));
                bn.state
                    .running_var
                    .shallow_clone()
                    .copy_(&(Tensor::rand([c], float) + 0.1));
                if let Conv2d::Full {
                    bias: Some(bias), ..
                } = &conv
                {
                    bias.shallow_clone().copy_(&Tensor::randn([c], float));
                }
                if let Conv2d::Svd(
                    SvdConv2d {
                        conv_u_bias: Some(bias),
                        ..
                    },
                    _,
                ) = &conv
                {
                    bias.shallow_clone().copy_(&Tensor::randn([c], float));
                }
            });
            assert_eq!(matches!(conv, Conv2d::Svd(..)), name != "full", "{name}");
            let x = Tensor::randn([2, 8, 15, 15], (Kind::Float, Device::Cpu));
            let upstream = Tensor::randn([2, 12, 8, 8], (Kind::Float, Device::Cpu));
            let run = |folded: bool| {
                let x = x.copy().set_requires_grad(true);
                if let Conv2d::Svd(svd, _) = &conv {
                    svd.vector_s.shallow_clone().zero_grad();
                }
                let y = if folded {
                    conv.forward_bn(&x, &bn, false, Epilogue::NONE)
                } else {
                    bn.forward(&conv.forward(&x), false)
                };
                (&y * &upstream).sum(Kind::Float).backward();
                let s_grad = match &conv {
                    Conv2d::Svd(svd, _) => svd.vector_s.grad().copy(),
                    Conv2d::Full { .. } => Tensor::zeros([1], (Kind::Float, Device::Cpu)),
                };
                (y.detach(), x.grad(), s_grad)
            };
            let (y_fold, dx_fold, ds_fold) = run(true);
            let (y_ref, dx_ref, ds_ref) = run(false);
            assert!(max_rel_diff(&y_fold, &y_ref) < 1e-5, "{name}: output");
            assert!(
                max_rel_diff(&dx_fold, &dx_ref) < 1e-5,
                "{name}: input gradient"
            );
            if name != "full" {
                assert!(
                    max_rel_diff(&ds_fold, &ds_ref) < 1e-5,
                    "{name}: vector_S gradient"
                );
            }
        }
        // Frozen weights: the fold is kept, and refreshed when a weight or statistic changes (as
        // loading weights changes them, by copying into the variables).
        let conv = Conv2d::new(&stage.sub("c").sub("conv"), ConvSpec::new(8, 4, 3));
        let bn = BatchNorm2d::new(&stage.sub("c").sub("bn"), 4);
        let x = Tensor::randn([1, 8, 7, 7], (Kind::Float, Device::Cpu));
        let first = conv.forward_bn(&x, &bn, false, Epilogue::NONE);
        assert!(bn.folded.lock().unwrap().is_some());
        let again = conv.forward_bn(&x, &bn, false, Epilogue::NONE);
        assert_eq!(max_rel_diff(&again, &first), 0.0);
        tch::no_grad(|| {
            let var = Tensor::rand([4], (Kind::Float, Device::Cpu)) + 0.1;
            bn.state.running_var.shallow_clone().copy_(&var);
            if let Conv2d::Svd(svd, _) = &conv {
                svd.conv_u.shallow_clone().copy_(&(&svd.conv_u * 2.0));
            }
        });
        let changed = conv.forward_bn(&x, &bn, false, Epilogue::NONE);
        let reference = bn.forward(&conv.forward(&x), false);
        assert!(max_rel_diff(&changed, &reference) < 1e-5);
        assert!(max_rel_diff(&changed, &first) > 1e-3);
        // Training-mode BatchNorm is not folded: it still updates the running statistics.
        let conv = Conv2d::new(&stage.sub("t").sub("conv"), ConvSpec::new(8, 4, 1));
        let bn = BatchNorm2d::new(&stage.sub("t").sub("bn"), 4);
        let _ = conv.forward_bn(
            &Tensor::randn([2, 8, 5, 5], (Kind::Float, Device::Cpu)),
            &bn,
            true,
            Epilogue::NONE,
        );
        assert_eq!(i64::try_from(&bn.state.num_batches_tracked).unwrap(), 1);
        assert!(
            bn.state
                .running_mean
                .abs()
                .sum(Kind::Float)
                .double_value(&[])
                > 0.0
        );
    }
}
