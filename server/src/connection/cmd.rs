//! One handler per request kind, as methods on the connection: each carries
//! out the session's action for its request against storage and sends the
//! session's answer. The dispatch `match` is in the parent module.

mod file;
mod passphrase;
mod prove;
mod public_key;
mod reconnect;
mod register;
mod repo;
mod retrieve;

pub(super) use repo::RepoConn;
