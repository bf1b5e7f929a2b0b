//! The service spec: one TOML file describing one microVM, parsed and validated up front.
//!
//! Every problem is reported as one [`SpecError`] naming the file, line, column and key, so
//! a user can fix a spec without starting a VM. Paths in a spec are relative to the spec.

use std::fmt;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use toml::Spanned;

/// vCPUs a spec may ask for.
pub const VCPUS_RANGE: std::ops::RangeInclusive<u32> = 1..=32;
/// Guest memory a spec may ask for, in MiB.
pub const MEMORY_MIB_RANGE: std::ops::RangeInclusive<u32> = 64..=65536;
/// Drives plus networks one VM can have: each takes one IOAPIC pin (GSI 5..=23).
pub const MAX_DEVICES: usize = 19;
/// Longest user part of the kernel command line.
pub const CMDLINE_MAX: usize = 1024;

/// A spec problem, located in its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError {
    /// The spec file.
    pub file: PathBuf,
    /// 1-based line, or 0 when the problem is the file itself.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// Dotted key path (`machine.vcpus`), or empty when no key applies.
    pub key: String,
    /// What is wrong, with the offending value.
    pub message: String,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        if !self.key.is_empty() {
            write!(f, ": key `{}`", self.key)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for SpecError {}

/// Disk caching mode of a drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    /// Through the host page cache; flush reaches the disk with fdatasync.
    #[default]
    Writeback,
    /// O_DIRECT: bypass the host page cache.
    None,
}

/// A virtio-blk drive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriveSpec {
    /// Unique id; the guest reads it as the disk serial.
    pub id: String,
    /// The raw image, absolute.
    pub path: PathBuf,
    /// Opened read-only and offered with VIRTIO_BLK_F_RO.
    pub read_only: bool,
    /// Host caching.
    pub cache: CacheMode,
}

/// A virtio-net interface on a TAP device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetSpec {
    /// Unique id.
    pub id: String,
    /// TAP device name (opened, or created if missing).
    pub tap: String,
    /// MAC address, when the spec gives one.
    pub mac: Option<[u8; 6]>,
}

/// A validated service spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spec {
    /// The spec file, absolute.
    pub file: PathBuf,
    /// Service name.
    pub name: String,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Guest RAM in MiB.
    pub memory_mib: u32,
    /// Kernel image (bzImage or ELF vmlinux), absolute; `None` means the default guest.
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk, absolute.
    pub initrd: Option<PathBuf>,
    /// User part of the kernel command line, appended to hospes' own.
    pub cmdline: String,
    /// Drives in spec order (/dev/vda, /dev/vdb, ...).
    pub drives: Vec<DriveSpec>,
    /// Network interfaces in spec order.
    pub nets: Vec<NetSpec>,
    /// Where to serve the control API (`[api] socket`), absolute.
    pub api_socket: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    service: RawService,
    #[serde(default)]
    machine: RawMachine,
    #[serde(default)]
    boot: RawBoot,
    #[serde(default)]
    drive: Vec<RawDrive>,
    #[serde(default)]
    net: Vec<RawNet>,
    #[serde(default)]
    api: RawApi,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawApi {
    socket: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: Spanned<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMachine {
    vcpus: Option<Spanned<i64>>,
    memory_mib: Option<Spanned<i64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawBoot {
    kernel: Option<Spanned<String>>,
    initrd: Option<Spanned<String>>,
    cmdline: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDrive {
    id: Spanned<String>,
    path: Spanned<String>,
    #[serde(default)]
    read_only: bool,
    cache: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNet {
    id: Spanned<String>,
    tap: Spanned<String>,
    mac: Option<Spanned<String>>,
}

/// Locates byte offsets of one spec text as lines, columns and keys.
struct Locator<'a> {
    file: &'a Path,
    text: &'a str,
}

impl Locator<'_> {
    fn error(
        &self,
        span: Option<Range<usize>>,
        key: &str,
        message: impl Into<String>,
    ) -> SpecError {
        let (line, column) = match &span {
            Some(s) => {
                let start = s.start.min(self.text.len());
                let before = &self.text[..start];
                let line = before.matches('\n').count() + 1;
                let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
                (line, column)
            }
            None => (0, 0),
        };
        let key = if key.is_empty() {
            span.map(|s| self.key_at(s.start)).unwrap_or_default()
        } else {
            key.to_string()
        };
        SpecError {
            file: self.file.to_path_buf(),
            line,
            column,
            key,
            message: message.into(),
        }
    }

    /// The dotted key at a byte offset: the nearest `[table]` above it plus the key on the
    /// offset's line. Used for errors from the TOML parser, which carry only a span.
    fn key_at(&self, offset: usize) -> String {
        let offset = offset.min(self.text.len());
        let line_start = self.text[..offset].rfind('\n').map_or(0, |i| i + 1);
        let line_end = self.text[offset..]
            .find('\n')
            .map_or(self.text.len(), |i| offset + i);
        let line = self.text[line_start..line_end].trim();
        let header = |l: &str| {
            let l = l.trim();
            l.starts_with('[')
                .then(|| l.trim_matches(|c| c == '[' || c == ']').trim().to_string())
        };
        if let Some(table) = header(line) {
            return table;
        }
        let table = self.text[..line_start].lines().rev().find_map(header);
        let key = line
            .split('=')
            .next()
            .unwrap_or("")
            .trim()
            .trim_matches('"')
            .to_string();
        match table {
            Some(t) if !key.is_empty() => format!("{t}.{key}"),
            Some(t) => t,
            None => key,
        }
    }
}

/// Reads and validates a spec file.
pub fn load(path: &Path) -> Result<Spec, SpecError> {
    let file_error = |message: String| SpecError {
        file: path.to_path_buf(),
        line: 0,
        column: 0,
        key: String::new(),
        message,
    };
    let abs = std::path::absolute(path)
        .map_err(|e| file_error(format!("cannot resolve the path: {e}")))?;
    let text = std::fs::read_to_string(&abs)
        .map_err(|e| file_error(format!("cannot read the spec: {e}")))?;
    parse(&abs, &text)
}

/// Validates spec `text` as if read from `file` (absolute; relative paths in the spec are
/// resolved against its directory).
pub fn parse(file: &Path, text: &str) -> Result<Spec, SpecError> {
    let loc = Locator { file, text };
    let raw: RawSpec = toml::from_str(text).map_err(|e| {
        let message = e
            .message()
            .trim()
            .replace("expected i64", "expected an integer");
        loc.error(e.span(), "", message)
    })?;
    let dir = file.parent().unwrap_or(Path::new("/"));

    let name = &raw.service.name;
    if !valid_name(name.get_ref(), 63) {
        return Err(loc.error(
            Some(name.span()),
            "service.name",
            format!(
                "service name {:?} must be 1-63 characters of a-z, 0-9 and '-'",
                name.get_ref()
            ),
        ));
    }
    let vcpus = ranged(
        &loc,
        raw.machine.vcpus.as_ref(),
        "machine.vcpus",
        1,
        VCPUS_RANGE,
    )?;
    let memory_mib = ranged(
        &loc,
        raw.machine.memory_mib.as_ref(),
        "machine.memory_mib",
        256,
        MEMORY_MIB_RANGE,
    )?;

    let kernel = readable(&loc, dir, raw.boot.kernel.as_ref(), "boot.kernel")?;
    let initrd = readable(&loc, dir, raw.boot.initrd.as_ref(), "boot.initrd")?;
    let cmdline = match &raw.boot.cmdline {
        None => String::new(),
        Some(c) => {
            let s = c.get_ref();
            if s.len() > CMDLINE_MAX {
                return Err(loc.error(
                    Some(c.span()),
                    "boot.cmdline",
                    format!("cmdline is {} bytes, more than {CMDLINE_MAX}", s.len()),
                ));
            }
            if let Some(bad) = s.chars().find(|ch| !(' '..='~').contains(ch)) {
                return Err(loc.error(
                    Some(c.span()),
                    "boot.cmdline",
                    format!("cmdline has the character {bad:?}; only printable ASCII is allowed"),
                ));
            }
            if let Some(n) = init_args(s).filter(|n| *n > MAX_INIT_ARGS) {
                return Err(loc.error(
                    Some(c.span()),
                    "boot.cmdline",
                    format!(
                        "{n} words follow \"--\"; the kernel passes at most {MAX_INIT_ARGS} to init and panics beyond that: \
                         wrap the command in double quotes, -- \"cmd; cmd\""
                    ),
                ));
            }
            s.trim().to_string()
        }
    };

    let mut drives: Vec<DriveSpec> = Vec::new();
    for d in &raw.drive {
        let id = unique_id(
            &loc,
            &d.id,
            "drive.id",
            drives.iter().map(|x| x.id.as_str()),
        )?;
        let path = readable(&loc, dir, Some(&d.path), "drive.path")?.unwrap_or_default();
        let cache = match d.cache.as_ref().map(|c| (c, c.get_ref().as_str())) {
            None | Some((_, "writeback")) => CacheMode::Writeback,
            Some((_, "none")) => CacheMode::None,
            Some((c, other)) => {
                return Err(loc.error(
                    Some(c.span()),
                    "drive.cache",
                    format!("cache {other:?} is not one of \"writeback\", \"none\""),
                ))
            }
        };
        drives.push(DriveSpec {
            id,
            path,
            read_only: d.read_only,
            cache,
        });
    }

    let mut nets: Vec<NetSpec> = Vec::new();
    for n in &raw.net {
        let id = unique_id(&loc, &n.id, "net.id", nets.iter().map(|x| x.id.as_str()))?;
        let tap = n.tap.get_ref();
        if tap.is_empty()
            || tap.len() > 15
            || !tap
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        {
            return Err(loc.error(
                Some(n.tap.span()),
                "net.tap",
                format!(
                    "TAP name {tap:?} must be 1-15 characters of letters, digits, '-', '_' and '.'"
                ),
            ));
        }
        let mac = match &n.mac {
            None => None,
            Some(m) => Some(parse_mac(m.get_ref()).ok_or_else(|| {
                loc.error(
                    Some(m.span()),
                    "net.mac",
                    format!(
                        "MAC {:?} is not six hex bytes like 06:00:ac:10:00:02, or is multicast",
                        m.get_ref()
                    ),
                )
            })?),
        };
        if let Some(other) = nets.iter().find(|x| x.tap == *tap) {
            return Err(loc.error(
                Some(n.tap.span()),
                "net.tap",
                format!("TAP {tap:?} is already used by net {:?}", other.id),
            ));
        }
        nets.push(NetSpec {
            id,
            tap: tap.clone(),
            mac,
        });
    }

    if drives.len() + nets.len() > MAX_DEVICES {
        let span = raw
            .net
            .last()
            .map(|n| n.id.span())
            .or_else(|| raw.drive.last().map(|d| d.id.span()));
        return Err(loc.error(
            span,
            "",
            format!(
                "{} drives and {} networks: a VM has room for at most {MAX_DEVICES} devices",
                drives.len(),
                nets.len()
            ),
        ));
    }

    let api_socket = match &raw.api.socket {
        None => None,
        Some(sock) => {
            let value = sock.get_ref();
            // sun_path holds 108 bytes including the terminating NUL.
            let path = dir.join(value);
            if value.is_empty() || path.as_os_str().len() > 107 {
                return Err(loc.error(
                    Some(sock.span()),
                    "api.socket",
                    format!(
                        "API socket path {:?} must be 1 to 107 bytes once resolved (is {})",
                        value,
                        path.as_os_str().len()
                    ),
                ));
            }
            Some(path)
        }
    };

    Ok(Spec {
        file: file.to_path_buf(),
        name: name.get_ref().clone(),
        vcpus,
        memory_mib,
        kernel,
        initrd,
        cmdline,
        drives,
        nets,
        api_socket,
    })
}

/// Arguments the kernel hands to init (its MAX_INIT_ARGS, less init's own name).
const MAX_INIT_ARGS: usize = 31;

/// How many arguments follow `--` in a command line, split as the kernel splits them
/// (whitespace, with double quotes grouping); `None` when there is no `--`.
fn init_args(cmdline: &str) -> Option<usize> {
    let rest = if let Some(r) = cmdline.strip_prefix("-- ") {
        r
    } else {
        cmdline.split_once(" -- ").map(|(_, r)| r)?
    };
    let (mut count, mut in_word, mut quoted) = (0, false, false);
    for c in rest.chars() {
        if c == '"' {
            quoted = !quoted;
        }
        if c.is_whitespace() && !quoted {
            in_word = false;
        } else if !in_word {
            in_word = true;
            count += 1;
        }
    }
    Some(count)
}

fn valid_name(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

fn ranged(
    loc: &Locator<'_>,
    value: Option<&Spanned<i64>>,
    key: &str,
    default: u32,
    range: std::ops::RangeInclusive<u32>,
) -> Result<u32, SpecError> {
    let Some(v) = value else { return Ok(default) };
    u32::try_from(*v.get_ref())
        .ok()
        .filter(|n| range.contains(n))
        .ok_or_else(|| {
            loc.error(
                Some(v.span()),
                key,
                format!(
                    "{} is out of range {}..={}",
                    v.get_ref(),
                    range.start(),
                    range.end()
                ),
            )
        })
}

fn readable(
    loc: &Locator<'_>,
    dir: &Path,
    value: Option<&Spanned<String>>,
    key: &str,
) -> Result<Option<PathBuf>, SpecError> {
    let Some(v) = value else { return Ok(None) };
    let path = dir.join(v.get_ref());
    match File::open(&path).and_then(|f| f.metadata()) {
        Ok(m) if m.is_file() => Ok(Some(path)),
        Ok(_) => Err(loc.error(
            Some(v.span()),
            key,
            format!("{} is not a regular file", path.display()),
        )),
        Err(e) => Err(loc.error(
            Some(v.span()),
            key,
            format!("cannot open {}: {e}", path.display()),
        )),
    }
}

fn unique_id<'a>(
    loc: &Locator<'_>,
    id: &Spanned<String>,
    key: &str,
    mut seen: impl Iterator<Item = &'a str>,
) -> Result<String, SpecError> {
    let s = id.get_ref();
    if !valid_name(s, 20) {
        return Err(loc.error(
            Some(id.span()),
            key,
            format!("id {s:?} must be 1-20 characters of a-z, 0-9 and '-'"),
        ));
    }
    if seen.any(|x| x == s) {
        return Err(loc.error(Some(id.span()), key, format!("id {s:?} is used twice")));
    }
    Ok(s.clone())
}

/// Parses `aa:bb:cc:dd:ee:ff`; refuses multicast addresses.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in mac.iter_mut() {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(p, 16).ok()?;
    }
    (parts.next().is_none() && mac[0] & 1 == 0).then_some(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str) -> Result<Spec, SpecError> {
        parse(Path::new("/specs/t.toml"), text)
    }

    fn err(text: &str) -> SpecError {
        check(text).expect_err("spec should be refused")
    }

    #[test]
    fn minimal_spec_gets_defaults() {
        let s = check("[service]\nname = \"hello\"\n").unwrap();
        assert_eq!((s.name.as_str(), s.vcpus, s.memory_mib), ("hello", 1, 256));
        assert!(s.kernel.is_none() && s.drives.is_empty() && s.cmdline.is_empty());
    }

    #[test]
    fn errors_name_line_column_and_key() {
        let e = err("[service]\nname = \"hello\"\n[machine]\nvcpus = 33\n");
        assert_eq!((e.line, e.column, e.key.as_str()), (4, 9, "machine.vcpus"));
        assert!(e.to_string().contains("33 is out of range 1..=32"), "{e}");
        assert!(
            e.to_string()
                .starts_with("/specs/t.toml:4:9: key `machine.vcpus`"),
            "{e}"
        );

        let e = err("[service]\nname = \"hello\"\n[machine]\nmemory_mib = \"lots\"\n");
        assert_eq!((e.line, e.key.as_str()), (4, "machine.memory_mib"));

        let e = err("[service]\nname = \"hello\"\n[machine]\ncpus = 2\n");
        assert_eq!((e.line, e.key.as_str()), (4, "machine.cpus"));
        assert!(e.message.contains("unknown field"), "{e}");

        let e = err("[service]\nname = \"Hello World\"\n");
        assert_eq!((e.line, e.key.as_str()), (2, "service.name"));

        let e = err("[service]\nname = \"x\"\n[boot]\nkernel = \"nope.bin\"\n");
        assert_eq!((e.line, e.key.as_str()), (4, "boot.kernel"));
        assert!(e.message.contains("/specs/nope.bin"), "{e}");

        let e = err("[service]\nname = \"x\"\n[machine]\nmemory_mib = 32\n");
        assert!(e.message.contains("32 is out of range 64..=65536"));

        let e = err("[machine]\nvcpus = 1\n");
        assert!(e.message.contains("service"), "{e}");

        let e = err("[service]\nname = \"x\"\n[machine\n");
        assert_eq!(e.line, 3, "{e}");
    }

    #[test]
    fn the_api_socket_is_resolved_against_the_spec() {
        let s = check("[service]\nname = \"a\"\n[api]\nsocket = \"a.sock\"\n").unwrap();
        let want = s.file.parent().unwrap().join("a.sock");
        assert_eq!(s.api_socket.as_deref(), Some(want.as_path()));
        let long = "s".repeat(120);
        let e = err(&format!(
            "[service]\nname = \"a\"\n[api]\nsocket = \"/{long}\"\n"
        ));
        assert_eq!((e.line, e.key.as_str()), (4, "api.socket"), "{e}");
        let e = err("[service]\nname = \"a\"\n[api]\nport = 1\n");
        assert!(e.to_string().contains("port"), "{e}");
    }

    #[test]
    fn too_many_init_words_are_refused_unless_quoted() {
        let long = (0..40)
            .map(|i| format!("w{i}"))
            .collect::<Vec<_>>()
            .join(" ");
        let e = err(&format!(
            "[service]\nname = \"x\"\n[boot]\ncmdline = \"quiet -- {long}\"\n"
        ));
        assert_eq!(e.key, "boot.cmdline");
        assert!(e.message.contains("40 words"), "{e}");
        let quoted = format!("[service]\nname = \"x\"\n[boot]\ncmdline = 'quiet -- \"{long}\"'\n");
        assert!(check(&quoted).is_ok());
        assert_eq!(init_args("a b"), None);
        assert_eq!(init_args("-- a \"b c\"  d"), Some(3));
    }

    #[test]
    fn drives_and_nets_are_checked() {
        let dir = std::env::temp_dir().join(format!("hospes-spec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("d.img"), [0u8; 512]).unwrap();
        let file = dir.join("s.toml");
        let ok = "[service]\nname = \"x\"\n[[drive]]\nid = \"data\"\npath = \"d.img\"\ncache = \"none\"\n[[net]]\nid = \"net0\"\ntap = \"hos-x0\"\nmac = \"06:00:ac:10:00:02\"\n";
        let s = parse(&file, ok).unwrap();
        assert_eq!(s.drives[0].path, dir.join("d.img"));
        assert_eq!(s.drives[0].cache, CacheMode::None);
        assert_eq!(s.nets[0].mac, Some([6, 0, 0xac, 0x10, 0, 2]));

        let twice = "[service]\nname = \"x\"\n[[drive]]\nid = \"a\"\npath = \"d.img\"\n[[drive]]\nid = \"a\"\npath = \"d.img\"\n";
        let e = parse(&file, twice).unwrap_err();
        assert_eq!((e.line, e.key.as_str()), (7, "drive.id"));
        let bad_mac = "[service]\nname = \"x\"\n[[net]]\nid = \"n\"\ntap = \"t\"\nmac = \"01:00:00:00:00:00\"\n";
        assert_eq!(parse(&file, bad_mac).unwrap_err().key, "net.mac");
        let many: String = (0..20)
            .map(|i| format!("[[drive]]\nid = \"d{i}\"\npath = \"d.img\"\n"))
            .collect();
        let e = parse(&file, &format!("[service]\nname = \"x\"\n{many}")).unwrap_err();
        assert!(
            e.message.contains("at most 19 devices") && e.key == "drive.id",
            "{e}"
        );
        let bad_cache = "[service]\nname = \"x\"\n[[drive]]\nid = \"a\"\npath = \"d.img\"\ncache = \"unsafe\"\n";
        assert_eq!(parse(&file, bad_cache).unwrap_err().key, "drive.cache");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
