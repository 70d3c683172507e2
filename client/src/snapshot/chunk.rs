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

use fastcdc::v2020::{cut, logarithm2, Normalization, MASKS};

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

/// Cuts streams into chunks with one buffer for all of them.
///
/// The cut points are those of the crate's `StreamCDC` (normalization
/// level 1, no seed): the window given to FastCDC is the next `MAX` bytes
/// of the stream, or what is left of it. `StreamCDC` itself is not used
/// because it allocates and zeroes a maximal buffer for every stream and
/// moves the rest of it after every chunk: on 10,000 small files that was
/// 40 GB of memory written, most of a backup's time.
pub struct Chunker {
    /// Twice the largest chunk: the window slides along it and what is
    /// left is moved to the front once less than a window remains.
    buf: Vec<u8>,
    mask_s: u64,
    mask_l: u64,
}

impl Default for Chunker {
    fn default() -> Self {
        let bits = logarithm2(AVG);
        let level = Normalization::Level1.bits();
        Self {
            buf: Vec::new(),
            mask_s: MASKS[(bits + level) as usize],
            mask_l: MASKS[(bits - level) as usize],
        }
    }
}

impl Chunker {
    /// Cuts `source` into chunks, handing each to `each` in order.
    ///
    /// # Errors
    /// A read error, or the first error `each` returns.
    pub fn run<R: Read, E: From<std::io::Error>>(
        &mut self,
        mut source: R,
        mut each: impl FnMut(Chunk) -> Result<(), E>,
    ) -> Result<(), E> {
        let max = MAX as usize;
        if self.buf.len() < 2 * max {
            self.buf.resize(2 * max, 0);
        }
        let (mut start, mut end, mut eof) = (0usize, 0usize, false);
        let mut offset = 0u64;
        loop {
            if !eof && end - start < max {
                self.buf.copy_within(start..end, 0);
                end -= start;
                start = 0;
                while !eof && end < self.buf.len() {
                    match source.read(&mut self.buf[end..]) {
                        Ok(0) => eof = true,
                        Ok(n) => end += n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            if start == end {
                return Ok(());
            }
            let window = &self.buf[start..end.min(start + max)];
            let (_, len) = cut(
                window,
                MIN as usize,
                AVG as usize,
                max,
                self.mask_s,
                self.mask_l,
                self.mask_s << 1,
                self.mask_l << 1,
            );
            let len = len.max(1).min(window.len());
            each(Chunk {
                offset,
                data: window[..len].to_vec(),
            })?;
            offset += len as u64;
            start += len;
        }
    }
}

/// Cuts `source` into chunks (a fresh [`Chunker`]; tests and tools).
///
/// # Errors
/// A read error.
pub fn chunks<R: Read>(source: R) -> std::io::Result<Vec<Chunk>> {
    let mut out = Vec::new();
    Chunker::default().run(source, |c| {
        out.push(c);
        Ok::<(), std::io::Error>(())
    })?;
    Ok(out)
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
        chunks(bytes).unwrap().into_iter().map(|c| c.data).collect()
    }

    #[test]
    fn chunks_cover_the_stream_within_the_sizes() {
        let bytes = data(20 << 20, 1);
        let mut offset = 0u64;
        let all: Vec<Chunk> = chunks(&bytes[..]).unwrap();
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

    /// The cut points are `StreamCDC`'s, so chunks made before and after
    /// the change of chunker deduplicate; read in odd-sized pieces, as a
    /// file or socket may hand them out.
    #[test]
    fn cuts_are_those_of_the_crates_stream_chunker() {
        struct Dribble<'a>(&'a [u8], usize);
        impl Read for Dribble<'_> {
            fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
                self.1 = self.1 % 7919 + 1;
                let n = self.1.min(out.len()).min(self.0.len());
                out[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        for (len, seed) in [
            (0, 1),
            (100, 2),
            (300 << 10, 3),
            (9 << 20, 4),
            (21 << 20, 5),
        ] {
            let bytes = data(len, seed);
            let theirs: Vec<(u64, usize)> =
                fastcdc::v2020::StreamCDC::new(&bytes[..], MIN, AVG, MAX)
                    .map(|c| c.unwrap())
                    .map(|c| (c.offset, c.length))
                    .collect();
            let ours: Vec<(u64, usize)> = chunks(Dribble(&bytes, 0))
                .unwrap()
                .into_iter()
                .map(|c| (c.offset, c.data.len()))
                .collect();
            assert_eq!(ours, theirs, "{len} bytes");
        }
    }

    #[test]
    fn a_small_file_is_one_chunk_and_an_empty_one_none() {
        assert_eq!(cut(b"small").len(), 1);
        assert!(cut(b"").is_empty());
    }
}
