//! Opening a connection (with a pause and another try while the server
//! turns newcomers away), registering, reconnecting, and proving our key
//! in secure mode: everything before files or retrieval requests flow.

use std::time::Duration;

use protocol::crypto::PrivateKey;
use protocol::session::client::{ClientEvent, ClientSession};
use protocol::UserName;

use protocol::repo::envelope::PassphraseKeys;

use crate::connection::{Connection, Secure};
use crate::error::Error;
use crate::identity::Identity;
use crate::snapshot::remote::Remote;
use crate::tls::{KnownServers, Trust};

use super::{Client, Keyed};

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
        self.remember_fingerprint(conn.fingerprint())
    }

    fn remember_fingerprint(&self, fp: Option<protocol::secure::Fingerprint>) -> Result<(), Error> {
        let Some(fp) = fp else {
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
        // The key first, as in `connect`: making it can take seconds on a
        // loaded machine, and a connection that has sent nothing within the
        // server's handshake deadline is closed.
        let key = generate_key(self.options.dialect()).await?;
        let mut conn = self.open(true).await?;
        let mut session = self.new_session(&conn, name.clone(), key, None);
        let identity = self.register_on(&mut conn, &mut session, &name).await?;
        conn.close().await;
        Ok(identity)
    }

    /// Opens a connection and exchanges keys: reconnects with the stored
    /// identity, or registers when there is none (as `register_as`) or when
    /// the server does not know us (1606, `docs/PROTOCOL.md` §6.2).
    pub(super) async fn connect(&self, register_as: Option<&UserName>) -> Result<Keyed, Error> {
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

    /// Opens a connection and logs in with the passphrase
    /// (`docs/PROTOCOL.md` §13.6): the connection may only read. The
    /// server must be pinned or given with `--server-fingerprint`, never
    /// trusted on first use: a signature of the login key made for an
    /// impostor would let it guess the passphrase offline. The pin is
    /// written once the login is accepted.
    ///
    /// # Errors
    /// As [`Remote::passphrase_login`], and [`Error::NoPinnedServer`].
    pub(crate) async fn passphrase_remote(
        &self,
        login: &super::PassphraseLogin,
    ) -> Result<(Remote, PassphraseKeys), Error> {
        let conn = self.open(false).await?;
        let fingerprint = conn.fingerprint();
        let (remote, keys) = Remote::passphrase_login(
            conn,
            self.options.server.clone(),
            login.name.clone(),
            login.passphrase.clone(),
        )
        .await?;
        self.remember_fingerprint(fingerprint)?;
        Ok((remote, keys))
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
}
