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
//!    nothing). Guest RAM as at boot, filled from the memory file (holes stay zero).
//!
//! Then the build, in three phases. Phases one ([`prebuild`]) and two
//! ([`Prebuilt::launch_paused`]) need only the machine configuration, so a migration
//! destination runs them as soon as the Hello announces the VM, while pre-copy goes on;
//! only phase three ([`Staged::finish`]) needs the saved state, and only it runs inside
//! the guest's pause.
//! 2. KVM, the VM, its TSS, irqchip and PIT, exactly as for a boot (`vm::create_vm`).
//! 3. Guest RAM registered with KVM (it may still be written afterwards: no vCPU runs).
//! 4. Each drive image opened and locked by its block device.
//! 5. vCPUs created: their LAPICs must exist before the VM-wide state is restored (7).
//! 6. Phase two: the devices as at boot, fresh (COM1, the TAPs opened, each virtio
//!    transport with its irqfd and ioeventfds), and the VM launched with its vCPU threads
//!    paused before their first `KVM_RUN` (event loop, signal handling, vCPU threads).
//!    Each TAP queue is detached from its TAP at once: in a handover on one host, an
//!    attached queue would take its share of the guest's incoming frames during the
//!    whole pre-copy.
//! 7. Phase three: the TAP queues attached again; COM1 from its registers and each
//!    virtio transport with its queues, as the snapshot left them; the VM-wide state
//!    (PIT, kvmclock, PICs, IOAPIC), then each vCPU's state, written by the vCPU's own
//!    thread (see `state` for that order).
//! 8. Every queue processed once (notifications the old process never saw), and the
//!    interrupt of each device whose InterruptStatus is set raised once more (edges raised
//!    before step 7 were overwritten by it), then the vCPUs are let go.
//!
//! The restored VM runs on the drive images inside the snapshot directory: restoring
//! consumes the snapshot. Copy the directory first (`cp -r --reflink=auto`) to keep it.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Instant;

use devices::virtio::{self, Block, BlockConfig, Net};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use snapshot::dir::{SnapshotWriter, MEMORY_FILE, STATE_FILE};
use snapshot::{DevicesState, MachineConfig, MemoryState, VmState};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::api::{ApiChannel, ApiServer};
use crate::bus::lock;
use crate::laps::Laps;
use crate::layout::ram_ranges;
use crate::state::{self, StateError};
use crate::vcpu::{PendingSave, VcpuError};
use crate::vm::{self, Built, Launched, Outcome, RunOptions, Vm};
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

/// Guest RAM as byte slices in address order.
///
/// # Safety
/// No vCPU may run and no device may write guest memory while the slices live.
// Guest RAM is a mapping `mem` points to, not data it owns: handing out `&mut` views of it
// from `&mem` is the point, and the caller's guarantee is what makes them exclusive.
#[allow(clippy::mut_from_ref)]
unsafe fn ram_slices(mem: &devices::GuestMemoryMmap) -> Vec<&mut [u8]> {
    mem.iter()
        .map(|region| {
            let len = region.len() as usize;
            let ptr = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .expect("a region's first byte is inside it");
            // SAFETY: `ptr..ptr+len` is the region's whole mapping, alive as long as `mem`;
            // the caller guarantees nothing else accesses it meanwhile.
            unsafe { std::slice::from_raw_parts_mut(ptr, len) }
        })
        .collect()
}

/// The whole state of paused `vm` but its memory and disks, which travel separately: what
/// a migration's State frame carries, and a snapshot's state file once the drive sizes
/// are updated. The machine is `vm.config` unchanged, as the migration's Hello announced
/// it. Each step's time goes to `laps`.
pub(crate) fn capture_state(vm: &Vm, laps: &mut Laps) -> Result<VmState, CheckpointError> {
    start_capture(vm)?.finish(vm, laps)
}

/// A capture of paused `vm` under way: each vCPU's thread is reading its own state.
pub(crate) struct Capture(Vec<PendingSave>);

/// Starts [`capture_state`]: asks every vCPU of paused `vm` for its state, without
/// waiting, so that the caller can do something else meanwhile (a migration's
/// stop-and-copy takes the last dirty log).
pub(crate) fn start_capture(vm: &Vm) -> Result<Capture, CheckpointError> {
    let pending = vm
        .vcpus
        .iter()
        .map(|v| v.start_save())
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Capture(pending))
}

impl Capture {
    /// The rest of [`capture_state`]; each step's time goes to `laps`.
    pub(crate) fn finish(self, vm: &Vm, laps: &mut Laps) -> Result<VmState, CheckpointError> {
        let vcpus = self
            .0
            .into_iter()
            .map(PendingSave::wait)
            .collect::<Result<Vec<_>, _>>()?;
        laps.lap("save vCPUs");
        let kvm_state = state::save_vm(&vm.fd)?;
        laps.lap("save VM state");
        let devices = DevicesState {
            serial: lock(&vm.serial).save_state(),
            virtio: vm.transports.iter().map(|t| lock(t).save_state()).collect(),
        };
        laps.lap("save devices");
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
}

/// Writes a snapshot of paused `vm` to `dir` (module documentation).
pub(crate) fn save(vm: &Vm, dir: &Path) -> Result<Saved, CheckpointError> {
    let start = Instant::now();
    let writer = SnapshotWriter::begin(dir)?;

    let mut state = capture_state(vm, &mut Laps::start())?;

    let memory_path = writer.path(MEMORY_FILE);
    let file = File::create(&memory_path).map_err(|source| CheckpointError::Create {
        path: memory_path.clone(),
        source,
    })?;
    // SAFETY: every vCPU is paused and this (the VMM) thread is the only one that runs
    // devices; the slices are dropped before this function returns.
    let slices = unsafe { ram_slices(&vm.mem) };
    let readonly: Vec<&[u8]> = slices.iter().map(|s| &**s).collect();
    // Pages never populated are zero: holes, without reading them. The guest is paused,
    // so the answer cannot go stale.
    let populated: Vec<Vec<(usize, usize)>> = readonly
        .iter()
        .map(|r| memory::populated_or_all(r.as_ptr(), r.len()))
        .collect();
    let memory_bytes = snapshot::memory::write_populated_memory(&file, &readonly, &populated)?;
    drop(readonly);
    drop(slices);
    let after_memory = start.elapsed();

    for (drive, path) in state.machine.drives.iter_mut().zip(&vm.drive_paths) {
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

    // 2-8.
    let mem = memory::create_guest_memory(state.memory.total_bytes())?;
    {
        let path = dir.join(&state.memory.file);
        let file = File::open(&path).map_err(|source| VmmError::Io {
            what: "opening the snapshot's memory file",
            source,
        })?;
        // SAFETY: no vCPU exists yet and no device is attached: nothing else touches
        // guest memory while the slices live.
        let mut slices = unsafe { ram_slices(&mem) };
        snapshot::memory::read_memory(&file, &mut slices, state.memory.total_bytes())
            .map_err(|e| bad(&dir, e.to_string()))?;
    }
    let spec_json = serde_json::json!({
        "restored_from": dir,
        "machine": state.machine,
    });
    // The three phases back to back; a migration destination runs the first two as soon
    // as the Hello announces the VM and the third on Done.
    let staged = prebuild(&state.machine, mem, &dir)?.launch_paused(spec_json, api)?;
    let mut laps = Laps::start();
    let launched = staged.finish(state, &mut laps)?;
    tracing::info!("VM build, phase three: {laps}");
    tracing::info!("restored {} from {}", launched.vm().name, dir.display());
    launched.resume()?;
    launched.run()
}

/// A VM made from its machine configuration alone (phase one, steps 2-5 of the module
/// documentation): the VM with its irqchip and PIT, guest RAM registered with KVM, the
/// drive images open, the vCPUs created; no device attached and no state loaded.
/// Dropping it discards all of that: none of it ever ran.
pub(crate) struct Prebuilt {
    machine: MachineConfig,
    dir: PathBuf,
    kvm: Kvm,
    vm: VmFd,
    mem: devices::GuestMemoryMmap,
    /// One per drive, in `machine.drives` order, not yet behind a transport.
    blocks: Vec<Block>,
    vcpu_fds: Vec<VcpuFd>,
}

/// Phase one of a build: everything `machine` alone decides, around `mem` (guest RAM,
/// which may still be filled afterwards: KVM maps the same pages, and no vCPU runs) and
/// the drive images in `dir`, which must exist with their final size.
pub(crate) fn prebuild(
    machine: &MachineConfig,
    mem: devices::GuestMemoryMmap,
    dir: &Path,
) -> Result<Prebuilt, VmmError> {
    let mut laps = Laps::start();
    // 2. KVM and the VM: TSS, irqchip and PIT exist before any vCPU (their LAPICs are
    //    made in the kernel's irqchip).
    let (kvm, vm) = vm::create_vm()?;
    laps.lap("create VM");

    // 3. Memory, filled by the caller (before or after).
    memory::register_with_kvm(&vm, &mem)?;
    laps.lap("register memory");

    // 4. Drive images, opened (and locked) by their block devices; they are attached to
    //    their transports in step 6, with the saved queue state.
    let mut blocks = Vec::new();
    for d in &machine.drives {
        let cache = match d.cache.as_str() {
            "none" => virtio::CacheMode::None,
            "writeback" => virtio::CacheMode::Writeback,
            other => {
                return Err(VmmError::Device {
                    id: d.id.clone(),
                    reason: format!("unknown cache mode {other:?}"),
                })
            }
        };
        let config = BlockConfig {
            id: d.id.clone(),
            path: dir.join(&d.file),
            read_only: d.read_only,
            cache,
        };
        blocks.push(Block::new(config).map_err(|e| VmmError::Device {
            id: d.id.clone(),
            reason: e.to_string(),
        })?);
    }
    laps.lap("open drives");

    // 5. vCPUs: they must exist before the VM-wide state is restored (step 7).
    let mut vcpu_fds = Vec::new();
    for index in 0..machine.vcpus {
        vcpu_fds.push(
            vm.create_vcpu(u64::from(index))
                .map_err(vm::kvm_err("KVM_CREATE_VCPU"))?,
        );
    }
    laps.lap("create vCPUs");
    tracing::info!("VM build, phase one: {laps}");
    Ok(Prebuilt {
        machine: machine.clone(),
        dir: dir.to_owned(),
        kvm,
        vm,
        mem,
        blocks,
        vcpu_fds,
    })
}

impl Prebuilt {
    /// Runs what phase three runs on the state (its decoding, and writing the VM's and each
    /// vCPU's) once, on this VM's own fresh state, while the source's guest still runs.
    /// The first run of a code path pays for page faults on the binary's text (major ones
    /// if it is not in the page cache) and, under emulation, for translating it; a
    /// migration would pay inside the guest's pause. Measured in the test rig, whose L2
    /// runs under TCG: a first decode of a 13 KB state 28 ms, the next one 2 ms. What this
    /// writes is what it read, and [`Staged::finish`] writes all of it again, in order. A
    /// failure only costs that gain: it is logged, not returned.
    pub(crate) fn rehearse(&self) {
        let mut laps = Laps::start();
        let mut run = || -> Result<(), String> {
            let regions = self
                .mem
                .iter()
                .map(|r| (r.start_addr().0, r.len()))
                .collect();
            snapshot::rehearse(&VmState::stand_in(self.machine.clone(), regions))
                .map_err(|e| e.to_string())?;
            laps.lap("state codec");
            let vm_state = state::save_vm(&self.vm).map_err(|e| e.to_string())?;
            state::restore_vm(&self.vm, &vm_state).map_err(|e| e.to_string())?;
            laps.lap("VM state");
            let msr_index = self
                .kvm
                .get_msr_index_list()
                .map_err(|e| format!("KVM_GET_MSR_INDEX_LIST: {e}"))?;
            for (index, fd) in (0u32..).zip(&self.vcpu_fds) {
                let saved =
                    state::save_vcpu(fd, index, msr_index.as_slice()).map_err(|e| e.to_string())?;
                state::restore_vcpu(fd, index, &saved).map_err(|e| e.to_string())?;
            }
            laps.lap("vCPU state");
            Ok(())
        };
        match run() {
            Ok(()) => tracing::debug!("phase three rehearsed: {laps}"),
            Err(e) => tracing::debug!("phase three rehearsal stopped: {e} ({laps})"),
        }
    }
}

impl Prebuilt {
    /// Phase two of a build (step 6): the devices attached as at boot, fresh, and the VM
    /// launched with its vCPU threads paused before their first `KVM_RUN`: everything but
    /// the state. Each TAP queue is taken out of its TAP until [`Staged::finish`].
    pub(crate) fn launch_paused(
        self,
        spec_json: serde_json::Value,
        api: Option<(ApiServer, ApiChannel)>,
    ) -> Result<Staged, VmmError> {
        let Prebuilt {
            machine,
            dir,
            kvm,
            vm,
            mem,
            blocks,
            vcpu_fds,
        } = self;
        let mut laps = Laps::start();
        let mut platform = vm::platform(&vm)?;
        laps.lap("platform");
        let disk_dirty = blocks.iter().map(Block::dirty).collect();
        let mut devices: Vec<Box<dyn virtio::VirtioDevice + Send>> = Vec::new();
        for block in blocks {
            devices.push(Box::new(block));
        }
        let mut taps = Vec::new();
        for n in &machine.nets {
            let config = virtio::NetConfig {
                id: n.id.clone(),
                tap: n.tap.clone(),
                mac: n.mac,
            };
            let device_err = |e: virtio::NetError| VmmError::Device {
                id: n.id.clone(),
                reason: e.to_string(),
            };
            let net = Net::new(config).map_err(device_err)?;
            let queue = net.tap_queue().map_err(device_err)?;
            if queue.detach().map_err(device_err)? {
                taps.push((n.id.clone(), queue));
            }
            devices.push(Box::new(net));
        }
        laps.lap("open TAPs");
        let mut transports = Vec::new();
        for (i, device) in devices.into_iter().enumerate() {
            transports.push(vm::attach_virtio(
                &vm,
                &mem,
                &mut platform.mmio,
                vm::virtio_slot(i),
                device,
                None,
            )?);
        }
        laps.lap("attach transports");
        let drive_paths = machine.drives.iter().map(|d| dir.join(&d.file)).collect();
        let built = Built {
            name: machine.name.clone(),
            spec_json,
            config: machine,
            drive_paths,
            kvm,
            vm,
            mem,
            platform,
            transports,
            disk_dirty,
            vcpu_fds,
        };
        let launched = vm::launch(built, api, true)?;
        laps.lap("launch, paused");
        tracing::info!("VM build, phase two: {laps}");
        Ok(Staged { launched, taps })
    }
}

/// A VM launched paused before its state was known ([`Prebuilt::launch_paused`]). Dropping
/// it discards the VM, which never ran.
pub(crate) struct Staged {
    launched: Launched,
    /// The TAP queues taken out of their TAPs (with their interface's id), put back by
    /// [`Staged::finish`].
    taps: Vec<(String, virtio::TapQueue)>,
}

impl Staged {
    /// Phase three of a build (steps 7-8): `state` (whose machine must be the one the VM
    /// was built for) written into the launched VM, its TAP queues back in their TAPs; its
    /// vCPUs stay paused until [`Launched::resume`]. Its steps are timed on `laps`, for the
    /// caller to log (a migration does so only once the guest runs again).
    pub(crate) fn finish(self, state: VmState, laps: &mut Laps) -> Result<Launched, VmmError> {
        let Staged { launched, taps } = self;
        let vm = launched.vm();
        let machine = &vm.config;
        let mismatch = |reason: String| VmmError::StateMismatch { reason };
        if state.machine != *machine {
            return Err(mismatch(format!(
                "the state is of machine {:?}, the VM was built for {machine:?}",
                state.machine
            )));
        }
        if state.devices.virtio.len() != vm.transports.len() {
            return Err(mismatch(format!(
                "{} virtio transport states for {} devices",
                state.devices.virtio.len(),
                vm.transports.len()
            )));
        }
        if state.vcpus.len() != vm.vcpus.len() {
            return Err(mismatch(format!(
                "{} vCPU states for {} vCPUs",
                state.vcpus.len(),
                vm.vcpus.len()
            )));
        }

        // 6. Devices as the snapshot left them: the TAP queues back (only now: in a
        //    handover on one host, an attached queue would take its share of the guest's
        //    incoming frames during the whole pre-copy), COM1 from its registers, each
        //    virtio transport with its queues.
        for (id, tap) in &taps {
            tap.attach().map_err(|e| VmmError::Device {
                id: id.clone(),
                reason: e.to_string(),
            })?;
        }
        lock(&vm.serial)
            .restore_state(&state.devices.serial)
            .map_err(|e| VmmError::Device {
                id: "serial".into(),
                reason: e.to_string(),
            })?;
        for (i, (transport, saved)) in vm.transports.iter().zip(&state.devices.virtio).enumerate() {
            lock(transport)
                .restore_state(saved)
                .map_err(|e| VmmError::Device {
                    id: format!("virtio-mmio@{:#x}", vm::virtio_slot(i).base),
                    reason: e.to_string(),
                })?;
        }
        laps.lap("devices");

        // 7. The VM-wide state (the vCPUs, and so their LAPICs, exist since step 5), then
        //    each vCPU's state, written by its own thread.
        state::restore_vm(&vm.fd, &state.vm).map_err(VmmError::from)?;
        laps.lap("VM state");
        for (vcpu, saved) in vm.vcpus.iter().zip(state.vcpus) {
            vcpu.restore(saved).map_err(|e| VmmError::VcpuFailed {
                index: vcpu.index(),
                reason: e.to_string(),
            })?;
        }
        laps.lap("vCPU state");

        // 8. Queues, and interrupts the guest has not seen. Only now: an edge raised before
        //    the IOAPIC and LAPICs were restored in step 7 was overwritten with them.
        for transport in &vm.transports {
            lock(transport).resume();
        }
        laps.lap("resume queues");
        Ok(launched)
    }
}
