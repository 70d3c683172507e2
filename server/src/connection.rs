//! One client connection: read requests, drive the session machine, carry
//! out its actions, answer. This module holds the lifecycle (accept, run
//! loop, close) and the dispatch; each request kind's handler is in
//! [`cmd`], the protocol rules in the session.
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

mod cmd;
mod deadline;
mod register_limit;
mod restore;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use protocol::secure::{Binding, BINDING_LEN, EXPORTER_LABEL};
use protocol::session::server::{Action, ServerConfig, ServerSession, SessionError};
use protocol::{ClientId, CodecError, Dialect, RequestFrame, Response, ServerCodec};
use rand::rngs::StdRng;
use rand::SeedableRng;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, info_span, warn, Instrument, Span};

use crate::admission::Ticket;
use crate::config::Config;
use crate::metrics::{kind_label, Counted, Listener, Metrics};
use crate::storage::ingest::{Staged, Upload};
use crate::storage::{QuotaSetting, Storage, StorageError};
use deadline::Deadline;
pub(crate) use register_limit::RegisterLimiter;

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
    /// What is counted for `/metrics`.
    pub(crate) metrics: Arc<Metrics>,
}

/// Why a connection ended other than by the peer closing it or shutdown.
#[derive(Debug, thiserror::Error)]
enum Ended {
    #[error("{0}")]
    Read(CodecError),
    #[error("protocol violation: {0}")]
    Session(SessionError),
    #[error("storage failed: {0}")]
    Storage(StorageError),
    #[error("could not write a response: {0}")]
    Write(CodecError),
    #[error("response not taken by the peer within {0:?}")]
    WriteTimeout(Duration),
    #[error("restore stopped: {0}")]
    Restore(StorageError),
    #[error("client proved its key, but its registration was replaced meanwhile")]
    Replaced,
    #[error("restore framing: {0}")]
    Framing(protocol::restore::RestoreSendError),
    #[error("a file over the client's quota was refused")]
    Quota,
    #[error("BUG: the connection handler broke an invariant: {0}")]
    Invariant(&'static str),
}

impl From<SessionError> for Ended {
    /// An outcome reported with no action pending is the shell's bug, not
    /// the peer's.
    fn from(e: SessionError) -> Self {
        match e {
            SessionError::NoPendingAction => {
                Ended::Invariant("an outcome reported while no action was pending")
            }
            e => Ended::Session(e),
        }
    }
}

impl Ended {
    /// What the peer should still be sent: 1607 (or 1651 for a missing or
    /// wrong proof), unless the connection is already broken or the error
    /// was answered.
    fn answer(&self) -> Option<Response> {
        use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset};
        match self {
            // A storage failure was answered through the session already.
            Ended::Storage(_) | Ended::Quota | Ended::Write(_) | Ended::WriteTimeout(_) => None,
            Ended::Read(CodecError::Io(e))
                if matches!(e.kind(), ConnectionReset | ConnectionAborted | BrokenPipe) =>
            {
                None
            }
            Ended::Session(e) => Some(e.answer()),
            Ended::Read(_)
            | Ended::Restore(_)
            | Ended::Replaced
            | Ended::Framing(_)
            | Ended::Invariant(_) => Some(Response::GeneralError),
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
    /// The client's own quota setting as it was when the client was bound
    /// (`None`: not read). Only spares the check of a large upload as it
    /// starts when no quota can apply; the commit reads the current one.
    own_quota: Option<QuotaSetting>,
    /// The pack being received and the snapshot stage (`cmd/repo.rs`).
    repo: cmd::RepoConn,
    shared: Arc<Shared>,
    /// Whom registrations are counted against.
    peer: SocketAddr,
    span: Span,
    ticket: Ticket,
    /// Which listener it came in on, for the metrics.
    listener: Listener,
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
    let on = shared.metrics.on(Listener::Legacy);
    let (read, write) = (Counted::new(read, on), Counted::new(write, on));
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
    let stream = Counted::new(stream, shared.metrics.on(Listener::Secure));
    let handshake = tokio::select! {
        () = evicted.cancelled() => {
            debug!(%peer, "evicted during the TLS handshake: the unauthenticated budget is full");
            return;
        }
        handshake = tokio::time::timeout_at(first_by, acceptor.accept(stream)) => handshake,
    };
    let tls = match handshake {
        Ok(Ok(tls)) => {
            shared.metrics.tls_handshake("ok");
            tls
        }
        Ok(Err(e)) => {
            // Debug level: anyone can open connections that fail their
            // handshake as fast as they like, and each would be a line
            // (the count is in the metrics).
            shared.metrics.tls_handshake("failed");
            debug!(%peer, cause = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            shared.metrics.tls_handshake("timeout");
            debug!(%peer, "TLS handshake not completed within {limit:?}");
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
        let abandoned = conn.upload.is_some() || conn.staged.is_some() || conn.repo.in_pack();
        let storage_failed = matches!(result, Err(Ended::Storage(_)));
        if (conn.upload.is_some() || conn.staged.is_some()) && !storage_failed {
            conn.shared
                .metrics
                .upload_failed(conn.listener, "disconnected");
        }
        match &result {
            Ok(Next::Shutdown) => info!("closed for shutdown"),
            Ok(Next::Evicted) => {
                debug!("evicted before authenticating: the unauthenticated budget is full")
            }
            Ok(_) if abandoned => {
                info!("peer closed the connection in the middle of an upload; discarded")
            }
            Ok(_) => debug!("closed by peer"),
            Err(e @ Ended::Invariant(_)) => error!(cause = %e, "connection ended by a bug"),
            Err(e @ Ended::Quota) => info!(cause = %e, "connection ended"),
            Err(e) => warn!(cause = %e, "connection ended"),
        }
        conn.discard_upload().await;
        conn.discard_repo().await;
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
            leniency: config.leniency,
            ..ServerConfig::default()
        };
        let (dialect, session) = match security {
            Security::Legacy => (Dialect::Legacy, ServerSession::new(session_config)),
            Security::Secure(binding) => (
                Dialect::Secure,
                ServerSession::secure(session_config, binding),
            ),
        };
        let limits = config.limits.for_dialect(dialect);
        let listener = match security {
            Security::Legacy => Listener::Legacy,
            Security::Secure(_) => Listener::Secure,
        };
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
            own_quota: None,
            repo: cmd::RepoConn::default(),
            shared,
            peer,
            span,
            ticket,
            listener,
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
                    let kind = kind_label(frame.request.kind());
                    let handled = self.dispatch(*frame).instrument(span).await;
                    self.count(kind, &handled);
                    handled?;
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
            let closable = !self.reader.get_ref().in_request()
                && !self.session.has_uncommitted_upload()
                && !self.session.has_open_pack();
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

    /// Counts a handled request of `kind` by its outcome, and the storage
    /// failure that ended it, if one did.
    fn count(&self, kind: &'static str, handled: &Result<(), Ended>) {
        let metrics = &self.shared.metrics;
        let outcome = match handled {
            Ok(()) => "ok",
            Err(Ended::Session(_) | Ended::Quota) => "rejected",
            Err(Ended::Storage(e) | Ended::Restore(e)) => {
                metrics.storage_error(e);
                "failed"
            }
            Err(_) => "failed",
        };
        metrics.request(self.listener, kind, outcome);
    }

    fn bind_client(&self, client_id: ClientId) {
        self.span
            .record("client_id", tracing::field::display(client_id));
    }

    /// Hands a request to the session, then its action to the handler for
    /// the request kind (`cmd/*.rs`).
    async fn dispatch(&mut self, frame: RequestFrame) -> Result<(), Ended> {
        let kind = frame.request.kind();
        self.offer_spare(&frame);
        let header_id = frame.client_id;
        let action = match self.session.handle(frame, &mut self.rng) {
            Ok(action) => action,
            Err(e) => {
                // A missing or wrong proof (secure mode, or retrieval on the
                // legacy listener, docs/PROTOCOL.md §11.5) is answered 1651.
                match e {
                    SessionError::ProofRejected => {
                        self.shared.metrics.proof_refused(self.listener, "rejected");
                        info!(client_id = %header_id, "proof of the client's key refused");
                    }
                    SessionError::NotAuthenticated(request) => {
                        self.shared.metrics.proof_refused(self.listener, "unproven");
                        info!(client_id = %header_id, ?request, "refused: the client has not proved its key");
                    }
                    _ => {}
                }
                return Err(e.into());
            }
        };
        match action {
            Action::Reply(response @ Response::Authenticated { client_id }) => {
                self.proved(client_id, response).await
            }
            Action::Reply(response @ Response::Ack { .. })
                if kind == protocol::wire::RequestKind::CrcOk =>
            {
                info!("\"CRC ok\" repeated for the file just committed; answered 1604 again");
                self.reply(&response).await
            }
            Action::Reply(response) => self.reply(&response).await,
            Action::Register {
                client_id,
                name,
                secure_key,
            } => self.register(client_id, name, secure_key).await,
            Action::StoreKey { client_id, key, .. } => self.store_key(client_id, key).await,
            Action::LookupClient { client_id, name } => self.reconnect(client_id, name).await,
            Action::Write {
                start,
                plaintext,
                done,
            } => self.write(start, plaintext, done).await,
            Action::Commit {
                client_id,
                file,
                size,
                cksum,
                reply,
            } => self.commit(client_id, file, size, cksum, reply).await,
            Action::Discard { reply } => self.discard(kind, reply).await,
            Action::List {
                client_id,
                all_versions,
                skip,
                limit,
            } => self.list(client_id, all_versions, skip, limit).await,
            Action::FindVersion {
                client_id,
                file,
                version,
            } => self.find_version(client_id, file, version).await,
            Action::Delete { client_id, file } => self.delete(client_id, file).await,
            Action::Repo(action) => self.repo(action).await,
        }
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
