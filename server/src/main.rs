//! `backup-server`: parse the configuration, install logging, then either
//! bind and serve until SIGINT or SIGTERM, or run one operator command.

use std::io::IsTerminal;

use anyhow::Context;
use clap::Parser;
use server::config::{AdminArgs, Command, LogFormat, Switch};
use server::storage::Storage;
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<()> {
    let cli = server::config::Cli::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    match cli.log_format.unwrap_or_default() {
        LogFormat::Text => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .init(),
        // One object a line: the event's fields at the top, and the fields
        // of its spans (the connection's `peer`, `mode`, `client_id`) in
        // `spans`.
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true)
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init(),
    }
    match cli.command {
        None => serve(&cli.serve),
        Some(command) => run(command),
    }
}

/// Runs a subcommand: `serve`, or one operator command, printing its
/// report on stdout.
fn run(command: Command) -> anyhow::Result<()> {
    use server::admin;
    let env = |k: &str| std::env::var_os(k);
    let open = |args: &AdminArgs| -> anyhow::Result<(Storage, server::config::FileConfig)> {
        let (data_dir, file) = server::config::load_admin(args, env)?;
        let meta = server::config::admin_meta(args, &file)?;
        if meta == server::storage::MetaLocation::Sqlite
            && !data_dir.join(Storage::DATABASE).is_file()
        {
            anyhow::bail!("no database in {}", data_dir.display());
        }
        let blobs = server::config::admin_blobs(args, &file)?;
        let storage = Storage::open_with(&data_dir, &blobs, &meta)
            .with_context(|| format!("cannot open the data in {}", data_dir.display()))?;
        Ok((storage, file))
    };
    let stdout = std::io::stdout();
    let out = &mut stdout.lock();
    match command {
        Command::Serve(args) => serve(&args)?,
        Command::CheckConfig(args) => {
            let cwd = std::env::current_dir().context("cannot determine the working directory")?;
            let settings = server::config::load(&args, &cwd, env)
                .and_then(|s| s.check().map(|()| s))
                .context("the configuration is not valid")?;
            use std::io::Write;
            write!(out, "{}", settings.describe())?;
        }
        Command::Completions { shell } => {
            use clap::CommandFactory;
            let mut cmd = server::config::Cli::command();
            clap_complete::generate(shell, &mut cmd, "backup-server", out);
        }
        Command::Man { out: dir } => {
            use clap::CommandFactory;
            let cmd = server::config::Cli::command();
            match dir {
                Some(dir) => {
                    std::fs::create_dir_all(&dir)
                        .and_then(|()| clap_mangen::generate_to(cmd, &dir))
                        .with_context(|| {
                            format!("cannot write the pages into {}", dir.display())
                        })?;
                }
                None => clap_mangen::Man::new(cmd).render(out)?,
            }
        }
        Command::Clients { json, admin: a } => {
            let (storage, file) = open(&a)?;
            let quotas = server::config::Quotas::from_file(&file)?;
            admin::clients(&storage, &quotas, json, out)?
        }
        Command::Snapshots {
            client,
            json,
            admin: a,
        } => admin::snapshots(&open(&a)?.0, &client, json, out)?,
        Command::Quota {
            client,
            value,
            admin: a,
        } => {
            let (storage, file) = open(&a)?;
            let quotas = server::config::Quotas::from_file(&file)?;
            admin::quota(&storage, &quotas, &client, value, out)?
        }
        Command::Files {
            client,
            versions,
            admin: a,
        } => admin::files(&open(&a)?.0, &client, versions, out)?,
        Command::Prune {
            keep_last,
            keep_within,
            keep_hourly,
            keep_daily,
            keep_weekly,
            keep_monthly,
            keep_yearly,
            dry_run,
            grace,
            repack_threshold,
            admin: a,
        } => {
            let (storage, file) = open(&a)?;
            let (data_dir, _) = server::config::load_admin(&a, env)?;
            let retention = server::config::retention(keep_last, keep_within, &file)?;
            if !retention.keeps_everything() && !dry_run {
                admin::prune(&storage, &retention, out)?;
            }
            let flags = protocol::repo::retention::KeepPolicy {
                last: keep_last,
                hourly: keep_hourly,
                daily: keep_daily,
                weekly: keep_weekly,
                monthly: keep_monthly,
                yearly: keep_yearly,
                within: keep_within,
                tags: Vec::new(),
            };
            let snapshots = server::config::snapshot_retention(flags, &file)?;
            admin::forget_by_policy(&storage, &snapshots, dry_run, out)?;
            let options = server::storage::prune::PruneOptions {
                grace,
                repack_percent: repack_threshold,
                dry_run,
            };
            admin::prune_repo(&storage, &data_dir, &options, out)?;
        }
        Command::RemoveClient { client, admin: a } => {
            admin::remove_client(&open(&a)?.0, &client, out)?
        }
        Command::Fingerprint { admin: a } => {
            let (data_dir, _) = server::config::load_admin(&a, env)?;
            let identity = server::identity::ServerIdentity::load(&data_dir)?;
            use std::io::Write;
            writeln!(out, "{}", identity.fingerprint())?;
        }
        Command::Scrub { repair, admin: a } => {
            let storage = open(&a)?.0;
            let report = server::scrub::scrub(&storage, out)?;
            let packs = server::scrub::scrub_packs(&storage, repair, out)?;
            // For the server's /metrics (scrub_* series).
            let (data_dir, _) = server::config::load_admin(&a, env)?;
            let status = server::metrics::ScrubStatus {
                finished_at: server::metrics::ScrubStatus::now(),
                versions_checked: report.checked,
                versions_damaged: report.damaged.len() as u64,
                packs_checked: packs.checked,
                packs_damaged: packs.damaged.len() as u64,
                packs_repaired: packs.repaired,
            };
            if let Err(e) = status.save(&data_dir) {
                warn!(cause = %e, "cannot record the scrub's result for the metrics");
            }
            let mut damage = Vec::new();
            if !report.is_clean() {
                damage.push(format!("{} stored versions", report.damaged.len()));
            }
            if !packs.is_clean() {
                damage.push(format!("{} packs", packs.damaged.len()));
            }
            if !damage.is_empty() {
                anyhow::bail!(
                    "{} are damaged or missing (see the lines above)",
                    damage.join(" and ")
                );
            }
        }
        Command::AppendOnly {
            client,
            state,
            admin: a,
        } => admin::set_append_only(&open(&a)?.0, &client, state == Switch::On, out)?,
    }
    Ok(())
}

/// Loads the settings, binds and serves until a signal.
fn serve(args: &server::config::Args) -> anyhow::Result<()> {
    let cwd = std::env::current_dir().context("cannot determine the working directory")?;
    let settings = server::config::load(args, &cwd, |k| std::env::var_os(k))?;
    for warning in &settings.warnings {
        warn!("{warning}");
    }
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async {
        let secure = listen(settings.listen)
            .with_context(|| format!("cannot listen on {}", settings.listen))?;
        let legacy = match settings.legacy_listen {
            Some(addr) => {
                Some(listen(addr).with_context(|| format!("cannot listen on {addr} (legacy)"))?)
            }
            None => None,
        };
        info!(addr = %secure.local_addr()?, data_dir = %settings.config.data_dir.display(), blobs = %settings.config.blobs, "listening for secure clients");
        if let Some(legacy) = &legacy {
            info!(addr = %legacy.local_addr()?, "listening for legacy clients");
        }
        let metrics = match settings.metrics_listen {
            Some(addr) => Some(
                listen(addr).with_context(|| format!("cannot listen on {addr} (metrics)"))?,
            ),
            None => None,
        };
        let listeners = server::Listeners {
            secure: Some(secure),
            legacy,
            metrics,
        };
        survive_file_size_limit();
        server::run(listeners, settings.config, shutdown_signal()).await?;
        Ok(())
    })
}

/// Connections the kernel may queue before the server accepts them. A burst
/// of a thousand clients at once overflowed the usual 1,024 while the
/// accept loop was busy, and an overflowed connection waits for the kernel's
/// SYN-ACK retransmissions (up to half a minute); the kernel caps the value
/// at `net.core.somaxconn`.
const LISTEN_BACKLOG: u32 = 4096;

/// Binds `addr` with [`LISTEN_BACKLOG`] (and `SO_REUSEADDR`, as
/// `TcpListener::bind` sets, so a restart need not wait for old sockets).
fn listen(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// A write past the file-size limit (RLIMIT_FSIZE, e.g. `ulimit -f`)
/// raises SIGXFSZ, whose default action kills the process. With a handler
/// installed instead, the write fails with EFBIG like any other storage
/// failure: the upload is answered 1607 and discarded, and the server goes
/// on serving. The handler stays installed for the life of the process.
#[cfg(unix)]
fn survive_file_size_limit() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::from_raw(libc::SIGXFSZ)) {
        Ok(mut xfsz) => {
            tokio::spawn(async move {
                while xfsz.recv().await.is_some() {
                    warn!(
                        "a write went past the file-size limit (RLIMIT_FSIZE); that upload fails"
                    );
                }
            });
        }
        Err(e) => {
            warn!(cause = %e, "cannot handle SIGXFSZ; a write past the file-size limit would stop the server")
        }
    }
}

#[cfg(not(unix))]
fn survive_file_size_limit() {}

/// Completes on the first SIGINT or SIGTERM; a second one exits at once.
async fn shutdown_signal() {
    wait_for_signal().await;
    info!("shutdown requested; a second signal exits immediately");
    tokio::spawn(async {
        wait_for_signal().await;
        warn!("second signal: exiting now");
        std::process::exit(130);
    });
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(e) => {
            warn!(cause = %e, "cannot listen for SIGTERM; only Ctrl-C stops the server");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}
