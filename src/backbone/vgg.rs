//! VGG16-BN split into layer0..layer4 as PFENet's `get_vgg16_layer` does: torchvision's
//! `features` indices 0..7, 7..14, 14..24, 24..34, 34..43 (the final max-pool dropped), each stage
//! renumbered from 0.

use super::layers::{ConvSpec, Scope, Sequential, Stage, Unit};
use super::resnet::scaled;

/// Conv widths of each stage; every stage but the last ends with a max-pool.
const STAGES: [&[i64]; 5] = [
    &[64, 64],
    &[128, 128],
    &[256, 256, 256],
    &[512, 512, 512],
    &[512, 512, 512],
];

/// Index in torchvision's `vgg16_bn().features` where each stage starts, and where layer4 ends.
pub(crate) const FEATURE_STARTS: [usize; 6] = [0, 7, 14, 24, 34, 43];

/// layer0..layer4 and their output channels.
pub(crate) fn build(scope: &Scope, width: f64) -> (Vec<Stage>, [i64; 5]) {
    let mut stages = Vec::new();
    let mut out_channels = [0; 5];
    let mut in_channels = 3;
    for (index, widths) in STAGES.iter().enumerate() {
        let mut stage = Sequential::new(scope.sub(format!("layer{index}")));
        for &channels in widths.iter() {
            let out = scaled(channels, width);
            stage.conv_bn_relu(ConvSpec::new(in_channels, out, 3).with_bias());
            in_channels = out;
        }
        if index < 4 {
            stage.push(Unit::MaxPool {
                kernel: 2,
                stride: 2,
                padding: 0,
                ceil_mode: true,
            });
        }
        stages.push(stage.finish());
        out_channels[index] = in_channels;
    }
    (stages, out_channels)
}
