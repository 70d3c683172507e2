//! The metrics and health listener: scraped before and after real traffic,
//! the exposition parsed with a Prometheus text parser, and the deltas
//! checked exactly; `/healthz`, `/readyz` (also when storage is gone) and
//! the Grafana dashboard's queries against the series the server exposes.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use prometheus_parse::{Scrape, Value};
use protocol::{Numbering, Request, Response};
use server::{Config, ServerError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::harness::{alice_key, config, init_logs, random_bytes, Client, Peer, STEP};

/// The library server with both client listeners and the metrics one.
struct Served {
    legacy: SocketAddr,
    secure: SocketAddr,
    metrics: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServerError>>>,
}

impl Served {
    async fn start(config: Config) -> Self {
        init_logs();
        let bind = || TcpListener::bind("127.0.0.1:0");
        let (legacy, secure, metrics) = (
            bind().await.unwrap(),
            bind().await.unwrap(),
            bind().await.unwrap(),
        );
        let addrs = (
            legacy.local_addr().unwrap(),
            secure.local_addr().unwrap(),
            metrics.local_addr().unwrap(),
        );
        let listeners = server::Listeners::both(secure, legacy).with_metrics(metrics);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server::run(listeners, config, async move {
            let _ = stopped.await;
        }));
        Self {
            legacy: addrs.0,
            secure: addrs.1,
            metrics: addrs.2,
            stop: Some(stop),
            task: Some(task),
        }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let task = self.task.take().unwrap();
        tokio::time::timeout(STEP, task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }

    async fn scrape(&self) -> Scrape {
        let (status, body) = get(self.metrics, "GET", "/metrics").await;
        assert_eq!(status, 200, "{body}");
        assert!(body.ends_with("# EOF\n"), "not OpenMetrics: {body}");
        Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).unwrap()
    }

    /// Scrapes until `name{labels}` reads `want` (the server counts some
    /// events just after the client sees their effect), then returns that
    /// scrape; fails if it never does.
    async fn scrape_until(&self, name: &str, labels: &[(&str, &str)], want: f64) -> Scrape {
        let mut last = 0.0;
        for _ in 0..200 {
            let scrape = self.scrape().await;
            last = value(&scrape, name, labels);
            if last == want {
                return scrape;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("{name}{labels:?} stayed at {last}, expected {want}");
    }
}

/// One HTTP/1.1 request; the status code and the body.
async fn get(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut stream = tokio::time::timeout(STEP, TcpStream::connect(addr))
        .await
        .unwrap()
        .unwrap();
    let request =
        format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(STEP, stream.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let answer = String::from_utf8(answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, body.to_owned())
}

/// The value of the sample `name` whose labels include `labels`; exactly
/// one must match.
fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<f64> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            other => panic!("{name}: not a single value: {other:?}"),
        })
        .collect();
    assert_eq!(found.len(), 1, "{name}{labels:?}: {found:?}");
    found[0]
}

const LEGACY: (&str, &str) = ("listener", "legacy");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_uploads_bytes_requests_and_refused_proofs_exactly() {
    let data = tempfile::tempdir().unwrap();
    let server = Served::start(config(data.path())).await;
    let before = server.scrape().await;
    let at = |s: &Scrape, name: &str, labels: &[(&str, &str)]| value(s, name, labels);
    // A labelled series appears with its first event: absent before is 0.
    let was =
        |name: &str, labels: &[(&str, &str)]| {
            if before.samples.iter().any(|s| {
                s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
            }) {
                value(&before, name, labels)
            } else {
                0.0
            }
        };

    let mut c = Client::register(server.legacy, "metered", &alice_key(), Numbering::Modern).await;
    // One small file (kept in the database), one large (a blob), one tiny.
    let files = [
        ("a.bin", random_bytes(10_000, 1)),
        ("b.bin", random_bytes(300_000, 2)),
        ("c.txt", b"hello".to_vec()),
    ];
    let payload: usize = files.iter().map(|(_, f)| f.len()).sum();
    for (name, content) in &files {
        c.store(name, content, 16 * 1024).await;
    }
    // A request is counted once handled, just after its answer went out.
    let crc_ok = [LEGACY, ("kind", "crc_ok"), ("outcome", "ok")];
    let after = server
        .scrape_until(
            "backup_server_requests_total",
            &crc_ok,
            was("backup_server_requests_total", &crc_ok) + 3.0,
        )
        .await;
    let delta = |name: &str, labels: &[(&str, &str)]| at(&after, name, labels) - was(name, labels);

    assert_eq!(
        delta("backup_server_uploads_committed_total", &[LEGACY]),
        3.0
    );
    assert_eq!(
        delta("backup_server_upload_committed_bytes_total", &[LEGACY]),
        payload as f64
    );
    assert_eq!(
        delta(
            "backup_server_commit_duration_seconds_count",
            &[LEGACY, ("what", "upload")]
        ),
        3.0
    );
    assert_eq!(
        delta(
            "backup_server_requests_total",
            &[LEGACY, ("kind", "crc_ok"), ("outcome", "ok")]
        ),
        3.0
    );
    assert_eq!(
        delta(
            "backup_server_requests_total",
            &[LEGACY, ("kind", "register"), ("outcome", "ok")]
        ),
        1.0
    );
    // The content went over the wire encrypted, with headers: more bytes
    // than the files hold.
    assert!(
        delta("backup_server_received_bytes_total", &[LEGACY]) >= payload as f64,
        "{}",
        delta("backup_server_received_bytes_total", &[LEGACY])
    );
    assert!(delta("backup_server_sent_bytes_total", &[LEGACY]) > 0.0);
    assert_eq!(
        delta("backup_server_connections_opened_total", &[LEGACY]),
        1.0
    );
    assert_eq!(at(&after, "backup_server_connections_open", &[LEGACY]), 1.0);
    assert_eq!(
        delta(
            "backup_server_uploads_committed_total",
            &[("listener", "secure")]
        ),
        0.0
    );
    let failed: f64 = after
        .samples
        .iter()
        .filter(|s| s.metric == "backup_server_storage_errors_total")
        .map(|s| match s.value {
            Value::Counter(v) | Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum();
    assert_eq!(failed, 0.0, "no storage error");

    // A wrong proof of the key: refused (1651), counted once.
    let id = c.id;
    drop(c);
    let mut c = Client::reconnect(
        server.legacy,
        id,
        "metered",
        &alice_key(),
        Numbering::Modern,
    )
    .await
    .unwrap();
    c.peer
        .send(c.frame(Request::Prove { proof: [0x5a; 32] }))
        .await;
    assert_eq!(c.peer.closed().await, vec![Response::NotAuthenticated]);
    // The request is counted after the refusal it led to.
    let later = server
        .scrape_until(
            "backup_server_requests_total",
            &[LEGACY, ("kind", "prove"), ("outcome", "rejected")],
            1.0,
        )
        .await;
    let proofs = [LEGACY, ("reason", "rejected")];
    assert_eq!(
        value(&later, "backup_server_client_proofs_failed_total", &proofs),
        at(&after, "backup_server_client_proofs_failed_total", &proofs) + 1.0
    );

    // A TLS handshake that fails: counted as failed, not as ok.
    let mut raw = TcpStream::connect(server.secure).await.unwrap();
    raw.write_all(b"this is not a TLS client hello\r\n\r\n")
        .await
        .unwrap();
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(STEP, raw.read_to_end(&mut sink)).await;
    let later = server
        .scrape_until(
            "backup_server_tls_handshakes_total",
            &[("outcome", "failed")],
            1.0,
        )
        .await;
    assert_eq!(
        value(
            &later,
            "backup_server_tls_handshakes_total",
            &[("outcome", "ok")]
        ),
        0.0
    );
    // Every connection closed: none counted open.
    server
        .scrape_until("backup_server_connections_open", &[LEGACY], 0.0)
        .await;
    server
        .scrape_until(
            "backup_server_connections_open",
            &[("listener", "secure")],
            0.0,
        )
        .await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_a_connection_refused_at_capacity() {
    let data = tempfile::tempdir().unwrap();
    let mut cfg = config(data.path());
    cfg.max_connections = 1;
    let server = Served::start(cfg).await;
    let held = Client::register(server.legacy, "holder", &alice_key(), Numbering::Modern).await;
    let mut refused = Peer::connect(server.legacy).await;
    refused.expect_1607_and_close().await;
    let scrape = server
        .scrape_until(
            "backup_server_connections_refused_total",
            &[LEGACY, ("reason", "at_capacity")],
            1.0,
        )
        .await;
    assert_eq!(
        value(
            &scrape,
            "backup_server_connections_refused_total",
            &[LEGACY, ("reason", "source_limit")]
        ),
        0.0
    );
    assert_eq!(
        value(&scrape, "backup_server_connections_opened_total", &[LEGACY]),
        1.0
    );
    drop(held);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_health_readiness_and_nothing_else() {
    let data = tempfile::tempdir().unwrap();
    let server = Served::start(config(data.path())).await;
    assert_eq!(
        get(server.metrics, "GET", "/healthz").await,
        (200, "ok\n".into())
    );
    assert_eq!(get(server.metrics, "GET", "/readyz").await.0, 200);
    assert_eq!(get(server.metrics, "GET", "/").await.0, 404);
    assert_eq!(get(server.metrics, "GET", "/metrics/extra").await.0, 404);
    assert_eq!(get(server.metrics, "POST", "/metrics").await.0, 405);

    // The data directory gone (moved away under the running server): new
    // uploads could not be stored, and readiness says so.
    let moved = data.path().with_extension("moved");
    std::fs::rename(data.path(), &moved).unwrap();
    let (status, body) = get(server.metrics, "GET", "/readyz").await;
    std::fs::rename(&moved, data.path()).unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.starts_with("not ready: "), "{body}");
    assert_eq!(get(server.metrics, "GET", "/healthz").await.0, 200);
    assert_eq!(get(server.metrics, "GET", "/readyz").await.0, 200);

    server.stop().await;
}

/// Every metric name a query of the Grafana dashboard uses.
fn dashboard_metrics() -> HashSet<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib/grafana/backup-server.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            exprs.push(target["expr"].as_str().unwrap().to_owned());
        }
    }
    assert!(exprs.len() >= 8, "{exprs:?}");
    let mut names = HashSet::new();
    for expr in exprs {
        let mut rest = expr.as_str();
        while let Some(at) = rest.find("backup_server_") {
            let tail = &rest[at..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            names.insert(tail[..end].to_owned());
            rest = &tail[end..];
        }
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grafana_dashboard_queries_only_metrics_the_server_exposes() {
    let data = tempfile::tempdir().unwrap();
    let server = Served::start(config(data.path())).await;
    // Requests are labelled by kind and outcome as they come.
    let _c = Client::register(server.legacy, "dash", &alice_key(), Numbering::Modern).await;
    // The scrub series appear once a scrub has run.
    server::metrics::ScrubStatus {
        finished_at: server::metrics::ScrubStatus::now(),
        ..Default::default()
    }
    .save(data.path())
    .unwrap();
    let scrape = server.scrape().await;
    let mut exposed = HashSet::new();
    for s in &scrape.samples {
        exposed.insert(s.metric.clone());
        if matches!(s.value, Value::Histogram(_)) {
            exposed.insert(format!("{}_bucket", s.metric));
        }
    }
    let queried = dashboard_metrics();
    let missing: Vec<&String> = queried.iter().filter(|n| !exposed.contains(*n)).collect();
    assert!(missing.is_empty(), "queried but not exposed: {missing:?}");
    for name in [
        "backup_server_tls_handshakes_total",
        "backup_server_client_proofs_failed_total",
        "backup_server_commit_duration_seconds_bucket",
        "backup_server_scrub_damaged",
        "backup_server_storage_errors_total",
    ] {
        assert!(queried.contains(name), "the dashboard does not show {name}");
    }
    server.stop().await;
}
