//! A TCP relay between client and server that can flip one ciphertext byte
//! in the first packet of chosen upload attempts, forcing a cksum mismatch.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A running relay.
pub struct Relay {
    pub addr: SocketAddr,
    /// Attempts corrupted so far.
    pub flipped: Arc<AtomicU32>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const SEND_FILE_CODES: [u16; 2] = [1028, 828];

/// Forwards client requests frame by frame, corrupting the first packet of
/// each of the first `corrupt_attempts` uploads.
async fn client_to_server(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    corrupt_attempts: u32,
    flipped: Arc<AtomicU32>,
) {
    let mut head = [0u8; 23];
    loop {
        if from.read_exact(&mut head).await.is_err() {
            break;
        }
        let code = u16::from_le_bytes([head[17], head[18]]);
        let len = u32::from_le_bytes([head[19], head[20], head[21], head[22]]) as usize;
        let mut payload = vec![0u8; len];
        if from.read_exact(&mut payload).await.is_err() {
            break;
        }
        if SEND_FILE_CODES.contains(&code) && len > 267 {
            let packet = u16::from_le_bytes([payload[8], payload[9]]);
            if packet == 1 && flipped.load(Ordering::SeqCst) < corrupt_attempts {
                flipped.fetch_add(1, Ordering::SeqCst);
                // A byte in the middle of the packet's ciphertext.
                let at = 267 + (len - 267) / 2;
                payload[at] ^= 0x01;
            }
        }
        if to.write_all(&head).await.is_err() || to.write_all(&payload).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

impl Relay {
    /// Relays to `upstream`, corrupting the first `corrupt_attempts` uploads
    /// (`u32::MAX`: all of them).
    pub async fn start(upstream: SocketAddr, corrupt_attempts: u32) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let flipped = Arc::new(AtomicU32::new(0));
        let counter = flipped.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(upstream).await else {
                    break;
                };
                let (client_read, mut client_write) = client.into_split();
                let (mut server_read, server_write) = server.into_split();
                let counter = counter.clone();
                tokio::spawn(client_to_server(
                    client_read,
                    server_write,
                    corrupt_attempts,
                    counter,
                ));
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
                    let _ = client_write.shutdown().await;
                });
            }
        });
        Self {
            addr,
            flipped,
            task,
        }
    }
}
