//! The real binaries as processes: `backup-server` on a temporary data
//! directory (stopped when dropped, its memory readable from /proc), and
//! `backup-client` with a private configuration directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

/// The `backup-server` binary of this build: beside `backup-client`, built
/// on demand when only the client's tests were compiled.
pub fn server_binary() -> PathBuf {
    let client = Path::new(env!("CARGO_BIN_EXE_backup-client"));
    let server = client.with_file_name("backup-server");
    if !server.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = std::process::Command::new(cargo);
        cmd.args(["build", "-p", "backup-server", "--bin", "backup-server"]);
        if client
            .parent()
            .is_some_and(|dir| dir.file_name() == Some("release".as_ref()))
        {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("cargo runs");
        assert!(status.success(), "building backup-server failed");
    }
    server
}

/// A free port on 127.0.0.1 (bound, then released for the server to take).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `backup-server` serving secure mode (and the legacy listener) on
/// 127.0.0.1, killed when dropped.
pub struct ServerProcess {
    pub addr: SocketAddr,
    pub legacy_addr: SocketAddr,
    pub data: tempfile::TempDir,
    child: std::process::Child,
    log: PathBuf,
    extra: Vec<String>,
    rust_log: String,
    env: Vec<(String, String)>,
}

impl ServerProcess {
    /// Starts the server with `extra` flags and waits until both listeners
    /// accept.
    pub fn start(extra: &[&str]) -> Self {
        Self::start_logging(extra, "debug")
    }

    /// As [`ServerProcess::start`], logging at `rust_log` (`RUST_LOG`).
    pub fn start_logging(extra: &[&str], rust_log: &str) -> Self {
        Self::start_with_env(extra, rust_log, &[])
    }

    /// As [`ServerProcess::start_logging`], with environment variables
    /// `env` set for the server.
    pub fn start_with_env(extra: &[&str], rust_log: &str, env: &[(&str, &str)]) -> Self {
        Self::start_in(tempfile::tempdir().unwrap(), extra, rust_log, env)
    }

    /// As [`ServerProcess::start_with_env`], in `data` (whose `data`
    /// sub-directory is the data directory, which the caller may have
    /// prepared, e.g. with a copy of another server's identity).
    pub fn start_in(
        data: tempfile::TempDir,
        extra: &[&str],
        rust_log: &str,
        env: &[(&str, &str)],
    ) -> Self {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let legacy_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = data.path().join("server.log");
        let child = Self::spawn(addr, legacy_addr, data.path(), &log, extra, rust_log, &env);
        let server = Self {
            addr,
            legacy_addr,
            data,
            child,
            log,
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
            rust_log: rust_log.to_owned(),
            env,
        };
        server.wait_listening();
        server
    }

    fn spawn(
        addr: SocketAddr,
        legacy_addr: SocketAddr,
        dir: &Path,
        log: &Path,
        extra: &[&str],
        rust_log: &str,
        env: &[(String, String)],
    ) -> std::process::Child {
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        std::process::Command::new(server_binary())
            .args(["--listen", &addr.to_string()])
            .args(["--legacy-listen", &legacy_addr.to_string()])
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args(extra)
            .env("RUST_LOG", rust_log)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    fn wait_listening(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        for target in [self.addr, self.legacy_addr] {
            while std::net::TcpStream::connect(target).is_err() {
                assert!(
                    Instant::now() < deadline,
                    "the server did not listen on {target}: {}",
                    self.log()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// SIGKILLs the server (it stays down).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILLs the server and starts it again on the same data directory
    /// and addresses.
    pub fn kill_and_restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        self.child = Self::spawn(
            self.addr,
            self.legacy_addr,
            self.data.path(),
            &self.log,
            &extra,
            &self.rust_log,
            &self.env,
        );
        self.wait_listening();
    }

    /// What the server logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The server's resident memory now and at its peak, in KiB.
    pub fn memory_kib(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `backup-client` with `args`, its configuration in `config`, for at
/// most `limit`.
pub async fn run_client(config: &Path, args: &[&str], limit: Duration) -> Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_backup-client"));
    cmd.arg("--config-dir")
        .arg(config)
        .args(args)
        .env_remove("BACKUP_CLIENT_DIR")
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    tokio::time::timeout(limit, cmd.output())
        .await
        .expect("the client did not finish in time")
        .unwrap()
}

/// A client run's stderr, for assertion messages.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}
