//! The client's repository keys (`docs/PROTOCOL.md` §13.2).
//!
//! ```text
//! master      = 32 random bytes, made at registration; the full key
//! id_key      = BLAKE3-derive("backup v4 object id key", master)
//! open_secret = BLAKE3-derive("backup v4 object open key", master), an X25519 secret
//! seal_public = X25519 public key of open_secret
//! object id   = BLAKE3-keyed(id_key, plaintext)
//! ```
//!
//! Everything is sealed to `seal_public` (see [`crate::repo::seal`]), so a
//! client that holds only `id_key` and `seal_public`, a backup-only key,
//! can back up and deduplicate but open nothing. The master key leaves the
//! client only inside envelopes: RSA-OAEP for the client's own key pair,
//! or Argon2id + AES-256-GCM under a passphrase.

use rand::{CryptoRng, RngCore};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::repo::message::ObjectId;

const ID_CONTEXT: &str = "backup v4 object id key";
const OPEN_CONTEXT: &str = "backup v4 object open key";

/// The full key: it derives every other.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct MasterKey([u8; 32]);

impl MasterKey {
    /// A fresh random master key.
    pub fn generate<R: CryptoRng + RngCore>(rng: &mut R) -> Self {
        let mut key = [0u8; 32];
        rng.fill_bytes(&mut key);
        Self(key)
    }

    /// The key from its 32 bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The 32 bytes, for an envelope.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The key that names objects.
    pub fn id_key(&self) -> IdKey {
        IdKey(blake3::derive_key(ID_CONTEXT, &self.0))
    }

    /// The secret that opens sealed objects.
    pub fn open_key(&self) -> OpenKey {
        OpenKey(StaticSecret::from(blake3::derive_key(
            OPEN_CONTEXT,
            &self.0,
        )))
    }

    /// What a backup-only client holds: it names and seals, never opens.
    pub fn backup_key(&self) -> BackupKey {
        BackupKey {
            id: self.id_key(),
            seal: self.open_key().public(),
        }
    }
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

/// The key of the keyed hash that names objects.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct IdKey([u8; 32]);

impl IdKey {
    /// The id of an object with this plaintext.
    pub fn id(&self, plaintext: &[u8]) -> ObjectId {
        ObjectId(*blake3::keyed_hash(&self.0, plaintext).as_bytes())
    }
}

/// The X25519 secret that opens what was sealed to its public key.
#[derive(Clone)]
pub struct OpenKey(StaticSecret);

impl OpenKey {
    /// The public key objects are sealed to.
    pub fn public(&self) -> SealPublic {
        SealPublic(PublicKey::from(&self.0))
    }

    pub(crate) fn agree(&self, ephemeral: &[u8; 32]) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(
            self.0
                .diffie_hellman(&PublicKey::from(*ephemeral))
                .to_bytes(),
        )
    }
}

/// The public key objects are sealed to.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct SealPublic(pub(crate) PublicKey);

impl SealPublic {
    pub fn as_bytes(&self) -> &[u8; 32] {
        self.0.as_bytes()
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(PublicKey::from(bytes))
    }
}

/// A key that backs up (names and seals objects) but opens nothing.
#[derive(Clone)]
pub struct BackupKey {
    pub id: IdKey,
    pub seal: SealPublic,
}

/// Length of a backup key's bytes: the id key and the sealing public key.
pub const BACKUP_KEY_LEN: usize = 64;

impl BackupKey {
    /// The 64 bytes: id key, then sealing public key.
    pub fn to_bytes(&self) -> Zeroizing<[u8; BACKUP_KEY_LEN]> {
        let mut out = Zeroizing::new([0u8; BACKUP_KEY_LEN]);
        let (id, seal) = out.split_at_mut(32);
        id.copy_from_slice(&self.id.0);
        seal.copy_from_slice(self.seal.as_bytes());
        out
    }

    /// The key from its 64 bytes.
    pub fn from_bytes(bytes: &[u8; BACKUP_KEY_LEN]) -> Self {
        let mut id = [0u8; 32];
        let mut seal = [0u8; 32];
        id.copy_from_slice(&bytes[..32]);
        seal.copy_from_slice(&bytes[32..]);
        Self {
            id: IdKey(id),
            seal: SealPublic::from_bytes(seal),
        }
    }
}

impl std::fmt::Debug for BackupKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BackupKey(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_depend_on_the_key_and_the_content() {
        let mut rng = rand::thread_rng();
        let a = MasterKey::generate(&mut rng);
        let b = MasterKey::generate(&mut rng);
        assert_eq!(a.id_key().id(b"x"), a.id_key().id(b"x"));
        assert_ne!(a.id_key().id(b"x"), a.id_key().id(b"y"));
        assert_ne!(a.id_key().id(b"x"), b.id_key().id(b"x"));
    }

    #[test]
    fn a_backup_key_round_trips_and_matches_its_master() {
        let master = MasterKey::generate(&mut rand::thread_rng());
        let backup = master.backup_key();
        let again = BackupKey::from_bytes(&backup.to_bytes());
        assert_eq!(again.seal, master.open_key().public());
        assert_eq!(again.id.id(b"data"), master.id_key().id(b"data"));
    }
}
