//! [`MetaStore`](crate::storage::MetaStore) on PostgreSQL.

// Placeholder until the port lands.
#![allow(unused_variables)]
use super::super::*;
use super::PgMetaStore;
use protocol::message::PublicKeyField;
use protocol::{ClientId, FileName, UserName};
use std::time::SystemTime;

impl MetaStore for PgMetaStore {
    fn register_client(
        &self,
        id: ClientId,
        name: &UserName,
        secure_key: Option<&[u8]>,
        now: SystemTime,
        grace: Option<std::time::Duration>,
    ) -> Result<Registration, StorageError> {
        todo!("PostgreSQL register_client")
    }

    fn complete(&self, id: ClientId, now: SystemTime) -> Result<bool, StorageError> {
        todo!("PostgreSQL complete")
    }

    fn set_public_key(
        &self,
        id: ClientId,
        key: &PublicKeyField,
        now: SystemTime,
    ) -> Result<bool, StorageError> {
        todo!("PostgreSQL set_public_key")
    }

    fn client(&self, id: ClientId) -> Result<Option<ClientRecord>, StorageError> {
        todo!("PostgreSQL client")
    }

    fn touch(&self, id: ClientId, now: SystemTime) -> Result<(), StorageError> {
        todo!("PostgreSQL touch")
    }

    fn add_version(
        &self,
        version: &NewVersion,
        retention: &Retention,
    ) -> Result<Vec<BlobKey>, StorageError> {
        todo!("PostgreSQL add_version")
    }

    fn add_versions(&self, batch: &[PendingVersion]) -> Vec<Result<Vec<BlobKey>, StorageError>> {
        todo!("PostgreSQL add_versions")
    }

    fn inline_content(&self, blob: &BlobKey) -> Result<Option<Vec<u8>>, StorageError> {
        todo!("PostgreSQL inline_content")
    }

    fn inline_blobs(&self) -> Result<Vec<(BlobKey, u64)>, StorageError> {
        todo!("PostgreSQL inline_blobs")
    }

    fn delete_inline(&self, blob: &BlobKey) -> Result<(), StorageError> {
        todo!("PostgreSQL delete_inline")
    }

    fn list(
        &self,
        id: ClientId,
        all_versions: bool,
        offset: u64,
        limit: usize,
    ) -> Result<Vec<VersionRecord>, StorageError> {
        todo!("PostgreSQL list")
    }

    fn find_version(
        &self,
        id: ClientId,
        file: &FileName,
        version: u64,
    ) -> Result<Option<VersionRecord>, StorageError> {
        todo!("PostgreSQL find_version")
    }

    fn delete_file(
        &self,
        id: ClientId,
        file: &FileName,
        append_only: bool,
    ) -> Result<Deletion, StorageError> {
        todo!("PostgreSQL delete_file")
    }

    fn set_append_only(&self, id: ClientId, on: bool) -> Result<bool, StorageError> {
        todo!("PostgreSQL set_append_only")
    }

    fn set_quota(&self, id: ClientId, quota: QuotaSetting) -> Result<bool, StorageError> {
        todo!("PostgreSQL set_quota")
    }

    fn clients(&self) -> Result<Vec<ClientSummary>, StorageError> {
        todo!("PostgreSQL clients")
    }

    fn prune(
        &self,
        retention: &Retention,
        now: SystemTime,
    ) -> Result<Vec<VersionRecord>, StorageError> {
        todo!("PostgreSQL prune")
    }

    fn remove_client(&self, id: ClientId) -> Result<Option<Vec<VersionRecord>>, StorageError> {
        todo!("PostgreSQL remove_client")
    }

    fn latest(&self, id: ClientId, file: &FileName) -> Result<Option<VersionRecord>, StorageError> {
        todo!("PostgreSQL latest")
    }

    fn versions(&self, id: ClientId, file: &FileName) -> Result<Vec<VersionRecord>, StorageError> {
        todo!("PostgreSQL versions")
    }

    fn all_versions(&self) -> Result<Vec<VersionRecord>, StorageError> {
        todo!("PostgreSQL all_versions")
    }

    fn recorded_blobs(
        &self,
        after: Option<&BlobKey>,
        limit: usize,
    ) -> Result<Vec<(BlobKey, u64)>, StorageError> {
        todo!("PostgreSQL recorded_blobs")
    }

    fn inline_blobs_after(
        &self,
        after: Option<&BlobKey>,
        limit: usize,
    ) -> Result<Vec<(BlobKey, u64)>, StorageError> {
        todo!("PostgreSQL inline_blobs_after")
    }

    fn forget_blobs(&self, blobs: &[BlobKey]) -> Result<usize, StorageError> {
        todo!("PostgreSQL forget_blobs")
    }
}
