//! The snapshot commands of `backup-client` (secure mode): `backup` as a
//! snapshot, `snapshots`, `ls` and `restore [SNAPSHOT][:PATH]`, with their
//! text and JSON renderings.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use protocol::UserName;

use super::args::{BackupArgs, CheckArgs, DiffArgs, ForgetArgs, GlobalArgs, LsArgs, RestoreArgs};
use super::utc_time;
use crate::engine::Client;
use crate::error::Error;
use crate::exclude::{self, Rules};
use crate::feedback::{Console, Feedback};
use crate::snapshot::backup::{SnapshotOptions, SnapshotSummary};
use crate::snapshot::check::{CheckSummary, Subset};
use crate::snapshot::forget::KeepPolicy;
use crate::snapshot::restore::RestoreSummary;

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// What a snapshot is to be made of.
pub(super) struct Request<'a> {
    pub(super) paths: Vec<PathBuf>,
    pub(super) rules: Rules,
    /// The name to register under when there is no identity yet.
    pub(super) register_as: Option<&'a UserName>,
}

/// `backup PATH...` in secure mode: registers first when there is no
/// identity yet and a name is known, then makes a snapshot. With
/// `--dry-run`, lists what the snapshot would hold without contacting the
/// server.
pub(super) async fn backup(
    client: &Client,
    args: &BackupArgs,
    request: Request<'_>,
    global: &GlobalArgs,
    console: &Arc<Console>,
) -> Result<u8, Error> {
    let Request {
        paths,
        rules,
        register_as,
    } = request;
    crate::snapshot::backup::check_paths(&paths)?;
    if args.dry_run {
        return Ok(dry_run(&paths, &rules, global, console));
    }
    if client.store().load()?.is_none() {
        let name = register_as.ok_or_else(|| Error::NotRegistered {
            dir: client.store().dir().to_owned(),
        })?;
        client.register(name.clone(), false).await?;
    }
    let options = SnapshotOptions {
        tags: args.tags.clone(),
        host: args.host.clone().unwrap_or_else(host_name),
        force_read: args.force_read,
        rules,
    };
    let summary = client.snapshot(&paths, &options).await?;
    for (path, why) in &summary.skipped {
        console.notice(&format!("skipped {path}: {why}"));
    }
    let code = if summary.skipped.is_empty() { 0 } else { 6 };
    if global.json {
        let mut v = serde_json::to_value(&summary).unwrap_or_default();
        v["ok"] = serde_json::json!(code == 0);
        v["exit_code"] = serde_json::json!(code);
        v["server"] = serde_json::json!(client.options().server);
        println!("{v}");
    } else {
        console.say(&summary_line(&summary, &client.options().server));
    }
    Ok(code)
}

/// `backup --dry-run` in secure mode: the files the snapshot would hold and
/// their total size. The server is not contacted, so what it already holds
/// (and would not be sent again) is not known.
fn dry_run(paths: &[PathBuf], rules: &Rules, global: &GlobalArgs, console: &Console) -> u8 {
    let preview = exclude::preview(paths, rules);
    for (path, why) in &preview.skipped {
        console.notice(&format!("skipped {path}: {why}"));
    }
    let code = if preview.skipped.is_empty() { 0 } else { 6 };
    if global.json {
        let mut v = serde_json::to_value(&preview).unwrap_or_default();
        v["ok"] = serde_json::json!(code == 0);
        v["exit_code"] = serde_json::json!(code);
        v["dry_run"] = serde_json::json!(true);
        println!("{v}");
        return code;
    }
    // The listing is the output asked for: printed even with --quiet.
    let mut out = String::new();
    for f in &preview.files {
        out.push_str(&format!("{:>13}  {}\n", f.size, f.path.display()));
    }
    print!("{out}");
    console.say(&format!(
        "dry run: {} files, {} directories, {} links, {} ({} bytes) would be backed up; {} excluded; the server was not contacted and nothing was sent",
        preview.files.len(),
        preview.dirs,
        preview.links,
        size(preview.bytes),
        preview.bytes,
        preview.excluded,
    ));
    code
}

/// The one line that ends a snapshot run: what was new, changed,
/// unchanged, excluded and skipped, and the bytes actually sent.
fn summary_line(s: &SnapshotSummary, server: &str) -> String {
    let files = if s.compared {
        format!(
            "{} new, {} changed, {} unchanged",
            s.new_files, s.changed_files, s.unchanged_files
        )
    } else {
        format!("{} read (not compared with the last snapshot)", s.files)
    };
    format!(
        "snapshot {} saved on {server}: {} files ({files}), {} directories, {}; {} excluded, {} skipped; {} new objects, {} sent in {} packs",
        s.snapshot,
        s.files,
        s.dirs,
        size(s.bytes),
        s.excluded,
        s.skipped.len(),
        s.new_objects,
        size(s.sent_bytes),
        s.packs,
    )
}

/// `snapshots`.
pub(super) async fn snapshots(
    client: &Client,
    global: &GlobalArgs,
    console: &Console,
) -> Result<u8, Error> {
    let listed = client.snapshots().await?;
    if global.json {
        let v = serde_json::json!({
            "ok": true,
            "exit_code": 0,
            "server": client.options().server,
            "snapshots": listed,
        });
        println!("{v}");
        return Ok(0);
    }
    if listed.is_empty() {
        console.say(&format!("no snapshots on {}", client.options().server));
    }
    for s in &listed {
        console.say(&format!(
            "{:>6}  {}  {}  {:>10}  {} files  {}{}",
            s.id,
            utc_time(s.time),
            s.host,
            size(s.bytes),
            s.files,
            s.paths.join(" "),
            if s.tags.is_empty() {
                String::new()
            } else {
                format!("  [{}]", s.tags.join(", "))
            }
        ));
    }
    Ok(0)
}

/// `forget [SNAPSHOT...] [--keep-*] [--dry-run]`.
pub(super) async fn forget(
    client: &Client,
    args: &ForgetArgs,
    global: &GlobalArgs,
    console: &Console,
) -> Result<u8, Error> {
    let policy = KeepPolicy {
        last: args.keep_last,
        hourly: args.keep_hourly,
        daily: args.keep_daily,
        weekly: args.keep_weekly,
        monthly: args.keep_monthly,
        yearly: args.keep_yearly,
        within: args.keep_within,
        tags: args.keep_tag.clone(),
    };
    if args.snapshots.is_empty() && policy.is_empty() {
        return Err(Error::Usage {
            detail: "forget needs snapshot numbers or at least one --keep-* rule".into(),
        });
    }
    let summary = client
        .forget(&args.snapshots, &policy, args.dry_run)
        .await?;
    if global.json {
        let mut v = serde_json::to_value(&summary).unwrap_or_default();
        v["ok"] = serde_json::json!(true);
        v["exit_code"] = serde_json::json!(0);
        println!("{v}");
        return Ok(0);
    }
    let verb = if args.dry_run {
        "would forget"
    } else {
        "forget"
    };
    for s in &summary.forget {
        console.say(&format!(
            "{verb} {:>6}  {}  {}  {}",
            s.id,
            utc_time(s.time),
            s.host,
            s.paths.join(" ")
        ));
    }
    if args.dry_run {
        console.say(&format!(
            "{} snapshots would be forgotten",
            summary.forget.len()
        ));
    } else {
        console.say(&format!("{} snapshots forgotten", summary.removed));
    }
    Ok(0)
}

/// `ls [SNAPSHOT][:PATH]`.
pub(super) async fn ls(
    client: &Client,
    args: &LsArgs,
    global: &GlobalArgs,
    console: &Console,
) -> Result<u8, Error> {
    let (snap, entries) = client.ls(args.spec.as_deref().unwrap_or("")).await?;
    if global.json {
        let v = serde_json::json!({
            "ok": true,
            "exit_code": 0,
            "snapshot": snap,
            "entries": entries,
        });
        println!("{v}");
        return Ok(0);
    }
    for e in &entries {
        let shown = match e.kind {
            "dir" => format!("{}/", e.path),
            "symlink" => format!("{}@", e.path),
            _ => e.path.clone(),
        };
        console.say(&format!("{:04o} {:>10}  {shown}", e.mode, e.size));
    }
    Ok(0)
}

/// `restore [SNAPSHOT][:PATH] --to DIR`.
pub(super) async fn restore(
    client: &Client,
    args: &RestoreArgs,
    cwd: &Path,
    global: &GlobalArgs,
    console: &Console,
) -> Result<u8, Error> {
    let to = args
        .to
        .as_ref()
        .map(|p| cwd.join(p))
        .ok_or_else(|| Error::Usage {
            detail: "restoring a snapshot needs --to DIR, the folder to restore into".into(),
        })?;
    let spec = args.name.as_deref().unwrap_or("");
    let summary = client.restore_snapshot(spec, &to, args.overwrite).await?;
    let code = summary.first_error.as_ref().map_or(0, Error::exit_code);
    for (path, why) in &summary.failed {
        console.print_error(&format!("{path}: {why}"));
    }
    if global.json {
        let mut v = serde_json::to_value(&summary).unwrap_or_default();
        v["ok"] = serde_json::json!(code == 0);
        v["exit_code"] = serde_json::json!(code);
        println!("{v}");
    } else {
        console.say(&restore_line(&summary, &to));
    }
    Ok(code)
}

fn restore_line(s: &RestoreSummary, to: &Path) -> String {
    format!(
        "restored snapshot {} into {}: {} files, {} directories, {} links, {}{}",
        s.snapshot,
        to.display(),
        s.files,
        s.dirs,
        s.links,
        size(s.bytes),
        if s.failed.is_empty() {
            String::new()
        } else {
            format!("; {} failed", s.failed.len())
        }
    )
}

/// `diff A [B]`.
pub(super) async fn diff(
    client: &Client,
    args: &DiffArgs,
    global: &GlobalArgs,
    console: &Console,
) -> Result<u8, Error> {
    let to = args.to.as_deref().unwrap_or("latest");
    let (a, b, changes) = client.diff(&args.from, to).await?;
    if global.json {
        let v = serde_json::json!({
            "ok": true,
            "exit_code": 0,
            "from": a,
            "to": b,
            "changes": changes,
        });
        println!("{v}");
        return Ok(0);
    }
    for c in &changes {
        console.say(&format!("{} {}", c.what, c.path));
    }
    console.say(&format!("snapshot {a} to {b}: {} changes", changes.len()));
    Ok(0)
}

/// `check [SNAPSHOT...] [--read-data | --read-data-subset P%|N/M]`.
pub(super) async fn check(
    client: &Client,
    args: &CheckArgs,
    global: &GlobalArgs,
    console: &Console,
) -> Result<u8, Error> {
    if client.options().legacy || global.per_file {
        return Err(Error::Usage {
            detail: "check reads snapshots, in secure mode only".into(),
        });
    }
    let read = if args.read_data {
        Some(Subset::All)
    } else {
        args.read_data_subset
    };
    let summary = client.check(&args.snapshots, read).await?;
    let code = if summary.is_clean() {
        0
    } else {
        crate::error::ErrorKind::Verification.exit_code()
    };
    // The damage is what a check is run for: printed even with --quiet.
    for d in &summary.damage {
        console.print_error(&format!(
            "snapshot {}: {}: {}",
            d.snapshot, d.path, d.problem
        ));
    }
    if global.json {
        let mut v = serde_json::to_value(&summary).unwrap_or_default();
        v["ok"] = serde_json::json!(code == 0);
        v["exit_code"] = serde_json::json!(code);
        v["server"] = serde_json::json!(client.options().server);
        println!("{v}");
    } else {
        console.say(&check_line(&summary, &client.options().server));
    }
    Ok(code)
}

/// The one line that ends a check.
fn check_line(s: &CheckSummary, server: &str) -> String {
    let read = match &s.read_data {
        Some(which) => format!(
            "; read {} objects ({}, {} chosen){}",
            s.objects_read,
            size(s.bytes_read),
            which,
            if s.unchecked_objects > 0 {
                format!(
                    ", {} left unread after the server failed {} times",
                    s.unchecked_objects, s.server_failures
                )
            } else {
                String::new()
            }
        ),
        None => String::new(),
    };
    let found = if s.is_clean() {
        "no damage found".to_owned()
    } else {
        let list: Vec<String> = s.damaged_snapshots.iter().map(u64::to_string).collect();
        format!(
            "DAMAGE in {} snapshot{} ({}), {} path{}: {} objects missing, {} damaged, {} trees damaged",
            s.damaged_snapshots.len(),
            if s.damaged_snapshots.len() == 1 { "" } else { "s" },
            list.join(", "),
            s.damage.len(),
            if s.damage.len() == 1 { "" } else { "s" },
            s.missing_objects,
            s.damaged_objects,
            s.damaged_trees,
        )
    };
    format!(
        "checked {} snapshot{} on {server}: {} trees, {} objects held{read}; {found}",
        s.snapshots,
        if s.snapshots == 1 { "" } else { "s" },
        s.trees,
        s.objects - s.missing_objects.min(s.objects),
    )
}
