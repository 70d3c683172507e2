//! Prometheus metrics and health checks, on an opt-in plain-HTTP listener
//! (`--metrics-listen`, `docs/SECURITY.md` "The metrics listener").
//!
//! [`Metrics`] is built once per server and shared (in an `Arc`) by the
//! accept loop, every connection and the commit paths; every series is
//! labelled by the client listener it happened on (`secure` or `legacy`)
//! where one applies. Counters are atomics: counting costs a connection
//! no lock. [`serve`] answers `GET /metrics` (OpenMetrics text),
//! `GET /healthz` (the process is up) and `GET /readyz` (storage answers:
//! [`Storage::probe`]), and 404 to anything else; each HTTP connection
//! gets one request, a bounded header and [`HTTP_TIMEOUT`].

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::storage::{Storage, StorageError};

/// How long one HTTP connection may take, from accept to the end of its
/// answer.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP connections served at once; more wait in the kernel's queue.
const HTTP_CONNECTIONS: usize = 16;
/// The largest request head read (hyper's smallest allowed buffer).
const HTTP_MAX_HEAD: usize = 8 * 1024;
/// The content type of the OpenMetrics text exposition.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The file `backup-server scrub` leaves its last result in, inside the
/// data directory; the scrub series are read from it at each scrape.
pub const SCRUB_STATUS: &str = "scrub-status.toml";

/// Which client listener something happened on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listener {
    Secure,
    Legacy,
}

impl Listener {
    pub fn label(self) -> &'static str {
        match self {
            Self::Secure => "secure",
            Self::Legacy => "legacy",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabel {
    listener: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    listener: &'static str,
    kind: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    listener: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CauseLabels {
    listener: &'static str,
    cause: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CommitLabels {
    listener: &'static str,
    what: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StorageLabels {
    backend: &'static str,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

/// The counters of one listener that the hot paths touch, resolved once
/// (no label lookup per byte read).
#[derive(Clone, Debug)]
pub struct ListenerMetrics {
    pub(crate) opened: Counter,
    pub(crate) open: Gauge,
    pub(crate) evicted: Counter,
    pub(crate) received: Counter,
    pub(crate) sent: Counter,
    pub(crate) uploads_committed: Counter,
    pub(crate) upload_bytes: Counter,
    pub(crate) packs_stored: Counter,
    pub(crate) snapshots_committed: Counter,
    pub(crate) dedup_objects: Counter,
    pub(crate) dedup_bytes: Counter,
}

type CommitFamily = Family<CommitLabels, Histogram, fn() -> Histogram>;

/// Every series of one server.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    secure: ListenerMetrics,
    legacy: ListenerMetrics,
    requests: Family<RequestLabels, Counter>,
    refused: Family<ReasonLabels, Counter>,
    uploads_failed: Family<CauseLabels, Counter>,
    snapshots_failed: Family<CauseLabels, Counter>,
    commit_seconds: CommitFamily,
    storage_errors: Family<StorageLabels, Counter>,
    tls_handshakes: Family<OutcomeLabel, Counter>,
    proofs_failed: Family<ReasonLabels, Counter>,
}

/// Commit latencies from 0.5 ms to about 16 s, doubling.
fn commit_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

impl Metrics {
    /// Every series, at zero. `data_dir` is where `backup-server scrub`
    /// leaves its results ([`SCRUB_STATUS`]); `None` exposes none.
    pub fn new(data_dir: Option<&Path>) -> Self {
        let mut registry = Registry::with_prefix("backup_server");
        let per_listener = |registry: &mut Registry, name: &str, help: &str| {
            let family = Family::<ListenerLabel, Counter>::default();
            registry.register(name, help, family.clone());
            family
        };
        let opened = per_listener(
            &mut registry,
            "connections_opened",
            "Client connections admitted (past the connection caps).",
        );
        let evicted = per_listener(
            &mut registry,
            "connections_evicted",
            "Unauthenticated connections closed to make room for a newcomer (the unauthenticated budget was full).",
        );
        let received = per_listener(
            &mut registry,
            "received_bytes",
            "Bytes read from client connections (on the secure listener, TLS records including the handshake).",
        );
        let sent = per_listener(
            &mut registry,
            "sent_bytes",
            "Bytes written to client connections (on the secure listener, TLS records including the handshake).",
        );
        let uploads_committed = per_listener(
            &mut registry,
            "uploads_committed",
            "Files committed (answered 1604 after CRC ok): each is a new stored version.",
        );
        let upload_bytes = per_listener(
            &mut registry,
            "upload_committed_bytes",
            "Plaintext bytes of the files committed.",
        );
        let packs_stored = per_listener(
            &mut registry,
            "packs_stored",
            "Repository packs made durable and recorded (answered 1661).",
        );
        let snapshots_committed = per_listener(
            &mut registry,
            "snapshots_committed",
            "Repository snapshots committed.",
        );
        let dedup_objects = per_listener(
            &mut registry,
            "dedup_objects",
            "Deduplication: objects a client asked about (1262 have) that the server already held, so the client did not upload them. Counted once per answer.",
        );
        let dedup_bytes = per_listener(
            &mut registry,
            "dedup_bytes",
            "Deduplication savings: the stored (encrypted) bytes of the objects counted in dedup_objects, i.e. pack bytes the client did not have to send.",
        );
        let open = Family::<ListenerLabel, Gauge>::default();
        registry.register(
            "connections_open",
            "Client connections being served now.",
            open.clone(),
        );
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests (frames) handled, by kind and outcome: ok (answered as the protocol says, refusals such as append-only included), rejected (a protocol violation or an unproven client: answered 1607 or 1651, connection closed), failed (storage or the connection broke).",
            requests.clone(),
        );
        let refused = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "connections_refused",
            "Connections refused at accept, by reason: at_capacity, source_limit, unauthenticated.",
            refused.clone(),
        );
        let uploads_failed = Family::<CauseLabels, Counter>::default();
        registry.register(
            "uploads_failed",
            "Uploads not committed, by cause: storage, cksum_retry (the client reported a cksum mismatch; a resend follows), client_gave_up, bad_content, quota (over the client's quota), discarded, disconnected (the peer closed or the connection ended mid-upload).",
            uploads_failed.clone(),
        );
        let snapshots_failed = Family::<CauseLabels, Counter>::default();
        registry.register(
            "snapshots_failed",
            "Snapshot commits refused or failed, by cause: missing_objects, quota (a pack or the commit refused over the client's quota, docs/PROTOCOL.md 13.9), refused (another rule of docs/PROTOCOL.md 13.5), storage.",
            snapshots_failed.clone(),
        );
        let commit_seconds: CommitFamily = Family::new_with_constructor(commit_histogram);
        registry.register(
            "commit_duration_seconds",
            "How long a commit took on the server, from the request to durable: what = upload (a file's CRC ok, group commit included), pack, snapshot.",
            commit_seconds.clone(),
        );
        let storage_errors = Family::<StorageLabels, Counter>::default();
        registry.register(
            "storage_errors",
            "Storage failures met while serving clients, by backend (sqlite, fs, other) and kind (io, not_found, full, unavailable, conflict, corrupt, damaged, bad_key, worker, batch).",
            storage_errors.clone(),
        );
        let tls_handshakes = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "tls_handshakes",
            "TLS handshakes on the secure listener, by outcome: ok, failed, timeout.",
            tls_handshakes.clone(),
        );
        let proofs_failed = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "client_proofs_failed",
            "Clients refused for not proving their key, by reason: rejected (a wrong proof or passphrase proof), unproven (a request that needs the proof came first). A rise is a security signal.",
            proofs_failed.clone(),
        );
        if let Some(dir) = data_dir {
            registry.register_collector(Box::new(ScrubStatusCollector {
                path: dir.join(SCRUB_STATUS),
            }));
        }
        let for_listener = |l: Listener| {
            let label = ListenerLabel {
                listener: l.label(),
            };
            ListenerMetrics {
                opened: opened.get_or_create_owned(&label),
                open: open.get_or_create_owned(&label),
                evicted: evicted.get_or_create_owned(&label),
                received: received.get_or_create_owned(&label),
                sent: sent.get_or_create_owned(&label),
                uploads_committed: uploads_committed.get_or_create_owned(&label),
                upload_bytes: upload_bytes.get_or_create_owned(&label),
                packs_stored: packs_stored.get_or_create_owned(&label),
                snapshots_committed: snapshots_committed.get_or_create_owned(&label),
                dedup_objects: dedup_objects.get_or_create_owned(&label),
                dedup_bytes: dedup_bytes.get_or_create_owned(&label),
            }
        };
        let metrics = Self {
            secure: for_listener(Listener::Secure),
            legacy: for_listener(Listener::Legacy),
            registry,
            requests,
            refused,
            uploads_failed,
            snapshots_failed,
            commit_seconds,
            storage_errors,
            tls_handshakes,
            proofs_failed,
        };
        // The series an alert or a dashboard needs exist from the start, at
        // zero, rather than appearing with their first event.
        for l in [Listener::Secure, Listener::Legacy] {
            for reason in ["at_capacity", "source_limit", "unauthenticated"] {
                metrics.refused(l, reason);
            }
            for reason in ["rejected", "unproven"] {
                metrics.proof_refused_counter(l, reason);
            }
            for what in ["upload", "pack", "snapshot"] {
                metrics.commit_seconds.get_or_create_owned(&CommitLabels {
                    listener: l.label(),
                    what,
                });
            }
        }
        for outcome in ["ok", "failed", "timeout"] {
            metrics
                .tls_handshakes
                .get_or_create_owned(&OutcomeLabel { outcome });
        }
        for backend in ["sqlite", "fs"] {
            metrics.storage_errors.get_or_create_owned(&StorageLabels {
                backend,
                kind: "io",
            });
        }
        for l in [Listener::Secure, Listener::Legacy] {
            metrics.uploads_failed_counter(l, "storage");
            metrics.snapshots_failed_counter(l, "storage");
        }
        metrics
    }

    /// The hot-path counters of listener `l`.
    pub fn on(&self, l: Listener) -> &ListenerMetrics {
        match l {
            Listener::Secure => &self.secure,
            Listener::Legacy => &self.legacy,
        }
    }

    /// The registry's series, as OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            warn!(cause = %e, "cannot encode the metrics");
        }
        out
    }

    fn refused(&self, l: Listener, reason: &'static str) -> Counter {
        self.refused.get_or_create_owned(&ReasonLabels {
            listener: l.label(),
            reason,
        })
    }

    /// A connection refused at accept, for `reason`.
    pub(crate) fn connection_refused(&self, l: Listener, reason: &'static str) {
        self.refused(l, reason).inc();
    }

    /// A request of `kind` handled with `outcome` (ok, rejected, failed).
    pub(crate) fn request(&self, l: Listener, kind: &'static str, outcome: &'static str) {
        self.requests
            .get_or_create(&RequestLabels {
                listener: l.label(),
                kind,
                outcome,
            })
            .inc();
    }

    fn uploads_failed_counter(&self, l: Listener, cause: &'static str) -> Counter {
        self.uploads_failed.get_or_create_owned(&CauseLabels {
            listener: l.label(),
            cause,
        })
    }

    /// An upload that ended without a commit, for `cause`.
    pub(crate) fn upload_failed(&self, l: Listener, cause: &'static str) {
        self.uploads_failed_counter(l, cause).inc();
    }

    fn snapshots_failed_counter(&self, l: Listener, cause: &'static str) -> Counter {
        self.snapshots_failed.get_or_create_owned(&CauseLabels {
            listener: l.label(),
            cause,
        })
    }

    /// A snapshot refused or failed at commit, for `cause`.
    pub(crate) fn snapshot_failed(&self, l: Listener, cause: &'static str) {
        self.snapshots_failed_counter(l, cause).inc();
    }

    /// A commit of `what` (upload, pack, snapshot) that took `took`.
    pub(crate) fn commit_took(&self, l: Listener, what: &'static str, took: Duration) {
        self.commit_seconds
            .get_or_create(&CommitLabels {
                listener: l.label(),
                what,
            })
            .observe(took.as_secs_f64());
    }

    /// A storage failure met while serving.
    pub(crate) fn storage_error(&self, e: &StorageError) {
        self.storage_errors
            .get_or_create(&StorageLabels {
                backend: backend_of(e),
                kind: kind_of(e),
            })
            .inc();
    }

    /// A TLS handshake's outcome (ok, failed, timeout).
    pub(crate) fn tls_handshake(&self, outcome: &'static str) {
        self.tls_handshakes
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
    }

    fn proof_refused_counter(&self, l: Listener, reason: &'static str) -> Counter {
        self.proofs_failed.get_or_create_owned(&ReasonLabels {
            listener: l.label(),
            reason,
        })
    }

    /// A client refused for not proving its key.
    pub(crate) fn proof_refused(&self, l: Listener, reason: &'static str) {
        self.proof_refused_counter(l, reason).inc();
    }
}

/// Which backend a storage error came from: SQLite when its cause is a
/// SQLite error (or the metadata database), the file system when its cause
/// is an I/O error or a blob, else `other`.
fn backend_of(e: &StorageError) -> &'static str {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        if s.is::<rusqlite::Error>() {
            return "sqlite";
        }
        if s.is::<std::io::Error>() {
            return "fs";
        }
        source = s.source();
    }
    match e {
        StorageError::Corrupt(_) => "sqlite",
        StorageError::NotFound { op: "database", .. } => "sqlite",
        StorageError::NotFound { .. } | StorageError::Damaged { .. } | StorageError::BadKey(_) => {
            "fs"
        }
        _ => "other",
    }
}

fn kind_of(e: &StorageError) -> &'static str {
    match e {
        StorageError::Io { .. } => "io",
        StorageError::NotFound { .. } => "not_found",
        StorageError::Full { .. } => "full",
        StorageError::Unavailable { .. } => "unavailable",
        StorageError::Conflict { .. } => "conflict",
        StorageError::Corrupt(_) => "corrupt",
        StorageError::Damaged { .. } => "damaged",
        StorageError::BadKey(_) => "bad_key",
        StorageError::Worker(_) => "worker",
        StorageError::Batch(_) => "batch",
        StorageError::QuotaExceeded { .. } => "quota",
        StorageError::WrongBlobStore { .. } => "wrong_blob_store",
    }
}

/// A request kind as a label value.
pub(crate) fn kind_label(kind: protocol::wire::RequestKind) -> &'static str {
    use protocol::repo::RepoKind as R;
    use protocol::wire::RequestKind as K;
    match kind {
        K::Register => "register",
        K::PublicKey => "public_key",
        K::Reconnect => "reconnect",
        K::SendFile => "send_file",
        K::CrcOk => "crc_ok",
        K::CrcRetry => "crc_retry",
        K::CrcAbort => "crc_abort",
        K::List => "list",
        K::Restore => "restore",
        K::Delete => "delete",
        K::Prove => "prove",
        K::Repo(r) => match r {
            R::Have => "have",
            R::PackData => "pack_data",
            R::PackEnd => "pack_end",
            R::SnapshotRefs => "snapshot_refs",
            R::SnapshotCommit => "snapshot_commit",
            R::Snapshots => "snapshots",
            R::Fetch => "fetch",
            R::PutKey => "put_key",
            R::GetKeys => "get_keys",
            R::PassphraseLogin => "passphrase_login",
            R::PassphraseProve => "passphrase_prove",
            R::DeleteKey => "delete_key",
            R::Forget => "forget",
        },
    }
}

// ---------------------------------------------------------------- scrub

/// The last scrub's result, as `backup-server scrub` leaves it in the data
/// directory ([`SCRUB_STATUS`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ScrubStatus {
    /// When it finished, in seconds since the Unix epoch.
    pub finished_at: u64,
    pub versions_checked: u64,
    pub versions_damaged: u64,
    pub packs_checked: u64,
    pub packs_damaged: u64,
    pub packs_repaired: u64,
}

impl ScrubStatus {
    /// Writes the status into `data_dir`, replacing the last one (through
    /// a temporary and a rename, so a scrape never reads half of it).
    ///
    /// # Errors
    /// When the file cannot be written.
    pub fn save(&self, data_dir: &Path) -> std::io::Result<()> {
        let text = toml::to_string(self).map_err(std::io::Error::other)?;
        let tmp = data_dir.join(format!("{SCRUB_STATUS}.tmp"));
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, data_dir.join(SCRUB_STATUS))
    }

    /// The status in `path`, if there is a readable one.
    pub fn load(path: &Path) -> Option<Self> {
        let text = std::fs::read_to_string(path).ok()?;
        toml::from_str(&text).ok()
    }

    /// Now, in seconds since the epoch.
    pub fn now() -> u64 {
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    }
}

/// Exposes the last scrub's result at each scrape.
#[derive(Debug)]
struct ScrubStatusCollector {
    path: PathBuf,
}

impl Collector for ScrubStatusCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(status) = ScrubStatus::load(&self.path) else {
            return Ok(());
        };
        let gauge = |v: u64| ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));
        let finished = gauge(status.finished_at);
        finished.encode(encoder.encode_descriptor(
            "scrub_last_finished_timestamp_seconds",
            "When the last `backup-server scrub` finished (Unix time).",
            None,
            finished.metric_type(),
        )?)?;
        for (name, help, versions, packs) in [
            (
                "scrub_checked",
                "What the last scrub checked: stored versions and repository packs.",
                status.versions_checked,
                status.packs_checked,
            ),
            (
                "scrub_damaged",
                "What the last scrub found damaged, missing or unreadable.",
                status.versions_damaged,
                status.packs_damaged,
            ),
        ] {
            let mut family = encoder.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for (what, v) in [("versions", versions), ("packs", packs)] {
                let labels = [("what", what)];
                gauge(v).encode(family.encode_family(&labels)?)?;
            }
        }
        let repaired = gauge(status.packs_repaired);
        repaired.encode(encoder.encode_descriptor(
            "scrub_packs_repaired",
            "Damaged packs the last scrub repaired (scrub --repair).",
            None,
            repaired.metric_type(),
        )?)?;
        Ok(())
    }
}

// ---------------------------------------------------------------- HTTP

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until
/// `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    storage: Storage,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(HTTP_CONNECTIONS));
    let state = Arc::new(HttpState { metrics, storage });
    loop {
        let slot = tokio::select! {
            () = shutdown.cancelled() => return,
            slot = Arc::clone(&slots).acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => return,
            },
        };
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    debug!(cause = %e, "metrics listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |req| {
                let state = Arc::clone(&state);
                async move { Ok::<_, Infallible>(state.answer(req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(false)
                .max_buf_size(HTTP_MAX_HEAD)
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HTTP_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            match tokio::time::timeout(HTTP_TIMEOUT, conn).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(%peer, cause = %e, "metrics listener: HTTP connection failed"),
                Err(_) => debug!(%peer, "metrics listener: HTTP connection timed out"),
            }
        });
    }
}

struct HttpState {
    metrics: Arc<Metrics>,
    storage: Storage,
}

impl HttpState {
    async fn answer<B>(&self, req: Request<B>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
        }
        match req.uri().path() {
            "/metrics" => {
                let metrics = Arc::clone(&self.metrics);
                // The scrub collector reads a file: off the async threads.
                match tokio::task::spawn_blocking(move || metrics.encode()).await {
                    Ok(body) => Response::builder()
                        .header(hyper::header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)
                        .body(Full::new(Bytes::from(body)))
                        .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, "")),
                    Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e}\n")),
                }
            }
            "/healthz" => text(StatusCode::OK, "ok\n"),
            "/readyz" => {
                let storage = self.storage.clone();
                let probed = tokio::task::spawn_blocking(move || storage.probe()).await;
                match probed {
                    Ok(Ok(())) => text(StatusCode::OK, "ready\n"),
                    // The reason names paths, buckets and endpoints: it goes
                    // to the log, not to an unauthenticated answer.
                    Ok(Err(e)) => {
                        warn!(cause = %e, "readiness probe: storage not ready");
                        text(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "not ready: the storage failed its check (see the server's log)\n",
                        )
                    }
                    Err(e) => {
                        warn!(cause = %e, "readiness probe did not finish");
                        text(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "not ready: the storage check did not finish (see the server's log)\n",
                        )
                    }
                }
            }
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_owned())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

// ---------------------------------------------------------------- counting

/// A stream half that counts the bytes through it into a listener's
/// counters.
#[derive(Debug)]
pub(crate) struct Counted<T> {
    inner: T,
    received: Counter,
    sent: Counter,
}

impl<T> Counted<T> {
    pub(crate) fn new(inner: T, on: &ListenerMetrics) -> Self {
        Self {
            inner,
            received: on.received.clone(),
            sent: on.sent.clone(),
        }
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Counted<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len().saturating_sub(before);
        if read > 0 {
            self.received.inc_by(read as u64);
        }
        polled
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &polled {
            self.sent.inc_by(*n as u64);
        }
        polled
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let std::task::Poll::Ready(Ok(n)) = &polled {
            self.sent.inc_by(*n as u64);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Counts a connection as open until dropped.
#[derive(Debug)]
pub(crate) struct OpenConnection(Gauge);

impl OpenConnection {
    pub(crate) fn new(on: &ListenerMetrics) -> Self {
        on.opened.inc();
        on.open.inc();
        Self(on.open.clone())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposes_every_family_at_zero_from_the_start() {
        let m = Metrics::new(None);
        let text = m.encode();
        for line in [
            "backup_server_connections_opened_total{listener=\"secure\"} 0",
            "backup_server_uploads_committed_total{listener=\"legacy\"} 0",
            "backup_server_connections_refused_total{listener=\"legacy\",reason=\"at_capacity\"} 0",
            "backup_server_tls_handshakes_total{outcome=\"failed\"} 0",
            "backup_server_commit_duration_seconds_count{listener=\"secure\",what=\"snapshot\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn exposes_the_last_scrub_once_one_ran() {
        let dir = tempfile::tempdir().unwrap();
        let m = Metrics::new(Some(dir.path()));
        assert!(!m.encode().contains("scrub"), "no scrub yet");
        ScrubStatus {
            finished_at: 1_700_000_000,
            versions_checked: 5,
            versions_damaged: 1,
            packs_checked: 3,
            packs_damaged: 0,
            packs_repaired: 0,
        }
        .save(dir.path())
        .unwrap();
        let text = m.encode();
        assert!(
            text.contains("backup_server_scrub_damaged{what=\"versions\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("backup_server_scrub_last_finished_timestamp_seconds 1700000000\n"),
            "{text}"
        );
    }

    #[test]
    fn names_the_backend_of_a_storage_error() {
        let io = StorageError::io(
            "write",
            Path::new("x"),
            std::io::ErrorKind::PermissionDenied.into(),
        );
        assert_eq!((backend_of(&io), kind_of(&io)), ("fs", "io"));
        let sql = StorageError::from(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
            None,
        ));
        assert_eq!((backend_of(&sql), kind_of(&sql)), ("sqlite", "unavailable"));
        let batch = StorageError::Batch("x".into());
        assert_eq!(backend_of(&batch), "other");
    }
}
