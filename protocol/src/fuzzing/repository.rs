//! Harnesses of the repository extension (`docs/PROTOCOL.md` §13): its
//! sealed formats and the client's fetch rules (`repo_formats`), and the
//! server session's rules (`repo_session`).

use bytes::{Bytes, BytesMut};
use rand::SeedableRng;
use tokio_util::codec::{Decoder, Encoder};

use super::{file_name, honest_upload, limits, valid_name, Input};
use crate::codec::{ClientCodec, ServerCodec};
use crate::crypto::AesKey;
use crate::message::{Request, RequestFrame, Response};
use crate::repo::envelope::{self, EnvelopeError, PassphraseCost};
use crate::repo::keys::MasterKey;
use crate::repo::message::{
    CommitRefusal, ForgetRefusal, KeySlot, ObjectId, PackEntry, RepoKind, RepoRequest,
    RepoResponse, SnapshotEntry, MAX_KEY_SLOTS, MAX_OBJECT_BYTES, MAX_PACK_BYTES, MAX_PACK_OBJECTS,
    MAX_SNAPSHOT_META, SNAPSHOT_ENTRY_HEAD, SNAPSHOT_PAGE_BYTES,
};
use crate::repo::pack;
use crate::repo::seal::{Opener, Sealer, OVERHEAD};
use crate::repo::tree::{self, Description};
use crate::session::repo::{answer, FetchReceiver, Fetched};
use crate::session::server::{
    Action, RepoAction, RepoOutcome, ServerConfig, ServerSession, SNAPSHOT_PAGE_ENTRIES,
};
use crate::wire::{ClientId, Dialect, Numbering};

/// Zeros to slice request contents from: a pack of [`MAX_PACK_BYTES`] is
/// reached in a few requests without allocating it.
static ZEROS: [u8; MAX_OBJECT_BYTES as usize] = [0; MAX_OBJECT_BYTES as usize];

fn zeros(len: usize) -> Bytes {
    Bytes::from_static(ZEROS.get(..len.min(ZEROS.len())).unwrap_or_default())
}

/// An id from a small alphabet, so that repeats are common.
fn small_id(input: &mut Input<'_>) -> ObjectId {
    ObjectId([input.u8() % 8; 32])
}

fn small_ids(input: &mut Input<'_>) -> Vec<ObjectId> {
    let n = usize::from(input.u8() % 4) + 1;
    (0..n).map(|_| small_id(input)).collect()
}

/// The master key the harnesses seal to: fixed, so inputs replay.
fn master() -> MasterKey {
    MasterKey::from_bytes([0x6b; 32])
}

/// Arbitrary bytes through the repository's sealed formats and the
/// client's fetch rules; the first byte picks which:
///
/// - `0`: [`tree::decode_tree`]: never panics; what decodes re-encodes to
///   bytes that decode to the same entries, and encoding is then stable;
/// - `1`: [`Description::decode`], the same;
/// - `2`: [`pack::locate`] with entries and a size derived from the input:
///   never panics; accepts exactly the indexes that cover the pack (each
///   object in bounds, each id once), and then the offsets are contiguous
///   from 0 to the pack's size;
/// - `3`: [`Opener::open_object`] on the rest as sealed bytes under a fixed
///   key (never panics; opens only to content with the id asked), then
///   content from the input sealed for real: it opens to itself, and not
///   once any input-chosen byte is flipped, cut or appended, nor under
///   another id, nor past a smaller bound; then input-chosen inner bytes
///   (compression byte and body) sealed as a backup-only key could: no
///   panic, never more than the bound;
/// - `4`: [`envelope::open_with_passphrase`] on the rest, its costs made
///   cheap, then a real envelope: opens with its passphrase only, and not
///   once a byte is flipped;
/// - `5`: [`FetchReceiver`] driven by responses that went through the
///   client codec: yields objects only in the order asked, each with
///   exactly the bytes announced and sent, and is done only when every id
///   asked has been answered.
pub fn repo_formats(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 6 {
        0 => tree_round_trip(rest),
        1 => description_round_trip(rest),
        2 => pack_locate(rest),
        3 => sealed_objects(rest),
        4 => passphrase_envelopes(rest),
        _ => fetch_receiver(rest),
    }
}

fn tree_round_trip(data: &[u8]) {
    let Ok(entries) = tree::decode_tree(data) else {
        return;
    };
    let mut again = entries.clone();
    let encoded = tree::encode_tree(&mut again);
    assert_eq!(again, entries, "a decoded tree was not in order");
    let Ok(back) = tree::decode_tree(&encoded) else {
        panic!("a decoded tree re-encodes to bytes that do not decode");
    };
    assert_eq!(back, entries, "a tree changed through encode and decode");
    assert_eq!(
        tree::encode_tree(&mut back.clone()),
        encoded,
        "encoding a tree is not stable"
    );
    for e in &entries {
        assert!(tree::plain_name(&e.name), "a tree entry with a bad name");
        assert!(e.mode <= 0o7777, "mode bits past 0o7777");
    }
}

fn description_round_trip(data: &[u8]) {
    let Ok(d) = Description::decode(data) else {
        return;
    };
    let encoded = d.encode();
    assert_eq!(
        Description::decode(&encoded).as_ref(),
        Ok(&d),
        "a description changed through encode and decode"
    );
    assert_eq!(encoded, data, "a description re-encodes to other bytes");
}

fn pack_locate(data: &[u8]) {
    let mut input = Input::new(data);
    let count = match input.u8() % 8 {
        0 => usize::from(input.u16()) % (MAX_PACK_OBJECTS + 2),
        _ => usize::from(input.u8() % 6),
    };
    let mut entries = Vec::with_capacity(count);
    for i in 0..count {
        let id = match input.u8() % 8 {
            0 => small_id(&mut input),
            _ => {
                let mut id = [0u8; 32];
                for (to, from) in id.iter_mut().zip((i as u64).to_le_bytes()) {
                    *to = from;
                }
                ObjectId(id)
            }
        };
        let len = match input.u8() % 6 {
            0 => input.u32(),
            1 => OVERHEAD as u32 - 1,
            2 => OVERHEAD as u32,
            3 => MAX_OBJECT_BYTES,
            4 => MAX_OBJECT_BYTES + 1,
            _ => OVERHEAD as u32 + u32::from(input.u16()),
        };
        entries.push(PackEntry { id, len });
    }
    let sum: u64 = entries.iter().map(|e| u64::from(e.len)).sum();
    let received = match input.u8() % 4 {
        0 => u64::from(input.u32()) << (input.u8() % 16),
        1 => sum.wrapping_add(1),
        2 => sum.wrapping_sub(1),
        _ => sum,
    };
    let mut ids = std::collections::HashSet::new();
    let covers = entries.len() <= MAX_PACK_OBJECTS
        && received <= MAX_PACK_BYTES
        && entries
            .iter()
            .all(|e| e.len as usize >= OVERHEAD && e.len <= MAX_OBJECT_BYTES)
        && entries.iter().all(|e| ids.insert(e.id))
        && sum == received;
    match pack::locate(&entries, received) {
        Ok(located) => {
            assert!(covers, "an index that does not cover the pack accepted");
            assert_eq!(located.len(), entries.len(), "objects lost");
            let mut offset = 0u64;
            for (l, e) in located.iter().zip(&entries) {
                assert_eq!((l.id, l.len), (e.id, e.len), "an object changed");
                assert_eq!(l.offset, offset, "objects not back to back");
                offset += u64::from(l.len);
                assert!(offset <= received, "an object past the pack's end");
            }
            assert_eq!(offset, received, "the objects do not reach the end");
        }
        Err(e) => assert!(!covers, "an index that covers the pack refused: {e}"),
    }
}

fn sealed_objects(data: &[u8]) {
    let mut input = Input::new(data);
    let master = master();
    let id_key = master.id_key();
    let mut opener = Opener::new(master.open_key());
    let max = usize::from(input.u16());
    // Arbitrary bytes: whatever opens is content with the id asked.
    let id = match input.u8() % 2 {
        0 => small_id(&mut input),
        _ => id_key.id(input.bytes(8)),
    };
    let len = usize::from(input.u16() % 512);
    let raw = input.bytes(len);
    if let Ok(plain) = opener.open_object(&id_key, &id, raw, max) {
        assert_eq!(id_key.id(&plain), id, "opened content of another id");
        assert!(plain.len() <= max, "opened past the bound");
    }
    // Real content, sealed by a sealer of the key.
    let mut rng = rand::rngs::StdRng::seed_from_u64(u64::from(input.u32()));
    let sealer = Sealer::new(&master.backup_key().seal, &mut rng);
    let plain = match input.u8() % 3 {
        0 => vec![input.u8(); usize::from(input.u16())],
        _ => {
            let n = usize::from(input.u8());
            input.bytes(n).to_vec()
        }
    };
    let id = id_key.id(&plain);
    let mut sealed = Vec::new();
    sealer.seal_object(&id, &plain, &mut sealed);
    let bound = plain.len().max(1);
    assert_eq!(
        opener.open_object(&id_key, &id, &sealed, bound).as_deref(),
        Ok(&plain[..]),
        "sealed content does not open to itself"
    );
    if !plain.is_empty() {
        assert!(
            opener
                .open_object(&id_key, &id, &sealed, plain.len() - 1)
                .is_err(),
            "opened past a smaller bound"
        );
    }
    let other = id_key.id(b"another object");
    assert!(
        opener.open_object(&id_key, &other, &sealed, bound).is_err(),
        "opened under another id"
    );
    let mut altered = sealed.clone();
    let flips = usize::from(input.u8() % 3) + 1;
    for _ in 0..flips {
        let at = usize::from(input.u16()) % altered.len();
        let mask = input.u8().max(1);
        if let Some(b) = altered.get_mut(at) {
            *b ^= mask;
        }
    }
    let cut = usize::from(input.u16()) % sealed.len();
    let mut longer = sealed.clone();
    longer.push(input.u8());
    for bad in [&altered[..], sealed.get(..cut).unwrap_or_default(), &longer] {
        if bad != &sealed[..] {
            assert!(
                opener.open_object(&id_key, &id, bad, bound).is_err(),
                "altered sealed bytes opened"
            );
        }
    }
    // Inner bytes as the input says, behind a valid tag.
    let n = usize::from(input.u16() % 1024);
    let inner = input.bytes(n);
    let id = small_id(&mut input);
    sealed.clear();
    sealer.seal_inner_for_fuzzing(&id, inner, &mut sealed);
    let max = usize::from(input.u16());
    if let Ok(plain) = opener.open_object(&id_key, &id, &sealed, max) {
        assert!(plain.len() <= max, "opened past the bound");
        assert_eq!(id_key.id(&plain), id, "opened content of another id");
    }
}

fn passphrase_envelopes(data: &[u8]) {
    let mut input = Input::new(data);
    let n = usize::from(input.u8() % 16);
    let passphrase = input.bytes(n).to_vec();
    let n = usize::from(input.u8());
    let mut envelope = input.bytes(n).to_vec();
    // Costs the opener accepts may still take a second and a gigabyte:
    // keep them cheap, and keep those it refuses as they are.
    if let Some(costs) = envelope.get_mut(1..13) {
        let at = |c: &[u8], i: usize| {
            c.get(i..i + 4)
                .and_then(|b| <[u8; 4]>::try_from(b).ok())
                .map(u32::from_le_bytes)
                .unwrap_or_default()
        };
        let (m, t, p) = (at(costs, 0), at(costs, 4), at(costs, 8));
        let acceptable =
            (8..=1 << 20).contains(&m) && (1..=10).contains(&t) && (1..=16).contains(&p);
        if acceptable {
            let cheap = [8 + m % 57, 1, 1 + p % 2];
            for (chunk, v) in costs.chunks_exact_mut(4).zip(cheap) {
                chunk.copy_from_slice(&v.to_le_bytes());
            }
        }
    }
    // Never panics; whether it opens depends on how the bytes were made.
    let _ = envelope::open_with_passphrase(&envelope, &passphrase);
    let mut rng = rand::rngs::StdRng::seed_from_u64(u64::from(input.u32()));
    let key = MasterKey::generate(&mut rng);
    let cost = PassphraseCost {
        m_kib: 8,
        t: 1,
        p: 1,
    };
    let Ok(sealed) = envelope::seal_with_passphrase(&key, &passphrase, cost, &mut rng) else {
        panic!("sealing under cheap costs failed");
    };
    assert!(
        matches!(envelope::open_with_passphrase(&sealed, &passphrase), Ok(k) if k.as_bytes() == key.as_bytes()),
        "an envelope does not open with its passphrase"
    );
    let mut wrong = passphrase.clone();
    wrong.push(input.u8());
    assert!(
        matches!(
            envelope::open_with_passphrase(&sealed, &wrong),
            Err(EnvelopeError::WrongPassphrase)
        ),
        "an envelope opened with another passphrase"
    );
    let mut altered = sealed.clone();
    let at = usize::from(input.u8()) % altered.len();
    if let Some(b) = altered.get_mut(at) {
        *b ^= input.u8().max(1);
    }
    assert!(
        envelope::open_with_passphrase(&altered, &passphrase).is_err(),
        "an altered envelope opened"
    );
}

/// Encodes `responses` as a server would and decodes them as the client
/// does, stopping at the first that does not encode or decode.
fn through_client_codec(responses: Vec<Response>) -> Vec<Response> {
    let limits = limits();
    let mut buf = BytesMut::new();
    for r in responses {
        if ServerCodec::with_dialect(limits, Dialect::Secure)
            .encode(&r, &mut buf)
            .is_err()
        {
            break;
        }
    }
    let mut codec = ClientCodec::with_dialect(limits, Dialect::Secure);
    let mut out = Vec::new();
    while let Ok(Some(r)) = codec.decode(&mut buf) {
        out.push(r);
    }
    out
}

fn fetch_receiver(data: &[u8]) {
    let mut input = Input::new(data);
    let asked: Vec<ObjectId> = (0..input.u8() % 6).map(|_| small_id(&mut input)).collect();
    let responses = if input.bool() {
        // Raw bytes as they would come off the connection.
        let mut buf = BytesMut::from(input.bytes(usize::MAX));
        let mut codec = ClientCodec::with_dialect(limits(), Dialect::Secure);
        let mut out = Vec::new();
        while let Ok(Some(r)) = codec.decode(&mut buf) {
            out.push(r);
        }
        out
    } else {
        // A server that mostly answers in order, as the input says.
        let mut out = Vec::new();
        let mut next = 0usize;
        while !input.is_empty() {
            let due = asked.get(next).copied();
            let id = match (input.u8() % 4, due) {
                (0, _) | (_, None) => small_id(&mut input),
                (_, Some(id)) => id,
            };
            match input.u8() % 8 {
                0 => out.push(Response::Repo(RepoResponse::ObjectMissing { id })),
                1 => out.push(Response::GeneralError),
                2 => {
                    let n = usize::from(input.u8() % 64) + 1;
                    out.push(Response::Repo(RepoResponse::ObjectData {
                        content: Bytes::copy_from_slice(&vec![input.u8(); n]),
                    }));
                }
                _ => {
                    let len = u32::from(input.u8() % 200) + 1;
                    out.push(Response::Repo(RepoResponse::ObjectBegin { id, len }));
                    let mut left = len as usize;
                    while left > 0 {
                        let n = (usize::from(input.u8()) + 1).min(left);
                        left -= n;
                        out.push(Response::Repo(RepoResponse::ObjectData {
                            content: Bytes::copy_from_slice(&vec![input.u8(); n]),
                        }));
                    }
                }
            }
            next += 1;
        }
        through_client_codec(out)
    };
    let mut receiver = FetchReceiver::new(&asked);
    let mut yielded = 0usize;
    // The object being received as the harness sees it: id, announced
    // length, bytes sent so far.
    let mut current: Option<(ObjectId, u32, Vec<u8>)> = None;
    for response in responses {
        let seen = response.clone();
        match receiver.handle(response) {
            Err(_) => return,
            Ok(got) => {
                match (&seen, &mut current) {
                    (Response::Repo(RepoResponse::ObjectBegin { id, len }), None) => {
                        current = Some((*id, *len, Vec::new()));
                    }
                    (Response::Repo(RepoResponse::ObjectData { content }), Some(c)) => {
                        c.2.extend_from_slice(content);
                    }
                    (Response::Repo(RepoResponse::ObjectMissing { .. }), None) => {}
                    other => panic!("accepted {other:?} out of turn"),
                }
                let Some(fetched) = got else {
                    continue;
                };
                let id = match &fetched {
                    Fetched::Object { id, sealed } => {
                        let Some((cid, len, bytes)) = current.take() else {
                            panic!("an object yielded without its 1666");
                        };
                        assert_eq!(*id, cid, "an object yielded under another id");
                        assert_eq!(sealed.len(), len as usize, "not the bytes announced");
                        assert_eq!(&sealed[..], &bytes[..], "not the bytes sent");
                        *id
                    }
                    Fetched::Missing { id } => *id,
                };
                assert_eq!(
                    asked.get(yielded),
                    Some(&id),
                    "an object yielded out of the order asked"
                );
                yielded += 1;
            }
        }
        assert_eq!(
            receiver.done(),
            yielded == asked.len() && current.is_none(),
            "done disagrees with the objects yielded"
        );
    }
}

/// What the harness expects of the session's repository state.
#[derive(Debug, Default)]
struct Model {
    /// Bytes of the open pack.
    pack: Option<u64>,
    /// References staged, and how many storage said were missing.
    staged: Option<u64>,
    /// A legacy upload's content arrived and is not committed or discarded.
    upload: bool,
}

/// Repository requests (and legacy uploads) through a proven secure
/// [`ServerSession`], with a storage that answers as the input says. The
/// session never panics and:
///
/// - refuses every repository request while a legacy upload is
///   uncommitted, and everything but pack data, its end and "have" while a
///   pack is open;
/// - never lets a pack grow past [`MAX_PACK_BYTES`] (exactly at it passes);
/// - asks storage to store a pack only with an index that covers it (each
///   object in bounds, each id once, back to back to its last byte), and
///   refuses exactly the indexes that do not;
/// - commits a snapshot only with references staged and none missing,
///   refuses with the count missing otherwise, and with "no references"
///   when nothing was staged;
/// - cuts snapshot pages by count and bytes with the cursor of their last;
/// - asks nothing of storage it cannot answer, and takes no answer it did
///   not ask for; every answer fits its request by the client's rules.
pub fn repo_session(data: &[u8]) {
    let mut input = Input::new(data);
    // Packets as large as a sealed object, so that a pack reaches its
    // limit in a few requests (their bytes are sliced from `ZEROS`).
    let limits = crate::limits::Limits {
        max_packet_content: MAX_OBJECT_BYTES as usize,
        ..limits()
    };
    let config = ServerConfig {
        limits,
        ..ServerConfig::default()
    };
    let client_id = ClientId([0x21; 16]);
    let key = AesKey::from_bytes([0x33; 32]);
    let mut session = ServerSession::proven_for_fuzzing(
        config,
        [9; 32],
        client_id,
        valid_name("alice"),
        key.clone(),
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(u64::from(input.u16()));
    let mut model = Model::default();
    let mut upload: Option<(super::Upload, usize)> = None;
    while !input.is_empty() {
        let request = match input.u8() % 15 {
            0 => Request::Repo(RepoRequest::Have {
                ids: small_ids(&mut input),
            }),
            1..=3 => {
                let open = model.pack.unwrap_or(0);
                let room = MAX_PACK_BYTES.saturating_sub(open);
                let len = match input.u8() % 5 {
                    0 => u64::from(input.u16() % 4096) + 1,
                    1 => u64::from(input.u8()) * 65_536 + 1,
                    // Up to the limit exactly, or one past it.
                    2 => room,
                    3 => room + 1,
                    _ => u64::from(input.u16() % 512) + OVERHEAD as u64,
                };
                let len = len.clamp(1, u64::from(MAX_OBJECT_BYTES));
                Request::Repo(RepoRequest::PackData {
                    content: zeros(len as usize),
                })
            }
            4 | 5 => Request::Repo(RepoRequest::PackEnd {
                entries: pack_index(&mut input, model.pack.unwrap_or(0)),
            }),
            6 => Request::Repo(RepoRequest::SnapshotRefs {
                ids: small_ids(&mut input),
            }),
            7 => Request::Repo(RepoRequest::SnapshotCommit {
                time: u64::from(input.u32()),
                meta: zeros(usize::from(input.u8()) + 1),
            }),
            8 => Request::Repo(RepoRequest::Snapshots {
                cursor: u64::from(input.u16()),
            }),
            9 => Request::Repo(RepoRequest::Fetch {
                ids: small_ids(&mut input),
            }),
            10 if input.bool() => Request::Repo(RepoRequest::DeleteKey {
                slot: input.u8() % MAX_KEY_SLOTS as u8,
            }),
            10 => Request::Repo(RepoRequest::PutKey {
                slot: input.u8() % MAX_KEY_SLOTS as u8,
                envelope: zeros(usize::from(input.u8()) + 1),
            }),
            11 => Request::Repo(RepoRequest::GetKeys),
            14 => Request::Repo(RepoRequest::Forget {
                ids: (0..=input.u8() % 4)
                    .map(|_| u64::from(input.u16()))
                    .collect(),
            }),
            12 => {
                if upload.is_none() {
                    let file = file_name(&mut input);
                    upload = Some((honest_upload(&mut input, &key, file, 3000), 0));
                }
                let Some((u, next)) = upload.as_mut() else {
                    return;
                };
                let Some(packet) = u.packets.get(*next).cloned() else {
                    upload = None;
                    continue;
                };
                *next += 1;
                Request::SendFile(packet)
            }
            _ => {
                let file = upload
                    .as_ref()
                    .and_then(|(u, _)| u.packets.first())
                    .map_or_else(|| file_name(&mut input), |p| p.head.file.clone());
                if input.bool() {
                    Request::CrcOk { file }
                } else {
                    Request::CrcAbort { file }
                }
            }
        };
        assert_eq!(
            session.has_uncommitted_upload(),
            model.upload,
            "the session's upload state differs"
        );
        assert_eq!(session.has_open_pack(), model.pack.is_some());
        let repo = match &request {
            Request::Repo(r) => Some(r.clone()),
            _ => None,
        };
        if let Some(r) = &repo {
            assert!(r.check(&limits).is_ok(), "the harness made a bad request");
        }
        let frame = RequestFrame {
            client_id,
            numbering: Numbering::Modern,
            request,
        };
        let result = session.handle(frame, &mut rng);
        let may_in_pack = matches!(
            repo,
            Some(
                RepoRequest::PackData { .. }
                    | RepoRequest::PackEnd { .. }
                    | RepoRequest::Have { .. }
            )
        );
        if model.pack.is_some() && !may_in_pack {
            assert!(result.is_err(), "{repo:?} accepted while a pack is open");
        }
        if model.upload && repo.is_some() {
            assert!(result.is_err(), "{repo:?} accepted during a legacy upload");
        }
        let action = match (result, &repo) {
            (Err(_), Some(RepoRequest::PackData { content })) => {
                let after = model.pack.unwrap_or(0) + content.len() as u64;
                assert!(
                    model.upload || after > MAX_PACK_BYTES,
                    "pack data refused within the limit"
                );
                return;
            }
            (Err(_), Some(RepoRequest::PackEnd { entries })) => {
                if let (Some(size), false) = (model.pack, model.upload) {
                    assert!(
                        !covers(entries, size),
                        "an index that covers the pack refused"
                    );
                }
                return;
            }
            // The shell answers the error and ends the connection.
            (Err(_), _) => return,
            (Ok(action), _) => action,
        };
        match action {
            Action::Repo(action) => {
                let Some(request) = repo else {
                    panic!("a repository action for another request: {action:?}");
                };
                if !repo_action(
                    &mut session,
                    &mut input,
                    &mut model,
                    &limits,
                    request,
                    action,
                ) {
                    return;
                }
            }
            Action::Reply(Response::Repo(r)) => {
                let Some(RepoRequest::SnapshotCommit { .. }) = repo else {
                    panic!("{r:?} answers {repo:?}");
                };
                assert!(
                    model.staged.is_none(),
                    "a commit refused with references staged"
                );
                assert_eq!(
                    r,
                    RepoResponse::SnapshotRefused {
                        reason: CommitRefusal::NO_REFERENCES,
                        missing: 0
                    }
                );
                check_answer(RepoKind::SnapshotCommit, Response::Repo(r));
            }
            other => {
                assert!(repo.is_none(), "{repo:?} answered {other:?}");
                match other {
                    Action::Write { done, .. } => {
                        model.upload = true;
                        if done.is_some() {
                            upload = None;
                        }
                        if input.u8() == 0xff {
                            let _ = session.storage_failed();
                            model = Model::default();
                            upload = None;
                        }
                    }
                    Action::Commit { .. } | Action::Discard { .. } => {
                        model.upload = false;
                        upload = None;
                    }
                    _ => {}
                }
            }
        }
    }
}

/// An index for a pack of `size` bytes: one that covers it when the input
/// says so and it can, else one the input makes up or spoils.
fn pack_index(input: &mut Input<'_>, size: u64) -> Vec<PackEntry> {
    let id = |i: usize| {
        let mut id = [0u8; 32];
        for (to, from) in id.iter_mut().zip((i as u64 + 1).to_le_bytes()) {
            *to = from;
        }
        ObjectId(id)
    };
    let max = u64::from(MAX_OBJECT_BYTES);
    let min = OVERHEAD as u64;
    let mut lens = Vec::new();
    let mut left = size;
    while left > 0 {
        let want = (u64::from(input.u16()) * 64 + min).min(max);
        let mut len = want.min(left);
        // Never leave a tail shorter than an object.
        if left - len < min && left - len > 0 {
            len = if left <= max { left } else { left - min };
        }
        lens.push(len);
        left -= len;
    }
    let mut entries: Vec<PackEntry> = lens
        .iter()
        .enumerate()
        .map(|(i, &len)| PackEntry {
            id: id(i),
            len: u32::try_from(len).unwrap_or(u32::MAX),
        })
        .collect();
    match input.u8() % 6 {
        0 => {
            if let Some(e) = entries.get_mut(usize::from(input.u8()) % lens.len().max(1)) {
                e.len = e
                    .len
                    .wrapping_add(u32::from(input.u8() % 3))
                    .wrapping_sub(1);
            }
        }
        1 => {
            if let Some(first) = entries.first().copied() {
                if let Some(last) = entries.last_mut() {
                    last.id = first.id;
                }
            }
        }
        2 => {
            entries.pop();
        }
        3 => {
            let len = u32::from(input.u16()) + 1;
            entries.push(PackEntry {
                id: id(entries.len()),
                len,
            });
        }
        _ => {}
    }
    if entries.is_empty() {
        entries.push(PackEntry {
            id: id(0),
            len: u32::from(input.u16()) + 1,
        });
    }
    entries.truncate(MAX_PACK_OBJECTS);
    entries
}

/// The harness's own reading of "the index covers the pack".
fn covers(entries: &[PackEntry], size: u64) -> bool {
    let mut ids = std::collections::HashSet::new();
    entries.len() <= MAX_PACK_OBJECTS
        && size <= MAX_PACK_BYTES
        && entries
            .iter()
            .all(|e| e.len as usize >= OVERHEAD && e.len <= MAX_OBJECT_BYTES)
        && entries.iter().all(|e| ids.insert(e.id))
        && entries.iter().map(|e| u64::from(e.len)).sum::<u64>() == size
}

/// Encodes an answer as the server does, decodes it as the client does and
/// checks it fits the request by the client's rules.
fn check_answer(kind: RepoKind, response: Response) {
    let decoded = through_client_codec(vec![response.clone()]);
    assert_eq!(
        decoded,
        std::slice::from_ref(&response),
        "an answer does not go through the codecs"
    );
    assert!(
        matches!(answer(kind, response), Ok(Some(_))),
        "an answer that does not fit {kind:?}"
    );
}

/// Checks one repository action against the request and the model, and
/// answers it as the input says. Returns `false` when the connection ends.
fn repo_action(
    session: &mut ServerSession,
    input: &mut Input<'_>,
    model: &mut Model,
    limits: &crate::limits::Limits,
    request: RepoRequest,
    action: RepoAction,
) -> bool {
    let kind = request.kind();
    let outcome = match (request, action) {
        (RepoRequest::Have { ids }, RepoAction::Have { ids: asked, .. }) => {
            assert_eq!(ids, asked, "have changed");
            RepoOutcome::Have((0..ids.len()).map(|_| input.bool()).collect())
        }
        (
            RepoRequest::PackData { content },
            RepoAction::PackData {
                first, content: c, ..
            },
        ) => {
            // The same bytes, not a copy: comparing megabytes of zeros
            // would cost more than the session does.
            assert!(
                content.as_ptr() == c.as_ptr() && content.len() == c.len(),
                "pack data changed"
            );
            assert_eq!(first, model.pack.is_none(), "first flag");
            let after = model.pack.unwrap_or(0) + content.len() as u64;
            assert!(after <= MAX_PACK_BYTES, "a pack grew past the limit");
            model.pack = Some(after);
            assert!(session
                .repo_done(RepoOutcome::PackStored { added: 0 })
                .is_err());
            return true;
        }
        (RepoRequest::PackEnd { entries }, RepoAction::StorePack { size, objects, .. }) => {
            let Some(open) = model.pack.take() else {
                panic!("a pack stored that was never opened");
            };
            assert_eq!(size, open, "a pack stored at another size");
            assert!(size <= MAX_PACK_BYTES, "a pack past the limit stored");
            assert!(
                covers(&entries, size),
                "a pack stored with an index that does not cover it"
            );
            let mut offset = 0;
            for (o, e) in objects.iter().zip(&entries) {
                assert_eq!((o.id, o.len, o.offset), (e.id, e.len, offset));
                offset += u64::from(o.len);
            }
            assert_eq!((objects.len(), offset), (entries.len(), size));
            let pick = input.u8();
            if pick % 4 == 3 {
                // Storage refuses the pack for the client's quota: 1682,
                // and the pack is closed all the same.
                RepoOutcome::QuotaExceeded {
                    stored: u64::from(pick),
                    quota: u64::from(pick) + size - 1,
                    size,
                }
            } else {
                let added = u32::from(pick) % (objects.len() as u32 + 1);
                RepoOutcome::PackStored { added }
            }
        }
        (RepoRequest::SnapshotRefs { ids }, RepoAction::StageRefs { first, ids: s, .. }) => {
            assert_eq!(ids, s, "references changed");
            assert_eq!(first, model.staged.is_none(), "first flag");
            model.staged = Some(model.staged.unwrap_or(0));
            let missing = u32::from(input.u8()) % (ids.len() as u32 + 1);
            match session.repo_done(RepoOutcome::Staged { missing }) {
                Ok(r) => {
                    assert_eq!(r, Response::Repo(RepoResponse::RefsStaged { missing }));
                    check_answer(kind, r);
                }
                Err(e) => panic!("staging not answerable: {e}"),
            }
            model.staged = model.staged.map(|m| m + u64::from(missing));
            return true;
        }
        (RepoRequest::SnapshotCommit { .. }, RepoAction::DropStaged { reply }) => {
            let Some(missing) = model.staged.take() else {
                panic!("a stage dropped that was never staged");
            };
            assert!(missing > 0, "a commit refused with nothing missing");
            assert_eq!(
                reply,
                Response::Repo(RepoResponse::SnapshotRefused {
                    reason: CommitRefusal::MISSING,
                    missing: u32::try_from(missing).unwrap_or(u32::MAX),
                })
            );
            check_answer(kind, reply);
            return true;
        }
        (
            RepoRequest::SnapshotCommit { time, meta },
            RepoAction::CommitSnapshot {
                time: t, meta: m, ..
            },
        ) => {
            assert_eq!((time, meta), (t, m), "commit changed");
            assert_eq!(
                model.staged.take(),
                Some(0),
                "a commit with references missing or none staged"
            );
            RepoOutcome::Committed(match input.u8() % 3 {
                0 => Err((CommitRefusal(input.u8()), input.u32())),
                _ => Ok(u64::from(input.u32())),
            })
        }
        (RepoRequest::Snapshots { cursor }, RepoAction::ListSnapshots { after, limit, .. }) => {
            assert_eq!(after, cursor, "cursor changed");
            assert_eq!(limit, SNAPSHOT_PAGE_ENTRIES + 1, "page size");
            let n = usize::from(input.u16()) % (limit + 1);
            let entries = (0..n)
                .map(|i| SnapshotEntry {
                    id: after + 1 + i as u64,
                    time: i as u64,
                    meta: match input.u8() % 4 {
                        0 => zeros(MAX_SNAPSHOT_META),
                        _ => zeros(usize::from(input.u8()) + 1),
                    },
                })
                .collect::<Vec<_>>();
            if input.u8() % 16 == 0 {
                let _ = session.storage_failed();
                *model = Model::default();
                return false;
            }
            let Ok(Response::Repo(RepoResponse::SnapshotPage {
                next_cursor,
                entries: page,
            })) = session.repo_done(RepoOutcome::Snapshots(entries.clone()))
            else {
                panic!("a listing not answered with a page");
            };
            assert!(page.len() <= SNAPSHOT_PAGE_ENTRIES, "page past its count");
            assert_eq!(page.is_empty(), entries.is_empty(), "an empty page");
            assert_eq!(
                entries.get(..page.len()),
                Some(&page[..]),
                "page not a prefix"
            );
            let bytes: usize = page
                .iter()
                .map(|e| SNAPSHOT_ENTRY_HEAD + e.meta.len())
                .sum();
            assert!(
                page.len() <= 1 || bytes <= SNAPSHOT_PAGE_BYTES,
                "page past its bytes"
            );
            let last = page.last().map_or(0, |e| e.id);
            assert_eq!(
                next_cursor,
                if page.len() < entries.len() { last } else { 0 },
                "next cursor"
            );
            check_answer(
                kind,
                Response::Repo(RepoResponse::SnapshotPage {
                    next_cursor,
                    entries: page,
                }),
            );
            return true;
        }
        (RepoRequest::Fetch { ids }, RepoAction::Fetch { ids: f, packet, .. }) => {
            assert_eq!(ids, f, "fetch changed");
            assert!(
                packet >= 1 && packet <= limits.max_packet_content,
                "fetch packets of {packet} bytes"
            );
            assert!(session.repo_done(RepoOutcome::Have(Vec::new())).is_err());
            return true;
        }
        (
            RepoRequest::PutKey { slot, envelope },
            RepoAction::PutKey {
                slot: s,
                envelope: e,
                reply,
                ..
            },
        ) => {
            assert_eq!((slot, envelope), (s, e), "key changed");
            assert_eq!(reply, Response::Repo(RepoResponse::KeyStored { slot }));
            check_answer(kind, reply);
            check_answer(kind, Response::Repo(RepoResponse::KeyExists { slot }));
            assert!(session.repo_done(RepoOutcome::Keys(Vec::new())).is_err());
            return true;
        }
        (RepoRequest::DeleteKey { slot }, RepoAction::DeleteKey { slot: s, .. }) => {
            assert_eq!(slot, s, "slot changed");
            check_answer(kind, Response::Repo(RepoResponse::KeyDeleted { slot }));
            assert!(session.repo_done(RepoOutcome::Keys(Vec::new())).is_err());
            return true;
        }
        (RepoRequest::GetKeys, RepoAction::GetKeys { .. }) => RepoOutcome::Keys(
            (0..input.u8() % (MAX_KEY_SLOTS as u8 + 1))
                .map(|slot| KeySlot {
                    slot,
                    envelope: zeros(usize::from(input.u8()) + 1),
                })
                .collect(),
        ),
        (RepoRequest::Forget { ids }, RepoAction::Forget { ids: i, .. }) => {
            assert_eq!(ids, i, "forget ids changed");
            RepoOutcome::Forgotten(if input.u8() % 2 == 0 {
                Ok(u32::from(input.u8()))
            } else {
                Err(ForgetRefusal::APPEND_ONLY)
            })
        }
        (request, action) => panic!("{action:?} for {request:?}"),
    };
    match input.u8() % 16 {
        // Storage fails: the shell answers 1607 and ends the connection.
        0 => {
            let _ = session.storage_failed();
            *model = Model::default();
            assert!(!session.has_open_pack(), "a failed pack left open");
            return false;
        }
        // The client sends before the answer: a protocol error.
        1 => {
            let frame = RequestFrame {
                client_id: ClientId([0x21; 16]),
                numbering: Numbering::Modern,
                request: Request::Repo(RepoRequest::GetKeys),
            };
            let mut rng = rand::rngs::StdRng::seed_from_u64(0);
            assert!(
                session.handle(frame, &mut rng).is_err(),
                "a request taken while storage work was pending"
            );
            return false;
        }
        _ => {}
    }
    let expected = match &outcome {
        RepoOutcome::Have(have) => RepoResponse::HaveAnswer { have: have.clone() },
        RepoOutcome::PackStored { added } => RepoResponse::PackStored { added: *added },
        RepoOutcome::QuotaExceeded {
            stored,
            quota,
            size,
        } => RepoResponse::QuotaExceeded {
            stored: *stored,
            quota: *quota,
            size: *size,
        },
        RepoOutcome::Committed(Ok(id)) => RepoResponse::SnapshotCommitted { id: *id },
        RepoOutcome::Committed(Err((reason, missing))) => RepoResponse::SnapshotRefused {
            reason: *reason,
            missing: *missing,
        },
        RepoOutcome::Keys(slots) => RepoResponse::Keys {
            slots: slots.clone(),
        },
        RepoOutcome::Forgotten(Ok(count)) => RepoResponse::Forgotten { count: *count },
        RepoOutcome::Forgotten(Err(reason)) => RepoResponse::ForgetRefused { reason: *reason },
        other => panic!("unexpected outcome {other:?}"),
    };
    match session.repo_done(outcome) {
        Ok(r) => {
            assert_eq!(r, Response::Repo(expected), "the answer is not storage's");
            check_answer(kind, r);
        }
        Err(e) => panic!("storage's answer refused: {e}"),
    }
    assert!(
        session.repo_done(RepoOutcome::Have(Vec::new())).is_err(),
        "an answer taken twice"
    );
    true
}

/// What the passphrase harness's storage holds for the one client.
const LOGIN_PASSPHRASE: &[u8] = b"fuzzing passphrase";

/// A passphrase login (`docs/PROTOCOL.md` §13.6) through a fresh secure
/// [`ServerSession`], with requests and storage answers the input picks,
/// and a real passphrase envelope (cheap costs) as the only one storage
/// may find. The session never panics and:
///
/// - serves nothing before a login is accepted but the login, its
///   signature, a reconnect or a registration, and nothing at all once a
///   signature was refused;
/// - asks storage at most once per connection for a passphrase;
/// - challenges only when storage found a readable envelope, with its
///   costs and salt, and never twice the same challenge on one seed;
/// - accepts exactly the signature of the envelope's login key over this
///   client, challenge and binding, and no other bytes;
/// - once logged in, serves only "have", listings, fetches and key
///   reads: a pack, a commit, a key change, a file or a retrieval request
///   is answered 1651.
pub fn passphrase_login(data: &[u8]) {
    let mut input = Input::new(data);
    let binding = [0x42; 32];
    let cost = PassphraseCost {
        m_kib: 8,
        t: 1,
        p: 1,
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(u64::from(input.u16()));
    let master = master();
    let Ok(sealed) = envelope::seal_with_passphrase(&master, LOGIN_PASSPHRASE, cost, &mut rng)
    else {
        panic!("sealing under cheap costs failed");
    };
    let Ok(head) = envelope::PassphraseHead::parse(&sealed) else {
        panic!("a fresh passphrase envelope does not parse");
    };
    let Ok(keys) = envelope::PassphraseKeys::derive(LOGIN_PASSPHRASE, &head.salt, head.cost) else {
        panic!("the keys of a fresh envelope do not derive");
    };
    let client_id = ClientId([0x21; 16]);
    let mut session = ServerSession::secure(ServerConfig::default(), binding);
    let mut asked = false;
    let mut challenge: Option<[u8; crate::repo::message::CHALLENGE_LEN]> = None;
    let mut logged_in = false;
    while !input.is_empty() {
        let header_id = if input.u8() % 8 == 0 {
            ClientId([input.u8(); 16])
        } else {
            client_id
        };
        let request = match input.u8() % 8 {
            0 => Request::Repo(RepoRequest::PassphraseLogin {
                name: valid_name("alice"),
            }),
            1 => {
                let signature = match (input.u8() % 4, challenge) {
                    (0 | 1, Some(c)) => keys.sign_login(client_id, &c, &binding),
                    (2, Some(c)) => keys.sign_login(client_id, &c, &[0; 32]),
                    _ => {
                        let mut s = [0u8; crate::repo::message::SIGNATURE_LEN];
                        for b in &mut s {
                            *b = input.u8();
                        }
                        s
                    }
                };
                Request::Repo(RepoRequest::PassphraseProve { signature })
            }
            2 => Request::Repo(RepoRequest::GetKeys),
            3 => Request::Repo(RepoRequest::Snapshots {
                cursor: u64::from(input.u8()),
            }),
            4 => Request::Repo(RepoRequest::Fetch {
                ids: small_ids(&mut input),
            }),
            5 => Request::Repo(RepoRequest::PackData { content: zeros(64) }),
            6 => Request::Repo(RepoRequest::PutKey {
                slot: input.u8() % MAX_KEY_SLOTS as u8,
                envelope: Bytes::from(sealed.clone()),
            }),
            _ => Request::Repo(RepoRequest::DeleteKey {
                slot: input.u8() % MAX_KEY_SLOTS as u8,
            }),
        };
        let Request::Repo(repo) = request.clone() else {
            return;
        };
        let frame = RequestFrame {
            client_id: header_id,
            numbering: Numbering::Modern,
            request,
        };
        let result = session.handle(frame, &mut rng);
        let reads = matches!(
            repo,
            RepoRequest::GetKeys | RepoRequest::Snapshots { .. } | RepoRequest::Fetch { .. }
        );
        let action = match result {
            Ok(action) => action,
            Err(e) => {
                if logged_in && !reads {
                    assert_eq!(
                        e.answer(),
                        Response::NotAuthenticated,
                        "a write refused other than by 1651"
                    );
                }
                // The shell answers and ends the connection.
                return;
            }
        };
        match (repo, action) {
            (
                RepoRequest::PassphraseLogin { name },
                Action::Repo(RepoAction::FindPassphrase { name: n }),
            ) => {
                assert!(!asked && !logged_in, "a second passphrase lookup");
                assert_eq!(name, n, "name changed");
                asked = true;
                let found = match input.u8() % 4 {
                    0 => crate::session::server::PassphraseLookup::NotFound,
                    1 => crate::session::server::PassphraseLookup::OverRate,
                    2 => crate::session::server::PassphraseLookup::Found {
                        client_id,
                        envelope: zeros(usize::from(input.u8()) + 1),
                    },
                    _ => crate::session::server::PassphraseLookup::Found {
                        client_id,
                        envelope: Bytes::from(sealed.clone()),
                    },
                };
                let real = matches!(&found, crate::session::server::PassphraseLookup::Found { envelope, .. } if envelope[..] == sealed[..]);
                let Ok(answer) = session.passphrase_found(found, &mut rng) else {
                    panic!("a pending lookup not taken");
                };
                check_answer(RepoKind::PassphraseLogin, answer.clone());
                match answer {
                    Response::Repo(RepoResponse::PassphraseChallenge {
                        client_id: c,
                        cost: k,
                        salt,
                        challenge: ch,
                    }) => {
                        assert!(real, "a challenge without a readable envelope");
                        assert_eq!((c, k, salt), (client_id, head.cost, head.salt));
                        assert_ne!(Some(ch), challenge, "a challenge repeated");
                        challenge = Some(ch);
                    }
                    Response::Repo(RepoResponse::PassphraseRefused { .. }) => {
                        assert!(!real, "a readable envelope refused");
                    }
                    other => panic!("{other:?} answers a passphrase login"),
                }
            }
            (
                RepoRequest::PassphraseProve { signature },
                Action::Reply(Response::Authenticated { client_id: c }),
            ) => {
                let Some(ch) = challenge else {
                    panic!("a login accepted without a challenge");
                };
                assert_eq!(c, client_id, "logged in as another client");
                assert_eq!(header_id, client_id, "a login under another header id");
                assert_eq!(
                    signature,
                    keys.sign_login(client_id, &ch, &binding),
                    "accepted a signature that is not the login key's"
                );
                assert!(!logged_in, "a second login accepted");
                logged_in = true;
                assert!(session.read_only() && session.authenticated());
            }
            (r, Action::Repo(a)) => {
                assert!(
                    logged_in && reads,
                    "{r:?} served as {a:?} before a login or as a write"
                );
                // Storage is not modelled here: the action is dropped, and
                // the session waits for its outcome, refusing the rest.
                if !matches!(a, RepoAction::Fetch { .. }) {
                    return;
                }
            }
            (r, other) => panic!("{r:?} answered {other:?}"),
        }
    }
}
