//! The server's long-term TLS identity for secure mode (`docs/PROTOCOL.md`
//! §12.1): an ECDSA P-256 key and a self-signed certificate, made on first
//! start and kept in `<data>/identity/`. Clients pin the SHA-256
//! fingerprint of the certificate, so it must never change by accident:
//! both files are written once, atomically, and only read afterwards.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use protocol::secure::{Fingerprint, ALPN};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// Sub-directory of the data directory holding the identity.
pub const IDENTITY_DIR: &str = "identity";
/// The certificate, DER.
pub const CERT_FILE: &str = "server-cert.der";
/// The private key, PKCS#8 DER, mode 0600.
pub const KEY_FILE: &str = "server-key.der";
/// The subject name in the certificate. Clients authenticate the server by
/// its pinned fingerprint, not by a name.
pub const SERVER_NAME: &str = "backup-server";

/// Why the identity could not be loaded or made.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no server identity in {0} (it is made when the server first starts)")]
    Missing(PathBuf),
    #[error("only one of the identity files exists in {0}; restore the other from a backup, or remove both to make a new identity (clients will then refuse the new fingerprint until re-pinned)")]
    Half(PathBuf),
    #[error("cannot generate a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("no server identity in {dir}, and this repository's servers present fingerprint {recorded}: copy {IDENTITY_DIR}/{CERT_FILE} and {IDENTITY_DIR}/{KEY_FILE} from one of them into the data directory (a new identity would make every client refuse this server; docs/SCALING.md)")]
    NotShared { dir: PathBuf, recorded: String },
    #[error("this server's identity in {dir} has fingerprint {own}, but this repository's servers present {recorded}: copy {IDENTITY_DIR}/ from one of them instead (clients pin the repository's; docs/SCALING.md)")]
    Differs {
        dir: PathBuf,
        own: String,
        recorded: String,
    },
    #[error("cannot read or record the repository's identity: {0}")]
    Shared(crate::storage::StorageError),
    #[error("the identity in {path} is not usable for TLS: {source}")]
    Tls {
        path: PathBuf,
        source: rustls::Error,
    },
}

/// The certificate and key the secure listener presents.
pub struct ServerIdentity {
    cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
    fingerprint: Fingerprint,
    dir: PathBuf,
}

impl std::fmt::Debug for ServerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerIdentity")
            .field("fingerprint", &self.fingerprint)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl ServerIdentity {
    /// Loads the identity under `data_dir`, making one if there is none.
    /// Returns whether it was just made.
    ///
    /// # Errors
    /// When the files cannot be read or written, only one of them exists,
    /// or they do not form a usable TLS identity.
    pub fn load_or_create(data_dir: &Path) -> Result<(Self, bool), IdentityError> {
        match Self::load(data_dir) {
            Ok(identity) => Ok((identity, false)),
            Err(IdentityError::Missing(_)) => Ok((Self::create(data_dir)?, true)),
            Err(e) => Err(e),
        }
    }

    /// Loads the identity under `data_dir` for a server of a shared
    /// repository, whose metadata `shared` records the fingerprint every
    /// server must present (`docs/SCALING.md`). The first server to start
    /// makes the identity and records it; every other one must be given a
    /// copy of it: one without it, or with another, is refused, never
    /// silently given a new one. Returns whether it was just made.
    ///
    /// # Errors
    /// [`IdentityError::NotShared`], [`IdentityError::Differs`], and as
    /// [`ServerIdentity::load_or_create`].
    pub fn load_shared(
        data_dir: &Path,
        shared: &crate::storage::PgMetaStore,
    ) -> Result<(Self, bool), IdentityError> {
        const KEY: &str = "identity_fingerprint";
        let (identity, created) = match Self::load(data_dir) {
            Ok(identity) => (identity, false),
            Err(IdentityError::Missing(dir)) => {
                if let Some(recorded) = shared.recorded(KEY).map_err(IdentityError::Shared)? {
                    return Err(IdentityError::NotShared { dir, recorded });
                }
                (Self::create(data_dir)?, true)
            }
            Err(e) => return Err(e),
        };
        let own = identity.fingerprint().to_string();
        let recorded = shared.claim(KEY, &own).map_err(IdentityError::Shared)?;
        if recorded != own {
            if created {
                // Another server made and recorded its own first: ours was
                // never presented to anyone.
                let _ = fs::remove_file(identity.dir.join(KEY_FILE));
                let _ = fs::remove_file(identity.dir.join(CERT_FILE));
                return Err(IdentityError::NotShared {
                    dir: identity.dir.clone(),
                    recorded,
                });
            }
            return Err(IdentityError::Differs {
                dir: identity.dir.clone(),
                own,
                recorded,
            });
        }
        Ok((identity, created))
    }

    /// Loads the identity under `data_dir`.
    ///
    /// # Errors
    /// [`IdentityError::Missing`] when there is none; as
    /// [`ServerIdentity::load_or_create`] otherwise.
    pub fn load(data_dir: &Path) -> Result<Self, IdentityError> {
        let dir = data_dir.join(IDENTITY_DIR);
        let (cert_path, key_path) = (dir.join(CERT_FILE), dir.join(KEY_FILE));
        match (cert_path.exists(), key_path.exists()) {
            (false, false) => return Err(IdentityError::Missing(dir)),
            (true, true) => {}
            _ => return Err(IdentityError::Half(dir)),
        }
        let read = |path: &Path| {
            fs::read(path).map_err(|source| IdentityError::Io {
                action: "read",
                path: path.to_owned(),
                source,
            })
        };
        let cert = CertificateDer::from(read(&cert_path)?);
        let key = PrivatePkcs8KeyDer::from(read(&key_path)?);
        let identity = Self {
            fingerprint: Fingerprint::of_certificate(&cert),
            cert,
            key,
            dir,
        };
        // Fail at start-up, not at the first handshake.
        identity.tls_config()?;
        Ok(identity)
    }

    fn create(data_dir: &Path) -> Result<Self, IdentityError> {
        let dir = data_dir.join(IDENTITY_DIR);
        let io = |action, path: &Path| {
            let path = path.to_owned();
            move |source| IdentityError::Io {
                action,
                path,
                source,
            }
        };
        fs::create_dir_all(&dir).map_err(io("create", &dir))?;
        let key_pair = rcgen::KeyPair::generate()?;
        let params = rcgen::CertificateParams::new(vec![SERVER_NAME.to_owned()])?;
        let cert = params.self_signed(&key_pair)?;
        let cert_der = cert.der().to_vec();
        let key_der = zeroize::Zeroizing::new(key_pair.serialize_der());
        // The key first: a crash between the two leaves a key without a
        // certificate, which `load` reports rather than silently replacing.
        write_atomically(&dir, KEY_FILE, &key_der, 0o600).map_err(io("write", &dir))?;
        write_atomically(&dir, CERT_FILE, &cert_der, 0o644).map_err(io("write", &dir))?;
        Self::load(data_dir)
    }

    /// The SHA-256 fingerprint clients pin.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// Where the identity lives.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A TLS 1.3-only server configuration presenting this identity.
    ///
    /// # Errors
    /// When the key does not match the certificate or is not supported.
    pub fn tls_config(&self) -> Result<Arc<rustls::ServerConfig>, IdentityError> {
        let tls = |source| IdentityError::Tls {
            path: self.dir.clone(),
            source,
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls)?
            .with_no_client_auth()
            .with_single_cert(
                vec![self.cert.clone()],
                PrivateKeyDer::Pkcs8(self.key.clone_key()),
            )
            .map_err(tls)?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        // No session resumption: every connection is a full handshake with
        // its own exporter value, and nothing to steal from a ticket store.
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Ok(Arc::new(config))
    }
}

/// Writes `name` in `dir` through a synced temporary file and a rename,
/// then syncs the directory: the file is whole or absent after a crash.
fn write_atomically(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let temp = dir.join(format!(".{name}.tmp"));
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(&temp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&temp, dir.join(name))?;
    fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn makes_an_identity_once_and_loads_the_same_fingerprint_after() {
        let dir = tempfile::tempdir().unwrap();
        let (first, created) = ServerIdentity::load_or_create(dir.path()).unwrap();
        assert!(created);
        let (again, created) = ServerIdentity::load_or_create(dir.path()).unwrap();
        assert!(!created);
        assert_eq!(first.fingerprint(), again.fingerprint());
        let der = fs::read(dir.path().join(IDENTITY_DIR).join(CERT_FILE)).unwrap();
        assert_eq!(Fingerprint::of_certificate(&der), first.fingerprint());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let key = dir.path().join(IDENTITY_DIR).join(KEY_FILE);
            let mode = fs::metadata(key).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "the key is private to its owner");
        }
    }

    #[test]
    fn refuses_half_an_identity_rather_than_replacing_it() {
        let dir = tempfile::tempdir().unwrap();
        ServerIdentity::load_or_create(dir.path()).unwrap();
        fs::remove_file(dir.path().join(IDENTITY_DIR).join(CERT_FILE)).unwrap();
        assert!(matches!(
            ServerIdentity::load_or_create(dir.path()),
            Err(IdentityError::Half(_))
        ));
    }

    #[test]
    fn reports_a_missing_identity_without_making_one() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            ServerIdentity::load(dir.path()),
            Err(IdentityError::Missing(_))
        ));
        assert!(!dir.path().join(IDENTITY_DIR).exists());
    }
}
