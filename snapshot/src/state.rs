//! The state types. Every collection here has a cap in [`crate::format::Caps`], checked
//! when a payload is decoded, before anything acts on it.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use serde::{Deserialize, Serialize};
use zerocopy::FromBytes;

/// The whole VM: machine configuration, KVM state, device state, where memory is.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmState {
    /// What the VM is made of (the spec it was started from, resolved).
    pub machine: MachineConfig,
    /// Guest RAM layout; the bytes are in the memory file.
    pub memory: MemoryState,
    /// VM-wide KVM state: interrupt controllers, PIT, kvmclock.
    pub vm: KvmVmState,
    /// One entry per vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// Device state.
    pub devices: DevicesState,
}

/// The machine as configured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineConfig {
    /// Service name.
    pub name: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Guest RAM in MiB.
    pub memory_mib: u32,
    /// The kernel command line the guest booted with (informational).
    pub cmdline: String,
    /// Drives in guest order.
    pub drives: Vec<DriveConfig>,
    /// Network interfaces in guest order, after the drives.
    pub nets: Vec<NetConfig>,
}

/// A drive: its image is `file` inside the snapshot directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriveConfig {
    /// The drive id (the guest's disk serial).
    pub id: String,
    /// File name of the image inside the snapshot directory.
    pub file: String,
    /// Image size in bytes when saved.
    pub size: u64,
    /// Read-only drive.
    pub read_only: bool,
    /// `"writeback"` or `"none"`.
    pub cache: String,
}

/// A network interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    /// Interface id.
    pub id: String,
    /// TAP interface name.
    pub tap: String,
    /// Guest MAC.
    pub mac: [u8; 6],
}

/// Guest RAM: regions in guest-physical order; the memory file holds them back to back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryState {
    /// File name inside the snapshot directory.
    pub file: String,
    /// (guest physical address, size in bytes) per region.
    pub regions: Vec<(u64, u64)>,
}

impl MemoryState {
    /// Total bytes of guest RAM, which is also the memory file's length.
    pub fn total_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.1).sum()
    }
}

impl VmState {
    /// A state of the shape `machine` and `regions` describe, its KVM structures filled
    /// with a non-zero pattern (so that no trailing zeros are left out: every byte takes
    /// the encoder's and decoder's paths) and with idle devices: something to run them on
    /// before the real state exists. A migration does, so that neither runs for the first time inside the
    /// guest's pause (see `vmm::migration`). It passes every check [`crate::decode`] makes.
    pub fn stand_in(machine: MachineConfig, regions: Vec<(u64, u64)>) -> VmState {
        let queue = QueueState {
            max_size: 256,
            size: 256,
            ready: true,
            desc_table: 0x1000,
            avail_ring: 0x2000,
            used_ring: 0x3000,
            next_avail: 1,
            next_used: 1,
            event_idx_enabled: true,
        };
        let transport = |device_type| VirtioTransportState {
            device_type,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            acked_unknown_feature_word: false,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
            interrupt_status: 0,
            activated: true,
            queues: vec![queue; 2],
        };
        let virtio = (machine.drives.iter().map(|_| transport(2)))
            .chain(machine.nets.iter().map(|_| transport(1)))
            .collect();
        let vcpus = (0..machine.vcpus)
            .map(|_| VcpuState {
                cpuid: vec![patterned(); 40],
                mp_state: patterned(),
                regs: patterned(),
                sregs: patterned(),
                xsave: patterned(),
                xcrs: patterned(),
                debugregs: patterned(),
                lapic: patterned(),
                msrs: vec![patterned(); 100],
                events: patterned(),
                tsc_khz: Some(1),
            })
            .collect();
        VmState {
            machine,
            memory: MemoryState {
                file: crate::MEMORY_FILE.into(),
                regions,
            },
            vm: KvmVmState {
                pic_master: patterned(),
                pic_slave: patterned(),
                ioapic: patterned(),
                pit: patterned(),
                clock: patterned(),
            },
            vcpus,
            devices: DevicesState {
                serial: SerialState {
                    baud_divisor_low: 1,
                    baud_divisor_high: 0,
                    interrupt_enable: 0,
                    interrupt_identification: 1,
                    line_control: 3,
                    line_status: 0x60,
                    modem_control: 8,
                    modem_status: 0xb0,
                    scratch: 0,
                    in_buffer: vec![b'\n'],
                },
                virtio,
            },
        }
    }
}

/// A `T` whose every byte is 0x5a.
fn patterned<T: FromBytes>() -> T {
    let bytes = vec![0x5a; std::mem::size_of::<T>()];
    T::read_from_bytes(&bytes).unwrap_or_else(|_| unreachable!("exactly size_of::<T>() bytes"))
}

/// VM-wide KVM state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KvmVmState {
    /// KVM_GET_IRQCHIP chip 0.
    #[serde(with = "crate::hex")]
    pub pic_master: kvm_irqchip,
    /// KVM_GET_IRQCHIP chip 1.
    #[serde(with = "crate::hex")]
    pub pic_slave: kvm_irqchip,
    /// KVM_GET_IRQCHIP chip 2.
    #[serde(with = "crate::hex")]
    pub ioapic: kvm_irqchip,
    /// KVM_GET_PIT2.
    #[serde(with = "crate::hex")]
    pub pit: kvm_pit_state2,
    /// KVM_GET_CLOCK.
    #[serde(with = "crate::hex")]
    pub clock: kvm_clock_data,
}

/// One vCPU, as KVM reports it while paused.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// The CPUID the vCPU was given.
    #[serde(with = "crate::hex::vec")]
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// KVM_GET_MP_STATE.
    #[serde(with = "crate::hex")]
    pub mp_state: kvm_mp_state,
    /// General registers.
    #[serde(with = "crate::hex")]
    pub regs: kvm_regs,
    /// Segment and control registers.
    #[serde(with = "crate::hex")]
    pub sregs: kvm_sregs,
    /// FPU, SSE and AVX state.
    #[serde(with = "crate::hex")]
    pub xsave: kvm_xsave,
    /// Extended control registers.
    #[serde(with = "crate::hex")]
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    #[serde(with = "crate::hex")]
    pub debugregs: kvm_debugregs,
    /// The local APIC's registers.
    #[serde(with = "crate::hex")]
    pub lapic: kvm_lapic_state,
    /// Every MSR of KVM's index list that KVM could read.
    #[serde(with = "crate::hex::vec")]
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions, interrupts, NMIs, SMIs.
    #[serde(with = "crate::hex")]
    pub events: kvm_vcpu_events,
    /// TSC frequency in kHz, when KVM reports it.
    pub tsc_khz: Option<u32>,
}

/// Device state, in bus order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevicesState {
    /// COM1.
    pub serial: SerialState,
    /// One entry per virtio-mmio window, in guest order (drives, then nets).
    pub virtio: Vec<VirtioTransportState>,
}

/// The 16550's registers (vm-superio's `SerialState`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    /// Divisor latch low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch high byte.
    pub baud_divisor_high: u8,
    /// IER.
    pub interrupt_enable: u8,
    /// IIR.
    pub interrupt_identification: u8,
    /// LCR.
    pub line_control: u8,
    /// LSR.
    pub line_status: u8,
    /// MCR.
    pub modem_control: u8,
    /// MSR.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Bytes in the receive FIFO.
    pub in_buffer: Vec<u8>,
}

/// A virtio-mmio transport and the queues of the device behind it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioTransportState {
    /// virtio device ID (2 block, 1 net): checked against the configured device.
    pub device_type: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// Features the driver wrote.
    pub driver_features: u64,
    /// The driver acked a bit in a feature word we do not have.
    pub acked_unknown_feature_word: bool,
    /// QueueSel.
    pub queue_sel: u32,
    /// Device status.
    pub status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// Whether the device was activated (DRIVER_OK seen and accepted).
    pub activated: bool,
    /// Per queue.
    pub queues: Vec<QueueState>,
}

/// One virtqueue (virtio-queue's `QueueState`), plus the addresses the driver wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    /// Max size offered by the device.
    pub max_size: u16,
    /// Size the driver chose.
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available (driver) ring address.
    pub avail_ring: u64,
    /// Used (device) ring address.
    pub used_ring: u64,
    /// Next available index the device will read.
    pub next_avail: u16,
    /// Next used index the device will write.
    pub next_used: u16,
    /// VIRTIO_F_RING_EVENT_IDX negotiated.
    pub event_idx_enabled: bool,
}
