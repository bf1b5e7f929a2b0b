//! The plumbing later tests build on: a data disk that supports O_DIRECT, two L2s
//! joined by a network link, and an L2 that died rebooted onto the same link.

use std::time::Duration;

use rig::{NetConfig, RigConfig, L2};

const T: Duration = Duration::from_secs(60);

fn ok(l2: &mut L2, script: &str) -> String {
    let out = l2.run(script, T).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out.status, 0, "`{script}` failed:\n{}", out.output);
    out.output
}

#[test]
fn two_linked_l2s_and_a_data_disk_and_a_dead_l2_rebooted_onto_the_link() {
    let (a, b) = NetConfig::free_pair().unwrap();
    let small = || RigConfig::default().cpus(1).memory_mib(512);
    let mut one = L2::boot(small().net(a).disk_mib(64)).unwrap_or_else(|e| panic!("{e}"));
    let mut two = L2::boot(small().net(b)).unwrap_or_else(|e| panic!("{e}"));

    assert!(ok(&mut one, "mount").contains("/dev/vda on /data type ext4"));
    ok(
        &mut one,
        "dd if=/dev/zero of=/data/f bs=4k count=16 oflag=direct",
    );

    ok(&mut two, "nc -l -p 5000 >/tmp/got 2>&1 & sleep 0.5");
    ok(
        &mut one,
        "ping -c 1 -W 5 192.0.2.2 && echo over-the-link | nc 192.0.2.2 5000",
    );
    ok(
        &mut two,
        "for i in 1 2 3 4 5 6 7 8 9 10; do [ -s /tmp/got ] && break; sleep 0.2; done",
    );
    assert_eq!(ok(&mut two, "cat /tmp/got"), "over-the-link\n");

    // L2 resets at once (sysrq b), and QEMU exits (-no-reboot): the agent is gone.
    assert!(two.run("echo b > /proc/sysrq-trigger", T).is_err());
    assert!(two.agent_lost());
    assert!(matches!(
        two.run("true", T),
        Err(rig::RigError::AgentLost { .. })
    ));
    two.reboot().unwrap_or_else(|e| panic!("{e}"));
    assert!(!two.agent_lost());
    assert_eq!(
        ok(&mut two, "cat /tmp/got 2>/dev/null; echo fresh"),
        "fresh\n"
    );
    ok(&mut one, "ping -c 1 -W 5 192.0.2.2");
}
