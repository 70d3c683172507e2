//! Turning the paths a user names into the files to send and the names to
//! send them under.
//!
//! A file is sent under its own name (the last component of its path). A
//! directory is walked recursively, and each file in it is sent under its
//! path relative to that directory, with `/` separators.
//!
//! Symbolic links: the protocol stores file contents only, so a link cannot
//! be stored as a link. A path named by the user (on the command line, or a
//! line of transfer.info) is followed, whatever it points to, as `find -H`
//! and `cp -H` do: the user chose it. A link found inside a folder was not
//! chosen and may point anywhere outside it, so it is skipped and reported
//! ([`Skipped`]); with [`Links::FollowToFiles`] (`--follow-symlinks`) a link
//! to a regular file is followed and the file is sent under the link's
//! name. A link to a directory inside a folder is never followed (it could
//! loop, or pull in a whole other tree).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use protocol::FileName;

use crate::error::{io_reason, Error};
use crate::exclude::{Filter, Rules};

/// One file to back up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupItem {
    /// Where to read it.
    pub path: PathBuf,
    /// The name the server stores it under.
    pub name: FileName,
    /// Its size when it was listed.
    pub size: u64,
}

/// What to do with symbolic links found inside a folder being walked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Links {
    /// Skip every link (the default).
    #[default]
    Skip,
    /// Follow links to regular files (`--follow-symlinks`); links to
    /// directories are still skipped.
    FollowToFiles,
}

/// Why an entry inside a folder was not backed up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// A symbolic link to a regular file, and links are not followed.
    LinkToFile,
    /// A symbolic link to a directory: never followed.
    LinkToDirectory,
    /// A symbolic link to nothing (or to something that cannot be read), or
    /// to something neither a file nor a directory.
    OtherLink,
    /// Neither a regular file, a directory nor a link (socket, FIFO,
    /// device), or it vanished while the folder was listed.
    NotAFile,
}

impl SkipReason {
    /// Whether the entry is a symbolic link.
    pub fn is_link(self) -> bool {
        !matches!(self, SkipReason::NotAFile)
    }

    /// A stable machine-readable name (used in `--json` output).
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::LinkToFile => "symlink_to_file",
            SkipReason::LinkToDirectory => "symlink_to_directory",
            SkipReason::OtherLink => "symlink_other",
            SkipReason::NotAFile => "not_a_file",
        }
    }

    /// What a person is told about the entry.
    pub fn describe(self) -> &'static str {
        match self {
            SkipReason::LinkToFile => {
                "a symbolic link, not followed (pass --follow-symlinks to back up the file it points to under the link's name)"
            }
            SkipReason::LinkToDirectory => {
                "a symbolic link to a directory, never followed inside a folder (name the directory itself to back it up)"
            }
            SkipReason::OtherLink => {
                "a symbolic link to nothing that can be backed up (missing, unreadable, or not a regular file)"
            }
            SkipReason::NotAFile => "not a regular file or directory",
        }
    }
}

/// An entry inside a folder that was not backed up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub path: PathBuf,
    pub reason: SkipReason,
}

/// The outcome of [`collect`].
#[derive(Debug, Default)]
pub struct Collected {
    pub items: Vec<BackupItem>,
    /// Paths that cannot be backed up, each with its reason.
    pub errors: Vec<Error>,
    /// Entries skipped inside directories (symbolic links, sockets...).
    pub skipped: Vec<Skipped>,
    /// Entries left out by the exclusion rules.
    pub excluded: u64,
}

fn name_bytes(components: &[&std::ffi::OsStr]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, c) in components.iter().enumerate() {
        if i > 0 {
            out.push(b'/');
        }
        #[cfg(unix)]
        out.extend_from_slice(std::os::unix::ffi::OsStrExt::as_bytes(*c));
        #[cfg(not(unix))]
        out.extend_from_slice(c.to_string_lossy().as_bytes());
    }
    out
}

fn item(path: PathBuf, components: &[&std::ffi::OsStr], size: u64) -> Result<BackupItem, Error> {
    let bytes = name_bytes(components);
    let name = FileName::new(bytes.clone()).map_err(|e| Error::BadFileName {
        path: path.clone(),
        name: String::from_utf8_lossy(&bytes).into_owned(),
        reason: e.to_string(),
    })?;
    Ok(BackupItem { path, name, size })
}

/// Lists the files under `paths` as [`collect_with`] does, skipping every
/// symbolic link found inside a folder.
pub fn collect(paths: &[PathBuf]) -> Collected {
    collect_with(paths, Links::Skip)
}

/// Lists the files under `paths`, in order; the files of a directory are
/// sorted by the name they are sent under. The paths themselves are
/// followed if they are symbolic links; links inside directories are
/// treated as `links` says (see the module documentation).
/// Problems with one path do not stop the others; they are returned in
/// [`Collected::errors`]. Two files that would be sent under the same name
/// are an error for the second.
pub fn collect_with(paths: &[PathBuf], links: Links) -> Collected {
    collect_filtered(paths, links, &Rules::default())
}

/// Lists the files under `paths` as [`collect_with`] does, leaving out of
/// the directories walked what `rules` (and the `.backupignore` files)
/// exclude; the paths themselves are always listed
/// ([`crate::exclude`]).
pub fn collect_filtered(paths: &[PathBuf], links: Links, rules: &Rules) -> Collected {
    let mut out = Collected::default();
    for path in paths {
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) => {
                out.errors.push(Error::ReadFile {
                    path: path.clone(),
                    reason: io_reason(&e),
                });
                continue;
            }
        };
        if meta.is_file() {
            let Some(file_name) = path.file_name() else {
                out.errors.push(Error::NotAFile { path: path.clone() });
                continue;
            };
            match item(path.clone(), &[file_name], meta.len()) {
                Ok(i) => out.items.push(i),
                Err(e) => out.errors.push(e),
            }
        } else if meta.is_dir() {
            let before = out.items.len();
            let mut filter = rules.for_root(path, &meta);
            walk(path, links, &mut filter, &mut out);
            out.excluded += filter.excluded;
            if let Some(found) = out.items.get_mut(before..) {
                found.sort_by(|a, b| a.name.cmp(&b.name));
            }
            if out.items.len() == before {
                out.errors
                    .push(Error::NothingToBackUp { path: path.clone() });
            }
        } else {
            out.errors.push(Error::NotAFile { path: path.clone() });
        }
    }
    let mut seen: HashMap<FileName, PathBuf> = HashMap::new();
    let mut items = Vec::with_capacity(out.items.len());
    for i in std::mem::take(&mut out.items) {
        match seen.get(&i.name) {
            Some(first) => out.errors.push(Error::DuplicateName {
                path: i.path.clone(),
                name: i.name.to_string_lossy(),
                first: first.clone(),
            }),
            None => {
                seen.insert(i.name.clone(), i.path.clone());
                items.push(i);
            }
        }
    }
    out.items = items;
    out
}

/// Walks `root` depth first without recursion (so depth cannot exhaust the
/// stack), appending its files with names relative to `root`.
fn walk(root: &Path, links: Links, filter: &mut Filter, out: &mut Collected) {
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(rd) => rd
                .filter_map(Result::ok)
                .map(|e| e.path())
                .collect::<Vec<_>>(),
            Err(e) => {
                out.errors.push(Error::ReadFile {
                    path: dir.clone(),
                    reason: io_reason(&e),
                });
                continue;
            }
        };
        let mut entries = entries;
        entries.sort();
        let mut subdirs = Vec::new();
        for path in entries {
            if let Ok(meta) = std::fs::symlink_metadata(&path) {
                if filter.excludes(&path, &meta).is_some() {
                    continue;
                }
            }
            let file = match classify(&path, links) {
                Entry::Directory => {
                    subdirs.push(path);
                    continue;
                }
                Entry::File(size) => size,
                Entry::Skip(reason) => {
                    out.skipped.push(Skipped { path, reason });
                    continue;
                }
            };
            let rel = path.strip_prefix(root).unwrap_or(&path);
            let components: Vec<&std::ffi::OsStr> = rel.iter().collect();
            match item(path.clone(), &components, file) {
                Ok(i) => out.items.push(i),
                Err(e) => out.errors.push(e),
            }
        }
        // Reverse so that the stack pops them in sorted order.
        stack.extend(subdirs.into_iter().rev());
    }
}

/// What an entry inside a folder is, for the walk.
enum Entry {
    Directory,
    /// A regular file (or, when followed, a link to one) of this size.
    File(u64),
    Skip(SkipReason),
}

/// Looks at `path` without following it, and follows it only if it is a
/// link and `links` allows.
fn classify(path: &Path, links: Links) -> Entry {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Entry::Skip(SkipReason::NotAFile);
    };
    let kind = meta.file_type();
    if kind.is_dir() {
        return Entry::Directory;
    }
    if kind.is_file() {
        return Entry::File(meta.len());
    }
    if !kind.is_symlink() {
        return Entry::Skip(SkipReason::NotAFile);
    }
    match std::fs::metadata(path) {
        Ok(target) if target.is_dir() => Entry::Skip(SkipReason::LinkToDirectory),
        Ok(target) if target.is_file() => match links {
            Links::FollowToFiles => Entry::File(target.len()),
            Links::Skip => Entry::Skip(SkipReason::LinkToFile),
        },
        _ => Entry::Skip(SkipReason::OtherLink),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(c: &Collected) -> Vec<String> {
        c.items.iter().map(|i| i.name.to_string()).collect()
    }

    #[test]
    fn names_directory_files_relative_to_the_directory_given() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("photos");
        std::fs::create_dir_all(root.join("2024/summer")).unwrap();
        std::fs::create_dir_all(root.join("empty")).unwrap();
        std::fs::write(root.join("a.jpg"), b"a").unwrap();
        std::fs::write(root.join("2024/b.jpg"), b"bb").unwrap();
        std::fs::write(root.join("2024/summer/c.jpg"), b"ccc").unwrap();
        let single = dir.path().join("single.txt");
        std::fs::write(&single, b"1234").unwrap();
        let c = collect(&[root.clone(), single]);
        assert!(c.errors.is_empty(), "{:?}", c.errors);
        assert_eq!(
            names(&c),
            ["2024/b.jpg", "2024/summer/c.jpg", "a.jpg", "single.txt"]
        );
        assert_eq!(
            c.items.iter().map(|i| i.size).collect::<Vec<_>>(),
            [2, 3, 1, 4]
        );
        assert_eq!(c.items[1].path, root.join("2024/summer/c.jpg"));
    }

    #[test]
    fn rejects_missing_paths_empty_directories_and_duplicate_names() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("x")).unwrap();
        std::fs::create_dir_all(dir.path().join("y")).unwrap();
        std::fs::create_dir_all(dir.path().join("empty")).unwrap();
        std::fs::write(dir.path().join("x/same.txt"), b"1").unwrap();
        std::fs::write(dir.path().join("y/same.txt"), b"2").unwrap();
        let c = collect(&[
            dir.path().join("x/same.txt"),
            dir.path().join("y/same.txt"),
            dir.path().join("missing"),
            dir.path().join("empty"),
        ]);
        assert_eq!(names(&c), ["same.txt"]);
        assert_eq!(c.errors.len(), 3);
        assert!(c
            .errors
            .iter()
            .any(|e| matches!(e, Error::DuplicateName { .. })));
        assert!(c.errors.iter().any(|e| matches!(e, Error::ReadFile { .. })));
        assert!(c
            .errors
            .iter()
            .any(|e| matches!(e, Error::NothingToBackUp { .. })));
        assert!(c.errors.iter().all(|e| e.exit_code() == 6));
    }

    /// A folder `r` holding a file, a link to a file outside it, a link to
    /// a directory outside it, a link to `r` itself and a dangling link.
    #[cfg(unix)]
    fn folder_with_links() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("r");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/own.txt"), b"own").unwrap();
        std::fs::write(dir.path().join("outside.txt"), b"outside").unwrap();
        std::fs::create_dir(dir.path().join("elsewhere")).unwrap();
        std::fs::write(dir.path().join("elsewhere/secret"), b"s").unwrap();
        let link = |target: &Path, at: &str| std::os::unix::fs::symlink(target, root.join(at));
        link(&dir.path().join("outside.txt"), "link.txt").unwrap();
        link(&dir.path().join("elsewhere"), "dirlink").unwrap();
        link(&root, "loop").unwrap();
        link(&dir.path().join("gone"), "dangling").unwrap();
        (dir, root)
    }

    #[cfg(unix)]
    fn skipped(c: &Collected) -> Vec<(String, SkipReason)> {
        c.skipped
            .iter()
            .map(|s| {
                let name = s.path.file_name().unwrap().to_string_lossy().into_owned();
                (name, s.reason)
            })
            .collect()
    }

    #[cfg(unix)]
    #[test]
    fn skips_every_link_inside_a_folder_by_default() {
        let (_dir, root) = folder_with_links();
        let c = collect(std::slice::from_ref(&root));
        assert!(c.errors.is_empty(), "{:?}", c.errors);
        assert_eq!(names(&c), ["sub/own.txt"]);
        assert_eq!(
            skipped(&c),
            [
                ("dangling".to_owned(), SkipReason::OtherLink),
                ("dirlink".to_owned(), SkipReason::LinkToDirectory),
                ("link.txt".to_owned(), SkipReason::LinkToFile),
                ("loop".to_owned(), SkipReason::LinkToDirectory),
            ]
        );
        assert!(c.skipped.iter().all(|s| s.reason.is_link()));
    }

    #[cfg(unix)]
    #[test]
    fn follows_links_to_files_but_never_to_directories_when_asked() {
        let (dir, root) = folder_with_links();
        let c = collect_with(std::slice::from_ref(&root), Links::FollowToFiles);
        assert!(c.errors.is_empty(), "{:?}", c.errors);
        assert_eq!(names(&c), ["link.txt", "sub/own.txt"]);
        assert_eq!(c.items[0].path, root.join("link.txt"));
        assert_eq!(c.items[0].size, 7, "the size of the file linked to");
        assert_ne!(c.items[0].path, dir.path().join("outside.txt"));
        assert_eq!(
            skipped(&c),
            [
                ("dangling".to_owned(), SkipReason::OtherLink),
                ("dirlink".to_owned(), SkipReason::LinkToDirectory),
                ("loop".to_owned(), SkipReason::LinkToDirectory),
            ]
        );
    }

    #[cfg(unix)]
    #[test]
    fn follows_links_named_as_paths() {
        let (dir, root) = folder_with_links();
        let file_link = dir.path().join("named.txt");
        std::os::unix::fs::symlink(dir.path().join("outside.txt"), &file_link).unwrap();
        let dir_link = dir.path().join("named-dir");
        std::os::unix::fs::symlink(dir.path().join("elsewhere"), &dir_link).unwrap();
        let c = collect(&[file_link.clone(), dir_link, root.join("dangling")]);
        assert_eq!(names(&c), ["named.txt", "secret"]);
        assert_eq!(c.items[0].path, file_link);
        assert_eq!(c.errors.len(), 1, "{:?}", c.errors);
        assert!(
            matches!(c.errors[0], Error::ReadFile { .. }),
            "{:?}",
            c.errors
        );
        assert!(c.skipped.is_empty(), "{:?}", c.skipped);
    }
}
