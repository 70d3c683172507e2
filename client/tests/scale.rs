//! Several servers on one repository (docs/SCALING.md), against the real
//! binaries, a real PostgreSQL and a real S3 service (SeaweedFS), both
//! started here: three servers behind a TCP load balancer serve any client
//! at any time with one shared TLS identity; a server without that
//! identity, or with another, refuses to start; of clients registering one
//! name at once on different servers exactly one wins; a server SIGKILLed
//! mid-upload leaves the others serving and every committed snapshot
//! restorable; the object store stopped for 10 s and PostgreSQL restarted
//! during uploads cost at most a clear error, never the server or a
//! snapshot. Skipped with a message when PostgreSQL or SeaweedFS is not
//! installed, unless `BACKUP_TEST_REQUIRE_PG` / `BACKUP_TEST_REQUIRE_S3`
//! is set (as `cargo xtask test` does).

mod support;

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use backup_test_support::{Postgres, SeaweedFs};
use support::balancer::Balancer;
use support::processes::{free_port, run_client, server_binary, stderr, ServerProcess};
use support::write_file;

const LIMIT: Duration = Duration::from_secs(240);

/// The shared stores of one repository.
struct Stores {
    weed: SeaweedFs,
    pg: Postgres,
    meta: String,
    blob_store: String,
}

impl Stores {
    fn start(test: &str) -> Option<Self> {
        let pg = Postgres::start(test)?;
        let weed = SeaweedFs::start(test)?;
        let meta = pg.database();
        let blob_store = format!("s3://{}/repo", weed.bucket());
        Some(Self {
            weed,
            pg,
            meta,
            blob_store,
        })
    }

    /// The flags every server of the repository is given.
    fn args(&self) -> Vec<String> {
        vec![
            "--blob-store".into(),
            self.blob_store.clone(),
            "--s3-endpoint".into(),
            self.weed.endpoint(),
            "--meta".into(),
            self.meta.clone(),
        ]
    }

    /// A server of the repository; from the second on, with a copy of the
    /// first one's identity (as the operator provisions it).
    fn server(&self, identity_from: Option<&ServerProcess>) -> ServerProcess {
        let args = self.args();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let dir = tempfile::tempdir().unwrap();
        if let Some(first) = identity_from {
            copy_identity(&first.data.path().join("data"), &dir.path().join("data"));
        }
        let server = ServerProcess::start_in(dir, &args, "info", &SeaweedFs::CREDENTIALS);
        wait_serving(&server);
        server
    }

    /// Three servers with one identity, and a balancer in front.
    async fn cluster(&self) -> (Vec<ServerProcess>, Balancer) {
        let first = self.server(None);
        let second = self.server(Some(&first));
        let third = self.server(Some(&first));
        let servers = vec![first, second, third];
        let balancer = Balancer::start(servers.iter().map(|s| s.addr).collect()).await;
        (servers, balancer)
    }

    /// Runs a server of the repository in `data` until it exits (it is
    /// expected to refuse to start); its output.
    fn refused_server(&self, data: &Path) -> Output {
        let mut cmd = std::process::Command::new(server_binary());
        cmd.args(["--listen", &format!("127.0.0.1:{}", free_port())])
            .arg("--data-dir")
            .arg(data)
            .args(self.args())
            .envs(SeaweedFs::CREDENTIALS)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null());
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("the server did not refuse to start within a minute");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        child.wait_with_output().unwrap()
    }
}

/// Waits until `server` says it serves secure mode: its port is bound
/// before its storage and identity are ready.
fn wait_serving(server: &ServerProcess) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !server.log().contains("secure listener") {
        assert!(
            Instant::now() < deadline,
            "the server did not come up: {}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits (up to a minute) until the bucket holds more than `before`
/// objects of the repository: a backup is then mid-upload.
async fn wait_for_upload(weed: &SeaweedFs, before: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while weed.keys("repo/clients/").len() <= before {
        assert!(Instant::now() < deadline, "no pack reached the bucket");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Copies `from/identity/` to `to/identity/`.
fn copy_identity(from: &Path, to: &Path) {
    let (src, dst) = (from.join("identity"), to.join("identity"));
    std::fs::create_dir_all(&dst).unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dst.join(entry.file_name())).unwrap();
    }
}

fn assert_success(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        stderr(out)
    );
}

/// A client of the repository, reaching it through `addr`.
struct Client {
    config: PathBuf,
    addr: String,
}

impl Client {
    async fn register(dir: &Path, addr: &str, name: &str) -> Self {
        let c = Self {
            config: dir.join(format!("config-{name}")),
            addr: addr.to_owned(),
        };
        let out = c.run(&["register", "--name", name]).await;
        assert_success(&format!("register {name}"), &out);
        c
    }

    async fn run(&self, args: &[&str]) -> Output {
        let mut all = vec!["--server", self.addr.as_str()];
        all.extend_from_slice(args);
        run_client(&self.config, &all, LIMIT).await
    }

    /// A backup of `folder`; the snapshot id it committed.
    async fn backup(&self, folder: &Path) -> String {
        let out = self
            .run(&["--json", "backup", &folder.to_string_lossy()])
            .await;
        assert_success("backup", &out);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["snapshot"].to_string().trim_matches('"').to_owned()
    }

    /// A backup of `folder` running in the background; its output.
    fn spawn_backup(&self, folder: &Path) -> tokio::task::JoinHandle<Output> {
        let config = self.config.clone();
        let addr = self.addr.clone();
        let folder = folder.to_string_lossy().into_owned();
        tokio::spawn(async move {
            run_client(&config, &["--server", &addr, "backup", &folder], LIMIT).await
        })
    }

    /// Restores `snapshot` into `to` and compares it with `expected`
    /// (relative path → content).
    async fn restore_and_compare(&self, snapshot: &str, to: &Path, expected: &[(&str, &[u8])]) {
        let out = self
            .run(&["restore", snapshot, "--to", &to.to_string_lossy()])
            .await;
        assert_success(&format!("restore {snapshot}"), &out);
        for (rel, content) in expected {
            let got = std::fs::read(to.join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
            assert!(got == *content, "{rel} differs after restore of {snapshot}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_servers_share_one_repository_one_identity_and_one_winner_per_name() {
    let Some(stores) = Stores::start("three_servers_share_one_repository") else {
        return;
    };
    let (servers, balancer) = stores.cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let addr = balancer.addr.to_string();

    // A server without the identity, or with another one, refuses to start.
    let bare = tempfile::tempdir().unwrap();
    let out = stores.refused_server(&bare.path().join("data"));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("copy identity/server-cert.der"),
        "a server without the identity says what to copy: {}",
        stderr(&out)
    );
    assert!(
        !bare.path().join("data/identity/server-key.der").exists(),
        "no identity was made for it"
    );
    let stranger = ServerProcess::start(&[]);
    wait_serving(&stranger);
    let other = tempfile::tempdir().unwrap();
    copy_identity(
        &stranger.data.path().join("data"),
        &other.path().join("data"),
    );
    drop(stranger);
    let out = stores.refused_server(&other.path().join("data"));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("but this repository's servers present"),
        "a server with another identity is refused: {}",
        stderr(&out)
    );

    // One client through the balancer: each run may land on another
    // server, and the pinned fingerprint holds on every one.
    let client = Client::register(dir.path(), &addr, "roaming").await;
    let folder = dir.path().join("folder");
    let big = write_file(&folder.join("big.bin"), 6 << 20, 1);
    let small = write_file(&folder.join("sub/small.txt"), 3_000, 2);
    let first = client.backup(&folder).await;
    let changed = write_file(&folder.join("big.bin"), 6 << 20, 3);
    let second = client.backup(&folder).await;
    let third = client.backup(&folder).await;
    client
        .restore_and_compare(
            &first,
            &dir.path().join("r1"),
            &[("folder/big.bin", &big), ("folder/sub/small.txt", &small)],
        )
        .await;
    for (snapshot, to) in [(&second, "r2"), (&third, "r3")] {
        client
            .restore_and_compare(
                snapshot,
                &dir.path().join(to),
                &[
                    ("folder/big.bin", &changed),
                    ("folder/sub/small.txt", &small),
                ],
            )
            .await;
    }
    let out = client.run(&["check", "--read-data"]).await;
    assert_success("check --read-data", &out);
    let counts = balancer.counts();
    assert!(
        counts.iter().all(|&n| n > 0),
        "every server served this client: {counts:?}"
    );

    // A legacy client uploads to one server and restores from another.
    let legacy_dir = dir.path().join("legacy");
    let content = write_file(&legacy_dir.join("report.bin"), 200_000, 4);
    let legacy = |server: &ServerProcess, args: &[&str]| {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_backup-client"));
        cmd.arg("--config-dir")
            .arg(legacy_dir.join("ids"))
            .arg("--server")
            .arg(server.legacy_addr.to_string())
            .arg("--legacy")
            .args(args)
            .current_dir(&legacy_dir)
            .env("RUST_LOG", "off")
            .kill_on_drop(true);
        async move {
            tokio::time::timeout(LIMIT, cmd.output())
                .await
                .unwrap()
                .unwrap()
        }
    };
    assert_success(
        "legacy register",
        &legacy(&servers[0], &["register", "--name", "old"]).await,
    );
    assert_success(
        "legacy backup",
        &legacy(&servers[1], &["backup", "report.bin"]).await,
    );
    assert_success(
        "legacy restore",
        &legacy(&servers[2], &["restore", "report.bin", "--to", "back.bin"]).await,
    );
    assert_eq!(std::fs::read(legacy_dir.join("back.bin")).unwrap(), content);

    // Six registrations of one name at once, spread over the servers.
    let mut racing = Vec::new();
    for i in 0..6 {
        let addr = servers[i % 3].addr.to_string();
        let config = dir.path().join(format!("racer-{i}"));
        racing.push(tokio::spawn(async move {
            run_client(
                &config,
                &["--server", &addr, "register", "--name", "contested"],
                LIMIT,
            )
            .await
        }));
    }
    let mut winners = 0;
    for r in racing {
        let out = r.await.unwrap();
        if out.status.success() {
            winners += 1;
        } else {
            assert!(
                stderr(&out).contains("already has a client of that name"),
                "a losing registration says the name is taken: {}",
                stderr(&out)
            );
        }
    }
    assert_eq!(winners, 1, "exactly one registration of the name wins");
}

/// Files of `n` MiB in `folder`, each distinct.
fn big_folder(folder: &Path, files: u32, mib: usize, seed: u32) -> Vec<(String, Vec<u8>)> {
    (0..files)
        .map(|i| {
            let rel = format!("f{i}.bin");
            let content = write_file(&folder.join(&rel), mib << 20, seed + i);
            (rel, content)
        })
        .collect()
}

/// The files of a folder that held `before` and then had `after` written
/// into it (a name in both takes `after`'s content).
fn overlaid(before: &[(String, Vec<u8>)], after: &[(String, Vec<u8>)]) -> Vec<(String, Vec<u8>)> {
    let mut all: Vec<(String, Vec<u8>)> = before
        .iter()
        .filter(|(rel, _)| after.iter().all(|(r, _)| r != rel))
        .cloned()
        .collect();
    all.extend(after.iter().cloned());
    all
}

/// Restores `snapshot` and compares every file of `files` (under the
/// folder named `base`).
async fn verify(
    client: &Client,
    snapshot: &str,
    to: &Path,
    base: &str,
    files: &[(String, Vec<u8>)],
) {
    let expected: Vec<(String, &[u8])> = files
        .iter()
        .map(|(rel, c)| (format!("{base}/{rel}"), c.as_slice()))
        .collect();
    let expected: Vec<(&str, &[u8])> = expected.iter().map(|(r, c)| (r.as_str(), *c)).collect();
    client.restore_and_compare(snapshot, to, &expected).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_mid_upload_leaves_the_others_serving_every_snapshot() {
    let Some(stores) = Stores::start("a_server_killed_mid_upload") else {
        return;
    };
    let (mut servers, balancer) = stores.cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let client = Client::register(dir.path(), &balancer.addr.to_string(), "victim").await;
    let folder = dir.path().join("data");
    let before = big_folder(&folder, 2, 1, 10);
    let committed = client.backup(&folder).await;

    // A larger backup that lands on server 1, which dies under it.
    let after = big_folder(&folder, 12, 4, 20);
    let before_keys = stores.weed.keys("repo/clients/").len();
    balancer.route_next_to(1);
    let running = client.spawn_backup(&folder);
    // Killed once its first pack (of three or more) is in the bucket.
    wait_for_upload(&stores.weed, before_keys).await;
    servers[1].kill();
    let interrupted = running.await.unwrap();
    assert!(
        !interrupted.status.success(),
        "a backup whose server died under it fails"
    );
    let message = stderr(&interrupted);
    assert!(
        !message.contains("panicked") && message.contains("error"),
        "a clear error: {message}"
    );

    // The next run goes to a live server and completes.
    let completed = client.backup(&folder).await;
    let all = overlaid(&before, &after);
    verify(
        &client,
        &committed,
        &dir.path().join("r-before"),
        "data",
        &before,
    )
    .await;
    verify(
        &client,
        &completed,
        &dir.path().join("r-after"),
        "data",
        &all,
    )
    .await;
    let out = client.run(&["check", "--read-data"]).await;
    assert_success("check --read-data", &out);
    assert!(servers[0].is_running() && servers[2].is_running());
}

/// A fault of one of the repository's stores.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// SeaweedFS stopped for 10 s. The S3 client retries for a while: the
    /// backup may ride the outage out, or fail with a clear error.
    S3Outage,
    /// PostgreSQL stopped and started again 3 s later. Transactions rerun
    /// on a new connection for up to 30 s: the backup usually completes;
    /// if a commit was in flight, it fails clearly.
    PgRestart,
}

/// One server; a backup of 40 MiB is hit by `fault` once its first pack
/// is in the bucket. The backup completes or fails clearly, the server
/// keeps running, the next backup completes, both snapshots restore byte
/// for byte, and every object a snapshot references has its bytes (no row
/// without its object).
async fn a_store_fault_during_a_backup(test: &str, fault: Fault) {
    let Some(mut stores) = Stores::start(test) else {
        return;
    };
    let mut server = stores.server(None);
    let dir = tempfile::tempdir().unwrap();
    let client = Client::register(dir.path(), &server.addr.to_string(), "patient").await;
    let folder = dir.path().join("data");
    let first_files = big_folder(&folder, 2, 1, 30);
    let first = client.backup(&folder).await;

    let files = big_folder(&folder, 10, 4, 40);
    let before_keys = stores.weed.keys("repo/clients/").len();
    let running = client.spawn_backup(&folder);
    wait_for_upload(&stores.weed, before_keys).await;
    match fault {
        Fault::S3Outage => {
            stores.weed.stop();
            tokio::time::sleep(Duration::from_secs(10)).await;
            stores.weed.restart();
        }
        Fault::PgRestart => {
            stores.pg.stop();
            tokio::time::sleep(Duration::from_secs(3)).await;
            stores.pg.restart();
        }
    }
    let out = running.await.unwrap();
    eprintln!("backup across {fault:?}: {}", out.status);
    if !out.status.success() {
        let message = stderr(&out);
        assert!(
            !message.contains("panicked") && message.contains("error"),
            "a clear error: {message}"
        );
    }
    assert!(
        server.is_running(),
        "the server kept running: {}",
        server.log()
    );

    let second = client.backup(&folder).await;
    verify(
        &client,
        &first,
        &dir.path().join("r1"),
        "data",
        &first_files,
    )
    .await;
    let all = overlaid(&first_files, &files);
    verify(&client, &second, &dir.path().join("r2"), "data", &all).await;
    let out = client.run(&["check", "--read-data"]).await;
    assert_success("check --read-data", &out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_object_store_stopped_for_ten_seconds_costs_at_most_a_clear_error() {
    a_store_fault_during_a_backup("the_object_store_stopped_for_ten_seconds", Fault::S3Outage)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_during_uploads_is_reconnected_to() {
    a_store_fault_during_a_backup("postgres_restarted_during_uploads", Fault::PgRestart).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_across_three_servers_with_a_prune_beside_them_all_restore() {
    let Some(stores) = Stores::start("clients_across_three_servers") else {
        return;
    };
    let (servers, balancer) = stores.cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let addr = balancer.addr.to_string();
    const CLIENTS: usize = 9;
    let mut jobs = Vec::new();
    for i in 0..CLIENTS {
        let dir = dir.path().to_owned();
        let addr = addr.clone();
        jobs.push(tokio::spawn(async move {
            let name = format!("c{i}");
            let client = Client::register(&dir, &addr, &name).await;
            let folder = dir.join(&name);
            let seed = 100 * u32::try_from(i).unwrap();
            let mut files = big_folder(&folder, 3, 1, seed);
            let first = client.backup(&folder).await;
            let earlier = files.clone();
            files[0].1 = write_file(&folder.join(&files[0].0), 1 << 20, seed + 50);
            let second = client.backup(&folder).await;
            (client, name, first, earlier, second, files)
        }));
    }
    // A prune on the first server's data directory while they run: it
    // takes the repository's maintenance lock and must lose nothing.
    let data = servers[0].data.path().join("data");
    let prune_args = stores.args();
    let prune = tokio::task::spawn_blocking(move || {
        let mut outputs = Vec::new();
        for _ in 0..3 {
            let out = std::process::Command::new(server_binary())
                .args(["prune", "--keep-last", "5"])
                .arg("--data-dir")
                .arg(&data)
                .args(&prune_args)
                .envs(SeaweedFs::CREDENTIALS)
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .output()
                .unwrap();
            outputs.push(out);
            std::thread::sleep(Duration::from_millis(200));
        }
        outputs
    });
    let mut done = Vec::new();
    for job in jobs {
        done.push(job.await.unwrap());
    }
    for out in prune.await.unwrap() {
        assert_success("prune beside the backups", &out);
    }
    for (client, name, first, earlier, second, files) in &done {
        verify(
            client,
            first,
            &dir.path().join(format!("r1-{name}")),
            name,
            earlier,
        )
        .await;
        verify(
            client,
            second,
            &dir.path().join(format!("r2-{name}")),
            name,
            files,
        )
        .await;
    }
    let counts = balancer.counts();
    assert!(
        counts.iter().all(|&n| n > 0),
        "every server served: {counts:?}"
    );
}
