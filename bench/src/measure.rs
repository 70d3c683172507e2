//! Running commands and measuring what they cost: wall time, CPU seconds
//! (user + system) and peak resident memory.
//!
//! A short-lived command runs under this same binary in its hidden
//! `__rusage` role: that process starts the command, waits for it, and asks
//! the kernel for the resource usage of its (only) child, as `wait4` would
//! give it. A long-lived server is measured from `/proc/PID`: CPU ticks
//! before and after, and `VmHWM` (the peak RSS), which is reset between
//! phases by writing `5` to `/proc/PID/clear_refs`.

use std::ffi::OsString;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The hidden first argument that makes this binary the measuring wrapper.
pub const RUSAGE_ROLE: &str = "__rusage";

/// A command to run: program, arguments, environment, working directory.
#[derive(Debug, Clone)]
pub struct Cmd {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub env: Vec<(String, OsString)>,
    pub cwd: Option<PathBuf>,
    /// Where standard output goes instead of the log (a JSON summary).
    pub stdout: Option<PathBuf>,
}

impl Cmd {
    pub fn new(program: impl Into<PathBuf>) -> Self {
        Self {
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
            cwd: None,
            stdout: None,
        }
    }

    pub fn arg(mut self, a: impl Into<OsString>) -> Self {
        self.args.push(a.into());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn env(mut self, key: &str, value: impl Into<OsString>) -> Self {
        self.env.push((key.to_owned(), value.into()));
        self
    }

    pub fn cwd(mut self, dir: &Path) -> Self {
        self.cwd = Some(dir.to_owned());
        self
    }

    /// Standard output to `path` (created or truncated) instead of the log.
    pub fn stdout_to(mut self, path: &Path) -> Self {
        self.stdout = Some(path.to_owned());
        self
    }

    /// Where standard output goes: `path` when set, else `log`.
    fn out_file(&self, log: &File) -> Result<File> {
        match &self.stdout {
            Some(p) => File::create(p).with_context(|| format!("creating {}", p.display())),
            None => Ok(log.try_clone()?),
        }
    }

    /// The command line, for logs and error messages.
    pub fn display(&self) -> String {
        let mut s = self.program.display().to_string();
        for a in &self.args {
            s.push(' ');
            s.push_str(&a.to_string_lossy());
        }
        s
    }
}

/// What one command cost.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cost {
    pub wall: Duration,
    /// User + system CPU seconds of the command and every descendant it
    /// waited for.
    pub cpu_s: f64,
    /// Peak resident set of the largest of them, in KiB.
    pub rss_kib: u64,
}

/// A measured command in flight.
pub struct Running {
    child: Child,
    started: Instant,
    usage: PathBuf,
    log: PathBuf,
    what: String,
}

/// Starts `cmd` under the measuring wrapper, its output appended to `log`.
///
/// # Errors
/// When the wrapper cannot be started.
pub fn spawn(cmd: &Cmd, log: &Path) -> Result<Running> {
    let me = std::env::current_exe().context("locating this executable")?;
    let usage = log.with_extension(format!("rusage-{}", rand::random::<u64>()));
    let out = File::options()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let err = out.try_clone()?;
    let out = cmd.out_file(&out)?;
    let mut command = Command::new(me);
    command
        .arg(RUSAGE_ROLE)
        .arg(&usage)
        .arg(&cmd.program)
        .args(&cmd.args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    for (k, v) in &cmd.env {
        command.env(k, v);
    }
    if let Some(dir) = &cmd.cwd {
        command.current_dir(dir);
    }
    let started = Instant::now();
    let child = command
        .spawn()
        .with_context(|| format!("starting {}", cmd.display()))?;
    Ok(Running {
        child,
        started,
        usage,
        log: log.to_owned(),
        what: cmd.display(),
    })
}

impl Running {
    /// Waits for the command; fails unless it exited with status 0.
    ///
    /// # Errors
    /// A non-zero exit (with the end of its log), or no usage report.
    pub fn wait(mut self) -> Result<Cost> {
        let status = self.child.wait()?;
        let wall = self.started.elapsed();
        if !status.success() {
            bail!(
                "{} failed ({status}); end of {}:\n{}",
                self.what,
                self.log.display(),
                tail(&self.log, 1500)
            );
        }
        let text = fs::read_to_string(&self.usage)
            .with_context(|| format!("reading the usage report of {}", self.what))?;
        let _ = fs::remove_file(&self.usage);
        let mut parts = text.split_whitespace();
        let cpu_s = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0.0);
        let rss_kib = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        Ok(Cost {
            wall,
            cpu_s,
            rss_kib,
        })
    }
}

/// Runs `cmd` to completion and measures it.
///
/// # Errors
/// As [`spawn`] and [`Running::wait`].
pub fn run(cmd: &Cmd, log: &Path) -> Result<Cost> {
    spawn(cmd, log)?.wait()
}

/// Runs `cmd` without measuring (set-up steps); fails unless it succeeds.
///
/// # Errors
/// When it cannot start or exits non-zero.
pub fn run_plain(cmd: &Cmd, log: &Path) -> Result<()> {
    let out = File::options().create(true).append(true).open(log)?;
    let err = out.try_clone()?;
    let out = cmd.out_file(&out)?;
    let mut command = Command::new(&cmd.program);
    command
        .args(&cmd.args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    for (k, v) in &cmd.env {
        command.env(k, v);
    }
    if let Some(dir) = &cmd.cwd {
        command.current_dir(dir);
    }
    let status = command
        .status()
        .with_context(|| format!("starting {}", cmd.display()))?;
    if !status.success() {
        bail!(
            "{} failed ({status}); end of {}:\n{}",
            cmd.display(),
            log.display(),
            tail(log, 1500)
        );
    }
    Ok(())
}

/// The last `max` bytes of a log, as text.
pub fn tail(path: &Path, max: usize) -> String {
    let bytes = fs::read(path).unwrap_or_default();
    let start = bytes.len().saturating_sub(max);
    String::from_utf8_lossy(bytes.get(start..).unwrap_or_default()).into_owned()
}

/// The `__rusage OUT PROGRAM ARGS...` role: runs the program, writes
/// "CPU_SECONDS PEAK_RSS_KIB" to OUT, and exits with the program's status.
pub fn rusage_role(args: &[OsString]) -> i32 {
    let [out, program, rest @ ..] = args else {
        eprintln!("usage: backup-bench {RUSAGE_ROLE} OUT PROGRAM [ARGS...]");
        return 2;
    };
    let status = match Command::new(program).args(rest).status() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cannot start {}: {e}", program.to_string_lossy());
            return 127;
        }
    };
    match nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN) {
        Ok(u) => {
            let secs = |t: nix::sys::time::TimeVal| {
                t.tv_sec() as f64 + f64::from(i32::try_from(t.tv_usec()).unwrap_or(0)) / 1e6
            };
            let cpu = secs(u.user_time()) + secs(u.system_time());
            // Linux reports ru_maxrss in KiB.
            if let Err(e) = fs::write(out, format!("{cpu:.3} {}\n", u.max_rss())) {
                eprintln!("cannot write {}: {e}", out.to_string_lossy());
                return 1;
            }
        }
        Err(e) => {
            eprintln!("getrusage: {e}");
            return 1;
        }
    }
    exit_code(status)
}

fn exit_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1)
}

/// CPU seconds and peak RSS of a running process, read from `/proc`.
#[derive(Debug, Clone, Copy)]
pub struct ProcSample {
    pub cpu_s: f64,
    pub peak_rss_kib: u64,
}

/// Clock ticks per second, for `/proc/PID/stat`.
fn ticks_per_second() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100.0, |t| t as f64)
}

/// Samples process `pid`.
///
/// # Errors
/// When `/proc/PID` cannot be read (the process is gone).
pub fn sample(pid: u32) -> Result<ProcSample> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at ")".
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("malformed /proc/PID/stat")?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat; "state" (field 3) is
    // the first after the name.
    let tick = |i: usize| -> f64 {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0) as f64
    };
    let cpu_s = (tick(11) + tick(12)) / ticks_per_second();
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let peak_rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    Ok(ProcSample {
        cpu_s,
        peak_rss_kib,
    })
}

/// Resets the peak RSS of `pid` to its current RSS. Returns false when the
/// kernel refused (the peak then covers the process's whole life).
pub fn reset_peak(pid: u32) -> bool {
    fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

/// The `p`-th percentile (0..=100) of `values`, nearest rank.
pub fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v.get(rank.clamp(1, v.len()) - 1).copied().unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_is_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&[3.0, 1.0, 2.0], 50.0), 2.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }

    #[test]
    fn samples_this_process() {
        let s = sample(std::process::id()).unwrap();
        assert!(s.peak_rss_kib > 0);
    }
}
