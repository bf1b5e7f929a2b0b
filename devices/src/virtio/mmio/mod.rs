//! The virtio-mmio transport (virtio 1.x, register layout version 2, no legacy): the
//! register file the guest drives over a 4 KiB MMIO window, feature negotiation, queue
//! setup and validation, device status and reset, and dispatch of queue notifications to
//! the device on the VMM thread. Saving and restoring the transport is in `state`.

mod state;
#[cfg(test)]
mod tests;

use std::os::fd::AsRawFd;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::status::{ACKNOWLEDGE, DEVICE_NEEDS_RESET, DRIVER, DRIVER_OK, FAILED, FEATURES_OK};
use super::{
    warn_limited, DeviceContext, DeviceError, Interrupt, VirtioDevice, WarnLimiter,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use crate::{BusDevice, GuestMemoryMmap};

pub use self::state::RestoreError;

const MMIO_MAGIC: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
const VENDOR_ID: u32 = 0;

// Register offsets (virtio 1.x §4.2.2).
const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
/// QueueNotify: the offset the VMM registers each queue's ioeventfd on (datamatch = index).
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const REG_SHM_LEN_LOW: u64 = 0x0b0;
const REG_SHM_LEN_HIGH: u64 = 0x0b4;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
/// Start of the device-specific configuration space.
pub const CONFIG_SPACE_OFFSET: u64 = 0x100;
/// Size of the MMIO window of one device.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;

/// epoll `data` for extra device fds starts here; queue eventfds use their queue index.
const EXTRA_FD_DATA_BASE: u32 = 0x1_0000;

/// Errors creating a transport.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// An eventfd for a queue notification could not be created.
    #[error("creating the notification eventfd for queue {index} failed: {source}")]
    QueueEventFd {
        /// Queue index.
        index: usize,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A saved transport state was refused.
    #[error(transparent)]
    Restore(#[from] RestoreError),
    /// The device declared a queue size virtio-queue cannot represent.
    #[error("device type {device_type} declares queue {index} with invalid max size {size}")]
    QueueMaxSize {
        /// virtio device ID.
        device_type: u32,
        /// Queue index.
        index: usize,
        /// The declared maximum size.
        size: u16,
    },
}

/// Queue size and ring addresses as the driver wrote them; applied to the `Queue` when it
/// sets QueueReady, so that a bad value is caught there instead of being dropped silently.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct QueueAddresses {
    size: u16,
    desc: u64,
    driver: u64,
    device: u64,
}

/// One virtio device behind a virtio-mmio register window.
///
/// Put it on the MMIO bus (as [`BusDevice`]) and add it to the VMM's event manager (as
/// [`MutEventSubscriber`]); register [`MmioTransport::queue_events`] as ioeventfds on
/// `base + REG_QUEUE_NOTIFY` with datamatch = queue index.
pub struct MmioTransport {
    mem: GuestMemoryMmap,
    device: Box<dyn VirtioDevice + Send>,
    interrupt: Interrupt,
    queues: Vec<Queue>,
    queue_addresses: Vec<QueueAddresses>,
    queue_events: Vec<EventFd>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    acked_unknown_feature_word: bool,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
    activated: bool,
    warn: WarnLimiter,
}

impl MmioTransport {
    /// Wraps `device`; `irq` is the eventfd the VMM registers as the device's irqfd.
    pub fn new(
        mem: GuestMemoryMmap,
        device: Box<dyn VirtioDevice + Send>,
        irq: EventFd,
    ) -> Result<MmioTransport, MmioError> {
        let device_type = device.device_type();
        let mut queues = Vec::new();
        let mut queue_events = Vec::new();
        for (index, &size) in device.queue_max_sizes().iter().enumerate() {
            let queue = Queue::new(size).map_err(|_| MmioError::QueueMaxSize {
                device_type,
                index,
                size,
            })?;
            queues.push(queue);
            let event = EventFd::new(EFD_NONBLOCK)
                .map_err(|source| MmioError::QueueEventFd { index, source })?;
            queue_events.push(event);
        }
        Ok(MmioTransport {
            mem,
            device,
            interrupt: Interrupt::new(irq),
            queue_addresses: queues
                .iter()
                .map(|q| QueueAddresses {
                    size: q.max_size(),
                    ..Default::default()
                })
                .collect(),
            queues,
            queue_events,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            acked_unknown_feature_word: false,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
            activated: false,
            warn: WarnLimiter::new(format!("virtio-mmio type {device_type}")),
        })
    }

    /// One notification eventfd per queue, index = queue index.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Whether the driver set DRIVER_OK and the device activated.
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// The virtio device ID of the device behind this transport.
    pub fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    fn selected_queue(&self) -> Option<usize> {
        let index = self.queue_sel as usize;
        (index < self.queues.len()).then_some(index)
    }

    fn device_features(&self) -> u64 {
        self.device.avail_features() | VIRTIO_F_VERSION_1
    }

    fn read_register(&self, offset: u64) -> u32 {
        match offset {
            REG_MAGIC => MMIO_MAGIC,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device_features() as u32,
                1 => (self.device_features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self
                .selected_queue()
                .map_or(0, |i| u32::from(self.queues[i].max_size())),
            REG_QUEUE_READY => self
                .selected_queue()
                .map_or(0, |i| u32::from(self.queues[i].ready())),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.status,
            REG_QUEUE_DESC_LOW..=REG_QUEUE_DEVICE_HIGH => self.read_queue_address(offset),
            // No shared memory regions: their length reads as -1.
            REG_SHM_LEN_LOW | REG_SHM_LEN_HIGH => u32::MAX,
            REG_CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn read_queue_address(&self, offset: u64) -> u32 {
        let Some(i) = self.selected_queue() else {
            return 0;
        };
        let a = &self.queue_addresses[i];
        let (value, high) = match offset {
            REG_QUEUE_DESC_LOW => (a.desc, false),
            REG_QUEUE_DESC_HIGH => (a.desc, true),
            REG_QUEUE_DRIVER_LOW => (a.driver, false),
            REG_QUEUE_DRIVER_HIGH => (a.driver, true),
            REG_QUEUE_DEVICE_LOW => (a.device, false),
            REG_QUEUE_DEVICE_HIGH => (a.device, true),
            _ => return 0,
        };
        if high {
            (value >> 32) as u32
        } else {
            value as u32
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            REG_DRIVER_FEATURES => self.write_driver_features(value),
            REG_QUEUE_SEL => self.queue_sel = value,
            REG_QUEUE_NUM | REG_QUEUE_READY | REG_QUEUE_DESC_LOW..=REG_QUEUE_DEVICE_HIGH => {
                self.write_queue_register(offset, value)
            }
            REG_QUEUE_NOTIFY => self.notify(value),
            REG_INTERRUPT_ACK => self.interrupt.ack(value),
            REG_STATUS => self.write_status(value),
            _ => warn_limited!(
                self.warn,
                "guest wrote {value:#x} to read-only or unknown register {offset:#x}"
            ),
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        if self.status & FEATURES_OK != 0 {
            warn_limited!(self.warn, "guest changed driver features after FEATURES_OK");
            return;
        }
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value),
            1 => {
                self.driver_features =
                    (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
            }
            sel => {
                if value != 0 {
                    warn_limited!(
                        self.warn,
                        "guest acked features {value:#x} in unknown feature word {sel}"
                    );
                    // Bits we never offered: refused at FEATURES_OK.
                    self.acked_unknown_feature_word = true;
                }
            }
        }
    }

    fn write_queue_register(&mut self, offset: u64, value: u32) {
        // Queue setup happens between FEATURES_OK and DRIVER_OK; later changes would race
        // with the device using the queue.
        if self.status & DRIVER_OK != 0 {
            warn_limited!(
                self.warn,
                "guest wrote queue register {offset:#x} = {value:#x} after DRIVER_OK"
            );
            return;
        }
        let Some(i) = self.selected_queue() else {
            warn_limited!(
                self.warn,
                "guest wrote queue register {offset:#x} for non-existent queue {}",
                self.queue_sel
            );
            return;
        };
        let set_low = |old: u64| (old & !0xffff_ffff) | u64::from(value);
        let set_high = |old: u64| (old & 0xffff_ffff) | (u64::from(value) << 32);
        let addresses = &mut self.queue_addresses[i];
        match offset {
            // Validated (power of two, <= max) when the queue is made ready.
            REG_QUEUE_NUM => addresses.size = u16::try_from(value).unwrap_or(0),
            REG_QUEUE_READY => self.set_queue_ready(i, value == 1),
            REG_QUEUE_DESC_LOW => addresses.desc = set_low(addresses.desc),
            REG_QUEUE_DESC_HIGH => addresses.desc = set_high(addresses.desc),
            REG_QUEUE_DRIVER_LOW => addresses.driver = set_low(addresses.driver),
            REG_QUEUE_DRIVER_HIGH => addresses.driver = set_high(addresses.driver),
            REG_QUEUE_DEVICE_LOW => addresses.device = set_low(addresses.device),
            REG_QUEUE_DEVICE_HIGH => addresses.device = set_high(addresses.device),
            _ => {}
        }
    }

    fn set_queue_ready(&mut self, index: usize, ready: bool) {
        if !ready {
            self.queues[index].set_ready(false);
            return;
        }
        let a = self.queue_addresses[index];
        let queue = &mut self.queues[index];
        let problem = if queue
            .try_set_desc_table_address(GuestAddress(a.desc))
            .is_err()
        {
            Some("descriptor table not 16-byte aligned")
        } else if queue
            .try_set_avail_ring_address(GuestAddress(a.driver))
            .is_err()
        {
            Some("available ring not 2-byte aligned")
        } else if queue
            .try_set_used_ring_address(GuestAddress(a.device))
            .is_err()
        {
            Some("used ring not 4-byte aligned")
        } else if queue.try_set_size(a.size).is_err() {
            Some("size is zero, not a power of two, or above QueueNumMax")
        } else {
            queue.set_ready(true);
            (!queue.is_valid(&self.mem)).then_some("rings are not inside guest memory")
        };
        if let Some(reason) = problem {
            self.queues[index].set_ready(false);
            self.needs_reset(format!(
                "queue {index} (size {}, desc {:#x}, driver {:#x}, device {:#x}): {reason}",
                a.size, a.desc, a.driver, a.device
            ));
        }
    }

    fn notify(&mut self, value: u32) {
        // Normally an ioeventfd catches this write before it leaves KVM. Signal the eventfd
        // rather than processing here: queue work belongs on the VMM thread, not a vCPU.
        match self.queue_events.get(value as usize) {
            Some(event) => {
                if let Err(e) = event.write(1) {
                    tracing::error!("signalling queue {value} eventfd failed: {e}");
                }
            }
            None => warn_limited!(self.warn, "guest notified non-existent queue {value}"),
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // NEEDS_RESET is the device's bit; a driver writing back what it read may echo it.
        let value = (value & !DEVICE_NEEDS_RESET) | (self.status & DEVICE_NEEDS_RESET);
        let old = self.status;
        if value & old != old {
            warn_limited!(
                self.warn,
                "guest cleared status bits ({old:#x} -> {value:#x}) without a reset"
            );
            return;
        }
        let new_bits = value & !old;
        if new_bits & !(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK | FAILED) != 0 {
            warn_limited!(self.warn, "guest set unknown status bits {new_bits:#x}");
        }
        if new_bits & FEATURES_OK != 0 && !self.accept_features() {
            // Spec: the device does not set FEATURES_OK when it refuses the features; the
            // driver re-reads Status and gives up.
            self.status = (value & !(FEATURES_OK | DRIVER_OK)) | (self.status & DEVICE_NEEDS_RESET);
            return;
        }
        self.status = value;
        if new_bits & DRIVER_OK != 0 {
            self.activate();
        }
    }

    fn accept_features(&mut self) -> bool {
        let offered = self.device_features();
        let unknown = self.driver_features & !offered;
        if unknown != 0 || self.acked_unknown_feature_word {
            self.needs_reset(format!(
                "driver acked features {unknown:#x} that were not offered ({offered:#x})"
            ));
            return false;
        }
        if self.driver_features & VIRTIO_F_VERSION_1 == 0 {
            self.needs_reset(format!(
                "driver features {:#x} lack VIRTIO_F_VERSION_1 (legacy drivers are not supported)",
                self.driver_features
            ));
            return false;
        }
        true
    }

    fn activate(&mut self) {
        if self.status & FEATURES_OK == 0 {
            self.needs_reset("driver set DRIVER_OK without FEATURES_OK".into());
            return;
        }
        if self.status & DEVICE_NEEDS_RESET != 0 {
            return;
        }
        if let Err(e) = self.activate_device() {
            self.needs_reset(e.to_string());
        }
    }

    /// Hands the queues to the device with the negotiated features; shared by DRIVER_OK
    /// and snapshot restore.
    fn activate_device(&mut self) -> Result<(), DeviceError> {
        let event_idx = self.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
        for queue in &mut self.queues {
            queue.set_event_idx(event_idx);
        }
        let mut ctx = DeviceContext {
            mem: &self.mem,
            queues: &mut self.queues,
            acked_features: self.driver_features,
            interrupt: &self.interrupt,
        };
        self.device.activate(&mut ctx)?;
        self.activated = true;
        Ok(())
    }

    /// Marks the device DEVICE_NEEDS_RESET and tells the driver; it stops processing queues
    /// until the driver resets it.
    fn needs_reset(&mut self, why: String) {
        warn_limited!(self.warn, "device needs reset: {why}");
        self.status |= DEVICE_NEEDS_RESET;
        self.interrupt.signal_config_change();
    }

    fn reset(&mut self) {
        self.device.reset();
        for queue in &mut self.queues {
            queue.reset();
        }
        for (a, q) in self.queue_addresses.iter_mut().zip(&self.queues) {
            *a = QueueAddresses {
                size: q.max_size(),
                ..Default::default()
            };
        }
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.acked_unknown_feature_word = false;
        self.queue_sel = 0;
        self.status = 0;
        self.activated = false;
        self.interrupt.reset();
        // Drop stale notifications so they are not taken for new ones.
        for event in &self.queue_events {
            let _ = event.read();
        }
    }

    fn can_process(&self) -> bool {
        self.activated && self.status & (DEVICE_NEEDS_RESET | FAILED) == 0
    }

    /// Processes queue `index` as if its eventfd had fired.
    pub fn process_queue(&mut self, index: usize) {
        if !self.can_process() || !self.queues.get(index).is_some_and(|q| q.ready()) {
            return;
        }
        let mut ctx = DeviceContext {
            mem: &self.mem,
            queues: &mut self.queues,
            acked_features: self.driver_features,
            interrupt: &self.interrupt,
        };
        if let Err(e) = self.device.process_queue(index, &mut ctx) {
            self.needs_reset(e.to_string());
        }
    }

    /// Processes every queue as if all their eventfds had fired, when the device is
    /// activated and healthy; interrupts the guest as the device's batches require.
    ///
    /// The VMM calls this before saving (so requests the guest already posted complete
    /// and nothing is half-done in the state) and after restoring (so notifications the
    /// old process received but never handled are not lost).
    pub fn process_all_queues(&mut self) {
        for index in 0..self.queues.len() {
            self.process_queue(index);
        }
    }

    /// Starts a restored transport, on the VMM thread once the VM-wide interrupt state
    /// and every vCPU's state are restored and before the vCPUs run: processes every queue
    /// (notifications the old process received but never handled), then raises the
    /// interrupt once if InterruptStatus is set (see [`Interrupt::raise_pending`]).
    pub fn resume(&mut self) {
        self.process_all_queues();
        self.interrupt.raise_pending();
    }

    fn process_extra(&mut self, index: usize, events: EventSet) {
        if !self.can_process() {
            return;
        }
        let mut ctx = DeviceContext {
            mem: &self.mem,
            queues: &mut self.queues,
            acked_features: self.driver_features,
            interrupt: &self.interrupt,
        };
        if let Err(e) = self.device.process_extra_event(index, events, &mut ctx) {
            self.needs_reset(e.to_string());
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            data.fill(0);
            self.device.read_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            warn_limited!(
                self.warn,
                "guest read {} bytes at register {offset:#x}; only aligned 32-bit accesses are valid",
                data.len()
            );
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_register(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.device.write_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            warn_limited!(
                self.warn,
                "guest wrote {} bytes at register {offset:#x}; only 32-bit accesses are valid",
                data.len()
            );
            return;
        };
        if !offset.is_multiple_of(4) {
            warn_limited!(
                self.warn,
                "guest wrote unaligned register offset {offset:#x}"
            );
            return;
        }
        self.write_register(offset, u32::from_le_bytes(bytes));
    }
}

impl MutEventSubscriber for MmioTransport {
    fn init(&mut self, ops: &mut EventOps) {
        for (index, event) in self.queue_events.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(event, index as u32, EventSet::IN)) {
                tracing::error!("registering queue {index} eventfd failed: {e}");
            }
        }
        for (index, (fd, set)) in self.device.extra_fds().into_iter().enumerate() {
            let data = EXTRA_FD_DATA_BASE + index as u32;
            if let Err(e) = ops.add(Events::with_data_raw(fd, data, set)) {
                tracing::error!("registering device fd {fd} failed: {e}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let data = events.data();
        if let Some(event) = self.queue_events.get(data as usize) {
            debug_assert_eq!(event.as_raw_fd(), events.fd());
            // Drained before the DRIVER_OK check: a notification before activation is
            // dropped, and the eventfd stops being readable.
            let _ = event.read();
            self.process_queue(data as usize);
        } else if let Some(index) = data.checked_sub(EXTRA_FD_DATA_BASE) {
            self.process_extra(index as usize, events.event_set());
        }
    }
}
