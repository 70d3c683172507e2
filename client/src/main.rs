//! `backup-client`: see `backup-client --help`.

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = client::cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cwd = match std::env::current_dir() {
        Ok(dir) => dir,
        Err(e) => {
            eprintln!("error: cannot determine the current directory ({}); run from an existing directory", client::error::io_reason(&e));
            return ExitCode::from(client::ErrorKind::LocalFile.exit_code());
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!(
                "error: cannot start the async runtime ({}); please report it",
                client::error::io_reason(&e)
            );
            return ExitCode::from(client::ErrorKind::Other.exit_code());
        }
    };
    let code = runtime.block_on(client::cli::run(cli, &cwd));
    ExitCode::from(code)
}
