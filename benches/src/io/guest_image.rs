//! The guest's data disk for the I/O benchmark: an ext4 image holding `hospes-iotool`, its
//! ELF interpreter and shared libraries (the default guest has no libc), and `guest.sh`,
//! the guest's half of one benchmark run. Made on the host with `mkfs.ext4 -d` (e2fsprogs)
//! and gzipped, so L2 receives a few MiB and unpacks it into a fully allocated file.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::{IoParams, GUEST_IP, HOST_IP, PORT_G2H, PORT_H2G};

/// The guest's command line after ` -- `: mount the data disk (the first drive) and run
/// the script on it.
pub(crate) const GUEST_CMD: &str = "mkdir -p /mnt; mount -t ext4 /dev/vda /mnt && sh /mnt/guest.sh";

/// Why the image could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A host command could not be started.
    #[error("cannot run {cmd} ({source}){hint}")]
    Spawn {
        /// The command.
        cmd: String,
        /// Why.
        source: std::io::Error,
        /// What to install, if known.
        hint: &'static str,
    },
    /// A host command failed.
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Failed {
        /// The command line.
        cmd: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it printed on stderr.
        stderr: String,
    },
    /// A file could not be staged.
    #[error("staging {path}: {source}")]
    Stage {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// The gzipped image in a private temporary directory, removed on drop.
#[derive(Debug)]
pub(crate) struct GuestImage {
    dir: crate::TempDir,
}

impl GuestImage {
    /// The `.img.gz` file.
    pub(crate) fn path(&self) -> PathBuf {
        self.dir.0.join("guest.img.gz")
    }
}

/// Image size: the test file, ~12% for ext4 metadata and journal, and room for the tool.
pub(crate) fn image_mib(p: &IoParams) -> u64 {
    p.seq_mib + p.seq_mib / 8 + 64
}

fn run(cmd: &mut Command, hint: &'static str) -> Result<Vec<u8>, ImageError> {
    let line = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| ImageError::Spawn {
            cmd: line.clone(),
            source,
            hint,
        })?;
    if !out.status.success() {
        return Err(ImageError::Failed {
            cmd: line,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out.stdout)
}

/// The shared libraries and the ELF interpreter `ldd` lists for `bin`; both empty for a
/// static binary.
fn dependencies(bin: &Path) -> Result<(Vec<PathBuf>, Option<PathBuf>), ImageError> {
    let out = Command::new("ldd")
        .arg(bin)
        .output()
        .map_err(|source| ImageError::Spawn {
            cmd: "ldd".into(),
            source,
            hint: " (install libc-bin)",
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    let (mut libs, mut interp) = (Vec::new(), None);
    for line in text.lines().map(str::trim) {
        if let Some((_, rest)) = line.split_once("=> ") {
            if let Some(path) = rest
                .split_whitespace()
                .next()
                .filter(|p| p.starts_with('/'))
            {
                libs.push(PathBuf::from(path));
            }
        } else if line.starts_with('/') {
            interp = line.split_whitespace().next().map(PathBuf::from);
        }
    }
    Ok((libs, interp))
}

fn guest_script(tool: &str, p: &IoParams) -> String {
    format!(
        "# The guest's half of one `hospes bench io` run (written by benches/src/io/guest_image.rs).\n\
         T=\"{tool}\"\n\
         ip addr add {GUEST_IP}/24 dev eth0 && ip link set eth0 up\n\
         $T seqwrite /mnt/io.dat {seq}\n\
         $T seqread /mnt/io.dat {seq}\n\
         $T randread /mnt/io.dat {rand}\n\
         $T tcp-send {HOST_IP}:{PORT_G2H} {tcp}\n\
         $T tcp-recv {PORT_H2G}\n\
         $T pi {pi}\n",
        seq = p.seq_mib,
        rand = p.randread_secs,
        tcp = p.tcp_mib,
        pi = p.pi_samples,
    )
}

fn copy(from: &Path, to: &Path) -> Result<(), ImageError> {
    fs::copy(from, to)
        .map(drop)
        .map_err(|source| ImageError::Stage {
            path: from.to_path_buf(),
            source,
        })
}

/// Stages the tool, its libraries and `guest.sh`, and makes the gzipped ext4 image.
pub(crate) fn build(iotool: &Path, p: &IoParams) -> Result<GuestImage, ImageError> {
    let image = GuestImage {
        dir: crate::TempDir(
            std::env::temp_dir().join(format!("hospes-bench-io-{}", std::process::id())),
        ),
    };
    let stage = image.dir.0.join("stage");
    for d in [stage.join("lib"), stage.join("lib64")] {
        fs::create_dir_all(&d).map_err(|source| ImageError::Stage {
            path: d.clone(),
            source,
        })?;
    }
    copy(iotool, &stage.join("hospes-iotool"))?;
    let (libs, interp) = dependencies(iotool)?;
    for lib in &libs {
        // fs::copy follows the symlinks ldd may print.
        copy(
            lib,
            &stage.join("lib").join(lib.file_name().unwrap_or_default()),
        )?;
    }
    let tool = match interp {
        Some(interp) => {
            let name = interp
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            copy(&interp, &stage.join("lib64").join(&name))?;
            format!("/mnt/lib64/{name} --library-path /mnt/lib /mnt/hospes-iotool")
        }
        None => "/mnt/hospes-iotool".to_string(),
    };
    let script = stage.join("guest.sh");
    fs::write(&script, guest_script(&tool, p)).map_err(|source| ImageError::Stage {
        path: script,
        source,
    })?;

    let img = image.dir.0.join("guest.img");
    // Inode tables and journal initialised now, so no ext4lazyinit thread writes in the
    // guest during the measurements.
    run(
        Command::new("mkfs.ext4")
            .args([
                "-q",
                "-F",
                "-m",
                "0",
                "-L",
                "hospes-bench",
                "-E",
                "lazy_itable_init=0,lazy_journal_init=0,nodiscard",
                "-d",
            ])
            .arg(&stage)
            .arg(&img)
            .arg(format!("{}M", image_mib(p))),
        " (install e2fsprogs)",
    )?;
    let gz = run(
        Command::new("gzip").args(["-1", "-c"]).arg(&img),
        " (install gzip)",
    )?;
    fs::write(image.path(), gz).map_err(|source| ImageError::Stage {
        path: image.path(),
        source,
    })?;
    let _ = fs::remove_file(&img);
    Ok(image)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_test_binary_has_libc_and_an_interpreter() {
        let exe = std::env::current_exe().unwrap();
        let (libs, interp) = dependencies(&exe).unwrap();
        assert!(
            libs.iter().any(|l| l.to_string_lossy().contains("libc.so")),
            "{libs:?}"
        );
        assert!(interp.is_some());
    }

    #[test]
    fn guest_script_uses_the_params() {
        let p = IoParams::default();
        let s = guest_script("/mnt/x", &p);
        assert!(s.contains("$T seqwrite /mnt/io.dat 256\n"), "{s}");
        assert!(
            s.contains(&format!("$T tcp-send {HOST_IP}:{PORT_G2H} {}\n", p.tcp_mib)),
            "{s}"
        );
    }
}
