//! Finding the data in a sparse file: its data extents, by `lseek(SEEK_DATA/SEEK_HOLE)`.
//!
//! `lseek` moves the file offset shared by every handle on the open file; callers only use
//! positional I/O (`pread`/`pwrite`/`copy_file_range` with offsets), which ignores it.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// The data extents `(start, end)` of `file` within `[0, len)`, in order. A file system
/// without `SEEK_DATA` yields the whole rest of the range as one extent.
pub(crate) struct DataExtents<'a> {
    file: &'a File,
    pos: u64,
    len: u64,
}

impl<'a> DataExtents<'a> {
    pub(crate) fn new(file: &'a File, len: u64) -> Self {
        Self { file, pos: 0, len }
    }

    /// Where the search stands, for error messages.
    pub(crate) fn pos(&self) -> u64 {
        self.pos
    }

    fn next_extent(&mut self) -> io::Result<Option<(u64, u64)>> {
        if self.pos >= self.len {
            return Ok(None);
        }
        let start = match lseek(self.file, self.pos, libc::SEEK_DATA) {
            Ok(start) => start,
            // No data after `pos`: the rest is a hole.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => self.len,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => self.pos,
            Err(e) => return Err(e),
        };
        if start >= self.len {
            self.pos = self.len;
            return Ok(None);
        }
        let end = match lseek(self.file, start, libc::SEEK_HOLE) {
            Ok(end) => end.min(self.len),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => self.len,
            Err(e) => return Err(e),
        };
        self.pos = end;
        Ok(Some((start, end)))
    }
}

impl Iterator for DataExtents<'_> {
    type Item = io::Result<(u64, u64)>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_extent().transpose()
    }
}

fn lseek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<u64> {
    let offset = libc::off_t::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: lseek only takes integers; `file` keeps the descriptor open for the call.
    let ret = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ret as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn extents_of_a_sparse_file() {
        let file = crate::test_util::TempFile::new("extents");
        let f = &file.file;
        f.set_len(8 << 20).unwrap();
        f.write_all_at(&[1; 4096], 1 << 20).unwrap();
        f.write_all_at(&[1; 8192], 4 << 20).unwrap();
        let extents: Vec<_> = DataExtents::new(f, 8 << 20).map(Result::unwrap).collect();
        // A file system may report more data than was written, never less.
        let covered = |at: u64| extents.iter().any(|&(s, e)| s <= at && at < e);
        assert!(
            covered(1 << 20) && covered((4 << 20) + 8191),
            "{extents:x?}"
        );
        let data: u64 = extents.iter().map(|(s, e)| e - s).sum();
        assert!(data < 4 << 20, "{extents:x?}");
        // Limited to `len`, even in the middle of an extent.
        let extents: Vec<_> = DataExtents::new(f, (1 << 20) + 100)
            .map(Result::unwrap)
            .collect();
        assert_eq!(extents.last().unwrap().1, (1 << 20) + 100);
    }
}
