//! The accept loops of both listeners, admission (the connection caps,
//! `admission.rs`) and graceful shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::SinkExt;
use protocol::{Response, ServerCodec};
use rand::SeedableRng;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio_util::codec::FramedWrite;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn, Instrument};

use crate::admission::{Admission, AdmissionLimits, Admitted, Refusal};
use crate::config::Config;
use crate::connection::{self, Shared, LINGER};
use crate::identity::{IdentityError, ServerIdentity};
use crate::metrics::{Listener, Metrics, OpenConnection};
use crate::storage::{Storage, StorageError};

/// Refusals (1607 past the connection cap) handled at once; past this,
/// excess connections are closed without an answer.
const MAX_REFUSALS: usize = 64;
/// How long to wait for upload writer threads after the last connection.
const WRITER_DRAIN: Duration = Duration::from_secs(10);
/// Refusals and evictions logged one by one per [`REFUSAL_WINDOW`]; the
/// rest are counted and summed up in one line, so a flood cannot fill the
/// log.
const REFUSALS_LOGGED: u32 = 5;
const REFUSAL_WINDOW: Duration = Duration::from_secs(10);

/// The log of refused and evicted connections, rate-limited.
struct RefusalLog {
    window_start: Instant,
    logged: u32,
    suppressed: u64,
}

impl RefusalLog {
    fn new() -> Self {
        Self {
            window_start: Instant::now(),
            logged: 0,
            suppressed: 0,
        }
    }

    /// Whether this refusal gets a line of its own.
    fn admit_line(&mut self) -> bool {
        let now = Instant::now();
        if now.duration_since(self.window_start) >= REFUSAL_WINDOW {
            if self.suppressed > 0 {
                warn!(
                    count = self.suppressed,
                    secs = REFUSAL_WINDOW.as_secs(),
                    "more connections refused or evicted than logged"
                );
            }
            self.window_start = now;
            self.logged = 0;
            self.suppressed = 0;
        }
        if self.logged < REFUSALS_LOGGED {
            self.logged += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }

    fn refused(&mut self, peer: SocketAddr, refusal: Refusal, limits: AdmissionLimits) {
        if self.admit_line() {
            warn!(
                %peer,
                reason = refusal.reason(),
                max_connections = limits.max_connections,
                max_per_source = limits.max_per_source,
                max_unauthenticated = limits.max_unauthenticated,
                "connection refused"
            );
        }
    }

    fn evicted(&mut self, peer: SocketAddr, source: crate::admission::Source) {
        if self.admit_line() {
            info!(%peer, evicted_from = %source, "unauthenticated budget full: evicted a connection of the source holding the most");
        }
    }
}

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
    #[error("server identity: {0}")]
    Identity(#[from] IdentityError),
    #[error("no listener to serve on")]
    NoListener,
}

/// The sockets a server serves on: secure mode (TLS 1.3, the default), the
/// plain legacy protocol (insecure, for deployed legacy clients), or both.
#[derive(Debug, Default)]
pub struct Listeners {
    /// Secure mode.
    pub secure: Option<TcpListener>,
    /// Legacy version 3, in the clear.
    pub legacy: Option<TcpListener>,
    /// Plain HTTP for metrics and health checks (`metrics` module).
    pub metrics: Option<TcpListener>,
}

impl Listeners {
    /// Secure mode only.
    pub fn secure(listener: TcpListener) -> Self {
        Self {
            secure: Some(listener),
            legacy: None,
            metrics: None,
        }
    }

    /// The legacy protocol only.
    pub fn legacy(listener: TcpListener) -> Self {
        Self {
            secure: None,
            legacy: Some(listener),
            metrics: None,
        }
    }

    /// Both, side by side.
    pub fn both(secure: TcpListener, legacy: TcpListener) -> Self {
        Self {
            secure: Some(secure),
            legacy: Some(legacy),
            metrics: None,
        }
    }

    /// The same, also serving metrics and health checks on `listener`.
    #[must_use]
    pub fn with_metrics(mut self, listener: TcpListener) -> Self {
        self.metrics = Some(listener);
        self
    }
}

/// Accepts on `listener`, or never when there is none.
async fn accept(listener: Option<&TcpListener>) -> std::io::Result<(TcpStream, SocketAddr)> {
    match listener {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

/// Serves on `listeners` with the default storage (SQLite and blobs under
/// `config.data_dir`), until `shutdown` completes. Then stops accepting,
/// lets requests and uploads in flight finish for `config.shutdown_grace`,
/// cuts what is left, and returns.
///
/// Start-up recovery runs first: leftover temporaries are removed and the
/// metadata reconciled with the blobs on disk. With a secure listener, the
/// server's TLS identity is loaded from `config.data_dir`, or made on the
/// first start.
///
/// # Errors
/// When storage cannot be opened or recovered, or the identity cannot be
/// loaded or made. Errors of single connections are logged, never returned.
pub async fn run(
    listeners: Listeners,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let data_dir = config.data_dir.clone();
    let blobs = config.blobs.clone();
    let meta = config.meta.clone();
    let storage = tokio::task::spawn_blocking(move || {
        let storage = Storage::open_with(&data_dir, &blobs, &meta).map_err(|source| {
            ServerError::Storage {
                path: data_dir.clone(),
                source,
            }
        })?;
        // Not beside a prune (on any server of a shared repository):
        // recovery removes blobs without a row, which a repack has for a
        // moment (`storage::prune`).
        let lock = storage
            .maintenance_lock(&data_dir, true)
            .map_err(ServerError::Recovery)?;
        let report = storage.recover().map_err(ServerError::Recovery)?;
        drop(lock);
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
    run_with_storage(listeners, config, storage, shutdown).await
}

/// As [`run`], with storage the caller opened (and recovered): another
/// backend, or a store prepared by a test. `config.data_dir` is used only
/// for the TLS identity.
///
/// # Errors
/// When there is no listener, or the identity cannot be loaded or made.
pub async fn run_with_storage(
    mut listeners: Listeners,
    config: Config,
    storage: Storage,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    if listeners.secure.is_none() && listeners.legacy.is_none() {
        return Err(ServerError::NoListener);
    }
    let acceptor = match &listeners.secure {
        None => None,
        Some(listener) => {
            let data_dir = config.data_dir.clone();
            let for_identity = storage.clone();
            let (identity, created) =
                tokio::task::spawn_blocking(move || match for_identity.shared() {
                    Some(shared) => ServerIdentity::load_shared(&data_dir, shared),
                    None => ServerIdentity::load_or_create(&data_dir),
                })
                .await
                .map_err(|e| ServerError::Task(e.to_string()))??;
            let fingerprint = identity.fingerprint();
            if created {
                info!(%fingerprint, dir = %identity.dir().display(), "made a new server identity; clients pin this fingerprint at registration (`backup-server fingerprint` prints it again)");
            }
            if let Ok(addr) = listener.local_addr() {
                info!(%addr, %fingerprint, "secure listener (TLS 1.3)");
            }
            Some(tokio_rustls::TlsAcceptor::from(identity.tls_config()?))
        }
    };
    if let Some(addr) = listeners.legacy.as_ref().and_then(|l| l.local_addr().ok()) {
        warn!(%addr, "legacy listener: protocol version 3 in the clear, INSECURE (no server authentication, no integrity, client ids are not secrets); use it only for legacy clients on a trusted network");
    }
    let token = CancellationToken::new();
    let (alive, mut writers_done) = mpsc::channel::<()>(1);
    let admission = Admission::new(AdmissionLimits {
        max_connections: config.max_connections,
        max_per_source: config.max_per_source,
        max_unauthenticated: config.max_unauthenticated,
    });
    let limits = admission.limits();
    let grace = config.shutdown_grace;
    let metrics = Arc::new(Metrics::new(Some(&config.data_dir)));
    let storage = storage.with_policy(crate::storage::CommitPolicy {
        retention: config.retention,
        append_only: config.append_only,
    });
    if let Some(listener) = listeners.metrics.take() {
        if let Ok(addr) = listener.local_addr() {
            info!(%addr, "serving metrics and health checks over plain HTTP (/metrics, /healthz, /readyz)");
        }
        tokio::spawn(crate::metrics::serve(
            listener,
            Arc::clone(&metrics),
            storage.clone(),
            token.clone(),
        ));
    }
    let shared = Arc::new(Shared {
        registrations: connection::RegisterLimiter::from_config(&config),
        storage,
        metrics: Arc::clone(&metrics),
        config,
        shutdown: token.clone(),
        alive,
    });
    let refusals = Arc::new(Semaphore::new(MAX_REFUSALS));
    let mut refusal_log = RefusalLog::new();
    let mut rng = rand::rngs::StdRng::from_entropy();
    let mut tasks = JoinSet::new();
    let mut backoff = Duration::from_millis(10);
    tokio::pin!(shutdown);
    debug!(
        max_connections = limits.max_connections,
        max_per_source = limits.max_per_source,
        max_unauthenticated = limits.max_unauthenticated,
        "accepting"
    );

    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                reap(joined);
                continue;
            }
            accepted = accept(listeners.secure.as_ref()) => accepted.map(|(s, p)| (s, p, true)),
            accepted = accept(listeners.legacy.as_ref()) => accepted.map(|(s, p)| (s, p, false)),
        };
        {
            match accepted {
                Ok((stream, peer, secure)) => {
                    backoff = Duration::from_millis(10);
                    let listener = if secure {
                        Listener::Secure
                    } else {
                        Listener::Legacy
                    };
                    match admission.admit(peer.ip(), &mut rng) {
                        Ok(Admitted { ticket, evicted }) => {
                            if let Some(source) = evicted {
                                refusal_log.evicted(peer, source);
                                // Connections are evicted only by one of
                                // their own listener's newcomers or the
                                // other's; the newcomer's is what is known.
                                metrics.on(listener).evicted.inc();
                            }
                            let shared = Arc::clone(&shared);
                            let acceptor = acceptor.clone().filter(|_| secure);
                            let open = OpenConnection::new(metrics.on(listener));
                            tasks.spawn(async move {
                                let _open = open;
                                match acceptor {
                                    Some(acceptor) => {
                                        connection::serve_secure(
                                            stream, peer, shared, acceptor, ticket,
                                        )
                                        .await
                                    }
                                    None => {
                                        connection::serve_legacy(stream, peer, shared, ticket).await
                                    }
                                }
                            });
                        }
                        Err(refusal) => {
                            refusal_log.refused(peer, refusal, limits);
                            metrics.connection_refused(listener, refusal.label());
                            // A legacy client at capacity is told so with
                            // 1607, as before. A TLS client cannot read a
                            // plain answer, and a source over its limits
                            // gets nothing that costs the server: both are
                            // closed at once.
                            if secure || refusal != Refusal::AtCapacity {
                                drop(stream);
                            } else if let Ok(slot) = Arc::clone(&refusals).try_acquire_owned() {
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
            }
        }
    }

    drop(listeners);
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
