//! hospes' KVM side: one microVM from a validated spec to its exit.
//!
//! `spec` parses and checks a service spec; `vm` builds the VM (memory, devices, boot,
//! ACPI, vCPUs) and runs its event loop. Everything here returns typed errors; the binary
//! turns them into messages and exit codes.
#![deny(missing_docs)]

pub mod acpi;
pub mod api;
pub mod boot;
pub mod bus;
pub mod checkpoint;
mod control;
pub mod cpuid;
pub mod dirty;
mod laps;
pub mod layout;
pub mod memory;
pub mod migration;
pub mod regs;
pub mod spec;
pub mod state;
pub mod terminal;
pub mod vcpu;
pub mod vm;

use std::path::PathBuf;

/// Errors that end a VM or keep it from starting.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The spec is invalid.
    #[error(transparent)]
    Spec(#[from] spec::SpecError),
    /// The host's KVM lacks hardware virtualization.
    #[error(
        "this host's CPU has no hardware virtualization (no vmx or svm flag in /proc/cpuinfo; \
         /dev/kvm is a software hypervisor such as PVM): stock Linux kernels cannot run here. \
         Use the nested test rig instead: resources/run.sh SPEC.toml"
    )]
    NoHardwareVirtualization,
    /// The spec names no kernel and the default guest is missing.
    #[error("the spec names no kernel and the default guest is not built in {dir}: run resources/guest/build.sh (or set HOSPES_GUEST_DIR)")]
    NoDefaultGuest {
        /// Where it was looked for.
        dir: PathBuf,
    },
    /// KVM lacks a capability hospes needs.
    #[error("KVM lacks the {0} capability")]
    MissingCapability(&'static str),
    /// A KVM ioctl failed.
    #[error("{what}: {source}")]
    Kvm {
        /// The ioctl or step.
        what: &'static str,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
    /// A host resource failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// Guest memory setup failed.
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    /// Device placement failed.
    #[error(transparent)]
    Bus(#[from] bus::BusError),
    /// Loading the kernel failed.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// Writing ACPI tables failed.
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    /// Setting vCPU registers failed.
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    /// A device could not be set up from the spec.
    #[error("device {id}: {reason}")]
    Device {
        /// The device id from the spec.
        id: String,
        /// What failed, with the offending value.
        reason: String,
    },
    /// The snapshot cannot be used; nothing was started.
    #[error("snapshot {}: {reason}", dir.display())]
    BadSnapshot {
        /// The snapshot directory.
        dir: PathBuf,
        /// What is wrong, with the offending value.
        reason: String,
    },
    /// A saved state does not fit the VM built for it; nothing was started.
    #[error("the saved state does not fit the VM built for it: {reason}")]
    StateMismatch {
        /// What differs, with both values.
        reason: String,
    },
    /// Restoring KVM state failed.
    #[error(transparent)]
    State(#[from] state::StateError),
    /// The control API could not start.
    #[error(transparent)]
    Api(#[from] api::ApiError),
    /// A migration failed.
    #[error(transparent)]
    Migration(#[from] migration::MigrationError),
    /// The event loop failed.
    #[error("event loop: {0}")]
    EventLoop(String),
    /// A vCPU hit a fatal exit.
    #[error("vCPU {index} stopped the VM: {reason}")]
    VcpuFailed {
        /// vCPU index.
        index: u32,
        /// The exit and the registers.
        reason: String,
    },
}
