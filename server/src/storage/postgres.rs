//! Metadata in PostgreSQL (`--meta postgres://...`), for several servers on
//! one repository (`docs/SCALING.md`).
//!
//! The same two interfaces as SQLite, [`MetaStore`](super::MetaStore)
//! (`postgres/meta.rs`) and [`RepoStore`](super::RepoStore)
//! (`postgres/repo.rs`), over the schema of `postgres/schema.rs`.
//!
//! # Concurrency
//! SQLite orders every write transaction behind one lock, and the rules of
//! the storage (a prune's decisions against "have" and commits, a quota
//! against two packs of one client, one winner of a name) rest on that
//! order. Here several servers write at once, so every transaction runs at
//! `SERIALIZABLE` isolation: PostgreSQL guarantees its outcome is that of
//! some serial order, or aborts it with a serialization failure, which
//! [`transaction!`] retries from the start (up to [`RETRIES`] times, with a
//! short random back-off). Bodies are therefore written as for SQLite and
//! must do nothing but database work, since they may run more than once.
//!
//! # Connections
//! A `deadpool-postgres` pool of `tokio-postgres` connections, driven by a
//! small runtime of this store's own; callers are the server's blocking
//! threads, as for SQLite, and wait without entering any runtime. A
//! connection lost before its transaction committed (a PostgreSQL restart)
//! is replaced and the transaction retried, for up to [`RECONNECT`]; one
//! lost while its commit was on the wire is an error, since whether it
//! committed is unknown (the client's next attempt finds out).

use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::error::SqlState;

use super::StorageError;

mod meta;
mod repo;
mod schema;

pub use schema::SCHEMA_VERSION;

/// Serialization failures retried per transaction before giving up.
pub(super) const RETRIES: u32 = 64;

/// How long a transaction keeps trying while PostgreSQL cannot be reached.
pub(super) const RECONNECT: Duration = Duration::from_secs(30);

/// Connections per server process: the server's blocking threads each
/// hold at most one, and a handful is what a busy server uses.
const POOL_SIZE: usize = 16;

/// The advisory lock of the repository's maintenance (prune, recovery):
/// "bkp-mntn".
const MAINTENANCE_LOCK: i64 = 0x626b_702d_6d6e_746e;

/// Why a transaction body stopped: the database, or a rule of the storage.
#[derive(Debug)]
pub(super) enum Fail {
    Pg(tokio_postgres::Error),
    Storage(StorageError),
}

impl From<tokio_postgres::Error> for Fail {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::Pg(e)
    }
}

impl From<StorageError> for Fail {
    fn from(e: StorageError) -> Self {
        Self::Storage(e)
    }
}

impl Fail {
    pub(super) fn into_storage(self, op: &'static str) -> StorageError {
        match self {
            Self::Pg(e) => pg_error(op, e),
            Self::Storage(e) => e,
        }
    }
}

/// Maps a PostgreSQL error to the storage's kinds.
pub(super) fn pg_error(op: &'static str, e: tokio_postgres::Error) -> StorageError {
    let Some(code) = e.code() else {
        // No SQLSTATE: the connection, not the statement.
        return StorageError::Unavailable {
            op,
            source: e.into(),
        };
    };
    if *code == SqlState::UNIQUE_VIOLATION
        || *code == SqlState::FOREIGN_KEY_VIOLATION
        || *code == SqlState::CHECK_VIOLATION
        || *code == SqlState::T_R_SERIALIZATION_FAILURE
        || *code == SqlState::T_R_DEADLOCK_DETECTED
    {
        StorageError::Conflict {
            op,
            source: e.into(),
        }
    } else if *code == SqlState::DISK_FULL || *code == SqlState::OUT_OF_MEMORY {
        StorageError::Full {
            op,
            what: "metadata".into(),
            source: e.into(),
        }
    } else if code.code().starts_with("08")
        || code.code().starts_with("57P")
        || *code == SqlState::TOO_MANY_CONNECTIONS
    {
        StorageError::Unavailable {
            op,
            source: e.into(),
        }
    } else if code.code().starts_with("22") {
        StorageError::Corrupt(e.to_string())
    } else {
        StorageError::Io {
            op,
            what: "metadata".into(),
            source: e.into(),
        }
    }
}

/// Whether `e` aborted a transaction that may simply run again.
pub(super) fn is_serialization_failure(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| {
        *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED
    })
}

/// Whether `e` says the connection went away (or PostgreSQL is shutting
/// down), so that a transaction that had not committed may run again on a
/// new one.
pub(super) fn is_connection_lost(e: &tokio_postgres::Error) -> bool {
    match e.code() {
        // No SQLSTATE: a closed connection, or an I/O error under it (not,
        // say, a value that did not convert).
        None => {
            e.is_closed()
                || std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>())
        }
        Some(c) => c.code().starts_with("08") || c.code().starts_with("57P"),
    }
}

/// Milliseconds since the epoch (negative before it), as stored.
pub(super) fn millis(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_millis()).map_or(i64::MIN, |m| -m),
    }
}

/// The time `ms` milliseconds after the epoch.
pub(super) fn from_millis(ms: i64) -> SystemTime {
    if ms >= 0 {
        UNIX_EPOCH + Duration::from_millis(ms.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_millis(ms.unsigned_abs())
    }
}

/// A count or size as stored (`bigint`); refused above `i64::MAX`.
pub(super) fn to_i64(n: u64, what: &str) -> Result<i64, StorageError> {
    i64::try_from(n)
        .map_err(|_| StorageError::Corrupt(format!("{what} {n} exceeds the database's range")))
}

/// A stored count or size, which must not be negative.
pub(super) fn to_u64(n: i64, what: &str) -> Result<u64, StorageError> {
    u64::try_from(n).map_err(|_| StorageError::Corrupt(format!("negative {what} {n}")))
}

/// Runs `$body` in a `SERIALIZABLE` transaction of `$store` as `$tx`
/// (a `&tokio_postgres::Transaction`), and commits it. `$body` is the
/// contents of an async block evaluating to `Result<T, Fail>`: `?` works on
/// database and storage errors alike, and `return` ends the body (the
/// transaction still commits on `Ok`). On a serialization failure or a
/// lost connection before the commit, the whole body runs again on a fresh
/// transaction, so it must have no effect outside the database.
macro_rules! transaction {
    ($store:expr, $op:expr, |$tx:ident| $body:block) => {{
        let store: &$crate::storage::postgres::PgMetaStore = $store;
        let op: &'static str = $op;
        store.run(async {
            let started = ::std::time::Instant::now();
            let mut attempt = 0u32;
            loop {
                let mut committing = false;
                let outcome: ::std::result::Result<_, $crate::storage::postgres::Fail> = async {
                    let mut client = store.connection(op).await?;
                    let $tx = client
                        .build_transaction()
                        .isolation_level(::tokio_postgres::IsolationLevel::Serializable)
                        .start()
                        .await?;
                    let value = $crate::storage::postgres::typed(async { $body }).await?;
                    committing = true;
                    $tx.commit().await?;
                    Ok(value)
                }
                .await;
                match outcome {
                    Ok(value) => break Ok(value),
                    Err($crate::storage::postgres::Fail::Pg(e))
                        if store.may_retry(&e, committing, attempt, started) =>
                    {
                        attempt += 1;
                        $crate::storage::postgres::back_off(attempt).await;
                    }
                    Err($crate::storage::postgres::Fail::Storage(
                        $crate::storage::StorageError::Unavailable { .. },
                    )) if started.elapsed() < $crate::storage::postgres::RECONNECT => {
                        attempt += 1;
                        $crate::storage::postgres::back_off(attempt).await;
                    }
                    Err(fail) => break Err(fail.into_storage(op)),
                }
            }
        })
    }};
}
pub(super) use transaction;

/// Pins a body's type to `Result<T, Fail>`, so that `?` inside it knows
/// what to convert to.
pub(super) async fn typed<T>(body: impl Future<Output = Result<T, Fail>>) -> Result<T, Fail> {
    body.await
}

/// Waits a little before the next attempt: a few milliseconds, growing,
/// randomised so that two servers that collided do not collide again.
pub(super) async fn back_off(attempt: u32) {
    let cap = 2u64.saturating_pow(attempt.min(8)).min(250);
    let ms = rand::random::<u64>() % (cap + 1);
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

/// The runtime the pool runs on; dropped with `shutdown_background`, which
/// is allowed on any thread.
struct Driver {
    runtime: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Metadata in a PostgreSQL database, shared by every server of the
/// repository.
pub struct PgMetaStore {
    pool: Pool,
    driver: Driver,
    /// The URL without its password, for messages.
    shown: String,
}

impl std::fmt::Debug for PgMetaStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgMetaStore")
            .field("database", &self.shown)
            .finish_non_exhaustive()
    }
}

/// `url` with any password replaced, for messages and logs.
pub fn redact(url: &str) -> String {
    match url.parse::<tokio_postgres::Config>() {
        Ok(config) => {
            let hosts: Vec<String> = config
                .get_hosts()
                .iter()
                .map(|h| match h {
                    tokio_postgres::config::Host::Tcp(name) => name.clone(),
                    tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
                })
                .collect();
            let ports: Vec<String> = config.get_ports().iter().map(u16::to_string).collect();
            format!(
                "postgres://{}@{}:{}/{}",
                config.get_user().unwrap_or(""),
                hosts.join(","),
                ports.join(","),
                config.get_dbname().unwrap_or("")
            )
        }
        Err(_) => "postgres://(unparsable)".to_owned(),
    }
}

impl PgMetaStore {
    /// Connects to the database at `url` (a libpq-style URL or key=value
    /// string) and brings its schema up to date.
    ///
    /// # Errors
    /// When the URL is invalid, the database cannot be reached, or its
    /// schema is newer than this server's.
    pub fn open(url: &str) -> Result<Self, StorageError> {
        let shown = redact(url);
        let config: tokio_postgres::Config =
            url.parse()
                .map_err(|e: tokio_postgres::Error| StorageError::Unavailable {
                    op: "parse the PostgreSQL URL",
                    source: e.into(),
                })?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("meta-store")
            .enable_all()
            .build()
            .map_err(|e| StorageError::Unavailable {
                op: "start the PostgreSQL client",
                source: e.into(),
            })?;
        let driver = Driver {
            handle: runtime.handle().clone(),
            runtime: Some(runtime),
        };
        let manager = Manager::from_config(
            config,
            tokio_postgres::NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = {
            let _entered = driver.handle.enter();
            Pool::builder(manager)
                .max_size(POOL_SIZE)
                .runtime(deadpool_postgres::Runtime::Tokio1)
                .wait_timeout(Some(Duration::from_secs(60)))
                .create_timeout(Some(Duration::from_secs(10)))
                .build()
                .map_err(|e| StorageError::Unavailable {
                    op: "create the PostgreSQL pool",
                    source: e.to_string().into(),
                })?
        };
        let store = Self {
            pool,
            driver,
            shown,
        };
        store.migrate()?;
        Ok(store)
    }

    /// The database, for messages (no password).
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// Runs `future` on this store's runtime and waits for it, without
    /// entering a runtime on the calling thread's behalf (so any thread may
    /// call, as for SQLite).
    pub(super) fn run<T>(&self, future: impl Future<Output = T>) -> T {
        let _entered = self.driver.handle.enter();
        futures::executor::block_on(future)
    }

    /// A pooled connection.
    pub(super) async fn connection(
        &self,
        op: &'static str,
    ) -> Result<deadpool_postgres::Object, StorageError> {
        self.pool.get().await.map_err(|e| match e {
            deadpool_postgres::PoolError::Backend(e) => pg_error(op, e),
            other => StorageError::Unavailable {
                op,
                source: other.to_string().into(),
            },
        })
    }

    /// Whether a transaction that failed with `e` runs again.
    pub(super) fn may_retry(
        &self,
        e: &tokio_postgres::Error,
        committing: bool,
        attempt: u32,
        started: std::time::Instant,
    ) -> bool {
        if is_serialization_failure(e) {
            return attempt < RETRIES;
        }
        !committing && is_connection_lost(e) && started.elapsed() < RECONNECT
    }

    /// Applies the migrations the database lacks, under an advisory lock.
    fn migrate(&self) -> Result<(), StorageError> {
        const OP: &str = "migrate the PostgreSQL schema";
        self.run(async {
            let mut client = self.connection(OP).await?;
            let tx = client.transaction().await.map_err(|e| pg_error(OP, e))?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&schema::MIGRATION_LOCK])
                .await
                .map_err(|e| pg_error(OP, e))?;
            tx.batch_execute(schema::BOOTSTRAP)
                .await
                .map_err(|e| pg_error(OP, e))?;
            let row = tx
                .query_one("SELECT coalesce(max(version), 0) FROM schema_migrations", &[])
                .await
                .map_err(|e| pg_error(OP, e))?;
            let current: i64 = row.get(0);
            if current > SCHEMA_VERSION {
                return Err(StorageError::Corrupt(format!(
                    "the PostgreSQL schema is at version {current}, newer than this server's {SCHEMA_VERSION}: upgrade the server"
                )));
            }
            for (version, sql) in schema::MIGRATIONS.iter().filter(|(v, _)| *v > current) {
                tx.batch_execute(sql).await.map_err(|e| pg_error(OP, e))?;
                tx.execute(
                    "INSERT INTO schema_migrations (version) VALUES ($1)",
                    &[version],
                )
                .await
                .map_err(|e| pg_error(OP, e))?;
                tracing::info!(version, "PostgreSQL schema migrated");
            }
            tx.commit().await.map_err(|e| pg_error(OP, e))
        })
    }

    /// The value recorded under `key` for the whole repository, recording
    /// `value` first if there is none: of servers racing, the first wins
    /// and every one gets its value.
    ///
    /// # Errors
    /// On a database failure.
    pub fn claim(&self, key: &str, value: &str) -> Result<String, StorageError> {
        transaction!(self, "record a repository setting", |tx| {
            tx.execute(
                "INSERT INTO repository (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
                &[&key, &value],
            )
            .await?;
            let row = tx
                .query_one("SELECT value FROM repository WHERE key = $1", &[&key])
                .await?;
            Ok(row.get::<_, String>(0))
        })
    }

    /// The value recorded under `key`, if any.
    ///
    /// # Errors
    /// On a database failure.
    pub fn recorded(&self, key: &str) -> Result<Option<String>, StorageError> {
        transaction!(self, "read a repository setting", |tx| {
            let row = tx
                .query_opt("SELECT value FROM repository WHERE key = $1", &[&key])
                .await?;
            Ok(row.map(|r| r.get::<_, String>(0)))
        })
    }

    /// Takes the repository's maintenance lock (a session advisory lock
    /// held by a connection of its own, so that prune and recovery on any
    /// server exclude each other): waiting when `wait`, else failing at
    /// once when another server holds it. Released when the hold is dropped
    /// (the connection closes) or the process dies.
    ///
    /// # Errors
    /// When PostgreSQL cannot be reached, or (without `wait`) another
    /// server holds the lock.
    pub fn maintenance_lock(&self, wait: bool) -> Result<RepositoryLock, StorageError> {
        const OP: &str = "take the repository's maintenance lock";
        self.run(async {
            let client = self.connection(OP).await?;
            let client = deadpool_postgres::Object::take(client);
            if wait {
                client
                    .execute("SELECT pg_advisory_lock($1)", &[&MAINTENANCE_LOCK])
                    .await
                    .map_err(|e| pg_error(OP, e))?;
            } else {
                let row = client
                    .query_one("SELECT pg_try_advisory_lock($1)", &[&MAINTENANCE_LOCK])
                    .await
                    .map_err(|e| pg_error(OP, e))?;
                if !row.get::<_, bool>(0) {
                    return Err(StorageError::Unavailable {
                        op: "prune",
                        source: "another server's prune or recovery holds the repository's maintenance lock".into(),
                    });
                }
            }
            Ok(RepositoryLock { _client: client })
        })
    }
}

/// A hold on the repository's maintenance lock (see
/// [`PgMetaStore::maintenance_lock`]).
pub struct RepositoryLock {
    _client: deadpool_postgres::ClientWrapper,
}

impl std::fmt::Debug for RepositoryLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RepositoryLock").finish_non_exhaustive()
    }
}
