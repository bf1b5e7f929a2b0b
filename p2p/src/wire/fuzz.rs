//! The receiving side under arbitrary input: the body of the cargo-fuzz target
//! (`p2p/fuzz`, `cargo +nightly fuzz run receive`) and of a unit test that runs it over
//! pseudo-random and mutated input on stable Rust, so that CI exercises it too.
//!
//! The input's first byte picks a mode. Bit 0 clear: the rest is the raw byte stream. Bit 0
//! set: the rest is records (type u8, length u32, payload, the length cut to what is left),
//! each sent as a frame with a correct header and CRC (a type byte with its top bit set is
//! a frame flagged LZ4-compressed), so that mutations get past the CRC
//! into the payloads and the state machine. Bit 1 clear: a valid Hello for [`config`] comes
//! first; set: the input brings its own.

use std::collections::BTreeMap;
use std::io;

use snapshot::{
    DevicesState, DriveConfig, KvmVmState, MachineConfig, MemoryState, QueueState, SerialState,
    VcpuState, VirtioTransportState, VmState,
};

use super::frame::{raw_header_for, read_frame};
use super::{
    Event, Frame, FrameType, Hello, MigrationConfig, Receiver, Sender, Sink, WireError, BLOCK_SIZE,
    FLAG_LZ4, HELLO_VERSION, MIN_PROTOCOL_VERSION, PAGE_SIZE, PROTOCOL_VERSION,
};

/// Feeds `data` (see the module documentation) to a [`Receiver`] and returns how that
/// ended. Panics only if the receiver handed its sink a page or block outside the
/// configuration: that is the bug the fuzzer looks for, besides any panic in the receiver.
pub fn receive(data: &[u8]) -> Result<(), WireError> {
    let Some((&mode, rest)) = data.split_first() else {
        return Ok(());
    };
    let mut stream = Vec::new();
    if mode & 2 == 0 {
        stream.extend(hello());
    }
    if mode & 1 == 0 {
        stream.extend_from_slice(rest);
    } else {
        frame_records(rest, &mut stream);
    }
    match run(&stream) {
        Err(WireError::Sink { what, source }) => {
            panic!("the receiver passed its sink an unchecked {what}: {source}")
        }
        result => result.map(drop),
    }
}

/// The fuzz target's VM: one vCPU, 2 MiB of RAM in two regions (one above 4 GiB), one
/// 10000-byte drive (two whole blocks and a short one).
pub fn config() -> MigrationConfig {
    MigrationConfig {
        machine: MachineConfig {
            name: "fuzz".into(),
            vcpus: 1,
            memory_mib: 2,
            cmdline: String::new(),
            drives: vec![DriveConfig {
                id: "root".into(),
                file: "root.img".into(),
                size: 10_000,
                read_only: false,
                cache: "writeback".into(),
            }],
            nets: Vec::new(),
        },
        regions: vec![(0, 1 << 20), (1 << 32, 1 << 20)],
    }
}

/// The Hello frame offering [`config`], as the [`Sender`] sends it.
pub fn hello() -> Vec<u8> {
    Frame::Hello(Hello {
        min_version: MIN_PROTOCOL_VERSION,
        max_version: PROTOCOL_VERSION,
        config: config(),
    })
    .encode()
    .unwrap_or_default()
}

/// A whole valid migration of [`config`]'s VM as the source sends it, two rounds (with
/// pages, blocks, a short last block, zeroed entries), the state, Done and (after the
/// destination's Ready) Commit: the seed the fuzzer and the unit test mutate.
pub fn migration() -> Result<Vec<u8>, WireError> {
    let config = config();
    let mut tx = Sender::new(config.clone())?;
    let mut w = Vec::new();
    tx.hello(&mut w)?;
    tx.read_ack(
        &mut &Frame::HelloAck {
            version: PROTOCOL_VERSION,
        }
        .encode()?[..],
    )?;
    // Pages of one repeated byte travel compressed; blocks of noise do not, so that the
    // corpus has both kinds of data frame.
    let data = |seed: u8, len: usize| vec![seed; len];
    tx.page(&mut w, 0, &data(1, PAGE_SIZE))?;
    tx.page(&mut w, 0x1000, &data(2, PAGE_SIZE))?;
    tx.page(&mut w, 1 << 32, &data(3, PAGE_SIZE))?;
    tx.block(&mut w, 0, 0, &noise(4, BLOCK_SIZE))?;
    tx.block(&mut w, 0, 1, &noise(5, BLOCK_SIZE))?;
    tx.block(&mut w, 0, 2, &noise(6, 10_000 - 2 * BLOCK_SIZE))?;
    tx.end_round(&mut w)?;
    tx.zero_page(&mut w, 0x1000)?;
    tx.page(&mut w, (1 << 32) + 0x1000, &data(7, PAGE_SIZE))?;
    tx.zero_block(&mut w, 0, 1)?;
    tx.end_round(&mut w)?;
    tx.state(&mut w, &vm_state(&config))?;
    tx.done(&mut w)?;
    tx.read_ready(&mut &Frame::Ready.encode()?[..])?;
    tx.commit(&mut w)?;
    Ok(w)
}

/// A record's type byte with this bit set is a frame with [`FLAG_LZ4`] (frame type codes
/// are below it).
const LZ4_RECORD: u8 = 0x80;

/// `len` bytes of xorshift noise, different per seed: data LZ4 cannot compress.
pub(crate) fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ seed;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// `stream`'s frames as records (see the module documentation), up to the first frame
/// that does not read.
pub fn records(mut stream: &[u8]) -> Vec<u8> {
    let (mut out, mut payload) = (Vec::new(), Vec::new());
    while let Ok(header) = read_frame(&mut stream, &mut payload) {
        out.push(header.kind as u8 | if header.compressed() { LZ4_RECORD } else { 0 });
        out.extend_from_slice(&header.len.to_le_bytes());
        out.extend_from_slice(&payload);
    }
    out
}

/// [`migration`] as an input in each of the four modes: a seed corpus.
pub fn seeds() -> Result<Vec<Vec<u8>>, WireError> {
    let whole = migration()?;
    let after_hello = whole.get(hello().len()..).unwrap_or_default();
    Ok(vec![
        [&[0][..], after_hello].concat(),
        [&[1][..], &records(after_hello)].concat(),
        [&[2][..], &whole].concat(),
        [&[3][..], &records(&whole)].concat(),
    ])
}

/// Appends the frames that `records` describe to `stream`.
pub(crate) fn frame_records(mut records: &[u8], stream: &mut Vec<u8>) {
    while let Some((&code, rest)) = records.split_first() {
        let mut len = [0u8; 4];
        let n = rest.len().min(4);
        len[..n].copy_from_slice(&rest[..n]);
        let rest = &rest[n..];
        let len = (u32::from_le_bytes(len) as usize).min(rest.len());
        let (payload, rest) = rest.split_at(len);
        let flags = if code & LZ4_RECORD != 0 { FLAG_LZ4 } else { 0 };
        let code = code & !LZ4_RECORD;
        let version = if code == FrameType::Hello as u8 {
            HELLO_VERSION
        } else {
            PROTOCOL_VERSION
        };
        stream.extend_from_slice(&raw_header_for(version, code, flags, payload));
        stream.extend_from_slice(payload);
        records = rest;
    }
}

/// Runs a [`Receiver`] over `stream` as a destination would, accepting any Hello with a
/// fresh [`MemorySink`], until Commit (Done answered with Ready), an Abort or an error.
/// Returns what the sink holds and the VM state received.
pub fn run(stream: &[u8]) -> Result<(MemorySink, Box<VmState>), WireError> {
    let mut input = stream;
    let mut receiver = Receiver::new();
    let mut sink = MemorySink::default();
    let mut state = None;
    loop {
        match receiver.next(&mut input, &mut sink)? {
            Event::Hello { config, .. } => {
                sink = MemorySink::new(config);
                receiver.accept(&mut io::sink())?;
            }
            Event::State(received) => state = Some(received),
            Event::Done => receiver.ready(&mut io::sink())?,
            Event::Commit => {
                let state = state.ok_or(WireError::Misuse("Commit without a State"))?;
                return Ok((sink, state));
            }
            Event::Aborted(reason) => return Err(WireError::Aborted(reason)),
            Event::Applied { .. } | Event::RoundEnd { .. } => {}
        }
    }
}

/// A destination's memory and disks, sparse: only non-zero pages and blocks are kept. It
/// checks every write against its configuration on its own (not with the receiver's
/// code) and fails the ones outside.
#[derive(Debug, Default)]
pub struct MemorySink {
    config: Option<MigrationConfig>,
    /// Non-zero pages by gpa.
    pub pages: BTreeMap<u64, Vec<u8>>,
    /// Non-zero blocks by (disk, block index).
    pub blocks: BTreeMap<(u16, u64), Vec<u8>>,
}

impl MemorySink {
    /// Zeroed memory and empty disks for `config`.
    pub fn new(config: MigrationConfig) -> Self {
        Self {
            config: Some(config),
            ..Self::default()
        }
    }

    fn check_page(&self, gpa: u64, len: usize) -> io::Result<()> {
        let regions = self.config.as_ref().map_or(&[][..], |c| &c.regions[..]);
        let inside = regions.iter().any(|&(start, size)| {
            gpa >= start && gpa - start < size && size - (gpa - start) >= PAGE_SIZE as u64
        });
        if len != PAGE_SIZE || !gpa.is_multiple_of(PAGE_SIZE as u64) || !inside {
            return Err(io::Error::other(format!(
                "page {gpa:#x} ({len} bytes) is not a page of guest memory"
            )));
        }
        Ok(())
    }

    fn check_block(&self, disk: u16, index: u64, len: usize) -> io::Result<()> {
        let size = self
            .config
            .as_ref()
            .and_then(|c| c.machine.drives.get(usize::from(disk)))
            .map(|d| d.size);
        let offset = index.checked_mul(BLOCK_SIZE as u64);
        let ok = match (size, offset) {
            (Some(size), Some(offset)) if offset < size => {
                len as u64 == (size - offset).min(BLOCK_SIZE as u64)
            }
            _ => false,
        };
        if !ok {
            return Err(io::Error::other(format!(
                "block {index} of disk {disk} ({len} bytes) is not a block of a disk"
            )));
        }
        Ok(())
    }
}

fn keep_non_zero<K: Ord>(map: &mut BTreeMap<K, Vec<u8>>, key: K, data: &[u8]) {
    if data.iter().all(|&b| b == 0) {
        map.remove(&key);
    } else {
        map.insert(key, data.to_vec());
    }
}

impl Sink for MemorySink {
    fn write_page(&mut self, gpa: u64, data: &[u8]) -> io::Result<()> {
        self.check_page(gpa, data.len())?;
        keep_non_zero(&mut self.pages, gpa, data);
        Ok(())
    }

    fn zero_page(&mut self, gpa: u64) -> io::Result<()> {
        self.check_page(gpa, PAGE_SIZE)?;
        self.pages.remove(&gpa);
        Ok(())
    }

    fn write_block(&mut self, disk: u16, index: u64, data: &[u8]) -> io::Result<()> {
        self.check_block(disk, index, data.len())?;
        keep_non_zero(&mut self.blocks, (disk, index), data);
        Ok(())
    }

    fn zero_block(&mut self, disk: u16, index: u64, len: usize) -> io::Result<()> {
        self.check_block(disk, index, len)?;
        self.blocks.remove(&(disk, index));
        Ok(())
    }
}

/// A VM state of `config`'s machine, as a source would send it after the last round.
pub fn vm_state(config: &MigrationConfig) -> VmState {
    let vcpu = |i: u64| {
        let mut vcpu = VcpuState {
            cpuid: Vec::new(),
            mp_state: Default::default(),
            regs: Default::default(),
            sregs: Default::default(),
            xsave: Default::default(),
            xcrs: Default::default(),
            debugregs: Default::default(),
            lapic: Default::default(),
            msrs: Vec::new(),
            events: Default::default(),
            tsc_khz: Some(2_400_000),
        };
        vcpu.regs.rip = 0xffff_ffff_8100_0000 + i;
        vcpu
    };
    let transport = |device_type, queues| VirtioTransportState {
        device_type,
        device_features_sel: 0,
        driver_features_sel: 0,
        driver_features: 1 << 32,
        acked_unknown_feature_word: false,
        queue_sel: 0,
        status: 15,
        config_generation: 0,
        interrupt_status: 0,
        activated: true,
        queues: vec![
            QueueState {
                max_size: 256,
                size: 256,
                ready: true,
                desc_table: 0x1000,
                avail_ring: 0x2000,
                used_ring: 0x3000,
                next_avail: 7,
                next_used: 7,
                event_idx_enabled: true,
            };
            queues
        ],
    };
    let m = &config.machine;
    VmState {
        machine: m.clone(),
        memory: MemoryState {
            file: "memory.bin".into(),
            regions: config.regions.clone(),
        },
        vm: KvmVmState {
            pic_master: Default::default(),
            pic_slave: Default::default(),
            ioapic: Default::default(),
            pit: Default::default(),
            clock: Default::default(),
        },
        vcpus: (0..u64::from(m.vcpus)).map(vcpu).collect(),
        devices: DevicesState {
            serial: SerialState {
                baud_divisor_low: 1,
                baud_divisor_high: 0,
                interrupt_enable: 0,
                interrupt_identification: 1,
                line_control: 3,
                line_status: 0x60,
                modem_control: 8,
                modem_status: 0xb0,
                scratch: 0,
                in_buffer: Vec::new(),
            },
            virtio: m
                .drives
                .iter()
                .map(|_| transport(2, 1))
                .chain(m.nets.iter().map(|_| transport(1, 2)))
                .collect(),
        },
    }
}
