//! Retrieval (`docs/PROTOCOL.md` §11): listing, restoring and deleting the
//! files this client stored.
//!
//! Every operation reconnects with the stored identity (it never registers)
//! and sends retrieval requests once. On the legacy listener the first of
//! them on each connection is the proof of our key (1250, §11.5), never sent
//! on a plain backup: a legacy server answers it with 1607 or closes the
//! connection, which is reported as [`Error::RetrievalUnsupported`] and not
//! retried; a 1651 is [`Error::ProofRejected`].
//!
//! A restore decrypts each 1642 packet as it arrives and writes the
//! plaintext to the temporary file at once (see [`crate::restore`]), so
//! memory stays at about one packet whatever the file size. A restore of
//! several files runs over several connections at once (`--connections`),
//! all driven by one task: creating a file and the final sync and rename
//! run on the blocking pool, so that the other connections go on
//! meanwhile; the writes of a file under 4 MiB (and the folder preparation)
//! are plain blocking calls on that task, short enough not to matter. A
//! larger file is written by a thread of its own.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use protocol::retrieval::{ListEntry, ListFlags, RefusalReason, RestoreBegin};
use protocol::session::client::ClientEvent;
use protocol::{FileName, RequestFrame};

use crate::engine::{Client, Keyed};
use crate::error::Error;
use crate::fanout::{fan_out, ItemFailure, Queue};
use crate::report::{FileReport, Outcome, RunKind, RunReport};
use crate::restore::{remove_stale_parts, sync_dirs, Destination, RestoreFile};

/// The most entries a listing may have, so a server cannot make the client
/// collect without end.
pub const MAX_LISTED: usize = 1 << 22;

/// A keyed connection used for retrieval.
struct Retrieving {
    keyed: Keyed,
}

/// A file to restore: its name, the version (0: the newest) and where it
/// goes.
type RestoreJob = (FileName, u64, Result<Destination, Error>);

impl Client {
    /// Reconnects for retrieval; on the legacy listener, proves our key
    /// first (`docs/PROTOCOL.md` §11.5), once for the connection.
    async fn open_retrieval(&self) -> Result<Retrieving, Error> {
        let keyed = self.reconnect_existing().await?;
        self.ready_for_retrieval(keyed).await
    }

    /// As [`open_retrieval`](Self::open_retrieval), for a connection beyond
    /// the first: tried once, since the run goes on without it.
    async fn open_extra_retrieval(&self) -> Result<Retrieving, Error> {
        let keyed = self.reconnect_extra().await?;
        self.ready_for_retrieval(keyed).await
    }

    /// Proves our key on `keyed` where retrieval needs it.
    async fn ready_for_retrieval(&self, keyed: Keyed) -> Result<Retrieving, Error> {
        let mut r = Retrieving { keyed };
        match self.prove_for_retrieval(&mut r).await {
            Ok(()) => Ok(r),
            Err(e) => {
                r.keyed.conn.close().await;
                Err(e)
            }
        }
    }

    async fn prove_for_retrieval(&self, r: &mut Retrieving) -> Result<(), Error> {
        let client_id = r.keyed.identity.client_id;
        let Some(frame) = r
            .keyed
            .session
            .retrieval_proof_request()
            .map_err(|e| self.session_error(e, Some(client_id)))?
        else {
            return Ok(());
        };
        let doing = "proving our key before retrieval";
        match self.retrieve(r, &frame, doing).await? {
            ClientEvent::RetrievalAllowed => Ok(()),
            other => Err(self.unexpected(&other, doing)),
        }
    }

    /// Sends a retrieval request once and interprets the answer. A 1607, or
    /// the connection closing, in answer to the first retrieval request of
    /// the connection (on the legacy listener, the proof) means the server
    /// does not know retrieval: the session says when that is.
    async fn retrieve(
        &self,
        r: &mut Retrieving,
        frame: &RequestFrame,
        doing: &str,
    ) -> Result<ClientEvent, Error> {
        let server = self.options().server.clone();
        let unsupported = || Error::RetrievalUnsupported {
            server: server.clone(),
        };
        let sent = r.keyed.conn.send(frame, doing).await;
        let response = match sent {
            Ok(()) => r.keyed.conn.recv(doing).await,
            Err(e) => Err(e),
        };
        let response = match response {
            Ok(response) => response,
            Err(Error::Closed { .. } | Error::ConnectionLost { .. })
                if r.keyed.session.awaits_first_retrieval_answer() =>
            {
                return Err(unsupported())
            }
            Err(e) => return Err(e),
        };
        let event = r
            .keyed
            .session
            .handle(response, &mut rand::rngs::OsRng)
            .map_err(|e| self.session_error(e, Some(r.keyed.identity.client_id)))?;
        match event {
            ClientEvent::RetrievalUnsupported => Err(unsupported()),
            ClientEvent::ServerError(step) => Err(Error::ServerFailed {
                server,
                request: doing.to_owned(),
                times: step.times(),
            }),
            event => Ok(event),
        }
    }

    async fn list_on(
        &self,
        r: &mut Retrieving,
        all_versions: bool,
    ) -> Result<Vec<ListEntry>, Error> {
        let flags = if all_versions {
            ListFlags::ALL_VERSIONS
        } else {
            ListFlags::LATEST
        };
        let doing = "listing the stored files";
        let mut entries = Vec::new();
        let mut cursor = 0u64;
        loop {
            let frame = r.keyed.session.list_request(flags, cursor);
            match self.retrieve(r, &frame, doing).await? {
                ClientEvent::ListPage {
                    next_cursor,
                    entries: page,
                } => {
                    let stalled = next_cursor != 0 && (next_cursor == cursor || page.is_empty());
                    entries.extend(page);
                    if stalled || entries.len() > MAX_LISTED {
                        return Err(Error::Protocol {
                            server: self.options().server.clone(),
                            detail: format!(
                                "the listing does not end (cursor {next_cursor} after {} entries)",
                                entries.len()
                            ),
                        });
                    }
                    if next_cursor == 0 {
                        return Ok(entries);
                    }
                    cursor = next_cursor;
                }
                ClientEvent::Refused(reason) => {
                    return Err(self.refused(reason, "list the stored files"))
                }
                other => return Err(self.unexpected(&other, doing)),
            }
        }
    }

    fn refused(&self, reason: RefusalReason, doing: &str) -> Error {
        Error::Refused {
            server: self.options().server.clone(),
            doing: doing.to_owned(),
            reason: reason.0,
        }
    }

    /// The files this client stored: the newest version of each name, or
    /// every version with `all_versions`, ordered by name then version.
    ///
    /// # Errors
    /// When there is no identity, the server cannot be reached, does not
    /// know this client or does not support retrieval.
    pub async fn list(&self, all_versions: bool) -> Result<Vec<ListEntry>, Error> {
        let mut r = self.open_retrieval().await?;
        let listed = self.list_on(&mut r, all_versions).await;
        r.keyed.conn.close().await;
        listed
    }

    /// Deletes every version of `file` and returns how many there were.
    ///
    /// # Errors
    /// As [`list`](Self::list); [`Error::NotFound`] when there is no such
    /// file; [`Error::AppendOnly`] when the server keeps this client's
    /// history append-only.
    pub async fn delete(&self, file: &FileName) -> Result<u32, Error> {
        let mut r = self.open_retrieval().await?;
        let doing = format!("deleting \"{file}\"");
        let frame = r.keyed.session.delete_request(file.clone());
        let event = self.retrieve(&mut r, &frame, &doing).await;
        r.keyed.conn.close().await;
        match event? {
            ClientEvent::Deleted { versions } => Ok(versions),
            ClientEvent::NotFound => Err(Error::NotFound {
                server: self.options().server.clone(),
                what: format!("file named \"{file}\""),
            }),
            ClientEvent::Refused(RefusalReason::APPEND_ONLY) => Err(Error::AppendOnly {
                server: self.options().server.clone(),
                name: file.to_string(),
            }),
            ClientEvent::Refused(reason) => Err(self.refused(reason, &doing)),
            other => Err(self.unexpected(&other, &doing)),
        }
    }

    /// Restores one version (0: the newest) of `file` to `dest`.
    async fn restore_on(
        &self,
        r: &mut Retrieving,
        file: &FileName,
        version: u64,
        dest: &Destination,
        overwrite: bool,
        cleaned: &RefCell<HashSet<PathBuf>>,
    ) -> Result<(RestoreBegin, u32), ItemFailure> {
        let name = file.to_string_lossy();
        let local = |error| ItemFailure {
            error,
            connection_usable: true,
        };
        let dir = dest.prepare(&name, overwrite).map_err(local)?;
        let removed = remove_stale_parts(&dir, &mut cleaned.borrow_mut());
        if removed > 0 {
            self.feedback().notice(&format!(
                "removed {removed} unfinished restore file{} left in {}",
                if removed == 1 { "" } else { "s" },
                dir.display()
            ));
        }
        let doing = format!("restoring \"{name}\"");
        let frame = r.keyed.session.restore_request(version, file.clone());
        let begin = match self.retrieve(r, &frame, &doing).await? {
            ClientEvent::RestoreBegin(begin) => begin,
            ClientEvent::NotFound => {
                let what = if version == 0 {
                    format!("file named \"{name}\"")
                } else {
                    format!("version {version} of \"{name}\"")
                };
                return Err(local(Error::NotFound {
                    server: self.options().server.clone(),
                    what,
                }));
            }
            ClientEvent::Refused(reason) => {
                return Err(local(self.refused(reason, &doing)));
            }
            other => return Err(self.unexpected(&other, &doing).into()),
        };
        self.feedback().restoring(&name, begin.size);
        let key = r.keyed.session.aes_key().cloned().ok_or_else(|| {
            ItemFailure::from(Error::Internal("no session key before a restore".into()))
        })?;
        // Creating and syncing files blocks: on the blocking pool, so that
        // the other connections of a run go on meanwhile.
        let mut out = {
            let (dest, dir, begin) = (dest.clone(), dir.clone(), begin.clone());
            tokio::task::spawn_blocking(move || {
                RestoreFile::create(&dest, &dir, begin, &key, overwrite)
            })
            .await
            .map_err(|e| Error::Internal(format!("creating the file stopped: {e}")))??
        };
        let mut remaining = begin.content_size;
        while remaining > 0 {
            let response = r.keyed.conn.recv(&doing).await?;
            let event = r
                .keyed
                .session
                .handle(response, &mut rand::rngs::OsRng)
                .map_err(|e| self.session_error(e, Some(r.keyed.identity.client_id)))?;
            match event {
                ClientEvent::RestoreData {
                    content,
                    remaining: left,
                } => {
                    let before = out.written();
                    out.feed(&content)?;
                    self.feedback().progress(out.written() - before);
                    remaining = left;
                }
                // A 1607 after the 1641 is the server finding its stored
                // copy damaged; it closes the connection (§11.3). The part
                // file is removed when `out` is dropped.
                ClientEvent::ServerError(_) => {
                    return Err(ItemFailure {
                        error: Error::DamagedOnServer {
                            name,
                            version: begin.version,
                        },
                        connection_usable: false,
                    })
                }
                other => return Err(self.unexpected(&other, &doing).into()),
            }
        }
        // Everything announced arrived: the connection is usable whatever
        // the verdict on the content.
        let cksum = tokio::task::spawn_blocking(move || out.finish())
            .await
            .map_err(|e| Error::Internal(format!("finishing the file stopped: {e}")))?
            .map_err(local)?;
        Ok((begin, cksum))
    }

    /// Restores `jobs` over `first` and, when there are several, up to
    /// `options.connections - 1` more connections opened alongside; every
    /// connection is closed at the end. Entries go into `report` in the
    /// order of `jobs`. A connection that fails takes no more jobs; jobs no
    /// connection could take are [`Outcome::NotAttempted`].
    async fn restore_files(
        &self,
        first: Retrieving,
        report: &mut RunReport,
        jobs: Vec<RestoreJob>,
        overwrite: bool,
    ) {
        let queue = Queue::new(jobs);
        let cleaned = RefCell::new(HashSet::new());
        let mut done = fan_out(
            self.feedback(),
            &self.options().server,
            self.options().connections,
            &queue,
            first,
            || self.open_extra_retrieval(),
            |r| self.restore_queued(r, &queue, &cleaned, overwrite),
        )
        .await;
        for (i, (file, version, dest)) in queue.into_rest() {
            let entry = FileReport {
                name: file.to_string_lossy(),
                version: Some(version),
                size: 0,
                path: dest.as_ref().ok().map(Destination::path),
                outcome: Outcome::NotAttempted,
            };
            self.feedback().finished(&entry);
            done.push((i, entry));
        }
        // Every folder a file went into is in `cleaned`: one sync each.
        let dirs = cleaned.take();
        let failed = tokio::task::spawn_blocking(move || sync_dirs(&dirs))
            .await
            .unwrap_or_default();
        for (dir, reason) in failed {
            self.feedback().notice(&format!(
                "could not sync the folder {} ({reason}); a crash now could lose the names of files restored into it",
                dir.display()
            ));
        }
        done.sort_by_key(|(i, _)| *i);
        report
            .files
            .extend(done.into_iter().map(|(_, entry)| entry));
    }

    /// Restores jobs from `queue` over `r` until the queue is empty or the
    /// connection fails, then closes it; returns each entry with its index.
    /// After a file the server found damaged (which ends the connection) it
    /// goes on over a new connection.
    async fn restore_queued(
        &self,
        mut r: Retrieving,
        queue: &Queue<RestoreJob>,
        cleaned: &RefCell<HashSet<PathBuf>>,
        overwrite: bool,
    ) -> Vec<(usize, FileReport)> {
        let mut done = Vec::new();
        while let Some((i, (file, version, dest))) = queue.take() {
            let mut entry = FileReport {
                name: file.to_string_lossy(),
                version: Some(version),
                size: 0,
                path: dest.as_ref().ok().map(Destination::path),
                outcome: Outcome::NotAttempted,
            };
            let mut stop = false;
            let mut reconnect = false;
            entry.outcome = match dest {
                Err(e) => Outcome::Failed(e),
                Ok(dest) => match self
                    .restore_on(&mut r, &file, version, &dest, overwrite, cleaned)
                    .await
                {
                    Ok((begin, cksum)) => {
                        entry.version = Some(begin.version);
                        entry.size = begin.size;
                        Outcome::Restored { cksum }
                    }
                    Err(failure) => {
                        // A damaged copy is a fault of that file alone: the
                        // server closed the connection, but the next file
                        // may be restored over a new one.
                        reconnect = !failure.connection_usable
                            && matches!(failure.error, Error::DamagedOnServer { .. });
                        stop = !failure.connection_usable && !reconnect;
                        Outcome::Failed(failure.error)
                    }
                },
            };
            self.feedback().finished(&entry);
            done.push((i, entry));
            if stop {
                break;
            }
            if reconnect && !queue.is_empty() {
                r.keyed.conn.close().await;
                match self.open_retrieval().await {
                    Ok(fresh) => r = fresh,
                    Err(e) => {
                        self.feedback().notice(&format!(
                            "could not reconnect to {} after a damaged file ({e}); its connection takes no more files",
                            self.options().server
                        ));
                        return done;
                    }
                }
            }
        }
        r.keyed.conn.close().await;
        done
    }

    /// Restores version `version` (0: the newest) of `file`: into `to` when
    /// it is an existing folder, else to the path `to`; without `to`, into
    /// `cwd` under the file's name.
    ///
    /// # Errors
    /// When the connection cannot be set up; failures of the file itself
    /// are in the report.
    pub async fn restore(
        &self,
        file: &FileName,
        version: u64,
        to: Option<&Path>,
        cwd: &Path,
        overwrite: bool,
    ) -> Result<RunReport, Error> {
        let started = Instant::now();
        let dest = match to {
            Some(to) if to.is_dir() => Destination::inside(to, file.as_bytes()),
            Some(to) => Destination::exactly(to, &file.to_string_lossy()),
            None => Destination::inside(cwd, file.as_bytes()),
        };
        let mut report = RunReport::new(RunKind::Restore, self.options().server.clone());
        let r = self.open_retrieval().await?;
        self.feedback().start(1, 0);
        self.restore_files(
            r,
            &mut report,
            vec![(file.clone(), version, dest)],
            overwrite,
        )
        .await;
        self.feedback().done();
        report.elapsed = started.elapsed();
        Ok(report)
    }

    /// Restores the newest version of every file this client stored into
    /// the folder `dir`. A name that cannot be restored safely, or a file
    /// that exists (without `overwrite`), fails alone; the rest go on.
    ///
    /// # Errors
    /// When the connection cannot be set up or the listing fails.
    pub async fn restore_all(&self, dir: &Path, overwrite: bool) -> Result<RunReport, Error> {
        let started = Instant::now();
        let mut report = RunReport::new(RunKind::Restore, self.options().server.clone());
        let mut r = self.open_retrieval().await?;
        let entries = match self.list_on(&mut r, false).await {
            Ok(entries) => entries,
            Err(e) => {
                r.keyed.conn.close().await;
                return Err(e);
            }
        };
        // Two names that map to one path (`a/b` and `a\b`): the second fails.
        let mut first_of: HashMap<PathBuf, String> = HashMap::new();
        let jobs = entries
            .iter()
            .map(|e| {
                let name = e.file.to_string_lossy();
                let dest = Destination::inside(dir, e.file.as_bytes()).and_then(|d| match first_of
                    .get(&d.path())
                {
                    Some(first) => Err(Error::UnsafeName {
                        name: name.clone(),
                        reason: format!("it maps to the same path as \"{first}\""),
                    }),
                    None => {
                        first_of.insert(d.path(), name.clone());
                        Ok(d)
                    }
                });
                (e.file.clone(), e.version, dest)
            })
            .collect();
        self.feedback()
            .start(entries.len(), entries.iter().map(|e| e.size).sum());
        self.restore_files(r, &mut report, jobs, overwrite).await;
        self.feedback().done();
        report.elapsed = started.elapsed();
        Ok(report)
    }
}
