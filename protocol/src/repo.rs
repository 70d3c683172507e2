//! The repository extension of secure mode (`docs/PROTOCOL.md` §13):
//! snapshots of content-defined chunks, sealed on the client, stored in
//! packs by a server that holds no key.
//!
//! - [`message`]: the requests and responses on the wire.
//! - [`keys`]: the client's master key and what derives from it.
//! - [`seal`]: compression and authenticated encryption of objects.
//! - [`pack`]: the pack index, built by the client and checked by the server.
//! - [`tree`]: the sealed formats of directories and snapshot descriptions.
//! - [`envelope`]: the master key wrapped for the client's RSA key or a passphrase.

pub mod envelope;
pub mod keys;
pub mod message;
pub mod pack;
pub mod retention;
pub mod seal;
pub mod tree;

pub use message::{ObjectId, PackEntry, RepoKind, RepoRequest, RepoResponse, ID_LEN};
