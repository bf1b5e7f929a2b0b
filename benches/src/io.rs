//! I/O benchmark, in the nested rig: the same tool (`hospes-iotool`) on the same kind of
//! filesystem, run natively on the L2 host, in the default guest under hospes, and in the
//! same guest under QEMU (`-M microvm`, virtio-blk-device cache=none, virtio-net-device on
//! a TAP, vhost off), interleaved inside one L2 boot after a warm-up round.
//!
//! Rows: sequential write and read (1 MiB O_DIRECT blocks), 4 KiB random-read IOPS at
//! queue depth 1, TCP guest→host and host→guest (native: L2 loopback), and the CPU-bound
//! Monte-Carlo pi estimator. Prints a markdown table and writes PNG charts; it never
//! passes or fails.
//!
//! The guests have no libc, so the tool, its ELF interpreter and libraries go on the
//! guest's data disk: an ext4 image made on the host with `mkfs.ext4 -d` (e2fsprogs),
//! gzipped into L2 and unpacked onto L2's own ext4 data disk, where both VMMs open it with
//! O_DIRECT. The guest mounts it on /mnt and runs `guest.sh` from it.

mod guest_image;
mod report;

use std::path::{Path, PathBuf};
use std::time::Duration;

use rig::{RigConfig, RigError};

pub use guest_image::ImageError;
pub use report::{IoReport, Row};

/// What to measure and how long; [`IoParams::default`] is what `hospes bench io` runs.
#[derive(Clone, Debug)]
pub struct IoParams {
    /// Measured rounds after the warm-up round.
    pub runs: usize,
    /// Sequential write/read size, MiB.
    pub seq_mib: u64,
    /// Random-read duration, seconds.
    pub randread_secs: u64,
    /// TCP transfer size, MiB.
    pub tcp_mib: u64,
    /// Monte-Carlo samples of the pi job.
    pub pi_samples: u64,
    /// Guest RAM, MiB.
    pub guest_mib: u64,
}

impl Default for IoParams {
    fn default() -> Self {
        IoParams {
            runs: 5,
            seq_mib: 256,
            randread_secs: 5,
            tcp_mib: 128,
            pi_samples: 30_000_000,
            guest_mib: 256,
        }
    }
}

/// Why the I/O benchmark could not run at all (a failing guest is only noted in the
/// report).
#[derive(Debug, thiserror::Error)]
pub enum IoBenchError {
    /// The rig failed: building the default guest, booting L2, or talking to it.
    #[error("rig: {0}")]
    Rig(#[from] RigError),
    /// Making the guest's data disk image failed.
    #[error("guest data disk: {0}")]
    Image(#[from] ImageError),
    /// Preparing L2 (guest image, TAP, spec) failed.
    #[error("L2 setup failed (exit status {status}):\n{output}")]
    Setup {
        /// The script's exit status.
        status: i32,
        /// Everything it printed.
        output: String,
    },
    /// The native run failed, so no ratio can be computed.
    #[error("native run failed (exit status {status}):\n{output}")]
    Native {
        /// The script's exit status.
        status: i32,
        /// Everything it printed.
        output: String,
    },
    /// The output directory for the charts could not be created.
    #[error("cannot create {path}: {source}")]
    OutDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Drawing a chart failed.
    #[error("chart: {0}")]
    Chart(#[from] crate::chart::ChartError),
}

/// The three configurations measured, in table column order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Env {
    /// The tool on the L2 host.
    Native,
    /// The tool in the default guest under hospes.
    Hospes,
    /// The tool in the default guest under QEMU microvm.
    Qemu,
}

impl Env {
    /// All, in column order.
    pub const ALL: [Env; 3] = [Env::Native, Env::Hospes, Env::Qemu];

    /// Column heading.
    pub fn name(self) -> &'static str {
        match self {
            Env::Native => "native",
            Env::Hospes => "hospes",
            Env::Qemu => "QEMU",
        }
    }
}

/// The rows measured, in table order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    /// Sequential write, MB/s.
    SeqWrite,
    /// Sequential read, MB/s.
    SeqRead,
    /// 4 KiB random read at queue depth 1, IOPS.
    RandRead,
    /// TCP guest → L2 host (native: loopback), MB/s.
    TcpGuestToHost,
    /// TCP L2 host → guest (native: loopback), MB/s.
    TcpHostToGuest,
    /// Monte-Carlo pi, seconds (lower is better).
    Pi,
}

impl Metric {
    /// All, in row order.
    pub const ALL: [Metric; 6] = [
        Metric::SeqWrite,
        Metric::SeqRead,
        Metric::RandRead,
        Metric::TcpGuestToHost,
        Metric::TcpHostToGuest,
        Metric::Pi,
    ];

    /// The unit of the absolute figures.
    pub fn unit(self) -> &'static str {
        match self {
            Metric::RandRead => "IOPS",
            Metric::Pi => "s",
            _ => "MB/s",
        }
    }

    /// Whether a larger figure is better (all but the pi job's time).
    pub fn higher_is_better(self) -> bool {
        self != Metric::Pi
    }

    /// A short label for charts.
    pub fn short(self) -> &'static str {
        match self {
            Metric::SeqWrite => "seq write",
            Metric::SeqRead => "seq read",
            Metric::RandRead => "4K rand read",
            Metric::TcpGuestToHost => "TCP g→h",
            Metric::TcpHostToGuest => "TCP h→g",
            Metric::Pi => "pi (CPU)",
        }
    }

    /// The row label of the table.
    pub fn label(self, p: &IoParams) -> String {
        match self {
            Metric::SeqWrite => {
                format!("sequential write {} MiB, 1 MiB O_DIRECT (MB/s)", p.seq_mib)
            }
            Metric::SeqRead => format!("sequential read {} MiB, 1 MiB O_DIRECT (MB/s)", p.seq_mib),
            Metric::RandRead => format!("4 KiB random read, QD 1, {} s (IOPS)", p.randread_secs),
            Metric::TcpGuestToHost => format!(
                "TCP guest → host {} MiB (MB/s; native: loopback)",
                p.tcp_mib
            ),
            Metric::TcpHostToGuest => format!(
                "TCP host → guest {} MiB (MB/s; native: loopback)",
                p.tcp_mib
            ),
            Metric::Pi => format!(
                "pi, {} M samples (s, lower is better)",
                p.pi_samples / 1_000_000
            ),
        }
    }
}

const TAP: &str = "hos-b0";
const HOST_IP: &str = "172.16.0.1";
const GUEST_IP: &str = "172.16.0.2";
const GUEST_MAC: &str = "06:00:ac:10:00:02";
const PORT_G2H: u16 = 5001;
const PORT_H2G: u16 = 5002;
const IMAGE: &str = "/data/guest.img";
/// A native round takes ~15 s in the rig, a guest round ~40 s: generous, but a hung guest
/// must not eat the benchmark's time.
const NATIVE_TIMEOUT: Duration = Duration::from_secs(300);
const GUEST_TIMEOUT: Duration = Duration::from_secs(240);

/// L2 setup, once per L2 boot: the guest image onto /data, the TAP, the hospes spec, and
/// `guest_run`, which runs a VMM command line with the L2 end of both TCP tests around it.
fn setup_script(p: &IoParams) -> String {
    let spec = format!(
        "[service]\nname = \"iobench\"\n[machine]\nvcpus = 1\nmemory_mib = {mem}\n[boot]\ncmdline = \"quiet -- {cmd}\"\n\
         [[drive]]\nid = \"data\"\npath = \"{IMAGE}\"\ncache = \"none\"\n\
         [[net]]\nid = \"net0\"\ntap = \"{TAP}\"\nmac = \"{GUEST_MAC}\"\n",
        mem = p.guest_mib,
        cmd = guest_image::GUEST_CMD,
    );
    format!(
        r#"set -e
gunzip -c /work/guest.img.gz > {IMAGE}
sync
hospes-iotool tap-create {TAP}
ip addr add {HOST_IP}/24 dev {TAP}
ip link set {TAP} up
cat > /work/iobench.toml <<'SPEC'
{spec}SPEC
echo setup done
"#
    )
}

/// Shell function: `guest_run VMM ARGS...`: a TCP receiver for the guest's send, the VMM
/// (its console echoed), and a TCP sender started when the guest says it listens. Host-side
/// results are printed with a `HOST ` prefix.
fn guest_run_fn(p: &IoParams) -> String {
    format!(
        r#"
guest_run() {{
	cd /work
	rm -f vmm.fifo g2h.out h2g.out; mkfifo vmm.fifo
	hospes-iotool tcp-recv {PORT_G2H} >g2h.out 2>&1 &
	recv=$!
	"$@" >vmm.fifo 2>&1 &
	vmm=$!
	while IFS= read -r line; do
		echo "$line"
		case "$line" in
		*"LISTENING {PORT_H2G}"*) hospes-iotool tcp-send {GUEST_IP}:{PORT_H2G} {mib} >h2g.out 2>&1 & ;;
		esac
	done <vmm.fifo
	wait $vmm
	st=$?
	kill $recv 2>/dev/null || true
	wait
	sed 's/^/HOST /' g2h.out h2g.out 2>/dev/null || true
	return $st
}}
"#,
        mib = p.tcp_mib
    )
}

fn native_script(p: &IoParams) -> String {
    format!(
        r#"set -e
cd /data
sync; echo 3 >/proc/sys/vm/drop_caches
hospes-iotool seqwrite /data/io.dat {seq}
hospes-iotool seqread /data/io.dat {seq}
hospes-iotool randread /data/io.dat {rand}
hospes-iotool tcp-recv {PORT_G2H} >/work/lo.out 2>&1 &
hospes-iotool tcp-send 127.0.0.1:{PORT_G2H} {tcp} >/dev/null
wait
cat /work/lo.out
hospes-iotool pi {pi}
"#,
        seq = p.seq_mib,
        rand = p.randread_secs,
        tcp = p.tcp_mib,
        pi = p.pi_samples
    )
}

fn vmm_command(env: Env, p: &IoParams) -> String {
    match env {
        Env::Native => String::new(),
        Env::Hospes => "HOSPES_GUEST_DIR=/guest guest_run hospes run /work/iobench.toml".to_string(),
        Env::Qemu => format!(
            "guest_run qemu-system-x86_64 -M microvm,acpi=on -enable-kvm -cpu host -m {mem} -smp 1 \
             -nodefaults -no-user-config -nographic -no-reboot -serial stdio \
             -kernel /guest/vmlinuz -initrd /guest/initramfs.cpio.gz \
             -append 'console=ttyS0 reboot=k panic=1 pci=off quiet -- {cmd}' \
             -drive id=d0,file={IMAGE},format=raw,if=none,cache=none,aio=threads -device virtio-blk-device,drive=d0 \
             -netdev tap,id=n0,ifname={TAP},script=no,downscript=no,vhost=off \
             -device virtio-net-device,netdev=n0,mac={GUEST_MAC}",
            mem = p.guest_mib,
            cmd = guest_image::GUEST_CMD,
        ),
    }
}

/// One run's figures, by metric, from the tool's `RESULT` lines.
fn parse(env: Env, output: &str) -> Vec<(Metric, f64)> {
    let mut found = Vec::new();
    for line in output.lines().map(|l| l.trim_end_matches('\r')) {
        let (host, rest) = match line.strip_prefix("HOST ") {
            Some(r) => (true, r),
            None => (false, line),
        };
        // The console may prefix a line with kernel noise; the tool's text starts at RESULT.
        let Some(at) = rest.find("RESULT ") else {
            continue;
        };
        let mut words = rest[at + 7..].split_whitespace();
        let (Some(what), Some(Ok(value))) = (words.next(), words.next().map(str::parse::<f64>))
        else {
            continue;
        };
        let metric = match (what, env, host) {
            ("seqwrite", _, false) => Metric::SeqWrite,
            ("seqread", _, false) => Metric::SeqRead,
            ("randread", _, false) => Metric::RandRead,
            ("pi", _, false) => Metric::Pi,
            // Native: loopback, one figure for both directions.
            ("tcp-recv", Env::Native, _) => {
                found.push((Metric::TcpGuestToHost, value));
                Metric::TcpHostToGuest
            }
            // Receiver-side figures only: the L2 host received the guest's send...
            ("tcp-recv", _, true) => Metric::TcpGuestToHost,
            // ...and the guest received the L2 host's.
            ("tcp-recv", _, false) => Metric::TcpHostToGuest,
            _ => continue,
        };
        found.push((metric, value));
    }
    found
}

/// Runs the I/O benchmark: `hospes` and `iotool` are the binaries placed in L2, the charts
/// go into `out_dir`. `progress` gets a line per run.
pub fn run(
    hospes: &Path,
    iotool: &Path,
    out_dir: &Path,
    params: &IoParams,
    progress: &mut dyn FnMut(&str),
) -> Result<IoReport, IoBenchError> {
    std::fs::create_dir_all(out_dir).map_err(|source| IoBenchError::OutDir {
        path: out_dir.to_path_buf(),
        source,
    })?;
    let guest = rig::guest_dir()?;
    let image = guest_image::build(iotool, params)?;
    // Room for the native test file, the guest image and ext4's own overhead.
    let disk_mib = params.seq_mib + guest_image::image_mib(params) + 256;
    let cfg = RigConfig::default()
        .cpus(2)
        .memory_mib(2048)
        .disk_mib(disk_mib)
        .add_qemu()
        .add_binary(hospes, "/usr/local/bin/hospes")
        .add_binary(iotool, "/usr/local/bin/hospes-iotool")
        .add_file(guest.join("vmlinuz"), "/guest/vmlinuz")
        .add_file(guest.join("initramfs.cpio.gz"), "/guest/initramfs.cpio.gz")
        .add_file(image.path(), "/work/guest.img.gz");
    progress("booting L2");
    let mut l2 = rig::L2::boot(cfg)?;
    let out = l2.run(&setup_script(params), Duration::from_secs(300))?;
    if out.status != 0 {
        return Err(IoBenchError::Setup {
            status: out.status,
            output: out.output,
        });
    }
    let guest_run = guest_run_fn(params);
    let mut report = IoReport::new(params.clone());
    // Round 0 warms up (L1/L2 page cache, THP, ARP); rounds 1..=runs are measured, the
    // order rotating each round so that drift inside the L2 boot hits all alike.
    for round in 0..=params.runs {
        for k in 0..Env::ALL.len() {
            let env = Env::ALL[(k + round) % Env::ALL.len()];
            let script = match env {
                Env::Native => native_script(params),
                _ => format!(
                    "{guest_run}\nsync; echo 3 >/proc/sys/vm/drop_caches\n{}",
                    vmm_command(env, params)
                ),
            };
            let timeout = if env == Env::Native {
                NATIVE_TIMEOUT
            } else {
                GUEST_TIMEOUT
            };
            let out = match l2.run(&script, timeout) {
                Ok(out) => out,
                // A hung guest costs one run, not the benchmark, while L2 still answers.
                Err(RigError::Timeout {
                    partial,
                    agent_alive: true,
                    ..
                }) if env != Env::Native => {
                    progress(&format!(
                        "round {round} {}: timed out after {timeout:?}",
                        env.name()
                    ));
                    report.note_failure(
                        env,
                        round,
                        -1,
                        &format!("{partial}\n(timed out after {timeout:?})"),
                    );
                    continue;
                }
                Err(e) => {
                    // L2 is gone or wedged: keep what was measured so far.
                    let console = l2.console_log();
                    let tail: Vec<&str> = console.lines().rev().take(30).collect();
                    let tail: Vec<&str> = tail.into_iter().rev().collect();
                    progress(&format!("round {round} {}: {e}", env.name()));
                    report.note_failure(
                        env,
                        round,
                        -1,
                        &format!("{e}\nL2 console (tail):\n{}", tail.join("\n")),
                    );
                    report.write_charts(out_dir)?;
                    return Ok(report);
                }
            };
            let figures = parse(env, &out.output);
            let shown: Vec<String> = figures
                .iter()
                .map(|(m, v)| format!("{} {v:.1}", m.short()))
                .collect();
            progress(&format!(
                "round {round} {} ({:.0} s, exit {}): {}",
                env.name(),
                out.elapsed.as_secs_f64(),
                out.status,
                shown.join(", ")
            ));
            if env == Env::Native && out.status != 0 {
                return Err(IoBenchError::Native {
                    status: out.status,
                    output: out.output,
                });
            }
            if figures.len() < Metric::ALL.len() || out.status != 0 {
                report.note_failure(env, round, out.status, &out.output);
            }
            if round > 0 {
                for (metric, value) in figures {
                    report.push(env, metric, value);
                }
            }
        }
    }
    report.write_charts(out_dir)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_guest_console_and_host_lines() {
        let out = "hospes-guest: ready uptime=1.2\r\nRESULT seqwrite 120.5 MB/s\r\n[ 3.1] x RESULT seqread 99 MB/s\n\
                   RESULT randread 1500 IOPS\nLISTENING 5002\nRESULT tcp-recv 80.0 MB/s (1 bytes)\nRESULT pi 2.5 s\n\
                   HOST RESULT tcp-recv 70.0 MB/s (2 bytes)\nHOST RESULT tcp-send 69.0 MB/s\n";
        let got = parse(Env::Hospes, out);
        assert_eq!(
            got,
            vec![
                (Metric::SeqWrite, 120.5),
                (Metric::SeqRead, 99.0),
                (Metric::RandRead, 1500.0),
                (Metric::TcpHostToGuest, 80.0),
                (Metric::Pi, 2.5),
                (Metric::TcpGuestToHost, 70.0),
            ]
        );
    }

    #[test]
    fn native_loopback_fills_both_tcp_rows() {
        let got = parse(Env::Native, "RESULT tcp-recv 500 MB/s (3 bytes)\n");
        assert_eq!(
            got,
            vec![
                (Metric::TcpGuestToHost, 500.0),
                (Metric::TcpHostToGuest, 500.0)
            ]
        );
    }
}
