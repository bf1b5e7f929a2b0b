//! The calls around the frames: refusals, aborts, a caller's mistakes, sink failures.

use std::io;

use super::malformed::{hello, pages, PAGE};
use super::*;

#[test]
fn aborts_and_refusals() {
    // The source gives up: the receiver fails, and stays failed.
    let abort = enc(Frame::Abort {
        reason: "vCPU pause failed".into(),
    });
    let mut stream = [hello(), pages(0, &[0]), abort].concat();
    let mut rx = Receiver::new();
    let mut sink = MemorySink::new(config());
    let mut input = &stream[..];
    rx.next(&mut input, &mut sink).unwrap();
    let err = rx.next(&mut input, &mut sink).unwrap_err();
    assert!(matches!(err, WireError::Misuse(_)), "{err}");
    assert_eq!(rx.phase(), ReceiverPhase::AwaitAccept);
    rx.accept(&mut io::sink()).unwrap();
    assert!(matches!(
        rx.next(&mut input, &mut sink),
        Ok(Event::Applied { pages: 1, .. })
    ));
    let event = rx.next(&mut input, &mut sink).unwrap();
    assert!(
        matches!(&event, Event::Aborted(r) if r == "vCPU pause failed"),
        "{event:?}"
    );
    assert_eq!(rx.phase(), ReceiverPhase::Failed);
    stream.extend(pages(0, &[0]));
    assert!(matches!(
        rx.next(&mut &stream[..], &mut sink),
        Err(WireError::Failed)
    ));

    // The destination refuses: the source fails.
    let mut tx = Sender::new(config()).unwrap();
    let mut wire = Vec::new();
    tx.hello(&mut wire).unwrap();
    let mut rx = Receiver::new();
    rx.next(&mut &wire[..], &mut sink).unwrap();
    let mut back = Vec::new();
    rx.refuse(&mut back, "not enough memory").unwrap();
    let err = tx.read_ack(&mut &back[..]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "destination refused the migration: not enough memory"
    );
    assert_eq!(tx.phase(), SenderPhase::Failed);
    assert!(matches!(
        tx.page(&mut wire, 0, &PAGE),
        Err(WireError::Failed)
    ));

    // The destination cannot build the VM: Abort instead of Ready, and the source resumes.
    let (mut tx, mut rx) = handshake(&config());
    let mut wire = Vec::new();
    tx.end_round(&mut wire).unwrap();
    tx.state(&mut wire, &vm_state(&config())).unwrap();
    tx.done(&mut wire).unwrap();
    receive_all(&mut rx, &mut MemorySink::new(config()), &wire);
    let mut back = Vec::new();
    rx.abort(&mut back, &"é".repeat(600)).unwrap();
    let err = tx.read_ready(&mut &back[..]).unwrap_err();
    let WireError::Aborted(reason) = &err else {
        panic!("{err}");
    };
    assert_eq!(reason.len(), 1024);
    assert_eq!(tx.phase(), SenderPhase::Failed);
}

#[test]
fn sender_checks_its_caller() {
    type Call = fn(&mut Sender, &mut Vec<u8>) -> Result<(), WireError>;
    let cases: [(Call, &str); 6] = [
        (
            |tx, w| tx.page(w, 4 << 20, &PAGE),
            "page 0x400000 is outside guest memory",
        ),
        (
            |tx, w| tx.page(w, 0, &PAGE[..100]),
            "page data of 100 bytes, a page is 4096",
        ),
        (
            |tx, w| tx.block(w, 0, 16, &PAGE),
            "block 16 of disk 0 carries 4096 bytes, it has 1000",
        ),
        (
            |tx, w| tx.zero_block(w, 5, 0),
            "disk 5 does not exist: the VM has 2 disks",
        ),
        (
            |tx, w| tx.state(w, &vm_state(&config())),
            "wire protocol misused: state() before end_round()",
        ),
        (
            |tx, w| {
                tx.end_round(w)?;
                tx.page(w, 0, &PAGE)?;
                tx.state(w, &vm_state(&config()))
            },
            "wire protocol misused: state() before end_round()",
        ),
    ];
    for (call, expected) in cases {
        let (mut tx, _) = handshake(&config());
        let err = call(&mut tx, &mut Vec::new()).unwrap_err();
        assert!(err.to_string().starts_with(expected), "{expected}: {err}");
        assert_eq!(tx.phase(), SenderPhase::Failed);
    }
    let mut tx = Sender::new(config()).unwrap();
    let err = tx.page(&mut Vec::new(), 0, &PAGE).unwrap_err();
    assert!(matches!(err, WireError::Misuse(_)), "{err}");
}

struct FailingSink;

impl Sink for FailingSink {
    fn write_page(&mut self, _: u64, _: &[u8]) -> io::Result<()> {
        Err(io::Error::other("out of memory"))
    }

    fn write_block(&mut self, _: u16, _: u64, _: &[u8]) -> io::Result<()> {
        Err(io::Error::other("disk full"))
    }
}

#[test]
fn sink_errors_name_the_page_or_block() {
    for (frame, expected) in [
        (
            pages(0, &[0x3000]),
            "cannot write page 0x3000: out of memory",
        ),
        (
            enc(Frame::ZeroBlocks {
                round: 0,
                disk: 0,
                indices: vec![16],
            }),
            "cannot write block 16 of disk 0: disk full",
        ),
    ] {
        let stream = [hello(), frame].concat();
        let mut input = &stream[..];
        let mut rx = Receiver::new();
        rx.next(&mut input, &mut FailingSink).unwrap();
        rx.accept(&mut io::sink()).unwrap();
        let err = rx.next(&mut input, &mut FailingSink).unwrap_err();
        assert_eq!(err.to_string(), expected);
    }
}

#[test]
fn the_destination_says_when_a_round_is_written() {
    let config = config();
    let (mut tx, mut rx) = handshake(&config);
    let mut sink = MemorySink::new(config.clone());
    let mut wire = Vec::new();
    tx.page(&mut wire, 0x1000, &page_of(1)).unwrap();
    let err = tx.wait_applied(&mut &[][..], 0).unwrap_err();
    assert!(matches!(err, WireError::Misuse(_)), "{err}");
    tx.end_round(&mut wire).unwrap();
    let mut back = Vec::new();
    let err = rx.applied(&mut back, 0).unwrap_err();
    assert!(matches!(err, WireError::Misuse(_)), "{err}");
    let mut input = &wire[..];
    rx.next(&mut input, &mut sink).unwrap();
    assert!(matches!(
        rx.next(&mut input, &mut sink).unwrap(),
        Event::RoundEnd { round: 0, .. }
    ));
    rx.applied(&mut back, 0).unwrap();
    tx.wait_applied(&mut &back[..], 0).unwrap();

    // A round the source has not sent, or anything but RoundApplied or Abort, fails it.
    let bogus = enc(Frame::RoundApplied { round: 7 });
    let mut tx2 = handshake(&config).0;
    tx2.end_round(&mut Vec::new()).unwrap();
    assert_eq!(
        tx2.wait_applied(&mut &bogus[..], 0)
            .unwrap_err()
            .to_string(),
        "malformed RoundApplied frame: round 7 applied, but the last round sent is 0"
    );
    let mut tx3 = handshake(&config).0;
    tx3.end_round(&mut Vec::new()).unwrap();
    let abort = enc(Frame::Abort {
        reason: "disk full".into(),
    });
    assert_eq!(
        tx3.wait_applied(&mut &abort[..], 0)
            .unwrap_err()
            .to_string(),
        "peer aborted the migration: disk full"
    );
    assert_eq!(tx3.phase(), SenderPhase::Failed);

    // Ready passes over RoundApplied frames nobody waited for.
    tx.page(&mut wire, 0x2000, &page_of(2)).unwrap();
    tx.end_round(&mut wire).unwrap();
    tx.state(&mut wire, &vm_state(&config)).unwrap();
    tx.done(&mut wire).unwrap();
    let later = [
        enc(Frame::RoundApplied { round: 1 }),
        enc(Frame::RoundApplied { round: 2 }),
        enc(Frame::Ready),
    ]
    .concat();
    tx.read_ready(&mut &later[..]).unwrap();
    assert_eq!(tx.phase(), SenderPhase::Ready);

    // From the source, RoundApplied is out of order.
    let (_, mut rx) = handshake(&config);
    let err = rx
        .next(&mut &bogus[..], &mut MemorySink::new(config.clone()))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "RoundApplied frame out of order: expected pages or blocks of round 0, or its RoundEnd"
    );
}

#[test]
fn a_version_1_destination_is_not_waited_for() {
    let mut tx = sender_acked_v1();
    tx.end_round(&mut Vec::new()).unwrap();
    // Nothing to read: it returns at once.
    tx.wait_applied(&mut &[][..], 0).unwrap();

    let hello_v1 = hello_v1();
    let mut rx = Receiver::new();
    let mut sink = MemorySink::new(config());
    rx.next(&mut &hello_v1[..], &mut sink).unwrap();
    rx.accept(&mut Vec::new()).unwrap();
    let end = Frame::RoundEnd {
        round: 0,
        pages: 0,
        blocks: 0,
    }
    .encode_as(1)
    .unwrap();
    rx.next(&mut &end[..], &mut sink).unwrap();
    let mut back = Vec::new();
    rx.applied(&mut back, 0).unwrap();
    assert!(back.is_empty());
}
