//! The real server with its blobs in S3 (SeaweedFS, started here): a
//! legacy upload and a snapshot backup both land in the bucket, not in the
//! data directory, and restore byte for byte. Skipped with a message when
//! `weed` is not installed, unless `BACKUP_TEST_REQUIRE_S3` is set (as
//! `cargo xtask test` does).

mod support;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use backup_test_support::SeaweedFs;
use support::processes::{run_client, server_binary, stderr, ServerProcess};
use support::write_file;

const LIMIT: Duration = Duration::from_secs(120);

fn assert_success(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        stderr(out)
    );
}

/// The client on the legacy listener, working in `cwd`.
async fn legacy(server: &ServerProcess, cwd: &Path, args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_backup-client"));
    cmd.arg("--config-dir")
        .arg(cwd.join("ids"))
        .arg("--server")
        .arg(server.legacy_addr.to_string())
        .arg("--legacy")
        .args(args)
        .current_dir(cwd)
        .env_remove("BACKUP_CLIENT_DIR")
        .env("HOME", cwd)
        .env("RUST_LOG", "off")
        .kill_on_drop(true);
    tokio::time::timeout(LIMIT, cmd.output())
        .await
        .expect("the client did not finish in time")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_uploads_and_snapshots_live_in_the_bucket_and_restore() {
    let Some(weed) =
        SeaweedFs::start("legacy_uploads_and_snapshots_live_in_the_bucket_and_restore")
    else {
        return;
    };
    let store = format!("s3://{}/e2e", weed.bucket());
    let endpoint = weed.endpoint();
    let server = ServerProcess::start_with_env(
        &["--blob-store", &store, "--s3-endpoint", &endpoint],
        "debug",
        &SeaweedFs::CREDENTIALS,
    );
    let dir = tempfile::tempdir().unwrap();

    // Legacy: a file kept as a blob and a small one kept inline.
    let large = write_file(&dir.path().join("src/large.bin"), 300_000, 1);
    let small = write_file(&dir.path().join("src/small.txt"), 2_000, 2);
    let out = legacy(&server, dir.path(), &["register", "--name", "old"]).await;
    assert_success("legacy register", &out);
    let out = legacy(&server, dir.path(), &["backup", "src"]).await;
    assert_success("legacy backup", &out);
    let legacy_keys = weed.keys("e2e/clients/");
    assert_eq!(
        legacy_keys.len(),
        1,
        "one blob for the large file: {legacy_keys:?}"
    );
    for (name, content) in [("large.bin", &large), ("small.txt", &small)] {
        let to = format!("back-{name}");
        let out = legacy(&server, dir.path(), &["restore", name, "--to", &to]).await;
        assert_success("legacy restore", &out);
        assert_eq!(&std::fs::read(dir.path().join(&to)).unwrap(), content);
    }

    // Secure mode: a snapshot whose packs go to the bucket.
    let config = dir.path().join("config");
    let addr = server.addr.to_string();
    let out = run_client(
        &config,
        &["--server", &addr, "register", "--name", "snap"],
        LIMIT,
    )
    .await;
    assert_success("register", &out);
    let folder = dir.path().join("folder");
    let big = write_file(&folder.join("big.bin"), 9 << 20, 3);
    let mid = write_file(&folder.join("sub/mid.bin"), 700_000, 4);
    let folder_arg = folder.to_string_lossy().into_owned();
    let out = run_client(&config, &["--server", &addr, "backup", &folder_arg], LIMIT).await;
    assert_success("backup", &out);
    let keys = weed.keys("e2e/clients/");
    assert!(
        keys.len() > legacy_keys.len(),
        "the snapshot's packs are in the bucket: {keys:?}"
    );
    let restored = dir.path().join("restored");
    let out = run_client(
        &config,
        &[
            "--server",
            &addr,
            "restore",
            "latest",
            "--to",
            &restored.to_string_lossy(),
        ],
        LIMIT,
    )
    .await;
    assert_success("restore", &out);
    assert_eq!(std::fs::read(restored.join("folder/big.bin")).unwrap(), big);
    assert_eq!(
        std::fs::read(restored.join("folder/sub/mid.bin")).unwrap(),
        mid
    );

    // Nothing of the content is in the data directory, and the
    // credentials are not in the log.
    let data = server.data.path().join("data");
    assert!(data.join("backup.db").is_file());
    assert!(!data.join("clients").exists(), "no local blob folder");
    let log = server.log();
    for (_, value) in SeaweedFs::CREDENTIALS {
        assert!(!log.contains(value), "a credential in the log");
    }

    // Restarting recovers against the bucket: nothing is taken for an
    // orphan, everything still restores.
    let mut server = server;
    server.kill_and_restart();
    assert_eq!(weed.keys("e2e/clients/"), keys);
    let again = dir.path().join("again");
    let out = run_client(
        &config,
        &[
            "--server",
            &addr,
            "restore",
            "latest",
            "--to",
            &again.to_string_lossy(),
        ],
        LIMIT,
    )
    .await;
    assert_success("restore after a restart", &out);
    assert_eq!(std::fs::read(again.join("folder/big.bin")).unwrap(), big);

    // The data directory refuses to be opened with another blob store
    // (here the default, local), which would take every row for lost.
    let out = std::process::Command::new(server_binary())
        .args(["clients", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "opened with the wrong store: {stderr}"
    );
    assert!(
        stderr.contains(&format!("refers to blobs in {store}")) && stderr.contains("given local"),
        "{stderr}"
    );
    assert_eq!(weed.keys("e2e/clients/"), keys, "nothing touched");
}
