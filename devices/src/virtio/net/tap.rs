//! The host end of virtio-net: a TAP interface opened through /dev/net/tun, non-blocking,
//! with a 12-byte virtio-net header (virtio 1.x layout, with `num_buffers`) on every frame.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::{NetError, VNET_HDR_LEN};

/// Longest interface name Linux accepts (IFNAMSIZ - 1).
const MAX_NAME_LEN: usize = libc::IFNAMSIZ - 1;

/// An open TAP interface.
#[derive(Debug)]
pub(super) struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Opens (creating it if missing) the TAP interface `name`.
    ///
    /// A TAP hospes creates is multi-queue, and an existing one is attached as a queue of
    /// its own when it is multi-queue: a VM migrating between two hospes on one host is
    /// then held by both processes for the moment of the handover (the source lets go
    /// when it exits). A single-queue TAP (`tunctl`) still works, for one process at a
    /// time: Linux refuses a mismatched IFF_MULTI_QUEUE with EINVAL, and then the plain
    /// attach is tried.
    pub(super) fn open(name: &str) -> Result<Tap, NetError> {
        validate_name(name)?;
        let base = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        let file = match Self::attach(name, base | libc::IFF_MULTI_QUEUE) {
            Err(NetError::CreateTap { source, .. })
                if source.raw_os_error() == Some(libc::EINVAL) =>
            {
                Self::attach(name, base)?
            }
            other => other?,
        };
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one c_int, which outlives the call.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_len) };
        if ret < 0 {
            return Err(NetError::VnetHeader {
                name: name.to_owned(),
                source: io::Error::last_os_error(),
            });
        }
        set_link_up(name).map_err(|source| NetError::CreateTap {
            name: name.to_owned(),
            source,
        })?;
        Ok(Tap {
            file,
            name: name.to_owned(),
        })
    }

    /// A /dev/net/tun descriptor attached to TAP `name` with `flags` (TUNSETIFF).
    fn attach(name: &str, flags: libc::c_int) -> Result<File, NetError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|source| NetError::OpenTun { source })?;

        // SAFETY: `ifreq` is a plain C struct (name array plus a union of plain fields);
        // all-zero is a valid value of it.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        ifr.ifr_ifru.ifru_flags = flags as i16;
        // SAFETY: TUNSETIFF reads and writes one `ifreq`, which outlives the call; the name
        // is NUL-terminated because it is at most IFNAMSIZ - 1 bytes of a zeroed array.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr) };
        if ret < 0 {
            return Err(NetError::CreateTap {
                name: name.to_owned(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(file)
    }

    /// Tells the kernel which offloads the guest accepts on frames it receives
    /// (`TUN_F_*` bits).
    pub(super) fn set_offload(&self, flags: libc::c_uint) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is passed.
        let ret = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// A second descriptor on this TAP queue (the same open file), for [`TapQueue`].
    pub(super) fn queue(&self) -> io::Result<TapQueue> {
        Ok(TapQueue {
            file: self.file.try_clone()?,
            name: self.name.clone(),
        })
    }

    /// The interface name.
    pub(super) fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame (with its vnet header); `WouldBlock` when none is queued.
    pub(super) fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Writes one frame (virtio-net header first) gathered from `iovecs`; a TAP takes a
    /// whole frame per write. More than `IOV_MAX` (1024) buffers fail with EINVAL.
    pub(super) fn write_iovecs(&self, iovecs: &[libc::iovec]) -> io::Result<usize> {
        let count = libc::c_int::try_from(iovecs.len()).map_err(io::Error::other)?;
        // SAFETY: every iovec describes memory the caller keeps mapped and readable for
        // the call (guest memory slices held by their PtrGuards); writev only reads it.
        let done = unsafe { libc::writev(self.file.as_raw_fd(), iovecs.as_ptr(), count) };
        if done < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(done as usize)
        }
    }
}

/// A handle on a device's TAP queue that can take it out of the TAP's queue set and put
/// it back (TUNSETQUEUE), so that a VM built ahead of its start (a migration's
/// destination) holds its TAP without receiving the frames meant for the VM still running
/// elsewhere on the same TAP. The kernel hands a multi-queue TAP's frames only to
/// attached queues.
#[derive(Debug)]
pub struct TapQueue {
    file: File,
    name: String,
}

impl TapQueue {
    /// Takes the queue out of the TAP's set: it receives nothing until [`TapQueue::attach`].
    /// `Ok(false)` for a single-queue TAP, which cannot detach (Linux says EINVAL) and so
    /// stays attached: no other process can hold such a TAP anyway.
    pub fn detach(&self) -> Result<bool, NetError> {
        match self.set(libc::IFF_DETACH_QUEUE) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
            Err(source) => Err(NetError::Queue {
                name: self.name.clone(),
                what: "detach",
                source,
            }),
        }
    }

    /// Puts a detached queue back into the TAP's set.
    pub fn attach(&self) -> Result<(), NetError> {
        self.set(libc::IFF_ATTACH_QUEUE)
            .map_err(|source| NetError::Queue {
                name: self.name.clone(),
                what: "attach",
                source,
            })
    }

    fn set(&self, flags: libc::c_int) -> io::Result<()> {
        // SAFETY: all-zero is a valid `ifreq`; TUNSETQUEUE reads only its flags.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        ifr.ifr_ifru.ifru_flags = flags as i16;
        // SAFETY: TUNSETQUEUE reads one `ifreq`, which outlives the call.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), libc::TUNSETQUEUE, &ifr) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

fn validate_name(name: &str) -> Result<(), NetError> {
    let valid = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':');
    if valid {
        Ok(())
    } else {
        Err(NetError::TapName {
            name: name.to_owned(),
        })
    }
}

/// Sets IFF_UP on interface `name` (a TAP hospes created is down, and a down TAP drops
/// every frame); addresses and routes stay the host administrator's business.
fn set_link_up(name: &str) -> io::Result<()> {
    // SAFETY: a plain datagram socket, used only for the interface ioctls below and
    // closed by `OwnedFd` on return.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor owned by nothing else.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
    // SAFETY: all-zero is a valid `ifreq`.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS fills the flags of the `ifreq`, which outlives the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the union's flags member was just written by SIOCGIFFLAGS.
    let flags = unsafe { ifr.ifr_ifru.ifru_flags };
    if flags & libc::IFF_UP as i16 != 0 {
        return Ok(());
    }
    ifr.ifr_ifru.ifru_flags = flags | libc::IFF_UP as i16;
    // SAFETY: SIOCSIFFLAGS reads the `ifreq`, which outlives the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names_are_checked() {
        assert!(validate_name("tap0").is_ok());
        assert!(validate_name("hospes-web-0123").is_ok());
        for bad in ["", "hospes-web-01234", "a/b", "a b", "..", "x:y", "t\u{e9}"] {
            let err = validate_name(bad).unwrap_err();
            assert!(err.to_string().contains(bad), "{err}");
        }
    }
}
