//! Atomic, PyTorch-compatible checkpoints (safetensors weights + JSON state).
//!
//! A checkpoint `NAME` in a run directory is up to three files:
//! - `NAME.safetensors`: every model variable (parameters and BatchNorm buffers) under its PyTorch
//!   `state_dict` name, so `model.load_state_dict(safetensors.torch.load_file(...))` works as is;
//! - `NAME.optim.safetensors` (optional): the optimiser's momentum buffers, named like the
//!   parameters they belong to (kept out of the weights file so that it stays a pure state dict);
//! - `NAME.json`: the caller's state (epoch, iteration, ...) plus the byte sizes of the two files.
//!
//! Writing never damages the previous checkpoint: every file is first written and fsynced as
//! `<file>.tmp`, the state's `.tmp` last. A complete `NAME.json.tmp` is the commit record: from then
//! on the new checkpoint is whole on disk and only renames remain. Reading (and the next write) first
//! [`recover`]s: a committed but half-renamed checkpoint is rolled forward, an uncommitted one is
//! discarded, so a process killed at any instant leaves exactly the old or the new checkpoint.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

/// The checkpoint of a run written every `save_freq` iterations, at every epoch end and on Ctrl-C.
pub const LAST: &str = "last";
/// The checkpoint of a run with the best validation mIoU so far.
pub const BEST: &str = "best";

/// Why a checkpoint or weights file could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot {action} {path}: {source}; check that the run directory is writable and has free space")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot {action} tensors of {path}: {source}")]
    Tensors {
        action: &'static str,
        path: PathBuf,
        source: tch::TchError,
    },
    #[error("checkpoint state {path} is unreadable: {source}; the checkpoint is damaged, use the other one (last/best) or start again")]
    State {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("no checkpoint `{name}` in {dir}: {missing} does not exist")]
    Missing {
        name: String,
        dir: PathBuf,
        missing: PathBuf,
    },
    #[error("weights file {path} does not exist (from {origin}); check the path")]
    NoFile { path: PathBuf, origin: String },
    #[error("weights file {path} (from {origin}) is truncated or not a safetensors file; give a complete .safetensors file (scripts/convert_weights.py converts .pth files), or use another checkpoint")]
    NotSafetensors { path: PathBuf, origin: String },
    #[error("weights file {path} (from {origin}) holds NaN or Inf in `{tensor}`: the file is damaged; use another checkpoint")]
    NonFinite {
        path: PathBuf,
        origin: String,
        tensor: String,
    },
    #[error("{path} has {actual} bytes but its state file records {expected}; the checkpoint was modified after it was written")]
    Size {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
}

/// The paths of checkpoint `name` in `dir`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointFiles {
    pub weights: PathBuf,
    pub optimizer: PathBuf,
    pub state: PathBuf,
}

impl CheckpointFiles {
    pub fn new(dir: &Path, name: &str) -> CheckpointFiles {
        CheckpointFiles {
            weights: dir.join(format!("{name}.safetensors")),
            optimizer: dir.join(format!("{name}.optim.safetensors")),
            state: dir.join(format!("{name}.json")),
        }
    }

    /// The files of the checkpoint whose weights file is `weights` (`DIR/NAME.safetensors`).
    pub fn of_weights(weights: &Path) -> Option<CheckpointFiles> {
        let name = weights
            .file_name()?
            .to_str()?
            .strip_suffix(".safetensors")?;
        Some(CheckpointFiles::new(
            weights.parent().unwrap_or(Path::new("")),
            name,
        ))
    }

    fn all(&self) -> [&Path; 3] {
        [&self.weights, &self.optimizer, &self.state]
    }
}

/// A checkpoint read back: tensors on the CPU, in file order.
pub struct Checkpoint<S> {
    pub weights: Vec<(String, Tensor)>,
    /// `None` when the checkpoint was written without optimiser state.
    pub optimizer: Option<Vec<(String, Tensor)>>,
    pub state: S,
}

/// What `NAME.json` holds: the caller's state, flattened, and the sizes that tie the files to it.
#[derive(Serialize, Deserialize)]
struct Envelope<S> {
    #[serde(flatten)]
    state: S,
    weights_bytes: u64,
    optimizer_bytes: Option<u64>,
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(".tmp");
    PathBuf::from(name)
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError {
    let path = path.to_path_buf();
    move |source| CheckpointError::Io {
        action,
        path,
        source,
    }
}

fn sync_file(path: &Path) -> Result<(), CheckpointError> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io_err("fsync", path))
}

/// Makes renames and new directory entries durable.
fn sync_dir(dir: &Path) -> Result<(), CheckpointError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync directory", dir))
}

fn file_size(path: &Path) -> Result<u64, CheckpointError> {
    Ok(std::fs::metadata(path)
        .map_err(io_err("read the size of", path))?
        .len())
}

fn remove_if_present(path: &Path) -> Result<(), CheckpointError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err("remove", path)(e)),
        _ => Ok(()),
    }
}

fn dir_of(files: &CheckpointFiles) -> &Path {
    files
        .state
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Writes `tensors` as safetensors to `path` and fsyncs it; tensors may live on any device.
fn write_tensors(tensors: &[(String, Tensor)], path: &Path) -> Result<u64, CheckpointError> {
    let on_cpu: Vec<(&str, Tensor)> = tensors
        .iter()
        .map(|(name, t)| (name.as_str(), t.to_device(Device::Cpu).contiguous()))
        .collect();
    Tensor::write_safetensors(&on_cpu, path).map_err(|source| CheckpointError::Tensors {
        action: "write",
        path: path.to_path_buf(),
        source,
    })?;
    sync_file(path)?;
    file_size(path)
}

/// Writes `tensors` as the one safetensors file `path`, atomically: staged as `<path>.tmp`, fsynced
/// and renamed over `path`, so a reader sees the old file or the whole new one, never half of it.
/// A failed write removes what it staged and leaves `path` as it was.
pub fn write_tensors_atomically(
    tensors: &[(String, Tensor)],
    path: &Path,
) -> Result<(), CheckpointError> {
    let tmp = tmp_path(path);
    if let Err(error) = write_tensors(tensors, &tmp) {
        let _ = remove_if_present(&tmp);
        return Err(error);
    }
    std::fs::rename(&tmp, path).map_err(io_err("rename into place", &tmp))?;
    sync_dir(
        path.parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new(".")),
    )
}

/// Phase one of a write: every file as `.tmp`, the state last (its completion is the commit).
fn stage<S: Serialize>(
    files: &CheckpointFiles,
    weights: &[(String, Tensor)],
    optimizer: Option<&[(String, Tensor)]>,
    state: &S,
) -> Result<(), CheckpointError> {
    let weights_bytes = write_tensors(weights, &tmp_path(&files.weights))?;
    let optimizer_bytes = match optimizer {
        Some(buffers) => Some(write_tensors(buffers, &tmp_path(&files.optimizer))?),
        None => None,
    };
    let envelope = Envelope {
        state,
        weights_bytes,
        optimizer_bytes,
    };
    let text = serde_json::to_string_pretty(&envelope).expect("checkpoint state serialises");
    let state_tmp = tmp_path(&files.state);
    let mut file = File::create(&state_tmp).map_err(io_err("create", &state_tmp))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(io_err("write", &state_tmp))?;
    sync_dir(dir_of(files))
}

/// Phase two: renames the staged files over the old ones (weights first, state last).
fn commit(files: &CheckpointFiles, with_optimizer: bool) -> Result<(), CheckpointError> {
    for path in files.all() {
        let tmp = tmp_path(path);
        if path == files.optimizer.as_path() && !with_optimizer {
            // A checkpoint without optimiser state must not pair with an older one's buffers.
            remove_if_present(path)?;
            continue;
        }
        if tmp.exists() {
            std::fs::rename(&tmp, path).map_err(io_err("rename into place", &tmp))?;
        }
    }
    sync_dir(dir_of(files))
}

/// Writes checkpoint `name` into `dir` atomically (see the module documentation). `weights` are
/// written under their names as given; `optimizer` buffers likewise when present.
pub fn save<S: Serialize>(
    dir: &Path,
    name: &str,
    weights: &[(String, Tensor)],
    optimizer: Option<&[(String, Tensor)]>,
    state: &S,
) -> Result<CheckpointFiles, CheckpointError> {
    let files = CheckpointFiles::new(dir, name);
    // Settle any earlier interrupted write first, so no stale commit record can pair with the
    // half-written files of this one.
    recover(dir, name)?;
    if let Err(error) = stage(&files, weights, optimizer, state) {
        // Frees what the failed write took (on a full disk, the space that is short); the previous
        // checkpoint stays as it was.
        let _ = recover(dir, name);
        return Err(error);
    }
    commit(&files, optimizer.is_some())?;
    Ok(files)
}

/// Completes or discards an interrupted write of checkpoint `name` (see the module documentation).
pub fn recover(dir: &Path, name: &str) -> Result<(), CheckpointError> {
    let files = CheckpointFiles::new(dir, name);
    let state_tmp = tmp_path(&files.state);
    let record = match std::fs::read_to_string(&state_tmp) {
        Ok(text) => serde_json::from_str::<Envelope<serde_json::Value>>(&text).ok(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io_err("read", &state_tmp)(e)),
    };
    // A record counts only if it describes the staged (or already renamed) files.
    let committed = record.filter(|r| {
        staged_size(&files.weights) == Some(r.weights_bytes)
            && r.optimizer_bytes
                .is_none_or(|bytes| staged_size(&files.optimizer) == Some(bytes))
    });
    match committed {
        Some(record) => {
            tracing::warn!(
                "completing the interrupted write of checkpoint {}",
                files.state.display()
            );
            commit(&files, record.optimizer_bytes.is_some())
        }
        None => {
            for path in files.all() {
                remove_if_present(&tmp_path(path))?;
            }
            Ok(())
        }
    }
}

/// Size of the staged `.tmp` of `path`, or of `path` itself once renamed.
fn staged_size(path: &Path) -> Option<u64> {
    std::fs::metadata(tmp_path(path))
        .or_else(|_| std::fs::metadata(path))
        .ok()
        .map(|m| m.len())
}

/// Whether checkpoint `name` exists in `dir` (after settling an interrupted write).
pub fn exists(dir: &Path, name: &str) -> Result<bool, CheckpointError> {
    recover(dir, name)?;
    Ok(CheckpointFiles::new(dir, name).state.exists())
}

/// Reads a safetensors file's tensors, refusing a missing, truncated or foreign file and one whose
/// floating tensors hold NaN or Inf (damage inside the data, which no size check sees). `origin`
/// names where the path came from for the message: `--weights`, "config key `weight`", ...
pub fn read_tensors(path: &Path, origin: &str) -> Result<Vec<(String, Tensor)>, CheckpointError> {
    // Opening first tells a missing or unreadable file from one that is not safetensors.
    if let Err(e) = File::open(path) {
        return Err(match e.kind() {
            std::io::ErrorKind::NotFound => CheckpointError::NoFile {
                path: path.to_path_buf(),
                origin: origin.to_string(),
            },
            _ => io_err("read", path)(e),
        });
    }
    let tensors = Tensor::read_safetensors(path).map_err(|_| CheckpointError::NotSafetensors {
        path: path.to_path_buf(),
        origin: origin.to_string(),
    })?;
    if let Some((name, _)) = tensors
        .iter()
        .find(|(_, t)| t.is_floating_point() && !bool::try_from(t.isfinite().all()).unwrap_or(true))
    {
        return Err(CheckpointError::NonFinite {
            path: path.to_path_buf(),
            origin: origin.to_string(),
            tensor: name.clone(),
        });
    }
    Ok(tensors)
}

fn check_size(path: &Path, expected: u64) -> Result<(), CheckpointError> {
    let actual = file_size(path)?;
    if actual != expected {
        return Err(CheckpointError::Size {
            path: path.to_path_buf(),
            expected,
            actual,
        });
    }
    Ok(())
}

/// Reads checkpoint `name` from `dir`, settling an interrupted write first.
pub fn load<S: DeserializeOwned>(dir: &Path, name: &str) -> Result<Checkpoint<S>, CheckpointError> {
    recover(dir, name)?;
    let files = CheckpointFiles::new(dir, name);
    let text = match std::fs::read_to_string(&files.state) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(CheckpointError::Missing {
                name: name.to_string(),
                dir: dir.to_path_buf(),
                missing: files.state,
            })
        }
        Err(e) => return Err(io_err("read", &files.state)(e)),
    };
    let envelope: Envelope<S> =
        serde_json::from_str(&text).map_err(|source| CheckpointError::State {
            path: files.state.clone(),
            source,
        })?;
    check_size(&files.weights, envelope.weights_bytes)?;
    let origin = format!("checkpoint `{name}`");
    let weights = read_tensors(&files.weights, &origin)?;
    let optimizer = match envelope.optimizer_bytes {
        Some(bytes) => {
            check_size(&files.optimizer, bytes)?;
            Some(read_tensors(&files.optimizer, &origin)?)
        }
        None => None,
    };
    Ok(Checkpoint {
        weights,
        optimizer,
        state: envelope.state,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct State {
        iteration: u64,
    }

    fn tensors(value: f64) -> Vec<(String, Tensor)> {
        vec![
            (
                "a.weight".to_string(),
                Tensor::full([2, 3], value, (Kind::Float, Device::Cpu)),
            ),
            (
                "a.num_batches_tracked".to_string(),
                Tensor::from(value as i64),
            ),
        ]
    }

    fn value_of(checkpoint: &Checkpoint<State>) -> f64 {
        let (_, weight) = checkpoint
            .weights
            .iter()
            .find(|(n, _)| n == "a.weight")
            .unwrap();
        weight.mean(Kind::Float).double_value(&[])
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("svf-ckpt-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn leftover_tmp_files(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect()
    }

    #[test]
    fn round_trip_keeps_names_values_kinds_and_state() {
        let dir = temp_dir("roundtrip");
        let optim = tensors(7.0);
        save(
            &dir,
            "last",
            &tensors(1.5),
            Some(&optim),
            &State { iteration: 3 },
        )
        .unwrap();
        let back: Checkpoint<State> = load(&dir, "last").unwrap();
        assert_eq!(back.state, State { iteration: 3 });
        let mut names: Vec<&str> = back.weights.iter().map(|(n, _)| n.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["a.num_batches_tracked", "a.weight"]);
        let (_, counter) = back
            .weights
            .iter()
            .find(|(n, _)| n == "a.num_batches_tracked")
            .unwrap();
        assert_eq!(counter.kind(), Kind::Int64);
        assert_eq!(counter.int64_value(&[]), 1);
        assert_eq!(value_of(&back), 1.5);
        let optimizer = back.optimizer.unwrap();
        assert_eq!(optimizer[0].1.mean(Kind::Float).double_value(&[]), 7.0);
        // A later checkpoint without optimiser state drops the old buffers instead of pairing with them.
        save(&dir, "last", &tensors(2.0), None, &State { iteration: 4 }).unwrap();
        let back: Checkpoint<State> = load(&dir, "last").unwrap();
        assert!(back.optimizer.is_none());
        assert!(!CheckpointFiles::new(&dir, "last").optimizer.exists());
        assert!(leftover_tmp_files(&dir).is_empty());
    }

    #[test]
    fn missing_checkpoint_names_the_file() {
        let dir = temp_dir("missing");
        assert!(!exists(&dir, "best").unwrap());
        let err = load::<State>(&dir, "best").err().unwrap().to_string();
        assert!(err.contains("best.json"), "{err}");
    }

    #[test]
    fn write_interrupted_while_writing_files_keeps_the_previous_checkpoint() {
        let dir = temp_dir("torn");
        save(
            &dir,
            "last",
            &tensors(1.0),
            Some(&tensors(1.0)),
            &State { iteration: 1 },
        )
        .unwrap();
        let files = CheckpointFiles::new(&dir, "last");
        // Killed while writing the new weights: a truncated tmp file, no commit record.
        std::fs::write(tmp_path(&files.weights), b"\x10\x00\x00\x00trunc").unwrap();
        let back: Checkpoint<State> = load(&dir, "last").unwrap();
        assert_eq!((back.state.iteration, value_of(&back)), (1, 1.0));
        assert!(leftover_tmp_files(&dir).is_empty());

        // Killed while writing the commit record itself: a torn state file is not a commit.
        stage(
            &files,
            &tensors(2.0),
            Some(&tensors(2.0)),
            &State { iteration: 2 },
        )
        .unwrap();
        let state_tmp = tmp_path(&files.state);
        let text = std::fs::read(&state_tmp).unwrap();
        std::fs::write(&state_tmp, &text[..text.len() / 2]).unwrap();
        let back: Checkpoint<State> = load(&dir, "last").unwrap();
        assert_eq!((back.state.iteration, value_of(&back)), (1, 1.0));
    }

    #[test]
    fn failed_write_removes_its_staged_files_and_keeps_the_previous_checkpoint() {
        let dir = temp_dir("failed-write");
        save(&dir, "last", &tensors(1.0), None, &State { iteration: 1 }).unwrap();
        let files = CheckpointFiles::new(&dir, "last");
        // Optimiser buffers that safetensors cannot hold fail the write after the weights were
        // staged.
        let complex = vec![(
            "c".to_string(),
            Tensor::zeros([2], (Kind::ComplexFloat, Device::Cpu)),
        )];
        let written = save(
            &dir,
            "last",
            &tensors(2.0),
            Some(&complex),
            &State { iteration: 2 },
        );
        assert!(written.is_err());
        assert!(
            !tmp_path(&files.weights).exists(),
            "staged weights left behind"
        );
        let back: Checkpoint<State> = load(&dir, "last").unwrap();
        assert_eq!((back.state.iteration, value_of(&back)), (1, 1.0));
    }

    #[test]
    fn write_interrupted_between_renames_completes_the_new_checkpoint() {
        let dir = temp_dir("renames");
        save(
            &dir,
            "last",
            &tensors(1.0),
            Some(&tensors(1.0)),
            &State { iteration: 1 },
        )
        .unwrap();
        let files = CheckpointFiles::new(&dir, "last");
        stage(
            &files,
            &tensors(2.0),
            Some(&tensors(2.0)),
            &State { iteration: 2 },
        )
        .unwrap();
        // Killed after the weights were renamed but before the state: a mixed pair on disk.
        std::fs::rename(tmp_path(&files.weights), &files.weights).unwrap();
        let back: Checkpoint<State> = load(&dir, "last").unwrap();
        assert_eq!((back.state.iteration, value_of(&back)), (2, 2.0));
        let optimizer = back.optimizer.unwrap();
        assert_eq!(optimizer[0].1.mean(Kind::Float).double_value(&[]), 2.0);
        assert!(leftover_tmp_files(&dir).is_empty());
    }

    #[test]
    fn file_changed_after_writing_is_reported() {
        let dir = temp_dir("size");
        save(&dir, "last", &tensors(1.0), None, &State { iteration: 1 }).unwrap();
        let files = CheckpointFiles::new(&dir, "last");
        let mut bytes = std::fs::read(&files.weights).unwrap();
        bytes.truncate(bytes.len() - 4);
        std::fs::write(&files.weights, bytes).unwrap();
        let err = load::<State>(&dir, "last").err().unwrap().to_string();
        assert!(err.contains("last.safetensors"), "{err}");
    }

    #[test]
    fn unreadable_weights_files_are_named_with_their_origin_and_cause() {
        let dir = temp_dir("readerr");
        let good = dir.join("good.safetensors");
        Tensor::write_safetensors(&tensors(1.0), &good).unwrap();
        assert_eq!(read_tensors(&good, "--weights").unwrap().len(), 2);
        let message = |path: &Path| read_tensors(path, "--weights").err().unwrap().to_string();

        let missing = message(&dir.join("missing.safetensors"));
        assert!(
            missing.contains("missing.safetensors does not exist (from --weights)"),
            "{missing}"
        );

        let bytes = std::fs::read(&good).unwrap();
        let truncated = dir.join("truncated.safetensors");
        std::fs::write(&truncated, &bytes[..bytes.len() - 4]).unwrap();
        let png = dir.join("image.png");
        std::fs::write(&png, b"\x89PNG\r\n\x1a\n0123456789abcdef").unwrap();
        for path in [&truncated, &png] {
            let m = message(path);
            assert!(m.contains("is truncated or not a safetensors file"), "{m}");
            assert!(m.contains(&*path.to_string_lossy()), "{m}");
        }

        let nan = tensors(1.0);
        let _ = nan[0].1.get(1).get(2).fill_(f64::NAN);
        let damaged = dir.join("nan.safetensors");
        Tensor::write_safetensors(&nan, &damaged).unwrap();
        let m = message(&damaged);
        assert!(
            m.contains("holds NaN or Inf in `a.weight`: the file is damaged"),
            "{m}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
