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
use crate::storage::repo::{NewPack, ObjectPlace, RepoStore, StageId};

/// Ids looked up by one statement: well under SQLite's limit on
/// parameters, and one prepared statement for every full chunk.
const LOOKUP_CHUNK: usize = 256;

/// An object of the client as a lookup finds it.
struct Found {
    row: i64,
    place: ObjectPlace,
}

/// The client's objects among `ids`, by id, `LOOKUP_CHUNK` ids a query.
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
         WHERE o.client = ?1 AND o.oid IN ({marks})"
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

/// A u64 the client chose (a time), kept bit for bit in an INTEGER.
fn u64_bits(n: u64) -> i64 {
    i64::from_le_bytes(n.to_le_bytes())
}

fn bits_u64(n: i64) -> u64 {
    u64::from_le_bytes(n.to_le_bytes())
}

impl RepoStore for SqliteMetaStore {
    fn have(&self, client: ClientId, ids: &[ObjectId]) -> Result<Vec<bool>, StorageError> {
        let found = lookup(&self.conn(), client, ids)?;
        Ok(ids.iter().map(|id| found.contains_key(id)).collect())
    }

    fn add_pack(&self, pack: &NewPack) -> Result<u32, StorageError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
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
            let mut insert = tx.prepare_cached(
                "INSERT INTO objects (client, oid, pack, pack_offset, len) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (client, oid) DO NOTHING",
            )?;
            for o in &pack.objects {
                let n = insert.execute(params![
                    client,
                    &o.id.0[..],
                    pack_row,
                    size_to_sql(o.offset)?,
                    i64::from(o.len)
                ])?;
                if n > 0 {
                    added = added.saturating_add(1);
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
        let tx = conn.transaction()?;
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
    ) -> Result<Result<u64, (CommitRefusal, u32)>, StorageError> {
        let mut conn = self.conn();
        // Immediate: the check and the insert under the write lock, so no
        // other writer can remove a reference in between.
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let client_bytes = &client.0[..];
        let (staged, missing): (i64, i64) = tx.query_row(
            "SELECT count(*), count(*) FILTER (WHERE NOT EXISTS
                 (SELECT 1 FROM objects o WHERE o.id = s.object AND o.client = ?2))
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
            s.commit_snapshot(stage, A, 1, b"m", now).unwrap(),
            Err((CommitRefusal::NO_REFERENCES, 0)),
            "nothing staged"
        );
        // B's object counts as missing for A, and is not staged.
        assert_eq!(s.stage_refs(stage, A, true, &[id(1), id(3)]).unwrap(), 1);
        assert_eq!(s.stage_refs(stage, A, false, &[id(1), id(9)]).unwrap(), 1);
        let first = s
            .commit_snapshot(stage, A, u64::MAX, b"one", now)
            .unwrap()
            .unwrap();
        assert_eq!(s.stage_refs(stage, A, true, &[id(2)]).unwrap(), 0);
        let second = s
            .commit_snapshot(stage, A, 5, b"two", now)
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
            s.commit_snapshot(stage, A, 1, b"m", now).unwrap(),
            Err((CommitRefusal::MISSING, 1))
        );
        assert!(s.snapshots(A, 0, 10).unwrap().is_empty());
        assert_eq!(
            s.commit_snapshot(stage, A, 1, b"m", now).unwrap(),
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
                "DROP TABLE snapshot_refs; DROP TABLE repo_stage; DROP TABLE key_envelopes;
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
            s.commit_snapshot(stage, client, 1, b"m", now)
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
