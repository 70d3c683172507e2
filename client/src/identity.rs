//! The client's identity: user name, client id and RSA private key, kept in
//! the legacy files `me.info` and `priv.key` (`docs/PROTOCOL.md` §8).
//!
//! Reading is lenient about what legacy clients write: a name line padded
//! with spaces or NULs, CRLF line ends, Base64 wrapped at any width, and a
//! `me.info` without the key when `priv.key` has it. Writing uses the legacy
//! formats of `protocol::keyfile`, so legacy clients can read what we write.

use std::path::{Path, PathBuf};

use protocol::crypto::PrivateKey;
use protocol::keyfile::{self, MeInfo};
use protocol::{ClientId, UserName};

use crate::error::{io_reason, Error};
use crate::fsutil;

/// File holding name, client id and private key.
pub const ME_INFO: &str = "me.info";
/// File holding the private key alone.
pub const PRIV_KEY: &str = "priv.key";

/// Who this client is to the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub name: UserName,
    pub client_id: ClientId,
    pub key: PrivateKey,
}

/// Parses `me.info` text; the key comes from its lines 3 and on, or from
/// `priv_key` (the bytes of `priv.key`) when `me.info` has none.
///
/// # Errors
/// A description of the first problem found.
pub fn parse_me_info(text: &str, priv_key: Option<&[u8]>) -> Result<Identity, String> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut lines = text.lines();
    let name_line = lines.next().ok_or("it is empty")?;
    let name_text = name_line.trim_end_matches(|c: char| c == '\0' || c.is_whitespace());
    let name = UserName::new(name_text.as_bytes())
        .map_err(|e| format!("line 1 is not a user name: {e}"))?;
    let id_line = lines.next().ok_or("line 2 (the client id) is missing")?;
    let client_id =
        ClientId::from_hex(id_line.trim_matches(|c: char| c == '\0' || c.is_whitespace()))
            .map_err(|_| "line 2 is not a client id of 32 hex digits".to_owned())?;
    let rest: Vec<&str> = lines.collect();
    let key = if rest.iter().any(|l| !l.trim().is_empty()) {
        keyfile::parse_priv_key(rest.join("\n").as_bytes())
            .map_err(|e| format!("lines 3 and on: {e}"))?
    } else {
        let bytes =
            priv_key.ok_or("it holds no private key, and there is no priv.key next to it")?;
        keyfile::parse_priv_key(bytes).map_err(|e| format!("priv.key: {e}"))?
    };
    Ok(Identity {
        name,
        client_id,
        key,
    })
}

/// The directory holding `me.info` and `priv.key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityStore {
    dir: PathBuf,
}

impl IdentityStore {
    /// A store in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of `me.info`.
    pub fn me_info_path(&self) -> PathBuf {
        self.dir.join(ME_INFO)
    }

    /// Path of `priv.key`.
    pub fn priv_key_path(&self) -> PathBuf {
        self.dir.join(PRIV_KEY)
    }

    /// Whether an identity has been saved here.
    pub fn exists(&self) -> bool {
        self.me_info_path().exists()
    }

    /// Reads the identity, or `None` if there is no `me.info`.
    ///
    /// # Errors
    /// When `me.info` exists but cannot be read or parsed.
    pub fn load(&self) -> Result<Option<Identity>, Error> {
        let path = self.me_info_path();
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(Error::Identity {
                    path,
                    detail: io_reason(&e),
                })
            }
        };
        let priv_key = match std::fs::read(self.priv_key_path()) {
            Ok(b) => Some(zeroize::Zeroizing::new(b)),
            Err(_) => None,
        };
        let text = zeroize::Zeroizing::new(String::from_utf8_lossy(&bytes).into_owned());
        parse_me_info(&text, priv_key.as_ref().map(|k| k.as_slice()))
            .map(Some)
            .map_err(|detail| Error::Identity { path, detail })
    }

    /// Creates the directory (mode 0700) if needed and checks that files can
    /// be written in it, so that a registration is not wasted on an identity
    /// that cannot be saved.
    ///
    /// # Errors
    /// When the directory cannot be created or written.
    pub fn ensure_writable(&self) -> Result<(), Error> {
        fsutil::create_private_dir(&self.dir)?;
        tempfile::Builder::new()
            .prefix(".probe-")
            .tempfile_in(&self.dir)
            .map(drop)
            .map_err(|e| Error::WriteFile {
                path: self.dir.clone(),
                reason: io_reason(&e),
            })
    }

    /// Writes `priv.key`, then `me.info`, each atomically with mode 0600,
    /// creating the directory (mode 0700) if needed.
    ///
    /// # Errors
    /// When a file cannot be written.
    pub fn save(&self, identity: &Identity) -> Result<(), Error> {
        fsutil::create_private_dir(&self.dir)?;
        let key_text = keyfile::priv_key_text(&identity.key)
            .map_err(|e| Error::Internal(format!("cannot encode the private key: {e}")))?;
        fsutil::write_private(&self.priv_key_path(), key_text.as_bytes())?;
        let me = MeInfo {
            name: identity.name.clone(),
            client_id: identity.client_id,
            key: identity.key.clone(),
        };
        let text = me
            .to_text()
            .map_err(|e| Error::Internal(format!("cannot encode me.info: {e}")))?;
        fsutil::write_private(&self.me_info_path(), text.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn vectors() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../protocol/tests/vectors/keys")
    }

    #[test]
    fn reads_the_me_info_of_a_legacy_client() {
        for (who, id) in [("alice", "d09b07813d5b4fb788435e3ca2d4ad4d"), ("carol", "")] {
            let store = IdentityStore::new(vectors().join(who));
            let identity = store.load().unwrap().unwrap();
            assert_eq!(identity.name.as_bytes(), who.as_bytes());
            if !id.is_empty() {
                assert_eq!(identity.client_id.to_hex(), id);
            }
            let from_priv =
                keyfile::parse_priv_key(&std::fs::read(store.priv_key_path()).unwrap()).unwrap();
            assert_eq!(
                identity.key, from_priv,
                "me.info and priv.key hold the same key"
            );
        }
    }

    #[test]
    fn accepts_space_padding_crlf_and_a_key_only_in_priv_key() {
        let legacy = std::fs::read_to_string(vectors().join("alice/me.info")).unwrap();
        let mut lines = legacy.lines();
        lines.next();
        let id = lines.next().unwrap();
        let key: Vec<&str> = lines.collect();
        let spaced = format!(
            "alice{}\r\n{id}\r\n{}\r\n",
            " ".repeat(40),
            key.join("\r\n")
        );
        let a = parse_me_info(&spaced, None).unwrap();
        assert_eq!(a.name.as_bytes(), b"alice");
        let priv_key = std::fs::read(vectors().join("alice/priv.key")).unwrap();
        let b = parse_me_info(&format!("alice\n{id}\n"), Some(&priv_key)).unwrap();
        assert_eq!(a, b);
        let err = parse_me_info(&format!("alice\n{id}\n"), None).unwrap_err();
        assert!(err.contains("priv.key"), "{err}");
        assert!(parse_me_info("alice\nnot-hex\n", Some(&priv_key))
            .unwrap_err()
            .contains("line 2"));
    }

    #[test]
    fn round_trips_through_the_legacy_formats_with_private_modes() {
        let dir = tempfile::tempdir().unwrap();
        let store = IdentityStore::new(dir.path().join("cfg"));
        assert_eq!(store.load().unwrap(), None);
        store.ensure_writable().unwrap();
        assert_eq!(
            std::fs::read_dir(store.dir()).unwrap().count(),
            0,
            "the probe leaves nothing"
        );
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let identity = Identity {
            name: UserName::try_from("dave").unwrap(),
            client_id: ClientId([0x5a; 16]),
            key: PrivateKey::generate_legacy(&mut rng).unwrap(),
        };
        store.save(&identity).unwrap();
        assert_eq!(store.load().unwrap(), Some(identity.clone()));
        // What we write is what a legacy client reads: name, id, wrapped Base64.
        let text = std::fs::read_to_string(store.me_info_path()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "dave");
        assert_eq!(lines[1], "5a".repeat(16));
        assert!(lines[2].starts_with("MIIC") && lines[2].len() == 72);
        assert_eq!(MeInfo::parse(&text).unwrap().key, identity.key);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for p in [store.me_info_path(), store.priv_key_path()] {
                assert_eq!(
                    std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
                    0o600
                );
            }
            assert_eq!(
                std::fs::metadata(store.dir()).unwrap().permissions().mode() & 0o777,
                0o700
            );
        }
    }

    #[test]
    fn reports_which_identity_file_is_broken() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(ME_INFO), "bob\n0011\n").unwrap();
        let err = IdentityStore::new(dir.path()).load().unwrap_err();
        assert!(err.to_string().contains("me.info"), "{err}");
        assert_eq!(err.exit_code(), 6);
    }
}
