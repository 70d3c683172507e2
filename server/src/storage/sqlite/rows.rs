//! Rows as read and written: conversions, validation, and SQLite's errors
//! in the neutral terms of [`StorageError`].

use super::*;

pub(super) const VERSION_COLUMNS: &str =
    "v.id, f.client_id, f.name, v.blob, v.size, v.content_size, v.cksum, v.sha256, v.verified, v.stored_at";

/// SQLite's errors in the neutral terms of [`StorageError`]; the original
/// stays attached as the source. This is what lets `?` work on `rusqlite`
/// calls inside this backend without the interface naming `rusqlite`.
impl From<rusqlite::Error> for StorageError {
    fn from(e: rusqlite::Error) -> Self {
        use rusqlite::ErrorCode;
        const OP: &str = "database";
        match &e {
            rusqlite::Error::QueryReturnedNoRows => Self::NotFound {
                op: OP,
                what: "row".into(),
            },
            rusqlite::Error::FromSqlConversionFailure(..)
            | rusqlite::Error::InvalidColumnType(..)
            | rusqlite::Error::IntegralValueOutOfRange(..) => Self::Corrupt(e.to_string()),
            _ => match e.sqlite_error_code() {
                Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => Self::Unavailable {
                    op: OP,
                    source: e.into(),
                },
                Some(ErrorCode::ConstraintViolation) => Self::Conflict {
                    op: OP,
                    source: e.into(),
                },
                Some(ErrorCode::DiskFull) => Self::Full {
                    op: OP,
                    what: "metadata".into(),
                    source: e.into(),
                },
                Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) => {
                    Self::Corrupt(e.to_string())
                }
                _ => Self::Io {
                    op: OP,
                    what: "metadata".into(),
                    source: e.into(),
                },
            },
        }
    }
}

pub(super) fn to_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

pub(super) fn from_ms(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

pub(super) fn size_to_sql(n: u64) -> Result<i64, StorageError> {
    i64::try_from(n)
        .map_err(|_| StorageError::Corrupt(format!("size {n} does not fit the database")))
}

pub(super) fn corrupt(what: &str) -> StorageError {
    StorageError::Corrupt(what.to_owned())
}

pub(super) fn client_id(bytes: &[u8]) -> Result<ClientId, StorageError> {
    bytes
        .try_into()
        .map(ClientId)
        .map_err(|_| corrupt("a client id is not 16 bytes"))
}

/// A versions row as read, before validation.
pub(super) struct RawVersion {
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
    pub(super) fn read(row: &Row<'_>) -> rusqlite::Result<Self> {
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

    pub(super) fn into_record(self) -> Result<VersionRecord, StorageError> {
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

/// A clients row as read, before validation.
pub(super) struct RawClient {
    id: Vec<u8>,
    name: Vec<u8>,
    key: Option<Vec<u8>>,
    registered: i64,
    last_seen: i64,
    append_only: bool,
    secure_key: Option<Vec<u8>>,
    completed_at: Option<i64>,
}

/// The columns [`RawClient::read`] reads, in order.
pub(super) const CLIENT_COLUMNS: &str =
    "id, name, public_key, registered, last_seen, append_only, secure_key, completed_at";

impl RawClient {
    /// Columns read after the client's own, in a query that selects
    /// [`CLIENT_COLUMNS`] first.
    pub(super) const NEXT: usize = 8;

    pub(super) fn read(r: &Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            id: r.get(0)?,
            name: r.get(1)?,
            key: r.get(2)?,
            registered: r.get(3)?,
            last_seen: r.get(4)?,
            append_only: r.get(5)?,
            secure_key: r.get(6)?,
            completed_at: r.get(7)?,
        })
    }

    pub(super) fn into_record(self) -> Result<ClientRecord, StorageError> {
        let public_key = match self.key {
            None => None,
            Some(k) => {
                let field: [u8; PUBLIC_KEY_FIELD_LEN] = k
                    .as_slice()
                    .try_into()
                    .map_err(|_| corrupt("a public key is not 160 bytes"))?;
                Some(PublicKeyField(field))
            }
        };
        Ok(ClientRecord {
            id: client_id(&self.id)?,
            name: UserName::new(self.name).map_err(|_| corrupt("a client name is invalid"))?,
            public_key,
            registered: from_ms(self.registered),
            last_seen: from_ms(self.last_seen),
            append_only: self.append_only,
            secure_key: self.secure_key,
            completed_at: self.completed_at.map(from_ms),
        })
    }
}
