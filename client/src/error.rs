//! Errors of the client, each one sentence a person can act on, and the exit
//! status each maps to.
//!
//! Policy: an error names the file, the server or the setting it is about and
//! says what to do; operating-system errors are never shown bare but inside
//! such a sentence. Every error belongs to one [`ErrorKind`], which fixes the
//! process exit status.

use std::io;
use std::path::{Path, PathBuf};

/// The class of a failure, which fixes the exit status of `backup-client`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// Exit status 1: the server broke the protocol, or an internal failure.
    Other,
    /// Exit status 2: a command-line, configuration or registration-state
    /// problem the user must fix before trying again.
    Usage,
    /// Exit status 3: the server could not be reached, did not answer in time,
    /// or the connection was lost.
    Unreachable,
    /// Exit status 4: the server refused a request (name taken, repeated
    /// server errors, a key it holds that does not match ours).
    Rejected,
    /// Exit status 5: the server's checksum did not match ours on every
    /// attempt, so the file was not stored; or a restored file did not
    /// verify, or the server found its stored copy damaged.
    Verification,
    /// Exit status 6: a local file (one to back up, or an identity or
    /// configuration file) could not be read or written, or a restored file
    /// could not be written where it belongs.
    LocalFile,
    /// Exit status 7: the server holds no such file or version (restore,
    /// delete).
    NotFound,
    /// Exit status 8: the server refused a backup because it would take
    /// this client over its quota; nothing was committed.
    Quota,
}

impl ErrorKind {
    /// The process exit status for this kind of failure.
    pub fn exit_code(self) -> u8 {
        match self {
            ErrorKind::Other => 1,
            ErrorKind::Usage => 2,
            ErrorKind::Unreachable => 3,
            ErrorKind::Rejected => 4,
            ErrorKind::Verification => 5,
            ErrorKind::LocalFile => 6,
            ErrorKind::NotFound => 7,
            ErrorKind::Quota => 8,
        }
    }

    /// A stable machine-readable name (used in `--json` output).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Other => "other",
            ErrorKind::Usage => "usage",
            ErrorKind::Unreachable => "server_unreachable",
            ErrorKind::Rejected => "rejected_by_server",
            ErrorKind::Verification => "verification_failed",
            ErrorKind::LocalFile => "local_file_error",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Quota => "quota_exceeded",
        }
    }
}

/// Everything that can go wrong in the client.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // --- server unreachable -------------------------------------------------
    #[error("cannot connect to the server at {server} ({reason}); check that the server is running and that the address is right")]
    Connect { server: String, reason: String },
    #[error("the server at {server} did not accept a connection within {secs} s; check the address and any firewall in between")]
    ConnectTimeout { server: String, secs: u64 },
    #[error("the server at {server} did not answer within {secs} s while {doing}; try again later, or raise --timeout if the server is slow")]
    Timeout {
        server: String,
        secs: u64,
        doing: String,
    },
    #[error(
        "the connection to the server at {server} was lost while {doing} ({reason}); try again"
    )]
    ConnectionLost {
        server: String,
        doing: String,
        reason: String,
    },
    #[error("the server at {server} closed the connection while {doing}; check the server's log, then try again")]
    Closed { server: String, doing: String },

    // --- rejected by the server ---------------------------------------------
    // The server answers a name it holds and a registration over its rate
    // for the address alike (1601, as version 3 has it), so both are said.
    #[error("the server at {server} refused to register \"{name}\": it already has a client of that name (choose another with --name), or too many registrations came from this address lately (try again later)")]
    NameTaken { server: String, name: String },
    #[error(
        "the server at {server} answered with an error {} while {request}; it may be out of disk space or misconfigured: try again later or ask its operator",
        times_text(*.times)
    )]
    ServerFailed {
        server: String,
        request: String,
        times: u8,
    },
    #[error(
        "the server at {server} answered the first request ({request}) with an error {} and nothing else; it may use the other request numbering: run again with --codes {try_codes}",
        times_text(*.times)
    )]
    OtherNumbering {
        server: String,
        request: String,
        times: u8,
        try_codes: u16,
    },
    #[error("the server at {server} does not support retrieval (list, restore, delete); only backups can be made to it")]
    RetrievalUnsupported { server: String },
    #[error(
        "the server at {server} does not support snapshots; back up file by file with --per-file"
    )]
    SnapshotsUnsupported { server: String },
    #[error("the server at {server} did not commit the snapshot: {detail}")]
    SnapshotRefused { server: String, detail: String },
    #[error(
        "backup refused: this client's quota{} on the server at {server} would be exceeded ({}); nothing {} committed. {}",
        quota.map_or_else(String::new, |q| format!(" of {}", human_size(Some(q)))),
        quota_detail(*.stored, *.size, .file.as_deref()),
        if .file.is_some() { "of it was" } else { "was" },
        quota_advice(.file.is_some())
    )]
    QuotaExceeded {
        server: String,
        /// What the client stores, and the bytes refused, when the server
        /// said (a pack or a file refused, 1682); `None` at a commit refused.
        stored: Option<u64>,
        quota: Option<u64>,
        size: Option<u64>,
        /// The file refused, in a per-file backup (`None`: a snapshot's).
        file: Option<PathBuf>,
    },
    #[error("the server at {server} does not know client {client_id} (\"{name}\"), so it holds nothing to retrieve for it; check --server and the identity in {dir}")]
    UnknownClient {
        server: String,
        client_id: String,
        name: String,
        dir: PathBuf,
    },
    #[error("the server at {server} keeps this client's history append-only, so \"{name}\" was not deleted; only the server's operator can remove it")]
    AppendOnly { server: String, name: String },
    #[error("the server at {server} keeps this client's snapshots append-only, so none was forgotten; only the server's operator removes them (backup-server prune)")]
    ForgetAppendOnly { server: String },
    #[error("the server at {server} refused to {doing} (reason {reason}); ask its operator")]
    Refused {
        server: String,
        doing: String,
        reason: u8,
    },
    #[error("the server at {server} sent a session key that this client's private key cannot open, so it holds another public key for client {client_id}; register anew with `backup-client register --force`")]
    KeyMismatch { server: String, client_id: String },
    #[error("the server at {server} refused the passphrase for client \"{name}\": it is not the passphrase set with `backup-client key add-passphrase`; nothing was read or written")]
    WrongPassphrase { server: String, name: String },
    #[error("the server at {server} has no passphrase for a client named \"{name}\"; check --name, or set one with `backup-client key add-passphrase` on a machine that holds the client's key files")]
    NoPassphrase { server: String, name: String },
    #[error("the server at {server} refused a passphrase login: too many logins or registrations from this address; try again in a minute")]
    PassphraseRate { server: String },
    #[error("the server at {server} kept the key envelope: {why}")]
    KeyKept { server: String, why: String },
    #[error("the server at {server} refused this client's proof of its key for client {client_id}: the key in {dir} is not the one registered under that id, or someone is relaying or altering the connection; if the server was reset, register anew with `backup-client register --force`")]
    ProofRejected {
        server: String,
        client_id: String,
        dir: PathBuf,
    },
    #[error("REFUSED: the server at {server} presented a certificate with fingerprint {presented}, but {pinned} is pinned for it ({pinned_in}). Someone may be intercepting the connection; nothing was sent. If the server's identity was deliberately replaced, ask its operator for the output of `backup-server fingerprint` and, once it matches {presented}, run again with --server-fingerprint {presented}")]
    ServerIdentityChanged {
        server: String,
        pinned: String,
        presented: String,
        pinned_in: String,
    },
    #[error("no fingerprint is pinned for the server at {server} in {file}; ask its operator for the output of `backup-server fingerprint` and run again with --server-fingerprint SHA256:..., or use --legacy for a legacy server")]
    NoPinnedServer { server: String, file: PathBuf },
    #[error("cannot establish a secure (TLS 1.3) session with the server at {server} ({reason}); if it is a legacy server, use --legacy")]
    Tls { server: String, reason: String },
    #[error("the server at {server} is a legacy (version 3) server, which has no secure mode; --legacy talks to it, insecurely (the server is not authenticated and files can be read or altered in transit)")]
    LegacyServer { server: String },

    // --- other ---------------------------------------------------------------
    #[error("the server at {server} answered outside the protocol ({detail}); check that it speaks version 3 and the request numbering (--codes 1025 or --codes 825)")]
    Protocol { server: String, detail: String },
    #[error("the server at {server} answered with code {code}, which is {swapped} with its two bytes swapped: it writes big-endian, unlike the version 3 protocol, and cannot interoperate with this client or any little-endian one")]
    BigEndian {
        server: String,
        code: u16,
        swapped: u16,
    },
    #[error("internal error: {0}; please report it")]
    Internal(String),
    #[error("this client's repository key cannot be opened: {detail}")]
    RepositoryKey { detail: String },
    #[error("{detail}")]
    Usage { detail: String },
    #[error("this client has no repository key on the server yet: it has made no snapshot")]
    NoRepositoryKey,
    #[error("this client holds a backup-only key: it can make snapshots but not read them; restore with the full key")]
    BackupOnlyKey,
    #[error("the server keeps this client's repository key only under its passphrase (the envelope for its RSA key was removed): back up with the backup-only key file (--key-file), and read with --passphrase")]
    MasterKeyPassphraseOnly,
    #[error("{path} is not a backup-only key file ({detail}); make one with `backup-client key export --backup-only --out FILE`")]
    BadKeyFile { path: PathBuf, detail: String },
    #[error("cannot read the passphrase: {detail}")]
    NoPassphraseGiven { detail: String },

    // --- verification failed ---------------------------------------------------
    #[error("{path} was not stored: the server's checksum differed from ours on all {attempts} attempts; check the network path to {server} and try again")]
    Verification {
        path: PathBuf,
        server: String,
        attempts: u8,
    },

    #[error("{name} was not restored: {detail}; the server may hold a damaged copy, try again or restore another version")]
    RestoreVerification { name: String, detail: String },
    /// The server found its stored copy does not match its recorded size
    /// and SHA-256 (or could not read it) in the middle of a restore, and
    /// answered 1607 in place of the last packet (`docs/PROTOCOL.md` §11.3).
    #[error("the server's copy of {name} (version {version}) is damaged or unreadable; nothing was written; the server's operator should run `backup-server scrub`")]
    DamagedOnServer { name: String, version: u64 },

    #[error("{path}: the server's copy of its content is damaged or missing ({detail}); the server's operator should run `backup-server scrub`")]
    DamagedObject { path: String, detail: String },

    // --- not found -------------------------------------------------------------
    #[error("the server at {server} holds no {what}; run `backup-client snapshots` to see what it holds")]
    NoSnapshot { server: String, what: String },
    #[error("the server at {server} holds no {what}; run `backup-client list --versions` to see what it holds")]
    NotFound { server: String, what: String },

    // --- local files -----------------------------------------------------------
    #[error(
        "the server's file name \"{name}\" cannot be restored safely ({reason}); it was skipped"
    )]
    UnsafeName { name: String, reason: String },
    #[error("{path} already exists, so \"{name}\" was not restored; pass --overwrite to replace it, or --to another place")]
    Exists { path: PathBuf, name: String },
    #[error("\"{name}\" cannot be restored to {path} ({reason})")]
    RestorePath {
        path: PathBuf,
        name: String,
        reason: String,
    },
    #[error("cannot read {path} ({reason}); check that it exists and that you may read it")]
    ReadFile { path: PathBuf, reason: String },
    #[error("{path} changed while it was being read ({expected} bytes expected, {got} found); back it up again once nothing is writing to it")]
    FileChanged {
        path: PathBuf,
        expected: u64,
        got: u64,
    },
    #[error("{path} is {size} bytes, more than the {max} bytes the protocol can carry in one file; split it before backing it up")]
    TooLarge { path: PathBuf, size: u64, max: u64 },
    #[error("{path} is {size} bytes and would need more than 65535 packets of {packet_size} bytes (at most {max} bytes fit); use a larger --packet-size")]
    TooManyPackets {
        path: PathBuf,
        size: u64,
        packet_size: usize,
        max: u64,
    },
    #[error("{path} cannot be sent under the name \"{name}\" ({reason}); rename it or back up its directory from nearer")]
    BadFileName {
        path: PathBuf,
        name: String,
        reason: String,
    },
    #[error("{path} would be stored as \"{name}\", the same name as {first}; back them up in separate runs")]
    DuplicateName {
        path: PathBuf,
        name: String,
        first: PathBuf,
    },
    #[error("{path} is neither a regular file nor a directory; only files and directories can be backed up")]
    NotAFile { path: PathBuf },
    #[error("{path} holds no regular files; there is nothing to back up")]
    NothingToBackUp { path: PathBuf },
    #[error("the identity file {path} cannot be used ({detail}); restore it from a copy, or register anew with `backup-client register --force`")]
    Identity { path: PathBuf, detail: String },
    #[error("the configuration file {path} cannot be used ({detail}); fix or delete it")]
    Config { path: PathBuf, detail: String },
    #[error("{path} is not a valid transfer.info ({detail}); line 1 must be HOST:PORT, line 2 the user name, and each further line a file to back up")]
    TransferInfo { path: PathBuf, detail: String },
    #[error("cannot write {path} ({reason}); check the permissions of its directory")]
    WriteFile { path: PathBuf, reason: String },

    // --- usage -------------------------------------------------------------------
    #[error("this client is not registered yet (no me.info in {dir}); run `backup-client register --server HOST:PORT --name NAME` first")]
    NotRegistered { dir: PathBuf },
    #[error("a client is already registered as \"{name}\" (id {client_id}, identity in {dir}); use `backup-client register --force` to register anew")]
    AlreadyRegistered {
        dir: PathBuf,
        name: String,
        client_id: String,
    },
    #[error(
        "no server address is configured; pass --server HOST:PORT or set `server` in {config}"
    )]
    NoServer { config: PathBuf },
    #[error("no user name is configured; pass --name NAME or set `name` in {config}")]
    NoName { config: PathBuf },
    #[error("\"{value}\" is not a server address; use HOST:PORT, for example 127.0.0.1:1256")]
    BadServer { value: String },
    #[error("\"{name}\" cannot be used as a user name ({reason}); choose a name of 1 to 254 printable characters")]
    BadUserName { name: String, reason: String },
    #[error("the packet size must be a multiple of 16 from 16 to {max} bytes, not {size}; fix --packet-size or `packet-size` in the configuration")]
    BadPacketSize { size: u64, max: usize },
    #[error("the request numbering must be 1025 or 825, not {0}; fix --codes or `codes` in the configuration")]
    BadCodes(u64),
    #[error("\"{name}\" is not a file name the server can hold ({reason}); use the name `backup-client list` shows")]
    BadName { name: String, reason: String },
    #[error("cannot find a configuration directory: set BACKUP_CLIENT_DIR, XDG_CONFIG_HOME or HOME, or pass --config-dir")]
    NoConfigDir,
    #[error("there is no transfer.info in {dir}, and no command was given; run `backup-client --help` to see the commands")]
    NoCommand { dir: PathBuf },
}

impl Error {
    /// The class of this failure.
    pub fn kind(&self) -> ErrorKind {
        use Error::*;
        match self {
            Connect { .. }
            | ConnectTimeout { .. }
            | Timeout { .. }
            | ConnectionLost { .. }
            | Closed { .. } => ErrorKind::Unreachable,
            NameTaken { .. }
            | ServerFailed { .. }
            | OtherNumbering { .. }
            | KeyMismatch { .. }
            | ProofRejected { .. }
            | ServerIdentityChanged { .. }
            | Tls { .. }
            | RetrievalUnsupported { .. }
            | UnknownClient { .. }
            | AppendOnly { .. }
            | ForgetAppendOnly { .. }
            | SnapshotsUnsupported { .. }
            | WrongPassphrase { .. }
            | NoPassphrase { .. }
            | PassphraseRate { .. }
            | KeyKept { .. }
            | SnapshotRefused { .. }
            | Refused { .. } => ErrorKind::Rejected,
            NotFound { .. } | NoSnapshot { .. } => ErrorKind::NotFound,
            QuotaExceeded { .. } => ErrorKind::Quota,
            RepositoryKey { .. }
            | NoRepositoryKey
            | BackupOnlyKey
            | MasterKeyPassphraseOnly
            | NoPassphraseGiven { .. }
            | Usage { .. } => ErrorKind::Usage,
            Protocol { .. } | BigEndian { .. } | Internal(_) => ErrorKind::Other,
            Verification { .. }
            | RestoreVerification { .. }
            | DamagedOnServer { .. }
            | DamagedObject { .. } => ErrorKind::Verification,
            ReadFile { .. }
            | FileChanged { .. }
            | TooLarge { .. }
            | TooManyPackets { .. }
            | BadFileName { .. }
            | DuplicateName { .. }
            | NotAFile { .. }
            | NothingToBackUp { .. }
            | Identity { .. }
            | Config { .. }
            | TransferInfo { .. }
            | WriteFile { .. }
            | UnsafeName { .. }
            | Exists { .. }
            | RestorePath { .. }
            | BadKeyFile { .. } => ErrorKind::LocalFile,
            NotRegistered { .. }
            | AlreadyRegistered { .. }
            | NoServer { .. }
            | NoName { .. }
            | BadServer { .. }
            | BadUserName { .. }
            | BadPacketSize { .. }
            | BadCodes(_)
            | BadName { .. }
            | NoConfigDir
            | NoPinnedServer { .. }
            | LegacyServer { .. }
            | NoCommand { .. } => ErrorKind::Usage,
        }
    }

    /// The process exit status for this failure.
    pub fn exit_code(&self) -> u8 {
        self.kind().exit_code()
    }

    /// Whether the connection cannot be used after this failure, so the rest
    /// of a run must stop.
    pub fn ends_connection(&self) -> bool {
        matches!(
            self.kind(),
            ErrorKind::Unreachable | ErrorKind::Rejected | ErrorKind::Other
        )
    }
}

/// A size for people: bytes below 1 KiB, else one decimal in the largest
/// binary unit it reaches; "unknown" when the server did not say.
fn human_size(bytes: Option<u64>) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    let Some(bytes) = bytes else {
        return "unknown size".into();
    };
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS.get(unit).copied().unwrap_or("PiB"))
}

fn quota_detail(stored: Option<u64>, size: Option<u64>, file: Option<&Path>) -> String {
    match (stored, size, file) {
        (Some(stored), Some(size), Some(file)) => format!(
            "it stores {} and {} of {} did not fit",
            human_size(Some(stored)),
            file.display(),
            human_size(Some(size))
        ),
        (Some(stored), Some(size), None) => format!(
            "it stores {} and a pack of {} did not fit",
            human_size(Some(stored)),
            human_size(Some(size))
        ),
        _ => "it stores more than its quota".into(),
    }
}

/// What a client refused by its quota can do: a per-file backup's history
/// shrinks by deleting files, a snapshot repository's by forgetting
/// snapshots and the operator's prune.
fn quota_advice(per_file: bool) -> &'static str {
    if per_file {
        "Delete files the server keeps for this client (backup-client delete), or ask the server's operator to raise the quota"
    } else {
        "Forget old snapshots (backup-client forget) and ask the server's operator to prune, or to raise the quota"
    }
}

/// "once", "twice", "3 times"...
fn times_text(times: u8) -> String {
    match times {
        1 => "once".into(),
        2 => "twice".into(),
        n => format!("{n} times"),
    }
}

/// A short human reason for an I/O error, without the raw OS error number.
pub fn io_reason(err: &io::Error) -> String {
    use io::ErrorKind as K;
    match err.kind() {
        K::NotFound => "it does not exist".into(),
        K::PermissionDenied => "permission denied".into(),
        K::ConnectionRefused => "connection refused".into(),
        K::ConnectionReset => "connection reset by the server".into(),
        K::ConnectionAborted => "connection aborted".into(),
        K::BrokenPipe => "the server stopped reading".into(),
        K::UnexpectedEof => "the server closed the connection".into(),
        K::TimedOut => "timed out".into(),
        K::AddrNotAvailable => "address not available".into(),
        K::IsADirectory => "it is a directory".into(),
        K::StorageFull => "no space left on the device".into(),
        K::ReadOnlyFilesystem => "the file system is read-only".into(),
        _ => {
            // Keep the OS text, which is specific, but drop "(os error N)".
            let text = err.to_string();
            match text.find(" (os error") {
                Some(i) => text.get(..i).unwrap_or(&text).to_owned(),
                None => text,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_are_distinct_per_kind() {
        let kinds = [
            ErrorKind::Other,
            ErrorKind::Usage,
            ErrorKind::Unreachable,
            ErrorKind::Rejected,
            ErrorKind::Verification,
            ErrorKind::LocalFile,
            ErrorKind::NotFound,
            ErrorKind::Quota,
        ];
        let mut codes: Vec<u8> = kinds.iter().map(|k| k.exit_code()).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes, vec![1, 2, 3, 4, 5, 6, 7, 8]);
    }

    #[test]
    fn io_reasons_drop_the_os_error_number() {
        let e = io::Error::from_raw_os_error(2);
        assert_eq!(io_reason(&e), "it does not exist");
        let e = io::Error::from_raw_os_error(36); // ENAMETOOLONG
        let reason = io_reason(&e);
        assert!(!reason.contains("os error"), "{reason}");
        assert!(!reason.is_empty());
    }

    #[test]
    fn a_quota_refusal_says_the_quota_what_is_stored_and_what_to_do() {
        let e = Error::QuotaExceeded {
            server: "s:1".into(),
            stored: Some((49 << 30) + (900 << 20)),
            quota: Some(50 << 30),
            size: Some(16 << 20),
            file: None,
        };
        let text = e.to_string();
        assert!(
            text.starts_with("backup refused: this client's quota of 50.0 GiB"),
            "{text}"
        );
        assert!(
            text.contains("it stores 49.9 GiB and a pack of 16.0 MiB"),
            "{text}"
        );
        assert!(text.contains("nothing was committed"), "{text}");
        assert_eq!(e.exit_code(), 8);
        assert_eq!(e.kind().as_str(), "quota_exceeded");
    }

    #[test]
    fn errors_name_their_subject_and_class() {
        let e = Error::Connect {
            server: "127.0.0.1:9".into(),
            reason: "connection refused".into(),
        };
        assert!(e.to_string().contains("127.0.0.1:9"));
        assert_eq!(e.exit_code(), 3);
        let e = Error::Verification {
            path: "a/b.txt".into(),
            server: "s:1".into(),
            attempts: 4,
        };
        assert!(e.to_string().starts_with("a/b.txt was not stored"));
        assert_eq!(e.exit_code(), 5);
        assert!(!e.ends_connection());
        let e = Error::DamagedOnServer {
            name: "notes.txt".into(),
            version: 7,
        };
        let text = e.to_string();
        assert!(text.contains("notes.txt (version 7) is damaged"), "{text}");
        assert!(text.contains("backup-server scrub"), "{text}");
        assert!(!text.contains("disk space"), "{text}");
        assert_eq!(e.exit_code(), 5);
        assert!(Error::NameTaken {
            server: "s:1".into(),
            name: "bob".into()
        }
        .ends_connection());
    }
}
