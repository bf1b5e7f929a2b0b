//! The VM state model: everything needed to continue a paused microVM in another process,
//! as serde types, and its versioned encoding (see [`format`]).
//!
//! A snapshot directory holds `state.bin` (header + JSON payload of [`VmState`]),
//! `memory.bin` (guest RAM, sparse: zero pages are holes) and one image per drive.

pub mod format;
mod state;

pub use state::*;
