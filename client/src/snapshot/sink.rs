//! The writing side of a restore: files in the order their chunks are
//! fetched, chunks opened and appended to each file's temporary, and the
//! finished files made durable in groups.
//!
//! A restore fetches the chunks of many files in one request, so the sink
//! is handed files and fetched objects separately: the chunks arrive in
//! the order of the files' chunk lists, one file after the other. It runs
//! on the blocking pool, one batch at a time, while the next batch is
//! fetched.
//!
//! Durability in groups: a finished file keeps its temporary name until
//! [`GROUP_FILES`] files or [`GROUP_BYTES`] bytes are finished; then one
//! `syncfs` per file system makes their contents durable, and only then are
//! they renamed into place. The last `syncfs` makes the renames durable.
//! So a crash at any moment leaves each file either absent (or as it was)
//! or whole, as one `fsync` per file did, at the cost of one journal
//! commit per group rather than per file: on 10,000 small files that was
//! most of a restore's time.

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use protocol::repo::keys::IdKey;
use protocol::repo::message::{ObjectId, MAX_OBJECT_BYTES};
use protocol::repo::seal::Opener;
use protocol::session::repo::Fetched;
use tempfile::{NamedTempFile, TempPath};

use crate::error::Error;

/// Finished files kept under their temporary names before a sync.
const GROUP_FILES: usize = 1024;
/// Bytes of finished files kept under temporary names before a sync.
const GROUP_BYTES: u64 = 256 << 20;

/// The most plaintext a chunk may open to.
const MAX_PLAIN: usize = MAX_OBJECT_BYTES as usize;

/// A file to restore: where, and what it is made of.
#[derive(Debug)]
pub(super) struct FileJob {
    pub(super) path: PathBuf,
    pub(super) chunks: Vec<ObjectId>,
    pub(super) size: u64,
    pub(super) mode: u32,
    pub(super) mtime_s: i64,
    pub(super) mtime_ns: u32,
}

/// How the restore of one file ended: its size, or why it failed.
pub(super) type Outcome = (PathBuf, Result<u64, Error>);

/// The file being written: its temporary and the bytes in it, or why it
/// failed (its remaining chunks are then skipped).
enum Writing {
    None,
    Open(NamedTempFile, u64),
    Failed(Error),
}

/// A file written and closed (no descriptor held: a group may be larger
/// than the open-file limit), not yet synced and renamed.
struct Finished {
    tmp: TempPath,
    path: PathBuf,
    size: u64,
}

pub(super) struct Sink {
    /// The folder restored into, named when its last sync fails.
    root: PathBuf,
    /// Whether a file may replace one that is in the way.
    overwrite: bool,
    opener: Opener,
    id_key: IdKey,
    queue: VecDeque<FileJob>,
    /// Chunks of the first queued file already handled.
    next: usize,
    writing: Writing,
    finished: Vec<Finished>,
    finished_bytes: u64,
    /// One open directory per file system written to, for `syncfs`.
    filesystems: HashMap<u64, std::fs::File>,
    /// Ended files the restore has not collected yet.
    pub(super) outcomes: Vec<Outcome>,
}

fn write_error(path: &Path, e: std::io::Error) -> Error {
    Error::WriteFile {
        path: path.to_owned(),
        reason: e.to_string(),
    }
}

fn damaged(path: &Path, detail: String) -> Error {
    Error::DamagedObject {
        path: path.display().to_string(),
        detail,
    }
}

pub(super) fn file_time(s: i64, ns: u32) -> std::time::SystemTime {
    match u64::try_from(s) {
        Ok(s) => UNIX_EPOCH + Duration::new(s, ns.min(999_999_999)),
        Err(_) => UNIX_EPOCH,
    }
}

impl Sink {
    pub(super) fn new(opener: Opener, id_key: IdKey, root: &Path, overwrite: bool) -> Self {
        // The folder's own file system is synced at the end even when no
        // file lands (directories and links only).
        let mut filesystems = HashMap::new();
        if let Ok(dir) = std::fs::File::open(root) {
            if let Ok(meta) = dir.metadata() {
                filesystems.insert(meta.dev(), dir);
            }
        }
        Self {
            root: root.to_owned(),
            overwrite,
            opener,
            id_key,
            queue: VecDeque::new(),
            next: 0,
            writing: Writing::None,
            finished: Vec::new(),
            finished_bytes: 0,
            filesystems,
            outcomes: Vec::new(),
        }
    }

    /// Queues `files` and writes `fetched`, the next chunks in the order
    /// of the queued files' chunk lists.
    pub(super) fn feed(&mut self, files: Vec<FileJob>, fetched: Vec<Fetched>) {
        self.queue.extend(files);
        self.advance();
        for f in fetched {
            self.chunk(f);
            self.next += 1;
            self.advance();
        }
    }

    /// Queues `files` (chunks of which are all fed, or which have none),
    /// ends them, and lands every finished file durably.
    pub(super) fn finish(&mut self, files: Vec<FileJob>) {
        self.queue.extend(files);
        self.advance();
        // A file still waiting for chunks when the restore stopped.
        for job in self.queue.drain(..) {
            self.outcomes.push((
                job.path.clone(),
                Err(Error::Internal(format!(
                    "the restore of {} stopped before its chunks came",
                    job.path.display()
                ))),
            ));
        }
        self.writing = Writing::None;
        self.next = 0;
        self.land();
        // The renames of the last group.
        if let Err(reason) = self.sync_all() {
            let root = self.root.clone();
            self.outcomes
                .push((root.clone(), Err(Error::WriteFile { path: root, reason })));
        }
    }

    /// Handles one fetched chunk of the first queued file.
    fn chunk(&mut self, fetched: Fetched) {
        let Some(job) = self.queue.front() else {
            // More objects than the queued files name: the fetch answered
            // what was asked, so this is a bug; nothing to write to.
            tracing::debug!("a fetched chunk belongs to no file");
            return;
        };
        if matches!(self.writing, Writing::Failed(_)) {
            return;
        }
        let expected = job.chunks.get(self.next).copied();
        let (id, sealed) = match fetched {
            Fetched::Object { id, sealed } if Some(id) == expected => (id, sealed),
            Fetched::Object { .. } => {
                self.writing = Writing::Failed(damaged(
                    &job.path,
                    "the server answered with another chunk".into(),
                ));
                return;
            }
            Fetched::Missing { .. } => {
                self.writing = Writing::Failed(damaged(
                    &job.path,
                    "the server does not hold one of its chunks".into(),
                ));
                return;
            }
        };
        if matches!(self.writing, Writing::None) {
            self.writing = match temporary(&job.path) {
                Ok(tmp) => Writing::Open(tmp, 0),
                Err(e) => Writing::Failed(e),
            };
        }
        let plain = match self
            .opener
            .open_object(&self.id_key, &id, &sealed, MAX_PLAIN)
        {
            Ok(p) => p,
            Err(e) => {
                self.writing = Writing::Failed(damaged(&job.path, e.to_string()));
                return;
            }
        };
        if let Writing::Open(tmp, written) = &mut self.writing {
            match tmp.write_all(&plain) {
                Ok(()) => *written += plain.len() as u64,
                Err(e) => self.writing = Writing::Failed(write_error(&job.path, e)),
            }
        }
    }

    /// Ends every queued file at the front whose chunks are all handled.
    fn advance(&mut self) {
        while let Some(job) = self.queue.front() {
            if self.next < job.chunks.len() {
                return;
            }
            let Some(job) = self.queue.pop_front() else {
                return;
            };
            self.next = 0;
            let writing = std::mem::replace(&mut self.writing, Writing::None);
            match self.close(&job, writing) {
                Ok(done) => {
                    self.finished_bytes += done.size;
                    self.finished.push(done);
                    if self.finished.len() >= GROUP_FILES || self.finished_bytes >= GROUP_BYTES {
                        self.land();
                    }
                }
                Err(e) => self.outcomes.push((job.path, Err(e))),
            }
        }
    }

    /// Checks a file's length, sets its mode and time: ready to land.
    fn close(&mut self, job: &FileJob, writing: Writing) -> Result<Finished, Error> {
        let (tmp, written) = match writing {
            Writing::Failed(e) => return Err(e),
            Writing::Open(tmp, written) => (tmp, written),
            Writing::None => (temporary(&job.path)?, 0),
        };
        if written != job.size {
            return Err(damaged(
                &job.path,
                format!(
                    "its chunks hold {written} bytes, the listing says {}",
                    job.size
                ),
            ));
        }
        let file = tmp.as_file();
        file.set_permissions(std::fs::Permissions::from_mode(job.mode & 0o777))
            .map_err(|e| write_error(&job.path, e))?;
        file.set_modified(file_time(job.mtime_s, job.mtime_ns))
            .map_err(|e| write_error(&job.path, e))?;
        let dev = file
            .metadata()
            .map_err(|e| write_error(&job.path, e))?
            .dev();
        if let std::collections::hash_map::Entry::Vacant(v) = self.filesystems.entry(dev) {
            let dir = job.path.parent().unwrap_or(Path::new("."));
            let handle = std::fs::File::open(dir).map_err(|e| write_error(&job.path, e))?;
            v.insert(handle);
        }
        Ok(Finished {
            tmp: tmp.into_temp_path(),
            path: job.path.clone(),
            size: job.size,
        })
    }

    /// Makes the finished files durable, then renames them into place.
    fn land(&mut self) {
        if self.finished.is_empty() {
            return;
        }
        let synced = self.sync_all();
        for done in self.finished.drain(..) {
            let outcome = match &synced {
                Err(e) => Err(write_error(&done.path, std::io::Error::other(e.clone()))),
                Ok(()) => {
                    let persisted = if self.overwrite {
                        done.tmp.persist(&done.path)
                    } else {
                        // Checked when the file was queued; something may
                        // have appeared there since.
                        done.tmp.persist_noclobber(&done.path)
                    };
                    match persisted {
                        Ok(()) => Ok(done.size),
                        Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => {
                            Err(Error::Exists {
                                path: done.path.clone(),
                                name: done.path.display().to_string(),
                            })
                        }
                        Err(e) => Err(write_error(&done.path, e.error)),
                    }
                }
            };
            self.outcomes.push((done.path, outcome));
        }
        self.finished_bytes = 0;
    }

    /// One `syncfs` per file system written to.
    fn sync_all(&self) -> Result<(), String> {
        for dir in self.filesystems.values() {
            rustix::fs::syncfs(dir).map_err(|e| format!("cannot sync its file system: {e}"))?;
        }
        Ok(())
    }
}

/// A temporary file beside `path`, in the folder the restore made, named
/// `.NAME.restore-XXXXXX.part` as every restore names them, so that the
/// next restore into the folder removes one a crash left.
fn temporary(path: &Path) -> Result<NamedTempFile, Error> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let prefix = crate::restore::part_prefix(path.file_name().unwrap_or_default());
    tempfile::Builder::new()
        .prefix(&prefix)
        .suffix(".part")
        .tempfile_in(dir)
        .map_err(|e| write_error(path, e))
}
