//! SIGKILL at random points during 100 uploads, with a restart after each
//! kill. Afterwards every committed version matches its recorded size,
//! cksum and SHA-256, every acknowledged upload is there (no byte lost),
//! and nothing the clients never confirmed is visible.
//!
//! By default the kills come every 100-700 ms (a handful per run);
//! `BACKUP_LONG_TESTS=1` runs 400 uploads with a kill every 20-300 ms.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use protocol::{ClientCodec, ClientId, Numbering, Request, RequestFrame, Response};
use rand::{Rng, SeedableRng};
use server::storage::Storage;
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

use crate::harness::{
    admin_command, alice_key, assert_metadata_matches_disk, assert_only_database_and_blobs, file,
    long_tests, packets, random_bytes, temp_files, user, Binary, Client, Peer,
};

const WORKERS: usize = 4;
/// Bound on one network step of a worker; the server is killed under it.
const OP: Duration = Duration::from_secs(10);

/// What the clients did, for the checks after the last restart.
#[derive(Default)]
struct Ledger {
    /// SHA-256 of every content for which "cksum OK" was sent: it may be
    /// committed (the 1604 may have been lost to a kill).
    confirmed: HashSet<[u8; 32]>,
    /// Uploads answered 1604: (client, name, SHA-256, cksum, size). Each
    /// must be stored.
    acked: Vec<(ClientId, String, [u8; 32], u32, u64)>,
    /// Contents sent but never confirmed (cut by a kill, or abandoned on
    /// purpose after 1603): none may be visible.
    unconfirmed: HashSet<[u8; 32]>,
    /// Attempts cut by a kill.
    interrupted: usize,
}

/// A stored version by client, name and SHA-256.
type RowKey = (ClientId, Vec<u8>, [u8; 32]);

fn sha(content: &[u8]) -> [u8; 32] {
    Sha256::digest(content).into()
}

async fn step<T>(fut: impl std::future::Future<Output = T>) -> Option<T> {
    tokio::time::timeout(OP, fut).await.ok()
}

/// Reconnects as `id`, retrying while the server restarts.
async fn reconnect(addr: &Mutex<SocketAddr>, id: ClientId, name: &str) -> Client {
    for _ in 0..1200 {
        let at = *addr.lock().unwrap();
        if let Some(c) = try_reconnect(at, id, name).await {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{name}: no reconnect within 30 s");
}

async fn try_reconnect(addr: SocketAddr, id: ClientId, name: &str) -> Option<Client> {
    let stream = step(TcpStream::connect(addr)).await?.ok()?;
    let mut framed = Framed::new(stream, ClientCodec::default());
    let request = RequestFrame {
        client_id: id,
        numbering: Numbering::Modern,
        request: Request::Reconnect { name: user(name) },
    };
    step(framed.send(request)).await?.ok()?;
    let Response::Reconnected { wrapped_key, .. } = step(framed.next()).await??.ok()? else {
        return None;
    };
    let key = alice_key();
    let aes = key
        .unwrap_aes_key(&mut rand::thread_rng(), &wrapped_key)
        .ok()?;
    Some(Client {
        peer: Peer { framed },
        id,
        name: user(name),
        key,
        aes,
        numbering: Numbering::Modern,
    })
}

/// How far one attempt got.
enum Attempt {
    Acked,
    /// 1603 received and then abandoned on purpose.
    Abandoned,
    /// Cut by a kill (after "cksum OK" was sent if `confirmed`).
    Cut,
}

async fn attempt(
    c: &mut Client,
    name: &str,
    content: &[u8],
    abandon: bool,
    ledger: &Mutex<Ledger>,
) -> Attempt {
    let digest = sha(content);
    let f = file(name);
    for p in packets(c.id, c.numbering, &c.aes, &f, content, 64 * 1024) {
        if !matches!(step(c.peer.framed.send(p)).await, Some(Ok(()))) {
            ledger.lock().unwrap().unconfirmed.insert(digest);
            return Attempt::Cut;
        }
    }
    let received = step(c.peer.framed.next()).await.flatten();
    if !matches!(received, Some(Ok(Response::FileReceived { .. }))) {
        ledger.lock().unwrap().unconfirmed.insert(digest);
        return Attempt::Cut;
    }
    if abandon {
        ledger.lock().unwrap().unconfirmed.insert(digest);
        return Attempt::Abandoned;
    }
    ledger.lock().unwrap().confirmed.insert(digest);
    let verdict = c.frame(Request::CrcOk { file: f });
    if !matches!(step(c.peer.framed.send(verdict)).await, Some(Ok(()))) {
        return Attempt::Cut;
    }
    match step(c.peer.framed.next()).await.flatten() {
        Some(Ok(Response::Ack { .. })) => Attempt::Acked,
        _ => Attempt::Cut,
    }
}

/// One client's share of the uploads: `jobs` uploads over five names, every
/// seventh abandoned after its 1603. A cut attempt is retried, with new
/// content, on a new connection.
async fn worker(
    w: usize,
    jobs: usize,
    addr: Arc<Mutex<SocketAddr>>,
    mut c: Client,
    ledger: Arc<Mutex<Ledger>>,
) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(w as u64);
    let mut seed = (w as u64) << 32;
    let name = String::from_utf8_lossy(c.name.as_bytes()).into_owned();
    for job in 0..jobs {
        let file_name = format!("file-{}.bin", job % 5);
        let abandon = job % 7 == 6;
        loop {
            seed += 1;
            // A third are small files, which the server keeps in its
            // database; the rest go to blob files.
            let size = if job % 3 == 0 {
                rng.gen_range(0..=server::storage::INLINE_MAX as usize)
            } else {
                rng.gen_range(0..1_500_000)
            };
            let content = random_bytes(size, seed);
            match attempt(&mut c, &file_name, &content, abandon, &ledger).await {
                Attempt::Acked => {
                    ledger.lock().unwrap().acked.push((
                        c.id,
                        file_name.clone(),
                        sha(&content),
                        protocol::Cksum::of(&content),
                        content.len() as u64,
                    ));
                    break;
                }
                Attempt::Abandoned => {
                    c = reconnect(&addr, c.id, &name).await;
                    break;
                }
                Attempt::Cut => {
                    ledger.lock().unwrap().interrupted += 1;
                    c = reconnect(&addr, c.id, &name).await;
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keeps_every_committed_upload_through_random_sigkills() {
    let (uploads, kill_ms) = if long_tests() {
        (400, 20..300)
    } else {
        (100, 100..700)
    };
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    let server = Binary::start(&data, &[]);
    let addr = Arc::new(Mutex::new(server.addr));
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let mut clients = Vec::new();
    for w in 0..WORKERS {
        let c = Client::register(
            server.addr,
            &format!("crash-{w}"),
            &alice_key(),
            Numbering::Modern,
        )
        .await;
        clients.push(c);
    }
    let ids: Vec<(ClientId, String)> = clients
        .iter()
        .map(|c| {
            (
                c.id,
                String::from_utf8_lossy(c.name.as_bytes()).into_owned(),
            )
        })
        .collect();
    let done = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for (w, c) in clients.into_iter().enumerate() {
        let (addr, ledger, done) = (Arc::clone(&addr), Arc::clone(&ledger), Arc::clone(&done));
        tasks.push(tokio::spawn(async move {
            worker(w, uploads / WORKERS, addr, c, ledger).await;
            done.fetch_add(1, Ordering::SeqCst);
        }));
    }

    // The killer: SIGKILL after a random delay, restart, repeat until the
    // uploads are done.
    let killer = {
        let (addr, done, data) = (Arc::clone(&addr), Arc::clone(&done), data.clone());
        tokio::task::spawn_blocking(move || {
            let mut rng = rand::rngs::StdRng::seed_from_u64(42);
            let mut server = server;
            let mut kills = 0;
            let mut temporaries_seen = 0;
            for _ in 0..10_000 {
                let wait = rng.gen_range(kill_ms.clone());
                for _ in 0..wait / 10 {
                    if done.load(Ordering::SeqCst) == WORKERS {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                if done.load(Ordering::SeqCst) == WORKERS {
                    break;
                }
                server.kill_hard();
                kills += 1;
                temporaries_seen += temp_files(&data).len();
                server = Binary::start(&data, &[]);
                *addr.lock().unwrap() = server.addr;
            }
            (server, kills, temporaries_seen)
        })
    };
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(300), t)
            .await
            .expect("the uploads did not finish")
            .unwrap();
    }
    let (mut server, kills, temporaries_seen) = killer.await.unwrap();

    // One last kill with nothing in flight, then a restart that must
    // recover to a clean state.
    server.kill_hard();
    let mut server = Binary::start(&data, &[]);
    let (id, name) = &ids[0];
    let probe = try_reconnect(server.addr, *id, name).await;
    assert!(probe.is_some(), "the restarted server serves");
    drop(probe);
    let status = server.terminate();
    assert!(status.success(), "{status:?}");

    let ledger = ledger.lock().unwrap();
    assert!(temp_files(&data).is_empty(), "recovery removed temporaries");
    assert_only_database_and_blobs(&data);
    // Every row's blob has the recorded size, cksum and SHA-256.
    assert_metadata_matches_disk(&data);
    let storage = Storage::open_local(&data).unwrap();
    let rows = storage.meta().all_versions().unwrap();
    let by_key: HashMap<RowKey, (u32, u64)> = rows
        .iter()
        .map(|r| {
            (
                (r.client, r.file.as_bytes().to_vec(), r.sha256),
                (r.cksum, r.size),
            )
        })
        .collect();
    // Nothing lost: every acknowledged upload is stored as acknowledged.
    let mut lost_bytes = 0u64;
    for (client, name, digest, cksum, size) in &ledger.acked {
        match by_key.get(&(*client, name.as_bytes().to_vec(), *digest)) {
            Some(&(c, s)) => {
                assert_eq!((c, s), (*cksum, *size), "{name}: recorded cksum and size")
            }
            None => lost_bytes += size,
        }
    }
    assert_eq!(lost_bytes, 0, "acknowledged bytes missing after the kills");
    // Nothing uncommitted visible: every row is content the client
    // confirmed, none is content it never confirmed.
    for r in &rows {
        assert!(
            ledger.confirmed.contains(&r.sha256),
            "version {} holds content no client confirmed",
            r.version
        );
        assert!(!ledger.unconfirmed.contains(&r.sha256));
    }
    let (code, out, err) = admin_command("scrub", &data, &[]);
    assert_eq!(code, 0, "scrub after the kills:\n{out}\n{err}");
    eprintln!(
        "{} uploads acknowledged ({} bytes), {} versions stored, {kills} SIGKILLs \
         ({temporaries_seen} temporaries left by them), {} attempts cut, {} never \
         confirmed, 0 bytes lost",
        ledger.acked.len(),
        ledger.acked.iter().map(|a| a.4).sum::<u64>(),
        rows.len(),
        ledger.interrupted,
        ledger.unconfirmed.len()
    );
    let per_worker = (0..uploads / WORKERS).filter(|j| j % 7 != 6).count();
    assert_eq!(
        ledger.acked.len(),
        per_worker * WORKERS,
        "every upload finished"
    );
    assert!(kills >= 1, "no kill landed during the uploads");
}
