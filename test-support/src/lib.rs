//! Real components the tests run against, started by the tests themselves.
//!
//! * [`SeaweedFs`]: an S3 service (`weed server -s3`) on free ports of
//!   127.0.0.1 in a temporary directory, stopped and removed on drop.
//! * [`Postgres`]: a throwaway PostgreSQL cluster (`initdb`, `pg_ctl`) on
//!   a free port of 127.0.0.1 in a temporary directory, stopped and
//!   removed on drop; [`Postgres::database`] makes an empty database.
//!
//! A component that is not installed is skipped with a message naming
//! what is missing and how to get it (`cargo xtask test` installs it),
//! unless the variable [`REQUIRE_S3`] or [`REQUIRE_PG`] is set (as
//! `cargo xtask test` and CI do): then a missing component fails the test.

mod postgres;
mod seaweedfs;

pub use postgres::{Postgres, REQUIRE_PG};
pub use seaweedfs::{SeaweedFs, REQUIRE_S3};
