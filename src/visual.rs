//! Pictures of segmentations for people: images from network tensors, masks, overlays, qualitative
//! panels with titles drawn in a small bitmap font, and PNG writing.

use std::path::{Path, PathBuf};

use image::{GrayImage, Rgb, RgbImage};
use tch::{Device, Kind, Tensor};

use crate::data::transform::{IMAGENET_MEAN, IMAGENET_STD};

/// Why a picture could not be written.
#[derive(Debug, thiserror::Error)]
#[error("cannot write {path}: {message}; check that the output directory is writable")]
pub struct VisualError {
    pub path: PathBuf,
    pub message: String,
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

/// Writes 8-bit `data` (`colour` pixels of `width` x `height`) as the PNG `path`, with a `Software`
/// text when given. Atomic and checked to the end: staged as `<path>.tmp`, unbuffered and finished
/// explicitly (a PNG encoder's or a buffer's drop writes the file's end and swallows its error, so a
/// full disk would leave a truncated file reported as written), then renamed into place.
pub fn write_png(
    path: &Path,
    (width, height): (u32, u32),
    colour: png::ColorType,
    data: &[u8],
    software: Option<&str>,
) -> Result<(), VisualError> {
    let failed = |message: String| VisualError {
        path: path.to_path_buf(),
        message,
    };
    let mut tmp = path.as_os_str().to_os_string();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let written = std::fs::File::create(&tmp)
        .map_err(|e| e.to_string())
        .and_then(|file| {
            let mut encoder = png::Encoder::new(file, width, height);
            encoder.set_color(colour);
            encoder.set_depth(png::BitDepth::Eight);
            if let Some(software) = software {
                encoder
                    .add_text_chunk("Software".to_string(), software.to_string())
                    .map_err(|e| e.to_string())?;
            }
            let mut writer = encoder.write_header().map_err(|e| e.to_string())?;
            writer.write_image_data(data).map_err(|e| e.to_string())?;
            writer.finish().map_err(|e| e.to_string())
        })
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| e.to_string()));
    written.map_err(|message| {
        let _ = std::fs::remove_file(&tmp);
        failed(message)
    })
}

/// Writes an RGB `image` as the PNG `path` ([`write_png`]).
pub fn write_rgb_png(path: &Path, image: &RgbImage) -> Result<(), VisualError> {
    write_png(
        path,
        image.dimensions(),
        png::ColorType::Rgb,
        image.as_raw(),
        None,
    )
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

/// Glyphs of a 5×7 bitmap font, one row per byte (bit 4 = leftmost pixel): digits, capitals and a
/// little punctuation, enough for titles such as `CLASS 7  IOU 54.2%`. Lower case draws as upper
/// case; anything else as `?`.
fn glyph(c: char) -> [u8; 7] {
    match c.to_ascii_uppercase() {
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        'A' => [0x0E, 0x11, 0x11, 0x11, 0x1F, 0x11, 0x11],
        'B' => [0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E],
        'C' => [0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E],
        'D' => [0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C],
        'E' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F],
        'F' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10],
        'G' => [0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F],
        'H' => [0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'I' => [0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'J' => [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C],
        'K' => [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11],
        'L' => [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F],
        'M' => [0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11],
        'N' => [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11],
        'O' => [0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'P' => [0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10],
        'Q' => [0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D],
        'R' => [0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11],
        'S' => [0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E],
        'T' => [0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04],
        'U' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'V' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'W' => [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A],
        'X' => [0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11],
        'Y' => [0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04],
        'Z' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F],
        ' ' => [0; 7],
        '.' => [0, 0, 0, 0, 0, 0x0C, 0x0C],
        ',' => [0, 0, 0, 0, 0x0C, 0x04, 0x08],
        ':' => [0, 0x0C, 0x0C, 0, 0x0C, 0x0C, 0],
        '-' => [0, 0, 0, 0x1F, 0, 0, 0],
        '+' => [0, 0x04, 0x04, 0x1F, 0x04, 0x04, 0],
        '=' => [0, 0, 0x1F, 0, 0x1F, 0, 0],
        '%' => [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03],
        '/' => [0, 0x01, 0x02, 0x04, 0x08, 0x10, 0],
        '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02],
        ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08],
        '_' => [0, 0, 0, 0, 0, 0, 0x1F],
        _ => [0x0E, 0x11, 0x01, 0x02, 0x04, 0, 0x04],
    }
}

/// Width in pixels of `text` drawn at `scale` (5 pixels per glyph and 1 of spacing, times scale).
pub fn text_width(text: &str, scale: u32) -> u32 {
    (text.chars().count() as u32 * 6).saturating_sub(1) * scale
}

/// Draws `text` with its top-left corner at (x, y), each font pixel a `scale`×`scale` square;
/// what falls outside the image is clipped.
pub fn draw_text(image: &mut RgbImage, x: u32, y: u32, text: &str, scale: u32, color: Rgb<u8>) {
    for (index, c) in text.chars().enumerate() {
        let left = x + index as u32 * 6 * scale;
        for (row, bits) in glyph(c).iter().enumerate() {
            for col in 0..5u32 {
                if bits & (0x10 >> col) == 0 {
                    continue;
                }
                for dy in 0..scale {
                    for dx in 0..scale {
                        let (px, py) = (left + col * scale + dx, y + row as u32 * scale + dy);
                        if px < image.width() && py < image.height() {
                            image.put_pixel(px, py, color);
                        }
                    }
                }
            }
        }
    }
}

/// Tiles narrower than this are enlarged (nearest, by an integer factor) so that the panel stays
/// readable for small validation sizes and its captions fit.
const MIN_TILE_WIDTH: u32 = 160;

/// A qualitative panel: the tiles (e.g. support with its mask, query with the ground truth, query
/// with the prediction) side by side under a title strip holding `title` and each tile's caption.
pub fn qualitative_panel(title: &str, tiles: &[(&str, &RgbImage)]) -> RgbImage {
    const GAP: u32 = 4;
    const SCALE: u32 = 2;
    let tiles: Vec<(&str, RgbImage)> = tiles
        .iter()
        .map(|(caption, tile)| {
            let factor = MIN_TILE_WIDTH.div_ceil(tile.width().max(1)).max(1);
            let enlarged = image::imageops::resize(
                *tile,
                tile.width() * factor,
                tile.height() * factor,
                image::imageops::FilterType::Nearest,
            );
            (*caption, enlarged)
        })
        .collect();
    let line = 7 * SCALE + 2 * GAP;
    let strip = 2 * line;
    let width = tiles.iter().map(|(_, t)| t.width() + GAP).sum::<u32>() + GAP;
    let height = strip + tiles.iter().map(|(_, t)| t.height()).max().unwrap_or(0) + GAP;
    let width = width.max(text_width(title, SCALE) + 2 * GAP);
    let mut panel = RgbImage::from_pixel(width, height, Rgb([255, 255, 255]));
    let ink = Rgb([0, 0, 0]);
    draw_text(&mut panel, GAP, GAP, title, SCALE, ink);
    let mut x = GAP;
    for (caption, tile) in &tiles {
        draw_text(&mut panel, x, line + GAP, caption, SCALE, ink);
        image::imageops::replace(&mut panel, tile, x as i64, strip as i64);
        x += tile.width() + GAP;
    }
    panel
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Luma;

    #[test]
    fn pngs_are_written_whole_tagged_and_in_place_or_not_at_all() {
        let dir = std::env::temp_dir().join(format!("svf-visual-png-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("grey.png");
        let pixels = [0u8, 255, 7, 9, 11, 13];
        write_png(
            &path,
            (3, 2),
            png::ColorType::Grayscale,
            &pixels,
            Some("me"),
        )
        .unwrap();
        let decoder =
            png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&path).unwrap()));
        let reader = decoder.read_info().unwrap();
        let text = &reader.info().uncompressed_latin1_text;
        assert!(text
            .iter()
            .any(|t| t.keyword == "Software" && t.text == "me"));
        assert_eq!(image::open(&path).unwrap().to_luma8().into_raw(), pixels);
        assert!(!dir.join("grey.png.tmp").exists());
        // A failed write (the data does not fill the size) leaves neither file nor stage.
        let bad = dir.join("bad.png");
        let message = write_png(&bad, (3, 3), png::ColorType::Grayscale, &pixels, None)
            .unwrap_err()
            .to_string();
        assert!(message.contains("bad.png"), "{message}");
        assert!(!bad.exists() && !dir.join("bad.png.tmp").exists());
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

    #[test]
    fn text_is_drawn_from_the_glyphs() {
        let mut image = RgbImage::new(20, 10);
        let ink = Rgb([255, 0, 0]);
        draw_text(&mut image, 1, 1, "1-", 1, ink);
        // '1': rows 0x04, 0x0C, then 0x04...: pixel (x=1+2, y=1) lit, (1+1, 1+1) lit, (1, 1) not.
        assert_eq!(*image.get_pixel(3, 1), ink);
        assert_eq!(*image.get_pixel(2, 2), ink);
        assert_eq!(*image.get_pixel(1, 1), Rgb([0, 0, 0]));
        // '-' starts 6 pixels further: its middle row (y=1+3) spans x=7..=11.
        assert!((7..12).all(|x| *image.get_pixel(x, 4) == ink));
        assert_eq!(*image.get_pixel(7, 3), Rgb([0, 0, 0]));
        let lit = image.pixels().filter(|p| **p == ink).count();
        assert_eq!(lit, 10 + 5, "'1' has 10 pixels, '-' 5");
        // Scaled text stays clipped inside the image and has the announced width.
        draw_text(&mut image, 15, 5, "88", 3, ink);
        assert_eq!(text_width("88", 3), 33);
        // Every digit and letter is a distinct glyph.
        let mut glyphs: Vec<[u8; 7]> = ('0'..='9').chain('A'..='Z').map(glyph).collect();
        glyphs.sort();
        glyphs.dedup();
        assert_eq!(glyphs.len(), 36);
    }

    #[test]
    fn panel_places_tiles_under_the_title_strip() {
        let red = RgbImage::from_pixel(200, 8, Rgb([255, 0, 0]));
        // 60 wide: enlarged 3 times to 180 x 18.
        let blue = RgbImage::from_pixel(60, 6, Rgb([0, 0, 255]));
        let panel = qualitative_panel("IOU 50.0%", &[("A", &red), ("B", &blue)]);
        let strip = 2 * (14 + 8);
        assert_eq!(panel.height(), strip + 18 + 4);
        assert_eq!(panel.width(), 4 + 200 + 4 + 180 + 4);
        assert_eq!(*panel.get_pixel(4, strip), Rgb([255, 0, 0]));
        assert_eq!(*panel.get_pixel(4, strip + 8), Rgb([255, 255, 255]));
        assert_eq!(*panel.get_pixel(208 + 179, strip + 17), Rgb([0, 0, 255]));
        // Title ink is in the strip.
        assert!((0..strip)
            .any(|y| (0..panel.width()).any(|x| *panel.get_pixel(x, y) == Rgb([0, 0, 0]))));
    }
}
