//! Boot: the guest memory contents a Linux kernel expects at its 64-bit entry point.
//!
//! Steps, in order (each step's inputs are the previous steps' outputs):
//! 1. Load the kernel: an ELF vmlinux (entry from its header) or a bzImage (its protected
//!    mode code at 1 MiB; entry `startup_64` at load + 0x200). linux-loader does both.
//! 2. Load the initrd as high as the kernel allows (`initrd_addr_max`) in low RAM.
//! 3. Write the command line (hospes' own arguments, then the spec's).
//! 4. Write the zero page: the kernel's setup header, the E820 map, the initrd and cmdline
//!    pointers and the RSDP address (the ACPI tables are written by `acpi`).
//! 5. Write a GDT and identity page tables for the first GiB, so that the vCPU can start
//!    directly in long mode (see `regs`).

use std::fs::File;
use std::path::{Path, PathBuf};

use devices::GuestMemoryMmap;
use linux_loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::{Elf, Error as ElfError};
use linux_loader::loader::{Error as LoaderError, KernelLoader};
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemoryBackend};

use crate::layout::*;

/// E820 type of usable RAM.
const E820_RAM: u32 = 1;
/// E820 type of reserved memory.
const E820_RESERVED: u32 = 2;
/// Offset of `startup_64` from the start of a bzImage's protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// The setup header's magic, "HdrS".
const HDRS_MAGIC: u32 = 0x5372_6448;
/// `type_of_loader` for a boot loader without an assigned id.
const LOADER_UNDEFINED: u8 = 0xff;
/// Where the kernel may place itself when the setup header does not say.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

/// Errors preparing the guest's boot memory.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// A boot file could not be opened or read.
    #[error("cannot read {what} {path}: {source}")]
    Read {
        /// "kernel" or "initrd".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// linux-loader could not load the kernel.
    #[error(
        "cannot load kernel {path} (neither an ELF vmlinux nor a bzImage that fits): {source}"
    )]
    Kernel {
        /// The kernel file.
        path: PathBuf,
        /// linux-loader's error.
        source: LoaderError,
    },
    /// The initrd does not fit in guest RAM.
    #[error(
        "initrd {path} ({size} bytes) does not fit in guest RAM below {max:#x} after the kernel"
    )]
    InitrdTooLarge {
        /// The initrd.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The highest address it could end at.
        max: u64,
    },
    /// The command line is longer than the kernel accepts.
    #[error("kernel command line is {len} bytes; this kernel accepts at most {max}")]
    CmdlineTooLong {
        /// Its length.
        len: usize,
        /// The kernel's limit.
        max: usize,
    },
    /// A write into guest memory failed (memory too small for the boot layout).
    #[error("writing the {what} at {addr:#x} into guest memory: {source}")]
    GuestWrite {
        /// What was written.
        what: &'static str,
        /// Guest address.
        addr: u64,
        /// vm-memory's error.
        source: vm_memory::GuestMemoryError,
    },
}

/// What the vCPU needs to start the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootEntry {
    /// 64-bit entry point.
    pub rip: GuestAddress,
}

/// What to boot.
pub struct BootSource<'a> {
    /// Kernel image.
    pub kernel: &'a Path,
    /// Optional initrd.
    pub initrd: Option<&'a Path>,
    /// The full command line.
    pub cmdline: &'a str,
}

/// Wrapper so the zero page can be written with vm-memory's `Bytes`.
#[derive(Clone, Copy, Default)]
struct BootParams(boot_params);
// SAFETY: boot_params is a plain-old-data C struct (integers and arrays of them) for which
// every bit pattern is valid.
unsafe impl ByteValued for BootParams {}

fn write<T: ByteValued>(
    mem: &GuestMemoryMmap,
    what: &'static str,
    val: T,
    addr: GuestAddress,
) -> Result<(), BootError> {
    mem.write_obj(val, addr)
        .map_err(|source| BootError::GuestWrite {
            what,
            addr: addr.raw_value(),
            source,
        })
}

/// Loads kernel, initrd and command line and writes the zero page, GDT and page tables.
pub fn load(mem: &GuestMemoryMmap, src: &BootSource<'_>) -> Result<BootEntry, BootError> {
    let open = |what, path: &Path| {
        File::open(path).map_err(|source| BootError::Read {
            what,
            path: path.to_path_buf(),
            source,
        })
    };

    // 1. Kernel.
    let mut kernel = open("kernel", src.kernel)?;
    let kernel_err = |source| BootError::Kernel {
        path: src.kernel.to_path_buf(),
        source,
    };
    let (rip, mut header, kernel_end) = match Elf::load(mem, None, &mut kernel, Some(HIMEM_START)) {
        Ok(r) => (r.kernel_load, default_setup_header(), r.kernel_end),
        Err(LoaderError::Elf(ElfError::InvalidElfMagicNumber)) => {
            let r = BzImage::load(mem, None, &mut kernel, Some(HIMEM_START)).map_err(kernel_err)?;
            let header = r.setup_header.unwrap_or_else(default_setup_header);
            (
                r.kernel_load.unchecked_add(BZIMAGE_64BIT_ENTRY_OFFSET),
                header,
                r.kernel_end,
            )
        }
        Err(e) => return Err(kernel_err(e)),
    };
    header.type_of_loader = LOADER_UNDEFINED;

    // 2. Initrd: page aligned, as high as allowed.
    if let Some(path) = src.initrd {
        let mut file = open("initrd", path)?;
        let size = file
            .metadata()
            .map_err(|source| BootError::Read {
                what: "initrd",
                path: path.to_path_buf(),
                source,
            })?
            .len();
        let low_ram_end = mem.last_addr().raw_value().min(MMIO_HOLE_START - 1) + 1;
        let addr_max = match header.initrd_addr_max {
            0 => DEFAULT_INITRD_ADDR_MAX,
            m => u64::from(m),
        };
        let max_end = low_ram_end.min(addr_max + 1);
        let too_large = || BootError::InitrdTooLarge {
            path: path.to_path_buf(),
            size,
            max: max_end,
        };
        let start = max_end.checked_sub(size).ok_or_else(too_large)? & !0xfff;
        if start < kernel_end {
            return Err(too_large());
        }
        mem.read_exact_volatile_from(GuestAddress(start), &mut file, size as usize)
            .map_err(|source| BootError::GuestWrite {
                what: "initrd",
                addr: start,
                source,
            })?;
        header.ramdisk_image = start as u32;
        header.ramdisk_size = size as u32;
    }

    // 3. Command line.
    let max = match header.cmdline_size {
        0 => CMDLINE_MAX_SIZE - 1,
        n => (n as usize).min(CMDLINE_MAX_SIZE - 1),
    };
    if src.cmdline.len() > max {
        return Err(BootError::CmdlineTooLong {
            len: src.cmdline.len(),
            max,
        });
    }
    let mut bytes = src.cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, CMDLINE_START)
        .map_err(|source| BootError::GuestWrite {
            what: "command line",
            addr: CMDLINE_START.raw_value(),
            source,
        })?;
    header.cmd_line_ptr = CMDLINE_START.raw_value() as u32;
    header.cmdline_size = bytes.len() as u32;

    // 4. Zero page.
    let mut params = BootParams::default();
    params.0.hdr = header;
    params.0.acpi_rsdp_addr = RSDP_START.raw_value();
    let e820 = e820_map(mem.last_addr().raw_value() + 1 - mmio_hole_len(mem));
    for (i, entry) in e820.iter().enumerate() {
        params.0.e820_table[i] = *entry;
    }
    params.0.e820_entries = e820.len() as u8;
    write(mem, "zero page", params, ZERO_PAGE_START)?;

    // 5. GDT, IDT and page tables.
    write_gdt_and_page_tables(mem)?;
    Ok(BootEntry { rip })
}

fn mmio_hole_len(mem: &GuestMemoryMmap) -> u64 {
    if mem.last_addr().raw_value() >= MMIO_HOLE_END {
        MMIO_HOLE_END - MMIO_HOLE_START
    } else {
        0
    }
}

/// The setup header hospes supplies when the kernel (an ELF vmlinux) has none.
fn default_setup_header() -> setup_header {
    setup_header {
        boot_flag: 0xaa55,
        header: HDRS_MAGIC,
        kernel_alignment: 0x0100_0000,
        ..Default::default()
    }
}

/// The E820 map for `ram` bytes of RAM laid out by `layout::ram_ranges`.
pub fn e820_map(ram: u64) -> Vec<boot_e820_entry> {
    let entry = |addr: u64, size: u64, r#type: u32| boot_e820_entry { addr, size, r#type };
    let mut map = vec![
        entry(0, EBDA_START, E820_RAM),
        entry(
            EBDA_START,
            HIMEM_START.raw_value() - EBDA_START,
            E820_RESERVED,
        ),
    ];
    for (addr, len) in ram_ranges(ram) {
        let start = addr.raw_value().max(HIMEM_START.raw_value());
        let end = addr.raw_value() + len;
        if end > start {
            map.push(entry(start, end - start, E820_RAM));
        }
    }
    map
}

/// GDT entries: null, 64-bit code, data, TSS (the layout the kernel's startup_64 expects).
pub const BOOT_GDT: [u64; 4] = [
    0,
    0x00af_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x008f_8b00_0000_ffff,
];
/// Selector of the code segment.
pub const BOOT_CODE_SELECTOR: u16 = 1 << 3;
/// Selector of the data segment.
pub const BOOT_DATA_SELECTOR: u16 = 2 << 3;
/// Selector of the TSS.
pub const BOOT_TSS_SELECTOR: u16 = 3 << 3;
/// Where the (empty) boot IDT lives: right after the GDT.
pub const BOOT_IDT_START: GuestAddress = GuestAddress(0x520);

fn write_gdt_and_page_tables(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    for (i, entry) in BOOT_GDT.iter().enumerate() {
        write(
            mem,
            "GDT",
            *entry,
            BOOT_GDT_START.unchecked_add(i as u64 * 8),
        )?;
    }
    write(mem, "IDT", 0u64, BOOT_IDT_START)?;
    // PML4[0] -> PDPT, PDPT[0] -> PD, PD[i] -> 2 MiB page i: an identity map of the first
    // GiB, enough for the kernel's own early page tables to take over.
    let pdpt = PML4_START.unchecked_add(0x1000);
    let pd = PML4_START.unchecked_add(0x2000);
    const PRESENT_RW: u64 = 0x3;
    const HUGE: u64 = 0x80;
    write(mem, "PML4", pdpt.raw_value() | PRESENT_RW, PML4_START)?;
    write(mem, "PDPT", pd.raw_value() | PRESENT_RW, pdpt)?;
    let mut entries = [0u64; 512];
    for (i, e) in entries.iter_mut().enumerate() {
        *e = ((i as u64) << 21) | PRESENT_RW | HUGE;
    }
    let bytes: Vec<u8> = entries.iter().flat_map(|e| e.to_le_bytes()).collect();
    mem.write_slice(&bytes, pd)
        .map_err(|source| BootError::GuestWrite {
            what: "page directory",
            addr: pd.raw_value(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;

    #[test]
    fn e820_has_low_ram_reserved_bios_and_high_ram() {
        let map = e820_map(256 << 20);
        let got: Vec<(u64, u64, u32)> = map.iter().map(|e| (e.addr, e.size, e.r#type)).collect();
        assert_eq!(
            got,
            vec![
                (0, 0x9fc00, E820_RAM),
                (0x9fc00, 0x100000 - 0x9fc00, E820_RESERVED),
                (0x100000, (256 << 20) - 0x100000, E820_RAM),
            ]
        );
        let big = e820_map(4 << 30);
        assert_eq!(big.len(), 4);
        assert_eq!(
            (big[3].addr, big[3].size),
            (MMIO_HOLE_END, (4 << 30) - MMIO_HOLE_START)
        );
    }

    #[test]
    fn zero_page_page_tables_and_initrd_are_written() {
        let mem = create_guest_memory(128 << 20).unwrap();
        let dir = std::env::temp_dir().join(format!("hospes-boot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // A minimal "ELF" is too much to fake; check the bzImage error path instead and the
        // structures written by the helpers directly.
        let bogus = dir.join("bogus");
        std::fs::write(&bogus, b"not a kernel").unwrap();
        let err = load(
            &mem,
            &BootSource {
                kernel: &bogus,
                initrd: None,
                cmdline: "",
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");

        write_gdt_and_page_tables(&mem).unwrap();
        assert_eq!(mem.read_obj::<u64>(PML4_START).unwrap(), 0xa003);
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(0xb000 + 8)).unwrap(),
            (1 << 21) | 0x83
        );
        assert_eq!(
            mem.read_obj::<u64>(BOOT_GDT_START.unchecked_add(8))
                .unwrap(),
            BOOT_GDT[1]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
