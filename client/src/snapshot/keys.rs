//! The repository key of this client: made at the first snapshot, kept by
//! the server only in an envelope for this client's RSA key (slot 0,
//! written once), opened here with `priv.key` (`docs/PROTOCOL.md` §13.2).

use protocol::crypto::PrivateKey;
use protocol::repo::envelope::{self, Unwrapped};
use protocol::repo::keys::{BackupKey, MasterKey};
use protocol::repo::message::MASTER_SLOT;

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
    let private = remote.identity().key.clone();
    for _ in 0..2 {
        let slots = remote.keys().await?;
        if let Some(slot) = slots.into_iter().find(|s| s.slot == MASTER_SLOT) {
            let p = private.clone();
            return blocking(move || open(&p, &slot.envelope)).await?;
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
