//! The VM state model: everything needed to continue a paused microVM in another process,
//! as serde types, and its versioned encoding (see [`mod@format`]).
//!
//! A snapshot directory ([`dir`]) holds `state.bin` (header + JSON payload of
//! [`VmState`]), `memory.bin` (guest RAM, sparse: zero pages are holes, see [`memory`])
//! and one image per drive ([`disk`]).
#![deny(missing_docs)]

pub mod dir;
pub mod disk;
pub mod format;
mod hex;
pub mod memory;
mod sparse;
mod state;

pub use dir::{open, DirError, SnapshotWriter, MEMORY_FILE, STATE_FILE};
pub use disk::{copy_disk, CopyKind, DiskError};
pub use format::{
    decode, encode, encode_as, read_state_file, rehearse, write_state_file, Caps, FormatError,
    FORMAT_VERSION, JSON_FORMAT_VERSION,
};
pub use memory::{allocated_bytes, read_memory, write_memory, MemoryFileError};
pub use state::*;

#[cfg(test)]
mod test_util {
    use std::fs::File;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A path under the temp directory unique to this process and call.
    pub(crate) fn temp_path(tag: &str) -> PathBuf {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        std::env::temp_dir().join(format!("hospes-{tag}-{}-{n}", std::process::id()))
    }

    /// Removes a file or directory tree when dropped.
    pub(crate) struct RemoveOnDrop(pub(crate) PathBuf);

    impl Drop for RemoveOnDrop {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0).or_else(|_| std::fs::remove_file(&self.0));
        }
    }

    /// A new read-write file, removed when dropped.
    pub(crate) struct TempFile {
        pub(crate) file: File,
        pub(crate) path: PathBuf,
        _remove: RemoveOnDrop,
    }

    impl TempFile {
        pub(crate) fn new(tag: &str) -> Self {
            let path = temp_path(tag);
            let file = File::options()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
                .unwrap();
            Self {
                file,
                _remove: RemoveOnDrop(path.clone()),
                path,
            }
        }
    }
}
