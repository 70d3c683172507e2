//! Start-up recovery: metadata and blobs brought back into agreement after
//! a crash or kill, in bounded memory.
//!
//! Four listings in key order are merged, as a sorted merge join: the
//! blob store's ([`BlobStore::list`](super::BlobStore::list)), the inline
//! content's, the version rows' and the pack rows' (the last three read
//! from the metadata a page at a time). A key with content and no row is
//! an orphan and is removed; a version row whose content is missing or of
//! another size is forgotten (and its content, if any, removed). A pack
//! row whose bytes are missing or of another size is logged as an error
//! and kept, with whatever bytes there are, for the operator: its objects
//! may be referenced by snapshots, and scrub reports them. What is held at once is a page of rows, a
//! page of inline keys and what the blob store's listing holds (the
//! directory store: one client folder's names), never every key.

use std::cmp::Ordering;
use std::iter::Peekable;

use super::{BlobKey, Storage, StorageError};

/// Rows read at a time by [`Storage::recover`].
pub(super) const PAGE: usize = 1000;

/// What [`Storage::recover`] repaired.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RecoveryReport {
    pub removed_temporaries: usize,
    /// Blobs on disk without a version row (a crash between publishing and
    /// recording): removed.
    pub removed_orphans: usize,
    /// Version rows whose blob is missing or has the wrong size: forgotten.
    pub forgotten_versions: usize,
}

type Item<T = u64> = Result<(BlobKey, T), StorageError>;

/// Which table a row is of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Row {
    Version,
    Pack,
}

/// A listing read `page` keys at a time after the last key it yielded.
struct Paged<F> {
    fetch: F,
    page: usize,
    after: Option<BlobKey>,
    buffer: std::vec::IntoIter<(BlobKey, u64)>,
    done: bool,
}

impl<F> Paged<F>
where
    F: FnMut(Option<&BlobKey>, usize) -> Result<Vec<(BlobKey, u64)>, StorageError>,
{
    fn new(page: usize, fetch: F) -> Self {
        Self {
            fetch,
            page,
            after: None,
            buffer: Vec::new().into_iter(),
            done: false,
        }
    }
}

impl<F> Iterator for Paged<F>
where
    F: FnMut(Option<&BlobKey>, usize) -> Result<Vec<(BlobKey, u64)>, StorageError>,
{
    type Item = Item;

    fn next(&mut self) -> Option<Item> {
        if let Some(next) = self.buffer.next() {
            return Some(Ok(next));
        }
        if self.done {
            return None;
        }
        match (self.fetch)(self.after.as_ref(), self.page) {
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
            Ok(rows) => {
                self.done = rows.len() < self.page;
                self.after = rows.last().map(|(k, _)| k.clone());
                self.buffer = rows.into_iter();
                self.buffer.next().map(Ok)
            }
        }
    }
}

/// One listing, checked to be in strictly increasing key order: the merge
/// would take a key out of order for a missing one.
struct Ordered<T, I: Iterator<Item = Item<T>>> {
    what: &'static str,
    inner: Peekable<I>,
    last: Option<BlobKey>,
}

impl<T, I: Iterator<Item = Item<T>>> Ordered<T, I> {
    fn new(what: &'static str, inner: I) -> Self {
        Self {
            what,
            inner: inner.peekable(),
            last: None,
        }
    }

    /// The next key and size, or `None` at the end.
    fn next(&mut self) -> Result<Option<(BlobKey, T)>, StorageError> {
        let Some((key, size)) = self.inner.next().transpose()? else {
            return Ok(None);
        };
        if self.last.as_ref().is_some_and(|last| *last >= key) {
            return Err(StorageError::Corrupt(format!(
                "{} are not in key order at {key}",
                self.what
            )));
        }
        self.last = Some(key.clone());
        Ok(Some((key, size)))
    }
}

/// Two disjoint listings in key order, merged into one.
fn merge<T>(
    a: impl Iterator<Item = Item<T>>,
    b: impl Iterator<Item = Item<T>>,
) -> impl Iterator<Item = Item<T>> {
    let (mut a, mut b) = (a.peekable(), b.peekable());
    std::iter::from_fn(move || {
        let a_first = match (a.peek(), b.peek()) {
            (None, None) => return None,
            (Some(_), None) | (Some(Err(_)), _) => true,
            (None, Some(_)) | (_, Some(Err(_))) => false,
            (Some(Ok((ka, _))), Some(Ok((kb, _)))) => ka <= kb,
        };
        if a_first {
            a.next()
        } else {
            b.next()
        }
    })
}

impl Storage {
    /// Whether blob `key`, which has no row, is older than
    /// [`SHARED_ORPHAN_AGE`](super::SHARED_ORPHAN_AGE): on a shared
    /// repository a younger one may be another server's upload about to be
    /// recorded. A store that cannot tell keeps it.
    fn old_enough_to_remove(&self, key: &BlobKey) -> Result<bool, StorageError> {
        if key.is_inline() {
            // Inline content is written with its row, in one transaction.
            return Ok(true);
        }
        let Some(modified) = self.blobs.modified(key)? else {
            return Ok(false);
        };
        Ok(modified
            .elapsed()
            .is_ok_and(|age| age >= super::SHARED_ORPHAN_AGE))
    }

    /// [`Storage::recover`], reading rows and inline keys `page` at a time.
    pub(super) fn recover_in_pages(&self, page: usize) -> Result<RecoveryReport, StorageError> {
        let removed_temporaries = self.blobs.recover()?;
        let inline = Paged::new(page, |after, n| self.meta.inline_blobs_after(after, n));
        let mut stored = Ordered::new("stored blobs", merge(self.blobs.list()?, inline));
        let versions = Paged::new(page, |after, n| self.meta.recorded_blobs(after, n))
            .map(|r| r.map(|(k, size)| (k, (size, Row::Version))));
        let packs = Paged::new(page, |after, n| match &self.repo {
            Some(repo) => repo.recorded_packs(after, n),
            None => Ok(Vec::new()),
        })
        .map(|r| r.map(|(k, size)| (k, (size, Row::Pack))));
        let mut rows = Ordered::new("version and pack rows", merge(versions, packs));
        let mut report = RecoveryReport {
            removed_temporaries,
            ..RecoveryReport::default()
        };
        let mut broken: Vec<BlobKey> = Vec::new();
        let (mut content, mut row) = (stored.next()?, rows.next()?);
        loop {
            let order = match (&content, &row) {
                (None, None) => break,
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (Some((c, _)), Some((r, _))) => c.cmp(r),
            };
            let (mut orphan, mut forget) = (None, None);
            match order {
                Ordering::Less => {
                    orphan = content.take();
                    content = stored.next()?;
                }
                Ordering::Greater => {
                    forget = row.take().map(|r| (r, None));
                    row = rows.next()?;
                }
                Ordering::Equal => {
                    let mismatch = match (&content, &row) {
                        (Some((_, found)), Some((_, (size, kind)))) if found != size => {
                            Some((*found, *kind))
                        }
                        _ => None,
                    };
                    if let Some((found, kind)) = mismatch {
                        // A pack's bytes are kept for the operator (see the
                        // module's note); a version's go.
                        if kind == Row::Version {
                            orphan = content.take();
                        }
                        forget = row.take().map(|r| (r, Some(found)));
                    }
                    content = stored.next()?;
                    row = rows.next()?;
                }
            }
            if let Some(((blob, (size, Row::Pack)), found)) = forget {
                tracing::error!(
                    pack = %blob,
                    expected = size,
                    found = ?found,
                    "pack row without its bytes; its objects cannot be fetched"
                );
                continue;
            }
            if let Some(((blob, (size, Row::Version)), found)) = forget {
                if self.shared.is_some() {
                    // Another server may have recorded it after the listing
                    // passed its key: never forget on a shared repository.
                    tracing::error!(
                        blob = %blob,
                        expected = size,
                        found = ?found,
                        "version row whose blob was not listed; kept (scrub checks it)"
                    );
                    continue;
                }
                tracing::warn!(
                    blob = %blob,
                    expected = size,
                    found = ?found,
                    "version row without its blob; forgetting it"
                );
                broken.push(blob);
            }
            // Rows after the last one read are untouched, so the pages still
            // to come are the same whether or not these are forgotten first.
            if broken.len() >= page {
                report.forgotten_versions += self.meta.forget_blobs(&broken)?;
                broken.clear();
            }
            if let Some((key, _)) = orphan {
                if self.shared.is_some() && !self.old_enough_to_remove(&key)? {
                    continue;
                }
                self.delete_blob(&key)?;
                report.removed_orphans += 1;
            }
        }
        if !broken.is_empty() {
            report.forgotten_versions += self.meta.forget_blobs(&broken)?;
        }
        if self.shared.is_some() {
            // The other servers' connections are staging: theirs are not ours
            // to drop (docs/SCALING.md: what a killed server leaves).
        } else if let Some(repo) = &self.repo {
            let dropped = repo.clear_stages()?;
            if dropped > 0 {
                tracing::debug!(
                    dropped,
                    "dropped references staged by connections that ended"
                );
            }
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::SystemTime;

    use protocol::{ClientId, FileName, UserName};

    use super::*;
    use crate::storage::{fs, memory, sqlite, BlobStore, NewVersion, Retention};

    #[test]
    fn recovery_in_small_pages_forgets_broken_rows_and_removes_orphans() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open_local(dir.path()).unwrap();
        let id = ClientId([6; 16]);
        storage
            .meta()
            .register(id, &UserName::try_from("ann").unwrap(), SystemTime::now())
            .unwrap();
        let version = |name: &str, size: u64| NewVersion {
            client: id,
            file: FileName::try_from(name).unwrap(),
            blob: BlobKey(String::new()),
            size,
            content_size: protocol::crypto::pkcs7_len(size),
            cksum: 0,
            sha256: [0; 32],
            stored_at: SystemTime::now(),
        };
        let staged = |content: &[u8]| {
            let mut w = storage.blobs().begin_write(id).unwrap();
            w.write(content).unwrap();
            w.finish().unwrap()
        };
        let mut blobs = Vec::new();
        for i in 0..7u8 {
            let content = vec![i; 10 + usize::from(i)];
            let key = storage
                .commit(
                    staged(&content),
                    version(&format!("b{i}"), content.len() as u64),
                    &Retention::KEEP_ALL,
                )
                .unwrap();
            blobs.push(key);
        }
        for i in 0..5u8 {
            storage
                .commit_inline(
                    vec![i; 3],
                    version(&format!("i{i}"), 3),
                    &Retention::KEEP_ALL,
                )
                .unwrap();
        }
        // Three orphans (published, never recorded), two missing blobs,
        // one of the wrong size.
        for content in [&b"o1"[..], b"o2", b"o3"] {
            staged(content).publish().unwrap();
        }
        let fs = fs::FsBlobStore::open(dir.path()).unwrap();
        std::fs::remove_file(fs.path_of(&blobs[1]).unwrap()).unwrap();
        std::fs::remove_file(fs.path_of(&blobs[4]).unwrap()).unwrap();
        std::fs::write(fs.path_of(&blobs[6]).unwrap(), b"short").unwrap();
        // A staged temporary left behind, as by a crash.
        std::mem::forget(staged(b"tmp"));

        let report = storage.recover_in_pages(2).unwrap();
        assert_eq!(
            report,
            RecoveryReport {
                removed_temporaries: 1,
                // The three, and the short blob whose row was forgotten.
                removed_orphans: 4,
                forgotten_versions: 3,
            }
        );
        let rows = storage.meta().all_versions().unwrap();
        assert_eq!(rows.len(), 7 + 5 - 3);
        for row in rows {
            let content = storage.read_latest(id, &row.file).unwrap().unwrap();
            assert_eq!(content.len() as u64, row.size, "{}", row.file);
        }
        assert_eq!(
            storage.recover_in_pages(1).unwrap(),
            RecoveryReport::default(),
            "a second pass finds nothing"
        );
    }

    #[test]
    fn merges_blob_keys_that_sort_after_the_inline_ones() {
        // The memory store's keys (`mem/...`) sort after `inline/...`,
        // unlike the directory store's (`clients/...`).
        let dir = tempfile::tempdir().unwrap();
        let meta = sqlite::SqliteMetaStore::open(&dir.path().join("m.db")).unwrap();
        let blobs = memory::MemBlobStore::new();
        let storage = Storage::new(Arc::new(meta), Arc::new(blobs.clone()));
        let id = ClientId([7; 16]);
        storage
            .meta()
            .register(id, &UserName::try_from("bo").unwrap(), SystemTime::now())
            .unwrap();
        let version = |name: &str| NewVersion {
            client: id,
            file: FileName::try_from(name).unwrap(),
            blob: BlobKey(String::new()),
            size: 2,
            content_size: 16,
            cksum: 0,
            sha256: [0; 32],
            stored_at: SystemTime::now(),
        };
        let staged = || {
            let mut w = blobs.begin_write(id).unwrap();
            w.write(b"ab").unwrap();
            w.finish().unwrap()
        };
        for i in 0..4 {
            storage
                .commit_inline(
                    b"ab".to_vec(),
                    version(&format!("i{i}")),
                    &Retention::KEEP_ALL,
                )
                .unwrap();
            storage
                .commit(staged(), version(&format!("b{i}")), &Retention::KEEP_ALL)
                .unwrap();
        }
        let orphan = staged().publish().unwrap();
        assert_eq!(
            storage.recover_in_pages(3).unwrap(),
            RecoveryReport {
                removed_orphans: 1,
                ..RecoveryReport::default()
            }
        );
        assert!(blobs.open(&orphan).is_err());
        assert_eq!(storage.meta().all_versions().unwrap().len(), 8);
    }

    #[test]
    fn refuses_a_listing_out_of_key_order() {
        let listing = [("b", 1), ("a", 1)].map(|(k, n)| Ok((BlobKey(k.into()), n)));
        let mut ordered = Ordered::new("stored blobs", listing.into_iter());
        assert!(ordered.next().unwrap().is_some());
        assert!(matches!(ordered.next(), Err(StorageError::Corrupt(_))));
    }

    #[test]
    fn merges_two_sorted_listings_and_pages_through_one() {
        let keys =
            |v: &[&str]| -> Vec<Item> { v.iter().map(|k| Ok((BlobKey((*k).into()), 0))).collect() };
        let all: Vec<String> = merge(
            keys(&["a", "c", "e"]).into_iter(),
            keys(&["b", "d"]).into_iter(),
        )
        .map(|r| r.unwrap().0 .0)
        .collect();
        assert_eq!(all, ["a", "b", "c", "d", "e"]);
        let source: Vec<(BlobKey, u64)> = (0..7).map(|i| (BlobKey(format!("k{i}")), i)).collect();
        let mut calls = 0;
        let paged: Vec<u64> = Paged::new(3, |after: Option<&BlobKey>, n| {
            calls += 1;
            Ok(source
                .iter()
                .filter(|(k, _)| after.is_none_or(|a| k > a))
                .take(n)
                .cloned()
                .collect())
        })
        .map(|r| r.unwrap().1)
        .collect();
        assert_eq!(paged, [0, 1, 2, 3, 4, 5, 6]);
        assert_eq!(calls, 3, "the short third page is the last");
    }
}
