//! A counting HTTP relay between the server and its S3 service: every
//! request the server sends is counted by kind (GET, PUT, POST, DELETE,
//! HEAD, and LIST for the listings, which are GETs of the bucket), then
//! passed on unchanged.
//!
//! HTTP/1.1 keeps connections alive, so one connection carries many
//! requests: the stream from the server is split into requests as an
//! HTTP/1.1 server would split it (RFC 9112 §6.3): the head up to its
//! empty line, then a body of `Content-Length` bytes or, with
//! `Transfer-Encoding: chunked`, chunks up to the last one and its
//! trailer. Bodies are skipped as they stream past, never collected.

use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::Result;

use crate::relay::copy_observed;

/// The longest request head or chunk-size line taken: S3 request heads
/// are a few KiB (the signature, a dozen `x-amz-*` headers). Past it the
/// stream is not HTTP as expected; counting stops for that connection and
/// the connection is counted in [`Requests::unparsed`].
const MAX_LINE: usize = 64 * 1024;

/// Kinds of S3 request, as the capacity model counts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Get,
    Put,
    Post,
    Delete,
    Head,
    /// A GET of the bucket itself (ListObjectsV2, a listing of multipart
    /// uploads).
    List,
    /// Any other method.
    Other,
}

impl Kind {
    const ALL: [Self; 7] = [
        Self::Get,
        Self::Put,
        Self::Post,
        Self::Delete,
        Self::Head,
        Self::List,
        Self::Other,
    ];

    /// The kind of a request from its request line's method and target
    /// (path-style addressing: `/BUCKET/KEY?QUERY`).
    pub fn of(method: &str, target: &str) -> Self {
        match method {
            "GET" => {
                let (path, query) = target.split_once('?').unwrap_or((target, ""));
                let on_bucket = path.trim_matches('/').split('/').count() <= 1;
                let listing = query
                    .split('&')
                    .any(|p| p.starts_with("list-type=") || p == "uploads");
                if on_bucket || listing {
                    Self::List
                } else {
                    Self::Get
                }
            }
            "PUT" => Self::Put,
            "POST" => Self::Post,
            "DELETE" => Self::Delete,
            "HEAD" => Self::Head,
            _ => Self::Other,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Requests counted, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Requests {
    pub get: u64,
    pub put: u64,
    pub post: u64,
    pub delete: u64,
    pub head: u64,
    pub list: u64,
    pub other: u64,
    /// Connections whose stream stopped parsing as HTTP/1.1 requests (0
    /// when every request was counted).
    pub unparsed: u64,
}

impl Requests {
    pub fn total(&self) -> u64 {
        self.get + self.put + self.post + self.delete + self.head + self.list + self.other
    }

    fn add(&mut self, kind: Kind) {
        *match kind {
            Kind::Get => &mut self.get,
            Kind::Put => &mut self.put,
            Kind::Post => &mut self.post,
            Kind::Delete => &mut self.delete,
            Kind::Head => &mut self.head,
            Kind::List => &mut self.list,
            Kind::Other => &mut self.other,
        } += 1;
    }
}

/// Where the splitter is in the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// In a request head (or the empty lines allowed before one).
    Head,
    /// In a body of known length: bytes left.
    Body(u64),
    /// In a chunk-size line.
    ChunkSize,
    /// In a chunk's data: bytes left, then its CRLF.
    ChunkData(u64),
    /// In the CRLF after a chunk's data: bytes left of it.
    ChunkEnd(u8),
    /// In the trailer after the last chunk, up to its empty line.
    Trailer,
    /// Not HTTP as expected: nothing more is counted.
    Broken,
}

/// Splits one connection's stream of HTTP/1.1 requests into requests, fed
/// in pieces of any size.
#[derive(Debug)]
pub struct Splitter {
    state: State,
    /// The head or line being read.
    line: Vec<u8>,
}

impl Default for Splitter {
    fn default() -> Self {
        Self {
            state: State::Head,
            line: Vec::new(),
        }
    }
}

impl Splitter {
    /// Whether the stream stopped parsing.
    pub fn broken(&self) -> bool {
        self.state == State::Broken
    }

    /// Takes the next piece of the stream; `on_request` is called with
    /// each request whose head ends in it.
    pub fn feed(&mut self, mut input: &[u8], mut on_request: impl FnMut(Kind)) {
        while !input.is_empty() {
            match self.state {
                State::Broken => return,
                State::Body(left) | State::ChunkData(left) => {
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(input.len());
                    input = input.get(n..).unwrap_or_default();
                    let left = left - n as u64;
                    self.state = match (self.state, left) {
                        (State::Body(_), 0) => State::Head,
                        (State::Body(_), _) => State::Body(left),
                        (_, 0) => State::ChunkEnd(2),
                        _ => State::ChunkData(left),
                    };
                }
                State::ChunkEnd(left) => {
                    let n = usize::from(left).min(input.len());
                    input = input.get(n..).unwrap_or_default();
                    let left = left - u8::try_from(n).unwrap_or(left);
                    self.state = if left == 0 {
                        State::ChunkSize
                    } else {
                        State::ChunkEnd(left)
                    };
                }
                State::Head | State::ChunkSize | State::Trailer => {
                    let (taken, done) = self.take_line(input);
                    input = input.get(taken..).unwrap_or_default();
                    if done {
                        self.end_line(&mut on_request);
                    }
                }
            }
        }
    }

    /// Appends bytes of the current head (up to its empty line) or line
    /// (up to its LF); how many were taken and whether it is complete.
    fn take_line(&mut self, input: &[u8]) -> (usize, bool) {
        for (i, &b) in input.iter().enumerate() {
            self.line.push(b);
            let done = if self.state == State::Head {
                self.line.ends_with(b"\r\n\r\n")
                    || self.line.ends_with(b"\n\n")
                    || self.line == b"\r\n"
                    || self.line == b"\n"
            } else {
                b == b'\n'
            };
            if done {
                return (i + 1, true);
            }
            if self.line.len() > MAX_LINE {
                self.state = State::Broken;
                return (input.len(), false);
            }
        }
        (input.len(), false)
    }

    /// A head or line is complete: what follows it.
    fn end_line(&mut self, on_request: &mut impl FnMut(Kind)) {
        let line = std::mem::take(&mut self.line);
        let text = String::from_utf8_lossy(&line);
        self.state = match self.state {
            // An empty line before a request: allowed and ignored.
            State::Head if text.trim().is_empty() => State::Head,
            State::Head => match parse_head(&text) {
                Some((kind, body)) => {
                    on_request(kind);
                    match body {
                        Body::Chunked => State::ChunkSize,
                        Body::Length(0) => State::Head,
                        Body::Length(n) => State::Body(n),
                    }
                }
                None => State::Broken,
            },
            State::ChunkSize => {
                let size = text.split(';').next().unwrap_or_default().trim();
                match u64::from_str_radix(size, 16) {
                    Ok(0) => State::Trailer,
                    Ok(n) => State::ChunkData(n),
                    Err(_) => State::Broken,
                }
            }
            State::Trailer if text.trim().is_empty() => State::Head,
            other => other,
        };
    }
}

/// How a request's body is framed.
enum Body {
    Length(u64),
    Chunked,
}

/// The kind and body framing of a request head, or `None` when it is not
/// an HTTP/1.x request head.
fn parse_head(head: &str) -> Option<(Kind, Body)> {
    let mut lines = head.lines();
    let mut request = lines.next()?.split_whitespace();
    let (method, target, version) = (request.next()?, request.next()?, request.next()?);
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    let mut body = Body::Length(0);
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding")
            && value.to_ascii_lowercase().ends_with("chunked")
        {
            body = Body::Chunked;
        } else if name.eq_ignore_ascii_case("content-length") && !matches!(body, Body::Chunked) {
            body = Body::Length(value.parse().ok()?);
        }
    }
    Some((Kind::of(method, target), body))
}

#[derive(Default)]
struct Counters {
    by_kind: [AtomicU64; 7],
    unparsed: AtomicU64,
    stop: AtomicBool,
}

/// A running counting relay in front of an S3 service.
pub struct S3Counter {
    addr: SocketAddr,
    counters: Arc<Counters>,
    acceptor: Option<JoinHandle<()>>,
}

impl S3Counter {
    /// Listens on a free port of 127.0.0.1 and relays every connection to
    /// the S3 service at `target`, counting its requests.
    ///
    /// # Errors
    /// When it cannot listen.
    pub fn start(target: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let addr = listener.local_addr()?;
        let counters = Arc::new(Counters::default());
        let shared = Arc::clone(&counters);
        let acceptor = std::thread::spawn(move || accept_loop(&listener, target, &shared));
        Ok(Self {
            addr,
            counters,
            acceptor: Some(acceptor),
        })
    }

    /// The endpoint the server is given instead of the S3 service's.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The requests counted since the start (or the last `take`), the
    /// counters set back to zero.
    pub fn take(&self) -> Requests {
        let mut r = Requests::default();
        for kind in Kind::ALL {
            let n = self
                .counters
                .by_kind
                .get(kind.index())
                .map_or(0, |c| c.swap(0, Ordering::SeqCst));
            for _ in 0..n {
                r.add(kind);
            }
        }
        r.unparsed = self.counters.unparsed.swap(0, Ordering::SeqCst);
        r
    }
}

impl Drop for S3Counter {
    fn drop(&mut self) {
        self.counters.stop.store(true, Ordering::SeqCst);
        // Wakes the acceptor blocked in accept().
        let _ = TcpStream::connect(self.addr);
        if let Some(h) = self.acceptor.take() {
            let _ = h.join();
        }
    }
}

fn accept_loop(listener: &TcpListener, target: SocketAddr, counters: &Arc<Counters>) {
    for stream in listener.incoming() {
        if counters.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = stream else { continue };
        let Ok(server) = TcpStream::connect(target) else {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let (Ok(client2), Ok(server2)) = (client.try_clone(), server.try_clone()) else {
            continue;
        };
        let up = Arc::clone(counters);
        // Detached: each ends when its side closes.
        std::thread::spawn(move || {
            let mut splitter = Splitter::default();
            let mut was_broken = false;
            copy_observed(client, server, |part| {
                // Counted before the request is passed on, so the count is
                // complete once S3 has seen it.
                splitter.feed(part, |kind| {
                    if let Some(c) = up.by_kind.get(kind.index()) {
                        c.fetch_add(1, Ordering::SeqCst);
                    }
                });
                if splitter.broken() && !was_broken {
                    was_broken = true;
                    up.unparsed.fetch_add(1, Ordering::SeqCst);
                }
            });
        });
        std::thread::spawn(move || copy_observed(server2, client2, |_| {}));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A keep-alive stream: a PUT with a body, a chunked PUT with a
    /// trailer, a listing, a GET, a HEAD, a multipart POST, a DELETE.
    fn stream() -> Vec<u8> {
        let mut s = Vec::new();
        s.extend_from_slice(
            b"PUT /bucket/repo/packs/ab HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\nGET / HTTP/",
        );
        s.extend_from_slice(
            b"PUT /bucket/repo/k HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\
              5;ext=1\r\nPUT /\r\nA\r\n0123456789\r\n0\r\nx-trailer: 1\r\n\r\n",
        );
        s.extend_from_slice(
            b"\r\nGET /bucket?list-type=2&prefix=repo/ HTTP/1.1\r\nHost: x\r\n\r\n",
        );
        s.extend_from_slice(b"GET /bucket/repo/packs/ab HTTP/1.1\r\nRange: bytes=0-9\r\n\r\n");
        s.extend_from_slice(b"HEAD /bucket/repo/packs/ab HTTP/1.1\r\n\r\n");
        s.extend_from_slice(b"POST /bucket/repo/big?uploads HTTP/1.1\r\ncontent-length: 0\r\n\r\n");
        s.extend_from_slice(b"DELETE /bucket/repo/packs/ab HTTP/1.1\r\n\r\n");
        s
    }

    fn count(pieces: &[&[u8]]) -> (Vec<Kind>, bool) {
        let mut splitter = Splitter::default();
        let mut seen = Vec::new();
        for p in pieces {
            splitter.feed(p, |k| seen.push(k));
        }
        (seen, splitter.broken())
    }

    const EXPECTED: [Kind; 7] = [
        Kind::Put,
        Kind::Put,
        Kind::List,
        Kind::Get,
        Kind::Head,
        Kind::Post,
        Kind::Delete,
    ];

    #[test]
    fn splits_a_keep_alive_stream_into_its_requests() {
        let s = stream();
        assert_eq!(count(&[&s]), (EXPECTED.to_vec(), false));
    }

    #[test]
    fn splits_the_same_whatever_the_reads() {
        let s = stream();
        for at in 0..=s.len() {
            let (a, b) = s.split_at(at);
            assert_eq!(count(&[a, b]), (EXPECTED.to_vec(), false), "split at {at}");
        }
        let bytes: Vec<&[u8]> = s.chunks(1).collect();
        assert_eq!(count(&bytes), (EXPECTED.to_vec(), false));
    }

    #[test]
    fn tells_listings_from_gets() {
        assert_eq!(Kind::of("GET", "/bucket?list-type=2&prefix=a"), Kind::List);
        assert_eq!(Kind::of("GET", "/bucket/"), Kind::List);
        assert_eq!(Kind::of("GET", "/bucket/key/part"), Kind::Get);
        assert_eq!(Kind::of("GET", "/bucket/key?uploads"), Kind::List);
        assert_eq!(Kind::of("PATCH", "/bucket/key"), Kind::Other);
    }

    #[test]
    fn rejects_a_stream_that_is_not_http() {
        let (seen, broken) = count(&[b"\x16\x03\x01 hello\r\n\r\n"]);
        assert!(seen.is_empty());
        assert!(broken);
        let long = vec![b'a'; MAX_LINE + 2];
        assert!(count(&[b"GET /b/k HTTP/1.1\r\n", &long]).1);
        let bad_chunk = b"PUT /b/k HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n";
        assert_eq!(count(&[bad_chunk]), (vec![Kind::Put], true));
    }

    #[test]
    fn counts_requests_through_the_relay() {
        use std::io::{Read, Write};
        let s3 = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let target = s3.local_addr().unwrap();
        let total = stream().len();
        let server = std::thread::spawn(move || {
            let (mut s, _) = s3.accept().unwrap();
            let mut got = vec![0u8; total];
            s.read_exact(&mut got).unwrap();
            s.write_all(b"ok").unwrap();
            got
        });
        let counter = S3Counter::start(target).unwrap();
        let addr = counter.endpoint().trim_start_matches("http://").to_owned();
        let mut c = TcpStream::connect(addr).unwrap();
        c.write_all(&stream()).unwrap();
        let mut back = [0u8; 2];
        c.read_exact(&mut back).unwrap();
        assert_eq!(server.join().unwrap(), stream(), "passed on unchanged");
        let r = counter.take();
        assert_eq!(
            (r.put, r.list, r.get, r.head, r.post, r.delete, r.unparsed),
            (2, 1, 1, 1, 1, 1, 0)
        );
        assert_eq!(r.total(), 7);
        assert_eq!(counter.take(), Requests::default());
    }
}
