//! One attempt at sending one file: read, checksum, encrypt, cut into
//! packets and send, with memory bounded whatever the file size.
//!
//! Three stages run at once, joined by bounded channels:
//!
//! 1. a reader thread reads the file a packet's worth at a time into
//!    recycled buffers and feeds the plaintext to the cksum;
//! 2. an encryptor thread runs AES-CBC (serial by nature, the ceiling of one
//!    upload) and cuts the ciphertext into packets;
//! 3. the async side writes each packet to the socket.
//!
//! Each attempt reads the file once; the cksum is computed on that same pass,
//! so it always describes the bytes sent. Memory held is a few packets:
//! `READ_AHEAD` plaintext buffers and `PIPELINE_DEPTH` packets.
//!
//! A file of at most [`SMALL_FILE`] bytes skips the pipeline: one task of
//! the blocking pool reads, checksums and encrypts it whole, and the async
//! side sends the packets. For a run of small files, the hand-overs between
//! three threads would cost more than the work.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::mpsc as sync;

use protocol::crypto::{AesKey, CbcEncryptor};
use protocol::session::client::{Packetizer, UploadPlan};
use protocol::{Cksum, ClientId, Numbering, Request, RequestFrame};
use tokio::sync::mpsc;

use crate::connection::Connection;
use crate::error::{io_reason, Error};
use crate::fanout::ItemFailure;
use crate::feedback::Feedback;

/// Packets that may wait between the encryptor and the socket.
const PIPELINE_DEPTH: usize = 4;
/// Plaintext buffers in circulation between the reader and the encryptor.
const READ_AHEAD: usize = 3;

/// Files up to this size are read and encrypted in one go (see the module
/// documentation); the memory held is about twice this.
pub const SMALL_FILE: u64 = 1024 * 1024;

/// What the encryptor hands to the async side.
enum Piece {
    Packet(Box<RequestFrame>),
    /// All packets are out; the cksum of the plaintext read.
    Done(u32),
}

/// What the reader hands to the encryptor.
enum Plain {
    /// A buffer and how many of its bytes were read.
    Data(Vec<u8>, usize),
    /// End of file; the cksum of everything read.
    Done(u32),
}

/// Everything the encryptor needs.
struct Job {
    path: PathBuf,
    plan: UploadPlan,
    key: AesKey,
    client_id: ClientId,
    numbering: Numbering,
}

/// Reads into `buf` until it is full or the file ends; returns bytes read.
fn read_full(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(buf.get_mut(filled..).unwrap_or_default()) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// The reader: exactly `size` bytes of `path`, a buffer from `pool` at a
/// time. Stops quietly when the encryptor is gone.
fn read_stage(
    path: &Path,
    size: u64,
    pool: &sync::Receiver<Vec<u8>>,
    out: &sync::SyncSender<Result<Plain, Error>>,
) {
    let fail = |e: Error| {
        let _ = out.send(Err(e));
    };
    let read_err = |e: std::io::Error| Error::ReadFile {
        path: path.to_owned(),
        reason: io_reason(&e),
    };
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) => return fail(read_err(e)),
    };
    let mut cksum = Cksum::new();
    let mut remaining = size;
    while remaining > 0 {
        let Ok(mut buf) = pool.recv() else { return };
        let want = usize::try_from(remaining)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let Some(target) = buf.get_mut(..want) else {
            return fail(Error::Internal("read buffer too small".into()));
        };
        match read_full(&mut file, target) {
            Ok(got) if got == want => {}
            Ok(got) => {
                let got = size - remaining + got as u64;
                return fail(Error::FileChanged {
                    path: path.to_owned(),
                    expected: size,
                    got,
                });
            }
            Err(e) => return fail(read_err(e)),
        }
        cksum.update(target);
        remaining -= want as u64;
        if out.send(Ok(Plain::Data(buf, want))).is_err() {
            return;
        }
    }
    let _ = out.send(Ok(Plain::Done(cksum.finish())));
}

/// The encryptor: plaintext in, packets out; buffers go back to `pool`.
/// Stops quietly when the async side is gone.
fn encrypt_stage(
    job: &Job,
    input: &sync::Receiver<Result<Plain, Error>>,
    pool: &sync::SyncSender<Vec<u8>>,
    tx: &mpsc::Sender<Result<Piece, Error>>,
) -> Result<(), Error> {
    let mut encryptor = CbcEncryptor::new(&job.key);
    let mut packets = Packetizer::new(job.plan.clone(), job.client_id, job.numbering);
    let send = |frame: RequestFrame| tx.blocking_send(Ok(Piece::Packet(Box::new(frame)))).is_ok();
    loop {
        match input.recv() {
            Ok(Ok(Plain::Data(buf, len))) => {
                encryptor.update(buf.get(..len).unwrap_or_default(), packets.buffer());
                let _ = pool.send(buf);
                while let Some(frame) = packets.next_full() {
                    if !send(frame) {
                        return Ok(());
                    }
                }
            }
            Ok(Ok(Plain::Done(cksum))) => {
                encryptor.finish(packets.buffer());
                while let Some(frame) = packets.next_full() {
                    if !send(frame) {
                        return Ok(());
                    }
                }
                let last = packets.last().ok_or_else(|| {
                    Error::Internal(format!(
                        "the ciphertext of {} does not fit its plan",
                        job.path.display()
                    ))
                })?;
                if send(last) {
                    let _ = tx.blocking_send(Ok(Piece::Done(cksum)));
                }
                return Ok(());
            }
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(Error::Internal(format!(
                    "the reader of {} stopped",
                    job.path.display()
                )))
            }
        }
    }
}

/// Reads, checksums and encrypts a whole small file: its packets and the
/// cksum of its plaintext.
fn encrypt_whole(job: &Job) -> Result<(Vec<RequestFrame>, u32), Error> {
    let size = job.plan.orig_size;
    let read_err = |e: std::io::Error| Error::ReadFile {
        path: job.path.clone(),
        reason: io_reason(&e),
    };
    let mut file = File::open(&job.path).map_err(read_err)?;
    let mut plain = vec![0u8; usize::try_from(size).unwrap_or(usize::MAX)];
    let got = read_full(&mut file, &mut plain).map_err(read_err)?;
    if got as u64 != size {
        return Err(Error::FileChanged {
            path: job.path.clone(),
            expected: size,
            got: got as u64,
        });
    }
    let mut encryptor = CbcEncryptor::new(&job.key);
    let mut packets = Packetizer::new(job.plan.clone(), job.client_id, job.numbering);
    encryptor.update(&plain, packets.buffer());
    encryptor.finish(packets.buffer());
    let mut frames = Vec::new();
    while let Some(frame) = packets.next_full() {
        frames.push(frame);
    }
    let last = packets.last().ok_or_else(|| {
        Error::Internal(format!(
            "the ciphertext of {} does not fit its plan",
            job.path.display()
        ))
    })?;
    frames.push(last);
    Ok((frames, Cksum::of(&plain)))
}

/// [`send_file`] for a file of at most [`SMALL_FILE`] bytes.
async fn send_small(
    conn: &mut Connection,
    job: Job,
    feedback: &dyn Feedback,
) -> Result<u32, ItemFailure> {
    let doing = format!("sending {}", job.path.display());
    let size = job.plan.orig_size;
    let (frames, cksum) = tokio::task::spawn_blocking(move || encrypt_whole(&job))
        .await
        .map_err(|e| Error::Internal(format!("the reader stopped: {e}")))
        .and_then(|r| r)
        .map_err(|error| ItemFailure {
            error,
            // Nothing was sent.
            connection_usable: true,
        })?;
    for frame in &frames {
        conn.send(frame, &doing)
            .await
            .map_err(|error| ItemFailure {
                error,
                connection_usable: false,
            })?;
    }
    feedback.progress(size);
    Ok(cksum)
}

/// Sends every packet of one attempt at `path` and returns the cksum of the
/// plaintext sent.
///
/// # Errors
/// When the file cannot be read as planned, or the connection fails.
pub async fn send_file(
    conn: &mut Connection,
    path: &Path,
    plan: &UploadPlan,
    key: AesKey,
    client_id: ClientId,
    numbering: Numbering,
    feedback: &dyn Feedback,
) -> Result<u32, ItemFailure> {
    let job = Job {
        path: path.to_owned(),
        plan: plan.clone(),
        key,
        client_id,
        numbering,
    };
    if plan.orig_size <= SMALL_FILE {
        return send_small(conn, job, feedback).await;
    }
    let (tx, mut rx) = mpsc::channel(PIPELINE_DEPTH);
    let (plain_tx, plain_rx) = sync::sync_channel(READ_AHEAD);
    let (pool_tx, pool_rx) = sync::sync_channel(READ_AHEAD);
    let chunk = usize::try_from(plan.orig_size)
        .unwrap_or(usize::MAX)
        .min(plan.packet_size);
    for _ in 0..READ_AHEAD {
        let _ = pool_tx.send(vec![0u8; chunk]);
    }
    let size = plan.orig_size;
    let reader_path = path.to_owned();
    let reader =
        tokio::task::spawn_blocking(move || read_stage(&reader_path, size, &pool_rx, &plain_tx));
    let encryptor = tokio::task::spawn_blocking(move || {
        if let Err(e) = encrypt_stage(&job, &plain_rx, &pool_tx, &tx) {
            let _ = tx.blocking_send(Err(e));
        }
    });
    let doing = format!("sending {}", path.display());
    let mut sent_cipher = 0u64;
    let mut sent_plain = 0u64;
    let mut result = Err(ItemFailure {
        error: Error::Internal(format!("reading {} stopped early", path.display())),
        connection_usable: false,
    });
    while let Some(piece) = rx.recv().await {
        match piece {
            Ok(Piece::Packet(frame)) => {
                if let Err(error) = conn.send(&frame, &doing).await {
                    result = Err(ItemFailure {
                        error,
                        connection_usable: false,
                    });
                    break;
                }
                if let Request::SendFile(p) = &frame.request {
                    sent_cipher += p.content.len() as u64;
                }
                let plain_now = sent_cipher.min(size);
                feedback.progress(plain_now - sent_plain);
                sent_plain = plain_now;
            }
            Ok(Piece::Done(cksum)) => {
                result = Ok(cksum);
                break;
            }
            Err(error) => {
                result = Err(ItemFailure {
                    error,
                    connection_usable: sent_cipher == 0,
                });
                break;
            }
        }
    }
    // Dropping the receiver stops both threads at their next hand-over.
    drop(rx);
    if encryptor.await.is_err() || reader.await.is_err() {
        return Err(ItemFailure {
            error: Error::Internal(format!("the reader of {} failed", path.display())),
            connection_usable: false,
        });
    }
    result
}
