//! Which blocks of a disk image the guest wrote since the last look: the block-granular
//! dirty bitmap pre-copy migration sends disks by. Always on: a write request costs one
//! atomic OR per 4 KiB block it touches.

use std::sync::atomic::{AtomicU64, Ordering};

/// Granularity of the bitmap, in bytes: the migration wire protocol's block size, so a
/// dirty bit is exactly one block on the wire.
pub const DIRTY_BLOCK_SIZE: u64 = 4 << 10;

/// One bit per [`DIRTY_BLOCK_SIZE`] block of a disk.
#[derive(Debug)]
pub struct DiskDirty {
    words: Vec<AtomicU64>,
    blocks: u64,
}

impl DiskDirty {
    /// A clean bitmap for a disk of `disk_bytes`.
    pub fn new(disk_bytes: u64) -> DiskDirty {
        let blocks = disk_bytes.div_ceil(DIRTY_BLOCK_SIZE);
        DiskDirty {
            words: (0..blocks.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            blocks,
        }
    }

    /// Blocks the disk has.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Marks the blocks `offset..offset + len` touches. Bytes past the disk's end are
    /// ignored (the write that carried them failed).
    pub fn mark(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset / DIRTY_BLOCK_SIZE;
        let last = (offset.saturating_add(len) - 1) / DIRTY_BLOCK_SIZE;
        for block in first..=last.min(self.blocks.saturating_sub(1)) {
            self.words[(block / 64) as usize].fetch_or(1 << (block % 64), Ordering::Relaxed);
        }
    }

    /// The dirty blocks since the previous call (or creation), and a clean bitmap.
    pub fn take(&self) -> Vec<u64> {
        self.words
            .iter()
            .map(|w| w.swap(0, Ordering::Relaxed))
            .collect()
    }

    /// Marks every block dirty (round 0 of a migration sends the whole disk).
    pub fn mark_all(&self) {
        self.mark(0, self.blocks * DIRTY_BLOCK_SIZE);
    }
}

/// The indices of the set bits of `bitmap`, in order.
pub fn set_bits(bitmap: &[u64]) -> impl Iterator<Item = u64> + '_ {
    bitmap.iter().enumerate().flat_map(|(i, &word)| {
        let mut w = word;
        std::iter::from_fn(move || {
            if w == 0 {
                return None;
            }
            let bit = w.trailing_zeros();
            w &= w - 1;
            Some(i as u64 * 64 + u64::from(bit))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_every_block_a_write_touches_and_take_clears() {
        let d = DiskDirty::new(256 * DIRTY_BLOCK_SIZE);
        assert_eq!(d.blocks(), 256);
        d.mark(0, 512);
        d.mark(DIRTY_BLOCK_SIZE - 512, 1024); // straddles blocks 0 and 1
        d.mark(100 * DIRTY_BLOCK_SIZE + 7, 1);
        d.mark(255 * DIRTY_BLOCK_SIZE, 10 * DIRTY_BLOCK_SIZE); // runs past the end
        let taken = d.take();
        assert_eq!(set_bits(&taken).collect::<Vec<_>>(), vec![0, 1, 100, 255]);
        assert_eq!(set_bits(&d.take()).count(), 0);
        d.mark_all();
        assert_eq!(set_bits(&d.take()).count(), 256);
    }

    #[test]
    fn a_partial_last_block_counts() {
        let d = DiskDirty::new(DIRTY_BLOCK_SIZE + 512);
        assert_eq!(d.blocks(), 2);
        d.mark(DIRTY_BLOCK_SIZE, 512);
        assert_eq!(set_bits(&d.take()).collect::<Vec<_>>(), vec![1]);
    }
}
