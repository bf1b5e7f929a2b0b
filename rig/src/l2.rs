//! A running L2: the QEMU TCG process, its console log, and the command channel to the
//! agent (L2's ttyS1, a unix socket on the host).
//!
//! QEMU runs under a small `sh` watcher whose stdin is a pipe from this process: when
//! the pipe closes (on `Drop`, or because this process died, even by SIGKILL) the
//! watcher kills QEMU and removes the L2's temporary directory. That is what makes the
//! never-dropped [`crate::shared`] L2 safe.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use crate::agent::{self, FrameParser};
use crate::config::RigConfig;
use crate::{host, initrd, RigError};

/// The watcher around QEMU; arguments: temp dir, then the QEMU command line.
const WATCHER: &str = r#"dir=$1; shift
exec 3<&0 </dev/null
"$@" >"$dir/qemu.out" 2>&1 &
q=$!
{ cat <&3 >/dev/null; kill "$q" 2>/dev/null; sleep 1; rm -rf "$dir"; } &
wait "$q""#;
/// Extra time the host gives the agent beyond a command's own timeout (TCG is slow).
const AGENT_GRACE: Duration = Duration::from_secs(30);
/// Scripts travel base64-encoded on one tty line; keep them well inside tty buffers.
const MAX_SCRIPT: usize = 256 * 1024;
/// Lines of console kept in error messages.
const CONSOLE_TAIL_LINES: usize = 60;

/// What a command printed and how it ended.
#[derive(Debug, Clone)]
pub struct CmdOutput {
    /// Exit status of `sh -c script` in L2 (128 + signal number when killed).
    pub status: i32,
    /// stdout and stderr, interleaved as written (lossily decoded as UTF-8).
    pub output: String,
    /// Wall time from sending the command to its end marker.
    pub elapsed: Duration,
}

/// A running L2. Dropping it kills QEMU and removes its temporary files.
pub struct L2 {
    watcher: Child,
    /// Closing it tells the watcher to kill QEMU.
    watcher_stdin: Option<ChildStdin>,
    dir: PathBuf,
    channel: UnixStream,
    chunks: Receiver<Vec<u8>>,
    agent_lost: bool,
    boot_time: Duration,
    nested_paging: bool,
    /// What it was booted with, for [`L2::reboot`].
    cfg: RigConfig,
}

impl L2 {
    /// Builds L2's initramfs (cached), boots it, and returns once its agent answered
    /// and /dev/kvm exists in it.
    pub fn boot(cfg: RigConfig) -> Result<L2, RigError> {
        let guest = crate::guest_dir()?;
        let qemu = host::ensure_tool("qemu-system-x86_64", "qemu-system-x86")?;
        let initramfs = initrd::build(&cfg, &guest)?;
        let dir = temp_dir()?;
        let start = Instant::now();

        let sock = dir.join("cmd.sock");
        let listener = UnixListener::bind(&sock).map_err(|e| RigError::io(&sock, e))?;
        let mut args: Vec<String> = vec![
            "-accel".into(),
            "tcg".into(),
            "-cpu".into(),
            "max".into(),
            "-smp".into(),
            cfg.cpus.to_string(),
            "-m".into(),
            cfg.memory_mib.to_string(),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            "-no-reboot".into(),
            "-kernel".into(),
            guest.join("vmlinuz").to_string_lossy().into_owned(),
            "-initrd".into(),
            initramfs.to_string_lossy().into_owned(),
            "-chardev".into(),
            format!("file,id=console,path={}", dir.join("console.log").display()),
            "-serial".into(),
            "chardev:console".into(),
            "-chardev".into(),
            format!("socket,id=agent,path={}", sock.display()),
            "-serial".into(),
            "chardev:agent".into(),
        ];
        let mut append = vec!["console=ttyS0".to_string(), "panic=-1".to_string()];
        if let Some(mib) = cfg.disk_mib {
            let img = dir.join("disk.img");
            let f = fs::File::create(&img).map_err(|e| RigError::io(&img, e))?;
            f.set_len(mib << 20).map_err(|e| RigError::io(&img, e))?;
            let mkfs = host::ensure_tool("mkfs.ext4", "e2fsprogs")?;
            host::run(
                Command::new(mkfs)
                    .args(["-q", "-F", "-E"])
                    .arg("lazy_itable_init=0,lazy_journal_init=0")
                    .arg(&img),
            )?;
            args.push("-drive".into());
            args.push(format!(
                "file={},if=none,id=disk0,format=raw,cache=unsafe",
                img.display()
            ));
            args.push("-device".into());
            args.push("virtio-blk-pci,drive=disk0".into());
        }
        if let Some(net) = &cfg.net {
            let last = net.ip.split('/').next().unwrap_or("").rsplit('.').next();
            let last: u8 = last.and_then(|s| s.parse().ok()).ok_or_else(|| {
                RigError::Config(format!("net ip {:?} is not an IPv4 address/prefix", net.ip))
            })?;
            args.push("-netdev".into());
            args.push(format!(
                "socket,id=net0,udp=127.0.0.1:{},localaddr=127.0.0.1:{}",
                net.peer_port, net.local_port
            ));
            args.push("-device".into());
            args.push(format!(
                "virtio-net-pci,netdev=net0,mac=52:54:00:12:34:{last:02x},romfile="
            ));
            append.push(format!("rig.ip={}", net.ip));
        }
        append.extend(cfg.kernel_args.iter().cloned());
        args.push("-append".into());
        args.push(append.join(" "));

        let mut watcher = Command::new("sh")
            .arg("-c")
            .arg(WATCHER)
            .arg("rig-qemu-watcher")
            .arg(&dir)
            .arg(&qemu)
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| RigError::HostCommand {
                command: format!("{} {}", qemu.display(), args.join(" ")),
                detail: e.to_string(),
            })?;
        let watcher_stdin = watcher.stdin.take();
        let (tx, chunks) = mpsc::channel();
        // Until the channel is connected, an L2 without one cleans up like any other.
        let mut l2 = L2 {
            watcher,
            watcher_stdin,
            dir,
            channel: UnixStream::pair()
                .map_err(|e| RigError::io("socketpair", e))?
                .0,
            chunks,
            agent_lost: false,
            boot_time: Duration::ZERO,
            nested_paging: false,
            cfg: cfg.clone(),
        };
        l2.channel = l2.accept(&listener, start + cfg.boot_timeout, cfg.boot_timeout)?;
        let mut reader = l2.channel.try_clone().map_err(|e| RigError::io(&sock, e))?;
        thread::Builder::new()
            .name("rig-l2-reader".into())
            .spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                // Ends at EOF (QEMU exited) or when `L2` (the receiver) is gone.
                while let Ok(n @ 1..) = reader.read(&mut buf) {
                    if tx.send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| RigError::io("rig-l2-reader thread", e))?;
        let (kvm, npt) = l2.wait_ready(start + cfg.boot_timeout, cfg.boot_timeout)?;
        if !kvm {
            return Err(RigError::NoKvm {
                npt,
                console: l2.console_tail(),
            });
        }
        l2.boot_time = start.elapsed();
        l2.nested_paging = npt;
        Ok(l2)
    }

    /// Runs `script` with `sh -c` in L2 (cwd /work, stdin /dev/null) and returns its
    /// output once it exited. After `timeout` the agent kills the command's process group
    /// and this returns [`RigError::Timeout`] with the output so far; L2 stays usable.
    pub fn run(&mut self, script: &str, timeout: Duration) -> Result<CmdOutput, RigError> {
        let mut output = Vec::new();
        let start = Instant::now();
        let status = self.run_with(script, timeout, &mut |b| output.extend_from_slice(b))?;
        Ok(CmdOutput {
            status,
            output: String::from_utf8_lossy(&output).into_owned(),
            elapsed: start.elapsed(),
        })
    }

    /// [`L2::run`], passing output to `sink` as it arrives; returns the exit status.
    /// On timeout, the error's `partial` repeats all output seen (already given to `sink`).
    pub fn run_with(
        &mut self,
        script: &str,
        timeout: Duration,
        sink: &mut dyn FnMut(&[u8]),
    ) -> Result<i32, RigError> {
        if self.agent_lost {
            return Err(RigError::AgentLost {
                script: script.to_string(),
            });
        }
        if script.len() > MAX_SCRIPT {
            return Err(RigError::Config(format!(
                "script of {} bytes is larger than {MAX_SCRIPT}; place big inputs with add_file",
                script.len()
            )));
        }
        // Output of background processes between commands belongs to no command.
        while self.chunks.try_recv().is_ok() {}
        let nonce = nonce();
        let secs = timeout.as_secs() + u64::from(timeout.subsec_nanos() > 0);
        let line = agent::command_line(nonce, secs.max(1), script);
        self.channel
            .write_all(&line)
            .map_err(|e| RigError::io(self.dir.join("cmd.sock"), e))?;

        let mut parser = FrameParser::new(nonce);
        let deadline = Instant::now() + timeout + AGENT_GRACE;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.chunks.recv_timeout(left) {
                Ok(chunk) => {
                    let (out, end) = parser.push(&chunk);
                    sink(&out);
                    seen.extend_from_slice(&out);
                    match end {
                        Some(end) if end.timed_out => {
                            return Err(RigError::Timeout {
                                script: script.to_string(),
                                timeout,
                                partial: String::from_utf8_lossy(&seen).into_owned(),
                                agent_alive: true,
                            })
                        }
                        Some(end) => return Ok(end.status),
                        None => {}
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    self.agent_lost = true;
                    seen.extend(parser.take_pending());
                    return Err(RigError::Timeout {
                        script: script.to_string(),
                        timeout,
                        partial: String::from_utf8_lossy(&seen).into_owned(),
                        agent_alive: false,
                    });
                }
                Err(RecvTimeoutError::Disconnected) => {
                    self.agent_lost = true;
                    return Err(self.exited(&format!("while running `{script}`")));
                }
            }
        }
    }

    /// Whether L2 stopped answering: a command outlived its timeout without the agent
    /// reporting back, or the agent's channel closed. Every later [`L2::run`] fails with
    /// [`RigError::AgentLost`]; only a new L2 helps.
    pub fn agent_lost(&self) -> bool {
        self.agent_lost
    }

    /// [`L2::reboot`] if the agent was lost (saying so on stderr, as `name`); returns
    /// whether it rebooted. For a long-lived L2 shared by tests or bench runs: nested SVM
    /// under TCG hangs now and then, and one hang should cost one test, not the rest.
    pub fn reboot_if_lost(&mut self, name: &str) -> Result<bool, RigError> {
        if !self.agent_lost {
            return Ok(false);
        }
        eprintln!("rig: {name} stopped answering; rebooting it");
        self.reboot()?;
        Ok(true)
    }

    /// Kills this L2's QEMU and boots a fresh one with the same configuration (network
    /// ports included: the old QEMU is gone first), for an L2 that stopped answering.
    /// On error `self` is a dead L2 whose commands fail with [`RigError::AgentLost`].
    pub fn reboot(&mut self) -> Result<(), RigError> {
        self.kill();
        self.agent_lost = true;
        *self = L2::boot(self.cfg.clone())?;
        Ok(())
    }

    /// Stops QEMU and removes the temporary files; idempotent.
    fn kill(&mut self) {
        // EOF on the watcher's stdin: it kills QEMU, then exits.
        drop(self.watcher_stdin.take());
        let _ = self.channel.shutdown(std::net::Shutdown::Both);
        let _ = self.watcher.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }

    /// L2's own serial console (kernel log, init messages) so far.
    pub fn console_log(&self) -> String {
        fs::read(self.dir.join("console.log"))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// From starting QEMU to the agent's first answer.
    pub fn boot_time(&self) -> Duration {
        self.boot_time
    }

    /// Whether L2's kvm_amd reported "Nested Paging enabled" (without it, KVM in L2
    /// works but is much slower).
    pub fn nested_paging(&self) -> bool {
        self.nested_paging
    }

    fn console_tail(&self) -> String {
        let log = self.console_log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(CONSOLE_TAIL_LINES)..].join("\n")
    }

    /// The error for "QEMU is gone", with everything known about why.
    fn exited(&mut self, when: &str) -> RigError {
        // The watcher exits right after QEMU; give it a moment to be reaped.
        let mut status = "still running".to_string();
        for _ in 0..20 {
            if let Ok(Some(s)) = self.watcher.try_wait() {
                status = s.to_string();
                break;
            }
            thread::sleep(Duration::from_millis(50));
        }
        RigError::QemuExited {
            when: when.to_string(),
            status,
            qemu: fs::read_to_string(self.dir.join("qemu.out")).unwrap_or_default(),
            console: self.console_tail(),
        }
    }

    fn accept(
        &mut self,
        listener: &UnixListener,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<UnixStream, RigError> {
        let sock = self.dir.join("cmd.sock");
        listener
            .set_nonblocking(true)
            .map_err(|e| RigError::io(&sock, e))?;
        loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    stream
                        .set_nonblocking(false)
                        .map_err(|e| RigError::io(&sock, e))?;
                    return Ok(stream);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(RigError::io(&sock, e)),
            }
            if matches!(self.watcher.try_wait(), Ok(Some(_))) {
                return Err(self.exited("before connecting its agent channel"));
            }
            if Instant::now() > deadline {
                return Err(RigError::BootTimeout {
                    timeout,
                    console: self.console_tail(),
                });
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_ready(
        &mut self,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<(bool, bool), RigError> {
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.chunks.recv_timeout(left) {
                Ok(chunk) => {
                    seen.extend_from_slice(&chunk);
                    if let Some(ready) = agent::parse_ready(&seen) {
                        return Ok(ready);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    return Err(RigError::BootTimeout {
                        timeout,
                        console: self.console_tail(),
                    })
                }
                Err(RecvTimeoutError::Disconnected) => return Err(self.exited("during boot")),
            }
        }
    }
}

impl Drop for L2 {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A fresh private directory for one L2's socket, console log and disk image.
fn temp_dir() -> Result<PathBuf, RigError> {
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let n = COUNT.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("hospes-rig.{}.{n}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).map_err(|e| RigError::io(&dir, e))?;
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
        .map_err(|e| RigError::io(&dir, e))?;
    Ok(dir)
}

/// An unpredictable per-command nonce, so no output can forge the end marker.
fn nonce() -> u64 {
    let mut b = [0u8; 8];
    if fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_ok()
    {
        return u64::from_le_bytes(b);
    }
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    t.as_nanos() as u64 ^ u64::from(std::process::id()).rotate_left(32)
}
