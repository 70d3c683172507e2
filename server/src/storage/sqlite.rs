//! Metadata in SQLite (bundled), in WAL mode with full synchronous commits.
//!
//! Schema version 1:
//!
//! ```sql
//! clients  (id BLOB(16) PK, name BLOB UNIQUE, public_key BLOB(160) NULL,
//!           registered INTEGER, last_seen INTEGER)            -- times in unix ms
//! files    (id INTEGER PK, client_id -> clients, name BLOB,   -- name exactly as sent
//!           UNIQUE (client_id, name))
//! versions (id INTEGER PK, file_id -> files, blob TEXT UNIQUE, size INTEGER,
//!           content_size INTEGER, cksum INTEGER, sha256 BLOB(32),
//!           verified INTEGER, stored_at INTEGER)
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

use super::{
    BlobKey, ClientRecord, MetaStore, NewVersion, Registration, StorageError, VersionRecord,
};

/// The schema version this code writes (`PRAGMA user_version`).
pub const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE clients (
    id          BLOB PRIMARY KEY CHECK (length(id) = 16),
    name        BLOB NOT NULL UNIQUE,
    public_key  BLOB CHECK (public_key IS NULL OR length(public_key) = 160),
    registered  INTEGER NOT NULL,
    last_seen   INTEGER NOT NULL
);
CREATE TABLE files (
    id         INTEGER PRIMARY KEY,
    client_id  BLOB NOT NULL REFERENCES clients (id),
    name       BLOB NOT NULL,
    UNIQUE (client_id, name)
);
CREATE TABLE versions (
    id            INTEGER PRIMARY KEY,
    file_id       INTEGER NOT NULL REFERENCES files (id),
    blob          TEXT NOT NULL UNIQUE,
    size          INTEGER NOT NULL,
    content_size  INTEGER NOT NULL,
    cksum         INTEGER NOT NULL,
    sha256        BLOB NOT NULL CHECK (length(sha256) = 32),
    verified      INTEGER NOT NULL DEFAULT 1,
    stored_at     INTEGER NOT NULL
);
CREATE INDEX versions_by_file ON versions (file_id, id);
CREATE VIEW latest_versions AS
    SELECT f.client_id, f.name, v.*
    FROM versions v JOIN files f ON f.id = v.file_id
    WHERE v.id = (SELECT max(id) FROM versions WHERE file_id = v.file_id);
";

const VERSION_COLUMNS: &str =
    "v.id, f.client_id, f.name, v.blob, v.size, v.content_size, v.cksum, v.sha256, v.verified, v.stored_at";

fn to_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn from_ms(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

fn size_to_sql(n: u64) -> Result<i64, StorageError> {
    i64::try_from(n)
        .map_err(|_| StorageError::Corrupt(format!("size {n} does not fit the database")))
}

fn corrupt(what: &str) -> StorageError {
    StorageError::Corrupt(what.to_owned())
}

fn client_id(bytes: &[u8]) -> Result<ClientId, StorageError> {
    bytes
        .try_into()
        .map(ClientId)
        .map_err(|_| corrupt("a client id is not 16 bytes"))
}

/// A versions row as read, before validation.
struct RawVersion {
    id: i64,
    client: Vec<u8>,
    name: Vec<u8>,
    blob: String,
    size: i64,
    content_size: i64,
    cksum: i64,
    sha256: Vec<u8>,
    verified: bool,
    stored_at: i64,
}

impl RawVersion {
    fn read(row: &Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            id: row.get(0)?,
            client: row.get(1)?,
            name: row.get(2)?,
            blob: row.get(3)?,
            size: row.get(4)?,
            content_size: row.get(5)?,
            cksum: row.get(6)?,
            sha256: row.get(7)?,
            verified: row.get(8)?,
            stored_at: row.get(9)?,
        })
    }

    fn into_record(self) -> Result<VersionRecord, StorageError> {
        Ok(VersionRecord {
            version: self.id,
            client: client_id(&self.client)?,
            file: FileName::new(self.name).map_err(|_| corrupt("a file name is invalid"))?,
            blob: BlobKey(self.blob),
            size: u64::try_from(self.size).map_err(|_| corrupt("a size is negative"))?,
            content_size: u64::try_from(self.content_size)
                .map_err(|_| corrupt("a size is negative"))?,
            cksum: u32::try_from(self.cksum).map_err(|_| corrupt("a cksum is out of range"))?,
            sha256: self
                .sha256
                .as_slice()
                .try_into()
                .map_err(|_| corrupt("a SHA-256 is not 32 bytes"))?,
            verified: self.verified,
            stored_at: from_ms(self.stored_at),
        })
    }
}

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

impl SqliteMetaStore {
    /// Opens (creating if needed) the database at `path` and brings its
    /// schema up to date.
    ///
    /// # Errors
    /// When the database cannot be opened, or has a newer schema.
    pub fn open(path: &Path) -> Result<Self, StorageError> {
        let mut conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(mode, "SQLite refused WAL mode");
        }
        conn.execute_batch("PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;")?;
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        match version {
            0 => {
                let tx = conn.transaction()?;
                tx.execute_batch(SCHEMA)?;
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
        let conn = self.conn();
        let sql = format!(
            "SELECT {VERSION_COLUMNS} FROM versions v JOIN files f ON f.id = v.file_id {filter}"
        );
        let mut stmt = conn.prepare_cached(&sql)?;
        let rows = stmt.query_map(params, RawVersion::read)?;
        rows.map(|r| {
            r.map_err(StorageError::from)
                .and_then(RawVersion::into_record)
        })
        .collect()
    }
}

impl MetaStore for SqliteMetaStore {
    fn register(
        &self,
        id: ClientId,
        name: &UserName,
        now: SystemTime,
    ) -> Result<Registration, StorageError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let taken: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM clients WHERE name = ?1)",
            [name.as_bytes()],
            |r| r.get(0),
        )?;
        if taken {
            return Ok(Registration::NameTaken);
        }
        let now = to_ms(now);
        tx.execute(
            "INSERT INTO clients (id, name, public_key, registered, last_seen) VALUES (?1, ?2, NULL, ?3, ?3)",
            params![&id.0[..], name.as_bytes(), now],
        )?;
        tx.commit()?;
        Ok(Registration::Created)
    }

    fn set_public_key(
        &self,
        id: ClientId,
        key: &PublicKeyField,
        now: SystemTime,
    ) -> Result<bool, StorageError> {
        let n = self.conn().execute(
            "UPDATE clients SET public_key = ?2, last_seen = ?3 WHERE id = ?1",
            params![&id.0[..], &key.0[..], to_ms(now)],
        )?;
        Ok(n > 0)
    }

    fn client(&self, id: ClientId) -> Result<Option<ClientRecord>, StorageError> {
        type Row = (Vec<u8>, Option<Vec<u8>>, i64, i64);
        let row: Option<Row> = self
            .conn()
            .query_row(
                "SELECT name, public_key, registered, last_seen FROM clients WHERE id = ?1",
                [&id.0[..]],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()?;
        let Some((name, key, registered, last_seen)) = row else {
            return Ok(None);
        };
        let public_key = match key {
            None => None,
            Some(k) => {
                let field: [u8; PUBLIC_KEY_FIELD_LEN] = k
                    .as_slice()
                    .try_into()
                    .map_err(|_| corrupt("a public key is not 160 bytes"))?;
                Some(PublicKeyField(field))
            }
        };
        Ok(Some(ClientRecord {
            id,
            name: UserName::new(name).map_err(|_| corrupt("a client name is invalid"))?,
            public_key,
            registered: from_ms(registered),
            last_seen: from_ms(last_seen),
        }))
    }

    fn touch(&self, id: ClientId, now: SystemTime) -> Result<(), StorageError> {
        self.conn().execute(
            "UPDATE clients SET last_seen = ?2 WHERE id = ?1",
            params![&id.0[..], to_ms(now)],
        )?;
        Ok(())
    }

    fn add_version(&self, v: &NewVersion, keep: u32) -> Result<Vec<BlobKey>, StorageError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let client = &v.client.0[..];
        tx.execute(
            "INSERT INTO files (client_id, name) VALUES (?1, ?2) ON CONFLICT (client_id, name) DO NOTHING",
            params![client, v.file.as_bytes()],
        )?;
        let file_id: i64 = tx.query_row(
            "SELECT id FROM files WHERE client_id = ?1 AND name = ?2",
            params![client, v.file.as_bytes()],
            |r| r.get(0),
        )?;
        tx.execute(
            "INSERT INTO versions (file_id, blob, size, content_size, cksum, sha256, verified, stored_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, 1, ?7)",
            params![
                file_id,
                v.blob.0,
                size_to_sql(v.size)?,
                size_to_sql(v.content_size)?,
                i64::from(v.cksum),
                &v.sha256[..],
                to_ms(v.stored_at)
            ],
        )?;
        let superseded = {
            let mut stmt = tx.prepare(
                "SELECT blob FROM versions WHERE file_id = ?1 ORDER BY id DESC LIMIT -1 OFFSET ?2",
            )?;
            let rows = stmt.query_map(params![file_id, i64::from(keep.max(1))], |r| {
                r.get::<_, String>(0)
            })?;
            rows.collect::<Result<Vec<_>, _>>()?
        };
        for blob in &superseded {
            tx.execute("DELETE FROM versions WHERE blob = ?1", [blob])?;
        }
        tx.execute(
            "UPDATE clients SET last_seen = ?2 WHERE id = ?1",
            params![client, to_ms(v.stored_at)],
        )?;
        tx.commit()?;
        Ok(superseded.into_iter().map(BlobKey).collect())
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
            .add_version(&version(id, "f", "b1", 1), 2)
            .unwrap()
            .is_empty());
        assert!(db
            .add_version(&version(id, "f", "b2", 2), 2)
            .unwrap()
            .is_empty());
        assert!(db
            .add_version(&version(id, "g", "b3", 3), 2)
            .unwrap()
            .is_empty());
        assert_eq!(
            db.add_version(&version(id, "f", "b4", 4), 2).unwrap(),
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
            db.add_version(&version(id, "f", "b5", 5), 1).unwrap().len(),
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
            .add_version(&version(ClientId([5; 16]), "f", "b", 1), 1)
            .is_err());
        assert!(db.all_versions().unwrap().is_empty());
    }
}
