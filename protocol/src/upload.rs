//! Planning and packetising an upload (`docs/PROTOCOL.md` §3.4, §6.3): how
//! one file is cut into send-file packets, the sending counterpart of
//! [`crate::reassembly`].

use bytes::{Bytes, BytesMut};

use crate::crypto::pkcs7_len;
use crate::limits::{LEGACY_MAX_FILE_SIZE, SECURE_MAX_FILE_SIZE};
use crate::message::{FilePacket, PacketHead, Request, RequestFrame};
use crate::name::FileName;
use crate::wire::{ClientId, Dialect, Numbering, REQUEST_HEADER_LEN};

/// Why a file cannot be sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("{size} bytes is over the {max}-byte limit of the protocol's size fields")]
    TooLarge { size: u64, max: u64 },
    #[error("packet size must be a positive multiple of 16 up to {max}, not {size}")]
    PacketSize { size: usize, max: usize },
    #[error("{size} bytes need more than {max_packets} packets of {packet_size} bytes; at most {max} bytes fit")]
    TooManyPackets {
        size: u64,
        packet_size: usize,
        max_packets: u64,
        max: u64,
    },
}

/// How one file will be cut into packets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadPlan {
    pub file: FileName,
    pub orig_size: u64,
    pub content_size: u64,
    /// Ciphertext bytes per packet (the last may be shorter).
    pub packet_size: usize,
    pub total: u32,
    /// The dialect the packets will be sent in.
    pub dialect: Dialect,
}

impl UploadPlan {
    /// The largest plaintext whose PKCS#7 ciphertext size still fits a u32.
    pub const MAX_FILE_SIZE: u64 = LEGACY_MAX_FILE_SIZE / 16 * 16 - 1;

    /// The largest file `dialect` can carry.
    pub const fn max_file_size(dialect: Dialect) -> u64 {
        match dialect {
            Dialect::Legacy => Self::MAX_FILE_SIZE,
            Dialect::Secure => SECURE_MAX_FILE_SIZE,
        }
    }

    /// The most packets one upload may have in `dialect`.
    pub const fn max_packets(dialect: Dialect) -> u64 {
        match dialect {
            Dialect::Legacy => u16::MAX as u64,
            Dialect::Secure => u32::MAX as u64,
        }
    }

    /// Plans a legacy upload; see [`UploadPlan::new_in`].
    ///
    /// # Errors
    /// As [`UploadPlan::new_in`].
    pub fn new(
        file: FileName,
        size: u64,
        packet_size: usize,
        max_packet: usize,
    ) -> Result<Self, PlanError> {
        Self::new_in(Dialect::Legacy, file, size, packet_size, max_packet)
    }

    /// Plans a file of `size` plaintext bytes with packets of about
    /// `packet_size` ciphertext bytes, enlarged if needed so the file fits
    /// in the dialect's packet count (65,535 in legacy mode), and never
    /// larger than `max_packet`.
    ///
    /// # Errors
    /// When the file is too large for the dialect's fields, or the packet
    /// size is zero, not a multiple of 16, or over `max_packet`.
    pub fn new_in(
        dialect: Dialect,
        file: FileName,
        size: u64,
        packet_size: usize,
        max_packet: usize,
    ) -> Result<Self, PlanError> {
        if packet_size == 0 || packet_size % 16 != 0 || packet_size > max_packet {
            return Err(PlanError::PacketSize {
                size: packet_size,
                max: max_packet,
            });
        }
        let max_file = Self::max_file_size(dialect);
        if size > max_file {
            return Err(PlanError::TooLarge {
                size,
                max: max_file,
            });
        }
        let max_packets = Self::max_packets(dialect);
        let content = pkcs7_len(size);
        let min_packet = content.div_ceil(max_packets).div_ceil(16) * 16;
        let packet = (packet_size as u64).max(min_packet);
        if packet > max_packet as u64 {
            return Err(PlanError::TooLarge {
                size,
                max: (max_packet as u64).saturating_mul(max_packets),
            });
        }
        let total = content.div_ceil(packet);
        Ok(Self {
            file,
            orig_size: size,
            content_size: content,
            packet_size: usize::try_from(packet).unwrap_or(max_packet),
            total: u32::try_from(total).unwrap_or(u32::MAX),
            dialect,
        })
    }

    /// Plans a file of `size` plaintext bytes with packets of exactly
    /// `packet_size` ciphertext bytes (the last may be shorter), for servers
    /// that need a fixed size: a file that would need more than 65,535
    /// packets is refused rather than cut into larger packets.
    ///
    /// # Errors
    /// As [`UploadPlan::new`], and [`PlanError::TooManyPackets`].
    pub fn fixed(
        dialect: Dialect,
        file: FileName,
        size: u64,
        packet_size: usize,
        max_packet: usize,
    ) -> Result<Self, PlanError> {
        let plan = Self::new_in(dialect, file, size, packet_size, max_packet)?;
        if plan.packet_size != packet_size {
            let max_packets = Self::max_packets(dialect);
            let max = (packet_size as u64)
                .saturating_mul(max_packets)
                .saturating_sub(1)
                .min(Self::max_file_size(dialect));
            return Err(PlanError::TooManyPackets {
                size,
                packet_size,
                max_packets,
                max,
            });
        }
        Ok(plan)
    }

    /// Bytes on the wire for the whole upload, headers included.
    pub fn wire_bytes(&self) -> u64 {
        let head = PacketHead::len_in(self.dialect);
        self.content_size + u64::from(self.total) * (REQUEST_HEADER_LEN + head) as u64
    }
}

/// Cuts a stream of ciphertext into the packets of an [`UploadPlan`].
#[derive(Debug)]
pub struct Packetizer {
    plan: UploadPlan,
    client_id: ClientId,
    numbering: Numbering,
    next: u32,
    buf: BytesMut,
}

impl Packetizer {
    /// A packetizer for one attempt at `plan`.
    pub fn new(plan: UploadPlan, client_id: ClientId, numbering: Numbering) -> Self {
        let buf = BytesMut::with_capacity(plan.packet_size + 16);
        Self {
            plan,
            client_id,
            numbering,
            next: 1,
            buf,
        }
    }

    /// The buffer that ciphertext should be appended to.
    pub fn buffer(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    fn packet(&mut self, content: Bytes) -> RequestFrame {
        let head = PacketHead {
            content_size: self.plan.content_size,
            orig_size: self.plan.orig_size,
            packet: self.next,
            total: self.plan.total,
            file: self.plan.file.clone(),
        };
        self.next = self.next.saturating_add(1);
        RequestFrame {
            client_id: self.client_id,
            numbering: self.numbering,
            request: Request::SendFile(FilePacket { head, content }),
        }
    }

    /// The next full packet, if the buffer holds one and it is not the last.
    pub fn next_full(&mut self) -> Option<RequestFrame> {
        if self.next >= self.plan.total || self.buf.len() < self.plan.packet_size {
            return None;
        }
        let content = self.buf.split_to(self.plan.packet_size).freeze();
        Some(self.packet(content))
    }

    /// The last packet, once all ciphertext (padding included) was appended.
    /// `None` if the buffer does not hold exactly what the plan expects.
    pub fn last(&mut self) -> Option<RequestFrame> {
        if self.next != self.plan.total {
            return None;
        }
        let sent = u64::from(self.plan.total - 1) * self.plan.packet_size as u64;
        if sent + self.buf.len() as u64 != self.plan.content_size {
            return None;
        }
        let content = self.buf.split().freeze();
        Some(self.packet(content))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{encrypt_all, AesKey};

    fn name() -> FileName {
        FileName::try_from("f.bin").unwrap()
    }

    const ID: ClientId = ClientId([0x11; 16]);

    #[test]
    fn fixed_plan_refuses_a_file_that_needs_more_packets() {
        let at_limit = 1024 * u64::from(u16::MAX) - 1;
        let plan = UploadPlan::fixed(Dialect::Legacy, name(), at_limit, 1024, 1 << 20).unwrap();
        assert_eq!((plan.total, plan.packet_size), (u32::from(u16::MAX), 1024));
        assert_eq!(
            UploadPlan::fixed(Dialect::Legacy, name(), at_limit + 1, 1024, 1 << 20),
            Err(PlanError::TooManyPackets {
                size: at_limit + 1,
                packet_size: 1024,
                max_packets: u64::from(u16::MAX),
                max: at_limit
            })
        );
        // Secure mode counts packets in 32 bits: the same file fits.
        let secure =
            UploadPlan::fixed(Dialect::Secure, name(), at_limit + 1, 1024, 1 << 20).unwrap();
        assert_eq!(secure.total, u32::from(u16::MAX) + 1);
        // The flexible plan enlarges the packets instead.
        assert_eq!(
            UploadPlan::new(name(), at_limit + 1, 1024, 1 << 20)
                .unwrap()
                .packet_size,
            1040
        );
    }

    #[test]
    fn packetizer_cuts_the_ciphertext_into_the_planned_slices() {
        let key = AesKey::from_bytes([1; 32]);
        for len in [0usize, 15, 16, 17, 47, 48, 100] {
            let plain: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let ct = encrypt_all(&key, &plain);
            let plan = UploadPlan::new(name(), len as u64, 32, 1 << 20).unwrap();
            let mut p = Packetizer::new(plan.clone(), ID, Numbering::Modern);
            let mut frames = Vec::new();
            for chunk in ct.chunks(16) {
                p.buffer().extend_from_slice(chunk);
                frames.extend(p.next_full());
            }
            frames.extend(p.last());
            assert_eq!(frames.len(), plan.total as usize, "len {len}");
            let mut joined = Vec::new();
            for (i, f) in frames.iter().enumerate() {
                let Request::SendFile(packet) = &f.request else {
                    panic!("not a packet")
                };
                assert_eq!(packet.head.packet as usize, i + 1);
                assert_eq!(
                    (packet.head.total, packet.head.orig_size),
                    (plan.total, len as u64)
                );
                assert_eq!(packet.head.content_size as usize, ct.len());
                joined.extend_from_slice(&packet.content);
            }
            assert_eq!(joined, &ct[..]);
        }
    }

    #[test]
    fn plans_packets_within_the_u16_count() {
        let p = UploadPlan::new(name(), 20000, 8192, 1 << 20).unwrap();
        assert_eq!((p.content_size, p.total, p.packet_size), (20016, 3, 8192));
        let big = UploadPlan::new(name(), UploadPlan::MAX_FILE_SIZE, 1024, 1 << 20).unwrap();
        // 65,535 packets of the asked-for 1024 bytes are too few: the
        // packets grow so that the count fits the u16 field.
        assert!(big.packet_size > 1024 && big.packet_size % 16 == 0);
        assert!(u64::from(big.total) * big.packet_size as u64 >= big.content_size);
        assert_eq!(big.content_size, u64::from(u32::MAX / 16 * 16));
        assert!(matches!(
            UploadPlan::new(name(), UploadPlan::MAX_FILE_SIZE + 1, 1024, 1 << 20),
            Err(PlanError::TooLarge { .. })
        ));
        assert!(UploadPlan::new(name(), 0, 1000, 1 << 20).is_err());
    }

    #[test]
    fn plans_files_over_4_gib_only_in_secure_mode() {
        let size = 5u64 << 30;
        assert!(matches!(
            UploadPlan::new(name(), size, 1 << 20, 1 << 20),
            Err(PlanError::TooLarge { .. })
        ));
        let plan = UploadPlan::new_in(Dialect::Secure, name(), size, 1 << 20, 1 << 20).unwrap();
        assert_eq!(plan.orig_size, size);
        assert_eq!(plan.content_size, size + 16);
        assert_eq!(plan.total, 5 * 1024 + 1);
    }
}
