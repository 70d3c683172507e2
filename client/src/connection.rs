//! One TCP connection to a server: requests out, responses in, every wait
//! bounded by a timeout.
//!
//! Responses are decoded by `protocol::ClientCodec`. Requests are encoded
//! here so that a file packet's content goes from its buffer to the socket
//! without another copy: the 290 bytes of headers and the content are written
//! with one vectored write.

use std::time::Duration;

use bytes::{Buf, BytesMut};
use futures::StreamExt;
use protocol::{ClientCodec, CodecError, Limits, Request, RequestFrame, Response};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_util::codec::FramedRead;

use crate::error::{io_reason, Error};
use crate::settings::Options;

/// An open connection.
#[derive(Debug)]
pub struct Connection {
    server: String,
    timeout: Duration,
    reader: FramedRead<OwnedReadHalf, ClientCodec>,
    writer: OwnedWriteHalf,
    head: BytesMut,
}

impl Connection {
    /// Connects to `options.server`.
    ///
    /// # Errors
    /// [`Error::Connect`] or [`Error::ConnectTimeout`].
    pub async fn open(options: &Options) -> Result<Self, Error> {
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
        let (read, write) = stream.into_split();
        Ok(Self {
            server,
            timeout: options.timeout,
            reader: FramedRead::new(read, ClientCodec::new(Limits::default())),
            writer: write,
            head: BytesMut::with_capacity(512),
        })
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
        frame.header().write(&mut self.head);
        let content = match &frame.request {
            Request::SendFile(packet) => {
                packet.head.write(&mut self.head);
                packet.content.clone()
            }
            other => {
                other.write_payload(&mut self.head);
                bytes::Bytes::new()
            }
        };
        tracing::trace!(code = %frame.header().code, len = frame.header().payload_len, "request");
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
