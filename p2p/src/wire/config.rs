//! The VM configuration both peers agree on in the Hello, and the checks of every page
//! address and disk block against it.

use snapshot::{Caps, MachineConfig};

use super::{WireError, BLOCK_SIZE, MAX_DISK_BYTES, PAGE_SIZE};

/// What the destination must build to receive the VM: the machine (its drives give the
/// disks, in order, with their sizes) and where guest RAM is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationConfig {
    /// The machine as configured on the source.
    pub machine: MachineConfig,
    /// Guest RAM: (guest physical address, size in bytes) per region, in address order.
    pub regions: Vec<(u64, u64)>,
}

impl MigrationConfig {
    /// A configuration, checked by [`MigrationConfig::check`].
    pub fn new(machine: MachineConfig, regions: Vec<(u64, u64)>) -> Result<Self, WireError> {
        let config = Self { machine, regions };
        config.check()?;
        Ok(config)
    }

    /// Checks it against the snapshot format's caps (the VM state that ends the migration
    /// must pass them too) and for consistency: regions page-aligned, in order, disjoint,
    /// adding up to the machine's RAM; disks no larger than [`MAX_DISK_BYTES`].
    pub fn check(&self) -> Result<(), WireError> {
        let m = &self.machine;
        let bad = |reason: String| Err(WireError::Config(reason));
        if m.vcpus == 0 || u64::from(m.vcpus) > Caps::VCPUS {
            return bad(format!("{} vCPUs, expected 1 to {}", m.vcpus, Caps::VCPUS));
        }
        let mib = u64::from(m.memory_mib);
        if mib == 0 || mib > Caps::MEMORY_MIB {
            return bad(format!(
                "{mib} MiB of guest memory, expected 1 to {}",
                Caps::MEMORY_MIB
            ));
        }
        let regions = self.regions.len() as u64;
        if regions == 0 || regions > Caps::MEMORY_REGIONS {
            return bad(format!(
                "{regions} memory regions, expected 1 to {}",
                Caps::MEMORY_REGIONS
            ));
        }
        let (mut total, mut next_free) = (0u64, 0u64);
        for &(gpa, size) in &self.regions {
            let page = PAGE_SIZE as u64;
            if size == 0 || !gpa.is_multiple_of(page) || !size.is_multiple_of(page) {
                return bad(format!(
                    "memory region of {size:#x} bytes at {gpa:#x} is empty or not {PAGE_SIZE}-byte aligned"
                ));
            }
            let Some(end) = gpa.checked_add(size) else {
                return bad(format!(
                    "memory region of {size:#x} bytes at {gpa:#x} ends past 2^64"
                ));
            };
            if gpa < next_free {
                return bad(format!(
                    "memory region of {size:#x} bytes at {gpa:#x} overlaps or is out of order"
                ));
            }
            next_free = end;
            total = total.saturating_add(size);
        }
        if total != mib << 20 {
            return bad(format!(
                "memory regions total {total} bytes, the machine has {mib} MiB"
            ));
        }
        let devices = (m.drives.len() + m.nets.len()) as u64;
        if devices > Caps::VIRTIO_TRANSPORTS {
            return bad(format!(
                "{devices} drives and nets, at most {}",
                Caps::VIRTIO_TRANSPORTS
            ));
        }
        let mut strings = vec![("name", &m.name), ("command line", &m.cmdline)];
        for drive in &m.drives {
            if drive.size > MAX_DISK_BYTES {
                return bad(format!(
                    "drive {:?} of {} bytes, at most {MAX_DISK_BYTES}",
                    drive.id, drive.size
                ));
            }
            strings.extend([
                ("drive id", &drive.id),
                ("drive file", &drive.file),
                ("drive cache mode", &drive.cache),
            ]);
        }
        for net in &m.nets {
            strings.extend([("net id", &net.id), ("TAP name", &net.tap)]);
        }
        for (what, s) in strings {
            if s.len() as u64 > Caps::STRING_BYTES {
                return bad(format!(
                    "{what} of {} bytes, at most {}",
                    s.len(),
                    Caps::STRING_BYTES
                ));
            }
        }
        Ok(())
    }

    /// Checks that the page at `gpa` is aligned and wholly inside one region.
    pub fn check_page(&self, gpa: u64) -> Result<(), WireError> {
        if !gpa.is_multiple_of(PAGE_SIZE as u64) {
            return Err(WireError::UnalignedPage(gpa));
        }
        let inside = gpa.checked_add(PAGE_SIZE as u64).is_some_and(|end| {
            self.regions
                .iter()
                .any(|&(start, size)| gpa >= start && end - start <= size)
        });
        if !inside {
            return Err(WireError::PageOutside {
                gpa,
                regions: self.describe_memory(),
            });
        }
        Ok(())
    }

    /// Number of blocks of `disk`, checking that it exists.
    pub fn disk_blocks(&self, disk: u16) -> Result<u64, WireError> {
        let drive = self
            .machine
            .drives
            .get(usize::from(disk))
            .ok_or(WireError::NoSuchDisk {
                disk,
                disks: self.machine.drives.len(),
            })?;
        Ok(drive.size.div_ceil(BLOCK_SIZE as u64))
    }

    /// Length of block `index` of `disk` ([`BLOCK_SIZE`], less for a short last block),
    /// checking that both exist.
    pub fn block_len(&self, disk: u16, index: u64) -> Result<usize, WireError> {
        let blocks = self.disk_blocks(disk)?;
        if index >= blocks {
            return Err(WireError::BlockOutside {
                disk,
                index,
                blocks,
            });
        }
        let size = self.machine.drives[usize::from(disk)].size;
        // index < ceil(size / BLOCK_SIZE), so index * BLOCK_SIZE ≤ size - 1: no overflow,
        // and at least one byte is left.
        let left = size - index * BLOCK_SIZE as u64;
        Ok(left.min(BLOCK_SIZE as u64) as usize)
    }

    /// The regions as `[start, end)` ranges, for messages.
    fn describe_memory(&self) -> String {
        let ranges: Vec<String> = self
            .regions
            .iter()
            .map(|&(gpa, size)| format!("[{gpa:#x}, {:#x})", gpa.saturating_add(size)))
            .collect();
        ranges.join(" ")
    }
}
