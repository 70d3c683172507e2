//! Turning the paths a user names into the files to send and the names to
//! send them under.
//!
//! A file is sent under its own name (the last component of its path). A
//! directory is walked recursively, and each file in it is sent under its
//! path relative to that directory, with `/` separators. Symbolic links to
//! files are followed; links to directories are not (they could loop).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use protocol::FileName;

use crate::error::{io_reason, Error};

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

/// The outcome of [`collect`].
#[derive(Debug, Default)]
pub struct Collected {
    pub items: Vec<BackupItem>,
    /// Paths that cannot be backed up, each with its reason.
    pub errors: Vec<Error>,
    /// Entries skipped inside directories (links to directories, sockets...).
    pub skipped: Vec<PathBuf>,
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

/// Lists the files under `paths`, in order; the files of a directory are
/// sorted by the name they are sent under.
/// Problems with one path do not stop the others; they are returned in
/// [`Collected::errors`]. Two files that would be sent under the same name
/// are an error for the second.
pub fn collect(paths: &[PathBuf]) -> Collected {
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
            walk(path, &mut out);
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
fn walk(root: &Path, out: &mut Collected) {
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
            let Ok(link_meta) = std::fs::symlink_metadata(&path) else {
                out.skipped.push(path);
                continue;
            };
            let meta = if link_meta.file_type().is_symlink() {
                std::fs::metadata(&path).ok()
            } else {
                Some(link_meta.clone())
            };
            match meta {
                Some(m) if m.is_dir() && !link_meta.file_type().is_symlink() => subdirs.push(path),
                Some(m) if m.is_file() => {
                    let rel = path.strip_prefix(root).unwrap_or(&path);
                    let components: Vec<&std::ffi::OsStr> = rel.iter().collect();
                    match item(path.clone(), &components, m.len()) {
                        Ok(i) => out.items.push(i),
                        Err(e) => out.errors.push(e),
                    }
                }
                _ => out.skipped.push(path),
            }
        }
        // Reverse so that the stack pops them in sorted order.
        stack.extend(subdirs.into_iter().rev());
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

    #[cfg(unix)]
    #[test]
    fn follows_links_to_files_but_not_to_directories() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("r");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(dir.path().join("target.txt"), b"t").unwrap();
        std::os::unix::fs::symlink(dir.path().join("target.txt"), root.join("link.txt")).unwrap();
        std::os::unix::fs::symlink(&root, root.join("loop")).unwrap();
        let c = collect(std::slice::from_ref(&root));
        assert_eq!(names(&c), ["link.txt"]);
        assert_eq!(c.skipped, vec![root.join("loop")]);
    }
}
