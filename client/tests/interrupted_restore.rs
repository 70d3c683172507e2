//! A client killed (SIGKILL) in the middle of a restore leaves no file at
//! the destination, only its recognisable temporary, which the next restore
//! into that folder removes while it restores the file whole.
//!
//! The restore goes through a relay that passes the server's first bytes
//! and then holds the rest back, so the kill lands mid-file every time.
//! `BACKUP_LONG_TESTS=1` kills at several points of the file.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Output;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::real_server::RealServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const MIB: usize = 1024 * 1024;

/// A relay to `upstream` that forwards the server's bytes only up to
/// `budget`, then stops reading them (both connections stay open).
/// Returns its address and the count of server bytes forwarded.
async fn stalling_relay(upstream: SocketAddr, budget: u64) -> (SocketAddr, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let forwarded = Arc::new(AtomicU64::new(0));
    let count = Arc::clone(&forwarded);
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = TcpStream::connect(upstream).await else {
                continue;
            };
            let count = Arc::clone(&count);
            tokio::spawn(async move {
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let up = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut cr, &mut sw).await;
                });
                let mut buf = vec![0u8; 64 * 1024];
                let mut sent = 0u64;
                while sent < budget {
                    let want = usize::try_from(budget - sent)
                        .unwrap_or(usize::MAX)
                        .min(buf.len());
                    let n = match sr.read(&mut buf[..want]).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if cw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    sent += n as u64;
                    count.store(sent, Ordering::SeqCst);
                }
                // Hold everything open until the client goes away.
                let _ = up.await;
                drop((sr, cw));
            });
        }
    });
    (addr, forwarded)
}

fn command(cwd: &Path, args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_backup-client"));
    cmd.arg("--config-dir")
        .arg(cwd.join("id"))
        .arg("--timeout")
        .arg("60")
        .arg("--legacy")
        .args(args)
        .current_dir(cwd)
        .env_remove("BACKUP_CLIENT_DIR")
        .env("HOME", cwd)
        .env("RUST_LOG", "off")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    cmd
}

async fn run(cwd: &Path, args: &[&str]) -> Output {
    tokio::time::timeout(Duration::from_secs(120), command(cwd, args).output())
        .await
        .expect("the client did not finish in time")
        .unwrap()
}

fn assert_success(out: &Output) {
    assert!(
        out.status.success(),
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Names in `dir`.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn is_temporary(name: &str) -> bool {
    name.starts_with(".big.bin.restore-") && name.ends_with(".part")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_killed_mid_restore_leaves_no_partial_file() {
    let server = RealServer::start().await;
    let work = tempfile::tempdir().unwrap();
    let cwd = work.path();
    let content = support::write_file(&cwd.join("big.bin"), 16 * MIB, 7);
    let addr = server.addr.to_string();
    assert_success(&run(cwd, &["register", "--server", &addr, "--name", "killed"]).await);
    assert_success(&run(cwd, &["--server", &addr, "--per-file", "backup", "big.bin"]).await);
    let dest = cwd.join("dest");
    std::fs::create_dir(&dest).unwrap();

    let budgets: &[u64] = if std::env::var_os("BACKUP_LONG_TESTS").is_some_and(|v| v == "1") {
        &[
            64 * 1024,
            MIB as u64,
            4 * MIB as u64,
            12 * MIB as u64,
            16 * MIB as u64,
        ]
    } else {
        &[4 * MIB as u64]
    };
    for &budget in budgets {
        let (relay, forwarded) = stalling_relay(server.addr, budget).await;
        let relay = relay.to_string();
        let mut child = command(
            cwd,
            &[
                "--server",
                &relay,
                "--per-file",
                "restore",
                "big.bin",
                "--to",
                "dest/",
            ],
        )
        .spawn()
        .unwrap();
        // Wait until the relay has passed its budget and the client has a
        // temporary in the destination folder.
        let mut ready = false;
        for _ in 0..600 {
            let has_part = names(&dest).iter().any(|n| is_temporary(n));
            if has_part && forwarded.load(Ordering::SeqCst) >= budget {
                ready = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(ready, "budget {budget}: the restore never got under way");
        // Give the client a moment to write what it received, then kill.
        tokio::time::sleep(Duration::from_millis(200)).await;
        child.start_kill().unwrap();
        let status = child.wait().await.unwrap();
        assert!(!status.success(), "killed, not finished: {status:?}");

        let left = names(&dest);
        assert!(
            !left.iter().any(|n| n == "big.bin"),
            "budget {budget}: a file appeared at the destination: {left:?}"
        );
        assert!(
            left.iter().all(|n| is_temporary(n)),
            "budget {budget}: only the restore's temporary may remain: {left:?}"
        );
        let partial: u64 = left
            .iter()
            .map(|n| std::fs::metadata(dest.join(n)).unwrap().len())
            .sum();
        eprintln!(
            "killed after {} of {} bytes from the server: {} bytes in the temporary, none at the destination",
            forwarded.load(Ordering::SeqCst),
            content.len(),
            partial
        );
    }

    // The next restore removes the stale temporary and restores the file.
    assert_success(
        &run(
            cwd,
            &[
                "--server",
                &addr,
                "--per-file",
                "restore",
                "big.bin",
                "--to",
                "dest/",
            ],
        )
        .await,
    );
    assert_eq!(names(&dest), vec!["big.bin".to_owned()]);
    assert!(std::fs::read(dest.join("big.bin")).unwrap() == content);
}
