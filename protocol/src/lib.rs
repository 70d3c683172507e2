//! The backup wire protocol, without I/O.
//!
//! This crate holds everything that can be said about the protocol without a
//! socket, a file or a runtime: the typed messages of the legacy version 3
//! protocol (`docs/PROTOCOL.md` §2-§4), `tokio_util::codec` decoders and
//! encoders for both directions, the [`Reassembler`](reassembly::Reassembler)
//! for multi-packet uploads, the crypto pipeline (RSA key transport,
//! AES-256-CBC, POSIX `cksum`), the key files of legacy clients, and the
//! sans-IO session state machines of both peers.
//!
//! The server and client crates are thin async shells over this one.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
#![cfg_attr(
    test,
    allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::indexing_slicing,
        clippy::panic
    )
)]

pub mod cksum;
pub mod codec;
pub mod crypto;
pub mod keyfile;
pub mod limits;
pub mod message;
pub mod name;
pub mod payload;
pub mod reassembly;
pub mod repo;
pub mod restore;
pub mod retrieval;
pub mod secure;
pub mod session;
pub mod upload;
pub mod wire;

#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;

pub use cksum::Cksum;
pub use codec::{ClientCodec, CodecError, ServerCodec};
pub use limits::Limits;
pub use message::{FilePacket, PacketHead, Request, RequestFrame, Response};
pub use name::{FileName, NameError, UserName};
pub use reassembly::Leniency;
pub use wire::{ClientId, Dialect, Numbering, RequestCode, ResponseCode, SECURE_VERSION, VERSION};
