//! The other tools on the same data as ours, in the same run: backup,
//! restore (verified), and for the incremental ones an unchanged re-run
//! and a backup after 1 MiB changed in the middle of the large file, those
//! two through the counting relay in front of the sshd.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::compare::{Remote, Tool};
use crate::data::{self, Change, Expected};
use crate::measure::{self, Cost};
use crate::relay::Relay;
use crate::report::{Row, OP_BACKUP, OP_CHANGED, OP_RERUN, OP_RESTORE};
use crate::sshd::Sshd;
use crate::{say, size_of, with_costs, Bench};

/// A data set: its scenario name, where it is, what a restore must give.
pub type Set = (&'static str, PathBuf, Expected);

/// Seed of the bytes written by the 1 MiB change (the same for every tool).
pub const CHANGE_SEED: u64 = 77;

impl Bench {
    /// The other tools, over the private sshd, on the same data.
    pub(crate) fn compare(&mut self, tools: &[Tool], sets: &[Set]) -> Result<()> {
        let sshd = match Sshd::start(&self.work.join("sshd")) {
            Ok(s) => s,
            Err(e) => {
                for t in tools {
                    self.skipped.push(format!("{}: {e:#}", t.name()));
                }
                return Ok(());
            }
        };
        let relay = Relay::start(([127, 0, 0, 1], sshd.port).into())?;
        for &tool in tools {
            if let Err(e) = self.compare_one(tool, &sshd, &relay, sets) {
                say(&format!("{}: {e:#}", tool.name()));
                self.skipped.push(format!("{}: {e:#}", tool.name()));
            }
        }
        drop(relay);
        sshd.stop();
        Ok(())
    }

    fn compare_one(&mut self, tool: Tool, sshd: &Sshd, relay: &Relay, sets: &[Set]) -> Result<()> {
        let dir = self.work.join(format!("tool-{}", tool.name()));
        let log = self.logs.join(format!("{}.log", tool.name()));
        let mut remote = Remote::prepare(tool, sshd, &dir, &log)?;
        let mut rows = Vec::new();
        for (scenario, src, expected) in sets {
            let (files, bytes) = size_of(src)?;
            let row = |op: &str, cost: Cost| {
                with_costs(
                    Row::new(
                        scenario,
                        tool.name(),
                        op,
                        bytes,
                        files,
                        cost.wall.as_secs_f64(),
                    ),
                    cost,
                    None,
                )
            };
            say(&format!("{scenario}: backup ({})", tool.name()));
            let held = data::bytes_under(&dir.join("remote")).unwrap_or(0);
            let cost = measure::run(&remote.backup(src), &log)?;
            let mut backup = row(OP_BACKUP, cost);
            backup.stored_bytes = data::bytes_under(&dir.join("remote"))
                .ok()
                .map(|b| b.saturating_sub(held));
            rows.push(backup);
            let restored = dir.join(format!("restored-{scenario}"));
            fs::create_dir_all(&restored)?;
            say(&format!("{scenario}: restore ({})", tool.name()));
            let cost = measure::run(&remote.restore(src, &restored), &log)?;
            data::verify(&restored, src, expected)?;
            let mut restore = row(OP_RESTORE, cost);
            restore.note = "verified against the source".into();
            rows.push(restore);
            fs::remove_dir_all(&restored)?;
            if !tool.incremental() {
                continue;
            }
            say(&format!("{scenario}: unchanged re-run ({})", tool.name()));
            rows.push(counted(&mut remote, relay, src, &log, |c| {
                row(OP_RERUN, c)
            })?);
            if *scenario == "large" {
                say(&format!("large: 1 MiB changed, backup ({})", tool.name()));
                let change = Change::apply(src, CHANGE_SEED)?;
                let done = counted(&mut remote, relay, src, &log, |c| row(OP_CHANGED, c));
                change.revert()?;
                rows.push(done?);
            }
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

/// Backs `src` up again, through the relay when the tool goes over ssh,
/// and notes the bytes on the wire.
fn counted(
    remote: &mut Remote<'_>,
    relay: &Relay,
    src: &Path,
    log: &Path,
    row: impl Fn(Cost) -> Row,
) -> Result<Row> {
    let over_ssh = remote.tool.over_ssh();
    let direct = remote.port;
    if over_ssh {
        remote.port = relay.addr().port();
    }
    relay.take();
    let cost = measure::run(&remote.backup(src), log);
    remote.port = direct;
    let mut row = row(cost?);
    if over_ssh {
        let wire = relay.take();
        row.wire_up = Some(wire.up);
        row.wire_down = Some(wire.down);
    }
    Ok(row)
}
