//! How the server and the client are wired for each transport: the one
//! place that decides their flags.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Result};

/// `--mode` on the command line (a list: `--mode snapshot,legacy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ModeArg {
    /// Secure mode's default: snapshots (chunked, deduplicated, encrypted
    /// on the client).
    #[value(alias = "secure")]
    Snapshot,
    /// Secure mode, file by file (`--per-file`).
    PerFile,
    /// The legacy protocol.
    Legacy,
    /// Legacy and snapshot.
    Both,
    /// Every mode.
    All,
}

impl ModeArg {
    /// The modes a list of arguments names, each once, in the order rows
    /// are printed.
    pub fn modes(args: &[Self]) -> Vec<Mode> {
        let wanted = |m: Mode| {
            args.iter().any(|a| match a {
                Self::Snapshot => m == Mode::Snapshot,
                Self::PerFile => m == Mode::PerFile,
                Self::Legacy => m == Mode::Legacy,
                Self::Both => matches!(m, Mode::Legacy | Mode::Snapshot),
                Self::All => true,
            })
        };
        [Mode::Snapshot, Mode::PerFile, Mode::Legacy]
            .into_iter()
            .filter(|m| wanted(*m))
            .collect()
    }
}

/// The transport and storage one measurement uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The legacy protocol, version 3, in the clear (AES-256-CBC inside),
    /// file by file.
    Legacy,
    /// The TLS 1.3 transport, file by file (`--per-file`).
    PerFile,
    /// The TLS 1.3 transport, snapshots (the client's default).
    Snapshot,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Self::Legacy => "legacy",
            Self::PerFile => "secure-per-file",
            Self::Snapshot => "snapshot",
        }
    }

    /// Whether backups make snapshots (restored with `restore --to`).
    pub fn snapshots(self) -> bool {
        self == Self::Snapshot
    }

    /// Whether only the legacy protocol's 32-bit sizes apply.
    pub fn legacy(self) -> bool {
        self == Self::Legacy
    }
}

/// What the binaries at hand understand, read from their `--help`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Capabilities {
    /// The server has `--legacy-listen` (plain legacy on its own listener,
    /// TLS on the main one).
    pub server_legacy_listen: bool,
    /// The client has the global `--legacy` flag.
    pub client_legacy_flag: bool,
    /// The client has the global `--connections` flag.
    pub client_connections_flag: bool,
    /// The client makes snapshots in secure mode and has `--per-file` for
    /// the file-by-file way.
    pub client_snapshots: bool,
    /// The server limits registrations, connections and handshakes per
    /// source address (`--registration-burst`, `--max-per-source`,
    /// `--max-unauthenticated`).
    pub server_source_limits: bool,
}

/// Every client of the benchmark comes from 127.0.0.1, where a deployment's
/// clients come from many addresses: the per-source limits are raised to
/// this, so that 100 clients registering and connecting at once are served
/// as 100 machines would be.
pub const SOURCE_LIMIT: &str = "100000";

impl Capabilities {
    /// Server flags that lift the per-source limits, when the server has
    /// them.
    pub fn server_limit_args(self) -> Vec<String> {
        if !self.server_source_limits {
            return Vec::new();
        }
        [
            "--registration-burst",
            "--registrations-per-minute",
            "--max-per-source",
            "--max-unauthenticated",
        ]
        .into_iter()
        .flat_map(|flag| [flag.to_owned(), SOURCE_LIMIT.to_owned()])
        .collect()
    }
}

/// Connections a legacy-mode client of ours is given: the client uses one
/// by default with `--legacy` (a legacy server may not take several
/// sessions of one client at once), our server takes several, as in secure
/// mode by default.
pub const LEGACY_CONNECTIONS: &str = "4";

impl Capabilities {
    pub fn probe(server: &Path, client: &Path) -> Self {
        let help = |bin: &Path| {
            Command::new(bin)
                .arg("--help")
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default()
        };
        let client_help = help(client);
        let server_help = help(server);
        Self {
            server_legacy_listen: server_help.contains("--legacy-listen"),
            server_source_limits: [
                "--registration-burst",
                "--max-per-source",
                "--max-unauthenticated",
            ]
            .iter()
            .all(|f| server_help.contains(f)),
            client_legacy_flag: client_help.split_whitespace().any(|w| w == "--legacy"),
            client_connections_flag: client_help.contains("--connections"),
            client_snapshots: client_help.contains("--per-file"),
        }
    }
}

/// Flags for one server and its clients.
#[derive(Debug, Clone)]
pub struct Wiring {
    pub server_args: Vec<String>,
    /// Global client flags (before the command).
    pub client_args: Vec<String>,
    /// Where clients connect.
    pub client_addr: SocketAddr,
}

impl Mode {
    /// The flags for a server on 127.0.0.1 with two free ports: `main` (the
    /// server's main listener) and `spare` (a second listener if the mode
    /// needs one).
    ///
    /// # Errors
    /// When the binaries cannot run this mode.
    pub fn wiring(self, caps: Capabilities, main: u16, spare: u16) -> Result<Wiring> {
        let at = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        match self {
            Self::Legacy if caps.server_legacy_listen => {
                // Binaries with the TLS transport: plain legacy only on the
                // listener named by --legacy-listen, TLS on the main one.
                let mut client_args = Vec::new();
                if caps.client_legacy_flag {
                    client_args.push("--legacy".to_owned());
                }
                if caps.client_connections_flag {
                    client_args.extend(["--connections".to_owned(), LEGACY_CONNECTIONS.to_owned()]);
                }
                Ok(Wiring {
                    server_args: vec![
                        "--listen".into(),
                        at(spare).to_string(),
                        "--legacy-listen".into(),
                        at(main).to_string(),
                    ],
                    client_args,
                    client_addr: at(main),
                })
            }
            // Legacy-only binaries: the main listener speaks legacy, and the
            // client needs no flag.
            Self::Legacy => Ok(Wiring {
                server_args: vec!["--listen".into(), at(main).to_string()],
                client_args: Vec::new(),
                client_addr: at(main),
            }),
            Self::PerFile => {
                let mut w = secure_wiring(caps, at(main))?;
                if caps.client_snapshots {
                    w.client_args.push("--per-file".to_owned());
                }
                Ok(w)
            }
            Self::Snapshot if !caps.client_snapshots => {
                bail!("this client makes no snapshots (it has no --per-file flag)")
            }
            Self::Snapshot => secure_wiring(caps, at(main)),
        }
    }
}

/// Secure mode: the server serves TLS 1.3 on its main listener; the client
/// speaks it by default and pins the server's certificate fingerprint at its
/// first registration (trust on first use), so no extra flag is needed.
fn secure_wiring(caps: Capabilities, addr: SocketAddr) -> Result<Wiring> {
    if !caps.server_legacy_listen {
        bail!("these binaries speak only the legacy protocol: secure mode is not available");
    }
    Ok(Wiring {
        server_args: vec!["--listen".into(), addr.to_string()],
        client_args: Vec::new(),
        client_addr: addr,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_only_binaries_need_no_flags() {
        let w = Mode::Legacy
            .wiring(Capabilities::default(), 4000, 4001)
            .unwrap();
        assert_eq!(w.server_args, ["--listen", "127.0.0.1:4000"]);
        assert!(w.client_args.is_empty());
        assert_eq!(w.client_addr.port(), 4000);
        for m in [Mode::PerFile, Mode::Snapshot] {
            assert!(m.wiring(Capabilities::default(), 4000, 4001).is_err());
        }
    }

    #[test]
    fn legacy_uses_the_legacy_listener_when_tls_is_the_default() {
        let caps = Capabilities {
            server_legacy_listen: true,
            client_legacy_flag: true,
            client_connections_flag: true,
            client_snapshots: true,
            server_source_limits: false,
        };
        let w = Mode::Legacy.wiring(caps, 4000, 4001).unwrap();
        assert_eq!(
            w.server_args,
            [
                "--listen",
                "127.0.0.1:4001",
                "--legacy-listen",
                "127.0.0.1:4000"
            ]
        );
        assert_eq!(w.client_args, ["--legacy", "--connections", "4"]);
        assert_eq!(w.client_addr.port(), 4000);
        let s = Mode::Snapshot.wiring(caps, 4000, 4001).unwrap();
        assert_eq!(s.server_args, ["--listen", "127.0.0.1:4000"]);
        assert!(s.client_args.is_empty());
        let p = Mode::PerFile.wiring(caps, 4000, 4001).unwrap();
        assert_eq!(p.client_args, ["--per-file"]);
    }

    #[test]
    fn snapshot_mode_needs_a_client_that_makes_snapshots() {
        let caps = Capabilities {
            server_legacy_listen: true,
            client_legacy_flag: true,
            client_connections_flag: true,
            client_snapshots: false,
            server_source_limits: true,
        };
        assert_eq!(caps.server_limit_args().len(), 8);
        assert!(Capabilities::default().server_limit_args().is_empty());
        assert!(Mode::Snapshot.wiring(caps, 4000, 4001).is_err());
        assert!(Mode::PerFile
            .wiring(caps, 4000, 4001)
            .unwrap()
            .client_args
            .is_empty());
    }

    #[test]
    fn mode_lists_name_each_mode_once_in_row_order() {
        assert_eq!(
            ModeArg::modes(&[ModeArg::Legacy, ModeArg::Both]),
            [Mode::Snapshot, Mode::Legacy]
        );
        assert_eq!(ModeArg::modes(&[ModeArg::All]).len(), 3);
        assert_eq!(ModeArg::modes(&[ModeArg::PerFile]), [Mode::PerFile]);
    }
}
