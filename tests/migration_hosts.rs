//! Live migration between two hosts: two rig L2s (A = 192.0.2.1, the source; B =
//! 192.0.2.2, the destination) joined by a QEMU UDP socket link, migrating over QUIC
//! from A to B. The guests (busybox, see `GUEST`) print a counter every 100 ms that they
//! write to their drive and read back, and per test: nothing more (idle), a 64 MiB
//! self-checking memory workload plus a self-checking disk writer, or a TCP server that
//! a client on A keeps talking to. Failed migrations (destination killed, link cut,
//! untrusted source, corrupted frame) must leave the guest running on A.
//!
//! Each test runs a sequence of shell steps on A and B (`Test::on`); background
//! processes (hospes, watchers, the TCP client) outlive a step, with their stdout in
//! `NAME.log`, stderr in `NAME.err`, pid in `NAME.pid` and exit status in `NAME.rc` (see
//! `bg` in `COMMON`).
//! A failing step or assertion prints every step's output and both hosts' logs.

use std::fmt;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rig::{NetConfig, RigConfig, L2};

mod common;
use common::{counters, find_value};

const HOSPES: &str = env!("CARGO_BIN_EXE_hospes");
/// The longest one step may take.
const TIMEOUT: Duration = Duration::from_secs(600);
/// Where B's `hospes receive` listens.
const LISTEN: &str = "192.0.2.2:4440";
/// The downtime budget the tests migrate with. The rig's L2s run under TCG, where QUIC
/// with TLS moves a few MB/s and the guests dirty about as much: the default 50 ms
/// budget is for real hardware.
const DOWNTIME_MS: u32 = 5000;

struct Hosts {
    a: L2,
    b: L2,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Host {
    A,
    B,
}

fn config(net: NetConfig) -> RigConfig {
    let guest = rig::guest_dir().expect("default guest");
    // One vCPU (the default): see `RigConfig::cpus`. The ext4 disk on /data takes the
    // drive images (O_DIRECT does not work on tmpfs).
    RigConfig::default()
        .disk_mib(1024)
        .net(net)
        .add_binary(HOSPES, "/usr/local/bin/hospes")
        .add_file(guest.join("vmlinuz"), "/guest/vmlinuz")
        .add_file(guest.join("initramfs.cpio.gz"), "/guest/initramfs.cpio.gz")
}

/// Boots A and B in parallel and checks that the link between them carries traffic.
fn boot() -> Result<Hosts, String> {
    let (na, nb) = NetConfig::free_pair().map_err(|e| e.to_string())?;
    let (ca, cb) = (config(na), config(nb));
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| L2::boot(ca));
        let b = s.spawn(|| L2::boot(cb));
        (a.join().expect("boot A"), b.join().expect("boot B"))
    });
    let mut hosts = Hosts {
        a: a.map_err(|e| format!("booting A: {e}"))?,
        b: b.map_err(|e| format!("booting B: {e}"))?,
    };
    for (l2, peer) in [(&mut hosts.a, "192.0.2.2"), (&mut hosts.b, "192.0.2.1")] {
        let out = l2
            .run(&format!("ping -c 2 -W 5 {peer}"), Duration::from_secs(60))
            .map_err(|e| e.to_string())?;
        if out.status != 0 {
            return Err(format!("no link to {peer}:\n{}", out.output));
        }
    }
    Ok(hosts)
}

/// The two hosts shared by the tests of this file, booted by the first; one test at a
/// time. A test that panicked does not poison them for the others. A host that stopped
/// answering (nested SVM under TCG hangs now and then) is rebooted, with the same link
/// ports, before the next test gets the pair: one hang fails one test, not the rest.
fn hosts() -> MutexGuard<'static, Option<Result<Hosts, String>>> {
    static HOSTS: Mutex<Option<Result<Hosts, String>>> = Mutex::new(None);
    let mut guard = HOSTS.lock().unwrap_or_else(|p| p.into_inner());
    if guard.is_none() {
        *guard = Some(boot());
    }
    let mut failed = None;
    if let Some(Ok(hosts)) = guard.as_mut() {
        for (name, l2) in [("host A", &mut hosts.a), ("host B", &mut hosts.b)] {
            if let Err(e) = l2.reboot_if_lost(name) {
                failed = Some(format!("rebooting {name}: {e}"));
                break;
            }
        }
    }
    if let Some(e) = failed {
        *guard = Some(Err(e));
    }
    guard
}

/// Shell helpers of every step, on both hosts (also in /tmp/hc.sh for `bgf`).
const COMMON: &str = r#"
export HOSPES_LOG=info HOSPES_GUEST_DIR=/guest
# bg NAME PROG ARGS...: runs PROG in its own session in the background (it outlives the
# step); stdout in NAME.log (for hospes: the guest's console), stderr in NAME.err (its
# log), pid in NAME.pid (PROG's own), exit status in NAME.rc.
bg() { n=$1; shift; rm -f $n.rc $n.pid; ( setsid "$@" </dev/null >$n.log 2>$n.err & echo $! >$n.pid; wait $!; echo $? >$n.rc ) & wait_file $n.pid 10; }
# bgf NAME 'SHELL CODE': bg for shell code that may use these helpers.
bgf() { n=$1; shift; bg $n sh -c ". /tmp/hc.sh; $*"; }
# wait_file FILE SECS
wait_file() { w=0; while [ ! -s $1 ]; do w=$((w+1)); [ $w -gt $(($2 * 10)) ] && { echo "no $1 after $2 s"; return 1; }; sleep 0.1; done; }
# wait_grep FILE PATTERN COUNT SECS: until FILE has COUNT lines matching PATTERN.
count() { n=$(grep -c "$2" $1 2>/dev/null); echo ${n:-0}; }
wait_grep() { w=0; while [ $(count $1 "$2") -lt $3 ]; do w=$((w+1)); [ $w -gt $(($4 * 10)) ] && { echo "no $3 lines '$2' in $1 after $4 s"; return 1; }; sleep 0.1; done; }
# wait_more FILE PATTERN N SECS: until N more lines than now match.
wait_more() { wait_grep $1 "$2" $(( $(count $1 "$2") + $3 )) $4; }
alive() { [ -s $1.pid ] && [ ! -e $1.rc ] && kill -0 $(cat $1.pid) 2>/dev/null; }
# tap_up NAME: once hospes made the TAP, give the host end its address and a MAC that
# is the same on both hosts, so the guest's ARP entry for its gateway stays right.
tap_up() { wait_file /sys/class/net/$1/address 900 || return 1; ip link set $1 address 02:00:00:00:09:01; ip addr add 172.16.9.1/24 dev $1; ip link set $1 up; echo "tap $1 up"; }
status() { hospes ctl $1 status >status.txt 2>&1; grep -q '"running"' status.txt && echo running || { echo not-running; cat status.txt >&2; }; }
# netdiag TAP: what the host knows about the guest's network.
netdiag() { ip addr show $1; ip route; ip neigh; grep Icmp: /proc/net/snmp; for d in rx tx; do for k in packets dropped errors; do echo "$1 ${d}_$k=$(cat /sys/class/net/$1/statistics/${d}_$k)"; done; done; }
"#;

/// What the hosts are reset to before and after each test: every process a test
/// started (by its pid file) killed, TAPs, routes and files gone, the link up.
const RESET: &str = r#"
for f in /data/*/*.pid; do [ -s "$f" ] && kill -9 $(cat "$f") 2>/dev/null; done
sleep 0.5
ip link set eth0 up
ip route del 172.16.9.0/24 via 192.0.2.2 2>/dev/null
for t in $(ls /sys/class/net | grep '^hos-'); do ip link del $t 2>/dev/null; done
rm -rf /data/* /tmp/*.sock
true
"#;

/// The guest's program, read from its drive's first 64 KiB up to `#END` (the kernel
/// command line is too short and too hard to quote for it). Functions started in the
/// background by the spec's WORKLOAD (a line appended by `spec`).
const GUEST: &str = r#"
ip addr add 172.16.9.2/24 dev eth0; ip link set eth0 up; ip route add default via 172.16.9.1
mkdir -p /dev/shm; mount -t tmpfs -o size=96m tmpfs /dev/shm
# A counter every 100 ms, written to the drive at 1 MiB and read back: c=N r=d=N.
counter() { i=0; while true; do printf d=%08d $i | dd of=/dev/vda bs=512 seek=2048 conv=sync,notrunc oflag=direct 2>/dev/null; r=$(dd if=/dev/vda bs=512 skip=2048 count=1 iflag=direct 2>/dev/null | tr -d '\000'); echo c=$i r=$r; i=$((i+1)); usleep 100000; done; }
# 64 MiB of memory rewritten over and over: /dev/shm/dF.V is version V of file F (1 MiB
# from /dev/urandom, never changed once written), /dev/shm/sF is "V md5" of its newest
# version; the old version goes once sF names the new one.
memwrite() { v=0; while true; do v=$((v+1)); f=0; while [ $f -lt 64 ]; do dd if=/dev/urandom of=/dev/shm/d$f.$v bs=1M count=1 2>/dev/null; s=$(md5sum < /dev/shm/d$f.$v); echo "$v ${s%% *}" > /dev/shm/s$f.t; mv /dev/shm/s$f.t /dev/shm/s$f; rm -f /dev/shm/d$f.$((v-1)); f=$((f+1)); done; echo memwrite pass=$v; done; }
# Re-reads every file's newest version and compares its md5 with the one kept; a file
# the writer replaced meanwhile is skipped (its newer version is checked next pass).
memcheck() { e=0; p=0; while true; do f=0; k=0; while [ $f -lt 64 ]; do if [ -e /dev/shm/s$f ] && read v h < /dev/shm/s$f; then s=$(md5sum < /dev/shm/d$f.$v 2>/dev/null) || s=; if [ -n "$s" ]; then k=$((k+1)); [ "${s%% *}" = "$h" ] || { e=$((e+1)); echo membad f=$f v=$v; }; fi; fi; f=$((f+1)); done; p=$((p+1)); echo memcheck errors=$e passes=$p checked=$k; done; }
# Writes 64 KiB slots 0..31 at 2 MiB on the drive in turn (w=I k=SLOT after each write),
# keeping each slot's md5 in memory, and reads back the slot written 16 writes earlier.
disk() { i=0; e=0; c=0; while true; do k=$((i % 32)); dd if=/dev/urandom of=/dev/shm/blk bs=64k count=1 2>/dev/null; md5sum < /dev/shm/blk > /dev/shm/b$k; dd if=/dev/shm/blk of=/dev/vda bs=64k seek=$((32 + k)) conv=notrunc oflag=direct 2>/dev/null; echo w=$i k=$k; if [ $i -ge 16 ]; then j=$(( (i - 16) % 32 )); s=$(dd if=/dev/vda bs=64k skip=$((32 + j)) count=1 iflag=direct 2>/dev/null | md5sum); c=$((c+1)); [ "$s" = "$(cat /dev/shm/b$j)" ] || { e=$((e+1)); echo diskbad k=$j; }; fi; [ $k = 31 ] && echo diskcheck errors=$e checks=$c; i=$((i+1)); usleep 200000; done; }
# Diagnostics: the guest's NIC counters every 5 s.
netmon() { d=/sys/class/net/eth0/statistics; while true; do echo "net rx=$(cat $d/rx_packets) tx=$(cat $d/tx_packets) gw=$(ip neigh show 172.16.9.1)"; sleep 5; done; }
# One answer per TCP connection on port 7000: "srv n=N got=LINE".
server() { echo 0 > /n; cat > /srv.sh <<'SRV'
#!/bin/sh
read -r l; n=$(cat /n); echo $((n+1)) > /n; echo "srv n=$n got=$l"
SRV
chmod +x /srv.sh; while true; do nc -l -p 7000 -e /srv.sh; done; }
"#;

/// Host-side helpers to make and start a guest: `spec NAME MEMORY_MIB DISK_MIB WORKLOAD`.
const SPEC: &str = r#"
spec() {
cat > $1.toml <<SPEC
[service]
name = "$1"
[machine]
memory_mib = $2
[boot]
cmdline = 'quiet -- "dd if=/dev/vda bs=64k count=1 2>/dev/null | sed /^#END/q >/w.sh; sh /w.sh"'
[[drive]]
id = "data"
path = "disk.img"
[[net]]
id = "net0"
tap = "hos-g"
SPEC
dd if=/dev/urandom of=disk.img bs=1M count=$3 2>/dev/null
{ cat /tmp/guest.sh; echo "$4"; echo 'wait'; echo '#END'; } > guest.sh
[ $(wc -c < guest.sh) -lt 65536 ] || { echo "guest.sh too long"; exit 1; }
dd if=guest.sh of=disk.img conv=notrunc 2>/dev/null
}
# start_src [ENV=VALUE...]: the guest on A (API /tmp/src.sock), its TAP up, 20 counter lines.
start_src() {
bg src env "$@" hospes run guest.toml --api-sock /tmp/src.sock
tap_up hos-g || exit 1
wait_grep src.log '^c=' 20 120 || exit 1
}
"#;

/// One test's run on the hosts: its steps' outputs, for failure messages.
struct Test<'a> {
    hosts: &'a mut Hosts,
    name: &'static str,
    log: String,
    start: Instant,
}

impl<'a> Test<'a> {
    /// Resets both hosts and makes /data/NAME the working directory of every step.
    fn new(
        guard: &'a mut MutexGuard<'static, Option<Result<Hosts, String>>>,
        name: &'static str,
    ) -> Self {
        let hosts = match guard.as_mut().expect("booted") {
            Ok(h) => h,
            Err(e) => panic!("the hosts did not boot: {e}"),
        };
        let mut t = Test {
            hosts,
            name,
            log: String::new(),
            start: Instant::now(),
        };
        for host in [Host::A, Host::B] {
            t.raw(host, RESET);
        }
        t
    }

    fn l2(&mut self, host: Host) -> &mut L2 {
        match host {
            Host::A => &mut self.hosts.a,
            Host::B => &mut self.hosts.b,
        }
    }

    /// Runs `script` as is; returns its status and output (a rig error as status -1).
    fn raw(&mut self, host: Host, script: &str) -> (i32, String) {
        let l2 = self.l2(host);
        match l2.run(script, TIMEOUT) {
            Ok(out) => (out.status, out.output),
            Err(e) => (
                -1,
                format!("rig error: {e}\nL2 console:\n{}", l2.console_log()),
            ),
        }
    }

    /// Runs `script` on `host` in /data/NAME with `COMMON`; returns its output, or panics
    /// with everything so far and both hosts' logs when it exits non-zero.
    fn on(&mut self, host: Host, script: &str) -> String {
        let name = self.name;
        let full = format!(
            "cat > /tmp/hc.sh <<'HCEOF'\n{COMMON}\nHCEOF\ncat > /tmp/guest.sh <<'GEOF'\n{GUEST}\nGEOF\n\
             . /tmp/hc.sh\n{SPEC}\nmkdir -p /data/{name}; cd /data/{name}\n{script}"
        );
        let t = self.start.elapsed().as_secs_f64();
        let (status, out) = self.raw(host, &full);
        let first = script.trim().lines().next().unwrap_or("");
        self.log += &format!("\n----- {host:?} at {t:.1} s: {first} ...\n{out}");
        for l in out.lines() {
            if l.starts_with("says: ") || l.starts_with("migrated to ") {
                eprintln!("{name}: {l}");
            }
        }
        if status != 0 {
            self.fail(&format!("step on {host:?} exited {status}"));
        }
        out
    }

    /// Panics with `why`, every step's output, and both hosts' files.
    fn fail(&mut self, why: &str) -> ! {
        let name = self.name;
        let dump = format!(
            "cd /data/{name} 2>/dev/null || exit 0; ls -la . dst 2>/dev/null; \
             for f in *.log *.err *.txt *.json *.rc; do [ -e $f ] || continue; echo \"=== $f\"; tail -n 150 $f; done"
        );
        let (_, a) = self.raw(Host::A, &dump);
        let (_, b) = self.raw(Host::B, &dump);
        panic!(
            "{name}: {why}\n{}\n\n===== host A files:\n{a}\n\n===== host B files:\n{b}",
            self.log
        );
    }

    /// `assert!` with the test's log.
    fn check(&mut self, ok: bool, what: &str) {
        if !ok {
            self.fail(what);
        }
    }

    /// Identity keys: src on A, dst and other on B. Returns their public keys.
    fn keys(&mut self) -> (String, String, String) {
        let a = self.on(Host::A, "hospes keygen src.key | sed 's/^/pub=/'");
        let b = self.on(
            Host::B,
            "hospes keygen dst.key | sed 's/^/pub=/'; hospes keygen other.key | sed 's/^/pub=/'",
        );
        let pubs: Vec<String> = a
            .lines()
            .chain(b.lines())
            .filter_map(|l| l.strip_prefix("pub="))
            .map(|s| s.trim().to_string())
            .collect();
        assert_eq!(pubs.len(), 3, "keys:\n{a}\n{b}");
        (pubs[0].clone(), pubs[1].clone(), pubs[2].clone())
    }

    /// Starts `hospes receive` on B trusting `trust`, drive images in dst/, and a
    /// watcher that brings up B's end of the guest's TAP once hospes made it.
    fn receive(&mut self, trust: &str) {
        self.on(
            Host::B,
            &format!(
                "sysctl -q -w net.ipv4.ip_forward=1; mkdir -p dst\n\
                 bg dst hospes receive --listen {LISTEN} --identity dst.key --trust {trust} --dir dst --api-sock /tmp/dst.sock\n\
                 wait_grep dst.err 'waiting for a VM' 1 60 || exit 1\n\
                 bgf tap 'tap_up hos-g'"
            ),
        );
    }

    /// `hospes migrate` of A's guest to B, in the background on A (mig.txt, mig.rc).
    fn migrate_bg(&mut self, dst_pub: &str, extra: &str) {
        self.on(
            Host::A,
            &format!(
                "bg mig hospes migrate /tmp/src.sock --to {LISTEN} --peer {dst_pub} --identity src.key --downtime-ms {DOWNTIME_MS} {extra}"
            ),
        );
    }
}

impl Drop for Test<'_> {
    fn drop(&mut self) {
        for host in [Host::A, Host::B] {
            self.raw(host, RESET);
        }
        eprintln!("{}: {:.1} s", self.name, self.start.elapsed().as_secs_f64());
    }
}

impl fmt::Display for Test<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.log)
    }
}

/// The text between the lines `@@NAME` and `@@END`.
fn between<'a>(out: &'a str, name: &str) -> Option<&'a str> {
    let start = out.find(&format!("@@{name}\n"))? + name.len() + 3;
    let end = out[start..].find("@@END").map_or(out.len(), |e| start + e);
    Some(&out[start..end])
}

impl Test<'_> {
    /// Every counter line read back from the disk what it wrote, the counter increased by
    /// one from line to line, and at least `min` lines.
    fn consistent(&mut self, who: &str, c: &[(u64, u64)], min: usize) {
        self.check(
            c.len() >= min,
            &format!("{who}: {} counter lines, want {min}", c.len()),
        );
        for pair in c.windows(2) {
            self.check(
                pair[1].0 == pair[0].0 + 1,
                &format!("{who}: counter {pair:?} skipped"),
            );
        }
        for &(n, r) in c {
            self.check(n == r, &format!("{who}: the disk read back {r} for {n}"));
        }
    }

    /// The guest's counter went on across the migration: A's last line, then B's first
    /// (at most one line lost: printed while A was paused but not yet sent).
    fn continued(&mut self, src: &str, dst: &str) {
        let before = counters(src);
        let after = counters(dst);
        self.consistent("source", &before, 20);
        self.consistent("destination", &after, 10);
        let (last, first) = (before.last().unwrap().0, after[0].0);
        self.check(
            first == last + 1 || first == last + 2,
            &format!("counter went from {last} on A to {first} on B"),
        );
    }

    /// A failed migration left the guest running on A: its counter goes on, status
    /// running, a shutdown exits 0; the receive dir on B is empty (`dst_empty`).
    fn runs_on(&mut self, dst_empty: bool, says: &str) -> String {
        let out = self.on(
            Host::A,
            "wait_file mig.rc 180 || exit 1; echo migrate_rc=$(cat mig.rc); sed 's/^/says: /' mig.err\n\
             wait_more src.log '^c=' 20 120 && echo after=running\n\
             echo status=$(status /tmp/src.sock)\n\
             hospes ctl /tmp/src.sock shutdown >/dev/null; wait_file src.rc 60; echo src_rc=$(cat src.rc)\n\
             echo @@SRC; cat src.log; echo @@END; echo @@SRCERR; cat src.err; echo @@END",
        );
        self.check(
            find_value(&out, "migrate_rc=").as_deref() == Some("1"),
            "migrate did not exit 1",
        );
        self.check(
            out.contains(&format!(
                "says: hospes: migration to {LISTEN} failed, the VM runs on here: "
            )),
            "migrate did not say the VM runs on here",
        );
        self.check(out.contains(says), &format!("migrate did not say {says:?}"));
        self.check(
            find_value(&out, "after=").as_deref() == Some("running"),
            "the guest stopped on A",
        );
        self.check(
            find_value(&out, "status=").as_deref() == Some("running"),
            "status on A is not running",
        );
        self.check(
            find_value(&out, "src_rc=").as_deref() == Some("0"),
            "the source did not exit 0",
        );
        let src = between(&out, "SRC").unwrap_or("").to_string();
        let c = counters(&src);
        self.consistent("source", &c, 40);
        let b = self.on(
            Host::B,
            "wait_file dst.rc 120; echo dst_rc=$(cat dst.rc); echo dst_files=$(ls -A dst | wc -l); ls -lA dst\n\
             echo @@DSTERR; cat dst.err; echo @@END",
        );
        self.check(
            find_value(&b, "dst_rc=").as_deref() != Some("0"),
            "the destination exited 0",
        );
        if dst_empty {
            self.check(
                find_value(&b, "dst_files=").as_deref() == Some("0"),
                "files left in B's receive dir",
            );
        }
        between(&b, "DSTERR").unwrap_or("").to_string()
    }
}

#[test]
fn an_idle_guest_moves_to_the_other_host_and_the_source_exits_0() {
    let mut guard = hosts();
    let mut t = Test::new(&mut guard, "idle");
    let (src_pub, dst_pub, _) = t.keys();
    t.receive(&src_pub);
    t.on(Host::A, "spec guest 128 4 'counter & netmon &'; start_src");
    let out = t.on(
        Host::A,
        &format!(
            "hospes migrate /tmp/src.sock --to {LISTEN} --peer {dst_pub} --identity src.key --downtime-ms {DOWNTIME_MS} --json >mig.json 2>mig.err; echo migrate_rc=$?\n\
             cat mig.err; echo @@JSON; cat mig.json; echo @@END\n\
             wait_file src.rc 60; echo src_rc=$(cat src.rc)\n\
             ip link show hos-g >/dev/null 2>&1 && echo tap_a=left || echo tap_a=gone\n\
             echo @@SRC; cat src.log; echo @@END; echo @@SRCERR; cat src.err; echo @@END"
        ),
    );
    t.check(
        find_value(&out, "migrate_rc=").as_deref() == Some("0"),
        "migrate did not exit 0",
    );
    t.check(
        find_value(&out, "src_rc=").as_deref() == Some("0"),
        "the source did not exit 0",
    );
    t.check(
        find_value(&out, "tap_a=").as_deref() == Some("gone"),
        "A's TAP is left",
    );
    let b = t.on(
        Host::B,
        "wait_more dst.log '^c=' 20 120 || exit 1; echo status=$(status /tmp/dst.sock)\n\
         n=0; until ping -c 1 -W 2 172.16.9.2 >ping.txt 2>&1; do n=$((n+1)); [ $n = 1 ] && netdiag hos-g; [ $n -gt 2 ] && break; done; echo ping_retries=$n\n\
         [ $n -le 2 ] && echo ping=ok || { echo ping=failed; cat ping.txt; netdiag hos-g; grep '^net ' dst.log | tail -n 2; }\n\
         hospes ctl /tmp/dst.sock shutdown >/dev/null; wait_file dst.rc 60; echo dst_rc=$(cat dst.rc)\n\
         echo @@DST; cat dst.log; echo @@END; echo @@DSTERR; cat dst.err; echo @@END",
    );
    let json = between(&out, "JSON").unwrap_or("");
    let report: serde_json::Value = match serde_json::from_str(json.trim()) {
        Ok(v) => v,
        Err(e) => t.fail(&format!(
            "migrate --json printed no JSON object ({e}): {json:?}"
        )),
    };
    eprintln!("migrate --json: {report}");
    for key in ["downtime_ms", "bytes", "rounds", "total_ms"] {
        let ok = report
            .get(key)
            .and_then(serde_json::Value::as_f64)
            .is_some_and(|v| v > 0.0);
        t.check(ok, &format!("--json has no positive {key}"));
    }
    t.check(
        report.get("to").and_then(|v| v.as_str()) == Some(LISTEN),
        "--json \"to\"",
    );
    t.check(
        find_value(&b, "status=").as_deref() == Some("running"),
        "status on B is not running",
    );
    // The guest answers at once on B: at most two pings of 2 s may go unanswered (its
    // ARP entry for the host's side of the TAP still names A's MAC until B asks).
    eprintln!(
        "idle: ping from B needed {} retries",
        find_value(&b, "ping_retries=").as_deref().unwrap_or("?")
    );
    t.check(
        find_value(&b, "ping=").as_deref() == Some("ok"),
        "B cannot ping the guest",
    );
    t.check(
        find_value(&b, "dst_rc=").as_deref() == Some("0"),
        "the destination did not exit 0 on shutdown",
    );
    let (src, dst) = (
        between(&out, "SRC").unwrap_or(""),
        between(&b, "DST").unwrap_or(""),
    );
    let (src, dst) = (src.to_string(), dst.to_string());
    t.continued(&src, &dst);
}

/// Disk blocks of 64 KiB: the guest's program, the counter's sector and the slots.
const COUNTER_BLOCK: usize = 16;
const SLOT0_BLOCK: usize = 32;
const SLOTS: usize = 32;

/// md5 of each 64 KiB block of an image, from `md5 I HASH` lines.
fn block_md5s(out: &str, tag: &str) -> Vec<String> {
    let section = between(out, tag).unwrap_or("");
    section
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

#[test]
fn a_guest_dirtying_64_mib_and_its_disk_moves_without_losing_a_byte() {
    let mut guard = hosts();
    let mut t = Test::new(&mut guard, "dirty");
    let (src_pub, dst_pub, _) = t.keys();
    t.receive(&src_pub);
    t.on(
        Host::A,
        "spec guest 192 16 'counter & memwrite & memcheck & disk &'; start_src\n\
         wait_grep src.log '^memwrite pass=' 1 400 && wait_grep src.log '^memcheck ' 2 400 || exit 1",
    );
    t.migrate_bg(&dst_pub, "");
    // The drive image B runs on must equal the one A had when it paused for the last
    // time: A's disk.img stays as it was then once the source exited. B's guest writes
    // on, so B is paused right after the migration and its writes since (the slots of
    // its `w=` lines, the one it may have been writing, the counter's block) are left
    // out of the comparison.
    let m = t.on(
        Host::A,
        "wait_file mig.rc 600 || exit 1; echo migrate_rc=$(cat mig.rc); cat mig.log mig.err",
    );
    t.check(
        find_value(&m, "migrate_rc=").as_deref() == Some("0"),
        "migrate did not exit 0",
    );
    let paused = t.on(
        Host::B,
        "hospes ctl /tmp/dst.sock pause >/dev/null || exit 1; echo @@PAUSED; cat dst.log; echo @@END\n\
         echo @@BLOCKS; for i in $(seq 0 255); do dd if=dst/disk-data.img bs=64k skip=$i count=1 2>/dev/null | md5sum; done; echo @@END\n\
         hospes ctl /tmp/dst.sock resume >/dev/null || exit 1",
    );
    let a = t.on(
        Host::A,
        "wait_file src.rc 60; echo src_rc=$(cat src.rc)\n\
         echo @@BLOCKS; for i in $(seq 0 255); do dd if=disk.img bs=64k skip=$i count=1 2>/dev/null | md5sum; done; echo @@END\n\
         echo @@SRC; cat src.log; echo @@END; echo @@SRCERR; cat src.err; echo @@END",
    );
    let b = t.on(
        Host::B,
        "\
         wait_more dst.log '^memcheck ' 2 600 && wait_more dst.log '^diskcheck ' 1 300 || exit 1\n\
         echo status=$(status /tmp/dst.sock)\n\
         hospes ctl /tmp/dst.sock shutdown >/dev/null; wait_file dst.rc 60; echo dst_rc=$(cat dst.rc)\n\
         echo @@DST; cat dst.log; echo @@END; echo @@DSTERR; cat dst.err; echo @@END",
    );
    t.check(
        find_value(&a, "src_rc=").as_deref() == Some("0"),
        "the source did not exit 0",
    );
    t.check(
        find_value(&b, "status=").as_deref() == Some("running"),
        "status on B is not running",
    );
    t.check(
        find_value(&b, "dst_rc=").as_deref() == Some("0"),
        "the destination did not exit 0 on shutdown",
    );
    let src = between(&a, "SRC").unwrap_or("").to_string();
    let dst = between(&b, "DST").unwrap_or("").to_string();
    t.continued(&src, &dst);

    // The guest's own checks: no error on either host, and both went on on B.
    for (who, log) in [("A", &src), ("B", &dst)] {
        let bad = log
            .lines()
            .filter(|l| l.starts_with("membad") || l.starts_with("diskbad"));
        let bad: Vec<&str> = bad.collect();
        t.check(
            bad.is_empty(),
            &format!("guest checks failed on {who}: {bad:?}"),
        );
        let errors = log.lines().filter(|l| {
            (l.starts_with("memcheck ") || l.starts_with("diskcheck ")) && !l.contains("errors=0 ")
        });
        let errors: Vec<&str> = errors.collect();
        t.check(
            errors.is_empty(),
            &format!("guest check errors on {who}: {errors:?}"),
        );
    }
    let passes = |log: &str| -> Vec<u64> {
        log.lines()
            .filter(|l| l.starts_with("memcheck "))
            .filter_map(|l| find_value(l, "passes=")?.parse().ok())
            .collect()
    };
    let (pa, pb) = (passes(&src), passes(&dst));
    let last_a = pa.last().copied().unwrap_or(0);
    t.check(
        pb.len() >= 2 && pb.windows(2).all(|w| w[1] == w[0] + 1) && pb[0] >= last_a,
        &format!("memcheck passes did not go on from A ({pa:?}) on B ({pb:?})"),
    );
    let checked_all = dst
        .lines()
        .any(|l| l.starts_with("memcheck ") && l.trim_end().ends_with("checked=64"));
    t.check(checked_all, "no memcheck pass on B checked all 64 files");

    // The drive: block by block, but for what B wrote before its pause.
    let (ia, ib) = (block_md5s(&a, "BLOCKS"), block_md5s(&paused, "BLOCKS"));
    t.check(
        ia.len() == 256 && ib.len() == 256,
        "block checksums missing",
    );
    let slot_of = |l: &str| -> Option<usize> { find_value(l, " k=")?.parse().ok() };
    let paused = between(&paused, "PAUSED").unwrap_or("").to_string();
    let written_b: Vec<usize> = paused
        .lines()
        .filter(|l| l.starts_with("w="))
        .filter_map(slot_of)
        .collect();
    let last = written_b.last().copied().or_else(|| {
        src.lines()
            .filter(|l| l.starts_with("w="))
            .filter_map(slot_of)
            .next_back()
    });
    let mut skip: Vec<usize> = written_b.iter().map(|k| SLOT0_BLOCK + k).collect();
    skip.extend(last.map(|k| SLOT0_BLOCK + (k + 1) % SLOTS));
    skip.push(COUNTER_BLOCK);
    let differ: Vec<usize> = (0..256)
        .filter(|i| !skip.contains(i) && ia[*i] != ib[*i])
        .collect();
    eprintln!("blocks skipped (written on B before its pause): {skip:?}");
    t.check(
        differ.is_empty(),
        &format!("drive blocks {differ:?} differ between A's image at pause and B's"),
    );
}

#[test]
fn a_tcp_client_on_the_source_host_finds_the_guest_server_on_the_destination() {
    let mut guard = hosts();
    let mut t = Test::new(&mut guard, "tcp");
    let (src_pub, dst_pub, _) = t.keys();
    t.receive(&src_pub);
    // The client: one connection a second, "T ok srv n=N got=hi" or "T fail" (T: A's
    // uptime); it reconnects whatever happened to the last one.
    t.on(
        Host::A,
        "ip route add 172.16.9.0/24 via 192.0.2.2 metric 100\n\
         spec guest 128 4 'counter & netmon & server &'; start_src\n\
         cat > client.sh <<'EOF'\n\
         while true; do r=$(echo hi | timeout 5 nc -w 3 172.16.9.2 7000 2>/dev/null); t=$(cut -d' ' -f1 /proc/uptime); case \"$r\" in srv*) echo \"$t ok $r\" ;; *) echo \"$t fail\" ;; esac; sleep 1; done\n\
         EOF\n\
         bg client sh client.sh\n\
         wait_grep client.log ' ok srv' 3 120 || exit 1",
    );
    t.migrate_bg(&dst_pub, "");
    let a = t.on(
        Host::A,
        "wait_file mig.rc 600 || exit 1; echo migrate_rc=$(cat mig.rc); cat mig.log mig.err\n\
         [ \"$(cat mig.rc)\" = 0 ] || exit 1\n\
         wait_file src.rc 60; echo src_rc=$(cat src.rc); echo exited_at=$(cut -d' ' -f1 /proc/uptime)\n\
         ip link show hos-g >/dev/null 2>&1 && echo tap_a=left || echo tap_a=gone\n\
         ip route get 172.16.9.2\n\
         wait_more client.log ' ok srv' 5 180; kill $(cat client.pid)\n\
         echo @@CLIENT; cat client.log; echo @@END",
    );
    let b = t.on(
        Host::B,
        "echo status=$(status /tmp/dst.sock)\n\
         ip -s link show hos-g; echo tap_b_tx=$(cat /sys/class/net/hos-g/statistics/tx_packets)\n\
         hospes ctl /tmp/dst.sock shutdown >/dev/null; wait_file dst.rc 60; echo dst_rc=$(cat dst.rc)",
    );
    t.check(
        find_value(&a, "migrate_rc=").as_deref() == Some("0"),
        "migrate did not exit 0",
    );
    t.check(
        find_value(&a, "src_rc=").as_deref() == Some("0"),
        "the source did not exit 0",
    );
    t.check(
        find_value(&a, "tap_a=").as_deref() == Some("gone"),
        "A's TAP is left",
    );
    t.check(
        find_value(&b, "status=").as_deref() == Some("running"),
        "status on B is not running",
    );
    t.check(
        find_value(&b, "dst_rc=").as_deref() == Some("0"),
        "the destination did not exit 0 on shutdown",
    );
    let exited: f64 = find_value(&a, "exited_at=")
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::MAX);
    let client = between(&a, "CLIENT").unwrap_or("").to_string();
    // (A's uptime, the server's counter) of each answer.
    let answers: Vec<(f64, u64)> = client
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let t = w.next()?.parse().ok()?;
            (w.next()? == "ok").then_some(())?;
            Some((t, find_value(l, "n=")?.parse().ok()?))
        })
        .collect();
    let before = answers.iter().filter(|a| a.0 < exited).count();
    let after: Vec<u64> = answers
        .iter()
        .filter(|a| a.0 > exited)
        .map(|a| a.1)
        .collect();
    t.check(
        before >= 3,
        "the client had no answers before the migration",
    );
    // Once the source exited, A has no TAP: answers come from the guest on B, through
    // B's TAP, and the server's counter goes on from where it was on A.
    t.check(
        after.len() >= 5,
        "the client got no answers from the guest on B",
    );
    t.check(
        answers.windows(2).all(|w| w[1].1 > w[0].1),
        "the server's counter did not go on across the migration",
    );
    let tx: u64 = find_value(&b, "tap_b_tx=")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    t.check(tx >= 10, "B's TAP carried no traffic to the guest");
}

/// Starts a guest with a 64 MiB drive of random data on A (round 0 takes long enough to
/// be cut) and a destination on B trusting `trusted` (src or other).
fn start_failing(t: &mut Test, trusted: usize, env: &str) -> String {
    let (src_pub, dst_pub, other_pub) = t.keys();
    t.receive(if trusted == 0 { &src_pub } else { &other_pub });
    t.on(
        Host::A,
        &format!("spec guest 128 64 'counter &'; start_src {env}"),
    );
    dst_pub
}

/// On B: waits until the destination received 2 MiB of the drive.
const MID_STREAM: &str = "w=0; while true; do k=$(du -k dst/disk-data.img 2>/dev/null | cut -f1); \
     [ \"${k:-0}\" -ge 2048 ] && break; w=$((w+1)); [ $w -gt 1200 ] && { echo 'never mid-stream'; exit 1; }; \
     alive dst || { echo 'destination gone'; exit 1; }; sleep 0.05; done; echo at_kib=$k";

#[test]
fn a_destination_killed_mid_stream_leaves_the_guest_on_the_source() {
    let mut guard = hosts();
    let mut t = Test::new(&mut guard, "killed");
    let dst_pub = start_failing(&mut t, 0, "");
    t.migrate_bg(&dst_pub, "");
    t.on(Host::B, &format!("{MID_STREAM}\nkill -9 $(cat dst.pid)"));
    // SIGKILL leaves the destination no chance to remove its files: not checked.
    t.runs_on(false, "");
}

#[test]
fn a_link_cut_mid_stream_leaves_the_guest_on_the_source() {
    let mut guard = hosts();
    let mut t = Test::new(&mut guard, "cut");
    let dst_pub = start_failing(&mut t, 0, "");
    t.migrate_bg(&dst_pub, "");
    // Down until both ends gave up (the QUIC idle timeout is 10 s), then up again.
    t.on(
        Host::B,
        &format!(
            "{MID_STREAM}\nip link set eth0 down; echo link=down\n\
             wait_file dst.rc 120; echo dst_rc=$(cat dst.rc)\n\
             ip link set eth0 up; ip addr show eth0 | grep -q 192.0.2.2 || ip addr add 192.0.2.2/24 dev eth0"
        ),
    );
    t.runs_on(true, "");
    let out = t.on(
        Host::A,
        "ping -c 2 -W 5 192.0.2.2 >/dev/null && echo link=back",
    );
    t.check(
        find_value(&out, "link=").as_deref() == Some("back"),
        "the link did not come back",
    );
}

#[test]
fn a_destination_that_does_not_trust_the_source_refuses_it() {
    let mut guard = hosts();
    let mut t = Test::new(&mut guard, "untrusted");
    let dst_pub = start_failing(&mut t, 1, "");
    t.migrate_bg(&dst_pub, "");
    // The destination waits on for a trusted source: stop it.
    t.on(Host::A, "wait_file mig.rc 180");
    t.on(Host::B, "kill $(cat dst.pid)");
    t.runs_on(true, "refused");
}

#[test]
fn a_corrupted_frame_is_detected_and_the_guest_stays_on_the_source() {
    let mut guard = hosts();
    let mut t = Test::new(&mut guard, "corrupt");
    let dst_pub = start_failing(&mut t, 0, "HOSPES_FAULT=corrupt-frame");
    t.migrate_bg(&dst_pub, "");
    // The source reports the destination's reason, carried in the connection's close.
    let dst_log = t.runs_on(true, "the destination gave up");
    // The destination saw the corruption (a frame's CRC, or the stream's hash).
    let detected = dst_log.contains("CRC") || dst_log.contains("hash mismatch");
    t.check(detected, "B's log does not say it found a corrupted frame");
}
