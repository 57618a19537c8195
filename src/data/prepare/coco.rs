//! COCO-20i from COCO 2014: one class-index PNG per image under `annotations/{train,val}2014/`, and
//! the two lists of the shipped COCO configs.
//!
//! **Classes.** The 80 categories in ascending COCO id order become 1..=80 (COCO ids run to 90 with
//! gaps), background 0: the order PFENet's and BAM's COCO-20i class splits assume.
//!
//! **Masks.** Polygons are rasterised and RLEs decoded exactly as pycocotools' `annToMask` does
//! ([`super::rle`]). Objects are painted in the order of the annotation file, so where two overlap
//! the later one wins. PFENet says only that its COCO labels were made "by the default scripts
//! provided by COCO" and does not publish them; the usual such script is a loop over
//! `coco.loadAnns(coco.getAnnIds(imgIds=id))` assigning each `annToMask` to its class in turn,
//! which is exactly this rule (painting large objects first would keep small ones visible, but
//! would give labels that differ from the reference's wherever objects overlap). Crowd regions
//! (`iscrowd: 1`, one RLE over a group of objects) get their class by default, as that loop does;
//! `--crowd ignore` makes them 255 instead, since a crowd mask is coarse.
//!
//! **Lists.** `train_data_list.txt` and `val_data_list.txt` hold the images with at least one
//! annotation, in image id order: the images of PFENet's lists (82081 train and 40137 val); the
//! images without any (702 and 367) are left out and counted in the summary. (The published lists
//! of PFENet's successors hold the same images in another order, and differ among themselves in
//! the label folder's name; the order only changes which episodes a seed draws.)
//!
//! **Memory.** Each annotation file is read whole and deserialised into typed records (polygons as
//! `f64`): about 1.5 GB at the peak for `instances_train2014.json` (450 MB), freed before the
//! validation file is read.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::label_record::{describe_input, LabelRecord};
use super::rle::Rle;
use super::{
    check_image, claim_output, create_dir, finish, place_image, place_label, require_dir,
    require_file, run_items, write_list_of, ImageMode, ItemOutcome, PrepareError, PrepareSummary,
    SkippedFile,
};
use crate::data::raster::LabelMap;
use crate::data::IGNORE_LABEL;

/// COCO object classes (labels 1..=80).
pub const CLASSES: usize = 80;
/// File names of the lists, as the shipped COCO configs name them.
pub const TRAIN_LIST: &str = "train_data_list.txt";
pub const VAL_LIST: &str = "val_data_list.txt";

/// What crowd regions become.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CrowdLabel {
    /// Their category's class, as the usual pycocotools label loop gives them.
    #[default]
    Class,
    /// 255, ignored by the loss and the metrics.
    Ignore,
}

impl CrowdLabel {
    /// The value of `--crowd` that asks for it.
    pub fn option_value(self) -> &'static str {
        match self {
            CrowdLabel::Class => "class",
            CrowdLabel::Ignore => "ignore",
        }
    }
}

/// Inputs and outputs of [`prepare_coco`].
#[derive(Debug, Clone)]
pub struct CocoOptions {
    /// The COCO 2014 folder: `train2014/`, `val2014/`, `annotations/instances_{train,val}2014.json`.
    pub coco: PathBuf,
    /// The data root to write (`annotations/{train,val}2014/`, and the images unless `out` is `coco`).
    pub out: PathBuf,
    /// Folder of the two list files.
    pub lists: PathBuf,
    pub images: ImageMode,
    pub crowd: CrowdLabel,
    pub threads: usize,
}

#[derive(Deserialize)]
struct AnnotationFile {
    images: Vec<ImageRecord>,
    annotations: Vec<AnnotationRecord>,
    categories: Vec<CategoryRecord>,
}

#[derive(Deserialize)]
struct ImageRecord {
    id: u64,
    file_name: String,
    height: usize,
    width: usize,
}

#[derive(Deserialize)]
struct CategoryRecord {
    id: u64,
}

#[derive(Deserialize)]
struct AnnotationRecord {
    #[serde(default)]
    id: u64,
    image_id: u64,
    category_id: u64,
    #[serde(default)]
    iscrowd: u8,
    segmentation: Segmentation,
}

/// The three forms of `segmentation`; anything else is kept as `Malformed` so that one bad
/// annotation skips its image instead of failing the whole file.
#[derive(Deserialize)]
#[serde(untagged)]
enum Segmentation {
    Polygons(Vec<Vec<f64>>),
    Rle { counts: RleCounts, size: [usize; 2] },
    Malformed(serde::de::IgnoredAny),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RleCounts {
    Uncompressed(Vec<u32>),
    Compressed(String),
}

/// One annotation ready to paint.
struct Object {
    id: u64,
    class: u8,
    crowd: bool,
    segmentation: Segmentation,
}

/// One image of a split with its objects in file order; `problem` is set when one of them cannot
/// be used (the image is then skipped, not labelled without it).
struct ImageWork {
    record: ImageRecord,
    objects: Vec<Object>,
    problem: Option<String>,
}

/// The mask of one annotation.
fn object_mask(
    segmentation: &Segmentation,
    height: usize,
    width: usize,
) -> Result<Vec<Rle>, String> {
    match segmentation {
        Segmentation::Polygons(polygons) => Rle::from_polygons(polygons, height, width),
        Segmentation::Rle { counts, size } => {
            if *size != [height, width] {
                return Err(format!(
                    "RLE size {size:?} (h, w) differs from the image's [{height}, {width}]"
                ));
            }
            match counts {
                RleCounts::Uncompressed(counts) => {
                    Ok(vec![Rle::from_counts(counts.clone(), height, width)?])
                }
                RleCounts::Compressed(text) => Ok(vec![Rle::from_compressed(text, height, width)?]),
            }
        }
        Segmentation::Malformed(_) => {
            Err("segmentation is neither a list of polygons nor an RLE {counts, size}".to_string())
        }
    }
}

/// The label of one image: objects painted in order, the later on top.
fn render_label(work: &ImageWork, crowd: CrowdLabel) -> Result<LabelMap, String> {
    let (height, width) = (work.record.height, work.record.width);
    let mut label = LabelMap::filled(height, width, 0);
    for object in &work.objects {
        let value = if object.crowd && crowd == CrowdLabel::Ignore {
            IGNORE_LABEL
        } else {
            object.class
        };
        let masks = object_mask(&object.segmentation, height, width)
            .map_err(|e| format!("annotation {}: {e}", object.id))?;
        for mask in masks {
            mask.for_each_pixel(|y, x| label.data[y * width + x] = value);
        }
    }
    Ok(label)
}

fn read_annotation_file(path: &Path) -> Result<AnnotationFile, PrepareError> {
    let bad = |message: String| PrepareError::BadInput {
        path: path.to_path_buf(),
        message,
    };
    let bytes = std::fs::read(path).map_err(|e| bad(format!("cannot read: {e}")))?;
    serde_json::from_slice(&bytes).map_err(|e| {
        bad(format!(
            "not a COCO instances file ({e}); re-download annotations_trainval2014.zip if it is \
             truncated"
        ))
    })
}

/// Category id → class 1..=N in ascending id order.
fn class_map(file: &AnnotationFile, path: &Path) -> Result<HashMap<u64, u8>, PrepareError> {
    let mut ids: Vec<u64> = file.categories.iter().map(|c| c.id).collect();
    ids.sort_unstable();
    ids.dedup();
    if ids.len() != CLASSES {
        return Err(PrepareError::BadInput {
            path: path.to_path_buf(),
            message: format!(
                "lists {} categories, COCO 2014 has {CLASSES}; use instances_*2014.json",
                ids.len()
            ),
        });
    }
    Ok(ids
        .into_iter()
        .enumerate()
        .map(|(i, id)| (id, i as u8 + 1))
        .collect())
}

/// Groups the annotations by image (file order kept) and checks their categories.
fn image_work(
    file: AnnotationFile,
    classes: &HashMap<u64, u8>,
    json: &Path,
    summary: &mut PrepareSummary,
) -> Vec<ImageWork> {
    let mut works: Vec<ImageWork> = file
        .images
        .into_iter()
        .map(|record| ImageWork {
            record,
            objects: Vec::new(),
            problem: None,
        })
        .collect();
    works.sort_by_key(|w| w.record.id);
    let position: HashMap<u64, usize> = works
        .iter()
        .enumerate()
        .map(|(i, w)| (w.record.id, i))
        .collect();
    let mut orphans = 0;
    for annotation in file.annotations {
        let Some(&i) = position.get(&annotation.image_id) else {
            orphans += 1;
            if orphans <= 20 {
                summary.skipped.push(SkippedFile::new(
                    json,
                    format!(
                        "annotation {} refers to image {}, which the file does not list",
                        annotation.id, annotation.image_id
                    ),
                ));
            }
            continue;
        };
        let Some(&class) = classes.get(&annotation.category_id) else {
            works[i].problem.get_or_insert(format!(
                "annotation {} has category {}, which the file's categories do not list",
                annotation.id, annotation.category_id
            ));
            continue;
        };
        works[i].objects.push(Object {
            id: annotation.id,
            class,
            crowd: annotation.iscrowd != 0,
            segmentation: annotation.segmentation,
        });
    }
    if orphans > 20 {
        summary.skipped.push(SkippedFile::new(
            json,
            format!("… and {} more annotations of unlisted images", orphans - 20),
        ));
    }
    works
}

/// What a split's labels are made from (see [`super::label_record`]): its annotation file, and for
/// an image with crowd regions also the `--crowd` choice.
struct SplitInputs {
    plain: String,
    with_crowd: String,
}

impl SplitInputs {
    fn of(json: &Path, crowd: CrowdLabel) -> Result<SplitInputs, PrepareError> {
        let plain = describe_input(json).map_err(|e| PrepareError::BadInput {
            path: json.to_path_buf(),
            message: format!("cannot read: {e}"),
        })?;
        let with_crowd = format!("{plain}, --crowd {}", crowd.option_value());
        Ok(SplitInputs { plain, with_crowd })
    }

    fn of_image(&self, work: &ImageWork) -> &str {
        if work.objects.iter().any(|o| o.crowd) {
            &self.with_crowd
        } else {
            &self.plain
        }
    }
}

/// Label (made from `inputs`) and image of one image of split `split_dir`, written (or kept) under
/// `out`.
fn prepare_image(
    work: &ImageWork,
    split_dir: &str,
    options: &CocoOptions,
    json: &Path,
    inputs: &str,
    labels: &LabelRecord,
) -> Result<Result<ItemOutcome, SkippedFile>, PrepareError> {
    let record = &work.record;
    let image = options.coco.join(split_dir).join(&record.file_name);
    if let Some(problem) = &work.problem {
        return Ok(Err(SkippedFile::new(
            json,
            format!("image {} ({}): {problem}", record.id, record.file_name),
        )));
    }
    let size = (record.height, record.width);
    if let Err(skipped) = check_image(&image, size) {
        return Ok(Err(skipped));
    }
    let target = label_path(&options.out, split_dir, &record.file_name);
    let make = || {
        render_label(work, options.crowd).map_err(|reason| {
            SkippedFile::new(
                json,
                format!("image {} ({}): {reason}", record.id, record.file_name),
            )
        })
    };
    let (histogram, label) = match place_label(&target, Some(size), CLASSES, labels, inputs, make)?
    {
        Ok(done) => done,
        Err(skipped) => return Ok(Err(skipped)),
    };
    let image_target = options.out.join(split_dir).join(&record.file_name);
    let image_placed = place_image(&image, &image_target, options.images)?;
    Ok(Ok(ItemOutcome {
        histogram,
        label,
        image_placed,
    }))
}

fn label_name(file_name: &str) -> String {
    let stem = Path::new(file_name).file_stem().map_or_else(
        || file_name.to_string(),
        |s| s.to_string_lossy().into_owned(),
    );
    format!("{stem}.png")
}

fn label_path(out: &Path, split_dir: &str, file_name: &str) -> PathBuf {
    out.join("annotations")
        .join(split_dir)
        .join(label_name(file_name))
}

/// Prepares COCO-20i labels under `options.out` and writes both lists to `options.lists`.
pub fn prepare_coco(options: &CocoOptions) -> Result<PrepareSummary, PrepareError> {
    let fix = "--coco must hold train2014/ and val2014/ (train2014.zip, val2014.zip) and \
               annotations/instances_{train,val}2014.json (annotations_trainval2014.zip)";
    let splits = [("train2014", TRAIN_LIST), ("val2014", VAL_LIST)];
    for (split_dir, _) in splits {
        require_dir(&options.coco.join(split_dir), "COCO image folder", fix)?;
        let json = options
            .coco
            .join("annotations")
            .join(format!("instances_{split_dir}.json"));
        require_file(&json, "COCO annotation file", fix)?;
    }
    let (_lock, record) = claim_output(&options.out)?;
    let mut summary = PrepareSummary {
        data_root: options.out.clone(),
        ..PrepareSummary::default()
    };
    let result = write_splits(options, &record, &splits, &mut summary);
    finish(summary, result)
}

/// Labels, images and list of each split in turn.
fn write_splits(
    options: &CocoOptions,
    record: &LabelRecord,
    splits: &[(&str, &str)],
    summary: &mut PrepareSummary,
) -> Result<(), PrepareError> {
    let mut first_classes: Option<HashMap<u64, u8>> = None;
    for &(split_dir, list_name) in splits {
        let json = options
            .coco
            .join("annotations")
            .join(format!("instances_{split_dir}.json"));
        let inputs = SplitInputs::of(&json, options.crowd)?;
        tracing::info!("reading {}", json.display());
        let file = read_annotation_file(&json)?;
        let classes = class_map(&file, &json)?;
        if first_classes
            .as_ref()
            .is_some_and(|first| *first != classes)
        {
            return Err(PrepareError::BadInput {
                path: json,
                message: "its categories differ from the training file's: the class indices \
                          would not agree"
                    .into(),
            });
        }
        let works = image_work(file, &classes, &json, summary);
        first_classes.get_or_insert(classes);
        let (annotated, empty): (Vec<ImageWork>, Vec<ImageWork>) = works
            .into_iter()
            .partition(|w| !w.objects.is_empty() || w.problem.is_some());
        summary.notes.push(format!(
            "{split_dir}: {} images with annotations; {} without any left out of the list, as in \
             PFENet's lists",
            annotated.len(),
            empty.len()
        ));
        create_dir(&options.out.join("annotations").join(split_dir))?;
        create_dir(&options.out.join(split_dir))?;
        let histograms = run_items(&annotated, options.threads, split_dir, summary, |w| {
            prepare_image(w, split_dir, options, &json, inputs.of_image(w), record)
        })?;
        let entries: Vec<(String, String, [u32; 256])> = annotated
            .iter()
            .zip(histograms)
            .filter_map(|(work, histogram)| {
                let name = &work.record.file_name;
                histogram.map(|h| {
                    (
                        format!("{split_dir}/{name}"),
                        format!("annotations/{split_dir}/{}", label_name(name)),
                        h,
                    )
                })
            })
            .collect();
        write_list_of(&options.lists.join(list_name), &entries, CLASSES, summary)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn work(objects: Vec<Object>) -> ImageWork {
        ImageWork {
            record: ImageRecord {
                id: 1,
                file_name: "a.jpg".into(),
                height: 4,
                width: 6,
            },
            objects,
            problem: None,
        }
    }

    fn square(id: u64, class: u8, crowd: bool, x0: f64, x1: f64) -> Object {
        Object {
            id,
            class,
            crowd,
            segmentation: Segmentation::Polygons(vec![vec![x0, 0.0, x1, 0.0, x1, 4.0, x0, 4.0]]),
        }
    }

    #[test]
    fn later_objects_win_and_crowd_follows_the_option() {
        let image = work(vec![
            square(1, 3, false, 0.0, 4.0),
            square(2, 7, true, 2.0, 6.0),
        ]);
        let row = |crowd| render_label(&image, crowd).unwrap().data[..6].to_vec();
        assert_eq!(row(CrowdLabel::Class), [3, 3, 7, 7, 7, 7]);
        assert_eq!(row(CrowdLabel::Ignore), [3, 3, 255, 255, 255, 255]);
    }

    #[test]
    fn bad_rle_sizes_name_the_annotation() {
        let image = work(vec![Object {
            id: 42,
            class: 1,
            crowd: true,
            segmentation: Segmentation::Rle {
                counts: RleCounts::Uncompressed(vec![24]),
                size: [6, 4],
            },
        }]);
        let message = render_label(&image, CrowdLabel::Class).unwrap_err();
        assert!(
            message.contains("annotation 42") && message.contains("[6, 4]"),
            "{message}"
        );
    }

    #[test]
    fn segmentation_forms_deserialise() {
        let forms: Vec<Segmentation> = serde_json::from_str(
            r#"[[[1,2,3,4,5,6]], {"counts":[1,2],"size":[1,3]}, {"counts":"a1","size":[1,3]}, 7]"#,
        )
        .unwrap();
        assert!(matches!(forms[0], Segmentation::Polygons(_)));
        assert!(matches!(
            forms[1],
            Segmentation::Rle {
                counts: RleCounts::Uncompressed(_),
                ..
            }
        ));
        assert!(matches!(
            forms[2],
            Segmentation::Rle {
                counts: RleCounts::Compressed(_),
                ..
            }
        ));
        assert!(matches!(forms[3], Segmentation::Malformed(_)));
    }
}
