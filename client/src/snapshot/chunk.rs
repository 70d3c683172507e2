//! Content-defined chunking (FastCDC, the `fastcdc` crate's 2020 variant):
//! a chunk boundary depends on the bytes around it, not on its offset, so
//! an insertion early in a file moves only the chunks around it and the
//! rest keep their ids.
//!
//! Sizes: 256 KiB minimum, 1 MiB average, 4 MiB maximum, as restic. Larger
//! chunks (borg's 2 MiB average) chunk no faster here (about 1.2 GB/s
//! either way) and make a small change cost more: the overwritten-MiB case
//! of the benchmarks sends the chunks it touches, so a smaller average
//! sends less; smaller chunks than 1 MiB grow the index and the number of
//! ids a snapshot references for little gain on the benchmark's data.

use std::io::Read;

use fastcdc::v2020::{Error as CdcError, StreamCDC};

/// The smallest chunk but a file's last.
pub const MIN: u32 = 256 * 1024;
/// The average chunk FastCDC aims at.
pub const AVG: u32 = 1024 * 1024;
/// The largest chunk.
pub const MAX: u32 = 4 * 1024 * 1024;

/// One chunk of a stream: where it starts and its bytes.
#[derive(Debug)]
pub struct Chunk {
    pub offset: u64,
    pub data: Vec<u8>,
}

/// Cuts `source` into chunks as it is read; holds at most one maximal
/// chunk and FastCDC's read buffer.
pub fn chunks<R: Read>(source: R) -> impl Iterator<Item = std::io::Result<Chunk>> {
    StreamCDC::new(source, MIN, AVG, MAX).map(|r| match r {
        Ok(c) => Ok(Chunk {
            offset: c.offset,
            data: c.data,
        }),
        Err(CdcError::IoError(e)) => Err(e),
        Err(e) => Err(std::io::Error::other(e.to_string())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: u32) -> Vec<u8> {
        let mut x = seed;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    }

    fn cut(bytes: &[u8]) -> Vec<Vec<u8>> {
        chunks(bytes).map(|c| c.unwrap().data).collect()
    }

    #[test]
    fn chunks_cover_the_stream_within_the_sizes() {
        let bytes = data(20 << 20, 1);
        let mut offset = 0u64;
        let all: Vec<Chunk> = chunks(&bytes[..]).map(|c| c.unwrap()).collect();
        for (i, c) in all.iter().enumerate() {
            assert_eq!(c.offset, offset);
            assert!(c.data.len() <= MAX as usize);
            if i + 1 < all.len() {
                assert!(c.data.len() >= MIN as usize);
            }
            offset += c.data.len() as u64;
        }
        assert_eq!(offset, bytes.len() as u64);
        assert!(all.len() > 5, "{} chunks of 20 MiB", all.len());
        assert_eq!(
            all.iter().flat_map(|c| c.data.clone()).collect::<Vec<_>>(),
            bytes
        );
    }

    #[test]
    fn an_insertion_moves_only_the_chunks_around_it() {
        let bytes = data(16 << 20, 2);
        let before = cut(&bytes);
        let mut changed = bytes.clone();
        changed.splice(3 << 20..3 << 20, *b"inserted");
        let after = cut(&changed);
        let same = after.iter().filter(|c| before.contains(c)).count();
        assert!(
            same + 3 >= after.len(),
            "{same} of {} chunks kept after an 8-byte insertion",
            after.len()
        );
    }

    #[test]
    fn a_small_file_is_one_chunk_and_an_empty_one_none() {
        assert_eq!(cut(b"small").len(), 1);
        assert!(cut(b"").is_empty());
    }
}
