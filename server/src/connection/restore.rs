//! The reader of one restore: a dedicated thread that reads a blob,
//! checks it against its recorded size and SHA-256, encrypts it and hands
//! ciphertext packets to the connection through a bounded channel.
//!
//! At most [`QUEUE_DEPTH`] packets wait in the channel, and one more is
//! held back by the thread, so memory per restore stays a small multiple of
//! the packet size whatever the file size; a slow client fills its TCP
//! window, the connection task stops taking packets, and the thread stops
//! reading. The last packet is only released once the whole blob has been
//! read and found to match its digest: a damaged blob ends the restore
//! before the client holds a complete (and so verifiable) file.

use std::io::Read;

use bytes::{Bytes, BytesMut};
use protocol::crypto::CbcEncryptor;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::storage::{Storage, StorageError, VersionRecord};

/// Packets in flight between the reader thread and the connection task.
pub(crate) const QUEUE_DEPTH: usize = 2;
/// Why a restore stopped early.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RestoreError {
    #[error("{0}")]
    Storage(#[from] StorageError),
    #[error("blob {blob} does not match its recorded size {size} and SHA-256 ({found})")]
    Damaged {
        blob: String,
        size: u64,
        found: String,
    },
}

/// Starts reading `version`; the receiver yields its ciphertext in packets
/// of `packet` bytes (the last one shorter), then ends, or yields an error
/// and ends. `alive` is held by the thread until it ends.
///
/// # Errors
/// When the thread cannot be started.
pub(crate) fn start(
    storage: Storage,
    version: VersionRecord,
    cipher: CbcEncryptor,
    packet: usize,
    alive: mpsc::Sender<()>,
) -> Result<mpsc::Receiver<Result<Bytes, RestoreError>>, StorageError> {
    let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
    // A thread of the runtime's blocking pool: a run of small files reuses
    // one instead of starting a thread per file.
    let runtime = tokio::runtime::Handle::try_current()
        .map_err(|e| StorageError::Worker(format!("cannot start a reader: {e}")))?;
    runtime.spawn_blocking(move || {
        let _alive = alive;
        if let Err(e) = read_all(&storage, &version, cipher, packet, &tx) {
            let _ = tx.blocking_send(Err(e));
        }
    });
    Ok(rx)
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
            Err(e) => return Err(StorageError::io("read", std::path::Path::new(blob), e)),
        }
    }
    Ok(n)
}

/// Reads, checks and encrypts; returns early (without error) when the
/// connection stopped listening. SHA-256 runs on a second thread beside
/// the encryption (CBC encryption is serial, and the two together would
/// halve the rate of one core), except for a blob of less than a packet.
fn read_all(
    storage: &Storage,
    version: &VersionRecord,
    cipher: CbcEncryptor,
    packet: usize,
    tx: &mpsc::Sender<Result<Bytes, RestoreError>>,
) -> Result<(), RestoreError> {
    let reader = storage.open_blob(&version.blob)?;
    let (to_hasher, chunks) = std::sync::mpsc::sync_channel::<Bytes>(QUEUE_DEPTH);
    let (outcome, sha) = if version.size < packet as u64 {
        // One chunk: a hashing thread would cost more than it saves. The
        // channel holds that chunk until it is hashed here.
        let outcome = encrypt_all(reader, version, cipher, packet, tx, to_hasher);
        let mut sha = Sha256::new();
        for chunk in chunks.try_iter() {
            sha.update(&chunk);
        }
        (outcome, sha)
    } else {
        std::thread::scope(|scope| {
            let hasher = scope.spawn(move || {
                let mut sha = Sha256::new();
                for chunk in chunks {
                    sha.update(&chunk);
                }
                sha
            });
            let outcome = encrypt_all(reader, version, cipher, packet, tx, to_hasher);
            let sha = hasher
                .join()
                .map_err(|_| StorageError::Worker("the hashing thread failed".into()));
            sha.map(|sha| (outcome, sha))
        })?
    };
    let (total, out, held) = match outcome? {
        Some(done) => done,
        None => return Ok(()),
    };
    let digest: [u8; 32] = sha.finalize().into();
    if total != version.size || digest != version.sha256 {
        return Err(RestoreError::Damaged {
            blob: version.blob.0.clone(),
            size: version.size,
            found: format!("{total} bytes, {}", hex::encode(digest)),
        });
    }
    let mut out = out;
    let mut held = held;
    while !out.is_empty() {
        let p = out.split_to(packet.min(out.len())).freeze();
        if let Some(prev) = held.replace(p) {
            if tx.blocking_send(Ok(prev)).is_err() {
                return Ok(());
            }
        }
    }
    if let Some(last) = held {
        let _ = tx.blocking_send(Ok(last));
    }
    Ok(())
}

/// What [`encrypt_all`] leaves for after the check: the bytes read, the
/// ciphertext not yet cut into packets, and the packet held back.
type Tail = (u64, BytesMut, Option<Bytes>);

/// Reads the blob to its end, feeding the hasher and the cipher, and sends
/// every complete packet but the newest. `None` when the connection
/// stopped listening.
fn encrypt_all(
    mut reader: Box<dyn Read + Send>,
    version: &VersionRecord,
    mut cipher: CbcEncryptor,
    packet: usize,
    tx: &mpsc::Sender<Result<Bytes, RestoreError>>,
    to_hasher: std::sync::mpsc::SyncSender<Bytes>,
) -> Result<Option<Tail>, RestoreError> {
    let mut total = 0u64;
    // Buffers are sized by what is left to read (plus one byte, to notice a
    // blob longer than recorded), so a small file does not cost a packet's
    // worth of fresh memory.
    let left = |total: u64| {
        usize::try_from(version.size.saturating_sub(total))
            .unwrap_or(usize::MAX)
            .saturating_add(1)
            .min(packet)
    };
    let mut out = BytesMut::with_capacity(left(0) + protocol::crypto::BLOCK);
    // The newest complete packet, sent only once a later one exists or the
    // blob has been verified.
    let mut held: Option<Bytes> = None;
    loop {
        let want = left(total);
        let mut plain = BytesMut::zeroed(want);
        let n = fill(&mut *reader, &mut plain, &version.blob.0)?;
        plain.truncate(n);
        let chunk = plain.freeze();
        total += n as u64;
        if total > version.size {
            return Err(RestoreError::Damaged {
                blob: version.blob.0.clone(),
                size: version.size,
                found: format!("more than {} bytes", version.size),
            });
        }
        cipher.update(&chunk, &mut out);
        if to_hasher.send(chunk).is_err() {
            return Err(StorageError::Worker("the hashing thread stopped".into()).into());
        }
        while out.len() >= packet {
            let p = out.split_to(packet).freeze();
            if let Some(prev) = held.replace(p) {
                if tx.blocking_send(Ok(prev)).is_err() {
                    return Ok(None);
                }
            }
        }
        if n < want {
            break;
        }
    }
    drop(to_hasher);
    cipher.finish(&mut out);
    Ok(Some((total, out, held)))
}
