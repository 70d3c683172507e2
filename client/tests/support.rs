//! Shared test helpers: a fake legacy server built on the protocol crate's
//! server machine (with switchable quirks of deployed servers), a relay that
//! corrupts ciphertext on its way to the server, the real server on a
//! temporary data directory, and small file helpers.
#![allow(dead_code)]

pub mod balancer;
pub mod fake_server;
pub mod processes;
pub mod real_server;
pub mod relay;

use std::path::Path;
use std::time::Duration;

/// Bound on any single test step that waits on the network.
pub const STEP: Duration = Duration::from_secs(30);

/// Deterministic, incompressible-looking bytes.
pub fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 8) as u8
        })
        .collect()
}

/// Writes `len` pattern bytes to `path` (creating parents) and returns them.
pub fn write_file(path: &Path, len: usize, seed: u32) -> Vec<u8> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    let data = pattern(len, seed);
    std::fs::write(path, &data).unwrap();
    data
}

/// The legacy key files of the recorded sessions.
pub fn vector_keys(who: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../protocol/tests/vectors/keys")
        .join(who)
}
