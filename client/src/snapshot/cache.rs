//! The local file cache: what each file of the last snapshot looked like
//! (size, mtime, ctime, inode, device) and its chunk ids, so that a file
//! that has not changed is not read again (`backup --force-read` reads
//! everything).
//!
//! One cache per client id and list of paths backed up, in
//! `<config dir>/cache/`. It is only ever a hint: a lost, stale or damaged cache costs reading files,
//! never a wrong snapshot. A file is taken from it only when all five
//! stamps match; the server checks at commit that every chunk id the
//! snapshot references is stored, and when one is not (pruned since), the
//! run is made again reading every file.
//!
//! ```text
//! file   = "BKC2" || count u64 || entry* || BLAKE3 of everything before
//! entry  = root u32 || path_len u32 || path || size u64 || mtime_s i64 || mtime_ns u32
//!          || ctime_s i64 || ctime_ns u32 || inode u64 || device u64 || chunks u32 || id*
//! ```
//!
//! The new cache is written while the walk goes, to a temporary file,
//! and renamed over the old one only after the snapshot is committed.
//!
//! Entries are in the walker's order: by root (the position of the path
//! on the command line), then by path compared name by name, which is the
//! order of a depth-first walk over sorted names. So the old cache is
//! read as a stream beside the walk, a merge join, and memory does not
//! grow with the number of files (a cache read whole held about 250 bytes
//! per file: 250 MiB for a million). The checksum is verified in a first
//! pass over the file, before any entry is used.

use std::fs::Metadata;
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use protocol::repo::message::{ObjectId, ID_LEN};

const MAGIC: &[u8; 4] = b"BKC2";

/// What identifies an unchanged file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub size: u64,
    pub mtime_s: i64,
    pub mtime_ns: u32,
    pub ctime_s: i64,
    pub ctime_ns: u32,
    pub inode: u64,
    pub device: u64,
}

impl Stamp {
    pub fn of(meta: &Metadata) -> Self {
        Self {
            size: meta.size(),
            mtime_s: meta.mtime(),
            mtime_ns: u32::try_from(meta.mtime_nsec()).unwrap_or(0),
            ctime_s: meta.ctime(),
            ctime_ns: u32::try_from(meta.ctime_nsec()).unwrap_or(0),
            inode: meta.ino(),
            device: meta.dev(),
        }
    }
}

/// The cache of the last snapshot, read as a stream in walk order.
#[derive(Default)]
pub struct FileCache {
    reader: Option<std::io::BufReader<std::fs::File>>,
    /// Entries not read yet.
    remaining: u64,
    /// The next entry, read ahead.
    next: Option<Cached>,
}

/// What the old cache says of a file.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    /// Unchanged: its chunk ids.
    Unchanged(Vec<ObjectId>),
    /// In the last snapshot, changed since.
    Changed,
    /// Not in the last snapshot.
    New,
}

/// One file of the old cache.
struct Cached {
    root: u32,
    path: Vec<u8>,
    stamp: Stamp,
    ids: Vec<ObjectId>,
}

/// Walk order: by root, then name by name (a directory's own files come
/// where its name sorts among its siblings).
fn walk_order(a: (u32, &[u8]), b: (u32, &[u8])) -> std::cmp::Ordering {
    a.0.cmp(&b.0)
        .then_with(|| a.1.split(|c| *c == b'/').cmp(b.1.split(|c| *c == b'/')))
}

/// Where the cache of `client_id` for this list of `roots` lives under
/// `config_dir`: each set of paths backed up keeps its own.
pub fn path_for(config_dir: &Path, client_id: &str, roots: &[PathBuf]) -> PathBuf {
    let mut h = blake3::Hasher::new();
    for r in roots {
        h.update(r.as_os_str().as_encoded_bytes());
        h.update(&[0]);
    }
    let roots = h.finalize().to_hex();
    config_dir
        .join("cache")
        .join(format!("{client_id}-{}.cache", &roots[..16]))
}

fn read_exact<const N: usize>(r: &mut impl Read) -> Option<[u8; N]> {
    let mut b = [0u8; N];
    r.read_exact(&mut b).ok()?;
    Some(b)
}

/// Whether the file's last 32 bytes are the BLAKE3 of the rest, read in a
/// stream; the file is left at its start.
fn checksum_holds(file: &mut std::fs::File) -> Option<()> {
    use std::io::{Seek, SeekFrom};
    let len = file.metadata().ok()?.len();
    let body = len.checked_sub(32)?;
    let mut hasher = blake3::Hasher::new();
    let mut reader = std::io::BufReader::with_capacity(256 << 10, &mut *file);
    std::io::copy(&mut Read::by_ref(&mut reader).take(body), &mut hasher).ok()?;
    let sum: [u8; 32] = read_exact(&mut reader)?;
    drop(reader);
    file.seek(SeekFrom::Start(0)).ok()?;
    (hasher.finalize().as_bytes() == &sum).then_some(())
}

fn u32_of(r: &mut impl Read) -> Option<u32> {
    read_exact(r).map(u32::from_le_bytes)
}

fn u64_of(r: &mut impl Read) -> Option<u64> {
    read_exact(r).map(u64::from_le_bytes)
}

fn i64_of(r: &mut impl Read) -> Option<i64> {
    read_exact(r).map(i64::from_le_bytes)
}

impl FileCache {
    /// The cache at `path`; empty when it is missing or damaged.
    pub fn load(path: &Path) -> Self {
        Self::open(path).unwrap_or_else(|| {
            if path.exists() {
                tracing::debug!(path = %path.display(), "file cache damaged; reading every file");
            }
            Self::default()
        })
    }

    fn open(path: &Path) -> Option<Self> {
        let mut file = std::fs::File::open(path).ok()?;
        checksum_holds(&mut file)?;
        let mut reader = std::io::BufReader::with_capacity(256 << 10, file);
        if &read_exact::<4>(&mut reader)? != MAGIC {
            return None;
        }
        let remaining = u64_of(&mut reader)?;
        let mut cache = Self {
            reader: Some(reader),
            remaining,
            next: None,
        };
        cache.advance();
        Some(cache)
    }

    /// Reads the next entry ahead; at the end (or on a short read) the
    /// cache is done.
    fn advance(&mut self) {
        self.next = None;
        if self.remaining == 0 {
            self.reader = None;
            return;
        }
        self.remaining -= 1;
        let Some(r) = self.reader.as_mut() else {
            return;
        };
        self.next = Self::entry(r);
        if self.next.is_none() {
            self.reader = None;
        }
    }

    fn entry(r: &mut impl Read) -> Option<Cached> {
        let root = u32_of(r)?;
        let n = usize::try_from(u32_of(r)?).ok()?;
        if n > 1 << 16 {
            return None;
        }
        let mut path = vec![0u8; n];
        r.read_exact(&mut path).ok()?;
        let stamp = Stamp {
            size: u64_of(r)?,
            mtime_s: i64_of(r)?,
            mtime_ns: u32_of(r)?,
            ctime_s: i64_of(r)?,
            ctime_ns: u32_of(r)?,
            inode: u64_of(r)?,
            device: u64_of(r)?,
        };
        let chunks = u32_of(r)?;
        let mut ids = Vec::new();
        for _ in 0..chunks {
            ids.push(ObjectId(read_exact::<ID_LEN>(r)?));
        }
        Some(Cached {
            root,
            path,
            stamp,
            ids,
        })
    }

    /// What the last snapshot held at `path` (under root `root`): its
    /// chunk ids when its stamp is unchanged. Asked in walk order: entries
    /// before `path` are passed over (files gone since) and never looked
    /// at again.
    pub fn lookup(&mut self, root: u32, path: &[u8], stamp: &Stamp) -> Lookup {
        loop {
            let Some(next) = self.next.as_ref() else {
                return Lookup::New;
            };
            match walk_order((next.root, &next.path), (root, path)) {
                std::cmp::Ordering::Less => self.advance(),
                std::cmp::Ordering::Greater => return Lookup::New,
                std::cmp::Ordering::Equal => {
                    let hit = next.stamp == *stamp;
                    let ids = self.next.take().map(|c| c.ids);
                    self.advance();
                    return match ids {
                        Some(ids) if hit => Lookup::Unchanged(ids),
                        _ => Lookup::Changed,
                    };
                }
            }
        }
    }

    /// The chunk ids of `path` if its stamp is unchanged (see
    /// [`lookup`](Self::lookup)).
    pub fn unchanged(&mut self, root: u32, path: &[u8], stamp: &Stamp) -> Option<Vec<ObjectId>> {
        match self.lookup(root, path, stamp) {
            Lookup::Unchanged(ids) => Some(ids),
            _ => None,
        }
    }

    /// Whether no entry is left to read.
    pub fn is_empty(&self) -> bool {
        self.next.is_none()
    }
}

/// The cache being written by a run.
pub struct CacheWriter {
    tmp: PathBuf,
    out: BufWriter<std::fs::File>,
    count: u64,
}

impl CacheWriter {
    /// Starts a new cache beside `path`.
    ///
    /// # Errors
    /// When the folder or the temporary file cannot be made.
    pub fn create(path: &Path) -> std::io::Result<Self> {
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let tmp = path.with_extension("cache.part");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        let mut w = Self {
            tmp,
            out: BufWriter::with_capacity(256 << 10, file),
            count: 0,
        };
        // The count is patched in at the end.
        w.put(MAGIC)?;
        w.put(&0u64.to_le_bytes())?;
        Ok(w)
    }

    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.out.write_all(bytes)
    }

    /// Records a file read (or reused) in this run.
    ///
    /// # Errors
    /// When the write fails.
    pub fn add(
        &mut self,
        root: u32,
        path: &[u8],
        stamp: &Stamp,
        chunks: &[ObjectId],
    ) -> std::io::Result<()> {
        let mut e = Vec::with_capacity(64 + path.len() + chunks.len() * ID_LEN);
        e.extend_from_slice(&root.to_le_bytes());
        e.extend_from_slice(&u32::try_from(path.len()).unwrap_or(u32::MAX).to_le_bytes());
        e.extend_from_slice(path);
        e.extend_from_slice(&stamp.size.to_le_bytes());
        e.extend_from_slice(&stamp.mtime_s.to_le_bytes());
        e.extend_from_slice(&stamp.mtime_ns.to_le_bytes());
        e.extend_from_slice(&stamp.ctime_s.to_le_bytes());
        e.extend_from_slice(&stamp.ctime_ns.to_le_bytes());
        e.extend_from_slice(&stamp.inode.to_le_bytes());
        e.extend_from_slice(&stamp.device.to_le_bytes());
        e.extend_from_slice(
            &u32::try_from(chunks.len())
                .unwrap_or(u32::MAX)
                .to_le_bytes(),
        );
        for id in chunks {
            e.extend_from_slice(&id.0);
        }
        self.count += 1;
        self.put(&e)
    }

    /// Finishes the file (count and checksum) and renames it over `path`.
    ///
    /// # Errors
    /// When a write or the rename fails.
    pub fn commit(self, path: &Path) -> std::io::Result<()> {
        use std::io::{Seek, SeekFrom};
        let mut file = self.out.into_inner().map_err(|e| e.into_error())?;
        file.seek(SeekFrom::Start(4))?;
        file.write_all(&self.count.to_le_bytes())?;
        // Hash what was written, count included, then append the sum.
        file.seek(SeekFrom::Start(0))?;
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(buf.get(..n).unwrap_or_default());
        }
        file.write_all(hasher.finalize().as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&self.tmp, path)
    }

    /// Drops the unfinished cache.
    pub fn abandon(self) {
        let tmp = self.tmp.clone();
        drop(self);
        let _ = std::fs::remove_file(tmp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(size: u64) -> Stamp {
        Stamp {
            size,
            mtime_s: 1,
            mtime_ns: 2,
            ctime_s: 3,
            ctime_ns: 4,
            inode: 5,
            device: 6,
        }
    }

    #[test]
    fn a_committed_cache_reads_back_in_walk_order_and_a_changed_stamp_misses() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c/x.cache");
        let mut w = CacheWriter::create(&path).unwrap();
        // The walker's order: a directory's files where its name sorts
        // ("a" before "a.txt"), then the next root.
        let ids = [ObjectId([1; 32]), ObjectId([2; 32])];
        w.add(0, b"/r/a/x", &stamp(10), &ids).unwrap();
        w.add(0, b"/r/a/y", &stamp(1), &[]).unwrap();
        w.add(0, b"/r/a.txt", &stamp(2), &ids[..1]).unwrap();
        w.add(0, b"/r/b", &stamp(3), &[]).unwrap();
        w.add(1, b"/q/z", &stamp(4), &ids[1..]).unwrap();
        w.commit(&path).unwrap();

        let mut c = FileCache::load(&path);
        assert!(!c.is_empty());
        assert_eq!(c.unchanged(0, b"/r/a/x", &stamp(10)).unwrap(), ids);
        // Changed since: a miss, and the entry is used up.
        assert!(c.unchanged(0, b"/r/a/y", &stamp(9)).is_none());
        // A new file between two cached ones: a miss that keeps the next.
        assert!(c.unchanged(0, b"/r/a/yy", &stamp(1)).is_none());
        assert_eq!(c.unchanged(0, b"/r/a.txt", &stamp(2)).unwrap(), &ids[..1]);
        // "/r/b" is gone from this walk: passed over for the next root.
        assert_eq!(c.unchanged(1, b"/q/z", &stamp(4)).unwrap(), &ids[1..]);
        assert!(c.is_empty());
        assert!(c.unchanged(1, b"/q/zz", &stamp(4)).is_none());
    }

    #[test]
    fn walk_order_is_a_depth_first_walk_over_sorted_names() {
        use std::cmp::Ordering::*;
        assert_eq!(walk_order((0, b"/r/a/x"), (0, b"/r/a.txt")), Less);
        assert_eq!(walk_order((0, b"/r/a.txt"), (0, b"/r/a/x")), Greater);
        assert_eq!(walk_order((0, b"/r/b"), (1, b"/a")), Less);
        assert_eq!(walk_order((0, b"/r/a"), (0, b"/r/a")), Equal);
        assert_eq!(walk_order((0, b"/r/a"), (0, b"/r/a/b")), Less);
    }

    #[test]
    fn a_damaged_or_torn_cache_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.cache");
        let mut w = CacheWriter::create(&path).unwrap();
        w.add(0, b"/a", &stamp(10), &[ObjectId([1; 32])]).unwrap();
        w.commit(&path).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[20] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert!(FileCache::load(&path).is_empty());
        bytes[20] ^= 1;
        std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        assert!(FileCache::load(&path).is_empty());
        assert!(FileCache::load(&dir.path().join("missing")).is_empty());
    }

    #[test]
    fn an_abandoned_cache_leaves_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.cache");
        let mut w = CacheWriter::create(&path).unwrap();
        w.add(0, b"/a", &stamp(1), &[]).unwrap();
        w.commit(&path).unwrap();
        let mut w = CacheWriter::create(&path).unwrap();
        w.add(0, b"/b", &stamp(1), &[]).unwrap();
        w.abandon();
        let mut c = FileCache::load(&path);
        assert!(c.unchanged(0, b"/a", &stamp(1)).is_some());
        assert!(!path.with_extension("cache.part").exists());
    }
}
