//! A minimal writer for the "newc" (SVR4, no CRC) cpio format the Linux kernel unpacks
//! as an initramfs. Parent directories are emitted on demand, each path once.

use std::collections::HashSet;
use std::io::{self, Write};

/// Mode bits of a directory entry.
const S_IFDIR: u32 = 0o040_000;
/// Mode bits of a regular file entry.
const S_IFREG: u32 = 0o100_000;
/// Mode bits of a symbolic link entry.
const S_IFLNK: u32 = 0o120_000;

/// Streams a newc archive into `W`; call [`CpioWriter::finish`] to write the trailer.
pub struct CpioWriter<W: Write> {
    out: W,
    written: u64,
    next_ino: u32,
    seen: HashSet<String>,
}

impl<W: Write> CpioWriter<W> {
    /// Starts an empty archive.
    pub fn new(out: W) -> Self {
        CpioWriter {
            out,
            written: 0,
            next_ino: 1,
            seen: HashSet::new(),
        }
    }

    /// Adds a directory (and its parents). Adding one twice is a no-op.
    pub fn dir(&mut self, path: &str) -> io::Result<()> {
        let path = normalize(path);
        if path.is_empty() || self.seen.contains(&path) {
            return Ok(());
        }
        self.parents(&path)?;
        self.seen.insert(path.clone());
        self.entry(&path, S_IFDIR | 0o755, &[])
    }

    /// Adds a regular file with permission bits `perm` (e.g. 0o755), creating its parents.
    /// A path already in the archive is replaced at unpack time (later entries win).
    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        let path = normalize(path);
        self.parents(&path)?;
        self.seen.insert(path.clone());
        self.entry(&path, S_IFREG | (perm & 0o7777), data)
    }

    /// Adds a symbolic link `path` -> `target`, creating its parents.
    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        let path = normalize(path);
        self.parents(&path)?;
        self.seen.insert(path.clone());
        self.entry(&path, S_IFLNK | 0o777, target.as_bytes())
    }

    /// Writes the trailer and returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.header("TRAILER!!!", 0, 0, 1)?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn parents(&mut self, path: &str) -> io::Result<()> {
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent)?;
        }
        Ok(())
    }

    fn entry(&mut self, path: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        let len = u32::try_from(data.len()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{path}: {} bytes is too large for a newc cpio entry",
                    data.len()
                ),
            )
        })?;
        let nlink = if mode & S_IFDIR == S_IFDIR { 2 } else { 1 };
        self.header(path, mode, len, nlink)?;
        self.write(data)?;
        self.pad()
    }

    fn header(&mut self, name: &str, mode: u32, size: u32, nlink: u32) -> io::Result<()> {
        let ino = self.next_ino;
        self.next_ino += 1;
        // Name length counts the terminating NUL.
        let namesize = name.len() + 1;
        let hdr = format!(
            "070701{ino:08x}{mode:08x}{uid:08x}{gid:08x}{nlink:08x}{mtime:08x}{size:08x}\
             {maj:08x}{min:08x}{rmaj:08x}{rmin:08x}{namesize:08x}{check:08x}",
            uid = 0,
            gid = 0,
            mtime = 0,
            maj = 0,
            min = 0,
            rmaj = 0,
            rmin = 0,
            check = 0,
        );
        self.write(hdr.as_bytes())?;
        self.write(name.as_bytes())?;
        self.write(&[0])?;
        self.pad()
    }

    fn write(&mut self, data: &[u8]) -> io::Result<()> {
        self.out.write_all(data)?;
        self.written += data.len() as u64;
        Ok(())
    }

    /// Header+name and file data are each padded to a multiple of 4 bytes.
    fn pad(&mut self) -> io::Result<()> {
        let pad = (4 - (self.written % 4) as usize) % 4;
        self.write(&[0u8; 3][..pad])
    }
}

/// Archive paths are relative ("bin/sh"), without "." components or trailing slashes.
fn normalize(path: &str) -> String {
    path.split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect::<Vec<_>>()
        .join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses a newc archive back into (name, mode, data) triples.
    fn parse(mut buf: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
        let mut entries = Vec::new();
        let mut off = 0usize;
        loop {
            assert_eq!(&buf[..6], b"070701", "bad magic at offset {off}");
            let field = |i: usize| {
                let s = std::str::from_utf8(&buf[6 + i * 8..6 + (i + 1) * 8]).unwrap();
                usize::from_str_radix(s, 16).unwrap()
            };
            let mode = field(1) as u32;
            let size = field(6);
            let namesize = field(11);
            let name = std::str::from_utf8(&buf[110..110 + namesize - 1])
                .unwrap()
                .to_string();
            assert_eq!(buf[110 + namesize - 1], 0);
            let data_start = (110 + namesize).next_multiple_of(4);
            let data = buf[data_start..data_start + size].to_vec();
            let next = (data_start + size).next_multiple_of(4);
            off += next;
            buf = &buf[next..];
            if name == "TRAILER!!!" {
                assert!(buf.is_empty(), "bytes after the trailer");
                return entries;
            }
            entries.push((name, mode, data));
        }
    }

    #[test]
    fn round_trip_with_parents_and_padding() {
        let mut w = CpioWriter::new(Vec::new());
        w.file("/usr/local/bin/tool", 0o755, b"12345").unwrap();
        w.symlink("bin/sh", "/bin/busybox").unwrap();
        w.dir("usr/local").unwrap();
        w.file("./a", 0o644, b"").unwrap();
        let bytes = w.finish().unwrap();
        assert_eq!(bytes.len() % 4, 0);
        let entries = parse(&bytes);
        let names: Vec<_> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "usr",
                "usr/local",
                "usr/local/bin",
                "usr/local/bin/tool",
                "bin",
                "bin/sh",
                "a"
            ]
        );
        assert_eq!(entries[3].1, 0o100_755);
        assert_eq!(entries[3].2, b"12345");
        assert_eq!(entries[5].1, 0o120_777);
        assert_eq!(entries[5].2, b"/bin/busybox");
        assert_eq!(entries[0].1, 0o040_755);
    }

    #[test]
    fn normalizes_paths() {
        assert_eq!(normalize("/a//b/./c/"), "a/b/c");
        assert_eq!(normalize("/"), "");
    }
}
