//! Secure mode end to end (`docs/PROTOCOL.md` §12, `docs/SECURITY.md`): our
//! client against our server over TLS 1.3, pinning (first use, explicit,
//! changed certificate, restart), men in the middle (own certificate, a
//! relay of the TLS session, a swapped secret, a replayed proof), an
//! attacker who knows a client's id and name but not its key, and both
//! listeners side by side.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use client::identity::IdentityStore;
use client::settings::Options;
use client::tls::{KnownServers, Trust};
use client::{files, Client, Error};
use futures::{SinkExt, StreamExt};
use protocol::crypto::encrypt_all;
use protocol::message::{FilePacket, PacketHead};
use protocol::retrieval::{ListFlags, RetrievalRequest};
use protocol::secure::{Fingerprint, SessionSecret, EXPORTER_LABEL};
use protocol::{
    ClientCodec, ClientId, Dialect, FileName, Limits, Numbering, Request, RequestFrame, Response,
    UserName,
};
use rsa::traits::PublicKeyParts;
use server::identity::ServerIdentity;
use server::storage::Storage;
use support::{write_file, STEP};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio_util::codec::Framed;

/// Our server with both listeners on a data directory that outlives it.
struct Server {
    addr: SocketAddr,
    legacy_addr: SocketAddr,
    fingerprint: Fingerprint,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), server::ServerError>>,
}

impl Server {
    /// Starts on `data`, on `addr` if given (a restart keeps its address).
    async fn start(data: &Path, addr: Option<SocketAddr>) -> Self {
        Self::start_configured(data, addr, |_| {}).await
    }

    /// As [`Server::start`], with `configure` applied to the defaults.
    async fn start_configured(
        data: &Path,
        addr: Option<SocketAddr>,
        configure: impl FnOnce(&mut server::Config),
    ) -> Self {
        let listener = TcpListener::bind(addr.unwrap_or_else(|| "127.0.0.1:0".parse().unwrap()))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let legacy = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let legacy_addr = legacy.local_addr().unwrap();
        let (identity, _) = ServerIdentity::load_or_create(data).unwrap();
        let mut config = server::Config::new(data);
        config.shutdown_grace = Duration::from_secs(2);
        configure(&mut config);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server::run(
            server::Listeners::both(listener, legacy),
            config,
            async move {
                let _ = stopped.await;
            },
        ));
        Self {
            addr,
            legacy_addr,
            fingerprint: identity.fingerprint(),
            stop: Some(stop),
            task,
        }
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let task = std::mem::replace(&mut self.task, tokio::spawn(async { Ok(()) }));
        tokio::time::timeout(STEP, task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn client(addr: SocketAddr, dir: &Path) -> Client {
    let mut options = Options::new(addr.to_string());
    options.timeout = STEP;
    Client::new(options, IdentityStore::new(dir))
}

fn with_fingerprint(addr: SocketAddr, dir: &Path, fp: Fingerprint) -> Client {
    let mut options = Options::new(addr.to_string());
    options.timeout = STEP;
    options.server_fingerprint = Some(fp);
    Client::new(options, IdentityStore::new(dir))
}

fn name(text: &str) -> UserName {
    UserName::try_from(text).unwrap()
}

fn file(text: &str) -> FileName {
    FileName::try_from(text).unwrap()
}

async fn back_up(c: &Client, path: &Path) -> client::RunReport {
    let items = files::collect(&[path.to_owned()]).items;
    c.backup(items, None).await.unwrap()
}

/// Every version the server holds, as (client, file, size, sha256).
fn stored_versions(data: &Path) -> Vec<(String, String, u64, Vec<u8>)> {
    let storage = Storage::open_local(data).unwrap();
    let mut all = Vec::new();
    for summary in storage.meta().clients().unwrap() {
        let id = summary.client.id;
        for v in storage.meta().list(id, true, 0, 10_000).unwrap() {
            all.push((id.to_hex(), v.file.to_string(), v.size, v.sha256.to_vec()));
        }
    }
    all.sort();
    all
}

// ------------------------------------------------------------- pinning

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pins_on_first_use_and_keeps_working_after_a_restart() {
    let data = tempfile::tempdir().unwrap();
    let ids = tempfile::tempdir().unwrap();
    let server = Server::start(data.path(), None).await;
    let c = client(server.addr, ids.path());
    c.register(name("tofu"), false).await.unwrap();
    let pinned = KnownServers::new(ids.path())
        .get(&server.addr.to_string())
        .unwrap();
    assert_eq!(pinned, Some(server.fingerprint), "pinned at registration");

    let path = ids.path().join("a.txt");
    write_file(&path, 10_000, 1);
    assert_eq!(back_up(&c, &path).await.exit_code(), 0);

    // Same data directory, same address: same identity, the pin holds.
    let addr = server.addr;
    let before = server.fingerprint;
    server.stop().await;
    let server = Server::start(data.path(), Some(addr)).await;
    assert_eq!(
        server.fingerprint, before,
        "the identity survives a restart"
    );
    let report = back_up(&c, &path).await;
    assert_eq!(report.exit_code(), 0, "{:?}", report.first_error());
    assert!(!report.registered);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_with_an_explicit_fingerprint_and_refuses_a_wrong_one() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path(), None).await;
    let wrong = Fingerprint([7; 32]);
    let ids = tempfile::tempdir().unwrap();
    let err = with_fingerprint(server.addr, ids.path(), wrong)
        .register(name("careful"), false)
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, Error::ServerIdentityChanged { .. }),
        "{err:?}"
    );
    assert!(
        text.contains(&wrong.to_string()) && text.contains(&server.fingerprint.to_string()),
        "{text}"
    );
    assert!(
        IdentityStore::new(ids.path()).load().unwrap().is_none(),
        "nothing registered"
    );
    assert_eq!(stored_versions(data.path()), vec![]);

    let identity = with_fingerprint(server.addr, ids.path(), server.fingerprint)
        .register(name("careful"), false)
        .await
        .unwrap();
    assert_eq!(
        KnownServers::new(ids.path())
            .get(&server.addr.to_string())
            .unwrap(),
        Some(server.fingerprint)
    );
    assert_eq!(
        identity.key.public_key().n().bits(),
        3072,
        "secure-mode clients use RSA-3072"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_a_changed_certificate_naming_both_fingerprints() {
    let data = tempfile::tempdir().unwrap();
    let ids = tempfile::tempdir().unwrap();
    let server = Server::start(data.path(), None).await;
    let c = client(server.addr, ids.path());
    c.register(name("pinned"), false).await.unwrap();
    let (addr, old) = (server.addr, server.fingerprint);
    server.stop().await;
    // The identity is lost and remade: a new certificate on the same address.
    std::fs::remove_dir_all(data.path().join(server::identity::IDENTITY_DIR)).unwrap();
    let server = Server::start(data.path(), Some(addr)).await;
    assert_ne!(server.fingerprint, old);
    let path = ids.path().join("b.txt");
    write_file(&path, 1000, 2);
    let items = files::collect(&[path]).items;
    let err = c.backup(items, None).await.unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, Error::ServerIdentityChanged { .. }),
        "{err:?}"
    );
    assert!(text.contains(&old.to_string()), "{text}");
    assert!(text.contains(&server.fingerprint.to_string()), "{text}");
    assert!(
        text.contains("--server-fingerprint"),
        "says what to do: {text}"
    );
    assert_eq!(err.exit_code(), 4);
    assert_eq!(stored_versions(data.path()), vec![], "nothing was sent");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_without_a_pin_is_refused_rather_than_trusted() {
    let data = tempfile::tempdir().unwrap();
    let ids = tempfile::tempdir().unwrap();
    let server = Server::start(data.path(), None).await;
    let c = client(server.addr, ids.path());
    c.register(name("nopin"), false).await.unwrap();
    std::fs::remove_file(ids.path().join(client::tls::KNOWN_SERVERS)).unwrap();
    let path = ids.path().join("c.txt");
    write_file(&path, 100, 3);
    let err = c
        .backup(files::collect(&[path]).items, None)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NoPinnedServer { .. }), "{err:?}");
}

// ------------------------------------------------------ men in the middle

/// A TLS-terminating proxy with its own identity, opening its own TLS
/// session to the server and relaying the requests and responses, which
/// `tamper` may change on the way.
struct Proxy {
    addr: SocketAddr,
    fingerprint: Fingerprint,
    _dir: tempfile::TempDir,
}

type Tamper = Arc<dyn Fn(Response) -> Response + Send + Sync>;

impl Proxy {
    async fn start(upstream: SocketAddr, tamper: Tamper) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (identity, _) = ServerIdentity::load_or_create(dir.path()).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(identity.tls_config().unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let tamper = Arc::clone(&tamper);
                tokio::spawn(async move {
                    let Ok(downstream) = acceptor.accept(stream).await else {
                        return;
                    };
                    let Ok(up) = secure_connect(upstream).await else {
                        return;
                    };
                    let (mut down_tx, mut down_rx) = Framed::new(
                        downstream,
                        protocol::ServerCodec::with_dialect(
                            Limits::default().for_dialect(Dialect::Secure),
                            Dialect::Secure,
                        ),
                    )
                    .split();
                    let (mut up_tx, mut up_rx) = up.framed.split();
                    let requests = async move {
                        while let Some(Ok(frame)) = down_rx.next().await {
                            if up_tx.send(frame).await.is_err() {
                                break;
                            }
                        }
                    };
                    let responses = async move {
                        while let Some(Ok(response)) = up_rx.next().await {
                            if down_tx.send(tamper(response)).await.is_err() {
                                break;
                            }
                        }
                    };
                    tokio::join!(requests, responses);
                });
            }
        });
        Self {
            addr,
            fingerprint: identity.fingerprint(),
            _dir: dir,
        }
    }
}

/// A raw secure-mode connection, as an attacker or a proxy makes one.
struct Raw {
    framed: Framed<tokio_rustls::client::TlsStream<TcpStream>, ClientCodec>,
    binding: [u8; 32],
}

async fn secure_connect(addr: SocketAddr) -> std::io::Result<Raw> {
    let (config, _) = client::tls::client_config(Trust::FirstUse).unwrap();
    let tcp = TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from(client::tls::SERVER_NAME).unwrap();
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await?;
    let mut binding = [0u8; 32];
    tls.get_ref()
        .1
        .export_keying_material(&mut binding, EXPORTER_LABEL, None)
        .unwrap();
    let codec = ClientCodec::with_dialect(
        Limits::default().for_dialect(Dialect::Secure),
        Dialect::Secure,
    );
    Ok(Raw {
        framed: Framed::new(tls, codec),
        binding,
    })
}

impl Raw {
    async fn ask(&mut self, client_id: ClientId, request: Request) -> Option<Response> {
        let frame = RequestFrame {
            client_id,
            numbering: Numbering::Modern,
            request,
        };
        self.framed.send(frame).await.ok()?;
        match tokio::time::timeout(STEP, self.framed.next()).await {
            Ok(Some(Ok(r))) => Some(r),
            _ => None,
        }
    }

    /// After a refusal the server closes: nothing more arrives.
    async fn assert_closed(&mut self) {
        let next = tokio::time::timeout(STEP, self.framed.next())
            .await
            .unwrap();
        assert!(
            matches!(next, None | Some(Err(_))),
            "connection still open: {next:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_client_refuses_a_proxy_with_its_own_certificate() {
    let data = tempfile::tempdir().unwrap();
    let ids = tempfile::tempdir().unwrap();
    let server = Server::start(data.path(), None).await;
    // The client pins the real server...
    with_fingerprint(server.addr, ids.path(), server.fingerprint)
        .register(name("victim"), false)
        .await
        .unwrap();
    // ...and is then pointed at a proxy that presents its own certificate.
    let proxy = Proxy::start(server.addr, Arc::new(|r| r)).await;
    let path = ids.path().join("secret.txt");
    write_file(&path, 5000, 4);
    let mut options = Options::new(proxy.addr.to_string());
    options.timeout = STEP;
    options.server_fingerprint = Some(server.fingerprint);
    let c = Client::new(options, IdentityStore::new(ids.path()));
    let err = c
        .backup(files::collect(&[path]).items, None)
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, Error::ServerIdentityChanged { .. }),
        "{err:?}"
    );
    assert!(text.contains(&proxy.fingerprint.to_string()), "{text}");
    assert!(text.contains("intercepting"), "{text}");
    assert_eq!(stored_versions(data.path()), vec![]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_of_the_session_cannot_use_the_clients_proof() {
    let data = tempfile::tempdir().unwrap();
    let ids = tempfile::tempdir().unwrap();
    let server = Server::start(data.path(), None).await;
    client(server.addr, ids.path())
        .register(name("relayed"), false)
        .await
        .unwrap();
    let before = stored_versions(data.path());
    // A client that trusts the proxy (say, misled into pinning it): the
    // proxy relays everything unchanged, yet the proof is bound to the
    // client's TLS session with the proxy, not the proxy's with the server.
    let proxy = Proxy::start(server.addr, Arc::new(|r| r)).await;
    let path = ids.path().join("d.txt");
    write_file(&path, 5000, 5);
    let mut options = Options::new(proxy.addr.to_string());
    options.timeout = STEP;
    options.server_fingerprint = Some(proxy.fingerprint);
    let store = IdentityStore::new(ids.path());
    let c = Client::new(options, store);
    let err = c
        .backup(files::collect(&[path]).items, None)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::ProofRejected { .. }), "{err:?}");
    assert_eq!(stored_versions(data.path()), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_that_swaps_the_wrapped_secret_is_refused() {
    let data = tempfile::tempdir().unwrap();
    let ids = tempfile::tempdir().unwrap();
    let server = Server::start(data.path(), None).await;
    let identity = client(server.addr, ids.path())
        .register(name("swapped"), false)
        .await
        .unwrap();
    let before = stored_versions(data.path());
    // The proxy replaces the server's secret with one of its own, wrapped
    // to the client's (public) key: it knows that secret, but the server
    // checks the proof against its own.
    let public = identity.key.public_key();
    let known: Arc<Mutex<Option<SessionSecret>>> = Arc::new(Mutex::new(None));
    let sink = Arc::clone(&known);
    let tamper: Tamper = Arc::new(move |r| match r {
        Response::Reconnected { client_id, .. } => {
            let mut rng = rand::rngs::OsRng;
            let secret = SessionSecret::random(&mut rng);
            let wrapped = secret.wrap(&mut rng, &public).unwrap();
            *sink.lock().unwrap() = Some(secret);
            Response::Reconnected {
                client_id,
                wrapped_key: Bytes::from(wrapped),
            }
        }
        other => other,
    });
    let proxy = Proxy::start(server.addr, tamper).await;
    let path = ids.path().join("e.txt");
    write_file(&path, 5000, 6);
    let mut options = Options::new(proxy.addr.to_string());
    options.timeout = STEP;
    options.server_fingerprint = Some(proxy.fingerprint);
    let c = Client::new(options, IdentityStore::new(ids.path()));
    let err = c
        .backup(files::collect(&[path]).items, None)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::ProofRejected { .. }), "{err:?}");
    assert!(
        known.lock().unwrap().is_some(),
        "the proxy did swap the secret"
    );
    assert_eq!(stored_versions(data.path()), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_proof_is_refused() {
    let data = tempfile::tempdir().unwrap();
    let ids = tempfile::tempdir().unwrap();
    let server = Server::start(data.path(), None).await;
    let identity = client(server.addr, ids.path())
        .register(name("replayed"), false)
        .await
        .unwrap();
    let id = identity.client_id;
    // A valid proof, made by the key's owner on one connection...
    let mut first = secure_connect(server.addr).await.unwrap();
    let Some(Response::Reconnected { wrapped_key, .. }) = first
        .ask(
            id,
            Request::Reconnect {
                name: name("replayed"),
            },
        )
        .await
    else {
        panic!("no 1605");
    };
    let secret =
        SessionSecret::unwrap(&identity.key, &mut rand::rngs::OsRng, &wrapped_key).unwrap();
    let proof = secret.proof(id, &first.binding);
    assert!(matches!(
        first.ask(id, Request::Prove { proof }).await,
        Some(Response::Authenticated { .. })
    ));
    // ...sent again on another connection, after its own reconnect.
    let mut second = secure_connect(server.addr).await.unwrap();
    assert!(matches!(
        second
            .ask(
                id,
                Request::Reconnect {
                    name: name("replayed")
                }
            )
            .await,
        Some(Response::Reconnected { .. })
    ));
    assert_eq!(
        second.ask(id, Request::Prove { proof }).await,
        Some(Response::NotAuthenticated)
    );
    second.assert_closed().await;
}

// ------------------------------------------------- registration abuse

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_registered_without_a_proof_is_free_after_the_grace_period_and_a_proved_one_never_is(
) {
    let data = tempfile::tempdir().unwrap();
    let grace = Duration::from_secs(1);
    let server =
        Server::start_configured(data.path(), None, |c| c.registration_grace = grace).await;
    let proved_dir = tempfile::tempdir().unwrap();
    client(server.addr, proved_dir.path())
        .register(name("proved"), false)
        .await
        .unwrap();
    let key = IdentityStore::new(proved_dir.path())
        .load()
        .unwrap()
        .unwrap()
        .key;
    let der = protocol::crypto::public_key_der(&key.public_key()).unwrap();

    // Registers with its key (1602), then never proves it (no 1250).
    let mut squatter = secure_connect(server.addr).await.unwrap();
    let Some(Response::KeyAccepted {
        client_id: stale, ..
    }) = squatter
        .ask(
            ClientId::default(),
            Request::RegisterKey {
                name: name("wanted"),
                key: Bytes::from(der.clone()),
            },
        )
        .await
    else {
        panic!("no 1602");
    };
    drop(squatter);
    let mut early = secure_connect(server.addr).await.unwrap();
    assert_eq!(
        early
            .ask(
                ClientId::default(),
                Request::RegisterKey {
                    name: name("wanted"),
                    key: Bytes::from(der.clone()),
                },
            )
            .await,
        Some(Response::RegistrationFailed),
        "taken within the grace period"
    );

    tokio::time::sleep(grace + Duration::from_millis(200)).await;
    let owner = tempfile::tempdir().unwrap();
    client(server.addr, owner.path())
        .register(name("wanted"), false)
        .await
        .unwrap();
    let owner_id = IdentityStore::new(owner.path())
        .load()
        .unwrap()
        .unwrap()
        .client_id;
    assert_ne!(owner_id, stale);
    // The proved client keeps its name.
    let mut raw = secure_connect(server.addr).await.unwrap();
    assert_eq!(
        raw.ask(
            ClientId::default(),
            Request::RegisterKey {
                name: name("proved"),
                key: Bytes::from(der),
            },
        )
        .await,
        Some(Response::RegistrationFailed)
    );
    server.stop().await;

    let storage = Storage::open_local(data.path()).unwrap();
    let clients = storage.meta().clients().unwrap();
    let holder = |n: &str| {
        clients
            .iter()
            .find(|c| c.client.name == name(n))
            .map(|c| c.client.clone())
            .unwrap()
    };
    assert_eq!(holder("wanted").id, owner_id);
    assert!(
        holder("wanted").completed_at.is_some(),
        "the proof was recorded"
    );
    assert!(holder("proved").completed_at.is_some());
    assert!(storage.meta().client(stale).unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secure_registrations_share_the_per_address_limit_with_the_legacy_listener() {
    let data = tempfile::tempdir().unwrap();
    let ids = tempfile::tempdir().unwrap();
    let server = Server::start_configured(data.path(), None, |c| {
        c.registrations_per_minute = 1;
        c.registration_burst = 2;
    })
    .await;
    let first = client(server.addr, ids.path());
    first.register(name("first"), false).await.unwrap();
    let der = protocol::crypto::public_key_der(
        &IdentityStore::new(ids.path())
            .load()
            .unwrap()
            .unwrap()
            .key
            .public_key(),
    )
    .unwrap();
    let register_key = |n: &str| Request::RegisterKey {
        name: name(n),
        key: Bytes::from(der.clone()),
    };
    let mut raw = secure_connect(server.addr).await.unwrap();
    assert!(matches!(
        raw.ask(ClientId::default(), register_key("second")).await,
        Some(Response::KeyAccepted { .. })
    ));
    // The burst of two is used: refused over TLS...
    let mut raw = secure_connect(server.addr).await.unwrap();
    assert_eq!(
        raw.ask(ClientId::default(), register_key("third")).await,
        Some(Response::RegistrationFailed)
    );
    // ...and on the legacy listener, from the same address.
    let mut legacy = Framed::new(
        TcpStream::connect(server.legacy_addr).await.unwrap(),
        ClientCodec::default(),
    );
    legacy
        .send(RequestFrame {
            client_id: ClientId::default(),
            numbering: Numbering::Modern,
            request: Request::Register {
                name: name("fourth"),
            },
        })
        .await
        .unwrap();
    let answer = tokio::time::timeout(STEP, legacy.next()).await.unwrap();
    assert!(
        matches!(answer, Some(Ok(Response::RegistrationFailed))),
        "{answer:?}"
    );
    // The registered client reconnects and backs up as often as it likes.
    let path = ids.path().join("a.txt");
    for round in 0..3 {
        write_file(&path, 1_000, round);
        assert_eq!(back_up(&first, &path).await.exit_code(), 0, "round {round}");
    }
    server.stop().await;
}

// ------------------------------------- an attacker who knows id and name

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn knowing_the_id_and_name_without_the_key_gets_nothing_done() {
    let data = tempfile::tempdir().unwrap();
    let ids = tempfile::tempdir().unwrap();
    let server = Server::start(data.path(), None).await;
    let c = client(server.addr, ids.path());
    c.register(name("owner"), false).await.unwrap();
    let path = ids.path().join("precious.txt");
    write_file(&path, 20_000, 7);
    assert_eq!(back_up(&c, &path).await.exit_code(), 0);
    let id = IdentityStore::new(ids.path())
        .load()
        .unwrap()
        .unwrap()
        .client_id;
    let before = stored_versions(data.path());
    assert_eq!(before.len(), 1);

    let junk = encrypt_all(&protocol::crypto::AesKey::from_bytes([1; 32]), b"garbage");
    let packet = Request::SendFile(FilePacket {
        head: PacketHead {
            content_size: junk.len() as u64,
            orig_size: 7,
            packet: 1,
            total: 1,
            file: file("precious.txt"),
        },
        content: junk.freeze(),
    });
    let attempts = [
        packet,
        Request::Retrieval(RetrievalRequest::List {
            flags: ListFlags::ALL_VERSIONS,
            cursor: 0,
        }),
        Request::Retrieval(RetrievalRequest::Restore {
            version: 0,
            file: file("precious.txt"),
        }),
        Request::Retrieval(RetrievalRequest::Delete {
            file: file("precious.txt"),
        }),
        Request::CrcOk {
            file: file("precious.txt"),
        },
    ];
    for (i, request) in attempts.into_iter().enumerate() {
        // Without any proof: refused at once.
        let mut raw = secure_connect(server.addr).await.unwrap();
        assert!(matches!(
            raw.ask(
                id,
                Request::Reconnect {
                    name: name("owner")
                }
            )
            .await,
            Some(Response::Reconnected { .. })
        ));
        assert_eq!(
            raw.ask(id, request.clone()).await,
            Some(Response::NotAuthenticated),
            "request {i} without a proof"
        );
        raw.assert_closed().await;
        // With a guessed proof: refused, and the connection ends.
        let mut raw = secure_connect(server.addr).await.unwrap();
        raw.ask(
            id,
            Request::Reconnect {
                name: name("owner"),
            },
        )
        .await;
        assert_eq!(
            raw.ask(id, Request::Prove { proof: [0xa5; 32] }).await,
            Some(Response::NotAuthenticated),
            "guessed proof {i}"
        );
        raw.assert_closed().await;
    }
    // The legacy listener does not serve a client registered in secure mode.
    let mut legacy = Framed::new(
        TcpStream::connect(server.legacy_addr).await.unwrap(),
        ClientCodec::default(),
    );
    legacy
        .send(RequestFrame {
            client_id: id,
            numbering: Numbering::Modern,
            request: Request::Reconnect {
                name: name("owner"),
            },
        })
        .await
        .unwrap();
    let answer = tokio::time::timeout(STEP, legacy.next()).await.unwrap();
    assert!(
        matches!(answer, Some(Ok(Response::ReconnectRejected { .. }))),
        "{answer:?}"
    );
    assert_eq!(stored_versions(data.path()), before, "nothing changed");
    // The owner still gets the file back.
    let out = ids.path().join("back.txt");
    let report = c
        .restore(&file("precious.txt"), 0, Some(&out), ids.path(), false)
        .await
        .unwrap();
    assert!(report.ok());
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&path).unwrap());
}

// ---------------------------------------------- both listeners side by side

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_and_secure_clients_are_served_side_by_side() {
    let data = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(data.path(), None).await;
    let secure = client(server.addr, &dir.path().join("s"));
    let mut options = Options::new(server.legacy_addr.to_string());
    options.timeout = STEP;
    options.legacy = true;
    let legacy = Client::new(options, IdentityStore::new(dir.path().join("l")));
    let (a, b) = (dir.path().join("a.bin"), dir.path().join("b.bin"));
    let a_data = write_file(&a, 3_000_000, 8);
    let b_data = write_file(&b, 3_000_000, 9);
    let (sec, leg) = (name("sec"), name("leg"));
    let (ra, rb) = tokio::join!(
        secure.backup(files::collect(std::slice::from_ref(&a)).items, Some(&sec)),
        legacy.backup(files::collect(std::slice::from_ref(&b)).items, Some(&leg))
    );
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_eq!((ra.exit_code(), rb.exit_code()), (0, 0));
    let storage = Storage::open_local(data.path()).unwrap();
    assert_eq!(
        storage
            .read_latest(ra.client_id.unwrap(), &file("a.bin"))
            .unwrap()
            .unwrap(),
        a_data
    );
    assert_eq!(
        storage
            .read_latest(rb.client_id.unwrap(), &file("b.bin"))
            .unwrap()
            .unwrap(),
        b_data
    );
    // The legacy client's key is 1024 bits, as legacy peers expect; it may
    // prove that key on the secure listener too.
    let l = IdentityStore::new(dir.path().join("l"))
        .load()
        .unwrap()
        .unwrap();
    assert_eq!(l.key.public_key().n().bits(), 1024);
    let upgraded = with_fingerprint(server.addr, &dir.path().join("l"), server.fingerprint);
    let report = upgraded
        .backup(files::collect(std::slice::from_ref(&b)).items, None)
        .await
        .unwrap();
    assert_eq!(report.exit_code(), 0, "{:?}", report.first_error());
    assert!(!report.registered);
}

// ------------------------------------------------------- over 4 GiB

/// A file over 4 GiB in secure mode, through the real binaries, with the
/// client's and server's peak memory. Slow (it moves 4.5 GiB):
/// `cargo test --release -p backup-client --test secure -- --ignored --nocapture over_4_gib`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "moves 4.5 GiB; run with --ignored in release mode"]
async fn backs_up_and_restores_a_file_over_4_gib() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = Server::start(&data, None).await;
    let path: PathBuf = dir.path().join("big.bin");
    let size: u64 = (4 << 30) + (512 << 20);
    {
        let mut f =
            std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&path).unwrap());
        let block = support::pattern(1 << 20, 11);
        let mut left = size;
        let mut n = 0u8;
        while left > 0 {
            let take = left.min(block.len() as u64) as usize;
            let mut chunk = block[..take].to_vec();
            chunk[0] = n;
            n = n.wrapping_add(1);
            f.write_all(&chunk).unwrap();
            left -= take as u64;
        }
    }
    let c = client(server.addr, &dir.path().join("ids"));
    let started = std::time::Instant::now();
    let report = c
        .backup(
            files::collect(std::slice::from_ref(&path)).items,
            Some(&name("big")),
        )
        .await
        .unwrap();
    let up = started.elapsed();
    assert_eq!(report.exit_code(), 0, "{:?}", report.first_error());
    let out = dir.path().join("back.bin");
    let started = std::time::Instant::now();
    let restored = c
        .restore(&file("big.bin"), 0, Some(&out), dir.path(), false)
        .await
        .unwrap();
    assert!(restored.ok());
    let down = started.elapsed();
    assert_eq!(std::fs::metadata(&out).unwrap().len(), size);
    let same = {
        use std::io::Read;
        let (mut a, mut b) = (
            std::fs::File::open(&path).unwrap(),
            std::fs::File::open(&out).unwrap(),
        );
        let (mut x, mut y) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
        loop {
            let n = a.read(&mut x).unwrap();
            let m = b.read(&mut y).unwrap();
            assert_eq!(n, m);
            if n == 0 {
                break true;
            }
            if x[..n] != y[..n] {
                break false;
            }
        }
    };
    assert!(same, "restored content differs");
    let peak = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(str::to_owned)
        });
    println!(
        "over_4_gib: {size} bytes up in {:.1} s ({:.0} MB/s), down in {:.1} s ({:.0} MB/s); client and server in one process, {}",
        up.as_secs_f64(),
        size as f64 / 1e6 / up.as_secs_f64(),
        down.as_secs_f64(),
        size as f64 / 1e6 / down.as_secs_f64(),
        peak.unwrap_or_default()
    );
    server.stop().await;
}
