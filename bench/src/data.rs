//! The data sets: random (incompressible) files, made here, and their
//! digests for checking what comes back.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rand::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};

/// Bytes generated and hashed at a time.
const CHUNK: usize = 8 * 1024 * 1024;

pub type Sha = [u8; 32];

/// Writes `size` random bytes to `path` and returns their SHA-256.
///
/// # Errors
/// When the file cannot be written.
pub fn random_file(path: &Path, size: u64, seed: u64) -> Result<Sha> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut buf = vec![0u8; CHUNK];
    let mut sha = Sha256::new();
    let mut left = size;
    while left > 0 {
        let n = usize::try_from(left).unwrap_or(CHUNK).min(CHUNK);
        let part = buf.get_mut(..n).unwrap_or_default();
        rng.fill_bytes(part);
        sha.update(&*part);
        file.write_all(part)?;
        left -= n as u64;
    }
    file.sync_all()?;
    Ok(sha.finalize().into())
}

/// `files` random files of `size` bytes spread over `folders` folders
/// under `dir` (`dNN/fNNNNN`).
///
/// # Errors
/// When a file cannot be written.
pub fn small_tree(dir: &Path, files: u64, folders: u64, size: usize, seed: u64) -> Result<()> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut buf = vec![0u8; size];
    let folders = folders.max(1);
    for f in 0..folders {
        fs::create_dir_all(dir.join(format!("d{f:03}")))?;
    }
    for i in 0..files {
        rng.fill_bytes(&mut buf);
        let path = dir
            .join(format!("d{:03}", i % folders))
            .join(format!("f{i:05}"));
        fs::write(&path, &buf).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// SHA-256 of a file.
///
/// # Errors
/// When it cannot be read.
pub fn digest_file(path: &Path) -> Result<Sha> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut buf = vec![0u8; CHUNK];
    let mut sha = Sha256::new();
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        sha.update(buf.get(..n).unwrap_or_default());
    }
    Ok(sha.finalize().into())
}

/// Every regular file under `dir`, by path relative to it, with its digest.
///
/// # Errors
/// When the tree cannot be read.
pub fn digest_tree(dir: &Path) -> Result<BTreeMap<PathBuf, Sha>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).with_context(|| format!("listing {}", d.display()))? {
            let path = entry?.path();
            let meta = fs::symlink_metadata(&path)?;
            if meta.is_dir() {
                stack.push(path);
            } else if meta.is_file() {
                let rel = path.strip_prefix(dir)?.to_owned();
                out.insert(rel, digest_file(&path)?);
            }
        }
    }
    Ok(out)
}

/// Finds `name` (a file or folder) anywhere under `root`, breadth first:
/// tools restore into layouts of their own (the source's absolute path, or
/// its last component).
pub fn find_named(root: &Path, name: &std::ffi::OsStr) -> Option<PathBuf> {
    let mut queue = std::collections::VecDeque::from([root.to_owned()]);
    while let Some(d) = queue.pop_front() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        let mut dirs = Vec::new();
        for e in entries.flatten() {
            let path = e.path();
            if e.file_name() == name {
                return Some(path);
            }
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                dirs.push(path);
            }
        }
        dirs.sort();
        queue.extend(dirs);
    }
    None
}

/// Checks that what a tool restored under `root` is the source `src` (a
/// file with digest `file_sha`, or a folder with digests `tree`).
///
/// # Errors
/// When it is missing or differs.
pub fn verify(root: &Path, src: &Path, expected: &Expected) -> Result<()> {
    let name = src.file_name().context("source without a name")?;
    let Some(found) = find_named(root, name) else {
        bail!(
            "{} not found under {}",
            name.to_string_lossy(),
            root.display()
        );
    };
    match expected {
        Expected::File(sha) => {
            if digest_file(&found)? != *sha {
                bail!("{} differs from the source", found.display());
            }
        }
        Expected::Tree(tree) => {
            let got = digest_tree(&found)?;
            if got != *tree {
                let missing = tree.keys().filter(|k| !got.contains_key(*k)).count();
                bail!(
                    "{} differs from the source: {} files restored, {} expected, {missing} missing",
                    found.display(),
                    got.len(),
                    tree.len()
                );
            }
        }
    }
    Ok(())
}

/// Bytes overwritten in the middle of the large file by [`Change`].
pub const CHANGE: usize = 1 << 20;

/// [`CHANGE`] bytes overwritten in the middle of a file, and what was
/// there, so that the file can be put back for the next tool.
pub struct Change {
    path: PathBuf,
    offset: u64,
    original: Vec<u8>,
    /// SHA-256 of the changed file.
    pub changed: Sha,
}

impl Change {
    /// Overwrites [`CHANGE`] bytes (random, from `seed`) in the middle of
    /// `path`, in place (same size, same inode, new mtime).
    ///
    /// # Errors
    /// When the file cannot be read or written.
    pub fn apply(path: &Path, seed: u64) -> Result<Self> {
        let size = fs::metadata(path)?.len();
        let len = usize::try_from(size).unwrap_or(CHANGE).min(CHANGE);
        let offset = (size / 2).saturating_sub(len as u64 / 2);
        let mut original = vec![0u8; len];
        let mut file = File::options().read(true).write(true).open(path)?;
        file.seek(SeekFrom::Start(offset))?;
        file.read_exact(&mut original)?;
        let mut fresh = vec![0u8; len];
        rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut fresh);
        file.seek(SeekFrom::Start(offset))?;
        file.write_all(&fresh)?;
        file.sync_all()?;
        drop(file);
        Ok(Self {
            path: path.to_owned(),
            offset,
            original,
            changed: digest_file(path)?,
        })
    }

    /// Puts the original bytes back.
    ///
    /// # Errors
    /// When the file cannot be written.
    pub fn revert(self) -> Result<()> {
        let mut file = File::options().write(true).open(&self.path)?;
        file.seek(SeekFrom::Start(self.offset))?;
        file.write_all(&self.original)?;
        file.sync_all()?;
        Ok(())
    }
}

/// Bytes of every regular file under `dir` (a server's data directory, a
/// repository).
///
/// # Errors
/// When the tree cannot be read.
pub fn bytes_under(dir: &Path) -> Result<u64> {
    let mut bytes = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).with_context(|| format!("listing {}", d.display()))? {
            let entry = entry?;
            let meta = fs::symlink_metadata(entry.path())?;
            if meta.is_dir() {
                stack.push(entry.path());
            } else if meta.is_file() {
                bytes += meta.len();
            }
        }
    }
    Ok(bytes)
}

/// What a restore must give back.
pub enum Expected {
    File(Sha),
    Tree(BTreeMap<PathBuf, Sha>),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifies_a_restored_tree_wherever_a_tool_puts_it() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("small");
        small_tree(&src, 20, 3, 100, 1).unwrap();
        let tree = digest_tree(&src).unwrap();
        assert_eq!(tree.len(), 20);
        let restored = dir.path().join("r/some/prefix/small");
        fs::create_dir_all(restored.parent().unwrap()).unwrap();
        copy_tree(&src, &restored);
        let expected = Expected::Tree(tree);
        verify(&dir.path().join("r"), &src, &expected).unwrap();
        fs::write(restored.join("d001/f00001"), b"changed").unwrap();
        assert!(verify(&dir.path().join("r"), &src, &expected).is_err());
    }

    #[test]
    fn random_file_digest_matches_its_content() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let sha = random_file(&p, 3 * 1024 * 1024 + 5, 9).unwrap();
        assert_eq!(fs::metadata(&p).unwrap().len(), 3 * 1024 * 1024 + 5);
        assert_eq!(digest_file(&p).unwrap(), sha);
        let other = dir.path().join("g");
        assert_ne!(
            random_file(&other, 64, 10).unwrap(),
            digest_file(&p).unwrap()
        );
    }

    #[test]
    fn a_change_is_one_mib_in_the_middle_and_reverts() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let size = 4 * CHANGE as u64 + 3;
        let sha = random_file(&p, size, 1).unwrap();
        let before = fs::read(&p).unwrap();
        let change = Change::apply(&p, 2).unwrap();
        let after = fs::read(&p).unwrap();
        assert_eq!(after.len(), before.len());
        assert_eq!(digest_file(&p).unwrap(), change.changed);
        let differ: Vec<usize> = (0..before.len())
            .filter(|&i| before[i] != after[i])
            .collect();
        let (first, last) = (differ[0], differ[differ.len() - 1]);
        assert!(last - first < CHANGE && last - first > CHANGE - 100);
        assert!(first >= before.len() / 2 - CHANGE / 2 && last < before.len() / 2 + CHANGE / 2);
        change.revert().unwrap();
        assert_eq!(digest_file(&p).unwrap(), sha);
        assert_eq!(bytes_under(dir.path()).unwrap(), size);
    }

    fn copy_tree(from: &Path, to: &Path) {
        fs::create_dir_all(to).unwrap();
        for e in fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            let target = to.join(e.file_name());
            if e.file_type().unwrap().is_dir() {
                copy_tree(&e.path(), &target);
            } else {
                fs::copy(e.path(), target).unwrap();
            }
        }
    }
}
