//! Making a snapshot (`docs/PROTOCOL.md` §13): a walker thread reads the
//! paths, cuts files into chunks and names them, and builds each
//! directory's tree; this task asks the server which objects it lacks,
//! seals those on the blocking pool, and streams them in packs; then it
//! stages every id the snapshot references and commits.
//!
//! Memory is bounded whatever the sizes: the walker is at most
//! [`QUEUE`] objects ahead, a batch holds at most [`BATCH_BYTES`] of
//! plaintext, and a pack is streamed as it fills, never held whole. What
//! grows with the snapshot is the set of ids it references (32 bytes
//! each, about 32 MiB for a million chunks).

use std::collections::{HashSet, VecDeque};
use std::fs::Metadata;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use protocol::repo::keys::IdKey;
use protocol::repo::message::ObjectId;
use protocol::repo::pack::PackBuilder;
use protocol::repo::seal::Sealer;
use protocol::repo::tree::{encode_tree, plain_name, Description, Entry, EntryKind};
use tokio::sync::mpsc;

use super::cache::{self, CacheWriter, FileCache, Stamp};
use super::chunk;
use super::keys;
use super::remote::Remote;
use crate::engine::Client;
use crate::error::Error;

/// Objects the walker may be ahead of the uploader.
const QUEUE: usize = 4;
/// Plaintext bytes of one "have" batch.
const BATCH_BYTES: usize = 8 << 20;
/// Objects in one "have" batch.
const BATCH_OBJECTS: usize = 512;
/// Plaintext bytes being sealed while earlier objects are sent.
const IN_FLIGHT: usize = 8 << 20;
/// Bytes of one pack-data packet.
const PACKET: usize = 1 << 20;
/// A pack closes once it holds this many bytes.
pub const PACK_TARGET: u64 = 16 << 20;

/// What a snapshot run is asked for.
#[derive(Debug, Clone, Default)]
pub struct SnapshotOptions {
    pub tags: Vec<String>,
    pub host: String,
    /// Read every file, whatever the file cache says.
    pub force_read: bool,
}

/// What a snapshot run did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SnapshotSummary {
    /// The server's id of the snapshot.
    pub snapshot: u64,
    pub time: u64,
    pub files: u64,
    pub dirs: u64,
    /// Plaintext bytes of the files in the snapshot.
    pub bytes: u64,
    /// Objects the server did not have, and their sealed bytes sent.
    pub new_objects: u64,
    pub sent_bytes: u64,
    pub packs: u64,
    /// Files taken from the file cache unread.
    pub unchanged_files: u64,
    /// Entries left out, with why.
    pub skipped: Vec<(String, String)>,
}

/// One object the walker made: a chunk or a tree.
struct Made {
    id: ObjectId,
    data: Vec<u8>,
}

/// What the walker found, once done.
#[derive(Default)]
struct Walked {
    root: ObjectId,
    refs: Vec<ObjectId>,
    files: u64,
    dirs: u64,
    bytes: u64,
    unchanged: u64,
    skipped: Vec<(String, String)>,
    cache: Option<CacheWriter>,
}

struct Walker {
    id_key: IdKey,
    tx: mpsc::Sender<Made>,
    seen: HashSet<ObjectId>,
    refs: Vec<ObjectId>,
    files: u64,
    dirs: u64,
    bytes: u64,
    unchanged: u64,
    skipped: Vec<(String, String)>,
    /// The last snapshot's files, unless every file is to be read.
    old: FileCache,
    /// The cache this run writes; dropped on the first write error.
    new: Option<CacheWriter>,
}

/// The uploader went away (it failed); the walker stops.
struct Stopped;

fn mtime(meta: &Metadata) -> (i64, u32) {
    (meta.mtime(), u32::try_from(meta.mtime_nsec()).unwrap_or(0))
}

impl Walker {
    fn emit(&mut self, id: ObjectId, data: Vec<u8>) -> Result<(), Stopped> {
        if self.seen.insert(id) {
            self.refs.push(id);
            self.tx
                .blocking_send(Made { id, data })
                .map_err(|_| Stopped)?;
        }
        Ok(())
    }

    fn skip(&mut self, path: &Path, why: impl ToString) {
        self.skipped
            .push((path.display().to_string(), why.to_string()));
    }

    /// The entry for `path` named `name`, or `None` when it is skipped.
    fn entry(
        &mut self,
        path: &Path,
        name: Vec<u8>,
        meta: &Metadata,
    ) -> Result<Option<Entry>, Stopped> {
        let (mtime_s, mtime_ns) = mtime(meta);
        let mode = meta.permissions().mode() & 0o7777;
        let kind = if meta.is_file() {
            match self.file(path, meta)? {
                Some(k) => k,
                None => return Ok(None),
            }
        } else if meta.is_dir() {
            match self.dir(path)? {
                Some(tree) => EntryKind::Dir { tree },
                None => return Ok(None),
            }
        } else if meta.file_type().is_symlink() {
            match std::fs::read_link(path) {
                Ok(target) => EntryKind::Symlink {
                    target: target.as_os_str().as_bytes().to_vec(),
                },
                Err(e) => {
                    self.skip(path, e);
                    return Ok(None);
                }
            }
        } else {
            self.skip(path, "not a regular file, directory or symbolic link");
            return Ok(None);
        };
        Ok(Some(Entry {
            name,
            mode,
            mtime_s,
            mtime_ns,
            kind,
        }))
    }

    fn reference(&mut self, id: ObjectId) {
        if self.seen.insert(id) {
            self.refs.push(id);
        }
    }

    fn remember(&mut self, path: &Path, stamp: &Stamp, chunks: &[ObjectId]) {
        if let Some(w) = self.new.as_mut() {
            if let Err(e) = w.add(path.as_os_str().as_bytes(), stamp, chunks) {
                tracing::debug!(error = %e, "cannot write the file cache; the next run reads every file");
                if let Some(w) = self.new.take() {
                    w.abandon();
                }
            }
        }
    }

    fn file(&mut self, path: &Path, meta: &Metadata) -> Result<Option<EntryKind>, Stopped> {
        let stamp = Stamp::of(meta);
        if let Some(ids) = self.old.unchanged(path.as_os_str().as_bytes(), &stamp) {
            let chunks = ids.to_vec();
            for id in &chunks {
                self.reference(*id);
            }
            self.remember(path, &stamp, &chunks);
            self.files += 1;
            self.unchanged += 1;
            self.bytes += stamp.size;
            return Ok(Some(EntryKind::File {
                size: stamp.size,
                chunks,
            }));
        }
        let file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) => {
                self.skip(path, e);
                return Ok(None);
            }
        };
        let mut chunks = Vec::new();
        let mut size = 0u64;
        for c in chunk::chunks(std::io::BufReader::with_capacity(1 << 20, file)) {
            let c = match c {
                Ok(c) => c,
                Err(e) => {
                    self.skip(path, e);
                    return Ok(None);
                }
            };
            let id = self.id_key.id(&c.data);
            size += c.data.len() as u64;
            chunks.push(id);
            self.emit(id, c.data)?;
        }
        // Cached only if nothing changed while it was read.
        let after = std::fs::metadata(path).map(|m| Stamp::of(&m));
        if matches!(after, Ok(a) if a == stamp && a.size == size) {
            self.remember(path, &stamp, &chunks);
        }
        self.files += 1;
        self.bytes += size;
        Ok(Some(EntryKind::File { size, chunks }))
    }

    /// The id of the tree of directory `path`, its subtrees and chunks
    /// emitted first.
    fn dir(&mut self, path: &Path) -> Result<Option<ObjectId>, Stopped> {
        let read = match std::fs::read_dir(path) {
            Ok(r) => r,
            Err(e) => {
                self.skip(path, e);
                return Ok(None);
            }
        };
        let mut names: Vec<(Vec<u8>, PathBuf)> = Vec::new();
        for item in read {
            match item {
                Ok(item) => names.push((item.file_name().as_bytes().to_vec(), item.path())),
                Err(e) => self.skip(path, e),
            }
        }
        names.sort();
        let mut entries = Vec::with_capacity(names.len());
        for (name, child) in names {
            if !plain_name(&name) {
                self.skip(&child, "a name that cannot be restored");
                continue;
            }
            let meta = match std::fs::symlink_metadata(&child) {
                Ok(m) => m,
                Err(e) => {
                    self.skip(&child, e);
                    continue;
                }
            };
            if let Some(e) = self.entry(&child, name, &meta)? {
                entries.push(e);
            }
        }
        self.dirs += 1;
        Ok(Some(self.tree(&mut entries)?))
    }

    fn tree(&mut self, entries: &mut [Entry]) -> Result<ObjectId, Stopped> {
        let bytes = encode_tree(entries);
        let id = self.id_key.id(&bytes);
        self.emit(id, bytes)?;
        Ok(id)
    }

    /// The root: one entry per path, named by its last component; a path
    /// that is a symbolic link is followed.
    fn root(&mut self, paths: &[(Vec<u8>, PathBuf)]) -> Result<ObjectId, Stopped> {
        let mut entries = Vec::with_capacity(paths.len());
        for (name, path) in paths {
            match std::fs::metadata(path) {
                Ok(meta) => {
                    if let Some(e) = self.entry(path, name.clone(), &meta)? {
                        entries.push(e);
                    }
                }
                Err(e) => self.skip(path, e),
            }
        }
        self.tree(&mut entries)
    }
}

/// Checks, before anything is sent, that every path exists and that their
/// names at the root of a snapshot are distinct.
///
/// # Errors
/// As the snapshot would fail on them.
pub fn check_paths(paths: &[PathBuf]) -> Result<(), Error> {
    root_names(paths).map(drop)
}

/// The names the paths get at the root of the snapshot.
///
/// # Errors
/// When two paths end in the same name, or a path has none.
fn root_names(paths: &[PathBuf]) -> Result<Vec<(Vec<u8>, PathBuf)>, Error> {
    let mut out: Vec<(Vec<u8>, PathBuf)> = Vec::with_capacity(paths.len());
    for path in paths {
        let read_error = |e: std::io::Error| Error::ReadFile {
            path: path.clone(),
            reason: e.to_string(),
        };
        let absolute = std::path::absolute(path).map_err(read_error)?;
        // Refused before connecting: a path that is not there.
        std::fs::metadata(&absolute).map_err(read_error)?;
        let name = absolute
            .file_name()
            .map(|n| n.as_bytes().to_vec())
            .filter(|n| plain_name(n))
            .ok_or_else(|| Error::NothingToBackUp { path: path.clone() })?;
        if let Some((_, first)) = out.iter().find(|(n, _)| *n == name) {
            return Err(Error::DuplicateName {
                path: path.clone(),
                name: String::from_utf8_lossy(&name).into_owned(),
                first: first.clone(),
            });
        }
        out.push((name, absolute));
    }
    Ok(out)
}

/// How one attempt at a snapshot ended.
enum Attempt {
    Done(SnapshotSummary),
    /// The server lacked this many referenced objects (named by the file
    /// cache); nothing was committed.
    Missing(u64),
}

/// A job for the sealing threads: the object, and where its sealed bytes go.
type SealJob = (Made, tokio::sync::oneshot::Sender<(ObjectId, Vec<u8>)>);

/// A few threads that seal objects: as many as the machine has cores (at
/// most 4). A fixed set rather than the blocking pool, so that memory is
/// held by few allocator arenas, not one per short-lived thread.
fn sealing_threads(sealer: Arc<Sealer>) -> std::sync::mpsc::SyncSender<SealJob> {
    // Room for everything the uploader keeps in flight, so a send never
    // waits: at most one batch beyond `IN_FLIGHT`.
    let (tx, rx) = std::sync::mpsc::sync_channel::<SealJob>(4 * BATCH_OBJECTS);
    let rx = Arc::new(std::sync::Mutex::new(rx));
    let n = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(1, 4));
    for i in 0..n {
        let rx = Arc::clone(&rx);
        let sealer = Arc::clone(&sealer);
        let spawned = std::thread::Builder::new()
            .name(format!("seal-{i}"))
            .spawn(move || loop {
                let job = match rx.lock() {
                    Ok(rx) => rx.recv(),
                    Err(_) => return,
                };
                let Ok((made, back)) = job else {
                    return;
                };
                let mut sealed = Vec::with_capacity(made.data.len() + 64);
                sealer.seal_object(&made.id, &made.data, &mut sealed);
                drop(made.data);
                let _ = back.send((made.id, sealed));
            });
        if let Err(e) = spawned {
            tracing::debug!(error = %e, "cannot start a sealing thread");
        }
    }
    tx
}

/// Streams sealed objects into packs.
struct Uploader<'a> {
    remote: &'a mut Remote,
    pool: std::sync::mpsc::SyncSender<SealJob>,
    batch: Vec<Made>,
    batch_bytes: usize,
    pack: PackBuilder,
    out: bytes::BytesMut,
    /// Objects being sealed, in the order they will be sent.
    sealing: VecDeque<(tokio::sync::oneshot::Receiver<(ObjectId, Vec<u8>)>, usize)>,
    sealing_bytes: usize,
    summary: SnapshotSummary,
}

impl Uploader<'_> {
    async fn add(&mut self, made: Made) -> Result<(), Error> {
        self.batch_bytes += made.data.len();
        self.batch.push(made);
        if self.batch_bytes >= BATCH_BYTES || self.batch.len() >= BATCH_OBJECTS {
            self.flush_batch().await?;
        }
        Ok(())
    }

    /// Asks which objects of the batch the server lacks and starts sealing
    /// those on the blocking pool; sealed objects are sent while the next
    /// batch is read and sealed, at most [`IN_FLIGHT`] bytes behind.
    async fn flush_batch(&mut self) -> Result<(), Error> {
        let batch = std::mem::take(&mut self.batch);
        self.batch_bytes = 0;
        if batch.is_empty() {
            return Ok(());
        }
        let ids: Vec<ObjectId> = batch.iter().map(|m| m.id).collect();
        let have = self.remote.have(&ids).await?;
        for (made, _) in batch.into_iter().zip(have).filter(|(_, have)| !have) {
            let len = made.data.len();
            let (tx, rx) = tokio::sync::oneshot::channel();
            self.pool
                .send((made, tx))
                .map_err(|_| Error::Internal("the sealing threads stopped".into()))?;
            self.sealing.push_back((rx, len));
            self.sealing_bytes += len;
        }
        self.drain(IN_FLIGHT).await
    }

    /// Appends sealed objects, oldest first, until at most `limit` bytes
    /// are still being sealed.
    async fn drain(&mut self, limit: usize) -> Result<(), Error> {
        while self.sealing_bytes > limit {
            let Some((handle, len)) = self.sealing.pop_front() else {
                break;
            };
            self.sealing_bytes -= len;
            let (id, sealed) = handle
                .await
                .map_err(|_| Error::Internal("sealing stopped".into()))?;
            self.append(id, sealed).await?;
        }
        Ok(())
    }

    async fn append(&mut self, id: ObjectId, sealed: Vec<u8>) -> Result<(), Error> {
        if !self.pack.fits(sealed.len(), PACK_TARGET) {
            self.close_pack().await?;
        }
        self.pack.push(id, sealed.len());
        self.summary.new_objects += 1;
        self.summary.sent_bytes += sealed.len() as u64;
        if self.out.is_empty() && sealed.len() >= PACKET {
            // A large object goes out in packets cut from it, uncopied.
            let mut sealed = Bytes::from(sealed);
            while sealed.len() >= PACKET {
                self.remote.pack_data(sealed.split_to(PACKET)).await?;
            }
            self.out.extend_from_slice(&sealed);
            return Ok(());
        }
        self.out.extend_from_slice(&sealed);
        while self.out.len() >= PACKET {
            let packet = self.out.split_to(PACKET).freeze();
            self.remote.pack_data(packet).await?;
        }
        Ok(())
    }

    async fn close_pack(&mut self) -> Result<(), Error> {
        if self.pack.is_empty() {
            return Ok(());
        }
        if !self.out.is_empty() {
            let packet = self.out.split().freeze();
            self.remote.pack_data(packet).await?;
        }
        let entries = self.pack.finish();
        self.remote.pack_end(entries).await?;
        self.summary.packs += 1;
        Ok(())
    }

    /// Sends everything still being sealed and closes the pack.
    async fn finish(&mut self) -> Result<(), Error> {
        self.flush_batch().await?;
        self.drain(0).await?;
        self.close_pack().await
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

impl Client {
    /// Makes a snapshot of `paths` (`docs/PROTOCOL.md` §13): reconnects
    /// with the stored identity, obtains (or makes) the repository key,
    /// sends what the server lacks, and commits. Files unchanged since the
    /// last snapshot (by the file cache) are not read; should the server
    /// lack a chunk of one, the run is made again reading every file.
    ///
    /// # Errors
    /// When the server cannot be reached or refuses, the key does not open,
    /// or a path cannot be named. Files that cannot be read are left out
    /// and listed in [`SnapshotSummary::skipped`].
    pub async fn snapshot(
        &self,
        paths: &[PathBuf],
        options: &SnapshotOptions,
    ) -> Result<SnapshotSummary, Error> {
        let roots = root_names(paths)?;
        let keyed = self.reconnect_existing().await?;
        let client_id = keyed.identity.client_id.to_hex();
        let cache_path = cache::path_for(self.store().dir(), &self.options().server, &client_id);
        let mut remote = Remote::new(keyed, self.options().server.clone());
        let mut result = self
            .snapshot_on(
                &mut remote,
                &roots,
                options,
                &cache_path,
                options.force_read,
            )
            .await;
        if matches!(result, Ok(Attempt::Missing(_))) {
            self.feedback().notice(
                "the server no longer holds some chunks the file cache named; reading every file",
            );
            result = self
                .snapshot_on(&mut remote, &roots, options, &cache_path, true)
                .await;
        }
        remote.close().await;
        match result? {
            Attempt::Done(summary) => Ok(summary),
            Attempt::Missing(missing) => Err(Error::SnapshotRefused {
                server: self.options().server.clone(),
                detail: format!("it lacks {missing} of the objects the snapshot references"),
            }),
        }
    }

    async fn snapshot_on(
        &self,
        remote: &mut Remote,
        roots: &[(Vec<u8>, PathBuf)],
        options: &SnapshotOptions,
        cache_path: &Path,
        force_read: bool,
    ) -> Result<Attempt, Error> {
        let key = keys::obtain(remote, true).await?.backup_key();
        let sealer = Arc::new(Sealer::new(&key.seal, &mut rand::rngs::OsRng));
        let (tx, mut rx) = mpsc::channel(QUEUE);
        let id_key = key.id.clone();
        let walk_roots = roots.to_vec();
        let old = if force_read {
            FileCache::default()
        } else {
            FileCache::load(cache_path)
        };
        let new = CacheWriter::create(cache_path)
            .map_err(|e| tracing::debug!(error = %e, "cannot write the file cache"))
            .ok();
        let walker = std::thread::Builder::new()
            .name("snapshot-walker".into())
            .stack_size(32 << 20)
            .spawn(move || {
                let mut w = Walker {
                    id_key,
                    tx,
                    seen: HashSet::new(),
                    refs: Vec::new(),
                    files: 0,
                    dirs: 0,
                    bytes: 0,
                    unchanged: 0,
                    skipped: Vec::new(),
                    old,
                    new,
                };
                let root = w.root(&walk_roots);
                let Ok(root) = root else {
                    if let Some(c) = w.new.take() {
                        c.abandon();
                    }
                    return None;
                };
                Some(Walked {
                    root,
                    refs: w.refs,
                    files: w.files,
                    dirs: w.dirs,
                    bytes: w.bytes,
                    unchanged: w.unchanged,
                    skipped: w.skipped,
                    cache: w.new,
                })
            })
            .map_err(|e| Error::Internal(format!("cannot start the walker: {e}")))?;
        let mut up = Uploader {
            remote,
            pool: sealing_threads(Arc::clone(&sealer)),
            batch: Vec::new(),
            batch_bytes: 0,
            pack: PackBuilder::default(),
            out: bytes::BytesMut::new(),
            sealing: VecDeque::new(),
            sealing_bytes: 0,
            summary: SnapshotSummary::default(),
        };
        let uploaded = async {
            while let Some(made) = rx.recv().await {
                up.add(made).await?;
            }
            up.finish().await
        }
        .await;
        // On failure the walker finds the channel closed and stops.
        drop(rx);
        let walked = tokio::task::spawn_blocking(move || walker.join())
            .await
            .map_err(|e| Error::Internal(format!("walker: {e}")))?
            .map_err(|_| Error::Internal("the walker panicked".into()))?;
        let abandon = |w: Option<Walked>| {
            if let Some(c) = w.and_then(|w| w.cache) {
                c.abandon();
            }
        };
        if let Err(e) = uploaded {
            abandon(walked);
            return Err(e);
        }
        let mut walked =
            walked.ok_or_else(|| Error::Internal("the walker stopped early".into()))?;
        let mut summary = std::mem::take(&mut up.summary);
        let remote = up.remote;
        let time = now();
        let description = Description {
            root: walked.root,
            host: options.host.clone(),
            paths: roots.iter().map(|(_, p)| p.display().to_string()).collect(),
            tags: options.tags.clone(),
            files: walked.files,
            dirs: walked.dirs,
            bytes: walked.bytes,
            parent: 0,
        };
        let mut meta = Vec::new();
        sealer.seal_snapshot(time, &description.encode(), &mut meta);
        let missing = match remote.stage(&walked.refs).await {
            Ok(m) => m,
            Err(e) => {
                abandon(Some(walked));
                return Err(e);
            }
        };
        // Committed even when something is missing: the refusal drops
        // what was staged, so a second attempt starts clean.
        let committed = remote.commit(time, meta).await;
        let cache = walked.cache.take();
        match committed {
            Ok(Ok(id)) if missing == 0 => {
                summary.snapshot = id;
                if let Some(c) = cache {
                    if let Err(e) = c.commit(cache_path) {
                        tracing::debug!(error = %e, "cannot save the file cache");
                    }
                }
            }
            Ok(Ok(_)) => {
                return Err(Error::Internal(
                    "the server committed a snapshot with missing references".into(),
                ))
            }
            Ok(Err((reason, m))) => {
                if let Some(c) = cache {
                    c.abandon();
                }
                if reason == protocol::repo::message::CommitRefusal::MISSING && !force_read {
                    return Ok(Attempt::Missing(missing.max(u64::from(m))));
                }
                return Err(Error::SnapshotRefused {
                    server: self.options().server.clone(),
                    detail: format!("reason {}, {m} objects missing", reason.0),
                });
            }
            Err(e) => {
                if let Some(c) = cache {
                    c.abandon();
                }
                return Err(e);
            }
        }
        summary.time = time;
        summary.files = walked.files;
        summary.dirs = walked.dirs;
        summary.bytes = walked.bytes;
        summary.unchanged_files = walked.unchanged;
        summary.skipped = walked.skipped;
        Ok(Attempt::Done(summary))
    }
}
