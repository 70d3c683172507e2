//! Retrieval (list, restore, delete) against a fake server that answers
//! from canned versions: paging, multi-packet and empty files, a wrong cksum,
//! overwriting, hostile names, append-only, and legacy servers. The real
//! binary is run where exit codes and messages matter.

mod support;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use client::identity::IdentityStore;
use client::settings::Options;
use client::Client;
use protocol::{FileName, UserName};
use support::fake_server::{FakeServer, Quirks, Stored};
use support::{pattern, STEP};

fn client(server: &str, identity_dir: &Path) -> Client {
    let mut options = Options::new(server);
    options.legacy = true;
    options.timeout = STEP;
    Client::new(options, IdentityStore::new(identity_dir))
}

/// A fake server holding `stored`, and an identity registered with it.
async fn setup(
    stored: Option<Stored>,
    close_on_retrieval: bool,
) -> (FakeServer, tempfile::TempDir) {
    let server = FakeServer::start(Quirks {
        retrieval: stored,
        close_on_retrieval,
        ..Quirks::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    client(&server.server(), &dir.path().join("id"))
        .register(UserName::try_from("rita").unwrap(), false)
        .await
        .unwrap();
    (server, dir)
}

/// Runs the real binary in `cwd` with the identity in `ids`.
async fn run(server: &FakeServer, cwd: &Path, ids: &Path, args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_backup-client"));
    cmd.arg("--config-dir")
        .arg(ids)
        .arg("--server")
        .arg(server.server())
        .arg("--timeout")
        .arg("30")
        .arg("--legacy")
        .args(args)
        .current_dir(cwd)
        .env_remove("BACKUP_CLIENT_DIR")
        .env("HOME", cwd)
        .env("RUST_LOG", "off")
        .kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("the client did not finish in time")
        .unwrap()
}

fn json_of(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {} / {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Every path under `root`, relative, without following links.
fn walk(root: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut todo = vec![root.to_owned()];
    while let Some(dir) = todo.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                todo.push(path);
                found.push(format!("{rel}/"));
            } else if kind.is_symlink() {
                found.push(format!("{rel}@"));
            } else {
                found.push(rel);
            }
        }
    }
    found.sort();
    found
}

fn count(codes: &[u16], code: u16) -> usize {
    codes.iter().filter(|&&c| c == code).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_more_than_one_page_of_entries() {
    let mut stored = Stored {
        page_size: 256,
        ..Stored::default()
    };
    // 300 names with 2 versions each: 600 entries, 3 pages of every
    // version and 2 of the newest.
    for round in 0..2u8 {
        for i in 0..300 {
            stored.add(&format!("f{i:03}"), vec![round; i]);
        }
    }
    let (server, dir) = setup(Some(stored), false).await;
    let c = client(&server.server(), &dir.path().join("id"));
    let all = c.list(true).await.unwrap();
    assert_eq!(all.len(), 600);
    assert_eq!(count(&server.codes(), 1240), 3);
    let names: Vec<String> = all.iter().map(|e| e.file.to_string_lossy()).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted, "ordered by name");
    let latest = c.list(false).await.unwrap();
    assert_eq!(latest.len(), 300);
    assert_eq!(count(&server.codes(), 1240), 5);
    assert!(
        latest.iter().all(|e| e.version > 300),
        "newest versions only"
    );
    let f7 = latest
        .iter()
        .find(|e| e.file.as_bytes() == b"f007")
        .unwrap();
    assert_eq!((f7.size, f7.cksum), (7, protocol::Cksum::of(&[1; 7])));

    // The binary prints the same listing as JSON.
    let out = run(
        &server,
        dir.path(),
        &dir.path().join("id"),
        &["list", "--versions", "--json"],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let v = json_of(&out);
    assert_eq!(v["files"].as_array().unwrap().len(), 600);
    assert_eq!(v["all_versions"], serde_json::json!(true));
    assert_eq!(v["files"][0]["name"], serde_json::json!("f000"));
    for key in ["version", "size", "stored_at", "cksum"] {
        assert!(v["files"][0][key].is_u64(), "{key}");
    }

    // And as a table: a header and one line per name, even with --quiet.
    let out = run(
        &server,
        dir.path(),
        &dir.path().join("id"),
        &["list", "--quiet"],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 301, "{text}");
    assert!(lines[0].contains("NAME") && lines[0].contains("CKSUM"));
    assert!(
        lines[8].ends_with(" f007") && lines[8].contains("2023-11-14 22:"),
        "{}",
        lines[8]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restores_a_multi_packet_file_and_an_empty_file() {
    let big = pattern(3 * 1024 * 1024 + 5, 1);
    let mut stored = Stored {
        packet: 64 * 1024,
        ..Stored::default()
    };
    stored
        .add("docs/big.bin", big.clone())
        .add("empty", Vec::new());
    let (server, dir) = setup(Some(stored), false).await;
    let target = dir.path().join("out");
    let report = client(&server.server(), &dir.path().join("id"))
        .restore_all(&target, false)
        .await
        .unwrap();
    assert_eq!(report.exit_code(), 0, "{:?}", report.files);
    assert_eq!(std::fs::read(target.join("docs/big.bin")).unwrap(), big);
    assert_eq!(std::fs::read(target.join("empty")).unwrap(), b"");
    assert_eq!(walk(&target), ["docs/", "docs/big.bin", "empty"]);
    assert_eq!(report.done_bytes(), big.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejects_a_restore_whose_cksum_differs_and_leaves_no_file() {
    let mut stored = Stored {
        wrong_cksum: true,
        packet: 1024,
        ..Stored::default()
    };
    stored.add("a.txt", pattern(10_000, 2));
    let (server, dir) = setup(Some(stored), false).await;
    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let out = run(
        &server,
        dir.path(),
        &dir.path().join("id"),
        &["restore", "a.txt", "--to", "out"],
    )
    .await;
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(stderr(&out).contains("checksum"), "{}", stderr(&out));
    assert!(walk(&out_dir).is_empty(), "{:?}", walk(&out_dir));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn does_not_overwrite_a_local_file_without_overwrite() {
    let mut stored = Stored::default();
    stored.add("a.txt", b"from the server".to_vec());
    let (server, dir) = setup(Some(stored), false).await;
    let ids = dir.path().join("id");
    std::fs::write(dir.path().join("a.txt"), b"mine").unwrap();
    let out = run(&server, dir.path(), &ids, &["restore", "a.txt"]).await;
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    assert!(stderr(&out).contains("--overwrite"), "{}", stderr(&out));
    assert_eq!(std::fs::read(dir.path().join("a.txt")).unwrap(), b"mine");
    assert_eq!(count(&server.codes(), 1241), 0, "nothing was asked for");

    // A stale temporary file of an interrupted run goes on the next run.
    let stale = dir.path().join(".a.txt.restore-XYZ123.part");
    std::fs::write(&stale, b"half").unwrap();
    let out = run(
        &server,
        dir.path(),
        &ids,
        &["restore", "a.txt", "--overwrite", "--json"],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        std::fs::read(dir.path().join("a.txt")).unwrap(),
        b"from the server"
    );
    assert!(!stale.exists());
    let v = json_of(&out);
    assert_eq!(v["files"][0]["status"], serde_json::json!("restored"));
    assert_eq!(v["files"][0]["version"], serde_json::json!(1));

    // --to a file path, and a version that does not exist.
    let out = run(
        &server,
        dir.path(),
        &ids,
        &["restore", "a.txt", "--to", "copy.txt"],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        std::fs::read(dir.path().join("copy.txt")).unwrap(),
        b"from the server"
    );
    let out = run(
        &server,
        dir.path(),
        &ids,
        &["restore", "a.txt", "--version", "9", "--to", "v9"],
    )
    .await;
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    assert!(!dir.path().join("v9").exists());
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_names_cannot_escape_the_restore_folder() {
    let mut stored = Stored::default();
    for name in [
        "../x",
        "/etc/passwd",
        "a/../../b",
        "C:\\x",
        "..\\..\\y",
        "link/evil",
        "ok.txt",
        "sub\\good.txt",
    ] {
        stored.add(name, format!("content of {name}").into_bytes());
    }
    let (server, dir) = setup(Some(stored), false).await;
    let top = tempfile::tempdir().unwrap();
    let target = top.path().join("restore");
    let outside = top.path().join("outside");
    std::fs::create_dir_all(&target).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, target.join("link")).unwrap();
    let out = run(
        &server,
        dir.path(),
        &dir.path().join("id"),
        &[
            "restore",
            "--all",
            "--to",
            target.to_str().unwrap(),
            "--json",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    let v = json_of(&out);
    assert_eq!(v["restored_files"], serde_json::json!(2), "{v}");
    assert_eq!(v["failed_files"], serde_json::json!(6), "{v}");
    assert_eq!(
        walk(top.path()),
        [
            "outside/",
            "restore/",
            "restore/link@",
            "restore/ok.txt",
            "restore/sub/",
            "restore/sub/good.txt"
        ]
    );
    assert_eq!(
        std::fs::read(target.join("sub/good.txt")).unwrap(),
        b"content of sub\\good.txt"
    );
    // Refused names were never asked for; the safe ones were.
    assert_eq!(count(&server.codes(), 1241), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_a_legacy_server_as_not_supporting_retrieval() {
    for close in [false, true] {
        let (server, dir) = setup(None, close).await;
        let ids = dir.path().join("id");
        for args in [
            &["list"][..],
            &["restore", "--all", "--to", "out"],
            &["restore", "x"],
            &["delete", "x"],
        ] {
            let before = server.codes().len();
            let out = run(&server, dir.path(), &ids, args).await;
            let err = stderr(&out);
            assert_eq!(out.status.code(), Some(4), "{args:?}: {err}");
            assert!(err.contains("does not support retrieval"), "{err}");
            assert!(err.contains(&server.server()), "{err}");
            // The proof of key is the first retrieval request, and the
            // only one: a legacy server refuses it.
            let retrieval: Vec<u16> = server.codes()[before..]
                .iter()
                .copied()
                .filter(|&c| (1240..=1242).contains(&c) || c == 1250)
                .collect();
            assert_eq!(retrieval, [1250], "sent once, never retried ({args:?})");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proves_its_key_once_per_connection_before_the_first_retrieval_request() {
    let mut stored = Stored {
        page_size: 100,
        ..Stored::default()
    };
    for i in 0..250 {
        stored.add(&format!("f{i:03}"), vec![1; i % 7]);
    }
    let (server, dir) = setup(Some(stored), false).await;
    let mut options = Options::new(server.server());
    options.legacy = true;
    options.timeout = STEP;
    options.connections = 3;
    let c = Client::new(options, IdentityStore::new(dir.path().join("id")));
    // One connection, three pages: one proof, right after the key exchange.
    let before = server.codes().len();
    assert_eq!(c.list(false).await.unwrap().len(), 250);
    assert_eq!(
        server.codes()[before..],
        [1027, 1250, 1240, 1240, 1240],
        "the proof comes once, before the first page"
    );
    // Several connections: each proves once, before its first request.
    let before = server.codes().len();
    let report = c.restore_all(&dir.path().join("out"), false).await.unwrap();
    assert!(report.ok(), "{:?}", report.files);
    let codes = server.codes()[before..].to_vec();
    assert!(count(&codes, 1027) >= 1);
    assert_eq!(count(&codes, 1250), count(&codes, 1027), "{codes:?}");
    assert_eq!(count(&codes, 1241), 250);
    // A plain backup never sends it.
    let before = server.codes().len();
    let path = dir.path().join("plain.txt");
    std::fs::write(&path, b"plain").unwrap();
    let report = c
        .backup(client::files::collect(&[path]).items, None)
        .await
        .unwrap();
    assert_eq!(report.exit_code(), 0);
    assert_eq!(server.codes()[before..], [1027, 1028, 1029]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_a_refused_proof_of_key_with_exit_status_4_and_retrieves_nothing() {
    let mut stored = Stored::default();
    stored.add("x", b"secret".to_vec());
    let server = FakeServer::start(Quirks {
        retrieval: Some(stored),
        refuse_proof: true,
        ..Quirks::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let ids = dir.path().join("id");
    client(&server.server(), &ids)
        .register(UserName::try_from("rita").unwrap(), false)
        .await
        .unwrap();
    for args in [
        &["list"][..],
        &["restore", "--all", "--to", "out"],
        &["restore", "x"],
        &["delete", "x"],
    ] {
        let out = run(&server, dir.path(), &ids, args).await;
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(4), "{args:?}: {err}");
        assert!(
            err.contains("refused this client's proof of its key"),
            "{args:?}: {err}"
        );
    }
    let codes = server.codes();
    assert_eq!(count(&codes, 1250), 4);
    assert!(
        !codes.iter().any(|c| (1240..=1242).contains(c)),
        "{codes:?}"
    );
    assert!(!dir.path().join("x").exists());
    assert!(!dir.path().join("out/x").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletes_unless_the_server_keeps_history_append_only() {
    let mut stored = Stored::default();
    stored
        .add("a", b"1".to_vec())
        .add("a", b"2".to_vec())
        .add("b", b"3".to_vec());
    let (server, dir) = setup(Some(stored), false).await;
    let ids = dir.path().join("id");
    let out = run(&server, dir.path(), &ids, &["delete", "a", "--json"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(json_of(&out)["deleted_versions"], serde_json::json!(2));
    let c = client(&server.server(), &ids);
    let left: Vec<String> = c
        .list(true)
        .await
        .unwrap()
        .iter()
        .map(|e| e.file.to_string_lossy())
        .collect();
    assert_eq!(left, ["b"]);
    let out = run(&server, dir.path(), &ids, &["delete", "a"]).await;
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));

    server
        .state
        .lock()
        .unwrap()
        .quirks
        .retrieval
        .as_mut()
        .unwrap()
        .append_only = true;
    let out = run(&server, dir.path(), &ids, &["delete", "b"]).await;
    assert_ne!(out.status.code(), Some(0));
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("append-only"), "{}", stderr(&out));
    let err = c
        .delete(&FileName::try_from("b").unwrap())
        .await
        .unwrap_err();
    assert!(matches!(err, client::Error::AppendOnly { .. }), "{err}");
    assert_eq!(c.list(false).await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_retrieval_for_a_client_the_server_does_not_know() {
    let server = FakeServer::start(Quirks {
        retrieval: Some(Stored::default()),
        ..Quirks::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let ids = dir.path().join("id");
    client(&server.server(), &ids)
        .register(UserName::try_from("gone").unwrap(), false)
        .await
        .unwrap();
    server.state.lock().unwrap().clients.clear();
    let me_info = std::fs::read(ids.join("me.info")).unwrap();
    let out = run(&server, dir.path(), &ids, &["list"]).await;
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("does not know client"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        std::fs::read(ids.join("me.info")).unwrap(),
        me_info,
        "no new registration"
    );
    assert_eq!(count(&server.codes(), 1025), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaves_no_partial_file_when_the_server_hangs_up_mid_restore() {
    let mut stored = Stored {
        cut_restore: true,
        packet: 64 * 1024,
        ..Stored::default()
    };
    stored.add("big.bin", pattern(300_000, 6));
    let (server, dir) = setup(Some(stored), false).await;
    let out_dir = dir.path().join("out");
    let out = run(
        &server,
        dir.path(),
        &dir.path().join("id"),
        &["restore", "--all", "--to", "out", "--json"],
    )
    .await;
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert_eq!(
        json_of(&out)["files"][0]["status"],
        serde_json::json!("failed")
    );
    assert!(walk(&out_dir).is_empty(), "{:?}", walk(&out_dir));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejects_a_restore_whose_ciphertext_was_corrupted() {
    for len in [0usize, 5000] {
        let mut stored = Stored {
            corrupt_last_block: true,
            ..Stored::default()
        };
        stored.add("c.bin", pattern(len, 7));
        let (server, dir) = setup(Some(stored), false).await;
        let report = client(&server.server(), &dir.path().join("id"))
            .restore_all(&dir.path().join("out"), false)
            .await
            .unwrap();
        assert_eq!(report.exit_code(), 5, "{len}: {:?}", report.files);
        assert!(walk(&dir.path().join("out")).is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejects_a_listing_that_does_not_end() {
    let mut stored = Stored {
        stuck_cursor: true,
        page_size: 10,
        ..Stored::default()
    };
    for i in 0..20 {
        stored.add(&format!("f{i}"), vec![1]);
    }
    let (server, dir) = setup(Some(stored), false).await;
    let err = client(&server.server(), &dir.path().join("id"))
        .list(true)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("does not end"), "{err}");
    assert_eq!(err.exit_code(), 1);
    assert!(count(&server.codes(), 1240) <= 2);
}
