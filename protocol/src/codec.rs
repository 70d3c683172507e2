//! `tokio_util::codec` decoders and encoders for both directions
//! (`docs/PROTOCOL.md` §1).
//!
//! The decoders follow the `Decoder` contract: too few bytes is `Ok(None)`;
//! anything malformed is an `Err`, after which the stream is corrupt and the
//! connection must end (a binary protocol cannot resynchronise). Every size a
//! peer declares is checked against [`Limits`] as soon as the header is parsed,
//! before any buffer grows; memory is reserved in steps as bytes arrive, never
//! by the size a peer declares.

use bytes::{Buf, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::limits::Limits;
use crate::message::{PayloadError, Request, RequestFrame, Response};
use crate::wire::{
    Dialect, Numbering, RequestHeader, ResponseCode, ResponseHeader, REQUEST_HEADER_LEN,
    RESPONSE_HEADER_LEN,
};

/// Why a byte stream could not be decoded. Every variant ends the stream.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("unsupported protocol version {got} (expected {expected})")]
    Version { got: u8, expected: u8 },
    #[error("unknown code {0}")]
    UnknownCode(u16),
    #[error("code {code} declares a {declared}-byte payload; allowed {min}..={max}")]
    PayloadSize {
        code: u16,
        declared: u32,
        min: usize,
        max: usize,
    },
    #[error("malformed payload: {0}")]
    Payload(#[from] PayloadError),
    #[error("cannot encode: {0}")]
    Encode(PayloadError),
}

/// How much to reserve at most in one step while a declared payload arrives.
const RESERVE_STEP: usize = 64 * 1024;

/// Reserves room for at most [`RESERVE_STEP`] more bytes toward `needed`.
fn reserve_toward(src: &mut BytesMut, needed: usize) {
    let missing = needed.saturating_sub(src.len());
    src.reserve(missing.min(RESERVE_STEP));
}

#[derive(Debug, Clone, Copy)]
enum DecodeState<H> {
    Head,
    Data(H),
}

/// The server side: decodes requests, encodes responses.
#[derive(Debug, Clone)]
pub struct ServerCodec {
    limits: Limits,
    dialect: Dialect,
    state: DecodeState<RequestHeader>,
}

impl ServerCodec {
    /// A legacy (version 3) codec enforcing `limits`.
    pub fn new(limits: Limits) -> Self {
        Self::with_dialect(limits, Dialect::Legacy)
    }

    /// A codec for `dialect` enforcing `limits`.
    pub fn with_dialect(limits: Limits, dialect: Dialect) -> Self {
        Self {
            limits,
            dialect,
            state: DecodeState::Head,
        }
    }

    /// The limits this codec enforces.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The dialect this codec speaks.
    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    fn check_head(&self, header: &RequestHeader) -> Result<(), CodecError> {
        if header.version != self.dialect.version() {
            return Err(CodecError::Version {
                got: header.version,
                expected: self.dialect.version(),
            });
        }
        let (kind, numbering) = header
            .code
            .classify()
            .ok_or(CodecError::UnknownCode(header.code.0))?;
        // Secure mode has one numbering.
        if self.dialect == Dialect::Secure && numbering == Numbering::Classic {
            return Err(CodecError::UnknownCode(header.code.0));
        }
        let (min, max) = Request::payload_bounds(kind, &self.limits, self.dialect)
            .ok_or(CodecError::UnknownCode(header.code.0))?;
        let declared = header.payload_len as usize;
        if declared < min || declared > max {
            return Err(CodecError::PayloadSize {
                code: header.code.0,
                declared: header.payload_len,
                min,
                max,
            });
        }
        Ok(())
    }
}

impl Default for ServerCodec {
    fn default() -> Self {
        Self::new(Limits::default())
    }
}

impl Decoder for ServerCodec {
    type Item = RequestFrame;
    type Error = CodecError;

    /// Cancel-safe in the `Framed` sense: state survives between calls.
    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<RequestFrame>, CodecError> {
        let header = match self.state {
            DecodeState::Head => {
                let Some(header) = RequestHeader::parse(src) else {
                    src.reserve(REQUEST_HEADER_LEN);
                    return Ok(None);
                };
                self.check_head(&header)?;
                src.advance(REQUEST_HEADER_LEN);
                self.state = DecodeState::Data(header);
                header
            }
            DecodeState::Data(header) => header,
        };
        let len = header.payload_len as usize;
        if src.len() < len {
            reserve_toward(src, len);
            return Ok(None);
        }
        self.state = DecodeState::Head;
        let payload = src.split_to(len).freeze();
        let (kind, numbering) = header
            .code
            .classify()
            .ok_or(CodecError::UnknownCode(header.code.0))?;
        let request = Request::parse(kind, header.code, payload, &self.limits, self.dialect)?;
        src.reserve(REQUEST_HEADER_LEN);
        Ok(Some(RequestFrame {
            client_id: header.client_id,
            numbering,
            request,
        }))
    }
}

impl Encoder<Response> for ServerCodec {
    type Error = CodecError;

    fn encode(&mut self, item: Response, dst: &mut BytesMut) -> Result<(), CodecError> {
        self.encode(&item, dst)
    }
}

impl Encoder<&Response> for ServerCodec {
    type Error = CodecError;

    /// Refuses a response that the dialect cannot carry, writing nothing.
    fn encode(&mut self, item: &Response, dst: &mut BytesMut) -> Result<(), CodecError> {
        item.check_dialect(self.dialect)
            .map_err(CodecError::Encode)?;
        item.encode_in(self.dialect, dst);
        Ok(())
    }
}

/// The client side: decodes responses, encodes requests.
#[derive(Debug, Clone)]
pub struct ClientCodec {
    limits: Limits,
    dialect: Dialect,
    state: DecodeState<ResponseHeader>,
}

impl ClientCodec {
    /// A legacy (version 3) codec enforcing `limits`.
    pub fn new(limits: Limits) -> Self {
        Self::with_dialect(limits, Dialect::Legacy)
    }

    /// A codec for `dialect` enforcing `limits`.
    pub fn with_dialect(limits: Limits, dialect: Dialect) -> Self {
        Self {
            limits,
            dialect,
            state: DecodeState::Head,
        }
    }

    /// The dialect this codec speaks.
    pub fn dialect(&self) -> Dialect {
        self.dialect
    }
}

impl Default for ClientCodec {
    fn default() -> Self {
        Self::new(Limits::default())
    }
}

impl Decoder for ClientCodec {
    type Item = Response;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Response>, CodecError> {
        let header = match self.state {
            DecodeState::Head => {
                let Some(header) = ResponseHeader::parse(src) else {
                    src.reserve(RESPONSE_HEADER_LEN);
                    return Ok(None);
                };
                if header.version != self.dialect.version() {
                    return Err(CodecError::Version {
                        got: header.version,
                        expected: self.dialect.version(),
                    });
                }
                let (min, max) = Response::payload_bounds(header.code, &self.limits, self.dialect)
                    .ok_or(CodecError::UnknownCode(header.code.0))?;
                let declared = header.payload_len as usize;
                if declared < min || declared > max {
                    return Err(CodecError::PayloadSize {
                        code: header.code.0,
                        declared: header.payload_len,
                        min,
                        max,
                    });
                }
                src.advance(RESPONSE_HEADER_LEN);
                self.state = DecodeState::Data(header);
                header
            }
            DecodeState::Data(header) => header,
        };
        let len = header.payload_len as usize;
        if src.len() < len {
            reserve_toward(src, len);
            return Ok(None);
        }
        self.state = DecodeState::Head;
        let payload = src.split_to(len).freeze();
        Ok(Some(Response::parse(
            header.code,
            payload,
            &self.limits,
            self.dialect,
        )?))
    }
}

impl Encoder<RequestFrame> for ClientCodec {
    type Error = CodecError;

    fn encode(&mut self, item: RequestFrame, dst: &mut BytesMut) -> Result<(), CodecError> {
        self.encode(&item, dst)
    }
}

impl Encoder<&RequestFrame> for ClientCodec {
    type Error = CodecError;

    /// Refuses a request that the dialect cannot carry, writing nothing.
    fn encode(&mut self, item: &RequestFrame, dst: &mut BytesMut) -> Result<(), CodecError> {
        item.request
            .check_dialect(self.dialect)
            .map_err(CodecError::Encode)?;
        if self.dialect == Dialect::Secure && item.numbering == Numbering::Classic {
            return Err(CodecError::Encode(PayloadError::NotInDialect {
                code: item.header_in(self.dialect).code.0,
                dialect: self.dialect,
            }));
        }
        item.encode_in(self.dialect, dst);
        Ok(())
    }
}

/// Whether `code` is one a legacy response decoder knows.
pub fn is_known_response(code: ResponseCode) -> bool {
    Response::payload_bounds(code, &Limits::default(), Dialect::Legacy).is_some()
}
