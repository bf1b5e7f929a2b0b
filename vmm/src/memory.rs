//! Guest RAM: anonymous memory, 2 MiB aligned and advised for transparent huge pages, with
//! a dirty bitmap per region (the VMM's own writes), registered with KVM as memory slots;
//! and which of its pages were ever populated (`/proc/self/pagemap`).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use devices::GuestMemoryMmap;
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

use crate::layout::ram_ranges;

/// Huge-page size the host's THP uses on x86_64.
const HUGE_PAGE: usize = 2 << 20;
/// Granularity of the VMM-side dirty bitmap.
pub const PAGE_SIZE: usize = 4096;

/// Errors setting up guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// mmap of the guest RAM failed.
    #[error("cannot map {size} bytes of guest RAM: {source}")]
    Mmap {
        /// Bytes requested.
        size: usize,
        /// The OS error.
        source: io::Error,
    },
    /// vm-memory refused the region.
    #[error("guest RAM region at {addr:#x}: {reason}")]
    Region {
        /// Guest physical start.
        addr: u64,
        /// What vm-memory said.
        reason: String,
    },
    /// KVM refused a memory slot.
    #[error("KVM_SET_USER_MEMORY_REGION slot {slot} at {addr:#x}: {source}")]
    Slot {
        /// The slot number.
        slot: u32,
        /// Guest physical start.
        addr: u64,
        /// The KVM error.
        source: kvm_ioctls::Error,
    },
}

/// Maps `size` bytes of anonymous memory at a 2 MiB-aligned address and advises THP.
///
/// Guest RAM that is not 2 MiB-aligned cannot be backed by huge pages in its first and last
/// partial huge page; measured in the nested rig, unaligned RAM boots about 20% slower.
fn map_aligned(size: usize) -> Result<*mut u8, MemoryError> {
    let err = |source| MemoryError::Mmap { size, source };
    let reserve = size + HUGE_PAGE;
    // SAFETY: an anonymous private mapping at an address of the kernel's choice; no existing
    // memory is affected. The result is checked below.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            reserve,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(err(io::Error::last_os_error()));
    }
    let start = base as usize;
    let aligned = start.next_multiple_of(HUGE_PAGE);
    let head = aligned - start;
    let tail = reserve - head - size;
    // SAFETY: both ranges lie inside the mapping made above and are not used by anyone; a
    // zero-length munmap is skipped.
    unsafe {
        if head > 0 {
            libc::munmap(base, head);
        }
        if tail > 0 {
            libc::munmap((aligned + size) as *mut libc::c_void, tail);
        }
        // Advice only; failure (THP disabled) just means small pages.
        libc::madvise(aligned as *mut libc::c_void, size, libc::MADV_HUGEPAGE);
    }
    Ok(aligned as *mut u8)
}

/// Allocates guest RAM of `size` bytes laid out as `layout::ram_ranges` says.
pub fn create_guest_memory(size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let mut regions = Vec::new();
    for (addr, len) in ram_ranges(size) {
        let len = len as usize;
        let ptr = map_aligned(len)?;
        let bitmap = AtomicBitmap::new(
            len,
            std::num::NonZeroUsize::new(PAGE_SIZE).expect("page size is not zero"),
        );
        // SAFETY: `ptr` is a fresh private anonymous mapping of exactly `len` bytes, readable
        // and writable, owned by nothing else; MmapRegion takes ownership and unmaps it.
        let builder = unsafe {
            MmapRegionBuilder::new_with_bitmap(len, bitmap)
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
                .with_raw_mmap_pointer(ptr)
        };
        let mapping = builder.build().map_err(|e| MemoryError::Region {
            addr: addr.raw_value(),
            reason: e.to_string(),
        })?;
        let region = GuestRegionMmap::new(mapping, addr).ok_or(MemoryError::Region {
            addr: addr.raw_value(),
            reason: "region end overflows the address space".into(),
        })?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Region {
        addr: 0,
        reason: e.to_string(),
    })
}

/// Registers every region of `mem` with KVM, slot numbers in address order.
pub fn register_with_kvm(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let slot = slot as u32;
        let addr = region.start_addr().raw_value();
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|e| MemoryError::Region {
                addr,
                reason: e.to_string(),
            })?;
        let kvm_region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: addr,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the host range belongs to `mem`'s mapping, which the caller keeps alive for
        // as long as the VM exists (the Vm owns both), and slots do not overlap.
        unsafe { vm.set_user_memory_region(kvm_region) }.map_err(|source| MemoryError::Slot {
            slot,
            addr,
            source,
        })?;
    }
    Ok(())
}

/// One `/proc/self/pagemap` entry per page: bit 63 "present in RAM", bit 62 "swapped".
const PAGEMAP_PRESENT: u64 = 1 << 63;
const PAGEMAP_SWAPPED: u64 = 1 << 62;
/// Pagemap entries read at once (512 KiB of entries, 256 MiB of guest RAM).
const PAGEMAP_BATCH: usize = 64 << 10;

/// The byte ranges `(offset, len)` of the `len` bytes of this process' memory at `host`
/// whose pages are populated: present in RAM or swapped out, in order and merged.
///
/// Guest RAM is private anonymous memory, so a page that is neither was never written by
/// anyone and reads as zeroes. The answer is a moment's view: a page may be populated just
/// after. Callers that need every write use it together with dirty tracking started
/// before the call (migration's round 0 does), which reports such pages later.
pub fn populated_ranges(host: *const u8, len: usize) -> io::Result<Vec<(usize, usize)>> {
    let pagemap = File::open("/proc/self/pagemap")?;
    let first = host as usize / PAGE_SIZE;
    let pages = len.div_ceil(PAGE_SIZE);
    let mut ranges: Vec<(usize, usize)> = Vec::new();
    let mut entries = vec![0u8; PAGEMAP_BATCH.min(pages) * 8];
    let mut done = 0;
    while done < pages {
        let n = (pages - done).min(PAGEMAP_BATCH);
        let buf = &mut entries[..n * 8];
        pagemap.read_exact_at(buf, ((first + done) * 8) as u64)?;
        for (i, entry) in buf.chunks_exact(8).enumerate() {
            let entry = u64::from_le_bytes(entry.try_into().expect("chunks of 8 bytes"));
            if entry & (PAGEMAP_PRESENT | PAGEMAP_SWAPPED) == 0 {
                continue;
            }
            let offset = (done + i) * PAGE_SIZE;
            let size = PAGE_SIZE.min(len - offset);
            match ranges.last_mut() {
                Some((at, l)) if *at + *l == offset => *l += size,
                _ => ranges.push((offset, size)),
            }
        }
        done += n;
    }
    Ok(ranges)
}

/// [`populated_ranges`], or the whole range (with a warning) where `/proc/self/pagemap`
/// cannot be read: then every page is read, which costs time, never correctness.
pub fn populated_or_all(host: *const u8, len: usize) -> Vec<(usize, usize)> {
    populated_ranges(host, len).unwrap_or_else(|e| {
        tracing::warn!("reading every page of guest RAM: /proc/self/pagemap: {e}");
        vec![(0, len)]
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn populated_ranges_cover_what_was_written_and_not_the_rest() {
        let mem = create_guest_memory(64 << 20).unwrap();
        let host = mem.get_host_address(GuestAddress(0)).unwrap();
        assert_eq!(populated_ranges(host, 64 << 20).unwrap(), vec![]);
        mem.write_obj(1u8, GuestAddress(0x1000)).unwrap();
        mem.write_obj(1u8, GuestAddress(40 << 20)).unwrap();
        let ranges = populated_ranges(host, 64 << 20).unwrap();
        let covered = |at: usize| ranges.iter().any(|&(o, l)| (o..o + l).contains(&at));
        assert!(covered(0x1000) && covered(40 << 20), "{ranges:x?}");
        // Each write populates its page, or its huge page with THP: not all of the RAM.
        assert!(
            !covered(20 << 20) && !covered((64 << 20) - 1),
            "{ranges:x?}"
        );
        assert!(ranges.windows(2).all(|w| w[0].0 + w[0].1 < w[1].0));
        // A length that is not a whole number of pages ends where it says.
        let short = populated_ranges(host, 0x1800).unwrap();
        assert_eq!(
            short.last().map(|&(o, l)| o + l),
            Some(0x1800),
            "{short:x?}"
        );
    }

    #[test]
    fn ram_is_huge_page_aligned_and_usable() {
        let mem = create_guest_memory(64 << 20).unwrap();
        let host = mem.get_host_address(GuestAddress(0)).unwrap() as usize;
        assert_eq!(host % HUGE_PAGE, 0);
        mem.write_obj(0xdead_beefu32, GuestAddress(0x1000)).unwrap();
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );
        assert!(mem.write_obj(0u8, GuestAddress(64 << 20)).is_err());
    }
}
