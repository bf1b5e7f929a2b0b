//! virtio-net on a TAP interface: features, config space, offload negotiation, and the
//! transmit path. Receive (TAP to guest, mergeable buffers) is in `rx`; the TAP itself in
//! `tap`.

mod rx;
mod tap;
#[cfg(test)]
mod tests;

use std::os::fd::{AsRawFd, RawFd};

use event_manager::EventSet;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, QueueT};

use self::tap::Tap;
pub use self::tap::TapQueue;
use super::{
    chain, process_batch, read_config_bytes, warn_limited, DeviceContext, DeviceError,
    VirtioDevice, WarnLimiter, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
};
use crate::GuestMemoryMmap;

/// `struct virtio_net_hdr_v1`: flags, gso_type, hdr_len, gso_size, csum_start,
/// csum_offset, num_buffers.
pub(crate) const VNET_HDR_LEN: usize = 12;
/// Offset of `num_buffers` in the header.
const NUM_BUFFERS_OFFSET: usize = 10;
/// Largest frame either way: a 64 KiB GSO frame plus Ethernet header, plus our header.
const MAX_FRAME_LEN: usize = VNET_HDR_LEN + 65550;
const QUEUE_SIZE: u16 = 256;
const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
/// mac (6 bytes) + status (le16).
const CONFIG_LEN: usize = 8;

/// How to build a [`Net`] device, from the service spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// Interface identifier within the VM (for logs).
    pub id: String,
    /// TAP interface name; created if missing.
    pub tap: String,
    /// The guest's MAC address.
    pub mac: [u8; 6],
}

/// Errors setting up a network device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// Not a usable interface name.
    #[error("TAP name {name:?} is invalid: 1 to 15 printable ASCII characters without '/' or ':'")]
    TapName {
        /// The name given.
        name: String,
    },
    /// /dev/net/tun could not be opened.
    #[error("cannot open /dev/net/tun: {source}")]
    OpenTun {
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// TUNSETIFF failed.
    #[error("cannot create or attach TAP interface {name}: {source}")]
    CreateTap {
        /// The interface.
        name: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// TUNSETVNETHDRSZ failed.
    #[error("cannot set the virtio-net header size of TAP {name}: {source}")]
    VnetHeader {
        /// The interface.
        name: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// TUNSETQUEUE, or the descriptor for it, failed.
    #[error("cannot {what} the queue of TAP {name}: {source}")]
    Queue {
        /// The interface.
        name: String,
        /// "detach", "attach" or "duplicate".
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// A stable, locally administered unicast MAC for interface `id` of service `service`:
/// `06:xx:xx:xx:xx:xx`, the rest from a 64-bit FNV-1a hash of both names. It survives
/// migration and restarts because it depends on nothing else.
pub fn mac_from_name(service: &str, id: &str) -> [u8; 6] {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = FNV_OFFSET;
    // The NUL separator keeps ("ab", "c") and ("a", "bc") apart.
    for byte in service.bytes().chain([0]).chain(id.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    let h = hash.to_le_bytes();
    // 0x06: locally administered (bit 1) and unicast (bit 0 clear).
    [0x06, h[0], h[1], h[2], h[3], h[4]]
}

/// A virtio-net device with one rx/tx queue pair on a TAP interface.
///
/// Apart from the pending rx frame (see `rx_frame`), everything it keeps is either
/// derived from negotiation (acked features, TAP offloads), given back when a restored
/// transport reactivates it, or a scratch buffer.
pub struct Net {
    id: String,
    tap: Tap,
    avail_features: u64,
    acked_features: u64,
    config: [u8; CONFIG_LEN],
    queue_sizes: [u16; 2],
    /// Frame read from the TAP, with its header; `rx_len` bytes of it are waiting for rx
    /// buffers (0: none). A snapshot does not carry it: a frame pending when the VM is
    /// saved is lost, as on a lossy link, and the sender's TCP retransmits it.
    rx_frame: Vec<u8>,
    rx_len: usize,
    descs: Vec<Descriptor>,
    warn: WarnLimiter,
}

impl Net {
    /// Opens the TAP interface.
    pub fn new(config: NetConfig) -> Result<Net, NetError> {
        let NetConfig { id, tap, mac } = config;
        let tap = Tap::open(&tap)?;
        let avail_features = VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_NET_F_MAC
            | 1 << VIRTIO_NET_F_MRG_RXBUF
            | 1 << VIRTIO_NET_F_STATUS
            | 1 << VIRTIO_NET_F_CSUM
            | 1 << VIRTIO_NET_F_HOST_TSO4
            | 1 << VIRTIO_NET_F_HOST_TSO6
            | 1 << VIRTIO_NET_F_GUEST_CSUM
            | 1 << VIRTIO_NET_F_GUEST_TSO4
            | 1 << VIRTIO_NET_F_GUEST_TSO6;
        let mut config = [0u8; CONFIG_LEN];
        config[..6].copy_from_slice(&mac);
        config[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        tracing::debug!("virtio-net {id}: TAP {}", tap.name());
        Ok(Net {
            warn: WarnLimiter::new(format!("virtio-net {id}")),
            id,
            tap,
            avail_features,
            acked_features: 0,
            config,
            queue_sizes: [QUEUE_SIZE; 2],
            rx_frame: vec![0; MAX_FRAME_LEN],
            rx_len: 0,
            descs: Vec::with_capacity(usize::from(QUEUE_SIZE)),
        })
    }

    /// The interface identifier from the spec.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The TAP interface name.
    pub fn tap_name(&self) -> &str {
        self.tap.name()
    }

    /// A handle to take this device's TAP queue out of the TAP and put it back, usable
    /// once the device sits behind its transport.
    pub fn tap_queue(&self) -> Result<TapQueue, NetError> {
        self.tap.queue().map_err(|source| NetError::Queue {
            name: self.tap.name().to_owned(),
            what: "duplicate",
            source,
        })
    }

    fn has_feature(&self, bit: u32) -> bool {
        self.acked_features & (1 << bit) != 0
    }

    /// TUN_F_* for what the guest accepts on receive.
    fn tap_offloads(&self) -> libc::c_uint {
        let mut flags = 0;
        if self.has_feature(VIRTIO_NET_F_GUEST_CSUM) {
            flags |= libc::TUN_F_CSUM;
            // Segmentation offloads are only meaningful with checksum offload.
            if self.has_feature(VIRTIO_NET_F_GUEST_TSO4) {
                flags |= libc::TUN_F_TSO4;
            }
            if self.has_feature(VIRTIO_NET_F_GUEST_TSO6) {
                flags |= libc::TUN_F_TSO6;
            }
        }
        flags
    }

    /// Sends one tx chain to the TAP; the used length of a tx chain is 0.
    fn handle_tx_chain(
        &mut self,
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
    ) -> Result<u32, DeviceError> {
        let head = chain.head_index();
        chain::collect(chain, &mut self.descs).map_err(|reason| DeviceError::MalformedChain {
            index: TX_QUEUE,
            head,
            reason,
        })?;
        let mut frame_len = 0usize;
        for d in &self.descs {
            let len = d.len() as usize;
            let problem = if d.is_write_only() {
                Some("a device-writable descriptor")
            } else if frame_len + len > MAX_FRAME_LEN {
                Some("more than the largest frame")
            } else if !chain::in_memory(mem, d.addr(), d.len()) {
                Some("a buffer outside guest memory")
            } else {
                None
            };
            if let Some(problem) = problem {
                warn_limited!(
                    self.warn,
                    "tx chain {head} dropped: descriptor [{:#x}, +{len:#x}) is {problem}",
                    d.addr().0
                );
                return Ok(0);
            }
            frame_len += len;
        }
        if frame_len <= VNET_HDR_LEN {
            warn_limited!(
                self.warn,
                "tx chain {head} dropped: {frame_len} bytes is no frame after the {VNET_HDR_LEN}-byte header"
            );
            return Ok(0);
        }
        // Straight from guest memory into the TAP (one writev): no copy of the frame here.
        let Ok(slices) = chain::guest_slices(mem, &self.descs) else {
            warn_limited!(self.warn, "tx chain {head} dropped: unreadable buffer");
            return Ok(0);
        };
        if slices.len() > chain::IOV_MAX {
            warn_limited!(
                self.warn,
                "tx chain {head} dropped: {} buffers, at most {} make one frame",
                slices.len(),
                chain::IOV_MAX
            );
            return Ok(0);
        }
        let guards: Vec<_> = slices.iter().map(|s| s.ptr_guard()).collect();
        match self.tap.write_iovecs(&chain::iovecs_to_read(&guards)) {
            Ok(_) => {}
            // The TAP's queue is full or the interface is down: the frame is lost, as on a
            // real link; the guest's TCP retransmits.
            Err(e) => warn_limited!(
                self.warn,
                "writing a {frame_len}-byte frame to TAP {} failed: {e}",
                self.tap.name()
            ),
        }
        Ok(0)
    }

    fn process_tx(&mut self, ctx: &mut DeviceContext<'_>) -> Result<(), DeviceError> {
        let mem = ctx.mem;
        process_batch(TX_QUEUE, ctx, |chain| self.handle_tx_chain(chain, mem))
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
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
        // The MAC is only writable for legacy drivers; virtio 1.x config is read-only here.
        warn_limited!(
            self.warn,
            "guest wrote {} bytes at config offset {offset:#x}; ignored",
            data.len()
        );
    }

    fn activate(&mut self, ctx: &mut DeviceContext<'_>) -> Result<(), DeviceError> {
        for index in [RX_QUEUE, TX_QUEUE] {
            if !ctx.queues.get(index).is_some_and(|q| q.ready()) {
                return Err(DeviceError::QueueNotReady { index });
            }
        }
        self.acked_features = ctx.acked_features;
        let offloads = self.tap_offloads();
        self.tap
            .set_offload(offloads)
            .map_err(|e| DeviceError::Activate {
                reason: format!(
                    "TUNSETOFFLOAD {offloads:#x} on TAP {} failed: {e}",
                    self.tap.name()
                ),
            })?;
        // Frames and requests that arrived before DRIVER_OK had their events dropped.
        self.process_tx(ctx)?;
        self.process_rx(ctx)
    }

    fn process_queue(
        &mut self,
        index: usize,
        ctx: &mut DeviceContext<'_>,
    ) -> Result<(), DeviceError> {
        match index {
            // The guest posted rx buffers: resume reading the TAP.
            RX_QUEUE => self.process_rx(ctx),
            TX_QUEUE => self.process_tx(ctx),
            _ => Ok(()),
        }
    }

    fn extra_fds(&self) -> Vec<(RawFd, EventSet)> {
        // Edge-triggered: the TAP is read until EAGAIN or until rx buffers run out; in the
        // latter case the loop waits for the rx queue notification instead of spinning on
        // a TAP that stays readable.
        vec![(
            self.tap.as_raw_fd(),
            EventSet::IN | EventSet::EDGE_TRIGGERED,
        )]
    }

    fn process_extra_event(
        &mut self,
        _index: usize,
        _events: EventSet,
        ctx: &mut DeviceContext<'_>,
    ) -> Result<(), DeviceError> {
        self.process_rx(ctx)
    }

    fn reset(&mut self) {
        // A frame held for rx buffers belongs to the old driver instance's link; drop it.
        self.rx_len = 0;
        self.acked_features = 0;
    }
}

/// Whether the driver negotiated mergeable rx buffers (else each frame needs one chain).
fn mergeable(acked_features: u64) -> bool {
    acked_features & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0
}
