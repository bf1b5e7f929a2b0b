//! virtio-net tests: MAC derivation, TAP name checks, and tx / mergeable rx through a real
//! TAP inside a private network namespace, driven by a real event-manager loop.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, SubscriberOps};
use virtio_bindings::virtio_net::{VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM};
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::virtio::mmio::{MmioTransport, REG_QUEUE_NOTIFY};
use crate::virtio::status::DEVICE_NEEDS_RESET;
use crate::virtio::test_utils::{guest_memory, ro, wo, TestDriver, DATA_BASE};

#[test]
fn mac_from_name_is_stable_local_unicast() {
    let mac = mac_from_name("web", "eth0");
    assert_eq!(mac, mac_from_name("web", "eth0"));
    assert_eq!(mac[0], 0x06);
    assert_eq!(mac[0] & 1, 0, "unicast");
    assert_eq!(mac[0] & 2, 2, "locally administered");
    assert_ne!(mac, mac_from_name("web", "eth1"));
    assert_ne!(mac, mac_from_name("db", "eth0"));
    assert_ne!(mac_from_name("ab", "c"), mac_from_name("a", "bc"));
    // Pinned: a MAC must not change between hospes versions (or between peers).
    assert_eq!(mac, [0x06, 0x1a, 0x82, 0x65, 0xfe, 0xdb]);
}

#[test]
fn bad_tap_name_is_an_error() {
    let err = Net::new(NetConfig {
        id: "eth0".into(),
        tap: "a-name-that-is-too-long".into(),
        mac: [6, 0, 0, 0, 0, 1],
    })
    .err()
    .unwrap();
    assert!(matches!(err, NetError::TapName { .. }));
    assert!(err.to_string().contains("a-name-that-is-too-long"));
}

const TAP: &str = "hsptest0";
const ETHERTYPE: [u8; 2] = [0x88, 0xb5]; // IEEE local experimental
const RX_BUF: u64 = DATA_BASE + 0x10_0000;
const RX_BUF_LEN: u32 = 256;

/// Runs `test` on a thread in a fresh network namespace, so the TAP it creates is
/// invisible to the host and vanishes with the thread.
fn in_private_netns(test: impl FnOnce() + Send + 'static) {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: creating a network namespace and a TAP needs root");
        return;
    }
    let result = std::thread::spawn(move || {
        // SAFETY: unshare(CLONE_NEWNET) moves only this thread into a new namespace.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            eprintln!(
                "skipped: unshare(CLONE_NEWNET) failed: {}",
                std::io::Error::last_os_error()
            );
            return;
        }
        // Keep IPv6 autoconfiguration chatter (RS, MLD) off the test link.
        let _ = std::fs::write("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1");
        test();
    })
    .join();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

/// An AF_PACKET socket on the host end of the TAP: what it sends, the guest receives, and
/// it sees what the guest transmits.
struct HostEnd {
    fd: OwnedFd,
}

impl HostEnd {
    fn new(name: &str) -> HostEnd {
        let cname = std::ffi::CString::new(name).unwrap();
        // SAFETY: socket(2) with constant arguments; the result is checked.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from((libc::ETH_P_ALL as u16).to_be()),
            )
        };
        assert!(raw >= 0, "{}", std::io::Error::last_os_error());
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: `cname` is a valid NUL-terminated string.
        let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        assert_ne!(ifindex, 0);
        set_link_up(name);
        // SAFETY: sockaddr_ll is plain data; all-zero is valid.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        addr.sll_ifindex = ifindex as i32;
        // SAFETY: `addr` is a valid sockaddr_ll of the given size.
        let ret = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(ret, 0, "{}", std::io::Error::last_os_error());
        let timeout = libc::timeval {
            tv_sec: 2,
            tv_usec: 0,
        };
        // SAFETY: SO_RCVTIMEO reads one timeval, which outlives the call.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        HostEnd { fd }
    }

    fn send(&self, frame: &[u8]) {
        // SAFETY: sends from a live buffer of the given length.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(
            n,
            frame.len() as isize,
            "{}",
            std::io::Error::last_os_error()
        );
    }

    /// The next frame with our test ethertype.
    fn recv_test_frame(&self) -> Vec<u8> {
        let mut buf = vec![0u8; 65536];
        for _ in 0..100 {
            // SAFETY: receives into a live buffer of the given length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            assert!(
                n > 0,
                "no frame from the guest: {}",
                std::io::Error::last_os_error()
            );
            let frame = &buf[..n as usize];
            if frame.len() >= 14 && frame[12..14] == ETHERTYPE {
                return frame.to_vec();
            }
        }
        panic!("no test frame among 100 frames");
    }
}

fn set_link_up(name: &str) {
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    assert!(raw >= 0);
    // SAFETY: `raw` is a fresh descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: ifreq is plain data; all-zero is valid.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write one ifreq that outlives the calls.
    unsafe {
        assert_eq!(
            libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr),
            0
        );
        ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as i16;
        assert_eq!(
            libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &mut ifr),
            0
        );
    }
}

fn test_frame(dst: [u8; 6], src: [u8; 6], len: usize, marker: u8) -> Vec<u8> {
    let mut frame = Vec::with_capacity(len);
    frame.extend_from_slice(&dst);
    frame.extend_from_slice(&src);
    frame.extend_from_slice(&ETHERTYPE);
    frame.extend((0..len - 14).map(|i| (i as u8).wrapping_add(marker)));
    frame
}

/// Reassembles the frame the device put in used entries `first..`, checking num_buffers.
fn read_rx_frame(d: &TestDriver<'_>, first: u16) -> (Vec<u8>, u16) {
    let head = d.used_elem(0, first);
    let base = RX_BUF + u64::from(head.id()) * 0x1000;
    let mut hdr = [0u8; VNET_HDR_LEN];
    d.mem.read_slice(&mut hdr, GuestAddress(base)).unwrap();
    let num_buffers = u16::from_le_bytes([hdr[10], hdr[11]]);
    let mut data = Vec::new();
    for i in 0..num_buffers {
        let elem = d.used_elem(0, first + i);
        let mut chunk = vec![0u8; elem.len() as usize];
        let addr = RX_BUF + u64::from(elem.id()) * 0x1000;
        d.mem.read_slice(&mut chunk, GuestAddress(addr)).unwrap();
        data.extend_from_slice(&chunk);
    }
    (data[VNET_HDR_LEN..].to_vec(), num_buffers)
}

fn post_rx_buffers(d: &mut TestDriver<'_>, count: u16) {
    for _ in 0..count {
        // One buffer per descriptor index, so the used id finds the buffer.
        let index = d.queues[0].avail().idx().load();
        let addr = RX_BUF + u64::from(index) * 0x1000;
        let head = d.add_chain(0, &[wo(addr, RX_BUF_LEN)]);
        assert_eq!(head, index);
    }
}

fn run_until(
    manager: &mut EventManager<Arc<Mutex<MmioTransport>>>,
    mut done: impl FnMut() -> bool,
) {
    for _ in 0..100 {
        if done() {
            return;
        }
        manager.run_with_timeout(20).unwrap();
    }
    assert!(done(), "timed out");
}

#[test]
fn tx_and_mergeable_rx_through_a_tap() {
    in_private_netns(|| {
        let mac = mac_from_name("test", "eth0");
        let net = Net::new(NetConfig {
            id: "eth0".into(),
            tap: TAP.into(),
            mac,
        })
        .unwrap();
        let host = HostEnd::new(TAP);
        let mem = guest_memory();
        let mut d = TestDriver::new(&mem, Box::new(net));
        let mut manager = EventManager::<Arc<Mutex<MmioTransport>>>::new().unwrap();
        manager.add_subscriber(d.transport.clone());
        let features = VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_NET_F_MRG_RXBUF
            | 1 << VIRTIO_NET_F_MAC
            | 1 << VIRTIO_NET_F_STATUS
            | 1 << VIRTIO_NET_F_CSUM
            | 1 << VIRTIO_NET_F_GUEST_CSUM;
        d.bring_up(features, 2, 256);

        // tx: header + frame in two descriptors.
        let out = test_frame([0xff; 6], mac, 60, 1);
        mem.write_slice(&[0u8; VNET_HDR_LEN], GuestAddress(DATA_BASE))
            .unwrap();
        mem.write_slice(&out, GuestAddress(DATA_BASE + 0x100))
            .unwrap();
        d.add_chain(
            1,
            &[
                ro(DATA_BASE, VNET_HDR_LEN as u32),
                ro(DATA_BASE + 0x100, 60),
            ],
        );
        d.write(REG_QUEUE_NOTIFY, 1);
        run_until(&mut manager, || d.used_idx(1) == 1);
        assert_eq!(host.recv_test_frame(), out);

        // rx with no buffers posted: the frame waits in the device, the loop goes idle.
        let first = test_frame(mac, [2, 0, 0, 0, 0, 1], 600, 7);
        host.send(&first);
        manager.run_with_timeout(200).unwrap();
        assert_eq!(
            manager.run_with_timeout(50).unwrap(),
            0,
            "event loop must not spin"
        );
        assert_eq!(d.used_idx(0), 0);
        assert_eq!(d.avail_event(0), 0, "the next posted buffer must notify");

        // The guest posts 256-byte buffers and notifies: the frame spans three of them.
        post_rx_buffers(&mut d, 8);
        d.write(REG_QUEUE_NOTIFY, 0);
        run_until(&mut manager, || d.used_idx(0) >= 3);
        let (data, num_buffers) = read_rx_frame(&d, 0);
        assert_eq!(num_buffers, 3);
        assert_eq!(data, first);
        assert_eq!(
            [0, 1, 2].map(|i| d.used_elem(0, i).len()),
            [
                RX_BUF_LEN,
                RX_BUF_LEN,
                (VNET_HDR_LEN + 600) as u32 - 2 * RX_BUF_LEN
            ]
        );

        // A frame arriving while buffers are posted goes straight through (TAP event).
        let second = test_frame(mac, [2, 0, 0, 0, 0, 1], 300, 9);
        host.send(&second);
        run_until(&mut manager, || d.used_idx(0) >= 5);
        let (data, num_buffers) = read_rx_frame(&d, 3);
        assert_eq!((data, num_buffers), (second, 2));
        assert!(d.interrupts() > 0);
        assert_eq!(d.read(0x70) & DEVICE_NEEDS_RESET, 0);
    });
}

/// Posts one tx chain carrying `frame` behind a zero header and processes the tx queue.
fn transmit(d: &mut TestDriver<'_>, frame: &[u8]) {
    d.mem
        .write_slice(&[0u8; VNET_HDR_LEN], GuestAddress(DATA_BASE))
        .unwrap();
    d.mem
        .write_slice(frame, GuestAddress(DATA_BASE + 0x100))
        .unwrap();
    d.add_chain(
        1,
        &[
            ro(DATA_BASE, VNET_HDR_LEN as u32),
            ro(DATA_BASE + 0x100, frame.len() as u32),
        ],
    );
    d.process(1);
}

#[test]
fn traffic_continues_after_save_and_restore() {
    in_private_netns(|| {
        let mac = mac_from_name("test", "eth0");
        let net = || -> Box<dyn VirtioDevice + Send> {
            Box::new(
                Net::new(NetConfig {
                    id: "eth0".into(),
                    tap: TAP.into(),
                    mac,
                })
                .unwrap(),
            )
        };
        let mem = guest_memory();
        let mut d = TestDriver::new(&mem, net());
        let features = VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_NET_F_MRG_RXBUF
            | 1 << VIRTIO_NET_F_CSUM
            | 1 << VIRTIO_NET_F_GUEST_CSUM;
        d.bring_up(features, 2, 256);
        let host = HostEnd::new(TAP);
        let before = test_frame([0xff; 6], mac, 60, 1);
        transmit(&mut d, &before);
        assert_eq!(host.recv_test_frame(), before);
        post_rx_buffers(&mut d, 4);
        drop(host);

        // The TAP is not persistent: it goes with the old device and comes back with the
        // new one, as when the VM moves to another host.
        let mut d = d.save_and_restore(net).unwrap();
        let host = HostEnd::new(TAP);
        let after = test_frame([0xff; 6], mac, 70, 2);
        transmit(&mut d, &after);
        assert_eq!(host.recv_test_frame(), after);
        assert_eq!(d.used_idx(1), 2);

        // rx uses the buffers posted before the save.
        let incoming = test_frame(mac, [2, 0, 0, 0, 0, 1], 200, 5);
        host.send(&incoming);
        d.t().process_all_queues();
        assert_eq!(d.used_idx(0), 1);
        assert_eq!(read_rx_frame(&d, 0), (incoming, 1));
        assert_eq!(d.read(0x70) & DEVICE_NEEDS_RESET, 0);
    });
}
