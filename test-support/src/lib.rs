//! Real components the tests run against, started by the tests themselves.
//!
//! * [`SeaweedFs`]: an S3 service (`weed server -s3`) on free ports of
//!   127.0.0.1 in a temporary directory, stopped and removed on drop.
//!
//! A component that is not installed is skipped with a message naming
//! what is missing and how to get it (`cargo xtask test` installs it),
//! unless the variable [`REQUIRE_S3`] is set (as `cargo xtask test` and
//! CI do): then a missing component fails the test.

mod seaweedfs;

pub use seaweedfs::{SeaweedFs, REQUIRE_S3};
