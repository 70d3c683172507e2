//! Exclusions end to end against the real binaries: a snapshot (and a
//! per-file backup) made with `--exclude`, `--iexclude`, `--exclude-file`,
//! `--exclude-caches`, `--files-from` and `.backupignore` files restores
//! exactly the files kept, and `backup --dry-run` lists them without
//! contacting the server.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use support::processes::{run_client, stderr, ServerProcess};
use support::write_file;

const LIMIT: Duration = Duration::from_secs(120);

/// A registered client of a fresh server, with a folder to back up.
struct Setup {
    server: ServerProcess,
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl Setup {
    async fn new() -> Self {
        let server = ServerProcess::start(&[]);
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config");
        let s = Self {
            server,
            dir,
            config,
        };
        let out = s.client(&["register", "--name", "excl"]).await;
        assert!(out.status.success(), "register: {}", stderr(&out));
        s
    }

    async fn client(&self, args: &[&str]) -> Output {
        let addr = self.server.addr.to_string();
        let mut all = vec!["--server", addr.as_str()];
        all.extend_from_slice(args);
        run_client(&self.config, &all, LIMIT).await
    }

    async fn json(&self, args: &[&str]) -> (Output, serde_json::Value) {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.client(&all).await;
        (out.clone(), parse(&out))
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
}

fn parse(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {} / {}",
            String::from_utf8_lossy(&out.stdout),
            stderr(out)
        )
    })
}

const SIGNATURE: &str = "Signature: 8a477f597d28d172789f06886806bc55\n";

/// A folder with files every rule applies to, and the files that stay
/// (relative to the folder) when the rules of [`RULES`] apply.
fn make_folder(root: &Path) -> BTreeSet<String> {
    let files = [
        ("keep.txt", 1000),
        ("notes.log", 10),
        ("Report.TMP", 20),
        ("sub/keep.bin", 300_000),
        ("sub/debug.log", 30),
        ("sub/important.log", 40),
        ("sub/.backupignore", 0),
        ("sub/scratch/a.dat", 50),
        ("sub/scratch/deeper/b.dat", 60),
        ("sub/local.o", 70),
        ("target/out.bin", 80),
        ("cache/CACHEDIR.TAG", 0),
        ("cache/blob", 90),
        ("fakecache/CACHEDIR.TAG", 0),
        ("fakecache/blob", 100),
        ("media/movie.mkv", 110),
    ];
    for (i, (name, len)) in files.iter().enumerate() {
        write_file(&root.join(name), *len, i as u32);
    }
    std::fs::write(root.join("sub/.backupignore"), "scratch/\n*.o\n").unwrap();
    std::fs::write(root.join("cache/CACHEDIR.TAG"), SIGNATURE).unwrap();
    std::fs::write(
        root.join("fakecache/CACHEDIR.TAG"),
        "Signature: not the right one\n",
    )
    .unwrap();
    [
        "keep.txt",
        "sub/keep.bin",
        "sub/important.log",
        "sub/.backupignore",
        "fakecache/CACHEDIR.TAG",
        "fakecache/blob",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

/// The rules the tests apply, with `exclude_file` holding `/media`.
fn rules(exclude_file: &Path) -> Vec<String> {
    std::fs::write(exclude_file, "# large things\n/media\n\n").unwrap();
    [
        "--exclude",
        "*.log",
        "--exclude",
        "!important.log",
        "--exclude",
        "/target",
        "--iexclude",
        "*.tmp",
        "--exclude-caches",
        "--exclude-file",
        exclude_file.to_str().unwrap(),
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

/// Every file under `root`, relative to it.
fn files_under(root: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                let rel = e.path().strip_prefix(root).unwrap().to_owned();
                out.insert(rel.to_string_lossy().into_owned());
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_with_excludes_restores_exactly_the_files_kept() {
    let s = Setup::new().await;
    let folder = s.path("folder");
    let expected = make_folder(&folder);
    // --files-from adds a file of its own, outside the folder.
    let extra = s.path("extra.txt");
    std::fs::write(&extra, b"listed in a file").unwrap();
    let list = s.path("list");
    std::fs::write(&list, format!("# one more\n{}\n", extra.display())).unwrap();

    let mut args: Vec<String> = vec!["backup".into(), folder.to_string_lossy().into_owned()];
    args.extend(rules(&s.path("exclude-list")));
    args.extend(["--files-from".into(), list.to_string_lossy().into_owned()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (out, summary) = s.json(&args).await;
    assert!(out.status.success(), "backup: {}", stderr(&out));
    assert_eq!(summary["files"], expected.len() + 1, "{summary}");
    // notes.log, Report.TMP, sub/debug.log, sub/scratch, sub/local.o,
    // target, cache, media.
    assert_eq!(summary["excluded"], 8, "{summary}");

    let restored = s.path("restored");
    let out = s
        .client(&["restore", "--to", &restored.to_string_lossy()])
        .await;
    assert!(out.status.success(), "restore: {}", stderr(&out));
    assert_eq!(files_under(&restored.join("folder")), expected);
    assert_eq!(
        std::fs::read(restored.join("extra.txt")).unwrap(),
        b"listed in a file"
    );
    for name in &expected {
        assert_eq!(
            std::fs::read(restored.join("folder").join(name)).unwrap(),
            std::fs::read(folder.join(name)).unwrap(),
            "{name}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_file_backup_with_excludes_stores_exactly_the_files_kept() {
    let s = Setup::new().await;
    let folder = s.path("folder");
    let expected = make_folder(&folder);
    let mut args: Vec<String> = vec![
        "--per-file".into(),
        "backup".into(),
        folder.to_string_lossy().into_owned(),
    ];
    args.extend(rules(&s.path("exclude-list")));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();

    // A dry run names the same files and stores nothing.
    let mut dry = args.clone();
    dry.push("--dry-run");
    let (out, preview) = s.json(&dry).await;
    assert!(out.status.success(), "dry run: {}", stderr(&out));
    assert_eq!(preview["dry_run"], true, "{preview}");
    let would: BTreeSet<String> = preview["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(would, expected);
    let (_, listed) = s.json(&["list"]).await;
    assert_eq!(listed["files"].as_array().unwrap().len(), 0, "{listed}");

    let out = s.client(&args).await;
    assert!(out.status.success(), "backup: {}", stderr(&out));

    let (out, listed) = s.json(&["list"]).await;
    assert!(out.status.success(), "list: {}", stderr(&out));
    let names: BTreeSet<String> = listed["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_lists_what_would_be_backed_up_and_sends_nothing() {
    let s = Setup::new().await;
    let folder = s.path("folder");
    let expected = make_folder(&folder);
    let expected_bytes: u64 = expected
        .iter()
        .map(|n| std::fs::metadata(folder.join(n)).unwrap().len())
        .sum();
    let exclude_list = s.path("exclude-list");
    let mut args: Vec<String> = vec![
        "--json".into(),
        "backup".into(),
        "--dry-run".into(),
        folder.to_string_lossy().into_owned(),
    ];
    args.extend(rules(&exclude_list));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();

    // Against an address where nothing listens: a dry run must not need
    // the server at all.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let mut offline = vec!["--server", closed.as_str()];
    offline.extend_from_slice(&args);
    let out = run_client(&s.config, &offline, LIMIT).await;
    assert!(out.status.success(), "dry run: {}", stderr(&out));
    let preview = parse(&out);
    assert_eq!(preview["dry_run"], true, "{preview}");
    let listed: BTreeSet<String> = preview["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            Path::new(f["path"].as_str().unwrap())
                .strip_prefix(&folder)
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    assert_eq!(listed, expected);
    assert_eq!(preview["bytes"], expected_bytes, "{preview}");
    assert_eq!(preview["excluded"], 8, "{preview}");

    // Against the real server: still no snapshot and no data sent.
    let out = s.client(&args).await;
    assert!(out.status.success(), "dry run: {}", stderr(&out));
    assert_eq!(parse(&out)["bytes"], expected_bytes);
    let (out, snaps) = s.json(&["snapshots"]).await;
    assert!(out.status.success(), "snapshots: {}", stderr(&out));
    assert_eq!(snaps["snapshots"].as_array().unwrap().len(), 0, "{snaps}");
    let (out, files) = s.json(&["list"]).await;
    assert!(out.status.success(), "list: {}", stderr(&out));
    assert_eq!(files["files"].as_array().unwrap().len(), 0, "{files}");

    // The text listing names each file with its size, then the total.
    let text_args: Vec<&str> = args.iter().copied().filter(|a| *a != "--json").collect();
    let out = s.client(&text_args).await;
    assert!(out.status.success(), "dry run: {}", stderr(&out));
    let listing = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = listing.lines().collect();
    assert_eq!(lines.len(), expected.len() + 1, "{listing}");
    assert!(listing.contains("sub/keep.bin") && !listing.contains("notes.log"));
    let total = lines.last().unwrap();
    assert!(
        total.contains(&format!("({expected_bytes} bytes)")) && total.contains("nothing was sent"),
        "{total}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejects_a_bad_pattern_and_a_missing_exclude_file_before_connecting() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("f");
    write_file(&folder.join("a"), 10, 1);
    let config = dir.path().join("config");
    let f = folder.to_string_lossy().into_owned();
    let missing = dir.path().join("missing").to_string_lossy().into_owned();
    for (args, code) in [
        (vec!["backup", &f, "--exclude", "[z-a]"], 2),
        (vec!["backup", &f, "--exclude-file", &missing], 6),
        (vec!["backup", "--files-from", &missing], 6),
    ] {
        let mut all = vec!["--server", "127.0.0.1:9"];
        all.extend(args.iter().copied());
        let out = run_client(&config, &all, LIMIT).await;
        assert_eq!(out.status.code(), Some(code), "{args:?}: {}", stderr(&out));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_summary_line_names_new_changed_unchanged_and_excluded_files() {
    let s = Setup::new().await;
    let folder = s.path("folder");
    write_file(&folder.join("a.txt"), 1000, 1);
    write_file(&folder.join("b.txt"), 2000, 2);
    write_file(&folder.join("skip.log"), 3000, 3);
    let f = folder.to_string_lossy().into_owned();
    let args = ["backup", f.as_str(), "--exclude", "*.log"];

    let out = s.client(&args).await;
    assert!(out.status.success(), "backup: {}", stderr(&out));
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = said.lines().last().unwrap_or_default();
    assert!(
        line.contains("2 files (2 new, 0 changed, 0 unchanged)")
            && line.contains("1 excluded, 0 skipped"),
        "{line}"
    );

    write_file(&folder.join("b.txt"), 2500, 4);
    write_file(&folder.join("c.txt"), 500, 5);
    let (out, summary) = s.json(&args).await;
    assert!(out.status.success(), "backup: {}", stderr(&out));
    assert_eq!(
        (
            &summary["new_files"],
            &summary["changed_files"],
            &summary["unchanged_files"],
            &summary["excluded"]
        ),
        (
            &serde_json::json!(1),
            &serde_json::json!(1),
            &serde_json::json!(1),
            &serde_json::json!(1)
        ),
        "{summary}"
    );
    // What was sent is about the changed and the new file, not the rest.
    let sent = summary["sent_bytes"].as_u64().unwrap();
    assert!(sent > 0 && sent < 2500 + 500 + 1000, "{summary}");

    let out = s
        .client(&[args.as_slice(), &["--force-read"]].concat())
        .await;
    assert!(out.status.success(), "backup: {}", stderr(&out));
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = said.lines().last().unwrap_or_default();
    assert!(
        line.contains("3 files (3 read (not compared with the last snapshot))"),
        "{line}"
    );
}
