//! Routing tests, and the server end to end on a real socket.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::*;

fn req(method: &str, path: &str, body: &str) -> Request {
    Request {
        method: method.into(),
        path: path.into(),
        headers: Vec::new(),
        body: body.as_bytes().to_vec(),
    }
}

fn route_err(method: &str, path: &str, body: &str) -> ApiResponse {
    route(&req(method, path, body), Path::new("/srv"))
        .unwrap_err()
        .response
}

#[test]
fn routes_the_endpoints() {
    let cwd = Path::new("/srv");
    for (method, path, want) in [
        ("GET", "/vm", ApiRequest::Status),
        ("PUT", "/vm/pause", ApiRequest::Pause),
        ("PUT", "/vm/resume", ApiRequest::Resume),
        ("PUT", "/vm/shutdown", ApiRequest::Shutdown),
    ] {
        assert_eq!(route(&req(method, path, ""), cwd).unwrap(), want);
    }
    assert_eq!(
        route(&req("PUT", "/vm/pause", " {} \n"), cwd).unwrap(),
        ApiRequest::Pause
    );
}

#[test]
fn routes_snapshots() {
    let cwd = Path::new("/srv");
    let snap = |body: &str| route(&req("PUT", "/snapshot", body), cwd).unwrap();
    assert_eq!(
        snap(r#"{"dir": "/var/snap"}"#),
        ApiRequest::Snapshot {
            dir: "/var/snap".into(),
            then: Then::Resume
        }
    );
    assert_eq!(
        snap(r#"{"dir": "snaps/1", "then": "stop"}"#),
        ApiRequest::Snapshot {
            dir: "/srv/snaps/1".into(),
            then: Then::Stop
        }
    );
}

#[test]
fn refuses_bad_snapshot_bodies() {
    for (body, want) in [
        ("", "needs a JSON body"),
        (r#"{"then": "stop"}"#, "missing field `dir`"),
        (r#"{"dir": "/s", "force": true}"#, "unknown field `force`"),
        (
            r#"{"dir": "/s", "then": "pause"}"#,
            "unknown variant `pause`",
        ),
        (r#"{"dir": ""}"#, "dir is empty"),
        (r#"{"dir": "/s""#, "EOF while parsing"),
        ("[1]", "invalid snapshot body"),
    ] {
        let r = route_err("PUT", "/snapshot", body);
        assert_eq!(r.status, 400, "{body}");
        let msg = r.error_message().unwrap();
        assert!(msg.contains(want), "{body}: {msg}");
    }
}

#[test]
fn routes_migrations() {
    let peer = "ab".repeat(32);
    let body =
        format!(r#"{{"to": "10.0.0.2:4430", "peer": "{peer}", "identity": "keys/src.key"}}"#);
    assert_eq!(
        route(&req("PUT", "/migrate", &body), Path::new("/srv")).unwrap(),
        ApiRequest::Migrate(MigrateRequest {
            to: "10.0.0.2:4430".parse().unwrap(),
            peer: peer.parse().unwrap(),
            identity: "/srv/keys/src.key".into(),
            downtime_ms: DEFAULT_DOWNTIME_MS,
            converge: Converge::Throttle,
        })
    );
    let body =
        format!(r#"{{"to": "[::1]:1", "peer": "{peer}", "identity": "/k", "downtime_ms": 300}}"#);
    let ApiRequest::Migrate(m) = route(&req("PUT", "/migrate", &body), Path::new("/")).unwrap()
    else {
        panic!("not a migration");
    };
    assert_eq!(m.downtime_ms, 300);
}

#[test]
fn refuses_bad_migrate_bodies() {
    let peer = "cd".repeat(32);
    for (body, want) in [
        (String::new(), "needs a JSON body"),
        (
            format!(r#"{{"to": "somewhere", "peer": "{peer}", "identity": "/k"}}"#),
            "to \"somewhere\" is not an address:port",
        ),
        (
            r#"{"to": "1.2.3.4:5", "peer": "abc", "identity": "/k"}"#.to_string(),
            "wrong length",
        ),
        (
            format!(r#"{{"to": "1.2.3.4:5", "peer": "{peer}", "identity": ""}}"#),
            "identity is empty",
        ),
        (
            format!(
                r#"{{"to": "1.2.3.4:5", "peer": "{peer}", "identity": "/k", "downtime_ms": 0}}"#
            ),
            "at least 1",
        ),
        (
            format!(r#"{{"to": "1.2.3.4:5", "peer": "{peer}"}}"#),
            "missing field `identity`",
        ),
    ] {
        let r = route_err("PUT", "/migrate", &body);
        assert_eq!(r.status, 400, "{body}");
        let msg = r.error_message().unwrap();
        assert!(msg.contains(want), "{body}: {msg}");
    }
}

#[test]
fn refuses_unknown_paths_methods_and_bodies() {
    let r = route_err("GET", "/vm/", "");
    assert_eq!(r.status, 404);
    assert_eq!(r.error_message(), Some("no such endpoint \"/vm/\""));
    let r = route_err("POST", "/vm/pause", "");
    assert_eq!(r.status, 405);
    assert_eq!(
        r.error_message(),
        Some("POST is not allowed on /vm/pause; use PUT")
    );
    assert_eq!(route_err("PUT", "/vm", "").status, 405);
    let r = route_err("PUT", "/vm/pause", r#"{"dir": "/x"}"#);
    assert_eq!(r.status, 400);
    assert_eq!(
        r.error_message(),
        Some("PUT /vm/pause takes no body (got 13 bytes)")
    );
}

#[test]
fn then_is_lowercase_on_the_wire() {
    assert_eq!(serde_json::to_value(Then::Stop).unwrap(), json!("stop"));
    assert_eq!(Then::default(), Then::Resume);
    assert_eq!(Then::Resume.as_str(), "resume");
}

/// A socket path no other test uses; removed first in case an earlier run left it.
fn temp_socket(name: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let path = std::env::temp_dir().join(format!(
        "hospes-api-{}-{}-{name}.sock",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_file(&path);
    path
}

/// Sends raw bytes and returns the raw response.
fn raw_exchange(socket: &Path, bytes: &[u8]) -> String {
    let mut s = UnixStream::connect(socket).unwrap();
    s.write_all(bytes).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn serves_requests_end_to_end() {
    let path = temp_socket("e2e");
    let (server, channel) = ApiServer::start(&path).unwrap();
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // The VMM side: wait for the eventfd, then answer everything queued.
    let vmm = std::thread::spawn(move || {
        let epoll = Epoll::new().unwrap();
        let wake_fd = std::os::fd::AsRawFd::as_raw_fd(&channel.wake);
        epoll
            .ctl(
                ControlOperation::Add,
                wake_fd,
                EpollEvent::new(EventSet::IN, 0),
            )
            .unwrap();
        let mut seen = Vec::new();
        while seen.len() < 3 {
            let mut events = [EpollEvent::default()];
            let n = epoll.wait(10_000, &mut events).unwrap();
            assert_eq!(n, 1, "no wake-up within 10 s");
            channel.wake.read().unwrap();
            while let Ok((request, reply)) = channel.requests.try_recv() {
                let response = match &request {
                    ApiRequest::Status => ApiResponse::ok(json!({"state": "running"})),
                    ApiRequest::Pause => ApiResponse::no_content(),
                    ApiRequest::Snapshot { dir, then } => ApiResponse::ok(json!({
                        "dir": dir, "then": then.as_str()
                    })),
                    _ => ApiResponse::error(409, "the VM is not paused"),
                };
                reply.send(response).unwrap();
                seen.push(request);
            }
        }
        seen
    });

    let r = request(&path, "GET", "/vm", None).unwrap();
    assert_eq!(r, ApiResponse::ok(json!({"state": "running"})));
    let r = request(&path, "PUT", "/vm/pause", None).unwrap();
    assert_eq!(r, ApiResponse::no_content());
    let body = json!({"dir": "/tmp/snap", "then": "stop"});
    let r = request(&path, "PUT", "/snapshot", Some(&body)).unwrap();
    assert_eq!(r, ApiResponse::ok(body));
    // Refused before reaching the VMM.
    let r = request(&path, "DELETE", "/vm", None).unwrap();
    assert_eq!((r.status, r.error_message().is_some()), (405, true));
    let raw = raw_exchange(&path, b"PUT /vm HTTP/1.1\r\n\r\n");
    assert!(
        raw.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
        "{raw}"
    );
    assert!(raw.contains("\r\nAllow: GET\r\n"), "{raw}");
    let raw = raw_exchange(&path, b"GET /vm HTTP/1.1\r\nContent-Length: 5\r\n\r\n{");
    assert!(raw.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{raw}");
    assert!(raw.contains("before the end of the body"), "{raw}");
    let raw = raw_exchange(&path, b"hello\r\n\r\n");
    assert!(raw.starts_with("HTTP/1.1 400 "), "{raw}");
    assert!(raw.contains("Content-Type: application/json\r\n"), "{raw}");

    assert_eq!(
        vmm.join().unwrap(),
        vec![
            ApiRequest::Status,
            ApiRequest::Pause,
            ApiRequest::Snapshot {
                dir: "/tmp/snap".into(),
                then: Then::Stop
            }
        ]
    );
    // The VMM has gone: requests are answered, not left hanging.
    let r = request(&path, "PUT", "/vm/resume", None).unwrap();
    assert_eq!(r, ApiResponse::error(503, "the VM is shutting down"));

    // A second server on a live socket is refused; the first still owns the file.
    let e = ApiServer::start(&path).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("socket {} is in use by another process", path.display())
    );
    drop(server);
    assert!(!path.exists(), "drop removes the socket");
}

#[test]
fn replaces_stale_sockets_but_nothing_else() {
    let path = temp_socket("stale");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists(), "a listener's socket file outlives it");
    let (server, _channel) = ApiServer::start(&path).unwrap();
    drop(server);

    std::fs::write(&path, b"not a socket").unwrap();
    let e = ApiServer::start(&path).unwrap_err();
    assert!(matches!(e, ApiError::NotASocket(_)), "{e}");
    assert!(e.to_string().contains(&*path.to_string_lossy()), "{e}");
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn times_out_silent_clients() {
    let path = temp_socket("timeout");
    let (_server, _channel) = ApiServer::start(&path).unwrap();
    let mut s = UnixStream::connect(&path).unwrap();
    s.write_all(b"GET /vm HTTP/1.1\r\n").unwrap();
    let start = Instant::now();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 408 Request Timeout\r\n"), "{out}");
    assert!(start.elapsed() >= IO_TIMEOUT - Duration::from_millis(500));
}

#[test]
fn during_a_snapshot_other_requests_get_409_and_status_says_snapshotting() {
    let path = temp_socket("gate");
    let (server, channel) = ApiServer::start(&path).unwrap();
    // The fake VMM thread holds the snapshot until told to finish it.
    let (finish_tx, finish_rx) = mpsc::channel::<()>();
    let vmm = std::thread::spawn(move || {
        let reply = loop {
            let (request, reply) = channel.requests.recv().unwrap();
            match request {
                ApiRequest::Snapshot { .. } => break reply,
                _ => reply
                    .send(ApiResponse::ok(json!({ "state": "running" })))
                    .unwrap(),
            }
        };
        finish_rx.recv().unwrap();
        reply.send(ApiResponse::ok(json!({ "dir": "/s" }))).unwrap();
        channel
    });
    let snapshot_path = path.clone();
    let first = std::thread::spawn(move || {
        request(
            &snapshot_path,
            "PUT",
            "/snapshot",
            Some(&json!({ "dir": "/s" })),
        )
        .unwrap()
    });
    // Until the first snapshot is with the fake VMM, the VM still says running.
    let mut status = ApiResponse::no_content();
    for _ in 0..500 {
        status = request(&path, "GET", "/vm", None).unwrap();
        if status.body["state"] == "snapshotting" {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(status.body["state"], "snapshotting", "{status:?}");
    let second = request(&path, "PUT", "/snapshot", Some(&json!({ "dir": "/t" }))).unwrap();
    assert_eq!(second.status, 409, "{second:?}");
    let pause = request(&path, "PUT", "/vm/pause", None).unwrap();
    assert_eq!(pause.status, 409, "{pause:?}");
    finish_tx.send(()).unwrap();
    assert_eq!(first.join().unwrap().status, 200);
    let _channel = vmm.join().unwrap();
    drop(server);
}
