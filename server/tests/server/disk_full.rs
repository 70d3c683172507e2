//! A full disk, two ways: a data directory on an 8 MiB tmpfs (ENOSPC; needs
//! root to mount, skipped with a reason otherwise), and the binary under
//! `prlimit --fsize` (RLIMIT_FSIZE: EFBIG, and SIGXFSZ, which the server
//! must survive; skipped when util-linux `prlimit` is missing). Either way
//! an upload that cannot fit is answered 1607, the previous version stays
//! intact, and the server goes on serving.

use std::path::Path;
use std::time::Duration;

use bytes::BytesMut;
use protocol::{ClientCodec, Numbering, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::codec::{Decoder, Encoder};

use crate::harness::{
    admin_command, alice_key, assert_metadata_matches_disk, assert_only_database_and_blobs, file,
    find_program, packets, random_bytes, stored, temp_files, Binary, Client, Launch,
};

/// Sends every packet of `content` while reading what the server answers
/// (it may stop reading and close before the last packet); returns the
/// answers.
async fn upload_that_fails(c: Client, name: &str, content: &[u8]) -> Vec<Response> {
    let frames = packets(c.id, c.numbering, &c.aes, &file(name), content, 256 * 1024);
    let (mut read, mut write) = c.peer.framed.into_inner().into_split();
    let writer = tokio::spawn(async move {
        let mut codec = ClientCodec::default();
        for f in frames {
            let mut buf = BytesMut::new();
            codec.encode(f, &mut buf).unwrap();
            if write.write_all(&buf).await.is_err() {
                break;
            }
        }
        write
    });
    let mut got = Vec::new();
    let read_all = tokio::time::timeout(Duration::from_secs(60), read.read_to_end(&mut got)).await;
    assert!(read_all.is_ok(), "the server neither answered nor closed");
    writer.abort();
    let mut codec = ClientCodec::default();
    let mut buf = BytesMut::from(&got[..]);
    let mut answers = Vec::new();
    while let Ok(Some(r)) = codec.decode(&mut buf) {
        answers.push(r);
    }
    answers
}

/// Stores version 1 of a file, fails to store a version 2 of `too_big`
/// bytes, and checks the outcome. `data` is the server's data directory.
async fn fails_cleanly(mut server: Binary, data: &Path, too_big: usize, cause: &str) {
    let mut c = Client::register(server.addr, "filler", &alice_key(), Numbering::Modern).await;
    let v1 = random_bytes(100_000, 1);
    c.store("doc.bin", &v1, 65_536).await;
    let id = c.id;
    let local = c.peer.local_addr();

    let answers = upload_that_fails(c, "doc.bin", &random_bytes(too_big, 2)).await;
    assert_eq!(
        answers,
        vec![Response::GeneralError],
        "1607, then the close"
    );
    assert!(
        server.logged_for(local, cause),
        "no log of {cause:?}; log:\n{}",
        server.log_lines("").join("\n")
    );
    assert!(server.is_running(), "the server survived the failed write");
    assert_eq!(
        stored(data, id, &file("doc.bin")).as_ref(),
        Some(&v1),
        "version 1 intact"
    );
    for _ in 0..100 {
        if temp_files(data).is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(temp_files(data).is_empty(), "the failed upload was removed");

    // Still serving: the same client comes back and stores what fits.
    let mut again = Client::reconnect(server.addr, id, "filler", &alice_key(), Numbering::Modern)
        .await
        .expect("reconnect after the failure");
    let small = random_bytes(50_000, 3);
    again.store("small.bin", &small, 65_536).await;
    drop(again);
    let status = server.terminate();
    assert!(status.success(), "{status:?}");
    assert_eq!(stored(data, id, &file("small.bin")), Some(small));
    assert_only_database_and_blobs(data);
    assert_metadata_matches_disk(data);
    let (code, out, err) = admin_command("scrub", data, &[]);
    assert_eq!(code, 0, "{out}\n{err}");
}

/// Unmounts on drop.
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_1607_and_keeps_the_previous_version_when_the_disk_is_full() {
    let root = tempfile::tempdir().unwrap();
    let mount = root.path().join("small");
    std::fs::create_dir(&mount).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs"])
        .arg(&mount)
        .stderr(std::process::Stdio::piped())
        .output();
    let _guard = match mounted {
        Ok(out) if out.status.success() => Mounted(mount.clone()),
        Ok(out) => {
            eprintln!(
                "SKIPPED: cannot mount an 8 MiB tmpfs (needs root): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return;
        }
        Err(e) => {
            eprintln!("SKIPPED: cannot run mount: {e}");
            return;
        }
    };
    let data = mount.join("data");
    let server = Binary::start(&data, &[]);
    fails_cleanly(server, &data, 16 * 1024 * 1024, "No space left on device").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_1607_and_keeps_running_past_the_file_size_limit() {
    if find_program("prlimit").is_none() {
        eprintln!("SKIPPED: util-linux prlimit is not installed");
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    let server = Binary::start_with(&data, &[], Launch::FileSizeLimit(4 * 1024 * 1024));
    fails_cleanly(server, &data, 8 * 1024 * 1024, "File too large").await;
}
