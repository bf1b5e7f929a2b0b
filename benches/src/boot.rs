//! Boot benchmark, in the nested rig: time from process start to the default guest's
//! ready line, and the VMM's resident memory beyond guest RAM at that moment, for hospes
//! and for QEMU (`-M microvm,acpi=on -enable-kvm`) booting the same kernel and initramfs.
//! Interleaved runs inside one L2 boot after a warm-up of each, median of `runs`.
//!
//! `hospes bench boot` (HOSPES_BENCH_RUNS changes the default 5 runs).

use std::path::{Path, PathBuf};
use std::time::Duration;

use rig::{RigConfig, RigError};

const GUEST_MIB: u64 = 256;
const CMDLINE: &str = "quiet -- poweroff -f";

/// Why the boot benchmark could not produce its table.
#[derive(Debug, thiserror::Error)]
pub enum BootBenchError {
    /// The rig failed: building the guest, booting L2, or running a command in it.
    #[error("rig: {0}")]
    Rig(#[from] RigError),
    /// A VMM run printed no `READY` line (the guest did not come up).
    #[error("{vmm}: no ready line (exit status {status}):\n{output}")]
    NoReadyLine {
        /// "hospes" or "QEMU microvm".
        vmm: String,
        /// The measuring script's exit status.
        status: i32,
        /// Everything it printed.
        output: String,
    },
}

/// Runs a VMM command line in L2, prints `READY <seconds> <rss-beyond-ram-kib>` once the
/// guest's ready line appears, then waits for the VMM to exit.
const MEASURE: &str = r#"
measure() {
	rm -f out.fifo; mkfifo out.fifo
	read t0 _ </proc/uptime
	"$@" >out.fifo 2>&1 &
	pid=$!
	while IFS= read -r line; do
		case "$line" in
		*"hospes-guest: ready"*)
			read t1 _ </proc/uptime
			# Resident memory of every mapping except guest RAM (the mapping(s) of the
			# guest's size, give or take QEMU's alignment).
			rss=$(awk -v ram=$((RAM_MIB * 1024)) '
				/^[0-9a-f]+-[0-9a-f]+ / { inram = 0 }
				/^Size:/ { inram = ($2 >= ram && $2 <= ram + 4096) }
				/^Rss:/ { if (!inram) sum += $2 }
				END { print sum }' /proc/$pid/smaps)
			echo "READY $(awk -v a=$t0 -v b=$t1 'BEGIN { print b - a }') $rss"
			;;
		esac
	done <out.fifo
	wait $pid
}
"#;

/// One VMM's measured runs.
#[derive(Clone, Debug)]
pub struct BootRow {
    /// "hospes" or "QEMU microvm".
    pub vmm: String,
    /// Process start → ready line, seconds, one per measured run.
    pub seconds: Vec<f64>,
    /// Resident memory beyond guest RAM at the ready line, MiB, one per measured run.
    pub rss_mib: Vec<f64>,
}

/// The boot benchmark's result.
#[derive(Clone, Debug)]
pub struct BootReport {
    /// Measured runs per VMM.
    pub runs: usize,
    /// hospes first, then QEMU.
    pub rows: Vec<BootRow>,
}

pub(crate) fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn min_max(v: &[f64]) -> (f64, f64) {
    (
        v.iter().cloned().fold(f64::MAX, f64::min),
        v.iter().cloned().fold(0.0, f64::max),
    )
}

impl BootReport {
    /// The markdown table (with its caption).
    pub fn markdown(&self) -> String {
        let mut s = format!(
            "Boot to the default guest's ready line, {GUEST_MIB} MiB guest, in one L2 boot, median of {} (min–max):\n\n",
            self.runs
        );
        s.push_str(
            "| VMM | process start → ready (s) | RSS beyond guest RAM (MiB) |\n|---|---|---|\n",
        );
        for row in &self.rows {
            let (lo, hi) = min_max(&row.seconds);
            let (rlo, rhi) = min_max(&row.rss_mib);
            s.push_str(&format!(
                "| {} | {:.2} ({lo:.2}–{hi:.2}) | {:.1} ({rlo:.1}–{rhi:.1}) |\n",
                row.vmm,
                median(&row.seconds),
                median(&row.rss_mib)
            ));
        }
        s
    }
}

/// Runs the boot benchmark with the `hospes` binary at `hospes` (placed in L2): a warm-up
/// round, then `runs` rounds alternating hospes and QEMU. `progress` gets one line per run.
pub fn run(
    hospes: &Path,
    runs: usize,
    progress: &mut dyn FnMut(&str),
) -> Result<BootReport, BootBenchError> {
    let guest: PathBuf = rig::guest_dir()?;
    let cfg = RigConfig::default()
        .cpus(2)
        .add_binary(hospes, "/usr/local/bin/hospes")
        .add_qemu()
        .add_file(guest.join("vmlinuz"), "/guest/vmlinuz")
        .add_file(guest.join("initramfs.cpio.gz"), "/guest/initramfs.cpio.gz");
    let mut l2 = rig::L2::boot(cfg)?;
    let spec = format!("[service]\nname = \"bench\"\n[machine]\nmemory_mib = {GUEST_MIB}\n[boot]\ncmdline = \"{CMDLINE}\"\n");
    let setup = format!("cat > bench.toml <<'SPEC'\n{spec}SPEC\nexport HOSPES_GUEST_DIR=/guest RAM_MIB={GUEST_MIB}\n{MEASURE}");
    let vmms: [(&str, String); 2] = [
        ("hospes", "measure hospes run bench.toml".to_string()),
        (
            "QEMU microvm",
            format!(
                "measure qemu-system-x86_64 -M microvm,acpi=on -enable-kvm -cpu host -m {GUEST_MIB} -smp 1 \
                 -nodefaults -no-user-config -nographic -no-reboot -serial stdio \
                 -kernel /guest/vmlinuz -initrd /guest/initramfs.cpio.gz \
                 -append 'console=ttyS0 reboot=k panic=1 pci=off {CMDLINE}'"
            ),
        ),
    ];
    let mut rows: Vec<BootRow> = vmms
        .iter()
        .map(|(name, _)| BootRow {
            vmm: name.to_string(),
            seconds: Vec::new(),
            rss_mib: Vec::new(),
        })
        .collect();
    // Round 0 is the warm-up (page cache, THP pool); rounds 1..=runs are measured,
    // alternating VMMs so that drift inside the L2 boot hits both alike.
    for round in 0..=runs {
        for (row, (name, cmd)) in rows.iter_mut().zip(&vmms) {
            let out = l2.run(
                &format!("cd /work; {setup}\n{cmd}"),
                Duration::from_secs(300),
            )?;
            let ready = out
                .output
                .lines()
                .find_map(|l| l.strip_prefix("READY "))
                .map(|r| {
                    let mut it = r
                        .split_whitespace()
                        .map(|x| x.parse::<f64>().unwrap_or(f64::NAN));
                    (it.next().unwrap_or(f64::NAN), it.next().unwrap_or(f64::NAN))
                });
            let Some((t, kib)) = ready else {
                return Err(BootBenchError::NoReadyLine {
                    vmm: name.to_string(),
                    status: out.status,
                    output: out.output,
                });
            };
            progress(&format!(
                "round {round} {name}: ready after {t:.2} s, {:.1} MiB beyond guest RAM",
                kib / 1024.0
            ));
            if round > 0 {
                row.seconds.push(t);
                row.rss_mib.push(kib / 1024.0);
            }
        }
    }
    Ok(BootReport { runs, rows })
}
