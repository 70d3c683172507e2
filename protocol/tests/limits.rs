//! Every limit, at the limit and one over (`docs/PROTOCOL.md` §7).
//!
//! Sizes a peer declares must be refused from the header alone, before the
//! decoder reserves anything for them.

use bytes::{Bytes, BytesMut};
use protocol::codec::CodecError;
use protocol::crypto::pkcs7_len;
use protocol::limits::{FILE_PACKET_HEAD_LEN, MAX_PACKETS};
use protocol::message::{PayloadError, FILE_RECEIVED_LEN};
use protocol::name::{NameError, MAX_NAME_LEN, NAME_FIELD_LEN};
use protocol::reassembly::{Reassembler, ReassemblyError};
use protocol::retrieval::{ListEntry, RetrievalResponse, MAX_LIST_ENTRIES};
use protocol::session::client::{PlanError, UploadPlan};
use protocol::wire::{
    RequestCode, RequestHeader, RequestKind, ResponseCode, ResponseHeader, REQUEST_HEADER_LEN,
    RESPONSE_HEADER_LEN, VERSION,
};
use protocol::Dialect;
use protocol::{
    ClientCodec, ClientId, FileName, FilePacket, Limits, Numbering, PacketHead, Request,
    RequestFrame, Response, ServerCodec, UserName,
};
use tokio_util::codec::{Decoder, Encoder};

/// What a decoder may hold after refusing a header: the header itself and a
/// little slack, nothing sized by the declaration.
const SMALL: usize = 1024;

const KINDS: [RequestKind; 11] = [
    RequestKind::Register,
    RequestKind::PublicKey,
    RequestKind::Reconnect,
    RequestKind::SendFile,
    RequestKind::CrcOk,
    RequestKind::CrcRetry,
    RequestKind::CrcAbort,
    RequestKind::List,
    RequestKind::Restore,
    RequestKind::Delete,
    RequestKind::Prove,
];

fn file(name: &str) -> FileName {
    FileName::try_from(name).unwrap()
}

fn packet(content: usize, number: u16, total: u16) -> RequestFrame {
    RequestFrame {
        client_id: ClientId([1; 16]),
        numbering: Numbering::Modern,
        request: Request::SendFile(FilePacket {
            head: PacketHead {
                content_size: 0,
                orig_size: 0,
                packet: u32::from(number),
                total: u32::from(total),
                file: file("f.bin"),
            },
            content: Bytes::from(vec![0xa5; content]),
        }),
    }
}

fn encode(frame: &RequestFrame) -> BytesMut {
    let mut out = BytesMut::new();
    ClientCodec::default().encode(frame, &mut out).unwrap();
    out
}

fn encode_response(response: &Response) -> BytesMut {
    let mut out = BytesMut::new();
    ServerCodec::default().encode(response, &mut out).unwrap();
    out
}

fn request_header(code: RequestCode, payload_len: u32) -> BytesMut {
    let mut out = BytesMut::new();
    RequestHeader {
        client_id: ClientId([2; 16]),
        version: VERSION,
        code,
        payload_len,
    }
    .write(&mut out);
    out
}

fn response_header(code: ResponseCode, payload_len: u32) -> BytesMut {
    let mut out = BytesMut::new();
    ResponseHeader {
        version: VERSION,
        code,
        payload_len,
    }
    .write(&mut out);
    out
}

fn decode(limits: Limits, bytes: &[u8]) -> Result<Option<RequestFrame>, CodecError> {
    ServerCodec::new(limits).decode(&mut BytesMut::from(bytes))
}

fn decode_response(limits: Limits, bytes: &[u8]) -> Result<Option<Response>, CodecError> {
    ClientCodec::new(limits).decode(&mut BytesMut::from(bytes))
}

fn small_packets() -> Limits {
    Limits {
        max_packet_content: 4096,
        ..Limits::default()
    }
}

// ---- max packet content -----------------------------------------------------------

#[test]
fn accepts_a_packet_with_content_exactly_at_the_limit() {
    let limits = small_packets();
    let frame = packet(limits.max_packet_content, 1, 1);
    assert_eq!(decode(limits, &encode(&frame)).unwrap(), Some(frame));
}

#[test]
fn rejects_a_packet_one_byte_over_the_content_limit_from_its_header_alone() {
    let limits = small_packets();
    let bytes = encode(&packet(limits.max_packet_content + 1, 1, 1));
    let mut buf = BytesMut::from(&bytes[..REQUEST_HEADER_LEN]);
    let err = ServerCodec::new(limits).decode(&mut buf).unwrap_err();
    assert!(
        matches!(err, CodecError::PayloadSize { declared, .. } if declared as usize == FILE_PACKET_HEAD_LEN + 4097)
    );
    assert!(buf.capacity() <= SMALL);
}

#[test]
fn accepts_a_header_declaring_the_default_maximum_and_reserves_only_a_step() {
    let limits = Limits::default();
    let declared = limits.max_file_packet_payload();
    let mut buf = request_header(RequestCode::SEND_FILE, u32::try_from(declared).unwrap());
    let mut codec = ServerCodec::new(limits);
    assert!(codec.decode(&mut buf).unwrap().is_none());
    // Memory is reserved in steps as bytes arrive, not by the declaration.
    assert!(
        buf.capacity() < declared / 4,
        "reserved {} for a declared {declared}",
        buf.capacity()
    );
}

#[test]
fn rejects_a_header_declaring_one_byte_over_the_default_maximum() {
    let limits = Limits::default();
    let declared = limits.max_file_packet_payload() + 1;
    let mut buf = request_header(RequestCode::SEND_FILE, u32::try_from(declared).unwrap());
    assert!(matches!(
        ServerCodec::new(limits).decode(&mut buf),
        Err(CodecError::PayloadSize { .. })
    ));
    assert!(buf.capacity() <= SMALL);
}

// ---- declared sizes, refused before any reservation -------------------------------

#[test]
fn rejects_a_4_gib_declared_payload_of_every_request_from_the_header_alone() {
    for numbering in [Numbering::Modern, Numbering::Classic] {
        for kind in KINDS {
            let mut buf = request_header(RequestCode::of(kind, numbering), u32::MAX);
            assert_eq!(buf.len(), REQUEST_HEADER_LEN);
            let err = ServerCodec::default().decode(&mut buf).unwrap_err();
            assert!(
                matches!(
                    err,
                    CodecError::PayloadSize {
                        declared: u32::MAX,
                        ..
                    }
                ),
                "{kind:?}: {err}"
            );
            assert!(
                buf.capacity() <= SMALL,
                "{kind:?}: capacity {}",
                buf.capacity()
            );
        }
    }
}

#[test]
fn rejects_a_4_gib_declared_payload_of_every_response_from_the_header_alone() {
    for code in (1600..=1607).chain(1640..=1645).chain(1650..=1651) {
        let mut buf = response_header(ResponseCode(code), u32::MAX);
        assert_eq!(buf.len(), RESPONSE_HEADER_LEN);
        let err = ClientCodec::default().decode(&mut buf).unwrap_err();
        assert!(
            matches!(
                err,
                CodecError::PayloadSize {
                    declared: u32::MAX,
                    ..
                }
            ),
            "{code}: {err}"
        );
        assert!(
            buf.capacity() <= SMALL,
            "{code}: capacity {}",
            buf.capacity()
        );
    }
}

#[test]
fn accepts_fixed_size_requests_declaring_exactly_their_size() {
    for kind in KINDS {
        if kind == RequestKind::SendFile {
            continue;
        }
        let (min, max) =
            Request::payload_bounds(kind, &Limits::default(), Dialect::Legacy).unwrap();
        assert_eq!(min, max, "{kind:?} has a fixed size");
        let mut buf = request_header(
            RequestCode::of(kind, Numbering::Modern),
            u32::try_from(max).unwrap(),
        );
        assert!(
            ServerCodec::default().decode(&mut buf).unwrap().is_none(),
            "{kind:?}"
        );
    }
}

#[test]
fn rejects_fixed_size_requests_declaring_one_byte_more_or_less() {
    for kind in KINDS {
        let (min, max) =
            Request::payload_bounds(kind, &Limits::default(), Dialect::Legacy).unwrap();
        for declared in [min - 1, max + 1] {
            let mut buf = request_header(
                RequestCode::of(kind, Numbering::Classic),
                u32::try_from(declared).unwrap(),
            );
            assert!(
                matches!(
                    ServerCodec::default().decode(&mut buf),
                    Err(CodecError::PayloadSize { .. })
                ),
                "{kind:?} declaring {declared}"
            );
        }
    }
}

// ---- max file size ----------------------------------------------------------------

fn first_packet(orig: u64) -> FilePacket {
    FilePacket {
        head: PacketHead {
            content_size: pkcs7_len(orig),
            orig_size: orig,
            packet: 1,
            total: 2,
            file: file("big.bin"),
        },
        content: Bytes::from_static(&[0; 16]),
    }
}

#[test]
fn accepts_a_file_of_exactly_the_maximum_size() {
    for max in [1000, u64::from(u32::MAX) - 32] {
        let limits = Limits {
            max_file_size: max,
            ..Limits::default()
        };
        assert!(
            Reassembler::new(limits).push(first_packet(max)).is_ok(),
            "max {max}"
        );
    }
}

#[test]
fn rejects_a_file_one_byte_over_the_maximum_size() {
    for max in [1000, u64::from(u32::MAX) - 32] {
        let limits = Limits {
            max_file_size: max,
            ..Limits::default()
        };
        assert_eq!(
            Reassembler::new(limits).push(first_packet(max + 1)),
            Err(ReassemblyError::TooLarge { orig: max + 1, max }),
        );
    }
}

// ---- max name length --------------------------------------------------------------

fn names_limit() -> Limits {
    Limits {
        max_name_len: 100,
        ..Limits::default()
    }
}

/// Every request and response that carries a name, with a name of `len` bytes.
fn named_messages(len: usize) -> (Vec<RequestFrame>, Vec<Response>) {
    let user = UserName::new(vec![b'u'; len]).unwrap();
    let name = FileName::new(vec![b'f'; len]).unwrap();
    let id = ClientId([3; 16]);
    let frame = |request| RequestFrame {
        client_id: id,
        numbering: Numbering::Modern,
        request,
    };
    let mut packet = packet(16, 1, 1);
    if let Request::SendFile(p) = &mut packet.request {
        p.head.file = name.clone();
    }
    let requests = vec![
        frame(Request::Register { name: user.clone() }),
        frame(Request::Reconnect { name: user.clone() }),
        frame(Request::PublicKey {
            name: user,
            key: protocol::message::PublicKeyField([0; 160]),
        }),
        packet,
        frame(Request::CrcOk { file: name.clone() }),
        frame(Request::CrcRetry { file: name.clone() }),
        frame(Request::CrcAbort { file: name.clone() }),
    ];
    let responses = vec![Response::FileReceived {
        client_id: id,
        content_size: 16,
        file: name,
        cksum: 7,
    }];
    (requests, responses)
}

#[test]
fn accepts_names_of_exactly_the_configured_length() {
    let limits = names_limit();
    let (requests, responses) = named_messages(limits.max_name_len);
    for frame in requests {
        assert_eq!(decode(limits, &encode(&frame)).unwrap(), Some(frame));
    }
    for response in responses {
        assert_eq!(
            decode_response(limits, &encode_response(&response)).unwrap(),
            Some(response)
        );
    }
}

#[test]
fn rejects_names_one_byte_over_the_configured_length() {
    let limits = names_limit();
    let over = limits.max_name_len + 1;
    let too_long = |e| matches!(e, CodecError::Payload(PayloadError::Name(NameError::TooLong { len, max })) if len == over && max == 100);
    let (requests, responses) = named_messages(over);
    for frame in requests {
        let err = decode(limits, &encode(&frame)).unwrap_err();
        assert!(too_long(err), "{:?}", frame.request.kind());
    }
    for response in responses {
        assert!(too_long(
            decode_response(limits, &encode_response(&response)).unwrap_err()
        ));
    }
}

// ---- the 255-byte name field ------------------------------------------------------

#[test]
fn accepts_a_254_byte_name_that_fills_the_field_up_to_its_nul() {
    assert_eq!(MAX_NAME_LEN, NAME_FIELD_LEN - 1);
    let (requests, responses) = named_messages(MAX_NAME_LEN);
    for frame in requests {
        assert_eq!(
            decode(Limits::default(), &encode(&frame)).unwrap(),
            Some(frame)
        );
    }
    for response in responses {
        assert_eq!(
            decode_response(Limits::default(), &encode_response(&response)).unwrap(),
            Some(response)
        );
    }
}

#[test]
fn rejects_a_name_field_of_255_bytes_without_nul() {
    assert_eq!(
        UserName::new(vec![b'u'; NAME_FIELD_LEN]),
        Err(NameError::TooLong { len: 255, max: 254 })
    );
    assert_eq!(
        FileName::new(vec![b'f'; NAME_FIELD_LEN]),
        Err(NameError::TooLong { len: 255, max: 254 })
    );
    // On the wire: a register request whose name field has no terminator.
    let mut bytes = request_header(RequestCode::REGISTER, NAME_FIELD_LEN as u32);
    bytes.extend_from_slice(&[b'u'; NAME_FIELD_LEN]);
    let err = decode(Limits::default(), &bytes).unwrap_err();
    assert!(
        matches!(
            err,
            CodecError::Payload(PayloadError::Name(NameError::Unterminated))
        ),
        "{err}"
    );
    // And in a 1603 response.
    let mut bytes = response_header(ResponseCode::FILE_RECEIVED, FILE_RECEIVED_LEN as u32);
    bytes.extend_from_slice(&[0; 20]);
    bytes.extend_from_slice(&[b'f'; NAME_FIELD_LEN]);
    bytes.extend_from_slice(&[0; 4]);
    let err = decode_response(Limits::default(), &bytes).unwrap_err();
    assert!(
        matches!(
            err,
            CodecError::Payload(PayloadError::Name(NameError::Unterminated))
        ),
        "{err}"
    );
}

// ---- max wrapped key --------------------------------------------------------------

fn keys_limit() -> Limits {
    Limits {
        max_wrapped_key: 300,
        ..Limits::default()
    }
}

#[test]
fn accepts_a_wrapped_key_of_exactly_the_limit() {
    let limits = keys_limit();
    let wrapped_key = Bytes::from(vec![9; limits.max_wrapped_key]);
    for response in [
        Response::KeyAccepted {
            client_id: ClientId([4; 16]),
            wrapped_key: wrapped_key.clone(),
        },
        Response::Reconnected {
            client_id: ClientId([4; 16]),
            wrapped_key,
        },
    ] {
        assert_eq!(
            decode_response(limits, &encode_response(&response)).unwrap(),
            Some(response)
        );
    }
}

#[test]
fn rejects_a_wrapped_key_one_byte_over_the_limit_from_its_header_alone() {
    let limits = keys_limit();
    for code in [ResponseCode::KEY_ACCEPTED, ResponseCode::RECONNECTED] {
        let declared = u32::try_from(16 + limits.max_wrapped_key + 1).unwrap();
        let mut buf = response_header(code, declared);
        let err = ClientCodec::new(limits).decode(&mut buf).unwrap_err();
        assert!(
            matches!(err, CodecError::PayloadSize { .. }),
            "{code}: {err}"
        );
        assert!(buf.capacity() <= SMALL);
    }
}

// ---- the 65,535-packet count ------------------------------------------------------

#[test]
fn accepts_an_upload_of_exactly_65535_packets() {
    assert_eq!(MAX_PACKETS, u16::MAX);
    let content_size = u64::from(MAX_PACKETS) * 16;
    // The plaintext length whose PKCS#7 ciphertext is exactly that long.
    let orig = content_size - 1;
    assert_eq!(pkcs7_len(orig), content_size);
    let mut reassembler = Reassembler::new(Limits::default());
    let block = Bytes::from_static(&[0; 16]);
    let head = PacketHead {
        content_size,
        orig_size: orig,
        packet: 0,
        total: u32::from(MAX_PACKETS),
        file: file("many.bin"),
    };
    for number in 1..=MAX_PACKETS {
        let head = PacketHead {
            packet: u32::from(number),
            ..head.clone()
        };
        let slice = reassembler
            .push(FilePacket {
                head,
                content: block.clone(),
            })
            .unwrap();
        assert_eq!(slice.last, number == MAX_PACKETS);
    }
    // The last packet also crosses the wire.
    let frame = packet(16, MAX_PACKETS, MAX_PACKETS);
    assert_eq!(
        decode(Limits::default(), &encode(&frame)).unwrap(),
        Some(frame)
    );
}

#[test]
fn rejects_a_packet_number_one_over_the_total() {
    let frame = packet(16, MAX_PACKETS, MAX_PACKETS - 1);
    let err = decode(Limits::default(), &encode(&frame)).unwrap_err();
    assert!(
        matches!(err, CodecError::Payload(PayloadError::PacketNumber { .. })),
        "{err}"
    );
    // Packet 0 crosses the wire (clients that number from 0 send it; the
    // reassembler decides), a total of 0 does not.
    let frame = packet(16, 0, 1);
    assert_eq!(
        decode(Limits::default(), &encode(&frame)).unwrap(),
        Some(frame)
    );
    let frame = packet(16, 0, 0);
    assert!(
        matches!(
            decode(Limits::default(), &encode(&frame)),
            Err(CodecError::Payload(PayloadError::PacketNumber { .. }))
        ),
        "no packets at all"
    );
}

#[test]
fn plans_a_file_of_exactly_65535_packets() {
    let size = u64::from(MAX_PACKETS) * 16 - 1;
    let plan = UploadPlan::new(file("many.bin"), size, 16, 16).unwrap();
    assert_eq!(plan.total, u32::from(MAX_PACKETS));
}

#[test]
fn refuses_to_plan_a_file_needing_65536_packets() {
    let size = u64::from(MAX_PACKETS) * 16;
    assert_eq!(pkcs7_len(size), (u64::from(MAX_PACKETS) + 1) * 16);
    assert!(matches!(
        UploadPlan::new(file("many.bin"), size, 16, 16),
        Err(PlanError::TooLarge { .. })
    ));
}

// ---- retrieval: list page entries and restore data --------------------------------

fn list_page(entries: usize) -> Response {
    let entry = ListEntry {
        version: 1,
        size: 2,
        stored_at: 3,
        cksum: 4,
        file: file("listed.bin"),
    };
    Response::Retrieval(RetrievalResponse::ListPage {
        next_cursor: 0,
        entries: vec![entry; entries],
    })
}

#[test]
fn accepts_a_list_page_of_exactly_the_maximum_entries() {
    let page = list_page(MAX_LIST_ENTRIES);
    assert_eq!(
        decode_response(Limits::default(), &encode_response(&page)).unwrap(),
        Some(page)
    );
}

#[test]
fn rejects_a_list_page_one_entry_over_the_maximum_from_its_header_alone() {
    let bytes = encode_response(&list_page(MAX_LIST_ENTRIES + 1));
    let mut buf = BytesMut::from(&bytes[..RESPONSE_HEADER_LEN]);
    let err = ClientCodec::default().decode(&mut buf).unwrap_err();
    assert!(matches!(err, CodecError::PayloadSize { .. }), "{err}");
    assert!(buf.capacity() <= SMALL);
}

#[test]
fn accepts_restore_data_of_exactly_the_packet_content_limit() {
    let limits = small_packets();
    let data = Response::Retrieval(RetrievalResponse::RestoreData {
        content: Bytes::from(vec![1; limits.max_packet_content]),
    });
    assert_eq!(
        decode_response(limits, &encode_response(&data)).unwrap(),
        Some(data)
    );
}

#[test]
fn rejects_restore_data_one_byte_over_the_packet_content_limit_from_its_header_alone() {
    let limits = small_packets();
    let declared = u32::try_from(limits.max_packet_content + 1).unwrap();
    let mut buf = response_header(ResponseCode::RESTORE_DATA, declared);
    let err = ClientCodec::new(limits).decode(&mut buf).unwrap_err();
    assert!(matches!(err, CodecError::PayloadSize { .. }), "{err}");
    assert!(buf.capacity() <= SMALL);
}

// ---- passphrase login and key removal (secure mode, §13.6) -------------------------

/// The fixed sizes of the requests and responses of §13.6.
const PASSPHRASE_REQUESTS: [(u16, usize); 3] = [(1269, NAME_FIELD_LEN), (1270, 64), (1271, 1)];
const PASSPHRASE_RESPONSES: [(u16, usize); 4] = [(1672, 76), (1673, 1), (1674, 1), (1675, 2)];

fn secure_request_header(code: u16, payload_len: u32) -> BytesMut {
    let mut out = BytesMut::new();
    RequestHeader {
        client_id: ClientId([2; 16]),
        version: protocol::wire::SECURE_VERSION,
        code: RequestCode(code),
        payload_len,
    }
    .write(&mut out);
    out
}

fn secure_response_header(code: u16, payload_len: u32) -> BytesMut {
    let mut out = BytesMut::new();
    ResponseHeader {
        version: protocol::wire::SECURE_VERSION,
        code: ResponseCode(code),
        payload_len,
    }
    .write(&mut out);
    out
}

#[test]
fn accepts_passphrase_messages_declaring_exactly_their_size() {
    for (code, size) in PASSPHRASE_REQUESTS {
        let mut buf = secure_request_header(code, u32::try_from(size).unwrap());
        let mut codec = ServerCodec::with_dialect(Limits::default(), Dialect::Secure);
        assert!(codec.decode(&mut buf).unwrap().is_none(), "{code}");
    }
    for (code, size) in PASSPHRASE_RESPONSES {
        let mut buf = secure_response_header(code, u32::try_from(size).unwrap());
        let mut codec = ClientCodec::with_dialect(Limits::default(), Dialect::Secure);
        assert!(codec.decode(&mut buf).unwrap().is_none(), "{code}");
    }
}

#[test]
fn rejects_passphrase_messages_one_byte_over_or_under_from_their_header_alone() {
    for (code, size) in PASSPHRASE_REQUESTS {
        for declared in [size - 1, size + 1, u32::MAX as usize] {
            let mut buf = secure_request_header(code, u32::try_from(declared).unwrap());
            let mut codec = ServerCodec::with_dialect(Limits::default(), Dialect::Secure);
            assert!(
                matches!(codec.decode(&mut buf), Err(CodecError::PayloadSize { .. })),
                "{code} declaring {declared}"
            );
            assert!(buf.capacity() <= SMALL);
        }
    }
    for (code, size) in PASSPHRASE_RESPONSES {
        for declared in [size - 1, size + 1, u32::MAX as usize] {
            let mut buf = secure_response_header(code, u32::try_from(declared).unwrap());
            let mut codec = ClientCodec::with_dialect(Limits::default(), Dialect::Secure);
            assert!(
                matches!(codec.decode(&mut buf), Err(CodecError::PayloadSize { .. })),
                "{code} declaring {declared}"
            );
            assert!(buf.capacity() <= SMALL);
        }
    }
}

#[test]
fn rejects_a_key_removal_of_slot_8() {
    let mut buf = secure_request_header(1271, 1);
    buf.extend_from_slice(&[8]);
    let mut codec = ServerCodec::with_dialect(Limits::default(), Dialect::Secure);
    assert!(codec.decode(&mut buf).is_err());
    let mut buf = secure_request_header(1271, 1);
    buf.extend_from_slice(&[7]);
    let mut codec = ServerCodec::with_dialect(Limits::default(), Dialect::Secure);
    assert!(codec.decode(&mut buf).unwrap().is_some());
}
