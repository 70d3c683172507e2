//! The metadata interface: clients and the versions of their files.
//!
//! What a backend (SQLite today, PostgreSQL later) must keep and how it
//! changes; which versions retention removes is decided by
//! [`versions_to_remove`](super::versions_to_remove), not here.

use std::time::SystemTime;

use protocol::message::PublicKeyField;
use protocol::{ClientId, FileName, UserName};

use super::{BlobKey, QuotaSetting, Retention, StorageError};

/// A client as the metadata knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientRecord {
    pub id: ClientId,
    pub name: UserName,
    pub public_key: Option<PublicKeyField>,
    pub registered: SystemTime,
    pub last_seen: SystemTime,
    /// The operator made this client's history append-only: it may add
    /// versions but never delete them, and retention skips it at commit.
    pub append_only: bool,
    /// The public key (SubjectPublicKeyInfo DER) bound at a secure-mode
    /// registration; such a client is never served on the legacy listener.
    pub secure_key: Option<Vec<u8>>,
    /// When the client completed its registration: stored its public key
    /// (legacy) or first proved its key (secure mode). Until then, and
    /// once the grace period is over, its name may be registered anew.
    pub completed_at: Option<SystemTime>,
    /// Its own quota of the snapshot repository (`backup-server quota`).
    pub quota: QuotaSetting,
}

/// A client with the totals of what it stores (operator listings).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientSummary {
    pub client: ClientRecord,
    /// Names with at least one version.
    pub files: u64,
    pub versions: u64,
    /// Plaintext bytes over every version.
    pub bytes: u64,
}

/// The outcome of [`MetaStore::delete_file`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Deletion {
    /// The client has no version of that name.
    NotFound,
    /// Append-only applies: nothing was removed.
    Refused,
    /// These versions were removed; their blobs are for the caller to delete.
    Deleted(Vec<VersionRecord>),
}

/// The outcome of [`MetaStore::register`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Registration {
    Created,
    /// Created, in place of client `stale`, which had registered the name
    /// but never completed, longer ago than the grace period.
    Replaced {
        stale: ClientId,
    },
    NameTaken,
}

/// A committed upload to record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewVersion {
    pub client: ClientId,
    /// The name exactly as the client sent it.
    pub file: FileName,
    pub blob: BlobKey,
    /// Plaintext bytes.
    pub size: u64,
    /// Ciphertext bytes as sent (the legacy "content size").
    pub content_size: u64,
    /// POSIX cksum of the plaintext, as confirmed by the client.
    pub cksum: u32,
    pub sha256: [u8; 32],
    pub stored_at: SystemTime,
}

/// A version to record together with others
/// ([`MetaStore::add_versions`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingVersion {
    pub version: NewVersion,
    pub retention: Retention,
    /// The content itself, for a small file kept in the metadata under
    /// `version.blob` (an inline key).
    pub inline: Option<Vec<u8>>,
    /// The quota the server's configuration gives the client (`None`:
    /// none); its own setting overrides it. The version is refused when,
    /// with its retention applied, it would leave the client above its
    /// quota and storing more than before (`docs/PROTOCOL.md` §13.9).
    pub quota: Option<u64>,
}

/// One committed version of a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VersionRecord {
    /// Increases with every commit, across all files.
    pub version: i64,
    pub client: ClientId,
    pub file: FileName,
    pub blob: BlobKey,
    pub size: u64,
    pub content_size: u64,
    pub cksum: u32,
    pub sha256: [u8; 32],
    /// The client confirmed the cksum (always true for a committed version;
    /// kept for the legacy `files.Verified` column).
    pub verified: bool,
    pub stored_at: SystemTime,
}

/// Clients and file versions.
pub trait MetaStore: Send + Sync + 'static {
    /// A cheap read that shows the store answers now (`/readyz`); the
    /// default says yes.
    ///
    /// # Errors
    /// Why it does not.
    fn probe(&self) -> Result<(), StorageError> {
        Ok(())
    }

    /// Creates client `id` named `name` (bound to `secure_key` for a
    /// secure-mode registration), unless the name is taken. With a `grace`,
    /// a name whose client never completed its registration
    /// ([`ClientRecord::completed_at`]), registered at least `grace` before
    /// `now` and holding no file, is not taken: that client is removed and
    /// the new one created in one transaction, so of two registrations
    /// racing for a stale name exactly one wins (`docs/PROTOCOL.md` §6.1).
    ///
    /// # Errors
    /// On a backend failure (including an id collision); nothing changes
    /// then.
    fn register_client(
        &self,
        id: ClientId,
        name: &UserName,
        secure_key: Option<&[u8]>,
        now: SystemTime,
        grace: Option<std::time::Duration>,
    ) -> Result<Registration, StorageError>;

    /// Creates client `id` named `name`, unless the name is taken (by any
    /// client, complete or not).
    ///
    /// # Errors
    /// On a backend failure (including an id collision).
    fn register(
        &self,
        id: ClientId,
        name: &UserName,
        now: SystemTime,
    ) -> Result<Registration, StorageError> {
        self.register_client(id, name, None, now, None)
    }

    /// Creates client `id` named `name` bound to `secure_key` (a secure-mode
    /// registration), unless the name is taken; the same transaction as
    /// [`MetaStore::register`].
    ///
    /// # Errors
    /// On a backend failure (including an id collision).
    fn register_with_key(
        &self,
        id: ClientId,
        name: &UserName,
        secure_key: &[u8],
        now: SystemTime,
    ) -> Result<Registration, StorageError> {
        self.register_client(id, name, Some(secure_key), now, None)
    }

    /// Records that client `id` completed its registration (a secure-mode
    /// client proved its key), unless it already had; `false` if there is
    /// no such client.
    ///
    /// # Errors
    /// On a backend failure.
    fn complete(&self, id: ClientId, now: SystemTime) -> Result<bool, StorageError>;

    /// Stores the public key of client `id`, which completes its
    /// registration; `false` if there is no such client.
    ///
    /// # Errors
    /// On a backend failure.
    fn set_public_key(
        &self,
        id: ClientId,
        key: &PublicKeyField,
        now: SystemTime,
    ) -> Result<bool, StorageError>;

    /// Client `id`, if known.
    ///
    /// # Errors
    /// On a backend failure or an unreadable row.
    fn client(&self, id: ClientId) -> Result<Option<ClientRecord>, StorageError>;

    /// Updates the last-seen time of client `id`.
    ///
    /// # Errors
    /// On a backend failure.
    fn touch(&self, id: ClientId, now: SystemTime) -> Result<(), StorageError>;

    /// Records a committed version as the file's latest, atomically, and
    /// drops the versions of that name `retention` does not keep, unless the
    /// client is append-only. Returns the blobs of the dropped versions, for
    /// the caller to delete.
    ///
    /// # Errors
    /// On a backend failure; nothing is recorded then.
    fn add_version(
        &self,
        version: &NewVersion,
        retention: &Retention,
    ) -> Result<Vec<BlobKey>, StorageError>;

    /// [`MetaStore::add_version`] for each member of `batch`, in order, with
    /// one result each, storing the inline content of those that carry it
    /// with their row. All are made durable together (one transaction); a
    /// member that fails leaves the others alone. A member that does not
    /// fit its client's quota ([`PendingVersion::quota`]) fails with
    /// [`StorageError::QuotaExceeded`] and records nothing; members
    /// before it in the batch count against the quota.
    fn add_versions(&self, batch: &[PendingVersion]) -> Vec<Result<Vec<BlobKey>, StorageError>>;

    /// The content stored under inline key `blob`, if any. Content goes
    /// when its version row goes.
    ///
    /// # Errors
    /// On a backend failure.
    fn inline_content(&self, blob: &BlobKey) -> Result<Option<Vec<u8>>, StorageError>;

    /// Every inline key with the length of its content (for
    /// [`Storage::recover`](super::Storage::recover)).
    ///
    /// # Errors
    /// On a backend failure.
    fn inline_blobs(&self) -> Result<Vec<(BlobKey, u64)>, StorageError>;

    /// Removes the content under inline key `blob` (no error if none).
    ///
    /// # Errors
    /// On a backend failure.
    fn delete_inline(&self, blob: &BlobKey) -> Result<(), StorageError>;

    /// Up to `limit` versions of client `id`, ordered by (name bytes,
    /// version), skipping the first `offset`: every version, or only the
    /// newest of each name.
    ///
    /// # Errors
    /// On a backend failure or an unreadable row.
    fn list(
        &self,
        id: ClientId,
        all_versions: bool,
        offset: u64,
        limit: usize,
    ) -> Result<Vec<VersionRecord>, StorageError>;

    /// Version `version` of `file` of client `id` (0: the newest).
    ///
    /// # Errors
    /// On a backend failure or an unreadable row.
    fn find_version(
        &self,
        id: ClientId,
        file: &FileName,
        version: u64,
    ) -> Result<Option<VersionRecord>, StorageError>;

    /// Removes every version of `file` of client `id`, unless `append_only`
    /// is set or the client is append-only.
    ///
    /// # Errors
    /// On a backend failure; nothing is removed then.
    fn delete_file(
        &self,
        id: ClientId,
        file: &FileName,
        append_only: bool,
    ) -> Result<Deletion, StorageError>;

    /// Sets the append-only flag of client `id`; `false` if there is no
    /// such client.
    ///
    /// # Errors
    /// On a backend failure.
    fn set_append_only(&self, id: ClientId, on: bool) -> Result<bool, StorageError>;

    /// Sets the own quota of client `id`; `false` if there is no such
    /// client.
    ///
    /// # Errors
    /// On a backend failure.
    fn set_quota(&self, id: ClientId, quota: QuotaSetting) -> Result<bool, StorageError>;

    /// Every client with its totals, by name.
    ///
    /// # Errors
    /// On a backend failure or an unreadable row.
    fn clients(&self) -> Result<Vec<ClientSummary>, StorageError>;

    /// Applies `retention` at `now` to every name of every client
    /// (append-only ones included) and returns what it removed.
    ///
    /// # Errors
    /// On a backend failure; nothing is removed then.
    fn prune(
        &self,
        retention: &Retention,
        now: SystemTime,
    ) -> Result<Vec<VersionRecord>, StorageError>;

    /// Removes client `id` with all its files and versions; `None` if
    /// there is no such client, else the removed versions.
    ///
    /// # Errors
    /// On a backend failure; nothing is removed then.
    fn remove_client(&self, id: ClientId) -> Result<Option<Vec<VersionRecord>>, StorageError>;

    /// The latest version of `file` of client `id`.
    ///
    /// # Errors
    /// On a backend failure or an unreadable row.
    fn latest(&self, id: ClientId, file: &FileName) -> Result<Option<VersionRecord>, StorageError>;

    /// Every version of `file` of client `id`, oldest first.
    ///
    /// # Errors
    /// On a backend failure or an unreadable row.
    fn versions(&self, id: ClientId, file: &FileName) -> Result<Vec<VersionRecord>, StorageError>;

    /// Every version of every file, for reconciliation with the blobs.
    ///
    /// # Errors
    /// On a backend failure or an unreadable row.
    fn all_versions(&self) -> Result<Vec<VersionRecord>, StorageError>;

    /// Up to `limit` recorded blobs (one per version row) with the size
    /// their row records, ordered by key (byte order), after `after`: how
    /// [`Storage::recover`](super::Storage::recover) pages through the rows.
    ///
    /// # Errors
    /// On a backend failure or an unreadable row.
    fn recorded_blobs(
        &self,
        after: Option<&BlobKey>,
        limit: usize,
    ) -> Result<Vec<(BlobKey, u64)>, StorageError>;

    /// Up to `limit` inline keys with the length of their content, ordered
    /// by key (byte order), after `after`.
    ///
    /// # Errors
    /// On a backend failure.
    fn inline_blobs_after(
        &self,
        after: Option<&BlobKey>,
        limit: usize,
    ) -> Result<Vec<(BlobKey, u64)>, StorageError>;

    /// Forgets the versions stored in `blobs` (their content is lost).
    /// Returns how many were forgotten.
    ///
    /// # Errors
    /// On a backend failure.
    fn forget_blobs(&self, blobs: &[BlobKey]) -> Result<usize, StorageError>;
}
