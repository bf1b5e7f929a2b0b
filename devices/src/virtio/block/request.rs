//! Parsing and validating one virtio-blk request from a collected descriptor chain. All
//! checks on guest-controlled values (directions, lengths, sector ranges, addresses) live
//! here, before any file I/O is attempted.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress};

use super::{MAX_REQUEST_BYTES, MAX_SEGMENTS, SECTOR_SHIFT, SECTOR_SIZE};
use crate::virtio::chain::in_memory;
use crate::GuestMemoryMmap;

/// Size of `struct virtio_blk_outhdr`: type (le32), reserved (le32), sector (le64).
const HEADER_LEN: u32 = 16;

/// What the driver asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum RequestKind {
    In,
    Out,
    Flush,
    GetId,
    Unsupported(u32),
}

/// A validated request: every data descriptor lies in guest memory and has the direction
/// the request type needs; for IN/OUT the sector range lies inside the disk.
#[derive(Debug)]
pub(super) struct Request<'a> {
    pub(super) kind: RequestKind,
    pub(super) sector: u64,
    pub(super) data: &'a [Descriptor],
    pub(super) data_len: u64,
    /// Guest address of the status byte.
    pub(super) status: GuestAddress,
}

/// Why a chain is not a valid request.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum ParseError {
    /// No status byte can be written: the chain cannot be completed properly.
    NoStatus(&'static str),
    /// The status byte is usable; the request fails with VIRTIO_BLK_S_IOERR.
    Invalid {
        status: GuestAddress,
        reason: String,
    },
}

/// Parses `descs` (a complete chain, see `chain::collect`) against a disk of
/// `capacity` sectors.
pub(super) fn parse<'a>(
    descs: &'a [Descriptor],
    mem: &GuestMemoryMmap,
    capacity: u64,
) -> Result<Request<'a>, ParseError> {
    let status = status_address(descs, mem)?;
    let invalid = |reason: String| ParseError::Invalid { status, reason };

    let [header, data @ .., _status] = descs else {
        return Err(invalid("the chain has no request header".into()));
    };
    if header.is_write_only() {
        return Err(invalid(
            "the request header descriptor is device-writable".into(),
        ));
    }
    if header.len() < HEADER_LEN {
        return Err(invalid(format!(
            "the request header descriptor is {} bytes, it needs {HEADER_LEN}",
            header.len()
        )));
    }
    let mut raw = [0u8; HEADER_LEN as usize];
    mem.read_slice(&mut raw, header.addr()).map_err(|_| {
        invalid(format!(
            "the request header at {:#x} is outside guest memory",
            header.addr().0
        ))
    })?;
    let (type_bytes, rest) = raw.split_at(4);
    let request_type = u32::from_le_bytes(type_bytes.try_into().unwrap_or_default());
    let sector = u64::from_le_bytes(rest[4..].try_into().unwrap_or_default());

    let kind = match request_type {
        VIRTIO_BLK_T_IN => RequestKind::In,
        VIRTIO_BLK_T_OUT => RequestKind::Out,
        VIRTIO_BLK_T_FLUSH => RequestKind::Flush,
        VIRTIO_BLK_T_GET_ID => RequestKind::GetId,
        other => RequestKind::Unsupported(other),
    };
    let mut request = Request {
        kind,
        sector,
        data,
        data_len: 0,
        status,
    };
    let device_writes = match kind {
        RequestKind::In | RequestKind::GetId => true,
        RequestKind::Out => false,
        // A flush carries no data; anything else is answered without touching data.
        RequestKind::Flush | RequestKind::Unsupported(_) => return Ok(request),
    };

    if data.len() > MAX_SEGMENTS {
        return Err(invalid(format!(
            "{} data segments, at most {MAX_SEGMENTS} are accepted",
            data.len()
        )));
    }
    for d in data {
        if d.is_write_only() != device_writes {
            return Err(invalid(format!(
                "{kind:?} data descriptor at {:#x} is {}",
                d.addr().0,
                if d.is_write_only() {
                    "device-writable"
                } else {
                    "read-only"
                }
            )));
        }
        if !in_memory(mem, d.addr(), d.len()) {
            return Err(invalid(format!(
                "data descriptor [{:#x}, +{:#x}) is outside guest memory",
                d.addr().0,
                d.len()
            )));
        }
        request.data_len += u64::from(d.len());
    }
    if request.data_len > MAX_REQUEST_BYTES {
        return Err(invalid(format!(
            "{} data bytes, at most {MAX_REQUEST_BYTES} are accepted",
            request.data_len
        )));
    }
    if kind == RequestKind::GetId {
        if data.is_empty() {
            return Err(invalid("GET_ID without a data buffer".into()));
        }
        return Ok(request);
    }
    if !request.data_len.is_multiple_of(SECTOR_SIZE) {
        return Err(invalid(format!(
            "data length {} is not a multiple of {SECTOR_SIZE}",
            request.data_len
        )));
    }
    let end = sector.checked_add(request.data_len >> SECTOR_SHIFT);
    if end.is_none_or(|end| end > capacity) {
        return Err(invalid(format!(
            "sectors {sector}+{} are beyond the disk's {capacity} sectors",
            request.data_len >> SECTOR_SHIFT
        )));
    }
    Ok(request)
}

/// The status byte is the last byte of the last descriptor, which must be device-writable.
fn status_address(descs: &[Descriptor], mem: &GuestMemoryMmap) -> Result<GuestAddress, ParseError> {
    let last = descs
        .last()
        .ok_or(ParseError::NoStatus("the chain is empty"))?;
    if !last.is_write_only() {
        return Err(ParseError::NoStatus(
            "its last descriptor (the status byte) is not device-writable",
        ));
    }
    let offset = last
        .len()
        .checked_sub(1)
        .ok_or(ParseError::NoStatus("its status descriptor has length 0"))?;
    let status = last
        .addr()
        .0
        .checked_add(u64::from(offset))
        .map(GuestAddress)
        .ok_or(ParseError::NoStatus("its status address overflows"))?;
    if !in_memory(mem, status, 1) {
        return Err(ParseError::NoStatus(
            "its status byte is outside guest memory",
        ));
    }
    Ok(status)
}
