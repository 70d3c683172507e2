//! One client connection: read requests, drive the session machine, carry
//! out its actions, answer.
//!
//! Reading and decoding happen on the connection's task through a
//! `FramedRead` with the [`ServerCodec`]; decryption and the cksum happen in
//! [`ServerSession::handle`]; file content goes to a per-upload writer
//! thread ([`upload`]); a restore's content comes from a per-restore reader
//! thread ([`restore`]); metadata calls run on the blocking pool. Any
//! protocol violation is answered with 1607, logged with its precise cause,
//! and ends the connection (`docs/PROTOCOL.md` §5).
//!
//! The same handler serves both listeners: the legacy one over a plain
//! `TcpStream`, the secure one over TLS 1.3 ([`serve_secure`]), with a
//! session built for the dialect. It is generic over the two halves of the
//! stream, so that it can be driven in memory too.

mod deadline;
mod register_limit;
mod restore;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::{SinkExt, StreamExt};
use protocol::retrieval::{
    ListEntry, RefusalReason, RestoreBegin, RetrievalRequest, RetrievalResponse, MAX_LIST_ENTRIES,
};
use protocol::secure::{Binding, BINDING_LEN, EXPORTER_LABEL};
use protocol::session::server::{
    Action, KnownClient, RegisterOutcome, ServerConfig, ServerSession, SessionError,
};
use protocol::wire::RequestKind;
use protocol::{
    ClientId, CodecError, Dialect, Request, RequestFrame, Response, ServerCodec, UserName,
};
use rand::rngs::{OsRng, StdRng};
use rand::{RngCore, SeedableRng};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, info_span, warn, Instrument, Span};

use crate::admission::Ticket;
use crate::config::Config;
use crate::storage::ingest::{self as upload, Staged, Upload};
use crate::storage::{Deletion, Registration, Storage, StorageError, UploadCommit, VersionRecord};
use deadline::Deadline;
pub(crate) use register_limit::RegisterLimiter;
use register_limit::{Refusal, Verdict};

/// Initial read buffer: large reads keep the syscall count low.
const READ_BUFFER: usize = 128 * 1024;
/// How long a closing connection waits for its 1607 to go out and for the
/// peer to stop sending.
pub(crate) const LINGER: Duration = Duration::from_secs(1);
/// Bytes a closing connection discards at most while lingering.
const LINGER_BYTES: usize = 4 * 1024 * 1024;
/// How often a connection waiting for the rest of a request says so (debug
/// level), so that a stalled exchange shows which side waits for what.
const WAIT_NOTICE: Duration = Duration::from_secs(5);

/// What every connection shares.
pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) storage: Storage,
    pub(crate) shutdown: CancellationToken,
    /// Held (cloned) by every writer thread, so shutdown can wait for them.
    pub(crate) alive: mpsc::Sender<()>,
    /// The per-source limit on registrations.
    pub(crate) registrations: RegisterLimiter,
}

/// Why a connection ended other than by the peer closing it or shutdown.
#[derive(Debug, thiserror::Error)]
enum Ended {
    #[error("{0}")]
    Read(CodecError),
    #[error("protocol violation: {0}")]
    Session(#[from] SessionError),
    #[error("storage failed: {0}")]
    Storage(StorageError),
    #[error("could not write a response: {0}")]
    Write(CodecError),
    #[error("response not taken by the peer within {0:?}")]
    WriteTimeout(Duration),
    #[error("restore stopped: {0}")]
    Restore(restore::RestoreError),
    #[error("client proved its key, but its registration was replaced meanwhile")]
    Replaced,
}

impl Ended {
    /// What the peer should still be sent: 1607 (or 1651 for a missing or
    /// wrong proof), unless the connection is already broken or the error
    /// was answered.
    fn answer(&self) -> Option<Response> {
        use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset};
        match self {
            // A storage failure was answered through the session already.
            Ended::Storage(_) | Ended::Write(_) | Ended::WriteTimeout(_) => None,
            Ended::Read(CodecError::Io(e))
                if matches!(e.kind(), ConnectionReset | ConnectionAborted | BrokenPipe) =>
            {
                None
            }
            Ended::Session(e) => Some(e.answer()),
            Ended::Read(_) | Ended::Restore(_) | Ended::Replaced => Some(Response::GeneralError),
        }
    }
}

enum Next {
    /// Boxed: a frame is much larger than the other variants.
    Frame(Box<RequestFrame>),
    Eof,
    Shutdown,
    /// Another connection took this unauthenticated one's slot.
    Evicted,
}

/// Which protocol a connection speaks.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Security {
    /// Plain legacy version 3.
    Legacy,
    /// Secure mode inside TLS, with the connection's channel binding.
    Secure(Binding),
}

struct Connection<R, W> {
    reader: FramedRead<Deadline<R>, ServerCodec>,
    writer: FramedWrite<W, ServerCodec>,
    session: ServerSession,
    rng: StdRng,
    upload: Option<Upload>,
    staged: Option<Staged>,
    shared: Arc<Shared>,
    /// Whom registrations are counted against.
    peer: SocketAddr,
    span: Span,
    ticket: Ticket,
}

/// Serves one accepted connection on the legacy listener to its end.
pub(crate) async fn serve_legacy(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    ticket: Ticket,
) {
    if let Err(e) = stream.set_nodelay(true) {
        debug!(cause = %e, "could not disable Nagle's algorithm");
    }
    let (read, write) = stream.into_split();
    let first_by = tokio::time::Instant::now() + shared.config.handshake_timeout;
    serve(
        read,
        write,
        peer,
        shared,
        Security::Legacy,
        ticket,
        first_by,
    )
    .await;
}

/// Serves one accepted connection on the secure listener to its end: the
/// TLS handshake and the first request (within the handshake timeout), then
/// the session.
pub(crate) async fn serve_secure(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    acceptor: TlsAcceptor,
    ticket: Ticket,
) {
    if let Err(e) = stream.set_nodelay(true) {
        debug!(cause = %e, "could not disable Nagle's algorithm");
    }
    let limit = shared.config.handshake_timeout;
    let first_by = tokio::time::Instant::now() + limit;
    let evicted = ticket.evicted().clone();
    let handshake = tokio::select! {
        () = evicted.cancelled() => {
            debug!(%peer, "evicted during the TLS handshake: the unauthenticated budget is full");
            return;
        }
        handshake = tokio::time::timeout_at(first_by, acceptor.accept(stream)) => handshake,
    };
    let tls = match handshake {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            info!(%peer, cause = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            info!(%peer, "TLS handshake not completed within {limit:?}");
            return;
        }
    };
    let mut binding: Binding = [0; BINDING_LEN];
    if let Err(e) = tls
        .get_ref()
        .1
        .export_keying_material(&mut binding, EXPORTER_LABEL, None)
    {
        error!(%peer, cause = %e, "cannot derive the channel binding; closing");
        return;
    }
    let (read, write) = tokio::io::split(tls);
    serve(
        read,
        write,
        peer,
        shared,
        Security::Secure(binding),
        ticket,
        first_by,
    )
    .await;
}

/// Serves one connection, already past any TLS handshake, to its end; its
/// first whole request must be in by `first_by`. Until it authenticates,
/// the connection ends as soon as its ticket is evicted. Never panics on
/// peer input; every ending is logged in the connection's span.
pub(crate) async fn serve<R, W>(
    read: R,
    write: W,
    peer: SocketAddr,
    shared: Arc<Shared>,
    security: Security,
    ticket: Ticket,
    first_by: tokio::time::Instant,
) where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    let mode = match security {
        Security::Legacy => "legacy",
        Security::Secure(_) => "secure",
    };
    let span = info_span!("conn", %peer, mode, client_id = tracing::field::Empty);
    let inner = span.clone();
    async move {
        debug!("accepted");
        let evicted = ticket.evicted().clone();
        let mut conn = Connection::new(read, write, shared, peer, inner, security, ticket);
        conn.reader.get_mut().first_request_by(first_by);
        // Eviction comes only before authentication, when nothing is being
        // uploaded: dropping the session there loses nothing.
        let result = tokio::select! {
            result = conn.run() => result,
            () = evicted.cancelled() => Ok(Next::Evicted),
        };
        let abandoned = conn.upload.is_some() || conn.staged.is_some();
        match &result {
            Ok(Next::Shutdown) => info!("closed for shutdown"),
            Ok(Next::Evicted) => {
                debug!("evicted before authenticating: the unauthenticated budget is full")
            }
            Ok(_) if abandoned => {
                info!("peer closed the connection in the middle of an upload; discarded")
            }
            Ok(_) => debug!("closed by peer"),
            Err(e) => warn!(cause = %e, "connection ended"),
        }
        conn.discard_upload().await;
        if let Err(e) = result {
            conn.close_with_error(e.answer()).await;
        }
    }
    .instrument(span)
    .await;
}

impl<R, W> Connection<R, W>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    fn new(
        read: R,
        write: W,
        shared: Arc<Shared>,
        peer: SocketAddr,
        span: Span,
        security: Security,
        ticket: Ticket,
    ) -> Self {
        let config = &shared.config;
        let session_config = ServerConfig {
            reply_to_crc_retry: config.reply_to_crc_retry,
            limits: config.limits,
        };
        let (dialect, session) = match security {
            Security::Legacy => (Dialect::Legacy, ServerSession::new(session_config)),
            Security::Secure(binding) => (
                Dialect::Secure,
                ServerSession::secure(session_config, binding),
            ),
        };
        let limits = config.limits.for_dialect(dialect);
        let deadline = Deadline::new(read, config.idle_timeout, config.request_timeout);
        Self {
            reader: FramedRead::with_capacity(
                deadline,
                ServerCodec::with_dialect(limits, dialect),
                READ_BUFFER,
            ),
            writer: FramedWrite::new(write, ServerCodec::with_dialect(limits, dialect)),
            session,
            rng: StdRng::from_entropy(),
            upload: None,
            staged: None,
            shared,
            peer,
            span,
            ticket,
        }
    }

    /// Serves requests until the peer closes, shutdown, or an error.
    async fn run(&mut self) -> Result<Next, Ended> {
        loop {
            match self.next_frame().await? {
                Next::Frame(frame) => {
                    self.reader.get_mut().first_request_done();
                    let header = frame.header();
                    let span = tracing::debug_span!("request", code = %header.code, len = header.payload_len);
                    self.dispatch(*frame).instrument(span).await?;
                    if !self.ticket.is_authenticated() && self.session.authenticated() {
                        self.ticket.authenticated();
                    }
                }
                end => return Ok(end),
            }
        }
    }

    /// The next request. At a request boundary with no upload in progress,
    /// shutdown closes the connection; otherwise the request or upload in
    /// flight continues (the server cuts it when the grace period ends).
    /// Cancel-safe: `FramedRead` keeps partial frames.
    async fn next_frame(&mut self) -> Result<Next, Ended> {
        let buffered = !self.reader.read_buffer().is_empty();
        self.reader.get_mut().arm(buffered);
        let shutdown = self.shared.shutdown.clone();
        let started = tokio::time::Instant::now();
        let mut notice = tokio::time::interval_at(started + WAIT_NOTICE, WAIT_NOTICE);
        loop {
            let closable =
                !self.reader.get_ref().in_request() && !self.session.has_uncommitted_upload();
            tokio::select! {
                biased;
                () = shutdown.cancelled(), if closable => {
                    if self.reader.get_ref().in_request() {
                        continue;
                    }
                    return Ok(Next::Shutdown);
                }
                item = self.reader.next() => return match item {
                    None => Ok(Next::Eof),
                    Some(Ok(frame)) => Ok(Next::Frame(Box::new(frame))),
                    Some(Err(e)) => Err(Ended::Read(e)),
                },
                _ = notice.tick() => self.waiting_notice(started),
            }
        }
    }

    /// Says at debug level what a connection that has waited a while is
    /// waiting for: the rest of a request (how much of it is in), or the
    /// next one.
    fn waiting_notice(&self, started: tokio::time::Instant) {
        let waited_secs = started.elapsed().as_secs();
        let buffered = self.reader.read_buffer().len();
        match self.reader.decoder().partial() {
            Some(header) => debug!(
                waited_secs,
                code = %header.code,
                payload_len = header.payload_len,
                received = buffered,
                "waiting for the rest of a request"
            ),
            None if self.reader.get_ref().in_request() => debug!(
                waited_secs,
                received = buffered,
                "waiting for the rest of a request header"
            ),
            // Once per wait: an idle client is the normal case.
            None if started.elapsed() < 2 * WAIT_NOTICE => {
                debug!(waited_secs, "waiting for the next request")
            }
            None => {}
        }
    }

    /// Runs `f` on the blocking pool (the connection itself is not `Sync`,
    /// so this takes only what the closure needs).
    fn blocking<T, F>(
        &self,
        f: F,
    ) -> impl std::future::Future<Output = Result<T, StorageError>> + Send + 'static
    where
        T: Send + 'static,
        F: FnOnce(&Storage) -> Result<T, StorageError> + Send + 'static,
    {
        let storage = self.shared.storage.clone();
        async move {
            tokio::task::spawn_blocking(move || f(&storage))
                .await
                .map_err(|e| StorageError::Worker(e.to_string()))?
        }
    }

    async fn reply(&mut self, response: &Response) -> Result<(), Ended> {
        let limit = self.shared.config.request_timeout;
        match tokio::time::timeout(limit, self.writer.send(response)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Ended::Write(e)),
            Err(_) => Err(Ended::WriteTimeout(limit)),
        }
    }

    /// Answers a storage failure with 1607 and ends the connection: the
    /// session has forgotten the upload, so the client cannot carry on.
    async fn storage_failure(&mut self, e: StorageError) -> Result<(), Ended> {
        let response = self.session.storage_failed();
        self.reply(&response).await?;
        Err(Ended::Storage(e))
    }

    fn bind_client(&self, client_id: ClientId) {
        self.span
            .record("client_id", tracing::field::display(client_id));
    }

    async fn dispatch(&mut self, frame: RequestFrame) -> Result<(), Ended> {
        let kind = frame.request.kind();
        // Large packets go to the writer as they are: hand one of its used
        // buffers back for this packet's plaintext. (Small ones are copied
        // into a batch, whose buffers are recycled by the upload itself.)
        if let (Request::SendFile(packet), Some(upload)) = (&frame.request, self.upload.as_mut()) {
            let needed = packet.content.len() + protocol::crypto::BLOCK;
            if needed > upload::BATCH {
                if let Some(buf) = upload.spare(needed) {
                    self.session.recycle(buf);
                }
            }
        }
        let header_id = frame.client_id;
        let action = match self.session.handle(frame, &mut self.rng) {
            Ok(action) => action,
            Err(e) => {
                // A missing or wrong proof (secure mode, or retrieval on the
                // legacy listener, docs/PROTOCOL.md §11.5) is answered 1651.
                match e {
                    SessionError::ProofRejected => {
                        info!(client_id = %header_id, "proof of the client's key refused");
                    }
                    SessionError::NotAuthenticated(request) => {
                        info!(client_id = %header_id, ?request, "refused: the client has not proved its key");
                    }
                    _ => {}
                }
                return Err(e.into());
            }
        };
        match action {
            Action::Reply(response) => {
                if let Response::Authenticated { client_id } = response {
                    self.bind_client(client_id);
                    self.record_completion(client_id).await?;
                    info!("client proved its key");
                }
                self.reply(&response).await
            }
            Action::Retrieve { client_id, request } => self.retrieve(client_id, request).await,
            Action::Register {
                client_id,
                name,
                secure_key,
            } => self.register(client_id, name, secure_key).await,
            Action::StoreKey { client_id, key, .. } => {
                let stored = match self
                    .blocking(move |s| s.meta().set_public_key(client_id, &key, SystemTime::now()))
                    .await
                {
                    Ok(true) => true,
                    Ok(false) => {
                        error!("client is not in the metadata; public key not stored");
                        false
                    }
                    Err(e) => {
                        error!(cause = %e, "storing the public key failed");
                        false
                    }
                };
                let response = self.session.key_stored(stored, &mut self.rng)?;
                if matches!(response, Response::KeyAccepted { .. }) {
                    info!("public key stored; session key sent");
                }
                self.reply(&response).await
            }
            Action::LookupClient { client_id, name } => {
                let found = match self.blocking(move |s| s.meta().client(client_id)).await {
                    Ok(found) => found,
                    Err(e) => {
                        error!(cause = %e, "client lookup failed");
                        let response = self.session.storage_failed();
                        return self.reply(&response).await;
                    }
                };
                let known = found.map(|c| KnownClient {
                    name: c.name,
                    public_key: c.public_key,
                    secure_key: c.secure_key.map(bytes::Bytes::from),
                });
                let response = self.session.looked_up(known, &mut self.rng)?;
                if matches!(response, Response::Reconnected { .. }) {
                    self.bind_client(client_id);
                    info!(name = ?name, "reconnected; session key sent");
                    let storage = self.shared.storage.clone();
                    tokio::task::spawn_blocking(move || {
                        if let Err(e) = storage.meta().touch(client_id, SystemTime::now()) {
                            warn!(cause = %e, "could not update last seen");
                        }
                    });
                } else {
                    info!(%client_id, name = ?name, "reconnect refused: unknown id, other name or no public key");
                }
                self.reply(&response).await
            }
            Action::Write {
                start,
                plaintext,
                done,
            } => {
                if let Some(start) = start {
                    let Some((client_id, _)) = self.session.client() else {
                        return Err(SessionError::NoPendingAction.into());
                    };
                    debug!(file = ?start.file, orig_size = start.orig_size, attempt = start.attempt, "upload started");
                    self.discard_upload().await;
                    match self.shared.storage.begin_upload(
                        client_id,
                        start.orig_size,
                        self.shared.alive.clone(),
                    ) {
                        Ok(upload) => self.upload = Some(upload),
                        Err(e) => return self.storage_failure(e).await,
                    }
                }
                let Some(upload) = self.upload.as_mut() else {
                    return Err(SessionError::NoPendingAction.into());
                };
                if let Err(e) = upload.write(plaintext).await {
                    return self.storage_failure(e).await;
                }
                let Some(done) = done else {
                    return Ok(());
                };
                let Some(upload) = self.upload.take() else {
                    return Err(SessionError::NoPendingAction.into());
                };
                match upload.finish().await {
                    Ok(staged) => self.staged = Some(staged),
                    Err(e) => return self.storage_failure(e).await,
                }
                self.reply(&done).await
            }
            Action::Commit {
                client_id,
                file,
                size,
                cksum,
                reply,
            } => {
                let Some(staged) = self.staged.take() else {
                    return Err(SessionError::NoPendingAction.into());
                };
                let started = staged.started;
                let commit = UploadCommit {
                    client: client_id,
                    file: file.clone(),
                    size,
                    cksum,
                };
                if let Err(e) = self
                    .blocking(move |s| s.commit_upload(staged, commit))
                    .await
                {
                    return self.storage_failure(e).await;
                }
                let secs = started.elapsed().as_secs_f64();
                let mb_per_s = size as f64 / 1e6 / secs.max(1e-6);
                info!(file = ?file, size, cksum, secs = format_args!("{secs:.3}"), mb_per_s = format_args!("{mb_per_s:.1}"), "upload committed");
                self.reply(&reply).await
            }
            Action::Discard { reply } => {
                self.discard_upload().await;
                match (kind, &reply) {
                    (_, Some(Response::GeneralError)) => {
                        warn!("client confirmed a cksum for content whose padding or size was wrong; discarded")
                    }
                    (RequestKind::CrcRetry, _) => info!(
                        "client reported a cksum mismatch; attempt discarded, a resend follows"
                    ),
                    (RequestKind::CrcAbort, _) => {
                        warn!("client gave up after repeated cksum mismatches; nothing committed")
                    }
                    _ => info!("upload discarded"),
                }
                match reply {
                    Some(response) => self.reply(&response).await,
                    None => Ok(()),
                }
            }
        }
    }

    /// Answers a retrieval request (`docs/PROTOCOL.md` §11). A storage
    /// failure is answered 1607 and ends the connection.
    async fn retrieve(
        &mut self,
        client_id: ClientId,
        request: RetrievalRequest,
    ) -> Result<(), Ended> {
        match request {
            RetrievalRequest::List { flags, cursor } => {
                let all = flags.all_versions();
                let page = MAX_LIST_ENTRIES;
                let found = self
                    .blocking(move |s| s.meta().list(client_id, all, cursor, page + 1))
                    .await;
                let mut versions = match found {
                    Ok(v) => v,
                    Err(e) => return self.retrieval_failure(e).await,
                };
                let more = versions.len() > page;
                versions.truncate(page);
                let next_cursor = if more {
                    cursor.saturating_add(page as u64)
                } else {
                    0
                };
                let entries: Vec<ListEntry> = versions.into_iter().map(list_entry).collect();
                debug!(
                    all_versions = all,
                    cursor,
                    entries = entries.len(),
                    next_cursor,
                    "list"
                );
                self.reply(&Response::Retrieval(RetrievalResponse::ListPage {
                    next_cursor,
                    entries,
                }))
                .await
            }
            RetrievalRequest::Restore { version, file } => {
                let f = file.clone();
                let found = self
                    .blocking(move |s| s.meta().find_version(client_id, &f, version))
                    .await;
                match found {
                    Ok(Some(v)) => self.restore(v).await,
                    Ok(None) => {
                        info!(file = ?file, version, "restore: no such file or version");
                        self.reply(&Response::Retrieval(RetrievalResponse::NotFound))
                            .await
                    }
                    Err(e) => self.retrieval_failure(e).await,
                }
            }
            RetrievalRequest::Delete { file } => {
                let f = file.clone();
                let append_only = self.shared.config.append_only;
                let outcome = self
                    .blocking(move |s| s.delete_file(client_id, &f, append_only))
                    .await;
                let response = match outcome {
                    Ok(Deletion::Deleted(removed)) => {
                        info!(file = ?file, versions = removed.len(), "deleted");
                        RetrievalResponse::Deleted {
                            versions: u32::try_from(removed.len()).unwrap_or(u32::MAX),
                        }
                    }
                    Ok(Deletion::NotFound) => {
                        info!(file = ?file, "delete: no such file");
                        RetrievalResponse::NotFound
                    }
                    Ok(Deletion::Refused) => {
                        info!(file = ?file, "delete refused: append-only");
                        RetrievalResponse::Refused {
                            reason: RefusalReason::APPEND_ONLY,
                        }
                    }
                    Err(e) => return self.retrieval_failure(e).await,
                };
                self.reply(&Response::Retrieval(response)).await
            }
        }
    }

    /// Carries out a registration (legacy 1025, secure-mode 1025 with a
    /// key): the per-source rate limit first, then storage, where a name
    /// whose client never completed may be taken over after the grace
    /// period (`docs/PROTOCOL.md` §6.1, §12.3).
    async fn register(
        &mut self,
        client_id: ClientId,
        name: UserName,
        secure_key: Option<bytes::Bytes>,
    ) -> Result<(), Ended> {
        // Over the limit: "registration failed" (1601), which every
        // client understands, without touching storage (§6.1).
        if let Verdict::Refused { why, log } = self
            .shared
            .registrations
            .check(self.peer.ip(), Instant::now())
        {
            if log {
                match why {
                    Refusal::OverRate => {
                        info!(name = ?name, "registration refused: over the rate limit for this address (further refusals for it are not logged for a minute)")
                    }
                    Refusal::TableFull => {
                        warn!(name = ?name, "registration refused: too many addresses registering at once (further refusals are not logged for a minute)")
                    }
                }
            }
            let response = self
                .session
                .registered(RegisterOutcome::NameTaken, &mut self.rng)?;
            return self.reply(&response).await;
        }
        let n = name.clone();
        let grace = self.shared.config.registration_grace;
        let registration = self
            .blocking(move |s| {
                s.meta().register_client(
                    client_id,
                    &n,
                    secure_key.as_deref(),
                    SystemTime::now(),
                    Some(grace),
                )
            })
            .await;
        let outcome = match &registration {
            Ok(Registration::Created | Registration::Replaced { .. }) => RegisterOutcome::Created,
            Ok(Registration::NameTaken) => RegisterOutcome::NameTaken,
            Err(e) => {
                error!(cause = %e, "registration failed");
                RegisterOutcome::Failed
            }
        };
        let response = self.session.registered(outcome, &mut self.rng)?;
        match registration {
            Ok(Registration::Created) => {
                self.bind_client(client_id);
                info!(name = ?name, "registered");
            }
            Ok(Registration::Replaced { stale }) => {
                self.bind_client(client_id);
                info!(name = ?name, %stale, "registered in place of a client that never completed its registration");
            }
            Ok(Registration::NameTaken) => {
                info!(name = ?name, "registration refused: name taken")
            }
            Err(_) => {}
        }
        self.reply(&response).await
    }

    /// Records that `client_id` completed its registration by proving its
    /// key, before the 1650 goes out: from then on its name is never
    /// registrable again (§12.3). A storage failure, or a registration
    /// replaced meanwhile (the grace period ran out while the client was
    /// connected), is answered 1607 and ends the connection.
    async fn record_completion(&mut self, client_id: ClientId) -> Result<(), Ended> {
        match self
            .blocking(move |s| s.meta().complete(client_id, SystemTime::now()))
            .await
        {
            Ok(true) => Ok(()),
            Ok(false) => Err(Ended::Replaced),
            Err(e) => {
                error!(cause = %e, "recording the completed registration failed");
                self.reply(&Response::GeneralError).await?;
                Err(Ended::Storage(e))
            }
        }
    }

    async fn retrieval_failure(&mut self, e: StorageError) -> Result<(), Ended> {
        error!(cause = %e, "retrieval failed in storage");
        self.reply(&Response::GeneralError).await?;
        Err(Ended::Storage(e))
    }

    /// Sends one version: 1641, then its ciphertext under a fresh IV in
    /// 1642 packets streamed from the reader thread.
    async fn restore(&mut self, version: VersionRecord) -> Result<(), Ended> {
        let mut iv = [0u8; protocol::crypto::BLOCK];
        OsRng.fill_bytes(&mut iv);
        let Some(cipher) = self.session.restore_cipher(&iv) else {
            return Err(SessionError::NoPendingAction.into());
        };
        let packet = restore::packet_len(self.shared.config.limits.max_packet_content);
        let started = Instant::now();
        let (file, number, size) = (version.file.clone(), version.version, version.size);
        let begin = RestoreBegin {
            version: u64::try_from(number).unwrap_or_default(),
            size,
            content_size: protocol::crypto::pkcs7_len(size),
            cksum: version.cksum,
            iv,
            file: file.clone(),
        };
        let mut packets = match restore::start(
            self.shared.storage.clone(),
            version,
            cipher,
            packet,
            self.shared.alive.clone(),
        ) {
            Ok(rx) => rx,
            Err(e) => return self.retrieval_failure(e).await,
        };
        self.reply(&Response::Retrieval(RetrievalResponse::RestoreBegin(begin)))
            .await?;
        while let Some(next) = packets.recv().await {
            match next {
                Ok(content) => {
                    self.reply(&Response::Retrieval(RetrievalResponse::RestoreData {
                        content,
                    }))
                    .await?;
                }
                Err(e) => {
                    error!(file = ?file, version = number, cause = %e, "RESTORE ABORTED: stored content is damaged or unreadable; closing the connection");
                    return Err(Ended::Restore(e));
                }
            }
        }
        let secs = started.elapsed().as_secs_f64();
        let mb_per_s = size as f64 / 1e6 / secs.max(1e-6);
        info!(file = ?file, version = number, size, secs = format_args!("{secs:.3}"), mb_per_s = format_args!("{mb_per_s:.1}"), "restore sent");
        Ok(())
    }

    /// Drops any upload in progress (its writer removes the temporary) and
    /// any staged content (removed on the blocking pool).
    async fn discard_upload(&mut self) {
        self.upload = None;
        if let Some(staged) = self.staged.take() {
            let _ = tokio::task::spawn_blocking(move || staged.abort()).await;
        }
    }

    /// Sends `answer` if any (1607 or 1651), then closes gracefully: our
    /// side first, then briefly discarding what the peer still sends, so
    /// that the close is not a reset that could destroy the answer in flight.
    async fn close_with_error(self, answer: Option<Response>) {
        let Connection {
            reader, mut writer, ..
        } = self;
        if let Some(answer) = answer {
            let _ = tokio::time::timeout(LINGER, writer.send(&answer)).await;
        }
        let mut write = writer.into_inner();
        let _ = tokio::time::timeout(LINGER, write.shutdown()).await;
        let mut read = reader.into_inner().into_inner();
        linger(&mut read).await;
    }
}

/// A version as a list entry.
fn list_entry(v: VersionRecord) -> ListEntry {
    ListEntry {
        version: u64::try_from(v.version).unwrap_or_default(),
        size: v.size,
        stored_at: v
            .stored_at
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default(),
        cksum: v.cksum,
        file: v.file,
    }
}

/// Reads and discards for at most [`LINGER`] or [`LINGER_BYTES`].
pub(crate) async fn linger<R: tokio::io::AsyncRead + Unpin>(read: &mut R) {
    let mut sink = vec![0u8; 16 * 1024];
    let mut total = 0usize;
    let _ = tokio::time::timeout(LINGER, async {
        loop {
            match read.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    total += n;
                    if total >= LINGER_BYTES {
                        break;
                    }
                }
            }
        }
    })
    .await;
}
