//! What the end-to-end test binaries share: the L2 they run hospes in.

use std::sync::MutexGuard;
use std::time::Duration;

use rig::{RigConfig, L2};

/// The hospes binary under test.
pub const HOSPES: &str = env!("CARGO_BIN_EXE_hospes");

/// This test binary's L2: hospes, the default guest in /guest, and an ext4 disk at /data
/// (O_DIRECT works there, unlike on tmpfs) for the guests' image files.
#[allow(dead_code)]
pub fn l2_with_data_disk() -> MutexGuard<'static, L2> {
    rig::shared(|| {
        let guest = rig::guest_dir().expect("default guest");
        RigConfig::default()
            .disk_mib(1024)
            .add_binary(HOSPES, "/usr/local/bin/hospes")
            .add_file(guest.join("vmlinuz"), "/guest/vmlinuz")
            .add_file(guest.join("initramfs.cpio.gz"), "/guest/initramfs.cpio.gz")
    })
    .expect("L2 boots")
}

/// Runs `prelude` and then `script` in a fresh directory /data/<dir> of the shared L2 and
/// returns the output; panics with it when the script exits non-zero.
#[allow(dead_code)]
pub fn sh(dir: &str, prelude: &str, script: &str, timeout: Duration) -> String {
    let mut l2 = l2_with_data_disk();
    let out = l2
        .run(
            &format!(
                "export HOSPES_GUEST_DIR=/guest; rm -rf /data/{dir}; mkdir -p /data/{dir}; \
                 cd /data/{dir}; {prelude}\n(\n{script}\n); rc=$?; cd /; rm -rf /data/{dir}; exit $rc"
            ),
            timeout,
        )
        .unwrap_or_else(|e| panic!("rig command failed: {e}\nL2 console:\n{}", l2.console_log()));
    assert_eq!(out.status, 0, "script failed:\n{}", out.output);
    out.output
}

// The counting guest's output (tests/snapshot.rs, tests/migration.rs): not every test
// binary that shares this module reads it.

/// Complete counter lines `c=N r=d=0000000N` of an output (or a section of one), as
/// (counter, disk value read).
#[allow(dead_code)]
pub fn counters(output: &str) -> Vec<(u64, u64)> {
    output
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("c=")?;
            let (c, r) = rest.split_once(" r=d=")?;
            // A line cut short (the VM stopped, or the output was read, while it was being
            // printed) is not a counter line: "c=93 r=d=0000009" would read as 9 for 93.
            let r = r.trim();
            (r.len() == 8).then_some(())?;
            Some((c.trim().parse().ok()?, r.parse().ok()?))
        })
        .collect()
}

/// The text between `===NAME` and the next `===` marker.
#[allow(dead_code)]
pub fn section<'a>(out: &'a str, name: &str) -> &'a str {
    let start = out
        .find(&format!("==={name}\n"))
        .unwrap_or_else(|| panic!("no section {name} in:\n{out}"))
        + name.len()
        + 4;
    let end = out[start..].find("===").map_or(out.len(), |e| start + e);
    &out[start..end]
}

/// The value after `key` on the first line that has it: the text up to the next blank.
/// Panics, with the output, when no line has `key`.
#[allow(dead_code)]
pub fn value(out: &str, key: &str) -> String {
    find_value(out, key).unwrap_or_else(|| panic!("no {key} in:\n{out}"))
}

/// The value after `key` on the first line that has it, if one does.
///
/// The guest's console carries the kernel's messages too, and the kernel prints them
/// between any two bytes of a line a program is writing: `guest_rx=79c1…[  204.41]
/// watchdog: …\n…4633`. Such a message (from `[ seconds.micros]` to its newline) is cut
/// out before the value is read.
#[allow(dead_code)]
pub fn find_value(out: &str, key: &str) -> Option<String> {
    let out = without_kernel_messages(out);
    out.lines()
        .find_map(|l| l.split_once(key).map(|(_, v)| v))
        .map(|v| v.split_whitespace().next().unwrap_or("").to_owned())
}

/// `out` without the kernel's timestamped console messages, wherever they start.
fn without_kernel_messages(out: &str) -> String {
    let mut rest = out;
    let mut kept = String::with_capacity(out.len());
    while let Some(start) = rest.find('[') {
        let (before, from) = rest.split_at(start);
        kept.push_str(before);
        match kernel_message_len(from) {
            Some(len) => rest = &from[len..],
            None => {
                kept.push('[');
                rest = &from[1..];
            }
        }
    }
    kept.push_str(rest);
    kept
}

/// The length of the kernel message `text` starts with (`[  204.412474] …` through its
/// newline), or None if it does not start with one.
fn kernel_message_len(text: &str) -> Option<usize> {
    let close = text.find(']')?;
    let stamp = text[1..close].trim_start();
    let (secs, micros) = stamp.split_once('.')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    (digits(secs) && digits(micros)).then_some(())?;
    Some(text.find('\n').map_or(text.len(), |nl| nl + 1))
}

/// Every counter line reads back from the disk the value it wrote, and the counter
/// increases by one from line to line.
#[allow(dead_code)]
pub fn assert_consistent(name: &str, c: &[(u64, u64)], out: &str) {
    assert!(c.len() >= 10, "{name}: too few counter lines:\n{out}");
    for pair in c.windows(2) {
        assert_eq!(pair[1].0, pair[0].0 + 1, "{name}: counter skipped:\n{out}");
    }
    for &(n, r) in c {
        assert_eq!(n, r, "{name}: the disk read back {r} for {n}:\n{out}");
    }
}

/// The counter went on across a hand-over (restore or migration): `after` starts one or
/// two past the end of `before` (a line cut in half by the stop is counted on neither side).
#[allow(dead_code)]
pub fn assert_continues(what: &str, before: &[(u64, u64)], after: &[(u64, u64)], out: &str) {
    let (last, first) = (before.last().unwrap().0, after[0].0);
    assert!(
        first == last + 1 || first == last + 2,
        "{what}: counter went from {last} to {first}:\n{out}"
    );
}

#[test]
fn a_kernel_message_inside_a_value_is_cut_out() {
    let out = "ping=ok\nguest_rx=79c1[  204.412474] watchdog: BUG: soft lockup [sh:92]\n4633\n\
               [  204.536775] reboot: Power down\nhost_rx=0df3 [x]\n";
    assert_eq!(value(out, "guest_rx="), "79c14633");
    assert_eq!(value(out, "host_rx="), "0df3");
    assert_eq!(value(out, "ping="), "ok");
    assert_eq!(find_value(out, "reboot"), None);
}
