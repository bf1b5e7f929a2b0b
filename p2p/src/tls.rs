//! TLS for the QUIC endpoint: a self-signed certificate made from this peer's Ed25519 key,
//! and certificate verifiers that trust keys, not certificate authorities.
//!
//! A peer is who holds the private key of its [`PeerId`]. The certificate is only the
//! envelope TLS needs to carry that key: its names, validity dates, issuer and self-signature
//! mean nothing here and are not looked at. What proves the peer holds the key is the TLS 1.3
//! `CertificateVerify` signature over the handshake, which is verified with ring. So a
//! verifier accepts a certificate iff its SubjectPublicKeyInfo is an Ed25519 key it trusts,
//! and a handshake iff that key signed it. TLS 1.2 is refused (QUIC needs 1.3 anyway), as is
//! session resumption: each connection proves its key afresh, against the trust of the
//! moment.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use quinn::crypto::rustls::{NoInitialCipherSuite, QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::NoServerSessionStorage;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};

use crate::identity::{Identity, PeerId};

/// The DER encoding of an Ed25519 SubjectPublicKeyInfo up to the key itself (RFC 8410: the
/// algorithm identifier has no parameters, so every such SPKI starts with these 12 bytes
/// and has the 32-byte key after them).
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// The DNS name in our certificates and the SNI a client sends. Never checked: peers are
/// named by key, and a 64-digit hex key is longer than a DNS label may be.
pub(crate) const SERVER_NAME: &str = "hospes";

/// Errors of making this peer's certificate and TLS configurations, and reasons for
/// refusing another peer's certificate.
#[derive(thiserror::Error)]
pub enum TlsError {
    /// rcgen refused to make the self-signed certificate.
    #[error("cannot make a certificate for key {peer}: {reason}")]
    Certificate {
        /// The key it was for.
        peer: PeerId,
        /// rcgen's reason.
        reason: String,
    },
    /// rustls refused the configuration (a bug, or a key rustls cannot sign with).
    #[error("cannot configure TLS for key {peer}: {source}")]
    Config {
        /// The key it was for.
        peer: PeerId,
        /// rustls' reason.
        source: rustls::Error,
    },
    /// quinn refused the TLS configuration (a bug: ring has the cipher suite QUIC needs).
    #[error("cannot use the TLS configuration of key {peer} for QUIC: {source}")]
    Quic {
        /// The key it was for.
        peer: PeerId,
        /// quinn's reason.
        source: NoInitialCipherSuite,
    },
    /// A peer's certificate does not parse as X.509.
    #[error("certificate does not parse: {0:?}")]
    Unparsable(webpki::Error),
    /// A peer's certificate key is not Ed25519.
    #[error("certificate key is not Ed25519")]
    NotEd25519,
    /// A client presented a key that is not trusted.
    #[error("peer {0} is not trusted")]
    Untrusted(PeerId),
    /// The server at the address dialed is another peer than the one meant.
    #[error("server is peer {found}, expected {expected}")]
    WrongPeer {
        /// The peer that was dialed.
        expected: PeerId,
        /// The peer that answered.
        found: PeerId,
    },
}

/// rustls shows a refusal carried in `CertificateError::Other` with `{:?}`, and that text
/// ends up in logs and in the peer's close reason: make it the readable one.
impl std::fmt::Debug for TlsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl From<TlsError> for rustls::Error {
    fn from(e: TlsError) -> Self {
        let cert = match e {
            TlsError::Unparsable(_) => CertificateError::BadEncoding,
            // Sent as the alert `bad_certificate`; the text stays local (logs, errors).
            _ => CertificateError::Other(OtherError(Arc::new(e))),
        };
        rustls::Error::InvalidCertificate(cert)
    }
}

/// The peer whose key `cert` carries, if it is an X.509 certificate with an Ed25519 key.
pub(crate) fn peer_of(cert: &CertificateDer<'_>) -> Result<PeerId, TlsError> {
    let parsed = webpki::EndEntityCert::try_from(cert).map_err(TlsError::Unparsable)?;
    let spki = parsed.subject_public_key_info();
    let key = spki
        .as_ref()
        .strip_prefix(&ED25519_SPKI_PREFIX[..])
        .ok_or(TlsError::NotEd25519)?;
    let key: [u8; PeerId::LEN] = key.try_into().map_err(|_| TlsError::NotEd25519)?;
    Ok(PeerId::from_bytes(key))
}

/// ring's algorithms, TLS 1.3 only.
fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    // Migration streams gigabytes; AES-128-GCM does 10 AES rounds a block to AES-256's 14
    // and is what QUIC's Initial packets need anyway. Measured over loopback QUIC inside
    // the rig's L2 (TCG, 32 MiB): AES-256-GCM 4 MB/s, AES-128-GCM 7 MB/s, ChaCha20 5-8.
    p.cipher_suites.sort_by_key(|s| match s.suite() {
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256 => 0,
        rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256 => 1,
        _ => 2,
    });
    Arc::new(p)
}

/// Checks a TLS 1.3 `CertificateVerify` signature with the key in `cert`.
fn verify_signature(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    // Only Ed25519 is offered, and `peer_of` has already insisted on an Ed25519 key; rustls
    // still checks that the scheme matches the key.
    if dss.scheme != SignatureScheme::ED25519 {
        return Err(rustls::PeerMisbehaved::SignedHandshakeWithUnadvertisedSigScheme.into());
    }
    let algorithms = rustls::crypto::ring::default_provider().signature_verification_algorithms;
    verify_tls13_signature(message, cert, dss, &algorithms)
}

fn refuse_tls12() -> Result<HandshakeSignatureValid, rustls::Error> {
    Err(rustls::Error::PeerIncompatible(
        rustls::PeerIncompatible::Tls13RequiredForQuic,
    ))
}

/// The client side: accepts exactly the one peer it dialed.
#[derive(Debug)]
pub(crate) struct DialedPeerVerifier {
    expected: PeerId,
    /// The key the server presented, kept so that a mismatch can be reported as such
    /// rather than as a generic TLS failure.
    pub(crate) seen: Mutex<Option<PeerId>>,
}

impl DialedPeerVerifier {
    pub(crate) fn new(expected: PeerId) -> Self {
        Self {
            expected,
            seen: Mutex::new(None),
        }
    }
}

impl ServerCertVerifier for DialedPeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let found = peer_of(end_entity)?;
        if let Ok(mut seen) = self.seen.lock() {
            *seen = Some(found);
        }
        if found != self.expected {
            return Err(TlsError::WrongPeer {
                expected: self.expected,
                found,
            }
            .into());
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        refuse_tls12()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

/// The server side: requires a client certificate whose key is in the trusted set.
#[derive(Debug)]
pub(crate) struct TrustedPeersVerifier {
    trusted: HashSet<PeerId>,
}

impl TrustedPeersVerifier {
    pub(crate) fn new(trusted: impl IntoIterator<Item = PeerId>) -> Self {
        Self {
            trusted: trusted.into_iter().collect(),
        }
    }
}

impl ClientCertVerifier for TrustedPeersVerifier {
    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let peer = peer_of(end_entity)?;
        if !self.trusted.contains(&peer) {
            return Err(TlsError::Untrusted(peer).into());
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        refuse_tls12()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

/// This peer's certificate and private key, made once per endpoint.
pub(crate) struct Credentials {
    peer: PeerId,
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
}

impl Credentials {
    pub(crate) fn new(identity: &Identity) -> Result<Self, TlsError> {
        let peer = identity.public_key();
        let certificate = |reason: rcgen::Error| TlsError::Certificate {
            peer,
            reason: reason.to_string(),
        };
        let mut params =
            rcgen::CertificateParams::new(vec![SERVER_NAME.to_owned()]).map_err(certificate)?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, peer.to_string());
        let cert = params
            .self_signed(identity.key_pair())
            .map_err(certificate)?;
        Ok(Self {
            peer,
            cert: cert.der().clone(),
            key: PrivateKeyDer::Pkcs8(identity.pkcs8()),
        })
    }

    /// A server configuration that admits clients holding one of the `trusted` keys.
    pub(crate) fn server_config(
        &self,
        trusted: &[PeerId],
        alpn: &[u8],
    ) -> Result<QuicServerConfig, TlsError> {
        let config_err = |source| TlsError::Config {
            peer: self.peer,
            source,
        };
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(config_err)?
            .with_client_cert_verifier(Arc::new(TrustedPeersVerifier::new(trusted.iter().copied())))
            .with_single_cert(vec![self.cert.clone()], self.key.clone_key())
            .map_err(config_err)?;
        config.alpn_protocols = vec![alpn.to_vec()];
        config.session_storage = Arc::new(NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        config.max_early_data_size = 0;
        QuicServerConfig::try_from(config).map_err(|source| TlsError::Quic {
            peer: self.peer,
            source,
        })
    }

    /// A client configuration that accepts only `verifier`'s peer as the server.
    pub(crate) fn client_config(
        &self,
        verifier: Arc<DialedPeerVerifier>,
        alpn: &[u8],
    ) -> Result<QuicClientConfig, TlsError> {
        let config_err = |source| TlsError::Config {
            peer: self.peer,
            source,
        };
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(config_err)?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(vec![self.cert.clone()], self.key.clone_key())
            .map_err(config_err)?;
        config.alpn_protocols = vec![alpn.to_vec()];
        config.resumption = rustls::client::Resumption::disabled();
        config.enable_early_data = false;
        QuicClientConfig::try_from(config).map_err(|source| TlsError::Quic {
            peer: self.peer,
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_of(identity: &Identity) -> CertificateDer<'static> {
        Credentials::new(identity).unwrap().cert
    }

    #[test]
    fn certificate_carries_the_identity_key() {
        let id = Identity::generate().unwrap();
        assert_eq!(peer_of(&cert_of(&id)).unwrap(), id.public_key());
    }

    #[test]
    fn non_ed25519_and_garbage_certificates_are_refused() {
        let p256 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec![SERVER_NAME.to_owned()])
            .unwrap()
            .self_signed(&p256)
            .unwrap();
        assert!(matches!(peer_of(cert.der()), Err(TlsError::NotEd25519)));
        let garbage = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00]);
        assert!(matches!(peer_of(&garbage), Err(TlsError::Unparsable(_))));
    }

    #[test]
    fn client_verifier_trusts_only_listed_keys() {
        let trusted = Identity::generate().unwrap();
        let stranger = Identity::generate().unwrap();
        let verifier = TrustedPeersVerifier::new([trusted.public_key()]);
        let now = UnixTime::now();
        assert!(verifier
            .verify_client_cert(&cert_of(&trusted), &[], now)
            .is_ok());
        let err = verifier
            .verify_client_cert(&cert_of(&stranger), &[], now)
            .unwrap_err();
        assert!(
            err.to_string().contains(&stranger.public_key().to_string()),
            "{err}"
        );
    }

    #[test]
    fn server_verifier_wants_the_dialed_key() {
        let meant = Identity::generate().unwrap();
        let other = Identity::generate().unwrap();
        let verifier = DialedPeerVerifier::new(meant.public_key());
        let name = ServerName::try_from(SERVER_NAME).unwrap();
        let now = UnixTime::now();
        assert!(verifier
            .verify_server_cert(&cert_of(&meant), &[], &name, &[], now)
            .is_ok());
        assert!(verifier
            .verify_server_cert(&cert_of(&other), &[], &name, &[], now)
            .is_err());
        assert_eq!(*verifier.seen.lock().unwrap(), Some(other.public_key()));
    }
}
