//! A reader that enforces the idle and per-request timeouts.
//!
//! Between requests the connection may stay silent for the idle timeout.
//! Once the first byte of a request arrives, the whole request must arrive
//! within the request timeout, however the bytes trickle in. A timeout
//! surfaces as an [`io::ErrorKind::TimedOut`] read error, which ends the
//! stream like any other read error.
//!
//! A new connection also has a hard deadline for its first whole request
//! (the handshake deadline), which neither timeout extends.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Wraps a reader with the two deadlines. The owner calls
/// [`arm`](Self::arm) at every request boundary.
#[derive(Debug)]
pub(crate) struct Deadline<R> {
    inner: R,
    sleep: Pin<Box<Sleep>>,
    idle: Duration,
    request: Duration,
    in_request: bool,
    /// Until the first request is in: when it must be.
    first: Option<Instant>,
}

impl<R> Deadline<R> {
    /// A reader waiting for its first request.
    pub(crate) fn new(inner: R, idle: Duration, request: Duration) -> Self {
        Self {
            inner,
            sleep: Box::pin(tokio::time::sleep(idle)),
            idle,
            request,
            in_request: false,
            first: None,
        }
    }

    /// The first whole request must have arrived by `at`, however the
    /// other timeouts run; [`first_request_done`](Self::first_request_done)
    /// lifts it.
    pub(crate) fn first_request_by(&mut self, at: Instant) {
        self.first = Some(at);
        let target = self.sleep.deadline().min(at);
        self.sleep.as_mut().reset(target);
    }

    /// The first request arrived: only the idle and request timeouts apply.
    pub(crate) fn first_request_done(&mut self) {
        self.first = None;
    }

    fn reset(&mut self, limit: Duration) {
        let mut target = Instant::now() + limit;
        if let Some(first) = self.first {
            target = target.min(first);
        }
        self.sleep.as_mut().reset(target);
    }

    /// Starts the clock for the next request: the request timeout if some
    /// of its bytes are already buffered, else the idle timeout.
    pub(crate) fn arm(&mut self, bytes_buffered: bool) {
        self.in_request = bytes_buffered;
        let limit = if bytes_buffered {
            self.request
        } else {
            self.idle
        };
        self.reset(limit);
    }

    /// The wrapped reader.
    pub(crate) fn into_inner(self) -> R {
        self.inner
    }

    /// Whether bytes of a request have arrived since the last
    /// [`arm`](Self::arm) without a buffered remainder.
    pub(crate) fn in_request(&self) -> bool {
        self.in_request
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Deadline<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before && !this.in_request {
                    this.in_request = true;
                    let limit = this.request;
                    this.reset(limit);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match this.sleep.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    let what = if this.first.is_some_and(|at| Instant::now() >= at) {
                        "no whole first request within the handshake deadline".to_owned()
                    } else if this.in_request {
                        format!("request not completed within {:?}", this.request)
                    } else {
                        format!("idle for {:?}", this.idle)
                    };
                    Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, what)))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn times_out_an_idle_peer_after_the_idle_timeout() {
        let (_tx, rx) = tokio::io::duplex(64);
        let mut r = Deadline::new(rx, Duration::from_secs(10), Duration::from_secs(2));
        let start = Instant::now();
        let mut buf = [0u8; 8];
        let err = r.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(start.elapsed().as_secs(), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn times_out_a_started_request_after_the_request_timeout() {
        let (mut tx, rx) = tokio::io::duplex(64);
        let mut r = Deadline::new(rx, Duration::from_secs(100), Duration::from_secs(2));
        tx.write_all(b"abc").await.unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(r.read(&mut buf).await.unwrap(), 3);
        assert!(r.in_request());
        let start = Instant::now();
        let err = r.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(err.to_string().contains("request"));
        assert_eq!(start.elapsed().as_secs(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_request_must_be_whole_by_the_handshake_deadline() {
        let (mut tx, rx) = tokio::io::duplex(64);
        let mut r = Deadline::new(rx, Duration::from_secs(100), Duration::from_secs(60));
        let start = Instant::now();
        r.first_request_by(start + Duration::from_secs(3));
        r.arm(false);
        // A byte every 0.7 s would keep the idle and request clocks happy.
        let trickle = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(700)).await;
                if tx.write_all(b"x").await.is_err() {
                    break;
                }
            }
        });
        let mut buf = [0u8; 8];
        let err = loop {
            if let Err(e) = r.read(&mut buf).await {
                break e;
            }
        };
        trickle.abort();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(err.to_string().contains("handshake deadline"), "{err}");
        assert_eq!(start.elapsed().as_secs(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn after_the_first_request_the_idle_timeout_applies_again() {
        let (_tx, rx) = tokio::io::duplex(64);
        let mut r = Deadline::new(rx, Duration::from_secs(30), Duration::from_secs(60));
        let start = Instant::now();
        r.first_request_by(start + Duration::from_secs(3));
        r.first_request_done();
        r.arm(false);
        let mut buf = [0u8; 8];
        let err = r.read(&mut buf).await.unwrap_err();
        assert!(err.to_string().contains("idle"), "{err}");
        assert_eq!(start.elapsed().as_secs(), 30);
    }

    #[tokio::test(start_paused = true)]
    async fn arm_restarts_the_idle_clock_between_requests() {
        let (mut tx, rx) = tokio::io::duplex(64);
        let mut r = Deadline::new(rx, Duration::from_secs(5), Duration::from_secs(1));
        tx.write_all(b"x").await.unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(r.read(&mut buf).await.unwrap(), 1);
        tokio::time::advance(Duration::from_millis(900)).await;
        r.arm(false);
        assert!(!r.in_request());
        let start = Instant::now();
        let err = r.read(&mut buf).await.unwrap_err();
        assert!(err.to_string().contains("idle"));
        assert_eq!(start.elapsed().as_secs(), 5);
    }
}
