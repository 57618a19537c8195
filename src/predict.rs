//! Segmentation of a user's own images from a few annotated supports.
//!
//! Images of any size go through the validation transform (longer side to `val_size`, top-left of
//! the canvas); the logits come back to the image's own size through the same original-resolution
//! step as the evaluation ([`crate::eval::original_resolution`]), cropped to the image.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use image::{GrayImage, Luma, Rgb, RgbImage};
use tch::{Device, Kind, Tensor};

use crate::amp;
use crate::config::Config;
use crate::data::raster::{self, LabelMap};
use crate::data::transform::{normalise_into, val_resize, IMAGENET_MEAN, IMAGENET_STD};
use crate::data::DataError;
use crate::eval::{inference_logits, original_resolution};
use crate::model::PfeNet;

/// Why a prediction could not be made or written.
#[derive(Debug, thiserror::Error)]
pub enum PredictError {
    #[error("cannot read mask {path}: {message}; give a PNG whose non-zero pixels are the object")]
    MaskRead { path: PathBuf, message: String },
    #[error("mask {mask} is {mask_size:?} (w, h) but its image {image} is {image_size:?}; a support's mask must have its image's size")]
    MaskSize {
        mask: PathBuf,
        image: PathBuf,
        mask_size: (u32, u32),
        image_size: (u32, u32),
    },
    #[error("no support given: pass at least one --support IMAGE:MASK")]
    NoSupport,
    #[error("queries {0} and {1} share a file name, so their outputs would collide; rename one")]
    SameName(PathBuf, PathBuf),
    #[error(transparent)]
    Image(#[from] DataError),
    #[error("cannot write {path}: {message}; check that the output directory is writable")]
    Write { path: PathBuf, message: String },
}

/// An annotated support example: an image and its object mask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SupportExample {
    pub image: PathBuf,
    pub mask: PathBuf,
}

/// The files written for one query.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    pub query: PathBuf,
    /// `<name>_mask.png`: 255 = object, 0 = background, at the query's size.
    pub mask: PathBuf,
    /// `<name>_overlay.png`: the query with the mask tinted and outlined.
    pub overlay: PathBuf,
    /// Fraction of the query's pixels predicted as the object.
    pub foreground: f64,
}

/// Segments each query's object of the supports' class, writing its mask and overlay into `out`.
pub fn predict(
    model: &PfeNet,
    config: &Config,
    device: Device,
    supports: &[SupportExample],
    queries: &[PathBuf],
    out: &Path,
) -> Result<Vec<Prediction>, PredictError> {
    if supports.is_empty() {
        return Err(PredictError::NoSupport);
    }
    amp::prepare(config, device);
    let mut names = HashSet::new();
    for (i, query) in queries.iter().enumerate() {
        if !names.insert(query.file_stem()) {
            let other = queries[..i]
                .iter()
                .find(|q| q.file_stem() == query.file_stem());
            return Err(PredictError::SameName(
                other.cloned().unwrap_or_default(),
                query.clone(),
            ));
        }
    }
    let size = config.val_size as usize;
    let (mut support_images, mut support_labels) = (Vec::new(), Vec::new());
    for support in supports {
        let image = raster::read_image(&support.image)?;
        let mask = read_mask(&support.mask)?;
        if mask.dimensions() != (image.width as u32, image.height as u32) {
            return Err(PredictError::MaskSize {
                mask: support.mask.clone(),
                image: support.image.clone(),
                mask_size: mask.dimensions(),
                image_size: (image.width as u32, image.height as u32),
            });
        }
        let label = LabelMap {
            height: image.height,
            width: image.width,
            data: mask.pixels().map(|p| u8::from(p[0] != 0)).collect(),
        };
        let (image, label) = val_resize(&image, &label, size);
        support_images.push(network_input(&image));
        support_labels.push(
            Tensor::from_slice(&label.data)
                .to_kind(Kind::Int64)
                .view([size as i64, size as i64]),
        );
    }
    let support_images = Tensor::stack(&support_images, 0)
        .unsqueeze(0)
        .to_device(device);
    let support_labels = Tensor::stack(&support_labels, 0)
        .unsqueeze(0)
        .to_device(device);
    std::fs::create_dir_all(out).map_err(|e| PredictError::Write {
        path: out.to_path_buf(),
        message: e.to_string(),
    })?;
    let mut predictions = Vec::with_capacity(queries.len());
    for query in queries {
        let image = raster::read_image(query)?;
        let (h, w) = (image.height as i64, image.width as i64);
        let blank = LabelMap::filled(image.height, image.width, 0);
        let (canvas, _) = val_resize(&image, &blank, size);
        let logits = inference_logits(
            model,
            config,
            &network_input(&canvas).unsqueeze(0).to_device(device),
            &support_images,
            &support_labels,
        );
        let (pred, _) = original_resolution(
            &logits.get(0),
            &Tensor::zeros([h, w], (Kind::Int64, Device::Cpu)),
        );
        let mask = mask_image(&pred.narrow(0, 0, h).narrow(1, 0, w));
        let foreground = mask.pixels().filter(|p| p[0] != 0).count() as f64 / (h * w) as f64;
        let original = RgbImage::from_raw(
            w as u32,
            h as u32,
            image.data.iter().map(|&v| v as u8).collect(),
        )
        .expect("the buffer has h x w x 3 values");
        let stem = query.file_stem().unwrap_or_default().to_string_lossy();
        let prediction = Prediction {
            query: query.clone(),
            mask: out.join(format!("{stem}_mask.png")),
            overlay: out.join(format!("{stem}_overlay.png")),
            foreground,
        };
        write_png(&prediction.mask, &mask)?;
        write_png(&prediction.overlay, &overlay(&original, &mask, MASK_COLOUR))?;
        predictions.push(prediction);
    }
    Ok(predictions)
}

/// The normalised `[3,H,W]` tensor of a transformed image.
fn network_input(image: &raster::RgbImage) -> Tensor {
    let mut data = vec![0f32; 3 * image.height * image.width];
    normalise_into(image, &mut data);
    Tensor::from_slice(&data).view([3, image.height as i64, image.width as i64])
}

/// The viewable image of a normalised `[3,H,W]` tensor (the inverse of the loader's normalisation).
pub fn denormalise(image: &Tensor) -> RgbImage {
    let (_, h, w) = image.size3().expect("a [3,H,W] image");
    let mean = Tensor::from_slice(&IMAGENET_MEAN).view([3, 1, 1]);
    let std = Tensor::from_slice(&IMAGENET_STD).view([3, 1, 1]);
    let pixels = (image.to_device(Device::Cpu).to_kind(Kind::Float) * std + mean)
        .round()
        .clamp(0.0, 255.0)
        .to_kind(Kind::Uint8)
        .permute([1, 2, 0])
        .contiguous()
        .view([-1]);
    RgbImage::from_raw(
        w as u32,
        h as u32,
        Vec::<u8>::try_from(&pixels).expect("u8 pixels"),
    )
    .expect("the buffer has h x w x 3 values")
}

/// The mask image (255 where 1, else 0) of a `[H,W]` label or prediction.
pub fn mask_image(mask: &Tensor) -> GrayImage {
    let (h, w) = mask.size2().expect("a [H,W] mask");
    let values = (mask.to_device(Device::Cpu).eq(1).to_kind(Kind::Uint8) * 255)
        .contiguous()
        .view([-1]);
    GrayImage::from_raw(
        w as u32,
        h as u32,
        Vec::<u8>::try_from(&values).expect("u8 values"),
    )
    .expect("the buffer has h x w values")
}

/// Colour of masks drawn over images (cyan: rare in natural images' objects).
pub const MASK_COLOUR: Rgb<u8> = Rgb([0, 230, 255]);

/// Reads a mask PNG of any format (grey, palette, RGB, 16-bit): a pixel with any non-zero channel
/// (alpha aside) is foreground. Returns 255 for foreground, 0 for background.
pub fn read_mask(path: &Path) -> Result<GrayImage, PredictError> {
    let decoded = image::open(path).map_err(|e| PredictError::MaskRead {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let rgb = decoded.into_rgb16();
    Ok(GrayImage::from_fn(rgb.width(), rgb.height(), |x, y| {
        let p = rgb.get_pixel(x, y).0;
        Luma([if p.iter().any(|&c| c != 0) { 255 } else { 0 }])
    }))
}

/// Writes `image` as PNG.
pub fn write_png<P, C>(path: &Path, image: &image::ImageBuffer<P, C>) -> Result<(), PredictError>
where
    P: image::PixelWithColorType,
    [P::Subpixel]: image::EncodableLayout,
    C: std::ops::Deref<Target = [P::Subpixel]>,
{
    image
        .save_with_format(path, image::ImageFormat::Png)
        .map_err(|e| PredictError::Write {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
}

/// `image` with the non-zero pixels of `mask` tinted half-way to `colour` and the mask's outline
/// (foreground pixels with a background 4-neighbour) drawn in `colour`.
pub fn overlay(image: &RgbImage, mask: &GrayImage, colour: Rgb<u8>) -> RgbImage {
    assert_eq!(
        image.dimensions(),
        mask.dimensions(),
        "image and mask sizes differ"
    );
    let (w, h) = mask.dimensions();
    let inside = |x: i64, y: i64| {
        x >= 0
            && y >= 0
            && x < w as i64
            && y < h as i64
            && mask.get_pixel(x as u32, y as u32)[0] != 0
    };
    RgbImage::from_fn(w, h, |x, y| {
        let (xi, yi) = (x as i64, y as i64);
        let pixel = *image.get_pixel(x, y);
        if !inside(xi, yi) {
            return pixel;
        }
        let edge = [(-1, 0), (1, 0), (0, -1), (0, 1)].iter().any(|(dx, dy)| {
            let (nx, ny) = (xi + dx, yi + dy);
            nx >= 0 && ny >= 0 && nx < w as i64 && ny < h as i64 && !inside(nx, ny)
        });
        if edge {
            colour
        } else {
            Rgb(std::array::from_fn(|c| {
                ((pixel[c] as u16 + colour[c] as u16) / 2) as u8
            }))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("svf-predict-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn any_non_zero_mask_pixel_is_foreground_whatever_the_format() {
        let dir = temp_dir("mask");
        let grey = GrayImage::from_raw(3, 1, vec![0, 1, 255]).unwrap();
        grey.save(dir.join("grey.png")).unwrap();
        let rgb = RgbImage::from_raw(3, 1, vec![0, 0, 0, 0, 0, 1, 128, 0, 0]).unwrap();
        rgb.save(dir.join("rgb.png")).unwrap();
        let wide =
            image::ImageBuffer::<Luma<u16>, Vec<u16>>::from_raw(3, 1, vec![0, 1, 0]).unwrap();
        wide.save(dir.join("wide.png")).unwrap();
        assert_eq!(
            read_mask(&dir.join("grey.png")).unwrap().into_raw(),
            vec![0, 255, 255]
        );
        assert_eq!(
            read_mask(&dir.join("rgb.png")).unwrap().into_raw(),
            vec![0, 255, 255]
        );
        assert_eq!(
            read_mask(&dir.join("wide.png")).unwrap().into_raw(),
            vec![0, 255, 0]
        );
        let message = read_mask(&dir.join("missing.png")).unwrap_err().to_string();
        assert!(message.contains("missing.png"), "{message}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn overlay_tints_inside_and_outlines_the_edge() {
        let image = RgbImage::from_pixel(5, 5, Rgb([0, 0, 100]));
        // A 3x3 square at (1..4, 1..4): its 8 border pixels are outline, the centre is tinted.
        let mask = GrayImage::from_fn(5, 5, |x, y| {
            Luma([if (1..4).contains(&x) && (1..4).contains(&y) {
                1
            } else {
                0
            }])
        });
        let out = overlay(&image, &mask, Rgb([200, 0, 0]));
        assert_eq!(*out.get_pixel(0, 0), Rgb([0, 0, 100]));
        assert_eq!(*out.get_pixel(1, 1), Rgb([200, 0, 0]));
        assert_eq!(*out.get_pixel(3, 2), Rgb([200, 0, 0]));
        assert_eq!(*out.get_pixel(2, 2), Rgb([100, 0, 50]));
        // A mask touching the image border is not outlined along it.
        let full = GrayImage::from_pixel(5, 5, Luma([255]));
        assert!(overlay(&image, &full, Rgb([200, 0, 0]))
            .pixels()
            .all(|p| *p == Rgb([100, 0, 50])));
    }
}
