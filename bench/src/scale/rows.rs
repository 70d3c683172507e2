//! Rows of the metadata tables the capacity model counts, read with the
//! databases' own command-line clients (`psql`, `sqlite3`) while the
//! server runs: a reader does not disturb it (SQLite in WAL mode,
//! PostgreSQL's MVCC).

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The tables counted, in the order of [`Rows::counts`].
pub const TABLES: [&str; 7] = [
    "packs",
    "objects",
    "snapshots",
    "snapshot_refs",
    "versions",
    "files",
    "clients",
];

/// Where a server keeps its metadata.
#[derive(Debug, Clone)]
pub enum Meta {
    /// `backup.db` in the data directory.
    Sqlite(PathBuf),
    /// A PostgreSQL database, by URL.
    Postgres(String),
}

/// Rows in each of [`TABLES`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rows {
    pub counts: [u64; TABLES.len()],
}

impl Rows {
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// What `self` has beyond `before`, table by table.
    pub fn since(&self, before: &Self) -> Self {
        let mut counts = self.counts;
        for (c, b) in counts.iter_mut().zip(before.counts) {
            *c = c.saturating_sub(b);
        }
        Self { counts }
    }

    /// Reads "N|N|N..." (one count per table, as both clients print one
    /// row of unaligned output).
    fn parse(text: &str) -> Result<Self> {
        let mut counts = [0u64; TABLES.len()];
        let fields: Vec<&str> = text.trim().split('|').collect();
        if fields.len() != TABLES.len() {
            bail!("expected {} counts, got {text:?}", TABLES.len());
        }
        for (c, f) in counts.iter_mut().zip(fields) {
            *c = f
                .trim()
                .parse()
                .with_context(|| format!("a count: {f:?}"))?;
        }
        Ok(Self { counts })
    }
}

/// One query counting every table.
fn query() -> String {
    let parts: Vec<String> = TABLES
        .iter()
        .map(|t| format!("(SELECT count(*) FROM {t})"))
        .collect();
    format!("SELECT {};", parts.join(", "))
}

/// Counts the rows of [`TABLES`] in `meta`.
///
/// # Errors
/// When the client is missing or the query fails.
pub fn count(meta: &Meta) -> Result<Rows> {
    if let Meta::Sqlite(db) = meta {
        // A server on S3 makes its database when it first writes.
        if !db.exists() {
            return Ok(Rows::default());
        }
    }
    let out = match meta {
        Meta::Sqlite(db) => Command::new("sqlite3")
            .arg("-readonly")
            .arg(db)
            .arg(query())
            .output()
            .context("running sqlite3 (apt-get install sqlite3)")?,
        Meta::Postgres(url) => Command::new("psql")
            .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-d"])
            .arg(url)
            .arg("-c")
            .arg(query())
            .output()
            .context("running psql (apt-get install postgresql-client)")?,
    };
    if !out.status.success() {
        bail!(
            "counting metadata rows failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Rows::parse(&String::from_utf8_lossy(&out.stdout))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_one_row_of_counts() {
        let r = Rows::parse("3|10|1|10|2|2|1\n").unwrap();
        assert_eq!(r.counts, [3, 10, 1, 10, 2, 2, 1]);
        assert_eq!(r.total(), 29);
        let before = Rows::parse("1|4|0|4|1|1|1").unwrap();
        assert_eq!(r.since(&before).counts, [2, 6, 1, 6, 1, 1, 0]);
        assert!(Rows::parse("1|2").is_err());
        assert!(Rows::parse("").is_err());
        assert!(Rows::parse("1|2|3|4|5|6|x").is_err());
    }

    #[test]
    fn counts_every_table_in_one_query() {
        let q = query();
        for t in TABLES {
            assert!(q.contains(&format!("FROM {t})")), "{q}");
        }
    }
}
