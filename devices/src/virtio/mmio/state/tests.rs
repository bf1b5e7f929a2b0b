//! Transport save/restore against the recording dummy device: a full round trip after
//! requests, reactivation, picking up unnotified requests, mid-setup and NEEDS_RESET
//! states, and every kind of corrupt state refused with the offending value.

use snapshot::VirtioTransportState;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::super::tests::{dummy, DUMMY_FEATURE, FEATURES};
use super::super::*;
use super::RestoreError;
use crate::virtio::status::*;
use crate::virtio::test_utils::{guest_memory, ro, TestDriver, DATA_BASE};
use crate::virtio::{INTERRUPT_USED_RING, VIRTIO_RING_F_EVENT_IDX};

/// Every register the driver can read, with QueueSel at each queue; ends with QueueSel 1.
fn register_dump(d: &mut TestDriver<'_>) -> Vec<u32> {
    let mut dump = Vec::new();
    for sel in [0, 1] {
        d.write(REG_QUEUE_SEL, sel);
        for offset in (0..CONFIG_SPACE_OFFSET).step_by(4) {
            dump.push(d.read(offset));
        }
    }
    dump
}

/// A dummy brought up with two queues, three requests completed, QueueSel and
/// DeviceFeaturesSel left at 1, and a used-ring interrupt not yet acked.
fn busy_driver(mem: &GuestMemoryMmap) -> TestDriver<'_> {
    let (device, _) = dummy();
    let mut d = TestDriver::new(mem, device);
    d.bring_up(FEATURES | DUMMY_FEATURE, 2, 16);
    d.add_chain(0, &[ro(DATA_BASE, 16)]);
    d.add_chain(0, &[ro(DATA_BASE, 16)]);
    d.process(0);
    d.add_chain(1, &[ro(DATA_BASE, 16)]);
    d.process(1);
    assert_eq!((d.used_idx(0), d.used_idx(1)), (2, 1));
    d.write(REG_DEVICE_FEATURES_SEL, 1);
    d.write(REG_QUEUE_SEL, 1);
    assert_eq!(d.read(REG_INTERRUPT_STATUS), INTERRUPT_USED_RING);
    d.interrupts();
    d
}

#[test]
fn round_trip_keeps_registers_and_queues_going() {
    let mem = guest_memory();
    let mut d = busy_driver(&mem);
    let saved = d.t().save_state();
    assert_eq!(saved.device_type, 4);
    assert!(saved.activated);
    assert_eq!(saved.queues.len(), 2);
    assert_eq!(saved.queues[0].next_avail, 2);
    assert_eq!(saved.queues[0].next_used, 2);
    assert!(saved.queues[0].event_idx_enabled);
    let before = register_dump(&mut d);

    let (device, record) = dummy();
    let mut d = d.restore(&saved, || device).unwrap();
    assert_eq!(d.t().save_state(), saved);
    assert_eq!(register_dump(&mut d), before);
    assert_eq!(record.lock().unwrap().activations, 1, "reactivated");
    // The interrupt controllers are restored after the transports: an edge now is lost.
    assert_eq!(d.interrupts(), 0, "no interrupt before resume");
    d.t().resume();
    assert_eq!(d.interrupts(), 1, "pending interrupt raised once on resume");
    assert_eq!(
        record.lock().unwrap().processed,
        vec![0, 1],
        "every queue looked at"
    );
    record.lock().unwrap().processed.clear();

    // The restored queue continues where the old one stopped.
    let head = d.add_chain(0, &[ro(DATA_BASE, 16)]);
    d.process(0);
    assert_eq!(d.used_idx(0), 3);
    assert_eq!(d.used_elem(0, 2).id(), u32::from(head));
    assert_eq!(record.lock().unwrap().processed, vec![0]);
    d.write(REG_INTERRUPT_ACK, INTERRUPT_USED_RING);
    assert_eq!(d.read(REG_INTERRUPT_STATUS), 0);
}

#[test]
fn requests_posted_around_the_save_are_picked_up() {
    let mem = guest_memory();
    let mut d = busy_driver(&mem);
    // Posted (and notified) after the old process last looked at the queue.
    d.add_chain(1, &[ro(DATA_BASE, 16)]);
    let (device, record) = dummy();
    let mut d = d.save_and_restore(|| device).unwrap();
    assert_eq!(d.used_idx(1), 1);
    d.t().resume();
    assert_eq!(record.lock().unwrap().processed, vec![0, 1]);
    assert_eq!(d.used_idx(1), 2);
    assert_eq!(d.used_idx(0), 2);
    assert_eq!(d.read(REG_INTERRUPT_STATUS), INTERRUPT_USED_RING);
    assert!(
        d.interrupts() >= 1,
        "the completion is signalled after resume"
    );
}

#[test]
fn interrupt_acked_before_the_save_is_not_raised_again() {
    let mem = guest_memory();
    let mut d = busy_driver(&mem);
    d.write(REG_INTERRUPT_ACK, INTERRUPT_USED_RING);
    let (device, _) = dummy();
    let d = d.save_and_restore(|| device).unwrap();
    d.t().resume();
    assert_eq!(d.interrupts(), 0);
}

#[test]
fn process_all_queues_waits_for_activation() {
    let mem = guest_memory();
    let (device, record) = dummy();
    let mut d = TestDriver::new(&mem, device);
    d.negotiate(FEATURES);
    d.setup_queue(0, 16);
    d.add_chain(0, &[ro(DATA_BASE, 16)]);
    d.t().process_all_queues();
    assert!(record.lock().unwrap().processed.is_empty());
    assert_eq!(d.used_idx(0), 0);
}

#[test]
fn mid_setup_state_resumes_negotiation() {
    let mem = guest_memory();
    let (device, _) = dummy();
    let mut d = TestDriver::new(&mem, device);
    d.negotiate(FEATURES);
    d.setup_queue(0, 16);
    // Queue 1 is half programmed: an odd size, not yet ready.
    d.write(REG_QUEUE_SEL, 1);
    d.write(REG_QUEUE_NUM, 12);
    let saved = d.t().save_state();
    assert!(!saved.activated);
    assert_eq!(saved.queues[1].size, 12);

    let (device, record) = dummy();
    let mut d = d.restore(&saved, || device).unwrap();
    assert_eq!(d.t().save_state(), saved);
    assert_eq!(record.lock().unwrap().activations, 0);
    assert_eq!(d.interrupts(), 0);
    d.setup_queue(1, 16);
    d.write(REG_STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    assert!(d.t().is_activated());
    assert_eq!(record.lock().unwrap().activations, 1);
    d.add_chain(0, &[ro(DATA_BASE, 16)]);
    d.process(0);
    assert_eq!(d.used_idx(0), 1);
}

#[test]
fn stopped_device_stays_stopped_until_reset() {
    let mem = guest_memory();
    let mut d = busy_driver(&mem);
    // The driver claims 100 new chains in a ring of 16: NEEDS_RESET.
    d.queues[0].avail().idx().store(100);
    d.process(0);
    assert_ne!(d.read(REG_STATUS) & DEVICE_NEEDS_RESET, 0);
    let (device, record) = dummy();
    let mut d = d.save_and_restore(|| device).unwrap();
    assert_ne!(d.read(REG_STATUS) & DEVICE_NEEDS_RESET, 0);
    assert_eq!(record.lock().unwrap().activations, 0);
    d.t().process_all_queues();
    assert!(record.lock().unwrap().processed.is_empty());
    d.write(REG_STATUS, 0);
    assert_eq!(record.lock().unwrap().resets, 1);
    d.bring_up(FEATURES, 2, 16);
    assert_eq!(record.lock().unwrap().activations, 1);
}

/// Restores a corrupted copy of a busy driver's state onto a fresh dummy.
fn refused(corrupt: impl FnOnce(&mut VirtioTransportState)) -> RestoreError {
    let mem = guest_memory();
    let mut state = busy_driver(&mem).t().save_state();
    corrupt(&mut state);
    let (device, record) = dummy();
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    match MmioTransport::restore(mem.clone(), device, irq, &state) {
        Err(MmioError::Restore(e)) => {
            assert_eq!(record.lock().unwrap().activations, 0, "activated anyway");
            e
        }
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => panic!("corrupt state accepted"),
    }
}

fn assert_mentions(err: &RestoreError, parts: &[&str]) {
    let message = err.to_string();
    for part in parts {
        assert!(message.contains(part), "{message:?} lacks {part:?}");
    }
}

#[test]
fn wrong_device_type_is_refused() {
    let err = refused(|s| s.device_type = 2);
    assert!(matches!(
        err,
        RestoreError::DeviceType {
            device_type: 4,
            saved: 2
        }
    ));
    assert_mentions(&err, &["type 2", "type 4"]);
}

#[test]
fn wrong_queue_count_is_refused() {
    let err = refused(|s| {
        s.queues.pop();
    });
    assert!(matches!(
        err,
        RestoreError::QueueCount {
            device_type: 4,
            saved: 1,
            expected: 2
        }
    ));
    assert_mentions(&err, &["type 4", "1 queues", "has 2"]);
}

#[test]
fn queue_size_not_power_of_two_is_refused() {
    let err = refused(|s| s.queues[1].size = 12);
    assert!(matches!(
        err,
        RestoreError::QueueSize {
            device_type: 4,
            index: 1,
            size: 12,
            max: 16
        }
    ));
    assert_mentions(&err, &["type 4", "queue 1", "size 12"]);
}

#[test]
fn queue_size_above_max_is_refused() {
    let err = refused(|s| s.queues[0].size = 32);
    assert!(matches!(
        err,
        RestoreError::QueueSize {
            index: 0,
            size: 32,
            ..
        }
    ));
}

#[test]
fn queue_max_size_above_the_device_is_refused() {
    let err = refused(|s| s.queues[0].max_size = 256);
    assert!(matches!(
        err,
        RestoreError::QueueMaxSize {
            index: 0,
            saved: 256,
            expected: 16,
            ..
        }
    ));
}

#[test]
fn a_smaller_saved_max_size_is_taken() {
    // As a snapshot of an older hospes whose device offered smaller queues.
    let mem = guest_memory();
    let (device, _) = dummy();
    let mut d = TestDriver::new(&mem, device);
    d.bring_up(FEATURES | DUMMY_FEATURE, 2, 8);
    d.add_chain(0, &[ro(DATA_BASE, 16)]);
    d.process(0);
    let mut saved = d.t().save_state();
    for q in &mut saved.queues {
        q.max_size = 8;
    }
    let (device, _) = dummy();
    let mut d = d.restore(&saved, || device).unwrap();
    d.t().resume();
    d.add_chain(0, &[ro(DATA_BASE, 16)]);
    d.process(0);
    assert_eq!(d.used_idx(0), 2, "the restored queue goes on");
}

#[test]
fn ring_outside_memory_is_refused() {
    let err = refused(|s| s.queues[0].used_ring = 0x10_0000_0000);
    assert!(matches!(
        err,
        RestoreError::QueueOutsideMemory {
            device_type: 4,
            index: 0,
            used: 0x10_0000_0000,
            ..
        }
    ));
    assert_mentions(&err, &["queue 0", "0x1000000000"]);
}

#[test]
fn misaligned_ring_is_refused() {
    let err = refused(|s| s.queues[1].desc_table += 8);
    assert!(matches!(
        err,
        RestoreError::QueueAlignment {
            index: 1,
            align: 16,
            ..
        }
    ));
}

#[test]
fn unoffered_features_are_refused() {
    let err = refused(|s| s.driver_features |= 1 << 5);
    assert!(matches!(err, RestoreError::Features { features, .. } if features & 1 << 5 != 0));
    let err = refused(|s| s.driver_features &= !VIRTIO_F_VERSION_1);
    assert!(matches!(err, RestoreError::Features { .. }));
}

#[test]
fn incoherent_status_is_refused() {
    let err = refused(|s| s.status &= !DRIVER_OK);
    assert!(matches!(err, RestoreError::Status { status: 0xb, .. }));
    assert_mentions(&err, &["status 0xb"]);
    let err = refused(|s| s.activated = false);
    assert!(matches!(err, RestoreError::Status { status: 0xf, .. }));
    let err = refused(|s| s.acked_unknown_feature_word = true);
    assert!(matches!(err, RestoreError::Status { .. }));
}

#[test]
fn unknown_interrupt_bits_are_refused() {
    let err = refused(|s| s.interrupt_status = 4);
    assert!(matches!(
        err,
        RestoreError::InterruptStatus { status: 4, .. }
    ));
}

#[test]
fn event_idx_disagreeing_with_features_is_refused() {
    let err = refused(|s| s.queues[1].event_idx_enabled = false);
    assert!(matches!(
        err,
        RestoreError::QueueEventIdx {
            index: 1,
            saved: false,
            expected: true,
            ..
        }
    ));
    let err = refused(|s| s.driver_features &= !VIRTIO_RING_F_EVENT_IDX);
    assert!(matches!(err, RestoreError::QueueEventIdx { index: 0, .. }));
}
