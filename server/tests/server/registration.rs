//! Registration abuse (`docs/PROTOCOL.md` §6.1): the per-address rate
//! limit, and names held by clients that never completed their key
//! exchange, against the library server over real sockets.

use std::net::SocketAddr;
use std::time::Duration;

use protocol::crypto::public_key_field;
use protocol::{ClientId, Numbering, Request, RequestFrame, Response};
use server::storage::Storage;

use crate::harness::{alice_key, config, logs, user, Client, Peer, TestServer};

/// Sends a registration of `name` on `peer`; returns the answer.
async fn register(peer: &mut Peer, name: &str) -> Response {
    peer.send(RequestFrame {
        client_id: ClientId::default(),
        numbering: Numbering::Modern,
        request: Request::Register { name: user(name) },
    })
    .await;
    peer.recv().await
}

/// Registers `name` on a new connection; returns the answer and the
/// connection's address (the server's `peer`).
async fn register_once(addr: SocketAddr, name: &str) -> (Response, SocketAddr) {
    let mut peer = Peer::connect(addr).await;
    let answer = register(&mut peer, name).await;
    (answer, peer.local_addr())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_registrations_past_the_burst_with_1601_but_never_a_reconnect() {
    let data = tempfile::tempdir().unwrap();
    let mut cfg = config(data.path());
    // One a minute after a burst of three: nothing refills during the test.
    cfg.registrations_per_minute = 1;
    cfg.registration_burst = 3;
    let server = TestServer::start(cfg).await;

    let keeper = Client::register(server.addr, "keeper", &alice_key(), Numbering::Modern).await;
    for name in ["second", "third"] {
        let (answer, _) = register_once(server.addr, name).await;
        assert!(
            matches!(answer, Response::Registered { .. }),
            "{name}: {answer:?}"
        );
    }
    let mut refused = Vec::new();
    for i in 0..5 {
        let (answer, local) = register_once(server.addr, &format!("over-{i}")).await;
        assert_eq!(answer, Response::RegistrationFailed, "attempt {i}");
        refused.push(local);
    }
    // A refusal leaves the connection usable, and is the same for a name
    // that is free and one that is taken.
    let mut peer = Peer::connect(server.addr).await;
    assert_eq!(
        register(&mut peer, "keeper").await,
        Response::RegistrationFailed
    );
    assert_eq!(
        register(&mut peer, "free").await,
        Response::RegistrationFailed
    );

    // Reconnects take no token and are never refused.
    for round in 0..5 {
        let mut again = Client::reconnect(
            server.addr,
            keeper.id,
            "keeper",
            &alice_key(),
            Numbering::Modern,
        )
        .await
        .unwrap_or_else(|answer| panic!("reconnect {round}: {answer:?}"));
        again
            .store(&format!("file-{round}"), b"still served", 4096)
            .await;
    }

    // One log line for the flood, not one per attempt.
    let flood = |text: &str| {
        text.lines()
            .filter(|l| l.contains("over the rate limit"))
            .filter(|l| refused.iter().any(|a| l.contains(&format!("peer={a}"))))
            .count()
    };
    assert!(
        crate::harness::wait_for_log(|l| l.contains("over the rate limit"))
            .await
            .is_some(),
        "the first refusal is logged"
    );
    assert_eq!(flood(&logs()), 1, "{}", logs());

    server.stop().await.unwrap();
    let storage = Storage::open_local(data.path()).unwrap();
    let mut names: Vec<String> = storage
        .meta()
        .clients()
        .unwrap()
        .into_iter()
        .map(|c| c.client.name.to_string())
        .collect();
    names.sort();
    assert_eq!(names, ["keeper", "second", "third"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frees_a_name_whose_key_exchange_never_completed_after_the_grace_period() {
    let data = tempfile::tempdir().unwrap();
    let mut cfg = config(data.path());
    let grace = Duration::from_secs(1);
    cfg.registration_grace = grace;
    let server = TestServer::start(cfg).await;

    let prompt = Client::register(server.addr, "prompt", &alice_key(), Numbering::Modern).await;
    // Registers, then goes quiet before sending its public key (1026).
    let mut tardy = Peer::connect(server.addr).await;
    let stale_id = match register(&mut tardy, "tardy").await {
        Response::Registered { client_id } => client_id,
        other => panic!("{other:?}"),
    };

    // Within the grace period the name is taken.
    let (answer, _) = register_once(server.addr, "tardy").await;
    assert_eq!(answer, Response::RegistrationFailed);

    tokio::time::sleep(grace + Duration::from_millis(200)).await;

    // After it, a new client takes the name and completes.
    let fresh = Client::register(server.addr, "tardy", &alice_key(), Numbering::Modern).await;
    assert_ne!(fresh.id, stale_id);
    assert!(crate::harness::wait_for_log(|l| l
        .contains("registered in place of a client that never completed its registration")
        && l.contains(&stale_id.to_string()))
    .await
    .is_some());
    // A client that completed keeps its name for ever.
    let (answer, _) = register_once(server.addr, "prompt").await;
    assert_eq!(answer, Response::RegistrationFailed);
    let mut prompt = Client::reconnect(
        server.addr,
        prompt.id,
        "prompt",
        &alice_key(),
        Numbering::Modern,
    )
    .await
    .unwrap();
    prompt.store("kept", b"mine", 4096).await;

    // The stale client's key, arriving late, is refused: its row is gone.
    tardy
        .send(RequestFrame {
            client_id: stale_id,
            numbering: Numbering::Modern,
            request: Request::PublicKey {
                name: user("tardy"),
                key: public_key_field(&alice_key().public_key()).unwrap(),
            },
        })
        .await;
    assert_eq!(tardy.recv().await, Response::GeneralError);
    let old = Client::reconnect(
        server.addr,
        stale_id,
        "tardy",
        &alice_key(),
        Numbering::Modern,
    )
    .await;
    assert!(
        matches!(old, Err(Response::ReconnectRejected { .. })),
        "{:?}",
        old.err()
    );

    server.stop().await.unwrap();
    let storage = Storage::open_local(data.path()).unwrap();
    let clients = storage.meta().clients().unwrap();
    let tardy = clients
        .iter()
        .find(|c| c.client.name == user("tardy"))
        .unwrap();
    assert_eq!(tardy.client.id, fresh.id);
    assert!(tardy.client.completed_at.is_some());
    assert!(storage.meta().client(stale_id).unwrap().is_none());
}

/// The same two rules through the real binary and its flags.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_limits_registrations_and_frees_stale_names_as_configured() {
    let data = tempfile::tempdir().unwrap();
    let server = crate::harness::Binary::start(
        &data.path().join("data"),
        &[
            "--registrations-per-minute",
            "1",
            "--registration-burst",
            "3",
            "--registration-grace",
            "1",
        ],
    );
    let keeper = Client::register(server.addr, "keeper", &alice_key(), Numbering::Modern).await;
    drop(keeper);
    let (first, _) = register_once(server.addr, "stale").await;
    assert!(matches!(first, Response::Registered { .. }), "{first:?}");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // Never completed, and the grace is over: the name is free again.
    let (again, _) = register_once(server.addr, "stale").await;
    assert!(matches!(again, Response::Registered { .. }), "{again:?}");
    // The burst of three is spent.
    let (over, _) = register_once(server.addr, "one-too-many").await;
    assert_eq!(over, Response::RegistrationFailed);
    assert!(server.logged("over the rate limit"));
}
