//! The `hospes` command line: parses arguments, runs one subcommand, maps errors to exit
//! codes (2: bad input such as an invalid spec; 1: any other failure).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vmm::vm::{Outcome, RunOptions};
use vmm::VmmError;

#[derive(Parser)]
#[command(
    name = "hospes",
    version,
    about = "microVMs for services that move between peers while they run"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot the microVM a service spec describes and run it until it stops.
    Run {
        /// The service spec (TOML).
        spec: PathBuf,
        /// Serve the control API (HTTP/1.1 + JSON, docs/api.yaml) on this Unix socket.
        #[arg(long, value_name = "PATH")]
        api_sock: Option<PathBuf>,
    },
    /// Continue a VM from a snapshot directory (`hospes ctl SOCKET snapshot DIR`). The VM
    /// runs on the drive images inside DIR: restoring consumes the snapshot.
    Restore {
        /// The snapshot directory.
        dir: PathBuf,
        /// Serve the control API on this Unix socket.
        #[arg(long, value_name = "PATH")]
        api_sock: Option<PathBuf>,
    },
    /// Wait for one VM migrated here (`hospes migrate`), then run it. Its drive images are
    /// made in --dir.
    Receive {
        /// Where to listen for the source (UDP, QUIC), e.g. 0.0.0.0:4430.
        #[arg(long, value_name = "ADDR")]
        listen: std::net::SocketAddr,
        /// This peer's identity key (`hospes keygen`).
        #[arg(long, value_name = "KEY")]
        identity: PathBuf,
        /// The public key of a peer allowed to send a VM (repeatable).
        #[arg(long, value_name = "PUBKEY", required = true, num_args = 1..)]
        trust: Vec<p2p::PeerId>,
        /// Where to make the drive images.
        #[arg(long, value_name = "DIR", default_value = ".")]
        dir: PathBuf,
        /// Serve the control API on this Unix socket once the VM runs.
        #[arg(long, value_name = "PATH")]
        api_sock: Option<PathBuf>,
    },
    /// Move a running VM to another hospes (`hospes receive`) while it runs. Shows its
    /// progress on a terminal and prints one summary line. On any failure before the
    /// hand-over the VM runs on here.
    Migrate {
        /// The VM's API socket.
        socket: PathBuf,
        /// The destination's address.
        #[arg(long, value_name = "ADDR")]
        to: String,
        /// The destination's public key.
        #[arg(long, value_name = "PUBKEY")]
        peer: String,
        /// This peer's identity key (the destination must trust its public key).
        #[arg(long, value_name = "KEY")]
        identity: PathBuf,
        /// The longest the guest may be paused.
        #[arg(long, value_name = "MS", default_value_t = vmm::api::DEFAULT_DOWNTIME_MS)]
        downtime_ms: u64,
        /// When pre-copy does not converge: slow the vCPUs down step by step ("throttle",
        /// auto-converge) or give up after the round limit and run on here ("abort").
        #[arg(long, value_name = "HOW", default_value = "throttle", value_parser = ["throttle", "abort"])]
        converge: String,
        /// Print the migration's record as JSON on stdout (the summary line goes to stderr):
        /// total and downtime in ms, bytes on the wire, rounds, pages and blocks per round.
        #[arg(long)]
        json: bool,
    },
    /// Validate a service spec without starting anything.
    Check {
        /// The service spec (TOML).
        spec: PathBuf,
    },
    /// Control a running VM through its API socket (`hospes run --api-sock`).
    Ctl {
        /// The VM's API socket.
        socket: PathBuf,
        #[command(subcommand)]
        action: CtlCommand,
    },
    /// Make a peer identity: a new Ed25519 key written to FILE (PKCS#8 DER, mode 0600, never
    /// overwriting). Prints the public key, the peer id by which other peers name and trust
    /// this one.
    Keygen {
        /// Where to write the private key; must not exist yet.
        file: PathBuf,
    },
    /// Benchmarks in the nested test rig (benches/): print figures, never pass or fail.
    Bench {
        #[command(subcommand)]
        which: BenchCommand,
    },
}

#[derive(Subcommand)]
enum CtlCommand {
    /// Print the VM's state, spec and uptime.
    Status,
    /// Pause the vCPUs.
    Pause,
    /// Resume paused vCPUs.
    Resume,
    /// Stop the VM; hospes exits.
    Shutdown,
    /// Write a snapshot of the running or paused VM into DIR.
    Snapshot {
        /// Where to write it (relative to this command's working directory).
        dir: PathBuf,
        /// What the VM does once the snapshot is written.
        #[arg(long, value_parser = ["resume", "stop"], default_value = "resume")]
        then: String,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Boot time and memory beyond guest RAM, hospes vs QEMU (HOSPES_BENCH_RUNS, default 5).
    Boot,
    /// Snapshot and restore-to-running time and the memory file's size, 256 MiB and 1 GiB
    /// guests, hospes vs QEMU saving to a file (HOSPES_BENCH_RUNS, default 3).
    Snapshot,
    /// Live migration, hospes vs QEMU (in the clear and over TLS) in one L2 over loopback:
    /// idle 512 MiB / 1 GiB guests and 64 / 256 MiB dirtying working sets, 50 ms downtime
    /// budget (500 ms where hospes does not converge); HOSPES_BENCH_RUNS (default 3), HOSPES_BENCH_MIGRATE_* (see
    /// benches/src/migrate.rs).
    Migrate,
    /// Disk, network and CPU: native vs the guest under hospes vs under QEMU; a markdown
    /// table and PNG charts (HOSPES_BENCH_RUNS, default 5). Needs `hospes-iotool` next to
    /// this binary (`cargo build --release -p hospes-bench --bin hospes-iotool`) or in
    /// HOSPES_IOTOOL.
    Io {
        /// Directory for the PNG charts.
        #[arg(long, default_value = "target/bench")]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    // HOSPES_LOG=error|warn|info|debug|trace; a plain level keeps the binary (and the VMM's
    // resident memory) free of a regex engine.
    let level = std::env::var("HOSPES_LOG")
        .ok()
        .and_then(|l| l.parse::<tracing::Level>().ok())
        .unwrap_or(tracing::Level::WARN);
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(level)
        .init();
    let result = match Cli::parse().command {
        Command::Bench { which } => {
            return match bench(which) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("hospes bench: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::Ctl { socket, action } => {
            return match ctl(&socket, action) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    // Each message already carries its cause; `{e:#}` would repeat it.
                    eprintln!("hospes: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::Migrate {
            socket,
            to,
            peer,
            identity,
            downtime_ms,
            converge,
            json,
        } => {
            let how = MigrateHow {
                downtime_ms,
                converge,
                json,
            };
            return match migrate(&socket, &to, &peer, &identity, &how) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("hospes: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::Keygen { file } => {
            return match keygen(&file) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("hospes: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::Check { spec } => check(&spec),
        Command::Run { spec, api_sock } => run(&spec, api_sock),
        Command::Restore { dir, api_sock } => restore(&dir, api_sock),
        Command::Receive {
            listen,
            identity,
            trust,
            dir,
            api_sock,
        } => receive(vmm::migration::destination::ReceiveOptions {
            listen,
            identity,
            trust,
            dir,
            api_socket: api_sock,
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hospes: {e}");
            match e {
                VmmError::Spec(_)
                | VmmError::NoDefaultGuest { .. }
                | VmmError::BadSnapshot { .. } => ExitCode::from(2),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

fn bench(which: BenchCommand) -> anyhow::Result<()> {
    use anyhow::Context;
    let hospes = std::env::current_exe().context("cannot find the running hospes binary")?;
    let runs = std::env::var("HOSPES_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok());
    let mut progress = |line: &str| eprintln!("{line}");
    match which {
        BenchCommand::Boot => {
            let report = bench::boot::run(&hospes, runs.unwrap_or(5), &mut progress)?;
            println!("\n{}", report.markdown());
        }
        BenchCommand::Snapshot => {
            let report = bench::snapshot::run(&hospes, runs.unwrap_or(3), &mut progress)?;
            println!("\n{}", report.markdown());
        }
        BenchCommand::Migrate => {
            let params =
                bench::migrate::MigrateParams::from_env(runs).map_err(anyhow::Error::msg)?;
            let report = bench::migrate::run(&hospes, &params, &mut progress)?;
            println!("\n{}", report.markdown());
            for log in &report.failure_logs {
                eprintln!("\n{log}");
            }
        }
        BenchCommand::Io { out } => {
            let iotool = match std::env::var_os("HOSPES_IOTOOL") {
                Some(p) => PathBuf::from(p),
                None => hospes.with_file_name("hospes-iotool"),
            };
            anyhow::ensure!(
                iotool.is_file(),
                "no I/O tool at {}: build it with `cargo build --release -p hospes-bench --bin hospes-iotool` \
                 (into the same target directory as hospes) or set HOSPES_IOTOOL",
                iotool.display()
            );
            let mut params = bench::io::IoParams::default();
            if let Some(runs) = runs {
                params.runs = runs;
            }
            let report = bench::io::run(&hospes, &iotool, &out, &params, &mut progress)?;
            println!("\n{}", report.markdown());
            for log in &report.failure_logs {
                eprintln!("\n{log}");
            }
            for chart in &report.charts {
                println!("chart: {}", chart.display());
            }
        }
    }
    Ok(())
}

/// `hospes ctl`: one API request; prints the JSON answer, or fails with its error.
fn ctl(socket: &Path, action: CtlCommand) -> anyhow::Result<()> {
    let (method, path, body) = match action {
        CtlCommand::Status => ("GET", "/vm", None),
        CtlCommand::Pause => ("PUT", "/vm/pause", None),
        CtlCommand::Resume => ("PUT", "/vm/resume", None),
        CtlCommand::Shutdown => ("PUT", "/vm/shutdown", None),
        CtlCommand::Snapshot { dir, then } => {
            // The server resolves relative paths against its own directory; the user
            // means this one.
            let dir = std::path::absolute(&dir).map_err(|e| {
                anyhow::anyhow!("cannot resolve snapshot dir {}: {e}", dir.display())
            })?;
            let Some(dir) = dir.to_str() else {
                anyhow::bail!("snapshot dir {} is not valid UTF-8", dir.display());
            };
            let body = serde_json::json!({ "dir": dir, "then": then });
            ("PUT", "/snapshot", Some(body))
        }
    };
    let response = vmm::api::request(socket, method, path, body.as_ref())?;
    if !response.is_success() {
        let message = match response.error_message() {
            Some(m) => m.to_owned(),
            None => response.body.to_string(),
        };
        anyhow::bail!("{message} (HTTP {})", response.status);
    }
    if !response.body.is_null() {
        println!("{}", serde_json::to_string_pretty(&response.body)?);
    }
    Ok(())
}

/// `hospes migrate`'s options beyond where to.
struct MigrateHow {
    downtime_ms: u64,
    converge: String,
    json: bool,
}

/// `hospes migrate`: one `PUT /migrate`, answered when the migration ends, while
/// `GET /vm` is polled for the progress line; one summary line either way.
fn migrate(
    socket: &Path,
    to: &str,
    peer: &str,
    identity: &Path,
    how: &MigrateHow,
) -> anyhow::Result<()> {
    let identity = std::path::absolute(identity)
        .map_err(|e| anyhow::anyhow!("cannot resolve {}: {e}", identity.display()))?;
    let body = serde_json::json!({
        "to": to,
        "peer": peer,
        "identity": identity,
        "downtime_ms": how.downtime_ms,
        "converge": how.converge,
    });
    let owned = socket.to_path_buf();
    let request =
        std::thread::spawn(move || vmm::api::request(&owned, "PUT", "/migrate", Some(&body)));
    // Drawn on stderr when it is a terminal, hidden otherwise.
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(indicatif::ProgressStyle::with_template(
        "{spinner} {elapsed:>4} {msg}",
    )?);
    while !request.is_finished() {
        if let Ok(status) = vmm::api::request(socket, "GET", "/vm", None) {
            if let Some(p) = status.body.pointer("/migration/progress") {
                bar.set_message(progress_line(p));
            }
        }
        bar.tick();
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    bar.finish_and_clear();
    let response = request
        .join()
        .map_err(|_| anyhow::anyhow!("the API request thread panicked"))??;
    if !response.is_success() {
        let message = match response.error_message() {
            Some(m) => m.to_owned(),
            None => response.body.to_string(),
        };
        anyhow::bail!("{message} (HTTP {})", response.status);
    }
    let b = &response.body;
    let f = |k: &str| b.get(k).and_then(serde_json::Value::as_f64).unwrap_or(0.0);
    let line = format!(
        "migrated to {to}: total_ms={:.1} downtime_ms={:.1} rounds={} bytes={} pages={} blocks={} bandwidth_MBps={:.1}",
        f("total_ms"),
        f("downtime_ms"),
        f("rounds"),
        f("bytes"),
        f("pages"),
        f("blocks"),
        f("bandwidth_bytes_per_s") / 1e6
    );
    if how.json {
        eprintln!("{line}");
        println!("{}", serde_json::to_string(b)?);
    } else {
        println!("{line}");
    }
    Ok(())
}

/// One line of a running migration's progress (`GET /vm`'s `migration.progress`).
fn progress_line(p: &serde_json::Value) -> String {
    let f = |k: &str| p.get(k).and_then(serde_json::Value::as_f64).unwrap_or(0.0);
    let phase = p.get("phase").and_then(|v| v.as_str()).unwrap_or("?");
    format!(
        "{phase} round {}: {:.1} MB sent at {:.1} MB/s, guest dirtying {:.1} MB/s, {:.1} MB to go, downtime now ~{:.0} ms",
        f("round"),
        f("bytes") / 1e6,
        f("bandwidth_bytes_per_s") / 1e6,
        f("dirty_bytes_per_s") / 1e6,
        f("remaining_bytes") / 1e6,
        f("expected_downtime_ms")
    )
}

/// `hospes receive`: waits for one VM and runs it.
fn receive(options: vmm::migration::destination::ReceiveOptions) -> Result<(), VmmError> {
    let outcome = vmm::migration::destination::receive(&options)?;
    report("received VM", outcome);
    Ok(())
}

/// `hospes keygen`: writes a new identity key and prints its peer id.
fn keygen(file: &Path) -> Result<(), p2p::IdentityError> {
    let identity = p2p::Identity::generate()?;
    identity.save(file)?;
    println!("{}", identity.public_key());
    Ok(())
}

/// `hospes check`: validates a spec and summarizes it.
fn check(spec: &Path) -> Result<(), VmmError> {
    let s = vmm::spec::load(spec)?;
    println!(
        "{}: service {:?}, {} vCPU, {} MiB, {} drive(s), {} network interface(s): ok",
        spec.display(),
        s.name,
        s.vcpus,
        s.memory_mib,
        s.drives.len(),
        s.nets.len()
    );
    Ok(())
}

/// `hospes run`: boots the spec's VM and reports how it ended. The API socket comes from
/// `--api-sock`, else from the spec's `[api] socket`.
fn run(spec: &Path, api_sock: Option<PathBuf>) -> Result<(), VmmError> {
    let s = vmm::spec::load(spec)?;
    vmm::vm::check_host()?;
    let files = vmm::vm::boot_files(&s)?;
    let options = RunOptions {
        api_socket: api_sock.or_else(|| s.api_socket.clone()),
    };
    let outcome = vmm::vm::run(&s, &files, &options)?;
    report(&s.name, outcome);
    Ok(())
}

/// `hospes restore`: continues the VM saved in `dir`.
fn restore(dir: &Path, api_sock: Option<PathBuf>) -> Result<(), VmmError> {
    // The snapshot is checked before the host: a bad one is reported as such anywhere.
    let options = RunOptions {
        api_socket: api_sock,
    };
    let outcome = vmm::checkpoint::restore(dir, &options)?;
    report(&dir.display().to_string(), outcome);
    Ok(())
}

fn report(name: &str, outcome: Outcome) {
    match outcome {
        Outcome::PowerOff => eprintln!("hospes: guest {name:?} powered off"),
        Outcome::Reset => eprintln!("hospes: guest {name:?} rebooted; a microVM stops on reboot"),
        Outcome::Signal(sig) => eprintln!("hospes: stopped guest {name:?} on signal {sig}"),
        Outcome::Shutdown => eprintln!("hospes: guest {name:?} stopped through the API"),
        Outcome::Migrated { to } => eprintln!("hospes: guest {name:?} migrated to {to}"),
        Outcome::Snapshotted(dir) => eprintln!(
            "hospes: guest {name:?} saved to {} and stopped",
            dir.display()
        ),
    }
}
