//! [`MetaStore`](crate::storage::MetaStore) on PostgreSQL.
//!
//! The SQLite implementation (`sqlite.rs`, `sqlite/write.rs`) statement by
//! statement, over the tables of `schema.rs`. Every method is one
//! `SERIALIZABLE` transaction ([`transaction!`]), reads included: a read
//! sees one snapshot and survives a reconnection like a write. Where
//! SQLite relies on its single writer (one winner of a name, retention
//! against a concurrent commit), the serializable order gives the same
//! outcome, at the price of a retry.

use std::time::{Duration, SystemTime};

use protocol::message::{PublicKeyField, PUBLIC_KEY_FIELD_LEN};
use protocol::{ClientId, FileName, UserName};
use tokio_postgres::types::{FromSql, ToSql};
use tokio_postgres::{Row, Transaction};

use super::{
    from_millis, is_connection_lost, is_serialization_failure, millis, pg_error, to_i64, to_u64,
    transaction, Fail, PgMetaStore,
};
use crate::storage::{
    versions_to_remove, BlobKey, ClientRecord, ClientSummary, Deletion, MetaStore, NewVersion,
    PendingVersion, QuotaSetting, QuotaUsage, Registration, Retention, StorageError, VersionRecord,
    VersionStamp,
};

/// Statement parameters as `tokio-postgres` takes them.
type Params<'a> = [&'a (dyn ToSql + Sync)];

/// The columns [`version`] reads, in order (`v`: versions, `f`: files).
const VERSION_COLUMNS: &str =
    "v.id, f.client_id, f.name, v.blob, v.size, v.content_size, v.cksum, v.sha256, v.verified, v.stored_at";

/// The columns [`client`] reads, in order.
const CLIENT_COLUMNS: &str =
    "id, name, public_key, registered, last_seen, append_only, secure_key, completed_at, quota";

/// The first column after [`CLIENT_COLUMNS`] in a query that selects them
/// first.
const CLIENT_NEXT: usize = 9;

/// The savepoint each member of [`MetaStore::add_versions`] runs in.
const MEMBER: &str = "batch_member";

fn corrupt(what: &str) -> StorageError {
    StorageError::Corrupt(what.to_owned())
}

/// Column `i` of `row`: a value of another type than expected is a
/// corrupt row, not a lost connection (which is what an error without a
/// SQLSTATE would otherwise be taken for).
fn get<'a, T: FromSql<'a>>(row: &'a Row, i: usize) -> Result<T, StorageError> {
    row.try_get(i)
        .map_err(|e| StorageError::Corrupt(format!("column {i}: {e}")))
}

/// A non-negative `bigint` column as `u64`.
fn unsigned(row: &Row, i: usize, what: &str) -> Result<u64, StorageError> {
    to_u64(get(row, i)?, what)
}

fn client_id(bytes: &[u8]) -> Result<ClientId, StorageError> {
    bytes
        .try_into()
        .map(ClientId)
        .map_err(|_| corrupt("a client id is not 16 bytes"))
}

/// A count or position the caller gives as `u64`, clamped to `bigint`
/// (as SQLite's version does: no row lies that far).
fn clamp(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The one mapper of a versions row ([`VERSION_COLUMNS`]): read and
/// validated.
fn version(row: &Row) -> Result<VersionRecord, StorageError> {
    let name: Vec<u8> = get(row, 2)?;
    let sha256: &[u8] = get(row, 7)?;
    Ok(VersionRecord {
        version: get(row, 0)?,
        client: client_id(get(row, 1)?)?,
        file: FileName::new(name).map_err(|_| corrupt("a file name is invalid"))?,
        blob: BlobKey(get(row, 3)?),
        size: unsigned(row, 4, "size")?,
        content_size: unsigned(row, 5, "content size")?,
        cksum: u32::try_from(get::<i64>(row, 6)?)
            .map_err(|_| corrupt("a cksum is out of range"))?,
        sha256: sha256
            .try_into()
            .map_err(|_| corrupt("a SHA-256 is not 32 bytes"))?,
        verified: get(row, 8)?,
        stored_at: from_millis(get(row, 9)?),
    })
}

/// A client's own quota as its `quota` column keeps it (NULL, -1, bytes).
fn quota_from_sql(value: Option<i64>) -> Result<QuotaSetting, StorageError> {
    Ok(match value {
        None => QuotaSetting::Inherit,
        Some(-1) => QuotaSetting::Unlimited,
        Some(n) => QuotaSetting::Bytes(to_u64(n, "quota")?),
    })
}

fn quota_to_sql(quota: QuotaSetting) -> Result<Option<i64>, StorageError> {
    Ok(match quota {
        QuotaSetting::Inherit => None,
        QuotaSetting::Unlimited => Some(-1),
        QuotaSetting::Bytes(n) => Some(to_i64(n, "quota")?),
    })
}

/// The one mapper of a clients row ([`CLIENT_COLUMNS`]): read and
/// validated.
fn client(row: &Row) -> Result<ClientRecord, StorageError> {
    let public_key = match get::<Option<&[u8]>>(row, 2)? {
        None => None,
        Some(k) => {
            let field: [u8; PUBLIC_KEY_FIELD_LEN] = k
                .try_into()
                .map_err(|_| corrupt("a public key is not 160 bytes"))?;
            Some(PublicKeyField(field))
        }
    };
    let name: Vec<u8> = get(row, 1)?;
    Ok(ClientRecord {
        id: client_id(get(row, 0)?)?,
        name: UserName::new(name).map_err(|_| corrupt("a client name is invalid"))?,
        public_key,
        registered: from_millis(get(row, 3)?),
        last_seen: from_millis(get(row, 4)?),
        append_only: get(row, 5)?,
        secure_key: get(row, 6)?,
        completed_at: get::<Option<i64>>(row, 7)?.map(from_millis),
        quota: quota_from_sql(get(row, 8)?)?,
    })
}

/// A clients row ([`CLIENT_COLUMNS`]) followed by its number of files,
/// versions and bytes.
fn client_summary(row: &Row) -> Result<ClientSummary, StorageError> {
    Ok(ClientSummary {
        client: client(row)?,
        files: unsigned(row, CLIENT_NEXT, "total")?,
        versions: unsigned(row, CLIENT_NEXT + 1, "total")?,
        bytes: unsigned(row, CLIENT_NEXT + 2, "total")?,
    })
}

/// The one mapper of a (blob key, size) row, from `versions` or
/// `inline_blobs`.
fn blob_size(row: &Row) -> Result<(BlobKey, u64), StorageError> {
    Ok((BlobKey(get(row, 0)?), unsigned(row, 1, "size")?))
}

/// The versions rows `filter` (a WHERE / ORDER BY / LIMIT tail over
/// `versions v JOIN files f`) selects.
async fn query_versions(
    tx: &Transaction<'_>,
    filter: &str,
    params: &Params<'_>,
) -> Result<Vec<VersionRecord>, Fail> {
    let sql = format!(
        "SELECT {VERSION_COLUMNS} FROM versions v JOIN files f ON f.id = v.file_id {filter}"
    );
    let rows = tx.query(&sql, params).await?;
    Ok(rows.iter().map(version).collect::<Result<_, _>>()?)
}

/// A page of `(key, size)` by key: `sql` with `$1` the key to start after
/// and `$2` the limit.
async fn keys_after(
    tx: &Transaction<'_>,
    sql: &str,
    after: Option<&BlobKey>,
    limit: usize,
) -> Result<Vec<(BlobKey, u64)>, Fail> {
    // Every key sorts after the empty string.
    let after = after.map_or("", |k| k.0.as_str());
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let rows = tx.query(sql, &[&after, &limit]).await?;
    Ok(rows.iter().map(blob_size).collect::<Result<_, _>>()?)
}

async fn is_append_only(tx: &Transaction<'_>, id: ClientId) -> Result<bool, Fail> {
    let row = tx
        .query_opt(
            "SELECT append_only FROM clients WHERE id = $1",
            &[&&id.0[..]],
        )
        .await?;
    Ok(match row {
        Some(row) => get(&row, 0)?,
        None => false,
    })
}

/// Whether a client that registered at `registered` (unix ms) and never
/// completed is stale at `now` (unix ms) after `grace`: a clock that went
/// back makes nothing stale.
fn stale(registered: i64, now: i64, grace: Duration) -> bool {
    let grace = i64::try_from(grace.as_millis()).unwrap_or(i64::MAX);
    now.checked_sub(registered).is_some_and(|age| age >= grace)
}

/// Removes the versions of one file that [`versions_to_remove`] selects;
/// returns them.
async fn apply_retention(
    tx: &Transaction<'_>,
    versions: Vec<VersionRecord>,
    retention: &Retention,
    append_only: bool,
    now: SystemTime,
) -> Result<Vec<VersionRecord>, Fail> {
    let stamps: Vec<VersionStamp> = versions
        .iter()
        .map(|v| VersionStamp {
            number: v.version,
            stored_at: v.stored_at,
        })
        .collect();
    let doomed = versions_to_remove(&stamps, retention, append_only, now);
    if doomed.is_empty() {
        return Ok(Vec::new());
    }
    // The trigger takes inline content with each row.
    tx.execute("DELETE FROM versions WHERE id = ANY($1)", &[&doomed])
        .await?;
    Ok(versions
        .into_iter()
        .filter(|v| doomed.binary_search(&v.version).is_ok())
        .collect())
}

/// Inserts version `v` (and its file row if new) and applies `retention`
/// to its name, inside the caller's transaction; returns the blobs of the
/// versions dropped.
async fn insert_version(
    tx: &Transaction<'_>,
    v: &NewVersion,
    retention: &Retention,
) -> Result<Vec<BlobKey>, Fail> {
    let client = &v.client.0[..];
    let name = v.file.as_bytes();
    tx.execute(
        "INSERT INTO files (client_id, name) VALUES ($1, $2) ON CONFLICT (client_id, name) DO NOTHING",
        &[&client, &name],
    )
    .await?;
    let row = tx
        .query_one(
            "SELECT id FROM files WHERE client_id = $1 AND name = $2",
            &[&client, &name],
        )
        .await?;
    let file_id: i64 = get(&row, 0)?;
    tx.execute(
        "INSERT INTO versions (file_id, blob, size, content_size, cksum, sha256, verified, stored_at)
         VALUES ($1, $2, $3, $4, $5, $6, true, $7)",
        &[
            &file_id,
            &v.blob.0,
            &to_i64(v.size, "size")?,
            &to_i64(v.content_size, "content size")?,
            &i64::from(v.cksum),
            &&v.sha256[..],
            &millis(v.stored_at),
        ],
    )
    .await?;
    // (The append-only flag is only looked up when a rule could remove.)
    let superseded = if retention.keeps_everything() {
        Vec::new()
    } else {
        let append_only = is_append_only(tx, v.client).await?;
        let versions =
            query_versions(tx, "WHERE v.file_id = $1 ORDER BY v.id DESC", &[&file_id]).await?;
        apply_retention(tx, versions, retention, append_only, v.stored_at).await?
    };
    tx.execute(
        "UPDATE clients SET last_seen = $2 WHERE id = $1",
        &[&client, &millis(v.stored_at)],
    )
    .await?;
    Ok(superseded.into_iter().map(|v| v.blob).collect())
}

/// One member of [`MetaStore::add_versions`], inside its savepoint.
async fn insert_member(
    tx: &deadpool_postgres::Transaction<'_>,
    pending: &PendingVersion,
) -> Result<Vec<BlobKey>, Fail> {
    let client = pending.version.client;
    let before = super::repo::usage_in(tx, client, pending.quota).await?;
    if let Some(content) = &pending.inline {
        tx.execute(
            "INSERT INTO inline_blobs (blob, content) VALUES ($1, $2)",
            &[&pending.version.blob.0, content],
        )
        .await?;
    }
    let superseded = insert_version(tx, &pending.version, &pending.retention).await?;
    if before.quota.is_some() {
        // The caller rolls the member back on an error.
        let after = super::repo::usage_in(tx, client, pending.quota).await?;
        QuotaUsage::admits(before, after, pending.version.size)?;
    }
    Ok(superseded)
}

/// Removes the repository's rows of client `id` (as SQLite's
/// `repo::remove_client_rows`), inside the caller's transaction.
async fn remove_client_rows(tx: &Transaction<'_>, id: ClientId) -> Result<(), Fail> {
    let client = &id.0[..];
    tx.execute(
        "DELETE FROM snapshot_refs WHERE snapshot IN (SELECT id FROM snapshots WHERE client = $1)",
        &[&client],
    )
    .await?;
    tx.execute("DELETE FROM snapshots WHERE client = $1", &[&client])
        .await?;
    tx.execute("DELETE FROM objects WHERE client = $1", &[&client])
        .await?;
    tx.execute("DELETE FROM packs WHERE client = $1", &[&client])
        .await?;
    tx.execute("DELETE FROM key_envelopes WHERE client = $1", &[&client])
        .await?;
    Ok(())
}

/// The result of every member of a batch whose transaction failed.
fn batch_failed<T>(n: usize, cause: &StorageError) -> Vec<Result<T, StorageError>> {
    (0..n)
        .map(|_| Err(StorageError::Batch(cause.to_string())))
        .collect()
}

/// How long a readiness probe waits for PostgreSQL.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

impl MetaStore for PgMetaStore {
    /// One `SELECT 1` on a pooled connection, tried once: a readiness
    /// probe answers now, rather than wait out a reconnection as a
    /// transaction does.
    fn probe(&self) -> Result<(), StorageError> {
        const OP: &str = "probe the PostgreSQL database";
        // Bounded: a database that accepts but never answers (stopped,
        // or a cut network) must make the server not ready, not hold the
        // readiness check and a pooled connection for ever.
        self.run(async {
            let probe = async {
                let conn = self.connection(OP).await?;
                conn.query_one("SELECT 1", &[])
                    .await
                    .map_err(|e| pg_error(OP, e))?;
                Ok(())
            };
            tokio::time::timeout(PROBE_TIMEOUT, probe)
                .await
                .map_err(|_| StorageError::Unavailable {
                    op: OP,
                    source: format!("no answer within {PROBE_TIMEOUT:?}").into(),
                })?
        })
    }

    /// Under `SERIALIZABLE`, of two registrations racing for a name (free
    /// or stale) one commits and the other is retried, reads the winner's
    /// row and answers [`Registration::NameTaken`]; `ON CONFLICT (name)`
    /// keeps a racing insert from surfacing as a unique violation.
    fn register_client(
        &self,
        id: ClientId,
        name: &UserName,
        secure_key: Option<&[u8]>,
        now: SystemTime,
        grace: Option<Duration>,
    ) -> Result<Registration, StorageError> {
        let now = millis(now);
        transaction!(self, "register a client", |tx| {
            let holder = tx
                .query_opt(
                    "SELECT id, completed_at, registered,
                            EXISTS (SELECT 1 FROM files WHERE files.client_id = clients.id)
                     FROM clients WHERE name = $1",
                    &[&name.as_bytes()],
                )
                .await?;
            let outcome = match holder {
                None => Registration::Created,
                Some(row) => {
                    let stale_id: Vec<u8> = get(&row, 0)?;
                    let completed: Option<i64> = get(&row, 1)?;
                    let registered: i64 = get(&row, 2)?;
                    let has_files: bool = get(&row, 3)?;
                    if completed.is_none()
                        && !has_files
                        && grace.is_some_and(|g| stale(registered, now, g))
                    {
                        tx.execute("DELETE FROM clients WHERE id = $1", &[&stale_id])
                            .await?;
                        Registration::Replaced {
                            stale: client_id(&stale_id)?,
                        }
                    } else {
                        return Ok(Registration::NameTaken);
                    }
                }
            };
            let inserted = tx
                .execute(
                    "INSERT INTO clients (id, name, public_key, registered, last_seen, secure_key)
                     VALUES ($1, $2, NULL, $3, $3, $4)
                     ON CONFLICT (name) DO NOTHING",
                    &[&&id.0[..], &name.as_bytes(), &now, &secure_key],
                )
                .await?;
            if inserted == 0 {
                // Only a row this transaction saw can conflict without a
                // serialization failure, and then it answered above.
                return Ok(Registration::NameTaken);
            }
            Ok(outcome)
        })
    }

    fn complete(&self, id: ClientId, now: SystemTime) -> Result<bool, StorageError> {
        transaction!(self, "complete a registration", |tx| {
            // Read first: completing a client that already has is no
            // write at each of its later authentications.
            let row = tx
                .query_opt(
                    "SELECT completed_at IS NOT NULL FROM clients WHERE id = $1",
                    &[&&id.0[..]],
                )
                .await?;
            let Some(row) = row else {
                return Ok(false);
            };
            if !get::<bool>(&row, 0)? {
                tx.execute(
                    "UPDATE clients SET completed_at = $2 WHERE id = $1",
                    &[&&id.0[..], &millis(now)],
                )
                .await?;
            }
            Ok(true)
        })
    }

    fn set_public_key(
        &self,
        id: ClientId,
        key: &PublicKeyField,
        now: SystemTime,
    ) -> Result<bool, StorageError> {
        transaction!(self, "store a public key", |tx| {
            let n = tx
                .execute(
                    "UPDATE clients SET public_key = $2, last_seen = $3,
                            completed_at = coalesce(completed_at, $3)
                     WHERE id = $1",
                    &[&&id.0[..], &&key.0[..], &millis(now)],
                )
                .await?;
            Ok(n > 0)
        })
    }

    fn client(&self, id: ClientId) -> Result<Option<ClientRecord>, StorageError> {
        transaction!(self, "read a client", |tx| {
            let row = tx
                .query_opt(
                    &format!("SELECT {CLIENT_COLUMNS} FROM clients WHERE id = $1"),
                    &[&&id.0[..]],
                )
                .await?;
            Ok(row.as_ref().map(client).transpose()?)
        })
    }

    fn touch(&self, id: ClientId, now: SystemTime) -> Result<(), StorageError> {
        transaction!(self, "touch a client", |tx| {
            tx.execute(
                "UPDATE clients SET last_seen = $2 WHERE id = $1",
                &[&&id.0[..], &millis(now)],
            )
            .await?;
            Ok(())
        })
    }

    fn add_version(
        &self,
        v: &NewVersion,
        retention: &Retention,
    ) -> Result<Vec<BlobKey>, StorageError> {
        transaction!(self, "record a version", |tx| {
            insert_version(&tx, v, retention).await
        })
    }

    /// One transaction for the whole batch; each version in a savepoint of
    /// its own, so that one that fails is rolled back alone. A
    /// serialization failure or a lost connection in any member runs the
    /// whole batch again; a transaction that fails for good fails every
    /// member.
    fn add_versions(&self, batch: &[PendingVersion]) -> Vec<Result<Vec<BlobKey>, StorageError>> {
        const OP: &str = "record a version";
        let outcome = transaction!(self, "record versions", |tx| {
            let mut results = Vec::with_capacity(batch.len());
            for pending in batch {
                tx.batch_execute(&format!("SAVEPOINT {MEMBER}")).await?;
                match insert_member(&tx, pending).await {
                    Ok(superseded) => {
                        tx.batch_execute(&format!("RELEASE SAVEPOINT {MEMBER}"))
                            .await?;
                        results.push(Ok(superseded));
                    }
                    Err(Fail::Pg(e)) if is_serialization_failure(&e) || is_connection_lost(&e) => {
                        return Err(Fail::Pg(e));
                    }
                    Err(fail) => {
                        tx.batch_execute(&format!(
                            "ROLLBACK TO SAVEPOINT {MEMBER}; RELEASE SAVEPOINT {MEMBER}"
                        ))
                        .await?;
                        results.push(Err(fail.into_storage(OP)));
                    }
                }
            }
            Ok(results)
        });
        outcome.unwrap_or_else(|e| batch_failed(batch.len(), &e))
    }

    fn list(
        &self,
        id: ClientId,
        all_versions: bool,
        offset: u64,
        limit: usize,
    ) -> Result<Vec<VersionRecord>, StorageError> {
        let filter = if all_versions {
            "WHERE f.client_id = $1 ORDER BY f.name, v.id LIMIT $2 OFFSET $3"
        } else {
            "WHERE f.client_id = $1 AND v.id = (SELECT max(id) FROM versions WHERE file_id = f.id)
             ORDER BY f.name, v.id LIMIT $2 OFFSET $3"
        };
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let offset = clamp(offset);
        transaction!(self, "list versions", |tx| {
            query_versions(&tx, filter, &[&&id.0[..], &limit, &offset]).await
        })
    }

    fn find_version(
        &self,
        id: ClientId,
        file: &FileName,
        version: u64,
    ) -> Result<Option<VersionRecord>, StorageError> {
        if version == 0 {
            return self.latest(id, file);
        }
        let version = clamp(version);
        transaction!(self, "find a version", |tx| {
            let mut v = query_versions(
                &tx,
                "WHERE f.client_id = $1 AND f.name = $2 AND v.id = $3",
                &[&&id.0[..], &file.as_bytes(), &version],
            )
            .await?;
            Ok(v.pop())
        })
    }

    fn delete_file(
        &self,
        id: ClientId,
        file: &FileName,
        append_only: bool,
    ) -> Result<Deletion, StorageError> {
        transaction!(self, "delete a file", |tx| {
            if append_only || is_append_only(&tx, id).await? {
                return Ok(Deletion::Refused);
            }
            let versions = query_versions(
                &tx,
                "WHERE f.client_id = $1 AND f.name = $2 ORDER BY v.id",
                &[&&id.0[..], &file.as_bytes()],
            )
            .await?;
            if versions.is_empty() {
                return Ok(Deletion::NotFound);
            }
            tx.execute(
                "DELETE FROM versions WHERE file_id = (SELECT id FROM files WHERE client_id = $1 AND name = $2)",
                &[&&id.0[..], &file.as_bytes()],
            )
            .await?;
            tx.execute(
                "DELETE FROM files WHERE client_id = $1 AND name = $2",
                &[&&id.0[..], &file.as_bytes()],
            )
            .await?;
            Ok(Deletion::Deleted(versions))
        })
    }

    fn set_append_only(&self, id: ClientId, on: bool) -> Result<bool, StorageError> {
        transaction!(self, "set append-only", |tx| {
            let n = tx
                .execute(
                    "UPDATE clients SET append_only = $2 WHERE id = $1",
                    &[&&id.0[..], &on],
                )
                .await?;
            Ok(n > 0)
        })
    }

    fn set_quota(&self, id: ClientId, quota: QuotaSetting) -> Result<bool, StorageError> {
        let quota = quota_to_sql(quota)?;
        transaction!(self, "set a quota", |tx| {
            let n = tx
                .execute(
                    "UPDATE clients SET quota = $2 WHERE id = $1",
                    &[&&id.0[..], &quota],
                )
                .await?;
            Ok(n > 0)
        })
    }

    fn clients(&self) -> Result<Vec<ClientSummary>, StorageError> {
        let sql = format!(
            "SELECT {CLIENT_COLUMNS},
                    (SELECT count(DISTINCT f.id) FROM files f JOIN versions v ON v.file_id = f.id
                      WHERE f.client_id = c.id),
                    (SELECT count(*) FROM files f JOIN versions v ON v.file_id = f.id
                      WHERE f.client_id = c.id),
                    (SELECT coalesce(sum(v.size), 0)::bigint FROM files f
                      JOIN versions v ON v.file_id = f.id WHERE f.client_id = c.id)
             FROM clients c ORDER BY c.name"
        );
        transaction!(self, "list clients", |tx| {
            let rows = tx.query(&sql, &[]).await?;
            Ok(rows.iter().map(client_summary).collect::<Result<_, _>>()?)
        })
    }

    fn prune(
        &self,
        retention: &Retention,
        now: SystemTime,
    ) -> Result<Vec<VersionRecord>, StorageError> {
        if retention.keeps_everything() {
            return Ok(Vec::new());
        }
        transaction!(self, "prune versions", |tx| {
            // Newest first within each file, files one after the other.
            let all = query_versions(&tx, "ORDER BY v.file_id, v.id DESC", &[]).await?;
            let mut removed = Vec::new();
            let mut group: Vec<VersionRecord> = Vec::new();
            for v in all {
                let same = group
                    .first()
                    .is_some_and(|g| g.client == v.client && g.file == v.file);
                if !same {
                    // An operator's prune reaches append-only clients too.
                    let done = std::mem::take(&mut group);
                    removed.extend(apply_retention(&tx, done, retention, false, now).await?);
                }
                group.push(v);
            }
            removed.extend(apply_retention(&tx, group, retention, false, now).await?);
            Ok(removed)
        })
    }

    /// Nothing is removed when there is no such client (SQLite's version
    /// rolls back then), not even repository rows under its id.
    fn remove_client(&self, id: ClientId) -> Result<Option<Vec<VersionRecord>>, StorageError> {
        transaction!(self, "remove a client", |tx| {
            let known = tx
                .query_opt("SELECT 1 FROM clients WHERE id = $1", &[&&id.0[..]])
                .await?;
            if known.is_none() {
                return Ok(None);
            }
            let versions =
                query_versions(&tx, "WHERE f.client_id = $1 ORDER BY v.id", &[&&id.0[..]]).await?;
            tx.execute(
                "DELETE FROM versions WHERE file_id IN (SELECT id FROM files WHERE client_id = $1)",
                &[&&id.0[..]],
            )
            .await?;
            tx.execute("DELETE FROM files WHERE client_id = $1", &[&&id.0[..]])
                .await?;
            remove_client_rows(&tx, id).await?;
            tx.execute("DELETE FROM clients WHERE id = $1", &[&&id.0[..]])
                .await?;
            Ok(Some(versions))
        })
    }

    fn latest(&self, id: ClientId, file: &FileName) -> Result<Option<VersionRecord>, StorageError> {
        transaction!(self, "find the latest version", |tx| {
            let mut v = query_versions(
                &tx,
                "WHERE f.client_id = $1 AND f.name = $2 ORDER BY v.id DESC LIMIT 1",
                &[&&id.0[..], &file.as_bytes()],
            )
            .await?;
            Ok(v.pop())
        })
    }

    fn versions(&self, id: ClientId, file: &FileName) -> Result<Vec<VersionRecord>, StorageError> {
        transaction!(self, "list a file's versions", |tx| {
            query_versions(
                &tx,
                "WHERE f.client_id = $1 AND f.name = $2 ORDER BY v.id",
                &[&&id.0[..], &file.as_bytes()],
            )
            .await
        })
    }

    fn all_versions(&self) -> Result<Vec<VersionRecord>, StorageError> {
        transaction!(self, "list every version", |tx| {
            query_versions(&tx, "ORDER BY v.id", &[]).await
        })
    }

    fn inline_content(&self, blob: &BlobKey) -> Result<Option<Vec<u8>>, StorageError> {
        transaction!(self, "read inline content", |tx| {
            let row = tx
                .query_opt(
                    "SELECT content FROM inline_blobs WHERE blob = $1",
                    &[&blob.0],
                )
                .await?;
            Ok(row.as_ref().map(|r| get(r, 0)).transpose()?)
        })
    }

    fn inline_blobs(&self) -> Result<Vec<(BlobKey, u64)>, StorageError> {
        transaction!(self, "list inline content", |tx| {
            let rows = tx
                .query(
                    "SELECT blob, octet_length(content)::bigint FROM inline_blobs",
                    &[],
                )
                .await?;
            Ok(rows.iter().map(blob_size).collect::<Result<_, _>>()?)
        })
    }

    fn recorded_blobs(
        &self,
        after: Option<&BlobKey>,
        limit: usize,
    ) -> Result<Vec<(BlobKey, u64)>, StorageError> {
        // `blob` is UNIQUE and `COLLATE "C"`, so its index serves this in
        // byte order.
        transaction!(self, "list recorded blobs", |tx| {
            keys_after(
                &tx,
                "SELECT blob, size FROM versions WHERE blob > $1 ORDER BY blob LIMIT $2",
                after,
                limit,
            )
            .await
        })
    }

    fn inline_blobs_after(
        &self,
        after: Option<&BlobKey>,
        limit: usize,
    ) -> Result<Vec<(BlobKey, u64)>, StorageError> {
        transaction!(self, "list inline content", |tx| {
            keys_after(
                &tx,
                "SELECT blob, octet_length(content)::bigint FROM inline_blobs
                 WHERE blob > $1 ORDER BY blob LIMIT $2",
                after,
                limit,
            )
            .await
        })
    }

    fn delete_inline(&self, blob: &BlobKey) -> Result<(), StorageError> {
        transaction!(self, "delete inline content", |tx| {
            tx.execute("DELETE FROM inline_blobs WHERE blob = $1", &[&blob.0])
                .await?;
            Ok(())
        })
    }

    fn forget_blobs(&self, blobs: &[BlobKey]) -> Result<usize, StorageError> {
        let keys: Vec<&str> = blobs.iter().map(|b| b.0.as_str()).collect();
        transaction!(self, "forget blobs", |tx| {
            let n = tx
                .execute("DELETE FROM versions WHERE blob = ANY($1)", &[&keys])
                .await?;
            Ok(usize::try_from(n).unwrap_or(usize::MAX))
        })
    }
}
