//! Helpers for unit tests: guest memory, descriptors, and a mock driver that brings a
//! transport up through its registers and posts chains with virtio-queue's mock rings.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::{Descriptor, VirtqUsedElem};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use snapshot::VirtioTransportState;

use super::mmio::{MmioError, MmioTransport};
use super::status::{ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK};
use super::VirtioDevice;
use crate::{BusDevice, GuestMemoryMmap};

/// Guest RAM for tests: two adjacent 8 MiB regions, so buffers can straddle regions.
pub(crate) const REGION_SIZE: u64 = 8 << 20;
/// Where test queues start; queue `i` is at `QUEUE_BASE + i * QUEUE_STRIDE`.
const QUEUE_BASE: u64 = 0x1_0000;
const QUEUE_STRIDE: u64 = 0x1_0000;
/// First address for test data buffers.
pub(crate) const DATA_BASE: u64 = 0x10_0000;

pub(crate) fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), REGION_SIZE as usize),
        (GuestAddress(REGION_SIZE), REGION_SIZE as usize),
    ])
    .unwrap()
}

pub(crate) fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags, next))
}

/// Whether the page holding `addr` is marked dirty.
pub(crate) fn is_dirty(mem: &GuestMemoryMmap, addr: u64) -> bool {
    let region = mem.find_region(GuestAddress(addr)).unwrap();
    let offset = addr - region.start_addr().0;
    let bitmap: &vm_memory::bitmap::AtomicBitmap = std::ops::Deref::deref(region).bitmap();
    bitmap.is_addr_set(offset as usize)
}

pub(crate) fn clear_dirty(mem: &GuestMemoryMmap) {
    for region in mem.iter() {
        let bitmap: &vm_memory::bitmap::AtomicBitmap = std::ops::Deref::deref(region).bitmap();
        bitmap.reset();
    }
}

/// A buffer of a chain: guest address, length, device-writable.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Buf {
    pub(crate) addr: u64,
    pub(crate) len: u32,
    pub(crate) writable: bool,
}

pub(crate) fn ro(addr: u64, len: u32) -> Buf {
    Buf {
        addr,
        len,
        writable: false,
    }
}

pub(crate) fn wo(addr: u64, len: u32) -> Buf {
    Buf {
        addr,
        len,
        writable: true,
    }
}

/// The driver side of one device: its transport, irqfd and mock rings.
pub(crate) struct TestDriver<'m> {
    pub(crate) mem: &'m GuestMemoryMmap,
    pub(crate) transport: Arc<Mutex<MmioTransport>>,
    pub(crate) irq: EventFd,
    pub(crate) queues: Vec<MockSplitQueue<'m, GuestMemoryMmap>>,
    next_desc: Vec<u16>,
}

impl<'m> TestDriver<'m> {
    pub(crate) fn new(mem: &'m GuestMemoryMmap, device: Box<dyn VirtioDevice + Send>) -> Self {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let transport = MmioTransport::new(mem.clone(), device, irq.try_clone().unwrap()).unwrap();
        TestDriver {
            mem,
            transport: Arc::new(Mutex::new(transport)),
            irq,
            queues: Vec::new(),
            next_desc: Vec::new(),
        }
    }

    /// Saves the transport, drops it with its device (releasing e.g. a disk lock), and
    /// restores the state into a fresh transport around `device()`. The driver side (the
    /// rings in guest memory) carries on as it was.
    pub(crate) fn save_and_restore(
        self,
        device: impl FnOnce() -> Box<dyn VirtioDevice + Send>,
    ) -> Result<Self, MmioError> {
        let state = self.t().save_state();
        self.restore(&state, device)
    }

    /// Drops the transport and restores `state` into a fresh one around `device()`.
    pub(crate) fn restore(
        self,
        state: &VirtioTransportState,
        device: impl FnOnce() -> Box<dyn VirtioDevice + Send>,
    ) -> Result<Self, MmioError> {
        let TestDriver {
            mem,
            transport,
            irq,
            queues,
            next_desc,
        } = self;
        drop(transport);
        drop(irq);
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let transport =
            MmioTransport::restore(mem.clone(), device(), irq.try_clone().unwrap(), state)?;
        Ok(TestDriver {
            mem,
            transport: Arc::new(Mutex::new(transport)),
            irq,
            queues,
            next_desc,
        })
    }

    pub(crate) fn t(&self) -> MutexGuard<'_, MmioTransport> {
        self.transport.lock().unwrap()
    }

    pub(crate) fn read(&mut self, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        self.t().read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    pub(crate) fn write(&mut self, offset: u64, value: u32) {
        self.t().write(offset, &value.to_le_bytes());
    }

    /// Processes queue `q` as the VMM thread would after its ioeventfd fired.
    pub(crate) fn process(&self, q: usize) {
        self.t().process_queue(q);
    }

    pub(crate) fn device_features(&mut self) -> u64 {
        self.write(0x14, 0);
        let low = self.read(0x10);
        self.write(0x14, 1);
        let high = self.read(0x10);
        u64::from(low) | (u64::from(high) << 32)
    }

    /// ACKNOWLEDGE, DRIVER, features, FEATURES_OK; returns the status read back.
    pub(crate) fn negotiate(&mut self, features: u64) -> u32 {
        self.write(0x70, ACKNOWLEDGE);
        self.write(0x70, ACKNOWLEDGE | DRIVER);
        self.write(0x24, 0);
        self.write(0x20, features as u32);
        self.write(0x24, 1);
        self.write(0x20, (features >> 32) as u32);
        self.write(0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        self.read(0x70)
    }

    /// Lays out queue `index` with `size` entries in guest memory and programs it.
    pub(crate) fn setup_queue(&mut self, index: u32, size: u16) {
        let base = GuestAddress(QUEUE_BASE + u64::from(index) * QUEUE_STRIDE);
        let vq = MockSplitQueue::create(self.mem, base, size);
        self.write(0x30, index);
        self.write(0x38, u32::from(size));
        for (low, addr) in [
            (0x80, vq.desc_table_addr()),
            (0x90, vq.avail_addr()),
            (0xa0, vq.used_addr()),
        ] {
            self.write(low, addr.0 as u32);
            self.write(low + 4, (addr.0 >> 32) as u32);
        }
        self.write(0x44, 1);
        let index = index as usize;
        if index < self.queues.len() {
            self.queues[index] = vq;
            self.next_desc[index] = 0;
        } else {
            assert_eq!(index, self.queues.len(), "set queues up in order");
            self.queues.push(vq);
            self.next_desc.push(0);
        }
    }

    /// Negotiates `features`, sets up queues of `size`, and sets DRIVER_OK.
    pub(crate) fn bring_up(&mut self, features: u64, queues: u32, size: u16) {
        let status = self.negotiate(features);
        assert_eq!(status & FEATURES_OK, FEATURES_OK, "features refused");
        for i in 0..queues {
            self.setup_queue(i, size);
        }
        self.write(0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        assert_eq!(
            self.read(0x70),
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK
        );
    }

    /// Posts one chain of `bufs` on queue `q`; returns its head index.
    pub(crate) fn add_chain(&mut self, q: usize, bufs: &[Buf]) -> u16 {
        let mut start = self.next_desc[q];
        // Wrap around; tests complete earlier chains before reusing their descriptors.
        if usize::from(start) + bufs.len() > usize::from(self.queue_len(q)) {
            start = 0;
        }
        let descs: Vec<RawDescriptor> = bufs
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let last = i + 1 == bufs.len();
                let mut flags = if b.writable { VRING_DESC_F_WRITE } else { 0 };
                if !last {
                    flags |= VRING_DESC_F_NEXT;
                }
                desc(b.addr, b.len, flags as u16, start + i as u16 + 1)
            })
            .collect();
        self.add_raw(q, &descs, start);
        self.next_desc[q] = start + bufs.len() as u16;
        start
    }

    /// Writes raw descriptors at table index `at` and publishes the chains they form.
    pub(crate) fn add_raw(&mut self, q: usize, descs: &[RawDescriptor], at: u16) {
        self.queues[q].add_desc_chains(descs, at).unwrap();
    }

    pub(crate) fn used_idx(&self, q: usize) -> u16 {
        self.queues[q].used().idx().load()
    }

    pub(crate) fn used_elem(&self, q: usize, i: u16) -> VirtqUsedElem {
        let len = self.queue_len(q);
        self.queues[q]
            .used()
            .ring()
            .ref_at(usize::from(i % len))
            .unwrap()
            .load()
    }

    fn queue_len(&self, q: usize) -> u16 {
        let table = self.queues[q].desc_table().total_size();
        (table / 16) as u16
    }

    /// Sets the avail ring's `used_event` (EVENT_IDX) of queue `q`.
    pub(crate) fn set_used_event(&mut self, q: usize, value: u16) {
        let len = u64::from(self.queue_len(q));
        let addr = self.queues[q].avail_addr().0 + 4 + 2 * len;
        self.mem.write_obj(value, GuestAddress(addr)).unwrap();
    }

    /// The device's `avail_event` of queue `q`.
    pub(crate) fn avail_event(&self, q: usize) -> u16 {
        let len = u64::from(self.queue_len(q));
        let addr = self.queues[q].used_addr().0 + 4 + 8 * len;
        self.mem.read_obj(GuestAddress(addr)).unwrap()
    }

    /// How many times the irqfd fired since the last call.
    pub(crate) fn interrupts(&self) -> u64 {
        self.irq.read().unwrap_or(0)
    }
}

/// A file in the system temp dir, removed on drop.
pub(crate) struct TempFile {
    pub(crate) path: PathBuf,
}

impl TempFile {
    pub(crate) fn new(contents: &[u8]) -> TempFile {
        Self::new_in(&std::env::temp_dir(), contents)
    }

    pub(crate) fn new_in(dir: &Path, contents: &[u8]) -> TempFile {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!(
            "hospes-devices-test-{}-{n}.img",
            std::process::id()
        ));
        std::fs::write(&path, contents).unwrap();
        TempFile { path }
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
