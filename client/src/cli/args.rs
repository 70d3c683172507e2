//! The arguments of `backup-client`, as clap parses them, and their help.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::feedback::Verbosity;
use crate::settings::{self, Overrides, ENV_CONFIG_DIR};

const ABOUT: &str = "Back up files to a server speaking the legacy version 3 backup protocol";

const LONG_ABOUT: &str = "\
Back up files to a server speaking the legacy version 3 backup protocol.

Every file is encrypted (AES-256-CBC under a session key the server sends \
wrapped with this client's RSA key), sent in packets, and verified: the \
server's checksum of what it stored must match ours.

Run without a command in a folder holding transfer.info (line 1 HOST:PORT, \
line 2 the user name, then one file per line), it does what a legacy client \
does: registers (or reconnects when me.info exists), backs up each file, and \
keeps me.info and priv.key in that folder. A legacy server needs --legacy \
there too: without it the client tries secure mode, and says so when the \
server turns out to be a legacy one.";

const SETTINGS_HELP: &str = "\
Settings, strongest first: command-line flags; transfer.info in the current \
directory; config.toml in the configuration directory (keys: server, name, \
packet-size, codes, timeout); built-in defaults.

The identity (me.info, priv.key) is kept in --config-dir when given, else in \
the current directory when it holds me.info or transfer.info, else in the \
default configuration directory.
";

const EXIT_STATUS: &str = "\
Exit status:
  0  success: every file was stored and verified
  1  other error (the server broke the protocol, internal error)
  2  usage or configuration error (bad flag, not registered, no server set)
  3  server unreachable (cannot connect, no answer in time, connection lost)
  4  rejected by the server (name taken, server error 4 times, key mismatch;
     retrieval not supported, client unknown to the server, history kept
     append-only)
  5  verification failed (checksums differed on all 4 attempts; a restored
     file's size, padding or checksum was not what the server announced;
     the server found its copy of a file to restore damaged)
  6  local file error (a file to back up, an identity or configuration
     file, or a restored file cannot be read or written; a name from the
     server that cannot be restored safely; a file that exists, without
     --overwrite)
  7  not found (restore, delete): the server holds no such file or version
  8  quota exceeded: the server refused a backup (with --per-file, a file)
     that would take this client over its quota
When several files fail, the status is that of the first failure.

Environment:
  BACKUP_CLIENT_DIR  configuration directory (as --config-dir)
  XDG_CONFIG_HOME    default configuration directory is
                     $XDG_CONFIG_HOME/backup-client, else
                     $HOME/.config/backup-client
  RUST_LOG           diagnostics on standard error, e.g. RUST_LOG=debug";

/// `backup-client`.
#[derive(Debug, Parser)]
#[command(name = "backup-client", version, about = ABOUT, long_about = LONG_ABOUT, after_help = format!("{SETTINGS_HELP}\n{EXIT_STATUS}"))]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub global: GlobalArgs,
}

/// Options accepted by every command.
#[derive(Debug, Clone, Default, Args)]
pub struct GlobalArgs {
    /// Directory of config.toml, me.info and priv.key
    /// [default: $XDG_CONFIG_HOME/backup-client or ~/.config/backup-client]
    #[arg(long, global = true, env = ENV_CONFIG_DIR, value_name = "DIR")]
    pub config_dir: Option<PathBuf>,

    /// Server address (overrides transfer.info and config.toml)
    #[arg(long, global = true, value_name = "HOST:PORT")]
    pub server: Option<String>,

    /// Ciphertext bytes per packet: a multiple of 16 up to 1088K; K and M
    /// suffixes allowed. Setting it fixes the size, for legacy servers that
    /// need one [default: 1M, enlarged when a file needs over 65535 packets]
    #[arg(long, global = true, value_name = "BYTES", value_parser = parse_size_arg)]
    pub packet_size: Option<u64>,

    /// Request numbering: 1025 (codes 1025-1031) or 825 (825-828, 900-902)
    /// [default: 1025]
    #[arg(long, global = true, value_name = "1025|825", value_parser = parse_codes_arg)]
    pub codes: Option<u64>,

    /// Seconds to wait for the server before giving up [default: 60]
    #[arg(long, global = true, value_name = "SECONDS")]
    pub timeout: Option<u64>,

    /// Speak the legacy version 3 protocol, in the clear, to a legacy
    /// server or a server's --legacy-listen port. INSECURE: the server is
    /// not authenticated and files can be read or altered in transit
    /// [default: secure mode, TLS 1.3]
    #[arg(long, global = true)]
    pub legacy: bool,

    /// The server's certificate fingerprint (`backup-server fingerprint`
    /// prints it): trusted for this run and pinned once the session is
    /// established [default: the pin in known_servers; at the first
    /// registration with a server, trust on first use]
    #[arg(long, global = true, value_name = "SHA256:HEX", value_parser = parse_fingerprint_arg)]
    pub server_fingerprint: Option<protocol::secure::Fingerprint>,

    /// Milliseconds to leave between packets, each written as one send:
    /// for legacy servers that read a whole request with one recv() and
    /// refuse a packet that TCP split or joined to the next (e.g.
    /// `--legacy --packet-size 8192 --packet-gap 50`) [default: none]
    #[arg(long, global = true, value_name = "MS", requires = "packet_size")]
    pub packet_gap: Option<u64>,

    /// Files backed up or restored at once, each over a connection of its
    /// own (1 to 16) [default: 4; with --legacy, 1]
    #[arg(long, global = true, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=i64::from(settings::MAX_CONNECTIONS)))]
    pub connections: Option<u16>,

    /// Print nothing but errors
    #[arg(short, long, global = true)]
    pub quiet: bool,

    /// Print a JSON summary on standard output (errors still go to standard
    /// error)
    #[arg(long, global = true)]
    pub json: bool,

    /// Back up and restore file by file, as before snapshots: the history
    /// that `list` shows. Always so with --legacy and in a folder holding
    /// transfer.info [default: snapshots in secure mode]
    #[arg(long, global = true)]
    pub per_file: bool,

    /// Back up with the backup-only key in FILE (`key export
    /// --backup-only`): snapshots are named and sealed with it, and this
    /// client cannot read any (`key-file` in config.toml) [default: the
    /// repository key from its envelope on the server]
    #[arg(long, global = true, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Register with a server: make an RSA key pair, get a client id, and
    /// save the identity (me.info, priv.key)
    #[command(after_help = EXIT_STATUS)]
    Register(RegisterArgs),
    /// Back up files and directories recursively. In secure mode this makes
    /// a snapshot: only what the server does not hold yet is sent, encrypted
    /// with a key the server never sees
    #[command(after_help = EXIT_STATUS)]
    Backup(BackupArgs),
    /// List this client's snapshots
    #[command(after_help = EXIT_STATUS)]
    Snapshots(SnapshotsArgs),
    /// List what a snapshot holds: `ls [SNAPSHOT][:PATH]`
    #[command(after_help = EXIT_STATUS)]
    Ls(LsArgs),
    /// What changed between two snapshots: + added, - removed, M content,
    /// T type, U mode or time only
    #[command(after_help = EXIT_STATUS)]
    Diff(DiffArgs),
    /// Check that snapshots restore: every tree is read, opened and
    /// parsed, and the server is asked whether it holds every chunk; with
    /// --read-data (or a subset of it) the chunks are read and opened too.
    /// Names each damaged snapshot and path (exit status 5)
    #[command(after_help = CHECK_HELP)]
    Check(CheckArgs),
    /// List the files stored on the server: name, size, time stored (UTC)
    /// and checksum of the newest version of each, or of every version
    #[command(after_help = EXIT_STATUS)]
    List(ListArgs),
    /// Restore files from the server, verifying each: one file by name, or
    /// the newest version of every file with --all. Works from the identity
    /// files (me.info, priv.key) and the server address alone
    #[command(after_help = RESTORE_HELP)]
    Restore(RestoreArgs),
    /// Delete every version of a file from the server
    #[command(after_help = EXIT_STATUS)]
    Delete(DeleteArgs),
    /// Manage the repository key: a passphrase to recover it without the
    /// key files, a backup-only key, and the envelope for the RSA key
    #[command(after_help = KEY_HELP)]
    Key(KeyArgs),
    /// Print a shell completion script: bash, zsh, fish, elvish or
    /// powershell (e.g. `backup-client completions bash >
    /// /etc/bash_completion.d/backup-client`)
    Completions(CompletionsArgs),
    /// Print the manual page (roff), or write one page per command into a
    /// directory with --out
    Man(ManArgs),
    /// Remove snapshots: those named, and those the --keep-* rules do not
    /// keep (a snapshot is kept when any rule keeps it; times are UTC). The
    /// server reclaims their space at its next prune. An append-only client
    /// is refused (exit status 4)
    #[command(after_help = EXIT_STATUS)]
    Forget(ForgetArgs),
}

/// `forget`.
#[derive(Debug, Clone, Args)]
pub struct ForgetArgs {
    /// Snapshots to remove, by number
    #[arg(value_name = "SNAPSHOT")]
    pub snapshots: Vec<u64>,
    /// Keep the N newest snapshots
    #[arg(long, value_name = "N")]
    pub keep_last: Option<u32>,
    /// Keep the newest snapshot of each of the N newest hours that have one
    #[arg(long, value_name = "N")]
    pub keep_hourly: Option<u32>,
    /// Keep the newest snapshot of each of the N newest days that have one
    #[arg(long, value_name = "N")]
    pub keep_daily: Option<u32>,
    /// Keep the newest snapshot of each of the N newest weeks (from Monday)
    /// that have one
    #[arg(long, value_name = "N")]
    pub keep_weekly: Option<u32>,
    /// Keep the newest snapshot of each of the N newest months that have one
    #[arg(long, value_name = "N")]
    pub keep_monthly: Option<u32>,
    /// Keep the newest snapshot of each of the N newest years that have one
    #[arg(long, value_name = "N")]
    pub keep_yearly: Option<u32>,
    /// Keep snapshots made within this long before the newest one (e.g.
    /// 30d, 2w 3d, 12h)
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub keep_within: Option<std::time::Duration>,
    /// Keep snapshots with this tag (may be repeated)
    #[arg(long, value_name = "TAG")]
    pub keep_tag: Vec<String>,
    /// List what would be removed; remove nothing
    #[arg(long)]
    pub dry_run: bool,
}

/// `completions`.
#[derive(Debug, Clone, Args)]
pub struct CompletionsArgs {
    /// The shell to complete for
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// `man`.
#[derive(Debug, Clone, Args)]
pub struct ManArgs {
    /// Write backup-client.1 and a page per command (backup-client-backup.1,
    /// ...) into DIR instead of printing the main page
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

const KEY_HELP: &str = "\
The passphrase comes from --passphrase-file FILE (its first line), else the \
BACKUP_PASSPHRASE environment variable, else a prompt on the terminal without \
echo (asked twice by add-passphrase).

Recovering on a new machine, with no key files:
  backup-client --server HOST:PORT --server-fingerprint SHA256:... \\
      restore --passphrase --name NAME --to DIR
A passphrase login may only read (snapshots, ls, diff, restore).

Making a machine backup-only:
  backup-client key add-passphrase
  backup-client key export --backup-only --out backup.key
  backup-client key remove-rsa-envelope
  backup-client --key-file backup.key backup PATH...

Exit status:
  0  success
  2  usage or configuration error (no passphrase given, a backup-only key
     where the full key is needed)
  3  server unreachable
  4  rejected by the server (wrong passphrase, no passphrase set, envelope
     kept: append-only, or it is the last way to the repository key)
  6  local file error (the key file cannot be written or read)";

/// `key`.
#[derive(Debug, Clone, Args)]
pub struct KeyArgs {
    #[command(subcommand)]
    pub command: KeyCommand,
}

/// The `key` commands.
#[derive(Debug, Clone, Subcommand)]
pub enum KeyCommand {
    /// Keep the repository key on the server under a passphrase as well
    /// (Argon2id), so that it can be recovered without the key files
    /// (replaces an earlier passphrase)
    AddPassphrase(PassphraseFile),
    /// Write a key file: with --backup-only, the keys that name and seal
    /// snapshots, not the one that opens them
    Export(ExportArgs),
    /// Remove the repository key's envelope for this client's RSA key, so
    /// that priv.key no longer opens the snapshots. Refused unless a
    /// passphrase envelope exists
    RemoveRsaEnvelope,
}

/// Where a passphrase comes from.
#[derive(Debug, Clone, Default, Args)]
pub struct PassphraseFile {
    /// Read the passphrase from the first line of FILE [default:
    /// BACKUP_PASSPHRASE, else a prompt]
    #[arg(long, value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,
}

/// `key export`.
#[derive(Debug, Clone, Args)]
pub struct ExportArgs {
    /// Export the backup-only key (the only kind there is)
    #[arg(long, required = true)]
    pub backup_only: bool,
    /// The file to write (mode 0600)
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

/// Logging in with the passphrase instead of the key files (read only).
#[derive(Debug, Clone, Default, Args)]
pub struct LoginArgs {
    /// Log in with the client's passphrase (`key add-passphrase`) instead
    /// of priv.key: for a machine without the key files. Needs the server
    /// pinned or --server-fingerprint
    #[arg(long)]
    pub passphrase: bool,
    /// Read the passphrase from the first line of FILE [default:
    /// BACKUP_PASSPHRASE, else a prompt]
    #[arg(long, value_name = "FILE", requires = "passphrase")]
    pub passphrase_file: Option<PathBuf>,
    /// The client's name, for --passphrase [default: `name` in config.toml]
    #[arg(long = "name", value_name = "NAME", requires = "passphrase")]
    pub login_name: Option<String>,
}

const CHECK_HELP: &str = "\
Without --read-data, content is known to be held only by the server's word \
(its index): a pack damaged or lost on its disk is found by --read-data, or \
by the server's operator with `backup-server scrub`, which needs no key. \
Each object is read once however many snapshots reference it.

Exit status:
  0  no damage found
  2  usage error (a backup-only key, which cannot read)
  3  server unreachable
  4  rejected by the server (wrong passphrase; the server failed more
     than 64 times while reading objects)
  5  damage found: each damaged snapshot and path is named on standard
     error
  7  not found: no such snapshot";

/// `check`.
#[derive(Debug, Clone, Args)]
pub struct CheckArgs {
    /// Snapshots to check, by number or `latest` [default: every snapshot
    /// of this client]
    #[arg(value_name = "SNAPSHOT")]
    pub snapshots: Vec<String>,
    /// Also fetch and open every chunk: its tag and that it hashes to its
    /// id
    #[arg(long, conflicts_with = "read_data_subset")]
    pub read_data: bool,
    /// Fetch and open only a part of the chunks: `P%` chosen at random
    /// (e.g. 5% or 0.5%), or `N/M`, the N-th of M groups by object id (1/5
    /// to 5/5 cover everything once)
    #[arg(long, value_name = "P% | N/M")]
    pub read_data_subset: Option<crate::snapshot::check::Subset>,
    #[command(flatten)]
    pub login: LoginArgs,
}

/// `snapshots`.
#[derive(Debug, Clone, Default, Args)]
pub struct SnapshotsArgs {
    #[command(flatten)]
    pub login: LoginArgs,
}

const RESTORE_HELP: &str = "\
A file is written to a temporary file (.NAME.restore-XXXXXX.part) next to its \
destination while it arrives, and renamed into place only once its size, \
padding and checksum are right; a failed or interrupted restore leaves no \
partial file (an interrupted one's temporary file is removed by the next \
restore into that folder). Existing files are never replaced without \
--overwrite. Names from the server are restored only as plain relative paths \
inside the destination folder: absolute names, drive letters, \".\" and \"..\" \
components, control characters and symbolic links in the way are refused, \
file by file. Restored files have mode 0600.

Exit status:
  0  every file was restored and verified (or there was nothing to restore)
  1  other error (the server broke the protocol, internal error)
  2  usage or configuration error (bad flag, not registered, no server set)
  3  server unreachable (cannot connect, no answer in time, connection lost)
  4  rejected by the server (retrieval not supported, client unknown to the
     server)
  5  verification failed (a restored file's size, padding or checksum was not
     what the server announced, or the server found its copy damaged: its
     operator should run `backup-server scrub`)
  6  local file error (a file cannot be written, a name cannot be restored
     safely, a file exists and --overwrite was not given)
  7  not found: the server holds no such file or version
When several files fail, the status is that of the first failure.";

/// `list`.
#[derive(Debug, Clone, Args)]
pub struct ListArgs {
    /// Show every stored version, not only the newest of each file
    #[arg(long)]
    pub versions: bool,
}

/// `diff`.
#[derive(Debug, Clone, Args)]
pub struct DiffArgs {
    /// The older snapshot (its number, or `latest`)
    #[arg(value_name = "SNAPSHOT")]
    pub from: String,
    /// The newer snapshot [default: latest]
    #[arg(value_name = "SNAPSHOT")]
    pub to: Option<String>,
    #[command(flatten)]
    pub login: LoginArgs,
}

/// `ls`.
#[derive(Debug, Clone, Args)]
pub struct LsArgs {
    /// The snapshot (its number, or `latest`) and a path in it
    /// [default: the newest snapshot, from its root]
    #[arg(value_name = "[SNAPSHOT][:PATH]")]
    pub spec: Option<String>,
    #[command(flatten)]
    pub login: LoginArgs,
}

/// `restore`.
#[derive(Debug, Clone, Args)]
pub struct RestoreArgs {
    /// What to restore: a snapshot (its number, or `latest`) and a path in
    /// it, `[SNAPSHOT][:PATH]` [default: the newest snapshot]; with
    /// --per-file, the name of a file as `list` shows it
    #[arg(value_name = "SNAPSHOT:PATH | NAME", conflicts_with = "all")]
    pub name: Option<String>,

    /// Version to restore (as `list --versions` shows it) [default: the newest]
    #[arg(long, value_name = "V", conflicts_with = "all")]
    pub version: Option<u64>,

    /// Where to write: a folder (the file goes inside it under its name), or
    /// a file path [default: the current directory]; with --all, the folder
    /// to restore into
    #[arg(long, value_name = "PATH", required_if_eq("all", "true"))]
    pub to: Option<PathBuf>,

    /// Restore the newest version of every file into the folder --to
    #[arg(long)]
    pub all: bool,

    /// Replace existing files (atomically)
    #[arg(long)]
    pub overwrite: bool,

    #[command(flatten)]
    pub login: LoginArgs,
}

/// `delete`.
#[derive(Debug, Clone, Args)]
pub struct DeleteArgs {
    /// Name of the file on the server (as `list` shows it)
    #[arg(value_name = "NAME")]
    pub name: String,
}

/// `register`.
#[derive(Debug, Clone, Args)]
pub struct RegisterArgs {
    /// User name to register (1 to 254 printable characters)
    /// [default: `name` from transfer.info or config.toml]
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,

    /// Register anew even if an identity exists (it is replaced)
    #[arg(long)]
    pub force: bool,
}

/// `backup`.
#[derive(Debug, Clone, Args)]
pub struct BackupArgs {
    /// Files and directories to back up. A file is stored under its own
    /// name; a file inside a directory under its path relative to that
    /// directory, with / separators. A PATH that is a symbolic link is
    /// followed. Paths named here (or in --files-from) are backed up
    /// whatever the exclusion rules say; the rules apply to what is found
    /// inside directories
    #[arg(required_unless_present = "files_from", value_name = "PATH")]
    pub paths: Vec<PathBuf>,

    /// Also back up the paths listed in FILE, one a line (blank lines and
    /// lines starting with # are ignored; relative paths are taken from the
    /// current directory). Repeatable
    #[arg(long = "files-from", value_name = "FILE")]
    pub files_from: Vec<PathBuf>,

    /// Leave out what matches PATTERN, in gitignore syntax, matched against
    /// the path relative to the PATH it is found under: `*.log` anywhere,
    /// `/build` at the top only, `cache/` directories only, `!keep.log` to
    /// take a file back, `**` across directories. Repeatable. A folder's
    /// .backupignore file holds patterns of the same syntax for that folder
    /// and below, and always applies
    #[arg(long = "exclude", value_name = "PATTERN")]
    pub exclude: Vec<String>,

    /// Read exclude patterns from FILE, one a line, as --exclude (blank
    /// lines and lines starting with # are ignored). Repeatable
    #[arg(long = "exclude-file", value_name = "FILE")]
    pub exclude_files: Vec<PathBuf>,

    /// As --exclude, ignoring case. Repeatable
    #[arg(long = "iexclude", value_name = "PATTERN")]
    pub iexclude: Vec<String>,

    /// Leave out directories holding a CACHEDIR.TAG file with its standard
    /// signature (https://bford.info/cachedir/)
    #[arg(long)]
    pub exclude_caches: bool,

    /// Stay on the file system of each PATH: leave out what is mounted
    /// below it
    #[arg(short = 'x', long)]
    pub one_file_system: bool,

    /// List what would be backed up and its total size, then stop: nothing
    /// is read but the directories, the server is not contacted and
    /// nothing is sent
    #[arg(short = 'n', long)]
    pub dry_run: bool,

    /// Back up the file a symbolic link inside a directory points to, under
    /// the link's name [default: such links are skipped, each with a note].
    /// Links to directories inside a directory are never followed. Snapshots
    /// keep links as links
    #[arg(long)]
    pub follow_symlinks: bool,

    /// A tag for the snapshot (repeatable)
    #[arg(long = "tag", value_name = "TAG")]
    pub tags: Vec<String>,

    /// The host name the snapshot records [default: this machine's]
    #[arg(long, value_name = "NAME")]
    pub host: Option<String>,

    /// Read every file, even those the file cache says are unchanged since
    /// the last snapshot (same size, times, inode and device)
    #[arg(long)]
    pub force_read: bool,
}

fn parse_size_arg(text: &str) -> Result<u64, String> {
    let size = settings::parse_size(text)?;
    settings::check_packet_size(size).map_err(|e| e.to_string())?;
    Ok(size)
}

fn parse_codes_arg(text: &str) -> Result<u64, String> {
    match text.trim() {
        "1025" => Ok(1025),
        "825" => Ok(825),
        other => Err(format!(
            "\"{other}\" is not a request numbering; use 1025 or 825"
        )),
    }
}

impl GlobalArgs {
    pub(super) fn overrides(&self, name: Option<String>) -> Overrides {
        Overrides {
            server: self.server.clone(),
            name,
            packet_size: self.packet_size,
            codes: self.codes,
            timeout: self.timeout,
            legacy: self.legacy,
            server_fingerprint: self.server_fingerprint,
            connections: self.connections,
            packet_gap_ms: self.packet_gap,
        }
    }

    pub(super) fn verbosity(&self) -> Verbosity {
        if self.json {
            Verbosity::Json
        } else if self.quiet {
            Verbosity::Quiet
        } else {
            Verbosity::Normal
        }
    }
}

fn parse_fingerprint_arg(text: &str) -> Result<protocol::secure::Fingerprint, String> {
    text.parse()
        .map_err(|e: protocol::secure::FingerprintError| e.to_string())
}
