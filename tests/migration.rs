//! Live migration between two hospes processes inside one rig L2, over loopback QUIC: the
//! counting guest of tests/snapshot.rs (a counter every 100 ms, written to its disk and
//! read back) with a drive and a TAP must continue on the destination; refused or broken
//! migrations must leave it running on the source.

use std::time::Duration;

mod common;
use common::{assert_consistent, assert_continues, counters, section, value};

const TIMEOUT: Duration = Duration::from_secs(900);

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
dd if=/dev/urandom of=disk.img bs=1M count=${DISK_MIB:-16} 2>/dev/null
# Every test uses 172.16.9.0/24: another test's TAP left behind would take its route.
for t in $(ls /sys/class/net | grep '^hos-'); do tunctl -d $t >/dev/null 2>&1; done
# The TAP is left to hospes, which makes it multi-queue: the source and the destination
# both hold it during the handover (busybox tunctl makes single-queue ones only).
}
# tap_up NAME: once hospes made it, give the host end its address.
tap_up() { n=0; while [ ! -e /sys/class/net/$1 ]; do n=$((n+1)); [ $n -gt 300 ] && { echo "no TAP $1"; exit 1; }; sleep 0.1; done; ip addr add 172.16.9.1/24 dev $1; ip link set $1 up; }
keys() { hospes keygen src.key > src.pub && hospes keygen dst.key > dst.pub && hospes keygen other.key > other.pub || exit 1; }
lines() { n=$(grep -c '^c=' "$1" 2>/dev/null); echo ${n:-0}; }
# wait_lines FILE N: until FILE has N counter lines (60 s at most) while hospes ($pid) runs.
wait_lines() { n=0; while [ "$(lines $1)" -lt $2 ]; do n=$((n+1)); if [ $n -gt 600 ] || ! kill -0 $pid 2>/dev/null; then echo "no $2 counter lines in $1:"; cat $1; exit 1; fi; sleep 0.1; done; }
wait_sock() { n=0; while [ ! -S $1 ]; do n=$((n+1)); [ $n -gt 300 ] && { echo "no socket $1"; exit 1; }; sleep 0.1; done; }
"#;

/// Starts the counting guest (console in `out0`, log in `err0`, API /tmp/$1-src.sock,
/// `$SRC_ENV` added to its environment) and a destination listening on 127.0.0.1:$2
/// trusting `$3.pub`, drive images in dst/, console in out1, log in err1. Console and log
/// go to separate files: a log line written in the middle of a counter line would cut it.
const START: &str = r#"
start() {
spec counter hos-m0; keys
env HOSPES_LOG=info $SRC_ENV hospes run counter.toml --api-sock /tmp/$1-src.sock >out0 2>err0 & pid=$!; spid=$pid
tap_up hos-m0
wait_lines out0 20
mkdir -p dst
HOSPES_LOG=info hospes receive --listen 127.0.0.1:$2 --identity dst.key --trust $(cat $3.pub) --dir dst --api-sock /tmp/$1-dst.sock >out1 2>err1 & dpid=$!
n=0; while ! grep -q 'waiting for a VM' err1; do n=$((n+1)); [ $n -gt 100 ] && { echo "receive did not start:"; cat err1; exit 1; }; sleep 0.1; done
}
"#;

/// The downtime budget the tests migrate with. The rig's L2 runs under TCG, where QUIC
/// with TLS moves a few MB/s and the counting guest dirties about as much: the default
/// 50 ms budget is for real hardware.
const DOWNTIME_MS: u32 = 5000;

fn script(body: &str) -> String {
    format!("DOWNTIME_MS={DOWNTIME_MS}\n{START}\n{body}")
}

#[test]
fn a_migrated_guest_continues_its_counter_disk_and_network_and_the_source_exits_0() {
    let out = sh(
        "mig",
        &script(
            "DISK_MIB=4; start mig 4430 src\n\
             hospes migrate /tmp/mig-src.sock --to 127.0.0.1:4430 --peer $(cat dst.pub) --identity src.key --downtime-ms $DOWNTIME_MS >mig.txt 2>&1; rc=$?; echo migrate_rc=$rc; cat mig.txt\n\
             [ $rc = 0 ] || { kill $spid $dpid; echo ===ERR0; cat err0; echo ===OUT0; cat out0; echo ===ERR1; cat err1; echo ===OUT1; cat out1; exit 0; }\n\
             wait $spid; echo rc0=$?\n\
             pid=$dpid; wait_lines out1 15\n\
             n=0; until ping -c 1 -W 2 172.16.9.2 >ping.txt 2>&1; do n=$((n+1)); [ $n -gt 2 ] && break; done; echo ping_retries=$n; [ $n -le 2 ] && echo ping=ok || { echo ping=failed; cat ping.txt; ip route; cat /proc/net/arp; ls -l /proc/$dpid/fd | grep tun; }\n\
             hospes ctl /tmp/mig-dst.sock status | grep -q '\"running\"' && echo status=running\n\
             hospes ctl /tmp/mig-dst.sock shutdown; wait $dpid; echo rc1=$?\n\
             cmp disk.img dst/disk-data.img 4096 4096 && echo disk=same\n\
             echo ===ERR0; cat err0; echo ===OUT0; cat out0; echo ===ERR1; cat err1; echo ===OUT1; cat out1; echo ===END",
        ),
    );
    eprintln!(
        "{}",
        out.lines()
            .filter(|l| l.starts_with("migrated to")
                || l.contains("stop-and-copy")
                || l.contains("VM build")
                || l.contains("Done to VM built"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(value(&out, "migrate_rc="), "0", "{out}");
    assert!(out.contains("migrated to 127.0.0.1:4430: "), "{out}");
    assert_eq!(value(&out, "rc0="), "0", "{out}");
    assert_eq!(value(&out, "rc1="), "0", "{out}");
    eprintln!(
        "ping after migration needed {} retries",
        value(&out, "ping_retries=")
    );
    assert_eq!(value(&out, "ping="), "ok", "{out}");
    assert_eq!(value(&out, "status="), "running", "{out}");
    assert_eq!(value(&out, "disk="), "same", "{out}");
    let before = counters(section(&out, "OUT0"));
    let after = counters(section(&out, "OUT1"));
    assert_consistent("source", &before, &out);
    assert_consistent("destination", &after, &out);
    assert_continues("migration", &before, &after, &out);
}

#[test]
fn a_destination_that_does_not_trust_the_source_refuses_and_the_guest_runs_on() {
    let out = sh(
        "migref",
        &script(
            "start migref 4431 other\n\
             hospes migrate /tmp/migref-src.sock --to 127.0.0.1:4431 --peer $(cat dst.pub) --identity src.key --downtime-ms $DOWNTIME_MS >mig.txt 2>&1; echo migrate_rc=$?; sed 's/^/says: /' mig.txt\n\
             now=$(lines out0); wait_lines out0 $((now + 10)); echo after=running\n\
             hospes ctl /tmp/migref-src.sock status | grep -q '\"running\"' && echo status=running\n\
             kill $dpid; wait $dpid\n\
             ls dst | wc -l | sed 's/^/dst_files=/'\n\
             hospes ctl /tmp/migref-src.sock shutdown; wait $spid; echo rc0=$?\n\
             echo ===ERR0; cat err0; echo ===OUT0; cat out0; echo ===END",
        ),
    );
    assert_eq!(value(&out, "migrate_rc="), "1", "{out}");
    assert!(
        out.contains("says: hospes: migration to 127.0.0.1:4431 failed, the VM runs on here"),
        "{out}"
    );
    assert!(out.contains("refused"), "{out}");
    assert_eq!(value(&out, "after="), "running", "{out}");
    assert_eq!(value(&out, "status="), "running", "{out}");
    assert_eq!(value(&out, "dst_files="), "0", "{out}");
    assert_eq!(value(&out, "rc0="), "0", "{out}");
    assert_consistent("source", &counters(section(&out, "OUT0")), &out);
}

#[test]
fn a_destination_killed_mid_stream_leaves_the_guest_running_on_the_source() {
    // A 64 MiB drive of random data: round 0 takes long enough to be cut.
    let out = sh(
        "migkill",
        &script(
            "DISK_MIB=64; start migkill 4432 src\n\
             hospes migrate /tmp/migkill-src.sock --to 127.0.0.1:4432 --peer $(cat dst.pub) --identity src.key --downtime-ms $DOWNTIME_MS >mig.txt 2>&1 & mpid=$!\n\
             n=0; while true; do k=$(du -k dst/disk-data.img 2>/dev/null | cut -f1); [ \"${k:-0}\" -ge 2048 ] && break; n=$((n+1)); [ $n -gt 600 ] && break; sleep 0.05; done\n\
             du -k dst/disk-data.img | cut -f1 | sed 's/^/killed_at_kib=/'\n\
             kill -9 $dpid; wait $dpid\n\
             wait $mpid; echo migrate_rc=$?; sed 's/^/says: /' mig.txt\n\
             now=$(lines out0); wait_lines out0 $((now + 10)); echo after=running\n\
             hospes ctl /tmp/migkill-src.sock status | grep -q '\"running\"' && echo status=running\n\
             hospes ctl /tmp/migkill-src.sock shutdown; wait $spid; echo rc0=$?\n\
             echo ===ERR0; cat err0; echo ===OUT0; cat out0; echo ===END",
        ),
    );
    assert_eq!(value(&out, "migrate_rc="), "1", "{out}");
    assert!(
        out.contains("says: hospes: migration to 127.0.0.1:4432 failed, the VM runs on here"),
        "{out}"
    );
    assert_eq!(value(&out, "after="), "running", "{out}");
    assert_eq!(value(&out, "status="), "running", "{out}");
    assert_eq!(value(&out, "rc0="), "0", "{out}");
    assert_consistent("source", &counters(section(&out, "OUT0")), &out);
}

#[test]
fn a_commit_whose_acknowledgement_is_lost_keeps_the_source_paused_and_the_guest_runs_once() {
    // HOSPES_FAULT=commit-unacked: the source takes Commit's acknowledgement as lost, as
    // when the connection dies with Commit in flight. The destination did get Commit and
    // runs the guest; the source must not run it too, and says the outcome is unknown.
    let out = sh(
        "migdoubt",
        &script(
            "SRC_ENV=HOSPES_FAULT=commit-unacked; DISK_MIB=4; start migdoubt 4433 src\n\
             hospes migrate /tmp/migdoubt-src.sock --to 127.0.0.1:4433 --peer $(cat dst.pub) --identity src.key --downtime-ms $DOWNTIME_MS >mig.txt 2>&1; echo migrate_rc=$?; sed 's/^/says: /' mig.txt\n\
             kill -0 $spid && echo src=alive\n\
             hospes ctl /tmp/migdoubt-src.sock status | grep -q '\"paused\"' && echo src_status=paused\n\
             pid=$dpid; wait_lines out1 10; echo dst=counting\n\
             frozen=$(lines out0); sleep 3; [ \"$(lines out0)\" = \"$frozen\" ] && echo src=frozen\n\
             hospes ctl /tmp/migdoubt-dst.sock status | grep -q '\"running\"' && echo dst_status=running\n\
             hospes ctl /tmp/migdoubt-src.sock shutdown; wait $spid; echo rc0=$?\n\
             hospes ctl /tmp/migdoubt-dst.sock shutdown; wait $dpid; echo rc1=$?\n\
             echo ===ERR0; cat err0; echo ===OUT0; cat out0; echo ===ERR1; cat err1; echo ===OUT1; cat out1; echo ===END",
        ),
    );
    assert_eq!(value(&out, "migrate_rc="), "1", "{out}");
    assert!(out.contains("outcome unknown"), "{out}");
    assert_eq!(value(&out, "src="), "alive", "{out}");
    assert_eq!(value(&out, "src_status="), "paused", "{out}");
    assert_eq!(value(&out, "dst="), "counting", "{out}");
    assert!(out.contains("src=frozen"), "the source ran on:\n{out}");
    assert_eq!(value(&out, "dst_status="), "running", "{out}");
    assert_eq!(value(&out, "rc0="), "0", "{out}");
    assert_eq!(value(&out, "rc1="), "0", "{out}");
    let before = counters(section(&out, "OUT0"));
    let after = counters(section(&out, "OUT1"));
    assert_consistent("source", &before, &out);
    assert_consistent("destination", &after, &out);
    assert_continues("migration", &before, &after, &out);
}

#[test]
#[ignore = "CPU-bound guest: under heavy host contention its QUIC connection was lost; run by hand"]
fn a_guest_dirtying_faster_than_the_link_converges_by_throttling() {
    // The guest rewrites 16 MiB of tmpfs with random data over and over: in the rig that
    // dirties memory about as fast as loopback QUIC carries it, so pre-copy alone does not
    // get under a 300 ms budget; throttling its vCPU does.
    let out = sh(
        "migthr",
        "keys; spec_hot() {\n\
         cat > hot.toml <<SPEC\n\
[service]\n\
name = \"hot\"\n\
[machine]\n\
memory_mib = 128\n\
[boot]\n\
cmdline = 'quiet -- \"i=0; while true; do dd if=/dev/urandom of=/dev/shm/x bs=1M count=16 2>/dev/null; echo c=\\$i r=d=\\$i; i=\\$((i+1)); done\"'\n\
SPEC\n\
}; spec_hot\n\
         HOSPES_LOG=info hospes run hot.toml --api-sock /tmp/migthr-src.sock >out0 2>err0 & pid=$!; spid=$pid\n\
         wait_lines out0 3\n\
         mkdir -p dst\n\
         HOSPES_LOG=info hospes receive --listen 127.0.0.1:4433 --identity dst.key --trust $(cat src.pub) --dir dst --api-sock /tmp/migthr-dst.sock >out1 2>err1 & dpid=$!\n\
         n=0; while ! grep -q 'waiting for a VM' err1; do n=$((n+1)); [ $n -gt 100 ] && { echo receive did not start; cat err1; exit 1; }; sleep 0.1; done\n\
         hospes migrate /tmp/migthr-src.sock --to 127.0.0.1:4433 --peer $(cat dst.pub) --identity src.key --downtime-ms 300 --json >mig.json 2>mig.txt; rc=$?; echo migrate_rc=$rc; cat mig.txt; echo; echo json=$(cat mig.json)\n\
         [ $rc = 0 ] || { kill $spid $dpid; echo ===ERR0; cat err0; echo ===OUT0; cat out0; echo ===ERR1; cat err1; echo ===OUT1; cat out1; exit 0; }\n\
         wait $spid; echo rc0=$?\n\
         pid=$dpid; now=$(lines out1); wait_lines out1 $((now + 2)); echo after=running\n\
         hospes ctl /tmp/migthr-dst.sock shutdown; wait $dpid; echo rc1=$?\n\
         echo ===ERR0; cat err0; echo ===OUT0; cat out0; echo ===ERR1; cat err1; echo ===OUT1; cat out1; echo ===END",
    );
    assert_eq!(value(&out, "migrate_rc="), "0", "{out}");
    let json = out
        .lines()
        .find_map(|l| l.strip_prefix("json="))
        .unwrap_or_else(|| panic!("no json in:\n{out}"));
    let record: serde_json::Value = serde_json::from_str(json).expect(json);
    eprintln!("throttled migration: {record}");
    let throttle = record["throttle_percent"].as_u64().unwrap();
    assert!(throttle >= 20, "no throttling was needed: {record}\n{out}");
    assert!(record["rounds"].as_u64().unwrap() >= 3, "{record}");
    assert_eq!(
        record["per_round"].as_array().unwrap().len() as u64,
        record["rounds"].as_u64().unwrap(),
        "{record}"
    );
    assert!(record["downtime_ms"].as_f64().unwrap() > 0.0, "{record}");
    assert_eq!(value(&out, "rc0="), "0", "{out}");
    assert_eq!(value(&out, "after="), "running", "{out}");
    assert_eq!(value(&out, "rc1="), "0", "{out}");
}
