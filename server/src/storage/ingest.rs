//! Ingest: how an upload's content gets into storage, and how it is
//! committed.
//!
//! [`Storage::begin_upload`] starts an [`Upload`]; [`Upload::finish`] gives
//! [`Staged`] content awaiting the client's verdict; on "CRC ok"
//! [`Storage::commit_upload`] records it (choosing blob or inline, and the
//! retention to apply) and otherwise [`Staged::abort`] discards it. The
//! connection handler only calls these.
//!
//! The writer of one upload is a thread of the blocking pool fed through a
//! bounded channel.
//!
//! The connection task decrypts and checksums each packet (in the session
//! machine) and hands the plaintext here; the thread hashes it with SHA-256
//! and writes it to a temporary blob. The channel holds at most
//! [`QUEUE_DEPTH`] batches, so a slow disk stops the connection task from
//! reading, and TCP pushes back on the client: memory per upload stays a
//! small multiple of the packet limit. Small packets are gathered into
//! batches of [`BATCH`] bytes so that the per-message cost stays negligible.
//! Written buffers go to a pool shared by every upload and are reused for
//! the next packets, so a long upload does not allocate (and page-fault) a
//! fresh buffer per packet; the pool is shared, not per upload, so that
//! many connections waiting their turn do not each hold spare buffers.
//!
//! A file of at most [`INLINE_MAX`] bytes takes none of that: it is
//! gathered in memory and committed into the metadata with its row (see
//! [`Storage::commit_inline`]). One
//! that turns out larger than it said moves to a writer thread at that
//! point.

use std::time::{Instant, SystemTime};

use bytes::BytesMut;
use protocol::{ClientId, FileName};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};

use super::{
    BlobKey, BlobStore, NewVersion, QuotaUsage, Retention, StagedBlob, Storage, StorageError,
    INLINE_MAX,
};

/// What a commit applies: the server's retention rules, or none at all
/// when the whole server is append-only (a client's own append-only flag
/// is applied by the metadata backend, see
/// [`versions_to_remove`](super::versions_to_remove)).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CommitPolicy {
    pub retention: Retention,
    /// Every client is append-only: nothing is removed at commit.
    pub append_only: bool,
}

impl CommitPolicy {
    /// The retention a commit applies.
    pub fn retention(&self) -> Retention {
        if self.append_only {
            Retention::KEEP_ALL
        } else {
            self.retention
        }
    }
}

/// What the session confirmed of an upload it commits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UploadCommit {
    pub client: ClientId,
    /// The name exactly as the client sent it.
    pub file: FileName,
    /// Plaintext bytes as the session counted them.
    pub size: u64,
    /// POSIX cksum of the plaintext, as confirmed by the client.
    pub cksum: u32,
    /// The quota the server's configuration gives the client
    /// ([`PendingVersion::quota`](super::PendingVersion::quota)).
    pub quota: Option<u64>,
}

impl Storage {
    /// Starts an upload of `declared_size` bytes for `client`: kept in
    /// memory when that is at most [`INLINE_MAX`], else streamed to a new
    /// blob by a writer thread. `alive` is held by the writer until it
    /// ends, so shutdown can wait for it.
    ///
    /// # Errors
    /// When a writer is needed and cannot be started.
    pub fn begin_upload(
        &self,
        client: ClientId,
        declared_size: u64,
        alive: mpsc::Sender<()>,
    ) -> Result<Upload, StorageError> {
        Upload::start(self.blobs_arc(), client, alive, declared_size)
    }

    /// Records `staged` as the latest version of its file (blocking): a
    /// small file into the metadata with its row, anything else published
    /// as a blob; then applies this storage's [`CommitPolicy`].
    ///
    /// # Errors
    /// When the content written is not the size the session counted (it is
    /// discarded then), or when publishing or recording fails; the previous
    /// version stays the latest.
    pub fn commit_upload(
        &self,
        staged: Staged,
        commit: UploadCommit,
    ) -> Result<BlobKey, StorageError> {
        if staged.size != commit.size {
            let e = StorageError::Corrupt(format!(
                "wrote {} bytes but the session counted {}",
                staged.size, commit.size
            ));
            staged.abort();
            return Err(e);
        }
        let version = NewVersion {
            client: commit.client,
            file: commit.file,
            blob: BlobKey(String::new()),
            size: commit.size,
            content_size: protocol::crypto::pkcs7_len(commit.size),
            cksum: commit.cksum,
            sha256: staged.sha256,
            stored_at: SystemTime::now(),
        };
        let retention = self.policy.retention();
        let content = match staged.content {
            StagedContent::Blob(blob) => super::group::Content::Blob(blob),
            StagedContent::Inline(bytes) => super::group::Content::Inline(bytes),
        };
        self.commits
            .commit(self, content, version, retention, commit.quota)
    }

    /// Whether an upload of `size` bytes of `file` for `client` can fit
    /// its quota (`quota` as the configuration gives it; its own setting
    /// overrides): checked when a large upload starts, so that one that
    /// cannot fit is refused before its content is received. It refuses
    /// only what cannot fit even if retention dropped every stored version
    /// of `file`; the commit checks again, authoritatively
    /// ([`PendingVersion::quota`]), since other uploads may take the room
    /// meanwhile.
    ///
    /// [`PendingVersion::quota`]: super::PendingVersion::quota
    ///
    /// # Errors
    /// [`StorageError::QuotaExceeded`] when it cannot fit; on a backend
    /// failure.
    pub fn upload_fits(
        &self,
        client: ClientId,
        file: &FileName,
        size: u64,
        quota: Option<u64>,
    ) -> Result<(), StorageError> {
        let usage = self.repo()?.usage(client, quota)?;
        let Some(q) = usage.quota else {
            return Ok(());
        };
        if usage.fits(size) {
            return Ok(());
        }
        let replaceable: u64 = self
            .meta
            .versions(client, file)?
            .iter()
            .map(|v| v.size)
            .sum();
        let least = QuotaUsage {
            stored: usage.stored.saturating_sub(replaceable),
            quota: usage.quota,
        };
        if least.fits(size) {
            return Ok(());
        }
        Err(StorageError::QuotaExceeded {
            stored: usage.stored,
            quota: q,
            size,
        })
    }
}

/// Batches in flight between the connection task and the writer thread.
pub const QUEUE_DEPTH: usize = 1;
/// Plaintext gathered before a batch is handed to the writer.
pub const BATCH: usize = 256 * 1024;
/// Written buffers kept for reuse, across all uploads.
const POOL: usize = 8;

/// Written buffers waiting to be reused by any upload.
static SPARES: std::sync::Mutex<Vec<BytesMut>> = std::sync::Mutex::new(Vec::new());

fn spares() -> std::sync::MutexGuard<'static, Vec<BytesMut>> {
    // A panic while holding the lock leaves a valid Vec.
    SPARES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Keeps `buf` for reuse if the pool has room; drops it otherwise.
fn give_back(mut buf: BytesMut) {
    buf.clear();
    let mut pool = spares();
    if pool.len() < POOL {
        pool.push(buf);
    }
}

enum Chunk {
    Data(BytesMut),
    Finish,
}

/// Where the content of a finished upload is.
pub enum StagedContent {
    /// A synced temporary of the blob store.
    Blob(Box<dyn StagedBlob>),
    /// A small file, in memory until it is committed with its row.
    Inline(Vec<u8>),
}

/// Content written (and, in the blob store, synced), awaiting the client's
/// verdict: committed, or [aborted](Self::abort).
pub struct Staged {
    pub content: StagedContent,
    pub sha256: [u8; 32],
    pub size: u64,
    pub started: Instant,
}

impl Staged {
    /// Discards the content (blocking: call from the blocking pool). A
    /// failure leaves a temporary for the next start-up to remove, so it
    /// is only logged.
    pub fn abort(self) {
        if let StagedContent::Blob(blob) = self.content {
            if let Err(e) = blob.abort() {
                tracing::warn!(cause = %e, "could not discard a staged upload");
            }
        }
    }
}

/// An upload in progress. Dropping it without [`finish`](Self::finish)
/// discards what was written.
pub struct Upload {
    inner: Inner,
    started: Instant,
}

enum Inner {
    /// Gathered in memory (a small file); what a spill to a writer needs.
    Memory {
        content: Vec<u8>,
        blobs: std::sync::Arc<dyn BlobStore>,
        client: ClientId,
        alive: mpsc::Sender<()>,
    },
    Streamed(Streamed),
}

impl Upload {
    /// Starts an upload of `expected` bytes for `client`: in memory when
    /// that is at most [`INLINE_MAX`], else with a writer for a new blob.
    /// `alive` is held by the writer until it ends, so shutdown can wait
    /// for it.
    ///
    /// # Errors
    /// When a writer is needed and cannot be started.
    pub fn start(
        blobs: std::sync::Arc<dyn BlobStore>,
        client: ClientId,
        alive: mpsc::Sender<()>,
        expected: u64,
    ) -> Result<Self, StorageError> {
        let started = Instant::now();
        let inner = if expected <= INLINE_MAX {
            Inner::Memory {
                content: Vec::with_capacity(usize::try_from(expected).unwrap_or(0)),
                blobs,
                client,
                alive,
            }
        } else {
            Inner::Streamed(Streamed::start(blobs, client, alive, started)?)
        };
        Ok(Self { inner, started })
    }

    /// A written buffer of at least `capacity` bytes, if the pool has one
    /// (only for uploads that go to a writer).
    pub fn spare(&mut self, capacity: usize) -> Option<BytesMut> {
        match &mut self.inner {
            Inner::Memory { .. } => None,
            Inner::Streamed(s) => s.spare(capacity),
        }
    }

    /// Takes `plaintext`; see [`Streamed::write`].
    ///
    /// # Errors
    /// When the writer failed.
    pub async fn write(&mut self, plaintext: BytesMut) -> Result<(), StorageError> {
        match &mut self.inner {
            Inner::Memory {
                content,
                blobs,
                client,
                alive,
            } => {
                if (content.len() + plaintext.len()) as u64 <= INLINE_MAX {
                    content.extend_from_slice(&plaintext);
                    return Ok(());
                }
                // More than the file said it had: on to a writer.
                let mut streamed = Streamed::start(
                    std::sync::Arc::clone(blobs),
                    *client,
                    alive.clone(),
                    self.started,
                )?;
                streamed.write(BytesMut::from(&content[..])).await?;
                streamed.write(plaintext).await?;
                self.inner = Inner::Streamed(streamed);
                Ok(())
            }
            Inner::Streamed(s) => s.write(plaintext).await,
        }
    }

    /// Returns the finished content: a synced temporary, or the bytes of a
    /// small file.
    ///
    /// # Errors
    /// When the writer failed.
    pub async fn finish(self) -> Result<Staged, StorageError> {
        match self.inner {
            Inner::Memory { content, .. } => Ok(Staged {
                sha256: Sha256::digest(&content).into(),
                size: content.len() as u64,
                content: StagedContent::Inline(content),
                started: self.started,
            }),
            Inner::Streamed(s) => s.finish().await,
        }
    }
}

/// An upload going to a writer thread. Dropping it without
/// [`finish`](Self::finish) makes the writer discard the temporary.
struct Streamed {
    tx: mpsc::Sender<Chunk>,
    outcome: oneshot::Receiver<Result<Staged, StorageError>>,
    batch: BytesMut,
}

impl Streamed {
    /// Starts the writer for a new blob of `client`.
    ///
    /// # Errors
    /// When called outside a tokio runtime.
    fn start(
        blobs: std::sync::Arc<dyn BlobStore>,
        client: ClientId,
        alive: mpsc::Sender<()>,
        started: Instant,
    ) -> Result<Self, StorageError> {
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let (outcome_tx, outcome) = oneshot::channel();
        // A thread of the runtime's blocking pool: a run of small files
        // reuses one instead of starting a thread per file.
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|e| StorageError::Worker(format!("cannot start a writer: {e}")))?;
        runtime.spawn_blocking(move || {
            let _alive = alive;
            if let Some(result) = write_all(&*blobs, client, rx, started) {
                let _ = outcome_tx.send(result);
            }
        });
        Ok(Self {
            tx,
            outcome,
            batch: BytesMut::new(),
        })
    }

    /// A written buffer of at least `capacity` bytes, if the pool has one.
    fn spare(&mut self, capacity: usize) -> Option<BytesMut> {
        let mut pool = spares();
        let i = pool.iter().position(|b| b.capacity() >= capacity)?;
        Some(pool.swap_remove(i))
    }

    async fn send(&mut self, chunk: Chunk) -> Result<(), StorageError> {
        if self.tx.send(chunk).await.is_err() {
            // The writer stopped early: it reports why through `outcome`.
            return Err(match (&mut self.outcome).await {
                Ok(Err(e)) => e,
                _ => StorageError::Worker("the writer stopped".into()),
            });
        }
        Ok(())
    }

    /// Queues `plaintext` for writing; waits while the writer is
    /// [`QUEUE_DEPTH`] batches behind. Cancel-safe only in that dropping the
    /// upload discards it.
    ///
    /// # Errors
    /// When the writer failed.
    async fn write(&mut self, plaintext: BytesMut) -> Result<(), StorageError> {
        if self.batch.is_empty() && plaintext.len() >= BATCH {
            return self.send(Chunk::Data(plaintext)).await;
        }
        if self.batch.is_empty() {
            match self.spare(BATCH) {
                Some(mut buf) => {
                    buf.clear();
                    self.batch = buf;
                }
                None => self.batch.reserve(BATCH),
            }
        }
        self.batch.extend_from_slice(&plaintext);
        if self.batch.len() >= BATCH {
            let full = self.batch.split();
            self.send(Chunk::Data(full)).await?;
        }
        Ok(())
    }

    /// Writes what is left, makes the temporary durable and returns it.
    ///
    /// # Errors
    /// When the writer failed.
    async fn finish(mut self) -> Result<Staged, StorageError> {
        if !self.batch.is_empty() {
            let rest = self.batch.split();
            self.send(Chunk::Data(rest)).await?;
        }
        self.send(Chunk::Finish).await?;
        self.outcome
            .await
            .unwrap_or_else(|_| Err(StorageError::Worker("the writer stopped".into())))
    }
}

/// The writer thread's loop. `None` when the upload was abandoned (the
/// channel closed before `Finish`): the writer is aborted then, as it is
/// when a write fails.
fn write_all(
    blobs: &dyn BlobStore,
    client: ClientId,
    mut rx: mpsc::Receiver<Chunk>,
    started: Instant,
) -> Option<Result<Staged, StorageError>> {
    let mut writer = match blobs.begin_write(client) {
        Ok(w) => w,
        Err(e) => return Some(Err(e)),
    };
    let mut sha = Sha256::new();
    let mut size = 0u64;
    let abort = |writer: Box<dyn crate::storage::BlobWriter>| {
        if let Err(e) = writer.abort() {
            tracing::warn!(cause = %e, "could not discard an unfinished upload");
        }
    };
    loop {
        let Some(chunk) = rx.blocking_recv() else {
            abort(writer);
            return None;
        };
        match chunk {
            Chunk::Data(bytes) => {
                sha.update(&bytes);
                size += bytes.len() as u64;
                if let Err(e) = writer.write(&bytes) {
                    abort(writer);
                    return Some(Err(e));
                }
                give_back(bytes);
            }
            Chunk::Finish => {
                return Some(writer.finish().map(|blob| Staged {
                    content: StagedContent::Blob(blob),
                    sha256: sha.finalize().into(),
                    size,
                    started,
                }))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::UserName;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// Uploads `content` (ingest, then commit) as `file` of `client`.
    fn upload(
        storage: &Storage,
        client: ClientId,
        file: &str,
        content: &[u8],
        counted: u64,
    ) -> Result<BlobKey, StorageError> {
        let (alive, _) = mpsc::channel(1);
        let staged = runtime().block_on(async {
            let mut upload = storage
                .begin_upload(client, content.len() as u64, alive)
                .unwrap();
            upload.write(BytesMut::from(content)).await.unwrap();
            upload.finish().await.unwrap()
        });
        storage.commit_upload(
            staged,
            UploadCommit {
                client,
                file: FileName::try_from(file).unwrap(),
                size: counted,
                cksum: 0,
                quota: None,
            },
        )
    }

    fn storage(dir: &std::path::Path, policy: CommitPolicy) -> (Storage, ClientId) {
        let storage = Storage::open_local(dir).unwrap().with_policy(policy);
        let id = ClientId([5; 16]);
        storage
            .meta()
            .register(id, &UserName::try_from("ann").unwrap(), SystemTime::now())
            .unwrap();
        (storage, id)
    }

    #[test]
    fn commits_small_files_inline_and_large_ones_as_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let (storage, id) = storage(dir.path(), CommitPolicy::default());
        let small = upload(&storage, id, "s", b"small", 5).unwrap();
        assert!(small.is_inline());
        let big = vec![9u8; usize::try_from(INLINE_MAX).unwrap() + 1];
        let key = upload(&storage, id, "b", &big, big.len() as u64).unwrap();
        assert!(!key.is_inline());
        let file = FileName::try_from("b").unwrap();
        assert_eq!(storage.read_latest(id, &file).unwrap().unwrap(), big);
        let v = storage.meta().latest(id, &file).unwrap().unwrap();
        assert_eq!(v.sha256, <[u8; 32]>::from(Sha256::digest(&big)));
    }

    #[test]
    fn rejects_content_of_another_size_than_the_session_counted_and_keeps_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (storage, id) = storage(dir.path(), CommitPolicy::default());
        let big = vec![1u8; usize::try_from(INLINE_MAX).unwrap() + 10];
        let e = upload(&storage, id, "b", &big, 3).unwrap_err();
        assert!(matches!(e, StorageError::Corrupt(_)), "{e}");
        assert!(storage.meta().all_versions().unwrap().is_empty());
        let report = storage.recover().unwrap();
        assert_eq!(report.removed_temporaries, 0, "the temporary was aborted");
    }

    #[test]
    fn applies_retention_at_commit_unless_the_server_is_append_only() {
        let keep_one = Retention {
            keep_last: Some(1),
            keep_within: None,
        };
        for (append_only, kept) in [(false, 1), (true, 3)] {
            let dir = tempfile::tempdir().unwrap();
            let policy = CommitPolicy {
                retention: keep_one,
                append_only,
            };
            let (storage, id) = storage(dir.path(), policy);
            for content in [&b"one"[..], b"two", b"three"] {
                upload(&storage, id, "f", content, content.len() as u64).unwrap();
            }
            let file = FileName::try_from("f").unwrap();
            assert_eq!(
                storage.meta().versions(id, &file).unwrap().len(),
                kept,
                "append-only {append_only}"
            );
        }
    }
}
