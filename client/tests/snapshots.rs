//! Snapshots end to end against the real binaries (`backup-server` and
//! `backup-client` as processes): `backup` in secure mode makes a snapshot
//! that restores byte for byte, sends only what the server lacks, keeps no
//! plaintext on the server, and a damaged object fails only the files that
//! use it.

mod support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use support::processes::{run_client, stderr, ServerProcess};
use support::write_file;

const LIMIT: Duration = Duration::from_secs(120);

/// A registered client of a fresh server, with a folder to back up.
struct Setup {
    server: ServerProcess,
    dir: tempfile::TempDir,
    config: PathBuf,
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
        let out = s.client(&["register", "--name", "snap"]).await;
        assert!(out.status.success(), "register: {}", stderr(&out));
        s
    }

    async fn client(&self, args: &[&str]) -> Output {
        let addr = self.server.addr.to_string();
        let mut all = vec!["--server", addr.as_str()];
        all.extend_from_slice(args);
        run_client(&self.config, &all, LIMIT).await
    }

    /// Runs the client with `--json` and returns its parsed summary.
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

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
}

fn set_mtime(path: &Path, secs: u64) {
    let f = std::fs::File::options().write(true).open(path).unwrap();
    f.set_modified(std::time::UNIX_EPOCH + Duration::from_secs(secs))
        .unwrap();
}

/// A folder with an empty file, small files, a file of several chunks, a
/// subfolder, a symbolic link and a file of mode 0640 with an old mtime.
fn make_folder(root: &Path) {
    std::fs::create_dir_all(root.join("sub/deeper")).unwrap();
    std::fs::write(root.join("empty"), b"").unwrap();
    for i in 0..20 {
        write_file(
            &root.join(format!("sub/small{i}.txt")),
            100 + i * 37,
            i as u32,
        );
    }
    write_file(&root.join("big.bin"), 9 << 20, 77);
    write_file(&root.join("sub/deeper/mid.bin"), 700_000, 78);
    std::os::unix::fs::symlink("../big.bin", root.join("sub/link")).unwrap();
    let private = root.join("sub/private.txt");
    std::fs::write(&private, b"for my eyes").unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o640)).unwrap();
    set_mtime(&private, 1_000_000_000);
}

/// Asserts that `b` holds what `a` holds: contents, modes, file mtimes and
/// link targets.
fn assert_same_tree(a: &Path, b: &Path) {
    let mut stack = vec![PathBuf::new()];
    let mut seen = 0;
    while let Some(rel) = stack.pop() {
        let (pa, pb) = (a.join(&rel), b.join(&rel));
        let (ma, mb) = (
            std::fs::symlink_metadata(&pa).unwrap(),
            std::fs::symlink_metadata(&pb)
                .unwrap_or_else(|e| panic!("{} not restored: {e}", pb.display())),
        );
        assert_eq!(ma.file_type(), mb.file_type(), "{}", rel.display());
        seen += 1;
        if ma.file_type().is_symlink() {
            assert_eq!(
                std::fs::read_link(&pa).unwrap(),
                std::fs::read_link(&pb).unwrap()
            );
            continue;
        }
        assert_eq!(
            ma.mode() & 0o777,
            mb.mode() & 0o777,
            "mode of {}",
            rel.display()
        );
        if ma.is_dir() {
            for e in std::fs::read_dir(&pa).unwrap() {
                stack.push(rel.join(e.unwrap().file_name()));
            }
            continue;
        }
        assert_eq!(ma.mtime(), mb.mtime(), "mtime of {}", rel.display());
        assert!(
            std::fs::read(&pa).unwrap() == std::fs::read(&pb).unwrap(),
            "content of {}",
            rel.display()
        );
    }
    assert!(seen > 20, "only {seen} entries compared");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_restores_byte_for_byte_and_an_unchanged_one_sends_nothing() {
    let s = Setup::new().await;
    let folder = s.path("folder");
    make_folder(&folder);
    let folder_arg = folder.to_string_lossy().into_owned();

    let (out, first) = s.json(&["backup", "--tag", "first", &folder_arg]).await;
    assert!(out.status.success(), "backup: {}", stderr(&out));
    assert_eq!(first["files"], 24, "{first}");
    assert!(first["sent_bytes"].as_u64().unwrap() > 9 << 20, "{first}");

    let (out, second) = s.json(&["backup", &folder_arg]).await;
    assert!(out.status.success(), "second backup: {}", stderr(&out));
    assert_eq!(second["new_objects"], 0, "{second}");
    assert_eq!(second["sent_bytes"], 0, "{second}");
    assert_ne!(first["snapshot"], second["snapshot"]);

    let (out, listed) = s.json(&["snapshots"]).await;
    assert!(out.status.success(), "snapshots: {}", stderr(&out));
    let snaps = listed["snapshots"].as_array().unwrap();
    assert_eq!(snaps.len(), 2, "{listed}");
    assert_eq!(snaps[0]["tags"][0], "first");
    assert_eq!(snaps[0]["files"], 24);
    assert_eq!(snaps[1]["paths"][0], folder_arg.as_str());

    let out_dir = s.path("restored");
    let first_id = first["snapshot"].to_string();
    let out = s
        .client(&["restore", &first_id, "--to", &out_dir.to_string_lossy()])
        .await;
    assert!(out.status.success(), "restore: {}", stderr(&out));
    assert_same_tree(&folder, &out_dir.join("folder"));

    // One path of the newest snapshot.
    let part = s.path("part");
    let out = s
        .client(&[
            "restore",
            "latest:folder/sub/deeper",
            "--to",
            &part.to_string_lossy(),
        ])
        .await;
    assert!(out.status.success(), "restore of a path: {}", stderr(&out));
    assert_eq!(
        std::fs::read(part.join("deeper/mid.bin")).unwrap(),
        std::fs::read(folder.join("sub/deeper/mid.bin")).unwrap()
    );
    assert!(!part.join("big.bin").exists());

    let (out, ls) = s.json(&["ls", "latest:folder/sub"]).await;
    assert!(out.status.success(), "ls: {}", stderr(&out));
    let paths: Vec<&str> = ls["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    assert!(paths.contains(&"folder/sub/link"), "{paths:?}");
    assert!(paths.contains(&"folder/sub/deeper/mid.bin"), "{paths:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_in_the_middle_of_a_large_file_sends_only_the_chunks_around_it() {
    let s = Setup::new().await;
    let folder = s.path("f");
    let big = folder.join("large.bin");
    let mut data = write_file(&big, 24 << 20, 5);
    let folder_arg = folder.to_string_lossy().into_owned();
    let (out, first) = s.json(&["backup", &folder_arg]).await;
    assert!(out.status.success(), "backup: {}", stderr(&out));

    let middle = 12 << 20;
    for b in &mut data[middle..middle + (1 << 20)] {
        *b = !*b;
    }
    std::fs::write(&big, &data).unwrap();
    let (out, second) = s.json(&["backup", &folder_arg]).await;
    assert!(out.status.success(), "backup: {}", stderr(&out));
    let sent = second["sent_bytes"].as_u64().unwrap();
    assert!(sent > 1 << 20, "the change was not sent: {second}");
    assert!(
        sent <= 9 << 20,
        "{sent} bytes sent for a 1 MiB change (first run sent {})",
        first["sent_bytes"]
    );

    // The same content under a second name is stored once.
    std::fs::copy(&big, folder.join("copy.bin")).unwrap();
    let (out, third) = s.json(&["backup", &folder_arg]).await;
    assert!(out.status.success(), "backup: {}", stderr(&out));
    assert!(third["sent_bytes"].as_u64().unwrap() < 64 << 10, "{third}");

    let ids = [&first, &second, &third].map(|v| v["snapshot"].to_string());
    let (out, d) = s.json(&["diff", &ids[0], &ids[1]]).await;
    assert!(out.status.success(), "diff: {}", stderr(&out));
    assert_eq!(
        d["changes"],
        serde_json::json!([{"what": "M", "path": "f/large.bin"}]),
        "{d}"
    );
    let (_, d) = s.json(&["diff", &ids[1]]).await;
    assert_eq!(
        d["changes"],
        serde_json::json!([{"what": "+", "path": "f/copy.bin"}]),
        "{d}"
    );

    let out_dir = s.path("out");
    let out = s
        .client(&["restore", "--to", &out_dir.to_string_lossy()])
        .await;
    assert!(out.status.success(), "restore: {}", stderr(&out));
    assert!(std::fs::read(out_dir.join("f/large.bin")).unwrap() == data);
    assert!(std::fs::read(out_dir.join("f/copy.bin")).unwrap() == data);
}

/// Every regular file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_keeps_no_plaintext_and_a_damaged_object_fails_only_its_file() {
    let s = Setup::new().await;
    let folder = s.path("secret");
    let marker = b"THE-MARKER-NO-SERVER-MAY-SEE-0123456789";
    let mut text = Vec::new();
    for i in 0..2000 {
        text.extend_from_slice(marker);
        text.extend_from_slice(format!(" line {i}\n").as_bytes());
    }
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(folder.join("notes.txt"), &text).unwrap();
    let big = write_file(&folder.join("big.bin"), 6 << 20, 9);
    let folder_arg = folder.to_string_lossy().into_owned();
    let out = s.client(&["backup", &folder_arg]).await;
    assert!(out.status.success(), "backup: {}", stderr(&out));

    let data = s.server.data.path().join("data");
    let stored = files_under(&data);
    assert!(!stored.is_empty());
    for f in &stored {
        let bytes = std::fs::read(f).unwrap();
        assert!(
            !bytes.windows(marker.len()).any(|w| w == marker),
            "plaintext in {}",
            f.display()
        );
        assert!(
            !bytes
                .windows(64)
                .any(|w| w == &big[1 << 20..(1 << 20) + 64]),
            "plaintext of big.bin in {}",
            f.display()
        );
    }

    // Damage one byte in the middle of the largest stored file (the pack):
    // big.bin's chunks lie there, notes.txt's compressed chunk at its start.
    let pack = stored
        .iter()
        .max_by_key(|f| std::fs::metadata(f).unwrap().len())
        .unwrap();
    let mut bytes = std::fs::read(pack).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x40;
    std::fs::write(pack, &bytes).unwrap();

    let out_dir = s.path("out");
    let out = s
        .client(&["restore", "--to", &out_dir.to_string_lossy()])
        .await;
    assert_eq!(out.status.code(), Some(5), "restore: {}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("big.bin"), "{err}");
    assert!(
        !out_dir.join("secret/big.bin").exists(),
        "a damaged file was written"
    );
    assert_eq!(
        std::fs::read(out_dir.join("secret/notes.txt")).unwrap(),
        text
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_never_overwrites_without_overwrite() {
    let s = Setup::new().await;
    let folder = s.path("keep");
    write_file(&folder.join("a.txt"), 1000, 1);
    let folder_arg = folder.to_string_lossy().into_owned();
    let out = s.client(&["backup", &folder_arg]).await;
    assert!(out.status.success(), "backup: {}", stderr(&out));

    let out_dir = s.path("out");
    std::fs::create_dir_all(out_dir.join("keep")).unwrap();
    std::fs::write(out_dir.join("keep/a.txt"), b"mine").unwrap();
    let to = out_dir.to_string_lossy().into_owned();
    let out = s.client(&["restore", "--to", &to]).await;
    assert_eq!(out.status.code(), Some(6), "restore: {}", stderr(&out));
    assert_eq!(std::fs::read(out_dir.join("keep/a.txt")).unwrap(), b"mine");
    let out = s.client(&["restore", "--to", &to, "--overwrite"]).await;
    assert!(
        out.status.success(),
        "restore --overwrite: {}",
        stderr(&out)
    );
    assert_eq!(
        std::fs::read(out_dir.join("keep/a.txt")).unwrap(),
        std::fs::read(folder.join("a.txt")).unwrap()
    );
    let out = s.client(&["restore", "99", "--to", &to]).await;
    assert_eq!(
        out.status.code(),
        Some(7),
        "restore of no snapshot: {}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_files_are_not_read_again_and_a_stale_cache_costs_only_reading() {
    let s = Setup::new().await;
    let folder = s.path("c");
    for i in 0..10 {
        write_file(
            &folder.join(format!("f{i}.bin")),
            50_000 + i * 1000,
            i as u32,
        );
    }
    let folder_arg = folder.to_string_lossy().into_owned();
    let (out, first) = s.json(&["backup", &folder_arg]).await;
    assert!(out.status.success(), "backup: {}", stderr(&out));
    assert_eq!(first["unchanged_files"], 0, "{first}");

    let (out, second) = s.json(&["backup", &folder_arg]).await;
    assert!(out.status.success(), "backup: {}", stderr(&out));
    assert_eq!(second["unchanged_files"], 10, "{second}");
    assert_eq!(second["sent_bytes"], 0, "{second}");

    // A touched file is read again; its content being the same, only the
    // trees that record its new mtime (its folder's and the root) are
    // sent. --force-read reads them all.
    set_mtime(&folder.join("f3.bin"), 1_500_000_000);
    let (_, third) = s.json(&["backup", &folder_arg]).await;
    assert_eq!(third["unchanged_files"], 9, "{third}");
    assert_eq!(third["new_objects"], 2, "{third}");
    assert!(third["sent_bytes"].as_u64().unwrap() < 4096, "{third}");
    let (_, forced) = s.json(&["backup", "--force-read", &folder_arg]).await;
    assert_eq!(forced["unchanged_files"], 0, "{forced}");

    // A cache that names chunks the server does not hold (as after a
    // prune): the run is made again reading every file, and the snapshot
    // restores.
    let client_id = {
        let me = std::fs::read_to_string(s.config.join("me.info")).unwrap();
        me.lines().nth(1).unwrap().trim().to_owned()
    };
    let cache_path =
        client::snapshot::cache::path_for(&s.config, &client_id, std::slice::from_ref(&folder));
    assert!(cache_path.exists(), "no cache at {}", cache_path.display());
    let mut w = client::snapshot::cache::CacheWriter::create(&cache_path).unwrap();
    for i in 0..10 {
        let p = folder.join(format!("f{i}.bin"));
        let meta = std::fs::metadata(&p).unwrap();
        let bogus = protocol::repo::ObjectId([i as u8; 32]);
        w.add(
            0,
            p.as_os_str().as_encoded_bytes(),
            &client::snapshot::cache::Stamp::of(&meta),
            &[bogus],
        )
        .unwrap();
    }
    w.commit(&cache_path).unwrap();
    let (out, healed) = s.json(&["backup", &folder_arg]).await;
    assert!(
        out.status.success(),
        "backup over a stale cache: {}",
        stderr(&out)
    );
    assert_eq!(healed["unchanged_files"], 0, "{healed}");
    let out_dir = s.path("out");
    let out = s
        .client(&["restore", "--to", &out_dir.to_string_lossy()])
        .await;
    assert!(out.status.success(), "restore: {}", stderr(&out));
    for i in 0..10 {
        let name = format!("c/f{i}.bin");
        assert!(
            std::fs::read(out_dir.join(&name)).unwrap() == std::fs::read(s.path(&name)).unwrap(),
            "{name}"
        );
    }
}

/// Bytes of the packs the server holds (every stored file but its database).
fn stored_pack_bytes(data: &Path) -> u64 {
    files_under(data)
        .iter()
        .filter(|f| {
            let name = f.file_name().unwrap().to_string_lossy();
            !name.contains(".db")
                && !name.ends_with(".tmp")
                && !name.contains("-wal")
                && !name.contains("-shm")
        })
        .map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_killed_midway_resumes_sending_at_most_what_was_missing_and_one_pack() {
    let s = Setup::new().await;
    let folder = s.path("r");
    let total: u64 = 96 << 20;
    write_file(&folder.join("large.bin"), total as usize, 11);
    let folder_arg = folder.to_string_lossy().into_owned();
    let addr = s.server.addr.to_string();

    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_backup-client"))
        .arg("--config-dir")
        .arg(&s.config)
        .args(["--server", &addr, "backup", &folder_arg])
        .env_remove("BACKUP_CLIENT_DIR")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // SIGKILL once the server has stored two packs, well before the end.
    let deadline = std::time::Instant::now() + LIMIT;
    while s.server.log().matches("pack stored").count() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "no pack stored: {}",
            s.server.log()
        );
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the backup ended ({status}) before it could be killed");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    // Let the server notice the end of the connection and drop the open pack.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let data = s.server.data.path().join("data");
    let kept = stored_pack_bytes(&data);
    assert!(kept >= 16 << 20, "only {kept} bytes kept");
    assert!(kept < total, "the whole file was stored before the kill");

    let (out, rerun) = s.json(&["backup", &folder_arg]).await;
    assert!(out.status.success(), "rerun: {}", stderr(&out));
    let sent = rerun["sent_bytes"].as_u64().unwrap();
    let missing = total + (total >> 8) - kept.min(total);
    assert!(
        sent <= missing + (16 << 20),
        "rerun sent {sent} bytes; {kept} of {total} were kept, so at most {missing} + one pack"
    );
    let out_dir = s.path("out");
    let out = s
        .client(&["restore", "--to", &out_dir.to_string_lossy()])
        .await;
    assert!(out.status.success(), "restore: {}", stderr(&out));
    assert!(
        std::fs::read(out_dir.join("r/large.bin")).unwrap()
            == std::fs::read(folder.join("large.bin")).unwrap()
    );
}

/// Copies the tree at `from` to `to`, keeping modes, file mtimes and links.
fn copy_tree(from: &Path, to: &Path) {
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(
        status.success(),
        "cp -a {} {}",
        from.display(),
        to.display()
    );
}

/// The server SIGKILLed at points spread over a snapshot run, the commit
/// included, then started again: every snapshot it lists restores
/// completely, to what was backed up in its round, and the next backup
/// works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_at_any_point_of_a_backup_lists_only_snapshots_that_restore() {
    const ROUNDS: u32 = 16;
    let mut s = Setup::new().await;
    let folder = s.path("k");
    let expected = s.path("expected");
    std::fs::create_dir_all(&expected).unwrap();
    let folder_arg = folder.to_string_lossy().into_owned();
    let addr = s.server.addr.to_string();
    let mut baseline = Duration::ZERO;
    let mut killed = 0;
    for round in 0..=ROUNDS {
        for i in 0..30 {
            write_file(
                &folder.join(format!("s/f{i}")),
                2000 + i * 10,
                round * 100 + i as u32,
            );
        }
        // As much to read and send in every round.
        write_file(&folder.join("r.bin"), 3 << 20, 1000 + round);
        copy_tree(&folder, &expected.join(format!("round-{round}")));
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_backup-client"))
            .arg("--config-dir")
            .arg(&s.config)
            .args(["--server", &addr, "--timeout", "20", "backup"])
            .args(["--tag", &format!("round-{round}"), &folder_arg])
            .env_remove("BACKUP_CLIENT_DIR")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let started = std::time::Instant::now();
        if round == 0 {
            let status = child.wait().await.unwrap();
            assert!(status.success(), "the first backup failed");
            baseline = started.elapsed();
            continue;
        }
        // From the start of the run to past its end: connecting,
        // uploading, staging and committing are each hit by some round.
        tokio::time::sleep(baseline * round * 5 / (4 * ROUNDS)).await;
        let running = child.try_wait().unwrap().is_none();
        if running {
            killed += 1;
        }
        s.server.kill_and_restart();
        let _ = tokio::time::timeout(LIMIT, child.wait()).await.unwrap();
    }
    assert!(
        killed >= 3,
        "only {killed} of {ROUNDS} runs were still going when the server was killed"
    );

    let (out, listed) = s.json(&["snapshots"]).await;
    assert!(out.status.success(), "snapshots: {}", stderr(&out));
    let listed = listed["snapshots"].as_array().unwrap().clone();
    assert!(!listed.is_empty(), "no snapshot listed");
    eprintln!(
        "{killed} of {ROUNDS} runs killed; {} snapshots listed",
        listed.len()
    );
    for snap in &listed {
        let id = snap["id"].as_u64().unwrap().to_string();
        let tag = snap["tags"][0].as_str().unwrap().to_owned();
        let to = s.path(&format!("out/{id}"));
        let out = s
            .client(&["restore", &id, "--to", &to.to_string_lossy()])
            .await;
        assert!(
            out.status.success(),
            "snapshot {id} ({tag}) does not restore: {}",
            stderr(&out)
        );
        assert_same_tree(&expected.join(&tag), &to.join("k"));
    }

    // The server keeps working: one more backup restores too.
    let (out, _) = s.json(&["backup", "--tag", "after", &folder_arg]).await;
    assert!(
        out.status.success(),
        "backup after the kills: {}",
        stderr(&out)
    );
    let to = s.path("out/after");
    let out = s.client(&["restore", "--to", &to.to_string_lossy()]).await;
    assert!(out.status.success(), "restore: {}", stderr(&out));
    assert_same_tree(&folder, &to.join("k"));
}

/// Many small and empty files restore under an open-file limit well below
/// one durability group, a crash's temporaries in the folder are cleared,
/// and nothing is left under a temporary name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_files_restore_under_a_low_open_file_limit_and_leave_no_temporaries() {
    let s = Setup::new().await;
    let folder = s.path("many");
    for i in 0..1500u32 {
        write_file(
            &folder.join(format!("d{}/f{i}", i % 3)),
            100 + i as usize,
            i,
        );
    }
    for i in 0..300 {
        std::fs::write(folder.join(format!("d0/empty{i}")), b"").unwrap();
    }
    let folder_arg = folder.to_string_lossy().into_owned();
    let out = s.client(&["backup", &folder_arg]).await;
    assert!(out.status.success(), "backup: {}", stderr(&out));

    let to = s.path("out");
    std::fs::create_dir_all(to.join("many/d1")).unwrap();
    let stale = to.join("many/d1/.f1.restore-abc123.part");
    std::fs::write(&stale, b"left by a crash").unwrap();
    let addr = s.server.addr.to_string();
    let script = format!(
        "ulimit -n 200 && exec \"$0\" --config-dir \"$1\" --server {addr} restore --to \"$2\""
    );
    let out = tokio::process::Command::new("sh")
        .args(["-c", &script])
        .arg(env!("CARGO_BIN_EXE_backup-client"))
        .arg(&s.config)
        .arg(&to)
        .env_remove("BACKUP_CLIENT_DIR")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "restore: {}", stderr(&out));
    assert!(!stale.exists(), "the stale temporary is still there");
    let mut left = Vec::new();
    let mut count = 0;
    for dir in ["d0", "d1", "d2"] {
        for e in std::fs::read_dir(to.join("many").join(dir)).unwrap() {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            count += 1;
            if name.contains(".restore-") {
                left.push(name);
            }
        }
    }
    assert!(left.is_empty(), "temporaries left: {left:?}");
    assert_eq!(count, 1800);
    let out = std::process::Command::new("diff")
        .arg("-r")
        .arg(&folder)
        .arg(to.join("many"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "restored tree differs: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}
