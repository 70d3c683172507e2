//! The repository extension's storage (`docs/PROTOCOL.md` §13): packs of
//! sealed objects, the index of where each object lies, snapshots and the
//! objects they reference, and key envelopes. The server holds no key: it
//! stores what clients seal, and knows only ids, sizes and references.
//!
//! Two halves, like the rest of storage:
//!
//! * [`RepoStore`], the metadata: packs, objects, snapshots, staged
//!   references, envelopes. SQLite implements it in `sqlite/repo.rs`; a
//!   PostgreSQL backend would implement the same.
//! * The pack bytes go to the [`BlobStore`](super::BlobStore) like file
//!   contents: [`Storage::begin_pack`] opens a writer, [`PackUpload::write`]
//!   streams and hashes, [`Storage::store_pack`] makes the blob durable
//!   (finish, publish, barrier) and only then records the pack and its
//!   objects in one transaction.
//!
//! Crash safety: an object row exists only once its pack's bytes passed
//! the barrier, so no crash leaves an object without its bytes; a crash
//! between the barrier and the transaction leaves a pack blob without a
//! row, which [`Storage::recover`] removes like any orphan. A snapshot and
//! its references are one transaction that re-checks every reference.
//!
//! Ids are scoped per client: every lookup is by (client, id), so a client
//! can neither read nor probe nor reference another client's objects.

use std::io::Read;
use std::time::SystemTime;

use protocol::repo::message::{CommitRefusal, KeptReason, KeySlot, SnapshotEntry};
use protocol::repo::pack::Located;
use protocol::repo::ObjectId;
use protocol::ClientId;
use sha2::{Digest, Sha256};

use super::{BlobKey, BlobWriter, QuotaUsage, RepoUsage, SnapshotUsage, Storage, StorageError};

/// Names the references staged for one snapshot being built on one
/// connection (random: connections never share one). Staged references
/// live in the metadata, not in memory, so a snapshot of a million objects
/// costs the server no more memory than one of ten.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StageId(pub i64);

impl StageId {
    /// A fresh, random stage id.
    pub fn random() -> Self {
        Self(rand::random::<i64>() & i64::MAX)
    }
}

/// A pack whose bytes are durable under `blob`, to record with its objects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewPack {
    pub client: ClientId,
    pub blob: BlobKey,
    pub size: u64,
    /// SHA-256 of the pack's bytes, for scrubbing without keys.
    pub sha256: [u8; 32],
    pub stored_at: SystemTime,
    /// Each object's place, in pack order.
    pub objects: Vec<Located>,
    /// The quota the server's configuration gives the client (`None`:
    /// none); the client's own setting (`backup-server quota`) overrides
    /// it (`docs/PROTOCOL.md` §13.9).
    pub quota: Option<u64>,
}

/// Where a client's object lies: in pack blob `blob`, `len` bytes from
/// `offset`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectPlace {
    pub blob: BlobKey,
    pub offset: u64,
    pub len: u32,
}

/// How a pack is used, as prune sees it: its live objects (referenced,
/// staged, or touched since the cut-off) and its dead ones.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackUsage {
    /// The pack's row.
    pub id: i64,
    pub client: ClientId,
    pub blob: BlobKey,
    pub size: u64,
    pub live_objects: u64,
    pub live_bytes: u64,
    pub dead_objects: u64,
    pub dead_bytes: u64,
}

/// A recorded pack as scrub reads it: what its bytes must be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedPack {
    /// The pack's row.
    pub id: i64,
    pub client: ClientId,
    pub blob: BlobKey,
    /// Length in bytes when it was stored.
    pub size: u64,
    /// SHA-256 of its bytes when it was stored.
    pub sha256: [u8; 32],
    /// Whether `scrub --repair` has marked it damaged.
    pub damaged: bool,
}

/// What a damaged pack takes with it: its objects, and the snapshots that
/// reference any of them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PackDamage {
    pub objects: u64,
    pub object_bytes: u64,
    pub snapshots: Vec<DamagedSnapshot>,
}

/// A snapshot referencing an object of a damaged pack.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DamagedSnapshot {
    pub id: u64,
    pub client: ClientId,
    /// The client's registered name (lossy UTF-8), empty if unknown.
    pub client_name: String,
}

/// An object of a pack being repacked: its row, and where it lies now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackedObject {
    pub object: i64,
    pub pack: i64,
    pub offset: u64,
    pub len: u32,
}

/// A repacked pack, durable under `blob`, and where each object moved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Repacked {
    pub client: ClientId,
    pub blob: BlobKey,
    pub size: u64,
    pub sha256: [u8; 32],
    /// Each object (row, and the pack it leaves) with its offset in `blob`.
    pub moved: Vec<(PackedObject, u64)>,
    /// The packs it replaces: each must hold no other object.
    pub replaces: Vec<i64>,
}

/// The repository's metadata.
pub trait RepoStore: Send + Sync + 'static {
    /// For each of `ids`, in order, the stored length of the object if
    /// `client` holds it. Every object held is touched, so that a prune
    /// that started before keeps it (`docs/PROTOCOL.md` §13.7).
    ///
    /// # Errors
    /// On a backend failure.
    fn held(&self, client: ClientId, ids: &[ObjectId]) -> Result<Vec<Option<u32>>, StorageError>;

    /// For each of `ids`, in order, whether `client` holds it (as
    /// [`held`](Self::held)).
    ///
    /// # Errors
    /// On a backend failure.
    fn have(&self, client: ClientId, ids: &[ObjectId]) -> Result<Vec<bool>, StorageError> {
        Ok(self
            .held(client, ids)?
            .iter()
            .map(Option::is_some)
            .collect())
    }

    /// Records `pack` and its objects in one transaction; an object the
    /// client already holds keeps its place (skipped, not an error).
    /// Returns how many objects were new. The same transaction charges the
    /// pack's bytes to the client's quota (`docs/PROTOCOL.md` §13.9), so
    /// two packs of one client recorded at once cannot both slip under it.
    ///
    /// # Errors
    /// [`StorageError::QuotaExceeded`] when the pack would take the client
    /// over its quota; on a backend failure. Nothing is recorded then.
    fn add_pack(&self, pack: &NewPack) -> Result<u32, StorageError>;

    /// What `client` stores against its quota, given the quota the
    /// server's configuration gives it.
    ///
    /// # Errors
    /// On a backend failure or an unreadable row.
    fn usage(&self, client: ClientId, configured: Option<u64>) -> Result<QuotaUsage, StorageError>;

    /// Every client that has a pack or a snapshot, with what its
    /// repository holds (the operator's `clients` view).
    ///
    /// # Errors
    /// On a backend failure or an unreadable row.
    fn repo_usage(&self) -> Result<Vec<RepoUsage>, StorageError>;

    /// Every snapshot of `client`, by id, with what it references (the
    /// operator's `snapshots CLIENT` view).
    ///
    /// # Errors
    /// On a backend failure or an unreadable row.
    fn snapshot_usage(&self, client: ClientId) -> Result<Vec<SnapshotUsage>, StorageError>;

    /// Stages, under `stage`, each of `ids` that `client` holds (dropping
    /// whatever was staged before when `first`); returns how many of `ids`
    /// it does not hold.
    ///
    /// # Errors
    /// On a backend failure.
    fn stage_refs(
        &self,
        stage: StageId,
        client: ClientId,
        first: bool,
        ids: &[ObjectId],
    ) -> Result<u32, StorageError>;

    /// Drops the references staged under `stage` (no error if none).
    ///
    /// # Errors
    /// On a backend failure.
    fn drop_stage(&self, stage: StageId) -> Result<(), StorageError>;

    /// In one transaction: checks that every reference staged under
    /// `stage` still names an object of `client`, and that the client does
    /// not store more than its quota (`quota` as the configuration gives
    /// it, overridden by the client's own), records a snapshot with them
    /// and drops the stage. Returns the snapshot's id (unique,
    /// increasing), or why it was refused with how many references are
    /// missing (the stage is dropped either way).
    ///
    /// # Errors
    /// On a backend failure; nothing is recorded then.
    fn commit_snapshot(
        &self,
        stage: StageId,
        client: ClientId,
        time: u64,
        meta: &[u8],
        now: SystemTime,
        quota: Option<u64>,
    ) -> Result<Result<u64, (CommitRefusal, u32)>, StorageError>;

    /// At most `limit` snapshots of `client` with ids above `after`, in id
    /// order.
    ///
    /// # Errors
    /// On a backend failure or an unreadable row.
    fn snapshots(
        &self,
        client: ClientId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<SnapshotEntry>, StorageError>;

    /// For each of `ids`, in order, where `client`'s object lies, if it
    /// holds one.
    ///
    /// # Errors
    /// On a backend failure or an unreadable row.
    fn locate(
        &self,
        client: ClientId,
        ids: &[ObjectId],
    ) -> Result<Vec<Option<ObjectPlace>>, StorageError>;

    /// Stores `envelope` in `client`'s `slot`, replacing any there, but
    /// for [`MASTER_SLOT`](protocol::repo::message::MASTER_SLOT), which is
    /// written once: `false` when it already held an envelope (kept).
    ///
    /// # Errors
    /// On a backend failure.
    /// Under `append_only` (the server's option) or the client's own
    /// append-only flag, every slot is written once.
    fn put_key(
        &self,
        client: ClientId,
        slot: u8,
        envelope: &[u8],
        now: SystemTime,
        append_only: bool,
    ) -> Result<bool, StorageError>;

    /// Removes the envelope in `slot` of `client`, in one transaction
    /// with the checks: not under `append_only` (or the client's flag),
    /// not an empty slot, and not slot 0 or 1 while the other of the two
    /// is empty, which would leave the master key in no envelope the
    /// client can open without its RSA key (`docs/PROTOCOL.md` §13.6).
    ///
    /// # Errors
    /// On a backend failure.
    fn delete_key(
        &self,
        client: ClientId,
        slot: u8,
        append_only: bool,
    ) -> Result<Result<(), KeptReason>, StorageError>;

    /// The completed client named `name` and its passphrase envelope
    /// (slot 1), if it has one: what a passphrase login starts from.
    ///
    /// # Errors
    /// On a backend failure.
    fn passphrase_envelope(
        &self,
        name: &protocol::UserName,
    ) -> Result<Option<(ClientId, Vec<u8>)>, StorageError>;

    /// Every envelope of `client`, by slot.
    ///
    /// # Errors
    /// On a backend failure or an unreadable row.
    fn keys(&self, client: ClientId) -> Result<Vec<KeySlot>, StorageError>;

    /// Up to `limit` recorded packs with their recorded sizes, ordered by
    /// key (byte order), after `after`: how recovery pages through them.
    ///
    /// # Errors
    /// On a backend failure or an unreadable row.
    fn recorded_packs(
        &self,
        after: Option<&BlobKey>,
        limit: usize,
    ) -> Result<Vec<(BlobKey, u64)>, StorageError>;

    /// At start-up: drops every staged reference (their connections are
    /// gone). Returns how many were dropped.
    ///
    /// # Errors
    /// On a backend failure.
    fn clear_stages(&self) -> Result<usize, StorageError>;

    /// Every snapshot of every client: (client, snapshot id, time), by
    /// client.
    ///
    /// # Errors
    /// On a backend failure or an unreadable row.
    fn snapshot_stamps(&self) -> Result<Vec<(ClientId, u64, u64)>, StorageError>;

    /// Removes the snapshots `ids` of `client` and their references, in one
    /// transaction; returns how many there were.
    ///
    /// # Errors
    /// On a backend failure; nothing is removed then.
    fn forget_snapshots(&self, client: ClientId, ids: &[u64]) -> Result<u64, StorageError>;

    /// A client's own forget (1280): as [`RepoStore::forget_snapshots`],
    /// but `None`, with nothing removed, when the client is append-only
    /// (its own flag, or `server_append_only`), checked in the same
    /// transaction.
    ///
    /// # Errors
    /// On a backend failure; nothing is removed then.
    fn client_forget(
        &self,
        client: ClientId,
        ids: &[u64],
        server_append_only: bool,
    ) -> Result<Option<u64>, StorageError>;

    /// Every pack with its live and dead objects, an object being dead when
    /// no snapshot references it, no stage holds it and it was last touched
    /// (stored, or answered "have") before `cutoff` (`docs/PROTOCOL.md`
    /// §13.7).
    ///
    /// # Errors
    /// On a backend failure or an unreadable row.
    fn pack_usage(&self, cutoff: SystemTime) -> Result<Vec<PackUsage>, StorageError>;

    /// Deletes up to `limit` dead objects (as [`RepoStore::pack_usage`]
    /// defines them) with row ids above `after`, deciding and deleting in
    /// one write transaction. Returns how many went, their bytes, and the
    /// last row id examined (`None` when there were no more).
    ///
    /// # Errors
    /// On a backend failure; nothing is deleted then.
    fn delete_dead(
        &self,
        cutoff: SystemTime,
        after: i64,
        limit: usize,
    ) -> Result<(u64, u64, Option<i64>), StorageError>;

    /// Removes every pack row that holds no object, naming its blob in the
    /// trash in the same transaction. Returns how many and their bytes.
    ///
    /// # Errors
    /// On a backend failure; nothing is removed then.
    fn drop_empty_packs(&self, now: SystemTime) -> Result<(u64, u64), StorageError>;

    /// The objects of pack row `pack`, in pack order.
    ///
    /// # Errors
    /// On a backend failure or an unreadable row.
    fn pack_objects(&self, pack: i64) -> Result<Vec<PackedObject>, StorageError>;

    /// Names `blob` in the trash (before it is written, for a repack).
    ///
    /// # Errors
    /// On a backend failure.
    fn trash(&self, blob: &BlobKey, now: SystemTime) -> Result<(), StorageError>;

    /// Up to `limit` blobs in the trash since before `before`.
    ///
    /// # Errors
    /// On a backend failure or an unreadable row.
    fn trash_due(&self, before: SystemTime, limit: usize) -> Result<Vec<BlobKey>, StorageError>;

    /// Takes `blob` out of the trash (once its bytes are deleted).
    ///
    /// # Errors
    /// On a backend failure.
    fn untrash(&self, blob: &BlobKey) -> Result<(), StorageError>;

    /// In one transaction: records `pack`, moves its objects into it, and
    /// removes the packs it replaces (naming their blobs in the trash) and
    /// its own blob from the trash. `false`, with nothing changed, when an
    /// object is no longer where it was or a replaced pack holds another
    /// object.
    ///
    /// # Errors
    /// On a backend failure; nothing is changed then.
    fn replace_packs(&self, pack: &Repacked, now: SystemTime) -> Result<bool, StorageError>;

    /// Up to `limit` recorded packs with a row id above `after`, by row
    /// id, for scrub.
    fn scrub_packs(&self, after: i64, limit: usize) -> Result<Vec<RecordedPack>, StorageError>;

    /// The objects of pack `pack` and the snapshots referencing them, or
    /// `None` when the pack has no row (any more).
    fn pack_damage(&self, pack: i64) -> Result<Option<PackDamage>, StorageError>;

    /// Marks pack `pack` damaged (`scrub --repair`): its objects keep their
    /// rows but are answered missing, and storing one again moves it to
    /// the new pack. Returns whether the pack was sound until now.
    fn mark_damaged(&self, pack: i64, now: SystemTime) -> Result<bool, StorageError>;
}

/// A pack being received: its blob writer and the running SHA-256 of its
/// bytes. It must end in [`Storage::store_pack`] or [`PackUpload::abort`].
pub struct PackUpload {
    client: ClientId,
    writer: Box<dyn BlobWriter>,
    sha256: Sha256,
    bytes: u64,
}

impl std::fmt::Debug for PackUpload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackUpload")
            .field("client", &self.client)
            .field("bytes", &self.bytes)
            .finish_non_exhaustive()
    }
}

impl PackUpload {
    /// Appends `bytes` to the pack.
    ///
    /// # Errors
    /// On a write failure; the upload must then be aborted.
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), StorageError> {
        self.writer.write(bytes)?;
        self.sha256.update(bytes);
        self.bytes += bytes.len() as u64;
        Ok(())
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.bytes
    }

    /// Whether nothing was written yet.
    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    /// Discards the pack.
    ///
    /// # Errors
    /// When the blob store could not discard it (recovery removes it).
    pub fn abort(self) -> Result<(), StorageError> {
        self.writer.abort()
    }
}

impl Storage {
    /// The repository metadata, or `Unavailable` when this storage has none.
    ///
    /// # Errors
    /// When no [`RepoStore`] was configured.
    pub fn repo(&self) -> Result<&dyn RepoStore, StorageError> {
        self.repo
            .as_deref()
            .ok_or_else(|| StorageError::Unavailable {
                op: "repository",
                source: "this storage keeps no repository".into(),
            })
    }

    /// Opens a new pack blob for `client`.
    ///
    /// # Errors
    /// When the storage has no repository or the blob cannot be begun.
    pub fn begin_pack(&self, client: ClientId) -> Result<PackUpload, StorageError> {
        self.repo()?;
        Ok(PackUpload {
            client,
            writer: self.blobs.begin_write(client)?,
            sha256: Sha256::new(),
            bytes: 0,
        })
    }

    /// Makes `pack` durable (finish, publish, barrier) and then records it
    /// with `objects` in one transaction, charged to the client's quota
    /// (`quota` as the configuration gives it); returns how many objects
    /// were new. Nothing is recorded unless the bytes are durable first.
    ///
    /// # Errors
    /// [`StorageError::QuotaExceeded`] when the pack does not fit the
    /// client's quota; when the bytes received are not `size`, or writing
    /// or recording fails. The pack's blob is removed then (or left for
    /// recovery).
    pub fn store_pack(
        &self,
        pack: PackUpload,
        size: u64,
        objects: Vec<Located>,
        now: SystemTime,
        quota: Option<u64>,
    ) -> Result<u32, StorageError> {
        let repo = self.repo()?;
        if pack.bytes != size {
            let received = pack.bytes;
            let _ = pack.abort();
            return Err(StorageError::Corrupt(format!(
                "a pack of {size} bytes was announced but {received} were written"
            )));
        }
        let PackUpload {
            client,
            writer,
            sha256,
            ..
        } = pack;
        let key = writer.finish()?.publish()?;
        let durable = self
            .blobs
            .barrier(std::slice::from_ref(&key))
            .into_iter()
            .next()
            .unwrap_or_else(|| Err(StorageError::Worker("the barrier returned nothing".into())));
        if let Err(e) = durable {
            self.delete_unrecorded(std::iter::once(&key));
            return Err(e);
        }
        let record = NewPack {
            client,
            blob: key,
            size,
            sha256: sha256.finalize().into(),
            stored_at: now,
            objects,
            quota,
        };
        repo.add_pack(&record).inspect_err(|_| {
            self.delete_unrecorded(std::iter::once(&record.blob));
        })
    }

    /// Opens the sealed bytes of an object.
    ///
    /// # Errors
    /// When its pack cannot be opened.
    pub fn open_object(&self, place: &ObjectPlace) -> Result<Box<dyn Read + Send>, StorageError> {
        let end = place.offset + u64::from(place.len);
        self.blobs.open_range(&place.blob, place.offset..end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::repo::ID_LEN;

    fn located(n: u8, offset: u64, len: u32) -> Located {
        Located {
            id: ObjectId([n; ID_LEN]),
            offset,
            len,
        }
    }

    #[test]
    fn records_a_pack_with_the_digest_of_its_bytes_only_once_it_is_whole() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open_local(dir.path()).unwrap();
        let client = ClientId([3; 16]);
        let bytes: Vec<u8> = (0..=255u8).cycle().take(300).collect();

        // Fewer bytes than announced: refused, nothing kept.
        let mut short = storage.begin_pack(client).unwrap();
        short.write(&bytes[..100]).unwrap();
        let err = storage
            .store_pack(
                short,
                300,
                vec![located(1, 0, 300)],
                SystemTime::now(),
                None,
            )
            .unwrap_err();
        assert!(matches!(err, StorageError::Corrupt(_)), "{err}");
        let repo = storage.repo().unwrap();
        assert!(repo.recorded_packs(None, 10).unwrap().is_empty());
        let removed_temporaries = storage.blobs().recover().unwrap();
        let blobs = storage.blobs().list().unwrap().count();
        assert_eq!(
            (blobs, removed_temporaries),
            (0, 0),
            "the writer was aborted"
        );

        let mut pack = storage.begin_pack(client).unwrap();
        for chunk in bytes.chunks(7) {
            pack.write(chunk).unwrap();
        }
        let objects = vec![located(1, 0, 100), located(2, 100, 200)];
        let added = storage
            .store_pack(pack, 300, objects, SystemTime::now(), None)
            .unwrap();
        assert_eq!(added, 2);
        let recorded = repo.recorded_packs(None, 10).unwrap();
        assert_eq!(recorded.len(), 1);
        assert_eq!(recorded[0].1, 300);
        let digest: [u8; 32] = Sha256::digest(&bytes).into();
        let db = rusqlite::Connection::open(dir.path().join(Storage::DATABASE)).unwrap();
        let stored: Vec<u8> = db
            .query_row("SELECT sha256 FROM packs", [], |r| r.get(0))
            .unwrap();
        assert_eq!(stored, digest);
        let place = repo
            .locate(client, &[ObjectId([2; ID_LEN])])
            .unwrap()
            .pop()
            .flatten()
            .unwrap();
        let mut read = Vec::new();
        storage
            .open_object(&place)
            .unwrap()
            .read_to_end(&mut read)
            .unwrap();
        assert_eq!(read, bytes[100..]);
        // Recovery keeps the recorded pack.
        assert_eq!(
            storage.recover().unwrap(),
            super::super::RecoveryReport::default()
        );
        assert_eq!(repo.recorded_packs(None, 10).unwrap(), recorded);
    }
}
