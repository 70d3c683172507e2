//! Operator commands (`backup-server clients|files|prune|remove-client|
//! append-only`; `scrub` is in [`crate::scrub`]): each opens the data directory, does one thing, and
//! writes a plain-text report.
//!
//! They may run while a server serves the same data directory: SQLite in
//! WAL mode lets them read beside it, and its busy timeout makes writes
//! wait for the server's short transactions. Each function here takes the
//! opened [`Storage`] and a writer, so the same code is tested without the
//! binary.

use std::io::Write;
use std::time::SystemTime;

use protocol::ClientId;

use crate::config::Quotas;
use crate::storage::prune::{PruneOptions, PruneReport};
use crate::storage::quota::format_size;
use crate::storage::{
    ClientSummary, QuotaSetting, Retention, Storage, StorageError, VersionRecord,
};

/// Entries fetched per metadata query when listing a client's files.
const PAGE: usize = 1024;

/// Why an operator command failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("no client with id or name {0:?}")]
    UnknownClient(String),
    #[error("prune needs a rule: --keep-last N and/or --keep-within DURATION (or keep_last / keep_within in the config file)")]
    NoRule,
    #[error("cannot write the report: {0}")]
    Output(#[from] std::io::Error),
}

/// Finds a client by its id (32 hex digits) or its name.
///
/// # Errors
/// [`AdminError::UnknownClient`] when neither matches.
pub fn find_client(storage: &Storage, text: &str) -> Result<ClientSummary, AdminError> {
    let all = storage.meta().clients()?;
    let by_id = ClientId::from_hex(text).ok();
    all.into_iter()
        .find(|c| Some(c.client.id) == by_id || c.client.name.as_bytes() == text.as_bytes())
        .ok_or_else(|| AdminError::UnknownClient(text.to_owned()))
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `YYYY-MM-DDTHH:MM:SSZ` (UTC, RFC 3339) for a point in time.
pub fn format_time(t: SystemTime) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    // humantime's formatter fails past the year 9999; a time a client
    // chose may lie there, and is shown as seconds instead.
    if write!(out, "{}", humantime::format_rfc3339_seconds(t)).is_err() {
        let secs = t
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        return format!("{secs}s after 1970");
    }
    out
}

/// A time given as Unix seconds (a snapshot's, chosen by its client), as
/// [`format_time`] shows it; one past what `SystemTime` holds as seconds.
pub fn format_unix(secs: u64) -> String {
    match std::time::UNIX_EPOCH.checked_add(std::time::Duration::from_secs(secs)) {
        Some(t) => format_time(t),
        None => format!("{secs}s after 1970"),
    }
}

fn version_line(v: &VersionRecord) -> String {
    format!(
        "{}\t{}\t{}\t{}\t{}",
        v.version,
        v.size,
        v.cksum,
        format_time(v.stored_at),
        lossy(v.file.as_bytes())
    )
}

/// One client as `clients` shows it (`--json`: one object each).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ClientView {
    pub id: String,
    pub name: String,
    pub append_only: bool,
    pub snapshots: u64,
    /// Bytes of its packs.
    pub stored_bytes: u64,
    /// What its quota is charged: its packs' bytes and its per-file
    /// versions' (`docs/PROTOCOL.md` §13.9).
    pub charged_bytes: u64,
    /// Over its snapshots, the sealed bytes each references (an object
    /// counts once per snapshot).
    pub logical_bytes: u64,
    /// `logical_bytes / stored_bytes`; `None` while nothing is stored.
    pub dedup_ratio: Option<f64>,
    /// The quota in force, `None` for none.
    pub quota_bytes: Option<u64>,
    /// Where it comes from: `client` (`backup-server quota`), `config`, or
    /// `none`.
    pub quota_source: &'static str,
    /// When its newest snapshot was committed (RFC 3339, UTC).
    pub last_backup: Option<String>,
    pub packs: u64,
    /// Per-file history (`--per-file`, legacy): names, versions and their
    /// plaintext bytes (charged to the quota as they are stored).
    pub files: u64,
    pub versions: u64,
    pub file_bytes: u64,
    pub last_seen: String,
}

/// The quota in force for `c` and where it comes from.
fn quota_of(c: &ClientSummary, quotas: &Quotas) -> (Option<u64>, &'static str) {
    let configured = quotas.of(c.client.id, &lossy(c.client.name.as_bytes()));
    let quota = c.client.quota.effective(configured);
    let source = match (c.client.quota, quota) {
        (_, None) => "none",
        (QuotaSetting::Inherit, Some(_)) => "config",
        _ => "client",
    };
    (quota, source)
}

/// Every client with what it stores (`clients`).
///
/// # Errors
/// On a storage failure.
pub fn client_views(storage: &Storage, quotas: &Quotas) -> Result<Vec<ClientView>, AdminError> {
    let repo: std::collections::HashMap<ClientId, crate::storage::RepoUsage> = storage
        .repo()?
        .repo_usage()?
        .into_iter()
        .map(|u| (u.client, u))
        .collect();
    Ok(storage
        .meta()
        .clients()?
        .into_iter()
        .map(|c| {
            let usage = repo.get(&c.client.id).cloned().unwrap_or_default();
            let (quota_bytes, quota_source) = quota_of(&c, quotas);
            ClientView {
                id: c.client.id.to_string(),
                name: lossy(c.client.name.as_bytes()),
                append_only: c.client.append_only,
                snapshots: usage.snapshots,
                stored_bytes: usage.stored,
                charged_bytes: usage.stored.saturating_add(c.bytes),
                logical_bytes: usage.logical,
                dedup_ratio: (usage.stored > 0).then(|| usage.logical as f64 / usage.stored as f64),
                quota_bytes,
                quota_source,
                last_backup: usage.last_snapshot.map(format_time),
                packs: usage.packs,
                files: c.files,
                versions: c.versions,
                file_bytes: c.bytes,
                last_seen: format_time(c.client.last_seen),
            }
        })
        .collect())
}

/// Writes `rows` under `head` in columns two spaces apart, numbers (the
/// columns flagged in `right`) aligned right.
fn table(
    out: &mut impl Write,
    head: &[&str],
    right: &[bool],
    rows: &[Vec<String>],
) -> std::io::Result<()> {
    let mut widths: Vec<usize> = head.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let head: Vec<String> = head.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&head).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            let w = widths.get(i).copied().unwrap_or(0);
            if i > 0 {
                line.push_str("  ");
            }
            if right.get(i).copied().unwrap_or(false) {
                line.push_str(&format!("{cell:>w$}"));
            } else {
                line.push_str(&format!("{cell:<w$}"));
            }
        }
        writeln!(out, "{}", line.trim_end())?;
    }
    Ok(())
}

/// `clients [--json]`: one line per client (or a JSON array): snapshots,
/// stored and logical bytes, dedup ratio, quota, last backup, and the
/// per-file history.
///
/// # Errors
/// On a storage or output failure.
pub fn clients(
    storage: &Storage,
    quotas: &Quotas,
    json: bool,
    out: &mut impl Write,
) -> Result<(), AdminError> {
    let views = client_views(storage, quotas)?;
    if json {
        serde_json::to_writer_pretty(&mut *out, &views).map_err(std::io::Error::from)?;
        writeln!(out)?;
        return Ok(());
    }
    let rows: Vec<Vec<String>> = views
        .iter()
        .map(|v| {
            vec![
                v.name.clone(),
                v.id.clone(),
                v.snapshots.to_string(),
                format_size(v.stored_bytes),
                format_size(v.logical_bytes),
                v.dedup_ratio
                    .map_or_else(|| "-".into(), |r| format!("{r:.2}x")),
                match (v.quota_bytes, v.quota_source) {
                    (Some(q), "client") => format!("{} (own)", format_size(q)),
                    (Some(q), _) => format_size(q),
                    (None, _) => "none".into(),
                },
                v.last_backup.clone().unwrap_or_else(|| "-".into()),
                v.files.to_string(),
                v.versions.to_string(),
                format_size(v.file_bytes),
                if v.append_only { "yes" } else { "no" }.into(),
                v.last_seen.clone(),
            ]
        })
        .collect();
    table(
        out,
        &[
            "NAME",
            "ID",
            "SNAPSHOTS",
            "STORED",
            "LOGICAL",
            "DEDUP",
            "QUOTA",
            "LAST BACKUP",
            "FILES",
            "VERSIONS",
            "FILE BYTES",
            "APPEND-ONLY",
            "LAST SEEN",
        ],
        &[
            false, false, true, true, true, true, true, false, true, true, true, false, false,
        ],
        &rows,
    )?;
    Ok(())
}

/// One snapshot as `snapshots CLIENT` shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SnapshotView {
    pub id: u64,
    /// The time the client gave it (RFC 3339, UTC).
    pub time: String,
    /// When the server committed it.
    pub committed: String,
    pub objects: u64,
    pub logical_bytes: u64,
    /// Bytes of the objects no other snapshot of the client references.
    pub unique_bytes: u64,
}

/// `snapshots CLIENT [--json]`: one line per snapshot (or a JSON array).
///
/// # Errors
/// On an unknown client, a storage or an output failure.
pub fn snapshots(
    storage: &Storage,
    client: &str,
    json: bool,
    out: &mut impl Write,
) -> Result<(), AdminError> {
    let c = find_client(storage, client)?;
    let views: Vec<SnapshotView> = storage
        .repo()?
        .snapshot_usage(c.client.id)?
        .into_iter()
        .map(|s| SnapshotView {
            id: s.id,
            time: format_unix(s.time),
            committed: format_time(s.committed_at),
            objects: s.objects,
            logical_bytes: s.logical,
            unique_bytes: s.unique,
        })
        .collect();
    if json {
        serde_json::to_writer_pretty(&mut *out, &views).map_err(std::io::Error::from)?;
        writeln!(out)?;
        return Ok(());
    }
    let rows: Vec<Vec<String>> = views
        .iter()
        .map(|s| {
            vec![
                s.id.to_string(),
                s.time.clone(),
                s.objects.to_string(),
                format_size(s.logical_bytes),
                format_size(s.unique_bytes),
                s.committed.clone(),
            ]
        })
        .collect();
    table(
        out,
        &["ID", "TIME", "OBJECTS", "LOGICAL", "UNIQUE", "COMMITTED"],
        &[true, false, true, true, true, false],
        &rows,
    )?;
    Ok(())
}

/// `quota CLIENT [SIZE|none|default]`: sets the client's own quota
/// (`None` only shows it), then says what is in force and what it stores.
///
/// # Errors
/// On an unknown client, a storage or output failure.
pub fn quota(
    storage: &Storage,
    quotas: &Quotas,
    client: &str,
    set: Option<QuotaSetting>,
    out: &mut impl Write,
) -> Result<(), AdminError> {
    let mut c = find_client(storage, client)?;
    let before = quota_of(&c, quotas);
    if let Some(setting) = set {
        if !storage.meta().set_quota(c.client.id, setting)? {
            return Err(AdminError::UnknownClient(client.to_owned()));
        }
        c.client.quota = setting;
    }
    let (quota, source) = quota_of(&c, quotas);
    let stored = storage.repo()?.usage(c.client.id, None)?.stored;
    let describe = |(q, source): (Option<u64>, &str)| match q {
        None => "none".to_owned(),
        Some(q) => format!("{} ({q} bytes, {source})", format_size(q)),
    };
    let mut line = format!(
        "client {} ({}): quota {}",
        c.client.id,
        lossy(c.client.name.as_bytes()),
        describe((quota, source))
    );
    if set.is_some() {
        line.push_str(&format!(" (was {})", describe(before)));
    }
    line.push_str(&format!(
        "; stores {} ({stored} bytes)",
        format_size(stored)
    ));
    writeln!(out, "{line}")?;
    Ok(())
}

/// `files CLIENT [--versions]`: the newest version of each name, or every
/// version, ordered by name then version.
///
/// # Errors
/// On an unknown client, a storage or an output failure.
pub fn files(
    storage: &Storage,
    client: &str,
    all_versions: bool,
    out: &mut impl Write,
) -> Result<(), AdminError> {
    let c = find_client(storage, client)?;
    writeln!(out, "version\tsize\tcksum\tstored\tname")?;
    let mut offset = 0u64;
    loop {
        let page = storage
            .meta()
            .list(c.client.id, all_versions, offset, PAGE)?;
        for v in &page {
            writeln!(out, "{}", version_line(v))?;
        }
        if page.len() < PAGE {
            return Ok(());
        }
        offset += page.len() as u64;
    }
}

/// `prune`: applies `retention` to every client and name; lists what was
/// removed. Returns the removed versions.
///
/// # Errors
/// [`AdminError::NoRule`] when `retention` keeps everything; a storage or
/// output failure.
pub fn prune(
    storage: &Storage,
    retention: &Retention,
    out: &mut impl Write,
) -> Result<Vec<VersionRecord>, AdminError> {
    if retention.keeps_everything() {
        return Err(AdminError::NoRule);
    }
    let removed = storage.prune(retention, SystemTime::now())?;
    for v in &removed {
        writeln!(out, "removed\t{}\t{}", v.client, version_line(v))?;
    }
    // One log line per client, with its id and never a file name
    // (docs/SECURITY.md).
    let mut per_client: std::collections::BTreeMap<String, (usize, u64)> =
        std::collections::BTreeMap::new();
    for v in &removed {
        let e = per_client.entry(v.client.to_string()).or_default();
        e.0 += 1;
        e.1 += v.size;
    }
    for (client_id, (versions, bytes)) in &per_client {
        tracing::info!(%client_id, versions, bytes, "pruned");
    }
    let bytes: u64 = removed.iter().map(|v| v.size).sum();
    writeln!(out, "pruned {} versions, {bytes} bytes", removed.len())?;
    Ok(removed)
}

/// `prune`: applies to each client's snapshots its policy in `retention`,
/// by their times, one line per snapshot forgotten (or, with `dry_run`,
/// that would be).
///
/// # Errors
/// On a storage or output failure.
pub fn forget_by_policy(
    storage: &Storage,
    retention: &crate::config::SnapshotRetention,
    dry_run: bool,
    out: &mut impl Write,
) -> Result<u64, AdminError> {
    let names: std::collections::HashMap<ClientId, String> = storage
        .meta()
        .clients()?
        .into_iter()
        .map(|c| (c.client.id, lossy(c.client.name.as_bytes())))
        .collect();
    let gone = storage.forget_by_policy(
        |id| {
            let name = names.get(&id).map_or("", String::as_str);
            retention.of(id, name).cloned()
        },
        dry_run,
    )?;
    let verb = if dry_run { "would forget" } else { "forgot" };
    let mut n = 0;
    for (client, ids) in gone {
        for id in ids {
            writeln!(out, "{verb}\t{client}\tsnapshot {id}")?;
            n += 1;
        }
    }
    writeln!(out, "snapshots: {verb} {n}")?;
    Ok(n)
}

/// `prune`'s second half: collects the repository's garbage under the
/// maintenance lock (the data directory's, and the repository's on shared
/// metadata; `docs/PROTOCOL.md` §13.7), waiting
/// for another prune or a starting server's recovery to release it, and
/// says what it reclaimed, or with `dry_run` what it would.
///
/// # Errors
/// On a storage or output failure.
pub fn prune_repo(
    storage: &Storage,
    data_dir: &std::path::Path,
    options: &PruneOptions,
    out: &mut impl Write,
) -> Result<PruneReport, AdminError> {
    let _lock = storage.maintenance_lock(data_dir, true)?;
    let r = storage.prune_repo(options, SystemTime::now())?;
    let (label, delete, remove, repack, reclaim) = if options.dry_run {
        (
            "repository (dry run)",
            "would delete",
            "would remove",
            "would repack",
            "would reclaim",
        )
    } else {
        ("repository", "deleted", "removed", "repacked", "reclaimed")
    };
    writeln!(
        out,
        "{label}: {delete} {} objects ({} bytes); {remove} {} packs ({} bytes); \
         {repack} {} packs ({} -> {} bytes); {reclaim} {} bytes",
        r.objects,
        r.object_bytes,
        r.packs_removed,
        r.pack_bytes_removed,
        r.packs_repacked,
        r.repacked_from,
        r.repacked_to,
        r.reclaimed_bytes()
    )?;
    Ok(r)
}

/// `remove-client CLIENT`: removes its rows and blobs.
///
/// # Errors
/// On an unknown client, a storage or output failure.
pub fn remove_client(
    storage: &Storage,
    client: &str,
    out: &mut impl Write,
) -> Result<(), AdminError> {
    let c = find_client(storage, client)?;
    let removed = storage
        .remove_client(c.client.id)?
        .ok_or_else(|| AdminError::UnknownClient(client.to_owned()))?;
    writeln!(
        out,
        "removed client {} ({}): {} versions, {} bytes",
        c.client.id,
        lossy(c.client.name.as_bytes()),
        removed.len(),
        removed.iter().map(|v| v.size).sum::<u64>()
    )?;
    Ok(())
}

/// `append-only CLIENT on|off`.
///
/// # Errors
/// On an unknown client, a storage or output failure.
pub fn set_append_only(
    storage: &Storage,
    client: &str,
    on: bool,
    out: &mut impl Write,
) -> Result<(), AdminError> {
    let c = find_client(storage, client)?;
    if !storage.meta().set_append_only(c.client.id, on)? {
        return Err(AdminError::UnknownClient(client.to_owned()));
    }
    writeln!(
        out,
        "client {} ({}): append-only {} (was {})",
        c.client.id,
        lossy(c.client.name.as_bytes()),
        if on { "on" } else { "off" },
        if c.client.append_only { "on" } else { "off" }
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn formats_times_as_utc_dates() {
        assert_eq!(format_time(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        // Times a client may choose never panic, however far out.
        assert_eq!(format_unix(u64::MAX), format!("{}s after 1970", u64::MAX));
        assert_eq!(format_unix(253_402_300_800), "253402300800s after 1970");
        assert_eq!(format_unix(0), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_709_210_096);
        assert_eq!(format_time(t), "2024-02-29T12:34:56Z");
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(format_time(t), "2000-02-29T00:00:00Z");
    }
}
