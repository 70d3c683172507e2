//! The server's side of one restore (`docs/PROTOCOL.md` §11.3): the 1641
//! that announces the version, then its content encrypted under the session
//! key in 1642 packets.
//!
//! A [`RestoreSender`] comes from
//! [`ServerSession::found_version`](crate::session::server::ServerSession::found_version)
//! with a fresh IV drawn from the rng the shell passes in. The shell feeds it
//! either plaintext ([`RestoreSender::plaintext`], encrypted and cut into
//! packets here) or ciphertext it encrypted elsewhere with the cipher it took
//! ([`RestoreSender::take_cipher`], e.g. on a reader thread) and cut itself
//! ([`RestoreSender::ciphertext`]). Either way the sender checks that no more
//! than the announced content size goes out and, at [`RestoreSender::finish`],
//! that all of it did.

use bytes::{Bytes, BytesMut};

use crate::crypto::{self, AesKey, CbcEncryptor};
use crate::message::Response;
use crate::name::FileName;
use crate::retrieval::{RestoreBegin, RetrievalResponse};

/// Ciphertext carried by one 1642 packet, unless the packet limit is lower.
pub const PACKET: usize = 1024 * 1024;

/// The packet size for a wished size `packet` under a packet limit of
/// `max_packet_content`: the smaller, cut down to a multiple of the AES
/// block (or at least one byte when under a block).
pub fn packet_len(packet: usize, max_packet_content: usize) -> usize {
    let block = crypto::BLOCK;
    let limited = packet.min(max_packet_content);
    if limited >= block {
        limited - limited % block
    } else {
        limited.max(1)
    }
}

/// The stored version a restore sends, as storage found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundVersion {
    pub version: u64,
    /// Plaintext size.
    pub size: u64,
    /// Cksum of the plaintext.
    pub cksum: u32,
    pub file: FileName,
}

/// The restore framing went wrong: the shell fed more or less ciphertext
/// than the 1641 announced.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RestoreSendError {
    #[error("{sent} ciphertext bytes fed but {announced} announced")]
    Overrun { sent: u64, announced: u64 },
    #[error("restore ended after {sent} of {announced} ciphertext bytes")]
    Short { sent: u64, announced: u64 },
}

/// Builds the packets of one restore.
pub struct RestoreSender {
    begin: RestoreBegin,
    cipher: Option<CbcEncryptor>,
    packet: usize,
    /// Ciphertext encrypted here and not yet cut into a packet.
    out: BytesMut,
    /// Ciphertext bytes handed out in 1642 packets so far.
    sent: u64,
}

impl std::fmt::Debug for RestoreSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestoreSender")
            .field("file", &self.begin.file)
            .field("version", &self.begin.version)
            .field("packet", &self.packet)
            .field("sent", &self.sent)
            .finish_non_exhaustive()
    }
}

impl RestoreSender {
    /// A sender for `found` under `key` with a fresh IV from `rng`, cutting
    /// packets of `packet` bytes (at least one).
    pub fn new<R: rand::CryptoRng + rand::RngCore>(
        key: &AesKey,
        found: FoundVersion,
        packet: usize,
        rng: &mut R,
    ) -> Self {
        let mut iv = [0u8; crypto::BLOCK];
        rng.fill_bytes(&mut iv);
        let begin = RestoreBegin {
            version: found.version,
            size: found.size,
            content_size: crypto::pkcs7_len(found.size),
            cksum: found.cksum,
            iv,
            file: found.file,
        };
        Self {
            cipher: Some(CbcEncryptor::with_iv(key, &iv)),
            begin,
            packet: packet.max(1),
            out: BytesMut::new(),
            sent: 0,
        }
    }

    /// The 1641 that goes first.
    pub fn begin(&self) -> Response {
        Response::Retrieval(RetrievalResponse::RestoreBegin(self.begin.clone()))
    }

    /// What the 1641 announces.
    pub fn header(&self) -> &RestoreBegin {
        &self.begin
    }

    /// Ciphertext bytes per 1642 packet.
    pub fn packet_len(&self) -> usize {
        self.packet
    }

    /// The encryptor under the session key and this restore's IV, for a
    /// shell that encrypts elsewhere and feeds [`Self::ciphertext`]; after
    /// this, [`Self::plaintext`] sends nothing more.
    pub fn take_cipher(&mut self) -> Option<CbcEncryptor> {
        self.cipher.take()
    }

    /// A 1642 carrying `content`, ciphertext the shell encrypted with the
    /// cipher from [`Self::take_cipher`].
    ///
    /// # Errors
    /// When `content` goes past the announced content size.
    pub fn ciphertext(&mut self, content: Bytes) -> Result<Response, RestoreSendError> {
        self.count(content.len())?;
        Ok(Response::Retrieval(RetrievalResponse::RestoreData {
            content,
        }))
    }

    /// Encrypts `plain` and returns the 1642 packets that are complete.
    ///
    /// # Errors
    /// When the plaintext goes past the announced size.
    pub fn plaintext(&mut self, plain: &[u8]) -> Result<Vec<Response>, RestoreSendError> {
        if let Some(cipher) = self.cipher.as_mut() {
            cipher.update(plain, &mut self.out);
        }
        self.cut(false)
    }

    /// Ends the restore: the last packets (with the padding) when the shell
    /// fed plaintext, and the check that all the announced content went out.
    ///
    /// # Errors
    /// When more or less than the announced content size was sent.
    pub fn finish(mut self) -> Result<Vec<Response>, RestoreSendError> {
        if let Some(cipher) = self.cipher.take() {
            cipher.finish(&mut self.out);
        }
        let last = self.cut(true)?;
        if self.sent != self.begin.content_size {
            return Err(RestoreSendError::Short {
                sent: self.sent,
                announced: self.begin.content_size,
            });
        }
        Ok(last)
    }

    fn cut(&mut self, all: bool) -> Result<Vec<Response>, RestoreSendError> {
        let mut packets = Vec::new();
        while self.out.len() >= self.packet || (all && !self.out.is_empty()) {
            let n = self.packet.min(self.out.len());
            let content = self.out.split_to(n).freeze();
            packets.push(self.ciphertext(content)?);
        }
        Ok(packets)
    }

    fn count(&mut self, n: usize) -> Result<(), RestoreSendError> {
        let sent = self.sent.saturating_add(n as u64);
        if sent > self.begin.content_size {
            return Err(RestoreSendError::Overrun {
                sent,
                announced: self.begin.content_size,
            });
        }
        self.sent = sent;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::CbcDecryptor;
    use rand::SeedableRng;

    fn found(size: usize) -> FoundVersion {
        FoundVersion {
            version: 3,
            size: size as u64,
            cksum: 7,
            file: FileName::try_from("a.txt").unwrap(),
        }
    }

    fn content(responses: &[Response]) -> Vec<u8> {
        let mut all = Vec::new();
        for r in responses {
            let Response::Retrieval(RetrievalResponse::RestoreData { content }) = r else {
                panic!("not a 1642: {r:?}");
            };
            all.extend_from_slice(content);
        }
        all
    }

    #[test]
    fn packet_len_is_block_aligned_and_within_the_limit() {
        assert_eq!(packet_len(PACKET, usize::MAX), PACKET);
        assert_eq!(packet_len(PACKET, 1_114_112), PACKET);
        assert_eq!(packet_len(PACKET, 1000), 992);
        assert_eq!(packet_len(PACKET, 16), 16);
        assert_eq!(packet_len(PACKET, 5), 5);
        assert_eq!(packet_len(1, usize::MAX), 1);
    }

    #[test]
    fn round_trips_plaintext_fed_in_any_slices_under_the_session_key() {
        let key = AesKey::from_bytes([9; 32]);
        let plain: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        for (packet, slice) in [(16, 7), (64, 100), (1, 1000), (4096, 3)] {
            let mut rng = rand::rngs::StdRng::seed_from_u64(1);
            let mut sender = RestoreSender::new(&key, found(plain.len()), packet, &mut rng);
            let Response::Retrieval(RetrievalResponse::RestoreBegin(begin)) = sender.begin() else {
                panic!("not a 1641");
            };
            let mut packets = Vec::new();
            for chunk in plain.chunks(slice) {
                packets.extend(sender.plaintext(chunk).unwrap());
            }
            packets.extend(sender.finish().unwrap());
            let ct = content(&packets);
            assert_eq!(ct.len() as u64, begin.content_size);
            assert!(packets
                .iter()
                .all(|p| content(std::slice::from_ref(p)).len() <= packet));
            let mut dec = CbcDecryptor::with_iv(&key, &begin.iv);
            let mut out = BytesMut::new();
            dec.update(&ct, &mut out);
            dec.finish(&mut out).unwrap();
            assert_eq!(&out[..], &plain[..]);
        }
    }

    #[test]
    fn draws_the_iv_from_the_rng_passed_in() {
        let key = AesKey::from_bytes([1; 32]);
        let iv = |seed| {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            RestoreSender::new(&key, found(1), 16, &mut rng).header().iv
        };
        assert_eq!(iv(5), iv(5));
        assert_ne!(iv(5), iv(6));
    }

    #[test]
    fn rejects_ciphertext_past_the_announced_size_and_a_short_restore() {
        let key = AesKey::from_bytes([1; 32]);
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let mut sender = RestoreSender::new(&key, found(20), 16, &mut rng);
        assert!(sender.take_cipher().is_some());
        sender.ciphertext(Bytes::from(vec![0; 32])).unwrap();
        assert!(matches!(
            sender.ciphertext(Bytes::from(vec![0; 1])),
            Err(RestoreSendError::Overrun { .. })
        ));
        let mut short = RestoreSender::new(&key, found(20), 16, &mut rng);
        short.take_cipher();
        short.ciphertext(Bytes::from(vec![0; 16])).unwrap();
        assert!(matches!(
            short.finish(),
            Err(RestoreSendError::Short { .. })
        ));
    }
}
