//! The legacy crypto pipeline (`docs/PROTOCOL.md` §4): RSA key transport of
//! the session's AES key, and streaming AES-256-CBC with PKCS#7 padding.
//!
//! Everything here is built on the RustCrypto crates (`rsa`, `aes`, `cbc`,
//! `sha1`); the only code of our own is the block bookkeeping that lets CBC
//! run over arbitrary chunk boundaries.

use aes::cipher::{inout::InOutBuf, BlockDecryptMut, BlockEncryptMut, KeyIvInit};
use bytes::BytesMut;
use rsa::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use rsa::traits::PublicKeyParts;
use rsa::{BigUint, Oaep, RsaPrivateKey, RsaPublicKey};
use zeroize::{Zeroize, ZeroizeOnDrop};

/// Width of the public-key field of a 1026/826 request.
pub const PUBLIC_KEY_FIELD_LEN: usize = 160;

/// The raw 160-byte public-key field, kept as sent so that it re-encodes
/// byte for byte. See [`parse_public_key`].
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKeyField(pub [u8; PUBLIC_KEY_FIELD_LEN]);

impl std::fmt::Debug for PublicKeyField {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PublicKeyField({}..)",
            hex::encode(self.0.get(..8).unwrap_or_default())
        )
    }
}

/// AES block size.
pub const BLOCK: usize = 16;
/// Legacy RSA modulus size.
pub const LEGACY_RSA_BITS: usize = 1024;
/// Legacy RSA public exponent (Crypto++'s default), which makes the DER of a
/// 1024-bit public key exactly 160 bytes.
pub const LEGACY_RSA_EXPONENT: u32 = 17;
/// The smallest modulus we accept from a peer.
pub const MIN_RSA_BITS: usize = 1024;
/// The largest modulus we accept from a peer: the `rsa` crate refuses to
/// build a public key over 4096 bits (`RsaPublicKey::MAX_SIZE`), which
/// bounds the cost of the public-key operations a peer's key can ask for.
pub const MAX_RSA_BITS: usize = RsaPublicKey::MAX_SIZE;

type Aes256CbcEnc = cbc::Encryptor<aes::Aes256>;
type Aes256CbcDec = cbc::Decryptor<aes::Aes256>;

/// Why a crypto operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("public key field does not hold a DER SubjectPublicKeyInfo")]
    PublicKeyFraming,
    #[error("public key is not a valid RSA key: {0}")]
    PublicKey(String),
    #[error("RSA modulus of {0} bits is below the {MIN_RSA_BITS}-bit minimum")]
    WeakKey(usize),
    #[error("RSA modulus of {0} bits is above the {MAX_RSA_BITS}-bit maximum")]
    KeyTooLarge(usize),
    #[error("public key DER is {0} bytes; the field holds {PUBLIC_KEY_FIELD_LEN}")]
    PublicKeyTooLong(usize),
    #[error("private key: {0}")]
    PrivateKey(String),
    #[error("RSA-OAEP: {0}")]
    Rsa(#[from] rsa::Error),
    #[error("unwrapped AES key is {0} bytes, expected 32")]
    AesKeyLength(usize),
    #[error("ciphertext is not a whole number of blocks")]
    Truncated,
    #[error("bad PKCS#7 padding (wrong key or corrupted data)")]
    Padding,
}

/// A 256-bit AES session key. Zeroed on drop; never printed.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct AesKey([u8; 32]);

impl AesKey {
    /// A fresh random key.
    pub fn random<R: rand::CryptoRng + rand::RngCore + ?Sized>(rng: &mut R) -> Self {
        let mut k = [0u8; 32];
        rng.fill_bytes(&mut k);
        Self(k)
    }

    /// Wraps raw key bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The raw key bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl std::fmt::Debug for AesKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AesKey(<redacted>)")
    }
}

/// A client's RSA private key. Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct PrivateKey(RsaPrivateKey);

impl std::fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PrivateKey(<redacted>, {} bits)", self.0.size() * 8)
    }
}

impl PrivateKey {
    /// A new legacy key: 1024 bits, public exponent 17.
    ///
    /// # Errors
    /// Only if the RSA crate fails to generate primes.
    pub fn generate_legacy<R: rand::CryptoRng + rand::RngCore>(
        rng: &mut R,
    ) -> Result<Self, CryptoError> {
        Self::generate(rng, LEGACY_RSA_BITS, LEGACY_RSA_EXPONENT)
    }

    /// A new key of `bits` bits with public exponent `exponent`.
    ///
    /// # Errors
    /// Only if the RSA crate fails to generate primes.
    pub fn generate<R: rand::CryptoRng + rand::RngCore>(
        rng: &mut R,
        bits: usize,
        exponent: u32,
    ) -> Result<Self, CryptoError> {
        let key = RsaPrivateKey::new_with_exp(rng, bits, &BigUint::from(exponent))?;
        Ok(Self(key))
    }

    /// Parses PKCS#8 `PrivateKeyInfo` DER (what Crypto++'s `Save` writes).
    ///
    /// # Errors
    /// When the DER is not an RSA PKCS#8 key.
    pub fn from_pkcs8_der(der: &[u8]) -> Result<Self, CryptoError> {
        RsaPrivateKey::from_pkcs8_der(der)
            .map(Self)
            .map_err(|e| CryptoError::PrivateKey(e.to_string()))
    }

    /// The PKCS#8 DER; zeroed when dropped.
    ///
    /// # Errors
    /// Only if the encoder fails.
    pub fn to_pkcs8_der(&self) -> Result<zeroize::Zeroizing<Vec<u8>>, CryptoError> {
        let doc = self
            .0
            .to_pkcs8_der()
            .map_err(|e| CryptoError::PrivateKey(e.to_string()))?;
        Ok(zeroize::Zeroizing::new(doc.as_bytes().to_vec()))
    }

    /// The public half.
    pub fn public_key(&self) -> RsaPublicKey {
        self.0.to_public_key()
    }

    /// Recovers the AES key from a 1602/1605 response (RSA-OAEP, SHA-1, MGF1-SHA-1).
    /// Blinded, so its timing does not depend on the private exponent.
    ///
    /// # Errors
    /// When decryption fails or the result is not 32 bytes.
    pub fn unwrap_aes_key<R: rand::CryptoRng + rand::RngCore>(
        &self,
        rng: &mut R,
        wrapped: &[u8],
    ) -> Result<AesKey, CryptoError> {
        let plain = zeroize::Zeroizing::new(self.0.decrypt_blinded(
            rng,
            Oaep::new::<sha1::Sha1>(),
            wrapped,
        )?);
        let bytes: [u8; 32] = plain
            .as_slice()
            .try_into()
            .map_err(|_| CryptoError::AesKeyLength(plain.len()))?;
        Ok(AesKey(bytes))
    }

    /// The inner `rsa` key, for protocols built on top of this one.
    pub fn as_rsa(&self) -> &RsaPrivateKey {
        &self.0
    }
}

/// Encodes `key` as the 160-byte public-key field: X.509
/// SubjectPublicKeyInfo DER, zero-padded.
///
/// # Errors
/// When the DER is longer than 160 bytes (e.g. a 1024-bit key with e = 65537).
pub fn public_key_field(key: &RsaPublicKey) -> Result<PublicKeyField, CryptoError> {
    let der = key
        .to_public_key_der()
        .map_err(|e| CryptoError::PublicKey(e.to_string()))?;
    let der = der.as_bytes();
    let mut field = [0u8; PUBLIC_KEY_FIELD_LEN];
    field
        .get_mut(..der.len())
        .ok_or(CryptoError::PublicKeyTooLong(der.len()))?
        .copy_from_slice(der);
    Ok(PublicKeyField(field))
}

/// Parses the 160-byte public-key field: a DER SubjectPublicKeyInfo whose own
/// length header says where it ends (bytes after it are ignored), holding an
/// RSA key of [`MIN_RSA_BITS`] to [`MAX_RSA_BITS`] bits.
///
/// # Errors
/// When the field does not frame a DER SEQUENCE, the key is not RSA, or it is
/// too small or too large.
pub fn parse_public_key(field: &PublicKeyField) -> Result<RsaPublicKey, CryptoError> {
    parse_public_key_der(&field.0)
}

/// As [`parse_public_key`], for a DER SubjectPublicKeyInfo of any length
/// (followed by anything, which is ignored): a secure-mode registration's
/// key, or a legacy field.
///
/// # Errors
/// As [`parse_public_key`].
pub fn parse_public_key_der(f: &[u8]) -> Result<RsaPublicKey, CryptoError> {
    let (tag, rest) = f.split_first().ok_or(CryptoError::PublicKeyFraming)?;
    let (first, rest) = rest.split_first().ok_or(CryptoError::PublicKeyFraming)?;
    if *tag != 0x30 {
        return Err(CryptoError::PublicKeyFraming);
    }
    let (header, body) = match *first {
        n if n < 0x80 => (2, usize::from(n)),
        0x81 => (
            3,
            usize::from(*rest.first().ok_or(CryptoError::PublicKeyFraming)?),
        ),
        0x82 => {
            let hi = usize::from(*rest.first().ok_or(CryptoError::PublicKeyFraming)?);
            let lo = usize::from(*rest.get(1).ok_or(CryptoError::PublicKeyFraming)?);
            (4, (hi << 8) | lo)
        }
        _ => return Err(CryptoError::PublicKeyFraming),
    };
    let der = f
        .get(..header + body)
        .ok_or(CryptoError::PublicKeyFraming)?;
    // The rsa crate refuses a key over its maximum with a bare "malformed";
    // measure the modulus first so that the refusal says why.
    if let Some(bits) = modulus_bits(der).filter(|&bits| bits > MAX_RSA_BITS) {
        return Err(CryptoError::KeyTooLarge(bits));
    }
    let key = RsaPublicKey::from_public_key_der(der)
        .map_err(|e| CryptoError::PublicKey(e.to_string()))?;
    // The modulus's own size: `size()` is in whole bytes, which would let a
    // key of 1017 to 1023 bits pass as 1024.
    let bits = key.n().bits();
    if bits < MIN_RSA_BITS {
        return Err(CryptoError::WeakKey(bits));
    }
    Ok(key)
}

/// The size in bits of the modulus of the RSA SubjectPublicKeyInfo `der`,
/// without building the key; `None` when it does not decode as one.
fn modulus_bits(der: &[u8]) -> Option<usize> {
    use rsa::pkcs8::der::Decode;
    let info = rsa::pkcs8::SubjectPublicKeyInfoRef::from_der(der).ok()?;
    let key = rsa::pkcs1::RsaPublicKey::from_der(info.subject_public_key.as_bytes()?).ok()?;
    // The integer's bytes without leading zeros.
    let modulus = key.modulus.as_bytes();
    let top = *modulus.first()?;
    let top_bits = 8 - usize::try_from(top.leading_zeros()).ok()?;
    Some((modulus.len() - 1) * 8 + top_bits)
}

/// The X.509 SubjectPublicKeyInfo DER of `key`, any size.
///
/// # Errors
/// Only if the encoder fails.
pub fn public_key_der(key: &RsaPublicKey) -> Result<Vec<u8>, CryptoError> {
    key.to_public_key_der()
        .map(|der| der.as_bytes().to_vec())
        .map_err(|e| CryptoError::PublicKey(e.to_string()))
}

/// Wraps `key` for `public` with RSA-OAEP (SHA-1, MGF1-SHA-1, empty label),
/// as every legacy peer does. A public-key operation: no secret of ours is
/// involved, so it has no timing side channel to speak of.
///
/// # Errors
/// When the modulus is too small for the message (never for >= 1024 bits).
pub fn wrap_aes_key<R: rand::CryptoRng + rand::RngCore>(
    rng: &mut R,
    public: &RsaPublicKey,
    key: &AesKey,
) -> Result<Vec<u8>, CryptoError> {
    Ok(public.encrypt(rng, Oaep::new::<sha1::Sha1>(), key.as_bytes())?)
}

/// Ciphertext length of `plain_len` bytes under PKCS#7: always at least one
/// byte of padding, so a whole block is added to an exact multiple.
pub const fn pkcs7_len(plain_len: u64) -> u64 {
    (plain_len / BLOCK as u64 + 1) * BLOCK as u64
}

/// A bounded holding area for a partial block.
#[derive(Clone, Default, Zeroize)]
struct Pending {
    buf: [u8; BLOCK],
    len: usize,
}

impl Pending {
    /// Moves bytes from the front of `input` until the block is full.
    fn fill<'a>(&mut self, input: &'a [u8]) -> &'a [u8] {
        let take = (BLOCK - self.len).min(input.len());
        let (head, rest) = input.split_at(take);
        if let Some(dst) = self.buf.get_mut(self.len..self.len + take) {
            dst.copy_from_slice(head);
        }
        self.len += take;
        rest
    }

    fn is_full(&self) -> bool {
        self.len == BLOCK
    }
}

/// Appends `bytes` to `out` and returns the range they occupy.
fn append(out: &mut BytesMut, bytes: &[u8]) -> std::ops::Range<usize> {
    let start = out.len();
    out.extend_from_slice(bytes);
    start..out.len()
}

/// Streaming AES-256-CBC encryption with PKCS#7 padding. Accepts input in
/// any chunks; output is emitted a whole block at a time.
pub struct CbcEncryptor {
    cipher: Aes256CbcEnc,
    pending: Pending,
}

impl std::fmt::Debug for CbcEncryptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CbcEncryptor(<redacted>)")
    }
}

impl CbcEncryptor {
    /// The legacy cipher: IV of 16 zero bytes.
    pub fn new(key: &AesKey) -> Self {
        Self::with_iv(key, &[0u8; BLOCK])
    }

    /// A cipher with an explicit IV.
    pub fn with_iv(key: &AesKey, iv: &[u8; BLOCK]) -> Self {
        Self {
            cipher: Aes256CbcEnc::new(key.as_bytes().into(), iv.into()),
            pending: Pending::default(),
        }
    }

    fn encrypt_range(&mut self, out: &mut BytesMut, range: std::ops::Range<usize>) {
        if let Some(region) = out.get_mut(range) {
            let (blocks, _tail) = InOutBuf::from(region).into_chunks();
            self.cipher.encrypt_blocks_inout_mut(blocks);
        }
    }

    /// Encrypts `input`, appending every completed block to `out`.
    pub fn update(&mut self, mut input: &[u8], out: &mut BytesMut) {
        if self.pending.len > 0 {
            input = self.pending.fill(input);
            if !self.pending.is_full() {
                return;
            }
            let r = append(out, &self.pending.buf);
            self.encrypt_range(out, r);
            self.pending = Pending::default();
        }
        let whole = input.len() - input.len() % BLOCK;
        let (blocks, rest) = input.split_at(whole);
        if !blocks.is_empty() {
            let r = append(out, blocks);
            self.encrypt_range(out, r);
        }
        self.pending.fill(rest);
    }

    /// Pads and encrypts the last block, appending it to `out`.
    pub fn finish(mut self, out: &mut BytesMut) {
        let pad = BLOCK - self.pending.len;
        // pad is 1..=16 and fits a u8.
        let pad_byte = pad as u8;
        let block: Vec<u8> = std::iter::repeat_n(pad_byte, pad).collect();
        self.pending.fill(&block);
        let r = append(out, &self.pending.buf);
        self.encrypt_range(out, r);
        self.pending.zeroize();
    }
}

/// Streaming AES-256-CBC decryption with PKCS#7 unpadding. Accepts input in
/// any chunks; holds back the last block until [`finish`](Self::finish),
/// since it may be the padding.
pub struct CbcDecryptor {
    cipher: Aes256CbcDec,
    pending: Pending,
}

impl std::fmt::Debug for CbcDecryptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CbcDecryptor(<redacted>)")
    }
}

impl CbcDecryptor {
    /// The legacy cipher: IV of 16 zero bytes.
    pub fn new(key: &AesKey) -> Self {
        Self::with_iv(key, &[0u8; BLOCK])
    }

    /// A cipher with an explicit IV.
    pub fn with_iv(key: &AesKey, iv: &[u8; BLOCK]) -> Self {
        Self {
            cipher: Aes256CbcDec::new(key.as_bytes().into(), iv.into()),
            pending: Pending::default(),
        }
    }

    fn decrypt_range(&mut self, out: &mut BytesMut, range: std::ops::Range<usize>) {
        if let Some(region) = out.get_mut(range) {
            let (blocks, _tail) = InOutBuf::from(region).into_chunks();
            self.cipher.decrypt_blocks_inout_mut(blocks);
        }
    }

    /// Decrypts `input`, appending plaintext to `out`, except for the last
    /// whole block seen so far, which is held back.
    pub fn update(&mut self, mut input: &[u8], out: &mut BytesMut) {
        if input.is_empty() {
            return;
        }
        if !self.pending.is_full() {
            input = self.pending.fill(input);
        }
        if input.is_empty() {
            return;
        }
        // More input follows the held block, so it is not the last one.
        let r = append(out, &self.pending.buf);
        self.decrypt_range(out, r);
        self.pending = Pending::default();
        // Of the rest, keep back the last block (whole or partial).
        let keep = match input.len() % BLOCK {
            0 => BLOCK,
            n => n,
        };
        let (blocks, rest) = input.split_at(input.len() - keep);
        if !blocks.is_empty() {
            let r = append(out, blocks);
            self.decrypt_range(out, r);
        }
        self.pending.fill(rest);
    }

    /// Decrypts the held-back block, checks and strips the padding, and
    /// appends what remains to `out`.
    ///
    /// # Errors
    /// [`CryptoError::Truncated`] when the ciphertext was not a positive
    /// whole number of blocks; [`CryptoError::Padding`] when the padding is
    /// not valid PKCS#7 (which is what a wrong key or corruption looks like).
    pub fn finish(mut self, out: &mut BytesMut) -> Result<(), CryptoError> {
        if !self.pending.is_full() {
            return Err(CryptoError::Truncated);
        }
        let mut block = BytesMut::with_capacity(BLOCK);
        let r = append(&mut block, &self.pending.buf);
        self.decrypt_range(&mut block, r);
        self.pending.zeroize();
        let pad = usize::from(*block.last().ok_or(CryptoError::Padding)?);
        if pad == 0 || pad > BLOCK {
            return Err(CryptoError::Padding);
        }
        let (data, padding) = block.split_at(BLOCK - pad);
        if padding.iter().any(|&b| usize::from(b) != pad) {
            return Err(CryptoError::Padding);
        }
        out.extend_from_slice(data);
        Ok(())
    }
}

/// Encrypts `plain` in one call (tests, small messages).
pub fn encrypt_all(key: &AesKey, plain: &[u8]) -> BytesMut {
    let mut out = BytesMut::with_capacity(plain.len() + BLOCK);
    let mut e = CbcEncryptor::new(key);
    e.update(plain, &mut out);
    e.finish(&mut out);
    out
}

/// Decrypts `cipher` in one call (tests, small messages).
///
/// # Errors
/// As [`CbcDecryptor::finish`].
pub fn decrypt_all(key: &AesKey, cipher: &[u8]) -> Result<BytesMut, CryptoError> {
    let mut out = BytesMut::with_capacity(cipher.len());
    let mut d = CbcDecryptor::new(key);
    d.update(cipher, &mut out);
    d.finish(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn key() -> AesKey {
        AesKey::from_bytes(*b"0123456789abcdef0123456789abcdef")
    }

    #[test]
    fn pads_a_whole_block_onto_an_exact_multiple() {
        assert_eq!(encrypt_all(&key(), &[7u8; 32]).len(), 48);
        assert_eq!(encrypt_all(&key(), &[]).len(), 16);
        assert_eq!(pkcs7_len(20000), 20016);
        assert_eq!(pkcs7_len(3000), 3008);
    }

    #[test]
    fn round_trips_every_small_length_in_odd_chunks() {
        let data: Vec<u8> = (0..200u8).collect();
        for len in 0..data.len() {
            let ct = encrypt_all(&key(), &data[..len]);
            let mut out = BytesMut::new();
            let mut d = CbcDecryptor::new(&key());
            for chunk in ct.chunks(7) {
                d.update(chunk, &mut out);
            }
            d.finish(&mut out).unwrap();
            assert_eq!(&out[..], &data[..len]);
        }
    }

    #[test]
    fn rejects_truncated_and_badly_padded_ciphertext() {
        let ct = encrypt_all(&key(), b"hello");
        assert!(matches!(
            decrypt_all(&key(), &ct[..15]),
            Err(CryptoError::Truncated)
        ));
        assert!(matches!(
            decrypt_all(&key(), &[]),
            Err(CryptoError::Truncated)
        ));
        let other = AesKey::from_bytes([9; 32]);
        // A wrong key makes random padding; a valid-looking pad happens with
        // probability ~1/256, so check a few distinct messages.
        let failures = (0..8u8)
            .filter(|i| decrypt_all(&other, &encrypt_all(&key(), &[*i; 40])).is_err())
            .count();
        assert!(failures >= 6);
    }

    #[test]
    fn legacy_key_field_is_exactly_160_bytes_and_parses_back() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let key = PrivateKey::generate_legacy(&mut rng).unwrap();
        let der = key.public_key().to_public_key_der().unwrap();
        assert_eq!(der.as_bytes().len(), 160);
        let field = public_key_field(&key.public_key()).unwrap();
        assert_eq!(
            &field.0[..29],
            &hex::decode("30819d300d06092a864886f70d010101050003818b0030818702818100").unwrap()[..]
        );
        assert_eq!(parse_public_key(&field).unwrap(), key.public_key());
        let aes = AesKey::random(&mut rng);
        let wrapped = wrap_aes_key(&mut rng, &key.public_key(), &aes).unwrap();
        assert_eq!(wrapped.len(), 128);
        assert_eq!(key.unwrap_aes_key(&mut rng, &wrapped).unwrap(), aes);
    }

    #[test]
    fn rejects_public_key_field_that_is_not_der() {
        assert!(parse_public_key(&PublicKeyField([0u8; 160])).is_err());
        let mut f = [0u8; 160];
        f[0] = 0x30;
        f[1] = 0x82;
        f[2] = 0xff;
        assert!(matches!(
            parse_public_key(&PublicKeyField(f)),
            Err(CryptoError::PublicKeyFraming)
        ));
    }

    /// The DER of an RSA public key whose modulus is `2^(bits-1) + 1`:
    /// exactly `bits` bits. Not a product of two primes, which parsing does
    /// not look at, so no key has to be generated.
    fn public_key_der_of_bits(bits: usize) -> Vec<u8> {
        let n = (BigUint::from(1u8) << (bits - 1)) + 1u8;
        let key = RsaPublicKey::new_with_max_size(n, BigUint::from(65537u32), 16384).unwrap();
        public_key_der(&key).unwrap()
    }

    #[test]
    fn accepts_public_keys_of_1024_to_4096_bits() {
        for bits in [MIN_RSA_BITS, 3072, MAX_RSA_BITS] {
            let key = parse_public_key_der(&public_key_der_of_bits(bits)).unwrap();
            assert_eq!(key.n().bits(), bits);
        }
        assert_eq!(MAX_RSA_BITS, 4096);
    }

    #[test]
    fn rejects_public_keys_over_4096_bits_by_their_size() {
        for bits in [MAX_RSA_BITS + 1, 8192] {
            let der = public_key_der_of_bits(bits);
            let err = parse_public_key_der(&der).unwrap_err();
            assert!(
                matches!(err, CryptoError::KeyTooLarge(b) if b == bits),
                "{err}"
            );
            assert!(
                err.to_string().contains("above the 4096-bit maximum"),
                "{err}"
            );
        }
        // An 8192-bit key fits a secure registration's key field, so the
        // refusal is the parser's, not the framing's.
        assert!(public_key_der_of_bits(8192).len() <= crate::secure::MAX_PUBLIC_KEY_DER);
    }

    #[test]
    fn rejects_public_keys_under_1024_bits_by_their_size() {
        let err = parse_public_key_der(&public_key_der_of_bits(MIN_RSA_BITS - 1)).unwrap_err();
        assert!(matches!(err, CryptoError::WeakKey(1023)), "{err}");
    }

    #[test]
    fn secrets_are_redacted_in_debug() {
        assert_eq!(format!("{:?}", key()), "AesKey(<redacted>)");
        assert!(!format!("{:?}", CbcEncryptor::new(&key())).contains("0123"));
    }
}
