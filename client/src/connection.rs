//! One connection to a server, plain (legacy) or TLS 1.3 (secure mode):
//! requests out, responses in, every wait bounded by a timeout.
//!
//! Responses are decoded by `protocol::ClientCodec`. Requests are encoded
//! here so that a file packet's content goes from its buffer to the socket
//! without another copy: the 290 bytes of headers and the content are written
//! with one vectored write.

use std::time::Duration;

use bytes::{Buf, BytesMut};
use futures::StreamExt;
use protocol::secure::{Binding, Fingerprint, BINDING_LEN, EXPORTER_LABEL};
use protocol::{ClientCodec, CodecError, Dialect, Limits, Request, RequestFrame, Response};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::codec::FramedRead;

use crate::error::{io_reason, Error};
use crate::settings::Options;
use crate::tls::Trust;

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
        let handshake =
            tokio::time::timeout(options.connect_timeout, connector.connect(name, stream)).await;
        let seen = presented.lock().ok().and_then(|s| *s);
        let tls = match handshake {
            Ok(Ok(tls)) => tls,
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
                    _ => Error::Tls {
                        server,
                        reason: io_reason(&e),
                    },
                })
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
        }
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

    /// Sends one request. A file packet's content is written from its own
    /// buffer, after its headers, in one vectored write.
    ///
    /// Not cancel-safe: a request may be half written when the future is
    /// dropped, after which the connection must be abandoned.
    ///
    /// # Errors
    /// When the write fails or makes no progress within the timeout.
    pub async fn send(&mut self, frame: &RequestFrame, doing: &str) -> Result<(), Error> {
        self.head.clear();
        frame
            .request
            .check_dialect(self.dialect)
            .map_err(|e| Error::Internal(format!("cannot encode a request: {e}")))?;
        let header = frame.header_in(self.dialect);
        header.write(&mut self.head);
        let content = match &frame.request {
            Request::SendFile(packet) => {
                packet.head.write(&mut self.head, self.dialect);
                packet.content.clone()
            }
            other => {
                other.write_payload(&mut self.head, self.dialect);
                bytes::Bytes::new()
            }
        };
        tracing::trace!(code = %header.code, len = header.payload_len, "request");
        let mut buf = (&self.head[..]).chain(content);
        match tokio::time::timeout(self.timeout, self.writer.write_all_buf(&mut buf)).await {
            Ok(Ok(())) => Ok(()),
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
        match tokio::time::timeout(limit, self.reader.next()).await {
            Ok(Some(Ok(response))) => {
                tracing::trace!(code = %response.code(), "response");
                Ok(response)
            }
            Ok(Some(Err(CodecError::Io(e)))) => Err(self.lost(doing, &e)),
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
