//! Reading a committed version back, checked against its row: the bytes
//! come out chunk by chunk as the blob is read, and the check against the
//! recorded size and SHA-256 happens on the way, so the end of the stream
//! is only reported once the whole content matched. Whoever streams it (the
//! restore reader) holds back what it has not sent until then.
//!
//! Reads go through [`BlobStore::open`](super::BlobStore::open), a stream:
//! nothing is buffered whole, so an object store serves it with one ranged
//! or streamed GET.

use std::io::Read;
use std::path::Path;
use std::sync::mpsc::{sync_channel, SyncSender};
use std::thread::JoinHandle;

use bytes::{Bytes, BytesMut};
use sha2::{Digest, Sha256};

use super::{StorageError, VersionRecord};

/// From this size on, SHA-256 runs on a thread of its own beside the
/// caller (whose encryption is serial: the two on one core would halve
/// the rate); below it a thread would cost more than it saves.
const HASH_THREAD_MIN: u64 = 1 << 20;
/// Chunks waiting for the hashing thread.
const HASH_QUEUE: usize = 2;

/// Where the SHA-256 of the content is computed.
enum Hasher {
    Here(Sha256),
    Thread {
        chunks: SyncSender<Bytes>,
        handle: JoinHandle<Sha256>,
    },
}

impl Hasher {
    fn new(size: u64) -> Self {
        if size < HASH_THREAD_MIN {
            return Self::Here(Sha256::new());
        }
        let (chunks, rx) = sync_channel::<Bytes>(HASH_QUEUE);
        let handle = std::thread::spawn(move || {
            let mut sha = Sha256::new();
            for chunk in rx {
                sha.update(&chunk);
            }
            sha
        });
        Self::Thread { chunks, handle }
    }

    fn update(&mut self, chunk: &Bytes) -> Result<(), StorageError> {
        match self {
            Self::Here(sha) => sha.update(chunk),
            Self::Thread { chunks, .. } => chunks
                .send(chunk.clone())
                .map_err(|_| StorageError::Worker("the hashing thread stopped".into()))?,
        }
        Ok(())
    }

    fn finish(self) -> Result<[u8; 32], StorageError> {
        let sha = match self {
            Self::Here(sha) => sha,
            Self::Thread { chunks, handle } => {
                drop(chunks);
                handle
                    .join()
                    .map_err(|_| StorageError::Worker("the hashing thread failed".into()))?
            }
        };
        Ok(sha.finalize().into())
    }
}

/// The content of one version, read and checked as it goes (see the module
/// documentation). Made by [`Storage::open_verified`](super::Storage::open_verified).
pub struct VerifiedReader {
    reader: Box<dyn Read + Send>,
    blob: String,
    size: u64,
    sha256: [u8; 32],
    read: u64,
    /// `None` once the end was reached and checked.
    hasher: Option<Hasher>,
}

impl std::fmt::Debug for VerifiedReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifiedReader")
            .field("blob", &self.blob)
            .field("size", &self.size)
            .field("read", &self.read)
            .finish_non_exhaustive()
    }
}

impl VerifiedReader {
    pub(super) fn new(reader: Box<dyn Read + Send>, version: &VersionRecord) -> Self {
        Self {
            reader,
            blob: version.blob.0.clone(),
            size: version.size,
            sha256: version.sha256,
            read: 0,
            hasher: Some(Hasher::new(version.size)),
        }
    }

    /// The next chunk of at most `max` bytes (`max` at least 1), or `None`
    /// at the end, which is only reached once the whole content matched its
    /// recorded size and SHA-256. The chunk that meets the end is checked
    /// before it is returned. Memory: the chunk, and up to [`HASH_QUEUE`]
    /// more waiting for the hashing thread.
    ///
    /// # Errors
    /// [`StorageError::Damaged`] as soon as more bytes than recorded are
    /// read, or at the end when size or digest differ; a read failure as
    /// [`StorageError::io`]. The reader is of no further use after an error.
    pub fn next_chunk(&mut self, max: usize) -> Result<Option<Bytes>, StorageError> {
        let Some(hasher) = self.hasher.as_mut() else {
            return Ok(None);
        };
        // One byte more than is left, to notice a blob longer than
        // recorded; and never more than is left, so a small file does not
        // cost a whole chunk's worth of memory.
        let want = usize::try_from(self.size.saturating_sub(self.read))
            .unwrap_or(usize::MAX)
            .saturating_add(1)
            .min(max.max(1));
        let mut buf = BytesMut::zeroed(want);
        let n = fill(&mut *self.reader, &mut buf, &self.blob)?;
        buf.truncate(n);
        let chunk = buf.freeze();
        self.read += n as u64;
        if self.read > self.size {
            self.hasher = None;
            return Err(self.damaged(format!("more than {} bytes", self.size)));
        }
        hasher.update(&chunk)?;
        if n == want {
            return Ok(Some(chunk));
        }
        // The end: check before handing out the last bytes.
        let digest = self.hasher.take().map_or(
            Err(StorageError::Worker("no hasher".into())),
            Hasher::finish,
        )?;
        if self.read != self.size || digest != self.sha256 {
            return Err(self.damaged(format!("{} bytes, {}", self.read, hex::encode(digest))));
        }
        Ok((n > 0).then_some(chunk))
    }

    fn damaged(&self, found: String) -> StorageError {
        StorageError::Damaged {
            blob: self.blob.clone(),
            size: self.size,
            found,
        }
    }
}

/// Fills `buf` as far as the reader allows; returns the bytes read (less
/// than `buf.len()` only at the end).
fn fill(reader: &mut dyn Read, buf: &mut [u8], blob: &str) -> Result<usize, StorageError> {
    let mut n = 0;
    while n < buf.len() {
        match reader.read(buf.get_mut(n..).unwrap_or_default()) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(StorageError::io("read", Path::new(blob), e)),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::BlobKey;
    use protocol::{ClientId, FileName};

    fn record(content: &[u8]) -> VersionRecord {
        VersionRecord {
            version: 1,
            client: ClientId([1; 16]),
            file: FileName::new(b"f".to_vec()).unwrap(),
            blob: BlobKey("b".into()),
            size: content.len() as u64,
            content_size: content.len() as u64,
            cksum: 0,
            sha256: Sha256::digest(content).into(),
            verified: true,
            stored_at: std::time::UNIX_EPOCH,
        }
    }

    fn read_all(stored: &[u8], row: &VersionRecord, max: usize) -> Result<Vec<u8>, StorageError> {
        let mut r = VerifiedReader::new(Box::new(std::io::Cursor::new(stored.to_vec())), row);
        let mut out = Vec::new();
        while let Some(chunk) = r.next_chunk(max)? {
            assert!(chunk.len() <= max);
            out.extend_from_slice(&chunk);
        }
        assert!(r.next_chunk(max)?.is_none(), "the end stays the end");
        Ok(out)
    }

    #[test]
    fn yields_intact_content_in_chunks_of_any_size() {
        for len in [0usize, 1, 15, 16, 17, 4096, (HASH_THREAD_MIN as usize) + 3] {
            let content: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            for max in [1usize, 16, 1000, 1 << 20] {
                if len > 5000 && max < 1000 {
                    continue;
                }
                assert_eq!(read_all(&content, &record(&content), max).unwrap(), content);
            }
        }
    }

    #[test]
    fn rejects_flipped_shorter_and_longer_content_at_the_end() {
        for len in [10usize, (HASH_THREAD_MIN as usize) + 10] {
            let content = vec![7u8; len];
            let row = record(&content);
            let mut flipped = content.clone();
            flipped[len / 2] ^= 1;
            let cases = [
                flipped,
                content[..len - 1].to_vec(),
                [&content[..], b"x"].concat(),
            ];
            for stored in cases {
                let e = read_all(&stored, &row, 4096).unwrap_err();
                assert!(matches!(e, StorageError::Damaged { .. }), "{len}: {e}");
            }
        }
    }

    #[test]
    fn a_damaged_blob_never_yields_its_last_chunk() {
        let content = vec![3u8; 100];
        let row = record(&content);
        let mut stored = content.clone();
        stored[99] ^= 1;
        let mut r = VerifiedReader::new(Box::new(std::io::Cursor::new(stored)), &row);
        // 40 + 40 come out; the last 20 meet the end and the check.
        assert_eq!(r.next_chunk(40).unwrap().unwrap().len(), 40);
        assert_eq!(r.next_chunk(40).unwrap().unwrap().len(), 40);
        assert!(matches!(
            r.next_chunk(40),
            Err(StorageError::Damaged { .. })
        ));
    }
}
