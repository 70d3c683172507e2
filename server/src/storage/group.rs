//! Group commit: uploads that finish at the same moment share their syncs.
//!
//! Every commit needs its blob's new name made durable (a sync of the
//! client's `blobs/` folder) and its version row made durable (a SQLite
//! WAL sync). Paid one upload at a time, those two syncs bound a server
//! taking many small files over several connections. Here the first
//! committer to find no commit running becomes the leader: it takes every
//! commit queued so far, publishes the blobs, syncs each folder once (the blob store's barrier) and
//! records every row in one transaction, then hands each waiter its own
//! result. Those who queued while it worked form the next batch. Nothing
//! waits on a timer, so a lone upload commits as soon as before.
//!
//! Each member of a batch still succeeds or fails on its own: a blob that
//! cannot be published, whose folder cannot be synced, or whose row cannot
//! be inserted fails only its upload (and its blob is removed). Only a
//! transaction that fails as a whole fails every member.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

use super::{BlobKey, NewVersion, PendingVersion, Retention, StagedBlob, Storage, StorageError};

/// What an upload wrote.
pub(super) enum Content {
    /// A staged blob of the blob store.
    Blob(Box<dyn StagedBlob>),
    /// A small file, to keep in the metadata with its row.
    Inline(Vec<u8>),
}

/// One upload waiting to be committed.
struct Job {
    ticket: u64,
    content: Content,
    version: NewVersion,
    retention: Retention,
    /// The configured quota of the client ([`PendingVersion::quota`]).
    quota: Option<u64>,
}

#[derive(Default)]
struct Queue {
    pending: Vec<Job>,
    /// Finished commits, by ticket, until their owners collect them.
    results: HashMap<u64, Result<BlobKey, StorageError>>,
    next_ticket: u64,
    leading: bool,
}

/// The queue of commits shared by every connection of a [`Storage`].
#[derive(Default)]
pub(super) struct GroupCommit {
    queue: Mutex<Queue>,
    finished: Condvar,
}

impl std::fmt::Debug for GroupCommit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupCommit").finish_non_exhaustive()
    }
}

impl GroupCommit {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Commits one upload, together with whatever others are queued, and
    /// returns its own result.
    pub(super) fn commit(
        &self,
        storage: &Storage,
        content: Content,
        version: NewVersion,
        retention: Retention,
        quota: Option<u64>,
    ) -> Result<BlobKey, StorageError> {
        let mut queue = self.lock();
        let ticket = queue.next_ticket;
        queue.next_ticket += 1;
        queue.pending.push(Job {
            ticket,
            content,
            version,
            retention,
            quota,
        });
        loop {
            if let Some(result) = queue.results.remove(&ticket) {
                return result;
            }
            if queue.leading {
                queue = self
                    .finished
                    .wait(queue)
                    .unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            queue.leading = true;
            let batch = std::mem::take(&mut queue.pending);
            drop(queue);
            let mut lead = Leadership {
                group: self,
                tickets: batch.iter().map(|j| j.ticket).collect(),
                results: Vec::new(),
            };
            lead.results = commit_batch(storage, batch);
            drop(lead);
            queue = self.lock();
        }
    }
}

/// Hands the results of a batch to their owners and gives up the lead,
/// also if committing panicked (every member then gets an error instead of
/// waiting for ever).
struct Leadership<'a> {
    group: &'a GroupCommit,
    tickets: Vec<u64>,
    results: Vec<(u64, Result<BlobKey, StorageError>)>,
}

impl Drop for Leadership<'_> {
    fn drop(&mut self) {
        let mut queue = self.group.lock();
        for (ticket, result) in self.results.drain(..) {
            queue.results.insert(ticket, result);
        }
        for ticket in &self.tickets {
            queue
                .results
                .entry(*ticket)
                .or_insert_with(|| Err(StorageError::Worker("the commit stopped".into())));
        }
        queue.leading = false;
        drop(queue);
        self.group.finished.notify_all();
    }
}

/// Publishes, syncs and records one batch; a result per job.
fn commit_batch(storage: &Storage, batch: Vec<Job>) -> Vec<(u64, Result<BlobKey, StorageError>)> {
    let mut results = Vec::with_capacity(batch.len());
    let mut pending = Vec::with_capacity(batch.len());
    let mut tickets: Vec<u64> = Vec::with_capacity(batch.len());
    for job in batch {
        let Job {
            ticket,
            content,
            mut version,
            retention,
            quota,
        } = job;
        let inline = match content {
            Content::Blob(staged) => match staged.publish() {
                Ok(key) => {
                    version.blob = key;
                    None
                }
                Err(e) => {
                    results.push((ticket, Err(e)));
                    continue;
                }
            },
            Content::Inline(bytes) => {
                version.blob = BlobKey::new_inline();
                Some(bytes)
            }
        };
        tickets.push(ticket);
        pending.push(PendingVersion {
            version,
            retention,
            inline,
            quota,
        });
    }
    if pending.is_empty() {
        return results;
    }
    // One sync per folder for every blob of the batch; a member whose
    // folder could not be synced may lose its name in a crash: it fails,
    // and its blob is removed. The others go on.
    let published: Vec<(usize, BlobKey)> = pending
        .iter()
        .enumerate()
        .filter(|(_, p)| p.inline.is_none())
        .map(|(i, p)| (i, p.version.blob.clone()))
        .collect();
    let keys: Vec<BlobKey> = published.iter().map(|(_, k)| k.clone()).collect();
    let synced = storage.blobs().barrier(&keys);
    let mut unsynced: HashMap<usize, StorageError> = HashMap::new();
    for ((i, key), outcome) in published.iter().zip(synced) {
        if let Err(e) = outcome {
            storage.delete_unrecorded(std::iter::once(key));
            unsynced.insert(*i, e);
        }
    }
    if !unsynced.is_empty() {
        let mut kept_tickets = Vec::with_capacity(tickets.len());
        let mut kept = Vec::with_capacity(pending.len());
        for (i, (ticket, p)) in tickets.into_iter().zip(pending).enumerate() {
            match unsynced.remove(&i) {
                Some(e) => results.push((ticket, Err(e))),
                None => {
                    kept_tickets.push(ticket);
                    kept.push(p);
                }
            }
        }
        (tickets, pending) = (kept_tickets, kept);
        if pending.is_empty() {
            return results;
        }
    }
    let recorded = storage.meta().add_versions(&pending);
    for ((ticket, p), outcome) in tickets.into_iter().zip(pending).zip(recorded) {
        match outcome {
            Ok(superseded) => {
                storage.delete_blobs(superseded.iter());
                results.push((ticket, Ok(p.version.blob)));
            }
            Err(e) => {
                if p.inline.is_none() {
                    storage.delete_unrecorded(std::iter::once(&p.version.blob));
                }
                results.push((ticket, Err(e)));
            }
        }
    }
    results
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::sync::{Arc, Barrier, Condvar, Mutex};
    use std::time::SystemTime;

    use protocol::{ClientId, FileName, UserName};

    use super::*;

    fn new_version(client: ClientId, name: &str, content: &[u8]) -> NewVersion {
        NewVersion {
            client,
            file: FileName::try_from(name).unwrap(),
            blob: BlobKey(String::new()),
            size: content.len() as u64,
            content_size: protocol::crypto::pkcs7_len(content.len() as u64),
            cksum: protocol::Cksum::of(content),
            sha256: [0; 32],
            stored_at: SystemTime::now(),
        }
    }

    fn stage(storage: &Storage, client: ClientId, content: &[u8]) -> Box<dyn StagedBlob> {
        let mut w = storage.blobs().begin_write(client).unwrap();
        w.write(content).unwrap();
        w.finish().unwrap()
    }

    fn read(storage: &Storage, key: &BlobKey) -> Vec<u8> {
        let mut out = Vec::new();
        storage
            .open_blob(key)
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    #[test]
    fn concurrent_commits_each_get_their_own_result_and_all_are_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open_local(dir.path()).unwrap();
        let id = ClientId([4; 16]);
        storage
            .meta()
            .register(id, &UserName::try_from("kim").unwrap(), SystemTime::now())
            .unwrap();
        let threads = 16;
        let rounds = 8;
        let start = Arc::new(Barrier::new(threads));
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let storage = storage.clone();
                let start = Arc::clone(&start);
                std::thread::spawn(move || {
                    start.wait();
                    (0..rounds)
                        .map(|r| {
                            let name = format!("t{t}/r{r}");
                            let content = name.repeat(t + 1).into_bytes();
                            let version = new_version(id, &name, &content);
                            // Half of them small files kept with their row.
                            let key = if r % 2 == 0 {
                                storage
                                    .commit_inline(content.clone(), version, &Retention::KEEP_ALL)
                                    .unwrap()
                            } else {
                                let staged = stage(&storage, id, &content);
                                storage
                                    .commit(staged, version, &Retention::KEEP_ALL)
                                    .unwrap()
                            };
                            assert_eq!(key.is_inline(), r % 2 == 0);
                            (name, content, key)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let committed: Vec<_> = workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect();
        assert_eq!(committed.len(), threads * rounds);
        for (name, content, key) in &committed {
            let latest = storage
                .meta()
                .latest(id, &FileName::try_from(name.as_str()).unwrap())
                .unwrap()
                .unwrap();
            assert_eq!(&latest.blob, key, "{name}");
            assert_eq!(&read(&storage, key), content, "{name}");
        }
        let keys: std::collections::HashSet<_> = committed.iter().map(|c| &c.2).collect();
        assert_eq!(keys.len(), committed.len(), "every commit has its own blob");
        let report = storage.recover().unwrap();
        assert_eq!(report, super::super::RecoveryReport::default());
    }

    /// The file system store, with a gate that holds the first sync until
    /// released, a count of syncs, and keys whose sync fails.
    struct Gated {
        inner: crate::storage::fs::FsBlobStore,
        syncs: std::sync::atomic::AtomicUsize,
        gate: Mutex<bool>,
        opened: Condvar,
        failing: Mutex<Vec<BlobKey>>,
    }

    impl crate::storage::BlobStore for Gated {
        fn begin_write(
            &self,
            client: ClientId,
        ) -> Result<Box<dyn crate::storage::BlobWriter>, StorageError> {
            self.inner.begin_write(client)
        }
        fn barrier(&self, keys: &[BlobKey]) -> Vec<Result<(), StorageError>> {
            if self.syncs.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                let mut open = self.gate.lock().unwrap();
                while !*open {
                    open = self.opened.wait(open).unwrap();
                }
            }
            let failing = self.failing.lock().unwrap();
            self.inner
                .barrier(keys)
                .into_iter()
                .zip(keys)
                .map(|(r, k)| {
                    if failing.contains(k) {
                        Err(StorageError::Batch("injected".into()))
                    } else {
                        r
                    }
                })
                .collect()
        }
        fn open(&self, key: &BlobKey) -> Result<Box<dyn Read + Send>, StorageError> {
            self.inner.open(key)
        }
        fn delete(&self, key: &BlobKey) -> Result<(), StorageError> {
            self.inner.delete(key)
        }
        fn remove_client(&self, client: ClientId) -> Result<(), StorageError> {
            self.inner.remove_client(client)
        }
        fn recover(&self) -> Result<usize, StorageError> {
            self.inner.recover()
        }
        fn list(&self) -> Result<crate::storage::BlobListing<'_>, StorageError> {
            self.inner.list()
        }
    }

    /// Job `ticket`, kept under every retention rule.
    fn job(ticket: u64, content: Content, version: NewVersion) -> Job {
        Job {
            ticket,
            content,
            version,
            retention: Retention::KEEP_ALL,
            quota: None,
        }
    }

    /// Storage under `dir` over a [`Gated`] blob store whose first sync
    /// waits for the gate (unless `open`).
    fn gated_storage(dir: &std::path::Path, open: bool) -> (Arc<Gated>, Storage) {
        let gated = Arc::new(Gated {
            inner: crate::storage::fs::FsBlobStore::open(dir).unwrap(),
            syncs: std::sync::atomic::AtomicUsize::new(usize::from(open)),
            gate: Mutex::new(open),
            opened: Condvar::new(),
            failing: Mutex::new(Vec::new()),
        });
        let meta = crate::storage::sqlite::SqliteMetaStore::open(&dir.join("m.db")).unwrap();
        let storage = Storage::new(Arc::new(meta), gated.clone());
        (gated, storage)
    }

    #[test]
    fn commits_queued_behind_a_running_one_share_one_sync_and_one_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let (gated, storage) = gated_storage(dir.path(), false);
        let id = ClientId([6; 16]);
        storage
            .meta()
            .register(id, &UserName::try_from("gus").unwrap(), SystemTime::now())
            .unwrap();
        let commit = |storage: Storage, n: usize| {
            std::thread::spawn(move || {
                let name = format!("f{n}");
                let content = name.repeat(100).into_bytes();
                let version = new_version(id, &name, &content);
                let result = if n % 3 == 2 {
                    storage.commit_inline(content.clone(), version, &Retention::KEEP_ALL)
                } else {
                    let staged = stage(&storage, id, &content);
                    storage.commit(staged, version, &Retention::KEEP_ALL)
                };
                (name, content, result)
            })
        };
        // The first commit leads and stops in its sync; eight more queue
        // behind it.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let first = commit(storage.clone(), 0);
        while gated.syncs.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the first commit never synced"
            );
            std::thread::yield_now();
        }
        let queued: Vec<_> = (1..=8).map(|n| commit(storage.clone(), n)).collect();
        while storage.commits.lock().pending.len() < 8 {
            assert!(
                std::time::Instant::now() < deadline,
                "the commits never queued"
            );
            std::thread::yield_now();
        }
        *gated.gate.lock().unwrap() = true;
        gated.opened.notify_all();
        let mut outcomes = vec![first.join().unwrap()];
        outcomes.extend(queued.into_iter().map(|t| t.join().unwrap()));
        assert_eq!(
            gated.syncs.load(std::sync::atomic::Ordering::SeqCst),
            2,
            "the eight queued commits shared one sync"
        );
        for (name, content, result) in &outcomes {
            let key = result.as_ref().unwrap();
            assert_eq!(&read(&storage, key), content, "{name}");
        }
        assert_eq!(storage.meta().all_versions().unwrap().len(), 9);
    }

    #[test]
    fn a_member_whose_folder_sync_fails_fails_alone_and_leaves_no_blob() {
        let dir = tempfile::tempdir().unwrap();
        let (gated, storage) = gated_storage(dir.path(), true);
        let (a, b) = (ClientId([7; 16]), ClientId([8; 16]));
        for (id, name) in [(a, "ann"), (b, "bob")] {
            storage
                .meta()
                .register(id, &UserName::try_from(name).unwrap(), SystemTime::now())
                .unwrap();
        }
        // Publish b's blob first to learn its key, then fail its sync.
        let probe = stage(&storage, b, b"probe").publish().unwrap();
        *gated.failing.lock().unwrap() = vec![probe.clone()];
        struct Published(BlobKey);
        impl StagedBlob for Published {
            fn key(&self) -> &BlobKey {
                &self.0
            }
            fn publish(self: Box<Self>) -> Result<BlobKey, StorageError> {
                Ok(self.0)
            }
            fn abort(self: Box<Self>) -> Result<(), StorageError> {
                Ok(())
            }
        }
        let jobs = vec![
            job(
                1,
                Content::Blob(stage(&storage, a, b"ann's")),
                new_version(a, "x", b"ann's"),
            ),
            job(
                2,
                Content::Blob(Box::new(Published(probe.clone()))),
                new_version(b, "y", b"probe"),
            ),
            job(
                3,
                Content::Inline(b"small".to_vec()),
                new_version(b, "z", b"small"),
            ),
        ];
        let mut results = commit_batch(&storage, jobs);
        results.sort_by_key(|r| r.0);
        let [(1, Ok(kept)), (2, Err(_)), (3, Ok(small))] = results.as_slice() else {
            panic!("unexpected results {results:?}");
        };
        assert_eq!(read(&storage, kept), b"ann's");
        assert_eq!(read(&storage, small), b"small");
        assert!(
            storage.blobs().open(&probe).is_err(),
            "the unsynced blob is gone"
        );
        assert_eq!(storage.meta().all_versions().unwrap().len(), 2);
    }

    #[test]
    fn a_member_that_cannot_be_recorded_fails_alone_and_leaves_no_blob() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open_local(dir.path()).unwrap();
        let known = ClientId([1; 16]);
        let unknown = ClientId([2; 16]);
        storage
            .meta()
            .register(
                known,
                &UserName::try_from("lee").unwrap(),
                SystemTime::now(),
            )
            .unwrap();
        let jobs = vec![
            job(
                1,
                Content::Blob(stage(&storage, known, b"kept")),
                new_version(known, "a", b"kept"),
            ),
            job(
                2,
                Content::Blob(stage(&storage, unknown, b"refused")),
                new_version(unknown, "b", b"refused"),
            ),
            job(
                3,
                Content::Inline(b"small".to_vec()),
                new_version(known, "c", b"small"),
            ),
            job(
                4,
                Content::Inline(b"small, refused".to_vec()),
                new_version(unknown, "d", b"small, refused"),
            ),
        ];
        let mut results = commit_batch(&storage, jobs);
        results.sort_by_key(|r| r.0);
        let [(1, Ok(key)), (2, Err(_)), (3, Ok(small)), (4, Err(_))] = results.as_slice() else {
            panic!("unexpected results {results:?}");
        };
        assert_eq!(read(&storage, key), b"kept");
        assert!(small.is_inline() && !key.is_inline());
        assert_eq!(read(&storage, small), b"small");
        assert_eq!(storage.meta().inline_blobs().unwrap().len(), 1);
        let report = storage.recover().unwrap();
        assert_eq!(
            report.removed_orphans, 0,
            "the refused member's blob was removed at once"
        );
        assert_eq!(storage.meta().all_versions().unwrap().len(), 2);
    }
}
