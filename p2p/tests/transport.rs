//! Real QUIC on 127.0.0.1: who gets through the mutual-TLS handshake and who does not.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use p2p::{peer_id, Endpoint, Identity, PeerId, TransportError, ALPN};
use quinn::crypto::rustls::QuicClientConfig;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// Long enough for a handshake on loopback to have finished many times over.
const NEVER: Duration = Duration::from_millis(500);
/// Bounds every step that should happen, so that a bug fails the test instead of hanging it.
const SOON: Duration = Duration::from_secs(5);

fn loopback() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
}

fn server(identity: &Identity, trusted: &[PeerId]) -> (Endpoint, SocketAddr) {
    let endpoint = Endpoint::server(identity, loopback(), trusted.to_vec()).unwrap();
    let addr = endpoint.local_addr().unwrap();
    (endpoint, addr)
}

async fn soon<F: std::future::Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(SOON, f)
        .await
        .unwrap_or_else(|_| panic!("{what} did not happen within {SOON:?}"))
}

/// The server's `accept` yields nothing for a while.
async fn assert_accepts_nothing(server: &Endpoint) {
    if let Ok(got) = tokio::time::timeout(NEVER, server.accept()).await {
        panic!("server accepted a connection it should have refused: {got:?}");
    }
}

#[tokio::test]
async fn trusted_peers_connect_and_exchange_bytes() {
    let server_id = Identity::generate().unwrap();
    let client_id = Identity::generate().unwrap();
    let (server, addr) = server(&server_id, &[client_id.public_key()]);
    let client = Endpoint::client(&client_id).unwrap();

    let serve = async {
        let (peer, conn) = server.accept().await.unwrap();
        assert_eq!(peer, client_id.public_key());
        assert_eq!(peer_id(&conn).unwrap(), client_id.public_key());
        let (mut send, mut recv) = conn.accept_bi().await.unwrap();
        let request = recv.read_to_end(1024).await.unwrap();
        assert_eq!(request, b"ping");
        send.write_all(b"pong").await.unwrap();
        send.finish().unwrap();
        // Keep the connection until the client has read everything.
        conn.closed().await;
    };
    let dial = async {
        let conn = client.connect(addr, server_id.public_key()).await.unwrap();
        assert_eq!(peer_id(&conn).unwrap(), server_id.public_key());
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(b"ping").await.unwrap();
        send.finish().unwrap();
        let reply = recv.read_to_end(1024).await.unwrap();
        assert_eq!(reply, b"pong");
        conn.close(0u32.into(), b"done");
    };
    soon("the exchange", async { tokio::join!(serve, dial) }).await;
}

#[tokio::test]
async fn untrusted_client_is_refused_before_accept() {
    let server_id = Identity::generate().unwrap();
    let friend = Identity::generate().unwrap();
    let stranger = Identity::generate().unwrap();
    let (server, addr) = server(&server_id, &[friend.public_key()]);

    let err = soon(
        "the stranger's refusal",
        Endpoint::client(&stranger)
            .unwrap()
            .connect(addr, server_id.public_key()),
    )
    .await
    .unwrap_err();
    match &err {
        TransportError::Refused { peer, local, .. } => {
            assert_eq!(*peer, server_id.public_key());
            assert_eq!(*local, stranger.public_key());
        }
        other => panic!("expected Refused, got {other:?}"),
    }
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
    assert_accepts_nothing(&server).await;

    // The refusal did not disturb the server: the trusted peer still gets in.
    let friend_endpoint = Endpoint::client(&friend).unwrap();
    let (dialed, accepted) = soon("the friend's connection", async {
        tokio::join!(
            friend_endpoint.connect(addr, server_id.public_key()),
            server.accept()
        )
    })
    .await;
    dialed.unwrap();
    assert_eq!(accepted.unwrap().0, friend.public_key());
}

#[tokio::test]
async fn client_refuses_a_server_with_another_key() {
    let server_id = Identity::generate().unwrap();
    let client_id = Identity::generate().unwrap();
    let meant = Identity::generate().unwrap().public_key();
    let (server, addr) = server(&server_id, &[client_id.public_key()]);

    let err = soon(
        "the client's refusal",
        Endpoint::client(&client_id).unwrap().connect(addr, meant),
    )
    .await
    .unwrap_err();
    match &err {
        TransportError::WrongPeer {
            expected, found, ..
        } => {
            assert_eq!(*expected, meant);
            assert_eq!(*found, server_id.public_key());
        }
        other => panic!("expected WrongPeer, got {other:?}"),
    }
    let text = err.to_string();
    assert!(text.contains(&meant.to_string()), "{text}");
    assert!(text.contains(&server_id.public_key().to_string()), "{text}");
    // The client aborted before sending its Finished: the server never completes it.
    assert_accepts_nothing(&server).await;
}

/// A server verifier for a hand-made client: accepts any certificate, but does check the
/// handshake signature (so the failure seen is the server's, not this client's).
#[derive(Debug)]
struct AnyServer;

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &rustls::crypto::ring::default_provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

/// A client outside `Endpoint`'s rules: with or without a certificate, any ALPN list.
fn raw_client(
    cert: Option<(CertificateDer<'static>, PrivateKeyDer<'static>)>,
    alpn: &[&[u8]],
) -> (quinn::Endpoint, quinn::ClientConfig) {
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(AnyServer));
    let mut tls = match cert {
        Some((cert, key)) => builder.with_client_auth_cert(vec![cert], key).unwrap(),
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let config = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).unwrap()));
    (quinn::Endpoint::client(loopback()).unwrap(), config)
}

/// Dials with a raw client and waits for the connection to fail: either the handshake
/// itself, or right after it, when the server refuses what the client sent last.
async fn raw_connection_fails(
    endpoint: &quinn::Endpoint,
    config: quinn::ClientConfig,
    addr: SocketAddr,
) {
    let connecting = endpoint.connect_with(config, addr, "hospes").unwrap();
    soon("the raw client's failure", async {
        match connecting.await {
            Err(_) => {}
            Ok(conn) => {
                let reason = conn.closed().await;
                assert!(
                    !matches!(reason, quinn::ConnectionError::LocallyClosed),
                    "{reason}"
                );
            }
        }
    })
    .await;
}

#[tokio::test]
async fn client_without_certificate_is_refused() {
    let server_id = Identity::generate().unwrap();
    let friend = Identity::generate().unwrap();
    let (server, addr) = server(&server_id, &[friend.public_key()]);
    let (endpoint, config) = raw_client(None, &[ALPN]);
    raw_connection_fails(&endpoint, config, addr).await;
    assert_accepts_nothing(&server).await;
}

#[tokio::test]
async fn trusted_key_without_the_protocol_is_refused() {
    // A trusted key, but a client that does not speak hospes/1.
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let cert = rcgen::CertificateParams::new(vec!["hospes".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let peer = PeerId::from_bytes(key.public_key_raw().try_into().unwrap());
    let server_id = Identity::generate().unwrap();
    let (server, addr) = server(&server_id, &[peer]);
    let credentials = || {
        let key = PrivatePkcs8KeyDer::from(key.serialize_der());
        Some((cert.der().clone(), PrivateKeyDer::Pkcs8(key)))
    };
    for alpn in [&[][..], &[&b"hospes/0"[..]][..]] {
        let (endpoint, config) = raw_client(credentials(), alpn);
        raw_connection_fails(&endpoint, config, addr).await;
    }
    assert_accepts_nothing(&server).await;

    // The same key speaking hospes/1 gets in: the refusals above were about the protocol.
    let (endpoint, config) = raw_client(credentials(), &[ALPN]);
    let connecting = endpoint.connect_with(config, addr, "hospes").unwrap();
    let (conn, accepted) = soon("the raw client's connection", async {
        tokio::join!(connecting, server.accept())
    })
    .await;
    conn.unwrap();
    assert_eq!(accepted.unwrap().0, peer);
}

#[tokio::test]
async fn a_client_endpoint_does_not_accept() {
    let client = Endpoint::client(&Identity::generate().unwrap()).unwrap();
    assert!(matches!(
        client.accept().await,
        Err(TransportError::NotListening)
    ));
}

#[tokio::test]
async fn closing_ends_accept() {
    let (server, _) = server(&Identity::generate().unwrap(), &[]);
    server.close();
    let got = soon("accept after close", server.accept()).await;
    assert!(matches!(got, Err(TransportError::Closed)), "{got:?}");
}

#[test]
fn an_endpoint_needs_a_runtime() {
    let id = Identity::generate().unwrap();
    assert!(matches!(
        Endpoint::client(&id),
        Err(TransportError::NoRuntime)
    ));
    assert!(matches!(
        Endpoint::server(&id, loopback(), [id.public_key()]),
        Err(TransportError::NoRuntime)
    ));
}

/// Bulk throughput on loopback, for tuning: `cargo test -p p2p --test transport bulk --
/// --ignored --nocapture` (HOSPES_BULK_MIB sets the amount, default 256).
#[tokio::test]
#[ignore = "a measurement, not a check"]
async fn bulk() {
    let mib: usize = std::env::var("HOSPES_BULK_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let server_id = Identity::generate().unwrap();
    let client_id = Identity::generate().unwrap();
    let (server, addr) = server(&server_id, &[client_id.public_key()]);
    let client = Endpoint::client(&client_id).unwrap();
    let serve = tokio::spawn(async move {
        let (_, conn) = server.accept().await.unwrap();
        let (_, mut recv) = conn.accept_bi().await.unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0;
        while let Some(n) = recv.read(&mut buf).await.unwrap() {
            total += n;
        }
        total
    });
    let conn = client.connect(addr, server_id.public_key()).await.unwrap();
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    let chunk = vec![0x5au8; 4 << 20];
    let start = std::time::Instant::now();
    for _ in 0..mib / 4 {
        send.write_all(&chunk).await.unwrap();
    }
    send.finish().unwrap();
    let total = serve.await.unwrap();
    let secs = start.elapsed().as_secs_f64();
    let stats = conn.stats();
    println!(
        "{} MiB in {secs:.2} s: {:.0} MB/s; {} datagrams, path MTU {}",
        total >> 20,
        total as f64 / secs / 1e6,
        stats.udp_tx.datagrams,
        stats.path.current_mtu
    );
}
