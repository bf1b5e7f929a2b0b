//! The source's migration thread: dials the destination, runs pre-copy rounds while the
//! guest runs, asks the VMM thread to pause for stop-and-copy, and reports how it ended
//! (the order is in the parent module).

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::mpsc::{self, channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::virtio::{set_bits, DiskDirty};
use p2p::wire::{MigrationConfig, Sender, BLOCK_SIZE, PAGE_SIZE};
use p2p::{Endpoint, Identity};
use snapshot::{MachineConfig, VmState};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::stream::{runtime, StreamReader, StreamWriter};
use super::{
    decide, Decision, Estimate, MigrationError, Progress, Report, RoundReport, ToVmm, COMMIT_WAIT,
    CONNECT_TIMEOUT,
};
use crate::api::{Converge, MigrateRequest};
use crate::dirty::{merge, DirtyRegion};
use crate::laps::Laps;
use crate::vm::Vm;

/// Pages read from guest memory at once in round 0.
const CHUNK_PAGES: usize = 256;
/// The slowest link the convergence estimate assumes, bytes per second: before any
/// measurement, and to keep a stalled measurement from dividing by zero.
const MIN_BANDWIDTH: f64 = 1e6;
/// Auto-converge: pre-copy rounds before throttling may start. It starts when sending what
/// is dirty would alone take longer than the budget and the guest dirtied more than half
/// as fast as the link carried the last round, and tightens after each such round
/// (`super::next_throttle`, from the fastest dirtying seen). Round 0 is the longest round
/// and left what it found dirtied again to round 1 (see [`REFRESH`]): what is pending
/// after it is the working set, and a guest that outran the link all through round 0
/// will outrun it in round 1 too. Measured in the rig (dirty 64 MiB, 512 MiB guest): with
/// throttling from round 2, round 1 sent 42 MB of a 67 MB working set that round 2 sent
/// again.
const THROTTLE_AFTER_ROUNDS: u32 = 1;
/// How long the paused source waits for Ready: the data still queued has to arrive and
/// the destination build the VM first, on a link that may have slowed down since the
/// estimate.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long after Commit's acknowledgement the source waits to see the destination's
/// guest running (the end of its stream), which is where the downtime ends.
const RESUME_WAIT: Duration = Duration::from_secs(1);
/// How long to let queued data drain before deciding a round, at most.
const DRAIN_WAIT: Duration = Duration::from_secs(2);
/// How often a pre-copy round takes the dirty log again while it sends. A page or block
/// dirtied again before the round reaches it is left to the next round, which sends it
/// anyway: a working set the guest rewrites faster than a round lasts then crosses the
/// link once a round, not twice (in the rig, dirtying 64 MiB, round 0 sent the working
/// set and round 1 sent it again). Each take write-protects what the guest dirtied, and
/// its next write to each such page faults: more often would slow the guest for little.
const REFRESH: Duration = Duration::from_secs(1);
/// Pages or blocks a round sends between two looks at the clock for [`REFRESH`].
const REFRESH_CHECK: usize = 64;

/// The downtime no pre-copy round makes smaller, from what the source can measure:
/// - two round trips at the connection's `rtt` (quinn's smoothed estimate, which includes
///   the time data waits in the peer's buffers): the last bytes reach the destination
///   half a round trip after they leave, Ready takes another half back, and Commit and
///   its acknowledgement a whole one;
/// - the time the VMM thread took to answer the last Collect (`collect`), as the cost of
///   reaching it with the Pause and taking the last dirty log. Reading the state, sending
///   it and the destination's last build phase are not measured before the pause and
///   not counted: the estimate is a lower bound.
fn fixed_costs(rtt: Duration, collect: Duration) -> Duration {
    2 * rtt + collect
}

/// One drive as the migration thread reads it.
struct Disk {
    id: String,
    path: PathBuf,
    file: File,
    size: u64,
    dirty: Arc<DiskDirty>,
}

/// What the migration thread works with; nothing of it needs the VMM thread.
struct Source {
    request: MigrateRequest,
    machine: MachineConfig,
    regions: Vec<(u64, u64)>,
    mem: devices::GuestMemoryMmap,
    disks: Vec<Disk>,
    to_vmm: mpsc::Sender<ToVmm>,
    wake: EventFd,
    started: Instant,
    progress: Arc<Mutex<Progress>>,
    /// `HOSPES_FAULT=corrupt-frame` in the environment: corrupt one frame (tests).
    corrupt: bool,
    /// `HOSPES_FAULT=commit-unacked` in the environment: once Commit is acknowledged, act
    /// as if the acknowledgement had been lost (tests of the in-doubt path).
    commit_unacked: bool,
}

/// Starts migrating `vm` as `request` says; the VMM thread receives the thread's requests
/// on the returned channel, each announced on `wake`, and can read its progress.
pub(crate) fn start(
    vm: &Vm,
    request: MigrateRequest,
    wake: EventFd,
) -> Result<(Receiver<ToVmm>, Arc<Mutex<Progress>>), MigrationError> {
    let mut disks = Vec::new();
    for ((drive, path), dirty) in vm
        .config
        .drives
        .iter()
        .zip(&vm.drive_paths)
        .zip(&vm.disk_dirty)
    {
        let disk_err = |source| MigrationError::Disk {
            id: drive.id.clone(),
            path: path.clone(),
            source,
        };
        let file = File::open(path).map_err(disk_err)?;
        let size = file.metadata().map_err(disk_err)?.len();
        if size != drive.size {
            return Err(MigrationError::Unacceptable(format!(
                "drive {} is {size} bytes now, {} when the VM started",
                drive.id, drive.size
            )));
        }
        disks.push(Disk {
            id: drive.id.clone(),
            path: path.clone(),
            file,
            size,
            dirty: dirty.clone(),
        });
    }
    let (to_vmm, requests) = channel();
    let progress = Arc::new(Mutex::new(Progress {
        phase: "connecting",
        ..Progress::default()
    }));
    let fault = std::env::var("HOSPES_FAULT").unwrap_or_default();
    let corrupt = fault == "corrupt-frame";
    let commit_unacked = fault == "commit-unacked";
    if corrupt || commit_unacked {
        tracing::warn!("HOSPES_FAULT={fault}: this migration fails on purpose");
    }
    let source = Source {
        request,
        machine: vm.config.clone(),
        regions: vm.mem.iter().map(|r| (r.start_addr().0, r.len())).collect(),
        mem: vm.mem.clone(),
        disks,
        to_vmm,
        wake,
        started: Instant::now(),
        progress: progress.clone(),
        corrupt,
        commit_unacked,
    };
    std::thread::Builder::new()
        .name("migration".into())
        .spawn(move || {
            let result = source.run();
            if let Err(e) = &result {
                tracing::warn!("migration to {} failed: {e}", source.request.to);
            }
            source.tell(ToVmm::Finished(result));
        })
        .map_err(|e| MigrationError::Vmm(format!("cannot start the migration thread: {e}")))?;
    Ok((requests, progress))
}

/// Dirty pages and blocks waiting to be sent.
#[derive(Default)]
struct Pending {
    /// Per memory region, its dirty bitmap (empty: none).
    pages: Vec<DirtyRegion>,
    /// Per disk, its dirty-block bitmap.
    blocks: Vec<Vec<u64>>,
}

impl Pending {
    /// Adds a dirty log's pages; returns how many bytes that log counted.
    fn add_pages(&mut self, regions: Vec<DirtyRegion>) -> u64 {
        let bytes = regions.iter().map(DirtyRegion::count).sum::<u64>() * PAGE_SIZE as u64;
        if self.pages.is_empty() {
            self.pages = regions;
        } else {
            for (into, from) in self.pages.iter_mut().zip(regions) {
                merge(&mut into.bitmap, &from.bitmap);
            }
        }
        bytes
    }

    /// Takes the disks' dirty blocks; returns how many bytes they counted.
    fn add_blocks(&mut self, disks: &[Disk]) -> u64 {
        let taken: Vec<Vec<u64>> = disks.iter().map(|d| d.dirty.take()).collect();
        let bytes = block_bytes(&taken);
        if self.blocks.is_empty() {
            self.blocks = taken;
        } else {
            for (into, from) in self.blocks.iter_mut().zip(taken) {
                merge(into, &from);
            }
        }
        bytes
    }

    /// Whether the page at `gpa` is in here.
    fn has_page(&self, gpa: u64) -> bool {
        self.pages
            .iter()
            .find(|r| gpa >= r.gpa && gpa - r.gpa < r.size)
            .is_some_and(|r| bit(&r.bitmap, (gpa - r.gpa) / PAGE_SIZE as u64))
    }

    /// Whether block `index` of disk `disk` is in here.
    fn has_block(&self, disk: usize, index: u64) -> bool {
        self.blocks.get(disk).is_some_and(|b| bit(b, index))
    }

    fn bytes(&self) -> u64 {
        let pages: u64 = self.pages.iter().map(DirtyRegion::count).sum();
        pages * PAGE_SIZE as u64 + block_bytes(&self.blocks)
    }
}

/// The bytes of the blocks set in per-disk bitmaps.
fn block_bytes(bitmaps: &[Vec<u64>]) -> u64 {
    let blocks: u64 = bitmaps
        .iter()
        .flatten()
        .map(|w| u64::from(w.count_ones()))
        .sum();
    blocks * BLOCK_SIZE as u64
}

fn bit(bitmap: &[u64], i: u64) -> bool {
    bitmap
        .get((i / 64) as usize)
        .is_some_and(|w| w & (1 << (i % 64)) != 0)
}

/// What the next round will send, kept current while a round runs (see [`REFRESH`]).
struct Ahead {
    /// Dirtied since the current round began.
    pending: Pending,
    /// When `pending` was last emptied: the start of the interval it covers.
    since: Instant,
    /// When the dirty log was last taken.
    collected: Instant,
    /// The fastest the guest was seen dirtying between two takes, bytes a second.
    peak_rate: f64,
    /// Bytes of pages and blocks the current round left to the next one.
    skipped: u64,
    /// Pages and blocks looked up so far (the clock is read every [`REFRESH_CHECK`]).
    checks: usize,
}

impl Ahead {
    fn new() -> Ahead {
        let now = Instant::now();
        Ahead {
            pending: Pending::default(),
            since: now,
            collected: now,
            peak_rate: 0.0,
            skipped: 0,
            checks: 0,
        }
    }

    /// Empties `pending` for the next round and returns what it held.
    fn take(&mut self) -> Pending {
        self.since = Instant::now();
        self.skipped = 0;
        std::mem::take(&mut self.pending)
    }
}

impl Source {
    /// Updates the progress the API shows.
    fn progress(&self, update: impl FnOnce(&mut Progress)) {
        let mut p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        update(&mut p);
        p.elapsed_ms = super::ms(self.started.elapsed());
    }

    fn tell(&self, message: ToVmm) {
        if self.to_vmm.send(message).is_ok() {
            let _ = self.wake.write(1);
        }
    }

    /// Asks the VMM thread something and waits for the answer.
    fn ask<T>(
        &self,
        make: impl FnOnce(mpsc::Sender<Result<T, String>>) -> ToVmm,
    ) -> Result<T, MigrationError> {
        let (tx, rx) = channel();
        self.tell(make(tx));
        rx.recv()
            .map_err(|_| MigrationError::Vmm("the VMM thread did not answer".into()))?
            .map_err(MigrationError::Vmm)
    }

    fn run(&self) -> Result<Report, MigrationError> {
        let path = &self.request.identity;
        let identity = Identity::load(path).map_err(|source| MigrationError::Identity {
            path: path.clone(),
            source,
        })?;
        let rt = runtime()?;
        let (to, peer) = (self.request.to, self.request.peer);
        let (endpoint, conn) = rt.block_on(async {
            let endpoint = Endpoint::client(&identity)?;
            let conn = tokio::time::timeout(CONNECT_TIMEOUT, endpoint.connect(to, peer))
                .await
                .map_err(|_| MigrationError::Timeout {
                    what: "connecting to the destination",
                    waited: CONNECT_TIMEOUT,
                })??;
            let (send, recv) = conn
                .open_bi()
                .await
                .map_err(|e| MigrationError::Connection {
                    peer: to,
                    reason: e.to_string(),
                })?;
            Ok::<_, MigrationError>((endpoint, (conn, send, recv)))
        })?;
        let (conn, send, recv) = conn;
        tracing::info!("migrating to peer {peer} at {to}");
        let mut out = StreamWriter::new(rt.handle().clone(), send);
        out.corrupt = self.corrupt;
        let mut input = StreamReader {
            rt: rt.handle().clone(),
            stream: recv,
            timeout: super::IO_TIMEOUT,
        };
        let config = MigrationConfig::new(self.machine.clone(), self.regions.clone())?;
        let mut sender = Sender::new(config)?;
        let result = self.migrate(&mut sender, &mut out, &mut input, &conn);
        match &result {
            Ok(_) => conn.close(0u32.into(), b"migrated"),
            // Commit may have arrived: nothing may tell the destination otherwise.
            Err(MigrationError::InDoubt(_)) => conn.close(2u32.into(), b"outcome unknown"),
            Err(e) => {
                // Best effort: the destination may be gone already.
                let _ = sender.abort(&mut out, &e.to_string());
                let _ = out.stream.finish();
                rt.block_on(async {
                    let _ = tokio::time::timeout(Duration::from_millis(500), conn.closed()).await;
                });
                conn.close(1u32.into(), b"migration failed");
            }
        }
        // Let the close reach the destination, which winds the connection down after Commit.
        rt.block_on(endpoint.wait_idle(Duration::from_secs(1)));
        result
    }

    fn migrate(
        &self,
        sender: &mut Sender,
        out: &mut StreamWriter,
        input: &mut StreamReader,
        conn: &quinn::Connection,
    ) -> Result<Report, MigrationError> {
        let budget = Duration::from_millis(self.request.downtime_ms);
        self.progress(|p| p.phase = "precopy");
        sender.hello(out)?;
        let version = sender.read_ack(input)?;
        // The State's encoder, run once now on a stand-in rather than for the first time
        // inside the guest's pause (see `snapshot::rehearse`).
        let stand_in = VmState::stand_in(self.machine.clone(), self.regions.clone());
        if let Err(e) = snapshot::encode_as(&stand_in, p2p::wire::state_format(version)) {
            tracing::debug!("encoding a stand-in state: {e}");
        }
        tracing::info!(
            "destination speaks protocol version {version}: pages and blocks travel {}",
            if version >= 2 {
                "LZ4-compressed where that saves space"
            } else {
                "uncompressed"
            }
        );
        let udp_start = conn.stats().udp_tx.bytes;
        let precopy_start = Instant::now();
        // Bytes per second actually leaving through the socket since the Hello, and what
        // is written to the stream but still queued.
        let bandwidth = || {
            let sent = conn.stats().udp_tx.bytes.saturating_sub(udp_start) as f64;
            (sent / precopy_start.elapsed().as_secs_f64().max(1e-3)).max(MIN_BANDWIDTH)
        };
        let queued = |out: &StreamWriter| {
            let sent = conn.stats().udp_tx.bytes.saturating_sub(udp_start);
            out.bytes.saturating_sub(sent)
        };
        let mut per_round = Vec::new();
        // Sends one round with `send`, and records what it carried (logged by the caller:
        // not inside the pause for the last one).
        let round =
            |per_round: &mut Vec<RoundReport>,
             sender: &mut Sender,
             out: &mut StreamWriter,
             send: &mut dyn FnMut(&mut Sender, &mut StreamWriter) -> Result<(), MigrationError>|
             -> Result<(), MigrationError> {
                let (start, bytes) = (Instant::now(), out.bytes);
                send(sender, out)?;
                let stats = sender.end_round(out)?;
                per_round.push(RoundReport {
                    round: stats.round,
                    pages: stats.pages,
                    blocks: stats.blocks,
                    bytes: out.bytes - bytes,
                    ms: super::ms(start.elapsed()),
                });
                Ok(())
            };
        let logged = |per_round: &[RoundReport]| {
            if let Some(r) = per_round.last() {
                tracing::info!(
                    "round {}: {} pages, {} blocks, {} bytes",
                    r.round,
                    r.pages,
                    r.blocks,
                    r.bytes
                );
            }
        };

        // Step 2: tracking on, then round 0 reads everything.
        self.ask(ToVmm::StartDirty)?;
        for disk in &self.disks {
            disk.dirty.take();
        }
        let mut ahead = Ahead::new();
        round(&mut per_round, sender, out, &mut |s, o| {
            self.send_everything(s, o, &mut ahead)
        })?;
        logged(&per_round);

        let mut data_mark = sender.data_bytes();
        let mut throttle = 0;
        // The fastest the guest was seen dirtying, in bytes on the wire a second.
        let mut peak_wire_rate: f64 = 0.0;
        let mut previous = None;
        let expected;
        loop {
            // Let what was sent be written at the destination first: data sent but not yet
            // written there is part of the downtime otherwise, and a queue the estimate
            // cannot see (the destination's socket and stream buffers, its CPU). A version
            // 1 destination does not say when it has written a round: then wait only for
            // most of what is queued here to leave.
            let waiting = Instant::now();
            let last = per_round.len() as u32 - 1;
            if ahead.skipped > 0 {
                tracing::info!(
                    "round {last} left {} bytes dirtied again meanwhile to the next round",
                    ahead.skipped
                );
            }
            out.flush().map_err(p2p::wire::WireError::from)?;
            sender.wait_applied(input, last)?;
            while queued(out) as f64 > bandwidth() * budget.as_secs_f64() / 2.0
                && waiting.elapsed() < DRAIN_WAIT
            {
                std::thread::sleep(Duration::from_millis(2));
            }
            tracing::debug!(
                "round {last} written at the destination after {:.1} ms",
                super::ms(waiting.elapsed())
            );
            let collect_time = self.take_dirty(&mut ahead)?;
            let pending = &ahead.pending;
            // What the next round must send, per second of this one.
            let dirty_rate = pending.bytes() as f64 / ahead.since.elapsed().as_secs_f64().max(1e-3);
            let bw = bandwidth();
            let data = sender.data_bytes();
            let last_round = (data.0 - data_mark.0, data.1 - data_mark.1);
            data_mark = data;
            let share = super::wire_share(last_round, data);
            peak_wire_rate = peak_wire_rate.max(dirty_rate.max(ahead.peak_rate) * share);
            let left = (pending.bytes() as f64 * share) as u64 + queued(out);
            let fixed = fixed_costs(conn.rtt(), collect_time);
            let estimate = Estimate::new(left, bw, fixed);
            let rounds = per_round.len() as u32;
            self.progress(|p| {
                p.round = rounds;
                p.bytes = out.bytes;
                p.bandwidth_bytes_per_s = bw as u64;
                p.dirty_bytes_per_s = dirty_rate as u64;
                p.remaining_bytes = left;
                p.expected_downtime_ms = super::ms(estimate.downtime());
            });
            let decision = decide(estimate, previous, budget, rounds);
            tracing::info!(
                "after round {}: {left} bytes to go ({} dirty, {share:.2} of it on the wire) \
                 at {:.1} MB/s (dirtied at {:.1} MB/s): {:.1} ms + fixed {:.1} ms \
                 (RTT {:.1} ms, Collect {:.1} ms): {decision:?}",
                rounds - 1,
                pending.bytes(),
                bw / 1e6,
                dirty_rate / 1e6,
                super::ms(estimate.bytes_time),
                super::ms(fixed),
                super::ms(conn.rtt()),
                super::ms(collect_time),
            );
            match decision {
                Decision::StopAndCopy => {
                    expected = estimate;
                    break;
                }
                Decision::GiveUp => {
                    return Err(MigrationError::NotConverged {
                        rounds,
                        pending: left,
                        bandwidth: bw as u64,
                        estimate: estimate.downtime(),
                        budget,
                    })
                }
                Decision::Continue => previous = Some(estimate),
            }
            // Throttling helps only where the dirty bytes are what is over the budget, not
            // the fixed costs (an idle guest's last rounds), and the guest dirties them
            // faster than the link can empty them.
            if self.request.converge == Converge::Throttle
                && rounds >= THROTTLE_AFTER_ROUNDS
                && estimate.bytes_time > budget
                && dirty_rate > bw / 2.0
                && throttle < super::THROTTLE_MAX
            {
                throttle = super::next_throttle(throttle, bw / peak_wire_rate);
                tracing::info!(
                    "auto-converge: vCPUs throttled to {throttle}% off (the guest dirtied \
                     up to {:.1} MB/s on the wire)",
                    peak_wire_rate / 1e6
                );
                self.ask(|answer| ToVmm::Throttle(throttle, answer))?;
                self.progress(|p| p.throttle_percent = throttle);
            }
            let taken = ahead.take();
            round(&mut per_round, sender, out, &mut |s, o| {
                self.send_pending(s, o, &taken, Some(&mut ahead))
            })?;
            logged(&per_round);
        }

        // Step 5: stop-and-copy.
        let bandwidth = bandwidth() as u64;
        self.progress(|p| p.phase = "stop-and-copy");
        let paused = Instant::now();
        let mut laps = Laps::start();
        let (dirty_tx, dirty_rx) = channel();
        let (state_tx, state_rx) = channel();
        self.tell(ToVmm::Pause {
            dirty: dirty_tx,
            state: state_tx,
        });
        let gone = || MigrationError::Vmm("the VMM thread did not answer".into());
        let last = dirty_rx
            .recv()
            .map_err(|_| gone())?
            .map_err(MigrationError::Vmm)?;
        laps.lap("pause+dirty log (VMM thread)");
        let pending = &mut ahead.pending;
        pending.add_pages(last);
        pending.add_blocks(&self.disks);
        let before = out.bytes;
        // The VMM thread reads the state meanwhile.
        round(&mut per_round, sender, out, &mut |s, o| {
            self.send_pending(s, o, pending, None)
        })?;
        laps.lap("last round");
        let last_round_bytes = out.bytes - before;
        let state = state_rx
            .recv()
            .map_err(|_| gone())?
            .map_err(MigrationError::Vmm)?;
        laps.lap("rest of the capture");
        sender.state(out, &state)?;
        laps.lap("state");
        sender.done(out)?;
        laps.lap("done");
        let state_bytes = out.bytes - before - last_round_bytes;
        // Step 6: the destination has everything and has built the VM. What is still
        // queued has to reach it first, at whatever the link does now.
        input.timeout = READY_TIMEOUT;
        sender.read_ready(input)?;
        laps.lap("wait for Ready");
        // Step 7, the point of no return. A Commit that could not even be written never
        // reaches the destination (a partial frame is discarded there): the guest may
        // still resume here. Once written, only its acknowledgement tells.
        self.progress(|p| p.phase = "commit");
        let committing = Instant::now();
        sender.commit(out)?;
        let confirmed = out.confirm(input, COMMIT_WAIT, RESUME_WAIT);
        if self.commit_unacked {
            return Err(MigrationError::InDoubt(format!(
                "HOSPES_FAULT=commit-unacked: the acknowledgement of Commit ({confirmed:?}) is taken as lost"
            )));
        }
        let tail = confirmed.map_err(MigrationError::InDoubt)?;
        let now = Instant::now();
        // The downtime ends where the destination's guest resumed: the end of its stream,
        // seen here, less how long the guest had run when it sent Running before that end
        // (version 3 on). That end cannot arrive before it was sent, so this is an upper
        // bound; without Running it is the end itself, a looser one.
        let ran = match &tail {
            Some(tail) => sender.running(tail, now - committing).unwrap_or_else(|e| {
                tracing::warn!(
                    "the destination's word on when its guest resumed is not usable ({e}): \
                         the downtime counts to the end of its stream"
                );
                None
            }),
            None => None,
        };
        let downtime = (now - paused).saturating_sub(ran.unwrap_or_default());
        if tail.is_some() {
            laps.lap("Commit to destination resumed");
        } else {
            laps.lap("Commit acknowledged");
            tracing::warn!(
                "the destination did not report its guest running within {RESUME_WAIT:?} \
                 of acknowledging Commit: the downtime counts to that acknowledgement"
            );
        }
        tracing::info!(
            "stop-and-copy: {laps}; downtime {:.1} ms (the guest had run {:.1} ms on the \
             destination when it ended its stream); last round {last_round_bytes} bytes, state \
             {state_bytes} bytes, RTT {:.1} ms; expected {:.1} ms ({:.1} ms of it fixed)",
            super::ms(downtime),
            super::ms(ran.unwrap_or_default()),
            super::ms(conn.rtt()),
            super::ms(expected.downtime()),
            super::ms(expected.fixed),
        );
        logged(&per_round);
        let (raw, sent) = sender.data_bytes();
        tracing::info!(
            "pages and blocks: {raw} bytes, {sent} on the wire ({:.2}x)",
            raw as f64 / sent.max(1) as f64
        );
        Ok(Report {
            rounds: per_round.len() as u32,
            total: self.started.elapsed(),
            downtime,
            bytes: out.bytes,
            pages: per_round.iter().map(|r| r.pages).sum(),
            blocks: per_round.iter().map(|r| r.blocks).sum(),
            bandwidth,
            per_round,
            throttle_percent: throttle,
        })
    }

    /// Round 0: every page and every block (the Sender drops the zero ones), except what
    /// was dirtied again before the round reached it.
    fn send_everything(
        &self,
        sender: &mut Sender,
        out: &mut StreamWriter,
        ahead: &mut Ahead,
    ) -> Result<(), MigrationError> {
        let mut buf = vec![0u8; CHUNK_PAGES * PAGE_SIZE];
        for &(gpa, size) in &self.regions {
            for (start, len) in self.populated(gpa, size) {
                let end = start + len;
                let mut at = start;
                while at < end {
                    let len = (end - at).min(buf.len() as u64) as usize;
                    self.read_memory(gpa + at, &mut buf[..len])?;
                    for (i, page) in buf[..len].chunks(PAGE_SIZE).enumerate() {
                        let page_gpa = gpa + at + (i * PAGE_SIZE) as u64;
                        if !self.dirtied_again(Some(ahead), PAGE_SIZE, |p| p.has_page(page_gpa))? {
                            sender.page(out, page_gpa, page)?;
                        }
                    }
                    at += len as u64;
                }
            }
        }
        for (index, disk) in self.disks.iter().enumerate() {
            let mut block = 0u64;
            while block * (BLOCK_SIZE as u64) < disk.size {
                let offset = block * BLOCK_SIZE as u64;
                let len = (disk.size - offset).min(buf.len() as u64) as usize;
                self.read_disk(disk, offset, &mut buf[..len])?;
                for data in buf[..len].chunks(BLOCK_SIZE) {
                    if !self
                        .dirtied_again(Some(ahead), BLOCK_SIZE, |p| p.has_block(index, block))?
                    {
                        sender.block(out, index as u16, block, data)?;
                    }
                    block += 1;
                }
            }
        }
        Ok(())
    }

    /// A later round: the pages and blocks in `pending`, except, while the guest runs
    /// (`ahead`), what was dirtied again before the round reached it.
    fn send_pending(
        &self,
        sender: &mut Sender,
        out: &mut StreamWriter,
        pending: &Pending,
        mut ahead: Option<&mut Ahead>,
    ) -> Result<(), MigrationError> {
        let mut page = vec![0u8; PAGE_SIZE];
        for region in &pending.pages {
            for gpa in region.pages() {
                if self.dirtied_again(ahead.as_deref_mut(), PAGE_SIZE, |p| p.has_page(gpa))? {
                    continue;
                }
                self.read_memory(gpa, &mut page)?;
                sender.page(out, gpa, &page)?;
            }
        }
        for (index, (disk, bitmap)) in self.disks.iter().zip(&pending.blocks).enumerate() {
            for block in set_bits(bitmap) {
                let offset = block * BLOCK_SIZE as u64;
                if offset >= disk.size {
                    break;
                }
                if self.dirtied_again(ahead.as_deref_mut(), BLOCK_SIZE, |p| {
                    p.has_block(index, block)
                })? {
                    continue;
                }
                let len = (disk.size - offset).min(BLOCK_SIZE as u64) as usize;
                self.read_disk(disk, offset, &mut page[..len])?;
                sender.block(out, index as u16, block, &page[..len])?;
            }
        }
        Ok(())
    }

    /// Takes the dirty log and the disks' dirty blocks into `ahead`; returns how long the
    /// VMM thread took to answer.
    fn take_dirty(&self, ahead: &mut Ahead) -> Result<Duration, MigrationError> {
        let asked = Instant::now();
        let pages = ahead.pending.add_pages(self.ask(ToVmm::Collect)?);
        let answered = asked.elapsed();
        let bytes = pages + ahead.pending.add_blocks(&self.disks);
        let interval = ahead.collected.elapsed();
        ahead.collected = Instant::now();
        // A short interval (the end of a round just after a refresh) is too noisy a rate.
        if interval >= REFRESH / 2 {
            ahead.peak_rate = ahead.peak_rate.max(bytes as f64 / interval.as_secs_f64());
        }
        Ok(answered)
    }

    /// Whether the round leaves a page or block of `bytes` to the next round because it
    /// was dirtied again since the round began (`lookup` finds it in what is pending); the
    /// dirty log is taken again first once [`REFRESH`] has passed. Never while the guest
    /// is paused (`ahead` is `None`): stop-and-copy sends everything.
    fn dirtied_again(
        &self,
        ahead: Option<&mut Ahead>,
        bytes: usize,
        lookup: impl FnOnce(&Pending) -> bool,
    ) -> Result<bool, MigrationError> {
        let Some(ahead) = ahead else {
            return Ok(false);
        };
        ahead.checks += 1;
        if ahead.checks % REFRESH_CHECK == 0 && ahead.collected.elapsed() >= REFRESH {
            self.take_dirty(ahead)?;
        }
        let again = lookup(&ahead.pending);
        if again {
            ahead.skipped += bytes as u64;
        }
        Ok(again)
    }

    /// The page-aligned ranges `(offset, len)` of the region at `gpa` that round 0 must
    /// read: those ever populated. The rest of guest RAM was never touched, reads as
    /// zeroes, and the destination's RAM starts zeroed: scanning it (three quarters of an
    /// idle 512 MiB guest, measured in the rig) would only cost time. Dirty tracking is
    /// on before this is asked, so a page populated after the answer is in a later round.
    fn populated(&self, gpa: u64, size: u64) -> Vec<(u64, u64)> {
        let Ok(host) = self.mem.get_host_address(GuestAddress(gpa)) else {
            return vec![(0, size)];
        };
        crate::memory::populated_or_all(host, size as usize)
            .into_iter()
            .map(|(at, len)| (at as u64, len as u64))
            .collect()
    }

    fn read_memory(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MigrationError> {
        self.mem
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|e| MigrationError::Memory {
                gpa,
                reason: e.to_string(),
            })
    }

    fn read_disk(&self, disk: &Disk, offset: u64, buf: &mut [u8]) -> Result<(), MigrationError> {
        disk.file
            .read_exact_at(buf, offset)
            .map_err(|source| MigrationError::Disk {
                id: disk.id.clone(),
                path: disk.path.clone(),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_pages_accumulate_across_collections() {
        let region = |bitmap: Vec<u64>| DirtyRegion {
            gpa: 0,
            size: 128 * PAGE_SIZE as u64,
            bitmap,
        };
        let mut pending = Pending::default();
        pending.add_pages(vec![region(vec![0b1, 0])]);
        pending.add_pages(vec![region(vec![0b11, 1 << 63])]);
        assert_eq!(pending.pages[0].bitmap, vec![0b11, 1 << 63]);
        assert_eq!(pending.bytes(), 3 * PAGE_SIZE as u64);
    }

    #[test]
    fn a_page_or_block_dirtied_again_is_found_where_it_lives() {
        let mut pending = Pending::default();
        let low = DirtyRegion {
            gpa: 0,
            size: 128 * PAGE_SIZE as u64,
            bitmap: vec![0b10, 0],
        };
        let high = DirtyRegion {
            gpa: 1 << 32,
            size: 64 * PAGE_SIZE as u64,
            bitmap: vec![1 << 63],
        };
        let bytes = pending.add_pages(vec![low, high]);
        assert_eq!(bytes, 2 * PAGE_SIZE as u64);
        assert!(pending.has_page(PAGE_SIZE as u64));
        assert!(!pending.has_page(0));
        assert!(pending.has_page((1 << 32) + 63 * PAGE_SIZE as u64));
        assert!(!pending.has_page((1 << 32) + 64 * PAGE_SIZE as u64));
        // Between the regions, and with no regions at all.
        assert!(!pending.has_page(1 << 31));
        assert!(!Pending::default().has_page(PAGE_SIZE as u64));
        pending.blocks = vec![vec![0], vec![1 << 5]];
        assert!(pending.has_block(1, 5));
        assert!(!pending.has_block(0, 5));
        assert!(!pending.has_block(1, 64));
        assert!(!pending.has_block(2, 5));
    }

    #[test]
    fn pending_blocks_take_the_disks_bitmaps() {
        let dirty = Arc::new(DiskDirty::new(64 * BLOCK_SIZE as u64));
        let disk = Disk {
            id: "d".into(),
            path: "/dev/null".into(),
            file: File::open("/dev/null").unwrap(),
            size: 64 * BLOCK_SIZE as u64,
            dirty: dirty.clone(),
        };
        let mut pending = Pending::default();
        dirty.mark(0, 1);
        assert_eq!(
            pending.add_blocks(std::slice::from_ref(&disk)),
            BLOCK_SIZE as u64
        );
        dirty.mark(5 * BLOCK_SIZE as u64, 1);
        pending.add_blocks(std::slice::from_ref(&disk));
        assert_eq!(set_bits(&pending.blocks[0]).collect::<Vec<_>>(), vec![0, 5]);
        assert_eq!(pending.bytes(), 2 * BLOCK_SIZE as u64);
        assert!(set_bits(&dirty.take()).next().is_none());
    }
}
