//! What users would use instead: scp and rsync over ssh, borg over ssh,
//! restic over sftp and bupstash over ssh, all through the private sshd
//! (`crate::sshd`), and rustic on a local repository: how each makes its
//! repository, backs up and restores.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::measure::{self, Cmd};
use crate::sshd::{which, Sshd};

/// A tool compared with ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Tool {
    Scp,
    Rsync,
    Borg,
    Restic,
    Bupstash,
    Rustic,
}

impl Tool {
    /// The tools run unless `--tools` says otherwise (bupstash and rustic
    /// are opt-in: `--with-bupstash`, `--with-rustic`).
    pub const DEFAULT: [Tool; 4] = [Tool::Scp, Tool::Rsync, Tool::Borg, Tool::Restic];

    pub fn name(self) -> &'static str {
        match self {
            Self::Scp => "scp",
            Self::Rsync => "rsync",
            Self::Borg => "borg",
            Self::Restic => "restic",
            Self::Bupstash => "bupstash",
            Self::Rustic => "rustic",
        }
    }

    /// Whether a second backup is incremental (scp copies everything
    /// again: it has no re-run or change row).
    pub fn incremental(self) -> bool {
        self != Self::Scp
    }

    /// Whether it reaches its repository over the sshd (and so through
    /// the counting relay).
    pub fn over_ssh(self) -> bool {
        self != Self::Rustic
    }

    /// Where to find it, and how to get it when it is missing.
    fn locate(self) -> Result<PathBuf> {
        let hint = match self {
            Self::Bupstash => " (`bash bench/run --with-bupstash` installs it)",
            Self::Rustic => " (`bash bench/run --with-rustic` installs it)",
            _ => "",
        };
        which(self.name()).with_context(|| format!("{} not installed{hint}", self.name()))
    }
}

/// One tool, set up against the sshd: where its remote copy or repository
/// lives, and how to back up and restore with it.
pub struct Remote<'a> {
    pub tool: Tool,
    program: PathBuf,
    sshd: &'a Sshd,
    /// The port tools connect to: the sshd's, or a counting relay's in
    /// front of it.
    pub port: u16,
    /// The remote folder (scp, rsync) or repository (the others).
    target: PathBuf,
    /// Caches and configuration of the tool.
    home: PathBuf,
    /// borg, bupstash: the name of the latest backup of each data set
    /// (borg refuses an existing archive name, `bupstash get` one that
    /// matches several items).
    /// Backups made of each data set so far.
    latest: RefCell<BTreeMap<String, u32>>,
}

const PASSWORD: &str = "backup-bench";

impl<'a> Remote<'a> {
    /// Prepares `tool` in `dir` (its remote folder or repository).
    ///
    /// # Errors
    /// When the tool is missing or its repository cannot be made.
    pub fn prepare(tool: Tool, sshd: &'a Sshd, dir: &Path, log: &Path) -> Result<Self> {
        let program = tool.locate()?;
        fs::create_dir_all(dir)?;
        let remote = Self {
            tool,
            program,
            sshd,
            port: sshd.port,
            target: dir.join("remote"),
            home: dir.join("home"),
            latest: RefCell::default(),
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
            Tool::Bupstash => {
                measure::run_plain(
                    &Cmd::new(&remote.program)
                        .args(["new-key", "-o"])
                        .arg(remote.home.join("bupstash.key")),
                    log,
                )?;
                measure::run_plain(&remote.bupstash().arg("init"), log)?;
            }
            Tool::Rustic => measure::run_plain(&remote.rustic().arg("init"), log)?,
        }
        Ok(remote)
    }

    fn borg_repo(&self) -> String {
        format!(
            "ssh://{}:{}{}",
            self.sshd.login(),
            self.port,
            self.target.display()
        )
    }

    fn borg(&self) -> Cmd {
        Cmd::new(&self.program)
            .env("BORG_RSH", self.sshd.ssh_line(self.port))
            .env("BORG_PASSPHRASE", PASSWORD)
            .env("BORG_BASE_DIR", &self.home)
            .env("BORG_RELOCATED_REPO_ACCESS_IS_OK", "yes")
            .env("BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK", "yes")
    }

    fn restic(&self) -> Cmd {
        let sftp = format!(
            "sftp.command={} {} -s sftp",
            self.sshd.ssh_line(self.port),
            self.sshd.login()
        );
        Cmd::new(&self.program)
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

    /// bupstash over ssh: `bupstash serve` runs on the far side (the same
    /// binary, by its full path: a non-interactive ssh login does not see
    /// cargo's folder), its send log and stat cache under the tool's home.
    fn bupstash(&self) -> Cmd {
        let serve = format!(
            "{} {} {} serve {}",
            self.sshd.ssh_line(self.port),
            self.sshd.login(),
            self.program.display(),
            self.target.display()
        );
        Cmd::new(&self.program)
            .env("BUPSTASH_REPOSITORY_COMMAND", serve)
            .env("BUPSTASH_KEY", self.home.join("bupstash.key"))
            .env("HOME", &self.home)
            .env("XDG_CACHE_HOME", self.home.join("cache"))
    }

    /// rustic on a local repository (no sshd: it has no sftp backend of
    /// its own), configuration and cache under the tool's home.
    fn rustic(&self) -> Cmd {
        Cmd::new(&self.program)
            .env("RUSTIC_PASSWORD", PASSWORD)
            .env("HOME", &self.home)
            .env("XDG_CONFIG_HOME", self.home.join("config"))
            .env("XDG_CACHE_HOME", self.home.join("cache"))
            .args(["--no-progress", "-r"])
            .arg(&self.target)
    }

    /// A new name for a backup of the data set `tag`, remembered as its
    /// latest.
    fn next_name(&self, tag: &str) -> String {
        let mut made = self.latest.borrow_mut();
        let n = made.entry(tag.to_owned()).or_insert(0);
        *n += 1;
        format!("{tag}-{n}")
    }

    fn latest_name(&self, tag: &str) -> String {
        let n = self.latest.borrow().get(tag).copied().unwrap_or(0);
        format!("{tag}-{n}")
    }

    /// bupstash keeps a single file as its bytes (`get` writes them out)
    /// and a folder as a listing (`restore --into` puts its content into
    /// an existing folder).
    fn bupstash_restore(&self, src: &Path, dest: &Path, tag: &str) -> Cmd {
        let query = format!("bench={}", self.latest_name(tag));
        let into = dest.join(src.file_name().unwrap_or_default());
        if src.is_dir() {
            // Made here: the command is run right after.
            let _ = fs::create_dir_all(&into);
            self.bupstash()
                .args(["restore", "--into"])
                .arg(into)
                .arg(query)
        } else {
            self.bupstash().arg("get").arg(query).stdout_to(&into)
        }
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

    /// The command that backs up `src` (a file or a folder); run again, an
    /// incremental backup for the tools that have one.
    pub fn backup(&self, src: &Path) -> Cmd {
        let tag = tag_of(src);
        let port = self.port.to_string();
        match self.tool {
            Tool::Scp => Cmd::new(&self.program)
                .args(["-q", "-r", "-P", &port])
                .args(self.sshd.options())
                .arg(src)
                .arg(format!("{}:{}/", self.sshd.login(), self.target.display())),
            Tool::Rsync => Cmd::new(&self.program)
                .args(["-a", "-e", &self.sshd.ssh_line(self.port)])
                .arg(src)
                .arg(format!("{}:{}/", self.sshd.login(), self.target.display())),
            Tool::Borg => self
                .borg()
                .arg("create")
                .arg(format!("{}::{}", self.borg_repo(), self.next_name(&tag)))
                .arg(src),
            Tool::Restic => self.restic().args(["backup", "--tag", &tag]).arg(src),
            // A send log per data set: bupstash's stat cache and record of
            // what the repository holds, which its incremental puts need.
            Tool::Bupstash => self
                .bupstash()
                .args(["put", "--quiet", "--send-log"])
                .arg(self.home.join(format!("sendlog-{tag}")))
                .arg(format!("bench={}", self.next_name(&tag)))
                .arg("::")
                .arg(src),
            Tool::Rustic => self.rustic().args(["backup", "--tag", &tag]).arg(src),
        }
    }

    /// The command that restores the latest backup of `src` into `dest`.
    pub fn restore(&self, src: &Path, dest: &Path) -> Cmd {
        let tag = tag_of(src);
        match self.tool {
            Tool::Scp => Cmd::new(&self.program)
                .args(["-q", "-r", "-P", &self.port.to_string()])
                .args(self.sshd.options())
                .arg(self.remote_path(src))
                .arg(dest),
            Tool::Rsync => Cmd::new(&self.program)
                .args(["-a", "-e", &self.sshd.ssh_line(self.port)])
                .arg(self.remote_path(src))
                .arg(with_slash(dest)),
            Tool::Borg => self
                .borg()
                .arg("extract")
                .arg(format!("{}::{}", self.borg_repo(), self.latest_name(&tag)))
                .cwd(dest),
            Tool::Restic => self
                .restic()
                .args(["restore", "latest", "--tag", &tag, "--target"])
                .arg(dest),
            Tool::Bupstash => self.bupstash_restore(src, dest, &tag),
            Tool::Rustic => self
                .rustic()
                .args(["restore", "--filter-tags", &tag, "latest"])
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
