//! The nested-KVM test rig. This machine's /dev/kvm cannot run stock kernels, so
//! end-to-end tests run inside "L2": a Linux VM under `qemu-system-x86_64 -accel tcg
//! -cpu max` (emulated AMD SVM with nested paging) whose own `kvm_amd` gives a real
//! /dev/kvm. The crate builds the L2 initramfs, boots L2, and runs shell commands in
//! it through an agent on L2's second serial port: several commands per boot, so a
//! test suite pays for the L2 boot once (see [`shared`]).
//!
//! ```no_run
//! let cfg = rig::RigConfig::default().add_file("target/debug/hospes", "/usr/local/bin/hospes");
//! let mut l2 = rig::L2::boot(cfg)?;
//! let out = l2.run("hospes --version", std::time::Duration::from_secs(60))?;
//! assert_eq!(out.status, 0, "{}", out.output);
//! # Ok::<(), rig::RigError>(())
//! ```

mod agent;
mod config;
pub mod cpio;
mod error;
mod host;
mod initrd;
mod l2;
mod modules;

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, OnceLock};

pub use config::{NetConfig, RigConfig};
pub use error::RigError;
pub use l2::{CmdOutput, L2};

/// The default guest's directory (`vmlinuz`, `initramfs.cpio.gz`, `KERNEL_VERSION`,
/// `modules/<kver>/`, `busybox`), built by `resources/guest/build.sh` on first use in
/// this process and reused from its cache afterwards.
pub fn guest_dir() -> Result<PathBuf, RigError> {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    DIR.get_or_init(|| host::build_guest().map_err(|e| e.to_string()))
        .clone()
        .map_err(RigError::Guest)
}

/// The L2 shared by every test of one test binary: booted by the first caller with the
/// config `cfg` returns (later callers' `cfg` is not called), then handed out one test at
/// a time. A test that panicked while holding it does not poison it for the others. An
/// L2 that stopped answering (see [`L2::agent_lost`]; nested SVM under TCG hangs now and
/// then) is rebooted before it is handed out, so one hang fails one test, not every test
/// after it.
///
/// The L2 lives until the process exits; its QEMU is then killed by a watcher that
/// notices the process is gone (see `l2.rs`), and its temporary files are removed.
pub fn shared(cfg: impl FnOnce() -> RigConfig) -> Result<MutexGuard<'static, L2>, RigError> {
    static SHARED: OnceLock<Result<Mutex<L2>, String>> = OnceLock::new();
    let mut guard =
        match SHARED.get_or_init(|| L2::boot(cfg()).map(Mutex::new).map_err(|e| e.to_string())) {
            Ok(l2) => l2.lock().unwrap_or_else(|poisoned| poisoned.into_inner()),
            Err(msg) => return Err(RigError::SharedBoot(msg.clone())),
        };
    guard.reboot_if_lost("the shared L2")?;
    Ok(guard)
}
