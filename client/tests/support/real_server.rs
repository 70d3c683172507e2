//! The real server (`server::run`, legacy listener) on 127.0.0.1:0 over a temporary data
//! directory, stopped when dropped.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;

pub struct RealServer {
    pub addr: SocketAddr,
    pub data: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
}

impl RealServer {
    /// Starts serving in the current runtime.
    pub async fn start() -> Self {
        let data = tempfile::tempdir().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let mut config = server::Config::new(data.path());
        config.shutdown_grace = Duration::from_secs(2);
        tokio::spawn(server::run(
            server::Listeners::legacy(listener),
            config,
            async move {
                let _ = stopped.await;
            },
        ));
        Self {
            addr,
            data,
            stop: Some(stop),
        }
    }
}

impl Drop for RealServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
