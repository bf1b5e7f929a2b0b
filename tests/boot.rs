//! Booting the default guest (Debian's stock cloud kernel) on real KVM inside the nested
//! rig: the ready line, vCPU and memory sizing, power-off and reboot, signals, fatal
//! guest errors; and every kind of bad spec, which needs no VM and runs on this host.

use std::path::Path;
use std::process::Command;
use std::sync::MutexGuard;
use std::time::Duration;

use rig::{RigConfig, L2};

const HOSPES: &str = env!("CARGO_BIN_EXE_hospes");
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

/// The L2 all tests in this file share: hospes, the default guest, the hello spec and a
/// kernel that triple-faults.
fn l2() -> MutexGuard<'static, L2> {
    rig::shared(|| {
        let guest = rig::guest_dir().expect("default guest");
        let faulty =
            std::env::temp_dir().join(format!("hospes-triple-fault-{}.elf", std::process::id()));
        std::fs::write(&faulty, triple_fault_elf()).unwrap();
        RigConfig::default()
            .add_binary(HOSPES, "/usr/local/bin/hospes")
            .add_file(guest.join("vmlinuz"), "/guest/vmlinuz")
            .add_file(guest.join("initramfs.cpio.gz"), "/guest/initramfs.cpio.gz")
            .add_file(
                Path::new(env!("CARGO_MANIFEST_DIR")).join("resources/services/hello.toml"),
                "/work/hello.toml",
            )
            .add_file(&faulty, "/work/faulty.elf")
    })
    .expect("L2 boots")
}

/// Runs `script` in L2 with the default guest configured.
fn sh(script: &str) -> (i32, String) {
    let mut l2 = l2();
    let out = l2
        .run(
            &format!("export HOSPES_GUEST_DIR=/guest; cd /work; {script}"),
            BOOT_TIMEOUT,
        )
        .unwrap_or_else(|e| panic!("rig command failed: {e}\nL2 console:\n{}", l2.console_log()));
    (out.status, out.output)
}

/// Writes `spec` to NAME.toml in L2 and runs hospes on it; returns exit status and output.
fn boot(name: &str, spec: &str) -> (i32, String) {
    sh(&format!(
        "cat > {name}.toml <<'SPEC'\n{spec}\nSPEC\nhospes run {name}.toml 2>&1"
    ))
}

#[test]
fn hello_spec_boots_to_the_ready_line_and_greets() {
    let (status, out) = sh("hospes run hello.toml 2>&1");
    assert_eq!(status, 0, "{out}");
    assert!(out.contains("hospes-guest: ready uptime="), "{out}");
    assert!(out.contains("Hello from hospes"), "{out}");
    assert!(out.contains("Linux 6.1."), "the stock Debian kernel: {out}");
    assert!(out.contains("powered off"), "{out}");
}

#[test]
fn two_vcpus_give_a_guest_with_two_cpus() {
    let (status, out) =
        boot("smp", "[service]\nname = \"smp\"\n[machine]\nvcpus = 2\n[boot]\ncmdline = \"quiet -- echo cpus=$(nproc)\"");
    assert_eq!(status, 0, "{out}");
    assert!(out.contains("cpus=2"), "{out}");
}

#[test]
fn memory_mib_sets_the_guest_ram() {
    let spec = "[service]\nname = \"mem\"\n[machine]\nmemory_mib = 512\n[boot]\n\
                cmdline = \"quiet -- grep MemTotal /proc/meminfo; dmesg | grep 'Memory:'\"";
    let (status, out) = boot("mem", spec);
    assert_eq!(status, 0, "{out}");
    let asked_kib = 512 * 1024;
    // What hospes controls: the physical RAM the kernel finds (E820), "Memory: x/yK".
    let physical: u64 = out
        .split("K/")
        .nth(1)
        .and_then(|s| s.split('K').next())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("no 'Memory: x/yK' line: {out}"));
    assert!(
        physical <= asked_kib && physical * 100 >= asked_kib * 99,
        "physical RAM {physical} KiB: {out}"
    );
    // What the guest reports after the kernel's own reservations (image, struct pages).
    let total: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|s| s.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no MemTotal: {out}"));
    assert!(
        total < asked_kib && total * 100 >= asked_kib * 90,
        "MemTotal {total} KiB: {out}"
    );
    println!(
        "memory_mib = 512: physical {physical} KiB, MemTotal {total} KiB ({:.1}%)",
        total as f64 * 100.0 / asked_kib as f64
    );
}

/// Runs a guest command that ends the guest and measures, on L2's clock, the time from
/// the guest's last line to hospes' exit.
fn ends_within_a_second(action: &str) -> String {
    let spec = format!("[service]\nname = \"end\"\n[boot]\ncmdline = \"quiet -- echo about-to-{action}; {action} -f\"");
    let (status, out) = sh(&format!(
        "cat > end.toml <<'SPEC'\n{spec}\nSPEC\n\
         set -o pipefail; hospes run end.toml 2>&1 | while IFS= read -r l; do echo \"$l\"; \
         case \"$l\" in about-to-*) read t _ </proc/uptime; echo \"T1=$t\";; esac; done; rc=$?; \
         read t _ </proc/uptime; echo \"T2=$t\"; exit $rc"
    ));
    assert_eq!(status, 0, "hospes must exit 0 after guest {action}: {out}");
    let t = |k: &str| -> f64 {
        out.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {k}: {out}"))
    };
    let delay = t("T2=") - t("T1=");
    assert!(
        delay < 1.0,
        "hospes took {delay:.2} s to exit after the guest's {action}: {out}"
    );
    out
}

#[test]
fn guest_poweroff_ends_hospes_with_exit_0() {
    let out = ends_within_a_second("poweroff");
    assert!(out.contains("powered off"), "{out}");
}

#[test]
fn guest_reboot_ends_hospes_with_exit_0() {
    let out = ends_within_a_second("reboot");
    assert!(out.contains("rebooted"), "{out}");
}

#[test]
fn sigterm_and_sigint_stop_the_vm_cleanly() {
    for sig in ["TERM", "INT"] {
        let (status, out) = sh(&format!(
            "cat > idle.toml <<'SPEC'\n[service]\nname = \"idle\"\n[boot]\ncmdline = \"quiet -- sleep 600\"\nSPEC\n\
             hospes run idle.toml >idle.log 2>&1 & pid=$!; \
             for i in $(seq 120); do grep -q 'ready uptime' idle.log && break; sleep 0.5; done; \
             kill -{sig} $pid; wait $pid; rc=$?; cat idle.log; exit $rc"
        ));
        assert_eq!(status, 0, "SIG{sig}: {out}");
        assert!(
            out.contains("hospes-guest: ready") && out.contains("stopped guest \"idle\" on signal"),
            "SIG{sig}: {out}"
        );
    }
}

#[test]
fn a_triple_fault_exits_nonzero_with_the_registers() {
    let (status, out) = boot(
        "fault",
        "[service]\nname = \"fault\"\n[boot]\nkernel = \"faulty.elf\"",
    );
    assert_ne!(status, 0, "{out}");
    assert!(
        out.contains("triple fault") && out.contains("rip=0x") && out.contains("cr0="),
        "{out}"
    );
}

/// An ELF "kernel" whose entry is `ud2` with no usable IDT: #UD, then #DF, then a triple
/// fault.
fn triple_fault_elf() -> Vec<u8> {
    let entry: u64 = 0x100_0000;
    let mut f = Vec::new();
    f.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&entry.to_le_bytes());
    f.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    f.extend_from_slice(&0u32.to_le_bytes());
    for v in [64u16, 56, 1, 64, 0, 0] {
        f.extend_from_slice(&v.to_le_bytes());
    }
    let code = [0x0f, 0x0b]; // ud2
    f.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    f.extend_from_slice(&5u32.to_le_bytes()); // R+X
    for v in [
        120u64,
        entry,
        entry,
        code.len() as u64,
        code.len() as u64,
        0x1000,
    ] {
        f.extend_from_slice(&v.to_le_bytes());
    }
    f.extend_from_slice(&code);
    f
}

// ---- bad specs: no VM is started, so these run on this host directly ----

fn bad_spec(name: &str, text: &str) -> (i32, String) {
    let dir = std::env::temp_dir().join(format!("hospes-badspec-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    let mut last = (0, String::new());
    for sub in ["check", "run"] {
        let out = Command::new(HOSPES).arg(sub).arg(&path).output().unwrap();
        let msg = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(2), "hospes {sub} {name}: {msg}");
        assert!(
            msg.contains(&path.display().to_string()),
            "names the file: {msg}"
        );
        assert_eq!(msg.lines().count(), 1, "one message: {msg}");
        last = (out.status.code().unwrap(), msg);
    }
    last
}

#[test]
fn every_kind_of_bad_spec_exits_2_naming_key_and_line() {
    let cases: &[(&str, &str, &str, &str)] = &[
        (
            "unknown-key",
            "[service]\nname = \"a\"\n[machine]\ncpus = 2\n",
            ":4:1:",
            "machine.cpus",
        ),
        (
            "wrong-type",
            "[service]\nname = \"a\"\n[machine]\nvcpus = \"two\"\n",
            ":4:9:",
            "machine.vcpus",
        ),
        (
            "vcpus-range",
            "[service]\nname = \"a\"\n[machine]\nvcpus = 0\n",
            ":4:9:",
            "machine.vcpus",
        ),
        (
            "memory-range",
            "[service]\nname = \"a\"\n[machine]\nmemory_mib = 70000\n",
            ":4:14:",
            "machine.memory_mib",
        ),
        (
            "bad-name",
            "[service]\nname = \"Web Server\"\n",
            ":2:8:",
            "service.name",
        ),
        (
            "long-name",
            &format!("[service]\nname = \"{}\"\n", "a".repeat(64)),
            ":2:8:",
            "service.name",
        ),
        (
            "no-kernel-file",
            "[service]\nname = \"a\"\n[boot]\nkernel = \"missing-vmlinuz\"\n",
            ":4:10:",
            "boot.kernel",
        ),
        (
            "no-initrd-file",
            "[service]\nname = \"a\"\n[boot]\ninitrd = \"missing.cpio\"\n",
            ":4:10:",
            "boot.initrd",
        ),
        (
            "bad-cmdline",
            "[service]\nname = \"a\"\n[boot]\ncmdline = \"tab\\there\"\n",
            ":4:11:",
            "boot.cmdline",
        ),
        (
            "unknown-table",
            "[service]\nname = \"a\"\n[gpu]\nmodel = 1\n",
            ":3:",
            "gpu",
        ),
        ("syntax", "[service]\nname = \"a\n", ":2:", "service.name"),
    ];
    for (name, text, at, key) in cases {
        let (_, msg) = bad_spec(name, text);
        assert!(
            msg.contains(at),
            "{name}: expected line/column {at} in: {msg}"
        );
        assert!(
            msg.contains(&format!("`{key}`")),
            "{name}: expected key {key} in: {msg}"
        );
    }
    // A directory instead of a kernel file, and a spec that does not exist.
    let (_, msg) = bad_spec(
        "dir-kernel",
        "[service]\nname = \"a\"\n[boot]\nkernel = \"/\"\n",
    );
    assert!(msg.contains("not a regular file"), "{msg}");
    let out = Command::new(HOSPES)
        .args(["check", "/nonexistent/spec.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/spec.toml"));
}

#[test]
fn a_host_without_hardware_virtualization_gets_one_clear_line() {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
    if cpuinfo.contains(" vmx") || cpuinfo.contains(" svm") {
        eprintln!("this host has hardware virtualization; nothing to check");
        return;
    }
    let hello = Path::new(env!("CARGO_MANIFEST_DIR")).join("resources/services/hello.toml");
    let out = Command::new(HOSPES)
        .arg("run")
        .arg(&hello)
        .env("HOSPES_GUEST_DIR", "/nonexistent")
        .output()
        .unwrap();
    let msg = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{msg}");
    assert_eq!(msg.lines().count(), 1, "{msg}");
    assert!(
        msg.contains("no hardware virtualization") && msg.contains("resources/run.sh"),
        "{msg}"
    );
}
