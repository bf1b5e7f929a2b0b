//! Copying a drive image into a snapshot: a reflink where the file system shares extents
//! (btrfs, XFS), otherwise a copy of the data extents only, so holes stay holes.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::sparse::DataExtents;

/// Chunk size of the `pread`/`pwrite` fallback.
const CHUNK: usize = 1 << 20;

/// How a drive image was copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyKind {
    /// The copy shares the source's extents (`FICLONE`): instant, no space used.
    Reflink,
    /// The data extents were copied.
    Copied,
}

/// Errors copying a drive image.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The source cannot be opened.
    #[error("cannot open drive image {}: {source}", .path.display())]
    Open {
        /// The source image.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The destination cannot be created (it must not exist).
    #[error("cannot create {}: {source}", .path.display())]
    Create {
        /// The destination.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// Copying failed; the destination was removed.
    #[error("cannot copy {} to {}: {source}", .src.display(), .dst.display())]
    Copy {
        /// The source image.
        src: PathBuf,
        /// The destination.
        dst: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
}

/// Copies the image at `src` to a new file `dst`, synced. The drive must be quiescent.
pub fn copy_disk(src: &Path, dst: &Path) -> Result<CopyKind, DiskError> {
    let src_file = File::open(src).map_err(|source| DiskError::Open {
        path: src.to_owned(),
        source,
    })?;
    let dst_file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dst)
        .map_err(|source| DiskError::Create {
            path: dst.to_owned(),
            source,
        })?;
    copy_into(&src_file, &dst_file).map_err(|source| {
        // Best effort: the error being reported matters more than a failed cleanup.
        let _ = std::fs::remove_file(dst);
        DiskError::Copy {
            src: src.to_owned(),
            dst: dst.to_owned(),
            source,
        }
    })
}

fn copy_into(src: &File, dst: &File) -> io::Result<CopyKind> {
    // SAFETY: FICLONE takes the source descriptor as its argument and reads no memory of
    // ours; both files stay open for the call.
    let ret = unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) };
    let kind = if ret == 0 {
        CopyKind::Reflink
    } else {
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EOPNOTSUPP | libc::EXDEV | libc::EINVAL | libc::ENOTTY) => {}
            _ => return Err(err),
        }
        let len = src.metadata()?.len();
        for extent in DataExtents::new(src, len) {
            let (start, end) = extent?;
            copy_range(src, dst, start, end)?;
        }
        // Extends the file over a trailing hole.
        dst.set_len(len)?;
        CopyKind::Copied
    };
    dst.sync_all()?;
    Ok(kind)
}

/// Copies `[start, end)` at the same offsets, in the kernel where it can.
fn copy_range(src: &File, dst: &File, start: u64, end: u64) -> io::Result<()> {
    let mut pos = start;
    while pos < end {
        let mut off_in = libc::loff_t::try_from(pos).map_err(|_| io::ErrorKind::InvalidInput)?;
        let mut off_out = off_in;
        let len = (end - pos).min(1 << 30) as usize;
        // SAFETY: the kernel reads and updates the two offsets, which live for the call;
        // both descriptors stay open for it.
        let n = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut off_in,
                dst.as_raw_fd(),
                &mut off_out,
                len,
                0,
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EXDEV | libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL) => {
                    return copy_range_by_chunks(src, dst, pos, end)
                }
                _ => return Err(err),
            }
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("source ended at {pos} bytes while copying"),
            ));
        }
        pos += n as u64;
    }
    Ok(())
}

fn copy_range_by_chunks(src: &File, dst: &File, start: u64, end: u64) -> io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    let mut pos = start;
    while pos < end {
        let chunk = &mut buf[..(end - pos).min(CHUNK as u64) as usize];
        src.read_exact_at(chunk, pos)?;
        dst.write_all_at(chunk, pos)?;
        pos += chunk.len() as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::allocated_bytes;
    use crate::test_util::{temp_path, RemoveOnDrop, TempFile};

    #[test]
    fn sparse_copy() {
        let src = TempFile::new("disk-src");
        let len = (64 << 20) + 100;
        src.file.set_len(len).unwrap();
        src.file.write_all_at(b"boot sector", 0).unwrap();
        src.file.write_all_at(&[7; 3 * CHUNK], 20 << 20).unwrap();
        src.file.write_all_at(b"tail", len - 4).unwrap();

        let dst = temp_path("disk-dst");
        let _cleanup = RemoveOnDrop(dst.clone());
        let kind = copy_disk(&src.path, &dst).unwrap();
        let copy = std::fs::read(&dst).unwrap();
        assert!(copy == std::fs::read(&src.path).unwrap());
        if kind == CopyKind::Copied {
            let allocated = allocated_bytes(&File::open(&dst).unwrap()).unwrap();
            assert!(allocated < 8 << 20, "{allocated} bytes allocated");
        }

        let err = copy_disk(&src.path, &dst).unwrap_err();
        assert!(matches!(err, DiskError::Create { .. }), "{err}");
        let missing = temp_path("disk-missing");
        let err = copy_disk(&missing, &temp_path("disk-never")).unwrap_err();
        assert!(
            err.to_string().starts_with("cannot open drive image"),
            "{err}"
        );
    }

    #[test]
    fn chunked_fallback() {
        let src = TempFile::new("chunk-src");
        let data: Vec<u8> = (0..CHUNK + 12345).map(|i| (i % 253) as u8).collect();
        src.file.write_all_at(&data, 0).unwrap();
        let dst = TempFile::new("chunk-dst");
        copy_range_by_chunks(&src.file, &dst.file, 0, data.len() as u64).unwrap();
        assert!(std::fs::read(&dst.path).unwrap() == data);
    }
}
