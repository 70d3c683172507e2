//! The operator's commands of the real binary: `check-config`,
//! `completions` and `man`.

use std::process::{Command, Output};

fn server(args: &[&str], cwd: &std::path::Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_backup-server"))
        .args(args)
        .current_dir(cwd)
        .env("RUST_LOG", "warn")
        .env_remove("BACKUP_SERVER_CONFIG")
        .env_remove("BACKUP_SERVER_DATA_DIR")
        .env_remove("BACKUP_SERVER_LISTEN")
        .env_remove("BACKUP_SERVER_LOG_FORMAT")
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn check_config_prints_the_resolved_settings_of_flags_file_and_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("server.toml");
    std::fs::write(&file, "keep_last = 3\nmax_connections = 40\n").unwrap();
    let data = dir.path().join("data");
    let out = server(
        &[
            "check-config",
            "--config",
            file.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
            "--port",
            "4444",
            "--idle-timeout",
            "30",
        ],
        dir.path(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let printed = text(&out.stdout);
    for line in [
        "listen = \"0.0.0.0:4444\"",
        &format!("data_dir = \"{}\"", data.display()),
        "max_connections = 40",
        "keep_last = 3",
        "idle_timeout_secs = 30",
        "request_timeout_secs = 60",
        "# legacy_listen unset",
    ] {
        assert!(
            printed.lines().any(|l| l == line || l.starts_with(line)),
            "missing {line:?}: {printed}"
        );
    }
    assert!(
        !data.exists(),
        "check-config must not create the data directory"
    );
    // What it prints is a config file the server accepts.
    let again = dir.path().join("again.toml");
    let kept: String = printed
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&again, kept).unwrap();
    let out = server(
        &["check-config", "--config", again.to_str().unwrap()],
        dir.path(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), printed);
}

#[test]
fn check_config_exits_non_zero_naming_the_bad_setting() {
    let dir = tempfile::tempdir().unwrap();
    let bad_value = dir.path().join("zero.toml");
    std::fs::write(&bad_value, "max_connections = 0\n").unwrap();
    let unknown_key = dir.path().join("typo.toml");
    std::fs::write(&unknown_key, "max_conections = 10\n").unwrap();
    let not_a_dir = dir.path().join("file");
    std::fs::write(&not_a_dir, "").unwrap();
    let missing = dir.path().join("missing.toml");
    for (args, needle) in [
        (
            vec!["--config", bad_value.to_str().unwrap()],
            "max_connections",
        ),
        (
            vec!["--config", unknown_key.to_str().unwrap()],
            "max_conections",
        ),
        (
            vec!["--data-dir", not_a_dir.to_str().unwrap()],
            "not a directory",
        ),
        (
            vec!["--config", missing.to_str().unwrap()],
            "cannot read config file",
        ),
        (vec!["--registration-grace", "0"], "registration_grace"),
    ] {
        let mut all = vec!["check-config"];
        all.extend(args.iter().copied());
        let out = server(&all, dir.path());
        assert_eq!(out.status.code(), Some(1), "{all:?}");
        let err = text(&out.stderr);
        assert!(
            err.contains("the configuration is not valid"),
            "{all:?}: {err}"
        );
        assert!(err.contains(needle), "{all:?}: {err}");
        assert!(out.stdout.is_empty(), "{all:?}");
    }
}

#[test]
fn the_bash_completion_names_the_subcommands() {
    let dir = tempfile::tempdir().unwrap();
    let out = server(&["completions", "bash"], dir.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let script = text(&out.stdout);
    assert!(script.contains("complete -F"), "{script}");
    for word in [
        "serve",
        "check-config",
        "scrub",
        "prune",
        "fingerprint",
        "--log-format",
    ] {
        assert!(script.contains(word), "missing {word}");
    }
}

#[test]
fn the_man_page_is_roff_and_out_writes_one_per_command() {
    let dir = tempfile::tempdir().unwrap();
    let out = server(&["man"], dir.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let page = text(&out.stdout);
    let header = page
        .lines()
        .find(|l| l.starts_with(".TH "))
        .unwrap_or_default();
    assert!(header.starts_with(".TH backup-server 1"), "{page}");
    let pages = dir.path().join("man1");
    let out = server(&["man", "--out", pages.to_str().unwrap()], dir.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    for name in [
        "backup-server.1",
        "backup-server-serve.1",
        "backup-server-check-config.1",
    ] {
        let p = std::fs::read_to_string(pages.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(p.lines().any(|l| l.starts_with(".TH ")), "{name}");
    }
}
