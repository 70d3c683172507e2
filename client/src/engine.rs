//! The client: a [`Client`] bound to a server and an identity store, and
//! the one exchange of a request with its answer that every flow uses,
//! driving the sans-IO `protocol::session::client` machine. Opening,
//! registering, reconnecting and proving our key are in [`handshake`];
//! backup runs in [`backup`]; retrieval in [`crate::retrieval`].

mod backup;
mod handshake;

pub use handshake::OPEN_ATTEMPTS;

use std::sync::Arc;

use protocol::session::client::{ClientError, ClientEvent, ClientSession, ServerErrorStep};
use protocol::session::SERVER_ERROR_RESENDS;
use protocol::RequestFrame;

use crate::connection::Connection;
use crate::error::{Error, ErrorKind};
use crate::feedback::{Feedback, Silent};
use crate::identity::{Identity, IdentityStore};
use crate::settings::Options;

/// A backup client bound to a server and an identity store.
pub struct Client {
    options: Options,
    store: IdentityStore,
    feedback: Arc<dyn Feedback>,
    /// A backup-only key file to back up with (`--key-file`); reading
    /// snapshots is then refused.
    key_file: Option<std::path::PathBuf>,
    /// Log in with the passphrase instead of the RSA key (read only).
    login: Option<PassphraseLogin>,
}

/// Who logs in with a passphrase, and the passphrase.
pub struct PassphraseLogin {
    pub name: protocol::UserName,
    pub passphrase: zeroize::Zeroizing<Vec<u8>>,
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

impl Client {
    /// A client for `options.server` whose identity lives in `store`.
    pub fn new(options: Options, store: IdentityStore) -> Self {
        Self {
            options,
            store,
            feedback: Arc::new(Silent),
            key_file: None,
            login: None,
        }
    }

    /// Backs up with the backup-only key in `path`, and refuses to read.
    #[must_use]
    pub fn with_key_file(mut self, path: Option<std::path::PathBuf>) -> Self {
        self.key_file = path;
        self
    }

    /// Reads snapshots after a passphrase login (`docs/PROTOCOL.md` §13.6)
    /// instead of with the RSA key.
    #[must_use]
    pub fn with_passphrase_login(mut self, login: Option<PassphraseLogin>) -> Self {
        self.login = login;
        self
    }

    /// The backup-only key file in use, if any.
    pub(crate) fn key_file(&self) -> Option<&std::path::Path> {
        self.key_file.as_deref()
    }

    /// The passphrase login to use, if any.
    pub(crate) fn passphrase_login(&self) -> Option<&PassphraseLogin> {
        self.login.as_ref()
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
        // A server that answered our first request with 1607 and nothing
        // else may not know our numbering at all (`docs/PROTOCOL.md` §9).
        let give_up = |session: &ClientSession, failures: u8| {
            if session.refused_from_the_start() {
                Error::OtherNumbering {
                    server: self.options.server.clone(),
                    request: doing.to_owned(),
                    times: failures,
                    try_codes: match session.numbering() {
                        protocol::Numbering::Modern => 825,
                        protocol::Numbering::Classic => 1025,
                    },
                }
            } else {
                Error::ServerFailed {
                    server: self.options.server.clone(),
                    request: doing.to_owned(),
                    times: failures,
                }
            }
        };
        conn.send(frame, doing).await?;
        loop {
            let response = match conn.recv(doing).await {
                Ok(r) => r,
                // A server that answered 1607 and then hung up has failed.
                Err(e) if session.server_errors() > 0 && e.kind() == ErrorKind::Unreachable => {
                    return Err(give_up(session, session.server_errors()))
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
                            return Err(give_up(session, resend))
                        }
                        Err(e) => return Err(e),
                    }
                }
                Ok(ClientEvent::ServerError(ServerErrorStep::GiveUp { times })) => {
                    return Err(give_up(session, times))
                }
                Ok(event) => return Ok(event),
                Err(e) => return Err(self.session_error(e, session.client_id())),
            }
        }
    }
}
