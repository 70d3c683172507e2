//! What users would use instead: scp and rsync over ssh, borg over ssh and
//! restic over sftp, all through a private sshd on 127.0.0.1 that this
//! module starts (own configuration and host key, a high port) and stops.

use std::ffi::OsString;
use std::fs::{self, File};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::measure::{self, Cmd};
use crate::ours::free_port;

/// A tool compared with ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Tool {
    Scp,
    Rsync,
    Borg,
    Restic,
}

impl Tool {
    pub const ALL: [Tool; 4] = [Tool::Scp, Tool::Rsync, Tool::Borg, Tool::Restic];

    pub fn name(self) -> &'static str {
        match self {
            Self::Scp => "scp",
            Self::Rsync => "rsync",
            Self::Borg => "borg",
            Self::Restic => "restic",
        }
    }

    fn program(self) -> &'static str {
        self.name()
    }
}

/// `program` on the PATH, if there.
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// The private sshd.
pub struct Sshd {
    child: Child,
    port: u16,
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
    fn options(&self) -> Vec<String> {
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

    /// The ssh command line as one string, for rsync -e and BORG_RSH.
    fn ssh_line(&self) -> String {
        format!("ssh -p {} {}", self.port, self.options().join(" "))
    }

    fn login(&self) -> String {
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

/// One tool, set up against the sshd: where its remote copy or repository
/// lives, and how to back up and restore with it.
pub struct Remote<'a> {
    pub tool: Tool,
    sshd: &'a Sshd,
    /// The remote folder (scp, rsync) or repository (borg, restic).
    target: PathBuf,
    /// Caches and configuration of the tool.
    home: PathBuf,
}

const PASSWORD: &str = "backup-bench";

impl<'a> Remote<'a> {
    /// Prepares `tool` in `dir` (its remote folder or repository).
    ///
    /// # Errors
    /// When the tool is missing or its repository cannot be made.
    pub fn prepare(tool: Tool, sshd: &'a Sshd, dir: &Path, log: &Path) -> Result<Self> {
        which(tool.program()).with_context(|| format!("{} not installed", tool.name()))?;
        fs::create_dir_all(dir)?;
        let remote = Self {
            tool,
            sshd,
            target: dir.join("remote"),
            home: dir.join("home"),
        };
        fs::create_dir_all(&remote.home)?;
        match tool {
            Tool::Scp | Tool::Rsync => fs::create_dir_all(&remote.target)?,
            Tool::Borg => measure::run_plain(
                &remote
                    .borg()
                    .args(["init", "--encryption=repokey"])
                    .arg(remote.borg_repo()),
                log,
            )?,
            Tool::Restic => measure::run_plain(&remote.restic().arg("init"), log)?,
        }
        Ok(remote)
    }

    fn borg_repo(&self) -> String {
        format!(
            "ssh://{}:{}{}",
            self.sshd.login(),
            self.sshd.port,
            self.target.display()
        )
    }

    fn borg(&self) -> Cmd {
        Cmd::new("borg")
            .env("BORG_RSH", self.sshd.ssh_line())
            .env("BORG_PASSPHRASE", PASSWORD)
            .env("BORG_BASE_DIR", &self.home)
            .env("BORG_RELOCATED_REPO_ACCESS_IS_OK", "yes")
            .env("BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK", "yes")
    }

    fn restic(&self) -> Cmd {
        let sftp = format!(
            "sftp.command={} {} -s sftp",
            self.sshd.ssh_line(),
            self.sshd.login()
        );
        Cmd::new("restic")
            .env("RESTIC_PASSWORD", PASSWORD)
            .env("RESTIC_CACHE_DIR", self.home.join("cache"))
            .env("HOME", &self.home)
            .args(["--quiet", "-r"])
            .arg(format!(
                "sftp:{}:{}",
                self.sshd.login(),
                self.target.display()
            ))
            .args(["-o", &sftp])
    }

    fn remote_path(&self, src: &Path) -> String {
        let name = src.file_name().map(|n| n.to_string_lossy().into_owned());
        format!(
            "{}:{}/{}",
            self.sshd.login(),
            self.target.display(),
            name.unwrap_or_default()
        )
    }

    /// The command that backs up `src` (a file or a folder).
    pub fn backup(&self, src: &Path) -> Cmd {
        let tag = tag_of(src);
        match self.tool {
            Tool::Scp => Cmd::new("scp")
                .args(["-q", "-r", "-P", &self.sshd.port.to_string()])
                .args(self.sshd.options())
                .arg(src)
                .arg(format!("{}:{}/", self.sshd.login(), self.target.display())),
            Tool::Rsync => Cmd::new("rsync")
                .args(["-a", "-e", &self.sshd.ssh_line()])
                .arg(src)
                .arg(format!("{}:{}/", self.sshd.login(), self.target.display())),
            Tool::Borg => self
                .borg()
                .arg("create")
                .arg(format!("{}::{tag}", self.borg_repo()))
                .arg(src),
            Tool::Restic => self.restic().args(["backup", "--tag", &tag]).arg(src),
        }
    }

    /// The command that restores `src` (as backed up) into `dest`, and
    /// whether it must run with `dest` as the working directory.
    pub fn restore(&self, src: &Path, dest: &Path) -> Cmd {
        let tag = tag_of(src);
        match self.tool {
            Tool::Scp => Cmd::new("scp")
                .args(["-q", "-r", "-P", &self.sshd.port.to_string()])
                .args(self.sshd.options())
                .arg(self.remote_path(src))
                .arg(dest),
            Tool::Rsync => Cmd::new("rsync")
                .args(["-a", "-e", &self.sshd.ssh_line()])
                .arg(self.remote_path(src))
                .arg(with_slash(dest)),
            Tool::Borg => self
                .borg()
                .arg("extract")
                .arg(format!("{}::{tag}", self.borg_repo()))
                .cwd(dest),
            Tool::Restic => self
                .restic()
                .args(["restore", "latest", "--tag", &tag, "--target"])
                .arg(dest),
        }
    }
}

fn tag_of(src: &Path) -> String {
    src.file_name()
        .map(|n| n.to_string_lossy().replace(['.', ' '], "-"))
        .unwrap_or_else(|| "data".into())
}

fn with_slash(p: &Path) -> OsString {
    let mut s = p.as_os_str().to_owned();
    s.push("/");
    s
}
