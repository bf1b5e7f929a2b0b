//! The per-VM control API: HTTP/1.1 with JSON bodies on a Unix socket.
//!
//! [`ApiServer::start`] binds the socket and runs one thread, `api`, that takes connections
//! one at a time, reads one request each, turns it into an [`ApiRequest`] and hands it to
//! the VMM thread through [`ApiChannel`]: the request goes down an mpsc channel and the
//! channel's `wake` eventfd is written so the VMM's epoll loop notices. The VMM answers on
//! the [`Sender`] that came with the request; the `api` thread waits for that answer
//! without a timeout (a snapshot takes seconds) and writes it back as the response.
//!
//! Routes (see `docs/api.yaml`):
//!
//! | method | path           | request                      |
//! |--------|----------------|------------------------------|
//! | GET    | `/vm`          | [`ApiRequest::Status`]       |
//! | PUT    | `/vm/pause`    | [`ApiRequest::Pause`]        |
//! | PUT    | `/vm/resume`   | [`ApiRequest::Resume`]       |
//! | PUT    | `/vm/shutdown` | [`ApiRequest::Shutdown`]     |
//! | PUT    | `/snapshot`    | [`ApiRequest::Snapshot`]     |
//! | PUT    | `/migrate`     | [`ApiRequest::Migrate`]      |

pub mod client;
pub mod http;

use std::io::{self, ErrorKind, Read};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub use client::request;
use http::{HttpError, Request};

/// How long a client has to send its whole request, and to take the response.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// The `api` thread's stack: it parses at most 64 KiB of JSON (serde_json stops at 128
/// levels of nesting), so the vCPU threads' small stack is plenty.
const API_STACK_SIZE: usize = 512 << 10;

/// What a client asks the VMM to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiRequest {
    /// `GET /vm`: report the VM's state.
    Status,
    /// `PUT /vm/pause`: stop running the vCPUs.
    Pause,
    /// `PUT /vm/resume`: run the vCPUs again.
    Resume,
    /// `PUT /vm/shutdown`: stop the VM; hospes exits.
    Shutdown,
    /// `PUT /snapshot`: write the VM's state and memory into `dir`.
    Snapshot {
        /// Where to write the snapshot; always absolute.
        dir: PathBuf,
        /// What the VM does once the snapshot is written.
        then: Then,
    },
    /// `PUT /migrate`: move the running VM to another hospes (`hospes receive`); answered
    /// when the migration has ended either way.
    Migrate(MigrateRequest),
}

/// Where and how to migrate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrateRequest {
    /// The destination's `hospes receive --listen` address.
    pub to: std::net::SocketAddr,
    /// The destination's public key: no other peer is accepted there.
    pub peer: p2p::PeerId,
    /// This peer's identity key file; always absolute.
    pub identity: PathBuf,
    /// The longest the guest may be paused, in milliseconds.
    pub downtime_ms: u64,
    /// What to do when pre-copy does not converge.
    pub converge: Converge,
}

/// What a migration does when the guest dirties memory faster than the link carries it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Converge {
    /// Auto-converge: slow the vCPUs down step by step (see `migration::source`).
    #[default]
    Throttle,
    /// Give up after the round limit; the guest runs on at full speed here.
    Abort,
}

/// The downtime budget when the request names none.
pub const DEFAULT_DOWNTIME_MS: u64 = 50;

/// What a VM does after a snapshot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Then {
    /// Carry on running (or stay paused if it was paused).
    #[default]
    Resume,
    /// Stop the VM; hospes exits.
    Stop,
}

impl Then {
    /// The name used on the wire: `resume` or `stop`.
    pub fn as_str(self) -> &'static str {
        match self {
            Then::Resume => "resume",
            Then::Stop => "stop",
        }
    }
}

/// The VMM's answer to one request: an HTTP status and a JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiResponse {
    /// The HTTP status.
    pub status: u16,
    /// The JSON body; `Null` for a 204.
    pub body: Value,
}

impl ApiResponse {
    /// A 200 with `body`.
    pub fn ok(body: Value) -> Self {
        Self { status: 200, body }
    }

    /// An error `status` with the body `{"error": message}`.
    pub fn error(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            body: json!({ "error": message.into() }),
        }
    }

    /// A 204 with no body.
    pub fn no_content() -> Self {
        Self {
            status: 204,
            body: Value::Null,
        }
    }

    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The `error` member of an error body, if it has one.
    pub fn error_message(&self) -> Option<&str> {
        self.body.get("error").and_then(Value::as_str)
    }
}

/// The VMM thread's end of the API: requests to answer, and an eventfd that becomes
/// readable when there are some.
///
/// Each request writes 1 to `wake`; read `wake`, then drain `requests` with `try_recv`
/// until it is empty. Every request must be answered on its `Sender` (dropping the
/// sender answers 503); the client is waiting for it.
#[derive(Debug)]
pub struct ApiChannel {
    /// Requests, each with the sender for its response.
    pub requests: Receiver<(ApiRequest, Sender<ApiResponse>)>,
    /// Non-blocking eventfd, written once per request.
    pub wake: EventFd,
}

/// Errors of the API server and client.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Another process answers on the socket path.
    #[error("socket {} is in use by another process", .0.display())]
    InUse(PathBuf),
    /// Something other than a socket is at the path.
    #[error("{} exists and is not a socket; refusing to replace it", .0.display())]
    NotASocket(PathBuf),
    /// The path could not be checked, cleared or bound.
    #[error("cannot {what} API socket {}: {source}", path.display())]
    Socket {
        /// `bind the`, `remove the stale`, ...
        what: &'static str,
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The wake eventfd could not be created or duplicated.
    #[error("cannot create the API wake eventfd: {0}")]
    EventFd(#[source] io::Error),
    /// The `api` thread could not be started.
    #[error("cannot start the API thread: {0}")]
    Thread(#[source] io::Error),
    /// The client could not reach the socket.
    #[error("cannot connect to {}: {source}", socket.display())]
    Connect {
        /// The socket path.
        socket: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The client's exchange failed after connecting.
    #[error("request to {} failed: {source}", socket.display())]
    Exchange {
        /// The socket path.
        socket: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The server's answer is not a valid HTTP response with a JSON body.
    #[error("invalid response from {}: {reason}", socket.display())]
    BadResponse {
        /// The socket path.
        socket: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The client was given something it cannot send.
    #[error("invalid request: {0}")]
    BadRequest(String),
}

/// The running API: owns the socket file, which is removed on drop.
#[derive(Debug)]
pub struct ApiServer {
    path: PathBuf,
    /// Device and inode of the socket we bound, so drop never removes a successor's.
    ino: (u64, u64),
    gate: Arc<Gate>,
}

/// What the connection threads share.
#[derive(Debug, Default)]
struct Gate {
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct GateState {
    /// A snapshot request is with the VMM thread: other requests are answered here
    /// (409, or the state for GET /vm) instead of queueing behind it.
    snapshotting: bool,
    /// Connections accepted whose response is not written yet.
    open: usize,
}

impl Gate {
    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// How long dropping the server waits for responses still being written (the answer to
/// a shutdown or a snapshot with `then: stop` is written after the VMM loop ended).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

impl ApiServer {
    /// Binds `path` (replacing a stale socket left by a dead process) and starts the `api`
    /// thread. The socket is made owner-only: it controls the VM.
    pub fn start(path: &Path) -> Result<(ApiServer, ApiChannel), ApiError> {
        clear_stale_socket(path)?;
        let socket_err = |what, source| ApiError::Socket {
            what,
            path: path.to_owned(),
            source,
        };
        let listener = UnixListener::bind(path).map_err(|e| socket_err("bind the", e))?;
        let meta = std::fs::metadata(path).map_err(|e| socket_err("inspect the new", e))?;
        let gate = Arc::new(Gate::default());
        let server = ApiServer {
            path: path.to_owned(),
            ino: (meta.dev(), meta.ino()),
            gate: gate.clone(),
        };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| socket_err("restrict the permissions of the", e))?;

        let wake = EventFd::new(EFD_NONBLOCK).map_err(ApiError::EventFd)?;
        let waker = wake.try_clone().map_err(ApiError::EventFd)?;
        let (tx, requests) = mpsc::channel();
        std::thread::Builder::new()
            .name("api".into())
            .stack_size(API_STACK_SIZE)
            .spawn(move || serve(listener, tx, waker, gate))
            .map_err(ApiError::Thread)?;
        tracing::info!("API listening on {}", path.display());
        Ok((server, ApiChannel { requests, wake }))
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        // Let the last responses reach their clients before the process ends.
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        let mut state = self.gate.lock();
        while state.open > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            state = match self.gate.changed.wait_timeout(state, left) {
                Ok((s, _)) => s,
                Err(p) => p.into_inner().0,
            };
        }
        drop(state);
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if (m.dev(), m.ino()) == self.ino => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    tracing::warn!("cannot remove API socket {}: {e}", self.path.display());
                }
            }
            _ => {}
        }
    }
}

/// Makes `path` free to bind: nothing there, or a socket no process listens on.
fn clear_stale_socket(path: &Path) -> Result<(), ApiError> {
    let socket_err = |what, source| ApiError::Socket {
        what,
        path: path.to_owned(),
        source,
    };
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(socket_err("inspect the", e)),
    };
    if !meta.file_type().is_socket() {
        return Err(ApiError::NotASocket(path.to_owned()));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(ApiError::InUse(path.to_owned())),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
            tracing::info!("removing stale API socket {}", path.display());
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != ErrorKind::NotFound => Err(socket_err("remove the stale", e)),
                _ => Ok(()),
            }
        }
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(socket_err("check whether another process uses the", e)),
    }
}

/// The `api` thread: accepts connections, one thread and one request per connection, so
/// that a client asking while a snapshot is written gets an answer at once.
fn serve(
    listener: UnixListener,
    tx: Sender<(ApiRequest, Sender<ApiResponse>)>,
    wake: EventFd,
    gate: Arc<Gate>,
) {
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                gate.lock().open += 1;
                let (tx, conn_gate) = (tx.clone(), gate.clone());
                let wake = match wake.try_clone() {
                    Ok(w) => w,
                    Err(e) => {
                        tracing::warn!("API: cannot clone the wake eventfd: {e}");
                        close(&conn_gate);
                        continue;
                    }
                };
                let spawned = std::thread::Builder::new()
                    .name("api-conn".into())
                    .stack_size(API_STACK_SIZE)
                    .spawn(move || {
                        handle_connection(stream, &tx, &wake, &conn_gate);
                        close(&conn_gate);
                    });
                if let Err(e) = spawned {
                    tracing::warn!("API: cannot start a connection thread: {e}");
                    close(&gate);
                }
            }
            Err(e) => {
                tracing::warn!("API accept failed: {e}");
                // Out of file descriptors and the like: don't spin.
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn close(gate: &Gate) {
    let mut state = gate.lock();
    state.open = state.open.saturating_sub(1);
    gate.changed.notify_all();
}

fn handle_connection(
    mut stream: UnixStream,
    tx: &Sender<(ApiRequest, Sender<ApiResponse>)>,
    wake: &EventFd,
    gate: &Gate,
) {
    if let Err(e) = stream.set_write_timeout(Some(IO_TIMEOUT)) {
        tracing::warn!("API: cannot set a write timeout: {e}");
        return;
    }
    let (response, allow) = match read_request(&mut stream, Instant::now() + IO_TIMEOUT) {
        Err(HttpError::Closed) => return,
        Err(e) => {
            tracing::debug!("API: bad request: {e}");
            (ApiResponse::error(e.status(), e.to_string()), None)
        }
        Ok(req) => {
            let routed = std::env::current_dir()
                .map_err(|e| {
                    ApiResponse::error(500, format!("cannot read the current directory: {e}"))
                })
                .and_then(|cwd| route(&req, &cwd).map_err(|r| r.response));
            let response = match routed {
                Ok(api_request) => gated(api_request, tx, wake, gate),
                Err(response) => response,
            };
            tracing::debug!("API: {} {} -> {}", req.method, req.path, response.status);
            let allow = allowed_methods(&req.path).filter(|_| response.status == 405);
            (response, allow)
        }
    };
    let extra: Vec<(&str, &str)> = allow.iter().map(|a| ("Allow", *a)).collect();
    if let Err(e) = http::write_response(&mut stream, response.status, &response.body, &extra) {
        tracing::debug!("API: cannot write the response: {e}");
    }
}

/// Reads until one request is complete, the peer closes, or `deadline` passes.
fn read_request(stream: &mut UnixStream, deadline: Instant) -> Result<Request, HttpError> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(req) = http::parse_request(&buf)? {
            return Ok(req);
        }
        let timeout = HttpError::Timeout {
            secs: IO_TIMEOUT.as_secs(),
        };
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(timeout);
        }
        stream
            .set_read_timeout(Some(remaining))
            .map_err(HttpError::Io)?;
        match stream.read(&mut chunk) {
            Ok(0) if buf.is_empty() => return Err(HttpError::Closed),
            Ok(0) => {
                return Err(HttpError::Truncated {
                    got: buf.len(),
                    wanted: http::missing_part(&buf),
                })
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(timeout)
            }
            Err(e) => return Err(HttpError::Io(e)),
        }
    }
}

/// Refuses what cannot happen during a snapshot, and marks one in progress while the
/// VMM thread writes it.
fn gated(
    request: ApiRequest,
    tx: &Sender<(ApiRequest, Sender<ApiResponse>)>,
    wake: &EventFd,
    gate: &Gate,
) -> ApiResponse {
    let is_snapshot = matches!(request, ApiRequest::Snapshot { .. });
    {
        let mut state = gate.lock();
        if state.snapshotting {
            return match request {
                ApiRequest::Status => ApiResponse::ok(json!({ "state": "snapshotting" })),
                _ => ApiResponse::error(
                    409,
                    "a snapshot is being written; try again when it is done",
                ),
            };
        }
        if is_snapshot {
            state.snapshotting = true;
        }
    }
    let response = dispatch(request, tx, wake);
    if is_snapshot {
        gate.lock().snapshotting = false;
    }
    response
}

/// Hands a request to the VMM thread and waits for its answer.
fn dispatch(
    request: ApiRequest,
    tx: &Sender<(ApiRequest, Sender<ApiResponse>)>,
    wake: &EventFd,
) -> ApiResponse {
    let shutting_down = || ApiResponse::error(503, "the VM is shutting down");
    let (reply_tx, reply_rx) = mpsc::channel();
    if tx.send((request, reply_tx)).is_err() {
        return shutting_down();
    }
    if let Err(e) = wake.write(1) {
        // Only an overflowing counter fails, which 2^64 requests would take.
        tracing::error!("API: cannot wake the VMM thread: {e}");
        return ApiResponse::error(500, format!("cannot wake the VMM thread: {e}"));
    }
    reply_rx.recv().unwrap_or_else(|_| shutting_down())
}

/// A request the router refused, with the response to send.
#[derive(Debug)]
pub struct RouteError {
    /// 400, 404 or 405 with an error body.
    pub response: ApiResponse,
}

impl RouteError {
    fn new(status: u16, message: impl Into<String>) -> Self {
        Self {
            response: ApiResponse::error(status, message),
        }
    }
}

/// The methods `path` accepts, for the `Allow` header; `None` for an unknown path.
pub fn allowed_methods(path: &str) -> Option<&'static str> {
    match path {
        "/vm" => Some("GET"),
        "/vm/pause" | "/vm/resume" | "/vm/shutdown" | "/snapshot" | "/migrate" => Some("PUT"),
        _ => None,
    }
}

/// The body `PUT /snapshot` takes.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotBody {
    dir: PathBuf,
    #[serde(default)]
    then: Then,
}

/// Turns a parsed request into an [`ApiRequest`]; a relative snapshot `dir` is resolved
/// against `cwd`.
pub fn route(req: &Request, cwd: &Path) -> Result<ApiRequest, RouteError> {
    let Some(allow) = allowed_methods(&req.path) else {
        return Err(RouteError::new(
            404,
            format!("no such endpoint {:?}", req.path),
        ));
    };
    if req.method != allow {
        return Err(RouteError::new(
            405,
            format!("{} is not allowed on {}; use {allow}", req.method, req.path),
        ));
    }
    let request = match req.path.as_str() {
        "/vm" => ApiRequest::Status,
        "/vm/pause" => ApiRequest::Pause,
        "/vm/resume" => ApiRequest::Resume,
        "/vm/shutdown" => ApiRequest::Shutdown,
        "/migrate" => return migrate_request(&req.body, cwd),
        _ => return snapshot_request(&req.body, cwd),
    };
    if !is_empty_body(&req.body) {
        return Err(RouteError::new(
            400,
            format!(
                "{} {} takes no body (got {} bytes)",
                req.method,
                req.path,
                req.body.len()
            ),
        ));
    }
    Ok(request)
}

/// Empty, whitespace, or `{}`: what clients send when there is nothing to send.
fn is_empty_body(body: &[u8]) -> bool {
    body.iter().all(u8::is_ascii_whitespace)
        || serde_json::from_slice::<serde_json::Map<String, Value>>(body)
            .is_ok_and(|m| m.is_empty())
}

fn snapshot_request(body: &[u8], cwd: &Path) -> Result<ApiRequest, RouteError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(RouteError::new(
            400,
            r#"PUT /snapshot needs a JSON body: {"dir": "/path", "then": "resume"|"stop"}"#,
        ));
    }
    let body: SnapshotBody = serde_json::from_slice(body)
        .map_err(|e| RouteError::new(400, format!("invalid snapshot body: {e}")))?;
    if body.dir.as_os_str().is_empty() {
        return Err(RouteError::new(400, "invalid snapshot body: dir is empty"));
    }
    Ok(ApiRequest::Snapshot {
        dir: cwd.join(body.dir),
        then: body.then,
    })
}

/// The body of `PUT /migrate`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MigrateBody {
    to: String,
    peer: String,
    identity: PathBuf,
    downtime_ms: Option<u64>,
    #[serde(default)]
    converge: Converge,
}

fn migrate_request(body: &[u8], cwd: &Path) -> Result<ApiRequest, RouteError> {
    let usage = r#"PUT /migrate needs a JSON body: {"to": "host:port", "peer": "<64 hex digits>", "identity": "/path/key", "downtime_ms": 50, "converge": "throttle"|"abort"}"#;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(RouteError::new(400, usage));
    }
    let body: MigrateBody = serde_json::from_slice(body)
        .map_err(|e| RouteError::new(400, format!("invalid migrate body: {e}")))?;
    let to = body.to.parse().map_err(|e| {
        RouteError::new(
            400,
            format!(
                "invalid migrate body: to {:?} is not an address:port ({e})",
                body.to
            ),
        )
    })?;
    let peer = body
        .peer
        .parse()
        .map_err(|e| RouteError::new(400, format!("invalid migrate body: {e}")))?;
    if body.identity.as_os_str().is_empty() {
        return Err(RouteError::new(
            400,
            "invalid migrate body: identity is empty",
        ));
    }
    let downtime_ms = body.downtime_ms.unwrap_or(DEFAULT_DOWNTIME_MS);
    if downtime_ms == 0 {
        return Err(RouteError::new(
            400,
            "invalid migrate body: downtime_ms must be at least 1",
        ));
    }
    Ok(ApiRequest::Migrate(MigrateRequest {
        to,
        peer,
        identity: cwd.join(body.identity),
        downtime_ms,
        converge: body.converge,
    }))
}

#[cfg(test)]
mod tests;
