//! Many clients at once.

use std::time::{Duration, Instant};

use protocol::Numbering;

use crate::harness::{
    alice_key, assert_metadata_matches_disk, config, file, random_bytes, stored, Client, TestServer,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_100_clients_uploading_at_once() {
    const CLIENTS: usize = 100;
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(config(data.path())).await;
    let addr = server.addr;
    let key = alice_key();
    let started = Instant::now();
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(CLIENTS));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..CLIENTS {
        let key = key.clone();
        let barrier = barrier.clone();
        tasks.spawn(async move {
            let numbering = if i % 2 == 0 {
                Numbering::Modern
            } else {
                Numbering::Classic
            };
            let mut c = Client::register(addr, &format!("client-{i:03}"), &key, numbering).await;
            let content = random_bytes(20_000 + i * 1_500, i as u64);
            // Every client is connected and keyed before any uploads.
            barrier.wait().await;
            c.store("same-name.bin", &content, 8192).await;
            (c.id, content)
        });
    }
    let mut results = Vec::new();
    let all = tokio::time::timeout(Duration::from_secs(90), async {
        while let Some(r) = tasks.join_next().await {
            results.push(r.unwrap());
        }
    })
    .await;
    assert!(
        all.is_ok(),
        "only {} of {CLIENTS} clients finished in time",
        results.len()
    );
    let elapsed = started.elapsed();
    server.stop().await.unwrap();
    assert_eq!(results.len(), CLIENTS);
    for (id, content) in &results {
        assert_eq!(
            stored(data.path(), *id, &file("same-name.bin")).as_ref(),
            Some(content)
        );
    }
    assert_metadata_matches_disk(data.path());
    eprintln!("{CLIENTS} clients in {elapsed:?}");
}
