//! The server's metrics during real backups, from the real binaries:
//! `backup-server --metrics-listen` scraped before and after a per-file
//! backup, a snapshot and an unchanged second snapshot, the exposition
//! parsed with a Prometheus text parser and the deltas checked; then a
//! `backup-server scrub`, whose result the next scrape shows.

mod support;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use prometheus_parse::{Scrape, Value};
use support::processes::{free_port, run_client, server_binary, stderr, ServerProcess};
use support::write_file;

const LIMIT: Duration = Duration::from_secs(120);

/// `GET path` on the metrics listener: the status code and the body.
fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(LIMIT)).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    (
        head.split(' ').nth(1).unwrap().parse().unwrap(),
        body.to_owned(),
    )
}

fn scrape(addr: SocketAddr) -> Scrape {
    let (status, body) = get(addr, "/metrics");
    assert_eq!(status, 200, "{body}");
    Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).unwrap()
}

/// The value of `name{labels}`, 0 when the series does not exist yet (a
/// labelled series appears with its first event).
fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<f64> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            other => panic!("{name}: {other:?}"),
        })
        .collect();
    assert!(found.len() <= 1, "{name}{labels:?}: {found:?}");
    found.first().copied().unwrap_or(0.0)
}

const SECURE: (&str, &str) = ("listener", "secure");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_move_by_what_a_backup_did() {
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let server = ServerProcess::start(&["--metrics-listen", &metrics.to_string()]);
    let mut up = false;
    for _ in 0..200 {
        if std::net::TcpStream::connect(metrics).is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(up, "no metrics listener: {}", server.log());
    assert_eq!(get(metrics, "/healthz").0, 200);
    assert_eq!(get(metrics, "/readyz").0, 200);

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config");
    let addr = server.addr.to_string();
    let out = run_client(
        &config,
        &["--server", &addr, "register", "--name", "m"],
        LIMIT,
    )
    .await;
    assert!(out.status.success(), "register: {}", stderr(&out));

    // Per-file backup: two files, each a committed upload.
    let a = dir.path().join("a.bin");
    let b = dir.path().join("b.bin");
    let sizes = [
        write_file(&a, 20_000, 1).len(),
        write_file(&b, 200_000, 2).len(),
    ];
    let before = scrape(metrics);
    let (a, b) = (a.display().to_string(), b.display().to_string());
    let out = run_client(
        &config,
        &["--server", &addr, "--per-file", "backup", &a, &b],
        LIMIT,
    )
    .await;
    assert!(out.status.success(), "per-file backup: {}", stderr(&out));
    let after = scrape(metrics);
    let delta = |name: &str, labels: &[(&str, &str)]| {
        value(&after, name, labels) - value(&before, name, labels)
    };
    assert_eq!(
        delta("backup_server_uploads_committed_total", &[SECURE]),
        2.0
    );
    assert_eq!(
        delta("backup_server_upload_committed_bytes_total", &[SECURE]),
        (sizes[0] + sizes[1]) as f64
    );
    assert_eq!(
        delta(
            "backup_server_commit_duration_seconds_count",
            &[SECURE, ("what", "upload")]
        ),
        2.0
    );
    assert!(delta("backup_server_received_bytes_total", &[SECURE]) >= (sizes[0] + sizes[1]) as f64);
    assert!(delta("backup_server_tls_handshakes_total", &[("outcome", "ok")]) >= 1.0);
    assert_eq!(
        delta(
            "backup_server_tls_handshakes_total",
            &[("outcome", "failed")]
        ),
        0.0
    );
    assert_eq!(
        delta(
            "backup_server_uploads_committed_total",
            &[("listener", "legacy")]
        ),
        0.0
    );

    // A snapshot of a folder: one snapshot committed, its packs stored.
    let folder = dir.path().join("folder");
    let total: usize = (0..4u32)
        .map(|i| write_file(&folder.join(format!("f{i}.bin")), 150_000, 10 + i).len())
        .sum();
    let folder = folder.display().to_string();
    let before = scrape(metrics);
    let out = run_client(&config, &["--server", &addr, "backup", &folder], LIMIT).await;
    assert!(out.status.success(), "snapshot: {}", stderr(&out));
    let after = scrape(metrics);
    let delta = |name: &str, labels: &[(&str, &str)]| {
        value(&after, name, labels) - value(&before, name, labels)
    };
    assert_eq!(
        delta("backup_server_snapshots_committed_total", &[SECURE]),
        1.0
    );
    let packs = delta("backup_server_packs_stored_total", &[SECURE]);
    assert!(packs >= 1.0, "{packs}");
    assert_eq!(
        delta(
            "backup_server_commit_duration_seconds_count",
            &[SECURE, ("what", "pack")]
        ),
        packs
    );
    assert_eq!(
        delta(
            "backup_server_commit_duration_seconds_count",
            &[SECURE, ("what", "snapshot")]
        ),
        1.0
    );
    assert!(delta("backup_server_received_bytes_total", &[SECURE]) >= total as f64);
    assert_eq!(
        delta("backup_server_dedup_bytes_total", &[SECURE]),
        0.0,
        "nothing stored before"
    );

    // The folder again with a copy of a file under a new name: its chunks
    // are asked about, the server already holds them, and counts them as
    // saved.
    let copy = std::path::Path::new(&folder).join("copy.bin");
    std::fs::copy(std::path::Path::new(&folder).join("f0.bin"), &copy).unwrap();
    let copied = 150_000.0;
    let before = scrape(metrics);
    let out = run_client(&config, &["--server", &addr, "backup", &folder], LIMIT).await;
    assert!(out.status.success(), "second snapshot: {}", stderr(&out));
    let after = scrape(metrics);
    let delta = |name: &str, labels: &[(&str, &str)]| {
        value(&after, name, labels) - value(&before, name, labels)
    };
    assert_eq!(
        delta("backup_server_snapshots_committed_total", &[SECURE]),
        1.0
    );
    assert!(delta("backup_server_dedup_objects_total", &[SECURE]) >= 1.0);
    let saved = delta("backup_server_dedup_bytes_total", &[SECURE]);
    assert!(saved >= copied, "{saved} of {copied}");
    let failed: f64 = after
        .samples
        .iter()
        .filter(|s| s.metric == "backup_server_storage_errors_total")
        .map(|s| match s.value {
            Value::Counter(v) | Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum();
    assert_eq!(failed, 0.0);

    // A scrub beside the running server: its result is in the next scrape.
    let out = std::process::Command::new(server_binary())
        .args(["scrub", "--data-dir"])
        .arg(server.data.path().join("data"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "scrub: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = scrape(metrics);
    assert_eq!(
        value(&after, "backup_server_scrub_damaged", &[("what", "packs")]),
        0.0
    );
    assert_eq!(
        value(
            &after,
            "backup_server_scrub_damaged",
            &[("what", "versions")]
        ),
        0.0
    );
    assert_eq!(
        value(
            &after,
            "backup_server_scrub_checked",
            &[("what", "versions")]
        ),
        2.0
    );
    assert!(value(&after, "backup_server_scrub_checked", &[("what", "packs")]) >= packs);
}
