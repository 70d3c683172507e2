//! `backup-server scrub` finds a flipped byte and a missing blob, and
//! passes a healthy store, also beside a running server.

use protocol::Numbering;
use server::storage::Storage;

use crate::harness::{admin_command, alice_key, random_bytes, Binary, Client};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrub_reports_rotted_and_missing_blobs_with_a_failing_status() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    let mut server = Binary::start(&data, &[]);
    let mut a = Client::register(server.addr, "scrub-a", &alice_key(), Numbering::Modern).await;
    let mut b = Client::register(server.addr, "scrub-b", &alice_key(), Numbering::Classic).await;
    a.store("big.bin", &random_bytes(3_000_000, 1), 262_144)
        .await;
    a.store("small.txt", b"a small file", 16).await;
    a.store("small.txt", b"its second version", 16).await;
    b.store("empty", b"", 16).await;
    b.store("other.bin", &random_bytes(70_000, 2), 65_536).await;

    // Healthy, with the server running beside it.
    let (code, out, err) = admin_command("scrub", &data, &[]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(out.lines().filter(|l| l.starts_with("ok\t")).count(), 5);
    assert!(out.contains("scrubbed 5 versions, 3070030 bytes"), "{out}");
    assert!(out.contains("5 ok, 0 damaged"), "{out}");
    drop((a, b));
    assert!(server.terminate().success());

    // One byte flipped in the big file, the old version of small.txt gone.
    let storage = Storage::open_local(&data).unwrap();
    let rows = storage.meta().all_versions().unwrap();
    let big = rows
        .iter()
        .find(|r| r.file.as_bytes() == b"big.bin")
        .unwrap();
    let path = data.join(&big.blob.0);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[1_234_567] ^= 0x04;
    std::fs::write(&path, &bytes).unwrap();
    let old_small = rows
        .iter()
        .find(|r| r.file.as_bytes() == b"small.txt")
        .unwrap();
    std::fs::remove_file(data.join(&old_small.blob.0)).unwrap();
    drop(storage);

    let (code, out, err) = admin_command("scrub", &data, &[]);
    assert_eq!(code, 1, "{out}\n{err}");
    let rotted: Vec<&str> = out.lines().filter(|l| l.starts_with("ROTTED")).collect();
    assert_eq!(rotted.len(), 1, "{out}");
    assert!(rotted[0].contains("big.bin"), "{out}");
    assert!(rotted[0].contains(&hex::encode(big.sha256)), "{out}");
    let missing: Vec<&str> = out.lines().filter(|l| l.starts_with("MISSING")).collect();
    assert_eq!(missing.len(), 1, "{out}");
    assert!(missing[0].contains("small.txt"), "{out}");
    assert!(out.contains("3 ok, 2 damaged"), "{out}");
    assert!(err.contains("2 stored versions are damaged"), "{err}");
}
