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

use crate::storage::prune::{MaintenanceLock, PruneOptions, PruneReport};
use crate::storage::{ClientSummary, Retention, Storage, StorageError, VersionRecord};

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
    humantime::format_rfc3339_seconds(t).to_string()
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

/// `clients`: one line per client.
///
/// # Errors
/// On a storage or output failure.
pub fn clients(storage: &Storage, out: &mut impl Write) -> Result<(), AdminError> {
    writeln!(
        out,
        "id\tname\tappend-only\tfiles\tversions\tbytes\tlast-seen"
    )?;
    for c in storage.meta().clients()? {
        writeln!(
            out,
            "{}\t{}\t{}\t{}\t{}\t{}\t{}",
            c.client.id,
            lossy(c.client.name.as_bytes()),
            if c.client.append_only { "yes" } else { "no" },
            c.files,
            c.versions,
            c.bytes,
            format_time(c.client.last_seen)
        )?;
    }
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
/// data directory's maintenance lock (`docs/PROTOCOL.md` §13.7), waiting
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
    let _lock = MaintenanceLock::take(data_dir, true)?;
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
        let t = UNIX_EPOCH + Duration::from_secs(1_709_210_096);
        assert_eq!(format_time(t), "2024-02-29T12:34:56Z");
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(format_time(t), "2000-02-29T00:00:00Z");
    }
}
