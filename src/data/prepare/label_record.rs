//! What made each label of an output folder, so that a rerun keeps a label only when the same
//! inputs and options would make it again: a label that decodes proves nothing about whether it
//! came from `--crowd class` or `--crowd ignore`, or from an SBD MAT-file that a VOC annotation now
//! overrides.
//!
//! **Inputs.** A label's inputs are one line of text naming everything that decides its pixels:
//! PASCAL's source label file (VOC PNG or SBD MAT) with its size and modification time; COCO's
//! annotation JSON with its size and modification time, plus the `--crowd` choice for an image
//! that has crowd regions (the others come out the same either way). [`RULES`] stands for the
//! code: it changes when a change of the code changes the labels it writes.
//!
//! **File.** `<out>/svf-data-labels.jsonl`, JSON lines: the header `{"svf_data_label_record":R}`,
//! then `{"source":N,"inputs":"…"}` naming a set of inputs once (COCO's ~123k labels share two per
//! split: a COCO label's line is about 87 bytes, some 11 MB for 123k labels, counted not measured), and `["<label path under out>",bytes,modified_ns,N]` per
//! label, appended as soon as the label is renamed into place, so that a killed run stays
//! resumable. The label's own size and modification time tie a line to the file it describes: a
//! label replaced after it was recorded (by hand, or by a run killed between the rename and the
//! line) counts as unrecorded and is rewritten. The last line of a label wins; the next run drops
//! superseded and unreadable lines. A record of other rules, or none (labels from before records
//! were kept), starts empty: every label is rewritten once.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};

use super::{write_atomically, write_error, PrepareError};

/// The record's file name in the output folder.
pub const RECORD_FILE: &str = "svf-data-labels.jsonl";
/// The version of the labelling rules: a record of another version describes labels this code
/// would not make.
pub(crate) const RULES: u32 = 1;

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum Line {
    Header { svf_data_label_record: u32 },
    Source { source: u32, inputs: String },
    Label(String, u64, u64, u32),
}

/// A file's size and modification time (nanoseconds since 1970).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    bytes: u64,
    modified_ns: u64,
}

impl Stamp {
    fn of(path: &Path) -> std::io::Result<Stamp> {
        let metadata = std::fs::metadata(path)?;
        let modified = metadata.modified()?;
        Ok(Stamp {
            bytes: metadata.len(),
            modified_ns: modified
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64),
        })
    }
}

/// An input file as a label's inputs name it: canonical path (the same whatever the current
/// directory), size, modification time.
pub(crate) fn describe_input(path: &Path) -> std::io::Result<String> {
    let stamp = Stamp::of(path)?;
    Ok(format!(
        "{} ({} bytes, modified {} ns)",
        std::fs::canonicalize(path)?.display(),
        stamp.bytes,
        stamp.modified_ns
    ))
}

/// How a label on disk stands against the inputs that would make it now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Recorded {
    /// Recorded as made from exactly these inputs.
    Same,
    /// Recorded as made from other inputs or options.
    Other,
    /// No line describes the file as it is.
    Missing,
}

/// The labels recorded when the run started, and the file new lines go to.
pub(crate) struct LabelRecord {
    root: PathBuf,
    path: PathBuf,
    /// Label path under `root` → its stamp and the number of its inputs.
    labels: HashMap<String, (Stamp, u32)>,
    /// Inputs by number.
    sources: Vec<String>,
    appender: Mutex<Appender>,
}

struct Appender {
    file: std::fs::File,
    /// Every set of inputs with a line in the file, and its number.
    numbers: HashMap<String, u32>,
}

/// A record file read back.
struct Parsed {
    /// The latest line of each label whose inputs are named.
    labels: HashMap<String, (Stamp, u32)>,
    /// The inputs those labels name, renumbered densely.
    sources: Vec<String>,
    /// Whether the file is to be rewritten: it holds lines that `labels` and `sources` leave out.
    rewrite: bool,
}

/// The record in `text`; `None` when it is not one of [`RULES`].
fn parse(text: &str) -> Option<Parsed> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header: Line = serde_json::from_str(lines.next()?).ok()?;
    if !matches!(header, Line::Header { svf_data_label_record } if svf_data_label_record == RULES) {
        return None;
    }
    let mut sources: HashMap<u32, String> = HashMap::new();
    let mut labels: HashMap<String, (Stamp, u32)> = HashMap::new();
    let mut read = 0;
    for line in lines {
        read += 1;
        match serde_json::from_str(line) {
            Ok(Line::Source { source, inputs }) => {
                sources.insert(source, inputs);
            }
            Ok(Line::Label(label, bytes, modified_ns, source)) => {
                labels.insert(label, (Stamp { bytes, modified_ns }, source));
            }
            // A line cut by a full disk or a crash: its label counts as unrecorded.
            Ok(Line::Header { .. }) | Err(_) => {}
        }
    }
    let mut renumbered: HashMap<u32, u32> = HashMap::new();
    let mut kept_sources = Vec::new();
    labels.retain(|_, (_, number)| {
        let Some(inputs) = sources.get(number) else {
            return false;
        };
        *number = *renumbered.entry(*number).or_insert_with(|| {
            kept_sources.push(inputs.clone());
            kept_sources.len() as u32 - 1
        });
        true
    });
    // A last line without its newline would be continued by the next one appended.
    let rewrite = read != labels.len() + kept_sources.len() || !text.ends_with('\n');
    Some(Parsed {
        labels,
        sources: kept_sources,
        rewrite,
    })
}

fn to_line(line: &Line) -> String {
    let mut text = serde_json::to_string(line).expect("record lines serialise");
    text.push('\n');
    text
}

impl LabelRecord {
    /// Reads the record of output folder `root` (locked by this run), rewriting it compacted when
    /// it holds lines that no longer count, or fresh when there is none of [`RULES`].
    pub(crate) fn open(root: &Path) -> Result<LabelRecord, PrepareError> {
        let path = root.join(RECORD_FILE);
        let parsed = match std::fs::read(&path) {
            Ok(bytes) => parse(&String::from_utf8_lossy(&bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(PrepareError::BadInput {
                    path,
                    message: format!(
                        "cannot read the record of what made the labels ({e}); delete it to \
                         rewrite every label"
                    ),
                })
            }
        };
        let Parsed {
            labels,
            sources,
            rewrite,
        } = parsed.unwrap_or(Parsed {
            labels: HashMap::new(),
            sources: Vec::new(),
            rewrite: true,
        });
        if rewrite {
            let mut text = to_line(&Line::Header {
                svf_data_label_record: RULES,
            });
            for (number, inputs) in sources.iter().enumerate() {
                text.push_str(&to_line(&Line::Source {
                    source: number as u32,
                    inputs: inputs.clone(),
                }));
            }
            for (label, (stamp, number)) in &labels {
                text.push_str(&to_line(&Line::Label(
                    label.clone(),
                    stamp.bytes,
                    stamp.modified_ns,
                    *number,
                )));
            }
            write_atomically(&path, text.as_bytes())?;
        }
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(write_error(&path))?;
        let numbers = sources
            .iter()
            .enumerate()
            .map(|(number, inputs)| (inputs.clone(), number as u32))
            .collect();
        Ok(LabelRecord {
            root: root.to_path_buf(),
            path,
            labels,
            sources,
            appender: Mutex::new(Appender { file, numbers }),
        })
    }

    fn key(&self, label: &Path) -> String {
        label
            .strip_prefix(&self.root)
            .unwrap_or(label)
            .to_string_lossy()
            .into_owned()
    }

    /// How the label file `label` (under the output folder) stands against `inputs`.
    pub(crate) fn compare(&self, label: &Path, inputs: &str) -> Recorded {
        let Some((stamp, number)) = self.labels.get(&self.key(label)) else {
            return Recorded::Missing;
        };
        if Stamp::of(label).ok() != Some(*stamp) {
            Recorded::Missing
        } else if self.sources[*number as usize] == inputs {
            Recorded::Same
        } else {
            Recorded::Other
        }
    }

    /// Records that `label`, just renamed into place, was made from `inputs`.
    pub(crate) fn add(&self, label: &Path, inputs: &str) -> Result<(), PrepareError> {
        let stamp = Stamp::of(label).map_err(write_error(label))?;
        let mut appender = self.appender.lock().unwrap_or_else(PoisonError::into_inner);
        let mut text = String::new();
        let number = match appender.numbers.get(inputs) {
            Some(&number) => number,
            None => {
                let number = appender.numbers.len() as u32;
                appender.numbers.insert(inputs.to_string(), number);
                text.push_str(&to_line(&Line::Source {
                    source: number,
                    inputs: inputs.to_string(),
                }));
                number
            }
        };
        text.push_str(&to_line(&Line::Label(
            self.key(label),
            stamp.bytes,
            stamp.modified_ns,
            number,
        )));
        // One write per label: lines of parallel workers never interleave.
        appender
            .file
            .write_all(text.as_bytes())
            .map_err(write_error(&self.path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_match_only_their_recorded_inputs_and_file() {
        let dir = std::env::temp_dir().join(format!("svf-label-record-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("labels")).unwrap();
        let (a, b) = (dir.join("labels/a.png"), dir.join("labels/b.png"));
        std::fs::write(&a, b"a").unwrap();
        std::fs::write(&b, b"b").unwrap();
        let record = LabelRecord::open(&dir).unwrap();
        assert_eq!(record.compare(&a, "x"), Recorded::Missing);
        record.add(&a, "x").unwrap();
        record.add(&b, "x").unwrap();
        record.add(&b, "y").unwrap();
        drop(record);
        let text = std::fs::read_to_string(dir.join(RECORD_FILE)).unwrap();
        assert_eq!(text.lines().count(), 6, "{text}");
        assert!(text.contains(r#"["labels/a.png",1,"#), "{text}");

        // Reopened: the later line of b wins and the file is compacted.
        let record = LabelRecord::open(&dir).unwrap();
        assert_eq!(record.compare(&a, "x"), Recorded::Same);
        assert_eq!(record.compare(&a, "y"), Recorded::Other);
        assert_eq!(record.compare(&b, "y"), Recorded::Same);
        drop(record);
        let text = std::fs::read_to_string(dir.join(RECORD_FILE)).unwrap();
        assert_eq!(text.lines().count(), 5, "{text}");

        // A label changed after it was recorded, a cut last line, a record of other rules.
        std::fs::write(&a, b"aa").unwrap();
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.join(RECORD_FILE))
            .unwrap();
        file.write_all(br#"["labels/c.png",1,"#).unwrap();
        let record = LabelRecord::open(&dir).unwrap();
        assert_eq!(record.compare(&a, "x"), Recorded::Missing);
        assert_eq!(record.compare(&b, "y"), Recorded::Same);
        drop(record);
        let text = std::fs::read_to_string(dir.join(RECORD_FILE)).unwrap();
        std::fs::write(
            dir.join(RECORD_FILE),
            text.replacen(&format!(":{RULES}}}"), ":0}", 1),
        )
        .unwrap();
        let record = LabelRecord::open(&dir).unwrap();
        assert_eq!(record.compare(&b, "y"), Recorded::Missing);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
