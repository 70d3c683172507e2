// Over 600 lines: one state machine (binding, upload, proofs, retrieval) whose states must be read together.
//! The server side of a session.
//!
//! ```text
//! Unbound --Register--> [Action::Register] --Created--> Bound --PublicKey--> [Action::StoreKey] --> Keyed
//! Unbound --Reconnect--> [Action::LookupClient] --known, has key--> Keyed   (else 1606, still Unbound)
//! (a public key is accepted only on the connection that registered the client)
//! Keyed --SendFile 1..N--> [Action::Write ... last: 1603] --> AwaitingVerdict
//! AwaitingVerdict --CrcOk--> [Action::Commit] --> Keyed
//! AwaitingVerdict --CrcRetry--> [Action::Discard] --> Keyed (a resend follows)
//! AwaitingVerdict --CrcAbort--> [Action::Discard] --> Keyed
//! Keyed --Prove (valid, derived from the session's AES key)--> 1650 --> Keyed, retrieval allowed
//! Keyed --Prove (invalid)--> 1651, connection closed
//! not proven --List / Restore / Delete--> 1651, connection closed
//! ```
//!
//! On the legacy listener a reconnect proves nothing (the id and name travel
//! in the clear), so retrieval waits for the proof of `docs/PROTOCOL.md`
//! §11.5; uploads do not, as deployed version 3 clients never send it.
//!
//! Any request that does not fit the state is a [`SessionError`]: the shell
//! answers [`SessionError::answer`] (1607, or 1651 when a proof is missing or
//! wrong) and ends the connection.
//!
//! Secure mode (`docs/PROTOCOL.md` §12), built with [`ServerSession::secure`]:
//!
//! ```text
//! Unbound --RegisterKey--> [Action::Register] --Created--> 1602 (wrapped secret) --> Proving
//! Unbound --Reconnect--> [Action::LookupClient] --known--> 1605 (wrapped secret) --> Proving
//! Proving --Prove (valid)--> 1650 --> Keyed (content key derived from the secret)
//! Proving --Prove (invalid) or any other request--> 1651, connection closed
//! ```
//!
//! In secure mode no file, verdict or retrieval request is served before the
//! proof is accepted.
//!
//! A passphrase login (`docs/PROTOCOL.md` §13.6), for a client that lost
//! its RSA key:
//!
//! ```text
//! Unbound --PassphraseLogin--> [RepoAction::FindPassphrase] --found--> 1672 (challenge) --> PassphraseAwaiting
//!                                                           --none / over the rate--> 1673, still Unbound (no second try)
//! PassphraseAwaiting --PassphraseProve (valid)--> 1650 --> ReadOnly
//! PassphraseAwaiting --PassphraseProve (invalid) or any other request--> 1651, connection closed
//! ReadOnly: only Have, Snapshots, Fetch and GetKeys; anything else 1651, connection closed
//! ```
//!
//! Retrieval (`docs/PROTOCOL.md` §11), once allowed:
//!
//! ```text
//! List --> [Action::List] --listed--> 1640 (a page; next_cursor 0 on the last)
//! Restore --> [Action::FindVersion] --found_version--> 1644, or a RestoreSender (1641, 1642...)
//! Delete --> [Action::Delete] --deleted--> 1643 / 1644 / 1645
//! ```

use bytes::BytesMut;
use rsa::RsaPublicKey;

use crate::cksum::Cksum;
use crate::crypto::{self, AesKey, CbcDecryptor};
use crate::limits::Limits;
use crate::message::{FilePacket, PublicKeyField, Request, RequestFrame, Response};
use crate::name::{FileName, UserName};
use crate::reassembly::{Leniency, Reassembler, ReassemblyError};
use crate::restore::{self, FoundVersion, RestoreSender};
use crate::retrieval::{
    ListEntry, RefusalReason, RetrievalRequest, RetrievalResponse, MAX_LIST_ENTRIES,
};
use crate::secure::{
    verify_legacy_retrieval_proof, Binding, SessionSecret, MIN_SECURE_REGISTER_BITS,
};
use crate::session::MAX_SEND_ATTEMPTS;

/// The most file names one session may have with attempts outstanding
/// (neither committed nor given up on); bounds the attempt table.
const MAX_OPEN_NAMES: usize = 1024;
use crate::wire::{ClientId, Dialect, Numbering, RequestKind};

mod repo;
pub use repo::{PassphraseLookup, RepoAction, RepoOutcome, SNAPSHOT_PAGE_ENTRIES};

/// How the server answers where legacy servers disagree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerConfig {
    /// Answer "CRC wrong, will resend" (1030/901) with 1604, as most deployed
    /// servers do; `false` stays silent, as the assignment text reads.
    pub reply_to_crc_retry: bool,
    /// Limits on packets, files and names.
    pub limits: Limits,
    /// Entries per list page: [`MAX_LIST_ENTRIES`] (§11.2); smaller only in
    /// tests, never more.
    pub list_page: usize,
    /// Ciphertext bytes per 1642 packet, before the packet limit and the
    /// block alignment of [`restore::packet_len`].
    pub restore_packet: usize,
    /// Deviations of deployed legacy clients to absorb (`docs/PROTOCOL.md`
    /// §9); all on by default. Secure mode absorbs none, whatever this says.
    pub leniency: Leniency,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            reply_to_crc_retry: true,
            limits: Limits::default(),
            list_page: MAX_LIST_ENTRIES,
            restore_packet: restore::PACKET,
            leniency: Leniency::default(),
        }
    }
}

/// A request that breaks the protocol in the session's current state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error("{request:?} is not allowed {state}")]
    Unexpected {
        request: RequestKind,
        state: &'static str,
    },
    #[error("header client id {got} does not match the session's {expected}")]
    ClientIdMismatch { expected: ClientId, got: ClientId },
    #[error("name {got:?} does not match the session's {expected:?}")]
    NameMismatch { expected: UserName, got: UserName },
    #[error("verdict names {got:?} but the file received was {expected:?}")]
    FileMismatch { expected: FileName, got: FileName },
    #[error("invalid public key: {0}")]
    PublicKey(String),
    #[error("upload: {0}")]
    Upload(#[from] ReassemblyError),
    #[error("more than {MAX_SEND_ATTEMPTS} attempts to send {0:?}")]
    TooManyAttempts(FileName),
    #[error("a storage outcome was reported while none was awaited")]
    NoPendingAction,
    #[error("{0:?} before the client proved its key")]
    NotAuthenticated(RequestKind),
    #[error("the proof of the client's key is wrong")]
    ProofRejected,
    #[error("pack: {0}")]
    Pack(crate::repo::pack::PackError),
    #[error("{0:?} on a connection that logged in with a passphrase, which may only read")]
    ReadOnly(RequestKind),
    #[error("slot {0} holds only a passphrase envelope, and this is not one")]
    NotAPassphraseEnvelope(u8),
}

impl SessionError {
    /// The answer the peer gets before the connection closes: 1651 for a
    /// missing or wrong proof (secure mode, or retrieval on the legacy
    /// listener), 1607 for everything else.
    pub fn answer(&self) -> Response {
        match self {
            SessionError::NotAuthenticated(_)
            | SessionError::ProofRejected
            | SessionError::ReadOnly(_) => Response::NotAuthenticated,
            _ => Response::GeneralError,
        }
    }
}

/// The start of a new upload, for the shell to open a temporary file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileStart {
    pub file: FileName,
    pub orig_size: u64,
    /// 1 for the first attempt at this name in this session, up to 4.
    pub attempt: u8,
}

/// What the shell must do for a request.
#[derive(Debug)]
pub enum Action {
    /// Send this response; nothing else to do.
    Reply(Response),
    /// Create a client with this fresh id and name, then call
    /// [`ServerSession::registered`]. In secure mode `secure_key` is the
    /// public key (SubjectPublicKeyInfo DER) to bind to the name in the same
    /// step; a client so registered is not served on the legacy listener.
    Register {
        client_id: ClientId,
        name: UserName,
        secure_key: Option<bytes::Bytes>,
    },
    /// Store the client's public key, then call [`ServerSession::key_stored`].
    StoreKey {
        client_id: ClientId,
        name: UserName,
        key: PublicKeyField,
    },
    /// Look the client up, then call [`ServerSession::looked_up`].
    LookupClient { client_id: ClientId, name: UserName },
    /// Append `plaintext` to the upload's temporary file (opening one first
    /// when `start` is set). When `done` is set, the upload is complete: make
    /// the temporary file durable, then send `done` (1603).
    Write {
        start: Option<FileStart>,
        plaintext: BytesMut,
        done: Option<Response>,
    },
    /// The client confirmed the cksum: commit the temporary file as the
    /// stored version of `file`, then send `reply` (1604).
    Commit {
        client_id: ClientId,
        file: FileName,
        size: u64,
        cksum: u32,
        reply: Response,
    },
    /// Drop the temporary file, then send `reply` if any.
    Discard { reply: Option<Response> },
    /// List request (1240): fetch at most `limit` versions of `client_id`
    /// in list order (name, then version), skipping the first `skip`; only
    /// the latest of each name unless `all_versions`. Then call
    /// [`ServerSession::listed`] (or [`ServerSession::storage_failed`]).
    List {
        client_id: ClientId,
        all_versions: bool,
        skip: u64,
        limit: usize,
    },
    /// Restore request (1241): find `version` of `file` (0: the latest),
    /// then call [`ServerSession::found_version`] (or
    /// [`ServerSession::storage_failed`]).
    FindVersion {
        client_id: ClientId,
        file: FileName,
        version: u64,
    },
    /// Delete request (1242): delete every version of `file` unless the
    /// store is append-only, then call [`ServerSession::deleted`] (or
    /// [`ServerSession::storage_failed`]).
    Delete { client_id: ClientId, file: FileName },
    /// A request of the repository extension (`docs/PROTOCOL.md` §13).
    Repo(RepoAction),
}

/// What storage did with a delete request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteOutcome {
    /// This many versions were removed (at least one).
    Deleted(u32),
    /// No version of that name.
    NotFound,
    /// The store is append-only.
    Refused,
}

/// The answer to a restore request.
#[derive(Debug)]
pub enum RestoreStart {
    /// Nothing to send but this (1644).
    Answer(Response),
    /// Send [`RestoreSender::begin`], then the content through the sender
    /// (boxed: it holds the cipher's key schedule).
    Send(Box<RestoreSender>),
}

/// What storage said about a registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegisterOutcome {
    Created,
    NameTaken,
    Failed,
}

/// What storage knows about a client that reconnects.
#[derive(Debug, Clone)]
pub struct KnownClient {
    pub name: UserName,
    /// The key sent on the legacy listener (1026/826), if any.
    pub public_key: Option<PublicKeyField>,
    /// The key bound at a secure-mode registration, if any (DER).
    pub secure_key: Option<bytes::Bytes>,
}

#[derive(Debug)]
enum Pending {
    Register {
        client_id: ClientId,
        name: UserName,
        secure_key: Option<Box<RsaPublicKey>>,
    },
    StoreKey {
        public: Box<RsaPublicKey>,
    },
    Lookup {
        client_id: ClientId,
        name: UserName,
    },
    List {
        cursor: u64,
        page: usize,
    },
    FindVersion,
    Delete,
    Repo,
    Passphrase {
        name: UserName,
    },
}

struct Receiving {
    file: FileName,
    decryptor: CbcDecryptor,
    cksum: Cksum,
}

#[derive(Debug, Clone)]
struct Received {
    file: FileName,
    size: u64,
    cksum: u32,
    /// Padding and size checked out; a file that fails this is never committed.
    intact: bool,
}

/// Where a session stands with the client's proof of possession.
enum Proof {
    /// Legacy, no proof accepted yet: uploads are served once keyed,
    /// retrieval is not (§11.5).
    Legacy,
    /// No secret sent yet.
    Unsent,
    /// The wrapped secret was sent; the proof is due.
    Awaiting(SessionSecret),
    /// The proof was accepted (in either dialect).
    Proven,
    /// A passphrase login was offered its challenge; the signature is due.
    PassphraseAwaiting {
        head: crate::repo::envelope::PassphraseHead,
        challenge: [u8; crate::repo::message::CHALLENGE_LEN],
    },
    /// The passphrase login was accepted: the session may read only.
    ReadOnly,
}

/// The server's view of one connection.
pub struct ServerSession {
    config: ServerConfig,
    dialect: Dialect,
    /// The TLS channel binding (secure mode).
    binding: Binding,
    proof: Proof,
    client: Option<(ClientId, UserName)>,
    key: Option<AesKey>,
    numbering: Option<Numbering>,
    pending: Option<Pending>,
    reassembler: Reassembler,
    receiving: Option<Receiving>,
    received: Option<Received>,
    /// The file whose commit was the last thing this session did, so that a
    /// repeated "CRC ok" for it can be answered 1604 again
    /// ([`Leniency::repeated_crc_ok`]).
    committed: Option<FileName>,
    /// Attempts at each file name not yet committed or given up on in this
    /// session, so alternating names does not reset a name's count.
    attempts: std::collections::HashMap<FileName, u8>,
    /// The client registered on this connection (rather than reconnected),
    /// so it may send its public key.
    registered_here: bool,
    /// A plaintext buffer handed back by the shell, reused for the next
    /// packet of the current upload.
    spare: Option<BytesMut>,
    /// The open pack and staged snapshot references (§13).
    repo: repo::RepoState,
    /// A passphrase login was asked on this connection: one per connection.
    passphrase_asked: bool,
}

impl std::fmt::Debug for ServerSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerSession")
            .field("client", &self.client)
            .field("keyed", &self.key.is_some())
            .field("pending", &self.pending)
            .field("upload", &self.reassembler.upload())
            .finish_non_exhaustive()
    }
}

impl ServerSession {
    /// A legacy (version 3) session for a new connection.
    pub fn new(config: ServerConfig) -> Self {
        Self::build(config, Dialect::Legacy, [0; 32], Proof::Legacy)
    }

    /// A secure-mode session for a new TLS connection whose exporter value
    /// (`docs/PROTOCOL.md` §12.4) is `binding`.
    pub fn secure(config: ServerConfig, binding: Binding) -> Self {
        Self::build(config, Dialect::Secure, binding, Proof::Unsent)
    }

    fn build(config: ServerConfig, dialect: Dialect, binding: Binding, proof: Proof) -> Self {
        let config = ServerConfig {
            limits: config.limits.for_dialect(dialect),
            leniency: match dialect {
                Dialect::Legacy => config.leniency,
                Dialect::Secure => Leniency::STRICT,
            },
            ..config
        };
        Self {
            reassembler: Reassembler::lenient(config.limits, config.leniency),
            dialect,
            binding,
            proof,
            config,
            client: None,
            key: None,
            numbering: None,
            pending: None,
            receiving: None,
            received: None,
            committed: None,
            attempts: std::collections::HashMap::new(),
            registered_here: false,
            spare: None,
            repo: repo::RepoState::default(),
            passphrase_asked: false,
        }
    }

    /// The client this connection speaks for, once registered or reconnected.
    pub fn client(&self) -> Option<(ClientId, &UserName)> {
        self.client.as_ref().map(|(id, name)| (*id, name))
    }

    /// The dialect of this session.
    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// Whether the client may make file requests: in legacy mode once
    /// keyed, in secure mode once its proof was accepted.
    pub fn authenticated(&self) -> bool {
        (matches!(self.proof, Proof::Legacy | Proof::Proven) && self.key.is_some())
            || matches!(self.proof, Proof::ReadOnly)
    }

    /// Whether the client logged in with its passphrase, and so may only
    /// read (§13.6).
    pub fn read_only(&self) -> bool {
        matches!(self.proof, Proof::ReadOnly)
    }

    /// Whether the client may make retrieval requests: in either mode once
    /// its proof was accepted.
    pub fn may_retrieve(&self) -> bool {
        matches!(self.proof, Proof::Proven) && self.key.is_some()
    }

    /// The numbering the client used first (for logs).
    pub fn numbering(&self) -> Option<Numbering> {
        self.numbering
    }

    /// Whether an upload's content has been received and not yet committed
    /// or discarded (the shell holds a temporary file).
    pub fn has_uncommitted_upload(&self) -> bool {
        self.receiving.is_some() || self.received.is_some()
    }

    fn state(&self) -> &'static str {
        match (&self.client, &self.key, &self.receiving, &self.received) {
            (None, _, _, _) => "before register or reconnect",
            (Some(_), None, _, _) => "before the key exchange",
            (_, _, Some(_), _) => "during an upload",
            (_, _, _, Some(_)) => "while a cksum verdict is due",
            _ => "now",
        }
    }

    fn unexpected(&self, request: RequestKind) -> SessionError {
        SessionError::Unexpected {
            request,
            state: self.state(),
        }
    }

    /// Handles one decoded request.
    ///
    /// # Errors
    /// When the request breaks the protocol in the current state. The shell
    /// answers [`SessionError::answer`] and closes the connection.
    pub fn handle<R: rand::CryptoRng + rand::RngCore>(
        &mut self,
        frame: RequestFrame,
        rng: &mut R,
    ) -> Result<Action, SessionError> {
        let kind = frame.request.kind();
        if self.pending.is_some() {
            return Err(self.unexpected(kind));
        }
        if self.has_open_pack()
            && !matches!(
                frame.request,
                Request::Repo(
                    crate::repo::RepoRequest::PackData { .. }
                        | crate::repo::RepoRequest::PackEnd { .. }
                        | crate::repo::RepoRequest::Have { .. }
                )
            )
        {
            return Err(self.unexpected(kind));
        }
        self.numbering.get_or_insert(frame.numbering);
        let secure = self.dialect == Dialect::Secure;
        if secure {
            self.secure_gate(kind)?;
        }
        // Legacy: a reconnect proves nothing, so retrieval waits for the
        // proof (§11.5).
        if !secure
            && matches!(
                kind,
                RequestKind::List | RequestKind::Restore | RequestKind::Delete
            )
            && !matches!(self.proof, Proof::Proven)
        {
            return Err(SessionError::NotAuthenticated(kind));
        }
        match frame.request {
            Request::Register { name } if !secure => {
                if self.client.is_some() {
                    return Err(self.unexpected(kind));
                }
                let client_id = ClientId::random(rng);
                self.pending = Some(Pending::Register {
                    client_id,
                    name: name.clone(),
                    secure_key: None,
                });
                Ok(Action::Register {
                    client_id,
                    name,
                    secure_key: None,
                })
            }
            Request::RegisterKey { name, key } if secure => {
                if self.client.is_some() {
                    return Err(self.unexpected(kind));
                }
                let public = crypto::parse_public_key_der(&key)
                    .map_err(|e| SessionError::PublicKey(e.to_string()))?;
                // The modulus's own size, not its length in whole bytes.
                let bits = rsa::traits::PublicKeyParts::n(&public).bits();
                if bits < MIN_SECURE_REGISTER_BITS {
                    return Err(SessionError::PublicKey(format!(
                        "{bits}-bit key; secure registration needs at least {MIN_SECURE_REGISTER_BITS} bits"
                    )));
                }
                let client_id = ClientId::random(rng);
                self.pending = Some(Pending::Register {
                    client_id,
                    name: name.clone(),
                    secure_key: Some(Box::new(public)),
                });
                Ok(Action::Register {
                    client_id,
                    name,
                    secure_key: Some(key),
                })
            }
            Request::Register { .. } | Request::RegisterKey { .. } => Err(self.unexpected(kind)),
            Request::Prove { proof } if !secure => {
                let client_id = self.bound(kind, frame.client_id)?;
                self.prove_legacy(kind, client_id, &proof)
            }
            Request::Prove { proof } => {
                let client_id = self.bound(kind, frame.client_id)?;
                if !matches!(self.proof, Proof::Awaiting(_)) {
                    return Err(self.unexpected(kind));
                }
                let Proof::Awaiting(secret) = std::mem::replace(&mut self.proof, Proof::Unsent)
                else {
                    return Err(self.unexpected(kind));
                };
                if !secret.verify(client_id, &self.binding, &proof) {
                    return Err(SessionError::ProofRejected);
                }
                self.key = Some(secret.content_key());
                self.proof = Proof::Proven;
                Ok(Action::Reply(Response::Authenticated { client_id }))
            }
            Request::Reconnect { name } => {
                if self.client.is_some() {
                    return Err(self.unexpected(kind));
                }
                let client_id = frame.client_id;
                self.pending = Some(Pending::Lookup {
                    client_id,
                    name: name.clone(),
                });
                Ok(Action::LookupClient { client_id, name })
            }
            Request::PublicKey { .. } if secure => Err(self.unexpected(kind)),
            Request::PublicKey { name, key } => {
                let client_id = self.bound(kind, frame.client_id)?;
                self.check_name(&name)?;
                // Only the connection that registered the client may set its
                // key: a reconnect proves nothing (the id is not a secret),
                // so accepting a key after it would hand the account to
                // anyone who knows the id and name.
                if !self.registered_here || self.key.is_some() || self.has_uncommitted_upload() {
                    return Err(self.unexpected(kind));
                }
                let public = crypto::parse_public_key(&key)
                    .map_err(|e| SessionError::PublicKey(e.to_string()))?;
                self.pending = Some(Pending::StoreKey {
                    public: Box::new(public),
                });
                Ok(Action::StoreKey {
                    client_id,
                    name,
                    key,
                })
            }
            Request::SendFile(packet) => {
                self.bound(kind, frame.client_id)?;
                if self.key.is_none() || self.received.is_some() {
                    return Err(self.unexpected(kind));
                }
                self.packet(packet)
            }
            Request::CrcOk { file } => {
                let client_id = self.bound(kind, frame.client_id)?;
                // A client that resends "CRC ok" until it gets the answer it
                // expects: the file is committed, so answering again changes
                // nothing (`docs/PROTOCOL.md` §9).
                if self.config.leniency.repeated_crc_ok
                    && self.received.is_none()
                    && self.receiving.is_none()
                    && self.committed.as_ref() == Some(&file)
                {
                    return Ok(Action::Reply(Response::Ack { client_id }));
                }
                let received = self.take_received(kind, &file)?;
                if !received.intact {
                    // The client says the cksum matched a file whose padding
                    // or size was wrong: it cannot be what the client sent.
                    return Ok(Action::Discard {
                        reply: Some(Response::GeneralError),
                    });
                }
                self.attempts.remove(&file);
                self.committed = Some(file.clone());
                Ok(Action::Commit {
                    client_id,
                    file,
                    size: received.size,
                    cksum: received.cksum,
                    reply: Response::Ack { client_id },
                })
            }
            Request::CrcRetry { file } => {
                let client_id = self.bound(kind, frame.client_id)?;
                self.take_received(kind, &file)?;
                let reply = self
                    .config
                    .reply_to_crc_retry
                    .then_some(Response::Ack { client_id });
                Ok(Action::Discard { reply })
            }
            Request::CrcAbort { file } => {
                let client_id = self.bound(kind, frame.client_id)?;
                self.take_received(kind, &file)?;
                // The client gave up on this name; a new series of attempts
                // may follow (a later run of the client does the same).
                self.attempts.remove(&file);
                Ok(Action::Discard {
                    reply: Some(Response::Ack { client_id }),
                })
            }
            Request::Retrieval(request) => {
                let client_id = self.bound(kind, frame.client_id)?;
                if self.key.is_none() || self.has_uncommitted_upload() {
                    return Err(self.unexpected(kind));
                }
                Ok(self.retrieval(client_id, request))
            }
            Request::Repo(crate::repo::RepoRequest::PassphraseLogin { name }) => {
                if !secure
                    || self.client.is_some()
                    || self.passphrase_asked
                    || !matches!(self.proof, Proof::Unsent)
                {
                    return Err(self.unexpected(kind));
                }
                self.passphrase_asked = true;
                self.pending = Some(Pending::Passphrase { name: name.clone() });
                Ok(Action::Repo(RepoAction::FindPassphrase { name }))
            }
            Request::Repo(crate::repo::RepoRequest::PassphraseProve { signature }) => {
                let client_id = self.bound(kind, frame.client_id)?;
                let Proof::PassphraseAwaiting { head, challenge } =
                    std::mem::replace(&mut self.proof, Proof::Unsent)
                else {
                    return Err(self.unexpected(kind));
                };
                if !head.verify_login(client_id, &challenge, &self.binding, &signature) {
                    return Err(SessionError::ProofRejected);
                }
                self.proof = Proof::ReadOnly;
                Ok(Action::Reply(Response::Authenticated { client_id }))
            }
            Request::Repo(request) => {
                let client_id = self.bound(kind, frame.client_id)?;
                let ready = self.key.is_some() || matches!(self.proof, Proof::ReadOnly);
                if !secure || !ready || self.has_uncommitted_upload() {
                    return Err(self.unexpected(kind));
                }
                self.repo_request(client_id, request)
            }
        }
    }

    /// Secure mode: what may come before a proof, and what a passphrase
    /// login may do (§12.3, §13.6).
    fn secure_gate(&self, kind: RequestKind) -> Result<(), SessionError> {
        use crate::repo::RepoKind as R;
        match self.proof {
            Proof::Proven => Ok(()),
            Proof::ReadOnly => match kind {
                RequestKind::Repo(R::Have | R::Snapshots | R::Fetch | R::GetKeys) => Ok(()),
                _ => Err(SessionError::ReadOnly(kind)),
            },
            _ => match kind {
                RequestKind::Register
                | RequestKind::Reconnect
                | RequestKind::Prove
                | RequestKind::Repo(R::PassphraseLogin | R::PassphraseProve) => Ok(()),
                _ => Err(SessionError::NotAuthenticated(kind)),
            },
        }
    }

    /// Legacy: checks the proof derived from the session's AES key
    /// (§11.5). Due once keyed, at most once, and not during an upload.
    fn prove_legacy(
        &mut self,
        kind: RequestKind,
        client_id: ClientId,
        proof: &[u8],
    ) -> Result<Action, SessionError> {
        let Some(key) = self.key.as_ref() else {
            return Err(self.unexpected(kind));
        };
        if !matches!(self.proof, Proof::Legacy) || self.has_uncommitted_upload() {
            return Err(self.unexpected(kind));
        }
        if !verify_legacy_retrieval_proof(key, client_id, proof) {
            return Err(SessionError::ProofRejected);
        }
        self.proof = Proof::Proven;
        Ok(Action::Reply(Response::Authenticated { client_id }))
    }

    /// The storage action for an allowed retrieval request. A list asks
    /// for one entry more than a page, so that the answer can say whether
    /// another page follows (§11.2).
    fn retrieval(&mut self, client_id: ClientId, request: RetrievalRequest) -> Action {
        match request {
            RetrievalRequest::List { flags, cursor } => {
                let page = self.config.list_page.clamp(1, MAX_LIST_ENTRIES);
                self.pending = Some(Pending::List { cursor, page });
                Action::List {
                    client_id,
                    all_versions: flags.all_versions(),
                    skip: cursor,
                    limit: page + 1,
                }
            }
            RetrievalRequest::Restore { version, file } => {
                self.pending = Some(Pending::FindVersion);
                Action::FindVersion {
                    client_id,
                    file,
                    version,
                }
            }
            RetrievalRequest::Delete { file } => {
                self.pending = Some(Pending::Delete);
                Action::Delete { client_id, file }
            }
        }
    }

    /// Reports the versions [`Action::List`] found and returns the page
    /// (1640): at most a page of them, with the cursor of the next page
    /// (the entries returned so far), or 0 when this page is the last
    /// (§11.2).
    ///
    /// # Errors
    /// When no list was pending.
    pub fn listed(&mut self, mut entries: Vec<ListEntry>) -> Result<Response, SessionError> {
        let Some(Pending::List { cursor, page }) = self.pending.take() else {
            return Err(SessionError::NoPendingAction);
        };
        let more = entries.len() > page;
        entries.truncate(page);
        let next_cursor = if more {
            cursor.saturating_add(page as u64)
        } else {
            0
        };
        Ok(Response::Retrieval(RetrievalResponse::ListPage {
            next_cursor,
            entries,
        }))
    }

    /// Reports the version [`Action::FindVersion`] found: `None` is
    /// answered 1644; a version is sent by the returned [`RestoreSender`],
    /// under the session key with a fresh IV from `rng` (§11.3).
    ///
    /// # Errors
    /// When no restore was pending.
    pub fn found_version<R: rand::CryptoRng + rand::RngCore>(
        &mut self,
        found: Option<FoundVersion>,
        rng: &mut R,
    ) -> Result<RestoreStart, SessionError> {
        let Some(Pending::FindVersion) = self.pending.take() else {
            return Err(SessionError::NoPendingAction);
        };
        let Some(found) = found else {
            return Ok(RestoreStart::Answer(Response::Retrieval(
                RetrievalResponse::NotFound,
            )));
        };
        let key = self.key.as_ref().ok_or(SessionError::NoPendingAction)?;
        let packet = restore::packet_len(
            self.config.restore_packet,
            self.config.limits.max_packet_content,
        );
        Ok(RestoreStart::Send(Box::new(RestoreSender::new(
            key, found, packet, rng,
        ))))
    }

    /// Reports what [`Action::Delete`] did and returns the answer: 1643
    /// with the count, 1644, or 1645 (append-only).
    ///
    /// # Errors
    /// When no delete was pending.
    pub fn deleted(&mut self, outcome: DeleteOutcome) -> Result<Response, SessionError> {
        let Some(Pending::Delete) = self.pending.take() else {
            return Err(SessionError::NoPendingAction);
        };
        Ok(Response::Retrieval(match outcome {
            DeleteOutcome::Deleted(versions) => RetrievalResponse::Deleted { versions },
            DeleteOutcome::NotFound => RetrievalResponse::NotFound,
            DeleteOutcome::Refused => RetrievalResponse::Refused {
                reason: RefusalReason::APPEND_ONLY,
            },
        }))
    }

    fn bound(&self, kind: RequestKind, header_id: ClientId) -> Result<ClientId, SessionError> {
        let (id, _) = self.client.as_ref().ok_or_else(|| self.unexpected(kind))?;
        if *id != header_id {
            return Err(SessionError::ClientIdMismatch {
                expected: *id,
                got: header_id,
            });
        }
        Ok(*id)
    }

    fn check_name(&self, name: &UserName) -> Result<(), SessionError> {
        match &self.client {
            Some((_, bound)) if bound != name => Err(SessionError::NameMismatch {
                expected: bound.clone(),
                got: name.clone(),
            }),
            _ => Ok(()),
        }
    }

    fn take_received(
        &mut self,
        kind: RequestKind,
        file: &FileName,
    ) -> Result<Received, SessionError> {
        let received = self.received.take().ok_or_else(|| self.unexpected(kind))?;
        if &received.file != file {
            return Err(SessionError::FileMismatch {
                expected: received.file,
                got: file.clone(),
            });
        }
        Ok(received)
    }

    fn packet(&mut self, packet: FilePacket) -> Result<Action, SessionError> {
        let file = packet.head.file.clone();
        let orig_size = packet.head.orig_size;
        let content_size = packet.head.content_size;
        let slice = self.reassembler.push(packet).inspect_err(|_| {
            self.receiving = None;
            self.spare = None;
        })?;
        let mut start = None;
        if slice.first {
            self.committed = None;
            if self.attempts.len() >= MAX_OPEN_NAMES && !self.attempts.contains_key(&file) {
                self.reassembler.reset();
                return Err(SessionError::TooManyAttempts(file));
            }
            let count = self.attempts.entry(file.clone()).or_insert(0);
            *count = count.saturating_add(1);
            let attempt = *count;
            if attempt > MAX_SEND_ATTEMPTS {
                self.reassembler.reset();
                return Err(SessionError::TooManyAttempts(file));
            }
            let key = self.key.as_ref().ok_or(SessionError::NoPendingAction)?;
            self.receiving = Some(Receiving {
                file: file.clone(),
                decryptor: CbcDecryptor::new(key),
                cksum: Cksum::new(),
            });
            start = Some(FileStart {
                file: file.clone(),
                orig_size,
                attempt,
            });
        }
        let receiving = self
            .receiving
            .as_mut()
            .ok_or(SessionError::NoPendingAction)?;
        let needed = slice.content.len() + crypto::BLOCK;
        let mut plaintext = match self.spare.take() {
            Some(buf) if buf.capacity() >= needed => buf,
            _ => BytesMut::with_capacity(needed),
        };
        receiving.decryptor.update(&slice.content, &mut plaintext);
        if !slice.last {
            receiving.cksum.update(&plaintext);
            return Ok(Action::Write {
                start,
                plaintext,
                done: None,
            });
        }
        let Receiving {
            decryptor,
            mut cksum,
            ..
        } = self.receiving.take().ok_or(SessionError::NoPendingAction)?;
        self.spare = None;
        let before = plaintext.len();
        let padded_ok = decryptor.finish(&mut plaintext).is_ok();
        if !padded_ok {
            // Bad padding: keep the decrypted bytes as they are. Their cksum
            // will not match the client's, which then resends.
            plaintext.truncate(before);
        }
        cksum.update(&plaintext);
        let size = cksum.len();
        let intact = padded_ok && size == orig_size;
        let cksum = cksum.finish();
        let (client_id, _) = self.client.as_ref().ok_or(SessionError::NoPendingAction)?;
        let done = Response::FileReceived {
            client_id: *client_id,
            content_size,
            file: file.clone(),
            cksum,
        };
        self.received = Some(Received {
            file,
            size,
            cksum,
            intact,
        });
        Ok(Action::Write {
            start,
            plaintext,
            done: Some(done),
        })
    }

    /// Reports the outcome of [`Action::Register`] and returns the answer:
    /// 1600 in legacy mode; in secure mode 1602 with a fresh secret wrapped
    /// for the key just bound, whose proof is due next.
    ///
    /// # Errors
    /// When no registration was pending.
    pub fn registered<R: rand::CryptoRng + rand::RngCore>(
        &mut self,
        outcome: RegisterOutcome,
        rng: &mut R,
    ) -> Result<Response, SessionError> {
        let Some(Pending::Register {
            client_id,
            name,
            secure_key,
        }) = self.pending.take()
        else {
            return Err(SessionError::NoPendingAction);
        };
        Ok(match outcome {
            RegisterOutcome::Created => {
                self.client = Some((client_id, name));
                self.registered_here = true;
                match secure_key {
                    None => Response::Registered { client_id },
                    Some(public) => match self.send_secret(&public, rng) {
                        Some(wrapped_key) => Response::KeyAccepted {
                            client_id,
                            wrapped_key,
                        },
                        None => Response::GeneralError,
                    },
                }
            }
            RegisterOutcome::NameTaken => Response::RegistrationFailed,
            RegisterOutcome::Failed => Response::GeneralError,
        })
    }

    /// Reports whether [`Action::StoreKey`] succeeded and returns the
    /// answer: a fresh AES key wrapped for the client (1602), or 1607.
    ///
    /// # Errors
    /// When no key was pending.
    pub fn key_stored<R: rand::CryptoRng + rand::RngCore>(
        &mut self,
        stored: bool,
        rng: &mut R,
    ) -> Result<Response, SessionError> {
        let Some(Pending::StoreKey { public }) = self.pending.take() else {
            return Err(SessionError::NoPendingAction);
        };
        let (client_id, _) = self.client.as_ref().ok_or(SessionError::NoPendingAction)?;
        let client_id = *client_id;
        if !stored {
            return Ok(Response::GeneralError);
        }
        Ok(match self.fresh_key(&public, rng) {
            Some(wrapped_key) => Response::KeyAccepted {
                client_id,
                wrapped_key,
            },
            None => Response::GeneralError,
        })
    }

    /// Reports what storage knows of a reconnecting client and returns the
    /// answer: 1605 with a fresh key, or 1606 when the id is unknown, the name
    /// differs, or no usable public key is on file.
    ///
    /// # Errors
    /// When no lookup was pending.
    pub fn looked_up<R: rand::CryptoRng + rand::RngCore>(
        &mut self,
        found: Option<KnownClient>,
        rng: &mut R,
    ) -> Result<Response, SessionError> {
        let Some(Pending::Lookup { client_id, name }) = self.pending.take() else {
            return Err(SessionError::NoPendingAction);
        };
        let rejected = Response::ReconnectRejected {
            client_id: Some(client_id),
        };
        let Some(known) = found.filter(|k| k.name == name) else {
            return Ok(rejected);
        };
        // The legacy listener serves only keys sent on it; a client that
        // registered in secure mode is never served without its proof.
        let public = match self.dialect {
            Dialect::Legacy => known
                .public_key
                .as_ref()
                .and_then(|k| crypto::parse_public_key(k).ok()),
            Dialect::Secure => match (&known.secure_key, &known.public_key) {
                (Some(der), _) => crypto::parse_public_key_der(der).ok(),
                (None, Some(field)) => crypto::parse_public_key(field).ok(),
                (None, None) => None,
            },
        };
        let Some(public) = public else {
            return Ok(rejected);
        };
        let wrapped = match self.dialect {
            Dialect::Legacy => self.fresh_key(&public, rng),
            Dialect::Secure => self.send_secret(&public, rng),
        };
        let Some(wrapped_key) = wrapped else {
            return Ok(rejected);
        };
        self.client = Some((client_id, name));
        Ok(Response::Reconnected {
            client_id,
            wrapped_key,
        })
    }

    /// Offers a plaintext buffer from an earlier [`Action::Write`] for the
    /// next packet of the upload in progress, sparing an allocation (and
    /// its page faults) per packet. Ignored outside an upload; dropped when
    /// the upload ends, so an idle session holds no buffer.
    pub fn recycle(&mut self, mut buf: BytesMut) {
        if self.receiving.is_none() {
            return;
        }
        buf.clear();
        if self
            .spare
            .as_ref()
            .is_none_or(|s| s.capacity() < buf.capacity())
        {
            self.spare = Some(buf);
        }
    }

    /// Reports that storage failed while carrying out a write, commit or
    /// retrieval: the upload or request is forgotten and the answer is 1607.
    /// The session stays usable, and an upload attempt so cut short does
    /// not count toward [`MAX_SEND_ATTEMPTS`], as the client counts it.
    pub fn storage_failed(&mut self) -> Response {
        self.spare = None;
        // A commit that failed stored nothing: a repeated "CRC ok" for it
        // is not answered 1604.
        self.committed = None;
        self.pending = None;
        self.reassembler.reset();
        self.repo_reset();
        let cut = match (self.receiving.take(), self.received.take()) {
            (Some(receiving), _) => Some(receiving.file),
            (None, Some(received)) => Some(received.file),
            (None, None) => None,
        };
        if let Some(count) = cut.and_then(|file| self.attempts.get_mut(&file)) {
            *count = count.saturating_sub(1);
        }
        Response::GeneralError
    }

    /// Reports that the client's quota refused the file being received or
    /// committed (`docs/PROTOCOL.md` §13.9): `size` more bytes would take
    /// the client, which stores `stored`, over `quota`. The upload is
    /// forgotten as by [`ServerSession::storage_failed`]. Secure mode
    /// answers 1682 with the figures; the legacy listener answers 1607,
    /// the only refusal a version 3 peer knows.
    pub fn quota_refused(&mut self, stored: u64, quota: u64, size: u64) -> Response {
        let general = self.storage_failed();
        match self.dialect {
            Dialect::Secure => Response::Repo(crate::repo::message::RepoResponse::QuotaExceeded {
                stored,
                quota,
                size,
            }),
            Dialect::Legacy => general,
        }
    }

    /// Secure mode: a fresh secret, wrapped for `public`; its proof is due.
    fn send_secret<R: rand::CryptoRng + rand::RngCore>(
        &mut self,
        public: &RsaPublicKey,
        rng: &mut R,
    ) -> Option<bytes::Bytes> {
        let secret = SessionSecret::random(rng);
        let wrapped = secret.wrap(rng, public).ok()?;
        self.proof = Proof::Awaiting(secret);
        Some(wrapped.into())
    }

    fn fresh_key<R: rand::CryptoRng + rand::RngCore>(
        &mut self,
        public: &RsaPublicKey,
        rng: &mut R,
    ) -> Option<bytes::Bytes> {
        let key = AesKey::random(rng);
        let wrapped = crypto::wrap_aes_key(rng, public, &key).ok()?;
        self.key = Some(key);
        Some(wrapped.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{encrypt_all, public_key_field, PrivateKey};
    use crate::message::PacketHead;
    use bytes::Bytes;
    use rand::SeedableRng;

    /// A secure registration (1025) carrying an RSA public key whose
    /// modulus has exactly `bits` bits (not a real key pair: parsing and the
    /// size checks do not look at the factors).
    fn register_key_of_bits(bits: usize) -> Result<Action, SessionError> {
        let n = (rsa::BigUint::from(1u8) << (bits - 1)) + 1u8;
        let public =
            RsaPublicKey::new_with_max_size(n, rsa::BigUint::from(65537u32), 16384).unwrap();
        let key = crypto::public_key_der(&public).unwrap();
        let mut s = ServerSession::secure(ServerConfig::default(), [7; 32]);
        let frame = RequestFrame {
            client_id: ClientId::default(),
            numbering: Numbering::Modern,
            request: Request::RegisterKey {
                name: UserName::try_from("k").unwrap(),
                key: key.into(),
            },
        };
        s.handle(frame, &mut rand::rngs::StdRng::seed_from_u64(3))
    }

    #[test]
    fn accepts_secure_registration_keys_of_3072_to_4096_bits() {
        for bits in [3072, 4096] {
            let action = register_key_of_bits(bits);
            assert!(matches!(action, Ok(Action::Register { .. })), "{bits}");
        }
    }

    #[test]
    fn rejects_secure_registration_keys_under_3072_or_over_4096_bits() {
        for (bits, why) in [
            (
                3071,
                "3071-bit key; secure registration needs at least 3072 bits",
            ),
            (4097, "4097 bits is above the 4096-bit maximum"),
            (8192, "8192 bits is above the 4096-bit maximum"),
        ] {
            let Err(err) = register_key_of_bits(bits) else {
                panic!("a {bits}-bit key was accepted");
            };
            assert!(err.to_string().contains(why), "{bits}: {err}");
        }
    }

    fn keyed() -> (ServerSession, ClientId, AesKey, rand::rngs::StdRng) {
        keyed_with(ServerConfig::default())
    }

    fn keyed_with(config: ServerConfig) -> (ServerSession, ClientId, AesKey, rand::rngs::StdRng) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let private = PrivateKey::generate_legacy(&mut rng).unwrap();
        let mut s = ServerSession::new(config);
        let name = UserName::try_from("u").unwrap();
        let frame = |client_id, request| RequestFrame {
            client_id,
            numbering: Numbering::Modern,
            request,
        };
        let Action::Register { client_id, .. } = s
            .handle(
                frame(
                    ClientId::default(),
                    Request::Register { name: name.clone() },
                ),
                &mut rng,
            )
            .unwrap()
        else {
            panic!("register")
        };
        s.registered(RegisterOutcome::Created, &mut rng).unwrap();
        let key = public_key_field(&private.public_key()).unwrap();
        s.handle(frame(client_id, Request::PublicKey { name, key }), &mut rng)
            .unwrap();
        let Response::KeyAccepted { wrapped_key, .. } = s.key_stored(true, &mut rng).unwrap()
        else {
            panic!("key")
        };
        let aes = private.unwrap_aes_key(&mut rng, &wrapped_key).unwrap();
        (s, client_id, aes, rng)
    }

    fn packet(
        client_id: ClientId,
        ct: &[u8],
        n: u32,
        total: u32,
        chunk: usize,
        orig: u64,
    ) -> RequestFrame {
        let start = (n - 1) as usize * chunk;
        let end = (start + chunk).min(ct.len());
        RequestFrame {
            client_id,
            numbering: Numbering::Modern,
            request: Request::SendFile(FilePacket {
                head: PacketHead {
                    content_size: ct.len() as u64,
                    orig_size: orig,
                    packet: n,
                    total,
                    file: FileName::try_from("f").unwrap(),
                },
                content: Bytes::copy_from_slice(&ct[start..end]),
            }),
        }
    }

    fn strict() -> ServerConfig {
        ServerConfig {
            leniency: Leniency::STRICT,
            ..ServerConfig::default()
        }
    }

    fn crc_ok(client_id: ClientId, file: &str) -> RequestFrame {
        RequestFrame {
            client_id,
            numbering: Numbering::Modern,
            request: Request::CrcOk {
                file: FileName::try_from(file).unwrap(),
            },
        }
    }

    /// Uploads "abc" as "f" in one packet and confirms it: the commit.
    fn upload_and_confirm(
        s: &mut ServerSession,
        id: ClientId,
        aes: &AesKey,
        rng: &mut rand::rngs::StdRng,
    ) {
        let ct = encrypt_all(aes, b"abc");
        let action = s.handle(packet(id, &ct, 1, 1, 16, 3), rng).unwrap();
        assert!(matches!(action, Action::Write { done: Some(_), .. }));
        let action = s.handle(crc_ok(id, "f"), rng).unwrap();
        assert!(matches!(action, Action::Commit { .. }), "{action:?}");
    }

    #[test]
    fn answers_a_repeated_crc_ok_for_the_committed_file_with_1604_again() {
        let (mut s, id, aes, mut rng) = keyed();
        upload_and_confirm(&mut s, id, &aes, &mut rng);
        for _ in 0..3 {
            let action = s.handle(crc_ok(id, "f"), &mut rng).unwrap();
            assert!(
                matches!(action, Action::Reply(Response::Ack { client_id }) if client_id == id),
                "{action:?}"
            );
        }
        // Only for the file committed, and only once it is.
        assert!(s.handle(crc_ok(id, "other"), &mut rng).is_err());
    }

    #[test]
    fn rejects_a_repeated_crc_ok_when_strict_after_a_failed_commit_or_a_new_upload() {
        let (mut s, id, aes, mut rng) = keyed_with(strict());
        upload_and_confirm(&mut s, id, &aes, &mut rng);
        assert!(matches!(
            s.handle(crc_ok(id, "f"), &mut rng),
            Err(SessionError::Unexpected { .. })
        ));

        let (mut s, id, aes, mut rng) = keyed();
        upload_and_confirm(&mut s, id, &aes, &mut rng);
        assert_eq!(s.storage_failed(), Response::GeneralError);
        assert!(
            s.handle(crc_ok(id, "f"), &mut rng).is_err(),
            "nothing was committed"
        );

        let (mut s, id, aes, mut rng) = keyed();
        upload_and_confirm(&mut s, id, &aes, &mut rng);
        let ct = encrypt_all(&aes, b"abcdefghijklmnopqrstuvwxyz");
        s.handle(packet(id, &ct, 1, 2, 16, 26), &mut rng).unwrap();
        assert!(
            s.handle(crc_ok(id, "f"), &mut rng).is_err(),
            "an upload of the name is in progress"
        );
    }

    #[test]
    fn accepts_an_upload_numbered_from_zero_unless_strict() {
        let plain = b"abcdefghijklmnopqrstuvwxyz0123456789";
        for (config, accepted) in [(ServerConfig::default(), true), (strict(), false)] {
            let (mut s, id, aes, mut rng) = keyed_with(config);
            let ct = encrypt_all(&aes, plain);
            let total = ct.len().div_ceil(16) as u32;
            let mut got = Vec::new();
            let mut outcome = Ok(());
            for n in 1..=total {
                let mut frame = packet(id, &ct, n, total, 16, plain.len() as u64);
                if let Request::SendFile(p) = &mut frame.request {
                    p.head.packet = n - 1;
                }
                match s.handle(frame, &mut rng) {
                    Ok(Action::Write { plaintext, .. }) => got.extend_from_slice(&plaintext),
                    Ok(other) => panic!("{other:?}"),
                    Err(e) => {
                        outcome = Err(e);
                        break;
                    }
                }
            }
            if accepted {
                outcome.unwrap();
                assert_eq!(got, plain);
            } else {
                assert!(
                    matches!(
                        outcome,
                        Err(SessionError::Upload(ReassemblyError::OutOfOrder {
                            expected: 1,
                            got: 0
                        }))
                    ),
                    "{outcome:?}"
                );
            }
        }
    }

    #[test]
    fn secure_sessions_absorb_no_legacy_deviation() {
        let s = ServerSession::secure(ServerConfig::default(), [7; 32]);
        assert_eq!(s.config.leniency, Leniency::STRICT);
        let s = ServerSession::new(ServerConfig::default());
        assert_eq!(s.config.leniency, Leniency::LENIENT);
    }

    #[test]
    fn does_not_count_an_attempt_cut_short_by_a_storage_failure() {
        let (mut s, id, aes, mut rng) = keyed();
        let ct = encrypt_all(&aes, b"abc");
        // Storage fails at the end of every attempt: none counts.
        for _ in 0..2 * MAX_SEND_ATTEMPTS {
            let action = s.handle(packet(id, &ct, 1, 1, 16, 3), &mut rng).unwrap();
            assert!(matches!(action, Action::Write { done: Some(_), .. }));
            assert_eq!(s.storage_failed(), Response::GeneralError);
        }
        let action = s.handle(packet(id, &ct, 1, 1, 16, 3), &mut rng).unwrap();
        assert!(matches!(
            action,
            Action::Write {
                start: Some(FileStart { attempt: 1, .. }),
                ..
            }
        ));
    }

    #[test]
    fn rejects_a_fifth_attempt_at_a_name_even_when_names_alternate() {
        let (mut s, id, aes, mut rng) = keyed();
        let ct = encrypt_all(&aes, b"abc");
        let upload = |s: &mut ServerSession, rng: &mut rand::rngs::StdRng, name: &str| {
            let mut frame = packet(id, &ct, 1, 1, 16, 3);
            if let Request::SendFile(p) = &mut frame.request {
                p.head.file = FileName::try_from(name).unwrap();
            }
            s.handle(frame, rng)?;
            let retry = RequestFrame {
                client_id: id,
                numbering: Numbering::Modern,
                request: Request::CrcRetry {
                    file: FileName::try_from(name).unwrap(),
                },
            };
            s.handle(retry, rng).map(|_| ())
        };
        for _ in 0..MAX_SEND_ATTEMPTS {
            upload(&mut s, &mut rng, "a").unwrap();
            upload(&mut s, &mut rng, "b").unwrap();
        }
        assert!(matches!(
            upload(&mut s, &mut rng, "a"),
            Err(SessionError::TooManyAttempts(_))
        ));
    }

    #[test]
    fn reuses_a_recycled_buffer_for_the_next_packet_only_during_an_upload() {
        let (mut s, id, aes, mut rng) = keyed();
        let plain = vec![5u8; 4000];
        let ct = encrypt_all(&aes, &plain);
        // Outside an upload the buffer is ignored.
        s.recycle(BytesMut::with_capacity(8192));
        assert!(s.spare.is_none());
        let Action::Write {
            plaintext: first, ..
        } = s
            .handle(packet(id, &ct, 1, 3, 1600, 4000), &mut rng)
            .unwrap()
        else {
            panic!("write")
        };
        let ptr = first.as_ptr();
        s.recycle(first);
        let Action::Write {
            plaintext: second, ..
        } = s
            .handle(packet(id, &ct, 2, 3, 1600, 4000), &mut rng)
            .unwrap()
        else {
            panic!("write")
        };
        assert_eq!(second.as_ptr(), ptr, "the recycled buffer was reused");
        s.recycle(second);
        let Action::Write { done, .. } = s
            .handle(packet(id, &ct, 3, 3, 1600, 4000), &mut rng)
            .unwrap()
        else {
            panic!("write")
        };
        assert!(
            matches!(done, Some(Response::FileReceived { cksum, .. }) if cksum == Cksum::of(&plain))
        );
        assert!(s.spare.is_none(), "no buffer is held between uploads");
    }

    #[test]
    fn rejects_a_second_public_key_once_keyed() {
        let (mut s, id, _, mut rng) = keyed();
        let mut other_rng = rand::rngs::StdRng::seed_from_u64(3);
        let other = PrivateKey::generate_legacy(&mut other_rng).unwrap();
        let frame = RequestFrame {
            client_id: id,
            numbering: Numbering::Modern,
            request: Request::PublicKey {
                name: UserName::try_from("u").unwrap(),
                key: public_key_field(&other.public_key()).unwrap(),
            },
        };
        assert!(matches!(
            s.handle(frame, &mut rng),
            Err(SessionError::Unexpected {
                request: RequestKind::PublicKey,
                ..
            })
        ));
    }

    #[test]
    fn rejects_a_public_key_after_reconnect() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let private = PrivateKey::generate_legacy(&mut rng).unwrap();
        let field = public_key_field(&private.public_key()).unwrap();
        let mut s = ServerSession::new(ServerConfig::default());
        let id = ClientId([9; 16]);
        let name = UserName::try_from("u").unwrap();
        let frame = |request| RequestFrame {
            client_id: id,
            numbering: Numbering::Classic,
            request,
        };
        s.handle(frame(Request::Reconnect { name: name.clone() }), &mut rng)
            .unwrap();
        let known = KnownClient {
            name: name.clone(),
            public_key: Some(field.clone()),
            secure_key: None,
        };
        assert!(matches!(
            s.looked_up(Some(known), &mut rng).unwrap(),
            Response::Reconnected { .. }
        ));
        let err = s
            .handle(frame(Request::PublicKey { name, key: field }), &mut rng)
            .unwrap_err();
        assert!(matches!(
            err,
            SessionError::Unexpected {
                request: RequestKind::PublicKey,
                ..
            }
        ));
    }

    fn frame_of(client_id: ClientId, request: Request) -> RequestFrame {
        RequestFrame {
            client_id,
            numbering: Numbering::Modern,
            request,
        }
    }

    fn retrieval_requests() -> [Request; 3] {
        let file = FileName::try_from("f").unwrap();
        [
            Request::Retrieval(RetrievalRequest::List {
                flags: crate::retrieval::ListFlags::ALL_VERSIONS,
                cursor: 0,
            }),
            Request::Retrieval(RetrievalRequest::Restore {
                version: 0,
                file: file.clone(),
            }),
            Request::Retrieval(RetrievalRequest::Delete { file }),
        ]
    }

    #[test]
    fn rejects_legacy_retrieval_before_a_proof_with_1651() {
        let (mut s, id, _, mut rng) = keyed();
        for request in retrieval_requests() {
            let kind = request.kind();
            let err = s.handle(frame_of(id, request), &mut rng).unwrap_err();
            assert_eq!(err, SessionError::NotAuthenticated(kind));
            assert_eq!(err.answer(), Response::NotAuthenticated);
        }
        assert!(!s.may_retrieve());
    }

    #[test]
    fn rejects_legacy_retrieval_after_a_reconnect_that_proved_nothing() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        let private = PrivateKey::generate_legacy(&mut rng).unwrap();
        let mut s = ServerSession::new(ServerConfig::default());
        let id = ClientId([9; 16]);
        let name = UserName::try_from("u").unwrap();
        s.handle(
            frame_of(id, Request::Reconnect { name: name.clone() }),
            &mut rng,
        )
        .unwrap();
        let known = KnownClient {
            name,
            public_key: Some(public_key_field(&private.public_key()).unwrap()),
            secure_key: None,
        };
        assert!(matches!(
            s.looked_up(Some(known), &mut rng).unwrap(),
            Response::Reconnected { .. }
        ));
        for request in retrieval_requests() {
            let err = s.handle(frame_of(id, request), &mut rng).unwrap_err();
            assert_eq!(err.answer(), Response::NotAuthenticated);
        }
    }

    #[test]
    fn rejects_a_wrong_legacy_proof_with_1651() {
        let (_, id, aes, _) = keyed();
        let other_key = AesKey::from_bytes([0xa5; 32]);
        let wrong = [
            [0u8; 32],
            [0xa5; 32],
            // Right key, another client's id.
            crate::secure::legacy_retrieval_proof(&aes, ClientId([0x77; 16])),
            // Another connection's key (a replayed proof).
            crate::secure::legacy_retrieval_proof(&other_key, id),
        ];
        for proof in wrong {
            let (mut s, id, _, mut rng) = keyed();
            let err = s
                .handle(frame_of(id, Request::Prove { proof }), &mut rng)
                .unwrap_err();
            assert_eq!(err, SessionError::ProofRejected);
            assert_eq!(err.answer(), Response::NotAuthenticated);
            assert!(!s.may_retrieve());
        }
    }

    #[test]
    fn accepts_the_legacy_proof_of_the_session_key_then_serves_retrieval() {
        let (mut s, id, aes, mut rng) = keyed();
        let proof = crate::secure::legacy_retrieval_proof(&aes, id);
        let action = s
            .handle(frame_of(id, Request::Prove { proof }), &mut rng)
            .unwrap();
        assert!(
            matches!(action, Action::Reply(Response::Authenticated { client_id }) if client_id == id)
        );
        assert!(s.may_retrieve());
        for request in retrieval_requests() {
            let action = s.handle(frame_of(id, request.clone()), &mut rng).unwrap();
            assert!(
                matches!(
                    (&action, &request),
                    (Action::List { client_id, .. }, Request::Retrieval(RetrievalRequest::List { .. }))
                    | (Action::FindVersion { client_id, .. }, Request::Retrieval(RetrievalRequest::Restore { .. }))
                    | (Action::Delete { client_id, .. }, Request::Retrieval(RetrievalRequest::Delete { .. }))
                    if *client_id == id
                ),
                "{action:?}"
            );
            // The outcome must be reported before the next request.
            match action {
                Action::List { .. } => drop(s.listed(Vec::new()).unwrap()),
                Action::FindVersion { .. } => drop(s.found_version(None, &mut rng).unwrap()),
                _ => drop(s.deleted(DeleteOutcome::NotFound).unwrap()),
            }
        }
        // Once is enough: a second proof is out of place.
        let err = s
            .handle(frame_of(id, Request::Prove { proof }), &mut rng)
            .unwrap_err();
        assert!(matches!(
            err,
            SessionError::Unexpected {
                request: RequestKind::Prove,
                ..
            }
        ));
    }

    #[test]
    fn rejects_a_legacy_proof_before_the_key_exchange() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let mut s = ServerSession::new(ServerConfig::default());
        let proof = [1u8; 32];
        let err = s
            .handle(
                frame_of(ClientId([1; 16]), Request::Prove { proof }),
                &mut rng,
            )
            .unwrap_err();
        assert_eq!(err.answer(), Response::GeneralError);
        let name = UserName::try_from("u").unwrap();
        let Action::Register { client_id, .. } = s
            .handle(
                frame_of(ClientId::default(), Request::Register { name }),
                &mut rng,
            )
            .unwrap()
        else {
            panic!("register")
        };
        s.registered(RegisterOutcome::Created, &mut rng).unwrap();
        let err = s
            .handle(frame_of(client_id, Request::Prove { proof }), &mut rng)
            .unwrap_err();
        assert!(matches!(
            err,
            SessionError::Unexpected {
                request: RequestKind::Prove,
                ..
            }
        ));
        assert_eq!(err.answer(), Response::GeneralError);
    }

    #[test]
    fn accepts_legacy_uploads_without_a_proof() {
        let (mut s, id, aes, mut rng) = keyed();
        let ct = encrypt_all(&aes, b"abc");
        let Action::Write { done, .. } = s.handle(packet(id, &ct, 1, 1, 16, 3), &mut rng).unwrap()
        else {
            panic!("write")
        };
        assert!(matches!(done, Some(Response::FileReceived { .. })));
        let action = s
            .handle(
                frame_of(
                    id,
                    Request::CrcOk {
                        file: FileName::try_from("f").unwrap(),
                    },
                ),
                &mut rng,
            )
            .unwrap();
        assert!(matches!(action, Action::Commit { size: 3, .. }));
        assert!(s.authenticated() && !s.may_retrieve());
    }

    fn proven(config: ServerConfig) -> (ServerSession, ClientId, AesKey, rand::rngs::StdRng) {
        let (s, id, aes, mut rng) = keyed();
        let mut s = ServerSession { config, ..s };
        let proof = crate::secure::legacy_retrieval_proof(&aes, id);
        s.handle(frame_of(id, Request::Prove { proof }), &mut rng)
            .unwrap();
        (s, id, aes, rng)
    }

    fn entries(n: usize) -> Vec<ListEntry> {
        (0..n)
            .map(|i| ListEntry {
                version: i as u64 + 1,
                size: 0,
                stored_at: 0,
                cksum: 0,
                file: FileName::try_from(format!("f{i}").as_str()).unwrap(),
            })
            .collect()
    }

    fn list(
        s: &mut ServerSession,
        id: ClientId,
        cursor: u64,
        rng: &mut rand::rngs::StdRng,
        found: usize,
    ) -> (u64, usize, Action) {
        let request = Request::Retrieval(RetrievalRequest::List {
            flags: crate::retrieval::ListFlags::LATEST,
            cursor,
        });
        let action = s.handle(frame_of(id, request), rng).unwrap();
        let Response::Retrieval(RetrievalResponse::ListPage {
            next_cursor,
            entries: page,
        }) = s.listed(entries(found)).unwrap()
        else {
            panic!("not a list page");
        };
        (next_cursor, page.len(), action)
    }

    #[test]
    fn pages_a_list_by_max_list_entries_with_the_cursor_of_entries_returned() {
        let (mut s, id, _, mut rng) = proven(ServerConfig::default());
        // Storage is asked for one more than a page.
        let (next, len, action) = list(&mut s, id, 0, &mut rng, MAX_LIST_ENTRIES + 1);
        assert!(
            matches!(action, Action::List { skip: 0, limit, .. } if limit == MAX_LIST_ENTRIES + 1)
        );
        assert_eq!((next, len), (MAX_LIST_ENTRIES as u64, MAX_LIST_ENTRIES));
        // Exactly a page left: the last page, next_cursor 0.
        let (next, len, action) = list(&mut s, id, next, &mut rng, MAX_LIST_ENTRIES);
        assert!(matches!(action, Action::List { skip, .. } if skip == MAX_LIST_ENTRIES as u64));
        assert_eq!((next, len), (0, MAX_LIST_ENTRIES));
        let (next, len, _) = list(&mut s, id, 0, &mut rng, 0);
        assert_eq!((next, len), (0, 0));
    }

    #[test]
    fn never_pages_past_max_list_entries_whatever_the_config() {
        let config = ServerConfig {
            list_page: 10_000,
            ..ServerConfig::default()
        };
        let (mut s, id, _, mut rng) = proven(config);
        let (next, len, _) = list(&mut s, id, 7, &mut rng, 10_000);
        assert_eq!((next, len), (7 + MAX_LIST_ENTRIES as u64, MAX_LIST_ENTRIES));
    }

    #[test]
    fn rejects_an_outcome_that_was_not_asked_for_and_a_request_while_one_is_due() {
        let (mut s, id, _, mut rng) = proven(ServerConfig::default());
        assert_eq!(
            s.listed(Vec::new()).unwrap_err(),
            SessionError::NoPendingAction
        );
        assert_eq!(
            s.deleted(DeleteOutcome::NotFound).unwrap_err(),
            SessionError::NoPendingAction
        );
        assert!(s.found_version(None, &mut rng).is_err());
        let delete = Request::Retrieval(RetrievalRequest::Delete {
            file: FileName::try_from("a").unwrap(),
        });
        s.handle(frame_of(id, delete.clone()), &mut rng).unwrap();
        assert!(s.handle(frame_of(id, delete), &mut rng).is_err());
    }

    #[test]
    fn answers_delete_outcomes_and_a_missing_version() {
        let (mut s, id, _, mut rng) = proven(ServerConfig::default());
        let file = FileName::try_from("a").unwrap();
        for (outcome, answer) in [
            (
                DeleteOutcome::Deleted(3),
                RetrievalResponse::Deleted { versions: 3 },
            ),
            (DeleteOutcome::NotFound, RetrievalResponse::NotFound),
            (
                DeleteOutcome::Refused,
                RetrievalResponse::Refused {
                    reason: RefusalReason::APPEND_ONLY,
                },
            ),
        ] {
            let delete = Request::Retrieval(RetrievalRequest::Delete { file: file.clone() });
            s.handle(frame_of(id, delete), &mut rng).unwrap();
            assert_eq!(s.deleted(outcome).unwrap(), Response::Retrieval(answer));
        }
        let restore = Request::Retrieval(RetrievalRequest::Restore { version: 0, file });
        s.handle(frame_of(id, restore), &mut rng).unwrap();
        assert!(matches!(
            s.found_version(None, &mut rng).unwrap(),
            RestoreStart::Answer(Response::Retrieval(RetrievalResponse::NotFound))
        ));
    }

    #[test]
    fn restores_under_the_session_key_after_a_storage_failure_cleared_the_request() {
        let (mut s, id, aes, mut rng) = proven(ServerConfig::default());
        let file = FileName::try_from("a").unwrap();
        let restore = Request::Retrieval(RetrievalRequest::Restore {
            version: 0,
            file: file.clone(),
        });
        s.handle(frame_of(id, restore.clone()), &mut rng).unwrap();
        assert_eq!(s.storage_failed(), Response::GeneralError);
        s.handle(frame_of(id, restore), &mut rng).unwrap();
        let found = FoundVersion {
            version: 2,
            size: 5,
            cksum: 1,
            file,
        };
        let RestoreStart::Send(mut sender) = s.found_version(Some(found), &mut rng).unwrap() else {
            panic!("no sender");
        };
        let mut packets = sender.plaintext(b"hello").unwrap();
        let iv = sender.header().iv;
        packets.extend(sender.finish().unwrap());
        let mut ct = Vec::new();
        for p in packets {
            let Response::Retrieval(RetrievalResponse::RestoreData { content }) = p else {
                panic!("not a 1642");
            };
            ct.extend_from_slice(&content);
        }
        let mut dec = crate::crypto::CbcDecryptor::with_iv(&aes, &iv);
        let mut out = BytesMut::new();
        dec.update(&ct, &mut out);
        dec.finish(&mut out).unwrap();
        assert_eq!(&out[..], b"hello");
    }
}
