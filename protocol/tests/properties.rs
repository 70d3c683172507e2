//! Property tests of the codecs, the reassembler and the crypto pipeline.
//!
//! Failures are persisted to `proptest-regressions/properties.txt` at the
//! repository root, so that a committed regression replays first on every
//! run.

use aes::cipher::{block_padding::Pkcs7, BlockDecryptMut, BlockEncryptMut, KeyIvInit};
use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use protocol::crypto::{self, AesKey, CbcDecryptor, CbcEncryptor};
use protocol::message::{PublicKeyField, FILE_RECEIVED_LEN, PUBLIC_KEY_FIELD_LEN};
use protocol::reassembly::{Leniency, Reassembler, ReassemblyError};
use protocol::repo::envelope::PassphraseCost;
use protocol::repo::message::{
    CommitRefusal, ForgetRefusal, KeptReason, KeySlot, ObjectId, PackEntry, PassphraseRefusal,
    RepoRequest, RepoResponse, SnapshotEntry,
};
use protocol::retrieval::{
    ListEntry, ListFlags, RefusalReason, RestoreBegin, RetrievalRequest, RetrievalResponse,
    LIST_ENTRY_LEN, LIST_PAGE_HEAD_LEN, MAX_LIST_ENTRIES,
};
use protocol::wire::{RequestCode, RequestKind, REQUEST_HEADER_LEN, RESPONSE_HEADER_LEN, VERSION};
use protocol::{
    Cksum, ClientCodec, ClientId, Dialect, FileName, FilePacket, Limits, Numbering, PacketHead,
    Request, RequestFrame, Response, ServerCodec, UserName,
};
use tokio_util::codec::{Decoder, Encoder};

/// Where failing cases are recorded: the repository's `proptest-regressions/`.
const REGRESSIONS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../proptest-regressions/properties.txt"
);

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(REGRESSIONS))),
        ..ProptestConfig::default()
    }
}

// ---- strategies -------------------------------------------------------------------

/// Bytes allowed in a name: anything but NUL, control characters and DEL.
fn name_bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(prop_oneof![0x20u8..0x7f, 0x80u8..=0xff], 1..=max)
}

fn user_name() -> impl Strategy<Value = UserName> {
    name_bytes(254).prop_map(|b| UserName::new(b).unwrap())
}

fn file_name() -> impl Strategy<Value = FileName> {
    name_bytes(254).prop_map(|b| FileName::new(b).unwrap())
}

fn client_id() -> impl Strategy<Value = ClientId> {
    any::<[u8; 16]>().prop_map(ClientId)
}

fn numbering() -> impl Strategy<Value = Numbering> {
    prop_oneof![Just(Numbering::Modern), Just(Numbering::Classic)]
}

fn public_key_field() -> impl Strategy<Value = PublicKeyField> {
    proptest::collection::vec(any::<u8>(), PUBLIC_KEY_FIELD_LEN)
        .prop_map(|v| PublicKeyField(v.try_into().unwrap()))
}

fn file_packet(max_content: usize) -> impl Strategy<Value = FilePacket> {
    (
        any::<u32>(),
        any::<u32>(),
        1..=u16::MAX,
        any::<u16>(),
        file_name(),
        proptest::collection::vec(any::<u8>(), 0..=max_content),
    )
        .prop_map(
            |(content_size, orig_size, total, packet, file, content)| FilePacket {
                head: PacketHead {
                    content_size: u64::from(content_size),
                    orig_size: u64::from(orig_size),
                    packet: u32::from(packet % total + 1),
                    total: u32::from(total),
                    file,
                },
                content: Bytes::from(content),
            },
        )
}

fn request(max_content: usize) -> impl Strategy<Value = Request> {
    prop_oneof![
        user_name().prop_map(|name| Request::Register { name }),
        (user_name(), public_key_field()).prop_map(|(name, key)| Request::PublicKey { name, key }),
        user_name().prop_map(|name| Request::Reconnect { name }),
        file_packet(max_content).prop_map(Request::SendFile),
        file_name().prop_map(|file| Request::CrcOk { file }),
        file_name().prop_map(|file| Request::CrcRetry { file }),
        file_name().prop_map(|file| Request::CrcAbort { file }),
        retrieval_request().prop_map(Request::Retrieval),
        // The proof before retrieval on the legacy listener (§11.5).
        any::<[u8; 32]>().prop_map(|proof| Request::Prove { proof }),
    ]
}

fn retrieval_request() -> impl Strategy<Value = RetrievalRequest> {
    prop_oneof![
        (any::<u8>(), any::<u64>()).prop_map(|(flags, cursor)| RetrievalRequest::List {
            flags: ListFlags(flags),
            cursor
        }),
        (any::<u64>(), file_name())
            .prop_map(|(version, file)| RetrievalRequest::Restore { version, file }),
        file_name().prop_map(|file| RetrievalRequest::Delete { file }),
    ]
}

fn request_frame(max_content: usize) -> impl Strategy<Value = RequestFrame> {
    (client_id(), numbering(), request(max_content)).prop_map(|(client_id, numbering, request)| {
        // The retrieval extension and the proof have one numbering, which
        // decodes as modern.
        let numbering = match request {
            Request::Retrieval(_) | Request::Prove { .. } => Numbering::Modern,
            _ => numbering,
        };
        RequestFrame {
            client_id,
            numbering,
            request,
        }
    })
}

fn list_entry() -> impl Strategy<Value = ListEntry> {
    (
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        any::<u32>(),
        file_name(),
    )
        .prop_map(|(version, size, stored_at, cksum, file)| ListEntry {
            version,
            size,
            stored_at,
            cksum,
            file,
        })
}

fn retrieval_response() -> impl Strategy<Value = RetrievalResponse> {
    prop_oneof![
        (any::<u64>(), proptest::collection::vec(list_entry(), 0..4)).prop_map(
            |(next_cursor, entries)| RetrievalResponse::ListPage {
                next_cursor,
                entries
            }
        ),
        (
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<u32>(),
            any::<[u8; 16]>(),
            file_name()
        )
            .prop_map(|(version, size, content_size, cksum, iv, file)| {
                RetrievalResponse::RestoreBegin(RestoreBegin {
                    version,
                    size,
                    content_size,
                    cksum,
                    iv,
                    file,
                })
            }),
        proptest::collection::vec(any::<u8>(), 1..1500).prop_map(|c| {
            RetrievalResponse::RestoreData {
                content: Bytes::from(c),
            }
        }),
        any::<u32>().prop_map(|versions| RetrievalResponse::Deleted { versions }),
        Just(RetrievalResponse::NotFound),
        any::<u8>().prop_map(|r| RetrievalResponse::Refused {
            reason: RefusalReason(r)
        }),
    ]
}

fn response() -> impl Strategy<Value = Response> {
    let wrapped = proptest::collection::vec(any::<u8>(), 1..=Limits::default().max_wrapped_key)
        .prop_map(Bytes::from);
    prop_oneof![
        client_id().prop_map(|client_id| Response::Registered { client_id }),
        Just(Response::RegistrationFailed),
        (client_id(), wrapped.clone()).prop_map(|(client_id, wrapped_key)| Response::KeyAccepted {
            client_id,
            wrapped_key
        }),
        (client_id(), any::<u32>(), file_name(), any::<u32>()).prop_map(
            |(client_id, content_size, file, cksum)| {
                Response::FileReceived {
                    client_id,
                    content_size: u64::from(content_size),
                    file,
                    cksum,
                }
            }
        ),
        client_id().prop_map(|client_id| Response::Ack { client_id }),
        (client_id(), wrapped).prop_map(|(client_id, wrapped_key)| Response::Reconnected {
            client_id,
            wrapped_key
        }),
        proptest::option::of(client_id())
            .prop_map(|client_id| Response::ReconnectRejected { client_id }),
        Just(Response::GeneralError),
        retrieval_response().prop_map(Response::Retrieval),
        client_id().prop_map(|client_id| Response::Authenticated { client_id }),
        Just(Response::NotAuthenticated),
    ]
}

/// Requests of secure mode (version 4): its own registration and proof,
/// wide packet heads, and the requests it shares with version 3.
fn secure_request(max_content: usize) -> impl Strategy<Value = RequestFrame> {
    let wide_packet = (
        any::<u64>(),
        any::<u64>(),
        1..=u32::MAX,
        any::<u32>(),
        file_name(),
        proptest::collection::vec(any::<u8>(), 0..=max_content),
    )
        .prop_map(|(content_size, orig_size, total, packet, file, content)| {
            Request::SendFile(FilePacket {
                head: PacketHead {
                    content_size,
                    orig_size,
                    packet: packet % total + 1,
                    total,
                    file,
                },
                content: Bytes::from(content),
            })
        });
    let request = prop_oneof![
        (
            user_name(),
            proptest::collection::vec(any::<u8>(), 1..=protocol::secure::MAX_PUBLIC_KEY_DER)
        )
            .prop_map(|(name, key)| Request::RegisterKey {
                name,
                key: Bytes::from(key)
            }),
        any::<[u8; 32]>().prop_map(|proof| Request::Prove { proof }),
        user_name().prop_map(|name| Request::Reconnect { name }),
        wide_packet,
        file_name().prop_map(|file| Request::CrcOk { file }),
        retrieval_request().prop_map(Request::Retrieval),
        repo_request().prop_map(Request::Repo),
    ];
    (client_id(), request).prop_map(|(client_id, request)| RequestFrame {
        client_id,
        numbering: Numbering::Modern,
        request,
    })
}

fn object_id() -> impl Strategy<Value = ObjectId> {
    any::<[u8; 32]>().prop_map(ObjectId)
}

fn object_ids() -> impl Strategy<Value = Vec<ObjectId>> {
    proptest::collection::vec(object_id(), 1..40)
}

fn some_bytes(max: usize) -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 1..=max).prop_map(Bytes::from)
}

/// Requests of the repository extension (`docs/PROTOCOL.md` §13).
fn repo_request() -> impl Strategy<Value = RepoRequest> {
    prop_oneof![
        object_ids().prop_map(|ids| RepoRequest::Have { ids }),
        some_bytes(1500).prop_map(|content| RepoRequest::PackData { content }),
        proptest::collection::vec((object_id(), any::<u32>()), 1..20).prop_map(|e| {
            RepoRequest::PackEnd {
                entries: e
                    .into_iter()
                    .map(|(id, len)| PackEntry { id, len })
                    .collect(),
            }
        }),
        object_ids().prop_map(|ids| RepoRequest::SnapshotRefs { ids }),
        (any::<u64>(), some_bytes(600))
            .prop_map(|(time, meta)| RepoRequest::SnapshotCommit { time, meta }),
        any::<u64>().prop_map(|cursor| RepoRequest::Snapshots { cursor }),
        object_ids().prop_map(|ids| RepoRequest::Fetch { ids }),
        (0u8..8, some_bytes(600))
            .prop_map(|(slot, envelope)| RepoRequest::PutKey { slot, envelope }),
        Just(RepoRequest::GetKeys),
        user_name().prop_map(|name| RepoRequest::PassphraseLogin { name }),
        proptest::collection::vec(any::<u8>(), 64).prop_map(|s| RepoRequest::PassphraseProve {
            signature: s.try_into().unwrap_or([0; 64])
        }),
        (0u8..8).prop_map(|slot| RepoRequest::DeleteKey { slot }),
        proptest::collection::vec(any::<u64>(), 1..40).prop_map(|ids| RepoRequest::Forget { ids }),
    ]
}

/// Responses of the repository extension.
fn repo_response() -> impl Strategy<Value = RepoResponse> {
    prop_oneof![
        proptest::collection::vec(any::<bool>(), 1..100)
            .prop_map(|have| RepoResponse::HaveAnswer { have }),
        any::<u32>().prop_map(|added| RepoResponse::PackStored { added }),
        any::<u32>().prop_map(|missing| RepoResponse::RefsStaged { missing }),
        any::<u64>().prop_map(|id| RepoResponse::SnapshotCommitted { id }),
        (any::<u8>(), any::<u32>()).prop_map(|(r, missing)| RepoResponse::SnapshotRefused {
            reason: CommitRefusal(r),
            missing
        }),
        (
            any::<u64>(),
            proptest::collection::vec((any::<u64>(), any::<u64>(), some_bytes(300)), 0..5)
        )
            .prop_map(|(next_cursor, e)| RepoResponse::SnapshotPage {
                next_cursor,
                entries: e
                    .into_iter()
                    .map(|(id, time, meta)| SnapshotEntry { id, time, meta })
                    .collect(),
            }),
        (object_id(), 1..=protocol::repo::message::MAX_OBJECT_BYTES)
            .prop_map(|(id, len)| RepoResponse::ObjectBegin { id, len }),
        object_id().prop_map(|id| RepoResponse::ObjectMissing { id }),
        some_bytes(1500).prop_map(|content| RepoResponse::ObjectData { content }),
        proptest::collection::vec((0u8..8, some_bytes(300)), 0..4).prop_map(|s| {
            RepoResponse::Keys {
                slots: s
                    .into_iter()
                    .map(|(slot, envelope)| KeySlot { slot, envelope })
                    .collect(),
            }
        }),
        any::<u8>().prop_map(|slot| RepoResponse::KeyStored { slot }),
        any::<u8>().prop_map(|slot| RepoResponse::KeyExists { slot }),
        (
            client_id(),
            any::<(u32, u32, u32)>(),
            any::<[u8; 16]>(),
            any::<[u8; 32]>()
        )
            .prop_map(|(client_id, (m_kib, t, p), salt, challenge)| {
                RepoResponse::PassphraseChallenge {
                    client_id,
                    cost: PassphraseCost { m_kib, t, p },
                    salt,
                    challenge,
                }
            }),
        any::<u8>().prop_map(|r| RepoResponse::PassphraseRefused {
            reason: PassphraseRefusal(r)
        }),
        any::<u8>().prop_map(|slot| RepoResponse::KeyDeleted { slot }),
        (any::<u8>(), any::<u8>()).prop_map(|(slot, r)| RepoResponse::KeyKept {
            slot,
            reason: KeptReason(r)
        }),
        any::<u32>().prop_map(|count| RepoResponse::Forgotten { count }),
        any::<u8>().prop_map(|r| RepoResponse::ForgetRefused {
            reason: ForgetRefusal(r)
        }),
        any::<(u64, u64, u64)>().prop_map(|(stored, quota, size)| RepoResponse::QuotaExceeded {
            stored,
            quota,
            size
        }),
    ]
}

/// Responses of secure mode, with 64-bit sizes in 1603.
fn secure_response() -> impl Strategy<Value = Response> {
    prop_oneof![
        (client_id(), any::<u64>(), file_name(), any::<u32>()).prop_map(
            |(client_id, content_size, file, cksum)| Response::FileReceived {
                client_id,
                content_size,
                file,
                cksum,
            }
        ),
        response(),
        repo_response().prop_map(Response::Repo),
    ]
    .prop_filter("registration answers differ in version 4", |r| {
        !matches!(r, Response::Registered { .. })
    })
}

/// Read sizes to cut a byte stream into (cycled when they run out).
fn read_sizes() -> impl Strategy<Value = Vec<usize>> {
    proptest::collection::vec(1usize..=MAX_READ, 1..=16)
}

/// The largest read the split properties make.
const MAX_READ: usize = 600;

// ---- helpers ----------------------------------------------------------------------

fn encode_requests(frames: &[RequestFrame]) -> BytesMut {
    let mut out = BytesMut::new();
    let mut codec = ClientCodec::default();
    for f in frames {
        codec.encode(f, &mut out).unwrap();
    }
    out
}

fn encode_responses(responses: &[Response]) -> BytesMut {
    let mut out = BytesMut::new();
    let mut codec = ServerCodec::default();
    for r in responses {
        codec.encode(r, &mut out).unwrap();
    }
    out
}

/// Feeds `bytes` to `codec` in reads of the given sizes (cycled), decoding
/// after every read until the decoder asks for more.
fn decode_in_reads<D: Decoder>(
    mut codec: D,
    bytes: &[u8],
    sizes: &[usize],
) -> Result<(Vec<D::Item>, BytesMut), D::Error> {
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut rest = bytes;
    for &size in sizes.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (chunk, tail) = rest.split_at(size.min(rest.len()));
        rest = tail;
        buf.extend_from_slice(chunk);
        while let Some(item) = codec.decode(&mut buf)? {
            out.push(item);
        }
    }
    Ok((out, buf))
}

/// Cuts `data` into consecutive pieces of the given sizes (cycled).
fn cut<'a>(data: &'a [u8], sizes: &[usize]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    for &size in sizes.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (piece, tail) = rest.split_at(size.min(rest.len()));
        out.push(piece);
        rest = tail;
    }
    out
}

fn aes_key() -> impl Strategy<Value = AesKey> {
    any::<[u8; 32]>().prop_map(AesKey::from_bytes)
}

/// The packets of one honest upload of `plain` under `key`, cut into
/// ciphertext slices of the given sizes.
fn packets(key: &AesKey, plain: &[u8], sizes: &[usize]) -> Vec<FilePacket> {
    let ct = crypto::encrypt_all(key, plain).freeze();
    let pieces = cut(&ct, sizes);
    let total = u16::try_from(pieces.len()).unwrap();
    let file = FileName::try_from("upload.bin").unwrap();
    let mut at = 0;
    pieces
        .iter()
        .enumerate()
        .map(|(i, piece)| {
            let content = ct.slice(at..at + piece.len());
            at += piece.len();
            FilePacket {
                head: PacketHead {
                    content_size: ct.len() as u64,
                    orig_size: plain.len() as u64,
                    packet: u32::try_from(i + 1).unwrap(),
                    total: u32::from(total),
                    file: file.clone(),
                },
                content,
            }
        })
        .collect()
}

/// What pushing `packets` through a reassembler, the decryptor and the cksum
/// gives: `Ok(Some((plaintext, cksum)))` when the upload completed and
/// unpadded, `Ok(None)` when it never completed, `Err` on a refused packet.
fn receive(
    limits: Limits,
    key: &AesKey,
    packets: Vec<FilePacket>,
) -> Result<Option<(Vec<u8>, u32)>, ReassemblyError> {
    receive_with(Leniency::STRICT, limits, key, packets)
}

/// As [`receive`], absorbing the deviations `leniency` allows.
fn receive_with(
    leniency: Leniency,
    limits: Limits,
    key: &AesKey,
    packets: Vec<FilePacket>,
) -> Result<Option<(Vec<u8>, u32)>, ReassemblyError> {
    let mut reassembler = Reassembler::lenient(limits, leniency);
    let mut decryptor = Some(CbcDecryptor::new(key));
    let mut cksum = Some(Cksum::new());
    let mut plain = BytesMut::new();
    let mut done = None;
    for packet in packets {
        // A packet after the last one starts a new upload, and is checked as such.
        let slice = reassembler.push(packet)?;
        let (Some(d), Some(c)) = (decryptor.as_mut(), cksum.as_mut()) else {
            continue;
        };
        let before = plain.len();
        d.update(&slice.content, &mut plain);
        if slice.last {
            decryptor
                .take()
                .unwrap()
                .finish(&mut plain)
                .expect("an honest upload unpads");
        }
        c.update(&plain[before..]);
        if slice.last {
            done = Some((plain.to_vec(), cksum.take().unwrap().finish()));
        }
    }
    Ok(done)
}

/// Numbers `packets` from 0 (first 0, last total-1), as some deployed
/// clients do.
fn renumber_from_zero(packets: &mut [FilePacket]) {
    for p in packets {
        p.head.packet -= 1;
    }
}

/// Pads the last of `packets` with zeros up to a multiple of `chunk` bytes
/// (at least one byte), as clients with a fixed chunk size do.
fn pad_last_with_zeros(packets: &mut [FilePacket], chunk: usize) {
    if let Some(last) = packets.last_mut() {
        let len = last.content.len();
        let padded = (len / chunk + 1) * chunk;
        let mut content = last.content.to_vec();
        content.resize(padded, 0);
        last.content = Bytes::from(content);
    }
}

/// A small independent POSIX cksum, bit by bit.
fn reference_cksum(bytes: &[u8]) -> u32 {
    fn step(mut s: u32, b: u8) -> u32 {
        s ^= u32::from(b) << 24;
        for _ in 0..8 {
            s = if s & 0x8000_0000 != 0 {
                (s << 1) ^ 0x04C1_1DB7
            } else {
                s << 1
            };
        }
        s
    }
    let mut s = bytes.iter().fold(0, |s, &b| step(s, b));
    let mut n = bytes.len() as u64;
    while n != 0 {
        s = step(s, (n & 0xff) as u8);
        n >>= 8;
    }
    !s
}

type Aes256CbcEnc = cbc::Encryptor<aes::Aes256>;
type Aes256CbcDec = cbc::Decryptor<aes::Aes256>;

/// Small limits for the allocation properties.
fn small_limits() -> Limits {
    Limits {
        max_packet_content: 1024,
        max_file_size: 1 << 20,
        max_name_len: 254,
        max_wrapped_key: 256,
    }
}

/// A stream segment for the hostile-bytes properties: raw bytes; a header
/// with a chosen code and an arbitrary declared size (often huge, often
/// within the limits) followed by bytes; or a valid encoded message, so that
/// the decoder gets deep into a stream as often as not.
fn hostile_segment(
    header_len: usize,
    codes: Vec<u16>,
    valid: BoxedStrategy<Vec<u8>>,
) -> impl Strategy<Value = Vec<u8>> {
    let header = (
        any::<[u8; 16]>(),
        proptest::sample::select(codes),
        prop_oneof![any::<u32>(), 0u32..1400],
        proptest::collection::vec(any::<u8>(), 0..1500),
    )
        .prop_map(move |(id, code, declared, body)| {
            let mut out = Vec::new();
            if header_len == REQUEST_HEADER_LEN {
                out.extend_from_slice(&id);
            }
            out.push(VERSION);
            out.extend_from_slice(&code.to_le_bytes());
            out.extend_from_slice(&declared.to_le_bytes());
            out.extend_from_slice(&body);
            out
        });
    prop_oneof![
        1 => proptest::collection::vec(any::<u8>(), 0..64),
        3 => header,
        3 => valid,
    ]
}

fn valid_requests() -> BoxedStrategy<Vec<u8>> {
    request_frame(1024)
        .prop_map(|f| encode_requests(&[f]).to_vec())
        .boxed()
}

fn valid_responses() -> BoxedStrategy<Vec<u8>> {
    response()
        .prop_map(|r| encode_responses(&[r]).to_vec())
        .boxed()
}

/// Decodes `bytes` as a socket reader would deliver them: each read fills
/// at most the buffer's spare room (reserving a little when it is full, as
/// `FramedRead` does) and the decoder then runs until it wants more or
/// fails. Returns the largest capacity the buffer reached.
fn max_capacity_while_decoding<D: Decoder>(mut codec: D, bytes: &[u8], sizes: &[usize]) -> usize {
    let mut buf = BytesMut::new();
    let mut rest = bytes;
    let mut max = 0;
    for &size in sizes.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        if buf.len() == buf.capacity() {
            buf.reserve(64);
        }
        let n = size.min(buf.capacity() - buf.len()).min(rest.len());
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        buf.extend_from_slice(chunk);
        max = max.max(buf.capacity());
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(_)) => max = max.max(buf.capacity()),
                Ok(None) => break,
                Err(_) => return max.max(buf.capacity()),
            }
        }
        max = max.max(buf.capacity());
    }
    max
}

// ---- properties -------------------------------------------------------------------

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn round_trips_requests_under_any_split(
        frames in proptest::collection::vec(request_frame(1500), 1..6),
        sizes in read_sizes(),
    ) {
        let bytes = encode_requests(&frames);
        let (decoded, rest) = decode_in_reads(ServerCodec::default(), &bytes, &sizes).unwrap();
        prop_assert_eq!(decoded, frames);
        prop_assert!(rest.is_empty());
    }

    #[test]
    fn round_trips_responses_under_any_split(
        responses in proptest::collection::vec(response(), 1..8),
        sizes in read_sizes(),
    ) {
        let bytes = encode_responses(&responses);
        let (decoded, rest) = decode_in_reads(ClientCodec::default(), &bytes, &sizes).unwrap();
        prop_assert_eq!(decoded, responses);
        prop_assert!(rest.is_empty());
    }

    #[test]
    fn round_trips_secure_requests_under_any_split(
        frames in proptest::collection::vec(secure_request(1500), 1..6),
        sizes in read_sizes(),
    ) {
        let limits = Limits::default().for_dialect(Dialect::Secure);
        let mut bytes = BytesMut::new();
        let mut codec = ClientCodec::with_dialect(limits, Dialect::Secure);
        for f in &frames {
            codec.encode(f, &mut bytes).unwrap();
        }
        prop_assert_eq!(bytes[16], protocol::SECURE_VERSION, "version 4 in the header");
        let server = ServerCodec::with_dialect(limits, Dialect::Secure);
        let (decoded, rest) = decode_in_reads(server, &bytes, &sizes).unwrap();
        prop_assert_eq!(decoded, frames);
        prop_assert!(rest.is_empty());
        // A legacy decoder refuses the same bytes at the first header.
        let legacy = decode_in_reads(ServerCodec::default(), &bytes, &sizes);
        prop_assert!(legacy.is_err());
    }

    #[test]
    fn round_trips_secure_responses_under_any_split(
        responses in proptest::collection::vec(secure_response(), 1..8),
        sizes in read_sizes(),
    ) {
        let limits = Limits::default().for_dialect(Dialect::Secure);
        let mut bytes = BytesMut::new();
        let mut codec = ServerCodec::with_dialect(limits, Dialect::Secure);
        for r in &responses {
            codec.encode(r, &mut bytes).unwrap();
        }
        let client = ClientCodec::with_dialect(limits, Dialect::Secure);
        let (decoded, rest) = decode_in_reads(client, &bytes, &sizes).unwrap();
        prop_assert_eq!(decoded, responses);
        prop_assert!(rest.is_empty());
    }

    #[test]
    fn legacy_encoders_refuse_what_the_legacy_fields_cannot_carry(
        size in (u64::from(u32::MAX) + 1)..=u64::MAX,
    ) {
        let frame = RequestFrame {
            client_id: ClientId([1; 16]),
            numbering: Numbering::Modern,
            request: Request::SendFile(FilePacket {
                head: PacketHead {
                    content_size: size,
                    orig_size: 1,
                    packet: 1,
                    total: 1,
                    file: FileName::try_from("f").unwrap(),
                },
                content: Bytes::new(),
            }),
        };
        let mut out = BytesMut::new();
        prop_assert!(ClientCodec::default().encode(&frame, &mut out).is_err());
        prop_assert!(out.is_empty(), "nothing written");
        let response = Response::FileReceived {
            client_id: ClientId([1; 16]),
            content_size: size,
            file: FileName::try_from("f").unwrap(),
            cksum: 0,
        };
        prop_assert!(ServerCodec::default().encode(&response, &mut out).is_err());
        prop_assert!(out.is_empty(), "nothing written");
    }

    #[test]
    fn encodes_requests_with_the_code_of_their_numbering(frame in request_frame(64)) {
        let bytes = encode_requests(std::slice::from_ref(&frame));
        let code = RequestCode(u16::from_le_bytes([bytes[17], bytes[18]]));
        prop_assert_eq!(code.classify(), Some((frame.request.kind(), frame.numbering)));
        let declared = u32::from_le_bytes(bytes[19..23].try_into().unwrap()) as usize;
        prop_assert_eq!(declared, bytes.len() - REQUEST_HEADER_LEN);
    }
}

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn every_strict_prefix_of_a_request_decodes_to_none(frame in request_frame(200)) {
        let bytes = encode_requests(std::slice::from_ref(&frame));
        for len in 0..bytes.len() {
            let mut buf = BytesMut::from(&bytes[..len]);
            let mut codec = ServerCodec::default();
            prop_assert!(matches!(codec.decode(&mut buf), Ok(None)), "prefix of {} bytes", len);
        }
        let mut whole = bytes.clone();
        prop_assert_eq!(ServerCodec::default().decode(&mut whole).unwrap(), Some(frame));
    }

    #[test]
    fn every_strict_prefix_of_a_response_decodes_to_none(response in response()) {
        let bytes = encode_responses(std::slice::from_ref(&response));
        for len in 0..bytes.len() {
            let mut buf = BytesMut::from(&bytes[..len]);
            let mut codec = ClientCodec::default();
            prop_assert!(matches!(codec.decode(&mut buf), Ok(None)), "prefix of {} bytes", len);
        }
        let mut whole = bytes.clone();
        prop_assert_eq!(ClientCodec::default().decode(&mut whole).unwrap(), Some(response));
    }
}

/// Request codes of both numberings, and a few unknown ones.
fn request_codes() -> Vec<u16> {
    let kinds = [
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
    let mut codes: Vec<u16> = [Numbering::Modern, Numbering::Classic]
        .iter()
        .flat_map(|&n| kinds.iter().map(move |&k| RequestCode::of(k, n).0))
        .collect();
    // The repository extension's codes exist only in secure mode.
    codes.extend(1260..=1268);
    codes.push(1280);
    codes.extend([0, 1032, 829, u16::MAX]);
    codes
}

fn response_codes() -> Vec<u16> {
    (1600..=1607)
        .chain(1640..=1645)
        .chain(1650..=1651)
        .chain(1660..=1671)
        .chain(1680..=1681)
        .chain([0, 1608, 1646, 1652, u16::MAX])
        .collect()
}

/// The bound on a decoder's buffer: a small multiple of one maximal frame
/// plus one read, whatever size a header declares (hostile headers declare up
/// to 4 GiB). The multiple is `BytesMut`'s allocation policy, not the
/// decoder's: a `Vec` may double an allocation whose front still holds bytes
/// already consumed.
fn capacity_bound(max_frame: usize, max_read: usize) -> usize {
    3 * (max_frame + max_read)
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn hostile_request_bytes_never_panic_or_grow_the_buffer(
        segments in proptest::collection::vec(hostile_segment(REQUEST_HEADER_LEN, request_codes(), valid_requests()), 1..6),
        sizes in read_sizes(),
    ) {
        let limits = small_limits();
        let bytes = segments.concat();
        let max = max_capacity_while_decoding(ServerCodec::new(limits), &bytes, &sizes);
        let max_frame = REQUEST_HEADER_LEN + limits.max_file_packet_payload();
        prop_assert!(max <= capacity_bound(max_frame, MAX_READ), "capacity {} for frames of at most {}", max, max_frame);
    }

    #[test]
    fn hostile_response_bytes_never_panic_or_grow_the_buffer(
        segments in proptest::collection::vec(hostile_segment(RESPONSE_HEADER_LEN, response_codes(), valid_responses()), 1..6),
        sizes in read_sizes(),
    ) {
        let limits = small_limits();
        let bytes = segments.concat();
        let max = max_capacity_while_decoding(ClientCodec::new(limits), &bytes, &sizes);
        let legacy = 16 + limits.max_wrapped_key.max(FILE_RECEIVED_LEN);
        let list_page = LIST_PAGE_HEAD_LEN + MAX_LIST_ENTRIES * LIST_ENTRY_LEN;
        let max_frame = RESPONSE_HEADER_LEN + legacy.max(list_page).max(limits.max_packet_content);
        prop_assert!(max <= capacity_bound(max_frame, MAX_READ), "capacity {} for frames of at most {}", max, max_frame);
    }

    #[test]
    fn arbitrary_bytes_never_panic_either_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..2048), sizes in read_sizes()) {
        let _ = decode_in_reads(ServerCodec::new(small_limits()), &bytes, &sizes);
        let _ = decode_in_reads(ClientCodec::new(small_limits()), &bytes, &sizes);
    }
}

proptest! {
    #![proptest_config(config(128))]

    #[test]
    fn upload_cut_into_any_packets_decrypts_to_the_original(
        key in aes_key(),
        plain in proptest::collection::vec(any::<u8>(), 0..20_000),
        sizes in proptest::collection::vec(1usize..=4096, 1..8),
    ) {
        let packets = packets(&key, &plain, &sizes);
        let (got, cksum) = receive(Limits::default(), &key, packets).unwrap().expect("the upload completes");
        prop_assert!(got == plain);
        prop_assert_eq!(cksum, Cksum::of(&plain));
        prop_assert_eq!(cksum, reference_cksum(&plain));
    }

    #[test]
    fn rejects_any_reorder_duplicate_gap_or_truncation(
        key in aes_key(),
        plain in proptest::collection::vec(any::<u8>(), 40..3000),
        sizes in proptest::collection::vec(16usize..=512, 1..6),
        mutation in 0u8..5,
        a in any::<prop::sample::Index>(),
        b in any::<prop::sample::Index>(),
        lenient in any::<bool>(),
        from_zero in any::<bool>(),
    ) {
        let leniency = if lenient { Leniency::LENIENT } else { Leniency::STRICT };
        let receive = |limits, key: &AesKey, packets| receive_with(leniency, limits, key, packets);
        let mut packets = packets(&key, &plain, &sizes);
        if lenient && from_zero {
            // The same mutations of an upload numbered from 0 fail alike.
            renumber_from_zero(&mut packets);
        }
        prop_assume!(packets.len() >= 2);
        let n = packets.len();
        let i = a.index(n);
        let outcome = match mutation {
            0 => {
                // Reorder: swap two distinct packets.
                let j = (i + 1 + b.index(n - 1)) % n;
                packets.swap(i, j);
                receive(Limits::default(), &key, packets)
            }
            1 => {
                // Duplicate a packet in place.
                let dup = packets[i].clone();
                packets.insert(i, dup);
                receive(Limits::default(), &key, packets)
            }
            2 => {
                // A gap: drop one packet that is not the last.
                packets.remove(i % (n - 1));
                receive(Limits::default(), &key, packets)
            }
            3 => {
                // Truncate the sequence: the last packets never come.
                packets.truncate(i % (n - 1) + 1);
                let outcome = receive(Limits::default(), &key, packets);
                prop_assert!(matches!(outcome, Ok(None)), "a truncated upload never completes: {:?}", outcome);
                return Ok(());
            }
            _ => {
                // Truncate one packet's content.
                let p = &mut packets[i];
                let keep = b.index(p.content.len());
                p.content.truncate(keep);
                receive(Limits::default(), &key, packets)
            }
        };
        if lenient && from_zero {
            // Without its packet 0, an upload numbered from 0 reads as one
            // numbered from 1 whose last packet never comes: it may stay
            // incomplete rather than fail, but never completes. The one
            // exception is a copy of the last packet after it: the upload
            // was whole before it, and the copy (packet 1 of the same
            // total) is a valid first packet of a new upload numbered from
            // 1. (The server session refuses it anyway: after the last
            // packet a cksum verdict is due, not another packet.)
            let copy_of_last = mutation == 1 && i == n - 1;
            prop_assert!(copy_of_last || !matches!(outcome, Ok(Some(_))), "mutation {} completed", mutation);
        } else {
            prop_assert!(outcome.is_err(), "mutation {} was accepted: {:?}", mutation, outcome.map(|o| o.map(|(p, _)| p.len())));
        }
    }

    #[test]
    fn lenient_upload_from_zero_or_zero_padded_decrypts_to_the_original_strict_refuses_it(
        key in aes_key(),
        plain in proptest::collection::vec(any::<u8>(), 0..5000),
        sizes in proptest::collection::vec(16usize..=1024, 1..6),
        from_zero in any::<bool>(),
        chunk in prop::option::of(prop::sample::select(vec![16usize, 512, 1024])),
    ) {
        prop_assume!(from_zero || chunk.is_some());
        let mut packets = packets(&key, &plain, &sizes);
        if from_zero {
            renumber_from_zero(&mut packets);
        }
        if let Some(chunk) = chunk {
            pad_last_with_zeros(&mut packets, chunk);
        }
        let (got, cksum) = receive_with(Leniency::LENIENT, Limits::default(), &key, packets.clone())
            .unwrap()
            .expect("the upload completes");
        prop_assert!(got == plain);
        prop_assert_eq!(cksum, Cksum::of(&plain));
        let strict = receive_with(Leniency::STRICT, Limits::default(), &key, packets);
        prop_assert!(strict.is_err(), "strict accepted it: {:?}", strict.map(|o| o.is_some()));
    }

    #[test]
    fn rejects_mixed_numbering_and_anything_but_zeros_past_the_content_size(
        key in aes_key(),
        plain in proptest::collection::vec(any::<u8>(), 40..3000),
        sizes in proptest::collection::vec(16usize..=512, 1..6),
        mutation in 0u8..3,
        a in any::<prop::sample::Index>(),
        junk in 1u8..=255,
    ) {
        let mut packets = packets(&key, &plain, &sizes);
        let n = packets.len();
        let outcome = match mutation {
            0 => {
                // From 0, but one later packet keeps its 1-based number (or
                // from 1 with one packet renumbered from 0).
                prop_assume!(n >= 2);
                let keep = 1 + a.index(n - 1);
                for (i, p) in packets.iter_mut().enumerate() {
                    if i != keep {
                        p.head.packet -= 1;
                    }
                }
                let outcome = receive_with(Leniency::LENIENT, Limits::default(), &key, packets);
                prop_assert!(!matches!(outcome, Ok(Some(_))), "a mixed upload completed");
                return Ok(());
            }
            1 => {
                // A non-zero byte among the padding of the last packet.
                let real = packets[n - 1].content.len();
                pad_last_with_zeros(&mut packets, 1024);
                let last = &mut packets[n - 1];
                let mut content = last.content.to_vec();
                let pos = real + a.index(content.len() - real);
                content[pos] = junk;
                last.content = Bytes::from(content);
                receive_with(Leniency::LENIENT, Limits::default(), &key, packets)
            }
            _ => {
                // Zero bytes anywhere but at the end of the last packet.
                prop_assume!(n >= 2);
                let i = a.index(n - 1);
                let mut content = packets[i].content.to_vec();
                content.resize(content.len() + 16, 0);
                packets[i].content = Bytes::from(content);
                receive_with(Leniency::LENIENT, Limits::default(), &key, packets)
            }
        };
        prop_assert!(outcome.is_err(), "mutation {} was accepted: {:?}", mutation, outcome.map(|o| o.is_some()));
    }

    #[test]
    fn streaming_cksum_and_cbc_equal_one_shot_under_any_chunking(
        key in any::<[u8; 32]>(),
        iv in any::<[u8; 16]>(),
        plain in proptest::collection::vec(any::<u8>(), 0..5000),
        sizes in proptest::collection::vec(1usize..=300, 1..10),
    ) {
        let aes = AesKey::from_bytes(key);
        // cksum
        let mut cksum = Cksum::new();
        for piece in cut(&plain, &sizes) {
            cksum.update(piece);
        }
        prop_assert_eq!(cksum.len(), plain.len() as u64);
        let streamed = cksum.finish();
        prop_assert_eq!(streamed, Cksum::of(&plain));
        prop_assert_eq!(streamed, reference_cksum(&plain));

        // CBC encryption, against the RustCrypto one-shot.
        let one_shot = Aes256CbcEnc::new(&key.into(), &iv.into()).encrypt_padded_vec_mut::<Pkcs7>(&plain);
        let mut encryptor = CbcEncryptor::with_iv(&aes, &iv);
        let mut ct = BytesMut::new();
        for piece in cut(&plain, &sizes) {
            encryptor.update(piece, &mut ct);
            prop_assert_eq!(ct.len() % crypto::BLOCK, 0);
        }
        encryptor.finish(&mut ct);
        prop_assert!(ct[..] == one_shot[..]);
        prop_assert_eq!(ct.len() as u64, crypto::pkcs7_len(plain.len() as u64));

        // CBC decryption, chunked differently.
        let mut decryptor = CbcDecryptor::with_iv(&aes, &iv);
        let mut out = BytesMut::new();
        let mut rev: Vec<usize> = sizes.clone();
        rev.reverse();
        for piece in cut(&ct, &rev) {
            decryptor.update(piece, &mut out);
        }
        decryptor.finish(&mut out).unwrap();
        prop_assert!(out[..] == plain[..]);
        let reference = Aes256CbcDec::new(&key.into(), &iv.into()).decrypt_padded_vec_mut::<Pkcs7>(&one_shot).unwrap();
        prop_assert!(reference == plain);
    }
}
