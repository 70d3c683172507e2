//! Snapshots over the repository extension (`docs/PROTOCOL.md` §13): the
//! client's side, which chunks, names and seals.
//!
//! - [`chunk`]: content-defined chunking of a file with bounded memory.

pub mod backup;
pub mod cache;
pub mod check;
pub mod chunk;
pub mod diff;
pub mod forget;
mod idset;
pub mod keys;
pub mod remote;
pub mod restore;
mod sink;
mod upload;
mod walk;
