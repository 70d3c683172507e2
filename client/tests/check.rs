//! `backup-client check` against the real binaries: a clean repository
//! passes with its counts, a subset reads less than `--read-data`, damage
//! to a chunk is found by `--read-data` (and, once `backup-server scrub
//! --repair` marked its pack, by the plain check), and a damaged tree or a
//! lost pack fails the plain check, each naming the snapshots and paths.

mod support;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use protocol::repo::envelope::{open_with_rsa, Unwrapped};
use protocol::repo::seal::Opener;
use protocol::repo::tree::decode_tree;
use protocol::repo::ObjectId;
use support::processes::{run_client, server_binary, stderr, ServerProcess};
use support::write_file;

const LIMIT: Duration = Duration::from_secs(180);
const NAME: &str = "checker";

/// A registered client of a fresh server, with a folder to back up.
struct Setup {
    server: ServerProcess,
    dir: tempfile::TempDir,
    config: PathBuf,
}

/// One object the server stores, located on its disk, and the names in it
/// when it is a tree.
#[derive(Debug)]
struct Stored {
    pack: PathBuf,
    offset: usize,
    len: usize,
    tree: Option<Vec<String>>,
}

impl Setup {
    async fn new() -> Self {
        let server = ServerProcess::start(&[]);
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config");
        let s = Self {
            server,
            dir,
            config,
        };
        let out = s.client(&["register", "--name", NAME]).await;
        assert!(out.status.success(), "register: {}", stderr(&out));
        s
    }

    async fn client(&self, args: &[&str]) -> Output {
        let addr = self.server.addr.to_string();
        let mut all = vec!["--server", addr.as_str()];
        all.extend_from_slice(args);
        run_client(&self.config, &all, LIMIT).await
    }

    /// Runs the client with `--json`: its output and parsed summary.
    async fn json(&self, args: &[&str]) -> (Output, serde_json::Value) {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.client(&all).await;
        let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}): {} / {}",
                String::from_utf8_lossy(&out.stdout),
                stderr(&out)
            )
        });
        (out, v)
    }

    /// `check` with `args`, asserting its exit status.
    async fn check(&self, args: &[&str], status: i32) -> (Output, serde_json::Value) {
        let mut all = vec!["check"];
        all.extend_from_slice(args);
        let (out, v) = self.json(&all).await;
        assert_eq!(
            out.status.code(),
            Some(status),
            "check {args:?}: {v}\n{}",
            stderr(&out)
        );
        assert_eq!(v["exit_code"], status, "{v}");
        (out, v)
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn data(&self) -> PathBuf {
        self.server.data.path().join("data")
    }

    /// Every object of this client on the server's disk, opened with the
    /// client's repository key (from its envelope and priv.key) to tell
    /// trees from chunks.
    fn stored(&self) -> Vec<Stored> {
        let identity = client::IdentityStore::new(&self.config)
            .load()
            .unwrap()
            .unwrap();
        let db = rusqlite::Connection::open_with_flags(
            self.data().join("backup.db"),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap();
        let envelope: Vec<u8> = db
            .query_row(
                "SELECT envelope FROM key_envelopes WHERE slot = 0 AND client = ?1",
                [&identity.client_id.0[..]],
                |r| r.get(0),
            )
            .unwrap();
        let Unwrapped::Full(master) =
            open_with_rsa(&identity.key, &envelope, &mut rand::rngs::OsRng).unwrap()
        else {
            panic!("not the full key");
        };
        let mut opener = Opener::new(master.open_key());
        let mut stmt = db
            .prepare(
                "SELECT o.oid, p.blob, o.pack_offset, o.len FROM objects o
                 JOIN packs p ON p.id = o.pack WHERE o.client = ?1",
            )
            .unwrap();
        let rows = stmt
            .query_map([&identity.client_id.0[..]], |r| {
                Ok((
                    r.get::<_, Vec<u8>>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                ))
            })
            .unwrap();
        let mut out = Vec::new();
        for row in rows {
            let (oid, blob, offset, len) = row.unwrap();
            let pack = self.data().join(blob);
            let (offset, len) = (offset as usize, len as usize);
            let bytes = std::fs::read(&pack).unwrap();
            let id = ObjectId(oid.try_into().unwrap());
            let plain = opener
                .open_object(
                    &master.id_key(),
                    &id,
                    &bytes[offset..offset + len],
                    16 << 20,
                )
                .unwrap();
            let tree = decode_tree(&plain).ok().map(|entries| {
                entries
                    .iter()
                    .map(|e| String::from_utf8_lossy(&e.name).into_owned())
                    .collect()
            });
            out.push(Stored {
                pack,
                offset,
                len,
                tree,
            });
        }
        out
    }
}

fn flip(path: &Path, at: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at] ^= 0x10;
    std::fs::write(path, &bytes).unwrap();
}

/// A folder whose first pack holds only chunks of `big.bin` (20 MiB, more
/// than a pack's 16), and whose last holds the rest with every tree.
fn make_folder(root: &Path) {
    write_file(&root.join("big.bin"), 20 << 20, 3);
    for i in 0..12 {
        write_file(
            &root.join(format!("sub/small{i}.txt")),
            200 + i * 50,
            i as u32,
        );
    }
    write_file(&root.join("top.txt"), 5000, 99);
}

/// The paths a check's JSON names, per snapshot.
fn damaged_paths(v: &serde_json::Value) -> Vec<(u64, String)> {
    v["damage"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["snapshot"].as_u64().unwrap(),
                d["path"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// The packs on the server's disk, largest first.
fn packs(stored: &[Stored]) -> Vec<PathBuf> {
    let mut packs: Vec<PathBuf> = stored.iter().map(|s| s.pack.clone()).collect();
    packs.sort();
    packs.dedup();
    packs.sort_by_key(|p| std::cmp::Reverse(std::fs::metadata(p).unwrap().len()));
    packs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_repository_checks_clean_and_a_subset_reads_less() {
    let s = Setup::new().await;
    let folder = s.path("folder");
    make_folder(&folder);
    let folder_arg = folder.to_string_lossy().into_owned();
    let out = s.client(&["backup", &folder_arg]).await;
    assert!(out.status.success(), "backup: {}", stderr(&out));
    write_file(&folder.join("sub/new.txt"), 3000, 500);
    let (out, second) = s.json(&["backup", &folder_arg]).await;
    assert!(out.status.success(), "backup: {}", stderr(&out));

    let (_, plain) = s.check(&[], 0).await;
    assert_eq!(plain["snapshots"], 2, "{plain}");
    // The two roots, the two folder trees and the two `sub` trees.
    assert_eq!(plain["trees"], 6, "{plain}");
    let objects = plain["objects"].as_u64().unwrap();
    assert!(objects > 20, "{plain}");
    assert_eq!(plain["objects_read"], 0, "{plain}");
    assert!(plain["damage"].as_array().unwrap().is_empty(), "{plain}");

    let (_, all) = s.check(&["--read-data"], 0).await;
    assert_eq!(all["objects_read"], objects, "{all}");
    let all_bytes = all["bytes_read"].as_u64().unwrap();
    assert!(all_bytes > 20 << 20, "{all}");
    let (_, hundred) = s.check(&["--read-data-subset", "100%"], 0).await;
    assert_eq!(hundred["objects_read"], all["objects_read"], "{hundred}");
    assert_eq!(hundred["bytes_read"], all["bytes_read"], "{hundred}");

    let (_, some) = s.check(&["--read-data-subset", "10%"], 0).await;
    let read = some["objects_read"].as_u64().unwrap();
    assert_eq!(read, (objects as f64 * 0.1).round() as u64, "{some}");
    assert!(some["bytes_read"].as_u64().unwrap() < all_bytes, "{some}");
    let (_, one) = s.check(&["--read-data-subset", "1/2"], 0).await;
    let (_, two) = s.check(&["--read-data-subset", "2/2"], 0).await;
    let halves = one["objects_read"].as_u64().unwrap() + two["objects_read"].as_u64().unwrap();
    assert_eq!(halves, objects, "{one} {two}");

    // One snapshot by number; one that does not exist.
    let id = second["snapshot"].to_string();
    let (_, just) = s.check(&[&id], 0).await;
    assert_eq!(just["snapshots"], 1, "{just}");
    assert_eq!(just["trees"], 3, "{just}");
    s.check(&["999"], 7).await;

    // The text summary.
    let out = s.client(&["check"]).await;
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("checked 2 snapshots"), "{text}");
    assert!(text.contains("no damage found"), "{text}");

    // A passphrase login reads; a backup-only key cannot.
    let passphrase = s.path("passphrase");
    std::fs::write(&passphrase, "a check of the passphrase\n").unwrap();
    let passphrase_arg = passphrase.to_string_lossy().into_owned();
    let out = s
        .client(&[
            "key",
            "add-passphrase",
            "--passphrase-file",
            &passphrase_arg,
        ])
        .await;
    assert!(out.status.success(), "add-passphrase: {}", stderr(&out));
    let (_, by_passphrase) = s
        .check(
            &[
                "--read-data-subset",
                "50%",
                "--passphrase",
                "--name",
                NAME,
                "--passphrase-file",
                &passphrase_arg,
            ],
            0,
        )
        .await;
    assert_eq!(by_passphrase["objects"], objects, "{by_passphrase}");
    let key = s.path("backup.key");
    let key_arg = key.to_string_lossy().into_owned();
    let out = s
        .client(&["key", "export", "--backup-only", "--out", &key_arg])
        .await;
    assert!(out.status.success(), "export: {}", stderr(&out));
    let out = s.client(&["--key-file", &key_arg, "check"]).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("backup-only key"), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_in_a_pack_is_found_by_read_data_and_after_scrub_repair_by_check() {
    let s = Setup::new().await;
    let folder = s.path("folder");
    make_folder(&folder);
    let folder_arg = folder.to_string_lossy().into_owned();
    let (out, first) = s.json(&["backup", &folder_arg]).await;
    assert!(out.status.success(), "backup: {}", stderr(&out));
    let (out, second) = s.json(&["backup", "--force-read", &folder_arg]).await;
    assert!(out.status.success(), "backup: {}", stderr(&out));
    let ids = [&first, &second].map(|v| v["snapshot"].as_u64().unwrap());

    // A byte in the middle of the largest pack, which holds only chunks.
    let stored = s.stored();
    let pack = packs(&stored).remove(0);
    let middle = std::fs::metadata(&pack).unwrap().len() as usize / 2;
    let hit = stored
        .iter()
        .find(|o| o.pack == pack && o.offset <= middle && middle < o.offset + o.len)
        .unwrap();
    assert!(hit.tree.is_none(), "the middle of the pack is a tree");
    assert!(stored.iter().all(|o| o.pack != pack || o.tree.is_none()));
    flip(&pack, middle);

    // The server's index still holds every object: the structure passes.
    let (_, plain) = s.check(&[], 0).await;
    assert_eq!(plain["missing_objects"], 0, "{plain}");

    let (out, read) = s.check(&["--read-data"], 5).await;
    assert_eq!(read["damaged_objects"], 1, "{read}");
    assert_eq!(read["damaged_snapshots"], serde_json::json!(ids), "{read}");
    assert_eq!(
        damaged_paths(&read),
        ids.map(|id| (id, "folder/big.bin".to_owned())).to_vec(),
        "{read}"
    );
    let err = stderr(&out);
    for id in ids {
        assert!(
            err.contains(&format!("snapshot {id}: folder/big.bin: 1 of its")),
            "{err}"
        );
    }
    // The other files were read and opened.
    assert_eq!(read["objects_read"], read["objects"], "{read}");

    // The operator's scrub finds the pack without keys; once it is marked,
    // "have" answers its objects missing, and the plain check fails too.
    let scrub = std::process::Command::new(server_binary())
        .args(["scrub", "--repair", "--data-dir"])
        .arg(s.data())
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert_eq!(scrub.status.code(), Some(1), "{}", stderr(&scrub));
    assert!(String::from_utf8_lossy(&scrub.stdout).contains("REPAIRED"));
    let (out, marked) = s.check(&[], 5).await;
    assert!(marked["missing_objects"].as_u64().unwrap() > 1, "{marked}");
    assert_eq!(marked["damaged_trees"], 0, "{marked}");
    assert_eq!(
        damaged_paths(&marked),
        ids.map(|id| (id, "folder/big.bin".to_owned())).to_vec(),
        "{marked}"
    );
    assert!(
        stderr(&out).contains("missing on the server"),
        "{}",
        stderr(&out)
    );
    // Only the first of two: the other is not named.
    let (_, one) = s.check(&[&ids[0].to_string()], 5).await;
    assert_eq!(
        one["damaged_snapshots"],
        serde_json::json!([ids[0]]),
        "{one}"
    );

    // The next backup uploads the chunks again and heals both snapshots.
    let out = s.client(&["backup", "--force-read", &folder_arg]).await;
    assert!(out.status.success(), "backup: {}", stderr(&out));
    s.check(&["--read-data"], 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_tree_or_a_lost_pack_fails_the_check_naming_the_paths() {
    let s = Setup::new().await;
    let folder = s.path("folder");
    make_folder(&folder);
    let folder_arg = folder.to_string_lossy().into_owned();
    let (out, first) = s.json(&["backup", &folder_arg]).await;
    assert!(out.status.success(), "backup: {}", stderr(&out));
    let id = first["snapshot"].as_u64().unwrap();
    let stored = s.stored();

    // The tree of folder/sub, damaged and then mended.
    let sub = stored
        .iter()
        .find(|o| {
            o.tree
                .as_ref()
                .is_some_and(|names| names.iter().any(|n| n == "small0.txt"))
        })
        .unwrap();
    flip(&sub.pack, sub.offset + sub.len / 2);
    let (out, v) = s.check(&[], 5).await;
    assert_eq!(v["damaged_trees"], 1, "{v}");
    assert_eq!(damaged_paths(&v), [(id, "folder/sub".to_owned())], "{v}");
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "snapshot {id}: folder/sub: its directory listing does not open"
        )),
        "{err}"
    );
    flip(&sub.pack, sub.offset + sub.len / 2);
    s.check(&[], 0).await;

    // The pack of chunks only, lost: the server's index still lists its
    // objects, so only reading them finds it; the server fails on each
    // and the check goes on over a new connection.
    let all = packs(&stored);
    assert_eq!(all.len(), 2, "{all:?}");
    let hidden = s.path("hidden-pack");
    std::fs::rename(&all[0], &hidden).unwrap();
    let (_, plain) = s.check(&[], 0).await;
    assert_eq!(plain["missing_objects"], 0, "{plain}");
    let (out, read) = s.check(&["--read-data"], 5).await;
    let failures = read["server_failures"].as_u64().unwrap();
    assert!(failures >= 4, "{read}");
    assert_eq!(read["damaged_objects"], failures, "{read}");
    assert_eq!(
        damaged_paths(&read),
        [(id, "folder/big.bin".to_owned())],
        "{read}"
    );
    assert!(stderr(&out).contains("the server failed while reading it"));
    // Every other chunk was read.
    assert_eq!(
        read["objects_read"].as_u64().unwrap() + failures,
        read["objects"].as_u64().unwrap(),
        "{read}"
    );
    std::fs::rename(&hidden, &all[0]).unwrap();

    // The pack holding the trees, lost: nothing under the root is read.
    std::fs::rename(&all[1], &hidden).unwrap();
    let (out, v) = s.check(&[], 5).await;
    assert_eq!(damaged_paths(&v), [(id, "/".to_owned())], "{v}");
    assert!(
        stderr(&out).contains("nothing in the snapshot could be checked"),
        "{}",
        stderr(&out)
    );
    std::fs::rename(&hidden, &all[1]).unwrap();
    s.check(&["--read-data"], 0).await;
}
