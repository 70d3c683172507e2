//! Over 600 lines: every core request and response, with its field table,
//! parser and encoder side by side, so the two directions stay in step.
//!
//! Typed messages of the version 3 protocol (`docs/PROTOCOL.md` §2-§3) and
//! of secure mode, version 4 (§12).
//!
//! The typed values are the same for both [`Dialect`]s, with sizes wide
//! enough for version 4; parsing and encoding take the dialect, which
//! decides the field widths and which messages exist. Payload parsing here
//! works on a body already known to be complete: a short or overlong field
//! is an error, never "need more bytes".

use bytes::{BufMut, Bytes, BytesMut};

use crate::limits::{Limits, FILE_PACKET_HEAD_LEN, SECURE_FILE_PACKET_HEAD_LEN};
use crate::name::{FileName, UserName, NAME_FIELD_LEN};
use crate::repo::{RepoRequest, RepoResponse};
use crate::retrieval::{RetrievalRequest, RetrievalResponse};
use crate::secure::{MAX_PUBLIC_KEY_DER, PROOF_LEN};
use crate::wire::{
    u16_le, u32_le, u64_le, ClientId, Dialect, Numbering, RequestCode, RequestHeader, RequestKind,
    ResponseCode, ResponseHeader,
};

pub use crate::crypto::{PublicKeyField, PUBLIC_KEY_FIELD_LEN};
pub use crate::payload::PayloadError;

/// A client request without its header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// 1025/825: register `name`; the header's client id is ignored.
    Register { name: UserName },
    /// 1025 in secure mode: register `name` bound to `key`, an RSA public
    /// key as X.509 SubjectPublicKeyInfo DER (§12.3).
    RegisterKey { name: UserName, key: Bytes },
    /// 1026/826: the client's RSA public key (X.509 SubjectPublicKeyInfo DER,
    /// zero-padded to 160 bytes).
    PublicKey { name: UserName, key: PublicKeyField },
    /// 1027/827: reconnect as the client in the header.
    Reconnect { name: UserName },
    /// 1028/828: one packet of an encrypted file.
    SendFile(FilePacket),
    /// 1029/900: the cksum matched; commit the file.
    CrcOk { file: FileName },
    /// 1030/901: the cksum did not match; the file will be sent again.
    CrcRetry { file: FileName },
    /// 1031/902: fourth mismatch; the client gives up on the file.
    CrcAbort { file: FileName },
    /// 1240..=1242: list, restore or delete (`docs/PROTOCOL.md` §11).
    Retrieval(RetrievalRequest),
    /// 1250: the proof of possession of the client's private key; in
    /// secure mode after the key exchange (§12.4), on the legacy listener
    /// before retrieval (§11.5).
    Prove { proof: [u8; PROOF_LEN] },
    /// 1260..=1271: the repository extension (`docs/PROTOCOL.md` §13).
    Repo(RepoRequest),
}

/// The fixed head of a send-file packet.
///
/// Version 3:
///
/// | offset | width | field |
/// |---|---|---|
/// | 0 | 4 | content size: ciphertext bytes of the whole file, u32 LE |
/// | 4 | 4 | original size: plaintext bytes, u32 LE |
/// | 8 | 2 | packet number, 1-based (some deployed clients count from 0), u16 LE |
/// | 10 | 2 | total packets, u16 LE |
/// | 12 | 255 | file name |
/// | 267 | n | this packet's slice of the ciphertext |
///
/// Version 4 (secure mode) widens the sizes and counts:
///
/// | offset | width | field |
/// |---|---|---|
/// | 0 | 8 | content size, u64 LE |
/// | 8 | 8 | original size, u64 LE |
/// | 16 | 4 | packet number, 1-based, u32 LE |
/// | 20 | 4 | total packets, u32 LE |
/// | 24 | 255 | file name |
/// | 279 | n | this packet's slice of the ciphertext |
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PacketHead {
    pub content_size: u64,
    pub orig_size: u64,
    pub packet: u32,
    pub total: u32,
    pub file: FileName,
}

/// One send-file packet: its head and its slice of ciphertext. Only one
/// packet is ever held, never a whole file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FilePacket {
    pub head: PacketHead,
    pub content: Bytes,
}

/// A request with the header fields that are not implied by the message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestFrame {
    pub client_id: ClientId,
    pub numbering: Numbering,
    pub request: Request,
}

impl Request {
    /// What kind of request this is.
    pub fn kind(&self) -> RequestKind {
        match self {
            Request::Register { .. } | Request::RegisterKey { .. } => RequestKind::Register,
            Request::PublicKey { .. } => RequestKind::PublicKey,
            Request::Reconnect { .. } => RequestKind::Reconnect,
            Request::SendFile(_) => RequestKind::SendFile,
            Request::CrcOk { .. } => RequestKind::CrcOk,
            Request::CrcRetry { .. } => RequestKind::CrcRetry,
            Request::CrcAbort { .. } => RequestKind::CrcAbort,
            Request::Retrieval(RetrievalRequest::List { .. }) => RequestKind::List,
            Request::Retrieval(RetrievalRequest::Restore { .. }) => RequestKind::Restore,
            Request::Retrieval(RetrievalRequest::Delete { .. }) => RequestKind::Delete,
            Request::Prove { .. } => RequestKind::Prove,
            Request::Repo(r) => RequestKind::Repo(r.kind()),
        }
    }

    /// The payload size a request of `kind` must declare in `dialect`, as
    /// an inclusive range, given `limits`; `None` when the dialect has no
    /// such request. Checked before the payload is read.
    pub fn payload_bounds(
        kind: RequestKind,
        limits: &Limits,
        dialect: Dialect,
    ) -> Option<(usize, usize)> {
        let secure = dialect == Dialect::Secure;
        Some(match kind {
            RequestKind::Register if secure => (
                NAME_FIELD_LEN + 2 + 1,
                NAME_FIELD_LEN + 2 + MAX_PUBLIC_KEY_DER,
            ),
            RequestKind::Register | RequestKind::Reconnect => (NAME_FIELD_LEN, NAME_FIELD_LEN),
            RequestKind::PublicKey if secure => return None,
            RequestKind::PublicKey => {
                let n = NAME_FIELD_LEN + PUBLIC_KEY_FIELD_LEN;
                (n, n)
            }
            RequestKind::Prove => (PROOF_LEN, PROOF_LEN),
            RequestKind::SendFile => {
                let head = PacketHead::len_in(dialect);
                (head, head.saturating_add(limits.max_packet_content))
            }
            RequestKind::CrcOk | RequestKind::CrcRetry | RequestKind::CrcAbort => {
                (NAME_FIELD_LEN, NAME_FIELD_LEN)
            }
            RequestKind::Repo(_) if !secure => return None,
            RequestKind::Repo(repo) => repo.payload_bounds(limits),
            RequestKind::List | RequestKind::Restore | RequestKind::Delete => {
                let code = RequestCode::of(kind, crate::wire::Numbering::Modern).0;
                let n = RetrievalRequest::payload_len_of(code).unwrap_or_default();
                (n, n)
            }
        })
    }

    /// Parses a complete payload of a request of `kind` in `dialect`.
    ///
    /// # Errors
    /// When the dialect has no such request, the payload's size is wrong for
    /// the kind, or a field is invalid.
    pub fn parse(
        kind: RequestKind,
        code: RequestCode,
        mut payload: Bytes,
        limits: &Limits,
        dialect: Dialect,
    ) -> Result<Self, PayloadError> {
        let (min, max) =
            Self::payload_bounds(kind, limits, dialect).ok_or(PayloadError::NotInDialect {
                code: code.0,
                dialect,
            })?;
        if payload.len() < min || payload.len() > max {
            return Err(PayloadError::Size {
                code: code.0,
                actual: payload.len(),
                expected: match kind {
                    RequestKind::PublicKey => "415",
                    RequestKind::Register if dialect == Dialect::Secure => {
                        "255 + 2 + a public key of 1..=1100 bytes"
                    }
                    RequestKind::Prove => "32",
                    RequestKind::SendFile => "the packet head + content within the limit",
                    RequestKind::List => "9",
                    RequestKind::Restore => "263",
                    RequestKind::Repo(_) => "the size its code allows",
                    _ => "255",
                },
            });
        }
        let max_name = limits.max_name_len;
        Ok(match kind {
            RequestKind::Register if dialect == Dialect::Secure => {
                let name = UserName::from_field(
                    payload.get(..NAME_FIELD_LEN).unwrap_or_default(),
                    max_name,
                )?;
                let declared = u16_le(
                    payload
                        .get(NAME_FIELD_LEN..NAME_FIELD_LEN + 2)
                        .unwrap_or_default(),
                )
                .map(usize::from)
                .unwrap_or_default();
                let key = payload.split_off(NAME_FIELD_LEN + 2);
                if declared == 0 || key.len() != declared {
                    return Err(PayloadError::Size {
                        code: code.0,
                        actual: key.len(),
                        expected: "the public key length its field declares",
                    });
                }
                Request::RegisterKey { name, key }
            }
            RequestKind::Register => Request::Register {
                name: UserName::from_field(&payload, max_name)?,
            },
            RequestKind::Prove => {
                let mut proof = [0u8; PROOF_LEN];
                proof.copy_from_slice(payload.get(..PROOF_LEN).unwrap_or(&[0u8; PROOF_LEN]));
                Request::Prove { proof }
            }
            RequestKind::Reconnect => Request::Reconnect {
                name: UserName::from_field(&payload, max_name)?,
            },
            RequestKind::PublicKey => {
                let (name, key) = payload.split_at(NAME_FIELD_LEN);
                let mut field = [0u8; PUBLIC_KEY_FIELD_LEN];
                field.copy_from_slice(key);
                Request::PublicKey {
                    name: UserName::from_field(name, max_name)?,
                    key: PublicKeyField(field),
                }
            }
            RequestKind::SendFile => {
                let head_bytes = payload.split_to(PacketHead::len_in(dialect));
                let head = PacketHead::parse(&head_bytes, max_name, dialect)?;
                Request::SendFile(FilePacket {
                    head,
                    content: payload,
                })
            }
            RequestKind::CrcOk => Request::CrcOk {
                file: FileName::from_field(&payload, max_name)?,
            },
            RequestKind::CrcRetry => Request::CrcRetry {
                file: FileName::from_field(&payload, max_name)?,
            },
            RequestKind::CrcAbort => Request::CrcAbort {
                file: FileName::from_field(&payload, max_name)?,
            },
            RequestKind::List | RequestKind::Restore | RequestKind::Delete => {
                Request::Retrieval(RetrievalRequest::parse(code.0, &payload, limits)?)
            }
            RequestKind::Repo(repo) => Request::Repo(RepoRequest::parse(repo, payload, limits)?),
        })
    }

    /// Length of the payload this request encodes to in `dialect`.
    pub fn payload_len(&self, dialect: Dialect) -> usize {
        match self {
            Request::PublicKey { .. } => NAME_FIELD_LEN + PUBLIC_KEY_FIELD_LEN,
            Request::RegisterKey { key, .. } => NAME_FIELD_LEN + 2 + key.len(),
            Request::Prove { .. } => PROOF_LEN,
            Request::SendFile(p) => PacketHead::len_in(dialect) + p.content.len(),
            Request::Retrieval(r) => r.payload_len(),
            Request::Repo(r) => r.payload_len(),
            _ => NAME_FIELD_LEN,
        }
    }

    /// Checks that this request exists in `dialect` and that its values fit
    /// the dialect's fields; what an encoder checks before writing.
    ///
    /// # Errors
    /// When the request is of the other dialect or a value does not fit.
    pub fn check_dialect(&self, dialect: Dialect) -> Result<(), PayloadError> {
        let code = RequestCode::of(self.kind(), Numbering::Modern).0;
        let wrong = PayloadError::NotInDialect { code, dialect };
        match (self, dialect) {
            (Request::Register { .. } | Request::PublicKey { .. }, Dialect::Secure)
            | (Request::RegisterKey { .. } | Request::Repo(_), Dialect::Legacy) => Err(wrong),
            (Request::Repo(r), Dialect::Secure) => r.check(&Limits::default()),
            (Request::RegisterKey { key, .. }, _)
                if key.is_empty() || key.len() > MAX_PUBLIC_KEY_DER =>
            {
                Err(PayloadError::Unrepresentable {
                    field: "public key length",
                    value: key.len() as u64,
                    dialect,
                })
            }
            (Request::SendFile(p), Dialect::Legacy) => p.head.check_legacy(),
            _ => Ok(()),
        }
    }

    /// Appends the payload (not the header) to `out` in `dialect`. Values
    /// too wide for a legacy field are saturated; an encoder calls
    /// [`Request::check_dialect`] first.
    pub fn write_payload(&self, out: &mut impl BufMut, dialect: Dialect) {
        match self {
            Request::RegisterKey { name, key } => {
                name.write_field(out);
                out.put_u16_le(u16::try_from(key.len()).unwrap_or(u16::MAX));
                out.put_slice(key);
            }
            Request::Prove { proof } => out.put_slice(proof),
            Request::Register { name } | Request::Reconnect { name } => name.write_field(out),
            Request::PublicKey { name, key } => {
                name.write_field(out);
                out.put_slice(&key.0);
            }
            Request::SendFile(p) => {
                p.head.write(out, dialect);
                out.put_slice(&p.content);
            }
            Request::CrcOk { file } | Request::CrcRetry { file } | Request::CrcAbort { file } => {
                file.write_field(out)
            }
            Request::Retrieval(r) => r.write_payload(out),
            Request::Repo(r) => r.write_payload(out),
        }
    }
}

impl PacketHead {
    /// Length of the head in `dialect`: 267 or 279 bytes.
    pub const fn len_in(dialect: Dialect) -> usize {
        match dialect {
            Dialect::Legacy => FILE_PACKET_HEAD_LEN,
            Dialect::Secure => SECURE_FILE_PACKET_HEAD_LEN,
        }
    }

    /// Parses the head of `dialect`.
    ///
    /// # Errors
    /// When the name is invalid, the total is 0, or the packet number is
    /// above the total (or 0, in secure mode).
    pub fn parse(head: &[u8], max_name: usize, dialect: Dialect) -> Result<Self, PayloadError> {
        let field = |range: std::ops::Range<usize>| head.get(range).unwrap_or_default();
        let size_err = || PayloadError::Size {
            code: 0,
            actual: head.len(),
            expected: "the packet head's length",
        };
        let (content_size, orig_size, packet, total, name_at) = match dialect {
            Dialect::Legacy => (
                u64::from(u32_le(field(0..4)).ok_or_else(size_err)?),
                u64::from(u32_le(field(4..8)).ok_or_else(size_err)?),
                u32::from(u16_le(field(8..10)).ok_or_else(size_err)?),
                u32::from(u16_le(field(10..12)).ok_or_else(size_err)?),
                12,
            ),
            Dialect::Secure => (
                u64_le(field(0..8)).ok_or_else(size_err)?,
                u64_le(field(8..16)).ok_or_else(size_err)?,
                u32_le(field(16..20)).ok_or_else(size_err)?,
                u32_le(field(20..24)).ok_or_else(size_err)?,
                24,
            ),
        };
        // Legacy clients that number from 0 send packet 0; whether that is
        // accepted is the reassembler's call (`docs/PROTOCOL.md` §9).
        let first = match dialect {
            Dialect::Legacy => 0,
            Dialect::Secure => 1,
        };
        if packet < first || packet > total || total == 0 {
            return Err(PayloadError::PacketNumber {
                number: packet,
                total,
            });
        }
        let file = FileName::from_field(field(name_at..name_at + NAME_FIELD_LEN), max_name)?;
        Ok(Self {
            content_size,
            orig_size,
            packet,
            total,
            file,
        })
    }

    /// Whether the values fit the legacy head's fields.
    fn check_legacy(&self) -> Result<(), PayloadError> {
        let too_wide = |field, value: u64, max: u64| {
            (value > max).then_some(PayloadError::Unrepresentable {
                field,
                value,
                dialect: Dialect::Legacy,
            })
        };
        let u32max = u64::from(u32::MAX);
        let u16max = u64::from(u16::MAX);
        match too_wide("content size", self.content_size, u32max)
            .or_else(|| too_wide("original size", self.orig_size, u32max))
            .or_else(|| too_wide("total packets", u64::from(self.total), u16max))
            .or_else(|| too_wide("packet number", u64::from(self.packet), u16max))
        {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Appends the head of `dialect` to `out` (legacy fields saturated; see
    /// [`Request::check_dialect`]).
    pub fn write(&self, out: &mut impl BufMut, dialect: Dialect) {
        match dialect {
            Dialect::Legacy => {
                out.put_u32_le(u32::try_from(self.content_size).unwrap_or(u32::MAX));
                out.put_u32_le(u32::try_from(self.orig_size).unwrap_or(u32::MAX));
                out.put_u16_le(u16::try_from(self.packet).unwrap_or(u16::MAX));
                out.put_u16_le(u16::try_from(self.total).unwrap_or(u16::MAX));
            }
            Dialect::Secure => {
                out.put_u64_le(self.content_size);
                out.put_u64_le(self.orig_size);
                out.put_u32_le(self.packet);
                out.put_u32_le(self.total);
            }
        }
        self.file.write_field(out);
    }
}

impl RequestFrame {
    /// The header this frame encodes with in `dialect`.
    pub fn header_in(&self, dialect: Dialect) -> RequestHeader {
        RequestHeader {
            client_id: self.client_id,
            version: dialect.version(),
            code: RequestCode::of(self.request.kind(), self.numbering),
            // A request's payload is bounded by the limits it was built under,
            // far below u32::MAX; saturate rather than wrap if misused.
            payload_len: u32::try_from(self.request.payload_len(dialect)).unwrap_or(u32::MAX),
        }
    }

    /// The legacy header of this frame.
    pub fn header(&self) -> RequestHeader {
        self.header_in(Dialect::Legacy)
    }

    /// Appends the whole request (header and payload) to `out` in `dialect`.
    /// See [`Request::check_dialect`].
    pub fn encode_in(&self, dialect: Dialect, out: &mut BytesMut) {
        out.reserve(crate::wire::REQUEST_HEADER_LEN + self.request.payload_len(dialect));
        let content = self.encode_head_in(dialect, out);
        out.extend_from_slice(&content);
    }

    /// Appends the request to `out` in `dialect` except for a file packet's
    /// content, which is returned (empty for every other request) to be
    /// written right after `out` without a copy. `out` followed by the
    /// returned bytes is exactly what [`encode_in`](Self::encode_in) writes.
    pub fn encode_head_in(&self, dialect: Dialect, out: &mut BytesMut) -> Bytes {
        self.header_in(dialect).write(out);
        match &self.request {
            Request::SendFile(packet) => {
                packet.head.write(out, dialect);
                packet.content.clone()
            }
            Request::Repo(RepoRequest::PackData { content }) => content.clone(),
            other => {
                other.write_payload(out, dialect);
                Bytes::new()
            }
        }
    }

    /// Appends the whole request in the legacy dialect.
    pub fn encode(&self, out: &mut BytesMut) {
        self.encode_in(Dialect::Legacy, out);
    }
}

/// A server response (`docs/PROTOCOL.md` §3.2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Response {
    /// 1600: registered under this id.
    Registered { client_id: ClientId },
    /// 1601: the name is taken.
    RegistrationFailed,
    /// 1602: public key stored; the AES key follows, RSA-OAEP-wrapped.
    KeyAccepted {
        client_id: ClientId,
        wrapped_key: Bytes,
    },
    /// 1603: the last packet arrived; the server's cksum of the plaintext.
    FileReceived {
        client_id: ClientId,
        content_size: u64,
        file: FileName,
        cksum: u32,
    },
    /// 1604: acknowledged.
    Ack { client_id: ClientId },
    /// 1605: reconnected; a fresh AES key follows, RSA-OAEP-wrapped.
    Reconnected {
        client_id: ClientId,
        wrapped_key: Bytes,
    },
    /// 1606: reconnect refused; the client must register anew. Some servers
    /// send no id (`None`), which we accept and reproduce.
    ReconnectRejected { client_id: Option<ClientId> },
    /// 1607: a general server error.
    GeneralError,
    /// 1640..=1645: answers to retrieval requests (`docs/PROTOCOL.md` §11).
    Retrieval(RetrievalResponse),
    /// 1650: the proof was accepted; every request of this client may
    /// follow (secure mode, §12.4), or its retrieval requests (legacy
    /// listener, §11.5).
    Authenticated { client_id: ClientId },
    /// 1651: the proof was wrong, or a request needed one that was not
    /// given. The server closes the connection.
    NotAuthenticated,
    /// 1660..=1675: answers of the repository extension (§13).
    Repo(RepoResponse),
}

/// Payload length of a 1603 response.
pub const FILE_RECEIVED_LEN: usize = 16 + 4 + NAME_FIELD_LEN + 4;
/// Payload length of a 1603 response in secure mode (64-bit content size).
pub const SECURE_FILE_RECEIVED_LEN: usize = 16 + 8 + NAME_FIELD_LEN + 4;

impl Response {
    /// The response code.
    pub fn code(&self) -> ResponseCode {
        match self {
            Response::Registered { .. } => ResponseCode::REGISTERED,
            Response::RegistrationFailed => ResponseCode::REGISTRATION_FAILED,
            Response::KeyAccepted { .. } => ResponseCode::KEY_ACCEPTED,
            Response::FileReceived { .. } => ResponseCode::FILE_RECEIVED,
            Response::Ack { .. } => ResponseCode::ACK,
            Response::Reconnected { .. } => ResponseCode::RECONNECTED,
            Response::ReconnectRejected { .. } => ResponseCode::RECONNECT_REJECTED,
            Response::GeneralError => ResponseCode::GENERAL_ERROR,
            Response::Retrieval(r) => r.code(),
            Response::Authenticated { .. } => ResponseCode::AUTHENTICATED,
            Response::NotAuthenticated => ResponseCode::NOT_AUTHENTICATED,
            Response::Repo(r) => r.code(),
        }
    }

    /// The inclusive range of payload sizes a response with `code` may
    /// declare in `dialect`, or `None` for a code unknown there.
    pub fn payload_bounds(
        code: ResponseCode,
        limits: &Limits,
        dialect: Dialect,
    ) -> Option<(usize, usize)> {
        let secure = dialect == Dialect::Secure;
        Some(match code {
            ResponseCode::AUTHENTICATED => (16, 16),
            ResponseCode::NOT_AUTHENTICATED => (0, 0),
            ResponseCode::FILE_RECEIVED if secure => {
                (SECURE_FILE_RECEIVED_LEN, SECURE_FILE_RECEIVED_LEN)
            }
            ResponseCode::REGISTERED | ResponseCode::ACK => (16, 16),
            ResponseCode::RECONNECT_REJECTED => (0, 16),
            ResponseCode::REGISTRATION_FAILED | ResponseCode::GENERAL_ERROR => (0, 0),
            ResponseCode::KEY_ACCEPTED | ResponseCode::RECONNECTED => {
                (17, 16 + limits.max_wrapped_key)
            }
            ResponseCode::FILE_RECEIVED => (FILE_RECEIVED_LEN, FILE_RECEIVED_LEN),
            _ if secure && RepoResponse::payload_bounds(code, limits).is_some() => {
                return RepoResponse::payload_bounds(code, limits)
            }
            _ => return RetrievalResponse::payload_bounds(code, limits),
        })
    }

    /// Parses a complete payload of a response with `code` in `dialect`.
    ///
    /// # Errors
    /// When the code is unknown, the size is wrong for it, or a field is invalid.
    pub fn parse(
        code: ResponseCode,
        mut payload: Bytes,
        limits: &Limits,
        dialect: Dialect,
    ) -> Result<Self, PayloadError> {
        if RetrievalResponse::payload_bounds(code, limits).is_some() {
            return RetrievalResponse::parse(code, payload, limits).map(Response::Retrieval);
        }
        if dialect == Dialect::Secure && RepoResponse::payload_bounds(code, limits).is_some() {
            return RepoResponse::parse(code, payload, limits).map(Response::Repo);
        }
        let size_err = |expected| PayloadError::Size {
            code: code.0,
            actual: payload.len(),
            expected,
        };
        let (min, max) =
            Self::payload_bounds(code, limits, dialect).ok_or_else(|| size_err("a known code"))?;
        if payload.len() < min || payload.len() > max {
            return Err(size_err("the size its code fixes"));
        }
        let id = |p: &[u8]| {
            ClientId(
                p.get(..16)
                    .and_then(|s| s.try_into().ok())
                    .unwrap_or_default(),
            )
        };
        Ok(match code {
            ResponseCode::REGISTERED => Response::Registered {
                client_id: id(&payload),
            },
            ResponseCode::ACK => Response::Ack {
                client_id: id(&payload),
            },
            ResponseCode::AUTHENTICATED => Response::Authenticated {
                client_id: id(&payload),
            },
            ResponseCode::NOT_AUTHENTICATED => Response::NotAuthenticated,
            ResponseCode::REGISTRATION_FAILED => Response::RegistrationFailed,
            ResponseCode::GENERAL_ERROR => Response::GeneralError,
            ResponseCode::RECONNECT_REJECTED => match payload.len() {
                0 => Response::ReconnectRejected { client_id: None },
                16 => Response::ReconnectRejected {
                    client_id: Some(id(&payload)),
                },
                _ => return Err(size_err("0 or 16")),
            },
            ResponseCode::KEY_ACCEPTED | ResponseCode::RECONNECTED => {
                let client_id = id(&payload);
                let wrapped_key = payload.split_off(16);
                if code == ResponseCode::KEY_ACCEPTED {
                    Response::KeyAccepted {
                        client_id,
                        wrapped_key,
                    }
                } else {
                    Response::Reconnected {
                        client_id,
                        wrapped_key,
                    }
                }
            }
            _ => {
                // FILE_RECEIVED, the only code left with a fixed layout.
                let (content_size, name_at) = match dialect {
                    Dialect::Legacy => (
                        u32_le(payload.get(16..20).unwrap_or_default()).map(u64::from),
                        20,
                    ),
                    Dialect::Secure => (u64_le(payload.get(16..24).unwrap_or_default()), 24),
                };
                let content_size = content_size.ok_or_else(|| size_err("279 or 283"))?;
                let name_end = name_at + NAME_FIELD_LEN;
                let file = FileName::from_field(
                    payload.get(name_at..name_end).unwrap_or_default(),
                    limits.max_name_len,
                )?;
                let cksum = u32_le(payload.get(name_end..name_end + 4).unwrap_or_default())
                    .ok_or_else(|| size_err("279 or 283"))?;
                Response::FileReceived {
                    client_id: id(&payload),
                    content_size,
                    file,
                    cksum,
                }
            }
        })
    }

    /// Length of the payload this response encodes to in `dialect`.
    pub fn payload_len(&self, dialect: Dialect) -> usize {
        match self {
            Response::Registered { .. } | Response::Ack { .. } | Response::Authenticated { .. } => {
                16
            }
            Response::RegistrationFailed | Response::GeneralError | Response::NotAuthenticated => 0,
            Response::ReconnectRejected { client_id } => client_id.map_or(0, |_| 16),
            Response::KeyAccepted { wrapped_key, .. }
            | Response::Reconnected { wrapped_key, .. } => 16 + wrapped_key.len(),
            Response::FileReceived { .. } if dialect == Dialect::Secure => SECURE_FILE_RECEIVED_LEN,
            Response::FileReceived { .. } => FILE_RECEIVED_LEN,
            Response::Retrieval(r) => r.payload_len(),
            Response::Repo(r) => r.payload_len(),
        }
    }

    /// Checks that this response exists in `dialect` and that its values
    /// fit the dialect's fields; what an encoder checks before writing.
    ///
    /// # Errors
    /// When a value does not fit the dialect's field.
    pub fn check_dialect(&self, dialect: Dialect) -> Result<(), PayloadError> {
        match (self, dialect) {
            (Response::FileReceived { content_size, .. }, Dialect::Legacy)
                if *content_size > u64::from(u32::MAX) =>
            {
                Err(PayloadError::Unrepresentable {
                    field: "content size",
                    value: *content_size,
                    dialect,
                })
            }
            (Response::Repo(r), Dialect::Legacy) => Err(PayloadError::NotInDialect {
                code: r.code().0,
                dialect,
            }),
            _ => Ok(()),
        }
    }

    /// Appends the whole response (header and payload) to `out` in the
    /// legacy dialect.
    pub fn encode(&self, out: &mut BytesMut) {
        self.encode_in(Dialect::Legacy, out);
    }

    /// Appends the whole response (header and payload) to `out` in
    /// `dialect` (legacy fields saturated; see [`Response::check_dialect`]).
    pub fn encode_in(&self, dialect: Dialect, out: &mut BytesMut) {
        let len = self.payload_len(dialect);
        out.reserve(crate::wire::RESPONSE_HEADER_LEN + len);
        ResponseHeader {
            version: dialect.version(),
            code: self.code(),
            payload_len: u32::try_from(len).unwrap_or(u32::MAX),
        }
        .write(out);
        match self {
            Response::Registered { client_id }
            | Response::Ack { client_id }
            | Response::Authenticated { client_id } => out.put_slice(&client_id.0),
            Response::RegistrationFailed | Response::GeneralError | Response::NotAuthenticated => {}
            Response::ReconnectRejected { client_id } => {
                if let Some(id) = client_id {
                    out.put_slice(&id.0);
                }
            }
            Response::KeyAccepted {
                client_id,
                wrapped_key,
            }
            | Response::Reconnected {
                client_id,
                wrapped_key,
            } => {
                out.put_slice(&client_id.0);
                out.put_slice(wrapped_key);
            }
            Response::FileReceived {
                client_id,
                content_size,
                file,
                cksum,
            } => {
                out.put_slice(&client_id.0);
                match dialect {
                    Dialect::Legacy => {
                        out.put_u32_le(u32::try_from(*content_size).unwrap_or(u32::MAX))
                    }
                    Dialect::Secure => out.put_u64_le(*content_size),
                }
                file.write_field(out);
                out.put_u32_le(*cksum);
            }
            Response::Retrieval(r) => r.write_payload(out),
            Response::Repo(r) => r.write_payload(out),
        }
    }
}
