//! The `key` commands of `backup-client` and the passphrase's sources:
//! `--passphrase-file`, `BACKUP_PASSPHRASE`, or a prompt on the terminal
//! without echo.

use std::io::{BufRead, Write};
use std::path::Path;

use zeroize::Zeroizing;

use super::args::{GlobalArgs, KeyArgs, KeyCommand};
use crate::engine::Client;
use crate::error::{io_reason, Error};
use crate::feedback::Console;

/// The environment variable a passphrase may come from.
pub const ENV_PASSPHRASE: &str = "BACKUP_PASSPHRASE";

/// The passphrase: the first line of `file`, else `BACKUP_PASSPHRASE`,
/// else typed on the terminal (twice when `confirm`).
///
/// # Errors
/// When the file cannot be read, there is no terminal, the two entries
/// differ, or the passphrase is empty.
pub fn read_passphrase(file: Option<&Path>, confirm: bool) -> Result<Zeroizing<Vec<u8>>, Error> {
    let missing = |detail: String| Error::NoPassphraseGiven { detail };
    let passphrase = if let Some(path) = file {
        let text = Zeroizing::new(std::fs::read(path).map_err(|e| {
            missing(format!(
                "{} cannot be read ({})",
                path.display(),
                io_reason(&e)
            ))
        })?);
        let line = text.split(|b| *b == b'\n').next().unwrap_or_default();
        Zeroizing::new(line.strip_suffix(b"\r").unwrap_or(line).to_vec())
    } else if let Some(value) = std::env::var_os(ENV_PASSPHRASE) {
        Zeroizing::new(value.into_encoded_bytes())
    } else {
        let first = prompt("Passphrase: ")?;
        if confirm {
            let again = prompt("Passphrase again: ")?;
            if again != first {
                return Err(missing("the two entries differ".into()));
            }
        }
        first
    };
    if passphrase.is_empty() {
        return Err(missing("it is empty".into()));
    }
    Ok(passphrase)
}

/// Reads a line from the terminal with echo off, restoring the terminal
/// whatever happens.
fn prompt(text: &str) -> Result<Zeroizing<Vec<u8>>, Error> {
    use nix::sys::termios::{tcgetattr, tcsetattr, LocalFlags, SetArg};
    let no_tty = |e: String| Error::NoPassphraseGiven {
        detail: format!(
            "no terminal to ask on ({e}); use --passphrase-file FILE or BACKUP_PASSPHRASE"
        ),
    };
    let tty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty")
        .map_err(|e| no_tty(io_reason(&e)))?;
    let saved = tcgetattr(&tty).map_err(|e| no_tty(e.to_string()))?;
    let mut quiet = saved.clone();
    quiet.local_flags.remove(LocalFlags::ECHO);
    quiet.local_flags.insert(LocalFlags::ECHONL);
    tcsetattr(&tty, SetArg::TCSAFLUSH, &quiet).map_err(|e| no_tty(e.to_string()))?;
    let read = (|| {
        let mut out = &tty;
        out.write_all(text.as_bytes())?;
        out.flush()?;
        let mut line = Zeroizing::new(Vec::new());
        std::io::BufReader::new(&tty).read_until(b'\n', &mut line)?;
        Ok::<_, std::io::Error>(line)
    })();
    let _ = tcsetattr(&tty, SetArg::TCSAFLUSH, &saved);
    let mut line = read.map_err(|e| no_tty(io_reason(&e)))?;
    while matches!(line.last(), Some(b'\n' | b'\r')) {
        line.pop();
    }
    Ok(line)
}

/// `key ...`.
pub(super) async fn key(
    client: &Client,
    args: &KeyArgs,
    cwd: &Path,
    global: &GlobalArgs,
    console: &Console,
) -> Result<u8, Error> {
    let server = client.options().server.clone();
    let said = match &args.command {
        KeyCommand::AddPassphrase(source) => {
            let file = source.passphrase_file.as_ref().map(|p| cwd.join(p));
            let passphrase = read_passphrase(file.as_deref(), true)?;
            client.add_passphrase(passphrase).await?;
            format!("the repository key is now kept on {server} under the passphrase as well; `restore --passphrase --name NAME` recovers it without the key files")
        }
        KeyCommand::Export(export) => {
            let out = cwd.join(&export.out);
            client.export_backup_key(&out).await?;
            format!(
                "wrote the backup-only key to {}: with --key-file it backs up, and reads nothing",
                out.display()
            )
        }
        KeyCommand::RemoveRsaEnvelope => {
            client.remove_rsa_envelope().await?;
            format!("removed the envelope of the repository key for this client's RSA key on {server}; priv.key no longer opens the snapshots, the passphrase does")
        }
    };
    if global.json {
        println!(
            "{}",
            serde_json::json!({ "ok": true, "exit_code": 0, "message": said })
        );
    } else {
        console.say(&said);
    }
    Ok(0)
}
