//! The writer of one upload: a thread of the blocking pool fed through a
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
//! [`Storage::commit_inline`](crate::storage::Storage::commit_inline)). One
//! that turns out larger than it said moves to a writer thread at that
//! point.

use std::time::Instant;

use bytes::BytesMut;
use protocol::ClientId;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};

use crate::storage::{BlobStore, StagedBlob, StorageError, INLINE_MAX};

/// Batches in flight between the connection task and the writer thread.
pub(crate) const QUEUE_DEPTH: usize = 1;
/// Plaintext gathered before a batch is handed to the writer.
pub(crate) const BATCH: usize = 256 * 1024;
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
pub(crate) enum StagedContent {
    /// A synced temporary of the blob store.
    Blob(Box<dyn StagedBlob>),
    /// A small file, in memory until it is committed with its row.
    Inline(Vec<u8>),
}

/// Content written (and, in the blob store, synced), awaiting the client's
/// verdict: committed, or [aborted](Self::abort).
pub(crate) struct Staged {
    pub(crate) content: StagedContent,
    pub(crate) sha256: [u8; 32],
    pub(crate) size: u64,
    pub(crate) started: Instant,
}

impl Staged {
    /// Discards the content (blocking: call from the blocking pool). A
    /// failure leaves a temporary for the next start-up to remove, so it
    /// is only logged.
    pub(crate) fn abort(self) {
        if let StagedContent::Blob(blob) = self.content {
            if let Err(e) = blob.abort() {
                tracing::warn!(cause = %e, "could not discard a staged upload");
            }
        }
    }
}

/// An upload in progress. Dropping it without [`finish`](Self::finish)
/// discards what was written.
pub(crate) struct Upload {
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
    pub(crate) fn start(
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
    pub(crate) fn spare(&mut self, capacity: usize) -> Option<BytesMut> {
        match &mut self.inner {
            Inner::Memory { .. } => None,
            Inner::Streamed(s) => s.spare(capacity),
        }
    }

    /// Takes `plaintext`; see [`Streamed::write`].
    ///
    /// # Errors
    /// When the writer failed.
    pub(crate) async fn write(&mut self, plaintext: BytesMut) -> Result<(), StorageError> {
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
    pub(crate) async fn finish(self) -> Result<Staged, StorageError> {
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
