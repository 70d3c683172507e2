//! Shared test helpers: a server under test, a protocol-level client, log
//! capture and data-directory checks.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use protocol::crypto::{encrypt_all, public_key_field, AesKey, PrivateKey};
use protocol::keyfile::MeInfo;
use protocol::message::{FilePacket, PacketHead};
use protocol::{
    ClientCodec, ClientId, CodecError, FileName, Numbering, Request, RequestFrame, Response,
    UserName,
};
use rand::{RngCore, SeedableRng};
use server::storage::Storage;
use server::{Config, ServerError};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::codec::Framed;

/// Bound on any single wait in a test.
pub const STEP: Duration = Duration::from_secs(30);

/// The recorded sessions and keys.
pub fn vectors_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../protocol/tests/vectors")
}

pub fn me_info(owner: &str) -> MeInfo {
    let text =
        std::fs::read_to_string(vectors_dir().join("keys").join(owner).join("me.info")).unwrap();
    MeInfo::parse(&text).unwrap()
}

/// Alice's recorded private key: reused by most tests so none has to
/// generate RSA keys.
pub fn alice_key() -> PrivateKey {
    static KEY: OnceLock<PrivateKey> = OnceLock::new();
    KEY.get_or_init(|| me_info("alice").key).clone()
}

pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

pub fn file(name: &str) -> FileName {
    FileName::try_from(name).unwrap()
}

pub fn user(name: &str) -> UserName {
    UserName::try_from(name).unwrap()
}

// ---------------------------------------------------------------- logs

static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();

struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs (once per test binary) a subscriber that captures every log
/// line of the server, so tests can check that causes are logged.
pub fn init_logs() {
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let writer = Arc::clone(&buf);
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("info,server=debug"))
            .with_ansi(false)
            .with_writer(move || Capture(Arc::clone(&writer)))
            .try_init();
        buf
    });
}

pub fn logs() -> String {
    init_logs();
    let buf = LOGS.get().unwrap().lock().unwrap();
    String::from_utf8_lossy(&buf).into_owned()
}

/// Waits until a log line satisfies `pred`; returns the line.
pub async fn wait_for_log(pred: impl Fn(&str) -> bool) -> Option<String> {
    for _ in 0..100 {
        if let Some(line) = logs().lines().find(|l| pred(l)) {
            return Some(line.to_owned());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// Asserts that the server logged `cause` for the connection from `local`
/// (the client's side address is the server's `peer`).
pub async fn assert_logged(local: SocketAddr, cause: &str) {
    let peer = format!("peer={local}");
    let found = wait_for_log(|l| l.contains(&peer) && l.contains(cause)).await;
    assert!(
        found.is_some(),
        "no log line for {peer} containing {cause:?}; logs for it:\n{}",
        {
            logs()
                .lines()
                .filter(|l| l.contains(&peer))
                .collect::<Vec<_>>()
                .join("\n")
        }
    );
}

// ---------------------------------------------------------------- server

/// A test configuration: defaults with short grace and timeouts, and no
/// practical limit on registrations or connections per source (every test
/// connects from 127.0.0.1; those limits have their own tests in
/// `registration` and `admission`). The handshake deadline is past the
/// idle and request timeouts, so each of those is what cuts a silent or
/// slow first request.
pub fn config(data: &Path) -> Config {
    let mut c = Config::new(data);
    c.shutdown_grace = Duration::from_secs(3);
    c.request_timeout = Duration::from_secs(10);
    c.idle_timeout = Duration::from_secs(30);
    c.handshake_timeout = Duration::from_secs(LENIENT_HANDSHAKE_SECS);
    c.registrations_per_minute = UNLIMITED_REGISTRATIONS;
    c.registration_burst = UNLIMITED_REGISTRATIONS;
    c.max_per_source = UNLIMITED_CONNECTIONS;
    c.max_unauthenticated = UNLIMITED_CONNECTIONS;
    c
}

/// A registration limit no test reaches.
pub const UNLIMITED_REGISTRATIONS: u32 = 1_000_000;
/// A per-source or unauthenticated connection limit no test reaches.
pub const UNLIMITED_CONNECTIONS: usize = 1_000_000;
/// A handshake deadline past every test's idle and request timeouts.
pub const LENIENT_HANDSHAKE_SECS: u64 = 120;

/// The library server running on 127.0.0.1:0 in this runtime.
pub struct TestServer {
    /// The legacy (plain version 3) listener.
    pub addr: SocketAddr,
    /// The secure (TLS) listener, when started with one.
    pub secure_addr: Option<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServerError>>>,
}

impl TestServer {
    /// A server with only the legacy listener: the raw-protocol tests.
    pub async fn start(config: Config) -> Self {
        Self::start_with(config, false).await
    }

    /// A server with both listeners side by side.
    pub async fn start_both(config: Config) -> Self {
        Self::start_with(config, true).await
    }

    async fn start_with(config: Config, secure: bool) -> Self {
        init_logs();
        let legacy = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = legacy.local_addr().unwrap();
        let (listeners, secure_addr) = if secure {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let secure_addr = listener.local_addr().unwrap();
            (server::Listeners::both(listener, legacy), Some(secure_addr))
        } else {
            (server::Listeners::legacy(legacy), None)
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server::run(listeners, config, async move {
            let _ = stopped.await;
        }));
        Self {
            addr,
            secure_addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Asks for shutdown without waiting.
    pub fn request_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Asks for shutdown and waits for `run` to return.
    pub async fn stop(mut self) -> Result<(), ServerError> {
        self.request_stop();
        let task = self.task.take().unwrap();
        tokio::time::timeout(STEP, task)
            .await
            .expect("server did not stop in time")
            .expect("server task panicked")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.request_stop();
    }
}

// ---------------------------------------------------------------- peers

/// A raw protocol connection.
pub struct Peer {
    pub framed: Framed<TcpStream, ClientCodec>,
}

impl Peer {
    pub async fn connect(addr: SocketAddr) -> Self {
        let stream = tokio::time::timeout(STEP, TcpStream::connect(addr))
            .await
            .unwrap()
            .unwrap();
        Self {
            framed: Framed::new(stream, ClientCodec::default()),
        }
    }

    /// As [`connect`](Self::connect), from the local address `source`
    /// (another address of 127.0.0.0/8, for the per-source limits).
    pub async fn connect_from(addr: SocketAddr, source: std::net::IpAddr) -> Self {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(source, 0)).unwrap();
        let stream = tokio::time::timeout(STEP, socket.connect(addr))
            .await
            .unwrap()
            .unwrap();
        Self {
            framed: Framed::new(stream, ClientCodec::default()),
        }
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.framed.get_ref().local_addr().unwrap()
    }

    pub async fn send(&mut self, frame: RequestFrame) {
        tokio::time::timeout(STEP, self.framed.send(frame))
            .await
            .unwrap()
            .unwrap();
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        tokio::time::timeout(STEP, self.framed.get_mut().write_all(bytes))
            .await
            .unwrap()
            .unwrap();
    }

    /// The next response, or `None` on a clean end of stream.
    pub async fn next(&mut self) -> Option<Result<Response, CodecError>> {
        tokio::time::timeout(STEP, self.framed.next())
            .await
            .expect("no response in time")
    }

    pub async fn recv(&mut self) -> Response {
        match self.next().await {
            Some(Ok(r)) => r,
            other => panic!("expected a response, got {other:?}"),
        }
    }

    /// Whether nothing arrives within `wait`.
    pub async fn silent_for(&mut self, wait: Duration) -> bool {
        tokio::time::timeout(wait, self.framed.next())
            .await
            .is_err()
    }

    /// Reads until the server closes; returns what it answered first.
    pub async fn closed(&mut self) -> Vec<Response> {
        let mut got = Vec::new();
        loop {
            match self.next().await {
                Some(Ok(r)) => got.push(r),
                Some(Err(_)) | None => return got,
            }
        }
    }

    /// Asserts the server answered 1607 and closed.
    pub async fn expect_1607_and_close(&mut self) {
        let got = self.closed().await;
        assert_eq!(
            got,
            vec![Response::GeneralError],
            "expected exactly one 1607 before the close"
        );
    }
}

/// The packets of one upload of `content`, encrypted with `key` and cut
/// into `packet`-byte slices of ciphertext.
pub fn packets(
    client_id: ClientId,
    numbering: Numbering,
    key: &AesKey,
    file: &FileName,
    content: &[u8],
    packet: usize,
) -> Vec<RequestFrame> {
    let ct = encrypt_all(key, content);
    let chunks: Vec<&[u8]> = ct.chunks(packet).collect();
    let total = u32::try_from(chunks.len()).unwrap();
    chunks
        .iter()
        .enumerate()
        .map(|(i, c)| RequestFrame {
            client_id,
            numbering,
            request: Request::SendFile(FilePacket {
                head: PacketHead {
                    content_size: ct.len() as u64,
                    orig_size: content.len() as u64,
                    packet: u32::try_from(i + 1).unwrap(),
                    total,
                    file: file.clone(),
                },
                content: Bytes::copy_from_slice(c),
            }),
        })
        .collect()
}

/// A client that has exchanged keys.
pub struct Client {
    pub peer: Peer,
    pub id: ClientId,
    pub name: UserName,
    pub key: PrivateKey,
    pub aes: AesKey,
    pub numbering: Numbering,
}

impl Client {
    /// Registers `name` and sends `key`'s public half; panics unless the
    /// server answers 1600 then 1602.
    pub async fn register(
        addr: SocketAddr,
        name: &str,
        key: &PrivateKey,
        numbering: Numbering,
    ) -> Self {
        let mut peer = Peer::connect(addr).await;
        let name = user(name);
        peer.send(RequestFrame {
            client_id: ClientId::default(),
            numbering,
            request: Request::Register { name: name.clone() },
        })
        .await;
        let id = match peer.recv().await {
            Response::Registered { client_id } => client_id,
            other => panic!("register {name}: {other:?}"),
        };
        let field = public_key_field(&key.public_key()).unwrap();
        peer.send(RequestFrame {
            client_id: id,
            numbering,
            request: Request::PublicKey {
                name: name.clone(),
                key: field,
            },
        })
        .await;
        let aes = match peer.recv().await {
            Response::KeyAccepted {
                client_id,
                wrapped_key,
            } => {
                assert_eq!(client_id, id);
                key.unwrap_aes_key(&mut rand::thread_rng(), &wrapped_key)
                    .unwrap()
            }
            other => panic!("public key of {name}: {other:?}"),
        };
        Self {
            peer,
            id,
            name,
            key: key.clone(),
            aes,
            numbering,
        }
    }

    /// Reconnects as `id`; `Err` holds the answer when it is not 1605.
    pub async fn reconnect(
        addr: SocketAddr,
        id: ClientId,
        name: &str,
        key: &PrivateKey,
        numbering: Numbering,
    ) -> Result<Self, Response> {
        let mut peer = Peer::connect(addr).await;
        let name = user(name);
        peer.send(RequestFrame {
            client_id: id,
            numbering,
            request: Request::Reconnect { name: name.clone() },
        })
        .await;
        match peer.recv().await {
            Response::Reconnected {
                client_id,
                wrapped_key,
            } => {
                assert_eq!(client_id, id);
                let aes = key
                    .unwrap_aes_key(&mut rand::thread_rng(), &wrapped_key)
                    .unwrap();
                Ok(Self {
                    peer,
                    id,
                    name,
                    key: key.clone(),
                    aes,
                    numbering,
                })
            }
            other => Err(other),
        }
    }

    pub fn frame(&self, request: Request) -> RequestFrame {
        RequestFrame {
            client_id: self.id,
            numbering: self.numbering,
            request,
        }
    }

    /// Proves the key (1250) as retrieval on the legacy listener needs
    /// (`docs/PROTOCOL.md` §11.5); panics unless the server answers 1650.
    pub async fn prove(&mut self) {
        let proof = protocol::secure::legacy_retrieval_proof(&self.aes, self.id);
        let frame = self.frame(Request::Prove { proof });
        self.peer.send(frame).await;
        match self.peer.recv().await {
            Response::Authenticated { client_id } => assert_eq!(client_id, self.id),
            other => panic!("proof of {}: {other:?}", self.name),
        }
    }

    /// Sends every packet of `content`; returns the answer to the last one.
    pub async fn send_file(&mut self, name: &FileName, content: &[u8], packet: usize) -> Response {
        for p in packets(self.id, self.numbering, &self.aes, name, content, packet) {
            self.peer.send(p).await;
        }
        self.peer.recv().await
    }

    /// Uploads `content` and confirms it; panics unless the server's cksum
    /// matches and the commit is acknowledged.
    pub async fn store(&mut self, name: &str, content: &[u8], packet: usize) {
        let f = file(name);
        match self.send_file(&f, content, packet).await {
            Response::FileReceived {
                client_id,
                content_size,
                file: got,
                cksum,
            } => {
                assert_eq!(client_id, self.id);
                assert_eq!(got, f);
                assert_eq!(
                    content_size,
                    protocol::crypto::pkcs7_len(content.len() as u64)
                );
                assert_eq!(
                    cksum,
                    protocol::Cksum::of(content),
                    "server cksum of {name}"
                );
            }
            other => panic!("upload of {name}: {other:?}"),
        }
        self.peer.send(self.frame(Request::CrcOk { file: f })).await;
        assert_eq!(self.peer.recv().await, Response::Ack { client_id: self.id });
    }
}

// ---------------------------------------------------------------- disk checks

/// Every regular file under `dir`, relative to it.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().to_owned());
            }
        }
    }
    out.sort();
    out
}

fn is_hex32(s: &str) -> bool {
    s.len() == 32
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// Temporaries of uploads under `data`.
pub fn temp_files(data: &Path) -> Vec<PathBuf> {
    files_under(data)
        .into_iter()
        .filter(|p| p.components().any(|c| c.as_os_str() == "tmp"))
        .collect()
}

/// Asserts that `data` holds only the database, committed blobs (each at
/// `clients/<hex>/blobs/<hex>`), the server's TLS identity, the lock
/// file that keeps a prune from running beside start-up recovery, and the
/// record of the blob store.
pub fn assert_only_database_and_blobs(data: &Path) {
    for p in files_under(data) {
        let parts: Vec<&str> = p.iter().map(|c| c.to_str().unwrap()).collect();
        let ok = match parts.as_slice() {
            [db] => db.starts_with("backup.db") || *db == "maintenance.lock" || *db == "blob-store",
            ["identity", "server-cert.der" | "server-key.der"] => true,
            ["clients", c, "blobs", b] => is_hex32(c) && is_hex32(b),
            _ => false,
        };
        assert!(ok, "unexpected file in the data directory: {}", p.display());
    }
}

/// Asserts that every version row has its content (a blob on disk, or for
/// a small file inline content in the database) with the recorded size,
/// SHA-256 and cksum, and that every blob and every inline content has a
/// row.
pub fn assert_metadata_matches_disk(data: &Path) {
    let storage = Storage::open_local(data).unwrap();
    let rows = storage.meta().all_versions().unwrap();
    let mut blobs: Vec<PathBuf> = files_under(data)
        .into_iter()
        .filter(|p| p.starts_with("clients"))
        .collect();
    blobs.sort();
    let mut recorded: Vec<PathBuf> = rows
        .iter()
        .filter(|r| !r.blob.is_inline())
        .map(|r| PathBuf::from(&r.blob.0))
        .collect();
    recorded.sort();
    assert_eq!(blobs, recorded, "blobs on disk and version rows differ");
    let mut inline: Vec<String> = storage
        .meta()
        .inline_blobs()
        .unwrap()
        .into_iter()
        .map(|(k, _)| k.0)
        .collect();
    inline.sort();
    let mut inline_rows: Vec<String> = rows
        .iter()
        .filter(|r| r.blob.is_inline())
        .map(|r| r.blob.0.clone())
        .collect();
    inline_rows.sort();
    assert_eq!(
        inline, inline_rows,
        "inline contents and version rows differ"
    );
    for r in &rows {
        let mut content = Vec::new();
        std::io::Read::read_to_end(&mut storage.open_blob(&r.blob).unwrap(), &mut content).unwrap();
        assert_eq!(content.len() as u64, r.size, "size of {}", r.blob);
        assert_eq!(
            <[u8; 32]>::from(Sha256::digest(&content)),
            r.sha256,
            "sha256 of {}",
            r.blob
        );
        assert_eq!(
            protocol::Cksum::of(&content),
            r.cksum,
            "cksum of {}",
            r.blob
        );
    }
}

/// The latest stored content of `name` for `client`.
pub fn stored(data: &Path, client: ClientId, name: &FileName) -> Option<Vec<u8>> {
    Storage::open_local(data)
        .unwrap()
        .read_latest(client, name)
        .unwrap()
}

// ---------------------------------------------------------------- the binary

/// The real `backup-server` binary, started on 127.0.0.1:0 with both
/// listeners.
pub struct Binary {
    pub child: std::process::Child,
    /// The legacy listener.
    pub addr: SocketAddr,
    /// The secure listener.
    pub secure_addr: SocketAddr,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Binary {
    /// Starts the binary on `data` with `extra` flags and waits for its
    /// "listening" lines.
    pub fn start(data: &Path, extra: &[&str]) -> Self {
        Self::start_with(data, extra, Launch::Direct)
    }

    /// As [`start`](Self::start), launched as `launch` says.
    pub fn start_with(data: &Path, extra: &[&str], launch: Launch) -> Self {
        use std::io::BufRead;
        let mut child = server_command(data, extra, launch)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.contains("listening for") {
                    let _ = tx.send(line.clone());
                }
                sink.lock().unwrap().push(line);
            }
        });
        let addr_of = |line: &str| -> SocketAddr {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix("addr="))
                .expect("listening line has addr=")
                .parse()
                .unwrap()
        };
        let (mut addr, mut secure_addr) = (None, None);
        while addr.is_none() || secure_addr.is_none() {
            let line = rx
                .recv_timeout(STEP)
                .expect("the binary never logged that it is listening");
            if line.contains("listening for legacy") {
                addr = Some(addr_of(&line));
            } else {
                secure_addr = Some(addr_of(&line));
            }
        }
        Self {
            child,
            addr: addr.unwrap(),
            secure_addr: secure_addr.unwrap(),
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Peak resident set size in KiB (`VmHWM`).
    pub fn peak_rss_kib(&self) -> Option<u64> {
        status_field(self.pid(), "VmHWM:")
    }

    /// Resident set size now, in KiB (`VmRSS`).
    pub fn rss_kib(&self) -> Option<u64> {
        status_field(self.pid(), "VmRSS:")
    }

    /// Open file descriptors of the process.
    pub fn open_fds(&self) -> Option<usize> {
        Some(
            std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
                .ok()?
                .count(),
        )
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// CPU time used so far (user + system), from `/proc/<pid>/stat`.
    pub fn cpu_time(&self) -> Option<Duration> {
        cpu_time_of(&self.pid().to_string())
    }

    pub fn kill_hard(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Sends SIGTERM and waits (bounded) for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let ok = std::process::Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -TERM failed");
        for _ in 0..300 {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill_hard();
        panic!("the binary did not exit within 15 s of SIGTERM");
    }

    /// Whether the binary logged a line about the connection from `local`
    /// (the client's side address is the server's `peer`) containing
    /// `cause`, waiting up to 5 s for the log reader to catch up.
    pub fn logged_for(&self, local: SocketAddr, cause: &str) -> bool {
        let peer = format!("peer={local}");
        for _ in 0..100 {
            if self
                .log
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.contains(&peer) && l.contains(cause))
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// The log lines so far that contain `needle`.
    pub fn log_lines(&self, needle: &str) -> Vec<String> {
        let log = self.log.lock().unwrap();
        log.iter().filter(|l| l.contains(needle)).cloned().collect()
    }

    /// Whether the binary logged `needle`, waiting up to 5 s for the log
    /// reader to catch up.
    pub fn logged(&self, needle: &str) -> bool {
        for _ in 0..100 {
            if self.log.lock().unwrap().iter().any(|l| l.contains(needle)) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// How the binary is launched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Launch {
    /// As it is.
    Direct,
    /// Through util-linux `prlimit --fsize=N`: no file the server writes
    /// may grow past N bytes (RLIMIT_FSIZE).
    FileSizeLimit(u64),
}

/// The one place where the binary's command line is built: serving on
/// 127.0.0.1:0 over `data`, with `extra` flags, a clean environment and
/// `RUST_LOG=info`.
pub fn server_command(data: &Path, extra: &[&str], launch: Launch) -> std::process::Command {
    let binary = env!("CARGO_BIN_EXE_backup-server");
    let mut cmd = match launch {
        Launch::Direct => std::process::Command::new(binary),
        Launch::FileSizeLimit(bytes) => {
            let prlimit = find_program("prlimit").expect("prlimit is not installed");
            let mut cmd = std::process::Command::new(prlimit);
            cmd.arg(format!("--fsize={bytes}")).arg("--").arg(binary);
            cmd
        }
    };
    cmd.args([
        "--listen",
        "127.0.0.1:0",
        "--legacy-listen",
        "127.0.0.1:0",
        "--data-dir",
    ])
    .arg(data)
    .args(extra)
    .env_clear()
    .env("RUST_LOG", "info")
    // Every test registers from 127.0.0.1: no practical limit, unless a
    // test's own flags set one (flags win over the environment).
    .env(
        "BACKUP_SERVER_REGISTRATIONS_PER_MINUTE",
        UNLIMITED_REGISTRATIONS.to_string(),
    )
    .env(
        "BACKUP_SERVER_REGISTRATION_BURST",
        UNLIMITED_REGISTRATIONS.to_string(),
    )
    .env(
        "BACKUP_SERVER_MAX_PER_SOURCE",
        UNLIMITED_CONNECTIONS.to_string(),
    )
    .env(
        "BACKUP_SERVER_MAX_UNAUTHENTICATED",
        UNLIMITED_CONNECTIONS.to_string(),
    )
    .env(
        "BACKUP_SERVER_HANDSHAKE_TIMEOUT",
        LENIENT_HANDSHAKE_SECS.to_string(),
    )
    .current_dir(data.parent().unwrap_or(data));
    cmd
}

/// Runs an operator command of the binary (`scrub`, `clients`, ...) on
/// `data`; returns its exit status, stdout and stderr.
pub fn admin_command(command: &str, data: &Path, extra: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_backup-server"))
        .arg(command)
        .arg("--data-dir")
        .arg(data)
        .args(extra)
        .env_clear()
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The absolute path of `name` on `PATH`, if any.
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Whether the long variants of the reliability tests run
/// (`BACKUP_LONG_TESTS=1`).
pub fn long_tests() -> bool {
    std::env::var_os("BACKUP_LONG_TESTS").is_some_and(|v| v == "1")
}

/// The soft limit on open files of this process (from `/proc/self/limits`).
pub fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// A `KiB` field of `/proc/<pid>/status`.
fn status_field(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// User + system CPU time of process `pid` ("self" for this one), assuming
/// the usual 100 clock ticks per second.
pub fn cpu_time_of(pid: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(Duration::from_millis((utime + stime) * 10))
}
