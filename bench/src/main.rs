//! Over 600 lines: the scenarios (large, small, concurrent) run one after the other in one `run`, in the order their rows are printed.
//! `backup-bench`: end-to-end figures for `backup-server` and
//! `backup-client` on one machine over 127.0.0.1, in one run with the
//! physical limits (one AES-256-CBC stream, the data directory's disk) and
//! with what users would use instead (scp, rsync, borg, restic over a
//! private sshd). See `bench/README.md`.

mod compare;
mod data;
mod limits;
mod measure;
mod mode;
mod ours;
mod report;

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use anyhow::{bail, Context, Result};
use clap::Parser;

use crate::compare::{Remote, Sshd, Tool};
use crate::data::Expected;
use crate::measure::{Cost, Running};
use crate::mode::{Capabilities, Mode, ModeArg};
use crate::ours::{Bins, Client, Server, ServerCost};
use crate::report::{Machine, Report, Row, MIB};

/// The largest file the legacy protocol carries: its size and its padded
/// ciphertext size are both 32-bit.
const LEGACY_MAX_FILE: u64 = u32::MAX as u64 - 16;

/// Scenarios that can be left out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Scenario {
    Large,
    Small,
    Concurrent,
}

/// Command line.
#[derive(Debug, Parser)]
#[command(
    name = "backup-bench",
    about = "End-to-end benchmark of backup-server and backup-client, side by side with \
             the physical limits and with scp, rsync, borg and restic"
)]
struct Cli {
    /// Transport to measure ours with
    #[arg(long, value_enum, default_value = "legacy")]
    mode: ModeArg,
    /// Size of the large file in GiB (with the legacy mode, at most the
    /// largest file the legacy protocol carries, 4 GiB less 17 bytes;
    /// `--mode secure` takes larger ones)
    #[arg(long, default_value_t = 1, value_name = "GIB")]
    large_gib: u64,
    /// A small smoke run: 64 MiB, 500 small files, 10 clients of 1 MiB
    #[arg(long)]
    quick: bool,
    /// Scenarios to leave out
    #[arg(long, value_enum, value_delimiter = ',')]
    skip: Vec<Scenario>,
    /// Tools to compare with [default: all that are installed]
    #[arg(long, value_enum, value_delimiter = ',')]
    tools: Option<Vec<Tool>>,
    /// Compare with no other tool
    #[arg(long, conflicts_with = "tools")]
    no_compare: bool,
    /// Concurrent clients
    #[arg(long, value_name = "N")]
    clients: Option<u64>,
    /// Also back up the small files with this many client processes at
    /// once, each given a share of the folders (0: not)
    #[arg(long, default_value_t = 4, value_name = "N")]
    small_procs: u64,
    /// Folder holding release builds of backup-server and backup-client
    /// [default: this executable's folder]
    #[arg(long, value_name = "DIR")]
    bin_dir: Option<PathBuf>,
    /// Where data, servers and repositories live (on the disk to measure)
    /// [default: the system's temporary folder]
    #[arg(long, value_name = "DIR")]
    work_dir: Option<PathBuf>,
    /// Keep the work folder (data, logs) afterwards
    #[arg(long)]
    keep: bool,
    /// Also write the results as JSON to this file
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
    /// Also write the results as CSV to this file
    #[arg(long, value_name = "PATH")]
    csv: Option<PathBuf>,
}

/// Sizes of one run.
#[derive(Debug, Clone, Copy)]
struct Plan {
    large: u64,
    small_files: u64,
    small_folders: u64,
    small_size: usize,
    clients: u64,
    client_bytes: u64,
}

impl Plan {
    fn of(cli: &Cli) -> Self {
        let base = if cli.quick {
            Self {
                large: 64 << 20,
                small_files: 500,
                small_folders: 10,
                small_size: 4096,
                clients: 10,
                client_bytes: 1 << 20,
            }
        } else {
            Self {
                // Only the legacy fields stop at 4 GiB; secure mode alone
                // takes any size.
                large: (cli.large_gib.max(1) << 30).min(if cli.mode == ModeArg::Secure {
                    u64::MAX
                } else {
                    LEGACY_MAX_FILE
                }),
                small_files: 10_000,
                small_folders: 100,
                small_size: 4096,
                clients: 100,
                client_bytes: 8 << 20,
            }
        };
        Self {
            clients: cli.clients.unwrap_or(base.clients),
            ..base
        }
    }
}

fn main() {
    let args: Vec<OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == measure::RUSAGE_ROLE) {
        std::process::exit(measure::rusage_role(args.get(2..).unwrap_or_default()));
    }
    let cli = Cli::parse();
    if let Err(e) = run(&cli) {
        eprintln!("backup-bench: {e:#}");
        std::process::exit(1);
    }
}

fn say(msg: &str) {
    eprintln!("==> {msg}");
}

/// Everything the scenarios share.
struct Bench {
    plan: Plan,
    bins: Bins,
    caps: Capabilities,
    work: PathBuf,
    logs: PathBuf,
    rows: Vec<Row>,
    skipped: Vec<String>,
}

fn run(cli: &Cli) -> Result<()> {
    let plan = Plan::of(cli);
    let bin_dir = match &cli.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("no folder for this executable")?
            .to_owned(),
    };
    let bins = Bins::in_dir(&bin_dir)?;
    let caps = Capabilities::probe(&bins.server, &bins.client);
    let base = cli.work_dir.clone().unwrap_or_else(std::env::temp_dir);
    let work = base.join(format!("backup-bench-{}", std::process::id()));
    fs::create_dir_all(&work)?;
    let work = work.canonicalize()?;
    let logs = work.join("logs");
    fs::create_dir_all(&logs)?;
    say(&format!("work folder {}", work.display()));
    let load_before = load();
    let started = Instant::now();
    let mut bench = Bench {
        plan,
        bins,
        caps,
        work: work.clone(),
        logs,
        rows: Vec::new(),
        skipped: Vec::new(),
    };
    let result = bench.all(cli);
    let report = Report {
        date: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        machine: Machine {
            cpu_model: cpu_model(),
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_owned(),
            load_before,
            load_after: load(),
        },
        command: std::env::args().collect::<Vec<_>>().join(" "),
        rows: bench.rows,
        skipped: bench.skipped,
    };
    println!(
        "\n{} | {} × {} | load {} -> {} | {:.0} s\n",
        report.date,
        report.machine.cpus,
        report.machine.cpu_model,
        report.machine.load_before,
        report.machine.load_after,
        started.elapsed().as_secs_f64()
    );
    println!("{}", report.table());
    if let Some(p) = &cli.json {
        fs::write(p, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(p) = &cli.csv {
        fs::write(p, report.csv()).with_context(|| format!("writing {}", p.display()))?;
    }
    match result {
        Ok(()) if !cli.keep => {
            fs::remove_dir_all(&work)?;
            Ok(())
        }
        Ok(()) => {
            say(&format!("kept {}", work.display()));
            Ok(())
        }
        Err(e) => {
            say(&format!("logs kept in {}", work.join("logs").display()));
            Err(e)
        }
    }
}

fn load() -> String {
    fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn cpu_model() -> String {
    fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_owned())
        .unwrap_or_else(|| "unknown".into())
}

fn mib(kib: u64) -> f64 {
    kib as f64 * 1024.0 / MIB
}

fn with_costs(mut row: Row, client: Cost, server: Option<ServerCost>) -> Row {
    row.client_cpu_s = Some(client.cpu_s);
    row.client_rss_mib = Some(mib(client.rss_kib));
    if let Some(s) = server {
        row.server_cpu_s = Some(s.cpu_s);
        row.server_rss_mib = Some(mib(s.peak_rss_kib));
        if !s.peak_is_phase {
            row.note = "server peak RSS over its whole life".into();
        }
    }
    row
}

impl Bench {
    fn all(&mut self, cli: &Cli) -> Result<()> {
        let data = self.work.join("data");
        fs::create_dir_all(&data)?;
        let plan = self.plan;
        let large = data.join("large.bin");
        let small = data.join("small");
        let mut expected_large = None;
        let mut expected_small = None;
        if !cli.skip.contains(&Scenario::Large) {
            say(&format!("making {} random bytes", plan.large));
            expected_large = Some(data::random_file(&large, plan.large, 1)?);
            self.limits(&large)?;
        }
        if !cli.skip.contains(&Scenario::Small) {
            say(&format!(
                "making {} files of {} bytes in {} folders",
                plan.small_files, plan.small_size, plan.small_folders
            ));
            data::small_tree(
                &small,
                plan.small_files,
                plan.small_folders,
                plan.small_size,
                2,
            )?;
            expected_small = Some(data::digest_tree(&small)?);
        }
        for mode in cli.mode.modes() {
            let tool = format!("ours/{}", mode.name());
            let caps = self.caps;
            if let Err(e) = mode.wiring(caps, 0, 0) {
                self.skipped.push(format!("{tool}: {e}"));
                continue;
            }
            if let Some(sha) = expected_large {
                self.ours_one(mode, &tool, "large", &large, &Expected::File(sha))?;
            }
            if let Some(tree) = &expected_small {
                let expected = Expected::Tree(tree.clone());
                self.ours_one(mode, &tool, "small", &small, &expected)?;
                if cli.small_procs > 1 {
                    self.small_split(mode, &tool, &small, cli.small_procs)?;
                }
            }
            if !cli.skip.contains(&Scenario::Concurrent) {
                self.concurrent(mode, &tool)?;
            }
        }
        if cli.no_compare {
            return Ok(());
        }
        let tools = cli.tools.clone().unwrap_or_else(|| Tool::ALL.to_vec());
        let mut sets = Vec::new();
        if let Some(sha) = expected_large {
            sets.push(("large", large.clone(), Expected::File(sha)));
        }
        if let Some(tree) = expected_small {
            sets.push(("small", small.clone(), Expected::Tree(tree)));
        }
        self.compare(&tools, &sets)
    }

    /// The physical limits, on the large file's bytes.
    fn limits(&mut self, large: &Path) -> Result<()> {
        say("limit: AES-256-CBC, one stream, in memory");
        let (bytes, took) = limits::aes_cbc(large)?;
        let mut aes = Row::new(
            "limit",
            "AES-256-CBC 1 core",
            "encrypt in memory",
            bytes,
            1,
            took.as_secs_f64(),
        );
        aes.note = "one CBC stream: the ceiling of one legacy upload".into();
        say("limit: write to the data directory's disk, fsync at the end");
        let (bytes, took) = limits::disk_write(large, &self.work)?;
        let disk = Row::new(
            "limit",
            "disk",
            "write + fsync",
            bytes,
            1,
            took.as_secs_f64(),
        );
        self.rows.push(aes);
        self.rows.push(disk);
        Ok(())
    }

    fn lower_limit(&self) -> Option<f64> {
        self.rows
            .iter()
            .filter(|r| r.scenario == "limit")
            .map(|r| r.mb_s)
            .reduce(f64::min)
    }

    /// Backs up `src` with a fresh server and client, restores it, checks
    /// what came back.
    fn ours_one(
        &mut self,
        mode: Mode,
        tool: &str,
        scenario: &str,
        src: &Path,
        expected: &Expected,
    ) -> Result<()> {
        let dir = self.work.join(format!("ours-{}-{scenario}", mode.name()));
        let log = self
            .logs
            .join(format!("ours-{}-{scenario}.log", mode.name()));
        let server = Server::start(
            &self.bins,
            self.caps,
            mode,
            &dir.join("server"),
            &self
                .logs
                .join(format!("server-{}-{scenario}.log", mode.name())),
        )?;
        let client = Client::register(&self.bins, &server, &dir.join("client"), "bench")?;
        let (files, bytes) = size_of(src)?;
        say(&format!("{scenario}: backup ({tool})"));
        let (cost, srv) = ours::measured(&server, &client.backup_cmd(&[src]), &log)?;
        let mut backup = with_costs(
            Row::new(
                scenario,
                tool,
                "backup",
                bytes,
                files,
                cost.wall.as_secs_f64(),
            ),
            cost,
            Some(srv),
        );
        let restored = dir.join("restored");
        fs::create_dir_all(&restored)?;
        say(&format!("{scenario}: restore ({tool})"));
        let cmd = if src.is_dir() {
            client.restore_all_cmd(&restored.join(src.file_name().unwrap_or_default()))
        } else {
            client.restore_cmd(
                &src.file_name().unwrap_or_default().to_string_lossy(),
                &restored,
            )
        };
        let (cost, srv) = ours::measured(&server, &cmd, &log)?;
        let mut restore = with_costs(
            Row::new(
                scenario,
                tool,
                "restore",
                bytes,
                files,
                cost.wall.as_secs_f64(),
            ),
            cost,
            Some(srv),
        );
        server.stop();
        data::verify(&restored, src, expected)
            .with_context(|| format!("{tool} restored {scenario} wrongly"))?;
        if scenario == "large" {
            if let Some(limit) = self.lower_limit() {
                backup.of_limit = Some(backup.mb_s / limit);
                restore.of_limit = Some(restore.mb_s / limit);
            }
        }
        restore.note = join_note(&restore.note, "verified against the source");
        self.rows.push(backup);
        self.rows.push(restore);
        fs::remove_dir_all(&dir)?;
        Ok(())
    }

    /// The small files backed up by `procs` client processes at once (one
    /// identity, a share of the folders each): what backing up over several
    /// connections would give, the fsyncs of one connection overlapping
    /// those of the others.
    fn small_split(&mut self, mode: Mode, tool: &str, src: &Path, procs: u64) -> Result<()> {
        let dir = self.work.join(format!("ours-{}-small-split", mode.name()));
        let log = self
            .logs
            .join(format!("ours-{}-small-split.log", mode.name()));
        let server = Server::start(
            &self.bins,
            self.caps,
            mode,
            &dir.join("server"),
            &self
                .logs
                .join(format!("server-{}-small-split.log", mode.name())),
        )?;
        let client = Client::register(&self.bins, &server, &dir.join("client"), "bench")?;
        let mut folders: Vec<PathBuf> = fs::read_dir(src)?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()?;
        folders.sort();
        let share = folders
            .len()
            .div_ceil(usize::try_from(procs).unwrap_or(1).max(1));
        let (files, bytes) = size_of(src)?;
        say(&format!("small: backup by {procs} processes ({tool})"));
        let phase = server.phase()?;
        let started = Instant::now();
        let running: Vec<Running> = folders
            .chunks(share.max(1))
            .map(|part| {
                let paths: Vec<&Path> = part.iter().map(PathBuf::as_path).collect();
                measure::spawn(&client.backup_cmd(&paths), &log)
            })
            .collect::<Result<_>>()?;
        let costs = wait_all(running);
        let wall = started.elapsed().as_secs_f64();
        let srv = server.end(phase)?;
        server.stop();
        let costs: Vec<Cost> = costs.into_iter().collect::<Result<_>>()?;
        let mut row = Row::new(
            "small",
            &format!("{tool} {procs} procs"),
            "backup",
            bytes,
            files,
            wall,
        );
        row.client_cpu_s = Some(costs.iter().map(|c| c.cpu_s).sum());
        row.client_rss_mib = costs.iter().map(|c| mib(c.rss_kib)).reduce(f64::max);
        row.server_cpu_s = Some(srv.cpu_s);
        row.server_rss_mib = Some(mib(srv.peak_rss_kib));
        row.note = format!(
            "{procs} client processes, one identity, {share} folders each (names are relative to each folder); client CPU summed"
        );
        self.rows.push(row);
        fs::remove_dir_all(&dir)?;
        Ok(())
    }

    /// Many clients backing up at once; every file then restored and
    /// checked.
    fn concurrent(&mut self, mode: Mode, tool: &str) -> Result<()> {
        let plan = self.plan;
        let n = plan.clients;
        let dir = self.work.join(format!("ours-{}-concurrent", mode.name()));
        let files_dir = dir.join("files");
        fs::create_dir_all(&files_dir)?;
        say(&format!(
            "concurrent: making {n} files of {} bytes",
            plan.client_bytes
        ));
        let mut files = Vec::new();
        for i in 0..n {
            let p = files_dir.join(format!("c{i:03}.bin"));
            let sha = data::random_file(&p, plan.client_bytes, 1000 + i)?;
            files.push((p, sha));
        }
        let server = Server::start(
            &self.bins,
            self.caps,
            mode,
            &dir.join("server"),
            &self
                .logs
                .join(format!("server-{}-concurrent.log", mode.name())),
        )?;
        say(&format!("concurrent: registering {n} clients"));
        let clients: Vec<Client> = parallel(&(0..n).collect::<Vec<_>>(), 4, |&i| {
            Client::register(
                &self.bins,
                &server,
                &dir.join(format!("client{i:03}")),
                &format!("bench{i:03}"),
            )
        })?;
        say(&format!("concurrent: {n} clients back up at once"));
        let phase = server.phase()?;
        let started = Instant::now();
        let running: Vec<Running> = clients
            .iter()
            .zip(&files)
            .map(|(c, (p, _))| measure::spawn(&c.backup_cmd(&[p]), &c.log()))
            .collect::<Result<_>>()?;
        let costs = wait_all(running);
        let wall = started.elapsed().as_secs_f64();
        let srv = server.end(phase)?;
        let failed = costs.iter().filter(|c| c.is_err()).count();
        if let Some(Err(e)) = costs.iter().find(|c| c.is_err()) {
            bail!("{failed} of {n} concurrent backups failed; the first: {e:#}");
        }
        let costs: Vec<Cost> = costs.into_iter().filter_map(Result::ok).collect();
        say("concurrent: restoring and checking every file");
        let restored = dir.join("restored");
        let pairs: Vec<(&Client, &(PathBuf, data::Sha))> = clients.iter().zip(&files).collect();
        let verified = parallel(&pairs, 4, |(client, (path, sha))| {
            let name = path.file_name().unwrap_or_default();
            let to = restored.join(name);
            fs::create_dir_all(&to)?;
            measure::run_plain(
                &client.restore_cmd(&name.to_string_lossy(), &to),
                &client.log(),
            )?;
            data::verify(&to, path, &Expected::File(*sha))
        })?
        .len();
        server.stop();
        let times: Vec<f64> = costs.iter().map(|c| c.wall.as_secs_f64()).collect();
        let mut row = Row::new(
            "concurrent",
            tool,
            &format!("backup ×{n}"),
            plan.client_bytes * n,
            n,
            wall,
        );
        row.p50_s = Some(measure::percentile(&times, 50.0));
        row.p99_s = Some(measure::percentile(&times, 99.0));
        row.client_cpu_s = Some(costs.iter().map(|c| c.cpu_s).sum());
        row.client_rss_mib = costs.iter().map(|c| mib(c.rss_kib)).reduce(f64::max);
        row.server_cpu_s = Some(srv.cpu_s);
        row.server_rss_mib = Some(mib(srv.peak_rss_kib));
        row.note = format!(
            "{verified}/{n} files restored and verified; client CPU is the sum, client RSS the largest"
        );
        self.rows.push(row);
        fs::remove_dir_all(&dir)?;
        Ok(())
    }

    /// The other tools, over the private sshd, on the same data.
    fn compare(&mut self, tools: &[Tool], sets: &[(&str, PathBuf, Expected)]) -> Result<()> {
        let sshd = match Sshd::start(&self.work.join("sshd")) {
            Ok(s) => s,
            Err(e) => {
                for t in tools {
                    self.skipped.push(format!("{}: {e:#}", t.name()));
                }
                return Ok(());
            }
        };
        for &tool in tools {
            if let Err(e) = self.compare_one(tool, &sshd, sets) {
                say(&format!("{}: {e:#}", tool.name()));
                self.skipped.push(format!("{}: {e:#}", tool.name()));
            }
        }
        sshd.stop();
        Ok(())
    }

    fn compare_one(
        &mut self,
        tool: Tool,
        sshd: &Sshd,
        sets: &[(&str, PathBuf, Expected)],
    ) -> Result<()> {
        let dir = self.work.join(format!("tool-{}", tool.name()));
        let log = self.logs.join(format!("{}.log", tool.name()));
        let remote = Remote::prepare(tool, sshd, &dir, &log)?;
        let mut rows = Vec::new();
        for (scenario, src, expected) in sets {
            let (files, bytes) = size_of(src)?;
            say(&format!("{scenario}: backup ({})", tool.name()));
            let cost = measure::run(&remote.backup(src), &log)?;
            rows.push(with_costs(
                Row::new(
                    scenario,
                    tool.name(),
                    "backup",
                    bytes,
                    files,
                    cost.wall.as_secs_f64(),
                ),
                cost,
                None,
            ));
            let restored = dir.join(format!("restored-{scenario}"));
            fs::create_dir_all(&restored)?;
            say(&format!("{scenario}: restore ({})", tool.name()));
            let cost = measure::run(&remote.restore(src, &restored), &log)?;
            data::verify(&restored, src, expected)?;
            let mut row = with_costs(
                Row::new(
                    scenario,
                    tool.name(),
                    "restore",
                    bytes,
                    files,
                    cost.wall.as_secs_f64(),
                ),
                cost,
                None,
            );
            row.note = "verified against the source".into();
            rows.push(row);
            fs::remove_dir_all(&restored)?;
        }
        for row in &mut rows {
            let ours = self.rows.iter().find(|r| {
                r.tool.starts_with("ours/") && r.scenario == row.scenario && r.op == row.op
            });
            if let Some(ours) = ours {
                row.vs_ours = Some(row.wall_s / ours.wall_s);
            }
        }
        self.rows.extend(rows);
        drop(remote);
        fs::remove_dir_all(&dir)?;
        Ok(())
    }
}

fn join_note(a: &str, b: &str) -> String {
    if a.is_empty() {
        b.to_owned()
    } else {
        format!("{a}; {b}")
    }
}

/// Waits for every command, each on its own thread so that each wall time
/// ends when its command does.
fn wait_all(running: Vec<Running>) -> Vec<Result<Cost>> {
    std::thread::scope(|s| {
        let handles: Vec<_> = running
            .into_iter()
            .map(|r| s.spawn(move || r.wait()))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a waiter panicked")))
            })
            .collect()
    })
}

/// Files and bytes under `path` (a file or a folder).
fn size_of(path: &Path) -> Result<(u64, u64)> {
    let meta = fs::metadata(path)?;
    if meta.is_file() {
        return Ok((1, meta.len()));
    }
    let mut files = 0;
    let mut bytes = 0;
    let mut stack = vec![path.to_owned()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d)? {
            let e = e?;
            let m = e.metadata()?;
            if m.is_dir() {
                stack.push(e.path());
            } else {
                files += 1;
                bytes += m.len();
            }
        }
    }
    Ok((files, bytes))
}

/// Runs `f` over `items` on `width` threads, in order; the first error
/// wins.
fn parallel<T: Sync, R: Send>(
    items: &[T],
    width: usize,
    f: impl Fn(&T) -> Result<R> + Sync,
) -> Result<Vec<R>> {
    let mut out = Vec::with_capacity(items.len());
    for chunk in items.chunks(width.max(1)) {
        let results: Vec<Result<R>> = std::thread::scope(|s| {
            let handles: Vec<_> = chunk.iter().map(|item| s.spawn(|| f(item))).collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("a worker panicked")))
                })
                .collect()
        });
        for r in results {
            out.push(r?);
        }
    }
    Ok(out)
}
