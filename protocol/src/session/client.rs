//! Over 600 lines: one state machine, whose `handle` covers every answer of
//! both dialects in one match, so each transition is seen beside the others.
//!
//! The client side of a session. The planning and packetising of an upload
//! live in [`crate::upload`]; they are re-exported here for the shells.
//!
//! The machine checks that every response is the one the protocol allows at
//! that point, recovers the AES key, and turns the server's cksum into a
//! verdict with the request that carries it. Where legacy servers disagree it
//! accepts every unambiguous variant: 1606 with or without an id, and a 1604
//! (or nothing) in answer to "CRC wrong, will resend".
//!
//! Secure mode (`docs/PROTOCOL.md` §12, [`ClientSession::secure`]): the
//! registration carries the public key and is answered 1602 with a wrapped
//! secret, as a reconnect is answered 1605; either becomes
//! [`ClientEvent::Prove`] with the proof to send, and the 1650 that accepts
//! it becomes [`ClientEvent::KeyReady`].
//!
//! Retrieval (`docs/PROTOCOL.md` §11): on the legacy listener,
//! [`ClientSession::retrieval_proof_request`] first proves our key (§11.5),
//! and the 1650 that accepts it becomes [`ClientEvent::RetrievalAllowed`];
//! then [`ClientSession::list_request`],
//! [`ClientSession::restore_request`] and [`ClientSession::delete_request`]
//! build the requests; the answers become [`ClientEvent::ListPage`],
//! [`ClientEvent::RestoreBegin`] then [`ClientEvent::RestoreData`] until the
//! announced ciphertext arrived, [`ClientEvent::Deleted`],
//! [`ClientEvent::NotFound`] or [`ClientEvent::Refused`].
//!
//! A 1607 (`docs/PROTOCOL.md` §6.4, §6.5) is decided here, not in the
//! shells: the session counts the 1607s of the request awaiting its answer
//! and says [`ServerErrorStep::Resend`] (send it again as it was) up to
//! [`SERVER_ERROR_RESENDS`] times, then [`ServerErrorStep::GiveUp`]. A 1607
//! to a retrieval request is never repeated (a legacy server gives no other
//! answer): to the first of a connection (on the legacy listener, the
//! proof) it is [`ClientEvent::RetrievalUnsupported`], as is the connection
//! closing then ([`ClientSession::awaits_first_retrieval_answer`]); to a
//! later one it gives up at once.

use bytes::Bytes;

use crate::crypto::{pkcs7_len, AesKey, CryptoError, PrivateKey};
use crate::message::{Request, RequestFrame, Response};
use crate::name::{FileName, UserName};
use crate::repo::message::RepoResponse;
use crate::retrieval::{
    ListEntry, ListFlags, RefusalReason, RestoreBegin, RetrievalRequest, RetrievalResponse,
};
use crate::secure::{legacy_retrieval_proof, Binding, SessionSecret};
use crate::session::{MAX_SEND_ATTEMPTS, SERVER_ERROR_RESENDS};
use crate::wire::{ClientId, Dialect, Numbering, ResponseCode};

pub use crate::upload::{Packetizer, PlanError, UploadPlan};

/// A response that does not fit the session, or a key that does not unwrap.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("server answered {got} where {expected} was due")]
    Unexpected {
        expected: &'static str,
        got: ResponseCode,
    },
    #[error("server answered for client {got}, not {expected}")]
    ClientIdMismatch { expected: ClientId, got: ClientId },
    #[error("server's cksum answer names {got:?}, not {expected:?}")]
    FileMismatch { expected: FileName, got: FileName },
    #[error("the AES key from the server does not unwrap with our private key: {0}")]
    Key(#[from] CryptoError),
    #[error("no request is awaiting an answer")]
    Idle,
    #[error("server began restoring {got:?} where {expected:?} was asked for")]
    RestoreMismatch { expected: FileName, got: FileName },
    #[error("server announced {content_size} bytes of ciphertext for {size} bytes of plaintext, not {expected}")]
    RestoreSize {
        size: u64,
        content_size: u64,
        expected: u64,
    },
    #[error("server sent {extra} bytes of restore data beyond the {content_size} it announced")]
    RestoreOverrun { content_size: u64, extra: u64 },
    #[error("the server did not accept our proof of key (1651)")]
    ProofRejected,
    #[error("a proof of our key needs the session's AES key, and none was exchanged")]
    NotKeyed,
}

/// What a response meant.
#[derive(Debug)]
pub enum ClientEvent {
    /// 1600: registered; send the public key next ([`ClientSession::public_key_request`]).
    Registered(ClientId),
    /// 1601: the name is taken.
    NameTaken,
    /// 1602/1605 (legacy) or 1650 (secure): the AES key is ready; files
    /// may be sent.
    KeyReady,
    /// Secure mode, 1602/1605: the secret arrived; send `reply`, the proof
    /// of our key (1250). The 1650 that accepts it is [`ClientEvent::KeyReady`].
    Prove { reply: RequestFrame },
    /// Legacy, 1650: the server accepted our proof before retrieval
    /// ([`ClientSession::retrieval_proof_request`]); retrieval requests may
    /// follow on this connection.
    RetrievalAllowed,
    /// 1606: the server does not know us (or has no key): register anew.
    MustRegister,
    /// 1603 answered: send `reply` (1029, 1030 or 1031).
    Verdict {
        verdict: Verdict,
        reply: RequestFrame,
    },
    /// 1604 to "CRC wrong, will resend": nothing to do, the 1603 of the
    /// resend is still due.
    RetryAcknowledged,
    /// 1604 to "CRC ok" or "CRC wrong 4th time": the file is finished.
    Done,
    /// Secure mode, 1682 to a file (its first packets, or "CRC ok"): the
    /// client's quota refused it; `size` more bytes would take the client,
    /// which stores `stored`, over `quota`. Nothing of it was recorded, and
    /// the upload is over (`docs/PROTOCOL.md` §13.9).
    QuotaExceeded { stored: u64, quota: u64, size: u64 },
    /// 1607: the server failed; what to do is in the step. On
    /// [`ServerErrorStep::Resend`] the session still expects the answer to
    /// the last request, which the caller sends again as it was (an upload
    /// attempt answered with 1607 does not count toward
    /// [`MAX_SEND_ATTEMPTS`]); on [`ServerErrorStep::GiveUp`] the request
    /// is over.
    ServerError(ServerErrorStep),
    /// 1607 to the first retrieval request of the connection (on the legacy
    /// listener, the proof before retrieval): the server does not know
    /// retrieval (`docs/PROTOCOL.md` §11). Not to be repeated.
    RetrievalUnsupported,
    /// 1640: a page of the listing; ask again with `next_cursor` unless it
    /// is 0 ([`ClientSession::list_request`]).
    ListPage {
        next_cursor: u64,
        entries: Vec<ListEntry>,
    },
    /// 1641: a restore begins; [`ClientEvent::RestoreData`] events follow
    /// until `content_size` bytes of ciphertext arrived. Its size fields
    /// were checked to agree (`content_size` is the PKCS#7 length of `size`).
    RestoreBegin(RestoreBegin),
    /// 1642: the next slice of the restore's ciphertext; `remaining` bytes
    /// are still due (0: this was the last slice and the session is idle).
    RestoreData { content: Bytes, remaining: u64 },
    /// 1643: the file was deleted, with this many versions.
    Deleted { versions: u32 },
    /// 1644: no such file or version.
    NotFound,
    /// 1645: the server refused the request.
    Refused(RefusalReason),
}

/// What to do after a 1607 (`docs/PROTOCOL.md` §6.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerErrorStep {
    /// Send the last request again as it was: resend `resend` of at most
    /// [`SERVER_ERROR_RESENDS`].
    Resend { resend: u8 },
    /// The request was answered 1607 `times` times: give up on it.
    GiveUp { times: u8 },
}

impl ServerErrorStep {
    /// The 1607s of the request so far.
    pub fn times(self) -> u8 {
        match self {
            Self::Resend { resend } => resend,
            Self::GiveUp { times } => times,
        }
    }
}

/// The outcome of comparing the server's cksum with ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The cksums match; the reply is "CRC ok".
    Match,
    /// Mismatch on attempt `attempt` of [`MAX_SEND_ATTEMPTS`]; the reply is
    /// "CRC wrong, will resend" and the whole file must be sent again.
    Retry { attempt: u8 },
    /// The last attempt mismatched; the reply is "CRC wrong 4th time".
    GiveUp,
}

#[derive(Debug, Clone)]
enum Expect {
    Idle,
    Registered,
    KeyAccepted,
    Reconnected,
    /// Secure mode: the 1650 that accepts our proof.
    Authenticated,
    /// Legacy: the 1650 that accepts our proof before retrieval.
    RetrievalProof,
    /// The 1603 of an upload; `ack_allowed` after a "CRC wrong, will resend".
    FileReceived {
        file: FileName,
        content_size: u64,
        cksum: u32,
        ack_allowed: bool,
    },
    Ack,
    /// The 1640 of a list request.
    ListPage,
    /// The 1641 (or 1644) of a restore of `file`.
    RestoreBegin {
        file: FileName,
    },
    /// 1642 packets, `remaining` bytes of ciphertext still due.
    RestoreData {
        remaining: u64,
    },
    /// The 1643 (or 1644, 1645) of a delete.
    Deleted,
}

impl Expect {
    fn is_retrieval(&self) -> bool {
        matches!(
            self,
            Expect::RetrievalProof
                | Expect::ListPage
                | Expect::RestoreBegin { .. }
                | Expect::RestoreData { .. }
                | Expect::Deleted
        )
    }
}

/// The client's view of one connection.
pub struct ClientSession {
    dialect: Dialect,
    /// The TLS channel binding (secure mode).
    binding: Binding,
    /// Secure mode: the content key, held back until the proof is accepted.
    proving: Option<AesKey>,
    name: UserName,
    numbering: Numbering,
    key: PrivateKey,
    client_id: Option<ClientId>,
    aes: Option<AesKey>,
    expect: Expect,
    attempts: u8,
    /// 1607s answered to the request awaiting its answer (an upload counts
    /// as one request from [`ClientSession::begin_file`] to its verdict).
    server_errors: u8,
    /// Whether a retrieval request (or the proof before them) was answered
    /// on this connection.
    retrieval_answered: bool,
    /// Whether any answer but 1607 arrived on this connection.
    answered: bool,
    /// What to send as the header id before one is assigned.
    unregistered_id: ClientId,
}

impl std::fmt::Debug for ClientSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientSession")
            .field("name", &self.name)
            .field("client_id", &self.client_id)
            .field("keyed", &self.aes.is_some())
            .field("expect", &self.expect)
            .finish_non_exhaustive()
    }
}

impl ClientSession {
    /// A legacy session for `name` with private key `key`, known to the
    /// server as `client_id` if already registered.
    pub fn new(
        name: UserName,
        key: PrivateKey,
        client_id: Option<ClientId>,
        numbering: Numbering,
    ) -> Self {
        Self {
            dialect: Dialect::Legacy,
            binding: [0; 32],
            proving: None,
            name,
            numbering,
            key,
            client_id,
            aes: None,
            expect: Expect::Idle,
            attempts: 0,
            server_errors: 0,
            retrieval_answered: false,
            answered: false,
            unregistered_id: ClientId::default(),
        }
    }

    /// A secure-mode session on a TLS connection whose exporter value
    /// (`docs/PROTOCOL.md` §12.4) is `binding`.
    pub fn secure(
        name: UserName,
        key: PrivateKey,
        client_id: Option<ClientId>,
        binding: Binding,
    ) -> Self {
        Self {
            dialect: Dialect::Secure,
            binding,
            ..Self::new(name, key, client_id, Numbering::Modern)
        }
    }

    /// The dialect of this session.
    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// The request numbering of this session (always 1025 in secure mode).
    pub fn numbering(&self) -> Numbering {
        self.numbering
    }

    /// The id the server assigned, once known.
    pub fn client_id(&self) -> Option<ClientId> {
        self.client_id
    }

    /// The session's AES key, once exchanged.
    pub fn aes_key(&self) -> Option<&AesKey> {
        self.aes.as_ref()
    }

    /// The private key.
    pub fn private_key(&self) -> &PrivateKey {
        &self.key
    }

    /// Replaces the private key (a client registering anew makes a new one).
    pub fn set_private_key(&mut self, key: PrivateKey) {
        self.key = key;
    }

    fn frame(&self, request: Request) -> RequestFrame {
        RequestFrame {
            client_id: self.client_id.unwrap_or(self.unregistered_id),
            numbering: self.numbering,
            request,
        }
    }

    /// A new request, whose 1607s are counted afresh.
    fn request(&mut self, request: Request) -> RequestFrame {
        self.server_errors = 0;
        self.frame(request)
    }

    /// The 1607s answered so far to the request awaiting its answer.
    pub fn server_errors(&self) -> u8 {
        self.server_errors
    }

    /// Legacy: whether the server has answered nothing but 1607 on this
    /// connection, so that its first request (a register or a reconnect)
    /// is the one refused. A server of the other request numbering answers
    /// so, as it knows none of our codes (`docs/PROTOCOL.md` §9): the
    /// shell says so rather than blaming the server's disk.
    pub fn refused_from_the_start(&self) -> bool {
        self.dialect == Dialect::Legacy && !self.answered && self.server_errors > 0
    }

    /// Whether the request awaiting its answer is the first retrieval
    /// request of the connection (on the legacy listener, the proof), so
    /// that the connection closing now means that the server does not know
    /// retrieval, as a 1607 would (`docs/PROTOCOL.md` §11).
    pub fn awaits_first_retrieval_answer(&self) -> bool {
        self.expect.is_retrieval() && !self.retrieval_answered
    }

    /// "Register" (1025/825). Forgets any previous id. In secure mode the
    /// request carries the public key.
    ///
    /// # Errors
    /// In secure mode, when the public key cannot be encoded.
    pub fn register_request(&mut self) -> Result<RequestFrame, ClientError> {
        self.client_id = None;
        self.aes = None;
        let request = match self.dialect {
            Dialect::Legacy => Request::Register {
                name: self.name.clone(),
            },
            Dialect::Secure => Request::RegisterKey {
                name: self.name.clone(),
                key: crate::crypto::public_key_der(&self.key.public_key())?.into(),
            },
        };
        self.expect = Expect::Registered;
        Ok(self.request(request))
    }

    /// "Reconnect" (1027/827) as the id given at construction.
    pub fn reconnect_request(&mut self) -> RequestFrame {
        self.expect = Expect::Reconnected;
        self.request(Request::Reconnect {
            name: self.name.clone(),
        })
    }

    /// "Send public key" (1026/826).
    ///
    /// # Errors
    /// When the key's DER does not fit the 160-byte field.
    pub fn public_key_request(&mut self) -> Result<RequestFrame, ClientError> {
        let key = crate::crypto::public_key_field(&self.key.public_key())?;
        self.expect = Expect::KeyAccepted;
        Ok(self.request(Request::PublicKey {
            name: self.name.clone(),
            key,
        }))
    }

    /// Starts an upload: resets the attempt count (and the count of 1607s)
    /// for a new file.
    pub fn begin_file(&mut self) {
        self.attempts = 0;
        self.server_errors = 0;
    }

    /// Attempts made at the current file whose cksum was (or is being) judged.
    pub fn attempts(&self) -> u8 {
        self.attempts
    }

    /// Records that every packet of `plan` was sent, with `cksum` the local
    /// cksum of the plaintext; the 1603 is due next.
    pub fn file_sent(&mut self, plan: &UploadPlan, cksum: u32) {
        let ack_allowed = self.attempts > 0;
        self.attempts = self.attempts.saturating_add(1);
        self.expect = Expect::FileReceived {
            file: plan.file.clone(),
            content_size: plan.content_size,
            cksum,
            ack_allowed,
        };
    }

    /// Legacy: "prove" (1250), the proof of our key that retrieval needs on
    /// the legacy listener (`docs/PROTOCOL.md` §11.5), derived from this
    /// connection's AES key. `None` in secure mode, whose proof came with the
    /// key exchange. Send it once per connection, before the first retrieval
    /// request, and never on a plain backup: a deployed version 3 server
    /// answers 1607 to it.
    ///
    /// # Errors
    /// [`ClientError::NotKeyed`] before the key exchange.
    pub fn retrieval_proof_request(&mut self) -> Result<Option<RequestFrame>, ClientError> {
        if self.dialect == Dialect::Secure {
            return Ok(None);
        }
        let (Some(key), Some(client_id)) = (self.aes.as_ref(), self.client_id) else {
            return Err(ClientError::NotKeyed);
        };
        let proof = legacy_retrieval_proof(key, client_id);
        self.expect = Expect::RetrievalProof;
        Ok(Some(self.request(Request::Prove { proof })))
    }

    /// "List" (1240): a page of this client's files from `cursor` (0: the
    /// first page), the newest version of each name or, with
    /// [`ListFlags::ALL_VERSIONS`], every version.
    pub fn list_request(&mut self, flags: ListFlags, cursor: u64) -> RequestFrame {
        self.expect = Expect::ListPage;
        self.request(Request::Retrieval(RetrievalRequest::List { flags, cursor }))
    }

    /// "Restore" (1241): version `version` (0: the newest) of `file`.
    pub fn restore_request(&mut self, version: u64, file: FileName) -> RequestFrame {
        self.expect = Expect::RestoreBegin { file: file.clone() };
        self.request(Request::Retrieval(RetrievalRequest::Restore {
            version,
            file,
        }))
    }

    /// "Delete" (1242): every version of `file`.
    pub fn delete_request(&mut self, file: FileName) -> RequestFrame {
        self.expect = Expect::Deleted;
        self.request(Request::Retrieval(RetrievalRequest::Delete { file }))
    }

    /// Whether a restore's data is still due.
    pub fn restoring(&self) -> bool {
        matches!(self.expect, Expect::RestoreData { .. })
    }

    fn check_id(&self, got: ClientId) -> Result<(), ClientError> {
        match self.client_id {
            Some(expected) if expected != got => {
                Err(ClientError::ClientIdMismatch { expected, got })
            }
            _ => Ok(()),
        }
    }

    /// Interprets the next response.
    ///
    /// # Errors
    /// When the response is not one the protocol allows now, names another
    /// client or file, or the AES key does not unwrap.
    pub fn handle<R: rand::CryptoRng + rand::RngCore>(
        &mut self,
        response: Response,
        rng: &mut R,
    ) -> Result<ClientEvent, ClientError> {
        let expect = std::mem::replace(&mut self.expect, Expect::Idle);
        if response == Response::GeneralError && !matches!(expect, Expect::Idle) {
            return Ok(self.server_error(expect));
        }
        let retrieval = expect.is_retrieval();
        self.answered = true;
        let event = self.interpret(expect, response, rng)?;
        self.retrieval_answered |= retrieval;
        Ok(event)
    }

    /// A 1607 in answer to the request that expected `expect`
    /// (`docs/PROTOCOL.md` §6.4, §6.5, §11).
    fn server_error(&mut self, expect: Expect) -> ClientEvent {
        self.server_errors = self.server_errors.saturating_add(1);
        if expect.is_retrieval() {
            // Not repeated: a server without retrieval always answers so,
            // and one that fails in the middle of a restore has ended it.
            if !self.retrieval_answered {
                return ClientEvent::RetrievalUnsupported;
            }
            return ClientEvent::ServerError(ServerErrorStep::GiveUp {
                times: self.server_errors,
            });
        }
        if matches!(expect, Expect::FileReceived { .. }) {
            // The server failed to take the file: that attempt says
            // nothing about the cksum, so it is not counted.
            self.attempts = self.attempts.saturating_sub(1);
        }
        if self.server_errors > SERVER_ERROR_RESENDS {
            return ClientEvent::ServerError(ServerErrorStep::GiveUp {
                times: self.server_errors,
            });
        }
        self.expect = expect;
        ClientEvent::ServerError(ServerErrorStep::Resend {
            resend: self.server_errors,
        })
    }

    /// Interprets a response other than a 1607 to a pending request.
    fn interpret<R: rand::CryptoRng + rand::RngCore>(
        &mut self,
        expect: Expect,
        response: Response,
        rng: &mut R,
    ) -> Result<ClientEvent, ClientError> {
        let unexpected = |expected| ClientError::Unexpected {
            expected,
            got: response.code(),
        };
        match (expect, &response) {
            (Expect::Registered, Response::Registered { client_id })
                if self.dialect == Dialect::Legacy =>
            {
                self.client_id = Some(*client_id);
                Ok(ClientEvent::Registered(*client_id))
            }
            (
                Expect::Registered,
                Response::KeyAccepted {
                    client_id,
                    wrapped_key,
                },
            )
            | (
                Expect::Reconnected,
                Response::Reconnected {
                    client_id,
                    wrapped_key,
                },
            ) if self.dialect == Dialect::Secure => {
                self.check_id(*client_id)?;
                let secret = SessionSecret::unwrap(&self.key, rng, wrapped_key)?;
                let proof = secret.proof(*client_id, &self.binding);
                self.client_id = Some(*client_id);
                // The key is usable only once the server accepts the proof.
                self.proving = Some(secret.content_key());
                self.expect = Expect::Authenticated;
                Ok(ClientEvent::Prove {
                    reply: self.request(Request::Prove { proof }),
                })
            }
            (Expect::Authenticated, Response::Authenticated { client_id }) => {
                self.check_id(*client_id)?;
                self.aes = self.proving.take();
                if self.aes.is_none() {
                    return Err(ClientError::Idle);
                }
                Ok(ClientEvent::KeyReady)
            }
            (_, Response::NotAuthenticated) => {
                self.aes = None;
                self.proving = None;
                Err(ClientError::ProofRejected)
            }
            (Expect::Authenticated, _) => Err(unexpected("1650")),
            (Expect::RetrievalProof, Response::Authenticated { client_id }) => {
                self.check_id(*client_id)?;
                Ok(ClientEvent::RetrievalAllowed)
            }
            (Expect::RetrievalProof, _) => Err(unexpected("1650 or 1651")),
            (Expect::Registered, Response::RegistrationFailed) => Ok(ClientEvent::NameTaken),
            (Expect::Registered, _) => Err(unexpected("1600 or 1601")),
            (
                Expect::KeyAccepted,
                Response::KeyAccepted {
                    client_id,
                    wrapped_key,
                },
            )
            | (
                Expect::Reconnected,
                Response::Reconnected {
                    client_id,
                    wrapped_key,
                },
            ) => {
                self.check_id(*client_id)?;
                self.aes = Some(self.key.unwrap_aes_key(rng, wrapped_key)?);
                Ok(ClientEvent::KeyReady)
            }
            (Expect::KeyAccepted, _) => Err(unexpected("1602")),
            (Expect::Reconnected, Response::ReconnectRejected { client_id }) => {
                if let Some(id) = client_id {
                    self.check_id(*id)?;
                }
                self.client_id = None;
                Ok(ClientEvent::MustRegister)
            }
            (Expect::Reconnected, _) => Err(unexpected("1605 or 1606")),
            (
                Expect::FileReceived {
                    file,
                    content_size,
                    cksum,
                    ack_allowed: true,
                },
                Response::Ack { client_id },
            ) => {
                self.check_id(*client_id)?;
                self.expect = Expect::FileReceived {
                    file,
                    content_size,
                    cksum,
                    ack_allowed: false,
                };
                Ok(ClientEvent::RetryAcknowledged)
            }
            (
                Expect::FileReceived {
                    file,
                    content_size,
                    cksum,
                    ..
                },
                Response::FileReceived {
                    client_id,
                    content_size: got_size,
                    file: got_file,
                    cksum: got_cksum,
                },
            ) => {
                self.check_id(*client_id)?;
                if *got_file != file {
                    return Err(ClientError::FileMismatch {
                        expected: file,
                        got: got_file.clone(),
                    });
                }
                let matched = *got_cksum == cksum && *got_size == content_size;
                let (verdict, request) = if matched {
                    self.expect = Expect::Ack;
                    (Verdict::Match, Request::CrcOk { file })
                } else if self.attempts < MAX_SEND_ATTEMPTS {
                    // The 1604 (if any) and the 1603 of the resend are due;
                    // file_sent sets that up once the packets are out.
                    (
                        Verdict::Retry {
                            attempt: self.attempts,
                        },
                        Request::CrcRetry { file },
                    )
                } else {
                    self.expect = Expect::Ack;
                    (Verdict::GiveUp, Request::CrcAbort { file })
                };
                // "CRC wrong, will resend" goes on with the upload, whose
                // 1607s count on; the other verdicts are new requests.
                let reply = match verdict {
                    Verdict::Retry { .. } => self.frame(request),
                    Verdict::Match | Verdict::GiveUp => self.request(request),
                };
                Ok(ClientEvent::Verdict { verdict, reply })
            }
            (
                Expect::FileReceived { .. } | Expect::Ack,
                Response::Repo(RepoResponse::QuotaExceeded {
                    stored,
                    quota,
                    size,
                }),
            ) if self.dialect == Dialect::Secure => Ok(ClientEvent::QuotaExceeded {
                stored: *stored,
                quota: *quota,
                size: *size,
            }),
            (Expect::FileReceived { .. }, _) => Err(unexpected("1603")),
            (Expect::Ack, Response::Ack { client_id }) => {
                self.check_id(*client_id)?;
                Ok(ClientEvent::Done)
            }
            (Expect::Ack, _) => Err(unexpected("1604")),
            (
                Expect::ListPage,
                Response::Retrieval(RetrievalResponse::ListPage {
                    next_cursor,
                    entries,
                }),
            ) => Ok(ClientEvent::ListPage {
                next_cursor: *next_cursor,
                entries: entries.clone(),
            }),
            (
                Expect::ListPage | Expect::RestoreBegin { .. } | Expect::Deleted,
                Response::Retrieval(RetrievalResponse::Refused { reason }),
            ) => Ok(ClientEvent::Refused(*reason)),
            (Expect::ListPage, _) => Err(unexpected("1640")),
            (
                Expect::RestoreBegin { file },
                Response::Retrieval(RetrievalResponse::RestoreBegin(begin)),
            ) => {
                if begin.file != file {
                    return Err(ClientError::RestoreMismatch {
                        expected: file,
                        got: begin.file.clone(),
                    });
                }
                let expected = pkcs7_len(begin.size);
                if begin.content_size != expected {
                    return Err(ClientError::RestoreSize {
                        size: begin.size,
                        content_size: begin.content_size,
                        expected,
                    });
                }
                self.expect = Expect::RestoreData {
                    remaining: begin.content_size,
                };
                Ok(ClientEvent::RestoreBegin(begin.clone()))
            }
            (Expect::RestoreBegin { .. }, Response::Retrieval(RetrievalResponse::NotFound))
            | (Expect::Deleted, Response::Retrieval(RetrievalResponse::NotFound)) => {
                Ok(ClientEvent::NotFound)
            }
            (Expect::RestoreBegin { .. }, _) => Err(unexpected("1641 or 1644")),
            (
                Expect::RestoreData { remaining },
                Response::Retrieval(RetrievalResponse::RestoreData { content }),
            ) => {
                let len = content.len() as u64;
                if len > remaining {
                    return Err(ClientError::RestoreOverrun {
                        content_size: remaining,
                        extra: len - remaining,
                    });
                }
                let remaining = remaining - len;
                if remaining > 0 {
                    self.expect = Expect::RestoreData { remaining };
                }
                Ok(ClientEvent::RestoreData {
                    content: content.clone(),
                    remaining,
                })
            }
            (Expect::RestoreData { .. }, _) => Err(unexpected("1642")),
            (Expect::Deleted, Response::Retrieval(RetrievalResponse::Deleted { versions })) => {
                Ok(ClientEvent::Deleted {
                    versions: *versions,
                })
            }
            (Expect::Deleted, _) => Err(unexpected("1643, 1644 or 1645")),
            (Expect::Idle, _) => Err(ClientError::Idle),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::wrap_aes_key;
    use crate::wire::RequestKind;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn name() -> FileName {
        FileName::try_from("f.bin").unwrap()
    }

    const ID: ClientId = ClientId([0x11; 16]);

    /// A session that has registered and holds an AES key.
    fn keyed_session(rng: &mut StdRng) -> ClientSession {
        let key = PrivateKey::generate_legacy(rng).unwrap();
        let public = key.public_key();
        let mut s = ClientSession::new(
            UserName::try_from("bob").unwrap(),
            key,
            None,
            Numbering::Modern,
        );
        s.register_request().unwrap();
        assert!(matches!(
            s.handle(Response::Registered { client_id: ID }, rng),
            Ok(ClientEvent::Registered(ID))
        ));
        s.public_key_request().unwrap();
        let wrapped = wrap_aes_key(rng, &public, &AesKey::from_bytes([5; 32])).unwrap();
        let event = s
            .handle(
                Response::KeyAccepted {
                    client_id: ID,
                    wrapped_key: wrapped.into(),
                },
                rng,
            )
            .unwrap();
        assert!(matches!(event, ClientEvent::KeyReady));
        assert_eq!(s.aes_key(), Some(&AesKey::from_bytes([5; 32])));
        s
    }

    fn received(cksum: u32, plan: &UploadPlan) -> Response {
        Response::FileReceived {
            client_id: ID,
            content_size: plan.content_size,
            file: plan.file.clone(),
            cksum,
        }
    }

    fn verdict(event: ClientEvent) -> (Verdict, RequestKind) {
        match event {
            ClientEvent::Verdict { verdict, reply } => (verdict, reply.request.kind()),
            other => panic!("expected a verdict, got {other:?}"),
        }
    }

    #[test]
    fn accepts_a_matching_cksum_and_then_the_ack() {
        let mut rng = StdRng::seed_from_u64(3);
        let mut s = keyed_session(&mut rng);
        let plan = UploadPlan::new(name(), 100, 64, 1 << 20).unwrap();
        s.begin_file();
        s.file_sent(&plan, 42);
        assert_eq!(
            verdict(s.handle(received(42, &plan), &mut rng).unwrap()),
            (Verdict::Match, RequestKind::CrcOk)
        );
        assert!(matches!(
            s.handle(Response::Ack { client_id: ID }, &mut rng),
            Ok(ClientEvent::Done)
        ));
        assert!(matches!(
            s.handle(Response::Ack { client_id: ID }, &mut rng),
            Err(ClientError::Idle)
        ));
    }

    #[test]
    fn accepts_a_resend_whether_or_not_the_server_acks_crc_wrong() {
        for server_acks in [true, false] {
            let mut rng = StdRng::seed_from_u64(4);
            let mut s = keyed_session(&mut rng);
            let plan = UploadPlan::new(name(), 100, 64, 1 << 20).unwrap();
            s.begin_file();
            s.file_sent(&plan, 42);
            let first = verdict(s.handle(received(41, &plan), &mut rng).unwrap());
            assert_eq!(
                first,
                (Verdict::Retry { attempt: 1 }, RequestKind::CrcRetry)
            );
            s.file_sent(&plan, 42);
            if server_acks {
                let ack = s.handle(Response::Ack { client_id: ID }, &mut rng).unwrap();
                assert!(matches!(ack, ClientEvent::RetryAcknowledged));
            }
            assert_eq!(
                verdict(s.handle(received(42, &plan), &mut rng).unwrap()).0,
                Verdict::Match
            );
        }
    }

    #[test]
    fn gives_up_on_the_fourth_mismatch() {
        let mut rng = StdRng::seed_from_u64(5);
        let mut s = keyed_session(&mut rng);
        let plan = UploadPlan::new(name(), 100, 64, 1 << 20).unwrap();
        s.begin_file();
        for attempt in 1..MAX_SEND_ATTEMPTS {
            s.file_sent(&plan, 42);
            assert_eq!(
                verdict(s.handle(received(0, &plan), &mut rng).unwrap()).0,
                Verdict::Retry { attempt }
            );
        }
        s.file_sent(&plan, 42);
        assert_eq!(
            verdict(s.handle(received(0, &plan), &mut rng).unwrap()),
            (Verdict::GiveUp, RequestKind::CrcAbort)
        );
        assert!(matches!(
            s.handle(Response::Ack { client_id: ID }, &mut rng),
            Ok(ClientEvent::Done)
        ));
    }

    #[test]
    fn does_not_count_an_upload_answered_with_1607() {
        let mut rng = StdRng::seed_from_u64(6);
        let mut s = keyed_session(&mut rng);
        let plan = UploadPlan::new(name(), 100, 64, 1 << 20).unwrap();
        s.begin_file();
        s.file_sent(&plan, 42);
        assert!(matches!(
            s.handle(Response::GeneralError, &mut rng),
            Ok(ClientEvent::ServerError(ServerErrorStep::Resend {
                resend: 1
            }))
        ));
        assert_eq!(s.attempts(), 0);
        for attempt in 1..MAX_SEND_ATTEMPTS {
            s.file_sent(&plan, 42);
            assert_eq!(
                verdict(s.handle(received(0, &plan), &mut rng).unwrap()).0,
                Verdict::Retry { attempt }
            );
        }
        s.file_sent(&plan, 42);
        assert_eq!(
            verdict(s.handle(received(0, &plan), &mut rng).unwrap()).0,
            Verdict::GiveUp
        );
    }

    #[test]
    fn keeps_expecting_the_answer_after_1607() {
        let mut rng = StdRng::seed_from_u64(7);
        let key = PrivateKey::generate_legacy(&mut rng).unwrap();
        let mut s = ClientSession::new(
            UserName::try_from("bob").unwrap(),
            key,
            Some(ID),
            Numbering::Classic,
        );
        let frame = s.reconnect_request();
        assert_eq!(frame.header().code.0, 827);
        assert!(matches!(
            s.handle(Response::GeneralError, &mut rng),
            Ok(ClientEvent::ServerError(ServerErrorStep::Resend {
                resend: 1
            }))
        ));
        let event = s
            .handle(Response::ReconnectRejected { client_id: None }, &mut rng)
            .unwrap();
        assert!(matches!(event, ClientEvent::MustRegister));
        assert_eq!(s.client_id(), None);
    }

    #[test]
    fn rejects_an_answer_for_another_client() {
        let mut rng = StdRng::seed_from_u64(8);
        let mut s = keyed_session(&mut rng);
        let plan = UploadPlan::new(name(), 100, 64, 1 << 20).unwrap();
        s.begin_file();
        s.file_sent(&plan, 42);
        let other = Response::FileReceived {
            client_id: ClientId([9; 16]),
            content_size: plan.content_size,
            file: name(),
            cksum: 42,
        };
        assert!(matches!(
            s.handle(other, &mut rng),
            Err(ClientError::ClientIdMismatch { .. })
        ));
    }

    fn retrieval(r: RetrievalResponse) -> Response {
        Response::Retrieval(r)
    }

    fn begin(file: &str, size: u64) -> RestoreBegin {
        RestoreBegin {
            version: 4,
            size,
            content_size: pkcs7_len(size),
            cksum: 9,
            iv: [3; 16],
            file: FileName::try_from(file).unwrap(),
        }
    }

    #[test]
    fn builds_retrieval_requests_with_their_codes_and_our_id() {
        let mut rng = StdRng::seed_from_u64(20);
        let mut s = keyed_session(&mut rng);
        let list = s.list_request(ListFlags::ALL_VERSIONS, 42);
        assert_eq!((list.header().code.0, list.client_id), (1240, ID));
        assert_eq!(
            list.request,
            Request::Retrieval(RetrievalRequest::List {
                flags: ListFlags::ALL_VERSIONS,
                cursor: 42
            })
        );
        let restore = s.restore_request(7, name());
        assert_eq!(restore.header().code.0, 1241);
        let delete = s.delete_request(name());
        assert_eq!(delete.header().code.0, 1242);
    }

    #[test]
    fn accepts_list_pages_until_asked_again() {
        let mut rng = StdRng::seed_from_u64(21);
        let mut s = keyed_session(&mut rng);
        s.list_request(ListFlags::LATEST, 0);
        let entry = ListEntry {
            version: 1,
            size: 3,
            stored_at: 1_700_000_000,
            cksum: 5,
            file: name(),
        };
        let page = retrieval(RetrievalResponse::ListPage {
            next_cursor: 8,
            entries: vec![entry.clone()],
        });
        match s.handle(page.clone(), &mut rng).unwrap() {
            ClientEvent::ListPage {
                next_cursor,
                entries,
            } => assert_eq!((next_cursor, entries), (8, vec![entry])),
            other => panic!("expected a page, got {other:?}"),
        }
        // Nothing more is due until the next request.
        assert!(matches!(s.handle(page, &mut rng), Err(ClientError::Idle)));
    }

    #[test]
    fn follows_a_restore_until_the_announced_size_arrived() {
        let mut rng = StdRng::seed_from_u64(22);
        let mut s = keyed_session(&mut rng);
        s.restore_request(0, name());
        let event = s
            .handle(
                retrieval(RetrievalResponse::RestoreBegin(begin("f.bin", 20))),
                &mut rng,
            )
            .unwrap();
        assert!(matches!(event, ClientEvent::RestoreBegin(b) if b.content_size == 32));
        assert!(s.restoring());
        let data = |n: usize| {
            retrieval(RetrievalResponse::RestoreData {
                content: Bytes::from(vec![0u8; n]),
            })
        };
        assert!(matches!(
            s.handle(data(16), &mut rng).unwrap(),
            ClientEvent::RestoreData { remaining: 16, .. }
        ));
        assert!(matches!(
            s.handle(data(16), &mut rng).unwrap(),
            ClientEvent::RestoreData { remaining: 0, .. }
        ));
        assert!(!s.restoring());
        assert!(matches!(
            s.handle(data(16), &mut rng),
            Err(ClientError::Idle)
        ));
    }

    #[test]
    fn rejects_restore_data_beyond_the_announced_size() {
        let mut rng = StdRng::seed_from_u64(23);
        let mut s = keyed_session(&mut rng);
        s.restore_request(0, name());
        s.handle(
            retrieval(RetrievalResponse::RestoreBegin(begin("f.bin", 0))),
            &mut rng,
        )
        .unwrap();
        let over = retrieval(RetrievalResponse::RestoreData {
            content: Bytes::from(vec![0u8; 17]),
        });
        assert!(matches!(
            s.handle(over, &mut rng),
            Err(ClientError::RestoreOverrun {
                content_size: 16,
                extra: 1
            })
        ));
    }

    #[test]
    fn rejects_a_restore_of_another_file_or_with_inconsistent_sizes() {
        let mut rng = StdRng::seed_from_u64(24);
        let mut s = keyed_session(&mut rng);
        s.restore_request(0, name());
        assert!(matches!(
            s.handle(
                retrieval(RetrievalResponse::RestoreBegin(begin("other", 1))),
                &mut rng
            ),
            Err(ClientError::RestoreMismatch { .. })
        ));
        s.restore_request(0, name());
        let mut bad = begin("f.bin", 16);
        bad.content_size = 16;
        assert!(matches!(
            s.handle(retrieval(RetrievalResponse::RestoreBegin(bad)), &mut rng),
            Err(ClientError::RestoreSize { expected: 32, .. })
        ));
    }

    #[test]
    fn reports_not_found_refused_and_deleted() {
        let mut rng = StdRng::seed_from_u64(25);
        let mut s = keyed_session(&mut rng);
        s.restore_request(3, name());
        assert!(matches!(
            s.handle(retrieval(RetrievalResponse::NotFound), &mut rng),
            Ok(ClientEvent::NotFound)
        ));
        s.delete_request(name());
        assert!(matches!(
            s.handle(
                retrieval(RetrievalResponse::Refused {
                    reason: RefusalReason::APPEND_ONLY
                }),
                &mut rng
            ),
            Ok(ClientEvent::Refused(RefusalReason::APPEND_ONLY))
        ));
        s.delete_request(name());
        assert!(matches!(
            s.handle(
                retrieval(RetrievalResponse::Deleted { versions: 2 }),
                &mut rng
            ),
            Ok(ClientEvent::Deleted { versions: 2 })
        ));
        s.delete_request(name());
        assert!(matches!(
            s.handle(Response::Ack { client_id: ID }, &mut rng),
            Err(ClientError::Unexpected { .. })
        ));
    }

    #[test]
    fn does_not_expect_a_retrieval_answer_again_after_1607() {
        let mut rng = StdRng::seed_from_u64(26);
        let mut s = keyed_session(&mut rng);
        s.list_request(ListFlags::LATEST, 0);
        assert!(matches!(
            s.handle(Response::GeneralError, &mut rng),
            Ok(ClientEvent::RetrievalUnsupported)
        ));
        let page = retrieval(RetrievalResponse::ListPage {
            next_cursor: 0,
            entries: vec![],
        });
        assert!(matches!(s.handle(page, &mut rng), Err(ClientError::Idle)));
        // Also in the middle of a restore: the restore is over.
        s.restore_request(0, name());
        s.handle(
            retrieval(RetrievalResponse::RestoreBegin(begin("f.bin", 40))),
            &mut rng,
        )
        .unwrap();
        assert!(matches!(
            s.handle(Response::GeneralError, &mut rng),
            Ok(ClientEvent::ServerError(ServerErrorStep::GiveUp {
                times: 1
            }))
        ));
        assert!(!s.restoring());
    }

    #[test]
    fn sends_a_legacy_proof_of_the_session_key_and_takes_1650_as_retrieval_allowed() {
        let mut rng = StdRng::seed_from_u64(20);
        let mut s = keyed_session(&mut rng);
        let frame = s.retrieval_proof_request().unwrap().unwrap();
        assert_eq!(frame.header().code.0, 1250);
        assert_eq!(frame.client_id, ID);
        let Request::Prove { proof } = frame.request else {
            panic!("not a proof: {frame:?}")
        };
        assert!(crate::secure::verify_legacy_retrieval_proof(
            &AesKey::from_bytes([5; 32]),
            ID,
            &proof
        ));
        assert!(matches!(
            s.handle(Response::Authenticated { client_id: ID }, &mut rng),
            Ok(ClientEvent::RetrievalAllowed)
        ));
        assert!(s.aes_key().is_some(), "the session key stays usable");
    }

    #[test]
    fn rejects_a_legacy_proof_request_before_the_key_exchange() {
        let mut rng = StdRng::seed_from_u64(21);
        let key = PrivateKey::generate_legacy(&mut rng).unwrap();
        let mut s = ClientSession::new(
            UserName::try_from("bob").unwrap(),
            key,
            Some(ID),
            Numbering::Modern,
        );
        assert!(matches!(
            s.retrieval_proof_request(),
            Err(ClientError::NotKeyed)
        ));
    }

    #[test]
    fn takes_1607_to_the_legacy_proof_as_retrieval_unsupported_not_to_repeat() {
        let mut rng = StdRng::seed_from_u64(22);
        let mut s = keyed_session(&mut rng);
        s.retrieval_proof_request().unwrap().unwrap();
        assert!(matches!(
            s.handle(Response::GeneralError, &mut rng),
            Ok(ClientEvent::RetrievalUnsupported)
        ));
        assert!(matches!(
            s.handle(Response::Authenticated { client_id: ID }, &mut rng),
            Err(ClientError::Idle)
        ));
    }

    #[test]
    fn rejects_1651_or_another_answer_to_the_legacy_proof() {
        let mut rng = StdRng::seed_from_u64(23);
        let mut s = keyed_session(&mut rng);
        s.retrieval_proof_request().unwrap().unwrap();
        assert!(matches!(
            s.handle(Response::NotAuthenticated, &mut rng),
            Err(ClientError::ProofRejected)
        ));
        let mut s = keyed_session(&mut rng);
        s.retrieval_proof_request().unwrap().unwrap();
        assert!(matches!(
            s.handle(Response::Ack { client_id: ID }, &mut rng),
            Err(ClientError::Unexpected { .. })
        ));
        let mut s = keyed_session(&mut rng);
        s.retrieval_proof_request().unwrap().unwrap();
        assert!(matches!(
            s.handle(
                Response::Authenticated {
                    client_id: ClientId([9; 16])
                },
                &mut rng
            ),
            Err(ClientError::ClientIdMismatch { .. })
        ));
    }

    #[test]
    fn resends_a_request_answered_1607_three_times_then_gives_up() {
        let mut rng = StdRng::seed_from_u64(30);
        let key = PrivateKey::generate_legacy(&mut rng).unwrap();
        let mut s = ClientSession::new(
            UserName::try_from("bob").unwrap(),
            key,
            Some(ID),
            Numbering::Modern,
        );
        s.reconnect_request();
        for resend in 1..=SERVER_ERROR_RESENDS {
            assert!(matches!(
                s.handle(Response::GeneralError, &mut rng),
                Ok(ClientEvent::ServerError(ServerErrorStep::Resend { resend: r })) if r == resend
            ));
            assert_eq!(s.server_errors(), resend);
        }
        assert!(matches!(
            s.handle(Response::GeneralError, &mut rng),
            Ok(ClientEvent::ServerError(ServerErrorStep::GiveUp {
                times: 4
            }))
        ));
        // The request is over: nothing more is expected for it.
        assert!(matches!(
            s.handle(Response::ReconnectRejected { client_id: None }, &mut rng),
            Err(ClientError::Idle)
        ));
        // A new request counts afresh.
        s.reconnect_request();
        assert_eq!(s.server_errors(), 0);
        assert!(matches!(
            s.handle(Response::GeneralError, &mut rng),
            Ok(ClientEvent::ServerError(ServerErrorStep::Resend {
                resend: 1
            }))
        ));
    }

    #[test]
    fn counts_the_1607s_of_an_upload_across_its_attempts_and_afresh_for_its_verdict() {
        let mut rng = StdRng::seed_from_u64(31);
        let mut s = keyed_session(&mut rng);
        let plan = UploadPlan::new(name(), 100, 64, 1 << 20).unwrap();
        s.begin_file();
        s.file_sent(&plan, 42);
        assert!(matches!(
            s.handle(Response::GeneralError, &mut rng),
            Ok(ClientEvent::ServerError(ServerErrorStep::Resend {
                resend: 1
            }))
        ));
        // A mismatch ("CRC wrong, will resend") goes on with the same upload.
        s.file_sent(&plan, 42);
        let (v, _) = verdict(s.handle(received(0, &plan), &mut rng).unwrap());
        assert_eq!(v, Verdict::Retry { attempt: 1 });
        s.file_sent(&plan, 42);
        assert!(matches!(
            s.handle(Response::GeneralError, &mut rng),
            Ok(ClientEvent::ServerError(ServerErrorStep::Resend {
                resend: 2
            }))
        ));
        // The match's "CRC ok" is a new request.
        s.file_sent(&plan, 42);
        let (v, kind) = verdict(s.handle(received(42, &plan), &mut rng).unwrap());
        assert_eq!((v, kind), (Verdict::Match, RequestKind::CrcOk));
        assert_eq!(s.server_errors(), 0);
        // The next file starts afresh too.
        s.begin_file();
        assert_eq!(s.server_errors(), 0);
    }

    #[test]
    fn takes_1607_to_a_later_retrieval_request_as_giving_up_at_once() {
        let mut rng = StdRng::seed_from_u64(32);
        let mut s = keyed_session(&mut rng);
        s.list_request(ListFlags::LATEST, 0);
        assert!(s.awaits_first_retrieval_answer());
        let page = retrieval(RetrievalResponse::ListPage {
            next_cursor: 0,
            entries: vec![],
        });
        assert!(matches!(
            s.handle(page, &mut rng),
            Ok(ClientEvent::ListPage { .. })
        ));
        s.delete_request(name());
        assert!(
            !s.awaits_first_retrieval_answer(),
            "the server answered a retrieval request on this connection"
        );
        assert!(matches!(
            s.handle(Response::GeneralError, &mut rng),
            Ok(ClientEvent::ServerError(ServerErrorStep::GiveUp {
                times: 1
            }))
        ));
        assert!(!s.awaits_first_retrieval_answer(), "nothing is awaited");
    }

    #[test]
    fn awaits_the_first_retrieval_answer_only_for_a_retrieval_request() {
        let mut rng = StdRng::seed_from_u64(33);
        let mut s = keyed_session(&mut rng);
        assert!(!s.awaits_first_retrieval_answer(), "idle");
        s.retrieval_proof_request().unwrap().unwrap();
        assert!(s.awaits_first_retrieval_answer());
        assert!(matches!(
            s.handle(Response::Authenticated { client_id: ID }, &mut rng),
            Ok(ClientEvent::RetrievalAllowed)
        ));
        s.restore_request(0, name());
        assert!(!s.awaits_first_retrieval_answer(), "the proof was answered");
    }

    #[test]
    fn says_when_the_first_request_got_nothing_but_1607() {
        let mut rng = StdRng::seed_from_u64(7);
        let key = PrivateKey::generate_legacy(&mut rng).unwrap();
        let name = UserName::try_from("u").unwrap();
        let mut s = ClientSession::new(name.clone(), key.clone(), None, Numbering::Modern);
        s.register_request().unwrap();
        assert!(!s.refused_from_the_start());
        for _ in 0..=SERVER_ERROR_RESENDS {
            s.handle(Response::GeneralError, &mut rng).unwrap();
            assert!(s.refused_from_the_start());
        }
        // Once anything else was answered, a 1607 is the server failing.
        let mut s = ClientSession::new(name, key, Some(ID), Numbering::Modern);
        s.reconnect_request();
        s.handle(
            Response::ReconnectRejected {
                client_id: Some(ID),
            },
            &mut rng,
        )
        .unwrap();
        s.register_request().unwrap();
        s.handle(Response::GeneralError, &mut rng).unwrap();
        assert!(!s.refused_from_the_start());
    }
}
