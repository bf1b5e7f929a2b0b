//! A whole migration through in-memory pipes (here), every malformed case refused with the
//! error that names it ([`malformed`]), refusals, aborts and misuse ([`peers`]), and the
//! fuzz target's body over pseudo-random and mutated input ([`fuzz_smoke`]).

use std::collections::BTreeMap;
use std::time::Duration;

use snapshot::{DriveConfig, MachineConfig, NetConfig};

use super::fuzz::{vm_state, MemorySink};
use super::*;

mod compression;
mod fuzz_smoke;
mod malformed;
mod peers;

/// A 2-vCPU, 4 MiB VM (2 MiB below 4 GiB, 2 MiB above) with a 65536 + 1000-byte drive
/// (16 whole blocks and a short one), an 8 KiB read-only drive and a net.
fn machine() -> MachineConfig {
    let drive = |id: &str, size, read_only| DriveConfig {
        id: id.into(),
        file: format!("{id}.img"),
        size,
        read_only,
        cache: "writeback".into(),
    };
    MachineConfig {
        name: "web".into(),
        vcpus: 2,
        memory_mib: 4,
        cmdline: "console=ttyS0".into(),
        drives: vec![
            drive("root", 65_536 + 1000, false),
            drive("data", 8192, true),
        ],
        nets: vec![NetConfig {
            id: "eth0".into(),
            tap: "tap0".into(),
            mac: [2, 0, 0, 0, 0, 1],
        }],
    }
}

const HIGH: u64 = 1 << 32;

fn config() -> MigrationConfig {
    MigrationConfig::new(machine(), vec![(0, 2 << 20), (HIGH, 2 << 20)]).unwrap()
}

/// A non-zero page or block, different per seed.
fn data_of(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (seed as usize).wrapping_mul(131).wrapping_add(i) as u8 | 1)
        .collect()
}

fn page_of(seed: u64) -> Vec<u8> {
    data_of(seed, PAGE_SIZE)
}

/// Sender and Receiver through the Hello and its HelloAck, ready for round 0.
fn handshake(config: &MigrationConfig) -> (Sender, Receiver) {
    let mut tx = Sender::new(config.clone()).unwrap();
    let mut rx = Receiver::new();
    let mut to_dst = Vec::new();
    tx.hello(&mut to_dst).unwrap();
    let event = rx
        .next(&mut &to_dst[..], &mut MemorySink::default())
        .unwrap();
    assert!(
        matches!(&event, Event::Hello { version: PROTOCOL_VERSION, config: c } if c == config),
        "{event:?}"
    );
    let mut to_src = Vec::new();
    rx.accept(&mut to_src).unwrap();
    assert_eq!(tx.read_ack(&mut &to_src[..]).unwrap(), PROTOCOL_VERSION);
    (tx, rx)
}

/// A Hello of `config()` offering version 1 only, as a version 1 source sends it.
fn hello_v1() -> Vec<u8> {
    Frame::Hello(Hello {
        min_version: 1,
        max_version: 1,
        config: config(),
    })
    .encode()
    .unwrap()
}

/// A Sender for `config()` whose destination chose version 1.
fn sender_acked_v1() -> Sender {
    let mut tx = Sender::new(config()).unwrap();
    tx.hello(&mut Vec::new()).unwrap();
    let ack = Frame::HelloAck { version: 1 }.encode_as(1).unwrap();
    assert_eq!(tx.read_ack(&mut &ack[..]).unwrap(), 1);
    tx
}

/// Receives `wire` until Done.
fn receive_all(rx: &mut Receiver, sink: &mut MemorySink, wire: &[u8]) -> Vec<Event> {
    let mut input = wire;
    let mut events = Vec::new();
    loop {
        let event = rx.next(&mut input, sink).unwrap();
        let done = matches!(event, Event::Done);
        events.push(event);
        if done {
            assert!(input.is_empty());
            return events;
        }
    }
}

#[test]
fn whole_migration() {
    let config = config();
    let (mut tx, mut rx) = handshake(&config);
    let mut wire = Vec::new();
    let (mut pages, mut blocks) = (BTreeMap::new(), BTreeMap::new());
    let zero = vec![0; PAGE_SIZE];
    let last = HIGH + (2 << 20) - PAGE_SIZE as u64;

    // Round 0: every page and block; the zero ones are not sent.
    for (gpa, data) in [
        (0, page_of(1)),
        (0x1000, zero.clone()),
        (0x5000, page_of(2)),
        (last, page_of(3)),
    ] {
        tx.page(&mut wire, gpa, &data).unwrap();
        if data != zero {
            pages.insert(gpa, data);
        }
    }
    for (disk, index, data) in [
        (0, 0, data_of(4, BLOCK_SIZE)),
        (0, 16, data_of(5, 1000)),
        (1, 0, data_of(6, BLOCK_SIZE)),
        (1, 1, vec![0; BLOCK_SIZE]),
    ] {
        tx.block(&mut wire, disk, index, &data).unwrap();
        if data.iter().any(|&b| b != 0) {
            blocks.insert((disk, index), data);
        }
    }
    let stats = tx.end_round(&mut wire).unwrap();
    assert_eq!(
        stats,
        RoundStats {
            round: 0,
            pages: 3,
            blocks: 3
        }
    );

    // Round 1: a page and a block zeroed, a page and a block rewritten.
    tx.page(&mut wire, 0, &zero).unwrap();
    pages.remove(&0);
    tx.page(&mut wire, 0x5000, &page_of(7)).unwrap();
    pages.insert(0x5000, page_of(7));
    tx.zero_block(&mut wire, 0, 0).unwrap();
    blocks.remove(&(0, 0));
    tx.block(&mut wire, 0, 16, &data_of(8, 1000)).unwrap();
    blocks.insert((0, 16), data_of(8, 1000));
    assert_eq!(tx.end_round(&mut wire).unwrap().pages, 2);

    // Round 2, with the vCPUs paused; then the state.
    tx.page(&mut wire, last, &page_of(9)).unwrap();
    pages.insert(last, page_of(9));
    assert_eq!(tx.end_round(&mut wire).unwrap().round, 2);
    let state = vm_state(&config);
    tx.state(&mut wire, &state).unwrap();
    tx.done(&mut wire).unwrap();
    assert_eq!(tx.phase(), SenderPhase::AwaitReady);

    let mut sink = MemorySink::new(config.clone());
    let events = receive_all(&mut rx, &mut sink, &wire);
    assert_eq!(rx.hash(), tx.hash());
    assert_eq!(rx.phase(), ReceiverPhase::Complete);
    let rounds: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            Event::RoundEnd {
                round,
                pages,
                blocks,
            } => Some((*round, *pages, *blocks)),
            _ => None,
        })
        .collect();
    assert_eq!(rounds, [(0, 3, 3), (1, 2, 2), (2, 1, 0)]);
    let received = events
        .iter()
        .find_map(|e| match e {
            Event::State(state) => Some(state),
            _ => None,
        })
        .unwrap();
    assert_eq!(received.machine, state.machine);
    assert_eq!(received.devices, state.devices);
    assert_eq!(received.vcpus[1].regs.rip, 0xffff_ffff_8100_0001);
    assert_eq!(sink.pages, pages);
    assert_eq!(sink.blocks, blocks);

    // The destination's Ready, then the source's Commit hands the VM over.
    let mut back = Vec::new();
    rx.ready(&mut back).unwrap();
    assert_eq!(rx.phase(), ReceiverPhase::AwaitCommit);
    tx.read_ready(&mut &back[..]).unwrap();
    assert_eq!(tx.phase(), SenderPhase::Ready);
    let mut commit = Vec::new();
    tx.commit(&mut commit).unwrap();
    assert_eq!(tx.phase(), SenderPhase::Complete);
    assert!(matches!(
        rx.next(&mut &commit[..], &mut sink).unwrap(),
        Event::Commit
    ));
    assert_eq!(rx.phase(), ReceiverPhase::Committed);

    // Running tells the source how long the guest has run here.
    let mut tail = Vec::new();
    rx.running(&mut tail, Duration::from_micros(7_250)).unwrap();
    assert_eq!(tail.len(), HEADER_LEN + 8);
    let ran = tx.running(&tail, Duration::from_millis(40)).unwrap();
    assert_eq!(ran, Some(Duration::from_micros(7_250)));
    assert_eq!(tx.running(&[], Duration::from_millis(40)).unwrap(), None);
    assert_running_is_checked(&tx, &tail);
}

/// What `Sender::running` refuses in a tail after Commit, naming the problem.
fn assert_running_is_checked(tx: &Sender, tail: &[u8]) {
    let refused = |tail: &[u8], since_commit_ms| {
        tx.running(tail, Duration::from_millis(since_commit_ms))
            .unwrap_err()
            .to_string()
    };
    assert_eq!(
        refused(tail, 5),
        "malformed Running frame: the guest ran 7.25ms by its account, but Commit left only \
         5ms ago"
    );
    assert_eq!(
        refused(&[tail, tail].concat(), 40),
        "malformed Running frame: 24 bytes after it"
    );
    assert_eq!(
        refused(&tail[..20], 40),
        "stream ended after 4 of 8 payload bytes of a Running frame"
    );
    let ready = enc(Frame::Ready);
    assert_eq!(
        refused(&ready, 40),
        "Ready frame out of order: expected Running or the end of the stream"
    );
    let old = Frame::Running { since_resume_us: 1 }.encode_as(2).unwrap();
    assert_eq!(
        refused(&old, 40),
        "Running frame of protocol version 2, the version agreed is 3"
    );
    let mut bad = tail.to_vec();
    bad[HEADER_LEN] ^= 1;
    assert!(refused(&bad, 40).contains("CRC"), "{}", refused(&bad, 40));
}

/// Running is for after Commit only, on either side.
#[test]
fn running_comes_after_commit() {
    let mut tx = Sender::new(config()).unwrap();
    tx.hello(&mut Vec::new()).unwrap();
    let ack = Frame::HelloAck { version: 2 }.encode_as(2).unwrap();
    tx.read_ack(&mut &ack[..]).unwrap();
    let running = Frame::Running { since_resume_us: 1 }.encode_as(2).unwrap();
    let err = tx.running(&running, Duration::from_secs(1)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "wire protocol misused: running() before commit()"
    );

    let mut rx = Receiver::new();
    let err = rx
        .running(&mut Vec::new(), Duration::from_millis(1))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "wire protocol misused: running() before Commit"
    );
}

#[test]
fn pages_are_batched_within_the_frame_limit() {
    let config = config();
    let (mut tx, mut rx) = handshake(&config);
    tx.set_compression(false);
    let mut wire = Vec::new();
    let gpas = (0..512u64)
        .map(|i| i * 4096)
        .chain((0..512).map(|i| HIGH + i * 4096));
    for gpa in gpas {
        tx.page(&mut wire, gpa, &page_of(gpa)).unwrap();
    }
    tx.end_round(&mut wire).unwrap();

    let (mut input, mut payload, mut frames) = (&wire[..], Vec::new(), Vec::new());
    while !input.is_empty() {
        let header = read_frame(&mut input, &mut payload).unwrap();
        frames.push((header.kind, header.len as usize));
    }
    let entry = 8 + PAGE_SIZE;
    assert_eq!(
        frames,
        [
            (FrameType::Pages, 8 + 1022 * entry),
            (FrameType::Pages, 8 + 2 * entry),
            (FrameType::RoundEnd, 20)
        ]
    );
    assert!(8 + 1023 * entry > MAX_PAYLOAD);

    let mut sink = MemorySink::new(config);
    let mut input = &wire[..];
    for _ in 0..3 {
        rx.next(&mut input, &mut sink).unwrap();
    }
    assert_eq!(sink.pages.len(), 1024);
}

/// Zero entries in round 0 are not sent at all: the destination starts zeroed.
#[test]
fn round_zero_sends_no_zero_entries() {
    let (mut tx, _) = handshake(&config());
    let mut wire = Vec::new();
    tx.zero_page(&mut wire, 0).unwrap();
    tx.page(&mut wire, 0x1000, &[0; PAGE_SIZE]).unwrap();
    tx.zero_block(&mut wire, 0, 16).unwrap();
    tx.block(&mut wire, 1, 0, &[0; BLOCK_SIZE]).unwrap();
    let stats = tx.end_round(&mut wire).unwrap();
    assert_eq!((stats.pages, stats.blocks), (0, 0));
    assert_eq!(wire.len(), HEADER_LEN + 20);
}

fn enc(frame: Frame<'_>) -> Vec<u8> {
    frame.encode().unwrap()
}

/// The State goes in the snapshot's binary format to a peer of version 3 or later and as
/// JSON to an older one, which reads nothing else; a receiver reads either.
#[test]
fn the_state_is_binary_from_version_3_and_json_before() {
    let state = vm_state(&config());
    for version in MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION {
        let mut tx = Sender::new(config()).unwrap();
        tx.hello(&mut Vec::new()).unwrap();
        let ack = Frame::HelloAck { version }.encode_as(version).unwrap();
        assert_eq!(tx.read_ack(&mut &ack[..]).unwrap(), version);
        tx.end_round(&mut Vec::new()).unwrap();
        let mut frame = Vec::new();
        tx.state(&mut frame, &state).unwrap();
        let encoded = &frame[HEADER_LEN..];
        let format = if version >= 3 { 3 } else { 2 };
        assert_eq!(state_format(version), format);
        assert_eq!(encoded[8..12], format.to_le_bytes(), "version {version}");
        assert_eq!(snapshot::decode(encoded).unwrap().machine, state.machine);
    }

    for format in [snapshot::JSON_FORMAT_VERSION, snapshot::FORMAT_VERSION] {
        let (mut tx, mut rx) = handshake(&config());
        let mut wire = Vec::new();
        tx.end_round(&mut wire).unwrap();
        let bytes = snapshot::encode_as(&state, format).unwrap();
        wire.extend_from_slice(&enc(Frame::State { bytes: &bytes }));
        let mut input = &wire[..];
        let mut sink = MemorySink::new(config());
        let event = rx.next(&mut input, &mut sink).unwrap();
        assert!(matches!(event, Event::RoundEnd { .. }), "{event:?}");
        let event = rx.next(&mut input, &mut sink).unwrap();
        assert!(
            matches!(&event, Event::State(s) if s.machine == state.machine),
            "format {format}: {event:?}"
        );
    }
}
