//! virtio-net receive: frames from the TAP into the guest's rx buffers, spread over several
//! chains when mergeable rx buffers are negotiated. While the guest has no (or too few)
//! buffers posted, the frame is held back rather than dropped, and the TAP is not read
//! again until the guest notifies the rx queue.

use std::io;
use std::sync::atomic::{fence, Ordering};

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::{mergeable, Net, NUM_BUFFERS_OFFSET, RX_QUEUE, VNET_HDR_LEN};
use crate::virtio::{chain, warn_limited, DeviceContext, DeviceError};
use crate::GuestMemoryMmap;

/// Size of the used ring's flags + idx fields, and of one used element.
const USED_RING_HEADER: u64 = 4;
const USED_ELEMENT: u64 = 8;

enum Delivery {
    /// The frame is in the guest (or was dropped as undeliverable).
    Done,
    /// Not enough rx buffers: the frame stays pending.
    NoBuffers,
}

/// A stretch of guest memory holding frame bytes `frame_offset..frame_offset + len`.
#[derive(Clone, Copy)]
struct Segment {
    addr: GuestAddress,
    frame_offset: usize,
    len: usize,
}

impl Net {
    /// Moves frames from the TAP into the guest until the TAP is drained or rx buffers run
    /// out, then interrupts the guest if EVENT_IDX says it wants it.
    pub(super) fn process_rx(&mut self, ctx: &mut DeviceContext<'_>) -> Result<(), DeviceError> {
        let mem = ctx.mem;
        let Some(queue) = ctx.queues.get_mut(RX_QUEUE) else {
            return Ok(());
        };
        if !queue.ready() {
            return Ok(());
        }
        let result = self.rx_loop(queue, mem);
        match queue.needs_notification(mem) {
            Ok(true) => ctx.interrupt.signal_used_ring(),
            Ok(false) => {}
            Err(source) => {
                result?;
                return Err(DeviceError::Queue {
                    index: RX_QUEUE,
                    source,
                });
            }
        }
        result
    }

    fn rx_loop(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<(), DeviceError> {
        loop {
            if self.rx_len == 0 {
                match self.tap.read_frame(&mut self.rx_frame) {
                    Ok(n) if n > VNET_HDR_LEN => self.rx_len = n,
                    Ok(0) => return Ok(()),
                    Ok(n) => {
                        warn_limited!(self.warn, "dropped a {n}-byte read from the TAP: no frame");
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        // Edge-triggered: returning cannot spin; the next frame retries.
                        warn_limited!(self.warn, "reading TAP {} failed: {e}", self.tap.name());
                        return Ok(());
                    }
                }
            }
            match self.deliver(queue, mem)? {
                Delivery::Done => self.rx_len = 0,
                Delivery::NoBuffers => {
                    if !enable_rx_notification(queue, mem)? {
                        return Ok(());
                    }
                    // Buffers arrived while notifications were being enabled: retry.
                }
            }
        }
    }

    /// Copies the pending frame into as many rx chains as it needs, or none if not enough
    /// are available (chains already taken are put back).
    fn deliver(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<Delivery, DeviceError> {
        let frame_len = self.rx_len;
        let mrg = mergeable(self.acked_features);
        let mut used: Vec<(u16, u32)> = Vec::new();
        let mut header: Vec<Segment> = Vec::new();
        let mut written = 0usize;
        while written < frame_len {
            let next = queue
                .iter(mem)
                .map_err(|source| DeviceError::Queue {
                    index: RX_QUEUE,
                    source,
                })?
                .next();
            let Some(chain) = next else {
                for _ in 0..used.len() {
                    queue.go_to_previous_position();
                }
                return Ok(Delivery::NoBuffers);
            };
            let head = chain.head_index();
            let malformed = |reason| DeviceError::MalformedChain {
                index: RX_QUEUE,
                head,
                reason,
            };
            chain::collect(chain, &mut self.descs).map_err(malformed)?;
            let mut chain_written = 0usize;
            for d in &self.descs {
                if written == frame_len {
                    break;
                }
                if !d.is_write_only() {
                    return Err(malformed("an rx buffer is not device-writable"));
                }
                if !chain::in_memory(mem, d.addr(), d.len()) {
                    return Err(malformed("an rx buffer is outside guest memory"));
                }
                let n = (d.len() as usize).min(frame_len - written);
                mem.write_slice(&self.rx_frame[written..written + n], d.addr())
                    .map_err(|_| malformed("an rx buffer could not be written"))?;
                if written < VNET_HDR_LEN {
                    header.push(Segment {
                        addr: d.addr(),
                        frame_offset: written,
                        len: n,
                    });
                }
                written += n;
                chain_written += n;
            }
            // `chain_written` <= MAX_FRAME_LEN, far below u32::MAX.
            used.push((head, chain_written as u32));
            if !mrg && written < frame_len {
                warn_limited!(
                    self.warn,
                    "dropped a {frame_len}-byte frame: rx buffer {head} holds only {written} bytes \
                     and mergeable rx buffers were not negotiated"
                );
                queue
                    .add_used(mem, head, 0)
                    .map_err(|source| DeviceError::Queue {
                        index: RX_QUEUE,
                        source,
                    })?;
                return Ok(Delivery::Done);
            }
        }

        // num_buffers is only known now; the TAP left those two header bytes unset.
        let num_buffers = (used.len() as u16).to_le_bytes();
        write_frame_bytes(mem, &header, NUM_BUFFERS_OFFSET, &num_buffers).map_err(|_| {
            DeviceError::MalformedChain {
                index: RX_QUEUE,
                head: used.first().map_or(0, |u| u.0),
                reason: "the rx header could not be written",
            }
        })?;
        for (head, len) in used {
            queue
                .add_used(mem, head, len)
                .map_err(|source| DeviceError::Queue {
                    index: RX_QUEUE,
                    source,
                })?;
        }
        Ok(Delivery::Done)
    }
}

/// Writes `bytes` at frame offset `offset` through the guest segments holding the frame's
/// start.
fn write_frame_bytes(
    mem: &GuestMemoryMmap,
    segments: &[Segment],
    offset: usize,
    bytes: &[u8],
) -> Result<(), vm_memory::GuestMemoryError> {
    for (i, byte) in bytes.iter().enumerate() {
        let at = offset + i;
        if let Some(s) = segments
            .iter()
            .find(|s| s.frame_offset <= at && at < s.frame_offset + s.len)
        {
            let addr = GuestAddress(s.addr.0 + (at - s.frame_offset) as u64);
            mem.write_obj(*byte, addr)?;
        }
    }
    Ok(())
}

/// Asks the driver to notify the rx queue when it posts more buffers. Returns whether
/// buffers were posted meanwhile (then the caller retries instead of waiting).
///
/// With EVENT_IDX, virtio-queue's `enable_notification` would set `avail_event` to our
/// `next_avail`; when a few buffers are available but too few for the frame, the driver
/// has already passed that index and would never notify. So `avail_event` is set to the
/// driver's current `avail_idx`: its next post notifies.
fn enable_rx_notification(queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool, DeviceError> {
    let err = |source| DeviceError::Queue {
        index: RX_QUEUE,
        source,
    };
    let before = queue.avail_idx(mem, Ordering::Acquire).map_err(err)?;
    if queue.event_idx_enabled() {
        let avail_event = GuestAddress(queue.used_ring())
            .0
            .checked_add(USED_RING_HEADER + USED_ELEMENT * u64::from(queue.size()))
            .map(GuestAddress)
            .ok_or(err(virtio_queue::Error::AddressOverflow))?;
        mem.store(before.0.to_le(), avail_event, Ordering::Relaxed)
            .map_err(|e| err(virtio_queue::Error::GuestMemory(e)))?;
    } else {
        queue.enable_notification(mem).map_err(err)?;
    }
    // Order the avail_event store before re-reading avail_idx (pairs with the driver's
    // barrier between publishing avail_idx and reading avail_event).
    fence(Ordering::SeqCst);
    let after = queue.avail_idx(mem, Ordering::Acquire).map_err(err)?;
    Ok(after != before)
}
