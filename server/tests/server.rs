//! End-to-end tests: the real server on 127.0.0.1:0 (or the real binary),
//! driven through `protocol`'s `ClientCodec`.
//!
//! `cargo test -p backup-server --test server` runs them all; the measurement
//! in `perf` is ignored by default (see that module for how to run it).
//! The modules live in `tests/server/` (a test crate root looks for its
//! modules next to itself, hence the `path` attributes).

#[path = "server/harness.rs"]
mod harness;

#[path = "server/admission.rs"]
mod admission;
#[path = "server/blob_stores.rs"]
mod blob_stores;
#[path = "server/concurrency.rs"]
mod concurrency;
#[path = "server/crash.rs"]
mod crash;
#[path = "server/crash_many.rs"]
mod crash_many;
#[path = "server/disk_full.rs"]
mod disk_full;
#[path = "server/flows.rs"]
mod flows;
#[path = "server/hostile.rs"]
mod hostile;
#[path = "server/hostile_network.rs"]
mod hostile_network;
#[path = "server/legacy_deviations.rs"]
mod legacy_deviations;
#[path = "server/lifecycle.rs"]
mod lifecycle;
#[path = "server/malformed.rs"]
mod malformed;
#[path = "server/meta_stores.rs"]
mod meta_stores;
#[path = "server/metrics.rs"]
mod metrics;
#[path = "server/operations.rs"]
mod operations;
#[path = "server/perf.rs"]
mod perf;
#[path = "server/registration.rs"]
mod registration;
#[path = "server/repo.rs"]
mod repo;
#[path = "server/repo_stores.rs"]
mod repo_stores;
#[path = "server/retrieval.rs"]
mod retrieval;
#[path = "server/scrub.rs"]
mod scrub;
#[path = "server/vectors.rs"]
mod vectors;
