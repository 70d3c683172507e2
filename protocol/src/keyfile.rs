//! The key files of legacy clients (`docs/PROTOCOL.md` §8): `me.info` and
//! `priv.key`.
//!
//! `me.info` is the user name (legacy clients pad it with spaces), the client
//! id as 32 hex digits, then the private key as Base64 PKCS#8 DER over any
//! number of lines (Crypto++ wraps at 72 columns). `priv.key` is the same key
//! as Base64 text, or raw DER in some clients; both are accepted.

use base64::Engine;

use crate::crypto::{CryptoError, PrivateKey};
use crate::name::{NameError, UserName};
use crate::wire::ClientId;

/// Column at which Base64 is wrapped when we write key files (as Crypto++ does).
pub const BASE64_WRAP: usize = 72;

/// Why a key file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("me.info has no name line")]
    MissingName,
    #[error("me.info has an invalid name: {0}")]
    Name(#[from] NameError),
    #[error("me.info line 2 is not a 32-hex-digit client id")]
    ClientId,
    #[error("the private key is not valid Base64: {0}")]
    Base64(#[from] base64::DecodeError),
    #[error("the private key is not an RSA PKCS#8 key: {0}")]
    Key(#[from] CryptoError),
}

/// The contents of `me.info`.
#[derive(Debug, Clone)]
pub struct MeInfo {
    pub name: UserName,
    pub client_id: ClientId,
    pub key: PrivateKey,
}

fn decode_base64_lines<'a>(lines: impl Iterator<Item = &'a str>) -> Result<Vec<u8>, KeyFileError> {
    let text: String = lines
        .flat_map(|l| l.chars().filter(|c| !c.is_whitespace()))
        .collect();
    Ok(base64::engine::general_purpose::STANDARD.decode(text)?)
}

/// Base64 of `der`, wrapped at [`BASE64_WRAP`] columns, each line ending in `\n`.
pub fn wrapped_base64(der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::with_capacity(b64.len() + b64.len() / BASE64_WRAP + 1);
    for chunk in b64.as_bytes().chunks(BASE64_WRAP) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out
}

impl MeInfo {
    /// Parses `me.info` text.
    ///
    /// # Errors
    /// When a line is missing or invalid, or the key does not decode.
    pub fn parse(text: &str) -> Result<Self, KeyFileError> {
        let mut lines = text.lines();
        let name_line = lines.next().ok_or(KeyFileError::MissingName)?;
        // Legacy clients write the 255-byte name field as is: the name, then
        // NUL (or space) padding. The name ends at the first NUL.
        let name_text = name_line.split('\0').next().unwrap_or_default().trim_end();
        let name = UserName::new(name_text.as_bytes())?;
        let id_line = lines.next().ok_or(KeyFileError::ClientId)?;
        let client_id = ClientId::from_hex(id_line.trim()).map_err(|_| KeyFileError::ClientId)?;
        let der = zeroize::Zeroizing::new(decode_base64_lines(lines)?);
        let key = PrivateKey::from_pkcs8_der(&der)?;
        Ok(Self {
            name,
            client_id,
            key,
        })
    }

    /// `me.info` text in the legacy format (no space padding on the name).
    ///
    /// # Errors
    /// Only if the key cannot be encoded.
    pub fn to_text(&self) -> Result<zeroize::Zeroizing<String>, KeyFileError> {
        let der = self.key.to_pkcs8_der()?;
        Ok(zeroize::Zeroizing::new(format!(
            "{}\n{}\n{}",
            self.name,
            self.client_id.to_hex(),
            wrapped_base64(&der)
        )))
    }
}

/// Parses `priv.key`: Base64 text (any wrapping) or raw DER.
///
/// # Errors
/// When neither reading yields an RSA PKCS#8 key.
pub fn parse_priv_key(bytes: &[u8]) -> Result<PrivateKey, KeyFileError> {
    if bytes.first() == Some(&0x30) {
        if let Ok(key) = PrivateKey::from_pkcs8_der(bytes) {
            return Ok(key);
        }
    }
    let text = String::from_utf8_lossy(bytes);
    let der = zeroize::Zeroizing::new(decode_base64_lines(text.lines())?);
    Ok(PrivateKey::from_pkcs8_der(&der)?)
}

/// `priv.key` text: the key as wrapped Base64.
///
/// # Errors
/// Only if the key cannot be encoded.
pub fn priv_key_text(key: &PrivateKey) -> Result<zeroize::Zeroizing<String>, KeyFileError> {
    Ok(zeroize::Zeroizing::new(wrapped_base64(
        &key.to_pkcs8_der()?,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn round_trips_me_info_and_priv_key() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let me = MeInfo {
            name: UserName::try_from("bob").unwrap(),
            client_id: ClientId([0xab; 16]),
            key: PrivateKey::generate_legacy(&mut rng).unwrap(),
        };
        let text = me.to_text().unwrap();
        assert!(text.lines().skip(2).all(|l| l.len() <= BASE64_WRAP));
        let back = MeInfo::parse(&text).unwrap();
        assert_eq!(back.name, me.name);
        assert_eq!(back.client_id, me.client_id);
        assert_eq!(back.key, me.key);
        let pk = priv_key_text(&me.key).unwrap();
        assert_eq!(parse_priv_key(pk.as_bytes()).unwrap(), me.key);
        assert_eq!(
            parse_priv_key(&me.key.to_pkcs8_der().unwrap()).unwrap(),
            me.key
        );
    }

    #[test]
    fn accepts_name_lines_padded_with_nuls_or_spaces() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(8);
        let key = PrivateKey::generate_legacy(&mut rng).unwrap();
        let rest = format!(
            "{}\n{}",
            "ab".repeat(16),
            wrapped_base64(&key.to_pkcs8_der().unwrap())
        );
        for pad in ["\0", " "] {
            let line = format!("alice{}", pad.repeat(250));
            let me = MeInfo::parse(&format!("{line}\n{rest}")).unwrap();
            assert_eq!(me.name.as_bytes(), b"alice");
        }
    }

    #[test]
    fn rejects_me_info_with_bad_id_or_key() {
        assert!(matches!(
            MeInfo::parse("bob\nxyz\nAAAA\n"),
            Err(KeyFileError::ClientId)
        ));
        assert!(matches!(MeInfo::parse(""), Err(KeyFileError::MissingName)));
        assert!(MeInfo::parse("bob\n00000000000000000000000000000000\n!!!!\n").is_err());
    }
}
