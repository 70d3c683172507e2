//! Retrieval on the legacy listener of our real server (`docs/PROTOCOL.md`
//! §11.5, `docs/SECURITY.md`): list, restore and delete need a proof of the
//! client's key, because a legacy reconnect proves nothing. An attacker who
//! knows a client's id and name (from its `me.info`, or from any header on
//! the wire) gets 1651 and a closed connection; our client proves its key
//! and is served.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use client::identity::IdentityStore;
use client::settings::Options;
use client::{files, Client};
use futures::{SinkExt, StreamExt};
use protocol::crypto::AesKey;
use protocol::retrieval::{ListFlags, RetrievalRequest, RetrievalResponse};
use protocol::secure::legacy_retrieval_proof;
use protocol::{ClientCodec, ClientId, FileName, Numbering, Request, RequestFrame, Response};
use rand::RngCore;
use server::storage::Storage;
use support::{write_file, STEP};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio_util::codec::Framed;

/// Our server with both listeners, stopped when dropped.
struct Server {
    secure_addr: SocketAddr,
    legacy_addr: SocketAddr,
    fingerprint: protocol::secure::Fingerprint,
    data: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
}

impl Server {
    async fn start() -> Self {
        let data = tempfile::tempdir().unwrap();
        let secure = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let legacy = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (secure_addr, legacy_addr) =
            (secure.local_addr().unwrap(), legacy.local_addr().unwrap());
        let (identity, _) = server::identity::ServerIdentity::load_or_create(data.path()).unwrap();
        let mut config = server::Config::new(data.path());
        config.shutdown_grace = Duration::from_secs(2);
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(server::run(
            server::Listeners::both(secure, legacy),
            config,
            async move {
                let _ = stopped.await;
            },
        ));
        Self {
            secure_addr,
            legacy_addr,
            fingerprint: identity.fingerprint(),
            data,
            stop: Some(stop),
        }
    }

    /// Every version the server holds, as (client, file, size, sha256).
    fn versions(&self) -> Vec<(String, String, u64, Vec<u8>)> {
        let storage = Storage::open_local(self.data.path()).unwrap();
        let mut all = Vec::new();
        for summary in storage.meta().clients().unwrap() {
            let id = summary.client.id;
            for v in storage.meta().list(id, true, 0, 10_000).unwrap() {
                all.push((id.to_hex(), v.file.to_string(), v.size, v.sha256.to_vec()));
            }
        }
        all.sort();
        all
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn legacy_client(addr: SocketAddr, dir: &Path) -> Client {
    let mut options = Options::new(addr.to_string());
    options.legacy = true;
    options.timeout = STEP;
    Client::new(options, IdentityStore::new(dir))
}

fn file(text: &str) -> FileName {
    FileName::try_from(text).unwrap()
}

/// A hand-driven connection to the legacy listener, speaking version 3.
struct Raw(Framed<TcpStream, ClientCodec>);

impl Raw {
    async fn connect(addr: SocketAddr) -> Self {
        Self(Framed::new(
            TcpStream::connect(addr).await.unwrap(),
            ClientCodec::default(),
        ))
    }

    /// Sends `request` as `client_id` and returns the answer (`None` when
    /// the connection ends first).
    async fn ask(&mut self, client_id: ClientId, request: Request) -> Option<Response> {
        let frame = RequestFrame {
            client_id,
            numbering: Numbering::Modern,
            request,
        };
        self.0.send(frame).await.ok()?;
        match tokio::time::timeout(STEP, self.0.next()).await.unwrap() {
            Some(Ok(r)) => Some(r),
            _ => None,
        }
    }

    /// Reconnects as `client_id` / `name` and returns the wrapped session
    /// key of the 1605.
    async fn reconnect(&mut self, client_id: ClientId, name: &protocol::UserName) -> bytes::Bytes {
        match self
            .ask(client_id, Request::Reconnect { name: name.clone() })
            .await
        {
            Some(Response::Reconnected { wrapped_key, .. }) => wrapped_key,
            other => panic!("no 1605 to the reconnect: {other:?}"),
        }
    }

    /// After a refusal the server closes: nothing more arrives.
    async fn assert_closed(&mut self) {
        let next = tokio::time::timeout(STEP, self.0.next()).await.unwrap();
        assert!(
            matches!(next, None | Some(Err(_))),
            "connection still open: {next:?}"
        );
    }
}

fn retrieval_requests() -> [Request; 3] {
    [
        Request::Retrieval(RetrievalRequest::List {
            flags: ListFlags::ALL_VERSIONS,
            cursor: 0,
        }),
        Request::Retrieval(RetrievalRequest::Restore {
            version: 0,
            file: file("a.txt"),
        }),
        Request::Retrieval(RetrievalRequest::Delete {
            file: file("a.txt"),
        }),
    ]
}

/// Runs the real binary against the legacy listener with the identity in
/// `ids`.
async fn run_legacy(addr: SocketAddr, cwd: &Path, ids: &Path, args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_backup-client"));
    cmd.arg("--config-dir")
        .arg(ids)
        .arg("--server")
        .arg(addr.to_string())
        .arg("--timeout")
        .arg("30")
        .arg("--legacy")
        .args(args)
        .current_dir(cwd)
        .env_remove("BACKUP_CLIENT_DIR")
        .env("HOME", cwd)
        .env("RUST_LOG", "off")
        .kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("the client did not finish in time")
        .unwrap()
}

fn assert_success(out: &Output) {
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn listed_names(out: &Output) -> Vec<String> {
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    json["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_list_restore_and_delete_to_whoever_knows_only_the_id_and_name() {
    let server = Server::start().await;
    let dir = tempfile::tempdir().unwrap();
    let ids = dir.path().join("ids");
    // The owner registers on the legacy listener and backs up there, and
    // over TLS with the same identity.
    let owner = legacy_client(server.legacy_addr, &ids);
    let a = dir.path().join("a.txt");
    write_file(&a, 20_000, 1);
    let report = owner
        .backup(
            files::collect(std::slice::from_ref(&a)).items,
            Some(&protocol::UserName::try_from("owner").unwrap()),
        )
        .await
        .unwrap();
    assert_eq!(report.exit_code(), 0, "{:?}", report.first_error());
    let mut options = Options::new(server.secure_addr.to_string());
    options.timeout = STEP;
    options.server_fingerprint = Some(server.fingerprint);
    let over_tls = Client::new(options, IdentityStore::new(&ids));
    let b = dir.path().join("b.txt");
    write_file(&b, 30_000, 2);
    let report = over_tls
        .backup(files::collect(std::slice::from_ref(&b)).items, None)
        .await
        .unwrap();
    assert_eq!(report.exit_code(), 0, "{:?}", report.first_error());
    let before = server.versions();
    assert_eq!(before.len(), 2, "{before:?}");

    // What the attacker knows: the id and the name, nothing else.
    let identity = IdentityStore::new(&ids).load().unwrap().unwrap();
    let (id, name) = (identity.client_id, identity.name.clone());

    // Reconnect (1027 -> 1605), then list, restore, delete, each on a
    // fresh connection: 1651 and the connection closes.
    for request in retrieval_requests() {
        let mut raw = Raw::connect(server.legacy_addr).await;
        raw.reconnect(id, &name).await;
        assert_eq!(
            raw.ask(id, request.clone()).await,
            Some(Response::NotAuthenticated),
            "{request:?} without a proof"
        );
        raw.assert_closed().await;
    }

    // Guessed proofs: fixed bytes, random bytes, and the proof of a guessed
    // session key.
    let mut random = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut random);
    let guessed_key = legacy_retrieval_proof(&AesKey::from_bytes([0; 32]), id);
    for proof in [[0xa5; 32], random, guessed_key] {
        let mut raw = Raw::connect(server.legacy_addr).await;
        raw.reconnect(id, &name).await;
        assert_eq!(
            raw.ask(id, Request::Prove { proof }).await,
            Some(Response::NotAuthenticated),
            "guessed proof {proof:02x?}"
        );
        raw.assert_closed().await;
    }

    // Nothing was deleted, and the owner still lists every file.
    assert_eq!(server.versions(), before, "nothing changed");
    let out = run_legacy(
        server.legacy_addr,
        dir.path(),
        &ids,
        &["list", "--versions", "--json"],
    )
    .await;
    assert_success(&out);
    assert_eq!(listed_names(&out), ["a.txt", "b.txt"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_a_right_proof_and_refuses_it_replayed_on_another_connection() {
    let server = Server::start().await;
    let dir = tempfile::tempdir().unwrap();
    let ids = dir.path().join("ids");
    let owner = legacy_client(server.legacy_addr, &ids);
    let a = dir.path().join("a.txt");
    write_file(&a, 5_000, 3);
    let report = owner
        .backup(
            files::collect(std::slice::from_ref(&a)).items,
            Some(&protocol::UserName::try_from("owner").unwrap()),
        )
        .await
        .unwrap();
    assert_eq!(report.exit_code(), 0, "{:?}", report.first_error());
    let identity = IdentityStore::new(&ids).load().unwrap().unwrap();
    let (id, name) = (identity.client_id, identity.name.clone());

    // The key's owner proves it on one connection and is served.
    let mut first = Raw::connect(server.legacy_addr).await;
    let wrapped = first.reconnect(id, &name).await;
    let key = identity
        .key
        .unwrap_aes_key(&mut rand::rngs::OsRng, &wrapped)
        .unwrap();
    let proof = legacy_retrieval_proof(&key, id);
    assert_eq!(
        first.ask(id, Request::Prove { proof }).await,
        Some(Response::Authenticated { client_id: id })
    );
    let listed = first.ask(id, retrieval_requests()[0].clone()).await;
    assert!(
        matches!(
            &listed,
            Some(Response::Retrieval(RetrievalResponse::ListPage { entries, .. }))
                if entries.len() == 1 && entries[0].file == file("a.txt")
        ),
        "{listed:?}"
    );

    // The same proof, seen on the wire and sent on another connection after
    // its own reconnect, is refused: that connection has another key.
    let mut second = Raw::connect(server.legacy_addr).await;
    second.reconnect(id, &name).await;
    assert_eq!(
        second.ask(id, Request::Prove { proof }).await,
        Some(Response::NotAuthenticated)
    );
    second.assert_closed().await;
    assert_eq!(server.versions().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_binary_lists_restores_and_deletes_its_own_files_on_the_legacy_listener() {
    let server = Server::start().await;
    let dir = tempfile::tempdir().unwrap();
    let ids = dir.path().join("ids");
    let src = dir.path().join("src");
    let notes = write_file(&src.join("notes.txt"), 5_000, 4);
    let data = write_file(&src.join("sub/data.bin"), 300_000, 5);
    write_file(&src.join("empty"), 0, 6);
    let out = run_legacy(
        server.legacy_addr,
        dir.path(),
        &ids,
        &["register", "--name", "lena"],
    )
    .await;
    assert_success(&out);
    let out = run_legacy(server.legacy_addr, dir.path(), &ids, &["backup", "src"]).await;
    assert_success(&out);

    let out = run_legacy(server.legacy_addr, dir.path(), &ids, &["list", "--json"]).await;
    assert_success(&out);
    assert_eq!(listed_names(&out), ["empty", "notes.txt", "sub/data.bin"]);

    let out = run_legacy(
        server.legacy_addr,
        dir.path(),
        &ids,
        &["restore", "notes.txt", "--to", "one.txt"],
    )
    .await;
    assert_success(&out);
    assert_eq!(std::fs::read(dir.path().join("one.txt")).unwrap(), notes);

    // Several connections, each proving the key once.
    let out = run_legacy(
        server.legacy_addr,
        dir.path(),
        &ids,
        &["--connections", "3", "restore", "--all", "--to", "all"],
    )
    .await;
    assert_success(&out);
    let all = dir.path().join("all");
    assert_eq!(std::fs::read(all.join("notes.txt")).unwrap(), notes);
    assert_eq!(std::fs::read(all.join("sub/data.bin")).unwrap(), data);
    assert_eq!(std::fs::read(all.join("empty")).unwrap(), b"");

    let out = run_legacy(
        server.legacy_addr,
        dir.path(),
        &ids,
        &["delete", "notes.txt"],
    )
    .await;
    assert_success(&out);
    let out = run_legacy(server.legacy_addr, dir.path(), &ids, &["list", "--json"]).await;
    assert_success(&out);
    assert_eq!(listed_names(&out), ["empty", "sub/data.bin"]);
}
