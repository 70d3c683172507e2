//! Retrieval messages: list, restore and delete (`docs/PROTOCOL.md` §11).
//!
//! An extension of the version 3 protocol that legacy peers never see: the
//! same headers, with request codes 1240..=1242 and response codes
//! 1640..=1645, outside every legacy range. Sizes here are 64-bit.

use bytes::{BufMut, Bytes};

use crate::limits::Limits;
use crate::name::{FileName, NAME_FIELD_LEN};
use crate::payload::PayloadError;
use crate::wire::{u16_le, u32_le, u64_le, ResponseCode};

/// Request code of "list".
pub const LIST: u16 = 1240;
/// Request code of "restore".
pub const RESTORE: u16 = 1241;
/// Request code of "delete".
pub const DELETE: u16 = 1242;

/// The most entries one list page may carry.
pub const MAX_LIST_ENTRIES: usize = 256;
/// Width of one list entry: version, size, stored-at, cksum, name.
pub const LIST_ENTRY_LEN: usize = 8 + 8 + 8 + 4 + NAME_FIELD_LEN;
/// Width of the fixed part of a list page: next cursor and count.
pub const LIST_PAGE_HEAD_LEN: usize = 8 + 2;
/// Width of a restore header.
pub const RESTORE_BEGIN_LEN: usize = 8 + 8 + 8 + 4 + 16 + NAME_FIELD_LEN;

impl ResponseCode {
    pub const LIST_PAGE: Self = Self(1640);
    pub const RESTORE_BEGIN: Self = Self(1641);
    pub const RESTORE_DATA: Self = Self(1642);
    pub const DELETED: Self = Self(1643);
    pub const NOT_FOUND: Self = Self(1644);
    pub const REFUSED: Self = Self(1645);
}

/// Which versions a list request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListFlags(pub u8);

impl ListFlags {
    /// Only the newest version of each name.
    pub const LATEST: Self = Self(0);
    /// Every version of every name.
    pub const ALL_VERSIONS: Self = Self(1);

    /// Whether every version is wanted.
    pub fn all_versions(self) -> bool {
        self.0 & 1 != 0
    }
}

/// A retrieval request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RetrievalRequest {
    /// 1240: a page of the client's files, starting after `cursor` (0: from
    /// the start). Payload: flags u8, cursor u64.
    List { flags: ListFlags, cursor: u64 },
    /// 1241: the content of one version (0: the newest) of `file`. Payload:
    /// version u64, name[255].
    Restore { version: u64, file: FileName },
    /// 1242: remove every version of `file`. Payload: name[255].
    Delete { file: FileName },
}

impl RetrievalRequest {
    /// The wire code.
    pub fn code(&self) -> u16 {
        match self {
            Self::List { .. } => LIST,
            Self::Restore { .. } => RESTORE,
            Self::Delete { .. } => DELETE,
        }
    }

    /// The exact payload size a request with `code` declares, or `None` if
    /// the code is not a retrieval request.
    pub fn payload_len_of(code: u16) -> Option<usize> {
        match code {
            LIST => Some(9),
            RESTORE => Some(8 + NAME_FIELD_LEN),
            DELETE => Some(NAME_FIELD_LEN),
            _ => None,
        }
    }

    /// Payload length of this request.
    pub fn payload_len(&self) -> usize {
        Self::payload_len_of(self.code()).unwrap_or_default()
    }

    /// Parses a complete payload.
    ///
    /// # Errors
    /// When the size is wrong for the code or the name is invalid.
    pub fn parse(code: u16, payload: &[u8], limits: &Limits) -> Result<Self, PayloadError> {
        let expected = Self::payload_len_of(code);
        if expected != Some(payload.len()) {
            return Err(PayloadError::Size {
                code,
                actual: payload.len(),
                expected: "the size its code fixes",
            });
        }
        let field = |r: std::ops::Range<usize>| payload.get(r).unwrap_or_default();
        Ok(match code {
            LIST => Self::List {
                flags: ListFlags(*payload.first().unwrap_or(&0)),
                cursor: u64_le(field(1..9)).unwrap_or_default(),
            },
            RESTORE => Self::Restore {
                version: u64_le(field(0..8)).unwrap_or_default(),
                file: FileName::from_field(field(8..8 + NAME_FIELD_LEN), limits.max_name_len)?,
            },
            _ => Self::Delete {
                file: FileName::from_field(payload, limits.max_name_len)?,
            },
        })
    }

    /// Appends the payload to `out`.
    pub fn write_payload(&self, out: &mut impl BufMut) {
        match self {
            Self::List { flags, cursor } => {
                out.put_u8(flags.0);
                out.put_u64_le(*cursor);
            }
            Self::Restore { version, file } => {
                out.put_u64_le(*version);
                file.write_field(out);
            }
            Self::Delete { file } => file.write_field(out),
        }
    }
}

/// One stored version in a list page.
///
/// | offset | width | field |
/// |---|---|---|
/// | 0 | 8 | version id, u64 LE (unique per client, increasing) |
/// | 8 | 8 | plaintext size, u64 LE |
/// | 16 | 8 | time stored, Unix seconds, u64 LE |
/// | 24 | 4 | POSIX cksum of the plaintext, u32 LE |
/// | 28 | 255 | file name |
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListEntry {
    pub version: u64,
    pub size: u64,
    pub stored_at: u64,
    pub cksum: u32,
    pub file: FileName,
}

/// What a restore will send before its content.
///
/// | offset | width | field |
/// |---|---|---|
/// | 0 | 8 | version id |
/// | 8 | 8 | plaintext size |
/// | 16 | 8 | ciphertext size (PKCS#7 length of the plaintext size) |
/// | 24 | 4 | POSIX cksum of the plaintext |
/// | 28 | 16 | CBC IV, fresh and random for this restore |
/// | 44 | 255 | file name |
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestoreBegin {
    pub version: u64,
    pub size: u64,
    pub content_size: u64,
    pub cksum: u32,
    pub iv: [u8; 16],
    pub file: FileName,
}

/// Why a request was refused (1645).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RefusalReason(pub u8);

impl RefusalReason {
    /// The server keeps this client's history append-only.
    pub const APPEND_ONLY: Self = Self(1);
}

/// A retrieval response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RetrievalResponse {
    /// 1640: entries, and the cursor to ask for next (0: this was the last page).
    ListPage {
        next_cursor: u64,
        entries: Vec<ListEntry>,
    },
    /// 1641: a restore starts; 1642 packets carrying `content_size` bytes of
    /// ciphertext follow.
    RestoreBegin(RestoreBegin),
    /// 1642: the next slice of a restore's ciphertext.
    RestoreData { content: Bytes },
    /// 1643: this many versions were removed.
    Deleted { versions: u32 },
    /// 1644: no such file or version.
    NotFound,
    /// 1645: refused, for this reason.
    Refused { reason: RefusalReason },
}

impl RetrievalResponse {
    /// The wire code.
    pub fn code(&self) -> ResponseCode {
        match self {
            Self::ListPage { .. } => ResponseCode::LIST_PAGE,
            Self::RestoreBegin(_) => ResponseCode::RESTORE_BEGIN,
            Self::RestoreData { .. } => ResponseCode::RESTORE_DATA,
            Self::Deleted { .. } => ResponseCode::DELETED,
            Self::NotFound => ResponseCode::NOT_FOUND,
            Self::Refused { .. } => ResponseCode::REFUSED,
        }
    }

    /// The inclusive range of payload sizes a response with `code` may
    /// declare, or `None` if the code is not a retrieval response.
    pub fn payload_bounds(code: ResponseCode, limits: &Limits) -> Option<(usize, usize)> {
        Some(match code {
            ResponseCode::LIST_PAGE => (
                LIST_PAGE_HEAD_LEN,
                LIST_PAGE_HEAD_LEN + MAX_LIST_ENTRIES * LIST_ENTRY_LEN,
            ),
            ResponseCode::RESTORE_BEGIN => (RESTORE_BEGIN_LEN, RESTORE_BEGIN_LEN),
            ResponseCode::RESTORE_DATA => (1, limits.max_packet_content),
            ResponseCode::DELETED => (4, 4),
            ResponseCode::NOT_FOUND => (0, 0),
            ResponseCode::REFUSED => (1, 1),
            _ => return None,
        })
    }

    /// Payload length of this response.
    pub fn payload_len(&self) -> usize {
        match self {
            Self::ListPage { entries, .. } => LIST_PAGE_HEAD_LEN + entries.len() * LIST_ENTRY_LEN,
            Self::RestoreBegin(_) => RESTORE_BEGIN_LEN,
            Self::RestoreData { content } => content.len(),
            Self::Deleted { .. } => 4,
            Self::NotFound => 0,
            Self::Refused { .. } => 1,
        }
    }

    /// Parses a complete payload of a response with `code`, whose size was
    /// already checked against [`payload_bounds`](Self::payload_bounds).
    ///
    /// # Errors
    /// When the size is wrong for the code or a field is invalid.
    pub fn parse(
        code: ResponseCode,
        payload: Bytes,
        limits: &Limits,
    ) -> Result<Self, PayloadError> {
        let size_err = |expected| PayloadError::Size {
            code: code.0,
            actual: payload.len(),
            expected,
        };
        let (min, max) =
            Self::payload_bounds(code, limits).ok_or_else(|| size_err("a retrieval code"))?;
        if payload.len() < min || payload.len() > max {
            return Err(size_err("the size its code allows"));
        }
        let field = |r: std::ops::Range<usize>| payload.get(r).unwrap_or_default();
        let max_name = limits.max_name_len;
        Ok(match code {
            ResponseCode::LIST_PAGE => {
                let next_cursor = u64_le(field(0..8)).ok_or_else(|| size_err("10 + entries"))?;
                let count =
                    usize::from(u16_le(field(8..10)).ok_or_else(|| size_err("10 + entries"))?);
                if count > MAX_LIST_ENTRIES
                    || payload.len() != LIST_PAGE_HEAD_LEN + count * LIST_ENTRY_LEN
                {
                    return Err(size_err("10 + 283 per entry"));
                }
                let entries = field(LIST_PAGE_HEAD_LEN..payload.len())
                    .chunks_exact(LIST_ENTRY_LEN)
                    .map(|e| {
                        let f = |r: std::ops::Range<usize>| e.get(r).unwrap_or_default();
                        Ok(ListEntry {
                            version: u64_le(f(0..8)).unwrap_or_default(),
                            size: u64_le(f(8..16)).unwrap_or_default(),
                            stored_at: u64_le(f(16..24)).unwrap_or_default(),
                            cksum: u32_le(f(24..28)).unwrap_or_default(),
                            file: FileName::from_field(f(28..LIST_ENTRY_LEN), max_name)?,
                        })
                    })
                    .collect::<Result<Vec<_>, PayloadError>>()?;
                Self::ListPage {
                    next_cursor,
                    entries,
                }
            }
            ResponseCode::RESTORE_BEGIN => {
                let mut iv = [0u8; 16];
                iv.copy_from_slice(field(28..44));
                Self::RestoreBegin(RestoreBegin {
                    version: u64_le(field(0..8)).unwrap_or_default(),
                    size: u64_le(field(8..16)).unwrap_or_default(),
                    content_size: u64_le(field(16..24)).unwrap_or_default(),
                    cksum: u32_le(field(24..28)).unwrap_or_default(),
                    iv,
                    file: FileName::from_field(field(44..RESTORE_BEGIN_LEN), max_name)?,
                })
            }
            ResponseCode::RESTORE_DATA => Self::RestoreData { content: payload },
            ResponseCode::DELETED => Self::Deleted {
                versions: u32_le(field(0..4)).unwrap_or_default(),
            },
            ResponseCode::NOT_FOUND => Self::NotFound,
            _ => Self::Refused {
                reason: RefusalReason(*payload.first().unwrap_or(&0)),
            },
        })
    }

    /// Appends the payload to `out`.
    pub fn write_payload(&self, out: &mut impl BufMut) {
        match self {
            Self::ListPage {
                next_cursor,
                entries,
            } => {
                out.put_u64_le(*next_cursor);
                // At most MAX_LIST_ENTRIES, which fits a u16.
                out.put_u16_le(u16::try_from(entries.len()).unwrap_or(u16::MAX));
                for e in entries {
                    out.put_u64_le(e.version);
                    out.put_u64_le(e.size);
                    out.put_u64_le(e.stored_at);
                    out.put_u32_le(e.cksum);
                    e.file.write_field(out);
                }
            }
            Self::RestoreBegin(b) => {
                out.put_u64_le(b.version);
                out.put_u64_le(b.size);
                out.put_u64_le(b.content_size);
                out.put_u32_le(b.cksum);
                out.put_slice(&b.iv);
                b.file.write_field(out);
            }
            Self::RestoreData { content } => out.put_slice(content),
            Self::Deleted { versions } => out.put_u32_le(*versions),
            Self::NotFound => {}
            Self::Refused { reason } => out.put_u8(reason.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> FileName {
        FileName::try_from(s).unwrap()
    }

    #[test]
    fn round_trips_every_retrieval_message() {
        let limits = Limits::default();
        let requests = [
            RetrievalRequest::List {
                flags: ListFlags::ALL_VERSIONS,
                cursor: 77,
            },
            RetrievalRequest::Restore {
                version: 0,
                file: name("a/b.txt"),
            },
            RetrievalRequest::Delete { file: name("x") },
        ];
        for r in requests {
            let mut out = Vec::new();
            r.write_payload(&mut out);
            assert_eq!(out.len(), r.payload_len());
            assert_eq!(RetrievalRequest::parse(r.code(), &out, &limits).unwrap(), r);
        }
        let entry = ListEntry {
            version: 3,
            size: 20000,
            stored_at: 1_700_000_000,
            cksum: 7,
            file: name("f"),
        };
        let responses = [
            RetrievalResponse::ListPage {
                next_cursor: 0,
                entries: vec![],
            },
            RetrievalResponse::ListPage {
                next_cursor: 9,
                entries: vec![entry.clone(), entry],
            },
            RetrievalResponse::RestoreBegin(RestoreBegin {
                version: 5,
                size: 1 << 33,
                content_size: (1 << 33) + 16,
                cksum: 1,
                iv: [7; 16],
                file: name("big"),
            }),
            RetrievalResponse::RestoreData {
                content: Bytes::from_static(b"0123456789abcdef"),
            },
            RetrievalResponse::Deleted { versions: 2 },
            RetrievalResponse::NotFound,
            RetrievalResponse::Refused {
                reason: RefusalReason::APPEND_ONLY,
            },
        ];
        for r in responses {
            let mut out = Vec::new();
            r.write_payload(&mut out);
            assert_eq!(out.len(), r.payload_len());
            assert_eq!(
                RetrievalResponse::parse(r.code(), Bytes::from(out), &limits).unwrap(),
                r
            );
        }
    }

    #[test]
    fn rejects_list_page_whose_count_disagrees_with_its_size() {
        let mut out = Vec::new();
        out.put_u64_le(0);
        out.put_u16_le(1);
        assert!(RetrievalResponse::parse(
            ResponseCode::LIST_PAGE,
            Bytes::from(out),
            &Limits::default()
        )
        .is_err());
    }

    #[test]
    fn restore_data_is_bounded_by_the_packet_limit() {
        let limits = Limits {
            max_packet_content: 32,
            ..Limits::default()
        };
        let ok = Bytes::from(vec![0u8; 32]);
        assert!(RetrievalResponse::parse(ResponseCode::RESTORE_DATA, ok, &limits).is_ok());
        let over = Bytes::from(vec![0u8; 33]);
        assert!(RetrievalResponse::parse(ResponseCode::RESTORE_DATA, over, &limits).is_err());
        assert_eq!(
            RetrievalResponse::payload_bounds(ResponseCode::RESTORE_DATA, &limits),
            Some((1, 32))
        );
    }
}
