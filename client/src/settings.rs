//! Where the client keeps its settings and identity, and how settings are
//! resolved: command-line flags, then the legacy `transfer.info` of the
//! current directory, then `config.toml`, then built-in defaults.

use std::path::{Path, PathBuf};
use std::time::Duration;

use protocol::{Limits, Numbering};
use serde::{Deserialize, Serialize};

use crate::error::{io_reason, Error};
use crate::fsutil;

/// Environment variable naming the configuration directory.
pub const ENV_CONFIG_DIR: &str = "BACKUP_CLIENT_DIR";
/// Name of the configuration directory under the user's config directory.
pub const APP_DIR: &str = "backup-client";
/// Name of the settings file in the configuration directory.
pub const CONFIG_FILE: &str = "config.toml";
/// Port assumed when a server address has none (the legacy default).
pub const DEFAULT_PORT: u16 = 1256;
/// Ciphertext bytes per packet by default: large packets keep the per-packet
/// overhead negligible against our server.
pub const DEFAULT_PACKET_SIZE: usize = 1024 * 1024;
/// How long to wait for an answer or for a write to progress, by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long to wait for a connection to be accepted.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections a backup or restore of several files uses at once, by
/// default in secure mode (with `--legacy`, 1 unless set): enough
/// for the server to commit several files per sync (its group commit)
/// while one file is on the wire and another is being synced.
pub const DEFAULT_CONNECTIONS: u16 = 4;
/// The most connections one run opens.
pub const MAX_CONNECTIONS: u16 = 16;

/// The user's configuration directory for this client:
/// `$XDG_CONFIG_HOME/backup-client`, else `$HOME/.config/backup-client`.
pub fn default_config_dir() -> Option<PathBuf> {
    let xdg = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute());
    let base = xdg.or_else(|| {
        std::env::var_os("HOME")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
            .map(|h| h.join(".config"))
    })?;
    Some(base.join(APP_DIR))
}

/// The contents of `config.toml`. Every field is optional.
///
/// ```toml
/// server = "backup.example.org:1256"
/// name = "alice"
/// packet-size = 1048576   # fixes the packet size (for legacy servers)
/// codes = 1025            # or 825
/// timeout = 60            # seconds
/// connections = 4         # files sent at once (1 to 16)
/// key-file = "backup.key" # back up with a backup-only key
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ConfigFile {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub packet_size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub codes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u64>,
    /// Speak the legacy protocol to this server (as `--legacy`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub legacy: Option<bool>,
    /// Connections a backup or restore uses at once (as `--connections`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connections: Option<u16>,
    /// A backup-only key file to back up with (as `--key-file`); a
    /// relative path is taken from the configuration directory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
}

impl ConfigFile {
    /// Reads `config.toml` from `dir`; a missing file is an empty one.
    ///
    /// # Errors
    /// When the file exists but cannot be read or parsed.
    pub fn load(dir: &Path) -> Result<Self, Error> {
        let path = dir.join(CONFIG_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => {
                return Err(Error::Config {
                    path,
                    detail: io_reason(&e),
                })
            }
        };
        toml::from_str(&text).map_err(|e| Error::Config {
            path,
            detail: e.message().to_owned(),
        })
    }

    /// Writes `config.toml` into `dir` (created if needed), atomically.
    ///
    /// # Errors
    /// When the directory or file cannot be written.
    pub fn save(&self, dir: &Path) -> Result<(), Error> {
        let text = toml::to_string(self).map_err(|e| Error::Internal(e.to_string()))?;
        fsutil::create_private_dir(dir)?;
        fsutil::write_private(&dir.join(CONFIG_FILE), text.as_bytes())
    }
}

/// Checks a server address: `HOST:PORT` (or `[v6]:PORT`); a bare host gets
/// [`DEFAULT_PORT`].
///
/// # Errors
/// When the host is empty or the port is not a number from 1 to 65535.
pub fn parse_server(value: &str) -> Result<String, Error> {
    let value = value.trim();
    let bad = || Error::BadServer {
        value: value.to_owned(),
    };
    if value.is_empty() || value.chars().any(char::is_whitespace) {
        return Err(bad());
    }
    let has_port = match value.rsplit_once(':') {
        Some((host, _)) if value.starts_with('[') => host.ends_with(']'),
        Some((host, _)) => !host.contains(':'),
        None => false,
    };
    if !has_port {
        if value.contains(':') && !value.starts_with('[') {
            return Err(bad());
        }
        return Ok(format!("{value}:{DEFAULT_PORT}"));
    }
    let (host, port) = value.rsplit_once(':').ok_or_else(bad)?;
    match port.parse::<u16>() {
        Ok(p) if p != 0 && !host.is_empty() && host != "[]" => Ok(value.to_owned()),
        _ => Err(bad()),
    }
}

/// Parses a size such as `1048576`, `64K`, `64KiB`, `1M` or `1MiB`
/// (K = 1024).
///
/// # Errors
/// When the text is not a number with an optional K/M suffix.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (digits, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => t.split_at(i),
        None => (t, ""),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("\"{text}\" is not a size; use bytes, or K/M (KiB, MiB)"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1024,
        "m" | "mb" | "mib" => 1024 * 1024,
        _ => {
            return Err(format!(
                "\"{text}\" has an unknown unit; use K or M (powers of 1024)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("\"{text}\" is too large"))
}

/// Checks a packet size against the protocol limits.
///
/// # Errors
/// When it is not a positive multiple of 16 within
/// [`Limits::max_packet_content`].
pub fn check_packet_size(size: u64) -> Result<usize, Error> {
    let max = Limits::default().max_packet_content;
    match usize::try_from(size) {
        Ok(s) if s > 0 && s % 16 == 0 && s <= max => Ok(s),
        _ => Err(Error::BadPacketSize { size, max }),
    }
}

/// Maps a request numbering given as its first code.
///
/// # Errors
/// When it is neither 1025 nor 825.
pub fn parse_codes(code: u64) -> Result<Numbering, Error> {
    match code {
        1025 => Ok(Numbering::Modern),
        825 => Ok(Numbering::Classic),
        other => Err(Error::BadCodes(other)),
    }
}

/// How packets are sized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PacketSize {
    /// About this many ciphertext bytes per packet, enlarged when a file
    /// would otherwise need more than 65,535 packets.
    Auto(usize),
    /// Exactly this many (the last packet may be shorter); a file that would
    /// need more than 65,535 packets is refused.
    Fixed(usize),
}

impl PacketSize {
    /// The number of ciphertext bytes per packet.
    pub fn bytes(self) -> usize {
        match self {
            PacketSize::Auto(n) | PacketSize::Fixed(n) => n,
        }
    }
}

/// Resolved settings for talking to a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// `HOST:PORT`.
    pub server: String,
    pub numbering: Numbering,
    pub packet_size: PacketSize,
    /// Bound on every wait for an answer and on every write.
    pub timeout: Duration,
    /// Bound on establishing the connection.
    pub connect_timeout: Duration,
    /// Speak the legacy version 3 protocol in the clear (`--legacy`)
    /// instead of secure mode.
    pub legacy: bool,
    /// The server's certificate fingerprint given up front
    /// (`--server-fingerprint`); otherwise the pin in `known_servers`.
    pub server_fingerprint: Option<protocol::secure::Fingerprint>,
    /// Connections a backup or restore of several files uses at once (1 to
    /// [`MAX_CONNECTIONS`]); each file still goes over one of them, whole.
    pub connections: u16,
    /// Legacy servers that read a whole request with one `recv()`
    /// (`--packet-gap`): write each request in one piece and leave this
    /// long between two requests sent without an answer between them.
    pub packet_gap: Option<Duration>,
}

impl Options {
    /// Defaults for `server`: 1025 numbering, 1 MiB packets, 60 s timeout.
    pub fn new(server: impl Into<String>) -> Self {
        Self {
            server: server.into(),
            numbering: Numbering::Modern,
            packet_size: PacketSize::Auto(DEFAULT_PACKET_SIZE),
            timeout: DEFAULT_TIMEOUT,
            connect_timeout: CONNECT_TIMEOUT,
            legacy: false,
            server_fingerprint: None,
            connections: DEFAULT_CONNECTIONS,
            packet_gap: None,
        }
    }

    /// The protocol dialect these options speak.
    pub fn dialect(&self) -> protocol::Dialect {
        if self.legacy {
            protocol::Dialect::Legacy
        } else {
            protocol::Dialect::Secure
        }
    }
}

/// Settings as given on the command line (all optional).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    pub server: Option<String>,
    pub name: Option<String>,
    pub packet_size: Option<u64>,
    pub codes: Option<u64>,
    pub timeout: Option<u64>,
    /// `--legacy`.
    pub legacy: bool,
    /// `--server-fingerprint`.
    pub server_fingerprint: Option<protocol::secure::Fingerprint>,
    /// `--connections`.
    pub connections: Option<u16>,
    /// `--packet-gap`, in milliseconds.
    pub packet_gap_ms: Option<u64>,
}

/// Combines flags, a legacy `transfer.info` server, and `config.toml` into
/// [`Options`], in that order of precedence. `config_path` names the
/// configuration file in error messages.
///
/// # Errors
/// When no server is known, or a value is invalid.
pub fn resolve(
    flags: &Overrides,
    legacy_server: Option<&str>,
    file: &ConfigFile,
    config_path: &Path,
) -> Result<Options, Error> {
    let server = flags
        .server
        .as_deref()
        .or(legacy_server)
        .or(file.server.as_deref())
        .ok_or_else(|| Error::NoServer {
            config: config_path.to_owned(),
        })?;
    let mut options = Options::new(parse_server(server)?);
    if let Some(size) = flags.packet_size.or(file.packet_size) {
        options.packet_size = PacketSize::Fixed(check_packet_size(size)?);
    }
    if let Some(codes) = flags.codes.or(file.codes) {
        options.numbering = parse_codes(codes)?;
    }
    if let Some(secs) = flags.timeout.or(file.timeout) {
        options.timeout = Duration::from_secs(secs.max(1));
    }
    options.legacy = flags.legacy || file.legacy.unwrap_or(false);
    if options.legacy {
        // A legacy server may keep one session per client: one connection
        // unless asked for more.
        options.connections = 1;
    }
    options.server_fingerprint = flags.server_fingerprint;
    options.packet_gap = flags.packet_gap_ms.map(Duration::from_millis);
    if let Some(n) = flags.connections.or(file.connections) {
        if !(1..=MAX_CONNECTIONS).contains(&n) {
            return Err(Error::Config {
                path: config_path.to_owned(),
                detail: format!("connections = {n}: use 1 to {MAX_CONNECTIONS}"),
            });
        }
        options.connections = n;
    }
    Ok(options)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_host_port_and_adds_the_default_port() {
        assert_eq!(parse_server("127.0.0.1:1234").unwrap(), "127.0.0.1:1234");
        assert_eq!(parse_server(" localhost ").unwrap(), "localhost:1256");
        assert_eq!(parse_server("[::1]:99").unwrap(), "[::1]:99");
        assert_eq!(parse_server("[::1]").unwrap(), "[::1]:1256");
        for bad in [
            "",
            "host:",
            "host:0",
            "host:70000",
            ":80",
            "a b:1",
            "::1",
            "host:port",
        ] {
            assert!(
                matches!(parse_server(bad), Err(Error::BadServer { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn parses_sizes_with_binary_units() {
        assert_eq!(parse_size("1024"), Ok(1024));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert!(parse_size("1G").is_err());
        assert!(parse_size("x").is_err());
    }

    #[test]
    fn accepts_packet_size_at_the_limit_and_rejects_one_block_over() {
        let max = Limits::default().max_packet_content as u64;
        assert_eq!(check_packet_size(max).unwrap() as u64, max);
        assert!(check_packet_size(max + 16).is_err());
        assert!(check_packet_size(1000).is_err());
        assert!(check_packet_size(0).is_err());
        assert_eq!(check_packet_size(16).unwrap(), 16);
    }

    #[test]
    fn flags_win_over_transfer_info_and_config_file() {
        let file = ConfigFile {
            server: Some("file:1".into()),
            codes: Some(825),
            packet_size: Some(4096),
            timeout: Some(5),
            ..Default::default()
        };
        let path = Path::new("config.toml");
        let o = resolve(&Overrides::default(), None, &file, path).unwrap();
        assert_eq!(o.server, "file:1");
        assert_eq!(o.numbering, Numbering::Classic);
        assert_eq!(o.packet_size, PacketSize::Fixed(4096));
        assert_eq!(o.timeout, Duration::from_secs(5));
        assert_eq!(
            resolve(&Overrides::default(), Some("legacy:2"), &file, path)
                .unwrap()
                .server,
            "legacy:2"
        );
        let flags = Overrides {
            server: Some("flag:3".into()),
            codes: Some(1025),
            ..Default::default()
        };
        let o = resolve(&flags, Some("legacy:2"), &file, path).unwrap();
        assert_eq!(
            (o.server.as_str(), o.numbering),
            ("flag:3", Numbering::Modern)
        );
        let none = resolve(&Overrides::default(), None, &ConfigFile::default(), path);
        assert!(matches!(none, Err(Error::NoServer { .. })));
        let default = resolve(&flags, None, &ConfigFile::default(), path).unwrap();
        assert_eq!(default.packet_size, PacketSize::Auto(DEFAULT_PACKET_SIZE));
        assert_eq!(default.connections, DEFAULT_CONNECTIONS);
        let legacy = Overrides {
            legacy: true,
            ..flags.clone()
        };
        let o = resolve(&legacy, None, &ConfigFile::default(), path).unwrap();
        assert_eq!(o.connections, 1, "one connection to a legacy server");
        let legacy_four = Overrides {
            connections: Some(4),
            ..legacy
        };
        let o = resolve(&legacy_four, None, &ConfigFile::default(), path).unwrap();
        assert_eq!(o.connections, 4, "unless asked for more");
        let eight = ConfigFile {
            server: Some("file:1".into()),
            connections: Some(8),
            ..Default::default()
        };
        assert_eq!(
            resolve(&Overrides::default(), None, &eight, path)
                .unwrap()
                .connections,
            8
        );
        let one = Overrides {
            connections: Some(1),
            ..Default::default()
        };
        assert_eq!(resolve(&one, None, &eight, path).unwrap().connections, 1);
        for bad in [0, MAX_CONNECTIONS + 1] {
            let file = ConfigFile {
                connections: Some(bad),
                ..eight.clone()
            };
            let err = resolve(&Overrides::default(), None, &file, path).unwrap_err();
            assert!(err.to_string().contains("connections"), "{err}");
        }
    }

    #[test]
    fn round_trips_the_config_file_and_rejects_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(ConfigFile::load(dir.path()).unwrap(), ConfigFile::default());
        let file = ConfigFile {
            server: Some("h:1".into()),
            name: Some("bob".into()),
            ..Default::default()
        };
        file.save(&dir.path().join("sub")).unwrap();
        assert_eq!(ConfigFile::load(&dir.path().join("sub")).unwrap(), file);
        std::fs::write(dir.path().join(CONFIG_FILE), "servr = \"x\"\n").unwrap();
        let err = ConfigFile::load(dir.path()).unwrap_err();
        assert!(err.to_string().contains("servr"), "{err}");
    }
}
