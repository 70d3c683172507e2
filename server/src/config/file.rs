//! The optional TOML configuration file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use super::ConfigError;

/// Settings a `--config` file may hold; every key is optional and unknown
/// keys are an error. A relative `data_dir` is relative to the working
/// directory, as on the command line.
///
/// ```toml
/// listen = "0.0.0.0:1256"
/// data_dir = "/var/lib/backup-server"
/// max_connections = 256
/// max_per_source = 16
/// max_unauthenticated = 64
/// handshake_timeout_secs = 10
/// idle_timeout_secs = 120
/// request_timeout_secs = 60
/// shutdown_grace_secs = 10
/// silent_crc_retry = false
/// strict_legacy = false     # true: refuse the deviations of docs/PROTOCOL.md §9
/// keep_last = 10            # unset: keep every version
/// keep_within = "30d"       # unset: no age rule
/// append_only = false
/// registrations_per_minute = 10   # per source address (IPv6: per /64)
/// registration_burst = 10
/// registration_grace_secs = 600   # a never-completed registration holds its name this long
/// max_packet_bytes = 1114112
/// max_file_bytes = 4294967295
/// quota = "50G"             # bytes of packs each client may store (binary units); unset or "none": no quota
/// blob_store = "local"      # or "s3://BUCKET/PREFIX" (credentials: AWS_* variables)
/// s3_endpoint = "http://127.0.0.1:8333"   # an S3-compatible service; unset: AWS S3
/// meta = "sqlite"           # or "postgres://USER@HOST:PORT/DB" (password: PGPASSWORD)
///
/// [snapshots]               # the operator's retention of every client's snapshots
/// keep_daily = 7            # keep_last, keep_hourly, keep_daily, keep_weekly,
/// keep_weekly = 5           # keep_monthly, keep_yearly, keep_within
///
/// [clients.laptop]          # one client's own (by name or id), instead of [snapshots]
/// keep_last = 3
/// quota = "200G"            # its own quota; a table with only a quota leaves retention to [snapshots]
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<SocketAddr>,
    pub legacy_listen: Option<SocketAddr>,
    pub metrics_listen: Option<SocketAddr>,
    pub port: Option<u16>,
    pub data_dir: Option<PathBuf>,
    pub max_connections: Option<usize>,
    pub max_per_source: Option<usize>,
    pub max_unauthenticated: Option<usize>,
    pub handshake_timeout_secs: Option<u64>,
    pub idle_timeout_secs: Option<u64>,
    pub request_timeout_secs: Option<u64>,
    pub shutdown_grace_secs: Option<u64>,
    pub silent_crc_retry: Option<bool>,
    pub strict_legacy: Option<bool>,
    /// Older name of `keep_last`.
    pub keep_versions: Option<u32>,
    pub keep_last: Option<u32>,
    pub keep_within: Option<String>,
    pub append_only: Option<bool>,
    pub registrations_per_minute: Option<u32>,
    pub registration_burst: Option<u32>,
    pub registration_grace_secs: Option<u64>,
    pub max_packet_bytes: Option<usize>,
    pub max_file_bytes: Option<u64>,
    /// Every client's quota of the snapshot repository, unless its own
    /// table or `backup-server quota` sets another (`docs/PROTOCOL.md`
    /// §13.9).
    pub quota: Option<QuotaValue>,
    /// `local` or `s3://BUCKET/PREFIX`.
    pub blob_store: Option<String>,
    pub s3_endpoint: Option<String>,
    /// `sqlite` or a PostgreSQL URL.
    pub meta: Option<String>,
    /// Retention of every client's snapshots (`backup-server prune`).
    pub snapshots: Option<SnapshotPolicy>,
    /// Retention of one client's snapshots, by name or id, instead.
    pub clients: Option<std::collections::BTreeMap<String, SnapshotPolicy>>,
}

/// A snapshot retention table of the config file: restic's rules, read
/// against snapshot times (`docs/PROTOCOL.md` §13.7, §13.8).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotPolicy {
    pub keep_last: Option<u32>,
    pub keep_hourly: Option<u32>,
    pub keep_daily: Option<u32>,
    pub keep_weekly: Option<u32>,
    pub keep_monthly: Option<u32>,
    pub keep_yearly: Option<u32>,
    pub keep_within: Option<String>,
    /// The client's quota (only in a `[clients.NAME]` table).
    pub quota: Option<QuotaValue>,
}

impl SnapshotPolicy {
    /// Whether the table sets any retention rule.
    pub fn has_rules(&self) -> bool {
        self.keep_last.is_some()
            || self.keep_hourly.is_some()
            || self.keep_daily.is_some()
            || self.keep_weekly.is_some()
            || self.keep_monthly.is_some()
            || self.keep_yearly.is_some()
            || self.keep_within.is_some()
    }
}

/// A quota as the config file writes it: bytes (`1048576`), a size with a
/// binary unit (`"50G"`), or `"none"`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(untagged)]
pub enum QuotaValue {
    Bytes(u64),
    Text(String),
}

impl QuotaValue {
    /// The quota in bytes, `None` for "none".
    ///
    /// # Errors
    /// When the text is neither a size nor "none".
    pub fn resolve(&self) -> Result<Option<u64>, String> {
        match self {
            Self::Bytes(n) => Ok(Some(*n)),
            Self::Text(t) if t.trim().eq_ignore_ascii_case("none") => Ok(None),
            Self::Text(t) => crate::storage::quota::parse_size(t).map(Some),
        }
    }
}

impl FileConfig {
    /// Reads and parses `path`.
    ///
    /// # Errors
    /// When the file cannot be read or is not valid for this schema.
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })
    }
}
