//! A counting TCP relay on 127.0.0.1: what goes through it is what a tool
//! puts on the wire (TLS records for ours, the ssh stream for the others),
//! counted in each direction.
//!
//! Each connection is copied by two threads with plain blocking reads and
//! writes; the copies cost little next to what is measured through it (a
//! re-run or a small change, where a tool reads much and sends little).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::Result;

/// Bytes copied per read.
const BUF: usize = 64 * 1024;

/// Bytes through the relay since it started (or since the last
/// [`Relay::take`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Wire {
    /// From the tool to its server.
    pub up: u64,
    /// From the server to the tool.
    pub down: u64,
}

#[derive(Default)]
struct Counters {
    up: AtomicU64,
    down: AtomicU64,
    stop: AtomicBool,
}

/// A running relay.
pub struct Relay {
    addr: SocketAddr,
    counters: Arc<Counters>,
    acceptor: Option<JoinHandle<()>>,
}

impl Relay {
    /// Listens on a free port of 127.0.0.1 and relays every connection to
    /// `target`.
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

    /// Where tools connect instead of their server.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bytes counted so far, and the counters set back to zero.
    pub fn take(&self) -> Wire {
        Wire {
            up: self.counters.up.swap(0, Ordering::SeqCst),
            down: self.counters.down.swap(0, Ordering::SeqCst),
        }
    }
}

impl Drop for Relay {
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
        let down = Arc::clone(counters);
        // Detached: each ends when its side closes.
        std::thread::spawn(move || copy(client, server, &up.up));
        std::thread::spawn(move || copy(server2, client2, &down.down));
    }
}

/// Copies `from` into `to`, counting, until `from` ends or either fails;
/// then passes the end on.
fn copy(from: TcpStream, to: TcpStream, count: &AtomicU64) {
    // Counted before it is passed on, so the count is complete once the
    // receiving side has seen the bytes.
    copy_observed(from, to, |part| {
        count.fetch_add(part.len() as u64, Ordering::SeqCst);
    });
}

/// Copies `from` into `to` until `from` ends or either fails, showing each
/// read to `observe` before it is passed on; then passes the end on. The
/// other relays of the driver (the S3 request counter, the balancer of the
/// scale scenario) are built on it.
pub(crate) fn copy_observed(
    mut from: TcpStream,
    mut to: TcpStream,
    mut observe: impl FnMut(&[u8]),
) {
    let mut buf = vec![0u8; BUF];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let Some(part) = buf.get(..n) else { break };
        observe(part);
        if to.write_all(part).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_both_directions_of_an_echo() {
        let echo = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let target = echo.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = echo.accept().unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).unwrap();
            s.write_all(&got[..got.len() / 2]).unwrap();
        });
        let relay = Relay::start(target).unwrap();
        let mut c = TcpStream::connect(relay.addr()).unwrap();
        c.write_all(&[7u8; 100_000]).unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        let mut back = Vec::new();
        c.read_to_end(&mut back).unwrap();
        server.join().unwrap();
        assert_eq!(back.len(), 50_000);
        assert_eq!(
            relay.take(),
            Wire {
                up: 100_000,
                down: 50_000
            }
        );
        assert_eq!(relay.take(), Wire::default());
    }
}
