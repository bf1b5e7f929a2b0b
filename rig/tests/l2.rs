//! Boots one L2 for the whole file and checks the rig's contract: exit statuses, /dev/kvm,
//! placed files, background processes, timeouts, and a real KVM guest (the default guest
//! under QEMU inside L2).

use std::path::PathBuf;
use std::process::Command;
use std::sync::{MutexGuard, Once};
use std::time::Duration;

use rig::{RigConfig, RigError, L2};

const T: Duration = Duration::from_secs(60);

/// A 400 kB file of non-repeating bytes, placed at /work/data.bin. Written once, so its
/// mtime (part of the initramfs cache key) stays put across runs.
fn data_file() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("rig-l2-data.bin");
    if !path.exists() {
        let data: Vec<u8> = (0..100_000u32)
            .flat_map(|i| i.wrapping_mul(2_654_435_761).to_le_bytes())
            .collect();
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, data).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    }
    path
}

fn l2() -> MutexGuard<'static, L2> {
    let guest = rig::guest_dir().expect("default guest");
    let l2 = rig::shared(|| {
        RigConfig::default()
            .add_file(data_file(), "data.bin")
            .add_file(guest.join("vmlinuz"), "/work/guest/vmlinuz")
            .add_file(
                guest.join("initramfs.cpio.gz"),
                "/work/guest/initramfs.cpio.gz",
            )
            .add_qemu()
    })
    .unwrap_or_else(|e| panic!("{e}"));
    static REPORTED: Once = Once::new();
    REPORTED.call_once(|| {
        eprintln!(
            "L2 boot: {:.2?} (QEMU start to agent ready)",
            l2.boot_time()
        )
    });
    l2
}

fn ok(l2: &mut L2, script: &str) -> String {
    let out = l2.run(script, T).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        out.status,
        0,
        "`{script}` failed:\n{}\nL2 console:\n{}",
        out.output,
        l2.console_log()
    );
    out.output
}

#[test]
fn echo_and_exit_status() {
    let mut l2 = l2();
    let out = l2.run("echo hi", T).unwrap();
    assert_eq!((out.status, out.output.as_str()), (0, "hi\n"));
    assert_eq!(l2.run("exit 3", T).unwrap().status, 3);
    let out = l2
        .run("printf 'no newline'; echo err >&2; false", T)
        .unwrap();
    assert_eq!((out.status, out.output.as_str()), (1, "no newlineerr\n"));
    assert_eq!(ok(&mut l2, "pwd"), "/work\n");
}

#[test]
fn has_kvm_with_nested_paging() {
    let mut l2 = l2();
    ok(&mut l2, "test -c /dev/kvm");
    ok(&mut l2, "dmesg | grep -q 'Nested Paging enabled'");
}

#[test]
fn added_file_has_same_sha256() {
    let host = Command::new("sha256sum").arg(data_file()).output().unwrap();
    let host = String::from_utf8(host.stdout).unwrap();
    let mut l2 = l2();
    let inside = ok(&mut l2, "sha256sum data.bin");
    assert_eq!(inside.split(' ').next(), host.split(' ').next());
}

#[test]
fn background_process_survives_and_timeout_keeps_l2_usable() {
    let mut l2 = l2();
    ok(&mut l2, "sleep 1000 >/dev/null 2>&1 & echo $! >/tmp/bg.pid");
    ok(&mut l2, "kill -0 $(cat /tmp/bg.pid)");
    match l2.run("echo started; sleep 100", Duration::from_secs(2)) {
        Err(RigError::Timeout {
            partial,
            agent_alive,
            ..
        }) => {
            assert!(agent_alive);
            assert_eq!(partial, "started\n");
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    ok(&mut l2, "kill $(cat /tmp/bg.pid)");
    assert_eq!(ok(&mut l2, "echo still here"), "still here\n");
}

/// The default guest under `qemu-system-x86_64 -enable-kvm -M microvm` inside L2: real
/// KVM works in the rig (and this is the QEMU baseline later benchmarks compare with).
#[test]
fn default_guest_boots_under_qemu_kvm_in_l2() {
    let mut l2 = l2();
    let script = "cd /work/guest && qemu-system-x86_64 -enable-kvm -M microvm,acpi=on \
        -cpu host -smp 1 -m 256 -nodefaults -no-user-config -display none -no-reboot \
        -serial stdio -kernel vmlinuz -initrd initramfs.cpio.gz \
        -append 'console=ttyS0 quiet -- echo guest-says-hi; nproc'";
    let out = l2
        .run(script, Duration::from_secs(240))
        .unwrap_or_else(|e| panic!("{e}\nL2 console:\n{}", l2.console_log()));
    eprintln!(
        "default guest under QEMU/KVM in L2: {:.2?} (QEMU start to exit)",
        out.elapsed
    );
    assert_eq!(out.status, 0, "{}", out.output);
    let ready = out
        .output
        .lines()
        .find(|l| l.starts_with("hospes-guest: ready uptime="))
        .unwrap_or_else(|| panic!("no ready line in:\n{}", out.output));
    eprintln!("  guest's own {ready}");
    // The guest's tty turns "\n" into "\r\n".
    assert!(
        out.output.contains("guest-says-hi\r\n1\r\n"),
        "{}",
        out.output
    );
}
