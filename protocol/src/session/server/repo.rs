//! The repository extension in the server session (`docs/PROTOCOL.md` §13).
//!
//! ```text
//! Have --> [RepoAction::Have] --repo_done(Have)--> 1660
//! PackData... --> [RepoAction::PackData] (no answer); PackEnd --> index checked --> [RepoAction::StorePack] --repo_done(PackStored)--> 1661
//! SnapshotRefs... --> [RepoAction::StageRefs] --repo_done(Staged)--> 1662
//! SnapshotCommit --> nothing staged: 1664; something missing: [RepoAction::DropStaged] 1664;
//!                    else [RepoAction::CommitSnapshot] --repo_done(Committed)--> 1663 / 1664
//! Snapshots --> [RepoAction::ListSnapshots] --repo_done(Snapshots)--> 1665
//! Fetch --> [RepoAction::Fetch]: the shell streams 1666 + 1668... or 1667 per id
//! PutKey --> [RepoAction::PutKey] --> 1670; GetKeys --> [RepoAction::GetKeys] --repo_done(Keys)--> 1669
//! ```
//!
//! While a pack is open only its data and its end may come; anything else
//! is a protocol error, and so is an index that does not cover the pack.

use bytes::Bytes;

use super::{Action, Pending, ServerSession, SessionError};
use crate::message::Response;
use crate::repo::message::{
    CommitRefusal, KeySlot, ObjectId, RepoRequest, RepoResponse, SnapshotEntry, MAX_PACK_BYTES,
    SNAPSHOT_ENTRY_HEAD, SNAPSHOT_PAGE_BYTES,
};
use crate::repo::pack::{self, Located};
use crate::restore;
use crate::wire::{ClientId, RequestKind};

/// Snapshots one listing asks storage for at most.
pub const SNAPSHOT_PAGE_ENTRIES: usize = 256;

/// Storage work for a repository request.
#[derive(Debug)]
pub enum RepoAction {
    /// Which of `ids` does `client_id` hold? Then [`RepoOutcome::Have`].
    Have {
        client_id: ClientId,
        ids: Vec<ObjectId>,
    },
    /// Append `content` to the pack being received, opening a new pending
    /// pack first when `first`. Nothing is sent.
    PackData {
        client_id: ClientId,
        first: bool,
        content: Bytes,
    },
    /// The pack of `size` bytes is complete and its index checked: make it
    /// durable, record its objects, then [`RepoOutcome::PackStored`].
    StorePack {
        client_id: ClientId,
        size: u64,
        objects: Vec<Located>,
    },
    /// Stage `ids` as references of the snapshot being built (dropping any
    /// staged before when `first`), then [`RepoOutcome::Staged`] with how
    /// many name no object of the client.
    StageRefs {
        client_id: ClientId,
        first: bool,
        ids: Vec<ObjectId>,
    },
    /// Drop the staged references, then send `reply`.
    DropStaged { reply: Response },
    /// Commit a snapshot of the staged references (all present, checked
    /// again in the same transaction), then [`RepoOutcome::Committed`].
    CommitSnapshot {
        client_id: ClientId,
        time: u64,
        meta: Bytes,
    },
    /// At most `limit` snapshots with ids above `after`, in id order; then
    /// [`RepoOutcome::Snapshots`].
    ListSnapshots {
        client_id: ClientId,
        after: u64,
        limit: usize,
    },
    /// Stream each object: 1666 and its bytes in 1668 packets of at most
    /// `packet` bytes, or 1667 when the client has no such object.
    Fetch {
        client_id: ClientId,
        ids: Vec<ObjectId>,
        packet: usize,
    },
    /// Store the envelope in `slot`, then send `reply`; but when `slot`
    /// is [`MASTER_SLOT`](crate::repo::message::MASTER_SLOT) and already
    /// holds one, keep it and send 1671 (`RepoResponse::KeyExists`).
    PutKey {
        client_id: ClientId,
        slot: u8,
        envelope: Bytes,
        reply: Response,
    },
    /// Every envelope of the client; then [`RepoOutcome::Keys`].
    GetKeys { client_id: ClientId },
}

/// What storage did with a [`RepoAction`].
#[derive(Debug)]
pub enum RepoOutcome {
    Have(Vec<bool>),
    PackStored { added: u32 },
    Staged { missing: u32 },
    Committed(Result<u64, (CommitRefusal, u32)>),
    Snapshots(Vec<SnapshotEntry>),
    Keys(Vec<KeySlot>),
}

/// What the session remembers of repository work between requests.
#[derive(Debug, Default)]
pub(super) struct RepoState {
    /// Bytes of the open pack, if one is open.
    pack: Option<u64>,
    /// References staged for the next snapshot, and how many were missing.
    staged: Option<(u64, u64)>,
}

impl ServerSession {
    /// Whether a pack is being received.
    pub fn has_open_pack(&self) -> bool {
        self.repo.pack.is_some()
    }

    pub(super) fn repo_request(
        &mut self,
        client_id: ClientId,
        request: RepoRequest,
    ) -> Result<Action, SessionError> {
        let kind = RequestKind::Repo(request.kind());
        let in_pack = self.repo.pack.is_some();
        match request {
            RepoRequest::PackData { content } => {
                let before = self.repo.pack.unwrap_or(0);
                let after = before.saturating_add(content.len() as u64);
                if after > MAX_PACK_BYTES {
                    return Err(SessionError::Pack(pack::PackError::TooLarge));
                }
                self.repo.pack = Some(after);
                return Ok(Action::Repo(RepoAction::PackData {
                    client_id,
                    first: !in_pack,
                    content,
                }));
            }
            RepoRequest::PackEnd { entries } => {
                let size = self.repo.pack.take().ok_or_else(|| self.unexpected(kind))?;
                let objects = pack::locate(&entries, size).map_err(SessionError::Pack)?;
                self.pending = Some(Pending::Repo);
                return Ok(Action::Repo(RepoAction::StorePack {
                    client_id,
                    size,
                    objects,
                }));
            }
            _ if in_pack => return Err(self.unexpected(kind)),
            _ => {}
        }
        let action = match request {
            RepoRequest::Have { ids } => RepoAction::Have { client_id, ids },
            RepoRequest::SnapshotRefs { ids } => {
                let first = self.repo.staged.is_none();
                let (refs, missing) = self.repo.staged.unwrap_or((0, 0));
                self.repo.staged = Some((refs.saturating_add(ids.len() as u64), missing));
                RepoAction::StageRefs {
                    client_id,
                    first,
                    ids,
                }
            }
            RepoRequest::SnapshotCommit { time, meta } => match self.repo.staged.take() {
                None => {
                    return Ok(Action::Reply(Response::Repo(
                        RepoResponse::SnapshotRefused {
                            reason: CommitRefusal::NO_REFERENCES,
                            missing: 0,
                        },
                    )))
                }
                Some((_, missing)) if missing > 0 => {
                    return Ok(Action::Repo(RepoAction::DropStaged {
                        reply: Response::Repo(RepoResponse::SnapshotRefused {
                            reason: CommitRefusal::MISSING,
                            missing: u32::try_from(missing).unwrap_or(u32::MAX),
                        }),
                    }))
                }
                Some(_) => RepoAction::CommitSnapshot {
                    client_id,
                    time,
                    meta,
                },
            },
            RepoRequest::Snapshots { cursor } => RepoAction::ListSnapshots {
                client_id,
                after: cursor,
                limit: SNAPSHOT_PAGE_ENTRIES + 1,
            },
            RepoRequest::Fetch { ids } => {
                return Ok(Action::Repo(RepoAction::Fetch {
                    client_id,
                    ids,
                    packet: restore::packet_len(
                        self.config.restore_packet,
                        self.config.limits.max_packet_content,
                    ),
                }))
            }
            RepoRequest::PutKey { slot, envelope } => {
                return Ok(Action::Repo(RepoAction::PutKey {
                    client_id,
                    slot,
                    envelope,
                    reply: Response::Repo(RepoResponse::KeyStored { slot }),
                }))
            }
            RepoRequest::GetKeys => RepoAction::GetKeys { client_id },
            RepoRequest::PackData { .. } | RepoRequest::PackEnd { .. } => {
                return Err(self.unexpected(kind))
            }
        };
        self.pending = Some(Pending::Repo);
        Ok(Action::Repo(action))
    }

    /// Reports what storage did for a pending [`RepoAction`] and returns
    /// the answer.
    ///
    /// # Errors
    /// When no repository action was pending.
    pub fn repo_done(&mut self, outcome: RepoOutcome) -> Result<Response, SessionError> {
        let Some(Pending::Repo) = self.pending.take() else {
            return Err(SessionError::NoPendingAction);
        };
        Ok(Response::Repo(match outcome {
            RepoOutcome::Have(have) => RepoResponse::HaveAnswer { have },
            RepoOutcome::PackStored { added } => RepoResponse::PackStored { added },
            RepoOutcome::Staged { missing } => {
                if let Some((_, m)) = self.repo.staged.as_mut() {
                    *m = m.saturating_add(u64::from(missing));
                }
                RepoResponse::RefsStaged { missing }
            }
            RepoOutcome::Committed(Ok(id)) => RepoResponse::SnapshotCommitted { id },
            RepoOutcome::Committed(Err((reason, missing))) => {
                RepoResponse::SnapshotRefused { reason, missing }
            }
            RepoOutcome::Snapshots(mut entries) => {
                let more = entries.len() > SNAPSHOT_PAGE_ENTRIES;
                entries.truncate(SNAPSHOT_PAGE_ENTRIES);
                // Whole entries up to the page's byte budget, at least one.
                let mut bytes = 0usize;
                let mut keep = 0usize;
                for e in &entries {
                    let n = SNAPSHOT_ENTRY_HEAD + e.meta.len();
                    if keep > 0 && bytes + n > SNAPSHOT_PAGE_BYTES {
                        break;
                    }
                    bytes += n;
                    keep += 1;
                }
                let cut = keep < entries.len();
                entries.truncate(keep);
                let next_cursor = match entries.last() {
                    Some(last) if more || cut => last.id,
                    _ => 0,
                };
                RepoResponse::SnapshotPage {
                    next_cursor,
                    entries,
                }
            }
            RepoOutcome::Keys(slots) => RepoResponse::Keys { slots },
        }))
    }

    /// Forgets repository state cut short by a storage failure.
    pub(super) fn repo_reset(&mut self) {
        self.repo = RepoState::default();
    }
}
