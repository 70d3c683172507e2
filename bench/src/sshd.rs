//! A private sshd on 127.0.0.1 for the tools compared with ours: its own
//! configuration, host key and client key under the work folder, a free
//! high port; started and stopped by the driver.

use std::fs::{self, File};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::measure::{self, Cmd};
use crate::ours::free_port;

/// `program` on the PATH, in the system folders, or where `cargo install`
/// puts it, if there.
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let cargo_bin = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|c| c.join("bin"));
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .chain(cargo_bin)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// The private sshd.
pub struct Sshd {
    child: Child,
    pub port: u16,
    dir: PathBuf,
    user: String,
}

impl Sshd {
    /// Makes host and client keys under `dir` and starts sshd on
    /// 127.0.0.1 only.
    ///
    /// # Errors
    /// When sshd or ssh-keygen is missing, or sshd does not accept within
    /// 20 s.
    pub fn start(dir: &Path) -> Result<Self> {
        let sshd = which("sshd").context("sshd not installed (Debian: openssh-server)")?;
        let keygen = which("ssh-keygen").context("ssh-keygen not installed")?;
        which("ssh").context("ssh not installed")?;
        fs::create_dir_all(dir)?;
        let log = dir.join("sshd.log");
        for key in ["host_key", "client_key"] {
            measure::run_plain(
                &Cmd::new(&keygen)
                    .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                    .arg(dir.join(key)),
                &log,
            )?;
        }
        fs::copy(dir.join("client_key.pub"), dir.join("authorized_keys"))?;
        // Privilege separation wants this directory to exist.
        let _ = fs::create_dir_all("/run/sshd");
        let port = free_port()?;
        let config = format!(
            "Port {port}\n\
             ListenAddress 127.0.0.1\n\
             HostKey {dir}/host_key\n\
             AuthorizedKeysFile {dir}/authorized_keys\n\
             PidFile {dir}/sshd.pid\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             PubkeyAuthentication yes\n\
             PermitRootLogin prohibit-password\n\
             UsePAM no\n\
             StrictModes no\n\
             Subsystem sftp internal-sftp\n\
             LogLevel ERROR\n",
            dir = dir.display()
        );
        fs::write(dir.join("sshd_config"), config)?;
        let out = File::create(&log)?;
        let err = out.try_clone()?;
        let child = Command::new(&sshd)
            .args(["-D", "-e", "-f"])
            .arg(dir.join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .context("starting sshd")?;
        let user = current_user();
        let mut sshd = Self {
            child,
            port,
            dir: dir.to_owned(),
            user,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = sshd.child.try_wait()? {
                bail!("sshd exited ({status}):\n{}", measure::tail(&log, 1500));
            }
            if Instant::now() > deadline {
                bail!("sshd did not accept connections within 20 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // One login proves the set-up before anything is timed.
        measure::run_plain(&sshd.ssh_cmd().arg("true"), &log)
            .context("logging in to the private sshd")?;
        Ok(sshd)
    }

    /// The ssh options shared by every tool.
    pub fn options(&self) -> Vec<String> {
        vec![
            "-i".into(),
            self.dir.join("client_key").display().to_string(),
            "-o".into(),
            "IdentitiesOnly=yes".into(),
            "-o".into(),
            "BatchMode=yes".into(),
            "-o".into(),
            "StrictHostKeyChecking=no".into(),
            "-o".into(),
            format!(
                "UserKnownHostsFile={}",
                self.dir.join("known_hosts").display()
            ),
            "-o".into(),
            "LogLevel=ERROR".into(),
        ]
    }

    /// `ssh -p PORT OPTIONS user@127.0.0.1`
    fn ssh_cmd(&self) -> Cmd {
        Cmd::new("ssh")
            .arg("-p")
            .arg(self.port.to_string())
            .args(self.options())
            .arg(self.login())
    }

    /// The ssh command line to `port` (the sshd's, or a relay's in front
    /// of it) as one string, for rsync -e and BORG_RSH.
    pub fn ssh_line(&self, port: u16) -> String {
        format!("ssh -p {port} {}", self.options().join(" "))
    }

    pub fn login(&self) -> String {
        format!("{}@127.0.0.1", self.user)
    }

    /// Stops sshd.
    pub fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn current_user() -> String {
    std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .or_else(|| {
            Command::new("id")
                .arg("-un")
                .output()
                .ok()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        })
        .unwrap_or_else(|| "root".into())
}
