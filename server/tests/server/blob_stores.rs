//! One suite of [`BlobStore`] behaviour, run against every backend: the
//! data directory's, memory, `object_store`'s in-memory store through
//! [`ObjectBlobStore`], and S3 (SeaweedFS, started by the test; skipped
//! with a message when `weed` is not installed, unless
//! `BACKUP_TEST_REQUIRE_S3` is set, as `cargo xtask test` does).

use std::io::Read;
use std::sync::Arc;

use backup_test_support::SeaweedFs;
use protocol::ClientId;
use server::storage::fs::FsBlobStore;
use server::storage::memory::MemBlobStore;
use server::storage::object::{ObjectBlobStore, PART_SIZE};
use server::storage::{BlobKey, BlobStore, StorageError};

fn read_all(store: &dyn BlobStore, key: &BlobKey) -> Vec<u8> {
    let mut out = Vec::new();
    store.open(key).unwrap().read_to_end(&mut out).unwrap();
    out
}

fn read_range(store: &dyn BlobStore, key: &BlobKey, range: std::ops::Range<u64>) -> Vec<u8> {
    let mut out = Vec::new();
    store
        .open_range(key, range)
        .unwrap()
        .read_to_end(&mut out)
        .unwrap();
    out
}

fn listed(store: &dyn BlobStore) -> Vec<(BlobKey, u64)> {
    store.list().unwrap().map(Result::unwrap).collect()
}

/// `len` bytes that differ from one offset to the next.
fn content(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn put(store: &dyn BlobStore, client: ClientId, bytes: &[u8], piece: usize) -> BlobKey {
    let mut w = store.begin_write(client).unwrap();
    for chunk in bytes.chunks(piece.max(1)) {
        w.write(chunk).unwrap();
    }
    let staged = w.finish().unwrap();
    let key = staged.key().clone();
    assert_eq!(staged.publish().unwrap(), key);
    assert!(matches!(
        store.barrier(std::slice::from_ref(&key)).as_slice(),
        [Ok(())]
    ));
    key
}

/// The behaviour every store must have (see `storage/blob.rs`).
fn conformance(store: &dyn BlobStore) {
    let (a, b) = (ClientId([0xa1; 16]), ClientId([0xb2; 16]));
    assert!(listed(store).is_empty(), "a fresh store lists nothing");
    store.probe().expect("a reachable store is ready");

    // Written in pieces, read back whole and by ranges.
    let small = content(100_000, 1);
    let key = put(store, a, &small, 7_000);
    assert_eq!(read_all(store, &key), small);
    assert_eq!(read_range(store, &key, 10..20), &small[10..20]);
    assert_eq!(read_range(store, &key, 99_990..200_000), &small[99_990..]);
    assert!(read_range(store, &key, 100_000..100_010).is_empty());
    assert!(read_range(store, &key, 200_000..300_000).is_empty());

    // Empty content.
    let empty = put(store, a, b"", 1);
    assert!(read_all(store, &empty).is_empty());

    // Larger than a part: a multipart upload in an object store, fed in
    // pieces that do not line up with the parts.
    let large = content(2 * PART_SIZE + 12_345, 2);
    let big = put(store, b, &large, 1_000_003);
    assert_eq!(read_all(store, &big), large);
    let at = PART_SIZE as u64 - 5;
    assert_eq!(
        read_range(store, &big, at..at + 10),
        &large[at as usize..at as usize + 10]
    );

    // Keys are unique, never reused, and listed in strictly increasing
    // byte order with their sizes.
    let mut keys = vec![key.clone(), empty.clone(), big.clone()];
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), 3);
    let list = listed(store);
    let list_keys: Vec<BlobKey> = list.iter().map(|(k, _)| k.clone()).collect();
    assert_eq!(list_keys, keys, "listing in key order");
    for (k, size) in &list {
        let expected = if *k == key {
            small.len()
        } else if *k == big {
            large.len()
        } else {
            0
        };
        assert_eq!(*size, expected as u64, "size of {k}");
    }

    // Aborts leave nothing, before or after finish. (Whether a finished,
    // unpublished blob shows in a listing is the store's own business: an
    // object store's is complete at its key, the directory's a temporary.)
    let mut w = store.begin_write(a).unwrap();
    w.write(&content(3 * PART_SIZE / 2, 3)).unwrap();
    w.abort().unwrap();
    let mut w = store.begin_write(a).unwrap();
    w.write(b"staged").unwrap();
    let staged = w.finish().unwrap();
    let staged_key = staged.key().clone();
    assert!(!keys.contains(&staged_key), "a new write gets a new key");
    staged.abort().unwrap();
    assert!(matches!(
        store.open(&staged_key),
        Err(StorageError::NotFound { .. })
    ));
    // A writer dropped midway (a best effort) is gone after recovery.
    let mut w = store.begin_write(b).unwrap();
    w.write(&content(PART_SIZE + 1, 4)).unwrap();
    drop(w);
    store.recover().unwrap();
    assert_eq!(
        listed(store)
            .into_iter()
            .map(|(k, _)| k)
            .collect::<Vec<_>>(),
        keys
    );

    // Keys that are not the store's are refused, never resolved.
    for bad in ["../etc/passwd", "clients/x/blobs/../../y", "", "inline/00"] {
        let bad = BlobKey(bad.to_owned());
        assert!(
            matches!(store.open(&bad), Err(StorageError::BadKey(_))),
            "{bad}"
        );
        assert!(matches!(store.delete(&bad), Err(StorageError::BadKey(_))));
        assert!(store.barrier(std::slice::from_ref(&bad))[0].is_err());
    }

    // Delete is idempotent; a deleted blob is missing.
    store.delete(&key).unwrap();
    store.delete(&key).unwrap();
    assert!(matches!(
        store.open(&key),
        Err(StorageError::NotFound { .. })
    ));

    // Removing a client leaves the others.
    store.remove_client(b).unwrap();
    assert_eq!(
        listed(store)
            .into_iter()
            .map(|(k, _)| k)
            .collect::<Vec<_>>(),
        vec![empty.clone()]
    );
    store.remove_client(b).unwrap();
    store.remove_client(a).unwrap();
    assert!(listed(store).is_empty());
}

#[test]
fn the_data_directory_store_conforms() {
    let dir = tempfile::tempdir().unwrap();
    conformance(&FsBlobStore::open(dir.path()).unwrap());
}

#[test]
fn the_memory_store_conforms() {
    conformance(&MemBlobStore::new());
}

#[test]
fn the_object_store_over_memory_conforms() {
    let memory = Arc::new(object_store::memory::InMemory::new());
    conformance(&ObjectBlobStore::with_store(memory, "some/prefix", "memory".into()).unwrap());
}

#[test]
fn the_s3_store_conforms() {
    let Some(weed) = SeaweedFs::start("the_s3_store_conforms") else {
        return;
    };
    let [(_, key_id), (_, secret)] = SeaweedFs::CREDENTIALS;
    let s3 = object_store::aws::AmazonS3Builder::new()
        .with_bucket_name(weed.bucket())
        .with_region("us-east-1")
        .with_endpoint(weed.endpoint())
        .with_allow_http(true)
        .with_virtual_hosted_style_request(false)
        .with_access_key_id(key_id)
        .with_secret_access_key(secret)
        .build()
        .unwrap();
    let store = ObjectBlobStore::with_store(Arc::new(s3), "tenant", weed.endpoint()).unwrap();
    conformance(&store);
    // The same store works from inside an async runtime's worker thread.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let key = runtime.block_on(async {
        let store = store.clone();
        tokio::spawn(async move { put(&store, ClientId([7; 16]), b"from async", 3) })
            .await
            .unwrap()
    });
    assert_eq!(read_all(&store, &key), b"from async");
    drop(runtime);

    // Once the service is gone, the readiness probe says so (in bounded
    // time: a refused connection is retried until the probe's timeout).
    drop(weed);
    assert!(store.probe().is_err(), "a stopped service is not ready");
}
