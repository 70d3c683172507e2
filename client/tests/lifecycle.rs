//! The snapshot repository's life cycle against the real binaries: the
//! operator's `backup-server prune` (retention by snapshot time, garbage
//! collection, repacking) racing backups, and killed midway, never loses
//! an object a snapshot references (`docs/PROTOCOL.md` §13.7).

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use support::processes::{free_port, run_client, server_binary, stderr};
use support::write_file;

const LIMIT: Duration = Duration::from_secs(120);

/// `backup-server` on a data directory that outlives it, so that it can be
/// killed and started again on the same data.
struct Server {
    addr: SocketAddr,
    data: PathBuf,
    log: PathBuf,
    child: std::process::Child,
}

impl Server {
    fn start(data: &Path, log: &Path, addr: SocketAddr) -> Self {
        let child = std::process::Command::new(server_binary())
            .args(["--listen", &addr.to_string()])
            .arg("--data-dir")
            .arg(data)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::options()
                    .create(true)
                    .append(true)
                    .open(log)
                    .unwrap(),
            )
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "the server did not listen: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            addr,
            data: data.to_owned(),
            log: log.to_owned(),
            child,
        }
    }

    /// SIGKILL, then a new server on the same data and address.
    fn kill_and_restart(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        *self = Self::start(&self.data.clone(), &self.log.clone(), self.addr);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A server and one registered client with a folder to back up.
struct Setup {
    server: Server,
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl Setup {
    async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let server = Server::start(
            &dir.path().join("data"),
            &dir.path().join("server.log"),
            addr,
        );
        let config = dir.path().join("config");
        let s = Self {
            server,
            dir,
            config,
        };
        let out = s.client(&["register", "--name", "life"]).await;
        assert!(out.status.success(), "register: {}", stderr(&out));
        s
    }

    async fn client(&self, args: &[&str]) -> Output {
        let addr = self.server.addr.to_string();
        let mut all = vec!["--server", addr.as_str()];
        all.extend_from_slice(args);
        run_client(&self.config, &all, LIMIT).await
    }

    async fn json(&self, args: &[&str]) -> (Output, serde_json::Value) {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.client(&all).await;
        let v = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        (out, v)
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// `backup-server prune` on the data directory with `args`.
    fn prune_command(&self, args: &[&str]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(server_binary());
        cmd.arg("prune")
            .arg("--data-dir")
            .arg(&self.server.data)
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        cmd
    }

    async fn prune(&self, args: &[&str]) -> Output {
        let out = self.prune_command(args).output().await.unwrap();
        assert!(
            out.status.success(),
            "prune: {}{}",
            String::from_utf8_lossy(&out.stdout),
            stderr(&out)
        );
        out
    }

    /// The snapshots the client lists, oldest first.
    async fn snapshot_ids(&self) -> Vec<u64> {
        let (out, listed) = self.json(&["snapshots"]).await;
        assert!(out.status.success(), "snapshots: {}", stderr(&out));
        listed["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["id"].as_u64().unwrap())
            .collect()
    }

    /// Restores snapshot `id` and checks it holds `files`, byte for byte.
    async fn assert_restores(&self, id: u64, files: &BTreeMap<String, Vec<u8>>) {
        let to = self.path(&format!("restored-{id}"));
        let out = self
            .client(&["restore", &id.to_string(), "--to", &to.to_string_lossy()])
            .await;
        assert!(out.status.success(), "restore {id}: {}", stderr(&out));
        for (name, content) in files {
            let got = std::fs::read(to.join("folder").join(name)).unwrap();
            assert!(got == *content, "snapshot {id}: {name} differs");
        }
        std::fs::remove_dir_all(&to).unwrap();
    }
}

/// Writes round `round`'s folder: two files that never change, one that
/// changes every round, one every third; returns the content by name.
fn write_round(folder: &Path, round: u32) -> BTreeMap<String, Vec<u8>> {
    std::fs::create_dir_all(folder).unwrap();
    let mut files = BTreeMap::new();
    for (name, len, seed) in [
        ("same-a.bin", 40_000, 1),
        ("same-b.bin", 9_000, 2),
        ("every.bin", 30_000 + round as usize * 7, 1000 + round),
        ("third.bin", 50_000, 5000 + round / 3),
    ] {
        files.insert(name.to_owned(), write_file(&folder.join(name), len, seed));
    }
    files
}

/// Bytes of the pack blobs on disk, and how many there are.
fn pack_blobs(data: &Path) -> (u64, usize) {
    let mut total = (0, 0);
    for client in std::fs::read_dir(data.join("clients")).unwrap() {
        let blobs = client.unwrap().path().join("blobs");
        let Ok(entries) = std::fs::read_dir(blobs) else {
            continue;
        };
        for e in entries {
            total.0 += e.unwrap().metadata().unwrap().len();
            total.1 += 1;
        }
    }
    total
}

/// Every object row's pack row exists and every pack row's blob exists
/// with its recorded size; returns (objects, packs).
fn assert_index_whole(data: &Path) -> (i64, i64) {
    let db = rusqlite::Connection::open(data.join("backup.db")).unwrap();
    let orphans: i64 = db
        .query_row(
            "SELECT count(*) FROM objects o WHERE NOT EXISTS (SELECT 1 FROM packs p WHERE p.id = o.pack)",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(orphans, 0, "objects without a pack");
    let dangling: i64 = db
        .query_row(
            "SELECT count(*) FROM snapshot_refs r WHERE NOT EXISTS (SELECT 1 FROM objects o WHERE o.id = r.object)",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(dangling, 0, "references to deleted objects");
    let mut stmt = db.prepare("SELECT blob, size FROM packs").unwrap();
    let packs: Vec<(String, i64)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    for (blob, size) in &packs {
        let path = data.join(blob);
        let len = std::fs::metadata(&path)
            .unwrap_or_else(|e| panic!("pack {blob}: {e}"))
            .len();
        assert_eq!(len, *size as u64, "pack {blob}");
    }
    let objects: i64 = db
        .query_row("SELECT count(*) FROM objects", [], |r| r.get(0))
        .unwrap();
    (objects, packs.len() as i64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_racing_backups_never_loses_what_a_snapshot_references() {
    let s = Setup::new().await;
    let folder = s.path("folder");
    let folder_arg = folder.to_string_lossy().into_owned();
    let started = Instant::now();

    // Prunes back to back, with the strictest grace (only what was touched
    // since the prune began is kept unreferenced), keeping the 3 newest
    // snapshots and repacking any pack a fifth dead.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let prunes = {
        let stop = stop.clone();
        let data = s.server.data.clone();
        tokio::spawn(async move {
            let (mut runs, mut reclaimed) = (0u32, 0u64);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || runs < 100 {
                let out = tokio::process::Command::new(server_binary())
                    .arg("prune")
                    .arg("--data-dir")
                    .arg(&data)
                    .args(["--grace", "0s", "--keep-last", "3"])
                    .args(["--repack-threshold", "20"])
                    .env("RUST_LOG", "warn")
                    .output()
                    .await
                    .unwrap();
                let text = String::from_utf8_lossy(&out.stdout).into_owned();
                assert!(out.status.success(), "prune {runs}: {text}{}", stderr(&out));
                reclaimed += text
                    .lines()
                    .find_map(|l| l.split("reclaimed ").nth(1))
                    .and_then(|r| r.split(' ').next())
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or(0);
                runs += 1;
            }
            (runs, reclaimed)
        })
    };

    let mut expected: BTreeMap<u64, BTreeMap<String, Vec<u8>>> = BTreeMap::new();
    let (mut ok, mut refused) = (0u32, 0u32);
    let rounds = 100;
    for round in 0..rounds {
        let files = write_round(&folder, round);
        let (out, summary) = s.json(&["backup", &folder_arg]).await;
        if out.status.success() {
            ok += 1;
            expected.insert(summary["snapshot"].as_u64().unwrap(), files);
        } else {
            // The only failure allowed: the server refused the commit
            // because a prune collected, between two "have" answers and the
            // commit, an object the backup relied on (exit 4, rejected).
            assert_eq!(
                out.status.code(),
                Some(4),
                "backup {round}: {}",
                stderr(&out)
            );
            assert!(
                stderr(&out).contains("did not commit the snapshot: reason 1"),
                "{}",
                stderr(&out)
            );
            refused += 1;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (runs, reclaimed) = prunes.await.unwrap();
    assert!(runs >= 100, "{runs} prunes");
    assert!(ok >= rounds / 2, "{ok} backups of {rounds} committed");

    // The last prune may have read the snapshots before the last commit;
    // one more applies the policy to them all.
    s.prune(&[
        "--grace",
        "0s",
        "--keep-last",
        "3",
        "--repack-threshold",
        "20",
    ])
    .await;
    // Every snapshot listed restores, with the content it was made of.
    let listed = s.snapshot_ids().await;
    assert_eq!(listed.len(), 3, "{listed:?}");
    for id in &listed {
        let files = expected
            .get(id)
            .unwrap_or_else(|| panic!("snapshot {id} unknown"));
        s.assert_restores(*id, files).await;
    }
    let (objects, packs) = assert_index_whole(&s.server.data);
    // A new backup after all that still works and restores.
    let files = write_round(&folder, rounds);
    let (out, summary) = s.json(&["backup", &folder_arg]).await;
    assert!(out.status.success(), "last backup: {}", stderr(&out));
    s.assert_restores(summary["snapshot"].as_u64().unwrap(), &files)
        .await;
    let (bytes, blobs) = pack_blobs(&s.server.data);
    println!(
        "prune racing backups: {runs} prunes, {ok} backups committed, {refused} refused, \
         {reclaimed} bytes reclaimed; left {objects} objects in {packs} packs ({blobs} blobs, \
         {bytes} bytes), {} s",
        started.elapsed().as_secs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prune_killed_at_any_moment_and_run_again_loses_nothing_referenced() {
    let mut s = Setup::new().await;
    let folder = s.path("folder");
    let folder_arg = folder.to_string_lossy().into_owned();
    let mut expected: BTreeMap<u64, BTreeMap<String, Vec<u8>>> = BTreeMap::new();
    let delays_ms = [0u64, 2, 5, 10, 20, 40, 80];
    let mut killed = 0;
    for (round, delay) in delays_ms.iter().enumerate() {
        // Three backups, so that each prune has snapshots to forget and
        // packs to remove and repack.
        for k in 0..3u32 {
            let files = write_round(&folder, round as u32 * 3 + k);
            let (out, summary) = s.json(&["backup", &folder_arg]).await;
            assert!(out.status.success(), "backup: {}", stderr(&out));
            expected.insert(summary["snapshot"].as_u64().unwrap(), files);
        }
        let mut child = s
            .prune_command(&[
                "--grace",
                "0s",
                "--keep-last",
                "2",
                "--repack-threshold",
                "10",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(*delay)).await;
        if child.try_wait().unwrap().is_none() {
            killed += 1;
        }
        child.start_kill().unwrap();
        child.wait().await.unwrap();
        // Every other round the server dies too, and recovers on restart.
        if round % 2 == 1 {
            s.server.kill_and_restart();
        }
        s.prune(&[
            "--grace",
            "0s",
            "--keep-last",
            "2",
            "--repack-threshold",
            "10",
        ])
        .await;
        assert_index_whole(&s.server.data);
        let listed = s.snapshot_ids().await;
        assert_eq!(listed.len(), 2, "{listed:?}");
        for id in &listed {
            s.assert_restores(*id, &expected[id]).await;
        }
    }
    // Nothing left to reclaim, and no blob that no pack row names.
    let dry = s.prune(&["--grace", "0s", "--dry-run"]).await;
    let text = String::from_utf8_lossy(&dry.stdout).into_owned();
    assert!(text.contains("would reclaim 0 bytes"), "{text}");
    s.server.kill_and_restart();
    let (_, packs) = assert_index_whole(&s.server.data);
    let (_, blobs) = pack_blobs(&s.server.data);
    assert_eq!(blobs as i64, packs);
    println!(
        "prune killed: {} rounds, {killed} prunes killed while running",
        delays_ms.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_by_policy_and_by_number_then_prune_reclaims_and_append_only_refuses() {
    let s = Setup::new().await;
    let folder = s.path("folder");
    let folder_arg = folder.to_string_lossy().into_owned();
    let mut expected: BTreeMap<u64, BTreeMap<String, Vec<u8>>> = BTreeMap::new();
    let mut ids = Vec::new();
    for round in 0..5 {
        let files = write_round(&folder, round);
        let (out, summary) = s.json(&["backup", &folder_arg]).await;
        assert!(out.status.success(), "backup: {}", stderr(&out));
        let id = summary["snapshot"].as_u64().unwrap();
        ids.push(id);
        expected.insert(id, files);
    }
    // Without a rule or a number: a usage error.
    let out = s.client(&["forget"]).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    // A dry run lists and removes nothing.
    let (out, dry) = s.json(&["forget", "--keep-last", "3", "--dry-run"]).await;
    assert!(out.status.success(), "forget --dry-run: {}", stderr(&out));
    let listed: Vec<u64> = dry["forget"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_u64().unwrap())
        .collect();
    assert_eq!(listed, ids[..2], "{dry}");
    assert_eq!(s.snapshot_ids().await, ids);
    let (out, done) = s.json(&["forget", "--keep-last", "3"]).await;
    assert!(out.status.success(), "forget: {}", stderr(&out));
    assert_eq!(done["removed"], 2, "{done}");
    let (out, done) = s.json(&["forget", &ids[2].to_string()]).await;
    assert!(out.status.success(), "forget {}: {}", ids[2], stderr(&out));
    assert_eq!(done["removed"], 1, "{done}");
    assert_eq!(s.snapshot_ids().await, ids[3..]);
    // A number that is not a snapshot: not found, nothing removed.
    let out = s.client(&["forget", "999999"]).await;
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));

    let before = pack_blobs(&s.server.data).0;
    let dry = s.prune(&["--grace", "0s", "--dry-run"]).await;
    let text = String::from_utf8_lossy(&dry.stdout).into_owned();
    assert!(text.contains("would delete"), "{text}");
    assert_eq!(
        pack_blobs(&s.server.data).0,
        before,
        "a dry run changed nothing"
    );
    s.prune(&["--grace", "0s", "--repack-threshold", "10"])
        .await;
    let after = pack_blobs(&s.server.data).0;
    assert!(after < before, "{after} bytes of packs, {before} before");
    for id in &ids[3..] {
        s.assert_restores(*id, &expected[id]).await;
    }
    assert_index_whole(&s.server.data);

    // Append-only: the client cannot forget; the operator's policy can.
    let out = std::process::Command::new(server_binary())
        .args(["append-only", "life", "on", "--data-dir"])
        .arg(&s.server.data)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let out = s.client(&["forget", &ids[3].to_string()]).await;
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("append-only"), "{}", stderr(&out));
    assert_eq!(s.snapshot_ids().await, ids[3..]);
    let out = s.prune(&["--grace", "0s", "--keep-last", "1"]).await;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains(&format!("snapshot {}", ids[3])), "{text}");
    assert_eq!(s.snapshot_ids().await, ids[4..]);
    s.assert_restores(ids[4], &expected[&ids[4]]).await;
    println!(
        "forget and prune: {before} bytes of packs before, {after} after forgetting 3 of 5 snapshots"
    );
}
