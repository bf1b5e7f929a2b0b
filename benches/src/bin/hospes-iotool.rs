//! The I/O tool of `hospes bench io`, run the same way on the rig's L2 host and inside the
//! guests (there through the ld.so placed on the guest's data disk: the default guest has
//! no libc). Each command prints one machine-readable line, `RESULT <what> <value> <unit>`,
//! on stdout; the harness parses those and nothing else.
//!
//! ```text
//! hospes-iotool seqwrite FILE MIB      1 MiB O_DIRECT writes + fdatasync   → MB/s
//! hospes-iotool seqread FILE MIB       1 MiB O_DIRECT reads                → MB/s
//! hospes-iotool randread FILE SECONDS  4 KiB O_DIRECT random reads, QD 1   → IOPS
//! hospes-iotool tcp-recv PORT          accept one connection, read to EOF  → MB/s
//! hospes-iotool tcp-send HOST:PORT MIB connect (retrying 30 s), send       → MB/s
//! hospes-iotool pi SAMPLES             Monte-Carlo pi, one thread          → seconds
//! hospes-iotool tap-create NAME        a persistent TAP (busybox `ip` has no `tuntap`)
//! ```

use std::alloc::{self, Layout};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::process::ExitCode;
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;
const BLOCK: usize = 4096;
const USAGE: &str =
    "usage: hospes-iotool seqwrite FILE MIB | seqread FILE MIB | randread FILE SECONDS | \
                     tcp-recv PORT | tcp-send HOST:PORT MIB | pi SAMPLES | tap-create NAME";

#[derive(Debug, thiserror::Error)]
enum ToolError {
    #[error("{USAGE}")]
    Usage,
    #[error("argument {arg:?} of {cmd} is not a positive number")]
    BadNumber { cmd: &'static str, arg: String },
    #[error("{what} {target}: {source}")]
    Io {
        what: &'static str,
        target: String,
        source: io::Error,
    },
    #[error("{file} is {bytes} bytes, smaller than one {BLOCK}-byte block")]
    TooSmall { file: String, bytes: u64 },
    #[error("{file} ended after {done} of {want} MiB")]
    ShortRead {
        file: String,
        done: usize,
        want: usize,
    },
    #[error("{addr:?} resolves to no address")]
    NoAddress { addr: String },
    #[error("TAP name {name:?} must be 1-15 bytes")]
    BadTapName { name: String },
}

fn io_err<'a>(what: &'static str, target: &'a str) -> impl FnOnce(io::Error) -> ToolError + 'a {
    move |source| ToolError::Io {
        what,
        target: target.to_string(),
        source,
    }
}

/// A zeroed heap buffer aligned for O_DIRECT (4 KiB covers every logical block size here).
struct AlignedBuf {
    ptr: *mut u8,
    layout: Layout,
}

impl AlignedBuf {
    fn new(len: usize) -> AlignedBuf {
        let layout =
            Layout::from_size_align(len, BLOCK).expect("4096-aligned layout of a non-zero size");
        // SAFETY: `layout` has a non-zero size (every caller passes BLOCK or MIB).
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            alloc::handle_alloc_error(layout);
        }
        AlignedBuf { ptr, layout }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` is a live, initialised (zeroed) allocation of `layout.size()` bytes
        // owned by `self`, and `&mut self` makes this the only reference to it.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `alloc_zeroed(self.layout)` and is freed only here.
        unsafe { alloc::dealloc(self.ptr, self.layout) }
    }
}

fn number<T: std::str::FromStr + PartialOrd + Default>(
    cmd: &'static str,
    arg: Option<&String>,
) -> Result<T, ToolError> {
    let arg = arg.ok_or(ToolError::Usage)?;
    match arg.parse::<T>() {
        Ok(n) if n > T::default() => Ok(n),
        _ => Err(ToolError::BadNumber {
            cmd,
            arg: arg.clone(),
        }),
    }
}

fn open_direct(file: &str, write: bool) -> Result<File, ToolError> {
    let mut opts = OpenOptions::new();
    if write {
        opts.write(true).create(true).truncate(true);
    } else {
        opts.read(true);
    }
    opts.custom_flags(libc::O_DIRECT)
        .open(file)
        .map_err(io_err("open (O_DIRECT)", file))
}

fn mb_per_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / 1e6 / elapsed.as_secs_f64()
}

fn seqwrite(file: &str, mib: usize) -> Result<(), ToolError> {
    let mut buf = AlignedBuf::new(MIB);
    // Not zeros, so nothing below can shortcut them.
    for (i, b) in buf.as_mut_slice().iter_mut().enumerate() {
        *b = (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1];
    }
    let mut f = open_direct(file, true)?;
    let start = Instant::now();
    for _ in 0..mib {
        f.write_all(buf.as_mut_slice())
            .map_err(io_err("write", file))?;
    }
    f.sync_data().map_err(io_err("fdatasync", file))?;
    println!(
        "RESULT seqwrite {:.1} MB/s",
        mb_per_s((mib * MIB) as u64, start.elapsed())
    );
    Ok(())
}

fn seqread(file: &str, mib: usize) -> Result<(), ToolError> {
    let mut buf = AlignedBuf::new(MIB);
    let mut f = open_direct(file, false)?;
    let start = Instant::now();
    for done in 0..mib {
        f.read_exact(buf.as_mut_slice())
            .map_err(|e| match e.kind() {
                io::ErrorKind::UnexpectedEof => ToolError::ShortRead {
                    file: file.to_string(),
                    done,
                    want: mib,
                },
                _ => io_err("read", file)(e),
            })?;
    }
    println!(
        "RESULT seqread {:.1} MB/s",
        mb_per_s((mib * MIB) as u64, start.elapsed())
    );
    Ok(())
}

/// xorshift64*: enough randomness for offsets and pi, and the same code everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

fn randread(file: &str, seconds: u64) -> Result<(), ToolError> {
    let mut buf = AlignedBuf::new(BLOCK);
    let f = open_direct(file, false)?;
    let bytes = f.metadata().map_err(io_err("stat", file))?.len();
    let blocks = bytes / BLOCK as u64;
    if blocks == 0 {
        return Err(ToolError::TooSmall {
            file: file.to_string(),
            bytes,
        });
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let limit = Duration::from_secs(seconds);
    let start = Instant::now();
    let mut ios = 0u64;
    // Check the clock every 64 reads: cheap, and at most 64 reads late.
    while !ios.is_multiple_of(64) || start.elapsed() < limit {
        let off = (rng.next() % blocks) * BLOCK as u64;
        f.read_exact_at(buf.as_mut_slice(), off)
            .map_err(io_err("pread", file))?;
        ios += 1;
    }
    println!(
        "RESULT randread {:.0} IOPS",
        ios as f64 / start.elapsed().as_secs_f64()
    );
    Ok(())
}

fn tcp_recv(port: u16) -> Result<(), ToolError> {
    let addr = format!("0.0.0.0:{port}");
    let listener = TcpListener::bind(&addr).map_err(io_err("bind", &addr))?;
    println!("LISTENING {port}");
    io::stdout().flush().map_err(io_err("write", "stdout"))?;
    let (mut conn, peer) = listener.accept().map_err(io_err("accept on", &addr))?;
    let peer = peer.to_string();
    let mut buf = vec![0u8; MIB];
    let start = Instant::now();
    let mut bytes = 0u64;
    loop {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => bytes += n as u64,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err("receive from", &peer)(e)),
        }
    }
    println!(
        "RESULT tcp-recv {:.1} MB/s ({bytes} bytes)",
        mb_per_s(bytes, start.elapsed())
    );
    Ok(())
}

fn connect_retrying(addr: SocketAddr) -> Result<TcpStream, ToolError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => {
                return Err(io_err("connect to", &addr.to_string())(e))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn tcp_send(target: &str, mib: usize) -> Result<(), ToolError> {
    let addr = target
        .to_socket_addrs()
        .map_err(io_err("resolve", target))?
        .next()
        .ok_or_else(|| ToolError::NoAddress {
            addr: target.to_string(),
        })?;
    let mut conn = connect_retrying(addr)?;
    let buf: Vec<u8> = (0..MIB)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[2])
        .collect();
    let start = Instant::now();
    for _ in 0..mib {
        conn.write_all(&buf).map_err(io_err("send to", target))?;
    }
    conn.shutdown(Shutdown::Write)
        .map_err(io_err("shutdown", target))?;
    // Wait for the receiver's close so the figure covers delivery, not just the send buffer.
    let _ = conn.read(&mut [0u8; 1]);
    println!(
        "RESULT tcp-send {:.1} MB/s",
        mb_per_s((mib * MIB) as u64, start.elapsed())
    );
    Ok(())
}

fn pi(samples: u64) -> Result<(), ToolError> {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let start = Instant::now();
    let mut inside = 0u64;
    for _ in 0..samples {
        let r = rng.next();
        // Two 26-bit coordinates in [0, 1).
        let x = (r >> 38) as f64 / (1u64 << 26) as f64;
        let y = ((r >> 12) & ((1 << 26) - 1)) as f64 / (1u64 << 26) as f64;
        inside += u64::from(x * x + y * y < 1.0);
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "RESULT pi {secs:.3} s (estimate {:.6})",
        4.0 * inside as f64 / samples as f64
    );
    Ok(())
}

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags (the rest is padding).
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

fn tap_create(name: &str) -> Result<(), ToolError> {
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(ToolError::BadTapName {
            name: name.to_string(),
        });
    }
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(io_err("open", "/dev/net/tun"))?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    let fd = std::os::fd::AsRawFd::as_raw_fd(&tun);
    // SAFETY: `fd` is an open /dev/net/tun; TUNSETIFF reads a `struct ifreq`, which `req`
    // lays out (NUL-terminated name, flags, padding to its full 40 bytes) and outlives the call.
    if unsafe { libc::ioctl(fd, TUNSETIFF, &mut req as *mut IfReq) } < 0 {
        return Err(io_err("TUNSETIFF", name)(io::Error::last_os_error()));
    }
    // SAFETY: `fd` is attached to the TAP now; TUNSETPERSIST takes its argument by value.
    if unsafe { libc::ioctl(fd, TUNSETPERSIST, 1 as libc::c_ulong) } < 0 {
        return Err(io_err("TUNSETPERSIST", name)(io::Error::last_os_error()));
    }
    Ok(())
}

fn run(args: &[String]) -> Result<(), ToolError> {
    let (cmd, rest) = args.split_first().ok_or(ToolError::Usage)?;
    let file = || rest.first().ok_or(ToolError::Usage);
    match cmd.as_str() {
        "seqwrite" => seqwrite(file()?, number("seqwrite", rest.get(1))?),
        "seqread" => seqread(file()?, number("seqread", rest.get(1))?),
        "randread" => randread(file()?, number("randread", rest.get(1))?),
        "tcp-recv" => tcp_recv(number("tcp-recv", rest.first())?),
        "tcp-send" => tcp_send(file()?, number("tcp-send", rest.get(1))?),
        "pi" => pi(number("pi", rest.first())?),
        "tap-create" => tap_create(file()?),
        _ => Err(ToolError::Usage),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hospes-iotool: {e}");
            ExitCode::FAILURE
        }
    }
}
