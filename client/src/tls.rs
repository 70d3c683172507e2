//! Secure mode's transport (`docs/PROTOCOL.md` §12.1): TLS 1.3 to a server
//! whose certificate is pinned by its SHA-256 fingerprint, and the pins
//! themselves (`known_servers` in the client's directory, one line per
//! server address, like SSH's `known_hosts`).
//!
//! The server's certificate is self-signed, so no certificate authority is
//! involved: the fingerprint is the whole of the server's identity. A pin
//! is recorded the first time a client registers with a server (trust on
//! first use) or taken from `--server-fingerprint`; afterwards any other
//! certificate is refused before a single request is sent.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use protocol::secure::{Fingerprint, ALPN};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::error::Error;
use crate::fsutil;

/// The name the client asks for; the server's certificate carries it, but
/// the pin, not the name, is what is checked.
pub const SERVER_NAME: &str = "backup-server";
/// The file of pinned servers in the client's directory.
pub const KNOWN_SERVERS: &str = "known_servers";

/// What the client expects of the server's certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trust {
    /// Exactly this certificate.
    Pinned(Fingerprint),
    /// Any certificate, to be pinned if the registration succeeds.
    FirstUse,
}

/// Checks the server's certificate against the pin and remembers what the
/// server presented, so a refusal can name both fingerprints.
#[derive(Debug)]
struct PinVerifier {
    trust: Trust,
    presented: Arc<Mutex<Option<Fingerprint>>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let fingerprint = Fingerprint::of_certificate(end_entity);
        if let Ok(mut seen) = self.presented.lock() {
            *seen = Some(fingerprint);
        }
        match self.trust {
            Trust::Pinned(pin) if pin != fingerprint => Err(rustls::Error::General(
                "the server's certificate does not match the pinned fingerprint".into(),
            )),
            // The handshake signature, checked next, proves the server holds
            // the key of this certificate.
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Where the verifier leaves the fingerprint the server presented.
pub type Presented = Arc<Mutex<Option<Fingerprint>>>;

/// A TLS 1.3 client configuration trusting as `trust` says, and the slot
/// where the verifier leaves the fingerprint the server presented.
///
/// # Errors
/// Only if the crypto provider does not support TLS 1.3.
pub fn client_config(trust: Trust) -> Result<(Arc<rustls::ClientConfig>, Presented), Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let presented = Arc::new(Mutex::new(None));
    let verifier = PinVerifier {
        trust,
        presented: Arc::clone(&presented),
        provider: Arc::clone(&provider),
    };
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Internal(format!("TLS 1.3 is not available: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN.to_vec()];
    // Every connection a full handshake: its own exporter value for the
    // proof, and no ticket to store.
    config.resumption = rustls::client::Resumption::disabled();
    Ok((Arc::new(config), presented))
}

/// The pins of a client directory.
#[derive(Debug, Clone)]
pub struct KnownServers {
    path: PathBuf,
}

impl KnownServers {
    /// The pins in `dir`.
    pub fn new(dir: &Path) -> Self {
        Self {
            path: dir.join(KNOWN_SERVERS),
        }
    }

    /// Where the pins are kept.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn entries(&self) -> Result<Vec<(String, Fingerprint)>, Error> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(Error::Identity {
                    path: self.path.clone(),
                    detail: e.to_string(),
                })
            }
        };
        let mut entries = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut fields = line.split_whitespace();
            let (Some(server), Some(fp), None) = (fields.next(), fields.next(), fields.next())
            else {
                return Err(self.bad_line(n));
            };
            let fp = fp.parse().map_err(|_| self.bad_line(n))?;
            entries.push((server.to_owned(), fp));
        }
        Ok(entries)
    }

    fn bad_line(&self, n: usize) -> Error {
        Error::Identity {
            path: self.path.clone(),
            detail: format!("line {} is not \"HOST:PORT SHA256:<64 hex digits>\"", n + 1),
        }
    }

    /// The pin for `server`, if any.
    ///
    /// # Errors
    /// When the file cannot be read or a line is malformed.
    pub fn get(&self, server: &str) -> Result<Option<Fingerprint>, Error> {
        Ok(self
            .entries()?
            .into_iter()
            .find(|(s, _)| s == server)
            .map(|(_, fp)| fp))
    }

    /// Pins `fingerprint` for `server`, replacing any earlier pin; the file
    /// is rewritten atomically.
    ///
    /// # Errors
    /// When the file cannot be read or written.
    pub fn set(&self, server: &str, fingerprint: Fingerprint) -> Result<(), Error> {
        let mut entries = self.entries()?;
        entries.retain(|(s, _)| s != server);
        entries.push((server.to_owned(), fingerprint));
        let mut text = String::from(
            "# Servers this client trusts: address and SHA-256 fingerprint of its certificate.\n",
        );
        for (s, fp) in entries {
            text.push_str(&format!("{s} {fp}\n"));
        }
        if let Some(dir) = self.path.parent() {
            fsutil::create_private_dir(dir)?;
        }
        fsutil::write_private(&self.path, text.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_per_server_and_replaces_a_pin() {
        let dir = tempfile::tempdir().unwrap();
        let known = KnownServers::new(dir.path());
        assert_eq!(known.get("a:1").unwrap(), None);
        let one = Fingerprint([1; 32]);
        let two = Fingerprint([2; 32]);
        known.set("a:1", one).unwrap();
        known.set("b:2", two).unwrap();
        assert_eq!(known.get("a:1").unwrap(), Some(one));
        assert_eq!(known.get("b:2").unwrap(), Some(two));
        known.set("a:1", two).unwrap();
        assert_eq!(known.get("a:1").unwrap(), Some(two));
        assert_eq!(known.entries().unwrap().len(), 2);
    }

    #[test]
    fn rejects_a_malformed_pin_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(KNOWN_SERVERS), "a:1 not-a-fingerprint\n").unwrap();
        let err = KnownServers::new(dir.path()).get("a:1").unwrap_err();
        assert!(err.to_string().contains("line 1"), "{err}");
    }
}
