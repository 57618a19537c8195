//! `svf-data prepare`: turns the downloaded PASCAL VOC 2012 + SBD ([`pascal`]) or COCO 2014
//! ([`coco`]) into the layout the configs read: one 8-bit class-index PNG per image, the images
//! linked or copied beside them, and PFENet's list files.
//!
//! Shared by both: a run holds the output folder's [`LOCK_FILE`], so a second run on the same
//! folder is refused instead of clobbering the first one's files. Every output is written to
//! `<name>.partial` and renamed into place, so a killed run leaves only whole files, and a rerun
//! writes only what is missing or out of date: a label is kept when it decodes and the
//! [`label_record`] says it was made from the inputs and options that would make it now; an image
//! is kept when it is there, except a symbolic link under `--copy` (the download may be deleted
//! next) or one that dangles. Images are worked on in parallel with a progress bar. A bad input
//! file (missing, truncated, malformed, inconsistent) skips its image with a reason in the
//! [`PrepareSummary`]; the run goes on, and the image is left out of the lists, never given a wrong
//! label. An error that stops a run logs the summary of what it had done.

pub mod coco;
pub mod label_record;
pub mod mat5;
pub mod pascal;
pub mod rle;

use std::fmt;
use std::path::{Path, PathBuf};

use super::index::map_parallel;
use super::raster::{read_image_size, read_label, LabelMap};
use crate::dir_lock::{lock_dir, DirLock, DirLockError};
use label_record::{LabelRecord, Recorded, RECORD_FILE};

/// The file of an output folder that the `prepare` run writing into it holds locked (with its pid
/// inside).
pub const LOCK_FILE: &str = "svf-data-prepare.lock";

/// How the images reach `<out>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ImageMode {
    /// Symbolic links to the downloaded files (no extra disk space; keep the download).
    #[default]
    Link,
    /// Copies (the download can be deleted afterwards); replaces the links of an earlier run.
    Copy,
}

/// Why `prepare` could not run at all (a problem of one file only skips that file instead).
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error("cannot find {what} {path}; {fix}")]
    MissingInput {
        what: &'static str,
        path: PathBuf,
        fix: String,
    },
    #[error("{path}: {message}")]
    BadInput { path: PathBuf, message: String },
    #[error(
        "cannot write {path}: {source}; check the permissions and free space of the output folder"
    )]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "another svf-data prepare (pid {pid}) is writing into this output folder: it holds {lock}; \
         wait for it to finish, or give this run another --out"
    )]
    OutputInUse { lock: PathBuf, pid: String },
}

/// An input file that was left out, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedFile {
    pub path: PathBuf,
    pub reason: String,
}

impl SkippedFile {
    pub fn new(path: impl Into<PathBuf>, reason: impl Into<String>) -> SkippedFile {
        SkippedFile {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

/// A list file written, and what it holds.
#[derive(Debug, Clone)]
pub struct WrittenList {
    pub path: PathBuf,
    pub entries: usize,
    /// `images_per_class[c]`: labels of the list that hold class c (index 0 unused).
    pub images_per_class: Vec<usize>,
}

/// Skipped files listed one per line in the summary; a wrong input folder would otherwise print
/// one line per image.
const SKIPPED_SHOWN: usize = 100;

/// What a `prepare` run did.
#[derive(Debug, Clone, Default)]
pub struct PrepareSummary {
    pub data_root: PathBuf,
    pub lists: Vec<WrittenList>,
    pub labels_written: usize,
    /// Of the labels written: those that replaced a label made from other inputs or options.
    pub labels_outdated: usize,
    /// Of the labels written: those that replaced a label without a record of its inputs.
    pub labels_unrecorded: usize,
    /// Labels already there from an earlier run with the same inputs and options, left untouched.
    pub labels_kept: usize,
    pub images_placed: usize,
    pub images_kept: usize,
    pub skipped: Vec<SkippedFile>,
    /// Facts worth a line (rules applied, counts that differ from the published ones).
    pub notes: Vec<String>,
}

impl fmt::Display for PrepareSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "labels: {} written, {} already there; images: {} placed, {} already there",
            self.labels_written, self.labels_kept, self.images_placed, self.images_kept
        )?;
        if self.labels_outdated > 0 {
            writeln!(
                f,
                "labels: {} rewritten because their inputs or options changed since an earlier run",
                self.labels_outdated
            )?;
        }
        for list in &self.lists {
            writeln!(f, "{}: {} images", list.path.display(), list.entries)?;
            let per_class: Vec<String> = (1..list.images_per_class.len())
                .map(|c| format!("{c}:{}", list.images_per_class[c]))
                .collect();
            for chunk in per_class.chunks(10) {
                writeln!(f, "  images per class  {}", chunk.join("  "))?;
            }
        }
        for note in &self.notes {
            writeln!(f, "note: {note}")?;
        }
        if self.labels_unrecorded > 0 {
            writeln!(
                f,
                "note: {} label(s) already there had no record of what made them (made before \
                 svf-data kept {RECORD_FILE}, or changed since) and were rewritten once",
                self.labels_unrecorded
            )?;
        }
        if !self.skipped.is_empty() {
            writeln!(f, "{} file(s) skipped:", self.skipped.len())?;
            for s in self.skipped.iter().take(SKIPPED_SHOWN) {
                writeln!(f, "  {}: {}", s.path.display(), s.reason)?;
            }
            if self.skipped.len() > SKIPPED_SHOWN {
                writeln!(
                    f,
                    "  … and {} more (a wrong folder? check the first ones)",
                    self.skipped.len() - SKIPPED_SHOWN
                )?;
            }
        }
        Ok(())
    }
}

impl PrepareSummary {
    fn did_any_work(&self) -> bool {
        self.labels_written + self.labels_kept + self.images_placed + self.images_kept > 0
            || !self.skipped.is_empty()
            || !self.lists.is_empty()
    }
}

/// What became of an image's label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LabelFate {
    /// Already there, made from the same inputs and options.
    Kept,
    /// Missing or unreadable: written.
    Written,
    /// Made from other inputs or options: rewritten.
    Outdated,
    /// There, without a record of what made it: rewritten.
    Unrecorded,
}

/// What happened to one image of a run.
pub(crate) struct ItemOutcome {
    pub histogram: [u32; 256],
    pub label: LabelFate,
    pub image_placed: bool,
}

/// Where a file is written before it is renamed into place.
fn partial_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    path.with_file_name(name)
}

fn write_error(path: &Path) -> impl FnOnce(std::io::Error) -> PrepareError + '_ {
    move |source| PrepareError::Write {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `bytes` to `path` through `<path>.partial` and a rename: readers never see half a file.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), PrepareError> {
    let partial = partial_path(path);
    std::fs::write(&partial, bytes).map_err(write_error(&partial))?;
    std::fs::rename(&partial, path).map_err(write_error(path))
}

/// Writes a list file unless it already holds exactly `text` (a rerun leaves it untouched).
pub(crate) fn write_list(path: &Path, text: &str) -> Result<(), PrepareError> {
    if std::fs::read_to_string(path).is_ok_and(|old| old == text) {
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(write_error(dir))?;
    }
    write_atomically(path, text.as_bytes())
}

/// A label as the PNG the loader reads: 8-bit greyscale, one class index per pixel.
pub(crate) fn encode_label_png(label: &LabelMap) -> Vec<u8> {
    let mut bytes = Vec::new();
    let image =
        image::GrayImage::from_raw(label.width as u32, label.height as u32, label.data.clone())
            .expect("a label's buffer matches its size");
    image
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .expect("encoding a PNG into memory cannot fail");
    bytes
}

/// The histogram of a label already written by an earlier run, when it is whole, of `size`
/// (height, width) when known, and holds only values up to `classes` and 255.
pub(crate) fn existing_label(
    path: &Path,
    size: Option<(usize, usize)>,
    classes: usize,
) -> Option<[u32; 256]> {
    if !path.is_file() {
        return None;
    }
    let label = read_label(path).ok()?;
    let same_size = size.is_none_or(|s| s == (label.height, label.width));
    same_size
        .then(|| check_label_values(&label, classes).ok())
        .flatten()
}

/// Checks a new label's values: classes 0..=`classes` and 255 only.
pub(crate) fn check_label_values(label: &LabelMap, classes: usize) -> Result<[u32; 256], String> {
    let histogram = label.histogram();
    let bad: Vec<usize> = (classes + 1..255).filter(|&v| histogram[v] > 0).collect();
    if bad.is_empty() {
        Ok(histogram)
    } else {
        Err(format!(
            "holds values {bad:?}, outside the classes 0..={classes} and ignore 255"
        ))
    }
}

/// Writes the label `make` makes from `inputs` to `path` (and records it) unless a valid one is
/// already there, recorded as made from the same `inputs`; returns its histogram and what became
/// of it.
pub(crate) fn place_label(
    path: &Path,
    size: Option<(usize, usize)>,
    classes: usize,
    record: &LabelRecord,
    inputs: &str,
    make: impl FnOnce() -> Result<LabelMap, SkippedFile>,
) -> Result<Result<([u32; 256], LabelFate), SkippedFile>, PrepareError> {
    // The record first: a stat, where checking the label decodes it (wasted on one to rewrite).
    let fate = match record.compare(path, inputs) {
        Recorded::Same => match existing_label(path, size, classes) {
            Some(histogram) => return Ok(Ok((histogram, LabelFate::Kept))),
            None => LabelFate::Written,
        },
        Recorded::Other => LabelFate::Outdated,
        Recorded::Missing if path.is_file() => LabelFate::Unrecorded,
        Recorded::Missing => LabelFate::Written,
    };
    let label = match make() {
        Ok(label) => label,
        Err(skipped) => return Ok(Err(skipped)),
    };
    write_atomically(path, &encode_label_png(&label))?;
    record.add(path, inputs)?;
    Ok(Ok((label.histogram(), fate)))
}

/// Puts image `source` at `target` (link or copy) unless it is already there; returns whether it
/// placed it. A symbolic link there is replaced when it dangles, or by a copy under
/// [`ImageMode::Copy`]; a target that is the source itself (`--out` = the download folder) is left
/// alone.
pub(crate) fn place_image(
    source: &Path,
    target: &Path,
    mode: ImageMode,
) -> Result<bool, PrepareError> {
    use std::os::unix::fs::MetadataExt;
    if let Ok(found) = target.symlink_metadata() {
        let is_source = source
            .symlink_metadata()
            .is_ok_and(|s| (s.dev(), s.ino()) == (found.dev(), found.ino()));
        let usable_link = mode == ImageMode::Link && target.exists();
        if is_source || !found.file_type().is_symlink() || usable_link {
            return Ok(false);
        }
    }
    let partial = partial_path(target);
    let _ = std::fs::remove_file(&partial);
    match mode {
        ImageMode::Link => {
            let absolute = std::path::absolute(source).map_err(write_error(source))?;
            std::os::unix::fs::symlink(&absolute, &partial).map_err(write_error(&partial))?;
        }
        ImageMode::Copy => {
            std::fs::copy(source, &partial).map_err(write_error(&partial))?;
        }
    }
    std::fs::rename(&partial, target).map_err(write_error(target))?;
    Ok(true)
}

/// Checks that an image file exists and has `size` (height, width) in its header.
pub(crate) fn check_image(path: &Path, size: (usize, usize)) -> Result<(), SkippedFile> {
    if !path.is_file() {
        return Err(SkippedFile::new(path, "image file missing"));
    }
    let found = read_image_size(path).map_err(|e| SkippedFile::new(path, e.to_string()))?;
    if found != size {
        return Err(SkippedFile::new(
            path,
            format!(
                "image is {}x{} but its annotation is {}x{} (width x height)",
                found.1, found.0, size.1, size.0
            ),
        ));
    }
    Ok(())
}

pub(crate) fn create_dir(path: &Path) -> Result<(), PrepareError> {
    std::fs::create_dir_all(path).map_err(write_error(path))
}

pub(crate) fn require_dir(path: &Path, what: &'static str, fix: &str) -> Result<(), PrepareError> {
    if path.is_dir() {
        Ok(())
    } else {
        Err(PrepareError::MissingInput {
            what,
            path: path.to_path_buf(),
            fix: fix.to_string(),
        })
    }
}

pub(crate) fn require_file(path: &Path, what: &'static str, fix: &str) -> Result<(), PrepareError> {
    if path.is_file() {
        Ok(())
    } else {
        Err(PrepareError::MissingInput {
            what,
            path: path.to_path_buf(),
            fix: fix.to_string(),
        })
    }
}

/// Creates output folder `out` and takes it for this run: its [`LOCK_FILE`], then its label
/// record.
pub(crate) fn claim_output(out: &Path) -> Result<(DirLock, LabelRecord), PrepareError> {
    create_dir(out)?;
    let lock = lock_dir(out, LOCK_FILE).map_err(|e| match e {
        DirLockError::Held { path, pid } => PrepareError::OutputInUse { lock: path, pid },
        DirLockError::Io { path, source } => PrepareError::Write { path, source },
    })?;
    Ok((lock, LabelRecord::open(out)?))
}

/// `summary` when the run's `result` is a success; else the error, after logging the summary of
/// the work done before it (a finished split's lists and skipped files), which the error alone
/// would lose.
pub(crate) fn finish(
    summary: PrepareSummary,
    result: Result<(), PrepareError>,
) -> Result<PrepareSummary, PrepareError> {
    match result {
        Ok(()) => Ok(summary),
        Err(error) => {
            if summary.did_any_work() {
                tracing::warn!("stopped by the error below; done until then:\n{summary}");
            }
            Err(error)
        }
    }
}

/// Runs `work` over `items` on `threads` threads (progress bar named `what`), adds the outcomes to
/// `summary`, and returns each item's label histogram (`None` when skipped). A write failure stops
/// the run after the pass, with the other items' outcomes in `summary`.
pub(crate) fn run_items<T: Sync>(
    items: &[T],
    threads: usize,
    what: &str,
    summary: &mut PrepareSummary,
    work: impl Fn(&T) -> Result<Result<ItemOutcome, SkippedFile>, PrepareError> + Sync,
) -> Result<Vec<Option<[u32; 256]>>, PrepareError> {
    let outcomes = map_parallel(items, threads, what, work);
    let mut histograms = Vec::with_capacity(items.len());
    let mut first_error = None;
    for outcome in outcomes {
        match outcome {
            Ok(Ok(done)) => {
                let written = done.label != LabelFate::Kept;
                summary.labels_written += usize::from(written);
                summary.labels_kept += usize::from(!written);
                summary.labels_outdated += usize::from(done.label == LabelFate::Outdated);
                summary.labels_unrecorded += usize::from(done.label == LabelFate::Unrecorded);
                summary.images_placed += usize::from(done.image_placed);
                summary.images_kept += usize::from(!done.image_placed);
                histograms.push(Some(done.histogram));
            }
            Ok(Err(skipped)) => {
                summary.skipped.push(skipped);
                histograms.push(None);
            }
            Err(error) => {
                first_error.get_or_insert(error);
                histograms.push(None);
            }
        }
    }
    match first_error {
        Some(error) => Err(error),
        None => Ok(histograms),
    }
}

/// Writes a list of `(image, label, histogram)` entries (paths relative to the data root) and
/// records it in `summary`.
pub(crate) fn write_list_of(
    path: &Path,
    entries: &[(String, String, [u32; 256])],
    classes: usize,
    summary: &mut PrepareSummary,
) -> Result<(), PrepareError> {
    let mut text = String::new();
    let mut images_per_class = vec![0usize; classes + 1];
    for (image, label, histogram) in entries {
        text.push_str(&format!("{image} {label}\n"));
        for (c, count) in images_per_class.iter_mut().enumerate().skip(1) {
            *count += usize::from(histogram[c] > 0);
        }
    }
    write_list(path, &text)?;
    summary.lists.push(WrittenList {
        path: path.to_path_buf(),
        entries: entries.len(),
        images_per_class,
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_writes_leave_no_partial_file_and_lists_are_not_rewritten() {
        let dir = std::env::temp_dir().join(format!("svf-prepare-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let list = dir.join("lists/a.txt");
        write_list(&list, "x y\n").unwrap();
        let stamp = std::fs::metadata(&list).unwrap().modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        write_list(&list, "x y\n").unwrap();
        assert_eq!(std::fs::metadata(&list).unwrap().modified().unwrap(), stamp);
        write_list(&list, "x z\n").unwrap();
        assert_eq!(std::fs::read_to_string(&list).unwrap(), "x z\n");
        assert!(!partial_path(&list).exists());
        let label = LabelMap {
            height: 2,
            width: 3,
            data: vec![0, 1, 2, 255, 1, 0],
        };
        let path = dir.join("l.png");
        write_atomically(&path, &encode_label_png(&label)).unwrap();
        assert_eq!(read_label(&path).unwrap(), label);
        assert!(existing_label(&path, Some((2, 3)), 2).is_some());
        assert!(existing_label(&path, Some((3, 2)), 2).is_none());
        assert!(existing_label(&path, None, 1).is_none());
        std::fs::write(&path, &encode_label_png(&label)[..20]).unwrap();
        assert!(existing_label(&path, None, 2).is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
