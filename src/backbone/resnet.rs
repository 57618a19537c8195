//! PSPNet's deep-stem "ResNet v2" with PFENet's or torchvision's dilation (output stride 8):
//! bottleneck blocks for ResNet-50/101, basic blocks for the small ResNet-18/34 used by tests and
//! the CPU demo.

use tch::Tensor;

use crate::config::DilationPattern;
#[cfg(test)]
use crate::svf::ConvGeometry;

use super::layers::{BatchNorm2d, Conv2d, ConvSpec, Scope, Sequential, Stage, Unit};

/// Blocks per stage and block type of one depth.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ResNetLayout {
    pub blocks: [usize; 4],
    pub bottleneck: bool,
}

impl ResNetLayout {
    /// The layout of ResNet-`layers`, if it is one this project builds.
    pub(crate) fn of_depth(layers: usize) -> Option<ResNetLayout> {
        let (blocks, bottleneck) = match layers {
            18 => ([2, 2, 2, 2], false),
            34 => ([3, 4, 6, 3], false),
            50 => ([3, 4, 6, 3], true),
            101 => ([3, 4, 23, 3], true),
            _ => return None,
        };
        Some(ResNetLayout { blocks, bottleneck })
    }

    fn expansion(&self) -> i64 {
        if self.bottleneck {
            4
        } else {
            1
        }
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
    fn new(scope: &Scope, specs: &[ConvSpec], downsample: Option<ConvSpec>) -> ResidualBlock {
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

    pub(crate) fn forward(&self, x: &Tensor, bn_train: bool) -> Tensor {
        let mut h = x.shallow_clone();
        let last = self.convs.len() - 1;
        for (i, (conv, bn)) in self.convs.iter().enumerate() {
            h = conv.forward_bn(&h, bn, bn_train);
            if i < last {
                // In place, as the reference's ReLU(inplace=True): conv and BatchNorm keep no
                // output for their backward.
                let _ = h.relu_();
            }
        }
        let shortcut = match &self.downsample {
            Some((conv, bn)) => conv.forward_bn(x, bn, bn_train),
            None => x.shallow_clone(),
        };
        let mut out = h + shortcut;
        let _ = out.relu_();
        out
    }
}

/// `channels` scaled by the width multiplier, at least 4.
pub(crate) fn scaled(channels: i64, width: f64) -> i64 {
    ((channels as f64 * width).round() as i64).max(4)
}

/// The dilation of block `block` of stage `index` (0 = layer1 .. 3 = layer4) under `pattern`.
/// Only layer3 and layer4 dilate; they keep the resolution instead of downsampling.
pub(crate) fn block_dilation(pattern: DilationPattern, index: usize, block: usize) -> i64 {
    let stage = [1, 1, 2, 4][index];
    match pattern {
        // PFENet's loop over `layer3.named_modules()` dilates every block, the first included.
        DilationPattern::Pfenet => stage,
        // torchvision's `_make_layer(dilate=True)`: the first block runs at the previous stage's
        // dilation (layer3: 1, layer4: 2), its stride becoming 1.
        DilationPattern::Torchvision if block == 0 => [1, 1, 1, 2][index],
        DilationPattern::Torchvision => stage,
    }
}

/// layer0..layer4 and their output channels.
pub(crate) fn build(
    scope: &Scope,
    layout: ResNetLayout,
    width: f64,
    pattern: DilationPattern,
) -> (Vec<Stage>, [i64; 5]) {
    let (c64, c128) = (scaled(64, width), scaled(128, width));
    let mut stem = Sequential::new(scope.sub("layer0"));
    stem.conv_bn_relu(ConvSpec::new(3, c64, 3).stride(2));
    stem.conv_bn_relu(ConvSpec::new(c64, c64, 3));
    stem.conv_bn_relu(ConvSpec::new(c64, c128, 3));
    stem.push(Unit::MaxPool {
        kernel: 3,
        stride: 2,
        padding: 1,
        ceil_mode: false,
    });
    let mut stages = vec![stem.finish()];
    let mut out_channels = [c128, 0, 0, 0, 0];
    let mut in_channels = c128;
    for (index, blocks) in layout.blocks.iter().enumerate() {
        let planes = scaled(64 << index, width);
        let out = planes * layout.expansion();
        // layer3/layer4 keep the resolution and dilate their 3×3 convs instead (see
        // `block_dilation`); only layer2 still downsamples.
        let stride = if index == 1 { 2 } else { 1 };
        let mut stage = Sequential::new(scope.sub(format!("layer{}", index + 1)));
        for block in 0..*blocks {
            let dilation = block_dilation(pattern, index, block);
            let (block_in, block_stride) = if block == 0 {
                (in_channels, stride)
            } else {
                (out, 1)
            };
            let specs = if layout.bottleneck {
                vec![
                    ConvSpec::new(block_in, planes, 1),
                    ConvSpec::new(planes, planes, 3)
                        .stride(block_stride)
                        .dilation(dilation),
                    ConvSpec::new(planes, out, 1),
                ]
            } else {
                // Basic blocks dilate both 3×3 convs, so the small ResNet also has output stride 8.
                vec![
                    ConvSpec::new(block_in, planes, 3)
                        .stride(block_stride)
                        .dilation(dilation),
                    ConvSpec::new(planes, planes, 3).dilation(dilation),
                ]
            };
            // PSPNet gives a block a shortcut conv when its original stride (2 in layer2..4) or
            // its channel count changes; PFENet then sets that conv's stride to 1 in layer3/4.
            let original_stride = if index == 0 { 1 } else { 2 };
            let downsample = (block == 0 && (original_stride != 1 || block_in != out))
                .then(|| ConvSpec::new(block_in, out, 1).stride(block_stride));
            let block = ResidualBlock::new(&stage.next_scope(), &specs, downsample);
            stage.push(Unit::Block(block));
        }
        stages.push(stage.finish());
        out_channels[index + 1] = out;
        in_channels = out;
    }
    (stages, out_channels)
}
