//! The command line of `backup-client`, and what each command does.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use protocol::{FileName, UserName};

use crate::engine::Client;
use crate::error::Error;
use crate::feedback::{Console, Feedback, Verbosity};
use crate::files;
use crate::identity::{IdentityStore, ME_INFO};
use crate::legacy::{TransferInfo, TRANSFER_INFO};
use crate::report::{entry_json, error_json, FileReport, Outcome, Report, RestoreOutcome};
use crate::settings::{self, ConfigFile, Overrides, CONFIG_FILE, ENV_CONFIG_DIR};

const ABOUT: &str = "Back up files to a server speaking the legacy version 3 backup protocol";

const LONG_ABOUT: &str = "\
Back up files to a server speaking the legacy version 3 backup protocol.

Every file is encrypted (AES-256-CBC under a session key the server sends \
wrapped with this client's RSA key), sent in packets, and verified: the \
server's checksum of what it stored must match ours.

Run without a command in a folder holding transfer.info (line 1 HOST:PORT, \
line 2 the user name, then one file per line), it does what a legacy client \
does: registers (or reconnects when me.info exists), backs up each file, and \
keeps me.info and priv.key in that folder.";

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
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Register with a server: make an RSA key pair, get a client id, and
    /// save the identity (me.info, priv.key)
    #[command(after_help = EXIT_STATUS)]
    Register(RegisterArgs),
    /// Back up files, and directories recursively, verifying each file
    #[command(after_help = EXIT_STATUS)]
    Backup(BackupArgs),
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

/// `restore`.
#[derive(Debug, Clone, Args)]
pub struct RestoreArgs {
    /// Name of the file on the server (as `list` shows it)
    #[arg(
        value_name = "NAME",
        required_unless_present = "all",
        conflicts_with = "all"
    )]
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
    /// followed
    #[arg(required = true, value_name = "PATH")]
    pub paths: Vec<PathBuf>,

    /// Back up the file a symbolic link inside a directory points to, under
    /// the link's name [default: such links are skipped, each with a note].
    /// Links to directories inside a directory are never followed
    #[arg(long)]
    pub follow_symlinks: bool,
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
    fn overrides(&self, name: Option<String>) -> Overrides {
        Overrides {
            server: self.server.clone(),
            name,
            packet_size: self.packet_size,
            codes: self.codes,
            timeout: self.timeout,
            legacy: self.legacy,
            server_fingerprint: self.server_fingerprint,
            connections: self.connections,
        }
    }

    fn verbosity(&self) -> Verbosity {
        if self.json {
            Verbosity::Json
        } else if self.quiet {
            Verbosity::Quiet
        } else {
            Verbosity::Normal
        }
    }
}

/// Where things are for one invocation.
struct Places {
    /// The configuration directory (for config.toml), if one can be found.
    config_dir: Option<PathBuf>,
    /// Where me.info and priv.key live.
    identity_dir: PathBuf,
    config: ConfigFile,
}

impl Places {
    fn config_path(&self) -> PathBuf {
        self.config_dir
            .as_deref()
            .unwrap_or(Path::new("~/.config/backup-client"))
            .join(CONFIG_FILE)
    }
}

fn places(global: &GlobalArgs, cwd: &Path, legacy_folder: bool) -> Result<Places, Error> {
    let config_dir = global
        .config_dir
        .clone()
        .or_else(settings::default_config_dir);
    let config = match &config_dir {
        Some(dir) => ConfigFile::load(dir)?,
        None => ConfigFile::default(),
    };
    let cwd_has_legacy = cwd.join(ME_INFO).exists() || cwd.join(TRANSFER_INFO).exists();
    let identity_dir = if legacy_folder {
        cwd.to_owned()
    } else if let Some(dir) = &global.config_dir {
        dir.clone()
    } else if cwd_has_legacy {
        cwd.to_owned()
    } else {
        config_dir.clone().ok_or(Error::NoConfigDir)?
    };
    Ok(Places {
        config_dir,
        identity_dir,
        config,
    })
}

fn user_name(text: &str) -> Result<UserName, Error> {
    UserName::new(text.trim().as_bytes()).map_err(|e| Error::BadUserName {
        name: text.to_owned(),
        reason: e.to_string(),
    })
}

/// Runs a parsed command line with `cwd` as the current directory, printing
/// as the flags ask, and returns the exit status.
pub async fn run(cli: Cli, cwd: &Path) -> u8 {
    let console = Arc::new(Console::new(cli.global.verbosity()));
    let result = match &cli.command {
        Some(Command::Register(args)) => register(&cli.global, args, cwd, &console).await,
        Some(Command::Backup(args)) => {
            let paths: Vec<PathBuf> = args.paths.iter().map(|p| cwd.join(p)).collect();
            let links = if args.follow_symlinks {
                files::Links::FollowToFiles
            } else {
                files::Links::Skip
            };
            backup(&cli.global, paths, links, cwd, false, &console).await
        }
        Some(Command::List(args)) => list(&cli.global, args, cwd, &console).await,
        Some(Command::Restore(args)) => restore(&cli.global, args, cwd, &console).await,
        Some(Command::Delete(args)) => delete(&cli.global, args, cwd, &console).await,
        None => {
            backup(
                &cli.global,
                Vec::new(),
                files::Links::Skip,
                cwd,
                true,
                &console,
            )
            .await
        }
    };
    console.done();
    match result {
        Ok(code) => code,
        Err(e) => {
            console.print_error(&e.to_string());
            if cli.global.json {
                let mut v = serde_json::json!({ "ok": false, "exit_code": e.exit_code() });
                v["error"] = error_json(&e);
                println!("{v}");
            }
            e.exit_code()
        }
    }
}

async fn register(
    global: &GlobalArgs,
    args: &RegisterArgs,
    cwd: &Path,
    console: &Arc<Console>,
) -> Result<u8, Error> {
    let places = places(global, cwd, false)?;
    let legacy = TransferInfo::load(cwd)?;
    let overrides = global.overrides(args.name.clone());
    let options = settings::resolve(
        &overrides,
        legacy.as_ref().map(|t| t.server.as_str()),
        &places.config,
        &places.config_path(),
    )?;
    let name = match (&args.name, &legacy, &places.config.name) {
        (Some(n), _, _) => user_name(n)?,
        (None, Some(t), _) => t.name.clone(),
        (None, None, Some(n)) => user_name(n)?,
        (None, None, None) => {
            return Err(Error::NoName {
                config: places.config_path(),
            })
        }
    };
    let store = IdentityStore::new(&places.identity_dir);
    let feedback: Arc<dyn Feedback> = console.clone();
    let client = Client::new(options.clone(), store).with_feedback(feedback);
    let identity = client.register(name, args.force).await?;
    // Remember the server the identity belongs to, unless a legacy folder
    // (whose transfer.info names it) holds the identity.
    if places.config_dir.as_deref() == Some(places.identity_dir.as_path()) {
        let mut config = places.config.clone();
        if config.server.as_deref() != Some(options.server.as_str()) || config.name.is_none() {
            config.server = Some(options.server.clone());
            config.name.get_or_insert_with(|| identity.name.to_string());
            config.save(&places.identity_dir)?;
        }
    }
    if global.json {
        let v = serde_json::json!({
            "ok": true,
            "exit_code": 0,
            "server": options.server,
            "name": identity.name.to_string(),
            "client_id": identity.client_id.to_hex(),
            "identity_dir": places.identity_dir.display().to_string(),
        });
        println!("{v}");
    } else {
        console.say(&format!(
            "registered as \"{}\" (client id {}) with {}; identity saved in {}",
            identity.name,
            identity.client_id,
            options.server,
            places.identity_dir.display()
        ));
    }
    Ok(0)
}

/// `backup PATH...`, or the legacy job when `legacy_folder` is set (files,
/// server and name then come from transfer.info in `cwd`).
async fn backup(
    global: &GlobalArgs,
    paths: Vec<PathBuf>,
    links: files::Links,
    cwd: &Path,
    legacy_folder: bool,
    console: &Arc<Console>,
) -> Result<u8, Error> {
    let legacy = TransferInfo::load(cwd)?;
    let places = places(global, cwd, legacy_folder)?;
    let paths = match (&legacy, legacy_folder) {
        (Some(t), true) => t.files.clone(),
        (None, true) => {
            return Err(Error::NoCommand {
                dir: cwd.to_owned(),
            })
        }
        (_, false) => paths,
    };
    let options = settings::resolve(
        &global.overrides(None),
        legacy.as_ref().map(|t| t.server.as_str()),
        &places.config,
        &places.config_path(),
    )?;
    let register_as = match (&legacy, &places.config.name) {
        (Some(t), _) => Some(t.name.clone()),
        (None, Some(n)) => Some(user_name(n)?),
        (None, None) => None,
    };
    let store = IdentityStore::new(&places.identity_dir);
    if let (Some(t), Ok(Some(identity))) = (&legacy, store.load()) {
        if identity.name != t.name {
            console.notice(&format!(
                "me.info names \"{}\" and transfer.info \"{}\"; using \"{}\", the name the server knows",
                identity.name, t.name, identity.name
            ));
        }
    }
    let collected = files::collect_with(&paths, links);
    for skipped in &collected.skipped {
        console.notice(&format!(
            "skipped {}: {}",
            skipped.path.display(),
            skipped.reason.describe()
        ));
    }
    let feedback: Arc<dyn Feedback> = console.clone();
    let client = Client::new(options, store).with_feedback(feedback);
    let mut report = if collected.items.is_empty() {
        Report {
            server: client.options().server.clone(),
            ..Report::default()
        }
    } else {
        client.backup(collected.items, register_as.as_ref()).await?
    };
    report.skipped = collected.skipped;
    // Paths that could not even be listed are failures of the run too.
    for error in collected.errors {
        let path = match &error {
            Error::ReadFile { path, .. }
            | Error::DuplicateName { path, .. }
            | Error::NotAFile { path }
            | Error::NothingToBackUp { path }
            | Error::BadFileName { path, .. } => path.clone(),
            _ => PathBuf::new(),
        };
        let file = FileReport {
            path,
            name: String::new(),
            size: 0,
            outcome: Outcome::Failed(error),
        };
        console.finished(&file);
        report.files.push(file);
    }
    summarize(&report, global, console);
    Ok(report.exit_code())
}

/// A client for a retrieval command: the identity and the server come from
/// the same places as for `backup`.
fn retrieval_client(
    global: &GlobalArgs,
    cwd: &Path,
    console: &Arc<Console>,
) -> Result<Client, Error> {
    let legacy = TransferInfo::load(cwd)?;
    let places = places(global, cwd, false)?;
    let options = settings::resolve(
        &global.overrides(None),
        legacy.as_ref().map(|t| t.server.as_str()),
        &places.config,
        &places.config_path(),
    )?;
    let store = IdentityStore::new(&places.identity_dir);
    let feedback: Arc<dyn Feedback> = console.clone();
    Ok(Client::new(options, store).with_feedback(feedback))
}

fn file_name(text: &str) -> Result<FileName, Error> {
    FileName::try_from(text).map_err(|e| Error::BadName {
        name: text.to_owned(),
        reason: e.to_string(),
    })
}

/// `2026-11-27 10:03:58` for Unix seconds, in UTC.
pub fn utc_time(secs: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
    // RFC 3339 (`2026-11-27T10:03:58Z`) read as a person would write it.
    humantime::format_rfc3339_seconds(t)
        .to_string()
        .replacen('T', " ", 1)
        .trim_end_matches('Z')
        .to_owned()
}

async fn list(
    global: &GlobalArgs,
    args: &ListArgs,
    cwd: &Path,
    console: &Arc<Console>,
) -> Result<u8, Error> {
    let client = retrieval_client(global, cwd, console)?;
    let entries = client.list(args.versions).await?;
    if global.json {
        let files: Vec<_> = entries.iter().map(entry_json).collect();
        let v = serde_json::json!({
            "ok": true,
            "exit_code": 0,
            "server": client.options().server,
            "all_versions": args.versions,
            "files": files,
        });
        println!("{v}");
        return Ok(0);
    }
    // The listing is the output asked for: printed even with --quiet.
    let mut out = String::new();
    if args.versions {
        out.push_str("VERSION           SIZE  STORED (UTC)              CKSUM  NAME\n");
    } else {
        out.push_str("         SIZE  STORED (UTC)              CKSUM  NAME\n");
    }
    for e in &entries {
        let line = if args.versions {
            format!(
                "{:<7} {:>13}  {}  {:>10}  {}\n",
                e.version,
                e.size,
                utc_time(e.stored_at),
                e.cksum,
                e.file
            )
        } else {
            format!(
                "{:>13}  {}  {:>10}  {}\n",
                e.size,
                utc_time(e.stored_at),
                e.cksum,
                e.file
            )
        };
        out.push_str(&line);
    }
    print!("{out}");
    let names: std::collections::HashSet<&[u8]> =
        entries.iter().map(|e| e.file.as_bytes()).collect();
    console.say(&format!(
        "{} file{}{} on {}",
        names.len(),
        if names.len() == 1 { "" } else { "s" },
        if args.versions {
            format!(", {} versions", entries.len())
        } else {
            String::new()
        },
        client.options().server
    ));
    Ok(0)
}

async fn restore(
    global: &GlobalArgs,
    args: &RestoreArgs,
    cwd: &Path,
    console: &Arc<Console>,
) -> Result<u8, Error> {
    let client = retrieval_client(global, cwd, console)?;
    let to = args.to.as_ref().map(|p| cwd.join(p));
    let report = match (&args.name, args.all, &to) {
        (_, true, Some(dir)) => client.restore_all(dir, args.overwrite).await?,
        (Some(name), false, to) => {
            let name = file_name(name)?;
            client
                .restore(
                    &name,
                    args.version.unwrap_or(0),
                    to.as_deref(),
                    cwd,
                    args.overwrite,
                )
                .await?
        }
        // clap requires NAME or --all --to.
        _ => {
            return Err(Error::Internal(
                "restore needs NAME, or --all with --to".into(),
            ))
        }
    };
    if global.json {
        println!("{}", report.to_json());
        return Ok(report.exit_code());
    }
    let restored = report
        .files
        .iter()
        .filter(|f| matches!(f.outcome, RestoreOutcome::Restored { .. }))
        .count();
    let total = report.files.len();
    if total == 0 {
        console.say(&format!(
            "the server at {} holds no files of this client; nothing was restored",
            report.server
        ));
    } else if report.ok() {
        console.say(&format!(
            "{restored} file{} restored and verified from {} ({} in {:.1} s, {:.1} MB/s)",
            if restored == 1 { "" } else { "s" },
            report.server,
            indicatif::HumanBytes(report.restored_bytes()),
            report.elapsed.as_secs_f64(),
            report.megabytes_per_second()
        ));
    } else {
        console.say(&format!(
            "{restored} of {total} files restored and verified from {}; see the errors above",
            report.server
        ));
    }
    Ok(report.exit_code())
}

async fn delete(
    global: &GlobalArgs,
    args: &DeleteArgs,
    cwd: &Path,
    console: &Arc<Console>,
) -> Result<u8, Error> {
    let name = file_name(&args.name)?;
    let client = retrieval_client(global, cwd, console)?;
    let versions = client.delete(&name).await?;
    if global.json {
        let v = serde_json::json!({
            "ok": true,
            "exit_code": 0,
            "server": client.options().server,
            "name": name.to_string_lossy(),
            "deleted_versions": versions,
        });
        println!("{v}");
    } else {
        console.say(&format!(
            "deleted \"{name}\" ({versions} version{}) from {}",
            if versions == 1 { "" } else { "s" },
            client.options().server
        ));
    }
    Ok(0)
}

fn summarize(report: &Report, global: &GlobalArgs, console: &Console) {
    if global.json {
        println!("{}", report.to_json());
        return;
    }
    let stored = report.files.iter().filter(|f| f.is_stored()).count();
    let total = report.files.len();
    let bytes = indicatif::HumanBytes(report.stored_bytes());
    let secs = report.elapsed.as_secs_f64();
    let skipped = match report.skipped.len() {
        0 => String::new(),
        1 => "; 1 entry skipped, see the note above".to_owned(),
        n => format!("; {n} entries skipped, see the notes above"),
    };
    if report.ok() {
        console.say(&format!(
            "{stored} file{} stored and verified on {} ({bytes} in {secs:.1} s, {:.1} MB/s){skipped}",
            if stored == 1 { "" } else { "s" },
            report.server,
            report.megabytes_per_second()
        ));
    } else {
        console.say(&format!(
            "{stored} of {total} files stored and verified on {}; see the errors above{skipped}",
            report.server
        ));
    }
}

fn parse_fingerprint_arg(text: &str) -> Result<protocol::secure::Fingerprint, String> {
    text.parse()
        .map_err(|e: protocol::secure::FingerprintError| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_global_flags_after_the_subcommand() {
        let cli = Cli::try_parse_from([
            "backup-client",
            "register",
            "--server",
            "127.0.0.1:1256",
            "--name",
            "bob",
            "--codes",
            "825",
            "--packet-size",
            "64K",
        ])
        .unwrap();
        assert_eq!(cli.global.server.as_deref(), Some("127.0.0.1:1256"));
        assert_eq!(
            (cli.global.codes, cli.global.packet_size),
            (Some(825), Some(65536))
        );
        assert!(
            matches!(cli.command, Some(Command::Register(RegisterArgs { name: Some(ref n), .. })) if n == "bob")
        );
    }

    #[test]
    fn rejects_bad_codes_and_packet_sizes() {
        for args in [
            ["backup-client", "--codes", "1026"],
            ["backup-client", "--packet-size", "1000"],
            ["backup-client", "--packet-size", "2M"],
        ] {
            let err = Cli::try_parse_from(args).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{args:?}");
        }
        assert!(
            Cli::try_parse_from(["backup-client", "backup"]).is_err(),
            "backup needs a path"
        );
    }

    #[test]
    fn help_documents_exit_codes_and_environment() {
        let help = Cli::command().render_long_help().to_string();
        for needle in [
            "Exit status",
            "3  server unreachable",
            "4  rejected by the server",
            "5  verification failed",
            "6  local file error",
            "BACKUP_CLIENT_DIR",
        ] {
            assert!(help.contains(needle), "missing {needle:?}");
        }
    }

    #[test]
    fn formats_unix_seconds_as_utc() {
        assert_eq!(utc_time(0), "1970-01-01 00:00:00");
        assert_eq!(utc_time(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(utc_time(1_795_777_438), "2026-11-27 11:03:58");
    }

    #[test]
    fn backup_skips_links_unless_follow_symlinks_is_given() {
        let follows = |args: &[&str]| match Cli::try_parse_from(args).unwrap().command {
            Some(Command::Backup(b)) => b.follow_symlinks,
            other => panic!("{other:?}"),
        };
        assert!(!follows(&["backup-client", "backup", "dir"]));
        assert!(follows(&[
            "backup-client",
            "backup",
            "dir",
            "--follow-symlinks"
        ]));
        assert!(Cli::try_parse_from(["backup-client", "list", "--follow-symlinks"]).is_err());
    }

    #[test]
    fn parses_retrieval_commands_and_their_constraints() {
        let cli = Cli::try_parse_from([
            "backup-client",
            "restore",
            "a/b.txt",
            "--version",
            "7",
            "--to",
            "out",
            "--overwrite",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::Restore(RestoreArgs { name: Some(ref n), version: Some(7), overwrite: true, all: false, .. })) if n == "a/b.txt"
        ));
        let cli = Cli::try_parse_from(["backup-client", "restore", "--all", "--to", "d"]).unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::Restore(RestoreArgs { all: true, .. }))
        ));
        let cli = Cli::try_parse_from(["backup-client", "list", "--versions", "--json"]).unwrap();
        assert!(cli.global.json);
        assert!(matches!(
            cli.command,
            Some(Command::List(ListArgs { versions: true }))
        ));
        for bad in [
            &["backup-client", "restore"][..],
            &["backup-client", "restore", "--all"],
            &["backup-client", "restore", "x", "--all", "--to", "d"],
            &[
                "backup-client",
                "restore",
                "--all",
                "--to",
                "d",
                "--version",
                "3",
            ],
            &["backup-client", "delete"],
        ] {
            assert!(Cli::try_parse_from(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn retrieval_help_documents_the_new_exit_code() {
        let mut cmd = Cli::command();
        for sub in ["list", "restore", "delete"] {
            let help = cmd
                .find_subcommand_mut(sub)
                .unwrap()
                .render_long_help()
                .to_string();
            assert!(help.contains("7  not found"), "{sub}: {help}");
        }
        let restore = cmd
            .find_subcommand_mut("restore")
            .unwrap()
            .render_long_help()
            .to_string();
        assert!(restore.contains("--overwrite") && restore.contains(".restore-"));
    }

    #[tokio::test]
    async fn reports_a_usage_error_without_transfer_info_or_command() {
        let dir = tempfile::tempdir().unwrap();
        let cli = Cli::try_parse_from([
            "backup-client",
            "--quiet",
            "--config-dir",
            dir.path().to_str().unwrap(),
        ])
        .unwrap();
        assert_eq!(run(cli, dir.path()).await, 2);
    }

    #[tokio::test]
    async fn reports_unreachable_server_with_its_exit_code() {
        let dir = tempfile::tempdir().unwrap();
        // Bind then drop, so the port is very likely closed.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let server = format!("127.0.0.1:{port}");
        let cli = Cli::try_parse_from([
            "backup-client",
            "--quiet",
            "--config-dir",
            dir.path().to_str().unwrap(),
            "register",
            "--server",
            &server,
            "--name",
            "bob",
        ])
        .unwrap();
        assert_eq!(run(cli, dir.path()).await, 3);
        assert!(!dir.path().join(ME_INFO).exists());
    }

    #[tokio::test]
    async fn backup_without_identity_asks_to_register_first() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f.txt"), b"x").unwrap();
        let cfg = dir.path().join("cfg");
        let cli = Cli::try_parse_from([
            "backup-client",
            "--quiet",
            "--config-dir",
            cfg.to_str().unwrap(),
            "--server",
            "127.0.0.1:9",
            "backup",
            "f.txt",
        ])
        .unwrap();
        assert_eq!(run(cli, dir.path()).await, 2);
    }

    #[tokio::test]
    async fn refuses_missing_files_before_connecting() {
        let dir = tempfile::tempdir().unwrap();
        let cli = Cli::try_parse_from([
            "backup-client",
            "--quiet",
            "--config-dir",
            dir.path().to_str().unwrap(),
            "--server",
            "127.0.0.1:9",
            "backup",
            "no-such-file",
        ])
        .unwrap();
        assert_eq!(run(cli, dir.path()).await, 6);
    }
}
