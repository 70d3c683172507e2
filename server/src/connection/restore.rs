//! The reader of one restore: a dedicated thread that takes the checked
//! content of a version from [`Storage::open_verified`], encrypts it and
//! hands ciphertext packets to the connection through a bounded channel.
//!
//! At most [`QUEUE_DEPTH`] packets wait in the channel, and one more is
//! held back by the thread, so memory per restore stays a small multiple of
//! the packet size whatever the file size; a slow client fills its TCP
//! window, the connection task stops taking packets, and the thread stops
//! reading. The last packet is only released once the storage reported the
//! end, that is once the whole blob matched its digest: a damaged blob ends
//! the restore before the client holds a complete (and so verifiable) file.

use bytes::{Bytes, BytesMut};
use protocol::crypto::CbcEncryptor;
use tokio::sync::mpsc;

use crate::storage::{Storage, StorageError, VersionRecord};

/// Packets in flight between the reader thread and the connection task.
pub(crate) const QUEUE_DEPTH: usize = 2;

/// Starts reading `version`; the receiver yields its ciphertext in packets
/// of `packet` bytes (the last one shorter), then ends, or yields an error
/// and ends (a damaged blob: [`StorageError::Damaged`]). `alive` is held by
/// the thread until it ends.
///
/// # Errors
/// When the thread cannot be started.
pub(crate) fn start(
    storage: Storage,
    version: VersionRecord,
    cipher: CbcEncryptor,
    packet: usize,
    alive: mpsc::Sender<()>,
) -> Result<mpsc::Receiver<Result<Bytes, StorageError>>, StorageError> {
    let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
    // A thread of the runtime's blocking pool: a run of small files reuses
    // one instead of starting a thread per file.
    let runtime = tokio::runtime::Handle::try_current()
        .map_err(|e| StorageError::Worker(format!("cannot start a reader: {e}")))?;
    runtime.spawn_blocking(move || {
        let _alive = alive;
        if let Err(e) = send_all(&storage, &version, cipher, packet, &tx) {
            let _ = tx.blocking_send(Err(e));
        }
    });
    Ok(rx)
}

/// Reads and encrypts, sending every complete packet but the newest, which
/// waits for the next one or for the end of the checked content. Returns
/// early (without error) when the connection stopped listening.
fn send_all(
    storage: &Storage,
    version: &VersionRecord,
    mut cipher: CbcEncryptor,
    packet: usize,
    tx: &mpsc::Sender<Result<Bytes, StorageError>>,
) -> Result<(), StorageError> {
    let mut reader = storage.open_verified(version)?;
    // Sized by the content (or a packet), so a small file does not cost a
    // packet's worth of fresh memory.
    let first = usize::try_from(version.size)
        .unwrap_or(usize::MAX)
        .min(packet);
    let mut out = BytesMut::with_capacity(first + protocol::crypto::BLOCK);
    let mut held: Option<Bytes> = None;
    // Sends `p` in place of the packet held; false when nobody listens.
    let mut hold = |p: Bytes| match held.replace(p) {
        Some(prev) => tx.blocking_send(Ok(prev)).is_ok(),
        None => true,
    };
    while let Some(chunk) = reader.next_chunk(packet)? {
        cipher.update(&chunk, &mut out);
        while out.len() >= packet {
            if !hold(out.split_to(packet).freeze()) {
                return Ok(());
            }
        }
    }
    // The end: the content matched, so the rest may go.
    cipher.finish(&mut out);
    while !out.is_empty() {
        if !hold(out.split_to(packet.min(out.len())).freeze()) {
            return Ok(());
        }
    }
    if let Some(last) = held {
        let _ = tx.blocking_send(Ok(last));
    }
    Ok(())
}
