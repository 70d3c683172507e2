//! Wire-level primitives: codes, client ids, headers and little-endian
//! field access (`docs/PROTOCOL.md` §1-§2).
//!
//! All multi-byte integers on the wire are unsigned little-endian; this module
//! is the only place that reads or writes them.

use std::fmt;

/// The protocol version byte of the legacy protocol.
pub const VERSION: u8 = 3;
/// The protocol version byte of secure mode (`docs/PROTOCOL.md` §12): the
/// same framing inside TLS 1.3, with 64-bit sizes and a proof of the client's
/// key.
pub const SECURE_VERSION: u8 = 4;

/// Which of the two protocols a connection speaks. A codec and a session
/// are built for one of them; a header with the other's version is refused.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Dialect {
    /// Version 3, byte for byte as deployed clients and servers speak it.
    #[default]
    Legacy,
    /// Version 4, inside TLS 1.3.
    Secure,
}

impl Dialect {
    /// The version byte of this dialect's headers.
    pub const fn version(self) -> u8 {
        match self {
            Dialect::Legacy => VERSION,
            Dialect::Secure => SECURE_VERSION,
        }
    }
}

/// Size of a request header: client id (16), version (1), code (2), payload size (4).
pub const REQUEST_HEADER_LEN: usize = 23;
/// Size of a response header: version (1), code (2), payload size (4).
pub const RESPONSE_HEADER_LEN: usize = 7;

/// A request code as it appears on the wire, known or not, so that an
/// unknown code can still be logged and answered.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct RequestCode(pub u16);

/// A response code as it appears on the wire.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ResponseCode(pub u16);

/// The meaning of a request, independent of the numbering a client uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RequestKind {
    /// Register a new name (1025 / 825).
    Register,
    /// Send the client's RSA public key (1026 / 826).
    PublicKey,
    /// Reconnect as an already registered client (1027 / 827).
    Reconnect,
    /// One packet of an encrypted file (1028 / 828).
    SendFile,
    /// The server's cksum matched (1029 / 900).
    CrcOk,
    /// The server's cksum did not match; the file will be sent again (1030 / 901).
    CrcRetry,
    /// The cksum did not match for the fourth time; the client gives up (1031 / 902).
    CrcAbort,
    /// List stored files (1240, retrieval extension).
    List,
    /// Restore one stored version (1241, retrieval extension).
    Restore,
    /// Delete a file's versions (1242, retrieval extension).
    Delete,
    /// Prove possession of the client's private key (1250; secure mode, and
    /// retrieval on the legacy listener).
    Prove,
    /// A request of the repository extension (1260..=1271, secure mode).
    Repo(crate::repo::RepoKind),
}

/// The two numberings of the version 3 request codes (`docs/PROTOCOL.md` §2).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Numbering {
    /// 1025..=1031.
    #[default]
    Modern,
    /// 825..=828 and 900..=902.
    Classic,
}

impl RequestCode {
    pub const REGISTER: Self = Self(1025);
    pub const PUBLIC_KEY: Self = Self(1026);
    pub const RECONNECT: Self = Self(1027);
    pub const SEND_FILE: Self = Self(1028);
    pub const CRC_OK: Self = Self(1029);
    pub const CRC_RETRY: Self = Self(1030);
    pub const CRC_ABORT: Self = Self(1031);
    pub const CLASSIC_REGISTER: Self = Self(825);
    pub const CLASSIC_PUBLIC_KEY: Self = Self(826);
    pub const CLASSIC_RECONNECT: Self = Self(827);
    pub const CLASSIC_SEND_FILE: Self = Self(828);
    pub const CLASSIC_CRC_OK: Self = Self(900);
    pub const CLASSIC_CRC_RETRY: Self = Self(901);
    pub const CLASSIC_CRC_ABORT: Self = Self(902);
    pub const LIST: Self = Self(1240);
    pub const RESTORE: Self = Self(1241);
    pub const DELETE: Self = Self(1242);
    pub const PROVE: Self = Self(1250);

    /// What the code means and which numbering it belongs to, or `None` for
    /// a code this protocol does not know.
    pub fn classify(self) -> Option<(RequestKind, Numbering)> {
        use Numbering::{Classic, Modern};
        use RequestKind::*;
        Some(match self.0 {
            1025 => (Register, Modern),
            1026 => (PublicKey, Modern),
            1027 => (Reconnect, Modern),
            1028 => (SendFile, Modern),
            1029 => (CrcOk, Modern),
            1030 => (CrcRetry, Modern),
            1031 => (CrcAbort, Modern),
            825 => (Register, Classic),
            826 => (PublicKey, Classic),
            827 => (Reconnect, Classic),
            828 => (SendFile, Classic),
            900 => (CrcOk, Classic),
            901 => (CrcRetry, Classic),
            902 => (CrcAbort, Classic),
            // The retrieval extension has one numbering; it is reported as
            // Modern so that a session's numbering is not switched by it.
            1240 => (List, Modern),
            1241 => (Restore, Modern),
            1242 => (Delete, Modern),
            1250 => (Prove, Modern),
            code => (Repo(crate::repo::RepoKind::of_code(code)?), Modern),
        })
    }

    /// The code for `kind` in `numbering`.
    pub fn of(kind: RequestKind, numbering: Numbering) -> Self {
        use RequestKind::*;
        let (modern, classic) = match kind {
            Register => (1025, 825),
            PublicKey => (1026, 826),
            Reconnect => (1027, 827),
            SendFile => (1028, 828),
            CrcOk => (1029, 900),
            CrcRetry => (1030, 901),
            CrcAbort => (1031, 902),
            List => (1240, 1240),
            Restore => (1241, 1241),
            Delete => (1242, 1242),
            Prove => (1250, 1250),
            Repo(kind) => (kind.code(), kind.code()),
        };
        match numbering {
            Numbering::Modern => Self(modern),
            Numbering::Classic => Self(classic),
        }
    }
}

impl ResponseCode {
    pub const REGISTERED: Self = Self(1600);
    pub const REGISTRATION_FAILED: Self = Self(1601);
    pub const KEY_ACCEPTED: Self = Self(1602);
    pub const FILE_RECEIVED: Self = Self(1603);
    pub const ACK: Self = Self(1604);
    pub const RECONNECTED: Self = Self(1605);
    pub const RECONNECT_REJECTED: Self = Self(1606);
    pub const GENERAL_ERROR: Self = Self(1607);
    pub const AUTHENTICATED: Self = Self(1650);
    pub const NOT_AUTHENTICATED: Self = Self(1651);
}

impl fmt::Debug for RequestCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.classify() {
            Some((kind, _)) => write!(f, "{}({kind:?})", self.0),
            None => write!(f, "{}(unknown)", self.0),
        }
    }
}

impl fmt::Display for RequestCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl fmt::Debug for ResponseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.0 {
            1600 => "Registered",
            1601 => "RegistrationFailed",
            1602 => "KeyAccepted",
            1603 => "FileReceived",
            1604 => "Ack",
            1605 => "Reconnected",
            1606 => "ReconnectRejected",
            1607 => "GeneralError",
            _ => "unknown",
        };
        write!(f, "{}({name})", self.0)
    }
}

impl fmt::Display for ResponseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A client's 16-byte identifier (a UUID's bytes; legacy tools print it as
/// 32 lowercase hex digits).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ClientId(pub [u8; 16]);

impl ClientId {
    /// Length on the wire.
    pub const LEN: usize = 16;

    /// A fresh random id (a version 4 UUID's layout).
    pub fn random<R: rand::RngCore + ?Sized>(rng: &mut R) -> Self {
        let mut bytes = [0u8; 16];
        rng.fill_bytes(&mut bytes);
        bytes[6] = (bytes[6] & 0x0f) | 0x40;
        bytes[8] = (bytes[8] & 0x3f) | 0x80;
        Self(bytes)
    }

    /// 32 lowercase hex digits, as in `me.info`.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses 32 hex digits (either case).
    ///
    /// # Errors
    /// When the text is not exactly 32 hex digits.
    pub fn from_hex(text: &str) -> Result<Self, hex::FromHexError> {
        let mut bytes = [0u8; 16];
        hex::decode_to_slice(text, &mut bytes)?;
        Ok(Self(bytes))
    }
}

impl fmt::Debug for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// A parsed request header (`docs/PROTOCOL.md` §1.1).
///
/// | offset | width | field |
/// |---|---|---|
/// | 0 | 16 | client id |
/// | 16 | 1 | version |
/// | 17 | 2 | code, u16 LE |
/// | 19 | 4 | payload size, u32 LE |
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    pub client_id: ClientId,
    pub version: u8,
    pub code: RequestCode,
    pub payload_len: u32,
}

impl RequestHeader {
    /// Parses the first [`REQUEST_HEADER_LEN`] bytes of `buf`, or `None` if
    /// `buf` is shorter.
    pub fn parse(buf: &[u8]) -> Option<Self> {
        let head: &[u8; REQUEST_HEADER_LEN] = buf.get(..REQUEST_HEADER_LEN)?.try_into().ok()?;
        let (id, rest) = head.split_at(16);
        let (version, rest) = rest.split_first()?;
        let (code, size) = rest.split_at(2);
        Some(Self {
            client_id: ClientId(id.try_into().ok()?),
            version: *version,
            code: RequestCode(u16_le(code)?),
            payload_len: u32_le(size)?,
        })
    }

    /// Appends the 23 header bytes to `out`.
    pub fn write(&self, out: &mut impl bytes::BufMut) {
        out.put_slice(&self.client_id.0);
        out.put_u8(self.version);
        out.put_u16_le(self.code.0);
        out.put_u32_le(self.payload_len);
    }
}

/// A parsed response header (`docs/PROTOCOL.md` §1.2).
///
/// | offset | width | field |
/// |---|---|---|
/// | 0 | 1 | version |
/// | 1 | 2 | code, u16 LE |
/// | 3 | 4 | payload size, u32 LE |
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResponseHeader {
    pub version: u8,
    pub code: ResponseCode,
    pub payload_len: u32,
}

impl ResponseHeader {
    /// Parses the first [`RESPONSE_HEADER_LEN`] bytes of `buf`, or `None`
    /// if `buf` is shorter.
    pub fn parse(buf: &[u8]) -> Option<Self> {
        let (version, rest) = buf.split_first()?;
        Some(Self {
            version: *version,
            code: ResponseCode(u16_le(rest.get(..2)?)?),
            payload_len: u32_le(rest.get(2..6)?)?,
        })
    }

    /// Appends the 7 header bytes to `out`.
    pub fn write(&self, out: &mut impl bytes::BufMut) {
        out.put_u8(self.version);
        out.put_u16_le(self.code.0);
        out.put_u32_le(self.payload_len);
    }
}

/// Reads a little-endian u16 from exactly two bytes.
pub(crate) fn u16_le(bytes: &[u8]) -> Option<u16> {
    Some(u16::from_le_bytes(bytes.try_into().ok()?))
}

/// Reads a little-endian u64 from exactly eight bytes.
pub(crate) fn u64_le(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.try_into().ok()?))
}

/// Reads a little-endian u32 from exactly four bytes.
pub(crate) fn u32_le(bytes: &[u8]) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_numberings_classify_to_the_same_kinds() {
        for n in [Numbering::Modern, Numbering::Classic] {
            for kind in [
                RequestKind::Register,
                RequestKind::PublicKey,
                RequestKind::Reconnect,
                RequestKind::SendFile,
                RequestKind::CrcOk,
                RequestKind::CrcRetry,
                RequestKind::CrcAbort,
            ] {
                assert_eq!(RequestCode::of(kind, n).classify(), Some((kind, n)));
            }
        }
        assert_eq!(
            RequestCode(900).classify(),
            Some((RequestKind::CrcOk, Numbering::Classic))
        );
        assert_eq!(RequestCode(1032).classify(), None);
        assert_eq!(RequestCode(829).classify(), None);
    }

    #[test]
    fn request_header_round_trips() {
        let h = RequestHeader {
            client_id: ClientId([7; 16]),
            version: 3,
            code: RequestCode(827),
            payload_len: 255,
        };
        let mut out = Vec::new();
        h.write(&mut out);
        assert_eq!(out.len(), REQUEST_HEADER_LEN);
        assert_eq!(&out[16..23], &[3, 0x3b, 0x03, 0xff, 0, 0, 0]);
        assert_eq!(RequestHeader::parse(&out), Some(h));
        assert_eq!(RequestHeader::parse(&out[..22]), None);
    }

    #[test]
    fn client_id_hex_round_trips() {
        let id = ClientId::from_hex("d09b07813d5b4fb788435e3ca2d4ad4d").unwrap();
        assert_eq!(id.to_hex(), "d09b07813d5b4fb788435e3ca2d4ad4d");
        assert!(ClientId::from_hex("d09b").is_err());
    }
}
