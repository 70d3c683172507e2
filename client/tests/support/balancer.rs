//! A TCP load balancer in front of several servers, as HAProxy or nginx
//! `stream` would be (docs/SCALING.md): each connection goes to the next
//! server in turn, and a server that refuses the connection is skipped.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};

/// A running balancer; stopped when dropped.
pub struct Balancer {
    pub addr: SocketAddr,
    /// Connections forwarded to each backend so far.
    pub served: Arc<Vec<AtomicUsize>>,
    next: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Balancer {
    /// Listens on a free port of 127.0.0.1 and spreads connections over
    /// `backends`, round robin.
    pub async fn start(backends: Vec<SocketAddr>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let served: Arc<Vec<AtomicUsize>> =
            Arc::new(backends.iter().map(|_| AtomicUsize::new(0)).collect());
        let next = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn({
            let served = Arc::clone(&served);
            let next = Arc::clone(&next);
            async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    let backends = backends.clone();
                    let served = Arc::clone(&served);
                    let first = next.fetch_add(1, Ordering::SeqCst);
                    tokio::spawn(async move {
                        for i in 0..backends.len() {
                            let which = (first + i) % backends.len();
                            let Ok(mut outbound) = TcpStream::connect(backends[which]).await else {
                                continue;
                            };
                            served[which].fetch_add(1, Ordering::SeqCst);
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                            return;
                        }
                    });
                }
            }
        });
        Self {
            addr,
            served,
            next,
            task,
        }
    }

    /// Sends the next connection to backend `which` (then round robin on).
    pub fn route_next_to(&self, which: usize) {
        self.next.store(which, Ordering::SeqCst);
    }

    /// Connections each backend was given.
    pub fn counts(&self) -> Vec<usize> {
        self.served
            .iter()
            .map(|n| n.load(Ordering::SeqCst))
            .collect()
    }
}
