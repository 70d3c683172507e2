//! The command line of `backup-client`, and what each command does: the
//! arguments are in [`args`]; here the settings of an invocation are
//! resolved (once, [`resolve`]) and each command run and rendered.

mod args;
mod key;
mod snapshot;

pub use key::{read_passphrase, ENV_PASSPHRASE};

pub use args::{
    BackupArgs, CheckArgs, Cli, Command, CompletionsArgs, DeleteArgs, DiffArgs, ExportArgs,
    GlobalArgs, KeyArgs, KeyCommand, ListArgs, LoginArgs, LsArgs, ManArgs, PassphraseFile,
    RegisterArgs, RestoreArgs, SnapshotsArgs,
};

use std::path::{Path, PathBuf};
use std::sync::Arc;

use protocol::{FileName, UserName};

use crate::engine::Client;
use crate::error::Error;
use crate::exclude::{self, Rules};
use crate::feedback::{Console, Feedback};
use crate::files;
use crate::identity::{IdentityStore, ME_INFO};
use crate::legacy::{TransferInfo, TRANSFER_INFO};
use crate::report::{entry_json, error_json, FileReport, Outcome, RunKind, RunReport};
use crate::settings::{self, ConfigFile, Options, CONFIG_FILE};

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

/// The options of one invocation, resolved in one place for every command:
/// the command line (with `name` as its name), then transfer.info in the
/// current directory (`legacy`), then config.toml, then the defaults.
fn resolve(
    global: &GlobalArgs,
    name: Option<String>,
    legacy: Option<&TransferInfo>,
    places: &Places,
) -> Result<Options, Error> {
    settings::resolve(
        &global.overrides(name),
        legacy.map(|t| t.server.as_str()),
        &places.config,
        &places.config_path(),
    )
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
        Some(Command::Backup(args)) => match backup_paths(args, cwd) {
            Ok((paths, rules)) => {
                let links = if args.follow_symlinks {
                    files::Links::FollowToFiles
                } else {
                    files::Links::Skip
                };
                let job = Job {
                    paths,
                    links,
                    rules,
                    legacy_folder: false,
                };
                backup(&cli.global, Some(args), job, cwd, &console).await
            }
            Err(e) => Err(e),
        },
        Some(Command::Snapshots(args)) => {
            match reading_client(&cli.global, &args.login, cwd, &console) {
                Ok(client) => snapshot::snapshots(&client, &cli.global, &console).await,
                Err(e) => Err(e),
            }
        }
        Some(Command::Ls(args)) => match reading_client(&cli.global, &args.login, cwd, &console) {
            Ok(client) => snapshot::ls(&client, args, &cli.global, &console).await,
            Err(e) => Err(e),
        },
        Some(Command::Diff(args)) => {
            match reading_client(&cli.global, &args.login, cwd, &console) {
                Ok(client) => snapshot::diff(&client, args, &cli.global, &console).await,
                Err(e) => Err(e),
            }
        }
        Some(Command::Check(args)) => {
            match reading_client(&cli.global, &args.login, cwd, &console) {
                Ok(client) => snapshot::check(&client, args, &cli.global, &console).await,
                Err(e) => Err(e),
            }
        }
        Some(Command::Key(args)) => match retrieval_client(&cli.global, cwd, &console) {
            Ok(client) => key::key(&client, args, cwd, &cli.global, &console).await,
            Err(e) => Err(e),
        },
        Some(Command::List(args)) => list(&cli.global, args, cwd, &console).await,
        Some(Command::Restore(args)) => restore(&cli.global, args, cwd, &console).await,
        Some(Command::Delete(args)) => delete(&cli.global, args, cwd, &console).await,
        Some(Command::Completions(args)) => completions(args),
        Some(Command::Man(args)) => man(args),
        Some(Command::Forget(args)) => match retrieval_client(&cli.global, cwd, &console) {
            Ok(client) => snapshot::forget(&client, args, &cli.global, &console).await,
            Err(e) => Err(e),
        },
        None => {
            let job = Job {
                paths: Vec::new(),
                links: files::Links::Skip,
                rules: Rules::default(),
                legacy_folder: true,
            };
            backup(&cli.global, None, job, cwd, &console).await
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
    let options = resolve(global, args.name.clone(), legacy.as_ref(), &places)?;
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

/// `completions SHELL`: the script on standard output.
fn completions(args: &CompletionsArgs) -> Result<u8, Error> {
    use clap::CommandFactory;
    let mut cmd = Cli::command();
    clap_complete::generate(
        args.shell,
        &mut cmd,
        "backup-client",
        &mut std::io::stdout(),
    );
    Ok(0)
}

/// `man [--out DIR]`: the main page on standard output, or every page
/// written into DIR.
fn man(args: &ManArgs) -> Result<u8, Error> {
    use clap::CommandFactory;
    let cmd = Cli::command();
    let written = match &args.out {
        Some(dir) => std::fs::create_dir_all(dir)
            .and_then(|()| clap_mangen::generate_to(cmd, dir))
            .map_err(|e| (dir.clone(), e)),
        None => {
            let mut page = Vec::new();
            clap_mangen::Man::new(cmd)
                .render(&mut page)
                .and_then(|()| std::io::Write::write_all(&mut std::io::stdout(), &page))
                .map_err(|e| (PathBuf::from("-"), e))
        }
    };
    written.map_err(|(path, e)| Error::WriteFile {
        path,
        reason: crate::error::io_reason(&e),
    })?;
    Ok(0)
}

/// The paths `backup` is given (its arguments, then the lines of each
/// `--files-from`) and its exclusion rules, checked before anything else.
fn backup_paths(args: &BackupArgs, cwd: &Path) -> Result<(Vec<PathBuf>, Rules), Error> {
    let mut paths: Vec<PathBuf> = args.paths.iter().map(|p| cwd.join(p)).collect();
    for list in &args.files_from {
        paths.extend(exclude::files_from(&cwd.join(list), cwd)?);
    }
    if paths.is_empty() {
        return Err(Error::Usage {
            detail: "nothing to back up: no PATH given and the --files-from lists are empty".into(),
        });
    }
    let exclude_files: Vec<PathBuf> = args.exclude_files.iter().map(|p| cwd.join(p)).collect();
    let rules = Rules::new(
        &args.exclude,
        &exclude_files,
        &args.iexclude,
        args.exclude_caches,
        args.one_file_system,
    )?;
    Ok((paths, rules))
}

/// What one backup run is to back up.
struct Job {
    paths: Vec<PathBuf>,
    links: files::Links,
    rules: Rules,
    /// The legacy job: files, server and name come from transfer.info.
    legacy_folder: bool,
}

/// `backup PATH...`, or the legacy job when `job.legacy_folder` is set
/// (files, server and name then come from transfer.info in `cwd`).
async fn backup(
    global: &GlobalArgs,
    args: Option<&BackupArgs>,
    job: Job,
    cwd: &Path,
    console: &Arc<Console>,
) -> Result<u8, Error> {
    let Job {
        paths,
        links,
        rules,
        legacy_folder,
    } = job;
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
    let options = resolve(global, None, legacy.as_ref(), &places)?;
    let register_as = match (&legacy, &places.config.name) {
        (Some(t), _) => Some(t.name.clone()),
        (None, Some(n)) => Some(user_name(n)?),
        (None, None) => None,
    };
    let store = IdentityStore::new(&places.identity_dir);
    if let Some(args) = args.filter(|_| !options.legacy && !global.per_file && !legacy_folder) {
        let feedback: Arc<dyn Feedback> = console.clone();
        let client = Client::new(options, store)
            .with_feedback(feedback)
            .with_key_file(key_file(global, &places, cwd));
        let request = snapshot::Request {
            paths,
            rules,
            register_as: register_as.as_ref(),
        };
        return snapshot::backup(&client, args, request, global, console).await;
    }
    if let (Some(t), Ok(Some(identity))) = (&legacy, store.load()) {
        if identity.name != t.name {
            console.notice(&format!(
                "me.info names \"{}\" and transfer.info \"{}\"; using \"{}\", the name the server knows",
                identity.name, t.name, identity.name
            ));
        }
    }
    let collected = files::collect_filtered(&paths, links, &rules);
    for skipped in &collected.skipped {
        console.notice(&format!(
            "skipped {}: {}",
            skipped.path.display(),
            skipped.reason.describe()
        ));
    }
    if args.is_some_and(|a| a.dry_run) {
        return Ok(dry_run_per_file(&collected, global, console));
    }
    if collected.excluded > 0 {
        console.notice(&format!(
            "{} entr{} left out by the exclusion rules",
            collected.excluded,
            if collected.excluded == 1 { "y" } else { "ies" }
        ));
    }
    let feedback: Arc<dyn Feedback> = console.clone();
    let client = Client::new(options, store).with_feedback(feedback);
    let mut report = if collected.items.is_empty() {
        RunReport::new(RunKind::Backup, client.options().server.clone())
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
            path: Some(path),
            name: String::new(),
            version: None,
            size: 0,
            outcome: Outcome::Failed(error),
        };
        console.finished(&file);
        report.files.push(file);
    }
    summarize(&report, global, console);
    Ok(report.exit_code())
}

/// `backup --dry-run`, file by file: what would be sent, under which name,
/// and its size; nothing is sent and the server is not contacted.
fn dry_run_per_file(collected: &files::Collected, global: &GlobalArgs, console: &Console) -> u8 {
    let bytes: u64 = collected.items.iter().map(|i| i.size).sum();
    let code = collected.errors.first().map_or(0, Error::exit_code);
    for e in &collected.errors {
        console.print_error(&e.to_string());
    }
    if global.json {
        let files: Vec<_> = collected
            .items
            .iter()
            .map(|i| {
                serde_json::json!({
                    "path": i.path.display().to_string(),
                    "name": i.name.to_string_lossy(),
                    "size": i.size,
                })
            })
            .collect();
        let v = serde_json::json!({
            "ok": code == 0,
            "exit_code": code,
            "dry_run": true,
            "files": files,
            "bytes": bytes,
            "excluded": collected.excluded,
            "skipped": collected.skipped.len(),
        });
        println!("{v}");
        return code;
    }
    // The listing is the output asked for: printed even with --quiet.
    let mut out = String::new();
    for i in &collected.items {
        out.push_str(&format!("{:>13}  {}\n", i.size, i.name));
    }
    print!("{out}");
    console.say(&format!(
        "dry run: {} file{}, {bytes} bytes would be sent file by file; {} excluded, {} skipped; nothing was sent",
        collected.items.len(),
        if collected.items.len() == 1 { "" } else { "s" },
        collected.excluded,
        collected.skipped.len(),
    ));
    code
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
    let options = resolve(global, None, legacy.as_ref(), &places)?;
    let store = IdentityStore::new(&places.identity_dir);
    let feedback: Arc<dyn Feedback> = console.clone();
    Ok(Client::new(options, store)
        .with_feedback(feedback)
        .with_key_file(key_file(global, &places, cwd)))
}

/// The backup-only key file: `--key-file` (from `cwd`), else `key-file`
/// in config.toml (from the configuration directory).
fn key_file(global: &GlobalArgs, places: &Places, cwd: &Path) -> Option<PathBuf> {
    match (
        &global.key_file,
        &places.config.key_file,
        &places.config_dir,
    ) {
        (Some(p), _, _) => Some(cwd.join(p)),
        (None, Some(p), Some(dir)) => Some(dir.join(p)),
        (None, Some(p), None) => Some(cwd.join(p)),
        (None, None, _) => None,
    }
}

/// A client for a command that reads snapshots: as
/// [`retrieval_client`], logging in with the passphrase when `login`
/// says so (the name from `--name` or config.toml).
fn reading_client(
    global: &GlobalArgs,
    login: &LoginArgs,
    cwd: &Path,
    console: &Arc<Console>,
) -> Result<Client, Error> {
    let client = retrieval_client(global, cwd, console)?;
    if !login.passphrase {
        return Ok(client);
    }
    if client.options().legacy || global.per_file {
        return Err(Error::Usage {
            detail: "--passphrase reads snapshots, in secure mode only".into(),
        });
    }
    let places = places(global, cwd, false)?;
    let name = login
        .login_name
        .clone()
        .or(places.config.name.clone())
        .ok_or_else(|| Error::Usage {
            detail: "a passphrase login needs the client's name: add --name NAME".into(),
        })?;
    let name = user_name(&name)?;
    let file = login.passphrase_file.as_ref().map(|p| cwd.join(p));
    let passphrase = read_passphrase(file.as_deref(), false)?;
    Ok(client.with_passphrase_login(Some(crate::engine::PassphraseLogin { name, passphrase })))
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
    if args.login.passphrase && (args.all || args.version.is_some()) {
        return Err(Error::Usage {
            detail: "--passphrase restores snapshots, not files by --all or --version".into(),
        });
    }
    let client = reading_client(global, &args.login, cwd, console)?;
    if !client.options().legacy && !global.per_file && !args.all && args.version.is_none() {
        return snapshot::restore(&client, args, cwd, global, console).await;
    }
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
        _ => {
            return Err(Error::Usage {
                detail: "restoring file by file needs NAME, or --all with --to".into(),
            })
        }
    };
    summarize(&report, global, console);
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

/// The end of a backup or restore: the JSON summary, or the summary line.
fn summarize(report: &RunReport, global: &GlobalArgs, console: &Console) {
    if global.json {
        println!("{}", report.to_json());
    } else {
        console.say(&report.summary());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

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
    fn backup_takes_exclusions_and_files_from_without_paths() {
        let cli = Cli::try_parse_from([
            "backup-client",
            "backup",
            "--files-from",
            "list",
            "--exclude",
            "*.o",
            "--exclude",
            "target/",
            "--iexclude",
            "*.TMP",
            "--exclude-file",
            "ex",
            "--exclude-caches",
            "-x",
            "-n",
        ])
        .unwrap();
        let Some(Command::Backup(b)) = cli.command else {
            panic!("not a backup");
        };
        assert!(b.paths.is_empty());
        assert_eq!(b.files_from, [PathBuf::from("list")]);
        assert_eq!(b.exclude, ["*.o", "target/"]);
        assert_eq!(b.iexclude, ["*.TMP"]);
        assert_eq!(b.exclude_files, [PathBuf::from("ex")]);
        assert!(b.exclude_caches && b.one_file_system && b.dry_run);
        assert!(Cli::try_parse_from(["backup-client", "backup", "--exclude", "x"]).is_err());
    }

    #[tokio::test]
    async fn an_empty_files_from_list_is_a_usage_error() {
        let dir = tempfile::tempdir().unwrap();
        let list = dir.path().join("list");
        std::fs::write(&list, "# nothing\n\n").unwrap();
        let cli = Cli::try_parse_from([
            "backup-client",
            "--quiet",
            "--config-dir",
            dir.path().to_str().unwrap(),
            "--server",
            "127.0.0.1:9",
            "backup",
            "--files-from",
            list.to_str().unwrap(),
        ])
        .unwrap();
        assert_eq!(run(cli, dir.path()).await, 2);
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
            &["backup-client", "restore", "--all"][..],
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
