//! Typed messages of the version 3 protocol (`docs/PROTOCOL.md` §2-§3).
//!
//! Payload parsing here works on a body already known to be complete: a
//! short or overlong field is an error, never "need more bytes".

use bytes::{BufMut, Bytes, BytesMut};

use crate::limits::{Limits, FILE_PACKET_HEAD_LEN};
use crate::name::{FileName, NameError, UserName, NAME_FIELD_LEN};
use crate::retrieval::{RetrievalRequest, RetrievalResponse};
use crate::wire::{
    u16_le, u32_le, ClientId, Numbering, RequestCode, RequestHeader, RequestKind, ResponseCode,
    ResponseHeader, VERSION,
};

/// Width of the public-key field of a 1026/826 request.
pub const PUBLIC_KEY_FIELD_LEN: usize = 160;

/// Why a payload that arrived whole could not be understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    #[error("payload of {code} is {actual} bytes, expected {expected}")]
    Size {
        code: u16,
        actual: usize,
        expected: &'static str,
    },
    #[error("bad name field: {0}")]
    Name(#[from] NameError),
    #[error("packet {number} of {total} is out of range")]
    PacketNumber { number: u16, total: u16 },
}

/// A client request without its header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// 1025/825: register `name`; the header's client id is ignored.
    Register { name: UserName },
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
}

/// The raw 160-byte public-key field, kept as sent so that it re-encodes
/// byte for byte. See [`crate::crypto::parse_public_key`].
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

/// The fixed head of a send-file packet.
///
/// | offset | width | field |
/// |---|---|---|
/// | 0 | 4 | content size: ciphertext bytes of the whole file, u32 LE |
/// | 4 | 4 | original size: plaintext bytes, u32 LE |
/// | 8 | 2 | packet number, 1-based, u16 LE |
/// | 10 | 2 | total packets, u16 LE |
/// | 12 | 255 | file name |
/// | 267 | n | this packet's slice of the ciphertext |
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PacketHead {
    pub content_size: u32,
    pub orig_size: u32,
    pub packet: u16,
    pub total: u16,
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
            Request::Register { .. } => RequestKind::Register,
            Request::PublicKey { .. } => RequestKind::PublicKey,
            Request::Reconnect { .. } => RequestKind::Reconnect,
            Request::SendFile(_) => RequestKind::SendFile,
            Request::CrcOk { .. } => RequestKind::CrcOk,
            Request::CrcRetry { .. } => RequestKind::CrcRetry,
            Request::CrcAbort { .. } => RequestKind::CrcAbort,
            Request::Retrieval(RetrievalRequest::List { .. }) => RequestKind::List,
            Request::Retrieval(RetrievalRequest::Restore { .. }) => RequestKind::Restore,
            Request::Retrieval(RetrievalRequest::Delete { .. }) => RequestKind::Delete,
        }
    }

    /// The payload size a request of `kind` must declare, as an inclusive
    /// range, given `limits`. Checked before the payload is read.
    pub fn payload_bounds(kind: RequestKind, limits: &Limits) -> (usize, usize) {
        match kind {
            RequestKind::Register | RequestKind::Reconnect => (NAME_FIELD_LEN, NAME_FIELD_LEN),
            RequestKind::PublicKey => {
                let n = NAME_FIELD_LEN + PUBLIC_KEY_FIELD_LEN;
                (n, n)
            }
            RequestKind::SendFile => (FILE_PACKET_HEAD_LEN, limits.max_file_packet_payload()),
            RequestKind::CrcOk | RequestKind::CrcRetry | RequestKind::CrcAbort => {
                (NAME_FIELD_LEN, NAME_FIELD_LEN)
            }
            RequestKind::List | RequestKind::Restore | RequestKind::Delete => {
                let code = RequestCode::of(kind, crate::wire::Numbering::Modern).0;
                let n = RetrievalRequest::payload_len_of(code).unwrap_or_default();
                (n, n)
            }
        }
    }

    /// Parses a complete payload of a request of `kind`.
    ///
    /// # Errors
    /// When the payload's size is wrong for the kind or a field is invalid.
    pub fn parse(
        kind: RequestKind,
        code: RequestCode,
        mut payload: Bytes,
        limits: &Limits,
    ) -> Result<Self, PayloadError> {
        let (min, max) = Self::payload_bounds(kind, limits);
        if payload.len() < min || payload.len() > max {
            return Err(PayloadError::Size {
                code: code.0,
                actual: payload.len(),
                expected: match kind {
                    RequestKind::PublicKey => "415",
                    RequestKind::SendFile => "267 + packet content within the limit",
                    RequestKind::List => "9",
                    RequestKind::Restore => "263",
                    _ => "255",
                },
            });
        }
        let max_name = limits.max_name_len;
        Ok(match kind {
            RequestKind::Register => Request::Register {
                name: UserName::from_field(&payload, max_name)?,
            },
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
                let head_bytes = payload.split_to(FILE_PACKET_HEAD_LEN);
                let head = PacketHead::parse(&head_bytes, max_name)?;
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
        })
    }

    /// Length of the payload this request encodes to.
    pub fn payload_len(&self) -> usize {
        match self {
            Request::PublicKey { .. } => NAME_FIELD_LEN + PUBLIC_KEY_FIELD_LEN,
            Request::SendFile(p) => FILE_PACKET_HEAD_LEN + p.content.len(),
            Request::Retrieval(r) => r.payload_len(),
            _ => NAME_FIELD_LEN,
        }
    }

    /// Appends the payload (not the header) to `out`.
    pub fn write_payload(&self, out: &mut impl BufMut) {
        match self {
            Request::Register { name } | Request::Reconnect { name } => name.write_field(out),
            Request::PublicKey { name, key } => {
                name.write_field(out);
                out.put_slice(&key.0);
            }
            Request::SendFile(p) => {
                p.head.write(out);
                out.put_slice(&p.content);
            }
            Request::CrcOk { file } | Request::CrcRetry { file } | Request::CrcAbort { file } => {
                file.write_field(out)
            }
            Request::Retrieval(r) => r.write_payload(out),
        }
    }
}

impl PacketHead {
    /// Parses the 267-byte head.
    ///
    /// # Errors
    /// When the name is invalid or the packet number is 0 or above the total.
    pub fn parse(head: &[u8], max_name: usize) -> Result<Self, PayloadError> {
        let field = |range: std::ops::Range<usize>| head.get(range).unwrap_or_default();
        let size_err = || PayloadError::Size {
            code: 0,
            actual: head.len(),
            expected: "267",
        };
        let content_size = u32_le(field(0..4)).ok_or_else(size_err)?;
        let orig_size = u32_le(field(4..8)).ok_or_else(size_err)?;
        let packet = u16_le(field(8..10)).ok_or_else(size_err)?;
        let total = u16_le(field(10..12)).ok_or_else(size_err)?;
        if packet == 0 || packet > total {
            return Err(PayloadError::PacketNumber {
                number: packet,
                total,
            });
        }
        let file = FileName::from_field(field(12..FILE_PACKET_HEAD_LEN), max_name)?;
        Ok(Self {
            content_size,
            orig_size,
            packet,
            total,
            file,
        })
    }

    /// Appends the 267-byte head to `out`.
    pub fn write(&self, out: &mut impl BufMut) {
        out.put_u32_le(self.content_size);
        out.put_u32_le(self.orig_size);
        out.put_u16_le(self.packet);
        out.put_u16_le(self.total);
        self.file.write_field(out);
    }
}

impl RequestFrame {
    /// The header this frame encodes with.
    pub fn header(&self) -> RequestHeader {
        RequestHeader {
            client_id: self.client_id,
            version: VERSION,
            code: RequestCode::of(self.request.kind(), self.numbering),
            // A request's payload is bounded by the limits it was built under,
            // far below u32::MAX; saturate rather than wrap if misused.
            payload_len: u32::try_from(self.request.payload_len()).unwrap_or(u32::MAX),
        }
    }

    /// Appends the whole request (header and payload) to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        out.reserve(crate::wire::REQUEST_HEADER_LEN + self.request.payload_len());
        self.header().write(out);
        self.request.write_payload(out);
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
        content_size: u32,
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
}

/// Payload length of a 1603 response.
pub const FILE_RECEIVED_LEN: usize = 16 + 4 + NAME_FIELD_LEN + 4;

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
        }
    }

    /// The inclusive range of payload sizes a response with `code` may
    /// declare, or `None` for an unknown code.
    pub fn payload_bounds(code: ResponseCode, limits: &Limits) -> Option<(usize, usize)> {
        Some(match code {
            ResponseCode::REGISTERED | ResponseCode::ACK => (16, 16),
            ResponseCode::RECONNECT_REJECTED => (0, 16),
            ResponseCode::REGISTRATION_FAILED | ResponseCode::GENERAL_ERROR => (0, 0),
            ResponseCode::KEY_ACCEPTED | ResponseCode::RECONNECTED => {
                (17, 16 + limits.max_wrapped_key)
            }
            ResponseCode::FILE_RECEIVED => (FILE_RECEIVED_LEN, FILE_RECEIVED_LEN),
            _ => return RetrievalResponse::payload_bounds(code, limits),
        })
    }

    /// Parses a complete payload of a response with `code`.
    ///
    /// # Errors
    /// When the code is unknown, the size is wrong for it, or a field is invalid.
    pub fn parse(
        code: ResponseCode,
        mut payload: Bytes,
        limits: &Limits,
    ) -> Result<Self, PayloadError> {
        if RetrievalResponse::payload_bounds(code, limits).is_some() {
            return RetrievalResponse::parse(code, payload, limits).map(Response::Retrieval);
        }
        let size_err = |expected| PayloadError::Size {
            code: code.0,
            actual: payload.len(),
            expected,
        };
        let (min, max) =
            Self::payload_bounds(code, limits).ok_or_else(|| size_err("a known code"))?;
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
                let content_size = u32_le(payload.get(16..20).unwrap_or_default())
                    .ok_or_else(|| size_err("279"))?;
                let file = FileName::from_field(
                    payload.get(20..275).unwrap_or_default(),
                    limits.max_name_len,
                )?;
                let cksum = u32_le(payload.get(275..279).unwrap_or_default())
                    .ok_or_else(|| size_err("279"))?;
                Response::FileReceived {
                    client_id: id(&payload),
                    content_size,
                    file,
                    cksum,
                }
            }
        })
    }

    /// Length of the payload this response encodes to.
    pub fn payload_len(&self) -> usize {
        match self {
            Response::Registered { .. } | Response::Ack { .. } => 16,
            Response::RegistrationFailed | Response::GeneralError => 0,
            Response::ReconnectRejected { client_id } => client_id.map_or(0, |_| 16),
            Response::KeyAccepted { wrapped_key, .. }
            | Response::Reconnected { wrapped_key, .. } => 16 + wrapped_key.len(),
            Response::FileReceived { .. } => FILE_RECEIVED_LEN,
            Response::Retrieval(r) => r.payload_len(),
        }
    }

    /// Appends the whole response (header and payload) to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        let len = self.payload_len();
        out.reserve(crate::wire::RESPONSE_HEADER_LEN + len);
        ResponseHeader {
            version: VERSION,
            code: self.code(),
            payload_len: u32::try_from(len).unwrap_or(u32::MAX),
        }
        .write(out);
        match self {
            Response::Registered { client_id } | Response::Ack { client_id } => {
                out.put_slice(&client_id.0)
            }
            Response::RegistrationFailed | Response::GeneralError => {}
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
                out.put_u32_le(*content_size);
                file.write_field(out);
                out.put_u32_le(*cksum);
            }
            Response::Retrieval(r) => r.write_payload(out),
        }
    }
}
