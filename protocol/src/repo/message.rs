//! Messages of the repository extension (`docs/PROTOCOL.md` §13): object
//! queries, pack uploads, snapshot commits, snapshot listing, object
//! fetches and key envelopes. Secure mode only; the legacy listener never
//! sees them.
//!
//! Every payload is length-checked from its header before it is read
//! (the bounds below), and every count is checked against the bytes that
//! carry it, so nothing is allocated by a size a peer merely declares.

use bytes::{BufMut, Bytes};

use crate::limits::Limits;
use crate::name::{UserName, NAME_FIELD_LEN};
use crate::payload::PayloadError;
use crate::repo::envelope::{PassphraseCost, SALT_LEN};
use crate::wire::{u16_le, u32_le, u64_le, ClientId, ResponseCode};

/// Width of an object id: a keyed BLAKE3 hash of the plaintext.
pub const ID_LEN: usize = 32;

/// The most ids one "have", "refs" or "fetch" request may carry.
pub const MAX_IDS: usize = 8192;
/// The most ids one fetch may ask for: the answer streams each object.
pub const MAX_FETCH_IDS: usize = 1024;
/// The most objects one pack may hold.
pub const MAX_PACK_OBJECTS: usize = 16_384;
/// The largest pack, in bytes of sealed objects.
pub const MAX_PACK_BYTES: u64 = 128 << 20;
/// The largest sealed object.
pub const MAX_OBJECT_BYTES: u32 = 16 << 20;
/// The largest sealed snapshot description.
pub const MAX_SNAPSHOT_META: usize = 64 << 10;
/// The largest key envelope.
pub const MAX_ENVELOPE: usize = 4096;
/// The most key envelopes a client may have.
pub const MAX_KEY_SLOTS: usize = 8;
/// The most bytes of snapshot descriptions one page carries (entries are
/// never split, so a page may hold one entry and still be this large).
pub const SNAPSHOT_PAGE_BYTES: usize = 256 << 10;
/// The fixed part of a snapshot page entry: id, time, meta length.
pub const SNAPSHOT_ENTRY_HEAD: usize = 8 + 8 + 4;
/// The most snapshots one "forget" may name.
pub const MAX_FORGET: usize = 1024;
/// The width of one pack index entry: id and sealed length.
pub const PACK_ENTRY_LEN: usize = ID_LEN + 4;
/// Bytes of the server's challenge to a passphrase login.
pub const CHALLENGE_LEN: usize = 32;
/// Bytes of an Ed25519 signature (a passphrase login's proof).
pub const SIGNATURE_LEN: usize = 64;
/// Bytes of a quota refusal (1682): stored, quota and pack size, u64 each.
pub const QUOTA_EXCEEDED_LEN: usize = 24;
/// Bytes of a passphrase challenge: client id, costs, salt, challenge.
pub const PASSPHRASE_CHALLENGE_LEN: usize = 16 + 12 + SALT_LEN + CHALLENGE_LEN;

/// Request codes of the extension.
pub mod code {
    pub const HAVE: u16 = 1260;
    pub const PACK_DATA: u16 = 1261;
    pub const PACK_END: u16 = 1262;
    pub const SNAPSHOT_REFS: u16 = 1263;
    pub const SNAPSHOT_COMMIT: u16 = 1264;
    pub const SNAPSHOTS: u16 = 1265;
    pub const FETCH: u16 = 1266;
    pub const PUT_KEY: u16 = 1267;
    pub const GET_KEYS: u16 = 1268;
    pub const PASSPHRASE_LOGIN: u16 = 1269;
    pub const PASSPHRASE_PROVE: u16 = 1270;
    pub const DELETE_KEY: u16 = 1271;
    pub const FORGET: u16 = 1280;
}

impl ResponseCode {
    pub const HAVE_ANSWER: Self = Self(1660);
    pub const PACK_STORED: Self = Self(1661);
    pub const REFS_STAGED: Self = Self(1662);
    pub const SNAPSHOT_COMMITTED: Self = Self(1663);
    pub const SNAPSHOT_REFUSED: Self = Self(1664);
    pub const SNAPSHOT_PAGE: Self = Self(1665);
    pub const OBJECT_BEGIN: Self = Self(1666);
    pub const OBJECT_MISSING: Self = Self(1667);
    pub const OBJECT_DATA: Self = Self(1668);
    pub const KEYS: Self = Self(1669);
    pub const KEY_STORED: Self = Self(1670);
    pub const KEY_EXISTS: Self = Self(1671);
    pub const PASSPHRASE_CHALLENGE: Self = Self(1672);
    pub const PASSPHRASE_REFUSED: Self = Self(1673);
    pub const KEY_DELETED: Self = Self(1674);
    pub const KEY_KEPT: Self = Self(1675);
    pub const FORGOTTEN: Self = Self(1680);
    pub const FORGET_REFUSED: Self = Self(1681);
    pub const QUOTA_EXCEEDED: Self = Self(1682);
}

/// The slot of the envelope that holds the master key for the client's
/// RSA key: written once, so that two first runs at once cannot each
/// seal under a master key of their own (the second is told 1671 and
/// uses the first's).
pub const MASTER_SLOT: u8 = 0;

/// The slot of the passphrase envelope of the master key: the one a
/// passphrase login (1269) reads its costs, salt and login key from.
pub const PASSPHRASE_SLOT: u8 = 1;

/// An object's id: the keyed hash of its plaintext under the client's id
/// key. The server can compare ids but not invert them.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ObjectId(pub [u8; ID_LEN]);

impl ObjectId {
    /// The id as 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses 64 hex digits.
    ///
    /// # Errors
    /// When the text is not 64 hex digits.
    pub fn from_hex(text: &str) -> Result<Self, hex::FromHexError> {
        let mut id = [0u8; ID_LEN];
        hex::decode_to_slice(text, &mut id)?;
        Ok(Self(id))
    }

    fn read(bytes: &[u8]) -> Self {
        let mut id = [0u8; ID_LEN];
        if let Some(src) = bytes.get(..ID_LEN) {
            id.copy_from_slice(src);
        }
        Self(id)
    }
}

impl std::fmt::Debug for ObjectId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Eight digits name an object well enough in a log.
        write!(f, "{}", &self.to_hex()[..16])
    }
}

/// The kinds of request of the extension, without their payloads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RepoKind {
    Have,
    PackData,
    PackEnd,
    SnapshotRefs,
    SnapshotCommit,
    Snapshots,
    Fetch,
    PutKey,
    GetKeys,
    PassphraseLogin,
    PassphraseProve,
    DeleteKey,
    Forget,
}

impl RepoKind {
    /// The kind of request `code`, if it belongs to the extension.
    pub fn of_code(code: u16) -> Option<Self> {
        Some(match code {
            code::HAVE => Self::Have,
            code::PACK_DATA => Self::PackData,
            code::PACK_END => Self::PackEnd,
            code::SNAPSHOT_REFS => Self::SnapshotRefs,
            code::SNAPSHOT_COMMIT => Self::SnapshotCommit,
            code::SNAPSHOTS => Self::Snapshots,
            code::FETCH => Self::Fetch,
            code::PUT_KEY => Self::PutKey,
            code::GET_KEYS => Self::GetKeys,
            code::PASSPHRASE_LOGIN => Self::PassphraseLogin,
            code::PASSPHRASE_PROVE => Self::PassphraseProve,
            code::DELETE_KEY => Self::DeleteKey,
            code::FORGET => Self::Forget,
            _ => return None,
        })
    }

    /// The wire code.
    pub fn code(self) -> u16 {
        match self {
            Self::Have => code::HAVE,
            Self::PackData => code::PACK_DATA,
            Self::PackEnd => code::PACK_END,
            Self::SnapshotRefs => code::SNAPSHOT_REFS,
            Self::SnapshotCommit => code::SNAPSHOT_COMMIT,
            Self::Snapshots => code::SNAPSHOTS,
            Self::Fetch => code::FETCH,
            Self::PutKey => code::PUT_KEY,
            Self::GetKeys => code::GET_KEYS,
            Self::PassphraseLogin => code::PASSPHRASE_LOGIN,
            Self::PassphraseProve => code::PASSPHRASE_PROVE,
            Self::DeleteKey => code::DELETE_KEY,
            Self::Forget => code::FORGET,
        }
    }

    /// The inclusive range of payload sizes a request of this kind may
    /// declare, checked before the payload is read.
    pub fn payload_bounds(self, limits: &Limits) -> (usize, usize) {
        let ids = |max: usize| (4 + ID_LEN, 4 + max * ID_LEN);
        match self {
            Self::Have | Self::SnapshotRefs => ids(MAX_IDS),
            Self::Fetch => ids(MAX_FETCH_IDS),
            Self::PackData => (1, limits.max_packet_content),
            Self::PackEnd => (4 + PACK_ENTRY_LEN, 4 + MAX_PACK_OBJECTS * PACK_ENTRY_LEN),
            Self::SnapshotCommit => (8 + 1, 8 + MAX_SNAPSHOT_META),
            Self::Snapshots => (8, 8),
            Self::PutKey => (1 + 1, 1 + MAX_ENVELOPE),
            Self::GetKeys => (0, 0),
            Self::PassphraseLogin => (NAME_FIELD_LEN, NAME_FIELD_LEN),
            Self::PassphraseProve => (SIGNATURE_LEN, SIGNATURE_LEN),
            Self::DeleteKey => (1, 1),
            Self::Forget => (2 + 8, 2 + MAX_FORGET * 8),
        }
    }
}

/// One object of a pack, in pack order: its id and its sealed length. The
/// objects of a pack lie back to back from offset 0, so offsets follow
/// from the lengths.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackEntry {
    pub id: ObjectId,
    pub len: u32,
}

/// A request of the extension.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RepoRequest {
    /// 1260: which of these ids does the server hold for this client?
    /// Payload: count u32, then count ids.
    Have { ids: Vec<ObjectId> },
    /// 1261: the next bytes of the pack being uploaded (the first opens one).
    PackData { content: Bytes },
    /// 1262: the pack is complete; its index. Payload: count u32, then count
    /// entries (id, sealed length u32) in pack order.
    PackEnd { entries: Vec<PackEntry> },
    /// 1263: ids the snapshot being built references. Payload as "have".
    SnapshotRefs { ids: Vec<ObjectId> },
    /// 1264: commit the snapshot whose references were staged. Payload:
    /// time u64 (Unix seconds), then the sealed description.
    SnapshotCommit { time: u64, meta: Bytes },
    /// 1265: a page of the client's snapshots after `cursor` (0: from the
    /// start). Payload: cursor u64.
    Snapshots { cursor: u64 },
    /// 1266: the sealed bytes of these objects, in this order.
    Fetch { ids: Vec<ObjectId> },
    /// 1267: store a key envelope in `slot` (replacing one there).
    /// Payload: slot u8, envelope.
    PutKey { slot: u8, envelope: Bytes },
    /// 1268: every key envelope of this client. Empty payload.
    GetKeys,
    /// 1269: log in as the client named `name` with its passphrase
    /// (§13.6); the first request on a connection. Payload: name (255).
    PassphraseLogin { name: UserName },
    /// 1270: the signature of the passphrase login key over the
    /// challenge (§13.6). Payload: signature (64).
    PassphraseProve { signature: [u8; SIGNATURE_LEN] },
    /// 1271: remove the envelope in `slot`. Payload: slot u8.
    DeleteKey { slot: u8 },
    /// 1280: remove these snapshots of this client (§13.8). Payload: count
    /// u16 (1..=1024), then count snapshot ids u64.
    Forget { ids: Vec<u64> },
}

fn size_err(code: u16, actual: usize, expected: &'static str) -> PayloadError {
    PayloadError::Size {
        code,
        actual,
        expected,
    }
}

/// Parses `count u32` followed by exactly `count` ids, at least one and
/// at most `max`.
fn parse_ids(code: u16, payload: &[u8], max: usize) -> Result<Vec<ObjectId>, PayloadError> {
    let err = || size_err(code, payload.len(), "count u32 and that many 32-byte ids");
    let count = u32_le(payload.get(..4).unwrap_or_default()).ok_or_else(err)? as usize;
    if count == 0 || count > max || payload.len() != 4 + count * ID_LEN {
        return Err(err());
    }
    Ok(payload
        .get(4..)
        .unwrap_or_default()
        .chunks_exact(ID_LEN)
        .map(ObjectId::read)
        .collect())
}

/// A fixed-width field whose width the payload bounds already checked
/// (zeros if, against that check, it were not).
fn fixed<const N: usize>(bytes: Option<&[u8]>) -> [u8; N] {
    bytes
        .and_then(|b| <[u8; N]>::try_from(b).ok())
        .unwrap_or([0u8; N])
}

fn write_ids(out: &mut impl BufMut, ids: &[ObjectId]) {
    out.put_u32_le(u32::try_from(ids.len()).unwrap_or(u32::MAX));
    for id in ids {
        out.put_slice(&id.0);
    }
}

impl RepoRequest {
    /// The kind of this request.
    pub fn kind(&self) -> RepoKind {
        match self {
            Self::Have { .. } => RepoKind::Have,
            Self::PackData { .. } => RepoKind::PackData,
            Self::PackEnd { .. } => RepoKind::PackEnd,
            Self::SnapshotRefs { .. } => RepoKind::SnapshotRefs,
            Self::SnapshotCommit { .. } => RepoKind::SnapshotCommit,
            Self::Snapshots { .. } => RepoKind::Snapshots,
            Self::Fetch { .. } => RepoKind::Fetch,
            Self::PutKey { .. } => RepoKind::PutKey,
            Self::GetKeys => RepoKind::GetKeys,
            Self::PassphraseLogin { .. } => RepoKind::PassphraseLogin,
            Self::PassphraseProve { .. } => RepoKind::PassphraseProve,
            Self::DeleteKey { .. } => RepoKind::DeleteKey,
            Self::Forget { .. } => RepoKind::Forget,
        }
    }

    /// Parses a complete payload of a request of `kind`.
    ///
    /// # Errors
    /// When the size is outside the kind's bounds or disagrees with a count.
    pub fn parse(
        kind: RepoKind,
        mut payload: Bytes,
        limits: &Limits,
    ) -> Result<Self, PayloadError> {
        let code = kind.code();
        let (min, max) = kind.payload_bounds(limits);
        if payload.len() < min || payload.len() > max {
            return Err(size_err(code, payload.len(), "the size its code allows"));
        }
        Ok(match kind {
            RepoKind::Have => Self::Have {
                ids: parse_ids(code, &payload, MAX_IDS)?,
            },
            RepoKind::SnapshotRefs => Self::SnapshotRefs {
                ids: parse_ids(code, &payload, MAX_IDS)?,
            },
            RepoKind::Fetch => Self::Fetch {
                ids: parse_ids(code, &payload, MAX_FETCH_IDS)?,
            },
            RepoKind::PackData => Self::PackData { content: payload },
            RepoKind::PackEnd => {
                let err = || size_err(code, payload.len(), "count u32 and 36 bytes per entry");
                let count = u32_le(payload.get(..4).unwrap_or_default()).ok_or_else(err)? as usize;
                if count == 0
                    || count > MAX_PACK_OBJECTS
                    || payload.len() != 4 + count * PACK_ENTRY_LEN
                {
                    return Err(err());
                }
                let entries = payload
                    .get(4..)
                    .unwrap_or_default()
                    .chunks_exact(PACK_ENTRY_LEN)
                    .map(|e| PackEntry {
                        id: ObjectId::read(e),
                        len: u32_le(e.get(ID_LEN..).unwrap_or_default()).unwrap_or_default(),
                    })
                    .collect();
                Self::PackEnd { entries }
            }
            RepoKind::SnapshotCommit => {
                let time = u64_le(payload.get(..8).unwrap_or_default()).unwrap_or_default();
                Self::SnapshotCommit {
                    time,
                    meta: payload.split_off(8),
                }
            }
            RepoKind::Snapshots => Self::Snapshots {
                cursor: u64_le(&payload).unwrap_or_default(),
            },
            RepoKind::PutKey => {
                let slot = payload.first().copied().unwrap_or_default();
                if usize::from(slot) >= MAX_KEY_SLOTS {
                    return Err(size_err(code, payload.len(), "a slot below 8"));
                }
                Self::PutKey {
                    slot,
                    envelope: payload.split_off(1),
                }
            }
            RepoKind::GetKeys => Self::GetKeys,
            RepoKind::PassphraseLogin => Self::PassphraseLogin {
                name: UserName::from_field(&payload, limits.max_name_len)?,
            },
            RepoKind::PassphraseProve => Self::PassphraseProve {
                signature: fixed(Some(&payload)),
            },
            RepoKind::DeleteKey => {
                let slot = payload.first().copied().unwrap_or_default();
                if usize::from(slot) >= MAX_KEY_SLOTS {
                    return Err(size_err(code, payload.len(), "a slot below 8"));
                }
                Self::DeleteKey { slot }
            }
            RepoKind::Forget => {
                let err = || size_err(code, payload.len(), "count u16 and that many u64 ids");
                let count =
                    usize::from(u16_le(payload.get(..2).unwrap_or_default()).ok_or_else(err)?);
                if count == 0 || count > MAX_FORGET || payload.len() != 2 + count * 8 {
                    return Err(err());
                }
                Self::Forget {
                    ids: payload
                        .get(2..)
                        .unwrap_or_default()
                        .chunks_exact(8)
                        .map(|b| u64_le(b).unwrap_or_default())
                        .collect(),
                }
            }
        })
    }

    /// Length of the payload this request encodes to.
    pub fn payload_len(&self) -> usize {
        match self {
            Self::Have { ids } | Self::SnapshotRefs { ids } | Self::Fetch { ids } => {
                4 + ids.len() * ID_LEN
            }
            Self::PackData { content } => content.len(),
            Self::PackEnd { entries } => 4 + entries.len() * PACK_ENTRY_LEN,
            Self::SnapshotCommit { meta, .. } => 8 + meta.len(),
            Self::Snapshots { .. } => 8,
            Self::PutKey { envelope, .. } => 1 + envelope.len(),
            Self::GetKeys => 0,
            Self::PassphraseLogin { .. } => NAME_FIELD_LEN,
            Self::PassphraseProve { .. } => SIGNATURE_LEN,
            Self::DeleteKey { .. } => 1,
            Self::Forget { ids } => 2 + ids.len() * 8,
        }
    }

    /// Checks that the request is within the limits a parser applies; what
    /// an encoder checks before writing.
    ///
    /// # Errors
    /// When a count or size is outside the kind's bounds.
    pub fn check(&self, limits: &Limits) -> Result<(), PayloadError> {
        let (min, max) = self.kind().payload_bounds(limits);
        let len = self.payload_len();
        let ok = match self {
            Self::Have { ids } | Self::SnapshotRefs { ids } => {
                !ids.is_empty() && ids.len() <= MAX_IDS
            }
            Self::Fetch { ids } => !ids.is_empty() && ids.len() <= MAX_FETCH_IDS,
            Self::PackEnd { entries } => !entries.is_empty() && entries.len() <= MAX_PACK_OBJECTS,
            Self::PutKey { slot, .. } | Self::DeleteKey { slot } => {
                usize::from(*slot) < MAX_KEY_SLOTS
            }
            Self::PassphraseLogin { name } => name.as_bytes().len() <= limits.max_name_len,
            Self::Forget { ids } => !ids.is_empty() && ids.len() <= MAX_FORGET,
            _ => true,
        };
        if !ok || len < min || len > max {
            return Err(size_err(
                self.kind().code(),
                len,
                "the size its code allows",
            ));
        }
        Ok(())
    }

    /// Appends the payload to `out`.
    pub fn write_payload(&self, out: &mut impl BufMut) {
        match self {
            Self::Have { ids } | Self::SnapshotRefs { ids } | Self::Fetch { ids } => {
                write_ids(out, ids)
            }
            Self::PackData { content } => out.put_slice(content),
            Self::PackEnd { entries } => {
                out.put_u32_le(u32::try_from(entries.len()).unwrap_or(u32::MAX));
                for e in entries {
                    out.put_slice(&e.id.0);
                    out.put_u32_le(e.len);
                }
            }
            Self::SnapshotCommit { time, meta } => {
                out.put_u64_le(*time);
                out.put_slice(meta);
            }
            Self::Snapshots { cursor } => out.put_u64_le(*cursor),
            Self::PutKey { slot, envelope } => {
                out.put_u8(*slot);
                out.put_slice(envelope);
            }
            Self::GetKeys => {}
            Self::PassphraseLogin { name } => name.write_field(out),
            Self::PassphraseProve { signature } => out.put_slice(signature),
            Self::DeleteKey { slot } => out.put_u8(*slot),
            Self::Forget { ids } => {
                out.put_u16_le(u16::try_from(ids.len()).unwrap_or(u16::MAX));
                for id in ids {
                    out.put_u64_le(*id);
                }
            }
        }
    }
}

/// One snapshot in a listing: the server's id for it, the time the client
/// gave, and the sealed description only the client can read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotEntry {
    pub id: u64,
    pub time: u64,
    pub meta: Bytes,
}

/// Why a snapshot commit was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommitRefusal(pub u8);

impl CommitRefusal {
    /// Some staged references name objects this client does not have.
    pub const MISSING: Self = Self(1);
    /// No reference was staged before the commit.
    pub const NO_REFERENCES: Self = Self(2);
    /// Committing would exceed the client's quota.
    pub const QUOTA: Self = Self(3);
}

/// Why a forget was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ForgetRefusal(pub u8);

impl ForgetRefusal {
    /// The client is append-only: only the operator's retention removes
    /// its snapshots.
    pub const APPEND_ONLY: Self = Self(1);
}

/// A key envelope in a listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeySlot {
    pub slot: u8,
    pub envelope: Bytes,
}

/// Why a passphrase login was refused (1673).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PassphraseRefusal(pub u8);

impl PassphraseRefusal {
    /// No client of that name has a passphrase envelope.
    pub const NO_PASSPHRASE: Self = Self(1);
    /// Too many logins from this address; try again later.
    pub const RATE: Self = Self(2);
}

/// Why an envelope was not removed (1675).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeptReason(pub u8);

impl KeptReason {
    /// This client's history is append-only: its envelopes are kept.
    pub const APPEND_ONLY: Self = Self(1);
    /// Removing it would leave the master key in no envelope the client
    /// can open without its RSA key: slot 0 goes only while slot 1 holds
    /// a passphrase envelope, and slot 1 only while slot 0 holds one.
    pub const LAST_WAY_IN: Self = Self(2);
    /// The slot holds no envelope.
    pub const EMPTY: Self = Self(3);
}

/// A response of the extension.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RepoResponse {
    /// 1660: for each id asked, in order, whether the server holds it.
    /// Payload: count u32, then ceil(count / 8) bytes, bit `i % 8` of byte
    /// `i / 8` for id `i`.
    HaveAnswer { have: Vec<bool> },
    /// 1661: the pack is durable and its objects are recorded; `added` of
    /// them were new. Payload: added u32.
    PackStored { added: u32 },
    /// 1662: the references were staged; `missing` of them name no object
    /// of this client. Payload: missing u32.
    RefsStaged { missing: u32 },
    /// 1663: the snapshot is committed under `id`. Payload: id u64.
    SnapshotCommitted { id: u64 },
    /// 1664: the snapshot was not committed. Payload: reason u8, missing u32.
    SnapshotRefused { reason: CommitRefusal, missing: u32 },
    /// 1665: a page of snapshots. Payload: next cursor u64 (0: last page),
    /// count u16, then per entry id u64, time u64, meta length u32, meta.
    SnapshotPage {
        next_cursor: u64,
        entries: Vec<SnapshotEntry>,
    },
    /// 1666: the next object of a fetch follows in `len` bytes of 1668
    /// packets. Payload: id, len u32.
    ObjectBegin { id: ObjectId, len: u32 },
    /// 1667: the server holds no such object for this client. Payload: id.
    ObjectMissing { id: ObjectId },
    /// 1668: the next slice of the current object.
    ObjectData { content: Bytes },
    /// 1669: the client's key envelopes. Payload: count u8, then per
    /// envelope slot u8, length u16, envelope.
    Keys { slots: Vec<KeySlot> },
    /// 1670: the envelope is stored. Payload: slot u8.
    KeyStored { slot: u8 },
    /// 1671: the slot is written once (slot 0, or any slot of an
    /// append-only client) and already holds an envelope; it was kept.
    /// Payload: slot u8.
    KeyExists { slot: u8 },
    /// 1672: the passphrase login may go on: the client's id, the costs
    /// and salt of its passphrase envelope, and a fresh challenge to sign.
    /// Payload: client id (16), m_cost u32, t_cost u32, p_cost u32,
    /// salt (16), challenge (32).
    PassphraseChallenge {
        client_id: ClientId,
        cost: PassphraseCost,
        salt: [u8; SALT_LEN],
        challenge: [u8; CHALLENGE_LEN],
    },
    /// 1673: no passphrase login. Payload: reason u8.
    PassphraseRefused { reason: PassphraseRefusal },
    /// 1674: the envelope was removed. Payload: slot u8.
    KeyDeleted { slot: u8 },
    /// 1675: the envelope was not removed. Payload: slot u8, reason u8.
    KeyKept { slot: u8, reason: KeptReason },
    /// 1680: `count` of the snapshots named were this client's and are
    /// removed (the others are ignored). Payload: count u32.
    Forgotten { count: u32 },
    /// 1681: nothing was removed. Payload: reason u8.
    ForgetRefused { reason: ForgetRefusal },
    /// 1682: the pack was not stored: with it, the client would store more
    /// than its quota (`docs/PROTOCOL.md` §13.9). Nothing of the pack was
    /// recorded. Payload: stored u64 (bytes the client stores now), quota
    /// u64, size u64 (bytes of the refused pack).
    QuotaExceeded { stored: u64, quota: u64, size: u64 },
}

impl RepoResponse {
    /// The wire code.
    pub fn code(&self) -> ResponseCode {
        match self {
            Self::HaveAnswer { .. } => ResponseCode::HAVE_ANSWER,
            Self::PackStored { .. } => ResponseCode::PACK_STORED,
            Self::RefsStaged { .. } => ResponseCode::REFS_STAGED,
            Self::SnapshotCommitted { .. } => ResponseCode::SNAPSHOT_COMMITTED,
            Self::SnapshotRefused { .. } => ResponseCode::SNAPSHOT_REFUSED,
            Self::SnapshotPage { .. } => ResponseCode::SNAPSHOT_PAGE,
            Self::ObjectBegin { .. } => ResponseCode::OBJECT_BEGIN,
            Self::ObjectMissing { .. } => ResponseCode::OBJECT_MISSING,
            Self::ObjectData { .. } => ResponseCode::OBJECT_DATA,
            Self::Keys { .. } => ResponseCode::KEYS,
            Self::KeyStored { .. } => ResponseCode::KEY_STORED,
            Self::KeyExists { .. } => ResponseCode::KEY_EXISTS,
            Self::PassphraseChallenge { .. } => ResponseCode::PASSPHRASE_CHALLENGE,
            Self::PassphraseRefused { .. } => ResponseCode::PASSPHRASE_REFUSED,
            Self::KeyDeleted { .. } => ResponseCode::KEY_DELETED,
            Self::KeyKept { .. } => ResponseCode::KEY_KEPT,
            Self::Forgotten { .. } => ResponseCode::FORGOTTEN,
            Self::ForgetRefused { .. } => ResponseCode::FORGET_REFUSED,
            Self::QuotaExceeded { .. } => ResponseCode::QUOTA_EXCEEDED,
        }
    }

    /// The inclusive range of payload sizes a response with `code` may
    /// declare, or `None` if the code is not of the extension.
    pub fn payload_bounds(code: ResponseCode, limits: &Limits) -> Option<(usize, usize)> {
        Some(match code {
            ResponseCode::HAVE_ANSWER => (4 + 1, 4 + MAX_IDS.div_ceil(8)),
            ResponseCode::PACK_STORED | ResponseCode::REFS_STAGED => (4, 4),
            ResponseCode::SNAPSHOT_COMMITTED => (8, 8),
            ResponseCode::SNAPSHOT_REFUSED => (5, 5),
            ResponseCode::SNAPSHOT_PAGE => (
                10,
                10 + SNAPSHOT_PAGE_BYTES + SNAPSHOT_ENTRY_HEAD + MAX_SNAPSHOT_META,
            ),
            ResponseCode::OBJECT_BEGIN => (ID_LEN + 4, ID_LEN + 4),
            ResponseCode::OBJECT_MISSING => (ID_LEN, ID_LEN),
            ResponseCode::OBJECT_DATA => (1, limits.max_packet_content),
            ResponseCode::KEYS => (1, 1 + MAX_KEY_SLOTS * (3 + MAX_ENVELOPE)),
            ResponseCode::KEY_STORED
            | ResponseCode::KEY_EXISTS
            | ResponseCode::PASSPHRASE_REFUSED
            | ResponseCode::KEY_DELETED => (1, 1),
            ResponseCode::PASSPHRASE_CHALLENGE => {
                (PASSPHRASE_CHALLENGE_LEN, PASSPHRASE_CHALLENGE_LEN)
            }
            ResponseCode::KEY_KEPT => (2, 2),
            ResponseCode::FORGOTTEN => (4, 4),
            ResponseCode::FORGET_REFUSED => (1, 1),
            ResponseCode::QUOTA_EXCEEDED => (QUOTA_EXCEEDED_LEN, QUOTA_EXCEEDED_LEN),
            _ => return None,
        })
    }

    /// Payload length of this response.
    pub fn payload_len(&self) -> usize {
        match self {
            Self::HaveAnswer { have } => 4 + have.len().div_ceil(8),
            Self::PackStored { .. } | Self::RefsStaged { .. } => 4,
            Self::SnapshotCommitted { .. } => 8,
            Self::SnapshotRefused { .. } => 5,
            Self::SnapshotPage { entries, .. } => {
                10 + entries
                    .iter()
                    .map(|e| SNAPSHOT_ENTRY_HEAD + e.meta.len())
                    .sum::<usize>()
            }
            Self::ObjectBegin { .. } => ID_LEN + 4,
            Self::ObjectMissing { .. } => ID_LEN,
            Self::ObjectData { content } => content.len(),
            Self::Keys { slots } => 1 + slots.iter().map(|s| 3 + s.envelope.len()).sum::<usize>(),
            Self::KeyStored { .. }
            | Self::KeyExists { .. }
            | Self::PassphraseRefused { .. }
            | Self::KeyDeleted { .. } => 1,
            Self::PassphraseChallenge { .. } => PASSPHRASE_CHALLENGE_LEN,
            Self::KeyKept { .. } => 2,
            Self::Forgotten { .. } => 4,
            Self::ForgetRefused { .. } => 1,
            Self::QuotaExceeded { .. } => QUOTA_EXCEEDED_LEN,
        }
    }

    /// Parses a complete payload of a response with `code`.
    ///
    /// # Errors
    /// When the size is wrong for the code or disagrees with a count.
    pub fn parse(
        code: ResponseCode,
        mut payload: Bytes,
        limits: &Limits,
    ) -> Result<Self, PayloadError> {
        let len = payload.len();
        let err = |expected| size_err(code.0, len, expected);
        let (min, max) =
            Self::payload_bounds(code, limits).ok_or_else(|| err("a repository code"))?;
        if len < min || len > max {
            return Err(err("the size its code allows"));
        }
        let u32_at =
            |at: usize| u32_le(payload.get(at..at + 4).unwrap_or_default()).unwrap_or_default();
        Ok(match code {
            ResponseCode::HAVE_ANSWER => {
                let count = u32_at(0) as usize;
                if count == 0 || count > MAX_IDS || len != 4 + count.div_ceil(8) {
                    return Err(err("count u32 and one bit per id"));
                }
                let bits = payload.get(4..).unwrap_or_default();
                // The bits past `count` in the last byte are zero: one
                // answer has one encoding.
                let spare = bits.last().copied().unwrap_or_default() >> (count % 8);
                if count % 8 != 0 && spare != 0 {
                    return Err(err("count u32 and one bit per id, the rest zero"));
                }
                let have = (0..count)
                    .map(|i| bits.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0))
                    .collect();
                Self::HaveAnswer { have }
            }
            ResponseCode::PACK_STORED => Self::PackStored { added: u32_at(0) },
            ResponseCode::REFS_STAGED => Self::RefsStaged { missing: u32_at(0) },
            ResponseCode::SNAPSHOT_COMMITTED => Self::SnapshotCommitted {
                id: u64_le(&payload).unwrap_or_default(),
            },
            ResponseCode::SNAPSHOT_REFUSED => Self::SnapshotRefused {
                reason: CommitRefusal(payload.first().copied().unwrap_or_default()),
                missing: u32_at(1),
            },
            ResponseCode::SNAPSHOT_PAGE => {
                let next_cursor = u64_le(payload.get(..8).unwrap_or_default()).unwrap_or_default();
                let count = u16_le(payload.get(8..10).unwrap_or_default()).unwrap_or_default();
                let mut rest = payload.split_off(10);
                let mut entries = Vec::new();
                for _ in 0..count {
                    let head = rest
                        .get(..SNAPSHOT_ENTRY_HEAD)
                        .ok_or_else(|| err("whole entries"))?;
                    let id = u64_le(head.get(..8).unwrap_or_default()).unwrap_or_default();
                    let time = u64_le(head.get(8..16).unwrap_or_default()).unwrap_or_default();
                    let meta_len =
                        u32_le(head.get(16..20).unwrap_or_default()).unwrap_or_default() as usize;
                    if meta_len == 0
                        || meta_len > MAX_SNAPSHOT_META
                        || rest.len() < SNAPSHOT_ENTRY_HEAD + meta_len
                    {
                        return Err(err("whole entries"));
                    }
                    let mut entry = rest.split_to(SNAPSHOT_ENTRY_HEAD + meta_len);
                    let meta = entry.split_off(SNAPSHOT_ENTRY_HEAD);
                    entries.push(SnapshotEntry { id, time, meta });
                }
                if !rest.is_empty() {
                    return Err(err("exactly count entries"));
                }
                Self::SnapshotPage {
                    next_cursor,
                    entries,
                }
            }
            ResponseCode::OBJECT_BEGIN => {
                let len = u32_at(ID_LEN);
                if len == 0 || len > MAX_OBJECT_BYTES {
                    return Err(err("an object length of 1..=16 MiB"));
                }
                Self::ObjectBegin {
                    id: ObjectId::read(&payload),
                    len,
                }
            }
            ResponseCode::OBJECT_MISSING => Self::ObjectMissing {
                id: ObjectId::read(&payload),
            },
            ResponseCode::OBJECT_DATA => Self::ObjectData { content: payload },
            ResponseCode::KEYS => {
                let count = payload.first().copied().unwrap_or_default();
                let mut rest = payload.split_off(1);
                let mut slots = Vec::new();
                for _ in 0..count {
                    let slot = rest
                        .first()
                        .copied()
                        .ok_or_else(|| err("whole envelopes"))?;
                    let n = usize::from(
                        u16_le(rest.get(1..3).unwrap_or_default())
                            .ok_or_else(|| err("whole envelopes"))?,
                    );
                    if n == 0 || n > MAX_ENVELOPE || rest.len() < 3 + n {
                        return Err(err("whole envelopes"));
                    }
                    let mut one = rest.split_to(3 + n);
                    slots.push(KeySlot {
                        slot,
                        envelope: one.split_off(3),
                    });
                }
                if !rest.is_empty() || slots.len() > MAX_KEY_SLOTS {
                    return Err(err("exactly count envelopes"));
                }
                Self::Keys { slots }
            }
            ResponseCode::KEY_EXISTS => Self::KeyExists {
                slot: payload.first().copied().unwrap_or_default(),
            },
            ResponseCode::PASSPHRASE_CHALLENGE => Self::PassphraseChallenge {
                client_id: ClientId(fixed(payload.get(..16))),
                cost: PassphraseCost {
                    m_kib: u32_at(16),
                    t: u32_at(20),
                    p: u32_at(24),
                },
                salt: fixed(payload.get(28..28 + SALT_LEN)),
                challenge: fixed(payload.get(28 + SALT_LEN..)),
            },
            ResponseCode::PASSPHRASE_REFUSED => Self::PassphraseRefused {
                reason: PassphraseRefusal(payload.first().copied().unwrap_or_default()),
            },
            ResponseCode::KEY_DELETED => Self::KeyDeleted {
                slot: payload.first().copied().unwrap_or_default(),
            },
            ResponseCode::KEY_KEPT => Self::KeyKept {
                slot: payload.first().copied().unwrap_or_default(),
                reason: KeptReason(payload.get(1).copied().unwrap_or_default()),
            },
            ResponseCode::FORGOTTEN => Self::Forgotten { count: u32_at(0) },
            ResponseCode::FORGET_REFUSED => Self::ForgetRefused {
                reason: ForgetRefusal(payload.first().copied().unwrap_or_default()),
            },
            ResponseCode::QUOTA_EXCEEDED => {
                let u64_at = |at: usize| {
                    u64_le(payload.get(at..at + 8).unwrap_or_default()).unwrap_or_default()
                };
                Self::QuotaExceeded {
                    stored: u64_at(0),
                    quota: u64_at(8),
                    size: u64_at(16),
                }
            }
            _ => Self::KeyStored {
                slot: payload.first().copied().unwrap_or_default(),
            },
        })
    }

    /// Appends the payload to `out`.
    pub fn write_payload(&self, out: &mut impl BufMut) {
        match self {
            Self::HaveAnswer { have } => {
                out.put_u32_le(u32::try_from(have.len()).unwrap_or(u32::MAX));
                for byte in have.chunks(8) {
                    let b = byte
                        .iter()
                        .enumerate()
                        .fold(0u8, |acc, (i, h)| acc | (u8::from(*h) << i));
                    out.put_u8(b);
                }
            }
            Self::PackStored { added } => out.put_u32_le(*added),
            Self::RefsStaged { missing } => out.put_u32_le(*missing),
            Self::SnapshotCommitted { id } => out.put_u64_le(*id),
            Self::SnapshotRefused { reason, missing } => {
                out.put_u8(reason.0);
                out.put_u32_le(*missing);
            }
            Self::SnapshotPage {
                next_cursor,
                entries,
            } => {
                out.put_u64_le(*next_cursor);
                out.put_u16_le(u16::try_from(entries.len()).unwrap_or(u16::MAX));
                for e in entries {
                    out.put_u64_le(e.id);
                    out.put_u64_le(e.time);
                    out.put_u32_le(u32::try_from(e.meta.len()).unwrap_or(u32::MAX));
                    out.put_slice(&e.meta);
                }
            }
            Self::ObjectBegin { id, len } => {
                out.put_slice(&id.0);
                out.put_u32_le(*len);
            }
            Self::ObjectMissing { id } => out.put_slice(&id.0),
            Self::ObjectData { content } => out.put_slice(content),
            Self::Keys { slots } => {
                out.put_u8(u8::try_from(slots.len()).unwrap_or(u8::MAX));
                for s in slots {
                    out.put_u8(s.slot);
                    out.put_u16_le(u16::try_from(s.envelope.len()).unwrap_or(u16::MAX));
                    out.put_slice(&s.envelope);
                }
            }
            Self::KeyStored { slot } | Self::KeyExists { slot } | Self::KeyDeleted { slot } => {
                out.put_u8(*slot)
            }
            Self::PassphraseChallenge {
                client_id,
                cost,
                salt,
                challenge,
            } => {
                out.put_slice(&client_id.0);
                out.put_u32_le(cost.m_kib);
                out.put_u32_le(cost.t);
                out.put_u32_le(cost.p);
                out.put_slice(salt);
                out.put_slice(challenge);
            }
            Self::PassphraseRefused { reason } => out.put_u8(reason.0),
            Self::KeyKept { slot, reason } => {
                out.put_u8(*slot);
                out.put_u8(reason.0);
            }
            Self::Forgotten { count } => out.put_u32_le(*count),
            Self::ForgetRefused { reason } => out.put_u8(reason.0),
            Self::QuotaExceeded {
                stored,
                quota,
                size,
            } => {
                out.put_u64_le(*stored);
                out.put_u64_le(*quota);
                out.put_u64_le(*size);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forget_payload(count: usize, declared: u16) -> Bytes {
        let mut out = Vec::new();
        out.put_u16_le(declared);
        for i in 0..count {
            out.put_u64_le(i as u64 + 1);
        }
        Bytes::from(out)
    }

    #[test]
    fn accepts_a_forget_of_exactly_the_most_ids_and_rejects_one_more() {
        let limits = Limits::default();
        let at = forget_payload(MAX_FORGET, MAX_FORGET as u16);
        let parsed = RepoRequest::parse(RepoKind::Forget, at.clone(), &limits).unwrap();
        let mut encoded = Vec::new();
        parsed.write_payload(&mut encoded);
        assert_eq!(encoded, at);
        assert!(parsed.check(&limits).is_ok());
        let over = forget_payload(MAX_FORGET + 1, MAX_FORGET as u16 + 1);
        assert!(RepoRequest::parse(RepoKind::Forget, over, &limits).is_err());
        let ids: Vec<u64> = (0..=MAX_FORGET as u64).collect();
        assert!(RepoRequest::Forget { ids }.check(&limits).is_err());
    }

    #[test]
    fn rejects_a_forget_whose_count_disagrees_with_its_ids_or_is_zero() {
        let limits = Limits::default();
        for payload in [
            forget_payload(2, 3),
            forget_payload(3, 2),
            forget_payload(1, 0),
        ] {
            assert!(RepoRequest::parse(RepoKind::Forget, payload, &limits).is_err());
        }
        assert!(RepoRequest::Forget { ids: Vec::new() }
            .check(&limits)
            .is_err());
    }

    #[test]
    fn rejects_a_have_answer_with_bits_set_past_its_count() {
        let limits = Limits::default();
        // Three ids, all held: bits 0-2. Bit 3 set as well is refused.
        for (bits, ok) in [(0b0000_0111u8, true), (0b0000_1111, false)] {
            let mut payload = 3u32.to_le_bytes().to_vec();
            payload.push(bits);
            let parsed =
                RepoResponse::parse(ResponseCode::HAVE_ANSWER, Bytes::from(payload), &limits);
            assert_eq!(parsed.is_ok(), ok, "{bits:#010b}");
        }
    }

    #[test]
    fn round_trips_a_quota_refusal_and_rejects_any_other_length() {
        let limits = Limits::default();
        let r = RepoResponse::QuotaExceeded {
            stored: 53_687_091_000,
            quota: 50 << 30,
            size: u64::MAX,
        };
        let mut out = Vec::new();
        r.write_payload(&mut out);
        assert_eq!(out.len(), r.payload_len());
        assert_eq!(r.code(), ResponseCode(1682));
        let payload = Bytes::from(out);
        assert_eq!(
            RepoResponse::parse(r.code(), payload.clone(), &limits).unwrap(),
            r
        );
        for len in [0, QUOTA_EXCEEDED_LEN - 1, QUOTA_EXCEEDED_LEN + 1] {
            let mut p = payload.to_vec();
            p.resize(len, 0);
            assert!(
                RepoResponse::parse(ResponseCode::QUOTA_EXCEEDED, p.into(), &limits).is_err(),
                "{len}"
            );
        }
    }

    #[test]
    fn round_trips_the_forget_answers() {
        let limits = Limits::default();
        for r in [
            RepoResponse::Forgotten { count: 7 },
            RepoResponse::ForgetRefused {
                reason: ForgetRefusal::APPEND_ONLY,
            },
        ] {
            let mut out = Vec::new();
            r.write_payload(&mut out);
            assert_eq!(out.len(), r.payload_len());
            assert_eq!(
                RepoResponse::parse(r.code(), out.into(), &limits).unwrap(),
                r
            );
        }
        assert!(RepoResponse::parse(
            ResponseCode::FORGOTTEN,
            Bytes::from_static(&[1, 2, 3]),
            &limits
        )
        .is_err());
    }
}
