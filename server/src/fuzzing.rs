//! The harness of the live-server fuzz target (`fuzz/fuzz_targets/live_server.rs`),
//! built only with the `fuzzing` feature.
//!
//! Each input is served by the real connection handler, session, storage
//! and upload writer threads, with the connection's bytes coming from
//! memory instead of a socket. The first byte picks how:
//!
//! - `% 5 == 0`: the rest as a legacy (version 3) byte stream;
//! - `% 5 == 1`: a legacy stream that first reconnects as a registered
//!   client and proves its key (`docs/PROTOCOL.md` §11.5; the proof is
//!   computed from the 1605 the server sends), so that uploads, verdicts
//!   and retrieval requests reach storage, then the rest;
//! - `% 5 == 2`: the rest as a secure-mode (version 4) stream, past a TLS
//!   handshake that is not part of the input;
//! - `% 5 == 3`: as 1 without the proof: uploads reach storage, retrieval
//!   requests are refused (1651);
//! - `% 5 == 4`: a secure-mode stream that first reconnects as the same
//!   client, unwraps the session secret from the 1605 and proves it for the
//!   connection's channel binding (§12), so that the repository requests
//!   1260-1268 (§13) in the rest reach storage.
//!
//! After each input, with every writer thread finished: no panic, nothing in
//! the data directory but the database, blobs under `clients/<hex>/blobs/`
//! and the server identity, no temporary left behind (an unfinished pack
//! included), nothing beside the data directory, every version row has its
//! blob with the recorded size, and so has every recorded pack. Memory is
//! bounded by libFuzzer's `-rss_limit_mb` and `-malloc_limit_mb`.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use bytes::BytesMut;
use protocol::crypto::{public_key_field, PrivateKey};
use protocol::secure::{legacy_retrieval_proof, Binding, SessionSecret};
use protocol::{
    ClientCodec, ClientId, Dialect, Limits, Numbering, Request, RequestFrame, Response, UserName,
};
use rand::SeedableRng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::codec::Decoder;
use tokio_util::sync::CancellationToken;

use crate::admission::{Admission, AdmissionLimits};
use crate::config::Config;
use crate::connection::{self, Security, Shared};
use crate::storage::Storage;

/// The TLS channel binding of the harness's secure connections; the
/// handshake is not part of the input.
const BINDING: Binding = [7; 32];

/// Which proof the harness sends after its reconnect.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Prove {
    None,
    /// The legacy retrieval proof (§11.5).
    Legacy,
    /// The secure-mode proof of the session secret (§12).
    Secure,
}

struct Harness {
    runtime: tokio::runtime::Runtime,
    root: PathBuf,
    data: PathBuf,
    shared: Arc<Shared>,
    /// The keyed client that modes 1 and 3 reconnect as, and its key.
    client: (ClientId, UserName),
    key: PrivateKey,
    _alive: mpsc::Receiver<()>,
}

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let root = std::env::temp_dir().join(format!("backup-live-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let data = root.join("data");
        std::fs::create_dir_all(&data).unwrap();
        let storage = Storage::open_local(&data).unwrap();
        // One legacy client with a key, registered as a legacy server would.
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let key = PrivateKey::generate_legacy(&mut rng).unwrap();
        let name = UserName::try_from("fuzz").unwrap();
        let id = ClientId([0x42; 16]);
        storage
            .meta()
            .register(id, &name, SystemTime::now())
            .unwrap();
        storage
            .meta()
            .set_public_key(
                id,
                &public_key_field(&key.public_key()).unwrap(),
                SystemTime::now(),
            )
            .unwrap();
        let mut config = Config::new(&data);
        // Short deadlines: an input that stalls ends quickly.
        config.idle_timeout = Duration::from_millis(200);
        config.request_timeout = Duration::from_millis(200);
        // Every input comes from one address: a limit would leave the
        // registration path unexplored after the first few inputs.
        config.registrations_per_minute = u32::MAX;
        config.registration_burst = u32::MAX;
        let (alive, receiver) = mpsc::channel(1);
        let shared = Arc::new(Shared {
            registrations: connection::RegisterLimiter::from_config(&config),
            config,
            storage,
            shutdown: CancellationToken::new(),
            alive,
            metrics: Arc::new(crate::metrics::Metrics::new(None)),
        });
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        Harness {
            runtime,
            root,
            data,
            shared,
            client: (id, name),
            key,
            _alive: receiver,
        }
    })
}

/// Serves `data` as one connection and checks the invariants.
pub fn live_server(data: &[u8]) {
    serve_input(data);
}

/// As [`live_server`], returning what the server wrote.
fn serve_input(data: &[u8]) -> Vec<u8> {
    // One input at a time: the harness (its data directory, its checks) is
    // shared, and a check run while another input is being served would
    // see that input's temporaries. Tests run in parallel threads.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _alone = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let h = harness();
    let Some((&mode, rest)) = data.split_first() else {
        return Vec::new();
    };
    let peer: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let mut first = BytesMut::new();
    let (security, prove) = match mode % 5 {
        0 => (Security::Legacy, Prove::None),
        2 => (Security::Secure(BINDING), Prove::None),
        m => {
            let (id, name) = &h.client;
            let (security, prove) = match m {
                1 => (Security::Legacy, Prove::Legacy),
                3 => (Security::Legacy, Prove::None),
                _ => (Security::Secure(BINDING), Prove::Secure),
            };
            let dialect = match security {
                Security::Legacy => Dialect::Legacy,
                Security::Secure(_) => Dialect::Secure,
            };
            RequestFrame {
                client_id: *id,
                numbering: Numbering::Modern,
                request: Request::Reconnect { name: name.clone() },
            }
            .encode_in(dialect, &mut first);
            (security, prove)
        }
    };
    let shared = Arc::clone(&h.shared);
    let mut output = Vec::new();
    h.runtime.block_on(async {
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let (read, write) = tokio::io::split(theirs);
        let admission = Admission::new(AdmissionLimits {
            max_connections: 1,
            max_per_source: 1,
            max_unauthenticated: 1,
        });
        let admitted = admission
            .admit(peer.ip(), &mut rand::rngs::OsRng)
            .expect("the only connection is admitted");
        let first_by = tokio::time::Instant::now() + shared.config.handshake_timeout;
        let server = tokio::spawn(connection::serve(
            read,
            write,
            peer,
            shared,
            security,
            admitted.ticket,
            first_by,
        ));
        let (mut from_server, mut to_server) = tokio::io::split(ours);
        let _ = to_server.write_all(&first).await;
        if prove != Prove::None {
            if let Some(proof) =
                proof_after_reconnect(h, prove, &mut from_server, &mut output).await
            {
                let _ = to_server.write_all(&proof).await;
            }
        }
        // The rest of the input, while the answers are read: neither side
        // may wait for the other with a full buffer.
        let send = async {
            let _ = to_server.write_all(rest).await;
            let _ = to_server.shutdown().await;
        };
        let receive = async {
            let _ = from_server.read_to_end(&mut output).await;
        };
        tokio::join!(send, receive);
        server.await.unwrap();
        // Writer threads remove or publish their files on their own time:
        // wait for every one of them before looking at the directory.
        let mut waited = Duration::ZERO;
        while h.shared.alive.strong_count() > 1 {
            assert!(
                waited < Duration::from_secs(10),
                "an upload writer did not finish"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
            waited += Duration::from_millis(1);
        }
    });
    check(h);
    output
}

/// Reads the answer to the reconnect (kept in `output`) and returns the
/// encoded proof of the harness client's key for this connection, or `None`
/// when the answer is not a 1605 with a key that unwraps.
async fn proof_after_reconnect(
    h: &Harness,
    prove: Prove,
    from_server: &mut (impl tokio::io::AsyncRead + Unpin),
    output: &mut Vec<u8>,
) -> Option<BytesMut> {
    let dialect = match prove {
        Prove::Secure => Dialect::Secure,
        _ => Dialect::Legacy,
    };
    let mut codec = ClientCodec::with_dialect(Limits::default(), dialect);
    let mut buf = BytesMut::new();
    let response = loop {
        if let Ok(Some(response)) = codec.decode(&mut buf) {
            break response;
        }
        let mut chunk = [0u8; 4096];
        let n = from_server.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        output.extend_from_slice(&chunk[..n]);
        buf.extend_from_slice(&chunk[..n]);
    };
    let Response::Reconnected {
        client_id,
        wrapped_key,
    } = response
    else {
        return None;
    };
    let mut blinding = rand::rngs::StdRng::seed_from_u64(0);
    let proof = match prove {
        Prove::Secure => SessionSecret::unwrap(&h.key, &mut blinding, &wrapped_key)
            .ok()?
            .proof(client_id, &BINDING),
        _ => {
            let key = h.key.unwrap_aes_key(&mut blinding, &wrapped_key).ok()?;
            legacy_retrieval_proof(&key, client_id)
        }
    };
    let mut out = BytesMut::new();
    RequestFrame {
        client_id,
        numbering: Numbering::Modern,
        request: Request::Prove { proof },
    }
    .encode_in(dialect, &mut out);
    Some(out)
}

fn check(h: &Harness) {
    // Nothing beside the data directory.
    for entry in std::fs::read_dir(&h.root).unwrap() {
        let path = entry.unwrap().path();
        assert_eq!(path, h.data, "a file appeared beside the data directory");
    }
    // Nothing in it but what the server's layout allows, and no temporary.
    for path in files_under(&h.data) {
        let parts: Vec<String> = path
            .iter()
            .map(|c| c.to_string_lossy().into_owned())
            .collect();
        let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
        let ok = match parts.as_slice() {
            [db] => db.starts_with("backup.db"),
            ["identity", _] => true,
            ["clients", c, "blobs", b] => is_hex32(c) && is_hex32(b),
            _ => false,
        };
        assert!(
            ok,
            "unexpected file in the data directory: {}",
            path.display()
        );
    }
    // Every version row has its content (a blob file, or a small file's
    // row in the database), of the recorded size; no content in the
    // database without its row.
    let rows = h.shared.storage.meta().all_versions().unwrap();
    let keys: std::collections::HashSet<&str> = rows.iter().map(|v| v.blob.0.as_str()).collect();
    for (key, _) in h.shared.storage.meta().inline_blobs().unwrap() {
        assert!(keys.contains(key.0.as_str()), "content {key} has no row");
    }
    for v in &rows {
        let mut blob = h
            .shared
            .storage
            .open_blob(&v.blob)
            .unwrap_or_else(|e| panic!("version {} has no blob: {e}", v.version));
        let len = std::io::copy(&mut blob, &mut std::io::sink()).unwrap();
        assert_eq!(
            len, v.size,
            "blob of version {} has the wrong size",
            v.version
        );
    }
    // Every recorded pack has its blob, of the recorded size.
    let repo = h.shared.storage.repo().unwrap();
    let mut after = None;
    loop {
        let packs = repo.recorded_packs(after.as_ref(), 256).unwrap();
        for (key, size) in &packs {
            let mut blob = h
                .shared
                .storage
                .open_blob(key)
                .unwrap_or_else(|e| panic!("pack {key} has no blob: {e}"));
            let len = std::io::copy(&mut blob, &mut std::io::sink()).unwrap();
            assert_eq!(len, *size, "pack {key} has the wrong size");
        }
        match packs.last() {
            Some((key, _)) => after = Some(key.clone()),
            None => break,
        }
    }
}

fn files_under(root: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut todo = vec![root.to_owned()];
    while let Some(dir) = todo.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                todo.push(path);
            } else {
                found.push(path.strip_prefix(root).unwrap().to_owned());
            }
        }
    }
    found
}

fn is_hex32(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_seeds_run_clean_through_the_harness() {
        let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/live_server");
        let mut count = 0;
        for entry in std::fs::read_dir(&seeds).unwrap() {
            live_server(&std::fs::read(entry.unwrap().path()).unwrap());
            count += 1;
        }
        assert!(count > 0, "no seeds in {}", seeds.display());
    }

    #[test]
    fn serves_every_mode_and_keeps_the_invariants() {
        for first in 0u8..5 {
            live_server(&[first]);
            live_server(&[first, 1, 2, 3]);
            let mut garbage = vec![first];
            garbage.extend(std::iter::repeat_n(0xffu8, 600));
            live_server(&garbage);
        }
        // A keyed session sending a packet of random ciphertext, a verdict
        // and a list: storage is reached, the invariants still hold.
        let (id, _) = harness().client.clone();
        let mut input = BytesMut::new();
        let file = protocol::FileName::try_from("f").unwrap();
        RequestFrame {
            client_id: id,
            numbering: Numbering::Modern,
            request: Request::SendFile(protocol::FilePacket {
                head: protocol::PacketHead {
                    content_size: 16,
                    orig_size: 3,
                    packet: 1,
                    total: 1,
                    file: file.clone(),
                },
                content: bytes::Bytes::from_static(&[9; 16]),
            }),
        }
        .encode(&mut input);
        RequestFrame {
            client_id: id,
            numbering: Numbering::Modern,
            request: Request::CrcOk { file },
        }
        .encode(&mut input);
        RequestFrame {
            client_id: id,
            numbering: Numbering::Modern,
            request: Request::Retrieval(protocol::retrieval::RetrievalRequest::List {
                flags: protocol::retrieval::ListFlags::ALL_VERSIONS,
                cursor: 0,
            }),
        }
        .encode(&mut input);
        let codes_of = |mode: u8| {
            let mut with_mode = BytesMut::from(&[mode][..]);
            with_mode.extend_from_slice(&input);
            let output = serve_input(&with_mode);
            let mut codec = protocol::ClientCodec::default();
            let mut buf = BytesMut::from(&output[..]);
            let mut codes = Vec::new();
            while let Ok(Some(r)) = codec.decode(&mut buf) {
                codes.push(r.code().0);
            }
            codes
        };
        // Mode 1: the reconnect keyed the session, the proof was accepted,
        // the upload reached storage (1603, then 1607 since random
        // ciphertext has bad padding, or 1604) and so did the list (1640).
        let codes = codes_of(1);
        assert_eq!(codes.get(..3), Some(&[1605, 1650, 1603][..]), "{codes:?}");
        assert_eq!(codes.last(), Some(&1640), "{codes:?}");
        // Mode 3: the same without the proof; the list is refused.
        let codes = codes_of(3);
        assert_eq!(codes.get(..2), Some(&[1605, 1603][..]), "{codes:?}");
        assert_eq!(codes.last(), Some(&1651), "{codes:?}");
    }

    /// The repository requests of `repo_requests`, encoded for mode 4.
    fn repo_input() -> BytesMut {
        use protocol::repo::message::{ObjectId, PackEntry, RepoRequest};
        let (id, _) = harness().client.clone();
        let a = ObjectId([0xa1; 32]);
        let b = ObjectId([0xb2; 32]);
        let content = bytes::Bytes::from(vec![5u8; 100]);
        let requests = [
            RepoRequest::Have { ids: vec![a] },
            // Slot 1 holds only passphrase envelopes (§13.6); 2 takes any.
            RepoRequest::PutKey {
                slot: 2,
                envelope: bytes::Bytes::from_static(b"envelope"),
            },
            RepoRequest::GetKeys,
            RepoRequest::PackData { content },
            RepoRequest::PackEnd {
                entries: vec![PackEntry { id: a, len: 100 }],
            },
            RepoRequest::SnapshotRefs { ids: vec![a] },
            RepoRequest::SnapshotCommit {
                time: 1,
                meta: bytes::Bytes::from_static(b"meta"),
            },
            RepoRequest::Snapshots { cursor: 0 },
            RepoRequest::Fetch { ids: vec![a, b] },
            RepoRequest::Forget { ids: vec![1, 2] },
        ];
        let mut input = BytesMut::from(&[4u8][..]);
        for request in requests {
            RequestFrame {
                client_id: id,
                numbering: Numbering::Modern,
                request: Request::Repo(request),
            }
            .encode_in(Dialect::Secure, &mut input);
        }
        input
    }

    #[test]
    fn a_proven_secure_session_reaches_repository_storage() {
        let output = serve_input(&repo_input());
        let mut codec = ClientCodec::with_dialect(Limits::default(), Dialect::Secure);
        let mut buf = BytesMut::from(&output[..]);
        let mut codes = Vec::new();
        while let Ok(Some(r)) = codec.decode(&mut buf) {
            codes.push(r.code().0);
        }
        // Reconnected, proven, then each request answered by storage; the
        // fetch streams the object it holds and misses the other.
        assert_eq!(
            codes,
            [1605, 1650, 1660, 1670, 1669, 1661, 1662, 1663, 1665, 1666, 1668, 1667, 1680],
            "{codes:?}"
        );
    }

    /// Writes the hand-made seeds of mode 4 (run with `--ignored` after a
    /// change to the encoding; the files are committed).
    #[test]
    #[ignore = "writes fuzz/seeds/live_server"]
    fn write_repository_seeds() {
        let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/live_server");
        std::fs::write(seeds.join("4-repository-requests"), repo_input()).unwrap();
        std::fs::write(seeds.join("4-proof-only"), [4u8]).unwrap();
    }
}
