//! What `backup` leaves out of the folders it walks: `--exclude`,
//! `--exclude-file`, `--iexclude`, `--exclude-caches`, `--one-file-system`
//! and the `.backupignore` file of each folder.
//!
//! Patterns have gitignore syntax, matched by the `ignore` crate's
//! gitignore matcher rather than by bare globs (`globset`), because that
//! syntax is what people already write: `*.log` matches a name at any
//! depth, `/build` only at the top of the folder backed up, `cache/` only
//! directories, `!keep.log` takes a file back, `**` crosses directories.
//! The patterns of the command line are matched against each path relative
//! to the `PATH` it was found under; those of a `.backupignore` against
//! the path relative to the folder holding that file, and they apply to
//! that folder and everything below it.
//!
//! Which rule decides, first match wins:
//! 1. an entry on another file system than its `PATH` (`--one-file-system`);
//! 2. the command line's patterns (`--exclude`, `--exclude-file`, then
//!    `--iexclude`): a match excludes, a `!` match includes;
//! 3. the `.backupignore` files, the deepest folder's first;
//! 4. a directory holding a valid `CACHEDIR.TAG` (`--exclude-caches`).
//!
//! The paths named on the command line (or in `--files-from`) are always
//! backed up: the rules apply to what is found inside directories. A
//! directory left out is not walked, so nothing below it can be taken back
//! (as with git).

use std::collections::HashMap;
use std::fs::Metadata;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use ignore::gitignore::{Gitignore, GitignoreBuilder};
use ignore::Match;

use crate::error::{io_reason, Error};

/// The per-folder file of exclusion patterns (gitignore syntax).
pub const IGNORE_FILE: &str = ".backupignore";

/// The file that marks a cache directory
/// (<https://bford.info/cachedir/>).
pub const CACHEDIR_TAG: &str = "CACHEDIR.TAG";

/// What a valid `CACHEDIR.TAG` starts with.
pub const CACHEDIR_SIGNATURE: &[u8] = b"Signature: 8a477f597d28d172789f06886806bc55";

/// The rules of one `backup` run, checked before anything is read or sent.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    /// Case-sensitive patterns: `--exclude`, then the lines of each
    /// `--exclude-file`.
    patterns: Vec<String>,
    /// Case-insensitive patterns (`--iexclude`).
    ipatterns: Vec<String>,
    exclude_caches: bool,
    one_file_system: bool,
}

/// Why an entry was left out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// A pattern of the command line.
    Pattern,
    /// A pattern of a `.backupignore`.
    IgnoreFile,
    /// A directory holding a valid `CACHEDIR.TAG`.
    Cache,
    /// On another file system than the `PATH` it was found under.
    OtherFileSystem,
}

impl Rules {
    /// The rules from the command line. `exclude_files` are read now, one
    /// pattern a line (blank lines and lines starting with `#` ignored).
    ///
    /// # Errors
    /// [`Error::ReadFile`] when an exclude file cannot be read,
    /// [`Error::Usage`] when a pattern is not a valid glob.
    pub fn new(
        exclude: &[String],
        exclude_files: &[PathBuf],
        iexclude: &[String],
        exclude_caches: bool,
        one_file_system: bool,
    ) -> Result<Self, Error> {
        let mut patterns = exclude.to_vec();
        for file in exclude_files {
            let text = std::fs::read_to_string(file).map_err(|e| Error::ReadFile {
                path: file.clone(),
                reason: io_reason(&e),
            })?;
            patterns.extend(
                text.lines()
                    .map(|l| l.trim_end_matches('\r'))
                    .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
                    .map(str::to_owned),
            );
        }
        let rules = Self {
            patterns,
            ipatterns: iexclude.to_vec(),
            exclude_caches,
            one_file_system,
        };
        // Every pattern is checked once here, so that a typo is a usage
        // error before connecting rather than a rule silently dropped.
        rules.matchers(Path::new("/"))?;
        Ok(rules)
    }

    /// Whether no rule but the `.backupignore` files applies.
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
            && self.ipatterns.is_empty()
            && !self.exclude_caches
            && !self.one_file_system
    }

    fn matchers(&self, root: &Path) -> Result<(Gitignore, Gitignore), Error> {
        let build = |patterns: &[String], fold: bool| {
            let mut b = GitignoreBuilder::new(root);
            b.case_insensitive(fold).map_err(pattern_error)?;
            for p in patterns {
                b.add_line(None, p).map_err(pattern_error)?;
            }
            b.build().map_err(pattern_error)
        };
        Ok((build(&self.patterns, false)?, build(&self.ipatterns, true)?))
    }

    /// The filter for what is found under `root`, a path named on the
    /// command line; `meta` is its metadata (followed, as the root is).
    pub fn for_root(&self, root: &Path, meta: &Metadata) -> Filter {
        // Checked in `new`: building again from the same patterns cannot
        // fail, but should it, nothing is excluded by pattern rather than
        // everything.
        let (global, iglobal) = self
            .matchers(root)
            .unwrap_or_else(|_| (Gitignore::empty(), Gitignore::empty()));
        Filter {
            root: root.to_owned(),
            device: self.one_file_system.then(|| meta.dev()),
            global,
            iglobal,
            exclude_caches: self.exclude_caches,
            local: HashMap::new(),
            excluded: 0,
        }
    }
}

fn pattern_error(e: ignore::Error) -> Error {
    Error::Usage {
        detail: format!("bad exclude pattern: {e}"),
    }
}

/// The exclusion rules as they apply under one `PATH`, with the
/// `.backupignore` files read so far.
#[derive(Debug)]
pub struct Filter {
    root: PathBuf,
    device: Option<u64>,
    global: Gitignore,
    iglobal: Gitignore,
    exclude_caches: bool,
    /// Each directory's `.backupignore`, once read (`None`: it has none).
    local: HashMap<PathBuf, Option<Gitignore>>,
    /// Entries left out so far.
    pub excluded: u64,
}

impl Filter {
    /// Why `path`, an entry found inside a directory under the root, is
    /// left out, or `None` when it is backed up. `meta` is its metadata,
    /// not followed. Counts what it excludes in [`Filter::excluded`].
    pub fn excludes(&mut self, path: &Path, meta: &Metadata) -> Option<Reason> {
        let why = self.decide(path, meta);
        if why.is_some() {
            self.excluded += 1;
        }
        why
    }

    fn decide(&mut self, path: &Path, meta: &Metadata) -> Option<Reason> {
        if self.device.is_some_and(|d| d != meta.dev()) {
            return Some(Reason::OtherFileSystem);
        }
        let is_dir = meta.is_dir();
        for m in [&self.global, &self.iglobal] {
            match m.matched(path, is_dir) {
                Match::Ignore(_) => return Some(Reason::Pattern),
                Match::Whitelist(_) => return None,
                Match::None => {}
            }
        }
        if self.ignored_by_files(path, is_dir) {
            return Some(Reason::IgnoreFile);
        }
        if is_dir && self.exclude_caches && is_cache_dir(path) {
            return Some(Reason::Cache);
        }
        None
    }

    /// What the `.backupignore` files of the directories from `path`'s
    /// parent up to the root say, the deepest first.
    fn ignored_by_files(&mut self, path: &Path, is_dir: bool) -> bool {
        let mut dir = path.parent();
        while let Some(d) = dir {
            if !d.starts_with(&self.root) {
                break;
            }
            let rules = self
                .local
                .entry(d.to_owned())
                .or_insert_with(|| read_ignore_file(d));
            if let Some(rules) = rules {
                match rules.matched(path, is_dir) {
                    Match::Ignore(_) => return true,
                    Match::Whitelist(_) => return false,
                    Match::None => {}
                }
            }
            if d == self.root {
                break;
            }
            dir = d.parent();
        }
        false
    }
}

/// The rules of `dir`'s `.backupignore`, if it has one. A line that is not
/// a valid pattern is reported and the others still apply.
fn read_ignore_file(dir: &Path) -> Option<Gitignore> {
    let file = dir.join(IGNORE_FILE);
    if !std::fs::symlink_metadata(&file).is_ok_and(|m| m.is_file()) {
        return None;
    }
    let mut b = GitignoreBuilder::new(dir);
    if let Some(e) = b.add(&file) {
        tracing::warn!(file = %file.display(), error = %e, "part of an ignore file was not understood");
    }
    match b.build() {
        Ok(g) => Some(g),
        Err(e) => {
            tracing::warn!(file = %file.display(), error = %e, "ignore file not applied");
            None
        }
    }
}

/// Whether `dir` holds a `CACHEDIR.TAG` that starts with the signature.
pub fn is_cache_dir(dir: &Path) -> bool {
    let Ok(file) = std::fs::File::open(dir.join(CACHEDIR_TAG)) else {
        return false;
    };
    let mut head = Vec::with_capacity(CACHEDIR_SIGNATURE.len());
    file.take(CACHEDIR_SIGNATURE.len() as u64)
        .read_to_end(&mut head)
        .is_ok_and(|_| head == CACHEDIR_SIGNATURE)
}

/// The paths listed in a `--files-from` file: one a line, relative ones
/// taken from `cwd`; blank lines and lines starting with `#` are ignored.
///
/// # Errors
/// [`Error::ReadFile`] when the file cannot be read.
pub fn files_from(file: &Path, cwd: &Path) -> Result<Vec<PathBuf>, Error> {
    let text = std::fs::read_to_string(file).map_err(|e| Error::ReadFile {
        path: file.to_owned(),
        reason: io_reason(&e),
    })?;
    Ok(text
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| cwd.join(l))
        .collect())
}

/// One file a dry run would back up.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Listed {
    pub path: PathBuf,
    pub size: u64,
}

/// What a snapshot of some paths would hold, found without reading a file
/// or contacting the server.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Preview {
    pub files: Vec<Listed>,
    pub dirs: u64,
    pub links: u64,
    /// Bytes of the files.
    pub bytes: u64,
    /// Entries left out by the rules.
    pub excluded: u64,
    /// Entries that could not be looked at, or are not files, directories
    /// or links, with why.
    pub skipped: Vec<(String, String)>,
}

/// Walks `roots` as a snapshot would, with `rules`, and lists its files.
pub fn preview(roots: &[PathBuf], rules: &Rules) -> Preview {
    let mut out = Preview::default();
    for root in roots {
        let meta = match std::fs::metadata(root) {
            Ok(m) => m,
            Err(e) => {
                out.skipped
                    .push((root.display().to_string(), io_reason(&e)));
                continue;
            }
        };
        let mut filter = rules.for_root(root, &meta);
        visit(root, &meta, &mut filter, &mut out);
        out.excluded += filter.excluded;
    }
    out
}

fn visit(root: &Path, meta: &Metadata, filter: &mut Filter, out: &mut Preview) {
    let mut stack = vec![(root.to_owned(), meta.clone())];
    while let Some((path, meta)) = stack.pop() {
        if meta.is_file() {
            out.bytes += meta.len();
            out.files.push(Listed {
                path,
                size: meta.len(),
            });
            continue;
        }
        if meta.file_type().is_symlink() {
            out.links += 1;
            continue;
        }
        if !meta.is_dir() {
            out.skipped.push((
                path.display().to_string(),
                "not a regular file, directory or symbolic link".into(),
            ));
            continue;
        }
        out.dirs += 1;
        let mut children = match std::fs::read_dir(&path) {
            Ok(r) => r
                .filter_map(Result::ok)
                .map(|e| e.path())
                .collect::<Vec<_>>(),
            Err(e) => {
                out.skipped
                    .push((path.display().to_string(), io_reason(&e)));
                continue;
            }
        };
        children.sort();
        for child in children.into_iter().rev() {
            match std::fs::symlink_metadata(&child) {
                Ok(m) => {
                    if filter.excludes(&child, &m).is_none() {
                        stack.push((child, m));
                    }
                }
                Err(e) => out
                    .skipped
                    .push((child.display().to_string(), io_reason(&e))),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(exclude: &[&str], iexclude: &[&str]) -> Rules {
        let s = |v: &[&str]| v.iter().map(|p| (*p).to_owned()).collect::<Vec<_>>();
        Rules::new(&s(exclude), &[], &s(iexclude), false, false).unwrap()
    }

    /// A folder `r` with files at two depths and a subfolder `build`.
    fn folder() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("r");
        for f in [
            "a.txt",
            "a.log",
            "KEEP.LOG",
            "sub/b.txt",
            "sub/b.log",
            "sub/deep/c.txt",
            "build/out.o",
            "sub/build/x.o",
        ] {
            let p = root.join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, f).unwrap();
        }
        (dir, root)
    }

    fn kept(root: &Path, rules: &Rules) -> Vec<String> {
        let p = preview(&[root.to_owned()], rules);
        let mut names: Vec<String> = p
            .files
            .iter()
            .map(|f| {
                f.path
                    .strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        names.sort();
        names
    }

    #[test]
    fn excludes_by_gitignore_patterns_relative_to_the_path_given() {
        let (_d, root) = folder();
        assert_eq!(
            kept(&root, &rules(&["*.log", "/build"], &[])),
            [
                "KEEP.LOG",
                "a.txt",
                "sub/b.txt",
                "sub/build/x.o",
                "sub/deep/c.txt"
            ]
        );
        assert_eq!(
            kept(&root, &rules(&["build/", "sub/deep"], &[])),
            ["KEEP.LOG", "a.log", "a.txt", "sub/b.log", "sub/b.txt"]
        );
    }

    #[test]
    fn a_negated_pattern_takes_a_file_back() {
        let (_d, root) = folder();
        assert_eq!(
            kept(&root, &rules(&["*.log", "!sub/b.log", "build", "sub"], &[])),
            ["KEEP.LOG", "a.txt"],
            "sub is excluded as a whole: nothing below it comes back"
        );
        assert_eq!(
            kept(&root, &rules(&["*.log", "!b.log", "build"], &[])),
            [
                "KEEP.LOG",
                "a.txt",
                "sub/b.log",
                "sub/b.txt",
                "sub/deep/c.txt"
            ]
        );
    }

    #[test]
    fn iexclude_ignores_case_and_exclude_does_not() {
        let (_d, root) = folder();
        let cs = kept(&root, &rules(&["*.log"], &[]));
        assert!(cs.contains(&"KEEP.LOG".to_owned()), "{cs:?}");
        let ci = kept(&root, &rules(&[], &["*.LOG", "BUILD"]));
        assert_eq!(ci, ["a.txt", "sub/b.txt", "sub/deep/c.txt"]);
    }

    #[test]
    fn a_backupignore_applies_to_its_folder_and_below_only() {
        let (_d, root) = folder();
        std::fs::write(root.join("sub").join(IGNORE_FILE), "*.txt\n# note\n").unwrap();
        let none = Rules::default();
        assert_eq!(
            kept(&root, &none),
            [
                "KEEP.LOG",
                "a.log",
                "a.txt",
                "build/out.o",
                "sub/.backupignore",
                "sub/b.log",
                "sub/build/x.o",
            ]
        );
        // A deeper file takes back what a shallower one left out.
        std::fs::write(root.join("sub/deep").join(IGNORE_FILE), "!c.txt\n").unwrap();
        assert!(kept(&root, &none).contains(&"sub/deep/c.txt".to_owned()));
        // An `!` on the command line wins over the file.
        let back = rules(&["!b.txt"], &[]);
        assert!(kept(&root, &back).contains(&"sub/b.txt".to_owned()));
    }

    #[test]
    fn exclude_caches_needs_the_exact_signature() {
        let (_d, root) = folder();
        std::fs::write(
            root.join("build").join(CACHEDIR_TAG),
            b"Signature: 8a477f597d28d172789f06886806bc55\n# a cache\n",
        )
        .unwrap();
        std::fs::write(
            root.join("sub/build").join(CACHEDIR_TAG),
            b"Signature: 8a477f597d28d172789f06886806bc56\n",
        )
        .unwrap();
        assert!(is_cache_dir(&root.join("build")));
        assert!(!is_cache_dir(&root.join("sub/build")));
        assert!(!is_cache_dir(&root.join("sub")));
        let r = Rules::new(&[], &[], &[], true, false).unwrap();
        let k = kept(&root, &r);
        assert!(!k.iter().any(|f| f.starts_with("build/")), "{k:?}");
        assert!(k.contains(&"sub/build/x.o".to_owned()), "{k:?}");
        assert!(k.contains(&"sub/build/CACHEDIR.TAG".to_owned()), "{k:?}");
        let p = preview(std::slice::from_ref(&root), &r);
        assert_eq!(p.excluded, 1);
        let all = kept(&root, &Rules::default());
        assert!(all.contains(&"build/out.o".to_owned()));
    }

    #[test]
    fn reads_exclude_files_and_rejects_bad_patterns_and_missing_files() {
        let (d, root) = folder();
        let list = d.path().join("excludes");
        std::fs::write(&list, "# logs\n*.log\n\nbuild/\r\n").unwrap();
        let r = Rules::new(&[], &[list], &[], false, false).unwrap();
        assert_eq!(
            kept(&root, &r),
            ["KEEP.LOG", "a.txt", "sub/b.txt", "sub/deep/c.txt"]
        );
        let missing = Rules::new(&[], &[d.path().join("nope")], &[], false, false);
        assert!(matches!(missing, Err(Error::ReadFile { .. })));
        let bad = Rules::new(&["[z-a]".into()], &[], &[], false, false);
        assert!(matches!(bad, Err(Error::Usage { .. })), "{bad:?}");
        let bad = Rules::new(&[], &[], &["{x".into()], false, false);
        assert!(matches!(bad, Err(Error::Usage { .. })), "{bad:?}");
    }

    #[test]
    fn one_file_system_keeps_what_is_on_the_root_device() {
        let (_d, root) = folder();
        let r = Rules::new(&[], &[], &[], false, true).unwrap();
        let meta = std::fs::metadata(&root).unwrap();
        let mut f = r.for_root(&root, &meta);
        let child = root.join("a.txt");
        let m = std::fs::symlink_metadata(&child).unwrap();
        assert_eq!(f.excludes(&child, &m), None);
        // /proc is another file system than a temporary folder wherever
        // both exist; elsewhere the check cannot be made.
        if let Ok(proc_meta) = std::fs::symlink_metadata("/proc/self") {
            if proc_meta.dev() != meta.dev() {
                assert_eq!(
                    f.excludes(Path::new("/proc/self"), &proc_meta),
                    Some(Reason::OtherFileSystem)
                );
                assert_eq!(f.excluded, 1);
            }
        }
        let off = Rules::default().for_root(&root, &meta).excludes(
            Path::new("/proc/self"),
            &std::fs::symlink_metadata("/proc/self").unwrap_or(m),
        );
        assert_eq!(off, None);
    }

    #[test]
    fn files_from_skips_comments_and_blank_lines() {
        let d = tempfile::tempdir().unwrap();
        let list = d.path().join("list");
        std::fs::write(&list, "a.txt\n\n# not this\n/abs/b\r\n").unwrap();
        assert_eq!(
            files_from(&list, Path::new("/cwd")).unwrap(),
            [PathBuf::from("/cwd/a.txt"), PathBuf::from("/abs/b")]
        );
        assert!(files_from(&d.path().join("none"), d.path()).is_err());
    }
}
