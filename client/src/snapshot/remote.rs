//! A proven secure connection speaking the repository extension
//! (`docs/PROTOCOL.md` §13): one method per request, each checked against
//! what its answer may be by `protocol::session::repo`.

use std::time::Duration;

use bytes::Bytes;
use protocol::crypto::PrivateKey;
use protocol::repo::envelope::PassphraseKeys;
use protocol::repo::message::{
    CommitRefusal, KeptReason, KeySlot, ObjectId, PackEntry, PassphraseRefusal, RepoKind,
    RepoRequest, RepoResponse, SnapshotEntry, MAX_FETCH_IDS, MAX_IDS,
};
use protocol::session::repo::{self as rules, FetchReceiver, Fetched};
use protocol::{ClientId, Numbering, Request, RequestFrame, Response, UserName};

use crate::connection::Connection;
use crate::engine::Keyed;
use crate::error::Error;

/// Time the server may take beyond the timeout to make a pack durable or
/// commit a snapshot.
const SYNC_ALLOWANCE: Duration = Duration::from_secs(60);

/// A connection whose client has proved its key (or logged in with its
/// passphrase, and may then only read), used for snapshots.
pub struct Remote {
    conn: Connection,
    client_id: ClientId,
    /// The client's RSA key; `None` on a passphrase login.
    private: Option<PrivateKey>,
    server: String,
    /// Whether any repository request was answered on this connection:
    /// a 1607 to the first means the server lacks the extension.
    answered: bool,
}

impl Remote {
    pub(crate) fn new(keyed: Keyed, server: String) -> Self {
        Self {
            conn: keyed.conn,
            client_id: keyed.identity.client_id,
            private: Some(keyed.identity.key),
            server,
            answered: false,
        }
    }

    /// Logs in as `name` with the passphrase on a fresh connection
    /// (`docs/PROTOCOL.md` §13.6): asks for the challenge, derives the
    /// passphrase keys under the envelope's salt and costs (off the async
    /// threads), and signs. Returns the connection, which may only read,
    /// and the keys, which open the passphrase envelope.
    ///
    /// # Errors
    /// [`Error::WrongPassphrase`] when the server refuses the signature,
    /// [`Error::NoPassphrase`] when no client of that name has a
    /// passphrase, [`Error::PassphraseRate`] when the server asks us to
    /// wait; else as any exchange.
    pub(crate) async fn passphrase_login(
        mut conn: Connection,
        server: String,
        name: UserName,
        passphrase: zeroize::Zeroizing<Vec<u8>>,
    ) -> Result<(Self, PassphraseKeys), Error> {
        let binding = conn.binding().ok_or_else(|| Error::Usage {
            detail: "a passphrase login needs secure mode; leave out --legacy".into(),
        })?;
        let protocol = |detail: String| Error::Protocol {
            server: server.clone(),
            detail,
        };
        let doing = format!("logging in as \"{name}\" with the passphrase");
        let frame = RequestFrame {
            client_id: ClientId::default(),
            numbering: Numbering::Modern,
            request: Request::Repo(RepoRequest::PassphraseLogin { name: name.clone() }),
        };
        conn.send(&frame, &doing).await?;
        let answer = match conn.recv(&doing).await {
            Err(Error::Closed { .. }) => {
                return Err(Error::SnapshotsUnsupported {
                    server: server.clone(),
                })
            }
            other => other?,
        };
        let (client_id, cost, salt, challenge) =
            match rules::answer(RepoKind::PassphraseLogin, answer) {
                Ok(Some(RepoResponse::PassphraseChallenge {
                    client_id,
                    cost,
                    salt,
                    challenge,
                })) => (client_id, cost, salt, challenge),
                Ok(Some(RepoResponse::PassphraseRefused { reason })) => {
                    return Err(if reason == PassphraseRefusal::RATE {
                        Error::PassphraseRate { server }
                    } else {
                        Error::NoPassphrase {
                            server,
                            name: name.to_string(),
                        }
                    })
                }
                Ok(_) => return Err(Error::SnapshotsUnsupported { server }),
                Err(e) => return Err(protocol(e.to_string())),
            };
        let keys =
            tokio::task::spawn_blocking(move || PassphraseKeys::derive(&passphrase, &salt, cost))
                .await
                .map_err(|e| Error::Internal(format!("key work stopped: {e}")))?
                .map_err(|e| protocol(format!("passphrase costs refused: {e}")))?;
        let signature = keys.sign_login(client_id, &challenge, &binding);
        let frame = RequestFrame {
            client_id,
            numbering: Numbering::Modern,
            request: Request::Repo(RepoRequest::PassphraseProve { signature }),
        };
        conn.send(&frame, &doing).await?;
        match conn.recv(&doing).await {
            Ok(Response::Authenticated { client_id: c }) if c == client_id => {}
            Ok(Response::NotAuthenticated) | Err(Error::Closed { .. }) => {
                return Err(Error::WrongPassphrase {
                    server,
                    name: name.to_string(),
                })
            }
            Ok(other) => return Err(protocol(format!("{other:?} while {doing}"))),
            Err(e) => return Err(e),
        }
        let remote = Self {
            conn,
            client_id,
            private: None,
            server,
            answered: true,
        };
        Ok((remote, keys))
    }

    pub fn client_id(&self) -> ClientId {
        self.client_id
    }

    /// The server's address, for messages.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The client's RSA key; `None` on a passphrase login.
    pub(crate) fn private_key(&self) -> Option<&PrivateKey> {
        self.private.as_ref()
    }

    fn frame(&self, request: RepoRequest) -> RequestFrame {
        RequestFrame {
            client_id: self.client_id(),
            numbering: Numbering::Modern,
            request: Request::Repo(request),
        }
    }

    fn protocol(&self, detail: String) -> Error {
        Error::Protocol {
            server: self.server.clone(),
            detail,
        }
    }

    /// Sends a request without waiting for an answer.
    async fn send(&mut self, request: RepoRequest, doing: &str) -> Result<(), Error> {
        let frame = self.frame(request);
        self.conn.send(&frame, doing).await
    }

    /// Sends a request and returns its answer, checked against the request.
    async fn ask(&mut self, request: RepoRequest, doing: &str) -> Result<RepoResponse, Error> {
        let kind = request.kind();
        self.send(request, doing).await?;
        self.answer(kind, doing).await
    }

    async fn answer(&mut self, kind: RepoKind, doing: &str) -> Result<RepoResponse, Error> {
        let extra = match kind {
            RepoKind::PackEnd | RepoKind::SnapshotCommit | RepoKind::SnapshotRefs => SYNC_ALLOWANCE,
            _ => Duration::ZERO,
        };
        let response = match self.conn.recv_within(extra, doing).await {
            Ok(r) => r,
            Err(Error::Closed { .. }) if !self.answered => {
                return Err(Error::SnapshotsUnsupported {
                    server: self.server.clone(),
                })
            }
            Err(e) => return Err(e),
        };
        match rules::answer(kind, response) {
            Ok(Some(r)) => {
                self.answered = true;
                Ok(r)
            }
            Ok(None) if !self.answered => Err(Error::SnapshotsUnsupported {
                server: self.server.clone(),
            }),
            Ok(None) => Err(Error::ServerFailed {
                server: self.server.clone(),
                request: doing.to_owned(),
                times: 1,
            }),
            Err(e) => Err(self.protocol(e.to_string())),
        }
    }

    /// Which of `ids` the server holds for this client.
    pub async fn have(&mut self, ids: &[ObjectId]) -> Result<Vec<bool>, Error> {
        let mut out = Vec::with_capacity(ids.len());
        for batch in ids.chunks(MAX_IDS) {
            let doing = "asking which chunks the server holds";
            let answer = self
                .ask(
                    RepoRequest::Have {
                        ids: batch.to_vec(),
                    },
                    doing,
                )
                .await?;
            let RepoResponse::HaveAnswer { have } = answer else {
                return Err(self.protocol(format!("{answer:?} while {doing}")));
            };
            out.extend(
                rules::have_answer(batch.len(), have).map_err(|e| self.protocol(e.to_string()))?,
            );
        }
        Ok(out)
    }

    /// Sends the next bytes of the open pack (opening one).
    pub async fn pack_data(&mut self, content: Bytes) -> Result<(), Error> {
        self.send(RepoRequest::PackData { content }, "sending a pack")
            .await
    }

    /// Closes the open pack with its index; returns how many objects were new.
    pub async fn pack_end(&mut self, entries: Vec<PackEntry>) -> Result<u32, Error> {
        let doing = "storing a pack";
        match self.ask(RepoRequest::PackEnd { entries }, doing).await? {
            RepoResponse::PackStored { added } => Ok(added),
            RepoResponse::QuotaExceeded {
                stored,
                quota,
                size,
            } => Err(Error::QuotaExceeded {
                server: self.server.clone(),
                stored: Some(stored),
                quota: Some(quota),
                size: Some(size),
                file: None,
            }),
            other => Err(self.protocol(format!("{other:?} while {doing}"))),
        }
    }

    /// Stages the references of the snapshot to commit; returns how many
    /// the server does not hold.
    pub async fn stage(&mut self, ids: impl IntoIterator<Item = &ObjectId>) -> Result<u64, Error> {
        let mut missing = 0u64;
        let mut ids = ids.into_iter().peekable();
        while ids.peek().is_some() {
            let batch: Vec<ObjectId> = ids.by_ref().take(MAX_IDS).copied().collect();
            let doing = "sending the snapshot's references";
            match self
                .ask(RepoRequest::SnapshotRefs { ids: batch }, doing)
                .await?
            {
                RepoResponse::RefsStaged { missing: m } => missing += u64::from(m),
                other => return Err(self.protocol(format!("{other:?} while {doing}"))),
            }
        }
        Ok(missing)
    }

    /// Commits the staged snapshot.
    pub async fn commit(
        &mut self,
        time: u64,
        meta: Vec<u8>,
    ) -> Result<Result<u64, (CommitRefusal, u32)>, Error> {
        let doing = "committing the snapshot";
        match self
            .ask(
                RepoRequest::SnapshotCommit {
                    time,
                    meta: Bytes::from(meta),
                },
                doing,
            )
            .await?
        {
            RepoResponse::SnapshotCommitted { id } => Ok(Ok(id)),
            RepoResponse::SnapshotRefused { reason, missing } => Ok(Err((reason, missing))),
            other => Err(self.protocol(format!("{other:?} while {doing}"))),
        }
    }

    /// Every snapshot of this client, oldest first.
    pub async fn snapshots(&mut self) -> Result<Vec<SnapshotEntry>, Error> {
        let mut out = Vec::new();
        let mut cursor = 0;
        loop {
            let doing = "listing snapshots";
            match self.ask(RepoRequest::Snapshots { cursor }, doing).await? {
                RepoResponse::SnapshotPage {
                    next_cursor,
                    entries,
                } => {
                    out.extend(entries);
                    if next_cursor == 0 {
                        return Ok(out);
                    }
                    if next_cursor <= cursor || out.len() > crate::retrieval::MAX_LISTED {
                        return Err(
                            self.protocol("a snapshot listing that does not advance".into())
                        );
                    }
                    cursor = next_cursor;
                }
                other => return Err(self.protocol(format!("{other:?} while {doing}"))),
            }
        }
    }

    /// The sealed bytes of `ids`, in order, [`MAX_FETCH_IDS`] a request.
    pub async fn fetch(&mut self, ids: &[ObjectId]) -> Result<Vec<Fetched>, Error> {
        let mut out = Vec::with_capacity(ids.len());
        for batch in ids.chunks(MAX_FETCH_IDS) {
            let mut receiver = self.fetch_begin(batch).await?;
            while let Some(f) = self.fetch_next(&mut receiver).await? {
                out.push(f);
            }
        }
        Ok(out)
    }

    /// Asks for `ids` (1 to [`MAX_FETCH_IDS`]); their answers are then
    /// read one object at a time with [`Remote::fetch_next`], so that
    /// memory holds one object, not the whole answer.
    pub async fn fetch_begin(&mut self, ids: &[ObjectId]) -> Result<FetchReceiver, Error> {
        self.send(RepoRequest::Fetch { ids: ids.to_vec() }, "fetching objects")
            .await?;
        Ok(FetchReceiver::new(ids))
    }

    /// The next answer of the fetch `receiver` tracks, in the order asked;
    /// `None` once every id is answered.
    ///
    /// # Errors
    /// [`Error::ServerFailed`] when the server answers 1607 (it could not
    /// read an object, and ends the connection); else as any exchange.
    pub async fn fetch_next(
        &mut self,
        receiver: &mut FetchReceiver,
    ) -> Result<Option<Fetched>, Error> {
        let doing = "fetching objects";
        while !receiver.done() {
            let response = self.conn.recv(doing).await?;
            if matches!(response, Response::GeneralError) {
                return Err(Error::ServerFailed {
                    server: self.server.clone(),
                    request: doing.to_owned(),
                    times: 1,
                });
            }
            if let Some(f) = receiver
                .handle(response)
                .map_err(|e| self.protocol(e.to_string()))?
            {
                self.answered = true;
                return Ok(Some(f));
            }
        }
        Ok(None)
    }

    /// Stores a key envelope in `slot`; `false` when the slot is written
    /// once and already held one, which was kept.
    pub async fn put_key(&mut self, slot: u8, envelope: Vec<u8>) -> Result<bool, Error> {
        let doing = "storing the key envelope";
        match self
            .ask(
                RepoRequest::PutKey {
                    slot,
                    envelope: Bytes::from(envelope),
                },
                doing,
            )
            .await?
        {
            RepoResponse::KeyStored { slot: s } if s == slot => Ok(true),
            RepoResponse::KeyExists { slot: s } if s == slot => Ok(false),
            other => Err(self.protocol(format!("{other:?} while {doing}"))),
        }
    }

    /// This client's key envelopes.
    pub async fn keys(&mut self) -> Result<Vec<KeySlot>, Error> {
        let doing = "fetching the key envelopes";
        match self.ask(RepoRequest::GetKeys, doing).await? {
            RepoResponse::Keys { slots } => Ok(slots),
            other => Err(self.protocol(format!("{other:?} while {doing}"))),
        }
    }

    /// Removes the envelope in `slot`; the reason when the server kept it.
    pub async fn delete_key(&mut self, slot: u8) -> Result<Result<(), KeptReason>, Error> {
        let doing = "removing the key envelope";
        match self.ask(RepoRequest::DeleteKey { slot }, doing).await? {
            RepoResponse::KeyDeleted { slot: s } if s == slot => Ok(Ok(())),
            RepoResponse::KeyKept { slot: s, reason } if s == slot => Ok(Err(reason)),
            other => Err(self.protocol(format!("{other:?} while {doing}"))),
        }
    }

    /// Removes this client's snapshots `ids`, [`MAX_FORGET`] at a time;
    /// returns how many the server removed.
    ///
    /// # Errors
    /// [`Error::ForgetAppendOnly`] when the server refuses; a connection
    /// or protocol failure.
    pub async fn forget(&mut self, ids: &[u64]) -> Result<u64, Error> {
        let doing = "forgetting snapshots";
        let mut removed = 0u64;
        for batch in ids.chunks(protocol::repo::message::MAX_FORGET) {
            match self
                .ask(
                    RepoRequest::Forget {
                        ids: batch.to_vec(),
                    },
                    doing,
                )
                .await?
            {
                RepoResponse::Forgotten { count } => removed += u64::from(count),
                RepoResponse::ForgetRefused { reason } => {
                    return Err(
                        if reason == protocol::repo::message::ForgetRefusal::APPEND_ONLY {
                            Error::ForgetAppendOnly {
                                server: self.server.clone(),
                            }
                        } else {
                            Error::Refused {
                                server: self.server.clone(),
                                doing: doing.into(),
                                reason: reason.0,
                            }
                        },
                    )
                }
                other => return Err(self.protocol(format!("{other:?} while {doing}"))),
            }
        }
        Ok(removed)
    }

    pub async fn close(self) {
        self.conn.close().await;
    }
}
