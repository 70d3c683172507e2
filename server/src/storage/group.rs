//! Group commit: uploads that finish at the same moment share their syncs.
//!
//! Every commit needs its blob's new name made durable (a sync of the
//! client's `blobs/` folder) and its version row made durable (a SQLite
//! WAL sync). Paid one upload at a time, those two syncs bound a server
//! taking many small files over several connections. Here the first
//! committer to find no commit running becomes the leader: it takes every
//! commit queued so far, publishes the blobs, syncs each folder once and
//! records every row in one transaction, then hands each waiter its own
//! result. Those who queued while it worked form the next batch. Nothing
//! waits on a timer, so a lone upload commits as soon as before.
//!
//! Each member of a batch still succeeds or fails on its own: a blob that
//! cannot be published or a row that cannot be inserted fails only its
//! upload. A failed folder sync or transaction fails every member, whose
//! blobs are then removed.

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
    ) -> Result<BlobKey, StorageError> {
        let mut queue = self.lock();
        let ticket = queue.next_ticket;
        queue.next_ticket += 1;
        queue.pending.push(Job {
            ticket,
            content,
            version,
            retention,
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
        });
    }
    if pending.is_empty() {
        return results;
    }
    let published: Vec<BlobKey> = pending
        .iter()
        .filter(|p| p.inline.is_none())
        .map(|p| p.version.blob.clone())
        .collect();
    if let Err(e) = storage.blobs().sync_published(&published) {
        // The published blobs may not survive a crash: fail them (small
        // files in the batch do not depend on the sync).
        let cause = e.to_string();
        storage.delete_unrecorded(published.iter());
        let (inline, failed): (Vec<_>, Vec<_>) = tickets
            .into_iter()
            .zip(pending)
            .partition(|(_, p)| p.inline.is_some());
        results.extend(
            failed
                .into_iter()
                .map(|(ticket, _)| (ticket, Err(StorageError::Batch(cause.clone())))),
        );
        (tickets, pending) = inline.into_iter().unzip();
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
    use std::sync::{Arc, Barrier};
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
        let mut w = storage.blobs().create(client).unwrap();
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
            Job {
                ticket: 1,
                content: Content::Blob(stage(&storage, known, b"kept")),
                version: new_version(known, "a", b"kept"),
                retention: Retention::KEEP_ALL,
            },
            Job {
                ticket: 2,
                content: Content::Blob(stage(&storage, unknown, b"refused")),
                version: new_version(unknown, "b", b"refused"),
                retention: Retention::KEEP_ALL,
            },
            Job {
                ticket: 3,
                content: Content::Inline(b"small".to_vec()),
                version: new_version(known, "c", b"small"),
                retention: Retention::KEEP_ALL,
            },
            Job {
                ticket: 4,
                content: Content::Inline(b"small, refused".to_vec()),
                version: new_version(unknown, "d", b"small, refused"),
                retention: Retention::KEEP_ALL,
            },
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
