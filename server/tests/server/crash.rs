//! SIGKILL in the middle of uploads and commits: after a restart nothing
//! partial is visible, no temporary lingers, and the metadata matches the
//! disk.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use protocol::{ClientId, Numbering, Request, Response};

use crate::harness::{
    alice_key, assert_metadata_matches_disk, assert_only_database_and_blobs, file, packets,
    random_bytes, stored, temp_files, Binary, Client,
};

fn looped_content(client: usize, version: u64) -> Vec<u8> {
    format!("client {client} version {version};")
        .repeat(1500)
        .into_bytes()
}

/// Commits version 1, 2, 3... of one file until the connection breaks,
/// recording the last version acknowledged with 1604. Never panics: the
/// server is killed under it.
async fn commit_forever(
    addr: std::net::SocketAddr,
    i: usize,
    acked: Arc<AtomicU64>,
) -> Option<ClientId> {
    let mut c = Client::register(
        addr,
        &format!("looper-{i}"),
        &alice_key(),
        Numbering::Classic,
    )
    .await;
    let id = c.id;
    let name = file("loop.bin");
    for version in 1.. {
        let content = looped_content(i, version);
        for p in packets(c.id, c.numbering, &c.aes, &name, &content, 4096) {
            if futures::SinkExt::send(&mut c.peer.framed, p).await.is_err() {
                return Some(id);
            }
        }
        if !matches!(
            futures::StreamExt::next(&mut c.peer.framed).await,
            Some(Ok(Response::FileReceived { .. }))
        ) {
            return Some(id);
        }
        let verdict = c.frame(Request::CrcOk { file: name.clone() });
        if futures::SinkExt::send(&mut c.peer.framed, verdict)
            .await
            .is_err()
        {
            return Some(id);
        }
        if !matches!(
            futures::StreamExt::next(&mut c.peer.framed).await,
            Some(Ok(Response::Ack { .. }))
        ) {
            return Some(id);
        }
        acked.store(version, Ordering::SeqCst);
    }
    Some(id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovers_consistently_after_sigkill_mid_upload() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    let mut first = Binary::start(&data, &[]);
    let addr = first.addr;

    // Alpha: version 1 committed, version 2 half sent.
    let mut alpha = Client::register(addr, "alpha", &alice_key(), Numbering::Modern).await;
    let v1 = random_bytes(20_000, 1);
    alpha.store("doc.bin", &v1, 4096).await;
    let v2 = packets(
        alpha.id,
        alpha.numbering,
        &alpha.aes,
        &file("doc.bin"),
        &random_bytes(2_000_000, 2),
        65_536,
    );
    for p in &v2[..v2.len() / 2] {
        alpha.peer.send(p.clone()).await;
    }
    // Beta: a whole file received (1603) but never confirmed.
    let mut beta = Client::register(addr, "beta", &alice_key(), Numbering::Classic).await;
    assert!(matches!(
        beta.send_file(&file("b.bin"), &random_bytes(300_000, 3), 8192)
            .await,
        Response::FileReceived { .. }
    ));
    // Loopers: commit after commit, so the kill lands amid them.
    let mut loopers = Vec::new();
    for i in 0..4 {
        let acked = Arc::new(AtomicU64::new(0));
        loopers.push((
            i,
            Arc::clone(&acked),
            tokio::spawn(commit_forever(addr, i, acked)),
        ));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while loopers.iter().any(|(_, a, _)| a.load(Ordering::SeqCst) < 3)
        || temp_files(&data).len() < 2
    {
        assert!(Instant::now() < deadline, "the scenario never got going");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    first.kill_hard();
    assert!(
        temp_files(&data).len() >= 2,
        "the kill left temporaries, as a crash would"
    );
    let mut outcomes = Vec::new();
    for (i, acked, task) in loopers {
        let id = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        outcomes.push((i, id, acked.load(Ordering::SeqCst)));
    }

    let mut second = Binary::start(&data, &[]);
    // A reconnect answered means recovery has run (it precedes serving).
    let again = Client::reconnect(
        second.addr,
        alpha.id,
        "alpha",
        &alice_key(),
        Numbering::Modern,
    )
    .await;
    assert!(again.is_ok(), "alpha survives the restart");
    assert!(
        temp_files(&data).is_empty(),
        "recovery removed the temporaries"
    );
    assert_only_database_and_blobs(&data);
    assert_metadata_matches_disk(&data);
    assert_eq!(
        stored(&data, alpha.id, &file("doc.bin")).unwrap(),
        v1,
        "the partial upload left version 1 intact"
    );
    assert_eq!(
        stored(&data, beta.id, &file("b.bin")),
        None,
        "an unconfirmed upload is not visible"
    );
    for (i, id, acked) in outcomes {
        let latest = stored(&data, id, &file("loop.bin")).unwrap();
        assert!(
            latest == looped_content(i, acked) || latest == looped_content(i, acked + 1),
            "looper {i}: latest is neither the acknowledged version {acked} nor the one in flight"
        );
    }
    assert!(second.logged("recovered from an unclean stop"));

    // SIGTERM stops the binary cleanly.
    drop(again);
    let status = second.terminate();
    assert!(status.success(), "exit status {status:?}");
    assert!(second.logged("stopped"));
}
