//! Shell completions and manual pages of `backup-client`, from the real
//! binary.

use std::process::{Command, Output};

fn client(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_backup-client"))
        .args(args)
        .env_remove("BACKUP_CLIENT_DIR")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn the_bash_completion_names_every_subcommand_and_backup_flags() {
    let out = client(&["completions", "bash"]);
    let script = String::from_utf8(out.stdout).unwrap();
    assert!(script.contains("complete -F"), "{script}");
    for word in [
        "register",
        "backup",
        "snapshots",
        "restore",
        "completions",
        "man",
        "--exclude",
        "--exclude-caches",
        "--dry-run",
    ] {
        assert!(script.contains(word), "missing {word}");
    }
}

#[test]
fn completions_exist_for_every_shell_and_an_unknown_one_is_refused() {
    for shell in ["zsh", "fish", "elvish", "powershell"] {
        let out = client(&["completions", shell]);
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("backup-client"),
            "{shell}"
        );
    }
    let out = Command::new(env!("CARGO_BIN_EXE_backup-client"))
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn the_man_page_is_roff_with_a_title_header() {
    let out = client(&["man"]);
    let page = String::from_utf8(out.stdout).unwrap();
    let header = page
        .lines()
        .find(|l| l.starts_with(".TH "))
        .unwrap_or_else(|| panic!("no .TH header: {page}"));
    assert!(header.starts_with(".TH backup-client 1"), "{header}");
    assert!(page.contains(".SH NAME") && page.contains(".SH SYNOPSIS"));
}

#[test]
fn man_out_writes_a_page_per_command() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("man1");
    client(&["man", "--out", out_dir.to_str().unwrap()]);
    for page in [
        "backup-client.1",
        "backup-client-backup.1",
        "backup-client-restore.1",
    ] {
        let text =
            std::fs::read_to_string(out_dir.join(page)).unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(
            text.lines().any(|l| l.starts_with(".TH ")),
            "{page} has no .TH header"
        );
    }
    let backup = std::fs::read_to_string(out_dir.join("backup-client-backup.1")).unwrap();
    assert!(backup.contains("exclude\\-caches"), "{backup}");
}
