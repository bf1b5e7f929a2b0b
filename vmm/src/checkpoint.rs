//! Snapshots of a whole VM: writing one from a paused VM, and building a VM from one.
//!
//! Writing (`save`), with every vCPU paused and the VMM thread busy with it (so no device
//! touches guest memory meanwhile): a temporary directory next to the destination gets
//! the vCPU, VM and device state, guest RAM as a sparse file and a copy (or reflink) of
//! each drive; it is renamed to the destination only when all of it is on disk. A crash or
//! an error midway leaves no directory that looks like a snapshot.
//!
//! Nothing is in flight in the devices when the state is read: the block device completes
//! each request on the VMM thread before it returns to the event loop, and a queue
//! notification the guest made but the VMM has not handled yet stays in the avail ring,
//! which is guest memory; the restored VM processes every queue once before it runs.
//!
//! Restoring (`restore`), in this order:
//! 1. Read and check the state file and the memory file's length (a bad snapshot starts
//!    nothing).
//! 2. KVM, the VM, its TSS, irqchip and PIT, exactly as for a boot (`vm::create_vm`).
//! 3. Guest RAM as at boot, filled from the memory file (holes stay zero), registered
//!    with KVM.
//! 4. Devices as the snapshot left them: COM1 from its registers, each virtio transport
//!    with its queues, on the snapshot's drive images. Their irqfds and ioeventfds are
//!    registered as at boot.
//! 5. vCPUs created (their LAPICs must exist), then the VM-wide state (PIT, kvmclock,
//!    PICs, IOAPIC), then each vCPU's state (see `state` for that order).
//! 6. Every queue processed once (notifications the old process never saw), and the
//!    interrupt of each device whose InterruptStatus is set raised once more (edges raised
//!    before step 5 were overwritten by it), then the vCPU threads start.
//!
//! The restored VM runs on the drive images inside the snapshot directory: restoring
//! consumes the snapshot. Copy the directory first (`cp -r --reflink=auto`) to keep it.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Instant;

use devices::virtio::{self, Block, BlockConfig, Net};
use snapshot::dir::{SnapshotWriter, MEMORY_FILE, STATE_FILE};
use snapshot::{DevicesState, MemoryState, VmState};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::api::ApiServer;
use crate::bus::lock;
use crate::layout::ram_ranges;
use crate::state::{self, StateError};
use crate::vcpu::VcpuError;
use crate::vm::{self, Built, Outcome, RunOptions, Vm};
use crate::{memory, VmmError};

/// Errors writing a snapshot. The VM goes on (or stays paused) after any of them.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The snapshot directory could not be prepared or committed.
    #[error(transparent)]
    Dir(#[from] snapshot::dir::DirError),
    /// A vCPU's state could not be read.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// The VM's state could not be read.
    #[error(transparent)]
    State(#[from] StateError),
    /// The memory file could not be written.
    #[error(transparent)]
    Memory(#[from] snapshot::memory::MemoryFileError),
    /// A drive could not be copied.
    #[error("drive {id}: {source}")]
    Disk {
        /// The drive id.
        id: String,
        /// What failed.
        #[source]
        source: snapshot::disk::DiskError,
    },
    /// The state file could not be written.
    #[error(transparent)]
    Format(#[from] snapshot::format::FormatError),
    /// A file could not be created.
    #[error("cannot create {}: {source}", path.display())]
    Create {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// What a finished snapshot reports.
pub(crate) struct Saved {
    /// Bytes of guest RAM that were not zero (the memory file's data).
    pub(crate) memory_bytes: u64,
}

/// Guest RAM as byte slices in address order, with each region's (address, size).
///
/// # Safety
/// No vCPU may run and no device may write guest memory while the slices live.
// Guest RAM is a mapping `mem` points to, not data it owns: handing out `&mut` views of it
// from `&mem` is the point, and the caller's guarantee is what makes them exclusive.
#[allow(clippy::mut_from_ref)]
unsafe fn ram_slices(mem: &devices::GuestMemoryMmap) -> (Vec<&mut [u8]>, Vec<(u64, u64)>) {
    let mut slices = Vec::new();
    let mut regions = Vec::new();
    for region in mem.iter() {
        let len = region.len() as usize;
        let ptr = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .expect("a region's first byte is inside it");
        // SAFETY: `ptr..ptr+len` is the region's whole mapping, alive as long as `mem`;
        // the caller guarantees nothing else accesses it meanwhile.
        slices.push(unsafe { std::slice::from_raw_parts_mut(ptr, len) });
        regions.push((region.start_addr().0, len as u64));
    }
    (slices, regions)
}

/// The vCPU, VM-wide and device state of paused `vm`.
fn capture(
    vm: &Vm,
) -> Result<(Vec<snapshot::VcpuState>, snapshot::KvmVmState, DevicesState), CheckpointError> {
    let vcpus = vm
        .vcpus
        .iter()
        .map(|v| v.save())
        .collect::<Result<Vec<_>, _>>()?;
    let kvm_state = state::save_vm(&vm.fd)?;
    let devices = DevicesState {
        serial: lock(&vm.serial).save_state(),
        virtio: vm.transports.iter().map(|t| lock(t).save_state()).collect(),
    };
    Ok((vcpus, kvm_state, devices))
}

/// The whole state of paused `vm` but its memory and disks, which travel separately: what
/// a migration's State frame carries. The machine is `vm.config` unchanged, as the
/// migration's Hello announced it.
pub(crate) fn capture_state(vm: &Vm) -> Result<VmState, CheckpointError> {
    let (vcpus, kvm_state, devices) = capture(vm)?;
    let regions = vm.mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
    Ok(VmState {
        machine: vm.config.clone(),
        memory: MemoryState {
            file: MEMORY_FILE.into(),
            regions,
        },
        vm: kvm_state,
        vcpus,
        devices,
    })
}

/// Writes a snapshot of paused `vm` to `dir` (module documentation).
pub(crate) fn save(vm: &Vm, dir: &Path) -> Result<Saved, CheckpointError> {
    let start = Instant::now();
    let writer = SnapshotWriter::begin(dir)?;

    let (vcpus, kvm_state, devices) = capture(vm)?;

    let memory_path = writer.path(MEMORY_FILE);
    let file = File::create(&memory_path).map_err(|source| CheckpointError::Create {
        path: memory_path.clone(),
        source,
    })?;
    // SAFETY: every vCPU is paused and this (the VMM) thread is the only one that runs
    // devices; the slices are dropped before this function returns.
    let (slices, regions) = unsafe { ram_slices(&vm.mem) };
    let readonly: Vec<&[u8]> = slices.iter().map(|s| &**s).collect();
    let memory_bytes = snapshot::memory::write_memory(&file, &readonly)?;
    drop(readonly);
    drop(slices);
    let after_memory = start.elapsed();

    let mut machine = vm.config.clone();
    for (drive, path) in machine.drives.iter_mut().zip(&vm.drive_paths) {
        let kind =
            snapshot::disk::copy_disk(path, &writer.path(&drive.file)).map_err(|source| {
                CheckpointError::Disk {
                    id: drive.id.clone(),
                    source,
                }
            })?;
        drive.size = std::fs::metadata(path)
            .map(|m| m.len())
            .unwrap_or(drive.size);
        tracing::debug!("drive {}: {kind:?}", drive.id);
    }

    let state = VmState {
        machine,
        memory: MemoryState {
            file: MEMORY_FILE.into(),
            regions,
        },
        vm: kvm_state,
        vcpus,
        devices,
    };
    snapshot::format::write_state_file(&writer.path(STATE_FILE), &state)?;
    writer.commit()?;
    tracing::debug!(
        "snapshot: memory {after_memory:?}, total {:?}",
        start.elapsed()
    );
    Ok(Saved { memory_bytes })
}

fn bad(dir: &Path, reason: impl Into<String>) -> VmmError {
    VmmError::BadSnapshot {
        dir: dir.to_owned(),
        reason: reason.into(),
    }
}

/// Checks what the state says against what this hospes would build, before building.
pub(crate) fn check_layout(dir: &Path, state: &VmState) -> Result<(), VmmError> {
    let total = u64::from(state.machine.memory_mib) << 20;
    let expected: Vec<(u64, u64)> = ram_ranges(total)
        .into_iter()
        .map(|(a, l)| (a.0, l))
        .collect();
    if state.memory.regions != expected {
        return Err(bad(
            dir,
            format!(
                "memory regions {:x?} do not match the layout of a {} MiB guest {:x?}",
                state.memory.regions, state.machine.memory_mib, expected
            ),
        ));
    }
    for drive in &state.machine.drives {
        let path = dir.join(&drive.file);
        let size = std::fs::metadata(&path)
            .map_err(|e| bad(dir, format!("drive {}: {}: {e}", drive.id, path.display())))?
            .len();
        if size != drive.size {
            return Err(bad(
                dir,
                format!(
                    "drive {}: {} is {size} bytes, the state says {}",
                    drive.id,
                    path.display(),
                    drive.size
                ),
            ));
        }
        if drive.cache != "writeback" && drive.cache != "none" {
            return Err(bad(
                dir,
                format!("drive {}: unknown cache mode {:?}", drive.id, drive.cache),
            ));
        }
    }
    Ok(())
}

/// Continues the VM saved in `dir` in this process (module documentation).
pub fn restore(dir: &Path, options: &RunOptions) -> Result<Outcome, VmmError> {
    // 1. The snapshot, checked.
    let (state, dir) = snapshot::dir::open(dir).map_err(|e| bad(dir, e.to_string()))?;
    check_layout(&dir, &state)?;
    let api = options
        .api_socket
        .as_deref()
        .map(ApiServer::start)
        .transpose()?;

    // 2-6.
    let mem = memory::create_guest_memory(state.memory.total_bytes())?;
    {
        let path = dir.join(&state.memory.file);
        let file = File::open(&path).map_err(|source| VmmError::Io {
            what: "opening the snapshot's memory file",
            source,
        })?;
        // SAFETY: no vCPU exists yet and no device is attached: nothing else touches
        // guest memory while the slices live.
        let (mut slices, _) = unsafe { ram_slices(&mem) };
        snapshot::memory::read_memory(&file, &mut slices, state.memory.total_bytes())
            .map_err(|e| bad(&dir, e.to_string()))?;
    }
    let spec_json = serde_json::json!({
        "restored_from": dir,
        "machine": state.machine,
    });
    let built = build_from_state(state, mem, &dir, spec_json)?;
    tracing::info!("restored {} from {}", built.name, dir.display());
    vm::run_built(built, api)
}

/// Steps 2-6 of a restore: a VM built around `mem` (already holding guest RAM) and the
/// drive images in `dir`, in `state`'s configuration and state, its vCPUs not started.
/// A migration destination builds its VM the same way.
pub(crate) fn build_from_state(
    state: VmState,
    mem: devices::GuestMemoryMmap,
    dir: &Path,
    spec_json: serde_json::Value,
) -> Result<Built, VmmError> {
    // 2. KVM and the VM.
    let (kvm, vm) = vm::create_vm()?;

    // 3. Memory, filled by the caller.
    memory::register_with_kvm(&vm, &mem)?;

    // 4. Devices.
    let mut platform = vm::platform(&vm, Some(&state.devices.serial))?;
    let mut devices: Vec<Box<dyn virtio::VirtioDevice + Send>> = Vec::new();
    let mut disk_dirty = Vec::new();
    for d in &state.machine.drives {
        let config = BlockConfig {
            id: d.id.clone(),
            path: dir.join(&d.file),
            read_only: d.read_only,
            cache: if d.cache == "none" {
                virtio::CacheMode::None
            } else {
                virtio::CacheMode::Writeback
            },
        };
        let block = Block::new(config).map_err(|e| VmmError::Device {
            id: d.id.clone(),
            reason: e.to_string(),
        })?;
        disk_dirty.push(block.dirty());
        devices.push(Box::new(block));
    }
    for n in &state.machine.nets {
        let config = virtio::NetConfig {
            id: n.id.clone(),
            tap: n.tap.clone(),
            mac: n.mac,
        };
        devices.push(Box::new(Net::new(config).map_err(|e| {
            VmmError::Device {
                id: n.id.clone(),
                reason: e.to_string(),
            }
        })?));
    }
    let mut transports = Vec::new();
    for (i, (device, saved)) in devices.into_iter().zip(&state.devices.virtio).enumerate() {
        transports.push(vm::attach_virtio(
            &vm,
            &mem,
            &mut platform.mmio,
            vm::virtio_slot(i),
            device,
            Some(saved),
        )?);
    }

    // 5. vCPUs, the VM-wide state, each vCPU's state.
    let mut vcpu_fds = Vec::new();
    for index in 0..state.machine.vcpus {
        vcpu_fds.push(
            vm.create_vcpu(u64::from(index))
                .map_err(vm::kvm_err("KVM_CREATE_VCPU"))?,
        );
    }
    state::restore_vm(&vm, &state.vm).map_err(VmmError::from)?;
    for (index, (fd, saved)) in vcpu_fds.iter().zip(&state.vcpus).enumerate() {
        state::restore_vcpu(fd, index as u32, saved)?;
    }

    // 6. Queues, and interrupts the guest has not seen. Only now: an edge raised before
    //    the IOAPIC and LAPICs were restored in step 5 was overwritten with them.
    for transport in &transports {
        lock(transport).resume();
    }
    let drive_paths = state
        .machine
        .drives
        .iter()
        .map(|d| dir.join(&d.file))
        .collect();
    let built = Built {
        name: state.machine.name.clone(),
        spec_json,
        config: state.machine,
        drive_paths,
        kvm,
        vm,
        mem,
        platform,
        transports,
        disk_dirty,
        vcpu_fds,
    };
    Ok(built)
}
