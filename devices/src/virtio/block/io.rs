//! File I/O for virtio-blk data: `preadv`/`pwritev` straight between the image and guest
//! memory, or through an aligned bounce buffer when O_DIRECT meets unaligned guest buffers.
//!
//! Reads into guest memory mark the dirty bitmap (the direct path explicitly, the bounce
//! path through vm-memory's `write_slice`), so live migration resends those pages.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use virtio_queue::desc::split::Descriptor;
use vm_memory::bitmap::Bitmap;
use vm_memory::volatile_memory::{PtrGuard, PtrGuardMut};
use vm_memory::Bytes;

use super::SECTOR_SIZE;
use crate::virtio::chain::{guest_slices, iovecs_to_read, GuestSlice, IOV_MAX};
use crate::GuestMemoryMmap;

/// Alignment of the bounce buffer; covers 512- and 4096-byte O_DIRECT requirements.
const BOUNCE_ALIGN: usize = 4096;

/// Reusable I/O state of one block device.
#[derive(Debug, Default)]
pub(super) struct BlockIo {
    bounce: Vec<u8>,
}

impl BlockIo {
    /// Reads `len` bytes at `offset` of `file` into the guest buffers `data`.
    pub(super) fn read(
        &mut self,
        file: &File,
        direct: bool,
        mem: &GuestMemoryMmap,
        data: &[Descriptor],
        offset: u64,
        len: u64,
    ) -> io::Result<()> {
        let slices = guest_slices(mem, data).map_err(io::Error::other)?;
        if slices.len() <= IOV_MAX && (!direct || all_aligned(&slices)) {
            let guards: Vec<PtrGuardMut> = slices.iter().map(|s| s.ptr_guard_mut()).collect();
            let mut iovecs: Vec<libc::iovec> = guards
                .iter()
                .map(|g| libc::iovec {
                    iov_base: g.as_ptr().cast(),
                    iov_len: g.len(),
                })
                .collect();
            let result = transfer_all(file, &mut iovecs, offset, Direction::FileToMemory);
            // The kernel wrote straight into guest memory behind vm-memory's back; even a
            // failed read may have written part of it.
            for slice in &slices {
                slice.bitmap().mark_dirty(0, slice.len());
            }
            return result;
        }
        let buf = self.bounce_buffer(len)?;
        let mut iovecs = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        transfer_all(file, &mut iovecs, offset, Direction::FileToMemory)?;
        let mut pos = 0usize;
        for d in data {
            let end = pos + d.len() as usize;
            mem.write_slice(&buf[pos..end], d.addr())
                .map_err(io::Error::other)?;
            pos = end;
        }
        Ok(())
    }

    /// Writes the guest buffers `data` (`len` bytes in total) at `offset` of `file`.
    pub(super) fn write(
        &mut self,
        file: &File,
        direct: bool,
        mem: &GuestMemoryMmap,
        data: &[Descriptor],
        offset: u64,
        len: u64,
    ) -> io::Result<()> {
        let slices = guest_slices(mem, data).map_err(io::Error::other)?;
        if slices.len() <= IOV_MAX && (!direct || all_aligned(&slices)) {
            let guards: Vec<PtrGuard> = slices.iter().map(|s| s.ptr_guard()).collect();
            let mut iovecs = iovecs_to_read(&guards);
            return transfer_all(file, &mut iovecs, offset, Direction::MemoryToFile);
        }
        let buf = self.bounce_buffer(len)?;
        let mut pos = 0usize;
        for d in data {
            let end = pos + d.len() as usize;
            mem.read_slice(&mut buf[pos..end], d.addr())
                .map_err(io::Error::other)?;
            pos = end;
        }
        let mut iovecs = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        transfer_all(file, &mut iovecs, offset, Direction::MemoryToFile)
    }

    /// An aligned `len`-byte window of the reusable bounce buffer.
    fn bounce_buffer(&mut self, len: u64) -> io::Result<&mut [u8]> {
        let len = usize::try_from(len).map_err(io::Error::other)?;
        let needed = len + BOUNCE_ALIGN;
        if self.bounce.len() < needed {
            self.bounce.resize(needed, 0);
        }
        let start = self.bounce.as_ptr().align_offset(BOUNCE_ALIGN);
        self.bounce
            .get_mut(start..start + len)
            .ok_or_else(|| io::Error::other("bounce buffer alignment failed"))
    }
}

fn all_aligned(slices: &[GuestSlice<'_>]) -> bool {
    let align = SECTOR_SIZE as usize;
    slices.iter().all(|s| {
        s.len().is_multiple_of(align) && (s.ptr_guard().as_ptr() as usize).is_multiple_of(align)
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    FileToMemory,
    MemoryToFile,
}

/// `preadv`/`pwritev` until every iovec is done, resuming after short transfers and EINTR.
fn transfer_all(
    file: &File,
    mut iovecs: &mut [libc::iovec],
    mut offset: u64,
    direction: Direction,
) -> io::Result<()> {
    while !iovecs.is_empty() {
        let count = iovecs.len().min(IOV_MAX) as libc::c_int;
        let file_offset = libc::off_t::try_from(offset).map_err(io::Error::other)?;
        let done = match direction {
            // SAFETY: every iovec describes memory that stays mapped for this call: either a
            // guest memory slice (guarded by its PtrGuard in the caller) or the caller's
            // bounce buffer; `count` does not exceed the slice length.
            Direction::FileToMemory => unsafe {
                libc::preadv(file.as_raw_fd(), iovecs.as_ptr(), count, file_offset)
            },
            // SAFETY: as above; pwritev only reads from the buffers.
            Direction::MemoryToFile => unsafe {
                libc::pwritev(file.as_raw_fd(), iovecs.as_ptr(), count, file_offset)
            },
        };
        if done < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if done == 0 {
            return Err(match direction {
                Direction::FileToMemory => io::ErrorKind::UnexpectedEof.into(),
                Direction::MemoryToFile => io::ErrorKind::WriteZero.into(),
            });
        }
        let mut done = done as usize;
        offset += done as u64;
        while let Some(first) = iovecs.first_mut() {
            if done < first.iov_len {
                // SAFETY: `done < iov_len`, so the advanced pointer stays inside the buffer.
                first.iov_base = unsafe { first.iov_base.cast::<u8>().add(done) }.cast();
                first.iov_len -= done;
                break;
            }
            done -= first.iov_len;
            let rest = std::mem::take(&mut iovecs);
            iovecs = &mut rest[1..];
        }
    }
    Ok(())
}
