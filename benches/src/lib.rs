//! hospes benchmark harnesses, run in the nested rig (see the `rig` crate): [`boot`] (hospes
//! vs QEMU boot time and memory overhead), [`io`] (disk, network and CPU, native vs
//! hospes guest vs QEMU guest) and [`snapshot`] (snapshot and restore times and memory
//! file size, hospes vs QEMU saving to a file), and [`migrate`] (live migration, hospes vs
//! QEMU, in one L2 over loopback). Each prints figures; none passes or fails.

pub mod boot;
pub mod chart;
pub mod io;
pub mod migrate;
pub mod snapshot;

/// A host directory removed when dropped.
#[derive(Debug)]
pub(crate) struct TempDir(pub(crate) std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
