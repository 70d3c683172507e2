//! Command-line flags; each has an environment variable of the same meaning.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Backup server for the legacy version 3 protocol.
///
/// With no options it serves on port 1256 (or the port in `./port.info`) on
/// every interface, keeping its data under `$XDG_DATA_HOME/backup-server`
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

    /// Port to listen on, on every IPv4 interface. Overrides `port.info`.
    #[arg(long, env = "BACKUP_SERVER_PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub port: Option<u16>,

    /// Directory for the metadata database and the stored files.
    #[arg(long, env = "BACKUP_SERVER_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// TOML file with any of the settings below (keys: listen, port,
    /// data_dir, max_connections, idle_timeout_secs, request_timeout_secs,
    /// shutdown_grace_secs, silent_crc_retry, keep_versions,
    /// max_packet_bytes, max_file_bytes).
    #[arg(long, env = "BACKUP_SERVER_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Connections served at once; one more is answered 1607 and closed
    /// [default: 256].
    #[arg(long, env = "BACKUP_SERVER_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<usize>,

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

    /// Committed versions kept per file name; 1 replaces the previous
    /// version on every commit, as legacy servers do [default: 1].
    #[arg(long, env = "BACKUP_SERVER_KEEP_VERSIONS", value_name = "N")]
    pub keep_versions: Option<u32>,

    /// Largest ciphertext slice one send-file packet may carry; bounds the
    /// memory of each connection [default: 1114112].
    #[arg(long, env = "BACKUP_SERVER_MAX_PACKET_BYTES", value_name = "BYTES")]
    pub max_packet_bytes: Option<usize>,

    /// Largest file accepted, in plaintext bytes [default and maximum:
    /// 4294967295].
    #[arg(long, env = "BACKUP_SERVER_MAX_FILE_BYTES", value_name = "BYTES")]
    pub max_file_bytes: Option<u64>,
}
