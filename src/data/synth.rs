//! A small synthetic dataset in PASCAL layout, learnable in minutes on a CPU.
//!
//! Each of the 20 classes has its own colour (hue and brightness), shape (disc, square, triangle,
//! diamond, cross) and texture (solid, stripes, checks, dots), drawn on a noisy grey background.
//! Every image has one large "primary" object (at least [`MIN_CLASS_PIXELS`] pixels once outlined)
//! whose class cycles through all 20, so both lists hold every class of every fold, plus up to two
//! smaller objects of random classes. Object outlines get the ignore value 255, as in VOC.
//!
//! Layout under the output folder: `JPEGImages/<split>_<n>.jpg` (RGB), `SegmentationClassAug/
//! <split>_<n>.png` (8-bit class indices), `lists/train.txt` and `lists/val.txt`.

use std::path::{Path, PathBuf};

use super::index::MIN_CLASS_PIXELS;
use super::raster::LabelMap;
use super::rng::EpisodeRng;
use super::transform::IGNORE_LABEL;
use super::DataError;

pub const CLASSES: usize = 20;

/// What `svf-data synth` writes.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthOptions {
    /// Images in the train list.
    pub train_images: usize,
    /// Images in the val list.
    pub val_images: usize,
    /// Longer image side in pixels; the shorter is 3/4 of it or equal.
    pub size: usize,
    pub seed: u64,
}

impl Default for SynthOptions {
    fn default() -> Self {
        SynthOptions {
            train_images: 400,
            val_images: 120,
            size: 160,
            seed: 0,
        }
    }
}

/// The fewest images a list may have: two of each class, a 1-shot episode's query and support
/// (image `n` shows class `1 + n % CLASSES`).
pub const MIN_IMAGES: u64 = 2 * CLASSES as u64;

/// The smallest longer side [`write_dataset`] accepts: the primary triangle must fit its pixels.
pub const MIN_SIZE: usize = 112;

#[derive(Debug, Clone, Copy)]
enum Shape {
    Disc,
    Square,
    Triangle,
    Diamond,
    Cross,
}

impl Shape {
    /// Whether normalised coordinates (u, v) in [-1, 1]² fall inside.
    fn contains(self, u: f64, v: f64) -> bool {
        match self {
            Shape::Disc => u * u + v * v <= 1.0,
            Shape::Square => true,
            Shape::Triangle => u.abs() <= (v + 1.0) / 2.0,
            Shape::Diamond => u.abs() + v.abs() <= 1.0,
            Shape::Cross => u.abs() <= 1.0 / 3.0 || v.abs() <= 1.0 / 3.0,
        }
    }

    /// Share of the bounding box the shape fills.
    fn fill(self) -> f64 {
        match self {
            Shape::Disc => std::f64::consts::FRAC_PI_4,
            Shape::Square => 1.0,
            Shape::Triangle | Shape::Diamond => 0.5,
            Shape::Cross => 5.0 / 9.0,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Texture {
    Solid,
    Stripes,
    Checks,
    Dots,
}

impl Texture {
    /// Whether the darker ink covers pixel (x, y).
    fn ink(self, x: usize, y: usize) -> bool {
        match self {
            Texture::Solid => false,
            Texture::Stripes => (y / 4).is_multiple_of(2),
            Texture::Checks => (x / 6 + y / 6).is_multiple_of(2),
            Texture::Dots => {
                let (dx, dy) = ((x % 8) as i64 - 4, (y % 8) as i64 - 4);
                dx * dx + dy * dy <= 4
            }
        }
    }
}

/// How class `class` (1..=20) looks.
#[derive(Debug, Clone, Copy)]
struct Appearance {
    rgb: [f64; 3],
    shape: Shape,
    texture: Texture,
}

fn hsv_to_rgb(hue: f64, saturation: f64, value: f64) -> [f64; 3] {
    let h = (hue / 60.0).rem_euclid(6.0);
    let c = value * saturation;
    let x = c * (1.0 - (h % 2.0 - 1.0).abs());
    let (r, g, b) = match h as usize {
        0 => (c, x, 0.0),
        1 => (x, c, 0.0),
        2 => (0.0, c, x),
        3 => (0.0, x, c),
        4 => (x, 0.0, c),
        _ => (c, 0.0, x),
    };
    let m = value - c;
    [(r + m) * 255.0, (g + m) * 255.0, (b + m) * 255.0]
}

fn appearance(class: usize) -> Appearance {
    let c = class - 1;
    let shapes = [
        Shape::Disc,
        Shape::Square,
        Shape::Triangle,
        Shape::Diamond,
        Shape::Cross,
    ];
    let textures = [
        Texture::Solid,
        Texture::Stripes,
        Texture::Checks,
        Texture::Dots,
    ];
    Appearance {
        // Neighbouring ids (one fold's classes) get hues 7 steps of 18° apart.
        rgb: hsv_to_rgb(
            (c * 7 % CLASSES) as f64 * 18.0,
            0.85,
            if c.is_multiple_of(2) { 0.95 } else { 0.6 },
        ),
        shape: shapes[c % 5],
        texture: textures[(c * 3 + c / 5) % 4],
    }
}

/// The smallest bounding-box side whose shape keeps [`MIN_CLASS_PIXELS`] with margin after its
/// outline (about 4·side pixels) becomes 255.
fn min_primary_side(shape: Shape) -> usize {
    let target = MIN_CLASS_PIXELS as f64 * 1.15;
    (8..)
        .find(|&s| shape.fill() * (s * s) as f64 - 4.0 * s as f64 >= target)
        .expect("some side fits")
}

/// One generated image: RGB bytes and its label.
struct Sample {
    rgb: Vec<u8>,
    label: LabelMap,
}

/// Draws image `n` of a split whose primary object has class `primary`.
fn render(primary: usize, size: usize, rng: &mut EpisodeRng) -> Sample {
    let short = size * 3 / 4;
    let (height, width) = match rng.below(3) {
        0 => (short, size),
        1 => (size, short),
        _ => (size, size),
    };
    let mut classes = LabelMap::filled(height, width, 0);
    let mut rgb = vec![0f64; height * width * 3];
    // Noisy grey background with a gentle gradient.
    let tilt = [rng.uniform(-30.0, 30.0), rng.uniform(-30.0, 30.0)];
    for y in 0..height {
        for x in 0..width {
            let base = 128.0
                + tilt[0] * (y as f64 / height as f64 - 0.5)
                + tilt[1] * (x as f64 / width as f64 - 0.5);
            let v = base + rng.uniform(-25.0, 25.0);
            rgb[(y * width + x) * 3..(y * width + x + 1) * 3].copy_from_slice(&[v, v, v]);
        }
    }
    let extra = rng.below(3);
    let limit = height.min(width) - 4;
    let mut objects: Vec<(usize, usize)> = (0..extra)
        .map(|_| {
            (
                1 + rng.below(CLASSES),
                rng.inclusive(size / 4, size / 2).min(limit),
            )
        })
        .collect();
    let primary_side = min_primary_side(appearance(primary).shape);
    let upper = (size * 7 / 10).min(limit).max(primary_side);
    objects.push((primary, rng.inclusive(primary_side, upper)));
    // The primary comes last, on top, so its pixels are all visible.
    for (class, side) in objects {
        let look = appearance(class);
        let top = rng.inclusive(2, height - side - 2);
        let left = rng.inclusive(2, width - side - 2);
        let shade = rng.uniform(0.9, 1.1);
        let half = side as f64 / 2.0;
        for y in top..top + side {
            for x in left..left + side {
                let u = (x as f64 + 0.5 - left as f64 - half) / half;
                let v = (y as f64 + 0.5 - top as f64 - half) / half;
                if !look.shape.contains(u, v) {
                    continue;
                }
                classes.data[y * width + x] = class as u8;
                let ink = if look.texture.ink(x, y) { 0.55 } else { 1.0 };
                for c in 0..3 {
                    rgb[(y * width + x) * 3 + c] =
                        look.rgb[c] * shade * ink + rng.uniform(-12.0, 12.0);
                }
            }
        }
    }
    // VOC-style outlines: a pixel next to another class (8-neighbourhood) is ignored.
    let mut label = classes.clone();
    for y in 0..height {
        for x in 0..width {
            let v = classes.at(y, x);
            let boundary = (y.saturating_sub(1)..(y + 2).min(height)).any(|yy| {
                (x.saturating_sub(1)..(x + 2).min(width)).any(|xx| classes.at(yy, xx) != v)
            });
            if boundary {
                label.data[y * width + x] = IGNORE_LABEL;
            }
        }
    }
    Sample {
        rgb: rgb
            .iter()
            .map(|&v| v.round().clamp(0.0, 255.0) as u8)
            .collect(),
        label,
    }
}

fn write_error(path: &Path, e: impl std::fmt::Display) -> DataError {
    DataError::Write {
        path: path.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    }
}

fn save(sample: &Sample, image_path: &Path, label_path: &Path) -> Result<(), DataError> {
    let (h, w) = (sample.label.height as u32, sample.label.width as u32);
    let file = std::fs::File::create(image_path).map_err(|source| DataError::Write {
        path: image_path.to_path_buf(),
        source,
    })?;
    image::codecs::jpeg::JpegEncoder::new_with_quality(std::io::BufWriter::new(file), 92)
        .encode(&sample.rgb, w, h, image::ExtendedColorType::Rgb8)
        .map_err(|e| write_error(image_path, e))?;
    image::GrayImage::from_raw(w, h, sample.label.data.clone())
        .expect("buffer matches size")
        .save(label_path)
        .map_err(|e| write_error(label_path, e))
}

/// Writes the dataset under `out` and returns the paths of the two list files (train, val).
pub fn write_dataset(out: &Path, options: &SynthOptions) -> Result<(PathBuf, PathBuf), DataError> {
    assert!(
        options.size >= MIN_SIZE,
        "synthetic images need size >= {MIN_SIZE}"
    );
    for dir in ["JPEGImages", "SegmentationClassAug", "lists"] {
        let dir = out.join(dir);
        std::fs::create_dir_all(&dir).map_err(|source| DataError::Write { path: dir, source })?;
    }
    let mut lists = Vec::new();
    for (stream, split, count) in [
        (0u64, "train", options.train_images),
        (1, "val", options.val_images),
    ] {
        let mut lines = String::new();
        for n in 0..count {
            let mut rng = EpisodeRng::new(options.seed, 1000 + stream, n as u64);
            let sample = render(1 + n % CLASSES, options.size, &mut rng);
            let image = format!("JPEGImages/{split}_{n:05}.jpg");
            let label = format!("SegmentationClassAug/{split}_{n:05}.png");
            save(&sample, &out.join(&image), &out.join(&label))?;
            lines.push_str(&format!("{image} {label}\n"));
        }
        let list = out.join("lists").join(format!("{split}.txt"));
        std::fs::write(&list, lines).map_err(|source| DataError::Write {
            path: list.clone(),
            source,
        })?;
        lists.push(list);
    }
    Ok((lists[0].clone(), lists[1].clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primary_object_is_eligible_and_labels_are_valid() {
        for n in 0..40 {
            let primary = 1 + n % CLASSES;
            let mut rng = EpisodeRng::new(3, 0, n as u64);
            let sample = render(primary, MIN_SIZE, &mut rng);
            let histogram = sample.label.histogram();
            assert!(
                histogram[primary] >= MIN_CLASS_PIXELS,
                "class {primary}: {}",
                histogram[primary]
            );
            assert!(histogram[255] > 0);
            assert!((21..255).all(|v| histogram[v] == 0));
        }
    }

    #[test]
    fn classes_look_different() {
        // Every pair differs in colour by a clear margin or in shape.
        for a in 1..=CLASSES {
            for b in a + 1..=CLASSES {
                let (x, y) = (appearance(a), appearance(b));
                let distance: f64 = x
                    .rgb
                    .iter()
                    .zip(y.rgb)
                    .map(|(p, q)| (p - q).powi(2))
                    .sum::<f64>()
                    .sqrt();
                assert!(
                    distance > 40.0 || (a - 1) % 5 != (b - 1) % 5,
                    "classes {a} and {b}"
                );
            }
        }
    }
}
