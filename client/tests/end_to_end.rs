//! End-to-end: the real server (`server::run` on 127.0.0.1:0 with a
//! temporary data directory) and the client, through its library API and as
//! the real `backup-client` binary. What the server stored is read back from
//! its data directory and compared with the source.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, SystemTime};

use client::identity::IdentityStore;
use client::settings::Options;
use client::{files, BackupItem, Client, Error, Outcome};
use protocol::crypto::public_key_field;
use protocol::{ClientId, FileName, UserName};
use server::storage::Storage;
use support::relay::Relay;
use support::{vector_keys, write_file, STEP};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// The real server, stopped when dropped.
/// Our server with both listeners: `addr` is secure mode (what the client
/// speaks by default), `legacy_addr` the plain legacy protocol.
struct TestServer {
    addr: SocketAddr,
    legacy_addr: SocketAddr,
    fingerprint: protocol::secure::Fingerprint,
    data: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
}

impl TestServer {
    /// Starts on a fresh data directory; `prepare` may seed it first.
    async fn start_with(prepare: impl FnOnce(&Path)) -> Self {
        Self::start_configured(prepare, |_| {}).await
    }

    /// As [`start_with`](Self::start_with), with `configure` adjusting the
    /// server's configuration.
    async fn start_configured(
        prepare: impl FnOnce(&Path),
        configure: impl FnOnce(&mut server::Config),
    ) -> Self {
        let data = tempfile::tempdir().unwrap();
        prepare(data.path());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let legacy = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let legacy_addr = legacy.local_addr().unwrap();
        // Made here so that the test knows the fingerprint; the server
        // loads the same identity.
        let (identity, _) = server::identity::ServerIdentity::load_or_create(data.path()).unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let mut config = server::Config::new(data.path());
        config.shutdown_grace = Duration::from_secs(2);
        configure(&mut config);
        tokio::spawn(server::run(
            server::Listeners::both(listener, legacy),
            config,
            async move {
                let _ = stopped.await;
            },
        ));
        Self {
            addr,
            legacy_addr,
            fingerprint: identity.fingerprint(),
            data,
            stop: Some(stop),
        }
    }

    async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    fn server(&self) -> String {
        self.addr.to_string()
    }

    /// The latest content the server holds for `name` of `client`.
    fn stored(&self, client: ClientId, name: &str) -> Option<Vec<u8>> {
        let storage = Storage::open_local(self.data.path()).unwrap();
        storage
            .read_latest(client, &FileName::try_from(name).unwrap())
            .unwrap()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn client(server: &str, identity_dir: &Path) -> Client {
    let mut options = Options::new(server);
    options.timeout = STEP;
    Client::new(options, IdentityStore::new(identity_dir))
}

/// `c` given the server's fingerprint up front (`--server-fingerprint`), as
/// a client with keys but no pin needs.
fn with_fingerprint(c: Client, server: &TestServer) -> Client {
    let mut options = c.options().clone();
    options.server_fingerprint = Some(server.fingerprint);
    Client::new(options, c.store().clone())
}

fn items(paths: &[PathBuf]) -> Vec<BackupItem> {
    let listed = files::collect(paths);
    assert!(listed.errors.is_empty(), "{:?}", listed.errors);
    listed.items
}

fn name(text: &str) -> UserName {
    UserName::try_from(text).unwrap()
}

/// Runs the real binary in `cwd` with a private HOME and config directory.
async fn run_binary(cwd: &Path, home: &Path, args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_backup-client"));
    cmd.args(args)
        .current_dir(cwd)
        .env_remove("BACKUP_CLIENT_DIR")
        .env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join("config"))
        .env("RUST_LOG", "off")
        .kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("the client did not finish in time")
        .unwrap()
}

fn json_of(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_backs_up_and_reconnects_in_a_later_run() {
    let server = TestServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let ids = dir.path().join("identity");
    let identity = client(&server.server(), &ids)
        .register(name("alice"), false)
        .await
        .unwrap();
    assert_eq!(
        IdentityStore::new(&ids).load().unwrap(),
        Some(identity.clone())
    );
    let again = client(&server.server(), &ids)
        .register(name("alice"), false)
        .await
        .unwrap_err();
    assert!(matches!(again, Error::AlreadyRegistered { .. }), "{again}");

    let path = dir.path().join("report.pdf");
    let first = write_file(&path, 300_000, 1);
    let report = client(&server.server(), &ids)
        .backup(items(std::slice::from_ref(&path)), None)
        .await
        .unwrap();
    assert_eq!(report.exit_code(), 0, "{:?}", report.first_error());
    assert!(!report.registered, "the identity from register is reused");
    assert_eq!(
        server.stored(identity.client_id, "report.pdf").unwrap(),
        first
    );

    // A later run (a new connection and session key) replaces the content.
    let second = write_file(&path, 200_001, 2);
    let report = client(&server.server(), &ids)
        .backup(items(&[path]), None)
        .await
        .unwrap();
    assert_eq!(report.exit_code(), 0, "{:?}", report.first_error());
    assert_eq!(report.client_id, Some(identity.client_id));
    assert_eq!(
        server.stored(identity.client_id, "report.pdf").unwrap(),
        second
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_a_second_registration_of_a_taken_name() {
    let server = TestServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    client(&server.server(), &dir.path().join("a"))
        .register(name("zoe"), false)
        .await
        .unwrap();
    let err = client(&server.server(), &dir.path().join("b"))
        .register(name("zoe"), false)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NameTaken { .. }), "{err}");
    assert_eq!(err.exit_code(), 4);
    assert!(err.to_string().contains("--name"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backs_up_a_directory_tree_under_relative_names() {
    let server = TestServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("project");
    let tree = [
        ("README.md", 120),
        ("src/main.rs", 3000),
        ("src/deep/er/mod.rs", 17),
        ("assets/logo.png", 70_000),
    ];
    let mut sources = Vec::new();
    for (i, (rel, len)) in tree.iter().enumerate() {
        sources.push((*rel, write_file(&root.join(rel), *len, 10 + i as u32)));
    }
    let c = client(&server.server(), &dir.path().join("identity"));
    let report = c.backup(items(&[root]), Some(&name("tree"))).await.unwrap();
    assert_eq!(report.exit_code(), 0, "{:?}", report.first_error());
    let mut sent: Vec<&str> = report.files.iter().map(|f| f.name.as_str()).collect();
    sent.sort_unstable();
    assert_eq!(
        sent,
        [
            "README.md",
            "assets/logo.png",
            "src/deep/er/mod.rs",
            "src/main.rs"
        ]
    );
    for (rel, data) in sources {
        assert_eq!(
            server.stored(report.client_id.unwrap(), rel).unwrap(),
            data,
            "{rel}"
        );
    }
}

/// A byte-level TCP forwarder to `upstream` that counts the connections it
/// relays (TLS passes through untouched).
async fn counting_forwarder(
    upstream: SocketAddr,
) -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = count.clone();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    (addr, count)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backs_up_and_restores_many_files_over_several_connections() {
    let server = TestServer::start().await;
    let (forwarder, connections) = counting_forwarder(server.addr).await;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("many");
    // Small files (kept in the server's database) and larger ones (kept as
    // files), with the larger ones spread through the list.
    let sources: Vec<(String, Vec<u8>)> = (0..40u32)
        .map(|i| {
            let rel = format!("d{}/f{i:02}", i % 5);
            let len = if i % 7 == 3 {
                100_000 + i as usize
            } else {
                (i as usize * 997) % 5000
            };
            let data = write_file(&root.join(&rel), len, 100 + i);
            (rel, data)
        })
        .collect();
    let identity = dir.path().join("identity");
    let c = client(&server.server(), &identity);
    c.register(name("many"), false).await.unwrap();
    let mut options = c.options().clone();
    options.server = forwarder.to_string();
    options.server_fingerprint = Some(server.fingerprint);
    options.connections = 4;
    let c = Client::new(options, IdentityStore::new(&identity));
    let listed = items(&[root]);
    let expected_order: Vec<String> = listed.iter().map(|i| i.name.to_string_lossy()).collect();
    let report = c.backup(listed, None).await.unwrap();
    assert_eq!(report.exit_code(), 0, "{:?}", report.first_error());
    let order: Vec<&str> = report.files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(
        order, expected_order,
        "the report keeps the order of the files"
    );
    assert!(report
        .files
        .iter()
        .all(|f| matches!(f.outcome, Outcome::Stored { .. })));
    assert_eq!(
        connections.load(std::sync::atomic::Ordering::SeqCst),
        4,
        "one connection, then three more"
    );
    for (rel, data) in &sources {
        assert_eq!(
            &server.stored(report.client_id.unwrap(), rel).unwrap(),
            data,
            "{rel}"
        );
    }
    let out = dir.path().join("restored");
    std::fs::create_dir(&out).unwrap();
    let restored = c.restore_all(&out, false).await.unwrap();
    assert_eq!(restored.exit_code(), 0);
    assert_eq!(restored.files.len(), sources.len());
    assert_eq!(connections.load(std::sync::atomic::Ordering::SeqCst), 8);
    for (rel, data) in &sources {
        assert_eq!(&std::fs::read(out.join(rel)).unwrap(), data, "{rel}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_at_capacity_gets_the_whole_backup_over_one_connection() {
    let server = TestServer::start_configured(|_| {}, |c| c.max_connections = 1).await;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("few");
    let sources: Vec<(String, Vec<u8>)> = (0..12u32)
        .map(|i| {
            let rel = format!("f{i}");
            (
                rel.clone(),
                write_file(&root.join(&rel), 3000 + i as usize, 200 + i),
            )
        })
        .collect();
    /// Keeps the notices of a run.
    #[derive(Default)]
    struct Notices(std::sync::Mutex<Vec<String>>);
    impl client::feedback::Feedback for Notices {
        fn notice(&self, message: &str) {
            self.0.lock().unwrap().push(message.to_owned());
        }
    }
    let notices = std::sync::Arc::new(Notices::default());
    let c = client(&server.server(), &dir.path().join("identity"));
    let mut options = c.options().clone();
    options.connections = 4;
    let c = Client::new(options, c.store().clone()).with_feedback(notices.clone());
    let report = c.backup(items(&[root]), Some(&name("few"))).await.unwrap();
    assert_eq!(report.exit_code(), 0, "{:?}", report.first_error());
    let said = notices.0.lock().unwrap().clone();
    assert!(
        said.iter().any(|n| n.contains("going on with fewer")),
        "the refused connections are reported: {said:?}"
    );
    for (rel, data) in &sources {
        assert_eq!(
            &server.stored(report.client_id.unwrap(), rel).unwrap(),
            data,
            "{rel}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_empty_one_block_and_packet_boundary_files() {
    let server = TestServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let packet = client::settings::DEFAULT_PACKET_SIZE;
    // Plaintext sizes whose ciphertext is 16 bytes, 32 bytes, exactly one
    // packet, one packet plus a padding block, and one packet plus one block.
    let sizes = [0, 16, packet - 16, packet, packet + 1];
    let mut sources = Vec::new();
    for (i, size) in sizes.iter().enumerate() {
        let path = dir.path().join(format!("f{size}.bin"));
        sources.push((
            format!("f{size}.bin"),
            write_file(&path, *size, 20 + i as u32),
            path,
        ));
    }
    let paths: Vec<PathBuf> = sources.iter().map(|s| s.2.clone()).collect();
    let c = client(&server.server(), &dir.path().join("identity"));
    let report = c.backup(items(&paths), Some(&name("edges"))).await.unwrap();
    assert_eq!(report.exit_code(), 0, "{:?}", report.first_error());
    for (file, data, _) in &sources {
        let stored = server.stored(report.client_id.unwrap(), file).unwrap();
        assert_eq!(stored.len(), data.len(), "{file}");
        assert!(stored == *data, "{file} differs");
    }
    assert!(report
        .files
        .iter()
        .all(|f| matches!(f.outcome, Outcome::Stored { attempts: 1, .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resends_a_corrupted_upload_and_then_verifies() {
    // Legacy mode: a byte flipped in transit reaches the server (TLS would
    // refuse it), which is what the cksum round is for.
    let server = TestServer::start().await;
    let relay = Relay::start(server.legacy_addr, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flaky.bin");
    let data = write_file(&path, 2_500_000, 30);
    let mut options = Options::new(relay.addr.to_string());
    options.timeout = STEP;
    options.legacy = true;
    let c = Client::new(options, IdentityStore::new(dir.path().join("identity")));
    let report = c
        .backup(items(&[path]), Some(&name("flaky")))
        .await
        .unwrap();
    assert_eq!(report.exit_code(), 0, "{:?}", report.first_error());
    assert!(
        matches!(report.files[0].outcome, Outcome::Stored { attempts: 2, .. }),
        "{:?}",
        report.files[0].outcome
    );
    assert_eq!(relay.flipped.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(
        server
            .stored(report.client_id.unwrap(), "flaky.bin")
            .unwrap(),
        data
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_gives_up_after_four_corrupted_uploads_with_exit_status_5() {
    let server = TestServer::start().await;
    let relay = Relay::start(server.legacy_addr, u32::MAX).await;
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    write_file(&dir.path().join("doomed.bin"), 40_000, 31);
    let server_arg = relay.addr.to_string();
    let reg = run_binary(
        dir.path(),
        &home,
        &[
            "register",
            "--legacy",
            "--server",
            &server_arg,
            "--name",
            "doomed",
        ],
    )
    .await;
    assert!(
        reg.status.success(),
        "{}",
        String::from_utf8_lossy(&reg.stderr)
    );
    let out = run_binary(
        dir.path(),
        &home,
        &["backup", "--legacy", "doomed.bin", "--json"],
    )
    .await;
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("doomed.bin") && stderr.contains("4 attempts"),
        "{stderr}"
    );
    let json = json_of(&out);
    assert_eq!(json["ok"], false);
    assert_eq!(json["files"][0]["error"]["kind"], "verification_failed");
    assert_eq!(relay.flipped.load(std::sync::atomic::Ordering::SeqCst), 4);
    let id = ClientId::from_hex(json["client_id"].as_str().unwrap()).unwrap();
    assert_eq!(
        server.stored(id, "doomed.bin"),
        None,
        "nothing is stored after four mismatches"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_registers_then_backs_up_with_the_remembered_server() {
    let server = TestServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let a = write_file(&dir.path().join("docs/a.txt"), 5000, 40);
    let b = write_file(&dir.path().join("docs/sub/b.txt"), 1, 41);
    let c = write_file(&dir.path().join("c.bin"), 16, 42);
    let server_arg = server.server();
    let reg = run_binary(
        dir.path(),
        &home,
        &[
            "register",
            "--server",
            &server_arg,
            "--name",
            "carl",
            "--json",
        ],
    )
    .await;
    assert!(
        reg.status.success(),
        "{}",
        String::from_utf8_lossy(&reg.stderr)
    );
    let reg = json_of(&reg);
    let id = ClientId::from_hex(reg["client_id"].as_str().unwrap()).unwrap();
    let config_dir = home.join("config/backup-client");
    assert!(config_dir.join("me.info").exists() && config_dir.join("priv.key").exists());
    let config = std::fs::read_to_string(config_dir.join("config.toml")).unwrap();
    assert!(config.contains(&server_arg), "{config}");

    // No --server: it comes from config.toml; the session is a reconnect.
    let out = run_binary(
        dir.path(),
        &home,
        &["--per-file", "backup", "docs", "c.bin", "--json"],
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json = json_of(&out);
    assert_eq!(
        (json["ok"].as_bool(), json["registered"].as_bool()),
        (Some(true), Some(false))
    );
    assert_eq!(json["stored_files"], 3);
    assert_eq!(server.stored(id, "a.txt").unwrap(), a);
    assert_eq!(server.stored(id, "sub/b.txt").unwrap(), b);
    assert_eq!(server.stored(id, "c.bin").unwrap(), c);

    // Human output goes to stdout; --quiet leaves only errors.
    let out = run_binary(dir.path(), &home, &["--per-file", "backup", "c.bin"]).await;
    assert!(String::from_utf8_lossy(&out.stdout).contains("stored c.bin"));
    let out = run_binary(
        dir.path(),
        &home,
        &["--per-file", "backup", "c.bin", "--quiet"],
    )
    .await;
    assert!(out.status.success() && out.stdout.is_empty() && out.stderr.is_empty());
    let out = run_binary(
        dir.path(),
        &home,
        &["--per-file", "backup", "missing.bin", "--quiet"],
    )
    .await;
    assert_eq!(out.status.code(), Some(6));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.bin"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_reports_an_unreachable_server_with_exit_status_3() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server_arg = format!("127.0.0.1:{port}");
    let out = run_binary(
        dir.path(),
        dir.path(),
        &["register", "--server", &server_arg, "--name", "x"],
    )
    .await;
    assert_eq!(out.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&server_arg) && !stderr.contains("panicked"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_does_the_legacy_job_in_a_transfer_info_folder() {
    let server = TestServer::start().await;
    let folder = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    let spec = write_file(&folder.path().join("New_product_spec.docx"), 20_000, 50);
    let notes = write_file(&folder.path().join("notes.txt"), 3000, 51);
    std::fs::write(
        folder.path().join("transfer.info"),
        format!(
            "{}\nMichael Jackson\nNew_product_spec.docx\nnotes.txt\n",
            server.server()
        ),
    )
    .unwrap();
    let first = run_binary(folder.path(), home.path(), &["--json"]).await;
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert_eq!(json_of(&first)["registered"], true);
    let me = IdentityStore::new(folder.path())
        .load()
        .unwrap()
        .expect("me.info in the folder");
    assert_eq!(me.name.to_string(), "Michael Jackson");
    assert_eq!(
        server
            .stored(me.client_id, "New_product_spec.docx")
            .unwrap(),
        spec
    );
    assert_eq!(server.stored(me.client_id, "notes.txt").unwrap(), notes);

    let second = run_binary(folder.path(), home.path(), &["--json"]).await;
    assert!(
        second.status.success(),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    let json = json_of(&second);
    assert_eq!(json["registered"], false, "the second run reconnects");
    assert_eq!(json["client_id"], me.client_id.to_hex());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_with_the_me_info_of_a_legacy_client() {
    let alice_dir = tempfile::tempdir().unwrap();
    for f in ["me.info", "priv.key"] {
        std::fs::copy(vector_keys("alice").join(f), alice_dir.path().join(f)).unwrap();
    }
    let alice = IdentityStore::new(alice_dir.path())
        .load()
        .unwrap()
        .unwrap();
    let key = public_key_field(&alice.key.public_key()).unwrap();
    // Pre-register alice as a legacy server that met her before would know her.
    let server = TestServer::start_with(|data| {
        let storage = Storage::open_local(data).unwrap();
        storage
            .meta()
            .register(alice.client_id, &alice.name, SystemTime::now())
            .unwrap();
        assert!(storage
            .meta()
            .set_public_key(alice.client_id, &key, SystemTime::now())
            .unwrap());
    })
    .await;
    let sample = vector_keys("alice").join("sample.bin");
    let mut c = client(&server.server(), alice_dir.path());
    c = with_fingerprint(c, &server);
    let report = c
        .backup(items(std::slice::from_ref(&sample)), None)
        .await
        .unwrap();
    assert_eq!(report.exit_code(), 0, "{:?}", report.first_error());
    assert!(!report.registered, "alice reconnects with her legacy key");
    assert_eq!(report.client_id, Some(alice.client_id));
    assert_eq!(
        server.stored(alice.client_id, "sample.bin").unwrap(),
        std::fs::read(&sample).unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_anew_when_the_server_does_not_know_the_client() {
    let server = TestServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    for f in ["me.info", "priv.key"] {
        std::fs::copy(vector_keys("carol").join(f), dir.path().join(f)).unwrap();
    }
    let old = IdentityStore::new(dir.path()).load().unwrap().unwrap();
    let small = vector_keys("carol").join("small.bin");
    let report = with_fingerprint(client(&server.server(), dir.path()), &server)
        .backup(items(std::slice::from_ref(&small)), None)
        .await
        .unwrap();
    assert_eq!(report.exit_code(), 0, "{:?}", report.first_error());
    assert!(report.registered, "1606 leads to a new registration");
    let new = IdentityStore::new(dir.path()).load().unwrap().unwrap();
    assert_eq!(new.name, old.name);
    assert_ne!(new.client_id, old.client_id);
    assert_ne!(new.key, old.key, "with a new RSA pair");
    assert_eq!(
        server.stored(new.client_id, "small.bin").unwrap(),
        std::fs::read(&small).unwrap()
    );
}

/// Runs `backup PATH --json` with the real binary, sampling its peak
/// resident memory (VmHWM) until it exits. Returns the output and the peak
/// in KiB (0 where /proc is not available).
async fn backup_measuring_memory(
    cwd: &Path,
    home: &Path,
    server: &str,
    file: &str,
) -> (Output, u64) {
    run_measuring_memory(
        cwd,
        home,
        &["--per-file", "backup", file, "--json", "--server", server],
    )
    .await
}

/// Runs the real binary with `args`, sampling its peak resident memory
/// (VmHWM) until it exits. Returns the output and the peak in KiB (0 where
/// /proc is not available).
async fn run_measuring_memory(cwd: &Path, home: &Path, args: &[&str]) -> (Output, u64) {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_backup-client"));
    cmd.args(args)
        .current_dir(cwd)
        .env_remove("BACKUP_CLIENT_DIR")
        .env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join("config"))
        .env("RUST_LOG", "off")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let child = cmd.spawn().unwrap();
    let status_path = format!("/proc/{}/status", child.id().unwrap());
    let output = child.wait_with_output();
    tokio::pin!(output);
    let mut peak = 0u64;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    loop {
        tokio::select! {
            out = &mut output => return (out.unwrap(), peak),
            _ = tokio::time::sleep(Duration::from_millis(10)) => {
                assert!(tokio::time::Instant::now() < deadline, "the client did not finish in time");
                if let Ok(status) = std::fs::read_to_string(&status_path) {
                    let hwm = status.lines().find_map(|l| l.strip_prefix("VmHWM:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok());
                    peak = peak.max(hwm.unwrap_or(0));
                }
            }
        }
    }
}

/// Compares the server's stored blob with `source`, streaming both.
fn assert_stored_equals(server: &TestServer, client: ClientId, name: &str, source: &Path) {
    use std::io::Read;
    let storage = Storage::open_local(server.data.path()).unwrap();
    let version = storage
        .meta()
        .latest(client, &FileName::try_from(name).unwrap())
        .unwrap()
        .expect("stored");
    let mut stored = storage.open_blob(&version.blob).unwrap();
    let mut original = std::fs::File::open(source).unwrap();
    let (mut a, mut b) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = original.read(&mut a).unwrap();
        let mut filled = 0;
        while filled < n {
            let m = stored.read(&mut b[filled..n]).unwrap();
            assert!(m > 0, "the stored copy of {name} is shorter");
            filled += m;
        }
        assert!(a[..n] == b[..n], "the stored copy of {name} differs");
        if n == 0 {
            assert_eq!(
                stored.read(&mut b).unwrap(),
                0,
                "the stored copy of {name} is longer"
            );
            return;
        }
    }
}

async fn measure_upload(mib: usize) -> (f64, u64) {
    let server = TestServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let path = dir.path().join("big.bin");
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
        for i in 0..mib {
            f.write_all(&support::pattern(1 << 20, i as u32)).unwrap();
        }
        f.flush().unwrap();
    }
    let server_arg = server.server();
    let reg = run_binary(
        dir.path(),
        &home,
        &["register", "--server", &server_arg, "--name", "big"],
    )
    .await;
    assert!(
        reg.status.success(),
        "{}",
        String::from_utf8_lossy(&reg.stderr)
    );
    let (out, peak_kib) = backup_measuring_memory(dir.path(), &home, &server_arg, "big.bin").await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json = json_of(&out);
    let id = ClientId::from_hex(json["client_id"].as_str().unwrap()).unwrap();
    assert_stored_equals(&server, id, "big.bin", &path);
    (json["mb_per_s"].as_f64().unwrap(), peak_kib)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_a_file_larger_than_its_memory_bound() {
    let (_, peak_kib) = measure_upload(48).await;
    if std::path::Path::new("/proc/self/status").exists() {
        assert!(peak_kib > 0, "VmHWM was sampled");
        assert!(
            peak_kib < 40 * 1024,
            "the client held {peak_kib} KiB for a 48 MiB file"
        );
    }
}

/// The figures for the README: MB/s and peak memory of one large upload.
/// Run in release, e.g. for 1 GiB:
/// `BACKUP_PERF_MIB=1024 cargo test --release -p backup-client --test end_to_end -- --ignored --nocapture measures_`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "heavy: writes and uploads a large file; run explicitly in release"]
async fn measures_throughput_and_peak_memory_of_a_large_upload() {
    let mib = std::env::var("BACKUP_PERF_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let (mb_per_s, peak_kib) = measure_upload(mib).await;
    println!("upload of {mib} MiB: {mb_per_s:.0} MB/s, client peak RSS (VmHWM) {peak_kib} KiB");
    assert!(
        peak_kib < 64 * 1024,
        "memory must stay bounded: {peak_kib} KiB"
    );
}

/// Every file under `root` with its content, by relative path.
fn tree(root: &Path) -> Vec<(String, Vec<u8>)> {
    let mut found = Vec::new();
    let mut todo = vec![root.to_owned()];
    while let Some(dir) = todo.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                todo.push(path);
            } else {
                let rel = path
                    .strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                found.push((rel, std::fs::read(&path).unwrap()));
            }
        }
    }
    found.sort();
    found
}

fn assert_success(out: &Output) {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_restores_every_version_and_the_whole_tree_then_deletes() {
    let server = TestServer::start().await;
    let addr = server.server();
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let cfg = dir.path().join("cfg");
    let cfg_arg = cfg.to_str().unwrap();
    let src = dir.path().join("src");
    let first = write_file(&src.join("notes.txt"), 5000, 1);
    write_file(&src.join("sub/deep/data.bin"), 2_500_000, 2);
    write_file(&src.join("empty"), 0, 3);
    let out = run_binary(
        dir.path(),
        &home,
        &[
            "--config-dir",
            cfg_arg,
            "register",
            "--server",
            &addr,
            "--name",
            "eve",
        ],
    )
    .await;
    assert_success(&out);
    let out = run_binary(
        dir.path(),
        &home,
        &["--config-dir", cfg_arg, "--per-file", "backup", "src"],
    )
    .await;
    assert_success(&out);
    let second = write_file(&src.join("notes.txt"), 7000, 4);
    let out = run_binary(
        dir.path(),
        &home,
        &[
            "--config-dir",
            cfg_arg,
            "--per-file",
            "backup",
            "src/notes.txt",
        ],
    )
    .await;
    assert_success(&out);

    // Two versions of the changed file, one of the others.
    let out = run_binary(
        dir.path(),
        &home,
        &["--config-dir", cfg_arg, "list", "--versions", "--json"],
    )
    .await;
    assert_success(&out);
    let listing = json_of(&out);
    let files = listing["files"].as_array().unwrap();
    let versions = |name: &str| -> Vec<(u64, u64)> {
        files
            .iter()
            .filter(|f| f["name"] == name)
            .map(|f| (f["version"].as_u64().unwrap(), f["size"].as_u64().unwrap()))
            .collect()
    };
    let notes = versions("notes.txt");
    assert_eq!(notes.len(), 2, "{listing}");
    assert_eq!((notes[0].1, notes[1].1), (5000, 7000));
    assert!(notes[0].0 < notes[1].0);
    assert_eq!(versions("sub/deep/data.bin").len(), 1);
    assert_eq!(versions("empty"), [(versions("empty")[0].0, 0)]);

    // Each version restores to its own bytes.
    for ((version, _), expected) in notes.iter().zip([&first, &second]) {
        let to = format!("v{version}.txt");
        let out = run_binary(
            dir.path(),
            &home,
            &[
                "--config-dir",
                cfg_arg,
                "--per-file",
                "restore",
                "notes.txt",
                "--version",
                &version.to_string(),
                "--to",
                &to,
            ],
        )
        .await;
        assert_success(&out);
        assert_eq!(&std::fs::read(dir.path().join(&to)).unwrap(), expected);
    }

    // From nothing but the key files, the address and the server's
    // fingerprint: the whole tree.
    let fresh = dir.path().join("fresh");
    std::fs::create_dir(&fresh).unwrap();
    for key_file in ["me.info", "priv.key"] {
        std::fs::copy(cfg.join(key_file), fresh.join(key_file)).unwrap();
    }
    let target = dir.path().join("restored");
    std::fs::create_dir(&target).unwrap();
    let fingerprint = server.fingerprint.to_string();
    let out = run_binary(
        dir.path(),
        &home,
        &[
            "--config-dir",
            fresh.to_str().unwrap(),
            "--server",
            &addr,
            "--server-fingerprint",
            &fingerprint,
            "--per-file",
            "restore",
            "--all",
            "--to",
            target.to_str().unwrap(),
            "--json",
        ],
    )
    .await;
    assert_success(&out);
    assert_eq!(json_of(&out)["restored_files"], serde_json::json!(3));
    assert_eq!(tree(&target), tree(&src));

    // Delete, and the name is gone.
    let out = run_binary(
        dir.path(),
        &home,
        &["--config-dir", cfg_arg, "delete", "notes.txt", "--json"],
    )
    .await;
    assert_success(&out);
    assert_eq!(json_of(&out)["deleted_versions"], serde_json::json!(2));
    let out = run_binary(
        dir.path(),
        &home,
        &["--config-dir", cfg_arg, "list", "--json"],
    )
    .await;
    assert_success(&out);
    let names: Vec<String> = json_of(&out)["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["empty", "sub/deep/data.bin"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_is_refused_when_the_server_keeps_history_append_only() {
    let server = TestServer::start_configured(|_| {}, |c| c.append_only = true).await;
    let dir = tempfile::tempdir().unwrap();
    let ids = dir.path().join("identity");
    let path = dir.path().join("kept.txt");
    write_file(&path, 100, 5);
    let c = client(&server.server(), &ids);
    let report = c
        .backup(items(std::slice::from_ref(&path)), Some(&name("ann")))
        .await
        .unwrap();
    assert_eq!(report.exit_code(), 0, "{:?}", report.first_error());
    let err = c
        .delete(&FileName::try_from("kept.txt").unwrap())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::AppendOnly { .. }), "{err}");
    assert_eq!(err.exit_code(), 4);
    assert!(err.to_string().contains("append-only"), "{err}");
    assert_eq!(c.list(true).await.unwrap().len(), 1, "nothing was removed");
}

/// Flips one byte of the stored content of `name`: in its blob file, or in
/// the `inline_blobs` row of a small file.
fn damage_stored(server: &TestServer, name: &str) {
    let data = server.data.path();
    let storage = Storage::open_local(data).unwrap();
    let rows = storage.meta().all_versions().unwrap();
    let row = rows.iter().find(|r| r.file.as_bytes() == name.as_bytes());
    let blob = row.unwrap().blob.clone();
    drop(storage);
    if blob.is_inline() {
        let db = rusqlite::Connection::open(data.join(Storage::DATABASE)).unwrap();
        let mut content: Vec<u8> = db
            .query_row(
                "SELECT content FROM inline_blobs WHERE blob = ?1",
                [&blob.0],
                |row| row.get(0),
            )
            .unwrap();
        let middle = content.len() / 2;
        content[middle] ^= 0x20;
        let changed = db
            .execute(
                "UPDATE inline_blobs SET content = ?2 WHERE blob = ?1",
                rusqlite::params![blob.0, content],
            )
            .unwrap();
        assert_eq!(changed, 1);
    } else {
        let path = data.join(&blob.0);
        let mut bytes = std::fs::read(&path).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x20;
        std::fs::write(&path, &bytes).unwrap();
    }
}

/// Every file name in `dir`, sorted.
fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_reports_a_damaged_server_copy_with_exit_status_5_and_writes_nothing() {
    let server = TestServer::start().await;
    let addr = server.server();
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let cfg = dir.path().join("cfg");
    let cfg_arg = cfg.to_str().unwrap();
    let src = dir.path().join("src");
    // A blob file (over 64 KiB), a small file kept in the database, and a
    // healthy file.
    write_file(&src.join("big.bin"), 300_000, 1);
    write_file(&src.join("small.txt"), 2_000, 2);
    let healthy = write_file(&src.join("ok.txt"), 3_000, 3);
    let out = run_binary(
        dir.path(),
        &home,
        &[
            "--config-dir",
            cfg_arg,
            "register",
            "--server",
            &addr,
            "--name",
            "dora",
        ],
    )
    .await;
    assert_success(&out);
    let out = run_binary(
        dir.path(),
        &home,
        &["--config-dir", cfg_arg, "--per-file", "backup", "src"],
    )
    .await;
    assert_success(&out);
    damage_stored(&server, "big.bin");
    damage_stored(&server, "small.txt");

    for name in ["big.bin", "small.txt"] {
        let to = dir.path().join(format!("one-{name}"));
        std::fs::create_dir(&to).unwrap();
        let out = run_binary(
            dir.path(),
            &home,
            &[
                "--config-dir",
                cfg_arg,
                "--per-file",
                "restore",
                name,
                "--to",
                to.to_str().unwrap(),
            ],
        )
        .await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(5), "{name}: {err}");
        assert!(
            err.contains(&format!("the server's copy of {name} (version ")),
            "{err}"
        );
        assert!(err.contains("is damaged"), "{err}");
        assert!(err.contains("`backup-server scrub`"), "{err}");
        assert!(!err.contains("disk space"), "{err}");
        assert!(
            names_in(&to).is_empty(),
            "nothing, not even a part file: {:?}",
            names_in(&to)
        );
    }

    // Restoring everything over one connection: the damaged files fail
    // alone, the healthy one between them is restored.
    let target = dir.path().join("all");
    std::fs::create_dir(&target).unwrap();
    let out = run_binary(
        dir.path(),
        &home,
        &[
            "--config-dir",
            cfg_arg,
            "--per-file",
            "restore",
            "--all",
            "--to",
            target.to_str().unwrap(),
            "--connections",
            "1",
            "--json",
        ],
    )
    .await;
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = json_of(&out);
    assert_eq!(summary["restored_files"], serde_json::json!(1), "{summary}");
    assert_eq!(summary["failed_files"], serde_json::json!(2), "{summary}");
    for file in summary["files"].as_array().unwrap() {
        if file["name"] == "ok.txt" {
            assert_eq!(file["status"], "restored", "{summary}");
        } else {
            assert_eq!(file["status"], "failed", "{summary}");
            assert_eq!(file["error"]["kind"], "verification_failed", "{summary}");
        }
    }
    assert_eq!(names_in(&target), ["ok.txt"]);
    assert_eq!(std::fs::read(target.join("ok.txt")).unwrap(), healthy);
}

/// The names `list` shows, through the binary.
async fn listed_names(cwd: &Path, home: &Path, cfg: &str) -> Vec<String> {
    let out = run_binary(cwd, home, &["--config-dir", cfg, "list", "--json"]).await;
    assert_success(&out);
    json_of(&out)["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap().to_owned())
        .collect()
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_skips_links_in_a_folder_unless_asked_to_follow_links_to_files() {
    let server = TestServer::start().await;
    let addr = server.server();
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let cfg = dir.path().join("cfg");
    let cfg_arg = cfg.to_str().unwrap();
    let src = dir.path().join("src");
    write_file(&src.join("own.txt"), 1_000, 1);
    let outside = write_file(&dir.path().join("outside.txt"), 2_000, 2);
    write_file(&dir.path().join("elsewhere/secret.txt"), 3_000, 3);
    std::os::unix::fs::symlink(dir.path().join("outside.txt"), src.join("link.txt")).unwrap();
    std::os::unix::fs::symlink(dir.path().join("elsewhere"), src.join("dirlink")).unwrap();
    let out = run_binary(
        dir.path(),
        &home,
        &[
            "--config-dir",
            cfg_arg,
            "register",
            "--server",
            &addr,
            "--name",
            "lin",
        ],
    )
    .await;
    assert_success(&out);

    // By default: both links skipped, each named in a note, and nothing
    // from outside the folder stored.
    let out = run_binary(
        dir.path(),
        &home,
        &["--config-dir", cfg_arg, "--per-file", "backup", "src"],
    )
    .await;
    assert_success(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    let note = |link: &str| {
        err.lines()
            .find(|l| l.starts_with("note: skipped ") && l.contains(link))
            .unwrap_or_else(|| panic!("no note for {link}: {err}"))
            .to_owned()
    };
    assert!(note("link.txt").contains("--follow-symlinks"), "{err}");
    assert!(note("dirlink").contains("directory"), "{err}");
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(summary.contains("2 entries skipped"), "{summary}");
    assert_eq!(listed_names(dir.path(), &home, cfg_arg).await, ["own.txt"]);

    // Following links to files: the file outside is stored under the
    // link's name; the link to a directory is still skipped.
    let out = run_binary(
        dir.path(),
        &home,
        &[
            "--config-dir",
            cfg_arg,
            "--per-file",
            "backup",
            "src",
            "--follow-symlinks",
            "--json",
        ],
    )
    .await;
    assert_success(&out);
    let report = json_of(&out);
    assert_eq!(report["stored_files"], serde_json::json!(2), "{report}");
    assert_eq!(report["skipped_entries"], serde_json::json!(1), "{report}");
    assert_eq!(
        report["skipped"][0]["reason"],
        serde_json::json!("symlink_to_directory"),
        "{report}"
    );
    assert!(
        report["skipped"][0]["path"]
            .as_str()
            .unwrap()
            .ends_with("dirlink"),
        "{report}"
    );
    assert_eq!(
        listed_names(dir.path(), &home, cfg_arg).await,
        ["link.txt", "own.txt"]
    );
    let back = dir.path().join("back");
    std::fs::create_dir(&back).unwrap();
    let out = run_binary(
        dir.path(),
        &home,
        &[
            "--config-dir",
            cfg_arg,
            "--per-file",
            "restore",
            "link.txt",
            "--to",
            back.to_str().unwrap(),
        ],
    )
    .await;
    assert_success(&out);
    let restored = back.join("link.txt");
    assert!(!restored.is_symlink());
    assert_eq!(std::fs::read(&restored).unwrap(), outside);
}

async fn measure_restore(mib: usize) -> (f64, u64) {
    let server = TestServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let path = dir.path().join("big.bin");
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
        for i in 0..mib {
            f.write_all(&support::pattern(1 << 20, i as u32)).unwrap();
        }
        f.flush().unwrap();
    }
    let addr = server.server();
    assert_success(
        &run_binary(
            dir.path(),
            &home,
            &["register", "--server", &addr, "--name", "big"],
        )
        .await,
    );
    assert_success(&run_binary(dir.path(), &home, &["--per-file", "backup", "big.bin"]).await);
    let (out, peak_kib) = run_measuring_memory(
        dir.path(),
        &home,
        &[
            "--per-file",
            "restore",
            "big.bin",
            "--to",
            "restored.bin",
            "--json",
        ],
    )
    .await;
    assert_success(&out);
    assert_same_file(&path, &dir.path().join("restored.bin"));
    (json_of(&out)["mb_per_s"].as_f64().unwrap(), peak_kib)
}

/// Compares two files, streaming both.
fn assert_same_file(a: &Path, b: &Path) {
    use std::io::Read;
    let (mut fa, mut fb) = (
        std::fs::File::open(a).unwrap(),
        std::fs::File::open(b).unwrap(),
    );
    assert_eq!(fa.metadata().unwrap().len(), fb.metadata().unwrap().len());
    let (mut x, mut y) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = fa.read(&mut x).unwrap();
        fb.read_exact(&mut y[..n]).unwrap();
        assert!(
            x[..n] == y[..n],
            "{} and {} differ",
            a.display(),
            b.display()
        );
        if n == 0 {
            return;
        }
    }
}

/// The figures for the README: MB/s and peak memory of one large restore.
/// Run in release, e.g. for 1 GiB:
/// `BACKUP_PERF_MIB=1024 cargo test --release -p backup-client --test end_to_end -- --ignored --nocapture measures_restore`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "heavy: backs up and restores a large file; run explicitly in release"]
async fn measures_restore_throughput_and_peak_memory() {
    let mib = std::env::var("BACKUP_PERF_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let (mb_per_s, peak_kib) = measure_restore(mib).await;
    println!("restore of {mib} MiB: {mb_per_s:.0} MB/s, client peak RSS (VmHWM) {peak_kib} KiB");
    assert!(
        peak_kib < 64 * 1024,
        "memory must stay bounded: {peak_kib} KiB"
    );
}
