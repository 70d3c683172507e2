//! Backup runs: planning each file, sending it until the server's cksum
//! matches ours, and the run over several connections at once.

use std::time::{Duration, Instant};

use protocol::repo::message::RepoResponse;
use protocol::session::client::{ClientEvent, PlanError, ServerErrorStep, UploadPlan, Verdict};
use protocol::session::{MAX_SEND_ATTEMPTS, SERVER_ERROR_RESENDS};
use protocol::{Limits, Response, UserName};

use crate::error::{Error, ErrorKind};
use crate::fanout::{fan_out, ItemFailure, Queue};
use crate::files::BackupItem;
use crate::report::{FileReport, Outcome, RunKind, RunReport};
use crate::settings::PacketSize;
use crate::upload;

use super::{Client, Keyed};

impl Client {
    /// Plans the upload of `item` under the packet-size policy.
    ///
    /// # Errors
    /// When the file is too large for the legacy fields or the packet count.
    pub fn plan(&self, item: &BackupItem) -> Result<UploadPlan, Error> {
        let max_packet = Limits::default().max_packet_content;
        let dialect = self.options.dialect();
        let name = item.name.clone();
        let planned = match self.options.packet_size {
            PacketSize::Auto(n) => UploadPlan::new_in(dialect, name, item.size, n, max_packet),
            PacketSize::Fixed(n) => UploadPlan::fixed(dialect, name, item.size, n, max_packet),
        };
        planned.map_err(|e| match e {
            PlanError::TooLarge { size, max } => Error::TooLarge {
                path: item.path.clone(),
                size,
                max,
            },
            PlanError::TooManyPackets {
                size,
                packet_size,
                max,
                ..
            } => Error::TooManyPackets {
                path: item.path.clone(),
                size,
                packet_size,
                max,
            },
            PlanError::PacketSize { size, max } => Error::BadPacketSize {
                size: size as u64,
                max,
            },
        })
    }

    /// Sends one file until the server's cksum matches ours, at most
    /// [`MAX_SEND_ATTEMPTS`] times, and returns the attempts and the cksum.
    async fn upload(
        &self,
        keyed: &mut Keyed,
        item: &BackupItem,
        plan: &UploadPlan,
    ) -> Result<(u8, u32), ItemFailure> {
        let fatal = ItemFailure::from;
        let server = self.options.server.clone();
        let path = item.path.display().to_string();
        let Keyed {
            conn,
            session,
            identity,
            ..
        } = keyed;
        let key = session.aes_key().cloned().ok_or_else(|| {
            fatal(Error::Internal(
                "no session key before sending a file".into(),
            ))
        })?;
        session.begin_file();
        loop {
            let attempt = session.attempts() + 1;
            self.feedback.attempt(item, attempt);
            let cksum = upload::send_file(
                conn,
                &item.path,
                plan,
                key.clone(),
                identity.client_id,
                session.numbering(),
                self.feedback.as_ref(),
            )
            .await;
            let cksum = match cksum {
                Ok(c) => c,
                Err(e) if e.error.kind() == ErrorKind::Unreachable => {
                    // The server may have said why before it hung up.
                    let said = conn.pending_response().await;
                    if let Some(Response::Repo(RepoResponse::QuotaExceeded {
                        stored,
                        quota,
                        size,
                    })) = said
                    {
                        return Err(fatal(quota_refused(&server, item, stored, quota, size)));
                    }
                    let said_error = matches!(said, Some(Response::GeneralError));
                    let server_errors = session.server_errors();
                    if server_errors > 0 || said_error {
                        return Err(fatal(Error::ServerFailed {
                            server,
                            request: format!("sending {path}"),
                            times: server_errors + u8::from(said_error),
                        }));
                    }
                    return Err(e);
                }
                Err(e) => return Err(e),
            };
            session.file_sent(plan, cksum);
            let doing = format!("waiting for the server's checksum of {path}");
            // Allow for the server syncing the file: a second per 32 MiB.
            let sync_allowance = Duration::from_secs(item.size >> 25);
            let event = loop {
                let response = conn
                    .recv_within(sync_allowance, &doing)
                    .await
                    .map_err(fatal)?;
                match session.handle(response, &mut rand::rngs::OsRng) {
                    Ok(ClientEvent::RetryAcknowledged) => continue,
                    Ok(event) => break event,
                    Err(e) => return Err(fatal(self.session_error(e, Some(identity.client_id)))),
                }
            };
            match event {
                ClientEvent::Verdict {
                    verdict: Verdict::Match,
                    reply,
                } => {
                    let doing = format!("confirming the checksum of {path}");
                    return match self
                        .exchange(conn, session, &reply, &doing)
                        .await
                        .map_err(fatal)?
                    {
                        ClientEvent::Done => {
                            if let Some(declared) = conn.take_misdeclared_ack() {
                                // The session checked the id: the file is
                                // committed and its checksum matched.
                                self.feedback.notice(&format!(
                                    "the server at {server} confirmed {path} with a 1604 declaring {declared} bytes that carried only its 16-byte id; accepted, as the id is ours and the checksum matched, so the file is stored"
                                ));
                            }
                            Ok((attempt, cksum))
                        }
                        // Refused at the commit: nothing of the file was
                        // recorded, and the connection goes on.
                        ClientEvent::QuotaExceeded {
                            stored,
                            quota,
                            size,
                        } => Err(ItemFailure {
                            error: quota_refused(&server, item, stored, quota, size),
                            connection_usable: true,
                        }),
                        other => Err(fatal(self.unexpected(&other, &doing))),
                    };
                }
                // Refused as it started: the server closes the connection.
                ClientEvent::QuotaExceeded {
                    stored,
                    quota,
                    size,
                } => return Err(fatal(quota_refused(&server, item, stored, quota, size))),
                ClientEvent::Verdict {
                    verdict: Verdict::Retry { attempt },
                    reply,
                } => {
                    self.feedback.notice(&format!(
                        "the server's checksum of {path} differed from ours on attempt {attempt} of {MAX_SEND_ATTEMPTS}; sending it again"
                    ));
                    conn.send(&reply, &format!("asking to resend {path}"))
                        .await
                        .map_err(fatal)?;
                }
                ClientEvent::Verdict {
                    verdict: Verdict::GiveUp,
                    reply,
                } => {
                    let doing = format!("reporting the failed checksum of {path}");
                    return match self
                        .exchange(conn, session, &reply, &doing)
                        .await
                        .map_err(fatal)?
                    {
                        ClientEvent::Done => Err(ItemFailure {
                            error: Error::Verification {
                                path: item.path.clone(),
                                server,
                                attempts: MAX_SEND_ATTEMPTS,
                            },
                            connection_usable: true,
                        }),
                        other => Err(fatal(self.unexpected(&other, &doing))),
                    };
                }
                ClientEvent::ServerError(ServerErrorStep::Resend { resend }) => {
                    self.feedback.notice(&format!(
                        "the server at {server} responded with an error to {path}; sending it again ({resend} of {SERVER_ERROR_RESENDS})"
                    ));
                }
                ClientEvent::ServerError(ServerErrorStep::GiveUp { times }) => {
                    return Err(fatal(Error::ServerFailed {
                        server,
                        request: format!("sending {path}"),
                        times,
                    }));
                }
                other => return Err(fatal(self.unexpected(&other, &doing))),
            }
        }
    }

    /// Backs up `items`: reconnects (or registers, see below), then sends
    /// and verifies each file in turn, over up to `options.connections`
    /// connections at once (the further ones reconnect with the same
    /// identity once the first is keyed; one that cannot be opened leaves
    /// its share to the others).
    ///
    /// Without a stored identity the client registers as `register_as`, or
    /// fails with [`Error::NotRegistered`] when that is `None`. Files that
    /// cannot be planned (too large) are failed before anything is sent.
    /// A failure of one file does not stop the others; a connection that
    /// fails takes no more files, and files no connection could take are
    /// [`Outcome::NotAttempted`].
    ///
    /// # Errors
    /// When the connection or the key exchange fails before any file is
    /// sent; failures of single files are in the [`RunReport`].
    pub async fn backup(
        &self,
        items: Vec<BackupItem>,
        register_as: Option<&UserName>,
    ) -> Result<RunReport, Error> {
        let started = Instant::now();
        let mut report = RunReport::new(RunKind::Backup, self.options.server.clone());
        let mut plans = Vec::with_capacity(items.len());
        for item in &items {
            let (plan, outcome) = match self.plan(item) {
                Ok(plan) => (Some(plan), Outcome::NotAttempted),
                Err(e) => (None, Outcome::Failed(e)),
            };
            let file = FileReport {
                path: Some(item.path.clone()),
                name: item.name.to_string_lossy(),
                version: None,
                size: item.size,
                outcome,
            };
            self.feedback.finished(&file);
            report.files.push(file);
            plans.push(plan);
        }
        let todo: Vec<(&BackupItem, &UploadPlan, usize)> = items
            .iter()
            .zip(&plans)
            .enumerate()
            .filter_map(|(i, (item, plan))| plan.as_ref().map(|p| (item, p, i)))
            .collect();
        if todo.is_empty() {
            report.elapsed = started.elapsed();
            return Ok(report);
        }
        let keyed = self.connect(register_as).await?;
        report.name = Some(keyed.identity.name.to_string());
        report.client_id = Some(keyed.identity.client_id);
        report.registered = keyed.registered;
        let total: u64 = todo.iter().map(|(item, _, _)| item.size).sum();
        self.feedback.start(todo.len(), total);
        let queue = Queue::new(todo);
        let done = fan_out(
            self.feedback.as_ref(),
            &self.options.server,
            self.options.connections,
            &queue,
            keyed,
            || self.reconnect_extra(),
            |keyed| self.send_queued(keyed, &queue),
        )
        .await;
        for (i, file) in done {
            if let Some(slot) = report.files.get_mut(i) {
                *slot = file;
            }
        }
        self.feedback.done();
        report.elapsed = started.elapsed();
        Ok(report)
    }

    /// Sends files from `queue` over `keyed` until the queue is empty or
    /// the connection fails; returns the report of each file it took, by
    /// its index in the run's report.
    async fn send_queued(
        &self,
        mut keyed: Keyed,
        queue: &BackupQueue<'_>,
    ) -> Vec<(usize, FileReport)> {
        let mut done = Vec::new();
        while let Some((_, (item, plan, i))) = queue.take() {
            let result = self.upload(&mut keyed, item, plan).await;
            let stop = matches!(&result, Err(e) if !e.connection_usable);
            let file = FileReport {
                path: Some(item.path.clone()),
                name: item.name.to_string_lossy(),
                version: None,
                size: item.size,
                outcome: match result {
                    Ok((attempts, cksum)) => Outcome::Stored { attempts, cksum },
                    Err(e) => Outcome::Failed(e.error),
                },
            };
            self.feedback.finished(&file);
            done.push((i, file));
            if stop {
                break;
            }
        }
        keyed.conn.close().await;
        done
    }
}

/// The files of a backup not yet taken by a connection, each with its
/// index in the run's report.
type BackupQueue<'a> = Queue<(&'a BackupItem, &'a UploadPlan, usize)>;

/// The failure of `item`, which the server refused as over this client's
/// quota (1682, `docs/PROTOCOL.md` §13.9).
fn quota_refused(server: &str, item: &BackupItem, stored: u64, quota: u64, size: u64) -> Error {
    Error::QuotaExceeded {
        server: server.to_owned(),
        stored: Some(stored),
        quota: Some(quota),
        size: Some(size),
        file: Some(item.path.clone()),
    }
}
