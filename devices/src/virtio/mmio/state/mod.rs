//! Saving a virtio-mmio transport (registers, interrupt status, queues) as a snapshot's
//! [`VirtioTransportState`], and rebuilding a transport from one. A saved state is
//! untrusted input: it is checked against the device it is restored onto before the
//! device or the queues act on any of it.
//!
//! The devices themselves keep nothing that must survive. virtio-blk completes every
//! request synchronously on the VMM thread, so whenever the VMM thread is free to take a
//! snapshot no request is in flight. virtio-net drops a frame it read from the TAP but had
//! no rx buffers for yet, as a lossy link would; TCP retransmits it. Whatever a device
//! derives from negotiation (acked features, TAP offloads) it gets again on reactivation.

#[cfg(test)]
mod tests;

use snapshot::{QueueState, VirtioTransportState};
use virtio_queue::QueueT;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::{MmioError, MmioTransport, QueueAddresses};
use crate::virtio::status::{DEVICE_NEEDS_RESET, DRIVER_OK, FAILED, FEATURES_OK};
use crate::virtio::{
    DeviceError, VirtioDevice, INTERRUPT_CONFIG_CHANGE, INTERRUPT_USED_RING, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};
use crate::GuestMemoryMmap;

/// Why a saved transport state was refused.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The state belongs to another kind of device.
    #[error(
        "saved virtio device type {saved} does not match the configured device type {device_type}"
    )]
    DeviceType {
        /// The configured device's type.
        device_type: u32,
        /// The type in the state.
        saved: u32,
    },
    /// The state has a different number of queues than the device.
    #[error("virtio device type {device_type}: saved state has {saved} queues, the device has {expected}")]
    QueueCount {
        /// virtio device ID.
        device_type: u32,
        /// Queues in the state.
        saved: usize,
        /// Queues of the device.
        expected: usize,
    },
    /// A queue's saved maximum size is above what the device offers now.
    #[error("virtio device type {device_type} queue {index}: saved max size {saved}, above the {expected} the device offers")]
    QueueMaxSize {
        /// virtio device ID.
        device_type: u32,
        /// Queue index.
        index: usize,
        /// Max size in the state.
        saved: u16,
        /// Max size the device offers.
        expected: u16,
    },
    /// A ready queue's size is zero, not a power of two, or above its maximum.
    #[error("virtio device type {device_type} queue {index}: size {size} is zero, not a power of two, or above the max size {max}")]
    QueueSize {
        /// virtio device ID.
        device_type: u32,
        /// Queue index.
        index: usize,
        /// The saved size.
        size: u16,
        /// The queue's max size.
        max: u16,
    },
    /// A ready queue's ring is misaligned.
    #[error("virtio device type {device_type} queue {index}: {ring} address {addr:#x} is not {align}-byte aligned")]
    QueueAlignment {
        /// virtio device ID.
        device_type: u32,
        /// Queue index.
        index: usize,
        /// Which ring.
        ring: &'static str,
        /// The saved address.
        addr: u64,
        /// The alignment virtio requires.
        align: u64,
    },
    /// A ready queue's rings do not lie in guest memory.
    #[error("virtio device type {device_type} queue {index}: rings of size {size} (descriptors {desc:#x}, available {avail:#x}, used {used:#x}) are not inside guest memory")]
    QueueOutsideMemory {
        /// virtio device ID.
        device_type: u32,
        /// Queue index.
        index: usize,
        /// Queue size.
        size: u16,
        /// Descriptor table address.
        desc: u64,
        /// Available ring address.
        avail: u64,
        /// Used ring address.
        used: u64,
    },
    /// An activated device's queue disagrees with the negotiated VIRTIO_F_RING_EVENT_IDX.
    #[error("virtio device type {device_type} queue {index}: event_idx_enabled is {saved} but the negotiated features {features:#x} say {expected}")]
    QueueEventIdx {
        /// virtio device ID.
        device_type: u32,
        /// Queue index.
        index: usize,
        /// The saved flag.
        saved: bool,
        /// What the features imply.
        expected: bool,
        /// The negotiated features.
        features: u64,
    },
    /// The status register contradicts the rest of the state.
    #[error("virtio device type {device_type}: status {status:#x} is incoherent: {reason}")]
    Status {
        /// virtio device ID.
        device_type: u32,
        /// The saved status.
        status: u32,
        /// What contradicts it.
        reason: &'static str,
    },
    /// FEATURES_OK is set for features the device would have refused.
    #[error("virtio device type {device_type}: accepted driver features {features:#x} are not a subset of the offered {offered:#x} including VIRTIO_F_VERSION_1")]
    Features {
        /// virtio device ID.
        device_type: u32,
        /// The saved driver features.
        features: u64,
        /// What the device offers.
        offered: u64,
    },
    /// InterruptStatus has bits virtio-mmio does not define.
    #[error("virtio device type {device_type}: interrupt status {status:#x} has bits other than used-ring (1) and config-change (2)")]
    InterruptStatus {
        /// virtio device ID.
        device_type: u32,
        /// The saved InterruptStatus.
        status: u32,
    },
    /// The host side of the device could not be activated again.
    #[error("virtio device type {device_type}: reactivating the device failed: {source}")]
    Activate {
        /// virtio device ID.
        device_type: u32,
        /// What the device reported.
        #[source]
        source: DeviceError,
    },
}

impl MmioTransport {
    /// The transport's registers, interrupt status and queues.
    ///
    /// Call it on the VMM thread after [`MmioTransport::process_all_queues`]: queue
    /// processing is synchronous there, so no request is half-done.
    pub fn save_state(&self) -> VirtioTransportState {
        VirtioTransportState {
            device_type: self.device.device_type(),
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            acked_unknown_feature_word: self.acked_unknown_feature_word,
            queue_sel: self.queue_sel,
            status: self.status,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            activated: self.activated,
            queues: self
                .queues
                .iter()
                .zip(&self.queue_addresses)
                .map(|(q, a)| QueueState {
                    max_size: q.max_size(),
                    size: a.size,
                    ready: q.ready(),
                    desc_table: a.desc,
                    avail_ring: a.driver,
                    used_ring: a.device,
                    next_avail: q.next_avail(),
                    next_used: q.next_used(),
                    event_idx_enabled: q.event_idx_enabled(),
                })
                .collect(),
        }
    }

    /// A transport around a freshly built `device`, continuing from `state`.
    ///
    /// `mem` must already hold the saved guest memory: ready queues are checked against
    /// it, and an activated device is activated again (as on DRIVER_OK, with the acked
    /// features) so it resumes work without the guest's help, which may process requests
    /// posted since the save. Call [`MmioTransport::resume`] once the VM's interrupt
    /// controllers and vCPUs are restored: an interrupt raised before that is lost.
    ///
    /// Registers of a queue that is not ready are kept as the driver wrote them, unchecked:
    /// the live transport keeps them the same way and validates them when the driver sets
    /// QueueReady. A guest-caused fault while reactivating (a malformed chain posted before
    /// the save) marks the device DEVICE_NEEDS_RESET as it would have live; a host-side
    /// failure is an error.
    pub fn restore(
        mem: GuestMemoryMmap,
        device: Box<dyn VirtioDevice + Send>,
        irq: EventFd,
        state: &VirtioTransportState,
    ) -> Result<MmioTransport, MmioError> {
        let mut transport = MmioTransport::new(mem, device, irq)?;
        transport.restore_state(state)?;
        Ok(transport)
    }

    /// Continues this transport from `state`, as [`MmioTransport::restore`] does: for a
    /// transport made with [`MmioTransport::new`] that the guest has not touched, already
    /// on its bus and in its event loop (a VM built ahead of its state, as a migration's
    /// destination builds it). After an error the transport must not be used.
    pub fn restore_state(&mut self, state: &VirtioTransportState) -> Result<(), MmioError> {
        let device_type = self.device.device_type();
        if state.device_type != device_type {
            return Err(RestoreError::DeviceType {
                device_type,
                saved: state.device_type,
            }
            .into());
        }
        let expected = self.device.queue_max_sizes().len();
        if state.queues.len() != expected {
            return Err(RestoreError::QueueCount {
                device_type,
                saved: state.queues.len(),
                expected,
            }
            .into());
        }
        let transport = self;
        transport.check_status(state)?;
        let negotiated_event_idx = state
            .activated
            .then_some(state.driver_features & VIRTIO_RING_F_EVENT_IDX != 0);
        for (index, saved) in state.queues.iter().enumerate() {
            transport.restore_queue(index, saved, negotiated_event_idx, state.driver_features)?;
        }
        transport.device_features_sel = state.device_features_sel;
        transport.driver_features_sel = state.driver_features_sel;
        transport.driver_features = state.driver_features;
        transport.acked_unknown_feature_word = state.acked_unknown_feature_word;
        transport.queue_sel = state.queue_sel;
        transport.status = state.status;
        transport.config_generation = state.config_generation;
        transport.interrupt.restore(state.interrupt_status);
        // Reactivation may complete requests and raise the line; the edge is lost (the
        // IOAPIC and LAPICs are restored later, and may not exist yet) but the status bit
        // it sets is kept, and `resume` raises the line again for it.
        if state.activated {
            transport.reactivate()?;
        }
        Ok(())
    }

    /// Checks that the status bits agree with each other and with the rest of `state`, by
    /// the rules the live transport follows when the driver writes Status.
    fn check_status(&self, state: &VirtioTransportState) -> Result<(), RestoreError> {
        let device_type = self.device.device_type();
        let status = state.status;
        let incoherent = |reason| RestoreError::Status {
            device_type,
            status,
            reason,
        };
        if state.activated && status & (FEATURES_OK | DRIVER_OK) != FEATURES_OK | DRIVER_OK {
            return Err(incoherent(
                "the device is marked activated without FEATURES_OK and DRIVER_OK",
            ));
        }
        // DRIVER_OK either activates the device or marks it DEVICE_NEEDS_RESET.
        if !state.activated && status & DRIVER_OK != 0 && status & DEVICE_NEEDS_RESET == 0 {
            return Err(incoherent(
                "DRIVER_OK is set but the device is neither activated nor DEVICE_NEEDS_RESET",
            ));
        }
        if status & FEATURES_OK != 0 {
            if state.acked_unknown_feature_word {
                return Err(incoherent(
                    "FEATURES_OK is set although the driver acked bits in a feature word the device does not have",
                ));
            }
            let offered = self.device_features();
            let features = state.driver_features;
            if features & !offered != 0 || features & VIRTIO_F_VERSION_1 == 0 {
                return Err(RestoreError::Features {
                    device_type,
                    features,
                    offered,
                });
            }
        }
        if state.interrupt_status & !(INTERRUPT_USED_RING | INTERRUPT_CONFIG_CHANGE) != 0 {
            return Err(RestoreError::InterruptStatus {
                device_type,
                status: state.interrupt_status,
            });
        }
        Ok(())
    }

    /// Applies one saved queue, validating a ready one as QueueReady would.
    fn restore_queue(
        &mut self,
        index: usize,
        saved: &QueueState,
        negotiated_event_idx: Option<bool>,
        features: u64,
    ) -> Result<(), RestoreError> {
        let device_type = self.device.device_type();
        let queue = &mut self.queues[index];
        let max = queue.max_size();
        // A smaller saved maximum comes from an older hospes (virtio-blk offered 256
        // before 512): the driver chose its size within it, and that size still fits.
        if saved.max_size > max {
            return Err(RestoreError::QueueMaxSize {
                device_type,
                index,
                saved: saved.max_size,
                expected: max,
            });
        }
        self.queue_addresses[index] = QueueAddresses {
            size: saved.size,
            desc: saved.desc_table,
            driver: saved.avail_ring,
            device: saved.used_ring,
        };
        if saved.ready {
            queue
                .try_set_size(saved.size)
                .map_err(|_| RestoreError::QueueSize {
                    device_type,
                    index,
                    size: saved.size,
                    max,
                })?;
            let misaligned = |ring, addr, align| RestoreError::QueueAlignment {
                device_type,
                index,
                ring,
                addr,
                align,
            };
            queue
                .try_set_desc_table_address(GuestAddress(saved.desc_table))
                .map_err(|_| misaligned("descriptor table", saved.desc_table, 16))?;
            queue
                .try_set_avail_ring_address(GuestAddress(saved.avail_ring))
                .map_err(|_| misaligned("available ring", saved.avail_ring, 2))?;
            queue
                .try_set_used_ring_address(GuestAddress(saved.used_ring))
                .map_err(|_| misaligned("used ring", saved.used_ring, 4))?;
            queue.set_ready(true);
            if !queue.is_valid(&self.mem) {
                return Err(RestoreError::QueueOutsideMemory {
                    device_type,
                    index,
                    size: saved.size,
                    desc: saved.desc_table,
                    avail: saved.avail_ring,
                    used: saved.used_ring,
                });
            }
        }
        if let Some(expected) = negotiated_event_idx {
            if saved.event_idx_enabled != expected {
                return Err(RestoreError::QueueEventIdx {
                    device_type,
                    index,
                    saved: saved.event_idx_enabled,
                    expected,
                    features,
                });
            }
        }
        queue.set_event_idx(saved.event_idx_enabled);
        // Any index is representable; one that contradicts the rings in guest memory is
        // caught when the queue is next processed, as a live driver's would be.
        queue.set_next_avail(saved.next_avail);
        queue.set_next_used(saved.next_used);
        Ok(())
    }

    /// Activates the device again after the registers and queues are restored.
    fn reactivate(&mut self) -> Result<(), RestoreError> {
        if self.status & (DEVICE_NEEDS_RESET | FAILED) != 0 {
            // The device had stopped and stays stopped until the driver resets it, which
            // resets the device whether or not it was activated here.
            self.activated = true;
            return Ok(());
        }
        match self.activate_device() {
            Ok(()) => Ok(()),
            // The guest's doing, caught while the device picked up posted requests.
            Err(e @ (DeviceError::Queue { .. } | DeviceError::MalformedChain { .. })) => {
                self.needs_reset(e.to_string());
                Ok(())
            }
            Err(source) => Err(RestoreError::Activate {
                device_type: self.device.device_type(),
                source,
            }),
        }
    }
}
