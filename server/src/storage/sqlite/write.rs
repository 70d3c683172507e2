//! Writes shared by several operations: version queries, inserting a
//! version with its retention, batch failure.

use super::*;

pub(super) fn query_versions(
    conn: &Connection,
    filter: &str,
    params: &[&dyn rusqlite::ToSql],
) -> Result<Vec<VersionRecord>, StorageError> {
    let sql = format!(
        "SELECT {VERSION_COLUMNS} FROM versions v JOIN files f ON f.id = v.file_id {filter}"
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt.query_and_then(params, version)?;
    rows.collect()
}

pub(super) fn u64_to_sql(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Removes the versions of one file that [`versions_to_remove`] selects;
/// returns them.
pub(super) fn apply_retention(
    tx: &Connection,
    versions: Vec<VersionRecord>,
    retention: &Retention,
    append_only: bool,
    now: SystemTime,
) -> Result<Vec<VersionRecord>, StorageError> {
    let stamps: Vec<VersionStamp> = versions
        .iter()
        .map(|v| VersionStamp {
            number: v.version,
            stored_at: v.stored_at,
        })
        .collect();
    let doomed = versions_to_remove(&stamps, retention, append_only, now);
    let mut dropped = Vec::with_capacity(doomed.len());
    for v in versions {
        if doomed.binary_search(&v.version).is_ok() {
            tx.execute("DELETE FROM versions WHERE id = ?1", [v.version])?;
            dropped.push(v);
        }
    }
    Ok(dropped)
}

/// Inserts version `v` (and its file row if new) and applies `retention`
/// to its name, inside the caller's transaction; returns the blobs of the
/// versions dropped.
pub(super) fn insert_version(
    conn: &Connection,
    v: &NewVersion,
    retention: &Retention,
) -> Result<Vec<BlobKey>, StorageError> {
    let client = &v.client.0[..];
    conn.prepare_cached(
        "INSERT INTO files (client_id, name) VALUES (?1, ?2) ON CONFLICT (client_id, name) DO NOTHING",
    )?
    .execute(params![client, v.file.as_bytes()])?;
    let file_id: i64 = conn
        .prepare_cached("SELECT id FROM files WHERE client_id = ?1 AND name = ?2")?
        .query_row(params![client, v.file.as_bytes()], |r| r.get(0))?;
    conn.prepare_cached(
        "INSERT INTO versions (file_id, blob, size, content_size, cksum, sha256, verified, stored_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, 1, ?7)",
    )?
    .execute(params![
            file_id,
            v.blob.0,
            size_to_sql(v.size)?,
            size_to_sql(v.content_size)?,
            i64::from(v.cksum),
            &v.sha256[..],
            to_ms(v.stored_at)
        ])?;
    // (The append-only flag is only looked up when a rule could remove.)
    let superseded = if retention.keeps_everything() {
        Vec::new()
    } else {
        let append_only = is_append_only(conn, v.client)?;
        let versions =
            query_versions(conn, "WHERE v.file_id = ?1 ORDER BY v.id DESC", &[&file_id])?;
        apply_retention(conn, versions, retention, append_only, v.stored_at)?
    };
    conn.prepare_cached("UPDATE clients SET last_seen = ?2 WHERE id = ?1")?
        .execute(params![client, to_ms(v.stored_at)])?;
    Ok(superseded.into_iter().map(|v| v.blob).collect())
}

/// The result of every member of a batch whose transaction failed.
pub(super) fn batch_failed<T>(n: usize, cause: &StorageError) -> Vec<Result<T, StorageError>> {
    (0..n)
        .map(|_| Err(StorageError::Batch(cause.to_string())))
        .collect()
}
