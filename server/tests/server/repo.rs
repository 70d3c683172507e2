//! The repository extension end to end (`docs/PROTOCOL.md` §13): a client
//! over TLS that reconnects and proves its key (§12.4), then uploads packs,
//! asks which objects the server holds, fetches them, commits and lists
//! snapshots and keeps key envelopes, against the real server.
//!
//! The clients are put into the database before the server starts (bound
//! to the recorded 1024-bit test keys, so that no test generates the
//! 3072-bit key a secure registration needs); the server never looks
//! inside objects, so arbitrary bytes of a sealed object's length stand in
//! for sealed ones.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use protocol::crypto::{public_key_der, PrivateKey};
use protocol::limits::Limits;
use protocol::repo::message::{CommitRefusal, ForgetRefusal, KeySlot, SnapshotEntry};
use protocol::repo::seal::OVERHEAD;
use protocol::repo::{ObjectId, PackEntry, RepoRequest, RepoResponse};
use protocol::secure::{Binding, SessionSecret, ALPN, BINDING_LEN, EXPORTER_LABEL};
use protocol::{
    ClientCodec, ClientId, Dialect, Numbering, Request, RequestFrame, Response, UserName,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use server::storage::Storage;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_util::codec::Framed;

use crate::harness::{
    alice_key, config, files_under, me_info, random_bytes, temp_files, user, TestServer, STEP,
};

const A: ClientId = ClientId([0xa1; 16]);
const B: ClientId = ClientId([0xb2; 16]);

/// Accepts the test server's self-signed certificate (what pinning checks
/// is the client's business; these tests are about the repository).
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Puts clients A (Alice's key) and B (Carol's key) into a new database.
fn prepare(data: &Path) {
    let storage = Storage::open_local(data).unwrap();
    for (id, name, key) in [(A, "repo-a", alice_key()), (B, "repo-b", carol_key())] {
        let der = public_key_der(&key.public_key()).unwrap();
        storage
            .meta()
            .register_with_key(id, &user(name), &der, SystemTime::now())
            .unwrap();
    }
}

fn carol_key() -> PrivateKey {
    me_info("carol").key
}

async fn start(data: &Path) -> TestServer {
    TestServer::start_both(config(data)).await
}

/// A proved secure-mode connection of one client.
struct RepoClient {
    framed: Framed<TlsStream<TcpStream>, ClientCodec>,
    id: ClientId,
}

impl RepoClient {
    /// Connects over TLS, reconnects as `id` and proves its key.
    async fn connect(addr: SocketAddr, id: ClientId) -> Self {
        let (name, key) = if id == A {
            ("repo-a", alice_key())
        } else {
            ("repo-b", carol_key())
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth();
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
        let tcp = tokio::time::timeout(STEP, TcpStream::connect(addr))
            .await
            .unwrap()
            .unwrap();
        let stream = tokio::time::timeout(
            STEP,
            connector.connect(ServerName::try_from("backup-server").unwrap(), tcp),
        )
        .await
        .unwrap()
        .unwrap();
        let mut binding: Binding = [0; BINDING_LEN];
        stream
            .get_ref()
            .1
            .export_keying_material(&mut binding, EXPORTER_LABEL, None)
            .unwrap();
        let limits = Limits::default().for_dialect(Dialect::Secure);
        let mut client = Self {
            framed: Framed::new(stream, ClientCodec::with_dialect(limits, Dialect::Secure)),
            id,
        };
        client
            .send(Request::Reconnect {
                name: UserName::try_from(name).unwrap(),
            })
            .await;
        let wrapped = match client.recv().await {
            Response::Reconnected {
                client_id,
                wrapped_key,
            } if client_id == id => wrapped_key,
            other => panic!("reconnect: {other:?}"),
        };
        let secret = SessionSecret::unwrap(&key, &mut rand::thread_rng(), &wrapped).unwrap();
        client
            .send(Request::Prove {
                proof: secret.proof(id, &binding),
            })
            .await;
        assert_eq!(
            client.recv().await,
            Response::Authenticated { client_id: id }
        );
        client
    }

    async fn send(&mut self, request: Request) {
        let frame = RequestFrame {
            client_id: self.id,
            numbering: Numbering::Modern,
            request,
        };
        tokio::time::timeout(STEP, self.framed.send(frame))
            .await
            .unwrap()
            .unwrap();
    }

    async fn recv(&mut self) -> Response {
        match tokio::time::timeout(STEP, self.framed.next())
            .await
            .unwrap()
        {
            Some(Ok(r)) => r,
            other => panic!("expected a response, got {other:?}"),
        }
    }

    async fn ask(&mut self, request: RepoRequest) -> RepoResponse {
        self.send(Request::Repo(request)).await;
        match self.recv().await {
            Response::Repo(r) => r,
            other => panic!("expected a repository answer, got {other:?}"),
        }
    }

    /// Reads until the server closes; what it sent first.
    async fn closed(&mut self) -> Vec<Response> {
        let mut got = Vec::new();
        loop {
            match tokio::time::timeout(STEP, self.framed.next())
                .await
                .unwrap()
            {
                Some(Ok(r)) => got.push(r),
                Some(Err(_)) | None => return got,
            }
        }
    }

    /// Sends the objects back to back as a pack, in `packet`-byte slices,
    /// then its index; the answer to the index.
    async fn upload_pack(&mut self, objects: &[(ObjectId, Vec<u8>)], packet: usize) -> Response {
        let bytes: Vec<u8> = objects.iter().flat_map(|(_, b)| b.clone()).collect();
        for chunk in bytes.chunks(packet) {
            self.send(Request::Repo(RepoRequest::PackData {
                content: Bytes::copy_from_slice(chunk),
            }))
            .await;
        }
        let entries = objects
            .iter()
            .map(|(id, b)| PackEntry {
                id: *id,
                len: u32::try_from(b.len()).unwrap(),
            })
            .collect();
        self.send(Request::Repo(RepoRequest::PackEnd { entries }))
            .await;
        self.recv().await
    }

    async fn have(&mut self, ids: &[ObjectId]) -> Vec<bool> {
        match self.ask(RepoRequest::Have { ids: ids.to_vec() }).await {
            RepoResponse::HaveAnswer { have } => have,
            other => panic!("have: {other:?}"),
        }
    }

    /// Fetches `ids`: for each, its bytes or `None` (1667).
    async fn fetch(&mut self, ids: &[ObjectId]) -> Vec<Option<Vec<u8>>> {
        self.send(Request::Repo(RepoRequest::Fetch { ids: ids.to_vec() }))
            .await;
        let mut out = Vec::new();
        for id in ids {
            match self.recv().await {
                Response::Repo(RepoResponse::ObjectMissing { id: got }) => {
                    assert_eq!(got, *id);
                    out.push(None);
                }
                Response::Repo(RepoResponse::ObjectBegin { id: got, len }) => {
                    assert_eq!(got, *id);
                    let mut bytes = Vec::new();
                    while bytes.len() < len as usize {
                        match self.recv().await {
                            Response::Repo(RepoResponse::ObjectData { content }) => {
                                bytes.extend_from_slice(&content)
                            }
                            other => panic!("object data: {other:?}"),
                        }
                    }
                    assert_eq!(bytes.len(), len as usize, "no more than announced");
                    out.push(Some(bytes));
                }
                other => panic!("fetch: {other:?}"),
            }
        }
        out
    }

    async fn stage(&mut self, ids: &[ObjectId]) -> u32 {
        match self
            .ask(RepoRequest::SnapshotRefs { ids: ids.to_vec() })
            .await
        {
            RepoResponse::RefsStaged { missing } => missing,
            other => panic!("refs: {other:?}"),
        }
    }

    async fn commit(&mut self, time: u64, meta: &[u8]) -> RepoResponse {
        self.ask(RepoRequest::SnapshotCommit {
            time,
            meta: Bytes::copy_from_slice(meta),
        })
        .await
    }

    async fn snapshots(&mut self, cursor: u64) -> (u64, Vec<SnapshotEntry>) {
        match self.ask(RepoRequest::Snapshots { cursor }).await {
            RepoResponse::SnapshotPage {
                next_cursor,
                entries,
            } => (next_cursor, entries),
            other => panic!("snapshots: {other:?}"),
        }
    }
}

fn oid(n: u8) -> ObjectId {
    let mut id = [n; 32];
    id[31] = 0x5a;
    ObjectId(id)
}

/// A stand-in for a sealed object: `len` (at least a sealed empty
/// object's) random bytes.
fn object(n: u8, len: usize, seed: u64) -> (ObjectId, Vec<u8>) {
    assert!(len >= OVERHEAD);
    (oid(n), random_bytes(len, seed))
}

/// The pack blobs on disk.
fn pack_blobs(data: &Path) -> Vec<std::path::PathBuf> {
    files_under(data)
        .into_iter()
        .filter(|p| p.starts_with("clients") && p.components().any(|c| c.as_os_str() == "blobs"))
        .collect()
}

/// The rows of a repository table.
fn rows(data: &Path, table: &str) -> i64 {
    let db = rusqlite::Connection::open(data.join(Storage::DATABASE)).unwrap();
    db.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
        .unwrap()
}

#[tokio::test]
async fn round_trips_a_pack_through_have_and_fetch() {
    let dir = tempfile::tempdir().unwrap();
    prepare(dir.path());
    let server = start(dir.path()).await;
    let mut a = RepoClient::connect(server.secure_addr.unwrap(), A).await;
    // One object spans several 1668 packets.
    let objects = vec![
        object(1, OVERHEAD, 1),
        object(2, 2_500_000, 2),
        object(3, 1000, 3),
    ];
    // Slices that cut objects anywhere.
    assert_eq!(
        a.upload_pack(&objects, 300_007).await,
        Response::Repo(RepoResponse::PackStored { added: 3 })
    );
    assert_eq!(
        a.have(&[oid(3), oid(9), oid(1), oid(2)]).await,
        vec![true, false, true, true]
    );
    let got = a.fetch(&[oid(2), oid(9), oid(1), oid(3), oid(2)]).await;
    assert_eq!(
        got,
        vec![
            Some(objects[1].1.clone()),
            None,
            Some(objects[0].1.clone()),
            Some(objects[2].1.clone()),
            Some(objects[1].1.clone()),
        ]
    );
    // An object already held is skipped, not an error.
    let again = vec![object(3, 1000, 3), object(4, 64, 4)];
    assert_eq!(
        a.upload_pack(&again, 1 << 20).await,
        Response::Repo(RepoResponse::PackStored { added: 1 })
    );
    assert_eq!(a.fetch(&[oid(4)]).await, vec![Some(again[1].1.clone())]);
    assert_eq!(rows(dir.path(), "packs"), 2);
    assert_eq!(rows(dir.path(), "objects"), 4);
    assert_eq!(pack_blobs(dir.path()).len(), 2);
}

#[tokio::test]
async fn rejects_a_pack_whose_index_does_not_cover_it_and_records_nothing() {
    let dir = tempfile::tempdir().unwrap();
    prepare(dir.path());
    let server = start(dir.path()).await;
    let addr = server.secure_addr.unwrap();
    let mut a = RepoClient::connect(addr, A).await;
    a.send(Request::Repo(RepoRequest::PackData {
        content: Bytes::from(random_bytes(100, 7)),
    }))
    .await;
    a.send(Request::Repo(RepoRequest::PackEnd {
        entries: vec![PackEntry {
            id: oid(1),
            len: 90,
        }],
    }))
    .await;
    assert_eq!(a.closed().await, vec![Response::GeneralError]);
    assert_eq!(rows(dir.path(), "packs"), 0);
    assert_eq!(rows(dir.path(), "objects"), 0);
    assert!(pack_blobs(dir.path()).is_empty());
    assert!(temp_files(dir.path()).is_empty(), "the writer was aborted");
    let mut a = RepoClient::connect(addr, A).await;
    assert_eq!(a.have(&[oid(1)]).await, vec![false]);
}

#[tokio::test]
async fn commits_a_snapshot_whose_references_are_stored_and_lists_it() {
    let dir = tempfile::tempdir().unwrap();
    prepare(dir.path());
    let server = start(dir.path()).await;
    let mut a = RepoClient::connect(server.secure_addr.unwrap(), A).await;
    let objects = vec![object(1, 100, 1), object(2, 200, 2)];
    a.upload_pack(&objects, 1 << 20).await;
    assert_eq!(a.stage(&[oid(1), oid(2)]).await, 0);
    assert_eq!(a.stage(&[oid(1)]).await, 0, "a reference twice");
    let first = match a.commit(1_700_000_000, b"sealed description").await {
        RepoResponse::SnapshotCommitted { id } => id,
        other => panic!("commit: {other:?}"),
    };
    assert_eq!(a.stage(&[oid(2)]).await, 0);
    let second = match a.commit(u64::MAX, &[0xff; 300]).await {
        RepoResponse::SnapshotCommitted { id } => id,
        other => panic!("commit: {other:?}"),
    };
    assert!(second > first, "ids increase");
    assert_eq!(rows(dir.path(), "snapshot_refs"), 3);
    assert_eq!(rows(dir.path(), "repo_stage"), 0, "nothing left staged");
    let (next, entries) = a.snapshots(0).await;
    assert_eq!(next, 0);
    assert_eq!(
        entries,
        vec![
            SnapshotEntry {
                id: first,
                time: 1_700_000_000,
                meta: Bytes::from_static(b"sealed description"),
            },
            SnapshotEntry {
                id: second,
                time: u64::MAX,
                meta: Bytes::from(vec![0xff; 300]),
            },
        ]
    );
    assert_eq!(a.snapshots(first).await.1.len(), 1);
    assert!(a.snapshots(second).await.1.is_empty());
}

#[tokio::test]
async fn refuses_a_snapshot_that_references_a_missing_object() {
    let dir = tempfile::tempdir().unwrap();
    prepare(dir.path());
    let server = start(dir.path()).await;
    let mut a = RepoClient::connect(server.secure_addr.unwrap(), A).await;
    a.upload_pack(&[object(1, 100, 1)], 1 << 20).await;
    assert_eq!(a.stage(&[oid(1), oid(7), oid(8)]).await, 2);
    assert_eq!(a.stage(&[oid(1)]).await, 0);
    assert_eq!(
        a.commit(5, b"m").await,
        RepoResponse::SnapshotRefused {
            reason: CommitRefusal::MISSING,
            missing: 2,
        }
    );
    assert!(a.snapshots(0).await.1.is_empty());
    assert_eq!(
        rows(dir.path(), "repo_stage"),
        0,
        "the refused stage is gone"
    );
    // The next snapshot starts afresh.
    assert_eq!(a.stage(&[oid(1)]).await, 0);
    assert!(matches!(
        a.commit(6, b"m").await,
        RepoResponse::SnapshotCommitted { .. }
    ));
    assert_eq!(a.snapshots(0).await.1.len(), 1);
}

#[tokio::test]
async fn keeps_each_clients_objects_out_of_anothers_reach() {
    let dir = tempfile::tempdir().unwrap();
    prepare(dir.path());
    let server = start(dir.path()).await;
    let addr = server.secure_addr.unwrap();
    let mut a = RepoClient::connect(addr, A).await;
    let mut b = RepoClient::connect(addr, B).await;
    let mine = object(1, 500, 1);
    a.upload_pack(std::slice::from_ref(&mine), 1 << 20).await;
    assert_eq!(b.have(&[oid(1)]).await, vec![false]);
    assert_eq!(b.fetch(&[oid(1)]).await, vec![None]);
    assert_eq!(b.stage(&[oid(1)]).await, 1);
    assert_eq!(
        b.commit(1, b"m").await,
        RepoResponse::SnapshotRefused {
            reason: CommitRefusal::MISSING,
            missing: 1,
        }
    );
    // The same id is B's own object once B stores it, with B's bytes.
    let theirs = object(1, 400, 2);
    assert_eq!(
        b.upload_pack(std::slice::from_ref(&theirs), 1 << 20).await,
        Response::Repo(RepoResponse::PackStored { added: 1 })
    );
    assert_eq!(b.fetch(&[oid(1)]).await, vec![Some(theirs.1)]);
    assert_eq!(a.fetch(&[oid(1)]).await, vec![Some(mine.1)]);
    assert!(b.snapshots(0).await.1.is_empty());
    assert_eq!(a.stage(&[oid(1)]).await, 0);
    assert!(matches!(
        a.commit(2, b"a").await,
        RepoResponse::SnapshotCommitted { .. }
    ));
    assert!(b.snapshots(0).await.1.is_empty(), "A's snapshot is A's");
}

#[tokio::test]
async fn stores_and_returns_key_envelopes() {
    let dir = tempfile::tempdir().unwrap();
    prepare(dir.path());
    let server = start(dir.path()).await;
    let addr = server.secure_addr.unwrap();
    let mut a = RepoClient::connect(addr, A).await;
    assert_eq!(
        a.ask(RepoRequest::GetKeys).await,
        RepoResponse::Keys { slots: vec![] }
    );
    // Slot 0 (the master key's) is written once: a second put keeps the
    // first and says so; other slots are replaced.
    for (slot, envelope, answer) in [
        (0u8, &b"first"[..], RepoResponse::KeyStored { slot: 0 }),
        (2, b"passphrase", RepoResponse::KeyStored { slot: 2 }),
        (0, b"second", RepoResponse::KeyExists { slot: 0 }),
        (2, b"replaced", RepoResponse::KeyStored { slot: 2 }),
    ] {
        assert_eq!(
            a.ask(RepoRequest::PutKey {
                slot,
                envelope: Bytes::copy_from_slice(envelope),
            })
            .await,
            answer
        );
    }
    let expected = RepoResponse::Keys {
        slots: vec![
            KeySlot {
                slot: 0,
                envelope: Bytes::from_static(b"first"),
            },
            KeySlot {
                slot: 2,
                envelope: Bytes::from_static(b"replaced"),
            },
        ],
    };
    assert_eq!(a.ask(RepoRequest::GetKeys).await, expected);
    let mut b = RepoClient::connect(addr, B).await;
    assert_eq!(
        b.ask(RepoRequest::GetKeys).await,
        RepoResponse::Keys { slots: vec![] }
    );
    // Kept, not held by the connection.
    let mut again = RepoClient::connect(addr, A).await;
    assert_eq!(again.ask(RepoRequest::GetKeys).await, expected);
}

#[tokio::test]
async fn a_connection_dropped_mid_pack_records_nothing() {
    let dir = tempfile::tempdir().unwrap();
    prepare(dir.path());
    let server = start(dir.path()).await;
    let addr = server.secure_addr.unwrap();
    let mut a = RepoClient::connect(addr, A).await;
    a.send(Request::Repo(RepoRequest::PackData {
        content: Bytes::from(random_bytes(300_000, 1)),
    }))
    .await;
    // Pack data has no answer: once its temporary exists, the server
    // has begun the pack; then the connection goes.
    let appeared = tokio::time::timeout(STEP, async {
        while temp_files(dir.path()).is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(appeared.is_ok(), "the pack was never begun");
    drop(a);
    let gone = tokio::time::timeout(STEP, async {
        while !temp_files(dir.path()).is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(gone.is_ok(), "the unfinished pack was not discarded");
    assert_eq!(rows(dir.path(), "packs"), 0);
    assert_eq!(rows(dir.path(), "objects"), 0);
    assert!(pack_blobs(dir.path()).is_empty());
    let mut a = RepoClient::connect(addr, A).await;
    assert_eq!(
        a.upload_pack(&[object(1, 300_000, 1)], 1 << 20).await,
        Response::Repo(RepoResponse::PackStored { added: 1 })
    );
}

#[tokio::test]
async fn keeps_packs_and_snapshots_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    prepare(dir.path());
    let objects = vec![object(1, 1000, 1), object(2, 70_000, 2)];
    let server = start(dir.path()).await;
    let snapshot = {
        let mut a = RepoClient::connect(server.secure_addr.unwrap(), A).await;
        a.upload_pack(&objects, 1 << 20).await;
        a.stage(&[oid(1), oid(2)]).await;
        match a.commit(9, b"kept").await {
            RepoResponse::SnapshotCommitted { id } => id,
            other => panic!("commit: {other:?}"),
        }
    };
    server.stop().await.unwrap();
    // A pack blob without a row, as a crash between its barrier and its
    // transaction leaves: recovery removes it, and only it.
    let storage = Storage::open_local(dir.path()).unwrap();
    let mut w = storage.blobs().begin_write(A).unwrap();
    w.write(b"orphan pack").unwrap();
    let orphan = w.finish().unwrap().publish().unwrap();
    drop(storage);
    assert_eq!(pack_blobs(dir.path()).len(), 2);

    let server = start(dir.path()).await;
    let mut a = RepoClient::connect(server.secure_addr.unwrap(), A).await;
    assert_eq!(a.have(&[oid(1), oid(2)]).await, vec![true, true]);
    assert_eq!(
        a.fetch(&[oid(2), oid(1)]).await,
        vec![Some(objects[1].1.clone()), Some(objects[0].1.clone())]
    );
    assert_eq!(
        a.snapshots(0).await.1,
        vec![SnapshotEntry {
            id: snapshot,
            time: 9,
            meta: Bytes::from_static(b"kept"),
        }]
    );
    let blobs = pack_blobs(dir.path());
    assert_eq!(blobs.len(), 1, "{blobs:?}");
    assert!(!blobs.iter().any(|p| p.to_str() == Some(orphan.0.as_str())));
    // The next snapshot gets a higher id.
    a.stage(&[oid(1)]).await;
    match a.commit(10, b"next").await {
        RepoResponse::SnapshotCommitted { id } => assert!(id > snapshot),
        other => panic!("commit: {other:?}"),
    }
}

#[tokio::test]
async fn closes_a_fetch_with_1607_when_a_pack_is_shorter_than_its_index() {
    let dir = tempfile::tempdir().unwrap();
    prepare(dir.path());
    let server = start(dir.path()).await;
    let addr = server.secure_addr.unwrap();
    let mut a = RepoClient::connect(addr, A).await;
    let objects = vec![object(1, 100, 1), object(2, 200, 2)];
    a.upload_pack(&objects, 1 << 20).await;
    let blobs = pack_blobs(dir.path());
    assert_eq!(blobs.len(), 1);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path().join(&blobs[0]))
        .unwrap();
    file.set_len(150).unwrap();
    // The first object is whole still.
    assert_eq!(a.fetch(&[oid(1)]).await, vec![Some(objects[0].1.clone())]);
    a.send(Request::Repo(RepoRequest::Fetch {
        ids: vec![oid(1), oid(2)],
    }))
    .await;
    let got = a.closed().await;
    assert!(
        matches!(
            got.as_slice(),
            [
                Response::Repo(RepoResponse::ObjectBegin { len: 100, .. }),
                Response::Repo(RepoResponse::ObjectData { .. }),
                Response::Repo(RepoResponse::ObjectBegin { len: 200, .. }),
                Response::GeneralError,
            ]
        ),
        "{got:?}"
    );
}

#[tokio::test]
async fn forgets_only_the_clients_own_snapshots_and_refuses_an_append_only_one() {
    let dir = tempfile::tempdir().unwrap();
    prepare(dir.path());
    let server = start(dir.path()).await;
    let addr = server.secure_addr.unwrap();
    let mut a = RepoClient::connect(addr, A).await;
    let mut b = RepoClient::connect(addr, B).await;
    let mut ids = Vec::new();
    for (client, n) in [(&mut a, 1u8), (&mut b, 2)] {
        client.upload_pack(&[object(n, 100, 1)], 1 << 20).await;
        assert_eq!(client.stage(&[oid(n)]).await, 0);
        match client.commit(1, b"m").await {
            RepoResponse::SnapshotCommitted { id } => ids.push(id),
            other => panic!("commit: {other:?}"),
        }
    }
    let (mine, theirs) = (ids[0], ids[1]);
    // B names A's snapshot and one that does not exist: nothing of A's goes.
    assert_eq!(
        b.ask(RepoRequest::Forget {
            ids: vec![mine, 999]
        })
        .await,
        RepoResponse::Forgotten { count: 0 }
    );
    assert_eq!(a.snapshots(0).await.1.len(), 1);
    // Append-only: refused, nothing removed.
    let storage = Storage::open_local(dir.path()).unwrap();
    assert!(storage.meta().set_append_only(B, true).unwrap());
    assert_eq!(
        b.ask(RepoRequest::Forget { ids: vec![theirs] }).await,
        RepoResponse::ForgetRefused {
            reason: ForgetRefusal::APPEND_ONLY
        }
    );
    assert_eq!(b.snapshots(0).await.1.len(), 1);
    // A forgets its own; its references go with it.
    assert_eq!(
        a.ask(RepoRequest::Forget {
            ids: vec![mine, mine]
        })
        .await,
        RepoResponse::Forgotten { count: 1 }
    );
    assert!(a.snapshots(0).await.1.is_empty());
    assert_eq!(rows(dir.path(), "snapshot_refs"), 1);
}
