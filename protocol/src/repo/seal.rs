//! Sealing objects: compression, then AES-256-GCM under a key that only
//! the holder of the open key can derive (`docs/PROTOCOL.md` §13.3).
//!
//! ```text
//! sealed   = format u8 (1) || ephemeral[32] || nonce[12] || AES-256-GCM(session_key, nonce, aad, inner)
//! inner    = compression u8 (0 none, 1 zstd) || body
//! session_key = BLAKE3-derive("backup v4 session key", X25519(e, seal_public) || ephemeral || seal_public)
//! nonce    = counter u64 LE || 0u32
//! aad      = the object id (objects) or "backup v4 snapshot" || time u64 LE (snapshot descriptions)
//! ```
//!
//! Each [`Sealer`] draws a fresh ephemeral X25519 key, so its session key
//! is fresh, and numbers its nonces from a counter it alone advances: a
//! nonce never repeats under one key, whatever other sealers (other runs,
//! other machines with a backup-only key) do at the same time. The AAD
//! binds an object to its id, so a server cannot answer a fetch with
//! another object of the same client; the opener also recomputes the id.

use std::sync::atomic::{AtomicU64, Ordering};

use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use rand::{CryptoRng, RngCore};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use crate::repo::keys::{IdKey, OpenKey, SealPublic};
use crate::repo::message::ObjectId;

/// The format byte of a sealed object.
pub const FORMAT: u8 = 1;
/// Bytes a seal adds in front: format, ephemeral key, nonce.
pub const HEAD_LEN: usize = 1 + 32 + 12;
/// Bytes of the GCM tag at the end.
pub const TAG_LEN: usize = 16;
/// Everything sealing adds to a body, with the compression byte.
pub const OVERHEAD: usize = HEAD_LEN + 1 + TAG_LEN;

const SESSION_CONTEXT: &str = "backup v4 session key";
const SNAPSHOT_AAD: &[u8] = b"backup v4 snapshot";
const NONE: u8 = 0;
const ZSTD: u8 = 1;
/// zstd's level 1: on incompressible data it gives up at about 2.5 GB/s
/// here, on text it keeps most of level 3's ratio at twice the speed.
const ZSTD_LEVEL: i32 = 1;

/// Why a sealed object could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error("the object is too short to be sealed")]
    Short,
    #[error("unknown object format {0}")]
    Format(u8),
    #[error("the object failed authentication: altered, or sealed under another key")]
    Tag,
    #[error("unknown compression {0}")]
    Compression(u8),
    #[error("the object does not decompress: {0}")]
    Decompress(String),
    #[error("the object's content does not match its id")]
    WrongId,
    #[error("the object decompresses to more than {0} bytes")]
    TooLarge(usize),
}

fn session_key(shared: &[u8; 32], ephemeral: &[u8; 32], public: &[u8; 32]) -> Zeroizing<[u8; 32]> {
    let mut hasher = blake3::Hasher::new_derive_key(SESSION_CONTEXT);
    hasher.update(shared).update(ephemeral).update(public);
    Zeroizing::new(*hasher.finalize().as_bytes())
}

/// Seals objects for one run; shared by the pipeline's workers.
pub struct Sealer {
    ephemeral: [u8; 32],
    cipher: Aes256Gcm,
    counter: AtomicU64,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer").finish_non_exhaustive()
    }
}

impl Sealer {
    /// A sealer with a fresh ephemeral key, sealing to `public`.
    pub fn new<R: CryptoRng + RngCore>(public: &SealPublic, rng: &mut R) -> Self {
        let secret = StaticSecret::random_from_rng(&mut *rng);
        let ephemeral = PublicKey::from(&secret).to_bytes();
        let shared = Zeroizing::new(secret.diffie_hellman(&public.0).to_bytes());
        let key = session_key(&shared, &ephemeral, public.as_bytes());
        Self {
            ephemeral,
            cipher: Aes256Gcm::new(key.as_slice().into()),
            counter: AtomicU64::new(0),
        }
    }

    /// Seals `plaintext` as the object `id` (compressing it when that
    /// shrinks it), appending to `out`.
    pub fn seal_object(&self, id: &ObjectId, plaintext: &[u8], out: &mut Vec<u8>) {
        self.seal(&id.0, plaintext, true, out);
    }

    /// Seals a snapshot description taken at `time`.
    pub fn seal_snapshot(&self, time: u64, plaintext: &[u8], out: &mut Vec<u8>) {
        self.seal(&snapshot_aad(time), plaintext, true, out);
    }

    /// Seals `inner` as the object `id` exactly as given: its first byte
    /// is read as the compression byte. What a peer holding only the
    /// public sealing key (a backup-only key) can make, so the opener's
    /// decompression is fuzzed behind a valid tag.
    #[cfg(feature = "fuzzing")]
    #[doc(hidden)]
    pub fn seal_inner_for_fuzzing(&self, id: &ObjectId, inner: &[u8], out: &mut Vec<u8>) {
        let start = out.len();
        let counter = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut nonce = [0u8; 12];
        nonce[..8].copy_from_slice(&counter.to_le_bytes());
        out.push(FORMAT);
        out.extend_from_slice(&self.ephemeral);
        out.extend_from_slice(&nonce);
        let body = start + HEAD_LEN;
        out.extend_from_slice(inner);
        if let Ok(tag) = self.cipher.encrypt_in_place_detached(
            Nonce::from_slice(&nonce),
            &id.0,
            out.get_mut(body..).unwrap_or_default(),
        ) {
            out.extend_from_slice(&tag);
        }
    }

    fn seal(&self, aad: &[u8], plaintext: &[u8], compress: bool, out: &mut Vec<u8>) {
        let start = out.len();
        let counter = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut nonce = [0u8; 12];
        nonce[..8].copy_from_slice(&counter.to_le_bytes());
        out.reserve(OVERHEAD + plaintext.len());
        out.push(FORMAT);
        out.extend_from_slice(&self.ephemeral);
        out.extend_from_slice(&nonce);
        let body = start + HEAD_LEN;
        let compressed = compress && compress_into(plaintext, out);
        if !compressed {
            out.push(NONE);
            out.extend_from_slice(plaintext);
        }
        // Encryption in place cannot fail but for a length past GCM's
        // 64 GiB limit, far above any object.
        if let Ok(tag) = self.cipher.encrypt_in_place_detached(
            Nonce::from_slice(&nonce),
            aad,
            out.get_mut(body..).unwrap_or_default(),
        ) {
            out.extend_from_slice(&tag);
        }
    }
}

thread_local! {
    /// One compression context per thread: making one costs more than
    /// compressing a small object with it.
    static COMPRESSOR: std::cell::RefCell<Option<(zstd::bulk::Compressor<'static>, Vec<u8>)>> =
        const { std::cell::RefCell::new(None) };
}

/// Appends the zstd byte and `plaintext` compressed to `out`, when that
/// is shorter than `plaintext`; `false` (and `out` untouched) otherwise.
fn compress_into(plaintext: &[u8], out: &mut Vec<u8>) -> bool {
    COMPRESSOR.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.is_none() {
            *cell = zstd::bulk::Compressor::new(ZSTD_LEVEL)
                .ok()
                .map(|c| (c, Vec::new()));
        }
        let Some((compressor, scratch)) = cell.as_mut() else {
            return false;
        };
        scratch.clear();
        scratch.reserve(plaintext.len());
        // Output that would not fit in the plaintext's length fails here,
        // and the object is stored as it is.
        let shrunk = match compressor.compress_to_buffer(plaintext, scratch) {
            Ok(n) if n < plaintext.len() => match scratch.get(..n) {
                Some(packed) => {
                    out.push(ZSTD);
                    out.extend_from_slice(packed);
                    true
                }
                None => false,
            },
            _ => false,
        };
        // A large object's scratch is not kept for the next.
        if scratch.capacity() > 1 << 20 {
            *scratch = Vec::new();
        }
        shrunk
    })
}

fn snapshot_aad(time: u64) -> Vec<u8> {
    let mut aad = SNAPSHOT_AAD.to_vec();
    aad.extend_from_slice(&time.to_le_bytes());
    aad
}

/// Opens sealed objects; keeps the session key of the last ephemeral key
/// seen, as objects of one run come together.
pub struct Opener {
    key: OpenKey,
    last: Option<([u8; 32], Aes256Gcm)>,
}

impl std::fmt::Debug for Opener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opener").finish_non_exhaustive()
    }
}

impl Opener {
    pub fn new(key: OpenKey) -> Self {
        Self { key, last: None }
    }

    /// Opens the object `id`, checks that its plaintext hashes to `id`
    /// under `id_key`, and returns the plaintext (at most `max` bytes).
    ///
    /// # Errors
    /// When the object is malformed, altered, of another key, or not `id`.
    pub fn open_object(
        &mut self,
        id_key: &IdKey,
        id: &ObjectId,
        sealed: &[u8],
        max: usize,
    ) -> Result<Vec<u8>, OpenError> {
        let plain = self.open(&id.0, sealed, max)?;
        if id_key.id(&plain) != *id {
            return Err(OpenError::WrongId);
        }
        Ok(plain)
    }

    /// Opens a snapshot description that the server lists with `time`.
    ///
    /// # Errors
    /// As [`Opener::open_object`]; a changed time fails authentication.
    pub fn open_snapshot(
        &mut self,
        time: u64,
        sealed: &[u8],
        max: usize,
    ) -> Result<Vec<u8>, OpenError> {
        self.open(&snapshot_aad(time), sealed, max)
    }

    fn open(&mut self, aad: &[u8], sealed: &[u8], max: usize) -> Result<Vec<u8>, OpenError> {
        if sealed.len() < OVERHEAD {
            return Err(OpenError::Short);
        }
        let (head, rest) = sealed.split_at(HEAD_LEN);
        let format = head.first().copied().unwrap_or_default();
        if format != FORMAT {
            return Err(OpenError::Format(format));
        }
        let mut ephemeral = [0u8; 32];
        ephemeral.copy_from_slice(head.get(1..33).unwrap_or(&[0; 32]));
        let nonce = head.get(33..HEAD_LEN).unwrap_or(&[0; 12]);
        let (body, tag) = rest.split_at(rest.len() - TAG_LEN);
        let cipher = match &self.last {
            Some((e, cipher)) if *e == ephemeral => cipher,
            _ => {
                let shared = self.key.agree(&ephemeral);
                let public = self.key.public();
                let key = session_key(&shared, &ephemeral, public.as_bytes());
                &self
                    .last
                    .insert((ephemeral, Aes256Gcm::new(key.as_slice().into())))
                    .1
            }
        };
        let mut inner = body.to_vec();
        cipher
            .decrypt_in_place_detached(
                Nonce::from_slice(nonce),
                aad,
                &mut inner,
                aes_gcm::Tag::from_slice(tag),
            )
            .map_err(|_| OpenError::Tag)?;
        let compression = inner.first().copied().unwrap_or_default();
        match compression {
            NONE => {
                inner.remove(0);
                if inner.len() > max {
                    return Err(OpenError::TooLarge(max));
                }
                Ok(inner)
            }
            ZSTD => {
                let data = inner.get(1..).unwrap_or_default();
                let mut out = Vec::new();
                let mut decoder = zstd::stream::read::Decoder::new(data)
                    .map_err(|e| OpenError::Decompress(e.to_string()))?;
                // The window bounds what decoding allocates: 32 MiB, twice
                // the largest object, not the 128 MiB a frame may ask for.
                decoder
                    .window_log_max(25)
                    .map_err(|e| OpenError::Decompress(e.to_string()))?;
                // Read one byte past the limit to tell "exactly max" from "more".
                let limit = u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1);
                std::io::Read::read_to_end(&mut std::io::Read::take(&mut decoder, limit), &mut out)
                    .map_err(|e| OpenError::Decompress(e.to_string()))?;
                if out.len() > max {
                    return Err(OpenError::TooLarge(max));
                }
                Ok(out)
            }
            other => Err(OpenError::Compression(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::keys::MasterKey;

    fn keys() -> MasterKey {
        MasterKey::generate(&mut rand::thread_rng())
    }

    #[test]
    fn sealed_objects_open_with_the_master_key_only() {
        let master = keys();
        let sealer = Sealer::new(&master.backup_key().seal, &mut rand::thread_rng());
        let id_key = master.id_key();
        for plain in [&b""[..], b"hello", &[7u8; 100_000][..]] {
            let id = id_key.id(plain);
            let mut sealed = Vec::new();
            sealer.seal_object(&id, plain, &mut sealed);
            let mut opener = Opener::new(master.open_key());
            assert_eq!(
                opener.open_object(&id_key, &id, &sealed, 1 << 20).unwrap(),
                plain
            );
            let other = keys();
            let mut wrong = Opener::new(other.open_key());
            assert_eq!(
                wrong.open_object(&id_key, &id, &sealed, 1 << 20),
                Err(OpenError::Tag)
            );
        }
    }

    #[test]
    fn compressible_objects_shrink_and_random_ones_do_not_grow_past_the_overhead() {
        let master = keys();
        let sealer = Sealer::new(&master.backup_key().seal, &mut rand::thread_rng());
        let text = b"abcdefgh".repeat(10_000);
        let mut sealed = Vec::new();
        sealer.seal_object(&master.id_key().id(&text), &text, &mut sealed);
        assert!(sealed.len() < text.len() / 10, "{}", sealed.len());
        let mut random = vec![0u8; 50_000];
        rand::thread_rng().fill_bytes(&mut random);
        sealed.clear();
        sealer.seal_object(&master.id_key().id(&random), &random, &mut sealed);
        assert_eq!(sealed.len(), random.len() + OVERHEAD);
    }

    #[test]
    fn every_altered_byte_and_a_swapped_id_are_caught() {
        let master = keys();
        let id_key = master.id_key();
        let sealer = Sealer::new(&master.backup_key().seal, &mut rand::thread_rng());
        let plain = b"some content of a file".to_vec();
        let id = id_key.id(&plain);
        let mut sealed = Vec::new();
        sealer.seal_object(&id, &plain, &mut sealed);
        let mut opener = Opener::new(master.open_key());
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x01;
            assert!(
                opener.open_object(&id_key, &id, &bad, 1 << 20).is_err(),
                "byte {i}"
            );
        }
        let other = id_key.id(b"other");
        assert_eq!(
            opener.open_object(&id_key, &other, &sealed, 1 << 20),
            Err(OpenError::Tag)
        );
        assert_eq!(
            opener.open_object(&id_key, &id, &sealed[..10], 1 << 20),
            Err(OpenError::Short)
        );
    }

    #[test]
    fn nonces_never_repeat_within_a_sealer_and_sealers_use_fresh_keys() {
        let master = keys();
        let public = master.backup_key().seal;
        let a = Sealer::new(&public, &mut rand::thread_rng());
        let b = Sealer::new(&public, &mut rand::thread_rng());
        assert_ne!(a.ephemeral, b.ephemeral);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            let mut out = Vec::new();
            a.seal_object(&ObjectId::default(), b"x", &mut out);
            assert!(seen.insert(out[..HEAD_LEN].to_vec()));
        }
    }

    #[test]
    fn a_snapshot_description_is_bound_to_its_time() {
        let master = keys();
        let sealer = Sealer::new(&master.backup_key().seal, &mut rand::thread_rng());
        let mut sealed = Vec::new();
        sealer.seal_snapshot(1000, b"description", &mut sealed);
        let mut opener = Opener::new(master.open_key());
        assert_eq!(
            opener.open_snapshot(1000, &sealed, 1024).unwrap(),
            b"description"
        );
        assert_eq!(
            opener.open_snapshot(1001, &sealed, 1024),
            Err(OpenError::Tag)
        );
    }

    #[test]
    fn decompression_is_bounded() {
        let master = keys();
        let id_key = master.id_key();
        let sealer = Sealer::new(&master.backup_key().seal, &mut rand::thread_rng());
        let plain = vec![0u8; 1 << 20];
        let id = id_key.id(&plain);
        let mut sealed = Vec::new();
        sealer.seal_object(&id, &plain, &mut sealed);
        let mut opener = Opener::new(master.open_key());
        assert_eq!(
            opener.open_object(&id_key, &id, &sealed, 1000),
            Err(OpenError::TooLarge(1000))
        );
    }
}
