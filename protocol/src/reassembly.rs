//! Reassembly of a multi-packet upload (`docs/PROTOCOL.md` §3.4).
//!
//! A sans-IO [`Reassembler`] takes the send-file packets of one upload in
//! order and hands their ciphertext slices on, after checking that packet
//! numbers run 1..=N without gap, duplicate or reordering, that every packet
//! repeats the same totals, sizes and name, and that the content adds up to
//! exactly the declared size. It holds no content: memory is one packet,
//! whatever the file size.

use bytes::Bytes;

use crate::crypto::pkcs7_len;
use crate::limits::Limits;
use crate::message::{FilePacket, PacketHead};
use crate::name::FileName;

/// Why a packet was refused. Any of these ends the upload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReassemblyError {
    #[error("packet {got} arrived where packet {expected} was due")]
    OutOfOrder { expected: u32, got: u32 },
    #[error("packet {packet} changes the upload's {field}")]
    Inconsistent { packet: u32, field: &'static str },
    #[error("file of {orig} bytes is over the {max}-byte limit")]
    TooLarge { orig: u64, max: u64 },
    #[error("content size {content} does not match {orig} bytes of plaintext under PKCS#7 (expected {expected})")]
    SizeMismatch {
        content: u64,
        orig: u64,
        expected: u64,
    },
    #[error("packets carry more than the declared {declared} bytes of content")]
    Overflow { declared: u64 },
    #[error("last packet arrived after {received} of {declared} bytes of content")]
    Truncated { received: u64, declared: u64 },
}

/// What the upload in progress declared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upload {
    pub file: FileName,
    pub content_size: u64,
    pub orig_size: u64,
    pub total: u32,
    next: u32,
    received: u64,
}

impl Upload {
    /// Ciphertext bytes accepted so far.
    pub fn received(&self) -> u64 {
        self.received
    }
}

/// One accepted packet's ciphertext, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slice {
    pub content: Bytes,
    /// This packet started an upload (packet 1).
    pub first: bool,
    /// This packet completed the upload; the reassembler is idle again.
    pub last: bool,
}

/// Checks and orders the packets of one upload at a time.
#[derive(Debug, Clone)]
pub struct Reassembler {
    limits: Limits,
    upload: Option<Upload>,
}

impl Reassembler {
    /// An idle reassembler enforcing `limits`.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            upload: None,
        }
    }

    /// The upload in progress, if any.
    pub fn upload(&self) -> Option<&Upload> {
        self.upload.as_ref()
    }

    /// Forgets the upload in progress.
    pub fn reset(&mut self) {
        self.upload = None;
    }

    fn start(&self, head: &PacketHead) -> Result<Upload, ReassemblyError> {
        if head.packet != 1 {
            return Err(ReassemblyError::OutOfOrder {
                expected: 1,
                got: head.packet,
            });
        }
        let orig = head.orig_size;
        if orig > self.limits.max_file_size {
            return Err(ReassemblyError::TooLarge {
                orig,
                max: self.limits.max_file_size,
            });
        }
        let expected = pkcs7_len(orig);
        if head.content_size != expected {
            return Err(ReassemblyError::SizeMismatch {
                content: head.content_size,
                orig: head.orig_size,
                expected,
            });
        }
        Ok(Upload {
            file: head.file.clone(),
            content_size: head.content_size,
            orig_size: head.orig_size,
            total: head.total,
            next: 1,
            received: 0,
        })
    }

    /// Accepts the next packet of the upload (or the first of a new one).
    ///
    /// # Errors
    /// On any gap, duplicate, reordering, change of the declared totals or
    /// name, or content beyond or short of the declared size. The upload is
    /// forgotten.
    pub fn push(&mut self, packet: FilePacket) -> Result<Slice, ReassemblyError> {
        let result = self.accept(&packet.head, packet.content.len());
        match result {
            Ok((first, last)) => Ok(Slice {
                content: packet.content,
                first,
                last,
            }),
            Err(e) => {
                self.upload = None;
                Err(e)
            }
        }
    }

    fn accept(&mut self, head: &PacketHead, len: usize) -> Result<(bool, bool), ReassemblyError> {
        let first = self.upload.is_none();
        let mut upload = match self.upload.take() {
            Some(u) => u,
            None => self.start(head)?,
        };
        if head.packet != upload.next {
            return Err(ReassemblyError::OutOfOrder {
                expected: upload.next,
                got: head.packet,
            });
        }
        let field = if head.total != upload.total {
            Some("total packets")
        } else if head.content_size != upload.content_size {
            Some("content size")
        } else if head.orig_size != upload.orig_size {
            Some("original size")
        } else if head.file != upload.file {
            Some("file name")
        } else {
            None
        };
        if let Some(field) = field {
            return Err(ReassemblyError::Inconsistent {
                packet: head.packet,
                field,
            });
        }
        upload.received = upload.received.saturating_add(len as u64);
        if upload.received > upload.content_size {
            return Err(ReassemblyError::Overflow {
                declared: upload.content_size,
            });
        }
        if head.packet == upload.total {
            if upload.received != upload.content_size {
                return Err(ReassemblyError::Truncated {
                    received: upload.received,
                    declared: upload.content_size,
                });
            }
            return Ok((first, true));
        }
        upload.next = upload.next.saturating_add(1);
        self.upload = Some(upload);
        Ok((first, false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(n: u32, total: u32, content: &[u8], ct: u64, orig: u64) -> FilePacket {
        FilePacket {
            head: PacketHead {
                content_size: ct,
                orig_size: orig,
                packet: n,
                total,
                file: FileName::try_from("f").unwrap(),
            },
            content: Bytes::copy_from_slice(content),
        }
    }

    #[test]
    fn accepts_packets_in_order_and_marks_first_and_last() {
        let mut r = Reassembler::new(Limits::default());
        let a = r.push(packet(1, 2, &[0; 16], 32, 20)).unwrap();
        assert!(a.first && !a.last);
        let b = r.push(packet(2, 2, &[0; 16], 32, 20)).unwrap();
        assert!(!b.first && b.last);
        assert!(r.upload().is_none());
    }

    #[test]
    fn rejects_gap_duplicate_and_changed_fields() {
        let mut r = Reassembler::new(Limits::default());
        r.push(packet(1, 3, &[0; 16], 48, 40)).unwrap();
        assert_eq!(
            r.push(packet(3, 3, &[0; 16], 48, 40)),
            Err(ReassemblyError::OutOfOrder {
                expected: 2,
                got: 3
            })
        );
        assert!(r.upload().is_none());
        r.push(packet(1, 3, &[0; 16], 48, 40)).unwrap();
        assert_eq!(
            r.push(packet(1, 3, &[0; 16], 48, 40)),
            Err(ReassemblyError::OutOfOrder {
                expected: 2,
                got: 1
            })
        );
        r.push(packet(1, 3, &[0; 16], 48, 40)).unwrap();
        assert!(matches!(
            r.push(packet(2, 4, &[0; 16], 48, 40)),
            Err(ReassemblyError::Inconsistent { .. })
        ));
    }

    #[test]
    fn rejects_overflow_truncation_and_size_mismatch() {
        let mut r = Reassembler::new(Limits::default());
        assert!(matches!(
            r.push(packet(1, 1, &[0; 32], 16, 5)),
            Err(ReassemblyError::Overflow { .. })
        ));
        assert!(matches!(
            r.push(packet(1, 1, &[0; 8], 16, 5)),
            Err(ReassemblyError::Truncated { .. })
        ));
        assert!(matches!(
            r.push(packet(1, 1, &[0; 16], 32, 5)),
            Err(ReassemblyError::SizeMismatch { .. })
        ));
        assert!(matches!(
            r.push(packet(2, 2, &[0; 16], 16, 5)),
            Err(ReassemblyError::OutOfOrder {
                expected: 1,
                got: 2
            })
        ));
    }

    #[test]
    fn file_size_limit_is_exact() {
        let limits = Limits {
            max_file_size: 100,
            ..Limits::default()
        };
        let mut r = Reassembler::new(limits);
        let ct = pkcs7_len(100);
        assert!(r.push(packet(1, 2, &[0; 16], ct, 100)).is_ok());
        r.reset();
        let ct = pkcs7_len(101);
        assert_eq!(
            r.push(packet(1, 2, &[0; 16], ct, 101)),
            Err(ReassemblyError::TooLarge {
                orig: 101,
                max: 100
            })
        );
    }
}
