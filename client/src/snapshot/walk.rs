//! The walker of a snapshot run: on a thread of its own it reads the
//! paths, cuts files into chunks and names them (or takes an unchanged
//! file's chunks from the file cache), builds each directory's tree, and
//! hands every object it has not handed yet to the uploader.

use std::fs::Metadata;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use protocol::repo::keys::IdKey;
use protocol::repo::message::ObjectId;
use protocol::repo::tree::{encode_tree, plain_name, Entry, EntryKind};
use tokio::sync::mpsc;

use super::cache::{CacheWriter, FileCache, Lookup, Stamp};
use super::chunk;
use super::idset::IdSet;
use crate::error::Error;
use crate::exclude::{Filter, Rules};

/// One object the walker made: a chunk or a tree.
pub(super) struct Made {
    pub(super) id: ObjectId,
    pub(super) data: Vec<u8>,
}

/// What the walker found, once done.
#[derive(Default)]
pub(super) struct Walked {
    pub(super) root: ObjectId,
    /// Every object the snapshot references, once each.
    pub(super) refs: IdSet,
    pub(super) files: u64,
    pub(super) dirs: u64,
    pub(super) bytes: u64,
    pub(super) unchanged: u64,
    /// Files read that the last snapshot held with other times or size.
    pub(super) changed: u64,
    pub(super) skipped: Vec<(String, String)>,
    /// Entries left out by the exclusion rules.
    pub(super) excluded: u64,
    pub(super) cache: Option<CacheWriter>,
}

pub(super) struct Walker {
    id_key: IdKey,
    tx: mpsc::Sender<Made>,
    /// Every object referenced so far: 32 bytes and the set's overhead
    /// each, about 40 MiB for a million chunks.
    seen: IdSet,
    files: u64,
    dirs: u64,
    bytes: u64,
    unchanged: u64,
    skipped: Vec<(String, String)>,
    /// The last snapshot's files, unless every file is to be read.
    old: FileCache,
    /// The cache this run writes; dropped on the first write error.
    new: Option<CacheWriter>,
    chunker: chunk::Chunker,
    /// The position of the root being walked, for the file cache.
    root_index: u32,
    /// What is left out of the directories walked, and those rules as
    /// they apply under the root being walked.
    rules: Rules,
    filter: Option<Filter>,
    excluded: u64,
    changed: u64,
}

/// The uploader went away (it failed); the walker stops.
pub(super) struct Stopped;

/// Why reading a file stopped.
enum ReadStop {
    Read(std::io::Error),
    Stopped(Stopped),
}

impl From<std::io::Error> for ReadStop {
    fn from(e: std::io::Error) -> Self {
        Self::Read(e)
    }
}

fn mtime(meta: &Metadata) -> (i64, u32) {
    (meta.mtime(), u32::try_from(meta.mtime_nsec()).unwrap_or(0))
}

impl Walker {
    pub(super) fn new(
        id_key: IdKey,
        tx: mpsc::Sender<Made>,
        old: FileCache,
        new: Option<CacheWriter>,
    ) -> Self {
        Self {
            id_key,
            tx,
            seen: IdSet::default(),
            files: 0,
            dirs: 0,
            bytes: 0,
            unchanged: 0,
            skipped: Vec::new(),
            old,
            new,
            chunker: chunk::Chunker::default(),
            root_index: 0,
            rules: Rules::default(),
            filter: None,
            excluded: 0,
            changed: 0,
        }
    }

    /// Leaves out of the directories walked what `rules` exclude.
    pub(super) fn excluding(mut self, rules: Rules) -> Self {
        self.rules = rules;
        self
    }

    /// Walks `roots`: what it found, or `None` when the uploader went away
    /// (the new cache is then dropped).
    pub(super) fn run(mut self, roots: &[(Vec<u8>, PathBuf)]) -> Option<Walked> {
        let Ok(root) = self.root(roots) else {
            if let Some(c) = self.new.take() {
                c.abandon();
            }
            return None;
        };
        Some(Walked {
            root,
            refs: self.seen,
            files: self.files,
            dirs: self.dirs,
            bytes: self.bytes,
            unchanged: self.unchanged,
            skipped: self.skipped,
            excluded: self.excluded,
            changed: self.changed,
            cache: self.new,
        })
    }

    fn emit(&mut self, id: ObjectId, data: Vec<u8>) -> Result<(), Stopped> {
        if self.seen.insert(id) {
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
        self.seen.insert(id);
    }

    fn remember(&mut self, path: &Path, stamp: &Stamp, chunks: &[ObjectId]) {
        if let Some(w) = self.new.as_mut() {
            if let Err(e) = w.add(self.root_index, path.as_os_str().as_bytes(), stamp, chunks) {
                tracing::debug!(error = %e, "cannot write the file cache; the next run reads every file");
                if let Some(w) = self.new.take() {
                    w.abandon();
                }
            }
        }
    }

    fn file(&mut self, path: &Path, meta: &Metadata) -> Result<Option<EntryKind>, Stopped> {
        let stamp = Stamp::of(meta);
        let cached = self
            .old
            .lookup(self.root_index, path.as_os_str().as_bytes(), &stamp);
        let known = cached != Lookup::New;
        if let Lookup::Unchanged(chunks) = cached {
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
        let mut chunker = std::mem::take(&mut self.chunker);
        let cut = chunker.run(file, |c| {
            let id = self.id_key.id(&c.data);
            size += c.data.len() as u64;
            chunks.push(id);
            self.emit(id, c.data).map_err(ReadStop::Stopped)
        });
        self.chunker = chunker;
        match cut {
            Ok(()) => {}
            Err(ReadStop::Stopped(s)) => return Err(s),
            Err(ReadStop::Read(e)) => {
                self.skip(path, e);
                return Ok(None);
            }
        }
        // Cached only if nothing changed while it was read.
        let after = std::fs::metadata(path).map(|m| Stamp::of(&m));
        if matches!(after, Ok(a) if a == stamp && a.size == size) {
            self.remember(path, &stamp, &chunks);
        }
        if known {
            self.changed += 1;
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
            if let Some(f) = self.filter.as_mut() {
                if f.excludes(&child, &meta).is_some() {
                    self.excluded += 1;
                    continue;
                }
            }
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
    pub(super) fn root(&mut self, paths: &[(Vec<u8>, PathBuf)]) -> Result<ObjectId, Stopped> {
        let mut entries = Vec::with_capacity(paths.len());
        for (index, (name, path)) in paths.iter().enumerate() {
            self.root_index = u32::try_from(index).unwrap_or(u32::MAX);
            match std::fs::metadata(path) {
                Ok(meta) => {
                    self.filter = Some(self.rules.for_root(path, &meta));
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
pub(super) fn root_names(paths: &[PathBuf]) -> Result<Vec<(Vec<u8>, PathBuf)>, Error> {
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
