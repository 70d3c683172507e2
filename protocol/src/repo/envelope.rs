//! Key envelopes: the master key (or a backup-only key) as the server
//! keeps it (`docs/PROTOCOL.md` §13.2). The server stores envelopes and
//! hands them back after the client's proof; it can open none of them.
//!
//! ```text
//! RSA envelope        = kind u8 (1 full key, 2 backup-only key) || len u16 || wrapped || signature
//!   wrapped           = RSA-OAEP-SHA-256(client public key, key bytes)
//!   signature         = RSA-PSS-SHA-256(client private key, "backup v4 key envelope" || kind || wrapped)
//! passphrase envelope = kind u8 (3) || m_cost u32 || t_cost u32 || p_cost u32 || salt[16] || nonce[12]
//!                       || AES-256-GCM(Argon2id(passphrase, salt), nonce, aad = kind, master key)
//! ```
//!
//! The signature matters: anyone can wrap a key for a public key, the
//! server included. Without it a server could hand a client a master key
//! of its own making, and read every later backup. A client accepts only
//! an envelope its own private key signed.

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
    fn acceptable(&self) -> bool {
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

fn passphrase_key(
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

/// Seals the master key under `passphrase`.
///
/// # Errors
/// When Argon2 refuses the costs.
pub fn seal_with_passphrase<R: CryptoRng + RngCore>(
    master: &MasterKey,
    passphrase: &[u8],
    cost: PassphraseCost,
    rng: &mut R,
) -> Result<Vec<u8>, EnvelopeError> {
    let mut salt = [0u8; 16];
    rng.fill_bytes(&mut salt);
    let mut nonce = [0u8; 12];
    rng.fill_bytes(&mut nonce);
    let key = passphrase_key(passphrase, &salt, cost)?;
    let kind = EnvelopeKind::Passphrase as u8;
    let sealed = Aes256Gcm::new(key.as_slice().into())
        .encrypt(
            Nonce::from_slice(&nonce),
            aes_gcm::aead::Payload {
                msg: master.as_bytes(),
                aad: &[kind],
            },
        )
        .map_err(|e| EnvelopeError::Make(e.to_string()))?;
    let mut out = vec![kind];
    for v in [cost.m_kib, cost.t, cost.p] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(&salt);
    out.extend_from_slice(&nonce);
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
    if envelope.first() != Some(&(EnvelopeKind::Passphrase as u8))
        || envelope.len() != 1 + 12 + 16 + 12 + 32 + 16
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
    let salt = envelope.get(13..29).ok_or(EnvelopeError::Malformed)?;
    let nonce = envelope.get(29..41).ok_or(EnvelopeError::Malformed)?;
    let sealed = envelope.get(41..).ok_or(EnvelopeError::Malformed)?;
    let key = passphrase_key(passphrase, salt, cost)?;
    let plain = Zeroizing::new(
        Aes256Gcm::new(key.as_slice().into())
            .decrypt(
                Nonce::from_slice(nonce),
                aes_gcm::aead::Payload {
                    msg: sealed,
                    aad: &[EnvelopeKind::Passphrase as u8],
                },
            )
            .map_err(|_| EnvelopeError::WrongPassphrase)?,
    );
    let bytes: [u8; 32] = plain
        .as_slice()
        .try_into()
        .map_err(|_| EnvelopeError::Malformed)?;
    Ok(MasterKey::from_bytes(bytes))
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
        let mut costly = envelope.clone();
        costly[1..5].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            open_with_passphrase(&costly, b"correct horse"),
            Err(EnvelopeError::Malformed)
        ));
    }
}
