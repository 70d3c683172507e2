//! Blobs in memory: the [`BlobStore`] for fast unit tests, and the
//! reference for what a store must do (keys unique and chosen by the store,
//! nothing visible before publish, abort leaves nothing).
//!
//! Everything is lost with the process, so [`MemBlobStore::barrier`] has
//! nothing to make durable.

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use protocol::ClientId;

use super::{BlobKey, BlobListing, BlobStore, BlobWriter, StagedBlob, StorageError};

#[derive(Default)]
struct Inner {
    /// Published blobs.
    blobs: BTreeMap<BlobKey, Arc<Vec<u8>>>,
    /// Writes begun and not yet published or aborted, by number.
    pending: BTreeMap<u64, Vec<u8>>,
    next: u64,
}

/// Blobs in memory, shared by clones.
#[derive(Clone, Default)]
pub struct MemBlobStore {
    inner: Arc<Mutex<Inner>>,
}

impl std::fmt::Debug for MemBlobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemBlobStore").finish_non_exhaustive()
    }
}

impl MemBlobStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes begun and neither published nor aborted.
    pub fn pending(&self) -> usize {
        self.lock().pending.len()
    }

    fn prefix(client: ClientId) -> String {
        format!("mem/{}/", client.to_hex())
    }

    /// Refuses a key that is not `mem/<client-hex>/<hex>`, as a store that
    /// resolves keys to places must.
    fn check(key: &BlobKey) -> Result<(), StorageError> {
        let hex = |s: &str| s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit());
        let mut parts = key.0.split('/');
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some("mem"), Some(client), Some(name), None) if hex(client) && hex(name) => Ok(()),
            _ => Err(StorageError::BadKey(key.0.clone())),
        }
    }
}

struct MemWriter {
    store: MemBlobStore,
    id: u64,
    client: ClientId,
}

impl BlobWriter for MemWriter {
    fn write(&mut self, bytes: &[u8]) -> Result<(), StorageError> {
        let mut inner = self.store.lock();
        let content = inner
            .pending
            .get_mut(&self.id)
            .ok_or_else(|| StorageError::Worker("write after abort".into()))?;
        content.extend_from_slice(bytes);
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<Box<dyn StagedBlob>, StorageError> {
        let key = BlobKey(format!(
            "{}{}",
            MemBlobStore::prefix(self.client),
            super::ordered_hex()
        ));
        Ok(Box::new(MemStaged {
            store: self.store.clone(),
            id: self.id,
            key,
        }))
    }

    fn abort(self: Box<Self>) -> Result<(), StorageError> {
        self.store.lock().pending.remove(&self.id);
        Ok(())
    }
}

struct MemStaged {
    store: MemBlobStore,
    id: u64,
    key: BlobKey,
}

impl StagedBlob for MemStaged {
    fn key(&self) -> &BlobKey {
        &self.key
    }

    fn publish(self: Box<Self>) -> Result<BlobKey, StorageError> {
        let mut inner = self.store.lock();
        let content = inner
            .pending
            .remove(&self.id)
            .ok_or_else(|| StorageError::Worker("published twice".into()))?;
        inner.blobs.insert(self.key.clone(), Arc::new(content));
        Ok(self.key)
    }

    fn abort(self: Box<Self>) -> Result<(), StorageError> {
        self.store.lock().pending.remove(&self.id);
        Ok(())
    }
}

/// A reader over a shared, immutable blob.
struct SharedReader {
    content: Arc<Vec<u8>>,
    at: usize,
    end: usize,
}

impl Read for SharedReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let rest = self.content.get(self.at..self.end).unwrap_or_default();
        let n = rest.len().min(buf.len());
        buf[..n].copy_from_slice(&rest[..n]);
        self.at += n;
        Ok(n)
    }
}

impl BlobStore for MemBlobStore {
    fn begin_write(&self, client: ClientId) -> Result<Box<dyn BlobWriter>, StorageError> {
        let mut inner = self.lock();
        let id = inner.next;
        inner.next += 1;
        inner.pending.insert(id, Vec::new());
        Ok(Box::new(MemWriter {
            store: self.clone(),
            id,
            client,
        }))
    }

    fn open(&self, key: &BlobKey) -> Result<Box<dyn Read + Send>, StorageError> {
        self.open_range(key, 0..u64::MAX)
    }

    fn open_range(
        &self,
        key: &BlobKey,
        range: std::ops::Range<u64>,
    ) -> Result<Box<dyn Read + Send>, StorageError> {
        Self::check(key)?;
        let content =
            self.lock()
                .blobs
                .get(key)
                .cloned()
                .ok_or_else(|| StorageError::NotFound {
                    op: "open",
                    what: key.0.clone(),
                })?;
        let clamp = |n: u64| usize::try_from(n).unwrap_or(usize::MAX).min(content.len());
        let (at, end) = (clamp(range.start), clamp(range.end));
        Ok(Box::new(SharedReader { content, at, end }))
    }

    fn barrier(&self, keys: &[BlobKey]) -> Vec<Result<(), StorageError>> {
        let inner = self.lock();
        keys.iter()
            .map(|k| {
                if inner.blobs.contains_key(k) {
                    Ok(())
                } else {
                    Err(StorageError::BadKey(k.0.clone()))
                }
            })
            .collect()
    }

    fn delete(&self, key: &BlobKey) -> Result<(), StorageError> {
        Self::check(key)?;
        self.lock().blobs.remove(key);
        Ok(())
    }

    fn remove_client(&self, client: ClientId) -> Result<(), StorageError> {
        let prefix = Self::prefix(client);
        self.lock().blobs.retain(|k, _| !k.0.starts_with(&prefix));
        Ok(())
    }

    fn recover(&self) -> Result<usize, StorageError> {
        let mut inner = self.lock();
        let removed = inner.pending.len();
        inner.pending.clear();
        Ok(removed)
    }

    fn list(&self) -> Result<BlobListing<'_>, StorageError> {
        // A snapshot in key order (the map is ordered); memory is what the
        // store holds anyway.
        let blobs: Vec<(BlobKey, u64)> = self
            .lock()
            .blobs
            .iter()
            .map(|(k, v)| (k.clone(), v.len() as u64))
            .collect();
        Ok(Box::new(blobs.into_iter().map(Ok)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(store: &MemBlobStore, key: &BlobKey) -> Vec<u8> {
        let mut out = Vec::new();
        store.open(key).unwrap().read_to_end(&mut out).unwrap();
        out
    }

    #[test]
    fn content_is_visible_only_once_published_under_the_finished_key() {
        let store = MemBlobStore::new();
        let mut w = store.begin_write(ClientId([1; 16])).unwrap();
        w.write(b"hello ").unwrap();
        w.write(b"world").unwrap();
        let staged = w.finish().unwrap();
        let key = staged.key().clone();
        assert!(matches!(
            store.open(&key),
            Err(StorageError::NotFound { .. })
        ));
        assert_eq!(staged.publish().unwrap(), key);
        assert!(matches!(
            store.barrier(std::slice::from_ref(&key)).as_slice(),
            [Ok(())]
        ));
        assert_eq!(read_all(&store, &key), b"hello world");
        let mut part = Vec::new();
        store
            .open_range(&key, 3..8)
            .unwrap()
            .read_to_end(&mut part)
            .unwrap();
        assert_eq!(part, b"lo wo");
        assert_eq!(store.pending(), 0);
    }

    #[test]
    fn abort_leaves_nothing_and_recover_counts_what_was_left() {
        let store = MemBlobStore::new();
        let mut w = store.begin_write(ClientId([1; 16])).unwrap();
        w.write(b"x").unwrap();
        w.abort().unwrap();
        let w = store.begin_write(ClientId([1; 16])).unwrap();
        w.finish().unwrap().abort().unwrap();
        assert_eq!(store.pending(), 0);
        let _left = store.begin_write(ClientId([2; 16])).unwrap();
        assert_eq!(store.recover().unwrap(), 1);
        assert_eq!(store.list().unwrap().count(), 0);
    }

    #[test]
    fn remove_client_removes_only_its_blobs() {
        let store = MemBlobStore::new();
        let put = |id: u8| {
            let mut w = store.begin_write(ClientId([id; 16])).unwrap();
            w.write(&[id]).unwrap();
            w.finish().unwrap().publish().unwrap()
        };
        let (a, b) = (put(1), put(2));
        store.remove_client(ClientId([1; 16])).unwrap();
        assert!(store.open(&a).is_err());
        assert_eq!(read_all(&store, &b), [2]);
        let keys: Vec<BlobKey> = store.list().unwrap().map(|b| b.unwrap().0).collect();
        assert_eq!(keys, vec![b]);
    }
}
