//! What the end-to-end test binaries share: the L2 they run hospes in.

use std::sync::MutexGuard;

use rig::{RigConfig, L2};

/// The hospes binary under test.
pub const HOSPES: &str = env!("CARGO_BIN_EXE_hospes");

/// This test binary's L2: hospes, the default guest in /guest, and an ext4 disk at /data
/// (O_DIRECT works there, unlike on tmpfs) for the guests' image files.
pub fn l2_with_data_disk() -> MutexGuard<'static, L2> {
    rig::shared(|| {
        let guest = rig::guest_dir().expect("default guest");
        RigConfig::default()
            .disk_mib(1024)
            .add_binary(HOSPES, "/usr/local/bin/hospes")
            .add_file(guest.join("vmlinuz"), "/guest/vmlinuz")
            .add_file(guest.join("initramfs.cpio.gz"), "/guest/initramfs.cpio.gz")
    })
    .expect("L2 boots")
}
