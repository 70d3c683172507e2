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

use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use protocol::repo::keys::{IdKey, MasterKey, OpenKey};
use protocol::repo::message::{ObjectId, SnapshotEntry, MAX_FETCH_IDS, MAX_OBJECT_BYTES};
use protocol::repo::seal::Opener;
use protocol::repo::tree::{decode_tree, Description, Entry, EntryKind};
use protocol::session::repo::Fetched;

use super::keys::{self, RepoKey};
use super::remote::Remote;
use crate::engine::Client;
use crate::error::Error;

/// The most plaintext a tree or chunk may open to.
const MAX_PLAIN: usize = MAX_OBJECT_BYTES as usize;
/// Chunk ids asked for in one fetch while restoring files.
const FETCH_BATCH: usize = 8;

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
    id_key: IdKey,
    open_key: OpenKey,
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
            let mut restorer = Restorer {
                r: &mut r,
                overwrite,
                summary: &mut summary,
                dir_times: Vec::new(),
            };
            for e in entries {
                restorer.entry(to, e).await?;
            }
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
}

fn file_time(s: i64, ns: u32) -> std::time::SystemTime {
    match u64::try_from(s) {
        Ok(s) => UNIX_EPOCH + Duration::new(s, ns.min(999_999_999)),
        Err(_) => UNIX_EPOCH,
    }
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
                EntryKind::File { size, ref chunks } => {
                    match self
                        .file(&path, chunks, size, e.mode, e.mtime_s, e.mtime_ns)
                        .await
                    {
                        Ok(()) => {
                            self.summary.files += 1;
                            self.summary.bytes += size;
                        }
                        Err(
                            err @ (Error::Connect { .. }
                            | Error::ConnectionLost { .. }
                            | Error::Closed { .. }
                            | Error::Timeout { .. }
                            | Error::Protocol { .. }),
                        ) => return Err(err),
                        Err(err) => self.fail(&path, err),
                    }
                }
            }
        }
        Ok(())
    }

    async fn file(
        &mut self,
        path: &Path,
        chunks: &[ObjectId],
        size: u64,
        mode: u32,
        mtime_s: i64,
        mtime_ns: u32,
    ) -> Result<(), Error> {
        let dir = path.parent().unwrap_or(Path::new("."));
        let tmp = tempfile::Builder::new()
            .prefix(".restore-")
            .suffix(".part")
            .tempfile_in(dir)
            .map_err(|e| write_error(path, e))?;
        // One batch is opened and written on the blocking pool while the
        // next is fetched; the opener (with its cached session key) and
        // the file travel with the work and come back.
        let mut state = Some((tmp, 0u64));
        let mut job: Option<tokio::task::JoinHandle<OpenedBatch>> = None;
        let mut failed = None;
        for batch in chunks.chunks(FETCH_BATCH.min(MAX_FETCH_IDS)) {
            let fetched = match self.r.remote.fetch(batch).await {
                Ok(f) => f,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            };
            if let Some(j) = job.take() {
                match self.settle(j).await {
                    Ok(s) => state = Some(s),
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            let Some((tmp, written)) = state.take() else {
                break;
            };
            let opener =
                std::mem::replace(&mut self.r.opener, Opener::new(self.r.open_key.clone()));
            let id_key = self.r.id_key.clone();
            let shown = path.display().to_string();
            job = Some(tokio::task::spawn_blocking(move || {
                open_batch(opener, &id_key, fetched, tmp, written, &shown)
            }));
        }
        if let Some(j) = job.take() {
            match self.settle(j).await {
                Ok(s) => state = Some(s),
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }
        let (tmp, written) =
            state.ok_or_else(|| Error::Internal("a restore lost its file".into()))?;
        if written != size {
            return Err(Error::DamagedObject {
                path: path.display().to_string(),
                detail: format!("its chunks hold {written} bytes, the listing says {size}"),
            });
        }
        // Mode, time, sync and rename on the blocking pool.
        let path = path.to_owned();
        tokio::task::spawn_blocking(move || {
            let file = tmp.as_file();
            file.set_permissions(std::fs::Permissions::from_mode(mode & 0o777))
                .map_err(|e| write_error(&path, e))?;
            file.set_modified(file_time(mtime_s, mtime_ns))
                .map_err(|e| write_error(&path, e))?;
            file.sync_all().map_err(|e| write_error(&path, e))?;
            tmp.persist(&path)
                .map_err(|e| write_error(&path, e.error))?;
            Ok(())
        })
        .await
        .map_err(|e| Error::Internal(format!("restore work stopped: {e}")))?
    }

    /// Waits for a batch's work and takes the opener back.
    async fn settle(
        &mut self,
        job: tokio::task::JoinHandle<OpenedBatch>,
    ) -> Result<(tempfile::NamedTempFile, u64), Error> {
        let (opener, result) = job
            .await
            .map_err(|e| Error::Internal(format!("restore work stopped: {e}")))?;
        self.r.opener = opener;
        result
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

/// A batch's work handed back: the opener, and the file with the bytes
/// written so far (or why the batch failed).
type OpenedBatch = (Opener, Result<(tempfile::NamedTempFile, u64), Error>);

/// Opens the fetched objects of one batch, in order, and appends their
/// plaintext to `tmp`.
fn open_batch(
    mut opener: Opener,
    id_key: &IdKey,
    fetched: Vec<Fetched>,
    mut tmp: tempfile::NamedTempFile,
    mut written: u64,
    path: &str,
) -> OpenedBatch {
    let damaged = |detail: String| Error::DamagedObject {
        path: path.to_owned(),
        detail,
    };
    for f in fetched {
        let (id, sealed) = match f {
            Fetched::Object { id, sealed } => (id, sealed),
            Fetched::Missing { .. } => {
                return (
                    opener,
                    Err(damaged("the server does not hold one of its chunks".into())),
                )
            }
        };
        let plain = match opener.open_object(id_key, &id, &sealed, MAX_PLAIN) {
            Ok(p) => p,
            Err(e) => return (opener, Err(damaged(e.to_string()))),
        };
        written += plain.len() as u64;
        if let Err(e) = tmp.write_all(&plain) {
            return (
                opener,
                Err(Error::WriteFile {
                    path: PathBuf::from(path),
                    reason: e.to_string(),
                }),
            );
        }
    }
    (opener, Ok((tmp, written)))
}

fn write_error(path: &Path, e: std::io::Error) -> Error {
    Error::WriteFile {
        path: path.to_owned(),
        reason: e.to_string(),
    }
}
