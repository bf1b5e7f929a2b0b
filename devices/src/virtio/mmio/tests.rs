//! Transport tests against a recording dummy device: registers, feature negotiation,
//! queue validation, status/reset, interrupts and notification dispatch.

use std::sync::{Arc, Mutex};

use event_manager::{EventManager, SubscriberOps};

use super::*;
use crate::virtio::status::*;
use crate::virtio::test_utils::{guest_memory, ro, TestDriver, DATA_BASE};
use crate::virtio::{process_batch, DeviceError, INTERRUPT_CONFIG_CHANGE, INTERRUPT_USED_RING};

pub(super) const DUMMY_FEATURE: u64 = 1 << 3;

#[derive(Default)]
pub(super) struct Record {
    pub(super) activations: u32,
    pub(super) processed: Vec<usize>,
    pub(super) resets: u32,
    config_writes: Vec<(u64, Vec<u8>)>,
}

pub(super) struct Dummy {
    record: Arc<Mutex<Record>>,
    pub(super) sizes: [u16; 2],
}

impl VirtioDevice for Dummy {
    fn device_type(&self) -> u32 {
        4
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }
    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | DUMMY_FEATURE
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = (offset as u8).wrapping_add(i as u8).wrapping_add(0xa0);
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.record
            .lock()
            .unwrap()
            .config_writes
            .push((offset, data.to_vec()));
    }
    fn activate(&mut self, _ctx: &mut DeviceContext<'_>) -> Result<(), DeviceError> {
        self.record.lock().unwrap().activations += 1;
        Ok(())
    }
    fn process_queue(
        &mut self,
        index: usize,
        ctx: &mut DeviceContext<'_>,
    ) -> Result<(), DeviceError> {
        self.record.lock().unwrap().processed.push(index);
        process_batch(index, ctx, |_| Ok(0))
    }
    fn reset(&mut self) {
        self.record.lock().unwrap().resets += 1;
    }
}

pub(super) fn dummy() -> (Box<Dummy>, Arc<Mutex<Record>>) {
    let record = Arc::new(Mutex::new(Record::default()));
    let device = Box::new(Dummy {
        record: record.clone(),
        sizes: [16, 16],
    });
    (device, record)
}

pub(super) const FEATURES: u64 = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX;

#[test]
fn identification_registers() {
    let mem = guest_memory();
    let (device, _) = dummy();
    let mut d = TestDriver::new(&mem, device);
    assert_eq!(d.read(REG_MAGIC), 0x7472_6976);
    assert_eq!(d.read(REG_VERSION), 2);
    assert_eq!(d.read(REG_DEVICE_ID), 4);
    assert_eq!(d.read(REG_VENDOR_ID), VENDOR_ID);
    assert_eq!(
        d.device_features(),
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | DUMMY_FEATURE
    );
    d.write(REG_DEVICE_FEATURES_SEL, 7);
    assert_eq!(d.read(REG_DEVICE_FEATURES), 0);
    d.write(REG_QUEUE_SEL, 1);
    assert_eq!(d.read(REG_QUEUE_NUM_MAX), 16);
    d.write(REG_QUEUE_SEL, 2);
    assert_eq!(d.read(REG_QUEUE_NUM_MAX), 0, "no queue 2");
    assert_eq!(d.read(REG_SHM_LEN_LOW), u32::MAX);
}

#[test]
fn bad_register_accesses_are_harmless() {
    let mem = guest_memory();
    let (device, _) = dummy();
    let mut d = TestDriver::new(&mem, device);
    let mut two = [0xffu8; 2];
    d.t().read(REG_MAGIC, &mut two);
    assert_eq!(two, [0, 0]);
    let mut unaligned = [0xffu8; 4];
    d.t().read(REG_MAGIC + 1, &mut unaligned);
    assert_eq!(unaligned, [0; 4]);
    d.t().write(REG_STATUS, &[1, 0]);
    d.t().write(REG_STATUS + 2, &[1, 0, 0, 0]);
    d.write(REG_MAGIC, 0);
    d.write(0xffc, 0);
    assert_eq!(d.read(REG_STATUS), 0);
    assert_eq!(d.read(REG_MAGIC), 0x7472_6976);
}

#[test]
fn config_space_is_delegated() {
    let mem = guest_memory();
    let (device, record) = dummy();
    let d = TestDriver::new(&mem, device);
    let mut data = [0u8; 2];
    d.t().read(CONFIG_SPACE_OFFSET + 4, &mut data);
    assert_eq!(data, [0xa4, 0xa5]);
    d.t().write(CONFIG_SPACE_OFFSET + 1, &[9]);
    assert_eq!(record.lock().unwrap().config_writes, vec![(1, vec![9])]);
}

#[test]
fn negotiation_and_activation() {
    let mem = guest_memory();
    let (device, record) = dummy();
    let mut d = TestDriver::new(&mem, device);
    d.bring_up(FEATURES | DUMMY_FEATURE, 2, 16);
    assert!(d.t().is_activated());
    assert_eq!(record.lock().unwrap().activations, 1);
    // Queue registers read back what the driver wrote.
    d.write(REG_QUEUE_SEL, 1);
    assert_eq!(d.read(REG_QUEUE_READY), 1);
    let desc = d.queues[1].desc_table_addr().0;
    assert_eq!(d.read(REG_QUEUE_DESC_LOW), desc as u32);
    // Changes after DRIVER_OK are ignored.
    d.write(REG_QUEUE_READY, 0);
    assert_eq!(d.read(REG_QUEUE_READY), 1);
    d.write(REG_DRIVER_FEATURES, 0);
    d.write(REG_STATUS, ACKNOWLEDGE);
    assert_eq!(d.read(REG_STATUS) & DRIVER_OK, DRIVER_OK);
}

fn assert_needs_reset(d: &mut TestDriver<'_>) {
    assert_ne!(d.read(REG_STATUS) & DEVICE_NEEDS_RESET, 0, "NEEDS_RESET");
    assert_ne!(d.read(REG_INTERRUPT_STATUS) & INTERRUPT_CONFIG_CHANGE, 0);
    assert!(d.interrupts() > 0, "config change interrupt");
}

#[test]
fn unoffered_feature_is_refused() {
    let mem = guest_memory();
    let (device, _) = dummy();
    let mut d = TestDriver::new(&mem, device);
    let status = d.negotiate(FEATURES | 1 << 5);
    assert_eq!(status & FEATURES_OK, 0);
    assert_needs_reset(&mut d);
}

#[test]
fn unknown_feature_word_is_refused() {
    let mem = guest_memory();
    let (device, _) = dummy();
    let mut d = TestDriver::new(&mem, device);
    d.write(REG_DRIVER_FEATURES_SEL, 2);
    d.write(REG_DRIVER_FEATURES, 1);
    let status = d.negotiate(FEATURES);
    assert_eq!(status & FEATURES_OK, 0);
    assert_needs_reset(&mut d);
}

#[test]
fn legacy_driver_is_refused() {
    let mem = guest_memory();
    let (device, _) = dummy();
    let mut d = TestDriver::new(&mem, device);
    let status = d.negotiate(VIRTIO_RING_F_EVENT_IDX);
    assert_eq!(status & FEATURES_OK, 0);
    assert_needs_reset(&mut d);
}

#[test]
fn driver_ok_without_features_ok_needs_reset() {
    let mem = guest_memory();
    let (device, record) = dummy();
    let mut d = TestDriver::new(&mem, device);
    d.write(REG_STATUS, ACKNOWLEDGE | DRIVER);
    d.write(REG_STATUS, ACKNOWLEDGE | DRIVER | DRIVER_OK);
    assert_needs_reset(&mut d);
    assert_eq!(record.lock().unwrap().activations, 0);
}

fn queue_setup_fails(program: impl FnOnce(&mut TestDriver<'_>)) {
    let mem = guest_memory();
    let (device, _) = dummy();
    let mut d = TestDriver::new(&mem, device);
    assert_ne!(d.negotiate(FEATURES) & FEATURES_OK, 0);
    d.setup_queue(0, 16);
    d.write(REG_QUEUE_SEL, 0);
    d.write(REG_QUEUE_READY, 0);
    program(&mut d);
    d.write(REG_QUEUE_READY, 1);
    assert_eq!(d.read(REG_QUEUE_READY), 0, "queue must not become ready");
    assert_needs_reset(&mut d);
}

#[test]
fn queue_size_not_power_of_two() {
    queue_setup_fails(|d| d.write(REG_QUEUE_NUM, 12));
}

#[test]
fn queue_size_above_max() {
    queue_setup_fails(|d| d.write(REG_QUEUE_NUM, 32));
}

#[test]
fn queue_size_zero() {
    queue_setup_fails(|d| d.write(REG_QUEUE_NUM, 0));
}

#[test]
fn queue_outside_memory() {
    queue_setup_fails(|d| {
        d.write(REG_QUEUE_DEVICE_LOW, 0);
        d.write(REG_QUEUE_DEVICE_HIGH, 0x10);
    });
}

#[test]
fn queue_ring_straddling_end_of_memory() {
    queue_setup_fails(|d| d.write(REG_QUEUE_DESC_LOW, (16 << 20) - 0x40));
}

#[test]
fn queue_misaligned() {
    queue_setup_fails(|d| d.write(REG_QUEUE_DESC_LOW, 0x1_0008));
}

#[test]
fn reset_clears_everything() {
    let mem = guest_memory();
    let (device, record) = dummy();
    let mut d = TestDriver::new(&mem, device);
    d.bring_up(FEATURES, 2, 16);
    d.add_chain(0, &[ro(DATA_BASE, 16)]);
    d.process(0);
    assert_ne!(d.read(REG_INTERRUPT_STATUS), 0);
    d.write(REG_QUEUE_SEL, 9);
    d.write(REG_QUEUE_NUM, 3); // ignored: no queue 9
    d.write(REG_STATUS, 0);
    assert_eq!(d.read(REG_STATUS), 0);
    assert_eq!(d.read(REG_INTERRUPT_STATUS), 0);
    assert!(!d.t().is_activated());
    assert_eq!(record.lock().unwrap().resets, 1);
    d.write(REG_QUEUE_SEL, 0);
    assert_eq!(d.read(REG_QUEUE_READY), 0);
    assert_eq!(d.read(REG_QUEUE_DESC_LOW), 0);
    // The device comes back up after a reset, NEEDS_RESET included.
    d.write(REG_QUEUE_NUM, 12);
    d.write(REG_STATUS, ACKNOWLEDGE);
    d.write(REG_STATUS, ACKNOWLEDGE | DRIVER);
    d.write(REG_STATUS, ACKNOWLEDGE | DRIVER | DRIVER_OK);
    assert_ne!(d.read(REG_STATUS) & DEVICE_NEEDS_RESET, 0);
    d.write(REG_STATUS, 0);
    assert_eq!(d.read(REG_STATUS), 0);
    d.bring_up(FEATURES, 2, 16);
    assert_eq!(record.lock().unwrap().activations, 2);
}

#[test]
fn interrupt_ack_clears_bits() {
    let mem = guest_memory();
    let (device, _) = dummy();
    let mut d = TestDriver::new(&mem, device);
    d.bring_up(FEATURES, 2, 16);
    d.add_chain(1, &[ro(DATA_BASE, 16)]);
    d.process(1);
    assert_eq!(d.used_idx(1), 1);
    assert_eq!(d.read(REG_INTERRUPT_STATUS), INTERRUPT_USED_RING);
    assert_eq!(d.interrupts(), 1);
    d.write(REG_INTERRUPT_ACK, INTERRUPT_USED_RING);
    assert_eq!(d.read(REG_INTERRUPT_STATUS), 0);
}

#[test]
fn notifications_before_driver_ok_are_ignored() {
    let mem = guest_memory();
    let (device, record) = dummy();
    let mut d = TestDriver::new(&mem, device);
    d.negotiate(FEATURES);
    d.setup_queue(0, 16);
    d.add_chain(0, &[ro(DATA_BASE, 16)]);
    d.process(0);
    assert!(record.lock().unwrap().processed.is_empty());
    assert_eq!(d.used_idx(0), 0);
}

#[test]
fn avail_index_jump_needs_reset() {
    let mem = guest_memory();
    let (device, _) = dummy();
    let mut d = TestDriver::new(&mem, device);
    d.bring_up(FEATURES, 2, 16);
    // The driver claims 100 new chains in a ring of 16.
    d.queues[0].avail().idx().store(100);
    d.process(0);
    assert_needs_reset(&mut d);
    // Once NEEDS_RESET is set, notifications are drained and ignored.
    d.queues[0].avail().idx().store(1);
    d.process(0);
    assert_eq!(d.used_idx(0), 0);
}

#[test]
fn queue_notify_goes_through_the_event_loop() {
    let mem = guest_memory();
    let (device, record) = dummy();
    let mut d = TestDriver::new(&mem, device);
    let mut manager = EventManager::<Arc<Mutex<MmioTransport>>>::new().unwrap();
    manager.add_subscriber(d.transport.clone());
    d.bring_up(FEATURES, 2, 16);

    // A notification before any chain is posted: processed, nothing used.
    d.write(REG_QUEUE_NOTIFY, 1);
    manager.run_with_timeout(1000).unwrap();
    assert_eq!(record.lock().unwrap().processed, vec![1]);

    d.add_chain(1, &[ro(DATA_BASE, 16)]);
    d.write(REG_QUEUE_NOTIFY, 1);
    manager.run_with_timeout(1000).unwrap();
    assert_eq!(record.lock().unwrap().processed, vec![1, 1]);
    assert_eq!(d.used_idx(1), 1);

    // The ioeventfd path: KVM writes the same eventfd.
    d.add_chain(0, &[ro(DATA_BASE, 16)]);
    d.t().queue_events()[0].write(1).unwrap();
    manager.run_with_timeout(1000).unwrap();
    assert_eq!(record.lock().unwrap().processed, vec![1, 1, 0]);
    assert_eq!(d.used_idx(0), 1);

    // Notifying a queue that does not exist is ignored.
    d.write(REG_QUEUE_NOTIFY, 7);
    assert_eq!(manager.run_with_timeout(10).unwrap(), 0);
}

#[test]
fn fits_the_vmm_event_manager_and_bus() {
    // The VMM stores transports as these trait objects; this fails to compile otherwise.
    let mem = guest_memory();
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let transport = Arc::new(Mutex::new(MmioTransport::new(mem, dummy().0, irq).unwrap()));
    let _subscriber: Arc<Mutex<dyn MutEventSubscriber + Send>> = transport.clone();
    let _bus: Arc<Mutex<dyn BusDevice>> = transport;
}
