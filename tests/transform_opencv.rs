//! The train and validation transforms against OpenCV itself (`opencv-python-headless` in the
//! set-up venv), as PFENet's `util/transform.py` calls it on float32 images: `cv2.resize` with a
//! factor (random scale) and with a size (validation resize), `cv2.warpAffine` after
//! `cv2.getRotationMatrix2D` (random rotation), `cv2.GaussianBlur((5, 5), 0)`.
//!
//! Tolerance, per pixel on the 0..255 scale: 1e-2 at most, 1e-3 on average (float32 rounding;
//! measured: 2e-5 for resizes, 7e-4 for rotations). Labels: nearest-neighbour resizes must be
//! identical; a rotation may differ on at most 1% of the pixels, all on class boundaries, where
//! OpenCV's rounding of source coordinates can land on the other side of a pixel centre (none
//! differ on this fixture).

use std::collections::HashMap;

mod common;

use svf::data::raster::{LabelMap, RgbImage};
use svf::data::transform::{gaussian_blur, rotate, scale, val_resize, IMAGENET_MEAN};
use tch::Tensor;

const OPENCV_TRANSFORMS: &str = r#"
import sys
import cv2
import numpy as np
from safetensors.numpy import load_file, save_file
t = load_file(sys.argv[1])
image, label = t['image'], t['label']
h, w = label.shape
out = {}
for name, factor in [('scale_down', 0.9), ('scale_up', 1.1), ('scale_odd', 0.937)]:
    out[name + '.image'] = cv2.resize(image, None, fx=factor, fy=factor, interpolation=cv2.INTER_LINEAR)
    out[name + '.label'] = cv2.resize(label, None, fx=factor, fy=factor, interpolation=cv2.INTER_NEAREST)
mean = [0.485 * 255, 0.456 * 255, 0.406 * 255]
for name, angle in [('rotate_pos', 7.3), ('rotate_neg', -9.6)]:
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1)
    out[name + '.image'] = cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_LINEAR,
                                          borderMode=cv2.BORDER_CONSTANT, borderValue=mean)
    out[name + '.label'] = cv2.warpAffine(label, matrix, (w, h), flags=cv2.INTER_NEAREST,
                                          borderMode=cv2.BORDER_CONSTANT, borderValue=255)
out['blur.image'] = cv2.GaussianBlur(image, (5, 5), 0)
# PFENet's test-time Resize: longer side to 65, both floored to a multiple of 8, top-left on a
# 65 x 65 canvas of 0 (image) / 255 (label).
size = 65
if h >= w:
    nh, nw = size, int(w * size / h)
else:
    nh, nw = int(h * size / w), size
nh, nw = nh // 8 * 8, nw // 8 * 8
canvas = np.zeros((size, size, 3), np.float32)
canvas[:nh, :nw] = cv2.resize(image, dsize=(nw, nh), interpolation=cv2.INTER_LINEAR)
canvas_label = np.full((size, size), 255, np.uint8)
canvas_label[:nh, :nw] = cv2.resize(label, dsize=(nw, nh), interpolation=cv2.INTER_NEAREST)
out['val.image'], out['val.label'] = canvas, canvas_label
save_file({k: np.ascontiguousarray(v) for k, v in out.items()}, sys.argv[2])
"#;

/// A smooth 41×58 float image (integer-valued like a decoded JPEG) and a label of rectangles and a disc with classes 0, 3, 7 and 255.
fn fixtures() -> (RgbImage, LabelMap) {
    let (height, width) = (41usize, 58usize);
    let mut data = Vec::with_capacity(height * width * 3);
    let mut labels = Vec::with_capacity(height * width);
    for y in 0..height {
        for x in 0..width {
            let (fx, fy) = (x as f32, y as f32);
            data.push((120.0 + 90.0 * (fx / 9.0).sin() * (fy / 13.0).cos()).round());
            data.push((30.0 + 3.0 * fx + 1.5 * fy).round());
            data.push((200.0 - 2.0 * fy + 40.0 * (fx / 7.0 + fy / 11.0).sin()).round());
            let in_disc = (fx - 40.0).powi(2) + (fy - 20.0).powi(2) < 100.0;
            labels.push(match () {
                _ if in_disc => 7,
                _ if (5..20).contains(&x) && (8..30).contains(&y) => 3,
                _ if y == 35 => 255,
                _ => 0,
            });
        }
    }
    (
        RgbImage {
            height,
            width,
            data,
        },
        LabelMap {
            height,
            width,
            data: labels,
        },
    )
}

fn image_tensor(image: &RgbImage) -> Tensor {
    Tensor::from_slice(&image.data).reshape([image.height as i64, image.width as i64, 3])
}

fn label_tensor(label: &LabelMap) -> Tensor {
    Tensor::from_slice(&label.data).reshape([label.height as i64, label.width as i64])
}

#[test]
fn transforms_match_opencv() {
    let dir = common::scratch("opencv");
    let (image, label) = fixtures();
    let (input, output) = (dir.join("in.safetensors"), dir.join("out.safetensors"));
    Tensor::write_safetensors(
        &[
            ("image", image_tensor(&image)),
            ("label", label_tensor(&label)),
        ],
        &input,
    )
    .unwrap();
    common::run_python(OPENCV_TRANSFORMS, &[&input, &output]);
    let opencv: HashMap<String, Tensor> = Tensor::read_safetensors(&output)
        .unwrap()
        .into_iter()
        .collect();

    let ours = [
        ("scale_down", scale(&image, &label, 0.9)),
        ("scale_up", scale(&image, &label, 1.1)),
        ("scale_odd", scale(&image, &label, 0.937)),
        ("rotate_pos", rotate(&image, &label, 7.3)),
        ("rotate_neg", rotate(&image, &label, -9.6)),
        ("val", val_resize(&image, &label, 65)),
    ];
    for (name, (our_image, our_label)) in &ours {
        let (expected_image, expected_label) = (
            &opencv[&format!("{name}.image")],
            &opencv[&format!("{name}.label")],
        );
        let got_image = image_tensor(our_image);
        assert_eq!(got_image.size(), expected_image.size(), "{name}");
        let error = (&got_image - expected_image).abs();
        let (max, mean) = (
            error.max().double_value(&[]),
            error.mean(tch::Kind::Double).double_value(&[]),
        );
        assert!(
            max <= 1e-2 && mean <= 1e-3,
            "{name} image: max error {max}, mean {mean}"
        );
        let got_label = label_tensor(our_label);
        assert_eq!(got_label.size(), expected_label.size(), "{name}");
        let differing = got_label
            .ne_tensor(expected_label)
            .sum(tch::Kind::Int64)
            .int64_value(&[]);
        let allowed = if name.starts_with("rotate") {
            got_label.numel() as i64 / 100
        } else {
            0
        };
        assert!(
            differing <= allowed,
            "{name} label: {differing} pixels differ"
        );
    }
    // Rotation borders take the ImageNet mean in both.
    let corner = opencv["rotate_pos.image"].get(0).get(0);
    let mean = Tensor::from_slice(&IMAGENET_MEAN);
    assert!((corner - mean).abs().max().double_value(&[]) < 1e-3);

    let blurred = image_tensor(&gaussian_blur(&image));
    let error = (&blurred - &opencv["blur.image"])
        .abs()
        .max()
        .double_value(&[]);
    assert!(error <= 1e-2, "blur: max error {error}");
}
