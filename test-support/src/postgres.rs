//! A throwaway PostgreSQL cluster for the tests.
//!
//! `initdb` in a temporary directory (as the `postgres` user when the
//! tests run as root: PostgreSQL refuses to run as root), then `pg_ctl`
//! on a free port of 127.0.0.1, with its socket in the same directory.
//! Stopped and removed on drop.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// When set (to anything), tests that need PostgreSQL fail instead of
/// being skipped if it is not installed.
pub const REQUIRE_PG: &str = "BACKUP_TEST_REQUIRE_PG";

/// How long the cluster may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A running throwaway PostgreSQL cluster.
pub struct Postgres {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    as_postgres: bool,
    databases: std::sync::atomic::AtomicU32,
}

impl std::fmt::Debug for Postgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Postgres")
            .field("port", &self.port)
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

/// The directory of `initdb` and `pg_ctl`: Debian keeps them out of `PATH`
/// under `/usr/lib/postgresql/VERSION/bin` (the newest is taken).
pub fn bin_dir() -> Option<PathBuf> {
    if let Ok(dir) = std::env::var("BACKUP_TEST_PG_BIN") {
        return Some(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Some(bin);
    }
    // Elsewhere (e.g. a distribution that puts them on PATH).
    let found = Command::new("initdb")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    found.then(PathBuf::new)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

impl Postgres {
    /// Starts a cluster, or returns `None` (having printed why) when
    /// PostgreSQL is not installed and [`REQUIRE_PG`] is unset.
    ///
    /// # Panics
    /// When PostgreSQL is missing and [`REQUIRE_PG`] is set, or the cluster
    /// does not start.
    pub fn start(test: &str) -> Option<Self> {
        let Some(bin) = bin_dir() else {
            assert!(
                std::env::var_os(REQUIRE_PG).is_none(),
                "{test}: PostgreSQL (initdb) is not installed and {REQUIRE_PG} is set \
                 (install it with `apt-get install postgresql`, or run `cargo xtask test`)"
            );
            eprintln!(
                "skipped: {test} needs PostgreSQL (initdb not found; run `cargo xtask test`)"
            );
            return None;
        };
        let as_postgres = is_root();
        // In /tmp, which the `postgres` user can reach whatever TMPDIR is
        // (a TMPDIR under root's home would not be), and short enough for
        // the socket's path.
        let dir = tempfile::Builder::new()
            .prefix("backup-pg-")
            .tempdir_in(if as_postgres {
                PathBuf::from("/tmp")
            } else {
                std::env::temp_dir()
            })
            .expect("temporary directory");
        let pg = Self {
            bin,
            dir,
            port: free_port(),
            as_postgres,
            databases: std::sync::atomic::AtomicU32::new(0),
        };
        pg.init();
        pg.start_server();
        Some(pg)
    }

    fn program(&self, name: &str) -> PathBuf {
        if self.bin.as_os_str().is_empty() {
            PathBuf::from(name)
        } else {
            self.bin.join(name)
        }
    }

    /// A command running `program` as the cluster's owner.
    fn command(&self, program: &str) -> Command {
        let path = self.program(program);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The directory of the cluster's socket and log.
    fn run_dir(&self) -> &Path {
        self.dir.path()
    }

    fn run(&self, mut c: Command, what: &str) {
        let out = c
            .output()
            .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
        assert!(
            out.status.success(),
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn init(&self) {
        if self.as_postgres {
            self.run(
                {
                    let mut c = Command::new("chown");
                    c.arg("postgres:").arg(self.dir.path());
                    c
                },
                "chown the cluster's directory",
            );
        }
        let mut c = self.command("initdb");
        c.arg("-D")
            .arg(self.data())
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .arg("--locale=C");
        self.run(c, "initdb");
    }

    fn start_server(&self) {
        let mut c = self.command("pg_ctl");
        c.arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.run_dir().join("postgres.log"))
            .arg("-o")
            .arg(format!(
                "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=300 -c fsync=off -c full_page_writes=off",
                self.port,
                self.run_dir().display()
            ))
            .args(["-w", "-t", &START_TIMEOUT.as_secs().to_string(), "start"]);
        self.run(c, "pg_ctl start");
        let deadline = Instant::now() + START_TIMEOUT;
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "PostgreSQL did not start: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the cluster as a crash would (`pg_ctl stop -m immediate`).
    pub fn stop(&self) {
        let mut c = self.command("pg_ctl");
        c.arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "-w", "stop"]);
        self.run(c, "pg_ctl stop");
    }

    /// Starts the cluster again after [`stop`](Self::stop), on the same
    /// port.
    pub fn restart(&self) {
        self.start_server();
    }

    /// Freezes the cluster (SIGSTOP to the postmaster and every process
    /// it started: backends make process groups of their own, so a group
    /// signal would miss them): connections stay open and nothing answers,
    /// as with a hung host or a cut network, until [`resume`](Self::resume).
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// Thaws the cluster after [`pause`](Self::pause).
    pub fn resume(&self) {
        self.signal("CONT");
    }

    fn signal(&self, which: &str) {
        let pid = std::fs::read_to_string(self.data().join("postmaster.pid"))
            .ok()
            .and_then(|s| s.lines().next().map(|l| l.trim().to_owned()))
            .expect("postmaster.pid names the postmaster");
        let mut c = Command::new("kill");
        c.arg(format!("-{which}")).arg(&pid);
        self.run(c, "signal the postmaster");
        // pkill exits 1 when no process matched (no backend yet): fine.
        let _ = Command::new("pkill")
            .arg(format!("-{which}"))
            .args(["-P", &pid])
            .status();
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.run_dir().join("postgres.log")).unwrap_or_default()
    }

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A new, empty database; its URL.
    pub fn database(&self) -> String {
        let n = self
            .databases
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("backup_test_{n}");
        let mut c = self.command("psql");
        c.args(["-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-q"])
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-c")
            .arg(format!("CREATE DATABASE {name}"));
        self.run(c, "create a database");
        self.url(&name)
    }

    /// The URL of database `name`.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let mut c = self.command("pg_ctl");
        c.arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let _ = c.status();
    }
}
