//! virtio devices: the virtio-mmio transport, the `VirtioDevice` trait it drives, the
//! interrupt a device raises, and the block and network devices.
//!
//! Queue processing runs on the VMM thread (the transport is an event-manager subscriber);
//! vCPU threads only touch registers through [`crate::BusDevice`].

pub mod block;
mod chain;
pub mod mmio;
pub mod net;
/// Copies a device's config space at `offset` into `data`; bytes of `data` past the end
/// of the config space are left as the transport filled them.
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    let start = usize::try_from(offset)
        .unwrap_or(usize::MAX)
        .min(config.len());
    let end = start.saturating_add(data.len()).min(config.len());
    data[..end - start].copy_from_slice(&config[start..end]);
}

#[cfg(test)]
mod test_utils;

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use event_manager::EventSet;
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::GuestMemoryMmap;

pub use block::{set_bits, Block, BlockConfig, BlockError, CacheMode, DiskDirty, DIRTY_BLOCK_SIZE};
pub use mmio::{MmioError, MmioTransport, RestoreError};
pub use net::{mac_from_name, Net, NetConfig, NetError, TapQueue};

/// Feature bit: the device follows virtio 1.x (no legacy interface).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Feature bit: `used_event` / `avail_event` notification suppression.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
/// Feature bit: indirect descriptor tables.
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;

/// InterruptStatus bit: the device used buffers in a queue.
pub const INTERRUPT_USED_RING: u32 = 1;
/// InterruptStatus bit: the device configuration (or device status) changed.
pub const INTERRUPT_CONFIG_CHANGE: u32 = 2;

/// Status bits the driver writes (virtio 1.x §2.1).
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is set up and ready to drive the device.
    pub const DRIVER_OK: u32 = 4;
    /// The driver acknowledged the features it understands; negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 0x80;
}

/// Errors a device reports to its transport while activating or processing queues. Every
/// one of them means the driver misbehaved (or the host failed) badly enough that the
/// transport marks the device DEVICE_NEEDS_RESET.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// virtio-queue refused a ring access (bad avail index, used ring outside memory...).
    #[error("virtqueue {index}: {source}")]
    Queue {
        /// Queue index.
        index: usize,
        /// What virtio-queue reported.
        #[source]
        source: virtio_queue::Error,
    },
    /// A descriptor chain that the device cannot even complete with an error status.
    #[error("virtqueue {index}: descriptor chain with head {head} is unusable: {reason}")]
    MalformedChain {
        /// Queue index.
        index: usize,
        /// Head descriptor index.
        head: u16,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A queue the device needs was not set up by the driver.
    #[error("virtqueue {index} is not ready at activation")]
    QueueNotReady {
        /// Queue index.
        index: usize,
    },
    /// The host side refused something the device needs to run.
    #[error("activation failed: {reason}")]
    Activate {
        /// What failed, with the offending value.
        reason: String,
    },
}

/// The interrupt line of one virtio-mmio device: the InterruptStatus register plus the
/// `EventFd` the VMM registers with KVM as an irqfd.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    irq: EventFd,
}

impl Interrupt {
    /// Wraps the irqfd.
    pub fn new(irq: EventFd) -> Self {
        Interrupt {
            status: AtomicU32::new(0),
            irq,
        }
    }

    /// Tells the driver that a queue has new used buffers.
    pub fn signal_used_ring(&self) {
        self.signal(INTERRUPT_USED_RING);
    }

    /// Tells the driver that the configuration space or device status changed.
    pub fn signal_config_change(&self) {
        self.signal(INTERRUPT_CONFIG_CHANGE);
    }

    // The irqfd is written even when the status bit was already set: with an edge-triggered
    // pin, skipping it could lose a wakeup if the driver acked between our check and its
    // read of the used ring.
    fn signal(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.irq.write(1) {
            tracing::error!("writing the device irqfd failed: {e}");
        }
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Sets InterruptStatus to a saved value, without raising the line: the VM's interrupt
    /// controllers are not restored yet. See [`Interrupt::raise_pending`].
    pub(crate) fn restore(&self, status: u32) {
        self.status.store(status, Ordering::SeqCst);
    }

    /// Raises the line once if InterruptStatus has any bit set.
    ///
    /// Called when a restored VM is about to run. The old process's last edge may not have
    /// reached the guest's LAPIC when its state was read (KVM injects irqfd writes for
    /// IOAPIC pins from a work queue), and edges raised while the devices were rebuilt
    /// went to interrupt controllers that were overwritten afterwards. A lost edge is not
    /// harmless: with VIRTIO_RING_F_EVENT_IDX the device only signals again when its used
    /// index crosses the driver's `used_event`, which the driver only moves once it has
    /// seen an interrupt, so the queue would stall until something else interrupted the
    /// guest. An extra edge costs the driver one read of InterruptStatus.
    pub(crate) fn raise_pending(&self) {
        if self.status() != 0 {
            if let Err(e) = self.irq.write(1) {
                tracing::error!("writing the device irqfd failed: {e}");
            }
        }
    }

    fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    fn reset(&self) {
        self.status.store(0, Ordering::SeqCst);
    }
}

/// What a device gets to work with once the driver set DRIVER_OK: guest memory, its queues
/// (owned by the transport so registers and reset stay in one place), the negotiated
/// features and its interrupt.
pub struct DeviceContext<'a> {
    /// Guest memory; writes through it mark the dirty bitmap.
    pub mem: &'a GuestMemoryMmap,
    /// The device's queues, index = virtio queue index.
    pub queues: &'a mut [Queue],
    /// Features the driver acknowledged.
    pub acked_features: u64,
    /// The device's interrupt.
    pub interrupt: &'a Interrupt,
}

/// A virtio device model behind an [`MmioTransport`].
pub trait VirtioDevice: Send {
    /// virtio device ID (1 = net, 2 = block).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits the device offers, VIRTIO_F_VERSION_1 included.
    fn avail_features(&self) -> u64;
    /// Reads the device configuration space; bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device configuration space (the devices here ignore such writes).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The driver set DRIVER_OK: start using the queues.
    fn activate(&mut self, ctx: &mut DeviceContext<'_>) -> Result<(), DeviceError>;
    /// The driver notified queue `index` (its ioeventfd fired).
    fn process_queue(
        &mut self,
        index: usize,
        ctx: &mut DeviceContext<'_>,
    ) -> Result<(), DeviceError>;
    /// Extra file descriptors the transport registers for the device (e.g. a TAP), with the
    /// epoll events to wait for.
    fn extra_fds(&self) -> Vec<(RawFd, EventSet)> {
        Vec::new()
    }
    /// One of the `extra_fds` (by position) is ready; only called once activated.
    fn process_extra_event(
        &mut self,
        _index: usize,
        _events: EventSet,
        _ctx: &mut DeviceContext<'_>,
    ) -> Result<(), DeviceError> {
        Ok(())
    }
    /// The driver wrote 0 to Status: forget everything negotiated and activated.
    fn reset(&mut self);
}

/// Runs `body` over a batch of available chains of queue `index`, with EVENT_IDX
/// notification handling around it, and interrupts the guest at most once per batch.
///
/// `body` returns the used length for a chain, or a fault. The loop re-checks the
/// available ring after re-enabling notifications so no request can be stranded.
pub(crate) fn process_batch<F>(
    index: usize,
    ctx: &mut DeviceContext<'_>,
    mut body: F,
) -> Result<(), DeviceError>
where
    F: FnMut(virtio_queue::DescriptorChain<&GuestMemoryMmap>) -> Result<u32, DeviceError>,
{
    use virtio_queue::{QueueOwnedT, QueueT};
    let mem = ctx.mem;
    let queue_err = |source| DeviceError::Queue { index, source };
    let Some(queue) = ctx.queues.get_mut(index) else {
        return Ok(());
    };
    let mut result = Ok(());
    'outer: loop {
        if let Err(e) = queue.disable_notification(mem) {
            result = Err(queue_err(e));
            break;
        }
        loop {
            let chain = match queue.iter(mem) {
                Ok(mut iter) => iter.next(),
                Err(e) => {
                    result = Err(queue_err(e));
                    break 'outer;
                }
            };
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let used_len = match body(chain) {
                Ok(len) => len,
                Err(e) => {
                    result = Err(e);
                    break 'outer;
                }
            };
            if let Err(e) = queue.add_used(mem, head, used_len) {
                result = Err(queue_err(e));
                break 'outer;
            }
        }
        match queue.enable_notification(mem) {
            Ok(true) => continue,
            Ok(false) => break,
            Err(e) => {
                result = Err(queue_err(e));
                break;
            }
        }
    }
    // Chains completed before a fault still deserve their interrupt.
    match queue.needs_notification(mem) {
        Ok(true) => ctx.interrupt.signal_used_ring(),
        Ok(false) => {}
        Err(e) => {
            if result.is_ok() {
                result = Err(queue_err(e));
            }
        }
    }
    result
}

/// Caps the warnings one device can log: a guest that keeps posting bad requests must not
/// flood the host's logs.
#[derive(Debug)]
pub(crate) struct WarnLimiter {
    label: String,
    window_start: Instant,
    emitted: u32,
    suppressed: u32,
}

impl WarnLimiter {
    const PER_SECOND: u32 = 10;

    pub(crate) fn new(label: impl Into<String>) -> Self {
        WarnLimiter {
            label: label.into(),
            window_start: Instant::now(),
            emitted: 0,
            suppressed: 0,
        }
    }

    /// Whether the next warning may be logged.
    pub(crate) fn allow(&mut self) -> bool {
        let now = Instant::now();
        if now.duration_since(self.window_start) >= Duration::from_secs(1) {
            if self.suppressed > 0 {
                tracing::warn!(
                    device = %self.label,
                    "{} further guest-caused warnings suppressed",
                    self.suppressed
                );
            }
            self.window_start = now;
            self.emitted = 0;
            self.suppressed = 0;
        }
        if self.emitted < Self::PER_SECOND {
            self.emitted += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }

    pub(crate) fn label(&self) -> &str {
        &self.label
    }
}

/// `tracing::warn!` through a [`WarnLimiter`], tagged with the device label.
macro_rules! warn_limited {
    ($limiter:expr, $($arg:tt)+) => {{
        let limiter: &mut $crate::virtio::WarnLimiter = &mut $limiter;
        if limiter.allow() {
            tracing::warn!(device = %limiter.label(), $($arg)+);
        }
    }};
}
pub(crate) use warn_limited;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warn_limiter_caps_per_second() {
        let mut limiter = WarnLimiter::new("test");
        let allowed = (0..100).filter(|_| limiter.allow()).count();
        assert_eq!(allowed, WarnLimiter::PER_SECOND as usize);
        limiter.window_start -= Duration::from_secs(2);
        assert!(limiter.allow());
    }

    #[test]
    fn interrupt_status_set_and_ack() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let interrupt = Interrupt::new(irq.try_clone().unwrap());
        interrupt.signal_used_ring();
        interrupt.signal_config_change();
        assert_eq!(interrupt.status(), 3);
        assert_eq!(irq.read().unwrap(), 2);
        interrupt.ack(INTERRUPT_USED_RING);
        assert_eq!(interrupt.status(), INTERRUPT_CONFIG_CHANGE);
    }
}
