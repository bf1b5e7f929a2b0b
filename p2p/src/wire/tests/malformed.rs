//! Each malformed case, refused with the error that names the offending value. Each is
//! the Hello of `config()` followed by frames.

use std::io;

use super::*;
use crate::wire::frame::raw_header_for;
use crate::wire::fuzz::{self, MemorySink};

pub(super) static PAGE: [u8; PAGE_SIZE] = [0xab; PAGE_SIZE];

pub(super) fn hello() -> Vec<u8> {
    enc(Frame::Hello(Hello {
        min_version: MIN_PROTOCOL_VERSION,
        max_version: PROTOCOL_VERSION,
        config: config(),
    }))
}

/// A frame with any payload, correctly framed.
fn raw(kind: FrameType, payload: &[u8]) -> Vec<u8> {
    let mut frame = raw_header_for(PROTOCOL_VERSION, kind as u8, 0, payload).to_vec();
    frame.extend_from_slice(payload);
    frame
}

pub(super) fn pages(round: u32, gpas: &[u64]) -> Vec<u8> {
    let pages = gpas.iter().map(|&gpa| (gpa, &PAGE[..])).collect();
    enc(Frame::Pages { round, pages })
}

fn blocks(round: u32, disk: u16, entries: &[(u64, usize)]) -> Vec<u8> {
    let blocks = entries
        .iter()
        .map(|&(index, len)| (index, &PAGE[..len]))
        .collect();
    enc(Frame::Blocks {
        round,
        disk,
        blocks,
    })
}

fn round_end(round: u32, pages: u64, blocks: u64) -> Vec<u8> {
    enc(Frame::RoundEnd {
        round,
        pages,
        blocks,
    })
}

fn state_frame() -> Vec<u8> {
    let bytes = snapshot::encode(&vm_state(&config())).unwrap();
    enc(Frame::State { bytes: &bytes })
}

/// Runs a receiver (accepting the Hello) over `stream` until the stream ends.
fn receive_stream(stream: &[u8]) -> Result<(Receiver, MemorySink), WireError> {
    let mut input = stream;
    let mut rx = Receiver::new();
    let mut sink = MemorySink::new(config());
    while !input.is_empty() {
        if let Event::Hello { .. } = rx.next(&mut input, &mut sink)? {
            rx.accept(&mut io::sink())?;
        }
    }
    Ok((rx, sink))
}

fn receive(frames: &[Vec<u8>]) -> Result<(Receiver, MemorySink), WireError> {
    receive_stream(&[&[hello()], frames].concat().concat())
}

fn refused(frames: &[Vec<u8>]) -> WireError {
    match receive(frames) {
        Err(err) => err,
        Ok((rx, _)) => panic!("accepted, receiver in {:?}", rx.phase()),
    }
}

#[test]
fn truncated() {
    let err = fuzz::run(&hello()).unwrap_err();
    assert!(
        matches!(err, WireError::TruncatedHeader { got: 0 }),
        "{err}"
    );
    let frame = pages(0, &[0]);
    for got in [1, 5, 15] {
        let err = refused(&[frame[..got].to_vec()]);
        assert!(
            matches!(err, WireError::TruncatedHeader { got: g } if g == got),
            "{err}"
        );
    }
    let err = refused(&[frame[..5].to_vec()]);
    assert_eq!(
        err.to_string(),
        "stream ended after 5 of 16 frame header bytes"
    );
    let err = refused(&[frame[..frame.len() - 1].to_vec()]);
    assert_eq!(
        err.to_string(),
        "stream ended after 4111 of 4112 payload bytes of a Pages frame"
    );
}

#[test]
fn corrupted() {
    let mut frame = pages(0, &[0]);
    frame[100] ^= 1;
    let err = refused(&[frame]);
    assert!(
        matches!(err, WireError::Crc { kind: FrameType::Pages, stored, computed } if stored != computed),
        "{err}"
    );
    assert!(err.to_string().starts_with("Pages frame CRC 0x"), "{err}");
    // The CRC covers the header too: a damaged type is caught.
    let mut frame = pages(0, &[0]);
    frame[6] = FrameType::ZeroPages as u8;
    let err = refused(&[frame]);
    assert!(
        matches!(
            err,
            WireError::Crc {
                kind: FrameType::ZeroPages,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn header_fields() {
    let frame = pages(0, &[0]);
    let mut bad = frame.clone();
    bad[..4].copy_from_slice(b"HTTP");
    assert_eq!(
        refused(&[bad]).to_string(),
        r#"not a hospes migration stream: magic is "HTTP", expected "HSPM""#
    );
    let payload = &frame[HEADER_LEN..];
    let with = |version, code, flags| {
        [&raw_header_for(version, code, flags, payload)[..], payload].concat()
    };
    assert_eq!(
        refused(&[with(4, 4, 0)]).to_string(),
        "protocol version 4 not supported (this build speaks 1..=3)"
    );
    assert!(matches!(
        refused(&[with(1, 0, 0)]),
        WireError::UnknownFrameType(0)
    ));
    assert!(matches!(
        refused(&[with(1, 99, 0)]),
        WireError::UnknownFrameType(99)
    ));
    assert_eq!(
        refused(&[with(1, 4, 0x80)]).to_string(),
        "unknown flags 0x80 on a Pages frame"
    );
}

#[test]
fn oversized_frames_are_refused_before_reading() {
    // Headers alone: the length is refused before a payload byte is read.
    let header = |kind: FrameType, len: u32| {
        let mut header = raw_header_for(1, kind as u8, 0, &[]);
        header[8..12].copy_from_slice(&len.to_le_bytes());
        header.to_vec()
    };
    assert_eq!(
        refused(&[header(FrameType::Pages, 9 << 20)]).to_string(),
        "Pages frame of 9 MiB exceeds the 4 MiB limit"
    );
    assert_eq!(
        refused(&[header(FrameType::Blocks, (4 << 20) + 1)]).to_string(),
        "Blocks frame of 4194305 bytes exceeds the 4 MiB limit"
    );
    let err = refused(&[header(FrameType::State, u32::MAX)]);
    assert!(
        matches!(err, WireError::FrameTooLarge { kind: FrameType::State, len, .. } if len == u64::from(u32::MAX)),
        "{err}"
    );
    // At the limit, what is missing is the payload.
    let err = refused(&[header(FrameType::Pages, 4 << 20)]);
    assert!(
        matches!(err, WireError::TruncatedPayload { got: 0, .. }),
        "{err}"
    );
    // Encoding refuses what decoding would.
    let too_many = (0..1023).map(|i| (i * 4096, &PAGE[..])).collect();
    let encoded = Frame::Pages {
        round: 0,
        pages: too_many,
    }
    .encode();
    assert!(matches!(encoded, Err(WireError::FrameTooLarge { .. })));
}

#[test]
fn pages_outside_guest_memory() {
    let memory = "guest memory [0x0, 0x200000) [0x100000000, 0x100200000)";
    let cases = [
        (2 << 20, format!("page 0x200000 is outside {memory}")),
        (
            HIGH - 0x1000,
            format!("page 0xfffff000 is outside {memory}"),
        ),
        (
            HIGH + (2 << 20),
            format!("page 0x100200000 is outside {memory}"),
        ),
        (
            0xffff_ffff_ffff_f000,
            format!("page 0xfffffffffffff000 is outside {memory}"),
        ),
        (0x1001, "page 0x1001 is not 4096-byte aligned".into()),
        (
            u64::MAX,
            "page 0xffffffffffffffff is not 4096-byte aligned".into(),
        ),
    ];
    for (gpa, expected) in cases {
        let zero = enc(Frame::ZeroPages {
            round: 0,
            gpas: vec![0, gpa],
        });
        for frame in [pages(0, &[0, gpa]), zero] {
            assert_eq!(refused(&[frame]).to_string(), expected);
        }
    }
    // The last page of each region is inside.
    let last = [(2 << 20) - 4096, HIGH + (2 << 20) - 4096];
    let (_, sink) = receive(&[pages(0, &last)]).unwrap();
    assert_eq!(sink.pages.keys().copied().collect::<Vec<_>>(), last);
}

#[test]
fn blocks_outside_the_disks() {
    let cases: [(Vec<u8>, &str); 8] = [
        (
            blocks(0, 2, &[(0, 4096)]),
            "disk 2 does not exist: the VM has 2 disks",
        ),
        (
            blocks(0, 0, &[(0, 4096), (17, 4096)]),
            "block 17 is past the end of disk 0 (17 blocks of 4096 bytes)",
        ),
        (
            blocks(0, 1, &[(2, 4096)]),
            "block 2 is past the end of disk 1 (2 blocks of 4096 bytes)",
        ),
        (
            blocks(0, 0, &[(u64::MAX, 4096)]),
            "block 18446744073709551615 is past the end of disk 0 (17 blocks of 4096 bytes)",
        ),
        (
            blocks(0, 0, &[(16, 4096)]),
            "block 16 of disk 0 carries 4096 bytes, it has 1000",
        ),
        (
            blocks(0, 0, &[(3, 1000)]),
            "block 3 of disk 0 carries 1000 bytes, it has 4096",
        ),
        (
            enc(Frame::ZeroBlocks {
                round: 0,
                disk: 0,
                indices: vec![1, 17],
            }),
            "block 17 is past the end of disk 0 (17 blocks of 4096 bytes)",
        ),
        (
            enc(Frame::ZeroBlocks {
                round: 0,
                disk: 9,
                indices: vec![0],
            }),
            "disk 9 does not exist: the VM has 2 disks",
        ),
    ];
    for (frame, expected) in cases {
        assert_eq!(refused(&[frame]).to_string(), expected);
    }
    // Nothing of a refused frame reaches the sink, not even its valid entries.
    let mut stream = hello();
    stream.extend(blocks(0, 0, &[(0, 4096), (17, 4096)]));
    let mut rx = Receiver::new();
    let mut sink = MemorySink::new(config());
    let mut input = &stream[..];
    rx.next(&mut input, &mut sink).unwrap();
    rx.accept(&mut io::sink()).unwrap();
    rx.next(&mut input, &mut sink).unwrap_err();
    assert!(sink.blocks.is_empty());
    // The short last block and the last block of the read-only disk are fine.
    let (_, sink) = receive(&[blocks(0, 0, &[(16, 1000)]), blocks(0, 1, &[(1, 4096)])]).unwrap();
    assert_eq!(sink.blocks.len(), 2);
}

#[test]
fn rounds() {
    let cases = [
        (
            vec![pages(0, &[0]), round_end(0, 1, 0), pages(0, &[0])],
            "Pages frame of round 0 during round 1",
        ),
        (
            vec![pages(1, &[0])],
            "Pages frame of round 1 during round 0",
        ),
        (
            vec![round_end(0, 0, 0), blocks(2, 0, &[(0, 4096)])],
            "Blocks frame of round 2 during round 1",
        ),
        (
            vec![round_end(1, 0, 0)],
            "RoundEnd frame of round 1 during round 0",
        ),
        (
            vec![pages(0, &[0, 0x1000]), round_end(0, 3, 0)],
            "round 0 ended announcing 3 page entries, 2 were received",
        ),
        (
            vec![pages(0, &[0]), round_end(0, 1, 1)],
            "round 0 ended announcing 1 block entries, 0 were received",
        ),
    ];
    for (frames, expected) in cases {
        assert_eq!(refused(&frames).to_string(), expected);
    }
    // Empty rounds are fine.
    let (rx, _) = receive(&[round_end(0, 0, 0), round_end(1, 0, 0)]).unwrap();
    assert_eq!(
        rx.phase(),
        ReceiverPhase::Precopy {
            round: 2,
            pages: 0,
            blocks: 0
        }
    );
}

#[test]
fn frames_out_of_order() {
    let err = fuzz::run(&pages(0, &[0])).unwrap_err();
    assert_eq!(err.to_string(), "Pages frame out of order: expected Hello");
    let round0 = "expected pages or blocks of round 0, or its RoundEnd";
    let between = "expected pages or blocks of round 1, its RoundEnd, or State";
    let cases = [
        (vec![hello()], format!("Hello frame out of order: {round0}")),
        (
            vec![state_frame()],
            format!("State frame out of order: {round0}"),
        ),
        (
            vec![round_end(0, 0, 0), pages(1, &[0]), state_frame()],
            "State frame out of order: expected pages or blocks of round 1, or its RoundEnd".into(),
        ),
        (
            vec![round_end(0, 0, 0), enc(Frame::Done { hash: 0 })],
            format!("Done frame out of order: {between}"),
        ),
        (
            vec![round_end(0, 0, 0), state_frame(), state_frame()],
            "State frame out of order: expected Done".into(),
        ),
        (
            vec![round_end(0, 0, 0), state_frame(), pages(1, &[0])],
            "Pages frame out of order: expected Done".into(),
        ),
        (
            vec![enc(Frame::HelloAck {
                version: PROTOCOL_VERSION,
            })],
            format!("HelloAck frame out of order: {round0}"),
        ),
        (
            vec![enc(Frame::Ready)],
            format!("Ready frame out of order: {round0}"),
        ),
        (
            vec![enc(Frame::Commit)],
            format!("Commit frame out of order: {round0}"),
        ),
    ];
    for (frames, expected) in cases {
        assert_eq!(refused(&frames).to_string(), expected);
    }

    // Nothing between Done and Ready: the VM is not running yet, so the migration fails.
    let mut wire = small_migration();
    wire.extend(pages(2, &[0]));
    let mut rx = Receiver::new();
    let mut sink = MemorySink::new(config());
    let mut input = &wire[..];
    while rx.phase() != ReceiverPhase::Complete {
        if let Event::Hello { .. } = rx.next(&mut input, &mut sink).unwrap() {
            rx.accept(&mut io::sink()).unwrap();
        }
    }
    let err = rx.next(&mut input, &mut sink).unwrap_err();
    assert_eq!(
        err.to_string(),
        "Pages frame out of order: expected nothing before Ready"
    );
    assert_eq!(rx.phase(), ReceiverPhase::Failed);

    // After Ready, only Commit or Abort; after Commit the VM runs here and a stray frame
    // changes nothing.
    for (stray, expected) in [
        (
            pages(2, &[0]),
            "Pages frame out of order: expected Commit or Abort",
        ),
        (
            enc(Frame::Ready),
            "Ready frame out of order: expected Commit or Abort",
        ),
    ] {
        let mut rx = Receiver::new();
        let mut input = &small_migration()[..];
        while rx.phase() != ReceiverPhase::Complete {
            if let Event::Hello { .. } = rx.next(&mut input, &mut sink).unwrap() {
                rx.accept(&mut io::sink()).unwrap();
            }
        }
        rx.ready(&mut io::sink()).unwrap();
        let err = rx.next(&mut &stray[..], &mut sink).unwrap_err();
        assert_eq!(err.to_string(), expected);
        assert_eq!(rx.phase(), ReceiverPhase::Failed);
    }
    let mut rx = Receiver::new();
    let mut input = &small_migration()[..];
    while rx.phase() != ReceiverPhase::Complete {
        if let Event::Hello { .. } = rx.next(&mut input, &mut sink).unwrap() {
            rx.accept(&mut io::sink()).unwrap();
        }
    }
    rx.ready(&mut io::sink()).unwrap();
    let commit = enc(Frame::Commit);
    assert!(matches!(
        rx.next(&mut &commit[..], &mut sink).unwrap(),
        Event::Commit
    ));
    let err = rx.next(&mut &commit[..], &mut sink).unwrap_err();
    assert_eq!(
        err.to_string(),
        "Commit frame out of order: expected nothing after Commit"
    );
    assert_eq!(rx.phase(), ReceiverPhase::Committed);
}

/// A whole migration from the Sender: one page, one round, the state, Done.
fn small_migration() -> Vec<u8> {
    let mut tx = Sender::new(config()).unwrap();
    // Uncompressed, so that the test below can alter a page's bytes in place.
    tx.set_compression(false);
    let mut wire = Vec::new();
    tx.hello(&mut wire).unwrap();
    tx.read_ack(
        &mut &enc(Frame::HelloAck {
            version: PROTOCOL_VERSION,
        })[..],
    )
    .unwrap();
    tx.page(&mut wire, 0x3000, &page_of(1)).unwrap();
    tx.end_round(&mut wire).unwrap();
    tx.state(&mut wire, &vm_state(&config())).unwrap();
    tx.done(&mut wire).unwrap();
    wire
}

#[test]
fn hash_mismatch() {
    let wire = small_migration();
    fuzz::run(&[&wire[..], &enc(Frame::Commit)].concat()).unwrap();

    // Another hash in Done.
    let done_at = wire.len() - HEADER_LEN - 16;
    let Frame::Done { hash } =
        Frame::decode(FrameType::Done, &wire[done_at + HEADER_LEN..]).unwrap()
    else {
        panic!("not a Done frame");
    };
    let bad = [&wire[..done_at], &enc(Frame::Done { hash: hash ^ 1 })].concat();
    let err = fuzz::run(&bad).unwrap_err();
    assert!(
        matches!(err, WireError::HashMismatch { sent, computed } if sent == hash ^ 1 && computed == hash),
        "{err}"
    );
    assert!(
        err.to_string().starts_with("hash mismatch: source sent 0x"),
        "{err}"
    );

    // A page altered and framed anew passes its CRC, but not the hash.
    let at = hello().len();
    let header = Header::parse(wire[at..at + HEADER_LEN].try_into().unwrap()).unwrap();
    assert_eq!(header.kind, FrameType::Pages);
    let end = at + HEADER_LEN + header.len as usize;
    let mut payload = wire[at + HEADER_LEN..end].to_vec();
    payload[100] ^= 1;
    let bad = [&wire[..at], &raw(FrameType::Pages, &payload), &wire[end..]].concat();
    let err = fuzz::run(&bad).unwrap_err();
    assert!(matches!(err, WireError::HashMismatch { .. }), "{err}");
}

#[test]
fn state_is_checked() {
    let err = refused(&[round_end(0, 0, 0), enc(Frame::State { bytes: b"garbage" })]);
    assert_eq!(
        err.to_string(),
        "VM state: truncated: 7 bytes, header needs 32"
    );
    let mut other = vm_state(&config());
    other.machine.name = "db".into();
    let bytes = snapshot::encode(&other).unwrap();
    let err = refused(&[round_end(0, 0, 0), enc(Frame::State { bytes: &bytes })]);
    assert_eq!(
        err.to_string(),
        "VM state does not match the agreed configuration: another machine configuration"
    );
    let mut other = vm_state(&config());
    other.memory.regions = vec![(0, 4 << 20)];
    let bytes = snapshot::encode(&other).unwrap();
    let err = refused(&[round_end(0, 0, 0), enc(Frame::State { bytes: &bytes })]);
    assert_eq!(
        err.to_string(),
        "VM state does not match the agreed configuration: other memory regions"
    );
    // The Sender refuses to send it in the first place.
    let (mut tx, _) = handshake(&config());
    tx.end_round(&mut Vec::new()).unwrap();
    let err = tx.state(&mut Vec::new(), &other).unwrap_err();
    assert!(matches!(err, WireError::StateMismatch(_)), "{err}");
    assert_eq!(tx.phase(), SenderPhase::Failed);
}

#[test]
fn hello_is_checked() {
    let hello_with = |min, max, config| {
        enc(Frame::Hello(Hello {
            min_version: min,
            max_version: max,
            config,
        }))
    };
    assert_eq!(
        fuzz::run(&hello_with(4, 5, config()))
            .unwrap_err()
            .to_string(),
        "peer speaks protocol versions 4..=5, this build speaks 1..=3"
    );
    let err = fuzz::run(&hello_with(1, 0, config())).unwrap_err();
    assert!(
        matches!(err, WireError::NoCommonVersion { min: 1, max: 0 }),
        "{err}"
    );
    // A wider range: the highest common version is chosen.
    let mut rx = Receiver::new();
    let event = rx
        .next(
            &mut &hello_with(0, 9, config())[..],
            &mut MemorySink::default(),
        )
        .unwrap();
    assert!(
        matches!(
            event,
            Event::Hello {
                version: PROTOCOL_VERSION,
                ..
            }
        ),
        "{event:?}"
    );

    type Mutation = fn(&mut MigrationConfig);
    let cases: [(Mutation, &str); 11] = [
        (|c| c.regions = vec![], "0 memory regions, expected 1 to 2"),
        (
            |c| c.regions = vec![(0, 1 << 20), (2 << 20, 1 << 20), (HIGH, 2 << 20)],
            "3 memory regions, expected 1 to 2",
        ),
        (
            |c| c.regions = vec![(0, 2 << 20), (1 << 20, 2 << 20)],
            "memory region of 0x200000 bytes at 0x100000 overlaps or is out of order",
        ),
        (
            |c| c.regions = vec![(0x800, 4 << 20)],
            "memory region of 0x400000 bytes at 0x800 is empty or not 4096-byte aligned",
        ),
        (
            |c| c.regions = vec![(0xffff_ffff_ffff_f000, 4 << 20)],
            "memory region of 0x400000 bytes at 0xfffffffffffff000 ends past 2^64",
        ),
        (
            |c| c.regions = vec![(0, 2 << 20)],
            "memory regions total 2097152 bytes, the machine has 4 MiB",
        ),
        (|c| c.machine.vcpus = 0, "0 vCPUs, expected 1 to 32"),
        (|c| c.machine.vcpus = 33, "33 vCPUs, expected 1 to 32"),
        (
            |c| c.machine.memory_mib = 65537,
            "65537 MiB of guest memory, expected 1 to 65536",
        ),
        (
            |c| c.machine.drives[0].size = MAX_DISK_BYTES + 1,
            "drive \"root\" of 17592186044417 bytes, at most 17592186044416",
        ),
        (
            |c| c.machine.cmdline = "x".repeat(4097),
            "command line of 4097 bytes, at most 4096",
        ),
    ];
    for (mutate, expected) in cases {
        let mut c = config();
        mutate(&mut c);
        let expected = format!("invalid VM configuration: {expected}");
        let err = fuzz::run(&hello_with(1, 1, c.clone())).unwrap_err();
        assert_eq!(err.to_string(), expected);
        let err = Sender::new(c).err().unwrap();
        assert_eq!(err.to_string(), expected);
    }

    let mut payload = [1u16, 1, 0].map(u16::to_le_bytes).concat();
    payload.extend_from_slice(b"{");
    let err = fuzz::run(&raw(FrameType::Hello, &payload)).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("malformed Hello frame: machine configuration: EOF"),
        "{err}"
    );
    let payload = [1u16, 1, 5000].map(u16::to_le_bytes).concat();
    let err = fuzz::run(&raw(FrameType::Hello, &payload)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "malformed Hello frame: 5000 memory regions need at least 80000 bytes, 0 left"
    );
}

#[test]
fn malformed_payloads() {
    let le = |values: &[u32]| {
        values
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<u8>>()
    };
    let one_page = [&0u64.to_le_bytes()[..], &PAGE].concat();
    let cases: [(Vec<u8>, &str); 11] = [
        (
            raw(FrameType::Pages, &[le(&[0, 3]), one_page.clone()].concat()),
            "malformed Pages frame: 3 pages need at least 12312 bytes, 4104 left",
        ),
        (
            raw(FrameType::ZeroPages, &le(&[0, u32::MAX])),
            "malformed ZeroPages frame: 4294967295 pages need at least 34359738360 bytes, 0 left",
        ),
        (
            raw(FrameType::Pages, &le(&[0, 0])),
            "malformed Pages frame: no pages",
        ),
        (
            raw(FrameType::Pages, &[le(&[0, 1]), one_page, vec![7]].concat()),
            "malformed Pages frame: 1 bytes after the last field",
        ),
        (
            raw(
                FrameType::Blocks,
                &[le(&[0]), vec![0, 0], le(&[1, 0, 0, 5000]), vec![1; 100]].concat(),
            ),
            "malformed Blocks frame: block data needs 5000 bytes, 100 left",
        ),
        (
            raw(FrameType::RoundEnd, &[0; 7]),
            "malformed RoundEnd frame: page count needs 8 bytes, 3 left",
        ),
        (
            raw(FrameType::Done, &[0; 15]),
            "malformed Done frame: hash needs 16 bytes, 15 left",
        ),
        (
            raw(FrameType::Abort, &[b'x'; 1025]),
            "malformed Abort frame: reason of 1025 bytes, at most 1024",
        ),
        (
            raw(FrameType::Abort, b"\xff"),
            "malformed Abort frame: reason: invalid utf-8 sequence of 1 bytes from index 0",
        ),
        (
            raw(FrameType::Ready, b"\0"),
            "malformed Ready frame: 1 bytes after the last field",
        ),
        (
            raw(FrameType::Commit, b"\0"),
            "malformed Commit frame: 1 bytes after the last field",
        ),
    ];
    for (frame, expected) in cases {
        assert_eq!(refused(&[frame]).to_string(), expected);
    }
    // Encoding refuses the same.
    let empty = Frame::Pages {
        round: 0,
        pages: Vec::new(),
    };
    assert_eq!(
        empty.encode().unwrap_err().to_string(),
        "malformed Pages frame: no pages"
    );
    let long = Frame::Abort {
        reason: "x".repeat(1025),
    };
    assert!(matches!(long.encode(), Err(WireError::Malformed { .. })));
    let short = Frame::Pages {
        round: 0,
        pages: vec![(0, &PAGE[..100])],
    };
    assert!(matches!(short.encode(), Err(WireError::PageLength(100))));
}
