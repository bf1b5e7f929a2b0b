//! vCPU threads: each runs `KVM_RUN` in a loop and dispatches PIO/MMIO exits to the buses.
//!
//! A vCPU never decides the VM's fate itself: on an exit that ends the guest (a triple
//! fault, a KVM internal error, a failed entry) it reports a [`VcpuEvent`] to the VMM
//! thread over a channel, signals an `EventFd` so the event loop wakes, and parks.

use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::thread::JoinHandle;

use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::Bus;

/// Something a vCPU tells the VMM thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuEvent {
    /// The guest asked for power-off through a KVM system event.
    PowerOff,
    /// The guest asked for a reset through a KVM system event.
    Reset,
    /// The vCPU cannot continue; the text names the exit and the registers.
    Failed {
        /// vCPU index.
        index: u32,
        /// What happened, with the registers.
        reason: String,
    },
}

/// Where a vCPU sends its exits and reports.
pub struct VcpuLinks {
    /// The PIO bus.
    pub pio: Arc<Bus>,
    /// The MMIO bus.
    pub mmio: Arc<Bus>,
    /// Reports to the VMM thread.
    pub events: Sender<VcpuEvent>,
    /// Wakes the VMM thread's event loop after a report.
    pub wake: EventFd,
}

/// A vCPU thread's stack. KVM_RUN and the device register handlers need little; the
/// default 2 MiB stack is exactly one transparent huge page, and with THP on (as hosts
/// commonly run it) its first touch makes all 2 MiB resident.
const VCPU_STACK_SIZE: usize = 512 << 10;

/// Starts vCPU `index` on its own thread.
pub fn spawn(index: u32, mut fd: VcpuFd, links: VcpuLinks) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("vcpu{index}"))
        .stack_size(VCPU_STACK_SIZE)
        .spawn(move || {
            let event = run(index, &mut fd, &links);
            // The receiver lives as long as the VMM thread's loop; if it is gone the process is
            // exiting anyway.
            let _ = links.events.send(event);
            let _ = links.wake.write(1);
            // Park: the process ends when the VMM thread decides, not when a vCPU returns.
            loop {
                std::thread::park();
            }
        })
}

fn run(index: u32, fd: &mut VcpuFd, links: &VcpuLinks) -> VcpuEvent {
    loop {
        let failure = match fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                links.pio.read(u64::from(port), data);
                continue;
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                links.pio.write(u64::from(port), data);
                continue;
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !links.mmio.read(addr, data) {
                    tracing::debug!(
                        "vcpu{index}: MMIO read of {} bytes at {addr:#x}: no device",
                        data.len()
                    );
                }
                continue;
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if !links.mmio.write(addr, data) {
                    tracing::debug!(
                        "vcpu{index}: MMIO write of {} bytes at {addr:#x}: no device",
                        data.len()
                    );
                }
                continue;
            }
            // With the in-kernel LAPIC, HLT is handled by KVM; an exit here is spurious.
            Ok(VcpuExit::Hlt) => continue,
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => return VcpuEvent::PowerOff,
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => return VcpuEvent::Reset,
                other => format!("unknown KVM system event {other}"),
            },
            Ok(VcpuExit::Shutdown) => "triple fault (KVM_EXIT_SHUTDOWN)".to_string(),
            Ok(VcpuExit::InternalError) => {
                "KVM internal error (KVM_EXIT_INTERNAL_ERROR)".to_string()
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                format!("KVM_RUN entry failed: hardware reason {reason:#x} on host cpu {cpu}")
            }
            Ok(other) => format!("unexpected vCPU exit {other:?}"),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => format!("KVM_RUN: {e}"),
        };
        return VcpuEvent::Failed {
            index,
            reason: format!("{failure}; {}", describe_registers(fd)),
        };
    }
}

/// The registers a user needs to see why a guest died.
pub fn describe_registers(fd: &VcpuFd) -> String {
    let regs = match fd.get_regs() {
        Ok(r) => format!(
            "rip={:#x} rsp={:#x} rflags={:#x} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x}",
            r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi
        ),
        Err(e) => format!("registers unavailable ({e})"),
    };
    let sregs = match fd.get_sregs() {
        Ok(s) => format!(
            " cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x}/{:#x}",
            s.cr0, s.cr2, s.cr3, s.cr4, s.efer, s.cs.selector, s.cs.base
        ),
        Err(e) => format!(" special registers unavailable ({e})"),
    };
    regs + &sregs
}
