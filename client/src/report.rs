//! What a backup or restore run did, file by file, for people and for
//! machines.

use std::path::PathBuf;
use std::time::Duration;

use protocol::retrieval::ListEntry;
use protocol::ClientId;
use serde_json::{json, Value};

use crate::error::{Error, ErrorKind};
use crate::files::Skipped;

/// What became of one file.
#[derive(Debug)]
pub enum Outcome {
    /// Stored and verified: the server's cksum matched ours.
    Stored {
        /// Attempts it took (1 to 4).
        attempts: u8,
        /// The POSIX cksum both sides computed.
        cksum: u32,
    },
    /// Not stored, for this reason.
    Failed(Error),
    /// Not tried, because an earlier failure ended the connection.
    NotAttempted,
}

/// One file of a run.
#[derive(Debug)]
pub struct FileReport {
    pub path: PathBuf,
    /// The name sent to the server.
    pub name: String,
    pub size: u64,
    pub outcome: Outcome,
}

impl FileReport {
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
}

/// The result of a backup run.
#[derive(Debug, Default)]
pub struct Report {
    pub server: String,
    pub name: Option<String>,
    pub client_id: Option<ClientId>,
    /// Whether the client registered (anew) during the run.
    pub registered: bool,
    pub files: Vec<FileReport>,
    /// Entries inside the folders backed up that were skipped by policy
    /// (symbolic links, sockets...); they do not make the run fail.
    pub skipped: Vec<Skipped>,
    pub elapsed: Duration,
}

impl Report {
    /// Whether every file was stored and verified (and there was at least one).
    pub fn ok(&self) -> bool {
        !self.files.is_empty() && self.files.iter().all(FileReport::is_stored)
    }

    /// The first failure of the run, in file order.
    pub fn first_error(&self) -> Option<&Error> {
        self.files.iter().find_map(FileReport::error)
    }

    /// 0 when every file was stored and verified, else the exit status of
    /// the first failure.
    pub fn exit_code(&self) -> u8 {
        match self.first_error() {
            Some(e) => e.exit_code(),
            None if self.ok() => 0,
            // Files left untried without a failure cannot happen; be safe.
            None => 1,
        }
    }

    /// Plaintext bytes of the files stored.
    pub fn stored_bytes(&self) -> u64 {
        self.files
            .iter()
            .filter(|f| f.is_stored())
            .map(|f| f.size)
            .sum()
    }

    /// Stored bytes per second, in MB/s (10^6 bytes).
    pub fn megabytes_per_second(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.stored_bytes() as f64 / secs / 1e6
        } else {
            0.0
        }
    }

    /// The machine-readable summary printed by `--json`.
    pub fn to_json(&self) -> Value {
        let files: Vec<Value> = self
            .files
            .iter()
            .map(|f| {
                let mut v = json!({
                    "path": f.path.display().to_string(),
                    "name": f.name,
                    "size": f.size,
                });
                match &f.outcome {
                    Outcome::Stored { attempts, cksum } => {
                        v["status"] = json!("stored");
                        v["attempts"] = json!(attempts);
                        v["cksum"] = json!(cksum);
                    }
                    Outcome::Failed(e) => {
                        v["status"] = json!("failed");
                        v["error"] = error_json(e);
                    }
                    Outcome::NotAttempted => v["status"] = json!("not_attempted"),
                }
                v
            })
            .collect();
        let skipped: Vec<Value> = self
            .skipped
            .iter()
            .map(|s| json!({ "path": s.path.display().to_string(), "reason": s.reason.as_str() }))
            .collect();
        json!({
            "ok": self.ok(),
            "exit_code": self.exit_code(),
            "server": self.server,
            "name": self.name,
            "client_id": self.client_id.map(|id| id.to_hex()),
            "registered": self.registered,
            "files": files,
            "stored_files": self.files.iter().filter(|f| f.is_stored()).count(),
            "failed_files": self.files.iter().filter(|f| !f.is_stored()).count(),
            "stored_bytes": self.stored_bytes(),
            "skipped": skipped,
            "skipped_entries": self.skipped.len(),
            "seconds": self.elapsed.as_secs_f64(),
            "mb_per_s": self.megabytes_per_second(),
        })
    }
}

/// An error as JSON: `{"kind": ..., "exit_code": ..., "message": ...}`.
pub fn error_json(e: &Error) -> Value {
    json!({ "kind": e.kind().as_str(), "exit_code": e.exit_code(), "message": e.to_string() })
}

/// One file of a restore run.
#[derive(Debug)]
pub struct RestoredFile {
    /// The name on the server.
    pub name: String,
    /// The version asked for (0: the newest), or restored.
    pub version: u64,
    /// Plaintext bytes (known once the server announced them).
    pub size: u64,
    /// Where it was (or was to be) written.
    pub path: Option<PathBuf>,
    pub outcome: RestoreOutcome,
}

/// What became of one file of a restore.
#[derive(Debug)]
pub enum RestoreOutcome {
    /// Written and verified, with this cksum.
    Restored { cksum: u32 },
    /// Not restored, for this reason.
    Failed(Error),
    /// Not tried, because an earlier failure ended the connection.
    NotAttempted,
}

/// The result of a restore run.
#[derive(Debug, Default)]
pub struct RestoreReport {
    pub server: String,
    pub files: Vec<RestoredFile>,
    pub elapsed: Duration,
}

impl RestoreReport {
    /// Whether every file was restored (an empty run is fine).
    pub fn ok(&self) -> bool {
        self.files
            .iter()
            .all(|f| matches!(f.outcome, RestoreOutcome::Restored { .. }))
    }

    /// 0 when every file was restored, else the exit status of the first
    /// failure.
    pub fn exit_code(&self) -> u8 {
        let first = self.files.iter().find_map(|f| match &f.outcome {
            RestoreOutcome::Failed(e) => Some(e.exit_code()),
            _ => None,
        });
        match first {
            Some(code) => code,
            None if self.ok() => 0,
            None => ErrorKind::Other.exit_code(),
        }
    }

    /// Plaintext bytes restored.
    pub fn restored_bytes(&self) -> u64 {
        self.files
            .iter()
            .filter(|f| matches!(f.outcome, RestoreOutcome::Restored { .. }))
            .map(|f| f.size)
            .sum()
    }

    /// Restored bytes per second, in MB/s (10^6 bytes).
    pub fn megabytes_per_second(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.restored_bytes() as f64 / secs / 1e6
        } else {
            0.0
        }
    }

    /// The machine-readable summary printed by `--json`.
    pub fn to_json(&self) -> Value {
        let files: Vec<Value> = self
            .files
            .iter()
            .map(|f| {
                let mut v = json!({
                    "name": f.name,
                    "version": f.version,
                    "size": f.size,
                    "path": f.path.as_ref().map(|p| p.display().to_string()),
                });
                match &f.outcome {
                    RestoreOutcome::Restored { cksum } => {
                        v["status"] = json!("restored");
                        v["cksum"] = json!(cksum);
                    }
                    RestoreOutcome::Failed(e) => {
                        v["status"] = json!("failed");
                        v["error"] = error_json(e);
                    }
                    RestoreOutcome::NotAttempted => v["status"] = json!("not_attempted"),
                }
                v
            })
            .collect();
        let restored = self
            .files
            .iter()
            .filter(|f| matches!(f.outcome, RestoreOutcome::Restored { .. }))
            .count();
        json!({
            "ok": self.ok(),
            "exit_code": self.exit_code(),
            "server": self.server,
            "files": files,
            "restored_files": restored,
            "failed_files": self.files.len() - restored,
            "restored_bytes": self.restored_bytes(),
            "seconds": self.elapsed.as_secs_f64(),
            "mb_per_s": self.megabytes_per_second(),
        })
    }
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
            path: PathBuf::from(name),
            name: name.into(),
            size: 10,
            outcome,
        }
    }

    #[test]
    fn exit_code_is_zero_only_when_every_file_is_stored() {
        let mut r = Report::default();
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
        let mut r = Report::default();
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
        let mut report = RestoreReport::default();
        assert_eq!(report.exit_code(), 0, "nothing to restore is not a failure");
        report.files.push(RestoredFile {
            name: "a".into(),
            version: 1,
            size: 3,
            path: None,
            outcome: RestoreOutcome::Restored { cksum: 1 },
        });
        report.files.push(RestoredFile {
            name: "../b".into(),
            version: 2,
            size: 0,
            path: None,
            outcome: RestoreOutcome::Failed(Error::UnsafeName {
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
}
