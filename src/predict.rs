//! Segmentation of a user's own images from a few annotated supports.
//!
//! Images of any size go through the validation transform (longer side to `val_size`, top-left of
//! the canvas); the logits come back to the image's own size through the same original-resolution
//! step as the evaluation ([`crate::eval::original_resolution`]), cropped to the image.

use std::path::{Path, PathBuf};

use image::{GrayImage, Luma, Rgb, RgbImage};

/// Why a prediction could not be made or written.
#[derive(Debug, thiserror::Error)]
pub enum PredictError {
    #[error("cannot read mask {path}: {message}; give a PNG whose non-zero pixels are the object")]
    MaskRead { path: PathBuf, message: String },
    #[error("cannot write {path}: {message}; check that the output directory is writable")]
    Write { path: PathBuf, message: String },
}

/// Colour of masks drawn over images.
pub const MASK_COLOUR: Rgb<u8> = Rgb([255, 40, 40]);

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
    assert_eq!(image.dimensions(), mask.dimensions(), "image and mask sizes differ");
    let (w, h) = mask.dimensions();
    let inside = |x: i64, y: i64| {
        x >= 0 && y >= 0 && x < w as i64 && y < h as i64 && mask.get_pixel(x as u32, y as u32)[0] != 0
    };
    RgbImage::from_fn(w, h, |x, y| {
        let (xi, yi) = (x as i64, y as i64);
        let pixel = *image.get_pixel(x, y);
        if !inside(xi, yi) {
            return pixel;
        }
        let edge = [(-1, 0), (1, 0), (0, -1), (0, 1)]
            .iter()
            .any(|(dx, dy)| {
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
        let wide = image::ImageBuffer::<Luma<u16>, Vec<u16>>::from_raw(3, 1, vec![0, 1, 0]).unwrap();
        wide.save(dir.join("wide.png")).unwrap();
        assert_eq!(read_mask(&dir.join("grey.png")).unwrap().into_raw(), vec![0, 255, 255]);
        assert_eq!(read_mask(&dir.join("rgb.png")).unwrap().into_raw(), vec![0, 255, 255]);
        assert_eq!(read_mask(&dir.join("wide.png")).unwrap().into_raw(), vec![0, 255, 0]);
        let message = read_mask(&dir.join("missing.png")).unwrap_err().to_string();
        assert!(message.contains("missing.png"), "{message}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn overlay_tints_inside_and_outlines_the_edge() {
        let image = RgbImage::from_pixel(5, 5, Rgb([0, 0, 100]));
        // A 3x3 square at (1..4, 1..4): its 8 border pixels are outline, the centre is tinted.
        let mask = GrayImage::from_fn(5, 5, |x, y| {
            Luma([if (1..4).contains(&x) && (1..4).contains(&y) { 1 } else { 0 }])
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
