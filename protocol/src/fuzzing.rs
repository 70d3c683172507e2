// Over 600 lines: one harness per fuzz target, each self-contained beside the fake storage it drives.
//! Harnesses for the cargo-fuzz targets in `fuzz/`.
//!
//! Each function takes arbitrary bytes, must never panic on its own account,
//! and asserts the invariants that hold for every input: a failed assertion
//! here is a bug found. The targets in `fuzz/fuzz_targets/` only call these,
//! so the harnesses build and run with the library's own toolchain and lints.
// A harness reports a bug by panicking: that is what the fuzzer catches.
#![allow(clippy::panic)]

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use bytes::{Bytes, BytesMut};
use rand::SeedableRng;
use tokio_util::codec::{Decoder, Encoder};

use crate::cksum::Cksum;
use crate::codec::{ClientCodec, ServerCodec};
use crate::crypto::{self, AesKey, CbcDecryptor, PrivateKey};
use crate::limits::Limits;
use crate::message::{FilePacket, PacketHead, PublicKeyField, Request, RequestFrame, Response};
use crate::name::{FileName, UserName, NAME_FIELD_LEN};
use crate::reassembly::{Leniency, Reassembler};
use crate::repo::message::RepoRequest;
use crate::restore::FoundVersion;
use crate::retrieval::{
    ListEntry, ListFlags, RetrievalRequest, RetrievalResponse, MAX_LIST_ENTRIES,
};
use crate::session::server::{
    Action, DeleteOutcome, KnownClient, RegisterOutcome, RestoreStart, ServerConfig, ServerSession,
};
use crate::wire::{ClientId, Dialect, Numbering, REQUEST_HEADER_LEN, RESPONSE_HEADER_LEN};

mod repository;

pub use repository::{passphrase_login, repo_formats, repo_session};

/// Small limits, so that the fuzzer reaches every limit with short inputs.
pub fn limits() -> Limits {
    Limits {
        max_packet_content: 4096,
        max_file_size: 1 << 20,
        max_name_len: 200,
        max_wrapped_key: 256,
    }
}

/// Reads fuzzer bytes as a stream of small decisions; yields zeros once the
/// input is exhausted, so every harness terminates.
struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((b, rest)) => {
                self.data = rest;
                *b
            }
            None => 0,
        }
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    fn bool(&mut self) -> bool {
        self.u8() & 1 == 1
    }

    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.data.split_at(n.min(self.data.len()));
        self.data = rest;
        head
    }
}

/// The invariant every decoder run must keep: the buffer never holds room for
/// more than a small multiple of one maximal frame plus one read, whatever
/// size a peer declares. The multiple is `BytesMut`'s allocation policy (a
/// `Vec` may double an allocation whose front still holds consumed bytes),
/// not the decoder's.
fn assert_capacity_bounded(buf: &BytesMut, max_frame: usize, read: usize) {
    let bound = 3 * (max_frame + read);
    assert!(
        buf.capacity() <= bound,
        "buffer capacity {} exceeds {bound}",
        buf.capacity()
    );
}

/// Decodes `data` in one buffer, collecting frames until the decoder wants
/// more bytes (`Ok(None)`) or fails. Returns the frames, each with the number
/// of bytes it consumed, and whether the stream ended in an error.
fn decode_all<D: Decoder>(mut codec: D, data: &[u8]) -> (Vec<(D::Item, usize)>, bool) {
    let mut buf = BytesMut::from(data);
    let mut out = Vec::new();
    loop {
        let before = buf.len();
        match codec.decode(&mut buf) {
            Ok(Some(item)) => out.push((item, before - buf.len())),
            Ok(None) => return (out, false),
            Err(_) => return (out, true),
        }
    }
}

/// Decodes `data` as a socket would deliver it: a read appends at most
/// `read` bytes into the buffer's spare room (reserving a little when it is
/// full, as `FramedRead` does), then the decoder runs until it wants more.
fn decode_chunked<D: Decoder>(
    mut codec: D,
    data: &[u8],
    read: usize,
    max_frame: usize,
) -> (Vec<D::Item>, bool) {
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        if buf.len() == buf.capacity() {
            buf.reserve(read);
        }
        let n = (buf.capacity() - buf.len()).min(read).min(rest.len());
        let (chunk, tail) = rest.split_at(n);
        buf.extend_from_slice(chunk);
        rest = tail;
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(item)) => out.push(item),
                Ok(None) => break,
                Err(_) => return (out, true),
            }
            assert_capacity_bounded(&buf, max_frame, read);
        }
        assert_capacity_bounded(&buf, max_frame, read);
    }
    (out, false)
}

fn max_request_frame(limits: &Limits) -> usize {
    let repo = [
        crate::repo::RepoKind::Have,
        crate::repo::RepoKind::PackEnd,
        crate::repo::RepoKind::SnapshotCommit,
        crate::repo::RepoKind::PutKey,
    ]
    .iter()
    .map(|k| k.payload_bounds(limits).1)
    .max()
    .unwrap_or_default();
    REQUEST_HEADER_LEN + limits.max_file_packet_payload().max(repo)
}

fn max_response_frame(limits: &Limits) -> usize {
    let legacy = 16
        + limits
            .max_wrapped_key
            .max(crate::message::FILE_RECEIVED_LEN);
    let list = crate::retrieval::LIST_PAGE_HEAD_LEN
        + crate::retrieval::MAX_LIST_ENTRIES * crate::retrieval::LIST_ENTRY_LEN;
    let repo = [
        crate::wire::ResponseCode::SNAPSHOT_PAGE,
        crate::wire::ResponseCode::KEYS,
        crate::wire::ResponseCode::HAVE_ANSWER,
    ]
    .iter()
    .filter_map(|&c| crate::repo::RepoResponse::payload_bounds(c, limits))
    .map(|(_, max)| max)
    .max()
    .unwrap_or_default();
    RESPONSE_HEADER_LEN + legacy.max(list).max(limits.max_packet_content).max(repo)
}

/// What a decoded request may never carry, whatever the bytes said.
fn assert_request_within_limits(request: &Request, limits: &Limits) {
    let name = match request {
        Request::Register { name }
        | Request::Reconnect { name }
        | Request::PublicKey { name, .. } => name.as_bytes(),
        Request::RegisterKey { name, key } => {
            assert!(
                !key.is_empty() && key.len() <= crate::secure::MAX_PUBLIC_KEY_DER,
                "public key size"
            );
            name.as_bytes()
        }
        Request::Prove { .. } => return,
        Request::Repo(r) => {
            assert!(
                r.check(limits).is_ok(),
                "repository request over its bounds"
            );
            return;
        }
        Request::SendFile(p) => {
            assert!(
                p.content.len() <= limits.max_packet_content,
                "packet content over the limit"
            );
            // Packet 0 decodes on the legacy listener (clients that number
            // from 0); whether it is accepted is the reassembler's call.
            assert!(
                p.head.total >= 1 && p.head.packet <= p.head.total,
                "packet number out of range"
            );
            p.head.file.as_bytes()
        }
        Request::CrcOk { file } | Request::CrcRetry { file } | Request::CrcAbort { file } => {
            file.as_bytes()
        }
        Request::Retrieval(
            crate::retrieval::RetrievalRequest::Restore { file, .. }
            | crate::retrieval::RetrievalRequest::Delete { file },
        ) => file.as_bytes(),
        Request::Retrieval(crate::retrieval::RetrievalRequest::List { .. }) => return,
    };
    assert_name_valid(name, limits);
}

fn assert_name_valid(name: &[u8], limits: &Limits) {
    assert!(
        !name.is_empty() && name.len() <= limits.max_name_len,
        "name length {} decoded",
        name.len()
    );
    assert!(
        name.iter().all(|&b| b >= 0x20 && b != 0x7f),
        "name with a control byte decoded"
    );
}

/// What a decoded response may never carry.
fn assert_response_within_limits(response: &Response, limits: &Limits) {
    match response {
        Response::KeyAccepted { wrapped_key, .. } | Response::Reconnected { wrapped_key, .. } => {
            assert!(
                !wrapped_key.is_empty() && wrapped_key.len() <= limits.max_wrapped_key,
                "wrapped key size"
            );
        }
        Response::FileReceived { file, .. } => assert_name_valid(file.as_bytes(), limits),
        _ => {}
    }
}

/// Raw request decoding: never panics, what decodes is within the limits,
/// the outcome does not depend on how the bytes are split into reads, and
/// the buffer stays bounded.
pub fn decode_request(data: &[u8]) {
    let limits = limits();
    let dialect = request_dialect(data);
    let (whole, whole_err) = decode_all(ServerCodec::with_dialect(limits, dialect), data);
    let whole: Vec<RequestFrame> = whole.into_iter().map(|(f, _)| f).collect();
    for frame in &whole {
        assert_request_within_limits(&frame.request, &limits);
    }
    let read = usize::from(data.first().copied().unwrap_or(1)).max(1);
    for read in [1, read] {
        let (split, split_err) = decode_chunked(
            ServerCodec::with_dialect(limits, dialect),
            data,
            read,
            max_request_frame(&limits),
        );
        assert_eq!(
            split, whole,
            "frames differ when read {read} bytes at a time"
        );
        assert_eq!(
            split_err, whole_err,
            "error differs when read {read} bytes at a time"
        );
    }
}

/// Raw response decoding: as [`decode_request`], for the client side.
pub fn decode_response(data: &[u8]) {
    let limits = limits();
    let dialect = response_dialect(data);
    let (whole, whole_err) = decode_all(ClientCodec::with_dialect(limits, dialect), data);
    let whole: Vec<Response> = whole.into_iter().map(|(f, _)| f).collect();
    for response in &whole {
        assert_response_within_limits(response, &limits);
    }
    let read = usize::from(data.first().copied().unwrap_or(1)).max(1);
    for read in [1, read] {
        let (split, split_err) = decode_chunked(
            ClientCodec::with_dialect(limits, dialect),
            data,
            read,
            max_response_frame(&limits),
        );
        assert_eq!(
            split, whole,
            "responses differ when read {read} bytes at a time"
        );
        assert_eq!(
            split_err, whole_err,
            "error differs when read {read} bytes at a time"
        );
    }
}

/// Where the name fields of an encoded request lie, relative to the frame.
fn request_name_fields(request: &Request, dialect: Dialect) -> Vec<usize> {
    let payload = REQUEST_HEADER_LEN;
    match request {
        Request::SendFile(_) => vec![payload + PacketHead::len_in(dialect) - NAME_FIELD_LEN],
        // The one repository request with a name field carries it first.
        Request::Repo(RepoRequest::PassphraseLogin { .. }) => vec![payload],
        Request::Prove { .. } | Request::Repo(_) => Vec::new(),
        _ => vec![payload],
    }
}

/// The dialect a request stream is decoded in: secure when its first
/// header carries version 4, so that seeds of either kind stay meaningful.
fn request_dialect(data: &[u8]) -> Dialect {
    match data.get(16) {
        Some(&crate::wire::SECURE_VERSION) => Dialect::Secure,
        _ => Dialect::Legacy,
    }
}

/// As [`request_dialect`], for responses (the version is the first byte).
fn response_dialect(data: &[u8]) -> Dialect {
    match data.first() {
        Some(&crate::wire::SECURE_VERSION) => Dialect::Secure,
        _ => Dialect::Legacy,
    }
}

/// Where the name fields of an encoded response lie, relative to the frame.
fn response_name_fields(response: &Response, dialect: Dialect) -> Vec<usize> {
    match response {
        Response::FileReceived { .. } if dialect == Dialect::Secure => {
            vec![RESPONSE_HEADER_LEN + 24]
        }
        Response::FileReceived { .. } => vec![RESPONSE_HEADER_LEN + 20],
        _ => Vec::new(),
    }
}

/// Checks that `encoded` equals `original` byte for byte, except that name
/// fields (starting at `fields`) are written with zeros after their NUL
/// where the original may have carried anything.
fn assert_same_but_padding(original: &[u8], encoded: &[u8], fields: &[usize]) {
    assert_eq!(
        original.len(),
        encoded.len(),
        "re-encoding changed the frame length"
    );
    for (i, (a, b)) in original.iter().zip(encoded).enumerate() {
        if a == b {
            continue;
        }
        let in_padding = fields.iter().any(|&start| {
            let field = encoded
                .get(start..start + NAME_FIELD_LEN)
                .unwrap_or_default();
            let nul = field
                .iter()
                .position(|&c| c == 0)
                .map_or(usize::MAX, |p| start + p);
            i > nul && i < start + NAME_FIELD_LEN
        });
        assert!(
            in_padding && *b == 0,
            "re-encoding changed byte {i}: {a:#04x} -> {b:#04x}"
        );
    }
}

/// decode -> encode: every request that decodes re-encodes to the bytes it
/// came from (name padding is normalised to zeros), and decodes back to
/// itself.
pub fn roundtrip_request(data: &[u8]) {
    let limits = limits();
    let dialect = request_dialect(data);
    let (frames, _) = decode_all(ServerCodec::with_dialect(limits, dialect), data);
    let mut offset = 0;
    for (frame, consumed) in frames {
        let original = data.get(offset..offset + consumed).unwrap_or_default();
        offset += consumed;
        let mut encoded = BytesMut::new();
        if let Err(e) = ClientCodec::with_dialect(limits, dialect).encode(&frame, &mut encoded) {
            panic!("encoding into memory failed: {e}");
        }
        assert_same_but_padding(
            original,
            &encoded,
            &request_name_fields(&frame.request, dialect),
        );
        let mut again = encoded.clone();
        let back = ServerCodec::with_dialect(limits, dialect).decode(&mut again);
        assert!(
            matches!(back, Ok(Some(ref f)) if *f == frame),
            "re-encoded request does not decode to itself"
        );
        assert!(again.is_empty(), "re-encoded request left bytes behind");
    }
}

/// decode -> encode for responses, as [`roundtrip_request`].
pub fn roundtrip_response(data: &[u8]) {
    let limits = limits();
    let dialect = response_dialect(data);
    let (responses, _) = decode_all(ClientCodec::with_dialect(limits, dialect), data);
    let mut offset = 0;
    for (response, consumed) in responses {
        let original = data.get(offset..offset + consumed).unwrap_or_default();
        offset += consumed;
        // A legacy 1604 that declared more than its id is read leniently
        // (`MAX_MISDECLARED_ACK`): it cannot re-encode to the same bytes,
        // and the zeros skipped after it shift what follows.
        let declared = original
            .get(3..7)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(u32::from_le_bytes);
        if matches!(response, Response::Ack { .. })
            && dialect == Dialect::Legacy
            && declared.is_some_and(|d| d > 16)
        {
            break;
        }
        let mut encoded = BytesMut::new();
        if let Err(e) = ServerCodec::with_dialect(limits, dialect).encode(&response, &mut encoded) {
            panic!("encoding into memory failed: {e}");
        }
        assert_same_but_padding(
            original,
            &encoded,
            &response_name_fields(&response, dialect),
        );
        let mut again = encoded.clone();
        let back = ClientCodec::with_dialect(limits, dialect).decode(&mut again);
        assert!(
            matches!(back, Ok(Some(ref r)) if *r == response),
            "re-encoded response does not decode to itself"
        );
    }
}

fn valid_name<T: TryFrom<&'static str>>(text: &'static str) -> T {
    T::try_from(text).unwrap_or_else(|_| panic!("{text:?} is a valid name"))
}

fn file_name(input: &mut Input<'_>) -> FileName {
    const NAMES: [&str; 3] = ["a.bin", "dir/b.txt", "c"];
    valid_name(
        NAMES
            .get(usize::from(input.u8()) % NAMES.len())
            .copied()
            .unwrap_or("a.bin"),
    )
}

/// The honest packets of one file: its plaintext, and its ciphertext cut
/// into slices of the sizes the input chooses.
struct Upload {
    plain: Vec<u8>,
    packets: Vec<FilePacket>,
}

fn honest_upload(input: &mut Input<'_>, key: &AesKey, file: FileName, max_plain: u16) -> Upload {
    let len = usize::from(input.u16() % max_plain.max(1));
    let seed = input.u8();
    let plain: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    let ct = crypto::encrypt_all(key, &plain).freeze();
    let mut sizes = Vec::new();
    let mut left = ct.len();
    while left > 0 {
        let size = (usize::from(input.u8()) * 7 + 1).min(left);
        sizes.push(size);
        left -= size;
    }
    let total = u32::try_from(sizes.len()).unwrap_or(u32::MAX);
    let mut packets = Vec::with_capacity(sizes.len());
    let mut at = 0;
    for (i, size) in sizes.into_iter().enumerate() {
        packets.push(FilePacket {
            head: PacketHead {
                content_size: ct.len() as u64,
                orig_size: plain.len() as u64,
                packet: u32::try_from(i + 1).unwrap_or(u32::MAX),
                total,
                file: file.clone(),
            },
            content: ct.slice(at..at + size),
        });
        at += size;
    }
    Upload { plain, packets }
}

/// Tampers with one packet the way the input says: a packet field or the
/// content is changed.
fn tamper(input: &mut Input<'_>, mut packet: FilePacket) -> FilePacket {
    let h = &mut packet.head;
    match input.u8() % 7 {
        0 => h.packet = u32::from(input.u16()),
        1 => h.total = u32::from(input.u16()),
        2 => h.content_size = u64::from(input.u32()),
        3 => h.orig_size = u64::from(input.u32()),
        4 => h.file = file_name(input),
        5 => {
            let cut = usize::from(input.u16()) % (packet.content.len() + 1);
            packet.content.truncate(cut);
        }
        _ => {
            let mut content = packet.content.to_vec();
            let n = usize::from(input.u8() % 40);
            let extra = input.bytes(n);
            content.extend_from_slice(extra);
            packet.content = Bytes::from(content);
        }
    }
    packet
}

/// A sequence of packet operations through [`Reassembler`], [`CbcDecryptor`]
/// and [`Cksum`]. Whatever the order, duplicates, gaps, truncations or forged
/// fields, an upload completes only as packets `1..=total` in order with the
/// same head and exactly the declared content; an untouched upload decrypts
/// to its plaintext and cksum; a refused packet forgets the upload.
pub fn reassemble(data: &[u8]) {
    reassemble_with(data, Leniency::STRICT);
}

/// As [`reassemble`], with the legacy leniencies on (`docs/PROTOCOL.md`
/// §9): the honest upload is numbered from 0 or from 1 and its last packet
/// may be padded with zeros, as the input says. An upload completes only as
/// packets `first..first+total` in order (first 0 or 1, one scheme per
/// upload) with exactly the declared content once padding is dropped.
pub fn reassemble_lenient(data: &[u8]) {
    reassemble_with(data, Leniency::LENIENT);
}

fn reassemble_with(data: &[u8], leniency: Leniency) {
    let mut input = Input::new(data);
    let limits = limits();
    let key = AesKey::from_bytes([0x5a; 32]);
    let mut reassembler = Reassembler::lenient(limits, leniency);
    let mut upload = honest_upload(&mut input, &key, valid_name("a.bin"), 6000);
    if leniency.zero_based_packets && input.bool() {
        for p in &mut upload.packets {
            p.head.packet = p.head.packet.saturating_sub(1);
        }
    }
    if leniency.zero_padding {
        let pad = usize::from(input.u8() % 64);
        if let Some(last) = upload.packets.last_mut() {
            let mut content = last.content.to_vec();
            content.resize(content.len() + pad, 0);
            last.content = Bytes::from(content);
        }
    }
    // What the reassembler has accepted for the upload in progress.
    let mut accepted: Vec<PacketHead> = Vec::new();
    let mut content = BytesMut::new();
    let mut untouched = true;
    let mut next_honest = 0usize;
    let mut last_sent: Option<FilePacket> = None;
    while !input.is_empty() {
        let honest = upload.packets.get(next_honest).cloned();
        let packet = match (input.u8() % 8, honest) {
            (0..=3, Some(p)) => {
                next_honest += 1;
                p
            }
            (4, Some(_)) => {
                // A gap: skip the packet that was due.
                next_honest += 1;
                untouched = false;
                continue;
            }
            (5, _) => match last_sent.clone() {
                Some(p) => {
                    untouched = false;
                    p
                }
                None => continue,
            },
            (6, Some(p)) => {
                next_honest += 1;
                untouched = false;
                tamper(&mut input, p)
            }
            (7, _) => {
                // Start the honest sequence over.
                next_honest = 0;
                untouched = true;
                reassembler.reset();
                accepted.clear();
                content.clear();
                continue;
            }
            _ => {
                next_honest = 0;
                continue;
            }
        };
        last_sent = Some(packet.clone());
        let head = packet.head.clone();
        match reassembler.push(packet) {
            Err(_) => {
                assert!(
                    reassembler.upload().is_none(),
                    "a refused packet must end the upload"
                );
                accepted.clear();
                content.clear();
                untouched = false;
            }
            Ok(slice) => {
                assert_eq!(
                    slice.first,
                    accepted.is_empty(),
                    "first flag disagrees with the packets accepted"
                );
                let first_number = accepted.first().map_or(head.packet, |h| h.packet);
                assert!(
                    first_number == 1 || (first_number == 0 && leniency.zero_based_packets),
                    "accepted an upload starting at packet {first_number}"
                );
                assert_eq!(
                    head.packet as usize,
                    accepted.len() + first_number as usize,
                    "accepted a packet out of sequence"
                );
                if let Some(first) = accepted.first() {
                    assert_eq!(
                        (
                            first.total,
                            first.content_size,
                            first.orig_size,
                            &first.file
                        ),
                        (head.total, head.content_size, head.orig_size, &head.file),
                        "accepted a packet that changes the upload's head"
                    );
                }
                accepted.push(head.clone());
                assert!(
                    slice.padding == 0 || (leniency.zero_padding && slice.last),
                    "dropped padding outside the last packet or when strict"
                );
                content.extend_from_slice(&slice.content);
                assert!(
                    content.len() as u64 <= head.content_size,
                    "accepted more than the declared content"
                );
                if slice.last {
                    assert_eq!(
                        head.packet + 1 - first_number,
                        head.total,
                        "completed before the last packet"
                    );
                    assert_eq!(
                        content.len() as u64,
                        head.content_size,
                        "completed short of the declared content"
                    );
                    assert!(
                        reassembler.upload().is_none(),
                        "a completed upload must leave the reassembler idle"
                    );
                    check_decryption(&key, &content, untouched.then_some(&upload.plain[..]));
                    accepted.clear();
                    content.clear();
                    next_honest = 0;
                    untouched = true;
                }
            }
        }
    }
}

/// Streams `ct` through the decryptor and cksum in odd chunks; when `plain`
/// is known, the result must be exactly it.
fn check_decryption(key: &AesKey, ct: &[u8], plain: Option<&[u8]>) {
    let mut decryptor = CbcDecryptor::new(key);
    let mut out = BytesMut::new();
    let mut cksum = Cksum::new();
    for chunk in ct.chunks(37) {
        let before = out.len();
        decryptor.update(chunk, &mut out);
        cksum.update(out.get(before..).unwrap_or_default());
    }
    let before = out.len();
    let finished = decryptor.finish(&mut out);
    cksum.update(out.get(before..).unwrap_or_default());
    if let Some(plain) = plain {
        assert!(finished.is_ok(), "an untouched upload must unpad");
        assert_eq!(
            &out[..],
            plain,
            "an untouched upload must decrypt to its plaintext"
        );
        assert_eq!(
            cksum.finish(),
            Cksum::of(plain),
            "streaming cksum differs from one-shot"
        );
    }
}

/// The client key the session harness uses: generated once, deterministically.
fn client_key() -> &'static PrivateKey {
    static KEY: OnceLock<PrivateKey> = OnceLock::new();
    KEY.get_or_init(|| {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
        PrivateKey::generate_legacy(&mut rng)
            .unwrap_or_else(|e| panic!("generating the test key failed: {e}"))
    })
}

/// Unwraps an AES key the session sent, with the harness's client key. The
/// RSA private-key operation dominates a run, and the session's randomness is
/// seeded from the input, so results are cached by wrapped bytes. Blinding
/// draws from its own generator so that a cache hit or miss does not change
/// the session's randomness: every input replays the same way.
fn unwrap_key(wrapped: &[u8]) -> Option<AesKey> {
    type Cache = Mutex<HashMap<Vec<u8>, Option<[u8; 32]>>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    let mut cache = cache
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if cache.len() > 4096 {
        cache.clear();
    }
    let key = cache.entry(wrapped.to_vec()).or_insert_with(|| {
        let mut blinding = rand::rngs::StdRng::seed_from_u64(0);
        client_key()
            .unwrap_aes_key(&mut blinding, wrapped)
            .ok()
            .map(|k| *k.as_bytes())
    });
    key.map(AesKey::from_bytes)
}

/// What the fake storage of [`server_session`] holds.
#[derive(Default)]
struct FakeStorage {
    clients: Vec<(ClientId, UserName, Option<PublicKeyField>)>,
    /// Plaintext written for the upload in progress.
    temp: Vec<u8>,
    committed: Vec<(FileName, u32)>,
}

/// A sequence of requests through [`ServerSession`], with a fake storage that
/// answers as the input says. The session never panics; every storage action
/// it asks for is answerable; the 1603 cksum is the cksum of exactly the
/// plaintext it handed to storage; an honest upload's plaintext is exactly
/// the file; a commit carries the cksum the client confirmed; a proof is
/// accepted only when it is the one derived from the key the client holds,
/// and no retrieval is served before it (a retrieval refused for that is
/// answered 1651, `docs/PROTOCOL.md` §11.5).
pub fn server_session(data: &[u8]) {
    let mut input = Input::new(data);
    let config = ServerConfig {
        reply_to_crc_retry: input.bool(),
        limits: limits(),
        ..ServerConfig::default()
    };
    let mut session = ServerSession::new(config);
    let mut rng = rand::rngs::StdRng::seed_from_u64(u64::from(input.u16()));
    let key_field = crypto::public_key_field(&client_key().public_key()).ok();
    let mut storage = FakeStorage::default();
    let known_id = ClientId([0x11; 16]);
    if input.bool() {
        storage
            .clients
            .push((known_id, valid_name("alice"), key_field.clone()));
    }
    let mut assigned: Option<ClientId> = None;
    let mut aes: Option<AesKey> = None;
    let mut upload: Option<(Upload, usize, bool)> = None;
    let mut last_1603: Option<(FileName, u32)> = None;
    let mut uploaded_plain: Option<Vec<u8>> = None;
    let mut proved = false;
    let numbering = if input.bool() {
        Numbering::Classic
    } else {
        Numbering::Modern
    };
    while !input.is_empty() {
        let name: UserName = valid_name(if input.u8() % 4 == 0 {
            "mallory"
        } else {
            "alice"
        });
        let header_id = match input.u8() % 4 {
            0 => known_id,
            1 => ClientId([input.u8(); 16]),
            _ => assigned.unwrap_or(known_id),
        };
        let request = match input.u8() % 11 {
            0 => Request::Register { name },
            1 => {
                let key = match (input.u8() % 4, &key_field) {
                    (0, _) | (_, None) => PublicKeyField([input.u8(); 160]),
                    (_, Some(k)) => k.clone(),
                };
                Request::PublicKey { name, key }
            }
            2 => Request::Reconnect { name },
            3..=5 => {
                if upload.is_none() {
                    let key = aes.clone().unwrap_or_else(|| AesKey::from_bytes([0; 32]));
                    let file = file_name(&mut input);
                    upload = Some((honest_upload(&mut input, &key, file, 3000), 0, true));
                }
                let Some((u, next, honest)) = upload.as_mut() else {
                    return;
                };
                let Some(packet) = u.packets.get(*next).cloned() else {
                    upload = None;
                    continue;
                };
                *next += 1;
                let packet = if input.u8() % 8 == 0 {
                    *honest = false;
                    tamper(&mut input, packet)
                } else {
                    packet
                };
                Request::SendFile(packet)
            }
            6 => Request::CrcOk {
                file: file_name(&mut input),
            },
            7 => Request::CrcRetry {
                file: file_name(&mut input),
            },
            8 => Request::CrcAbort {
                file: file_name(&mut input),
            },
            10 => {
                let proof = match (input.u8() % 4, &aes) {
                    (0, _) | (_, None) => {
                        let mut proof = [0u8; 32];
                        for (to, from) in proof.iter_mut().zip(input.bytes(32)) {
                            *to = *from;
                        }
                        proof
                    }
                    (_, Some(key)) => {
                        crate::secure::legacy_retrieval_proof(key, assigned.unwrap_or(known_id))
                    }
                };
                Request::Prove { proof }
            }
            _ => Request::Retrieval(match input.u8() % 3 {
                0 => RetrievalRequest::List {
                    flags: ListFlags(input.u8()),
                    cursor: u64::from(input.u32()),
                },
                1 => RetrievalRequest::Restore {
                    version: u64::from(input.u32()),
                    file: file_name(&mut input),
                },
                _ => RetrievalRequest::Delete {
                    file: file_name(&mut input),
                },
            }),
        };
        let retrieval = match &request {
            Request::Retrieval(r) => Some(r.clone()),
            _ => None,
        };
        let is_file = matches!(request, Request::SendFile(_));
        let proof = match &request {
            Request::Prove { proof } => Some(*proof),
            _ => None,
        };
        let frame = RequestFrame {
            client_id: header_id,
            numbering,
            request,
        };
        let action = match session.handle(frame, &mut rng) {
            Ok(action) => action,
            Err(e) => {
                if retrieval.is_some() && !proved {
                    assert_eq!(
                        e.answer(),
                        Response::NotAuthenticated,
                        "retrieval before the proof must be answered 1651"
                    );
                }
                // The shell answers and ends the connection.
                return;
            }
        };
        if !is_file {
            upload = None;
        }
        match action {
            Action::Repo(action) => {
                panic!("a repository request in a legacy session: {action:?}")
            }
            Action::Reply(Response::Authenticated { client_id }) => {
                assert!(!proved, "a second proof accepted");
                let Some(key) = aes.as_ref() else {
                    panic!("a proof accepted before the client has a key");
                };
                assert_eq!(
                    proof,
                    Some(crate::secure::legacy_retrieval_proof(key, client_id)),
                    "accepted a proof that is not the client's"
                );
                assert_eq!(Some(client_id), assigned, "proof for another client");
                proved = true;
            }
            Action::Reply(_) => {}
            Action::List {
                client_id,
                skip,
                limit,
                ..
            } => {
                assert!(proved, "retrieval served before the proof");
                assert_eq!(Some(client_id), assigned, "retrieval for another client");
                assert!(
                    matches!(retrieval, Some(RetrievalRequest::List { cursor, .. }) if cursor == skip),
                    "list request changed"
                );
                assert!(
                    (2..=MAX_LIST_ENTRIES + 1).contains(&limit),
                    "page over the limit"
                );
                if input.u8() % 8 == 0 {
                    assert_eq!(session.storage_failed(), Response::GeneralError);
                    continue;
                }
                let found = usize::from(input.u16()) % (limit + 1);
                let entries = (0..found)
                    .map(|i| ListEntry {
                        version: i as u64,
                        size: 0,
                        stored_at: 0,
                        cksum: 0,
                        file: file_name(&mut input),
                    })
                    .collect();
                let Ok(Response::Retrieval(RetrievalResponse::ListPage {
                    next_cursor,
                    entries,
                })) = session.listed(entries)
                else {
                    panic!("a list not answered with a page");
                };
                let more = found == limit;
                assert_eq!(entries.len(), found.min(limit - 1), "page size");
                assert_eq!(
                    next_cursor,
                    if more {
                        skip.saturating_add(limit as u64 - 1)
                    } else {
                        0
                    },
                    "next cursor"
                );
            }
            Action::Delete { client_id, file } => {
                assert!(proved, "retrieval served before the proof");
                assert_eq!(Some(client_id), assigned, "retrieval for another client");
                assert_eq!(
                    retrieval,
                    Some(RetrievalRequest::Delete { file }),
                    "delete request changed"
                );
                let outcome = match input.u8() % 3 {
                    0 => DeleteOutcome::NotFound,
                    1 => DeleteOutcome::Refused,
                    _ => DeleteOutcome::Deleted(u32::from(input.u8()) + 1),
                };
                assert!(session.deleted(outcome).is_ok());
            }
            Action::FindVersion {
                client_id,
                file,
                version,
            } => {
                assert!(proved, "retrieval served before the proof");
                assert_eq!(Some(client_id), assigned, "retrieval for another client");
                assert_eq!(
                    retrieval,
                    Some(RetrievalRequest::Restore {
                        version,
                        file: file.clone()
                    }),
                    "restore request changed"
                );
                let sample = input.bytes(64).to_vec();
                let found = (!input.bool()).then(|| FoundVersion {
                    version: 1,
                    size: sample.len() as u64,
                    cksum: Cksum::of(&sample),
                    file,
                });
                let Ok(start) = session.found_version(found, &mut rng) else {
                    panic!("a pending restore refused its outcome");
                };
                let RestoreStart::Send(mut sender) = start else {
                    continue;
                };
                // A restore is encrypted under the key the client holds.
                let Some(key) = aes.as_ref() else {
                    panic!("retrieval allowed before the client has a key");
                };
                let iv = sender.header().iv;
                let mut packets = Vec::new();
                for chunk in sample.chunks(usize::from(input.u8() % 32) + 1) {
                    packets.extend(sender.plaintext(chunk).unwrap_or_default());
                }
                packets.extend(sender.finish().unwrap_or_default());
                let mut ct = BytesMut::new();
                for p in packets {
                    if let Response::Retrieval(RetrievalResponse::RestoreData { content }) = p {
                        ct.extend_from_slice(&content);
                    }
                }
                let mut plain = BytesMut::new();
                let mut decryptor = CbcDecryptor::with_iv(key, &iv);
                decryptor.update(&ct, &mut plain);
                assert!(
                    decryptor.finish(&mut plain).is_ok() && plain[..] == sample[..],
                    "restore not encrypted under the client's key"
                );
            }
            Action::Register {
                client_id, name, ..
            } => {
                let outcome = match input.u8() % 8 {
                    0 => RegisterOutcome::NameTaken,
                    1 => RegisterOutcome::Failed,
                    _ => RegisterOutcome::Created,
                };
                let answer = session.registered(outcome, &mut rng);
                if outcome == RegisterOutcome::Created {
                    assert!(
                        matches!(answer, Ok(Response::Registered { client_id: id }) if id == client_id)
                    );
                    storage.clients.push((client_id, name, None));
                    assigned = Some(client_id);
                } else {
                    assert!(matches!(
                        answer,
                        Ok(Response::RegistrationFailed | Response::GeneralError)
                    ));
                }
            }
            Action::StoreKey { client_id, key, .. } => {
                let stored = input.u8() % 8 != 0;
                if stored {
                    if let Some(c) = storage.clients.iter_mut().find(|c| c.0 == client_id) {
                        c.2 = Some(key);
                    }
                }
                match session.key_stored(stored, &mut rng) {
                    Ok(Response::KeyAccepted {
                        client_id: id,
                        wrapped_key,
                    }) => {
                        assert!(stored, "1602 sent although storing the key failed");
                        assert_eq!(id, client_id);
                        aes = unwrap_key(&wrapped_key);
                        assert!(
                            aes.is_some(),
                            "the wrapped key must unwrap with the client's key"
                        );
                    }
                    Ok(Response::GeneralError) => {}
                    other => panic!("unexpected answer to a stored key: {other:?}"),
                }
            }
            Action::LookupClient { client_id, .. } => {
                let found =
                    storage
                        .clients
                        .iter()
                        .find(|c| c.0 == client_id)
                        .map(|c| KnownClient {
                            name: c.1.clone(),
                            public_key: c.2.clone(),
                            secure_key: None,
                        });
                match session.looked_up(found, &mut rng) {
                    Ok(Response::Reconnected {
                        client_id: id,
                        wrapped_key,
                    }) => {
                        assert_eq!(id, client_id);
                        aes = unwrap_key(&wrapped_key);
                        assert!(
                            aes.is_some(),
                            "the wrapped key must unwrap with the client's key"
                        );
                        assigned = Some(id);
                    }
                    Ok(Response::ReconnectRejected { .. }) => {}
                    other => panic!("unexpected answer to a lookup: {other:?}"),
                }
            }
            Action::Write {
                start,
                plaintext,
                done,
            } => {
                if start.is_some() {
                    storage.temp.clear();
                }
                if input.u8() == 0xff {
                    let _ = session.storage_failed();
                    storage.temp.clear();
                    upload = None;
                    continue;
                }
                storage.temp.extend_from_slice(&plaintext);
                if let Some(Response::FileReceived { file, cksum, .. }) = done {
                    assert_eq!(
                        cksum,
                        Cksum::of(&storage.temp),
                        "1603 cksum is not the cksum of the plaintext written"
                    );
                    if let Some((u, next, true)) = &upload {
                        if *next == u.packets.len() {
                            assert_eq!(
                                storage.temp, u.plain,
                                "an honest upload must store its plaintext"
                            );
                        }
                    }
                    last_1603 = Some((file, cksum));
                    uploaded_plain = Some(std::mem::take(&mut storage.temp));
                    upload = None;
                }
            }
            Action::Commit {
                file, size, cksum, ..
            } => {
                let Some((expected_file, expected)) = last_1603.take() else {
                    panic!("commit without a 1603");
                };
                assert_eq!(
                    (&file, cksum),
                    (&expected_file, expected),
                    "commit differs from the 1603"
                );
                let stored = uploaded_plain.take().unwrap_or_default();
                assert_eq!(
                    size,
                    stored.len() as u64,
                    "commit size differs from the plaintext written"
                );
                if input.u8() == 0xff {
                    // The client's quota refuses it: nothing is committed,
                    // and a legacy peer hears only 1607.
                    assert_eq!(
                        session.quota_refused(size, size, size),
                        Response::GeneralError
                    );
                    continue;
                }
                storage.committed.push((file, cksum));
            }
            Action::Discard { .. } => {
                last_1603 = None;
                uploaded_plain = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_seeds_run_clean_through_their_harnesses() {
        let seeds = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds");
        type Harness = fn(&[u8]);
        let targets: [(&str, Harness); 10] = [
            ("decode_request", decode_request),
            ("decode_response", decode_response),
            ("roundtrip_request", roundtrip_request),
            ("roundtrip_response", roundtrip_response),
            ("reassemble", reassemble),
            ("reassemble_lenient", reassemble_lenient),
            ("server_session", server_session),
            ("repo_formats", repo_formats),
            ("repo_session", repo_session),
            ("passphrase_login", passphrase_login),
        ];
        for (target, harness) in targets {
            let dir = seeds.join(target);
            let mut count = 0;
            for entry in std::fs::read_dir(&dir).unwrap() {
                harness(&std::fs::read(entry.unwrap().path()).unwrap());
                count += 1;
            }
            assert!(count > 0, "no seeds in {}", dir.display());
        }
    }

    #[test]
    fn harnesses_accept_empty_and_small_inputs() {
        for data in [
            &[][..],
            &[0u8; 64][..],
            &[0xffu8; 300][..],
            &(0..=255u8).collect::<Vec<_>>()[..],
        ] {
            decode_request(data);
            decode_response(data);
            roundtrip_request(data);
            roundtrip_response(data);
            reassemble(data);
            reassemble_lenient(data);
            server_session(data);
            repo_formats(data);
            repo_session(data);
            passphrase_login(data);
        }
    }
}
