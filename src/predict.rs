//! Segmentation of a user's own images from a few annotated supports.
//!
//! Images of any size go through the validation transform (longer side to `val_size`, top-left of
//! the canvas); the logits come back to the image's own size through the same original-resolution
//! step as the evaluation ([`crate::inference::original_resolution`]), cropped to the image.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use image::{GrayImage, Luma, RgbImage};
use tch::{Device, Kind, Tensor};

use crate::amp;
use crate::config::{Config, Method};
use crate::data::raster::{self, LabelMap};
use crate::data::transform::{normalise_into, val_resize};
use crate::data::DataError;
use crate::inference::{inference_logits, original_resolution};
use crate::model::FewShotModel;
use crate::visual::{mask_image, overlay, write_png, VisualError, MASK_COLOUR};

/// Why a prediction could not be made or written.
#[derive(Debug, thiserror::Error)]
pub enum PredictError {
    #[error("cannot read mask {path}: {message}; give a PNG whose non-zero pixels are the object")]
    MaskRead { path: PathBuf, message: String },
    #[error("mask {mask} is {}x{} but its image {image} is {}x{} (width x height); a support's mask must have its image's size", .mask_size.0, .mask_size.1, .image_size.0, .image_size.1)]
    MaskSize {
        mask: PathBuf,
        image: PathBuf,
        /// (width, height), as the `image` crate gives it.
        mask_size: (u32, u32),
        image_size: (u32, u32),
    },
    #[error("no support given: pass at least one --support IMAGE:MASK")]
    NoSupport,
    #[error("{given} support(s) given, but a BAM model is built for its config's shot ({shot}): its K-shot reweighting takes exactly that many; give {shot} --support/--mask pairs, or use a {given}-shot BAM checkpoint and its config")]
    BamShot { given: usize, shot: usize },
    #[error("queries {0} and {1} share a file name, so their outputs would collide; rename one")]
    SameName(PathBuf, PathBuf),
    #[error("output {output} would overwrite the {flag} input {input}; choose another --out")]
    OverwritesInput {
        output: PathBuf,
        flag: &'static str,
        input: PathBuf,
    },
    #[error("{0} exists and was not written by svf-predict (it may be your own annotation); choose another --out, or pass --overwrite to replace it")]
    Exists(PathBuf),
    #[error("support mask {0} has no object pixel (non-zero = object); the mask must mark the object in its --support image")]
    EmptyMask(PathBuf),
    #[error(transparent)]
    Image(#[from] DataError),
    #[error(transparent)]
    Write(#[from] VisualError),
}

/// An annotated support example: an image and its object mask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SupportExample {
    pub image: PathBuf,
    pub mask: PathBuf,
}

/// The PNG `Software` text of the files svf-predict writes: they, and no other file, may be
/// replaced by a later run without `--overwrite`.
const SOFTWARE: &str = "svf-predict";

/// A checked request: supports whose masks mark an object, and for each query the two files it
/// writes, none of them an input nor a file svf-predict did not write (unless overwriting).
/// Built before the model is loaded, so a mistake costs nothing.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    supports: Vec<SupportExample>,
    /// The supports' masks, read (and checked against their images' sizes) once.
    masks: Vec<GrayImage>,
    /// `(query, mask output, overlay output)`.
    queries: Vec<(PathBuf, PathBuf, PathBuf)>,
    out: PathBuf,
}

impl Job {
    /// Checks the inputs and output paths (see [`Job`]), and the support count against the model
    /// `config` builds; `overwrite` allows replacing existing files that are not inputs.
    pub fn new(
        config: &Config,
        supports: Vec<SupportExample>,
        queries: &[PathBuf],
        out: &Path,
        overwrite: bool,
    ) -> Result<Job, PredictError> {
        if supports.is_empty() {
            return Err(PredictError::NoSupport);
        }
        if config.method == Method::Bam && supports.len() != config.shot {
            return Err(PredictError::BamShot {
                given: supports.len(),
                shot: config.shot,
            });
        }
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
        // Inputs as (flag, path, canonical path), each resolved once.
        let inputs: Vec<(&'static str, &PathBuf, Option<PathBuf>)> = supports
            .iter()
            .flat_map(|s| [("--support", &s.image), ("--mask", &s.mask)])
            .chain(queries.iter().map(|q| ("--query", q)))
            .map(|(flag, path)| (flag, path, path.canonicalize().ok()))
            .collect();
        let queries: Vec<(PathBuf, PathBuf, PathBuf)> = queries
            .iter()
            .map(|query| {
                let stem = query.file_stem().unwrap_or_default().to_string_lossy();
                (
                    query.clone(),
                    out.join(format!("{stem}_mask.png")),
                    out.join(format!("{stem}_overlay.png")),
                )
            })
            .collect();
        for output in queries.iter().flat_map(|(_, m, o)| [m, o]) {
            // Only an existing file can be an input (or be lost).
            let Ok(canonical) = output.canonicalize() else {
                continue;
            };
            if let Some((flag, input, _)) = inputs
                .iter()
                .find(|(_, _, c)| c.as_ref() == Some(&canonical))
            {
                return Err(PredictError::OverwritesInput {
                    output: output.clone(),
                    flag,
                    input: (*input).clone(),
                });
            }
            if !overwrite && !written_by_us(output) {
                return Err(PredictError::Exists(output.clone()));
            }
        }
        let mut masks = Vec::with_capacity(supports.len());
        for support in &supports {
            let mask = read_mask(&support.mask)?;
            if !mask.pixels().any(|p| p[0] != 0) {
                return Err(PredictError::EmptyMask(support.mask.clone()));
            }
            let (height, width) = raster::read_image_size(&support.image)?;
            let image_size = (width as u32, height as u32);
            if mask.dimensions() != image_size {
                return Err(PredictError::MaskSize {
                    mask: support.mask.clone(),
                    image: support.image.clone(),
                    mask_size: mask.dimensions(),
                    image_size,
                });
            }
            masks.push(mask);
        }
        Ok(Job {
            supports,
            masks,
            queries,
            out: out.to_path_buf(),
        })
    }
}

/// Whether `path` is a PNG that svf-predict wrote (its `Software` text).
fn written_by_us(path: &Path) -> bool {
    let Ok(file) = std::fs::File::open(path) else {
        return false;
    };
    png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .is_ok_and(|reader| {
            reader
                .info()
                .uncompressed_latin1_text
                .iter()
                .any(|t| t.keyword == "Software" && t.text == SOFTWARE)
        })
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

/// Segments each query's object of the supports' class, writing its mask and overlay into the
/// job's output folder.
pub fn predict(
    model: &FewShotModel,
    config: &Config,
    device: Device,
    job: &Job,
) -> Result<Vec<Prediction>, PredictError> {
    let supports = &job.supports;
    amp::prepare(config, device);
    let size = config.val_size as usize;
    let (mut support_images, mut support_labels) = (Vec::new(), Vec::new());
    for (support, mask) in supports.iter().zip(&job.masks) {
        let image = raster::read_image(&support.image)?;
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
    std::fs::create_dir_all(&job.out).map_err(|e| VisualError {
        path: job.out.clone(),
        message: e.to_string(),
    })?;
    let mut predictions = Vec::with_capacity(job.queries.len());
    for (query, mask_path, overlay_path) in &job.queries {
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
        let size = mask.dimensions();
        write_png(
            mask_path,
            size,
            png::ColorType::Grayscale,
            mask.as_raw(),
            Some(SOFTWARE),
        )?;
        let tinted = overlay(&original, &mask, MASK_COLOUR);
        write_png(
            overlay_path,
            size,
            png::ColorType::Rgb,
            tinted.as_raw(),
            Some(SOFTWARE),
        )?;
        predictions.push(Prediction {
            query: query.clone(),
            mask: mask_path.clone(),
            overlay: overlay_path.clone(),
            foreground,
        });
    }
    Ok(predictions)
}

/// The normalised `[3,H,W]` tensor of a transformed image.
fn network_input(image: &raster::RgbImage) -> Tensor {
    let mut data = vec![0f32; 3 * image.height * image.width];
    normalise_into(image, &mut data);
    Tensor::from_slice(&data).view([3, image.height as i64, image.width as i64])
}

/// Reads a mask PNG of any format (grey, palette, RGB, 16-bit): a pixel with any non-zero channel
/// (alpha aside) is foreground. Returns 255 for foreground, 0 for background.
pub fn read_mask(path: &Path) -> Result<GrayImage, PredictError> {
    let decoded = raster::read_any(path).map_err(|e| PredictError::MaskRead {
        path: path.to_path_buf(),
        message: match e {
            DataError::Unreadable { message, .. } => message,
            other => other.to_string(),
        },
    })?;
    let rgb = decoded.into_rgb16();
    Ok(GrayImage::from_fn(rgb.width(), rgb.height(), |x, y| {
        let p = rgb.get_pixel(x, y).0;
        Luma([if p.iter().any(|&c| c != 0) { 255 } else { 0 }])
    }))
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
    fn a_bam_job_needs_its_configs_shot_count_before_any_model_loads() {
        let dir = temp_dir("bam-shot");
        let image = dir.join("s.png");
        RgbImage::new(4, 3).save(&image).unwrap();
        let mask = dir.join("m.png");
        GrayImage::from_pixel(4, 3, Luma([255]))
            .save(&mask)
            .unwrap();
        let support = SupportExample { image, mask };
        let bam = |shot| Config {
            method: Method::Bam,
            shot,
            ..Config::default()
        };
        let job = |config: &Config, supports: usize| {
            Job::new(
                config,
                vec![support.clone(); supports],
                &[dir.join("q.png")],
                &dir.join("out"),
                false,
            )
        };
        let message = job(&bam(1), 2).unwrap_err().to_string();
        assert!(
            message.starts_with(
                "2 support(s) given, but a BAM model is built for its config's shot (1)"
            ),
            "{message}"
        );
        assert!(job(&bam(2), 2).is_ok());
        // PFENet averages any number of supports.
        assert!(job(&Config::default(), 2).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_job_never_writes_over_inputs_or_files_it_did_not_write() {
        let dir = temp_dir("job");
        let image = dir.join("s1.png");
        RgbImage::new(4, 3).save(&image).unwrap();
        let mask = dir.join("s1_mask.png");
        GrayImage::from_fn(4, 3, |x, _| Luma([u8::from(x == 0)]))
            .save(&mask)
            .unwrap();
        let supports = vec![SupportExample {
            image: image.clone(),
            mask: mask.clone(),
        }];
        let job = |query: &Path, out: &Path, overwrite: bool| {
            Job::new(
                &Config::default(),
                supports.clone(),
                &[query.to_path_buf()],
                out,
                overwrite,
            )
            .map_err(|e| e.to_string())
        };
        // Query s1 into the support's folder: its mask output is the --mask input, even when named
        // through another path to the same file, and even with --overwrite.
        let aliased = dir.join(".").join("..").join(dir.file_name().unwrap());
        for (out, overwrite) in [(&dir, false), (&aliased, true)] {
            let message = job(&image, out, overwrite).unwrap_err();
            assert!(
                message.contains("would overwrite the --mask input"),
                "{message}"
            );
            assert!(message.contains("s1_mask.png"), "{message}");
        }
        // A hand annotation beside the query is kept unless --overwrite.
        let query = dir.join("q.png");
        RgbImage::new(4, 3).save(&query).unwrap();
        let annotation = dir.join("q_mask.png");
        GrayImage::new(4, 3).save(&annotation).unwrap();
        let message = job(&query, &dir, false).unwrap_err();
        assert!(
            message.contains("q_mask.png exists and was not written by svf-predict")
                && message.contains("--overwrite"),
            "{message}"
        );
        let planned = job(&query, &dir, true).unwrap();
        // svf-predict's own outputs are replaced without asking.
        let (_, mask_out, overlay_out) = &planned.queries[0];
        write_png(
            mask_out,
            (4, 3),
            png::ColorType::Grayscale,
            &[0; 12],
            Some(SOFTWARE),
        )
        .unwrap();
        write_png(
            overlay_out,
            (4, 3),
            png::ColorType::Rgb,
            &[0; 36],
            Some(SOFTWARE),
        )
        .unwrap();
        // Complete files (the PNG's end written): they decode to the pixels given.
        assert!(read_mask(mask_out).unwrap().pixels().all(|p| p[0] == 0));
        assert!(job(&query, &dir, false).is_ok());
        // A support mask of another size than its image is refused before any model runs.
        GrayImage::from_pixel(3, 4, Luma([1])).save(&mask).unwrap();
        let message = job(&query, &dir.join("out"), false).unwrap_err();
        assert!(
            message.contains("is 3x4 but its image") && message.contains("is 4x3 (width x height)"),
            "{message}"
        );
        // A support mask without an object pixel is refused.
        GrayImage::new(4, 3).save(&mask).unwrap();
        let message = job(&query, &dir.join("out"), false).unwrap_err();
        assert!(
            message.contains("s1_mask.png has no object pixel (non-zero = object)"),
            "{message}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
