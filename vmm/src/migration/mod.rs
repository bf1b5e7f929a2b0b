//! Pre-copy live migration between two hospes processes over one QUIC connection with
//! mutual TLS (`p2p::transport`), speaking the framed protocol of `p2p::wire`.
//!
//! Threads on the source, and who owns what:
//! - the VMM thread keeps running the event loop (devices stay serviced: the guest runs
//!   on during pre-copy) and owns everything that needs the VM's file descriptors: the
//!   KVM dirty log, pausing, resuming and reading the vCPU and device state. It answers
//!   the migration thread's [`ToVmm`] requests, which come down a channel with an eventfd
//!   to wake its epoll loop (as the API's requests do);
//! - the migration thread (`source`) owns the connection, on its own tokio runtime, and
//!   reads guest memory (a clone of the mapping) and the drive images concurrently with
//!   the running guest. A page or block read while the guest writes it may be torn; it
//!   is dirty then, so a later round sends it again.
//!
//! The order, and why:
//! 1. Connect (the destination's key is the only one accepted there; ours must be one it
//!    trusts), Hello with the machine configuration, wait for HelloAck.
//! 2. Dirty tracking on (KVM's log and the VMM bitmap, see `dirty`), and each drive's
//!    dirty-block bitmap emptied, *before* round 0 reads anything: a write after that is
//!    in the next round's set, a write before it is in what round 0 reads.
//! 3. Round 0: every non-zero page and disk block. Rounds 1..: what was dirtied since.
//!    While a round runs, the source takes the dirty log again every second and leaves
//!    what was dirtied again, and not yet sent, to the next round, which sends it anyway:
//!    a working set rewritten faster than a round lasts crosses the link once a round.
//! 4. Before each round, the downtime stop-and-copy would cost now ([`Estimate`]): the
//!    dirty set's bytes as they will go out compressed ([`wire_share`]) plus what is still
//!    unsent in the QUIC buffers, over the bandwidth
//!    measured so far (UDP bytes out per second since the Hello), plus the fixed costs
//!    no round makes smaller (the round trips of Ready and Commit, pausing and reading
//!    the state). [`decide`] stops when that fits the budget, or when the bytes alone fit
//!    it and no longer shrink (the fixed costs alone are over the budget: more rounds
//!    would not help); after [`MAX_ROUNDS`] rounds without either it aborts (the guest
//!    dirties memory faster than the link carries it).
//! 5. Stop-and-copy: the VMM thread pauses the vCPUs and takes the last dirty log, which
//!    it hands over at once; then it reads the vCPU, VM and device state (which writes no
//!    guest memory) while the migration thread sends the last pages, and then blocks
//!    until the migration ends, so no device touches guest memory or disks any more. The
//!    migration thread takes the last dirty blocks (block I/O completes on the VMM thread,
//!    so none is in flight), sends the pending and last pages and blocks as the final
//!    round, then the state once it has it, and Done with the hash of every frame. These
//!    go to QUIC together when Done flushes the stream (`stream::StreamWriter` queues
//!    writes until a frame the peer answers): measured in the test rig, one hand-over
//!    instead of one per frame part cut the QUIC threads' CPU time in the pause, on both
//!    sides together, from about 24 ms to about 8.
//! 6. The destination checks the hash, writes the state into the VM exactly as a restore
//!    does (it built and launched the VM, vCPUs paused, when the Hello arrived: only the
//!    state is left for the pause), and answers Ready.
//! 7. On Ready the source commits: from here on it never resumes its copy. It sends
//!    Commit, finishes the stream and waits until QUIC reports every byte of it
//!    acknowledged by the destination, or until the destination ends its own stream,
//!    which it does once it has read Commit, let its vCPUs go (they were launched
//!    paused before Ready) and sent Running, with the time since they went (protocol
//!    version 3 on). The downtime ends at their resume: from the source's pause to the
//!    end of that stream, less the Running time, an upper bound (the end cannot arrive
//!    before it was sent). Measured in the test rig (one CPU), the end left 12 to 26 ms
//!    after the guest resumed, of which Running took 4 to 15 off; the source's figure
//!    counted all of it until version 3. Then the source stops (exit with
//!    [`crate::vm::Outcome::Migrated`]).
//!
//! Any failure before Commit (refused, connection lost, destination killed, a bad or
//! truncated stream, a timeout) ends the migration thread with an error; the VMM thread
//! then switches dirty logging off, resumes the vCPUs if it paused them, answers the API
//! with the reason and runs on; the destination has not started anything and discards
//! what it received. So the guest runs on exactly one side. The one window no protocol
//! closes is the connection dying while Commit is in flight: the source cannot know
//! whether it arrived. It then keeps the guest paused ([`MigrationError::InDoubt`]) and
//! says so, rather than risk running it twice; the operator resumes it only after making
//! sure the destination does not run it.
//!
//! On the destination (`destination`), one thread does it all: guest memory, sparse
//! drive images and the VM's first build phase are made when the Hello arrives, filled as
//! frames arrive, and thrown away on any failure before the VM runs.

pub mod destination;
pub(crate) mod source;
mod stream;

use std::io;
use std::path::PathBuf;
use std::sync::mpsc::Sender;
use std::time::Duration;

use snapshot::VmState;

use crate::dirty::DirtyRegion;

/// Rounds after round 0 before a migration that does not converge is given up.
pub const MAX_ROUNDS: u32 = 30;
/// How long the source waits for the destination to acknowledge Commit.
pub const COMMIT_WAIT: Duration = Duration::from_secs(10);
/// How long dialing the destination may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a single read or write on the migration stream may wait. The connection's
/// idle timeout (`p2p::transport::IDLE_TIMEOUT`) usually notices a dead peer first.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// What the migration thread asks of the VMM thread.
pub(crate) enum ToVmm {
    /// Switch dirty logging on.
    StartDirty(Sender<Result<(), String>>),
    /// The pages dirtied since the last call (or since logging started).
    Collect(Sender<Result<Vec<DirtyRegion>, String>>),
    /// Throttle every vCPU to this percentage of time outside the guest (auto-converge).
    Throttle(u32, Sender<Result<(), String>>),
    /// Pause the vCPUs and answer the last dirty pages on `dirty` at once, then the VM's
    /// state on `state` (nothing there if the pause failed). The VMM thread then waits for
    /// `Finished` and handles nothing else.
    Pause {
        /// The last dirty pages.
        dirty: Sender<Result<Vec<DirtyRegion>, String>>,
        /// The vCPU, VM and device state, read with the vCPUs paused.
        state: Sender<Result<VmState, String>>,
    },
    /// The migration ended: `Ok` once the destination runs the VM.
    Finished(Result<Report, MigrationError>),
}

/// What one round carried.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct RoundReport {
    /// The round; the last one is sent with the vCPUs paused.
    pub round: u32,
    /// Page entries.
    pub pages: u64,
    /// Disk block entries.
    pub blocks: u64,
    /// Stream bytes written for it.
    pub bytes: u64,
    /// From its first page to its RoundEnd written, milliseconds.
    pub ms: f64,
}

/// Where a running migration is, for `GET /vm` and the progress line.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Progress {
    /// The round being sent.
    pub round: u32,
    /// "connecting", "precopy", "stop-and-copy" or "commit".
    pub phase: &'static str,
    /// Stream bytes written so far.
    pub bytes: u64,
    /// Measured bandwidth, bytes per second.
    pub bandwidth_bytes_per_s: u64,
    /// How fast the guest dirtied memory and disk during the last round, bytes per second.
    pub dirty_bytes_per_s: u64,
    /// Dirty bytes still to send (plus what is queued and not yet on the wire).
    pub remaining_bytes: u64,
    /// What stop-and-copy would take now, milliseconds.
    pub expected_downtime_ms: f64,
    /// Since the request, milliseconds.
    pub elapsed_ms: f64,
    /// Auto-converge: percent of the time the vCPUs are kept out of the guest.
    pub throttle_percent: u32,
}

/// What a finished migration measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// Rounds sent, the final (paused) one included.
    pub rounds: u32,
    /// From the API request to the destination's acknowledgement.
    pub total: Duration,
    /// From pausing the vCPUs to the destination's resume, which it reports by ending
    /// its stream after its vCPUs run: an upper bound of the time the guest did not run.
    /// When that end is not seen, to QUIC's acknowledgement of Commit (a lower bound).
    pub downtime: Duration,
    /// Bytes of migration stream sent.
    pub bytes: u64,
    /// Page entries sent, all rounds.
    pub pages: u64,
    /// Disk block entries sent, all rounds.
    pub blocks: u64,
    /// Bandwidth measured at the end of pre-copy, bytes per second.
    pub bandwidth: u64,
    /// Each round.
    pub per_round: Vec<RoundReport>,
    /// The highest auto-converge throttle applied, percent (0: none).
    pub throttle_percent: u32,
}

/// Why a migration failed. On the source the VM runs on; on the destination nothing
/// received is kept.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The identity key could not be loaded.
    #[error("identity {}: {source}", path.display())]
    Identity {
        /// The key file.
        path: PathBuf,
        /// Why.
        source: p2p::IdentityError,
    },
    /// The async runtime could not start.
    #[error("cannot start the migration's async runtime: {0}")]
    Runtime(io::Error),
    /// The QUIC endpoint or the connection failed.
    #[error(transparent)]
    Transport(#[from] p2p::TransportError),
    /// The connection broke.
    #[error("connection to {peer}: {reason}")]
    Connection {
        /// The peer's address.
        peer: std::net::SocketAddr,
        /// quinn's description.
        reason: String,
    },
    /// Something took too long.
    #[error("timed out after {waited:?} {what}")]
    Timeout {
        /// What was awaited.
        what: &'static str,
        /// How long.
        waited: Duration,
    },
    /// The protocol failed (including a refusal or an abort by the peer).
    #[error(transparent)]
    Wire(#[from] p2p::wire::WireError),
    /// The VMM thread could not do its part.
    #[error("VMM thread: {0}")]
    Vmm(String),
    /// A drive image could not be read or written.
    #[error("drive {id} ({}): {source}", path.display())]
    Disk {
        /// The drive id.
        id: String,
        /// Its image.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Guest memory could not be read or written.
    #[error("guest memory at {gpa:#x}: {reason}")]
    Memory {
        /// Where.
        gpa: u64,
        /// Why.
        reason: String,
    },
    /// Pre-copy did not converge.
    #[error(
        "not converged after {rounds} rounds: {pending} bytes still dirty at {bandwidth} bytes/s \
         would take {estimate:?}, the downtime budget is {budget:?}"
    )]
    NotConverged {
        /// Rounds sent.
        rounds: u32,
        /// Bytes the final round would carry.
        pending: u64,
        /// Measured bandwidth.
        bandwidth: u64,
        /// The downtime that would cost.
        estimate: Duration,
        /// The budget.
        budget: Duration,
    },
    /// The destination cannot take this VM.
    #[error("cannot receive this VM: {0}")]
    Unacceptable(String),
    /// Commit was sent but its arrival not acknowledged: the destination may run the VM.
    #[error(
        "outcome unknown: Commit was sent but not acknowledged ({0}); the VM stays paused \
         here. Resume it only if the destination does not run it"
    )]
    InDoubt(String),
}

/// The downtime stop-and-copy would cost, as the source estimates it before a round.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    /// Dirty bytes plus what is queued and not yet on the wire.
    pub bytes: u64,
    /// Sending them at the measured bandwidth.
    pub bytes_time: Duration,
    /// What no round makes smaller: pausing and reading the state, the round trips of
    /// Ready and Commit, the destination finishing its build.
    pub fixed: Duration,
}

impl Estimate {
    /// `bytes` at `bandwidth` bytes per second, plus `fixed`.
    pub fn new(bytes: u64, bandwidth: f64, fixed: Duration) -> Self {
        Self {
            bytes,
            bytes_time: Duration::from_secs_f64(bytes as f64 / bandwidth.max(1.0)),
            fixed,
        }
    }

    /// The whole downtime.
    pub fn downtime(&self) -> Duration {
        self.bytes_time + self.fixed
    }
}

/// Below this many payload bytes a round says little about how its data compresses.
const SHARE_MIN_BYTES: u64 = 64 << 10;

/// The share of its size a dirty page or block takes on the wire: pages and blocks go
/// out compressed, and the bandwidth is measured in bytes on the wire. Taken from the
/// last round's data frames, `(raw, wire)` payload bytes, when it carried enough to tell;
/// else from all of them so far, `total`; else 1. Zero pages travel as a few bytes each
/// and are not in either, so this errs high.
pub fn wire_share(last: (u64, u64), total: (u64, u64)) -> f64 {
    let share = |(raw, wire): (u64, u64)| (wire as f64 / raw as f64).clamp(0.0, 1.0);
    if last.0 >= SHARE_MIN_BYTES {
        share(last)
    } else if total.0 > 0 {
        share(total)
    } else {
        1.0
    }
}

/// What pre-copy does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Another round.
    Continue,
    /// Pause and send the rest.
    StopAndCopy,
    /// Abort: pre-copy does not converge.
    GiveUp,
}

/// A round that leaves more than this fraction of the previous round's bytes did not
/// shrink what stop-and-copy sends.
const STALLED: f64 = 0.75;

/// What to do after `rounds` rounds, given `now` and the estimate before the previous
/// round (`None` after round 0). Stop when the whole downtime fits `budget`; also when
/// the bytes' share alone fits it and more rounds cannot lower it (nothing left, or it
/// stopped shrinking): then only the fixed costs are over the budget, and no round
/// changes those. Otherwise another round, up to [`MAX_ROUNDS`] of them.
pub fn decide(
    now: Estimate,
    previous: Option<Estimate>,
    budget: Duration,
    rounds: u32,
) -> Decision {
    if now.downtime() <= budget {
        return Decision::StopAndCopy;
    }
    let stalled = now.bytes == 0
        || previous.is_some_and(|p| now.bytes as f64 >= p.bytes as f64 * STALLED)
        || rounds > MAX_ROUNDS;
    if now.bytes_time <= budget && stalled {
        return Decision::StopAndCopy;
    }
    if rounds > MAX_ROUNDS {
        return Decision::GiveUp;
    }
    Decision::Continue
}

/// Auto-converge's first throttle, in percent of the time the vCPUs spend outside the
/// guest: QEMU's cpu-throttle-initial.
pub const THROTTLE_INITIAL: u32 = 20;
/// Auto-converge's ceiling: the vCPUs always keep 1% (QEMU's maximum too).
pub const THROTTLE_MAX: u32 = 99;

/// The throttle after one more round that did not converge, given `link_ratio`: the
/// link's bandwidth over the fastest rate the guest was seen dirtying memory, both in bytes
/// on the wire. The guest's share of time (100 − throttle) becomes the smaller of:
/// - a step down: 80% at first ([`THROTTLE_INITIAL`]), then half of what it was, as QEMU
///   adds its cpu-throttle-increment (10 points) but faster, since each round at a
///   throttle too weak to matter resends the whole working set;
/// - the share at which the guest would dirty half of what the link carries, from the
///   rate seen. That rate is a lower bound: a round that outlasts the working set's
///   rewrite finds the working set dirty, not more, so the fastest rate comes from the
///   shortest interval, the one after round 0.
///
/// The bursts a high throttle leaves are what let a round find little dirty (see
/// `vcpu::THROTTLE_SLICE`). Never above [`THROTTLE_MAX`].
pub fn next_throttle(percent: u32, link_ratio: f64) -> u32 {
    let run = 100 - percent.min(THROTTLE_MAX);
    let stepped = if percent == 0 {
        100 - THROTTLE_INITIAL
    } else {
        run / 2
    };
    let needed = if link_ratio.is_finite() {
        (link_ratio * 50.0).clamp(0.0, 100.0) as u32
    } else {
        100
    };
    (100 - stepped.min(needed)).clamp(THROTTLE_INITIAL, THROTTLE_MAX)
}

/// A pause long enough to read, in whole milliseconds and a fraction.
pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);
    const BUDGET: Duration = Duration::from_millis(50);

    /// `bytes` at 1 MB/s (1000 bytes a millisecond), with `fixed_ms` of fixed costs.
    fn at(bytes: u64, fixed_ms: u32) -> Estimate {
        Estimate::new(bytes, 1e6, fixed_ms * MS)
    }

    #[test]
    fn each_throttle_step_halves_the_guests_share_or_cuts_it_to_what_the_link_carries() {
        // A guest dirtying just over half as fast as the link carries (throttling starts
        // there): steps of a half.
        let mut steps = vec![];
        let mut p = 0;
        while p < THROTTLE_MAX {
            p = next_throttle(p, 1.9);
            steps.push(p);
        }
        assert_eq!(steps, [20, 60, 80, 90, 95, 98, 99]);
        assert_eq!(next_throttle(99, 1.9), 99);
        // Two thirds as fast: a 75% share makes it dirty half of what the link carries.
        assert_eq!(next_throttle(0, 1.5), 25);
        // Seen dirtying 12 times faster than the link: a 4% share (half of 1/12) at once.
        assert_eq!(next_throttle(0, 1.0 / 12.0), 96);
        assert_eq!(next_throttle(96, 1.0 / 12.0), 98);
        // Far faster still: the ceiling, no further.
        assert_eq!(next_throttle(0, 1e-4), 99);
        // No rate measured (a division by zero upstream): the step alone.
        assert_eq!(next_throttle(0, f64::INFINITY), 20);
        assert_eq!(next_throttle(60, f64::NAN), 80);
    }

    #[test]
    fn the_estimate_adds_the_fixed_costs_to_the_bytes_time() {
        let e = at(20_000, 15);
        assert_eq!(e.bytes_time, 20 * MS);
        assert_eq!(e.downtime(), 35 * MS);
    }

    #[test]
    fn it_stops_when_bytes_and_fixed_costs_fit_the_budget() {
        assert_eq!(
            decide(at(30_000, 20), None, BUDGET, 1),
            Decision::StopAndCopy
        );
        assert_eq!(decide(at(31_000, 20), None, BUDGET, 1), Decision::Continue);
    }

    #[test]
    fn fixed_costs_count_against_the_budget_while_rounds_still_shrink_the_bytes() {
        // 40 ms of bytes alone would have fit; with 20 ms fixed it does not, and the
        // bytes are still shrinking fast: another round.
        let previous = at(100_000, 20);
        assert_eq!(
            decide(at(40_000, 20), Some(previous), BUDGET, 2),
            Decision::Continue
        );
    }

    #[test]
    fn fixed_costs_over_the_budget_still_converge_once_the_bytes_stop_shrinking() {
        // 80 ms fixed: the budget cannot be met. Bytes that fit and no longer shrink (or
        // nothing left at all) stop pre-copy rather than run into MAX_ROUNDS.
        let previous = at(10_000, 80);
        assert_eq!(
            decide(at(9_000, 80), Some(previous), BUDGET, 2),
            Decision::StopAndCopy
        );
        assert_eq!(decide(at(0, 80), None, BUDGET, 1), Decision::StopAndCopy);
        // Still shrinking by more than a quarter: one more round may help.
        assert_eq!(
            decide(at(5_000, 80), Some(previous), BUDGET, 2),
            Decision::Continue
        );
        // Stalled, but the bytes alone are over the budget: not converged yet.
        let big = at(200_000, 80);
        assert_eq!(decide(big, Some(big), BUDGET, 2), Decision::Continue);
    }

    #[test]
    fn the_wire_share_comes_from_the_last_round_when_it_carried_enough() {
        let total = (10 << 20, 5 << 20);
        assert_eq!(wire_share((1 << 20, 1 << 18), total), 0.25);
        // Too little in the last round to tell: everything so far.
        assert_eq!(wire_share((4096, 4096), total), 0.5);
        // Nothing compressed yet (or a version 1 peer): as it is.
        assert_eq!(wire_share((0, 0), (0, 0)), 1.0);
        // LZ4 can grow incompressible data a little; the estimate never counts it smaller
        // than nothing or larger than raw.
        assert_eq!(wire_share((1 << 20, (1 << 20) + 100), total), 1.0);
    }

    #[test]
    fn after_max_rounds_it_stops_if_the_bytes_fit_else_gives_up() {
        let e = at(40_000, 80);
        assert_eq!(
            decide(e, None, BUDGET, MAX_ROUNDS + 1),
            Decision::StopAndCopy
        );
        let e = at(60_000, 0);
        assert_eq!(decide(e, None, BUDGET, MAX_ROUNDS), Decision::Continue);
        assert_eq!(decide(e, None, BUDGET, MAX_ROUNDS + 1), Decision::GiveUp);
    }
}
