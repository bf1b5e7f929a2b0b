//! ACPI tables: RSDP, XSDT, a hardware-reduced FADT, MADT and the DSDT that describes the
//! guest's devices.
//!
//! Stock distribution kernels build virtio-mmio as a module without
//! `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`, so the `virtio_mmio.device=` command line does not
//! reach them. They do bind `LNRO0005` devices found in the DSDT, so every virtio-mmio
//! window is described there with its MMIO range and its (edge, active-high) interrupt.
//!
//! The FADT is hardware-reduced: no PM1 blocks, no SCI, no legacy PIC or PIT timer setup in
//! the guest. Power-off and reset go through the FADT's sleep-control and reset registers,
//! both on the one-byte port that `devices::legacy::AcpiPower` models.

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};
use devices::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};

use crate::layout::*;

const OEM_ID: [u8; 6] = *b"HOSPES";
const OEM_TABLE_ID: [u8; 8] = *b"HOSPESVM";
const OEM_REVISION: u32 = 1;
/// IA-PC boot architecture flags: no VGA (bit 2), no CMOS RTC (bit 5). No 8042 flag: the
/// kernel then does not probe a PS/2 controller (ours only has the reset line).
const IAPC_BOOT_ARCH: u16 = (1 << 2) | (1 << 5);

/// Errors writing the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The tables do not fit between the RSDP and 1 MiB.
    #[error(
        "ACPI tables need {size} bytes from {start:#x}, beyond the area that ends at {end:#x}"
    )]
    TooLarge {
        /// Bytes needed.
        size: u64,
        /// Where they start.
        start: u64,
        /// The end of the ACPI area.
        end: u64,
    },
    /// A table could not be written to guest memory.
    #[error("writing ACPI table {table} at {addr:#x}: {source}")]
    Write {
        /// The table signature.
        table: &'static str,
        /// Guest address.
        addr: u64,
        /// vm-memory's error.
        source: vm_memory::GuestMemoryError,
    },
}

/// One virtio-mmio window as the DSDT describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioMmioSlot {
    /// MMIO base (4 KiB window).
    pub base: u64,
    /// IOAPIC pin / GSI.
    pub gsi: u32,
}

/// The machine the tables describe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiMachine {
    /// Number of vCPUs (one local APIC each, APIC id = index).
    pub vcpus: u32,
    /// virtio-mmio devices, in the order the guest should number them.
    pub virtio: Vec<VirtioMmioSlot>,
}

/// The DSDT's AML: COM1, the S5 sleep package, and one LNRO0005 device per virtio window.
pub fn dsdt(machine: &AcpiMachine) -> Vec<u8> {
    let mut body = Vec::new();
    // COM1: a 16550 at 0x3f8, ISA IRQ 4.
    aml::Device::new(
        "_SB_.COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::IO::new(COM1_PORT, COM1_PORT, 1, 8),
                    &aml::Interrupt::new(true, true, false, false, COM1_GSI),
                ]),
            ),
        ],
    )
    .to_aml_bytes(&mut body);

    // \_S5_: SLP_TYPa = 5, matching what devices::legacy::AcpiPower accepts.
    aml::Name::new("_S5_".into(), &aml::Package::new(vec![&5u8])).to_aml_bytes(&mut body);

    for (i, slot) in machine.virtio.iter().enumerate() {
        let hid: &'static str = "LNRO0005";
        aml::Device::new(
            format!("_SB_.V{i:03X}").as_str().into(),
            vec![
                &aml::Name::new("_HID".into(), &hid),
                &aml::Name::new("_UID".into(), &(i as u32)),
                &aml::Name::new("_CCA".into(), &aml::ONE),
                &aml::Name::new(
                    "_CRS".into(),
                    &aml::ResourceTemplate::new(vec![
                        &aml::Memory32Fixed::new(true, slot.base as u32, VIRTIO_MMIO_SIZE as u32),
                        &aml::Interrupt::new(true, true, false, false, slot.gsi),
                    ]),
                ),
            ],
        )
        .to_aml_bytes(&mut body);
    }

    let mut table = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    table.append_slice(&body);
    table.as_slice().to_vec()
}

/// The FADT, pointing at the DSDT.
pub fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let port = |addr: u16| {
        GAS::new(
            AddressSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            u64::from(addr),
        )
    };
    let mut b = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    b.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    b.reset_reg = port(ACPI_POWER_PORT);
    b.reset_value = devices::legacy::ACPI_RESET_VALUE;
    b.sleep_control_reg = port(ACPI_POWER_PORT);
    b.sleep_status_reg = port(ACPI_POWER_PORT);
    b.hypervisor_vendor_identity = u64::from_le_bytes(*b"HOSPES\0\0").into();
    let mut out = Vec::new();
    b.finalize().to_aml_bytes(&mut out);
    out
}

/// The MADT: one enabled local APIC per vCPU and KVM's IOAPIC with GSI base 0.
pub fn madt(vcpus: u32) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(APIC_START as u32),
    );
    for id in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(
            id as u8,
            id as u8,
            EnabledStatus::Enabled,
        ));
    }
    madt.add_structure(IoApic::new(0, IOAPIC_START as u32, 0));
    let mut out = Vec::new();
    madt.to_aml_bytes(&mut out);
    out
}

/// Writes all tables into guest memory from `layout::RSDP_START`; returns the RSDP address.
pub fn write_tables(
    mem: &GuestMemoryMmap,
    machine: &AcpiMachine,
) -> Result<GuestAddress, AcpiError> {
    // Layout: RSDP, then DSDT, FADT, MADT, XSDT, each 16-byte aligned. The XSDT goes last
    // because it lists the others' addresses.
    let align = |x: u64| x.next_multiple_of(16);
    let rsdp_addr = RSDP_START.0;
    let dsdt_addr = align(rsdp_addr + Rsdp::len() as u64);
    let dsdt = dsdt(machine);
    let fadt_addr = align(dsdt_addr + dsdt.len() as u64);
    let fadt = fadt(dsdt_addr);
    let madt_addr = align(fadt_addr + fadt.len() as u64);
    let madt = madt(machine.vcpus);
    let xsdt_addr = align(madt_addr + madt.len() as u64);
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let mut xsdt_bytes = Vec::new();
    xsdt.to_aml_bytes(&mut xsdt_bytes);
    let end = xsdt_addr + xsdt_bytes.len() as u64;
    if end > ACPI_END {
        return Err(AcpiError::TooLarge {
            size: end - rsdp_addr,
            start: rsdp_addr,
            end: ACPI_END,
        });
    }
    let mut rsdp = Vec::new();
    Rsdp::new(OEM_ID, xsdt_addr).to_aml_bytes(&mut rsdp);
    for (table, addr, bytes) in [
        ("RSDP", rsdp_addr, &rsdp),
        ("DSDT", dsdt_addr, &dsdt),
        ("FACP", fadt_addr, &fadt),
        ("APIC", madt_addr, &madt),
        ("XSDT", xsdt_addr, &xsdt_bytes),
    ] {
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|source| AcpiError::Write {
                table,
                addr,
                source,
            })?;
    }
    Ok(RSDP_START)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;
    use std::process::Command;

    fn machine() -> AcpiMachine {
        AcpiMachine {
            vcpus: 2,
            virtio: vec![
                VirtioMmioSlot {
                    base: VIRTIO_MMIO_START,
                    gsi: 5,
                },
                VirtioMmioSlot {
                    base: VIRTIO_MMIO_START + 0x1000,
                    gsi: 6,
                },
            ],
        }
    }

    fn checksum_ok(t: &[u8]) -> bool {
        t.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    #[test]
    fn tables_have_valid_headers_and_checksums() {
        for (sig, t) in [
            (b"DSDT", dsdt(&machine())),
            (b"FACP", fadt(0xe0040)),
            (b"APIC", madt(2)),
        ] {
            assert_eq!(&t[..4], sig);
            assert_eq!(
                u32::from_le_bytes(t[4..8].try_into().unwrap()) as usize,
                t.len()
            );
            assert!(checksum_ok(&t), "{} checksum", String::from_utf8_lossy(sig));
        }
        // MADT: header (44) + 2 local APICs (8 each) + IOAPIC (12).
        assert_eq!(madt(2).len(), 44 + 16 + 12);
        let d = dsdt(&machine());
        let find = |needle: &[u8]| d.windows(needle.len()).any(|w| w == needle);
        assert!(
            find(b"LNRO0005") && find(b"V000") && find(b"V001") && find(b"_S5_") && find(b"COM1")
        );
    }

    #[test]
    fn tables_land_in_guest_memory_with_a_valid_rsdp() {
        let mem = create_guest_memory(64 << 20).unwrap();
        let rsdp = write_tables(&mem, &machine()).unwrap();
        let mut buf = [0u8; 36];
        mem.read_slice(&mut buf, rsdp).unwrap();
        assert_eq!(&buf[..8], b"RSD PTR ");
        assert!(checksum_ok(&buf[..20]) && checksum_ok(&buf));
        let xsdt = u64::from_le_bytes(buf[24..32].try_into().unwrap());
        let mut sig = [0u8; 4];
        mem.read_slice(&mut sig, GuestAddress(xsdt)).unwrap();
        assert_eq!(&sig, b"XSDT");
    }

    /// The tables disassemble with ACPICA's `iasl -d` without errors.
    #[test]
    fn iasl_disassembles_the_tables() {
        let dir = std::env::temp_dir().join(format!("hospes-acpi-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (name, t) in [
            ("dsdt", dsdt(&machine())),
            ("facp", fadt(0xe0040)),
            ("apic", madt(2)),
        ] {
            let file = dir.join(format!("{name}.dat"));
            std::fs::write(&file, &t).unwrap();
            let out = Command::new("iasl")
                .arg("-d")
                .arg(&file)
                .current_dir(&dir)
                .output()
                .expect(
                    "iasl (Debian package acpica-tools) must be installed; .ci/run installs it",
                );
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(out.status.success(), "iasl -d {name}: {text}");
            assert!(
                !text.contains("Error") && !text.contains("Invalid"),
                "iasl -d {name}: {text}"
            );
            let dsl = std::fs::read_to_string(dir.join(format!("{name}.dsl"))).unwrap();
            if name == "dsdt" {
                assert!(
                    dsl.contains("LNRO0005")
                        && dsl.contains("Memory32Fixed")
                        && dsl.contains("0xD0001000"),
                    "{dsl}"
                );
            }
            if name == "facp" {
                assert!(dsl.contains("Hardware Reduced (V5) : 1"), "{dsl}");
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
