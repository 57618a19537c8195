//! The class index of a list: which classes each label map holds and how many pixels of each.
//!
//! Building it reads every label (minutes on COCO), so it is cached as JSON in
//! `<data_root>/.svf-index/` or, when the dataset folder is read-only, in `<save_path>/.svf-index/`,
//! one file per list (`<list name>-<hash of its path>.json`). Each record is keyed by the size and
//! modification time of its image and label: a changed list simply looks up other records, and a
//! changed file is read again; only stale records are rebuilt.
//!
//! The cache holds only facts about the files (classes and pixel counts per label), never a
//! derived list: which images a fold keeps (`train_filter`, the 2048-pixel rule) is computed from
//! the index on every start, so changing a rule or a fold cannot reuse a list built for another.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};

use super::lists::{read_list_file, ClassClaim, ListEntry};
use super::raster::{read_image_size, read_label};
use super::DataError;

/// An (image, class) pair is eligible for a class's support list when the class covers at least
/// this many pixels: Shaban et al.'s "more than 2 cells at stride 32", i.e. 2·32·32.
pub const MIN_CLASS_PIXELS: u32 = 2 * 32 * 32;

const CACHE_FORMAT: u32 = 1;
const CACHE_DIR: &str = ".svf-index";

/// Size and modification time of a file: a cheap change detector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStamp {
    pub len: u64,
    pub modified_ns: u128,
}

impl FileStamp {
    fn of(path: &Path) -> Result<FileStamp, DataError> {
        let meta = std::fs::metadata(path).map_err(|e| DataError::Unreadable {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let modified_ns = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        Ok(FileStamp {
            len: meta.len(),
            modified_ns,
        })
    }
}

/// What the index knows about one list entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IndexedItem {
    pub image: String,
    pub label: String,
    pub image_stamp: FileStamp,
    pub label_stamp: FileStamp,
    /// Pixels of each class present (values 1..=254; background 0 and ignore 255 left out).
    pub class_pixels: Vec<(u8, u32)>,
}

impl IndexedItem {
    /// Pixels of `class` in the label (0 when absent).
    pub fn pixels(&self, class: usize) -> u32 {
        self.class_pixels
            .iter()
            .find(|&&(c, _)| c as usize == class)
            .map_or(0, |&(_, n)| n)
    }

    /// Whether the label holds `class` with at least [`MIN_CLASS_PIXELS`] pixels.
    pub fn is_eligible(&self, class: usize) -> bool {
        self.pixels(class) >= MIN_CLASS_PIXELS
    }
}

/// The error of a `sub_class_file_list` claim that its label refutes, given the `pixels` of the
/// claimed class there: BAM lists an image under a class only where the class covers at least
/// [`MIN_CLASS_PIXELS`] pixels, so anything else means the list belongs to other labels (another
/// dataset version, fold or rule).
pub(crate) fn refuted_claim(
    claim: &ClassClaim,
    image: &str,
    label: &str,
    pixels: u32,
    list: &Path,
) -> Option<DataError> {
    (pixels < MIN_CLASS_PIXELS).then(|| DataError::ListLine {
        path: list.to_path_buf(),
        line: claim.line,
        message: format!(
            "class {} lists ({image}, {label}), but that label has {pixels} pixels of class {}, fewer than the {MIN_CLASS_PIXELS} a class's list requires; the list does not belong to these labels (regenerate it with `svf-data lists`)",
            claim.class, claim.class
        ),
    })
}

/// Reads one entry: label histogram, and the image's header to check that the sizes agree.
fn scan(entry: &ListEntry, data_root: &Path) -> Result<IndexedItem, DataError> {
    let image_path = entry.image_path(data_root);
    let label_path = entry.label_path(data_root);
    let image_stamp = FileStamp::of(&image_path)?;
    let label_stamp = FileStamp::of(&label_path)?;
    let label = read_label(&label_path)?;
    let image_size = read_image_size(&image_path)?;
    if image_size != (label.height, label.width) {
        return Err(DataError::SizeMismatch {
            image: image_path,
            label: label_path,
            image_size,
            label_size: (label.height, label.width),
        });
    }
    Ok(IndexedItem {
        image: entry.image.clone(),
        label: entry.label.clone(),
        image_stamp,
        label_stamp,
        class_pixels: class_pixels(&label.histogram()),
    })
}

/// The (class, pixels) pairs of a label histogram, without background and ignore.
pub fn class_pixels(histogram: &[u32; 256]) -> Vec<(u8, u32)> {
    (1..255u8)
        .filter(|&c| histogram[c as usize] > 0)
        .map(|c| (c, histogram[c as usize]))
        .collect()
}

#[derive(Serialize, Deserialize)]
struct CacheFile {
    format: u32,
    list: PathBuf,
    items: Vec<IndexedItem>,
}

/// FNV-1a, to name a list's cache file after its path.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

fn cache_name(list: &Path) -> String {
    let stem = list
        .file_stem()
        .map_or("list".into(), |s| s.to_string_lossy().into_owned());
    format!(
        "{stem}-{:016x}.json",
        fnv1a(list.to_string_lossy().as_bytes())
    )
}

/// The class index of one list file.
#[derive(Debug, Clone)]
pub struct ClassIndex {
    /// One record per list entry, in list order.
    pub items: Vec<IndexedItem>,
    /// A `sub_class_file_list`'s classes with their lines (empty for the line format).
    pub listed_classes: Vec<(usize, usize)>,
}

impl ClassIndex {
    /// Indexes `list` (entries relative to `data_root`) with `threads` readers, reusing the cache of
    /// the first of `cache_dirs` that has one and writing an updated cache to the first writable.
    pub fn build(
        data_root: &Path,
        list: &Path,
        list_key: &'static str,
        cache_dirs: &[PathBuf],
        threads: usize,
    ) -> Result<ClassIndex, DataError> {
        let file = read_list_file(list, list_key, data_root)?;
        let entries = file.entries;
        let list_id = std::fs::canonicalize(list).unwrap_or_else(|_| list.to_path_buf());
        let name = cache_name(&list_id);
        let cached: HashMap<(String, String), IndexedItem> = cache_dirs
            .iter()
            .find_map(|dir| {
                let text = std::fs::read_to_string(dir.join(CACHE_DIR).join(&name)).ok()?;
                let file: CacheFile = serde_json::from_str(&text).ok()?;
                (file.format == CACHE_FORMAT && file.list == list_id).then_some(file.items)
            })
            .unwrap_or_default()
            .into_iter()
            .map(|item| ((item.image.clone(), item.label.clone()), item))
            .collect();

        let fresh = |entry: &ListEntry| -> Result<Option<IndexedItem>, DataError> {
            let Some(item) = cached.get(&(entry.image.clone(), entry.label.clone())) else {
                return Ok(None);
            };
            let same = FileStamp::of(&entry.image_path(data_root))? == item.image_stamp
                && FileStamp::of(&entry.label_path(data_root))? == item.label_stamp;
            Ok(same.then(|| item.clone()))
        };
        let mut items: Vec<Option<IndexedItem>> =
            entries.iter().map(fresh).collect::<Result<_, _>>()?;
        let stale: Vec<usize> = (0..items.len()).filter(|&i| items[i].is_none()).collect();
        if stale.is_empty() {
            let index = ClassIndex {
                items: items.into_iter().flatten().collect(),
                listed_classes: file.classes,
            };
            index.check_claims(&file.claims, list)?;
            return Ok(index);
        }
        tracing::info!(
            list = %list.display(),
            "indexing {} of {} labels (classes and pixel counts)",
            stale.len(),
            entries.len()
        );
        let scanned = map_parallel(&stale, threads, "index", |&i| scan(&entries[i], data_root))
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
        for (i, item) in stale.into_iter().zip(scanned) {
            items[i] = Some(item);
        }
        let index = ClassIndex {
            items: items.into_iter().flatten().collect(),
            listed_classes: file.classes,
        };
        index.write_cache(&list_id, &name, cache_dirs);
        index.check_claims(&file.claims, list)?;
        Ok(index)
    }

    /// Checks a `sub_class_file_list`'s claims (see [`refuted_claim`]); the first refuted one is
    /// the error.
    fn check_claims(&self, claims: &[ClassClaim], list: &Path) -> Result<(), DataError> {
        claims
            .iter()
            .find_map(|claim| {
                let item = &self.items[claim.entry];
                refuted_claim(
                    claim,
                    &item.image,
                    &item.label,
                    item.pixels(claim.class),
                    list,
                )
            })
            .map_or(Ok(()), Err)
    }

    fn write_cache(&self, list_id: &Path, name: &str, cache_dirs: &[PathBuf]) {
        let file = CacheFile {
            format: CACHE_FORMAT,
            list: list_id.to_path_buf(),
            items: self.items.clone(),
        };
        let text = serde_json::to_string(&file).expect("the index always serialises");
        for dir in cache_dirs {
            let dir = dir.join(CACHE_DIR);
            let path = dir.join(name);
            let tmp = dir.join(format!("{name}.tmp{}", std::process::id()));
            let written = std::fs::create_dir_all(&dir)
                .and_then(|_| std::fs::write(&tmp, &text))
                .and_then(|_| std::fs::rename(&tmp, &path));
            match written {
                Ok(()) => {
                    tracing::debug!(path = %path.display(), "class index cached");
                    return;
                }
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    tracing::debug!(path = %path.display(), "cannot cache the class index here: {e}");
                }
            }
        }
        tracing::warn!("could not write the class index cache in any of {cache_dirs:?}; it will be rebuilt next time");
    }
}

/// `f` over `inputs` on `threads` threads, results in input order; a progress bar named `what`
/// shows when the work is long. Reading many files is I/O and decode bound, so plain threads
/// pulling from a shared counter are enough.
pub(crate) fn map_parallel<T: Sync, R: Send>(
    inputs: &[T],
    threads: usize,
    what: &str,
    f: impl Fn(&T) -> R + Sync,
) -> Vec<R> {
    let next = AtomicUsize::new(0);
    let bar =
        (inputs.len() >= 1000).then(|| crate::logging::progress_bar(inputs.len() as u64, what));
    let mut results: Vec<(usize, R)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads.clamp(1, inputs.len().max(1)))
            .map(|_| {
                scope.spawn(|| {
                    let mut out = Vec::new();
                    loop {
                        let k = next.fetch_add(1, Ordering::Relaxed);
                        let Some(input) = inputs.get(k) else { break };
                        out.push((k, f(input)));
                        if let Some(bar) = &bar {
                            bar.inc(1);
                        }
                    }
                    out
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("a file reader thread panicked"))
            .collect()
    });
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    results.sort_by_key(|(k, _)| *k);
    results.into_iter().map(|(_, r)| r).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(class_pixels: Vec<(u8, u32)>) -> IndexedItem {
        let stamp = FileStamp {
            len: 0,
            modified_ns: 0,
        };
        IndexedItem {
            image: "i.jpg".into(),
            label: "l.png".into(),
            image_stamp: stamp,
            label_stamp: stamp,
            class_pixels,
        }
    }

    #[test]
    fn eligibility_is_exact_at_2048_pixels() {
        let record = item(vec![(3, 2047), (4, 2048), (5, 1)]);
        assert!(!record.is_eligible(3));
        assert!(record.is_eligible(4));
        assert!(!record.is_eligible(5));
        assert!(!record.is_eligible(6));
        assert_eq!(record.pixels(5), 1);
    }

    #[test]
    fn class_pixels_skip_background_and_ignore() {
        let mut histogram = [0u32; 256];
        histogram[0] = 10;
        histogram[7] = 3;
        histogram[255] = 4;
        assert_eq!(class_pixels(&histogram), vec![(7, 3)]);
    }
}
