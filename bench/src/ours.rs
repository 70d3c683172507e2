//! Our server and client: start a server, register clients, and measure
//! backups and restores.

use std::fs::{self, File};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::measure::{self, Cmd, Cost, ProcSample};
use crate::mode::{Capabilities, Mode, Wiring};

/// The release binaries under test.
#[derive(Debug, Clone)]
pub struct Bins {
    pub server: PathBuf,
    pub client: PathBuf,
}

impl Bins {
    /// `backup-server` and `backup-client` in `dir`.
    ///
    /// # Errors
    /// When either is missing.
    pub fn in_dir(dir: &Path) -> Result<Self> {
        let bins = Self {
            server: dir.join("backup-server"),
            client: dir.join("backup-client"),
        };
        for b in [&bins.server, &bins.client] {
            if !b.is_file() {
                bail!(
                    "{} not found: build with `cargo build --release -p backup-server -p backup-client` or pass --bin-dir",
                    b.display()
                );
            }
        }
        Ok(bins)
    }
}

/// A free TCP port on 127.0.0.1 (free when asked; the server binds it
/// right after).
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(l.local_addr()?.port())
}

/// A running `backup-server`.
pub struct Server {
    child: Child,
    pub wiring: Wiring,
    pub mode: Mode,
    data_dir: PathBuf,
    log: PathBuf,
}

/// Flags and environment a server is given beyond its wiring.
#[derive(Debug, Clone, Default)]
pub struct Extra {
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

/// What the server spent during one phase.
#[derive(Debug, Clone, Copy)]
pub struct ServerCost {
    pub cpu_s: f64,
    pub peak_rss_kib: u64,
    /// False when the peak could not be reset: it covers the server's life.
    pub peak_is_phase: bool,
}

/// A phase being measured on the server.
pub struct Phase {
    before: ProcSample,
    reset: bool,
}

impl Server {
    /// Starts a server in `mode` on `data_dir`, waits until it accepts.
    ///
    /// # Errors
    /// When it does not start or accept within 30 s.
    pub fn start(
        bins: &Bins,
        caps: Capabilities,
        mode: Mode,
        data_dir: &Path,
        log: &Path,
    ) -> Result<Self> {
        Self::start_with(bins, caps, mode, data_dir, log, &Extra::default())
    }

    /// As [`Server::start`], with more flags and environment variables
    /// (where the metadata and the blobs are kept, S3 credentials).
    ///
    /// # Errors
    /// As [`Server::start`].
    pub fn start_with(
        bins: &Bins,
        caps: Capabilities,
        mode: Mode,
        data_dir: &Path,
        log: &Path,
        extra: &Extra,
    ) -> Result<Self> {
        let wiring = mode.wiring(caps, free_port()?, free_port()?)?;
        fs::create_dir_all(data_dir)?;
        let out = File::create(log)?;
        let err = out.try_clone()?;
        let child = Command::new(&bins.server)
            .args(&wiring.server_args)
            .args(caps.server_limit_args())
            .args(&extra.args)
            .arg("--data-dir")
            .arg(data_dir)
            .env("RUST_LOG", "info")
            .envs(extra.env.iter().map(|(k, v)| (k, v)))
            .current_dir(data_dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {}", bins.server.display()))?;
        let mut server = Self {
            child,
            wiring,
            mode,
            data_dir: data_dir.to_owned(),
            log: log.to_owned(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if TcpStream::connect(server.wiring.client_addr).is_ok() {
                return Ok(server);
            }
            if let Some(status) = server.child.try_wait()? {
                bail!(
                    "the server exited ({status}):\n{}",
                    measure::tail(log, 1500)
                );
            }
            if Instant::now() > deadline {
                server.stop();
                bail!("the server did not accept connections within 30 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the server's log holds `line` (a line it writes once
    /// ready: the listener accepts before the storage is open and the TLS
    /// identity loaded, and a connection waits meanwhile).
    ///
    /// # Errors
    /// When the server exits or `within` passes first.
    pub fn wait_for_log(&mut self, line: &str, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            if fs::read_to_string(&self.log).is_ok_and(|t| t.contains(line)) {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "the server exited ({status}):\n{}",
                    measure::tail(&self.log, 1500)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "the server did not log {line:?} within {within:?}:\n{}",
                    measure::tail(&self.log, 1500)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The server's data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Starts measuring a phase: resets the peak RSS, notes the CPU time.
    ///
    /// # Errors
    /// When the server is gone.
    pub fn phase(&self) -> Result<Phase> {
        let reset = measure::reset_peak(self.pid());
        Ok(Phase {
            before: measure::sample(self.pid())?,
            reset,
        })
    }

    /// Ends a phase.
    ///
    /// # Errors
    /// When the server is gone.
    pub fn end(&self, phase: Phase) -> Result<ServerCost> {
        let after = measure::sample(self.pid())?;
        Ok(ServerCost {
            cpu_s: after.cpu_s - phase.before.cpu_s,
            peak_rss_kib: after.peak_rss_kib,
            peak_is_phase: phase.reset,
        })
    }

    /// Stops the server: SIGTERM, then SIGKILL after 15 s.
    pub fn stop(mut self) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap_or(0));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One registered client identity.
#[derive(Debug, Clone)]
pub struct Client {
    bin: PathBuf,
    dir: PathBuf,
    global: Vec<String>,
    mode: Mode,
}

/// What `backup --json` says of a snapshot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SnapshotSummary {
    pub files: u64,
    pub bytes: u64,
    pub new_objects: u64,
    /// Sealed object bytes the client sent (what the server lacked).
    pub sent_bytes: u64,
    pub packs: u64,
}

impl SnapshotSummary {
    /// Reads the summary from the output of `backup --json`.
    ///
    /// # Errors
    /// When the output holds no JSON object with `sent_bytes`.
    pub fn parse(text: &str) -> Result<Self> {
        let v: serde_json::Value = text
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str(l.trim()).ok())
            .or_else(|| serde_json::from_str(text.trim()).ok())
            .context("no JSON summary in the output of backup --json")?;
        let field = |name: &str| v.get(name).and_then(serde_json::Value::as_u64);
        Ok(Self {
            files: field("files").unwrap_or(0),
            bytes: field("bytes").unwrap_or(0),
            new_objects: field("new_objects").unwrap_or(0),
            sent_bytes: field("sent_bytes")
                .context("the JSON summary of backup has no sent_bytes")?,
            packs: field("packs").unwrap_or(0),
        })
    }
}

impl Client {
    /// Registers `name` with `server`, keeping the identity in `dir`.
    ///
    /// # Errors
    /// When registration fails.
    pub fn register(bins: &Bins, server: &Server, dir: &Path, name: &str) -> Result<Self> {
        let client = Self::at(bins, server.wiring.client_addr, server, dir)?;
        measure::run_plain(&client.register_cmd(name), &client.log())?;
        Ok(client)
    }

    /// A client of `server`'s kind (its mode and client flags) reaching it
    /// at `addr` (e.g. a balancer in front of several servers like it),
    /// keeping its identity in `dir`; not registered yet
    /// ([`Client::register_cmd`]).
    ///
    /// # Errors
    /// When `dir` cannot be made.
    pub fn at(bins: &Bins, addr: SocketAddr, server: &Server, dir: &Path) -> Result<Self> {
        fs::create_dir_all(dir)?;
        let mut global = vec![
            "--config-dir".to_owned(),
            dir.display().to_string(),
            "--server".to_owned(),
            addr.to_string(),
            "--quiet".to_owned(),
        ];
        global.extend(server.wiring.client_args.iter().cloned());
        Ok(Self {
            bin: bins.client.clone(),
            dir: dir.to_owned(),
            global,
            mode: server.mode,
        })
    }

    /// `register --name NAME`.
    pub fn register_cmd(&self, name: &str) -> Cmd {
        self.cmd().args(["register", "--name", name])
    }

    /// The same identity reaching its server through `addr` (a relay):
    /// the certificate pinned at registration is given with
    /// `--server-fingerprint`, since pins are kept per address.
    ///
    /// # Errors
    /// When no pin is recorded for the server (legacy mode has none: the
    /// client is returned as it is, with the new address).
    pub fn via(&self, server: &Server, addr: SocketAddr) -> Result<Self> {
        let direct = server.wiring.client_addr.to_string();
        let mut global = self.global.clone();
        for g in &mut global {
            if *g == direct {
                *g = addr.to_string();
            }
        }
        if !self.mode.legacy() {
            let known = fs::read_to_string(self.dir.join("known_servers"))
                .context("reading the client's known_servers")?;
            let pin = known
                .lines()
                .filter_map(|l| l.split_once(' '))
                .find(|(s, _)| *s == direct)
                .map(|(_, fp)| fp.trim().to_owned())
                .with_context(|| format!("no pin for {direct} in known_servers"))?;
            global.extend(["--server-fingerprint".to_owned(), pin]);
        }
        Ok(Self {
            global,
            ..self.clone()
        })
    }

    /// The client with its global flags; a subcommand follows.
    pub fn cmd(&self) -> Cmd {
        Cmd::new(&self.bin).args(&self.global)
    }

    pub fn log(&self) -> PathBuf {
        self.dir.join("client.log")
    }

    /// `backup PATHS...`; in snapshot mode with `--json`, its summary
    /// written to `summary_json` when given.
    pub fn backup_cmd(&self, paths: &[&Path]) -> Cmd {
        let cmd = self.cmd();
        let cmd = if self.mode.snapshots() {
            cmd.arg("--json")
        } else {
            cmd
        };
        cmd.arg("backup").args(paths.iter().map(|p| p.as_os_str()))
    }

    /// Where [`Client::backup_summary`] finds the last backup's JSON.
    fn summary_path(&self) -> PathBuf {
        self.dir.join("backup-summary.json")
    }

    /// `backup PATHS...` with its standard output kept for
    /// [`Client::backup_summary`].
    pub fn backup_kept(&self, paths: &[&Path]) -> Cmd {
        self.backup_cmd(paths).stdout_to(&self.summary_path())
    }

    /// The summary of the last [`Client::backup_kept`] (snapshot mode).
    ///
    /// # Errors
    /// When there is none.
    pub fn backup_summary(&self) -> Result<Option<SnapshotSummary>> {
        if !self.mode.snapshots() {
            return Ok(None);
        }
        let text = fs::read_to_string(self.summary_path())?;
        SnapshotSummary::parse(&text).map(Some)
    }

    /// Restores what a backup of `src` stored into `dest`: the latest
    /// snapshot (which puts `src`'s last component under `dest`), or, file
    /// by file, `restore NAME` for a file and `restore --all` into
    /// `dest/NAME` for a folder.
    pub fn restore_of(&self, src: &Path, dest: &Path) -> Cmd {
        let name = src.file_name().unwrap_or_default();
        let cmd = self.cmd().arg("restore");
        let cmd = if self.mode.snapshots() {
            cmd.arg("--to").arg(dest)
        } else if src.is_dir() {
            cmd.args(["--all", "--to"]).arg(dest.join(name))
        } else {
            cmd.arg(name).arg("--to").arg(dest)
        };
        cmd.arg("--overwrite")
    }
}
/// Runs `cmd` (a client command) while measuring the server too.
///
/// # Errors
/// When the command fails.
pub fn measured(server: &Server, cmd: &Cmd, log: &Path) -> Result<(Cost, ServerCost)> {
    let phase = server.phase()?;
    let cost = measure::run(cmd, log)?;
    Ok((cost, server.end(phase)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_snapshot_summary_from_the_last_json_line() {
        let out = "note: something\n{\"snapshot\":3,\"files\":2,\"bytes\":10,\"new_objects\":1,\"sent_bytes\":77,\"packs\":1}\n";
        let s = SnapshotSummary::parse(out).unwrap();
        assert_eq!(s.sent_bytes, 77);
        assert_eq!(s.files, 2);
        let pretty = "{\n  \"sent_bytes\": 5\n}\n";
        assert_eq!(SnapshotSummary::parse(pretty).unwrap().sent_bytes, 5);
        assert!(SnapshotSummary::parse("{}").is_err());
        assert!(SnapshotSummary::parse("").is_err());
    }
}
