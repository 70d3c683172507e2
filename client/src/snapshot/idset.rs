//! The set of object ids a snapshot references, kept small: a snapshot of
//! a million chunks references a million ids.
//!
//! A `HashSet<ObjectId>` holds 33 bytes per slot at a load of at most 7/8,
//! and while it grows it holds the old table and the new one: about 100
//! MiB at its peak for a million ids. Here the ids are a list (32 bytes
//! each, grown in place) and the table holds 4-byte positions into it,
//! hashed by the ids' first 8 bytes (ids are keyed BLAKE3 hashes, so those
//! are uniform): about 45 MiB for a million. `hashbrown`'s `HashTable`
//! is the map without keys this needs; the standard library has none.

use hashbrown::hash_table::{Entry, HashTable};
use protocol::repo::message::ObjectId;

/// Object ids, each once, in the order first inserted.
#[derive(Default)]
pub(super) struct IdSet {
    ids: Vec<ObjectId>,
    index: HashTable<u32>,
}

fn hash(id: &ObjectId) -> u64 {
    let mut head = [0u8; 8];
    head.copy_from_slice(id.0.get(..8).unwrap_or(&[0; 8]));
    u64::from_le_bytes(head)
}

impl IdSet {
    /// Adds `id`; `false` when it was there already.
    pub(super) fn insert(&mut self, id: ObjectId) -> bool {
        let ids = &self.ids;
        let at = |i: &u32| ids.get(*i as usize);
        match self
            .index
            .entry(hash(&id), |i| at(i) == Some(&id), |i| at(i).map_or(0, hash))
        {
            Entry::Occupied(_) => false,
            Entry::Vacant(slot) => {
                // More than 4 billion ids would not fit a snapshot anyway.
                slot.insert(u32::try_from(self.ids.len()).unwrap_or(u32::MAX));
                self.ids.push(id);
                true
            }
        }
    }

    pub(super) fn len(&self) -> usize {
        self.ids.len()
    }

    /// Where `id` is in the order first inserted, if it is here.
    pub(super) fn position(&self, id: &ObjectId) -> Option<u32> {
        let ids = &self.ids;
        self.index
            .find(hash(id), |i| ids.get(*i as usize) == Some(id))
            .copied()
    }

    /// The ids, in the order first inserted.
    pub(super) fn as_slice(&self) -> &[ObjectId] {
        &self.ids
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = &ObjectId> {
        self.ids.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_each_id_once_in_the_order_first_inserted() {
        let mut set = IdSet::default();
        let id = |n: u32| {
            let mut b = [0u8; 32];
            b[..4].copy_from_slice(&n.to_le_bytes());
            // Ids equal in their first 8 bytes share a hash and still differ.
            b[31] = (n % 3) as u8;
            ObjectId(b)
        };
        for n in 0..10_000 {
            assert!(set.insert(id(n)), "{n} is new");
        }
        for n in (0..10_000).rev() {
            assert!(!set.insert(id(n)), "{n} is there");
        }
        let mut same_head = id(5);
        same_head.0[31] = 9;
        assert!(set.insert(same_head));
        assert_eq!(set.len(), 10_001);
        let order: Vec<ObjectId> = set.iter().copied().collect();
        assert_eq!(order[0], id(0));
        assert_eq!(order[9_999], id(9_999));
        assert_eq!(order[10_000], same_head);
        assert_eq!(set.position(&same_head), Some(10_000));
        assert_eq!(set.position(&id(7)), Some(7));
        assert_eq!(set.position(&id(10_000)), None);
    }
}
