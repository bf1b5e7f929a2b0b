//! KVM state in and out: a paused vCPU's registers, MSRs and LAPIC, and the VM-wide
//! interrupt controllers, PIT and kvmclock, as the `snapshot` crate's serde types.
//!
//! Saving order for a vCPU, and why:
//! 1. `KVM_GET_MP_STATE` first: it runs `kvm_apic_accept_events()`, which may change the
//!    vCPU and LAPIC state (a pending INIT/SIPI becomes a new mp_state); read after it,
//!    everything else is consistent with the mp_state we keep.
//! 2. Registers, segment registers, XSAVE, XCRs, debug registers, LAPIC, MSRs: plain reads.
//! 3. `KVM_GET_VCPU_EVENTS` last: pending exceptions, interrupts and NMIs as they stand
//!    after everything above.
//!
//! The vCPU must not be inside an unfinished I/O exit: KVM completes a port or MMIO read
//! into the registers only on the next `KVM_RUN`. vCPU threads therefore only pause after
//! `KVM_RUN` returned EINTR (see `vcpu`), never right after an I/O exit.
//!
//! Restoring order for a fresh vCPU, and why:
//! 1. `KVM_SET_CPUID2`: KVM checks CR4 bits, XCR0, XSAVE features and MSRs against the
//!    guest's CPUID, so it goes before all of them.
//! 2. `KVM_SET_SREGS` before the LAPIC: it carries the APIC base (and EFER, the CRs);
//!    LAPIC registers written while the APIC is still at its reset base or disabled are
//!    lost.
//! 3. Registers, XSAVE, XCRs, debug registers.
//! 4. `KVM_SET_LAPIC`, then the MSRs: `MSR_IA32_TSC_DEADLINE` is only accepted while the
//!    LAPIC timer is in TSC-deadline mode, and after `MSR_IA32_TSC` (it is relative to it);
//!    the deadline is therefore moved to the end of the list.
//! 5. `KVM_SET_MP_STATE`, then `KVM_SET_VCPU_EVENTS` last: a pending event is injected at
//!    the next entry into exactly the state restored above.
//!
//! For the VM, after the irqchip and PIT exist and before any vCPU runs: PIT, kvmclock
//! (flags cleared: KVM rejects flags it sets itself, such as TSC_STABLE), then the two PICs
//! and the IOAPIC.

use crate::laps::Laps;
use kvm_bindings::{
    kvm_irqchip, kvm_msr_entry, CpuId, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{VcpuFd, VmFd};
use snapshot::{KvmVmState, VcpuState};

/// Errors saving or restoring KVM state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A vCPU ioctl failed.
    #[error("vCPU {index}: {ioctl}: {source}")]
    Vcpu {
        /// vCPU index.
        index: u32,
        /// Which ioctl.
        ioctl: &'static str,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
    /// A VM ioctl failed.
    #[error("VM: {ioctl}: {source}")]
    Vm {
        /// Which ioctl.
        ioctl: &'static str,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
    /// KVM refused an MSR of the saved state.
    #[error("vCPU {index}: KVM_SET_MSRS refused MSR {msr:#x} = {value:#x}")]
    Msr {
        /// vCPU index.
        index: u32,
        /// The MSR.
        msr: u32,
        /// Its saved value.
        value: u64,
    },
    /// A saved collection does not fit KVM's containers.
    #[error("vCPU {index}: {what} has {count} entries, KVM takes at most {max}")]
    TooMany {
        /// vCPU index.
        index: u32,
        /// Which collection.
        what: &'static str,
        /// Entries saved.
        count: usize,
        /// KVM's limit.
        max: usize,
    },
}

const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// MSRs read or written per ioctl.
const MSR_BATCH: usize = 64;

fn vcpu_err(index: u32, ioctl: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Vcpu {
        index,
        ioctl,
        source,
    }
}

fn vm_err(ioctl: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Vm { ioctl, source }
}

/// Reads the state of paused vCPU `index`. `msr_index` is KVM's MSR index list
/// (`KVM_GET_MSR_INDEX_LIST`); MSRs KVM will not read for this vCPU are left out.
pub fn save_vcpu(fd: &VcpuFd, index: u32, msr_index: &[u32]) -> Result<VcpuState, StateError> {
    let mut laps = Laps::start();
    let mp_state = fd
        .get_mp_state()
        .map_err(vcpu_err(index, "KVM_GET_MP_STATE"))?;
    let regs = fd.get_regs().map_err(vcpu_err(index, "KVM_GET_REGS"))?;
    let sregs = fd.get_sregs().map_err(vcpu_err(index, "KVM_GET_SREGS"))?;
    laps.lap("mp_state+regs+sregs");
    let xsave = fd.get_xsave().map_err(vcpu_err(index, "KVM_GET_XSAVE"))?;
    let xcrs = fd.get_xcrs().map_err(vcpu_err(index, "KVM_GET_XCRS"))?;
    let debugregs = fd
        .get_debug_regs()
        .map_err(vcpu_err(index, "KVM_GET_DEBUGREGS"))?;
    laps.lap("xsave+xcrs+debugregs");
    let lapic = fd.get_lapic().map_err(vcpu_err(index, "KVM_GET_LAPIC"))?;
    laps.lap("lapic");
    let msrs = read_msrs(fd, index, msr_index)?;
    laps.lap("msrs");
    let cpuid = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(vcpu_err(index, "KVM_GET_CPUID2"))?
        .as_slice()
        .to_vec();
    laps.lap("cpuid");
    let tsc_khz = fd.get_tsc_khz().ok();
    let events = fd
        .get_vcpu_events()
        .map_err(vcpu_err(index, "KVM_GET_VCPU_EVENTS"))?;
    laps.lap("tsc+events");
    tracing::debug!("vCPU {index} saved ({} MSRs): {laps}", msrs.len());
    Ok(VcpuState {
        cpuid,
        mp_state,
        regs,
        sregs,
        xsave,
        xcrs,
        debugregs,
        lapic,
        msrs,
        events,
        tsc_khz,
    })
}

/// Reads every MSR of `msr_index` that KVM can read for this vCPU. `KVM_GET_MSRS` stops
/// at the first MSR it cannot read and returns how many it read: that one is skipped and
/// the batch continues after it.
fn read_msrs(fd: &VcpuFd, index: u32, msr_index: &[u32]) -> Result<Vec<kvm_msr_entry>, StateError> {
    let mut out = Vec::with_capacity(msr_index.len());
    let mut next = 0;
    while next < msr_index.len() {
        let batch = &msr_index[next..(next + MSR_BATCH).min(msr_index.len())];
        let entries: Vec<kvm_msr_entry> = batch
            .iter()
            .map(|&msr| kvm_msr_entry {
                index: msr,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| StateError::TooMany {
            index,
            what: "an MSR batch",
            count: entries.len(),
            max: MSR_BATCH,
        })?;
        let read = fd
            .get_msrs(&mut msrs)
            .map_err(vcpu_err(index, "KVM_GET_MSRS"))?;
        out.extend_from_slice(&msrs.as_slice()[..read]);
        // Skip the MSR KVM refused (if any) and go on after it.
        next += if read < batch.len() { read + 1 } else { read };
    }
    Ok(out)
}

/// Puts `state` into freshly created vCPU `index`, in the order the module explains.
pub fn restore_vcpu(fd: &VcpuFd, index: u32, state: &VcpuState) -> Result<(), StateError> {
    let mut laps = Laps::start();
    let cpuid = CpuId::from_entries(&state.cpuid).map_err(|_| StateError::TooMany {
        index,
        what: "CPUID",
        count: state.cpuid.len(),
        max: KVM_MAX_CPUID_ENTRIES,
    })?;
    fd.set_cpuid2(&cpuid)
        .map_err(vcpu_err(index, "KVM_SET_CPUID2"))?;
    laps.lap("cpuid");
    if let Some(khz) = state.tsc_khz {
        // Same frequency (the common case, and always on the host that saved it): nothing
        // to do. Otherwise scale, where the CPU can.
        if fd.get_tsc_khz().ok() != Some(khz) {
            if let Err(e) = fd.set_tsc_khz(khz) {
                tracing::warn!(
                    "vCPU {index}: cannot set the TSC to {khz} kHz ({e}); guest time may drift"
                );
            }
        }
    }
    laps.lap("tsc");
    fd.set_sregs(&state.sregs)
        .map_err(vcpu_err(index, "KVM_SET_SREGS"))?;
    fd.set_regs(&state.regs)
        .map_err(vcpu_err(index, "KVM_SET_REGS"))?;
    laps.lap("sregs+regs");
    // SAFETY: `state.xsave` is a whole `kvm_xsave` (4 KiB region); KVM_SET_XSAVE copies
    // exactly `sizeof(struct kvm_xsave)` from it. The larger KVM_SET_XSAVE2 layout is only
    // needed for dynamically enabled features (AMX), which hospes never enables.
    unsafe { fd.set_xsave(&state.xsave) }.map_err(vcpu_err(index, "KVM_SET_XSAVE"))?;
    fd.set_xcrs(&state.xcrs)
        .map_err(vcpu_err(index, "KVM_SET_XCRS"))?;
    fd.set_debug_regs(&state.debugregs)
        .map_err(vcpu_err(index, "KVM_SET_DEBUGREGS"))?;
    laps.lap("xsave+xcrs+debugregs");
    fd.set_lapic(&state.lapic)
        .map_err(vcpu_err(index, "KVM_SET_LAPIC"))?;
    laps.lap("lapic");
    write_msrs(fd, index, &state.msrs)?;
    laps.lap("msrs");
    fd.set_mp_state(state.mp_state)
        .map_err(vcpu_err(index, "KVM_SET_MP_STATE"))?;
    fd.set_vcpu_events(&state.events)
        .map_err(vcpu_err(index, "KVM_SET_VCPU_EVENTS"))?;
    laps.lap("mp_state+events");
    tracing::debug!("vCPU {index} restored: {laps}");
    Ok(())
}

/// Writes the saved MSRs, the TSC deadline last (see the module documentation).
fn write_msrs(fd: &VcpuFd, index: u32, saved: &[kvm_msr_entry]) -> Result<(), StateError> {
    let mut ordered: Vec<kvm_msr_entry> = saved
        .iter()
        .filter(|e| e.index != MSR_IA32_TSC_DEADLINE)
        .copied()
        .collect();
    ordered.extend(saved.iter().filter(|e| e.index == MSR_IA32_TSC_DEADLINE));
    for batch in ordered.chunks(MSR_BATCH) {
        let msrs = Msrs::from_entries(batch).map_err(|_| StateError::TooMany {
            index,
            what: "an MSR batch",
            count: batch.len(),
            max: MSR_BATCH,
        })?;
        let set = fd
            .set_msrs(&msrs)
            .map_err(vcpu_err(index, "KVM_SET_MSRS"))?;
        if set < batch.len() {
            return Err(StateError::Msr {
                index,
                msr: batch[set].index,
                value: batch[set].data,
            });
        }
    }
    Ok(())
}

fn irqchip(vm: &VmFd, chip_id: u32, ioctl: &'static str) -> Result<kvm_irqchip, StateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip).map_err(vm_err(ioctl))?;
    Ok(chip)
}

/// Reads the VM-wide state: PICs, IOAPIC, PIT and kvmclock. The vCPUs must be paused.
pub fn save_vm(vm: &VmFd) -> Result<KvmVmState, StateError> {
    Ok(KvmVmState {
        pic_master: irqchip(vm, KVM_IRQCHIP_PIC_MASTER, "KVM_GET_IRQCHIP (PIC master)")?,
        pic_slave: irqchip(vm, KVM_IRQCHIP_PIC_SLAVE, "KVM_GET_IRQCHIP (PIC slave)")?,
        ioapic: irqchip(vm, KVM_IRQCHIP_IOAPIC, "KVM_GET_IRQCHIP (IOAPIC)")?,
        pit: vm.get_pit2().map_err(vm_err("KVM_GET_PIT2"))?,
        clock: vm.get_clock().map_err(vm_err("KVM_GET_CLOCK"))?,
    })
}

/// Puts the VM-wide state back, in the order the module explains.
pub fn restore_vm(vm: &VmFd, state: &KvmVmState) -> Result<(), StateError> {
    vm.set_pit2(&state.pit).map_err(vm_err("KVM_SET_PIT2"))?;
    let mut clock = state.clock;
    clock.flags = 0;
    vm.set_clock(&clock).map_err(vm_err("KVM_SET_CLOCK"))?;
    for (chip, chip_id, ioctl) in [
        (
            &state.pic_master,
            KVM_IRQCHIP_PIC_MASTER,
            "KVM_SET_IRQCHIP (PIC master)",
        ),
        (
            &state.pic_slave,
            KVM_IRQCHIP_PIC_SLAVE,
            "KVM_SET_IRQCHIP (PIC slave)",
        ),
        (
            &state.ioapic,
            KVM_IRQCHIP_IOAPIC,
            "KVM_SET_IRQCHIP (IOAPIC)",
        ),
    ] {
        // The chip id selects what KVM overwrites: take it from the field, not the file.
        let mut chip = *chip;
        chip.chip_id = chip_id;
        vm.set_irqchip(&chip).map_err(vm_err(ioctl))?;
    }
    Ok(())
}
