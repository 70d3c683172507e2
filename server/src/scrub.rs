//! `backup-server scrub`: re-reads every stored version and checks it
//! against the digests recorded when it was committed, then every
//! repository pack against the length and SHA-256 recorded at upload
//! ([`scrub_packs`]).
//!
//! Each blob is streamed once, in [`CHUNK`]-byte reads, through SHA-256 and
//! the POSIX cksum (`docs/PROTOCOL.md` §5) while its bytes are counted; the
//! three results are compared with the version's row. Memory stays one
//! buffer whatever the file sizes. A scrub only reads: it may run beside a
//! serving server (a version pruned or deleted while the scrub runs is
//! skipped, not reported missing).

use std::io::{Read, Write};
use std::time::{Duration, Instant, SystemTime};

use sha2::{Digest, Sha256};

use crate::storage::repo::{PackDamage, RecordedPack};
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
        /// The POSIX cksum found (0 for a pack, which records none).
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

/// Packs listed from the repository at a time.
const PACK_PAGE: usize = 256;

/// What a pack scrub found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PackScrubReport {
    /// Packs checked (skipped ones excluded).
    pub checked: u64,
    /// Packs whose bytes matched.
    pub ok: u64,
    /// Damaged, missing or unreadable packs, each with what was found and
    /// what it takes with it.
    pub damaged: Vec<(RecordedPack, Finding, PackDamage)>,
    /// Packs marked damaged by this scrub (`--repair`).
    pub repaired: u64,
    /// Packs removed while the scrub ran, or marked damaged earlier and
    /// since emptied by re-uploads (prune removes them).
    pub skipped: u64,
    /// Bytes read.
    pub bytes: u64,
    pub elapsed: Duration,
}

impl PackScrubReport {
    /// Whether every pack matched.
    pub fn is_clean(&self) -> bool {
        self.damaged.is_empty()
    }
}

/// Checks one pack's blob: its length and SHA-256.
fn check_pack(storage: &Storage, p: &RecordedPack, buf: &mut [u8]) -> (Finding, u64) {
    let mut reader = match storage.open_blob(&p.blob) {
        Ok(r) => r,
        Err(StorageError::NotFound { .. }) => return (Finding::Missing, 0),
        Err(e) => return (Finding::Unreadable(e.to_string()), 0),
    };
    let mut sha = Sha256::new();
    let mut size = 0u64;
    loop {
        match reader.read(buf) {
            Ok(0) => break,
            Ok(n) => {
                let Some(bytes) = buf.get(..n) else { break };
                sha.update(bytes);
                size += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return (Finding::Unreadable(format!("read {}: {e}", p.blob)), size),
        }
    }
    let sha256: [u8; 32] = sha.finalize().into();
    if size == p.size && sha256 == p.sha256 {
        (Finding::Ok, size)
    } else {
        (
            Finding::Rotted {
                size,
                cksum: 0,
                sha256,
            },
            size,
        )
    }
}

/// Checks every repository pack against the length and SHA-256 recorded
/// at upload (`docs/PROTOCOL.md` §13.4); no key is needed, the server only
/// compares ciphertext. Writes one line per pack (`ok`, `ROTTED`,
/// `MISSING` or `UNREADABLE`, then client, pack row, size and blob); a
/// damaged pack's line is followed by one `SNAPSHOT` line per snapshot that
/// references one of its objects (snapshot id, client name and id). With
/// `repair`, each damaged pack is marked so that its objects are answered
/// missing and a re-upload heals its snapshots (`docs/RELIABILITY.md`).
/// A storage without a repository has no packs and scrubs clean.
///
/// # Errors
/// When the metadata cannot be read or changed, or the report cannot be
/// written.
pub fn scrub_packs(
    storage: &Storage,
    repair: bool,
    out: &mut impl Write,
) -> Result<PackScrubReport, ScrubError> {
    let started = Instant::now();
    let mut report = PackScrubReport::default();
    let Ok(repo) = storage.repo() else {
        return Ok(report);
    };
    let mut buf = vec![0u8; CHUNK];
    let mut after = 0;
    loop {
        let page = repo.scrub_packs(after, PACK_PAGE)?;
        let Some(last) = page.last() else { break };
        after = last.id;
        for p in page {
            let (finding, bytes) = check_pack(storage, &p, &mut buf);
            report.bytes += bytes;
            let line = format!("{}\tpack {}\t{}\t{}", p.client, p.id, p.size, p.blob);
            if finding == Finding::Ok && !p.damaged {
                writeln!(out, "ok\t{line}")?;
                report.ok += 1;
                report.checked += 1;
                continue;
            }
            // Gone since the listing, or marked earlier and emptied since.
            let damage = match repo.pack_damage(p.id)? {
                Some(d) if !(p.damaged && d.objects == 0) => d,
                _ => {
                    report.skipped += 1;
                    continue;
                }
            };
            report.checked += 1;
            let what = format!(
                "{} objects, {} bytes, {} snapshots{}",
                damage.objects,
                damage.object_bytes,
                damage.snapshots.len(),
                if p.damaged {
                    " (marked, awaiting re-upload)"
                } else {
                    ""
                }
            );
            match &finding {
                Finding::Ok => writeln!(out, "DAMAGED\t{line}\t{what}")?,
                Finding::Rotted { size, sha256, .. } => writeln!(
                    out,
                    "ROTTED\t{line}\t{what}\tsize {size} (recorded {}), sha256 {} (recorded {})",
                    p.size,
                    hex::encode(sha256),
                    hex::encode(p.sha256)
                )?,
                Finding::Missing => writeln!(out, "MISSING\t{line}\t{what}")?,
                Finding::Unreadable(cause) => writeln!(out, "UNREADABLE\t{line}\t{what}\t{cause}")?,
            }
            for s in &damage.snapshots {
                writeln!(
                    out,
                    "SNAPSHOT\t{}\tclient {} ({})\tdamaged by pack {}",
                    s.id, s.client_name, s.client, p.id
                )?;
            }
            if repair && repo.mark_damaged(p.id, SystemTime::now())? {
                report.repaired += 1;
                writeln!(
                    out,
                    "REPAIRED\tpack {}\tits {} objects are now missing; the client's next backup uploads them again",
                    p.id, damage.objects
                )?;
            }
            report.damaged.push((p, finding, damage));
        }
    }
    report.elapsed = started.elapsed();
    writeln!(
        out,
        "scrubbed {} packs, {} bytes in {:.3} s: {} ok, {} damaged{}{}",
        report.checked,
        report.bytes,
        report.elapsed.as_secs_f64(),
        report.ok,
        report.damaged.len(),
        if report.repaired > 0 {
            format!(", {} marked for re-upload", report.repaired)
        } else {
            String::new()
        },
        if report.skipped > 0 {
            format!(
                ", {} removed while scrubbing or emptied by re-uploads",
                report.skipped
            )
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

    mod packs {
        use super::super::*;
        use crate::storage::repo::StageId;
        use protocol::repo::pack::Located;
        use protocol::repo::{ObjectId, ID_LEN};
        use protocol::{ClientId, UserName};
        use std::io::Read;
        use std::time::SystemTime;

        const A: ClientId = ClientId([0xa; 16]);

        fn id(n: u8) -> ObjectId {
            ObjectId([n; ID_LEN])
        }

        /// Stores a pack of objects `ids`, each 100 bytes of its own id
        /// byte; returns how many were new.
        fn store(storage: &Storage, ids: &[u8]) -> u32 {
            let mut pack = storage.begin_pack(A).unwrap();
            let mut objects = Vec::new();
            for (i, n) in ids.iter().enumerate() {
                pack.write(&[*n; 100]).unwrap();
                objects.push(Located {
                    id: id(*n),
                    offset: 100 * i as u64,
                    len: 100,
                });
            }
            storage
                .store_pack(
                    pack,
                    100 * ids.len() as u64,
                    objects,
                    SystemTime::now(),
                    None,
                )
                .unwrap()
        }

        fn have(storage: &Storage, ids: &[u8]) -> Vec<bool> {
            let ids: Vec<ObjectId> = ids.iter().map(|n| id(*n)).collect();
            storage.repo().unwrap().have(A, &ids).unwrap()
        }

        fn read(storage: &Storage, n: u8) -> Option<Vec<u8>> {
            let place = storage
                .repo()
                .unwrap()
                .locate(A, &[id(n)])
                .unwrap()
                .pop()??;
            let mut bytes = Vec::new();
            storage
                .open_object(&place)
                .unwrap()
                .read_to_end(&mut bytes)
                .unwrap();
            Some(bytes)
        }

        fn scrub(storage: &Storage, repair: bool) -> (PackScrubReport, String) {
            let mut out = Vec::new();
            let report = scrub_packs(storage, repair, &mut out).unwrap();
            (report, String::from_utf8(out).unwrap())
        }

        #[test]
        fn finds_a_damaged_pack_names_its_snapshot_and_a_re_upload_after_repair_heals_it() {
            let dir = tempfile::tempdir().unwrap();
            let storage = Storage::open_local(dir.path()).unwrap();
            storage
                .meta()
                .register(A, &UserName::try_from("sam").unwrap(), SystemTime::now())
                .unwrap();
            assert_eq!(store(&storage, &[1, 2]), 2);
            assert_eq!(store(&storage, &[3]), 1);
            let repo = storage.repo().unwrap();
            let stage = StageId::random();
            assert_eq!(repo.stage_refs(stage, A, true, &[id(1), id(3)]).unwrap(), 0);
            let snapshot = repo
                .commit_snapshot(stage, A, 1, b"m", SystemTime::now(), None)
                .unwrap()
                .unwrap();

            let (clean, text) = scrub(&storage, false);
            assert!(clean.is_clean(), "{text}");
            assert_eq!((clean.ok, clean.bytes), (2, 300));

            // One bit of the first pack flips on disk.
            let first = repo.scrub_packs(0, 10).unwrap().remove(0);
            let path = dir.path().join(&first.blob.0);
            let mut bytes = std::fs::read(&path).unwrap();
            bytes[150] ^= 0x01;
            std::fs::write(&path, &bytes).unwrap();

            let (report, text) = scrub(&storage, false);
            assert_eq!((report.ok, report.damaged.len()), (1, 1), "{text}");
            let (pack, finding, damage) = &report.damaged[0];
            assert_eq!(pack.id, first.id);
            assert!(matches!(finding, Finding::Rotted { size: 200, .. }));
            assert_eq!((damage.objects, damage.object_bytes), (2, 200));
            assert_eq!(damage.snapshots.len(), 1);
            assert_eq!(damage.snapshots[0].id, snapshot);
            assert_eq!(damage.snapshots[0].client_name, "sam");
            assert!(
                text.contains(&format!("SNAPSHOT\t{snapshot}\tclient sam ({A})")),
                "{text}"
            );
            assert_eq!(report.repaired, 0);
            // Without --repair nothing changes.
            assert_eq!(have(&storage, &[1, 2, 3]), vec![true, true, true]);

            let (repaired, text) = scrub(&storage, true);
            assert_eq!(
                (repaired.damaged.len(), repaired.repaired),
                (1, 1),
                "{text}"
            );
            assert!(text.contains("REPAIRED\tpack"), "{text}");
            // The damaged pack's objects are missing to "have", to a
            // restore and to a new snapshot; the sound pack's are not.
            assert_eq!(have(&storage, &[1, 2, 3]), vec![false, false, true]);
            assert_eq!(read(&storage, 1), None);
            assert_eq!(read(&storage, 3), Some(vec![3; 100]));
            let stage = StageId::random();
            assert_eq!(repo.stage_refs(stage, A, true, &[id(1), id(3)]).unwrap(), 1);
            repo.drop_stage(stage).unwrap();
            // Until the objects come back, the scrub still reports the
            // damage (and fails), without marking the pack twice.
            let (again, text) = scrub(&storage, true);
            assert_eq!((again.damaged.len(), again.repaired), (1, 0), "{text}");
            assert!(text.contains("(marked, awaiting re-upload)"), "{text}");
            assert!(text.contains(&format!("SNAPSHOT\t{snapshot}\t")), "{text}");

            // The next backup uploads the missing objects again: they count
            // as new, and the old snapshot is whole again under its
            // references.
            assert_eq!(store(&storage, &[1, 2]), 2);
            assert_eq!(have(&storage, &[1, 2, 3]), vec![true, true, true]);
            assert_eq!(read(&storage, 1), Some(vec![1; 100]));
            assert_eq!(read(&storage, 2), Some(vec![2; 100]));
            // The snapshot's references now lead into the new pack.
            let new_pack = repo.scrub_packs(0, 10).unwrap().pop().unwrap();
            let moved = repo.pack_damage(new_pack.id).unwrap().unwrap();
            assert_eq!(moved.objects, 2);
            assert_eq!(moved.snapshots.len(), 1);
            assert_eq!(moved.snapshots[0].id, snapshot);
            let (healed, text) = scrub(&storage, false);
            assert!(healed.is_clean(), "{text}");
            assert_eq!((healed.ok, healed.skipped), (2, 1), "{text}");
            // The emptied damaged pack goes at the next prune.
            assert_eq!(repo.drop_empty_packs(SystemTime::now()).unwrap(), (1, 200));
        }
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
