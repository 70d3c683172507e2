//! Malformed input ends only the connection that sent it, with its cause
//! logged; a well-behaved client is served in parallel throughout.

use std::time::Duration;

use bytes::{BufMut, BytesMut};
use protocol::wire::{RequestCode, RequestHeader, VERSION};
use protocol::{ClientId, Numbering, Request, RequestFrame, Response};

use crate::harness::{
    alice_key, assert_logged, assert_metadata_matches_disk, config, file, packets, random_bytes,
    stored, Client, Peer, TestServer,
};

fn header(code: RequestCode, payload_len: u32) -> BytesMut {
    let mut b = BytesMut::new();
    RequestHeader {
        client_id: ClientId([1; 16]),
        version: VERSION,
        code,
        payload_len,
    }
    .write(&mut b);
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ends_malformed_connections_with_a_logged_cause_while_serving_another_client() {
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(config(data.path())).await;
    let addr = server.addr;

    // The good client uploads slowly, packet by packet, during everything.
    let good = tokio::spawn(async move {
        let mut c = Client::register(addr, "goodie", &alice_key(), Numbering::Modern).await;
        let content = random_bytes(400_000, 5);
        let name = file("steady.bin");
        for p in packets(c.id, c.numbering, &c.aes, &name, &content, 16_384) {
            c.peer.send(p).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        match c.peer.recv().await {
            Response::FileReceived { cksum, .. } => {
                assert_eq!(cksum, protocol::Cksum::of(&content))
            }
            other => panic!("{other:?}"),
        }
        c.peer.send(c.frame(Request::CrcOk { file: name })).await;
        assert!(matches!(c.peer.recv().await, Response::Ack { .. }));
        (c.id, content)
    });

    // Garbage: the version byte is wrong.
    let mut p = Peer::connect(addr).await;
    let local = p.local_addr();
    p.send_raw(
        &random_bytes(64, 1)
            .iter()
            .map(|b| b | 0x80)
            .collect::<Vec<_>>(),
    )
    .await;
    p.expect_1607_and_close().await;
    assert_logged(local, "unsupported protocol version").await;

    // A declared size far over the limit: refused before any allocation.
    let mut p = Peer::connect(addr).await;
    let local = p.local_addr();
    p.send_raw(&header(RequestCode::SEND_FILE, u32::MAX)).await;
    p.expect_1607_and_close().await;
    assert_logged(local, "declares a 4294967295-byte payload").await;

    // A register whose payload is not 255 bytes.
    let mut p = Peer::connect(addr).await;
    let local = p.local_addr();
    p.send_raw(&header(RequestCode::REGISTER, 10)).await;
    p.expect_1607_and_close().await;
    assert_logged(local, "declares a 10-byte payload").await;

    // An unknown request code.
    let mut p = Peer::connect(addr).await;
    let local = p.local_addr();
    p.send_raw(&header(RequestCode(999), 0)).await;
    p.expect_1607_and_close().await;
    assert_logged(local, "unknown code 999").await;

    // A truncated packet: the peer closes in the middle of a request.
    let mut p = Peer::connect(addr).await;
    let local = p.local_addr();
    let mut raw = header(RequestCode::CLASSIC_REGISTER, 255);
    raw.put_slice(&[b'x'; 100]);
    p.send_raw(&raw).await;
    tokio::io::AsyncWriteExt::shutdown(p.framed.get_mut())
        .await
        .unwrap();
    p.expect_1607_and_close().await;
    assert_logged(local, "bytes remaining on stream").await;

    // A request before registration.
    let mut p = Peer::connect(addr).await;
    let local = p.local_addr();
    p.send(RequestFrame {
        client_id: ClientId([1; 16]),
        numbering: Numbering::Modern,
        request: Request::CrcOk { file: file("x") },
    })
    .await;
    p.expect_1607_and_close().await;
    assert_logged(local, "protocol violation").await;

    // Packets out of order, and a packet that changes the file mid-upload.
    let mut c = Client::register(addr, "orderly", &alice_key(), Numbering::Classic).await;
    let local = c.peer.local_addr();
    let frames = packets(
        c.id,
        c.numbering,
        &c.aes,
        &file("f"),
        &random_bytes(5000, 2),
        1024,
    );
    c.peer.send(frames[1].clone()).await;
    c.peer.expect_1607_and_close().await;
    assert_logged(local, "packet 2 arrived where packet 1 was due").await;

    let mut c = Client::register(addr, "switcher", &alice_key(), Numbering::Classic).await;
    let local = c.peer.local_addr();
    let a = packets(
        c.id,
        c.numbering,
        &c.aes,
        &file("a"),
        &random_bytes(5000, 2),
        1024,
    );
    let b = packets(
        c.id,
        c.numbering,
        &c.aes,
        &file("b"),
        &random_bytes(5000, 2),
        1024,
    );
    c.peer.send(a[0].clone()).await;
    c.peer.send(b[1].clone()).await;
    c.peer.expect_1607_and_close().await;
    assert_logged(local, "changes the upload's file name").await;

    // A packet declaring fewer plaintext bytes than its ciphertext holds.
    let mut c = Client::register(addr, "liar", &alice_key(), Numbering::Classic).await;
    let local = c.peer.local_addr();
    let mut lie = packets(
        c.id,
        c.numbering,
        &c.aes,
        &file("l"),
        &random_bytes(100, 3),
        1024,
    );
    if let Request::SendFile(p) = &mut lie[0].request {
        p.head.orig_size = 5;
    }
    c.peer.send(lie[0].clone()).await;
    c.peer.expect_1607_and_close().await;
    assert_logged(local, "does not match").await;

    let (id, content) = tokio::time::timeout(Duration::from_secs(60), good)
        .await
        .unwrap()
        .unwrap();
    server.stop().await.unwrap();
    assert_eq!(
        stored(data.path(), id, &file("steady.bin")).unwrap(),
        content
    );
    assert!(crate::harness::temp_files(data.path()).is_empty());
    assert_metadata_matches_disk(data.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_random_garbage_connections() {
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(config(data.path())).await;
    let mut tasks = tokio::task::JoinSet::new();
    for seed in 0..40u64 {
        let addr = server.addr;
        tasks.spawn(async move {
            let mut p = Peer::connect(addr).await;
            let mut bytes = random_bytes(23 + (seed as usize * 37) % 600, seed);
            // Half of them with a plausible header start.
            if seed % 2 == 0 {
                bytes[16] = VERSION;
            }
            p.send_raw(&bytes).await;
            let _ = tokio::io::AsyncWriteExt::shutdown(p.framed.get_mut()).await;
            p.closed().await
        });
    }
    while let Some(answers) = tasks.join_next().await {
        let answers = answers.unwrap();
        assert!(
            answers
                .iter()
                .all(|r| !matches!(r, Response::FileReceived { .. } | Response::Ack { .. })),
            "{answers:?}"
        );
    }
    // Still serving.
    let mut c = Client::register(server.addr, "after", &alice_key(), Numbering::Modern).await;
    c.store("ok", b"still here", 16).await;
    server.stop().await.unwrap();
}
