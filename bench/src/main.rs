//! `backup-bench`: end-to-end figures for `backup-server` and
//! `backup-client` on one machine over 127.0.0.1, in one run with the
//! physical limits (one AES-256-CBC stream, the data directory's disk) and
//! with what users would use instead (scp, rsync, borg, restic, bupstash
//! over a private sshd; rustic on a local repository). See
//! `bench/README.md`.

mod chart;
mod compare;
mod data;
mod limits;
mod measure;
mod mode;
mod ours;
mod ours_runs;
mod peers;
mod prune;
mod relay;
mod report;
mod scale;
mod sshd;

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use anyhow::{Context, Result};
use clap::Parser;

use crate::compare::Tool;
use crate::data::Expected;
use crate::measure::{Cost, Running};
use crate::mode::{Capabilities, ModeArg};
use crate::ours::{Bins, ServerCost};
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
             the physical limits and with scp, rsync, borg, restic (and bupstash, rustic)"
)]
struct Cli {
    /// How to run ours (a list): snapshot (secure mode's default; `secure`
    /// is the same), per-file (secure mode, `--per-file`), legacy, both
    /// (legacy and snapshot), all
    #[arg(long, value_enum, value_delimiter = ',', default_value = "snapshot")]
    mode: Vec<ModeArg>,
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
    /// Also compare with bupstash over ssh (`bash bench/run --with-bupstash`
    /// installs it with `cargo install --locked`)
    #[arg(long)]
    with_bupstash: bool,
    /// Also compare with rustic on a local repository (`bash bench/run
    /// --with-rustic` installs it)
    #[arg(long)]
    with_rustic: bool,
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
    /// Also draw SVG charts of the results into DIR: throughput.svg and
    /// peak-rss.svg (each tool's first backup and restore per scenario),
    /// and with --prune prune-seconds.svg and prune-rss.svg
    #[arg(long, value_name = "DIR", num_args = 0..=1, default_missing_value = "bench/out")]
    plot: Option<PathBuf>,
    /// Draw the charts of a report saved with --json (into --plot's
    /// folder) and exit: nothing is run
    #[arg(long, value_name = "JSON")]
    replot: Option<PathBuf>,
    /// Also run the prune scenario: a history of --prune-snapshots backups
    /// of a changing tree by ours and by restic, the newest --prune-keep
    /// kept, then `backup-server prune` against `restic prune` (alone:
    /// `--prune --skip large,small,concurrent --no-compare`; restic is
    /// left out only by a --tools list without it)
    #[arg(long)]
    prune: bool,
    /// Size of the prune scenario's tree in MiB (1,000 files)
    #[arg(
        long,
        env = "BENCH_PRUNE_SIZE_MIB",
        default_value_t = 2048,
        value_name = "MIB"
    )]
    prune_size: u64,
    /// Backups in the prune scenario's history
    #[arg(long, default_value_t = 100, value_name = "N")]
    prune_snapshots: u32,
    /// Snapshots kept (the newest) before the prune
    #[arg(long, default_value_t = 25, value_name = "N")]
    prune_keep: u32,
    /// Percentage of the files rewritten before each backup of the history
    /// (2 with 25 of 100 kept: about half the bytes written become garbage)
    #[arg(long, default_value_t = 2, value_name = "PERCENT")]
    prune_churn: u32,
    /// Run the scale-out scenario instead of the others: 1 GiB and 10,000
    /// small files through a server on its data directory (fs+SQLite) and
    /// one on S3 and PostgreSQL (S3 requests and metadata rows counted);
    /// then 100 clients at once through a balancer in front of three
    /// servers and of one (SeaweedFS and PostgreSQL are started here)
    #[arg(long)]
    scale: bool,
    /// The scale-out scenario at smoke size: 128 MiB, 1,000 small files,
    /// 20 clients
    #[arg(long)]
    scale_quick: bool,
    /// Metadata of the S3 side of the scale-out scenario; with sqlite
    /// (S3+SQLite) the clients part, which needs PostgreSQL, is left out
    #[arg(long, value_enum, default_value = "postgres", value_name = "META")]
    scale_meta: scale::ScaleMeta,
    /// Clients at once in the scale-out scenario (0: that part left out)
    #[arg(long, value_name = "N")]
    scale_clients: Option<u64>,
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
                large: (cli.large_gib.max(1) << 30).min(
                    if ModeArg::modes(&cli.mode).iter().any(|m| m.legacy()) {
                        LEGACY_MAX_FILE
                    } else {
                        u64::MAX
                    },
                ),
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
    /// Tables of scenarios with a layout of their own (the scale-out
    /// scenario), printed after the main one.
    tables: Vec<String>,
}

fn run(cli: &Cli) -> Result<()> {
    if let Some(json) = &cli.replot {
        let text =
            fs::read_to_string(json).with_context(|| format!("reading {}", json.display()))?;
        let report: Report = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a report of --json", json.display()))?;
        let dir = cli
            .plot
            .clone()
            .unwrap_or_else(|| PathBuf::from("bench/out"));
        for path in chart::write(&report, &dir)? {
            say(&format!("chart {}", path.display()));
        }
        return Ok(());
    }
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
        tables: Vec::new(),
    };
    let result = bench.all(cli);
    let tables = std::mem::take(&mut bench.tables);
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
    if !(cli.scale || cli.scale_quick) {
        println!("{}", report.table());
    }
    for t in &tables {
        println!("{t}");
    }
    let summary = report.summary();
    if summary.lines().count() > 2 {
        println!(
            "Side by side (wall seconds; sent: what the tool reports, wire: counted by the relay):\n"
        );
        println!("{summary}");
    }
    if let Some(prune) = report.prune_summary() {
        println!("Prune, side by side (the prune's own process: seconds, CPU, peak RSS):\n");
        println!("{prune}");
    }
    if let Some(p) = &cli.json {
        fs::write(p, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(p) = &cli.csv {
        fs::write(p, report.csv()).with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(dir) = &cli.plot {
        for path in chart::write(&report, dir)? {
            say(&format!("chart {}", path.display()));
        }
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
        if cli.scale || cli.scale_quick {
            let mut plan = if cli.scale_quick {
                scale::ScalePlan::quick(cli.scale_meta)
            } else {
                scale::ScalePlan::full(cli.scale_meta)
            };
            plan.clients = cli.scale_clients.unwrap_or(plan.clients);
            return self.scale(plan);
        }
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
        for mode in ModeArg::modes(&cli.mode) {
            let tool = format!("ours/{}", mode.name());
            let caps = self.caps;
            if let Err(e) = mode.wiring(caps, 0, 0) {
                self.skipped.push(format!("{tool}: {e}"));
                continue;
            }
            if let Some(sha) = expected_large {
                self.ours_set(mode, &tool, "large", &large, &Expected::File(sha))?;
                if mode.snapshots() {
                    self.two_names(mode, &tool, &large)?;
                }
            }
            if let Some(tree) = &expected_small {
                let expected = Expected::Tree(tree.clone());
                self.ours_set(mode, &tool, "small", &small, &expected)?;
                if cli.small_procs > 1 {
                    self.small_split(mode, &tool, &small, cli.small_procs)?;
                }
            }
            if !cli.skip.contains(&Scenario::Concurrent) {
                self.concurrent(mode, &tool)?;
            }
        }
        if !cli.no_compare {
            self.compare_all(cli, expected_large, expected_small, &large, &small)?;
        }
        if cli.prune {
            let plan = prune::PrunePlan {
                size: cli.prune_size.max(1) << 20,
                snapshots: cli.prune_snapshots,
                keep: cli.prune_keep,
                churn_percent: cli.prune_churn,
            };
            let with_restic = cli.tools.as_ref().is_none_or(|t| t.contains(&Tool::Restic));
            self.prune(plan, with_restic)?;
        }
        Ok(())
    }

    fn compare_all(
        &mut self,
        cli: &Cli,
        expected_large: Option<data::Sha>,
        expected_small: Option<std::collections::BTreeMap<PathBuf, data::Sha>>,
        large: &Path,
        small: &Path,
    ) -> Result<()> {
        let mut tools = cli.tools.clone().unwrap_or_else(|| Tool::DEFAULT.to_vec());
        for (with, tool) in [
            (cli.with_bupstash, Tool::Bupstash),
            (cli.with_rustic, Tool::Rustic),
        ] {
            if with && !tools.contains(&tool) {
                tools.push(tool);
            }
        }
        let mut sets: Vec<peers::Set> = Vec::new();
        if let Some(sha) = expected_large {
            sets.push(("large", large.to_owned(), Expected::File(sha)));
        }
        if let Some(tree) = expected_small {
            sets.push(("small", small.to_owned(), Expected::Tree(tree)));
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
