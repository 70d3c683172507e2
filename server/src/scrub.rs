//! `backup-server scrub`: re-reads every stored version and checks it
//! against the digests recorded when it was committed.
//!
//! Each blob is streamed once, in [`CHUNK`]-byte reads, through SHA-256 and
//! the POSIX cksum (`docs/PROTOCOL.md` §5) while its bytes are counted; the
//! three results are compared with the version's row. Memory stays one
//! buffer whatever the file sizes. A scrub only reads: it may run beside a
//! serving server (a version pruned or deleted while the scrub runs is
//! skipped, not reported missing).

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::storage::{Storage, StorageError, VersionRecord};

/// Bytes read from a blob at a time.
pub const CHUNK: usize = 1024 * 1024;

/// Why a scrub could not run (a damaged file is a finding, not an error).
#[derive(Debug, thiserror::Error)]
pub enum ScrubError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("cannot write the report: {0}")]
    Output(#[from] std::io::Error),
}

/// What the scrub found for one version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Finding {
    /// Size, cksum and SHA-256 all match the row.
    Ok,
    /// The blob is there but differs from what was committed.
    Rotted {
        size: u64,
        cksum: u32,
        sha256: [u8; 32],
    },
    /// The row's blob is gone.
    Missing,
    /// The blob exists but cannot be read (permissions, I/O error).
    Unreadable(String),
}

/// The outcome of a whole scrub.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScrubReport {
    /// Versions checked (skipped ones excluded).
    pub checked: u64,
    /// Versions whose blob matched.
    pub ok: u64,
    /// Versions whose blob differs, is gone or cannot be read, with what
    /// was found.
    pub damaged: Vec<(VersionRecord, Finding)>,
    /// Versions removed while the scrub ran (pruned or deleted).
    pub skipped: u64,
    /// Bytes read.
    pub bytes: u64,
    pub elapsed: Duration,
}

impl ScrubReport {
    /// Whether every stored version matched.
    pub fn is_clean(&self) -> bool {
        self.damaged.is_empty()
    }

    /// Read rate in MB/s (10^6 bytes).
    pub fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.elapsed.as_secs_f64().max(1e-6)
    }
}

/// Checks one version's blob: streams it through SHA-256 and the cksum.
/// Returns the finding and the bytes read.
fn check(storage: &Storage, v: &VersionRecord, buf: &mut [u8]) -> (Finding, u64) {
    let mut reader = match storage.open_blob(&v.blob) {
        Ok(r) => r,
        Err(StorageError::NotFound { .. }) => return (Finding::Missing, 0),
        Err(e) => return (Finding::Unreadable(e.to_string()), 0),
    };
    let mut sha = Sha256::new();
    let mut cksum = protocol::Cksum::new();
    let mut size = 0u64;
    loop {
        match reader.read(buf) {
            Ok(0) => break,
            Ok(n) => {
                let Some(bytes) = buf.get(..n) else { break };
                sha.update(bytes);
                cksum.update(bytes);
                size += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return (Finding::Unreadable(format!("read {}: {e}", v.blob)), size),
        }
    }
    let sha256: [u8; 32] = sha.finalize().into();
    let cksum = cksum.finish();
    if size == v.size && cksum == v.cksum && sha256 == v.sha256 {
        (Finding::Ok, size)
    } else {
        (
            Finding::Rotted {
                size,
                cksum,
                sha256,
            },
            size,
        )
    }
}

/// Whether version `v` still has its row (it may have been pruned or
/// deleted since the listing).
fn still_recorded(storage: &Storage, v: &VersionRecord) -> Result<bool, StorageError> {
    Ok(storage
        .meta()
        .versions(v.client, &v.file)?
        .iter()
        .any(|r| r.blob == v.blob))
}

fn name(v: &VersionRecord) -> String {
    String::from_utf8_lossy(v.file.as_bytes()).into_owned()
}

/// Checks every stored version and writes one line per version
/// (`ok`, `ROTTED`, `MISSING` or `UNREADABLE`, then client, version, size
/// and name), then a summary with the bytes read and the rate.
///
/// # Errors
/// When the metadata cannot be read or the report cannot be written.
pub fn scrub(storage: &Storage, out: &mut impl Write) -> Result<ScrubReport, ScrubError> {
    let started = Instant::now();
    let mut report = ScrubReport::default();
    let mut buf = vec![0u8; CHUNK];
    for v in storage.meta().all_versions()? {
        let (finding, bytes) = check(storage, &v, &mut buf);
        report.bytes += bytes;
        let line = format!("{}\t{}\t{}\t{}", v.client, v.version, v.size, name(&v));
        match &finding {
            Finding::Ok => {
                writeln!(out, "ok\t{line}")?;
                report.ok += 1;
            }
            Finding::Missing | Finding::Unreadable(_) if !still_recorded(storage, &v)? => {
                report.skipped += 1;
                continue;
            }
            Finding::Rotted {
                size,
                cksum,
                sha256,
            } => {
                writeln!(
                    out,
                    "ROTTED\t{line}\tblob {}: size {size} (recorded {}), cksum {cksum} (recorded {}), sha256 {} (recorded {})",
                    v.blob,
                    v.size,
                    v.cksum,
                    hex::encode(sha256),
                    hex::encode(v.sha256)
                )?;
            }
            Finding::Missing => writeln!(out, "MISSING\t{line}\tblob {}", v.blob)?,
            Finding::Unreadable(cause) => writeln!(out, "UNREADABLE\t{line}\t{cause}")?,
        }
        report.checked += 1;
        if finding != Finding::Ok {
            report.damaged.push((v, finding));
        }
    }
    report.elapsed = started.elapsed();
    writeln!(
        out,
        "scrubbed {} versions, {} bytes in {:.3} s ({:.1} MB/s): {} ok, {} damaged{}",
        report.checked,
        report.bytes,
        report.elapsed.as_secs_f64(),
        report.mb_per_s(),
        report.ok,
        report.damaged.len(),
        if report.skipped > 0 {
            format!(", {} removed while scrubbing", report.skipped)
        } else {
            String::new()
        }
    )?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{NewVersion, Retention};
    use protocol::{ClientId, FileName, UserName};
    use std::time::SystemTime;

    fn store(storage: &Storage, client: ClientId, name: &str, content: &[u8]) -> VersionRecord {
        let mut w = storage.blobs().begin_write(client).unwrap();
        w.write(content).unwrap();
        let staged = w.finish().unwrap();
        let file = FileName::try_from(name).unwrap();
        let version = NewVersion {
            client,
            file: file.clone(),
            blob: crate::storage::BlobKey(String::new()),
            size: content.len() as u64,
            content_size: protocol::crypto::pkcs7_len(content.len() as u64),
            cksum: protocol::Cksum::of(content),
            sha256: Sha256::digest(content).into(),
            stored_at: SystemTime::now(),
        };
        storage
            .commit(staged, version, &Retention::KEEP_ALL)
            .unwrap();
        storage.meta().latest(client, &file).unwrap().unwrap()
    }

    #[test]
    fn reports_ok_rotted_and_missing_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open_local(dir.path()).unwrap();
        let id = ClientId([5; 16]);
        storage
            .meta()
            .register(id, &UserName::try_from("sam").unwrap(), SystemTime::now())
            .unwrap();
        let big: Vec<u8> = (0..3 * CHUNK + 7).map(|i| (i % 251) as u8).collect();
        store(&storage, id, "big", &big);
        let rot = store(&storage, id, "rot", b"rotting content");
        let gone = store(&storage, id, "gone", b"soon missing");
        store(&storage, id, "empty", b"");

        let mut out = Vec::new();
        let clean = scrub(&storage, &mut out).unwrap();
        assert!(clean.is_clean(), "{}", String::from_utf8_lossy(&out));
        assert_eq!(clean.ok, 4);
        assert_eq!(clean.bytes, big.len() as u64 + 15 + 12);

        let rot_path = dir.path().join(&rot.blob.0);
        let mut bytes = std::fs::read(&rot_path).unwrap();
        bytes[3] ^= 0x20;
        std::fs::write(&rot_path, &bytes).unwrap();
        std::fs::remove_file(dir.path().join(&gone.blob.0)).unwrap();

        let mut out = Vec::new();
        let report = scrub(&storage, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(!report.is_clean());
        assert_eq!(report.ok, 2);
        assert_eq!(report.checked, 4);
        let found: Vec<(&[u8], bool)> = report
            .damaged
            .iter()
            .map(|(v, f)| (v.file.as_bytes(), matches!(f, Finding::Missing)))
            .collect();
        assert_eq!(found, vec![(&b"rot"[..], false), (&b"gone"[..], true)]);
        assert!(text.contains("ROTTED\t"), "{text}");
        assert!(text.contains("MISSING\t"), "{text}");
        assert!(text.contains("2 ok, 2 damaged"), "{text}");
    }
}
