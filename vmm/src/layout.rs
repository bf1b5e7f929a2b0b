//! The x86_64 guest physical address map: where hospes puts RAM, boot structures and devices.
//!
//! ```text
//! 0x0000_0500  GDT                    0x0000_7000  zero page (boot_params)
//! 0x0000_9000  page tables (PML4, PDPT, PD: 1 GiB identity map with 2 MiB pages)
//! 0x0002_0000  kernel command line    0x0009_fc00  EBDA..1 MiB: reserved, ACPI at 0xe_0000
//! 0x0010_0000  kernel (bzImage protected-mode code / vmlinux segments)
//!              initrd: as high as possible below the kernel's initrd_addr_max
//! 0xc000_0000  MMIO hole: virtio-mmio windows from 0xd000_0000, IOAPIC, LAPIC
//! 0x1_0000_0000 RAM above 3 GiB, when memory_mib > 3072
//! ```

use vm_memory::GuestAddress;

/// GDT for the 64-bit boot entry.
pub const BOOT_GDT_START: GuestAddress = GuestAddress(0x500);
/// Zero page (`struct boot_params`) handed to the kernel in RSI.
pub const ZERO_PAGE_START: GuestAddress = GuestAddress(0x7000);
/// PML4 of the boot page tables; the PDPT and PD follow in the next two pages.
pub const PML4_START: GuestAddress = GuestAddress(0x9000);
/// Boot stack pointer (grows down below the page tables).
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Kernel command line.
pub const CMDLINE_START: GuestAddress = GuestAddress(0x20000);
/// Longest command line hospes writes (the kernel's own limit is in the setup header).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the Extended BIOS Data Area: usable RAM ends here in the first MiB.
pub const EBDA_START: u64 = 0x9fc00;
/// The RSDP: in the BIOS area the kernel scans, and also passed in boot_params.
pub const RSDP_START: GuestAddress = GuestAddress(0xe_0000);
/// End of the ACPI tables area (exclusive).
pub const ACPI_END: u64 = 0x10_0000;
/// Where the kernel is loaded.
pub const HIMEM_START: GuestAddress = GuestAddress(0x10_0000);

/// Start of the 32-bit MMIO hole; RAM beyond this continues at 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole.
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// First virtio-mmio window; each device has one 4 KiB window.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Size of one virtio-mmio window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// The IOAPIC's MMIO base (KVM's in-kernel IOAPIC).
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// The local APICs' MMIO base.
pub const APIC_START: u64 = 0xfee0_0000;
/// KVM's TSS needs three pages of guest physical address space outside RAM.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;

/// COM1 UART.
pub const COM1_PORT: u16 = 0x3f8;
/// COM1's interrupt line (ISA IRQ 4, identity-mapped to GSI 4).
pub const COM1_GSI: u32 = 4;
/// i8042 data port; the command port is at +4.
pub const I8042_PORT: u16 = 0x60;
/// The ACPI sleep-control / reset register port (see devices::legacy::AcpiPower).
pub const ACPI_POWER_PORT: u16 = 0x600;
/// First GSI handed to virtio devices (above the ISA range, below the IOAPIC's 24 pins).
pub const VIRTIO_GSI_START: u32 = 5;
/// Pins on KVM's in-kernel IOAPIC.
pub const IOAPIC_PINS: u32 = 24;

/// The RAM ranges for a guest of `size` bytes: below the MMIO hole, then above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    if size <= MMIO_HOLE_START {
        vec![(GuestAddress(0), size)]
    } else {
        vec![
            (GuestAddress(0), MMIO_HOLE_START),
            (GuestAddress(MMIO_HOLE_END), size - MMIO_HOLE_START),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_skips_the_mmio_hole() {
        assert_eq!(ram_ranges(256 << 20), vec![(GuestAddress(0), 256 << 20)]);
        let big = ram_ranges(4 << 30);
        assert_eq!(big[0], (GuestAddress(0), MMIO_HOLE_START));
        assert_eq!(
            big[1],
            (GuestAddress(MMIO_HOLE_END), (4 << 30) - MMIO_HOLE_START)
        );
    }
}
