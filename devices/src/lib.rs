//! Device models for hospes guests: legacy platform devices and virtio devices.
//!
//! Nothing here calls KVM or touches the network stack beyond a TAP file descriptor: a
//! device sees guest memory, register accesses at offsets relative to its own base, and
//! `EventFd`s that the VMM wires to KVM (irqfd, ioeventfd).
#![deny(missing_docs)]

pub mod legacy;
pub mod virtio;

/// Guest memory as every device sees it: mmap-backed, with a dirty bitmap so that live
/// migration sees the writes the VMM makes on the guest's behalf.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;

/// A device on an MMIO or PIO bus; offsets are relative to the device's base.
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}
