//! `hospes receive`: waits for one incoming VM, builds it from the stream exactly as a
//! restore builds it from a snapshot, runs it, and acknowledges.
//!
//! Order, and why:
//! 1. The host is checked, the identity loaded and the API socket bound before anything
//!    listens: a destination that could not run the VM must not accept one.
//! 2. The first connection from a trusted peer is taken (untrusted ones never get past
//!    the TLS handshake); the source opens the one stream.
//! 3. On the Hello: the memory layout must be the one this hospes builds for that much
//!    RAM, and every drive image must be new in the receive directory. Guest memory (fresh,
//!    zeroed) and sparse drive images of the announced sizes are made, and the VM is
//!    built as far as its configuration alone allows, so that the source's pause does not
//!    wait for it: `checkpoint::prebuild` (the KVM VM, memory registered, drive images
//!    open, vCPUs created), then `Prebuilt::launch_paused` (devices attached fresh, TAP
//!    queues detached, event loop, vCPU threads stopped before their first `KVM_RUN`).
//!    What phase three will run on the state is rehearsed in between on the fresh VM's own
//!    (`Prebuilt::rehearse`), so that it does not run for the first time inside the
//!    guest's pause; then HelloAck. Whatever fails here refuses the Hello.
//! 4. Pages and blocks are written as they arrive (the `Receiver` has checked each one),
//!    into the memory KVM already maps (no vCPU runs) and the drive images.
//! 5. On Done (the hash matched): the state from the State frame is written into the
//!    launched VM (`Staged::finish`: TAP queues attached, devices, VM and vCPU state,
//!    queues), its vCPUs still paused. If that fails the source is told to resume
//!    (Abort).
//! 6. Ready goes back, and the source answers Commit once it has stopped for good.
//! 7. Commit: the vCPUs are let go, and only then does our stream end, which is the
//!    acknowledgement the source waits for. The source's downtime, from its pause to
//!    that acknowledgement, thus covers the destination's resume. The VM is this side's
//!    from now on.
//!
//! Any failure before Commit, or an Abort from the source: the VM built here (if any) is
//! dropped without ever having run, the drive images made here are deleted, the memory
//! dropped, and `receive` returns the error.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use p2p::wire::{Event, Receiver, Sink, BLOCK_SIZE};
use p2p::{Endpoint, Identity, PeerId};
use vm_memory::{Bytes, GuestAddress};

use super::stream::{runtime, StreamReader, StreamWriter};
use super::MigrationError;
use crate::api::{ApiChannel, ApiServer};
use crate::checkpoint;
use crate::laps::Laps;
use crate::layout::ram_ranges;
use crate::vm::{self, Outcome};
use crate::{memory, VmmError};

/// How long the destination keeps the connection after Commit for the source to close it.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// What `hospes receive` was told.
#[derive(Debug, Clone)]
pub struct ReceiveOptions {
    /// Where to listen (UDP).
    pub listen: SocketAddr,
    /// This peer's identity key file.
    pub identity: PathBuf,
    /// The peers allowed to send a VM.
    pub trust: Vec<PeerId>,
    /// Where the drive images are made.
    pub dir: PathBuf,
    /// Serve the control API on this Unix socket, as `hospes run` does.
    pub api_socket: Option<PathBuf>,
}

/// Where received pages and blocks go.
struct Target {
    mem: Option<devices::GuestMemoryMmap>,
    /// The VM built and launched paused from the Hello, waiting for its state.
    staged: Option<checkpoint::Staged>,
    /// The control API, until the VM's event loop takes it.
    api: Option<(ApiServer, ApiChannel)>,
    disks: Vec<File>,
    /// Drive images made here, deleted unless the VM runs.
    made: Vec<PathBuf>,
    /// Where the VM comes from.
    from: SocketAddr,
}

impl Target {
    fn discard(&mut self) {
        // The VM never ran: closing its file descriptors is all there is to it.
        self.staged = None;
        self.disks.clear();
        for path in self.made.drain(..) {
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!("cannot remove {}: {e}", path.display());
            }
        }
        self.mem = None;
    }
}

impl Sink for Target {
    fn write_page(&mut self, gpa: u64, data: &[u8]) -> io::Result<()> {
        let mem = self
            .mem
            .as_ref()
            .ok_or_else(|| io::Error::other("no guest memory yet"))?;
        mem.write_slice(data, GuestAddress(gpa))
            .map_err(|e| io::Error::other(e.to_string()))
    }

    fn write_block(&mut self, disk: u16, index: u64, data: &[u8]) -> io::Result<()> {
        let file = self
            .disks
            .get(usize::from(disk))
            .ok_or_else(|| io::Error::other(format!("no disk {disk}")))?;
        file.write_all_at(data, index * BLOCK_SIZE as u64)
    }
}

/// Receives one VM and runs it until it ends (module documentation).
pub fn receive(options: &ReceiveOptions) -> Result<Outcome, VmmError> {
    // 1.
    vm::check_host()?;
    let identity =
        Identity::load(&options.identity).map_err(|source| MigrationError::Identity {
            path: options.identity.clone(),
            source,
        })?;
    let api = options
        .api_socket
        .as_deref()
        .map(ApiServer::start)
        .transpose()?;
    let rt = runtime()?;

    // 2.
    let (endpoint, peer, conn, send, recv) = rt.block_on(async {
        let endpoint = Endpoint::server(&identity, options.listen, options.trust.clone())?;
        tracing::info!(
            "waiting for a VM on {}",
            endpoint.local_addr().unwrap_or(options.listen)
        );
        let (peer, conn) = endpoint.accept().await?;
        let addr = conn.remote_address();
        let (send, recv) = conn
            .accept_bi()
            .await
            .map_err(|e| MigrationError::Connection {
                peer: addr,
                reason: e.to_string(),
            })?;
        Ok::<_, MigrationError>((endpoint, peer, conn, send, recv))
    })?;
    tracing::info!(
        "receiving a VM from peer {peer} at {}",
        conn.remote_address()
    );
    let mut out = StreamWriter::new(rt.handle().clone(), send);
    let mut input = StreamReader {
        rt: rt.handle().clone(),
        stream: recv,
        timeout: super::IO_TIMEOUT,
    };
    let mut receiver = Receiver::new();
    let mut target = Target {
        mem: None,
        staged: None,
        api,
        disks: Vec::new(),
        made: Vec::new(),
        from: conn.remote_address(),
    };

    // 3-4.
    let state = match receive_stream(
        &mut receiver,
        &mut input,
        &mut out,
        &mut target,
        &options.dir,
    ) {
        Ok(state) => state,
        Err(e) => {
            target.discard();
            let _ = out.stream.finish();
            close_with(&rt, &endpoint, &conn, &e);
            return Err(e.into());
        }
    };

    // 5.
    let mut laps = Laps::start();
    // Every page and block is in: the VM's own handles are the only ones needed now.
    target.mem = None;
    target.disks.clear();
    laps.lap("close the stream's handles");
    let launched = match target.staged.take() {
        Some(staged) => checkpoint::check_layout(&options.dir, &state).and_then(|()| {
            laps.lap("check the layout");
            staged.finish(*state, &mut laps)
        }),
        None => Err(MigrationError::Unacceptable("the stream ended without a Hello".into()).into()),
    };
    let launched = match launched {
        Ok(launched) => launched,
        Err(e) => {
            let _ = receiver.abort(&mut out, &format!("the destination cannot run the VM: {e}"));
            let _ = out.stream.finish();
            rt.block_on(async {
                let _ = tokio::time::timeout(CLOSE_WAIT, conn.closed()).await;
            });
            target.discard();
            return Err(e);
        }
    };

    // 6. Ready; the VM starts only on Commit.
    let committed = receiver
        .ready(&mut out)
        .map_err(MigrationError::from)
        .and_then(|()| match receiver.next(&mut input, &mut target)? {
            Event::Commit => Ok(()),
            Event::Aborted(reason) => Err(p2p::wire::WireError::Aborted(reason).into()),
            other => Err(MigrationError::Unacceptable(format!(
                "expected Commit, got {other:?}"
            ))),
        });
    if let Err(e) = committed {
        drop(launched);
        target.discard();
        close_with(&rt, &endpoint, &conn, &e);
        tracing::warn!("no Commit from the source; nothing runs here: {e}");
        return Err(e.into());
    }
    // 7. The source has stopped for good: the guest runs here from now on, whatever
    // happens to the connection, which is wound down on the side. The vCPUs go first;
    // then Running (version 3 on) says since when, and ending our stream tells the
    // source that Commit arrived and the guest runs (often before QUIC's acknowledgement
    // does). The source takes the Running time off its own measure of the downtime: on a
    // busy host the resumed guest competes with this thread and the connection's for the
    // CPU, and the stream's end leaves later than the guest resumed (12 to 26 ms in the
    // test rig, with one CPU). A vCPU that cannot resume (its thread is gone) leaves the
    // VM here, stopped: the error says so, and the drive images stay for whoever looks.
    let resumed = launched.resume();
    if let Ok(at) = &resumed {
        if let Err(e) = receiver.running(&mut out, at.elapsed()) {
            tracing::debug!("telling the source the guest runs: {e}");
        }
    }
    let _ = out.stream.finish();
    tracing::info!("Done to VM ready: {laps}");
    resumed?;
    std::thread::spawn(move || {
        let mut rest = Vec::new();
        let _ = input.read_to_end(&mut rest);
        rt.block_on(async {
            let _ = tokio::time::timeout(CLOSE_WAIT, conn.closed()).await;
        });
        endpoint.close();
    });
    launched.run()
}

/// Longest reason put in a CONNECTION_CLOSE frame; quinn cuts it to fit one packet anyway.
const CLOSE_REASON_MAX: usize = 900;

/// Closes the connection with `error` as the reason, so the source reports why (e.g. the
/// CRC mismatch of a corrupted frame) rather than only that the connection was lost, and
/// waits briefly for the close to leave before the process goes.
fn close_with(
    rt: &tokio::runtime::Runtime,
    endpoint: &Endpoint,
    conn: &quinn::Connection,
    error: &MigrationError,
) {
    let mut reason = format!("the destination gave up: {error}");
    if reason.len() > CLOSE_REASON_MAX {
        let mut end = CLOSE_REASON_MAX;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
    }
    conn.close(1u32.into(), reason.as_bytes());
    rt.block_on(endpoint.wait_idle(Duration::from_secs(1)));
}

/// Steps 3-4: the stream up to a Done whose hash matched; the State it carried.
fn receive_stream(
    receiver: &mut Receiver,
    input: &mut StreamReader,
    out: &mut StreamWriter,
    target: &mut Target,
    dir: &Path,
) -> Result<Box<snapshot::VmState>, MigrationError> {
    let mut state = None;
    loop {
        match receiver.next(input, target)? {
            Event::Hello { config, .. } => {
                if let Err(reason) = prepare(&config, dir, target) {
                    let _ = receiver.refuse(out, &reason);
                    return Err(MigrationError::Unacceptable(reason));
                }
                receiver.accept(out)?;
                tracing::info!(
                    "accepted VM {:?}: {} MiB, {} drive(s)",
                    config.machine.name,
                    config.machine.memory_mib,
                    config.machine.drives.len()
                );
            }
            Event::Applied { .. } => {}
            Event::RoundEnd {
                round,
                pages,
                blocks,
            } => {
                tracing::debug!("round {round}: {pages} pages, {blocks} blocks");
                // The source waits for this before it decides whether to stop (step 4).
                receiver.applied(out, round)?;
            }
            Event::State(s) => state = Some(s),
            Event::Done => {
                return state
                    .ok_or_else(|| MigrationError::Unacceptable("Done without a State".into()))
            }
            Event::Aborted(reason) => {
                return Err(MigrationError::Wire(p2p::wire::WireError::Aborted(reason)))
            }
            Event::Commit => return Err(MigrationError::Unacceptable("Commit before Done".into())),
        }
    }
}

/// Step 3: memory, drive images and the VM's first build phase for the VM a Hello
/// announced; the reason to refuse it otherwise.
fn prepare(
    config: &p2p::wire::MigrationConfig,
    dir: &Path,
    target: &mut Target,
) -> Result<(), String> {
    let total = u64::from(config.machine.memory_mib) << 20;
    let expected: Vec<(u64, u64)> = ram_ranges(total)
        .into_iter()
        .map(|(a, l)| (a.0, l))
        .collect();
    if config.regions != expected {
        return Err(format!(
            "memory regions {:x?} are not the layout of a {} MiB guest here {expected:x?}",
            config.regions, config.machine.memory_mib
        ));
    }
    let mem = memory::create_guest_memory(total).map_err(|e| e.to_string())?;
    for drive in &config.machine.drives {
        let name = Path::new(&drive.file);
        if name.components().count() != 1 || name.file_name().is_none() {
            return Err(format!(
                "drive {}: file name {:?} is not a plain name",
                drive.id, drive.file
            ));
        }
        let path = dir.join(name);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| format!("drive {}: cannot create {}: {e}", drive.id, path.display()))?;
        target.made.push(path.clone());
        file.set_len(drive.size).map_err(|e| {
            format!(
                "drive {}: cannot size {} to {} bytes: {e}",
                drive.id,
                path.display(),
                drive.size
            )
        })?;
        target.disks.push(file);
    }
    // The VM as far as the configuration alone builds it; the pages go into the memory
    // it maps from now on.
    let cannot = |e: VmmError| format!("cannot build this VM here: {e}");
    let prebuilt = checkpoint::prebuild(&config.machine, mem.clone(), dir).map_err(cannot)?;
    prebuilt.rehearse();
    // The State's machine must be this one (`Staged::finish` checks).
    let spec_json = serde_json::json!({
        "migrated_from": target.from.to_string(),
        "machine": config.machine,
    });
    let staged = prebuilt
        .launch_paused(spec_json, target.api.take())
        .map_err(cannot)?;
    target.staged = Some(staged);
    target.mem = Some(mem);
    Ok(())
}
