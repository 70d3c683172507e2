//! Packs: sealed objects stored back to back in one stored object, with an
//! index the server keeps (`docs/PROTOCOL.md` §13.4).

use std::collections::HashSet;

use crate::repo::message::{
    ObjectId, PackEntry, MAX_OBJECT_BYTES, MAX_PACK_BYTES, MAX_PACK_OBJECTS,
};
use crate::repo::seal::OVERHEAD;

/// Why a pack's index does not describe the bytes that arrived.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PackError {
    #[error("the index covers {indexed} bytes but {received} arrived")]
    Length { indexed: u64, received: u64 },
    #[error("object {index} is {len} bytes; sealed objects are {min}..={max}")]
    ObjectSize {
        index: usize,
        len: u32,
        min: usize,
        max: u32,
    },
    #[error("object {0:?} appears twice in one pack")]
    Duplicate(ObjectId),
    #[error("a pack holds at most {MAX_PACK_OBJECTS} objects")]
    TooMany,
    #[error("a pack is at most {MAX_PACK_BYTES} bytes")]
    TooLarge,
}

/// Where an object lies in its pack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Located {
    pub id: ObjectId,
    pub offset: u64,
    pub len: u32,
}

/// Checks a pack index against the `received` bytes of the pack and
/// returns each object's place. The objects must cover the pack exactly,
/// each no shorter than a sealed empty object and no longer than
/// [`MAX_OBJECT_BYTES`], each id once.
///
/// # Errors
/// When the index does not describe the pack.
pub fn locate(entries: &[PackEntry], received: u64) -> Result<Vec<Located>, PackError> {
    if entries.len() > MAX_PACK_OBJECTS {
        return Err(PackError::TooMany);
    }
    if received > MAX_PACK_BYTES {
        return Err(PackError::TooLarge);
    }
    let mut seen = HashSet::with_capacity(entries.len());
    let mut offset = 0u64;
    let mut out = Vec::with_capacity(entries.len());
    for (index, e) in entries.iter().enumerate() {
        if (e.len as usize) < OVERHEAD || e.len > MAX_OBJECT_BYTES {
            return Err(PackError::ObjectSize {
                index,
                len: e.len,
                min: OVERHEAD,
                max: MAX_OBJECT_BYTES,
            });
        }
        if !seen.insert(e.id) {
            return Err(PackError::Duplicate(e.id));
        }
        out.push(Located {
            id: e.id,
            offset,
            len: e.len,
        });
        offset += u64::from(e.len);
    }
    if offset != received {
        return Err(PackError::Length {
            indexed: offset,
            received,
        });
    }
    Ok(out)
}

/// The client's side of one pack being filled: the index so far and its
/// size. The sealed bytes themselves go out as they are made.
#[derive(Debug, Default)]
pub struct PackBuilder {
    entries: Vec<PackEntry>,
    ids: HashSet<ObjectId>,
    bytes: u64,
}

impl PackBuilder {
    /// Whether an object of `len` sealed bytes still fits: a pack closes
    /// at `target` bytes or [`MAX_PACK_OBJECTS`] objects.
    pub fn fits(&self, len: usize, target: u64) -> bool {
        self.entries.is_empty()
            || (self.entries.len() < MAX_PACK_OBJECTS
                && self.bytes + len as u64 <= target.min(MAX_PACK_BYTES))
    }

    /// Whether `id` is already in this pack.
    pub fn contains(&self, id: &ObjectId) -> bool {
        self.ids.contains(id)
    }

    /// Records an object of `len` sealed bytes appended to the pack.
    pub fn push(&mut self, id: ObjectId, len: usize) {
        self.ids.insert(id);
        self.entries.push(PackEntry {
            id,
            len: u32::try_from(len).unwrap_or(u32::MAX),
        });
        self.bytes += len as u64;
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The index, leaving the builder empty for the next pack.
    pub fn finish(&mut self) -> Vec<PackEntry> {
        self.ids.clear();
        self.bytes = 0;
        std::mem::take(&mut self.entries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(b: u8, len: u32) -> PackEntry {
        PackEntry {
            id: ObjectId([b; 32]),
            len,
        }
    }

    #[test]
    fn an_index_that_covers_the_pack_locates_every_object() {
        let located = locate(&[entry(1, 100), entry(2, 62)], 162).unwrap();
        assert_eq!(located[1].offset, 100);
        assert_eq!(located[1].len, 62);
    }

    #[test]
    fn gaps_overruns_duplicates_and_tiny_objects_are_refused() {
        assert!(matches!(
            locate(&[entry(1, 100)], 101),
            Err(PackError::Length { .. })
        ));
        assert!(matches!(
            locate(&[entry(1, 100)], 99),
            Err(PackError::Length { .. })
        ));
        assert!(matches!(
            locate(&[entry(1, 100), entry(1, 100)], 200),
            Err(PackError::Duplicate(_))
        ));
        assert!(matches!(
            locate(&[entry(1, 10)], 10),
            Err(PackError::ObjectSize { .. })
        ));
        assert!(matches!(
            locate(
                &[entry(1, MAX_OBJECT_BYTES + 1)],
                u64::from(MAX_OBJECT_BYTES) + 1
            ),
            Err(PackError::ObjectSize { .. })
        ));
    }

    #[test]
    fn a_builder_closes_at_its_target() {
        let mut b = PackBuilder::default();
        assert!(b.fits(10_000, 100));
        b.push(ObjectId([1; 32]), 10_000);
        assert!(!b.fits(1, 100));
        assert!(b.contains(&ObjectId([1; 32])));
        assert_eq!(b.finish().len(), 1);
        assert!(b.is_empty());
    }
}
