//! Everything between peers: identity keys, the QUIC endpoint with mutual TLS, and the
//! live-migration wire protocol. Knows nothing of KVM.
#![deny(missing_docs)]

pub mod identity;
mod tls;
pub mod transport;
pub mod wire;

pub use identity::{Identity, IdentityError, PeerId};
pub use transport::{peer_id, Endpoint, TransportError, ALPN};
