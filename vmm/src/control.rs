//! What control requests do to a running VM, and the run state they move between.
//!
//! States, all handled on the VMM thread, one request at a time:
//!
//! ```text
//!            pause                          snapshot (then=resume)
//!  Running ─────────▶ Paused      Running ─▶ [paused, saving] ─▶ Running
//!          ◀─────────                Paused ─▶ [saving] ─────────▶ Paused
//!            resume               either  ─▶ [saving] ─▶ stopped (then=stop)
//! ```
//!
//! A request that does not fit the state (resume while running, pause while paused) is
//! refused with 409 and changes nothing. A snapshot that fails leaves the VM in the state
//! it found it in, and no snapshot directory behind. While one request is handled the
//! VMM thread processes no device events, so nothing touches guest memory during a
//! snapshot but the snapshot itself.
//!
//! A migration (`PUT /migrate`, see `migration`) is different: its thread works while the
//! VMM thread goes on servicing devices, so its request is answered only when it ends.
//! Meanwhile the VM is `migrating`: pause, resume, snapshot and another migration are
//! refused with 409. The migration thread's requests are handled in
//! [`Control::poll_migration`]; when it pauses the vCPUs for stop-and-copy the VMM
//! thread waits for its end and handles nothing else.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::json;
use vmm_sys_util::eventfd::EventFd;

use crate::api::{ApiRequest, ApiResponse, Then};
use crate::checkpoint;
use crate::dirty::DirtyLog;
use crate::laps::Laps;
use crate::migration::{self, MigrationError, Report, ToVmm};
use crate::vm::{Outcome, Vm};

/// Whether the vCPUs run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RunState {
    Running,
    Paused,
}

impl RunState {
    fn name(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Paused => "paused",
        }
    }
}

/// A migration under way, as the VMM thread sees it.
struct Migration {
    /// The migration thread's requests.
    requests: Receiver<ToVmm>,
    /// Where the API request that started it waits for its answer.
    reply: Sender<ApiResponse>,
    /// Dirty logging, once the migration thread switched it on.
    dirty: Option<DirtyLog>,
    /// Whether the vCPUs are paused for stop-and-copy.
    paused: bool,
    to: std::net::SocketAddr,
    /// What the migration thread reports as it goes.
    progress: Arc<Mutex<migration::Progress>>,
}

/// The control side of one VM.
pub(crate) struct Control {
    state: RunState,
    started: Instant,
    /// Written by a migration thread with each request; the event loop watches it.
    wake: EventFd,
    migration: Option<Migration>,
}

impl Control {
    /// A VM whose vCPUs were just started; `wake` wakes the event loop.
    pub(crate) fn new(wake: EventFd) -> Control {
        Control {
            state: RunState::Running,
            started: Instant::now(),
            wake,
            migration: None,
        }
    }

    /// Answers `request` on `reply` (a migration answers when it ends); `Some(outcome)`
    /// when the VM is to end.
    pub(crate) fn handle_request(
        &mut self,
        vm: &mut Vm,
        request: ApiRequest,
        reply: Sender<ApiResponse>,
    ) -> Option<Outcome> {
        if self.migration.is_some() && request != ApiRequest::Status {
            if request == ApiRequest::Shutdown {
                // The migration thread dies with the process; the destination discards.
                let _ = reply.send(ApiResponse::no_content());
                return Some(Outcome::Shutdown);
            }
            let _ = reply.send(ApiResponse::error(
                409,
                "the VM is migrating; try again when the migration has ended",
            ));
            return None;
        }
        if let ApiRequest::Migrate(request) = request {
            if self.state != RunState::Running {
                let _ = reply.send(ApiResponse::error(
                    409,
                    "the VM is paused; resume it before migrating",
                ));
                return None;
            }
            let wake = match self.wake.try_clone() {
                Ok(w) => w,
                Err(e) => {
                    let _ = reply.send(ApiResponse::error(500, format!("eventfd: {e}")));
                    return None;
                }
            };
            let to = request.to;
            match migration::source::start(vm, request, wake) {
                Ok((requests, progress)) => {
                    tracing::info!("migration to {to} started");
                    self.migration = Some(Migration {
                        requests,
                        progress,
                        reply,
                        dirty: None,
                        paused: false,
                        to,
                    });
                }
                Err(e) => {
                    let _ = reply.send(ApiResponse::error(500, e.to_string()));
                }
            }
            return None;
        }
        let (response, outcome) = self.handle(vm, request);
        let _ = reply.send(response);
        outcome
    }

    /// Serves the migration thread's requests; `Some(outcome)` when the VM has moved.
    pub(crate) fn poll_migration(&mut self, vm: &mut Vm) -> Option<Outcome> {
        let migration = self.migration.as_mut()?;
        loop {
            let message = match migration.requests.try_recv() {
                Ok(message) => message,
                Err(TryRecvError::Empty) => return None,
                Err(TryRecvError::Disconnected) => ToVmm::Finished(Err(MigrationError::Vmm(
                    "the migration thread ended without a word".into(),
                ))),
            };
            match message {
                ToVmm::StartDirty(answer) => {
                    let started = DirtyLog::start(&vm.fd, &vm.mem).map_err(|e| e.to_string());
                    let _ = answer.send(started.map(|log| migration.dirty = Some(log)));
                }
                ToVmm::Collect(answer) => {
                    let _ = answer.send(collect(migration, vm));
                }
                ToVmm::Throttle(percent, answer) => {
                    let _ = answer.send(throttle_all(vm, percent));
                }
                ToVmm::Pause { dirty, state } => {
                    // The last dirty log goes back as soon as the vCPUs are paused, so the
                    // migration thread sends the last pages while the state is read here:
                    // reading it writes no guest memory, and no device runs meanwhile.
                    // Each vCPU thread, awake from its pause, reads its own state while
                    // this one takes the dirty log: on a busy host (the last round keeps
                    // the CPUs busy) a vCPU thread woken only afterwards waited its turn
                    // for up to 18 ms in the rig.
                    let mut laps = Laps::start();
                    let paused = pause_all(vm).map(|()| migration.paused = true);
                    laps.lap("pause vCPUs");
                    let capture = paused
                        .and_then(|()| checkpoint::start_capture(vm).map_err(|e| e.to_string()));
                    let last = match &capture {
                        Ok(_) => collect(migration, vm),
                        Err(e) => Err(e.clone()),
                    };
                    laps.lap("last dirty log");
                    if let (Ok(capture), true) = (capture, dirty.send(last).is_ok()) {
                        let captured = capture.finish(vm, &mut laps).map_err(|e| e.to_string());
                        let _ = state.send(captured);
                    }
                    // Stop-and-copy: nothing but the migration's end until it ends (and no
                    // log line inside the pause: on a loaded host each costs the guest).
                    let end = match migration.requests.recv() {
                        Ok(ToVmm::Finished(result)) => result,
                        Ok(_) => Err(MigrationError::Vmm(
                            "the migration thread asked for more after the pause".into(),
                        )),
                        Err(_) => Err(MigrationError::Vmm(
                            "the migration thread ended without a word".into(),
                        )),
                    };
                    tracing::info!("stop-and-copy, VMM thread: {laps}");
                    return self.end_migration(vm, end);
                }
                ToVmm::Finished(result) => return self.end_migration(vm, result),
            }
        }
    }

    /// The migration ended: on success the VM stops here; on failure it runs on as
    /// before (dirty logging off, vCPUs resumed).
    fn end_migration(
        &mut self,
        vm: &mut Vm,
        result: Result<Report, MigrationError>,
    ) -> Option<Outcome> {
        let migration = self.migration.take()?;
        if result.is_err() {
            // Full speed again, whether the guest resumes or stays paused.
            if let Err(e) = throttle_all(vm, 0) {
                tracing::warn!("ending the auto-converge throttle: {e}");
            }
        }
        match result {
            Ok(report) => {
                tracing::info!(
                    "migrated to {} in {:.1} ms, downtime {:.1} ms",
                    migration.to,
                    migration::ms(report.total),
                    migration::ms(report.downtime)
                );
                let _ = migration.reply.send(ApiResponse::ok(json!({
                    "to": migration.to.to_string(),
                    "rounds": report.rounds,
                    "total_ms": migration::ms(report.total),
                    "downtime_ms": migration::ms(report.downtime),
                    "bytes": report.bytes,
                    "pages": report.pages,
                    "blocks": report.blocks,
                    "bandwidth_bytes_per_s": report.bandwidth,
                    "per_round": report.per_round,
                    "throttle_percent": report.throttle_percent,
                })));
                Some(Outcome::Migrated {
                    to: migration.to.to_string(),
                })
            }
            Err(e @ MigrationError::InDoubt(_)) => {
                // The destination may run the guest: it must not run here too.
                if let Some(log) = migration.dirty {
                    if let Err(e) = log.stop(&vm.fd) {
                        tracing::warn!("switching dirty logging off: {e}");
                    }
                }
                self.state = RunState::Paused;
                tracing::error!("migration to {}: {e}", migration.to);
                let _ = migration.reply.send(ApiResponse::error(
                    500,
                    format!("migration to {}: {e}", migration.to),
                ));
                None
            }
            Err(e) => {
                if let Some(log) = migration.dirty {
                    if let Err(e) = log.stop(&vm.fd) {
                        tracing::warn!("switching dirty logging off: {e}");
                    }
                }
                if migration.paused {
                    if let Err(e) = resume_all(vm) {
                        tracing::error!("resuming after the failed migration failed: {e}");
                        let _ = migration.reply.send(ApiResponse::error(500, e));
                        return Some(Outcome::Shutdown);
                    }
                }
                tracing::warn!("migration to {} failed; the VM runs on here", migration.to);
                let _ = migration.reply.send(ApiResponse::error(
                    502,
                    format!(
                        "migration to {} failed, the VM runs on here: {e}",
                        migration.to
                    ),
                ));
                None
            }
        }
    }

    /// Answers `request`; `Some(outcome)` when the VM is to end after the answer.
    pub(crate) fn handle(
        &mut self,
        vm: &mut Vm,
        request: ApiRequest,
    ) -> (ApiResponse, Option<Outcome>) {
        match request {
            ApiRequest::Status => {
                let mut body = json!({
                    "service": vm.name,
                    "state": if self.migration.is_some() { "migrating" } else { self.state.name() },
                    "spec": vm.spec_json,
                    "uptime_ms": self.started.elapsed().as_millis() as u64,
                });
                if let Some(m) = &self.migration {
                    let progress = m.progress.lock().unwrap_or_else(|e| e.into_inner()).clone();
                    body["migration"] = json!({ "to": m.to.to_string(), "progress": progress });
                }
                (ApiResponse::ok(body), None)
            }
            ApiRequest::Pause => {
                if self.state == RunState::Paused {
                    return (ApiResponse::error(409, "the VM is already paused"), None);
                }
                match pause_all(vm) {
                    Ok(()) => {
                        self.state = RunState::Paused;
                        tracing::info!("VM paused");
                        (ApiResponse::no_content(), None)
                    }
                    Err(e) => (ApiResponse::error(500, e), None),
                }
            }
            ApiRequest::Resume => {
                if self.state == RunState::Running {
                    return (ApiResponse::error(409, "the VM is already running"), None);
                }
                match resume_all(vm) {
                    Ok(()) => {
                        self.state = RunState::Running;
                        tracing::info!("VM resumed");
                        (ApiResponse::no_content(), None)
                    }
                    Err(e) => (ApiResponse::error(500, e), None),
                }
            }
            ApiRequest::Shutdown => (ApiResponse::no_content(), Some(Outcome::Shutdown)),
            // Handled in `handle_request`.
            ApiRequest::Migrate(_) => (
                ApiResponse::error(500, "migration requests go through handle_request"),
                None,
            ),
            ApiRequest::Snapshot { dir, then } => self.snapshot(vm, dir, then),
        }
    }

    /// Pauses (if running), writes the snapshot, then stops, resumes or stays paused.
    fn snapshot(
        &mut self,
        vm: &mut Vm,
        dir: PathBuf,
        then: Then,
    ) -> (ApiResponse, Option<Outcome>) {
        if dir.exists() {
            let message = format!("snapshot directory {} already exists", dir.display());
            return (ApiResponse::error(409, message), None);
        }
        let was_running = self.state == RunState::Running;
        if was_running {
            if let Err(e) = pause_all(vm) {
                return (ApiResponse::error(500, e), None);
            }
        }
        let start = Instant::now();
        let saved = checkpoint::save(vm, &dir);
        let duration_ms = start.elapsed().as_millis() as u64;
        let response = match saved {
            Ok(saved) => {
                tracing::info!("snapshot written to {} in {duration_ms} ms", dir.display());
                let body =
                    ApiResponse::ok(snapshot_body(&dir, duration_ms, saved.memory_bytes, then));
                if then == Then::Stop {
                    return (body, Some(Outcome::Snapshotted(dir)));
                }
                body
            }
            Err(e) => {
                tracing::warn!("snapshot to {} failed: {e}", dir.display());
                ApiResponse::error(500, e.to_string())
            }
        };
        if was_running {
            if let Err(e) = resume_all(vm) {
                // The guest cannot go on; say so and stop rather than leave a VM that
                // looks running and is not.
                tracing::error!("resuming after the snapshot failed: {e}");
                return (ApiResponse::error(500, e), Some(Outcome::Shutdown));
            }
        }
        (response, None)
    }
}

fn snapshot_body(dir: &Path, duration_ms: u64, memory_bytes: u64, then: Then) -> serde_json::Value {
    json!({
        "dir": dir,
        "duration_ms": duration_ms,
        "memory_bytes": memory_bytes,
        "then": then.as_str(),
    })
}

/// Pauses every vCPU; if one fails, those already paused run again.
fn pause_all(vm: &Vm) -> Result<(), String> {
    for (i, vcpu) in vm.vcpus.iter().enumerate() {
        if let Err(e) = vcpu.pause() {
            for earlier in &vm.vcpus[..i] {
                let _ = earlier.resume();
            }
            return Err(format!("pausing failed: {e}"));
        }
    }
    Ok(())
}

fn resume_all(vm: &Vm) -> Result<(), String> {
    for vcpu in &vm.vcpus {
        vcpu.resume().map_err(|e| format!("resuming failed: {e}"))?;
    }
    Ok(())
}

/// The pages dirtied since the last collection.
fn collect(migration: &Migration, vm: &Vm) -> Result<Vec<crate::dirty::DirtyRegion>, String> {
    migration
        .dirty
        .as_ref()
        .ok_or_else(|| "dirty logging is not on".to_string())?
        .collect(&vm.fd, &vm.mem)
        .map_err(|e| e.to_string())
}

/// Sets every vCPU's auto-converge throttle (0: off).
fn throttle_all(vm: &Vm, percent: u32) -> Result<(), String> {
    for vcpu in &vm.vcpus {
        vcpu.throttle(percent).map_err(|e| e.to_string())?;
    }
    Ok(())
}
