//! Dataset validation before hours of training (`svf-data check`): every file of both lists is
//! decoded in full, and each problem becomes one line naming its file.

use std::path::{Path, PathBuf};

use super::classes::FoldClasses;
use super::dataset::check_listed_classes;
use super::index::{map_parallel, refuted_claim, MIN_CLASS_PIXELS};
use super::lists::{read_list_lenient, ListEntry};
use super::raster::{read_image, read_label};
use super::{DataError, Split};
use crate::config::Config;

/// Images of one class in one list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassCount {
    pub class: usize,
    /// Images where the class covers at least [`MIN_CLASS_PIXELS`] pixels (its support list).
    pub eligible: usize,
    /// Images where the class appears at all.
    pub present: usize,
}

/// What one list holds for its split's classes.
#[derive(Debug, Clone)]
pub struct ListReport {
    pub split: Split,
    pub list: PathBuf,
    pub images: usize,
    pub classes: Vec<ClassCount>,
}

/// The outcome of [`check_dataset`].
#[derive(Debug, Clone, Default)]
pub struct CheckReport {
    pub lists: Vec<ListReport>,
    /// One line per problem, naming the file.
    pub problems: Vec<String>,
}

impl CheckReport {
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Refuted `sub_class_file_list` claims named one per line; the rest are counted.
const CLAIMS_SHOWN: usize = 10;

/// Checks one list entry; returns the label's histogram when the label could be read.
fn check_entry(
    entry: &ListEntry,
    data_root: &Path,
    classes: usize,
) -> (Option<[u32; 256]>, Vec<String>) {
    let mut problems = Vec::new();
    let image_path = entry.image_path(data_root);
    let label_path = entry.label_path(data_root);
    for (what, path) in [("image", &image_path), ("label", &label_path)] {
        if !path.is_file() {
            problems.push(format!("missing {what} file {}", path.display()));
        }
    }
    if !problems.is_empty() {
        return (None, problems);
    }
    let image = read_image(&image_path)
        .map_err(|e| problems.push(e.to_string()))
        .ok();
    let label = read_label(&label_path)
        .map_err(|e| problems.push(e.to_string()))
        .ok();
    let Some(label) = label else {
        return (None, problems);
    };
    if let Some(image) = image {
        if (image.height, image.width) != (label.height, label.width) {
            let mismatch = DataError::SizeMismatch {
                image: image_path,
                label: label_path.clone(),
                image_size: (image.height, image.width),
                label_size: (label.height, label.width),
            };
            problems.push(mismatch.to_string());
        }
    }
    let histogram = label.histogram();
    let bad: Vec<usize> = (classes + 1..255).filter(|&v| histogram[v] > 0).collect();
    if !bad.is_empty() {
        problems.push(format!(
            "label {} holds values {bad:?} outside 0..={classes} and 255",
            label_path.display()
        ));
    }
    (Some(histogram), problems)
}

/// Checks both lists of `config`: malformed lines (the well-formed ones are still checked), a
/// `sub_class_file_list` of another fold or split or whose class claims its labels refute, missing, unreadable or truncated files,
/// image/label size mismatches, label values outside {0..classes, 255}, and classes of the fold
/// with fewer than `shot + 1` eligible images; counts each class's images for the fold.
pub fn check_dataset(config: &Config) -> CheckReport {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let classes = config.dataset_classes();
    let mut report = CheckReport::default();
    for (split, list, key) in [
        (Split::Train, &config.train_list, "train_list"),
        (Split::Val, &config.val_list, "val_list"),
    ] {
        let file = match read_list_lenient(list, key, &config.data_root) {
            Ok(file) => file,
            Err(e) => {
                report.problems.push(e.to_string());
                continue;
            }
        };
        report.problems.extend(
            file.malformed
                .iter()
                .map(|line| line.error(list).to_string()),
        );
        // Another fold's sub_class_file_list explains its classes' missing images by itself.
        let other_fold = check_listed_classes(config, split, list, &file.classes)
            .map_err(|e| report.problems.push(e.to_string()))
            .is_err();
        let split_classes = FoldClasses::of(config).of_split(split);
        let entries = file.entries;
        let checked = map_parallel(&entries, threads, "check", |e| {
            check_entry(e, &config.data_root, classes)
        });
        let mut counts: Vec<ClassCount> = split_classes
            .iter()
            .map(|&class| ClassCount {
                class,
                eligible: 0,
                present: 0,
            })
            .collect();
        let mut histograms = Vec::with_capacity(entries.len());
        for (histogram, problems) in checked {
            report.problems.extend(problems);
            if let Some(histogram) = histogram {
                for count in &mut counts {
                    let pixels = histogram[count.class];
                    count.present += usize::from(pixels > 0);
                    count.eligible += usize::from(pixels >= MIN_CLASS_PIXELS);
                }
            }
            histograms.push(histogram);
        }
        // A sub_class_file_list's claims, against the labels read (an unreadable label is a
        // problem of its own); a list of other labels would refute thousands, so a few are named.
        let mut refuted = file.claims.iter().filter_map(|claim| {
            let histogram = histograms[claim.entry]?;
            let entry = &entries[claim.entry];
            refuted_claim(
                claim,
                &entry.image,
                &entry.label,
                histogram.get(claim.class).copied().unwrap_or(0),
                list,
            )
        });
        report
            .problems
            .extend(refuted.by_ref().take(CLAIMS_SHOWN).map(|e| e.to_string()));
        let more = refuted.count();
        if more > 0 {
            report.problems.push(format!(
                "{}: {more} more class claims refuted by their labels",
                list.display()
            ));
        }
        for count in counts
            .iter()
            .filter(|c| !other_fold && c.eligible < config.shot + 1)
        {
            report.problems.push(format!(
                "class {} has {} eligible image(s) (at least {MIN_CLASS_PIXELS} pixels) in {}, but {} \
                 episodes with shot {} need {}",
                count.class,
                count.eligible,
                list.display(),
                split.name(),
                config.shot,
                config.shot + 1
            ));
        }
        report.lists.push(ListReport {
            split,
            list: list.clone(),
            images: entries.len(),
            classes: counts,
        });
    }
    report
}
