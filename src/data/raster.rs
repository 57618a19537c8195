//! Pixel buffers of images and label maps, and reading them from files.
//!
//! Images are held as interleaved RGB `f32` (0..255), as the reference works on `np.float32` after
//! `cv2.imread`, so the transforms round nothing between steps. Labels are `u8` class indices.

use std::path::Path;

use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageReader};

use super::DataError;

/// An RGB image, row-major, channels interleaved (`data[(y * width + x) * 3 + c]`).
#[derive(Debug, Clone, PartialEq)]
pub struct RgbImage {
    pub height: usize,
    pub width: usize,
    pub data: Vec<f32>,
}

impl RgbImage {
    /// An image of one colour.
    pub fn filled(height: usize, width: usize, rgb: [f32; 3]) -> RgbImage {
        let data = rgb
            .iter()
            .copied()
            .cycle()
            .take(height * width * 3)
            .collect();
        RgbImage {
            height,
            width,
            data,
        }
    }

    pub fn pixel(&self, y: usize, x: usize) -> [f32; 3] {
        let i = (y * self.width + x) * 3;
        [self.data[i], self.data[i + 1], self.data[i + 2]]
    }
}

/// A label map of class indices, row-major (`data[y * width + x]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelMap {
    pub height: usize,
    pub width: usize,
    pub data: Vec<u8>,
}

impl LabelMap {
    pub fn filled(height: usize, width: usize, value: u8) -> LabelMap {
        LabelMap {
            height,
            width,
            data: vec![value; height * width],
        }
    }

    pub fn at(&self, y: usize, x: usize) -> u8 {
        self.data[y * self.width + x]
    }

    /// The episode's label: `class` becomes 1, 255 (ignore) stays, every other value becomes 0.
    pub fn binarised(&self, class: usize) -> LabelMap {
        let data = self
            .data
            .iter()
            .map(|&v| match v {
                255 => 255,
                v if v as usize == class => 1,
                _ => 0,
            })
            .collect();
        LabelMap {
            height: self.height,
            width: self.width,
            data,
        }
    }

    /// Pixels of every value: `counts[v]` is the number of pixels equal to `v`.
    pub fn histogram(&self) -> [u32; 256] {
        let mut counts = [0u32; 256];
        for &v in &self.data {
            counts[v as usize] += 1;
        }
        counts
    }
}

fn unreadable(path: &Path, message: impl Into<String>) -> DataError {
    DataError::Unreadable {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

fn read_bytes(path: &Path) -> Result<Vec<u8>, DataError> {
    std::fs::read(path).map_err(|e| unreadable(path, e.to_string()))
}

/// Whether a JPEG stream stops before its end-of-image marker. The decoder fills a cut-off scan
/// with grey instead of failing, so a truncated download would otherwise pass as a valid image.
/// Entropy-coded data never holds `FF D9` or `FF DA` (a data `FF` is followed by `00` or a restart
/// marker), so the last start-of-scan must be followed by an end-of-image marker.
fn jpeg_is_truncated(bytes: &[u8]) -> bool {
    let last_scan = bytes.windows(2).rposition(|w| w == [0xFF, 0xDA]);
    let Some(scan) = last_scan else {
        return true;
    };
    !bytes[scan..].windows(2).any(|w| w == [0xFF, 0xD9])
}

fn decode(path: &Path, bytes: &[u8]) -> Result<DynamicImage, DataError> {
    if bytes.starts_with(&[0xFF, 0xD8]) && jpeg_is_truncated(bytes) {
        return Err(unreadable(
            path,
            "truncated JPEG (no end-of-image marker after the last scan); re-download or re-encode it",
        ));
    }
    let failed = |e: image::ImageError| unreadable(path, e.to_string());
    let mut decoder = ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| unreadable(path, e.to_string()))?
        .into_decoder()
        .map_err(failed)?;
    let orientation = decoder.orientation().map_err(failed)?;
    let mut image = DynamicImage::from_decoder(decoder).map_err(failed)?;
    image.apply_orientation(orientation);
    Ok(image)
}

/// Reads an image file of any format the build decodes, as it is displayed: turned by its EXIF
/// orientation (a phone's portrait photo), as OpenCV's `imread` (the references' reader) and
/// image viewers do.
pub fn read_any(path: &Path) -> Result<DynamicImage, DataError> {
    decode(path, &read_bytes(path)?)
}

/// Reads an image file as RGB (grey images are expanded, as `cv2.IMREAD_COLOR` does), turned by
/// its EXIF orientation ([`read_any`]).
pub fn read_image(path: &Path) -> Result<RgbImage, DataError> {
    let rgb = read_any(path)?.into_rgb8();
    Ok(RgbImage {
        height: rgb.height() as usize,
        width: rgb.width() as usize,
        data: rgb.into_raw().into_iter().map(f32::from).collect(),
    })
}

/// The (height, width) of an image file as [`read_image`] returns it, from its header, without
/// decoding the pixels.
pub fn read_image_size(path: &Path) -> Result<(usize, usize), DataError> {
    let failed = |e: image::ImageError| unreadable(path, e.to_string());
    let mut decoder = ImageReader::open(path)
        .map_err(|e| unreadable(path, e.to_string()))?
        .with_guessed_format()
        .map_err(|e| unreadable(path, e.to_string()))?
        .into_decoder()
        .map_err(failed)?;
    let (w, h) = decoder.dimensions();
    let turned = matches!(
        decoder.orientation().map_err(failed)?,
        Orientation::Rotate90
            | Orientation::Rotate270
            | Orientation::Rotate90FlipH
            | Orientation::Rotate270FlipH
    );
    let (w, h) = if turned { (h, w) } else { (w, h) };
    Ok((h as usize, w as usize))
}

/// Reads a label PNG holding one 8-bit class index per pixel (the `SegmentationClassAug` format).
pub fn read_label(path: &Path) -> Result<LabelMap, DataError> {
    match decode(path, &read_bytes(path)?)? {
        DynamicImage::ImageLuma8(gray) => Ok(LabelMap {
            height: gray.height() as usize,
            width: gray.width() as usize,
            data: gray.into_raw(),
        }),
        other => Err(DataError::BadLabel {
            path: path.to_path_buf(),
            message: format!(
                "holds {:?} pixels, not one 8-bit class index per pixel; convert palette or colour \
                 labels to 8-bit greyscale class indices (the SegmentationClassAug format)",
                other.color()
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 16×8 JPEG, left half black and right half white, with an EXIF APP1 segment that says
    /// `orientation` (6 = turn 90° clockwise to display).
    fn jpeg_with_orientation(orientation: u8) -> Vec<u8> {
        let pixels =
            image::GrayImage::from_fn(16, 8, |x, _| image::Luma([if x < 8 { 0 } else { 255 }]));
        let mut jpeg = Vec::new();
        DynamicImage::ImageLuma8(pixels)
            .write_to(
                &mut std::io::Cursor::new(&mut jpeg),
                image::ImageFormat::Jpeg,
            )
            .unwrap();
        // APP1: "Exif\0\0", a big-endian TIFF header, one IFD entry (0x0112 SHORT = orientation).
        let mut app1 = vec![0xFF, 0xE1, 0x00, 0x22];
        app1.extend_from_slice(b"Exif\0\0MM\0\x2a\0\0\0\x08\0\x01\x01\x12\0\x03\0\0\0\x01\0");
        app1.extend_from_slice(&[orientation, 0, 0, 0, 0, 0, 0]);
        assert_eq!(app1.len(), 2 + 0x22);
        [&jpeg[..2], &app1[..], &jpeg[2..]].concat()
    }

    #[test]
    fn images_are_read_as_displayed_turned_by_their_exif_orientation() {
        let dir = std::env::temp_dir().join(format!("svf-raster-exif-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let plain = dir.join("plain.jpg");
        let turned = dir.join("turned.jpg");
        std::fs::write(&plain, jpeg_with_orientation(1)).unwrap();
        std::fs::write(&turned, jpeg_with_orientation(6)).unwrap();
        assert_eq!(read_image_size(&plain).unwrap(), (8, 16));
        assert_eq!(read_image_size(&turned).unwrap(), (16, 8));
        let image = read_image(&turned).unwrap();
        assert_eq!((image.height, image.width), (16, 8));
        // Turned clockwise, the black left half is on top.
        let at = |y: usize, x: usize| image.data[3 * (y * image.width + x)];
        assert!(
            at(3, 4) < 40.0 && at(12, 4) > 215.0,
            "{} {}",
            at(3, 4),
            at(12, 4)
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn binarised_keeps_only_zero_one_and_ignore() {
        let label = LabelMap {
            height: 1,
            width: 5,
            data: vec![0, 3, 7, 255, 3],
        };
        assert_eq!(label.binarised(3).data, vec![0, 1, 0, 255, 1]);
        assert_eq!(label.binarised(7).data, vec![0, 0, 1, 255, 0]);
        assert_eq!(label.histogram()[3], 2);
    }

    #[test]
    fn truncation_is_detected_from_the_markers() {
        let whole = [0xFF, 0xD8, 0xFF, 0xDA, 1, 2, 0xFF, 0x00, 3, 0xFF, 0xD9];
        assert!(!jpeg_is_truncated(&whole));
        assert!(jpeg_is_truncated(&whole[..8]));
        // An end marker before the last scan (e.g. an embedded thumbnail) does not count.
        let thumbnail_only = [0xFF, 0xD8, 0xFF, 0xDA, 0xFF, 0xD9, 0xFF, 0xDA, 5, 6];
        assert!(jpeg_is_truncated(&thumbnail_only));
    }
}
