//! virtio-blk on a raw image file: opening and locking the image, features and config
//! space, and the request loop of its single queue. Request validation is in `request`,
//! file I/O in `io`.

mod dirty;
mod io;
mod request;
#[cfg(test)]
mod tests;

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::Bytes;

pub use self::dirty::{set_bits, DiskDirty, DIRTY_BLOCK_SIZE};
use self::io::BlockIo;
use self::request::{ParseError, Request, RequestKind};
use super::{
    chain, process_batch, read_config_bytes, warn_limited, DeviceContext, DeviceError,
    VirtioDevice, WarnLimiter, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
};
use crate::GuestMemoryMmap;

const SECTOR_SHIFT: u32 = 9;
/// Logical block size the guest sees.
const SECTOR_SIZE: u64 = 1 << SECTOR_SHIFT;
/// Ring size offered. 512 rather than the usual 256 so that a 1 MiB request made of
/// scattered 4 KiB guest pages (256 segments) fits `seg_max` and reaches the device as one
/// request: at 256, Linux split every 1 MiB O_DIRECT read or write in two, and each request
/// costs a notification, an interrupt and its status/ack exits, which are what dominate
/// nested virtualization.
const QUEUE_SIZE: u16 = 512;
/// Largest data segment the driver may use (config `size_max`).
const SEGMENT_MAX_BYTES: u32 = 64 << 10;
/// Most data segments per request (config `seg_max`): a full ring minus header and status,
/// so a chain never needs to be longer than the queue (the spec forbids that).
const SEGMENTS_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Requests beyond `seg_max * size_max` (32 MiB) come from a driver ignoring the config;
/// refusing them also bounds the bounce buffer.
const MAX_REQUEST_BYTES: u64 = SEGMENTS_MAX as u64 * SEGMENT_MAX_BYTES as u64;
/// Hard cap on data descriptors, including indirect tables larger than the ring.
const MAX_SEGMENTS: usize = 1024;
/// Bytes of `struct virtio_blk_config` we fill: capacity, size_max, seg_max, geometry,
/// blk_size, topology, writeback/num_queues.
const CONFIG_LEN: usize = 36;

/// Host page cache use for a disk image.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CacheMode {
    /// Through the host page cache; the guest's FLUSH becomes `fdatasync`.
    #[default]
    Writeback,
    /// O_DIRECT: bypass the host page cache.
    None,
}

/// How to build a [`Block`] device, from the service spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockConfig {
    /// Drive identifier; the guest reads it as the disk serial (first 20 bytes).
    pub id: String,
    /// Raw image file (or host block device).
    pub path: PathBuf,
    /// Open read-only and offer VIRTIO_BLK_F_RO.
    pub read_only: bool,
    /// Host page cache use.
    pub cache: CacheMode,
}

/// Errors opening a disk image.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// open(2) failed.
    #[error("cannot open disk image {} ({mode}): {source}", path.display())]
    Open {
        /// The image.
        path: PathBuf,
        /// How it was opened.
        mode: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Another process (or device) holds the image.
    #[error("disk image {} is in use by another process (cannot take a {lock} lock)", path.display())]
    Locked {
        /// The image.
        path: PathBuf,
        /// "shared" or "exclusive".
        lock: &'static str,
    },
    /// flock(2) failed for another reason.
    #[error("cannot lock disk image {}: {source}", path.display())]
    Lock {
        /// The image.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The size could not be read.
    #[error("cannot read the size of disk image {}: {source}", path.display())]
    Size {
        /// The image.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The size is not whole sectors.
    #[error("disk image {} size {size} is not a multiple of 512", path.display())]
    UnalignedSize {
        /// The image.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
    },
}

/// A virtio-blk device backed by a raw image.
///
/// It has no state of its own for a snapshot: each request is parsed, executed and
/// completed (status byte and used entry written) within one `process_queue` call on the
/// VMM thread, so when that thread handles a snapshot nothing is in flight. The queue
/// positions live in the transport's state, the data in the image.
pub struct Block {
    id: String,
    path: PathBuf,
    file: File,
    read_only: bool,
    direct: bool,
    /// Disk size in 512-byte sectors.
    capacity: u64,
    serial: [u8; VIRTIO_BLK_ID_BYTES as usize],
    avail_features: u64,
    config: [u8; CONFIG_LEN],
    queue_sizes: [u16; 1],
    descs: Vec<Descriptor>,
    io: BlockIo,
    /// Blocks written since migration last looked.
    dirty: Arc<DiskDirty>,
    warn: WarnLimiter,
}

impl Block {
    /// Opens and locks the image: an exclusive lock for writable images (so two hospes
    /// processes cannot both write one), a shared one for read-only images.
    pub fn new(config: BlockConfig) -> Result<Block, BlockError> {
        let BlockConfig {
            id,
            path,
            read_only,
            cache,
        } = config;
        let direct = cache == CacheMode::None;
        let mode = match (read_only, direct) {
            (true, false) => "read-only",
            (true, true) => "read-only, O_DIRECT (cache = none)",
            (false, false) => "read-write",
            (false, true) => "read-write, O_DIRECT (cache = none)",
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(if direct { libc::O_DIRECT } else { 0 })
            .open(&path)
            .map_err(|source| BlockError::Open {
                path: path.clone(),
                mode,
                source,
            })?;
        lock(&file, &path, read_only)?;
        // Seek rather than metadata: it also gives the size of a host block device.
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|source| BlockError::Size {
                path: path.clone(),
                source,
            })?;
        if size % SECTOR_SIZE != 0 {
            return Err(BlockError::UnalignedSize { path, size });
        }
        let capacity = size >> SECTOR_SHIFT;

        let mut serial = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let id_bytes = id.as_bytes();
        let n = id_bytes.len().min(serial.len());
        serial[..n].copy_from_slice(&id_bytes[..n]);
        if id_bytes.len() > serial.len() {
            tracing::warn!(
                "drive id {id:?} is longer than {} bytes; the guest sees it truncated",
                serial.len()
            );
        }

        let mut avail_features = VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_SIZE_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE;
        if read_only {
            avail_features |= 1 << VIRTIO_BLK_F_RO;
        }

        let mut config = [0u8; CONFIG_LEN];
        config[0..8].copy_from_slice(&capacity.to_le_bytes());
        config[8..12].copy_from_slice(&SEGMENT_MAX_BYTES.to_le_bytes());
        config[12..16].copy_from_slice(&SEGMENTS_MAX.to_le_bytes());
        config[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());

        tracing::debug!(
            "virtio-blk {id}: {} ({mode}), {capacity} sectors",
            path.display()
        );
        Ok(Block {
            dirty: Arc::new(DiskDirty::new(size)),
            warn: WarnLimiter::new(format!("virtio-blk {id}")),
            id,
            path,
            file,
            read_only,
            direct,
            capacity,
            serial,
            avail_features,
            config,
            queue_sizes: [QUEUE_SIZE],
            descs: Vec::with_capacity(usize::from(QUEUE_SIZE)),
            io: BlockIo::default(),
        })
    }

    /// The blocks the guest wrote since the bitmap was last taken (for migration).
    pub fn dirty(&self) -> Arc<DiskDirty> {
        self.dirty.clone()
    }

    /// The drive identifier from the spec.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Disk size in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Handles one chain and returns the number of bytes written into it.
    fn handle_chain(
        &mut self,
        index: usize,
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
    ) -> Result<u32, DeviceError> {
        let head = chain.head_index();
        let malformed = |reason| DeviceError::MalformedChain {
            index,
            head,
            reason,
        };
        chain::collect(chain, &mut self.descs).map_err(malformed)?;
        // Moved out so `execute` may borrow `self` mutably while the request borrows it.
        let descs = std::mem::take(&mut self.descs);
        let result = match request::parse(&descs, mem, self.capacity) {
            Ok(request) => {
                let (status, written) = self.execute(&request, mem);
                finish(mem, request.status, status).map(|()| written.saturating_add(1))
            }
            Err(ParseError::Invalid { status, reason }) => {
                warn_limited!(self.warn, "request {head} rejected: {reason}");
                finish(mem, status, VIRTIO_BLK_S_IOERR).map(|()| 1)
            }
            Err(ParseError::NoStatus(reason)) => Err(reason),
        };
        self.descs = descs;
        result.map_err(malformed)
    }

    /// Runs a validated request; returns the status and the data bytes written to the guest.
    fn execute(&mut self, request: &Request<'_>, mem: &GuestMemoryMmap) -> (u32, u32) {
        let offset = request.sector << SECTOR_SHIFT;
        let result = match request.kind {
            RequestKind::In => self
                .io
                .read(
                    &self.file,
                    self.direct,
                    mem,
                    request.data,
                    offset,
                    request.data_len,
                )
                .map(|()| request.data_len as u32),
            RequestKind::Out if self.read_only => {
                warn_limited!(
                    self.warn,
                    "guest wrote to read-only disk at sector {}",
                    request.sector
                );
                return (VIRTIO_BLK_S_IOERR, 0);
            }
            RequestKind::Out => self
                .io
                .write(
                    &self.file,
                    self.direct,
                    mem,
                    request.data,
                    offset,
                    request.data_len,
                )
                .map(|()| {
                    self.dirty.mark(offset, request.data_len);
                    0
                }),
            RequestKind::Flush if self.read_only => Ok(0),
            RequestKind::Flush => self.file.sync_data().map(|()| 0),
            RequestKind::GetId => return (VIRTIO_BLK_S_OK, self.write_serial(request, mem)),
            RequestKind::Unsupported(kind) => {
                warn_limited!(self.warn, "unsupported request type {kind}");
                return (VIRTIO_BLK_S_UNSUPP, 0);
            }
        };
        match result {
            Ok(written) => (VIRTIO_BLK_S_OK, written),
            Err(e) => {
                warn_limited!(
                    self.warn,
                    "{:?} of {} bytes at sector {} of {} failed: {e}",
                    request.kind,
                    request.data_len,
                    request.sector,
                    self.path.display()
                );
                (VIRTIO_BLK_S_IOERR, 0)
            }
        }
    }

    fn write_serial(&self, request: &Request<'_>, mem: &GuestMemoryMmap) -> u32 {
        let mut remaining = &self.serial[..];
        let mut written = 0u32;
        for d in request.data {
            if remaining.is_empty() {
                break;
            }
            let n = remaining.len().min(d.len() as usize);
            // Checked by `parse`: the descriptor lies in guest memory.
            if mem.write_slice(&remaining[..n], d.addr()).is_err() {
                break;
            }
            remaining = &remaining[n..];
            written += n as u32;
        }
        written
    }
}

/// Writes the status byte that completes a request.
fn finish(
    mem: &GuestMemoryMmap,
    status_addr: vm_memory::GuestAddress,
    status: u32,
) -> Result<(), &'static str> {
    mem.write_obj(status as u8, status_addr)
        .map_err(|_| "its status byte could not be written")
}

fn lock(file: &File, path: &std::path::Path, read_only: bool) -> Result<(), BlockError> {
    let (operation, lock) = if read_only {
        (libc::LOCK_SH, "shared")
    } else {
        (libc::LOCK_EX, "exclusive")
    };
    // SAFETY: flock on a file descriptor we own; no memory is passed.
    let ret = unsafe { libc::flock(file.as_raw_fd(), operation | libc::LOCK_NB) };
    if ret == 0 {
        return Ok(());
    }
    let source = std::io::Error::last_os_error();
    if source.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Err(BlockError::Locked {
            path: path.to_owned(),
            lock,
        })
    } else {
        Err(BlockError::Lock {
            path: path.to_owned(),
            source,
        })
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `writeback` is writable, and only with VIRTIO_BLK_F_CONFIG_WCE (not offered).
        warn_limited!(
            self.warn,
            "guest wrote {} bytes at config offset {offset:#x}; ignored",
            data.len()
        );
    }

    fn activate(&mut self, ctx: &mut DeviceContext<'_>) -> Result<(), DeviceError> {
        if !ctx.queues.first().is_some_and(|q| q.ready()) {
            return Err(DeviceError::QueueNotReady { index: 0 });
        }
        // Requests posted before DRIVER_OK had their notification dropped.
        self.process_queue(0, ctx)
    }

    fn process_queue(
        &mut self,
        index: usize,
        ctx: &mut DeviceContext<'_>,
    ) -> Result<(), DeviceError> {
        let mem = ctx.mem;
        process_batch(index, ctx, |chain| self.handle_chain(index, chain, mem))
    }

    fn reset(&mut self) {
        // Requests complete synchronously: nothing is in flight.
    }
}
