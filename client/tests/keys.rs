//! Repository keys end to end against the real binaries: a passphrase
//! recovers the snapshots on a machine without the key files, a wrong one
//! is refused with nothing written, a backup-only key backs up and
//! deduplicates but reads nothing, and the envelope for the RSA key goes
//! only while a passphrase envelope stays (`docs/PROTOCOL.md` §13.6,
//! `docs/SECURITY.md`).

mod support;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use support::processes::{run_client, stderr, ServerProcess};
use support::write_file;

const LIMIT: Duration = Duration::from_secs(120);
const NAME: &str = "keys";

/// A client registered with a fresh server that has backed up a folder
/// once, and a file holding the passphrase.
struct Setup {
    server: ServerProcess,
    dir: tempfile::TempDir,
    config: PathBuf,
    folder: PathBuf,
    passphrase: PathBuf,
}

impl Setup {
    async fn new(server_flags: &[&str]) -> Self {
        let server = ServerProcess::start(server_flags);
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config");
        let folder = dir.path().join("folder");
        std::fs::create_dir_all(folder.join("sub")).unwrap();
        write_file(&folder.join("big.bin"), 3 << 20, 11);
        write_file(&folder.join("sub/small.txt"), 4000, 12);
        std::fs::write(folder.join("empty"), b"").unwrap();
        let passphrase = dir.path().join("passphrase");
        std::fs::write(&passphrase, "correct horse battery staple\n").unwrap();
        let s = Self {
            server,
            dir,
            config,
            folder,
            passphrase,
        };
        let out = s.client(&["register", "--name", NAME]).await;
        assert!(out.status.success(), "register: {}", stderr(&out));
        let out = s.client(&["backup", &s.folder_arg()]).await;
        assert!(out.status.success(), "backup: {}", stderr(&out));
        s
    }

    fn folder_arg(&self) -> String {
        self.folder.to_string_lossy().into_owned()
    }

    fn pass_arg(&self) -> String {
        self.passphrase.to_string_lossy().into_owned()
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// The client with this setup's key files.
    async fn client(&self, args: &[&str]) -> Output {
        self.client_in(&self.config, args).await
    }

    /// The client with its configuration in `config`.
    async fn client_in(&self, config: &Path, args: &[&str]) -> Output {
        let addr = self.server.addr.to_string();
        let mut all = vec!["--server", addr.as_str()];
        all.extend_from_slice(args);
        run_client(config, &all, LIMIT).await
    }

    /// The server's fingerprint as the first registration pinned it.
    fn fingerprint(&self) -> String {
        let pins = std::fs::read_to_string(self.config.join("known_servers")).unwrap();
        let line = pins
            .lines()
            .find(|l| l.starts_with(&self.server.addr.to_string()))
            .unwrap();
        line.split_whitespace().nth(1).unwrap().to_owned()
    }

    async fn add_passphrase(&self) {
        let out = self
            .client(&[
                "key",
                "add-passphrase",
                "--passphrase-file",
                &self.pass_arg(),
            ])
            .await;
        assert!(out.status.success(), "add-passphrase: {}", stderr(&out));
    }

    /// The JSON summary of a run with `--json`.
    async fn json(&self, args: &[&str]) -> (Output, serde_json::Value) {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.client(&all).await;
        let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}): {} / {}",
                String::from_utf8_lossy(&out.stdout),
                stderr(&out)
            )
        });
        (out, v)
    }
}

/// Every file under `root`, by relative path, with the BLAKE3 of its
/// content.
fn files(root: &Path) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((
                    p.strip_prefix(root).unwrap().to_owned(),
                    blake3::hash(&std::fs::read(&p).unwrap())
                        .to_hex()
                        .to_string(),
                ));
            }
        }
    }
    out.sort();
    out
}

/// Names of the entries of `dir` (empty when it does not exist).
fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passphrase_restores_byte_for_byte_on_a_machine_without_the_key_files() {
    let s = Setup::new(&[]).await;
    s.add_passphrase().await;
    let fresh = s.path("fresh");
    let fp = s.fingerprint();
    let pass = s.pass_arg();
    let login = [
        "--passphrase",
        "--name",
        NAME,
        "--passphrase-file",
        pass.as_str(),
    ];

    let mut args = vec!["--server-fingerprint", fp.as_str(), "--json", "snapshots"];
    args.extend_from_slice(&login);
    let out = s.client_in(&fresh, &args).await;
    assert!(out.status.success(), "snapshots: {}", stderr(&out));
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed["snapshots"].as_array().unwrap().len(), 1, "{listed}");

    let to = s.path("restored");
    let to_arg = to.to_string_lossy().into_owned();
    let mut args = vec!["restore", "--to", to_arg.as_str()];
    args.extend_from_slice(&login);
    // The server is pinned now: no fingerprint needed.
    let out = s.client_in(&fresh, &args).await;
    assert!(out.status.success(), "restore: {}", stderr(&out));
    assert_eq!(
        files(&to.join("folder")),
        files(&s.folder),
        "restored tree differs"
    );
    assert_eq!(files(&s.folder).len(), 3);
    // The passphrase from the environment instead of a file.
    let addr = s.server.addr.to_string();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_backup-client"))
        .arg("--config-dir")
        .arg(&fresh)
        .args(["--server", &addr, "ls", "--passphrase", "--name", NAME])
        .env_remove("BACKUP_CLIENT_DIR")
        .env("BACKUP_PASSPHRASE", "correct horse battery staple")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "ls: {}", stderr(&out));
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(listing.contains("folder/sub/small.txt"), "{listing}");
    // No key files appeared on the new machine; only the pin.
    assert_eq!(entries(&fresh), vec!["known_servers".to_owned()]);
    assert!(
        s.server.log().contains("logged in with its passphrase"),
        "{}",
        s.server.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_passphrase_exits_4_and_writes_nothing() {
    let s = Setup::new(&[]).await;
    s.add_passphrase().await;
    let wrong = s.path("wrong");
    std::fs::write(&wrong, "incorrect horse\n").unwrap();
    let wrong_arg = wrong.to_string_lossy().into_owned();
    let fresh = s.path("fresh");
    let fp = s.fingerprint();
    let to = s.path("restored");
    let to_arg = to.to_string_lossy().into_owned();
    let out = s
        .client_in(
            &fresh,
            &[
                "--server-fingerprint",
                &fp,
                "restore",
                "--to",
                &to_arg,
                "--passphrase",
                "--name",
                NAME,
                "--passphrase-file",
                &wrong_arg,
            ],
        )
        .await;
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("refused the passphrase"), "{err}");
    assert!(!to.exists(), "the restore folder was made");
    assert!(entries(&fresh).is_empty(), "wrote {:?}", entries(&fresh));

    // A name without a passphrase: refused as well, nothing written.
    let out = s
        .client_in(
            &fresh,
            &[
                "--server-fingerprint",
                &fp,
                "snapshots",
                "--passphrase",
                "--name",
                "nobody",
                "--passphrase-file",
                &s.pass_arg(),
            ],
        )
        .await;
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("no passphrase"), "{}", stderr(&out));
    assert!(entries(&fresh).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_only_key_backs_up_and_deduplicates_but_cannot_read() {
    let s = Setup::new(&[]).await;
    s.add_passphrase().await;
    let key = s.path("backup.key");
    let key_arg = key.to_string_lossy().into_owned();
    let out = s
        .client(&["key", "export", "--backup-only", "--out", &key_arg])
        .await;
    assert!(out.status.success(), "export: {}", stderr(&out));
    let text = std::fs::read_to_string(&key).unwrap();
    assert!(text.starts_with("backup-client backup-only key"), "{text}");
    let out = s.client(&["key", "remove-rsa-envelope"]).await;
    assert!(out.status.success(), "remove: {}", stderr(&out));

    // priv.key alone no longer opens anything, nor makes a new key.
    let out = s.client(&["backup", &s.folder_arg()]).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("only under its passphrase"),
        "{}",
        stderr(&out)
    );

    write_file(&s.folder.join("new.bin"), 1 << 20, 13);
    let (out, first) = s
        .json(&[
            "--key-file",
            &key_arg,
            "backup",
            "--force-read",
            &s.folder_arg(),
        ])
        .await;
    assert!(out.status.success(), "backup-only backup: {}", stderr(&out));
    // Only the new file's chunk and the trees it changed are new: the
    // key names chunks as the full key did.
    let added = first["new_objects"].as_u64().unwrap();
    assert!((1..=4).contains(&added), "{first}");
    let (out, second) = s
        .json(&[
            "--key-file",
            &key_arg,
            "backup",
            "--force-read",
            &s.folder_arg(),
        ])
        .await;
    assert!(out.status.success(), "second backup: {}", stderr(&out));
    assert_eq!(second["new_objects"], 0, "{second}");
    assert_eq!(second["sent_bytes"], 0, "{second}");

    let to = s.path("restored");
    let to_arg = to.to_string_lossy().into_owned();
    for args in [
        vec![
            "--key-file",
            key_arg.as_str(),
            "restore",
            "--to",
            to_arg.as_str(),
        ],
        vec!["--key-file", key_arg.as_str(), "ls"],
        vec!["--key-file", key_arg.as_str(), "diff", "1"],
        vec!["restore", "--to", to_arg.as_str()],
    ] {
        let out = s.client(&args).await;
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert_eq!(
            stderr(&out)
                .lines()
                .filter(|l| l.starts_with("error:"))
                .count(),
            1,
            "{args:?}: {}",
            stderr(&out)
        );
        assert!(!to.exists(), "{args:?} wrote the restore folder");
    }

    // The passphrase reads what the backup-only key sealed.
    let out = s
        .client(&[
            "restore",
            "--to",
            &to_arg,
            "--passphrase",
            "--name",
            NAME,
            "--passphrase-file",
            &s.pass_arg(),
        ])
        .await;
    assert!(out.status.success(), "restore: {}", stderr(&out));
    assert_eq!(files(&to.join("folder")), files(&s.folder));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_the_rsa_envelope_is_refused_without_a_passphrase() {
    let s = Setup::new(&[]).await;
    let out = s.client(&["key", "remove-rsa-envelope"]).await;
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no passphrase envelope"),
        "{}",
        stderr(&out)
    );
    // Still readable with the key files.
    let to = s.path("restored");
    let out = s.client(&["restore", "--to", &to.to_string_lossy()]).await;
    assert!(out.status.success(), "restore: {}", stderr(&out));
    assert_eq!(files(&to.join("folder")), files(&s.folder));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_only_client_cannot_replace_or_remove_its_key_envelopes() {
    let s = Setup::new(&["--append-only"]).await;
    s.add_passphrase().await;
    let other = s.path("other");
    std::fs::write(&other, "another passphrase\n").unwrap();
    let out = s
        .client(&[
            "key",
            "add-passphrase",
            "--passphrase-file",
            &other.to_string_lossy(),
        ])
        .await;
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("append-only"), "{}", stderr(&out));
    let out = s.client(&["key", "remove-rsa-envelope"]).await;
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("append-only"), "{}", stderr(&out));
    // The first passphrase still opens.
    let out = s
        .client(&[
            "snapshots",
            "--passphrase",
            "--name",
            NAME,
            "--passphrase-file",
            &s.pass_arg(),
        ])
        .await;
    assert!(out.status.success(), "snapshots: {}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passphrase_logins_take_tokens_of_the_registration_rate_of_their_source() {
    // The registration takes one token, the first login the other.
    let s = Setup::new(&[
        "--registrations-per-minute",
        "1",
        "--registration-burst",
        "2",
    ])
    .await;
    s.add_passphrase().await;
    let pass = s.pass_arg();
    let login = [
        "snapshots",
        "--passphrase",
        "--name",
        NAME,
        "--passphrase-file",
        pass.as_str(),
    ];
    let out = s.client(&login).await;
    assert!(out.status.success(), "first login: {}", stderr(&out));
    let out = s.client(&login).await;
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("too many logins"), "{}", stderr(&out));
}
