//! Command-line flags; each has an environment variable of the same meaning.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::{parse_duration, parse_grace};

/// Backup server: secure mode (TLS 1.3) by default, the legacy version 3
/// protocol on a separate listener when asked, and operator commands.
///
/// With no subcommand it serves (see `backup-server serve --help`). The
/// operator commands work on the same data directory, also while a server
/// runs on it.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "backup-server",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// How log lines are written on standard error: `text` for people, or
    /// `json`, one object a line, for log shippers; after the subcommand
    /// when there is one. Verbosity follows `RUST_LOG` (default `info`)
    /// [default: text]
    #[arg(
        long,
        global = true,
        value_enum,
        env = "BACKUP_SERVER_LOG_FORMAT",
        value_name = "FORMAT"
    )]
    pub log_format: Option<LogFormat>,
    /// Serving flags, when no subcommand is given.
    #[command(flatten)]
    pub serve: Args,
}

/// A subcommand.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Serve clients (the default).
    Serve(Box<Args>),
    /// Resolve the settings as `serve` would (flags, environment, config
    /// file, port.info, defaults), print them, and exit: 0 when they are
    /// valid, 1 with the reason when one is not. Nothing is bound or
    /// written.
    CheckConfig(Box<Args>),
    /// Print a shell completion script: bash, zsh, fish, elvish or
    /// powershell.
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), or write one page per command into a
    /// directory with --out.
    Man {
        /// Write backup-server.1 and a page per command
        /// (backup-server-serve.1, ...) into DIR.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
    /// List clients: snapshots, stored bytes (what the quota is charged),
    /// logical bytes (each snapshot's objects, once per snapshot), dedup
    /// ratio, quota, last backup, per-file files/versions/bytes,
    /// append-only, last seen.
    Clients {
        /// One JSON array, sizes in bytes.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// List one client's snapshots: id, time, objects referenced, logical
    /// bytes, bytes no other snapshot references, commit time.
    Snapshots {
        /// Client id (32 hex digits) or name.
        client: String,
        /// One JSON array, sizes in bytes.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Show a client's quota of the snapshot repository, or set its own:
    /// a size (bytes, or binary units: 500M, 50G, 1.5T), `none` (no quota
    /// whatever the config file says), or `default` (the config file's
    /// `quota` applies again). Takes effect at once, also on a running
    /// server.
    Quota {
        /// Client id (32 hex digits) or name.
        client: String,
        /// SIZE, none or default; without it, the quota is shown.
        #[arg(value_parser = parse_quota_setting, value_name = "SIZE|none|default")]
        value: Option<crate::storage::QuotaSetting>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// List one client's files (the newest version of each, or every version).
    Files {
        /// Client id (32 hex digits) or name.
        client: String,
        /// Every version, not only the newest of each name.
        #[arg(long)]
        versions: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Remove the versions the retention rules do not keep, for every client
    /// (append-only ones included; the newest version of a name always
    /// stays; without flags, the rules of the config file apply, and
    /// without any rule no version is removed). Then collect the snapshot
    /// repository's garbage: objects no snapshot references, packs left
    /// empty, packs mostly dead repacked. Safe beside a running server.
    Prune {
        /// Keep the N newest versions of each name.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        keep_last: Option<u32>,
        /// Keep versions stored within this long (e.g. 30d, 12h).
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        keep_within: Option<Duration>,
        /// Keep the newest snapshot of each of the N newest hours that have
        /// one (and likewise days, weeks from Monday, months, years; UTC).
        /// Snapshot rules given here apply to every client; without them
        /// the config file's [clients.NAME] and [snapshots] tables do, and
        /// else --keep-last / --keep-within (or keep_last / keep_within)
        #[arg(long, value_name = "N")]
        keep_hourly: Option<u32>,
        #[arg(long, value_name = "N")]
        keep_daily: Option<u32>,
        #[arg(long, value_name = "N")]
        keep_weekly: Option<u32>,
        #[arg(long, value_name = "N")]
        keep_monthly: Option<u32>,
        #[arg(long, value_name = "N")]
        keep_yearly: Option<u32>,
        /// Say what would be removed and reclaimed; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Objects stored or answered "have" within this long are kept
        /// even when no snapshot references them (a backup may still be
        /// running); 0s keeps only what was touched since the prune began.
        #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_grace)]
        grace: Duration,
        /// Repack a pack when at least this percentage of its bytes is
        /// garbage.
        #[arg(long, value_name = "PERCENT", default_value_t = 50, value_parser = clap::value_parser!(u8).range(1..=100))]
        repack_threshold: u8,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Remove a client with every file, version and blob.
    RemoveClient {
        /// Client id (32 hex digits) or name.
        client: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Print the SHA-256 fingerprint of the server's TLS certificate, the
    /// value clients pin (`backup-client register --server-fingerprint`).
    Fingerprint {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Re-read every stored version and check its size, cksum and SHA-256
    /// against those recorded at commit, then every repository pack against
    /// the length and SHA-256 recorded at upload (no keys needed). One line
    /// per version and per pack (a damaged pack with its objects and the
    /// snapshots that reference them), then a summary; the exit status is 1
    /// when anything is damaged or missing.
    Scrub {
        /// Mark each damaged or missing pack so that its objects are
        /// answered missing: the client's next backup uploads them again,
        /// which makes the snapshots that reference them whole again.
        #[arg(long)]
        repair: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Turn a client's append-only flag on or off.
    AppendOnly {
        /// Client id (32 hex digits) or name.
        client: String,
        state: Switch,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

/// `SIZE`, `none` or `default`, as `backup-server quota` takes them.
fn parse_quota_setting(text: &str) -> Result<crate::storage::QuotaSetting, String> {
    use crate::storage::QuotaSetting;
    match text.trim().to_ascii_lowercase().as_str() {
        "none" => Ok(QuotaSetting::Unlimited),
        "default" => Ok(QuotaSetting::Inherit),
        _ => crate::storage::quota::parse_size(text).map(QuotaSetting::Bytes),
    }
}

/// The format of log lines.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One line of text per event, for people.
    #[default]
    Text,
    /// One JSON object per event (with its span's fields: `peer`, `mode`,
    /// `client_id`), for log shippers.
    Json,
}

/// `on` or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Switch {
    On,
    Off,
}

/// Where an operator command finds the data.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct AdminArgs {
    /// Directory of the metadata database and the stored files.
    #[arg(long, env = "BACKUP_SERVER_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// TOML file of the server (its `data_dir`, `blob_store`,
    /// `s3_endpoint`, `meta`, retention rules and quotas are used).
    #[arg(long, env = "BACKUP_SERVER_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Where file contents are kept: `local` (under the data directory,
    /// the default) or `s3://BUCKET/PREFIX` (an S3 bucket; credentials from
    /// the `AWS_*` environment variables). The database and the server's
    /// identity stay in the data directory either way.
    #[arg(
        long,
        env = "BACKUP_SERVER_BLOB_STORE",
        value_name = "local|s3://BUCKET/PREFIX"
    )]
    pub blob_store: Option<String>,

    /// URL of an S3-compatible service for `--blob-store s3://...`, e.g.
    /// `http://127.0.0.1:8333` [default: AWS S3].
    #[arg(long, env = "BACKUP_SERVER_S3_ENDPOINT", value_name = "URL")]
    pub s3_endpoint: Option<String>,

    /// Where the metadata is kept: `sqlite` (`backup.db` in the data
    /// directory, the default) or a PostgreSQL URL
    /// (`postgres://USER@HOST:PORT/DATABASE`), which several servers may
    /// share (docs/SCALING.md). A password is best given in `PGPASSWORD`.
    #[arg(long, env = "BACKUP_SERVER_META", value_name = "sqlite|postgres://...")]
    pub meta: Option<String>,
}

/// Backup server: secure mode (TLS 1.3, pinned server identity, clients
/// prove their keys) on the main listener; the legacy version 3 protocol,
/// which is insecure, only on `--legacy-listen`.
///
/// With no options it serves secure mode on port 1256 (or the port in
/// `./port.info`) on every interface, keeping its data under
/// `$XDG_DATA_HOME/backup-server`
/// (or `~/.local/share/backup-server`, or `./backup-data`). Precedence:
/// flags, then environment variables, then the `--config` file, then
/// `port.info` (port only), then the defaults. Log verbosity follows
/// `RUST_LOG` (default `info`).
#[derive(Debug, Clone, Default, clap::Parser)]
#[command(name = "backup-server", version, about, long_about)]
pub struct Args {
    /// Address and port to listen on, e.g. `0.0.0.0:1256` or `[::]:1256`.
    /// Overrides `--port` and `port.info`.
    #[arg(long, env = "BACKUP_SERVER_LISTEN", value_name = "ADDR:PORT")]
    pub listen: Option<SocketAddr>,

    /// Also serve the legacy version 3 protocol, in the clear, on this
    /// address, e.g. `0.0.0.0:1257`: for deployed legacy clients only. It is
    /// insecure (no server authentication, no integrity); clients that
    /// registered in secure mode are never served there [default: off].
    #[arg(long, env = "BACKUP_SERVER_LEGACY_LISTEN", value_name = "ADDR:PORT")]
    pub legacy_listen: Option<SocketAddr>,

    /// Also serve Prometheus metrics (`/metrics`) and health checks
    /// (`/healthz`, `/readyz`) over plain HTTP on this address. No TLS and
    /// no authentication: bind it to localhost or a private network
    /// (docs/SECURITY.md) [default: off].
    #[arg(long, env = "BACKUP_SERVER_METRICS_LISTEN", value_name = "ADDR:PORT")]
    pub metrics_listen: Option<SocketAddr>,

    /// Port to listen on, on every IPv4 interface. Overrides `port.info`.
    #[arg(long, env = "BACKUP_SERVER_PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub port: Option<u16>,

    /// Directory for the metadata database and the stored files.
    #[arg(long, env = "BACKUP_SERVER_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// TOML file with any of the settings below (keys: listen, legacy_listen,
    /// metrics_listen, port,
    /// data_dir, max_connections, max_per_source, max_unauthenticated,
    /// handshake_timeout_secs, idle_timeout_secs, request_timeout_secs,
    /// shutdown_grace_secs, silent_crc_retry, strict_legacy, keep_last, keep_within,
    /// append_only, registrations_per_minute, registration_burst,
    /// registration_grace_secs, max_packet_bytes, max_file_bytes, quota,
    /// blob_store, s3_endpoint, and the tables [snapshots] and [clients.NAME]).
    #[arg(long, env = "BACKUP_SERVER_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Connections served at once; one more is answered 1607 and closed
    /// [default: 256].
    #[arg(long, env = "BACKUP_SERVER_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<usize>,

    /// Connections from one source address (an IPv6 /64) at once; one more
    /// is closed at once [default: 16].
    #[arg(long, env = "BACKUP_SERVER_MAX_PER_SOURCE", value_name = "N")]
    pub max_per_source: Option<usize>,

    /// Connections that have not authenticated yet (TLS handshake and
    /// proof, or the legacy key exchange), from all sources together; when
    /// full, a newcomer evicts one of the source holding the most
    /// [default: 64].
    #[arg(long, env = "BACKUP_SERVER_MAX_UNAUTHENTICATED", value_name = "N")]
    pub max_unauthenticated: Option<usize>,

    /// Seconds a new connection has for the TLS handshake and its first
    /// whole request [default: 10].
    #[arg(long, env = "BACKUP_SERVER_HANDSHAKE_TIMEOUT", value_name = "SECS")]
    pub handshake_timeout: Option<u64>,

    /// Seconds a connection may stay silent between requests [default: 120].
    #[arg(long, env = "BACKUP_SERVER_IDLE_TIMEOUT", value_name = "SECS")]
    pub idle_timeout: Option<u64>,

    /// Seconds a request may take to arrive once it has started, and a
    /// response to be written [default: 60].
    #[arg(long, env = "BACKUP_SERVER_REQUEST_TIMEOUT", value_name = "SECS")]
    pub request_timeout: Option<u64>,

    /// Seconds in-flight requests and uploads may continue after SIGINT or
    /// SIGTERM [default: 10].
    #[arg(long, env = "BACKUP_SERVER_SHUTDOWN_GRACE", value_name = "SECS")]
    pub shutdown_grace: Option<u64>,

    /// Do not answer "CRC wrong, will resend" (1030/901), as the assignment
    /// text reads. By default the server answers 1604, as most deployed
    /// servers do; legacy clients accept both.
    #[arg(long, env = "BACKUP_SERVER_SILENT_CRC_RETRY")]
    pub silent_crc_retry: bool,

    /// On the legacy listener, refuse what deployed legacy clients do
    /// outside the protocol instead of absorbing it: uploads numbered from
    /// packet 0, zero padding past the content size, and a repeated "CRC
    /// ok" for a file just committed (each is then answered 1607 and the
    /// connection closed) [default: all three are accepted]
    #[arg(long, env = "BACKUP_SERVER_STRICT_LEGACY")]
    pub strict_legacy: bool,

    /// Older name of `--keep-last`.
    #[arg(
        long,
        env = "BACKUP_SERVER_KEEP_VERSIONS",
        value_name = "N",
        hide = true
    )]
    pub keep_versions: Option<u32>,

    /// Retention at commit: keep the N newest versions of each name (1
    /// replaces the previous version, as legacy servers do). With
    /// `--keep-within` too, a version either rule keeps stays. Unset:
    /// every version is kept [default: unset].
    #[arg(long, env = "BACKUP_SERVER_KEEP_LAST", value_name = "N")]
    pub keep_last: Option<u32>,

    /// Retention at commit: keep versions stored within this long, e.g.
    /// `30d`, `12h` (units s, m, h, d, w). The newest version of a name is
    /// always kept [default: unset].
    #[arg(long, env = "BACKUP_SERVER_KEEP_WITHIN", value_name = "DURATION", value_parser = parse_duration)]
    pub keep_within: Option<Duration>,

    /// Make every client's history append-only: deletes are refused (1645)
    /// and retention is not applied at commit; only `prune` removes versions.
    #[arg(long, env = "BACKUP_SERVER_APPEND_ONLY")]
    pub append_only: bool,

    /// Registrations each source address (IPv4, or IPv6 /64) may make per
    /// minute once its burst is used; one more is answered 1601
    /// "registration failed". Reconnects are never limited [default: 10].
    #[arg(long, env = "BACKUP_SERVER_REGISTRATIONS_PER_MINUTE", value_name = "N")]
    pub registrations_per_minute: Option<u32>,

    /// Registrations a source address may make at once before
    /// `--registrations-per-minute` applies [default: 10].
    #[arg(long, env = "BACKUP_SERVER_REGISTRATION_BURST", value_name = "N")]
    pub registration_burst: Option<u32>,

    /// Seconds a name stays taken by a client that registered but never
    /// completed its key exchange (no public key stored, or in secure mode
    /// no proof); after them the name can be registered again and that
    /// client is removed [default: 600].
    #[arg(long, env = "BACKUP_SERVER_REGISTRATION_GRACE", value_name = "SECS")]
    pub registration_grace: Option<u64>,

    /// Largest ciphertext slice one send-file packet may carry; bounds the
    /// memory of each connection [default: 1114112].
    #[arg(long, env = "BACKUP_SERVER_MAX_PACKET_BYTES", value_name = "BYTES")]
    pub max_packet_bytes: Option<usize>,

    /// Largest file accepted, in plaintext bytes; the legacy listener is
    /// also capped at 4294967295 by its size fields [default: 17592186044416
    /// (16 TiB) in secure mode].
    #[arg(long, env = "BACKUP_SERVER_MAX_FILE_BYTES", value_name = "BYTES")]
    pub max_file_bytes: Option<u64>,

    /// Where file contents are kept: `local` (under the data directory,
    /// the default) or `s3://BUCKET/PREFIX` (an S3 bucket; credentials from
    /// the `AWS_*` environment variables). The database and the server's
    /// identity stay in the data directory either way.
    #[arg(
        long,
        env = "BACKUP_SERVER_BLOB_STORE",
        value_name = "local|s3://BUCKET/PREFIX"
    )]
    pub blob_store: Option<String>,

    /// URL of an S3-compatible service for `--blob-store s3://...`, e.g.
    /// `http://127.0.0.1:8333` [default: AWS S3].
    #[arg(long, env = "BACKUP_SERVER_S3_ENDPOINT", value_name = "URL")]
    pub s3_endpoint: Option<String>,

    /// Where the metadata is kept: `sqlite` (`backup.db` in the data
    /// directory, the default) or a PostgreSQL URL
    /// (`postgres://USER@HOST:PORT/DATABASE`), which several servers may
    /// share (docs/SCALING.md). A password is best given in `PGPASSWORD`.
    #[arg(long, env = "BACKUP_SERVER_META", value_name = "sqlite|postgres://...")]
    pub meta: Option<String>,
}
