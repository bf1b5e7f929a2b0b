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

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::json;

use crate::api::{ApiRequest, ApiResponse, Then};
use crate::checkpoint;
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

/// The control side of one VM.
pub(crate) struct Control {
    state: RunState,
    started: Instant,
}

impl Control {
    /// A VM whose vCPUs were just started.
    pub(crate) fn new() -> Control {
        Control {
            state: RunState::Running,
            started: Instant::now(),
        }
    }

    /// Answers `request`; `Some(outcome)` when the VM is to end after the answer.
    pub(crate) fn handle(
        &mut self,
        vm: &mut Vm,
        request: ApiRequest,
    ) -> (ApiResponse, Option<Outcome>) {
        match request {
            ApiRequest::Status => (
                ApiResponse::ok(json!({
                    "service": vm.name,
                    "state": self.state.name(),
                    "spec": vm.spec_json,
                    "uptime_ms": self.started.elapsed().as_millis() as u64,
                })),
                None,
            ),
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
