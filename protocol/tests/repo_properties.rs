//! Property tests of the repository extension's sealed formats
//! (`docs/PROTOCOL.md` §13): trees and snapshot descriptions round trip,
//! sealed objects open to themselves and to nothing once altered, and a
//! pack index is accepted exactly when it covers its pack.
//!
//! Failures are persisted to `proptest-regressions/repo_properties.txt` at
//! the repository root, so that a committed regression replays first.

use std::collections::{BTreeMap, HashSet};

use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use protocol::repo::keys::MasterKey;
use protocol::repo::message::{ObjectId, PackEntry, MAX_OBJECT_BYTES, MAX_PACK_BYTES};
use protocol::repo::pack::{self, PackError};
use protocol::repo::seal::{OpenError, Opener, Sealer, OVERHEAD};
use protocol::repo::tree::{self, Description, Entry, EntryKind};
use rand::SeedableRng;

/// Where failing cases are recorded: the repository's `proptest-regressions/`.
const REGRESSIONS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../proptest-regressions/repo_properties.txt"
);

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(REGRESSIONS))),
        ..ProptestConfig::default()
    }
}

fn object_id() -> impl Strategy<Value = ObjectId> {
    any::<[u8; 32]>().prop_map(ObjectId)
}

/// One path component: no `/`, no NUL, not `.` or `..`.
fn plain_name() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(
        any::<u8>().prop_filter("no / or NUL", |b| *b != b'/' && *b != 0),
        1..24,
    )
    .prop_filter("not . or ..", |n| n != b"." && n != b"..")
}

fn entry_kind() -> impl Strategy<Value = EntryKind> {
    prop_oneof![
        (any::<u64>(), proptest::collection::vec(object_id(), 0..5))
            .prop_map(|(size, chunks)| EntryKind::File { size, chunks }),
        object_id().prop_map(|tree| EntryKind::Dir { tree }),
        proptest::collection::vec(any::<u8>(), 0..64)
            .prop_map(|target| EntryKind::Symlink { target }),
    ]
}

fn entry() -> impl Strategy<Value = Entry> {
    (
        plain_name(),
        any::<u32>(),
        any::<i64>(),
        any::<u32>(),
        entry_kind(),
    )
        .prop_map(|(name, mode, mtime_s, mtime_ns, kind)| Entry {
            name,
            mode,
            mtime_s,
            mtime_ns,
            kind,
        })
}

/// Entries with distinct names, in any order.
fn entries() -> impl Strategy<Value = Vec<Entry>> {
    proptest::collection::vec(entry(), 0..12).prop_map(|list| {
        let unique: BTreeMap<Vec<u8>, Entry> =
            list.into_iter().map(|e| (e.name.clone(), e)).collect();
        let mut list: Vec<Entry> = unique.into_values().collect();
        list.reverse();
        list
    })
}

fn strings() -> impl Strategy<Value = Vec<String>> {
    proptest::collection::vec("\\PC{0,24}", 0..5)
}

fn description() -> impl Strategy<Value = Description> {
    (
        object_id(),
        "\\PC{0,32}",
        strings(),
        strings(),
        any::<[u64; 4]>(),
    )
        .prop_map(
            |(root, host, paths, tags, [files, dirs, bytes, parent])| Description {
                root,
                host,
                paths,
                tags,
                files,
                dirs,
                bytes,
                parent,
            },
        )
}

/// Plaintext that compresses (repeated runs) or does not (random bytes).
fn plaintext() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..2048),
        (any::<u8>(), 0usize..4096).prop_map(|(b, n)| vec![b; n]),
    ]
}

/// The harness's reading of "the index covers a pack of `size` bytes".
fn covers(entries: &[PackEntry], size: u64) -> bool {
    let mut ids = HashSet::new();
    size <= MAX_PACK_BYTES
        && entries
            .iter()
            .all(|e| e.len as usize >= OVERHEAD && e.len <= MAX_OBJECT_BYTES)
        && entries.iter().all(|e| ids.insert(e.id))
        && entries.iter().map(|e| u64::from(e.len)).sum::<u64>() == size
}

/// Every object in bounds and each id once.
fn objects_valid(entries: &[PackEntry]) -> bool {
    let mut ids = HashSet::new();
    entries
        .iter()
        .all(|e| e.len as usize >= OVERHEAD && e.len <= MAX_OBJECT_BYTES && ids.insert(e.id))
}

/// Lengths around the bounds of a sealed object, and some in between.
fn object_len() -> impl Strategy<Value = u32> {
    let min = OVERHEAD as u32;
    prop_oneof![
        Just(min - 1),
        Just(min),
        min..min + 5000,
        Just(MAX_OBJECT_BYTES),
        Just(MAX_OBJECT_BYTES + 1),
        any::<u32>(),
    ]
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn round_trips_trees_of_plain_names_sorted(mut list in entries()) {
        let bytes = tree::encode_tree(&mut list);
        let back = tree::decode_tree(&bytes).unwrap();
        let mut expected = list.clone();
        expected.sort_by(|a, b| a.name.cmp(&b.name));
        for e in &mut expected {
            e.mode &= 0o7777;
        }
        prop_assert_eq!(&back, &expected);
        // Permission bits past 0o7777 are dropped; without them the
        // decoded entries encode to the same bytes again.
        let again = tree::encode_tree(&mut back.clone());
        if list.iter().all(|e| e.mode <= 0o7777) {
            prop_assert_eq!(&again, &bytes);
        } else {
            prop_assert_eq!(tree::decode_tree(&again).unwrap(), back);
        }
        // No proper prefix is a tree.
        for cut in 0..bytes.len() {
            prop_assert!(tree::decode_tree(&bytes[..cut]).is_err());
        }
    }

    #[test]
    fn round_trips_descriptions_byte_for_byte(d in description()) {
        let bytes = d.encode();
        prop_assert_eq!(Description::decode(&bytes).unwrap(), d);
        for cut in 0..bytes.len() {
            prop_assert!(Description::decode(&bytes[..cut]).is_err());
        }
    }

    #[test]
    fn sealed_objects_open_to_themselves_and_not_once_a_byte_flips(
        plain in plaintext(),
        seed in any::<u64>(),
        at in any::<usize>(),
        mask in 1u8..,
    ) {
        let master = MasterKey::from_bytes([0x4d; 32]);
        let id_key = master.id_key();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let sealer = Sealer::new(&master.backup_key().seal, &mut rng);
        let id = id_key.id(&plain);
        let mut sealed = Vec::new();
        sealer.seal_object(&id, &plain, &mut sealed);
        let mut opener = Opener::new(master.open_key());
        let max = plain.len().max(1);
        prop_assert_eq!(opener.open_object(&id_key, &id, &sealed, max).unwrap(), plain.clone());
        let mut bad = sealed.clone();
        let at = at % bad.len();
        bad[at] ^= mask;
        prop_assert!(opener.open_object(&id_key, &id, &bad, max).is_err());
        let other = id_key.id(b"not this object");
        if other != id {
            prop_assert_eq!(
                opener.open_object(&id_key, &other, &sealed, max),
                Err(OpenError::Tag)
            );
        }
    }

    #[test]
    fn pack_locate_accepts_exactly_the_indexes_that_cover_the_pack(
        lens in proptest::collection::vec(object_len(), 0..8),
        repeat in proptest::option::of(any::<prop::sample::Index>()),
        delta in prop_oneof![Just(0i64), -3i64..=3, any::<i64>()],
    ) {
        let mut entries: Vec<PackEntry> = lens
            .iter()
            .enumerate()
            .map(|(i, &len)| PackEntry { id: ObjectId([i as u8 + 1; 32]), len })
            .collect();
        if let (Some(r), false) = (repeat, entries.is_empty()) {
            let first = entries[0].id;
            let i = r.index(entries.len());
            entries[i].id = first;
        }
        let sum: u64 = entries.iter().map(|e| u64::from(e.len)).sum();
        let size = sum.wrapping_add_signed(delta);
        match pack::locate(&entries, size) {
            Ok(located) => {
                prop_assert!(covers(&entries, size));
                let mut offset = 0;
                for (l, e) in located.iter().zip(&entries) {
                    prop_assert_eq!((l.id, l.len, l.offset), (e.id, e.len, offset));
                    offset += u64::from(l.len);
                }
                prop_assert_eq!(offset, size);
            }
            Err(e) => {
                prop_assert!(!covers(&entries, size), "refused a covering index: {}", e);
                // Objects in bounds and each id once: only the size is wrong.
                if delta != 0 && size <= MAX_PACK_BYTES && objects_valid(&entries) {
                    let length = matches!(e, PackError::Length { .. });
                    prop_assert!(length, "{}", e);
                }
            }
        }
    }
}
