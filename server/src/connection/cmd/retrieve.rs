//! List (1240), restore (1241) and delete (1242) (`docs/PROTOCOL.md` §11):
//! storage calls here, the rules (paging, the restore framing, the answers)
//! in the session; a restore's content comes from the reader thread of
//! [`restore`](crate::connection::restore).

use std::time::{Instant, UNIX_EPOCH};

use protocol::restore::{FoundVersion, RestoreSender};
use protocol::retrieval::{ListEntry, RetrievalResponse};
use protocol::session::server::{DeleteOutcome, RestoreStart};
use protocol::{ClientId, FileName, Response};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, error, info};

use crate::connection::{restore, Connection, Ended};
use crate::storage::{Deletion, StorageError, VersionRecord};

impl<R, W> Connection<R, W>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    /// Lists a page of the client's versions (`docs/PROTOCOL.md` §11.2):
    /// the session sets the page and the cursor. A storage failure is
    /// answered 1607 and ends the connection.
    pub(in crate::connection) async fn list(
        &mut self,
        client_id: ClientId,
        all_versions: bool,
        skip: u64,
        limit: usize,
    ) -> Result<(), Ended> {
        let found = self
            .blocking(move |s| s.meta().list(client_id, all_versions, skip, limit))
            .await;
        let versions = match found {
            Ok(v) => v,
            Err(e) => return self.retrieval_failure(e).await,
        };
        let response = self
            .session
            .listed(versions.into_iter().map(list_entry).collect())?;
        if let Response::Retrieval(RetrievalResponse::ListPage {
            next_cursor,
            entries,
        }) = &response
        {
            debug!(
                all_versions,
                cursor = skip,
                entries = entries.len(),
                next_cursor,
                "list"
            );
        }
        self.reply(&response).await
    }

    /// Finds the version to restore (§11.3) and sends it, or 1644.
    pub(in crate::connection) async fn find_version(
        &mut self,
        client_id: ClientId,
        file: FileName,
        version: u64,
    ) -> Result<(), Ended> {
        let f = file.clone();
        let found = self
            .blocking(move |s| s.meta().find_version(client_id, &f, version))
            .await;
        let record = match found {
            Ok(found) => found,
            Err(e) => return self.retrieval_failure(e).await,
        };
        let wanted = record.as_ref().map(|v| FoundVersion {
            version: u64::try_from(v.version).unwrap_or_default(),
            size: v.size,
            cksum: v.cksum,
            file: v.file.clone(),
        });
        match (self.session.found_version(wanted, &mut self.rng)?, record) {
            (RestoreStart::Send(sender), Some(record)) => self.restore(sender, record).await,
            (RestoreStart::Answer(answer), _) => {
                // File names only at debug level (docs/SECURITY.md).
                info!(version, "restore: no such file or version");
                debug!(file = ?file, version, "the file asked for");
                self.reply(&answer).await
            }
            (RestoreStart::Send(_), None) => {
                Err(Ended::Invariant("a restore sender without a version"))
            }
        }
    }

    /// Deletes every version of `file` unless the server is append-only
    /// (§11.4); the session words the answer.
    pub(in crate::connection) async fn delete(
        &mut self,
        client_id: ClientId,
        file: FileName,
    ) -> Result<(), Ended> {
        let f = file.clone();
        let append_only = self.shared.config.append_only;
        let outcome = self
            .blocking(move |s| s.delete_file(client_id, &f, append_only))
            .await;
        let outcome = match outcome {
            Ok(Deletion::Deleted(removed)) => {
                info!(versions = removed.len(), "deleted");
                debug!(file = ?file, "the file deleted");
                DeleteOutcome::Deleted(u32::try_from(removed.len()).unwrap_or(u32::MAX))
            }
            Ok(Deletion::NotFound) => {
                info!("delete: no such file");
                debug!(file = ?file, "the file asked for");
                DeleteOutcome::NotFound
            }
            Ok(Deletion::Refused) => {
                info!("delete refused: append-only");
                debug!(file = ?file, "the file asked for");
                DeleteOutcome::Refused
            }
            Err(e) => return self.retrieval_failure(e).await,
        };
        let response = self.session.deleted(outcome)?;
        self.reply(&response).await
    }

    async fn retrieval_failure(&mut self, e: StorageError) -> Result<(), Ended> {
        error!(cause = %e, "retrieval failed in storage");
        let response = self.session.storage_failed();
        self.reply(&response).await?;
        Err(Ended::Storage(e))
    }

    /// Sends one version: the sender's 1641, then its ciphertext (under the
    /// sender's fresh IV) in 1642 packets streamed from the reader thread.
    async fn restore(
        &mut self,
        mut sender: Box<RestoreSender>,
        version: VersionRecord,
    ) -> Result<(), Ended> {
        let Some(cipher) = sender.take_cipher() else {
            return Err(Ended::Invariant("a restore sender without its cipher"));
        };
        let started = Instant::now();
        let (file, number, size) = (version.file.clone(), version.version, version.size);
        let mut packets = match restore::start(
            self.shared.storage.clone(),
            version,
            cipher,
            sender.packet_len(),
            self.shared.alive.clone(),
        ) {
            Ok(rx) => rx,
            Err(e) => {
                error!(cause = %e, "retrieval failed in storage");
                self.reply(&Response::GeneralError).await?;
                return Err(Ended::Storage(e));
            }
        };
        self.reply(&sender.begin()).await?;
        while let Some(next) = packets.recv().await {
            match next {
                Ok(content) => {
                    let packet = sender.ciphertext(content).map_err(Ended::Framing)?;
                    self.reply(&packet).await?;
                }
                Err(e) => {
                    error!(version = number, cause = %e, "RESTORE ABORTED: stored content is damaged or unreadable; closing the connection");
                    debug!(file = ?file, version = number, "the file whose restore was aborted");
                    return Err(Ended::Restore(e));
                }
            }
        }
        sender.finish().map_err(Ended::Framing)?;
        let secs = started.elapsed().as_secs_f64();
        let mb_per_s = size as f64 / 1e6 / secs.max(1e-6);
        debug!(file = ?file, version = number, "the file restored");
        info!(
            version = number,
            size,
            secs = format_args!("{secs:.3}"),
            mb_per_s = format_args!("{mb_per_s:.1}"),
            "restore sent"
        );
        Ok(())
    }
}

/// A version as a list entry.
fn list_entry(v: VersionRecord) -> ListEntry {
    ListEntry {
        version: u64::try_from(v.version).unwrap_or_default(),
        size: v.size,
        stored_at: v
            .stored_at
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default(),
        cksum: v.cksum,
        file: v.file,
    }
}
