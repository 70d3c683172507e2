//! The connection cap, timeouts and graceful shutdown.

use std::time::{Duration, Instant};

use protocol::{ClientId, Numbering, Request, RequestFrame, Response};

use crate::harness::{
    alice_key, assert_logged, config, file, packets, random_bytes, stored, temp_files, user,
    wait_for_log, Client, Peer, TestServer,
};

/// A round trip that any connection gets answered: reconnect as nobody.
async fn ping(peer: &mut Peer) -> Response {
    peer.send(RequestFrame {
        client_id: ClientId([7; 16]),
        numbering: Numbering::Modern,
        request: Request::Reconnect {
            name: user("nobody"),
        },
    })
    .await;
    peer.recv().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_connections_past_the_cap_with_1607() {
    let data = tempfile::tempdir().unwrap();
    let mut cfg = config(data.path());
    cfg.max_connections = 2;
    let server = TestServer::start(cfg).await;
    let mut a = Peer::connect(server.addr).await;
    let mut b = Peer::connect(server.addr).await;
    assert!(matches!(
        ping(&mut a).await,
        Response::ReconnectRejected { .. }
    ));
    assert!(matches!(
        ping(&mut b).await,
        Response::ReconnectRejected { .. }
    ));
    let mut c = Peer::connect(server.addr).await;
    let local = c.local_addr();
    c.send(RequestFrame {
        client_id: ClientId::default(),
        numbering: Numbering::Modern,
        request: Request::Register { name: user("late") },
    })
    .await;
    c.expect_1607_and_close().await;
    assert!(
        wait_for_log(|l| l.contains(&format!("peer={local}")) && l.contains("at capacity"))
            .await
            .is_some()
    );
    // The served connections are unaffected, and a slot frees on close.
    assert!(matches!(
        ping(&mut a).await,
        Response::ReconnectRejected { .. }
    ));
    drop(b);
    let mut d = None;
    for _ in 0..50 {
        let mut p = Peer::connect(server.addr).await;
        if matches!(
            ping_or_closed(&mut p).await,
            Some(Response::ReconnectRejected { .. })
        ) {
            d = Some(p);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(d.is_some(), "a slot never freed");
    server.stop().await.unwrap();
}

async fn ping_or_closed(peer: &mut Peer) -> Option<Response> {
    peer.send(RequestFrame {
        client_id: ClientId([7; 16]),
        numbering: Numbering::Modern,
        request: Request::Reconnect {
            name: user("nobody"),
        },
    })
    .await;
    peer.next().await.and_then(Result::ok)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closes_idle_connections_after_the_idle_timeout() {
    let data = tempfile::tempdir().unwrap();
    let mut cfg = config(data.path());
    cfg.idle_timeout = Duration::from_millis(500);
    let server = TestServer::start(cfg).await;
    let mut p = Peer::connect(server.addr).await;
    let local = p.local_addr();
    assert!(matches!(
        ping(&mut p).await,
        Response::ReconnectRejected { .. }
    ));
    let start = Instant::now();
    let answers = p.closed().await;
    assert!(
        start.elapsed() >= Duration::from_millis(400),
        "closed too early: {:?}",
        start.elapsed()
    );
    assert!(start.elapsed() < Duration::from_secs(5));
    assert_eq!(answers, vec![Response::GeneralError]);
    assert_logged(local, "idle for").await;
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closes_a_request_that_does_not_complete_in_time() {
    let data = tempfile::tempdir().unwrap();
    let mut cfg = config(data.path());
    cfg.request_timeout = Duration::from_millis(500);
    cfg.idle_timeout = Duration::from_secs(30);
    let server = TestServer::start(cfg).await;
    let mut p = Peer::connect(server.addr).await;
    let local = p.local_addr();
    // A header started, then a trickle that never completes the request.
    p.send_raw(&[0u8; 10]).await;
    let start = Instant::now();
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _ = tokio::io::AsyncWriteExt::write_all(p.framed.get_mut(), &[0]).await;
    }
    let answers = p.closed().await;
    assert!(start.elapsed() < Duration::from_secs(5));
    assert_eq!(answers, vec![Response::GeneralError]);
    assert_logged(local, "request not completed").await;
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_an_upload_in_flight_finish_and_closes_idle_connections() {
    let data = tempfile::tempdir().unwrap();
    let mut cfg = config(data.path());
    cfg.shutdown_grace = Duration::from_secs(10);
    let mut server = TestServer::start(cfg).await;
    let addr = server.addr;
    let mut idle = Peer::connect(addr).await;
    assert!(matches!(
        ping(&mut idle).await,
        Response::ReconnectRejected { .. }
    ));
    let mut c = Client::register(addr, "quinn", &alice_key(), Numbering::Modern).await;
    let content = random_bytes(100_000, 3);
    let name = file("inflight.bin");
    let frames = packets(c.id, c.numbering, &c.aes, &name, &content, 10_000);
    let (first, rest) = frames.split_at(3);
    for f in first {
        c.peer.send(f.clone()).await;
    }
    // Wait until the server is writing the upload, then ask for shutdown.
    for _ in 0..100 {
        if !temp_files(data.path()).is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.request_stop();
    assert!(
        idle.closed().await.is_empty(),
        "an idle connection closes without an answer"
    );
    // The idle connection closing means the listener is already gone.
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "no new connection is accepted"
    );
    for f in rest {
        c.peer.send(f.clone()).await;
    }
    assert!(matches!(c.peer.recv().await, Response::FileReceived { .. }));
    c.peer
        .send(c.frame(Request::CrcOk { file: name.clone() }))
        .await;
    assert!(matches!(c.peer.recv().await, Response::Ack { .. }));
    assert!(c.peer.closed().await.is_empty(), "closed after the commit");
    server.stop().await.unwrap();
    assert_eq!(stored(data.path(), c.id, &name).unwrap(), content);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_cuts_a_stalled_upload_after_the_grace_period_and_leaves_nothing() {
    let data = tempfile::tempdir().unwrap();
    let mut cfg = config(data.path());
    cfg.shutdown_grace = Duration::from_millis(500);
    let mut server = TestServer::start(cfg).await;
    let mut c = Client::register(server.addr, "rita", &alice_key(), Numbering::Modern).await;
    c.store("kept", b"v1", 16).await;
    let frames = packets(
        c.id,
        c.numbering,
        &c.aes,
        &file("kept"),
        // Larger than a small file, so that it goes to a temporary.
        &random_bytes(100_000, 4),
        10_000,
    );
    c.peer.send(frames[0].clone()).await;
    for _ in 0..100 {
        if !temp_files(data.path()).is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!temp_files(data.path()).is_empty(), "the upload started");
    let start = Instant::now();
    server.request_stop();
    server.stop().await.unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "stopped in {:?}",
        start.elapsed()
    );
    assert!(
        temp_files(data.path()).is_empty(),
        "the cut upload left a temporary"
    );
    assert_eq!(stored(data.path(), c.id, &file("kept")).unwrap(), b"v1");
}
