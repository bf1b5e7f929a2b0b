//! Snapshot benchmark, in the nested rig: how long saving a running guest to a file takes,
//! how long a new process takes from its start to the restored guest running again, and
//! how much disk the memory file allocates against guest RAM, for hospes
//! (`hospes ctl SOCK snapshot DIR --then stop`, `hospes restore DIR`) and for QEMU
//! (`-M microvm,acpi=on -enable-kvm`) saving and loading the same guest through a file
//! (`stop`, `migrate "exec:cat > FILE"`, `-incoming "exec:cat FILE"`).
//!
//! The guest, the same for both: the default guest fills 64 MiB of tmpfs with random data,
//! prints `filled`, then `t` every 20 ms. A snapshot is taken once `filled` and a few `t`
//! lines are out; "running again" is the first `t` line the restored process prints.
//! Guests of 256 MiB and 1 GiB; for each, a warm-up round, then interleaved measured
//! rounds inside one L2 boot, median of `runs`.
//!
//! QEMU is set up to compete at its best: `max-bandwidth` is raised from 7.2's default of
//! 128 MiB/s to 100 GiB/s before the timing starts, and the source runs with
//! `-global migration.store-global-state=off`, without which a guest stopped before the
//! migration stays paused on the destination until a monitor `cont` (that is what
//! `-incoming` does with a stopped source by default); with it, the destination runs the
//! guest as soon as it is loaded, as `hospes restore` does. hospes syncs its files before
//! it answers; `cat > FILE` does not, so QEMU's time excludes writeback, and both get a
//! `sync` before the restore is timed.
//!
//! `hospes bench snapshot` (HOSPES_BENCH_RUNS changes the default 3 runs).

use std::path::{Path, PathBuf};
use std::time::Duration;

use rig::{RigConfig, RigError};

use crate::boot::median;

/// Guest RAM sizes measured, MiB.
pub const GUEST_SIZES_MIB: [u64; 2] = [256, 1024];

/// The guest's command (after ` -- ` on its kernel command line). It goes inside double
/// quotes on the command line and inside single quotes in TOML and in the shell, so it
/// has neither.
const GUEST_CMD: &str = "mkdir -p /dev/shm; mount -t tmpfs tmpfs /dev/shm; \
     dd if=/dev/urandom of=/dev/shm/fill bs=1M count=64 2>/dev/null; echo filled; \
     while true; do echo t; usleep 20000; done";

/// Each VMM's whole cycle (boot, snapshot, restore, clean-up) must end within this.
const CYCLE_TIMEOUT: Duration = Duration::from_secs(1800);

/// Why the snapshot benchmark could not produce its table.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotBenchError {
    /// The rig failed: building the guest, booting L2, or running a command in it.
    #[error("rig: {0}")]
    Rig(#[from] RigError),
    /// The guest never printed `filled` and the `t` lines after it.
    #[error("{vmm}, {guest_mib} MiB: the guest did not fill its memory and tick:\n{output}")]
    NotFilled {
        /// "hospes" or "QEMU microvm".
        vmm: String,
        /// Guest RAM, MiB.
        guest_mib: u64,
        /// Everything the measuring script printed.
        output: String,
    },
    /// QEMU's migration to the file failed.
    #[error("QEMU microvm, {guest_mib} MiB: migration to the file failed:\n{output}")]
    MigrationFailed {
        /// Guest RAM, MiB.
        guest_mib: u64,
        /// Everything the measuring script printed.
        output: String,
    },
    /// Anything else: the snapshot or restore failed, or the restored guest never ticked.
    #[error("{vmm}, {guest_mib} MiB: no result (exit status {status}):\n{output}")]
    Failed {
        /// "hospes" or "QEMU microvm".
        vmm: String,
        /// Guest RAM, MiB.
        guest_mib: u64,
        /// The measuring script's exit status.
        status: i32,
        /// Everything it printed.
        output: String,
    },
}

/// Shell helpers shared by both VMMs' scripts. Times come from /proc/uptime (10 ms
/// resolution; busybox `date` has no `%N`), read with the `read` builtin, so taking one
/// forks nothing.
const COMMON: &str = r#"
cd /work; export HOSPES_GUEST_DIR=/guest
fail() { echo "FAIL $1"; shift; for f in "$@"; do echo "--- $f"; cat "$f"; done; exit 1; }
# wait_filled FILE PID: until FILE has `filled` and 5 `t` lines after it (600 s at most)
# while PID runs.
wait_filled() {
	n=0
	while :; do
		if grep -q '^filled' "$1" 2>/dev/null && [ "$(sed -n '/^filled/,$p' "$1" | grep -c '^t')" -ge 5 ]; then
			return 0
		fi
		n=$((n + 1))
		if [ $n -gt 3000 ] || ! kill -0 "$2" 2>/dev/null; then fail nofill "$1"; fi
		usleep 200000
	done
}
# first_t: reads the VM's output on fd 3 until its first `t` line and sets t_run to the
# uptime then (empty at EOF); earlier lines go to run.out, later ones are drained into it
# in the background.
first_t() {
	t_run=
	while IFS= read -r line <&3; do
		case "$line" in
		t | t?) read t_run _ </proc/uptime; break ;;
		esac
		echo "$line" >>run.out
	done
	cat <&3 >>run.out &
	exec 3<&-
}
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }
rm -f run.out boot.out r.fifo
"#;

/// hospes: boot, snapshot with `--then stop`, restore, shut the restored VM down. Prints
/// `RESULT <snapshot s> <hospes' duration_ms / 1000> <restore s> <memory.bin KiB>`.
const HOSPES: &str = r#"
rm -rf /data/h
hospes run g.toml --api-sock /tmp/h.sock >boot.out 2>&1 &
pid=$!
wait_filled boot.out $pid
read t0 _ </proc/uptime
hospes ctl /tmp/h.sock snapshot /data/h --then stop >snap.json 2>&1 || fail snapshot snap.json boot.out
read t1 _ </proc/uptime
wait $pid || fail "run-exit-$?" boot.out
own=$(sed -n 's/.*"duration_ms": *\([0-9]*\).*/\1/p' snap.json)
kib=$(du -k /data/h/memory.bin | cut -f1)
sync
mkfifo r.fifo
read t2 _ </proc/uptime
hospes restore /data/h --api-sock /tmp/r.sock >r.fifo 2>&1 &
pid=$!
exec 3<r.fifo
first_t
[ -n "$t_run" ] || fail restore run.out
hospes ctl /tmp/r.sock shutdown >/dev/null || fail shutdown run.out
wait $pid
echo "RESULT $(secs $t0 $t1) $(awk -v ms="$own" 'BEGIN { printf "%.3f", ms / 1000 }') $(secs $t2 $t_run) $kib"
rm -rf /data/h; sync
"#;

/// QEMU: boot with an HMP monitor on FIFOs (/tmp/qmon.in, /tmp/qmon.out; the monitor's
/// output is read on fd 4 by the shell itself, so polling forks nothing), `stop`,
/// `migrate` to the file, poll `info migrate` every 10 ms until it completed, `quit`;
/// then start again with `-incoming` and `quit` once the guest ticks. Prints
/// `RESULT <snapshot s> <QEMU's total time / 1000> <restore s> <file KiB>`.
const QEMU: &str = r#"
rm -f /data/q.mig
mon_open() { rm -f /tmp/qmon.in /tmp/qmon.out; mkfifo /tmp/qmon.in /tmp/qmon.out; exec 4<>/tmp/qmon.out; }
mon() { echo "$*" >/tmp/qmon.in; }
# mon_line PATTERN: reads monitor lines until one matches PATTERN (a case glob) into mline.
mon_line() {
	while IFS= read -r -t 60 mline <&4; do
		mline=${mline%"$CR"}
		case "$mline" in $1) return 0 ;; esac
	done
	fail "monitor-silent" boot.out
}
CR=$(printf '\r')
mon_open
qemu_vm >boot.out 2>&1 &
pid=$!
mon "migrate_set_parameter max-bandwidth 100G"
mon "info migrate_parameters"
mon_line 'max-bandwidth:*'
[ "$mline" = "max-bandwidth: 107374182400 bytes/second" ] || { echo "$mline" >mon.err; fail max-bandwidth mon.err; }
wait_filled boot.out $pid
read t0 _ </proc/uptime
mon stop
mon 'migrate "exec:cat > /data/q.mig"'
while :; do
	mon "info migrate"
	mon_line 'Migration status: *'
	case "$mline" in
	*completed) break ;;
	*failed | *cancelled | *cancelling) echo "$mline" >mon.err; fail migration mon.err boot.out ;;
	esac
	usleep 10000
done
read t1 _ </proc/uptime
mon_line 'total time: *'
own=${mline#total time: }; own=${own% ms}
mon quit
wait $pid
exec 4<&-
# The file is done once its writer (QEMU's `cat`, which may outlive QEMU) closed it.
n=0
while ls -l /proc/[0-9]*/fd 2>/dev/null | grep -q '/data/q.mig'; do
	n=$((n + 1)); [ $n -gt 600 ] && fail "writer-stuck" boot.out
	usleep 100000
done
sync
kib=$(du -k /data/q.mig | cut -f1)
mon_open
mkfifo r.fifo
read t2 _ </proc/uptime
qemu_vm -incoming "exec:cat /data/q.mig" >r.fifo 2>&1 &
pid=$!
exec 3<r.fifo
first_t
[ -n "$t_run" ] || fail restore run.out
mon quit
wait $pid
exec 4<&-
echo "RESULT $(secs $t0 $t1) $(awk -v ms="$own" 'BEGIN { printf "%.3f", ms / 1000 }') $(secs $t2 $t_run) $kib"
rm -f /data/q.mig; sync
"#;

/// One VMM's measured runs at one guest size.
#[derive(Clone, Debug)]
pub struct SnapshotRow {
    /// Guest RAM, MiB.
    pub guest_mib: u64,
    /// "hospes" or "QEMU microvm".
    pub vmm: String,
    /// Wall time of the snapshot: the `hospes ctl ... snapshot` command, or QEMU's `stop`
    /// to `info migrate` saying completed; seconds, one per measured run.
    pub snapshot_s: Vec<f64>,
    /// The VMM's own figure for the same: hospes' `duration_ms` (memory and state written
    /// and synced, the pause excluded), QEMU's migration `total time`; seconds.
    pub own_s: Vec<f64>,
    /// From starting the restoring process to the guest's first `t` line, seconds.
    pub restore_s: Vec<f64>,
    /// Disk allocated by the memory file (hospes' memory.bin, QEMU's migration file), MiB.
    pub file_mib: Vec<f64>,
}

/// The snapshot benchmark's result.
#[derive(Clone, Debug)]
pub struct SnapshotReport {
    /// Measured runs per VMM and guest size.
    pub runs: usize,
    /// Per guest size, hospes then QEMU.
    pub rows: Vec<SnapshotRow>,
}

fn min_max(v: &[f64]) -> (f64, f64) {
    (
        v.iter().cloned().fold(f64::INFINITY, f64::min),
        v.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
    )
}

fn spread(v: &[f64]) -> String {
    let (lo, hi) = min_max(v);
    format!("{:.2} ({lo:.2}–{hi:.2})", median(v))
}

impl SnapshotReport {
    /// The markdown table (with its caption).
    pub fn markdown(&self) -> String {
        let mut s = format!(
            "Snapshot of a running guest (64 MiB of tmpfs filled with random data) to a file on \
             L2's ext4 disk, and restore in a new process to the guest's next console line, \
             in one L2 boot, median of {} (min–max):\n\n",
            self.runs
        );
        s.push_str(
            "| guest MiB | VMM | snapshot (s) | VMM's own snapshot figure (s) | restore to running (s) \
             | file allocated (MiB) / guest RAM (MiB) |\n|---|---|---|---|---|---|\n",
        );
        for row in &self.rows {
            let file = median(&row.file_mib);
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} | {file:.1} / {} ({:.0} %) |\n",
                row.guest_mib,
                row.vmm,
                spread(&row.snapshot_s),
                spread(&row.own_s),
                spread(&row.restore_s),
                row.guest_mib,
                100.0 * file / row.guest_mib as f64
            ));
        }
        s
    }
}

/// One measured cycle's figures, parsed from the script's `RESULT` line.
struct Cycle {
    snapshot_s: f64,
    own_s: f64,
    restore_s: f64,
    file_kib: f64,
}

fn parse_result(output: &str) -> Option<Cycle> {
    let line = output.lines().find_map(|l| l.strip_prefix("RESULT "))?;
    let v: Vec<f64> = line
        .split_whitespace()
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    match v[..] {
        [snapshot_s, own_s, restore_s, file_kib] => Some(Cycle {
            snapshot_s,
            own_s,
            restore_s,
            file_kib,
        }),
        _ => None,
    }
}

/// The script for one cycle of `vmm` (0 hospes, 1 QEMU) with a `guest_mib` guest.
fn script(vmm: usize, guest_mib: u64) -> String {
    let spec = format!(
        "[service]\nname = \"snap\"\n[machine]\nmemory_mib = {guest_mib}\n[boot]\ncmdline = 'quiet -- \"{GUEST_CMD}\"'\n"
    );
    // `exec`, so that `$!` of `qemu_vm ... &` is QEMU's PID, not a subshell's that would
    // leave QEMU running when killed.
    let qemu_vm = format!(
        "qemu_vm() {{\n\texec qemu-system-x86_64 -M microvm,acpi=on -enable-kvm -cpu host -m {guest_mib} -smp 1 \
         -nodefaults -no-user-config -nographic -no-reboot -serial stdio \
         -kernel /guest/vmlinuz -initrd /guest/initramfs.cpio.gz \
         -chardev pipe,id=mon,path=/tmp/qmon -mon chardev=mon,mode=readline \
         -global migration.store-global-state=off \
         -append 'console=ttyS0 reboot=k panic=1 pci=off quiet -- \"{GUEST_CMD}\"' \"$@\"\n}}\n"
    );
    let body = if vmm == 0 {
        format!("cat > g.toml <<'SPEC'\n{spec}SPEC\n{HOSPES}")
    } else {
        format!("{qemu_vm}{QEMU}")
    };
    format!("{COMMON}\n{body}")
}

/// Runs the snapshot benchmark with the `hospes` binary at `hospes` (placed in L2): for
/// each guest size, a warm-up round, then `runs` rounds alternating hospes and QEMU.
/// `progress` gets one line per run.
pub fn run(
    hospes: &Path,
    runs: usize,
    progress: &mut dyn FnMut(&str),
) -> Result<SnapshotReport, SnapshotBenchError> {
    let guest: PathBuf = rig::guest_dir()?;
    let cfg = RigConfig::default()
        .memory_mib(4096)
        .disk_mib(6144)
        .add_binary(hospes, "/usr/local/bin/hospes")
        .add_qemu()
        .add_file(guest.join("vmlinuz"), "/guest/vmlinuz")
        .add_file(guest.join("initramfs.cpio.gz"), "/guest/initramfs.cpio.gz");
    let mut l2 = rig::L2::boot(cfg)?;
    let names = ["hospes", "QEMU microvm"];
    let mut rows = Vec::new();
    for guest_mib in GUEST_SIZES_MIB {
        let mut size_rows: Vec<SnapshotRow> = names
            .iter()
            .map(|name| SnapshotRow {
                guest_mib,
                vmm: name.to_string(),
                snapshot_s: Vec::new(),
                own_s: Vec::new(),
                restore_s: Vec::new(),
                file_mib: Vec::new(),
            })
            .collect();
        // Round 0 is the warm-up (page cache, THP pool); rounds 1..=runs are measured,
        // alternating VMMs so that drift inside the L2 boot hits both alike.
        for round in 0..=runs {
            for (vmm, row) in size_rows.iter_mut().enumerate() {
                let name = names[vmm];
                let out = l2.run(&script(vmm, guest_mib), CYCLE_TIMEOUT)?;
                let Some(c) = parse_result(&out.output) else {
                    let output = out.output;
                    return Err(if output.contains("FAIL nofill") {
                        SnapshotBenchError::NotFilled {
                            vmm: name.to_string(),
                            guest_mib,
                            output,
                        }
                    } else if output.contains("FAIL migration") {
                        SnapshotBenchError::MigrationFailed { guest_mib, output }
                    } else {
                        SnapshotBenchError::Failed {
                            vmm: name.to_string(),
                            guest_mib,
                            status: out.status,
                            output,
                        }
                    });
                };
                let file_mib = c.file_kib / 1024.0;
                progress(&format!(
                    "{guest_mib} MiB round {round} {name}: snapshot {:.2} s (own figure {:.3} s), \
                     restore to running {:.2} s, file {file_mib:.1} MiB allocated",
                    c.snapshot_s, c.own_s, c.restore_s
                ));
                if round > 0 {
                    row.snapshot_s.push(c.snapshot_s);
                    row.own_s.push(c.own_s);
                    row.restore_s.push(c.restore_s);
                    row.file_mib.push(file_mib);
                }
            }
        }
        rows.extend(size_rows);
    }
    Ok(SnapshotReport { runs, rows })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_command_has_no_quotes() {
        assert!(!GUEST_CMD.contains(['"', '\'']));
    }

    #[test]
    fn a_result_line_parses_and_anything_else_does_not() {
        let c = parse_result("noise\nRESULT 1.25 1.100 0.50 70000\nmore").unwrap();
        assert_eq!(
            (c.snapshot_s, c.own_s, c.restore_s, c.file_kib),
            (1.25, 1.1, 0.5, 70000.0)
        );
        assert!(parse_result("RESULT 1.25 x 0.50 70000").is_none());
        assert!(parse_result("RESULT 1.25 0.50").is_none());
        assert!(parse_result("FAIL nofill").is_none());
    }

    #[test]
    fn the_table_has_one_line_per_row() {
        let row = |vmm: &str| SnapshotRow {
            guest_mib: 256,
            vmm: vmm.into(),
            snapshot_s: vec![1.0, 2.0, 3.0],
            own_s: vec![0.5, 0.6, 0.7],
            restore_s: vec![0.2, 0.3, 0.4],
            file_mib: vec![64.0, 64.0, 64.0],
        };
        let md = SnapshotReport {
            runs: 3,
            rows: vec![row("hospes"), row("QEMU microvm")],
        }
        .markdown();
        assert!(md.contains("| 256 | hospes | 2.00 (1.00–3.00) | 0.60 (0.50–0.70) | 0.30 (0.20–0.40) | 64.0 / 256 (25 %) |"), "{md}");
        assert_eq!(md.lines().filter(|l| l.starts_with("| 256")).count(), 2);
    }
}
