//! The prune scenario (`--prune`): a history of snapshots of a changing
//! tree, backed up by ours and by restic (a local repository on the same
//! disk) in lockstep; then the oldest snapshots forgotten by each tool's
//! client, and the garbage collected: `backup-server prune` (the
//! operator's command, keyless, beside the running server) against
//! `restic prune`. Afterwards the oldest and the newest kept snapshot of
//! each tool are restored and checked byte for byte.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rand::{Rng, RngCore, SeedableRng};
use sha2::{Digest, Sha256};

use crate::data::{self, Expected, Sha};
use crate::measure::{self, Cmd, Cost};
use crate::mode::Mode;
use crate::ours::{Client, Server};
use crate::report::Row;
use crate::sshd::which;
use crate::{mib, say, Bench};

/// Files in the tree, whatever its size (10 folders of 100).
const FILES: u64 = 1000;
const FOLDERS: u64 = 10;
/// restic's password (a fixed one: the repository is thrown away).
const PASSWORD: &str = "backup-bench";

/// The prune scenario's sizes.
#[derive(Debug, Clone, Copy)]
pub struct PrunePlan {
    /// Bytes of the tree.
    pub size: u64,
    /// Backups made.
    pub snapshots: u32,
    /// Snapshots kept by the forget (the newest ones).
    pub keep: u32,
    /// Percentage of the files rewritten with new bytes before each
    /// backup after the first.
    pub churn_percent: u32,
}

impl PrunePlan {
    fn changed_per_run(&self) -> u64 {
        (FILES * u64::from(self.churn_percent)).div_ceil(100).max(1)
    }

    fn file_size(&self) -> u64 {
        (self.size / FILES).max(1)
    }
}

/// One version of one file: its bytes, and the first backup (1-based)
/// that no longer holds it.
struct Version {
    bytes: u64,
    died: u32,
}

/// The tree being changed, and what each of its files' versions was.
struct History {
    root: PathBuf,
    plan: PrunePlan,
    rng: rand::rngs::StdRng,
    digests: BTreeMap<PathBuf, Sha>,
    /// The live version of each file (index into `versions`).
    live: BTreeMap<PathBuf, usize>,
    versions: Vec<Version>,
}

impl History {
    fn make(root: &Path, plan: PrunePlan) -> Result<Self> {
        let mut h = Self {
            root: root.to_owned(),
            plan,
            rng: rand::rngs::StdRng::seed_from_u64(4242),
            digests: BTreeMap::new(),
            live: BTreeMap::new(),
            versions: Vec::new(),
        };
        for d in 0..FOLDERS {
            fs::create_dir_all(root.join(format!("d{d:02}")))?;
        }
        for i in 0..FILES {
            let rel = PathBuf::from(format!("d{:02}/f{i:04}.bin", i % FOLDERS));
            h.write(&rel, 1)?;
        }
        Ok(h)
    }

    /// Writes new random bytes to `rel` (a new file renamed over the old:
    /// new inode, new mtime), first held by backup `run`.
    fn write(&mut self, rel: &Path, run: u32) -> Result<()> {
        let size = usize::try_from(self.plan.file_size()).unwrap_or(usize::MAX);
        let mut buf = vec![0u8; size];
        self.rng.fill_bytes(&mut buf);
        let path = self.root.join(rel);
        let tmp = path.with_extension("tmp");
        fs::write(&tmp, &buf).with_context(|| format!("writing {}", tmp.display()))?;
        fs::rename(&tmp, &path)?;
        self.digests
            .insert(rel.to_owned(), Sha256::digest(&buf).into());
        if let Some(&old) = self.live.get(rel) {
            if let Some(v) = self.versions.get_mut(old) {
                v.died = run;
            }
        }
        self.live.insert(rel.to_owned(), self.versions.len());
        self.versions.push(Version {
            bytes: size as u64,
            died: u32::MAX,
        });
        Ok(())
    }

    /// Rewrites the plan's share of the files before backup `run`.
    fn change(&mut self, run: u32) -> Result<()> {
        let mut picked: Vec<u64> = Vec::new();
        while (picked.len() as u64) < self.plan.changed_per_run() {
            let i = self.rng.gen_range(0..FILES);
            if !picked.contains(&i) {
                picked.push(i);
            }
        }
        for i in picked {
            let rel = PathBuf::from(format!("d{:02}/f{i:04}.bin", i % FOLDERS));
            self.write(&rel, run)?;
        }
        Ok(())
    }

    /// Content bytes of every version written, and of those no kept
    /// backup (`first_kept..=last`) holds.
    fn garbage(&self, first_kept: u32) -> (u64, u64) {
        let total = self.versions.iter().map(|v| v.bytes).sum();
        let dead = self
            .versions
            .iter()
            .filter(|v| v.died <= first_kept)
            .map(|v| v.bytes)
            .sum();
        (total, dead)
    }
}

/// A tool's side of the history: how it backs up, forgets, prunes and
/// restores.
trait Side {
    fn name(&self) -> &'static str;
    fn backup(&mut self, tree: &Path) -> Result<(Cost, String)>;
    fn forget(&self, keep: u32) -> Result<Cost>;
    fn prune(&self) -> Result<(Cost, String)>;
    fn restore(&self, snapshot: &str, to: &Path) -> Result<()>;
    fn stored(&self) -> Result<u64>;
}

struct Ours<'a> {
    server: &'a Server,
    client: Client,
    server_bin: PathBuf,
    log: PathBuf,
    summary: PathBuf,
}

impl Side for Ours<'_> {
    fn name(&self) -> &'static str {
        "ours/snapshot"
    }

    fn backup(&mut self, tree: &Path) -> Result<(Cost, String)> {
        let cost = measure::run(
            &self.client.backup_cmd(&[tree]).stdout_to(&self.summary),
            &self.log,
        )?;
        let text = fs::read_to_string(&self.summary)?;
        let id = last_json(&text)
            .and_then(|v| v.get("snapshot").and_then(serde_json::Value::as_u64))
            .context("no snapshot number in the output of backup --json")?;
        Ok((cost, id.to_string()))
    }

    fn forget(&self, keep: u32) -> Result<Cost> {
        measure::run(
            &self
                .client
                .cmd()
                .args(["forget", "--keep-last", &keep.to_string()]),
            &self.log,
        )
    }

    fn prune(&self) -> Result<(Cost, String)> {
        let out = self.log.with_extension("prune-output");
        let cost = measure::run(
            &Cmd::new(&self.server_bin)
                .args(["prune", "--grace", "0s", "--data-dir"])
                .arg(self.server.data_dir())
                .stdout_to(&out),
            &self.log,
        )?;
        let text = fs::read_to_string(&out)?;
        let line = text
            .lines()
            .find(|l| l.starts_with("repository:"))
            .unwrap_or_default()
            .to_owned();
        Ok((cost, line))
    }

    fn restore(&self, snapshot: &str, to: &Path) -> Result<()> {
        measure::run_plain(
            &self
                .client
                .cmd()
                .args(["restore", snapshot, "--to"])
                .arg(to),
            &self.log,
        )
    }

    fn stored(&self) -> Result<u64> {
        data::bytes_under(self.server.data_dir())
    }
}

struct Restic {
    program: PathBuf,
    repo: PathBuf,
    home: PathBuf,
    log: PathBuf,
    summary: PathBuf,
}

impl Restic {
    fn cmd(&self) -> Cmd {
        Cmd::new(&self.program)
            .env("RESTIC_PASSWORD", PASSWORD)
            .env("RESTIC_CACHE_DIR", self.home.join("cache"))
            .env("HOME", &self.home)
            .args(["--quiet", "-r"])
            .arg(&self.repo)
    }
}

impl Side for Restic {
    fn name(&self) -> &'static str {
        "restic"
    }

    fn backup(&mut self, tree: &Path) -> Result<(Cost, String)> {
        let cost = measure::run(
            &self
                .cmd()
                .args(["backup", "--json"])
                .arg(tree)
                .stdout_to(&self.summary),
            &self.log,
        )?;
        let text = fs::read_to_string(&self.summary)?;
        let id = text
            .lines()
            .rev()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find_map(|v| v.get("snapshot_id")?.as_str().map(str::to_owned))
            .context("no snapshot_id in the output of restic backup --json")?;
        Ok((cost, id))
    }

    fn forget(&self, keep: u32) -> Result<Cost> {
        measure::run(
            &self
                .cmd()
                .args(["forget", "--keep-last", &keep.to_string()]),
            &self.log,
        )
    }

    fn prune(&self) -> Result<(Cost, String)> {
        // restic's default --max-unused (5%), without --quiet for its
        // report.
        let out = self.log.with_extension("prune-output");
        let cmd = Cmd::new(&self.program)
            .env("RESTIC_PASSWORD", PASSWORD)
            .env("RESTIC_CACHE_DIR", self.home.join("cache"))
            .env("HOME", &self.home)
            .arg("-r")
            .arg(&self.repo)
            .arg("prune")
            .stdout_to(&out);
        let cost = measure::run(&cmd, &self.log)?;
        let text = fs::read_to_string(&out)?;
        let line = text
            .lines()
            .find(|l| l.contains("total prune"))
            .or_else(|| text.lines().find(|l| l.contains("unused size after prune")))
            .unwrap_or_default()
            .trim()
            .to_owned();
        Ok((cost, line))
    }

    fn restore(&self, snapshot: &str, to: &Path) -> Result<()> {
        measure::run_plain(
            &self.cmd().args(["restore", snapshot, "--target"]).arg(to),
            &self.log,
        )
    }

    fn stored(&self) -> Result<u64> {
        data::bytes_under(&self.repo)
    }
}

fn last_json(text: &str) -> Option<serde_json::Value> {
    text.lines()
        .rev()
        .find_map(|l| serde_json::from_str(l.trim()).ok())
}

impl Bench {
    /// The prune scenario; restic is left out when `with_restic` is false
    /// or it is not installed (and said so under the table).
    pub(crate) fn prune(&mut self, plan: PrunePlan, with_restic: bool) -> Result<()> {
        if plan.keep == 0 || plan.keep >= plan.snapshots {
            bail!(
                "--prune-keep must be between 1 and --prune-snapshots less 1 ({} of {})",
                plan.keep,
                plan.snapshots
            );
        }
        let dir = self.work.join("prune");
        let tree = dir.join("history");
        say(&format!(
            "prune: a tree of {FILES} files, {} bytes; {} backups, {} files rewritten before each",
            plan.file_size() * FILES,
            plan.snapshots,
            plan.changed_per_run()
        ));
        let mut history = History::make(&tree, plan)?;
        let server = Server::start(
            &self.bins,
            self.caps,
            Mode::Snapshot,
            &dir.join("server"),
            &self.logs.join("server-prune.log"),
        )?;
        let client = Client::register(&self.bins, &server, &dir.join("client"), "prune")?;
        let mut sides: Vec<Box<dyn Side + '_>> = vec![Box::new(Ours {
            server: &server,
            client,
            server_bin: self.bins.server.clone(),
            log: self.logs.join("prune-ours.log"),
            summary: dir.join("ours-backup.json"),
        })];
        match which("restic") {
            Some(program) if with_restic => {
                let home = dir.join("restic-home");
                fs::create_dir_all(&home)?;
                let restic = Restic {
                    program,
                    repo: dir.join("restic-repo"),
                    home,
                    log: self.logs.join("prune-restic.log"),
                    summary: dir.join("restic-backup.json"),
                };
                measure::run_plain(&restic.cmd().arg("init"), &restic.log)?;
                sides.push(Box::new(restic));
            }
            Some(_) => self.skipped.push("prune: restic left out (--tools)".into()),
            None => self.skipped.push("prune: restic: not installed".into()),
        }
        let first_kept = plan.snapshots - plan.keep + 1;
        let mut ids: Vec<Vec<String>> = vec![Vec::new(); sides.len()];
        let mut backups: Vec<Vec<Cost>> = vec![Vec::new(); sides.len()];
        let mut oldest_kept = None;
        for run in 1..=plan.snapshots {
            if run > 1 {
                history.change(run)?;
            }
            if run == first_kept {
                oldest_kept = Some(history.digests.clone());
            }
            if run % 10 == 1 || run == plan.snapshots {
                say(&format!("prune: backup {run} of {}", plan.snapshots));
            }
            for (i, side) in sides.iter_mut().enumerate() {
                let (cost, id) = side
                    .backup(&tree)
                    .with_context(|| format!("{} backup {run}", side.name()))?;
                if let (Some(c), Some(n)) = (backups.get_mut(i), ids.get_mut(i)) {
                    c.push(cost);
                    n.push(id);
                }
            }
        }
        let newest = history.digests.clone();
        let oldest_kept = oldest_kept.context("no oldest kept snapshot")?;
        let (written, dead) = history.garbage(first_kept);
        let fraction = dead as f64 / written as f64;
        say(&format!(
            "prune: {dead} of {written} content bytes written are held only by the {} snapshots forgotten ({:.1} %)",
            first_kept - 1,
            fraction * 100.0
        ));
        for (i, side) in sides.iter().enumerate() {
            let name = side.name();
            let costs = backups.get(i).cloned().unwrap_or_default();
            let before = side.stored()?;
            say(&format!("prune: forget ({name})"));
            let forget = side.forget(plan.keep)?;
            say(&format!("prune: prune ({name})"));
            let (prune, said) = side.prune()?;
            let after = side.stored()?;
            for (label, run) in [("oldest kept", first_kept), ("newest", plan.snapshots)] {
                let id = ids
                    .get(i)
                    .and_then(|n| n.get(usize::try_from(run - 1).unwrap_or(0)))
                    .context("snapshot id missing")?;
                let to = dir.join(format!("restored-{}", name.replace('/', "-")));
                fs::create_dir_all(&to)?;
                say(&format!(
                    "prune: restore the {label} snapshot ({name} {id})"
                ));
                side.restore(id, &to)?;
                let expected = if run == plan.snapshots {
                    &newest
                } else {
                    &oldest_kept
                };
                data::verify(&to, &tree, &Expected::Tree(expected.clone())).with_context(|| {
                    format!("{name} restored its {label} snapshot wrongly after the prune")
                })?;
                fs::remove_dir_all(&to)?;
            }
            let wall: f64 = costs.iter().map(|c| c.wall.as_secs_f64()).sum();
            let mut b = Row::new(
                "prune",
                name,
                &format!("backup ×{}", plan.snapshots),
                history.plan.file_size() * FILES,
                FILES,
                wall,
            );
            b.files_s = None;
            b.client_cpu_s = Some(costs.iter().map(|c| c.cpu_s).sum());
            b.client_rss_mib = costs.iter().map(|c| mib(c.rss_kib)).reduce(f64::max);
            b.stored_bytes = Some(before);
            b.note = format!(
                "{} backups of the changing tree: wall and CPU summed, RSS the largest; stored: the repository after them",
                plan.snapshots
            );
            self.rows.push(b);
            self.rows
                .push(op_row(name, "forget", before, forget, before, ""));
            let note = format!(
                "repository {} -> {} ({:.1} % reclaimed; {:.1} % of the content written was unreferenced); verified the oldest kept and the newest snapshot after it; it said: {said}",
                size_mib(before),
                size_mib(after),
                before.saturating_sub(after) as f64 * 100.0 / before.max(1) as f64,
                fraction * 100.0
            );
            self.rows
                .push(op_row(name, "prune", before, prune, after, &note));
        }
        drop(sides);
        server.stop();
        fs::remove_dir_all(&dir)?;
        Ok(())
    }
}

fn size_mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / crate::report::MIB)
}

/// A forget or prune row: `bytes` is the repository before, `stored` after.
fn op_row(tool: &str, op: &str, bytes: u64, cost: Cost, stored: u64, note: &str) -> Row {
    let mut r = Row::new("prune", tool, op, bytes, 1, cost.wall.as_secs_f64());
    r.client_cpu_s = Some(cost.cpu_s);
    r.client_rss_mib = Some(mib(cost.rss_kib));
    r.stored_bytes = Some(stored);
    r.note = note.to_owned();
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_what_only_forgotten_backups_hold() {
        let dir = tempfile::tempdir().unwrap();
        let plan = PrunePlan {
            size: FILES * 100,
            snapshots: 10,
            keep: 5,
            churn_percent: 10,
        };
        let mut h = History::make(dir.path(), plan).unwrap();
        for run in 2..=plan.snapshots {
            h.change(run).unwrap();
        }
        let (written, dead) = h.garbage(6);
        // 1000 files first, then 100 rewritten before each of 9 backups.
        assert_eq!(written, (FILES + 9 * 100) * 100);
        // A version is garbage when it was replaced by backup 6 at the
        // latest: at most the 5 changes before it.
        assert!(dead > 0 && dead <= 5 * 100 * 100, "{dead}");
        assert_eq!(
            data::digest_tree(dir.path()).unwrap(),
            h.digests,
            "digests follow the rewrites"
        );
    }
}
