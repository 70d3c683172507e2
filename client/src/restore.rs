//! Writing restored files safely: server names mapped to paths that stay
//! inside the target folder, content decrypted into a temporary file and made
//! visible only once its size, padding and cksum are right.
//!
//! Names from a server are not trusted. [`relative_path`] splits a name on
//! `/` and `\` and refuses empty names and components, absolute paths, drive
//! letters, `.` and `..`, and control characters. [`Destination::prepare`]
//! creates the missing parent folders one at a time and refuses a component
//! that is a symbolic link or not a folder, so that a link already in the
//! target tree cannot lead the file out of it.
//!
//! A restore writes `.NAME.restore-XXXXXX.part` next to its destination; the
//! file is removed on any failure, and [`remove_stale_parts`] removes those an
//! interrupted run left, the next time a restore writes into that folder.

use std::collections::HashSet;
use std::ffi::OsString;
use std::io::Write;
use std::path::{Component, Path, PathBuf};

use bytes::BytesMut;
use protocol::crypto::{AesKey, CbcDecryptor};
use protocol::retrieval::RestoreBegin;
use protocol::Cksum;

use crate::error::{io_reason, Error};

/// What temporary restore files start and end with (after a leading dot and
/// the file's name).
const PART_MARK: &str = ".restore-";
const PART_SUFFIX: &str = ".part";
/// The most bytes of the file's name used in a temporary name, so the
/// temporary name stays within the 255-byte limit of common file systems.
const PART_NAME_MAX: usize = 100;
/// Files at least this large are written by a thread of their own while the
/// next packets are decrypted, and written back to disk as they arrive;
/// smaller ones are written inline.
const PIPELINE_FROM: u64 = 4 * 1024 * 1024;
/// Plaintext chunks waiting for the writer thread.
const WRITE_QUEUE: usize = 2;
/// Bytes written between background syncs of a large file, so that the
/// final sync only has the tail left to write back.
const EARLY_SYNC_BYTES: u64 = if cfg!(test) {
    1024 * 1024
} else {
    64 * 1024 * 1024
};

/// Why a server name cannot be a path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnsafeName {
    #[error("it is empty")]
    Empty,
    #[error("it is an absolute path")]
    Absolute,
    #[error("it starts with a drive letter")]
    Drive,
    #[error("it has an empty component")]
    EmptyComponent,
    #[error("it has a \".\" or \"..\" component")]
    DotComponent,
    #[error("it contains a control character")]
    Control,
    #[error("it is not valid UTF-8")]
    NotUtf8,
    #[cfg(windows)]
    #[error("it contains a character Windows does not allow in file names")]
    Reserved,
}

/// Maps a server name to a relative path of plain components.
///
/// # Errors
/// When the name is empty, absolute, starts with a drive letter, has an
/// empty, `.` or `..` component, or contains a control character.
pub fn relative_path(name: &[u8]) -> Result<Vec<OsString>, UnsafeName> {
    if name.is_empty() {
        return Err(UnsafeName::Empty);
    }
    if name.iter().any(|&b| b < 0x20 || b == 0x7f) {
        return Err(UnsafeName::Control);
    }
    if matches!(name.first(), Some(b'/' | b'\\')) {
        return Err(UnsafeName::Absolute);
    }
    if let [letter, b':', ..] = name {
        if letter.is_ascii_alphabetic() {
            return Err(UnsafeName::Drive);
        }
    }
    let mut parts = Vec::new();
    for part in name.split(|&b| b == b'/' || b == b'\\') {
        match part {
            [] => return Err(UnsafeName::EmptyComponent),
            b"." | b".." => return Err(UnsafeName::DotComponent),
            _ => parts.push(component(part)?),
        }
    }
    Ok(parts)
}

#[cfg(unix)]
fn component(part: &[u8]) -> Result<OsString, UnsafeName> {
    use std::os::unix::ffi::OsStrExt;
    Ok(std::ffi::OsStr::from_bytes(part).to_owned())
}

#[cfg(not(unix))]
fn component(part: &[u8]) -> Result<OsString, UnsafeName> {
    let text = std::str::from_utf8(part).map_err(|_| UnsafeName::NotUtf8)?;
    #[cfg(windows)]
    if text.contains([':', '*', '?', '"', '<', '>', '|']) {
        return Err(UnsafeName::Reserved);
    }
    Ok(OsString::from(text))
}

/// Where one restored file goes: `root` joined with plain `parts`, the last
/// being the file name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    /// The folder the file must stay inside (trusted: given by the user).
    pub root: PathBuf,
    /// Plain components below `root`.
    pub parts: Vec<OsString>,
}

impl Destination {
    /// The server name `name` below `root`.
    ///
    /// # Errors
    /// [`Error::UnsafeName`] when the name cannot be a relative path.
    pub fn inside(root: &Path, name: &[u8]) -> Result<Self, Error> {
        let parts = relative_path(name).map_err(|e| Error::UnsafeName {
            name: String::from_utf8_lossy(name).into_owned(),
            reason: e.to_string(),
        })?;
        Ok(Self {
            root: root.to_owned(),
            parts,
        })
    }

    /// Exactly `path`, as the user named it.
    ///
    /// # Errors
    /// [`Error::RestorePath`] when `path` has no file name.
    pub fn exactly(path: &Path, name: &str) -> Result<Self, Error> {
        let file = match path.components().next_back() {
            Some(Component::Normal(file)) => file.to_owned(),
            _ => {
                return Err(Error::RestorePath {
                    path: path.to_owned(),
                    name: name.to_owned(),
                    reason: "it does not end in a file name".into(),
                })
            }
        };
        let root = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        Ok(Self {
            root,
            parts: vec![file],
        })
    }

    /// The full path of the file.
    pub fn path(&self) -> PathBuf {
        let mut path = self.root.clone();
        path.extend(&self.parts);
        path
    }

    /// Creates the missing folders between the root and the file, one at a
    /// time, and returns the file's folder. Refuses a component that is a
    /// symbolic link or not a folder, and a destination that exists unless
    /// `overwrite` (and even then one that is a folder).
    ///
    /// # Errors
    /// [`Error::RestorePath`], or [`Error::Exists`].
    pub fn prepare(&self, name: &str, overwrite: bool) -> Result<PathBuf, Error> {
        let fail = |path: &Path, reason: String| Error::RestorePath {
            path: path.to_owned(),
            name: name.to_owned(),
            reason,
        };
        std::fs::create_dir_all(&self.root).map_err(|e| fail(&self.root, io_reason(&e)))?;
        let Some((file, folders)) = self.parts.split_last() else {
            return Err(fail(&self.root, "no file name".into()));
        };
        let mut dir = self.root.clone();
        for part in folders {
            dir.push(part);
            match std::fs::symlink_metadata(&dir) {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(fail(
                        &dir,
                        "a symbolic link is in the way, and restore does not follow links".into(),
                    ))
                }
                Ok(m) if m.is_dir() => {}
                Ok(_) => return Err(fail(&dir, "a file is in the way of a folder".into())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    match std::fs::create_dir(&dir) {
                        Ok(()) => {}
                        // Made meanwhile; checked again below.
                        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                        Err(e) => return Err(fail(&dir, io_reason(&e))),
                    }
                    let m =
                        std::fs::symlink_metadata(&dir).map_err(|e| fail(&dir, io_reason(&e)))?;
                    if !m.is_dir() {
                        return Err(fail(&dir, "not a folder".into()));
                    }
                }
                Err(e) => return Err(fail(&dir, io_reason(&e))),
            }
        }
        let path = dir.join(file);
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => Err(fail(&path, "a folder is in the way".into())),
            Ok(_) if !overwrite => Err(Error::Exists {
                path,
                name: name.to_owned(),
            }),
            Ok(_) => Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(dir),
            Err(e) => Err(fail(&path, io_reason(&e))),
        }
    }
}

/// Whether `file_name` is a temporary file a restore writes.
pub fn is_part_name(file_name: &str) -> bool {
    file_name.starts_with('.') && file_name.ends_with(PART_SUFFIX) && file_name.contains(PART_MARK)
}

/// Removes temporary restore files an interrupted run left in `dir`, once
/// per `dir` per run (`done` remembers which). Returns how many it removed.
pub fn remove_stale_parts(dir: &Path, done: &mut HashSet<PathBuf>) -> usize {
    if !done.insert(dir.to_owned()) {
        return 0;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let stale = entry.file_name().to_str().is_some_and(is_part_name)
            && entry.file_type().is_ok_and(|t| t.is_file());
        if stale && std::fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

pub(crate) fn part_prefix(file: &std::ffi::OsStr) -> String {
    let name = file.to_string_lossy();
    let mut end = name.len().min(PART_NAME_MAX);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    format!(".{}{PART_MARK}", name.get(..end).unwrap_or_default())
}

/// One restore in progress: ciphertext in, plaintext into a temporary file.
pub struct RestoreFile {
    name: String,
    target: PathBuf,
    overwrite: bool,
    begin: RestoreBegin,
    tmp: tempfile::NamedTempFile,
    /// `None` once finished.
    decryptor: Option<CbcDecryptor>,
    cksum: Cksum,
    plain: BytesMut,
    /// The writer thread of a large file; `None`: written inline.
    writer: Option<Writer>,
}

impl std::fmt::Debug for RestoreFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestoreFile")
            .field("name", &self.name)
            .field("target", &self.target)
            .field("written", &self.cksum.len())
            .finish_non_exhaustive()
    }
}

impl RestoreFile {
    /// Starts writing the file `begin` announces into `dest` (whose folder
    /// [`Destination::prepare`] returned as `dir`), decrypting under `key`.
    ///
    /// # Errors
    /// [`Error::RestorePath`] when the temporary file cannot be created.
    pub fn create(
        dest: &Destination,
        dir: &Path,
        begin: RestoreBegin,
        key: &AesKey,
        overwrite: bool,
    ) -> Result<Self, Error> {
        let name = begin.file.to_string_lossy();
        let target = dest.path();
        let file = target.file_name().unwrap_or_default();
        let tmp = tempfile::Builder::new()
            .prefix(&part_prefix(file))
            .suffix(PART_SUFFIX)
            .tempfile_in(dir)
            .map_err(|e| Error::RestorePath {
                path: target.clone(),
                name: name.clone(),
                reason: io_reason(&e),
            })?;
        let decryptor = Some(CbcDecryptor::with_iv(key, &begin.iv));
        let writer = if begin.size >= PIPELINE_FROM {
            let started = tmp.as_file().try_clone().and_then(Writer::start);
            Some(started.map_err(|e| Error::RestorePath {
                path: target.clone(),
                name: name.clone(),
                reason: io_reason(&e),
            })?)
        } else {
            None
        };
        Ok(Self {
            name,
            target,
            overwrite,
            begin,
            tmp,
            decryptor,
            cksum: Cksum::new(),
            plain: BytesMut::new(),
            writer,
        })
    }

    /// Plaintext bytes written so far.
    pub fn written(&self) -> u64 {
        self.cksum.len()
    }

    /// Where the file will be.
    pub fn target(&self) -> &Path {
        &self.target
    }

    fn write_error(&self, e: &std::io::Error) -> Error {
        Error::RestorePath {
            path: self.target.clone(),
            name: self.name.clone(),
            reason: io_reason(e),
        }
    }

    fn verification(&self, detail: String) -> Error {
        Error::RestoreVerification {
            name: self.name.clone(),
            detail,
        }
    }

    fn write_plain(&mut self) -> Result<(), Error> {
        if self.cksum.len() + self.plain.len() as u64 > self.begin.size {
            return Err(self.verification(format!(
                "it decrypted to more than the {} bytes announced",
                self.begin.size
            )));
        }
        self.cksum.update(&self.plain);
        if self.plain.is_empty() {
            return Ok(());
        }
        let written = match self.writer.as_mut() {
            Some(writer) => {
                let next = writer.spare().unwrap_or_default();
                writer.send(std::mem::replace(&mut self.plain, next))
            }
            None => {
                let written = self.tmp.as_file_mut().write_all(&self.plain);
                self.plain.clear();
                written
            }
        };
        written.map_err(|e| self.write_error(&e))
    }

    /// Decrypts `ciphertext` and appends the plaintext to the temporary file.
    ///
    /// # Errors
    /// When the file cannot be written, or the plaintext grows past the size
    /// announced.
    pub fn feed(&mut self, ciphertext: &[u8]) -> Result<(), Error> {
        if let Some(d) = self.decryptor.as_mut() {
            d.update(ciphertext, &mut self.plain);
        }
        self.write_plain()
    }

    /// Checks the padding, the size and the cksum, syncs the file and moves
    /// it into place (replacing an existing file only when overwriting).
    /// Returns the cksum. On error the temporary file is removed. The new
    /// name is durable once its folder is synced ([`sync_dirs`], once per
    /// folder at the end of a run): a crash before that can lose the name,
    /// never leave a torn file under it.
    ///
    /// # Errors
    /// [`Error::RestoreVerification`] when the content is not what the
    /// server announced; [`Error::Exists`] when a file appeared at the
    /// destination meanwhile; [`Error::RestorePath`] when writing fails.
    pub fn finish(mut self) -> Result<u32, Error> {
        let padded = self
            .decryptor
            .take()
            .is_some_and(|d| d.finish(&mut self.plain).is_ok());
        if !padded {
            return Err(self.verification("its padding is invalid".into()));
        }
        self.write_plain()?;
        if self.cksum.len() != self.begin.size {
            return Err(self.verification(format!(
                "{} bytes arrived where {} were announced",
                self.cksum.len(),
                self.begin.size
            )));
        }
        let cksum = std::mem::take(&mut self.cksum).finish();
        if cksum != self.begin.cksum {
            return Err(self.verification(format!(
                "its checksum {cksum} differs from the server's {}",
                self.begin.cksum
            )));
        }
        if let Some(mut writer) = self.writer.take() {
            if let Err(e) = writer.join() {
                return Err(self.write_error(&e));
            }
        }
        if let Err(e) = self.tmp.as_file().sync_all() {
            return Err(self.write_error(&e));
        }
        let persisted = if self.overwrite {
            self.tmp.persist(&self.target)
        } else {
            self.tmp.persist_noclobber(&self.target)
        };
        if let Err(e) = persisted {
            return Err(if e.error.kind() == std::io::ErrorKind::AlreadyExists {
                Error::Exists {
                    path: self.target,
                    name: self.name,
                }
            } else {
                Error::RestorePath {
                    path: self.target,
                    name: self.name,
                    reason: io_reason(&e.error),
                }
            });
        }
        Ok(cksum)
    }
}

/// Syncs each folder of `dirs`, making the names of the files restored
/// into them durable. Returns the folders that could not be synced, with
/// why.
pub fn sync_dirs<'a>(dirs: impl IntoIterator<Item = &'a PathBuf>) -> Vec<(PathBuf, String)> {
    dirs.into_iter()
        .filter_map(|dir| {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .err()
                .map(|e| (dir.clone(), io_reason(&e)))
        })
        .collect()
}

/// The writer thread of one large restore: plaintext chunks in through a
/// bounded channel (so a slow disk slows the connection, and memory stays a
/// few chunks), emptied buffers back for reuse. Every
/// [`EARLY_SYNC_BYTES`] it asks a second thread to sync what is written,
/// so writeback overlaps the transfer instead of all happening at the end.
/// Dropped without [`join`](Self::join), it stops after the chunks queued.
struct Writer {
    tx: Option<std::sync::mpsc::SyncSender<BytesMut>>,
    spare: std::sync::mpsc::Receiver<BytesMut>,
    done: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl Writer {
    fn start(file: std::fs::File) -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<BytesMut>(WRITE_QUEUE);
        let (give_back, spare) = std::sync::mpsc::sync_channel(WRITE_QUEUE + 1);
        let done = std::thread::Builder::new()
            .name("restore-writer".into())
            .spawn(move || write_loop(file, &rx, &give_back))?;
        Ok(Self {
            tx: Some(tx),
            spare,
            done: Some(done),
        })
    }

    /// An emptied buffer, if the writer has one to give back.
    fn spare(&self) -> Option<BytesMut> {
        self.spare.try_recv().ok()
    }

    /// Queues `chunk`; waits while the writer is [`WRITE_QUEUE`] chunks
    /// behind. Fails with the writer's error when it stopped.
    fn send(&mut self, chunk: BytesMut) -> std::io::Result<()> {
        if self.tx.as_ref().is_some_and(|tx| tx.send(chunk).is_ok()) {
            return Ok(());
        }
        Err(match self.join() {
            Err(e) => e,
            Ok(()) => std::io::Error::other("the writer stopped"),
        })
    }

    /// Waits until every chunk is written and the background syncs are
    /// done; the writer's error, if any.
    fn join(&mut self) -> std::io::Result<()> {
        self.tx = None;
        match self.done.take() {
            Some(done) => done
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("the writer panicked"))),
            None => Err(std::io::Error::other("the writer stopped")),
        }
    }
}

/// The writer thread: writes each chunk, asks for a background sync every
/// [`EARLY_SYNC_BYTES`], and waits for the syncs before it ends (a failed
/// sync fails the restore: it may have dropped data the final sync would
/// not see).
fn write_loop(
    mut file: std::fs::File,
    rx: &std::sync::mpsc::Receiver<BytesMut>,
    give_back: &std::sync::mpsc::SyncSender<BytesMut>,
) -> std::io::Result<()> {
    type Syncer = (
        std::sync::mpsc::SyncSender<()>,
        std::thread::JoinHandle<std::io::Result<()>>,
    );
    let mut syncer: Option<Syncer> = None;
    let mut unsynced = 0u64;
    let mut written = Ok(());
    for mut chunk in rx {
        if let Err(e) = file.write_all(&chunk) {
            written = Err(e);
            break;
        }
        unsynced += chunk.len() as u64;
        if unsynced >= EARLY_SYNC_BYTES {
            unsynced = 0;
            if syncer.is_none() {
                let second = file.try_clone()?;
                let (ask, asked) = std::sync::mpsc::sync_channel::<()>(1);
                let thread = std::thread::Builder::new()
                    .name("restore-sync".into())
                    .spawn(move || {
                        for () in asked {
                            second.sync_data()?;
                        }
                        Ok(())
                    })?;
                syncer = Some((ask, thread));
            }
            if let Some((ask, _)) = &syncer {
                // Full: a sync is already due and will cover these bytes.
                let _ = ask.try_send(());
            }
        }
        chunk.clear();
        // A full channel means the buffer is not wanted: drop it.
        let _ = give_back.try_send(chunk);
    }
    let synced = match syncer {
        Some((ask, thread)) => {
            drop(ask);
            thread
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("the sync thread panicked")))
        }
        None => Ok(()),
    };
    written.and(synced)
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::crypto::{encrypt_all, pkcs7_len};
    use protocol::FileName;

    fn parts(name: &str) -> Vec<String> {
        relative_path(name.as_bytes())
            .unwrap()
            .into_iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn accepts_plain_relative_names_split_on_both_separators() {
        assert_eq!(parts("a.txt"), ["a.txt"]);
        assert_eq!(parts("dir/sub\\f.bin"), ["dir", "sub", "f.bin"]);
        assert_eq!(parts("..a/b..c"), ["..a", "b..c"]);
        assert_eq!(parts("12:30.txt"), ["12:30.txt"]);
    }

    #[test]
    fn rejects_names_that_could_leave_the_folder() {
        for (name, why) in [
            ("", UnsafeName::Empty),
            ("/etc/passwd", UnsafeName::Absolute),
            ("\\x", UnsafeName::Absolute),
            ("C:\\x", UnsafeName::Drive),
            ("c:x", UnsafeName::Drive),
            ("../x", UnsafeName::DotComponent),
            ("a/../../b", UnsafeName::DotComponent),
            ("..\\..\\y", UnsafeName::DotComponent),
            ("./a", UnsafeName::DotComponent),
            ("a/", UnsafeName::EmptyComponent),
            ("a//b", UnsafeName::EmptyComponent),
            ("a\u{0}b", UnsafeName::Control),
            ("a\nb", UnsafeName::Control),
            ("a\u{7f}", UnsafeName::Control),
        ] {
            assert_eq!(relative_path(name.as_bytes()), Err(why), "{name:?}");
        }
    }

    #[cfg(unix)]
    #[test]
    fn refuses_a_symlinked_parent() {
        let top = tempfile::tempdir().unwrap();
        let root = top.path().join("root");
        let outside = top.path().join("outside");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
        let dest = Destination::inside(&root, b"link/f").unwrap();
        let err = dest.prepare("link/f", false).unwrap_err();
        assert!(err.to_string().contains("symbolic link"), "{err}");
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
    }

    #[test]
    fn temporary_names_are_recognisable_and_bounded() {
        let long = "x".repeat(254);
        let prefix = part_prefix(std::ffi::OsStr::new(&long));
        assert!(prefix.len() < 120);
        assert!(is_part_name(&format!("{prefix}abc123{PART_SUFFIX}")));
        assert!(!is_part_name("notes.part"));
        assert!(!is_part_name(".hidden"));
    }

    fn begin(plain: &[u8], cksum: u32) -> RestoreBegin {
        RestoreBegin {
            version: 1,
            size: plain.len() as u64,
            content_size: pkcs7_len(plain.len() as u64),
            cksum,
            iv: [0; 16],
            file: FileName::try_from("f").unwrap(),
        }
    }

    #[test]
    fn writes_only_a_verified_file_and_never_leaves_a_part() {
        let key = AesKey::from_bytes([4; 32]);
        let plain: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
        let ct = encrypt_all(&key, &plain);
        for (cksum, good) in [(Cksum::of(&plain), true), (Cksum::of(&plain) ^ 1, false)] {
            let dir = tempfile::tempdir().unwrap();
            let dest = Destination::inside(dir.path(), b"f").unwrap();
            let folder = dest.prepare("f", false).unwrap();
            let mut file =
                RestoreFile::create(&dest, &folder, begin(&plain, cksum), &key, false).unwrap();
            for chunk in ct.chunks(777) {
                file.feed(chunk).unwrap();
            }
            let result = file.finish();
            assert_eq!(result.is_ok(), good);
            let names: Vec<_> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            if good {
                assert_eq!(names, ["f"]);
                assert_eq!(std::fs::read(dir.path().join("f")).unwrap(), plain);
            } else {
                assert!(names.is_empty(), "{names:?}");
                assert_eq!(result.unwrap_err().exit_code(), 5);
            }
        }
    }

    #[test]
    fn writes_a_large_file_through_the_writer_thread_with_early_syncs() {
        let key = AesKey::from_bytes([5; 32]);
        let len = usize::try_from(PIPELINE_FROM + 3 * EARLY_SYNC_BYTES).unwrap() + 17;
        let plain: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let ct = encrypt_all(&key, &plain);
        for (cksum, good) in [(Cksum::of(&plain), true), (Cksum::of(&plain) ^ 1, false)] {
            let dir = tempfile::tempdir().unwrap();
            let dest = Destination::inside(dir.path(), b"f").unwrap();
            let folder = dest.prepare("f", false).unwrap();
            let mut file =
                RestoreFile::create(&dest, &folder, begin(&plain, cksum), &key, false).unwrap();
            assert!(file.writer.is_some());
            for chunk in ct.chunks(256 * 1024 + 48) {
                file.feed(chunk).unwrap();
            }
            let result = file.finish();
            assert_eq!(result.is_ok(), good);
            let names: Vec<_> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            if good {
                assert_eq!(names, ["f"]);
                assert!(std::fs::read(dir.path().join("f")).unwrap() == plain);
            } else {
                assert!(names.is_empty(), "{names:?}");
            }
        }
    }

    #[test]
    fn refuses_to_overwrite_unless_asked() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), b"mine").unwrap();
        let dest = Destination::inside(dir.path(), b"f").unwrap();
        assert!(matches!(
            dest.prepare("f", false),
            Err(Error::Exists { .. })
        ));
        let key = AesKey::from_bytes([4; 32]);
        let folder = dest.prepare("f", true).unwrap();
        let mut file =
            RestoreFile::create(&dest, &folder, begin(b"new", Cksum::of(b"new")), &key, true)
                .unwrap();
        file.feed(&encrypt_all(&key, b"new")).unwrap();
        file.finish().unwrap();
        assert_eq!(std::fs::read(dir.path().join("f")).unwrap(), b"new");
    }

    #[test]
    fn removes_stale_parts_once_per_folder() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(".f.restore-abc123.part"), b"x").unwrap();
        std::fs::write(dir.path().join("keep.part"), b"x").unwrap();
        let mut done = HashSet::new();
        assert_eq!(remove_stale_parts(dir.path(), &mut done), 1);
        std::fs::write(dir.path().join(".g.restore-abc123.part"), b"x").unwrap();
        assert_eq!(remove_stale_parts(dir.path(), &mut done), 0);
        assert!(dir.path().join("keep.part").exists());
    }
}
