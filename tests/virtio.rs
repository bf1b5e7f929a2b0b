//! virtio-blk and virtio-net with the default guest on real KVM inside the nested rig:
//! data written through a drive survives a reboot and matches the host file, read-only
//! drives refuse writes, several drives appear in spec order with their sizes and
//! serials, and the guest reaches its host over a TAP (ping, 100 MiB TCP each way).

use std::sync::MutexGuard;
use std::time::Duration;

use rig::L2;

mod common;
use common::value;

const TIMEOUT: Duration = Duration::from_secs(600);

fn l2() -> MutexGuard<'static, L2> {
    common::l2_with_data_disk()
}

fn sh(script: &str) -> String {
    let mut l2 = l2();
    let out = l2
        .run(
            &format!("export HOSPES_GUEST_DIR=/guest; mkdir -p /data/t; cd /data/t; {script}"),
            TIMEOUT,
        )
        .unwrap_or_else(|e| panic!("rig command failed: {e}\nL2 console:\n{}", l2.console_log()));
    assert_eq!(out.status, 0, "script failed:\n{}", out.output);
    out.output
}

/// A spec for `name` with `extra` TOML appended, running `cmd` in the guest.
fn spec(name: &str, memory_mib: u32, cmd: &str, extra: &str) -> String {
    format!(
        "cat > {name}.toml <<'SPEC'\n[service]\nname = \"{name}\"\n[machine]\nmemory_mib = {memory_mib}\n\
         [boot]\ncmdline = 'quiet -- \"{cmd}\"'\n{extra}\nSPEC\n"
    )
}

#[test]
fn data_written_to_a_drive_survives_a_reboot_and_matches_the_host_file() {
    for cache in ["none", "writeback"] {
        let drive =
            format!("[[drive]]\nid = \"data\"\npath = \"data-{cache}.img\"\ncache = \"{cache}\"");
        let write = "echo serial=$(cat /sys/block/vda/serial); \
                     dd if=/dev/urandom of=/dev/vda bs=1M count=64 conv=fsync 2>/dev/null; sync; \
                     echo wrote=$(head -c 67108864 /dev/vda | sha256sum | cut -c1-64)";
        let read = "echo read=$(head -c 67108864 /dev/vda | sha256sum | cut -c1-64)";
        let out = sh(&format!(
            "rm -f data-{cache}.img; dd if=/dev/zero of=data-{cache}.img bs=1M count=0 seek=80 2>/dev/null\n\
             {}hospes run w.toml 2>&1 || exit 1\n{}hospes run r.toml 2>&1 || exit 1\n\
             echo host=$(head -c 67108864 data-{cache}.img | sha256sum | cut -c1-64)",
            spec("w", 256, write, &drive),
            spec("r", 256, read, &drive)
        ));
        assert_eq!(
            value(&out, "serial="),
            "data",
            "cache={cache}: GET_ID is the drive id:\n{out}"
        );
        let (w, r, h) = (
            value(&out, "wrote="),
            value(&out, "read="),
            value(&out, "host="),
        );
        assert_eq!(w.len(), 64, "{out}");
        assert!(
            w == r && r == h,
            "cache={cache}: written {w}, read after reboot {r}, host file {h}\n{out}"
        );
        let zero64 = sh("head -c 67108864 /dev/zero | sha256sum | cut -c1-64");
        assert_ne!(w, zero64.trim(), "the pattern is not all zeros");
    }
}

#[test]
fn a_read_only_drive_refuses_writes_and_its_file_is_unchanged() {
    let drive = "[[drive]]\nid = \"ro\"\npath = \"ro.img\"\nread_only = true";
    let cmd = "echo ro=$(cat /sys/block/vda/ro); \
               if dd if=/dev/zero of=/dev/vda bs=4096 count=16 oflag=direct 2>/dev/null; then echo write=accepted; else echo write=refused; fi; \
               echo read=$(sha256sum /dev/vda | cut -c1-64)";
    let out = sh(&format!(
        "dd if=/dev/urandom of=ro.img bs=1M count=8 2>/dev/null; before=$(sha256sum ro.img | cut -c1-64)\n\
         {}hospes run ro.toml 2>&1 || exit 1\necho before=$before; echo after=$(sha256sum ro.img | cut -c1-64)",
        spec("ro", 256, cmd, drive)
    ));
    assert_eq!(value(&out, "ro="), "1", "{out}");
    assert_eq!(value(&out, "write="), "refused", "{out}");
    assert_eq!(value(&out, "before="), value(&out, "after="), "{out}");
    assert_eq!(
        value(&out, "before="),
        value(&out, "read="),
        "the guest reads the file's content:\n{out}"
    );
}

#[test]
fn two_drives_appear_as_vda_and_vdb_with_their_sizes_and_serials() {
    let drives = "[[drive]]\nid = \"alpha\"\npath = \"a.img\"\n[[drive]]\nid = \"beta\"\npath = \"b.img\"\nread_only = true";
    let cmd =
        "for d in vda vdb; do echo $d=$(cat /sys/block/$d/size),$(cat /sys/block/$d/serial); done";
    let out = sh(&format!(
        "dd if=/dev/zero of=a.img bs=1M count=0 seek=8 2>/dev/null; dd if=/dev/zero of=b.img bs=1M count=0 seek=24 2>/dev/null\n\
         {}hospes run two.toml 2>&1",
        spec("two", 256, cmd, drives)
    ));
    assert_eq!(value(&out, "vda="), format!("{},alpha", 8 * 2048), "{out}");
    assert_eq!(value(&out, "vdb="), format!("{},beta", 24 * 2048), "{out}");
}

#[test]
fn a_locked_image_cannot_be_opened_writable_by_a_second_hospes() {
    let drive = "[[drive]]\nid = \"d\"\npath = \"lock.img\"";
    let out = sh(&format!(
        "dd if=/dev/zero of=lock.img bs=1M count=0 seek=8 2>/dev/null\n{}{}\
         hospes run first.toml >first.log 2>&1 & pid=$!\n\
         for i in $(seq 120); do grep -q 'ready uptime' first.log && break; sleep 0.5; done\n\
         hospes run second.toml 2>&1; echo second=$?\nkill -TERM $pid; wait $pid; echo first=$?",
        spec("first", 256, "sleep 600", drive),
        spec("second", 256, "echo should-not-boot", drive)
    ));
    assert_ne!(value(&out, "second="), "0", "{out}");
    assert!(
        out.contains("lock.img") && !out.contains("should-not-boot"),
        "{out}"
    );
    assert_eq!(value(&out, "first="), "0", "{out}");
}

#[test]
fn the_guest_reaches_its_host_over_a_tap_ping_and_100_mib_each_way() {
    let net = "[[net]]\nid = \"net0\"\ntap = \"hos-t0\"";
    // busybox nc exits when its own stdin ends: receivers run under -e, and the guest's
    // receiving client holds its stdin open on a FIFO until the server has sent it all.
    let cmd = "ip addr add 172.16.0.2/24 dev eth0; ip link set eth0 up; \
               ping -c 3 -W 5 172.16.0.1 >/tmp/ping && echo ping=ok || echo ping=failed; \
               dd if=/dev/urandom of=/tmp/tx bs=1M count=100 2>/dev/null; \
               echo guest_tx=$(sha256sum /tmp/tx | cut -c1-64); cat /tmp/tx | nc 172.16.0.1 5000; rm /tmp/tx; \
               mkfifo /tmp/hold; (nc 172.16.0.1 5001 </tmp/hold | sha256sum >/tmp/rx.sum) & exec 3>/tmp/hold; \
               wait $!; exec 3>&-; echo guest_rx=$(cut -c1-64 /tmp/rx.sum)";
    let out = sh(&format!(
        "tunctl -d hos-t0 >/dev/null 2>&1; tunctl -t hos-t0 >/dev/null; \
         ip addr add 172.16.0.1/24 dev hos-t0; ip link set hos-t0 up\n\
         printf '#!/bin/sh\\ncat > /data/t/rx.bin\\n' > recv.sh; printf '#!/bin/sh\\ncat /data/t/tx.bin\\n' > send.sh; chmod +x recv.sh send.sh\n\
         dd if=/dev/urandom of=tx.bin bs=1M count=100 2>/dev/null; echo host_tx=$(sha256sum tx.bin | cut -c1-64)\n\
         nc -l -p 5000 -e /data/t/recv.sh & nc -l -p 5001 -e /data/t/send.sh &\n\
         {}hospes run net.toml 2>&1 || exit 1\nwait\necho host_rx=$(sha256sum rx.bin | cut -c1-64); rm -f rx.bin tx.bin",
        spec("net", 512, cmd, net)
    ));
    assert_eq!(value(&out, "ping="), "ok", "{out}");
    assert_eq!(
        value(&out, "guest_tx="),
        value(&out, "host_rx="),
        "guest -> host:\n{out}"
    );
    assert_eq!(
        value(&out, "host_tx="),
        value(&out, "guest_rx="),
        "host -> guest:\n{out}"
    );
}
