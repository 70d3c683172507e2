//! Ours, one scenario at a time, each on a fresh server: a data set backed
//! up, restored (verified), backed up again unchanged and, for the large
//! file, after 1 MiB changed in its middle (restored and verified again);
//! the large file under two names; the small files by several processes;
//! many clients at once.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::data::{self, Change, Expected};
use crate::measure::{self, Cost, Running};
use crate::mode::Mode;
use crate::ours::{self, Client, Server};
use crate::peers::CHANGE_SEED;
use crate::relay::Relay;
use crate::report::{Row, OP_BACKUP, OP_CHANGED, OP_RERUN, OP_RESTORE, OP_TWO_NAMES};
use crate::{join_note, mib, parallel, say, size_of, wait_all, with_costs, Bench};

impl Bench {
    fn server(&self, mode: Mode, what: &str, dir: &Path) -> Result<Server> {
        Server::start(
            &self.bins,
            self.caps,
            mode,
            &dir.join("server"),
            &self.logs.join(format!("server-{}-{what}.log", mode.name())),
        )
    }

    /// Backs up `src` with a fresh server and client, restores it, checks
    /// what came back; backs it up again unchanged and, for the large
    /// file, after a change of 1 MiB.
    pub(crate) fn ours_set(
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
        let server = self.server(mode, scenario, &dir)?;
        let client = Client::register(&self.bins, &server, &dir.join("client"), "bench")?;
        let (files, bytes) = size_of(src)?;
        let row = |op: &str, cost: Cost, srv| {
            with_costs(
                Row::new(scenario, tool, op, bytes, files, cost.wall.as_secs_f64()),
                cost,
                Some(srv),
            )
        };
        say(&format!("{scenario}: backup ({tool})"));
        let empty = data::bytes_under(server.data_dir())?;
        let (cost, srv) = ours::measured(&server, &client.backup_kept(&[src]), &log)?;
        let mut backup = row(OP_BACKUP, cost, srv);
        backup.sent_bytes = client.backup_summary()?.map(|s| s.sent_bytes);
        // What the data directory holds: each backup's row says what it
        // added.
        let mut held = data::bytes_under(server.data_dir())?;
        backup.stored_bytes = Some(held.saturating_sub(empty));
        let restored = dir.join("restored");
        fs::create_dir_all(&restored)?;
        say(&format!("{scenario}: restore ({tool})"));
        let (cost, srv) = ours::measured(&server, &client.restore_of(src, &restored), &log)?;
        let mut restore = row(OP_RESTORE, cost, srv);
        data::verify(&restored, src, expected)
            .with_context(|| format!("{tool} restored {scenario} wrongly"))?;
        fs::remove_dir_all(&restored)?;
        if scenario == "large" {
            if let Some(limit) = self.lower_limit() {
                backup.of_limit = Some(backup.mb_s / limit);
                restore.of_limit = Some(restore.mb_s / limit);
            }
        }
        restore.note = join_note(&restore.note, "verified against the source");
        self.rows.push(backup);
        self.rows.push(restore);
        // Snapshots send little on a re-run: counted through the relay. The
        // file-by-file modes send everything again: measured directly, the
        // relay's copies would slow them.
        let relay = if mode.snapshots() {
            Some(Relay::start(server.wiring.client_addr)?)
        } else {
            None
        };
        let counted = match &relay {
            Some(r) => client.via(&server, r.addr())?,
            None => client.clone(),
        };
        let mut again = |op: &str| -> Result<Row> {
            if let Some(r) = &relay {
                r.take();
            }
            let (cost, srv) = ours::measured(&server, &counted.backup_kept(&[src]), &log)?;
            let mut r = row(op, cost, srv);
            r.sent_bytes = counted.backup_summary()?.map(|s| s.sent_bytes);
            if let Some(wire) = relay.as_ref().map(Relay::take) {
                r.wire_up = Some(wire.up);
                r.wire_down = Some(wire.down);
            }
            let now = data::bytes_under(server.data_dir())?;
            r.stored_bytes = Some(now.saturating_sub(held));
            held = now;
            Ok(r)
        };
        say(&format!("{scenario}: unchanged re-run ({tool})"));
        let rerun = again(OP_RERUN)?;
        self.rows.push(rerun);
        if scenario == "large" {
            say(&format!("large: 1 MiB changed, backup ({tool})"));
            let change = Change::apply(src, CHANGE_SEED)?;
            let changed = again(OP_CHANGED).and_then(|mut r| {
                let to = dir.join("restored-changed");
                fs::create_dir_all(&to)?;
                say(&format!("large: restore after the change ({tool})"));
                measure::run_plain(&client.restore_of(src, &to), &log)?;
                data::verify(&to, src, &Expected::File(change.changed))
                    .with_context(|| format!("{tool} restored the changed file wrongly"))?;
                r.note = "the changed file restored and verified".into();
                Ok(r)
            });
            change.revert()?;
            self.rows.push(changed?);
        }
        drop(relay);
        server.stop();
        fs::remove_dir_all(&dir)?;
        Ok(())
    }

    /// The large file under two names (a hard link and a copy) in one
    /// folder, backed up on a fresh server: what the server stores, against
    /// the file's size.
    pub(crate) fn two_names(&mut self, mode: Mode, tool: &str, large: &Path) -> Result<()> {
        let dir = self.work.join(format!("ours-{}-two-names", mode.name()));
        let twice = dir.join("twice");
        fs::create_dir_all(&twice)?;
        fs::hard_link(large, twice.join("a.bin"))?;
        say("two names: copying the large file");
        fs::copy(large, twice.join("b.bin"))?;
        let size = fs::metadata(large)?.len();
        let log = self
            .logs
            .join(format!("ours-{}-two-names.log", mode.name()));
        let server = self.server(mode, "two-names", &dir)?;
        let client = Client::register(&self.bins, &server, &dir.join("client"), "bench")?;
        let empty = data::bytes_under(server.data_dir())?;
        say(&format!("two names: backup ({tool})"));
        let (cost, srv) = ours::measured(&server, &client.backup_kept(&[&twice]), &log)?;
        let stored = data::bytes_under(server.data_dir())?;
        server.stop();
        let mut row = with_costs(
            Row::new(
                "large",
                tool,
                OP_TWO_NAMES,
                2 * size,
                2,
                cost.wall.as_secs_f64(),
            ),
            cost,
            Some(srv),
        );
        row.sent_bytes = client.backup_summary()?.map(|s| s.sent_bytes);
        row.stored_bytes = Some(stored.saturating_sub(empty));
        let ratio = stored.saturating_sub(empty) as f64 / size as f64;
        row.note = format!(
            "the same file under two names: the data directory grew by {ratio:.3} x the file's size (1.0: stored once)"
        );
        self.rows.push(row);
        fs::remove_dir_all(&dir)?;
        Ok(())
    }

    /// The small files backed up by `procs` client processes at once (one
    /// identity, a share of the folders each): what backing up over several
    /// connections would give, the fsyncs of one connection overlapping
    /// those of the others.
    pub(crate) fn small_split(
        &mut self,
        mode: Mode,
        tool: &str,
        src: &Path,
        procs: u64,
    ) -> Result<()> {
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
    pub(crate) fn concurrent(&mut self, mode: Mode, tool: &str) -> Result<()> {
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
            measure::run_plain(&client.restore_of(path, &to), &client.log())?;
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
}
