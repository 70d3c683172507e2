//! `tokio_util::codec` decoders and encoders for both directions
//! (`docs/PROTOCOL.md` §1).
//!
//! The decoders follow the `Decoder` contract: too few bytes is `Ok(None)`;
//! anything malformed is an `Err`, after which the stream is corrupt and the
//! connection must end (a binary protocol cannot resynchronise). Every size a
//! peer declares is checked against [`Limits`] as soon as the header is parsed,
//! before any buffer grows; memory is reserved in steps as bytes arrive, never
//! by the size a peer declares.

use bytes::{Buf, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::limits::Limits;
use crate::message::{PayloadError, Request, RequestFrame, Response};
use crate::wire::{
    Dialect, Numbering, RequestCode, RequestHeader, ResponseCode, ResponseHeader,
    REQUEST_HEADER_LEN, RESPONSE_HEADER_LEN,
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
    /// A code unknown as read but known with its two bytes swapped: the
    /// peer writes its header big-endian (`docs/PROTOCOL.md` §9) and cannot
    /// interoperate.
    #[error("code {code} is {swapped} with its bytes swapped: the peer writes big-endian")]
    ByteSwapped { code: u16, swapped: u16 },
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

/// The largest payload a legacy 1604 may declare while carrying only its
/// 16-byte client id (one deployed server declares 255, the name field's
/// width, and sends 16). The bytes past the id are skipped only while they
/// are zeros, so nothing is ever buffered for the declared size.
pub const MAX_MISDECLARED_ACK: u32 = 1024;

/// How much to reserve at most in one step while a declared payload arrives.
const RESERVE_STEP: usize = 64 * 1024;

/// Makes room toward `needed` bytes in `src`: at most [`RESERVE_STEP`] more
/// at a time while less than half has arrived, then exactly the rest.
/// (`BytesMut::reserve` grows by doubling, so stepping up to a 1 MiB packet
/// would end in a 2 MiB buffer per connection; a buffer of exactly the
/// packet's size is made instead, copying the half that arrived, so a
/// peer that declares a size and stops never costs more than twice what
/// it sent.)
fn reserve_toward(src: &mut BytesMut, needed: usize) {
    let missing = needed.saturating_sub(src.len());
    if src.capacity() - src.len() >= missing {
        return;
    }
    if missing <= src.len() {
        let mut exact = BytesMut::with_capacity(needed);
        exact.extend_from_slice(src);
        *src = exact;
    } else {
        src.reserve(missing.min(RESERVE_STEP));
    }
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

    /// The header of the request whose payload is still arriving, if any:
    /// what a connection waiting for the rest of a request is waiting for.
    pub fn partial(&self) -> Option<&RequestHeader> {
        match &self.state {
            DecodeState::Head => None,
            DecodeState::Data(header) => Some(header),
        }
    }

    fn check_head(&self, header: &RequestHeader) -> Result<(), CodecError> {
        let swapped = header.code.0.swap_bytes();
        if header.code.classify().is_none() && RequestCode(swapped).classify().is_some() {
            return Err(CodecError::ByteSwapped {
                code: header.code.0,
                swapped,
            });
        }
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
    /// Zero bytes still to skip after a 1604 that declared more than its id.
    skip_zeros: u32,
    /// The size the last such 1604 declared, until taken.
    misdeclared_ack: Option<u32>,
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
            skip_zeros: 0,
            misdeclared_ack: None,
        }
    }

    /// The dialect this codec speaks.
    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// The payload size declared by the last 1604 decoded whose header
    /// declared more than the 16-byte client id it carried, if any since
    /// the last call: a deployed server's deviation (`docs/PROTOCOL.md`
    /// §9), decoded as the 1604 it is so that the session can check its id.
    pub fn take_misdeclared_ack(&mut self) -> Option<u32> {
        self.misdeclared_ack.take()
    }

    /// Legacy: a 1604 whose header declares a payload over its 16 bytes
    /// but within [`MAX_MISDECLARED_ACK`] is read as the 16-byte id it
    /// carries; the rest of the declared size is skipped while it is zeros.
    fn misdeclared_ack(&mut self, header: &mut ResponseHeader) -> bool {
        let id = 16;
        let lenient = self.dialect == Dialect::Legacy
            && header.code == ResponseCode::ACK
            && header.payload_len > id
            && header.payload_len <= MAX_MISDECLARED_ACK;
        if lenient {
            self.misdeclared_ack = Some(header.payload_len);
            self.skip_zeros = header.payload_len - id;
            header.payload_len = id;
        }
        lenient
    }

    /// Byte-swapped codes say the peer writes big-endian, whatever its
    /// version byte.
    fn check_swapped(&self, header: &ResponseHeader) -> Result<(), CodecError> {
        let known = |code| Response::payload_bounds(code, &self.limits, self.dialect).is_some();
        let swapped = header.code.0.swap_bytes();
        if !known(header.code) && known(ResponseCode(swapped)) {
            return Err(CodecError::ByteSwapped {
                code: header.code.0,
                swapped,
            });
        }
        Ok(())
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
        if matches!(self.state, DecodeState::Head) && self.skip_zeros > 0 {
            let zeros = src
                .iter()
                .take(self.skip_zeros as usize)
                .take_while(|&&b| b == 0)
                .count();
            src.advance(zeros);
            // A non-zero byte is the next response's version: stop skipping.
            self.skip_zeros = if src.is_empty() {
                self.skip_zeros.saturating_sub(zeros as u32)
            } else {
                0
            };
        }
        let header = match self.state {
            DecodeState::Head => {
                let Some(mut header) = ResponseHeader::parse(src) else {
                    src.reserve(RESPONSE_HEADER_LEN);
                    return Ok(None);
                };
                self.check_swapped(&header)?;
                if header.version != self.dialect.version() {
                    return Err(CodecError::Version {
                        got: header.version,
                        expected: self.dialect.version(),
                    });
                }
                let (min, max) = Response::payload_bounds(header.code, &self.limits, self.dialect)
                    .ok_or(CodecError::UnknownCode(header.code.0))?;
                let declared = header.payload_len as usize;
                if (declared < min || declared > max) && !self.misdeclared_ack(&mut header) {
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
        let content = self.encode_head(item, dst)?;
        dst.extend_from_slice(&content);
        Ok(())
    }
}

impl ClientCodec {
    /// The [`Encoder`] without the copy of a file packet's content: appends
    /// the request to `dst` up to that content and returns it (empty for
    /// every other request), to be written right after `dst`, as with a
    /// vectored write. The encoder is this followed by appending the
    /// returned bytes, so both write the same bytes.
    ///
    /// # Errors
    /// [`CodecError::Encode`] for a request that the dialect cannot carry;
    /// nothing is written then.
    pub fn encode_head(
        &mut self,
        item: &RequestFrame,
        dst: &mut BytesMut,
    ) -> Result<Bytes, CodecError> {
        item.request
            .check_dialect(self.dialect)
            .map_err(CodecError::Encode)?;
        if self.dialect == Dialect::Secure && item.numbering == Numbering::Classic {
            return Err(CodecError::Encode(PayloadError::NotInDialect {
                code: item.header_in(self.dialect).code.0,
                dialect: self.dialect,
            }));
        }
        Ok(item.encode_head_in(self.dialect, dst))
    }
}

/// Whether `bytes` begin as a legacy response header does: version 3 (or
/// 4, as one big-endian server writes) and a response code a legacy
/// decoder knows, in either byte order. What a legacy server answers to a
/// TLS ClientHello it cannot parse; a TLS server's first byte is a record
/// type (0x15 or 0x16), never these.
pub fn is_legacy_response_head(bytes: &[u8]) -> bool {
    let (Some(&version), Some(code)) = (bytes.first(), bytes.get(1..3)) else {
        return false;
    };
    let Ok(code) = <[u8; 2]>::try_from(code).map(u16::from_le_bytes) else {
        return false;
    };
    (version == crate::wire::VERSION || version == crate::wire::SECURE_VERSION)
        && [code, code.swap_bytes()]
            .into_iter()
            .any(|c| is_known_response(ResponseCode(c)))
}

/// Whether `code` is one a legacy response decoder knows.
pub fn is_known_response(code: ResponseCode) -> bool {
    Response::payload_bounds(code, &Limits::default(), Dialect::Legacy).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `needed` bytes the way `FramedRead` does (into spare room,
    /// 16 KiB per read), calling `reserve_toward` before each read;
    /// returns the capacity seen at each step and the bytes held then.
    fn grow(needed: usize) -> Vec<(usize, usize)> {
        let mut src = BytesMut::new();
        let mut seen = Vec::new();
        while src.len() < needed {
            reserve_toward(&mut src, needed);
            if src.capacity() == src.len() {
                src.reserve(1);
            }
            let room = (src.capacity() - src.len())
                .min(16 * 1024)
                .min(needed - src.len());
            src.extend_from_slice(&vec![7u8; room]);
            seen.push((src.capacity(), src.len()));
        }
        seen
    }

    #[test]
    fn a_packet_ends_in_a_buffer_of_its_own_size_not_double() {
        let needed = 1024 * 1024 + 290;
        let seen = grow(needed);
        let peak = seen.iter().map(|(cap, _)| *cap).max().unwrap();
        assert!(peak >= needed);
        assert!(
            peak < needed + RESERVE_STEP,
            "peak capacity {peak} for {needed} bytes"
        );
        // A peer that stops at any point holds at most about twice what
        // it sent.
        for (cap, len) in seen {
            assert!(
                cap <= 2 * len + 2 * RESERVE_STEP,
                "{cap} bytes held after {len} arrived"
            );
        }
    }

    #[test]
    fn encodes_a_packet_head_and_content_as_the_encoder_does() {
        use crate::message::{FilePacket, PacketHead};
        use crate::name::FileName;
        use crate::wire::ClientId;
        let request = |content: &'static [u8]| RequestFrame {
            client_id: ClientId([3; 16]),
            numbering: Numbering::Modern,
            request: Request::SendFile(FilePacket {
                head: PacketHead {
                    content_size: 32,
                    orig_size: 20,
                    packet: 1,
                    total: 1,
                    file: FileName::try_from("a.bin").unwrap(),
                },
                content: Bytes::from_static(content),
            }),
        };
        for dialect in [Dialect::Legacy, Dialect::Secure] {
            for frame in [
                request(&[7; 32]),
                RequestFrame {
                    request: Request::CrcOk {
                        file: FileName::try_from("a.bin").unwrap(),
                    },
                    ..request(&[])
                },
            ] {
                let mut codec = ClientCodec::with_dialect(Limits::default(), dialect);
                let mut whole = BytesMut::new();
                codec.encode(&frame, &mut whole).unwrap();
                let mut head = BytesMut::new();
                let content = codec.encode_head(&frame, &mut head).unwrap();
                let expected_content: &[u8] = match &frame.request {
                    Request::SendFile(p) => &p.content,
                    _ => &[],
                };
                assert_eq!(&content[..], expected_content);
                head.extend_from_slice(&content);
                assert_eq!(head, whole, "{dialect:?}");
            }
        }
    }

    /// Decodes `bytes` fed one byte at a time and all at once; both must
    /// agree. Returns the responses and whether decoding failed.
    fn decode_both_ways(dialect: Dialect, bytes: &[u8]) -> (Vec<Response>, bool) {
        let run = |step: usize| {
            let mut codec = ClientCodec::with_dialect(Limits::default(), dialect);
            let mut buf = BytesMut::new();
            let mut out = Vec::new();
            for chunk in bytes.chunks(step) {
                buf.extend_from_slice(chunk);
                loop {
                    match codec.decode(&mut buf) {
                        Ok(Some(r)) => {
                            let misdeclared = codec.take_misdeclared_ack();
                            out.push((r, misdeclared));
                        }
                        Ok(None) => break,
                        Err(_) => return (out, true),
                    }
                }
            }
            (out, false)
        };
        let (whole, whole_err) = run(bytes.len().max(1));
        let (split, split_err) = run(1);
        assert_eq!(whole, split);
        assert_eq!(whole_err, split_err);
        (whole.into_iter().map(|(r, _)| r).collect(), whole_err)
    }

    fn ack_bytes(declared: u32, id: u8) -> Vec<u8> {
        let mut b = vec![3, 0x44, 0x06];
        b.extend_from_slice(&declared.to_le_bytes());
        b.extend_from_slice(&[id; 16]);
        b
    }

    #[test]
    fn reads_a_legacy_1604_that_declares_more_than_its_id_as_the_id_it_carries() {
        use crate::wire::ClientId;
        let mut codec = ClientCodec::default();
        let mut buf = BytesMut::from(&ack_bytes(255, 9)[..]);
        assert_eq!(
            codec.decode(&mut buf).unwrap(),
            Some(Response::Ack {
                client_id: ClientId([9; 16])
            })
        );
        assert_eq!(codec.take_misdeclared_ack(), Some(255));
        assert_eq!(codec.take_misdeclared_ack(), None);

        // Only the id was sent (the deployed server), then the next answer.
        let mut only_id = ack_bytes(255, 9);
        only_id.extend_from_slice(&ack_bytes(16, 8));
        let (got, failed) = decode_both_ways(Dialect::Legacy, &only_id);
        assert!(!failed);
        assert_eq!(got.len(), 2);
        // The declared size was sent, as zeros: skipped.
        let mut zeros = ack_bytes(255, 9);
        zeros.extend_from_slice(&[0; 239]);
        zeros.extend_from_slice(&ack_bytes(16, 8));
        let (got, failed) = decode_both_ways(Dialect::Legacy, &zeros);
        assert!(!failed);
        assert_eq!(got.len(), 2);
        assert_eq!(
            got[1],
            Response::Ack {
                client_id: ClientId([8; 16])
            }
        );
        // Zeros past the declared size are not skipped.
        let mut over = ack_bytes(255, 9);
        over.extend_from_slice(&[0; 240]);
        over.extend_from_slice(&ack_bytes(16, 8));
        assert!(decode_both_ways(Dialect::Legacy, &over).1);
    }

    #[test]
    fn refuses_a_1604_over_the_misdeclared_bound_or_in_secure_mode() {
        let at = ack_bytes(MAX_MISDECLARED_ACK, 1);
        let (got, failed) = decode_both_ways(Dialect::Legacy, &at);
        assert_eq!((got.len(), failed), (1, false));
        let over = ack_bytes(MAX_MISDECLARED_ACK + 1, 1);
        let mut codec = ClientCodec::default();
        assert!(matches!(
            codec.decode(&mut BytesMut::from(&over[..])),
            Err(CodecError::PayloadSize { .. })
        ));
        let mut secure = ack_bytes(255, 1);
        secure[0] = crate::wire::SECURE_VERSION;
        let mut codec = ClientCodec::with_dialect(Limits::default(), Dialect::Secure);
        assert!(matches!(
            codec.decode(&mut BytesMut::from(&secure[..])),
            Err(CodecError::PayloadSize { .. })
        ));
    }

    #[test]
    fn names_a_byte_swapped_code_whatever_the_version_byte() {
        // 1607 written big-endian: 06 47, read little-endian as 18182.
        for version in [3u8, 4] {
            let mut codec = ClientCodec::default();
            let mut buf = BytesMut::from(&[version, 0x06, 0x47, 0, 0, 0, 0][..]);
            let err = codec.decode(&mut buf).unwrap_err();
            assert!(
                matches!(
                    err,
                    CodecError::ByteSwapped {
                        code: 18182,
                        swapped: 1607
                    }
                ),
                "{err}"
            );
        }
        // A request code too: 1025 big-endian.
        let mut raw = BytesMut::new();
        RequestHeader {
            client_id: crate::wire::ClientId([0; 16]),
            version: 3,
            code: RequestCode(1025u16.swap_bytes()),
            payload_len: 255,
        }
        .write(&mut raw);
        let err = ServerCodec::default().decode(&mut raw).unwrap_err();
        assert!(
            matches!(err, CodecError::ByteSwapped { swapped: 1025, .. }),
            "{err}"
        );
        // A plain unknown code stays unknown.
        let mut codec = ClientCodec::default();
        let mut buf = BytesMut::from(&[3, 0x01, 0x01, 0, 0, 0, 0][..]);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(CodecError::UnknownCode(257))
        ));
    }

    #[test]
    fn tells_a_legacy_response_head_from_a_tls_record() {
        assert!(is_legacy_response_head(&[3, 0x47, 0x06, 0, 0, 0, 0]));
        assert!(is_legacy_response_head(&[3, 0x06, 0x47]), "big-endian");
        assert!(is_legacy_response_head(&[4, 0x06, 0x40, 0, 0, 0, 16]));
        assert!(!is_legacy_response_head(&[3, 0x47]), "too short");
        assert!(!is_legacy_response_head(&[0x16, 0x03, 0x03, 0, 0x7a]));
        assert!(!is_legacy_response_head(&[0x15, 0x03, 0x03, 0, 2]));
        assert!(!is_legacy_response_head(&[3, 0x01, 0x01, 0, 0]));
    }
}
