//! The source's state machine: checks what the caller hands it against the configuration
//! it announced, batches pages and blocks into frames of at most [`MAX_PAYLOAD`] bytes, and
//! keeps the hash the Done frame carries. States: see [`super`].
//!
//! `out` may buffer: the Sender flushes it after each frame the destination answers or
//! acts on (Hello, Done, Commit, Abort). Not after RoundEnd, so that the last round, the
//! State and Done of a paused guest leave together: the caller flushes before it waits
//! for a round's RoundApplied ([`Sender::wait_applied`]).

use std::io::{Read, Write};
use std::time::Duration;

use snapshot::VmState;

use super::frame::{deflate, header_for, read_frame, write_frame, Frame, FrameType, Hello};
use super::{
    bounded_reason, FrameHash, MigrationConfig, WireError, FLAG_LZ4, HELLO_VERSION, MAX_PAYLOAD,
    MIN_PROTOCOL_VERSION, PAGE_SIZE, PROTOCOL_VERSION,
};

/// Where the [`Sender`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SenderPhase {
    /// Nothing sent.
    Start,
    /// Hello sent; waiting for the answer.
    AwaitAck,
    /// Sending round `round`.
    Precopy {
        /// The current round.
        round: u32,
    },
    /// State sent; Done is next.
    StateSent,
    /// Done sent; waiting for the destination to build the VM.
    AwaitReady,
    /// The destination has built the VM: [`Sender::commit`] hands it over, or
    /// [`Sender::abort`] keeps it here.
    Ready,
    /// Commit sent: the source has stopped its VM for good, the destination runs it.
    Complete,
    /// The source resumes its VM.
    Failed,
}

/// What a round carried, as its RoundEnd announced it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoundStats {
    /// The round.
    pub round: u32,
    /// Page entries (with data or zero).
    pub pages: u64,
    /// Block entries (with data or zero).
    pub blocks: u64,
}

/// The kind of data frame being filled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Batch {
    Pages,
    ZeroPages,
    Blocks(u16),
    ZeroBlocks(u16),
}

/// The source's side. See the states in [`super`]. Pages and blocks are batched: a frame
/// goes out when it is full, when the kind of entry (or the disk) changes, and at
/// [`Sender::end_round`].
pub struct Sender {
    config: MigrationConfig,
    phase: SenderPhase,
    hash: FrameHash,
    pages: u64,
    blocks: u64,
    /// The data frame being filled: its kind, payload so far and entry count.
    batch: Option<Batch>,
    payload: Vec<u8>,
    count: u32,
    /// The protocol version: [`HELLO_VERSION`] until the destination chose one.
    version: u16,
    /// Whether Pages and Blocks frames may go out compressed (version 2 on).
    compress: bool,
    /// A compressed payload being built.
    packed: Vec<u8>,
    /// Payload bytes of data frames before and after compression.
    raw_bytes: u64,
    wire_bytes: u64,
}

impl Sender {
    /// A sender for this VM; the configuration is checked as the destination will.
    pub fn new(config: MigrationConfig) -> Result<Self, WireError> {
        config.check()?;
        Ok(Self {
            config,
            phase: SenderPhase::Start,
            hash: FrameHash::default(),
            pages: 0,
            blocks: 0,
            batch: None,
            payload: Vec::new(),
            count: 0,
            version: HELLO_VERSION,
            compress: true,
            packed: Vec::new(),
            raw_bytes: 0,
            wire_bytes: 0,
        })
    }

    /// Whether Pages and Blocks frames are compressed when the destination speaks version
    /// 2 or later and it saves something (the default), or never.
    pub fn set_compression(&mut self, on: bool) {
        self.compress = on;
    }

    /// The protocol version in use: the destination's choice once it answered the Hello.
    pub fn version(&self) -> u16 {
        self.version
    }

    /// Payload bytes of the Pages and Blocks frames sent so far, as built and as sent
    /// (compressed): their ratio is what compression saved.
    pub fn data_bytes(&self) -> (u64, u64) {
        (self.raw_bytes, self.wire_bytes)
    }

    /// Where it is.
    pub fn phase(&self) -> SenderPhase {
        self.phase
    }

    /// The hash of every frame sent so far.
    pub fn hash(&self) -> super::Hash {
        self.hash.value()
    }

    /// Sends the Hello: the versions this build speaks and the VM's configuration.
    pub fn hello(&mut self, out: &mut impl Write) -> Result<(), WireError> {
        self.expect(SenderPhase::Start, "hello() twice")?;
        let frame = Frame::Hello(Hello {
            min_version: MIN_PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            config: self.config.clone(),
        });
        self.guard(|s| {
            s.send(out, &frame)?;
            out.flush().map_err(WireError::from)
        })?;
        self.phase = SenderPhase::AwaitAck;
        Ok(())
    }

    /// Reads the destination's answer to the Hello; returns the version it chose.
    pub fn read_ack(&mut self, input: &mut impl Read) -> Result<u16, WireError> {
        self.expect(SenderPhase::AwaitAck, "read_ack() without a Hello")?;
        self.guard(|s| {
            let mut payload = Vec::new();
            let header = read_frame(input, &mut payload)?;
            match Frame::decode(header.kind, &payload)? {
                Frame::HelloAck { version }
                    if (MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version) =>
                {
                    s.phase = SenderPhase::Precopy { round: 0 };
                    s.version = version;
                    Ok(version)
                }
                Frame::HelloAck { version } => Err(WireError::UnsupportedVersion(version)),
                Frame::Refuse { reason } => Err(WireError::Refused(reason)),
                Frame::Abort { reason } => Err(WireError::Aborted(reason)),
                _ => Err(WireError::OutOfOrder {
                    frame: header.kind,
                    expected: "HelloAck or Refuse".into(),
                }),
            }
        })
    }

    /// Queues the page at `gpa`. An all-zero page travels as its address only, and not at
    /// all in round 0 (the destination's memory starts zeroed).
    pub fn page(&mut self, out: &mut impl Write, gpa: u64, data: &[u8]) -> Result<(), WireError> {
        if data.len() != PAGE_SIZE {
            self.phase = SenderPhase::Failed;
            return Err(WireError::PageLength(data.len()));
        }
        if is_zero(data) {
            return self.zero_page(out, gpa);
        }
        self.guard(|s| {
            s.precopy("page() outside pre-copy")?;
            s.config.check_page(gpa)?;
            s.push(out, Batch::Pages, 8 + data.len(), |p| {
                p.extend_from_slice(&gpa.to_le_bytes());
                p.extend_from_slice(data);
            })?;
            s.pages += 1;
            Ok(())
        })
    }

    /// Queues a zeroed page at `gpa` (nothing in round 0).
    pub fn zero_page(&mut self, out: &mut impl Write, gpa: u64) -> Result<(), WireError> {
        self.guard(|s| {
            let round = s.precopy("zero_page() outside pre-copy")?;
            s.config.check_page(gpa)?;
            if round > 0 {
                s.push(out, Batch::ZeroPages, 8, |p| {
                    p.extend_from_slice(&gpa.to_le_bytes())
                })?;
                s.pages += 1;
            }
            Ok(())
        })
    }

    /// Queues block `index` of disk `disk`; `data` is the whole block (shorter for a
    /// disk's short last block). An all-zero block travels as its index only, and not at
    /// all in round 0 (the destination's disks start empty).
    pub fn block(
        &mut self,
        out: &mut impl Write,
        disk: u16,
        index: u64,
        data: &[u8],
    ) -> Result<(), WireError> {
        if is_zero(data) {
            self.guard(|s| s.check_block(disk, index, data.len()))?;
            return self.zero_block(out, disk, index);
        }
        self.guard(|s| {
            s.precopy("block() outside pre-copy")?;
            s.check_block(disk, index, data.len())?;
            s.push(out, Batch::Blocks(disk), 12 + data.len(), |p| {
                p.extend_from_slice(&index.to_le_bytes());
                // check_block: data.len() is at most BLOCK_SIZE.
                p.extend_from_slice(&(data.len() as u32).to_le_bytes());
                p.extend_from_slice(data);
            })?;
            s.blocks += 1;
            Ok(())
        })
    }

    /// Queues a zeroed block `index` of disk `disk` (nothing in round 0).
    pub fn zero_block(
        &mut self,
        out: &mut impl Write,
        disk: u16,
        index: u64,
    ) -> Result<(), WireError> {
        self.guard(|s| {
            let round = s.precopy("zero_block() outside pre-copy")?;
            s.config.block_len(disk, index)?;
            if round > 0 {
                s.push(out, Batch::ZeroBlocks(disk), 8, |p| {
                    p.extend_from_slice(&index.to_le_bytes())
                })?;
                s.blocks += 1;
            }
            Ok(())
        })
    }

    /// Writes what is queued and the round's RoundEnd, without flushing `out`; the next
    /// round starts.
    pub fn end_round(&mut self, out: &mut impl Write) -> Result<RoundStats, WireError> {
        self.guard(|s| {
            let round = s.precopy("end_round() outside pre-copy")?;
            s.flush(out)?;
            let stats = RoundStats {
                round,
                pages: s.pages,
                blocks: s.blocks,
            };
            let next = round
                .checked_add(1)
                .ok_or(WireError::TooManyRounds(round))?;
            s.send(
                out,
                &Frame::RoundEnd {
                    round,
                    pages: s.pages,
                    blocks: s.blocks,
                },
            )?;
            (s.pages, s.blocks) = (0, 0);
            s.phase = SenderPhase::Precopy { round: next };
            Ok(stats)
        })
    }

    /// Waits until the destination has written every page and block of `round` (its
    /// RoundApplied), which must have ended and been flushed. A version 1 destination
    /// does not say: then this returns at once.
    pub fn wait_applied(&mut self, input: &mut impl Read, round: u32) -> Result<(), WireError> {
        let current = self.precopy("wait_applied() outside pre-copy")?;
        if round >= current {
            return Err(WireError::Misuse(
                "wait_applied() before the round's end_round()",
            ));
        }
        if self.version < 2 {
            return Ok(());
        }
        self.guard(|s| loop {
            match s.read_from_destination(input)? {
                Frame::RoundApplied { round: applied } if applied >= current => {
                    return Err(WireError::Malformed {
                        kind: FrameType::RoundApplied,
                        reason: format!(
                            "round {applied} applied, but the last round sent is {}",
                            current - 1
                        ),
                    })
                }
                Frame::RoundApplied { round: applied } if applied >= round => return Ok(()),
                Frame::RoundApplied { .. } => {}
                other => {
                    return Err(WireError::OutOfOrder {
                        frame: other.kind(),
                        expected: "RoundApplied or Abort".into(),
                    })
                }
            }
        })
    }

    /// Reads one frame from the destination; an Abort or a Refuse is an error.
    fn read_from_destination(
        &mut self,
        input: &mut impl Read,
    ) -> Result<Frame<'static>, WireError> {
        let mut payload = Vec::new();
        let header = read_frame(input, &mut payload)?;
        match Frame::decode(header.kind, &payload)? {
            Frame::Abort { reason } => Err(WireError::Aborted(reason)),
            Frame::Refuse { reason } => Err(WireError::Refused(reason)),
            Frame::RoundApplied { round } => Ok(Frame::RoundApplied { round }),
            Frame::Ready => Ok(Frame::Ready),
            _ => Err(WireError::OutOfOrder {
                frame: header.kind,
                expected: "RoundApplied, Ready or Abort".into(),
            }),
        }
    }

    /// Sends the paused VM's state, after the last round's [`Sender::end_round`].
    pub fn state(&mut self, out: &mut impl Write, state: &VmState) -> Result<(), WireError> {
        self.guard(|s| {
            let round = s.precopy("state() outside pre-copy")?;
            if round == 0 || s.batch.is_some() || s.pages != 0 || s.blocks != 0 {
                return Err(WireError::Misuse("state() before end_round()"));
            }
            if state.machine != s.config.machine {
                return Err(WireError::StateMismatch("another machine configuration"));
            }
            if state.memory.regions != s.config.regions {
                return Err(WireError::StateMismatch("other memory regions"));
            }
            let bytes = snapshot::encode_as(state, super::state_format(s.version))?;
            s.send(out, &Frame::State { bytes: &bytes })?;
            s.phase = SenderPhase::StateSent;
            Ok(())
        })
    }

    /// Sends Done with the hash of everything sent.
    pub fn done(&mut self, out: &mut impl Write) -> Result<(), WireError> {
        self.expect(SenderPhase::StateSent, "done() before state()")?;
        let hash = self.hash.value();
        let version = self.version;
        self.guard(|_| write_frame(out, version, &Frame::Done { hash }))?;
        self.phase = SenderPhase::AwaitReady;
        Ok(())
    }

    /// Reads the destination's answer to Done. `Ok` only on Ready: the destination has
    /// checked the hash and built the VM, and waits for [`Sender::commit`].
    pub fn read_ready(&mut self, input: &mut impl Read) -> Result<(), WireError> {
        self.expect(SenderPhase::AwaitReady, "read_ready() before done()")?;
        self.guard(|s| loop {
            // RoundApplied frames of rounds not waited for may come first.
            if let Frame::Ready = s.read_from_destination(input)? {
                s.phase = SenderPhase::Ready;
                return Ok(());
            }
        })
    }

    /// Hands the VM over: the destination starts it when this arrives. The caller must
    /// have stopped its VM for good before calling this.
    pub fn commit(&mut self, out: &mut impl Write) -> Result<(), WireError> {
        self.expect(SenderPhase::Ready, "commit() before read_ready()")?;
        // Whatever happens to the write, the destination may run the VM from now on.
        self.phase = SenderPhase::Complete;
        write_frame(out, self.version, &Frame::Commit)
    }

    /// What the destination sent after Commit before it ended its stream (`tail`, all of
    /// it): from version 3 on, one Running frame, telling how long its guest had run by
    /// then (`None` for an empty tail: the destination could not resume it, or the
    /// version is older). `since_commit` is the time since Commit was written: a guest
    /// cannot have run longer, and a value over it is refused.
    pub fn running(
        &self,
        tail: &[u8],
        since_commit: Duration,
    ) -> Result<Option<Duration>, WireError> {
        if self.phase != SenderPhase::Complete {
            return Err(WireError::Misuse("running() before commit()"));
        }
        if tail.is_empty() {
            return Ok(None);
        }
        let mut input = tail;
        let mut payload = Vec::new();
        let header = read_frame(&mut input, &mut payload)?;
        if header.version != self.version || self.version < 3 {
            return Err(WireError::WrongVersion {
                kind: header.kind,
                found: header.version,
                agreed: self.version,
            });
        }
        let Frame::Running { since_resume_us } = Frame::decode(header.kind, &payload)? else {
            return Err(WireError::OutOfOrder {
                frame: header.kind,
                expected: "Running or the end of the stream".into(),
            });
        };
        if !input.is_empty() {
            return Err(WireError::Malformed {
                kind: header.kind,
                reason: format!("{} bytes after it", input.len()),
            });
        }
        let ran = Duration::from_micros(since_resume_us);
        if ran > since_commit {
            return Err(WireError::Malformed {
                kind: header.kind,
                reason: format!(
                    "the guest ran {ran:?} by its account, but Commit left only {since_commit:?} ago"
                ),
            });
        }
        Ok(Some(ran))
    }

    /// Tells the destination to discard everything; the source resumes its VM.
    pub fn abort(&mut self, out: &mut impl Write, reason: &str) -> Result<(), WireError> {
        self.phase = SenderPhase::Failed;
        let reason = bounded_reason(reason).to_owned();
        write_frame(out, self.version, &Frame::Abort { reason })
    }

    fn expect(&self, phase: SenderPhase, misuse: &'static str) -> Result<(), WireError> {
        match self.phase {
            SenderPhase::Failed => Err(WireError::Failed),
            p if p == phase => Ok(()),
            _ => Err(WireError::Misuse(misuse)),
        }
    }

    /// The current round, or why there is none.
    fn precopy(&self, misuse: &'static str) -> Result<u32, WireError> {
        match self.phase {
            SenderPhase::Precopy { round } => Ok(round),
            SenderPhase::Failed => Err(WireError::Failed),
            _ => Err(WireError::Misuse(misuse)),
        }
    }

    /// Runs `f`; any error fails the sender.
    fn guard<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, WireError>,
    ) -> Result<T, WireError> {
        let result = f(self);
        if result.is_err() {
            self.phase = SenderPhase::Failed;
        }
        result
    }

    fn check_block(&self, disk: u16, index: u64, len: usize) -> Result<(), WireError> {
        let expected = self.config.block_len(disk, index)?;
        if len != expected {
            return Err(WireError::BlockLength {
                disk,
                index,
                len,
                expected,
            });
        }
        Ok(())
    }

    /// Appends an entry of `len` bytes to the batch of `kind`, first sending the batch
    /// there is when it is of another kind or the entry would not fit.
    fn push(
        &mut self,
        out: &mut impl Write,
        kind: Batch,
        len: usize,
        entry: impl FnOnce(&mut Vec<u8>),
    ) -> Result<(), WireError> {
        if self.batch != Some(kind) || self.payload.len() + len > MAX_PAYLOAD {
            self.flush(out)?;
        }
        if self.batch.is_none() {
            let SenderPhase::Precopy { round } = self.phase else {
                return Err(WireError::Misuse("push() outside pre-copy"));
            };
            self.payload.clear();
            self.payload.extend_from_slice(&round.to_le_bytes());
            if let Batch::Blocks(disk) | Batch::ZeroBlocks(disk) = kind {
                self.payload.extend_from_slice(&disk.to_le_bytes());
            }
            self.payload.extend_from_slice(&0u32.to_le_bytes()); // count, set by flush()
            self.batch = Some(kind);
            self.count = 0;
        }
        entry(&mut self.payload);
        self.count += 1;
        Ok(())
    }

    /// Sends the batch being filled, if any.
    fn flush(&mut self, out: &mut impl Write) -> Result<(), WireError> {
        let Some(kind) = self.batch.take() else {
            return Ok(());
        };
        let (frame, at) = match kind {
            Batch::Pages => (FrameType::Pages, 4),
            Batch::ZeroPages => (FrameType::ZeroPages, 4),
            Batch::Blocks(_) => (FrameType::Blocks, 6),
            Batch::ZeroBlocks(_) => (FrameType::ZeroBlocks, 6),
        };
        self.payload[at..at + 4].copy_from_slice(&self.count.to_le_bytes());
        let compressible = matches!(frame, FrameType::Pages | FrameType::Blocks);
        let packed = if compressible && self.compress && self.version >= 2 {
            deflate(&self.payload, &mut self.packed)
        } else {
            None
        };
        let (flags, wire) = match packed {
            Some(n) => (FLAG_LZ4, &self.packed[..n]),
            None => (0, &self.payload[..]),
        };
        let header = header_for(self.version, frame, flags, wire);
        out.write_all(&header)?;
        out.write_all(wire)?;
        self.hash.add(&header, wire);
        if compressible {
            self.raw_bytes += self.payload.len() as u64;
            self.wire_bytes += wire.len() as u64;
        }
        Ok(())
    }

    /// Encodes, hashes and writes a frame.
    fn send(&mut self, out: &mut impl Write, frame: &Frame<'_>) -> Result<(), WireError> {
        let bytes = frame.encode_as(self.version)?;
        out.write_all(&bytes)?;
        if let Some((header, payload)) = bytes.split_first_chunk() {
            self.hash.add(header, payload);
        }
        Ok(())
    }
}

/// Whether every byte is zero: 64 at a time (the inner fold vectorizes), stopping at the
/// first chunk that is not.
fn is_zero(data: &[u8]) -> bool {
    data.chunks(64)
        .all(|chunk| chunk.iter().fold(0, |acc, &b| acc | b) == 0)
}
