//! The repository key of this client: made at the first snapshot, kept by
//! the server only in envelopes: for this client's RSA key (slot 0,
//! written once), opened here with `priv.key`, and under a passphrase
//! (slot 1), opened with the keys of a passphrase login
//! (`docs/PROTOCOL.md` §13.2, §13.6). A backup-only key lives in a file
//! of its own (`key export --backup-only`).

use std::path::Path;

use protocol::crypto::PrivateKey;
use protocol::repo::envelope::{self, PassphraseCost, PassphraseKeys, Unwrapped};
use protocol::repo::keys::{BackupKey, MasterKey, BACKUP_KEY_LEN};
use protocol::repo::message::{KeySlot, MASTER_SLOT, PASSPHRASE_SLOT};
use zeroize::Zeroizing;

use super::remote::Remote;
use crate::error::Error;

/// What this client can do with its repository.
pub enum RepoKey {
    /// Back up and restore.
    Full(MasterKey),
    /// Back up only.
    BackupOnly(BackupKey),
}

impl RepoKey {
    /// The key that names and seals.
    pub fn backup_key(&self) -> BackupKey {
        match self {
            Self::Full(m) => m.backup_key(),
            Self::BackupOnly(b) => b.clone(),
        }
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Internal(format!("key work stopped: {e}")))
}

fn open(private: &PrivateKey, envelope: &[u8]) -> Result<RepoKey, Error> {
    match envelope::open_with_rsa(private, envelope, &mut rand::rngs::OsRng) {
        Ok(Unwrapped::Full(m)) => Ok(RepoKey::Full(m)),
        Ok(Unwrapped::BackupOnly(b)) => Ok(RepoKey::BackupOnly(b)),
        Err(e) => Err(Error::RepositoryKey {
            detail: e.to_string(),
        }),
    }
}

/// This client's repository key, from its envelope on the server; when
/// there is none and `create` is set, a new master key, stored first.
///
/// # Errors
/// When the envelope does not open with our key, or there is none and
/// `create` is not set.
pub async fn obtain(remote: &mut Remote, create: bool) -> Result<RepoKey, Error> {
    let private = remote
        .private_key()
        .cloned()
        .ok_or(Error::MasterKeyPassphraseOnly)?;
    for _ in 0..2 {
        let slots = remote.keys().await?;
        if let Some(slot) = slots.iter().find(|s| s.slot == MASTER_SLOT) {
            let p = private.clone();
            let envelope = slot.envelope.clone();
            return blocking(move || open(&p, &envelope)).await?;
        }
        // The RSA envelope was removed for a passphrase one: a new master
        // key now would seal every later snapshot under a key that opens
        // none of the earlier ones.
        if slots.iter().any(|s| s.slot == PASSPHRASE_SLOT) {
            return Err(Error::MasterKeyPassphraseOnly);
        }
        if !create {
            return Err(Error::NoRepositoryKey);
        }
        let p = private.clone();
        let (master, sealed) = blocking(move || {
            let master = MasterKey::generate(&mut rand::rngs::OsRng);
            let sealed = envelope::seal_for_rsa(
                &p,
                &Unwrapped::Full(master.clone()),
                &mut rand::rngs::OsRng,
            );
            (master, sealed)
        })
        .await?;
        let sealed = sealed.map_err(|e| Error::RepositoryKey {
            detail: e.to_string(),
        })?;
        if remote.put_key(MASTER_SLOT, sealed).await? {
            return Ok(RepoKey::Full(master));
        }
        // Another run stored its key first: use that one.
    }
    Err(Error::NoRepositoryKey)
}

/// The master key from the passphrase envelope, with the keys a passphrase
/// login derived.
///
/// # Errors
/// When there is no passphrase envelope, or it does not open with these keys.
pub async fn open_with_passphrase(
    remote: &mut Remote,
    keys: PassphraseKeys,
) -> Result<MasterKey, Error> {
    let slots = remote.keys().await?;
    let slot = passphrase_slot(slots).ok_or(Error::NoRepositoryKey)?;
    blocking(move || keys.open(&slot.envelope))
        .await?
        .map_err(|e| Error::RepositoryKey {
            detail: e.to_string(),
        })
}

fn passphrase_slot(slots: Vec<KeySlot>) -> Option<KeySlot> {
    slots.into_iter().find(|s| s.slot == PASSPHRASE_SLOT)
}

/// Stores the master key under `passphrase` (replacing an earlier
/// passphrase envelope), with the default Argon2id costs.
///
/// # Errors
/// When the key cannot be sealed or stored.
pub async fn add_passphrase(
    remote: &mut Remote,
    master: MasterKey,
    passphrase: Zeroizing<Vec<u8>>,
) -> Result<(), Error> {
    let sealed = blocking(move || {
        envelope::seal_with_passphrase(
            &master,
            &passphrase,
            PassphraseCost::default(),
            &mut rand::rngs::OsRng,
        )
    })
    .await?
    .map_err(|e| Error::RepositoryKey {
        detail: e.to_string(),
    })?;
    if remote.put_key(PASSPHRASE_SLOT, sealed).await? {
        Ok(())
    } else {
        Err(Error::KeyKept {
            server: remote.server().to_owned(),
            why: "this client is append-only there, so its key envelopes are written once and a passphrase, once set, cannot be replaced".into(),
        })
    }
}

/// First line of a backup-only key file.
const KEY_FILE_HEAD: &str = "backup-client backup-only key v1";

/// Writes `key` to `path` (mode 0600): a header line, then the id key and
/// the sealing public key as 128 hex digits.
///
/// # Errors
/// When the file cannot be written.
pub fn write_key_file(path: &Path, key: &BackupKey) -> Result<(), Error> {
    let text = Zeroizing::new(format!(
        "{KEY_FILE_HEAD}\n{}\n",
        hex::encode(key.to_bytes().as_slice())
    ));
    crate::fsutil::write_private(path, text.as_bytes())
}

/// Reads a key file written by [`write_key_file`].
///
/// # Errors
/// When the file cannot be read or is not a backup-only key file.
pub fn read_key_file(path: &Path) -> Result<BackupKey, Error> {
    let bad = |detail: String| Error::BadKeyFile {
        path: path.to_owned(),
        detail,
    };
    let text = Zeroizing::new(
        std::fs::read_to_string(path).map_err(|e| bad(crate::error::io_reason(&e)))?,
    );
    let mut lines = text.lines();
    if lines.next().map(str::trim) != Some(KEY_FILE_HEAD) {
        return Err(bad("its first line is not the key file header".into()));
    }
    let mut bytes = Zeroizing::new([0u8; BACKUP_KEY_LEN]);
    hex::decode_to_slice(
        lines.next().unwrap_or_default().trim(),
        bytes.as_mut_slice(),
    )
    .map_err(|_| bad("its second line is not 128 hex digits".into()))?;
    Ok(BackupKey::from_bytes(&bytes))
}

impl crate::engine::Client {
    /// Reconnects with the key files and opens the master key, which the
    /// `key` commands need whole.
    async fn full_key(&self) -> Result<(Remote, MasterKey), Error> {
        let keyed = self.reconnect_existing().await?;
        let mut remote = Remote::new(keyed, self.options().server.clone());
        match obtain(&mut remote, false).await {
            Ok(RepoKey::Full(master)) => Ok((remote, master)),
            Ok(RepoKey::BackupOnly(_)) => {
                remote.close().await;
                Err(Error::BackupOnlyKey)
            }
            Err(e) => {
                remote.close().await;
                Err(e)
            }
        }
    }

    /// `key add-passphrase`: stores the master key under `passphrase`.
    ///
    /// # Errors
    /// When the master key cannot be obtained, or the envelope not stored.
    pub async fn add_passphrase(&self, passphrase: Zeroizing<Vec<u8>>) -> Result<(), Error> {
        let (mut remote, master) = self.full_key().await?;
        let result = add_passphrase(&mut remote, master, passphrase).await;
        remote.close().await;
        result
    }

    /// `key export --backup-only`: writes the backup-only key to `out`.
    ///
    /// # Errors
    /// When the master key cannot be obtained, or the file not written.
    pub async fn export_backup_key(&self, out: &Path) -> Result<(), Error> {
        let (remote, master) = self.full_key().await?;
        remote.close().await;
        write_key_file(out, &master.backup_key())
    }

    /// `key remove-rsa-envelope`: removes the envelope of slot 0, which
    /// the server refuses unless a passphrase envelope remains.
    ///
    /// # Errors
    /// [`Error::KeyKept`] when there is no passphrase envelope or the
    /// server keeps the envelope; else as any exchange.
    pub async fn remove_rsa_envelope(&self) -> Result<(), Error> {
        let keyed = self.reconnect_existing().await?;
        let mut remote = Remote::new(keyed, self.options().server.clone());
        let result = async {
            let slots = remote.keys().await?;
            let kept = |why: &str| Error::KeyKept {
                server: self.options().server.clone(),
                why: why.to_owned(),
            };
            if !slots.iter().any(|s| s.slot == PASSPHRASE_SLOT) {
                return Err(kept("there is no passphrase envelope, and without this one nothing could open the snapshots; run `backup-client key add-passphrase` first"));
            }
            match remote.delete_key(MASTER_SLOT).await? {
                Ok(()) => Ok(()),
                Err(protocol::repo::message::KeptReason::APPEND_ONLY) => Err(kept(
                    "this client is append-only there, so its key envelopes cannot be removed",
                )),
                Err(protocol::repo::message::KeptReason::EMPTY) => {
                    Err(kept("there is no envelope for the RSA key (already removed)"))
                }
                Err(_) => Err(kept(
                    "it is the last envelope of the repository key; add a passphrase first",
                )),
            }
        }
        .await;
        remote.close().await;
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_a_backup_only_key_file_and_rejects_other_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("backup.key");
        let master = MasterKey::generate(&mut rand::thread_rng());
        write_key_file(&path, &master.backup_key()).unwrap();
        let back = read_key_file(&path).unwrap();
        assert_eq!(back.seal, master.open_key().public());
        assert_eq!(back.id.id(b"x"), master.id_key().id(b"x"));
        std::fs::write(&path, "something else\n").unwrap();
        assert!(matches!(
            read_key_file(&path),
            Err(Error::BadKeyFile { .. })
        ));
        std::fs::write(&path, format!("{KEY_FILE_HEAD}\nabcd\n")).unwrap();
        assert!(matches!(
            read_key_file(&path),
            Err(Error::BadKeyFile { .. })
        ));
    }
}
