//! Limits on what a peer may declare (`docs/PROTOCOL.md` §7).
//!
//! Every size a peer declares is checked against a [`Limits`] value as soon as
//! a header is parsed, before anything is allocated.

use crate::name::MAX_NAME_LEN;

/// Size of the fixed head of a send-file payload: content size (4), original
/// size (4), packet number (2), total packets (2), file name (255).
pub const FILE_PACKET_HEAD_LEN: usize = 267;
/// The same in secure mode: content size (8), original size (8), packet
/// number (4), total packets (4), file name (255).
pub const SECURE_FILE_PACKET_HEAD_LEN: usize = 279;

/// The largest file secure mode accepts by default: 16 TiB.
pub const SECURE_MAX_FILE_SIZE: u64 = 1 << 44;

/// The largest file the legacy fields can describe: sizes are u32.
pub const LEGACY_MAX_FILE_SIZE: u64 = u32::MAX as u64;

/// The most packets one upload can have: the packet fields are u16.
pub const MAX_PACKETS: u16 = u16::MAX;

/// Bounds on what a peer may make us hold or accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The most ciphertext bytes one send-file packet may carry. This bounds
    /// the memory one connection holds for file content.
    pub max_packet_content: usize,
    /// The largest file (plaintext bytes) accepted.
    pub max_file_size: u64,
    /// The longest user or file name accepted, in bytes (at most 254).
    pub max_name_len: usize,
    /// The longest wrapped AES key accepted in a 1602/1605 response (an
    /// RSA-OAEP ciphertext is as long as the modulus).
    pub max_wrapped_key: usize,
}

impl Limits {
    /// 1 MiB plus 64 KiB per packet: larger than any packet our client sends
    /// by default, small enough that 1,000 connections stay well under 2 GiB.
    pub const DEFAULT_MAX_PACKET_CONTENT: usize = 1024 * 1024 + 64 * 1024;

    /// The largest payload a legacy send-file request may declare.
    pub fn max_file_packet_payload(&self) -> usize {
        FILE_PACKET_HEAD_LEN.saturating_add(self.max_packet_content)
    }

    /// These limits for a connection in `dialect`. The legacy fields cap a
    /// file at [`LEGACY_MAX_FILE_SIZE`]. Secure mode takes the configured
    /// maximum, except that the legacy cap itself (the default) stands for
    /// "not set" and becomes [`SECURE_MAX_FILE_SIZE`].
    pub fn for_dialect(self, dialect: crate::wire::Dialect) -> Self {
        let max_file_size = match dialect {
            crate::wire::Dialect::Legacy => self.max_file_size.min(LEGACY_MAX_FILE_SIZE),
            crate::wire::Dialect::Secure if self.max_file_size == LEGACY_MAX_FILE_SIZE => {
                SECURE_MAX_FILE_SIZE
            }
            crate::wire::Dialect::Secure => self.max_file_size,
        };
        Self {
            max_file_size,
            ..self
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_packet_content: Self::DEFAULT_MAX_PACKET_CONTENT,
            max_file_size: LEGACY_MAX_FILE_SIZE,
            max_name_len: MAX_NAME_LEN,
            max_wrapped_key: 512,
        }
    }
}
