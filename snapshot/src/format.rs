//! The encoding of a [`crate::VmState`]: a fixed header outside the payload, then the
//! payload (JSON), checked by CRC and size caps before use.
//!
//! (to be written)
