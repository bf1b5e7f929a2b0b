//! What the rig needs from the host: the default guest build, tools installed with
//! apt-get when missing, and the shared libraries of a dynamically linked binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::RigError;

/// `resources/guest/build.sh` of this source tree.
const BUILD_SH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../resources/guest/build.sh");

/// Runs the guest build script (a no-op when its cache is current); returns its dir.
pub fn build_guest() -> Result<PathBuf, RigError> {
    let stdout = run(Command::new("bash").arg(BUILD_SH).stderr(Stdio::inherit()))?;
    let dir = stdout.lines().last().unwrap_or("").trim();
    if dir.is_empty() || !Path::new(dir).join("vmlinuz").is_file() {
        return Err(RigError::HostCommand {
            command: format!("bash {BUILD_SH}"),
            detail: format!("last stdout line {dir:?} is not a guest directory"),
        });
    }
    Ok(PathBuf::from(dir))
}

/// Runs `cmd`; its stdout on success, else the status and stderr in the error.
pub fn run(cmd: &mut Command) -> Result<String, RigError> {
    let command = format!("{cmd:?}").replace('"', "");
    let out = cmd.output().map_err(|e| RigError::HostCommand {
        command: command.clone(),
        detail: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(RigError::HostCommand {
            command,
            detail: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The absolute path of `name` in $PATH (or the standard sbin dirs).
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.is_file());
    found
}

/// `which(tool)`, installing Debian package `package` with apt-get first if needed.
pub fn ensure_tool(tool: &str, package: &str) -> Result<PathBuf, RigError> {
    if let Some(p) = which(tool) {
        return Ok(p);
    }
    eprintln!("rig: {tool} not found; installing {package} with apt-get");
    let install = || {
        run(Command::new("apt-get")
            .args(["install", "-y", "-qq", package])
            .env("DEBIAN_FRONTEND", "noninteractive"))
    };
    if install().is_err() {
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        install()?;
    }
    which(tool).ok_or_else(|| RigError::HostCommand {
        command: format!("apt-get install {package}"),
        detail: format!("{tool} is still not in PATH"),
    })
}

/// The shared libraries and ELF interpreter `ldd` lists for `bin`, as absolute paths;
/// empty for a static binary.
pub fn shared_libs(bin: &Path) -> Result<Vec<PathBuf>, RigError> {
    let out = Command::new("ldd")
        .arg(bin)
        .output()
        .map_err(|e| RigError::HostCommand {
            command: format!("ldd {}", bin.display()),
            detail: e.to_string(),
        })?;
    // ldd exits 1 for static binaries ("not a dynamic executable").
    let text = String::from_utf8_lossy(&out.stdout);
    if let Some(missing) = text.lines().find(|l| l.contains("=> not found")) {
        return Err(RigError::HostCommand {
            command: format!("ldd {}", bin.display()),
            detail: format!("a library is missing on the host: {}", missing.trim()),
        });
    }
    Ok(parse_ldd(&text))
}

/// Lines look like `libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x...)`,
/// `/lib64/ld-linux-x86-64.so.2 (0x...)` or `linux-vdso.so.1 (0x...)`.
fn parse_ldd(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.trim(),
                None => line,
            };
            let path = path.split(" (").next()?.trim();
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ldd_output() {
        let text = "\tlinux-vdso.so.1 (0x00007ffc)\n\
                    \tlibz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x00007f)\n\
                    \tlibgone.so => not found\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(text),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libz.so.1"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
        assert!(parse_ldd("\tnot a dynamic executable\n").is_empty());
    }
}
