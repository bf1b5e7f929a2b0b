//! A vCPU's architectural state at the kernel's 64-bit entry point.
//!
//! Order matters and is the order of [`configure`]:
//! 1. CPUID first: KVM derives from it which MSRs, XSAVE features and APIC modes the vCPU
//!    has, so everything after depends on it.
//! 2. MSRs: the boot values (SYSENTER/SYSCALL MSRs cleared, fast strings, MTRRs on with
//!    write-back default so guest RAM is cacheable).
//! 3. General registers: RIP at the entry, RSI at the zero page (the 64-bit boot protocol),
//!    a stack below the page tables.
//! 4. FPU: the x87/SSE reset state the kernel expects (FCW 0x37f, MXCSR 0x1f80).
//! 5. Special registers: long mode (PE+PG, PAE, EFER.LME/LMA), the boot GDT's segments and
//!    CR3 at the identity page tables `boot` wrote.
//! 6. LAPIC: LINT0 as ExtINT and LINT1 as NMI, as firmware would leave them.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_segment, CpuId, Msrs};
use kvm_ioctls::VcpuFd;

use crate::boot::{
    BootEntry, BOOT_CODE_SELECTOR, BOOT_DATA_SELECTOR, BOOT_GDT, BOOT_IDT_START, BOOT_TSS_SELECTOR,
};
use crate::layout::{BOOT_GDT_START, BOOT_STACK_POINTER, PML4_START, ZERO_PAGE_START};

/// Errors setting a vCPU's boot state.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// An ioctl failed.
    #[error("vCPU {index}: {ioctl}: {source}")]
    Ioctl {
        /// vCPU index.
        index: u32,
        /// Which ioctl.
        ioctl: &'static str,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
    /// KVM accepted fewer MSRs than given.
    #[error("vCPU {index}: KVM_SET_MSRS set {set} of {wanted} boot MSRs")]
    Msrs {
        /// vCPU index.
        index: u32,
        /// How many were set.
        set: usize,
        /// How many were given.
        wanted: usize,
    },
}

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

const MISC_ENABLE_FAST_STRING: u64 = 1;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_WRITE_BACK: u64 = 6;

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Sets vCPU `index`'s CPUID and boot state so that it starts the kernel at `entry`.
pub fn configure(
    vcpu: &VcpuFd,
    index: u32,
    cpuid: &CpuId,
    entry: BootEntry,
) -> Result<(), RegsError> {
    let err = |ioctl| {
        move |source| RegsError::Ioctl {
            index,
            ioctl,
            source,
        }
    };
    vcpu.set_cpuid2(cpuid).map_err(err("KVM_SET_CPUID2"))?;

    let msrs = boot_msrs();
    let set = vcpu.set_msrs(&msrs).map_err(err("KVM_SET_MSRS"))?;
    if set != msrs.as_slice().len() {
        return Err(RegsError::Msrs {
            index,
            set,
            wanted: msrs.as_slice().len(),
        });
    }

    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry.rip.0,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START.0,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(err("KVM_SET_REGS"))?;

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(err("KVM_SET_FPU"))?;

    let mut sregs = vcpu.get_sregs().map_err(err("KVM_GET_SREGS"))?;
    let code = segment(BOOT_GDT[1], BOOT_CODE_SELECTOR);
    let data = segment(BOOT_GDT[2], BOOT_DATA_SELECTOR);
    let tss = segment(BOOT_GDT[3], BOOT_TSS_SELECTOR);
    sregs.gdt.base = BOOT_GDT_START.0;
    sregs.gdt.limit = (BOOT_GDT.len() * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT_START.0;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr3 = PML4_START.0;
    sregs.cr4 |= CR4_PAE;
    sregs.cr0 |= CR0_PE | CR0_PG | CR0_ET;
    sregs.efer |= EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).map_err(err("KVM_SET_SREGS"))?;

    let mut lapic = vcpu.get_lapic().map_err(err("KVM_GET_LAPIC"))?;
    set_lvt_mode(&mut lapic, APIC_LVT_LINT0, APIC_MODE_EXTINT);
    set_lvt_mode(&mut lapic, APIC_LVT_LINT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic).map_err(err("KVM_SET_LAPIC"))?;
    Ok(())
}

fn boot_msrs() -> Msrs {
    let e = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    let entries = [
        e(MSR_IA32_SYSENTER_CS, 0),
        e(MSR_IA32_SYSENTER_ESP, 0),
        e(MSR_IA32_SYSENTER_EIP, 0),
        e(MSR_STAR, 0),
        e(MSR_CSTAR, 0),
        e(MSR_KERNEL_GS_BASE, 0),
        e(MSR_SYSCALL_MASK, 0),
        e(MSR_LSTAR, 0),
        e(MSR_IA32_TSC, 0),
        e(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        e(MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_WRITE_BACK),
    ];
    Msrs::from_entries(&entries).expect("11 entries fit KVM_MAX_MSR_ENTRIES")
}

/// A KVM segment from a GDT descriptor.
fn segment(desc: u64, selector: u16) -> kvm_segment {
    let base = ((desc >> 16) & 0xff_ffff) | (((desc >> 56) & 0xff) << 24);
    let mut limit = (desc & 0xffff) | (((desc >> 48) & 0xf) << 16);
    let flags = (desc >> 40) & 0xf0ff;
    let g = (flags >> 15) & 1;
    if g == 1 {
        limit = (limit << 12) | 0xfff;
    }
    kvm_segment {
        base,
        limit: limit as u32,
        selector,
        type_: (flags & 0xf) as u8,
        present: ((flags >> 7) & 1) as u8,
        dpl: ((flags >> 5) & 3) as u8,
        db: ((flags >> 14) & 1) as u8,
        s: ((flags >> 4) & 1) as u8,
        l: ((flags >> 13) & 1) as u8,
        g: g as u8,
        avl: ((flags >> 12) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

fn set_lvt_mode(lapic: &mut kvm_lapic_state, offset: usize, mode: u32) {
    let mut raw = [0u8; 4];
    for (i, b) in raw.iter_mut().enumerate() {
        *b = lapic.regs[offset + i] as u8;
    }
    let value = (u32::from_le_bytes(raw) & !0x700) | (mode << 8);
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        lapic.regs[offset + i] = *b as _;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_descriptors_decode_to_long_mode_segments() {
        let cs = segment(BOOT_GDT[1], BOOT_CODE_SELECTOR);
        assert_eq!(
            (cs.l, cs.db, cs.present, cs.type_, cs.limit),
            (1, 0, 1, 0xb, 0xffff_ffff)
        );
        let ds = segment(BOOT_GDT[2], BOOT_DATA_SELECTOR);
        assert_eq!((ds.l, ds.db, ds.type_, ds.s), (0, 1, 0x3, 1));
        let tr = segment(BOOT_GDT[3], BOOT_TSS_SELECTOR);
        assert_eq!((tr.type_, tr.s), (0xb, 0));
    }

    #[test]
    fn lint_modes_are_set() {
        let mut lapic = kvm_lapic_state::default();
        set_lvt_mode(&mut lapic, APIC_LVT_LINT0, APIC_MODE_EXTINT);
        assert_eq!(lapic.regs[APIC_LVT_LINT0 + 1] as u8, 0x7);
        assert_eq!(boot_msrs().as_slice().len(), 11);
    }
}
