//! The repository extension in the server session (`docs/PROTOCOL.md` §13).
//!
//! ```text
//! Have --> [RepoAction::Have] --repo_done(Have)--> 1660
//! PackData... --> [RepoAction::PackData] (no answer); PackEnd --> index checked --> [RepoAction::StorePack] --repo_done(PackStored)--> 1661
//!                                                                                             --repo_done(QuotaExceeded)--> 1682
//! SnapshotRefs... --> [RepoAction::StageRefs] --repo_done(Staged)--> 1662
//! SnapshotCommit --> nothing staged: 1664; something missing: [RepoAction::DropStaged] 1664;
//!                    else [RepoAction::CommitSnapshot] --repo_done(Committed)--> 1663 / 1664
//! Snapshots --> [RepoAction::ListSnapshots] --repo_done(Snapshots)--> 1665
//! Fetch --> [RepoAction::Fetch]: the shell streams 1666 + 1668... or 1667 per id
//! PutKey --> [RepoAction::PutKey] --> 1670; GetKeys --> [RepoAction::GetKeys] --repo_done(Keys)--> 1669
//! DeleteKey --> [RepoAction::DeleteKey] --> 1674 / 1675
//! PassphraseLogin --> [RepoAction::FindPassphrase] --passphrase_found--> 1672 / 1673
//! Forget --> [RepoAction::Forget] --repo_done(Forgotten)--> 1680 / 1681
//! ```
//!
//! A passphrase envelope (slot 1) must be one the server can read the
//! login key of: any other envelope there is a protocol error.
//!
//! While a pack is open only its data, its end and "have" queries (the
//! client asks about the next objects while it streams a pack) may come;
//! anything else is a protocol error, and so is an index that does not
//! cover the pack.

use bytes::Bytes;

use super::{Action, Pending, ServerSession, SessionError};
use crate::message::Response;
use crate::name::UserName;
use crate::repo::envelope::PassphraseHead;
use crate::repo::message::{
    CommitRefusal, ForgetRefusal, KeySlot, ObjectId, PassphraseRefusal, RepoRequest, RepoResponse,
    SnapshotEntry, CHALLENGE_LEN, MAX_PACK_BYTES, PASSPHRASE_SLOT, SNAPSHOT_ENTRY_HEAD,
    SNAPSHOT_PAGE_BYTES,
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
    /// Remove the envelope in `slot`, unless the client is append-only
    /// (1675, reason 1), the slot is empty (reason 3), or it is slot 0 or
    /// 1 and the other of the two is empty (reason 2): the check and the
    /// removal in one transaction. Then send 1674 or 1675.
    DeleteKey { client_id: ClientId, slot: u8 },
    /// A passphrase login: find the completed client named `name` and
    /// its passphrase envelope (slot 1), taking a token of the source's
    /// registration rate first; then [`ServerSession::passphrase_found`].
    FindPassphrase { name: UserName },
    /// Remove the client's snapshots `ids` (unless it is append-only); then
    /// [`RepoOutcome::Forgotten`].
    Forget { client_id: ClientId, ids: Vec<u64> },
}

/// What the shell found for a passphrase login.
#[derive(Debug)]
pub enum PassphraseLookup {
    /// The client and the envelope in its passphrase slot.
    Found {
        client_id: ClientId,
        envelope: Bytes,
    },
    /// No completed client of that name, or none with a passphrase envelope.
    NotFound,
    /// The source is over its rate; storage was not asked.
    OverRate,
}

/// What storage did with a [`RepoAction`].
#[derive(Debug)]
pub enum RepoOutcome {
    Have(Vec<bool>),
    PackStored {
        added: u32,
    },
    /// The pack would take the client over its quota and was not stored
    /// (`docs/PROTOCOL.md` §13.9).
    QuotaExceeded {
        stored: u64,
        quota: u64,
        size: u64,
    },
    Staged {
        missing: u32,
    },
    Committed(Result<u64, (CommitRefusal, u32)>),
    Snapshots(Vec<SnapshotEntry>),
    Keys(Vec<KeySlot>),
    Forgotten(Result<u32, ForgetRefusal>),
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
            RepoRequest::Have { .. } => {}
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
                if slot == PASSPHRASE_SLOT && PassphraseHead::parse(&envelope).is_err() {
                    return Err(SessionError::NotAPassphraseEnvelope(slot));
                }
                return Ok(Action::Repo(RepoAction::PutKey {
                    client_id,
                    slot,
                    envelope,
                    reply: Response::Repo(RepoResponse::KeyStored { slot }),
                }));
            }
            RepoRequest::GetKeys => RepoAction::GetKeys { client_id },
            RepoRequest::Forget { ids } => RepoAction::Forget { client_id, ids },
            RepoRequest::DeleteKey { slot } => {
                return Ok(Action::Repo(RepoAction::DeleteKey { client_id, slot }))
            }
            RepoRequest::PackData { .. }
            | RepoRequest::PackEnd { .. }
            | RepoRequest::PassphraseLogin { .. }
            | RepoRequest::PassphraseProve { .. } => return Err(self.unexpected(kind)),
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
            RepoOutcome::QuotaExceeded {
                stored,
                quota,
                size,
            } => RepoResponse::QuotaExceeded {
                stored,
                quota,
                size,
            },
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
            RepoOutcome::Forgotten(Ok(count)) => RepoResponse::Forgotten { count },
            RepoOutcome::Forgotten(Err(reason)) => RepoResponse::ForgetRefused { reason },
        }))
    }

    /// Reports what the shell found for a [`RepoAction::FindPassphrase`]
    /// and returns the answer: 1672 with a fresh challenge, after which
    /// the signature is due; or 1673, after which the connection may only
    /// reconnect or register (one passphrase login per connection).
    ///
    /// # Errors
    /// When no passphrase lookup was pending.
    pub fn passphrase_found<R: rand::CryptoRng + rand::RngCore>(
        &mut self,
        found: PassphraseLookup,
        rng: &mut R,
    ) -> Result<Response, SessionError> {
        let Some(Pending::Passphrase { name }) = self.pending.take() else {
            return Err(SessionError::NoPendingAction);
        };
        let refused = |reason| Ok(Response::Repo(RepoResponse::PassphraseRefused { reason }));
        let (client_id, envelope) = match found {
            PassphraseLookup::Found {
                client_id,
                envelope,
            } => (client_id, envelope),
            PassphraseLookup::NotFound => return refused(PassphraseRefusal::NO_PASSPHRASE),
            PassphraseLookup::OverRate => return refused(PassphraseRefusal::RATE),
        };
        // Checked when stored; a row that no longer parses logs no one in.
        let Ok(head) = PassphraseHead::parse(&envelope) else {
            return refused(PassphraseRefusal::NO_PASSPHRASE);
        };
        let mut challenge = [0u8; CHALLENGE_LEN];
        rng.fill_bytes(&mut challenge);
        self.client = Some((client_id, name));
        self.proof = super::Proof::PassphraseAwaiting { head, challenge };
        Ok(Response::Repo(RepoResponse::PassphraseChallenge {
            client_id,
            cost: head.cost,
            salt: head.salt,
            challenge,
        }))
    }

    /// Forgets repository state cut short by a storage failure.
    pub(super) fn repo_reset(&mut self) {
        self.repo = RepoState::default();
    }
}

#[cfg(feature = "fuzzing")]
impl ServerSession {
    /// A secure session whose client `client_id` is bound, keyed with
    /// `key` and proven, as after a reconnect and an accepted proof: where
    /// the repository harness (`crate::fuzzing`) starts, without an RSA
    /// operation per input.
    #[doc(hidden)]
    pub fn proven_for_fuzzing(
        config: super::ServerConfig,
        binding: crate::secure::Binding,
        client_id: ClientId,
        name: crate::UserName,
        key: crate::crypto::AesKey,
    ) -> Self {
        let mut s = Self::secure(config, binding);
        s.client = Some((client_id, name));
        s.key = Some(key);
        s.proof = super::Proof::Proven;
        s
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::super::{Proof, ServerConfig};
    use super::*;
    use crate::crypto::AesKey;
    use crate::message::RequestFrame;
    use crate::repo::message::{PackEntry, MAX_SNAPSHOT_META};
    use crate::repo::seal::OVERHEAD;
    use crate::wire::{Dialect, Numbering};
    use crate::{Request, UserName};

    fn proven() -> (ServerSession, ClientId, rand::rngs::StdRng) {
        let mut s = ServerSession::secure(ServerConfig::default(), [7; 32]);
        let id = ClientId([5; 16]);
        s.client = Some((id, UserName::try_from("a").unwrap()));
        s.key = Some(AesKey::from_bytes([1; 32]));
        s.proof = Proof::Proven;
        assert_eq!(s.dialect(), Dialect::Secure);
        (s, id, rand::rngs::StdRng::seed_from_u64(1))
    }

    fn send(
        s: &mut ServerSession,
        id: ClientId,
        rng: &mut rand::rngs::StdRng,
        r: RepoRequest,
    ) -> Result<Action, SessionError> {
        s.handle(
            RequestFrame {
                client_id: id,
                numbering: Numbering::Modern,
                request: Request::Repo(r),
            },
            rng,
        )
    }

    fn oid(b: u8) -> ObjectId {
        ObjectId([b; 32])
    }

    #[test]
    fn a_pack_streams_takes_have_queries_and_ends_with_its_index_checked() {
        let (mut s, id, mut rng) = proven();
        let data = Bytes::from(vec![0u8; OVERHEAD * 2]);
        let first = send(
            &mut s,
            id,
            &mut rng,
            RepoRequest::PackData {
                content: data.clone(),
            },
        );
        assert!(matches!(
            first,
            Ok(Action::Repo(RepoAction::PackData { first: true, .. }))
        ));
        // A have query while the pack is open is answered.
        let have = send(
            &mut s,
            id,
            &mut rng,
            RepoRequest::Have { ids: vec![oid(1)] },
        );
        assert!(matches!(have, Ok(Action::Repo(RepoAction::Have { .. }))));
        let answer = s.repo_done(RepoOutcome::Have(vec![false])).unwrap();
        assert!(matches!(
            answer,
            Response::Repo(RepoResponse::HaveAnswer { ref have }) if have == &[false]
        ));
        // Anything else is not.
        assert!(send(
            &mut s,
            id,
            &mut rng,
            RepoRequest::SnapshotRefs { ids: vec![oid(1)] }
        )
        .is_err());
        let (mut s, id, mut rng) = proven();
        send(
            &mut s,
            id,
            &mut rng,
            RepoRequest::PackData {
                content: data.clone(),
            },
        )
        .unwrap();
        let second = send(
            &mut s,
            id,
            &mut rng,
            RepoRequest::PackData { content: data },
        );
        assert!(matches!(
            second,
            Ok(Action::Repo(RepoAction::PackData { first: false, .. }))
        ));
        let len = u32::try_from(OVERHEAD * 2).unwrap();
        let end = send(
            &mut s,
            id,
            &mut rng,
            RepoRequest::PackEnd {
                entries: vec![PackEntry { id: oid(1), len }, PackEntry { id: oid(2), len }],
            },
        );
        let Ok(Action::Repo(RepoAction::StorePack { size, objects, .. })) = end else {
            panic!("{end:?}");
        };
        assert_eq!(size, u64::from(len) * 2);
        assert_eq!(objects[1].offset, u64::from(len));
        assert!(!s.has_open_pack());
        assert!(matches!(
            s.repo_done(RepoOutcome::PackStored { added: 2 }),
            Ok(Response::Repo(RepoResponse::PackStored { added: 2 }))
        ));
    }

    #[test]
    fn an_index_that_does_not_cover_the_pack_and_an_end_without_a_pack_are_errors() {
        let (mut s, id, mut rng) = proven();
        let end = RepoRequest::PackEnd {
            entries: vec![PackEntry {
                id: oid(1),
                len: u32::try_from(OVERHEAD).unwrap(),
            }],
        };
        assert!(send(&mut s, id, &mut rng, end.clone()).is_err());
        let (mut s, id, mut rng) = proven();
        let content = Bytes::from(vec![0u8; OVERHEAD + 1]);
        send(&mut s, id, &mut rng, RepoRequest::PackData { content }).unwrap();
        assert!(matches!(
            send(&mut s, id, &mut rng, end),
            Err(SessionError::Pack(_))
        ));
    }

    #[test]
    fn a_commit_needs_staged_references_all_present() {
        let (mut s, id, mut rng) = proven();
        let commit = || RepoRequest::SnapshotCommit {
            time: 9,
            meta: Bytes::from_static(b"m"),
        };
        assert!(matches!(
            send(&mut s, id, &mut rng, commit()),
            Ok(Action::Reply(Response::Repo(
                RepoResponse::SnapshotRefused {
                    reason: CommitRefusal::NO_REFERENCES,
                    ..
                }
            )))
        ));
        send(
            &mut s,
            id,
            &mut rng,
            RepoRequest::SnapshotRefs {
                ids: vec![oid(1), oid(2)],
            },
        )
        .unwrap();
        s.repo_done(RepoOutcome::Staged { missing: 1 }).unwrap();
        assert!(matches!(
            send(&mut s, id, &mut rng, commit()),
            Ok(Action::Repo(RepoAction::DropStaged {
                reply: Response::Repo(RepoResponse::SnapshotRefused {
                    reason: CommitRefusal::MISSING,
                    missing: 1
                })
            }))
        ));
        let staged = send(
            &mut s,
            id,
            &mut rng,
            RepoRequest::SnapshotRefs { ids: vec![oid(1)] },
        );
        assert!(matches!(
            staged,
            Ok(Action::Repo(RepoAction::StageRefs { first: true, .. }))
        ));
        s.repo_done(RepoOutcome::Staged { missing: 0 }).unwrap();
        assert!(matches!(
            send(&mut s, id, &mut rng, commit()),
            Ok(Action::Repo(RepoAction::CommitSnapshot { time: 9, .. }))
        ));
        assert!(matches!(
            s.repo_done(RepoOutcome::Committed(Ok(3))),
            Ok(Response::Repo(RepoResponse::SnapshotCommitted { id: 3 }))
        ));
    }

    #[test]
    fn a_snapshot_page_is_cut_by_count_and_by_bytes_with_the_cursor_of_its_last() {
        let entry = |id: u64, meta: usize| SnapshotEntry {
            id,
            time: id,
            meta: Bytes::from(vec![1u8; meta]),
        };
        let (mut s, id, mut rng) = proven();
        send(&mut s, id, &mut rng, RepoRequest::Snapshots { cursor: 0 }).unwrap();
        let many = (1..=SNAPSHOT_PAGE_ENTRIES as u64 + 1)
            .map(|i| entry(i, 10))
            .collect();
        let Ok(Response::Repo(RepoResponse::SnapshotPage {
            next_cursor,
            entries,
        })) = s.repo_done(RepoOutcome::Snapshots(many))
        else {
            panic!("not a page");
        };
        assert_eq!(entries.len(), SNAPSHOT_PAGE_ENTRIES);
        assert_eq!(next_cursor, SNAPSHOT_PAGE_ENTRIES as u64);
        send(&mut s, id, &mut rng, RepoRequest::Snapshots { cursor: 0 }).unwrap();
        let big = (1..=6).map(|i| entry(i, MAX_SNAPSHOT_META)).collect();
        let Ok(Response::Repo(RepoResponse::SnapshotPage {
            next_cursor,
            entries,
        })) = s.repo_done(RepoOutcome::Snapshots(big))
        else {
            panic!("not a page");
        };
        assert!(entries.len() < 6 && !entries.is_empty());
        assert_eq!(next_cursor, entries.last().unwrap().id);
        send(&mut s, id, &mut rng, RepoRequest::Snapshots { cursor: 0 }).unwrap();
        let Ok(Response::Repo(RepoResponse::SnapshotPage {
            next_cursor,
            entries,
        })) = s.repo_done(RepoOutcome::Snapshots(vec![entry(1, 5)]))
        else {
            panic!("not a page");
        };
        assert_eq!((next_cursor, entries.len()), (0, 1));
    }

    #[test]
    fn repository_requests_wait_for_the_proof_and_never_reach_a_legacy_session() {
        let mut s = ServerSession::secure(ServerConfig::default(), [7; 32]);
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        assert!(matches!(
            send(&mut s, ClientId([5; 16]), &mut rng, RepoRequest::GetKeys),
            Err(SessionError::NotAuthenticated(_))
        ));
        let mut legacy = ServerSession::new(ServerConfig::default());
        legacy.client = Some((ClientId([5; 16]), UserName::try_from("a").unwrap()));
        legacy.key = Some(AesKey::from_bytes([1; 32]));
        legacy.proof = Proof::Proven;
        assert!(send(
            &mut legacy,
            ClientId([5; 16]),
            &mut rng,
            RepoRequest::GetKeys
        )
        .is_err());
    }

    use crate::repo::envelope::{self, PassphraseCost, PassphraseKeys};
    use crate::repo::keys::MasterKey;

    const CHEAP: PassphraseCost = PassphraseCost {
        m_kib: 8,
        t: 1,
        p: 1,
    };

    /// A fresh secure session that asked for a passphrase login of "a" and
    /// was challenged; the keys of the envelope storage found; the challenge.
    fn challenged() -> (
        ServerSession,
        ClientId,
        rand::rngs::StdRng,
        PassphraseKeys,
        [u8; CHALLENGE_LEN],
    ) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let sealed = envelope::seal_with_passphrase(
            &MasterKey::from_bytes([4; 32]),
            b"right",
            CHEAP,
            &mut rng,
        )
        .unwrap();
        let head = PassphraseHead::parse(&sealed).unwrap();
        let keys = PassphraseKeys::derive(b"right", &head.salt, head.cost).unwrap();
        let mut s = ServerSession::secure(ServerConfig::default(), [7; 32]);
        let id = ClientId([5; 16]);
        let name = UserName::try_from("a").unwrap();
        let action = send(
            &mut s,
            ClientId::default(),
            &mut rng,
            RepoRequest::PassphraseLogin { name: name.clone() },
        );
        assert!(matches!(
            action,
            Ok(Action::Repo(RepoAction::FindPassphrase { name: ref n })) if *n == name
        ));
        let answer = s
            .passphrase_found(
                PassphraseLookup::Found {
                    client_id: id,
                    envelope: sealed.into(),
                },
                &mut rng,
            )
            .unwrap();
        let Response::Repo(RepoResponse::PassphraseChallenge {
            client_id,
            cost,
            salt,
            challenge,
        }) = answer
        else {
            panic!("not a challenge: {answer:?}");
        };
        assert_eq!((client_id, cost, salt), (id, CHEAP, head.salt));
        (s, id, rng, keys, challenge)
    }

    #[test]
    fn accepts_a_passphrase_login_signed_by_the_envelope_login_key_then_serves_reads_only() {
        let (mut s, id, mut rng, keys, challenge) = challenged();
        // Nothing but the signature is served while it is due.
        assert!(matches!(
            send(&mut s, id, &mut rng, RepoRequest::GetKeys),
            Err(SessionError::NotAuthenticated(_))
        ));
        let (mut s, id, mut rng, keys2, challenge2) = challenged();
        let _ = (keys, challenge);
        let signature = keys2.sign_login(id, &challenge2, &[7; 32]);
        assert!(matches!(
            send(&mut s, id, &mut rng, RepoRequest::PassphraseProve { signature }),
            Ok(Action::Reply(Response::Authenticated { client_id })) if client_id == id
        ));
        assert!(s.authenticated() && s.read_only());
        for read in [
            RepoRequest::GetKeys,
            RepoRequest::Snapshots { cursor: 0 },
            RepoRequest::Have { ids: vec![oid(1)] },
        ] {
            assert!(matches!(
                send(&mut s, id, &mut rng, read),
                Ok(Action::Repo(_))
            ));
            s.pending = None;
        }
        for write in [
            RepoRequest::PackData {
                content: Bytes::from_static(b"x"),
            },
            RepoRequest::SnapshotRefs { ids: vec![oid(1)] },
            RepoRequest::PutKey {
                slot: 2,
                envelope: Bytes::from_static(b"x"),
            },
            RepoRequest::DeleteKey { slot: 0 },
        ] {
            let refused = send(&mut s, id, &mut rng, write);
            assert!(matches!(refused, Err(SessionError::ReadOnly(_))));
            assert_eq!(refused.unwrap_err().answer(), Response::NotAuthenticated);
        }
    }

    #[test]
    fn rejects_a_passphrase_login_signed_by_another_passphrase_or_for_another_connection() {
        let (mut s, id, mut rng, _, challenge) = challenged();
        let head = PassphraseHead {
            cost: CHEAP,
            salt: [0; 16],
            login_public: [0; 32],
        };
        let wrong = PassphraseKeys::derive(b"wrong", &head.salt, CHEAP).unwrap();
        let signature = wrong.sign_login(id, &challenge, &[7; 32]);
        assert_eq!(
            send(
                &mut s,
                id,
                &mut rng,
                RepoRequest::PassphraseProve { signature }
            )
            .unwrap_err(),
            SessionError::ProofRejected
        );
        // The right key over another connection's binding.
        let (mut s, id, mut rng, keys, challenge) = challenged();
        let signature = keys.sign_login(id, &challenge, &[8; 32]);
        assert_eq!(
            send(
                &mut s,
                id,
                &mut rng,
                RepoRequest::PassphraseProve { signature }
            )
            .unwrap_err(),
            SessionError::ProofRejected
        );
        assert!(!s.authenticated());
    }

    #[test]
    fn refuses_a_passphrase_login_without_an_envelope_and_allows_one_lookup_per_connection() {
        let mut s = ServerSession::secure(ServerConfig::default(), [7; 32]);
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        let login = || RepoRequest::PassphraseLogin {
            name: UserName::try_from("a").unwrap(),
        };
        send(&mut s, ClientId::default(), &mut rng, login()).unwrap();
        assert_eq!(
            s.passphrase_found(PassphraseLookup::OverRate, &mut rng)
                .unwrap(),
            Response::Repo(RepoResponse::PassphraseRefused {
                reason: PassphraseRefusal::RATE
            })
        );
        assert!(matches!(
            send(&mut s, ClientId::default(), &mut rng, login()),
            Err(SessionError::Unexpected { .. })
        ));
        // A signature with no challenge is not a login.
        let mut s = ServerSession::secure(ServerConfig::default(), [7; 32]);
        send(&mut s, ClientId::default(), &mut rng, login()).unwrap();
        assert_eq!(
            s.passphrase_found(
                PassphraseLookup::Found {
                    client_id: ClientId([5; 16]),
                    envelope: Bytes::from_static(&[3; 121]),
                },
                &mut rng
            )
            .unwrap(),
            Response::Repo(RepoResponse::PassphraseRefused {
                reason: PassphraseRefusal::NO_PASSPHRASE
            })
        );
        assert!(send(
            &mut s,
            ClientId([5; 16]),
            &mut rng,
            RepoRequest::PassphraseProve { signature: [0; 64] }
        )
        .is_err());
    }

    #[test]
    fn rejects_a_passphrase_slot_envelope_the_server_cannot_read_a_login_key_from() {
        let (mut s, id, mut rng) = proven();
        assert_eq!(
            send(
                &mut s,
                id,
                &mut rng,
                RepoRequest::PutKey {
                    slot: PASSPHRASE_SLOT,
                    envelope: Bytes::from_static(b"not an envelope"),
                }
            )
            .unwrap_err(),
            SessionError::NotAPassphraseEnvelope(PASSPHRASE_SLOT)
        );
        let sealed =
            envelope::seal_with_passphrase(&MasterKey::from_bytes([4; 32]), b"p", CHEAP, &mut rng)
                .unwrap();
        assert!(matches!(
            send(
                &mut s,
                id,
                &mut rng,
                RepoRequest::PutKey {
                    slot: PASSPHRASE_SLOT,
                    envelope: sealed.into(),
                }
            ),
            Ok(Action::Repo(RepoAction::PutKey { .. }))
        ));
    }
}
