//! Version 2's compressed data frames: what travels compressed, what arrives, what a v1
//! peer gets, and each way a compressed frame can be wrong.

use super::malformed::{hello, PAGE};
use super::*;
use crate::wire::frame::raw_header_for;

/// A page that compresses well (text-like: a few distinct bytes), different per seed.
fn text_page(seed: u64) -> Vec<u8> {
    (0..PAGE_SIZE)
        .map(|i| b"hospes "[(i + seed as usize) % 7])
        .collect()
}

/// A page that does not compress, different per seed.
fn noise_page(seed: u64) -> Vec<u8> {
    fuzz::noise(seed, PAGE_SIZE)
}

fn frames(mut wire: &[u8]) -> Vec<Header> {
    let (mut payload, mut out) = (Vec::new(), Vec::new());
    while !wire.is_empty() {
        out.push(read_frame(&mut wire, &mut payload).unwrap());
    }
    out
}

#[test]
fn compressible_pages_travel_compressed_and_arrive_intact() {
    let config = config();
    let (mut tx, mut rx) = handshake(&config);
    assert_eq!(tx.version(), PROTOCOL_VERSION);
    let mut wire = Vec::new();
    for i in 0..300 {
        tx.page(&mut wire, i * 4096, &text_page(i)).unwrap();
    }
    tx.block(&mut wire, 0, 3, &text_page(99)).unwrap();
    tx.end_round(&mut wire).unwrap();

    let headers = frames(&wire);
    let kinds: Vec<_> = headers.iter().map(|h| (h.kind, h.compressed())).collect();
    assert_eq!(
        kinds,
        [
            (FrameType::Pages, true),
            (FrameType::Blocks, true),
            (FrameType::RoundEnd, false)
        ]
    );
    assert!(headers.iter().all(|h| h.version == PROTOCOL_VERSION));
    let (raw, sent) = tx.data_bytes();
    assert!(sent * 10 < raw, "{raw} bytes built, {sent} sent");
    assert!(wire.len() < 20_000, "{} bytes on the wire", wire.len());

    let mut sink = MemorySink::new(config);
    let mut input = &wire[..];
    for _ in 0..3 {
        rx.next(&mut input, &mut sink).unwrap();
    }
    assert_eq!(sink.pages.len(), 300);
    for i in 0..300 {
        assert_eq!(sink.pages[&(i * 4096)], text_page(i), "page {i}");
    }
    assert_eq!(sink.blocks[&(0, 3)], text_page(99));
}

#[test]
fn incompressible_pages_travel_as_they_are() {
    let config = config();
    let (mut tx, mut rx) = handshake(&config);
    let mut wire = Vec::new();
    for i in 0..8 {
        tx.page(&mut wire, i * 4096, &noise_page(i + 1)).unwrap();
    }
    tx.end_round(&mut wire).unwrap();
    let headers = frames(&wire);
    assert!(!headers[0].compressed());
    assert_eq!(headers[0].len as usize, 8 + 8 * (8 + PAGE_SIZE));
    let (raw, sent) = tx.data_bytes();
    assert_eq!(raw, sent);
    let mut sink = MemorySink::new(config);
    let mut input = &wire[..];
    rx.next(&mut input, &mut sink).unwrap();
    assert_eq!(sink.pages[&0x7000], noise_page(8));
}

#[test]
fn a_frame_whose_first_64_kib_do_not_compress_is_not_tried_further() {
    use crate::wire::frame::deflate;
    // 16 noise pages (64 KiB) then 48 text pages: the probe gives up on the whole.
    let noisy_start: Vec<u8> = (0..64)
        .flat_map(|i| {
            if i < 16 {
                noise_page(i + 1)
            } else {
                text_page(i)
            }
        })
        .collect();
    let mut out = Vec::new();
    assert_eq!(deflate(&noisy_start, &mut out), None);
    // The same pages the other way round compress, and only the probe's share is noise.
    let text_start: Vec<u8> = (0..64)
        .flat_map(|i| {
            if i < 48 {
                text_page(i)
            } else {
                noise_page(i + 1)
            }
        })
        .collect();
    let n = deflate(&text_start, &mut out).expect("compressible");
    assert!(n < text_start.len() / 2, "{n} bytes");
    let header = Header::parse(&raw_header_for(
        2,
        FrameType::Pages as u8,
        FLAG_LZ4,
        &out[..n],
    ))
    .unwrap();
    // Inflated into a buffer that held more: exactly the payload comes out.
    let mut back = vec![7u8; 1 << 20];
    crate::wire::frame::inflate(&header, &out[..n], &mut back).unwrap();
    assert_eq!(back, text_start);
    // A payload under two probes is tried whole; the buffer keeps its size.
    let room = out.len();
    assert_eq!(deflate(&noise_page(1), &mut out), None);
    assert_eq!(out.len(), room);
}

#[test]
fn a_version_1_peer_gets_version_1_frames_and_nothing_compressed() {
    // A destination that speaks only version 1 answers the Hello with HelloAck 1.
    let mut tx = sender_acked_v1();
    let mut wire = Vec::new();
    tx.page(&mut wire, 0, &text_page(0)).unwrap();
    tx.end_round(&mut wire).unwrap();
    let headers = frames(&wire);
    assert!(headers.iter().all(|h| h.version == 1 && h.flags == 0));

    // A source that offers only version 1 gets it; a compressed frame there is refused.
    let hello_v1 = hello_v1();
    let mut rx = Receiver::new();
    let mut sink = MemorySink::new(config());
    let event = rx.next(&mut &hello_v1[..], &mut sink).unwrap();
    assert!(
        matches!(event, Event::Hello { version: 1, .. }),
        "{event:?}"
    );
    let mut back = Vec::new();
    rx.accept(&mut back).unwrap();
    assert_eq!(frames(&back)[0].version, 1);
    let err = rx
        .next(
            &mut &compressed_pages(1, &pages_payload(&[0]))[..],
            &mut sink,
        )
        .unwrap_err();
    assert_eq!(err.to_string(), "unknown flags 0x01 on a Pages frame");
}

/// The payload of a Pages frame of round 0 with PAGE at each gpa.
fn pages_payload(gpas: &[u64]) -> Vec<u8> {
    let mut p = 0u32.to_le_bytes().to_vec();
    p.extend_from_slice(&(gpas.len() as u32).to_le_bytes());
    for gpa in gpas {
        p.extend_from_slice(&gpa.to_le_bytes());
        p.extend_from_slice(&PAGE);
    }
    p
}

/// A Pages frame of `version` flagged compressed, carrying `plain` compressed.
fn compressed_pages(version: u16, plain: &[u8]) -> Vec<u8> {
    let mut wire = (plain.len() as u32).to_le_bytes().to_vec();
    wire.extend_from_slice(&lz4_flex::block::compress(plain));
    flagged(version, FrameType::Pages, &wire)
}

fn flagged(version: u16, kind: FrameType, wire: &[u8]) -> Vec<u8> {
    [
        &raw_header_for(version, kind as u8, FLAG_LZ4, wire)[..],
        wire,
    ]
    .concat()
}

fn refused(frames: &[Vec<u8>]) -> String {
    let stream = [&[hello()], frames].concat().concat();
    fuzz::run(&stream).unwrap_err().to_string()
}

#[test]
fn bad_compressed_frames_are_refused_naming_the_problem() {
    let plain = pages_payload(&[0, 0x1000]);
    // The frame itself is fine.
    let mut rx = Receiver::new();
    let mut sink = MemorySink::new(config());
    let stream = [hello(), compressed_pages(PROTOCOL_VERSION, &plain)].concat();
    let mut input = &stream[..];
    rx.next(&mut input, &mut sink).unwrap();
    rx.accept(&mut Vec::new()).unwrap();
    assert!(matches!(
        rx.next(&mut input, &mut sink),
        Ok(Event::Applied { pages: 2, .. })
    ));

    let block = lz4_flex::block::compress(&plain);
    let with_len = |len: u32, block: &[u8]| [&len.to_le_bytes()[..], block].concat();
    let cases = [
        (
            flagged(
                PROTOCOL_VERSION,
                FrameType::ZeroPages,
                &with_len(12, &block),
            ),
            "unknown flags 0x01 on a ZeroPages frame".to_string(),
        ),
        (
            flagged(PROTOCOL_VERSION, FrameType::Pages, &[1, 0]),
            "malformed Pages frame: compressed payload of 2 bytes has no length".to_string(),
        ),
        (
            flagged(
                PROTOCOL_VERSION,
                FrameType::Pages,
                &with_len(5 << 20, &block),
            ),
            "malformed Pages frame: compressed payload inflates to 5242880 bytes, over the \
             4194304 limit"
                .to_string(),
        ),
        (
            flagged(
                PROTOCOL_VERSION,
                FrameType::Pages,
                &with_len(plain.len() as u32 + 8, &block),
            ),
            format!(
                "malformed Pages frame: compressed payload inflates to {} bytes, its length \
                 says {}",
                plain.len(),
                plain.len() + 8
            ),
        ),
        (
            flagged(
                PROTOCOL_VERSION,
                FrameType::Pages,
                &with_len(4096, &[0xf0, 1, 2, 3]),
            ),
            "malformed Pages frame: LZ4 block: ".to_string(),
        ),
        (
            [
                &raw_header_for(1, FrameType::Pages as u8, 0, &plain)[..],
                &plain,
            ]
            .concat(),
            "Pages frame of protocol version 1, the version agreed is 3".to_string(),
        ),
    ];
    for (frame, expected) in cases {
        let err = refused(&[frame]);
        assert!(err.starts_with(&expected), "{err:?} is not {expected:?}");
    }
    // Too short an output for the block: the decoder stops, it does not write past it.
    let err = refused(&[flagged(
        PROTOCOL_VERSION,
        FrameType::Pages,
        &with_len(100, &block),
    )]);
    assert!(err.starts_with("malformed Pages frame: "), "{err}");
}
