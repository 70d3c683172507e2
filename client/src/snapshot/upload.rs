//! The uploader of a snapshot run: asks the server which objects it
//! lacks, has those sealed on a few threads, and streams them in packs.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use protocol::repo::message::ObjectId;
use protocol::repo::pack::PackBuilder;
use protocol::repo::seal::Sealer;

use super::backup::{SnapshotSummary, BATCH_BYTES, BATCH_OBJECTS, IN_FLIGHT, PACKET, PACK_TARGET};
use super::remote::Remote;
use super::walk::Made;
use crate::error::Error;

/// A job for the sealing threads: the object, and where its sealed bytes go.
pub(super) type SealJob = (Made, tokio::sync::oneshot::Sender<Sealed>);

/// A sealed object: its id and bytes.
pub(super) type Sealed = (ObjectId, Vec<u8>);

/// A few threads that seal objects: as many as the machine has cores (at
/// most 4). A fixed set rather than the blocking pool, so that memory is
/// held by few allocator arenas, not one per short-lived thread.
pub(super) fn sealing_threads(sealer: Arc<Sealer>) -> std::sync::mpsc::SyncSender<SealJob> {
    // Room for everything the uploader keeps in flight, so a send never
    // waits: at most one batch beyond `IN_FLIGHT`.
    let (tx, rx) = std::sync::mpsc::sync_channel::<SealJob>(4 * BATCH_OBJECTS);
    let rx = Arc::new(std::sync::Mutex::new(rx));
    let n = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(1, 4));
    for i in 0..n {
        let rx = Arc::clone(&rx);
        let sealer = Arc::clone(&sealer);
        let spawned = std::thread::Builder::new()
            .name(format!("seal-{i}"))
            .spawn(move || loop {
                let job = match rx.lock() {
                    Ok(rx) => rx.recv(),
                    Err(_) => return,
                };
                let Ok((made, back)) = job else {
                    return;
                };
                let mut sealed = Vec::with_capacity(made.data.len() + 64);
                sealer.seal_object(&made.id, &made.data, &mut sealed);
                drop(made.data);
                let _ = back.send((made.id, sealed));
            });
        if let Err(e) = spawned {
            tracing::debug!(error = %e, "cannot start a sealing thread");
        }
    }
    tx
}

/// Streams sealed objects into packs.
pub(super) struct Uploader<'a> {
    pub(super) remote: &'a mut Remote,
    pub(super) pool: std::sync::mpsc::SyncSender<SealJob>,
    pub(super) batch: Vec<Made>,
    pub(super) batch_bytes: usize,
    pub(super) pack: PackBuilder,
    pub(super) out: bytes::BytesMut,
    /// Objects being sealed, in the order they will be sent.
    pub(super) sealing: VecDeque<(tokio::sync::oneshot::Receiver<Sealed>, usize)>,
    pub(super) sealing_bytes: usize,
    pub(super) summary: SnapshotSummary,
}

impl<'a> Uploader<'a> {
    pub(super) fn new(remote: &'a mut Remote, sealer: Arc<Sealer>) -> Self {
        Self {
            remote,
            pool: sealing_threads(sealer),
            batch: Vec::new(),
            batch_bytes: 0,
            pack: PackBuilder::default(),
            out: bytes::BytesMut::new(),
            sealing: VecDeque::new(),
            sealing_bytes: 0,
            summary: SnapshotSummary::default(),
        }
    }

    pub(super) async fn add(&mut self, made: Made) -> Result<(), Error> {
        self.batch_bytes += made.data.len();
        self.batch.push(made);
        if self.batch_bytes >= BATCH_BYTES || self.batch.len() >= BATCH_OBJECTS {
            self.flush_batch().await?;
        }
        Ok(())
    }

    /// Asks which objects of the batch the server lacks and starts sealing
    /// those on the blocking pool; sealed objects are sent while the next
    /// batch is read and sealed, at most [`IN_FLIGHT`] bytes behind.
    async fn flush_batch(&mut self) -> Result<(), Error> {
        let batch = std::mem::take(&mut self.batch);
        self.batch_bytes = 0;
        if batch.is_empty() {
            return Ok(());
        }
        let ids: Vec<ObjectId> = batch.iter().map(|m| m.id).collect();
        let have = self.remote.have(&ids).await?;
        for (made, _) in batch.into_iter().zip(have).filter(|(_, have)| !have) {
            let len = made.data.len();
            let (tx, rx) = tokio::sync::oneshot::channel();
            self.pool
                .send((made, tx))
                .map_err(|_| Error::Internal("the sealing threads stopped".into()))?;
            self.sealing.push_back((rx, len));
            self.sealing_bytes += len;
        }
        self.drain(IN_FLIGHT).await
    }

    /// Appends sealed objects, oldest first, until at most `limit` bytes
    /// are still being sealed.
    async fn drain(&mut self, limit: usize) -> Result<(), Error> {
        while self.sealing_bytes > limit {
            let Some((handle, len)) = self.sealing.pop_front() else {
                break;
            };
            self.sealing_bytes -= len;
            let (id, sealed) = handle
                .await
                .map_err(|_| Error::Internal("sealing stopped".into()))?;
            self.append(id, sealed).await?;
        }
        Ok(())
    }

    async fn append(&mut self, id: ObjectId, sealed: Vec<u8>) -> Result<(), Error> {
        if !self.pack.fits(sealed.len(), PACK_TARGET) {
            self.close_pack().await?;
        }
        self.pack.push(id, sealed.len());
        self.summary.new_objects += 1;
        self.summary.sent_bytes += sealed.len() as u64;
        if self.out.is_empty() && sealed.len() >= PACKET {
            // A large object goes out in packets cut from it, uncopied.
            let mut sealed = Bytes::from(sealed);
            while sealed.len() >= PACKET {
                self.remote.pack_data(sealed.split_to(PACKET)).await?;
            }
            self.out.extend_from_slice(&sealed);
            return Ok(());
        }
        self.out.extend_from_slice(&sealed);
        while self.out.len() >= PACKET {
            let packet = self.out.split_to(PACKET).freeze();
            self.remote.pack_data(packet).await?;
        }
        Ok(())
    }

    async fn close_pack(&mut self) -> Result<(), Error> {
        if self.pack.is_empty() {
            return Ok(());
        }
        if !self.out.is_empty() {
            let packet = self.out.split().freeze();
            self.remote.pack_data(packet).await?;
        }
        let entries = self.pack.finish();
        self.remote.pack_end(entries).await?;
        self.summary.packs += 1;
        Ok(())
    }

    /// Sends everything still being sealed and closes the pack.
    pub(super) async fn finish(&mut self) -> Result<(), Error> {
        self.flush_batch().await?;
        self.drain(0).await?;
        self.close_pack().await
    }
}
