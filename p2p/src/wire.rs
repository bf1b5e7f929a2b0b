//! The live-migration wire protocol: its frames, their checked encoding, and the two state
//! machines that speak it, [`Sender`] on the source and [`Receiver`] on the destination.
//! Pure: no I/O beyond `std::io::Read`/`Write`; the QUIC stream and the VM are the
//! caller's. The source→destination frames travel on one ordered stream.
//!
//! # States
//!
//! ```text
//! Receiver (destination)
//!
//!   AwaitHello ──Hello──► AwaitAccept ──accept()──► Precopy(0)
//!                              │                      │  Pages / ZeroPages / Blocks / ZeroBlocks of
//!                              │ refuse()             │  the current round: checked, then applied
//!                              ▼                      │  RoundEnd(r), counts match: ──► Precopy(r+1)
//!                            Failed                   │
//!                                                     │  State, at a round boundary after round 0:
//!                                                     ▼  decoded and checked against the Hello
//!                                                 AwaitDone ──Done, hash matches──► Complete
//!                                                                                      │ the VM is built,
//!                                                                                      │ paused; ready()
//!                                                                                      ▼
//!                                                      Committed ◄──Commit── AwaitCommit
//!                                                      (start the VM; running() answers
//!                                                      Running, version 3 on, and the
//!                                                      stream ends)
//!   Before Committed, any error, an Abort from the source, or abort(): ──► Failed. The
//!   caller discards the memory and disks it built, and never starts the VM. (After
//!   Committed a later frame is refused but undoes nothing.)
//!   In Precopy(r+1), after RoundEnd(r), applied(r) answers RoundApplied(r) (version 2 on;
//!   nothing is sent to a version 1 source): round r is written here.
//!
//! Sender (source)
//!
//!   Start ──hello()──► AwaitAck ──read_ack(): HelloAck──► Precopy(0)
//!   Precopy(r) ──page() / zero_page() / block() / zero_block()──► Precopy(r)
//!   Precopy(r) ──end_round()──► Precopy(r+1)
//!   Precopy(r+1) ──wait_applied(r): RoundApplied(r' ≥ r)──► Precopy(r+1) (version 2 on;
//!   at once with version 1). The source waits so before it decides whether to stop:
//!   what the destination has received but not yet written would otherwise be part of
//!   the downtime. read_ready() passes over RoundApplied frames not waited for.
//!   Precopy(r), r ≥ 1, at a round boundary ──state()──► StateSent ──done()──► AwaitReady
//!   AwaitReady ──read_ready(): Ready──► Ready ──commit()──► Complete
//!   Complete ──running(what the destination sent before its stream ended)──► Complete:
//!   how long its guest had run then (version 3 on), which the source takes off the
//!   time it measured from its pause to that end, so that the downtime it reports ends
//!   at the guest's resume, not at the end of a stream the resumed guest competes with
//!   for the destination's CPU.
//!   Before commit(): any error, a Refuse or an Abort from the destination, or abort():
//!   ──► Failed, and the source resumes its VM as if nothing happened. commit() is the
//!   one point of no return: the source stops its VM for good before it sends Commit,
//!   and the destination starts the VM only when Commit arrives. The guest runs on
//!   exactly one side, except if the connection dies while Commit is in flight: the
//!   source cannot know whether it arrived, and keeps its VM paused (it must not run
//!   twice) for the operator to resume or discard.
//! ```
//!
//! Round 0 carries every non-zero page and disk block (the destination starts with zeroed
//! memory and empty disks, so the [`Sender`] drops zero entries in round 0); later rounds
//! carry what was dirtied since, zeroed entries as addresses only. The last round is the one
//! sent with the vCPUs paused; the VM state follows it.
//!
//! # Frames
//!
//! Each frame is a 16-byte header, then its payload. Little-endian throughout.
//!
//! | offset | size | field                                          |
//! |--------|------|------------------------------------------------|
//! | 0      | 4    | magic `HSPM`                                   |
//! | 4      | 2    | protocol version ([`PROTOCOL_VERSION`])        |
//! | 6      | 1    | frame type (below)                             |
//! | 7      | 1    | flags: [`FLAG_LZ4`] (below), others 0          |
//! | 8      | 4    | payload length                                 |
//! | 12     | 4    | CRC32 (IEEE) of header bytes 0..12 and payload |
//!
//! The header is checked in this order: magic, version, type, and the length against that
//! type's limit ([`MAX_PAYLOAD`], or [`MAX_STATE_PAYLOAD`] for State), all before a byte of
//! payload is read or allocated; then the CRC, the flags, and the payload's own fields.
//!
//! | type | frame      | from | payload                                                           |
//! |------|------------|------|-------------------------------------------------------------------|
//! | 1    | Hello      | src  | min version u16, max version u16, region count u16, regions (gpa u64, size u64)…, the `MachineConfig` as JSON (the rest) |
//! | 2    | HelloAck   | dst  | chosen version u16                                                |
//! | 3    | Refuse     | dst  | reason, UTF-8, at most [`MAX_REASON`] bytes                       |
//! | 4    | Pages      | src  | round u32, count u32, count × (gpa u64, [`PAGE_SIZE`] bytes)      |
//! | 5    | ZeroPages  | src  | round u32, count u32, count × gpa u64                             |
//! | 6    | Blocks     | src  | round u32, disk u16, count u32, count × (index u64, length u32, data) |
//! | 7    | ZeroBlocks | src  | round u32, disk u16, count u32, count × index u64                 |
//! | 8    | RoundEnd   | src  | round u32, page entries u64, block entries u64 (of that round)    |
//! | 9    | State      | src  | the final `VmState` as `snapshot::encode_as` writes it ([`state_format`]) |
//! | 10   | Done       | src  | the hash below, 16 bytes                                          |
//! | 11   | Ready      | dst  | empty: the VM is built, its vCPUs wait for Commit                 |
//! | 12   | Abort      | both | reason, UTF-8, at most [`MAX_REASON`] bytes                       |
//! | 13   | Commit     | src  | empty: the source has stopped; start the VM                       |
//! | 14   | RoundApplied | dst | round u32: its pages and blocks are written (version 2 on)       |
//! | 15   | Running    | dst  | µs u64 from the guest's resume to this frame (version 3 on), the last before the stream ends |
//!
//! The Hello's layout is frozen: a later version still sends it as version 1
//! ([`HELLO_VERSION`]), so that any peer can read the range offered; every later frame, in
//! both directions, carries the version chosen (the highest both speak), and a frame of
//! another version is refused.
//!
//! # Compression (version 2)
//!
//! A Pages or Blocks frame may carry [`FLAG_LZ4`]: its payload on the wire is the
//! uncompressed payload's length (u32, at most the type's limit), then the payload as one
//! LZ4 block (the `lz4_flex` crate's block format). The CRC and the Done hash cover the
//! bytes on the wire; the payload's fields are checked after decompression exactly as for
//! an uncompressed frame, and a block that does not decompress to exactly the announced
//! length is a malformed frame. The source compresses when that saves at least a sixteenth
//! of the frame and sends it as it is otherwise. Guest memory is compressible (about 1.9×
//! for an idle Debian guest: page cache, kernel data), and in the nested rig the AEAD, not
//! the link, bounds the stream, so each byte not sent is a byte not encrypted, decrypted
//! and copied four times. A version 1 peer is sent nothing compressed.
//!
//! # Running (version 3)
//!
//! After Commit the destination resumes the guest, sends Running with the time since
//! then, and ends its stream. The source measures from its pause to seeing that end and
//! takes the Running time off, which gives an upper bound of the pause to the guest's
//! resume: that end cannot reach the source before it was sent. A value larger than the
//! time since the source sent Commit is impossible (the guest resumes only after Commit
//! arrives) and is not taken off. Measured in the test rig (one CPU, 6 runs), the
//! stream's end left 12 to 26 ms after the guest resumed, and Running took 4 to 15 ms of
//! that off.
//!
//! # State (version 3)
//!
//! From version 3 on, State carries the snapshot's binary format ([`snapshot::FORMAT_VERSION`]),
//! before it JSON ([`snapshot::JSON_FORMAT_VERSION`]), which is all an older peer reads; the
//! destination reads either, by the format version in the state's own header. The State
//! is written and read inside the guest's pause, and the binary form is about half the
//! size of the JSON and an order of magnitude faster to encode and decode (see
//! `snapshot::format`).
//!
//! Disks travel in blocks of [`BLOCK_SIZE`] (4 KiB, like pages and like the guest's file
//! system blocks, so a 4 KiB random write dirties 4 KiB of transfer, not 64); a disk's last
//! block is short when its size is not a multiple. A disk's size and its index are those of
//! the Hello's `MachineConfig::drives`. Every count is checked against the payload length,
//! every gpa against the agreed memory regions, every disk and block index against the
//! agreed drives, and every round against the current one, before the [`Sink`] sees it.
//!
//! # Hash
//!
//! `Done` carries XXH3-128 (the `xxhash-rust` crate, no dependencies) over every byte of
//! every source→destination frame before it, headers included, Hello through State. TLS
//! already authenticates the stream and protects it from tampering; the hash is there to
//! catch our own bugs (a frame lost or applied twice between the streams and the sinks), so
//! it needs no cryptographic strength, only to be wide enough that an accidental match is
//! out of the question, and fast enough (tens of GB/s) to cost nothing in the downtime.

mod config;
mod frame;
pub mod fuzz;
mod receiver;
mod sender;
#[cfg(test)]
mod tests;

use std::fmt;
use std::io;

pub use config::MigrationConfig;
pub use frame::{read_frame, write_frame, Frame, FrameType, Header, Hello};
pub use receiver::{Event, Receiver, ReceiverPhase, Sink};
pub use sender::{RoundStats, Sender, SenderPhase};

/// The frame header's first bytes ("hospes migration").
pub const MAGIC: [u8; 4] = *b"HSPM";
/// The highest protocol version this build speaks. Version 2 adds [`FLAG_LZ4`], version 3
/// the binary State ([`state_format`]) and Running.
pub const PROTOCOL_VERSION: u16 = 3;
/// The lowest protocol version this build speaks.
pub const MIN_PROTOCOL_VERSION: u16 = 1;
/// The version in a Hello's header, whatever the versions it offers: its layout is frozen,
/// so that a peer of any version reads the range offered.
pub const HELLO_VERSION: u16 = 1;
/// Frame flag (version 2 on, Pages and Blocks only): the payload on the wire is the
/// uncompressed payload's length (u32), then that payload as one LZ4 block.
pub const FLAG_LZ4: u8 = 0x01;
/// Size of the frame header.
pub const HEADER_LEN: usize = 16;

/// The snapshot format version of the State sent in protocol `version`: the binary one
/// from version 3 on, JSON before.
pub fn state_format(version: u16) -> u32 {
    if version >= 3 {
        snapshot::FORMAT_VERSION
    } else {
        snapshot::JSON_FORMAT_VERSION
    }
}
/// The largest payload of any frame but State: room for 1022 pages.
pub const MAX_PAYLOAD: usize = 4 << 20;
/// The largest State payload: the largest VM state `snapshot::decode` accepts.
pub const MAX_STATE_PAYLOAD: usize =
    snapshot::format::HEADER_LEN + snapshot::format::MAX_PAYLOAD as usize;
/// Guest page size: the unit of memory transfer.
pub const PAGE_SIZE: usize = 4096;
/// Disk block size: the unit of disk transfer (a disk's last block may be shorter).
pub const BLOCK_SIZE: usize = 4096;
/// The longest Refuse or Abort reason.
pub const MAX_REASON: usize = 1024;
/// The largest disk: far above any image hospes runs, and far below where a block's byte
/// offset could overflow or a file length turn negative.
pub const MAX_DISK_BYTES: u64 = 1 << 44;

/// The Done frame's hash: XXH3-128 of every frame before it.
pub type Hash = u128;

/// Everything that can go wrong speaking the protocol. Any of them fails the migration.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The stream ended inside a frame header (or, `got == 0`, between frames).
    #[error("stream ended after {got} of {HEADER_LEN} frame header bytes")]
    TruncatedHeader {
        /// Header bytes read.
        got: usize,
    },
    /// The stream ended inside a payload.
    #[error("stream ended after {got} of {expected} payload bytes of a {kind} frame")]
    TruncatedPayload {
        /// The frame's type.
        kind: FrameType,
        /// Payload length in the header.
        expected: u32,
        /// Payload bytes read.
        got: u64,
    },
    /// Not a migration stream.
    #[error("not a hospes migration stream: magic is \"{}\", expected \"HSPM\"", .0.escape_ascii())]
    BadMagic([u8; 4]),
    /// A frame of a protocol version this build does not speak.
    #[error("protocol version {0} not supported (this build speaks {MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION})")]
    UnsupportedVersion(u16),
    /// A frame of another version than the one agreed after the Hello.
    #[error("{kind} frame of protocol version {found}, the version agreed is {agreed}")]
    WrongVersion {
        /// The frame's type.
        kind: FrameType,
        /// The version in its header.
        found: u16,
        /// The version agreed.
        agreed: u16,
    },
    /// A frame type this build does not know.
    #[error("unknown frame type {0}")]
    UnknownFrameType(u8),
    /// Flags this build does not know.
    #[error("unknown flags {flags:#04x} on a {kind} frame")]
    UnknownFlags {
        /// The frame's type.
        kind: FrameType,
        /// The flags.
        flags: u8,
    },
    /// A payload over its type's limit: refused before it is read.
    #[error("{kind} frame of {} exceeds the {} limit", Bytes(*len), Bytes(*limit))]
    FrameTooLarge {
        /// The frame's type.
        kind: FrameType,
        /// Payload length.
        len: u64,
        /// The limit for this type.
        limit: u64,
    },
    /// The frame is damaged.
    #[error("{kind} frame CRC {computed:#010x} != {stored:#010x} in its header")]
    Crc {
        /// The frame's type.
        kind: FrameType,
        /// CRC in the header.
        stored: u32,
        /// CRC of what was read.
        computed: u32,
    },
    /// The payload's fields do not add up.
    #[error("malformed {kind} frame: {reason}")]
    Malformed {
        /// The frame's type.
        kind: FrameType,
        /// What is wrong, with the values.
        reason: String,
    },
    /// A frame the current state does not allow.
    #[error("{frame} frame out of order: expected {expected}")]
    OutOfOrder {
        /// The frame's type.
        frame: FrameType,
        /// What the state allows.
        expected: String,
    },
    /// The peers share no protocol version.
    #[error("peer speaks protocol versions {min}..={max}, this build speaks {MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION}")]
    NoCommonVersion {
        /// Lowest version offered.
        min: u16,
        /// Highest version offered.
        max: u16,
    },
    /// The VM configuration in a Hello (or given to the Sender) is not one we accept.
    #[error("invalid VM configuration: {0}")]
    Config(String),
    /// A gpa that is not page-aligned.
    #[error("page {0:#x} is not {PAGE_SIZE}-byte aligned")]
    UnalignedPage(u64),
    /// A page not inside guest memory.
    #[error("page {gpa:#x} is outside guest memory {regions}")]
    PageOutside {
        /// The page's gpa.
        gpa: u64,
        /// The agreed regions, as `[start, end)` ranges.
        regions: String,
    },
    /// Page data of the wrong length handed to the Sender.
    #[error("page data of {0} bytes, a page is {PAGE_SIZE}")]
    PageLength(usize),
    /// A disk index past the agreed drives.
    #[error("disk {disk} does not exist: the VM has {disks} disks")]
    NoSuchDisk {
        /// The index.
        disk: u16,
        /// Disks agreed.
        disks: usize,
    },
    /// A block index past the disk's end.
    #[error(
        "block {index} is past the end of disk {disk} ({blocks} blocks of {BLOCK_SIZE} bytes)"
    )]
    BlockOutside {
        /// The disk.
        disk: u16,
        /// The block index.
        index: u64,
        /// Blocks in that disk.
        blocks: u64,
    },
    /// Block data of the wrong length.
    #[error("block {index} of disk {disk} carries {len} bytes, it has {expected}")]
    BlockLength {
        /// The disk.
        disk: u16,
        /// The block index.
        index: u64,
        /// Bytes carried.
        len: usize,
        /// The block's length.
        expected: usize,
    },
    /// A frame of another round than the current one.
    #[error("{frame} frame of round {found} during round {current}")]
    WrongRound {
        /// The frame's type.
        frame: FrameType,
        /// Round in the frame.
        found: u32,
        /// The current round.
        current: u32,
    },
    /// A RoundEnd whose counts differ from what the round carried.
    #[error("round {round} ended announcing {announced} {what}, {received} were received")]
    RoundCount {
        /// The round.
        round: u32,
        /// "page entries" or "block entries".
        what: &'static str,
        /// Count in the RoundEnd.
        announced: u64,
        /// Count received.
        received: u64,
    },
    /// More rounds than a u32 counts.
    #[error("round counter overflows after round {0}")]
    TooManyRounds(u32),
    /// The State payload is not a valid VM state (the snapshot format's checks).
    #[error("VM state: {0}")]
    State(#[from] snapshot::FormatError),
    /// The VM state is not of the VM agreed in the Hello.
    #[error("VM state does not match the agreed configuration: {0}")]
    StateMismatch(&'static str),
    /// What arrived is not what was sent.
    #[error("hash mismatch: source sent {sent:#034x}, received frames hash to {computed:#034x}")]
    HashMismatch {
        /// Hash in the Done frame.
        sent: Hash,
        /// Hash of what was received.
        computed: Hash,
    },
    /// The sink could not write.
    #[error("cannot write {what}: {source}")]
    Sink {
        /// The page or block.
        what: String,
        /// The I/O error.
        source: io::Error,
    },
    /// The destination said no.
    #[error("destination refused the migration: {0}")]
    Refused(String),
    /// The peer gave up.
    #[error("peer aborted the migration: {0}")]
    Aborted(String),
    /// Reading or writing the stream failed.
    #[error("migration stream: {0}")]
    Io(#[from] io::Error),
    /// A call after the migration failed.
    #[error("the migration already failed")]
    Failed,
    /// A call the current state does not allow (a bug in the caller).
    #[error("wire protocol misused: {0}")]
    Misuse(&'static str),
}

/// A byte count as a reader wants it: "9 MiB", "4100 bytes".
struct Bytes(u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 >= 1 << 20 && self.0.is_multiple_of(1 << 20) {
            write!(f, "{} MiB", self.0 >> 20)
        } else {
            write!(f, "{} bytes", self.0)
        }
    }
}

/// A running hash of frames, the same on both sides.
#[derive(Clone, Default)]
struct FrameHash(xxhash_rust::xxh3::Xxh3Default);

impl FrameHash {
    fn add(&mut self, header: &[u8; HEADER_LEN], payload: &[u8]) {
        self.0.update(header);
        self.0.update(payload);
    }

    fn value(&self) -> Hash {
        self.0.digest128()
    }
}

/// `reason` cut to [`MAX_REASON`] bytes at a character boundary.
fn bounded_reason(reason: &str) -> &str {
    let mut end = reason.len().min(MAX_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}
