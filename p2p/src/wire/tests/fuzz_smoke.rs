//! The fuzz target's body on stable Rust: pseudo-random and mutated input must not panic,
//! and must reach every layer of checks.

use std::collections::BTreeMap;

use crate::wire::fuzz;

/// xorshift64: a fixed sequence, no dependency.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// `records` split into one record each.
fn split_records(mut records: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while records.len() >= 5 {
        let len = u32::from_le_bytes(records[1..5].try_into().unwrap()) as usize;
        let (record, rest) = records.split_at(5 + len);
        out.push(record.to_vec());
        records = rest;
    }
    out
}

/// Drops, repeats or swaps whole frames: what gets past every CRC to the state machine.
fn mutate_records(rng: &mut XorShift, records: &mut Vec<Vec<u8>>) {
    if records.is_empty() {
        return;
    }
    let (at, other) = (rng.below(records.len()), rng.below(records.len()));
    match rng.below(3) {
        0 => {
            records.remove(at);
        }
        1 => records.insert(at, records[other].clone()),
        _ => records.swap(at, other),
    }
}

fn mutate(rng: &mut XorShift, input: &mut Vec<u8>) {
    // Byte 0 is the mode: keep it.
    if input.len() < 2 {
        return;
    }
    let at = 1 + rng.below(input.len() - 1);
    match rng.below(5) {
        0 => {
            for _ in 0..1 + rng.below(4) {
                let at = 1 + rng.below(input.len() - 1);
                input[at] ^= 1 << rng.below(8);
            }
        }
        1 => input.truncate(at),
        2 => {
            let interesting = [0, 1, 0x1000, 4 << 20, u32::MAX, 0x8000_0000];
            let value = interesting[rng.below(interesting.len())].to_le_bytes();
            let end = (at + 4).min(input.len());
            input[at..end].copy_from_slice(&value[..end - at]);
        }
        3 => {
            let len = rng.below(input.len() - at);
            let copy = input[at..at + len].to_vec();
            let to = 1 + rng.below(input.len() - 1);
            input.splice(to..to, copy);
        }
        _ => {
            let len = rng.below(input.len() - at);
            input.drain(at..at + len);
        }
    }
}

#[test]
fn fuzz_target_survives_random_and_mutated_input() {
    let seed = fuzz::migration().unwrap();
    let (sink, state) = fuzz::run(&seed).unwrap();
    assert_eq!(sink.pages.len(), 3);
    assert_eq!(sink.blocks.len(), 2);
    assert_eq!(state.machine, fuzz::config().machine);
    let recs = fuzz::records(&seed);
    let mut framed = Vec::new();
    fuzz::frame_records(&recs, &mut framed);
    assert_eq!(framed, seed);
    let after_hello = fuzz::records(&seed[fuzz::hello().len()..]);
    // The seed corpus: the same migration in each mode the target reads.
    for input in fuzz::seeds().unwrap() {
        fuzz::receive(&input).unwrap();
    }

    let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
    let mut outcomes = BTreeMap::<String, u32>::new();
    for i in 0..4000 {
        let mut records = match i % 4 {
            2 => split_records(&recs),
            _ => split_records(&after_hello),
        };
        let mut input = match i % 4 {
            0 => (0..rng.below(600)).map(|_| rng.next() as u8).collect(),
            1 => [&[2][..], &seed].concat(),
            mode => {
                if rng.below(2) == 0 {
                    mutate_records(&mut rng, &mut records);
                }
                [vec![if mode == 2 { 3 } else { 1 }], records.concat()].concat()
            }
        };
        if i % 4 != 0 {
            for _ in 0..rng.below(3) {
                mutate(&mut rng, &mut input);
            }
        }
        let outcome = match fuzz::receive(&input) {
            Ok(()) if input.is_empty() => "nothing".to_string(),
            Ok(()) => "Ok".to_string(),
            Err(err) => format!("{err:?}")
                .split([' ', '(', '{'])
                .next()
                .unwrap_or_default()
                .to_string(),
        };
        *outcomes.entry(outcome).or_insert(0) += 1;
    }
    // The inputs reach every layer: framing, payloads, the checks against the
    // configuration, the state machine, the VM state, the hash, and a whole migration.
    for outcome in [
        "Crc",
        "Malformed",
        "PageOutside",
        "BlockOutside",
        "OutOfOrder",
        "RoundCount",
        "State",
        "HashMismatch",
        "Ok",
    ] {
        assert!(outcomes.contains_key(outcome), "{outcome}: {outcomes:?}");
    }
}

/// Rewrites the cargo-fuzz seed corpus, p2p/fuzz/seeds/receive (after a format change).
#[test]
#[ignore = "writes into the source tree"]
fn write_fuzz_seeds() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/receive");
    std::fs::create_dir_all(&dir).unwrap();
    for (mode, input) in fuzz::seeds().unwrap().into_iter().enumerate() {
        std::fs::write(dir.join(format!("migration-mode-{mode}")), input).unwrap();
    }
}
