//! Walking a guest's descriptor chain defensively, shared by the block and net devices.
//!
//! virtio-queue's `DescriptorChain` iterator stops silently at a loop (its TTL is the queue
//! size), at a `next` index outside the table, or at an unreadable descriptor. Devices
//! must tell such a truncated chain from a complete one, so they collect it here first.

use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::bitmap::MS;
use vm_memory::volatile_memory::PtrGuard;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryError, VolatileSlice};

use crate::GuestMemoryMmap;

/// Reads every descriptor of `chain` into `descs` (cleared first).
///
/// Fails, with the reason, on an empty chain or one that did not end properly (loop,
/// longer than the queue, `next` out of range, descriptor or indirect table outside
/// guest memory).
pub(crate) fn collect(
    chain: DescriptorChain<&GuestMemoryMmap>,
    descs: &mut Vec<Descriptor>,
) -> Result<(), &'static str> {
    descs.clear();
    descs.extend(chain);
    match descs.last() {
        None => Err("no readable descriptor at its head"),
        Some(last) if last.has_next() => Err(
            "it loops, is longer than the queue, or links to a descriptor outside the table or guest memory",
        ),
        Some(_) => Ok(()),
    }
}

/// Whether the `len` bytes at `addr` are all guest RAM.
pub(crate) fn in_memory(mem: &GuestMemoryMmap, addr: GuestAddress, len: u32) -> bool {
    GuestMemoryBackend::check_range(mem, addr, len as usize)
}

/// Most buffers one `readv`/`writev`/`preadv`/`pwritev` takes (Linux's UIO_MAXIOV); more
/// fail with EINVAL.
pub(crate) const IOV_MAX: usize = 1024;

/// A piece of guest memory as vm-memory hands it out, with its dirty bitmap.
pub(crate) type GuestSlice<'m> = VolatileSlice<'m, MS<'m, GuestMemoryMmap>>;

/// The guest memory behind the buffers `descs`, split at memory region boundaries: what
/// a `preadv`/`pwritev`/`writev` straight from or into guest memory needs.
pub(crate) fn guest_slices<'m>(
    mem: &'m GuestMemoryMmap,
    descs: &[Descriptor],
) -> Result<Vec<GuestSlice<'m>>, GuestMemoryError> {
    let mut slices = Vec::with_capacity(descs.len());
    for d in descs {
        for slice in GuestMemoryBackend::get_slices(mem, d.addr(), d.len() as usize) {
            slices.push(slice?);
        }
    }
    Ok(slices)
}

/// The iovecs of guest memory held by `guards`, for a system call that only reads them
/// (`writev`, `pwritev`); valid while the guards live.
pub(crate) fn iovecs_to_read(guards: &[PtrGuard]) -> Vec<libc::iovec> {
    guards
        .iter()
        .map(|g| libc::iovec {
            iov_base: g.as_ptr().cast_mut().cast(),
            iov_len: g.len(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::{desc, guest_memory};
    use virtio_bindings::virtio_ring::VRING_DESC_F_NEXT;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueOwnedT};

    #[test]
    fn looping_chain_is_rejected() {
        let mem = guest_memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut q: Queue = vq.create_queue().unwrap();
        // 0 -> 1 -> 0 -> ...
        let d0 = desc(0x10000, 16, VRING_DESC_F_NEXT as u16, 1);
        let d1 = desc(0x11000, 16, VRING_DESC_F_NEXT as u16, 0);
        vq.desc_table().store(0, d0).unwrap();
        vq.desc_table().store(1, d1).unwrap();
        vq.avail().ring().ref_at(0).unwrap().store(0);
        vq.avail().idx().store(1);
        let chain = q.iter(&mem).unwrap().next().unwrap();
        let mut descs = Vec::new();
        assert!(collect(chain, &mut descs).is_err());
        assert_eq!(descs.len(), 16, "bounded by the queue size");
    }

    #[test]
    fn next_out_of_table_is_rejected() {
        let mem = guest_memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut q: Queue = vq.create_queue().unwrap();
        let d0: RawDescriptor = desc(0x10000, 16, VRING_DESC_F_NEXT as u16, 200);
        vq.desc_table().store(0, d0).unwrap();
        vq.avail().ring().ref_at(0).unwrap().store(0);
        vq.avail().idx().store(1);
        let chain = q.iter(&mem).unwrap().next().unwrap();
        let mut descs = Vec::new();
        assert!(collect(chain, &mut descs).is_err());
    }

    #[test]
    fn in_memory_checks_bounds() {
        let mem = guest_memory();
        assert!(in_memory(&mem, GuestAddress(0x1000), 0x1000));
        assert!(!in_memory(&mem, GuestAddress(0x1_0000_0000), 1));
        assert!(!in_memory(&mem, GuestAddress(u64::MAX - 2), 16));
    }
}
