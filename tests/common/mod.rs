//! What the end-to-end test binaries share: the L2 they run hospes in.

use std::sync::MutexGuard;

use rig::{RigConfig, L2};

/// The hospes binary under test.
pub const HOSPES: &str = env!("CARGO_BIN_EXE_hospes");

/// This test binary's L2: hospes, the default guest in /guest, and an ext4 disk at /data
/// (O_DIRECT works there, unlike on tmpfs) for the guests' image files.
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

// The counting guest's output (tests/snapshot.rs, tests/migration.rs): not every test
// binary that shares this module reads it.

/// Counter lines `c=N r=d=0000000N` of one output section, as (counter, disk value read).
#[allow(dead_code)]
pub fn counters(section: &str) -> Vec<(u64, u64)> {
    section
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("c=")?;
            let (c, r) = rest.split_once(" r=d=")?;
            Some((c.trim().parse().ok()?, r.trim().parse().ok()?))
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

#[allow(dead_code)]
pub fn value<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.split_once(key).map(|(_, v)| v))
        .map(|v| v.split_whitespace().next().unwrap_or(""))
        .unwrap_or_else(|| panic!("no {key} in:\n{out}"))
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
