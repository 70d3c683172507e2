//! `forget`: removing snapshots (`docs/PROTOCOL.md` §13.8), by id or by a
//! retention policy with restic's meanings, read from the snapshots' times
//! (UTC) and tags. The server then collects what no snapshot needs; an
//! append-only client is refused (1681) and only the operator's policy
//! removes its snapshots.

use std::collections::BTreeSet;

pub use protocol::repo::retention::{not_kept, KeepPolicy};

use super::restore::Listed;
use crate::error::Error;
use crate::Client;

/// What a forget did (or, dry, would do).
#[derive(Debug, Default, serde::Serialize)]
pub struct ForgetSummary {
    /// The snapshots to remove, as listed.
    pub forget: Vec<Listed>,
    /// How many the server removed (0 on a dry run).
    pub removed: u64,
    pub dry_run: bool,
}

impl Client {
    /// Removes the snapshots `ids` and those `policy` does not keep; with
    /// `dry_run` only says which.
    ///
    /// # Errors
    /// When the server cannot be reached, a named snapshot does not
    /// exist, or the server refuses (an append-only client).
    pub async fn forget(
        &self,
        ids: &[u64],
        policy: &KeepPolicy,
        dry_run: bool,
    ) -> Result<ForgetSummary, Error> {
        let (mut r, _) = self.reader().await?;
        let listed = async {
            let entries = r.remote.snapshots().await?;
            entries
                .iter()
                .map(|s| r.describe(s))
                .collect::<Result<Vec<Listed>, Error>>()
        }
        .await;
        let listed = match listed {
            Ok(l) => l,
            Err(e) => {
                r.remote.close().await;
                return Err(e);
            }
        };
        if let Some(id) = ids.iter().find(|id| !listed.iter().any(|s| s.id == **id)) {
            r.remote.close().await;
            return Err(Error::NoSnapshot {
                server: self.options().server.clone(),
                what: format!("snapshot {id}"),
            });
        }
        let stamps: Vec<(u64, u64, Vec<String>)> = listed
            .iter()
            .map(|s| (s.id, s.time, s.tags.clone()))
            .collect();
        let mut gone: BTreeSet<u64> = not_kept(&stamps, policy).into_iter().collect();
        gone.extend(ids.iter().copied());
        let forget: Vec<Listed> = listed
            .into_iter()
            .filter(|s| gone.contains(&s.id))
            .collect();
        let mut summary = ForgetSummary {
            forget,
            removed: 0,
            dry_run,
        };
        if !dry_run && !gone.is_empty() {
            let ids: Vec<u64> = gone.into_iter().collect();
            let result = r.remote.forget(&ids).await;
            r.remote.close().await;
            summary.removed = result?;
        } else {
            r.remote.close().await;
        }
        Ok(summary)
    }
}
