//! The client: registration, reconnection and backup runs over one
//! connection, driving the sans-IO `protocol::session::client` machine.

use std::sync::Arc;
use std::time::{Duration, Instant};

use protocol::crypto::PrivateKey;
use protocol::session::client::{
    ClientError, ClientEvent, ClientSession, PlanError, ServerErrorStep, UploadPlan, Verdict,
};
use protocol::session::{MAX_SEND_ATTEMPTS, SERVER_ERROR_RESENDS};
use protocol::{Limits, RequestFrame, Response, UserName};

use crate::connection::{Connection, Secure};
use crate::error::{Error, ErrorKind};
use crate::fanout::{fan_out, ItemFailure, Queue};
use crate::feedback::{Feedback, Silent};
use crate::files::BackupItem;
use crate::identity::{Identity, IdentityStore};
use crate::report::{FileReport, Outcome, Report};
use crate::settings::{Options, PacketSize};
use crate::tls::{KnownServers, Trust};
use crate::upload;

/// Tries at opening a connection (and reconnecting on it) while the server
/// refuses or drops it at once, as a server at its connection limits does
/// to newcomers (`docs/SECURITY.md`, "Denial of service").
pub const OPEN_ATTEMPTS: u32 = 5;
/// The pause after the first such failure; each next one doubles, with up
/// to half again at random so that clients turned away together do not
/// come back together.
const OPEN_BACKOFF: Duration = Duration::from_millis(200);

/// Whether `e` is a connection refused or dropped before anything was
/// done on it: worth another try after a pause.
fn refused_at_open(e: &Error) -> bool {
    matches!(
        e,
        Error::Connect { .. } | Error::Closed { .. } | Error::ConnectionLost { .. }
    )
}

/// A backup client bound to a server and an identity store.
pub struct Client {
    options: Options,
    store: IdentityStore,
    feedback: Arc<dyn Feedback>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("options", &self.options)
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

/// A session that has exchanged keys and may send files.
pub(crate) struct Keyed {
    pub(crate) conn: Connection,
    pub(crate) session: ClientSession,
    pub(crate) identity: Identity,
    pub(crate) registered: bool,
}

/// Generates an RSA key pair off the async threads: 3072 bits (e = 65537)
/// for secure mode, 1024 bits (e = 17) for the legacy protocol.
async fn generate_key(dialect: protocol::Dialect) -> Result<PrivateKey, Error> {
    use protocol::secure::{SECURE_RSA_BITS, SECURE_RSA_EXPONENT};
    tokio::task::spawn_blocking(move || match dialect {
        protocol::Dialect::Legacy => PrivateKey::generate_legacy(&mut rand::rngs::OsRng),
        protocol::Dialect::Secure => {
            PrivateKey::generate(&mut rand::rngs::OsRng, SECURE_RSA_BITS, SECURE_RSA_EXPONENT)
        }
    })
    .await
    .map_err(|e| Error::Internal(format!("key generation stopped: {e}")))?
    .map_err(|e| Error::Internal(format!("cannot generate an RSA key pair: {e}")))
}

impl Client {
    /// A client for `options.server` whose identity lives in `store`.
    pub fn new(options: Options, store: IdentityStore) -> Self {
        Self {
            options,
            store,
            feedback: Arc::new(Silent),
        }
    }

    /// Reports progress to `feedback`.
    #[must_use]
    pub fn with_feedback(mut self, feedback: Arc<dyn Feedback>) -> Self {
        self.feedback = feedback;
        self
    }

    /// The settings in use.
    pub fn options(&self) -> &Options {
        &self.options
    }

    /// Where the identity lives.
    pub fn store(&self) -> &IdentityStore {
        &self.store
    }

    /// Where progress goes.
    pub(crate) fn feedback(&self) -> &dyn Feedback {
        self.feedback.as_ref()
    }

    pub(crate) fn session_error(
        &self,
        e: ClientError,
        client_id: Option<protocol::ClientId>,
    ) -> Error {
        match e {
            ClientError::ProofRejected => Error::ProofRejected {
                server: self.options.server.clone(),
                client_id: client_id.map(|id| id.to_hex()).unwrap_or_default(),
                dir: self.store.dir().to_owned(),
            },
            ClientError::Key(_) => Error::KeyMismatch {
                server: self.options.server.clone(),
                client_id: client_id.map(|id| id.to_hex()).unwrap_or_default(),
            },
            other => Error::Protocol {
                server: self.options.server.clone(),
                detail: other.to_string(),
            },
        }
    }

    pub(crate) fn unexpected(&self, event: &ClientEvent, doing: &str) -> Error {
        Error::Protocol {
            server: self.options.server.clone(),
            detail: format!("{event:?} while {doing}"),
        }
    }

    /// Sends `frame` and returns what the answer meant, sending it again
    /// while the server answers 1607 and the session says so
    /// ([`ServerErrorStep::Resend`], up to [`SERVER_ERROR_RESENDS`] times).
    async fn exchange(
        &self,
        conn: &mut Connection,
        session: &mut ClientSession,
        frame: &RequestFrame,
        doing: &str,
    ) -> Result<ClientEvent, Error> {
        let give_up = |failures: u8| Error::ServerFailed {
            server: self.options.server.clone(),
            request: doing.to_owned(),
            times: failures,
        };
        conn.send(frame, doing).await?;
        loop {
            let response = match conn.recv(doing).await {
                Ok(r) => r,
                // A server that answered 1607 and then hung up has failed.
                Err(e) if session.server_errors() > 0 && e.kind() == ErrorKind::Unreachable => {
                    return Err(give_up(session.server_errors()))
                }
                Err(e) => return Err(e),
            };
            match session.handle(response, &mut rand::rngs::OsRng) {
                Ok(ClientEvent::ServerError(ServerErrorStep::Resend { resend })) => {
                    self.feedback.notice(&format!(
                        "the server at {} responded with an error while {doing}; retrying ({resend} of {SERVER_ERROR_RESENDS})",
                        self.options.server
                    ));
                    match conn.send(frame, doing).await {
                        Ok(()) => {}
                        Err(e) if e.kind() == ErrorKind::Unreachable => {
                            return Err(give_up(resend))
                        }
                        Err(e) => return Err(e),
                    }
                }
                Ok(ClientEvent::ServerError(ServerErrorStep::GiveUp { times })) => {
                    return Err(give_up(times))
                }
                Ok(event) => return Ok(event),
                Err(e) => return Err(self.session_error(e, session.client_id())),
            }
        }
    }

    /// The pins of this client.
    fn known_servers(&self) -> KnownServers {
        KnownServers::new(self.store.dir())
    }

    /// How to secure a new connection: `None` for the legacy protocol; else
    /// the pinned fingerprint (from `--server-fingerprint`, or
    /// `known_servers`), or trust on first use when registering with a
    /// server that has no pin.
    ///
    /// # Errors
    /// [`Error::NoPinnedServer`] when not registering and nothing is pinned.
    fn security(&self, registering: bool) -> Result<Option<Secure>, Error> {
        if self.options.legacy {
            return Ok(None);
        }
        if let Some(fp) = self.options.server_fingerprint {
            return Ok(Some(Secure {
                trust: Trust::Pinned(fp),
                pinned_in: "given with --server-fingerprint".into(),
            }));
        }
        let known = self.known_servers();
        match known.get(&self.options.server)? {
            Some(fp) => Ok(Some(Secure {
                trust: Trust::Pinned(fp),
                pinned_in: format!("in {}", known.path().display()),
            })),
            None if registering => Ok(Some(Secure {
                trust: Trust::FirstUse,
                pinned_in: "nothing pinned yet".into(),
            })),
            None => Err(Error::NoPinnedServer {
                server: self.options.server.clone(),
                file: known.path().to_owned(),
            }),
        }
    }

    /// Opens a connection secured as [`Client::security`] says, trying
    /// again while the server refuses or drops it at once.
    async fn open(&self, registering: bool) -> Result<Connection, Error> {
        let secure = self.security(registering)?;
        self.with_backoff(OPEN_ATTEMPTS, || {
            Connection::open(&self.options, secure.as_ref())
        })
        .await
    }

    /// Runs `attempt` up to [`OPEN_ATTEMPTS`] times while it fails with a
    /// connection refused or dropped at once, pausing between tries; any
    /// other outcome is returned as it is. Only for steps that can be
    /// repeated safely (opening, reconnecting, proving).
    async fn with_backoff<T, F, Fut>(&self, attempts: u32, mut attempt: F) -> Result<T, Error>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, Error>>,
    {
        let mut pause = OPEN_BACKOFF;
        let mut tries = 1;
        loop {
            match attempt().await {
                Err(e) if tries < attempts && refused_at_open(&e) => {
                    let jitter = rand::Rng::gen_range(
                        &mut rand::thread_rng(),
                        0..=pause.as_millis() as u64 / 2,
                    );
                    let wait = pause + Duration::from_millis(jitter);
                    tracing::debug!(cause = %e, try_ = tries, wait_ms = wait.as_millis() as u64, "connection refused or dropped; trying again");
                    tokio::time::sleep(wait).await;
                    pause *= 2;
                    tries += 1;
                }
                other => return other,
            }
        }
    }

    /// Opens a connection and reconnects as `identity` on it, proving the
    /// key in secure mode; the whole step is tried up to `attempts` times
    /// while the server drops the connection at once.
    async fn open_reconnected(
        &self,
        identity: &Identity,
        attempts: u32,
    ) -> Result<(Connection, ClientSession, ClientEvent), Error> {
        let secure = self.security(false)?;
        self.with_backoff(attempts, || async {
            let mut conn = Connection::open(&self.options, secure.as_ref()).await?;
            let mut session = self.new_session(
                &conn,
                identity.name.clone(),
                identity.key.clone(),
                Some(identity.client_id),
            );
            let doing = format!("reconnecting as \"{}\"", identity.name);
            let frame = session.reconnect_request();
            let event = self
                .exchange(&mut conn, &mut session, &frame, &doing)
                .await?;
            let event = self.prove(&mut conn, &mut session, event).await?;
            Ok((conn, session, event))
        })
        .await
    }

    /// A session for `conn`, in its dialect.
    fn new_session(
        &self,
        conn: &Connection,
        name: UserName,
        key: PrivateKey,
        client_id: Option<protocol::ClientId>,
    ) -> ClientSession {
        match conn.binding() {
            Some(binding) => ClientSession::secure(name, key, client_id, binding),
            None => ClientSession::new(name, key, client_id, self.options.numbering),
        }
    }

    /// Once a secure session is keyed: pins the server's fingerprint if it
    /// was trusted on first use or given with `--server-fingerprint`.
    fn remember_server(&self, conn: &Connection) -> Result<(), Error> {
        let Some(fp) = conn.fingerprint() else {
            return Ok(());
        };
        let known = self.known_servers();
        if known.get(&self.options.server)? != Some(fp) {
            known.set(&self.options.server, fp)?;
            self.feedback.notice(&format!(
                "pinned the server at {} as {fp} in {}",
                self.options.server,
                known.path().display()
            ));
        }
        Ok(())
    }

    /// In secure mode, answers a [`ClientEvent::Prove`] with the proof and
    /// returns what its answer meant; any other event is returned as is.
    async fn prove(
        &self,
        conn: &mut Connection,
        session: &mut ClientSession,
        event: ClientEvent,
    ) -> Result<ClientEvent, Error> {
        match event {
            ClientEvent::Prove { reply } => {
                self.exchange(conn, session, &reply, "proving our key")
                    .await
            }
            other => Ok(other),
        }
    }

    /// Registers `name` on an open connection with the session's key, saves
    /// the identity as soon as the server assigns an id, then (legacy) sends
    /// the public key and receives the AES key, or (secure mode) proves the
    /// key the registration carried.
    async fn register_on(
        &self,
        conn: &mut Connection,
        session: &mut ClientSession,
        name: &UserName,
    ) -> Result<Identity, Error> {
        let doing = format!("registering as \"{name}\"");
        let frame = session
            .register_request()
            .map_err(|e| self.session_error(e, None))?;
        let event = self.exchange(conn, session, &frame, &doing).await?;
        if let ClientEvent::Prove { .. } = event {
            let client_id = session
                .client_id()
                .ok_or_else(|| Error::Internal("registered without a client id".into()))?;
            let identity = Identity {
                name: name.clone(),
                client_id,
                key: session.private_key().clone(),
            };
            self.store.save(&identity)?;
            return match self.prove(conn, session, event).await? {
                ClientEvent::KeyReady => {
                    self.remember_server(conn)?;
                    Ok(identity)
                }
                other => Err(self.unexpected(&other, "proving our key")),
            };
        }
        let client_id = match event {
            ClientEvent::Registered(id) => id,
            ClientEvent::NameTaken => {
                return Err(Error::NameTaken {
                    server: self.options.server.clone(),
                    name: name.to_string(),
                })
            }
            other => return Err(self.unexpected(&other, &doing)),
        };
        let identity = Identity {
            name: name.clone(),
            client_id,
            key: session.private_key().clone(),
        };
        self.store.save(&identity)?;
        let doing = "sending the public key";
        let frame = session
            .public_key_request()
            .map_err(|e| self.session_error(e, Some(client_id)))?;
        match self.exchange(conn, session, &frame, doing).await? {
            ClientEvent::KeyReady => Ok(identity),
            other => Err(self.unexpected(&other, doing)),
        }
    }

    /// Registers `name` with the server: makes a new RSA key pair, and saves
    /// the identity (`me.info`, `priv.key`) in the store.
    ///
    /// # Errors
    /// When an identity exists and `force` is not set, the name is taken,
    /// the server fails or cannot be reached, or the files cannot be written.
    pub async fn register(&self, name: UserName, force: bool) -> Result<Identity, Error> {
        if !force {
            if let Some(existing) = self.store.load()? {
                return Err(Error::AlreadyRegistered {
                    dir: self.store.dir().to_owned(),
                    name: existing.name.to_string(),
                    client_id: existing.client_id.to_hex(),
                });
            }
        }
        self.store.ensure_writable()?;
        let mut conn = self.open(true).await?;
        let key = generate_key(conn.dialect()).await?;
        let mut session = self.new_session(&conn, name.clone(), key, None);
        let identity = self.register_on(&mut conn, &mut session, &name).await?;
        conn.close().await;
        Ok(identity)
    }

    /// Opens a connection and exchanges keys: reconnects with the stored
    /// identity, or registers when there is none (as `register_as`) or when
    /// the server does not know us (1606, `docs/PROTOCOL.md` §6.2).
    async fn connect(&self, register_as: Option<&UserName>) -> Result<Keyed, Error> {
        let Some(stored) = self.store.load()? else {
            let name = register_as.ok_or_else(|| Error::NotRegistered {
                dir: self.store.dir().to_owned(),
            })?;
            self.store.ensure_writable()?;
            // The key first: a connection that has not registered yet is
            // one a busy server may drop.
            let key = generate_key(self.options.dialect()).await?;
            let mut conn = self.open(true).await?;
            let mut session = self.new_session(&conn, name.clone(), key, None);
            let identity = self.register_on(&mut conn, &mut session, name).await?;
            return Ok(Keyed {
                conn,
                session,
                identity,
                registered: true,
            });
        };
        let (mut conn, mut session, event) = self.open_reconnected(&stored, OPEN_ATTEMPTS).await?;
        let Identity {
            name,
            client_id,
            key,
        } = stored;
        match event {
            ClientEvent::KeyReady => {
                self.remember_server(&conn)?;
                let identity = Identity {
                    name,
                    client_id,
                    key,
                };
                Ok(Keyed {
                    conn,
                    session,
                    identity,
                    registered: false,
                })
            }
            ClientEvent::MustRegister => {
                self.feedback.notice(&format!(
                    "the server at {} does not know client {client_id} (\"{name}\"); registering anew with a new key pair",
                    self.options.server
                ));
                session.set_private_key(generate_key(conn.dialect()).await?);
                let identity = self.register_on(&mut conn, &mut session, &name).await?;
                Ok(Keyed {
                    conn,
                    session,
                    identity,
                    registered: true,
                })
            }
            other => Err(self.unexpected(&other, &format!("reconnecting as \"{name}\""))),
        }
    }

    /// Opens a connection and reconnects with the stored identity, without
    /// ever registering: a server that does not know this client holds
    /// nothing of it, and registering anew would replace the key files.
    pub(crate) async fn reconnect_existing(&self) -> Result<Keyed, Error> {
        self.reconnect_tried(OPEN_ATTEMPTS).await
    }

    /// As [`reconnect_existing`](Self::reconnect_existing), tried once: for
    /// a connection beyond the first of a run, which goes on without it
    /// when a busy server turns it away.
    pub(crate) async fn reconnect_extra(&self) -> Result<Keyed, Error> {
        self.reconnect_tried(1).await
    }

    async fn reconnect_tried(&self, attempts: u32) -> Result<Keyed, Error> {
        let stored = self.store.load()?.ok_or_else(|| Error::NotRegistered {
            dir: self.store.dir().to_owned(),
        })?;
        let (conn, session, event) = self.open_reconnected(&stored, attempts).await?;
        let Identity {
            name,
            client_id,
            key,
        } = stored;
        let doing = format!("reconnecting as \"{name}\"");
        if matches!(event, ClientEvent::KeyReady) {
            self.remember_server(&conn)?;
        }
        match event {
            ClientEvent::KeyReady => Ok(Keyed {
                conn,
                session,
                identity: Identity {
                    name,
                    client_id,
                    key,
                },
                registered: false,
            }),
            ClientEvent::MustRegister => Err(Error::UnknownClient {
                server: self.options.server.clone(),
                client_id: client_id.to_hex(),
                name: name.to_string(),
                dir: self.store.dir().to_owned(),
            }),
            other => Err(self.unexpected(&other, &doing)),
        }
    }

    /// Plans the upload of `item` under the packet-size policy.
    ///
    /// # Errors
    /// When the file is too large for the legacy fields or the packet count.
    pub fn plan(&self, item: &BackupItem) -> Result<UploadPlan, Error> {
        let max_packet = Limits::default().max_packet_content;
        let dialect = self.options.dialect();
        let name = item.name.clone();
        let planned = match self.options.packet_size {
            PacketSize::Auto(n) => UploadPlan::new_in(dialect, name, item.size, n, max_packet),
            PacketSize::Fixed(n) => UploadPlan::fixed(dialect, name, item.size, n, max_packet),
        };
        planned.map_err(|e| match e {
            PlanError::TooLarge { size, max } => Error::TooLarge {
                path: item.path.clone(),
                size,
                max,
            },
            PlanError::TooManyPackets {
                size,
                packet_size,
                max,
                ..
            } => Error::TooManyPackets {
                path: item.path.clone(),
                size,
                packet_size,
                max,
            },
            PlanError::PacketSize { size, max } => Error::BadPacketSize {
                size: size as u64,
                max,
            },
        })
    }

    /// Sends one file until the server's cksum matches ours, at most
    /// [`MAX_SEND_ATTEMPTS`] times, and returns the attempts and the cksum.
    async fn upload(
        &self,
        keyed: &mut Keyed,
        item: &BackupItem,
        plan: &UploadPlan,
    ) -> Result<(u8, u32), ItemFailure> {
        let fatal = ItemFailure::from;
        let server = self.options.server.clone();
        let path = item.path.display().to_string();
        let Keyed {
            conn,
            session,
            identity,
            ..
        } = keyed;
        let key = session.aes_key().cloned().ok_or_else(|| {
            fatal(Error::Internal(
                "no session key before sending a file".into(),
            ))
        })?;
        session.begin_file();
        loop {
            let attempt = session.attempts() + 1;
            self.feedback.attempt(item, attempt);
            let cksum = upload::send_file(
                conn,
                &item.path,
                plan,
                key.clone(),
                identity.client_id,
                session.numbering(),
                self.feedback.as_ref(),
            )
            .await;
            let cksum = match cksum {
                Ok(c) => c,
                Err(e) if e.error.kind() == ErrorKind::Unreachable => {
                    // The server may have said why before it hung up.
                    let said_error =
                        matches!(conn.pending_response().await, Some(Response::GeneralError));
                    let server_errors = session.server_errors();
                    if server_errors > 0 || said_error {
                        return Err(fatal(Error::ServerFailed {
                            server,
                            request: format!("sending {path}"),
                            times: server_errors + u8::from(said_error),
                        }));
                    }
                    return Err(e);
                }
                Err(e) => return Err(e),
            };
            session.file_sent(plan, cksum);
            let doing = format!("waiting for the server's checksum of {path}");
            // Allow for the server syncing the file: a second per 32 MiB.
            let sync_allowance = Duration::from_secs(item.size >> 25);
            let event = loop {
                let response = conn
                    .recv_within(sync_allowance, &doing)
                    .await
                    .map_err(fatal)?;
                match session.handle(response, &mut rand::rngs::OsRng) {
                    Ok(ClientEvent::RetryAcknowledged) => continue,
                    Ok(event) => break event,
                    Err(e) => return Err(fatal(self.session_error(e, Some(identity.client_id)))),
                }
            };
            match event {
                ClientEvent::Verdict {
                    verdict: Verdict::Match,
                    reply,
                } => {
                    let doing = format!("confirming the checksum of {path}");
                    return match self
                        .exchange(conn, session, &reply, &doing)
                        .await
                        .map_err(fatal)?
                    {
                        ClientEvent::Done => Ok((attempt, cksum)),
                        other => Err(fatal(self.unexpected(&other, &doing))),
                    };
                }
                ClientEvent::Verdict {
                    verdict: Verdict::Retry { attempt },
                    reply,
                } => {
                    self.feedback.notice(&format!(
                        "the server's checksum of {path} differed from ours on attempt {attempt} of {MAX_SEND_ATTEMPTS}; sending it again"
                    ));
                    conn.send(&reply, &format!("asking to resend {path}"))
                        .await
                        .map_err(fatal)?;
                }
                ClientEvent::Verdict {
                    verdict: Verdict::GiveUp,
                    reply,
                } => {
                    let doing = format!("reporting the failed checksum of {path}");
                    return match self
                        .exchange(conn, session, &reply, &doing)
                        .await
                        .map_err(fatal)?
                    {
                        ClientEvent::Done => Err(ItemFailure {
                            error: Error::Verification {
                                path: item.path.clone(),
                                server,
                                attempts: MAX_SEND_ATTEMPTS,
                            },
                            connection_usable: true,
                        }),
                        other => Err(fatal(self.unexpected(&other, &doing))),
                    };
                }
                ClientEvent::ServerError(ServerErrorStep::Resend { resend }) => {
                    self.feedback.notice(&format!(
                        "the server at {server} responded with an error to {path}; sending it again ({resend} of {SERVER_ERROR_RESENDS})"
                    ));
                }
                ClientEvent::ServerError(ServerErrorStep::GiveUp { times }) => {
                    return Err(fatal(Error::ServerFailed {
                        server,
                        request: format!("sending {path}"),
                        times,
                    }));
                }
                other => return Err(fatal(self.unexpected(&other, &doing))),
            }
        }
    }

    /// Backs up `items`: reconnects (or registers, see below), then sends
    /// and verifies each file in turn, over up to `options.connections`
    /// connections at once (the further ones reconnect with the same
    /// identity once the first is keyed; one that cannot be opened leaves
    /// its share to the others).
    ///
    /// Without a stored identity the client registers as `register_as`, or
    /// fails with [`Error::NotRegistered`] when that is `None`. Files that
    /// cannot be planned (too large) are failed before anything is sent.
    /// A failure of one file does not stop the others; a connection that
    /// fails takes no more files, and files no connection could take are
    /// [`Outcome::NotAttempted`].
    ///
    /// # Errors
    /// When the connection or the key exchange fails before any file is
    /// sent; failures of single files are in the [`Report`].
    pub async fn backup(
        &self,
        items: Vec<BackupItem>,
        register_as: Option<&UserName>,
    ) -> Result<Report, Error> {
        let started = Instant::now();
        let mut report = Report {
            server: self.options.server.clone(),
            ..Report::default()
        };
        let mut plans = Vec::with_capacity(items.len());
        for item in &items {
            let (plan, outcome) = match self.plan(item) {
                Ok(plan) => (Some(plan), Outcome::NotAttempted),
                Err(e) => (None, Outcome::Failed(e)),
            };
            let file = FileReport {
                path: item.path.clone(),
                name: item.name.to_string_lossy(),
                size: item.size,
                outcome,
            };
            self.feedback.finished(&file);
            report.files.push(file);
            plans.push(plan);
        }
        let todo: Vec<(&BackupItem, &UploadPlan, usize)> = items
            .iter()
            .zip(&plans)
            .enumerate()
            .filter_map(|(i, (item, plan))| plan.as_ref().map(|p| (item, p, i)))
            .collect();
        if todo.is_empty() {
            report.elapsed = started.elapsed();
            return Ok(report);
        }
        let keyed = self.connect(register_as).await?;
        report.name = Some(keyed.identity.name.to_string());
        report.client_id = Some(keyed.identity.client_id);
        report.registered = keyed.registered;
        let total: u64 = todo.iter().map(|(item, _, _)| item.size).sum();
        self.feedback.start(todo.len(), total);
        let queue = Queue::new(todo);
        let done = fan_out(
            self.feedback.as_ref(),
            &self.options.server,
            self.options.connections,
            &queue,
            keyed,
            || self.reconnect_extra(),
            |keyed| self.send_queued(keyed, &queue),
        )
        .await;
        for (i, file) in done {
            if let Some(slot) = report.files.get_mut(i) {
                *slot = file;
            }
        }
        self.feedback.done();
        report.elapsed = started.elapsed();
        Ok(report)
    }

    /// Sends files from `queue` over `keyed` until the queue is empty or
    /// the connection fails; returns the report of each file it took, by
    /// its index in the run's report.
    async fn send_queued(
        &self,
        mut keyed: Keyed,
        queue: &BackupQueue<'_>,
    ) -> Vec<(usize, FileReport)> {
        let mut done = Vec::new();
        while let Some((_, (item, plan, i))) = queue.take() {
            let result = self.upload(&mut keyed, item, plan).await;
            let stop = matches!(&result, Err(e) if !e.connection_usable);
            let file = FileReport {
                path: item.path.clone(),
                name: item.name.to_string_lossy(),
                size: item.size,
                outcome: match result {
                    Ok((attempts, cksum)) => Outcome::Stored { attempts, cksum },
                    Err(e) => Outcome::Failed(e.error),
                },
            };
            self.feedback.finished(&file);
            done.push((i, file));
            if stop {
                break;
            }
        }
        keyed.conn.close().await;
        done
    }
}

/// The files of a backup not yet taken by a connection, each with its
/// index in the run's report.
type BackupQueue<'a> = Queue<(&'a BackupItem, &'a UploadPlan, usize)>;
