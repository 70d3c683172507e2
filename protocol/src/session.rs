//! Sans-IO session state machines for both peers (`docs/PROTOCOL.md` §6).
//!
//! Neither machine touches a socket, a disk or a clock: they take decoded
//! messages (and randomness) and say what the async shell must do next. The
//! server machine asks its shell for storage work through [`server::Action`]s
//! and is told the outcome; the client machine turns responses into
//! [`client::ClientEvent`]s.

pub mod client;
pub mod repo;
pub mod server;

/// Attempts to send one file: the first, then up to three resends after
/// "CRC wrong" (`docs/PROTOCOL.md` §6.4).
pub const MAX_SEND_ATTEMPTS: u8 = 4;

/// Times a request answered with 1607 is sent again before the client gives
/// up on it (`docs/PROTOCOL.md` §6.5: "resends the same request up to 3
/// times").
pub const SERVER_ERROR_RESENDS: u8 = 3;
