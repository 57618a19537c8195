//! The reference's image/label transforms (PFENet `util/transform.py` on OpenCV), on raw buffers.
//!
//! Train: random scale → random rotation (p = 0.5) → Gaussian blur (p = 0.5) → horizontal flip
//! (p = 0.5) → random crop with centred padding → normalise. Validation: the longer side to
//! `val_size`, both sides floored to a multiple of 8, top-left on a `val_size` canvas → normalise.
//! Images use bilinear sampling, labels nearest, so labels keep their values ({0, 1, 255} once
//! binarised). Coordinate conventions follow OpenCV's `resize` and `warpAffine`, so outputs match
//! the reference's up to OpenCV's 1/32-pixel quantisation of bilinear weights in `warpAffine`.

use super::raster::{LabelMap, RgbImage};
use super::rng::EpisodeRng;
use crate::config::Config;

/// ImageNet mean and std on the 0..255 scale, as the reference normalises.
pub const IMAGENET_MEAN: [f32; 3] = [0.485 * 255.0, 0.456 * 255.0, 0.406 * 255.0];
pub const IMAGENET_STD: [f32; 3] = [0.229 * 255.0, 0.224 * 255.0, 0.225 * 255.0];

/// Label value of pixels that losses and metrics skip: padding, rotation borders and VOC's
/// object outlines.
pub const IGNORE_LABEL: u8 = 255;

/// A crop keeping fewer than this share of the padded label's foreground is re-drawn.
const CROP_KEEP_FOREGROUND: f64 = 0.85;
/// Re-draws after the first crop. PFENet loops `while ... and crop_cnt <= 30`, i.e. 31 re-draws;
/// the last draw is kept whatever it holds.
const CROP_REDRAWS: usize = 31;

/// Horizontal (or vertical) taps of OpenCV's bilinear `resize`: source index, next index, weight.
fn linear_taps(src: usize, dst: usize, scale: f64) -> Vec<(usize, usize, f32)> {
    (0..dst)
        .map(|d| {
            let f = (d as f64 + 0.5) * scale - 0.5;
            let s = f.floor();
            if s < 0.0 {
                (0, 0, 0.0)
            } else if s as usize >= src - 1 {
                (src - 1, src - 1, 0.0)
            } else {
                (s as usize, s as usize + 1, (f - s) as f32)
            }
        })
        .collect()
}

/// OpenCV's nearest `resize` index map: `floor(d * scale)`, clamped.
fn nearest_taps(src: usize, dst: usize, scale: f64) -> Vec<usize> {
    (0..dst)
        .map(|d| ((d as f64 * scale).floor() as usize).min(src - 1))
        .collect()
}

/// Bilinear resize to `height × width`; `scale_y`/`scale_x` are source pixels per output pixel
/// (OpenCV uses `1/fx` when given a factor and `src/dst` when given a size).
fn resize_linear(
    image: &RgbImage,
    height: usize,
    width: usize,
    scale_y: f64,
    scale_x: f64,
) -> RgbImage {
    let xs = linear_taps(image.width, width, scale_x);
    let ys = linear_taps(image.height, height, scale_y);
    // Horizontal pass over every source row, then the vertical blend of two of them.
    let mut rows = vec![0f32; image.height * width * 3];
    for y in 0..image.height {
        let src = &image.data[y * image.width * 3..(y + 1) * image.width * 3];
        let dst = &mut rows[y * width * 3..(y + 1) * width * 3];
        for (x, &(x0, x1, t)) in xs.iter().enumerate() {
            for c in 0..3 {
                let a = src[x0 * 3 + c];
                let b = src[x1 * 3 + c];
                dst[x * 3 + c] = a + (b - a) * t;
            }
        }
    }
    let mut data = vec![0f32; height * width * 3];
    let row_len = width * 3;
    for (y, &(y0, y1, t)) in ys.iter().enumerate() {
        let a = &rows[y0 * row_len..(y0 + 1) * row_len];
        let b = &rows[y1 * row_len..(y1 + 1) * row_len];
        let out = &mut data[y * row_len..(y + 1) * row_len];
        for i in 0..row_len {
            out[i] = a[i] + (b[i] - a[i]) * t;
        }
    }
    RgbImage {
        height,
        width,
        data,
    }
}

/// Nearest-neighbour resize of a label map, OpenCV's `INTER_NEAREST` index rule.
fn resize_nearest(
    label: &LabelMap,
    height: usize,
    width: usize,
    scale_y: f64,
    scale_x: f64,
) -> LabelMap {
    let xs = nearest_taps(label.width, width, scale_x);
    let ys = nearest_taps(label.height, height, scale_y);
    let mut data = Vec::with_capacity(height * width);
    for &sy in &ys {
        let row = &label.data[sy * label.width..(sy + 1) * label.width];
        data.extend(xs.iter().map(|&sx| row[sx]));
    }
    LabelMap {
        height,
        width,
        data,
    }
}

/// Scales both by `factor` (OpenCV `resize(..., fx = fy = factor)`): output sides are rounded,
/// source coordinates use `1 / factor`.
pub fn scale(image: &RgbImage, label: &LabelMap, factor: f64) -> (RgbImage, LabelMap) {
    let height = ((image.height as f64 * factor).round_ties_even() as usize).max(1);
    let width = ((image.width as f64 * factor).round_ties_even() as usize).max(1);
    let inverse = 1.0 / factor;
    (
        resize_linear(image, height, width, inverse, inverse),
        resize_nearest(label, height, width, inverse, inverse),
    )
}

/// Rotates both by `degrees` (counter-clockwise, as `cv2.getRotationMatrix2D((w/2, h/2), angle, 1)`
/// with `warpAffine`) keeping the size; uncovered pixels get the ImageNet mean / [`IGNORE_LABEL`].
pub fn rotate(image: &RgbImage, label: &LabelMap, degrees: f64) -> (RgbImage, LabelMap) {
    let (h, w) = (image.height, image.width);
    let (sin, cos) = degrees.to_radians().sin_cos();
    let (cx, cy) = (w as f64 / 2.0, h as f64 / 2.0);
    // Forward map [[cos, sin, tx], [-sin, cos, ty]]; warpAffine samples through its inverse.
    let tx = (1.0 - cos) * cx - sin * cy;
    let ty = sin * cx + (1.0 - cos) * cy;
    let mut data = vec![0f32; h * w * 3];
    let mut labels = vec![IGNORE_LABEL; h * w];
    let (wi, hi) = (w as i64, h as i64);
    let tap = |x: i64, y: i64| -> [f32; 3] {
        if x >= 0 && y >= 0 && x < wi && y < hi {
            let i = (y as usize * w + x as usize) * 3;
            [image.data[i], image.data[i + 1], image.data[i + 2]]
        } else {
            IMAGENET_MEAN
        }
    };
    for y in 0..h {
        // Source of (x, y): (cos·(x - tx) - sin·(y - ty), sin·(x - tx) + cos·(y - ty)).
        let v = y as f64 - ty;
        let (row_x, row_y) = (-cos * tx - sin * v, -sin * tx + cos * v);
        for x in 0..w {
            let sx = cos * x as f64 + row_x;
            let sy = sin * x as f64 + row_y;
            let (nx, ny) = ((sx + 0.5).floor() as i64, (sy + 0.5).floor() as i64);
            if nx >= 0 && ny >= 0 && nx < wi && ny < hi {
                labels[y * w + x] = label.data[ny as usize * w + nx as usize];
            }
            let (x0, y0) = (sx.floor(), sy.floor());
            let (fx, fy) = ((sx - x0) as f32, (sy - y0) as f32);
            let (x0, y0) = (x0 as i64, y0 as i64);
            let out = &mut data[(y * w + x) * 3..(y * w + x) * 3 + 3];
            if x0 >= 0 && y0 >= 0 && x0 + 1 < wi && y0 + 1 < hi {
                // Inside: the four taps without border tests.
                let i = (y0 as usize * w + x0 as usize) * 3;
                let j = i + w * 3;
                let p = &image.data;
                for c in 0..3 {
                    let top = p[i + c] + (p[i + 3 + c] - p[i + c]) * fx;
                    let bottom = p[j + c] + (p[j + 3 + c] - p[j + c]) * fx;
                    out[c] = top + (bottom - top) * fy;
                }
            } else {
                let (a, b) = (tap(x0, y0), tap(x0 + 1, y0));
                let (d, e) = (tap(x0, y0 + 1), tap(x0 + 1, y0 + 1));
                for c in 0..3 {
                    let top = a[c] + (b[c] - a[c]) * fx;
                    let bottom = d[c] + (e[c] - d[c]) * fx;
                    out[c] = top + (bottom - top) * fy;
                }
            }
        }
    }
    (
        RgbImage {
            height: h,
            width: w,
            data,
        },
        LabelMap {
            height: h,
            width: w,
            data: labels,
        },
    )
}

/// OpenCV's `BORDER_REFLECT_101` index (`gfedcb|abcdefgh|gfedcba`).
fn reflect_101(i: i64, n: usize) -> usize {
    let n = n as i64;
    if n == 1 {
        return 0;
    }
    let period = 2 * (n - 1);
    let m = i.rem_euclid(period);
    (if m < n { m } else { period - m }) as usize
}

/// `cv2.GaussianBlur(image, (5, 5), 0)`: with sigma 0 and a 5-tap kernel OpenCV uses its fixed
/// binomial kernel [1, 4, 6, 4, 1] / 16 in both directions, reflect-101 borders.
pub fn gaussian_blur(image: &RgbImage) -> RgbImage {
    const KERNEL: [f32; 5] = [0.0625, 0.25, 0.375, 0.25, 0.0625];
    let (h, w) = (image.height, image.width);
    let mut horizontal = vec![0f32; h * w * 3];
    let xs: Vec<[usize; 5]> = (0..w as i64)
        .map(|x| std::array::from_fn(|k| reflect_101(x + k as i64 - 2, w)))
        .collect();
    for y in 0..h {
        let src = &image.data[y * w * 3..(y + 1) * w * 3];
        let dst = &mut horizontal[y * w * 3..(y + 1) * w * 3];
        for (x, taps) in xs.iter().enumerate() {
            for c in 0..3 {
                dst[x * 3 + c] = taps
                    .iter()
                    .zip(KERNEL)
                    .map(|(&sx, k)| src[sx * 3 + c] * k)
                    .sum();
            }
        }
    }
    let mut data = vec![0f32; h * w * 3];
    let row_len = w * 3;
    for y in 0..h {
        let rows: [usize; 5] = std::array::from_fn(|k| reflect_101(y as i64 + k as i64 - 2, h));
        let out = &mut data[y * row_len..(y + 1) * row_len];
        for (&r, k) in rows.iter().zip(KERNEL) {
            let src = &horizontal[r * row_len..(r + 1) * row_len];
            for (o, s) in out.iter_mut().zip(src) {
                *o += s * k;
            }
        }
    }
    RgbImage {
        height: h,
        width: w,
        data,
    }
}

/// Mirrors both left-right.
pub fn flip_horizontal(image: &mut RgbImage, label: &mut LabelMap) {
    for row in image.data.chunks_exact_mut(image.width * 3) {
        let w = row.len() / 3;
        for x in 0..w / 2 {
            for c in 0..3 {
                row.swap(x * 3 + c, (w - 1 - x) * 3 + c);
            }
        }
    }
    for row in label.data.chunks_exact_mut(label.width) {
        row.reverse();
    }
}

/// Copies the `height × width` window at (`top`, `left`) of the image extended by `pad_top` /
/// `pad_left` rows/columns of padding (the ImageNet mean, [`IGNORE_LABEL`]) on each side.
fn window(
    image: &RgbImage,
    label: &LabelMap,
    (pad_top, pad_left): (usize, usize),
    (top, left): (usize, usize),
    (height, width): (usize, usize),
) -> (RgbImage, LabelMap) {
    let mut out = RgbImage::filled(height, width, IMAGENET_MEAN);
    let mut out_label = LabelMap::filled(height, width, IGNORE_LABEL);
    for y in 0..height {
        let sy = (y + top) as i64 - pad_top as i64;
        if sy < 0 || sy as usize >= image.height {
            continue;
        }
        let sy = sy as usize;
        // Output columns whose source column lies inside the image.
        let first = pad_left.saturating_sub(left).min(width);
        let last = (pad_left + image.width).saturating_sub(left).min(width);
        if first >= last {
            continue;
        }
        let sx = first + left - pad_left;
        let n = last - first;
        out.data[(y * width + first) * 3..(y * width + last) * 3].copy_from_slice(
            &image.data[(sy * image.width + sx) * 3..(sy * image.width + sx + n) * 3],
        );
        out_label.data[y * width + first..y * width + last]
            .copy_from_slice(&label.data[sy * label.width + sx..sy * label.width + sx + n]);
    }
    (out, out_label)
}

/// Random `height × width` crop (PFENet's `Crop(crop_type='rand')`): pads centred with the mean /
/// [`IGNORE_LABEL`] when smaller, then re-draws while the crop holds less than 85% of the padded
/// label's foreground (value 1).
pub fn random_crop(
    image: &RgbImage,
    label: &LabelMap,
    height: usize,
    width: usize,
    rng: &mut EpisodeRng,
) -> (RgbImage, LabelMap) {
    let pad_h = height.saturating_sub(image.height);
    let pad_w = width.saturating_sub(image.width);
    let pad = (pad_h / 2, pad_w / 2);
    let (full_h, full_w) = (image.height + pad_h, image.width + pad_w);
    // Foreground count of any window from a summed-area table of the padded label (padding is 255).
    let stride = full_w + 1;
    let mut table = vec![0u32; (full_h + 1) * stride];
    for y in 0..full_h {
        let mut row_sum = 0;
        for x in 0..full_w {
            let inside =
                y >= pad.0 && y - pad.0 < label.height && x >= pad.1 && x - pad.1 < label.width;
            if inside && label.data[(y - pad.0) * label.width + (x - pad.1)] == 1 {
                row_sum += 1;
            }
            table[(y + 1) * stride + x + 1] = table[y * stride + x + 1] + row_sum;
        }
    }
    let total = table[full_h * stride + full_w];
    let foreground = |top: usize, left: usize| {
        let (b, r) = (top + height, left + width);
        table[b * stride + r] + table[top * stride + left]
            - table[top * stride + r]
            - table[b * stride + left]
    };
    let mut draw = || {
        (
            rng.inclusive(0, full_h - height),
            rng.inclusive(0, full_w - width),
        )
    };
    let mut offset = draw();
    for _ in 0..CROP_REDRAWS {
        if foreground(offset.0, offset.1) as f64 >= CROP_KEEP_FOREGROUND * total as f64 {
            break;
        }
        offset = draw();
    }
    window(image, label, pad, offset, (height, width))
}

/// Output (height, width) of the validation resize for an `height × width` input: the longer side
/// to `size` (the shorter scaled and truncated, as Python's `int`), then both floored to a multiple
/// of 8 (PFENet's `Resize.find_new_hw`).
pub fn val_resized_size(height: usize, width: usize, size: usize) -> (usize, usize) {
    let (new_h, new_w) = if height >= width {
        (
            size,
            (width as f64 * (size as f64 / height as f64)) as usize,
        )
    } else {
        (
            (height as f64 * (size as f64 / width as f64)) as usize,
            size,
        )
    };
    (new_h / 8 * 8, new_w / 8 * 8)
}

/// The validation transform: resize by [`val_resized_size`], placed at the top-left of a
/// `size × size` canvas of 0 (image, before normalisation) / [`IGNORE_LABEL`].
pub fn val_resize(image: &RgbImage, label: &LabelMap, size: usize) -> (RgbImage, LabelMap) {
    let (new_h, new_w) = val_resized_size(image.height, image.width, size);
    // OpenCV given a destination size samples at scale 1 / (dst / src).
    let scale_y = 1.0 / (new_h as f64 / image.height as f64);
    let scale_x = 1.0 / (new_w as f64 / image.width as f64);
    let resized = resize_linear(image, new_h, new_w, scale_y, scale_x);
    let resized_label = resize_nearest(label, new_h, new_w, scale_y, scale_x);
    let mut canvas = RgbImage::filled(size, size, [0.0; 3]);
    let mut canvas_label = LabelMap::filled(size, size, IGNORE_LABEL);
    for y in 0..new_h {
        canvas.data[y * size * 3..(y * size + new_w) * 3]
            .copy_from_slice(&resized.data[y * new_w * 3..(y + 1) * new_w * 3]);
        canvas_label.data[y * size..y * size + new_w]
            .copy_from_slice(&resized_label.data[y * new_w..(y + 1) * new_w]);
    }
    (canvas, canvas_label)
}

/// Writes `(pixel - mean) / std` channel-first (`[3, H, W]`) into `out`.
pub fn normalise_into(image: &RgbImage, out: &mut [f32]) {
    let plane = image.height * image.width;
    assert_eq!(
        out.len(),
        3 * plane,
        "output buffer must hold 3 x H x W values"
    );
    let (r, rest) = out.split_at_mut(plane);
    let (g, b) = rest.split_at_mut(plane);
    let inv = IMAGENET_STD.map(|s| 1.0 / s);
    for (i, px) in image.data.chunks_exact(3).enumerate() {
        r[i] = (px[0] - IMAGENET_MEAN[0]) * inv[0];
        g[i] = (px[1] - IMAGENET_MEAN[1]) * inv[1];
        b[i] = (px[2] - IMAGENET_MEAN[2]) * inv[2];
    }
}

/// The augmentation of training episodes, parameters from the config.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainTransform {
    pub scale: (f64, f64),
    pub rotate: (f64, f64),
    pub height: usize,
    pub width: usize,
}

impl TrainTransform {
    pub fn from_config(config: &Config) -> TrainTransform {
        TrainTransform {
            scale: (config.scale_min, config.scale_max),
            rotate: (config.rotate_min, config.rotate_max),
            height: config.train_h as usize,
            width: config.train_w as usize,
        }
    }

    /// The whole chain, every random choice drawn from `rng` in the reference's order. Unlike the
    /// reference, a non-square crop stays `train_h × train_w` (PFENet resizes it to a square).
    pub fn apply(
        &self,
        image: &RgbImage,
        label: &LabelMap,
        rng: &mut EpisodeRng,
    ) -> (RgbImage, LabelMap) {
        let (mut image, mut label) = scale(image, label, rng.uniform(self.scale.0, self.scale.1));
        if rng.next_f64() < 0.5 {
            (image, label) = rotate(&image, &label, rng.uniform(self.rotate.0, self.rotate.1));
        }
        if rng.next_f64() < 0.5 {
            image = gaussian_blur(&image);
        }
        if rng.next_f64() < 0.5 {
            flip_horizontal(&mut image, &mut label);
        }
        random_crop(&image, &label, self.height, self.width, rng)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An image whose red channel is 200 exactly where the label is 1, with a distinct green per
    /// position so misplaced pixels show; label 1 on an off-centre L shape.
    fn pattern(height: usize, width: usize) -> (RgbImage, LabelMap) {
        let mut image = RgbImage::filled(height, width, [0.0; 3]);
        let mut label = LabelMap::filled(height, width, 0);
        for y in 0..height {
            for x in 0..width {
                let in_l = ((4..24).contains(&y) && (5..11).contains(&x))
                    || ((18..24).contains(&y) && (5..30).contains(&x));
                let i = y * width + x;
                if in_l {
                    label.data[i] = 1;
                    image.data[i * 3] = 200.0;
                }
                image.data[i * 3 + 1] = (x + y) as f32;
            }
        }
        (image, label)
    }

    /// Label 1 ⇔ red 200, up to a few pixels on the shape's edge.
    fn assert_aligned(image: &RgbImage, label: &LabelMap) {
        let mut mismatched = 0;
        let mut foreground = 0;
        for y in 0..label.height {
            for x in 0..label.width {
                let v = label.at(y, x);
                let red = image.pixel(y, x)[0];
                // Bilinear blends edges while nearest picks a side: only clear colours count.
                if v == 1 {
                    foreground += 1;
                    if red < 50.0 {
                        mismatched += 1;
                    }
                } else if v == 0 && red > 150.0 {
                    mismatched += 1;
                }
            }
        }
        assert!(
            foreground > 100,
            "the shape must stay visible ({foreground} px)"
        );
        assert!(
            mismatched * 20 < foreground,
            "{mismatched} of {foreground} pixels misaligned"
        );
    }

    #[test]
    fn flip_mirrors_image_and_label_together() {
        let (mut image, mut label) = pattern(30, 40);
        let (image0, label0) = (image.clone(), label.clone());
        flip_horizontal(&mut image, &mut label);
        for y in 0..30 {
            for x in 0..40 {
                assert_eq!(label.at(y, x), label0.at(y, 39 - x));
                assert_eq!(image.pixel(y, x), image0.pixel(y, 39 - x));
            }
        }
    }

    #[test]
    fn rotation_keeps_alignment_turns_the_right_way_and_fills_borders() {
        let (image, label) = pattern(33, 41);
        let (rotated, rotated_label) = rotate(&image, &label, 10.0);
        assert_aligned(&rotated, &rotated_label);
        // A right-angle turn is exact: OpenCV's positive angle turns counter-clockwise on screen,
        // so the pixel right of the centre (cx = 20.5, cy = 16.5) moves above it.
        let (square, square_label) = pattern(40, 40);
        let (turned, turned_label) = rotate(&square, &square_label, 90.0);
        for (y, x) in [(3, 7), (30, 25), (10, 20)] {
            // dst (x', y') = (cx + (y - cy), cy - (x - cx)) with cx = cy = 20
            let (ty, tx) = (40 - x, y);
            if ty < 40 {
                assert_eq!(turned_label.at(ty, tx), square_label.at(y, x), "({y},{x})");
                let (got, want) = (turned.pixel(ty, tx), square.pixel(y, x));
                assert!(
                    (0..3).all(|c| (got[c] - want[c]).abs() < 1e-3),
                    "({y},{x}) {got:?} {want:?}"
                );
            }
        }
        // Corners leave the frame after 45°: they get the mean and the ignore label.
        let (corner, corner_label) = rotate(&image, &label, 45.0);
        assert_eq!(corner_label.at(0, 0), IGNORE_LABEL);
        for (got, mean) in corner.pixel(0, 0).iter().zip(IMAGENET_MEAN) {
            assert!((got - mean).abs() < 1e-3);
        }
        assert!(rotated_label
            .data
            .iter()
            .all(|&v| v == 0 || v == 1 || v == IGNORE_LABEL));
    }

    #[test]
    fn scale_rounds_size_and_keeps_alignment() {
        let (image, label) = pattern(30, 40);
        let (scaled, scaled_label) = scale(&image, &label, 1.1);
        assert_eq!((scaled.height, scaled.width), (33, 44));
        assert_aligned(&scaled, &scaled_label);
        let (small, _) = scale(&image, &label, 0.9);
        assert_eq!((small.height, small.width), (27, 36));
        // Identity factor reproduces the input exactly.
        let (same, same_label) = scale(&image, &label, 1.0);
        assert_eq!(same, image);
        assert_eq!(same_label, label);
    }

    #[test]
    fn linear_resize_matches_opencv_formula_on_a_ramp() {
        // A horizontal ramp 0, 10, 20, 30 doubled: OpenCV gives 0, 2.5, 7.5, ..., 27.5, 30.
        let image = RgbImage {
            height: 1,
            width: 4,
            data: [0.0f32, 10.0, 20.0, 30.0]
                .iter()
                .flat_map(|&v| [v, v, v])
                .collect(),
        };
        let out = resize_linear(&image, 1, 8, 1.0, 0.5);
        let red: Vec<f32> = out.data.chunks(3).map(|p| p[0]).collect();
        assert_eq!(red, vec![0.0, 2.5, 7.5, 12.5, 17.5, 22.5, 27.5, 30.0]);
        let label = LabelMap {
            height: 1,
            width: 4,
            data: vec![1, 2, 3, 4],
        };
        assert_eq!(
            resize_nearest(&label, 1, 8, 1.0, 0.5).data,
            vec![1, 1, 2, 2, 3, 3, 4, 4]
        );
        assert_eq!(
            resize_nearest(&label, 1, 3, 1.0, 4.0 / 3.0).data,
            vec![1, 2, 3]
        );
    }

    #[test]
    fn blur_uses_the_binomial_kernel_and_keeps_constants() {
        let flat = RgbImage::filled(7, 9, [10.0, 20.0, 30.0]);
        let blurred = gaussian_blur(&flat);
        for (a, b) in blurred.data.iter().zip(&flat.data) {
            assert!((a - b).abs() < 1e-4);
        }
        // An impulse spreads as the outer product of [1, 4, 6, 4, 1] / 16.
        let mut impulse = RgbImage::filled(9, 9, [0.0; 3]);
        impulse.data[(4 * 9 + 4) * 3] = 256.0;
        let spread = gaussian_blur(&impulse);
        let k = [1.0, 4.0, 6.0, 4.0, 1.0];
        for dy in 0..5 {
            for dx in 0..5 {
                let got = spread.pixel(2 + dy, 2 + dx)[0];
                assert!((got - k[dy] * k[dx]).abs() < 1e-4, "({dy},{dx}) {got}");
            }
        }
        assert_eq!(reflect_101(-1, 5), 1);
        assert_eq!(reflect_101(-2, 5), 2);
        assert_eq!(reflect_101(5, 5), 3);
        assert_eq!(reflect_101(6, 5), 2);
    }

    #[test]
    fn crop_pads_centred_with_mean_and_ignore() {
        let image = RgbImage::filled(5, 6, [1.0, 2.0, 3.0]);
        let label = LabelMap::filled(5, 6, 1);
        let mut rng = EpisodeRng::new(0, 0, 0);
        let (out, out_label) = random_crop(&image, &label, 9, 11, &mut rng);
        assert_eq!((out.height, out.width), (9, 11));
        // pad_h = 4 → 2 rows above, 2 below; pad_w = 5 → 2 columns left, 3 right.
        for y in 0..9 {
            for x in 0..11 {
                let inside = (2..7).contains(&y) && (2..8).contains(&x);
                if inside {
                    assert_eq!(out_label.at(y, x), 1);
                    assert_eq!(out.pixel(y, x), [1.0, 2.0, 3.0]);
                } else {
                    assert_eq!(out_label.at(y, x), IGNORE_LABEL, "({y},{x})");
                    assert_eq!(out.pixel(y, x), IMAGENET_MEAN);
                }
            }
        }
    }

    #[test]
    fn crop_prefers_windows_keeping_the_foreground() {
        // Foreground only in the central 10×10 of a 100×100 image: a 40×40 crop keeps 85% of it
        // in about a third of the 61² offsets. One draw would fail in most of 20 episodes; with up
        // to 32 draws every episode keeps at least 85%.
        let image = RgbImage::filled(100, 100, [0.0; 3]);
        let mut label = LabelMap::filled(100, 100, 0);
        for y in 45..55 {
            for x in 45..55 {
                label.data[y * 100 + x] = 1;
            }
        }
        for index in 0..20 {
            let mut rng = EpisodeRng::new(5, 0, index);
            let (_, out_label) = random_crop(&image, &label, 40, 40, &mut rng);
            assert!(out_label.histogram()[1] >= 85, "episode {index}");
        }
        // The window copy matches a direct slice of the input.
        let (gradient, gradient_label) = pattern(30, 40);
        let (cut, cut_label) = window(&gradient, &gradient_label, (0, 0), (3, 7), (20, 25));
        for y in 0..20 {
            for x in 0..25 {
                assert_eq!(cut.pixel(y, x), gradient.pixel(y + 3, x + 7));
                assert_eq!(cut_label.at(y, x), gradient_label.at(y + 3, x + 7));
            }
        }
    }

    #[test]
    fn val_resize_sizes_for_landscape_portrait_square() {
        // PASCAL's typical 500×375 landscape and 375×500 portrait, and squares, at 473.
        assert_eq!(val_resized_size(375, 500, 473), (352, 472));
        assert_eq!(val_resized_size(500, 375, 473), (472, 352));
        assert_eq!(val_resized_size(300, 300, 473), (472, 472));
        assert_eq!(val_resized_size(100, 60, 233), (232, 136));
        let image = RgbImage::filled(375, 500, [50.0; 3]);
        let label = LabelMap::filled(375, 500, 1);
        let (out, out_label) = val_resize(&image, &label, 473);
        assert_eq!((out.height, out.width), (473, 473));
        assert_eq!(out.pixel(351, 471), [50.0; 3]);
        assert_eq!(out.pixel(352, 0), [0.0; 3]);
        assert_eq!(out.pixel(0, 472), [0.0; 3]);
        assert_eq!(out_label.at(351, 471), 1);
        assert_eq!(out_label.at(352, 10), IGNORE_LABEL);
        assert_eq!(out_label.at(10, 472), IGNORE_LABEL);
    }

    #[test]
    fn normalise_writes_channel_planes() {
        let image = RgbImage::filled(2, 3, IMAGENET_MEAN);
        let mut out = vec![1.0; 18];
        normalise_into(&image, &mut out);
        assert!(out.iter().all(|v| v.abs() < 1e-6));
        let white = RgbImage::filled(1, 1, [255.0; 3]);
        let mut out = vec![0.0; 3];
        normalise_into(&white, &mut out);
        assert!((out[0] - (1.0 - 0.485) / 0.229).abs() < 1e-5);
        assert!((out[2] - (1.0 - 0.406) / 0.225).abs() < 1e-5);
    }

    #[test]
    fn train_chain_outputs_crop_size_and_label_values() {
        let (image, label) = pattern(30, 40);
        let transform = TrainTransform {
            scale: (0.9, 1.1),
            rotate: (-10.0, 10.0),
            height: 25,
            width: 33,
        };
        for index in 0..30 {
            let mut rng = EpisodeRng::new(1, 0, index);
            let (out, out_label) = transform.apply(&image, &label, &mut rng);
            assert_eq!((out.height, out.width), (25, 33));
            assert!(out_label
                .data
                .iter()
                .all(|&v| v == 0 || v == 1 || v == IGNORE_LABEL));
        }
    }
}
