//! POSIX `cksum` (`docs/PROTOCOL.md` §5), streaming.
//!
//! The CRC itself is the catalogue's CRC-32/CKSUM (polynomial 0x04C11DB7,
//! MSB first, init 0, final xor 0xFFFFFFFF) from the `crc` crate, with its
//! slice-by-16 table. POSIX then feeds the file's length, least significant
//! byte first and only as many bytes as it needs, before the final xor; the
//! `crc` digest lets us do that by updating with those bytes at the end.

use crc::{Crc, Table, CRC_32_CKSUM};

static CRC: Crc<u32, Table<16>> = Crc::<u32, Table<16>>::new(&CRC_32_CKSUM);

/// A streaming POSIX `cksum`: feed bytes in any chunks, then [`finish`](Self::finish).
#[derive(Clone)]
pub struct Cksum {
    digest: crc::Digest<'static, u32, Table<16>>,
    len: u64,
}

impl std::fmt::Debug for Cksum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cksum")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl Default for Cksum {
    fn default() -> Self {
        Self::new()
    }
}

impl Cksum {
    /// An empty checksum.
    pub fn new() -> Self {
        Self {
            digest: CRC.digest(),
            len: 0,
        }
    }

    /// Feeds `bytes`.
    pub fn update(&mut self, bytes: &[u8]) {
        self.digest.update(bytes);
        self.len = self.len.wrapping_add(bytes.len() as u64);
    }

    /// Bytes fed so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was fed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The checksum, as GNU `cksum` prints it.
    pub fn finish(mut self) -> u32 {
        let len = self.len.to_le_bytes();
        let used = len.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
        self.digest.update(len.get(..used).unwrap_or_default());
        self.digest.finalize()
    }

    /// The checksum of `bytes` in one call.
    pub fn of(bytes: &[u8]) -> u32 {
        let mut c = Self::new();
        c.update(bytes);
        c.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_coreutils_check_values() {
        assert_eq!(Cksum::of(b""), 4294967295);
        assert_eq!(Cksum::of(b"a"), 1220704766);
        assert_eq!(Cksum::of(b"123456789"), 930766865);
    }

    /// A bit-at-a-time reference straight from the POSIX description, so the
    /// table-driven crate is checked against something independent.
    fn reference(bytes: &[u8]) -> u32 {
        fn step(mut s: u32, b: u8) -> u32 {
            s ^= u32::from(b) << 24;
            for _ in 0..8 {
                s = if s & 0x8000_0000 != 0 {
                    (s << 1) ^ 0x04C1_1DB7
                } else {
                    s << 1
                };
            }
            s
        }
        let mut s = bytes.iter().fold(0u32, |s, &b| step(s, b));
        let mut n = bytes.len() as u64;
        while n != 0 {
            s = step(s, (n & 0xff) as u8);
            n >>= 8;
        }
        !s
    }

    #[test]
    fn matches_bitwise_reference_across_length_byte_boundaries() {
        let data: Vec<u8> = (0..70_000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        for len in [0, 1, 15, 16, 255, 256, 257, 65535, 65536, 65537, 70_000] {
            assert_eq!(
                Cksum::of(&data[..len]),
                reference(&data[..len]),
                "len {len}"
            );
        }
    }
}
