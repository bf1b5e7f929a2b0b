//! hospes benchmark harnesses, run in the nested rig (see the `rig` crate): [`boot`] (hospes
//! vs QEMU boot time and memory overhead) and [`io`] (disk, network and CPU, native vs
//! hospes guest vs QEMU guest). Each prints figures; none passes or fails.

pub mod boot;
pub mod chart;
pub mod io;
