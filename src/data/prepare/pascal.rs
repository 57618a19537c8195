//! PASCAL-5i from VOC 2012 and SBD: `SegmentationClassAug` labels, `JPEGImages`, and PFENet's two
//! lists.
//!
//! **Lists.** The validation list is VOC 2012's segmentation `val` (1449 images). The training list
//! is PFENet's `voc_sbd_merge_noduplicate.txt`: SBD's `train_noval.txt` (5623 images: SBD's training
//! images without any VOC 2012 val image, a separate download from the SBD page) followed by VOC
//! 2012's segmentation `train` (1464), duplicates dropped keeping the first, which is 5953 images
//! (1134 are in both). That is how PFENet built its list (its README and `duplicate_removal.py`),
//! and it is checked against PFENet's published list files: `voc_sbd_merge.txt` is exactly
//! `sbd_data.txt` (= `train_noval.txt`) followed by `voc_original_train.txt`. It is *not* the
//! 10582-image "SegmentationClassAug" training set ((SBD train ∪ SBD val ∪ VOC train) − VOC val);
//! pass `--sbd-list` another SBD id list for that. As a guard, any VOC val image is removed from the
//! training list (none is with the real `train_noval.txt`).
//!
//! **Labels.** Where VOC 2012 has its own annotation (`SegmentationClass/<id>.png`, palette indices
//! = classes, 255 = object outlines and "difficult"), it wins, as in the DeepLab `SegmentationClassAug`
//! set; otherwise SBD's `cls/<id>.mat` (struct `GTcls`, field `Segmentation`, classes 0–20, no 255).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use super::label_record::{describe_input, LabelRecord};
use super::mat5::{self, MatValue};
use super::{
    check_label_values, claim_output, create_dir, finish, place_image, place_label, require_dir,
    require_file, run_items, write_list_of, ImageMode, ItemOutcome, PrepareError, PrepareSummary,
    SkippedFile,
};
use crate::data::raster::{read_image_size, LabelMap};

/// PASCAL VOC object classes (labels 1..=20).
pub const CLASSES: usize = 20;
/// File names of the lists, as the shipped PASCAL configs name them.
pub const TRAIN_LIST: &str = "voc_sbd_merge_noduplicate.txt";
pub const VAL_LIST: &str = "val.txt";
/// Where `train_noval.txt` comes from.
pub const SBD_TRAIN_NOVAL_URL: &str = "http://home.bharathh.info/pubs/codes/SBD/train_noval.txt";

/// Inputs and outputs of [`prepare_pascal`].
#[derive(Debug, Clone)]
pub struct PascalOptions {
    /// `VOCdevkit/VOC2012`.
    pub voc: PathBuf,
    /// `benchmark_RELEASE/dataset`.
    pub sbd: PathBuf,
    /// SBD ids of the training list; default `<sbd>/train_noval.txt`.
    pub sbd_list: Option<PathBuf>,
    /// The data root to write (`JPEGImages/`, `SegmentationClassAug/`).
    pub out: PathBuf,
    /// Folder of the two list files.
    pub lists: PathBuf,
    pub images: ImageMode,
    pub threads: usize,
}

/// PFENet's training ids: `sbd` then `voc_train` with repeats dropped (first kept), minus every
/// id of `voc_val`; also returns how many val ids were removed.
pub fn training_ids(
    sbd: &[String],
    voc_train: &[String],
    voc_val: &[String],
) -> (Vec<String>, usize) {
    let val: HashSet<&String> = voc_val.iter().collect();
    let mut seen = HashSet::new();
    let mut removed = 0;
    let mut ids = Vec::new();
    for id in sbd.iter().chain(voc_train) {
        if !seen.insert(id) {
            continue;
        }
        if val.contains(id) {
            removed += 1;
        } else {
            ids.push(id.clone());
        }
    }
    (ids, removed)
}

/// Reads an id list (one image id per line, as in `ImageSets/Segmentation/*.txt`).
fn read_ids(path: &Path) -> Result<Vec<String>, PrepareError> {
    let text = std::fs::read_to_string(path).map_err(|e| PrepareError::BadInput {
        path: path.to_path_buf(),
        message: format!("cannot read the id list: {e}"),
    })?;
    let mut ids = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let id = line.trim();
        if id.is_empty() {
            continue;
        }
        if id.contains(char::is_whitespace) || id.contains('/') {
            return Err(PrepareError::BadInput {
                path: path.to_path_buf(),
                message: format!(
                    "line {}: `{id}` is not an image id (one id such as 2008_000008 per line)",
                    number + 1
                ),
            });
        }
        ids.push(id.to_string());
    }
    Ok(ids)
}

/// Reads a VOC `SegmentationClass` PNG: palette indices are the classes, so they are read as they
/// are (the `image` crate would expand them to the palette's colours).
pub fn read_voc_label(path: &Path) -> Result<LabelMap, String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    let mut decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    decoder.set_transformations(png::Transformations::IDENTITY);
    let mut reader = decoder.read_info().map_err(|e| e.to_string())?;
    let mut buffer = vec![0; reader.output_buffer_size().ok_or("image too large")?];
    let info = reader
        .next_frame(&mut buffer)
        .map_err(|e| format!("{e} (truncated or corrupt PNG?)"))?;
    let bits = info.bit_depth as usize;
    let indexed = matches!(
        (info.color_type, info.bit_depth),
        (png::ColorType::Indexed, _) | (png::ColorType::Grayscale, png::BitDepth::Eight)
    );
    if !indexed {
        return Err(format!(
            "is a {:?} {bits}-bit PNG, not a palette (or 8-bit grey) class-index label",
            info.color_type
        ));
    }
    let (width, height) = (info.width as usize, info.height as usize);
    let mut data = Vec::with_capacity(width * height);
    for row in buffer[..info.line_size * height].chunks(info.line_size) {
        data.extend((0..width).map(|x| {
            let bit = x * bits;
            let byte = row[bit / 8];
            // Sub-byte pixels are packed from the most significant bit.
            ((byte >> (8 - bits - bit % 8)) as usize & ((1 << bits) - 1)) as u8
        }));
    }
    Ok(LabelMap {
        height,
        width,
        data,
    })
}

/// Reads SBD's `cls/<id>.mat`: `GTcls.Segmentation`, an H×W array of class indices.
pub fn read_sbd_label(path: &Path) -> Result<LabelMap, String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    let variables = mat5::parse(&bytes)?;
    let Some((_, gtcls)) = variables.iter().find(|(name, _)| name == "GTcls") else {
        let names: Vec<&str> = variables.iter().map(|(n, _)| n.as_str()).collect();
        return Err(format!(
            "holds no variable GTcls (it holds {names:?}); SBD's class labels are the files in \
             benchmark_RELEASE/dataset/cls/ (not inst/)"
        ));
    };
    let Some(segmentation) = gtcls.field("Segmentation") else {
        return Err(format!(
            "GTcls is {}, without the field Segmentation",
            gtcls.describe()
        ));
    };
    let MatValue::Numeric { dims, values } = segmentation else {
        return Err(format!(
            "GTcls.Segmentation is {}, not a numeric array",
            segmentation.describe()
        ));
    };
    let [height, width] = dims[..] else {
        return Err(format!("GTcls.Segmentation has size {dims:?}, not H x W"));
    };
    if let Some(bad) = values
        .iter()
        .find(|&&v| v.fract() != 0.0 || !(0.0..=255.0).contains(&v))
    {
        return Err(format!(
            "GTcls.Segmentation holds {bad}, not a class index 0..=255"
        ));
    }
    // MATLAB stores column-major.
    let mut data = vec![0u8; height * width];
    for x in 0..width {
        for y in 0..height {
            data[y * width + x] = values[x * height + y] as u8;
        }
    }
    Ok(LabelMap {
        height,
        width,
        data,
    })
}

/// Label and image of one id, written (or kept) under `out`.
fn prepare_id(
    id: &str,
    options: &PascalOptions,
    record: &LabelRecord,
) -> Result<Result<ItemOutcome, SkippedFile>, PrepareError> {
    let voc_label = options
        .voc
        .join("SegmentationClass")
        .join(format!("{id}.png"));
    let sbd_label = options.sbd.join("cls").join(format!("{id}.mat"));
    let voc_image = options.voc.join("JPEGImages").join(format!("{id}.jpg"));
    let sbd_image = options.sbd.join("img").join(format!("{id}.jpg"));
    let image = if voc_image.is_file() || !sbd_image.is_file() {
        voc_image
    } else {
        sbd_image
    };
    let size = match read_image_size(&image) {
        Ok(size) => size,
        Err(_) if !image.exists() => {
            return Ok(Err(SkippedFile::new(&image, "image file missing")))
        }
        Err(e) => return Ok(Err(SkippedFile::new(&image, e.to_string()))),
    };
    type Reader = fn(&Path) -> Result<LabelMap, String>;
    let (source, read): (&Path, Reader) = if voc_label.is_file() {
        (&voc_label, read_voc_label)
    } else if sbd_label.is_file() {
        (&sbd_label, read_sbd_label)
    } else {
        return Ok(Err(SkippedFile::new(
            &sbd_label,
            format!("no label: neither this nor {} exists", voc_label.display()),
        )));
    };
    let inputs = match describe_input(source) {
        Ok(inputs) => inputs,
        Err(e) => return Ok(Err(SkippedFile::new(source, e.to_string()))),
    };
    let make = || {
        let label = read(source).map_err(|reason| SkippedFile::new(source, reason))?;
        if (label.height, label.width) != size {
            return Err(SkippedFile::new(
                source,
                format!(
                    "label is {}x{} but the image {} is {}x{} (width x height)",
                    label.width,
                    label.height,
                    image.display(),
                    size.1,
                    size.0
                ),
            ));
        }
        check_label_values(&label, CLASSES).map_err(|reason| SkippedFile::new(source, reason))?;
        Ok(label)
    };
    let target = options
        .out
        .join("SegmentationClassAug")
        .join(format!("{id}.png"));
    let (histogram, label) = match place_label(&target, Some(size), CLASSES, record, &inputs, make)?
    {
        Ok(done) => done,
        Err(skipped) => return Ok(Err(skipped)),
    };
    let image_target = options.out.join("JPEGImages").join(format!("{id}.jpg"));
    let image_placed = place_image(&image, &image_target, options.images)?;
    Ok(Ok(ItemOutcome {
        histogram,
        label,
        image_placed,
    }))
}

/// Prepares PASCAL-5i under `options.out` and writes both lists to `options.lists`.
pub fn prepare_pascal(options: &PascalOptions) -> Result<PrepareSummary, PrepareError> {
    let voc_fix = "--voc must be the VOC2012 folder of VOCtrainval_11-May-2012.tar \
                   (VOCdevkit/VOC2012, holding JPEGImages/, SegmentationClass/, ImageSets/)";
    let sbd_fix = "--sbd must be the dataset folder of SBD's benchmark.tgz \
                   (benchmark_RELEASE/dataset, holding cls/)";
    require_dir(&options.voc.join("JPEGImages"), "VOC image folder", voc_fix)?;
    require_dir(
        &options.voc.join("SegmentationClass"),
        "VOC label folder",
        voc_fix,
    )?;
    require_dir(&options.sbd.join("cls"), "SBD label folder", sbd_fix)?;
    let sets = options.voc.join("ImageSets/Segmentation");
    let (train_path, val_path) = (sets.join("train.txt"), sets.join("val.txt"));
    require_file(&train_path, "VOC train id list", voc_fix)?;
    require_file(&val_path, "VOC val id list", voc_fix)?;
    let sbd_list = options
        .sbd_list
        .clone()
        .unwrap_or_else(|| options.sbd.join("train_noval.txt"));
    require_file(
        &sbd_list,
        "SBD training id list",
        &format!(
            "download {SBD_TRAIN_NOVAL_URL} into {} (PFENet's 5953-image training list is built \
             from it), or name an SBD id list with --sbd-list",
            options.sbd.display()
        ),
    )?;
    let (voc_train, voc_val) = (read_ids(&train_path)?, read_ids(&val_path)?);
    let sbd_ids = read_ids(&sbd_list)?;
    let (train_ids, removed) = training_ids(&sbd_ids, &voc_train, &voc_val);

    let mut summary = PrepareSummary {
        data_root: options.out.clone(),
        ..PrepareSummary::default()
    };
    summary.notes.push(format!(
        "training list: {} SBD ids ({}) then {} VOC train ids, repeats dropped{}: {} images \
         (PFENet's list: 5953); val list: VOC val, {} images (PFENet's: 1449)",
        sbd_ids.len(),
        sbd_list.display(),
        voc_train.len(),
        if removed > 0 {
            format!(", {removed} VOC val id(s) removed")
        } else {
            String::new()
        },
        train_ids.len(),
        voc_val.len()
    ));
    let (_lock, record) = claim_output(&options.out)?;
    let result = write_outputs(options, &record, &train_ids, &voc_val, &mut summary);
    finish(summary, result)
}

/// Labels and images of the training then the validation ids, and the two lists.
fn write_outputs(
    options: &PascalOptions,
    record: &LabelRecord,
    train_ids: &[String],
    voc_val: &[String],
    summary: &mut PrepareSummary,
) -> Result<(), PrepareError> {
    create_dir(&options.out.join("JPEGImages"))?;
    create_dir(&options.out.join("SegmentationClassAug"))?;
    let all_ids: Vec<&String> = train_ids.iter().chain(voc_val).collect();
    let histograms = run_items(&all_ids, options.threads, "pascal", summary, |id| {
        prepare_id(id, options, record)
    })?;
    let (train_done, val_done) = histograms.split_at(train_ids.len());
    for (ids, done, name) in [
        (train_ids, train_done, TRAIN_LIST),
        (voc_val, val_done, VAL_LIST),
    ] {
        let entries: Vec<(String, String, [u32; 256])> = ids
            .iter()
            .zip(done)
            .filter_map(|(id, histogram)| {
                histogram.map(|h| {
                    (
                        format!("JPEGImages/{id}.jpg"),
                        format!("SegmentationClassAug/{id}.png"),
                        h,
                    )
                })
            })
            .collect();
        write_list_of(&options.lists.join(name), &entries, CLASSES, summary)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn palette_pngs_are_read_as_indices_at_any_bit_depth() {
        let dir = std::env::temp_dir().join(format!("svf-voc-label-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let indices: Vec<u8> = vec![0, 1, 2, 3, 15, 4, 9, 0, 7, 7];
        for (depth, bits) in [(png::BitDepth::Four, 4), (png::BitDepth::Eight, 8)] {
            let path = dir.join(format!("{bits}.png"));
            let mut encoder = png::Encoder::new(std::fs::File::create(&path).unwrap(), 5, 2);
            encoder.set_color(png::ColorType::Indexed);
            encoder.set_depth(depth);
            encoder.set_palette(vec![9u8; 3 << bits]);
            let packed: Vec<u8> = if bits == 4 {
                // Rows of 5 pixels: 3 bytes each, high nibble first.
                indices
                    .chunks(5)
                    .flat_map(|row| {
                        let mut row = row.to_vec();
                        row.push(0);
                        row.chunks(2).map(|p| p[0] << 4 | p[1]).collect::<Vec<_>>()
                    })
                    .collect()
            } else {
                indices.clone()
            };
            let mut writer = encoder.write_header().unwrap();
            writer.write_image_data(&packed).unwrap();
            drop(writer);
            let label = read_voc_label(&path).unwrap();
            assert_eq!((label.height, label.width), (2, 5));
            assert_eq!(label.data, indices, "{bits}-bit");
        }
        let rgb = dir.join("rgb.png");
        image::RgbImage::new(2, 2).save(&rgb).unwrap();
        assert!(read_voc_label(&rgb).unwrap_err().contains("not a palette"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn training_ids_follow_pfenets_merge_and_exclude_val() {
        let sbd = ids(&["a", "b", "c", "v1"]);
        let train = ids(&["b", "d", "a", "e"]);
        let val = ids(&["v1", "v2"]);
        let (merged, removed) = training_ids(&sbd, &train, &val);
        assert_eq!(merged, ids(&["a", "b", "c", "d", "e"]));
        assert_eq!(removed, 1);
    }
}
