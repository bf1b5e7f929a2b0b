//! `rig`: run a shell script inside a fresh L2 (the nested-KVM rig) and exit with its
//! status. For hosts without usable hardware virtualization:
//!
//! ```text
//! rig exec [--cpus N] [--memory-mib M] [--disk-mib D] [--timeout SECS] [--qemu]
//!          [--bin HOST:L2PATH]... [--file HOST:L2PATH]... [--module NAME]... -- 'script'
//! ```

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use rig::{RigConfig, RigError, L2};

const USAGE: &str =
    "usage: rig exec [--cpus N] [--memory-mib M] [--disk-mib D] [--timeout SECS] [--qemu]
                [--bin HOST:L2PATH]... [--file HOST:L2PATH]... [--module NAME]... -- 'script'

Boots L2 (Linux under QEMU TCG with a nested /dev/kvm), runs the script there with
sh -c in /work, prints its output, and exits with its status (124 on timeout).
--bin also copies the binary's shared libraries; --qemu places qemu-system-x86_64.";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match parse(&args) {
        Ok((cfg, timeout, script)) => exec(cfg, timeout, &script),
        Err(msg) => {
            eprintln!("rig: {msg}\n{USAGE}");
            ExitCode::from(2)
        }
    }
}

fn parse(args: &[String]) -> Result<(RigConfig, Duration, String), String> {
    let mut it = args.iter();
    match it.next().map(String::as_str) {
        Some("exec") => {}
        Some("-h" | "--help") | None => return Err("no command".into()),
        Some(other) => return Err(format!("unknown command {other:?}")),
    }
    let mut cfg = RigConfig::default();
    let mut timeout = Duration::from_secs(3600);
    loop {
        let Some(flag) = it.next() else {
            return Err("missing `-- 'script'`".into());
        };
        if flag == "--" {
            break;
        }
        if flag == "--qemu" {
            cfg = cfg.add_qemu();
            continue;
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let number = || {
            value
                .parse::<u64>()
                .map_err(|_| format!("{flag} {value:?}: not a number"))
        };
        let pair = || {
            value
                .split_once(':')
                .ok_or_else(|| format!("{flag} {value:?}: expected HOST:L2PATH"))
        };
        cfg = match flag.as_str() {
            "--cpus" => cfg.cpus(number()? as u32),
            "--memory-mib" => cfg.memory_mib(number()? as u32),
            "--disk-mib" => cfg.disk_mib(number()?),
            "--timeout" => {
                timeout = Duration::from_secs(number()?);
                cfg
            }
            "--bin" => {
                let (host, l2) = pair()?;
                cfg.add_binary(host, l2)
            }
            "--file" => {
                let (host, l2) = pair()?;
                cfg.add_file(host, l2)
            }
            "--module" => cfg.add_module(value),
            _ => return Err(format!("unknown option {flag:?}")),
        };
    }
    let script: Vec<&str> = it.map(String::as_str).collect();
    if script.is_empty() {
        return Err("no script after --".into());
    }
    Ok((cfg, timeout, script.join(" ")))
}

fn exec(cfg: RigConfig, timeout: Duration, script: &str) -> ExitCode {
    let mut l2 = match L2::boot(cfg) {
        Ok(l2) => l2,
        Err(e) => {
            eprintln!("rig: {e}");
            return ExitCode::from(125);
        }
    };
    eprintln!("rig: L2 booted in {:.1?}", l2.boot_time());
    let mut stdout = std::io::stdout();
    let result = l2.run_with(script, timeout, &mut |bytes| {
        let _ = stdout.write_all(bytes);
        let _ = stdout.flush();
    });
    match result {
        Ok(status) => ExitCode::from(u8::try_from(status).unwrap_or(255)),
        Err(RigError::Timeout { .. }) => {
            // Its output so far was streamed already.
            eprintln!("rig: timed out after {timeout:?}");
            ExitCode::from(124)
        }
        Err(e) => {
            eprintln!("rig: {e}");
            ExitCode::from(125)
        }
    }
}
