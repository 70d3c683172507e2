//! Admission (`docs/SECURITY.md`, "Denial of service"): the per-source
//! limit, the unauthenticated budget and its evictions, and the handshake
//! deadline, against the library server over real sockets from several
//! addresses of 127.0.0.0/8. The lock-out scenarios against the real
//! binaries are in `client/tests/hardening.rs`.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use protocol::{Numbering, Response};

use crate::harness::{alice_key, config, logs, random_bytes, Client, Peer, TestServer};

fn ip(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

/// Whether the server logged a line about `local` containing `needle`.
fn logged_for(local: std::net::SocketAddr, needle: &str) -> bool {
    let local = local.to_string();
    logs()
        .lines()
        .any(|l| l.contains(&local) && l.contains(needle))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closes_a_source_past_its_limit_at_once_and_serves_other_sources() {
    let data = tempfile::tempdir().unwrap();
    let mut cfg = config(data.path());
    cfg.max_per_source = 3;
    let server = TestServer::start(cfg).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(Peer::connect_from(server.addr, ip(2)).await);
    }
    // Admitted: silent, not closed.
    for p in &mut held {
        assert!(p.silent_for(Duration::from_millis(100)).await);
    }
    let mut fourth = Peer::connect_from(server.addr, ip(2)).await;
    let started = Instant::now();
    assert_eq!(fourth.closed().await, vec![], "closed without an answer");
    assert!(started.elapsed() < Duration::from_secs(2), "closed at once");
    assert!(logged_for(
        fourth.local_addr(),
        "too many connections from this source"
    ));

    // Another address is served as usual.
    let mut c =
        Client::register(server.addr, "other-source", &alice_key(), Numbering::Modern).await;
    c.store("a.bin", &random_bytes(10_000, 1), 4096).await;

    // A slot of the source is free again once one of its connections ends.
    drop(held.pop());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut again = Peer::connect_from(server.addr, ip(2)).await;
    assert!(again.silent_for(Duration::from_millis(200)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newcomer_evicts_an_unauthenticated_connection_of_the_heaviest_source() {
    let data = tempfile::tempdir().unwrap();
    let mut cfg = config(data.path());
    cfg.max_unauthenticated = 4;
    let server = TestServer::start(cfg).await;
    // The budget filled by one source.
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(Peer::connect_from(server.addr, ip(3)).await);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Its next one is refused: it holds the most already.
    let mut refused = Peer::connect_from(server.addr, ip(3)).await;
    assert_eq!(refused.closed().await, vec![]);
    // A client from elsewhere gets in, registers and uploads: one of the
    // idle connections made room and was closed without an answer.
    let mut c = Client::register(server.addr, "newcomer", &alice_key(), Numbering::Modern).await;
    c.store("b.bin", &random_bytes(20_000, 2), 4096).await;
    let mut closed = 0;
    for p in &mut idle {
        if !p.silent_for(Duration::from_millis(100)).await {
            closed += 1;
        }
    }
    assert_eq!(closed, 1, "exactly one idle connection was evicted");
    // Authenticated, the client no longer counts against the budget: four
    // new idle connections from another source fit again (evicting from
    // the heaviest each time) and the client keeps working.
    let mut others = Vec::new();
    for _ in 0..4 {
        others.push(Peer::connect_from(server.addr, ip(4)).await);
    }
    c.store("c.bin", &random_bytes(20_000, 3), 4096).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closes_a_connection_without_a_whole_first_request_at_the_handshake_deadline() {
    let data = tempfile::tempdir().unwrap();
    let mut cfg = config(data.path());
    cfg.handshake_timeout = Duration::from_secs(1);
    let server = TestServer::start(cfg).await;

    let mut silent = Peer::connect(server.addr).await;
    // Half a register request (23-byte header announcing 255 bytes).
    let mut slow = Peer::connect(server.addr).await;
    let mut header = vec![0u8; 16];
    header.extend_from_slice(&[3, 0x01, 0x04, 255, 0, 0, 0]);
    slow.send_raw(&header).await;

    let started = Instant::now();
    assert_eq!(silent.closed().await, vec![Response::GeneralError]);
    assert_eq!(slow.closed().await, vec![Response::GeneralError]);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "cut after {took:?}");
    for p in [&silent, &slow] {
        assert!(logged_for(p.local_addr(), "handshake deadline"));
    }

    // A connection whose first request came in time may then idle past
    // the deadline (the idle timeout applies).
    let mut c = Client::register(server.addr, "in-time", &alice_key(), Numbering::Modern).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    c.store("late.bin", &random_bytes(5_000, 4), 4096).await;
}
