//! The control API, pause/resume and snapshot/restore with the default guest on real KVM
//! inside the nested rig. The guest prints a counter every 100 ms, writing each value to
//! its disk with O_DIRECT and reading it back; a snapshot restored in a new process must
//! continue that counter, its disk, its network and its console.

use std::time::Duration;

mod common;
use common::{assert_consistent, assert_continues, counters, section, value};

const TIMEOUT: Duration = Duration::from_secs(600);

/// Runs `script` after the shell helpers in a fresh directory /data/<dir> of the L2.
fn sh(dir: &str, script: &str) -> String {
    common::sh(dir, COMMON, script, TIMEOUT)
}

/// Shell helpers for the scripts: the counting guest's spec, and waiting for its output.
const COMMON: &str = r#"
spec() { # name tap
cat > $1.toml <<SPEC
[service]
name = "$1"
[machine]
memory_mib = 256
[boot]
cmdline = 'quiet -- "ip addr add 172.16.9.2/24 dev eth0; ip link set eth0 up; i=0; while true; do printf d=%08d \$i | dd of=/dev/vda bs=512 conv=sync oflag=direct 2>/dev/null; r=\$(dd if=/dev/vda bs=512 count=1 iflag=direct 2>/dev/null | tr -d \\\\000); echo c=\$i r=\$r; i=\$((i+1)); usleep 100000; done"'
[[drive]]
id = "data"
path = "disk.img"
[[net]]
id = "net0"
tap = "$2"
SPEC
dd if=/dev/zero of=disk.img bs=1M count=16 2>/dev/null
# Every test uses 172.16.9.0/24: another test's TAP left behind would take its route.
for t in $(ls /sys/class/net | grep '^hos-'); do tunctl -d $t >/dev/null 2>&1; done
tunctl -t $2 >/dev/null; ip addr add 172.16.9.1/24 dev $2; ip link set $2 up
}
lines() { n=$(grep -c '^c=' "$1" 2>/dev/null); echo ${n:-0}; }
# wait_lines FILE N: until FILE has N counter lines (60 s at most) while hospes ($pid) runs.
wait_lines() { n=0; while [ "$(lines $1)" -lt $2 ]; do n=$((n+1)); if [ $n -gt 600 ] || ! kill -0 $pid 2>/dev/null; then echo "no $2 counter lines in $1:"; cat $1; exit 1; fi; sleep 0.1; done; }
wait_sock() { n=0; while [ ! -S $1 ]; do n=$((n+1)); [ $n -gt 300 ] && { echo "no socket $1"; exit 1; }; sleep 0.1; done; }
"#;

#[test]
fn a_restored_guest_continues_its_counter_disk_network_and_console_twice_in_a_row() {
    let out = sh(
        "snap",
        "spec counter hos-s0\n\
         hospes run counter.toml --api-sock /tmp/s0.sock >out0 2>&1 & pid=$!\n\
         wait_lines out0 20\n\
         hospes ctl /tmp/s0.sock snapshot /data/snap/one --then stop || exit 1\n\
         wait $pid; echo rc0=$?\n\
         hospes restore /data/snap/one --api-sock /tmp/s1.sock >out1 2>&1 & pid=$!\n\
         wait_lines out1 15\n\
         ping -c 3 -W 5 172.16.9.2 >ping.txt 2>&1 && echo ping1=ok || { echo ping1=failed; cat ping.txt; ip neigh; ip -s link show hos-s0; }\n\
         hospes ctl /tmp/s1.sock status | grep -q '\"running\"' && echo status1=running\n\
         hospes ctl /tmp/s1.sock snapshot /data/snap/two --then stop || exit 1\n\
         wait $pid; echo rc1=$?\n\
         hospes restore /data/snap/two --api-sock /tmp/s2.sock >out2 2>&1 & pid=$!\n\
         wait_lines out2 15\n\
         ping -c 3 -W 5 172.16.9.2 >ping.txt 2>&1 && echo ping2=ok || { echo ping2=failed; cat ping.txt; ip neigh; ip -s link show hos-s0; }\n\
         hospes ctl /tmp/s2.sock shutdown; wait $pid; echo rc2=$?\n\
         du -k one/memory.bin | cut -f1 | sed 's/^/mem_kib=/'\n\
         echo ===OUT0; cat out0; echo ===OUT1; cat out1; echo ===OUT2; cat out2; echo ===END",
    );
    for rc in ["rc0=", "rc1=", "rc2="] {
        assert_eq!(value(&out, rc), "0", "{rc}\n{out}");
    }
    assert_eq!(value(&out, "ping1="), "ok", "{out}");
    assert_eq!(value(&out, "ping2="), "ok", "{out}");
    assert_eq!(value(&out, "status1="), "running", "{out}");
    // The memory file is sparse: far less allocated than the 256 MiB of guest RAM.
    let mem_kib: u64 = value(&out, "mem_kib=").parse().unwrap();
    assert!(
        mem_kib < 200 * 1024,
        "memory.bin allocates {mem_kib} KiB:\n{out}"
    );

    let runs: Vec<Vec<(u64, u64)>> = ["OUT0", "OUT1", "OUT2"]
        .iter()
        .map(|s| counters(section(&out, s)))
        .collect();
    for (i, c) in runs.iter().enumerate() {
        assert_consistent(&format!("run {i}"), c, &out);
    }
    for i in 1..runs.len() {
        assert_continues(&format!("restore {i}"), &runs[i - 1], &runs[i], &out);
    }
}

#[test]
fn a_paused_guest_stays_still_for_5_s_and_then_runs_on() {
    let out = sh(
        "pause",
        "spec pausing hos-p0\n\
         hospes run pausing.toml --api-sock /tmp/p.sock >out 2>&1 & pid=$!\n\
         wait_lines out 10\n\
         hospes ctl /tmp/p.sock resume 2>&1 | sed 's/^/resume_running: /'\n\
         hospes ctl /tmp/p.sock pause || exit 1\n\
         hospes ctl /tmp/p.sock pause 2>&1 | sed 's/^/pause_paused: /'\n\
         hospes ctl /tmp/p.sock status | grep -q '\"paused\"' && echo status=paused\n\
         sleep 0.3; before=$(lines out); sleep 5; after=$(lines out)\n\
         echo paused_lines=$((after - before))\n\
         hospes ctl /tmp/p.sock resume || exit 1\n\
         wait_lines out $((after + 10))\n\
         hospes ctl /tmp/p.sock snapshot /data/pause/s --then resume >/dev/null || exit 1\n\
         now=$(lines out); wait_lines out $((now + 5)); echo after_snapshot=running\n\
         hospes ctl /tmp/p.sock status | grep -q '\"running\"' && echo status=running\n\
         hospes ctl /tmp/p.sock shutdown; wait $pid; echo rc=$?\n\
         echo ===OUT; cat out; echo ===END",
    );
    assert!(
        out.contains("resume_running: hospes: the VM is already running (HTTP 409)"),
        "{out}"
    );
    assert!(
        out.contains("pause_paused: hospes: the VM is already paused (HTTP 409)"),
        "{out}"
    );
    assert_eq!(value(&out, "status="), "paused", "{out}");
    assert_eq!(value(&out, "paused_lines="), "0", "{out}");
    assert_eq!(value(&out, "after_snapshot="), "running", "{out}");
    assert!(out.contains("status=running"), "{out}");
    assert_eq!(value(&out, "rc="), "0", "{out}");
    assert_consistent("paused run", &counters(section(&out, "OUT")), &out);
}

/// One corruption of a good snapshot's copy: the shell that makes it.
struct Corruption {
    name: &'static str,
    make: &'static str,
    /// What the error message must say.
    says: &'static str,
}

const CORRUPTIONS: &[Corruption] = &[
    Corruption {
        name: "truncated state",
        make: "head -c 1000 good/state.bin > x && mv x $d/state.bin",
        says: "truncated",
    },
    Corruption {
        name: "bit flip in the payload",
        make: "printf '\\377' | dd of=$d/state.bin bs=1 seek=5000 conv=notrunc 2>/dev/null",
        says: "payload CRC",
    },
    Corruption {
        name: "wrong magic",
        make: "printf 'X' | dd of=$d/state.bin bs=1 seek=0 conv=notrunc 2>/dev/null",
        says: "magic",
    },
    Corruption {
        name: "wrong version",
        make: "printf '\\004' | dd of=$d/state.bin bs=1 seek=8 conv=notrunc 2>/dev/null",
        says: "unsupported format version 4, this build reads versions 1 to 3",
    },
    Corruption {
        name: "memory file shorter than the state says",
        make: "rm $d/memory.bin; truncate -s 100M $d/memory.bin",
        says: "memory file",
    },
    Corruption {
        name: "count over its cap",
        make: "cp /tmp/over-cap.bin $d/state.bin",
        says: "too many",
    },
];

#[test]
fn every_corrupt_snapshot_exits_2_says_why_and_starts_nothing() {
    // A good snapshot, and its state file with one virtio transport given 9 queues (over
    // the cap of 8) and both CRCs made right again, so only the cap can catch it.
    let good = sh(
        "corrupt",
        "spec corrupt hos-c0\n\
         hospes run corrupt.toml --api-sock /tmp/c.sock >out 2>&1 & pid=$!\n\
         wait_lines out 5\n\
         rm -rf /data/corrupt-cases; mkdir /data/corrupt-cases\n\
         hospes ctl /tmp/c.sock snapshot /data/corrupt-cases/good --then stop >/dev/null || exit 1\n\
         wait $pid; echo rc=$?; echo ===STATE; base64 /data/corrupt-cases/good/state.bin; echo ===END",
    );
    assert_eq!(value(&good, "rc="), "0", "{good}");
    let b64: String = section(&good, "STATE").split_whitespace().collect();
    let over = over_cap(&decode_base64(&b64));
    let mut push = String::from("base64 -d > /tmp/over-cap.bin <<'B64'\n");
    push.push_str(&encode_base64(&over));
    push.push_str("\nB64\n");

    let mut script = push;
    for (i, c) in CORRUPTIONS.iter().enumerate() {
        script.push_str(&format!(
            "d=/data/corrupt-cases/bad{i}; mkdir $d; ln good/memory.bin good/disk-data.img $d/; \
             cp good/state.bin $d/; {make}\n\
             timeout 120 hospes restore $d --api-sock /tmp/bad.sock >/tmp/bad.out 2>&1; echo \"case{i} rc=$?\"\n\
             sed 's/^/case{i} says: /' /tmp/bad.out; [ -S /tmp/bad.sock ] && echo case{i} left a socket\n",
            make = c.make
        ));
    }
    let mut l2 = common::l2_with_data_disk();
    let out = l2
        .run(
            &format!(
                "cd /data/corrupt-cases; export HOSPES_GUEST_DIR=/guest\n{script}cd /; rm -rf /data/corrupt-cases"
            ),
            TIMEOUT,
        )
        .expect("rig command");
    let out = out.output;
    for (i, c) in CORRUPTIONS.iter().enumerate() {
        assert!(
            out.contains(&format!("case{i} rc=2")),
            "{}: exit code:\n{out}",
            c.name
        );
        let says: Vec<&str> = out
            .lines()
            .filter(|l| l.starts_with(&format!("case{i} says: ")))
            .collect();
        assert!(
            says.iter().any(|l| l.contains(c.says)),
            "{}: message should say {:?}:\n{out}",
            c.name,
            c.says
        );
        // Nothing started: no guest output, no API socket left behind.
        assert!(
            !says.iter().any(|l| l.contains("c=")),
            "{}: a guest ran:\n{out}",
            c.name
        );
        assert!(!out.contains(&format!("case{i} left a socket")), "{out}");
    }
}

/// Re-encodes a state file with one more queue on the first virtio transport than the
/// cap allows, with valid CRCs, as JSON: format version 2, which hospes still reads (the
/// binary payload of version 3 cannot be edited field by field).
fn over_cap(state_file: &[u8]) -> Vec<u8> {
    let state = snapshot::decode(state_file).expect("the snapshot's state");
    let state_file = snapshot::encode_as(&state, snapshot::JSON_FORMAT_VERSION).unwrap();
    let payload = &state_file[32..];
    let mut state: serde_json::Value = serde_json::from_slice(payload).expect("state JSON");
    let queues = state["devices"]["virtio"][0]["queues"]
        .as_array_mut()
        .expect("queues");
    let first = queues[0].clone();
    while queues.len() < 9 {
        queues.push(first.clone());
    }
    let payload = serde_json::to_vec(&state).unwrap();
    let mut header = state_file[..32].to_vec();
    header[16..24].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    header[24..28].copy_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    let crc = crc32fast::hash(&header[..28]);
    header[28..32].copy_from_slice(&crc.to_le_bytes());
    header.extend_from_slice(&payload);
    header
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn encode_base64(data: &[u8]) -> String {
    let mut out = String::new();
    for (i, chunk) in data.chunks(3).enumerate() {
        if i > 0 && i % 19 == 0 {
            out.push('\n');
        }
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for k in 0..4 {
            if k <= chunk.len() {
                out.push(B64[(n >> (18 - 6 * k)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn decode_base64(text: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let mut acc = 0u32;
    let mut bits = 0;
    for c in text.bytes() {
        let Some(v) = B64.iter().position(|&x| x == c) else {
            continue; // '=' padding and anything else
        };
        acc = (acc << 6) | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}
