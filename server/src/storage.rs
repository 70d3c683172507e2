//! Where clients and their files are kept.
//!
//! Two small interfaces keep protocol handling independent of the backend:
//!
//! * [`MetaStore`]: clients and the versions of their files. The default is
//!   [`sqlite::SqliteMetaStore`] (`<data>/backup.db`, WAL).
//! * [`BlobStore`]: file contents. The default is [`fs::FsBlobStore`]:
//!   `<data>/clients/<client-hex>/blobs/<random-hex>`, written through
//!   `<data>/clients/<client-hex>/tmp/`.
//!
//! Both are blocking; the async shell calls them from blocking threads.
//! [`Storage`] ties them together with the two operations that need both:
//! [`Storage::commit`] and the start-up [`Storage::recover`].
//!
//! Durability: content goes to a temporary blob that is flushed and synced
//! before the server answers 1603; on "CRC ok" the blob is renamed into
//! place and its directory synced, and only then is the version row
//! inserted. A crash at any point leaves the previous version or the new
//! one; a blob without a row (crash between rename and insert) and leftover
//! temporaries are removed by [`Storage::recover`] on the next start.
//!
//! A client's file name is only ever a label in the metadata: blob keys are
//! generated, so nothing a client sends can name a path.

pub mod fs;
pub mod sqlite;

use std::io::Read;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use protocol::message::PublicKeyField;
use protocol::{ClientId, FileName, UserName};

/// Why a storage operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("database: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("invalid blob key {0:?}")]
    BadKey(String),
    #[error("metadata is inconsistent: {0}")]
    Corrupt(String),
    #[error("storage worker failed: {0}")]
    Worker(String),
}

impl StorageError {
    pub(crate) fn io(op: &'static str, path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            op,
            path: path.to_owned(),
            source,
        }
    }
}

/// Where a committed blob lives, opaque outside its [`BlobStore`]. For the
/// file system store it is a path relative to the data directory.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobKey(pub String);

impl std::fmt::Display for BlobKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A client as the metadata knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientRecord {
    pub id: ClientId,
    pub name: UserName,
    pub public_key: Option<PublicKeyField>,
    pub registered: SystemTime,
    pub last_seen: SystemTime,
}

/// The outcome of [`MetaStore::register`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Registration {
    Created,
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
    /// Creates client `id` named `name`, unless the name is taken.
    ///
    /// # Errors
    /// On a backend failure (including an id collision).
    fn register(
        &self,
        id: ClientId,
        name: &UserName,
        now: SystemTime,
    ) -> Result<Registration, StorageError>;

    /// Stores the public key of client `id`; `false` if there is no such
    /// client.
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
    /// drops the oldest versions beyond `keep` (at least 1). Returns the
    /// blobs of the dropped versions, for the caller to delete.
    ///
    /// # Errors
    /// On a backend failure; nothing is recorded then.
    fn add_version(&self, version: &NewVersion, keep: u32) -> Result<Vec<BlobKey>, StorageError>;

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

    /// Forgets the versions stored in `blobs` (their content is lost).
    /// Returns how many were forgotten.
    ///
    /// # Errors
    /// On a backend failure.
    fn forget_blobs(&self, blobs: &[BlobKey]) -> Result<usize, StorageError>;
}

/// Content being written: invisible until published.
pub trait BlobWriter: Send {
    /// Appends `bytes`.
    ///
    /// # Errors
    /// On an I/O failure; the blob is then unusable.
    fn write(&mut self, bytes: &[u8]) -> Result<(), StorageError>;

    /// Makes everything written durable (still invisible). Dropping a
    /// writer without finishing discards it.
    ///
    /// # Errors
    /// On an I/O failure.
    fn finish(self: Box<Self>) -> Result<Box<dyn StagedBlob>, StorageError>;
}

/// Durable content waiting for the client's verdict. Dropping it discards
/// the content.
pub trait StagedBlob: Send {
    /// Makes the content visible under a fresh key, durably.
    ///
    /// # Errors
    /// On an I/O failure; the content is discarded then.
    fn publish(self: Box<Self>) -> Result<BlobKey, StorageError>;
}

/// What [`BlobStore::recover`] found.
#[derive(Debug, Default, Clone)]
pub struct BlobInventory {
    /// Committed-looking blobs with their sizes.
    pub blobs: Vec<(BlobKey, u64)>,
    /// Temporaries of interrupted uploads that were removed.
    pub removed_temporaries: usize,
}

/// File contents, per client.
pub trait BlobStore: Send + Sync + 'static {
    /// Starts a new blob for `client`.
    ///
    /// # Errors
    /// On an I/O failure.
    fn create(&self, client: ClientId) -> Result<Box<dyn BlobWriter>, StorageError>;

    /// Reads a committed blob.
    ///
    /// # Errors
    /// When the key is not one of this store's or the blob cannot be opened.
    fn open(&self, key: &BlobKey) -> Result<Box<dyn Read + Send>, StorageError>;

    /// Removes a committed blob (no error if it is already gone).
    ///
    /// # Errors
    /// When the key is not one of this store's or removal fails.
    fn delete(&self, key: &BlobKey) -> Result<(), StorageError>;

    /// At start-up, with no upload in progress: removes every temporary and
    /// lists the committed blobs.
    ///
    /// # Errors
    /// On an I/O failure.
    fn recover(&self) -> Result<BlobInventory, StorageError>;
}

/// What [`Storage::recover`] repaired.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RecoveryReport {
    pub removed_temporaries: usize,
    /// Blobs on disk without a version row (a crash between publishing and
    /// recording): removed.
    pub removed_orphans: usize,
    /// Version rows whose blob is missing or has the wrong size: forgotten.
    pub forgotten_versions: usize,
}

/// Metadata and blobs together.
#[derive(Clone)]
pub struct Storage {
    meta: Arc<dyn MetaStore>,
    blobs: Arc<dyn BlobStore>,
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
        Self { meta, blobs }
    }

    /// The default backends under `data_dir` (created if missing): SQLite
    /// metadata in `backup.db` and blobs under `clients/`. Does not run
    /// [`recover`](Self::recover).
    ///
    /// # Errors
    /// When the directory or the database cannot be opened or migrated.
    pub fn open_local(data_dir: &Path) -> Result<Self, StorageError> {
        let blobs = fs::FsBlobStore::open(data_dir)?;
        let meta = sqlite::SqliteMetaStore::open(&data_dir.join(Self::DATABASE))?;
        Ok(Self::new(Arc::new(meta), Arc::new(blobs)))
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
    /// keeping at most `keep` versions. Superseded blobs are deleted after
    /// the new version is recorded.
    ///
    /// # Errors
    /// When publishing or recording fails; the new content is then removed
    /// and the previous version stays the latest.
    pub fn commit(
        &self,
        staged: Box<dyn StagedBlob>,
        mut version: NewVersion,
        keep: u32,
    ) -> Result<BlobKey, StorageError> {
        let key = staged.publish()?;
        version.blob = key.clone();
        match self.meta.add_version(&version, keep.max(1)) {
            Ok(superseded) => {
                for old in superseded {
                    if let Err(e) = self.blobs.delete(&old) {
                        // Left as an orphan; the next start-up removes it.
                        tracing::warn!(blob = %old, cause = %e, "could not delete a superseded blob");
                    }
                }
                Ok(key)
            }
            Err(e) => {
                if let Err(del) = self.blobs.delete(&key) {
                    tracing::warn!(blob = %key, cause = %del, "could not delete an unrecorded blob");
                }
                Err(e)
            }
        }
    }

    /// Reads the whole latest version of `file` (tests and tools; the
    /// server itself never reads content back).
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
        self.blobs
            .open(&v.blob)?
            .read_to_end(&mut out)
            .map_err(|e| StorageError::io("read", Path::new(&v.blob.0), e))?;
        Ok(Some(out))
    }

    /// Brings metadata and blobs back into agreement after a crash or kill.
    /// Must run before any connection is served: it removes every
    /// temporary, every blob without a version row, and every version row
    /// whose blob is missing or has the wrong size.
    ///
    /// # Errors
    /// On a backend failure.
    pub fn recover(&self) -> Result<RecoveryReport, StorageError> {
        let inventory = self.blobs.recover()?;
        let on_disk: std::collections::HashMap<BlobKey, u64> =
            inventory.blobs.into_iter().collect();
        let rows = self.meta.all_versions()?;
        let mut recorded = std::collections::HashSet::new();
        let mut broken = Vec::new();
        for row in rows {
            match on_disk.get(&row.blob) {
                Some(&size) if size == row.size => {
                    recorded.insert(row.blob);
                }
                found => {
                    tracing::warn!(
                        blob = %row.blob,
                        expected = row.size,
                        found = ?found,
                        "version row without its blob; forgetting it"
                    );
                    broken.push(row.blob);
                }
            }
        }
        let forgotten_versions = if broken.is_empty() {
            0
        } else {
            self.meta.forget_blobs(&broken)?
        };
        let mut removed_orphans = 0;
        for key in on_disk.keys().filter(|k| !recorded.contains(*k)) {
            self.blobs.delete(key)?;
            removed_orphans += 1;
        }
        Ok(RecoveryReport {
            removed_temporaries: inventory.removed_temporaries,
            removed_orphans,
            forgotten_versions,
        })
    }
}
