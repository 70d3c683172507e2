//! The [`RepoStore`] conformance suite: the same checks against SQLite
//! (a temporary directory) and PostgreSQL (one database per test on a
//! throwaway cluster), so that the two backends keep one meaning
//! (`docs/PROTOCOL.md` §13, §13.7, §13.9). Then races that only
//! PostgreSQL's several servers can run: several stores on one database,
//! each standing for a server.
//!
//! The PostgreSQL tests are skipped (saying why) when PostgreSQL is not
//! installed, unless `BACKUP_TEST_REQUIRE_PG` is set.

use std::sync::{Arc, Barrier, Mutex, PoisonError, Weak};
use std::time::{Duration, SystemTime};

use backup_test_support::Postgres;
use protocol::repo::message::{CommitRefusal, KeptReason, KeySlot, SnapshotEntry};
use protocol::repo::pack::Located;
use protocol::repo::{ObjectId, ID_LEN};
use protocol::{ClientId, UserName};
use server::storage::postgres::PgMetaStore;
use server::storage::repo::{PackedObject, Repacked};
use server::storage::sqlite::SqliteMetaStore;
use server::storage::{
    BlobKey, MetaStore, NewPack, ObjectPlace, QuotaSetting, RepoStore, StageId, StorageError,
};

const A: ClientId = ClientId([0xa; 16]);
const B: ClientId = ClientId([0xb; 16]);

/// A backend under test, with what the checks need of its client rows
/// (the [`MetaStore`] half, which PostgreSQL writes here in SQL).
trait Backend {
    fn repo(&self) -> &dyn RepoStore;
    /// Registers `client` as `name`, completed or not.
    fn register(&self, client: ClientId, name: &str, completed: bool);
    fn set_quota(&self, client: ClientId, quota: QuotaSetting);
    fn set_append_only(&self, client: ClientId, on: bool);
}

struct Sqlite {
    store: SqliteMetaStore,
    _dir: tempfile::TempDir,
}

impl Sqlite {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self {
            store: SqliteMetaStore::open(&dir.path().join("db")).unwrap(),
            _dir: dir,
        }
    }
}

impl Backend for Sqlite {
    fn repo(&self) -> &dyn RepoStore {
        &self.store
    }

    fn register(&self, client: ClientId, name: &str, completed: bool) {
        let now = SystemTime::now();
        self.store
            .register(client, &UserName::try_from(name).unwrap(), now)
            .unwrap();
        if completed {
            assert!(self.store.complete(client, now).unwrap());
        }
    }

    fn set_quota(&self, client: ClientId, quota: QuotaSetting) {
        assert!(self.store.set_quota(client, quota).unwrap());
    }

    fn set_append_only(&self, client: ClientId, on: bool) {
        assert!(self.store.set_append_only(client, on).unwrap());
    }
}

/// The cluster the PostgreSQL tests share: started by the first test that
/// needs it, stopped when no running test holds it any more (a cluster in
/// a `static` would never be stopped, and outlive the test binary).
fn cluster(test: &str) -> Option<Arc<Postgres>> {
    static CLUSTER: Mutex<Weak<Postgres>> = Mutex::new(Weak::new());
    let mut shared = CLUSTER.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(pg) = shared.upgrade() {
        return Some(pg);
    }
    let pg = Arc::new(Postgres::start(test)?);
    *shared = Arc::downgrade(&pg);
    Some(pg)
}

/// `bytes` as a PostgreSQL `bytea` literal.
fn bytea(bytes: &[u8]) -> String {
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("'\\x{hex}'::bytea")
}

/// Runs `statements` on the database at `url`, on a connection of its own.
fn sql(url: &str, statements: &str) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .unwrap();
        let driver = tokio::spawn(connection);
        client.batch_execute(statements).await.unwrap();
        drop(client);
        let _ = driver.await;
    });
}

struct Pg {
    // Dropped before the cluster it is connected to.
    store: PgMetaStore,
    url: String,
    _cluster: Arc<Postgres>,
}

impl Pg {
    fn new(test: &str) -> Option<Self> {
        let cluster = cluster(test)?;
        let url = cluster.database();
        Some(Self {
            store: PgMetaStore::open(&url).unwrap(),
            url,
            _cluster: cluster,
        })
    }

    /// Another store on the same database: another server.
    fn another(&self) -> PgMetaStore {
        PgMetaStore::open(&self.url).unwrap()
    }
}

impl Backend for Pg {
    fn repo(&self) -> &dyn RepoStore {
        &self.store
    }

    fn register(&self, client: ClientId, name: &str, completed: bool) {
        let completed = if completed { "0" } else { "NULL" };
        sql(
            &self.url,
            &format!(
                "INSERT INTO clients (id, name, registered, last_seen, completed_at)
                 VALUES ({}, {}, 0, 0, {completed})",
                bytea(&client.0),
                bytea(name.as_bytes())
            ),
        );
    }

    fn set_quota(&self, client: ClientId, quota: QuotaSetting) {
        let value = match quota {
            QuotaSetting::Inherit => "NULL".to_owned(),
            QuotaSetting::Unlimited => "-1".to_owned(),
            QuotaSetting::Bytes(n) => n.to_string(),
        };
        sql(
            &self.url,
            &format!(
                "UPDATE clients SET quota = {value} WHERE id = {}",
                bytea(&client.0)
            ),
        );
    }

    fn set_append_only(&self, client: ClientId, on: bool) {
        sql(
            &self.url,
            &format!(
                "UPDATE clients SET append_only = {on} WHERE id = {}",
                bytea(&client.0)
            ),
        );
    }
}

/// Object `n` (any u32: more than a byte's worth of distinct ids).
fn id(n: u32) -> ObjectId {
    let mut bytes = [0x5a; ID_LEN];
    bytes[..4].copy_from_slice(&n.to_be_bytes());
    ObjectId(bytes)
}

fn ids(ns: &[u32]) -> Vec<ObjectId> {
    ns.iter().map(|n| id(*n)).collect()
}

/// A pack of `client` under `blob` holding objects `ns` of 100 bytes
/// each, stored now.
fn pack(client: ClientId, blob: &str, ns: &[u32]) -> NewPack {
    NewPack {
        client,
        blob: BlobKey(blob.into()),
        size: 100 * ns.len() as u64,
        sha256: [7; 32],
        stored_at: SystemTime::now(),
        quota: None,
        objects: ns
            .iter()
            .enumerate()
            .map(|(i, n)| Located {
                id: id(*n),
                offset: 100 * i as u64,
                len: 100,
            })
            .collect(),
    }
}

/// An hour ago: objects stored then are dead to a prune whose cut-off is
/// [`cutoff`], unless something keeps them.
fn long_ago() -> SystemTime {
    SystemTime::now() - Duration::from_secs(3600)
}

fn cutoff() -> SystemTime {
    SystemTime::now() - Duration::from_secs(1800)
}

/// As [`pack`], stored [`long_ago`].
fn old_pack(client: ClientId, blob: &str, ns: &[u32]) -> NewPack {
    NewPack {
        stored_at: long_ago(),
        ..pack(client, blob, ns)
    }
}

fn place(blob: &str, offset: u64) -> Option<ObjectPlace> {
    Some(ObjectPlace {
        blob: BlobKey(blob.into()),
        offset,
        len: 100,
    })
}

/// The row of the pack recorded under `blob`.
fn pack_row(repo: &dyn RepoStore, blob: &str) -> i64 {
    repo.scrub_packs(0, usize::MAX)
        .unwrap()
        .into_iter()
        .find(|p| p.blob.0 == blob)
        .unwrap_or_else(|| panic!("no pack {blob}"))
        .id
}

/// (live objects, dead objects) of the pack under `blob` at `cutoff`.
fn liveness(repo: &dyn RepoStore, blob: &str, cutoff: SystemTime) -> (u64, u64) {
    let usage = repo.pack_usage(cutoff).unwrap();
    let p = usage
        .iter()
        .find(|p| p.blob.0 == blob)
        .unwrap_or_else(|| panic!("no usage of {blob}"));
    (p.live_objects, p.dead_objects)
}

/// Stages `ns` of `client` and commits them; the snapshot's id.
fn snapshot(repo: &dyn RepoStore, client: ClientId, ns: &[u32], time: u64) -> u64 {
    let stage = StageId::random();
    assert_eq!(repo.stage_refs(stage, client, true, &ids(ns)).unwrap(), 0);
    repo.commit_snapshot(stage, client, time, b"meta", SystemTime::now(), None)
        .unwrap()
        .unwrap()
}

fn quota_refusal(e: StorageError) -> (u64, u64, u64) {
    match e {
        StorageError::QuotaExceeded {
            stored,
            quota,
            size,
        } => (stored, quota, size),
        other => panic!("not a quota refusal: {other:?}"),
    }
}

// ---- The checks, each run against every backend. ----

fn answers_held_objects_in_large_batches_and_touches_them(b: &dyn Backend) {
    let s = b.repo();
    assert_eq!(s.add_pack(&old_pack(A, "p1", &[1, 2, 3])).unwrap(), 3);
    assert_eq!(s.add_pack(&old_pack(B, "p2", &[1])).unwrap(), 1);
    let mut odd = old_pack(A, "p3", &[4]);
    odd.objects[0].len = 77;
    s.add_pack(&odd).unwrap();
    // Thousands of ids, with repeats, and another client's object.
    let mut asked: Vec<u32> = (1000..4000).collect();
    asked.extend([4, 2, 1, 9, 2]);
    let held = s.held(A, &ids(&asked)).unwrap();
    assert_eq!(held.len(), asked.len());
    assert!(held[..3000].iter().all(Option::is_none));
    assert_eq!(
        &held[3000..],
        &[Some(77), Some(100), Some(100), None, Some(100)]
    );
    assert_eq!(
        s.have(B, &ids(&[1, 2])).unwrap(),
        vec![true, false],
        "another client's equal id is its own"
    );
    assert!(s.held(A, &[]).unwrap().is_empty());
    // Objects answered were touched: a prune whose cut-off came before
    // keeps them; the one not asked (3) is dead.
    let cut = cutoff();
    assert_eq!(liveness(s, "p1", cut), (2, 1));
    assert_eq!(liveness(s, "p3", cut), (1, 0));
    assert_eq!(liveness(s, "p2", cut), (1, 0), "asked of B by have");
    assert_eq!(
        s.delete_dead(cut, 0, 100).unwrap().0,
        1,
        "only the untouched object is dead"
    );
    assert_eq!(
        s.have(A, &ids(&[1, 2, 3])).unwrap(),
        vec![true, true, false]
    );
}

fn records_a_pack_skipping_objects_already_held_and_touching_them(b: &dyn Backend) {
    let s = b.repo();
    assert_eq!(s.add_pack(&old_pack(A, "p1", &[1, 2])).unwrap(), 2);
    // 2 is held already: skipped, keeps its place, but is touched.
    assert_eq!(s.add_pack(&pack(A, "p2", &[2, 3])).unwrap(), 1);
    assert_eq!(
        s.locate(A, &ids(&[2, 3, 1, 9, 2])).unwrap(),
        vec![
            place("p1", 100),
            place("p2", 100),
            place("p1", 0),
            None,
            place("p1", 100)
        ]
    );
    assert_eq!(liveness(s, "p1", cutoff()), (1, 1));
    // An id listed twice in one pack is recorded once, at its first place.
    assert_eq!(s.add_pack(&pack(A, "p3", &[5, 5, 6])).unwrap(), 2);
    assert_eq!(s.locate(A, &ids(&[5])).unwrap(), vec![place("p3", 0)]);
    // A pack of nothing new is still recorded (its bytes are stored).
    assert_eq!(s.add_pack(&pack(A, "p4", &[1])).unwrap(), 0);
    assert_eq!(s.add_pack(&pack(A, "p5", &[])).unwrap(), 0);
    let recorded: Vec<String> = s
        .recorded_packs(None, 10)
        .unwrap()
        .into_iter()
        .map(|(k, _)| k.0)
        .collect();
    assert_eq!(recorded, ["p1", "p2", "p3", "p4", "p5"]);
    // One blob is one pack.
    assert!(s.add_pack(&pack(B, "p1", &[8])).is_err());
    assert_eq!(s.have(B, &ids(&[8])).unwrap(), vec![false]);
}

fn charges_packs_to_the_quota_exactly_at_it_and_refuses_one_byte_over(b: &dyn Backend) {
    let s = b.repo();
    b.register(A, "a", true);
    b.set_quota(A, QuotaSetting::Bytes(300));
    assert_eq!(s.add_pack(&pack(A, "p1", &[1, 2])).unwrap(), 2);
    assert_eq!(s.add_pack(&pack(A, "p2", &[3])).unwrap(), 1);
    let usage = s.usage(A, None).unwrap();
    assert_eq!((usage.stored, usage.quota), (300, Some(300)));
    let mut one_over = pack(A, "p3", &[4]);
    one_over.size = 1;
    one_over.objects[0].len = 1;
    assert_eq!(
        quota_refusal(s.add_pack(&one_over).unwrap_err()),
        (300, 300, 1)
    );
    assert_eq!(s.have(A, &ids(&[4])).unwrap(), vec![false]);
    assert_eq!(s.recorded_packs(None, 10).unwrap().len(), 2);
    // An object already held, sent again, is charged as it lies.
    assert_eq!(
        quota_refusal(s.add_pack(&pack(A, "p4", &[1])).unwrap_err()),
        (300, 300, 100)
    );
    // An empty pack fits exactly at the quota.
    let mut empty = pack(A, "p5", &[]);
    empty.size = 0;
    assert_eq!(s.add_pack(&empty).unwrap(), 0);
    assert_eq!(s.usage(B, Some(0)).unwrap().stored, 0);
    assert_eq!(s.usage(B, Some(0)).unwrap().quota, Some(0));
}

fn a_clients_own_quota_overrides_the_configured_one(b: &dyn Backend) {
    let s = b.repo();
    b.register(A, "a", true);
    s.add_pack(&pack(A, "p1", &[1])).unwrap();
    let configured = Some(150);
    let mut big = pack(A, "p2", &[2]);
    big.quota = configured;
    assert_eq!(
        quota_refusal(s.add_pack(&big).unwrap_err()),
        (100, 150, 100)
    );
    b.set_quota(A, QuotaSetting::Unlimited);
    assert_eq!(s.usage(A, configured).unwrap().quota, None);
    assert_eq!(s.add_pack(&big).unwrap(), 1);
    b.set_quota(A, QuotaSetting::Bytes(1000));
    assert_eq!(s.usage(A, configured).unwrap().quota, Some(1000));
    b.set_quota(A, QuotaSetting::Bytes(200));
    let mut third = pack(A, "p3", &[3]);
    third.quota = Some(u64::MAX);
    assert_eq!(
        quota_refusal(s.add_pack(&third).unwrap_err()),
        (200, 200, 100)
    );
    b.set_quota(A, QuotaSetting::Inherit);
    assert_eq!(s.usage(A, configured).unwrap().quota, Some(150));
    assert_eq!(s.add_pack(&third).unwrap(), 1);
    // A client with no row has the configured quota.
    assert_eq!(s.usage(B, Some(5)).unwrap().quota, Some(5));
    assert_eq!(s.usage(B, None).unwrap().quota, None);
}

fn counts_usage_per_client_and_per_snapshot(b: &dyn Backend) {
    let s = b.repo();
    b.register(A, "a", true);
    b.register(B, "b", true);
    s.add_pack(&pack(A, "p1", &[1, 2, 3])).unwrap();
    s.add_pack(&pack(A, "p2", &[4])).unwrap();
    s.add_pack(&pack(B, "p3", &[1])).unwrap();
    let first = snapshot(s, A, &[1, 2], 7);
    let second = snapshot(s, A, &[1, 2, 3], 8);
    let usage = s.repo_usage().unwrap();
    assert_eq!(usage.len(), 2);
    let a = usage.iter().find(|u| u.client == A).unwrap();
    assert_eq!(
        (a.stored, a.packs, a.snapshots, a.logical),
        (400, 2, 2, 500)
    );
    let last = a.last_snapshot.unwrap();
    assert!(last <= SystemTime::now() && last > SystemTime::now() - Duration::from_secs(60));
    let b_usage = usage.iter().find(|u| u.client == B).unwrap();
    assert_eq!(
        (
            b_usage.stored,
            b_usage.packs,
            b_usage.snapshots,
            b_usage.logical
        ),
        (100, 1, 0, 0)
    );
    assert_eq!(b_usage.last_snapshot, None);
    let got: Vec<(u64, u64, u64, u64, u64)> = s
        .snapshot_usage(A)
        .unwrap()
        .iter()
        .map(|x| (x.id, x.time, x.objects, x.logical, x.unique))
        .collect();
    assert_eq!(got, vec![(first, 7, 2, 200, 0), (second, 8, 3, 300, 100)]);
    assert!(s.snapshot_usage(B).unwrap().is_empty());
}

fn commits_staged_references_once_all_are_present(b: &dyn Backend) {
    let s = b.repo();
    s.add_pack(&pack(A, "p1", &[1, 2])).unwrap();
    s.add_pack(&pack(B, "p2", &[3])).unwrap();
    let now = SystemTime::now();
    let stage = StageId::random();
    // B's object is missing for A, and not staged; a repeat is staged once.
    assert_eq!(s.stage_refs(stage, A, true, &ids(&[1, 3])).unwrap(), 1);
    assert_eq!(s.stage_refs(stage, A, false, &ids(&[1, 9, 1])).unwrap(), 1);
    let first = s
        .commit_snapshot(stage, A, u64::MAX, b"one", now, None)
        .unwrap()
        .unwrap();
    // `first` drops what was staged before.
    s.stage_refs(stage, A, true, &ids(&[1])).unwrap();
    assert_eq!(s.stage_refs(stage, A, true, &ids(&[2])).unwrap(), 0);
    let second = s
        .commit_snapshot(stage, A, 5, b"two", now, None)
        .unwrap()
        .unwrap();
    assert!(second > first);
    let got: Vec<(u64, u64, u64)> = s
        .snapshot_usage(A)
        .unwrap()
        .iter()
        .map(|x| (x.id, x.objects, x.logical))
        .collect();
    assert_eq!(got, vec![(first, 1, 100), (second, 1, 100)]);
    assert_eq!(
        s.snapshots(A, 0, 10).unwrap(),
        vec![
            SnapshotEntry {
                id: first,
                time: u64::MAX,
                meta: "one".into()
            },
            SnapshotEntry {
                id: second,
                time: 5,
                meta: "two".into()
            },
        ]
    );
    assert_eq!(s.snapshots(A, first, 10).unwrap().len(), 1);
    assert_eq!(s.snapshots(A, 0, 1).unwrap()[0].id, first);
    assert!(s.snapshots(A, second, 10).unwrap().is_empty());
    assert!(s.snapshots(A, u64::MAX, 10).unwrap().is_empty());
    assert!(s.snapshots(B, 0, 10).unwrap().is_empty());
    // Staged references keep their objects from a prune.
    s.add_pack(&old_pack(A, "p3", &[7])).unwrap();
    s.stage_refs(stage, A, true, &ids(&[7])).unwrap();
    assert_eq!(liveness(s, "p3", SystemTime::now()), (1, 0));
    s.drop_stage(stage).unwrap();
    s.drop_stage(stage).unwrap();
    assert_eq!(liveness(s, "p3", SystemTime::now()), (0, 1));
}

fn refuses_a_commit_for_each_reason_and_drops_the_stage(b: &dyn Backend) {
    let s = b.repo();
    b.register(A, "a", true);
    s.add_pack(&pack(A, "p1", &[1, 2])).unwrap();
    s.add_pack(&pack(A, "p2", &[3, 4])).unwrap();
    let now = SystemTime::now();
    let stage = StageId::random();
    assert_eq!(
        s.commit_snapshot(stage, A, 1, b"m", now, None).unwrap(),
        Err((CommitRefusal::NO_REFERENCES, 0)),
        "nothing staged"
    );
    // Staged, then dropped: nothing staged.
    s.stage_refs(stage, A, true, &ids(&[1])).unwrap();
    s.drop_stage(stage).unwrap();
    assert_eq!(
        s.commit_snapshot(stage, A, 1, b"m", now, None).unwrap(),
        Err((CommitRefusal::NO_REFERENCES, 0))
    );
    // Staged, then their pack was found damaged: missing.
    assert_eq!(s.stage_refs(stage, A, true, &ids(&[1, 3, 4])).unwrap(), 0);
    assert!(s.mark_damaged(pack_row(s, "p2"), now).unwrap());
    assert_eq!(
        s.commit_snapshot(stage, A, 1, b"m", now, None).unwrap(),
        Err((CommitRefusal::MISSING, 2))
    );
    assert_eq!(
        s.commit_snapshot(stage, A, 1, b"m", now, None).unwrap(),
        Err((CommitRefusal::NO_REFERENCES, 0)),
        "the refused stage was dropped"
    );
    // Another stage is another snapshot's.
    let other = StageId::random();
    s.stage_refs(stage, A, true, &ids(&[1])).unwrap();
    assert_eq!(
        s.commit_snapshot(other, A, 1, b"m", now, None).unwrap(),
        Err((CommitRefusal::NO_REFERENCES, 0))
    );
    // Another client cannot commit what A staged.
    assert_eq!(
        s.commit_snapshot(stage, B, 1, b"m", now, None).unwrap(),
        Err((CommitRefusal::MISSING, 1))
    );
    // The quota lowered below what the client stores: the backstop.
    s.stage_refs(stage, A, true, &ids(&[1])).unwrap();
    assert_eq!(
        s.commit_snapshot(stage, A, 1, b"m", now, Some(399))
            .unwrap(),
        Err((CommitRefusal::QUOTA, 0))
    );
    b.set_quota(A, QuotaSetting::Bytes(399));
    s.stage_refs(stage, A, true, &ids(&[1])).unwrap();
    assert_eq!(
        s.commit_snapshot(stage, A, 1, b"m", now, None).unwrap(),
        Err((CommitRefusal::QUOTA, 0)),
        "the client's own quota"
    );
    assert!(s.snapshots(A, 0, 10).unwrap().is_empty());
    b.set_quota(A, QuotaSetting::Bytes(400));
    s.stage_refs(stage, A, true, &ids(&[1])).unwrap();
    assert!(s
        .commit_snapshot(stage, A, 1, b"m", now, Some(1))
        .unwrap()
        .is_ok());
    assert_eq!(s.snapshots(A, 0, 10).unwrap().len(), 1);
}

fn keeps_key_envelopes_by_slot_under_their_rules(b: &dyn Backend) {
    let s = b.repo();
    let now = SystemTime::now();
    assert_eq!(s.delete_key(A, 0, false).unwrap(), Err(KeptReason::EMPTY));
    assert!(s.put_key(A, 0, b"rsa", now, false).unwrap());
    // The master slot is written once; the others are replaced.
    assert!(!s.put_key(A, 0, b"rsa2", now, false).unwrap());
    assert!(s.put_key(A, 3, b"extra", now, false).unwrap());
    assert!(s.put_key(A, 3, b"extra2", now, false).unwrap());
    assert!(s.put_key(B, 1, b"b", now, false).unwrap());
    assert_eq!(
        s.keys(A).unwrap(),
        vec![
            KeySlot {
                slot: 0,
                envelope: "rsa".into()
            },
            KeySlot {
                slot: 3,
                envelope: "extra2".into()
            },
        ]
    );
    assert_eq!(
        s.delete_key(A, 0, false).unwrap(),
        Err(KeptReason::LAST_WAY_IN),
        "the RSA envelope goes only once a passphrase envelope is there"
    );
    assert!(s.put_key(A, 1, b"pass", now, false).unwrap());
    // Under the server's append-only option every slot is written once
    // and nothing is deleted.
    assert!(!s.put_key(A, 1, b"pass2", now, true).unwrap());
    assert!(s.put_key(A, 2, b"new", now, true).unwrap());
    assert_eq!(
        s.delete_key(A, 2, true).unwrap(),
        Err(KeptReason::APPEND_ONLY)
    );
    assert_eq!(s.delete_key(A, 2, false).unwrap(), Ok(()));
    assert_eq!(s.delete_key(A, 3, false).unwrap(), Ok(()));
    assert_eq!(s.delete_key(A, 0, false).unwrap(), Ok(()));
    assert_eq!(
        s.delete_key(A, 1, false).unwrap(),
        Err(KeptReason::LAST_WAY_IN),
        "the passphrase envelope is now the only one"
    );
    let slots: Vec<u8> = s.keys(A).unwrap().iter().map(|k| k.slot).collect();
    assert_eq!(slots, vec![1]);
    assert_eq!(s.keys(B).unwrap().len(), 1);
    // The client's own append-only flag.
    b.register(B, "bob", false);
    b.set_append_only(B, true);
    assert!(!s.put_key(B, 1, b"b2", now, false).unwrap());
    assert!(s.put_key(B, 4, b"b4", now, false).unwrap());
    assert_eq!(
        s.delete_key(B, 4, false).unwrap(),
        Err(KeptReason::APPEND_ONLY)
    );
    assert_eq!(s.keys(B).unwrap()[0].envelope, "b");
    b.set_append_only(B, false);
    assert!(s.put_key(B, 1, b"b3", now, false).unwrap());
    assert_eq!(s.keys(B).unwrap()[0].envelope, "b3");
}

fn finds_the_passphrase_envelope_of_a_completed_client_by_name(b: &dyn Backend) {
    let s = b.repo();
    let now = SystemTime::now();
    b.register(A, "alice", false);
    b.register(B, "bob", true);
    s.put_key(A, 1, b"pass-a", now, false).unwrap();
    s.put_key(B, 0, b"rsa-b", now, false).unwrap();
    let alice = UserName::try_from("alice").unwrap();
    let bob = UserName::try_from("bob").unwrap();
    assert_eq!(
        s.passphrase_envelope(&alice).unwrap(),
        None,
        "not before the registration is complete"
    );
    assert_eq!(
        s.passphrase_envelope(&bob).unwrap(),
        None,
        "no passphrase envelope"
    );
    s.put_key(B, 1, b"pass-b", now, false).unwrap();
    assert_eq!(
        s.passphrase_envelope(&bob).unwrap(),
        Some((B, b"pass-b".to_vec()))
    );
    let nobody = UserName::try_from("carol").unwrap();
    assert_eq!(s.passphrase_envelope(&nobody).unwrap(), None);
}

fn pages_through_recorded_packs_in_byte_order(b: &dyn Backend) {
    let s = b.repo();
    // Byte order: upper case before lower case, whatever the locale says.
    for (n, blob) in ["b", "a", "B", "a0", "_"].iter().enumerate() {
        let mut p = pack(A, blob, &[u32::try_from(n).unwrap()]);
        p.size = 10 + n as u64;
        s.add_pack(&p).unwrap();
    }
    let all = s.recorded_packs(None, 10).unwrap();
    let keys: Vec<&str> = all.iter().map(|(k, _)| k.0.as_str()).collect();
    assert_eq!(keys, ["B", "_", "a", "a0", "b"]);
    assert_eq!(all[0].1, 12);
    let page = s.recorded_packs(Some(&BlobKey("_".into())), 2).unwrap();
    let keys: Vec<&str> = page.iter().map(|(k, _)| k.0.as_str()).collect();
    assert_eq!(keys, ["a", "a0"]);
    assert!(s
        .recorded_packs(Some(&BlobKey("b".into())), 10)
        .unwrap()
        .is_empty());
    assert!(s.recorded_packs(None, 0).unwrap().is_empty());
}

fn clears_every_stage_at_start_up(b: &dyn Backend) {
    let s = b.repo();
    s.add_pack(&pack(A, "p1", &[1, 2])).unwrap();
    let (one, two) = (StageId::random(), StageId(1));
    s.stage_refs(one, A, true, &ids(&[1, 2])).unwrap();
    s.stage_refs(two, A, true, &ids(&[1])).unwrap();
    assert_eq!(s.clear_stages().unwrap(), 3);
    assert_eq!(s.clear_stages().unwrap(), 0);
    assert_eq!(
        s.commit_snapshot(one, A, 1, b"m", SystemTime::now(), None)
            .unwrap(),
        Err((CommitRefusal::NO_REFERENCES, 0))
    );
}

fn forgets_snapshots_with_their_references(b: &dyn Backend) {
    let s = b.repo();
    b.register(A, "a", true);
    b.register(B, "b", true);
    s.add_pack(&old_pack(A, "p1", &[1, 2])).unwrap();
    s.add_pack(&old_pack(B, "p2", &[1])).unwrap();
    let a1 = snapshot(s, A, &[1], 10);
    let b1 = snapshot(s, B, &[1], 20);
    let a2 = snapshot(s, A, &[1, 2], u64::MAX);
    assert_eq!(
        s.snapshot_stamps().unwrap(),
        vec![(A, a1, 10), (A, a2, u64::MAX), (B, b1, 20)]
    );
    // Another client's snapshot, one asked twice, and ids of none.
    assert_eq!(
        s.forget_snapshots(A, &[b1, a1, a1, 999_999, u64::MAX])
            .unwrap(),
        1
    );
    assert_eq!(s.forget_snapshots(A, &[]).unwrap(), 0);
    assert_eq!(
        s.snapshot_stamps().unwrap(),
        vec![(A, a2, u64::MAX), (B, b1, 20)]
    );
    // A's own forget, refused while append-only (its flag or the server's).
    assert_eq!(s.client_forget(A, &[a2], true).unwrap(), None);
    b.set_append_only(A, true);
    assert_eq!(s.client_forget(A, &[a2], false).unwrap(), None);
    assert_eq!(s.snapshots(A, 0, 10).unwrap().len(), 1);
    b.set_append_only(A, false);
    assert_eq!(s.client_forget(A, &[a2, b1], false).unwrap(), Some(1));
    assert!(s.snapshots(A, 0, 10).unwrap().is_empty());
    assert_eq!(s.snapshots(B, 0, 10).unwrap().len(), 1);
    // Its references went with it: A's objects are dead, B's is not.
    let cut = cutoff();
    assert_eq!(liveness(s, "p1", cut), (0, 2));
    assert_eq!(liveness(s, "p2", cut), (1, 0));
    // A client with no row forgets like any other.
    let c = ClientId([0xc; 16]);
    s.add_pack(&pack(c, "p3", &[1])).unwrap();
    let c1 = snapshot(s, c, &[1], 1);
    assert_eq!(s.client_forget(c, &[c1], false).unwrap(), Some(1));
}

fn prunes_dead_objects_and_trashes_empty_packs(b: &dyn Backend) {
    let s = b.repo();
    s.add_pack(&old_pack(A, "p1", &[1, 2, 3, 4])).unwrap();
    s.add_pack(&old_pack(A, "p2", &[5, 6])).unwrap();
    s.add_pack(&pack(A, "p3", &[7])).unwrap();
    s.add_pack(&old_pack(B, "p4", &[1])).unwrap();
    snapshot(s, A, &[1], 1);
    let stage = StageId::random();
    s.stage_refs(stage, A, true, &ids(&[2])).unwrap();
    let cut = cutoff();
    let usage = s.pack_usage(cut).unwrap();
    let got: Vec<(&str, ClientId, u64, u64, u64, u64, u64)> = usage
        .iter()
        .map(|p| {
            (
                p.blob.0.as_str(),
                p.client,
                p.size,
                p.live_objects,
                p.live_bytes,
                p.dead_objects,
                p.dead_bytes,
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("p1", A, 400, 2, 200, 2, 200),
            ("p2", A, 200, 0, 0, 2, 200),
            ("p3", A, 100, 1, 100, 0, 0),
            ("p4", B, 100, 0, 0, 1, 100),
        ]
    );
    assert_eq!(usage[0].id, pack_row(s, "p1"));
    // Paged by row: two rows at a time, the last examined returned.
    let mut after = 0;
    let mut deleted = (0, 0);
    let mut pages = 0;
    while let (n, bytes, Some(last)) = s.delete_dead(cut, after, 2).unwrap() {
        assert!(last > after);
        after = last;
        deleted = (deleted.0 + n, deleted.1 + bytes);
        pages += 1;
    }
    assert_eq!(deleted, (5, 500));
    assert_eq!(pages, 4, "8 objects, 2 a page");
    // A second pass finds nothing more, up to the last row left.
    let (n, bytes, last) = s.delete_dead(cut, 0, 100).unwrap();
    assert_eq!((n, bytes), (0, 0));
    assert!(last.is_some_and(|l| l <= after), "{last:?}");
    assert_eq!(s.delete_dead(cut, 0, 0).unwrap(), (0, 0, None));
    assert_eq!(
        s.have(A, &ids(&[1, 2, 3, 4, 5, 6, 7])).unwrap(),
        vec![true, true, false, false, false, false, true]
    );
    assert_eq!(
        s.pack_objects(pack_row(s, "p1")).unwrap(),
        vec![
            PackedObject {
                object: s.pack_objects(pack_row(s, "p1")).unwrap()[0].object,
                pack: pack_row(s, "p1"),
                offset: 0,
                len: 100
            },
            PackedObject {
                object: s.pack_objects(pack_row(s, "p1")).unwrap()[1].object,
                pack: pack_row(s, "p1"),
                offset: 100,
                len: 100
            },
        ]
    );
    // p2 and p4 hold nothing now: dropped, their blobs in the trash.
    let dropped_at = SystemTime::now();
    assert_eq!(s.drop_empty_packs(dropped_at).unwrap(), (2, 300));
    assert_eq!(s.drop_empty_packs(dropped_at).unwrap(), (0, 0));
    let recorded: Vec<String> = s
        .recorded_packs(None, 10)
        .unwrap()
        .into_iter()
        .map(|(k, _)| k.0)
        .collect();
    assert_eq!(recorded, ["p1", "p3"]);
    assert_eq!(s.usage(B, None).unwrap().stored, 0);
    assert!(s
        .trash_due(dropped_at - Duration::from_secs(1), 10)
        .unwrap()
        .is_empty());
    let due = s.trash_due(dropped_at, 10).unwrap();
    assert_eq!(due, vec![BlobKey("p2".into()), BlobKey("p4".into())]);
    assert_eq!(s.trash_due(dropped_at, 1).unwrap().len(), 1);
    s.trash(&BlobKey("r1".into()), long_ago()).unwrap();
    s.trash(&BlobKey("r1".into()), SystemTime::now()).unwrap();
    assert_eq!(
        s.trash_due(long_ago() + Duration::from_secs(60), 10)
            .unwrap(),
        vec![BlobKey("r1".into())],
        "trashed twice: the first time counts"
    );
    s.untrash(&BlobKey("p2".into())).unwrap();
    s.untrash(&BlobKey("p2".into())).unwrap();
    assert_eq!(
        s.trash_due(SystemTime::now(), 10).unwrap(),
        vec![BlobKey("p4".into()), BlobKey("r1".into())]
    );
}

fn replaces_packs_only_while_every_object_is_where_it_was(b: &dyn Backend) {
    let s = b.repo();
    s.add_pack(&old_pack(A, "p1", &[1, 2, 3])).unwrap();
    s.add_pack(&old_pack(A, "p2", &[4, 5])).unwrap();
    snapshot(s, A, &[1, 3, 4], 1);
    let cut = cutoff();
    while let (_, _, Some(_)) = s.delete_dead(cut, 0, 100).unwrap() {
        if s.pack_usage(cut)
            .unwrap()
            .iter()
            .all(|p| p.dead_objects == 0)
        {
            break;
        }
    }
    let (p1, p2) = (pack_row(s, "p1"), pack_row(s, "p2"));
    let mut objects = s.pack_objects(p1).unwrap();
    objects.extend(s.pack_objects(p2).unwrap());
    assert_eq!(objects.len(), 3, "{objects:?}");
    let now = SystemTime::now();
    // A stale offset: refused, nothing changed.
    let mut stale = objects.clone();
    stale[1].offset += 1;
    let repack = |blob: &str, objects: &[PackedObject], replaces: Vec<i64>| Repacked {
        client: A,
        blob: BlobKey(blob.into()),
        size: 300,
        sha256: [9; 32],
        moved: objects
            .iter()
            .enumerate()
            .map(|(i, o)| (o.clone(), 100 * i as u64))
            .collect(),
        replaces,
    };
    s.trash(&BlobKey("r1".into()), now).unwrap();
    assert!(!s
        .replace_packs(&repack("r1", &stale, vec![p1, p2]), now)
        .unwrap());
    // A replaced pack that holds an object not moved: refused.
    assert!(!s
        .replace_packs(&repack("r1", &objects[..2], vec![p1, p2]), now)
        .unwrap());
    let unchanged: Vec<String> = s
        .recorded_packs(None, 10)
        .unwrap()
        .into_iter()
        .map(|(k, _)| k.0)
        .collect();
    assert_eq!(unchanged, ["p1", "p2"]);
    assert_eq!(
        s.locate(A, &ids(&[1, 3, 4])).unwrap(),
        vec![place("p1", 0), place("p1", 200), place("p2", 0)]
    );
    assert_eq!(
        s.trash_due(now, 10).unwrap(),
        vec![BlobKey("r1".into())],
        "the refused repack's blob stays in the trash"
    );
    // Every object where it was: moved, the old packs trashed.
    assert!(s
        .replace_packs(&repack("r1", &objects, vec![p1, p2]), now)
        .unwrap());
    assert_eq!(
        s.locate(A, &ids(&[1, 3, 4])).unwrap(),
        vec![place("r1", 0), place("r1", 100), place("r1", 200)]
    );
    let recorded = s.recorded_packs(None, 10).unwrap();
    assert_eq!(recorded, vec![(BlobKey("r1".into()), 300)]);
    assert_eq!(
        s.trash_due(now, 10).unwrap(),
        vec![BlobKey("p1".into()), BlobKey("p2".into())]
    );
    assert_eq!(s.usage(A, None).unwrap().stored, 300);
    let snaps = s.snapshot_usage(A).unwrap();
    assert_eq!((snaps[0].objects, snaps[0].logical), (3, 300));
    // The same move again finds nothing where it was.
    assert!(!s
        .replace_packs(&repack("r2", &objects, Vec::new()), now)
        .unwrap());
    assert_eq!(s.recorded_packs(None, 10).unwrap().len(), 1);
}

fn scrubs_and_heals_damaged_packs(b: &dyn Backend) {
    let s = b.repo();
    b.register(A, "alice", true);
    s.add_pack(&pack(A, "p1", &[1, 2])).unwrap();
    s.add_pack(&pack(A, "p2", &[3])).unwrap();
    let c = ClientId([0xc; 16]);
    s.add_pack(&pack(c, "p3", &[1])).unwrap();
    let a1 = snapshot(s, A, &[1, 3], 1);
    let a2 = snapshot(s, A, &[2], 2);
    let c1 = snapshot(s, c, &[1], 3);
    let all = s.scrub_packs(0, 10).unwrap();
    let got: Vec<(&str, ClientId, u64, [u8; 32], bool)> = all
        .iter()
        .map(|p| (p.blob.0.as_str(), p.client, p.size, p.sha256, p.damaged))
        .collect();
    assert_eq!(
        got,
        vec![
            ("p1", A, 200, [7; 32], false),
            ("p2", A, 100, [7; 32], false),
            ("p3", c, 100, [7; 32], false),
        ]
    );
    assert!(all[0].id < all[1].id && all[1].id < all[2].id);
    assert_eq!(s.scrub_packs(all[0].id, 1).unwrap(), vec![all[1].clone()]);
    assert!(s.scrub_packs(all[2].id, 10).unwrap().is_empty());
    let (p1, p3) = (all[0].id, all[2].id);
    let damage = s.pack_damage(p1).unwrap().unwrap();
    assert_eq!((damage.objects, damage.object_bytes), (2, 200));
    let snaps: Vec<(u64, ClientId, &str)> = damage
        .snapshots
        .iter()
        .map(|d| (d.id, d.client, d.client_name.as_str()))
        .collect();
    assert_eq!(snaps, vec![(a1, A, "alice"), (a2, A, "alice")]);
    let damage = s.pack_damage(p3).unwrap().unwrap();
    assert_eq!(
        damage
            .snapshots
            .iter()
            .map(|d| (d.id, d.client_name.as_str()))
            .collect::<Vec<_>>(),
        vec![(c1, "")],
        "a client without a row has no name"
    );
    assert_eq!(s.pack_damage(p3 + 1000).unwrap(), None);
    // Marked damaged once: its objects answer missing everywhere.
    let now = SystemTime::now();
    assert!(s.mark_damaged(p1, now).unwrap());
    assert!(!s.mark_damaged(p1, now).unwrap());
    assert!(!s.mark_damaged(p3 + 1000, now).unwrap());
    assert!(s.scrub_packs(0, 1).unwrap()[0].damaged);
    assert_eq!(
        s.held(A, &ids(&[1, 2, 3])).unwrap(),
        vec![None, None, Some(100)]
    );
    assert_eq!(s.locate(A, &ids(&[1])).unwrap(), vec![None]);
    assert_eq!(
        s.stage_refs(StageId::random(), A, true, &ids(&[1, 3]))
            .unwrap(),
        1
    );
    assert!(
        s.pack_usage(SystemTime::now())
            .unwrap()
            .iter()
            .all(|p| p.id != p1),
        "prune leaves a damaged pack to scrub"
    );
    assert_eq!(s.have(c, &ids(&[1])).unwrap(), vec![true]);
    // Stored again: the object moves to the new pack and keeps its row,
    // so the snapshots referencing it are whole again.
    assert_eq!(s.add_pack(&pack(A, "p4", &[2, 1, 3])).unwrap(), 2);
    assert_eq!(
        s.locate(A, &ids(&[1, 2, 3])).unwrap(),
        vec![place("p4", 100), place("p4", 0), place("p2", 0)]
    );
    let healed = s.pack_damage(p1).unwrap().unwrap();
    assert_eq!((healed.objects, healed.snapshots.len()), (0, 0));
    let snaps = s.snapshot_usage(A).unwrap();
    assert_eq!((snaps[0].objects, snaps[1].objects), (2, 1));
}

/// Each check as a test against each backend.
macro_rules! conformance {
    ($($check:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[test]
                fn $check() {
                    super::$check(&super::Sqlite::new());
                }
            )*
        }
        mod postgres {
            $(
                #[test]
                fn $check() {
                    if let Some(b) = super::Pg::new(stringify!($check)) {
                        super::$check(&b);
                    }
                }
            )*
        }
    };
}

conformance!(
    answers_held_objects_in_large_batches_and_touches_them,
    records_a_pack_skipping_objects_already_held_and_touching_them,
    charges_packs_to_the_quota_exactly_at_it_and_refuses_one_byte_over,
    a_clients_own_quota_overrides_the_configured_one,
    counts_usage_per_client_and_per_snapshot,
    commits_staged_references_once_all_are_present,
    refuses_a_commit_for_each_reason_and_drops_the_stage,
    keeps_key_envelopes_by_slot_under_their_rules,
    finds_the_passphrase_envelope_of_a_completed_client_by_name,
    pages_through_recorded_packs_in_byte_order,
    clears_every_stage_at_start_up,
    forgets_snapshots_with_their_references,
    prunes_dead_objects_and_trashes_empty_packs,
    replaces_packs_only_while_every_object_is_where_it_was,
    scrubs_and_heals_damaged_packs,
);

// ---- Races between servers on one PostgreSQL database. ----

#[test]
fn postgres_packs_of_one_client_racing_near_the_quota_never_pass_it_together() {
    let Some(pg) = Pg::new("packs racing near the quota") else {
        return;
    };
    let servers: Vec<Arc<PgMetaStore>> = (0..4).map(|_| Arc::new(pg.another())).collect();
    for round in 0..8u8 {
        // A client of its own each round, with room for three packs of four.
        let client = ClientId([round + 1; 16]);
        pg.register(client, &format!("racer{round}"), true);
        pg.set_quota(client, QuotaSetting::Bytes(1000));
        let start = Arc::new(Barrier::new(servers.len()));
        let racers: Vec<_> = servers
            .iter()
            .enumerate()
            .map(|(i, server)| {
                let server = Arc::clone(server);
                let start = Arc::clone(&start);
                std::thread::spawn(move || {
                    let base = u32::try_from(i).unwrap() * 10;
                    let p = pack(
                        client,
                        &format!("r{round}-{i}"),
                        &[base, base + 1, base + 2],
                    );
                    start.wait();
                    server.add_pack(&p)
                })
            })
            .collect();
        let outcomes: Vec<Result<u32, StorageError>> =
            racers.into_iter().map(|r| r.join().unwrap()).collect();
        let accepted = outcomes.iter().filter(|o| o.is_ok()).count();
        assert_eq!(accepted, 3, "round {round}: {outcomes:?}");
        for refused in outcomes.into_iter().filter_map(Result::err) {
            let (stored, quota, size) = quota_refusal(refused);
            assert_eq!((stored, quota, size), (900, 1000, 300), "round {round}");
        }
        let usage = pg.store.usage(client, None).unwrap();
        assert_eq!((usage.stored, usage.quota), (900, Some(1000)));
        assert_eq!(
            pg.store.recorded_packs(None, 100).unwrap().len(),
            3 * (usize::from(round) + 1)
        );
    }
}

#[test]
fn postgres_a_prune_never_deletes_an_object_a_concurrent_have_answered_held() {
    let Some(pg) = Pg::new("prune racing have") else {
        return;
    };
    const OBJECTS: u32 = 400;
    let (mut answered_held, mut deleted_total) = (0usize, 0u64);
    for round in 0..3u8 {
        let client = ClientId([0x40 + round; 16]);
        // Every object stored long ago, referenced by nothing: dead to the
        // prune unless a "have" touches it first.
        for chunk in (0..OBJECTS).collect::<Vec<_>>().chunks(50) {
            pg.store
                .add_pack(&old_pack(client, &format!("h{round}-{}", chunk[0]), chunk))
                .unwrap();
        }
        let cut = cutoff();
        let servers: Vec<Arc<PgMetaStore>> = (0..3).map(|_| Arc::new(pg.another())).collect();
        let start = Arc::new(Barrier::new(servers.len()));
        // The prune walks the rows upwards, a page at a time.
        let prune = {
            let server = Arc::clone(&servers[0]);
            let start = Arc::clone(&start);
            std::thread::spawn(move || {
                start.wait();
                let mut after = 0;
                let mut deleted = 0;
                while let (n, _, Some(last)) = server.delete_dead(cut, after, 10).unwrap() {
                    deleted += n;
                    after = last;
                }
                deleted
            })
        };
        // Two servers answer "have" from the other end, downwards, for
        // interleaved ids, while the prune runs.
        let askers: Vec<_> = (1..3)
            .map(|k| {
                let server = Arc::clone(&servers[k]);
                let start = Arc::clone(&start);
                std::thread::spawn(move || {
                    start.wait();
                    let mut held = Vec::new();
                    let mine: Vec<u32> = (0..OBJECTS)
                        .rev()
                        .filter(|n| n % 2 == u32::try_from(k - 1).unwrap())
                        .collect();
                    for batch in mine.chunks(7) {
                        let answers = server.held(client, &ids(batch)).unwrap();
                        held.extend(
                            batch
                                .iter()
                                .zip(answers)
                                .filter(|(_, a)| a.is_some())
                                .map(|(n, _)| *n),
                        );
                    }
                    held
                })
            })
            .collect();
        let deleted = prune.join().unwrap();
        let held: Vec<u32> = askers.into_iter().flat_map(|a| a.join().unwrap()).collect();
        // Whatever "have" answered held after the cut-off is still there.
        let still = pg.store.have(client, &ids(&held)).unwrap();
        let lost: Vec<u32> = held
            .iter()
            .zip(&still)
            .filter(|(_, s)| !**s)
            .map(|(n, _)| *n)
            .collect();
        assert!(
            lost.is_empty(),
            "round {round}: deleted after \"have\": {lost:?}"
        );
        // And nothing else was kept: every object is held or deleted.
        assert_eq!(
            held.len() as u64 + deleted,
            u64::from(OBJECTS),
            "round {round}"
        );
        answered_held += held.len();
        deleted_total += deleted;
    }
    // The race was run: both sides won some objects.
    assert!(
        answered_held > 0 && deleted_total > 0,
        "held {answered_held}, deleted {deleted_total}"
    );
}
