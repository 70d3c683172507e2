//! The physical limits of one legacy upload on this machine, measured on
//! the same bytes: one AES-256-CBC stream on one core (CBC encryption is
//! serial: one stream cannot go faster), and writing to the data
//! directory's disk with an fsync at the end.

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::BytesMut;
use protocol::crypto::{AesKey, CbcEncryptor};

/// Bytes handled at a time.
const CHUNK: usize = 1024 * 1024;

/// Encrypts the content of `src` with AES-256-CBC, chunk by chunk, as one
/// stream; only the encryption is timed (the file is read from the page
/// cache between chunks).
///
/// # Errors
/// When `src` cannot be read.
pub fn aes_cbc(src: &Path) -> Result<(u64, Duration)> {
    let mut file = File::open(src).with_context(|| format!("opening {}", src.display()))?;
    let key = AesKey::from_bytes(rand::random());
    let mut enc = CbcEncryptor::new(&key);
    let mut plain = vec![0u8; CHUNK];
    let mut out = BytesMut::with_capacity(CHUNK + 16);
    let mut busy = Duration::ZERO;
    let mut total = 0u64;
    loop {
        let n = read_full(&mut file, &mut plain)?;
        if n == 0 {
            break;
        }
        out.clear();
        let t = Instant::now();
        enc.update(plain.get(..n).unwrap_or_default(), &mut out);
        busy += t.elapsed();
        std::hint::black_box(&out);
        total += n as u64;
    }
    out.clear();
    let t = Instant::now();
    enc.finish(&mut out);
    busy += t.elapsed();
    Ok((total, busy))
}

/// Copies `src` into a new file in `dir` in 1 MiB writes and fsyncs it:
/// the time from the first write to the end of the fsync. The copy is
/// removed afterwards.
///
/// # Errors
/// When reading or writing fails.
pub fn disk_write(src: &Path, dir: &Path) -> Result<(u64, Duration)> {
    let mut input = File::open(src).with_context(|| format!("opening {}", src.display()))?;
    let target = dir.join("disk-limit.probe");
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    let started = Instant::now();
    {
        let mut out =
            File::create(&target).with_context(|| format!("creating {}", target.display()))?;
        loop {
            let n = read_full(&mut input, &mut buf)?;
            if n == 0 {
                break;
            }
            out.write_all(buf.get(..n).unwrap_or_default())?;
            total += n as u64;
        }
        out.sync_all()?;
    }
    let took = started.elapsed();
    std::fs::remove_file(&target)?;
    Ok((total, took))
}

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
