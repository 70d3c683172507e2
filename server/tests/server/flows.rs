//! The legacy flows of `docs/PROTOCOL.md` §6 against the library server.

use std::time::Duration;

use protocol::{ClientId, Numbering, Request, RequestFrame, Response};
use server::storage::Storage;

use crate::harness::{
    alice_key, assert_metadata_matches_disk, config, file, random_bytes, stored, temp_files, user,
    Client, Peer, TestServer,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepts_both_numberings_for_a_whole_session() {
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(config(data.path())).await;
    for (i, numbering) in [Numbering::Modern, Numbering::Classic]
        .into_iter()
        .enumerate()
    {
        let mut c =
            Client::register(server.addr, &format!("user-{i}"), &alice_key(), numbering).await;
        let content = random_bytes(50_000, i as u64);
        c.store("doc.bin", &content, 4096).await;
        assert_eq!(
            stored(data.path(), c.id, &file("doc.bin")).unwrap(),
            content
        );
    }
    server.stop().await.unwrap();
    assert_metadata_matches_disk(data.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_a_taken_name_with_1601() {
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(config(data.path())).await;
    let _first = Client::register(server.addr, "dana", &alice_key(), Numbering::Modern).await;
    let mut second = Peer::connect(server.addr).await;
    second
        .send(RequestFrame {
            client_id: ClientId::default(),
            numbering: Numbering::Classic,
            request: Request::Register { name: user("dana") },
        })
        .await;
    assert_eq!(second.recv().await, Response::RegistrationFailed);
    // The connection stays usable: another name registers.
    second
        .send(RequestFrame {
            client_id: ClientId::default(),
            numbering: Numbering::Classic,
            request: Request::Register {
                name: user("dana2"),
            },
        })
        .await;
    assert!(matches!(second.recv().await, Response::Registered { .. }));
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_before_and_after_a_restart() {
    let data = tempfile::tempdir().unwrap();
    let key = alice_key();
    let server = TestServer::start(config(data.path())).await;
    let mut c = Client::register(server.addr, "erin", &key, Numbering::Classic).await;
    let id = c.id;
    c.store("a.txt", b"first", 1024).await;
    drop(c);
    let mut again = Client::reconnect(server.addr, id, "erin", &key, Numbering::Classic)
        .await
        .unwrap();
    again.store("a.txt", b"second", 1024).await;
    drop(again);
    server.stop().await.unwrap();

    let server = TestServer::start(config(data.path())).await;
    let mut after = Client::reconnect(server.addr, id, "erin", &key, Numbering::Modern)
        .await
        .unwrap();
    assert_eq!(stored(data.path(), id, &file("a.txt")).unwrap(), b"second");
    after.store("a.txt", b"third", 1024).await;
    server.stop().await.unwrap();
    assert_eq!(stored(data.path(), id, &file("a.txt")).unwrap(), b"third");
    let client = Storage::open_local(data.path())
        .unwrap()
        .meta()
        .client(id)
        .unwrap()
        .unwrap();
    assert!(client.last_seen >= client.registered);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejects_reconnect_of_unknown_renamed_or_keyless_clients_with_1606() {
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(config(data.path())).await;
    let key = alice_key();
    let unknown = ClientId([0x42; 16]);
    let answer = Client::reconnect(server.addr, unknown, "frank", &key, Numbering::Modern)
        .await
        .err();
    assert_eq!(
        answer,
        Some(Response::ReconnectRejected {
            client_id: Some(unknown)
        })
    );

    let known = Client::register(server.addr, "gina", &key, Numbering::Modern).await;
    let answer = Client::reconnect(server.addr, known.id, "not-gina", &key, Numbering::Modern)
        .await
        .err();
    assert_eq!(
        answer,
        Some(Response::ReconnectRejected {
            client_id: Some(known.id)
        })
    );

    // Registered, but the connection closed before the public key.
    let mut p = Peer::connect(server.addr).await;
    p.send(RequestFrame {
        client_id: ClientId::default(),
        numbering: Numbering::Modern,
        request: Request::Register { name: user("hank") },
    })
    .await;
    let Response::Registered { client_id: hank } = p.recv().await else {
        panic!("hank")
    };
    drop(p);
    let answer = Client::reconnect(server.addr, hank, "hank", &key, Numbering::Modern)
        .await
        .err();
    assert_eq!(
        answer,
        Some(Response::ReconnectRejected {
            client_id: Some(hank)
        })
    );

    // After a 1606 the same connection may register anew (legacy clients do).
    let mut p = Peer::connect(server.addr).await;
    p.send(RequestFrame {
        client_id: unknown,
        numbering: Numbering::Classic,
        request: Request::Reconnect { name: user("ivy") },
    })
    .await;
    assert!(matches!(p.recv().await, Response::ReconnectRejected { .. }));
    p.send(RequestFrame {
        client_id: unknown,
        numbering: Numbering::Classic,
        request: Request::Register { name: user("ivy") },
    })
    .await;
    assert!(matches!(p.recv().await, Response::Registered { .. }));
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejects_a_public_key_on_a_reconnected_connection() {
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(config(data.path())).await;
    let key = alice_key();
    let c = Client::register(server.addr, "jill", &key, Numbering::Modern).await;
    let mut again = Client::reconnect(server.addr, c.id, "jill", &key, Numbering::Modern)
        .await
        .unwrap();
    let field = protocol::crypto::public_key_field(&key.public_key()).unwrap();
    again
        .peer
        .send(again.frame(Request::PublicKey {
            name: user("jill"),
            key: field,
        }))
        .await;
    again.peer.expect_1607_and_close().await;
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discards_an_attempt_on_crc_retry_and_commits_the_resend() {
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(config(data.path())).await;
    let mut c = Client::register(server.addr, "kim", &alice_key(), Numbering::Classic).await;
    let name = file("report.pdf");
    let content = random_bytes(30_000, 9);
    assert!(matches!(
        c.send_file(&name, &content, 8192).await,
        Response::FileReceived { .. }
    ));
    c.peer
        .send(c.frame(Request::CrcRetry { file: name.clone() }))
        .await;
    assert_eq!(
        c.peer.recv().await,
        Response::Ack { client_id: c.id },
        "1604 by default"
    );
    assert!(
        temp_files(data.path()).is_empty(),
        "the attempt was discarded"
    );
    assert_eq!(stored(data.path(), c.id, &name), None);
    c.store("report.pdf", &content, 8192).await;
    assert_eq!(stored(data.path(), c.id, &name).unwrap(), content);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stays_silent_on_crc_retry_when_configured() {
    let data = tempfile::tempdir().unwrap();
    let mut cfg = config(data.path());
    cfg.reply_to_crc_retry = false;
    let server = TestServer::start(cfg).await;
    let mut c = Client::register(server.addr, "lee", &alice_key(), Numbering::Modern).await;
    let name = file("x");
    assert!(matches!(
        c.send_file(&name, b"abc", 16).await,
        Response::FileReceived { .. }
    ));
    c.peer
        .send(c.frame(Request::CrcRetry { file: name.clone() }))
        .await;
    assert!(
        c.peer.silent_for(Duration::from_millis(300)).await,
        "no answer to 1030"
    );
    c.store("x", b"abc", 16).await;
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_nothing_after_crc_abort_and_keeps_the_earlier_version() {
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(config(data.path())).await;
    let mut c = Client::register(server.addr, "max", &alice_key(), Numbering::Classic).await;
    let name = file("data.bin");
    let v1 = random_bytes(10_000, 1);
    c.store("data.bin", &v1, 4096).await;
    let v2 = random_bytes(12_000, 2);
    for attempt in 1..=4 {
        assert!(matches!(
            c.send_file(&name, &v2, 4096).await,
            Response::FileReceived { .. }
        ));
        let verdict = if attempt < 4 {
            Request::CrcRetry { file: name.clone() }
        } else {
            Request::CrcAbort { file: name.clone() }
        };
        c.peer.send(c.frame(verdict)).await;
        assert_eq!(c.peer.recv().await, Response::Ack { client_id: c.id });
    }
    assert_eq!(
        stored(data.path(), c.id, &name).unwrap(),
        v1,
        "the earlier version is intact"
    );
    let versions = Storage::open_local(data.path())
        .unwrap()
        .meta()
        .versions(c.id, &name)
        .unwrap();
    assert_eq!(versions.len(), 1);
    assert!(temp_files(data.path()).is_empty());
    // The connection is still usable after the abort.
    c.store("data.bin", &v2, 4096).await;
    server.stop().await.unwrap();
    assert_eq!(stored(data.path(), c.id, &name).unwrap(), v2);
    assert_metadata_matches_disk(data.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_1607_to_a_fifth_attempt_at_the_same_file() {
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(config(data.path())).await;
    let mut c = Client::register(server.addr, "ned", &alice_key(), Numbering::Classic).await;
    let name = file("f");
    for _ in 0..4 {
        assert!(matches!(
            c.send_file(&name, b"x", 16).await,
            Response::FileReceived { .. }
        ));
        c.peer
            .send(c.frame(Request::CrcRetry { file: name.clone() }))
            .await;
        assert!(matches!(c.peer.recv().await, Response::Ack { .. }));
    }
    for p in crate::harness::packets(c.id, c.numbering, &c.aes, &name, b"x", 16) {
        c.peer.send(p).await;
    }
    c.peer.expect_1607_and_close().await;
    server.stop().await.unwrap();
    assert!(temp_files(data.path()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeps_every_version_by_default_and_only_the_newest_n_when_configured() {
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(config(data.path())).await;
    let mut c = Client::register(server.addr, "olga", &alice_key(), Numbering::Modern).await;
    for v in 0..3u8 {
        c.store("n", &[v; 100], 64).await;
    }
    let id = c.id;
    drop(c);
    server.stop().await.unwrap();
    let meta = Storage::open_local(data.path()).unwrap();
    assert_eq!(meta.meta().versions(id, &file("n")).unwrap().len(), 3);
    assert_metadata_matches_disk(data.path());

    let mut cfg = config(data.path());
    cfg.retention.keep_last = Some(2);
    let server = TestServer::start(cfg).await;
    let mut c = Client::reconnect(server.addr, id, "olga", &alice_key(), Numbering::Modern)
        .await
        .unwrap();
    for v in 3..6u8 {
        c.store("n", &[v; 100], 64).await;
    }
    server.stop().await.unwrap();
    let sizes: Vec<Vec<u8>> = meta
        .meta()
        .versions(id, &file("n"))
        .unwrap()
        .iter()
        .map(|v| {
            let mut out = Vec::new();
            std::io::Read::read_to_end(&mut meta.open_blob(&v.blob).unwrap(), &mut out).unwrap();
            out
        })
        .collect();
    assert_eq!(
        sizes,
        vec![vec![4u8; 100], vec![5u8; 100]],
        "the two newest versions, oldest first"
    );
    assert_metadata_matches_disk(data.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_an_empty_file() {
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(config(data.path())).await;
    let mut c = Client::register(server.addr, "pam", &alice_key(), Numbering::Modern).await;
    c.store("empty", b"", 16).await;
    assert_eq!(stored(data.path(), c.id, &file("empty")).unwrap(), b"");
    server.stop().await.unwrap();
}
