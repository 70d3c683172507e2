//! Metadata in SQLite (bundled), in WAL mode with full synchronous commits.
//!
//! Schema version 6 (opening an older database brings it up: version 2
//! added `clients.append_only`, 3 `clients.secure_key`, 4 `inline_blobs`,
//! 5 `clients.completed_at`, 6 the repository tables of `schema.rs`,
//! `REPO_SCHEMA`, written by `repo.rs`):
//!
//! ```sql
//! clients  (id BLOB(16) PK, name BLOB UNIQUE, public_key BLOB(160) NULL,
//!           registered INTEGER, last_seen INTEGER,            -- times in unix ms
//!           append_only INTEGER DEFAULT 0, secure_key BLOB NULL,
//!           completed_at INTEGER NULL)  -- key stored (legacy) or proved (secure)
//! files    (id INTEGER PK, client_id -> clients, name BLOB,   -- name exactly as sent
//!           UNIQUE (client_id, name))
//! versions (id INTEGER PK, file_id -> files, blob TEXT UNIQUE, size INTEGER,
//!           content_size INTEGER, cksum INTEGER, sha256 BLOB(32),
//!           verified INTEGER, stored_at INTEGER)
//! inline_blobs (id INTEGER PK, blob TEXT UNIQUE, content BLOB)  -- small files;
//!           a trigger deletes the content with its versions row
//! latest_versions  -- view: the newest version of each file
//! ```
//!
//! Every commit inserts a `versions` row; the latest version is the one
//! with the highest id. Session AES keys are never stored.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use protocol::message::{PublicKeyField, PUBLIC_KEY_FIELD_LEN};
use protocol::{ClientId, FileName, UserName};
use rusqlite::{params, Connection, OptionalExtension, Row};

use super::{versions_to_remove, VersionStamp};
use super::{
    BlobKey, ClientRecord, ClientSummary, Deletion, MetaStore, NewVersion, PendingVersion,
    QuotaSetting, QuotaUsage, Registration, Retention, StorageError, VersionRecord,
};

mod repo;
mod rows;
mod schema;
mod write;

use rows::*;
pub use schema::SCHEMA_VERSION;
use schema::*;
use write::*;

/// Metadata in one SQLite database, shared behind a mutex: every call is
/// short, and the server makes them from blocking threads.
pub struct SqliteMetaStore {
    conn: Mutex<Connection>,
}

impl std::fmt::Debug for SqliteMetaStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteMetaStore").finish_non_exhaustive()
    }
}

/// Creates the database file (empty: SQLite takes it as a new database)
/// readable by its owner only, or takes group and other access away from
/// an existing one and its WAL files: it holds the content of small files.
/// SQLite creates the WAL files with the database file's mode.
fn restrict_to_owner(path: &Path) -> Result<(), StorageError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(|e| StorageError::io("create", path, e))?;
        for suffix in ["", "-wal", "-shm"] {
            let mut name = path.as_os_str().to_owned();
            name.push(suffix);
            let file = Path::new(&name);
            let Ok(meta) = std::fs::metadata(file) else {
                continue;
            };
            if meta.permissions().mode() & 0o077 != 0 {
                std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o600))
                    .map_err(|e| StorageError::io("restrict", file, e))?;
            }
        }
    }
    Ok(())
}

impl SqliteMetaStore {
    /// Opens (creating if needed) the database at `path` and brings its
    /// schema up to date.
    ///
    /// # Errors
    /// When the database cannot be opened, or has a newer schema.
    pub fn open(path: &Path) -> Result<Self, StorageError> {
        restrict_to_owner(path)?;
        let mut conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(mode, "SQLite refused WAL mode");
        }
        // secure_delete: the content of a small file that is deleted or
        // pruned is overwritten, not left in free pages.
        conn.execute_batch(
            "PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON; PRAGMA secure_delete = ON;",
        )?;
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        match version {
            0 => {
                let tx = conn.transaction()?;
                tx.execute_batch(SCHEMA)?;
                tx.execute_batch(INLINE_SCHEMA)?;
                tx.execute_batch(REPO_SCHEMA)?;
                tx.execute_batch(MIGRATE_6_TO_7)?;
                tx.execute_batch(MIGRATE_7_TO_8)?;
                tx.execute_batch(MIGRATE_8_TO_9)?;
                tx.execute_batch(MIGRATE_9_TO_10)?;
                tx.execute_batch(&format!("PRAGMA user_version = {SCHEMA_VERSION}"))?;
                tx.commit()?;
            }
            1..=9 => {
                let tx = conn.transaction()?;
                if version == 1 {
                    tx.execute_batch(MIGRATE_1_TO_2)?;
                }
                if version <= 2 {
                    tx.execute_batch(MIGRATE_2_TO_3)?;
                }
                if version <= 3 {
                    tx.execute_batch(MIGRATE_3_TO_4)?;
                }
                if version <= 4 {
                    tx.execute_batch(MIGRATE_4_TO_5)?;
                }
                if version <= 5 {
                    tx.execute_batch(MIGRATE_5_TO_6)?;
                }
                if version <= 6 {
                    tx.execute_batch(MIGRATE_6_TO_7)?;
                }
                if version <= 7 {
                    tx.execute_batch(MIGRATE_7_TO_8)?;
                }
                if version <= 8 {
                    tx.execute_batch(MIGRATE_8_TO_9)?;
                }
                tx.execute_batch(MIGRATE_9_TO_10)?;
                tx.execute_batch(&format!("PRAGMA user_version = {SCHEMA_VERSION}"))?;
                tx.commit()?;
            }
            SCHEMA_VERSION => {}
            other => {
                return Err(StorageError::Corrupt(format!(
                    "database schema version {other} is newer than this server's {SCHEMA_VERSION}"
                )))
            }
        }
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave a transaction open:
        // rusqlite rolls back on drop.
        self.conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn query_versions(
        &self,
        filter: &str,
        params: &[&dyn rusqlite::ToSql],
    ) -> Result<Vec<VersionRecord>, StorageError> {
        query_versions(&self.conn(), filter, params)
    }
}

impl SqliteMetaStore {
    /// Runs `sql` (a page of `(key, size)` by key, with `?1` the key to
    /// start after and `?2` the limit).
    fn keys_after(
        &self,
        sql: &str,
        after: Option<&BlobKey>,
        limit: usize,
    ) -> Result<Vec<(BlobKey, u64)>, StorageError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(sql)?;
        // Every key sorts after the empty string.
        let after = after.map_or("", |k| k.0.as_str());
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = stmt.query_and_then(params![after, limit], blob_size)?;
        rows.collect()
    }
}

fn is_append_only(conn: &Connection, id: ClientId) -> Result<bool, StorageError> {
    Ok(conn
        .query_row(
            "SELECT append_only FROM clients WHERE id = ?1",
            [&id.0[..]],
            |r| r.get::<_, bool>(0),
        )
        .optional()?
        .unwrap_or(false))
}

/// Whether a client that registered at `registered` (unix ms) and never
/// completed is stale at `now` (unix ms) after `grace`: a clock that went
/// back makes nothing stale.
fn stale(registered: i64, now: i64, grace: Duration) -> bool {
    let grace = i64::try_from(grace.as_millis()).unwrap_or(i64::MAX);
    now.checked_sub(registered).is_some_and(|age| age >= grace)
}

impl MetaStore for SqliteMetaStore {
    /// One indexed read of the clients table.
    fn probe(&self) -> Result<(), StorageError> {
        self.conn().query_row(
            "SELECT count(*) FROM (SELECT 1 FROM clients LIMIT 1)",
            [],
            |r| r.get::<_, i64>(0),
        )?;
        Ok(())
    }

    fn register_client(
        &self,
        id: ClientId,
        name: &UserName,
        secure_key: Option<&[u8]>,
        now: SystemTime,
        grace: Option<Duration>,
    ) -> Result<Registration, StorageError> {
        let now = to_ms(now);
        let mut conn = self.conn();
        // Immediate: the check and the write happen under the write lock,
        // also against an operator command in another process.
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let holder: Option<(Vec<u8>, Option<i64>, i64, bool)> = tx
            .query_row(
                "SELECT id, completed_at, registered,
                        EXISTS (SELECT 1 FROM files WHERE files.client_id = clients.id)
                 FROM clients WHERE name = ?1",
                [name.as_bytes()],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()?;
        let outcome = match holder {
            None => Registration::Created,
            Some((stale_id, None, registered, false))
                if grace.is_some_and(|g| stale(registered, now, g)) =>
            {
                tx.execute("DELETE FROM clients WHERE id = ?1", [&stale_id])?;
                Registration::Replaced {
                    stale: client_id(&stale_id)?,
                }
            }
            Some(_) => return Ok(Registration::NameTaken),
        };
        tx.execute(
            "INSERT INTO clients (id, name, public_key, registered, last_seen, secure_key) VALUES (?1, ?2, NULL, ?3, ?3, ?4)",
            params![&id.0[..], name.as_bytes(), now, secure_key],
        )?;
        tx.commit()?;
        Ok(outcome)
    }

    fn complete(&self, id: ClientId, now: SystemTime) -> Result<bool, StorageError> {
        let conn = self.conn();
        // Read first: completing a client that already has is no write
        // (and no sync) at each of its later authentications.
        let completed: Option<bool> = conn
            .prepare_cached("SELECT completed_at IS NOT NULL FROM clients WHERE id = ?1")?
            .query_row([&id.0[..]], |r| r.get(0))
            .optional()?;
        match completed {
            None => Ok(false),
            Some(true) => Ok(true),
            Some(false) => {
                conn.execute(
                    "UPDATE clients SET completed_at = ?2 WHERE id = ?1",
                    params![&id.0[..], to_ms(now)],
                )?;
                Ok(true)
            }
        }
    }

    fn set_public_key(
        &self,
        id: ClientId,
        key: &PublicKeyField,
        now: SystemTime,
    ) -> Result<bool, StorageError> {
        let n = self.conn().execute(
            "UPDATE clients SET public_key = ?2, last_seen = ?3,
                    completed_at = coalesce(completed_at, ?3)
             WHERE id = ?1",
            params![&id.0[..], &key.0[..], to_ms(now)],
        )?;
        Ok(n > 0)
    }

    fn client(&self, id: ClientId) -> Result<Option<ClientRecord>, StorageError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {CLIENT_COLUMNS} FROM clients WHERE id = ?1"
        ))?;
        let mut rows = stmt.query_and_then([&id.0[..]], client)?;
        rows.next().transpose()
    }

    fn touch(&self, id: ClientId, now: SystemTime) -> Result<(), StorageError> {
        self.conn().execute(
            "UPDATE clients SET last_seen = ?2 WHERE id = ?1",
            params![&id.0[..], to_ms(now)],
        )?;
        Ok(())
    }

    fn add_version(
        &self,
        v: &NewVersion,
        retention: &Retention,
    ) -> Result<Vec<BlobKey>, StorageError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let superseded = insert_version(&tx, v, retention)?;
        tx.commit()?;
        Ok(superseded)
    }

    /// One transaction (so one WAL sync) for the whole batch; each version
    /// in a savepoint of its own, so that one that fails is rolled back
    /// alone, unless its error rolled back the whole transaction (then
    /// every member fails).
    fn add_versions(&self, batch: &[PendingVersion]) -> Vec<Result<Vec<BlobKey>, StorageError>> {
        let mut conn = self.conn();
        // Immediate: the quota is read and the version charged under the
        // write lock, so that no other writer comes between.
        let mut tx = match conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        {
            Ok(tx) => tx,
            Err(e) => return batch_failed(batch.len(), &e.into()),
        };
        let mut results = Vec::with_capacity(batch.len());
        for pending in batch {
            let one = tx.savepoint().map_err(StorageError::from).and_then(|sp| {
                let client = pending.version.client;
                // What it stores is read only when a quota applies.
                let before = match repo::quota_in(&sp, client, pending.quota)? {
                    Some(_) => Some(repo::usage_in(&sp, client, pending.quota)?),
                    None => None,
                };
                if let Some(content) = &pending.inline {
                    sp.prepare_cached("INSERT INTO inline_blobs (blob, content) VALUES (?1, ?2)")?
                        .execute(params![pending.version.blob.0, content])?;
                }
                let superseded = insert_version(&sp, &pending.version, &pending.retention)?;
                if let Some(before) = before {
                    let after = repo::usage_in(&sp, client, pending.quota)?;
                    // Dropping the savepoint uncommitted rolls it back.
                    QuotaUsage::admits(before, after, pending.version.size)?;
                }
                sp.commit()?;
                Ok(superseded)
            });
            if let Err(e) = &one {
                // Some errors (a full disk, I/O) make SQLite roll back the
                // whole transaction, not just the savepoint: then nothing
                // of the batch is recorded, and going on would start (and
                // commit) a new transaction behind our back.
                if tx.is_autocommit() {
                    return batch_failed(batch.len(), e);
                }
            }
            results.push(one);
        }
        match tx.commit() {
            Ok(()) => results,
            Err(e) => batch_failed(batch.len(), &e.into()),
        }
    }

    fn list(
        &self,
        id: ClientId,
        all_versions: bool,
        offset: u64,
        limit: usize,
    ) -> Result<Vec<VersionRecord>, StorageError> {
        let filter = if all_versions {
            "WHERE f.client_id = ?1 ORDER BY f.name, v.id LIMIT ?2 OFFSET ?3"
        } else {
            "WHERE f.client_id = ?1 AND v.id = (SELECT max(id) FROM versions WHERE file_id = f.id)
             ORDER BY f.name, v.id LIMIT ?2 OFFSET ?3"
        };
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.query_versions(filter, &[&&id.0[..], &limit, &u64_to_sql(offset)])
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
        let mut v = self.query_versions(
            "WHERE f.client_id = ?1 AND f.name = ?2 AND v.id = ?3",
            &[&&id.0[..], &file.as_bytes(), &u64_to_sql(version)],
        )?;
        Ok(v.pop())
    }

    fn delete_file(
        &self,
        id: ClientId,
        file: &FileName,
        append_only: bool,
    ) -> Result<Deletion, StorageError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        if append_only || is_append_only(&tx, id)? {
            return Ok(Deletion::Refused);
        }
        let versions = query_versions(
            &tx,
            "WHERE f.client_id = ?1 AND f.name = ?2 ORDER BY v.id",
            &[&&id.0[..], &file.as_bytes()],
        )?;
        if versions.is_empty() {
            return Ok(Deletion::NotFound);
        }
        tx.execute(
            "DELETE FROM versions WHERE file_id = (SELECT id FROM files WHERE client_id = ?1 AND name = ?2)",
            params![&id.0[..], file.as_bytes()],
        )?;
        tx.execute(
            "DELETE FROM files WHERE client_id = ?1 AND name = ?2",
            params![&id.0[..], file.as_bytes()],
        )?;
        tx.commit()?;
        Ok(Deletion::Deleted(versions))
    }

    fn set_quota(&self, id: ClientId, quota: QuotaSetting) -> Result<bool, StorageError> {
        let n = self.conn().execute(
            "UPDATE clients SET quota = ?2 WHERE id = ?1",
            params![&id.0[..], quota_to_sql(quota)?],
        )?;
        Ok(n > 0)
    }

    fn set_append_only(&self, id: ClientId, on: bool) -> Result<bool, StorageError> {
        let n = self.conn().execute(
            "UPDATE clients SET append_only = ?2 WHERE id = ?1",
            params![&id.0[..], on],
        )?;
        Ok(n > 0)
    }

    fn clients(&self) -> Result<Vec<ClientSummary>, StorageError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {CLIENT_COLUMNS},
                    (SELECT count(DISTINCT f.id) FROM files f JOIN versions v ON v.file_id = f.id
                      WHERE f.client_id = c.id),
                    (SELECT count(*) FROM files f JOIN versions v ON v.file_id = f.id
                      WHERE f.client_id = c.id),
                    (SELECT coalesce(sum(v.size), 0) FROM files f JOIN versions v ON v.file_id = f.id
                      WHERE f.client_id = c.id)
             FROM clients c ORDER BY c.name"
        ))?;
        let rows = stmt.query_and_then([], client_summary)?;
        rows.collect()
    }

    fn prune(
        &self,
        retention: &Retention,
        now: SystemTime,
    ) -> Result<Vec<VersionRecord>, StorageError> {
        if retention.keeps_everything() {
            return Ok(Vec::new());
        }
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        // Newest first within each file, files one after the other.
        let all = query_versions(&tx, "ORDER BY v.file_id, v.id DESC", &[])?;
        let mut removed = Vec::new();
        let mut group: Vec<VersionRecord> = Vec::new();
        for v in all {
            let same = group
                .first()
                .is_some_and(|g| g.client == v.client && g.file == v.file);
            if !same {
                // An operator's prune reaches append-only clients too.
                removed.extend(apply_retention(
                    &tx,
                    std::mem::take(&mut group),
                    retention,
                    false,
                    now,
                )?);
            }
            group.push(v);
        }
        removed.extend(apply_retention(&tx, group, retention, false, now)?);
        tx.commit()?;
        Ok(removed)
    }

    fn remove_client(&self, id: ClientId) -> Result<Option<Vec<VersionRecord>>, StorageError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let versions = query_versions(&tx, "WHERE f.client_id = ?1 ORDER BY v.id", &[&&id.0[..]])?;
        tx.execute(
            "DELETE FROM versions WHERE file_id IN (SELECT id FROM files WHERE client_id = ?1)",
            [&id.0[..]],
        )?;
        tx.execute("DELETE FROM files WHERE client_id = ?1", [&id.0[..]])?;
        repo::remove_client_rows(&tx, id)?;
        let n = tx.execute("DELETE FROM clients WHERE id = ?1", [&id.0[..]])?;
        if n == 0 {
            return Ok(None);
        }
        tx.commit()?;
        Ok(Some(versions))
    }

    fn latest(&self, id: ClientId, file: &FileName) -> Result<Option<VersionRecord>, StorageError> {
        let mut v = self.query_versions(
            "WHERE f.client_id = ?1 AND f.name = ?2 ORDER BY v.id DESC LIMIT 1",
            &[&&id.0[..], &file.as_bytes()],
        )?;
        Ok(v.pop())
    }

    fn versions(&self, id: ClientId, file: &FileName) -> Result<Vec<VersionRecord>, StorageError> {
        self.query_versions(
            "WHERE f.client_id = ?1 AND f.name = ?2 ORDER BY v.id",
            &[&&id.0[..], &file.as_bytes()],
        )
    }

    fn all_versions(&self) -> Result<Vec<VersionRecord>, StorageError> {
        self.query_versions("ORDER BY v.id", &[])
    }

    fn inline_content(&self, blob: &BlobKey) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self
            .conn()
            .prepare_cached("SELECT content FROM inline_blobs WHERE blob = ?1")?
            .query_row([&blob.0], |r| r.get(0))
            .optional()?)
    }

    fn inline_blobs(&self) -> Result<Vec<(BlobKey, u64)>, StorageError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT blob, length(content) FROM inline_blobs")?;
        let rows = stmt.query_and_then([], blob_size)?;
        rows.collect()
    }

    fn recorded_blobs(
        &self,
        after: Option<&BlobKey>,
        limit: usize,
    ) -> Result<Vec<(BlobKey, u64)>, StorageError> {
        // `blob` is UNIQUE, so its index serves this in key order.
        self.keys_after(
            "SELECT blob, size FROM versions WHERE blob > ?1 ORDER BY blob LIMIT ?2",
            after,
            limit,
        )
    }

    fn inline_blobs_after(
        &self,
        after: Option<&BlobKey>,
        limit: usize,
    ) -> Result<Vec<(BlobKey, u64)>, StorageError> {
        self.keys_after(
            "SELECT blob, length(content) FROM inline_blobs WHERE blob > ?1 ORDER BY blob LIMIT ?2",
            after,
            limit,
        )
    }

    fn delete_inline(&self, blob: &BlobKey) -> Result<(), StorageError> {
        self.conn()
            .execute("DELETE FROM inline_blobs WHERE blob = ?1", [&blob.0])?;
        Ok(())
    }

    fn forget_blobs(&self, blobs: &[BlobKey]) -> Result<usize, StorageError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let mut n = 0;
        for b in blobs {
            n += tx.execute("DELETE FROM versions WHERE blob = ?1", [&b.0])?;
        }
        tx.commit()?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(client: ClientId, file: &str, blob: &str, size: u64) -> NewVersion {
        NewVersion {
            client,
            file: FileName::try_from(file).unwrap(),
            blob: BlobKey(blob.into()),
            size,
            content_size: protocol::crypto::pkcs7_len(size),
            cksum: 7,
            sha256: [3; 32],
            stored_at: SystemTime::now(),
        }
    }

    #[test]
    fn upgrades_a_version_9_database_charging_the_versions_it_holds() {
        use crate::storage::RepoStore;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        let (a, b) = (ClientId([1; 16]), ClientId([2; 16]));
        {
            let db = SqliteMetaStore::open(&path).unwrap();
            for (id, name) in [(a, "a"), (b, "b")] {
                db.register(id, &UserName::try_from(name).unwrap(), SystemTime::now())
                    .unwrap();
            }
            for v in [
                version(a, "f", "a1", 100),
                version(a, "f", "a2", 23),
                version(a, "g", "a3", 4),
                version(b, "f", "b1", 7),
            ] {
                db.add_version(&v, &Retention::KEEP_ALL).unwrap();
            }
            // What a version 9 server left: no charge column, no triggers.
            db.conn()
                .execute_batch(
                    "DROP TRIGGER versions_charge; DROP TRIGGER versions_refund;
                     ALTER TABLE clients DROP COLUMN version_bytes;
                     PRAGMA user_version = 9;",
                )
                .unwrap();
        }
        let db = SqliteMetaStore::open(&path).unwrap();
        let version_now: i64 = db
            .conn()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version_now, SCHEMA_VERSION);
        assert_eq!(db.usage(a, None).unwrap().stored, 127);
        assert_eq!(db.usage(b, None).unwrap().stored, 7);
        // The triggers keep it from there.
        db.add_version(&version(a, "g", "a4", 10), &Retention::KEEP_ALL)
            .unwrap();
        assert_eq!(db.usage(a, None).unwrap().stored, 137);
        let Deletion::Deleted(gone) = db
            .delete_file(a, &FileName::try_from("f").unwrap(), false)
            .unwrap()
        else {
            panic!("f was not deleted");
        };
        assert_eq!(gone.len(), 2);
        assert_eq!(db.usage(a, None).unwrap().stored, 14);
        assert_eq!(db.usage(b, None).unwrap().stored, 7);
    }

    #[test]
    fn maps_sqlite_errors_onto_neutral_kinds() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE t (k INTEGER UNIQUE); INSERT INTO t VALUES (1);")
            .unwrap();
        let dup = conn.execute("INSERT INTO t VALUES (1)", []).unwrap_err();
        assert!(matches!(
            StorageError::from(dup),
            StorageError::Conflict { .. }
        ));
        let none = conn
            .query_row("SELECT k FROM t WHERE k = 2", [], |r| r.get::<_, i64>(0))
            .unwrap_err();
        assert!(matches!(
            StorageError::from(none),
            StorageError::NotFound { .. }
        ));
        let wrong = conn
            .query_row("SELECT 'text'", [], |r| r.get::<_, i64>(0))
            .unwrap_err();
        assert!(matches!(
            StorageError::from(wrong),
            StorageError::Corrupt(_)
        ));
        let bad = conn.execute("NOT SQL", []).unwrap_err();
        let mapped = StorageError::from(bad);
        assert!(matches!(mapped, StorageError::Io { .. }), "{mapped:?}");
        assert!(
            std::error::Error::source(&mapped).is_some(),
            "the backend error is kept"
        );
    }

    #[test]
    fn a_second_writer_meets_unavailable_not_a_backend_type() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.db");
        let a = Connection::open(&path).unwrap();
        a.execute_batch("CREATE TABLE t (k INTEGER); BEGIN IMMEDIATE; INSERT INTO t VALUES (1);")
            .unwrap();
        let b = Connection::open(&path).unwrap();
        b.busy_timeout(Duration::ZERO).unwrap();
        let busy = b.execute("INSERT INTO t VALUES (2)", []).unwrap_err();
        assert!(matches!(
            StorageError::from(busy),
            StorageError::Unavailable { .. }
        ));
    }

    fn last(n: u32) -> Retention {
        Retention {
            keep_last: Some(n),
            keep_within: None,
        }
    }

    #[cfg(unix)]
    #[test]
    fn the_database_and_its_wal_are_for_the_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        let db = SqliteMetaStore::open(&path).unwrap();
        db.register(
            ClientId([1; 16]),
            &UserName::try_from("o").unwrap(),
            SystemTime::now(),
        )
        .unwrap();
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&dir.path().join("m.db-wal")), 0o600);
        drop(db);
        // An older database made with the default mode is restricted on open.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let db = SqliteMetaStore::open(&path).unwrap();
        assert_eq!(mode(&path), 0o600);
        assert!(
            db.client(ClientId([1; 16])).unwrap().is_some(),
            "rows survive"
        );
    }

    #[test]
    fn registers_once_per_name_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        let db = SqliteMetaStore::open(&path).unwrap();
        let alice = UserName::try_from("alice").unwrap();
        let id = ClientId([1; 16]);
        assert_eq!(
            db.register(id, &alice, SystemTime::now()).unwrap(),
            Registration::Created
        );
        assert_eq!(
            db.register(ClientId([2; 16]), &alice, SystemTime::now())
                .unwrap(),
            Registration::NameTaken
        );
        assert!(db
            .set_public_key(id, &PublicKeyField([9; 160]), SystemTime::now())
            .unwrap());
        assert!(!db
            .set_public_key(
                ClientId([3; 16]),
                &PublicKeyField([9; 160]),
                SystemTime::now()
            )
            .unwrap());
        drop(db);
        let db = SqliteMetaStore::open(&path).unwrap();
        let c = db.client(id).unwrap().unwrap();
        assert_eq!(c.name, alice);
        assert_eq!(c.public_key, Some(PublicKeyField([9; 160])));
        assert!(db.client(ClientId([2; 16])).unwrap().is_none());
    }

    #[test]
    fn newest_version_is_latest_and_old_ones_beyond_keep_are_returned() {
        let dir = tempfile::tempdir().unwrap();
        let db = SqliteMetaStore::open(&dir.path().join("m.db")).unwrap();
        let id = ClientId([1; 16]);
        db.register(id, &UserName::try_from("a").unwrap(), SystemTime::now())
            .unwrap();
        assert!(db
            .add_version(&version(id, "f", "b1", 1), &last(2))
            .unwrap()
            .is_empty());
        assert!(db
            .add_version(&version(id, "f", "b2", 2), &last(2))
            .unwrap()
            .is_empty());
        assert!(db
            .add_version(&version(id, "g", "b3", 3), &last(2))
            .unwrap()
            .is_empty());
        assert_eq!(
            db.add_version(&version(id, "f", "b4", 4), &last(2))
                .unwrap(),
            vec![BlobKey("b1".into())]
        );
        let f = FileName::try_from("f").unwrap();
        assert_eq!(
            db.latest(id, &f).unwrap().unwrap().blob,
            BlobKey("b4".into())
        );
        let all: Vec<_> = db
            .versions(id, &f)
            .unwrap()
            .into_iter()
            .map(|v| v.size)
            .collect();
        assert_eq!(all, vec![2, 4]);
        assert_eq!(
            db.add_version(&version(id, "f", "b5", 5), &last(1))
                .unwrap()
                .len(),
            2
        );
        assert_eq!(db.all_versions().unwrap().len(), 2);
        assert_eq!(db.forget_blobs(&[BlobKey("b5".into())]).unwrap(), 1);
        assert!(db.latest(id, &f).unwrap().is_none());
    }

    #[test]
    fn rejects_a_version_for_an_unknown_client() {
        let dir = tempfile::tempdir().unwrap();
        let db = SqliteMetaStore::open(&dir.path().join("m.db")).unwrap();
        assert!(db
            .add_version(&version(ClientId([5; 16]), "f", "b", 1), &last(1))
            .is_err());
        assert!(db.all_versions().unwrap().is_empty());
    }

    #[test]
    fn a_batch_records_each_member_alone_and_one_failure_spoils_no_other() {
        let dir = tempfile::tempdir().unwrap();
        let (db, id) = open_with_client(&dir);
        let stranger = ClientId([9; 16]);
        let pending = |version: NewVersion, inline: Option<&[u8]>| PendingVersion {
            version,
            retention: last(1),
            inline: inline.map(<[u8]>::to_vec),
            quota: None,
        };
        let batch = vec![
            pending(version(id, "f", "b1", 2), Some(b"v1")),
            // No such client: the foreign key fails this member only.
            pending(version(stranger, "g", "b2", 2), Some(b"v2")),
            pending(version(id, "f", "b3", 2), Some(b"v3")),
            // The blob key is taken: fails alone as well.
            pending(version(id, "h", "b3", 4), Some(b"v4")),
            pending(version(id, "i", "b5", 5), None),
        ];
        let results = db.add_versions(&batch);
        assert_eq!(results.len(), 5);
        assert!(results[0].as_ref().unwrap().is_empty());
        assert!(results[1].is_err());
        assert_eq!(
            results[2].as_ref().unwrap(),
            &vec![BlobKey("b1".into())],
            "retention within the batch drops the earlier member"
        );
        assert!(results[3].is_err());
        assert!(results[4].as_ref().unwrap().is_empty());
        let rows: Vec<_> = db.all_versions().unwrap();
        let blobs: Vec<_> = rows.iter().map(|r| r.blob.0.as_str()).collect();
        assert_eq!(blobs, ["b3", "b5"], "{rows:?}");
        let content = |b: &str| db.inline_content(&BlobKey(b.into())).unwrap();
        assert_eq!(content("b1"), None, "content goes with its dropped row");
        assert_eq!(content("b2"), None, "a failed member leaves no content");
        assert_eq!(content("b3").as_deref(), Some(&b"v3"[..]));
        assert_eq!(content("b5"), None);
        assert_eq!(db.inline_blobs().unwrap(), vec![(BlobKey("b3".into()), 2)]);
        assert!(db.add_versions(&[]).is_empty());
        db.delete_file(id, &FileName::try_from("f").unwrap(), false)
            .unwrap();
        assert_eq!(content("b3"), None, "deleting the file drops its content");
    }

    #[test]
    fn a_full_database_records_exactly_the_members_it_reports_as_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let (db, id) = open_with_client(&dir);
        let pages: i64 = db
            .conn()
            .query_row("PRAGMA page_count", [], |r| r.get(0))
            .unwrap();
        // Room for a few 40 KiB contents, not for twenty.
        db.conn()
            .query_row(
                &format!("PRAGMA max_page_count = {}", pages + 40),
                [],
                |_| Ok(()),
            )
            .unwrap();
        let batch: Vec<PendingVersion> = (0..20u8)
            .map(|i| {
                let blob = format!("inline/{i:02}");
                PendingVersion {
                    version: version(id, &format!("f{i}"), &blob, 40_000),
                    retention: Retention::KEEP_ALL,
                    inline: Some(vec![i; 40_000]),
                    quota: None,
                }
            })
            .collect();
        let results = db.add_versions(&batch);
        assert_eq!(results.len(), batch.len());
        assert!(results.iter().any(Result::is_err), "the database filled up");
        let recorded: std::collections::HashSet<String> = db
            .all_versions()
            .unwrap()
            .into_iter()
            .map(|v| v.blob.0)
            .collect();
        for (p, r) in batch.iter().zip(&results) {
            let key = &p.version.blob;
            assert_eq!(recorded.contains(&key.0), r.is_ok(), "{key}: {r:?}");
            assert_eq!(
                db.inline_content(key).unwrap().is_some(),
                r.is_ok(),
                "{key}"
            );
        }
        assert!(db.conn().is_autocommit(), "no transaction left open");
    }

    fn open_with_client(dir: &tempfile::TempDir) -> (SqliteMetaStore, ClientId) {
        let db = SqliteMetaStore::open(&dir.path().join("m.db")).unwrap();
        let id = ClientId([1; 16]);
        db.register(id, &UserName::try_from("a").unwrap(), SystemTime::now())
            .unwrap();
        (db, id)
    }

    #[test]
    fn migrates_a_version_1_database_and_keeps_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        {
            let conn = Connection::open(&path).unwrap();
            let v1 = SCHEMA.replace(
                "last_seen   INTEGER NOT NULL,\n    append_only INTEGER NOT NULL DEFAULT 0,\n    secure_key  BLOB CHECK (secure_key IS NULL OR length(secure_key) BETWEEN 1 AND 1100),\n    completed_at INTEGER",
                "last_seen   INTEGER NOT NULL",
            );
            assert_ne!(v1, SCHEMA);
            conn.execute_batch(&v1).unwrap();
            conn.execute_batch("PRAGMA user_version = 1").unwrap();
            conn.execute(
                "INSERT INTO clients (id, name, registered, last_seen) VALUES (?1, x'6f6c64', 0, 0)",
                [&[4u8; 16][..]],
            )
            .unwrap();
        }
        let db = SqliteMetaStore::open(&path).unwrap();
        let c = db.client(ClientId([4; 16])).unwrap().unwrap();
        assert!(!c.append_only);
        assert!(db.set_append_only(ClientId([4; 16]), true).unwrap());
        assert!(db.client(ClientId([4; 16])).unwrap().unwrap().append_only);
        let version: i64 = db
            .conn()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
    }

    const GRACE: Duration = Duration::from_secs(600);

    fn name(text: &str) -> UserName {
        UserName::try_from(text).unwrap()
    }

    /// Registers `name` as `id` at `at` with the grace period.
    fn register_at(
        db: &SqliteMetaStore,
        id: u8,
        name: &UserName,
        secure_key: Option<&[u8]>,
        at: SystemTime,
    ) -> Registration {
        db.register_client(ClientId([id; 16]), name, secure_key, at, Some(GRACE))
            .unwrap()
    }

    #[test]
    fn a_never_completed_legacy_name_is_taken_within_the_grace_and_replaced_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let db = SqliteMetaStore::open(&dir.path().join("m.db")).unwrap();
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let lost = name("lost");
        assert_eq!(register_at(&db, 1, &lost, None, t), Registration::Created);
        assert_eq!(
            db.client(ClientId([1; 16])).unwrap().unwrap().completed_at,
            None
        );
        let just_before = t + GRACE - Duration::from_millis(1);
        assert_eq!(
            register_at(&db, 2, &lost, None, just_before),
            Registration::NameTaken
        );
        assert_eq!(
            register_at(&db, 2, &lost, None, t + GRACE),
            Registration::Replaced {
                stale: ClientId([1; 16])
            }
        );
        assert!(db.client(ClientId([1; 16])).unwrap().is_none());
        let new = db.client(ClientId([2; 16])).unwrap().unwrap();
        assert_eq!((new.name, new.registered), (lost.clone(), t + GRACE));
        // The new registration has a grace period of its own.
        assert_eq!(
            register_at(&db, 3, &lost, None, t + GRACE + Duration::from_secs(1)),
            Registration::NameTaken
        );
        // A clock that went back makes nothing stale.
        assert_eq!(
            register_at(&db, 4, &name("early"), None, t),
            Registration::Created
        );
        assert_eq!(
            register_at(&db, 5, &name("early"), None, t - 2 * GRACE),
            Registration::NameTaken
        );
    }

    #[test]
    fn a_never_proved_secure_name_is_replaced_after_the_grace() {
        let dir = tempfile::tempdir().unwrap();
        let db = SqliteMetaStore::open(&dir.path().join("m.db")).unwrap();
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let n = name("unproved");
        assert_eq!(
            register_at(&db, 1, &n, Some(b"first key"), t),
            Registration::Created
        );
        assert_eq!(
            register_at(&db, 2, &n, Some(b"other key"), t + GRACE / 2),
            Registration::NameTaken
        );
        assert_eq!(
            register_at(&db, 2, &n, Some(b"other key"), t + GRACE),
            Registration::Replaced {
                stale: ClientId([1; 16])
            }
        );
        let new = db.client(ClientId([2; 16])).unwrap().unwrap();
        assert_eq!(new.secure_key.as_deref(), Some(&b"other key"[..]));
        assert_eq!(new.completed_at, None);
        // The replaced client's proof, arriving late, completes nothing.
        assert!(!db.complete(ClientId([1; 16]), t + GRACE).unwrap());
    }

    #[test]
    fn completed_clients_are_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let db = SqliteMetaStore::open(&dir.path().join("m.db")).unwrap();
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let much_later = t + 1000 * GRACE;
        // Legacy: the public key completes.
        assert_eq!(
            register_at(&db, 1, &name("keyed"), None, t),
            Registration::Created
        );
        assert!(db
            .set_public_key(ClientId([1; 16]), &PublicKeyField([9; 160]), t)
            .unwrap());
        // Secure mode: the proof completes, once; a later proof keeps the
        // first time.
        assert_eq!(
            register_at(&db, 2, &name("proved"), Some(b"key"), t),
            Registration::Created
        );
        assert!(db.complete(ClientId([2; 16]), t).unwrap());
        assert!(db.complete(ClientId([2; 16]), much_later).unwrap());
        assert!(
            !db.complete(ClientId([7; 16]), t).unwrap(),
            "no such client"
        );
        for (id, n) in [(1u8, "keyed"), (2, "proved")] {
            assert_eq!(
                db.client(ClientId([id; 16])).unwrap().unwrap().completed_at,
                Some(t),
                "{n}"
            );
            assert_eq!(
                register_at(&db, 9, &name(n), None, much_later),
                Registration::NameTaken,
                "{n}"
            );
        }
        // Without a grace (operator tools, tests), no name is ever free.
        assert_eq!(
            register_at(&db, 3, &name("plain"), None, t),
            Registration::Created
        );
        assert_eq!(
            db.register(ClientId([4; 16]), &name("plain"), much_later)
                .unwrap(),
            Registration::NameTaken
        );
    }

    #[test]
    fn an_incomplete_client_with_files_is_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let db = SqliteMetaStore::open(&dir.path().join("m.db")).unwrap();
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        register_at(&db, 1, &name("odd"), None, t);
        // Not reachable through the protocol (uploads need the key
        // exchange), but never lose a file to a replacement.
        db.add_version(
            &version(ClientId([1; 16]), "f", "b1", 1),
            &Retention::KEEP_ALL,
        )
        .unwrap();
        assert_eq!(
            register_at(&db, 2, &name("odd"), None, t + 10 * GRACE),
            Registration::NameTaken
        );
        assert_eq!(db.all_versions().unwrap().len(), 1);
    }

    #[test]
    fn racing_registrations_of_a_stale_name_have_exactly_one_winner() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        // Two stores on one file: two connections, as two processes would
        // have, so the transaction itself must make the replacement atomic.
        let stores = [
            std::sync::Arc::new(SqliteMetaStore::open(&path).unwrap()),
            std::sync::Arc::new(SqliteMetaStore::open(&path).unwrap()),
        ];
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        for round in 0..20u8 {
            let n = name(&format!("contested-{round}"));
            register_at(&stores[0], 0, &n, None, t);
            let start = std::sync::Arc::new(std::sync::Barrier::new(4));
            let racers: Vec<_> = (0..4u8)
                .map(|i| {
                    let db = std::sync::Arc::clone(&stores[usize::from(i % 2)]);
                    let (n, start) = (n.clone(), std::sync::Arc::clone(&start));
                    std::thread::spawn(move || {
                        let id = round * 8 + i + 1;
                        start.wait();
                        (
                            ClientId([id; 16]),
                            register_at(&db, id, &n, None, t + GRACE),
                        )
                    })
                })
                .collect();
            let outcomes: Vec<_> = racers.into_iter().map(|r| r.join().unwrap()).collect();
            let winners: Vec<ClientId> = outcomes
                .iter()
                .filter(|(_, o)| *o != Registration::NameTaken)
                .map(|(id, _)| *id)
                .collect();
            assert_eq!(winners.len(), 1, "round {round}: {outcomes:?}");
            let holders: Vec<ClientId> = stores[1]
                .clients()
                .unwrap()
                .into_iter()
                .filter(|c| c.client.name == n)
                .map(|c| c.client.id)
                .collect();
            assert_eq!(holders, winners, "round {round}");
            assert!(
                stores[0].client(ClientId([0; 16])).unwrap().is_none(),
                "round {round}: the stale client is gone"
            );
            stores[0].remove_client(winners[0]).unwrap();
        }
    }

    #[test]
    fn migrates_a_version_4_database_without_freeing_any_usable_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        {
            let conn = Connection::open(&path).unwrap();
            let v4 = SCHEMA.replace(
                "BETWEEN 1 AND 1100),\n    completed_at INTEGER",
                "BETWEEN 1 AND 1100)",
            );
            assert_ne!(v4, SCHEMA);
            conn.execute_batch(&v4).unwrap();
            conn.execute_batch(INLINE_SCHEMA).unwrap();
            conn.execute_batch("PRAGMA user_version = 4").unwrap();
            let insert = |id: u8, name: &str, key: Option<&[u8]>, secure: Option<&[u8]>| {
                conn.execute(
                    "INSERT INTO clients (id, name, public_key, registered, last_seen, secure_key)
                     VALUES (?1, ?2, ?3, 1000, 5000, ?4)",
                    params![&[id; 16][..], name.as_bytes(), key, secure],
                )
                .unwrap();
            };
            insert(1, "legacy-keyed", Some(&[9; 160]), None);
            insert(2, "legacy-keyless", None, None);
            insert(3, "secure", None, Some(b"der"));
            insert(4, "keyless-with-files", None, None);
            conn.execute(
                "INSERT INTO files (client_id, name) VALUES (?1, x'66')",
                [&[4u8; 16][..]],
            )
            .unwrap();
        }
        let db = SqliteMetaStore::open(&path).unwrap();
        let version: i64 = db
            .conn()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        let completed = |id: u8| db.client(ClientId([id; 16])).unwrap().unwrap().completed_at;
        let seen = Some(UNIX_EPOCH + Duration::from_millis(5000));
        assert_eq!(completed(1), seen);
        assert_eq!(
            completed(2),
            None,
            "never stored a key: could never reconnect"
        );
        assert_eq!(completed(3), seen, "may have proved its key");
        assert_eq!(completed(4), seen);
        let now = SystemTime::now();
        for (n, outcome) in [
            ("legacy-keyed", Registration::NameTaken),
            ("secure", Registration::NameTaken),
            ("keyless-with-files", Registration::NameTaken),
            (
                "legacy-keyless",
                Registration::Replaced {
                    stale: ClientId([2; 16]),
                },
            ),
        ] {
            assert_eq!(register_at(&db, 8, &name(n), None, now), outcome, "{n}");
        }
    }

    #[test]
    fn lists_by_name_then_version_in_pages() {
        let dir = tempfile::tempdir().unwrap();
        let (db, id) = open_with_client(&dir);
        for (i, name) in ["b", "a", "b", "c", "a"].iter().enumerate() {
            db.add_version(
                &version(id, name, &format!("k{i}"), i as u64),
                &Retention::KEEP_ALL,
            )
            .unwrap();
        }
        let all = db.list(id, true, 0, 100).unwrap();
        let order: Vec<(String, u64)> = all
            .iter()
            .map(|v| {
                (
                    String::from_utf8(v.file.as_bytes().to_vec()).unwrap(),
                    v.size,
                )
            })
            .collect();
        let expected = [("a", 1), ("a", 4), ("b", 0), ("b", 2), ("c", 3)];
        assert_eq!(order, expected.map(|(n, s)| (n.to_owned(), s)).to_vec());
        let page: Vec<u64> = db
            .list(id, true, 2, 2)
            .unwrap()
            .iter()
            .map(|v| v.size)
            .collect();
        assert_eq!(page, vec![0, 2]);
        let latest: Vec<u64> = db
            .list(id, false, 0, 100)
            .unwrap()
            .iter()
            .map(|v| v.size)
            .collect();
        assert_eq!(latest, vec![4, 2, 3]);
        assert!(db.list(ClientId([9; 16]), true, 0, 100).unwrap().is_empty());
        let a = FileName::try_from("a").unwrap();
        assert_eq!(db.find_version(id, &a, 0).unwrap().unwrap().size, 4);
        let first = all[0].version as u64;
        assert_eq!(db.find_version(id, &a, first).unwrap().unwrap().size, 1);
        let b_version = all[2].version as u64;
        assert!(db.find_version(id, &a, b_version).unwrap().is_none());
    }

    #[test]
    fn retention_by_age_keeps_recent_versions_and_always_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let (db, id) = open_with_client(&dir);
        let now = SystemTime::now();
        let day = Duration::from_secs(86_400);
        let mut old = version(id, "f", "old", 1);
        old.stored_at = now - 10 * day;
        let mut mid = version(id, "f", "mid", 2);
        mid.stored_at = now - 2 * day;
        let within = Retention {
            keep_last: None,
            keep_within: Some(3 * day),
        };
        db.add_version(&old, &Retention::KEEP_ALL).unwrap();
        db.add_version(&mid, &Retention::KEEP_ALL).unwrap();
        // Only the old one is out of the window.
        assert_eq!(
            db.add_version(&version(id, "f", "new", 3), &within)
                .unwrap(),
            vec![BlobKey("old".into())]
        );
        // Both rules: either keeps. keep_last 1 alone would drop "mid".
        let both = Retention {
            keep_last: Some(1),
            keep_within: Some(3 * day),
        };
        assert!(db.prune(&both, now).unwrap().is_empty());
        // Far in the future nothing is recent, but the newest stays.
        let removed = db.prune(&within, now + 100 * day).unwrap();
        assert_eq!(removed.len(), 1);
        assert_eq!(removed[0].blob, BlobKey("mid".into()));
        assert_eq!(db.all_versions().unwrap().len(), 1);
    }

    #[test]
    fn append_only_blocks_deletes_and_retention_at_commit() {
        let dir = tempfile::tempdir().unwrap();
        let (db, id) = open_with_client(&dir);
        let f = FileName::try_from("f").unwrap();
        assert!(db.set_append_only(id, true).unwrap());
        assert!(!db.set_append_only(ClientId([8; 16]), true).unwrap());
        db.add_version(&version(id, "f", "b1", 1), &last(1))
            .unwrap();
        assert!(db
            .add_version(&version(id, "f", "b2", 2), &last(1))
            .unwrap()
            .is_empty());
        assert_eq!(db.delete_file(id, &f, false).unwrap(), Deletion::Refused);
        db.set_append_only(id, false).unwrap();
        assert_eq!(db.delete_file(id, &f, true).unwrap(), Deletion::Refused);
        match db.delete_file(id, &f, false).unwrap() {
            Deletion::Deleted(v) => assert_eq!(v.len(), 2),
            other => panic!("{other:?}"),
        }
        assert_eq!(db.delete_file(id, &f, false).unwrap(), Deletion::NotFound);
    }

    #[test]
    fn summarises_and_removes_clients() {
        let dir = tempfile::tempdir().unwrap();
        let (db, id) = open_with_client(&dir);
        db.add_version(&version(id, "f", "b1", 10), &Retention::KEEP_ALL)
            .unwrap();
        db.add_version(&version(id, "f", "b2", 20), &Retention::KEEP_ALL)
            .unwrap();
        db.add_version(&version(id, "g", "b3", 5), &Retention::KEEP_ALL)
            .unwrap();
        let s = db.clients().unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!((s[0].files, s[0].versions, s[0].bytes), (2, 3, 35));
        assert_eq!(db.remove_client(id).unwrap().unwrap().len(), 3);
        assert!(db.remove_client(id).unwrap().is_none());
        assert!(db.clients().unwrap().is_empty());
        assert!(db.all_versions().unwrap().is_empty());
    }
}
