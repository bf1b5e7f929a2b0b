//! What an L2 is made of: CPUs, memory, the files placed in its initramfs, extra kernel
//! modules, an optional data disk and an optional network link to another L2.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::RigError;

/// Where a host file goes in L2.
#[derive(Clone, Debug)]
pub(crate) struct FileSpec {
    pub host: PathBuf,
    pub l2: String,
    /// Also place the binary's shared libraries and ELF interpreter (see `add_binary`).
    pub with_libs: bool,
}

/// The L2 end of a QEMU UDP socket link between two L2s on this host (both on
/// loopback): each L2 sends its Ethernet frames to the other's port. L2 gets one
/// virtio-net-pci NIC, `eth0`, with address `ip`.
#[derive(Clone, Debug)]
pub struct NetConfig {
    /// Address with prefix inside L2, e.g. "192.0.2.1/24" (the peer: "192.0.2.2/24").
    pub ip: String,
    /// UDP port on 127.0.0.1 this L2's QEMU receives on.
    pub local_port: u16,
    /// UDP port on 127.0.0.1 of the peer L2's QEMU.
    pub peer_port: u16,
}

/// How to build and boot an L2. Build it with the chained methods:
/// `RigConfig::default().cpus(2).add_binary(path, "/usr/local/bin/hospes").add_qemu()`.
#[derive(Clone, Debug)]
pub struct RigConfig {
    pub(crate) cpus: u32,
    pub(crate) memory_mib: u32,
    pub(crate) files: Vec<FileSpec>,
    pub(crate) qemu: bool,
    pub(crate) extra_modules: Vec<String>,
    pub(crate) disk_mib: Option<u64>,
    pub(crate) net: Option<NetConfig>,
    pub(crate) kernel_args: Vec<String>,
    pub(crate) boot_timeout: Duration,
}

impl Default for RigConfig {
    fn default() -> Self {
        RigConfig {
            cpus: 1,
            memory_mib: 2048,
            files: Vec::new(),
            qemu: false,
            extra_modules: Vec::new(),
            disk_mib: None,
            net: None,
            kernel_args: Vec::new(),
            boot_timeout: Duration::from_secs(300),
        }
    }
}

impl RigConfig {
    /// vCPUs of L2 (`-smp`); default 1. With two, QEMU runs multi-threaded TCG, and its
    /// emulated SVM then loses nested guests now and then: a nested guest triple-faulted in
    /// the middle of a TAP transfer, and QEMU's own migrations in the rig lost the guest in
    /// 3 of 9 runs. With one vCPU neither was ever seen. Benchmarks that want two ask.
    pub fn cpus(mut self, cpus: u32) -> Self {
        self.cpus = cpus;
        self
    }

    /// RAM of L2 in MiB; default 2048. The rootfs (with /work and /tmp) is a tmpfs in it.
    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }

    /// Places host file `host` at `l2_path` in L2 (relative paths are under /work),
    /// keeping its permission bits. It is read when L2 boots.
    pub fn add_file(mut self, host: impl AsRef<Path>, l2_path: &str) -> Self {
        self.files.push(FileSpec {
            host: host.as_ref().to_path_buf(),
            l2: l2_path.to_string(),
            with_libs: false,
        });
        self
    }

    /// Like [`RigConfig::add_file`], and also places the shared libraries `ldd` lists for
    /// it, and its ELF interpreter, at their own absolute paths, so a dynamically
    /// linked binary runs in L2.
    pub fn add_binary(mut self, host_bin: impl AsRef<Path>, l2_path: &str) -> Self {
        self.files.push(FileSpec {
            host: host_bin.as_ref().to_path_buf(),
            l2: l2_path.to_string(),
            with_libs: true,
        });
        self
    }

    /// Places the host's `qemu-system-x86_64` at /usr/bin/qemu-system-x86_64 in L2 with its
    /// libraries and the firmware it needs for `-M microvm` and `-M pc` with `-kernel`
    /// (installing qemu-system-x86 on the host if missing), so tests can compare
    /// hospes with QEMU under the same KVM.
    pub fn add_qemu(mut self) -> Self {
        self.qemu = true;
        self
    }

    /// Loads kernel module `name` (and its dependencies) after the default ones: irqbypass,
    /// kvm, kvm_amd, tun, bridge, veth, virtio_pci, virtio_blk, virtio_net.
    pub fn add_module(mut self, name: &str) -> Self {
        self.extra_modules.push(name.to_string());
        self
    }

    /// Attaches a fresh ext4 data disk of `mib` MiB (a raw image on virtio-blk-pci,
    /// made on the host), mounted on /data in L2: unlike tmpfs it supports O_DIRECT.
    pub fn disk_mib(mut self, mib: u64) -> Self {
        self.disk_mib = Some(mib);
        self
    }

    /// Gives L2 an `eth0` linked to another L2 (see [`NetConfig`]).
    pub fn net(mut self, net: NetConfig) -> Self {
        self.net = Some(net);
        self
    }

    /// Appends `arg` to L2's kernel command line.
    pub fn kernel_arg(mut self, arg: &str) -> Self {
        self.kernel_args.push(arg.to_string());
        self
    }

    /// How long L2 may take until its agent answers; default 300 s.
    pub fn boot_timeout(mut self, timeout: Duration) -> Self {
        self.boot_timeout = timeout;
        self
    }
}

impl NetConfig {
    /// The two ends of one link: 192.0.2.1/24 receiving on UDP port `a`, 192.0.2.2/24
    /// receiving on `b`.
    pub fn pair(a: u16, b: u16) -> (NetConfig, NetConfig) {
        (
            NetConfig {
                ip: "192.0.2.1/24".into(),
                local_port: a,
                peer_port: b,
            },
            NetConfig {
                ip: "192.0.2.2/24".into(),
                local_port: b,
                peer_port: a,
            },
        )
    }

    /// [`NetConfig::pair`] on two UDP ports of 127.0.0.1 that are free right now.
    pub fn free_pair() -> Result<(NetConfig, NetConfig), RigError> {
        let port = || -> Result<(std::net::UdpSocket, u16), RigError> {
            let sock = std::net::UdpSocket::bind("127.0.0.1:0")
                .map_err(|e| RigError::io("udp 127.0.0.1:0", e))?;
            let port = sock
                .local_addr()
                .map_err(|e| RigError::io("udp 127.0.0.1:0", e))?
                .port();
            Ok((sock, port))
        };
        // Both held at once so they differ; released for QEMU to bind.
        let (_a, a) = port()?;
        let (_b, b) = port()?;
        Ok(NetConfig::pair(a, b))
    }
}
