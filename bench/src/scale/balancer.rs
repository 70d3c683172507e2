//! A round-robin TCP relay in front of several servers, as HAProxy in
//! `mode tcp` with `balance roundrobin` would be (docs/SCALING.md): each
//! connection goes to the next server in turn; a server that refuses the
//! connection is skipped for the next one. The TLS stream passes through
//! untouched: every server holds the same identity, so the pin a client
//! made at registration holds whichever server answers.

use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::Result;

use crate::relay::copy_observed;

struct Shared {
    backends: Vec<SocketAddr>,
    /// Connections given to each backend.
    served: Vec<AtomicU64>,
    /// Connections no backend took.
    refused: AtomicU64,
    next: AtomicUsize,
    stop: AtomicBool,
}

/// A running balancer.
pub struct Balancer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl Balancer {
    /// Listens on a free port of 127.0.0.1 and spreads connections over
    /// `backends`, round robin.
    ///
    /// # Errors
    /// When it cannot listen.
    pub fn start(backends: Vec<SocketAddr>) -> Result<Self> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            served: backends.iter().map(|_| AtomicU64::new(0)).collect(),
            backends,
            refused: AtomicU64::new(0),
            next: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
        });
        let inner = Arc::clone(&shared);
        let acceptor = std::thread::spawn(move || accept_loop(&listener, &inner));
        Ok(Self {
            addr,
            shared,
            acceptor: Some(acceptor),
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections given to each backend so far, in the order given.
    pub fn served(&self) -> Vec<u64> {
        self.shared
            .served
            .iter()
            .map(|n| n.load(Ordering::SeqCst))
            .collect()
    }

    /// Connections that no backend took.
    pub fn refused(&self) -> u64 {
        self.shared.refused.load(Ordering::SeqCst)
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wakes the acceptor blocked in accept().
        let _ = TcpStream::connect(self.addr);
        if let Some(h) = self.acceptor.take() {
            let _ = h.join();
        }
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    for stream in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = stream else { continue };
        let first = shared.next.fetch_add(1, Ordering::SeqCst);
        let shared = Arc::clone(shared);
        // The connect happens on the connection's own thread, so a slow
        // backend does not hold up the accepts.
        std::thread::spawn(move || {
            let n = shared.backends.len();
            for i in 0..n {
                let which = (first + i) % n;
                let Some(addr) = shared.backends.get(which) else {
                    continue;
                };
                let Ok(server) = TcpStream::connect(addr) else {
                    continue;
                };
                if let Some(c) = shared.served.get(which) {
                    c.fetch_add(1, Ordering::SeqCst);
                }
                relay(client, server);
                return;
            }
            shared.refused.fetch_add(1, Ordering::SeqCst);
            let _ = client.shutdown(Shutdown::Both);
        });
    }
}

/// Copies both ways until both sides have ended.
fn relay(client: TcpStream, server: TcpStream) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (Ok(client2), Ok(server2)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    let down = std::thread::spawn(move || copy_observed(server2, client2, |_| {}));
    copy_observed(client, server, |_| {});
    let _ = down.join();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// A backend that answers each connection with its own number.
    fn numbered(n: u8) -> SocketAddr {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { return };
                let _ = s.write_all(&[n]);
            }
        });
        addr
    }

    #[test]
    fn spreads_connections_round_robin_and_skips_a_refusing_backend() {
        let gone = {
            let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
            l.local_addr().unwrap()
        };
        let b = Balancer::start(vec![numbered(0), numbered(1), gone]).unwrap();
        let mut got = Vec::new();
        for _ in 0..6 {
            let mut c = TcpStream::connect(b.addr()).unwrap();
            let mut one = [0u8; 1];
            c.read_exact(&mut one).unwrap();
            got.push(one[0]);
        }
        // The third backend refuses: its turns go to the first.
        assert_eq!(got, [0, 1, 0, 0, 1, 0]);
        assert_eq!(b.served(), [4, 2, 0]);
        assert_eq!(b.refused(), 0);
    }
}
