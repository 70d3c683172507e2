//! `backup-client`: a command-line client for the legacy version 3 backup
//! protocol, usable as a library.
//!
//! The library drives the sans-IO client machine of the `protocol` crate
//! over TCP: [`Client::register`] makes an identity, [`Client::backup`]
//! reconnects (or registers) and streams files through encryption, packet
//! by packet, with the cksum verified for each. With a server that supports
//! the retrieval extension, [`Client::list`], [`Client::restore`],
//! [`Client::restore_all`] and [`Client::delete`] read the history back
//! ([`retrieval`], with the safe writing of restored files in [`restore`]).
//! The binary is a thin shell over [`cli::run`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), client::Error> {
//! use client::{files, Client, IdentityStore, Options};
//! let client = Client::new(Options::new("127.0.0.1:1256"), IdentityStore::new("/home/me/.config/backup-client"));
//! let name = protocol::UserName::try_from("alice").map_err(|e| client::Error::Internal(e.to_string()))?;
//! let listed = files::collect(&["/home/me/docs".into()]);
//! let report = client.backup(listed.items, Some(&name)).await?;
//! assert_eq!(report.exit_code(), 0);
//! # Ok(()) }
//! ```

pub mod cli;
pub mod connection;
pub mod engine;
pub mod error;
pub mod exclude;
pub mod fanout;
pub mod feedback;
pub mod files;
pub mod fsutil;
pub mod identity;
pub mod legacy;
pub mod report;
pub mod restore;
pub mod retrieval;
pub mod settings;
pub mod snapshot;
pub mod tls;
pub mod upload;

pub use engine::Client;
pub use error::{Error, ErrorKind};
pub use feedback::{Feedback, Silent};
pub use files::BackupItem;
pub use identity::{Identity, IdentityStore};
pub use legacy::TransferInfo;
pub use report::{FileReport, Outcome, RunKind, RunReport};
pub use settings::{Options, PacketSize};
