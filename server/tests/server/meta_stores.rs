//! One suite of [`MetaStore`] behaviour, run against every backend: SQLite
//! (a database in a temporary directory) and PostgreSQL (a throwaway
//! cluster, one database per test; skipped with a message when PostgreSQL
//! is not installed, unless `BACKUP_TEST_REQUIRE_PG` is set). The last
//! tests race several PostgreSQL stores, as several servers on one
//! repository would.
//!
//! The cluster is shared by the tests that run at the same time and
//! stopped when the last of them ends (a cluster held in a static would
//! outlive the test binary, since statics are never dropped).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Barrier, Mutex, PoisonError, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use backup_test_support::Postgres;
use protocol::crypto::pkcs7_len;
use protocol::message::PublicKeyField;
use protocol::{ClientId, FileName, UserName};
use server::storage::postgres::PgMetaStore;
use server::storage::sqlite::SqliteMetaStore;
use server::storage::{
    BlobKey, Deletion, MetaStore, NewVersion, PendingVersion, QuotaSetting, Registration,
    Retention, StorageError, VersionRecord,
};

// ------------------------------------------------------------- backends

/// The running cluster, while some test holds it.
static CLUSTER: Mutex<Weak<Postgres>> = Mutex::new(Weak::new());

/// The shared cluster, started if no running test holds one; `None` when
/// PostgreSQL is not installed (the skip is printed).
fn cluster(test: &str) -> Option<Arc<Postgres>> {
    let mut shared = CLUSTER.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(pg) = shared.upgrade() {
        return Some(pg);
    }
    let pg = Arc::new(Postgres::start(test)?);
    *shared = Arc::downgrade(&pg);
    Some(pg)
}

/// Where a backend's rows can be reached by SQL of the test's own.
enum Raw {
    Sqlite(PathBuf),
    Pg(String),
}

impl Raw {
    /// `bytes` as a literal of the backend's binary type.
    fn bytes(&self, bytes: &[u8]) -> String {
        match self {
            Self::Sqlite(_) => format!("x'{}'", hex::encode(bytes)),
            Self::Pg(_) => format!("'\\x{}'::bytea", hex::encode(bytes)),
        }
    }

    fn execute(&self, sql: &str) {
        match self {
            Self::Sqlite(path) => rusqlite::Connection::open(path)
                .unwrap()
                .execute_batch(sql)
                .unwrap(),
            Self::Pg(url) => pg_client(url, |c| async move { c.batch_execute(sql).await.unwrap() }),
        }
    }

    /// The one integer `sql` selects.
    fn count(&self, sql: &str) -> i64 {
        match self {
            Self::Sqlite(path) => rusqlite::Connection::open(path)
                .unwrap()
                .query_row(sql, [], |r| r.get(0))
                .unwrap(),
            Self::Pg(url) => pg_client(url, |c| async move {
                c.query_one(sql, &[]).await.unwrap().get::<_, i64>(0)
            }),
        }
    }
}

/// Runs `f` with a connection of its own to the database at `url`.
fn pg_client<T, F>(url: &str, f: impl FnOnce(tokio_postgres::Client) -> F) -> T
where
    F: std::future::Future<Output = T>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .unwrap();
        let driver = tokio::spawn(connection);
        let out = f(client).await;
        driver.abort();
        out
    })
}

/// One backend under test, with what keeps it alive.
struct Backend {
    name: &'static str,
    store: Box<dyn MetaStore>,
    raw: Raw,
    _dir: Option<tempfile::TempDir>,
    _cluster: Option<Arc<Postgres>>,
}

/// A fresh, empty store of every backend available.
fn backends(test: &str) -> Vec<Backend> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("backup.db");
    let mut all = vec![Backend {
        name: "sqlite",
        store: Box::new(SqliteMetaStore::open(&path).unwrap()),
        raw: Raw::Sqlite(path),
        _dir: Some(dir),
        _cluster: None,
    }];
    if let Some(pg) = cluster(test) {
        let url = pg.database();
        all.push(Backend {
            name: "postgres",
            store: Box::new(PgMetaStore::open(&url).unwrap()),
            raw: Raw::Pg(url),
            _dir: None,
            _cluster: Some(pg),
        });
    }
    all
}

/// A fresh database of the shared cluster, for the races; `None` (skip)
/// without PostgreSQL.
fn pg_database(test: &str) -> Option<(Arc<Postgres>, String)> {
    let pg = cluster(test)?;
    let url = pg.database();
    Some((pg, url))
}

// -------------------------------------------------------------- helpers

/// A fixed instant, `ms` milliseconds after a base in 2023.
fn at(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(1_700_000_000_000 + ms)
}

fn id(n: u8) -> ClientId {
    ClientId([n; 16])
}

fn user(name: &str) -> UserName {
    UserName::try_from(name).unwrap()
}

fn file(name: &[u8]) -> FileName {
    FileName::new(name).unwrap()
}

fn key(k: &str) -> BlobKey {
    BlobKey(k.to_owned())
}

fn new_version(client: ClientId, name: &[u8], blob: &str, size: u64, stored: u64) -> NewVersion {
    NewVersion {
        client,
        file: file(name),
        blob: key(blob),
        size,
        content_size: pkcs7_len(size),
        cksum: u32::try_from(size % 0xffff_fff1).unwrap() ^ 0xdead_0000,
        sha256: [u8::try_from(size % 251).unwrap(); 32],
        stored_at: at(stored),
    }
}

fn last(n: u32) -> Retention {
    Retention {
        keep_last: Some(n),
        keep_within: None,
    }
}

/// Registers client `n` named `name` at `at(0)` and completes it.
fn complete_client(store: &dyn MetaStore, n: u8, name: &str) -> ClientId {
    let c = id(n);
    assert_eq!(
        store.register(c, &user(name), at(0)).unwrap(),
        Registration::Created
    );
    assert!(store.complete(c, at(0)).unwrap());
    c
}

/// Records `v` keeping every version.
fn add(store: &dyn MetaStore, v: &NewVersion) -> VersionRecord {
    assert!(store
        .add_version(v, &Retention::KEEP_ALL)
        .unwrap()
        .is_empty());
    store.latest(v.client, &v.file).unwrap().unwrap()
}

fn blobs(versions: &[VersionRecord]) -> Vec<String> {
    versions.iter().map(|v| v.blob.0.clone()).collect()
}

/// `blobs` in key order (the order of dropped blobs is not part of the
/// interface).
fn sorted(mut blobs: Vec<BlobKey>) -> Vec<BlobKey> {
    blobs.sort();
    blobs
}

fn keys(page: &[(BlobKey, u64)]) -> Vec<String> {
    page.iter().map(|(k, _)| k.0.clone()).collect()
}

// ---------------------------------------------------------- registration

#[test]
fn registration_takes_a_free_name_refuses_a_taken_one_and_fails_on_an_id_collision() {
    for b in backends("registration_takes_a_free_name") {
        let (s, n) = (&*b.store, b.name);
        s.probe().expect(n);
        assert_eq!(
            s.register(id(1), &user("alice"), at(5)).unwrap(),
            Registration::Created,
            "{n}"
        );
        let alice = s.client(id(1)).unwrap().expect(n);
        assert_eq!(alice.id, id(1), "{n}");
        assert_eq!(alice.name, user("alice"), "{n}");
        assert_eq!(alice.registered, at(5), "{n}");
        assert_eq!(alice.last_seen, at(5), "{n}");
        assert_eq!(alice.public_key, None, "{n}");
        assert_eq!(alice.secure_key, None, "{n}");
        assert_eq!(alice.completed_at, None, "{n}");
        assert!(!alice.append_only, "{n}");
        assert_eq!(alice.quota, QuotaSetting::Inherit, "{n}");

        // Taken, complete or not, whatever the grace without one.
        assert_eq!(
            s.register(id(2), &user("alice"), at(10_000_000)).unwrap(),
            Registration::NameTaken,
            "{n}"
        );
        assert_eq!(s.client(id(2)).unwrap(), None, "{n}");

        let spki = vec![0x30, 0x59, 7, 7, 7];
        assert_eq!(
            s.register_with_key(id(3), &user("bob"), &spki, at(6))
                .unwrap(),
            Registration::Created,
            "{n}"
        );
        assert_eq!(s.client(id(3)).unwrap().expect(n).secure_key, Some(spki));

        // Another name under an existing id: an error, and nothing changes.
        assert!(s.register(id(1), &user("carol"), at(7)).is_err(), "{n}");
        let names: Vec<UserName> = s
            .clients()
            .unwrap()
            .into_iter()
            .map(|c| c.client.name)
            .collect();
        assert_eq!(names, vec![user("alice"), user("bob")], "{n}");
        assert_eq!(s.client(id(1)).unwrap().expect(n), alice, "{n}");
    }
}

#[test]
fn a_stale_incomplete_name_is_replaced_only_after_the_grace() {
    let grace = Some(Duration::from_secs(60));
    for b in backends("a_stale_incomplete_name_is_replaced") {
        let (s, n) = (&*b.store, b.name);
        assert_eq!(
            s.register(id(1), &user("stale"), at(1_000)).unwrap(),
            Registration::Created
        );
        let reg = |c: u8, name: &str, now: u64, grace: Option<Duration>| {
            s.register_client(id(c), &user(name), None, at(now), grace)
                .unwrap()
        };
        assert_eq!(
            reg(2, "stale", 60_999, grace),
            Registration::NameTaken,
            "{n}"
        );
        // A clock that went back makes nothing stale.
        assert_eq!(reg(2, "stale", 0, grace), Registration::NameTaken, "{n}");
        assert_eq!(
            reg(2, "stale", 1_000_000, None),
            Registration::NameTaken,
            "{n}"
        );
        assert_eq!(
            reg(2, "stale", 61_000, grace),
            Registration::Replaced { stale: id(1) },
            "{n}"
        );
        assert_eq!(s.client(id(1)).unwrap(), None, "{n}");
        let new = s.client(id(2)).unwrap().expect(n);
        assert_eq!(
            (new.name, new.registered),
            (user("stale"), at(61_000)),
            "{n}"
        );

        // A completed client keeps its name however old.
        complete_client(s, 3, "done");
        assert_eq!(
            reg(4, "done", 100_000_000, grace),
            Registration::NameTaken,
            "{n}"
        );
        // So does an incomplete one that holds a file.
        assert_eq!(
            s.register(id(5), &user("filer"), at(0)).unwrap(),
            Registration::Created
        );
        add(s, &new_version(id(5), b"f", "k5", 1, 0));
        assert_eq!(
            reg(6, "filer", 100_000_000, grace),
            Registration::NameTaken,
            "{n}"
        );
        assert!(s.client(id(5)).unwrap().is_some(), "{n}");
    }
}

#[test]
fn complete_and_set_public_key_complete_a_registration_once() {
    for b in backends("complete_and_set_public_key") {
        let (s, n) = (&*b.store, b.name);
        assert!(!s.complete(id(9), at(1)).unwrap(), "{n}");
        s.register(id(1), &user("a"), at(0)).unwrap();
        assert!(s.complete(id(1), at(10)).unwrap(), "{n}");
        assert!(s.complete(id(1), at(20)).unwrap(), "{n}");
        assert_eq!(
            s.client(id(1)).unwrap().expect(n).completed_at,
            Some(at(10))
        );

        let key = PublicKeyField([0x5a; 160]);
        assert!(!s.set_public_key(id(9), &key, at(1)).unwrap(), "{n}");
        s.register(id(2), &user("b"), at(0)).unwrap();
        assert!(s.set_public_key(id(2), &key, at(30)).unwrap(), "{n}");
        let c = s.client(id(2)).unwrap().expect(n);
        assert_eq!(c.public_key, Some(key.clone()), "{n}");
        assert_eq!((c.last_seen, c.completed_at), (at(30), Some(at(30))), "{n}");
        let other = PublicKeyField([0xa5; 160]);
        assert!(s.set_public_key(id(2), &other, at(40)).unwrap(), "{n}");
        let c = s.client(id(2)).unwrap().expect(n);
        assert_eq!(c.public_key, Some(other), "{n}");
        assert_eq!((c.last_seen, c.completed_at), (at(40), Some(at(30))), "{n}");
    }
}

#[test]
fn touch_moves_last_seen_only() {
    for b in backends("touch_moves_last_seen_only") {
        let (s, n) = (&*b.store, b.name);
        s.register(id(1), &user("a"), at(3)).unwrap();
        s.touch(id(1), at(50)).unwrap();
        let c = s.client(id(1)).unwrap().expect(n);
        assert_eq!((c.registered, c.last_seen), (at(3), at(50)), "{n}");
        s.touch(id(2), at(50))
            .expect("touching no client is no error");
        assert_eq!(s.client(id(2)).unwrap(), None, "{n}");
    }
}

// -------------------------------------------------------------- versions

#[test]
fn add_version_records_the_latest_and_applies_retention_unless_append_only() {
    for b in backends("add_version_records_the_latest") {
        let (s, n) = (&*b.store, b.name);
        let a = complete_client(s, 1, "a");
        let big = 5_000_000_000;
        let v1 = add(s, &new_version(a, b"f", "k1", big, 100));
        assert_eq!(v1.client, a, "{n}");
        assert_eq!(v1.file, file(b"f"), "{n}");
        assert_eq!(v1.blob, key("k1"), "{n}");
        assert_eq!(v1.size, big, "{n}");
        assert_eq!(v1.content_size, pkcs7_len(big), "{n}");
        assert_eq!(v1.cksum, new_version(a, b"f", "k1", big, 100).cksum, "{n}");
        assert_eq!(v1.sha256, [u8::try_from(big % 251).unwrap(); 32], "{n}");
        assert!(v1.verified, "{n}");
        assert_eq!(v1.stored_at, at(100), "{n}");
        assert_eq!(s.client(a).unwrap().expect(n).last_seen, at(100), "{n}");

        let v2 = add(s, &new_version(a, b"f", "k2", 2, 200));
        let v3 = add(s, &new_version(a, b"f", "k3", 3, 300));
        assert!(v1.version < v2.version && v2.version < v3.version, "{n}");
        assert_eq!(
            blobs(&s.versions(a, &file(b"f")).unwrap()),
            ["k1", "k2", "k3"]
        );

        // Keep the last two: the two oldest go, and their blobs come back.
        let dropped = s
            .add_version(&new_version(a, b"f", "k4", 4, 400), &last(2))
            .unwrap();
        assert_eq!(sorted(dropped), [key("k1"), key("k2")], "{n}");
        assert_eq!(blobs(&s.versions(a, &file(b"f")).unwrap()), ["k3", "k4"]);

        // Keep within 150 ms of the new version's time.
        let within = Retention {
            keep_last: None,
            keep_within: Some(Duration::from_millis(150)),
        };
        let dropped = s
            .add_version(&new_version(a, b"f", "k5", 5, 500), &within)
            .unwrap();
        assert_eq!(dropped, vec![key("k3")], "{n}");
        assert_eq!(blobs(&s.versions(a, &file(b"f")).unwrap()), ["k4", "k5"]);

        // Another name is left alone.
        add(s, &new_version(a, b"g", "g1", 1, 10));
        let dropped = s
            .add_version(&new_version(a, b"f", "k6", 6, 600), &last(1))
            .unwrap();
        assert_eq!(sorted(dropped), [key("k4"), key("k5")], "{n}");
        assert_eq!(blobs(&s.versions(a, &file(b"g")).unwrap()), ["g1"]);

        // Append-only: retention removes nothing at commit.
        assert!(s.set_append_only(a, true).unwrap(), "{n}");
        let dropped = s
            .add_version(&new_version(a, b"f", "k7", 7, 700), &last(1))
            .unwrap();
        assert!(dropped.is_empty(), "{n}");
        assert_eq!(blobs(&s.versions(a, &file(b"f")).unwrap()), ["k6", "k7"]);

        // An unknown client: an error, and nothing is recorded.
        let before = s.all_versions().unwrap();
        assert!(
            s.add_version(&new_version(id(9), b"f", "x", 1, 1), &Retention::KEEP_ALL)
                .is_err(),
            "{n}"
        );
        assert_eq!(s.all_versions().unwrap(), before, "{n}");
        // A blob key recorded already: an error, nothing recorded.
        assert!(
            s.add_version(&new_version(a, b"h", "k7", 1, 1), &Retention::KEEP_ALL)
                .is_err(),
            "{n}"
        );
        assert_eq!(s.all_versions().unwrap(), before, "{n}");
    }
}

#[test]
fn add_versions_records_a_batch_and_a_failing_member_leaves_the_others() {
    for b in backends("add_versions_records_a_batch") {
        let (s, n) = (&*b.store, b.name);
        let a = complete_client(s, 1, "a");
        add(s, &new_version(a, b"old", "old-1", 1, 10));
        add(s, &new_version(a, b"taken", "taken-1", 1, 10));
        assert!(s.add_versions(&[]).is_empty(), "{n}");

        let pending = |v: NewVersion, retention: Retention, inline: Option<&[u8]>| PendingVersion {
            version: v,
            retention,
            inline: inline.map(<[u8]>::to_vec),
            quota: None,
        };
        let batch = [
            pending(
                new_version(a, b"small", "inline/one", 3, 20),
                Retention::KEEP_ALL,
                Some(b"one"),
            ),
            // Its blob key is recorded already: its inline content must
            // go with the failed row.
            pending(
                new_version(a, b"dup", "taken-1", 3, 20),
                Retention::KEEP_ALL,
                Some(b"two"),
            ),
            pending(new_version(a, b"old", "old-2", 2, 30), last(1), None),
            // No such client.
            pending(
                new_version(id(9), b"x", "orphan", 1, 30),
                Retention::KEEP_ALL,
                None,
            ),
            pending(
                new_version(a, b"small", "inline/three", 5, 40),
                Retention::KEEP_ALL,
                Some(b"three"),
            ),
        ];
        let results = s.add_versions(&batch);
        assert_eq!(results.len(), 5, "{n}");
        assert_eq!(results[0].as_ref().unwrap(), &Vec::<BlobKey>::new(), "{n}");
        assert!(results[1].is_err(), "{n}: {:?}", results[1]);
        assert_eq!(results[2].as_ref().unwrap(), &vec![key("old-1")], "{n}");
        assert!(results[3].is_err(), "{n}: {:?}", results[3]);
        assert!(results[4].is_ok(), "{n}: {:?}", results[4]);
        assert!(
            !matches!(results[1], Err(StorageError::Batch(_))),
            "{n}: one member's failure is its own"
        );

        assert_eq!(
            blobs(&s.versions(a, &file(b"small")).unwrap()),
            ["inline/one", "inline/three"]
        );
        assert_eq!(blobs(&s.versions(a, &file(b"old")).unwrap()), ["old-2"]);
        assert!(s.versions(a, &file(b"dup")).unwrap().is_empty(), "{n}");
        assert!(s.latest(id(9), &file(b"x")).unwrap().is_none(), "{n}");
        assert_eq!(
            s.inline_content(&key("inline/one")).unwrap().as_deref(),
            Some(&b"one"[..])
        );
        assert_eq!(
            s.inline_content(&key("inline/three")).unwrap().as_deref(),
            Some(&b"three"[..])
        );
        assert_eq!(s.inline_content(&key("taken-1")).unwrap(), None, "{n}");
        assert_eq!(
            s.inline_blobs()
                .unwrap()
                .into_iter()
                .collect::<BTreeSet<_>>(),
            BTreeSet::from([(key("inline/one"), 3), (key("inline/three"), 5)]),
            "{n}"
        );
        assert_eq!(s.all_versions().unwrap().len(), 4, "{n}");
    }
}

#[test]
fn inline_content_goes_with_its_row() {
    for b in backends("inline_content_goes_with_its_row") {
        let (s, n) = (&*b.store, b.name);
        let a = complete_client(s, 1, "a");
        let inline = |name: &[u8], k: &str, content: &[u8], t: u64| PendingVersion {
            version: new_version(a, name, k, content.len() as u64, t),
            retention: last(1),
            inline: Some(content.to_vec()),
            quota: None,
        };
        let content = |k: &str| s.inline_content(&key(k)).unwrap();
        assert_eq!(content("inline/none"), None, "{n}");

        // Superseded under retention: the old content goes with its row.
        let r = s.add_versions(&[inline(b"f", "inline/f1", b"first", 1)]);
        assert!(r[0].is_ok(), "{n}");
        let r = s.add_versions(&[inline(b"f", "inline/f2", b"second", 2)]);
        assert_eq!(r[0].as_ref().unwrap(), &vec![key("inline/f1")], "{n}");
        assert_eq!(content("inline/f1"), None, "{n}");
        assert_eq!(content("inline/f2").as_deref(), Some(&b"second"[..]));

        // Deleted with its file.
        assert!(s.add_versions(&[inline(b"g", "inline/g1", b"g", 3)])[0].is_ok());
        assert!(matches!(
            s.delete_file(a, &file(b"g"), false).unwrap(),
            Deletion::Deleted(_)
        ));
        assert_eq!(content("inline/g1"), None, "{n}");

        // Forgotten with its row.
        assert!(s.add_versions(&[inline(b"h", "inline/h1", b"h", 4)])[0].is_ok());
        assert_eq!(s.forget_blobs(&[key("inline/h1")]).unwrap(), 1, "{n}");
        assert_eq!(content("inline/h1"), None, "{n}");

        // Pruned with its row.
        assert!(s.add_versions(&[PendingVersion {
            retention: Retention::KEEP_ALL,
            ..inline(b"f", "inline/f3", b"third", 5)
        }])[0]
            .is_ok());
        let pruned = s.prune(&last(1), at(10)).unwrap();
        assert_eq!(blobs(&pruned), ["inline/f2"], "{n}");
        assert_eq!(content("inline/f2"), None, "{n}");

        // delete_inline removes the content alone (the row stays).
        s.delete_inline(&key("inline/f3")).unwrap();
        assert_eq!(content("inline/f3"), None, "{n}");
        assert_eq!(blobs(&s.versions(a, &file(b"f")).unwrap()), ["inline/f3"]);
        s.delete_inline(&key("inline/f3"))
            .expect("deleting absent content is no error");
        assert!(s.inline_blobs().unwrap().is_empty(), "{n}");
    }
}

#[test]
fn list_pages_versions_in_byte_order_of_names() {
    for b in backends("list_pages_versions_in_byte_order") {
        let (s, n) = (&*b.store, b.name);
        let a = complete_client(s, 1, "a");
        let other = complete_client(s, 2, "other");
        // Recorded in an order that is not the byte order; high bytes
        // (UTF-8 and not) sort after ASCII, capitals before small letters.
        let names: [&[u8]; 7] = [
            b"b",
            "\u{e9}t\u{e9}".as_bytes(),
            b"a/b",
            &[0xff, 0x41],
            b"Z",
            b"a",
            b"B",
        ];
        let mut t = 0;
        for round in 0..2 {
            for (i, name) in names.iter().enumerate() {
                if round == 1 && i % 2 == 1 {
                    continue;
                }
                t += 1;
                add(s, &new_version(a, name, &format!("k{t}"), t, t));
            }
        }
        add(s, &new_version(other, b"A", "other-1", 1, 99));

        let mut sorted: Vec<&[u8]> = names.to_vec();
        sorted.sort();
        let all = s.list(a, true, 0, 1000).unwrap();
        assert_eq!(all.len(), 11, "{n}");
        assert!(all.iter().all(|v| v.client == a), "{n}");
        let order: Vec<(Vec<u8>, i64)> = all
            .iter()
            .map(|v| (v.file.as_bytes().to_vec(), v.version))
            .collect();
        let mut expected = order.clone();
        expected.sort();
        assert_eq!(order, expected, "{n}: ordered by (name bytes, version)");
        let listed_names: Vec<&[u8]> = all.iter().map(|v| v.file.as_bytes()).collect();
        let mut distinct = listed_names.clone();
        distinct.dedup();
        assert_eq!(distinct, sorted, "{n}");

        let newest = s.list(a, false, 0, 1000).unwrap();
        let newest_names: Vec<&[u8]> = newest.iter().map(|v| v.file.as_bytes()).collect();
        assert_eq!(newest_names, sorted, "{n}");
        for v in &newest {
            assert_eq!(
                Some(v),
                s.latest(a, &v.file).unwrap().as_ref(),
                "{n}: the newest of each name"
            );
        }

        // Pages of 3 make up the whole list, in order.
        for (all_versions, whole) in [(true, &all), (false, &newest)] {
            let mut paged = Vec::new();
            let mut offset = 0;
            loop {
                let page = s.list(a, all_versions, offset, 3).unwrap();
                assert!(page.len() <= 3, "{n}");
                if page.is_empty() {
                    break;
                }
                offset += page.len() as u64;
                paged.extend(page);
            }
            assert_eq!(&paged, whole, "{n}");
        }
        assert!(s.list(a, true, 0, 0).unwrap().is_empty(), "{n}");
        assert!(s.list(a, true, 11, 10).unwrap().is_empty(), "{n}");
        assert!(s.list(a, true, u64::MAX, 10).unwrap().is_empty(), "{n}");
        assert_eq!(s.list(a, true, 10, 10).unwrap().len(), 1, "{n}");
        assert!(s.list(id(7), true, 0, 10).unwrap().is_empty(), "{n}");
    }
}

#[test]
fn find_version_finds_by_number_or_the_newest() {
    for b in backends("find_version_finds_by_number") {
        let (s, n) = (&*b.store, b.name);
        let a = complete_client(s, 1, "a");
        let other = complete_client(s, 2, "b");
        let f1 = add(s, &new_version(a, b"f", "f1", 1, 1));
        let g1 = add(s, &new_version(a, b"g", "g1", 1, 2));
        let f2 = add(s, &new_version(a, b"f", "f2", 2, 3));
        let o1 = add(s, &new_version(other, b"f", "o1", 2, 4));
        let find = |c, name: &[u8], v: i64| {
            s.find_version(c, &file(name), u64::try_from(v).unwrap())
                .unwrap()
        };
        assert_eq!(find(a, b"f", 0), Some(f2.clone()), "{n}");
        assert_eq!(find(a, b"f", f1.version), Some(f1.clone()), "{n}");
        assert_eq!(find(a, b"f", f2.version), Some(f2), "{n}");
        assert_eq!(find(a, b"f", g1.version), None, "{n}: another name's");
        assert_eq!(find(a, b"f", o1.version), None, "{n}: another client's");
        assert_eq!(find(other, b"f", o1.version), Some(o1), "{n}");
        assert_eq!(find(a, b"nope", 0), None, "{n}");
        assert_eq!(
            s.find_version(a, &file(b"f"), u64::MAX).unwrap(),
            None,
            "{n}"
        );
        assert_eq!(blobs(&s.versions(a, &file(b"f")).unwrap()), ["f1", "f2"]);
        assert_eq!(
            blobs(&s.all_versions().unwrap()),
            ["f1", "g1", "f2", "o1"],
            "{n}"
        );
    }
}

#[test]
fn delete_file_is_refused_under_append_only_and_removes_every_version_otherwise() {
    for b in backends("delete_file_is_refused_under_append_only") {
        let (s, n) = (&*b.store, b.name);
        let a = complete_client(s, 1, "a");
        let f1 = add(s, &new_version(a, b"f", "f1", 1, 1));
        let f2 = add(s, &new_version(a, b"f", "f2", 2, 2));
        add(s, &new_version(a, b"g", "g1", 3, 3));

        assert_eq!(
            s.delete_file(a, &file(b"f"), true).unwrap(),
            Deletion::Refused,
            "{n}: the server's append-only"
        );
        assert!(!s.set_append_only(id(9), true).unwrap(), "{n}");
        assert!(s.set_append_only(a, true).unwrap(), "{n}");
        assert!(s.client(a).unwrap().expect(n).append_only, "{n}");
        assert_eq!(
            s.delete_file(a, &file(b"f"), false).unwrap(),
            Deletion::Refused,
            "{n}: the client's append-only"
        );
        assert_eq!(s.versions(a, &file(b"f")).unwrap().len(), 2, "{n}");

        assert!(s.set_append_only(a, false).unwrap(), "{n}");
        assert!(!s.client(a).unwrap().expect(n).append_only, "{n}");
        assert_eq!(
            s.delete_file(a, &file(b"f"), false).unwrap(),
            Deletion::Deleted(vec![f1, f2]),
            "{n}"
        );
        assert!(s.versions(a, &file(b"f")).unwrap().is_empty(), "{n}");
        assert_eq!(s.latest(a, &file(b"f")).unwrap(), None, "{n}");
        assert_eq!(
            s.delete_file(a, &file(b"f"), false).unwrap(),
            Deletion::NotFound,
            "{n}"
        );
        assert_eq!(blobs(&s.all_versions().unwrap()), ["g1"], "{n}");
        let summary = &s.clients().unwrap()[0];
        assert_eq!((summary.files, summary.versions), (1, 1), "{n}");
    }
}

#[test]
fn quota_settings_round_trip() {
    for b in backends("quota_settings_round_trip") {
        let (s, n) = (&*b.store, b.name);
        let a = complete_client(s, 1, "a");
        let max = u64::try_from(i64::MAX).unwrap();
        for q in [
            QuotaSetting::Unlimited,
            QuotaSetting::Bytes(0),
            QuotaSetting::Bytes(5_000_000_000),
            QuotaSetting::Bytes(max),
            QuotaSetting::Inherit,
            QuotaSetting::Bytes(1),
        ] {
            assert!(s.set_quota(a, q).unwrap(), "{n}");
            assert_eq!(s.client(a).unwrap().expect(n).quota, q, "{n}");
            assert_eq!(s.clients().unwrap()[0].client.quota, q, "{n}");
        }
        assert!(
            s.set_quota(a, QuotaSetting::Bytes(max + 1)).is_err(),
            "{n}: more than the metadata holds"
        );
        assert_eq!(
            s.client(a).unwrap().expect(n).quota,
            QuotaSetting::Bytes(1),
            "{n}"
        );
        assert!(!s.set_quota(id(9), QuotaSetting::Unlimited).unwrap(), "{n}");
    }
}

#[test]
fn versions_are_charged_to_the_quota_with_their_retention_applied() {
    for b in backends("versions_are_charged_to_the_quota") {
        let (s, n) = (&*b.store, b.name);
        let a = complete_client(s, 1, "a");
        let other = complete_client(s, 2, "b");
        assert!(s.set_quota(a, QuotaSetting::Bytes(300)).unwrap(), "{n}");
        let pending = |v: NewVersion, retention: Retention, quota: Option<u64>| PendingVersion {
            version: v,
            retention,
            inline: None,
            quota,
        };
        let commit = |v: NewVersion, retention: Retention, quota: Option<u64>| {
            s.add_versions(&[pending(v, retention, quota)])
                .pop()
                .unwrap()
                .map(sorted)
        };
        let refused = |r: Result<Vec<BlobKey>, StorageError>| match r {
            Err(StorageError::QuotaExceeded {
                stored,
                quota,
                size,
            }) => (stored, quota, size),
            other => panic!("{n}: not a quota refusal: {other:?}"),
        };
        let keep = Retention::KEEP_ALL;

        // 200, then 100 bytes: exactly at the quota; one byte more is
        // refused and recorded nowhere.
        commit(new_version(a, b"x", "x1", 200, 1), keep, None).expect(n);
        commit(new_version(a, b"y", "y1", 100, 2), keep, None).expect(n);
        assert_eq!(
            refused(commit(new_version(a, b"z", "z1", 1, 3), keep, None)),
            (300, 300, 1),
            "{n}"
        );
        assert!(s.versions(a, &file(b"z")).unwrap().is_empty(), "{n}");
        // Another client is charged its own bytes only.
        commit(new_version(other, b"z", "o1", 1000, 4), keep, Some(1000)).expect(n);

        // A new version of x with retention keeping one: the old one's
        // 200 bytes are given back in the same step. 250 for 200 would
        // end at 350: refused, and the old version stays.
        assert_eq!(
            refused(commit(new_version(a, b"x", "x2", 250, 5), last(1), None)),
            (300, 300, 250),
            "{n}"
        );
        assert_eq!(blobs(&s.versions(a, &file(b"x")).unwrap()), ["x1"], "{n}");
        assert_eq!(
            commit(new_version(a, b"x", "x3", 150, 6), last(1), None).expect(n),
            [key("x1")],
            "{n}"
        );

        // Stores 250; the quota lowered to 100: a version that shrinks
        // what is stored is taken, though still over; one that adds is not.
        assert!(s.set_quota(a, QuotaSetting::Bytes(100)).unwrap(), "{n}");
        commit(new_version(a, b"y", "y2", 50, 7), last(1), None).expect(n);
        assert_eq!(
            refused(commit(new_version(a, b"w", "w1", 1, 8), keep, None)),
            (200, 100, 1),
            "{n}"
        );

        // Deleting a file gives its bytes back: 50 stored, 50 more fit.
        assert!(matches!(
            s.delete_file(a, &file(b"x"), false).unwrap(),
            Deletion::Deleted(_)
        ));
        commit(new_version(a, b"w", "w2", 50, 9), keep, None).expect(n);
        assert_eq!(
            refused(commit(new_version(a, b"v", "v1", 1, 10), keep, None)),
            (100, 100, 1),
            "{n}"
        );

        // With no quota of its own, the configured one applies.
        assert!(s.set_quota(a, QuotaSetting::Inherit).unwrap(), "{n}");
        assert_eq!(
            refused(commit(new_version(a, b"v", "v2", 1, 11), keep, Some(100))),
            (100, 100, 1),
            "{n}"
        );
        commit(new_version(a, b"v", "v3", 1, 12), keep, Some(101)).expect(n);
        assert!(s.set_quota(a, QuotaSetting::Unlimited).unwrap(), "{n}");
        commit(new_version(a, b"v", "v4", 5000, 13), keep, Some(101)).expect(n);

        // In a batch, the members before count: of three 40-byte files
        // against 5101 + 80, the third is refused, with its inline content.
        assert!(
            s.set_quota(a, QuotaSetting::Bytes(5101 + 80)).unwrap(),
            "{n}"
        );
        let inline = |name: &[u8], k: &str, t: u64| PendingVersion {
            inline: Some(vec![7; 40]),
            ..pending(new_version(a, name, k, 40, t), keep, None)
        };
        let results = s.add_versions(&[
            inline(b"i1", "inline/i1", 14),
            inline(b"i2", "inline/i2", 15),
            inline(b"i3", "inline/i3", 16),
        ]);
        assert!(results[0].is_ok() && results[1].is_ok(), "{n}: {results:?}");
        assert!(
            matches!(
                results[2],
                Err(StorageError::QuotaExceeded {
                    stored: 5181,
                    quota: 5181,
                    size: 40
                })
            ),
            "{n}: {results:?}"
        );
        assert_eq!(s.inline_content(&key("inline/i3")).unwrap(), None, "{n}");
        assert_eq!(
            s.inline_content(&key("inline/i2")).unwrap(),
            Some(vec![7; 40]),
            "{n}"
        );
    }
}

#[test]
fn an_upgrade_charges_the_versions_already_held() {
    for b in backends("an_upgrade_charges_the_versions_already_held") {
        let n = b.name;
        let (a, other) = (
            complete_client(&*b.store, 1, "a"),
            complete_client(&*b.store, 2, "b"),
        );
        for v in [
            new_version(a, b"f", "a1", 100, 1),
            new_version(a, b"f", "a2", 23, 2),
            new_version(a, b"g", "a3", 4, 3),
            new_version(other, b"f", "b1", 7, 4),
        ] {
            add(&*b.store, &v);
        }
        drop(b.store);
        // What the schema before the charge left: no column, no trigger.
        let reopened: Box<dyn MetaStore> = match &b.raw {
            Raw::Sqlite(path) => {
                b.raw.execute(
                    "DROP TRIGGER versions_charge; DROP TRIGGER versions_refund;
                     ALTER TABLE clients DROP COLUMN version_bytes; PRAGMA user_version = 9;",
                );
                Box::new(SqliteMetaStore::open(path).unwrap())
            }
            Raw::Pg(url) => {
                b.raw.execute(
                    "DROP TRIGGER versions_charge ON versions; DROP FUNCTION versions_charge();
                     ALTER TABLE clients DROP COLUMN version_bytes;
                     DELETE FROM schema_migrations WHERE version = 2;",
                );
                Box::new(PgMetaStore::open(url).unwrap())
            }
        };
        let charged = |c: ClientId| {
            b.raw.count(&format!(
                "SELECT version_bytes FROM clients WHERE id = {}",
                b.raw.bytes(&c.0)
            ))
        };
        assert_eq!((charged(a), charged(other)), (127, 7), "{n}");
        // From there on, every change keeps it.
        add(&*reopened, &new_version(a, b"g", "a4", 10, 5));
        assert_eq!(charged(a), 137, "{n}");
        assert!(matches!(
            reopened.delete_file(a, &file(b"f"), false).unwrap(),
            Deletion::Deleted(_)
        ));
        assert_eq!((charged(a), charged(other)), (14, 7), "{n}");
        drop(reopened);
    }
}

#[test]
fn clients_lists_every_client_with_its_totals_by_name() {
    for b in backends("clients_lists_every_client") {
        let (s, n) = (&*b.store, b.name);
        let zed = complete_client(s, 1, "zed");
        let amy = complete_client(s, 2, "amy");
        s.register(id(3), &user("Bob"), at(0)).unwrap();
        add(s, &new_version(zed, b"f", "f1", 3_000_000_000, 1));
        add(s, &new_version(zed, b"f", "f2", 4_000_000_000, 2));
        add(s, &new_version(zed, b"g", "g1", 5, 3));
        add(s, &new_version(amy, b"f", "a1", 7, 4));
        let all = s.clients().unwrap();
        let summary: Vec<(UserName, u64, u64, u64)> = all
            .iter()
            .map(|c| (c.client.name.clone(), c.files, c.versions, c.bytes))
            .collect();
        assert_eq!(
            summary,
            vec![
                (user("Bob"), 0, 0, 0),
                (user("amy"), 1, 1, 7),
                (user("zed"), 2, 3, 7_000_000_005),
            ],
            "{n}"
        );
        assert_eq!(all[2].client, s.client(zed).unwrap().expect(n), "{n}");
    }
}

#[test]
fn prune_applies_retention_to_every_name_of_every_client() {
    for b in backends("prune_applies_retention") {
        let (s, n) = (&*b.store, b.name);
        let a = complete_client(s, 1, "a");
        let c = complete_client(s, 2, "c");
        assert!(s.set_append_only(a, true).unwrap());
        for (client, name) in [(a, b"f"), (a, b"g"), (c, b"f")] {
            for i in 0..3u64 {
                let k = format!("{}-{}-{i}", client.0[0], name[0]);
                add(s, &new_version(client, name, &k, i, i * 1000));
            }
        }
        assert!(s.prune(&Retention::KEEP_ALL, at(0)).unwrap().is_empty());
        assert_eq!(s.all_versions().unwrap().len(), 9, "{n}");

        // Within 2 s of 3 s: the versions of 1 s and 2 s stay.
        let within = Retention {
            keep_last: None,
            keep_within: Some(Duration::from_millis(2000)),
        };
        let removed = s.prune(&within, at(3000)).unwrap();
        let mut gone = blobs(&removed);
        gone.sort();
        assert_eq!(gone, ["1-102-0", "1-103-0", "2-102-0"], "{n}");

        // Keep one: the append-only client too.
        let removed = s.prune(&last(1), at(3000)).unwrap();
        let mut gone = blobs(&removed);
        gone.sort();
        assert_eq!(gone, ["1-102-1", "1-103-1", "2-102-1"], "{n}");
        let mut left = blobs(&s.all_versions().unwrap());
        left.sort();
        assert_eq!(left, ["1-102-2", "1-103-2", "2-102-2"], "{n}");
        assert!(s.prune(&last(1), at(3000)).unwrap().is_empty(), "{n}");
    }
}

#[test]
fn remove_client_takes_its_versions_and_repository_rows_and_nothing_else() {
    for b in backends("remove_client_takes_its_versions") {
        let (s, n) = (&*b.store, b.name);
        assert_eq!(s.remove_client(id(9)).unwrap(), None, "{n}");
        let a = complete_client(s, 1, "a");
        let c = complete_client(s, 2, "c");
        let a1 = add(s, &new_version(a, b"f", "a1", 1, 1));
        let r = s.add_versions(&[PendingVersion {
            version: new_version(a, b"g", "inline/a2", 2, 2),
            retention: Retention::KEEP_ALL,
            inline: Some(b"a2".to_vec()),
            quota: None,
        }]);
        assert!(r[0].is_ok(), "{n}");
        let a2 = s.latest(a, &file(b"g")).unwrap().expect(n);
        let c1 = add(s, &new_version(c, b"f", "c1", 1, 3));

        // Repository rows of both clients, and of an id with no client.
        let nobody = id(9);
        for (who, tag) in [(a, "a"), (c, "c"), (nobody, "n")] {
            let x = b.raw.bytes(&who.0);
            let sha = b.raw.bytes(&[1; 32]);
            let oid = b.raw.bytes(&[2; 32]);
            b.raw.execute(&format!(
                "INSERT INTO packs (client, blob, size, sha256, stored_at)
                     VALUES ({x}, 'pack-{tag}', 10, {sha}, 1);
                 INSERT INTO objects (client, oid, pack, pack_offset, len, touched)
                     SELECT {x}, {oid}, id, 0, 10, 1 FROM packs WHERE blob = 'pack-{tag}';
                 INSERT INTO snapshots (client, time, meta, committed_at)
                     VALUES ({x}, 1, {sha}, 1);
                 INSERT INTO snapshot_refs (snapshot, object)
                     SELECT s.id, o.id FROM snapshots s, objects o
                     WHERE s.client = {x} AND o.client = {x};
                 INSERT INTO key_envelopes (client, slot, envelope, stored_at)
                     VALUES ({x}, 0, {sha}, 1);"
            ));
        }
        let rows_of = |who: ClientId| {
            let x = b.raw.bytes(&who.0);
            b.raw.count(&format!(
                "SELECT (SELECT count(*) FROM packs WHERE client = {x})
                      + (SELECT count(*) FROM objects WHERE client = {x})
                      + (SELECT count(*) FROM snapshots WHERE client = {x})
                      + (SELECT count(*) FROM key_envelopes WHERE client = {x})"
            ))
        };
        let refs = || b.raw.count("SELECT count(*) FROM snapshot_refs");
        assert_eq!((rows_of(a), rows_of(c), refs()), (4, 4, 3), "{n}");

        // No such client: nothing goes, not even rows under its id.
        assert_eq!(s.remove_client(nobody).unwrap(), None, "{n}");
        assert_eq!((rows_of(nobody), refs()), (4, 3), "{n}");

        assert_eq!(s.remove_client(a).unwrap(), Some(vec![a1, a2]), "{n}");
        assert_eq!(s.client(a).unwrap(), None, "{n}");
        assert_eq!(s.inline_content(&key("inline/a2")).unwrap(), None, "{n}");
        assert_eq!((rows_of(a), rows_of(c), refs()), (0, 4, 2), "{n}");
        assert_eq!(s.all_versions().unwrap(), vec![c1], "{n}");
        assert!(s.client(c).unwrap().is_some(), "{n}");
        assert_eq!(s.remove_client(a).unwrap(), None, "{n}");
        // The name is free again.
        assert_eq!(
            s.register(id(4), &user("a"), at(5)).unwrap(),
            Registration::Created,
            "{n}"
        );
    }
}

// ------------------------------------------------------------ blob paging

#[test]
fn recorded_and_inline_blobs_page_in_byte_order_of_keys() {
    for b in backends("recorded_and_inline_blobs_page") {
        let (s, n) = (&*b.store, b.name);
        let a = complete_client(s, 1, "a");
        // Byte order: capitals, '_', small letters, '~'.
        let plain = ["k~", "kb", "kB", "k_", "ka", "kZ", "k-"];
        for (i, k) in plain.iter().enumerate() {
            let i = i as u64;
            add(
                s,
                &new_version(a, format!("f{i}").as_bytes(), k, 100 + i, i),
            );
        }
        let small = ["inline/b", "inline/Z", "inline/~", "inline/a", "inline/_"];
        for (i, k) in small.iter().enumerate() {
            let content = vec![b'x'; i + 1];
            let r = s.add_versions(&[PendingVersion {
                version: new_version(a, format!("s{i}").as_bytes(), k, i as u64 + 1, 50),
                retention: Retention::KEEP_ALL,
                inline: Some(content),
                quota: None,
            }]);
            assert!(r[0].is_ok(), "{n}");
        }

        let mut expected: Vec<(String, u64)> = plain
            .iter()
            .enumerate()
            .map(|(i, k)| ((*k).to_owned(), 100 + i as u64))
            .chain(
                small
                    .iter()
                    .enumerate()
                    .map(|(i, k)| ((*k).to_owned(), i as u64 + 1)),
            )
            .collect();
        expected.sort_by(|x, y| x.0.as_bytes().cmp(y.0.as_bytes()));
        let mut expected_inline: Vec<(String, u64)> = expected
            .iter()
            .filter(|(k, _)| k.starts_with("inline/"))
            .cloned()
            .collect();
        expected_inline.sort_by(|x, y| x.0.as_bytes().cmp(y.0.as_bytes()));

        type Page<'a> = &'a dyn Fn(Option<&BlobKey>, usize) -> Vec<(BlobKey, u64)>;
        let recorded = |after: Option<&BlobKey>, limit| s.recorded_blobs(after, limit).unwrap();
        let inline = |after: Option<&BlobKey>, limit| s.inline_blobs_after(after, limit).unwrap();
        for (page, whole) in [
            (&recorded as Page<'_>, &expected),
            (&inline as Page<'_>, &expected_inline),
        ] {
            let mut paged: Vec<(String, u64)> = Vec::new();
            let mut after: Option<BlobKey> = None;
            loop {
                let next = page(after.as_ref(), 2);
                assert!(next.len() <= 2, "{n}");
                let Some((last_key, _)) = next.last() else {
                    break;
                };
                after = Some(last_key.clone());
                paged.extend(next.into_iter().map(|(k, size)| (k.0, size)));
            }
            assert_eq!(&paged, whole, "{n}");
            assert_eq!(
                keys(&page(None, 1000)),
                whole.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>(),
                "{n}"
            );
            assert!(page(None, 0).is_empty(), "{n}");
        }
        let mut all_inline = s.inline_blobs().unwrap();
        all_inline.sort();
        let mut want: Vec<(BlobKey, u64)> = expected_inline
            .iter()
            .map(|(k, len)| (key(k), *len))
            .collect();
        want.sort();
        assert_eq!(all_inline, want, "{n}");
    }
}

#[test]
fn forget_blobs_forgets_their_versions_and_counts_them() {
    for b in backends("forget_blobs_forgets") {
        let (s, n) = (&*b.store, b.name);
        let a = complete_client(s, 1, "a");
        add(s, &new_version(a, b"f", "f1", 1, 1));
        add(s, &new_version(a, b"f", "f2", 1, 2));
        add(s, &new_version(a, b"g", "g1", 1, 3));
        assert_eq!(s.forget_blobs(&[]).unwrap(), 0, "{n}");
        assert_eq!(
            s.forget_blobs(&[key("f2"), key("unknown"), key("g1"), key("f2")])
                .unwrap(),
            2,
            "{n}"
        );
        assert_eq!(blobs(&s.all_versions().unwrap()), ["f1"], "{n}");
        assert_eq!(
            s.latest(a, &file(b"f")).unwrap().map(|v| v.blob),
            Some(key("f1")),
            "{n}"
        );
        assert_eq!(s.forget_blobs(&[key("f2")]).unwrap(), 0, "{n}");
    }
}

// ----------------------------------------------------------------- races

/// How many stores race, as that many servers on one database.
const RACERS: usize = 8;

#[test]
fn racing_registrations_on_separate_servers_give_one_winner() {
    let Some((_pg, url)) = pg_database("racing_registrations") else {
        return;
    };
    let stores: Vec<Arc<PgMetaStore>> = (0..RACERS)
        .map(|_| Arc::new(PgMetaStore::open(&url).unwrap()))
        .collect();
    let race = |name: &'static str, grace: Option<Duration>, first: u8| {
        let barrier = Arc::new(Barrier::new(RACERS));
        let threads: Vec<_> = stores
            .iter()
            .enumerate()
            .map(|(i, store)| {
                let store = Arc::clone(store);
                let barrier = Arc::clone(&barrier);
                let c = id(first + u8::try_from(i).unwrap());
                std::thread::spawn(move || {
                    barrier.wait();
                    let outcome = store
                        .register_client(c, &user(name), None, at(100_000), grace)
                        .unwrap();
                    (c, outcome)
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect::<Vec<_>>()
    };

    // A free name.
    let outcomes = race("free", None, 10);
    let winners: Vec<ClientId> = outcomes
        .iter()
        .filter(|(_, o)| *o == Registration::Created)
        .map(|(c, _)| *c)
        .collect();
    assert_eq!(winners.len(), 1, "{outcomes:?}");
    assert!(
        outcomes
            .iter()
            .all(|(c, o)| *o == Registration::NameTaken || *c == winners[0]),
        "{outcomes:?}"
    );
    let listed = stores[0].clients().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].client.id, winners[0]);

    // A stale name: one replaces it, the rest find it taken by the winner.
    stores[0].register(id(1), &user("stale"), at(0)).unwrap();
    let outcomes = race("stale", Some(Duration::from_secs(60)), 30);
    let winners: Vec<ClientId> = outcomes
        .iter()
        .filter(|(_, o)| *o == Registration::Replaced { stale: id(1) })
        .map(|(c, _)| *c)
        .collect();
    assert_eq!(winners.len(), 1, "{outcomes:?}");
    assert!(
        outcomes
            .iter()
            .all(|(c, o)| *o == Registration::NameTaken || *c == winners[0]),
        "{outcomes:?}"
    );
    assert_eq!(stores[0].client(id(1)).unwrap(), None);
    let holder: Vec<ClientId> = stores[0]
        .clients()
        .unwrap()
        .into_iter()
        .filter(|c| c.client.name == user("stale"))
        .map(|c| c.client.id)
        .collect();
    assert_eq!(holder, winners);
}

#[test]
fn concurrent_commits_on_one_file_from_several_servers_lose_no_version() {
    let Some((_pg, url)) = pg_database("concurrent_commits_on_one_file") else {
        return;
    };
    const EACH: usize = 10;
    let stores: Vec<Arc<PgMetaStore>> = (0..RACERS / 2)
        .map(|_| Arc::new(PgMetaStore::open(&url).unwrap()))
        .collect();
    let a = complete_client(&*stores[0], 1, "a");
    // Each server commits EACH versions of `name`; returns the blobs it
    // committed and those retention dropped.
    let commit_all = |name: &'static [u8], retention: Retention| {
        let barrier = Arc::new(Barrier::new(stores.len()));
        let threads: Vec<_> = stores
            .iter()
            .enumerate()
            .map(|(i, store)| {
                let store = Arc::clone(store);
                let barrier = Arc::clone(&barrier);
                std::thread::spawn(move || {
                    barrier.wait();
                    let mut committed = Vec::new();
                    let mut dropped = Vec::new();
                    for j in 0..EACH {
                        let k = format!("{}-{i}-{j}", String::from_utf8_lossy(name));
                        let v = new_version(a, name, &k, 1, (i * EACH + j) as u64);
                        dropped.extend(store.add_version(&v, &retention).unwrap());
                        committed.push(key(&k));
                    }
                    (committed, dropped)
                })
            })
            .collect();
        let mut committed = BTreeSet::new();
        let mut dropped = Vec::new();
        for t in threads {
            let (c, d) = t.join().unwrap();
            committed.extend(c);
            dropped.extend(d);
        }
        (committed, dropped)
    };

    let (committed, dropped) = commit_all(b"every", Retention::KEEP_ALL);
    assert!(dropped.is_empty());
    let kept: BTreeSet<BlobKey> = stores[0]
        .versions(a, &file(b"every"))
        .unwrap()
        .into_iter()
        .map(|v| v.blob)
        .collect();
    assert_eq!(kept.len(), stores.len() * EACH);
    assert_eq!(kept, committed);

    // Keeping the last 3: every version is either kept or reported
    // dropped, exactly once.
    let (committed, dropped) = commit_all(b"three", last(3));
    let kept: Vec<BlobKey> = stores[0]
        .versions(a, &file(b"three"))
        .unwrap()
        .into_iter()
        .map(|v| v.blob)
        .collect();
    assert_eq!(kept.len(), 3, "{kept:?}");
    let dropped_set: BTreeSet<BlobKey> = dropped.iter().cloned().collect();
    assert_eq!(
        dropped_set.len(),
        dropped.len(),
        "dropped twice: {dropped:?}"
    );
    let mut accounted: BTreeSet<BlobKey> = dropped_set;
    for k in &kept {
        assert!(accounted.insert(k.clone()), "{k:?} kept and dropped");
    }
    assert_eq!(accounted, committed);
}

/// Versions of one client committed at once by several stores (servers,
/// or operator processes on one SQLite file) near its quota: never more
/// than the quota is recorded, and every refusal is a quota refusal.
#[test]
fn versions_of_one_client_racing_near_the_quota_never_pass_it_together() {
    const EACH: usize = 6;
    const SIZE: u64 = 100;
    const QUOTA: u64 = 1_000;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("backup.db");
    let mut backends: Vec<(&str, Vec<Arc<dyn MetaStore>>)> = vec![(
        "sqlite",
        (0..4)
            .map(|_| Arc::new(SqliteMetaStore::open(&path).unwrap()) as Arc<dyn MetaStore>)
            .collect(),
    )];
    let pg = pg_database("versions_of_one_client_racing_near_the_quota");
    if let Some((_, url)) = &pg {
        backends.push((
            "postgres",
            (0..4)
                .map(|_| Arc::new(PgMetaStore::open(url).unwrap()) as Arc<dyn MetaStore>)
                .collect(),
        ));
    }
    for (n, stores) in backends {
        let a = complete_client(&*stores[0], 1, "a");
        assert!(stores[0].set_quota(a, QuotaSetting::Bytes(QUOTA)).unwrap());
        let barrier = Arc::new(Barrier::new(stores.len()));
        let threads: Vec<_> = stores
            .iter()
            .enumerate()
            .map(|(i, store)| {
                let store = Arc::clone(store);
                let barrier = Arc::clone(&barrier);
                std::thread::spawn(move || {
                    barrier.wait();
                    (0..EACH)
                        .map(|j| {
                            let name = format!("f-{i}-{j}");
                            let v = new_version(a, name.as_bytes(), &name, SIZE, j as u64);
                            let pending = PendingVersion {
                                version: v,
                                retention: Retention::KEEP_ALL,
                                inline: None,
                                quota: None,
                            };
                            store.add_versions(&[pending]).pop().unwrap()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let results: Vec<_> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        let stored = results.iter().filter(|r| r.is_ok()).count() as u64;
        for r in &results {
            if let Err(e) = r {
                assert!(
                    matches!(e, StorageError::QuotaExceeded { quota: QUOTA, .. }),
                    "{n}: {e}"
                );
            }
        }
        assert_eq!(
            stored * SIZE,
            QUOTA,
            "{n}: every version that fits is taken"
        );
        let summary = &stores[0].clients().unwrap()[0];
        assert_eq!((summary.versions, summary.bytes), (stored, QUOTA), "{n}");
    }
    drop(pg);
}

// ---------------------------------------------------------- readiness

/// A database that accepts but never answers makes the probe fail within
/// its bound (instead of holding the readiness check for ever), and the
/// probe succeeds again once the database answers.
#[test]
fn the_probe_of_a_hung_database_fails_within_its_bound_and_recovers() {
    // A cluster of its own: it is frozen, which would stall other tests.
    let Some(pg) = Postgres::start("the_probe_of_a_hung_database") else {
        return;
    };
    let store = Arc::new(PgMetaStore::open(&pg.database()).unwrap());
    store.probe().expect("a live database is ready");
    pg.pause();
    let (tx, rx) = std::sync::mpsc::channel();
    let probing = Arc::clone(&store);
    let started = std::time::Instant::now();
    std::thread::spawn(move || {
        let _ = tx.send(probing.probe());
    });
    let outcome = rx.recv_timeout(Duration::from_secs(60));
    let waited = started.elapsed();
    pg.resume();
    let outcome = outcome.expect("the probe of a hung database returned");
    assert!(
        matches!(outcome, Err(StorageError::Unavailable { .. })),
        "a hung database is not ready: {outcome:?}"
    );
    assert!(
        waited >= Duration::from_secs(4),
        "it waited for an answer first: {waited:?}"
    );
    store
        .probe()
        .expect("ready again once the database answers");
}
