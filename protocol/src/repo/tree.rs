//! Trees and snapshot descriptions: the plaintext formats the client seals
//! (`docs/PROTOCOL.md` §13.5). The server never sees them; they are here,
//! without I/O, so that their parsers are tested and fuzzed like the wire.
//!
//! A tree is one directory: its entries sorted by name, each a file (with
//! its size and chunk ids), a directory (with its tree's id) or a symbolic
//! link (with its target). An unchanged directory seals to the same bytes
//! and so to the same id, and costs nothing to back up again.
//!
//! ```text
//! tree     = version u8 (1) || count u32 || entry*
//! entry    = name_len u16 || name || kind u8 || mode u32 || mtime_s i64 || mtime_ns u32 || body
//! body     = file: size u64 || chunks u32 || id*  |  dir: id  |  symlink: len u16 || target
//! snapshot = version u8 (1) || root id || host (len u16 || bytes) || paths (count u16, each len u16 || bytes)
//!            || tags (same) || files u64 || dirs u64 || bytes u64 || parent u64
//! ```
//!
//! A description's strings (host, paths, tags) are UTF-8; one that is not
//! is refused rather than read leniently, so that what decodes encodes
//! back to the same bytes.

use crate::repo::message::{ObjectId, ID_LEN};

const VERSION: u8 = 1;
/// The most chunks one file entry lists: 16 TiB at the largest chunk size.
pub const MAX_FILE_CHUNKS: usize = 1 << 24;
/// The longest name or symbolic-link target.
pub const MAX_NAME: usize = 4096;

/// Why a tree or description did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("unknown format version {0}")]
    Version(u8),
    #[error("truncated")]
    Truncated,
    #[error("trailing bytes")]
    Trailing,
    #[error("unknown entry kind {0}")]
    Kind(u8),
    #[error("entry name {0:?} is not a plain name")]
    Name(String),
    #[error("entries out of order or repeated at {0:?}")]
    Order(String),
    #[error("a count past its limit")]
    Count,
    #[error("a string that is not UTF-8")]
    Utf8,
}

/// What an entry is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryKind {
    File { size: u64, chunks: Vec<ObjectId> },
    Dir { tree: ObjectId },
    Symlink { target: Vec<u8> },
}

/// One entry of a directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The name, one path component (no `/`, no NUL, not `.` or `..`).
    pub name: Vec<u8>,
    /// Permission bits (`0o7777`).
    pub mode: u32,
    pub mtime_s: i64,
    pub mtime_ns: u32,
    pub kind: EntryKind,
}

/// Whether `name` can be one path component on every system we restore to.
pub fn plain_name(name: &[u8]) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name != b"."
        && name != b".."
        && !name.iter().any(|&b| b == b'/' || b == 0)
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        if self.bytes.len() < n {
            return Err(FormatError::Truncated);
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], FormatError> {
        self.take(N)?.try_into().map_err(|_| FormatError::Truncated)
    }

    fn u8(&mut self) -> Result<u8, FormatError> {
        Ok(u8::from_le_bytes(self.array()?))
    }
    fn u16(&mut self) -> Result<u16, FormatError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, FormatError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, FormatError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn i64(&mut self) -> Result<i64, FormatError> {
        Ok(i64::from_le_bytes(self.array()?))
    }
    fn id(&mut self) -> Result<ObjectId, FormatError> {
        Ok(ObjectId(self.array::<ID_LEN>()?))
    }
    fn bytes16(&mut self, max: usize) -> Result<Vec<u8>, FormatError> {
        let n = usize::from(self.u16()?);
        if n > max {
            return Err(FormatError::Count);
        }
        Ok(self.take(n)?.to_vec())
    }
    /// A string of at most `max` bytes, which must be UTF-8: read
    /// leniently, an invalid byte would become a 3-byte U+FFFD and the
    /// value would no longer encode to the bytes it came from.
    fn string16(&mut self, max: usize) -> Result<String, FormatError> {
        String::from_utf8(self.bytes16(max)?).map_err(|_| FormatError::Utf8)
    }
    fn end(&self) -> Result<(), FormatError> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(FormatError::Trailing)
        }
    }
}

fn put16(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&u16::try_from(bytes.len()).unwrap_or(u16::MAX).to_le_bytes());
    out.extend_from_slice(bytes.get(..usize::from(u16::MAX)).unwrap_or(bytes));
}

/// Encodes a directory's entries, sorting them by name.
pub fn encode_tree(entries: &mut [Entry]) -> Vec<u8> {
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    let mut out = vec![VERSION];
    out.extend_from_slice(
        &u32::try_from(entries.len())
            .unwrap_or(u32::MAX)
            .to_le_bytes(),
    );
    for e in entries.iter() {
        put16(&mut out, &e.name);
        let kind = match e.kind {
            EntryKind::File { .. } => 1u8,
            EntryKind::Dir { .. } => 2,
            EntryKind::Symlink { .. } => 3,
        };
        out.push(kind);
        out.extend_from_slice(&e.mode.to_le_bytes());
        out.extend_from_slice(&e.mtime_s.to_le_bytes());
        out.extend_from_slice(&e.mtime_ns.to_le_bytes());
        match &e.kind {
            EntryKind::File { size, chunks } => {
                out.extend_from_slice(&size.to_le_bytes());
                out.extend_from_slice(
                    &u32::try_from(chunks.len())
                        .unwrap_or(u32::MAX)
                        .to_le_bytes(),
                );
                for id in chunks {
                    out.extend_from_slice(&id.0);
                }
            }
            EntryKind::Dir { tree } => out.extend_from_slice(&tree.0),
            EntryKind::Symlink { target } => put16(&mut out, target),
        }
    }
    out
}

/// Parses a tree: plain names, strictly increasing, nothing left over.
///
/// # Errors
/// When the bytes are not a tree of this version.
pub fn decode_tree(bytes: &[u8]) -> Result<Vec<Entry>, FormatError> {
    let mut r = Reader { bytes };
    let version = r.u8()?;
    if version != VERSION {
        return Err(FormatError::Version(version));
    }
    let count = r.u32()? as usize;
    // Every entry takes at least 21 bytes: a bound before allocating.
    if count > bytes.len() / 21 {
        return Err(FormatError::Count);
    }
    let mut entries: Vec<Entry> = Vec::with_capacity(count);
    for _ in 0..count {
        let name = r.bytes16(MAX_NAME)?;
        if !plain_name(&name) {
            return Err(FormatError::Name(
                String::from_utf8_lossy(&name).into_owned(),
            ));
        }
        if entries.last().is_some_and(|last| last.name >= name) {
            return Err(FormatError::Order(
                String::from_utf8_lossy(&name).into_owned(),
            ));
        }
        let kind = r.u8()?;
        let mode = r.u32()? & 0o7777;
        let mtime_s = r.i64()?;
        let mtime_ns = r.u32()?;
        let kind = match kind {
            1 => {
                let size = r.u64()?;
                let n = r.u32()? as usize;
                if n > MAX_FILE_CHUNKS || n > r.bytes.len() / ID_LEN {
                    return Err(FormatError::Count);
                }
                let chunks = (0..n).map(|_| r.id()).collect::<Result<_, _>>()?;
                EntryKind::File { size, chunks }
            }
            2 => EntryKind::Dir { tree: r.id()? },
            3 => EntryKind::Symlink {
                target: r.bytes16(MAX_NAME)?,
            },
            other => return Err(FormatError::Kind(other)),
        };
        entries.push(Entry {
            name,
            mode,
            mtime_s,
            mtime_ns,
            kind,
        });
    }
    r.end()?;
    Ok(entries)
}

/// The ids an entry references directly.
pub fn entry_refs(entry: &Entry) -> &[ObjectId] {
    match &entry.kind {
        EntryKind::File { chunks, .. } => chunks,
        EntryKind::Dir { tree } => std::slice::from_ref(tree),
        EntryKind::Symlink { .. } => &[],
    }
}

/// What a snapshot says of itself, sealed; the server keeps it opaque.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Description {
    pub root: ObjectId,
    pub host: String,
    pub paths: Vec<String>,
    pub tags: Vec<String>,
    pub files: u64,
    pub dirs: u64,
    pub bytes: u64,
    /// The snapshot this one was made against (0: none).
    pub parent: u64,
}

fn put_strings(out: &mut Vec<u8>, list: &[String]) {
    out.extend_from_slice(&u16::try_from(list.len()).unwrap_or(u16::MAX).to_le_bytes());
    for s in list.iter().take(usize::from(u16::MAX)) {
        put16(out, s.as_bytes());
    }
}

fn get_strings(r: &mut Reader<'_>) -> Result<Vec<String>, FormatError> {
    let n = usize::from(r.u16()?);
    (0..n).map(|_| r.string16(MAX_NAME)).collect()
}

impl Description {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![VERSION];
        out.extend_from_slice(&self.root.0);
        put16(&mut out, self.host.as_bytes());
        put_strings(&mut out, &self.paths);
        put_strings(&mut out, &self.tags);
        for v in [self.files, self.dirs, self.bytes, self.parent] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out
    }

    /// # Errors
    /// When the bytes are not a description of this version.
    pub fn decode(bytes: &[u8]) -> Result<Self, FormatError> {
        let mut r = Reader { bytes };
        let version = r.u8()?;
        if version != VERSION {
            return Err(FormatError::Version(version));
        }
        let root = r.id()?;
        let host = r.string16(MAX_NAME)?;
        let paths = get_strings(&mut r)?;
        let tags = get_strings(&mut r)?;
        let d = Self {
            root,
            host,
            paths,
            tags,
            files: r.u64()?,
            dirs: r.u64()?,
            bytes: r.u64()?,
            parent: r.u64()?,
        };
        r.end()?;
        Ok(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, kind: EntryKind) -> Entry {
        Entry {
            name: name.as_bytes().to_vec(),
            mode: 0o644,
            mtime_s: 1_700_000_000,
            mtime_ns: 5,
            kind,
        }
    }

    #[test]
    fn a_tree_round_trips_sorted() {
        let mut entries = vec![
            entry(
                "z",
                EntryKind::Symlink {
                    target: b"../a".to_vec(),
                },
            ),
            entry(
                "a",
                EntryKind::File {
                    size: 10,
                    chunks: vec![ObjectId([1; 32]), ObjectId([2; 32])],
                },
            ),
            entry(
                "m",
                EntryKind::Dir {
                    tree: ObjectId([3; 32]),
                },
            ),
        ];
        let bytes = encode_tree(&mut entries);
        let back = decode_tree(&bytes).unwrap();
        assert_eq!(back, entries);
        assert_eq!(back[0].name, b"a");
        for cut in 0..bytes.len() {
            assert!(decode_tree(&bytes[..cut]).is_err(), "prefix {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(decode_tree(&longer), Err(FormatError::Trailing));
    }

    #[test]
    fn names_that_escape_a_folder_are_refused() {
        for bad in ["..", ".", "a/b", ""] {
            let mut e = vec![entry("x", EntryKind::Symlink { target: vec![] })];
            e[0].name = bad.as_bytes().to_vec();
            let bytes = encode_tree(&mut e);
            assert!(
                matches!(decode_tree(&bytes), Err(FormatError::Name(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn repeated_names_are_refused() {
        let mut e = vec![
            entry("x", EntryKind::Symlink { target: vec![] }),
            entry("x", EntryKind::Symlink { target: vec![] }),
        ];
        let bytes = encode_tree(&mut e);
        assert!(matches!(decode_tree(&bytes), Err(FormatError::Order(_))));
    }

    #[test]
    fn a_description_round_trips() {
        let d = Description {
            root: ObjectId([9; 32]),
            host: "host".into(),
            paths: vec!["/home/me".into()],
            tags: vec!["daily".into(), "x".into()],
            files: 3,
            dirs: 1,
            bytes: 99,
            parent: 7,
        };
        assert_eq!(Description::decode(&d.encode()).unwrap(), d);
        assert!(Description::decode(&d.encode()[..10]).is_err());
    }

    #[test]
    fn rejects_a_description_whose_strings_are_not_utf8() {
        // Read leniently, each invalid byte became a 3-byte U+FFFD: the
        // value no longer re-encoded to its bytes, and a long host grew
        // past MAX_NAME, so what decoded re-encoded to bytes that did not.
        for host in [vec![0xff], vec![0xff; MAX_NAME]] {
            let mut bytes = vec![VERSION];
            bytes.extend_from_slice(&[9; 32]);
            put16(&mut bytes, &host);
            bytes.extend_from_slice(&[0; 4 + 32]);
            assert_eq!(Description::decode(&bytes), Err(FormatError::Utf8));
        }
        let d = Description {
            paths: vec!["/x".into()],
            ..Description::default()
        };
        let mut bytes = d.encode();
        let at = bytes.len() - 32 - 2 - 1;
        bytes[at] = 0xc3;
        assert_eq!(Description::decode(&bytes), Err(FormatError::Utf8));
    }
}
