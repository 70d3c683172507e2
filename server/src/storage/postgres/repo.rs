//! [`RepoStore`](crate::storage::repo::RepoStore) on PostgreSQL.

#![allow(unused_variables)]
use super::super::repo::*;
use super::super::*;
use super::PgMetaStore;
use protocol::repo::message::{CommitRefusal, KeptReason, KeySlot, SnapshotEntry};
use protocol::repo::pack::Located;
use protocol::repo::ObjectId;
use protocol::ClientId;
use std::time::SystemTime;

impl RepoStore for PgMetaStore {
    fn held(&self, client: ClientId, ids: &[ObjectId]) -> Result<Vec<Option<u32>>, StorageError> {
        todo!("PostgreSQL held")
    }

    fn add_pack(&self, pack: &NewPack) -> Result<u32, StorageError> {
        todo!("PostgreSQL add_pack")
    }

    fn usage(&self, client: ClientId, configured: Option<u64>) -> Result<QuotaUsage, StorageError> {
        todo!("PostgreSQL usage")
    }

    fn repo_usage(&self) -> Result<Vec<RepoUsage>, StorageError> {
        todo!("PostgreSQL repo_usage")
    }

    fn snapshot_usage(&self, client: ClientId) -> Result<Vec<SnapshotUsage>, StorageError> {
        todo!("PostgreSQL snapshot_usage")
    }

    fn stage_refs(
        &self,
        stage: StageId,
        client: ClientId,
        first: bool,
        ids: &[ObjectId],
    ) -> Result<u32, StorageError> {
        todo!("PostgreSQL stage_refs")
    }

    fn drop_stage(&self, stage: StageId) -> Result<(), StorageError> {
        todo!("PostgreSQL drop_stage")
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
        todo!("PostgreSQL commit_snapshot")
    }

    fn snapshots(
        &self,
        client: ClientId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<SnapshotEntry>, StorageError> {
        todo!("PostgreSQL snapshots")
    }

    fn locate(
        &self,
        client: ClientId,
        ids: &[ObjectId],
    ) -> Result<Vec<Option<ObjectPlace>>, StorageError> {
        todo!("PostgreSQL locate")
    }

    fn put_key(
        &self,
        client: ClientId,
        slot: u8,
        envelope: &[u8],
        now: SystemTime,
        append_only: bool,
    ) -> Result<bool, StorageError> {
        todo!("PostgreSQL put_key")
    }

    fn delete_key(
        &self,
        client: ClientId,
        slot: u8,
        append_only: bool,
    ) -> Result<Result<(), KeptReason>, StorageError> {
        todo!("PostgreSQL delete_key")
    }

    fn passphrase_envelope(
        &self,
        name: &protocol::UserName,
    ) -> Result<Option<(ClientId, Vec<u8>)>, StorageError> {
        todo!("PostgreSQL passphrase_envelope")
    }

    fn keys(&self, client: ClientId) -> Result<Vec<KeySlot>, StorageError> {
        todo!("PostgreSQL keys")
    }

    fn recorded_packs(
        &self,
        after: Option<&BlobKey>,
        limit: usize,
    ) -> Result<Vec<(BlobKey, u64)>, StorageError> {
        todo!("PostgreSQL recorded_packs")
    }

    fn clear_stages(&self) -> Result<usize, StorageError> {
        todo!("PostgreSQL clear_stages")
    }

    fn snapshot_stamps(&self) -> Result<Vec<(ClientId, u64, u64)>, StorageError> {
        todo!("PostgreSQL snapshot_stamps")
    }

    fn forget_snapshots(&self, client: ClientId, ids: &[u64]) -> Result<u64, StorageError> {
        todo!("PostgreSQL forget_snapshots")
    }

    fn client_forget(
        &self,
        client: ClientId,
        ids: &[u64],
        server_append_only: bool,
    ) -> Result<Option<u64>, StorageError> {
        todo!("PostgreSQL client_forget")
    }

    fn pack_usage(&self, cutoff: SystemTime) -> Result<Vec<PackUsage>, StorageError> {
        todo!("PostgreSQL pack_usage")
    }

    fn delete_dead(
        &self,
        cutoff: SystemTime,
        after: i64,
        limit: usize,
    ) -> Result<(u64, u64, Option<i64>), StorageError> {
        todo!("PostgreSQL delete_dead")
    }

    fn drop_empty_packs(&self, now: SystemTime) -> Result<(u64, u64), StorageError> {
        todo!("PostgreSQL drop_empty_packs")
    }

    fn pack_objects(&self, pack: i64) -> Result<Vec<PackedObject>, StorageError> {
        todo!("PostgreSQL pack_objects")
    }

    fn trash(&self, blob: &BlobKey, now: SystemTime) -> Result<(), StorageError> {
        todo!("PostgreSQL trash")
    }

    fn trash_due(&self, before: SystemTime, limit: usize) -> Result<Vec<BlobKey>, StorageError> {
        todo!("PostgreSQL trash_due")
    }

    fn untrash(&self, blob: &BlobKey) -> Result<(), StorageError> {
        todo!("PostgreSQL untrash")
    }

    fn replace_packs(&self, pack: &Repacked, now: SystemTime) -> Result<bool, StorageError> {
        todo!("PostgreSQL replace_packs")
    }

    fn scrub_packs(&self, after: i64, limit: usize) -> Result<Vec<RecordedPack>, StorageError> {
        todo!("PostgreSQL scrub_packs")
    }

    fn pack_damage(&self, pack: i64) -> Result<Option<PackDamage>, StorageError> {
        todo!("PostgreSQL pack_damage")
    }

    fn mark_damaged(&self, pack: i64, now: SystemTime) -> Result<bool, StorageError> {
        todo!("PostgreSQL mark_damaged")
    }
}
