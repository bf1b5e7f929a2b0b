//! The encoding of a [`crate::VmState`]: a fixed header outside the payload, then the
//! payload, checked by CRC and size caps before use.
//!
//! The payload's form depends on the format version in the header:
//! - 3, what this build writes: postcard's compact binary form of the serde types, fields
//!   in declaration order, kvm-bindings' structs as their bytes less trailing zeros (see
//!   `hex`). A migration encodes and decodes the state inside the guest's pause. For
//!   the test rig's one-vCPU guest it is 6.4 KB against 13.5 KB of JSON; on a stand-in
//!   state, natively, encoding takes 6.6 µs against 84 and decoding 15 µs against 131
//!   (under the rig's emulation a warm JSON decode of the real state took about 2 ms).
//! - 2: JSON, kvm-bindings' structs as hex strings. Written only for a peer that reads
//!   nothing newer ([`encode_as`], a migration to an older hospes).
//! - 1: JSON, those structs as arrays of byte values. Read, never written.
//!
//! Header, 32 bytes, little-endian:
//!
//! | offset | size | field                                   |
//! |--------|------|-----------------------------------------|
//! | 0      | 8    | magic `HOSPESVM`                        |
//! | 8      | 4    | format version ([`FORMAT_VERSION`])     |
//! | 12     | 4    | flags (none defined: 0)                 |
//! | 16     | 8    | payload length                          |
//! | 24     | 4    | CRC32 of the payload                    |
//! | 28     | 4    | CRC32 of bytes 0..28                    |
//!
//! The header is checked before the payload's length is trusted, the payload's CRC before
//! it is parsed, and the parsed state against [`Caps`] before anything acts on it.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use crate::VmState;

/// The file's first bytes.
pub const MAGIC: [u8; 8] = *b"HOSPESVM";
/// The format version this build writes: the binary payload (module documentation).
pub const FORMAT_VERSION: u32 = 3;
/// The newest version whose payload is JSON, the newest a hospes of migration protocol 2
/// or older reads; [`encode_as`] still writes it.
pub const JSON_FORMAT_VERSION: u32 = 2;
/// The oldest version this build reads: the payload of version 1 differs from version 2's
/// only in the form of kvm-bindings' structs, which the decoder takes either way.
pub const MIN_FORMAT_VERSION: u32 = 1;
/// Size of the fixed header.
pub const HEADER_LEN: usize = 32;
/// The largest payload we read: far above any state within [`Caps`].
pub const MAX_PAYLOAD: u64 = 64 << 20;

/// Errors encoding, decoding, reading or writing a VM state.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// Not even a header.
    #[error("truncated: {0} bytes, header needs {HEADER_LEN}")]
    TruncatedHeader(usize),
    /// Not our file.
    #[error("not a hospes VM state: magic is \"{}\", expected \"HOSPESVM\"", .0.escape_ascii())]
    BadMagic([u8; 8]),
    /// The header itself is damaged.
    #[error("corrupted: header CRC is {computed:#010x}, header says {stored:#010x}")]
    HeaderCrc {
        /// CRC stored in the header.
        stored: u32,
        /// CRC of the header bytes as read.
        computed: u32,
    },
    /// Written by another version of hospes.
    #[error("unsupported format version {found}, this build reads versions {oldest} to {newest}")]
    UnsupportedVersion {
        /// Version in the header.
        found: u32,
        /// [`MIN_FORMAT_VERSION`].
        oldest: u32,
        /// [`FORMAT_VERSION`].
        newest: u32,
    },
    /// Flags this build does not know.
    #[error("unsupported format flags {0:#x}")]
    UnknownFlags(u32),
    /// The payload is larger than any state we accept.
    #[error("payload of {len} bytes is over the limit of {MAX_PAYLOAD} bytes")]
    PayloadTooLarge {
        /// Payload length (from the header when decoding).
        len: u64,
    },
    /// Fewer payload bytes than the header says.
    #[error("truncated: header says payload of {expected} bytes, file has {actual}")]
    TruncatedPayload {
        /// Length in the header.
        expected: u64,
        /// Bytes after the header.
        actual: u64,
    },
    /// More payload bytes than the header says.
    #[error("trailing data: header says payload of {expected} bytes, file has {actual}")]
    TrailingData {
        /// Length in the header.
        expected: u64,
        /// Bytes after the header.
        actual: u64,
    },
    /// The payload is damaged.
    #[error("corrupted: payload CRC is {computed:#010x}, header says {stored:#010x}")]
    PayloadCrc {
        /// CRC stored in the header.
        stored: u32,
        /// CRC of the payload as read.
        computed: u32,
    },
    /// The JSON payload (versions 1 and 2) is not a `VmState` (serde_json's message names
    /// line and column).
    #[error("payload is not a valid VM state: {0}")]
    Json(#[source] serde_json::Error),
    /// The binary payload (version 3) is not a `VmState`.
    #[error("payload is not a valid VM state: {0}")]
    Binary(#[source] postcard::Error),
    /// The binary payload holds a whole state and then more.
    #[error("payload is not a valid VM state: {0} bytes follow the state")]
    TrailingState(usize),
    /// The state could not be serialized as JSON.
    #[error("cannot serialize the VM state: {0}")]
    Serialize(#[source] serde_json::Error),
    /// The state could not be serialized in binary form.
    #[error("cannot serialize the VM state: {0}")]
    SerializeBinary(#[source] postcard::Error),
    /// Asked to write a format version this build does not write.
    #[error("cannot write format version {0}: this build writes {JSON_FORMAT_VERSION} and {FORMAT_VERSION}")]
    UnwritableVersion(u32),
    /// A collection or string is over its cap.
    #[error("too many {what}: {count}, at most {cap}")]
    OverCap {
        /// What was counted.
        what: &'static str,
        /// How many there are.
        count: u64,
        /// The cap.
        cap: u64,
    },
    /// A value that is not too big but wrong.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// What is wrong.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// Reading the state file failed.
    #[error("cannot read {}: {source}", .path.display())]
    Read {
        /// The state file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// Writing the state file failed.
    #[error("cannot write {}: {source}", .path.display())]
    Write {
        /// The state file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
}

/// [`encode`] then [`decode`]: the whole codec once, on `state` (for instance
/// [`VmState::stand_in`]), before the moment it matters. A code path's first run pays
/// for page faults on the binary's text (major ones if it is not in the page cache) and,
/// under emulation, for translating it: measured in the test rig, a first decode of a
/// 13 KB state took 28 ms, the next one 2 ms.
pub fn rehearse(state: &VmState) -> Result<VmState, FormatError> {
    decode(&encode(state)?)
}

/// Encodes `state` with its header, in [`FORMAT_VERSION`]. Refuses a state that
/// [`decode`] would refuse.
pub fn encode(state: &VmState) -> Result<Vec<u8>, FormatError> {
    encode_as(state, FORMAT_VERSION)
}

/// Encodes `state` with its header in format `version`: [`FORMAT_VERSION`], or
/// [`JSON_FORMAT_VERSION`] for a reader that knows nothing newer. Refuses a state that
/// [`decode`] would refuse.
pub fn encode_as(state: &VmState, version: u32) -> Result<Vec<u8>, FormatError> {
    Caps::check(state)?;
    let payload = match version {
        FORMAT_VERSION => postcard::to_stdvec(state).map_err(FormatError::SerializeBinary)?,
        JSON_FORMAT_VERSION => serde_json::to_vec(state).map_err(FormatError::Serialize)?,
        other => return Err(FormatError::UnwritableVersion(other)),
    };
    if payload.len() as u64 > MAX_PAYLOAD {
        return Err(FormatError::PayloadTooLarge {
            len: payload.len() as u64,
        });
    }
    Ok(frame(version, &payload))
}

/// Header (of format `version`) + payload, with no check of the payload.
fn frame(version: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    let header_crc = crc32fast::hash(&out);
    out.extend_from_slice(&header_crc.to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Decodes and checks a state written by [`encode`] or [`encode_as`], of any format version
/// from [`MIN_FORMAT_VERSION`] to [`FORMAT_VERSION`].
pub fn decode(bytes: &[u8]) -> Result<VmState, FormatError> {
    let Some((header, payload)) = bytes.split_first_chunk::<HEADER_LEN>() else {
        return Err(FormatError::TruncatedHeader(bytes.len()));
    };
    let u32_at = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().unwrap());
    let magic: [u8; 8] = header[..8].try_into().unwrap();
    if magic != MAGIC {
        return Err(FormatError::BadMagic(magic));
    }
    // The version before the header CRC: another version may lay its header out
    // differently, and "written by another format version" is what its user needs to hear.
    if !(MIN_FORMAT_VERSION..=FORMAT_VERSION).contains(&u32_at(8)) {
        return Err(FormatError::UnsupportedVersion {
            found: u32_at(8),
            oldest: MIN_FORMAT_VERSION,
            newest: FORMAT_VERSION,
        });
    }
    let (stored, computed) = (u32_at(28), crc32fast::hash(&header[..28]));
    if stored != computed {
        return Err(FormatError::HeaderCrc { stored, computed });
    }
    if u32_at(12) != 0 {
        return Err(FormatError::UnknownFlags(u32_at(12)));
    }
    let expected = u64::from_le_bytes(header[16..24].try_into().unwrap());
    if expected > MAX_PAYLOAD {
        return Err(FormatError::PayloadTooLarge { len: expected });
    }
    let actual = payload.len() as u64;
    if actual < expected {
        return Err(FormatError::TruncatedPayload { expected, actual });
    }
    if actual > expected {
        return Err(FormatError::TrailingData { expected, actual });
    }
    let (stored, computed) = (u32_at(24), crc32fast::hash(payload));
    if stored != computed {
        return Err(FormatError::PayloadCrc { stored, computed });
    }
    let state: VmState = if u32_at(8) <= JSON_FORMAT_VERSION {
        serde_json::from_slice(payload).map_err(FormatError::Json)?
    } else {
        let (state, rest) = postcard::take_from_bytes(payload).map_err(FormatError::Binary)?;
        if !rest.is_empty() {
            return Err(FormatError::TrailingState(rest.len()));
        }
        state
    };
    Caps::check(&state)?;
    Ok(state)
}

/// Reads and decodes a state file.
pub fn read_state_file(path: &Path) -> Result<VmState, FormatError> {
    let bytes = read_bounded(path).map_err(|source| FormatError::Read {
        path: path.to_owned(),
        source,
    })?;
    decode(&bytes)
}

/// Reads at most one byte more than the largest valid file, so that pointing us at a
/// huge file costs nothing and still fails in [`decode`].
pub(crate) fn read_bounded(path: &Path) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    File::open(path)?
        .take(HEADER_LEN as u64 + MAX_PAYLOAD + 1)
        .read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Encodes `state` into a new file at `path`, replacing any file there. Not synced:
/// [`crate::SnapshotWriter::commit`] syncs every file of a snapshot.
pub fn write_state_file(path: &Path, state: &VmState) -> Result<(), FormatError> {
    let bytes = encode(state)?;
    File::create(path)
        .and_then(|mut f| f.write_all(&bytes))
        .map_err(|source| FormatError::Write {
            path: path.to_owned(),
            source,
        })
}

/// The limits on a decoded state. Each is far above what hospes creates and small enough
/// that acting on a state within them cannot exhaust memory or descriptors.
pub struct Caps;

impl Caps {
    /// vCPUs.
    pub const VCPUS: u64 = 32;
    /// MSRs per vCPU.
    pub const MSRS: u64 = 1024;
    /// CPUID entries per vCPU.
    pub const CPUID_ENTRIES: u64 = 256;
    /// virtio-mmio transports (drives + nets).
    pub const VIRTIO_TRANSPORTS: u64 = 19;
    /// Queues per virtio transport.
    pub const QUEUES: u64 = 8;
    /// Bytes in the serial receive FIFO.
    pub const SERIAL_IN_BUFFER: u64 = 64;
    /// Guest memory regions (below and above the 32-bit gap).
    pub const MEMORY_REGIONS: u64 = 2;
    /// Guest RAM in MiB.
    pub const MEMORY_MIB: u64 = 65536;
    /// Bytes in any string.
    pub const STRING_BYTES: u64 = 4096;
    /// Alignment of memory regions.
    pub const PAGE_SIZE: u64 = 4096;

    /// Checks every cap and the consistency between configuration and state.
    pub fn check(state: &VmState) -> Result<(), FormatError> {
        let m = &state.machine;
        cap("vCPUs", state.vcpus.len(), Self::VCPUS)?;
        if m.vcpus as usize != state.vcpus.len() || m.vcpus == 0 {
            return invalid(
                "vCPU count",
                format!("machine has {}, state has {}", m.vcpus, state.vcpus.len()),
            );
        }
        for vcpu in &state.vcpus {
            cap("MSRs in a vCPU", vcpu.msrs.len(), Self::MSRS)?;
            cap(
                "CPUID entries in a vCPU",
                vcpu.cpuid.len(),
                Self::CPUID_ENTRIES,
            )?;
        }

        let devices = &state.devices;
        cap(
            "virtio transports",
            devices.virtio.len(),
            Self::VIRTIO_TRANSPORTS,
        )?;
        if devices.virtio.len() != m.drives.len() + m.nets.len() {
            return invalid(
                "virtio transports",
                format!(
                    "{} transports for {} drives and {} nets",
                    devices.virtio.len(),
                    m.drives.len(),
                    m.nets.len()
                ),
            );
        }
        for transport in &devices.virtio {
            cap(
                "queues in a virtio transport",
                transport.queues.len(),
                Self::QUEUES,
            )?;
        }
        cap(
            "bytes in the serial input buffer",
            devices.serial.in_buffer.len(),
            Self::SERIAL_IN_BUFFER,
        )?;

        Self::check_memory(state)?;

        cap("bytes in the name", m.name.len(), Self::STRING_BYTES)?;
        cap(
            "bytes in the command line",
            m.cmdline.len(),
            Self::STRING_BYTES,
        )?;
        let mut files = HashSet::new();
        check_file_name(&state.memory.file, &mut files)?;
        for drive in &m.drives {
            cap("bytes in a drive id", drive.id.len(), Self::STRING_BYTES)?;
            cap(
                "bytes in a drive cache mode",
                drive.cache.len(),
                Self::STRING_BYTES,
            )?;
            check_file_name(&drive.file, &mut files)?;
        }
        for net in &m.nets {
            cap("bytes in a net id", net.id.len(), Self::STRING_BYTES)?;
            cap("bytes in a TAP name", net.tap.len(), Self::STRING_BYTES)?;
        }
        Ok(())
    }

    fn check_memory(state: &VmState) -> Result<(), FormatError> {
        let regions = &state.memory.regions;
        let mib = u64::from(state.machine.memory_mib);
        cap("MiB of guest memory", mib, Self::MEMORY_MIB)?;
        cap("memory regions", regions.len(), Self::MEMORY_REGIONS)?;
        if regions.is_empty() {
            return invalid("memory regions", "there are none".into());
        }
        let (mut total, mut next_free) = (0u64, 0u64);
        for &(gpa, size) in regions {
            let end = gpa.checked_add(size);
            if size == 0 || gpa % Self::PAGE_SIZE != 0 || size % Self::PAGE_SIZE != 0 {
                return invalid(
                    "memory region",
                    format!("{size:#x} bytes at {gpa:#x} is empty or not 4 KiB aligned"),
                );
            }
            if gpa < next_free || end.is_none() {
                return invalid(
                    "memory region",
                    format!("{size:#x} bytes at {gpa:#x} overlaps or is out of order"),
                );
            }
            next_free = end.unwrap_or(u64::MAX);
            // Cannot overflow: each size is below 2^64 - gpa and the regions are disjoint.
            total += size;
        }
        if total != mib << 20 {
            return invalid(
                "memory regions",
                format!("they total {total} bytes, the machine has {mib} MiB"),
            );
        }
        Ok(())
    }
}

fn cap(what: &'static str, count: impl TryInto<u64>, cap: u64) -> Result<(), FormatError> {
    let count = count.try_into().unwrap_or(u64::MAX);
    if count > cap {
        return Err(FormatError::OverCap { what, count, cap });
    }
    Ok(())
}

fn invalid(what: &'static str, reason: String) -> Result<(), FormatError> {
    Err(FormatError::Invalid { what, reason })
}

/// A file inside the snapshot directory: a plain name, unique among the snapshot's files.
fn check_file_name<'a>(name: &'a str, seen: &mut HashSet<&'a str>) -> Result<(), FormatError> {
    cap("bytes in a file name", name.len(), Caps::STRING_BYTES)?;
    if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) {
        return invalid("file name", format!("{name:?} is not a plain file name"));
    }
    if name == crate::dir::STATE_FILE {
        return invalid("file name", format!("{name:?} is the state file's name"));
    }
    if !seen.insert(name) {
        return invalid("file name", format!("{name:?} is used twice"));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::*;
    use kvm_bindings::{kvm_cpuid_entry2, kvm_msr_entry};

    /// A state like a 2-vCPU, 512 MiB VM with one drive and one net would save.
    pub(crate) fn sample_state() -> VmState {
        let machine = MachineConfig {
            name: "web".into(),
            vcpus: 2,
            memory_mib: 512,
            cmdline: "console=ttyS0 reboot=k panic=1".into(),
            drives: vec![DriveConfig {
                id: "root".into(),
                file: "root.img".into(),
                size: 64 << 20,
                read_only: false,
                cache: "writeback".into(),
            }],
            nets: vec![NetConfig {
                id: "eth0".into(),
                tap: "tap0".into(),
                mac: [2, 0, 0, 0, 0, 1],
            }],
        };
        let mut state = VmState::stand_in(machine, vec![(0, 512 << 20)]);
        for (i, vcpu) in (0u32..).zip(&mut state.vcpus) {
            vcpu.cpuid = (0..40)
                .map(|f| kvm_cpuid_entry2 {
                    function: f,
                    eax: 0x1234 + i,
                    ..Default::default()
                })
                .collect();
            vcpu.regs.rip = 0xffff_ffff_8100_0000 + u64::from(i);
            vcpu.msrs = (0..60)
                .map(|n| kvm_msr_entry {
                    index: 0xc000_0080 + n,
                    data: u64::from(n) << 32,
                    ..Default::default()
                })
                .collect();
            vcpu.tsc_khz = Some(2_400_000);
        }
        state.vm.pic_slave.chip_id = 1;
        state.vm.ioapic.chip_id = 2;
        state.vm.clock.clock = 123_456_789;
        state.devices.serial.interrupt_enable = 1;
        state.devices.serial.in_buffer = b"ls\n".to_vec();
        state.devices.virtio[0].queues.truncate(1);
        for transport in &mut state.devices.virtio {
            transport.status = 15;
            transport.driver_features = 1 << 32;
            for queue in &mut transport.queues {
                (queue.next_avail, queue.next_used) = (17, 17);
            }
        }
        state
    }

    #[test]
    fn a_stand_in_passes_every_check_of_decode() {
        let machine = sample_state().machine;
        let state = VmState::stand_in(machine.clone(), vec![(0, 512 << 20)]);
        let back = rehearse(&state).unwrap();
        assert_eq!(back.machine, machine);
        assert_eq!(back.vcpus.len(), 2);
        assert_eq!(back.devices.virtio.len(), 2);
        assert_eq!(back.devices.virtio[0].device_type, 2);
        assert_eq!(back.devices.virtio[1].device_type, 1);
    }

    /// `bytes` with the header field at `at` replaced and the header CRC recomputed.
    fn patch_header(mut bytes: Vec<u8>, at: usize, field: &[u8]) -> Vec<u8> {
        bytes[at..at + field.len()].copy_from_slice(field);
        let crc = crc32fast::hash(&bytes[..28]);
        bytes[28..32].copy_from_slice(&crc.to_le_bytes());
        bytes
    }

    /// Encodes without the cap check, as a hostile or buggy writer would.
    fn encode_unchecked(state: &VmState) -> Vec<u8> {
        frame(FORMAT_VERSION, &postcard::to_stdvec(state).unwrap())
    }

    #[test]
    fn round_trip() {
        let state = sample_state();
        let bytes = encode(&state).unwrap();
        assert_eq!(&bytes[..8], b"HOSPESVM");
        let back = decode(&bytes).unwrap();
        assert_eq!(back.machine, state.machine);
        assert_eq!(back.memory, state.memory);
        assert_eq!(back.devices, state.devices);
        assert_eq!(back.vcpus[1].regs.rip, state.vcpus[1].regs.rip);
        assert_eq!(back.vcpus[1].msrs[59].data, 59 << 32);
        assert_eq!(back.vm.clock.clock, 123_456_789);
        assert_eq!(encode(&back).unwrap(), bytes);
    }

    #[test]
    fn truncated() {
        let bytes = encode(&sample_state()).unwrap();
        for len in [0, 1, 8, 31] {
            let err = decode(&bytes[..len]).unwrap_err();
            assert!(
                matches!(err, FormatError::TruncatedHeader(n) if n == len),
                "{err}"
            );
            assert_eq!(
                err.to_string(),
                format!("truncated: {len} bytes, header needs 32")
            );
        }
        let payload = bytes.len() as u64 - 32;
        for len in [32, 33, bytes.len() / 2, bytes.len() - 1] {
            let err = decode(&bytes[..len]).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!(
                    "truncated: header says payload of {payload} bytes, file has {}",
                    len - 32
                )
            );
        }
        let mut longer = bytes.clone();
        longer.push(b'\n');
        let err = decode(&longer).unwrap_err();
        assert!(matches!(err, FormatError::TrailingData { .. }), "{err}");
    }

    #[test]
    fn corrupted() {
        let bytes = encode(&sample_state()).unwrap();

        let mut bad = bytes.clone();
        bad[bytes.len() - 100] ^= 0x08;
        let err = decode(&bad).unwrap_err();
        assert!(matches!(err, FormatError::PayloadCrc { .. }), "{err}");
        assert!(
            err.to_string().starts_with("corrupted: payload CRC"),
            "{err}"
        );

        // The version field is read before the header CRC (see `decode`).
        for at in [12, 16, 20, 24, 30] {
            let mut bad = bytes.clone();
            bad[at] ^= 0x01;
            let err = decode(&bad).unwrap_err();
            assert!(matches!(err, FormatError::HeaderCrc { .. }), "{at}: {err}");
        }
        let mut bad = bytes.clone();
        bad[8] ^= 0x04;
        let err = decode(&bad).unwrap_err();
        assert!(
            matches!(err, FormatError::UnsupportedVersion { found: 7, .. }),
            "{err}"
        );

        let mut bad = bytes.clone();
        bad[..8].copy_from_slice(b"\x7fELF\x02\x01\x01\x00");
        let err = decode(&bad).unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"not a hospes VM state: magic is "\x7fELF\x02\x01\x01\x00", expected "HOSPESVM""#
        );
    }

    /// A state as format version 1 wrote it: kvm-bindings' structs as arrays of numbers.
    fn encode_v1(state: &VmState) -> Vec<u8> {
        let mut json = serde_json::to_value(state).unwrap();
        let vm = &state.vm;
        json["vm"] = serde_json::json!({
            "pic_master": vm.pic_master, "pic_slave": vm.pic_slave, "ioapic": vm.ioapic,
            "pit": vm.pit, "clock": vm.clock,
        });
        for (i, v) in state.vcpus.iter().enumerate() {
            let old = serde_json::json!({
                "cpuid": v.cpuid, "mp_state": v.mp_state, "regs": v.regs, "sregs": v.sregs,
                "xsave": v.xsave, "xcrs": v.xcrs, "debugregs": v.debugregs, "lapic": v.lapic,
                "msrs": v.msrs, "events": v.events, "tsc_khz": v.tsc_khz,
            });
            json["vcpus"][i] = old;
        }
        assert!(json["vcpus"][0]["xsave"].is_array());
        let payload = serde_json::to_vec(&json).unwrap();
        frame(1, &payload)
    }

    #[test]
    fn reads_format_versions_1_and_2() {
        let state = sample_state();
        let v3 = encode(&state).unwrap();
        let v2 = encode_as(&state, JSON_FORMAT_VERSION).unwrap();
        assert_eq!(v2[8..12], 2u32.to_le_bytes());
        assert_eq!(v2[32], b'{', "version 2 is JSON");
        let v1 = encode_v1(&state);
        assert!(
            v1.len() > v2.len() * 3 / 2,
            "hex is the compact form: v1 {} bytes, v2 {}",
            v1.len(),
            v2.len()
        );
        for old in [v1, v2] {
            let back = decode(&old).unwrap();
            assert_eq!(encode(&back).unwrap(), v3, "the same state either way");
        }
    }

    #[test]
    fn version_3_is_binary_and_compact() {
        let state = sample_state();
        let v3 = encode(&state).unwrap();
        let v2 = encode_as(&state, JSON_FORMAT_VERSION).unwrap();
        assert_eq!(v3[8..12], 3u32.to_le_bytes());
        assert!(
            v3.len() * 2 < v2.len(),
            "binary: v3 {} bytes, v2 {}",
            v3.len(),
            v2.len()
        );
        let back = decode(&v3).unwrap();
        assert_eq!(back.vcpus[1].xsave.region, state.vcpus[1].xsave.region);
        assert_eq!(back.vcpus[0].cpuid.len(), state.vcpus[0].cpuid.len());
        let err = encode_as(&state, 1).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot write format version 1: this build writes 2 and 3"
        );
    }

    #[test]
    fn binary_payload_errors() {
        let payload = postcard::to_stdvec(&sample_state()).unwrap();
        let mut longer = payload.clone();
        longer.extend_from_slice(&[0, 0, 0]);
        let err = decode(&frame(FORMAT_VERSION, &longer)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "payload is not a valid VM state: 3 bytes follow the state"
        );
        let err = decode(&frame(FORMAT_VERSION, &payload[..payload.len() / 2])).unwrap_err();
        assert!(matches!(err, FormatError::Binary(_)), "{err}");
        assert!(err
            .to_string()
            .starts_with("payload is not a valid VM state: "));
        // A JSON payload under the binary version's header is not taken for JSON.
        let json = serde_json::to_vec(&sample_state()).unwrap();
        let err = decode(&frame(FORMAT_VERSION, &json)).unwrap_err();
        assert!(matches!(err, FormatError::Binary(_)), "{err}");
    }

    #[test]
    fn version_flags_and_length_in_header() {
        let bytes = encode(&sample_state()).unwrap();
        let err = decode(&patch_header(bytes.clone(), 8, &4u32.to_le_bytes())).unwrap_err();
        assert_eq!(
            err.to_string(),
            "unsupported format version 4, this build reads versions 1 to 3"
        );
        let err = decode(&patch_header(bytes.clone(), 8, &0u32.to_le_bytes())).unwrap_err();
        assert!(
            matches!(err, FormatError::UnsupportedVersion { found: 0, .. }),
            "{err}"
        );
        let err = decode(&patch_header(bytes.clone(), 12, &1u32.to_le_bytes())).unwrap_err();
        assert!(matches!(err, FormatError::UnknownFlags(1)), "{err}");
        let huge = (MAX_PAYLOAD + 1).to_le_bytes();
        let err = decode(&patch_header(bytes, 16, &huge)).unwrap_err();
        assert!(matches!(err, FormatError::PayloadTooLarge { .. }), "{err}");
    }

    #[test]
    fn json_error_names_line_and_column() {
        let err = decode(&frame(JSON_FORMAT_VERSION, b"{\"machine\": 3}")).unwrap_err();
        assert!(matches!(err, FormatError::Json(_)), "{err}");
        assert!(err.to_string().contains("line 1 column"), "{err}");
    }

    /// Each mutation breaks one cap; `encode` and `decode` both refuse it.
    #[test]
    fn caps() {
        type Mutation = fn(&mut VmState);
        fn long() -> String {
            "x".repeat(4097)
        }
        let cases: Vec<(&str, Mutation)> = vec![
            ("too many vCPUs: 33", |s| {
                s.vcpus = (0..33)
                    .map(|_| sample_state().vcpus.pop().unwrap())
                    .collect();
                s.machine.vcpus = 33;
            }),
            ("invalid vCPU count", |s| s.machine.vcpus = 3),
            ("too many MSRs in a vCPU: 1025", |s| {
                s.vcpus[0].msrs = vec![Default::default(); 1025]
            }),
            ("too many CPUID entries in a vCPU: 257", |s| {
                s.vcpus[1].cpuid = vec![Default::default(); 257]
            }),
            ("too many virtio transports: 20", |s| {
                s.devices.virtio = vec![s.devices.virtio[0].clone(); 20]
            }),
            ("invalid virtio transports", |s| {
                s.devices.virtio.pop();
            }),
            ("too many queues in a virtio transport: 9", |s| {
                s.devices.virtio[1].queues = vec![s.devices.virtio[1].queues[0]; 9]
            }),
            ("too many bytes in the serial input buffer: 65", |s| {
                s.devices.serial.in_buffer = vec![b'a'; 65]
            }),
            ("too many memory regions: 3", |s| {
                s.memory.regions = vec![(0, 1 << 20), (1 << 20, 1 << 20), (4 << 30, 510 << 20)]
            }),
            ("invalid memory regions: there are none", |s| {
                s.memory.regions.clear()
            }),
            ("invalid memory region", |s| {
                s.memory.regions = vec![(0, 0), (0, 512 << 20)]
            }),
            ("invalid memory region", |s| {
                s.memory.regions = vec![(0, (512 << 20) - 512), (1 << 32, 512)]
            }),
            ("invalid memory region", |s| {
                s.memory.regions = vec![(0, 256 << 20), (128 << 20, 256 << 20)]
            }),
            ("invalid memory regions: they total", |s| {
                s.memory.regions = vec![(0, 256 << 20)]
            }),
            ("too many MiB of guest memory: 65537", |s| {
                s.machine.memory_mib = 65537
            }),
            ("too many bytes in the name: 4097", |s| {
                s.machine.name = long()
            }),
            ("too many bytes in the command line", |s| {
                s.machine.cmdline = long()
            }),
            ("too many bytes in a drive id", |s| {
                s.machine.drives[0].id = long()
            }),
            ("too many bytes in a TAP name", |s| {
                s.machine.nets[0].tap = long()
            }),
            ("too many bytes in a file name", |s| {
                s.machine.drives[0].file = long()
            }),
            ("invalid file name: \"../etc\"", |s| {
                s.machine.drives[0].file = "../etc".into()
            }),
            ("invalid file name: \"a/b\"", |s| {
                s.machine.drives[0].file = "a/b".into()
            }),
            ("invalid file name: \"..\"", |s| s.memory.file = "..".into()),
            ("invalid file name: \".\"", |s| s.memory.file = ".".into()),
            ("invalid file name: \"\"", |s| s.memory.file = "".into()),
            ("invalid file name: \"memory.bin\" is used twice", |s| {
                s.machine.drives[0].file = "memory.bin".into()
            }),
            (
                "invalid file name: \"state.bin\" is the state file's name",
                |s| s.memory.file = "state.bin".into(),
            ),
        ];
        for (expected, mutate) in cases {
            let mut state = sample_state();
            mutate(&mut state);
            let err = encode(&state).unwrap_err().to_string();
            assert!(err.starts_with(expected), "{expected}: {err}");
            let err = decode(&encode_unchecked(&state)).unwrap_err().to_string();
            assert!(err.starts_with(expected), "{expected}: {err}");
        }
    }

    #[test]
    fn state_file() {
        let path = crate::test_util::temp_path("state");
        let _cleanup = crate::test_util::RemoveOnDrop(path.clone());
        write_state_file(&path, &sample_state()).unwrap();
        assert_eq!(read_state_file(&path).unwrap().machine.name, "web");
        std::fs::remove_file(&path).unwrap();
        let err = read_state_file(&path).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("cannot read {}", path.display())),
            "{err}"
        );
    }
}
