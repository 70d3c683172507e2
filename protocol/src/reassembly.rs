//! Reassembly of a multi-packet upload (`docs/PROTOCOL.md` §3.4).
//!
//! A sans-IO [`Reassembler`] takes the send-file packets of one upload in
//! order and hands their ciphertext slices on, after checking that packet
//! numbers run 1..=N without gap, duplicate or reordering, that every packet
//! repeats the same totals, sizes and name, and that the content adds up to
//! exactly the declared size. It holds no content: memory is one packet,
//! whatever the file size.
//!
//! Two deviations of deployed legacy clients are absorbed when its
//! [`Leniency`] says so (`docs/PROTOCOL.md` §9): packets numbered 0..N-1
//! (the scheme is fixed by the first packet, so a mix within one upload is
//! still refused), and zero bytes past the declared content size in the
//! last packet, which are dropped before anything decrypts them.

use bytes::Bytes;

use crate::crypto::pkcs7_len;
use crate::limits::Limits;
use crate::message::{FilePacket, PacketHead};
use crate::name::FileName;

/// Deviations of deployed legacy clients that the legacy listener absorbs
/// (`docs/PROTOCOL.md` §9). All on by default; [`Leniency::STRICT`] turns
/// every one off, as secure mode always does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leniency {
    /// Accept an upload numbered from 0 (first packet 0, last total-1).
    pub zero_based_packets: bool,
    /// Accept zero bytes past the declared content size in the last packet
    /// (a client that pads it to a fixed chunk size); they are dropped.
    pub zero_padding: bool,
    /// Answer a repeated "CRC ok" for the file just committed with 1604
    /// again, instead of as a protocol error (a session rule; the
    /// reassembler does not use it).
    pub repeated_crc_ok: bool,
}

impl Leniency {
    /// Every deviation refused: the protocol as `docs/PROTOCOL.md` §3.4 and
    /// §6.3 write it.
    pub const STRICT: Self = Self {
        zero_based_packets: false,
        zero_padding: false,
        repeated_crc_ok: false,
    };
    /// Every deviation absorbed (the default).
    pub const LENIENT: Self = Self {
        zero_based_packets: true,
        zero_padding: true,
        repeated_crc_ok: true,
    };
}

impl Default for Leniency {
    fn default() -> Self {
        Self::LENIENT
    }
}

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
    #[error("an upload numbered from 0 declares 0 packets")]
    NoPackets,
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
    /// The number of the first packet: 1, or 0 for a client that numbers
    /// from 0.
    pub first_number: u32,
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
    /// The packet's ciphertext, without any zero padding past the declared
    /// content size.
    pub content: Bytes,
    /// Zero bytes past the declared content size that were dropped.
    pub padding: usize,
    /// This packet started an upload (packet 1).
    pub first: bool,
    /// This packet completed the upload; the reassembler is idle again.
    pub last: bool,
}

/// Checks and orders the packets of one upload at a time.
#[derive(Debug, Clone)]
pub struct Reassembler {
    limits: Limits,
    leniency: Leniency,
    upload: Option<Upload>,
}

impl Reassembler {
    /// An idle reassembler enforcing `limits`, with no leniency.
    pub fn new(limits: Limits) -> Self {
        Self::lenient(limits, Leniency::STRICT)
    }

    /// An idle reassembler enforcing `limits` that absorbs the deviations
    /// `leniency` allows.
    pub fn lenient(limits: Limits, leniency: Leniency) -> Self {
        Self {
            limits,
            leniency,
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
        let first_number = match head.packet {
            1 => 1,
            0 if self.leniency.zero_based_packets => {
                if head.total == 0 {
                    return Err(ReassemblyError::NoPackets);
                }
                0
            }
            got => return Err(ReassemblyError::OutOfOrder { expected: 1, got }),
        };
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
            first_number,
            next: first_number,
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
        let FilePacket { head, mut content } = packet;
        let result = self.accept(&head, &content);
        match result {
            Ok((first, last, padding)) => {
                content.truncate(content.len() - padding);
                Ok(Slice {
                    content,
                    padding,
                    first,
                    last,
                })
            }
            Err(e) => {
                self.upload = None;
                Err(e)
            }
        }
    }

    /// Checks a packet against the upload; returns whether it is the first
    /// and the last, and how many zero bytes at its end to drop.
    fn accept(
        &mut self,
        head: &PacketHead,
        content: &[u8],
    ) -> Result<(bool, bool, usize), ReassemblyError> {
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
        // Numbered from 0, the last packet is total - 1 (start() refused a
        // total of 0 then); from 1, it is total.
        let last = head.packet == upload.total.saturating_sub(1 - upload.first_number);
        let room = upload.content_size.saturating_sub(upload.received);
        let mut padding = 0;
        if content.len() as u64 > room {
            // Past the declared size: only zeros at the end of a last
            // packet that also carries content (a packet of nothing but
            // padding is no client's habit), and only when padding is
            // absorbed.
            let beyond = content.get(room as usize..).unwrap_or_default();
            let padded =
                self.leniency.zero_padding && last && room > 0 && beyond.iter().all(|&b| b == 0);
            if !padded {
                return Err(ReassemblyError::Overflow {
                    declared: upload.content_size,
                });
            }
            padding = beyond.len();
        }
        upload.received = upload
            .received
            .saturating_add((content.len() - padding) as u64);
        if last {
            if upload.received != upload.content_size {
                return Err(ReassemblyError::Truncated {
                    received: upload.received,
                    declared: upload.content_size,
                });
            }
            return Ok((first, true, padding));
        }
        upload.next = upload.next.saturating_add(1);
        self.upload = Some(upload);
        Ok((first, false, 0))
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

    fn lenient() -> Reassembler {
        Reassembler::lenient(Limits::default(), Leniency::LENIENT)
    }

    #[test]
    fn accepts_packets_numbered_from_zero_only_when_lenient() {
        let mut r = lenient();
        let a = r.push(packet(0, 2, &[1; 16], 32, 20)).unwrap();
        assert!(a.first && !a.last);
        let b = r.push(packet(1, 2, &[2; 16], 32, 20)).unwrap();
        assert!(!b.first && b.last, "total-1 is the last");
        assert!(r.upload().is_none());

        let mut r = Reassembler::new(Limits::default());
        assert_eq!(
            r.push(packet(0, 2, &[1; 16], 32, 20)),
            Err(ReassemblyError::OutOfOrder {
                expected: 1,
                got: 0
            })
        );
    }

    #[test]
    fn rejects_a_mix_of_numbering_schemes_in_one_upload() {
        // From 0, then the 1-based last number.
        let mut r = lenient();
        r.push(packet(0, 3, &[0; 16], 48, 40)).unwrap();
        assert_eq!(
            r.push(packet(2, 3, &[0; 16], 48, 40)),
            Err(ReassemblyError::OutOfOrder {
                expected: 1,
                got: 2
            })
        );
        // From 1, then a packet 0.
        r.push(packet(1, 3, &[0; 16], 48, 40)).unwrap();
        assert_eq!(
            r.push(packet(0, 3, &[0; 16], 48, 40)),
            Err(ReassemblyError::OutOfOrder {
                expected: 2,
                got: 0
            })
        );
        // From 0, the last packet (total-1) arrives short of the size a
        // 1-based count would have carried on to.
        r.push(packet(0, 2, &[0; 16], 48, 40)).unwrap();
        assert!(matches!(
            r.push(packet(1, 2, &[0; 16], 48, 40)),
            Err(ReassemblyError::Truncated { .. })
        ));
        assert_eq!(
            r.push(packet(0, 0, &[0; 16], 16, 5)),
            Err(ReassemblyError::NoPackets)
        );
    }

    #[test]
    fn drops_zeros_past_the_content_size_in_the_last_packet_only_when_lenient() {
        let mut r = lenient();
        let mut padded = vec![7u8; 1008];
        padded.resize(1024, 0);
        let s = r.push(packet(1, 1, &padded, 1008, 1000)).unwrap();
        assert!(s.last);
        assert_eq!(s.padding, 16);
        assert_eq!(s.content.len(), 1008);
        assert!(s.content.iter().all(|&b| b == 7));
        // Across packets: 1024 + (1008 + 16 zeros).
        let mut last = vec![7u8; 1008];
        last.resize(1024, 0);
        r.push(packet(1, 2, &[7; 1024], 2032, 2020)).unwrap();
        let s = r.push(packet(2, 2, &last, 2032, 2020)).unwrap();
        assert_eq!((s.content.len(), s.padding), (1008, 16));

        let mut strict = Reassembler::new(Limits::default());
        assert!(matches!(
            strict.push(packet(1, 1, &padded, 1008, 1000)),
            Err(ReassemblyError::Overflow { .. })
        ));
    }

    #[test]
    fn rejects_anything_but_zeros_at_the_end_of_the_last_packet() {
        let mut r = lenient();
        let mut bad = vec![7u8; 1008];
        bad.resize(1024, 0);
        bad[1020] = 1;
        assert!(matches!(
            r.push(packet(1, 1, &bad, 1008, 1000)),
            Err(ReassemblyError::Overflow { .. })
        ));
        // Zeros past the size in a packet that is not the last.
        assert!(matches!(
            r.push(packet(1, 2, &[0; 32], 16, 5)),
            Err(ReassemblyError::Overflow { .. })
        ));
        // A last packet of nothing but zeros past the size.
        r.push(packet(1, 2, &[0; 16], 16, 5)).unwrap();
        assert!(matches!(
            r.push(packet(2, 2, &[0; 16], 16, 5)),
            Err(ReassemblyError::Overflow { .. })
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
