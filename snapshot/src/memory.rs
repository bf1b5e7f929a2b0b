//! The memory file: guest RAM regions back to back, each all-zero 4 KiB page left as a
//! hole, so that saving and restoring cost the guest's touched memory, not its size.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};

use crate::sparse::DataExtents;

/// Granularity of holes.
pub const PAGE_SIZE: usize = 4096;

static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

/// Errors writing or reading the memory file.
#[derive(Debug, thiserror::Error)]
pub enum MemoryFileError {
    /// The file does not hold the memory the state describes.
    #[error("memory file is {actual} bytes, the state says {expected}")]
    LengthMismatch {
        /// The file's length.
        actual: u64,
        /// The length from the state.
        expected: u64,
    },
    /// The caller's regions do not add up to the file's expected length.
    #[error("guest memory regions total {regions} bytes, the state says {expected}")]
    RegionsMismatch {
        /// Sum of the destination regions.
        regions: u64,
        /// The length from the state.
        expected: u64,
    },
    /// Writing failed.
    #[error("cannot write the memory file at offset {offset:#x}: {source}")]
    Write {
        /// File offset of the failed write.
        offset: u64,
        /// The I/O error.
        source: io::Error,
    },
    /// Reading failed.
    #[error("cannot read the memory file at offset {offset:#x}: {source}")]
    Read {
        /// File offset of the failed read (or extent search).
        offset: u64,
        /// The I/O error.
        source: io::Error,
    },
}

/// Writes `regions` back to back into `file` (truncated first), leaving zero pages as
/// holes, and returns how many bytes of data it wrote. The guest must be paused.
pub fn write_memory(file: &File, regions: &[&[u8]]) -> Result<u64, MemoryFileError> {
    let whole: Vec<Vec<(usize, usize)>> = regions.iter().map(|r| vec![(0, r.len())]).collect();
    write_populated_memory(file, regions, &whole)
}

/// [`write_memory`], reading of region `i` only the byte ranges `(offset, len)` of
/// `populated[i]` (in order, inside the region): the caller knows the rest is zero, as
/// anonymous memory never touched is, and it becomes holes without being read.
pub fn write_populated_memory(
    file: &File,
    regions: &[&[u8]],
    populated: &[Vec<(usize, usize)>],
) -> Result<u64, MemoryFileError> {
    let write_err = |offset| move |source| MemoryFileError::Write { offset, source };
    // Dropping old contents makes every byte not written below a hole.
    file.set_len(0).map_err(write_err(0))?;
    let (mut base, mut written) = (0u64, 0u64);
    for (region, ranges) in regions.iter().zip(populated) {
        for &(from, len) in ranges {
            let to = (from + len).min(region.len());
            let mut write_run = |start: usize, end: usize| {
                let offset = base + start as u64;
                written += (end - start) as u64;
                file.write_all_at(&region[start..end], offset)
                    .map_err(write_err(offset))
            };
            let mut run_start = None;
            for (i, page) in region[from..to].chunks(PAGE_SIZE).enumerate() {
                let at = from + i * PAGE_SIZE;
                match (is_zero(page), run_start) {
                    (false, None) => run_start = Some(at),
                    (true, Some(start)) => {
                        write_run(start, at)?;
                        run_start = None;
                    }
                    _ => {}
                }
            }
            if let Some(start) = run_start {
                write_run(start, to)?;
            }
        }
        base += region.len() as u64;
    }
    file.set_len(base).map_err(write_err(base))?;
    Ok(written)
}

/// `bcmp` against a zero page: vectorized, and stops at the first non-zero byte, which in
/// a page of data is usually near the start.
fn is_zero(page: &[u8]) -> bool {
    page == &ZERO_PAGE[..page.len()]
}

/// Reads the memory file into `regions`, which must be zero (fresh anonymous memory):
/// only the file's data extents are read, holes are skipped.
pub fn read_memory(
    file: &File,
    regions: &mut [&mut [u8]],
    expected_len: u64,
) -> Result<(), MemoryFileError> {
    let read_err = |offset| move |source| MemoryFileError::Read { offset, source };
    let actual = file.metadata().map_err(read_err(0))?.len();
    if actual != expected_len {
        return Err(MemoryFileError::LengthMismatch {
            actual,
            expected: expected_len,
        });
    }
    let total: u64 = regions.iter().map(|r| r.len() as u64).sum();
    if total != expected_len {
        return Err(MemoryFileError::RegionsMismatch {
            regions: total,
            expected: expected_len,
        });
    }
    let mut extents = DataExtents::new(file, expected_len);
    while let Some(extent) = extents.next() {
        let (start, end) = extent.map_err(read_err(extents.pos()))?;
        // Copy the part of [start, end) that falls in each region.
        let mut base = 0u64;
        for region in regions.iter_mut() {
            let region_end = base + region.len() as u64;
            let (from, to) = (start.max(base), end.min(region_end));
            if from < to {
                let dst = &mut region[(from - base) as usize..(to - base) as usize];
                file.read_exact_at(dst, from).map_err(read_err(from))?;
            }
            base = region_end;
        }
    }
    Ok(())
}

/// Bytes the file occupies on disk (`st_blocks * 512`), as opposed to its length.
pub fn allocated_bytes(file: &File) -> io::Result<u64> {
    Ok(file.metadata()?.blocks() * 512)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::TempFile;

    /// Two regions (1 MiB + 15 MiB), mostly zero, with data at the edges of both.
    fn guest_memory() -> Vec<Vec<u8>> {
        let mut low = vec![0u8; 1 << 20];
        let mut high = vec![0u8; 15 << 20];
        low[..10].copy_from_slice(b"first page");
        low[(1 << 20) - 1] = 0xaa; // last page of region 0, file offset 1 MiB - 1
        high[0] = 0xbb; // first page of region 1: one run across regions in the file
        high[(5 << 20) + 4095] = 0xcc; // a lone page, its last byte
        for (i, b) in high[(8 << 20)..(8 << 20) + 3 * PAGE_SIZE]
            .iter_mut()
            .enumerate()
        {
            *b = i as u8;
        }
        *high.last_mut().unwrap() = 0xdd;
        vec![low, high]
    }

    #[test]
    fn round_trip_with_holes() {
        let memory = guest_memory();
        let regions: Vec<&[u8]> = memory.iter().map(Vec::as_slice).collect();
        let file = TempFile::new("memory");
        let written = write_memory(&file.file, &regions).unwrap();
        assert_eq!(written, 8 * PAGE_SIZE as u64);
        assert_eq!(file.file.metadata().unwrap().len(), 16 << 20);
        let allocated = allocated_bytes(&file.file).unwrap();
        assert!(allocated < 1 << 20, "{allocated} bytes allocated");

        let mut back = vec![vec![0u8; 1 << 20], vec![0u8; 15 << 20]];
        let mut dst: Vec<&mut [u8]> = back.iter_mut().map(Vec::as_mut_slice).collect();
        read_memory(&file.file, &mut dst, 16 << 20).unwrap();
        assert!(back == memory);

        // Rewriting a file drops its old contents.
        let zeros = vec![0u8; 2 << 20];
        assert_eq!(write_memory(&file.file, &[&zeros]).unwrap(), 0);
        assert!(allocated_bytes(&file.file).unwrap() < 64 << 10);
    }

    #[test]
    fn only_the_populated_ranges_are_read() {
        let memory = guest_memory();
        let regions: Vec<&[u8]> = memory.iter().map(Vec::as_slice).collect();
        // Region 0 whole; of region 1 only the three pages at 8 MiB and the last page.
        let populated = vec![
            vec![(0, 1 << 20)],
            vec![
                (8 << 20, 3 * PAGE_SIZE),
                ((15 << 20) - PAGE_SIZE, PAGE_SIZE),
            ],
        ];
        let file = TempFile::new("populated");
        let written = write_populated_memory(&file.file, &regions, &populated).unwrap();
        assert_eq!(written, 6 * PAGE_SIZE as u64);
        assert_eq!(file.file.metadata().unwrap().len(), 16 << 20);

        let mut back = vec![vec![0u8; 1 << 20], vec![0u8; 15 << 20]];
        let mut dst: Vec<&mut [u8]> = back.iter_mut().map(Vec::as_mut_slice).collect();
        read_memory(&file.file, &mut dst, 16 << 20).unwrap();
        let mut expected = memory.clone();
        expected[1][0] = 0; // outside the ranges: not read, a hole
        expected[1][(5 << 20) + 4095] = 0;
        assert!(back == expected);
    }

    #[test]
    fn all_data_and_partial_last_page() {
        let data: Vec<u8> = (0..3 * PAGE_SIZE + 100)
            .map(|i| (i % 251 + 1) as u8)
            .collect();
        let file = TempFile::new("dense");
        assert_eq!(
            write_memory(&file.file, &[&data]).unwrap(),
            data.len() as u64
        );
        let mut back = vec![0u8; data.len()];
        read_memory(&file.file, &mut [&mut back], data.len() as u64).unwrap();
        assert!(back == data);
    }

    #[test]
    fn length_mismatch() {
        let file = TempFile::new("short");
        write_memory(&file.file, &[&[1u8; 8192]]).unwrap();
        let mut back = vec![0u8; 16384];
        let err = read_memory(&file.file, &mut [&mut back], 16384).unwrap_err();
        assert_eq!(
            err.to_string(),
            "memory file is 8192 bytes, the state says 16384"
        );
        let err = read_memory(&file.file, &mut [&mut back], 8192).unwrap_err();
        assert!(
            matches!(err, MemoryFileError::RegionsMismatch { .. }),
            "{err}"
        );
    }
}
