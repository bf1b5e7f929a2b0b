//! The L2 initramfs: busybox, the L2 init and agent, kernel modules in load order, and
//! the files of a [`RigConfig`]. Archives are cached by content under
//! `${XDG_CACHE_HOME:-~/.cache}/hospes/rig/`, so tests and runs with the same inputs
//! build it once (files are keyed by path, size and mtime, not re-read).

use std::collections::hash_map::DefaultHasher;
use std::collections::BTreeMap;
use std::fs;
use std::hash::{Hash, Hasher};
use std::io::BufWriter;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use crate::config::RigConfig;
use crate::cpio::CpioWriter;
use crate::host;
use crate::modules::ModuleTree;
use crate::RigError;

const L2_INIT: &str = include_str!("l2-init.sh");
const L2_AGENT: &str = include_str!("l2-agent.sh");
/// Bump when the archive layout changes without any input changing.
const LAYOUT_VERSION: u32 = 1;
/// Always loaded: a real /dev/kvm, and what later tests need (TAP, bridges, virtio-pci
/// disks and NICs).
const DEFAULT_MODULES: &[&str] = &[
    "irqbypass",
    "kvm",
    "kvm_amd",
    "tun",
    "bridge",
    "veth",
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
];
/// Firmware `qemu-system-x86_64 -M microvm` (qboot) and `-M pc -kernel` look up.
const QEMU_DATA: &[&str] = &[
    "bios-microvm.bin",
    "qboot.rom",
    "bios-256k.bin",
    "bios.bin",
    "linuxboot_dma.bin",
    "linuxboot.bin",
    "pvh.bin",
    "kvmvapic.bin",
    "multiboot_dma.bin",
    "vgabios-stdvga.bin",
    "efi-virtio.rom",
];
/// Archives unused for this long are deleted when another one is written.
const CACHE_MAX_AGE: Duration = Duration::from_secs(24 * 3600);
/// At most this many archives stay cached (with qemu, one is ~70 MB).
const CACHE_KEEP: usize = 6;

/// Where an archive entry's bytes come from.
enum Source {
    Host(PathBuf),
    Text(String),
}

struct Entry {
    source: Source,
    mode: u32,
}

/// Returns the path of the L2 initramfs for `cfg`, building it if not cached.
pub fn build(cfg: &RigConfig, guest: &Path) -> Result<PathBuf, RigError> {
    // One build at a time in this process; another process racing us only wastes work.
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|p| p.into_inner());

    let entries = entries(cfg, guest)?;
    let mut hasher = DefaultHasher::new();
    LAYOUT_VERSION.hash(&mut hasher);
    for (path, entry) in &entries {
        path.hash(&mut hasher);
        entry.mode.hash(&mut hasher);
        match &entry.source {
            Source::Text(t) => t.hash(&mut hasher),
            Source::Host(p) => {
                let meta = fs::metadata(p).map_err(|e| RigError::io(p, e))?;
                p.hash(&mut hasher);
                meta.len().hash(&mut hasher);
                meta.modified().ok().hash(&mut hasher);
            }
        }
    }
    let dir = cache_dir()?;
    let out = dir.join(format!("l2-{:016x}.cpio", hasher.finish()));
    if out.is_file() {
        // Refresh the mtime so pruning keeps archives in use.
        let _ = fs::File::options()
            .append(true)
            .open(&out)
            .and_then(|f| f.set_modified(SystemTime::now()));
        return Ok(out);
    }
    prune(&dir);
    let tmp = dir.join(format!(".l2-{}.cpio.tmp", std::process::id()));
    write_archive(&tmp, &entries)?;
    fs::rename(&tmp, &out).map_err(|e| RigError::io(&out, e))?;
    Ok(out)
}

fn cache_dir() -> Result<PathBuf, RigError> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    let dir = base.join("hospes/rig");
    fs::create_dir_all(&dir).map_err(|e| RigError::io(&dir, e))?;
    Ok(dir)
}

/// Keeps the newest [`CACHE_KEEP`] archives that were used within [`CACHE_MAX_AGE`].
/// QEMU reads its -initrd whole at startup, so removing an archive of a running L2 is
/// harmless.
fn prune(dir: &Path) {
    let Ok(list) = fs::read_dir(dir) else { return };
    let mut archives: Vec<(SystemTime, PathBuf)> = list
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("l2-"))
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    archives.sort_by_key(|a| std::cmp::Reverse(a.0));
    for (i, (modified, path)) in archives.iter().enumerate() {
        let old = modified.elapsed().is_ok_and(|age| age > CACHE_MAX_AGE);
        if old || i >= CACHE_KEEP {
            let _ = fs::remove_file(path);
        }
    }
}

/// Everything in the archive, by archive path (so a later duplicate replaces an earlier).
fn entries(cfg: &RigConfig, guest: &Path) -> Result<BTreeMap<String, Entry>, RigError> {
    let mut out = BTreeMap::new();
    let text = |s: &str, mode| Entry {
        source: Source::Text(s.to_string()),
        mode,
    };
    let host_file = |p: &Path| -> Result<Entry, RigError> {
        let meta = fs::metadata(p).map_err(|e| RigError::io(p, e))?;
        if !meta.is_file() {
            return Err(RigError::Config(format!(
                "{} is not a regular file",
                p.display()
            )));
        }
        Ok(Entry {
            source: Source::Host(p.to_path_buf()),
            mode: meta.permissions().mode() & 0o7777,
        })
    };

    out.insert("init".into(), text(L2_INIT, 0o755));
    out.insert("rig/agent.sh".into(), text(L2_AGENT, 0o755));
    out.insert("bin/busybox".into(), host_file(&guest.join("busybox"))?);
    out.insert(
        "etc/passwd".into(),
        text("root:x:0:0:root:/root:/bin/sh\n", 0o644),
    );
    out.insert("etc/group".into(), text("root:x:0:\nkvm:x:104:\n", 0o644));
    out.insert("etc/hosts".into(), text("127.0.0.1 localhost\n", 0o644));

    let kver = fs::read_to_string(guest.join("KERNEL_VERSION"))
        .map_err(|e| RigError::io(guest.join("KERNEL_VERSION"), e))?;
    let tree = ModuleTree::open(&guest.join("modules").join(kver.trim()))?;
    let mut names: Vec<String> = DEFAULT_MODULES.iter().map(|s| s.to_string()).collect();
    names.extend(cfg.extra_modules.iter().cloned());
    let mut order = String::new();
    for ko in tree.load_order(&names)? {
        let file = ko
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        order.push_str(&file);
        order.push('\n');
        out.insert(format!("lib/modules/rig/{file}"), host_file(&ko)?);
    }
    out.insert("lib/modules/rig/order".into(), text(&order, 0o644));

    let mut binaries = Vec::new();
    if cfg.qemu {
        let qemu = host::ensure_tool("qemu-system-x86_64", "qemu-system-x86")?;
        binaries.push(qemu.clone());
        out.insert("usr/bin/qemu-system-x86_64".into(), host_file(&qemu)?);
        for name in QEMU_DATA {
            let p = Path::new("/usr/share/qemu").join(name);
            if p.is_file() {
                out.insert(format!("usr/share/qemu/{name}"), host_file(&p)?);
            }
        }
    }
    for f in &cfg.files {
        let l2 = if f.l2.starts_with('/') {
            f.l2.clone()
        } else {
            format!("work/{}", f.l2)
        };
        out.insert(l2.trim_start_matches('/').to_string(), host_file(&f.host)?);
        if f.with_libs {
            binaries.push(f.host.clone());
        }
    }
    for bin in binaries {
        for lib in host::shared_libs(&bin)? {
            let key = lib.to_string_lossy().trim_start_matches('/').to_string();
            out.insert(key, host_file(&lib)?);
        }
    }
    Ok(out)
}

fn write_archive(path: &Path, entries: &BTreeMap<String, Entry>) -> Result<(), RigError> {
    let file = fs::File::create(path).map_err(|e| RigError::io(path, e))?;
    let mut cpio = CpioWriter::new(BufWriter::with_capacity(1 << 20, file));
    let io = |e| RigError::io(path, e);
    for dir in ["dev", "proc", "sys", "run", "tmp", "work", "root", "data"] {
        cpio.dir(dir).map_err(io)?;
    }
    for (name, entry) in entries {
        match &entry.source {
            Source::Text(t) => cpio.file(name, entry.mode, t.as_bytes()).map_err(io)?,
            Source::Host(p) => {
                let data = fs::read(p).map_err(|e| RigError::io(p, e))?;
                cpio.file(name, entry.mode, &data).map_err(io)?;
            }
        }
    }
    cpio.finish().map_err(io)?;
    Ok(())
}
