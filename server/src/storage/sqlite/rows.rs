//! Rows as read and written: conversions, validation, and SQLite's errors
//! in the neutral terms of [`StorageError`].

use super::*;

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

/// The columns [`version`] reads, in order (`v`: versions, `f`: files).
pub(super) const VERSION_COLUMNS: &str =
    "v.id, f.client_id, f.name, v.blob, v.size, v.content_size, v.cksum, v.sha256, v.verified, v.stored_at";

/// A non-negative integer column as `u64`.
fn unsigned(row: &Row<'_>, i: usize, what: &str) -> Result<u64, StorageError> {
    u64::try_from(row.get::<_, i64>(i)?).map_err(|_| corrupt(what))
}

/// The one mapper of a versions row ([`VERSION_COLUMNS`]): read and
/// validated.
pub(super) fn version(row: &Row<'_>) -> Result<VersionRecord, StorageError> {
    let name: Vec<u8> = row.get(2)?;
    let sha256: Vec<u8> = row.get(7)?;
    Ok(VersionRecord {
        version: row.get(0)?,
        client: client_id(&row.get::<_, Vec<u8>>(1)?)?,
        file: FileName::new(name).map_err(|_| corrupt("a file name is invalid"))?,
        blob: BlobKey(row.get(3)?),
        size: unsigned(row, 4, "a size is negative")?,
        content_size: unsigned(row, 5, "a size is negative")?,
        cksum: u32::try_from(row.get::<_, i64>(6)?)
            .map_err(|_| corrupt("a cksum is out of range"))?,
        sha256: sha256
            .as_slice()
            .try_into()
            .map_err(|_| corrupt("a SHA-256 is not 32 bytes"))?,
        verified: row.get(8)?,
        stored_at: from_ms(row.get(9)?),
    })
}

/// The columns [`client`] reads, in order.
pub(super) const CLIENT_COLUMNS: &str =
    "id, name, public_key, registered, last_seen, append_only, secure_key, completed_at, quota";
/// The first column after [`CLIENT_COLUMNS`] in a query that selects them
/// first.
pub(super) const CLIENT_NEXT: usize = 9;

/// A client's own quota as its `quota` column keeps it (NULL, -1, bytes).
pub(super) fn quota_from_sql(value: Option<i64>) -> Result<QuotaSetting, StorageError> {
    Ok(match value {
        None => QuotaSetting::Inherit,
        Some(-1) => QuotaSetting::Unlimited,
        Some(n) => {
            QuotaSetting::Bytes(u64::try_from(n).map_err(|_| corrupt("a quota is negative"))?)
        }
    })
}

pub(super) fn quota_to_sql(quota: QuotaSetting) -> Result<Option<i64>, StorageError> {
    Ok(match quota {
        QuotaSetting::Inherit => None,
        QuotaSetting::Unlimited => Some(-1),
        QuotaSetting::Bytes(n) => Some(size_to_sql(n)?),
    })
}

/// The one mapper of a clients row ([`CLIENT_COLUMNS`]): read and
/// validated.
pub(super) fn client(row: &Row<'_>) -> Result<ClientRecord, StorageError> {
    let public_key = match row.get::<_, Option<Vec<u8>>>(2)? {
        None => None,
        Some(k) => {
            let field: [u8; PUBLIC_KEY_FIELD_LEN] = k
                .as_slice()
                .try_into()
                .map_err(|_| corrupt("a public key is not 160 bytes"))?;
            Some(PublicKeyField(field))
        }
    };
    let name: Vec<u8> = row.get(1)?;
    Ok(ClientRecord {
        id: client_id(&row.get::<_, Vec<u8>>(0)?)?,
        name: UserName::new(name).map_err(|_| corrupt("a client name is invalid"))?,
        public_key,
        registered: from_ms(row.get(3)?),
        last_seen: from_ms(row.get(4)?),
        append_only: row.get(5)?,
        secure_key: row.get(6)?,
        completed_at: row.get::<_, Option<i64>>(7)?.map(from_ms),
        quota: quota_from_sql(row.get(8)?)?,
    })
}

/// A clients row ([`CLIENT_COLUMNS`]) followed by its number of files,
/// versions and bytes.
pub(super) fn client_summary(row: &Row<'_>) -> Result<ClientSummary, StorageError> {
    Ok(ClientSummary {
        client: client(row)?,
        files: unsigned(row, CLIENT_NEXT, "a total is negative")?,
        versions: unsigned(row, CLIENT_NEXT + 1, "a total is negative")?,
        bytes: unsigned(row, CLIENT_NEXT + 2, "a total is negative")?,
    })
}

/// The one mapper of a (blob key, size) row, from `versions` or
/// `inline_blobs`.
pub(super) fn blob_size(row: &Row<'_>) -> Result<(BlobKey, u64), StorageError> {
    Ok((
        BlobKey(row.get(0)?),
        unsigned(row, 1, "a size is negative")?,
    ))
}
