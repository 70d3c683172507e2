//! Garbage collection of the repository without keys (`docs/PROTOCOL.md`
//! §13.7): dead objects are deleted from the index, packs left without
//! objects are removed, and packs mostly dead are repacked by copying the
//! sealed bytes of their live objects into a new pack (nothing is
//! decrypted: the server cannot).
//!
//! Every decision is made inside the write transaction that acts on it
//! (see `RepoStore::delete_dead`, `drop_empty_packs`, `replace_packs`), so
//! a prune may run beside a serving server. Bytes are deleted only after
//! the rows that name them are gone and the blob is named in the trash
//! (`pack_trash`), so a crash at any moment leaves at worst a blob the next
//! prune deletes; a repack names its new blob in the trash before writing
//! it, and takes it out in the transaction that records it.
//!
//! Prune and start-up recovery exclude each other with an advisory lock on
//! [`MAINTENANCE_LOCK`] in the data directory: recovery removes blobs
//! without a row, which a repack has for a moment. Two prunes exclude each
//! other by the same lock.

use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::time::{Duration, SystemTime};

use nix::fcntl::{Flock, FlockArg};
use sha2::{Digest, Sha256};

use super::repo::{PackUsage, PackedObject, Repacked};
use protocol::repo::retention::{not_kept, KeepPolicy};

use super::{BlobKey, Storage, StorageError};

/// The lock file of the data directory's maintenance (prune, recovery).
pub const MAINTENANCE_LOCK: &str = "maintenance.lock";

/// Dead objects examined per write transaction: short enough that the
/// server's own writes wait at most a few milliseconds behind one.
const DELETE_BATCH: usize = 2000;

/// Trash entries read at a time.
const TRASH_PAGE: usize = 256;

/// A repacked pack is closed once it holds this many bytes, well under the
/// 128 MiB a client's pack may hold (§13.4).
const REPACK_TARGET: u64 = 64 << 20;

/// The largest pack the server accepts (§13.4), so that a repacked pack is
/// as any other.
const MAX_PACK_OBJECTS: usize = 16_384;

/// An exclusive hold on the data directory's maintenance lock, released
/// when dropped (or when the process dies).
#[derive(Debug)]
pub struct MaintenanceLock {
    _lock: Flock<File>,
    /// The repository-wide lock, with shared metadata (see
    /// [`Storage::maintenance_lock`](super::Storage::maintenance_lock)).
    pub(super) shared: Option<super::postgres::RepositoryLock>,
}

impl MaintenanceLock {
    /// Takes the lock of `data_dir`: waiting for it when `wait`, else
    /// failing at once when another process holds it.
    ///
    /// # Errors
    /// When the lock file cannot be opened, or (without `wait`) another
    /// prune or a starting server holds the lock.
    pub fn take(data_dir: &Path, wait: bool) -> Result<Self, StorageError> {
        let path = data_dir.join(MAINTENANCE_LOCK);
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| StorageError::io("open", &path, e))?;
        let arg = if wait {
            FlockArg::LockExclusive
        } else {
            FlockArg::LockExclusiveNonblock
        };
        match Flock::lock(file, arg) {
            Ok(lock) => Ok(Self {
                _lock: lock,
                shared: None,
            }),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(StorageError::Unavailable {
                op: "prune",
                source: "another prune, or a starting server's recovery, holds the data directory's maintenance lock".into(),
            }),
            Err((_, e)) => Err(StorageError::io("lock", &path, e.into())),
        }
    }
}

/// What a prune does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PruneOptions {
    /// Objects touched (stored, or answered "have") within this long before
    /// the prune started are live, referenced or not; trash younger than
    /// this is kept (a fetch may still be reading it).
    pub grace: Duration,
    /// A pack is repacked when at least this percentage of its bytes is
    /// dead (1..=100; 100 repacks nothing but wholly dead packs, which are
    /// removed anyway).
    pub repack_percent: u8,
    /// Only count; change nothing.
    pub dry_run: bool,
}

impl Default for PruneOptions {
    fn default() -> Self {
        Self {
            grace: Duration::from_secs(3600),
            repack_percent: 50,
            dry_run: false,
        }
    }
}

/// What a prune reclaimed (or, dry, would reclaim).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PruneReport {
    /// Dead objects deleted from the index, and their bytes.
    pub objects: u64,
    pub object_bytes: u64,
    /// Packs removed because none of their objects was live, and their bytes.
    pub packs_removed: u64,
    pub pack_bytes_removed: u64,
    /// Packs repacked, the bytes they held, and the bytes of the packs
    /// written in their place.
    pub packs_repacked: u64,
    pub repacked_from: u64,
    pub repacked_to: u64,
    /// Blobs of the trash deleted (a dry run counts those that are due).
    pub trash_deleted: u64,
}

impl PruneReport {
    /// Bytes the packs no longer take: packs removed, plus what repacking
    /// saved.
    pub fn reclaimed_bytes(&self) -> u64 {
        self.pack_bytes_removed
            .saturating_add(self.repacked_from.saturating_sub(self.repacked_to))
    }
}

impl Storage {
    /// Applies to every client's snapshots the policy `policy_of` gives it
    /// (append-only clients included: this is the operator's policy), by
    /// snapshot times. Returns the snapshots forgotten, or with `dry_run`
    /// those that would be, by client.
    ///
    /// # Errors
    /// On a storage failure.
    pub fn forget_by_policy(
        &self,
        policy_of: impl Fn(protocol::ClientId) -> Option<KeepPolicy>,
        dry_run: bool,
    ) -> Result<Vec<(protocol::ClientId, Vec<u64>)>, StorageError> {
        let repo = self.repo()?;
        let stamps = repo.snapshot_stamps()?;
        let mut out = Vec::new();
        for chunk in stamps.chunk_by(|a, b| a.0 == b.0) {
            let Some((client, _, _)) = chunk.first() else {
                continue;
            };
            let Some(policy) = policy_of(*client) else {
                continue;
            };
            let own: Vec<(u64, u64, Vec<String>)> = chunk
                .iter()
                .map(|(_, id, t)| (*id, *t, Vec::new()))
                .collect();
            let gone = not_kept(&own, &policy);
            if gone.is_empty() {
                continue;
            }
            if !dry_run {
                repo.forget_snapshots(*client, &gone)?;
            }
            out.push((*client, gone));
        }
        Ok(out)
    }

    /// Collects the repository's garbage (see the module's note). The
    /// caller holds the [`MaintenanceLock`].
    ///
    /// # Errors
    /// On a storage failure; what was done before stays done, and the next
    /// prune finishes the rest.
    pub fn prune_repo(
        &self,
        options: &PruneOptions,
        now: SystemTime,
    ) -> Result<PruneReport, StorageError> {
        let repo = self.repo()?;
        let cutoff = now.checked_sub(options.grace).unwrap_or(now);
        let mut report = PruneReport::default();
        if options.dry_run {
            for usage in repo.pack_usage(cutoff)? {
                report.objects += usage.dead_objects;
                report.object_bytes += usage.dead_bytes;
                if usage.live_objects == 0 {
                    report.packs_removed += 1;
                    report.pack_bytes_removed += usage.size;
                } else if sparse(&usage, options.repack_percent) {
                    report.packs_repacked += 1;
                    report.repacked_from += usage.size;
                    report.repacked_to += usage.live_bytes;
                }
            }
            report.trash_deleted = repo.trash_due(cutoff, usize::MAX)?.len() as u64;
            return Ok(report);
        }
        // Leftovers of an earlier prune first (a crash between a row and
        // its blob's deletion, a repack cut short).
        report.trash_deleted += self.empty_trash(cutoff)?;
        let mut after = 0;
        loop {
            let (n, bytes, last) = repo.delete_dead(cutoff, after, DELETE_BATCH)?;
            report.objects += n;
            report.object_bytes += bytes;
            match last {
                Some(last) => after = last,
                None => break,
            }
        }
        let (packs, bytes) = repo.drop_empty_packs(now)?;
        report.packs_removed += packs;
        report.pack_bytes_removed += bytes;
        // Sparse packs, by client (a pack holds one client's objects).
        let usage = repo.pack_usage(cutoff)?;
        let mut group: Vec<&PackUsage> = Vec::new();
        for usage in usage
            .iter()
            .filter(|u| u.live_objects > 0 && sparse(u, options.repack_percent))
        {
            if group.first().is_some_and(|g| g.client != usage.client) {
                self.repack(&group, now, &mut report)?;
                group.clear();
            }
            group.push(usage);
        }
        self.repack(&group, now, &mut report)?;
        report.trash_deleted += self.empty_trash(cutoff)?;
        Ok(report)
    }

    /// Deletes every trash blob named before `before`, then its entry.
    fn empty_trash(&self, before: SystemTime) -> Result<u64, StorageError> {
        let repo = self.repo()?;
        let mut deleted = 0;
        loop {
            let due = repo.trash_due(before, TRASH_PAGE)?;
            if due.is_empty() {
                return Ok(deleted);
            }
            for blob in &due {
                self.blobs.delete(blob)?;
                repo.untrash(blob)?;
                deleted += 1;
            }
        }
    }

    /// Copies the live objects of `packs` (one client's) into new packs of
    /// at most [`REPACK_TARGET`] bytes, each recorded in place of the packs
    /// it empties.
    fn repack(
        &self,
        packs: &[&PackUsage],
        now: SystemTime,
        report: &mut PruneReport,
    ) -> Result<(), StorageError> {
        let repo = self.repo()?;
        let mut batch: Vec<(&PackUsage, Vec<PackedObject>)> = Vec::new();
        let (mut bytes, mut objects) = (0u64, 0usize);
        for usage in packs {
            let live = repo.pack_objects(usage.id)?;
            let live_bytes: u64 = live.iter().map(|o| u64::from(o.len)).sum();
            if !batch.is_empty()
                && (bytes + live_bytes > REPACK_TARGET || objects + live.len() > MAX_PACK_OBJECTS)
            {
                self.write_repacked(&batch, now, report)?;
                batch.clear();
                (bytes, objects) = (0, 0);
            }
            bytes += live_bytes;
            objects += live.len();
            batch.push((usage, live));
        }
        if !batch.is_empty() {
            self.write_repacked(&batch, now, report)?;
        }
        Ok(())
    }

    /// Writes one new pack of the objects of `batch`, makes it durable and
    /// records it in place of the packs of `batch`.
    fn write_repacked(
        &self,
        batch: &[(&PackUsage, Vec<PackedObject>)],
        now: SystemTime,
        report: &mut PruneReport,
    ) -> Result<(), StorageError> {
        let repo = self.repo()?;
        let Some((first, _)) = batch.first() else {
            return Ok(());
        };
        let client = first.client;
        let mut writer = self.blobs.begin_write(client)?;
        let mut sha = Sha256::new();
        let mut moved = Vec::new();
        let mut size = 0u64;
        let mut buf = Vec::new();
        for (usage, objects) in batch {
            for o in objects {
                let copied = (|| {
                    buf.clear();
                    let end = o.offset + u64::from(o.len);
                    let mut read = self.blobs.open_range(&usage.blob, o.offset..end)?;
                    read.read_to_end(&mut buf)
                        .map_err(|e| StorageError::io("read", Path::new(&usage.blob.0), e))?;
                    if buf.len() != o.len as usize {
                        return Err(StorageError::Corrupt(format!(
                            "pack {} is shorter than its index",
                            usage.blob
                        )));
                    }
                    writer.write(&buf)?;
                    Ok(())
                })();
                if let Err(e) = copied {
                    let _ = writer.abort();
                    return Err(e);
                }
                sha.update(&buf);
                moved.push((o.clone(), size));
                size += u64::from(o.len);
            }
        }
        let staged = writer.finish()?;
        let key: BlobKey = staged.key().clone();
        // In the trash before it exists: a crash from here on leaves a blob
        // the next prune deletes, never one without a name.
        if let Err(e) = repo.trash(&key, now) {
            let _ = staged.abort();
            return Err(e);
        }
        let key = staged.publish()?;
        self.blobs
            .barrier(std::slice::from_ref(&key))
            .into_iter()
            .next()
            .unwrap_or_else(|| Err(StorageError::Worker("the barrier returned nothing".into())))?;
        let record = Repacked {
            client,
            blob: key,
            size,
            sha256: sha.finalize().into(),
            moved,
            replaces: batch.iter().map(|(u, _)| u.id).collect(),
        };
        if repo.replace_packs(&record, now)? {
            report.packs_repacked += batch.len() as u64;
            report.repacked_from += batch.iter().map(|(u, _)| u.size).sum::<u64>();
            report.repacked_to += size;
        } else {
            tracing::warn!(pack = %record.blob, "the packs changed while being repacked; left as they were");
        }
        Ok(())
    }
}

/// Whether at least `percent` of the pack's bytes are dead.
fn sparse(usage: &PackUsage, percent: u8) -> bool {
    let dead = usage.size.saturating_sub(usage.live_bytes);
    u128::from(dead) * 100 >= u128::from(usage.size) * u128::from(percent)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::StageId;
    use protocol::repo::pack::Located;
    use protocol::repo::{ObjectId, ID_LEN};
    use protocol::ClientId;

    const A: ClientId = ClientId([0xa; 16]);

    fn id(n: u8) -> ObjectId {
        ObjectId([n; ID_LEN])
    }

    /// Stores a pack of objects `ids`, each 100 bytes of its own id byte.
    fn store(storage: &Storage, ids: &[u8], at: SystemTime) {
        let mut pack = storage.begin_pack(A).unwrap();
        let mut objects = Vec::new();
        for (i, n) in ids.iter().enumerate() {
            pack.write(&[*n; 100]).unwrap();
            objects.push(Located {
                id: id(*n),
                offset: 100 * i as u64,
                len: 100,
            });
        }
        storage
            .store_pack(pack, 100 * ids.len() as u64, objects, at, None)
            .unwrap();
    }

    fn commit(storage: &Storage, ids: &[u8]) {
        let repo = storage.repo().unwrap();
        let stage = StageId::random();
        let ids: Vec<ObjectId> = ids.iter().map(|n| id(*n)).collect();
        assert_eq!(repo.stage_refs(stage, A, true, &ids).unwrap(), 0);
        repo.commit_snapshot(stage, A, 1, b"m", SystemTime::now(), None)
            .unwrap()
            .unwrap();
    }

    fn read(storage: &Storage, n: u8) -> Option<Vec<u8>> {
        let place = storage
            .repo()
            .unwrap()
            .locate(A, &[id(n)])
            .unwrap()
            .pop()??;
        let mut bytes = Vec::new();
        storage
            .open_object(&place)
            .unwrap()
            .read_to_end(&mut bytes)
            .unwrap();
        Some(bytes)
    }

    #[test]
    fn collects_only_dead_objects_and_repacks_sparse_packs_without_losing_a_live_byte() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open_local(dir.path()).unwrap();
        let now = SystemTime::now();
        let old = now - Duration::from_secs(7200);
        // Pack 1: all dead. Pack 2: one live of four (sparse). Pack 3: three
        // live of four. Pack 4: unreferenced but stored within the grace.
        store(&storage, &[1, 2], old);
        store(&storage, &[10, 11, 12, 13], old);
        store(&storage, &[20, 21, 22, 23], old);
        store(&storage, &[30], now);
        commit(&storage, &[10, 20, 21, 22]);
        // Staged by a backup in progress: live though old and unreferenced.
        let stage = StageId::random();
        storage
            .repo()
            .unwrap()
            .stage_refs(stage, A, true, &[id(23)])
            .unwrap();
        let options = PruneOptions {
            grace: Duration::from_secs(3600),
            repack_percent: 50,
            dry_run: true,
        };
        let dry = storage.prune_repo(&options, now).unwrap();
        let wet = storage
            .prune_repo(
                &PruneOptions {
                    dry_run: false,
                    ..options
                },
                now,
            )
            .unwrap();
        assert_eq!(
            dry,
            PruneReport {
                trash_deleted: 0,
                ..wet.clone()
            }
        );
        assert_eq!(
            wet,
            PruneReport {
                objects: 5,
                object_bytes: 500,
                packs_removed: 1,
                pack_bytes_removed: 200,
                packs_repacked: 1,
                repacked_from: 400,
                repacked_to: 100,
                trash_deleted: 0,
            }
        );
        for n in [10, 20, 21, 22, 23, 30] {
            assert_eq!(read(&storage, n), Some(vec![n; 100]), "object {n}");
        }
        for n in [1, 2, 11, 12, 13] {
            assert_eq!(read(&storage, n), None, "object {n}");
        }
        // The removed and replaced packs wait in the trash for the grace
        // period (a fetch may still read them), then go.
        let blobs = || storage.blobs().list().unwrap().count();
        assert_eq!(blobs(), 5);
        let later = now + Duration::from_secs(3601);
        let again = storage.prune_repo(&options, later).unwrap();
        assert_eq!(again.trash_deleted, 2, "{again:?}");
        let again = storage
            .prune_repo(
                &PruneOptions {
                    dry_run: false,
                    ..options
                },
                later,
            )
            .unwrap();
        // Object 30's grace is over too (its pack waits in the trash now);
        // 23 stays staged.
        assert_eq!(
            (again.objects, again.packs_removed, again.trash_deleted),
            (1, 1, 2),
            "{again:?}"
        );
        assert_eq!(blobs(), 3);
        for n in [10, 20, 21, 22, 23] {
            assert_eq!(read(&storage, n), Some(vec![n; 100]), "object {n}");
        }
        // Recovery finds every recorded pack whole, and removes the trashed
        // one (it has no row); its trash entry then goes without error.
        assert_eq!(storage.recover().unwrap().removed_orphans, 1);
        let last = later + Duration::from_secs(3601);
        let report = storage
            .prune_repo(
                &PruneOptions {
                    dry_run: false,
                    ..options
                },
                last,
            )
            .unwrap();
        // Recovery dropped the stage (a restart ends every connection), so
        // 23 is garbage now.
        assert_eq!((report.objects, report.trash_deleted), (1, 1));
        assert_eq!(read(&storage, 23), None);
        for n in [10, 20, 21, 22] {
            assert_eq!(read(&storage, n), Some(vec![n; 100]), "object {n}");
        }
    }

    #[test]
    fn an_object_answered_have_after_the_cutoff_is_live_and_a_deleted_one_refuses_the_commit() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open_local(dir.path()).unwrap();
        let repo = storage.repo().unwrap();
        let old = SystemTime::now() - Duration::from_secs(60);
        store(&storage, &[1, 2], old);
        // "have" touches 1 now; 2 was last touched a minute ago.
        assert_eq!(repo.have(A, &[id(1)]).unwrap(), vec![true]);
        let options = PruneOptions {
            grace: Duration::from_secs(10),
            repack_percent: 100,
            dry_run: false,
        };
        let report = storage.prune_repo(&options, SystemTime::now()).unwrap();
        assert_eq!(report.objects, 1);
        assert_eq!(repo.have(A, &[id(1), id(2)]).unwrap(), vec![true, false]);
        // A backup that trusted an earlier "have" for 2 learns it is
        // missing when staging (the session then refuses its commit).
        let stage = StageId::random();
        assert_eq!(repo.stage_refs(stage, A, true, &[id(1), id(2)]).unwrap(), 1);
    }

    #[test]
    fn a_second_prune_is_refused_while_one_holds_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let held = MaintenanceLock::take(dir.path(), false).unwrap();
        assert!(MaintenanceLock::take(dir.path(), false).is_err());
        drop(held);
        MaintenanceLock::take(dir.path(), false).unwrap();
    }
}
