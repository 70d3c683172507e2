//! The cryptography of secure mode (`docs/PROTOCOL.md` §12), apart from TLS
//! itself: the server's certificate fingerprint, the session secret and what
//! is derived from it, and the client's proof of possession.
//!
//! Every primitive is a reviewed one (SHA-256, HKDF-SHA-256, HMAC-SHA-256,
//! RSA-OAEP-SHA-256); this module only fixes how they are combined:
//!
//! ```text
//! secret       = 32 random bytes from the server, RSA-OAEP-SHA-256-wrapped
//!                to the client's registered public key (1602 / 1605)
//! proof_key    = HKDF-SHA-256(ikm = secret, salt = none, info = "backup v4 proof key")
//! content_key  = HKDF-SHA-256(ikm = secret, salt = none, info = "backup v4 content key")
//! binding      = TLS-Exporter("EXPORTER-backup-v4-client-proof", context = none, 32)
//! proof        = HMAC-SHA-256(proof_key, "backup v4 proof" || client id || binding)
//! ```
//!
//! The binding is unique to one TLS connection, so a proof relayed or
//! replayed on another connection does not verify; the secret can only be
//! read with the client's private key, so a proof cannot be made without it.
//!
//! The legacy listener has no TLS, but retrieval there needs a proof too
//! (`docs/PROTOCOL.md` §11.5). Its input is the session's AES key, which the
//! server draws afresh for every connection and sends wrapped to the
//! client's key (1602 / 1605), so it plays the part of a server nonce:
//!
//! ```text
//! proof_key = HKDF-SHA-256(ikm = session AES key, salt = none, info = "backup v3 retrieval proof key")
//! proof     = HMAC-SHA-256(proof_key, "backup v3 retrieval proof" || client id)
//! ```

use hmac::{Hmac, Mac};
use rand::{CryptoRng, RngCore};
use rsa::{Oaep, RsaPublicKey};
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::crypto::{AesKey, CryptoError, PrivateKey};
use crate::wire::ClientId;

/// TLS exporter label of the channel binding (RFC 8446 §7.5).
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-backup-v4-client-proof";
/// ALPN protocol name of secure mode.
pub const ALPN: &[u8] = b"backup/4";
/// Bytes of the channel binding, the secret and the proof.
pub const BINDING_LEN: usize = 32;
/// Bytes of a proof (an HMAC-SHA-256 tag).
pub const PROOF_LEN: usize = 32;
/// Modulus size of the keys new secure-mode clients generate.
pub const SECURE_RSA_BITS: usize = 3072;
/// The smallest key a secure-mode registration may bind. (A client
/// registered on the legacy listener keeps its 1024-bit key and may still
/// prove it; it cannot register a new one this small.)
pub const MIN_SECURE_REGISTER_BITS: usize = 3072;
/// The longest public key (SubjectPublicKeyInfo DER) a registration may
/// carry. The field has room for an 8192-bit key, but a key over
/// [`crate::crypto::MAX_RSA_BITS`] (4096) is refused when it is parsed.
pub const MAX_PUBLIC_KEY_DER: usize = 1100;
/// Public exponent of new secure-mode keys.
pub const SECURE_RSA_EXPONENT: u32 = 65537;

const PROOF_KEY_INFO: &[u8] = b"backup v4 proof key";
const CONTENT_KEY_INFO: &[u8] = b"backup v4 content key";
const PROOF_CONTEXT: &[u8] = b"backup v4 proof";
const LEGACY_PROOF_KEY_INFO: &[u8] = b"backup v3 retrieval proof key";
const LEGACY_PROOF_CONTEXT: &[u8] = b"backup v3 retrieval proof";

/// The channel binding of one TLS connection (its exporter value).
pub type Binding = [u8; BINDING_LEN];

/// SHA-256 of a server's certificate (DER): what a client pins.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint of a DER certificate.
    pub fn of_certificate(der: &[u8]) -> Self {
        Self(Sha256::digest(der).into())
    }
}

impl std::fmt::Display for Fingerprint {
    /// `SHA256:` and 64 lowercase hex digits.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SHA256:{}", hex::encode(self.0))
    }
}

impl std::fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// Why a fingerprint did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a fingerprint is \"SHA256:\" and 64 hex digits (colons allowed), not {0:?}")]
pub struct FingerprintError(pub String);

impl std::str::FromStr for Fingerprint {
    type Err = FingerprintError;

    /// Accepts `SHA256:<hex>` or bare hex, in any case, with or without
    /// colons between the bytes.
    fn from_str(text: &str) -> Result<Self, FingerprintError> {
        let trimmed = text.trim();
        let body = trimmed
            .strip_prefix("SHA256:")
            .or_else(|| trimmed.strip_prefix("sha256:"))
            .unwrap_or(trimmed);
        let digits: String = body.chars().filter(|c| *c != ':').collect();
        let mut out = [0u8; 32];
        hex::decode_to_slice(&digits, &mut out).map_err(|_| FingerprintError(text.to_owned()))?;
        Ok(Self(out))
    }
}

/// The 32-byte secret of one secure session; zeroed when dropped.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct SessionSecret([u8; 32]);

impl std::fmt::Debug for SessionSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionSecret(<redacted>)")
    }
}

impl SessionSecret {
    /// A fresh secret.
    pub fn random<R: CryptoRng + RngCore + ?Sized>(rng: &mut R) -> Self {
        let mut bytes = [0u8; 32];
        rng.fill_bytes(&mut bytes);
        Self(bytes)
    }

    /// Wraps the secret for `public` with RSA-OAEP-SHA-256 (MGF1-SHA-256,
    /// empty label). A public-key operation only.
    ///
    /// # Errors
    /// When the modulus is too small for the message (never for >= 1024 bits).
    pub fn wrap<R: CryptoRng + RngCore>(
        &self,
        rng: &mut R,
        public: &RsaPublicKey,
    ) -> Result<Vec<u8>, CryptoError> {
        Ok(public.encrypt(rng, Oaep::new::<Sha256>(), &self.0)?)
    }

    /// Recovers a secret wrapped by [`SessionSecret::wrap`]. Blinded, so its
    /// timing does not depend on the private exponent.
    ///
    /// # Errors
    /// When decryption fails or the result is not 32 bytes.
    pub fn unwrap<R: CryptoRng + RngCore>(
        private: &PrivateKey,
        rng: &mut R,
        wrapped: &[u8],
    ) -> Result<Self, CryptoError> {
        let plain = zeroize::Zeroizing::new(private.as_rsa().decrypt_blinded(
            rng,
            Oaep::new::<Sha256>(),
            wrapped,
        )?);
        let bytes: [u8; 32] = plain
            .as_slice()
            .try_into()
            .map_err(|_| CryptoError::AesKeyLength(plain.len()))?;
        Ok(Self(bytes))
    }

    fn expand(&self, info: &[u8]) -> zeroize::Zeroizing<[u8; 32]> {
        expand(&self.0, info)
    }

    /// The AES-256 key of the session's content (uploads and restores).
    pub fn content_key(&self) -> AesKey {
        AesKey::from_bytes(*self.expand(CONTENT_KEY_INFO))
    }

    /// The proof for `client_id` on the connection with `binding`.
    pub fn proof(&self, client_id: ClientId, binding: &Binding) -> [u8; PROOF_LEN] {
        self.mac(client_id, binding).finalize().into_bytes().into()
    }

    /// Whether `proof` is the proof for `client_id` on the connection with
    /// `binding`. Compared in constant time.
    pub fn verify(&self, client_id: ClientId, binding: &Binding, proof: &[u8]) -> bool {
        self.mac(client_id, binding).verify_slice(proof).is_ok()
    }

    fn mac(&self, client_id: ClientId, binding: &Binding) -> Hmac<Sha256> {
        let mut mac = keyed_mac(&self.expand(PROOF_KEY_INFO));
        mac.update(PROOF_CONTEXT);
        mac.update(&client_id.0);
        mac.update(binding);
        mac
    }
}

/// HKDF-SHA-256 of `ikm` without salt, expanded to 32 bytes for `info`.
fn expand(ikm: &[u8], info: &[u8]) -> zeroize::Zeroizing<[u8; 32]> {
    let mut out = zeroize::Zeroizing::new([0u8; 32]);
    // Expand fails only past 255 blocks (8160 bytes); 32 bytes never do.
    let _ = hkdf::Hkdf::<Sha256>::new(None, ikm).expand(info, out.as_mut());
    out
}

/// HMAC-SHA-256 under `key`, ready for its message.
fn keyed_mac(key: &[u8; 32]) -> Hmac<Sha256> {
    // HMAC takes keys of any length; this cannot fail.
    <Hmac<Sha256> as Mac>::new_from_slice(key)
        .unwrap_or_else(|_| <Hmac<Sha256> as Mac>::new(&Default::default()))
}

fn legacy_mac(session_key: &AesKey, client_id: ClientId) -> Hmac<Sha256> {
    let mut mac = keyed_mac(&expand(session_key.as_bytes(), LEGACY_PROOF_KEY_INFO));
    mac.update(LEGACY_PROOF_CONTEXT);
    mac.update(&client_id.0);
    mac
}

/// The proof a legacy (version 3) client sends before retrieval
/// (`docs/PROTOCOL.md` §11.5): derived from the connection's AES key, which
/// only the holder of the client's private key can unwrap.
pub fn legacy_retrieval_proof(session_key: &AesKey, client_id: ClientId) -> [u8; PROOF_LEN] {
    legacy_mac(session_key, client_id)
        .finalize()
        .into_bytes()
        .into()
}

/// Whether `proof` is [`legacy_retrieval_proof`] of `session_key` and
/// `client_id`. Compared in constant time.
pub fn verify_legacy_retrieval_proof(
    session_key: &AesKey,
    client_id: ClientId,
    proof: &[u8],
) -> bool {
    legacy_mac(session_key, client_id)
        .verify_slice(proof)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn round_trips_a_fingerprint_in_every_accepted_spelling() {
        let fp = Fingerprint::of_certificate(b"certificate");
        let text = fp.to_string();
        assert!(text.starts_with("SHA256:"));
        assert_eq!(text.len(), 7 + 64);
        assert_eq!(text.parse::<Fingerprint>().unwrap(), fp);
        let bare = hex::encode_upper(fp.0);
        assert_eq!(bare.parse::<Fingerprint>().unwrap(), fp);
        let colons: Vec<String> = fp.0.iter().map(|b| format!("{b:02X}")).collect();
        assert_eq!(colons.join(":").parse::<Fingerprint>().unwrap(), fp);
        assert!("SHA256:abcd".parse::<Fingerprint>().is_err());
        assert!(format!("SHA256:{}zz", &text[7..69])
            .parse::<Fingerprint>()
            .is_err());
    }

    #[test]
    fn proof_verifies_only_for_its_secret_client_and_binding() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let secret = SessionSecret::random(&mut rng);
        let other = SessionSecret::random(&mut rng);
        let id = ClientId([1; 16]);
        let binding = [2u8; 32];
        let proof = secret.proof(id, &binding);
        assert!(secret.verify(id, &binding, &proof));
        assert!(!other.verify(id, &binding, &proof));
        assert!(!secret.verify(ClientId([3; 16]), &binding, &proof));
        assert!(!secret.verify(id, &[9u8; 32], &proof));
        assert!(!secret.verify(id, &binding, &proof[..31]));
        let mut flipped = proof;
        flipped[0] ^= 1;
        assert!(!secret.verify(id, &binding, &flipped));
    }

    #[test]
    fn legacy_proof_verifies_only_for_its_session_key_and_client() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(10);
        let key = AesKey::random(&mut rng);
        let other = AesKey::random(&mut rng);
        let id = ClientId([1; 16]);
        let proof = legacy_retrieval_proof(&key, id);
        assert!(verify_legacy_retrieval_proof(&key, id, &proof));
        assert!(!verify_legacy_retrieval_proof(&other, id, &proof));
        assert!(!verify_legacy_retrieval_proof(
            &key,
            ClientId([3; 16]),
            &proof
        ));
        assert!(!verify_legacy_retrieval_proof(&key, id, &proof[..31]));
        let mut flipped = proof;
        flipped[31] ^= 0x80;
        assert!(!verify_legacy_retrieval_proof(&key, id, &flipped));
    }

    #[test]
    fn legacy_proof_is_neither_the_key_nor_a_secure_mode_proof() {
        let key = AesKey::from_bytes([7; 32]);
        let id = ClientId([2; 16]);
        let proof = legacy_retrieval_proof(&key, id);
        assert_ne!(&proof, key.as_bytes());
        // The same 32 bytes as a secure-mode secret, with an all-zero
        // binding, give another proof: the labels keep the two apart.
        let secret = SessionSecret([7; 32]);
        assert_ne!(proof, secret.proof(id, &[0; 32]));
    }

    #[test]
    fn derives_distinct_content_keys_per_secret() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(8);
        let a = SessionSecret::random(&mut rng);
        let b = SessionSecret::random(&mut rng);
        assert_eq!(a.content_key().as_bytes(), a.content_key().as_bytes());
        assert_ne!(a.content_key().as_bytes(), b.content_key().as_bytes());
        assert_ne!(a.content_key().as_bytes(), &a.0);
    }

    #[test]
    fn unwraps_a_wrapped_secret_with_the_private_key_only() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let private = PrivateKey::generate_legacy(&mut rng).unwrap();
        let stranger = PrivateKey::generate_legacy(&mut rng).unwrap();
        let secret = SessionSecret::random(&mut rng);
        let wrapped = secret.wrap(&mut rng, &private.public_key()).unwrap();
        let back = SessionSecret::unwrap(&private, &mut rng, &wrapped).unwrap();
        assert_eq!(back.0, secret.0);
        assert!(SessionSecret::unwrap(&stranger, &mut rng, &wrapped).is_err());
        // A legacy (SHA-1) wrapping of the same bytes is not accepted.
        let legacy = crate::crypto::wrap_aes_key(
            &mut rng,
            &private.public_key(),
            &AesKey::from_bytes(secret.0),
        )
        .unwrap();
        assert!(SessionSecret::unwrap(&private, &mut rng, &legacy).is_err());
    }
}
