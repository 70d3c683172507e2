//! Making a snapshot (`docs/PROTOCOL.md` §13): a walker thread reads the
//! paths, cuts files into chunks and names them, and builds each
//! directory's tree ([`super::walk`]); this task asks the server which
//! objects it lacks, has those sealed on a few threads and streams them in
//! packs ([`super::upload`]); then it stages every id the snapshot
//! references and commits.
//!
//! Memory is bounded whatever the sizes: the walker is at most
//! [`QUEUE`] objects ahead, a batch holds at most [`BATCH_BYTES`] of
//! plaintext, and a pack is streamed as it fills, never held whole. What
//! grows with the snapshot is the set of ids it references (32 bytes
//! each and an index: about 45 MiB for a million chunks, `super::idset`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use protocol::repo::seal::Sealer;
use protocol::repo::tree::Description;
use tokio::sync::mpsc;

use super::cache::{self, CacheWriter, FileCache};
use super::keys;
use super::remote::Remote;
use super::upload::Uploader;
pub use super::walk::check_paths;
use super::walk::{root_names, Walked, Walker};
use crate::engine::Client;
use crate::error::Error;

/// Objects the walker may be ahead of the uploader.
pub(super) const QUEUE: usize = 2;
/// Plaintext bytes of one "have" batch.
pub(super) const BATCH_BYTES: usize = 4 << 20;
/// Objects in one "have" batch.
pub(super) const BATCH_OBJECTS: usize = 512;
/// Plaintext bytes being sealed while earlier objects are sent.
pub(super) const IN_FLIGHT: usize = 8 << 20;
/// Bytes of one pack-data packet.
pub(super) const PACKET: usize = 1 << 20;
/// A pack closes once it holds this many bytes.
pub const PACK_TARGET: u64 = 16 << 20;

/// What a snapshot run is asked for.
#[derive(Debug, Clone, Default)]
pub struct SnapshotOptions {
    pub tags: Vec<String>,
    pub host: String,
    /// Read every file, whatever the file cache says.
    pub force_read: bool,
    /// What to leave out of the directories walked.
    pub rules: crate::exclude::Rules,
}

/// What a snapshot run did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SnapshotSummary {
    /// The server's id of the snapshot.
    pub snapshot: u64,
    pub time: u64,
    pub files: u64,
    pub dirs: u64,
    /// Plaintext bytes of the files in the snapshot.
    pub bytes: u64,
    /// Objects the server did not have, and their sealed bytes sent.
    pub new_objects: u64,
    pub sent_bytes: u64,
    pub packs: u64,
    /// Files taken from the file cache unread.
    pub unchanged_files: u64,
    /// Files read that the last snapshot on this machine held, changed.
    pub changed_files: u64,
    /// Files read that the last snapshot on this machine did not hold.
    pub new_files: u64,
    /// Whether files were compared with the last snapshot's (false with
    /// `--force-read`: every file is read and counted as new).
    pub compared: bool,
    /// Entries left out, with why.
    pub skipped: Vec<(String, String)>,
    /// Entries left out by the exclusion rules.
    pub excluded: u64,
}
/// How one attempt at a snapshot ended.
enum Attempt {
    Done(SnapshotSummary),
    /// The server lacked this many referenced objects (named by the file
    /// cache); nothing was committed.
    Missing(u64),
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

impl Client {
    /// Makes a snapshot of `paths` (`docs/PROTOCOL.md` §13): reconnects
    /// with the stored identity, obtains (or makes) the repository key,
    /// sends what the server lacks, and commits. Files unchanged since the
    /// last snapshot (by the file cache) are not read; should the server
    /// lack a chunk of one, the run is made again reading every file.
    ///
    /// # Errors
    /// When the server cannot be reached or refuses, the key does not open,
    /// or a path cannot be named. Files that cannot be read are left out
    /// and listed in [`SnapshotSummary::skipped`].
    pub async fn snapshot(
        &self,
        paths: &[PathBuf],
        options: &SnapshotOptions,
    ) -> Result<SnapshotSummary, Error> {
        let roots = root_names(paths)?;
        if let Some(path) = self.key_file() {
            // A key file that does not read stops the run before it connects.
            keys::read_key_file(path)?;
        }
        let keyed = self.reconnect_existing().await?;
        let client_id = keyed.identity.client_id.to_hex();
        let root_paths: Vec<PathBuf> = roots.iter().map(|(_, p)| p.clone()).collect();
        let cache_path = cache::path_for(self.store().dir(), &client_id, &root_paths);
        let mut remote = Remote::new(keyed, self.options().server.clone());
        let mut result = self
            .snapshot_on(
                &mut remote,
                &roots,
                options,
                &cache_path,
                options.force_read,
            )
            .await;
        if matches!(result, Ok(Attempt::Missing(_))) {
            self.feedback().notice(
                "the server no longer holds some chunks the file cache named; reading every file",
            );
            result = self
                .snapshot_on(&mut remote, &roots, options, &cache_path, true)
                .await;
        }
        remote.close().await;
        match result? {
            Attempt::Done(summary) => Ok(summary),
            Attempt::Missing(missing) => Err(Error::SnapshotRefused {
                server: self.options().server.clone(),
                detail: format!("it lacks {missing} of the objects the snapshot references"),
            }),
        }
    }

    async fn snapshot_on(
        &self,
        remote: &mut Remote,
        roots: &[(Vec<u8>, PathBuf)],
        options: &SnapshotOptions,
        cache_path: &Path,
        force_read: bool,
    ) -> Result<Attempt, Error> {
        let key = match self.key_file() {
            Some(path) => keys::read_key_file(path)?,
            None => keys::obtain(remote, true).await?.backup_key(),
        };
        let sealer = Arc::new(Sealer::new(&key.seal, &mut rand::rngs::OsRng));
        let (tx, mut rx) = mpsc::channel(QUEUE);
        let id_key = key.id.clone();
        let walk_roots = roots.to_vec();
        let walk_cache = cache_path.to_owned();
        let rules = options.rules.clone();
        let walker = std::thread::Builder::new()
            .name("snapshot-walker".into())
            .stack_size(32 << 20)
            .spawn(move || {
                // The caches are read and started here, off the async threads.
                let old = if force_read {
                    FileCache::default()
                } else {
                    FileCache::load(&walk_cache)
                };
                let new = CacheWriter::create(&walk_cache)
                    .map_err(|e| tracing::debug!(error = %e, "cannot write the file cache"))
                    .ok();
                Walker::new(id_key, tx, old, new)
                    .excluding(rules)
                    .run(&walk_roots)
            })
            .map_err(|e| Error::Internal(format!("cannot start the walker: {e}")))?;
        let mut up = Uploader::new(remote, Arc::clone(&sealer));
        let uploaded = async {
            while let Some(made) = rx.recv().await {
                up.add(made).await?;
            }
            up.finish().await
        }
        .await;
        // On failure the walker finds the channel closed and stops.
        drop(rx);
        let walked = tokio::task::spawn_blocking(move || walker.join())
            .await
            .map_err(|e| Error::Internal(format!("walker: {e}")))?
            .map_err(|_| Error::Internal("the walker panicked".into()))?;
        let abandon = |w: Option<Walked>| {
            if let Some(c) = w.and_then(|w| w.cache) {
                c.abandon();
            }
        };
        if let Err(e) = uploaded {
            abandon(walked);
            return Err(e);
        }
        let mut walked =
            walked.ok_or_else(|| Error::Internal("the walker stopped early".into()))?;
        let mut summary = std::mem::take(&mut up.summary);
        let remote = up.remote;
        let time = now();
        let description = Description {
            root: walked.root,
            host: options.host.clone(),
            paths: roots.iter().map(|(_, p)| p.display().to_string()).collect(),
            tags: options.tags.clone(),
            files: walked.files,
            dirs: walked.dirs,
            bytes: walked.bytes,
            parent: 0,
        };
        let mut meta = Vec::new();
        sealer.seal_snapshot(time, &description.encode(), &mut meta);
        let missing = match remote.stage(walked.refs.iter()).await {
            Ok(m) => m,
            Err(e) => {
                abandon(Some(walked));
                return Err(e);
            }
        };
        // Committed even when something is missing: the refusal drops
        // what was staged, so a second attempt starts clean.
        let committed = remote.commit(time, meta).await;
        let cache = walked.cache.take();
        match committed {
            Ok(Ok(id)) if missing == 0 => {
                summary.snapshot = id;
                if let Some(c) = cache {
                    let path = cache_path.to_owned();
                    let saved = tokio::task::spawn_blocking(move || c.commit(&path)).await;
                    if let Ok(Err(e)) = saved {
                        tracing::debug!(error = %e, "cannot save the file cache");
                    }
                }
            }
            Ok(Ok(_)) => {
                return Err(Error::Internal(
                    "the server committed a snapshot with missing references".into(),
                ))
            }
            Ok(Err((reason, m))) => {
                if let Some(c) = cache {
                    c.abandon();
                }
                if reason == protocol::repo::message::CommitRefusal::MISSING && !force_read {
                    return Ok(Attempt::Missing(missing.max(u64::from(m))));
                }
                if reason == protocol::repo::message::CommitRefusal::QUOTA {
                    return Err(Error::QuotaExceeded {
                        server: self.options().server.clone(),
                        stored: None,
                        quota: None,
                        size: None,
                        file: None,
                    });
                }
                return Err(Error::SnapshotRefused {
                    server: self.options().server.clone(),
                    detail: format!("reason {}, {m} objects missing", reason.0),
                });
            }
            Err(e) => {
                if let Some(c) = cache {
                    c.abandon();
                }
                return Err(e);
            }
        }
        summary.time = time;
        summary.files = walked.files;
        summary.dirs = walked.dirs;
        summary.bytes = walked.bytes;
        summary.unchanged_files = walked.unchanged;
        summary.changed_files = walked.changed;
        summary.new_files = walked
            .files
            .saturating_sub(walked.unchanged)
            .saturating_sub(walked.changed);
        summary.compared = !force_read;
        summary.skipped = walked.skipped;
        summary.excluded = walked.excluded;
        Ok(Attempt::Done(summary))
    }
}
