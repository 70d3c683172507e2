//! One connection to a server, plain (legacy) or TLS 1.3 (secure mode):
//! requests out, responses in, every wait bounded by a timeout.
//!
//! Responses are decoded and requests encoded by `protocol::ClientCodec`.
//! Requests go through [`ClientCodec::encode_head`], the codec's encoder
//! without the copy of a file packet's content: the 290 bytes of headers and
//! the content are written with one vectored write, then flushed (a request
//! is on the wire before we wait for its answer).
//!
//! With a packet gap (`--packet-gap`, legacy servers that read a whole
//! request with one `recv()`), each request is written from one buffer and
//! two requests sent without an answer between them are that far apart.
//!
//! A TLS handshake answered with the bytes of a legacy response header is
//! reported as a legacy server ([`Error::LegacyServer`]), never retried in
//! the clear.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use futures::StreamExt;
use protocol::secure::{Binding, Fingerprint, BINDING_LEN, EXPORTER_LABEL};
use protocol::{ClientCodec, CodecError, Dialect, Limits, RequestFrame, Response};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::codec::FramedRead;

use crate::error::{io_reason, Error};
use crate::settings::Options;
use crate::tls::Trust;

/// How often a long wait for an answer is logged (debug level).
const WAIT_NOTICE: Duration = Duration::from_secs(5);

type Reader = Box<dyn AsyncRead + Send + Unpin>;
type Writer = Box<dyn AsyncWrite + Send + Unpin>;

/// How to secure a connection: the trust in the server's certificate, and
/// where that trust comes from (for messages).
#[derive(Debug, Clone)]
pub struct Secure {
    pub trust: Trust,
    pub pinned_in: String,
}

/// An open connection.
pub struct Connection {
    server: String,
    timeout: Duration,
    dialect: Dialect,
    /// Secure mode: the TLS exporter value and the server's fingerprint.
    binding: Option<Binding>,
    fingerprint: Option<Fingerprint>,
    reader: FramedRead<Reader, ClientCodec>,
    writer: Writer,
    head: BytesMut,
    /// The least time between two requests sent without an answer between
    /// them (`--packet-gap`); each request is then one write.
    gap: Option<Duration>,
    /// When the last request was sent, if no answer came since.
    unanswered_since: Option<tokio::time::Instant>,
    /// The size the last 1604 declared, when more than the id it carried.
    misdeclared_ack: Option<u32>,
}

/// How many bytes of the server's first answer [`Sniffer`] keeps.
const SNIFFED: usize = 8;

/// A stream that keeps a copy of the first [`SNIFFED`] bytes read from it,
/// so that a failed TLS handshake can say what the server sent instead.
struct Sniffer<S> {
    inner: S,
    seen: Arc<Mutex<Vec<u8>>>,
    kept: usize,
}

impl<S: AsyncRead + Unpin> AsyncRead for Sniffer<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if self.kept < SNIFFED {
            let new = buf.filled().get(before..).unwrap_or_default();
            let take = new.len().min(SNIFFED - self.kept);
            if let (Ok(mut seen), Some(bytes)) = (self.seen.lock(), new.get(..take)) {
                seen.extend_from_slice(bytes);
            }
            self.kept += take;
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Sniffer<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("server", &self.server)
            .field("dialect", &self.dialect)
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// Connects to `options.server`: in the clear when `secure` is `None`
    /// (legacy), else with a TLS 1.3 handshake that checks the server's
    /// certificate as `secure` says.
    ///
    /// # Errors
    /// [`Error::Connect`] or [`Error::ConnectTimeout`];
    /// [`Error::ServerIdentityChanged`] when the certificate is not the
    /// pinned one; [`Error::Tls`] when the handshake fails otherwise.
    pub async fn open(options: &Options, secure: Option<&Secure>) -> Result<Self, Error> {
        let server = options.server.clone();
        let stream = match tokio::time::timeout(
            options.connect_timeout,
            TcpStream::connect(&server),
        )
        .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return Err(Error::Connect {
                    server,
                    reason: io_reason(&e),
                })
            }
            Err(_) => {
                return Err(Error::ConnectTimeout {
                    server,
                    secs: options.connect_timeout.as_secs(),
                })
            }
        };
        // Small requests (register, verdicts) must not wait for Nagle; large
        // packets are written whole, so this costs nothing for them.
        let _ = stream.set_nodelay(true);
        tracing::debug!(server = %server, "connected");
        let Some(secure) = secure else {
            let (read, write) = stream.into_split();
            return Ok(Self::build(
                server,
                options,
                Dialect::Legacy,
                Box::new(read),
                Box::new(write),
            ));
        };
        let (config, presented) = crate::tls::client_config(secure.trust)?;
        let name = rustls::pki_types::ServerName::try_from(crate::tls::SERVER_NAME)
            .map_err(|e| Error::Internal(format!("bad TLS server name: {e}")))?;
        let connector = tokio_rustls::TlsConnector::from(config);
        let sniffed = Arc::new(Mutex::new(Vec::with_capacity(SNIFFED)));
        let stream = Sniffer {
            inner: stream,
            seen: Arc::clone(&sniffed),
            kept: 0,
        };
        let handshake =
            tokio::time::timeout(options.connect_timeout, connector.connect(name, stream)).await;
        let seen = presented.lock().ok().and_then(|s| *s);
        let tls = match handshake {
            Ok(Ok(tls)) => tls,
            Ok(Err(_))
                if sniffed
                    .lock()
                    .is_ok_and(|b| protocol::codec::is_legacy_response_head(&b)) =>
            {
                // A legacy server answered our ClientHello as a request it
                // could not parse. Never fall back to the clear silently.
                return Err(Error::LegacyServer { server });
            }
            Ok(Err(e)) => {
                return Err(match (secure.trust, seen) {
                    (Trust::Pinned(pinned), Some(presented)) if pinned != presented => {
                        Error::ServerIdentityChanged {
                            server,
                            pinned: pinned.to_string(),
                            presented: presented.to_string(),
                            pinned_in: secure.pinned_in.clone(),
                        }
                    }
                    // Closed at once: a server at its connection limits
                    // drops newcomers before or during the handshake.
                    _ if matches!(
                        e.kind(),
                        std::io::ErrorKind::UnexpectedEof
                            | std::io::ErrorKind::ConnectionReset
                            | std::io::ErrorKind::ConnectionAborted
                            | std::io::ErrorKind::BrokenPipe
                    ) =>
                    {
                        Error::Closed {
                            server,
                            doing: "in the TLS handshake (it may be at its connection limits)"
                                .into(),
                        }
                    }
                    _ => Error::Tls {
                        server,
                        reason: io_reason(&e),
                    },
                });
            }
            Err(_) => {
                return Err(Error::ConnectTimeout {
                    server,
                    secs: options.connect_timeout.as_secs(),
                })
            }
        };
        let mut binding: Binding = [0; BINDING_LEN];
        tls.get_ref()
            .1
            .export_keying_material(&mut binding, EXPORTER_LABEL, None)
            .map_err(|e| Error::Tls {
                server: server.clone(),
                reason: e.to_string(),
            })?;
        tracing::debug!(server = %server, fingerprint = ?seen, "TLS 1.3 established");
        let (read, write) = tokio::io::split(tls);
        let mut conn = Self::build(
            server,
            options,
            Dialect::Secure,
            Box::new(read),
            Box::new(write),
        );
        conn.binding = Some(binding);
        conn.fingerprint = seen;
        Ok(conn)
    }

    fn build(
        server: String,
        options: &Options,
        dialect: Dialect,
        read: Reader,
        write: Writer,
    ) -> Self {
        let limits = Limits::default().for_dialect(dialect);
        Self {
            server,
            timeout: options.timeout,
            dialect,
            binding: None,
            fingerprint: None,
            reader: FramedRead::new(read, ClientCodec::with_dialect(limits, dialect)),
            writer: write,
            head: BytesMut::with_capacity(512),
            gap: options.packet_gap,
            unanswered_since: None,
            misdeclared_ack: None,
        }
    }

    /// The size the last 1604 declared when it was more than the 16-byte id
    /// it carried (a deployed server's deviation, `docs/PROTOCOL.md` §9),
    /// if any since the last call.
    pub fn take_misdeclared_ack(&mut self) -> Option<u32> {
        self.misdeclared_ack.take()
    }

    /// The dialect spoken.
    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// Secure mode: the TLS channel binding (exporter value).
    pub fn binding(&self) -> Option<Binding> {
        self.binding
    }

    /// Secure mode: the fingerprint of the certificate the server presented.
    pub fn fingerprint(&self) -> Option<Fingerprint> {
        self.fingerprint
    }

    /// The server's address, for messages.
    pub fn server(&self) -> &str {
        &self.server
    }

    fn lost(&self, doing: &str, e: &std::io::Error) -> Error {
        match e.kind() {
            std::io::ErrorKind::UnexpectedEof => Error::Closed {
                server: self.server.clone(),
                doing: doing.to_owned(),
            },
            _ => Error::ConnectionLost {
                server: self.server.clone(),
                doing: doing.to_owned(),
                reason: io_reason(e),
            },
        }
    }

    fn timed_out(&self, doing: &str) -> Error {
        Error::Timeout {
            server: self.server.clone(),
            secs: self.timeout.as_secs(),
            doing: doing.to_owned(),
        }
    }

    /// Sends one request, encoded by the codec. A file packet's content is
    /// written from its own buffer, after its headers, in one vectored
    /// write.
    ///
    /// Not cancel-safe: a request may be half written when the future is
    /// dropped, after which the connection must be abandoned.
    ///
    /// # Errors
    /// When the write fails or makes no progress within the timeout.
    pub async fn send(&mut self, frame: &RequestFrame, doing: &str) -> Result<(), Error> {
        self.head.clear();
        let content = self
            .reader
            .decoder_mut()
            .encode_head(frame, &mut self.head)
            .map_err(|e| match e {
                CodecError::Encode(e) => Error::Internal(format!("cannot encode a request: {e}")),
                other => Error::Internal(format!("cannot encode a request: {other}")),
            })?;
        let header = frame.header_in(self.dialect);
        let content = match self.gap {
            Some(gap) => {
                // One buffer, so one write: a server that reads a request
                // with one recv() gets it whole, and the pause keeps the
                // next one out of that recv().
                if let Some(since) = self.unanswered_since {
                    tokio::time::sleep_until(since + gap).await;
                }
                self.head.extend_from_slice(&content);
                self.unanswered_since = Some(tokio::time::Instant::now());
                bytes::Bytes::new()
            }
            None => content,
        };
        let mut buf = (&self.head[..]).chain(content);
        // The flush is what puts the whole request on the wire: over TLS a
        // write may end with its last records still in the TLS buffer (the
        // socket was full), and they would stay there while we wait for the
        // answer to this very request.
        let writer = &mut self.writer;
        let sent = async move {
            writer.write_all_buf(&mut buf).await?;
            writer.flush().await
        };
        match tokio::time::timeout(self.timeout, sent).await {
            Ok(Ok(())) => {
                tracing::trace!(code = %header.code, len = header.payload_len, "request sent and flushed");
                Ok(())
            }
            Ok(Err(e)) => Err(self.lost(doing, &e)),
            Err(_) => Err(self.timed_out(doing)),
        }
    }

    /// A response the server already sent, if one arrives within a moment:
    /// after a failed write, the server may have said why before it closed.
    pub async fn pending_response(&mut self) -> Option<Response> {
        match tokio::time::timeout(Duration::from_millis(500), self.reader.next()).await {
            Ok(Some(Ok(response))) => Some(response),
            _ => None,
        }
    }

    /// Waits for the next response.
    ///
    /// Cancel-safe: the decoder keeps partial input between calls.
    ///
    /// # Errors
    /// When the server closes the connection, sends bytes that do not decode,
    /// or says nothing within the timeout.
    pub async fn recv(&mut self, doing: &str) -> Result<Response, Error> {
        self.recv_within(Duration::ZERO, doing).await
    }

    /// As [`recv`](Self::recv), allowing `extra` time beyond the timeout
    /// (the server syncs a whole file to disk before it answers with its
    /// checksum). Cancel-safe.
    ///
    /// # Errors
    /// As [`recv`](Self::recv).
    pub async fn recv_within(&mut self, extra: Duration, doing: &str) -> Result<Response, Error> {
        let limit = self.timeout.saturating_add(extra);
        let reader = &mut self.reader;
        let waited = async move {
            // A wait that outlasts a few seconds says so at debug level, so a
            // stalled exchange can be told apart from a slow server.
            let started = tokio::time::Instant::now();
            loop {
                match tokio::time::timeout(WAIT_NOTICE, reader.next()).await {
                    Ok(next) => return next,
                    Err(_) => tracing::debug!(
                        doing,
                        waited_secs = started.elapsed().as_secs(),
                        buffered = reader.read_buffer().len(),
                        "still waiting for the server's answer; our last request was sent and flushed"
                    ),
                }
            }
        };
        match tokio::time::timeout(limit, waited).await {
            Ok(Some(Ok(response))) => {
                tracing::trace!(code = %response.code(), "response");
                self.unanswered_since = None;
                if let Some(declared) = self.reader.decoder_mut().take_misdeclared_ack() {
                    tracing::warn!(
                        declared,
                        "a 1604 declared more than the 16-byte id it carried"
                    );
                    self.misdeclared_ack = Some(declared);
                }
                Ok(response)
            }
            Ok(Some(Err(CodecError::Io(e)))) => Err(self.lost(doing, &e)),
            Ok(Some(Err(CodecError::ByteSwapped { code, swapped }))) => Err(Error::BigEndian {
                server: self.server.clone(),
                code,
                swapped,
            }),
            Ok(Some(Err(e))) => Err(Error::Protocol {
                server: self.server.clone(),
                detail: e.to_string(),
            }),
            Ok(None) => Err(Error::Closed {
                server: self.server.clone(),
                doing: doing.to_owned(),
            }),
            Err(_) => Err(Error::Timeout {
                server: self.server.clone(),
                secs: limit.as_secs(),
                doing: doing.to_owned(),
            }),
        }
    }

    /// Ends the session: closes the sending side (the server sees end of
    /// stream after our last request) and drops the connection.
    pub async fn close(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.writer.shutdown()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use protocol::message::{FilePacket, PacketHead};
    use protocol::{ClientId, FileName, Numbering, Request, ServerCodec};
    use tokio_util::codec::FramedRead as Framed;

    /// A TLS connection over a pipe that holds only `capacity` bytes, the
    /// server side reading requests with the server's codec.
    async fn tls_pair(
        capacity: usize,
    ) -> (
        Connection,
        tokio::task::JoinHandle<Vec<RequestFrame>>,
        tempfile::TempDir,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let (identity, _) = server::identity::ServerIdentity::load_or_create(dir.path()).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(identity.tls_config().unwrap());
        let (client_io, server_io) = tokio::io::duplex(capacity);
        let server = tokio::spawn(async move {
            let tls = acceptor.accept(server_io).await.unwrap();
            let codec = ServerCodec::with_dialect(
                Limits::default().for_dialect(Dialect::Secure),
                Dialect::Secure,
            );
            let mut requests = Framed::new(tls, codec);
            let mut got = Vec::new();
            while let Some(Ok(frame)) = requests.next().await {
                got.push(frame);
            }
            got
        });
        let (config, _) = crate::tls::client_config(Trust::Pinned(identity.fingerprint())).unwrap();
        let name = rustls::pki_types::ServerName::try_from(crate::tls::SERVER_NAME).unwrap();
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, client_io)
            .await
            .unwrap();
        let (read, write) = tokio::io::split(tls);
        let mut options = Options::new("pipe");
        options.timeout = Duration::from_secs(1);
        let conn = Connection::build(
            "pipe".into(),
            &options,
            Dialect::Secure,
            Box::new(read),
            Box::new(write),
        );
        (conn, server, dir)
    }

    fn packet(len: usize) -> RequestFrame {
        let content_size = len as u64;
        RequestFrame {
            client_id: ClientId([7; 16]),
            numbering: Numbering::Modern,
            request: Request::SendFile(FilePacket {
                head: PacketHead {
                    content_size,
                    orig_size: content_size - 1,
                    packet: 1,
                    total: 1,
                    file: FileName::try_from("f.bin").unwrap(),
                },
                content: Bytes::from(vec![0x5a; len]),
            }),
        }
    }

    /// The stall of secure-mode uploads: a request written while the
    /// socket was full ended with its last TLS records in the TLS buffer,
    /// and nothing sent them while the client waited for the answer. Over
    /// a pipe of 64 bytes every request ends that way; the server must
    /// still receive each one whole while the client only waits.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_sent_request_reaches_the_server_whole_while_the_client_waits() {
        let (mut conn, server, _dir) = tls_pair(64).await;
        for len in [16, 4096, 100_000] {
            conn.send(&packet(len), "testing").await.unwrap();
        }
        // Waiting for an answer never writes: whatever is not on the wire
        // by now stays where it is.
        let waited = conn.recv_within(Duration::ZERO, "waiting").await;
        assert!(
            matches!(waited, Err(Error::Timeout { .. })),
            "no answer is sent: {waited:?}"
        );
        drop(conn);
        let got = tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("the server's reader ends")
            .unwrap();
        let sizes: Vec<usize> = got
            .iter()
            .map(|f| match &f.request {
                Request::SendFile(p) => p.content.len(),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(sizes, vec![16, 4096, 100_000]);
    }
}
