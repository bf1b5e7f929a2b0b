//! The snapshot directory: written under a temporary name and renamed into place once
//! every file is on disk, so that a snapshot directory either is complete or does not
//! exist; and opened with its files checked against the state before anything is loaded.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use crate::format::{self, FormatError};
use crate::VmState;

/// The state file inside a snapshot directory.
pub const STATE_FILE: &str = "state.bin";
/// The memory file inside a snapshot directory.
pub const MEMORY_FILE: &str = "memory.bin";

/// Errors writing or opening a snapshot directory.
#[derive(Debug, thiserror::Error)]
pub enum DirError {
    /// Snapshots are never overwritten.
    #[error("snapshot directory {} already exists", .0.display())]
    Exists(PathBuf),
    /// The path has no last component to name the snapshot by (`/`, `..`).
    #[error("snapshot directory path {} does not end in a name", .0.display())]
    NoName(PathBuf),
    /// A file system operation failed.
    #[error("cannot {op} {}: {source}", .path.display())]
    Io {
        /// What we tried ("create", "sync", ...).
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The state file is unusable.
    #[error("{}: {source}", .path.display())]
    State {
        /// The state file.
        path: PathBuf,
        /// Why.
        source: FormatError,
    },
    /// A file the state refers to is not there.
    #[error("snapshot file {} is missing or not a regular file", .0.display())]
    Missing(PathBuf),
    /// The memory file does not match the state.
    #[error("memory file {} is {actual} bytes, the state says {expected}", .path.display())]
    MemorySize {
        /// The memory file.
        path: PathBuf,
        /// Its length.
        actual: u64,
        /// [`crate::MemoryState::total_bytes`].
        expected: u64,
    },
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> DirError {
    let path = path.to_owned();
    move |source| DirError::Io { op, path, source }
}

/// A snapshot directory being written: files go to a hidden sibling directory, which
/// [`SnapshotWriter::commit`] renames to the destination. Dropped without a commit, it
/// removes what was written.
#[derive(Debug)]
pub struct SnapshotWriter {
    /// The hidden directory being filled; empty once committed.
    tmp: PathBuf,
    /// The snapshot directory to create.
    dest: PathBuf,
}

impl SnapshotWriter {
    /// Starts a snapshot that will be the directory `dest`, which must not exist.
    pub fn begin(dest: &Path) -> Result<Self, DirError> {
        if dest.symlink_metadata().is_ok() {
            return Err(DirError::Exists(dest.to_owned()));
        }
        let Some(name) = dest.file_name() else {
            return Err(DirError::NoName(dest.to_owned()));
        };
        let parent = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".partial-{}", std::process::id()));
        let tmp = parent.join(tmp_name);
        // Left by a crashed process that had our pid; ours never outlive their writer.
        if tmp.symlink_metadata().is_ok() {
            fs::remove_dir_all(&tmp).map_err(io_err("remove stale", &tmp))?;
        }
        fs::create_dir(&tmp).map_err(io_err("create directory", &tmp))?;
        Ok(Self {
            tmp,
            dest: dest.to_owned(),
        })
    }

    /// Where to write the snapshot file `name` until the commit.
    pub fn path(&self, name: &str) -> PathBuf {
        self.tmp.join(name)
    }

    /// Syncs every file and the directory, then renames it into place.
    pub fn commit(mut self) -> Result<(), DirError> {
        for entry in fs::read_dir(&self.tmp).map_err(io_err("list", &self.tmp))? {
            let path = entry.map_err(io_err("list", &self.tmp))?.path();
            sync(&path)?;
        }
        sync(&self.tmp)?;
        // rename() would silently replace an empty directory created since `begin`.
        if self.dest.symlink_metadata().is_ok() {
            return Err(DirError::Exists(self.dest.clone()));
        }
        fs::rename(&self.tmp, &self.dest).map_err(io_err("rename into place", &self.dest))?;
        self.tmp = PathBuf::new();
        // The rename is durable once the parent directory is.
        let parent = match self.dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        sync(parent)
    }
}

impl Drop for SnapshotWriter {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            if let Err(e) = fs::remove_dir_all(&self.tmp) {
                tracing::warn!(
                    "cannot remove unfinished snapshot {}: {e}",
                    self.tmp.display()
                );
            }
        }
    }
}

/// fsync a file or directory (both open read-only for it).
fn sync(path: &Path) -> Result<(), DirError> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io_err("sync", path))
}

/// Reads and checks the snapshot in `dir`: its state, and that the memory file and every
/// drive image exist, the memory file with the length the state gives it. Returns the
/// state and the directory's canonical path, which the state's file names are relative
/// to.
pub fn open(dir: &Path) -> Result<(VmState, PathBuf), DirError> {
    let dir = fs::canonicalize(dir).map_err(io_err("open snapshot directory", dir))?;
    let state_path = dir.join(STATE_FILE);
    let bytes = format::read_bounded(&state_path).map_err(io_err("read", &state_path))?;
    let state = format::decode(&bytes).map_err(|source| DirError::State {
        path: state_path,
        source,
    })?;

    let memory_path = dir.join(&state.memory.file);
    let actual = regular_file_len(&memory_path)?;
    let expected = state.memory.total_bytes();
    if actual != expected {
        return Err(DirError::MemorySize {
            path: memory_path,
            actual,
            expected,
        });
    }
    for drive in &state.machine.drives {
        regular_file_len(&dir.join(&drive.file))?;
    }
    Ok((state, dir))
}

fn regular_file_len(path: &Path) -> Result<u64, DirError> {
    match fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(m.len()),
        Ok(_) => Err(DirError::Missing(path.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(DirError::Missing(path.to_owned())),
        Err(e) => Err(io_err("stat", path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::tests::sample_state;
    use crate::test_util::{temp_path, RemoveOnDrop};

    /// Writes a complete snapshot of `sample_state()` to `dest`.
    fn write_snapshot(dest: &Path) -> SnapshotWriter {
        let state = sample_state();
        let writer = SnapshotWriter::begin(dest).unwrap();
        format::write_state_file(&writer.path(STATE_FILE), &state).unwrap();
        let memory = File::create(writer.path(MEMORY_FILE)).unwrap();
        memory.set_len(state.memory.total_bytes()).unwrap();
        fs::write(writer.path("root.img"), b"image").unwrap();
        writer
    }

    #[test]
    fn commit_and_open() {
        let dest = temp_path("snap");
        let _cleanup = RemoveOnDrop(dest.clone());
        let writer = write_snapshot(&dest);
        let tmp = writer.tmp.clone();
        assert!(tmp
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with(".hospes-snap"));
        assert!(!dest.exists());
        writer.commit().unwrap();
        assert!(dest.join(STATE_FILE).exists());
        assert!(!tmp.exists());

        let (state, dir) = open(&dest).unwrap();
        assert_eq!(state.machine.name, "web");
        assert_eq!(dir, fs::canonicalize(&dest).unwrap());
        let memory = dir.join(MEMORY_FILE);

        let err = SnapshotWriter::begin(&dest).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("snapshot directory {} already exists", dest.display())
        );

        File::options()
            .write(true)
            .open(&memory)
            .unwrap()
            .set_len(4096)
            .unwrap();
        let err = open(&dest).unwrap_err().to_string();
        assert!(
            err.ends_with("is 4096 bytes, the state says 536870912"),
            "{err}"
        );
        fs::remove_file(dest.join("root.img")).unwrap();
        fs::remove_file(&memory).unwrap();
        assert!(matches!(open(&dest), Err(DirError::Missing(p)) if p == memory));

        fs::write(dest.join(STATE_FILE), b"HOSPESVM").unwrap();
        let err = open(&dest).unwrap_err().to_string();
        assert!(
            err.ends_with("state.bin: truncated: 8 bytes, header needs 32"),
            "{err}"
        );
    }

    #[test]
    fn missing_drive() {
        let dest = temp_path("snap-nodrive");
        let _cleanup = RemoveOnDrop(dest.clone());
        let writer = write_snapshot(&dest);
        fs::remove_file(writer.path("root.img")).unwrap();
        writer.commit().unwrap();
        assert!(matches!(open(&dest), Err(DirError::Missing(p)) if p.ends_with("root.img")));
    }

    #[test]
    fn drop_without_commit_removes_everything() {
        let dest = temp_path("snap-dropped");
        let writer = write_snapshot(&dest);
        let tmp = writer.tmp.clone();
        assert!(tmp.join(STATE_FILE).exists());
        drop(writer);
        assert!(!tmp.exists() && !dest.exists());
    }

    #[test]
    fn stale_partial_directory_is_replaced() {
        let dest = temp_path("snap-stale");
        let _cleanup = RemoveOnDrop(dest.clone());
        let stale = {
            let writer = SnapshotWriter::begin(&dest).unwrap();
            fs::write(writer.path("junk"), b"old").unwrap();
            let tmp = writer.tmp.clone();
            std::mem::forget(writer); // as if the process had crashed
            tmp
        };
        let writer = write_snapshot(&dest);
        assert_eq!(writer.tmp, stale);
        assert!(!writer.path("junk").exists());
        writer.commit().unwrap();
        assert!(open(&dest).is_ok());
    }

    #[test]
    fn open_missing_directory() {
        let dest = temp_path("snap-never");
        let err = open(&dest).unwrap_err().to_string();
        assert!(err.starts_with("cannot open snapshot directory"), "{err}");
    }

    #[test]
    fn no_name() {
        let err = SnapshotWriter::begin(Path::new("/hospes-no-such-dir/..")).unwrap_err();
        assert!(matches!(err, DirError::NoName(_)), "{err}");
    }
}
