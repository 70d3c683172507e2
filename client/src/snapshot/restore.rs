//! Reading snapshots back: listing them, listing a tree, and restoring a
//! snapshot or a path in it into a folder (`docs/PROTOCOL.md` §13).
//!
//! Every object is opened with the repository key: its tag is checked and
//! its plaintext must hash to its id, so a server can neither alter nor
//! swap what it returns. A file is written to a temporary file beside its
//! destination and renamed into place only when every chunk of it opened;
//! a file whose content is damaged on the server is reported and the rest
//! go on (exit status 5). Names come from trees, whose parser accepts
//! only plain names (no `/`, `.` or `..`), and nothing is written through
//! a symbolic link met on the way, so nothing lands outside the folder.

use std::collections::{HashSet, VecDeque};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use protocol::repo::keys::{IdKey, MasterKey, OpenKey};
use protocol::repo::message::{ObjectId, SnapshotEntry, MAX_FETCH_IDS, MAX_OBJECT_BYTES};
use protocol::repo::seal::Opener;
use protocol::repo::tree::{decode_tree, Description, Entry, EntryKind};
use protocol::session::repo::Fetched;

use super::chunk;
use super::keys::{self, RepoKey};
use super::remote::Remote;
use super::sink::{file_time, FileJob, Sink};
use crate::engine::Client;
use crate::error::Error;

/// The most plaintext a tree or chunk may open to.
const MAX_PLAIN: usize = MAX_OBJECT_BYTES as usize;
/// Chunk ids asked for in one fetch while restoring files: the chunks of
/// many small files come in one exchange.
const FETCH_IDS: usize = 256;
const _: () = assert!(FETCH_IDS <= MAX_FETCH_IDS);
/// Plaintext bytes (estimated) asked for in one fetch.
const FETCH_BYTES: u64 = 32 << 20;

/// A snapshot as listed: the server's id and time, and its description.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Listed {
    pub id: u64,
    pub time: u64,
    pub host: String,
    pub paths: Vec<String>,
    pub tags: Vec<String>,
    pub files: u64,
    pub dirs: u64,
    pub bytes: u64,
    #[serde(skip)]
    pub root: ObjectId,
}

/// An entry of a listed tree.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LsEntry {
    pub path: String,
    pub kind: &'static str,
    pub mode: u32,
    pub size: u64,
    pub mtime: i64,
}

/// What a restore did.
#[derive(Debug, Default, serde::Serialize)]
pub struct RestoreSummary {
    pub snapshot: u64,
    pub files: u64,
    pub dirs: u64,
    pub links: u64,
    pub bytes: u64,
    /// Entries not restored, with why; the first error decides the status.
    pub failed: Vec<(String, String)>,
    #[serde(skip)]
    pub first_error: Option<Error>,
}

/// A connection with the keys to read the repository.
pub(super) struct Reader {
    pub(super) remote: Remote,
    pub(super) id_key: IdKey,
    pub(super) open_key: OpenKey,
    opener: Opener,
}

impl Reader {
    async fn object(&mut self, id: ObjectId, what: &str) -> Result<Vec<u8>, Error> {
        let fetched = self.remote.fetch(&[id]).await?;
        match fetched.into_iter().next() {
            Some(Fetched::Object { id, sealed }) => self
                .opener
                .open_object(&self.id_key, &id, &sealed, MAX_PLAIN)
                .map_err(|e| Error::DamagedObject {
                    path: what.to_owned(),
                    detail: e.to_string(),
                }),
            _ => Err(Error::DamagedObject {
                path: what.to_owned(),
                detail: "the server does not hold it".into(),
            }),
        }
    }

    pub(super) async fn tree(&mut self, id: ObjectId, what: &str) -> Result<Vec<Entry>, Error> {
        let bytes = self.object(id, what).await?;
        decode_tree(&bytes).map_err(|e| Error::DamagedObject {
            path: what.to_owned(),
            detail: format!("its directory listing does not parse: {e}"),
        })
    }

    pub(super) fn describe(&mut self, entry: &SnapshotEntry) -> Result<Listed, Error> {
        let plain = self
            .opener
            .open_snapshot(entry.time, &entry.meta, MAX_PLAIN)
            .map_err(|e| Error::DamagedObject {
                path: format!("snapshot {}", entry.id),
                detail: e.to_string(),
            })?;
        let d = Description::decode(&plain).map_err(|e| Error::DamagedObject {
            path: format!("snapshot {}", entry.id),
            detail: e.to_string(),
        })?;
        Ok(Listed {
            id: entry.id,
            time: entry.time,
            host: d.host,
            paths: d.paths,
            tags: d.tags,
            files: d.files,
            dirs: d.dirs,
            bytes: d.bytes,
            root: d.root,
        })
    }
}

/// Parses `[SNAPSHOT][:PATH]`: `latest` or empty for the newest.
pub fn parse_spec(spec: &str) -> (Option<u64>, Option<String>) {
    let (snap, path) = match spec.split_once(':') {
        Some((s, p)) => (
            s,
            Some(p.trim_matches('/').to_owned()).filter(|p| !p.is_empty()),
        ),
        None => (spec, None),
    };
    let id = match snap.trim() {
        "" | "latest" => None,
        s => Some(s.parse().unwrap_or(u64::MAX)),
    };
    (id, path)
}

impl Client {
    pub(super) async fn reader(&self) -> Result<(Reader, MasterKey), Error> {
        if self.key_file().is_some() {
            return Err(Error::BackupOnlyKey);
        }
        if let Some(login) = self.passphrase_login() {
            let (mut remote, keys) = self.passphrase_remote(login).await?;
            let master = match keys::open_with_passphrase(&mut remote, keys).await {
                Ok(m) => m,
                Err(e) => {
                    remote.close().await;
                    return Err(e);
                }
            };
            let reader = Reader {
                remote,
                id_key: master.id_key(),
                open_key: master.open_key(),
                opener: Opener::new(master.open_key()),
            };
            return Ok((reader, master));
        }
        let keyed = self.reconnect_existing().await?;
        let mut remote = Remote::new(keyed, self.options().server.clone());
        let master = match keys::obtain(&mut remote, false).await {
            Ok(RepoKey::Full(m)) => m,
            Ok(RepoKey::BackupOnly(_)) => {
                remote.close().await;
                return Err(Error::BackupOnlyKey);
            }
            Err(e) => {
                remote.close().await;
                return Err(e);
            }
        };
        let reader = Reader {
            remote,
            id_key: master.id_key(),
            open_key: master.open_key(),
            opener: Opener::new(master.open_key()),
        };
        Ok((reader, master))
    }

    /// Every snapshot of this client, oldest first.
    ///
    /// # Errors
    /// When the server cannot be reached, or a description does not open.
    pub async fn snapshots(&self) -> Result<Vec<Listed>, Error> {
        let (mut r, _) = match self.reader().await {
            Ok(r) => r,
            Err(Error::NoRepositoryKey) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let entries = r.remote.snapshots().await;
        let listed = entries.and_then(|e| e.iter().map(|s| r.describe(s)).collect());
        r.remote.close().await;
        listed
    }

    pub(super) async fn pick(&self, r: &mut Reader, id: Option<u64>) -> Result<Listed, Error> {
        let all = r.remote.snapshots().await?;
        let entry = match id {
            None => all.last(),
            Some(id) => all.iter().find(|s| s.id == id),
        };
        let entry = entry.ok_or_else(|| Error::NoSnapshot {
            server: self.options().server.clone(),
            what: match id {
                Some(id) => format!("snapshot {id}"),
                None => "snapshot".into(),
            },
        })?;
        r.describe(entry)
    }

    /// Walks to `path` in the snapshot's root: the entries there (the
    /// root's own entries when `path` is `None`), with their paths.
    async fn descend(
        &self,
        r: &mut Reader,
        root: ObjectId,
        path: Option<&str>,
    ) -> Result<(PathBuf, Vec<Entry>), Error> {
        let mut entries = r.tree(root, "the snapshot's root").await?;
        let mut at = PathBuf::new();
        let Some(path) = path else {
            return Ok((at, entries));
        };
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        for (i, part) in parts.iter().enumerate() {
            let found = entries
                .iter()
                .find(|e| e.name == part.as_bytes())
                .cloned()
                .ok_or_else(|| Error::NoSnapshot {
                    server: self.options().server.clone(),
                    what: format!("path {path} in that snapshot"),
                })?;
            if i + 1 == parts.len() {
                return Ok((at, vec![found]));
            }
            at.push(part);
            match found.kind {
                EntryKind::Dir { tree } => {
                    entries = r.tree(tree, &at.display().to_string()).await?
                }
                _ => {
                    return Err(Error::NoSnapshot {
                        server: self.options().server.clone(),
                        what: format!("directory {} in that snapshot", at.display()),
                    })
                }
            }
        }
        Ok((at, entries))
    }

    /// The entries of a snapshot under `spec` (`[SNAPSHOT][:PATH]`),
    /// recursively.
    ///
    /// # Errors
    /// When the snapshot or path does not exist, or a tree is damaged.
    pub async fn ls(&self, spec: &str) -> Result<(Listed, Vec<LsEntry>), Error> {
        let (id, path) = parse_spec(spec);
        let (mut r, _) = self.reader().await?;
        let result = async {
            let snap = self.pick(&mut r, id).await?;
            let (base, entries) = self.descend(&mut r, snap.root, path.as_deref()).await?;
            let mut out = Vec::new();
            let mut stack: Vec<(PathBuf, Entry)> = entries
                .into_iter()
                .rev()
                .map(|e| (base.clone(), e))
                .collect();
            while let Some((parent, e)) = stack.pop() {
                let p = parent.join(String::from_utf8_lossy(&e.name).as_ref());
                let (kind, size) = match &e.kind {
                    EntryKind::File { size, .. } => ("file", *size),
                    EntryKind::Dir { .. } => ("dir", 0),
                    EntryKind::Symlink { .. } => ("symlink", 0),
                };
                out.push(LsEntry {
                    path: p.display().to_string(),
                    kind,
                    mode: e.mode,
                    size,
                    mtime: e.mtime_s,
                });
                if let EntryKind::Dir { tree } = e.kind {
                    let children = r.tree(tree, &p.display().to_string()).await?;
                    stack.extend(children.into_iter().rev().map(|c| (p.clone(), c)));
                }
            }
            Ok((snap, out))
        }
        .await;
        r.remote.close().await;
        result
    }

    /// Restores `spec` (`[SNAPSHOT][:PATH]`, the newest snapshot by
    /// default) into the folder `to`.
    ///
    /// # Errors
    /// When the snapshot cannot be read at all; failures of single
    /// entries are in [`RestoreSummary::failed`].
    pub async fn restore_snapshot(
        &self,
        spec: &str,
        to: &Path,
        overwrite: bool,
    ) -> Result<RestoreSummary, Error> {
        let (id, path) = parse_spec(spec);
        let (mut r, _) = self.reader().await?;
        let result = async {
            let snap = self.pick(&mut r, id).await?;
            let (_, entries) = self.descend(&mut r, snap.root, path.as_deref()).await?;
            std::fs::create_dir_all(to).map_err(|e| Error::WriteFile {
                path: to.to_owned(),
                reason: e.to_string(),
            })?;
            let mut summary = RestoreSummary {
                snapshot: snap.id,
                ..RestoreSummary::default()
            };
            let sink = Sink::new(
                Opener::new(r.open_key.clone()),
                r.id_key.clone(),
                to,
                overwrite,
            );
            let mut cleaned = HashSet::new();
            crate::restore::remove_stale_parts(to, &mut cleaned);
            let mut restorer = Restorer {
                r: &mut r,
                overwrite,
                summary: &mut summary,
                dir_times: Vec::new(),
                plan: Plan::default(),
                sink: Some(sink),
                job: None,
                cleaned,
            };
            let mut walked = Ok(());
            for e in entries {
                walked = restorer.entry(to, e).await;
                if walked.is_err() {
                    break;
                }
            }
            // What was fetched lands even when the connection failed.
            let landed = restorer.finish_files(walked.is_ok()).await;
            walked?;
            landed?;
            restorer.finish_dirs();
            Ok(summary)
        }
        .await;
        r.remote.close().await;
        result
    }
}

struct Restorer<'a> {
    r: &'a mut Reader,
    overwrite: bool,
    summary: &'a mut RestoreSummary,
    /// Directories whose times are set once their contents are written.
    dir_times: Vec<(PathBuf, i64, u32, u32)>,
    /// Files and chunk ids queued, not yet fetched.
    plan: Plan,
    /// The writer, when idle; else it runs as `job`.
    sink: Option<Sink>,
    job: Option<tokio::task::JoinHandle<Sink>>,
    /// Folders cleared of temporaries an earlier restore left.
    cleaned: HashSet<PathBuf>,
}

/// What a restore has queued and not fetched yet: files not yet handed
/// to the sink, and the ids of their chunks with an estimate of the bytes
/// each opens to (the file's size for a file of one chunk, else the
/// largest chunk).
#[derive(Default)]
struct Plan {
    files: Vec<FileJob>,
    ids: VecDeque<(ObjectId, u64)>,
    bytes: u64,
}

impl Restorer<'_> {
    fn fail(&mut self, path: &Path, e: Error) {
        self.summary
            .failed
            .push((path.display().to_string(), e.to_string()));
        self.summary.first_error.get_or_insert(e);
    }

    /// Restores one entry into `parent` (a directory we made or checked).
    async fn entry(&mut self, parent: &Path, entry: Entry) -> Result<(), Error> {
        // Depth-first with an explicit stack, so a deep tree cannot
        // exhaust ours.
        let mut stack = vec![(parent.to_owned(), entry)];
        while let Some((parent, e)) = stack.pop() {
            let path = parent.join(std::ffi::OsStr::from_bytes(&e.name));
            match std::fs::symlink_metadata(&path) {
                Ok(m) if m.file_type().is_symlink() && matches!(e.kind, EntryKind::Dir { .. }) => {
                    self.fail(
                        &path,
                        Error::RestorePath {
                            path: path.clone(),
                            name: path.display().to_string(),
                            reason: "a symbolic link is in the way".into(),
                        },
                    );
                    continue;
                }
                Ok(m) if !m.is_dir() && !self.overwrite => {
                    self.fail(
                        &path,
                        Error::Exists {
                            path: path.clone(),
                            name: path.display().to_string(),
                        },
                    );
                    continue;
                }
                _ => {}
            }
            match e.kind {
                EntryKind::Dir { tree } => {
                    if let Err(err) = std::fs::create_dir(&path) {
                        if err.kind() != std::io::ErrorKind::AlreadyExists || !path.is_dir() {
                            self.fail(&path, write_error(&path, err));
                            continue;
                        }
                        // An existing folder: what a crashed restore left
                        // goes before this one writes there.
                        crate::restore::remove_stale_parts(&path, &mut self.cleaned);
                    }
                    let children = match self.r.tree(tree, &path.display().to_string()).await {
                        Ok(c) => c,
                        Err(err) => {
                            self.fail(&path, err);
                            continue;
                        }
                    };
                    self.summary.dirs += 1;
                    self.dir_times
                        .push((path.clone(), e.mtime_s, e.mtime_ns, e.mode));
                    stack.extend(children.into_iter().rev().map(|c| (path.clone(), c)));
                }
                EntryKind::Symlink { ref target } => {
                    let _ = std::fs::remove_file(&path);
                    let target = std::ffi::OsStr::from_bytes(target);
                    match std::os::unix::fs::symlink(target, &path) {
                        Ok(()) => self.summary.links += 1,
                        Err(err) => self.fail(&path, write_error(&path, err)),
                    }
                }
                EntryKind::File { size, chunks } => {
                    self.file(FileJob {
                        path,
                        chunks,
                        size,
                        mode: e.mode,
                        mtime_s: e.mtime_s,
                        mtime_ns: e.mtime_ns,
                    })
                    .await?;
                }
            }
        }
        Ok(())
    }

    /// Queues a file; fetches once enough chunks are queued.
    async fn file(&mut self, job: FileJob) -> Result<(), Error> {
        let estimate = if job.chunks.len() > 1 {
            u64::from(chunk::MAX)
        } else {
            job.size
        };
        for id in &job.chunks {
            self.plan.ids.push_back((*id, estimate));
            self.plan.bytes += estimate;
        }
        self.plan.files.push(job);
        self.pump(false).await
    }

    /// Fetches queued chunks in batches of at most [`FETCH_IDS`] ids and
    /// about [`FETCH_BYTES`] (at least one id); all of them when `all`.
    /// A batch is opened and written on the blocking pool while the next
    /// is fetched.
    async fn pump(&mut self, all: bool) -> Result<(), Error> {
        // Files count too: a run of empty files (no chunks) is handed on
        // rather than held.
        while self.plan.ids.len() >= FETCH_IDS
            || self.plan.bytes >= FETCH_BYTES
            || self.plan.files.len() >= FETCH_IDS
            || (all && !self.plan.ids.is_empty())
        {
            let mut ids = Vec::new();
            let mut bytes = 0u64;
            while let Some(&(id, estimate)) = self.plan.ids.front() {
                if ids.len() == FETCH_IDS || (!ids.is_empty() && bytes + estimate > FETCH_BYTES) {
                    break;
                }
                ids.push(id);
                bytes += estimate;
                self.plan.ids.pop_front();
            }
            self.plan.bytes -= bytes;
            let fetched = if ids.is_empty() {
                Vec::new()
            } else {
                self.r.remote.fetch(&ids).await?
            };
            let files = std::mem::take(&mut self.plan.files);
            let mut sink = self.settle().await?;
            self.job = Some(tokio::task::spawn_blocking(move || {
                sink.feed(files, fetched);
                sink
            }));
        }
        Ok(())
    }

    /// Waits for the sink's running batch, if any, and collects what it
    /// ended.
    async fn settle(&mut self) -> Result<Sink, Error> {
        let mut sink = match (self.job.take(), self.sink.take()) {
            (Some(job), _) => job
                .await
                .map_err(|e| Error::Internal(format!("restore work stopped: {e}")))?,
            (None, Some(sink)) => sink,
            (None, None) => return Err(Error::Internal("a restore lost its writer".into())),
        };
        for (path, outcome) in sink.outcomes.drain(..) {
            match outcome {
                Ok(size) => {
                    self.summary.files += 1;
                    self.summary.bytes += size;
                }
                Err(e) => self.fail(&path, e),
            }
        }
        Ok(sink)
    }

    /// Fetches what is queued (unless the connection already failed),
    /// ends every file and lands them durably.
    async fn finish_files(&mut self, fetch: bool) -> Result<(), Error> {
        let pumped = if fetch { self.pump(true).await } else { Ok(()) };
        let files = std::mem::take(&mut self.plan.files);
        let mut sink = self.settle().await?;
        let sink = tokio::task::spawn_blocking(move || {
            sink.finish(files);
            sink
        })
        .await
        .map_err(|e| Error::Internal(format!("restore work stopped: {e}")))?;
        self.job = None;
        self.sink = Some(sink);
        let _ = self.settle().await?;
        pumped
    }

    /// Sets the modes and times of the directories made, deepest first.
    fn finish_dirs(&mut self) {
        for (path, s, ns, mode) in self.dir_times.drain(..).rev() {
            let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & 0o777));
            if let Ok(dir) = std::fs::File::open(&path) {
                let _ = dir.set_modified(file_time(s, ns));
            }
        }
    }
}

fn write_error(path: &Path, e: std::io::Error) -> Error {
    Error::WriteFile {
        path: path.to_owned(),
        reason: e.to_string(),
    }
}
