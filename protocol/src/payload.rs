//! The error of a payload that arrived whole but could not be understood,
//! shared by the core messages ([`crate::message`]) and the retrieval
//! extension ([`crate::retrieval`]).

use crate::name::NameError;
use crate::wire::Dialect;

/// Why a payload that arrived whole could not be understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    #[error("payload of {code} is {actual} bytes, expected {expected}")]
    Size {
        code: u16,
        actual: usize,
        expected: &'static str,
    },
    #[error("bad name field: {0}")]
    Name(#[from] NameError),
    #[error("packet {number} of {total} is out of range")]
    PacketNumber { number: u32, total: u32 },
    #[error("code {code} does not exist in the {dialect:?} protocol")]
    NotInDialect { code: u16, dialect: Dialect },
    #[error("{field} of {value} does not fit the {dialect:?} protocol's field")]
    Unrepresentable {
        field: &'static str,
        value: u64,
        dialect: Dialect,
    },
}
