//! The repository extension (`docs/PROTOCOL.md` §13), requests 1260-1271
//! (the passphrase login and key removal in `passphrase.rs`):
//! the session checks the rules (pack index, staging, paging), storage
//! (`storage/repo.rs`) keeps packs, objects, snapshots and envelopes, and
//! this handler carries each [`RepoAction`] out on the blocking pool.
//!
//! Per connection it holds the pack being received (a blob writer, aborted
//! if the connection ends before the pack's end) and the id of the stage
//! its snapshot references are collected under (in storage, not here; the
//! stage is dropped when the connection ends).

use std::io::Read;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use protocol::repo::message::{ForgetRefusal, ObjectId, RepoResponse};
use protocol::repo::pack::Located;
use protocol::session::server::{RepoAction, RepoOutcome};
use protocol::{ClientId, Response};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use crate::connection::{Connection, Ended};
use crate::storage::{ObjectPlace, PackUpload, StageId, Storage, StorageError};

/// What a connection keeps of repository work between requests.
#[derive(Debug)]
pub(in crate::connection) struct RepoConn {
    /// The pack being received, if one is open.
    pack: Option<PackUpload>,
    /// This connection's stage for snapshot references.
    stage: StageId,
    /// Whether references may be staged under `stage` now.
    staged: bool,
}

impl Default for RepoConn {
    fn default() -> Self {
        Self {
            pack: None,
            stage: StageId::random(),
            staged: false,
        }
    }
}

impl RepoConn {
    /// Whether a pack is being received.
    pub(in crate::connection) fn in_pack(&self) -> bool {
        self.pack.is_some()
    }
}

impl<R, W> Connection<R, W>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    /// Carries out a repository action and sends what the session answers.
    /// A storage failure is answered 1607 and ends the connection.
    pub(in crate::connection) async fn repo(&mut self, action: RepoAction) -> Result<(), Ended> {
        match action {
            RepoAction::Have { client_id, ids } => {
                let asked = ids.len();
                match self
                    .blocking(move |s| s.repo()?.held(client_id, &ids))
                    .await
                {
                    Ok(sizes) => {
                        let held = sizes.iter().flatten().count();
                        let bytes: u64 = sizes.iter().flatten().map(|&l| u64::from(l)).sum();
                        let on = self.shared.metrics.on(self.listener);
                        on.dedup_objects.inc_by(held as u64);
                        on.dedup_bytes.inc_by(bytes);
                        debug!(asked, held, "have");
                        let have = sizes.iter().map(Option::is_some).collect();
                        self.repo_answer(RepoOutcome::Have(have)).await
                    }
                    Err(e) => self.repo_failure("have", e).await,
                }
            }
            RepoAction::PackData {
                client_id,
                first,
                content,
            } => self.pack_data(client_id, first, content).await,
            RepoAction::StorePack {
                client_id,
                size,
                objects,
            } => self.store_pack(client_id, size, objects).await,
            RepoAction::StageRefs {
                client_id,
                first,
                ids,
            } => {
                let stage = self.repo.stage;
                self.repo.staged = true;
                let count = ids.len();
                match self
                    .blocking(move |s| s.repo()?.stage_refs(stage, client_id, first, &ids))
                    .await
                {
                    Ok(missing) => {
                        debug!(refs = count, missing, first, "snapshot references staged");
                        self.repo_answer(RepoOutcome::Staged { missing }).await
                    }
                    Err(e) => self.repo_failure("stage references", e).await,
                }
            }
            RepoAction::DropStaged { reply } => {
                if let Err(e) = self.drop_stage().await {
                    return self.repo_failure("drop staged references", e).await;
                }
                if let Response::Repo(RepoResponse::SnapshotRefused { missing, .. }) = &reply {
                    self.shared
                        .metrics
                        .snapshot_failed(self.listener, "missing_objects");
                    info!(
                        missing,
                        "snapshot refused: references to objects not stored"
                    );
                }
                self.reply(&reply).await
            }
            RepoAction::CommitSnapshot {
                client_id,
                time,
                meta,
            } => self.commit_snapshot(client_id, time, meta).await,
            RepoAction::ListSnapshots {
                client_id,
                after,
                limit,
            } => {
                match self
                    .blocking(move |s| s.repo()?.snapshots(client_id, after, limit))
                    .await
                {
                    Ok(entries) => {
                        debug!(after, entries = entries.len(), "snapshots listed");
                        self.repo_answer(RepoOutcome::Snapshots(entries)).await
                    }
                    Err(e) => self.repo_failure("list snapshots", e).await,
                }
            }
            RepoAction::Fetch {
                client_id,
                ids,
                packet,
            } => self.fetch(client_id, ids, packet).await,
            RepoAction::PutKey {
                client_id,
                slot,
                envelope,
                reply,
            } => {
                let now = SystemTime::now();
                let append_only = self.shared.config.append_only;
                match self
                    .blocking(move |s| {
                        s.repo()?
                            .put_key(client_id, slot, &envelope, now, append_only)
                    })
                    .await
                {
                    Ok(true) => {
                        info!(slot, "key envelope stored");
                        self.reply(&reply).await
                    }
                    Ok(false) => {
                        info!(
                            slot,
                            "key envelope kept: the slot is written once (slot 0, or append-only)"
                        );
                        self.reply(&Response::Repo(RepoResponse::KeyExists { slot }))
                            .await
                    }
                    Err(e) => self.repo_failure("store a key envelope", e).await,
                }
            }
            RepoAction::GetKeys { client_id } => {
                match self.blocking(move |s| s.repo()?.keys(client_id)).await {
                    Ok(slots) => {
                        debug!(slots = slots.len(), "key envelopes sent");
                        self.repo_answer(RepoOutcome::Keys(slots)).await
                    }
                    Err(e) => self.repo_failure("read key envelopes", e).await,
                }
            }
            RepoAction::DeleteKey { client_id, slot } => self.delete_key(client_id, slot).await,
            RepoAction::FindPassphrase { name } => self.find_passphrase(name).await,
            RepoAction::Forget { client_id, ids } => {
                let append_only = self.shared.config.append_only;
                let asked = ids.len();
                match self
                    .blocking(move |s| s.repo()?.client_forget(client_id, &ids, append_only))
                    .await
                {
                    Ok(Some(n)) => {
                        info!(asked, forgotten = n, "snapshots forgotten");
                        let count = u32::try_from(n).unwrap_or(u32::MAX);
                        self.repo_answer(RepoOutcome::Forgotten(Ok(count))).await
                    }
                    Ok(None) => {
                        info!(asked, "forget refused: append-only");
                        self.repo_answer(RepoOutcome::Forgotten(Err(ForgetRefusal::APPEND_ONLY)))
                            .await
                    }
                    Err(e) => self.repo_failure("forget snapshots", e).await,
                }
            }
        }
    }

    /// Appends a packet to the open pack, opening one on the first. No
    /// answer: the pack's end is answered.
    async fn pack_data(
        &mut self,
        client_id: ClientId,
        first: bool,
        content: Bytes,
    ) -> Result<(), Ended> {
        if first {
            self.abort_pack().await;
        }
        let pack = self.repo.pack.take();
        if pack.is_none() && !first {
            return Err(Ended::Invariant("pack data with no pack open"));
        }
        let written = self
            .blocking(move |s| {
                let mut pack = match pack {
                    Some(pack) => pack,
                    None => s.begin_pack(client_id)?,
                };
                if let Err(e) = pack.write(&content) {
                    let _ = pack.abort();
                    return Err(e);
                }
                Ok(pack)
            })
            .await;
        match written {
            Ok(pack) => {
                if first {
                    debug!("pack started");
                }
                self.repo.pack = Some(pack);
                Ok(())
            }
            Err(e) => self.repo_failure("write a pack", e).await,
        }
    }

    /// The quota the server's configuration gives `client_id`
    /// (`docs/PROTOCOL.md` §13.9; its own setting in the metadata, read
    /// in the transaction that charges it, overrides this).
    pub(in crate::connection) fn configured_quota(&self, client_id: ClientId) -> Option<u64> {
        let name = self
            .session
            .client()
            .map(|(_, name)| name.to_string())
            .unwrap_or_default();
        self.shared.config.quotas.of(client_id, &name)
    }

    /// Makes the pack durable and records its objects (`docs/PROTOCOL.md`
    /// §13.4), then answers 1661; or, when the pack does not fit the
    /// client's quota, discards it and answers 1682 (§13.9).
    async fn store_pack(
        &mut self,
        client_id: ClientId,
        size: u64,
        objects: Vec<Located>,
    ) -> Result<(), Ended> {
        let Some(pack) = self.repo.pack.take() else {
            return Err(Ended::Invariant("a pack's end with no pack open"));
        };
        let started = Instant::now();
        let count = objects.len();
        let now = SystemTime::now();
        let quota = self.configured_quota(client_id);
        match self
            .blocking(move |s| s.store_pack(pack, size, objects, now, quota))
            .await
        {
            Ok(added) => {
                let metrics = &self.shared.metrics;
                metrics.commit_took(self.listener, "pack", started.elapsed());
                metrics.on(self.listener).packs_stored.inc();
                let secs = started.elapsed().as_secs_f64();
                info!(
                    size,
                    objects = count,
                    added,
                    secs = format_args!("{secs:.3}"),
                    "pack stored"
                );
                self.repo_answer(RepoOutcome::PackStored { added }).await
            }
            Err(StorageError::QuotaExceeded {
                stored,
                quota,
                size,
            }) => {
                info!(stored, quota, size, "pack refused: over the client's quota");
                self.shared.metrics.snapshot_failed(self.listener, "quota");
                self.repo_answer(RepoOutcome::QuotaExceeded {
                    stored,
                    quota,
                    size,
                })
                .await
            }
            Err(e) => self.repo_failure("store a pack", e).await,
        }
    }

    /// Commits the snapshot of the staged references, or says why not.
    async fn commit_snapshot(
        &mut self,
        client_id: ClientId,
        time: u64,
        meta: Bytes,
    ) -> Result<(), Ended> {
        let stage = self.repo.stage;
        let now = SystemTime::now();
        let started = Instant::now();
        let quota = self.configured_quota(client_id);
        let committed = self
            .blocking(move |s| {
                s.repo()?
                    .commit_snapshot(stage, client_id, time, &meta, now, quota)
            })
            .await;
        // Committed or refused, the stage is gone.
        self.repo.staged = false;
        match committed {
            Ok(outcome) => {
                let metrics = &self.shared.metrics;
                match &outcome {
                    Ok(id) => {
                        metrics.commit_took(self.listener, "snapshot", started.elapsed());
                        metrics.on(self.listener).snapshots_committed.inc();
                        info!(snapshot = id, time, "snapshot committed")
                    }
                    Err((reason, missing)) => {
                        let cause = if *missing > 0 {
                            "missing_objects"
                        } else if *reason == protocol::repo::message::CommitRefusal::QUOTA {
                            "quota"
                        } else {
                            "refused"
                        };
                        metrics.snapshot_failed(self.listener, cause);
                        info!(reason = reason.0, missing, "snapshot refused at commit")
                    }
                }
                self.repo_answer(RepoOutcome::Committed(outcome)).await
            }
            Err(e) => {
                self.shared
                    .metrics
                    .snapshot_failed(self.listener, "storage");
                self.repo_failure("commit a snapshot", e).await
            }
        }
    }

    /// Streams each asked object: 1666 and its bytes in 1668 packets, or
    /// 1667 for an id the client does not hold. The objects are read by one
    /// thread of the blocking pool for the whole fetch, at most
    /// [`FETCH_QUEUE`] packets ahead of the connection, so memory stays a
    /// few packets whatever the objects' sizes. A pack that cannot be read,
    /// or is shorter than its index says, is answered 1607 (the connection
    /// ends).
    async fn fetch(
        &mut self,
        client_id: ClientId,
        ids: Vec<ObjectId>,
        packet: usize,
    ) -> Result<(), Ended> {
        let asked = ids.len();
        let lookup = ids.clone();
        let places = match self
            .blocking(move |s| s.repo()?.locate(client_id, &lookup))
            .await
        {
            Ok(places) => places,
            Err(e) => return self.repo_failure("locate objects", e).await,
        };
        let (tx, mut rx) = mpsc::channel(FETCH_QUEUE);
        let storage = self.shared.storage.clone();
        let alive = self.shared.alive.clone();
        let objects: Vec<(ObjectId, Option<ObjectPlace>)> = ids.into_iter().zip(places).collect();
        tokio::task::spawn_blocking(move || {
            let _alive = alive;
            if let Err(e) = read_objects(&storage, objects, packet, &tx) {
                let _ = tx.blocking_send(Err(e));
            }
        });
        let (mut sent, mut bytes) = (0usize, 0u64);
        while let Some(piece) = rx.recv().await {
            let response = match piece {
                Ok(response) => response,
                Err(e) => return self.repo_failure("read a pack", e).await,
            };
            match &response {
                RepoResponse::ObjectMissing { id } => debug!(object = ?id, "fetch: no such object"),
                RepoResponse::ObjectBegin { len, .. } => {
                    sent += 1;
                    bytes += u64::from(*len);
                }
                _ => {}
            }
            self.reply(&Response::Repo(response)).await?;
        }
        debug!(asked, sent, bytes, "fetch answered");
        Ok(())
    }

    async fn repo_answer(&mut self, outcome: RepoOutcome) -> Result<(), Ended> {
        let response = self.session.repo_done(outcome)?;
        self.reply(&response).await
    }

    async fn repo_failure(&mut self, what: &'static str, e: StorageError) -> Result<(), Ended> {
        error!(cause = %e, "repository: could not {what}");
        let response = self.session.storage_failed();
        self.reply(&response).await?;
        Err(Ended::Storage(e))
    }

    /// Drops the references staged on this connection, if any.
    async fn drop_stage(&mut self) -> Result<(), StorageError> {
        if !std::mem::take(&mut self.repo.staged) {
            return Ok(());
        }
        let stage = self.repo.stage;
        self.blocking(move |s| s.repo()?.drop_stage(stage)).await
    }

    /// Aborts the pack being received, if any, on the blocking pool.
    async fn abort_pack(&mut self) {
        if let Some(pack) = self.repo.pack.take() {
            let bytes = pack.len();
            let aborted = tokio::task::spawn_blocking(move || pack.abort()).await;
            match aborted {
                Ok(Ok(())) => debug!(bytes, "unfinished pack discarded"),
                Ok(Err(e)) => {
                    warn!(cause = %e, "could not discard an unfinished pack; start-up recovery removes it")
                }
                Err(e) => {
                    warn!(cause = %e, "could not discard an unfinished pack; start-up recovery removes it")
                }
            }
        }
    }

    /// When the connection ends: aborts an unfinished pack and drops
    /// staged references (failures are only logged: start-up recovery
    /// removes what is left).
    pub(in crate::connection) async fn discard_repo(&mut self) {
        self.abort_pack().await;
        if let Err(e) = self.drop_stage().await {
            warn!(cause = %e, "could not drop staged references; start-up recovery drops them");
        }
    }
}

/// Object answers read ahead of the connection during a fetch.
const FETCH_QUEUE: usize = 4;

/// Objects read with one ranged read when they follow each other in one
/// pack with at most this many bytes between them (read and dropped): an
/// object store charges a request per read, and a restore asks for
/// neighbours.
const COALESCE_GAP: u64 = 256 << 10;

/// The most bytes one coalesced read spans.
const COALESCE_SPAN: u64 = 64 << 20;

/// Splits `objects` (in the order asked) into runs that one ranged read of
/// their pack can serve: the same pack, each after the one before within
/// [`COALESCE_GAP`], spanning at most [`COALESCE_SPAN`]. A missing object
/// is a run of its own. The order is kept.
fn coalesce(
    objects: Vec<(ObjectId, Option<ObjectPlace>)>,
) -> Vec<Vec<(ObjectId, Option<ObjectPlace>)>> {
    let mut runs: Vec<Vec<(ObjectId, Option<ObjectPlace>)>> = Vec::new();
    for (id, place) in objects {
        let joins = match (
            runs.last().and_then(|r| r.first()),
            runs.last().and_then(|r| r.last()),
            &place,
        ) {
            (Some((_, Some(first))), Some((_, Some(last))), Some(next)) => {
                let end = last.offset + u64::from(last.len);
                next.blob == last.blob
                    && next.offset >= end
                    && next.offset - end <= COALESCE_GAP
                    && next.offset + u64::from(next.len) - first.offset <= COALESCE_SPAN
            }
            _ => false,
        };
        match runs.last_mut() {
            Some(run) if joins => run.push((id, place)),
            _ => runs.push(vec![(id, place)]),
        }
    }
    runs
}

/// The fetch reader: for each object, 1667, or 1666 then its bytes in
/// 1668 packets of at most `packet` bytes. Neighbours in a pack are read
/// with one ranged read ([`coalesce`]). Returns early (without error) once
/// the connection stopped listening.
fn read_objects(
    storage: &Storage,
    objects: Vec<(ObjectId, Option<ObjectPlace>)>,
    packet: usize,
    tx: &mpsc::Sender<Result<RepoResponse, StorageError>>,
) -> Result<(), StorageError> {
    let packet = packet.max(1);
    for run in coalesce(objects) {
        let span = match (run.first(), run.last()) {
            (Some((_, Some(first))), Some((_, Some(last)))) => Some(ObjectPlace {
                blob: first.blob.clone(),
                offset: first.offset,
                len: u32::try_from(last.offset + u64::from(last.len) - first.offset)
                    .map_err(|_| StorageError::Corrupt("a coalesced read over 4 GiB".into()))?,
            }),
            _ => None,
        };
        let mut reader = match &span {
            Some(span) => Some(storage.open_object(span)?),
            None => None,
        };
        let mut at = span.as_ref().map_or(0, |s| s.offset);
        for (id, place) in run {
            let (Some(place), Some(reader)) = (place, reader.as_mut()) else {
                if tx
                    .blocking_send(Ok(RepoResponse::ObjectMissing { id }))
                    .is_err()
                {
                    return Ok(());
                }
                continue;
            };
            let short = |place: &ObjectPlace| {
                error!(object = ?id, "FETCH ABORTED: a pack is shorter than its index; closing the connection");
                StorageError::Corrupt(format!("pack {} is shorter than its index", place.blob))
            };
            let io = |place: &ObjectPlace, e: std::io::Error| StorageError::Io {
                op: "read",
                what: place.blob.0.clone(),
                source: e.into(),
            };
            // Skip what lies between the previous object and this one.
            let gap = place.offset - at;
            let skipped = std::io::copy(&mut reader.by_ref().take(gap), &mut std::io::sink())
                .map_err(|e| io(&place, e))?;
            if skipped < gap {
                return Err(short(&place));
            }
            let len = place.len;
            if tx
                .blocking_send(Ok(RepoResponse::ObjectBegin { id, len }))
                .is_err()
            {
                return Ok(());
            }
            let mut left = u64::from(len);
            while left > 0 {
                let want = usize::try_from(left).map_or(packet, |l| l.min(packet));
                let mut buf = vec![0u8; want];
                let n = read_full(reader, &mut buf).map_err(|e| io(&place, e))?;
                if n < want {
                    return Err(short(&place));
                }
                left -= want as u64;
                let data = RepoResponse::ObjectData {
                    content: buf.into(),
                };
                if tx.blocking_send(Ok(data)).is_err() {
                    return Ok(());
                }
            }
            at = place.offset + u64::from(len);
        }
    }
    Ok(())
}

/// Reads until `buf` is full or the reader ends; how many bytes were read.
fn read_full(reader: &mut (impl Read + ?Sized), buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(buf.get_mut(filled..).unwrap_or_default()) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::BlobKey;

    fn at(blob: &str, offset: u64, len: u32) -> Option<ObjectPlace> {
        Some(ObjectPlace {
            blob: BlobKey(blob.to_owned()),
            offset,
            len,
        })
    }

    fn id(n: u8) -> ObjectId {
        ObjectId([n; 32])
    }

    /// The ids of each run.
    fn shape(runs: &[Vec<(ObjectId, Option<ObjectPlace>)>]) -> Vec<Vec<u8>> {
        runs.iter()
            .map(|r| r.iter().map(|(id, _)| id.0[0]).collect())
            .collect()
    }

    #[test]
    fn neighbours_in_one_pack_share_a_read_and_the_order_is_kept() {
        let gap = COALESCE_GAP;
        let objects = vec![
            (id(1), at("p1", 0, 100)),
            (id(2), at("p1", 100, 50)),
            // A small gap: still one read.
            (id(3), at("p1", 150 + gap, 10)),
            // Too far after the previous one.
            (id(4), at("p1", 160 + 2 * gap + 1, 10)),
            // Another pack.
            (id(5), at("p2", 0, 10)),
            // Missing: alone.
            (id(6), None),
            (id(7), at("p2", 10, 10)),
            // Before the previous one (asked out of order): a new read.
            (id(8), at("p2", 0, 10)),
            // Asked again: a new read.
            (id(8), at("p2", 0, 10)),
        ];
        let runs = coalesce(objects);
        assert_eq!(
            shape(&runs),
            vec![
                vec![1, 2, 3],
                vec![4],
                vec![5],
                vec![6],
                vec![7],
                vec![8],
                vec![8]
            ]
        );
    }

    #[test]
    fn a_read_spans_at_most_the_limit() {
        let len = u32::try_from(COALESCE_SPAN / 4).unwrap();
        let objects: Vec<_> = (0..6u8)
            .map(|n| (id(n), at("p", u64::from(n) * u64::from(len), len)))
            .collect();
        assert_eq!(
            shape(&coalesce(objects)),
            vec![vec![0, 1, 2, 3], vec![4, 5]]
        );
    }
}
