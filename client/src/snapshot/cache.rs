//! The local file cache: what each file of the last snapshot looked like
//! (size, mtime, ctime, inode, device) and its chunk ids, so that a file
//! that has not changed is not read again (`backup --force-read` reads
//! everything).
//!
//! One cache per server and client id, in `<config dir>/cache/`. It is
//! only ever a hint: a lost, stale or damaged cache costs reading files,
//! never a wrong snapshot. A file is taken from it only when all five
//! stamps match; the server checks at commit that every chunk id the
//! snapshot references is stored, and when one is not (pruned since), the
//! run is made again reading every file.
//!
//! ```text
//! file   = "BKC1" || count u64 || entry* || BLAKE3 of everything before
//! entry  = path_len u32 || path || size u64 || mtime_s i64 || mtime_ns u32 || ctime_s i64
//!          || ctime_ns u32 || inode u64 || device u64 || chunks u32 || id*
//! ```
//!
//! The new cache is written while the walk goes, to a temporary file,
//! and renamed over the old one only after the snapshot is committed.

use std::collections::HashMap;
use std::fs::Metadata;
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use protocol::repo::message::{ObjectId, ID_LEN};

const MAGIC: &[u8; 4] = b"BKC1";

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

/// The cache of the last snapshot, read whole.
#[derive(Debug, Default)]
pub struct FileCache {
    files: HashMap<Vec<u8>, (Stamp, Vec<ObjectId>)>,
}

/// Where the cache of `client_id` on `server` lives under `config_dir`.
pub fn path_for(config_dir: &Path, server: &str, client_id: &str) -> PathBuf {
    let server = blake3::hash(server.as_bytes()).to_hex();
    config_dir
        .join("cache")
        .join(format!("{client_id}-{}.cache", &server[..16]))
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.bytes.len() < n {
            return None;
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Some(head)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)?.try_into().ok().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)?.try_into().ok().map(u64::from_le_bytes)
    }
    fn i64(&mut self) -> Option<i64> {
        self.take(8)?.try_into().ok().map(i64::from_le_bytes)
    }
}

impl FileCache {
    /// The cache at `path`; empty when it is missing or damaged.
    pub fn load(path: &Path) -> Self {
        let mut bytes = Vec::new();
        let read = std::fs::File::open(path).and_then(|mut f| f.read_to_end(&mut bytes));
        if read.is_err() {
            return Self::default();
        }
        Self::parse(&bytes).unwrap_or_else(|| {
            tracing::debug!(path = %path.display(), "file cache damaged; reading every file");
            Self::default()
        })
    }

    fn parse(bytes: &[u8]) -> Option<Self> {
        let body_len = bytes.len().checked_sub(32)?;
        let (body, sum) = bytes.split_at(body_len);
        if blake3::hash(body).as_bytes() != sum {
            return None;
        }
        let mut r = Reader { bytes: body };
        if r.take(4)? != MAGIC {
            return None;
        }
        let count = r.u64()?;
        let mut files = HashMap::new();
        for _ in 0..count {
            let n = r.u32()? as usize;
            let path = r.take(n)?.to_vec();
            let stamp = Stamp {
                size: r.u64()?,
                mtime_s: r.i64()?,
                mtime_ns: r.u32()?,
                ctime_s: r.i64()?,
                ctime_ns: r.u32()?,
                inode: r.u64()?,
                device: r.u64()?,
            };
            let chunks = r.u32()? as usize;
            let ids = r.take(chunks.checked_mul(ID_LEN)?)?;
            let ids = ids
                .chunks_exact(ID_LEN)
                .map(|c| {
                    let mut id = [0u8; ID_LEN];
                    id.copy_from_slice(c);
                    ObjectId(id)
                })
                .collect();
            files.insert(path, (stamp, ids));
        }
        r.bytes.is_empty().then_some(Self { files })
    }

    /// The chunk ids of `path` if its stamp is unchanged.
    pub fn unchanged(&self, path: &[u8], stamp: &Stamp) -> Option<&[ObjectId]> {
        match self.files.get(path) {
            Some((s, ids)) if s == stamp => Some(ids),
            _ => None,
        }
    }

    /// Whether the last snapshot held `path` (changed or not).
    pub fn knows(&self, path: &[u8]) -> bool {
        self.files.contains_key(path)
    }

    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
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
    pub fn add(&mut self, path: &[u8], stamp: &Stamp, chunks: &[ObjectId]) -> std::io::Result<()> {
        let mut e = Vec::with_capacity(64 + path.len() + chunks.len() * ID_LEN);
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
    fn a_committed_cache_reads_back_and_a_changed_stamp_misses() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c/x.cache");
        let mut w = CacheWriter::create(&path).unwrap();
        w.add(b"/a", &stamp(10), &[ObjectId([1; 32]), ObjectId([2; 32])])
            .unwrap();
        w.add(b"/b", &stamp(0), &[]).unwrap();
        w.commit(&path).unwrap();
        let c = FileCache::load(&path);
        assert_eq!(c.len(), 2);
        assert_eq!(c.unchanged(b"/a", &stamp(10)).unwrap().len(), 2);
        assert!(c.unchanged(b"/a", &stamp(11)).is_none());
        assert!(c.unchanged(b"/b", &stamp(0)).unwrap().is_empty());
        assert!(c.unchanged(b"/c", &stamp(0)).is_none());
    }

    #[test]
    fn a_damaged_or_torn_cache_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.cache");
        let mut w = CacheWriter::create(&path).unwrap();
        w.add(b"/a", &stamp(10), &[ObjectId([1; 32])]).unwrap();
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
        w.add(b"/a", &stamp(1), &[]).unwrap();
        w.commit(&path).unwrap();
        let mut w = CacheWriter::create(&path).unwrap();
        w.add(b"/b", &stamp(1), &[]).unwrap();
        w.abandon();
        let c = FileCache::load(&path);
        assert!(c.unchanged(b"/a", &stamp(1)).is_some());
        assert!(!path.with_extension("cache.part").exists());
    }
}
