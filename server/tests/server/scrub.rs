//! `backup-server scrub` finds a flipped byte and a missing blob (in files
//! and in small files kept in the database), and passes a healthy store,
//! also beside a running server.

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

    // One byte flipped in the big file and in the newest small.txt (kept in
    // the database), the old version of small.txt gone.
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
    let mut small = rows.iter().filter(|r| r.file.as_bytes() == b"small.txt");
    let (old_small, new_small) = (small.next().unwrap(), small.next().unwrap());
    assert!(old_small.version < new_small.version);
    assert!(old_small.blob.is_inline() && new_small.blob.is_inline());
    drop(storage);
    let db = rusqlite::Connection::open(data.join(Storage::DATABASE)).unwrap();
    let gone = db
        .execute(
            "DELETE FROM inline_blobs WHERE blob = ?1",
            [&old_small.blob.0],
        )
        .unwrap();
    let flipped = db
        .execute(
            "UPDATE inline_blobs SET content = ?2 WHERE blob = ?1",
            rusqlite::params![new_small.blob.0, b"its second versioN".to_vec()],
        )
        .unwrap();
    assert_eq!((gone, flipped), (1, 1));
    drop(db);

    let (code, out, err) = admin_command("scrub", &data, &[]);
    assert_eq!(code, 1, "{out}\n{err}");
    let rotted: Vec<&str> = out.lines().filter(|l| l.starts_with("ROTTED")).collect();
    assert_eq!(rotted.len(), 2, "{out}");
    assert!(rotted[0].contains("big.bin"), "{out}");
    assert!(rotted[0].contains(&hex::encode(big.sha256)), "{out}");
    assert!(rotted[1].contains("small.txt"), "{out}");
    let missing: Vec<&str> = out.lines().filter(|l| l.starts_with("MISSING")).collect();
    assert_eq!(missing.len(), 1, "{out}");
    assert!(missing[0].contains("small.txt"), "{out}");
    assert!(out.contains("2 ok, 3 damaged"), "{out}");
    assert!(err.contains("3 stored versions are damaged"), "{err}");
}

/// A pack whose bytes rot on disk: `scrub` names it, its objects and the
/// snapshot that references them and fails; `scrub --repair` marks it, so
/// that the objects are answered missing and a re-upload heals the
/// snapshot, after which `scrub` passes.
#[test]
fn scrub_finds_a_rotted_pack_and_repair_makes_its_objects_missing_until_re_uploaded() {
    use protocol::repo::pack::Located;
    use protocol::repo::{ObjectId, ID_LEN};
    use protocol::{ClientId, UserName};
    use server::storage::repo::StageId;
    use std::time::SystemTime;

    const C: ClientId = ClientId([0xc; 16]);
    let ids = [ObjectId([1; ID_LEN]), ObjectId([2; ID_LEN])];
    let store = |storage: &Storage| {
        let mut pack = storage.begin_pack(C).unwrap();
        pack.write(&[7; 300]).unwrap();
        let objects = vec![
            Located {
                id: ids[0],
                offset: 0,
                len: 100,
            },
            Located {
                id: ids[1],
                offset: 100,
                len: 200,
            },
        ];
        storage
            .store_pack(pack, 300, objects, SystemTime::now(), None)
            .unwrap()
    };
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let (blob, snapshot) = {
        let storage = Storage::open_local(&data).unwrap();
        storage
            .meta()
            .register(C, &UserName::try_from("carol").unwrap(), SystemTime::now())
            .unwrap();
        assert_eq!(store(&storage), 2);
        let repo = storage.repo().unwrap();
        let stage = StageId::random();
        assert_eq!(repo.stage_refs(stage, C, true, &ids).unwrap(), 0);
        let snapshot = repo
            .commit_snapshot(stage, C, 1, b"m", SystemTime::now(), None)
            .unwrap()
            .unwrap();
        (repo.scrub_packs(0, 1).unwrap().remove(0).blob, snapshot)
    };
    let (code, out, err) = admin_command("scrub", &data, &[]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("1 ok, 0 damaged"), "{out}");

    let path = data.join(&blob.0);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[10] ^= 0x80;
    std::fs::write(&path, &bytes).unwrap();
    let (code, out, err) = admin_command("scrub", &data, &[]);
    assert_eq!(code, 1, "{out}\n{err}");
    let rotted: Vec<&str> = out.lines().filter(|l| l.starts_with("ROTTED")).collect();
    assert_eq!(rotted.len(), 1, "{out}");
    assert!(
        rotted[0].contains("2 objects, 300 bytes, 1 snapshots"),
        "{out}"
    );
    assert!(
        out.contains(&format!("SNAPSHOT\t{snapshot}\tclient carol ({C})")),
        "{out}"
    );
    assert!(err.contains("1 packs are damaged or missing"), "{err}");
    let storage = Storage::open_local(&data).unwrap();
    assert_eq!(storage.repo().unwrap().have(C, &ids).unwrap(), [true, true]);
    drop(storage);

    let (code, out, err) = admin_command("scrub", &data, &["--repair"]);
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(out.contains("1 marked for re-upload"), "{out}");
    let storage = Storage::open_local(&data).unwrap();
    assert_eq!(
        storage.repo().unwrap().have(C, &ids).unwrap(),
        [false, false]
    );
    assert_eq!(store(&storage), 2);
    assert_eq!(storage.repo().unwrap().have(C, &ids).unwrap(), [true, true]);
    drop(storage);

    let (code, out, err) = admin_command("scrub", &data, &[]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("1 ok, 0 damaged"), "{out}");
}
