//! Dirty guest pages for pre-copy migration: KVM's dirty log (what the vCPUs wrote) merged
//! with vm-memory's bitmap (what hospes itself wrote into guest memory: virtio-blk reads,
//! virtio-net receive, used rings), which KVM does not see.
//!
//! Order, and why: the vm-memory bitmap is reset before KVM's logging is switched on, so
//! that nothing written in between is lost; each [`DirtyLog::collect`] then takes KVM's
//! log first (`KVM_GET_DIRTY_LOG` also clears it and write-protects the pages again) and
//! the VMM's bitmap second. A page written during the collection shows up in this round
//! or the next, never in neither.

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::MemoryError;

/// Size of a tracked page.
pub const PAGE_SIZE: u64 = 4096;

/// Dirty pages of one region: bit `i` of `bitmap` (u64 words, bit 0 first) is the page at
/// `gpa + i * PAGE_SIZE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyRegion {
    /// Guest-physical start of the region.
    pub gpa: u64,
    /// Size of the region in bytes.
    pub size: u64,
    /// One bit per page.
    pub bitmap: Vec<u64>,
}

impl DirtyRegion {
    /// Guest-physical addresses of the dirty pages, in order.
    pub fn pages(&self) -> impl Iterator<Item = u64> + '_ {
        devices::virtio::set_bits(&self.bitmap).map(move |i| self.gpa + i * PAGE_SIZE)
    }

    /// How many pages are dirty.
    pub fn count(&self) -> u64 {
        self.bitmap.iter().map(|w| u64::from(w.count_ones())).sum()
    }
}

/// Dirty logging switched on for every memory slot of a VM.
#[derive(Debug)]
pub struct DirtyLog {
    /// (slot, gpa, size, host address) per region, in slot order.
    slots: Vec<(u32, u64, u64, u64)>,
}

fn slots(mem: &devices::GuestMemoryMmap) -> Result<Vec<(u32, u64, u64, u64)>, MemoryError> {
    let mut out = Vec::new();
    for (slot, region) in mem.iter().enumerate() {
        let gpa = region.start_addr().0;
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| MemoryError::Region {
                addr: gpa,
                reason: e.to_string(),
            })?;
        out.push((slot as u32, gpa, region.len(), host as u64));
    }
    Ok(out)
}

fn set_flags(vm: &VmFd, slots: &[(u32, u64, u64, u64)], flags: u32) -> Result<(), MemoryError> {
    for &(slot, gpa, size, host) in slots {
        let region = kvm_userspace_memory_region {
            slot,
            flags,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: host,
        };
        // SAFETY: the same slot, range and mapping `memory::register_with_kvm` registered;
        // only the flags change. The mapping lives as long as the VM.
        unsafe { vm.set_user_memory_region(region) }.map_err(|source| MemoryError::Slot {
            slot,
            addr: gpa,
            source,
        })?;
    }
    Ok(())
}

fn vmm_bitmap(region: &vm_memory::GuestRegionMmap<AtomicBitmap>) -> &AtomicBitmap {
    std::ops::Deref::deref(region).bitmap()
}

impl DirtyLog {
    /// Switches dirty logging on (module documentation for the order).
    pub fn start(vm: &VmFd, mem: &devices::GuestMemoryMmap) -> Result<DirtyLog, MemoryError> {
        for region in mem.iter() {
            vmm_bitmap(region).reset();
        }
        let slots = slots(mem)?;
        set_flags(vm, &slots, KVM_MEM_LOG_DIRTY_PAGES)?;
        Ok(DirtyLog { slots })
    }

    /// The pages dirtied since `start` or the previous call, per region.
    pub fn collect(
        &self,
        vm: &VmFd,
        mem: &devices::GuestMemoryMmap,
    ) -> Result<Vec<DirtyRegion>, MemoryError> {
        let mut out = Vec::with_capacity(self.slots.len());
        for (&(slot, gpa, size, _), region) in self.slots.iter().zip(mem.iter()) {
            let mut bitmap =
                vm.get_dirty_log(slot, size as usize)
                    .map_err(|source| MemoryError::Slot {
                        slot,
                        addr: gpa,
                        source,
                    })?;
            merge(&mut bitmap, &vmm_bitmap(region).get_and_reset());
            out.push(DirtyRegion { gpa, size, bitmap });
        }
        Ok(out)
    }

    /// Switches dirty logging off again (after a failed migration, say).
    pub fn stop(self, vm: &VmFd) -> Result<(), MemoryError> {
        set_flags(vm, &self.slots, 0)
    }
}

/// ORs `other` into `into`; a shorter side counts as clean.
pub(crate) fn merge(into: &mut Vec<u64>, other: &[u64]) {
    if into.len() < other.len() {
        into.resize(other.len(), 0);
    }
    for (a, b) in into.iter_mut().zip(other) {
        *a |= b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn merging_keeps_both_sides() {
        let mut a = vec![0b0101, 0];
        merge(&mut a, &[0b0011, 1 << 63, 7]);
        assert_eq!(a, vec![0b0111, 1 << 63, 7]);
    }

    #[test]
    fn pages_lists_dirty_addresses_in_order() {
        let r = DirtyRegion {
            gpa: 0x10_0000,
            size: 128 * PAGE_SIZE,
            bitmap: vec![0b1001, 1],
        };
        assert_eq!(
            r.pages().collect::<Vec<_>>(),
            vec![
                0x10_0000,
                0x10_0000 + 3 * PAGE_SIZE,
                0x10_0000 + 64 * PAGE_SIZE
            ]
        );
        assert_eq!(r.count(), 3);
    }

    #[test]
    fn hospes_own_writes_are_in_the_vmm_bitmap() {
        let mem = crate::memory::create_guest_memory(16 << 20).unwrap();
        let region = mem.iter().next().unwrap();
        vmm_bitmap(region).reset();
        mem.write_obj(1u64, GuestAddress(5 * PAGE_SIZE + 8))
            .unwrap();
        let words = vmm_bitmap(region).get_and_reset();
        assert_eq!(
            devices::virtio::set_bits(&words).collect::<Vec<_>>(),
            vec![5]
        );
        assert!(vmm_bitmap(region).get_and_reset().iter().all(|&w| w == 0));
    }
}
