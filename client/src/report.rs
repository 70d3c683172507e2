//! What a backup or restore run did, file by file, for people and for
//! machines: one report type, [`RunReport`], whose [`RunKind`] holds the
//! two rules in which the runs differ (whether an empty run is a success,
//! and the exit status when files were left untried without a failure) and
//! the words its summary uses; one JSON renderer and one summary line.

use std::path::PathBuf;
use std::time::Duration;

use protocol::retrieval::ListEntry;
use protocol::ClientId;
use serde_json::{json, Map, Value};

use crate::error::{Error, ErrorKind};
use crate::files::Skipped;

/// Which run a [`RunReport`] is of.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum RunKind {
    /// Files sent to the server.
    #[default]
    Backup,
    /// Files fetched from the server.
    Restore,
}

impl RunKind {
    /// Whether a run with no file at all succeeded: a backup that stored
    /// nothing did not do its job; a client with nothing to restore did.
    pub fn empty_is_ok(self) -> bool {
        matches!(self, RunKind::Restore)
    }

    /// The exit status of a run that did not succeed yet has no failure to
    /// take it from (an empty backup; files left untried without a
    /// failure, which cannot happen).
    pub fn fallback_exit_code(self) -> u8 {
        ErrorKind::Other.exit_code()
    }

    /// What happened to a file that went well: "stored" or "restored".
    fn done(self) -> &'static str {
        match self {
            RunKind::Backup => "stored",
            RunKind::Restore => "restored",
        }
    }

    /// The server's place in the summary: stored "on", restored "from".
    fn preposition(self) -> &'static str {
        match self {
            RunKind::Backup => "on",
            RunKind::Restore => "from",
        }
    }
}

/// What became of one file.
#[derive(Debug)]
pub enum Outcome {
    /// Backed up and verified: the server's cksum matched ours.
    Stored {
        /// Attempts it took (1 to 4).
        attempts: u8,
        /// The POSIX cksum both sides computed.
        cksum: u32,
    },
    /// Restored: written and verified, with this cksum.
    Restored { cksum: u32 },
    /// Not stored or restored, for this reason.
    Failed(Error),
    /// Not tried, because an earlier failure ended the connection.
    NotAttempted,
}

/// One file of a run.
#[derive(Debug)]
pub struct FileReport {
    /// The name on the server.
    pub name: String,
    /// The local file: read (backup), or written or to be written
    /// (restore; unknown when the name cannot be made a safe path).
    pub path: Option<PathBuf>,
    /// The version asked for (0: the newest) or restored; backups have
    /// none.
    pub version: Option<u64>,
    /// Plaintext bytes (for a restore, known once the server announced
    /// them).
    pub size: u64,
    pub outcome: Outcome,
}

impl FileReport {
    /// Whether the file was stored or restored, and verified.
    pub fn is_done(&self) -> bool {
        matches!(
            self.outcome,
            Outcome::Stored { .. } | Outcome::Restored { .. }
        )
    }

    /// Whether the file was stored and verified.
    pub fn is_stored(&self) -> bool {
        matches!(self.outcome, Outcome::Stored { .. })
    }

    /// The failure, if any.
    pub fn error(&self) -> Option<&Error> {
        match &self.outcome {
            Outcome::Failed(e) => Some(e),
            _ => None,
        }
    }

    /// The file as JSON.
    fn to_json(&self) -> Value {
        let mut v = json!({
            "name": self.name,
            "size": self.size,
            "path": self.path.as_ref().map(|p| p.display().to_string()),
        });
        if let Some(version) = self.version {
            v["version"] = json!(version);
        }
        match &self.outcome {
            Outcome::Stored { attempts, cksum } => {
                v["status"] = json!("stored");
                v["attempts"] = json!(attempts);
                v["cksum"] = json!(cksum);
            }
            Outcome::Restored { cksum } => {
                v["status"] = json!("restored");
                v["cksum"] = json!(cksum);
            }
            Outcome::Failed(e) => {
                v["status"] = json!("failed");
                v["error"] = error_json(e);
            }
            Outcome::NotAttempted => v["status"] = json!("not_attempted"),
        }
        v
    }
}

/// The result of a backup or restore run.
#[derive(Debug, Default)]
pub struct RunReport {
    pub kind: RunKind,
    pub server: String,
    /// The client's name (backup: once connected).
    pub name: Option<String>,
    /// The client's id (backup: once connected).
    pub client_id: Option<ClientId>,
    /// Whether the client registered (anew) during the run (backup).
    pub registered: bool,
    pub files: Vec<FileReport>,
    /// Entries inside the folders backed up that were skipped by policy
    /// (symbolic links, sockets...); they do not make the run fail.
    pub skipped: Vec<Skipped>,
    pub elapsed: Duration,
}

impl RunReport {
    /// An empty report of a `kind` run against `server`.
    pub fn new(kind: RunKind, server: impl Into<String>) -> Self {
        Self {
            kind,
            server: server.into(),
            ..Self::default()
        }
    }

    /// Whether every file was stored or restored and verified (and, for a
    /// backup, there was at least one).
    pub fn ok(&self) -> bool {
        (self.kind.empty_is_ok() || !self.files.is_empty())
            && self.files.iter().all(FileReport::is_done)
    }

    /// The first failure of the run, in file order.
    pub fn first_error(&self) -> Option<&Error> {
        self.files.iter().find_map(FileReport::error)
    }

    /// 0 when the run is [`ok`](Self::ok), else the exit status of the
    /// first failure, else the kind's fallback.
    pub fn exit_code(&self) -> u8 {
        match self.first_error() {
            Some(e) => e.exit_code(),
            None if self.ok() => 0,
            None => self.kind.fallback_exit_code(),
        }
    }

    /// Files stored or restored and verified.
    pub fn done_files(&self) -> usize {
        self.files.iter().filter(|f| f.is_done()).count()
    }

    /// Plaintext bytes of the files stored or restored.
    pub fn done_bytes(&self) -> u64 {
        self.files
            .iter()
            .filter(|f| f.is_done())
            .map(|f| f.size)
            .sum()
    }

    /// Stored or restored bytes per second, in MB/s (10^6 bytes).
    pub fn megabytes_per_second(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.done_bytes() as f64 / secs / 1e6
        } else {
            0.0
        }
    }

    /// The machine-readable summary printed by `--json`. The counts are
    /// named after the kind (`stored_files`, `restored_bytes`); the
    /// client's identity and the skipped entries belong to backups.
    pub fn to_json(&self) -> Value {
        let done = self.kind.done();
        let done_files = self.done_files();
        let mut v = Map::new();
        v.insert("ok".into(), json!(self.ok()));
        v.insert("exit_code".into(), json!(self.exit_code()));
        v.insert("server".into(), json!(self.server));
        let files: Vec<Value> = self.files.iter().map(FileReport::to_json).collect();
        v.insert("files".into(), Value::Array(files));
        v.insert(format!("{done}_files"), json!(done_files));
        v.insert("failed_files".into(), json!(self.files.len() - done_files));
        v.insert(format!("{done}_bytes"), json!(self.done_bytes()));
        v.insert("seconds".into(), json!(self.elapsed.as_secs_f64()));
        v.insert("mb_per_s".into(), json!(self.megabytes_per_second()));
        if self.kind == RunKind::Backup {
            let skipped: Vec<Value> = self
                .skipped
                .iter()
                .map(|s| json!({ "path": s.path.display().to_string(), "reason": s.reason.as_str() }))
                .collect();
            v.insert("name".into(), json!(self.name));
            v.insert(
                "client_id".into(),
                json!(self.client_id.map(|id| id.to_hex())),
            );
            v.insert("registered".into(), json!(self.registered));
            v.insert("skipped".into(), Value::Array(skipped));
            v.insert("skipped_entries".into(), json!(self.skipped.len()));
        }
        Value::Object(v)
    }

    /// The one-line summary for people, printed at the end of the run.
    pub fn summary(&self) -> String {
        let (done, on) = (self.kind.done(), self.kind.preposition());
        let n = self.done_files();
        let server = &self.server;
        if self.files.is_empty() && self.kind == RunKind::Restore {
            return format!(
                "the server at {server} holds no files of this client; nothing was restored"
            );
        }
        let skipped = match self.skipped.len() {
            0 => String::new(),
            1 => "; 1 entry skipped, see the note above".to_owned(),
            n => format!("; {n} entries skipped, see the notes above"),
        };
        if self.ok() {
            format!(
                "{n} file{} {done} and verified {on} {server} ({} in {:.1} s, {:.1} MB/s){skipped}",
                if n == 1 { "" } else { "s" },
                indicatif::HumanBytes(self.done_bytes()),
                self.elapsed.as_secs_f64(),
                self.megabytes_per_second()
            )
        } else {
            format!(
                "{n} of {} files {done} and verified {on} {server}; see the errors above{skipped}",
                self.files.len()
            )
        }
    }
}

/// An error as JSON: `{"kind": ..., "exit_code": ..., "message": ...}`;
/// a quota refusal adds the server's `stored`, `quota` and `size` (bytes,
/// null when it did not say).
pub fn error_json(e: &Error) -> Value {
    let mut v =
        json!({ "kind": e.kind().as_str(), "exit_code": e.exit_code(), "message": e.to_string() });
    if let Error::QuotaExceeded {
        stored,
        quota,
        size,
        ..
    } = e
    {
        v["stored"] = json!(stored);
        v["quota"] = json!(quota);
        v["size"] = json!(size);
    }
    v
}

/// One list entry as JSON.
pub fn entry_json(e: &ListEntry) -> Value {
    json!({
        "name": e.file.to_string_lossy(),
        "version": e.version,
        "size": e.size,
        "stored_at": e.stored_at,
        "cksum": e.cksum,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, outcome: Outcome) -> FileReport {
        FileReport {
            path: Some(PathBuf::from(name)),
            name: name.into(),
            version: None,
            size: 10,
            outcome,
        }
    }

    #[test]
    fn exit_code_is_zero_only_when_every_file_is_stored() {
        let mut r = RunReport::new(RunKind::Backup, "s");
        assert_ne!(r.exit_code(), 0, "an empty run did not store anything");
        r.files.push(file(
            "a",
            Outcome::Stored {
                attempts: 1,
                cksum: 7,
            },
        ));
        assert_eq!(r.exit_code(), 0);
        r.files.push(file(
            "b",
            Outcome::Failed(Error::Verification {
                path: "b".into(),
                server: "s".into(),
                attempts: 4,
            }),
        ));
        r.files.push(file(
            "c",
            Outcome::Failed(Error::ReadFile {
                path: "c".into(),
                reason: "x".into(),
            }),
        ));
        assert_eq!(r.exit_code(), 5, "the first failure decides");
        let v = r.to_json();
        assert_eq!(v["ok"], json!(false));
        assert_eq!(v["files"][0]["status"], json!("stored"));
        assert_eq!(v["files"][1]["error"]["kind"], json!("verification_failed"));
        assert_eq!(v["files"][2]["error"]["exit_code"], json!(6));
        assert_eq!(v["stored_bytes"], json!(10));
    }

    #[test]
    fn skipped_links_are_listed_in_json_and_do_not_fail_the_run() {
        let mut r = RunReport::new(RunKind::Backup, "s");
        r.files.push(file(
            "a",
            Outcome::Stored {
                attempts: 1,
                cksum: 7,
            },
        ));
        r.skipped.push(Skipped {
            path: PathBuf::from("dir/link"),
            reason: crate::files::SkipReason::LinkToFile,
        });
        assert_eq!(r.exit_code(), 0);
        let v = r.to_json();
        assert_eq!(v["ok"], json!(true));
        assert_eq!(v["skipped_entries"], json!(1));
        assert_eq!(v["skipped"][0]["path"], json!("dir/link"));
        assert_eq!(v["skipped"][0]["reason"], json!("symlink_to_file"));
    }

    #[test]
    fn restore_exit_code_is_that_of_the_first_failure() {
        let mut report = RunReport::new(RunKind::Restore, "s");
        assert_eq!(report.exit_code(), 0, "nothing to restore is not a failure");
        report.files.push(FileReport {
            name: "a".into(),
            version: Some(1),
            size: 3,
            path: None,
            outcome: Outcome::Restored { cksum: 1 },
        });
        report.files.push(FileReport {
            name: "../b".into(),
            version: Some(2),
            size: 0,
            path: None,
            outcome: Outcome::Failed(Error::UnsafeName {
                name: "../b".into(),
                reason: "x".into(),
            }),
        });
        assert_eq!(report.exit_code(), 6);
        let v = report.to_json();
        assert_eq!(v["ok"], json!(false));
        assert_eq!(v["restored_files"], json!(1));
        assert_eq!(v["files"][1]["error"]["kind"], json!("local_file_error"));
        assert_eq!(v["restored_bytes"], json!(3));
    }

    fn keys(v: &Value) -> Vec<&str> {
        v.as_object().unwrap().keys().map(String::as_str).collect()
    }

    #[test]
    fn each_kind_renders_exactly_its_own_fields() {
        let mut backup = RunReport::new(RunKind::Backup, "s");
        backup.files.push(file(
            "a",
            Outcome::Stored {
                attempts: 2,
                cksum: 7,
            },
        ));
        let v = backup.to_json();
        let mut expected = vec![
            "client_id",
            "exit_code",
            "failed_files",
            "files",
            "mb_per_s",
            "name",
            "ok",
            "registered",
            "seconds",
            "server",
            "skipped",
            "skipped_entries",
            "stored_bytes",
            "stored_files",
        ];
        assert_eq!(keys(&v), expected);
        assert_eq!(
            keys(&v["files"][0]),
            ["attempts", "cksum", "name", "path", "size", "status"]
        );
        assert_eq!(v["files"][0]["path"], json!("a"));

        let mut restore = RunReport::new(RunKind::Restore, "s");
        restore.files.push(FileReport {
            name: "a".into(),
            version: Some(4),
            size: 3,
            path: None,
            outcome: Outcome::Restored { cksum: 1 },
        });
        let v = restore.to_json();
        expected = vec![
            "exit_code",
            "failed_files",
            "files",
            "mb_per_s",
            "ok",
            "restored_bytes",
            "restored_files",
            "seconds",
            "server",
        ];
        assert_eq!(keys(&v), expected);
        assert_eq!(
            keys(&v["files"][0]),
            ["cksum", "name", "path", "size", "status", "version"]
        );
        assert_eq!(v["files"][0]["path"], Value::Null);
        assert_eq!(v["files"][0]["status"], json!("restored"));
    }

    #[test]
    fn summaries_name_the_kind_and_an_empty_run_by_its_rule() {
        let mut backup = RunReport::new(RunKind::Backup, "srv");
        assert_eq!(backup.exit_code(), 1);
        assert_eq!(
            backup.summary(),
            "0 of 0 files stored and verified on srv; see the errors above"
        );
        backup.files.push(file(
            "a",
            Outcome::Stored {
                attempts: 1,
                cksum: 7,
            },
        ));
        backup.skipped.push(Skipped {
            path: PathBuf::from("l"),
            reason: crate::files::SkipReason::LinkToFile,
        });
        assert_eq!(
            backup.summary(),
            "1 file stored and verified on srv (10 B in 0.0 s, 0.0 MB/s); 1 entry skipped, see the note above"
        );

        let mut restore = RunReport::new(RunKind::Restore, "srv");
        assert_eq!(
            restore.summary(),
            "the server at srv holds no files of this client; nothing was restored"
        );
        restore.files.push(FileReport {
            name: "a".into(),
            version: Some(0),
            size: 0,
            path: None,
            outcome: Outcome::NotAttempted,
        });
        assert_eq!(restore.exit_code(), 1, "untried without a failure");
        assert_eq!(
            restore.summary(),
            "0 of 1 files restored and verified from srv; see the errors above"
        );
    }
}
