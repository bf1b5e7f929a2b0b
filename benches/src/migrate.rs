//! Live-migration benchmark, in the nested rig: hospes (`hospes migrate` to a `hospes
//! receive`, QUIC with mutual TLS) against QEMU 7.2 (`-M microvm,acpi=on -enable-kvm`,
//! `migrate -d -b tcp:...` to a `-incoming tcp:...`), source and destination in the same
//! L2 (one vCPU), over loopback. QEMU runs twice per round: in the clear (its default)
//! and over TLS with mutual authentication (`tls-creds-x509`, `verify-peer=yes`,
//! certificates from a CA made for the run), as hospes always is: in the rig, where the
//! one emulated CPU seals and opens every byte, encryption is a large part of the cost.
//!
//! The same guest for both: the rig's default guest kernel and initramfs, one vCPU, a
//! drive of random data (moved by both: hospes always moves its drives; QEMU with block
//! migration, `migrate -b`, deprecated but present in 7.2). Workloads ([`WORKLOADS`]):
//! - idle: the guest prints `t` every second and does nothing else;
//! - dirty N MiB: the guest fills a 4 MiB tmpfs file with random data, writes it N/4
//!   times into an N MiB tmpfs file, then rewrites that file in place with the same
//!   data in an endless loop (`cat r r ... 1<>x`, no truncation, so the same N MiB of
//!   page cache is rewritten every pass) as fast as it can, printing `p` after each
//!   pass. The dirtying rate (passes × N over time, two passes before the migration
//!   starts) is reported with each run.
//!
//! Each run: boot the source, wait for the workload to be under way, start the
//! destination, migrate with the downtime budget, check that the guest prints on the
//! destination. Figures:
//! - hospes: `total_ms`, `downtime_ms` (source pause to the destination's resume: the end
//!   of its stream as the source sees it less how long its guest had run when it was
//!   sent, an upper bound), `bytes`, `rounds` (final round included), `blocks` × 4 KiB as the
//!   disk's share, from `hospes migrate` (its `--json` object when the binary has the
//!   flag, else its one-line summary); non-zero memory: `memory_bytes` of a snapshot of
//!   the destination taken right after (`hospes ctl ... snapshot DIR --then stop`);
//!   and the pause to the resume on one clock: source and destination run in the same
//!   L2, so the source's pause (the time of its stop-and-copy log line less the total
//!   it gives) and the destination's `VM running` line share a clock. That line comes
//!   once every vCPU thread has answered the resume, after the guest runs; on the rig's
//!   one CPU the guest may keep it for ms first, so this can exceed `downtime_ms`;
//! - QEMU: `total time`, `downtime` (QEMU's own: source stop to the end of the stream
//!   on the source, the destination's load and start excluded), `transferred ram` +
//!   `transferred disk`, `dirty sync count` as rounds and `normal bytes` (non-zero pages
//!   sent, re-sent ones included) as non-zero memory, from `info migrate`.
//!   `max-bandwidth` is 100 GiB/s (7.2's default is 128 MiB/s) and `downtime-limit` the
//!   budget hospes gets.
//!
//! A run that fails (no convergence within hospes' 30 rounds, or QEMU past 31 dirty
//! syncs, or the time limit) is a table cell, not an error. Budgets: 50 ms first; each
//! workload where a hospes run did not converge at it is run again at the fallback
//! budget (500 ms) for every VMM.
//!
//! `hospes bench migrate`; HOSPES_BENCH_RUNS (default 3), and
//! HOSPES_BENCH_MIGRATE_WORKLOADS (`idle512,dirty64,idle1024,dirty256` by default),
//! HOSPES_BENCH_MIGRATE_VMMS (`hospes,qemu,qemu-tls` by default),
//! HOSPES_BENCH_MIGRATE_BUDGET_MS (50), HOSPES_BENCH_MIGRATE_FALLBACK_MS (500; 0: none),
//! HOSPES_BENCH_MIGRATE_LIMIT_S (600: one migration's wall-time limit),
//! HOSPES_BENCH_MIGRATE_CONVERGE (`throttle`, hospes' default: auto-converge, and QEMU's
//! auto-converge capability on; or `abort`: neither throttles the guest),
//! HOSPES_BENCH_MIGRATE_LOG_DIR (a directory for every run's whole output).

use std::path::{Path, PathBuf};
use std::time::Duration;

use rig::{RigConfig, RigError};

use crate::boot::median;

/// One guest workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Workload {
    /// Its key in HOSPES_BENCH_MIGRATE_WORKLOADS.
    pub key: &'static str,
    /// Guest RAM, MiB.
    pub guest_mib: u64,
    /// The working set rewritten continuously, MiB; 0 for an idle guest.
    pub dirty_mib: u64,
}

impl Workload {
    /// "idle" or "dirty N MiB".
    pub fn label(&self) -> String {
        if self.dirty_mib == 0 {
            "idle".into()
        } else {
            format!("dirty {} MiB", self.dirty_mib)
        }
    }

    /// The guest's command (after ` -- ` on its kernel command line). It goes inside
    /// double quotes on the command line and inside single quotes in TOML and in the
    /// shell, so it has neither.
    fn guest_cmd(&self) -> String {
        if self.dirty_mib == 0 {
            return "echo armed; while true; do echo t; sleep 1; done".into();
        }
        let rs = vec!["r"; (self.dirty_mib / 4) as usize].join(" ");
        format!(
            "mkdir -p /dev/shm; mount -t tmpfs tmpfs /dev/shm; cd /dev/shm; \
             dd if=/dev/urandom of=r bs=1M count=4 2>/dev/null; cat {rs} >x; echo armed; \
             while true; do cat {rs} 1<>x; echo p; done"
        )
    }
}

/// The workloads, in the order run.
pub const WORKLOADS: [Workload; 4] = [
    Workload {
        key: "idle512",
        guest_mib: 512,
        dirty_mib: 0,
    },
    Workload {
        key: "dirty64",
        guest_mib: 512,
        dirty_mib: 64,
    },
    Workload {
        key: "idle1024",
        guest_mib: 1024,
        dirty_mib: 0,
    },
    Workload {
        key: "dirty256",
        guest_mib: 1024,
        dirty_mib: 256,
    },
];

/// The guest's drive, MiB of random data.
pub const DISK_MIB: u64 = 16;

/// QEMU runs past this many dirty-bitmap syncs are cancelled as not converging: round 0
/// and hospes' 30 further rounds and its final one.
const QEMU_MAX_SYNCS: u32 = 32;

/// What to run.
#[derive(Clone, Debug)]
pub struct MigrateParams {
    /// Measured runs per VMM, workload and budget.
    pub runs: usize,
    /// The workloads.
    pub workloads: Vec<Workload>,
    /// The VMMs run, indices in [`VMMS`], in its order.
    pub vmms: Vec<usize>,
    /// The downtime budget, ms.
    pub budget_ms: u64,
    /// The budget for a second pass over the workloads hospes did not converge on.
    pub fallback_ms: Option<u64>,
    /// One migration's wall-time limit, seconds.
    pub limit_s: u64,
    /// `hospes migrate --converge`: "throttle" (auto-converge; QEMU then gets its
    /// auto-converge capability too) or "abort" (neither throttles).
    pub converge: String,
}

impl MigrateParams {
    /// The defaults, changed by the HOSPES_BENCH_MIGRATE_* variables (see the module).
    pub fn from_env(runs: Option<usize>) -> Result<Self, String> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let num = |name: &str, default: u64| -> Result<u64, String> {
            match var(name) {
                None => Ok(default),
                Some(v) => v
                    .trim()
                    .parse()
                    .map_err(|_| format!("{name}={v}: not a number")),
            }
        };
        let workloads = match var("HOSPES_BENCH_MIGRATE_WORKLOADS") {
            None => WORKLOADS.to_vec(),
            Some(list) => list
                .split(',')
                .map(|k| {
                    WORKLOADS
                        .iter()
                        .find(|w| w.key == k.trim())
                        .copied()
                        .ok_or_else(|| format!("unknown workload {k:?}: {WORKLOADS:?}"))
                })
                .collect::<Result<_, _>>()?,
        };
        let mut vmms: Vec<usize> = match var("HOSPES_BENCH_MIGRATE_VMMS") {
            None => (0..VMMS.len()).collect(),
            Some(list) => list
                .split(',')
                .map(|k| {
                    VMMS.iter()
                        .position(|v| v.0 == k.trim())
                        .ok_or_else(|| format!("unknown VMM {k:?}: hospes, qemu or qemu-tls"))
                })
                .collect::<Result<_, _>>()?,
        };
        vmms.sort_unstable();
        vmms.dedup();
        let fallback = num("HOSPES_BENCH_MIGRATE_FALLBACK_MS", 500)?;
        Ok(Self {
            runs: runs.unwrap_or(3),
            workloads,
            vmms,
            budget_ms: num("HOSPES_BENCH_MIGRATE_BUDGET_MS", 50)?,
            fallback_ms: (fallback > 0).then_some(fallback),
            limit_s: num("HOSPES_BENCH_MIGRATE_LIMIT_S", 600)?,
            converge: match var("HOSPES_BENCH_MIGRATE_CONVERGE").as_deref() {
                None | Some("throttle") => "throttle".into(),
                Some("abort") => "abort".into(),
                Some(v) => {
                    return Err(format!(
                        "HOSPES_BENCH_MIGRATE_CONVERGE={v}: throttle or abort"
                    ))
                }
            },
        })
    }
}

/// Why the benchmark could not produce its table at all (failed runs are table cells).
#[derive(Debug, thiserror::Error)]
pub enum MigrateBenchError {
    /// The rig failed: building the guest or booting L2.
    #[error("rig: {0}")]
    Rig(#[from] RigError),
    /// QEMU's TLS credentials could not be made or written.
    #[error("QEMU's TLS credentials in {dir}: {reason}")]
    QemuTls {
        /// Where they were being written.
        dir: PathBuf,
        /// What failed.
        reason: String,
    },
}

/// One successful migration's figures.
#[derive(Clone, Debug, PartialEq)]
pub struct Measured {
    /// Total migration time, seconds.
    pub total_s: f64,
    /// Downtime as the VMM reports it, ms.
    pub downtime_ms: f64,
    /// Bytes on the wire (memory and disk), MB (10^6 bytes).
    pub wire_mb: f64,
    /// The disk's share of it, MB.
    pub disk_mb: f64,
    /// Rounds (hospes) or dirty-bitmap syncs (QEMU).
    pub rounds: f64,
    /// Non-zero guest memory, MB (see the module for how, per VMM).
    pub nonzero_mb: Option<f64>,
    /// The workload's dirtying rate measured before the migration, MiB/s.
    pub dirty_mibps: Option<f64>,
    /// Source pause to destination resume on the one clock both share, ms (hospes only).
    pub resumed_ms: Option<f64>,
}

/// One VMM's runs of one workload at one budget.
#[derive(Clone, Debug)]
pub struct MigrateRow {
    /// The workload.
    pub workload: Workload,
    /// The downtime budget, ms.
    pub budget_ms: u64,
    /// "hospes" or "QEMU microvm".
    pub vmm: String,
    /// Each run: its figures or why it failed.
    pub runs: Vec<Result<Measured, String>>,
}

/// The benchmark's result.
#[derive(Clone, Debug)]
pub struct MigrateReport {
    /// Measured runs per row.
    pub runs: usize,
    /// The rows, in the order run.
    pub rows: Vec<MigrateRow>,
    /// Logs of failed runs (the script's output), for stderr.
    pub failure_logs: Vec<String>,
    /// The convergence mode ([`MigrateParams::converge`]).
    pub converge: String,
}

fn spread(v: &[f64], decimals: usize) -> String {
    if v.is_empty() {
        return "—".into();
    }
    let lo = v.iter().cloned().fold(f64::INFINITY, f64::min);
    let hi = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    if v.len() == 1 {
        return format!("{:.*}", decimals, v[0]);
    }
    format!(
        "{:.*} ({:.*}–{:.*})",
        decimals,
        median(v),
        decimals,
        lo,
        decimals,
        hi
    )
}

impl MigrateReport {
    /// The markdown table (with its caption and notes).
    pub fn markdown(&self) -> String {
        let mut s = format!(
            "Live migration inside one rig L2 (QEMU TCG, nested KVM, 1 vCPU), source and \
             destination over loopback, guest with a {DISK_MIB} MiB drive of random data \
             moved by both; {}; median of {} (min–max) of the successful runs:\n\n",
            if self.converge == "throttle" {
                "auto-converge on for both (`hospes migrate --converge throttle`, QEMU's \
                 auto-converge capability)"
            } else {
                "no auto-converge (`hospes migrate --converge abort`, QEMU's default)"
            },
            self.runs
        );
        s.push_str(
            "| workload | guest MiB | budget (ms) | VMM | total (s) | downtime (ms) | \
             pause to resume, one clock (ms) | wire MB | of which disk MB | rounds | \
             non-zero memory MB | dirtying MiB/s | failed runs |\n\
             |---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
        );
        for row in &self.rows {
            let ok: Vec<&Measured> = row.runs.iter().filter_map(|r| r.as_ref().ok()).collect();
            let col = |f: &dyn Fn(&Measured) -> Option<f64>, d: usize| {
                spread(&ok.iter().filter_map(|m| f(m)).collect::<Vec<_>>(), d)
            };
            let mut failures: Vec<(String, usize)> = Vec::new();
            for e in row.runs.iter().filter_map(|r| r.as_ref().err()) {
                match failures.iter_mut().find(|(m, _)| m == e) {
                    Some((_, n)) => *n += 1,
                    None => failures.push((e.clone(), 1)),
                }
            }
            let failed = if failures.is_empty() {
                "—".to_string()
            } else {
                failures
                    .iter()
                    .map(|(m, n)| format!("{n} of {}: {m}", row.runs.len()))
                    .collect::<Vec<_>>()
                    .join("; ")
            };
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {failed} |\n",
                row.workload.label(),
                row.workload.guest_mib,
                row.budget_ms,
                row.vmm,
                col(&|m| Some(m.total_s), 2),
                col(&|m| Some(m.downtime_ms), 0),
                col(&|m| m.resumed_ms, 0),
                col(&|m| Some(m.wire_mb), 1),
                col(&|m| Some(m.disk_mb), 1),
                col(&|m| Some(m.rounds), 0),
                col(&|m| m.nonzero_mb, 1),
                col(&|m| m.dirty_mibps, 0),
            ));
        }
        s.push_str(
            "\nhospes: total and downtime from `hospes migrate` (downtime: source pause to the \
             destination's resume, an upper bound: the end of the destination's stream as the \
             source sees it, less how long the guest had run there when it was sent); pause \
             to resume on one clock: the source's pause to the destination's `VM running`, \
             from their logs (both run in the same L2; that line comes once every vCPU thread \
             has answered the resume, which on the rig's one CPU can be ms after the guest \
             runs); rounds include the final \
             stop-and-copy round; non-zero memory is `memory_bytes` of a snapshot of the \
             destination taken right after the migration. QEMU: `info migrate`'s total time, \
             downtime (source side only: the destination's load and start are not in it), \
             transferred ram + transferred disk, dirty sync count as rounds, and normal bytes \
             (non-zero pages sent, re-sends included) as non-zero memory; max-bandwidth \
             100 GiB/s, downtime-limit = the budget, block migration (`migrate -b`) for the \
             drive; `QEMU microvm, TLS`: the same over TLS with client and server \
             certificates (`tls-creds-x509`, `verify-peer=yes`). MB = 10^6 bytes.\n",
        );
        s
    }
}

/// A number in `text` after `key=` (hospes' one-line summary, the script's own lines) or
/// `key: ` at the start of a line (QEMU's `info migrate`).
fn field(text: &str, key: &str) -> Option<f64> {
    if let Some(v) = text
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}: ")))
    {
        return v.split_whitespace().next()?.parse().ok();
    }
    let pat = format!("{key}=");
    let mut from = 0;
    while let Some(i) = text[from..].find(&pat) {
        let at = from + i;
        from = at + pat.len();
        // A whole key: not the tail of a longer one.
        let before = text[..at].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let rest = &text[from..];
        let end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-'))
            .unwrap_or(rest.len());
        if let Ok(v) = rest[..end].parse() {
            return Some(v);
        }
    }
    None
}

/// The lines of `output` that start with `prefix`, without it, joined.
fn prefixed(output: &str, prefix: &str) -> String {
    output
        .lines()
        .filter_map(|l| l.strip_prefix(prefix))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Why a run failed, from its `FAIL` line and what `hospes migrate` said.
fn failure(output: &str, status: i32) -> String {
    let Some(fail) = output.lines().find_map(|l| l.strip_prefix("FAIL ")) else {
        return format!("no result (exit status {status})");
    };
    let said = prefixed(output, "MIG: ");
    const NOT_CONVERGED: &str = "not converged after ";
    if let Some(i) = said.find(NOT_CONVERGED) {
        let rounds = said[i + NOT_CONVERGED.len()..]
            .split_whitespace()
            .next()
            .unwrap_or("?");
        return format!("did not converge in {rounds} rounds");
    }
    let mut words = fail.split_whitespace();
    match (words.next(), words.next()) {
        (Some("noconverge"), Some(n)) => format!("did not converge in {n} dirty syncs"),
        (Some("timeout"), Some(s)) => format!("not done after {s} s, killed"),
        (Some("migrate"), _) => {
            let first = said.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
            let first: String = first.chars().take(160).collect();
            format!("migrate failed: {}", first.replace('|', "/"))
        }
        _ => fail.replace('|', "/"),
    }
}

/// The figures of a successful hospes run (`DONE` in its output), else why it failed.
fn parse_hospes(output: &str, status: i32) -> Result<Measured, String> {
    if !output.lines().any(|l| l == "DONE") {
        return Err(failure(output, status));
    }
    let said = prefixed(output, "MIG: ");
    // The `--json` object's top-level fields, else the summary line's `key=value`s.
    let json: Option<serde_json::Value> = said.find('{').and_then(|i| {
        serde_json::Deserializer::from_str(&said[i..])
            .into_iter()
            .next()?
            .ok()
    });
    let get = |k: &str| {
        match &json {
            Some(j) => j.get(k).and_then(serde_json::Value::as_f64),
            None => field(&said, k),
        }
        .ok_or_else(|| format!("no {k} in: {said}"))
    };
    let bytes = get("bytes")?;
    let blocks = get("blocks")?;
    Ok(Measured {
        total_s: get("total_ms")? / 1000.0,
        downtime_ms: get("downtime_ms")?,
        wire_mb: bytes / 1e6,
        disk_mb: blocks * 4096.0 / 1e6,
        rounds: get("rounds")?,
        nonzero_mb: field(output, "NONZERO").map(|b| b / 1e6),
        dirty_mibps: field(output, "RATE"),
        resumed_ms: pause_to_resume(output),
    })
}

/// `line` without its ANSI colour sequences (tracing colours its timestamps).
fn plain(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Seconds since midnight (UTC) of a tracing line's RFC 3339 timestamp, which starts it.
fn log_time(line: &str) -> Option<f64> {
    let stamp = line.split_whitespace().next()?;
    let time = stamp.split_once('T')?.1.strip_suffix('Z')?;
    let mut hms = time.split(':').map(str::parse::<f64>);
    let (h, m, s) = (hms.next()?.ok()?, hms.next()?.ok()?, hms.next()?.ok()?);
    Some(h * 3600.0 + m * 60.0 + s)
}

/// The source's pause to the destination's resume, ms, from their logs in `output` (see
/// the module): the source's stop-and-copy line less its `(total X ms)`, and the
/// destination's first `VM running` line.
fn pause_to_resume(output: &str) -> Option<f64> {
    let lines: Vec<String> = output.lines().map(plain).collect();
    let stop = lines.iter().find_map(|l| {
        let l = l.strip_prefix("SRC: ")?;
        l.contains("vmm::migration::source: stop-and-copy:")
            .then_some(l)
    })?;
    let total_ms: f64 = stop
        .split_once("(total ")?
        .1
        .split_once(" ms)")?
        .0
        .parse()
        .ok()?;
    let resumed = lines.iter().find_map(|l| {
        let l = l.strip_prefix("DST: ")?;
        l.contains("VM running").then_some(l)
    })?;
    let mut ms = (log_time(resumed)? - log_time(stop)?) * 1e3 + total_ms;
    if ms < -43_200_000.0 {
        // Across midnight.
        ms += 86_400_000.0;
    }
    Some(ms)
}

/// The figures of a successful QEMU run, else why it failed.
fn parse_qemu(output: &str, status: i32) -> Result<Measured, String> {
    if !output.lines().any(|l| l == "DONE") {
        return Err(failure(output, status));
    }
    let info = prefixed(output, "QMIG: ");
    let get = |k: &str| field(&info, k).ok_or_else(|| format!("no {k} in: {info}"));
    let ram_kb = get("transferred ram")?;
    // The last `transferred disk` seen while active (QEMU drops it once completed), or the
    // drive's size if that is more: all of it is sent.
    let disk_kb = field(&info, "transferred disk")
        .or_else(|| field(output, "QDISK"))
        .unwrap_or(0.0);
    Ok(Measured {
        total_s: get("total time")? / 1000.0,
        downtime_ms: get("downtime")?,
        wire_mb: (ram_kb + disk_kb) * 1024.0 / 1e6,
        disk_mb: disk_kb * 1024.0 / 1e6,
        rounds: get("dirty sync count")?,
        nonzero_mb: field(&info, "normal bytes").map(|kb| kb * 1024.0 / 1e6),
        dirty_mibps: field(output, "RATE"),
        resumed_ms: None,
    })
}

/// Shell helpers shared by both VMMs' scripts.
const COMMON: &str = r#"
export HOSPES_GUEST_DIR=/guest
rm -rf /data/m; mkdir -p /data/m; cd /data/m
pids=
cleanup() {
	for p in $pids; do kill $p 2>/dev/null; done
	n=0; while [ $n -lt 20 ]; do alive=; for p in $pids; do kill -0 $p 2>/dev/null && alive=1; done; [ -z "$alive" ] && break; n=$((n+1)); usleep 100000; done
	for p in $pids; do kill -9 $p 2>/dev/null; done
	wait 2>/dev/null
}
fail() { echo "FAIL $1"; shift; for f in "$@"; do echo "--- $f"; tail -c 4000 "$f"; echo; done; cleanup; cd /; rm -rf /data/m; exit 1; }
now() { read t _ </proc/uptime; echo ${t%.*}; }
# ticks FILE: `t`/`p` lines after the `armed` line.
ticks() { n=$(sed -n '/^armed/,$p' "$1" 2>/dev/null | tr -d '\r' | grep -c '^[tp]$'); echo ${n:-0}; }
# wait_ticks FILE PID N: until FILE has N ticks (LIMIT s at most) while PID runs.
wait_ticks() {
	s=$(now)
	while [ "$(ticks $1)" -lt $3 ]; do
		if [ $(($(now) - s)) -gt $LIMIT ] || ! kill -0 $2 2>/dev/null; then fail "the guest did not run its workload" $1; fi
		usleep 200000
	done
}
# armed FILE PID: waits for the workload, then measures its dirtying rate over 2 passes.
armed() {
	wait_ticks $1 $2 2
	read ta _ </proc/uptime; na=$(ticks $1)
	wait_ticks $1 $2 $((na + 2))
	read tb _ </proc/uptime; nb=$(ticks $1)
	[ $DIRTY -gt 0 ] && echo "RATE=$(awk -v n=$((nb - na)) -v m=$DIRTY -v a=$ta -v b=$tb 'BEGIN { printf "%.1f", n * m / (b - a) }')"
	true
}
# alive FILE PID: until FILE (the destination's output) has a tick line, 120 s at most.
alive() {
	s=$(now)
	while [ "$(tr -d '\r' <$1 | grep -c '^[tp]$')" -lt 1 ]; do
		if [ $(($(now) - s)) -gt 120 ] || ! kill -0 $2 2>/dev/null; then fail "the guest did not run on the destination" $1; fi
		usleep 100000
	done
}
dd if=/dev/urandom of=disk.img bs=1M count=$DISK 2>/dev/null
"#;

/// hospes: source, destination, `hospes migrate` (a watchdog kills all past LIMIT),
/// liveness on the destination, then a snapshot of it for its non-zero memory.
const HOSPES: &str = r#"
hospes keygen src.key >src.pub && hospes keygen dst.key >dst.pub || fail keygen
HOSPES_LOG=info hospes run g.toml --api-sock /tmp/ms.sock >src.out 2>&1 &
spid=$!; pids=$spid
armed src.out $spid
mkdir dst
HOSPES_LOG=info hospes receive --listen 127.0.0.1:$PORT --identity dst.key --trust $(cat src.pub) --dir dst --api-sock /tmp/md.sock >dst.out 2>&1 &
dpid=$!; pids="$pids $dpid"
n=0; while ! grep -q 'waiting for a VM' dst.out && ! netstat -uln 2>/dev/null | grep -q "127.0.0.1:$PORT "; do n=$((n+1)); [ $n -gt 300 ] && fail "receive did not start" dst.out; usleep 100000; done
json=; hospes migrate --help 2>&1 | grep -q -- '--json' && json=--json
hospes migrate /tmp/ms.sock --to 127.0.0.1:$PORT --peer $(cat dst.pub) --identity src.key --downtime-ms $BUDGET --converge $CONVERGE $json >mig.out 2>&1 &
mpid=$!; pids="$pids $mpid"
# A sleeping watchdog rather than a polling loop: each poll forked, and those forks took
# the rig's one CPU from the guest's pause they fell into.
sh -c "sleep $LIMIT; touch mig.timeout; kill $mpid" 2>/dev/null &
wpid=$!
wait $mpid; rc=$?
kill $wpid 2>/dev/null
if [ -f mig.timeout ]; then sed 's/^/MIG: /' mig.out; fail "timeout $LIMIT" src.out dst.out; fi
sed 's/^/MIG: /' mig.out
[ $rc = 0 ] || fail "migrate $rc" src.out dst.out
wait $spid || fail "source exit $?" src.out
alive dst.out $dpid
hospes ctl /tmp/md.sock snapshot /data/m/snap --then stop >snap.json 2>&1 || fail snapshot snap.json dst.out
echo "NONZERO=$(sed -n 's/.*"memory_bytes": *\([0-9]*\).*/\1/p' snap.json)"
wait $dpid
grep -v '^[tp]' src.out | tr -d '\r' | sed 's/^/SRC: /'; grep -v '^[tp]' dst.out | tr -d '\r' | sed 's/^/DST: /'
echo DONE
cleanup; cd /; rm -rf /data/m
"#;

/// QEMU: source with an HMP monitor on FIFOs (read on fd 4), destination with
/// `-incoming`, `migrate -d -b`, `info migrate` every second until completed (cancelled
/// past QEMU_MAX_SYNCS dirty syncs or LIMIT), liveness on the destination.
const QEMU: &str = r#"
# tls ENDPOINT: QEMU's TLS options (none in the clear). The destination, a server that
# demands a client certificate, takes its credentials for the incoming stream from the
# migration object's tls-creds property; the source gets them by the monitor.
tls() {
	[ $TLS = 1 ] || return 0
	if [ ! -f /qtls/ca-cert.pem ]; then
		mkdir -p /qtls
		for f in ca-cert server-cert client-cert; do pem CERTIFICATE /qtls-der/$f.der >/qtls/$f.pem; done
		for f in server-key client-key; do pem "PRIVATE KEY" /qtls-der/$f.der >/qtls/$f.pem; done
	fi
	echo "-object tls-creds-x509,id=tls0,dir=/qtls,endpoint=$1$([ $1 = server ] && echo ,verify-peer=yes)"
	[ $1 = server ] && echo "-global migration.tls-creds=tls0"
}
pem() { echo "-----BEGIN $1-----"; base64 <"$2"; echo "-----END $1-----"; }
dd if=/dev/zero of=dst.img bs=1M seek=$DISK count=0 2>/dev/null
CR=$(printf '\r')
rm -f /tmp/qmon.in /tmp/qmon.out; mkfifo /tmp/qmon.in /tmp/qmon.out; exec 4<>/tmp/qmon.out
mon() { echo "$*" >/tmp/qmon.in; }
# mon_info CMD: CMD's output into mon.txt (up to the answer of a following `info version`).
mon_info() {
	: >mon.txt; mon "$1"; mon "info version"
	while IFS= read -r -t 60 l <&4; do
		l=${l%"$CR"}
		case "$l" in [0-9]*.[0-9]*.[0-9]*) return 0 ;; esac
		echo "$l" >>mon.txt
	done
	fail "the QEMU monitor is silent" src.out mon.txt
}
qemu_vm -drive file=disk.img,format=raw,if=none,id=d0 -device virtio-blk-device,drive=d0 $(tls client) \
	-chardev pipe,id=mon,path=/tmp/qmon -mon chardev=mon,mode=readline >src.out 2>&1 &
spid=$!; pids=$spid
mon "migrate_set_parameter max-bandwidth 100G"
[ $TLS = 1 ] && mon "migrate_set_parameter tls-creds tls0"
mon "migrate_set_parameter downtime-limit $BUDGET"
[ $CONVERGE = throttle ] && mon "migrate_set_capability auto-converge on"
mon_info "info migrate_capabilities"
ac=off; [ $CONVERGE = throttle ] && ac=on
grep -q "^auto-converge: $ac" mon.txt || fail "auto-converge not $ac" mon.txt
mon_info "info migrate_parameters"
grep -q '^max-bandwidth: 107374182400 bytes/second' mon.txt || fail "max-bandwidth not set" mon.txt
grep -q "^downtime-limit: $BUDGET ms" mon.txt || fail "downtime-limit not set" mon.txt
if [ $TLS = 1 ]; then grep -q "^tls-creds: 'tls0'" mon.txt || fail "tls-creds not set" mon.txt; fi
armed src.out $spid
qemu_vm -drive file=dst.img,format=raw,if=none,id=d0 -device virtio-blk-device,drive=d0 $(tls server) \
	-incoming tcp:127.0.0.1:$PORT >dst.out 2>&1 &
dpid=$!; pids="$pids $dpid"
n=0; while ! netstat -ltn 2>/dev/null | grep -q "127.0.0.1:$PORT "; do n=$((n+1)); [ $n -gt 300 ] && fail "no -incoming listener" dst.out; usleep 100000; done
mon "migrate -d -b tcp:127.0.0.1:$PORT"
s=$(now)
while :; do
	mon_info "info migrate"
	st=$(sed -n 's/^Migration status: //p' mon.txt)
	case "$st" in
	completed) break ;;
	failed* | cancel*) fail "QEMU migration $st" mon.txt src.out dst.out ;;
	esac
	# `transferred disk` is only shown while the migration is active: keep the last one.
	# Block migration sends the whole drive at least once: at least `total disk` in all.
	d=$(sed -n 's/^transferred disk: \([0-9]*\) kbytes/\1/p' mon.txt); [ -n "$d" ] && disk_kb=$d
	d=$(sed -n 's/^total disk: \([0-9]*\) kbytes/\1/p' mon.txt); [ -n "$d" ] && [ $d -gt ${disk_kb:-0} ] && disk_kb=$d
	syncs=$(sed -n 's/^dirty sync count: //p' mon.txt)
	if [ "${syncs:-0}" -gt $MAXSYNC ]; then mon migrate_cancel; sed 's/^/QMIG: /' mon.txt; fail "noconverge $syncs"; fi
	if [ $(($(now) - s)) -gt $LIMIT ]; then mon migrate_cancel; sed 's/^/QMIG: /' mon.txt; fail "timeout $LIMIT"; fi
	# Each poll forks half a dozen times, on the CPU QEMU migrates with. Its figures are
	# its own (`info migrate`), so polling less often costs them no accuracy.
	usleep 1000000
done
sed 's/^/QMIG: /' mon.txt
echo "QDISK=${disk_kb:-}"
alive dst.out $dpid
mon quit
echo DONE
cleanup; exec 4<&-; cd /; rm -rf /data/m
"#;

/// The VMMs compared, (key, name in the table), in the order each round runs them;
/// [`script`] and [`run`] take an index here.
pub const VMMS: [(&str, &str); 3] = [
    ("hospes", "hospes"),
    ("qemu", "QEMU microvm"),
    ("qemu-tls", "QEMU microvm, TLS"),
];

/// The script for one run of `vmm` (an index in [`VMMS`]).
fn script(
    vmm: usize,
    w: &Workload,
    budget_ms: u64,
    port: u16,
    limit_s: u64,
    converge: &str,
) -> String {
    let cmd = w.guest_cmd();
    let mib = w.guest_mib;
    let vars = format!(
        "DIRTY={} DISK={DISK_MIB} BUDGET={budget_ms} PORT={port} LIMIT={limit_s} MAXSYNC={QEMU_MAX_SYNCS} CONVERGE={converge} TLS={}\n",
        w.dirty_mib,
        u8::from(vmm == 2)
    );
    let body = if vmm == 0 {
        format!(
            "cat > g.toml <<'SPEC'\n[service]\nname = \"mig\"\n[machine]\nmemory_mib = {mib}\n\
             [boot]\ncmdline = 'quiet -- \"{cmd}\"'\n[[drive]]\nid = \"data\"\npath = \"disk.img\"\nSPEC\n{HOSPES}"
        )
    } else {
        // `exec`: a function run in the background is a subshell, and `$!` its PID. Without
        // exec, QEMU would be that subshell's child: `cleanup` would kill the subshell and
        // leave QEMU (the destination's guest, still dirtying its working set) running on
        // into the next runs, slowing every one after it.
        format!(
            "qemu_vm() {{\n\texec qemu-system-x86_64 -M microvm,acpi=on -enable-kvm -cpu host -m {mib} -smp 1 \
             -nodefaults -no-user-config -nographic -no-reboot -serial stdio \
             -kernel /guest/vmlinuz -initrd /guest/initramfs.cpio.gz \
             -append 'console=ttyS0 reboot=k panic=1 pci=off quiet -- \"{cmd}\"' \"$@\"\n}}\n{QEMU}"
        )
    };
    format!("{vars}{COMMON}\n{body}")
}

/// Writes to `dir` (made anew) a CA, a server certificate for 127.0.0.1 and a client
/// certificate, all signed by it, with their keys, in DER (PKCS#8 for keys), and returns
/// each file with the path it gets in L2: /qtls-der/{ca,server,client}-cert.der and
/// {server,client}-key.der. The QEMU script turns them into the PEM files QEMU's
/// `tls-creds-x509` reads from its directory.
///
/// Key usages as QEMU checks them (crypto/tlscredsx509.c): the CA may sign certificates;
/// the others may sign and encipher, for server or client authentication.
fn qemu_tls_files(dir: &Path) -> Result<Vec<(PathBuf, String)>, MigrateBenchError> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let fail = |reason: String| MigrateBenchError::QemuTls {
        dir: dir.to_path_buf(),
        reason,
    };
    let params = |name: &str, names: Vec<String>| -> Result<CertificateParams, MigrateBenchError> {
        let mut p = CertificateParams::new(names).map_err(|e| fail(e.to_string()))?;
        p.distinguished_name.push(DnType::CommonName, name);
        Ok(p)
    };
    let key = || KeyPair::generate().map_err(|e| fail(e.to_string()));
    let mut ca = params("hospes bench CA", Vec::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = key()?;
    let ca_cert = ca.self_signed(&ca_key).map_err(|e| fail(e.to_string()))?;
    let issuer = Issuer::new(ca, ca_key);
    let mut files = vec![("ca-cert", ca_cert.der().to_vec())];
    for (cert_file, key_file, purpose) in [
        (
            "server-cert",
            "server-key",
            ExtendedKeyUsagePurpose::ServerAuth,
        ),
        (
            "client-cert",
            "client-key",
            ExtendedKeyUsagePurpose::ClientAuth,
        ),
    ] {
        let mut p = params(
            &format!("hospes bench {cert_file}"),
            vec!["127.0.0.1".into()],
        )?;
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![purpose];
        let k = key()?;
        let cert = p.signed_by(&k, &issuer).map_err(|e| fail(e.to_string()))?;
        files.push((cert_file, cert.der().to_vec()));
        files.push((key_file, k.serialize_der()));
    }
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).map_err(|e| fail(e.to_string()))?;
    files
        .into_iter()
        .map(|(name, der)| {
            let file = dir.join(format!("{name}.der"));
            std::fs::write(&file, der).map_err(|e| fail(format!("{}: {e}", file.display())))?;
            Ok((file, format!("/qtls-der/{name}.der")))
        })
        .collect()
}

/// Runs the benchmark with the `hospes` binary at `hospes` (placed in L2): per workload,
/// `runs` rounds alternating hospes and QEMU at the budget, then, where a hospes run did
/// not converge, as many at the fallback budget. `progress` gets one line per run.
pub fn run(
    hospes: &Path,
    params: &MigrateParams,
    progress: &mut dyn FnMut(&str),
) -> Result<MigrateReport, MigrateBenchError> {
    let guest: PathBuf = rig::guest_dir()?;
    // no_timer_check: under load, L2's kernel under TCG can fail its IO-APIC timer check
    // and panic at boot ("IO-APIC + timer doesn't work!"), as it did on the first try here.
    let cfg = RigConfig::default()
        .kernel_arg("no_timer_check")
        .memory_mib(4096)
        .disk_mib(4096)
        .add_binary(hospes, "/usr/local/bin/hospes")
        .add_qemu()
        .add_file(guest.join("vmlinuz"), "/guest/vmlinuz")
        .add_file(guest.join("initramfs.cpio.gz"), "/guest/initramfs.cpio.gz");
    // The certificates stay on the host for as long as the L2 may have to be rebooted.
    let tls = crate::TempDir(
        std::env::temp_dir().join(format!("hospes-bench-qtls-{}", std::process::id())),
    );
    let cfg = qemu_tls_files(&tls.0)?
        .into_iter()
        .fold(cfg, |cfg, (file, l2_path)| cfg.add_file(file, &l2_path));
    let mut l2 = rig::L2::boot(cfg)?;
    let timeout = Duration::from_secs(params.limit_s + 600);
    let mut port: u16 = 4440;
    let mut rows = Vec::new();
    let mut failure_logs = Vec::new();
    // HOSPES_BENCH_MIGRATE_LOG_DIR: every run's whole output (hospes' info log included).
    let log_dir = std::env::var_os("HOSPES_BENCH_MIGRATE_LOG_DIR").map(PathBuf::from);
    if let Some(dir) = &log_dir {
        let _ = std::fs::create_dir_all(dir);
    }
    for w in &params.workloads {
        let mut budget = params.budget_ms;
        loop {
            let mut pair: Vec<MigrateRow> = params
                .vmms
                .iter()
                .map(|&v| MigrateRow {
                    workload: *w,
                    budget_ms: budget,
                    vmm: VMMS[v].1.to_string(),
                    runs: Vec::new(),
                })
                .collect();
            for round in 1..=params.runs {
                for (&vmm, row) in params.vmms.iter().zip(pair.iter_mut()) {
                    port += 1;
                    let (key, name) = VMMS[vmm];
                    let what = format!(
                        "{} {} MiB, budget {budget} ms, run {round} {name}",
                        w.label(),
                        w.guest_mib
                    );
                    let result = match l2.run(
                        &script(vmm, w, budget, port, params.limit_s, &params.converge),
                        timeout,
                    ) {
                        Ok(out) => {
                            if let Some(dir) = &log_dir {
                                let file = dir.join(format!(
                                    "{}-{}-{budget}ms-{round}-{key}.log",
                                    w.key, w.guest_mib,
                                ));
                                let _ = std::fs::write(file, &out.output);
                            }
                            let r = if vmm == 0 {
                                parse_hospes(&out.output, out.status)
                            } else {
                                parse_qemu(&out.output, out.status)
                            };
                            if r.is_err() {
                                failure_logs.push(format!("=== {what}:\n{}", out.output));
                            }
                            r
                        }
                        Err(e) => {
                            failure_logs.push(format!("=== {what}: {e}"));
                            Err(format!("rig: {e}").chars().take(160).collect())
                        }
                    };
                    // Nested SVM under TCG hangs now and then (seen with QEMU's runs as
                    // with hospes'): a fresh L2 for the next run, not a lost bench.
                    if l2.reboot_if_lost("the bench's L2")? {
                        progress("L2 stopped answering; rebooted it");
                    }
                    match &result {
                        Ok(m) => progress(&format!(
                            "{what}: total {:.2} s, downtime {:.0} ms (to resume, one clock: {} \
                             ms), wire {:.1} MB (disk {:.1}), rounds {}, non-zero {} MB, \
                             dirtying {} MiB/s",
                            m.total_s,
                            m.downtime_ms,
                            m.resumed_ms.map_or("-".into(), |v| format!("{v:.0}")),
                            m.wire_mb,
                            m.disk_mb,
                            m.rounds,
                            m.nonzero_mb.map_or("?".into(), |v| format!("{v:.1}")),
                            m.dirty_mibps.map_or("-".into(), |v| format!("{v:.0}")),
                        )),
                        Err(e) => progress(&format!("{what}: FAILED: {e}")),
                    }
                    row.runs.push(result);
                }
            }
            let hospes = params.vmms.iter().position(|&v| v == 0);
            let hospes_unconverged = hospes.is_some_and(|h| {
                pair[h].runs.iter().any(|r| {
                    // Killed at the time limit before hospes' own round limit (30 rounds
                    // of a working set at the link's speed take longer) is not converging too.
                    r.as_ref()
                        .is_err_and(|e| e.contains("converge") || e.starts_with("not done after"))
                })
            });
            rows.extend(pair);
            match params.fallback_ms {
                Some(f) if hospes_unconverged && budget != f => budget = f,
                _ => break,
            }
        }
    }
    Ok(MigrateReport {
        runs: params.runs,
        rows,
        failure_logs,
        converge: params.converge.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_commands_have_no_quotes_and_fit_the_command_line() {
        for w in WORKLOADS {
            let cmd = w.guest_cmd();
            assert!(!cmd.contains(['"', '\'']), "{cmd}");
            assert!(cmd.len() < 1500, "{cmd}");
        }
    }

    #[test]
    fn the_pause_to_the_resume_comes_from_both_logs_on_one_clock() {
        let src = "SRC: \x1b[2m2026-11-22T06:39:59.325579Z\x1b[0m \x1b[32m INFO\x1b[0m \
                   \x1b[2mvmm::migration::source\x1b[0m\x1b[2m:\x1b[0m stop-and-copy: \
                   pause+dirty log (VMM thread) 9.6 ms, wait for Ready 29.5 ms, Commit to \
                   destination resumed 31.2 ms (total 85.2 ms); last round 36 bytes";
        let dst = "DST: \x1b[2m2026-11-22T06:39:59.303242Z\x1b[0m \x1b[32m INFO\x1b[0m \
                   \x1b[2mvmm::vm\x1b[0m\x1b[2m:\x1b[0m VM running service=mig vcpus=1";
        let boot = "SRC: 2026-11-22T06:39:19.978813Z  INFO vmm::vm: VM running service=mig";
        let out = format!("{boot}\n{src}\n{dst}\nDONE");
        let ms = pause_to_resume(&out).unwrap();
        assert!((ms - 62.863).abs() < 1e-3, "{ms}");
        // Across midnight.
        let late = out.replace("06:39:59.325579", "23:59:59.990000");
        let early = late.replace("06:39:59.303242", "00:00:00.010000");
        assert!((pause_to_resume(&early).unwrap() - 105.2).abs() < 1e-3);
        assert_eq!(pause_to_resume(&format!("{boot}\n{src}\nDONE")), None);
    }

    #[test]
    fn hospes_figures_parse_from_the_summary_and_from_json() {
        let summary = "MIG: migrated to 127.0.0.1:4441: total_ms=2500.5 downtime_ms=40.2 rounds=3 \
                       bytes=50000000 pages=10000 blocks=1000 bandwidth_MBps=20.0\n\
                       NONZERO=41000000\nRATE=12.5\nDONE";
        let m = parse_hospes(summary, 0).unwrap();
        assert_eq!(
            m,
            Measured {
                total_s: 2.5005,
                downtime_ms: 40.2,
                wire_mb: 50.0,
                disk_mb: 4.096,
                rounds: 3.0,
                nonzero_mb: Some(41.0),
                dirty_mibps: Some(12.5),
                resumed_ms: None,
            }
        );
        let json = "MIG: {\nMIG:   \"to\": \"127.0.0.1:4441\",\nMIG:   \"total_ms\": 2500.5,\n\
                    MIG:   \"downtime_ms\": 40.2, \"bytes\": 50000000, \"rounds\": 3,\n\
                    MIG: \"pages\": 10000, \"blocks\": 1000, \"per_round\": [{\"pages\": 9000}]}\n\
                    NONZERO=41000000\nRATE=12.5\nDONE";
        assert_eq!(parse_hospes(json, 0).unwrap(), m);
    }

    #[test]
    fn qemu_figures_parse_from_info_migrate() {
        let out = "QMIG: Migration status: completed\nQMIG: total time: 3000 ms\n\
                   QMIG: downtime: 25 ms\nQMIG: transferred ram: 40000 kbytes\n\
                   QMIG: normal bytes: 39000 kbytes\nQMIG: dirty sync count: 4\n\
                   QMIG: transferred disk: 16384 kbytes\nDONE";
        let m = parse_qemu(out, 0).unwrap();
        assert_eq!((m.total_s, m.downtime_ms, m.rounds), (3.0, 25.0, 4.0));
        assert!((m.wire_mb - 56384.0 * 1.024 / 1000.0).abs() < 1e-9);
        assert!((m.disk_mb - 16384.0 * 1.024 / 1000.0).abs() < 1e-9);
        assert_eq!(m.dirty_mibps, None);
    }

    #[test]
    fn qemu_gets_a_ca_and_server_and_client_certificates_with_their_keys() {
        let dir = std::env::temp_dir().join(format!("qtls-test-{}", std::process::id()));
        let files = qemu_tls_files(&dir).unwrap();
        let l2: Vec<&str> = files.iter().map(|(_, l2)| l2.as_str()).collect();
        assert_eq!(
            l2,
            [
                "/qtls-der/ca-cert.der",
                "/qtls-der/server-cert.der",
                "/qtls-der/server-key.der",
                "/qtls-der/client-cert.der",
                "/qtls-der/client-key.der"
            ]
        );
        for (file, _) in &files {
            // DER: a SEQUENCE with a long-form length.
            assert_eq!(std::fs::read(file).unwrap()[0], 0x30, "{}", file.display());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_pid_the_qemu_script_kills_is_qemus() {
        for vmm in [1, 2] {
            let s = script(vmm, &WORKLOADS[1], 50, 4441, 60, "throttle");
            assert!(s.contains("qemu_vm() {\n\texec qemu-system-x86_64"), "{s}");
        }
    }

    #[test]
    fn failures_say_why() {
        let out = "MIG: hospes: migration to 127.0.0.1:4441 failed, the VM runs on here: not \
                   converged after 31 rounds: 5 bytes still dirty\nFAIL migrate 1\n--- src.out";
        assert_eq!(
            parse_hospes(out, 1).unwrap_err(),
            "did not converge in 31 rounds"
        );
        assert_eq!(
            parse_qemu("FAIL noconverge 33", 1).unwrap_err(),
            "did not converge in 33 dirty syncs"
        );
        assert_eq!(
            parse_qemu("FAIL timeout 600", 1).unwrap_err(),
            "not done after 600 s, killed"
        );
        assert_eq!(
            parse_qemu("", 137).unwrap_err(),
            "no result (exit status 137)"
        );
    }

    #[test]
    fn the_table_has_one_line_per_row_and_failed_runs_as_cells() {
        let m = Measured {
            total_s: 2.0,
            downtime_ms: 40.0,
            wire_mb: 50.0,
            disk_mb: 16.8,
            rounds: 3.0,
            nonzero_mb: Some(41.0),
            dirty_mibps: None,
            resumed_ms: None,
        };
        let md = MigrateReport {
            runs: 2,
            rows: vec![
                MigrateRow {
                    workload: WORKLOADS[0],
                    budget_ms: 50,
                    vmm: "hospes".into(),
                    runs: vec![Ok(m.clone()), Ok(Measured { total_s: 4.0, ..m })],
                },
                MigrateRow {
                    workload: WORKLOADS[1],
                    budget_ms: 50,
                    vmm: "hospes".into(),
                    runs: vec![Err("did not converge in 31 rounds".into()); 2],
                },
            ],
            failure_logs: vec![],
            converge: "abort".into(),
        }
        .markdown();
        assert!(
            md.contains("| idle | 512 | 50 | hospes | 4.00 (2.00–4.00) | 40 (40–40) |"),
            "{md}"
        );
        assert!(
            md.contains("| dirty 64 MiB | 512 | 50 | hospes | — | — | — | — | — | — | — | — | 2 of 2: did not converge in 31 rounds |"),
            "{md}"
        );
    }
}
