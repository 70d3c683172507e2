//! The backup server: a thin async shell over the `protocol` crate.
//!
//! [`run`] serves secure mode (TLS 1.3, `docs/PROTOCOL.md` §12) and, on a
//! separate listener when asked, the legacy version 3 protocol, until a
//! shutdown future completes. Each connection is decoded by
//! [`protocol::ServerCodec`] and driven by the sans-IO
//! [`protocol::session::server::ServerSession`]; this crate only moves bytes,
//! enforces timeouts and the connection cap, and carries out the session's
//! storage [`Action`](protocol::session::server::Action)s.
//!
//! Operator commands (list clients and files, prune, remove a client,
//! toggle append-only) are in [`admin`]; re-reading every stored file
//! against its recorded digests is [`scrub`].
//!
//! Storage sits behind two small traits ([`storage::MetaStore`] and
//! [`storage::BlobStore`]); the defaults are SQLite and a local data
//! directory, see [`storage`].
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let config = server::Config::new("/tmp/backup-data");
//! let listeners = server::Listeners::secure(listener);
//! server::run(listeners, config, async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(())
//! # }
//! ```
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod admin;
mod admission;
pub mod config;
mod connection;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod identity;
pub mod metrics;
pub mod scrub;
mod serve;
pub mod storage;

pub use config::Config;
pub use serve::{run, run_with_storage, Listeners, ServerError};
