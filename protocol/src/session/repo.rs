//! The client's side of the repository extension (`docs/PROTOCOL.md` §13),
//! without I/O: which answer each request may get, and the order of a
//! fetch's objects and their packets.

use bytes::{Bytes, BytesMut};

use crate::message::Response;
use crate::repo::message::{ObjectId, RepoKind, RepoResponse};
use crate::wire::ResponseCode;

/// An answer that does not fit the request it answers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RepoClientError {
    #[error("{got} in answer to {request:?}")]
    Unexpected {
        request: RepoKind,
        got: ResponseCode,
    },
    #[error("the have answer covers {got} ids, {asked} were asked")]
    HaveCount { asked: usize, got: usize },
    #[error("object {got:?} came where {expected:?} was due")]
    WrongObject { expected: ObjectId, got: ObjectId },
    #[error("object data ran past the {len} bytes announced")]
    Overrun { len: u32 },
    #[error("more objects than asked for")]
    Extra,
}

/// What the server answered to a request of `kind`: its own answer, a
/// 1607 (`Ok(None)`: the server failed, or does not know the extension
/// when it is the first request), or a protocol error.
///
/// # Errors
/// When the response is not one `kind` may get.
pub fn answer(kind: RepoKind, response: Response) -> Result<Option<RepoResponse>, RepoClientError> {
    let got = response.code();
    let repo = match response {
        Response::GeneralError => return Ok(None),
        Response::Repo(r) => r,
        _ => return Err(RepoClientError::Unexpected { request: kind, got }),
    };
    let fits = matches!(
        (kind, &repo),
        (RepoKind::Have, RepoResponse::HaveAnswer { .. })
            | (
                RepoKind::PackEnd,
                RepoResponse::PackStored { .. } | RepoResponse::QuotaExceeded { .. }
            )
            | (RepoKind::SnapshotRefs, RepoResponse::RefsStaged { .. })
            | (
                RepoKind::SnapshotCommit,
                RepoResponse::SnapshotCommitted { .. } | RepoResponse::SnapshotRefused { .. }
            )
            | (RepoKind::Snapshots, RepoResponse::SnapshotPage { .. })
            | (
                RepoKind::Fetch,
                RepoResponse::ObjectBegin { .. } | RepoResponse::ObjectMissing { .. }
            )
            | (
                RepoKind::PutKey,
                RepoResponse::KeyStored { .. } | RepoResponse::KeyExists { .. }
            )
            | (RepoKind::GetKeys, RepoResponse::Keys { .. })
            | (
                RepoKind::PassphraseLogin,
                RepoResponse::PassphraseChallenge { .. } | RepoResponse::PassphraseRefused { .. }
            )
            | (
                RepoKind::DeleteKey,
                RepoResponse::KeyDeleted { .. } | RepoResponse::KeyKept { .. }
            )
            | (
                RepoKind::Forget,
                RepoResponse::Forgotten { .. } | RepoResponse::ForgetRefused { .. }
            )
    );
    if !fits {
        return Err(RepoClientError::Unexpected { request: kind, got });
    }
    Ok(Some(repo))
}

/// Checks a have answer against the number of ids asked.
///
/// # Errors
/// When the counts differ.
pub fn have_answer(asked: usize, have: Vec<bool>) -> Result<Vec<bool>, RepoClientError> {
    if have.len() != asked {
        return Err(RepoClientError::HaveCount {
            asked,
            got: have.len(),
        });
    }
    Ok(have)
}

/// One object of a fetch, complete.
#[derive(Debug, PartialEq, Eq)]
pub enum Fetched {
    Object { id: ObjectId, sealed: Bytes },
    Missing { id: ObjectId },
}

/// Follows the answers to one fetch: for each id asked, in order, 1666 and
/// exactly its announced bytes in 1668 packets, or 1667.
#[derive(Debug)]
pub struct FetchReceiver {
    ids: std::collections::VecDeque<ObjectId>,
    current: Option<(ObjectId, u32, BytesMut)>,
}

impl FetchReceiver {
    pub fn new(ids: &[ObjectId]) -> Self {
        Self {
            ids: ids.iter().copied().collect(),
            current: None,
        }
    }

    /// Whether every object asked for has arrived.
    pub fn done(&self) -> bool {
        self.ids.is_empty() && self.current.is_none()
    }

    /// Takes the next response; returns an object once it is whole.
    ///
    /// # Errors
    /// When the response is out of order, of another id, or overruns.
    pub fn handle(&mut self, response: Response) -> Result<Option<Fetched>, RepoClientError> {
        let got = response.code();
        let unexpected = RepoClientError::Unexpected {
            request: RepoKind::Fetch,
            got,
        };
        match (self.current.as_mut(), response) {
            (Some((id, len, buf)), Response::Repo(RepoResponse::ObjectData { content })) => {
                if buf.len() + content.len() > *len as usize {
                    return Err(RepoClientError::Overrun { len: *len });
                }
                buf.extend_from_slice(&content);
                if buf.len() == *len as usize {
                    let id = *id;
                    let sealed = std::mem::take(buf).freeze();
                    self.current = None;
                    return Ok(Some(Fetched::Object { id, sealed }));
                }
                Ok(None)
            }
            (Some(_), _) => Err(unexpected),
            (None, Response::Repo(RepoResponse::ObjectBegin { id, len })) => {
                let expected = self.ids.pop_front().ok_or(RepoClientError::Extra)?;
                if expected != id {
                    return Err(RepoClientError::WrongObject { expected, got: id });
                }
                self.current = Some((id, len, BytesMut::with_capacity(len as usize)));
                Ok(None)
            }
            (None, Response::Repo(RepoResponse::ObjectMissing { id })) => {
                let expected = self.ids.pop_front().ok_or(RepoClientError::Extra)?;
                if expected != id {
                    return Err(RepoClientError::WrongObject { expected, got: id });
                }
                Ok(Some(Fetched::Missing { id }))
            }
            (None, _) => Err(unexpected),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(b: u8) -> ObjectId {
        ObjectId([b; 32])
    }

    fn data(b: &[u8]) -> Response {
        Response::Repo(RepoResponse::ObjectData {
            content: Bytes::copy_from_slice(b),
        })
    }

    #[test]
    fn a_fetch_yields_objects_in_order() {
        let mut r = FetchReceiver::new(&[id(1), id(2)]);
        assert_eq!(
            r.handle(Response::Repo(RepoResponse::ObjectBegin {
                id: id(1),
                len: 5
            })),
            Ok(None)
        );
        assert_eq!(r.handle(data(b"ab")), Ok(None));
        assert_eq!(
            r.handle(data(b"cde")),
            Ok(Some(Fetched::Object {
                id: id(1),
                sealed: Bytes::from_static(b"abcde")
            }))
        );
        assert!(!r.done());
        assert_eq!(
            r.handle(Response::Repo(RepoResponse::ObjectMissing { id: id(2) })),
            Ok(Some(Fetched::Missing { id: id(2) }))
        );
        assert!(r.done());
    }

    #[test]
    fn wrong_ids_overruns_and_extras_are_errors() {
        let mut r = FetchReceiver::new(&[id(1)]);
        assert!(matches!(
            r.handle(Response::Repo(RepoResponse::ObjectMissing { id: id(9) })),
            Err(RepoClientError::WrongObject { .. })
        ));
        let mut r = FetchReceiver::new(&[id(1)]);
        r.handle(Response::Repo(RepoResponse::ObjectBegin {
            id: id(1),
            len: 2,
        }))
        .unwrap();
        assert_eq!(
            r.handle(data(b"abc")),
            Err(RepoClientError::Overrun { len: 2 })
        );
        let mut r = FetchReceiver::new(&[]);
        assert_eq!(
            r.handle(Response::Repo(RepoResponse::ObjectMissing { id: id(1) })),
            Err(RepoClientError::Extra)
        );
        let mut r = FetchReceiver::new(&[id(1)]);
        assert!(r.handle(data(b"x")).is_err());
    }

    #[test]
    fn answers_must_fit_their_request() {
        assert!(answer(
            RepoKind::Have,
            Response::Repo(RepoResponse::PackStored { added: 1 })
        )
        .is_err());
        assert_eq!(answer(RepoKind::Have, Response::GeneralError), Ok(None));
        assert!(answer(
            RepoKind::SnapshotCommit,
            Response::Repo(RepoResponse::SnapshotRefused {
                reason: crate::repo::message::CommitRefusal::MISSING,
                missing: 1
            })
        )
        .unwrap()
        .is_some());
        assert_eq!(
            have_answer(2, vec![true]),
            Err(RepoClientError::HaveCount { asked: 2, got: 1 })
        );
    }
}
