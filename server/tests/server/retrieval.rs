//! Retrieval and history (`docs/PROTOCOL.md` §11): list, restore and
//! delete over the wire, retention, append-only, and the operator commands.
//!
//! The 1 GiB restore measurement is ignored by default:
//!
//! ```sh
//! cargo test --release -p backup-server --test server -- --ignored --nocapture retrieval::measures
//! ```

use std::time::{Duration, Instant, SystemTime};

use bytes::BytesMut;
use protocol::crypto::CbcDecryptor;
use protocol::retrieval::{
    ListEntry, ListFlags, RefusalReason, RestoreBegin, RetrievalRequest, RetrievalResponse,
    MAX_LIST_ENTRIES,
};
use protocol::{Cksum, ClientId, Numbering, Request, RequestFrame, Response};
use server::admin;
use server::storage::{Retention, Storage};

use crate::harness::{
    alice_key, assert_logged, assert_metadata_matches_disk, config, file, random_bytes, Binary,
    Client, Peer, TestServer,
};

/// Registers `name` with Alice's key and proves it, so that retrieval
/// requests are served on the legacy listener (`docs/PROTOCOL.md` §11.5).
async fn registered(addr: std::net::SocketAddr, name: &str) -> Client {
    let mut c = Client::register(addr, name, &alice_key(), Numbering::Modern).await;
    c.prove().await;
    c
}

fn retrieval(r: RetrievalResponse) -> Response {
    Response::Retrieval(r)
}

/// Every entry of a listing, following cursors (bounded); also returns the
/// page sizes.
async fn list(c: &mut Client, flags: ListFlags) -> (Vec<ListEntry>, Vec<usize>) {
    let mut cursor = 0;
    let mut entries = Vec::new();
    let mut pages = Vec::new();
    for _ in 0..1000 {
        let req = c.frame(Request::Retrieval(RetrievalRequest::List { flags, cursor }));
        c.peer.send(req).await;
        match c.peer.recv().await {
            Response::Retrieval(RetrievalResponse::ListPage {
                next_cursor,
                entries: page,
            }) => {
                assert!(page.len() <= MAX_LIST_ENTRIES);
                pages.push(page.len());
                entries.extend(page);
                if next_cursor == 0 {
                    return (entries, pages);
                }
                cursor = next_cursor;
            }
            other => panic!("list: {other:?}"),
        }
    }
    panic!("listing never ended");
}

/// A restore's header and decrypted content, or the answer when it is not
/// 1641. Checks the size, cksum and packet bounds on the way.
async fn restore(
    c: &mut Client,
    name: &str,
    version: u64,
) -> Result<(RestoreBegin, Vec<u8>, usize), Response> {
    let req = c.frame(Request::Retrieval(RetrievalRequest::Restore {
        version,
        file: file(name),
    }));
    c.peer.send(req).await;
    let begin = match c.peer.recv().await {
        Response::Retrieval(RetrievalResponse::RestoreBegin(b)) => b,
        other => return Err(other),
    };
    assert_eq!(begin.file, file(name));
    assert_eq!(begin.content_size, protocol::crypto::pkcs7_len(begin.size));
    let mut dec = CbcDecryptor::with_iv(&c.aes, &begin.iv);
    let mut plain = BytesMut::new();
    let mut got = 0u64;
    let mut packets = 0;
    while got < begin.content_size {
        match c.peer.recv().await {
            Response::Retrieval(RetrievalResponse::RestoreData { content }) => {
                assert!(content.len() <= 1024 * 1024, "packet of {}", content.len());
                got += content.len() as u64;
                packets += 1;
                dec.update(&content, &mut plain);
            }
            other => panic!("restore data: {other:?}"),
        }
    }
    assert_eq!(got, begin.content_size, "ciphertext overran its size");
    dec.finish(&mut plain).unwrap();
    assert_eq!(plain.len() as u64, begin.size);
    assert_eq!(Cksum::of(&plain), begin.cksum);
    Ok((begin, plain.to_vec(), packets))
}

async fn delete(c: &mut Client, name: &str) -> Response {
    let req = c.frame(Request::Retrieval(RetrievalRequest::Delete {
        file: file(name),
    }));
    c.peer.send(req).await;
    c.peer.recv().await
}

fn names(entries: &[ListEntry]) -> Vec<(String, u64)> {
    entries
        .iter()
        .map(|e| {
            (
                String::from_utf8(e.file.as_bytes().to_vec()).unwrap(),
                e.size,
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_and_restores_every_version_of_a_changed_file() {
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(config(data.path())).await;
    let mut c = registered(server.addr, "rita").await;
    let v1 = random_bytes(50_000, 1);
    let v2 = random_bytes(60_001, 2);
    c.store("b/doc", &v1, 4096).await;
    c.store("a", b"other", 64).await;
    c.store("b/doc", &v2, 4096).await;

    let (all, _) = list(&mut c, ListFlags::ALL_VERSIONS).await;
    assert_eq!(
        names(&all),
        vec![
            ("a".into(), 5),
            ("b/doc".into(), 50_000),
            ("b/doc".into(), 60_001)
        ]
    );
    assert!(all[1].version < all[2].version);
    assert_eq!(all[1].cksum, Cksum::of(&v1));
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(all
        .iter()
        .all(|e| e.stored_at <= now && e.stored_at + 60 > now));
    let (latest, _) = list(&mut c, ListFlags::LATEST).await;
    assert_eq!(
        names(&latest),
        vec![("a".into(), 5), ("b/doc".into(), 60_001)]
    );
    assert_eq!(latest[1].version, all[2].version);

    let (begin, content, _) = restore(&mut c, "b/doc", 0).await.unwrap();
    assert_eq!(begin.version, all[2].version);
    assert_eq!(content, v2);
    let (begin_old, content, _) = restore(&mut c, "b/doc", all[1].version).await.unwrap();
    assert_eq!(content, v1);
    assert_ne!(begin.iv, begin_old.iv, "every restore has a fresh IV");
    assert_eq!(restore(&mut c, "a", 0).await.unwrap().1, b"other");
    assert_logged(c.peer.local_addr(), "restore sent").await;
    server.stop().await.unwrap();
    assert_metadata_matches_disk(data.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_1644_for_an_unknown_name_or_version() {
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(config(data.path())).await;
    let mut c = registered(server.addr, "sam").await;
    c.store("x", b"1", 64).await;
    c.store("y", b"2", 64).await;
    let (all, _) = list(&mut c, ListFlags::ALL_VERSIONS).await;
    let not_found = retrieval(RetrievalResponse::NotFound);
    assert_eq!(restore(&mut c, "nope", 0).await.unwrap_err(), not_found);
    // A version id that exists, but of another name.
    assert_eq!(
        restore(&mut c, "x", all[1].version).await.unwrap_err(),
        not_found
    );
    assert_eq!(restore(&mut c, "x", u64::MAX).await.unwrap_err(), not_found);
    assert_eq!(delete(&mut c, "nope").await, not_found);
    // The connection is still usable.
    assert_eq!(restore(&mut c, "x", 0).await.unwrap().1, b"1");
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeps_each_clients_files_to_itself() {
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(config(data.path())).await;
    let mut alice = registered(server.addr, "alice").await;
    let mut bob = registered(server.addr, "bob").await;
    alice.store("secret", b"alice's", 64).await;
    let (mine, _) = list(&mut alice, ListFlags::ALL_VERSIONS).await;
    let (theirs, pages) = list(&mut bob, ListFlags::ALL_VERSIONS).await;
    assert!(theirs.is_empty());
    assert_eq!(pages, vec![0]);
    let not_found = retrieval(RetrievalResponse::NotFound);
    assert_eq!(restore(&mut bob, "secret", 0).await.unwrap_err(), not_found);
    assert_eq!(
        restore(&mut bob, "secret", mine[0].version)
            .await
            .unwrap_err(),
        not_found
    );
    assert_eq!(delete(&mut bob, "secret").await, not_found);
    // Bob cannot pass as Alice on his connection either.
    let mut forged = bob.frame(Request::Retrieval(RetrievalRequest::List {
        flags: ListFlags::ALL_VERSIONS,
        cursor: 0,
    }));
    forged.client_id = alice.id;
    bob.peer.send(forged).await;
    bob.peer.expect_1607_and_close().await;
    assert_eq!(
        restore(&mut alice, "secret", 0).await.unwrap().1,
        b"alice's"
    );
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletes_every_version_of_a_name() {
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(config(data.path())).await;
    let mut c = registered(server.addr, "tom").await;
    c.store("gone", b"one", 64).await;
    c.store("gone", b"two", 64).await;
    c.store("kept", b"three", 64).await;
    assert_eq!(
        delete(&mut c, "gone").await,
        retrieval(RetrievalResponse::Deleted { versions: 2 })
    );
    let (all, _) = list(&mut c, ListFlags::ALL_VERSIONS).await;
    assert_eq!(names(&all), vec![("kept".into(), 5)]);
    assert_eq!(
        restore(&mut c, "gone", 0).await.unwrap_err(),
        retrieval(RetrievalResponse::NotFound)
    );
    assert_eq!(
        delete(&mut c, "gone").await,
        retrieval(RetrievalResponse::NotFound)
    );
    // The name can be backed up again.
    c.store("gone", b"back", 64).await;
    assert_eq!(restore(&mut c, "gone", 0).await.unwrap().1, b"back");
    server.stop().await.unwrap();
    assert_metadata_matches_disk(data.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_delete_under_append_only_and_keeps_versions() {
    let data = tempfile::tempdir().unwrap();
    let mut cfg = config(data.path());
    cfg.append_only = true;
    cfg.retention.keep_last = Some(1);
    let server = TestServer::start(cfg).await;
    let mut c = registered(server.addr, "uma").await;
    c.store("f", b"v1", 64).await;
    c.store("f", b"v2", 64).await;
    let refused = retrieval(RetrievalResponse::Refused {
        reason: RefusalReason::APPEND_ONLY,
    });
    assert_eq!(delete(&mut c, "f").await, refused);
    let (all, _) = list(&mut c, ListFlags::ALL_VERSIONS).await;
    assert_eq!(all.len(), 2, "retention is not applied under append-only");
    server.stop().await.unwrap();

    // The per-client flag, toggled by the operator while the server runs.
    let server = TestServer::start(config(data.path())).await;
    let mut c = Client::reconnect(server.addr, c.id, "uma", &alice_key(), Numbering::Modern)
        .await
        .unwrap();
    c.prove().await;
    let storage = Storage::open_local(data.path()).unwrap();
    let mut out = Vec::new();
    admin::set_append_only(&storage, "uma", true, &mut out).unwrap();
    assert!(String::from_utf8(out)
        .unwrap()
        .contains("append-only on (was off)"));
    assert_eq!(delete(&mut c, "f").await, refused);
    admin::set_append_only(&storage, &c.id.to_hex(), false, &mut Vec::new()).unwrap();
    assert_eq!(
        delete(&mut c, "f").await,
        retrieval(RetrievalResponse::Deleted { versions: 2 })
    );
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeps_only_the_newest_with_keep_last_1_at_commit() {
    let data = tempfile::tempdir().unwrap();
    let mut cfg = config(data.path());
    cfg.retention.keep_last = Some(1);
    let server = TestServer::start(cfg).await;
    let mut c = registered(server.addr, "vic").await;
    for v in 0..3u8 {
        c.store("n", &[v; 40], 64).await;
    }
    let (all, _) = list(&mut c, ListFlags::ALL_VERSIONS).await;
    assert_eq!(all.len(), 1);
    assert_eq!(restore(&mut c, "n", 0).await.unwrap().1, vec![2u8; 40]);
    server.stop().await.unwrap();
    assert_metadata_matches_disk(data.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_never_removes_the_newest_version() {
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(config(data.path())).await;
    let mut c = registered(server.addr, "wes").await;
    for v in 0..3u8 {
        c.store("many", &[v; 10], 64).await;
    }
    c.store("single", b"only", 64).await;
    // Prune beside the running server.
    let storage = Storage::open_local(data.path()).unwrap();
    let mut out = Vec::new();
    let none = admin::prune(&storage, &Retention::KEEP_ALL, &mut out);
    assert!(matches!(none, Err(admin::AdminError::NoRule)));
    let two = Retention {
        keep_last: Some(2),
        keep_within: None,
    };
    let removed = admin::prune(&storage, &two, &mut out).unwrap();
    assert_eq!(removed.len(), 1);
    assert_eq!(removed[0].size, 10);
    // Everything is older than a millisecond: only the newest stay.
    std::thread::sleep(Duration::from_millis(5));
    let recent = Retention {
        keep_last: None,
        keep_within: Some(Duration::from_millis(1)),
    };
    let removed = admin::prune(&storage, &recent, &mut out).unwrap();
    assert_eq!(removed.len(), 1);
    let report = String::from_utf8(out).unwrap();
    assert!(report.contains("pruned 1 versions, 10 bytes"), "{report}");
    assert!(report.contains("removed\t"), "{report}");
    let (all, _) = list(&mut c, ListFlags::ALL_VERSIONS).await;
    assert_eq!(names(&all), vec![("many".into(), 10), ("single".into(), 4)]);
    assert_eq!(restore(&mut c, "many", 0).await.unwrap().1, vec![2u8; 10]);
    server.stop().await.unwrap();
    assert_metadata_matches_disk(data.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_a_list_of_more_than_256_versions() {
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(config(data.path())).await;
    let mut c = registered(server.addr, "xan").await;
    let count = MAX_LIST_ENTRIES + 44;
    for i in 0..count {
        // Names in reverse so that the order is the server's doing.
        c.store(&format!("f{:03}", count - 1 - i), &[1], 16).await;
    }
    c.store("f000", &[1, 2], 16).await;
    let (all, pages) = list(&mut c, ListFlags::ALL_VERSIONS).await;
    assert_eq!(pages, vec![MAX_LIST_ENTRIES, 45]);
    let mut expected: Vec<(String, u64)> = (0..count).map(|i| (format!("f{i:03}"), 1)).collect();
    expected.insert(1, ("f000".into(), 2));
    assert_eq!(names(&all), expected);
    let (latest, pages) = list(&mut c, ListFlags::LATEST).await;
    assert_eq!(pages, vec![MAX_LIST_ENTRIES, 44]);
    assert_eq!(latest.len(), count);
    assert_eq!(latest[0].size, 2);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restores_a_file_of_several_packets_and_an_empty_file() {
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(config(data.path())).await;
    let mut c = registered(server.addr, "yul").await;
    let big = random_bytes(3 * 1024 * 1024 + 5, 9);
    c.store("big", &big, 64 * 1024).await;
    c.store("empty", b"", 16).await;
    let (begin, content, packets) = restore(&mut c, "big", 0).await.unwrap();
    assert_eq!(content, big);
    assert_eq!(begin.content_size, 3 * 1024 * 1024 + 16);
    assert_eq!(packets, 4, "three full 1 MiB packets and the tail");
    let (begin, content, packets) = restore(&mut c, "empty", 0).await.unwrap();
    assert!(content.is_empty());
    assert_eq!((begin.size, begin.content_size, packets), (0, 16, 1));
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeps_restore_packets_within_a_lower_packet_limit() {
    let data = tempfile::tempdir().unwrap();
    let mut cfg = config(data.path());
    cfg.limits.max_packet_content = 1000;
    let server = TestServer::start(cfg).await;
    let mut c = registered(server.addr, "zed").await;
    let content = random_bytes(10_000, 3);
    c.store("f", &content, 992).await;
    let (_, got, packets) = restore(&mut c, "f", 0).await.unwrap();
    assert_eq!(got, content);
    assert_eq!(packets, 11, "10_016 bytes in packets of 992");
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closes_before_the_last_packet_when_a_blob_is_damaged() {
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(config(data.path())).await;
    let mut c = registered(server.addr, "ada").await;
    let content = random_bytes(2 * 1024 * 1024 + 100, 4);
    c.store("f", &content, 64 * 1024).await;
    let storage = Storage::open_local(data.path()).unwrap();
    let row = storage.meta().latest(c.id, &file("f")).unwrap().unwrap();
    // Same size, one byte changed near the end.
    let path = data.path().join(&row.blob.0);
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&path, &bytes).unwrap();

    let req = c.frame(Request::Retrieval(RetrievalRequest::Restore {
        version: 0,
        file: file("f"),
    }));
    c.peer.send(req).await;
    let begin = match c.peer.recv().await {
        Response::Retrieval(RetrievalResponse::RestoreBegin(b)) => b,
        other => panic!("{other:?}"),
    };
    let mut got = 0u64;
    for r in c.peer.closed().await {
        match r {
            Response::Retrieval(RetrievalResponse::RestoreData { content }) => {
                got += content.len() as u64
            }
            Response::GeneralError => {}
            other => panic!("{other:?}"),
        }
    }
    assert!(
        got < begin.content_size,
        "the client must not receive the whole ciphertext ({got} of {})",
        begin.content_size
    );
    assert_logged(c.peer.local_addr(), "RESTORE ABORTED").await;
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_1651_and_closes_on_retrieval_before_the_proof_of_key() {
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(config(data.path())).await;
    let owner = Client::register(server.addr, "nell", &alice_key(), Numbering::Modern).await;
    let requests = [
        RetrievalRequest::List {
            flags: ListFlags::LATEST,
            cursor: 0,
        },
        RetrievalRequest::Restore {
            version: 0,
            file: file("f"),
        },
        RetrievalRequest::Delete { file: file("f") },
    ];
    for request in requests {
        // Before any key exchange.
        let mut peer = Peer::connect(server.addr).await;
        peer.send(RequestFrame {
            client_id: ClientId([7; 16]),
            numbering: Numbering::Modern,
            request: Request::Retrieval(request.clone()),
        })
        .await;
        assert_eq!(peer.closed().await, vec![Response::NotAuthenticated]);
        // After a reconnect, which proves nothing on this listener.
        let mut c = Client::reconnect(
            server.addr,
            owner.id,
            "nell",
            &alice_key(),
            Numbering::Modern,
        )
        .await
        .unwrap();
        c.peer.send(c.frame(Request::Retrieval(request))).await;
        assert_eq!(c.peer.closed().await, vec![Response::NotAuthenticated]);
        assert_logged(c.peer.local_addr(), "has not proved its key").await;
    }
    // A wrong proof: 1651, closed, and logged.
    let mut c = Client::reconnect(
        server.addr,
        owner.id,
        "nell",
        &alice_key(),
        Numbering::Modern,
    )
    .await
    .unwrap();
    c.peer
        .send(c.frame(Request::Prove { proof: [0x5a; 32] }))
        .await;
    assert_eq!(c.peer.closed().await, vec![Response::NotAuthenticated]);
    assert_logged(c.peer.local_addr(), "proof of the client's key refused").await;
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_commands_report_and_change_the_data() {
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(config(data.path())).await;
    let mut c = registered(server.addr, "otto").await;
    let mut d = registered(server.addr, "other").await;
    c.store("a.txt", b"hello", 64).await;
    c.store("a.txt", b"hello!", 64).await;
    c.store("b.txt", b"x", 64).await;
    d.store("mine", b"kept", 64).await;
    let storage = Storage::open_local(data.path()).unwrap();

    let mut out = Vec::new();
    let quotas = server::config::Quotas::default();
    admin::clients(&storage, &quotas, true, &mut out).unwrap();
    let listed: serde_json::Value = serde_json::from_slice(&out).unwrap();
    let otto = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "otto")
        .unwrap();
    assert_eq!(otto["id"], c.id.to_hex());
    assert_eq!(otto["append_only"], false);
    let counts = [
        "files",
        "versions",
        "file_bytes",
        "snapshots",
        "stored_bytes",
        "charged_bytes",
    ]
    .map(|k| otto[k].as_u64().unwrap());
    assert_eq!(counts, [2, 3, 12, 0, 0, 12], "{otto}");
    assert_eq!(otto["quota_source"], "none");
    let mut out = Vec::new();
    admin::clients(&storage, &quotas, false, &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    let line = text.lines().find(|l| l.starts_with("otto ")).unwrap();
    assert!(line.contains(&c.id.to_hex()), "{text}");
    assert!(line.contains("12 B"), "{text}");

    let mut out = Vec::new();
    admin::files(&storage, "otto", false, &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    assert_eq!(text.lines().count(), 3, "{text}");
    assert!(text.lines().nth(1).unwrap().ends_with("\ta.txt"));
    assert!(text.lines().nth(1).unwrap().contains("\t6\t"));
    let mut out = Vec::new();
    admin::files(&storage, &c.id.to_hex(), true, &mut out).unwrap();
    assert_eq!(String::from_utf8(out).unwrap().lines().count(), 4);
    assert!(matches!(
        admin::files(&storage, "nobody", true, &mut Vec::new()),
        Err(admin::AdminError::UnknownClient(_))
    ));

    let mut out = Vec::new();
    admin::remove_client(&storage, "otto", &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(text.contains("3 versions, 12 bytes"), "{text}");
    assert!(storage.meta().client(c.id).unwrap().is_none());
    assert!(!data.path().join("clients").join(c.id.to_hex()).exists());
    // The other client is untouched, and the removed one cannot come back.
    assert_eq!(restore(&mut d, "mine", 0).await.unwrap().1, b"kept");
    let back = Client::reconnect(server.addr, c.id, "otto", &alice_key(), Numbering::Modern).await;
    assert!(back.is_err());
    server.stop().await.unwrap();
    assert_metadata_matches_disk(data.path());
}

fn run_binary(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_backup-server"))
        .args(args)
        .env_clear()
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_runs_operator_commands_beside_a_running_server() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().join("data");
    let server = Binary::start(&dir, &[]);
    let mut c = registered(server.addr, "pia").await;
    c.store("doc", b"first", 64).await;
    c.store("doc", b"second", 64).await;
    let d = dir.to_str().unwrap();

    let (ok, out, err) = run_binary(&["clients", "--json", "--data-dir", d]);
    assert!(ok, "{err}");
    let listed: serde_json::Value = serde_json::from_str(&out).unwrap();
    let pia = &listed[0];
    assert_eq!(pia["id"], c.id.to_hex(), "{out}");
    assert_eq!(pia["name"], "pia", "{out}");
    let counts = ["files", "versions", "file_bytes"].map(|k| pia[k].as_u64().unwrap());
    assert_eq!(counts, [1, 2, 11], "{out}");
    let (ok, out, err) = run_binary(&["clients", "--data-dir", d]);
    assert!(ok, "{err}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("pia ") && l.contains(&c.id.to_hex())),
        "{out}"
    );
    let (ok, out, err) = run_binary(&["files", "pia", "--versions", "--data-dir", d]);
    assert!(ok, "{err}");
    assert_eq!(
        out.lines().filter(|l| l.ends_with("\tdoc")).count(),
        2,
        "{out}"
    );
    let (ok, out, err) = run_binary(&["append-only", "pia", "on", "--data-dir", d]);
    assert!(ok, "{err}");
    assert!(out.contains("append-only on"), "{out}");
    assert_eq!(
        delete(&mut c, "doc").await,
        retrieval(RetrievalResponse::Refused {
            reason: RefusalReason::APPEND_ONLY
        })
    );
    let (ok, out, err) = run_binary(&["prune", "--keep-last", "1", "--data-dir", d]);
    assert!(ok, "{err}");
    assert!(out.contains("pruned 1 versions, 5 bytes"), "{out}");
    let (ok, _, err) = run_binary(&["files", "nobody", "--data-dir", d]);
    assert!(!ok);
    assert!(err.contains("no client"), "{err}");
    assert_eq!(restore(&mut c, "doc", 0).await.unwrap().1, b"second");
}

/// Restores 1 GiB through the release binary and reports MB/s and the
/// server's peak RSS. The content is put in place through the storage API
/// beside the running server, so only the restore is timed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement: run in release with --ignored --nocapture"]
async fn measures_a_1_gib_restore() {
    use sha2::{Digest, Sha256};
    let size: usize = std::env::var("RESTORE_BYTES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1 << 30);
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().join("data");
    let server = Binary::start(&dir, &[]);
    let mut c = registered(server.addr, "big").await;
    let storage = Storage::open_local(&dir).unwrap();
    let block = random_bytes(1 << 20, 5);
    let mut w = storage.blobs().begin_write(c.id).unwrap();
    let mut sha = Sha256::new();
    let mut cksum = Cksum::new();
    let mut left = size;
    while left > 0 {
        let n = left.min(block.len());
        w.write(&block[..n]).unwrap();
        sha.update(&block[..n]);
        cksum.update(&block[..n]);
        left -= n;
    }
    let staged = w.finish().unwrap();
    storage
        .commit(
            staged,
            server::storage::NewVersion {
                client: c.id,
                file: file("huge"),
                blob: server::storage::BlobKey(String::new()),
                size: size as u64,
                content_size: protocol::crypto::pkcs7_len(size as u64),
                cksum: cksum.finish(),
                sha256: sha.finalize().into(),
                stored_at: SystemTime::now(),
            },
            &Retention::KEEP_ALL,
        )
        .unwrap();
    let before = server.peak_rss_kib().unwrap();
    let cpu_server = server.cpu_time().unwrap();
    let cpu_client = crate::harness::cpu_time_of("self").unwrap();
    let started = Instant::now();
    // A lean client: decrypt and checksum packet by packet, keep nothing.
    let req = c.frame(Request::Retrieval(RetrievalRequest::Restore {
        version: 0,
        file: file("huge"),
    }));
    c.peer.send(req).await;
    let begin = match c.peer.recv().await {
        Response::Retrieval(RetrievalResponse::RestoreBegin(b)) => b,
        other => panic!("{other:?}"),
    };
    assert_eq!(begin.size as usize, size);
    let mut dec = CbcDecryptor::with_iv(&c.aes, &begin.iv);
    let mut plain = BytesMut::with_capacity(2 << 20);
    let mut sum = Cksum::new();
    let (mut got, mut packets) = (0u64, 0u32);
    while got < begin.content_size {
        match c.peer.recv().await {
            Response::Retrieval(RetrievalResponse::RestoreData { content }) => {
                got += content.len() as u64;
                packets += 1;
                plain.clear();
                dec.update(&content, &mut plain);
                sum.update(&plain);
            }
            other => panic!("{other:?}"),
        }
    }
    plain.clear();
    dec.finish(&mut plain).unwrap();
    sum.update(&plain);
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(sum.finish(), begin.cksum);
    let after = server.peak_rss_kib().unwrap();
    println!(
        "CPU seconds: server {:.2}, test client {:.2}",
        (server.cpu_time().unwrap() - cpu_server).as_secs_f64(),
        (crate::harness::cpu_time_of("self").unwrap() - cpu_client).as_secs_f64()
    );
    println!(
        "restore of {size} bytes: {secs:.2} s, {:.0} MB/s end to end (client decrypts and checksums), {packets} packets, server VmHWM {before} KiB before, {after} KiB after",
        size as f64 / 1e6 / secs
    );
    assert!(server.logged("restore sent"));
    for line in server.log.lock().unwrap().iter() {
        if line.contains("restore sent") {
            println!("server: {line}");
        }
    }
    assert!(after < 200 * 1024, "server peak RSS {after} KiB");
}
