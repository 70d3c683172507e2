//! The accept loop, the connection cap and graceful shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::SinkExt;
use protocol::{Response, ServerCodec};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio_util::codec::FramedWrite;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn, Instrument};

use crate::config::Config;
use crate::connection::{self, Shared, LINGER};
use crate::storage::{Storage, StorageError};

/// Refusals (1607 past the connection cap) handled at once; past this,
/// excess connections are closed without an answer.
const MAX_REFUSALS: usize = 64;
/// How long to wait for upload writer threads after the last connection.
const WRITER_DRAIN: Duration = Duration::from_secs(10);

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot open storage in {path}: {source}")]
    Storage {
        path: std::path::PathBuf,
        source: StorageError,
    },
    #[error("start-up recovery failed: {0}")]
    Recovery(StorageError),
    #[error("storage task failed: {0}")]
    Task(String),
}

/// Serves the legacy protocol on `listener` with the default storage (SQLite
/// and blobs under `config.data_dir`), until `shutdown` completes. Then
/// stops accepting, lets requests and uploads in flight finish for
/// `config.shutdown_grace`, cuts what is left, and returns.
///
/// Start-up recovery runs first: leftover temporaries are removed and the
/// metadata reconciled with the blobs on disk.
///
/// # Errors
/// When storage cannot be opened or recovered. Errors of single
/// connections are logged, never returned.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let data_dir = config.data_dir.clone();
    let storage = tokio::task::spawn_blocking(move || {
        let storage = Storage::open_local(&data_dir).map_err(|source| ServerError::Storage {
            path: data_dir.clone(),
            source,
        })?;
        let report = storage.recover().map_err(ServerError::Recovery)?;
        if report != Default::default() {
            warn!(
                temporaries = report.removed_temporaries,
                orphans = report.removed_orphans,
                forgotten = report.forgotten_versions,
                "recovered from an unclean stop"
            );
        }
        Ok::<_, ServerError>(storage)
    })
    .await
    .map_err(|e| ServerError::Task(e.to_string()))??;
    run_with_storage(listener, config, storage, shutdown).await
}

/// As [`run`], with storage the caller opened (and recovered): another
/// backend, or a store prepared by a test. `config.data_dir` is not used.
///
/// # Errors
/// None at present; the signature leaves room for start-up failures.
pub async fn run_with_storage(
    listener: TcpListener,
    config: Config,
    storage: Storage,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let token = CancellationToken::new();
    let (alive, mut writers_done) = mpsc::channel::<()>(1);
    let max = config.max_connections.max(1);
    let grace = config.shutdown_grace;
    let shared = Arc::new(Shared {
        config,
        storage,
        shutdown: token.clone(),
        alive,
    });
    let permits = Arc::new(Semaphore::new(max));
    let refusals = Arc::new(Semaphore::new(MAX_REFUSALS));
    let mut tasks = JoinSet::new();
    let mut backoff = Duration::from_millis(10);
    tokio::pin!(shutdown);
    if let Ok(addr) = listener.local_addr() {
        debug!(%addr, max_connections = max, "accepting");
    }

    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(joined) = tasks.join_next(), if !tasks.is_empty() => reap(joined),
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    backoff = Duration::from_millis(10);
                    match Arc::clone(&permits).try_acquire_owned() {
                        Ok(permit) => {
                            let shared = Arc::clone(&shared);
                            tasks.spawn(async move {
                                connection::serve(stream, peer, shared).await;
                                drop(permit);
                            });
                        }
                        Err(_) => {
                            warn!(%peer, max_connections = max, "connection refused: at capacity");
                            if let Ok(slot) = Arc::clone(&refusals).try_acquire_owned() {
                                tasks.spawn(async move {
                                    refuse(stream, peer).await;
                                    drop(slot);
                                });
                            }
                        }
                    }
                }
                Err(e) => {
                    // Out of descriptors or a connection that died while
                    // queued: log, wait a little, carry on.
                    error!(cause = %e, "accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            },
        }
    }

    drop(listener);
    info!(
        connections = tasks.len(),
        grace_secs = grace.as_secs_f64(),
        "shutting down: no longer accepting"
    );
    token.cancel();
    let deadline = tokio::time::sleep(grace);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            joined = tasks.join_next() => match joined {
                Some(joined) => reap(joined),
                None => break,
            },
            () = &mut deadline => {
                warn!(connections = tasks.len(), "grace period over; cutting the remaining connections");
                tasks.abort_all();
                while let Some(joined) = tasks.join_next().await {
                    reap(joined);
                }
                break;
            }
        }
    }
    drop(shared);
    // Every writer thread holds a sender; the channel closes when the last
    // one has removed or synced its temporary.
    if tokio::time::timeout(WRITER_DRAIN, writers_done.recv())
        .await
        .is_err()
    {
        warn!("upload writers still busy after {WRITER_DRAIN:?}; exiting anyway");
    }
    info!("stopped");
    Ok(())
}

fn reap(joined: Result<(), tokio::task::JoinError>) {
    if let Err(e) = joined {
        if e.is_panic() {
            error!(cause = %e, "a connection task panicked");
        }
    }
}

/// Answers 1607 to a connection past the cap and closes it.
async fn refuse(stream: TcpStream, peer: SocketAddr) {
    let span = tracing::info_span!("refused", %peer);
    async move {
        let (mut read, write) = stream.into_split();
        let mut framed = FramedWrite::new(write, ServerCodec::default());
        if tokio::time::timeout(LINGER, framed.send(&Response::GeneralError))
            .await
            .is_err()
        {
            return;
        }
        let mut write = framed.into_inner();
        let _ = tokio::time::timeout(LINGER, write.shutdown()).await;
        connection::linger(&mut read).await;
    }
    .instrument(span)
    .await;
}
