//! Per-client quotas of the snapshot repository against the real binaries
//! (`docs/PROTOCOL.md` §13.9): one byte over the quota a backup is refused
//! (1682, exit status 8) with nothing committed, exactly at it commits,
//! two backups of one client racing near the limit never both commit, and
//! once the operator raises the quota the next run completes and restores.
//! The operator's views (`clients --json`, `snapshots CLIENT --json`) are
//! checked against what was backed up. Per-file backups are charged too:
//! a file over the quota is refused (1682 in secure mode, 1607 on the
//! legacy listener) and the files that fit are stored.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use support::processes::{free_port, run_client, server_binary, stderr};
use support::write_file;

const LIMIT: Duration = Duration::from_secs(180);

/// `backup-server` on a data directory of its own, killed when dropped.
struct Server {
    addr: SocketAddr,
    data: PathBuf,
    log: PathBuf,
    child: std::process::Child,
}

impl Server {
    fn start(dir: &Path) -> Self {
        Self::start_with(dir, &[])
    }

    /// [`Server::start`] with more arguments.
    fn start_with(dir: &Path, extra: &[&str]) -> Self {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let data = dir.join("data");
        let log = dir.join("server.log");
        let child = std::process::Command::new(server_binary())
            .args(["--listen", &addr.to_string()])
            .args(extra)
            .arg("--data-dir")
            .arg(&data)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "the server did not listen: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            addr,
            data,
            log,
            child,
        }
    }

    /// An operator command on the server's data directory; its stdout.
    fn admin(&self, args: &[&str]) -> String {
        let out = std::process::Command::new(server_binary())
            .args(args)
            .arg("--data-dir")
            .arg(&self.data)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "backup-server {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            stderr(&out)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// `clients --json`, by client name.
    fn clients(&self) -> BTreeMap<String, serde_json::Value> {
        let v: serde_json::Value =
            serde_json::from_str(&self.admin(&["clients", "--json"])).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|c| (c["name"].as_str().unwrap().to_owned(), c.clone()))
            .collect()
    }

    /// Bytes client `name` is charged.
    fn stored(&self, name: &str) -> u64 {
        self.clients()[name]["stored_bytes"].as_u64().unwrap()
    }

    /// `snapshots NAME --json`.
    fn snapshots(&self, name: &str) -> Vec<serde_json::Value> {
        let v: serde_json::Value =
            serde_json::from_str(&self.admin(&["snapshots", name, "--json"])).unwrap();
        v.as_array().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A registered client: its configuration directory.
struct Client<'a> {
    server: &'a Server,
    config: PathBuf,
}

impl<'a> Client<'a> {
    async fn register(server: &'a Server, dir: &Path, name: &str) -> Self {
        let c = Self {
            server,
            config: dir.join(format!("config-{name}")),
        };
        let out = c.run(&["register", "--name", name]).await;
        assert!(out.status.success(), "register {name}: {}", stderr(&out));
        c
    }

    async fn run(&self, args: &[&str]) -> Output {
        let addr = self.server.addr.to_string();
        let mut all = vec!["--server", addr.as_str()];
        all.extend_from_slice(args);
        run_client(&self.config, &all, LIMIT).await
    }

    /// `backup --json FOLDER`: the run's output and its JSON (Null when it
    /// printed none).
    async fn backup(&self, folder: &Path) -> (Output, serde_json::Value) {
        let out = self
            .run(&["--json", "backup", &folder.to_string_lossy()])
            .await;
        let v = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        (out, v)
    }

    /// Restores snapshot `id` and checks that `folder` comes back byte for
    /// byte.
    async fn assert_restores(&self, id: u64, folder: &Path, files: &BTreeMap<String, Vec<u8>>) {
        let to = self
            .config
            .with_file_name(format!("restored-{}-{id}", rand_suffix()));
        let out = self
            .run(&["restore", &id.to_string(), "--to", &to.to_string_lossy()])
            .await;
        assert!(out.status.success(), "restore {id}: {}", stderr(&out));
        let name = folder.file_name().unwrap();
        for (file, content) in files {
            let got = std::fs::read(to.join(name).join(file)).unwrap();
            assert!(got == *content, "snapshot {id}: {file} differs");
        }
    }
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// A folder of files of these lengths (pattern bytes: incompressible).
fn folder(path: &Path, files: &[(&str, usize, u32)]) -> BTreeMap<String, Vec<u8>> {
    files
        .iter()
        .map(|(name, len, seed)| {
            (
                (*name).to_owned(),
                write_file(&path.join(name), *len, *seed),
            )
        })
        .collect()
}

fn assert_refused_for_quota(out: &Output, v: &serde_json::Value) {
    assert_eq!(
        out.status.code(),
        Some(8),
        "exit status: {} {v}",
        stderr(out)
    );
    assert_eq!(v["ok"], false, "{v}");
    assert_eq!(v["error"]["kind"], "quota_exceeded", "{v}");
    let message = v["error"]["message"].as_str().unwrap_or_default();
    assert!(message.starts_with("backup refused"), "{message}");
    assert!(message.contains("nothing was committed"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_at_the_quota_commits_one_byte_over_is_refused_and_raising_it_lets_the_run_complete(
) {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let data = dir.path().join("folder");
    let files = folder(
        &data,
        &[
            ("a.bin", 700_000, 1),
            ("b.bin", 2_500_000, 2),
            ("c.bin", 30_000, 3),
        ],
    );
    // A probe client backs the folder up twice (below: dedup).
    let probe = Client::register(&server, dir.path(), "probe").await;
    let (out, first) = probe.backup(&data).await;
    assert!(out.status.success(), "probe: {}", stderr(&out));
    let cost = server.stored("probe");
    assert!(cost > 3_200_000, "{cost}");

    // What the folder costs this client: the pack a quota of 0 refuses.
    // (Another client's trees hold other ids, so its cost differs by a
    // few compressed bytes.)
    let edge = Client::register(&server, dir.path(), "edge").await;
    server.admin(&["quota", "edge", "0"]);
    let (out, v) = edge.backup(&data).await;
    assert_refused_for_quota(&out, &v);
    let size = v["error"]["size"].as_u64().unwrap();
    assert_eq!(v["error"]["stored"].as_u64(), Some(0), "{v}");
    assert!(size > 2_500_000, "{size}");

    // One byte over: refused, nothing kept, nothing committed.
    server.admin(&["quota", "edge", &(size - 1).to_string()]);
    let (out, v) = edge.backup(&data).await;
    assert_refused_for_quota(&out, &v);
    assert_eq!(v["error"]["size"].as_u64(), Some(size), "the same pack");
    assert_eq!(v["error"]["quota"].as_u64(), Some(size - 1), "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("it stores 0 B and a pack of"), "{message}");
    assert_eq!(server.stored("edge"), 0, "the refused pack was not kept");
    assert!(server.snapshots("edge").is_empty(), "nothing committed");
    assert!(
        std::fs::read_to_string(&server.log)
            .unwrap()
            .contains("pack refused: over the client's quota"),
        "the refusal is logged"
    );

    // The operator raises it to exactly what the run needs: it completes,
    // and restores.
    let said = server.admin(&["quota", "edge", &size.to_string()]);
    assert!(said.contains("(was "), "{said}");
    let (out, v) = edge.backup(&data).await;
    assert!(
        out.status.success(),
        "exactly at the quota: {}",
        stderr(&out)
    );
    let listed = server.clients();
    assert_eq!(listed["edge"]["stored_bytes"].as_u64(), Some(size));
    assert_eq!(listed["edge"]["quota_bytes"].as_u64(), Some(size));
    assert_eq!(listed["edge"]["quota_source"], "client");
    edge.assert_restores(v["snapshot"].as_u64().unwrap(), &data, &files)
        .await;
    // At the quota, anything more is refused.
    let more = dir.path().join("more");
    folder(&more, &[("m.bin", 100, 4)]);
    let (out, v) = edge.backup(&more).await;
    assert_refused_for_quota(&out, &v);
    assert_eq!(v["error"]["stored"].as_u64(), Some(size), "{v}");

    // Two identical backups: stored once, counted twice.
    let (out, second) = probe.backup(&data).await;
    assert!(out.status.success(), "second probe: {}", stderr(&out));
    let p = &server.clients()["probe"];
    assert_eq!(p["snapshots"].as_u64(), Some(2), "{p}");
    assert_eq!(p["stored_bytes"].as_u64(), Some(cost), "nothing new stored");
    assert_eq!(p["logical_bytes"].as_u64(), Some(2 * cost), "{p}");
    let ratio = p["dedup_ratio"].as_f64().unwrap();
    assert!((ratio - 2.0).abs() < 1e-9, "{ratio}");
    assert_eq!(p["quota_bytes"], serde_json::Value::Null);
    assert!(p["last_backup"].as_str().is_some(), "{p}");
    let snaps = server.snapshots("probe");
    let ids: Vec<u64> = snaps.iter().map(|s| s["id"].as_u64().unwrap()).collect();
    assert_eq!(
        ids,
        vec![
            first["snapshot"].as_u64().unwrap(),
            second["snapshot"].as_u64().unwrap()
        ]
    );
    for s in &snaps {
        assert_eq!(s["logical_bytes"].as_u64(), Some(cost), "{s}");
        assert_eq!(s["unique_bytes"].as_u64(), Some(0), "all shared: {s}");
        assert_eq!(s["objects"], snaps[0]["objects"]);
    }
    // The text views are aligned tables with human sizes.
    let text = server.admin(&["clients"]);
    let head = text.lines().next().unwrap();
    assert!(head.starts_with("NAME"), "{text}");
    assert!(text.contains("2.00x"), "{text}");
    assert!(text.contains(" MiB"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_backups_of_one_client_near_the_limit_never_both_commit() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let client = Client::register(&server, dir.path(), "pair").await;
    // A first small snapshot makes the repository key, so the racers only
    // upload their folders.
    let small = dir.path().join("small");
    folder(&small, &[("s.bin", 1000, 9)]);
    let (out, _) = client.backup(&small).await;
    assert!(out.status.success(), "first: {}", stderr(&out));
    let base = server.stored("pair");
    // Two folders of 20 MiB (two packs each): either fits, both do not.
    let one = dir.path().join("one");
    let two = dir.path().join("two");
    let files_one = folder(&one, &[("one.bin", 20 << 20, 11)]);
    let files_two = folder(&two, &[("two.bin", 20 << 20, 12)]);
    let quota = base + (30 << 20);
    server.admin(&["quota", "pair", &quota.to_string()]);

    let ((out_one, v_one), (out_two, v_two)) =
        tokio::join!(client.backup(&one), client.backup(&two));
    let runs = [
        (&out_one, &v_one, &one, &files_one),
        (&out_two, &v_two, &two, &files_two),
    ];
    let committed: Vec<_> = runs.iter().filter(|r| r.0.status.success()).collect();
    assert!(committed.len() <= 1, "both committed past the quota");
    let refused: Vec<_> = runs.iter().filter(|r| !r.0.status.success()).collect();
    assert!(!refused.is_empty());
    for (out, v, _, _) in &refused {
        assert_refused_for_quota(out, v);
    }
    let stored = server.stored("pair");
    assert!(stored <= quota, "{stored} > {quota}");
    assert_eq!(
        server.snapshots("pair").len(),
        1 + committed.len(),
        "a refused run committed nothing"
    );
    for (_, v, folder, files) in &committed {
        client
            .assert_restores(v["snapshot"].as_u64().unwrap(), folder, files)
            .await;
    }

    // No quota any more: the refused runs complete and restore.
    let said = server.admin(&["quota", "pair", "none"]);
    assert!(said.contains("quota none"), "{said}");
    for (_, _, folder, files) in &refused {
        let (out, v) = client.backup(folder).await;
        assert!(out.status.success(), "after the raise: {}", stderr(&out));
        client
            .assert_restores(v["snapshot"].as_u64().unwrap(), folder, files)
            .await;
    }
    assert_eq!(server.snapshots("pair").len(), 3);
}

/// A per-file run's files by name: (status, error kind, the error's
/// `stored` and `size`).
fn per_file_outcomes(v: &serde_json::Value) -> BTreeMap<String, (String, String, u64, u64)> {
    v["files"]
        .as_array()
        .unwrap_or_else(|| panic!("no files: {v}"))
        .iter()
        .map(|f| {
            let e = &f["error"];
            (
                f["name"].as_str().unwrap().to_owned(),
                (
                    f["status"].as_str().unwrap().to_owned(),
                    e["kind"].as_str().unwrap_or_default().to_owned(),
                    e["stored"].as_u64().unwrap_or(0),
                    e["size"].as_u64().unwrap_or(0),
                ),
            )
        })
        .collect()
}

/// Names the server keeps for `client` (`list --json`).
async fn listed_files(client: &Client<'_>) -> Vec<String> {
    let out = client.run(&["--per-file", "--json", "list"]).await;
    assert!(out.status.success(), "list: {}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_file_backups_are_charged_and_a_file_over_the_quota_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let legacy = format!("127.0.0.1:{}", free_port());
    let server = Server::start_with(dir.path(), &["--legacy-listen", &legacy]);
    let client = Client::register(&server, dir.path(), "files").await;
    server.admin(&["quota", "files", "250000"]);
    let first = dir.path().join("first");
    folder(&first, &[("a.bin", 200_000, 1)]);
    let out = client
        .run(&["--per-file", "--json", "backup", &first.to_string_lossy()])
        .await;
    assert!(out.status.success(), "first: {}", stderr(&out));
    let c = &server.clients()["files"];
    assert_eq!(
        (
            c["stored_bytes"].as_u64(),
            c["file_bytes"].as_u64(),
            c["charged_bytes"].as_u64()
        ),
        (Some(0), Some(200_000), Some(200_000)),
        "{c}"
    );

    // b (small: refused at its commit) and d (large: refused as it
    // starts) cannot fit; c can, and is stored whatever the order.
    let more = dir.path().join("more");
    let files = folder(
        &more,
        &[
            ("b.bin", 60_000, 2),
            ("c.bin", 40_000, 3),
            ("d.bin", 100_000, 4),
        ],
    );
    let out = client
        .run(&["--per-file", "--json", "backup", &more.to_string_lossy()])
        .await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(8), "{v} {}", stderr(&out));
    let got = per_file_outcomes(&v);
    let quota = "quota_exceeded".to_owned();
    assert_eq!(
        got["b.bin"],
        ("failed".into(), quota.clone(), 200_000, 60_000),
        "{v}"
    );
    assert_eq!(got["c.bin"].0, "stored", "{v}");
    let d = &got["d.bin"];
    assert_eq!(
        (&d.0, &d.1, d.3),
        (&"failed".to_owned(), &quota, 100_000),
        "{v}"
    );
    assert!([200_000, 240_000].contains(&d.2), "{v}");
    let message = v["files"][0]["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("b.bin of 58.6 KiB did not fit"),
        "{message}"
    );
    assert!(message.contains("nothing of it was committed"), "{message}");
    assert!(message.contains("backup-client delete"), "{message}");
    assert_eq!(
        server.clients()["files"]["charged_bytes"].as_u64(),
        Some(240_000)
    );
    assert_eq!(listed_files(&client).await, ["a.bin", "c.bin"]);

    // Deleting a file makes room: the next run stores all three (c as a
    // second version), 240 000 bytes in all, and each restores.
    let out = client.run(&["--per-file", "delete", "a.bin"]).await;
    assert!(out.status.success(), "delete: {}", stderr(&out));
    assert_eq!(
        server.clients()["files"]["charged_bytes"].as_u64(),
        Some(40_000)
    );
    let out = client
        .run(&["--per-file", "--json", "backup", &more.to_string_lossy()])
        .await;
    assert!(out.status.success(), "after the delete: {}", stderr(&out));
    assert_eq!(
        server.clients()["files"]["charged_bytes"].as_u64(),
        Some(240_000)
    );
    let to = dir.path().join("restored");
    std::fs::create_dir_all(&to).unwrap();
    for (name, content) in &files {
        let out = client
            .run(&["--per-file", "restore", name, "--to", &to.to_string_lossy()])
            .await;
        assert!(out.status.success(), "restore {name}: {}", stderr(&out));
        assert!(
            std::fs::read(to.join(name)).unwrap() == *content,
            "{name} differs"
        );
    }

    // The legacy listener can say only 1607: nothing is stored, and the
    // server says why in its log.
    let old = Client {
        server: &server,
        config: dir.path().join("config-legacy"),
    };
    let run_legacy = |args: &[&str]| {
        let mut all = vec!["--legacy", "--server", legacy.as_str()];
        all.extend_from_slice(args);
        let config = old.config.clone();
        let all: Vec<String> = all.iter().map(|s| (*s).to_owned()).collect();
        async move {
            let all: Vec<&str> = all.iter().map(String::as_str).collect();
            run_client(&config, &all, LIMIT).await
        }
    };
    let out = run_legacy(&["register", "--name", "old"]).await;
    assert!(out.status.success(), "register: {}", stderr(&out));
    server.admin(&["quota", "old", "1000"]);
    let out = run_legacy(&["backup", &more.to_string_lossy()]).await;
    assert!(
        !out.status.success(),
        "over the quota on the legacy listener"
    );
    let old_view = &server.clients()["old"];
    assert_eq!(old_view["charged_bytes"].as_u64(), Some(0), "{old_view}");
    assert_eq!(old_view["versions"].as_u64(), Some(0), "{old_view}");
    let log = std::fs::read_to_string(&server.log).unwrap();
    assert!(
        log.contains("file refused: over the client's quota stored=0 quota=1000"),
        "{log}"
    );
}
