//! An exclusive lock on a folder, for the processes that write into one (svf-train's run
//! directory, `svf-data prepare`'s output folder): two at once would mix or clobber each other's
//! files.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// The lock on a folder (its lock file, with the holder's pid inside) for as long as the value
/// lives. The operating system releases it when the process ends, however it ends, so a lock file
/// left behind never blocks a later process.
pub struct DirLock {
    _file: std::fs::File,
}

/// Why a folder could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum DirLockError {
    #[error("{path} is held by process {pid}")]
    Held { path: PathBuf, pid: String },
    #[error("cannot lock {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Locks `dir` (an existing folder) for this process through its file `file_name`, or says which
/// process holds it.
pub fn lock_dir(dir: &Path, file_name: &str) -> Result<DirLock, DirLockError> {
    let path = dir.join(file_name);
    let io_error = |source| DirLockError::Io {
        path: path.clone(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_error)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            return Err(DirLockError::Held {
                path,
                pid: pid.trim().to_string(),
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(io_error(e)),
    }
    file.set_len(0)
        .and_then(|()| write!(file, "{}", std::process::id()))
        .map_err(io_error)?;
    Ok(DirLock { _file: file })
}
