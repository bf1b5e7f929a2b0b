//! The rig's error type: every variant names the value (path, command, timeout) at fault.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// What went wrong while building or driving an L2.
#[derive(Debug, thiserror::Error)]
pub enum RigError {
    /// A host file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A host command (apt-get, ldd, mkfs.ext4, build.sh...) failed.
    #[error("`{command}` failed: {detail}")]
    HostCommand {
        /// The command line.
        command: String,
        /// Exit status and stderr, or why it could not start.
        detail: String,
    },
    /// Building the default guest failed (message of the first attempt in this process).
    #[error("building the default guest failed: {0}")]
    Guest(String),
    /// A kernel module is not in the guest kernel's module tree.
    #[error("kernel module {name} not found under {dir}")]
    ModuleNotFound {
        /// The module name.
        name: String,
        /// The `lib/modules/<kver>` directory searched.
        dir: PathBuf,
    },
    /// A configuration value is unusable.
    #[error("invalid rig configuration: {0}")]
    Config(String),
    /// QEMU (L2) exited while it was expected to run.
    #[error("L2 QEMU exited ({status}) {when}\nQEMU said: {qemu}\nL2 console (tail):\n{console}")]
    QemuExited {
        /// What the rig was doing.
        when: String,
        /// QEMU's exit status, if known.
        status: String,
        /// QEMU's own stdout/stderr.
        qemu: String,
        /// The tail of L2's serial console.
        console: String,
    },
    /// The agent did not announce itself in time.
    #[error("L2 did not boot within {timeout:?}\nL2 console (tail):\n{console}")]
    BootTimeout {
        /// The boot timeout.
        timeout: Duration,
        /// The tail of L2's serial console.
        console: String,
    },
    /// L2 booted but has no /dev/kvm (kvm_amd did not load or found no SVM).
    #[error("L2 has no /dev/kvm after loading kvm_amd (nested paging: {npt})\nL2 console (tail):\n{console}")]
    NoKvm {
        /// Whether "Nested Paging enabled" was in dmesg.
        npt: bool,
        /// The tail of L2's serial console.
        console: String,
    },
    /// A command did not finish within its timeout. With `agent_alive` the agent killed
    /// it and L2 is still usable; without, L2 stopped answering and is unusable.
    #[error("L2 command `{script}` did not finish within {timeout:?} (agent alive: {agent_alive}); output so far:\n{partial}")]
    Timeout {
        /// The script.
        script: String,
        /// Its timeout.
        timeout: Duration,
        /// Output received before the timeout.
        partial: String,
        /// Whether L2 is still usable.
        agent_alive: bool,
    },
    /// An earlier command timed out without the agent answering: L2 cannot be trusted.
    #[error("L2 agent stopped answering during an earlier command; cannot run `{script}`")]
    AgentLost {
        /// The script that was not run.
        script: String,
    },
    /// The shared L2 failed to boot (message of that failure).
    #[error("the shared L2 failed to boot: {0}")]
    SharedBoot(String),
}

impl RigError {
    pub(crate) fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        RigError::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }
}
