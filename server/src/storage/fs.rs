//! Blobs as files in a local data directory.
//!
//! ```text
//! <data>/clients/<client-hex>/tmp/<random-hex>.part   an upload in progress or awaiting its verdict
//! <data>/clients/<client-hex>/blobs/<random-hex>      a committed version
//! ```
//!
//! Every path is built from a client id (hex) and random hex generated here;
//! keys read back from the metadata are parsed against that shape before
//! use, so no path can leave a client's folder.

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use protocol::ClientId;

use super::{BlobKey, BlobListing, BlobStore, BlobWriter, StagedBlob, StorageError};

/// Directory of the per-client folders.
pub const CLIENTS_DIR: &str = "clients";
/// Committed blobs inside a client's folder.
pub const BLOBS_DIR: &str = "blobs";
/// Temporaries inside a client's folder.
pub const TMP_DIR: &str = "tmp";
/// Suffix of temporaries.
pub const TMP_SUFFIX: &str = ".part";

/// Buffer in front of each temporary file: writes of this size or more go
/// straight to the file.
const WRITE_BUFFER: usize = 256 * 1024;
/// Bytes written between background syncs of a large temporary. The final
/// sync before the 1603 answer then only has the tail left to write back,
/// instead of the whole file.
pub const EARLY_SYNC_BYTES: u64 = if cfg!(test) {
    1024 * 1024
} else {
    64 * 1024 * 1024
};

fn random_hex() -> String {
    let bytes: [u8; 16] = rand::random();
    hex::encode(bytes)
}

/// A blob name: ordered by time, see [`super::ordered_hex`].
fn blob_hex() -> String {
    super::ordered_hex()
}

fn is_hex32(s: &str) -> bool {
    s.len() == 32
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Syncs a directory so that entries created, renamed or removed in it are
/// durable.
fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StorageError::io("sync directory", dir, e))
}

/// Writes `bytes` to `path` so that a crash leaves the old content or the
/// new, whole: `PATH.tmp` beside it, synced, renamed over it, and the
/// directory synced. For small files written by one process at a time.
pub(crate) fn write_durably(path: &Path, bytes: &[u8]) -> Result<(), StorageError> {
    use std::io::Write as _;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    File::create(&tmp)
        .and_then(|mut f| {
            f.write_all(bytes)?;
            f.sync_all()
        })
        .map_err(|e| StorageError::io("write", &tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| StorageError::io("rename", path, e))?;
    sync_dir(dir)
}

pub(crate) fn create_private_dir(path: &Path) -> std::io::Result<()> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(path)
}

/// Blobs under a data directory.
#[derive(Debug, Clone)]
pub struct FsBlobStore {
    root: PathBuf,
}

impl FsBlobStore {
    /// A store rooted at `data_dir`, created (mode 0700) if missing.
    ///
    /// # Errors
    /// When the directories cannot be created.
    pub fn open(data_dir: &Path) -> Result<Self, StorageError> {
        let clients = data_dir.join(CLIENTS_DIR);
        create_private_dir(&clients).map_err(|e| StorageError::io("create", &clients, e))?;
        Ok(Self {
            root: data_dir.to_owned(),
        })
    }

    fn client_dir(&self, client: ClientId) -> PathBuf {
        self.root.join(CLIENTS_DIR).join(client.to_hex())
    }

    /// The path of a committed blob, after checking that `key` has exactly
    /// the shape this store generates.
    ///
    /// # Errors
    /// [`StorageError::BadKey`] for any other key.
    pub fn path_of(&self, key: &BlobKey) -> Result<PathBuf, StorageError> {
        let bad = || StorageError::BadKey(key.0.clone());
        let parts: Vec<&str> = key.0.split('/').collect();
        match parts.as_slice() {
            [CLIENTS_DIR, client, BLOBS_DIR, blob] if is_hex32(client) && is_hex32(blob) => {
                Ok(self
                    .root
                    .join(CLIENTS_DIR)
                    .join(client)
                    .join(BLOBS_DIR)
                    .join(blob))
            }
            _ => Err(bad()),
        }
    }

    /// Creates the client's `blobs/` and `tmp/` folders if missing, making
    /// new directory entries durable.
    fn ensure_client_dirs(&self, client: ClientId) -> Result<PathBuf, StorageError> {
        let dir = self.client_dir(client);
        let blobs = dir.join(BLOBS_DIR);
        let tmp = dir.join(TMP_DIR);
        if blobs.is_dir() && tmp.is_dir() {
            return Ok(dir);
        }
        for d in [&blobs, &tmp] {
            create_private_dir(d).map_err(|e| StorageError::io("create", d, e))?;
        }
        sync_dir(&dir)?;
        sync_dir(&self.root.join(CLIENTS_DIR))?;
        Ok(dir)
    }
}

impl BlobStore for FsBlobStore {
    /// The data directory and its `clients/` folder are still there, as
    /// directories.
    fn probe(&self) -> Result<(), StorageError> {
        for dir in [self.root.clone(), self.root.join(CLIENTS_DIR)] {
            let meta = std::fs::metadata(&dir).map_err(|e| StorageError::io("stat", &dir, e))?;
            if !meta.is_dir() {
                return Err(StorageError::io(
                    "stat",
                    &dir,
                    std::io::Error::other("not a directory"),
                ));
            }
        }
        Ok(())
    }

    fn begin_write(&self, client: ClientId) -> Result<Box<dyn BlobWriter>, StorageError> {
        let dir = self.ensure_client_dirs(client)?;
        let path = dir
            .join(TMP_DIR)
            .join(format!("{}{TMP_SUFFIX}", random_hex()));
        let mut options = OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let file = options
            .open(&path)
            .map_err(|e| StorageError::io("create", &path, e))?;
        Ok(Box::new(FsWriter {
            file: Some(BufWriter::with_capacity(WRITE_BUFFER, file)),
            path,
            client_dir: dir,
            client,
            unsynced: 0,
            syncer: None,
        }))
    }

    fn open(&self, key: &BlobKey) -> Result<Box<dyn Read + Send>, StorageError> {
        let path = self.path_of(key)?;
        let file = File::open(&path).map_err(|e| StorageError::io("open", &path, e))?;
        Ok(Box::new(file))
    }

    fn open_range(
        &self,
        key: &BlobKey,
        range: std::ops::Range<u64>,
    ) -> Result<Box<dyn Read + Send>, StorageError> {
        use std::io::{Seek, SeekFrom};
        let path = self.path_of(key)?;
        let mut file = File::open(&path).map_err(|e| StorageError::io("open", &path, e))?;
        file.seek(SeekFrom::Start(range.start))
            .map_err(|e| StorageError::io("seek", &path, e))?;
        Ok(Box::new(file.take(range.end.saturating_sub(range.start))))
    }

    fn barrier(&self, keys: &[BlobKey]) -> Vec<Result<(), StorageError>> {
        // One sync per folder; each key gets the outcome of its folder's.
        let mut synced: std::collections::HashMap<PathBuf, Result<(), String>> =
            std::collections::HashMap::new();
        keys.iter()
            .map(|key| {
                let path = self.path_of(key)?;
                let folder = path.parent().unwrap_or(&self.root).to_owned();
                let outcome = synced
                    .entry(folder)
                    .or_insert_with_key(|folder| sync_dir(folder).map_err(|e| e.to_string()));
                outcome.clone().map_err(StorageError::Batch)
            })
            .collect()
    }

    fn modified(&self, key: &BlobKey) -> Result<Option<std::time::SystemTime>, StorageError> {
        let path = self.path_of(key)?;
        match fs::metadata(&path).and_then(|m| m.modified()) {
            Ok(t) => Ok(Some(t)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StorageError::io("stat", &path, e)),
        }
    }

    fn delete(&self, key: &BlobKey) -> Result<(), StorageError> {
        let path = self.path_of(key)?;
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StorageError::io("remove", &path, e)),
        }
    }

    fn remove_client(&self, client: ClientId) -> Result<(), StorageError> {
        let dir = self.client_dir(client);
        match fs::remove_dir_all(&dir) {
            Ok(()) => sync_dir(&self.root.join(CLIENTS_DIR)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StorageError::io("remove", &dir, e)),
        }
    }

    fn recover(&self) -> Result<usize, StorageError> {
        let mut removed = 0;
        for client in self.client_names(false)? {
            let tmp = self.root.join(CLIENTS_DIR).join(&client).join(TMP_DIR);
            let Ok(temps) = fs::read_dir(&tmp) else {
                continue;
            };
            for t in temps {
                let t = t.map_err(|e| StorageError::io("list", &tmp, e))?;
                let path = t.path();
                if path.is_file() {
                    fs::remove_file(&path).map_err(|e| StorageError::io("remove", &path, e))?;
                    removed += 1;
                }
            }
            sync_dir(&tmp)?;
        }
        Ok(removed)
    }

    fn list(&self) -> Result<BlobListing<'_>, StorageError> {
        let mut clients = self.client_names(true)?;
        clients.sort_unstable();
        Ok(Box::new(Listing {
            store: self,
            clients: clients.into_iter(),
            blobs: Vec::new().into_iter(),
        }))
    }
}

impl FsBlobStore {
    /// The names of the client folders (32 hex digits each), in no order;
    /// anything else is left alone (with a warning when `warn`).
    fn client_names(&self, warn: bool) -> Result<Vec<String>, StorageError> {
        let clients = self.root.join(CLIENTS_DIR);
        let entries = fs::read_dir(&clients).map_err(|e| StorageError::io("list", &clients, e))?;
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| StorageError::io("list", &clients, e))?;
            match entry.file_name().to_str().filter(|n| is_hex32(n)) {
                Some(client) => names.push(client.to_owned()),
                None if warn => {
                    tracing::warn!(entry = ?entry.path(), "unexpected entry in the clients folder; left alone");
                }
                None => {}
            }
        }
        Ok(names)
    }

    /// The committed blobs of one client folder, sorted by key.
    fn client_blobs(&self, client: &str) -> Result<Vec<(BlobKey, u64)>, StorageError> {
        let blobs = self.root.join(CLIENTS_DIR).join(client).join(BLOBS_DIR);
        let Ok(listing) = fs::read_dir(&blobs) else {
            return Ok(Vec::new());
        };
        let mut found = Vec::new();
        for b in listing {
            let b = b.map_err(|e| StorageError::io("list", &blobs, e))?;
            let file_name = b.file_name();
            let meta = b
                .metadata()
                .map_err(|e| StorageError::io("stat", &b.path(), e))?;
            match file_name.to_str() {
                Some(blob) if is_hex32(blob) && meta.is_file() => {
                    let key = BlobKey(format!("{CLIENTS_DIR}/{client}/{BLOBS_DIR}/{blob}"));
                    found.push((key, meta.len()));
                }
                _ => {
                    tracing::warn!(entry = ?b.path(), "unexpected entry among blobs; left alone")
                }
            }
        }
        found.sort_unstable();
        Ok(found)
    }
}

/// [`FsBlobStore::list`]: client folders in order, each read and sorted
/// when reached. Keys are `clients/<32 hex>/blobs/<32 hex>`, all of one
/// length, so folder order then file order is key order. Memory: the
/// client names and one client's blob names, never every blob at once
/// (a directory cannot be read in name order without reading it whole).
struct Listing<'a> {
    store: &'a FsBlobStore,
    clients: std::vec::IntoIter<String>,
    blobs: std::vec::IntoIter<(BlobKey, u64)>,
}

impl Iterator for Listing<'_> {
    type Item = Result<(BlobKey, u64), StorageError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(blob) = self.blobs.next() {
                return Some(Ok(blob));
            }
            let client = self.clients.next()?;
            match self.store.client_blobs(&client) {
                Ok(blobs) => self.blobs = blobs.into_iter(),
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

/// Early writeback without `unsafe`: a thread that calls `sync_data` on a
/// second handle of the temporary whenever asked, while the writer goes on
/// writing. Requests made while a sync runs are merged into the next one.
struct Syncer {
    ask: std::sync::mpsc::SyncSender<()>,
    done: std::thread::JoinHandle<std::io::Result<()>>,
}

impl Syncer {
    fn start(file: &File) -> std::io::Result<Self> {
        let file = file.try_clone()?;
        let (ask, asked) = std::sync::mpsc::sync_channel::<()>(1);
        let done = std::thread::Builder::new()
            .name("upload-sync".into())
            .spawn(move || {
                for () in asked {
                    file.sync_data()?;
                }
                Ok(())
            })?;
        Ok(Self { ask, done })
    }

    /// Waits for the syncs asked for; any failure fails the upload (a
    /// failed sync may have dropped data the final sync would not see).
    fn join(self) -> std::io::Result<()> {
        drop(self.ask);
        self.done
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the sync thread panicked")))
    }
}

/// A temporary being written.
struct FsWriter {
    file: Option<BufWriter<File>>,
    path: PathBuf,
    client_dir: PathBuf,
    client: ClientId,
    /// Bytes written since the last background sync was asked for.
    unsynced: u64,
    syncer: Option<Syncer>,
}

impl BlobWriter for FsWriter {
    fn write(&mut self, bytes: &[u8]) -> Result<(), StorageError> {
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| StorageError::Worker("write after finish".into()))?;
        file.write_all(bytes)
            .map_err(|e| StorageError::io("write", &self.path, e))?;
        self.unsynced += bytes.len() as u64;
        if self.unsynced >= EARLY_SYNC_BYTES {
            self.unsynced = 0;
            if self.syncer.is_none() {
                let syncer = Syncer::start(file.get_ref())
                    .map_err(|e| StorageError::io("start syncing", &self.path, e))?;
                self.syncer = Some(syncer);
            }
            if let Some(syncer) = &self.syncer {
                // Full: a sync is already due and will cover these bytes.
                let _ = syncer.ask.try_send(());
            }
        }
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> Result<Box<dyn StagedBlob>, StorageError> {
        let file = self
            .file
            .take()
            .ok_or_else(|| StorageError::Worker("finished twice".into()))?;
        let file = file
            .into_inner()
            .map_err(|e| StorageError::io("flush", &self.path, e.into_error()))?;
        if let Some(syncer) = self.syncer.take() {
            syncer
                .join()
                .map_err(|e| StorageError::io("sync", &self.path, e))?;
        }
        file.sync_all()
            .map_err(|e| StorageError::io("sync", &self.path, e))?;
        drop(file);
        // The final name is chosen now, close to the commit, so that keys
        // committed together sort together (see `ordered_hex`).
        let blob = blob_hex();
        let key = BlobKey(format!(
            "{CLIENTS_DIR}/{}/{BLOBS_DIR}/{blob}",
            self.client.to_hex()
        ));
        Ok(Box::new(FsStaged {
            path: Some(std::mem::take(&mut self.path)),
            dest: self.client_dir.join(BLOBS_DIR).join(blob),
            key,
        }))
    }

    fn abort(mut self: Box<Self>) -> Result<(), StorageError> {
        if let Some(syncer) = self.syncer.take() {
            // The content goes anyway: a failed sync does not matter.
            let _ = syncer.join();
        }
        if self.file.take().is_some() {
            remove_temporary(&self.path)?;
        }
        Ok(())
    }
}

/// Removes a temporary that will not be published (no error if gone).
fn remove_temporary(path: &Path) -> Result<(), StorageError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StorageError::io("remove", path, e)),
    }
}

impl Drop for FsWriter {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// A synced temporary awaiting publication.
struct FsStaged {
    /// `None` once published or aborted.
    path: Option<PathBuf>,
    /// Where publishing renames it to.
    dest: PathBuf,
    key: BlobKey,
}

impl StagedBlob for FsStaged {
    fn key(&self) -> &BlobKey {
        &self.key
    }

    fn publish(mut self: Box<Self>) -> Result<BlobKey, StorageError> {
        let tmp = self
            .path
            .take()
            .ok_or_else(|| StorageError::Worker("published twice".into()))?;
        if let Err(e) = fs::rename(&tmp, &self.dest) {
            let _ = fs::remove_file(&tmp);
            return Err(StorageError::io("rename", &tmp, e));
        }
        Ok(self.key.clone())
    }

    fn abort(mut self: Box<Self>) -> Result<(), StorageError> {
        match self.path.take() {
            Some(path) => remove_temporary(&path),
            None => Ok(()),
        }
    }
}

impl Drop for FsStaged {
    fn drop(&mut self) {
        if let Some(path) = self.path.take() {
            let _ = fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files_under(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_owned()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    out.push(p);
                }
            }
        }
        out
    }

    #[test]
    fn publishes_only_after_finish_and_publish() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobStore::open(dir.path()).unwrap();
        let id = ClientId([0xab; 16]);
        let mut w = store.begin_write(id).unwrap();
        w.write(b"hello ").unwrap();
        w.write(b"world").unwrap();
        let staged = w.finish().unwrap();
        assert!(
            only_temporaries(dir.path()),
            "nothing is visible before publish"
        );
        let key = staged.publish().unwrap();
        let synced = store.barrier(std::slice::from_ref(&key));
        assert!(matches!(synced.as_slice(), [Ok(())]), "{synced:?}");
        let mut content = String::new();
        store
            .open(&key)
            .unwrap()
            .read_to_string(&mut content)
            .unwrap();
        assert_eq!(content, "hello world");
        let path = store.path_of(&key).unwrap();
        assert!(path.starts_with(dir.path().join("clients").join(id.to_hex()).join("blobs")));
    }

    fn only_temporaries(root: &Path) -> bool {
        files_under(root)
            .iter()
            .all(|p| p.parent().is_some_and(|d| d.ends_with(TMP_DIR)))
    }

    #[test]
    fn syncs_large_blobs_early_and_keeps_every_byte() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobStore::open(dir.path()).unwrap();
        let mut w = store.begin_write(ClientId([3; 16])).unwrap();
        let mut expected = Vec::new();
        for i in 0..40u8 {
            let chunk = vec![i; 100_000];
            w.write(&chunk).unwrap();
            expected.extend_from_slice(&chunk);
        }
        assert!(expected.len() as u64 > 3 * EARLY_SYNC_BYTES);
        let key = w.finish().unwrap().publish().unwrap();
        let mut got = Vec::new();
        store.open(&key).unwrap().read_to_end(&mut got).unwrap();
        assert_eq!(got, expected);
    }

    #[test]
    fn dropping_a_writer_or_staged_blob_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobStore::open(dir.path()).unwrap();
        let mut w = store.begin_write(ClientId([1; 16])).unwrap();
        w.write(b"abc").unwrap();
        drop(w);
        let mut w = store.begin_write(ClientId([1; 16])).unwrap();
        w.write(b"abc").unwrap();
        drop(w.finish().unwrap());
        assert!(files_under(dir.path()).is_empty());
    }

    #[test]
    fn aborting_a_writer_or_staged_blob_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobStore::open(dir.path()).unwrap();
        let mut w = store.begin_write(ClientId([1; 16])).unwrap();
        w.write(b"abc").unwrap();
        w.abort().unwrap();
        let mut w = store.begin_write(ClientId([1; 16])).unwrap();
        w.write(&vec![7; 3 * EARLY_SYNC_BYTES as usize]).unwrap();
        w.abort().unwrap();
        let mut w = store.begin_write(ClientId([1; 16])).unwrap();
        w.write(b"abc").unwrap();
        let staged = w.finish().unwrap();
        let key = staged.key().clone();
        staged.abort().unwrap();
        assert!(files_under(dir.path()).is_empty());
        assert!(matches!(
            store.open(&key),
            Err(StorageError::NotFound { .. })
        ));
    }

    #[test]
    fn finish_names_the_final_key_and_ranges_read_part_of_a_blob() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobStore::open(dir.path()).unwrap();
        let mut w = store.begin_write(ClientId([4; 16])).unwrap();
        w.write(b"0123456789").unwrap();
        let staged = w.finish().unwrap();
        let named = staged.key().clone();
        assert_eq!(staged.publish().unwrap(), named);
        let read = |range| {
            let mut out = Vec::new();
            store
                .open_range(&named, range)
                .unwrap()
                .read_to_end(&mut out)
                .unwrap();
            out
        };
        assert_eq!(read(2..5), b"234");
        assert_eq!(read(8..20), b"89");
        assert_eq!(read(12..20), b"");
    }

    #[test]
    fn recover_removes_temporaries_and_lists_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobStore::open(dir.path()).unwrap();
        let mut w = store.begin_write(ClientId([2; 16])).unwrap();
        w.write(b"12345").unwrap();
        let key = w.finish().unwrap().publish().unwrap();
        let mut pending = store.begin_write(ClientId([2; 16])).unwrap();
        pending.write(b"half").unwrap();
        // A crash: the writer is never dropped.
        std::mem::forget(pending);
        assert_eq!(store.recover().unwrap(), 1);
        let listed: Vec<_> = store.list().unwrap().map(Result::unwrap).collect();
        assert_eq!(listed, vec![(key, 5)]);
        assert_eq!(files_under(dir.path()).len(), 1);
    }

    #[test]
    fn rejects_keys_of_any_other_shape() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobStore::open(dir.path()).unwrap();
        let h = "0123456789abcdef0123456789abcdef";
        assert!(store
            .path_of(&BlobKey(format!("clients/{h}/blobs/{h}")))
            .is_ok());
        for bad in [
            format!("clients/{h}/blobs/../../x"),
            format!("clients/../blobs/{h}"),
            format!("/etc/{h}/blobs/{h}"),
            format!("clients/{h}/tmp/{h}"),
            format!("clients/{h}/blobs/{h}/x"),
            format!("clients/{}/blobs/{h}", h.to_uppercase()),
            String::new(),
        ] {
            assert!(
                matches!(
                    store.path_of(&BlobKey(bad.clone())),
                    Err(StorageError::BadKey(_))
                ),
                "{bad}"
            );
        }
    }
}
