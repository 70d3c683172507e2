//! [`RepoStore`](crate::storage::repo::RepoStore) on PostgreSQL: the same
//! statements as SQLite's (`sqlite/repo.rs`), method by method, each in one
//! `SERIALIZABLE` [`transaction!`]. Where SQLite ordered a method behind its
//! single writer (a "have" touch against a prune's delete, two packs of one
//! client against the quota, a stage against a prune), the serializable
//! transactions give the same outcome: one of two that could not both have
//! run in some order fails and runs again, seeing the other's work.
//!
//! Batches travel as arrays (`= ANY($n)`, `UNNEST`), one statement for a
//! "have" of thousands of ids or a pack of thousands of objects, and every
//! statement is prepared once per connection (`prepare_cached`).

use std::collections::{HashMap, HashSet};
use std::time::SystemTime;

use protocol::repo::message::{
    CommitRefusal, KeptReason, KeySlot, SnapshotEntry, ID_LEN, MASTER_SLOT, PASSPHRASE_SLOT,
};
use protocol::repo::ObjectId;
use protocol::ClientId;
use tokio_postgres::types::FromSql;
use tokio_postgres::Row;

use super::{from_millis, millis, to_i64, to_u64, transaction, Fail, PgMetaStore};
use crate::storage::repo::{
    DamagedSnapshot, NewPack, ObjectPlace, PackDamage, PackUsage, PackedObject, RecordedPack,
    Repacked, RepoStore, StageId,
};
use crate::storage::{BlobKey, QuotaSetting, QuotaUsage, RepoUsage, SnapshotUsage, StorageError};

/// The transaction a body runs in.
type Tx<'a> = deadpool_postgres::Transaction<'a>;

fn corrupt(what: &str) -> StorageError {
    StorageError::Corrupt(what.to_owned())
}

/// Column `i` of `row`; a column of another type than the statement
/// promises is a corrupt row, not a lost connection.
fn col<'a, T: FromSql<'a>>(row: &'a Row, i: usize) -> Result<T, StorageError> {
    row.try_get(i)
        .map_err(|e| StorageError::Corrupt(format!("column {i}: {e}")))
}

/// A non-negative `bigint` column as `u64` (`what` names it in the error).
fn unsigned(row: &Row, i: usize, what: &str) -> Result<u64, StorageError> {
    to_u64(col::<i64>(row, i)?, what)
}

fn client_id(bytes: &[u8]) -> Result<ClientId, StorageError> {
    bytes
        .try_into()
        .map(ClientId)
        .map_err(|_| corrupt("a client id is not 16 bytes"))
}

/// A client's own quota as its `quota` column keeps it (NULL, -1, bytes).
fn quota_setting(value: Option<i64>) -> Result<QuotaSetting, StorageError> {
    Ok(match value {
        None => QuotaSetting::Inherit,
        Some(-1) => QuotaSetting::Unlimited,
        Some(n) => {
            QuotaSetting::Bytes(u64::try_from(n).map_err(|_| corrupt("a quota is negative"))?)
        }
    })
}

/// A u64 the client chose (a time), kept bit for bit in a `bigint`.
fn u64_bits(n: u64) -> i64 {
    i64::from_le_bytes(n.to_le_bytes())
}

fn bits_u64(n: i64) -> u64 {
    u64::from_le_bytes(n.to_le_bytes())
}

/// A row limit as a `bigint` (`LIMIT` takes any size).
fn limit_of(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

/// What `client` stores against its quota, read inside the caller's
/// transaction: the bytes of its packs and of its per-file versions, and
/// its own quota setting over the `configured` one (`docs/PROTOCOL.md`
/// §13.9).
pub(super) async fn usage_in(
    tx: &Tx<'_>,
    client: ClientId,
    configured: Option<u64>,
) -> Result<QuotaUsage, Fail> {
    let id: &[u8] = &client.0;
    // One statement; a client without a row has no setting and no
    // versions.
    let row = tx
        .query_one(
            &tx.prepare_cached(
                "SELECT (SELECT quota FROM clients WHERE id = $1),
                        coalesce((SELECT version_bytes FROM clients WHERE id = $1), 0),
                        (SELECT coalesce(sum(size), 0) FROM packs WHERE client = $1)::bigint",
            )
            .await?,
            &[&id],
        )
        .await?;
    let setting = quota_setting(col::<Option<i64>>(&row, 0)?)?;
    let versions = unsigned(&row, 1, "client version bytes")?;
    Ok(QuotaUsage {
        stored: unsigned(&row, 2, "pack size")?.saturating_add(versions),
        quota: setting.effective(configured),
    })
}

/// Whether the client is append-only by its own flag.
async fn is_append_only(tx: &Tx<'_>, client: ClientId) -> Result<bool, Fail> {
    let id: &[u8] = &client.0;
    let row = tx
        .query_opt(
            &tx.prepare_cached("SELECT append_only FROM clients WHERE id = $1")
                .await?,
            &[&id],
        )
        .await?;
    Ok(match row {
        Some(row) => col::<bool>(&row, 0)?,
        None => false,
    })
}

/// Whether object `o` is dead (`docs/PROTOCOL.md` §13.7), `$1` being the
/// cut-off in milliseconds: no snapshot references it, no stage holds it,
/// and it was last touched before the cut-off.
const DEAD: &str = "(o.touched < $1
    AND NOT EXISTS (SELECT 1 FROM snapshot_refs r WHERE r.object = o.id)
    AND NOT EXISTS (SELECT 1 FROM repo_stage s WHERE s.object = o.id))";

/// An object of the client as a lookup finds it.
struct Found {
    row: i64,
    place: ObjectPlace,
}

/// The client's objects among `ids`, by id, in one statement. An object in
/// a pack marked damaged is not found.
async fn lookup(
    tx: &Tx<'_>,
    client: ClientId,
    ids: &[ObjectId],
) -> Result<HashMap<ObjectId, Found>, Fail> {
    let mut found = HashMap::with_capacity(ids.len());
    if ids.is_empty() {
        return Ok(found);
    }
    let stmt = tx
        .prepare_cached(
            "SELECT o.oid, o.id, p.blob, o.pack_offset, o.len
             FROM objects o JOIN packs p ON p.id = o.pack
             WHERE o.client = $1 AND o.oid = ANY($2::bytea[]) AND p.damaged IS NULL",
        )
        .await?;
    let id: &[u8] = &client.0;
    let wanted: Vec<&[u8]> = ids.iter().map(|id| &id.0[..]).collect();
    for row in tx.query(&stmt, &[&id, &wanted]).await? {
        let oid: [u8; ID_LEN] = col::<&[u8]>(&row, 0)?
            .try_into()
            .map_err(|_| corrupt("an object id is not 32 bytes"))?;
        let place = ObjectPlace {
            blob: BlobKey(col(&row, 2)?),
            offset: unsigned(&row, 3, "offset")?,
            len: u32::try_from(col::<i64>(&row, 4)?)
                .map_err(|_| corrupt("object length out of range"))?,
        };
        found.insert(
            ObjectId(oid),
            Found {
                row: col(&row, 1)?,
                place,
            },
        );
    }
    Ok(found)
}

/// Removes the snapshots `ids` of `client` and their references inside the
/// caller's transaction; returns how many there were.
async fn forget_in(tx: &Tx<'_>, client: ClientId, ids: &[u64]) -> Result<u64, Fail> {
    // An id beyond the column's range names no snapshot.
    let ids: Vec<i64> = ids
        .iter()
        .filter_map(|id| i64::try_from(*id).ok())
        .collect();
    if ids.is_empty() {
        return Ok(0);
    }
    let id: &[u8] = &client.0;
    tx.execute(
        &tx.prepare_cached(
            "DELETE FROM snapshot_refs WHERE snapshot IN
                 (SELECT id FROM snapshots WHERE id = ANY($1::bigint[]) AND client = $2)",
        )
        .await?,
        &[&ids, &id],
    )
    .await?;
    Ok(tx
        .execute(
            &tx.prepare_cached(
                "DELETE FROM snapshots WHERE id = ANY($1::bigint[]) AND client = $2",
            )
            .await?,
            &[&ids, &id],
        )
        .await?)
}

/// The first occurrence of each object of a pack, in pack order: one
/// statement may not insert one key twice, and SQLite's loop kept the
/// first place of an id listed twice.
fn first_places(objects: &[protocol::repo::pack::Located]) -> Vec<&protocol::repo::pack::Located> {
    let mut seen = HashSet::with_capacity(objects.len());
    objects.iter().filter(|o| seen.insert(o.id)).collect()
}

impl RepoStore for PgMetaStore {
    fn held(&self, client: ClientId, ids: &[ObjectId]) -> Result<Vec<Option<u32>>, StorageError> {
        // Every object answered "have" is touched in the same transaction
        // as the answer is read, so a prune that started before it keeps
        // it (`docs/PROTOCOL.md` §13.7): a prune deleting it at the same
        // time writes the same row, and one of the two runs again.
        let found = transaction!(self, "look up objects", |tx| {
            let now = millis(SystemTime::now());
            let found = lookup(&tx, client, ids).await?;
            let mut rows: Vec<i64> = found.values().map(|f| f.row).collect();
            if !rows.is_empty() {
                // In row order, so that two touches of overlapping batches
                // take their row locks in one order.
                rows.sort_unstable();
                tx.execute(
                    &tx.prepare_cached(
                        "UPDATE objects SET touched = $1
                         WHERE id = ANY($2::bigint[]) AND touched < $1",
                    )
                    .await?,
                    &[&now, &rows],
                )
                .await?;
            }
            Ok(found)
        })?;
        Ok(ids
            .iter()
            .map(|id| found.get(id).map(|f| f.place.len))
            .collect())
    }

    fn add_pack(&self, pack: &NewPack) -> Result<u32, StorageError> {
        let objects = first_places(&pack.objects);
        let oids: Vec<&[u8]> = objects.iter().map(|o| &o.id.0[..]).collect();
        let offsets = objects
            .iter()
            .map(|o| to_i64(o.offset, "object offset"))
            .collect::<Result<Vec<i64>, _>>()?;
        let lens: Vec<i64> = objects.iter().map(|o| i64::from(o.len)).collect();
        let size = to_i64(pack.size, "pack size")?;
        let touched = millis(pack.stored_at);
        let client: &[u8] = &pack.client.0;
        // The quota is read and the pack charged in one serializable
        // transaction: of two packs of one client recorded at once, each
        // sees the other, or one runs again and does.
        transaction!(self, "record a pack", |tx| {
            let usage = usage_in(&tx, pack.client, pack.quota).await?;
            if !usage.fits(pack.size) {
                // Committed as a read, so that the refusal rests on what a
                // serial order saw.
                return Ok(Err(StorageError::QuotaExceeded {
                    stored: usage.stored,
                    quota: usage.quota.unwrap_or(u64::MAX),
                    size: pack.size,
                }));
            }
            let row = tx
                .query_one(
                    &tx.prepare_cached(
                        "INSERT INTO packs (client, blob, size, sha256, stored_at)
                         VALUES ($1, $2, $3, $4, $5) RETURNING id",
                    )
                    .await?,
                    &[&client, &pack.blob.0, &size, &&pack.sha256[..], &touched],
                )
                .await?;
            let pack_row: i64 = col(&row, 0)?;
            if oids.is_empty() {
                return Ok(Ok(0u32));
            }
            // An object whose pack is marked damaged moves to this pack
            // and keeps its row, so the snapshots referencing it are whole
            // again (`docs/RELIABILITY.md`, scrub). The others held are
            // skipped.
            let added = tx
                .query(
                    &tx.prepare_cached(
                        "INSERT INTO objects (client, oid, pack, pack_offset, len, touched)
                         SELECT $1::bytea, u.oid, $2::bigint, u.pack_offset, u.len, $3::bigint
                         FROM UNNEST($4::bytea[], $5::bigint[], $6::bigint[])
                             WITH ORDINALITY AS u(oid, pack_offset, len, n)
                         ORDER BY u.n
                         ON CONFLICT (client, oid) DO UPDATE SET pack = excluded.pack,
                             pack_offset = excluded.pack_offset, len = excluded.len,
                             touched = excluded.touched
                         WHERE objects.pack IN (SELECT id FROM packs WHERE damaged IS NOT NULL)
                         RETURNING oid",
                    )
                    .await?,
                    &[&client, &pack_row, &touched, &oids, &offsets, &lens],
                )
                .await?;
            let added_ids = added
                .iter()
                .map(|r| col::<&[u8]>(r, 0))
                .collect::<Result<HashSet<&[u8]>, _>>()?;
            // An object stored again keeps its place but is touched, like
            // one answered "have".
            let skipped: Vec<&[u8]> = oids
                .iter()
                .copied()
                .filter(|o| !added_ids.contains(o))
                .collect();
            if !skipped.is_empty() {
                tx.execute(
                    &tx.prepare_cached(
                        "UPDATE objects SET touched = $3
                         WHERE client = $1 AND oid = ANY($2::bytea[]) AND touched < $3",
                    )
                    .await?,
                    &[&client, &skipped, &touched],
                )
                .await?;
            }
            Ok(Ok(u32::try_from(added_ids.len()).unwrap_or(u32::MAX)))
        })?
    }

    fn stage_refs(
        &self,
        stage: StageId,
        client: ClientId,
        first: bool,
        ids: &[ObjectId],
    ) -> Result<u32, StorageError> {
        // The lookup and the staging in one transaction: a prune deleting
        // a looked-up object conflicts with it and one of the two runs
        // again.
        transaction!(self, "stage references", |tx| {
            if first {
                tx.execute(
                    &tx.prepare_cached("DELETE FROM repo_stage WHERE stage = $1")
                        .await?,
                    &[&stage.0],
                )
                .await?;
            }
            let found = lookup(&tx, client, ids).await?;
            let mut missing = 0u32;
            let mut rows = Vec::with_capacity(found.len());
            for id in ids {
                match found.get(id) {
                    Some(f) => rows.push(f.row),
                    None => missing = missing.saturating_add(1),
                }
            }
            rows.sort_unstable();
            rows.dedup();
            if !rows.is_empty() {
                tx.execute(
                    &tx.prepare_cached(
                        "INSERT INTO repo_stage (stage, object)
                         SELECT $1::bigint, x FROM UNNEST($2::bigint[]) AS x ON CONFLICT DO NOTHING",
                    )
                    .await?,
                    &[&stage.0, &rows],
                )
                .await?;
            }
            Ok(missing)
        })
    }

    fn drop_stage(&self, stage: StageId) -> Result<(), StorageError> {
        transaction!(self, "drop a stage", |tx| {
            tx.execute(
                &tx.prepare_cached("DELETE FROM repo_stage WHERE stage = $1")
                    .await?,
                &[&stage.0],
            )
            .await?;
            Ok(())
        })
    }

    fn commit_snapshot(
        &self,
        stage: StageId,
        client: ClientId,
        time: u64,
        meta: &[u8],
        now: SystemTime,
        quota: Option<u64>,
    ) -> Result<Result<u64, (CommitRefusal, u32)>, StorageError> {
        let id: &[u8] = &client.0;
        let now = millis(now);
        let time = u64_bits(time);
        // The check and the insert in one transaction: a concurrent
        // removal of a reference conflicts with it.
        transaction!(self, "commit a snapshot", |tx| {
            let row = tx
                .query_one(
                    &tx.prepare_cached(
                        "SELECT count(*), count(*) FILTER (WHERE NOT EXISTS
                             (SELECT 1 FROM objects o JOIN packs p ON p.id = o.pack
                              WHERE o.id = s.object AND o.client = $2 AND p.damaged IS NULL))
                         FROM repo_stage s WHERE s.stage = $1",
                    )
                    .await?,
                    &[&stage.0, &id],
                )
                .await?;
            let staged: i64 = col(&row, 0)?;
            let missing: i64 = col(&row, 1)?;
            let refused = if staged == 0 {
                Some((CommitRefusal::NO_REFERENCES, 0))
            } else if missing > 0 {
                Some((
                    CommitRefusal::MISSING,
                    u32::try_from(missing).unwrap_or(u32::MAX),
                ))
            } else if !usage_in(&tx, client, quota).await?.fits(0) {
                // The backstop: every pack was charged when it was stored,
                // so a client is over only when its quota was lowered since.
                Some((CommitRefusal::QUOTA, 0))
            } else {
                None
            };
            let outcome = match refused {
                Some(refusal) => Err(refusal),
                None => {
                    let row = tx
                        .query_one(
                            &tx.prepare_cached(
                                "INSERT INTO snapshots (client, time, meta, committed_at)
                                 VALUES ($1, $2, $3, $4) RETURNING id",
                            )
                            .await?,
                            &[&id, &time, &meta, &now],
                        )
                        .await?;
                    let snapshot: i64 = col(&row, 0)?;
                    tx.execute(
                        &tx.prepare_cached(
                            "INSERT INTO snapshot_refs (snapshot, object)
                             SELECT $1::bigint, object FROM repo_stage WHERE stage = $2",
                        )
                        .await?,
                        &[&snapshot, &stage.0],
                    )
                    .await?;
                    Ok(u64::try_from(snapshot).map_err(|_| corrupt("negative snapshot id"))?)
                }
            };
            tx.execute(
                &tx.prepare_cached("DELETE FROM repo_stage WHERE stage = $1")
                    .await?,
                &[&stage.0],
            )
            .await?;
            Ok(outcome)
        })
    }

    fn snapshots(
        &self,
        client: ClientId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<SnapshotEntry>, StorageError> {
        let id: &[u8] = &client.0;
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let limit = limit_of(limit);
        transaction!(self, "list snapshots", |tx| {
            let rows = tx
                .query(
                    &tx.prepare_cached(
                        "SELECT id, time, meta FROM snapshots
                         WHERE client = $1 AND id > $2 ORDER BY id LIMIT $3",
                    )
                    .await?,
                    &[&id, &after, &limit],
                )
                .await?;
            rows.iter()
                .map(|r| {
                    Ok(SnapshotEntry {
                        id: unsigned(r, 0, "snapshot id")?,
                        time: bits_u64(col(r, 1)?),
                        meta: col::<Vec<u8>>(r, 2)?.into(),
                    })
                })
                .collect()
        })
    }

    fn usage(&self, client: ClientId, configured: Option<u64>) -> Result<QuotaUsage, StorageError> {
        transaction!(self, "read a quota", |tx| {
            usage_in(&tx, client, configured).await
        })
    }

    fn repo_usage(&self) -> Result<Vec<RepoUsage>, StorageError> {
        use std::collections::BTreeMap;
        fn entry(
            by_client: &mut BTreeMap<Vec<u8>, RepoUsage>,
            bytes: Vec<u8>,
        ) -> Result<&mut RepoUsage, StorageError> {
            let id = client_id(&bytes)?;
            Ok(by_client.entry(bytes).or_insert_with(|| RepoUsage {
                client: id,
                ..RepoUsage::default()
            }))
        }
        const TOTAL: &str = "total";
        transaction!(self, "read the repository's usage", |tx| {
            let mut by_client: BTreeMap<Vec<u8>, RepoUsage> = BTreeMap::new();
            let packs = tx
                .query(
                    "SELECT client, count(*), coalesce(sum(size), 0)::bigint
                     FROM packs GROUP BY client",
                    &[],
                )
                .await?;
            for r in &packs {
                let e = entry(&mut by_client, col(r, 0)?)?;
                e.packs = unsigned(r, 1, TOTAL)?;
                e.stored = unsigned(r, 2, TOTAL)?;
            }
            // Each snapshot's references with their objects' sizes: an
            // object counts once per snapshot that references it.
            let snaps = tx
                .query(
                    "SELECT s.client, count(*), coalesce(sum(
                         (SELECT coalesce(sum(o.len), 0) FROM snapshot_refs r
                          JOIN objects o ON o.id = r.object WHERE r.snapshot = s.id)), 0)::bigint,
                         max(s.committed_at)
                     FROM snapshots s GROUP BY s.client",
                    &[],
                )
                .await?;
            for r in &snaps {
                let e = entry(&mut by_client, col(r, 0)?)?;
                e.snapshots = unsigned(r, 1, TOTAL)?;
                e.logical = unsigned(r, 2, TOTAL)?;
                e.last_snapshot = col::<Option<i64>>(r, 3)?.map(from_millis);
            }
            Ok(by_client.into_values().collect())
        })
    }

    fn snapshot_usage(&self, client: ClientId) -> Result<Vec<SnapshotUsage>, StorageError> {
        let id: &[u8] = &client.0;
        const TOTAL: &str = "total";
        transaction!(self, "read the snapshots' usage", |tx| {
            // Unique: referenced by no other snapshot (the index by object
            // finds the others without a scan).
            let rows = tx
                .query(
                    "SELECT s.id, s.time, s.committed_at, count(o.id),
                         coalesce(sum(o.len), 0)::bigint,
                         coalesce(sum(o.len) FILTER (WHERE NOT EXISTS
                             (SELECT 1 FROM snapshot_refs x WHERE x.object = r.object
                              AND x.snapshot <> r.snapshot)), 0)::bigint
                     FROM snapshots s
                     LEFT JOIN snapshot_refs r ON r.snapshot = s.id
                     LEFT JOIN objects o ON o.id = r.object
                     WHERE s.client = $1 GROUP BY s.id ORDER BY s.id",
                    &[&id],
                )
                .await?;
            rows.iter()
                .map(|r| {
                    Ok(SnapshotUsage {
                        id: unsigned(r, 0, TOTAL)?,
                        time: bits_u64(col(r, 1)?),
                        committed_at: from_millis(col(r, 2)?),
                        objects: unsigned(r, 3, TOTAL)?,
                        logical: unsigned(r, 4, TOTAL)?,
                        unique: unsigned(r, 5, TOTAL)?,
                    })
                })
                .collect()
        })
    }

    fn locate(
        &self,
        client: ClientId,
        ids: &[ObjectId],
    ) -> Result<Vec<Option<ObjectPlace>>, StorageError> {
        let found = transaction!(self, "locate objects", |tx| {
            lookup(&tx, client, ids).await
        })?;
        // An id asked twice gets its place twice.
        Ok(ids
            .iter()
            .map(|id| found.get(id).map(|f| f.place.clone()))
            .collect())
    }

    fn put_key(
        &self,
        client: ClientId,
        slot: u8,
        envelope: &[u8],
        now: SystemTime,
        append_only: bool,
    ) -> Result<bool, StorageError> {
        let id: &[u8] = &client.0;
        let slot_row = i64::from(slot);
        let now = millis(now);
        transaction!(self, "store a key envelope", |tx| {
            let once = slot == MASTER_SLOT || append_only || is_append_only(&tx, client).await?;
            let sql = if once {
                "INSERT INTO key_envelopes (client, slot, envelope, stored_at)
                 VALUES ($1, $2, $3, $4) ON CONFLICT (client, slot) DO NOTHING"
            } else {
                "INSERT INTO key_envelopes (client, slot, envelope, stored_at)
                 VALUES ($1, $2, $3, $4) ON CONFLICT (client, slot) DO UPDATE
                 SET envelope = excluded.envelope, stored_at = excluded.stored_at"
            };
            let changed = tx
                .execute(
                    &tx.prepare_cached(sql).await?,
                    &[&id, &slot_row, &envelope, &now],
                )
                .await?;
            Ok(changed > 0)
        })
    }

    fn delete_key(
        &self,
        client: ClientId,
        slot: u8,
        append_only: bool,
    ) -> Result<Result<(), KeptReason>, StorageError> {
        let id: &[u8] = &client.0;
        transaction!(self, "delete a key envelope", |tx| {
            if append_only || is_append_only(&tx, client).await? {
                return Ok(Err(KeptReason::APPEND_ONLY));
            }
            let probe = tx
                .prepare_cached("SELECT 1 FROM key_envelopes WHERE client = $1 AND slot = $2")
                .await?;
            let held = |slot: u8| {
                let probe = &probe;
                let tx = &tx;
                async move {
                    Ok::<_, Fail>(
                        tx.query_opt(probe, &[&id, &i64::from(slot)])
                            .await?
                            .is_some(),
                    )
                }
            };
            if !held(slot).await? {
                return Ok(Err(KeptReason::EMPTY));
            }
            let partner = match slot {
                MASTER_SLOT => Some(PASSPHRASE_SLOT),
                PASSPHRASE_SLOT => Some(MASTER_SLOT),
                _ => None,
            };
            if let Some(other) = partner {
                if !held(other).await? {
                    return Ok(Err(KeptReason::LAST_WAY_IN));
                }
            }
            tx.execute(
                &tx.prepare_cached("DELETE FROM key_envelopes WHERE client = $1 AND slot = $2")
                    .await?,
                &[&id, &i64::from(slot)],
            )
            .await?;
            Ok(Ok(()))
        })
    }

    fn passphrase_envelope(
        &self,
        name: &protocol::UserName,
    ) -> Result<Option<(ClientId, Vec<u8>)>, StorageError> {
        let name = name.as_bytes();
        let slot = i64::from(PASSPHRASE_SLOT);
        transaction!(self, "find a passphrase envelope", |tx| {
            let row = tx
                .query_opt(
                    &tx.prepare_cached(
                        "SELECT c.id, k.envelope FROM clients c
                         JOIN key_envelopes k ON k.client = c.id
                         WHERE c.name = $1 AND c.completed_at IS NOT NULL AND k.slot = $2",
                    )
                    .await?,
                    &[&name, &slot],
                )
                .await?;
            let Some(row) = row else {
                return Ok(None);
            };
            Ok(Some((client_id(col(&row, 0)?)?, col(&row, 1)?)))
        })
    }

    fn keys(&self, client: ClientId) -> Result<Vec<KeySlot>, StorageError> {
        let id: &[u8] = &client.0;
        transaction!(self, "list key envelopes", |tx| {
            let rows = tx
                .query(
                    &tx.prepare_cached(
                        "SELECT slot, envelope FROM key_envelopes WHERE client = $1 ORDER BY slot",
                    )
                    .await?,
                    &[&id],
                )
                .await?;
            rows.iter()
                .map(|r| {
                    Ok(KeySlot {
                        slot: u8::try_from(col::<i64>(r, 0)?)
                            .map_err(|_| corrupt("key slot out of range"))?,
                        envelope: col::<Vec<u8>>(r, 1)?.into(),
                    })
                })
                .collect()
        })
    }

    fn recorded_packs(
        &self,
        after: Option<&BlobKey>,
        limit: usize,
    ) -> Result<Vec<(BlobKey, u64)>, StorageError> {
        // Every key sorts after the empty string; keys compare in byte
        // order (`COLLATE "C"`).
        let after = after.map_or("", |k| k.0.as_str());
        let limit = limit_of(limit);
        transaction!(self, "list recorded packs", |tx| {
            let rows = tx
                .query(
                    &tx.prepare_cached(
                        "SELECT blob, size FROM packs WHERE blob > $1 ORDER BY blob LIMIT $2",
                    )
                    .await?,
                    &[&after, &limit],
                )
                .await?;
            rows.iter()
                .map(|r| Ok((BlobKey(col(r, 0)?), unsigned(r, 1, "size")?)))
                .collect()
        })
    }

    fn clear_stages(&self) -> Result<usize, StorageError> {
        transaction!(self, "clear the stages", |tx| {
            let n = tx.execute("DELETE FROM repo_stage", &[]).await?;
            Ok(usize::try_from(n).unwrap_or(usize::MAX))
        })
    }

    fn snapshot_stamps(&self) -> Result<Vec<(ClientId, u64, u64)>, StorageError> {
        transaction!(self, "list every snapshot", |tx| {
            let rows = tx
                .query(
                    "SELECT client, id, time FROM snapshots ORDER BY client, id",
                    &[],
                )
                .await?;
            rows.iter()
                .map(|r| {
                    Ok((
                        client_id(col(r, 0)?)?,
                        unsigned(r, 1, "snapshot id")?,
                        bits_u64(col(r, 2)?),
                    ))
                })
                .collect()
        })
    }

    fn forget_snapshots(&self, client: ClientId, ids: &[u64]) -> Result<u64, StorageError> {
        transaction!(self, "forget snapshots", |tx| {
            forget_in(&tx, client, ids).await
        })
    }

    fn client_forget(
        &self,
        client: ClientId,
        ids: &[u64],
        server_append_only: bool,
    ) -> Result<Option<u64>, StorageError> {
        transaction!(self, "forget snapshots", |tx| {
            if server_append_only || is_append_only(&tx, client).await? {
                return Ok(None);
            }
            Ok(Some(forget_in(&tx, client, ids).await?))
        })
    }

    fn pack_usage(&self, cutoff: SystemTime) -> Result<Vec<PackUsage>, StorageError> {
        let cutoff = millis(cutoff);
        let sql = format!(
            "WITH d AS (SELECT o.pack, o.len, {DEAD} AS dead FROM objects o)
             SELECT p.id, p.client, p.blob, p.size,
                 count(d.pack) FILTER (WHERE NOT d.dead),
                 coalesce(sum(d.len) FILTER (WHERE NOT d.dead), 0)::bigint,
                 count(d.pack) FILTER (WHERE d.dead),
                 coalesce(sum(d.len) FILTER (WHERE d.dead), 0)::bigint
             FROM packs p LEFT JOIN d ON d.pack = p.id
             WHERE p.damaged IS NULL
             GROUP BY p.id ORDER BY p.client, p.id"
        );
        const COUNT: &str = "size or count";
        transaction!(self, "read the packs' usage", |tx| {
            let rows = tx
                .query(&tx.prepare_cached(&sql).await?, &[&cutoff])
                .await?;
            rows.iter()
                .map(|r| {
                    Ok(PackUsage {
                        id: col(r, 0)?,
                        client: client_id(col(r, 1)?)?,
                        blob: BlobKey(col(r, 2)?),
                        size: unsigned(r, 3, COUNT)?,
                        live_objects: unsigned(r, 4, COUNT)?,
                        live_bytes: unsigned(r, 5, COUNT)?,
                        dead_objects: unsigned(r, 6, COUNT)?,
                        dead_bytes: unsigned(r, 7, COUNT)?,
                    })
                })
                .collect()
        })
    }

    fn delete_dead(
        &self,
        cutoff: SystemTime,
        after: i64,
        limit: usize,
    ) -> Result<(u64, u64, Option<i64>), StorageError> {
        let cutoff = millis(cutoff);
        let limit = limit_of(limit);
        let dead_sql =
            format!("SELECT o.id, o.len FROM objects o WHERE o.id BETWEEN $2 AND $3 AND {DEAD}");
        // Deciding that an object is dead and deleting it in one
        // transaction: a "have", stage or commit that keeps it conflicts
        // with the delete, and one of the two runs again.
        transaction!(self, "delete dead objects", |tx| {
            let ids: Vec<i64> = tx
                .query(
                    &tx.prepare_cached("SELECT id FROM objects WHERE id > $1 ORDER BY id LIMIT $2")
                        .await?,
                    &[&after, &limit],
                )
                .await?
                .iter()
                .map(|r| col(r, 0))
                .collect::<Result<_, _>>()?;
            let (Some(first), Some(last)) = (ids.first(), ids.last()) else {
                return Ok((0, 0, None));
            };
            let dead = tx
                .query(
                    &tx.prepare_cached(&dead_sql).await?,
                    &[&cutoff, first, last],
                )
                .await?;
            let mut rows = Vec::with_capacity(dead.len());
            let mut bytes = 0u64;
            for r in &dead {
                rows.push(col::<i64>(r, 0)?);
                bytes = bytes.saturating_add(u64::try_from(col::<i64>(r, 1)?).unwrap_or(0));
            }
            if !rows.is_empty() {
                tx.execute(
                    &tx.prepare_cached("DELETE FROM objects WHERE id = ANY($1::bigint[])")
                        .await?,
                    &[&rows],
                )
                .await?;
            }
            Ok((rows.len() as u64, bytes, Some(*last)))
        })
    }

    fn drop_empty_packs(&self, now: SystemTime) -> Result<(u64, u64), StorageError> {
        const EMPTY: &str = "NOT EXISTS (SELECT 1 FROM objects o WHERE o.pack = p.id)";
        let now = millis(now);
        transaction!(self, "drop empty packs", |tx| {
            let row = tx
                .query_one(
                    &format!(
                        "SELECT count(*), coalesce(sum(size), 0)::bigint FROM packs p WHERE {EMPTY}"
                    ),
                    &[],
                )
                .await?;
            let (count, bytes): (i64, i64) = (col(&row, 0)?, col(&row, 1)?);
            tx.execute(
                &format!(
                    "INSERT INTO pack_trash (blob, since) SELECT blob, $1::bigint FROM packs p
                     WHERE {EMPTY} ON CONFLICT DO NOTHING"
                ),
                &[&now],
            )
            .await?;
            tx.execute(&format!("DELETE FROM packs p WHERE {EMPTY}"), &[])
                .await?;
            Ok((
                u64::try_from(count).unwrap_or(0),
                u64::try_from(bytes).unwrap_or(0),
            ))
        })
    }

    fn pack_objects(&self, pack: i64) -> Result<Vec<PackedObject>, StorageError> {
        transaction!(self, "list a pack's objects", |tx| {
            let rows = tx
                .query(
                    &tx.prepare_cached(
                        "SELECT id, pack_offset, len FROM objects WHERE pack = $1
                         ORDER BY pack_offset",
                    )
                    .await?,
                    &[&pack],
                )
                .await?;
            rows.iter()
                .map(|r| {
                    Ok(PackedObject {
                        object: col(r, 0)?,
                        pack,
                        offset: unsigned(r, 1, "offset")?,
                        len: u32::try_from(col::<i64>(r, 2)?)
                            .map_err(|_| corrupt("object length out of range"))?,
                    })
                })
                .collect()
        })
    }

    fn trash(&self, blob: &BlobKey, now: SystemTime) -> Result<(), StorageError> {
        let now = millis(now);
        transaction!(self, "trash a pack", |tx| {
            tx.execute(
                &tx.prepare_cached(
                    "INSERT INTO pack_trash (blob, since) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                )
                .await?,
                &[&blob.0, &now],
            )
            .await?;
            Ok(())
        })
    }

    fn trash_due(&self, before: SystemTime, limit: usize) -> Result<Vec<BlobKey>, StorageError> {
        let before = millis(before);
        let limit = limit_of(limit);
        transaction!(self, "list the trash", |tx| {
            let rows = tx
                .query(
                    &tx.prepare_cached(
                        "SELECT blob FROM pack_trash WHERE since <= $1 ORDER BY blob LIMIT $2",
                    )
                    .await?,
                    &[&before, &limit],
                )
                .await?;
            rows.iter().map(|r| Ok(BlobKey(col(r, 0)?))).collect()
        })
    }

    fn untrash(&self, blob: &BlobKey) -> Result<(), StorageError> {
        transaction!(self, "untrash a pack", |tx| {
            tx.execute(
                &tx.prepare_cached("DELETE FROM pack_trash WHERE blob = $1")
                    .await?,
                &[&blob.0],
            )
            .await?;
            Ok(())
        })
    }

    fn replace_packs(&self, pack: &Repacked, now: SystemTime) -> Result<bool, StorageError> {
        let client: &[u8] = &pack.client.0;
        let size = to_i64(pack.size, "pack size")?;
        let now = millis(now);
        let objects: Vec<i64> = pack.moved.iter().map(|(o, _)| o.object).collect();
        let from_packs: Vec<i64> = pack.moved.iter().map(|(o, _)| o.pack).collect();
        let from_offsets = pack
            .moved
            .iter()
            .map(|(o, _)| to_i64(o.offset, "object offset"))
            .collect::<Result<Vec<i64>, _>>()?;
        let to_offsets = pack
            .moved
            .iter()
            .map(|(_, offset)| to_i64(*offset, "object offset"))
            .collect::<Result<Vec<i64>, _>>()?;
        let moved = u64::try_from(pack.moved.len()).unwrap_or(u64::MAX);
        transaction!(self, "replace packs", |tx| {
            // Refusing undoes what was written before the refusal; the
            // transaction itself commits, so that its reads are known to
            // be those of a serial order.
            tx.batch_execute("SAVEPOINT replace_packs").await?;
            let row = tx
                .query_one(
                    &tx.prepare_cached(
                        "INSERT INTO packs (client, blob, size, sha256, stored_at)
                         VALUES ($1, $2, $3, $4, $5) RETURNING id",
                    )
                    .await?,
                    &[&client, &pack.blob.0, &size, &&pack.sha256[..], &now],
                )
                .await?;
            let row: i64 = col(&row, 0)?;
            // Each object moves only from where it was; one listed twice
            // moves once and the count tells.
            let n = if objects.is_empty() {
                0
            } else {
                tx.execute(
                    &tx.prepare_cached(
                        "UPDATE objects o SET pack = $1, pack_offset = u.to_offset
                         FROM UNNEST($2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[])
                             AS u(id, from_pack, from_offset, to_offset)
                         WHERE o.id = u.id AND o.pack = u.from_pack
                             AND o.pack_offset = u.from_offset",
                    )
                    .await?,
                    &[&row, &objects, &from_packs, &from_offsets, &to_offsets],
                )
                .await?
            };
            let mut sound = n == moved;
            if sound && !pack.replaces.is_empty() {
                let left = tx
                    .query_one(
                        &tx.prepare_cached(
                            "SELECT count(*) FROM objects WHERE pack = ANY($1::bigint[])",
                        )
                        .await?,
                        &[&pack.replaces],
                    )
                    .await?;
                sound = col::<i64>(&left, 0)? == 0;
                if sound {
                    tx.execute(
                        &tx.prepare_cached(
                            "INSERT INTO pack_trash (blob, since)
                             SELECT blob, $2::bigint FROM packs WHERE id = ANY($1::bigint[])
                             ON CONFLICT DO NOTHING",
                        )
                        .await?,
                        &[&pack.replaces, &now],
                    )
                    .await?;
                    tx.execute(
                        &tx.prepare_cached("DELETE FROM packs WHERE id = ANY($1::bigint[])")
                            .await?,
                        &[&pack.replaces],
                    )
                    .await?;
                }
            }
            if !sound {
                tx.batch_execute("ROLLBACK TO SAVEPOINT replace_packs")
                    .await?;
                return Ok(false);
            }
            tx.execute(
                &tx.prepare_cached("DELETE FROM pack_trash WHERE blob = $1")
                    .await?,
                &[&pack.blob.0],
            )
            .await?;
            Ok(true)
        })
    }

    fn scrub_packs(&self, after: i64, limit: usize) -> Result<Vec<RecordedPack>, StorageError> {
        let limit = limit_of(limit);
        transaction!(self, "list packs to scrub", |tx| {
            let rows = tx
                .query(
                    &tx.prepare_cached(
                        "SELECT id, client, blob, size, sha256, damaged IS NOT NULL FROM packs
                         WHERE id > $1 ORDER BY id LIMIT $2",
                    )
                    .await?,
                    &[&after, &limit],
                )
                .await?;
            rows.iter()
                .map(|r| {
                    Ok(RecordedPack {
                        id: col(r, 0)?,
                        client: client_id(col(r, 1)?)?,
                        blob: BlobKey(col(r, 2)?),
                        size: unsigned(r, 3, "pack size")?,
                        sha256: col::<&[u8]>(r, 4)?
                            .try_into()
                            .map_err(|_| corrupt("a pack digest is not 32 bytes"))?,
                        damaged: col(r, 5)?,
                    })
                })
                .collect()
        })
    }

    fn pack_damage(&self, pack: i64) -> Result<Option<PackDamage>, StorageError> {
        transaction!(self, "read a pack's damage", |tx| {
            let exists = tx
                .query_opt(
                    &tx.prepare_cached("SELECT id FROM packs WHERE id = $1")
                        .await?,
                    &[&pack],
                )
                .await?;
            if exists.is_none() {
                return Ok(None);
            }
            let row = tx
                .query_one(
                    &tx.prepare_cached(
                        "SELECT count(*), coalesce(sum(len), 0)::bigint FROM objects
                         WHERE pack = $1",
                    )
                    .await?,
                    &[&pack],
                )
                .await?;
            let (objects, bytes): (i64, i64) = (col(&row, 0)?, col(&row, 1)?);
            let rows = tx
                .query(
                    &tx.prepare_cached(
                        "SELECT s.id, s.client, c.name FROM snapshots s
                             LEFT JOIN clients c ON c.id = s.client
                         WHERE s.id IN (SELECT r.snapshot FROM snapshot_refs r
                             JOIN objects o ON o.id = r.object WHERE o.pack = $1)
                         ORDER BY s.id",
                    )
                    .await?,
                    &[&pack],
                )
                .await?;
            let snapshots = rows
                .iter()
                .map(|r| {
                    let name: Option<&[u8]> = col(r, 2)?;
                    Ok(DamagedSnapshot {
                        id: unsigned(r, 0, "snapshot id")?,
                        client: client_id(col(r, 1)?)?,
                        client_name: String::from_utf8_lossy(name.unwrap_or_default()).into_owned(),
                    })
                })
                .collect::<Result<Vec<_>, StorageError>>()?;
            Ok(Some(PackDamage {
                objects: u64::try_from(objects).unwrap_or(0),
                object_bytes: u64::try_from(bytes).unwrap_or(0),
                snapshots,
            }))
        })
    }

    fn mark_damaged(&self, pack: i64, now: SystemTime) -> Result<bool, StorageError> {
        let now = millis(now);
        transaction!(self, "mark a pack damaged", |tx| {
            let n = tx
                .execute(
                    &tx.prepare_cached(
                        "UPDATE packs SET damaged = $2 WHERE id = $1 AND damaged IS NULL",
                    )
                    .await?,
                    &[&pack, &now],
                )
                .await?;
            Ok(n > 0)
        })
    }
}
