//! One conformance suite of [`Storage`], run through its public API against
//! every pair of backends [`Storage::open_with`] can open: blobs in the data
//! directory or in S3 (SeaweedFS), metadata in SQLite or PostgreSQL (a
//! throwaway cluster). The traits underneath have suites of their own
//! (`blob_stores`, the backends' unit tests); this one checks that the
//! pieces, wired together, keep the same promises whichever they are.
//!
//! One test per combination starts the components it needs once and runs
//! every scenario on a repository of its own (its own data directory, S3
//! prefix and PostgreSQL database). A component that is not installed
//! skips its combinations, each named on the terminal, unless
//! `BACKUP_TEST_REQUIRE_S3` / `BACKUP_TEST_REQUIRE_PG` is set (as
//! `cargo xtask test` does); the other combinations still run.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use backup_test_support::{Postgres, SeaweedFs};
use bytes::{Bytes, BytesMut};
use protocol::repo::message::SnapshotEntry;
use protocol::repo::pack::Located;
use protocol::repo::{ObjectId, ID_LEN};
use protocol::{ClientId, FileName, UserName};
use server::storage::object::S3Location;
use server::storage::prune::PruneOptions;
use server::storage::{
    BlobKey, BlobLocation, CommitPolicy, Deletion, MetaLocation, QuotaSetting, QuotaUsage,
    Registration, Retention, StageId, Storage, StorageError, UploadCommit, INLINE_MAX,
    SHARED_ORPHAN_AGE,
};
use sha2::{Digest, Sha256};

const A: ClientId = ClientId([0xa1; 16]);
const B: ClientId = ClientId([0xb2; 16]);

// ---------------------------------------------------------------------------
// Combinations and the repositories made for each scenario.
// ---------------------------------------------------------------------------

/// Where a combination keeps file contents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Blobs {
    Local,
    S3,
}

/// Where a combination keeps metadata.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Meta {
    Sqlite,
    Postgres,
}

/// One pair of backends with the components it runs on.
struct Combination {
    name: String,
    blobs: Blobs,
    weed: Option<SeaweedFs>,
    pg: Option<Postgres>,
    root: tempfile::TempDir,
}

/// Prints `line` on the terminal even when the test harness captures the
/// test's output (it captures `print!` and `eprint!`, not the handle): a
/// skipped combination must be seen, not reported as passed in silence.
fn tell(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

impl Combination {
    /// Starts what `blobs` and `meta` need, or `None` (having said so on
    /// the terminal) when a component is not installed.
    fn start(blobs: Blobs, meta: Meta) -> Option<Self> {
        let name = format!(
            "{}+{}",
            match blobs {
                Blobs::Local => "fs",
                Blobs::S3 => "S3",
            },
            match meta {
                Meta::Sqlite => "SQLite",
                Meta::Postgres => "PostgreSQL",
            }
        );
        let pg = match meta {
            Meta::Sqlite => None,
            Meta::Postgres => match Postgres::start(&name) {
                Some(pg) => Some(pg),
                None => {
                    tell(&format!(
                        "skipped: storage combination {name}: PostgreSQL is not installed"
                    ));
                    return None;
                }
            },
        };
        let weed = match blobs {
            Blobs::Local => None,
            Blobs::S3 => match SeaweedFs::start(&name) {
                Some(weed) => {
                    s3_credentials();
                    Some(weed)
                }
                None => {
                    tell(&format!(
                        "skipped: storage combination {name}: SeaweedFS (weed) is not installed"
                    ));
                    return None;
                }
            },
        };
        Some(Self {
            name,
            blobs,
            weed,
            pg,
            root: tempfile::tempdir().expect("temporary directory"),
        })
    }

    /// A new, empty repository for `scenario`.
    fn site(&self, scenario: &str) -> Site<'_> {
        let root = self.root.path().join(scenario);
        std::fs::create_dir_all(&root).expect("the scenario's directory");
        let meta = match &self.pg {
            None => MetaLocation::Sqlite,
            Some(pg) => MetaLocation::Postgres(pg.database()),
        };
        let prefix = format!("{}/{scenario}", self.name.replace('+', "-"));
        Site {
            data: root.join("data"),
            root,
            blobs: match self.blobs {
                Blobs::Local => BlobLocation::Local,
                Blobs::S3 => self.s3(&prefix),
            },
            meta,
            prefix,
            weed: self.weed.as_ref(),
        }
    }

    /// The S3 location of `prefix` in the test's bucket.
    fn s3(&self, prefix: &str) -> BlobLocation {
        let weed = self
            .weed
            .as_ref()
            .expect("an S3 combination runs SeaweedFS");
        BlobLocation::S3 {
            location: S3Location::parse(&format!("s3://{}/{prefix}", weed.bucket()))
                .expect("a valid S3 location"),
            endpoint: Some(weed.endpoint()),
        }
    }

    /// Runs every scenario, each on its own repository; fails naming every
    /// scenario that failed.
    fn run(&self) {
        let mut failed = Vec::new();
        for scenario in SCENARIOS {
            let site = self.site(scenario.name);
            let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| (scenario.run)(&site)));
            match outcome {
                Ok(()) => eprintln!("{}: {}: ok", self.name, scenario.name),
                Err(_) => failed.push(scenario.name),
            }
        }
        assert!(
            failed.is_empty(),
            "storage combination {}: scenarios failed: {failed:?}",
            self.name
        );
    }
}

/// `Storage::open_with` takes S3 credentials from the environment, as the
/// server does. SeaweedFS accepts any, but the S3 client needs some (or it
/// asks an instance metadata service that is not there). Set once, to the
/// same values, before the first S3 store is opened.
fn s3_credentials() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        for (name, value) in SeaweedFs::CREDENTIALS {
            std::env::set_var(name, value);
        }
    });
}

/// A repository of one scenario: where its data directory is, and the
/// backends it was made on.
struct Site<'a> {
    /// The scenario's directory (the data directory and anything else).
    root: PathBuf,
    data: PathBuf,
    blobs: BlobLocation,
    meta: MetaLocation,
    /// The scenario's S3 prefix (used when the blobs are in S3).
    prefix: String,
    weed: Option<&'a SeaweedFs>,
}

impl Site<'_> {
    /// Opens the repository, as a server starting on it does.
    fn open(&self) -> Storage {
        Storage::open_with(&self.data, &self.blobs, &self.meta)
            .unwrap_or_else(|e| panic!("open {} with {:?}: {e}", self.blobs, self.meta))
    }

    /// Whether the metadata may be shared by several servers.
    fn shared(&self) -> bool {
        matches!(self.meta, MetaLocation::Postgres(_))
    }

    /// The blobs as the backing store itself holds them (files under the
    /// data directory, objects in the bucket), not as the blob store lists
    /// them: their keys.
    fn raw_blobs(&self) -> BTreeSet<BlobKey> {
        match self.weed {
            Some(weed) => weed
                .keys(&format!("{}/clients/", self.prefix))
                .into_iter()
                .map(BlobKey)
                .collect(),
            None => {
                let mut keys = BTreeSet::new();
                let Ok(clients) = std::fs::read_dir(self.data.join("clients")) else {
                    return keys;
                };
                for client in clients {
                    let client = client.expect("a client folder").file_name();
                    let client = client.to_str().expect("a hex name");
                    let blobs = self.data.join("clients").join(client).join("blobs");
                    let Ok(files) = std::fs::read_dir(blobs) else {
                        continue;
                    };
                    for file in files {
                        let file = file.expect("a blob").file_name();
                        let file = file.to_str().expect("a hex name");
                        keys.insert(BlobKey(format!("clients/{client}/blobs/{file}")));
                    }
                }
                keys
            }
        }
    }

    /// Blob stores this repository must refuse to be opened with, each
    /// with the data directory to try it in: another prefix or local
    /// instead of S3; S3 instead of local, and (shared metadata, which
    /// records the directory) another local directory.
    fn other_blob_stores(&self) -> Vec<(PathBuf, BlobLocation)> {
        let elsewhere = self.root.join("elsewhere");
        match (&self.blobs, self.weed) {
            (BlobLocation::S3 { .. }, Some(weed)) => vec![
                (
                    self.data.clone(),
                    BlobLocation::S3 {
                        location: S3Location::parse(&format!(
                            "s3://{}/{}-other",
                            weed.bucket(),
                            self.prefix
                        ))
                        .expect("a valid S3 location"),
                        endpoint: Some(weed.endpoint()),
                    },
                ),
                (self.data.clone(), BlobLocation::Local),
            ],
            _ => {
                // Refused before any connection is made, so the endpoint
                // need not answer.
                let s3 = BlobLocation::S3 {
                    location: S3Location::parse("s3://elsewhere/prefix").expect("valid"),
                    endpoint: Some("http://127.0.0.1:9".to_owned()),
                };
                let mut others = vec![(self.data.clone(), s3)];
                if self.shared() {
                    others.push((elsewhere, BlobLocation::Local));
                }
                others
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Driving the storage as the server does.
// ---------------------------------------------------------------------------

fn name(text: &str) -> FileName {
    FileName::try_from(text).expect("a valid file name")
}

fn register(storage: &Storage, id: ClientId, user: &str) {
    let outcome = storage
        .meta()
        .register(
            id,
            &UserName::try_from(user).expect("a valid user name"),
            SystemTime::now(),
        )
        .expect("register");
    assert_eq!(outcome, Registration::Created, "register {user}");
}

/// `len` bytes that differ from one offset to the next and by `seed`.
fn content(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ ((i >> 8) as u8))
        .collect()
}

/// A runtime for the ingest path, which streams from async code.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
}

/// Uploads `bytes` as the latest version of `file` the way a connection
/// does: [`Storage::begin_upload`], packets written as they arrive,
/// finished, then [`Storage::commit_upload`] on "CRC ok". Returns where
/// the content went.
fn upload(
    storage: &Storage,
    rt: &tokio::runtime::Runtime,
    client: ClientId,
    file: &str,
    bytes: &[u8],
    cksum: u32,
) -> BlobKey {
    try_upload(storage, rt, client, file, bytes, cksum, None)
        .unwrap_or_else(|e| panic!("upload {file}: {e}"))
}

/// [`upload`] with the quota the configuration gives the client.
fn try_upload(
    storage: &Storage,
    rt: &tokio::runtime::Runtime,
    client: ClientId,
    file: &str,
    bytes: &[u8],
    cksum: u32,
    quota: Option<u64>,
) -> Result<BlobKey, StorageError> {
    let (alive, _ended) = tokio::sync::mpsc::channel(1);
    let staged = rt.block_on(async {
        let mut upload = storage.begin_upload(client, bytes.len() as u64, alive)?;
        for packet in bytes.chunks(30_011) {
            upload.write(BytesMut::from(packet)).await?;
        }
        upload.finish().await
    })?;
    storage.commit_upload(
        staged,
        UploadCommit {
            client,
            file: name(file),
            size: bytes.len() as u64,
            cksum,
            quota,
        },
    )
}

/// The blob store's own listing.
fn listed(storage: &Storage) -> BTreeSet<BlobKey> {
    storage
        .blobs()
        .list()
        .expect("list the blob store")
        .map(|item| item.expect("a listed blob").0)
        .collect()
}

fn read_blob(storage: &Storage, key: &BlobKey) -> Result<Vec<u8>, StorageError> {
    let mut out = Vec::new();
    storage
        .open_blob(key)?
        .read_to_end(&mut out)
        .expect("read a blob");
    Ok(out)
}

/// Reads the latest version of `file` checked against its recorded size
/// and SHA-256.
fn read_verified(storage: &Storage, client: ClientId, file: &str) -> Vec<u8> {
    let version = storage
        .meta()
        .latest(client, &name(file))
        .expect("latest version")
        .unwrap_or_else(|| panic!("{file} has a version"));
    let mut reader = storage.open_verified(&version).expect("open verified");
    let mut out = Vec::new();
    while let Some(chunk) = reader.next_chunk(50_000).expect("a sound chunk") {
        out.extend_from_slice(&chunk);
    }
    out
}

fn oid(n: u8) -> ObjectId {
    ObjectId([n; ID_LEN])
}

/// The sealed bytes standing in for object `n` of `len` bytes (the server
/// never looks inside).
fn object(n: u8, len: u32) -> Vec<u8> {
    content(len as usize, n)
}

/// Stores one pack of `objects` (id byte, length) for `client` as the
/// repository session does: begin, bytes written as they arrive, then
/// stored against `quota`.
fn store_pack(
    storage: &Storage,
    client: ClientId,
    objects: &[(u8, u32)],
    at: SystemTime,
    quota: Option<u64>,
) -> Result<u32, StorageError> {
    let mut pack = storage.begin_pack(client)?;
    let mut index = Vec::new();
    let mut bytes = Vec::new();
    for &(n, len) in objects {
        index.push(Located {
            id: oid(n),
            offset: bytes.len() as u64,
            len,
        });
        bytes.extend_from_slice(&object(n, len));
    }
    for piece in bytes.chunks(4_093) {
        pack.write(piece)?;
    }
    storage.store_pack(pack, bytes.len() as u64, index, at, quota)
}

/// Stages `ids` and commits a snapshot of them.
fn snapshot(storage: &Storage, client: ClientId, ids: &[u8], time: u64, meta: &[u8]) -> u64 {
    let repo = storage.repo().expect("a repository");
    let stage = StageId::random();
    let ids: Vec<ObjectId> = ids.iter().map(|n| oid(*n)).collect();
    assert_eq!(
        repo.stage_refs(stage, client, true, &ids).expect("stage"),
        0,
        "every staged object is held"
    );
    repo.commit_snapshot(stage, client, time, meta, SystemTime::now(), None)
        .expect("commit a snapshot")
        .expect("the snapshot is accepted")
}

/// Object `n` of `client`, located and read back, if the client holds it.
fn read_object(storage: &Storage, client: ClientId, n: u8) -> Option<Vec<u8>> {
    let place = storage
        .repo()
        .expect("a repository")
        .locate(client, &[oid(n)])
        .expect("locate")
        .pop()
        .expect("one answer per id")?;
    let mut out = Vec::new();
    storage
        .open_object(&place)
        .expect("open an object")
        .read_to_end(&mut out)
        .expect("read an object");
    Some(out)
}

/// The recorded packs' blobs.
fn pack_blobs(storage: &Storage) -> BTreeSet<BlobKey> {
    storage
        .repo()
        .expect("a repository")
        .recorded_packs(None, 1000)
        .expect("recorded packs")
        .into_iter()
        .map(|(key, _)| key)
        .collect()
}

// ---------------------------------------------------------------------------
// The scenarios.
// ---------------------------------------------------------------------------

/// A scenario run on every combination.
struct Scenario {
    name: &'static str,
    run: fn(&Site<'_>),
}

const SCENARIOS: [Scenario; 8] = [
    Scenario {
        name: "legacy_upload",
        run: legacy_uploads_read_back_and_keep_the_versions_retention_allows,
    },
    Scenario {
        name: "snapshots",
        run: a_snapshot_round_trips_its_objects,
    },
    Scenario {
        name: "quota",
        run: rejects_a_pack_over_the_quota_and_keeps_nothing_of_it,
    },
    Scenario {
        name: "file_quota",
        run: per_file_versions_share_the_quota_with_packs,
    },
    Scenario {
        name: "prune",
        run: prune_removes_the_bytes_of_forgotten_objects_only,
    },
    Scenario {
        name: "recovery",
        run: recovery_removes_an_orphan_unless_another_server_may_record_it,
    },
    Scenario {
        name: "blob_store_record",
        run: rejects_another_blob_store_and_shares_the_maintenance_lock,
    },
    Scenario {
        name: "remove_client",
        run: removing_a_client_removes_its_content_and_rows_only,
    },
];

/// 1. Legacy per-file uploads through the server's ingest and commit path:
///    a large file becomes a blob, a small one goes inline; both read back
///    byte for byte and verified; retention keeps the last two versions
///    and deletes the older one's blob; a deleted file is gone.
fn legacy_uploads_read_back_and_keep_the_versions_retention_allows(site: &Site<'_>) {
    let keep_two = CommitPolicy {
        retention: Retention {
            keep_last: Some(2),
            keep_within: None,
        },
        append_only: false,
    };
    let storage = site.open().with_policy(keep_two);
    let rt = runtime();
    register(&storage, A, "ann");

    let large = content(300_000, 1);
    let small = content(2_000, 2);
    let large_key = upload(&storage, &rt, A, "large.bin", &large, 0x1111);
    let small_key = upload(&storage, &rt, A, "small.txt", &small, 0x2222);
    assert!(!large_key.is_inline(), "{large_key}");
    assert!(
        small_key.is_inline(),
        "a file of at most {INLINE_MAX} bytes goes inline"
    );
    assert_eq!(listed(&storage), BTreeSet::from([large_key.clone()]));
    assert_eq!(site.raw_blobs(), BTreeSet::from([large_key.clone()]));

    for (file, bytes, cksum) in [("large.bin", &large, 0x1111), ("small.txt", &small, 0x2222)] {
        assert_eq!(
            storage.read_latest(A, &name(file)).unwrap().as_ref(),
            Some(bytes),
            "{file}"
        );
        assert_eq!(&read_verified(&storage, A, file), bytes, "{file}");
        let version = storage.meta().latest(A, &name(file)).unwrap().unwrap();
        assert_eq!(version.size, bytes.len() as u64);
        assert_eq!(
            version.content_size,
            protocol::crypto::pkcs7_len(bytes.len() as u64)
        );
        assert_eq!(version.cksum, cksum);
        assert_eq!(version.sha256, <[u8; 32]>::from(Sha256::digest(bytes)));
    }

    // Two more versions of the large file: the first one's row and blob go.
    let second = content(300_000, 3);
    let third = content(INLINE_MAX as usize + 1, 4);
    let second_key = upload(&storage, &rt, A, "large.bin", &second, 3);
    let third_key = upload(&storage, &rt, A, "large.bin", &third, 4);
    let versions = storage.meta().versions(A, &name("large.bin")).unwrap();
    let kept: Vec<&BlobKey> = versions.iter().map(|v| &v.blob).collect();
    assert_eq!(kept, vec![&second_key, &third_key]);
    assert!(versions[0].version < versions[1].version);
    assert!(matches!(
        storage.open_blob(&large_key),
        Err(StorageError::NotFound { .. })
    ));
    assert_eq!(read_blob(&storage, &second_key).unwrap(), second);
    assert_eq!(read_verified(&storage, A, "large.bin"), third);
    let blobs = BTreeSet::from([second_key.clone(), third_key.clone()]);
    assert_eq!(listed(&storage), blobs);
    assert_eq!(site.raw_blobs(), blobs);

    // What a reopened server finds is the same.
    drop(storage);
    let storage = site.open();
    assert_eq!(
        storage.read_latest(A, &name("large.bin")).unwrap(),
        Some(third)
    );
    assert_eq!(
        storage.read_latest(A, &name("small.txt")).unwrap(),
        Some(small)
    );

    // A deleted file is gone, inline content with it.
    match storage.delete_file(A, &name("small.txt"), false).unwrap() {
        Deletion::Deleted(removed) => assert_eq!(removed.len(), 1),
        other => panic!("delete small.txt: {other:?}"),
    }
    assert_eq!(storage.read_latest(A, &name("small.txt")).unwrap(), None);
    assert_eq!(storage.meta().inline_content(&small_key).unwrap(), None);
    assert_eq!(
        storage.delete_file(A, &name("small.txt"), false).unwrap(),
        Deletion::NotFound
    );
}

/// 2. A snapshot repository round trip: packs stored, "have" and held
///    answered per client, references staged, snapshots committed and
///    listed, objects located and read back exactly, after a reopen too.
fn a_snapshot_round_trips_its_objects(site: &Site<'_>) {
    let storage = site.open();
    register(&storage, A, "ann");
    register(&storage, B, "bob");
    let now = SystemTime::now();
    let objects = [(1, 1_000), (2, 70_000), (3, 1)];
    assert_eq!(store_pack(&storage, A, &objects, now, None).unwrap(), 3);
    // An object already held keeps its place; only the new one counts.
    assert_eq!(
        store_pack(&storage, A, &[(1, 1_000), (4, 500)], now, None).unwrap(),
        1
    );
    assert_eq!(pack_blobs(&storage).len(), 2);
    assert_eq!(listed(&storage), pack_blobs(&storage));

    let repo = storage.repo().unwrap();
    let asked = [oid(1), oid(2), oid(4), oid(9)];
    assert_eq!(
        repo.held(A, &asked).unwrap(),
        vec![Some(1_000), Some(70_000), Some(500), None]
    );
    assert_eq!(repo.have(A, &asked).unwrap(), vec![true, true, true, false]);
    assert_eq!(
        repo.have(B, &asked).unwrap(),
        vec![false; 4],
        "ids are scoped per client"
    );

    // Staged in two requests, one naming an object the client lacks.
    let stage = StageId::random();
    assert_eq!(
        repo.stage_refs(stage, A, true, &[oid(1), oid(2)]).unwrap(),
        0
    );
    assert_eq!(
        repo.stage_refs(stage, A, false, &[oid(4), oid(9)]).unwrap(),
        1
    );
    let first = repo
        .commit_snapshot(stage, A, 7, b"first", now, None)
        .unwrap()
        .unwrap();
    let second = snapshot(&storage, A, &[3], 8, b"second");
    assert!(second > first, "snapshot ids increase");
    let entry = |id, time, meta: &'static [u8]| SnapshotEntry {
        id,
        time,
        meta: Bytes::from_static(meta),
    };
    assert_eq!(
        repo.snapshots(A, 0, 10).unwrap(),
        vec![entry(first, 7, b"first"), entry(second, 8, b"second")]
    );
    assert_eq!(
        repo.snapshots(A, first, 10).unwrap(),
        vec![entry(second, 8, b"second")]
    );
    assert!(repo.snapshots(B, 0, 10).unwrap().is_empty());
    let usage = repo.snapshot_usage(A).unwrap();
    assert_eq!(
        usage.iter().map(|u| (u.id, u.objects)).collect::<Vec<_>>(),
        vec![(first, 3), (second, 1)]
    );

    for (n, len) in [(1, 1_000), (2, 70_000), (3, 1), (4, 500)] {
        assert_eq!(read_object(&storage, A, n), Some(object(n, len)), "{n}");
    }
    assert_eq!(read_object(&storage, A, 9), None);
    assert_eq!(read_object(&storage, B, 1), None, "not another client's");

    drop(storage);
    let storage = site.open();
    assert_eq!(
        storage.repo().unwrap().snapshots(A, 0, 10).unwrap().len(),
        2
    );
    assert_eq!(read_object(&storage, A, 2), Some(object(2, 70_000)));
}

/// 3. Quota: exactly at the quota passes, one byte over is refused with
///    the figures and leaves no row and no blob; the client's own setting
///    overrides the configured one.
fn rejects_a_pack_over_the_quota_and_keeps_nothing_of_it(site: &Site<'_>) {
    let storage = site.open();
    register(&storage, A, "ann");
    let now = SystemTime::now();
    let quota = Some(1_000);
    assert_eq!(store_pack(&storage, A, &[(1, 300)], now, quota).unwrap(), 1);
    let repo = storage.repo().unwrap();
    assert_eq!(
        repo.usage(A, quota).unwrap(),
        QuotaUsage { stored: 300, quota }
    );
    let before = (pack_blobs(&storage), listed(&storage), site.raw_blobs());
    assert_eq!(before.1, before.0);

    let err = store_pack(&storage, A, &[(2, 400), (3, 301)], now, quota).unwrap_err();
    assert!(
        matches!(
            err,
            StorageError::QuotaExceeded {
                stored: 300,
                quota: 1_000,
                size: 701
            }
        ),
        "{err}"
    );
    assert_eq!(
        (pack_blobs(&storage), listed(&storage), site.raw_blobs()),
        before,
        "a refused pack leaves no row and no blob"
    );
    assert_eq!(repo.have(A, &[oid(2), oid(3)]).unwrap(), vec![false, false]);
    assert_eq!(repo.usage(A, quota).unwrap().stored, 300);

    // Exactly at the quota.
    assert_eq!(
        store_pack(&storage, A, &[(2, 400), (3, 300)], now, quota).unwrap(),
        2
    );
    assert_eq!(repo.usage(A, quota).unwrap().stored, 1_000);

    // The client's own quota overrides the configuration's.
    assert!(repo_set_quota(&storage, A, QuotaSetting::Bytes(1_200)));
    let err = store_pack(&storage, A, &[(4, 201)], now, quota).unwrap_err();
    assert!(
        matches!(
            err,
            StorageError::QuotaExceeded {
                stored: 1_000,
                quota: 1_200,
                size: 201
            }
        ),
        "{err}"
    );
    assert!(repo_set_quota(&storage, A, QuotaSetting::Unlimited));
    assert_eq!(store_pack(&storage, A, &[(4, 201)], now, quota).unwrap(), 1);
    assert_eq!(
        repo.usage(A, quota).unwrap(),
        QuotaUsage {
            stored: 1_201,
            quota: None
        }
    );
    assert_eq!(listed(&storage), pack_blobs(&storage));
    assert_eq!(pack_blobs(&storage).len(), 3);
}

fn repo_set_quota(storage: &Storage, client: ClientId, quota: QuotaSetting) -> bool {
    storage
        .meta()
        .set_quota(client, quota)
        .expect("set a quota")
}

/// 3b. Per-file versions share the quota with packs: each is charged its
///    plaintext bytes at its commit; one that does not fit is refused
///    with the figures and leaves no row and no blob, blob or inline; a
///    large upload that cannot fit is refused as it starts, unless
///    replacing the file's versions could make room; a pack is refused
///    once versions fill the quota; deleting a file gives its bytes back.
fn per_file_versions_share_the_quota_with_packs(site: &Site<'_>) {
    let storage = site.open();
    let rt = runtime();
    register(&storage, A, "ann");
    register(&storage, B, "bob");
    let now = SystemTime::now();
    let quota = Some(200_000);
    let over = |e: StorageError| match e {
        StorageError::QuotaExceeded {
            stored,
            quota,
            size,
        } => (stored, quota, size),
        other => panic!("not a quota refusal: {other}"),
    };
    assert_eq!(
        store_pack(&storage, A, &[(1, 100_000)], now, quota).unwrap(),
        1
    );
    let big = content(90_000, 1);
    let key = try_upload(&storage, &rt, A, "big", &big, 1, quota).unwrap();
    assert!(!key.is_inline());
    let repo = storage.repo().unwrap();
    assert_eq!(repo.usage(A, quota).unwrap().stored, 190_000);
    // Another client's versions are not charged to this one.
    try_upload(&storage, &rt, B, "big", &big, 1, Some(90_000)).unwrap();
    assert_eq!(repo.usage(A, quota).unwrap().stored, 190_000);

    // As a large upload starts: 20 000 more cannot fit, but a new
    // version of "big" might, since retention could drop the old one.
    let file = |f: &str| name(f);
    assert_eq!(
        over(
            storage
                .upload_fits(A, &file("new"), 80_000, quota)
                .unwrap_err()
        ),
        (190_000, 200_000, 80_000)
    );
    storage.upload_fits(A, &file("big"), 80_000, quota).unwrap();
    storage.upload_fits(A, &file("new"), 10_000, quota).unwrap();

    // Exactly at the quota (inline), then one byte over: refused.
    let small = try_upload(&storage, &rt, A, "small", &content(10_000, 2), 2, quota).unwrap();
    assert!(small.is_inline());
    assert_eq!(repo.usage(A, quota).unwrap().stored, 200_000);
    let before = (listed(&storage), site.raw_blobs());
    assert_eq!(
        over(try_upload(&storage, &rt, A, "one", &[7], 3, quota).unwrap_err()),
        (200_000, 200_000, 1)
    );
    // A large one refused at its commit leaves no blob.
    let large = content(70_000, 3);
    assert_eq!(
        over(try_upload(&storage, &rt, A, "large", &large, 4, quota).unwrap_err()),
        (200_000, 200_000, 70_000)
    );
    assert_eq!((listed(&storage), site.raw_blobs()), before);
    for f in ["one", "large"] {
        assert!(
            storage.meta().versions(A, &file(f)).unwrap().is_empty(),
            "{f}"
        );
    }
    assert_eq!(repo.usage(A, quota).unwrap().stored, 200_000);

    // Versions fill the quota, so a pack does not fit either.
    assert_eq!(
        over(store_pack(&storage, A, &[(2, 1)], now, quota).unwrap_err()),
        (200_000, 200_000, 1)
    );

    // Deleting a file gives its bytes back; the large one fits then.
    assert!(matches!(
        storage.delete_file(A, &file("big"), false).unwrap(),
        Deletion::Deleted(_)
    ));
    assert_eq!(repo.usage(A, quota).unwrap().stored, 110_000);
    try_upload(&storage, &rt, A, "large", &large, 4, quota).unwrap();
    assert_eq!(read_verified(&storage, A, "large"), large);
    assert_eq!(repo.usage(A, quota).unwrap().stored, 180_000);
}

/// 4. Prune: after a snapshot is forgotten, a prune with no grace deletes
///    the objects only it referenced and their pack's bytes; referenced
///    objects still read back. A dry run before changes nothing.
fn prune_removes_the_bytes_of_forgotten_objects_only(site: &Site<'_>) {
    let storage = site.open();
    register(&storage, A, "ann");
    // Stored a minute ago, and not asked about since.
    let stored = SystemTime::now() - Duration::from_secs(60);
    store_pack(&storage, A, &[(1, 1_000), (2, 2_000)], stored, None).unwrap();
    let kept_pack = pack_blobs(&storage);
    store_pack(&storage, A, &[(3, 3_000)], stored, None).unwrap();
    let doomed: Vec<BlobKey> = pack_blobs(&storage)
        .difference(&kept_pack)
        .cloned()
        .collect();
    assert_eq!(doomed.len(), 1);
    let doomed = &doomed[0];
    snapshot(&storage, A, &[1, 2], 1, b"kept");
    let forgotten = snapshot(&storage, A, &[3], 2, b"forgotten");
    let repo = storage.repo().unwrap();
    assert_eq!(repo.forget_snapshots(A, &[forgotten]).unwrap(), 1);
    assert_eq!(repo.snapshots(A, 0, 10).unwrap().len(), 1);

    let options = PruneOptions {
        grace: Duration::ZERO,
        repack_percent: 50,
        dry_run: true,
    };
    let dry = storage.prune_repo(&options, SystemTime::now()).unwrap();
    assert_eq!(
        (dry.objects, dry.object_bytes, dry.packs_removed),
        (1, 3_000, 1)
    );
    assert!(
        listed(&storage).contains(doomed),
        "a dry run deletes nothing"
    );
    assert_eq!(read_object(&storage, A, 3), Some(object(3, 3_000)));

    let _lock = storage.maintenance_lock(&site.data, false).unwrap();
    let report = storage
        .prune_repo(
            &PruneOptions {
                dry_run: false,
                ..options
            },
            SystemTime::now(),
        )
        .unwrap();
    assert_eq!(
        (
            report.objects,
            report.object_bytes,
            report.packs_removed,
            report.pack_bytes_removed,
            report.packs_repacked,
            report.trash_deleted
        ),
        (1, 3_000, 1, 3_000, 0, 1),
        "{report:?}"
    );
    assert!(matches!(
        storage.blobs().open(doomed),
        Err(StorageError::NotFound { .. })
    ));
    assert_eq!(listed(&storage), kept_pack);
    assert_eq!(
        site.raw_blobs(),
        kept_pack,
        "the bytes are gone from the store"
    );
    assert_eq!(read_object(&storage, A, 3), None);
    assert_eq!(repo.have(A, &[oid(3)]).unwrap(), vec![false]);
    assert_eq!(read_object(&storage, A, 1), Some(object(1, 1_000)));
    assert_eq!(read_object(&storage, A, 2), Some(object(2, 2_000)));

    // Nothing is left for another prune.
    let again = storage
        .prune_repo(
            &PruneOptions {
                dry_run: false,
                ..options
            },
            SystemTime::now(),
        )
        .unwrap();
    assert_eq!(again.reclaimed_bytes(), 0, "{again:?}");
    assert_eq!(listed(&storage), kept_pack);
}

/// 5. Recovery: a published blob without a row (a crash between publish
///    and record) is removed at start-up on a single server's metadata; on
///    shared metadata a fresh one is kept, since another server may be
///    about to record it, and only one older than [`SHARED_ORPHAN_AGE`]
///    goes (shown on local blobs, whose age the test can set). Recorded
///    content is kept either way.
fn recovery_removes_an_orphan_unless_another_server_may_record_it(site: &Site<'_>) {
    let storage = site.open();
    let rt = runtime();
    register(&storage, A, "ann");
    let file = content(100_000, 5);
    let file_key = upload(&storage, &rt, A, "file.bin", &file, 5);
    store_pack(&storage, A, &[(1, 500)], SystemTime::now(), None).unwrap();
    snapshot(&storage, A, &[1], 1, b"m");
    let recorded = listed(&storage);

    let orphan_bytes = b"published, never recorded".to_vec();
    let mut writer = storage.blobs().begin_write(A).unwrap();
    writer.write(&orphan_bytes).unwrap();
    let orphan = writer.finish().unwrap().publish().unwrap();
    assert!(listed(&storage).contains(&orphan));
    drop(storage);

    let storage = site.open();
    let report = storage.recover().unwrap();
    assert_eq!(report.forgotten_versions, 0, "{report:?}");
    if site.shared() {
        assert_eq!(
            report.removed_orphans, 0,
            "a fresh orphan is kept: {report:?}"
        );
        assert_eq!(read_blob(&storage, &orphan).unwrap(), orphan_bytes);
        assert!(site.raw_blobs().contains(&orphan));
        if site.blobs == BlobLocation::Local {
            let aged = SystemTime::now() - SHARED_ORPHAN_AGE - Duration::from_secs(60);
            std::fs::File::options()
                .write(true)
                .open(site.data.join(&orphan.0))
                .and_then(|f| f.set_modified(aged))
                .expect("age the orphan");
            let report = storage.recover().unwrap();
            assert_eq!(report.removed_orphans, 1, "an old orphan goes: {report:?}");
            assert_eq!(report.forgotten_versions, 0, "{report:?}");
            assert!(matches!(
                storage.blobs().open(&orphan),
                Err(StorageError::NotFound { .. })
            ));
        }
    } else {
        assert_eq!(report.removed_orphans, 1, "{report:?}");
        assert!(matches!(
            storage.blobs().open(&orphan),
            Err(StorageError::NotFound { .. })
        ));
        assert_eq!(listed(&storage), recorded);
        assert_eq!(site.raw_blobs(), recorded);
        // Nothing more to do the next time.
        let again = storage.recover().unwrap();
        assert_eq!(again.removed_orphans + again.forgotten_versions, 0);
    }
    assert!(recorded.contains(&file_key));
    assert_eq!(read_verified(&storage, A, "file.bin"), file);
    assert_eq!(read_object(&storage, A, 1), Some(object(1, 500)));
}

/// 6. The repository records its blob store: opened with another one it is
///    refused (and the record stays). The maintenance lock excludes a
///    second holder: with shared metadata, a second `Storage` on the same
///    database even from another data directory; else on the same data
///    directory.
fn rejects_another_blob_store_and_shares_the_maintenance_lock(site: &Site<'_>) {
    let first = site.open();
    assert_eq!(first.shared().is_some(), site.shared());
    drop(site.open());
    for (data, other) in site.other_blob_stores() {
        match Storage::open_with(&data, &other, &site.meta) {
            Err(StorageError::WrongBlobStore {
                recorded, given, ..
            }) => assert_ne!(recorded, given, "{other}"),
            Err(e) => panic!(
                "{other} in {}: refused for another reason: {e}",
                data.display()
            ),
            Ok(_) => panic!("{other} in {} was accepted", data.display()),
        }
    }
    let second = site.open();

    // With shared metadata the lock is the repository's, so the second
    // holder's data directory is another one: only that lock can exclude.
    let second_dir = if site.shared() {
        let dir = site.root.join("second-server");
        std::fs::create_dir_all(&dir).unwrap();
        dir
    } else {
        site.data.clone()
    };
    let held = first.maintenance_lock(&site.data, false).unwrap();
    let refused = second.maintenance_lock(&second_dir, false);
    assert!(
        matches!(refused, Err(StorageError::Unavailable { .. })),
        "a second holder is excluded: {refused:?}"
    );
    drop(held);
    let taken = take_once_released(&second, &second_dir);
    assert!(taken.is_ok(), "free once released: {taken:?}");
    if site.shared() {
        // A held repository lock is not this directory's: the first may
        // not take it either while the second holds it.
        assert!(first.maintenance_lock(&site.data, false).is_err());
    }
}

/// Takes the maintenance lock without waiting, trying again for a few
/// seconds while it is held: PostgreSQL releases a dropped holder's lock
/// when it notices that holder's connection closed, a moment after the
/// drop.
fn take_once_released(
    storage: &Storage,
    dir: &std::path::Path,
) -> Result<server::storage::prune::MaintenanceLock, StorageError> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match storage.maintenance_lock(dir, false) {
            Err(StorageError::Unavailable { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            outcome => return outcome,
        }
    }
}

/// 7. Removing a client removes its rows, inline content, blobs and packs,
///    and nothing of another client's.
fn removing_a_client_removes_its_content_and_rows_only(site: &Site<'_>) {
    let storage = site.open();
    let rt = runtime();
    let mut keys = Vec::new();
    for (id, user, seed) in [(A, "ann", 10), (B, "bob", 20)] {
        register(&storage, id, user);
        let large = upload(&storage, &rt, id, "large.bin", &content(90_000, seed), 1);
        let small = upload(&storage, &rt, id, "small.txt", &content(10, seed), 2);
        store_pack(&storage, id, &[(seed, 700)], SystemTime::now(), None).unwrap();
        snapshot(&storage, id, &[seed], 1, b"m");
        keys.push((large, small));
    }
    assert_eq!(
        listed(&storage).len(),
        4,
        "a large file and a pack each (the small files are inline)"
    );

    let removed = storage.remove_client(A).unwrap().expect("A existed");
    let mut files: Vec<&[u8]> = removed.iter().map(|v| v.file.as_bytes()).collect();
    files.sort();
    assert_eq!(files, [&b"large.bin"[..], b"small.txt"]);
    assert!(removed.iter().all(|v| v.client == A));

    assert!(storage.meta().client(A).unwrap().is_none());
    assert_eq!(storage.read_latest(A, &name("large.bin")).unwrap(), None);
    assert_eq!(storage.meta().inline_content(&keys[0].1).unwrap(), None);
    let repo = storage.repo().unwrap();
    assert!(repo.snapshots(A, 0, 10).unwrap().is_empty());
    assert_eq!(repo.have(A, &[oid(10)]).unwrap(), vec![false]);
    assert_eq!(repo.usage(A, None).unwrap().stored, 0);
    assert!(repo.repo_usage().unwrap().iter().all(|u| u.client != A));

    // B's content is what is left, in the store and behind it.
    let b_pack = pack_blobs(&storage);
    assert_eq!(b_pack.len(), 1);
    let left: BTreeSet<BlobKey> = b_pack.iter().cloned().chain([keys[1].0.clone()]).collect();
    assert_eq!(listed(&storage), left);
    assert_eq!(site.raw_blobs(), left);
    assert!(storage.meta().client(B).unwrap().is_some());
    assert_eq!(
        storage.read_latest(B, &name("large.bin")).unwrap(),
        Some(content(90_000, 20))
    );
    assert_eq!(
        storage.read_latest(B, &name("small.txt")).unwrap(),
        Some(content(10, 20))
    );
    assert_eq!(read_object(&storage, B, 20), Some(object(20, 700)));
    assert_eq!(repo.snapshots(B, 0, 10).unwrap().len(), 1);

    assert!(storage.remove_client(A).unwrap().is_none(), "already gone");
}

// ---------------------------------------------------------------------------
// One test per combination.
// ---------------------------------------------------------------------------

fn conforms(blobs: Blobs, meta: Meta) {
    if let Some(combination) = Combination::start(blobs, meta) {
        combination.run();
    }
}

#[test]
fn local_blobs_with_sqlite_conform() {
    conforms(Blobs::Local, Meta::Sqlite);
}

#[test]
fn s3_blobs_with_sqlite_conform() {
    conforms(Blobs::S3, Meta::Sqlite);
}

#[test]
fn local_blobs_with_postgres_conform() {
    conforms(Blobs::Local, Meta::Postgres);
}

#[test]
fn s3_blobs_with_postgres_conform() {
    conforms(Blobs::S3, Meta::Postgres);
}
