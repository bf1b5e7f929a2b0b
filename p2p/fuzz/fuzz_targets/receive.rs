//! The migration receiver under arbitrary input: see `p2p::wire::fuzz` for how the input
//! is read (a mode byte, then raw bytes or records framed with a valid CRC).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Errors are the expected outcome; a panic (including an unchecked write reaching the
    // sink, which `receive` turns into one) is the finding.
    let _ = p2p::wire::fuzz::receive(data);
});
