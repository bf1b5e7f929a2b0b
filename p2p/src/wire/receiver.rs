//! The destination's state machine: reads the source's frames, checks each against the
//! agreed configuration and the current state, and only then hands pages and blocks to a
//! [`Sink`]. States: see [`super`].

use std::io::{self, Read, Write};
use std::time::Duration;

use snapshot::VmState;

use super::frame::{inflate, read_frame, write_frame, Frame, FrameType};
use super::{
    bounded_reason, FrameHash, MigrationConfig, WireError, BLOCK_SIZE, HELLO_VERSION,
    MIN_PROTOCOL_VERSION, PAGE_SIZE, PROTOCOL_VERSION,
};

/// Where received memory and disk contents go. The destination's memory and disks start
/// zeroed (fresh anonymous memory, new sparse images): round 0 sends no zero entries.
///
/// The [`Receiver`] calls these only with checked arguments: `gpa` page-aligned and inside
/// an agreed region, `data` exactly one page; `disk` an agreed drive, `index` inside it,
/// `data` (or `len`) exactly that block's length.
pub trait Sink {
    /// Writes the page at `gpa`.
    fn write_page(&mut self, gpa: u64, data: &[u8]) -> io::Result<()>;

    /// Zeroes the page at `gpa`.
    fn zero_page(&mut self, gpa: u64) -> io::Result<()> {
        self.write_page(gpa, &ZEROES[..PAGE_SIZE])
    }

    /// Writes block `index` of disk `disk`.
    fn write_block(&mut self, disk: u16, index: u64, data: &[u8]) -> io::Result<()>;

    /// Zeroes block `index` of disk `disk`, `len` bytes long.
    fn zero_block(&mut self, disk: u16, index: u64, len: usize) -> io::Result<()> {
        self.write_block(disk, index, &ZEROES[..len.min(BLOCK_SIZE)])
    }
}

static ZEROES: [u8; max(PAGE_SIZE, BLOCK_SIZE)] = [0; max(PAGE_SIZE, BLOCK_SIZE)];

const fn max(a: usize, b: usize) -> usize {
    if a > b {
        a
    } else {
        b
    }
}

/// Where the [`Receiver`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceiverPhase {
    /// Nothing received yet.
    AwaitHello,
    /// Hello received; the caller must [`Receiver::accept`] or [`Receiver::refuse`] it.
    AwaitAccept,
    /// Receiving round `round`, which has carried `pages` and `blocks` entries so far.
    Precopy {
        /// The current round.
        round: u32,
        /// Page entries received in it.
        pages: u64,
        /// Block entries received in it.
        blocks: u64,
    },
    /// State received; the Done frame is next.
    AwaitDone,
    /// Everything received and the hash matches: build the VM (vCPUs not started), then
    /// [`Receiver::ready`].
    Complete,
    /// Ready sent: start the VM on Commit, discard it on anything else.
    AwaitCommit,
    /// Commit received: the VM runs here; the source has stopped.
    Committed,
    /// Discard everything received.
    Failed,
}

/// What a frame did.
#[derive(Debug)]
pub enum Event {
    /// The source offers this VM: build memory and disks for it, then accept or refuse.
    Hello {
        /// The version [`Receiver::accept`] will answer with.
        version: u16,
        /// The VM, checked.
        config: MigrationConfig,
    },
    /// Pages or blocks written to the sink.
    Applied {
        /// Their round.
        round: u32,
        /// Page entries.
        pages: usize,
        /// Block entries.
        blocks: usize,
    },
    /// A round ended with the counts it announced.
    RoundEnd {
        /// The round.
        round: u32,
        /// Its page entries.
        pages: u64,
        /// Its block entries.
        blocks: u64,
    },
    /// The VM's state, checked by the snapshot format and against the Hello.
    State(Box<VmState>),
    /// The hash matches: the caller builds the VM and calls [`Receiver::ready`].
    Done,
    /// The source has stopped its VM: the caller starts it here.
    Commit,
    /// The source gave up: discard everything.
    Aborted(String),
}

/// The destination's side. See the states in [`super`].
pub struct Receiver {
    phase: ReceiverPhase,
    version: u16,
    config: Option<MigrationConfig>,
    hash: FrameHash,
    /// The payload as it came off the wire, and decompressed when it was compressed.
    payload: Vec<u8>,
    inflated: Vec<u8>,
}

impl Default for Receiver {
    fn default() -> Self {
        Self::new()
    }
}

impl Receiver {
    /// A receiver awaiting the Hello.
    pub fn new() -> Self {
        Self {
            phase: ReceiverPhase::AwaitHello,
            // Until a Hello agrees on one, what any peer reads: a Refuse or Abort then.
            version: HELLO_VERSION,
            config: None,
            hash: FrameHash::default(),
            payload: Vec::new(),
            inflated: Vec::new(),
        }
    }

    /// Where it is.
    pub fn phase(&self) -> ReceiverPhase {
        self.phase
    }

    /// The hash of the source's frames received so far (Done excluded).
    pub fn hash(&self) -> super::Hash {
        self.hash.value()
    }

    /// The configuration agreed, once a Hello was received.
    pub fn config(&self) -> Option<&MigrationConfig> {
        self.config.as_ref()
    }

    /// Reads one frame from `input`, checks it and acts on it. Before Complete, any error,
    /// or an Abort from the source, fails the receiver for good.
    pub fn next(
        &mut self,
        input: &mut impl Read,
        sink: &mut impl Sink,
    ) -> Result<Event, WireError> {
        match self.phase {
            ReceiverPhase::Failed => return Err(WireError::Failed),
            ReceiverPhase::AwaitAccept => {
                return Err(WireError::Misuse("accept() or refuse() the Hello first"))
            }
            _ => {}
        }
        let mut payload = std::mem::take(&mut self.payload);
        let mut inflated = std::mem::take(&mut self.inflated);
        let result = self.receive(input, &mut payload, &mut inflated, sink);
        self.payload = payload;
        self.inflated = inflated;
        // After Done the hash has matched and the VM may run here: what the source sends
        // then is refused, but does not undo that.
        let failed = matches!(result, Err(_) | Ok(Event::Aborted(_)));
        if failed && self.phase != ReceiverPhase::Committed {
            self.phase = ReceiverPhase::Failed;
        }
        result
    }

    /// Answers the Hello with HelloAck: the source starts round 0.
    pub fn accept(&mut self, out: &mut impl Write) -> Result<(), WireError> {
        if self.phase != ReceiverPhase::AwaitAccept {
            return Err(WireError::Misuse("accept() without a Hello"));
        }
        let version = self.version;
        self.fail_on_error(|_| write_frame(out, version, &Frame::HelloAck { version }))?;
        self.phase = ReceiverPhase::Precopy {
            round: 0,
            pages: 0,
            blocks: 0,
        };
        Ok(())
    }

    /// Answers the Hello with Refuse; the receiver is done.
    pub fn refuse(&mut self, out: &mut impl Write, reason: &str) -> Result<(), WireError> {
        if self.phase != ReceiverPhase::AwaitAccept {
            return Err(WireError::Misuse("refuse() without a Hello"));
        }
        self.phase = ReceiverPhase::Failed;
        let reason = bounded_reason(reason).to_owned();
        write_frame(out, self.version, &Frame::Refuse { reason })
    }

    /// Tells the source that every page and block of `round` is written (version 2 on;
    /// with version 1 nothing is sent). Only after that round's RoundEnd.
    pub fn applied(&mut self, out: &mut impl Write, round: u32) -> Result<(), WireError> {
        let ReceiverPhase::Precopy { round: current, .. } = self.phase else {
            return Err(WireError::Misuse("applied() outside pre-copy"));
        };
        if round >= current {
            return Err(WireError::Misuse("applied() before the round's RoundEnd"));
        }
        if self.version < 2 {
            return Ok(());
        }
        let version = self.version;
        self.fail_on_error(|_| write_frame(out, version, &Frame::RoundApplied { round }))
    }

    /// Tells the source the VM is built here and waits for its Commit.
    pub fn ready(&mut self, out: &mut impl Write) -> Result<(), WireError> {
        if self.phase != ReceiverPhase::Complete {
            return Err(WireError::Misuse("ready() before Done"));
        }
        let version = self.version;
        self.fail_on_error(|_| write_frame(out, version, &Frame::Ready))?;
        self.phase = ReceiverPhase::AwaitCommit;
        Ok(())
    }

    /// Tells the source, after Commit, that the guest runs here and has for `since_resume`
    /// (version 3 on; nothing to an older source): the last frame before the caller ends
    /// its stream.
    pub fn running(
        &mut self,
        out: &mut impl Write,
        since_resume: Duration,
    ) -> Result<(), WireError> {
        if self.phase != ReceiverPhase::Committed {
            return Err(WireError::Misuse("running() before Commit"));
        }
        if self.version < 3 {
            return Ok(());
        }
        let since_resume_us = u64::try_from(since_resume.as_micros()).unwrap_or(u64::MAX);
        write_frame(out, self.version, &Frame::Running { since_resume_us })
    }

    /// Tells the source to resume its VM (this side failed, e.g. could not resume); the
    /// receiver is done.
    pub fn abort(&mut self, out: &mut impl Write, reason: &str) -> Result<(), WireError> {
        self.phase = ReceiverPhase::Failed;
        let reason = bounded_reason(reason).to_owned();
        write_frame(out, self.version, &Frame::Abort { reason })
    }

    fn fail_on_error<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, WireError>,
    ) -> Result<T, WireError> {
        let result = f(self);
        if result.is_err() {
            self.phase = ReceiverPhase::Failed;
        }
        result
    }

    fn receive(
        &mut self,
        input: &mut impl Read,
        payload: &mut Vec<u8>,
        inflated: &mut Vec<u8>,
        sink: &mut impl Sink,
    ) -> Result<Event, WireError> {
        let header = read_frame(input, payload)?;
        // After the Hello every frame speaks the version agreed (a Hello's own header is
        // HELLO_VERSION whatever it offers; a second one is refused as out of order).
        if self.phase != ReceiverPhase::AwaitHello
            && header.kind != FrameType::Hello
            && header.version != self.version
        {
            return Err(WireError::WrongVersion {
                kind: header.kind,
                found: header.version,
                agreed: self.version,
            });
        }
        let plain: &[u8] = if header.compressed() {
            inflate(&header, payload, inflated)?;
            inflated
        } else {
            payload
        };
        let frame = Frame::decode(header.kind, plain)?;
        if !matches!(frame, Frame::Done { .. } | Frame::Abort { .. }) {
            self.hash.add(&header.to_bytes(), payload);
        }
        let out_of_order = |this: &Self| WireError::OutOfOrder {
            frame: header.kind,
            expected: this.expected(),
        };
        match (self.phase, frame) {
            (ReceiverPhase::Complete | ReceiverPhase::Committed, _) => Err(out_of_order(self)),
            (ReceiverPhase::AwaitCommit, Frame::Commit) => {
                self.phase = ReceiverPhase::Committed;
                Ok(Event::Commit)
            }
            (_, Frame::Abort { reason }) => Ok(Event::Aborted(reason)),
            (ReceiverPhase::AwaitHello, Frame::Hello(hello)) => {
                let (min, max) = (hello.min_version, hello.max_version);
                let version = max.min(PROTOCOL_VERSION);
                if min > max || version < min || version < MIN_PROTOCOL_VERSION {
                    return Err(WireError::NoCommonVersion { min, max });
                }
                hello.config.check()?;
                self.version = version;
                self.config = Some(hello.config.clone());
                self.phase = ReceiverPhase::AwaitAccept;
                Ok(Event::Hello {
                    version,
                    config: hello.config,
                })
            }
            (
                ReceiverPhase::Precopy { .. },
                frame @ (Frame::Pages { .. }
                | Frame::ZeroPages { .. }
                | Frame::Blocks { .. }
                | Frame::ZeroBlocks { .. }),
            ) => self.apply(frame, sink),
            (
                ReceiverPhase::Precopy {
                    round,
                    pages,
                    blocks,
                },
                Frame::RoundEnd {
                    round: found,
                    pages: announced_pages,
                    blocks: announced_blocks,
                },
            ) => {
                check_round(FrameType::RoundEnd, found, round)?;
                for (what, announced, received) in [
                    ("page entries", announced_pages, pages),
                    ("block entries", announced_blocks, blocks),
                ] {
                    if announced != received {
                        return Err(WireError::RoundCount {
                            round,
                            what,
                            announced,
                            received,
                        });
                    }
                }
                let next = round
                    .checked_add(1)
                    .ok_or(WireError::TooManyRounds(round))?;
                self.phase = ReceiverPhase::Precopy {
                    round: next,
                    pages: 0,
                    blocks: 0,
                };
                Ok(Event::RoundEnd {
                    round,
                    pages,
                    blocks,
                })
            }
            (phase, Frame::State { bytes }) if at_round_boundary(phase) => {
                let state = snapshot::decode(bytes)?;
                let config = self.agreed()?;
                if state.machine != config.machine {
                    return Err(WireError::StateMismatch("another machine configuration"));
                }
                if state.memory.regions != config.regions {
                    return Err(WireError::StateMismatch("other memory regions"));
                }
                self.phase = ReceiverPhase::AwaitDone;
                Ok(Event::State(Box::new(state)))
            }
            (ReceiverPhase::AwaitDone, Frame::Done { hash }) => {
                let computed = self.hash.value();
                if hash != computed {
                    return Err(WireError::HashMismatch {
                        sent: hash,
                        computed,
                    });
                }
                self.phase = ReceiverPhase::Complete;
                Ok(Event::Done)
            }
            _ => Err(out_of_order(self)),
        }
    }

    /// Checks every entry of a data frame, then writes them all.
    fn apply(&mut self, frame: Frame<'_>, sink: &mut impl Sink) -> Result<Event, WireError> {
        let ReceiverPhase::Precopy {
            round,
            pages,
            blocks,
        } = self.phase
        else {
            return Err(WireError::Misuse("apply() outside pre-copy"));
        };
        let config = self.agreed()?;
        let kind = frame.kind();
        let (new_pages, new_blocks) = match frame {
            Frame::Pages {
                round: found,
                pages,
            } => {
                check_round(kind, found, round)?;
                for &(gpa, _) in &pages {
                    config.check_page(gpa)?;
                }
                for (gpa, data) in &pages {
                    sink.write_page(*gpa, data)
                        .map_err(|e| page_error(*gpa, e))?;
                }
                (pages.len(), 0)
            }
            Frame::ZeroPages { round: found, gpas } => {
                check_round(kind, found, round)?;
                for &gpa in &gpas {
                    config.check_page(gpa)?;
                }
                for &gpa in &gpas {
                    sink.zero_page(gpa).map_err(|e| page_error(gpa, e))?;
                }
                (gpas.len(), 0)
            }
            Frame::Blocks {
                round: found,
                disk,
                blocks,
            } => {
                check_round(kind, found, round)?;
                for &(index, data) in &blocks {
                    let expected = config.block_len(disk, index)?;
                    if data.len() != expected {
                        return Err(WireError::BlockLength {
                            disk,
                            index,
                            len: data.len(),
                            expected,
                        });
                    }
                }
                for &(index, data) in &blocks {
                    sink.write_block(disk, index, data)
                        .map_err(|e| block_error(disk, index, e))?;
                }
                (0, blocks.len())
            }
            Frame::ZeroBlocks {
                round: found,
                disk,
                indices,
            } => {
                check_round(kind, found, round)?;
                let lens = indices
                    .iter()
                    .map(|&index| config.block_len(disk, index))
                    .collect::<Result<Vec<_>, _>>()?;
                for (&index, len) in indices.iter().zip(lens) {
                    sink.zero_block(disk, index, len)
                        .map_err(|e| block_error(disk, index, e))?;
                }
                (0, indices.len())
            }
            _ => return Err(WireError::Misuse("apply() of a frame without data")),
        };
        self.phase = ReceiverPhase::Precopy {
            round,
            pages: pages.saturating_add(new_pages as u64),
            blocks: blocks.saturating_add(new_blocks as u64),
        };
        Ok(Event::Applied {
            round,
            pages: new_pages,
            blocks: new_blocks,
        })
    }

    fn agreed(&self) -> Result<&MigrationConfig, WireError> {
        self.config
            .as_ref()
            .ok_or(WireError::Misuse("no configuration before the Hello"))
    }

    /// What the current phase allows, for [`WireError::OutOfOrder`].
    fn expected(&self) -> String {
        match self.phase {
            ReceiverPhase::AwaitHello => "Hello".into(),
            phase @ ReceiverPhase::Precopy { round, .. } if at_round_boundary(phase) => {
                format!("pages or blocks of round {round}, its RoundEnd, or State")
            }
            ReceiverPhase::Precopy { round, .. } => {
                format!("pages or blocks of round {round}, or its RoundEnd")
            }
            ReceiverPhase::AwaitDone => "Done".into(),
            ReceiverPhase::Complete => "nothing before Ready".into(),
            ReceiverPhase::AwaitCommit => "Commit or Abort".into(),
            ReceiverPhase::Committed => "nothing after Commit".into(),
            ReceiverPhase::AwaitAccept | ReceiverPhase::Failed => "nothing".into(),
        }
    }
}

/// Between two rounds, after round 0: where the State may come (data frames are never
/// empty, so no entries means no data frame).
fn at_round_boundary(phase: ReceiverPhase) -> bool {
    matches!(phase, ReceiverPhase::Precopy { round, pages: 0, blocks: 0 } if round > 0)
}

fn check_round(frame: FrameType, found: u32, current: u32) -> Result<(), WireError> {
    if found != current {
        return Err(WireError::WrongRound {
            frame,
            found,
            current,
        });
    }
    Ok(())
}

fn page_error(gpa: u64, source: io::Error) -> WireError {
    WireError::Sink {
        what: format!("page {gpa:#x}"),
        source,
    }
}

fn block_error(disk: u16, index: u64, source: io::Error) -> WireError {
    WireError::Sink {
        what: format!("block {index} of disk {disk}"),
        source,
    }
}
