//! The repository extension's metadata in SQLite (the tables are in
//! `schema.rs`, `REPO_SCHEMA`). Every lookup of an object is by (client,
//! id): another client's object is as absent as one never stored.

use std::collections::HashMap;

use protocol::repo::message::{
    CommitRefusal, KeptReason, KeySlot, SnapshotEntry, ID_LEN, MASTER_SLOT, PASSPHRASE_SLOT,
};
use protocol::repo::ObjectId;
use rusqlite::Transaction;

use super::*;
use crate::storage::repo::{
    DamagedSnapshot, NewPack, ObjectPlace, PackDamage, PackUsage, PackedObject, RecordedPack,
    Repacked, RepoStore, StageId,
};
use crate::storage::{QuotaUsage, RepoUsage, SnapshotUsage};

/// The quota in force for `client`: its own setting over the `configured`
/// one (`None`: no quota), read inside the caller's transaction.
pub(super) fn quota_in(
    conn: &Connection,
    client: ClientId,
    configured: Option<u64>,
) -> Result<Option<u64>, StorageError> {
    let own: Option<Option<i64>> = conn
        .prepare_cached("SELECT quota FROM clients WHERE id = ?1")?
        .query_row([&client.0[..]], |r| r.get(0))
        .optional()?;
    Ok(quota_from_sql(own.flatten())?.effective(configured))
}

/// What `client` stores against its quota, read inside the caller's
/// transaction: the bytes of its packs and of its per-file versions, and
/// its own quota setting over the `configured` one (`docs/PROTOCOL.md`
/// §13.9).
pub(super) fn usage_in(
    conn: &Connection,
    client: ClientId,
    configured: Option<u64>,
) -> Result<QuotaUsage, StorageError> {
    let own: Option<(Option<i64>, i64)> = conn
        .prepare_cached("SELECT quota, version_bytes FROM clients WHERE id = ?1")?
        .query_row([&client.0[..]], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let (own, versions) = own.unwrap_or((None, 0));
    let setting = quota_from_sql(own)?;
    let packs: i64 = conn
        .prepare_cached("SELECT coalesce(sum(size), 0) FROM packs WHERE client = ?1")?
        .query_row([&client.0[..]], |r| r.get(0))?;
    let packs = u64::try_from(packs).map_err(|_| corrupt("a pack size is negative"))?;
    let versions =
        u64::try_from(versions).map_err(|_| corrupt("a client's version bytes are negative"))?;
    Ok(QuotaUsage {
        stored: packs.saturating_add(versions),
        quota: setting.effective(configured),
    })
}

/// Whether object `o` is dead (`docs/PROTOCOL.md` §13.7), `?1` being the
/// cut-off in milliseconds: no snapshot references it, no stage holds it,
/// and it was last touched before the cut-off.
const DEAD: &str = "(o.touched < ?1
    AND NOT EXISTS (SELECT 1 FROM snapshot_refs r WHERE r.object = o.id)
    AND NOT EXISTS (SELECT 1 FROM repo_stage s WHERE s.object = o.id))";

/// Ids looked up by one statement: well under SQLite's limit on
/// parameters, and one prepared statement for every full chunk.
const LOOKUP_CHUNK: usize = 256;

/// An object of the client as a lookup finds it.
struct Found {
    row: i64,
    place: ObjectPlace,
}

/// The client's objects among `ids`, by id, `LOOKUP_CHUNK` ids a query.
/// An object in a pack marked damaged is not found.
fn lookup(
    conn: &Connection,
    client: ClientId,
    ids: &[ObjectId],
) -> Result<HashMap<ObjectId, Found>, StorageError> {
    let mut found = HashMap::with_capacity(ids.len());
    // Always LOOKUP_CHUNK parameters (a short chunk repeats its first id),
    // so that one cached statement serves every chunk.
    let marks = vec!["?"; LOOKUP_CHUNK].join(",");
    let sql = format!(
        "SELECT o.oid, o.id, p.blob, o.pack_offset, o.len
         FROM objects o JOIN packs p ON p.id = o.pack
         WHERE o.client = ?1 AND o.oid IN ({marks}) AND p.damaged IS NULL"
    );
    let client = &client.0[..];
    for chunk in ids.chunks(LOOKUP_CHUNK) {
        let Some(first) = chunk.first() else {
            continue;
        };
        let mut stmt = conn.prepare_cached(&sql)?;
        let mut id_bytes: Vec<&[u8]> = chunk.iter().map(|id| &id.0[..]).collect();
        id_bytes.resize(LOOKUP_CHUNK, &first.0[..]);
        let mut params: Vec<&dyn rusqlite::ToSql> = Vec::with_capacity(LOOKUP_CHUNK + 1);
        params.push(&client);
        params.extend(id_bytes.iter().map(|b| b as &dyn rusqlite::ToSql));
        let rows = stmt.query_map(params.as_slice(), |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, i64>(4)?,
            ))
        })?;
        for row in rows {
            let (oid, row, blob, offset, len) = row?;
            let oid: [u8; ID_LEN] = oid
                .as_slice()
                .try_into()
                .map_err(|_| corrupt("an object id is not 32 bytes"))?;
            let place = ObjectPlace {
                blob: BlobKey(blob),
                offset: u64::try_from(offset).map_err(|_| corrupt("negative offset"))?,
                len: u32::try_from(len).map_err(|_| corrupt("object length out of range"))?,
            };
            found.insert(ObjectId(oid), Found { row, place });
        }
    }
    Ok(found)
}

/// Removes every repository row of client `id`, inside the caller's
/// transaction (its pack blobs go with its blob folder).
pub(super) fn remove_client_rows(tx: &Transaction<'_>, id: ClientId) -> Result<(), StorageError> {
    let client = &id.0[..];
    tx.execute(
        "DELETE FROM snapshot_refs WHERE snapshot IN (SELECT id FROM snapshots WHERE client = ?1)",
        [client],
    )?;
    tx.execute("DELETE FROM snapshots WHERE client = ?1", [client])?;
    tx.execute("DELETE FROM objects WHERE client = ?1", [client])?;
    tx.execute("DELETE FROM packs WHERE client = ?1", [client])?;
    tx.execute("DELETE FROM key_envelopes WHERE client = ?1", [client])?;
    Ok(())
}

/// Removes the snapshots `ids` of `client` and their references inside the
/// caller's transaction; returns how many there were.
fn forget_in(tx: &Transaction<'_>, client: ClientId, ids: &[u64]) -> Result<u64, StorageError> {
    let mut refs = tx.prepare_cached(
        "DELETE FROM snapshot_refs WHERE snapshot =
             (SELECT id FROM snapshots WHERE id = ?1 AND client = ?2)",
    )?;
    let mut snap = tx.prepare_cached("DELETE FROM snapshots WHERE id = ?1 AND client = ?2")?;
    let mut removed = 0u64;
    for id in ids {
        let Ok(id) = i64::try_from(*id) else {
            continue;
        };
        refs.execute(params![id, &client.0[..]])?;
        removed += snap.execute(params![id, &client.0[..]])? as u64;
    }
    Ok(removed)
}

/// A u64 the client chose (a time), kept bit for bit in an INTEGER.
fn u64_bits(n: u64) -> i64 {
    i64::from_le_bytes(n.to_le_bytes())
}

fn bits_u64(n: i64) -> u64 {
    u64::from_le_bytes(n.to_le_bytes())
}

impl RepoStore for SqliteMetaStore {
    fn held(&self, client: ClientId, ids: &[ObjectId]) -> Result<Vec<Option<u32>>, StorageError> {
        // Every object answered "have" is touched in the same transaction
        // as the answer is read, so a prune that started before it keeps
        // it (`docs/PROTOCOL.md` §13.7).
        let now = to_ms(SystemTime::now());
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let found = lookup(&tx, client, ids)?;
        {
            let mut touch = tx
                .prepare_cached("UPDATE objects SET touched = ?1 WHERE id = ?2 AND touched < ?1")?;
            for f in found.values() {
                touch.execute(params![now, f.row])?;
            }
        }
        tx.commit()?;
        Ok(ids
            .iter()
            .map(|id| found.get(id).map(|f| f.place.len))
            .collect())
    }

    fn add_pack(&self, pack: &NewPack) -> Result<u32, StorageError> {
        let mut conn = self.conn();
        // Immediate: the quota is read and the pack charged under the
        // write lock, so of two packs of one client (two connections, or
        // an operator's command in another process) each sees the other.
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let usage = usage_in(&tx, pack.client, pack.quota)?;
        if !usage.fits(pack.size) {
            return Err(StorageError::QuotaExceeded {
                stored: usage.stored,
                quota: usage.quota.unwrap_or(u64::MAX),
                size: pack.size,
            });
        }
        let client = &pack.client.0[..];
        tx.prepare_cached(
            "INSERT INTO packs (client, blob, size, sha256, stored_at) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?
        .execute(params![
            client,
            pack.blob.0,
            size_to_sql(pack.size)?,
            &pack.sha256[..],
            to_ms(pack.stored_at)
        ])?;
        let pack_row = tx.last_insert_rowid();
        let mut added = 0u32;
        {
            // An object whose pack is marked damaged moves to this pack
            // and keeps its row, so the snapshots referencing it are whole
            // again (`docs/RELIABILITY.md`, scrub).
            let mut insert = tx.prepare_cached(
                "INSERT INTO objects (client, oid, pack, pack_offset, len, touched)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (client, oid) DO UPDATE SET pack = excluded.pack,
                     pack_offset = excluded.pack_offset, len = excluded.len,
                     touched = excluded.touched
                 WHERE objects.pack IN (SELECT id FROM packs WHERE damaged IS NOT NULL)",
            )?;
            // An object stored again keeps its place but is touched, like
            // one answered "have".
            let mut touch = tx.prepare_cached(
                "UPDATE objects SET touched = ?3 WHERE client = ?1 AND oid = ?2 AND touched < ?3",
            )?;
            let touched = to_ms(pack.stored_at);
            for o in &pack.objects {
                let n = insert.execute(params![
                    client,
                    &o.id.0[..],
                    pack_row,
                    size_to_sql(o.offset)?,
                    i64::from(o.len),
                    touched
                ])?;
                if n > 0 {
                    added = added.saturating_add(1);
                } else {
                    touch.execute(params![client, &o.id.0[..], touched])?;
                }
            }
        }
        tx.commit()?;
        Ok(added)
    }

    fn stage_refs(
        &self,
        stage: StageId,
        client: ClientId,
        first: bool,
        ids: &[ObjectId],
    ) -> Result<u32, StorageError> {
        let mut conn = self.conn();
        // Immediate: the lookup and the staging under the write lock, so a
        // prune cannot delete a looked-up object before it is staged.
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        if first {
            tx.prepare_cached("DELETE FROM repo_stage WHERE stage = ?1")?
                .execute([stage.0])?;
        }
        let found = lookup(&tx, client, ids)?;
        let mut missing = 0u32;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO repo_stage (stage, object) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
            )?;
            for id in ids {
                match found.get(id) {
                    Some(f) => {
                        insert.execute(params![stage.0, f.row])?;
                    }
                    None => missing = missing.saturating_add(1),
                }
            }
        }
        tx.commit()?;
        Ok(missing)
    }

    fn drop_stage(&self, stage: StageId) -> Result<(), StorageError> {
        self.conn()
            .prepare_cached("DELETE FROM repo_stage WHERE stage = ?1")?
            .execute([stage.0])?;
        Ok(())
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
        let mut conn = self.conn();
        // Immediate: the check and the insert under the write lock, so no
        // other writer can remove a reference in between.
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let client_bytes = &client.0[..];
        let (staged, missing): (i64, i64) = tx.query_row(
            "SELECT count(*), count(*) FILTER (WHERE NOT EXISTS
                 (SELECT 1 FROM objects o JOIN packs p ON p.id = o.pack
                  WHERE o.id = s.object AND o.client = ?2 AND p.damaged IS NULL))
             FROM repo_stage s WHERE s.stage = ?1",
            params![stage.0, client_bytes],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let refused = if staged == 0 {
            Some((CommitRefusal::NO_REFERENCES, 0))
        } else if missing > 0 {
            Some((
                CommitRefusal::MISSING,
                u32::try_from(missing).unwrap_or(u32::MAX),
            ))
        } else if !usage_in(&tx, client, quota)?.fits(0) {
            // The backstop: every pack was charged when it was stored, so
            // a client is over only when its quota was lowered since.
            Some((CommitRefusal::QUOTA, 0))
        } else {
            None
        };
        let outcome = match refused {
            Some(refusal) => Err(refusal),
            None => {
                tx.execute(
                    "INSERT INTO snapshots (client, time, meta, committed_at) VALUES (?1, ?2, ?3, ?4)",
                    params![client_bytes, u64_bits(time), meta, to_ms(now)],
                )?;
                let id = tx.last_insert_rowid();
                tx.execute(
                    "INSERT INTO snapshot_refs (snapshot, object)
                     SELECT ?1, object FROM repo_stage WHERE stage = ?2",
                    params![id, stage.0],
                )?;
                Ok(u64::try_from(id).map_err(|_| corrupt("negative snapshot id"))?)
            }
        };
        tx.execute("DELETE FROM repo_stage WHERE stage = ?1", [stage.0])?;
        tx.commit()?;
        Ok(outcome)
    }

    fn snapshots(
        &self,
        client: ClientId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<SnapshotEntry>, StorageError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT id, time, meta FROM snapshots WHERE client = ?1 AND id > ?2 ORDER BY id LIMIT ?3",
        )?;
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = stmt.query_map(params![&client.0[..], after, limit], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, Vec<u8>>(2)?,
            ))
        })?;
        rows.map(|r| {
            let (id, time, meta) = r?;
            Ok(SnapshotEntry {
                id: u64::try_from(id).map_err(|_| corrupt("negative snapshot id"))?,
                time: bits_u64(time),
                meta: meta.into(),
            })
        })
        .collect()
    }

    fn usage(&self, client: ClientId, configured: Option<u64>) -> Result<QuotaUsage, StorageError> {
        usage_in(&self.conn(), client, configured)
    }

    fn repo_usage(&self) -> Result<Vec<RepoUsage>, StorageError> {
        let conn = self.conn();
        let mut by_client: std::collections::BTreeMap<Vec<u8>, RepoUsage> =
            std::collections::BTreeMap::new();
        fn entry(
            by_client: &mut std::collections::BTreeMap<Vec<u8>, RepoUsage>,
            bytes: Vec<u8>,
        ) -> Result<&mut RepoUsage, StorageError> {
            let id = client_id(&bytes)?;
            Ok(by_client.entry(bytes).or_insert_with(|| RepoUsage {
                client: id,
                ..RepoUsage::default()
            }))
        }
        let unsigned = |n: i64| u64::try_from(n).map_err(|_| corrupt("a total is negative"));
        let mut packs = conn.prepare(
            "SELECT client, count(*), coalesce(sum(size), 0) FROM packs GROUP BY client",
        )?;
        let rows = packs.query_map([], |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })?;
        for row in rows {
            let (client, n, bytes) = row?;
            let e = entry(&mut by_client, client)?;
            e.packs = unsigned(n)?;
            e.stored = unsigned(bytes)?;
        }
        // Each snapshot's references with their objects' sizes: an object
        // counts once per snapshot that references it.
        let mut snaps = conn.prepare(
            "SELECT s.client, count(*), coalesce(sum(
                 (SELECT coalesce(sum(o.len), 0) FROM snapshot_refs r JOIN objects o ON o.id = r.object
                  WHERE r.snapshot = s.id)), 0), max(s.committed_at)
             FROM snapshots s GROUP BY s.client",
        )?;
        let rows = snaps.query_map([], |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, Option<i64>>(3)?,
            ))
        })?;
        for row in rows {
            let (client, n, logical, last) = row?;
            let e = entry(&mut by_client, client)?;
            e.snapshots = unsigned(n)?;
            e.logical = unsigned(logical)?;
            e.last_snapshot = last.map(from_ms);
        }
        Ok(by_client.into_values().collect())
    }

    fn snapshot_usage(&self, client: ClientId) -> Result<Vec<SnapshotUsage>, StorageError> {
        let conn = self.conn();
        // Unique: referenced by no other snapshot (the index by object
        // finds the others without a scan).
        let mut stmt = conn.prepare(
            "SELECT s.id, s.time, s.committed_at, count(o.id), coalesce(sum(o.len), 0),
                    coalesce(sum(o.len) FILTER (WHERE NOT EXISTS
                        (SELECT 1 FROM snapshot_refs x WHERE x.object = r.object
                         AND x.snapshot <> r.snapshot)), 0)
             FROM snapshots s
             LEFT JOIN snapshot_refs r ON r.snapshot = s.id
             LEFT JOIN objects o ON o.id = r.object
             WHERE s.client = ?1 GROUP BY s.id ORDER BY s.id",
        )?;
        let rows = stmt.query_map([&client.0[..]], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, i64>(5)?,
            ))
        })?;
        let unsigned = |n: i64| u64::try_from(n).map_err(|_| corrupt("a total is negative"));
        rows.map(|row| {
            let (id, time, committed, objects, logical, unique) = row?;
            Ok(SnapshotUsage {
                id: unsigned(id)?,
                time: bits_u64(time),
                committed_at: from_ms(committed),
                objects: unsigned(objects)?,
                logical: unsigned(logical)?,
                unique: unsigned(unique)?,
            })
        })
        .collect()
    }

    fn locate(
        &self,
        client: ClientId,
        ids: &[ObjectId],
    ) -> Result<Vec<Option<ObjectPlace>>, StorageError> {
        let found = lookup(&self.conn(), client, ids)?;
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
        let conn = self.conn();
        let once = slot == MASTER_SLOT || append_only || is_append_only(&conn, client)?;
        let sql = if once {
            "INSERT INTO key_envelopes (client, slot, envelope, stored_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (client, slot) DO NOTHING"
        } else {
            "INSERT INTO key_envelopes (client, slot, envelope, stored_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (client, slot) DO UPDATE SET envelope = excluded.envelope,
                 stored_at = excluded.stored_at"
        };
        let changed = conn.execute(
            sql,
            params![&client.0[..], i64::from(slot), envelope, to_ms(now)],
        )?;
        Ok(changed > 0)
    }

    fn delete_key(
        &self,
        client: ClientId,
        slot: u8,
        append_only: bool,
    ) -> Result<Result<(), KeptReason>, StorageError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        if append_only || is_append_only(&tx, client)? {
            return Ok(Err(KeptReason::APPEND_ONLY));
        }
        let held = |slot: u8| -> Result<bool, StorageError> {
            Ok(tx
                .query_row(
                    "SELECT 1 FROM key_envelopes WHERE client = ?1 AND slot = ?2",
                    params![&client.0[..], i64::from(slot)],
                    |_| Ok(()),
                )
                .optional()?
                .is_some())
        };
        if !held(slot)? {
            return Ok(Err(KeptReason::EMPTY));
        }
        let partner = match slot {
            MASTER_SLOT => Some(PASSPHRASE_SLOT),
            PASSPHRASE_SLOT => Some(MASTER_SLOT),
            _ => None,
        };
        if let Some(other) = partner {
            if !held(other)? {
                return Ok(Err(KeptReason::LAST_WAY_IN));
            }
        }
        tx.execute(
            "DELETE FROM key_envelopes WHERE client = ?1 AND slot = ?2",
            params![&client.0[..], i64::from(slot)],
        )?;
        tx.commit()?;
        Ok(Ok(()))
    }

    fn passphrase_envelope(
        &self,
        name: &protocol::UserName,
    ) -> Result<Option<(ClientId, Vec<u8>)>, StorageError> {
        let conn = self.conn();
        let row = conn
            .query_row(
                "SELECT c.id, k.envelope FROM clients c JOIN key_envelopes k ON k.client = c.id
                 WHERE c.name = ?1 AND c.completed_at IS NOT NULL AND k.slot = ?2",
                params![name.as_bytes(), i64::from(PASSPHRASE_SLOT)],
                |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, Vec<u8>>(1)?)),
            )
            .optional()?;
        let Some((id, envelope)) = row else {
            return Ok(None);
        };
        let id: [u8; 16] = id
            .as_slice()
            .try_into()
            .map_err(|_| corrupt("client id of the wrong width"))?;
        Ok(Some((ClientId(id), envelope)))
    }

    fn keys(&self, client: ClientId) -> Result<Vec<KeySlot>, StorageError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT slot, envelope FROM key_envelopes WHERE client = ?1 ORDER BY slot",
        )?;
        let rows = stmt.query_map([&client.0[..]], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?))
        })?;
        rows.map(|r| {
            let (slot, envelope) = r?;
            Ok(KeySlot {
                slot: u8::try_from(slot).map_err(|_| corrupt("key slot out of range"))?,
                envelope: envelope.into(),
            })
        })
        .collect()
    }

    fn recorded_packs(
        &self,
        after: Option<&BlobKey>,
        limit: usize,
    ) -> Result<Vec<(BlobKey, u64)>, StorageError> {
        self.keys_after(
            "SELECT blob, size FROM packs WHERE blob > ?1 ORDER BY blob LIMIT ?2",
            after,
            limit,
        )
    }

    fn clear_stages(&self) -> Result<usize, StorageError> {
        Ok(self.conn().execute("DELETE FROM repo_stage", [])?)
    }

    fn snapshot_stamps(&self) -> Result<Vec<(ClientId, u64, u64)>, StorageError> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT client, id, time FROM snapshots ORDER BY client, id")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })?;
        rows.map(|r| {
            let (client, id, time) = r?;
            let client: [u8; 16] = client
                .as_slice()
                .try_into()
                .map_err(|_| corrupt("a client id is not 16 bytes"))?;
            Ok((
                ClientId(client),
                u64::try_from(id).map_err(|_| corrupt("negative snapshot id"))?,
                bits_u64(time),
            ))
        })
        .collect()
    }

    fn forget_snapshots(&self, client: ClientId, ids: &[u64]) -> Result<u64, StorageError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let removed = forget_in(&tx, client, ids)?;
        tx.commit()?;
        Ok(removed)
    }

    fn client_forget(
        &self,
        client: ClientId,
        ids: &[u64],
        server_append_only: bool,
    ) -> Result<Option<u64>, StorageError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let own: bool = tx
            .query_row(
                "SELECT append_only FROM clients WHERE id = ?1",
                [&client.0[..]],
                |r| r.get(0),
            )
            .optional()?
            .unwrap_or(false);
        if own || server_append_only {
            return Ok(None);
        }
        let removed = forget_in(&tx, client, ids)?;
        tx.commit()?;
        Ok(Some(removed))
    }

    fn pack_usage(&self, cutoff: SystemTime) -> Result<Vec<PackUsage>, StorageError> {
        let conn = self.conn();
        let sql = format!(
            "WITH d AS (SELECT o.pack, o.len, {DEAD} AS dead FROM objects o)
             SELECT p.id, p.client, p.blob, p.size,
                 count(d.pack) FILTER (WHERE NOT d.dead),
                 coalesce(sum(d.len) FILTER (WHERE NOT d.dead), 0),
                 count(d.pack) FILTER (WHERE d.dead),
                 coalesce(sum(d.len) FILTER (WHERE d.dead), 0)
             FROM packs p LEFT JOIN d ON d.pack = p.id
             WHERE p.damaged IS NULL
             GROUP BY p.id ORDER BY p.client, p.id"
        );
        let mut stmt = conn.prepare(&sql)?;
        let rows = stmt.query_map([to_ms(cutoff)], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, String>(2)?,
                [
                    r.get::<_, i64>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, i64>(5)?,
                    r.get::<_, i64>(6)?,
                    r.get::<_, i64>(7)?,
                ],
            ))
        })?;
        let count = |n: i64| u64::try_from(n).map_err(|_| corrupt("negative size or count"));
        rows.map(|r| {
            let (id, client, blob, [size, lo, lb, dob, db]) = r?;
            let client: [u8; 16] = client
                .as_slice()
                .try_into()
                .map_err(|_| corrupt("a client id is not 16 bytes"))?;
            Ok(PackUsage {
                id,
                client: ClientId(client),
                blob: BlobKey(blob),
                size: count(size)?,
                live_objects: count(lo)?,
                live_bytes: count(lb)?,
                dead_objects: count(dob)?,
                dead_bytes: count(db)?,
            })
        })
        .collect()
    }

    fn delete_dead(
        &self,
        cutoff: SystemTime,
        after: i64,
        limit: usize,
    ) -> Result<(u64, u64, Option<i64>), StorageError> {
        let mut conn = self.conn();
        // Immediate: deciding that an object is dead and deleting it under
        // one write lock, so no "have", stage or commit comes in between.
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let (examined, dead) = {
            let mut scan =
                tx.prepare_cached("SELECT id FROM objects WHERE id > ?1 ORDER BY id LIMIT ?2")?;
            let ids: Vec<i64> = scan
                .query_map(params![after, limit], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            let sql = format!(
                "SELECT o.id, o.len FROM objects o WHERE o.id BETWEEN ?2 AND ?3 AND {DEAD}"
            );
            let dead: Vec<(i64, i64)> = match (ids.first(), ids.last()) {
                (Some(first), Some(last)) => tx
                    .prepare_cached(&sql)?
                    .query_map(params![to_ms(cutoff), first, last], |r| {
                        Ok((r.get(0)?, r.get(1)?))
                    })?
                    .collect::<Result<_, _>>()?,
                _ => Vec::new(),
            };
            (ids.last().copied(), dead)
        };
        let mut bytes = 0u64;
        {
            let mut delete = tx.prepare_cached("DELETE FROM objects WHERE id = ?1")?;
            for (id, len) in &dead {
                delete.execute([id])?;
                bytes = bytes.saturating_add(u64::try_from(*len).unwrap_or(0));
            }
        }
        tx.commit()?;
        Ok((dead.len() as u64, bytes, examined))
    }

    fn drop_empty_packs(&self, now: SystemTime) -> Result<(u64, u64), StorageError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        const EMPTY: &str = "NOT EXISTS (SELECT 1 FROM objects o WHERE o.pack = p.id)";
        let (count, bytes): (i64, i64) = tx.query_row(
            &format!("SELECT count(*), coalesce(sum(size), 0) FROM packs p WHERE {EMPTY}"),
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        tx.execute(
            &format!(
                "INSERT INTO pack_trash (blob, since) SELECT blob, ?1 FROM packs p WHERE {EMPTY}
                 ON CONFLICT DO NOTHING"
            ),
            [to_ms(now)],
        )?;
        tx.execute(&format!("DELETE FROM packs AS p WHERE {EMPTY}"), [])?;
        tx.commit()?;
        Ok((
            u64::try_from(count).unwrap_or(0),
            u64::try_from(bytes).unwrap_or(0),
        ))
    }

    fn pack_objects(&self, pack: i64) -> Result<Vec<PackedObject>, StorageError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT id, pack_offset, len FROM objects WHERE pack = ?1 ORDER BY pack_offset",
        )?;
        let rows = stmt.query_map([pack], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })?;
        rows.map(|r| {
            let (object, offset, len) = r?;
            Ok(PackedObject {
                object,
                pack,
                offset: u64::try_from(offset).map_err(|_| corrupt("negative offset"))?,
                len: u32::try_from(len).map_err(|_| corrupt("object length out of range"))?,
            })
        })
        .collect()
    }

    fn trash(&self, blob: &BlobKey, now: SystemTime) -> Result<(), StorageError> {
        self.conn().execute(
            "INSERT INTO pack_trash (blob, since) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
            params![blob.0, to_ms(now)],
        )?;
        Ok(())
    }

    fn trash_due(&self, before: SystemTime, limit: usize) -> Result<Vec<BlobKey>, StorageError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT blob FROM pack_trash WHERE since <= ?1 ORDER BY blob LIMIT ?2",
        )?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = stmt.query_map(params![to_ms(before), limit], |r| r.get::<_, String>(0))?;
        rows.map(|r| Ok(BlobKey(r?))).collect()
    }

    fn untrash(&self, blob: &BlobKey) -> Result<(), StorageError> {
        self.conn()
            .execute("DELETE FROM pack_trash WHERE blob = ?1", [&blob.0])?;
        Ok(())
    }

    fn scrub_packs(&self, after: i64, limit: usize) -> Result<Vec<RecordedPack>, StorageError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT id, client, blob, size, sha256, damaged IS NOT NULL FROM packs
             WHERE id > ?1 ORDER BY id LIMIT ?2",
        )?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = stmt.query_map(params![after, limit], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, Vec<u8>>(4)?,
                r.get::<_, bool>(5)?,
            ))
        })?;
        rows.map(|r| {
            let (id, client, blob, size, sha256, damaged) = r?;
            Ok(RecordedPack {
                id,
                client: ClientId(
                    client
                        .as_slice()
                        .try_into()
                        .map_err(|_| corrupt("a client id is not 16 bytes"))?,
                ),
                blob: BlobKey(blob),
                size: u64::try_from(size).map_err(|_| corrupt("negative pack size"))?,
                sha256: sha256
                    .as_slice()
                    .try_into()
                    .map_err(|_| corrupt("a pack digest is not 32 bytes"))?,
                damaged,
            })
        })
        .collect()
    }

    fn pack_damage(&self, pack: i64) -> Result<Option<PackDamage>, StorageError> {
        let conn = self.conn();
        let exists: Option<i64> = conn
            .query_row("SELECT id FROM packs WHERE id = ?1", [pack], |r| r.get(0))
            .optional()?;
        if exists.is_none() {
            return Ok(None);
        }
        let (objects, bytes): (i64, i64) = conn.query_row(
            "SELECT count(*), coalesce(sum(len), 0) FROM objects WHERE pack = ?1",
            [pack],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let mut stmt = conn.prepare_cached(
            "SELECT s.id, s.client, c.name FROM snapshots s
                 LEFT JOIN clients c ON c.id = s.client
             WHERE s.id IN (SELECT r.snapshot FROM snapshot_refs r
                 JOIN objects o ON o.id = r.object WHERE o.pack = ?1)
             ORDER BY s.id",
        )?;
        let rows = stmt.query_map([pack], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, Option<Vec<u8>>>(2)?,
            ))
        })?;
        let snapshots = rows
            .map(|r| {
                let (id, client, name) = r?;
                Ok(DamagedSnapshot {
                    id: u64::try_from(id).map_err(|_| corrupt("negative snapshot id"))?,
                    client: ClientId(
                        client
                            .as_slice()
                            .try_into()
                            .map_err(|_| corrupt("a client id is not 16 bytes"))?,
                    ),
                    client_name: String::from_utf8_lossy(&name.unwrap_or_default()).into_owned(),
                })
            })
            .collect::<Result<Vec<_>, StorageError>>()?;
        Ok(Some(PackDamage {
            objects: u64::try_from(objects).unwrap_or(0),
            object_bytes: u64::try_from(bytes).unwrap_or(0),
            snapshots,
        }))
    }

    fn mark_damaged(&self, pack: i64, now: SystemTime) -> Result<bool, StorageError> {
        let n = self.conn().execute(
            "UPDATE packs SET damaged = ?2 WHERE id = ?1 AND damaged IS NULL",
            params![pack, to_ms(now)],
        )?;
        Ok(n > 0)
    }

    fn replace_packs(&self, pack: &Repacked, now: SystemTime) -> Result<bool, StorageError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.execute(
            "INSERT INTO packs (client, blob, size, sha256, stored_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                &pack.client.0[..],
                pack.blob.0,
                size_to_sql(pack.size)?,
                &pack.sha256[..],
                to_ms(now)
            ],
        )?;
        let row = tx.last_insert_rowid();
        {
            let mut moving = tx.prepare_cached(
                "UPDATE objects SET pack = ?1, pack_offset = ?2 WHERE id = ?3 AND pack = ?4
                     AND pack_offset = ?5",
            )?;
            for (o, offset) in &pack.moved {
                let n = moving.execute(params![
                    row,
                    size_to_sql(*offset)?,
                    o.object,
                    o.pack,
                    size_to_sql(o.offset)?
                ])?;
                if n != 1 {
                    return Ok(false);
                }
            }
            let mut left = tx.prepare_cached("SELECT count(*) FROM objects WHERE pack = ?1")?;
            let mut trash = tx.prepare_cached(
                "INSERT INTO pack_trash (blob, since) SELECT blob, ?2 FROM packs WHERE id = ?1
                 ON CONFLICT DO NOTHING",
            )?;
            let mut remove = tx.prepare_cached("DELETE FROM packs WHERE id = ?1")?;
            for old in &pack.replaces {
                let n: i64 = left.query_row([old], |r| r.get(0))?;
                if n != 0 {
                    return Ok(false);
                }
                trash.execute(params![old, to_ms(now)])?;
                remove.execute([old])?;
            }
        }
        tx.execute("DELETE FROM pack_trash WHERE blob = ?1", [&pack.blob.0])?;
        tx.commit()?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::repo::pack::Located;

    fn store() -> (tempfile::TempDir, SqliteMetaStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteMetaStore::open(&dir.path().join("db")).unwrap();
        (dir, store)
    }

    fn id(n: u8) -> ObjectId {
        ObjectId([n; ID_LEN])
    }

    fn pack(client: ClientId, blob: &str, ids: &[u8]) -> NewPack {
        NewPack {
            client,
            blob: BlobKey(blob.into()),
            size: 100 * ids.len() as u64,
            sha256: [1; 32],
            stored_at: SystemTime::now(),
            quota: None,
            objects: ids
                .iter()
                .enumerate()
                .map(|(i, n)| Located {
                    id: id(*n),
                    offset: 100 * i as u64,
                    len: 100,
                })
                .collect(),
        }
    }

    const A: ClientId = ClientId([0xa; 16]);
    const B: ClientId = ClientId([0xb; 16]);

    #[test]
    fn records_objects_once_per_client_and_finds_them_in_batches() {
        let (_dir, s) = store();
        assert_eq!(s.add_pack(&pack(A, "p1", &[1, 2, 3])).unwrap(), 3);
        // An id already held is skipped; another client's equal id is its own.
        assert_eq!(s.add_pack(&pack(A, "p2", &[3, 4])).unwrap(), 1);
        assert_eq!(s.add_pack(&pack(B, "p3", &[1])).unwrap(), 1);
        // More ids than one lookup statement takes.
        let mut ids: Vec<ObjectId> = (0..=255u8).map(id).collect();
        ids.extend([id(4), id(200), id(3)]);
        let have = s.have(A, &ids).unwrap();
        assert_eq!(have.len(), ids.len());
        for (i, (oid, h)) in ids.iter().zip(&have).enumerate() {
            assert_eq!(*h, (1..=4).contains(&oid.0[0]), "id {i}");
        }
        let places = s.locate(A, &[id(3), id(9), id(4)]).unwrap();
        assert_eq!(
            places,
            vec![
                Some(ObjectPlace {
                    blob: BlobKey("p1".into()),
                    offset: 200,
                    len: 100
                }),
                None,
                Some(ObjectPlace {
                    blob: BlobKey("p2".into()),
                    offset: 100,
                    len: 100
                }),
            ]
        );
        assert_eq!(s.have(B, &[id(1), id(2)]).unwrap(), vec![true, false]);
    }

    #[test]
    fn commits_staged_references_once_all_are_present() {
        let (_dir, s) = store();
        s.add_pack(&pack(A, "p1", &[1, 2])).unwrap();
        s.add_pack(&pack(B, "p2", &[3])).unwrap();
        let now = SystemTime::now();
        let stage = StageId::random();
        assert_eq!(
            s.commit_snapshot(stage, A, 1, b"m", now, None).unwrap(),
            Err((CommitRefusal::NO_REFERENCES, 0)),
            "nothing staged"
        );
        // B's object counts as missing for A, and is not staged.
        assert_eq!(s.stage_refs(stage, A, true, &[id(1), id(3)]).unwrap(), 1);
        assert_eq!(s.stage_refs(stage, A, false, &[id(1), id(9)]).unwrap(), 1);
        let first = s
            .commit_snapshot(stage, A, u64::MAX, b"one", now, None)
            .unwrap()
            .unwrap();
        assert_eq!(s.stage_refs(stage, A, true, &[id(2)]).unwrap(), 0);
        let second = s
            .commit_snapshot(stage, A, 5, b"two", now, None)
            .unwrap()
            .unwrap();
        assert!(second > first);
        let refs: i64 = s
            .conn()
            .query_row("SELECT count(*) FROM snapshot_refs", [], |r| r.get(0))
            .unwrap();
        assert_eq!(refs, 2, "one reference each, the duplicate staged once");
        let listed = s.snapshots(A, 0, 10).unwrap();
        assert_eq!(
            listed,
            vec![
                SnapshotEntry {
                    id: first,
                    time: u64::MAX,
                    meta: "one".into()
                },
                SnapshotEntry {
                    id: second,
                    time: 5,
                    meta: "two".into()
                },
            ]
        );
        assert_eq!(s.snapshots(A, first, 10).unwrap().len(), 1);
        assert_eq!(s.snapshots(A, 0, 1).unwrap().len(), 1);
        assert!(s.snapshots(B, 0, 10).unwrap().is_empty());
    }

    #[test]
    fn refuses_a_commit_whose_staged_object_went_away() {
        let (_dir, s) = store();
        s.add_pack(&pack(A, "p1", &[1, 2])).unwrap();
        let stage = StageId::random();
        assert_eq!(s.stage_refs(stage, A, true, &[id(1), id(2)]).unwrap(), 0);
        s.conn()
            .execute("DELETE FROM objects WHERE oid = ?1", [&id(2).0[..]])
            .unwrap();
        let now = SystemTime::now();
        assert_eq!(
            s.commit_snapshot(stage, A, 1, b"m", now, None).unwrap(),
            Err((CommitRefusal::MISSING, 1))
        );
        assert!(s.snapshots(A, 0, 10).unwrap().is_empty());
        assert_eq!(
            s.commit_snapshot(stage, A, 1, b"m", now, None).unwrap(),
            Err((CommitRefusal::NO_REFERENCES, 0)),
            "the refused stage was dropped"
        );
    }

    #[test]
    fn removes_an_envelope_only_while_another_way_to_the_master_key_stays() {
        let (_dir, s) = store();
        let now = SystemTime::now();
        assert_eq!(s.delete_key(A, 0, false).unwrap(), Err(KeptReason::EMPTY));
        s.put_key(A, 0, b"rsa", now, false).unwrap();
        assert_eq!(
            s.delete_key(A, 0, false).unwrap(),
            Err(KeptReason::LAST_WAY_IN),
            "the RSA envelope goes only once a passphrase envelope is there"
        );
        s.put_key(A, 1, b"pass", now, false).unwrap();
        s.put_key(A, 2, b"backup", now, false).unwrap();
        assert_eq!(
            s.delete_key(A, 0, true).unwrap(),
            Err(KeptReason::APPEND_ONLY)
        );
        assert_eq!(s.delete_key(A, 2, false).unwrap(), Ok(()));
        assert_eq!(s.delete_key(A, 0, false).unwrap(), Ok(()));
        assert_eq!(
            s.delete_key(A, 1, false).unwrap(),
            Err(KeptReason::LAST_WAY_IN),
            "the passphrase envelope is now the only one"
        );
        let slots: Vec<u8> = s.keys(A).unwrap().iter().map(|k| k.slot).collect();
        assert_eq!(slots, vec![1]);
    }

    #[test]
    fn writes_every_slot_once_under_append_only() {
        let (_dir, s) = store();
        let now = SystemTime::now();
        assert!(s.put_key(A, 1, b"pass", now, true).unwrap());
        assert!(!s.put_key(A, 1, b"pass2", now, true).unwrap());
        assert!(s.put_key(A, 1, b"pass3", now, false).unwrap());
        assert_eq!(s.keys(A).unwrap()[0].envelope, "pass3");
        // The client's own flag, as `backup-server append-only CLIENT on` sets it.
        let name = protocol::UserName::try_from("flagged").unwrap();
        s.register_with_key(B, &name, b"der", now).unwrap();
        s.put_key(B, 0, b"rsa", now, false).unwrap();
        s.put_key(B, 1, b"pass", now, false).unwrap();
        assert!(s.set_append_only(B, true).unwrap());
        assert!(!s.put_key(B, 1, b"pass2", now, false).unwrap());
        assert_eq!(
            s.delete_key(B, 0, false).unwrap(),
            Err(KeptReason::APPEND_ONLY)
        );
        assert_eq!(s.keys(B).unwrap()[1].envelope, "pass");
    }

    #[test]
    fn finds_the_passphrase_envelope_of_a_completed_client_by_name() {
        let (_dir, s) = store();
        let now = SystemTime::now();
        let name = protocol::UserName::try_from("alice").unwrap();
        s.register_with_key(A, &name, b"der", now).unwrap();
        s.put_key(A, 1, b"pass", now, false).unwrap();
        assert_eq!(
            s.passphrase_envelope(&name).unwrap(),
            None,
            "not before the registration is complete"
        );
        assert!(s.complete(A, now).unwrap());
        assert_eq!(
            s.passphrase_envelope(&name).unwrap(),
            Some((A, b"pass".to_vec()))
        );
        let other = protocol::UserName::try_from("bob").unwrap();
        assert_eq!(s.passphrase_envelope(&other).unwrap(), None);
    }

    #[test]
    fn keeps_one_envelope_per_slot_and_client_and_clears_stages() {
        let (_dir, s) = store();
        let now = SystemTime::now();
        assert!(s.put_key(A, 0, b"rsa", now, false).unwrap());
        assert!(s.put_key(A, 3, b"pass", now, false).unwrap());
        // Slot 0, the master key's, is written once; the others are replaced.
        assert!(!s.put_key(A, 0, b"rsa2", now, false).unwrap());
        assert!(s.put_key(A, 3, b"pass2", now, false).unwrap());
        assert!(s.put_key(B, 1, b"b", now, false).unwrap());
        let slots = s.keys(A).unwrap();
        assert_eq!(
            slots,
            vec![
                KeySlot {
                    slot: 0,
                    envelope: "rsa".into()
                },
                KeySlot {
                    slot: 3,
                    envelope: "pass2".into()
                },
            ]
        );
        s.add_pack(&pack(A, "p1", &[1])).unwrap();
        s.stage_refs(StageId(1), A, true, &[id(1)]).unwrap();
        s.stage_refs(StageId(2), A, true, &[id(1)]).unwrap();
        assert_eq!(s.clear_stages().unwrap(), 2);
        assert_eq!(
            s.recorded_packs(None, 10).unwrap(),
            vec![(BlobKey("p1".into()), 100)]
        );
    }

    #[test]
    fn upgrades_a_version_5_database_with_the_repository_tables() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        drop(SqliteMetaStore::open(&path).unwrap());
        {
            // What a version 5 server left: no repository tables.
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(
                "DROP TRIGGER versions_charge; DROP TRIGGER versions_refund;
                 ALTER TABLE clients DROP COLUMN version_bytes;
                 ALTER TABLE clients DROP COLUMN quota;
                 DROP TABLE snapshot_refs; DROP TABLE repo_stage; DROP TABLE key_envelopes;
                 DROP TABLE pack_trash;
                 DROP TABLE snapshots; DROP TABLE objects; DROP TABLE packs;
                 PRAGMA user_version = 5;",
            )
            .unwrap();
        }
        let s = SqliteMetaStore::open(&path).unwrap();
        let version: i64 = s
            .conn()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        assert_eq!(s.add_pack(&pack(A, "p1", &[1])).unwrap(), 1);
    }

    #[test]
    fn upgrades_a_version_6_database_with_what_prune_needs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            let s = SqliteMetaStore::open(&path).unwrap();
            s.add_pack(&pack(A, "p1", &[1])).unwrap();
        }
        {
            // What a version 6 server left.
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(
                "DROP TRIGGER versions_charge; DROP TRIGGER versions_refund;
                 ALTER TABLE clients DROP COLUMN version_bytes;
                 ALTER TABLE clients DROP COLUMN quota; ALTER TABLE packs DROP COLUMN damaged;
                 DROP TABLE pack_trash; DROP INDEX snapshot_refs_by_object;
                 DROP INDEX repo_stage_by_object; ALTER TABLE objects DROP COLUMN touched;
                 PRAGMA user_version = 6;",
            )
            .unwrap();
        }
        let s = SqliteMetaStore::open(&path).unwrap();
        let (version, touched): (i64, i64) = s
            .conn()
            .query_row(
                "SELECT (SELECT user_version FROM pragma_user_version), touched FROM objects",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        // Counted as touched at the upgrade: the first prune keeps it for
        // its grace period.
        let now = to_ms(SystemTime::now());
        assert!(touched > now - 60_000 && touched <= now, "{touched} {now}");
        s.trash(&BlobKey("x".into()), SystemTime::now()).unwrap();
    }

    fn registered(s: &SqliteMetaStore, client: ClientId, name: &str) {
        s.register(
            client,
            &UserName::try_from(name).unwrap(),
            SystemTime::now(),
        )
        .unwrap();
    }

    fn quota_refusal(e: StorageError) -> (u64, u64, u64) {
        match e {
            StorageError::QuotaExceeded {
                stored,
                quota,
                size,
            } => (stored, quota, size),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn charges_packs_to_the_quota_exactly_at_it_and_refuses_one_byte_over() {
        let (_dir, s) = store();
        registered(&s, A, "a");
        assert!(s.set_quota(A, QuotaSetting::Bytes(300)).unwrap());
        // 200 bytes, then 100 more: exactly at the quota.
        assert_eq!(s.add_pack(&pack(A, "p1", &[1, 2])).unwrap(), 2);
        assert_eq!(s.add_pack(&pack(A, "p2", &[3])).unwrap(), 1);
        let usage = s.usage(A, None).unwrap();
        assert_eq!((usage.stored, usage.quota), (300, Some(300)));
        // One byte over: refused, nothing recorded.
        let mut one_over = pack(A, "p3", &[4]);
        one_over.size = 1;
        one_over.objects[0].len = 1;
        assert_eq!(
            quota_refusal(s.add_pack(&one_over).unwrap_err()),
            (300, 300, 1)
        );
        assert_eq!(s.have(A, &[id(4)]).unwrap(), vec![false]);
        assert_eq!(s.recorded_packs(None, 10).unwrap().len(), 2);
        // An object already held, sent again, is charged as it lies: the
        // pack is on disk.
        let p4 = pack(A, "p4", &[1]);
        let size = p4.size;
        assert_eq!(
            quota_refusal(s.add_pack(&p4).unwrap_err()),
            (300, 300, size)
        );
        // Another client is charged nothing of A's.
        assert_eq!(s.usage(B, Some(0)).unwrap().stored, 0);
    }

    #[test]
    fn a_clients_own_quota_overrides_the_configured_one() {
        let (_dir, s) = store();
        registered(&s, A, "a");
        s.add_pack(&pack(A, "p1", &[1])).unwrap();
        let configured = Some(150);
        let mut big = pack(A, "p2", &[2]);
        big.quota = configured;
        assert_eq!(
            quota_refusal(s.add_pack(&big).unwrap_err()),
            (100, 150, 100)
        );
        s.set_quota(A, QuotaSetting::Unlimited).unwrap();
        assert_eq!(s.usage(A, configured).unwrap().quota, None);
        assert_eq!(s.add_pack(&big).unwrap(), 1);
        s.set_quota(A, QuotaSetting::Bytes(1000)).unwrap();
        assert_eq!(s.usage(A, configured).unwrap().quota, Some(1000));
        s.set_quota(A, QuotaSetting::Inherit).unwrap();
        assert_eq!(s.usage(A, configured).unwrap().quota, Some(150));
        assert_eq!(s.client(A).unwrap().unwrap().quota, QuotaSetting::Inherit);
    }

    #[test]
    fn packs_of_one_client_racing_near_the_quota_never_pass_it_together() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        // Two stores on one file: two connections, as a server and another
        // process would have, so the transaction itself must order them.
        let stores = [
            std::sync::Arc::new(SqliteMetaStore::open(&path).unwrap()),
            std::sync::Arc::new(SqliteMetaStore::open(&path).unwrap()),
        ];
        registered(&stores[0], A, "a");
        stores[0].set_quota(A, QuotaSetting::Bytes(1000)).unwrap();
        for round in 0..10u8 {
            let start = std::sync::Arc::new(std::sync::Barrier::new(4));
            let racers: Vec<_> = (0..4u8)
                .map(|i| {
                    let db = std::sync::Arc::clone(&stores[usize::from(i % 2)]);
                    let start = std::sync::Arc::clone(&start);
                    std::thread::spawn(move || {
                        // Three objects of 100 bytes: 300 each, 1200 together.
                        let base = i * 10;
                        let p = pack(A, &format!("r{round}-{i}"), &[base, base + 1, base + 2]);
                        start.wait();
                        db.add_pack(&p).is_ok()
                    })
                })
                .collect();
            let stored: Vec<bool> = racers.into_iter().map(|r| r.join().unwrap()).collect();
            let accepted = stored.iter().filter(|ok| **ok).count();
            assert_eq!(accepted, 3, "round {round}: {stored:?}");
            assert_eq!(stores[1].usage(A, None).unwrap().stored, 900);
            stores[0]
                .conn()
                .execute_batch("DELETE FROM objects; DELETE FROM packs;")
                .unwrap();
        }
    }

    #[test]
    fn refuses_a_commit_once_the_client_stores_more_than_its_quota() {
        let (_dir, s) = store();
        registered(&s, A, "a");
        s.add_pack(&pack(A, "p1", &[1, 2])).unwrap();
        let now = SystemTime::now();
        let stage = StageId::random();
        s.stage_refs(stage, A, true, &[id(1)]).unwrap();
        // The quota lowered during the backup: the backstop refuses.
        assert_eq!(
            s.commit_snapshot(stage, A, 1, b"m", now, Some(199))
                .unwrap(),
            Err((CommitRefusal::QUOTA, 0))
        );
        assert!(s.snapshots(A, 0, 10).unwrap().is_empty());
        s.stage_refs(stage, A, true, &[id(1)]).unwrap();
        assert!(s
            .commit_snapshot(stage, A, 1, b"m", now, Some(200))
            .unwrap()
            .is_ok());
    }

    #[test]
    fn counts_logical_bytes_once_per_snapshot_and_unique_bytes_per_snapshot() {
        let (_dir, s) = store();
        registered(&s, A, "a");
        registered(&s, B, "b");
        s.add_pack(&pack(A, "p1", &[1, 2, 3])).unwrap();
        s.add_pack(&pack(B, "p2", &[1])).unwrap();
        let now = SystemTime::now();
        let stage = StageId::random();
        let commit = |ids: &[u8]| {
            let ids: Vec<ObjectId> = ids.iter().map(|n| id(*n)).collect();
            s.stage_refs(stage, A, true, &ids).unwrap();
            s.commit_snapshot(stage, A, 7, b"m", now, None)
                .unwrap()
                .unwrap()
        };
        let first = commit(&[1, 2]);
        let second = commit(&[1, 2, 3]);
        let usage = s.repo_usage().unwrap();
        let a = usage.iter().find(|u| u.client == A).unwrap();
        assert_eq!(
            (a.stored, a.packs, a.snapshots, a.logical),
            (300, 1, 2, 500)
        );
        assert!(a.last_snapshot.is_some());
        let b = usage.iter().find(|u| u.client == B).unwrap();
        assert_eq!((b.stored, b.snapshots, b.logical), (100, 0, 0));
        let snaps = s.snapshot_usage(A).unwrap();
        let got: Vec<(u64, u64, u64, u64, u64)> = snaps
            .iter()
            .map(|x| (x.id, x.time, x.objects, x.logical, x.unique))
            .collect();
        assert_eq!(got, vec![(first, 7, 2, 200, 0), (second, 7, 3, 300, 100)]);
        assert!(s.snapshot_usage(B).unwrap().is_empty());
    }

    #[test]
    fn upgrades_a_version_8_database_with_no_quota_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            let s = SqliteMetaStore::open(&path).unwrap();
            registered(&s, A, "a");
        }
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(
                "DROP TRIGGER versions_charge; DROP TRIGGER versions_refund;
                 ALTER TABLE clients DROP COLUMN version_bytes;
                 ALTER TABLE clients DROP COLUMN quota; PRAGMA user_version = 8;",
            )
            .unwrap();
        }
        let s = SqliteMetaStore::open(&path).unwrap();
        let version: i64 = s
            .conn()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        assert_eq!(s.client(A).unwrap().unwrap().quota, QuotaSetting::Inherit);
        assert_eq!(s.usage(A, Some(5)).unwrap().quota, Some(5));
    }

    #[test]
    fn removing_a_client_removes_its_repository_and_nothing_else() {
        let (_dir, s) = store();
        let now = SystemTime::now();
        for (client, name) in [(A, "a"), (B, "b")] {
            s.register(client, &UserName::try_from(name).unwrap(), now)
                .unwrap();
            s.add_pack(&pack(client, &format!("p{name}"), &[1, 2]))
                .unwrap();
            let stage = StageId::random();
            s.stage_refs(stage, client, true, &[id(1)]).unwrap();
            s.commit_snapshot(stage, client, 1, b"m", now, None)
                .unwrap()
                .unwrap();
            s.put_key(client, 0, b"k", now, false).unwrap();
        }
        assert!(s.remove_client(A).unwrap().is_some());
        for table in [
            "packs",
            "objects",
            "snapshots",
            "snapshot_refs",
            "key_envelopes",
        ] {
            let n: i64 = s
                .conn()
                .query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
                .unwrap();
            assert_eq!(n, 1 + i64::from(table == "objects"), "{table}");
        }
        assert_eq!(s.have(B, &[id(1), id(2)]).unwrap(), vec![true, true]);
        assert_eq!(s.snapshots(B, 0, 10).unwrap().len(), 1);
    }
}
