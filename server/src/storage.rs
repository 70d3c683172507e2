//! Where clients and their files are kept.
//!
//! Two small interfaces keep protocol handling independent of the backend:
//!
//! * [`MetaStore`]: clients and the versions of their files. The default is
//!   [`sqlite::SqliteMetaStore`] (`<data>/backup.db`, WAL).
//! * [`BlobStore`]: file contents. The default is [`fs::FsBlobStore`]:
//!   `<data>/clients/<client-hex>/blobs/<random-hex>`, written through
//!   `<data>/clients/<client-hex>/tmp/`; with `--blob-store s3://...`,
//!   [`object::ObjectBlobStore`] (an S3 bucket, through `object_store`).
//!   [`Storage::open`] picks one by [`BlobLocation`].
//!
//! Both are blocking, on purpose (the reasons and the cost for an object
//! store are in `server/README.md`, "Sync or async"); the async shell calls
//! them from blocking threads. [`Storage`] ties them together: ingest and
//! commit ([`Storage::begin_upload`], [`Storage::commit_upload`], see the
//! `ingest` module), reads, deletes, and the start-up [`Storage::recover`].
//! The blob interface (explicit abort, the durability barrier) is
//! described in the `blob` module.
//!
//! Durability: content goes to a temporary blob that is flushed and synced
//! before the server answers 1603 (a file of at most [`INLINE_MAX`] bytes
//! stays in memory instead, and is inserted with its row); on "CRC ok" the
//! blob is renamed into
//! place and its directory synced, and only then is the version row
//! inserted (uploads committing at the same moment share the folder sync
//! and the SQLite transaction). A crash at any point leaves the previous
//! version or the new one; a blob without a row (crash between rename and insert) and leftover
//! temporaries are removed by [`Storage::recover`] on the next start.
//!
//! A client's file name is only ever a label in the metadata: blob keys are
//! generated, so nothing a client sends can name a path.

mod blob;
pub mod fs;
mod group;
pub(crate) mod ingest;
pub mod memory;
mod meta;
pub mod object;
pub mod postgres;
pub mod prune;
pub mod quota;
mod recovery;
pub mod repo;
mod retention;
pub mod sqlite;
mod verified;

use std::io::Read;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use protocol::{ClientId, FileName};

pub use blob::{BlobListing, BlobStore, BlobWriter, StagedBlob};
pub use ingest::{CommitPolicy, UploadCommit};
pub use meta::{
    ClientRecord, ClientSummary, Deletion, MetaStore, NewVersion, PendingVersion, Registration,
    VersionRecord,
};
pub use postgres::PgMetaStore;
pub use quota::{QuotaSetting, QuotaUsage, RepoUsage, SnapshotUsage};
pub use recovery::RecoveryReport;
pub use repo::{NewPack, ObjectPlace, PackUpload, RepoStore, StageId};
pub use retention::{versions_to_remove, Retention, VersionStamp};
pub use verified::VerifiedReader;

/// Files of at most this many bytes are kept in the metadata database, in
/// the same transaction as their version row, instead of as a file of their
/// own: a small file then costs no file creation, no sync of its own and no
/// folder sync, only its share of a group commit. SQLite reads and writes
/// blobs of this size faster than a file system does.
pub const INLINE_MAX: u64 = 64 * 1024;

/// A backend's own error, kept as the source of a [`StorageError`] for the
/// log; nothing outside the backend looks into it.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a storage operation failed, in terms every backend can map onto
/// (a local directory and SQLite today; an object store or PostgreSQL
/// later). The backend's own error stays attached as the source, for the
/// log; the peer only ever gets a generic error answer.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// Reading or writing failed (disk, network, database engine).
    #[error("{op} {what}: {source}")]
    Io {
        op: &'static str,
        what: String,
        #[source]
        source: BoxError,
    },
    /// What was asked for is not there (a blob, inline content).
    #[error("{op} {what}: not found")]
    NotFound { op: &'static str, what: String },
    /// The backend is out of space or over its quota.
    #[error("{op} {what}: storage is full: {source}")]
    Full {
        op: &'static str,
        what: String,
        #[source]
        source: BoxError,
    },
    /// The backend is busy, locked or unreachable for now; the same
    /// operation may succeed later.
    #[error("{op}: storage unavailable: {source}")]
    Unavailable {
        op: &'static str,
        #[source]
        source: BoxError,
    },
    /// A uniqueness or concurrency rule refused the change (another writer
    /// got there first); nothing changed.
    #[error("{op}: conflict: {source}")]
    Conflict {
        op: &'static str,
        #[source]
        source: BoxError,
    },
    /// Stored data contradicts itself or the schema.
    #[error("metadata is inconsistent: {0}")]
    Corrupt(String),
    /// A blob read back does not match its row (see
    /// [`Storage::open_verified`]).
    #[error("blob {blob} does not match its recorded size {size} and SHA-256 ({found})")]
    Damaged {
        blob: String,
        size: u64,
        found: String,
    },
    /// A key that is not one of this store's.
    #[error("invalid blob key {0:?}")]
    BadKey(String),
    #[error("storage worker failed: {0}")]
    Worker(String),
    /// A commit shared with other uploads failed as a whole.
    #[error("group commit failed: {0}")]
    Batch(String),
    /// Storing `size` more bytes would take the client, which stores
    /// `stored` bytes, over its quota (`docs/PROTOCOL.md` §13.9); nothing
    /// was recorded.
    #[error("the client's quota of {quota} bytes would be exceeded: it stores {stored} and {size} more were offered")]
    QuotaExceeded { stored: u64, quota: u64, size: u64 },
    /// The data directory's database refers to blobs in another store
    /// than the one it was opened with (see [`Storage::open`]).
    #[error("this data directory's database refers to blobs in {recorded}, but the server was given {given}: refusing to open it, since recovery would take every row for one whose content is lost (fix --blob-store / --s3-endpoint, or edit {marker} after moving the blobs)")]
    WrongBlobStore {
        recorded: String,
        given: String,
        marker: String,
    },
}

impl StorageError {
    /// Maps a failed file system operation on `path`: a missing file is
    /// [`NotFound`](Self::NotFound), a full disk or quota
    /// [`Full`](Self::Full), anything else [`Io`](Self::Io).
    pub(crate) fn io(op: &'static str, path: &Path, source: std::io::Error) -> Self {
        let what = path.display().to_string();
        if source.kind() == std::io::ErrorKind::NotFound {
            return Self::NotFound { op, what };
        }
        if is_full(&source) {
            return Self::Full {
                op,
                what,
                source: source.into(),
            };
        }
        Self::Io {
            op,
            what,
            source: source.into(),
        }
    }
}

/// Whether an I/O error means "no space left" or "over quota".
fn is_full(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}

/// 32 lower-case hex digits that sort by creation time: 16 of nanoseconds
/// since the epoch, then 16 random. Keys made this way land next to each
/// other in the database's key indexes, so a commit of many files writes a
/// few index pages instead of one per file; the random half keeps them
/// unique and unguessable.
pub(crate) fn ordered_hex() -> String {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    let random: [u8; 8] = rand::random();
    format!("{nanos:016x}{}", hex::encode(random))
}

/// Where a committed blob lives, opaque outside its [`BlobStore`]. For the
/// file system store it is a path relative to the data directory.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobKey(pub String);

impl BlobKey {
    /// Prefix of the keys of content kept in the metadata.
    const INLINE_PREFIX: &'static str = "inline/";

    /// A fresh key for content kept in the metadata.
    pub fn new_inline() -> Self {
        Self(format!("{}{}", Self::INLINE_PREFIX, ordered_hex()))
    }

    /// Whether the content under this key is kept in the metadata (a small
    /// file) rather than in the [`BlobStore`].
    pub fn is_inline(&self) -> bool {
        self.0.starts_with(Self::INLINE_PREFIX)
    }
}

impl std::fmt::Display for BlobKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where file contents are kept (`--blob-store`); the metadata stays in
/// the data directory either way.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum BlobLocation {
    /// [`fs::FsBlobStore`] under the data directory.
    #[default]
    Local,
    /// [`object::ObjectBlobStore`] in an S3 bucket, at AWS or at
    /// `endpoint` (an S3-compatible service).
    S3 {
        location: object::S3Location,
        endpoint: Option<String>,
    },
}

impl std::fmt::Display for BlobLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Local => f.write_str("local"),
            Self::S3 { location, .. } => location.fmt(f),
        }
    }
}

/// Where the metadata is kept (`--meta`).
#[derive(Clone, Default, PartialEq, Eq)]
pub enum MetaLocation {
    /// [`sqlite::SqliteMetaStore`] in the data directory, for one server.
    #[default]
    Sqlite,
    /// [`postgres::PgMetaStore`] at this URL, which several servers may
    /// share (`docs/SCALING.md`). The URL may hold a password: it is shown
    /// only through [`postgres::redact`].
    Postgres(String),
}

impl std::fmt::Debug for MetaLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Sqlite => f.write_str("Sqlite"),
            Self::Postgres(url) => write!(f, "Postgres({})", postgres::redact(url)),
        }
    }
}

impl std::fmt::Display for MetaLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Sqlite => f.write_str("sqlite"),
            Self::Postgres(url) => f.write_str(&postgres::redact(url)),
        }
    }
}

/// How long a blob without a row must have existed before start-up
/// recovery of a shared repository removes it: another server may have
/// published it a moment ago and be about to record it.
pub const SHARED_ORPHAN_AGE: std::time::Duration = std::time::Duration::from_secs(3600);

/// This machine's name, as the kernel has it (empty if unknown).
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

/// Metadata and blobs together.
#[derive(Clone)]
pub struct Storage {
    meta: Arc<dyn MetaStore>,
    blobs: Arc<dyn BlobStore>,
    /// The repository's metadata when several servers may share it
    /// (PostgreSQL): recovery and maintenance then allow for the others.
    shared: Option<Arc<postgres::PgMetaStore>>,
    /// The repository extension's metadata, when this storage keeps one.
    repo: Option<Arc<dyn RepoStore>>,
    commits: Arc<group::GroupCommit>,
    policy: CommitPolicy,
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Storage").finish_non_exhaustive()
    }
}

impl Storage {
    /// Name of the SQLite database inside the data directory.
    pub const DATABASE: &'static str = "backup.db";

    /// Storage over any pair of backends.
    pub fn new(meta: Arc<dyn MetaStore>, blobs: Arc<dyn BlobStore>) -> Self {
        Self {
            meta,
            blobs,
            shared: None,
            repo: None,
            commits: Arc::default(),
            policy: CommitPolicy::default(),
        }
    }

    /// The same storage, committing uploads under `policy` (see
    /// [`Storage::commit_upload`]); the default keeps everything.
    #[must_use]
    pub fn with_policy(mut self, policy: CommitPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// The same storage, keeping the repository extension's metadata in
    /// `repo` (see the `repo` module).
    #[must_use]
    pub fn with_repo(mut self, repo: Arc<dyn RepoStore>) -> Self {
        self.repo = Some(repo);
        self
    }

    /// The default backends under `data_dir` (created if missing): SQLite
    /// metadata in `backup.db` and blobs under `clients/`. Does not run
    /// [`recover`](Self::recover).
    ///
    /// # Errors
    /// When the directory or the database cannot be opened or migrated.
    pub fn open_local(data_dir: &Path) -> Result<Self, StorageError> {
        let blobs = fs::FsBlobStore::open(data_dir)?;
        let meta = Arc::new(sqlite::SqliteMetaStore::open(
            &data_dir.join(Self::DATABASE),
        )?);
        Ok(Self::new(meta.clone(), Arc::new(blobs)).with_repo(meta))
    }

    /// The file in the data directory that names the blob store its
    /// database refers to (see [`open`](Self::open)).
    pub const BLOB_STORE_MARKER: &'static str = "blob-store";

    /// SQLite metadata in `data_dir` (created if missing) and blobs where
    /// `blobs` says. Does not run [`recover`](Self::recover).
    ///
    /// The data directory records which blob store its database refers to
    /// ([`BLOB_STORE_MARKER`](Self::BLOB_STORE_MARKER), written when the
    /// database is new; a directory from before the marker kept its blobs
    /// locally). Opening it with another store is refused: recovery would
    /// take every row for one whose blob is lost, and every blob of the
    /// other store for an orphan.
    ///
    /// # Errors
    /// When the directory, the database or the blob store cannot be opened,
    /// and [`StorageError::WrongBlobStore`].
    pub fn open(data_dir: &Path, blobs: &BlobLocation) -> Result<Self, StorageError> {
        Self::open_with(data_dir, blobs, &MetaLocation::Sqlite)
    }

    /// Metadata where `meta` says and blobs where `blobs` says; `data_dir`
    /// holds the SQLite database (if that is the metadata) and local blobs.
    /// Does not run [`recover`](Self::recover).
    ///
    /// With PostgreSQL the database itself records which blob store it
    /// refers to (the first server to open it records its own), and every
    /// server must be given the same; a local blob store is recorded with
    /// its host and directory, so that a second server elsewhere is
    /// refused rather than served from a disk that lacks the blobs.
    ///
    /// # Errors
    /// When the directory, the database or the blob store cannot be opened,
    /// and [`StorageError::WrongBlobStore`].
    pub fn open_with(
        data_dir: &Path,
        blobs: &BlobLocation,
        meta: &MetaLocation,
    ) -> Result<Self, StorageError> {
        let MetaLocation::Postgres(url) = meta else {
            return Self::open_sqlite(data_dir, blobs);
        };
        // The data directory holds this server's identity and locks.
        fs::create_private_dir(data_dir).map_err(|e| StorageError::io("create", data_dir, e))?;
        let pg = Arc::new(postgres::PgMetaStore::open(url)?);
        let given = match blobs {
            BlobLocation::Local => {
                let dir = std::fs::canonicalize(data_dir)
                    .map_err(|e| StorageError::io("resolve", data_dir, e))?;
                format!("local\nhost {}\ndirectory {}\n", host_name(), dir.display())
            }
            BlobLocation::S3 { .. } => Self::blob_store_record(blobs),
        };
        let recorded = pg.claim("blob_store", &given)?;
        if recorded != given {
            return Err(StorageError::WrongBlobStore {
                recorded: recorded.trim_end().replace('\n', ", "),
                given: given.trim_end().replace('\n', ", "),
                marker: format!("the repository table of {}", pg.shown()),
            });
        }
        let store: Arc<dyn BlobStore> = match blobs {
            BlobLocation::Local => Arc::new(fs::FsBlobStore::open(data_dir)?),
            BlobLocation::S3 { location, endpoint } => {
                Arc::new(object::ObjectBlobStore::s3(location, endpoint.as_deref())?)
            }
        };
        let mut storage = Self::new(pg.clone(), store).with_repo(pg.clone());
        storage.shared = Some(pg);
        Ok(storage)
    }

    /// The repository's shared metadata, when several servers may use it.
    pub fn shared(&self) -> Option<&postgres::PgMetaStore> {
        self.shared.as_deref()
    }

    /// Takes the maintenance lock that keeps prune and start-up recovery
    /// apart: the data directory's, and with shared metadata the whole
    /// repository's as well (any server's prune or recovery). Waits for it
    /// when `wait`.
    ///
    /// # Errors
    /// As [`prune::MaintenanceLock::take`] and
    /// [`postgres::PgMetaStore::maintenance_lock`].
    pub fn maintenance_lock(
        &self,
        data_dir: &Path,
        wait: bool,
    ) -> Result<prune::MaintenanceLock, StorageError> {
        let mut lock = prune::MaintenanceLock::take(data_dir, wait)?;
        if let Some(pg) = &self.shared {
            lock.shared = Some(pg.maintenance_lock(wait)?);
        }
        Ok(lock)
    }

    fn open_sqlite(data_dir: &Path, blobs: &BlobLocation) -> Result<Self, StorageError> {
        Self::check_blob_store(data_dir, blobs)?;
        match blobs {
            BlobLocation::Local => Self::open_local(data_dir),
            BlobLocation::S3 { location, endpoint } => {
                let blobs = object::ObjectBlobStore::s3(location, endpoint.as_deref())?;
                fs::create_private_dir(data_dir)
                    .map_err(|e| StorageError::io("create", data_dir, e))?;
                let meta = Arc::new(sqlite::SqliteMetaStore::open(
                    &data_dir.join(Self::DATABASE),
                )?);
                Ok(Self::new(meta.clone(), Arc::new(blobs)).with_repo(meta))
            }
        }
    }

    /// What [`BLOB_STORE_MARKER`](Self::BLOB_STORE_MARKER) holds for
    /// `blobs`: the store, and for S3 the endpoint (never credentials: an
    /// endpoint with them is refused by the configuration).
    fn blob_store_record(blobs: &BlobLocation) -> String {
        match blobs {
            BlobLocation::Local => "local\n".to_owned(),
            BlobLocation::S3 { endpoint, .. } => format!(
                "{blobs}\nendpoint {}\n",
                endpoint.as_deref().unwrap_or("AWS S3")
            ),
        }
    }

    /// Refuses a data directory whose database refers to another blob
    /// store; records `blobs` in one whose database is new.
    fn check_blob_store(data_dir: &Path, blobs: &BlobLocation) -> Result<(), StorageError> {
        let marker = data_dir.join(Self::BLOB_STORE_MARKER);
        let given = Self::blob_store_record(blobs);
        let recorded = match std::fs::read_to_string(&marker) {
            Ok(recorded) => recorded,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if data_dir.join(Self::DATABASE).exists() {
                    // Written before the marker existed, when blobs were
                    // always local.
                    Self::blob_store_record(&BlobLocation::Local)
                } else {
                    fs::create_private_dir(data_dir)
                        .map_err(|e| StorageError::io("create", data_dir, e))?;
                    fs::write_durably(&marker, given.as_bytes())?;
                    return Ok(());
                }
            }
            Err(e) => return Err(StorageError::io("read", &marker, e)),
        };
        if recorded == given {
            return Ok(());
        }
        Err(StorageError::WrongBlobStore {
            recorded: recorded.trim_end().replace('\n', ", "),
            given: given.trim_end().replace('\n', ", "),
            marker: marker.display().to_string(),
        })
    }

    /// The metadata backend.
    pub fn meta(&self) -> &dyn MetaStore {
        &*self.meta
    }

    /// The blob backend.
    pub fn blobs(&self) -> &dyn BlobStore {
        &*self.blobs
    }

    /// The blob backend, shared.
    pub fn blobs_arc(&self) -> Arc<dyn BlobStore> {
        Arc::clone(&self.blobs)
    }

    /// Publishes `staged` and records it as the latest version of its file,
    /// then applies `retention` to that name (not for an append-only
    /// client). Dropped blobs are deleted after the new version is recorded.
    /// Commits that arrive together (from several connections) share their
    /// syncs: see the `group` module.
    ///
    /// # Errors
    /// When publishing or recording fails; the new content is then removed
    /// and the previous version stays the latest.
    pub fn commit(
        &self,
        staged: Box<dyn StagedBlob>,
        version: NewVersion,
        retention: &Retention,
    ) -> Result<BlobKey, StorageError> {
        self.commits.commit(
            self,
            group::Content::Blob(staged),
            version,
            *retention,
            None,
        )
    }

    /// [`Storage::commit`] for a small file (at most [`INLINE_MAX`] bytes)
    /// whose content is kept in the metadata with its row.
    ///
    /// # Errors
    /// When recording fails; nothing is stored then.
    pub fn commit_inline(
        &self,
        content: Vec<u8>,
        version: NewVersion,
        retention: &Retention,
    ) -> Result<BlobKey, StorageError> {
        self.commits.commit(
            self,
            group::Content::Inline(content),
            version,
            *retention,
            None,
        )
    }

    /// Whether both backends answer now (a cheap metadata read, the blob
    /// store's own check): what `/readyz` reports.
    ///
    /// # Errors
    /// The first backend's failure.
    pub fn probe(&self) -> Result<(), StorageError> {
        self.meta.probe()?;
        self.blobs.probe()
    }

    /// Opens the content of a committed version, wherever it is kept.
    ///
    /// # Errors
    /// When the key is unknown or the content cannot be opened.
    pub fn open_blob(&self, key: &BlobKey) -> Result<Box<dyn Read + Send>, StorageError> {
        if key.is_inline() {
            let content = self
                .meta
                .inline_content(key)?
                .ok_or_else(|| StorageError::NotFound {
                    op: "open",
                    what: key.0.clone(),
                })?;
            return Ok(Box::new(std::io::Cursor::new(content)));
        }
        self.blobs.open(key)
    }

    /// Opens the content of `version` to be read back checked against its
    /// recorded size and SHA-256: see [`VerifiedReader::next_chunk`], which
    /// reports a mismatch as [`StorageError::Damaged`].
    ///
    /// # Errors
    /// As [`Storage::open_blob`].
    pub fn open_verified(&self, version: &VersionRecord) -> Result<VerifiedReader, StorageError> {
        Ok(VerifiedReader::new(self.open_blob(&version.blob)?, version))
    }

    /// Removes content whose row is gone (or never came): inline content
    /// from the metadata, anything else from the blob store.
    fn delete_blob(&self, key: &BlobKey) -> Result<(), StorageError> {
        if key.is_inline() {
            self.meta.delete_inline(key)
        } else {
            self.blobs.delete(key)
        }
    }

    /// Deletes published blobs that will not be recorded; a failure leaves
    /// an orphan that the next start-up removes, so it is only logged.
    /// (Inline content is written with its row or not at all.)
    fn delete_unrecorded<'a>(&self, keys: impl Iterator<Item = &'a BlobKey>) {
        for key in keys.filter(|k| !k.is_inline()) {
            if let Err(e) = self.delete_blob(key) {
                tracing::warn!(blob = %key, cause = %e, "could not delete an unrecorded blob");
            }
        }
    }

    /// Deletes blobs whose rows are gone; a failure leaves an orphan that
    /// the next start-up removes, so it is only logged. (Inline content went
    /// with its row.)
    fn delete_blobs<'a>(&self, keys: impl Iterator<Item = &'a BlobKey>) {
        for key in keys.filter(|k| !k.is_inline()) {
            if let Err(e) = self.delete_blob(key) {
                tracing::warn!(blob = %key, cause = %e, "could not delete a blob whose version is gone");
            }
        }
    }

    /// Removes every version of `file` of client `id` (rows, then blobs),
    /// unless append-only applies (`append_only`, or the client's flag).
    ///
    /// # Errors
    /// On a backend failure.
    pub fn delete_file(
        &self,
        id: ClientId,
        file: &FileName,
        append_only: bool,
    ) -> Result<Deletion, StorageError> {
        let outcome = self.meta.delete_file(id, file, append_only)?;
        if let Deletion::Deleted(removed) = &outcome {
            self.delete_blobs(removed.iter().map(|v| &v.blob));
        }
        Ok(outcome)
    }

    /// Applies `retention` to every client and name; returns what was
    /// removed.
    ///
    /// # Errors
    /// On a backend failure.
    pub fn prune(
        &self,
        retention: &Retention,
        now: SystemTime,
    ) -> Result<Vec<VersionRecord>, StorageError> {
        let removed = self.meta.prune(retention, now)?;
        self.delete_blobs(removed.iter().map(|v| &v.blob));
        Ok(removed)
    }

    /// Removes client `id`: its rows, then its blobs and folder. `None` if
    /// there is no such client.
    ///
    /// # Errors
    /// On a backend failure.
    pub fn remove_client(&self, id: ClientId) -> Result<Option<Vec<VersionRecord>>, StorageError> {
        let Some(removed) = self.meta.remove_client(id)? else {
            return Ok(None);
        };
        self.delete_blobs(removed.iter().map(|v| &v.blob));
        self.blobs.remove_client(id)?;
        Ok(Some(removed))
    }

    /// Reads the whole latest version of `file` (tests and tools).
    ///
    /// # Errors
    /// On a backend failure.
    pub fn read_latest(
        &self,
        client: ClientId,
        file: &FileName,
    ) -> Result<Option<Vec<u8>>, StorageError> {
        let Some(v) = self.meta.latest(client, file)? else {
            return Ok(None);
        };
        let mut out = Vec::new();
        self.open_blob(&v.blob)?
            .read_to_end(&mut out)
            .map_err(|e| StorageError::io("read", Path::new(&v.blob.0), e))?;
        Ok(Some(out))
    }

    /// Brings metadata and blobs back into agreement after a crash or kill.
    /// Must run before any connection is served: it removes every
    /// temporary, every blob without a version row, and every version row
    /// whose blob is missing or has the wrong size.
    ///
    /// On shared metadata other servers are serving meanwhile, so it
    /// removes only blobs without a row older than [`SHARED_ORPHAN_AGE`],
    /// forgets no row (a row recorded after the listing passed its key
    /// would look lost: such rows are logged, and scrub checks them), and
    /// keeps the references other servers are staging.
    ///
    /// # Errors
    /// On a backend failure.
    pub fn recover(&self) -> Result<RecoveryReport, StorageError> {
        self.recover_in_pages(recovery::PAGE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s3(url: &str, endpoint: &str) -> BlobLocation {
        BlobLocation::S3 {
            location: object::S3Location::parse(url).unwrap(),
            endpoint: Some(endpoint.to_owned()),
        }
    }

    #[test]
    fn a_data_directory_opens_only_with_the_blob_store_its_database_refers_to() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        // A new data directory records its store.
        drop(Storage::open(&data, &BlobLocation::Local).unwrap());
        let marker = data.join(Storage::BLOB_STORE_MARKER);
        assert_eq!(std::fs::read_to_string(&marker).unwrap(), "local\n");
        drop(Storage::open(&data, &BlobLocation::Local).unwrap());
        let other = s3("s3://bucket/prefix", "http://127.0.0.1:9");
        let err = Storage::open(&data, &other).err().unwrap();
        assert!(
            matches!(err, StorageError::WrongBlobStore { ref recorded, ref given, .. }
                if recorded == "local" && given == "s3://bucket/prefix, endpoint http://127.0.0.1:9"),
            "{err}"
        );
        // One from before the marker kept its blobs locally.
        std::fs::remove_file(&marker).unwrap();
        assert!(matches!(
            Storage::open(&data, &other),
            Err(StorageError::WrongBlobStore { .. })
        ));
        drop(Storage::open(&data, &BlobLocation::Local).unwrap());
        // An S3 one refuses another bucket, prefix or endpoint, and local.
        let data = dir.path().join("s3data");
        drop(Storage::open(&data, &other).unwrap());
        drop(Storage::open(&data, &other).unwrap());
        for wrong in [
            s3("s3://bucket/other", "http://127.0.0.1:9"),
            s3("s3://elsewhere/prefix", "http://127.0.0.1:9"),
            s3("s3://bucket/prefix", "http://127.0.0.1:10"),
            BlobLocation::Local,
        ] {
            assert!(
                matches!(
                    Storage::open(&data, &wrong),
                    Err(StorageError::WrongBlobStore { .. })
                ),
                "{wrong}"
            );
        }
        assert!(!data.join("blob-store.tmp").exists());
    }

    #[test]
    fn new_keys_are_unique_hex_led_by_the_time() {
        let keys: Vec<String> = (0..1000).map(|_| ordered_hex()).collect();
        for k in &keys {
            assert_eq!(k.len(), 32, "{k}");
            assert!(k
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        }
        let unique: std::collections::HashSet<_> = keys.iter().collect();
        assert_eq!(unique.len(), keys.len());
        // The first half is the time the key was made, in nanoseconds.
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let made = u128::from_str_radix(&keys[0][..16], 16).unwrap();
        assert!(
            now.abs_diff(made) < 3_600 * 1_000_000_000,
            "{made} against {now}"
        );
        let inline = BlobKey::new_inline();
        assert!(inline.is_inline() && inline.0.len() == "inline/".len() + 32);
        assert!(!BlobKey(format!("clients/{}/blobs/{}", ordered_hex(), ordered_hex())).is_inline());
    }

    #[test]
    fn maps_file_system_errors_onto_neutral_kinds() {
        let path = Path::new("clients/x");
        let missing = StorageError::io("open", path, std::io::ErrorKind::NotFound.into());
        assert!(matches!(missing, StorageError::NotFound { op: "open", .. }));
        let full = StorageError::io("write", path, std::io::ErrorKind::StorageFull.into());
        assert!(matches!(full, StorageError::Full { .. }));
        let other = StorageError::io("write", path, std::io::ErrorKind::PermissionDenied.into());
        assert!(matches!(other, StorageError::Io { .. }));
        assert!(std::error::Error::source(&other).is_some());
        assert_eq!(other.to_string(), "write clients/x: permission denied");
    }
}
