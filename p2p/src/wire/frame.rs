//! Frames: the header, each frame type's payload layout (see the table in [`super`]), and
//! their checked encoding. Structure only: what a frame's values mean for the VM is checked
//! by the [`super::Receiver`].

use std::fmt;
use std::io::{self, Read, Write};

use snapshot::MachineConfig;

use super::{
    Hash, MigrationConfig, WireError, FLAG_LZ4, HEADER_LEN, HELLO_VERSION, MAGIC, MAX_PAYLOAD,
    MAX_REASON, MAX_STATE_PAYLOAD, MIN_PROTOCOL_VERSION, PAGE_SIZE, PROTOCOL_VERSION,
};

/// The frame types, with their codes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameType {
    /// src: versions offered and the VM configuration.
    Hello = 1,
    /// dst: the version chosen.
    HelloAck = 2,
    /// dst: no, and why.
    Refuse = 3,
    /// src: pages with their data.
    Pages = 4,
    /// src: pages that are now zero.
    ZeroPages = 5,
    /// src: disk blocks with their data.
    Blocks = 6,
    /// src: disk blocks that are now zero.
    ZeroBlocks = 7,
    /// src: the end of a round, with its counts.
    RoundEnd = 8,
    /// src: vCPU and device state.
    State = 9,
    /// src: the hash of everything sent.
    Done = 10,
    /// dst: the VM is built here, its vCPUs not started; waiting for Commit.
    Ready = 11,
    /// either: giving up, and why.
    Abort = 12,
    /// src: the source has stopped its VM for good: run it.
    Commit = 13,
    /// dst (version 2 on): every page and block of a round is written.
    RoundApplied = 14,
    /// dst (version 3 on): the guest runs here, and since how long.
    Running = 15,
}

impl FrameType {
    /// The type with this code.
    pub fn from_code(code: u8) -> Option<Self> {
        use FrameType::*;
        Some(match code {
            1 => Hello,
            2 => HelloAck,
            3 => Refuse,
            4 => Pages,
            5 => ZeroPages,
            6 => Blocks,
            7 => ZeroBlocks,
            8 => RoundEnd,
            9 => State,
            10 => Done,
            11 => Ready,
            12 => Abort,
            13 => Commit,
            14 => RoundApplied,
            15 => Running,
            _ => return None,
        })
    }

    /// The largest payload a frame of this type may have.
    pub fn max_payload(self) -> usize {
        match self {
            FrameType::State => MAX_STATE_PAYLOAD,
            _ => MAX_PAYLOAD,
        }
    }
}

impl fmt::Display for FrameType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A frame header whose magic, version, type and length have been checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Protocol version.
    pub version: u16,
    /// Frame type.
    pub kind: FrameType,
    /// Flags (checked after the CRC).
    pub flags: u8,
    /// Payload length, within `kind`'s limit.
    pub len: u32,
    /// CRC32 of header bytes 0..12 and the payload.
    pub crc: u32,
}

impl Header {
    /// Checks what can be checked before the payload is read, in the order the module
    /// documentation gives.
    pub fn parse(raw: &[u8; HEADER_LEN]) -> Result<Self, WireError> {
        let [m0, m1, m2, m3, v0, v1, code, flags, l0, l1, l2, l3, c0, c1, c2, c3] = *raw;
        let magic = [m0, m1, m2, m3];
        if magic != MAGIC {
            return Err(WireError::BadMagic(magic));
        }
        let version = u16::from_le_bytes([v0, v1]);
        if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version) {
            return Err(WireError::UnsupportedVersion(version));
        }
        let kind = FrameType::from_code(code).ok_or(WireError::UnknownFrameType(code))?;
        let len = u32::from_le_bytes([l0, l1, l2, l3]);
        if len as usize > kind.max_payload() {
            return Err(WireError::FrameTooLarge {
                kind,
                len: len.into(),
                limit: kind.max_payload() as u64,
            });
        }
        Ok(Self {
            version,
            kind,
            flags,
            len,
            crc: u32::from_le_bytes([c0, c1, c2, c3]),
        })
    }

    /// The 16 bytes on the wire.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        raw_header(
            self.version,
            self.kind as u8,
            self.flags,
            self.len,
            self.crc,
        )
    }

    /// Checks the payload read for this header: CRC, then flags.
    fn check(&self, payload: &[u8]) -> Result<(), WireError> {
        let computed = crc(&self.to_bytes(), payload);
        if computed != self.crc {
            return Err(WireError::Crc {
                kind: self.kind,
                stored: self.crc,
                computed,
            });
        }
        if self.flags & !self.allowed_flags() != 0 {
            return Err(WireError::UnknownFlags {
                kind: self.kind,
                flags: self.flags,
            });
        }
        Ok(())
    }

    /// The flags a frame of this type and version may carry: [`FLAG_LZ4`] on Pages and
    /// Blocks from version 2 on, nothing else.
    fn allowed_flags(&self) -> u8 {
        match self.kind {
            FrameType::Pages | FrameType::Blocks if self.version >= 2 => FLAG_LZ4,
            _ => 0,
        }
    }

    /// Whether the payload on the wire is LZ4-compressed (see [`inflate`]).
    pub fn compressed(&self) -> bool {
        self.flags & FLAG_LZ4 != 0
    }
}

/// The payload of a frame whose header has [`FLAG_LZ4`], decompressed into `out`: an
/// uncompressed length u32, then one LZ4 block that must decompress to exactly that many
/// bytes. The length is checked against the frame type's limit before anything is
/// allocated, and the decoder writes only into `out` (lz4_flex's safe, checked decoder:
/// malformed input is an error, never a read or write out of bounds).
pub(crate) fn inflate(header: &Header, wire: &[u8], out: &mut Vec<u8>) -> Result<(), WireError> {
    let malformed = |reason: String| WireError::Malformed {
        kind: header.kind,
        reason,
    };
    let Some((len, block)) = wire.split_first_chunk::<4>() else {
        return Err(malformed(format!(
            "compressed payload of {} bytes has no length",
            wire.len()
        )));
    };
    let len = u32::from_le_bytes(*len) as usize;
    if len > header.kind.max_payload() {
        return Err(malformed(format!(
            "compressed payload inflates to {len} bytes, over the {} limit",
            header.kind.max_payload()
        )));
    }
    // Only growth is zero-filled: frames are mostly of one size, so refilling all of
    // it for each would cost as much again as the copy the decoder makes.
    if out.len() < len {
        out.resize(len, 0);
    } else {
        out.truncate(len);
    }
    let got = lz4_flex::block::decompress_into(block, out)
        .map_err(|e| malformed(format!("LZ4 block: {e}")))?;
    if got != len {
        return Err(malformed(format!(
            "compressed payload inflates to {got} bytes, its length says {len}"
        )));
    }
    Ok(())
}

/// Payloads at least this large are first tried on their first [`PROBE`] bytes.
const PROBE: usize = 64 << 10;

/// `payload` compressed as [`inflate`] reads it, into `out[..n]`: returns `n`, or `None`
/// (and `out` unspecified) when that would not save at least a sixteenth, so that
/// incompressible data (random disk blocks, encrypted files, a guest's random working set)
/// travels as it is. A payload of more than two [`PROBE`]s whose first probe does not
/// save that is sent as it is without trying the rest: compressing what does not
/// compress costs about as much as compressing what does, for nothing. `out` keeps its
/// size from one call to the next: it is never filled, only written.
pub(crate) fn deflate(payload: &[u8], out: &mut Vec<u8>) -> Option<usize> {
    let len = u32::try_from(payload.len()).ok()?;
    let worth = |raw: usize, packed: usize| packed <= raw - raw / 16;
    let room = 4 + lz4_flex::block::get_maximum_output_size(payload.len());
    if out.len() < room {
        out.resize(room, 0);
    }
    if payload.len() >= 2 * PROBE {
        let probe = lz4_flex::block::compress_into(&payload[..PROBE], &mut out[4..]).ok()?;
        if !worth(PROBE, probe) {
            return None;
        }
    }
    out[..4].copy_from_slice(&len.to_le_bytes());
    let n = lz4_flex::block::compress_into(payload, &mut out[4..room]).ok()?;
    worth(payload.len(), 4 + n).then_some(4 + n)
}

fn raw_header(version: u16, code: u8, flags: u8, len: u32, crc: u32) -> [u8; HEADER_LEN] {
    let mut raw = [0u8; HEADER_LEN];
    raw[0..4].copy_from_slice(&MAGIC);
    raw[4..6].copy_from_slice(&version.to_le_bytes());
    raw[6] = code;
    raw[7] = flags;
    raw[8..12].copy_from_slice(&len.to_le_bytes());
    raw[12..16].copy_from_slice(&crc.to_le_bytes());
    raw
}

/// CRC32 of the header's first 12 bytes and the payload.
fn crc(header: &[u8; HEADER_LEN], payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&header[..12]);
    hasher.update(payload);
    hasher.finalize()
}

/// The header of a frame of `kind` in protocol `version` with `flags`, carrying `payload`
/// (at most `kind.max_payload()`).
pub(crate) fn header_for(
    version: u16,
    kind: FrameType,
    flags: u8,
    payload: &[u8],
) -> [u8; HEADER_LEN] {
    raw_header_for(version, kind as u8, flags, payload)
}

/// A header with any field values and the right CRC (for tests and the fuzz target).
pub(crate) fn raw_header_for(
    version: u16,
    code: u8,
    flags: u8,
    payload: &[u8],
) -> [u8; HEADER_LEN] {
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    let mut raw = raw_header(version, code, flags, len, 0);
    let crc = crc(&raw, payload);
    raw[12..16].copy_from_slice(&crc.to_le_bytes());
    raw
}

/// Reads one frame into `payload` (replacing its contents) and returns its header. The
/// header is checked before any payload byte is read, the CRC and flags before returning.
pub fn read_frame(input: &mut impl Read, payload: &mut Vec<u8>) -> Result<Header, WireError> {
    let mut raw = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match input.read(&mut raw[got..]) {
            Ok(0) => return Err(WireError::TruncatedHeader { got }),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let header = Header::parse(&raw)?;
    let len = header.len as usize;
    let got = if len <= MAX_PAYLOAD {
        // Up front only what any data frame may need, and zero-filled only where the
        // buffer grows: data frames are mostly of one size.
        if payload.len() < len {
            payload.resize(len, 0);
        } else {
            payload.truncate(len);
        }
        let mut got = 0;
        while got < len {
            match input.read(&mut payload[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        got
    } else {
        // A State grows as it arrives.
        payload.clear();
        payload.reserve(MAX_PAYLOAD);
        Read::take(&mut *input, header.len.into()).read_to_end(payload)?
    };
    if got < len {
        return Err(WireError::TruncatedPayload {
            kind: header.kind,
            expected: header.len,
            got: got as u64,
        });
    }
    header.check(payload)?;
    Ok(header)
}

/// Encodes `frame` for protocol `version`, writes it whole and flushes `out`: the peer
/// answers or acts on every frame sent this way, so none may wait in a buffer.
pub fn write_frame(out: &mut impl Write, version: u16, frame: &Frame<'_>) -> Result<(), WireError> {
    out.write_all(&frame.encode_as(version)?)?;
    out.flush()?;
    Ok(())
}

/// The Hello's contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Lowest protocol version the source speaks.
    pub min_version: u16,
    /// Highest protocol version the source speaks.
    pub max_version: u16,
    /// The VM.
    pub config: MigrationConfig,
}

/// A decoded frame; page and block data borrow from the payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame<'a> {
    /// See [`Hello`].
    Hello(Hello),
    /// The destination takes the VM, speaking `version`.
    HelloAck {
        /// The version chosen.
        version: u16,
    },
    /// The destination will not take the VM.
    Refuse {
        /// Why.
        reason: String,
    },
    /// Pages of guest memory.
    Pages {
        /// The round.
        round: u32,
        /// (gpa, [`PAGE_SIZE`] bytes) per page.
        pages: Vec<(u64, &'a [u8])>,
    },
    /// Pages of guest memory that are now zero.
    ZeroPages {
        /// The round.
        round: u32,
        /// Their gpas.
        gpas: Vec<u64>,
    },
    /// Blocks of a disk.
    Blocks {
        /// The round.
        round: u32,
        /// Index in the configuration's drives.
        disk: u16,
        /// (block index, data) per block.
        blocks: Vec<(u64, &'a [u8])>,
    },
    /// Blocks of a disk that are now zero.
    ZeroBlocks {
        /// The round.
        round: u32,
        /// Index in the configuration's drives.
        disk: u16,
        /// Their block indices.
        indices: Vec<u64>,
    },
    /// The end of a round.
    RoundEnd {
        /// The round.
        round: u32,
        /// Page entries (with data or zero) the round carried.
        pages: u64,
        /// Block entries (with data or zero) the round carried.
        blocks: u64,
    },
    /// The VM state, in the snapshot format.
    State {
        /// What `snapshot::encode` wrote.
        bytes: &'a [u8],
    },
    /// The end of the source's frames.
    Done {
        /// The hash of every frame before.
        hash: Hash,
    },
    /// The destination has written every page and block of a round.
    RoundApplied {
        /// The round.
        round: u32,
    },
    /// The destination has built the VM and waits for Commit.
    Ready,
    /// The source has stopped its VM for good.
    Commit,
    /// The guest runs on the destination.
    Running {
        /// Microseconds from the guest's resume to the writing of this frame.
        since_resume_us: u64,
    },
    /// Giving up.
    Abort {
        /// Why.
        reason: String,
    },
}

impl<'a> Frame<'a> {
    /// Its type.
    pub fn kind(&self) -> FrameType {
        match self {
            Frame::Hello(_) => FrameType::Hello,
            Frame::HelloAck { .. } => FrameType::HelloAck,
            Frame::Refuse { .. } => FrameType::Refuse,
            Frame::Pages { .. } => FrameType::Pages,
            Frame::ZeroPages { .. } => FrameType::ZeroPages,
            Frame::Blocks { .. } => FrameType::Blocks,
            Frame::ZeroBlocks { .. } => FrameType::ZeroBlocks,
            Frame::RoundEnd { .. } => FrameType::RoundEnd,
            Frame::State { .. } => FrameType::State,
            Frame::Done { .. } => FrameType::Done,
            Frame::Ready => FrameType::Ready,
            Frame::Commit => FrameType::Commit,
            Frame::RoundApplied { .. } => FrameType::RoundApplied,
            Frame::Running { .. } => FrameType::Running,
            Frame::Abort { .. } => FrameType::Abort,
        }
    }

    /// Header and payload in this build's [`PROTOCOL_VERSION`]; see [`Frame::encode_as`].
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        self.encode_as(PROTOCOL_VERSION)
    }

    /// Header and payload for protocol `version` (a Hello always goes out as
    /// [`HELLO_VERSION`]), uncompressed. Refuses what [`Frame::decode`] would refuse.
    pub fn encode_as(&self, version: u16) -> Result<Vec<u8>, WireError> {
        let kind = self.kind();
        let malformed = |reason: String| WireError::Malformed { kind, reason };
        let mut p = Vec::new();
        match self {
            Frame::Hello(hello) => {
                put16(&mut p, hello.min_version);
                put16(&mut p, hello.max_version);
                let regions = &hello.config.regions;
                let n = u16::try_from(regions.len())
                    .map_err(|_| malformed(format!("{} memory regions", regions.len())))?;
                put16(&mut p, n);
                for &(gpa, size) in regions {
                    put64(&mut p, gpa);
                    put64(&mut p, size);
                }
                serde_json::to_writer(&mut p, &hello.config.machine)
                    .map_err(|e| malformed(format!("machine configuration: {e}")))?;
            }
            Frame::HelloAck { version } => put16(&mut p, *version),
            Frame::Refuse { reason } | Frame::Abort { reason } => {
                if reason.len() > MAX_REASON {
                    return Err(malformed(format!(
                        "reason of {} bytes, at most {MAX_REASON}",
                        reason.len()
                    )));
                }
                p.extend_from_slice(reason.as_bytes());
            }
            Frame::Pages { round, pages } => {
                put32(&mut p, *round);
                put_count(&mut p, pages.len(), "pages", kind)?;
                for &(gpa, data) in pages {
                    if data.len() != PAGE_SIZE {
                        return Err(WireError::PageLength(data.len()));
                    }
                    put64(&mut p, gpa);
                    p.extend_from_slice(data);
                }
            }
            Frame::ZeroPages { round, gpas } => {
                put32(&mut p, *round);
                put_count(&mut p, gpas.len(), "pages", kind)?;
                gpas.iter().for_each(|&gpa| put64(&mut p, gpa));
            }
            Frame::Blocks {
                round,
                disk,
                blocks,
            } => {
                put32(&mut p, *round);
                put16(&mut p, *disk);
                put_count(&mut p, blocks.len(), "blocks", kind)?;
                for &(index, data) in blocks {
                    put64(&mut p, index);
                    let len = u32::try_from(data.len())
                        .map_err(|_| malformed(format!("block of {} bytes", data.len())))?;
                    put32(&mut p, len);
                    p.extend_from_slice(data);
                }
            }
            Frame::ZeroBlocks {
                round,
                disk,
                indices,
            } => {
                put32(&mut p, *round);
                put16(&mut p, *disk);
                put_count(&mut p, indices.len(), "blocks", kind)?;
                indices.iter().for_each(|&index| put64(&mut p, index));
            }
            Frame::RoundEnd {
                round,
                pages,
                blocks,
            } => {
                put32(&mut p, *round);
                put64(&mut p, *pages);
                put64(&mut p, *blocks);
            }
            Frame::State { bytes } => p.extend_from_slice(bytes),
            Frame::Done { hash } => p.extend_from_slice(&hash.to_le_bytes()),
            Frame::RoundApplied { round } => put32(&mut p, *round),
            Frame::Running { since_resume_us } => put64(&mut p, *since_resume_us),
            Frame::Ready | Frame::Commit => {}
        }
        if p.len() > kind.max_payload() {
            return Err(WireError::FrameTooLarge {
                kind,
                len: p.len() as u64,
                limit: kind.max_payload() as u64,
            });
        }
        let mut bytes = Vec::with_capacity(HEADER_LEN + p.len());
        let version = if kind == FrameType::Hello {
            HELLO_VERSION
        } else {
            version
        };
        bytes.extend_from_slice(&header_for(version, kind, 0, &p));
        bytes.extend_from_slice(&p);
        Ok(bytes)
    }

    /// Decodes a payload read for a header of type `kind`. Every count is checked against
    /// the bytes left before anything is allocated for it; nothing may be left over.
    pub fn decode(kind: FrameType, payload: &'a [u8]) -> Result<Self, WireError> {
        let mut p = Parser {
            kind,
            rest: payload,
        };
        let frame = match kind {
            FrameType::Hello => {
                let min_version = p.u16("min version")?;
                let max_version = p.u16("max version")?;
                let n = p.u16("region count")?;
                let n = p.check_count(n.into(), "memory regions", 16)?;
                let mut regions = Vec::with_capacity(n);
                for _ in 0..n {
                    regions.push((p.u64("region gpa")?, p.u64("region size")?));
                }
                let machine: MachineConfig = serde_json::from_slice(p.rest())
                    .map_err(|e| p.malformed(format!("machine configuration: {e}")))?;
                Frame::Hello(Hello {
                    min_version,
                    max_version,
                    config: MigrationConfig { machine, regions },
                })
            }
            FrameType::HelloAck => Frame::HelloAck {
                version: p.u16("version")?,
            },
            FrameType::Refuse => Frame::Refuse {
                reason: p.reason()?,
            },
            FrameType::Abort => Frame::Abort {
                reason: p.reason()?,
            },
            FrameType::Pages => {
                let round = p.u32("round")?;
                let n = p.count("pages", 8 + PAGE_SIZE)?;
                let mut pages = Vec::with_capacity(n);
                for _ in 0..n {
                    pages.push((p.u64("gpa")?, p.bytes(PAGE_SIZE, "page data")?));
                }
                Frame::Pages { round, pages }
            }
            FrameType::ZeroPages => {
                let round = p.u32("round")?;
                let n = p.count("pages", 8)?;
                let gpas = (0..n).map(|_| p.u64("gpa")).collect::<Result<_, _>>()?;
                Frame::ZeroPages { round, gpas }
            }
            FrameType::Blocks => {
                let round = p.u32("round")?;
                let disk = p.u16("disk")?;
                let n = p.count("blocks", 12)?;
                let mut blocks = Vec::with_capacity(n);
                for _ in 0..n {
                    let index = p.u64("block index")?;
                    let len = p.u32("block length")?;
                    blocks.push((index, p.bytes(len as usize, "block data")?));
                }
                Frame::Blocks {
                    round,
                    disk,
                    blocks,
                }
            }
            FrameType::ZeroBlocks => {
                let round = p.u32("round")?;
                let disk = p.u16("disk")?;
                let n = p.count("blocks", 8)?;
                let indices = (0..n)
                    .map(|_| p.u64("block index"))
                    .collect::<Result<_, _>>()?;
                Frame::ZeroBlocks {
                    round,
                    disk,
                    indices,
                }
            }
            FrameType::RoundEnd => Frame::RoundEnd {
                round: p.u32("round")?,
                pages: p.u64("page count")?,
                blocks: p.u64("block count")?,
            },
            FrameType::State => Frame::State { bytes: p.rest() },
            FrameType::Done => Frame::Done {
                hash: u128::from_le_bytes(p.array("hash")?),
            },
            FrameType::Ready => Frame::Ready,
            FrameType::Commit => Frame::Commit,
            FrameType::RoundApplied => Frame::RoundApplied {
                round: p.u32("round")?,
            },
            FrameType::Running => Frame::Running {
                since_resume_us: p.u64("time since the resume")?,
            },
        };
        p.finish()?;
        Ok(frame)
    }
}

fn put16(p: &mut Vec<u8>, v: u16) {
    p.extend_from_slice(&v.to_le_bytes());
}

fn put32(p: &mut Vec<u8>, v: u32) {
    p.extend_from_slice(&v.to_le_bytes());
}

fn put64(p: &mut Vec<u8>, v: u64) {
    p.extend_from_slice(&v.to_le_bytes());
}

fn put_count(
    p: &mut Vec<u8>,
    n: usize,
    what: &'static str,
    kind: FrameType,
) -> Result<(), WireError> {
    let malformed = |reason| WireError::Malformed { kind, reason };
    match u32::try_from(n) {
        Ok(0) => Err(malformed(format!("no {what}"))),
        Ok(n) => {
            put32(p, n);
            Ok(())
        }
        Err(_) => Err(malformed(format!("{n} {what}"))),
    }
}

/// Reads a payload's fields front to back; every read is bounds-checked.
struct Parser<'a> {
    kind: FrameType,
    rest: &'a [u8],
}

impl<'a> Parser<'a> {
    fn malformed(&self, reason: String) -> WireError {
        WireError::Malformed {
            kind: self.kind,
            reason,
        }
    }

    fn bytes(&mut self, n: usize, what: &str) -> Result<&'a [u8], WireError> {
        if n > self.rest.len() {
            return Err(self.malformed(format!("{what} needs {n} bytes, {} left", self.rest.len())));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], WireError> {
        let mut array = [0; N];
        array.copy_from_slice(self.bytes(N, what)?);
        Ok(array)
    }

    fn u16(&mut self, what: &str) -> Result<u16, WireError> {
        self.array(what).map(u16::from_le_bytes)
    }

    fn u32(&mut self, what: &str) -> Result<u32, WireError> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64, WireError> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// A u32 count of entries of at least `entry` bytes each, at least one.
    fn count(&mut self, what: &'static str, entry: usize) -> Result<usize, WireError> {
        let n = self.u32("count")?;
        if n == 0 {
            return Err(self.malformed(format!("no {what}")));
        }
        self.check_count(n.into(), what, entry)
    }

    /// Checks that `n` entries of at least `entry` bytes each fit in what is left.
    fn check_count(&self, n: u64, what: &str, entry: usize) -> Result<usize, WireError> {
        // n < 2^32 and entry is small: no overflow.
        let need = n * entry as u64;
        if need > self.rest.len() as u64 {
            return Err(self.malformed(format!(
                "{n} {what} need at least {need} bytes, {} left",
                self.rest.len()
            )));
        }
        Ok(n as usize)
    }

    fn reason(&mut self) -> Result<String, WireError> {
        let bytes = self.rest();
        if bytes.len() > MAX_REASON {
            return Err(self.malformed(format!(
                "reason of {} bytes, at most {MAX_REASON}",
                bytes.len()
            )));
        }
        String::from_utf8(bytes.to_vec()).map_err(|e| self.malformed(format!("reason: {e}")))
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.rest)
    }

    fn finish(self) -> Result<(), WireError> {
        if !self.rest.is_empty() {
            return Err(self.malformed(format!("{} bytes after the last field", self.rest.len())));
        }
        Ok(())
    }
}
