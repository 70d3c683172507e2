//! Throughput and memory figures. Ignored by default; run in release:
//!
//! ```sh
//! cargo test --release -p backup-server --test server -- --ignored --nocapture perf::
//! ```
//!
//! `PERF_BYTES` overrides the upload size (default 1 GiB), `PERF_PACKET` the
//! ciphertext per packet (default 1 MiB; legacy clients use 1-8 KiB, which
//! the plan enlarges if the file would need more than 65,535 packets).

use std::time::Instant;

use bytes::BytesMut;
use futures::{SinkExt, StreamExt};
use protocol::crypto::{AesKey, CbcDecryptor, CbcEncryptor};
use protocol::session::client::{Packetizer, UploadPlan};
use protocol::{Cksum, Limits, Numbering, Request, Response};
use sha2::{Digest, Sha256};

use crate::harness::{alice_key, cpu_time_of, file, random_bytes, Binary, Client};

fn perf_bytes() -> u64 {
    std::env::var("PERF_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1 << 30)
}

fn mb_per_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / 1e6 / secs
}

/// Deterministic, non-repeating plaintext, one MiB at a time.
fn chunk(block: &[u8], index: u64, len: usize) -> Vec<u8> {
    let mut c = block[..len].to_vec();
    c[..8].copy_from_slice(&index.to_le_bytes());
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
#[ignore = "measurement: run in release with --ignored --nocapture"]
async fn measures_a_large_upload_through_the_binary() {
    let size = perf_bytes();
    // PERF_DIR puts the data elsewhere (e.g. /dev/shm to leave the disk out).
    let root = match std::env::var_os("PERF_DIR") {
        Some(dir) => tempfile::tempdir_in(dir).unwrap(),
        None => tempfile::tempdir().unwrap(),
    };
    let data = root.path().join("data");
    let server = Binary::start(&data, &[]);
    let mut c = Client::register(server.addr, "perf", &alice_key(), Numbering::Modern).await;
    let name = file("big.bin");
    let packet = std::env::var("PERF_PACKET")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1 << 20);
    let plan = UploadPlan::new(
        name.clone(),
        size,
        packet,
        Limits::default().max_packet_content,
    )
    .unwrap();
    let block = random_bytes(1 << 20, 42);

    // Encrypt first, so the timing below is the server's, not the client's.
    let t = Instant::now();
    let mut enc = CbcEncryptor::new(&c.aes);
    let mut packetizer = Packetizer::new(plan.clone(), c.id, c.numbering);
    let mut cksum = Cksum::new();
    let mut frames = Vec::with_capacity(plan.total as usize);
    let mut done = 0u64;
    let mut index = 0u64;
    while done < size {
        let len = (size - done).min(block.len() as u64) as usize;
        let plain = chunk(&block, index, len);
        cksum.update(&plain);
        enc.update(&plain, packetizer.buffer());
        while let Some(f) = packetizer.next_full() {
            frames.push(f);
        }
        done += len as u64;
        index += 1;
    }
    enc.finish(packetizer.buffer());
    frames.push(packetizer.last().unwrap());
    let client_secs = t.elapsed().as_secs_f64();
    let cksum = cksum.finish();

    let server_cpu = server.cpu_time().unwrap_or_default();
    let own_cpu = cpu_time_of("self").unwrap_or_default();
    let t = Instant::now();
    for f in frames {
        c.peer.framed.feed(f).await.unwrap();
    }
    SinkExt::<protocol::RequestFrame>::flush(&mut c.peer.framed)
        .await
        .unwrap();
    let sent = t.elapsed().as_secs_f64();
    let Some(Ok(Response::FileReceived { cksum: got, .. })) = c.peer.framed.next().await else {
        panic!("1603")
    };
    let to_1603 = t.elapsed().as_secs_f64();
    assert_eq!(got, cksum);
    c.peer
        .send(c.frame(Request::CrcOk { file: name.clone() }))
        .await;
    assert!(matches!(c.peer.recv().await, Response::Ack { .. }));
    let total = t.elapsed().as_secs_f64();
    let rss = server.peak_rss_kib().unwrap_or(0);
    let server_cpu = server
        .cpu_time()
        .unwrap_or_default()
        .saturating_sub(server_cpu)
        .as_secs_f64();
    let own_cpu = cpu_time_of("self")
        .unwrap_or_default()
        .saturating_sub(own_cpu)
        .as_secs_f64();

    println!(
        "upload of {size} bytes in {} packets of {packet} bytes",
        plan.total
    );
    println!(
        "  client-side encryption + cksum (not timed below): {:.0} MB/s",
        mb_per_s(size, client_secs)
    );
    println!("  all packets written to the socket: {sent:.2} s");
    println!(
        "  last packet -> 1603 received: {to_1603:.2} s = {:.0} MB/s",
        mb_per_s(size, to_1603)
    );
    println!(
        "  through the commit (1604): {total:.2} s = {:.0} MB/s",
        mb_per_s(size, total)
    );
    println!("  server peak RSS (VmHWM): {} MiB", rss / 1024);
    println!(
        "  server CPU time: {server_cpu:.2} s ({:.0} MB per CPU-second); sending client's CPU time: {own_cpu:.2} s",
        mb_per_s(size, server_cpu)
    );
    let line = server
        .log
        .lock()
        .unwrap()
        .iter()
        .rev()
        .find(|l| l.contains("upload committed"))
        .cloned();
    println!("  server log: {}", line.unwrap_or_default());
    let stored = std::fs::metadata(
        data.join(
            server::storage::Storage::open_local(&data)
                .unwrap()
                .meta()
                .latest(c.id, &name)
                .unwrap()
                .unwrap()
                .blob
                .0,
        ),
    )
    .unwrap()
    .len();
    assert_eq!(stored, size);
}

/// Runs `f` and returns MB per CPU-second of this thread (immune to
/// other processes taking turns on the cores) and per wall-clock second.
fn rate(bytes: usize, f: impl FnOnce()) -> (f64, f64) {
    let cpu = || cpu_time_of("thread-self").unwrap_or_default();
    let (c0, t) = (cpu(), Instant::now());
    f();
    let wall = t.elapsed().as_secs_f64();
    let used = cpu().saturating_sub(c0).as_secs_f64().max(0.01);
    (mb_per_s(bytes as u64, used), mb_per_s(bytes as u64, wall))
}

#[test]
#[ignore = "measurement: run in release with --ignored --nocapture"]
fn measures_each_server_stage() {
    let size: usize = 512 << 20;
    let key = AesKey::from_bytes([7; 32]);
    let plain = random_bytes(size, 1);
    let ct = protocol::crypto::encrypt_all(&key, &plain);
    let packet = 1 << 20;
    let mut out = BytesMut::with_capacity(packet + 16);

    let decrypt = rate(size, || {
        let mut dec = CbcDecryptor::new(&key);
        for p in ct.chunks(packet) {
            out.clear();
            dec.update(p, &mut out);
        }
    });
    let cksum = rate(size, || {
        let mut c = Cksum::new();
        for p in plain.chunks(packet) {
            c.update(p);
        }
        std::hint::black_box(c.finish());
    });
    let sha = rate(size, || {
        let mut h = Sha256::new();
        for p in plain.chunks(packet) {
            h.update(p);
        }
        std::hint::black_box(h.finalize());
    });
    let encrypt = rate(size, || {
        let mut enc = CbcEncryptor::new(&key);
        for p in plain.chunks(packet) {
            out.clear();
            enc.update(p, &mut out);
        }
    });
    println!(
        "stage throughput on {} MiB, one thread: MB per CPU-second (MB per wall second)",
        size >> 20
    );
    for (name, (cpu, wall)) in [
        ("AES-256-CBC decrypt", decrypt),
        ("cksum", cksum),
        ("SHA-256", sha),
        ("AES-256-CBC encrypt (client)", encrypt),
    ] {
        println!("  {name:<30} {cpu:>6.0} ({wall:.0})");
    }
}
