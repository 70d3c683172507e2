//! Key envelopes: the master key (or a backup-only key) as the server
//! keeps it (`docs/PROTOCOL.md` §13.2). The server stores envelopes and
//! hands them back after the client's proof; it can open none of them.
//!
//! ```text
//! RSA envelope        = kind u8 (1 full key, 2 backup-only key) || len u16 || wrapped || signature
//!   wrapped           = RSA-OAEP-SHA-256(client public key, key bytes)
//!   signature         = RSA-PSS-SHA-256(client private key, "backup v4 key envelope" || kind || wrapped)
//! passphrase envelope = kind u8 (3) || m_cost u32 || t_cost u32 || p_cost u32 || salt[16]
//!                       || login_public[32] || nonce[12]
//!                       || AES-256-GCM(envelope_key, nonce, aad = every byte before it, master key)
//!   root              = Argon2id(passphrase, salt, m_cost, t_cost, p_cost), 32 bytes
//!   envelope_key      = BLAKE3-derive-key("backup v4 passphrase envelope key", root)
//!   login key         = Ed25519 from the seed BLAKE3-derive-key("backup v4 passphrase login key", root)
//! ```
//!
//! The signature matters: anyone can wrap a key for a public key, the
//! server included. Without it a server could hand a client a master key
//! of its own making, and read every later backup. A client accepts only
//! an envelope its own private key signed.
//!
//! The server reads the head of a passphrase envelope (costs, salt, login
//! public key) to let a client that has lost its RSA key log in with the
//! passphrase alone (`docs/PROTOCOL.md` §13.6); it learns nothing that
//! opens the envelope.

use aes_gcm::aead::Aead;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use rand::{CryptoRng, RngCore};
use rsa::pss::{BlindedSigningKey, Signature, VerifyingKey};
use rsa::signature::{RandomizedSigner, SignatureEncoding, Verifier};
use rsa::{Oaep, RsaPublicKey};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::crypto::PrivateKey;
use crate::repo::keys::{BackupKey, MasterKey, BACKUP_KEY_LEN};

const SIGNED: &[u8] = b"backup v4 key envelope";

/// What an envelope holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EnvelopeKind {
    /// The master key, for the client's RSA key.
    Full = 1,
    /// A backup-only key, for the client's RSA key.
    BackupOnly = 2,
    /// The master key, under a passphrase.
    Passphrase = 3,
}

/// The key an envelope gave up.
pub enum Unwrapped {
    Full(MasterKey),
    BackupOnly(BackupKey),
}

/// Why an envelope could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("the key envelope is malformed")]
    Malformed,
    #[error("the key envelope was not made by this client's key")]
    BadSignature,
    #[error("this client's private key does not open the key envelope")]
    WrongKey,
    #[error("wrong passphrase")]
    WrongPassphrase,
    #[error("cannot make the envelope: {0}")]
    Make(String),
}

/// Argon2id costs of a passphrase envelope. The defaults follow RFC 9106's
/// second recommendation (64 MiB, 3 passes, 4 lanes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PassphraseCost {
    pub m_kib: u32,
    pub t: u32,
    pub p: u32,
}

impl Default for PassphraseCost {
    fn default() -> Self {
        Self {
            m_kib: 64 * 1024,
            t: 3,
            p: 4,
        }
    }
}

impl PassphraseCost {
    /// Costs a peer may make us pay: at most 1 GiB and 10 passes.
    pub fn acceptable(&self) -> bool {
        (8..=1 << 20).contains(&self.m_kib)
            && (1..=10).contains(&self.t)
            && (1..=16).contains(&self.p)
    }
}

fn signed_bytes(kind: u8, wrapped: &[u8]) -> Vec<u8> {
    let mut m = SIGNED.to_vec();
    m.push(kind);
    m.extend_from_slice(wrapped);
    m
}

/// Wraps `key` for `private`'s public key and signs the envelope.
///
/// # Errors
/// When RSA fails (a key too small for the payload).
pub fn seal_for_rsa<R: CryptoRng + RngCore>(
    private: &PrivateKey,
    key: &Unwrapped,
    rng: &mut R,
) -> Result<Vec<u8>, EnvelopeError> {
    let (kind, bytes): (u8, Zeroizing<Vec<u8>>) = match key {
        Unwrapped::Full(m) => (
            EnvelopeKind::Full as u8,
            Zeroizing::new(m.as_bytes().to_vec()),
        ),
        Unwrapped::BackupOnly(b) => (
            EnvelopeKind::BackupOnly as u8,
            Zeroizing::new(b.to_bytes().to_vec()),
        ),
    };
    let public = RsaPublicKey::from(private.as_rsa());
    let wrapped = public
        .encrypt(rng, Oaep::new::<Sha256>(), &bytes)
        .map_err(|e| EnvelopeError::Make(e.to_string()))?;
    let signer = BlindedSigningKey::<Sha256>::new(private.as_rsa().clone());
    let signature = signer
        .try_sign_with_rng(rng, &signed_bytes(kind, &wrapped))
        .map_err(|e| EnvelopeError::Make(e.to_string()))?;
    let mut out = vec![kind];
    out.extend_from_slice(
        &u16::try_from(wrapped.len())
            .unwrap_or(u16::MAX)
            .to_le_bytes(),
    );
    out.extend_from_slice(&wrapped);
    out.extend_from_slice(&signature.to_bytes());
    Ok(out)
}

/// Opens an RSA envelope with `private`, after checking its signature.
///
/// # Errors
/// When the envelope is malformed, not signed by this key, or does not
/// decrypt.
pub fn open_with_rsa<R: CryptoRng + RngCore>(
    private: &PrivateKey,
    envelope: &[u8],
    rng: &mut R,
) -> Result<Unwrapped, EnvelopeError> {
    let kind = *envelope.first().ok_or(EnvelopeError::Malformed)?;
    let len = envelope
        .get(1..3)
        .and_then(|b| <[u8; 2]>::try_from(b).ok())
        .map(|b| usize::from(u16::from_le_bytes(b)))
        .ok_or(EnvelopeError::Malformed)?;
    let wrapped = envelope.get(3..3 + len).ok_or(EnvelopeError::Malformed)?;
    let signature = envelope.get(3 + len..).ok_or(EnvelopeError::Malformed)?;
    let signature = Signature::try_from(signature).map_err(|_| EnvelopeError::Malformed)?;
    let verifier = VerifyingKey::<Sha256>::new(RsaPublicKey::from(private.as_rsa()));
    verifier
        .verify(&signed_bytes(kind, wrapped), &signature)
        .map_err(|_| EnvelopeError::BadSignature)?;
    let plain = Zeroizing::new(
        private
            .as_rsa()
            .decrypt_blinded(rng, Oaep::new::<Sha256>(), wrapped)
            .map_err(|_| EnvelopeError::WrongKey)?,
    );
    match kind {
        k if k == EnvelopeKind::Full as u8 => {
            let bytes: [u8; 32] = plain
                .as_slice()
                .try_into()
                .map_err(|_| EnvelopeError::Malformed)?;
            Ok(Unwrapped::Full(MasterKey::from_bytes(bytes)))
        }
        k if k == EnvelopeKind::BackupOnly as u8 => {
            let bytes: [u8; BACKUP_KEY_LEN] = plain
                .as_slice()
                .try_into()
                .map_err(|_| EnvelopeError::Malformed)?;
            Ok(Unwrapped::BackupOnly(BackupKey::from_bytes(&bytes)))
        }
        _ => Err(EnvelopeError::Malformed),
    }
}

/// Argon2id of `passphrase` under `salt` and `cost`: the root both
/// passphrase keys derive from.
fn passphrase_root(
    passphrase: &[u8],
    salt: &[u8],
    cost: PassphraseCost,
) -> Result<Zeroizing<[u8; 32]>, EnvelopeError> {
    let params = argon2::Params::new(cost.m_kib, cost.t, cost.p, Some(32))
        .map_err(|e| EnvelopeError::Make(e.to_string()))?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut key = Zeroizing::new([0u8; 32]);
    argon
        .hash_password_into(passphrase, salt, key.as_mut_slice())
        .map_err(|e| EnvelopeError::Make(e.to_string()))?;
    Ok(key)
}

/// Bytes of the salt of a passphrase envelope.
pub const SALT_LEN: usize = 16;
/// Bytes of an Ed25519 public key (the passphrase login key).
pub const LOGIN_PUBLIC_LEN: usize = 32;
/// Bytes of the part of a passphrase envelope before its ciphertext:
/// kind, costs, salt, login public key, nonce. All of it is the AAD.
const PASSPHRASE_HEAD: usize = 1 + 12 + SALT_LEN + LOGIN_PUBLIC_LEN + 12;
/// Bytes of a passphrase envelope: the head, the sealed master key and its tag.
pub const PASSPHRASE_ENVELOPE_LEN: usize = PASSPHRASE_HEAD + 32 + 16;

const ENVELOPE_KEY_CONTEXT: &str = "backup v4 passphrase envelope key";
const LOGIN_KEY_CONTEXT: &str = "backup v4 passphrase login key";

/// The two keys a passphrase gives (`docs/PROTOCOL.md` §13.6): one opens
/// the envelope, the other signs a passphrase login. The server keeps
/// only the login key's public half, which tells it nothing of the
/// envelope key.
pub struct PassphraseKeys {
    envelope: Zeroizing<[u8; 32]>,
    login: ed25519_dalek::SigningKey,
}

impl std::fmt::Debug for PassphraseKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PassphraseKeys(..)")
    }
}

impl PassphraseKeys {
    /// Derives both keys: Argon2id, then two BLAKE3 derivations. Takes as
    /// long as the costs say (a second or so with the defaults).
    ///
    /// # Errors
    /// When the costs are beyond what we accept, or Argon2 refuses them.
    pub fn derive(
        passphrase: &[u8],
        salt: &[u8; SALT_LEN],
        cost: PassphraseCost,
    ) -> Result<Self, EnvelopeError> {
        if !cost.acceptable() {
            return Err(EnvelopeError::Malformed);
        }
        let root = passphrase_root(passphrase, salt, cost)?;
        let envelope = Zeroizing::new(blake3::derive_key(ENVELOPE_KEY_CONTEXT, root.as_slice()));
        let seed = Zeroizing::new(blake3::derive_key(LOGIN_KEY_CONTEXT, root.as_slice()));
        let login = ed25519_dalek::SigningKey::from_bytes(&seed);
        Ok(Self { envelope, login })
    }

    /// The login key's public half, as the envelope carries it.
    pub fn login_public(&self) -> [u8; LOGIN_PUBLIC_LEN] {
        self.login.verifying_key().to_bytes()
    }

    /// Signs a passphrase login (`docs/PROTOCOL.md` §13.6).
    pub fn sign_login(
        &self,
        client_id: crate::wire::ClientId,
        challenge: &[u8; crate::repo::message::CHALLENGE_LEN],
        binding: &crate::secure::Binding,
    ) -> [u8; crate::repo::message::SIGNATURE_LEN] {
        use ed25519_dalek::Signer;
        self.login
            .sign(&login_message(client_id, challenge, binding))
            .to_bytes()
    }

    /// Opens a passphrase envelope with these keys.
    ///
    /// # Errors
    /// When the envelope is malformed, or was made under another passphrase.
    pub fn open(&self, envelope: &[u8]) -> Result<MasterKey, EnvelopeError> {
        let head = PassphraseHead::parse(envelope)?;
        if head.login_public != self.login_public() {
            return Err(EnvelopeError::WrongPassphrase);
        }
        let (aad, sealed) = envelope.split_at(PASSPHRASE_HEAD);
        let nonce = aad
            .get(PASSPHRASE_HEAD - 12..)
            .ok_or(EnvelopeError::Malformed)?;
        let plain = Zeroizing::new(
            Aes256Gcm::new(self.envelope.as_slice().into())
                .decrypt(
                    Nonce::from_slice(nonce),
                    aes_gcm::aead::Payload { msg: sealed, aad },
                )
                .map_err(|_| EnvelopeError::WrongPassphrase)?,
        );
        let bytes: [u8; 32] = plain
            .as_slice()
            .try_into()
            .map_err(|_| EnvelopeError::Malformed)?;
        Ok(MasterKey::from_bytes(bytes))
    }
}

const LOGIN_CONTEXT: &[u8] = b"backup v4 passphrase login";

fn login_message(
    client_id: crate::wire::ClientId,
    challenge: &[u8; crate::repo::message::CHALLENGE_LEN],
    binding: &crate::secure::Binding,
) -> Vec<u8> {
    let mut m = LOGIN_CONTEXT.to_vec();
    m.extend_from_slice(&client_id.0);
    m.extend_from_slice(challenge);
    m.extend_from_slice(binding);
    m
}

/// What the server reads of a passphrase envelope, without any key: the
/// costs and salt a login needs, and the public key its signature must
/// verify under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PassphraseHead {
    pub cost: PassphraseCost,
    pub salt: [u8; SALT_LEN],
    pub login_public: [u8; LOGIN_PUBLIC_LEN],
}

impl PassphraseHead {
    /// Parses the head of a whole passphrase envelope and checks its costs
    /// and its login key.
    ///
    /// # Errors
    /// When the envelope is not one: wrong kind or length, costs beyond
    /// what a client accepts, or a login key that is not a valid point.
    pub fn parse(envelope: &[u8]) -> Result<Self, EnvelopeError> {
        if envelope.first() != Some(&(EnvelopeKind::Passphrase as u8))
            || envelope.len() != PASSPHRASE_ENVELOPE_LEN
        {
            return Err(EnvelopeError::Malformed);
        }
        let u32_at = |at: usize| {
            envelope
                .get(at..at + 4)
                .and_then(|b| b.try_into().ok())
                .map(u32::from_le_bytes)
                .unwrap_or_default()
        };
        let cost = PassphraseCost {
            m_kib: u32_at(1),
            t: u32_at(5),
            p: u32_at(9),
        };
        if !cost.acceptable() {
            return Err(EnvelopeError::Malformed);
        }
        let mut salt = [0u8; SALT_LEN];
        salt.copy_from_slice(
            envelope
                .get(13..13 + SALT_LEN)
                .ok_or(EnvelopeError::Malformed)?,
        );
        let mut login_public = [0u8; LOGIN_PUBLIC_LEN];
        login_public.copy_from_slice(
            envelope
                .get(13 + SALT_LEN..13 + SALT_LEN + LOGIN_PUBLIC_LEN)
                .ok_or(EnvelopeError::Malformed)?,
        );
        ed25519_dalek::VerifyingKey::from_bytes(&login_public)
            .map_err(|_| EnvelopeError::Malformed)?;
        Ok(Self {
            cost,
            salt,
            login_public,
        })
    }

    /// Whether `signature` signs a login of `client_id` on the connection
    /// with `binding`, answering `challenge`, under this envelope's login
    /// key. Strict verification: no malleable or small-order signatures.
    pub fn verify_login(
        &self,
        client_id: crate::wire::ClientId,
        challenge: &[u8; crate::repo::message::CHALLENGE_LEN],
        binding: &crate::secure::Binding,
        signature: &[u8; crate::repo::message::SIGNATURE_LEN],
    ) -> bool {
        let Ok(key) = ed25519_dalek::VerifyingKey::from_bytes(&self.login_public) else {
            return false;
        };
        let signature = ed25519_dalek::Signature::from_bytes(signature);
        key.verify_strict(&login_message(client_id, challenge, binding), &signature)
            .is_ok()
    }
}

/// Seals the master key under `passphrase`, with a fresh salt.
///
/// # Errors
/// When Argon2 refuses the costs.
pub fn seal_with_passphrase<R: CryptoRng + RngCore>(
    master: &MasterKey,
    passphrase: &[u8],
    cost: PassphraseCost,
    rng: &mut R,
) -> Result<Vec<u8>, EnvelopeError> {
    let mut salt = [0u8; SALT_LEN];
    rng.fill_bytes(&mut salt);
    let mut nonce = [0u8; 12];
    rng.fill_bytes(&mut nonce);
    let keys = PassphraseKeys::derive(passphrase, &salt, cost)?;
    let mut out = vec![EnvelopeKind::Passphrase as u8];
    for v in [cost.m_kib, cost.t, cost.p] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(&salt);
    out.extend_from_slice(&keys.login_public());
    out.extend_from_slice(&nonce);
    let sealed = Aes256Gcm::new(keys.envelope.as_slice().into())
        .encrypt(
            Nonce::from_slice(&nonce),
            aes_gcm::aead::Payload {
                msg: master.as_bytes(),
                aad: &out,
            },
        )
        .map_err(|e| EnvelopeError::Make(e.to_string()))?;
    out.extend_from_slice(&sealed);
    Ok(out)
}

/// Opens a passphrase envelope.
///
/// # Errors
/// When the envelope is malformed, asks for costs beyond what we accept,
/// or the passphrase is wrong.
pub fn open_with_passphrase(
    envelope: &[u8],
    passphrase: &[u8],
) -> Result<MasterKey, EnvelopeError> {
    let head = PassphraseHead::parse(envelope)?;
    PassphraseKeys::derive(passphrase, &head.salt, head.cost)?.open(envelope)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn private() -> PrivateKey {
        // 2048 bits keeps the test quick; the client uses 3072 and up.
        PrivateKey::generate(&mut rand::thread_rng(), 2048, 65537).unwrap()
    }

    #[test]
    fn rsa_envelopes_open_only_with_their_key_and_only_if_signed() {
        let mut rng = rand::thread_rng();
        let me = private();
        let master = MasterKey::generate(&mut rng);
        let envelope = seal_for_rsa(&me, &Unwrapped::Full(master.clone()), &mut rng).unwrap();
        match open_with_rsa(&me, &envelope, &mut rng).unwrap() {
            Unwrapped::Full(m) => assert_eq!(m.as_bytes(), master.as_bytes()),
            Unwrapped::BackupOnly(_) => panic!("wrong kind"),
        }
        let other = private();
        assert!(matches!(
            open_with_rsa(&other, &envelope, &mut rng),
            Err(EnvelopeError::BadSignature)
        ));
        // A server wraps a key of its own for our public key: unsigned by us.
        let forged_master = MasterKey::generate(&mut rng);
        let forged = seal_for_rsa(&other, &Unwrapped::Full(forged_master), &mut rng).unwrap();
        let mut spliced = forged.clone();
        let len = usize::from(u16::from_le_bytes([forged[1], forged[2]]));
        let wrapped = RsaPublicKey::from(me.as_rsa())
            .encrypt(&mut rng, Oaep::new::<Sha256>(), &[9u8; 32])
            .unwrap();
        assert_eq!(wrapped.len(), len);
        spliced[3..3 + len].copy_from_slice(&wrapped);
        assert!(matches!(
            open_with_rsa(&me, &spliced, &mut rng),
            Err(EnvelopeError::BadSignature)
        ));
        assert!(matches!(
            open_with_rsa(&me, &envelope[..2], &mut rng),
            Err(EnvelopeError::Malformed)
        ));
    }

    #[test]
    fn a_backup_only_envelope_gives_a_key_that_cannot_open() {
        let mut rng = rand::thread_rng();
        let me = private();
        let master = MasterKey::generate(&mut rng);
        let envelope =
            seal_for_rsa(&me, &Unwrapped::BackupOnly(master.backup_key()), &mut rng).unwrap();
        match open_with_rsa(&me, &envelope, &mut rng).unwrap() {
            Unwrapped::BackupOnly(b) => assert_eq!(b.seal, master.open_key().public()),
            Unwrapped::Full(_) => panic!("a backup-only envelope gave the full key"),
        }
    }

    #[test]
    fn passphrase_envelopes_open_with_the_passphrase_only() {
        let mut rng = rand::thread_rng();
        let master = MasterKey::generate(&mut rng);
        let cheap = PassphraseCost {
            m_kib: 64,
            t: 1,
            p: 1,
        };
        let envelope = seal_with_passphrase(&master, b"correct horse", cheap, &mut rng).unwrap();
        let opened = open_with_passphrase(&envelope, b"correct horse").unwrap();
        assert_eq!(opened.as_bytes(), master.as_bytes());
        assert!(matches!(
            open_with_passphrase(&envelope, b"wrong horse"),
            Err(EnvelopeError::WrongPassphrase)
        ));
        // The login key signs logins the envelope's head verifies, and
        // a login key of another passphrase does not.
        let head = PassphraseHead::parse(&envelope).unwrap();
        let keys = PassphraseKeys::derive(b"correct horse", &head.salt, head.cost).unwrap();
        let id = crate::wire::ClientId([1; 16]);
        let sig = keys.sign_login(id, &[2; 32], &[3; 32]);
        assert!(head.verify_login(id, &[2; 32], &[3; 32], &sig));
        assert!(!head.verify_login(id, &[2; 32], &[4; 32], &sig));
        assert!(!head.verify_login(crate::wire::ClientId([9; 16]), &[2; 32], &[3; 32], &sig));
        let other = PassphraseKeys::derive(b"wrong horse", &head.salt, head.cost).unwrap();
        assert!(!head.verify_login(
            id,
            &[2; 32],
            &[3; 32],
            &other.sign_login(id, &[2; 32], &[3; 32])
        ));
        // Costs and the login key are authenticated with the master key.
        let mut swapped = envelope.clone();
        swapped[13 + 16..13 + 16 + 32].copy_from_slice(&other.login_public());
        assert!(open_with_passphrase(&swapped, b"correct horse").is_err());
        let mut costly = envelope.clone();
        costly[1..5].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            open_with_passphrase(&costly, b"correct horse"),
            Err(EnvelopeError::Malformed)
        ));
    }
}
