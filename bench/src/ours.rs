//! Our server and client: start a server, register clients, and measure
//! backups and restores.

use std::fs::{self, File};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
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
        let wiring = mode.wiring(caps, free_port()?, free_port()?)?;
        fs::create_dir_all(data_dir)?;
        let out = File::create(log)?;
        let err = out.try_clone()?;
        let child = Command::new(&bins.server)
            .args(&wiring.server_args)
            .arg("--data-dir")
            .arg(data_dir)
            .env("RUST_LOG", "info")
            .current_dir(data_dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {}", bins.server.display()))?;
        let mut server = Self { child, wiring };
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

    pub fn pid(&self) -> u32 {
        self.child.id()
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
}

impl Client {
    /// Registers `name` with `server`, keeping the identity in `dir`.
    ///
    /// # Errors
    /// When registration fails.
    pub fn register(bins: &Bins, server: &Server, dir: &Path, name: &str) -> Result<Self> {
        fs::create_dir_all(dir)?;
        let mut global = vec![
            "--config-dir".to_owned(),
            dir.display().to_string(),
            "--server".to_owned(),
            server.wiring.client_addr.to_string(),
            "--quiet".to_owned(),
        ];
        global.extend(server.wiring.client_args.iter().cloned());
        let client = Self {
            bin: bins.client.clone(),
            dir: dir.to_owned(),
            global,
        };
        measure::run_plain(
            &client.cmd().args(["register", "--name", name]),
            &client.log(),
        )?;
        Ok(client)
    }

    fn cmd(&self) -> Cmd {
        Cmd::new(&self.bin).args(&self.global)
    }

    pub fn log(&self) -> PathBuf {
        self.dir.join("client.log")
    }

    /// `backup PATHS...`
    pub fn backup_cmd(&self, paths: &[&Path]) -> Cmd {
        self.cmd()
            .arg("backup")
            .args(paths.iter().map(|p| p.as_os_str()))
    }

    /// `restore NAME --to DEST`
    pub fn restore_cmd(&self, name: &str, dest: &Path) -> Cmd {
        self.cmd()
            .args(["restore", name, "--to"])
            .arg(dest)
            .arg("--overwrite")
    }

    /// `restore --all --to DEST`
    pub fn restore_all_cmd(&self, dest: &Path) -> Cmd {
        self.cmd()
            .args(["restore", "--all", "--to"])
            .arg(dest)
            .arg("--overwrite")
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
