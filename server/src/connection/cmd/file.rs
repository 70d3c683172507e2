//! A file's packets (1028), then the client's cksum verdict (1029 commit,
//! 1030 resend, 1031 give up) (`docs/PROTOCOL.md` §7, §8): the session
//! decrypts and checks; the plaintext goes to the upload's writer thread
//! ([`upload`](crate::storage::ingest)); a confirmed file is committed.

use bytes::BytesMut;
use protocol::session::server::FileStart;
use protocol::wire::{Dialect, RequestKind};
use protocol::{ClientId, FileName, Request, RequestFrame, Response};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, info, warn};

use crate::connection::{Connection, Ended};
use crate::storage::ingest as upload;
use crate::storage::{QuotaSetting, StorageError, UploadCommit, INLINE_MAX};

impl<R, W> Connection<R, W>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    /// Large packets go to the writer as they are: hand one of its used
    /// buffers back for this packet's plaintext. (Small ones are copied
    /// into a batch, whose buffers are recycled by the upload itself.)
    pub(in crate::connection) fn offer_spare(&mut self, frame: &RequestFrame) {
        if let (Request::SendFile(packet), Some(upload)) = (&frame.request, self.upload.as_mut()) {
            let needed = packet.content.len() + protocol::crypto::BLOCK;
            if needed > upload::BATCH {
                if let Some(buf) = upload.spare(needed) {
                    self.session.recycle(buf);
                }
            }
        }
    }

    /// Carries out [`protocol::session::server::Action::Write`]: opens the
    /// upload on its first packet, writes, and on the last makes it durable
    /// and sends the 1603.
    pub(in crate::connection) async fn write(
        &mut self,
        start: Option<FileStart>,
        plaintext: BytesMut,
        done: Option<Response>,
    ) -> Result<(), Ended> {
        if let Some(start) = start {
            let Some((client_id, _)) = self.session.client() else {
                return Err(Ended::Invariant(
                    "an upload started before the client is bound",
                ));
            };
            debug!(file = ?start.file, orig_size = start.orig_size, attempt = start.attempt, "upload started");
            self.discard_upload().await;
            let quota = self.configured_quota(client_id);
            // When the client was bound with no quota of its own and the
            // configuration gives none, no quota applies: the check is
            // spared (the commit checks whatever is in force then).
            let may_apply = match self.own_quota {
                Some(QuotaSetting::Unlimited) => false,
                Some(QuotaSetting::Inherit) => quota.is_some(),
                Some(QuotaSetting::Bytes(_)) | None => true,
            };
            if start.orig_size > INLINE_MAX && may_apply {
                // A large file that cannot fit the client's quota is refused
                // before its content is received (a small one is checked at
                // its commit only). The client is still sending, so the
                // connection ends.
                let (file, size) = (start.file.clone(), start.orig_size);
                match self
                    .blocking(move |s| s.upload_fits(client_id, &file, size, quota))
                    .await
                {
                    Ok(()) => {}
                    Err(StorageError::QuotaExceeded {
                        stored,
                        quota,
                        size,
                    }) => {
                        self.quota_refused(stored, quota, size).await?;
                        return Err(Ended::Quota);
                    }
                    Err(e) => return self.storage_failure(e).await,
                }
            }
            match self.shared.storage.begin_upload(
                client_id,
                start.orig_size,
                self.shared.alive.clone(),
            ) {
                Ok(upload) => self.upload = Some(upload),
                Err(e) => return self.storage_failure(e).await,
            }
        }
        let Some(upload) = self.upload.as_mut() else {
            return Err(Ended::Invariant("file content without an upload"));
        };
        if let Err(e) = upload.write(plaintext).await {
            return self.storage_failure(e).await;
        }
        let Some(done) = done else {
            return Ok(());
        };
        let Some(upload) = self.upload.take() else {
            return Err(Ended::Invariant("an upload finished twice"));
        };
        match upload.finish().await {
            Ok(staged) => self.staged = Some(staged),
            Err(e) => return self.storage_failure(e).await,
        }
        self.reply(&done).await
    }

    /// Carries out [`protocol::session::server::Action::Commit`]: the staged
    /// content becomes the stored version of `file`, then `reply` (1604).
    pub(in crate::connection) async fn commit(
        &mut self,
        client_id: ClientId,
        file: FileName,
        size: u64,
        cksum: u32,
        reply: Response,
    ) -> Result<(), Ended> {
        let Some(staged) = self.staged.take() else {
            return Err(Ended::Invariant("a commit without staged content"));
        };
        // Storage checks the size, chooses blob or inline and applies
        // the retention policy (`Storage::commit_upload`).
        let started = staged.started;
        let committing = std::time::Instant::now();
        let commit = UploadCommit {
            client: client_id,
            file: file.clone(),
            size,
            cksum,
            quota: self.configured_quota(client_id),
        };
        match self
            .blocking(move |s| s.commit_upload(staged, commit))
            .await
        {
            Ok(_) => {}
            // Nothing was recorded. A secure-mode client heard why (1682)
            // and goes on; a legacy one heard only 1607, which it may
            // answer by repeating "CRC ok" or resending, to be refused
            // again: its connection ends, as after a storage failure.
            Err(StorageError::QuotaExceeded {
                stored,
                quota,
                size,
            }) => {
                self.quota_refused(stored, quota, size).await?;
                if self.session.dialect() == Dialect::Legacy {
                    return Err(Ended::Quota);
                }
                return Ok(());
            }
            Err(e) => return self.storage_failure(e).await,
        }
        let metrics = &self.shared.metrics;
        metrics.commit_took(self.listener, "upload", committing.elapsed());
        let on = metrics.on(self.listener);
        on.uploads_committed.inc();
        on.upload_bytes.inc_by(size);
        let secs = started.elapsed().as_secs_f64();
        let mb_per_s = size as f64 / 1e6 / secs.max(1e-6);
        // File names only at debug level (docs/SECURITY.md).
        debug!(file = ?file, "the file committed");
        info!(
            size,
            cksum,
            secs = format_args!("{secs:.3}"),
            mb_per_s = format_args!("{mb_per_s:.1}"),
            "upload committed"
        );
        self.reply(&reply).await
    }

    /// Carries out [`protocol::session::server::Action::Discard`] for the
    /// verdict `kind`: the staged content is dropped, then `reply` if any.
    pub(in crate::connection) async fn discard(
        &mut self,
        kind: RequestKind,
        reply: Option<Response>,
    ) -> Result<(), Ended> {
        self.discard_upload().await;
        let cause = match (kind, &reply) {
            (_, Some(Response::GeneralError)) => {
                warn!("client confirmed a cksum for content whose padding or size was wrong; discarded");
                "bad_content"
            }
            (RequestKind::CrcRetry, _) => {
                info!("client reported a cksum mismatch; attempt discarded, a resend follows");
                "cksum_retry"
            }
            (RequestKind::CrcAbort, _) => {
                warn!("client gave up after repeated cksum mismatches; nothing committed");
                "client_gave_up"
            }
            _ => {
                info!("upload discarded");
                "discarded"
            }
        };
        self.shared.metrics.upload_failed(self.listener, cause);
        match reply {
            Some(response) => self.reply(&response).await,
            None => Ok(()),
        }
    }

    /// Answers a file the client's quota refused (`docs/PROTOCOL.md`
    /// §13.9): 1682 in secure mode, 1607 on the legacy listener.
    async fn quota_refused(&mut self, stored: u64, quota: u64, size: u64) -> Result<(), Ended> {
        info!(stored, quota, size, "file refused: over the client's quota");
        self.shared.metrics.upload_failed(self.listener, "quota");
        let response = self.session.quota_refused(stored, quota, size);
        self.reply(&response).await
    }

    /// Answers a storage failure with 1607 and ends the connection: the
    /// session has forgotten the upload, so the client cannot carry on.
    async fn storage_failure(&mut self, e: StorageError) -> Result<(), Ended> {
        self.shared.metrics.upload_failed(self.listener, "storage");
        let response = self.session.storage_failed();
        self.reply(&response).await?;
        Err(Ended::Storage(e))
    }
}
