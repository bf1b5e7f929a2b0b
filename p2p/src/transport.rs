//! The QUIC endpoint between peers: one UDP socket, mutual TLS with the peers' Ed25519 keys
//! (see the `tls` module), and the rule that an untrusted peer is refused during the
//! handshake, before it can open a stream or send a byte of application data.
//!
//! A listening [`Endpoint`] completes handshakes in the background, concurrently (at most
//! [`MAX_PENDING_HANDSHAKES`] at a time; more are refused), and [`Endpoint::accept`] yields
//! only connections from trusted peers. Any endpoint can dial: [`Endpoint::connect`] names
//! the one peer it expects at the address and trusts no other there.
//!
//! Must be used inside a tokio runtime (the network thread's, see DESIGN.md "Threads").

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use quinn::{Connection, ConnectionError, VarInt};
use rustls::pki_types::CertificateDer;
use tokio::sync::{mpsc, Mutex, Semaphore};

use crate::identity::{Identity, PeerId};
pub use crate::tls::TlsError;
use crate::tls::{self, Credentials, DialedPeerVerifier};

/// The ALPN protocol both sides must agree on; the version of the whole peer protocol.
pub const ALPN: &[u8] = b"hospes/1";

/// A connection silent this long is dead. Keep-alives hold an idle but wanted connection
/// open; this bounds how long a vanished peer (or a half-done handshake) goes unnoticed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Well inside [`IDLE_TIMEOUT`], so that two lost keep-alives do not end a connection.
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(3);
/// How much one stream may have in flight. Migration moves guest memory in bulk: a LAN at
/// 10 Gbit/s with a few milliseconds of RTT and scheduling delay needs ~10 MiB in flight
/// to stay busy (quinn's default, 1.25 MiB, is for 100 Mbit/s at 100 ms).
pub const STREAM_RECEIVE_WINDOW: u32 = 16 << 20;
/// How much all streams of one connection may have in flight together (memory pages and
/// disk blocks may move on separate streams). Only trusted peers get this far, and this
/// bounds what each can make us buffer.
pub const CONNECTION_RECEIVE_WINDOW: u32 = 64 << 20;
/// What we send without acknowledgement: one stream's window. More would only queue data
/// the migration counts as still to send, and stretch the final round.
pub const SEND_WINDOW: u64 = 16 << 20;
/// The largest UDP payload quinn may discover and accept. Measured on loopback (256 MiB
/// on one stream): 1452 bytes (quinn's default ceiling) 341 MB/s, 5000 bytes 667 MB/s,
/// 6000 bytes 480-680 MB/s; from 7000 bytes on, datagrams get lost in quinn's receive
/// path and throughput collapses to a few MB/s, or discovery gives up at 1200.
const MAX_UDP_PAYLOAD: u16 = 5000;
/// UDP socket buffer sizes asked for (see `grow_buffers`).
const SOCKET_BUFFER: libc::c_int = 8 << 20;
/// Incoming handshakes in progress at once; further connection attempts are refused until
/// some complete, so that a flood of strangers cannot exhaust memory.
pub const MAX_PENDING_HANDSHAKES: usize = 16;
/// Accepted connections waiting for [`Endpoint::accept`]; a handshake that completes while
/// the queue is full waits (holding its pending-handshake slot).
const ACCEPT_QUEUE: usize = 4;
/// How often a dialing client looks for the server's HANDSHAKE_DONE (see `confirmed`).
const CONFIRM_POLL: Duration = Duration::from_millis(1);

/// Application close code: the peers do not speak the same protocol.
const CLOSE_WRONG_PROTOCOL: u32 = 1;
/// Application close code: the endpoint is closing.
const CLOSE_ENDPOINT: u32 = 2;

/// Errors of the QUIC endpoint.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Making the certificate or the TLS configuration failed.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// There is no tokio runtime to run the endpoint on.
    #[error("the QUIC endpoint must be made inside a tokio runtime")]
    NoRuntime,
    /// The UDP socket could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// The endpoint's own address could not be read.
    #[error("cannot read the endpoint's local address: {0}")]
    LocalAddr(io::Error),
    /// quinn refused to start a connection (e.g. an unspecified or port-0 address).
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The address dialed.
        addr: SocketAddr,
        /// Why.
        source: quinn::ConnectError,
    },
    /// The server at the address is not the peer that was dialed.
    #[error("the server at {addr} is peer {found}, not the expected peer {expected}")]
    WrongPeer {
        /// The address dialed.
        addr: SocketAddr,
        /// The peer meant.
        expected: PeerId,
        /// The peer that answered.
        found: PeerId,
    },
    /// The handshake failed (timeout, TLS failure, unreachable peer).
    #[error("handshake with {addr} failed: {source}")]
    Handshake {
        /// The remote address.
        addr: SocketAddr,
        /// Why.
        source: ConnectionError,
    },
    /// The server closed the connection before confirming the handshake: most likely it
    /// does not trust this peer's key.
    #[error(
        "peer {peer} at {addr} refused the connection (does it trust this peer's key \
         {local}?): {source}"
    )]
    Refused {
        /// The address dialed.
        addr: SocketAddr,
        /// The peer dialed.
        peer: PeerId,
        /// This peer's key.
        local: PeerId,
        /// How the connection ended (boxed: this variant is the largest).
        source: Box<ConnectionError>,
    },
    /// The two sides negotiated no common ALPN protocol.
    #[error("peer at {addr} does not speak {}: it negotiated {:?}", String::from_utf8_lossy(ALPN), .protocol.as_deref().map(String::from_utf8_lossy))]
    WrongProtocol {
        /// The remote address.
        addr: SocketAddr,
        /// What was negotiated instead, if anything.
        protocol: Option<Vec<u8>>,
    },
    /// The connection carries no certificate this module can read a key from.
    #[error("connection with {addr} has no peer certificate with an Ed25519 key")]
    NoPeerIdentity {
        /// The remote address.
        addr: SocketAddr,
    },
    /// `accept` on an endpoint made with [`Endpoint::client`].
    #[error("this endpoint does not listen: make it with Endpoint::server to accept peers")]
    NotListening,
    /// The endpoint was closed.
    #[error("the endpoint is closed")]
    Closed,
}

/// An accepted connection and the trusted peer at its other end.
type Accepted = (PeerId, Connection);

/// A QUIC endpoint speaking as one [`Identity`].
pub struct Endpoint {
    quinn: quinn::Endpoint,
    local: PeerId,
    credentials: Credentials,
    transport: Arc<quinn::TransportConfig>,
    /// Verified connections from the background accept task; `None` if not listening.
    accepted: Option<Mutex<mpsc::Receiver<Accepted>>>,
}

impl Endpoint {
    /// An endpoint listening on `listen` that admits peers holding one of the `trusted`
    /// keys; it can also dial. Binding port 0 picks a free port (see
    /// [`Endpoint::local_addr`]).
    pub fn server(
        identity: &Identity,
        listen: SocketAddr,
        trusted: impl IntoIterator<Item = PeerId>,
    ) -> Result<Self, TransportError> {
        runtime()?;
        let trusted: Vec<PeerId> = trusted.into_iter().collect();
        let credentials = Credentials::new(identity)?;
        let transport = Arc::new(transport_config());
        let crypto = credentials.server_config(&trusted, ALPN)?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        config.transport_config(transport.clone());
        let quinn = endpoint(Some(config), listen).map_err(|source| TransportError::Bind {
            addr: listen,
            source,
        })?;
        let (tx, rx) = mpsc::channel(ACCEPT_QUEUE);
        tokio::spawn(accept_loop(quinn.clone(), tx));
        let bound = quinn.local_addr().unwrap_or(listen);
        if trusted.is_empty() {
            tracing::warn!("endpoint on {bound} trusts no peer: it will refuse everyone");
        }
        tracing::info!(
            "peer {} listening on {bound}, trusting {} peer(s)",
            identity.public_key(),
            trusted.len()
        );
        Ok(Self {
            quinn,
            local: identity.public_key(),
            credentials,
            transport,
            accepted: Some(Mutex::new(rx)),
        })
    }

    /// An endpoint that only dials, from an ephemeral port (IPv6 dual-stack where the host
    /// has IPv6, else IPv4).
    pub fn client(identity: &Identity) -> Result<Self, TransportError> {
        runtime()?;
        let credentials = Credentials::new(identity)?;
        let v6 = SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0));
        let v4 = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0));
        let quinn = endpoint(None, v6)
            .or_else(|_| endpoint(None, v4))
            .map_err(|source| TransportError::Bind { addr: v4, source })?;
        Ok(Self {
            quinn,
            local: identity.public_key(),
            credentials,
            transport: Arc::new(transport_config()),
            accepted: None,
        })
    }

    /// The next connection from a trusted peer. Connections from untrusted peers, or that
    /// fail their handshake otherwise, are logged and never returned.
    pub async fn accept(&self) -> Result<(PeerId, Connection), TransportError> {
        let Some(accepted) = &self.accepted else {
            return Err(TransportError::NotListening);
        };
        accepted
            .lock()
            .await
            .recv()
            .await
            .ok_or(TransportError::Closed)
    }

    /// Dials `peer` at `addr`. Succeeds only once both sides have verified each other:
    /// the server is `peer` (no other key is accepted, whatever this endpoint trusts when
    /// listening), and the server accepted this peer's key.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        peer: PeerId,
    ) -> Result<Connection, TransportError> {
        let verifier = Arc::new(DialedPeerVerifier::new(peer));
        let crypto = self.credentials.client_config(verifier.clone(), ALPN)?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(self.transport.clone());
        let connecting = self
            .quinn
            .connect_with(config, addr, tls::SERVER_NAME)
            .map_err(|source| TransportError::Connect { addr, source })?;
        let conn = match connecting.await {
            Ok(conn) => conn,
            Err(source) => {
                let seen = verifier.seen.lock().ok().and_then(|seen| *seen);
                return Err(match seen {
                    Some(found) if found != peer => TransportError::WrongPeer {
                        addr,
                        expected: peer,
                        found,
                    },
                    _ => TransportError::Handshake { addr, source },
                });
            }
        };
        check_protocol(&conn)?;
        confirmed(&conn)
            .await
            .map_err(|source| TransportError::Refused {
                addr,
                peer,
                local: self.local,
                source: Box::new(source),
            })?;
        tracing::debug!("connected to peer {peer} at {addr}");
        Ok(conn)
    }

    /// The address the endpoint's socket is bound to.
    pub fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        self.quinn.local_addr().map_err(TransportError::LocalAddr)
    }

    /// This endpoint's own peer id.
    pub fn peer_id(&self) -> PeerId {
        self.local
    }

    /// Waits until every closed connection has told its peer so (or `limit` passed):
    /// before the process exits, so that a close is not lost with the socket.
    pub async fn wait_idle(&self, limit: Duration) {
        let _ = tokio::time::timeout(limit, self.quinn.wait_idle()).await;
    }

    /// Closes every connection at once and stops accepting; pending `accept`s return
    /// [`TransportError::Closed`].
    pub fn close(&self) {
        self.quinn
            .close(VarInt::from_u32(CLOSE_ENDPOINT), b"endpoint closed");
    }
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("peer", &self.local)
            .field("local_addr", &self.quinn.local_addr().ok())
            .field("listening", &self.accepted.is_some())
            .finish_non_exhaustive()
    }
}

/// The verified peer at the other end of a connection made by an [`Endpoint`].
///
/// For a connection that did not come from [`Endpoint::accept`] or [`Endpoint::connect`]
/// this only reads the key from the peer's certificate; it does not mean the key was
/// verified.
pub fn peer_id(conn: &Connection) -> Result<PeerId, TransportError> {
    let none = || TransportError::NoPeerIdentity {
        addr: conn.remote_address(),
    };
    let certs = conn
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or_else(none)?;
    let cert = certs.first().ok_or_else(none)?;
    tls::peer_of(cert).map_err(|_| none())
}

/// A quinn endpoint on a UDP socket bound to `addr` (an IPv6 wildcard is dual-stack, the
/// Linux default), taking datagrams up to [`MAX_UDP_PAYLOAD`] (see `transport_config`).
fn endpoint(
    server: Option<quinn::ServerConfig>,
    addr: SocketAddr,
) -> std::io::Result<quinn::Endpoint> {
    let mut config = quinn::EndpointConfig::default();
    config
        .max_udp_payload_size(MAX_UDP_PAYLOAD)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let socket = std::net::UdpSocket::bind(addr)?;
    grow_buffers(&socket);
    quinn::Endpoint::new(config, server, socket, Arc::new(quinn::TokioRuntime))
}

/// Socket buffers for bulk transfer. At the default 208 KiB a burst of large datagrams
/// overflows the receive buffer; quinn takes the losses for a path that cannot carry
/// large packets and falls back to 1200-byte ones. Privileged processes (hospes runs as
/// root to open /dev/kvm and TAPs) may exceed `net.core.rmem_max`; others get what the
/// sysctl allows. Failure only costs throughput, so it is logged, not returned.
fn grow_buffers(socket: &std::net::UdpSocket) {
    use std::os::fd::AsRawFd;
    for (force, plain, name) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, "receive"),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, "send"),
    ] {
        let set = |option: libc::c_int| {
            let size: libc::c_int = SOCKET_BUFFER;
            // SAFETY: the option value is one c_int that outlives the call, and its length
            // is passed; the descriptor is the socket borrowed for the call.
            unsafe {
                libc::setsockopt(
                    socket.as_raw_fd(),
                    libc::SOL_SOCKET,
                    option,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            }
        };
        if set(force) < 0 && set(plain) < 0 {
            tracing::debug!(
                "cannot size the UDP {name} buffer: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// Transport parameters for bulk transfer between peers on a LAN; see the constants.
fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    // Every QUIC packet costs a decryption, an acknowledgement's share and, without GSO, a
    // system call: on loopback (two peers on one host) and on jumbo-frame LANs the path
    // takes larger datagrams than quinn's default ceiling of 1452 bytes, so path MTU
    // discovery may climb to MAX_UDP_PAYLOAD. On a 1500-byte network it settles where it
    // would have anyway.
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MAX_UDP_PAYLOAD);
    // An idle timeout in whole milliseconds always fits a VarInt.
    t.max_idle_timeout(Some(
        VarInt::from_u32(IDLE_TIMEOUT.as_millis() as u32).into(),
    ))
    .keep_alive_interval(Some(KEEP_ALIVE_INTERVAL))
    .stream_receive_window(VarInt::from_u32(STREAM_RECEIVE_WINDOW))
    .receive_window(VarInt::from_u32(CONNECTION_RECEIVE_WINDOW))
    .send_window(SEND_WINDOW)
    .mtu_discovery_config(Some(mtu))
    // The peer protocol uses streams only; unreliable datagrams would be buffer space
    // nobody reads.
    .datagram_receive_buffer_size(None);
    t
}

fn runtime() -> Result<(), TransportError> {
    tokio::runtime::Handle::try_current()
        .map(drop)
        .map_err(|_| TransportError::NoRuntime)
}

/// Completes incoming handshakes concurrently and queues the trusted ones. Ends when the
/// `Endpoint` is dropped (the queue's receiver with it) or closed.
async fn accept_loop(quinn: quinn::Endpoint, queue: mpsc::Sender<Accepted>) {
    let pending = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
    loop {
        let incoming = tokio::select! {
            () = queue.closed() => break,
            incoming = quinn.accept() => match incoming {
                Some(incoming) => incoming,
                None => break,
            },
        };
        let Ok(slot) = pending.clone().try_acquire_owned() else {
            tracing::warn!(
                "refused connection from {}: {MAX_PENDING_HANDSHAKES} handshakes already pending",
                incoming.remote_address()
            );
            incoming.refuse();
            continue;
        };
        let queue = queue.clone();
        tokio::spawn(async move {
            let addr = incoming.remote_address();
            match handshake(incoming).await {
                Ok((peer, conn)) => {
                    tracing::info!("accepted peer {peer} from {addr}");
                    // If nobody accepts any more, dropping `conn` closes it.
                    let _ = queue.send((peer, conn)).await;
                }
                Err(e) => tracing::warn!("refused connection from {addr}: {e}"),
            }
            drop(slot);
        });
    }
}

/// The server side of one handshake. The client's certificate is checked against the
/// trusted set inside the TLS handshake (`tls::TrustedPeersVerifier`), so a connection
/// exists here only for a trusted peer.
async fn handshake(incoming: quinn::Incoming) -> Result<Accepted, TransportError> {
    let addr = incoming.remote_address();
    let conn = incoming
        .accept()
        .map_err(|source| TransportError::Handshake { addr, source })?
        .await
        .map_err(|source| TransportError::Handshake { addr, source })?;
    check_protocol(&conn)?;
    let peer = peer_id(&conn)?;
    Ok((peer, conn))
}

/// Insists on [`ALPN`]: a client that offered no ALPN at all would otherwise get through.
fn check_protocol(conn: &Connection) -> Result<(), TransportError> {
    let protocol = conn
        .handshake_data()
        .and_then(|any| any.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|data| data.protocol);
    if protocol.as_deref() == Some(ALPN) {
        return Ok(());
    }
    conn.close(
        VarInt::from_u32(CLOSE_WRONG_PROTOCOL),
        b"wrong application protocol",
    );
    Err(TransportError::WrongProtocol {
        addr: conn.remote_address(),
        protocol,
    })
}

/// Waits until the server has confirmed the handshake.
///
/// In QUIC (RFC 9001 4.1.2) a client's handshake is complete as soon as it has sent its
/// Finished, i.e. before the server has looked at the client's certificate; quinn hands
/// the connection over at that point. The server confirms with a HANDSHAKE_DONE frame only
/// after accepting the certificate, and refuses with a CONNECTION_CLOSE instead. quinn
/// reports no event for HANDSHAKE_DONE, only counts it, hence the polling: it lasts about
/// one round trip, once per connection.
async fn confirmed(conn: &Connection) -> Result<(), ConnectionError> {
    let mut poll = tokio::time::interval(CONFIRM_POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if conn.stats().frame_rx.handshake_done > 0 {
            return Ok(());
        }
        // A silent server ends this through the idle timeout.
        tokio::select! {
            e = conn.closed() => return Err(e),
            _ = poll.tick() => {}
        }
    }
}
