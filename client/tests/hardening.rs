//! Hardening against the real binaries (`backup-server` and
//! `backup-client` as processes): secure-mode backups of a mixed folder
//! over several connections, repeated.

mod support;

use std::time::Duration;

use support::processes::{run_client, stderr, ServerProcess};
use support::write_file;

/// The folder that showed the stall of secure-mode backups (a client
/// waiting for the answer to a request whose last TLS records it had not
/// sent): many small files and two identical large ones, four connections.
/// The deterministic reproduction is the unit test in
/// `client/src/connection.rs`; this one runs the whole flow several times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secure_backups_of_a_mixed_folder_over_four_connections_complete_every_time() {
    let server = ServerProcess::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config");
    let addr = server.addr.to_string();
    let out = run_client(
        &config,
        &["--server", &addr, "register", "--name", "mixed"],
        Duration::from_secs(60),
    )
    .await;
    assert!(out.status.success(), "register: {}", stderr(&out));

    let folder = dir.path().join("folder");
    for i in 0..200 {
        write_file(&folder.join(format!("n{i}.txt")), 2700, i);
    }
    write_file(&folder.join("big1.bin"), 16 << 20, 1000);
    write_file(&folder.join("big2.bin"), 16 << 20, 1000);
    let folder = folder.to_string_lossy().into_owned();
    for round in 0..4 {
        let out = run_client(
            &config,
            &["--timeout", "10", "--connections", "4", "backup", &folder],
            Duration::from_secs(120),
        )
        .await;
        assert!(
            out.status.success(),
            "round {round}: exit {:?}: {}",
            out.status.code(),
            stderr(&out)
        );
    }
}
