//! Server configuration.
//!
//! [`Config`] is what [`run`](crate::run) needs. [`load`] builds it, with the
//! address to listen on, from these sources, highest precedence first:
//!
//! 1. command-line flags ([`Args`]),
//! 2. environment variables (`BACKUP_SERVER_*`, one per flag),
//! 3. a TOML file given by `--config` ([`FileConfig`]),
//! 4. for the port only, a legacy `port.info` file in the working directory
//!    (`docs/PROTOCOL.md` §7): a missing or bad file warns and falls back,
//! 5. embedded defaults: port [`DEFAULT_PORT`], data under
//!    [`default_data_dir`].

mod args;
mod file;
mod port_info;

use std::ffi::OsString;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use protocol::repo::retention::KeepPolicy;

use protocol::{Leniency, Limits};

use crate::storage::object::S3Location;
use crate::storage::{BlobLocation, MetaLocation, Retention};

pub use args::{AdminArgs, Args, Cli, Command, LogFormat, Switch};
pub use file::FileConfig;
pub use port_info::{parse_port_info, read_port_info, PortInfo};

/// The port of version 3 servers.
pub const DEFAULT_PORT: u16 = 1256;
/// The legacy port file, read from the working directory.
pub const PORT_INFO: &str = "port.info";
/// Name of the data directory under the platform's data home.
pub const APP_DIR: &str = "backup-server";
/// The data directory when no home directory is known.
pub const FALLBACK_DATA_DIR: &str = "backup-data";

/// What the server needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where metadata (`backup.db`) and blobs (`clients/`) live.
    pub data_dir: PathBuf,
    /// Limits on what a client may declare.
    pub limits: Limits,
    /// Answer "CRC wrong, will resend" (1030/901) with 1604, as most deployed
    /// servers do; `false` stays silent as the assignment text reads.
    pub reply_to_crc_retry: bool,
    /// Deviations of deployed legacy clients the legacy listener absorbs
    /// (`docs/PROTOCOL.md` §9): all by default, none with `--strict-legacy`.
    pub leniency: Leniency,
    /// Connections served at once; past it a client gets 1607 and is closed.
    pub max_connections: usize,
    /// Connections of one source (IPv4 address, IPv6 /64) at once; one
    /// more is closed at once.
    pub max_per_source: usize,
    /// Connections not yet authenticated, from every source together; past
    /// it a newcomer evicts one of the source holding the most
    /// (`server/src/admission.rs`).
    pub max_unauthenticated: usize,
    /// How long a new connection has for the TLS handshake and its first
    /// whole request.
    pub handshake_timeout: Duration,
    /// How long a connection may sit between requests.
    pub idle_timeout: Duration,
    /// How long one request may take to arrive once its first byte has.
    /// Also bounds each response write.
    pub request_timeout: Duration,
    /// After shutdown is asked for, how long in-flight requests and uploads
    /// may continue before their connections are cut.
    pub shutdown_grace: Duration,
    /// Which versions of a name a commit keeps (for clients not under
    /// append-only). The default keeps every version.
    pub retention: Retention,
    /// Every client's history is append-only: no deletes, and no retention
    /// at commit (only the operator's `prune` removes versions).
    pub append_only: bool,
    /// Registrations (1025) each source address (IPv4, or IPv6 /64) may
    /// make per minute once its burst is used; one more is answered 1601.
    pub registrations_per_minute: u32,
    /// Registrations a source may make at once before the rate applies.
    pub registration_burst: u32,
    /// How long a name registered by a client that never completed its
    /// key exchange (legacy: no public key stored; secure mode: no proof)
    /// stays taken; after it, a new registration of the name replaces
    /// that client (`docs/PROTOCOL.md` §6.1).
    pub registration_grace: Duration,
    /// Where file contents are kept (the metadata stays in `data_dir`).
    pub blobs: BlobLocation,
    /// Where the metadata is kept.
    pub meta: MetaLocation,
    /// Quotas of the snapshot repository from the config file
    /// (`docs/PROTOCOL.md` §13.9); a client's own setting in the metadata
    /// (`backup-server quota`) overrides them.
    pub quotas: Quotas,
}

/// The config file's quotas: `quota` for every client, and the `quota` of
/// a client's `[clients.NAME]` table (by name or id) for that client.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Quotas {
    /// Every client's (`None`: no quota).
    pub default: Option<u64>,
    /// By client name or id: that client's (`None`: no quota).
    pub clients: std::collections::BTreeMap<String, Option<u64>>,
}

impl Quotas {
    /// The quota the config file gives the client `id` named `name`
    /// (`None`: no quota).
    pub fn of(&self, id: protocol::ClientId, name: &str) -> Option<u64> {
        self.clients
            .get(name)
            .or_else(|| self.clients.get(&id.to_string()))
            .copied()
            .unwrap_or(self.default)
    }

    /// The quotas of `file`.
    ///
    /// # Errors
    /// When a quota is neither a size nor "none".
    pub fn from_file(file: &FileConfig) -> Result<Self, ConfigError> {
        let invalid = |reason| ConfigError::Invalid {
            key: "quota",
            reason,
        };
        let default = match &file.quota {
            Some(q) => q.resolve().map_err(invalid)?,
            None => None,
        };
        let mut clients = std::collections::BTreeMap::new();
        for (name, table) in file.clients.iter().flatten() {
            if let Some(q) = &table.quota {
                clients.insert(name.clone(), q.resolve().map_err(invalid)?);
            }
        }
        Ok(Self { default, clients })
    }
}

impl Config {
    pub const DEFAULT_MAX_CONNECTIONS: usize = 256;
    pub const DEFAULT_MAX_PER_SOURCE: usize = 16;
    pub const DEFAULT_MAX_UNAUTHENTICATED: usize = 64;
    pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
    pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
    pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
    pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
    /// A person registers a host once; ten a minute leaves room for a
    /// script that sets up a few machines, and is 50 times below what a
    /// flood from one address achieved before the limit.
    pub const DEFAULT_REGISTRATIONS_PER_MINUTE: u32 = 10;
    pub const DEFAULT_REGISTRATION_BURST: u32 = 10;
    /// A live client completes its key exchange right after registering
    /// (the next request), and a connection that stalls is cut after the
    /// idle timeout (120 s) or the request timeout (60 s); ten minutes is
    /// well past both, so no client that is still registering loses its
    /// name, while one that crashed (or a squatter) holds it ten minutes
    /// at most.
    pub const DEFAULT_REGISTRATION_GRACE: Duration = Duration::from_secs(600);

    /// A configuration with data under `data_dir` and every other field at
    /// its default.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            limits: Limits::default(),
            reply_to_crc_retry: true,
            leniency: Leniency::LENIENT,
            max_connections: Self::DEFAULT_MAX_CONNECTIONS,
            max_per_source: Self::DEFAULT_MAX_PER_SOURCE,
            max_unauthenticated: Self::DEFAULT_MAX_UNAUTHENTICATED,
            handshake_timeout: Self::DEFAULT_HANDSHAKE_TIMEOUT,
            idle_timeout: Self::DEFAULT_IDLE_TIMEOUT,
            request_timeout: Self::DEFAULT_REQUEST_TIMEOUT,
            shutdown_grace: Self::DEFAULT_SHUTDOWN_GRACE,
            retention: Retention::KEEP_ALL,
            append_only: false,
            registrations_per_minute: Self::DEFAULT_REGISTRATIONS_PER_MINUTE,
            registration_burst: Self::DEFAULT_REGISTRATION_BURST,
            registration_grace: Self::DEFAULT_REGISTRATION_GRACE,
            quotas: Quotas::default(),
            blobs: BlobLocation::Local,
            meta: MetaLocation::Sqlite,
        }
    }
}

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("invalid setting {key}: {reason}")]
    Invalid { key: &'static str, reason: String },
}

/// The result of [`load`]: where to listen, the configuration, and warnings
/// for the caller to log (the loader runs before anything is served).
#[derive(Debug, Clone)]
pub struct Settings {
    /// The secure (TLS) listener.
    pub listen: SocketAddr,
    /// The plain legacy listener, only when configured.
    pub legacy_listen: Option<SocketAddr>,
    /// The HTTP listener for metrics and health checks, only when
    /// configured.
    pub metrics_listen: Option<SocketAddr>,
    pub config: Config,
    pub warnings: Vec<String>,
}

impl Settings {
    /// The resolved settings, one `key = value` line each, under the names
    /// of the config file, so that the output can be kept as one
    /// (`backup-server check-config`). Unset options are comments.
    pub fn describe(&self) -> String {
        let c = &self.config;
        let secs = |d: Duration| d.as_secs();
        let unset = |key: &str, what: &str| format!("# {key} unset: {what}");
        let mut lines = vec![
            format!("listen = \"{}\"", self.listen),
            match self.legacy_listen {
                Some(a) => format!("legacy_listen = \"{a}\""),
                None => unset("legacy_listen", "no legacy listener"),
            },
            match self.metrics_listen {
                Some(a) => format!("metrics_listen = \"{a}\""),
                None => unset("metrics_listen", "no metrics or health endpoint"),
            },
            format!(
                "data_dir = {}",
                toml_string(&c.data_dir.display().to_string())
            ),
            format!("max_connections = {}", c.max_connections),
            format!("max_per_source = {}", c.max_per_source),
            format!("max_unauthenticated = {}", c.max_unauthenticated),
            format!("handshake_timeout_secs = {}", secs(c.handshake_timeout)),
            format!("idle_timeout_secs = {}", secs(c.idle_timeout)),
            format!("request_timeout_secs = {}", secs(c.request_timeout)),
            format!("shutdown_grace_secs = {}", secs(c.shutdown_grace)),
            format!("silent_crc_retry = {}", !c.reply_to_crc_retry),
            format!("strict_legacy = {}", c.leniency == Leniency::STRICT),
            match c.retention.keep_last {
                Some(n) => format!("keep_last = {n}"),
                None => unset("keep_last", "every version is kept"),
            },
            match c.retention.keep_within {
                Some(d) => format!("keep_within = \"{}s\"", d.as_secs()),
                None => unset("keep_within", "no age rule"),
            },
            format!("append_only = {}", c.append_only),
            format!("registrations_per_minute = {}", c.registrations_per_minute),
            format!("registration_burst = {}", c.registration_burst),
            format!("registration_grace_secs = {}", secs(c.registration_grace)),
            format!("max_packet_bytes = {}", c.limits.max_packet_content),
            format!("max_file_bytes = {}", c.limits.max_file_size),
            match c.quotas.default {
                Some(q) => format!("quota = \"{}\"", crate::storage::quota::format_exact(q)),
                None => unset("quota", "no quota unless a client has its own"),
            },
            format!("blob_store = {}", toml_string(&c.blobs.to_string())),
            match &c.blobs {
                BlobLocation::S3 {
                    endpoint: Some(url),
                    ..
                } => format!("s3_endpoint = {}", toml_string(url)),
                BlobLocation::S3 { endpoint: None, .. } => unset("s3_endpoint", "AWS S3"),
                BlobLocation::Local => unset("s3_endpoint", "blobs are local"),
            },
            // A password in the URL is not shown (give it in PGPASSWORD).
            format!("meta = {}", toml_string(&c.meta.to_string())),
        ];
        for (name, quota) in &c.quotas.clients {
            let value =
                quota.map_or_else(|| "none".to_owned(), crate::storage::quota::format_exact);
            lines.push(format!(
                "[clients.{}]\nquota = \"{value}\"",
                toml_string(name)
            ));
        }
        lines.extend(self.warnings.iter().map(|w| format!("# warning: {w}")));
        let mut out = lines.join("\n");
        out.push('\n');
        out
    }

    /// What `check-config` refuses beyond [`load`]: a data directory that
    /// exists but is not a directory.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the setting.
    pub fn check(&self) -> Result<(), ConfigError> {
        let dir = &self.config.data_dir;
        match std::fs::metadata(dir) {
            Ok(m) if !m.is_dir() => Err(ConfigError::Invalid {
                key: "data_dir",
                reason: format!("{} exists and is not a directory", dir.display()),
            }),
            _ => Ok(()),
        }
    }
}

/// `text` as a TOML basic string.
fn toml_string(text: &str) -> String {
    toml::Value::String(text.to_owned()).to_string()
}

/// The default data directory: `$XDG_DATA_HOME/backup-server`, else
/// `$HOME/.local/share/backup-server`, else `./backup-data`. `env` looks up
/// an environment variable (a parameter so tests need not touch the process
/// environment).
pub fn default_data_dir(env: impl Fn(&str) -> Option<OsString>) -> PathBuf {
    let absolute = |var: &str| env(var).map(PathBuf::from).filter(|p| p.is_absolute());
    if let Some(xdg) = absolute("XDG_DATA_HOME") {
        return xdg.join(APP_DIR);
    }
    if let Some(home) = absolute("HOME") {
        return home.join(".local").join("share").join(APP_DIR);
    }
    PathBuf::from(FALLBACK_DATA_DIR)
}

/// Parses a duration such as `30d`, `12h`, `90m`, `45s` or `2w` (a bare
/// number is seconds).
///
/// # Errors
/// When the text is not a positive number with one of those units.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a number followed by s, m, h, d or w"))?;
    let unit_secs: u64 = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        other => return Err(format!("unknown unit {other:?} (use s, m, h, d or w)")),
    };
    if n == 0 {
        return Err("must be more than zero".into());
    }
    n.checked_mul(unit_secs)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{text:?} is too long"))
}

/// The snapshot retention `prune` applies, client by client.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotRetention {
    /// Rules given as flags: for every client.
    pub flags: Option<KeepPolicy>,
    /// `[snapshots]` of the config file (or its `keep_last` and
    /// `keep_within`): for every client without its own.
    pub default: Option<KeepPolicy>,
    /// `[clients.NAME]` tables, by client name or id.
    pub clients: std::collections::BTreeMap<String, KeepPolicy>,
}

impl SnapshotRetention {
    /// The policy of the client `id` named `name`, if any applies.
    pub fn of(&self, id: protocol::ClientId, name: &str) -> Option<&KeepPolicy> {
        self.flags
            .as_ref()
            .or_else(|| self.clients.get(name))
            .or_else(|| self.clients.get(&id.to_string()))
            .or(self.default.as_ref())
    }
}

fn keep_policy(p: &file::SnapshotPolicy, key: &'static str) -> Result<KeepPolicy, ConfigError> {
    let within = p
        .keep_within
        .as_deref()
        .map(parse_duration)
        .transpose()
        .map_err(|reason| ConfigError::Invalid { key, reason })?;
    Ok(KeepPolicy {
        last: p.keep_last,
        hourly: p.keep_hourly,
        daily: p.keep_daily,
        weekly: p.keep_weekly,
        monthly: p.keep_monthly,
        yearly: p.keep_yearly,
        within,
        tags: Vec::new(),
    })
}

/// The snapshot retention from `flags` (when any rule is set there), the
/// config file's `[clients.NAME]` and `[snapshots]` tables, and else its
/// `keep_last` and `keep_within`.
///
/// # Errors
/// When a duration in the file is not valid.
pub fn snapshot_retention(
    flags: KeepPolicy,
    file: &FileConfig,
) -> Result<SnapshotRetention, ConfigError> {
    let default = match &file.snapshots {
        Some(p) => Some(keep_policy(p, "snapshots")?),
        None => {
            let legacy = retention(None, None, file)?;
            (!legacy.keeps_everything()).then(|| KeepPolicy {
                last: legacy.keep_last,
                within: legacy.keep_within,
                ..KeepPolicy::default()
            })
        }
    };
    let mut clients = std::collections::BTreeMap::new();
    for (name, p) in file.clients.iter().flatten() {
        // A table that sets only a quota leaves retention to the default.
        if p.has_rules() || p.quota.is_none() {
            clients.insert(name.clone(), keep_policy(p, "clients")?);
        }
    }
    Ok(SnapshotRetention {
        flags: (!flags.is_empty()).then_some(flags),
        default,
        clients,
    })
}

/// A duration as [`parse_duration`] reads it, or zero (`0`, `0s`).
///
/// # Errors
/// As [`parse_duration`].
pub fn parse_grace(text: &str) -> Result<Duration, String> {
    if text.trim_end_matches(['s', 'm', 'h', 'd', 'w']) == "0" {
        return Ok(Duration::ZERO);
    }
    parse_duration(text)
}

/// The retention rules from flags, else the config file: `keep_last` (or
/// its older name `keep_versions`) and `keep_within`.
///
/// # Errors
/// When a value is out of range.
pub fn retention(
    keep_last: Option<u32>,
    keep_within: Option<Duration>,
    file: &FileConfig,
) -> Result<Retention, ConfigError> {
    let keep_last = keep_last.or(file.keep_last).or(file.keep_versions);
    if keep_last == Some(0) {
        return Err(ConfigError::Invalid {
            key: "keep_last",
            reason: "must be at least 1".into(),
        });
    }
    let keep_within = match keep_within {
        Some(d) => Some(d),
        None => file
            .keep_within
            .as_deref()
            .map(parse_duration)
            .transpose()
            .map_err(|reason| ConfigError::Invalid {
                key: "keep_within",
                reason,
            })?,
    };
    Ok(Retention {
        keep_last,
        keep_within,
    })
}

/// The data directory and retention an operator command works with: flags,
/// then environment (folded into `args` by clap), then the config file,
/// then the default.
///
/// # Errors
/// When the config file cannot be read or parsed, or a value is invalid.
pub fn load_admin(
    args: &AdminArgs,
    env: impl Fn(&str) -> Option<OsString>,
) -> Result<(PathBuf, FileConfig), ConfigError> {
    let file = match &args.config {
        Some(path) => FileConfig::read(path)?,
        None => FileConfig::default(),
    };
    let data_dir = args
        .data_dir
        .clone()
        .or_else(|| file.data_dir.clone())
        .unwrap_or_else(|| default_data_dir(env));
    Ok((data_dir, file))
}

/// Where an operator command finds the blobs: as [`load`] decides for
/// the server, from the same flags, variables and config file.
///
/// # Errors
/// When the settings are invalid.
pub fn admin_blobs(args: &AdminArgs, file: &FileConfig) -> Result<BlobLocation, ConfigError> {
    blob_location(
        args.blob_store.as_ref().or(file.blob_store.as_ref()),
        args.s3_endpoint.as_ref().or(file.s3_endpoint.as_ref()),
    )
}

/// Where an operator command finds the metadata: as [`load`] decides for
/// the server.
///
/// # Errors
/// When the setting is invalid.
pub fn admin_meta(args: &AdminArgs, file: &FileConfig) -> Result<MetaLocation, ConfigError> {
    meta_location(args.meta.as_ref().or(file.meta.as_ref()), |k| {
        std::env::var(k).ok()
    })
}

/// `--meta` checked: `sqlite`, or a PostgreSQL URL that parses. A URL
/// without a password takes the one in `PGPASSWORD` (from `env`), as libpq
/// does.
fn meta_location(
    meta: Option<&String>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<MetaLocation, ConfigError> {
    let Some(url) = meta.filter(|m| m.as_str() != "sqlite") else {
        return Ok(MetaLocation::Sqlite);
    };
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(ConfigError::Invalid {
            key: "meta",
            reason: "is neither \"sqlite\" nor a postgres:// URL".into(),
        });
    }
    let mut config: tokio_postgres::Config =
        url.parse()
            .map_err(|e: tokio_postgres::Error| ConfigError::Invalid {
                key: "meta",
                reason: format!("is not a valid PostgreSQL URL: {e}"),
            })?;
    if config.get_dbname().is_none() {
        return Err(ConfigError::Invalid {
            key: "meta",
            reason: "names no database (postgres://USER@HOST:PORT/DATABASE)".into(),
        });
    }
    let mut url = url.clone();
    if config.get_password().is_none() {
        if let Some(password) = env("PGPASSWORD") {
            config.password(password.as_bytes());
            // Passed on as a key=value string (no escaping needed there
            // beyond quotes), not shown anywhere.
            url = format!(
                "{url}{}password={}",
                if url.contains('?') { '&' } else { '?' },
                percent_encode(&password)
            );
        }
    }
    Ok(MetaLocation::Postgres(url))
}

/// `s` with every byte but unreserved ones percent-encoded (a URL query
/// value).
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `--blob-store` and `--s3-endpoint` checked together. An endpoint must be
/// an `http://` or `https://` URL without a user or password in it
/// (credentials come from the environment, so that they are never shown).
fn blob_location(
    store: Option<&String>,
    endpoint: Option<&String>,
) -> Result<BlobLocation, ConfigError> {
    let Some(store) = store.filter(|s| s.as_str() != "local") else {
        return match endpoint {
            Some(_) => Err(ConfigError::Invalid {
                key: "s3_endpoint",
                reason: "is only used with blob_store = \"s3://BUCKET/PREFIX\"".into(),
            }),
            None => Ok(BlobLocation::Local),
        };
    };
    let location = S3Location::parse(store).map_err(|reason| ConfigError::Invalid {
        key: "blob_store",
        reason: format!("{reason} (or \"local\")"),
    })?;
    if let Some(url) = endpoint {
        let rest = url
            .strip_prefix("http://")
            .or_else(|| url.strip_prefix("https://"));
        let authority = rest.map(|r| r.split('/').next().unwrap_or_default());
        match authority {
            Some(a) if !a.is_empty() && !a.contains('@') => {}
            Some(a) if a.contains('@') => return Err(ConfigError::Invalid {
                key: "s3_endpoint",
                reason:
                    "must not hold credentials (use AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
                        .into(),
            }),
            _ => {
                return Err(ConfigError::Invalid {
                    key: "s3_endpoint",
                    reason: "is not an http:// or https:// URL with a host".into(),
                })
            }
        }
    }
    Ok(BlobLocation::S3 {
        location,
        endpoint: endpoint.cloned(),
    })
}

fn at_least_one(key: &'static str, value: u32) -> Result<u32, ConfigError> {
    if value == 0 {
        return Err(ConfigError::Invalid {
            key,
            reason: "must be at least 1".into(),
        });
    }
    Ok(value)
}

fn secs(key: &'static str, value: u64) -> Result<Duration, ConfigError> {
    if value == 0 {
        return Err(ConfigError::Invalid {
            key,
            reason: "must be at least 1 second".into(),
        });
    }
    Ok(Duration::from_secs(value))
}

/// Builds the settings from parsed flags (environment variables are folded
/// into [`Args`] by clap), the optional config file, `port.info` in `cwd`
/// and the defaults; `env` is used for the default data directory only.
///
/// # Errors
/// When the config file cannot be read or parsed, or a value is out of range.
pub fn load(
    args: &Args,
    cwd: &Path,
    env: impl Fn(&str) -> Option<OsString>,
) -> Result<Settings, ConfigError> {
    let file = match &args.config {
        Some(path) => FileConfig::read(path)?,
        None => FileConfig::default(),
    };
    let mut warnings = Vec::new();

    let listen = match args.listen.or(file.listen) {
        Some(addr) => addr,
        None => {
            let port = match args.port.or(file.port) {
                Some(port) => port,
                None => {
                    let path = cwd.join(PORT_INFO);
                    match read_port_info(&path) {
                        PortInfo::Port(port) => port,
                        PortInfo::Missing => {
                            warnings.push(format!(
                                "{} not found; using the default port {DEFAULT_PORT}",
                                path.display()
                            ));
                            DEFAULT_PORT
                        }
                        PortInfo::Invalid(reason) => {
                            warnings.push(format!(
                                "{} is invalid ({reason}); using the default port {DEFAULT_PORT}",
                                path.display()
                            ));
                            DEFAULT_PORT
                        }
                    }
                }
            };
            SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port)
        }
    };

    let password = env("PGPASSWORD").and_then(|v| v.into_string().ok());
    let mut config = Config::new(
        args.data_dir
            .clone()
            .or_else(|| file.data_dir.clone())
            .unwrap_or_else(|| default_data_dir(env)),
    );
    config.reply_to_crc_retry = !(args.silent_crc_retry || file.silent_crc_retry.unwrap_or(false));
    if args.strict_legacy || file.strict_legacy.unwrap_or(false) {
        config.leniency = Leniency::STRICT;
    }
    if let Some(n) = args.max_connections.or(file.max_connections) {
        if n == 0 {
            return Err(ConfigError::Invalid {
                key: "max_connections",
                reason: "must be at least 1".into(),
            });
        }
        config.max_connections = n;
    }
    for (key, value, field) in [
        (
            "max_per_source",
            args.max_per_source.or(file.max_per_source),
            &mut config.max_per_source,
        ),
        (
            "max_unauthenticated",
            args.max_unauthenticated.or(file.max_unauthenticated),
            &mut config.max_unauthenticated,
        ),
    ] {
        if let Some(n) = value {
            if n == 0 {
                return Err(ConfigError::Invalid {
                    key,
                    reason: "must be at least 1".into(),
                });
            }
            *field = n;
        }
    }
    if let Some(s) = args.handshake_timeout.or(file.handshake_timeout_secs) {
        config.handshake_timeout = secs("handshake_timeout", s)?;
    }
    if let Some(s) = args.idle_timeout.or(file.idle_timeout_secs) {
        config.idle_timeout = secs("idle_timeout", s)?;
    }
    if let Some(s) = args.request_timeout.or(file.request_timeout_secs) {
        config.request_timeout = secs("request_timeout", s)?;
    }
    if let Some(s) = args.shutdown_grace.or(file.shutdown_grace_secs) {
        config.shutdown_grace = Duration::from_secs(s);
    }
    config.retention = retention(
        args.keep_last.or(args.keep_versions),
        args.keep_within,
        &file,
    )?;
    config.append_only = args.append_only || file.append_only.unwrap_or(false);
    config.quotas = Quotas::from_file(&file)?;
    if let Some(n) = args.max_packet_bytes.or(file.max_packet_bytes) {
        if n == 0 {
            return Err(ConfigError::Invalid {
                key: "max_packet_bytes",
                reason: "must be at least 1".into(),
            });
        }
        config.limits.max_packet_content = n;
    }
    if let Some(n) = args.max_file_bytes.or(file.max_file_bytes) {
        if n > protocol::limits::SECURE_MAX_FILE_SIZE {
            return Err(ConfigError::Invalid {
                key: "max_file_bytes",
                reason: format!("at most {}", protocol::limits::SECURE_MAX_FILE_SIZE),
            });
        }
        config.limits.max_file_size = n;
    }
    if let Some(n) = args
        .registrations_per_minute
        .or(file.registrations_per_minute)
    {
        config.registrations_per_minute = at_least_one("registrations_per_minute", n)?;
    }
    if let Some(n) = args.registration_burst.or(file.registration_burst) {
        config.registration_burst = at_least_one("registration_burst", n)?;
    }
    if let Some(s) = args.registration_grace.or(file.registration_grace_secs) {
        config.registration_grace = secs("registration_grace", s)?;
    }
    let slowest = config.idle_timeout + config.request_timeout;
    if config.registration_grace < slowest {
        warnings.push(format!(
            "registration_grace ({}s) is shorter than idle_timeout + request_timeout ({}s): a slow client may lose its name while it is still registering",
            config.registration_grace.as_secs(),
            slowest.as_secs()
        ));
    }
    config.blobs = blob_location(
        args.blob_store.as_ref().or(file.blob_store.as_ref()),
        args.s3_endpoint.as_ref().or(file.s3_endpoint.as_ref()),
    )?;
    config.meta = meta_location(args.meta.as_ref().or(file.meta.as_ref()), |k| {
        (k == "PGPASSWORD").then(|| password.clone()).flatten()
    })?;
    let legacy_listen = args.legacy_listen.or(file.legacy_listen);
    if legacy_listen == Some(listen) && listen.port() != 0 {
        return Err(ConfigError::Invalid {
            key: "legacy_listen",
            reason: format!(
                "{listen} is already the secure listener; give the legacy protocol its own port"
            ),
        });
    }
    let metrics_listen = args.metrics_listen.or(file.metrics_listen);
    if let Some(metrics) = metrics_listen.filter(|m| m.port() != 0) {
        if metrics == listen || Some(metrics) == legacy_listen {
            return Err(ConfigError::Invalid {
                key: "metrics_listen",
                reason: format!(
                    "{metrics} is already a client listener; give metrics their own port"
                ),
            });
        }
        if !is_private(metrics.ip()) {
            warnings.push(format!(
                "metrics_listen {metrics} is not a loopback or private address: the metrics and health endpoints have no TLS and no authentication (docs/SECURITY.md)"
            ));
        }
    }
    Ok(Settings {
        listen,
        legacy_listen,
        metrics_listen,
        config,
        warnings,
    })
}

/// Whether `ip` is loopback or in a private range (RFC 1918, IPv6 unique
/// local), where an unauthenticated metrics listener is expected.
fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback() || v4.is_private() || v4.is_link_local(),
        IpAddr::V6(v6) => {
            v6.is_loopback()
                || (v6.segments()[0] & 0xfe00) == 0xfc00
                || v6
                    .to_ipv4_mapped()
                    .is_some_and(|v4| v4.is_loopback() || v4.is_private())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn no_env(_: &str) -> Option<OsString> {
        None
    }

    fn parse(argv: &[&str]) -> Args {
        Args::try_parse_from(std::iter::once("backup-server").chain(argv.iter().copied())).unwrap()
    }

    #[test]
    fn uses_port_info_when_present_and_valid() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(PORT_INFO), "4321\n").unwrap();
        let s = load(&parse(&[]), dir.path(), no_env).unwrap();
        assert_eq!(s.listen.port(), 4321);
        assert!(s.warnings.is_empty());
    }

    #[test]
    fn falls_back_with_a_warning_when_port_info_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let s = load(&parse(&[]), dir.path(), no_env).unwrap();
        assert_eq!(s.listen.port(), DEFAULT_PORT);
        assert_eq!(s.warnings.len(), 1);
        assert!(s.warnings[0].contains("not found"), "{:?}", s.warnings);
    }

    #[test]
    fn falls_back_with_a_warning_when_port_info_is_bad() {
        let dir = tempfile::tempdir().unwrap();
        for bad in ["", "abc", "70000", "0", "-5", "12 34"] {
            std::fs::write(dir.path().join(PORT_INFO), bad).unwrap();
            let s = load(&parse(&[]), dir.path(), no_env).unwrap();
            assert_eq!(s.listen.port(), DEFAULT_PORT, "{bad:?}");
            assert!(
                s.warnings[0].contains("invalid"),
                "{bad:?}: {:?}",
                s.warnings
            );
        }
        // A directory where the file should be is also just "bad".
        std::fs::remove_file(dir.path().join(PORT_INFO)).unwrap();
        std::fs::create_dir(dir.path().join(PORT_INFO)).unwrap();
        let s = load(&parse(&[]), dir.path(), no_env).unwrap();
        assert_eq!(s.listen.port(), DEFAULT_PORT);
        assert_eq!(s.warnings.len(), 1);
    }

    #[test]
    fn flags_override_config_file_and_port_info() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(PORT_INFO), "4321").unwrap();
        let toml = dir.path().join("server.toml");
        std::fs::write(
            &toml,
            "port = 5555\ndata_dir = \"/srv/from-file\"\nsilent_crc_retry = true\nidle_timeout_secs = 7\nkeep_versions = 3\n",
        )
        .unwrap();
        let cfg = toml.to_str().unwrap();
        let s = load(&parse(&["--config", cfg]), dir.path(), no_env).unwrap();
        assert_eq!(s.listen.port(), 5555);
        assert_eq!(s.config.data_dir, PathBuf::from("/srv/from-file"));
        assert!(!s.config.reply_to_crc_retry);
        assert_eq!(s.config.leniency, protocol::Leniency::LENIENT);
        assert_eq!(s.config.idle_timeout, Duration::from_secs(7));
        assert_eq!(s.config.retention.keep_last, Some(3));
        assert_eq!(s.config.retention.keep_within, None);

        let s = load(
            &parse(&[
                "--config",
                cfg,
                "--listen",
                "127.0.0.1:6000",
                "--data-dir",
                "/x",
                "--idle-timeout",
                "9",
            ]),
            dir.path(),
            no_env,
        )
        .unwrap();
        assert_eq!(s.listen, "127.0.0.1:6000".parse().unwrap());
        assert_eq!(s.config.data_dir, PathBuf::from("/x"));
        assert_eq!(s.config.idle_timeout, Duration::from_secs(9));
    }

    #[test]
    fn rejects_unknown_config_keys_and_zero_limits() {
        let dir = tempfile::tempdir().unwrap();
        let toml = dir.path().join("server.toml");
        std::fs::write(&toml, "listen_port = 1\n").unwrap();
        let err = load(
            &parse(&["--config", toml.to_str().unwrap()]),
            dir.path(),
            no_env,
        )
        .unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }), "{err}");
        let err = load(&parse(&["--max-connections", "0"]), dir.path(), no_env).unwrap_err();
        assert!(matches!(
            err,
            ConfigError::Invalid {
                key: "max_connections",
                ..
            }
        ));
        let err = load(
            &parse(&["--max-file-bytes", "17592186044417"]),
            dir.path(),
            no_env,
        )
        .unwrap_err();
        assert!(matches!(
            err,
            ConfigError::Invalid {
                key: "max_file_bytes",
                ..
            }
        ));
    }

    #[test]
    fn absorbs_legacy_deviations_unless_strict_legacy_is_set_by_flag_or_file() {
        let dir = tempfile::tempdir().unwrap();
        let s = load(&parse(&[]), dir.path(), no_env).unwrap();
        assert_eq!(s.config.leniency, Leniency::LENIENT);
        let s = load(&parse(&["--strict-legacy"]), dir.path(), no_env).unwrap();
        assert_eq!(s.config.leniency, Leniency::STRICT);
        let toml = dir.path().join("server.toml");
        std::fs::write(&toml, "strict_legacy = true\n").unwrap();
        let s = load(
            &parse(&["--config", toml.to_str().unwrap()]),
            dir.path(),
            no_env,
        )
        .unwrap();
        assert_eq!(s.config.leniency, Leniency::STRICT);
        std::fs::write(&toml, "strict_legacy = false\n").unwrap();
        let s = load(
            &parse(&["--config", toml.to_str().unwrap()]),
            dir.path(),
            no_env,
        )
        .unwrap();
        assert_eq!(s.config.leniency, Leniency::LENIENT);
    }

    #[test]
    fn keeps_every_version_by_default_and_reads_retention_flags() {
        let dir = tempfile::tempdir().unwrap();
        let s = load(&parse(&[]), dir.path(), no_env).unwrap();
        assert!(s.config.retention.keeps_everything());
        assert!(!s.config.append_only);
        let s = load(
            &parse(&["--keep-last", "2", "--keep-within", "30d", "--append-only"]),
            dir.path(),
            no_env,
        )
        .unwrap();
        assert_eq!(s.config.retention.keep_last, Some(2));
        assert_eq!(
            s.config.retention.keep_within,
            Some(Duration::from_secs(30 * 86_400))
        );
        assert!(s.config.append_only);
        let s = load(&parse(&["--keep-versions", "4"]), dir.path(), no_env).unwrap();
        assert_eq!(s.config.retention.keep_last, Some(4));
        assert!(load(&parse(&["--keep-last", "0"]), dir.path(), no_env).is_err());
    }

    #[test]
    fn describes_the_settings_as_a_config_file_that_loads_to_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let s = load(
            &parse(&[
                "--port",
                "4000",
                "--data-dir",
                "/srv/b\"q",
                "--keep-within",
                "2d",
                "--legacy-listen",
                "127.0.0.1:4001",
                "--strict-legacy",
            ]),
            dir.path(),
            no_env,
        )
        .unwrap();
        let text = s.describe();
        assert!(text.contains("listen = \"0.0.0.0:4000\"\n"), "{text}");
        assert!(text.contains("keep_within = \"172800s\"\n"), "{text}");
        assert!(text.contains("# keep_last unset"), "{text}");
        let file = dir.path().join("described.toml");
        std::fs::write(&file, &text).unwrap();
        let again = load(
            &parse(&["--config", file.to_str().unwrap()]),
            dir.path(),
            no_env,
        )
        .unwrap();
        assert_eq!(again.describe(), text);
        assert_eq!(again.config.data_dir, Path::new("/srv/b\"q"));
        assert_eq!(again.config.leniency, Leniency::STRICT);
        assert_eq!(again.legacy_listen, s.legacy_listen);
    }

    #[test]
    fn reads_the_metrics_listener_from_flag_or_file_and_refuses_a_client_port() {
        let dir = tempfile::tempdir().unwrap();
        let s = load(&parse(&[]), dir.path(), no_env).unwrap();
        assert_eq!(s.metrics_listen, None);
        assert!(s.describe().contains("# metrics_listen unset"));
        let toml = dir.path().join("server.toml");
        std::fs::write(&toml, "metrics_listen = \"127.0.0.1:9256\"\n").unwrap();
        let cfg = toml.to_str().unwrap();
        let s = load(&parse(&["--config", cfg]), dir.path(), no_env).unwrap();
        assert_eq!(s.metrics_listen, Some("127.0.0.1:9256".parse().unwrap()));
        assert!(s
            .describe()
            .contains("metrics_listen = \"127.0.0.1:9256\"\n"));
        assert!(
            s.warnings.iter().all(|w| !w.contains("metrics_listen")),
            "{:?}",
            s.warnings
        );
        let s = load(
            &parse(&["--config", cfg, "--metrics-listen", "0.0.0.0:9300"]),
            dir.path(),
            no_env,
        )
        .unwrap();
        assert_eq!(s.metrics_listen, Some("0.0.0.0:9300".parse().unwrap()));
        assert!(
            s.warnings.iter().any(|w| w.contains("metrics_listen")),
            "an address open to all is warned about"
        );
        let err = load(
            &parse(&[
                "--listen",
                "127.0.0.1:7000",
                "--metrics-listen",
                "127.0.0.1:7000",
            ]),
            dir.path(),
            no_env,
        )
        .unwrap_err();
        assert!(matches!(
            err,
            ConfigError::Invalid {
                key: "metrics_listen",
                ..
            }
        ));
    }

    #[test]
    fn reads_quotas_from_the_file_and_describes_them_so_they_load_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let toml = dir.path().join("server.toml");
        std::fs::write(
            &toml,
            "quota = \"50G\"\n[snapshots]\nkeep_daily = 7\n[clients.laptop]\nquota = 1048577\n\
             [clients.desk]\nquota = \"none\"\nkeep_last = 2\n",
        )
        .unwrap();
        let s = load(
            &parse(&["--config", toml.to_str().unwrap(), "--port", "4000"]),
            dir.path(),
            no_env,
        )
        .unwrap();
        let id = protocol::ClientId([1; 16]);
        let q = &s.config.quotas;
        assert_eq!(q.of(id, "other"), Some(50 << 30));
        assert_eq!(q.of(id, "laptop"), Some(1_048_577));
        assert_eq!(q.of(id, "desk"), None, "its own none beats the default");
        let text = s.describe();
        assert!(text.contains("quota = \"50G\"\n"), "{text}");
        assert!(
            text.contains("[clients.\"laptop\"]\nquota = \"1048577\""),
            "{text}"
        );
        let file = dir.path().join("described.toml");
        std::fs::write(&file, &text).unwrap();
        let again = load(
            &parse(&["--config", file.to_str().unwrap()]),
            dir.path(),
            no_env,
        )
        .unwrap();
        assert_eq!(again.config.quotas, s.config.quotas);
        assert_eq!(again.describe(), text);
        // A table with only a quota leaves retention to [snapshots].
        let file = FileConfig::read(&toml).unwrap();
        let r = snapshot_retention(KeepPolicy::default(), &file).unwrap();
        assert_eq!(r.of(id, "laptop").unwrap().daily, Some(7));
        assert_eq!(r.of(id, "desk").unwrap().last, Some(2));
        std::fs::write(&toml, "quota = \"lots\"\n").unwrap();
        let err = load(
            &parse(&["--config", toml.to_str().unwrap()]),
            dir.path(),
            no_env,
        )
        .unwrap_err();
        assert!(
            matches!(err, ConfigError::Invalid { key: "quota", .. }),
            "{err}"
        );
        let unset = load(&parse(&[]), dir.path(), no_env).unwrap();
        assert!(unset.describe().contains("# quota unset"));
    }

    #[test]
    fn check_refuses_a_data_dir_that_is_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, "").unwrap();
        let s = load(
            &parse(&["--data-dir", file.to_str().unwrap()]),
            dir.path(),
            no_env,
        )
        .unwrap();
        assert!(matches!(
            s.check(),
            Err(ConfigError::Invalid {
                key: "data_dir",
                ..
            })
        ));
        let s = load(
            &parse(&["--data-dir", dir.path().to_str().unwrap()]),
            dir.path(),
            no_env,
        )
        .unwrap();
        assert!(s.check().is_ok());
        let missing = dir.path().join("not-yet");
        let s = load(
            &parse(&["--data-dir", missing.to_str().unwrap()]),
            dir.path(),
            no_env,
        )
        .unwrap();
        assert!(
            s.check().is_ok(),
            "the server makes a missing data directory"
        );
    }

    #[test]
    fn parses_the_log_format_with_or_after_a_subcommand() {
        let cli = |argv: &[&str]| {
            Cli::try_parse_from(std::iter::once("backup-server").chain(argv.iter().copied()))
        };
        assert_eq!(cli(&[]).unwrap().log_format, None);
        assert_eq!(
            cli(&["--log-format", "json"]).unwrap().log_format,
            Some(LogFormat::Json)
        );
        assert_eq!(
            cli(&["--log-format", "json", "--port", "9"])
                .unwrap()
                .log_format,
            Some(LogFormat::Json)
        );
        let c = cli(&["serve", "--log-format", "text"]).unwrap();
        assert_eq!(c.log_format, Some(LogFormat::Text));
        assert!(matches!(c.command, Some(Command::Serve(_))));
        let c = cli(&["check-config", "--log-format", "json", "--port", "9"]).unwrap();
        assert_eq!(c.log_format, Some(LogFormat::Json));
        assert!(matches!(c.command, Some(Command::CheckConfig(_))));
        assert!(cli(&["--log-format", "xml"]).is_err());
    }

    #[test]
    fn reads_registration_limits_from_flags_then_file_and_rejects_zero() {
        let dir = tempfile::tempdir().unwrap();
        let s = load(&parse(&[]), dir.path(), no_env).unwrap();
        assert_eq!(s.config.registrations_per_minute, 10);
        assert_eq!(s.config.registration_burst, 10);
        assert_eq!(s.config.registration_grace, Duration::from_secs(600));
        let toml = dir.path().join("server.toml");
        std::fs::write(
            &toml,
            "registrations_per_minute = 3\nregistration_burst = 5\nregistration_grace_secs = 900\n",
        )
        .unwrap();
        let cfg = toml.to_str().unwrap();
        let s = load(&parse(&["--config", cfg]), dir.path(), no_env).unwrap();
        assert_eq!(s.config.registrations_per_minute, 3);
        assert_eq!(s.config.registration_burst, 5);
        assert_eq!(s.config.registration_grace, Duration::from_secs(900));
        let s = load(
            &parse(&[
                "--config",
                cfg,
                "--registrations-per-minute",
                "4",
                "--registration-burst",
                "1",
                "--registration-grace",
                "200",
            ]),
            dir.path(),
            no_env,
        )
        .unwrap();
        assert_eq!(s.config.registrations_per_minute, 4);
        assert_eq!(s.config.registration_burst, 1);
        assert_eq!(s.config.registration_grace, Duration::from_secs(200));
        assert!(s.warnings.iter().all(|w| !w.contains("registration_grace")));
        for (flag, key) in [
            ("--registrations-per-minute", "registrations_per_minute"),
            ("--registration-burst", "registration_burst"),
            ("--registration-grace", "registration_grace"),
        ] {
            match load(&parse(&[flag, "0"]), dir.path(), no_env) {
                Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key),
                other => panic!("{flag} 0: {other:?}"),
            }
        }
        // A grace shorter than a slow registration may take is allowed,
        // with a warning.
        let s = load(&parse(&["--registration-grace", "30"]), dir.path(), no_env).unwrap();
        assert!(
            s.warnings.iter().any(|w| w.contains("registration_grace")),
            "{:?}",
            s.warnings
        );
    }

    #[test]
    fn parses_durations_with_units_and_rejects_others() {
        assert_eq!(parse_duration("12h"), Ok(Duration::from_secs(12 * 3600)));
        assert_eq!(parse_duration("30d"), Ok(Duration::from_secs(30 * 86_400)));
        assert_eq!(parse_duration("2w"), Ok(Duration::from_secs(14 * 86_400)));
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        for bad in ["", "d", "0d", "3y", "-1h", "1.5h", "99999999999999999999w"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn parses_operator_subcommands_and_defaults_to_serve() {
        <Cli as clap::CommandFactory>::command().debug_assert();
        let cli = Cli::try_parse_from(["backup-server", "--port", "5000"]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.serve.port, Some(5000));
        let cli = Cli::try_parse_from(["backup-server", "serve", "--append-only"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Serve(a)) if a.append_only));
        // Serving flags belong to serving, not to an operator command.
        assert!(Cli::try_parse_from(["backup-server", "--port", "5000", "clients"]).is_err());
        let cli = Cli::try_parse_from([
            "backup-server",
            "files",
            "alice",
            "--versions",
            "--data-dir",
            "/d",
        ])
        .unwrap();
        match cli.command {
            Some(Command::Files {
                client,
                versions,
                admin,
            }) => {
                assert_eq!(client, "alice");
                assert!(versions);
                assert_eq!(admin.data_dir, Some(PathBuf::from("/d")));
            }
            other => panic!("{other:?}"),
        }
        let cli = Cli::try_parse_from(["backup-server", "append-only", "bob", "on"]).unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::AppendOnly {
                state: Switch::On,
                ..
            })
        ));
        assert!(Cli::try_parse_from(["backup-server", "append-only", "bob", "maybe"]).is_err());
        let cli = Cli::try_parse_from(["backup-server", "prune", "--keep-within", "12h"]).unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::Prune { keep_within: Some(d), keep_last: None, .. }) if d == Duration::from_secs(43_200)
        ));
    }

    #[test]
    fn default_data_dir_prefers_xdg_then_home_then_cwd() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| OsString::from(*v))
            }
        };
        assert_eq!(
            default_data_dir(env(&[("XDG_DATA_HOME", "/xdg"), ("HOME", "/home/u")])),
            PathBuf::from("/xdg/backup-server")
        );
        assert_eq!(
            default_data_dir(env(&[("XDG_DATA_HOME", "relative"), ("HOME", "/home/u")])),
            PathBuf::from("/home/u/.local/share/backup-server")
        );
        assert_eq!(default_data_dir(env(&[])), PathBuf::from(FALLBACK_DATA_DIR));
    }

    #[test]
    fn metadata_is_sqlite_by_default_or_postgres_with_the_password_kept_out_of_sight() {
        let dir = tempfile::tempdir().unwrap();
        let s = load(&parse(&[]), dir.path(), no_env).unwrap();
        assert_eq!(s.config.meta, MetaLocation::Sqlite);
        assert!(s.describe().contains("meta = \"sqlite\"\n"));

        let url = "postgres://backup@db.example:5433/repo";
        let s = load(&parse(&["--meta", url]), dir.path(), no_env).unwrap();
        assert_eq!(s.config.meta, MetaLocation::Postgres(url.to_owned()));
        assert!(
            s.describe()
                .contains("meta = \"postgres://backup@db.example:5433/repo\"\n"),
            "{}",
            s.describe()
        );

        // PGPASSWORD is used, and shown nowhere; nor is one in the URL.
        let with_password = |k: &str| (k == "PGPASSWORD").then(|| OsString::from("s3cr&t"));
        let s = load(&parse(&["--meta", url]), dir.path(), with_password).unwrap();
        let MetaLocation::Postgres(given) = &s.config.meta else {
            panic!("{:?}", s.config.meta)
        };
        let parsed: tokio_postgres::Config = given.parse().unwrap();
        assert_eq!(parsed.get_password(), Some(&b"s3cr&t"[..]));
        assert!(!s.describe().contains("s3cr"), "{}", s.describe());
        assert!(!format!("{:?}", s.config).contains("s3cr"));
        let inline = "postgres://backup:hunter2@db.example/repo";
        let s = load(&parse(&["--meta", inline]), dir.path(), no_env).unwrap();
        assert!(!s.describe().contains("hunter2"), "{}", s.describe());
        assert!(!format!("{:?}", s.config).contains("hunter2"));

        for bad in ["mysql://db/x", "postgres://host:notaport/db", "postgres://host:5432"] {
            let err = load(&parse(&["--meta", bad]), dir.path(), no_env).unwrap_err();
            assert!(
                matches!(err, ConfigError::Invalid { key: "meta", .. }),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn blobs_are_local_by_default_and_in_s3_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let s = load(&parse(&[]), dir.path(), no_env).unwrap();
        assert_eq!(s.config.blobs, BlobLocation::Local);
        assert!(s.describe().contains("blob_store = \"local\"\n"));

        let toml = dir.path().join("server.toml");
        std::fs::write(
            &toml,
            "blob_store = \"s3://bucket/backup\"\ns3_endpoint = \"http://127.0.0.1:8333\"\n",
        )
        .unwrap();
        let s = load(
            &parse(&["--config", toml.to_str().unwrap()]),
            dir.path(),
            no_env,
        )
        .unwrap();
        let BlobLocation::S3 { location, endpoint } = &s.config.blobs else {
            panic!("{:?}", s.config.blobs)
        };
        assert_eq!(
            (location.bucket.as_str(), location.prefix.as_str()),
            ("bucket", "backup")
        );
        assert_eq!(endpoint.as_deref(), Some("http://127.0.0.1:8333"));
        let described = s.describe();
        assert!(
            described.contains("blob_store = \"s3://bucket/backup\"\n"),
            "{described}"
        );
        assert!(
            described.contains("s3_endpoint = \"http://127.0.0.1:8333\"\n"),
            "{described}"
        );
        // What check-config prints reads back as the same settings.
        std::fs::write(&toml, described).unwrap();
        let again = load(
            &parse(&["--config", toml.to_str().unwrap()]),
            dir.path(),
            no_env,
        )
        .unwrap();
        assert_eq!(again.config.blobs, s.config.blobs);

        // The flag wins over the file; admin commands read the same.
        let args = parse(&[
            "--config",
            toml.to_str().unwrap(),
            "--blob-store",
            "local",
            "--s3-endpoint",
            "http://x",
        ]);
        assert!(matches!(
            load(&args, dir.path(), no_env),
            Err(ConfigError::Invalid {
                key: "s3_endpoint",
                ..
            })
        ));
        let admin = AdminArgs {
            config: Some(toml.clone()),
            ..AdminArgs::default()
        };
        let (_, file) = load_admin(&admin, no_env).unwrap();
        assert_eq!(admin_blobs(&admin, &file).unwrap(), s.config.blobs);
    }

    #[test]
    fn refuses_bad_blob_store_settings_without_echoing_credentials() {
        let dir = tempfile::tempdir().unwrap();
        for (argv, key) in [
            (&["--blob-store", "/some/dir"][..], "blob_store"),
            (&["--blob-store", "s3://"][..], "blob_store"),
            (
                &["--blob-store", "s3://b/p", "--s3-endpoint", "ftp://h"][..],
                "s3_endpoint",
            ),
            (
                &["--blob-store", "s3://b/p", "--s3-endpoint", "http://"][..],
                "s3_endpoint",
            ),
            (
                &[
                    "--blob-store",
                    "s3://b/p",
                    "--s3-endpoint",
                    "http://key:hunter2@h",
                ][..],
                "s3_endpoint",
            ),
            (
                &[
                    "--blob-store",
                    "s3://b/p",
                    "--s3-endpoint",
                    "ftp://key:hunter2@h",
                ][..],
                "s3_endpoint",
            ),
        ] {
            match load(&parse(argv), dir.path(), no_env) {
                Err(e @ ConfigError::Invalid { key: k, .. }) if k == key => {
                    assert!(!e.to_string().contains("hunter2"), "{e}");
                }
                other => panic!("{argv:?}: {other:?}"),
            }
        }
    }
}

#[cfg(test)]
mod snapshot_retention_tests {
    use super::*;

    #[test]
    fn flags_then_a_clients_own_table_then_the_default_apply() {
        let file: FileConfig = toml::from_str(
            r#"
            keep_last = 9
            [snapshots]
            keep_daily = 7
            [clients.laptop]
            keep_last = 3
            keep_within = "2d"
            "#,
        )
        .unwrap();
        let id = protocol::ClientId([1; 16]);
        let r = snapshot_retention(KeepPolicy::default(), &file).unwrap();
        let laptop = r.of(id, "laptop").unwrap();
        assert_eq!(
            (laptop.last, laptop.within),
            (Some(3), Some(Duration::from_secs(2 * 86_400)))
        );
        assert_eq!(r.of(id, "desk").unwrap().daily, Some(7));
        let flags = KeepPolicy {
            yearly: Some(1),
            ..KeepPolicy::default()
        };
        let r = snapshot_retention(flags.clone(), &file).unwrap();
        assert_eq!(r.of(id, "laptop"), Some(&flags));
        // Without [snapshots], the version rules' keep_last serves.
        let file: FileConfig = toml::from_str("keep_last = 9").unwrap();
        let r = snapshot_retention(KeepPolicy::default(), &file).unwrap();
        assert_eq!(r.of(id, "any").unwrap().last, Some(9));
        let none = snapshot_retention(KeepPolicy::default(), &FileConfig::default()).unwrap();
        assert_eq!(none.of(id, "any"), None);
        let bad: FileConfig = toml::from_str("[snapshots]\nkeep_within = \"soon\"").unwrap();
        assert!(snapshot_retention(KeepPolicy::default(), &bad).is_err());
    }
}
