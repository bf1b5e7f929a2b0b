//! A peer's identity: its Ed25519 key pair, the key file that keeps it, and [`PeerId`], the
//! public key by which every other peer names it.
//!
//! The key file is the PKCS#8 DER encoding of the key (what `openssl genpkey -algorithm
//! ed25519 -outform DER` also writes). It is created with mode 0600 and never overwritten;
//! loading refuses a file that its group or others may access (any bit of 0o077), the way
//! ssh refuses a private key that others can read: whoever reads it can be this peer.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rcgen::{KeyPair, PKCS_ED25519};
use ring::rand::{SecureRandom, SystemRandom};
use rustls::pki_types::PrivatePkcs8KeyDer;

/// PKCS#8 v1 (RFC 5208) of an Ed25519 key (RFC 8410 section 7) up to the 32-byte seed:
/// `SEQUENCE { INTEGER 0, SEQUENCE { OID 1.3.101.112 }, OCTET STRING { OCTET STRING } }`.
/// Written rather than ring's PKCS#8 v2 (which adds the public key), because OpenSSL cannot
/// read ring's v2 encoding, and the key file should open with standard tools.
const PKCS8_V1_ED25519_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// A PKCS#8 Ed25519 key is 48 bytes (v1) or 83–85 (v2, with the public key); anything much
/// larger is not a key file, and is not read whole.
const MAX_KEY_FILE_LEN: u64 = 4096;

/// Errors of loading, saving and parsing identities.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The system could not produce a key (no randomness).
    #[error("cannot generate an Ed25519 key: {0}")]
    Generate(String),
    /// `save` never replaces a key: the old one may be the only copy of a peer's identity.
    #[error("key file {} already exists; refusing to overwrite it", .path.display())]
    Exists {
        /// The file that is already there.
        path: PathBuf,
    },
    /// Creating the key file failed (missing directory, no permission, ...).
    #[error("cannot create key file {}: {source}", .path.display())]
    Create {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Writing the key file failed; the partial file has been removed.
    #[error("cannot write key file {}: {source}", .path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// There is no key file.
    #[error("no key file at {}", .path.display())]
    Missing {
        /// Where it was looked for.
        path: PathBuf,
    },
    /// The key file exists but cannot be read.
    #[error("cannot read key file {}: {source}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The key file may be read or written by its group or by others.
    #[error(
        "key file {} is accessible to others (mode {mode:04o}); a private key must be \
         0600 or narrower: chmod 600 {}",
        .path.display(),
        .path.display()
    )]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The key file does not hold an Ed25519 key in PKCS#8 DER form.
    #[error("key file {} is not an Ed25519 private key in PKCS#8 DER form: {reason}", .path.display())]
    NotEd25519 {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A string that should name a peer does not.
    #[error("{value:?} is not a peer id ({reason}): a peer id is 64 hex digits")]
    BadPeerId {
        /// The string as given.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// A peer's name: its 32-byte Ed25519 public key.
///
/// Written as 64 lowercase hex digits (upper case is accepted when parsing). Hex rather than
/// base64: it is unambiguous when read aloud or copied by hand, and greps the same in logs,
/// config files and `hospes keygen` output.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId([u8; 32]);

impl PeerId {
    /// The length of an Ed25519 public key.
    pub const LEN: usize = 32;

    /// The peer whose Ed25519 public key is `key`.
    pub const fn from_bytes(key: [u8; Self::LEN]) -> Self {
        Self(key)
    }

    /// The raw public key.
    pub const fn as_bytes(&self) -> &[u8; Self::LEN] {
        &self.0
    }
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerId({self})")
    }
}

impl FromStr for PeerId {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason| IdentityError::BadPeerId {
            value: s.to_owned(),
            reason,
        };
        if s.len() != 2 * Self::LEN {
            return Err(bad("wrong length"));
        }
        let mut key = [0u8; Self::LEN];
        for (byte, pair) in key.iter_mut().zip(s.as_bytes().chunks_exact(2)) {
            let digit = |c: u8| (c as char).to_digit(16).ok_or_else(|| bad("not hex"));
            // Each digit is below 16, so the pair fits a byte.
            *byte = (digit(pair[0])? * 16 + digit(pair[1])?) as u8;
        }
        Ok(Self(key))
    }
}

/// This peer's Ed25519 key pair.
pub struct Identity {
    key: KeyPair,
    peer: PeerId,
}

impl Identity {
    /// A new random key pair.
    pub fn generate() -> Result<Self, IdentityError> {
        let mut der = PKCS8_V1_ED25519_PREFIX.to_vec();
        der.resize(PKCS8_V1_ED25519_PREFIX.len() + 32, 0);
        SystemRandom::new()
            .fill(&mut der[PKCS8_V1_ED25519_PREFIX.len()..])
            .map_err(|_| IdentityError::Generate("the system has no randomness".into()))?;
        let key = KeyPair::from_pkcs8_der_and_sign_algo(
            &PrivatePkcs8KeyDer::from(der.as_slice()),
            &PKCS_ED25519,
        )
        .map_err(|e| IdentityError::Generate(e.to_string()))?;
        Self::from_key_pair(key).map_err(IdentityError::Generate)
    }

    /// Writes the key (PKCS#8 DER) to a new file `path`, mode 0600. Refuses to replace an
    /// existing file, even an empty one.
    pub fn save(&self, path: &Path) -> Result<(), IdentityError> {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| match source.kind() {
                io::ErrorKind::AlreadyExists => IdentityError::Exists {
                    path: path.to_owned(),
                },
                _ => IdentityError::Create {
                    path: path.to_owned(),
                    source,
                },
            })?;
        let written = file
            .write_all(self.key.serialized_der())
            .and_then(|()| file.sync_all());
        if let Err(source) = written {
            drop(file);
            // A half-written key is worse than none: the next load would fail confusingly.
            let _ = std::fs::remove_file(path);
            return Err(IdentityError::Write {
                path: path.to_owned(),
                source,
            });
        }
        Ok(())
    }

    /// Reads a key file written by [`Identity::save`] (or any PKCS#8 DER Ed25519 key).
    pub fn load(path: &Path) -> Result<Self, IdentityError> {
        let read_err = |source: io::Error| match source.kind() {
            io::ErrorKind::NotFound => IdentityError::Missing {
                path: path.to_owned(),
            },
            _ => IdentityError::Read {
                path: path.to_owned(),
                source,
            },
        };
        let file = File::open(path).map_err(read_err)?;
        // The mode of the file we opened, not of whatever is at `path` by now.
        let meta = file.metadata().map_err(read_err)?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(IdentityError::Permissions {
                path: path.to_owned(),
                mode,
            });
        }
        let mut der = Vec::new();
        file.take(MAX_KEY_FILE_LEN + 1)
            .read_to_end(&mut der)
            .map_err(read_err)?;
        let not_ed25519 = |reason: String| IdentityError::NotEd25519 {
            path: path.to_owned(),
            reason,
        };
        if der.len() as u64 > MAX_KEY_FILE_LEN {
            return Err(not_ed25519(format!(
                "it is larger than {MAX_KEY_FILE_LEN} bytes"
            )));
        }
        if der.starts_with(b"-----BEGIN") {
            return Err(not_ed25519(
                "it is PEM; convert it with `openssl pkey -in FILE -outform DER`".into(),
            ));
        }
        let key = KeyPair::from_pkcs8_der_and_sign_algo(
            &PrivatePkcs8KeyDer::from(der.as_slice()),
            &PKCS_ED25519,
        )
        .map_err(|e| not_ed25519(e.to_string()))?;
        Self::from_key_pair(key).map_err(not_ed25519)
    }

    /// The public key: how other peers name this one.
    pub fn public_key(&self) -> PeerId {
        self.peer
    }

    /// The key pair, for signing this peer's certificate.
    pub(crate) fn key_pair(&self) -> &KeyPair {
        &self.key
    }

    /// The private key as rustls takes it.
    pub(crate) fn pkcs8(&self) -> PrivatePkcs8KeyDer<'static> {
        PrivatePkcs8KeyDer::from(self.key.serialize_der())
    }

    fn from_key_pair(key: KeyPair) -> Result<Self, String> {
        let public: [u8; PeerId::LEN] = key
            .public_key_raw()
            .try_into()
            .map_err(|_| format!("public key is {} bytes", key.public_key_raw().len()))?;
        Ok(Self {
            key,
            peer: PeerId(public),
        })
    }
}

impl fmt::Debug for Identity {
    /// Never the private key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("public_key", &self.peer)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A fresh, empty directory for one test; removed by the test when it passes.
    pub(crate) fn scratch_dir(tag: &str) -> PathBuf {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("hospes-p2p-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn write_with_mode(path: &Path, bytes: &[u8], mode: u32) {
        std::fs::write(path, bytes).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn save_load_round_trip() {
        let dir = scratch_dir("roundtrip");
        let path = dir.join("peer.key");
        let id = Identity::generate().unwrap();
        id.save(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let der = std::fs::read(&path).unwrap();
        assert_eq!(der.len(), 48, "PKCS#8 v1, as OpenSSL writes it");
        assert!(der.starts_with(&PKCS8_V1_ED25519_PREFIX));
        let loaded = Identity::load(&path).unwrap();
        assert_eq!(loaded.public_key(), id.public_key());
        assert_eq!(
            loaded.key_pair().serialized_der(),
            id.key_pair().serialized_der()
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn save_refuses_to_overwrite() {
        let dir = scratch_dir("overwrite");
        let path = dir.join("peer.key");
        let first = Identity::generate().unwrap();
        first.save(&path).unwrap();
        let err = Identity::generate().unwrap().save(&path).unwrap_err();
        assert!(matches!(err, IdentityError::Exists { .. }), "{err}");
        assert!(err.to_string().contains(&path.display().to_string()));
        // The first key is untouched.
        assert_eq!(
            Identity::load(&path).unwrap().public_key(),
            first.public_key()
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn save_into_missing_directory_names_the_path() {
        let dir = scratch_dir("nodir");
        let path = dir.join("no/such/dir/peer.key");
        let err = Identity::generate().unwrap().save(&path).unwrap_err();
        assert!(matches!(err, IdentityError::Create { .. }), "{err}");
        assert!(err.to_string().contains("no/such/dir/peer.key"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn load_missing_file() {
        let dir = scratch_dir("missing");
        let path = dir.join("absent.key");
        let err = Identity::load(&path).unwrap_err();
        assert!(matches!(err, IdentityError::Missing { .. }), "{err}");
        assert!(err.to_string().contains("absent.key"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn load_refuses_a_key_others_can_read() {
        let dir = scratch_dir("perms");
        let path = dir.join("peer.key");
        Identity::generate().unwrap().save(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Identity::load(&path).unwrap_err();
        assert!(
            matches!(err, IdentityError::Permissions { mode: 0o644, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("0644"), "{err}");
        // Narrower than 0600 is fine.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
        Identity::load(&path).unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn load_rejects_what_is_not_an_ed25519_key() {
        let dir = scratch_dir("garbage");
        let path = dir.join("bad.key");
        let p256 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cases: [(&[u8], &str); 5] = [
            (b"", "empty"),
            (b"not a key at all", "text"),
            (p256.serialized_der(), "P-256 key"),
            (
                b"-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEI\n",
                "PEM",
            ),
            (&[0u8; MAX_KEY_FILE_LEN as usize + 1], "huge"),
        ];
        for (bytes, what) in cases {
            let _ = std::fs::remove_file(&path);
            write_with_mode(&path, bytes, 0o600);
            let err = Identity::load(&path).unwrap_err();
            assert!(
                matches!(err, IdentityError::NotEd25519 { .. }),
                "{what}: {err}"
            );
            assert!(err.to_string().contains("bad.key"), "{what}: {err}");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn load_accepts_pkcs8_v2() {
        // ring's own encoding (with the public key), as other tools built on ring write it.
        let v2 = KeyPair::generate_for(&PKCS_ED25519).unwrap();
        assert!(v2.serialized_der().len() > 48);
        let dir = scratch_dir("v2");
        let path = dir.join("ring.key");
        write_with_mode(&path, v2.serialized_der(), 0o600);
        let id = Identity::load(&path).unwrap();
        assert_eq!(id.public_key().as_bytes()[..], *v2.public_key_raw());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn load_accepts_pkcs8_v1() {
        // `openssl genpkey -algorithm ed25519 -outform DER`: PKCS#8 v1, seed only (RFC 8410
        // section 10.3's example key).
        let v1: &[u8] = &[
            0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
            0x04, 0x20, 0xd4, 0xee, 0x72, 0xdb, 0xf9, 0x13, 0x58, 0x4a, 0xd5, 0xb6, 0xd8, 0xf1,
            0xf7, 0x69, 0xf8, 0xad, 0x3a, 0xfe, 0x7c, 0x28, 0xcb, 0xf1, 0xd4, 0xfb, 0xe0, 0x97,
            0xa8, 0x8f, 0x44, 0x75, 0x58, 0x42,
        ];
        let dir = scratch_dir("v1");
        let path = dir.join("openssl.key");
        write_with_mode(&path, v1, 0o600);
        let id = Identity::load(&path).unwrap();
        // RFC 8410 section 10.1: the public key belonging to that private key.
        assert_eq!(
            id.public_key().to_string(),
            "19bf44096984cdfe8541bac167dc3b96c85086aa30b6b6cb0c5c38ad703166e1"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn peer_id_text_round_trip() {
        let id = Identity::generate().unwrap().public_key();
        let text = id.to_string();
        assert_eq!(text.len(), 64);
        assert!(text
            .bytes()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_eq!(text.parse::<PeerId>().unwrap(), id);
        assert_eq!(text.to_uppercase().parse::<PeerId>().unwrap(), id);
    }

    #[test]
    fn peer_id_parse_errors_name_the_value() {
        for (value, reason) in [
            ("abc", "wrong length"),
            ("", "wrong length"),
            (&"g".repeat(64) as &str, "not hex"),
            (&"é".repeat(32) as &str, "not hex"),
        ] {
            let err = value.parse::<PeerId>().unwrap_err();
            let text = err.to_string();
            assert!(text.contains(&format!("{value:?}")), "{text}");
            assert!(text.contains(reason), "{text}");
        }
    }
}
