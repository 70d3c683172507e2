//! Passphrase login (1269) and key removal (1271), `docs/PROTOCOL.md`
//! §13.6: the session checks the signature and what a passphrase session
//! may do; this handler finds the envelope by name and removes envelopes.
//!
//! A passphrase login is one more way to prove a client before anything is
//! served, so it goes through the limits every unauthenticated connection
//! meets (the unauthenticated budget of admission, the request timeout, one
//! proof per connection, closed on a wrong one), and each lookup takes a
//! token of the source's registration bucket (`register_limit.rs`): one
//! address cannot guess faster than it may register.

use std::time::Instant;

use protocol::repo::message::{KeptReason, RepoResponse};
use protocol::session::server::PassphraseLookup;
use protocol::{ClientId, Response, UserName};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{error, info};

use crate::connection::register_limit::Verdict;
use crate::connection::{Connection, Ended};

impl<R, W> Connection<R, W>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    /// Finds the passphrase envelope of the completed client `name`, after
    /// taking a token of the source's rate, and sends the session's answer
    /// (1672 or 1673). A storage failure is answered 1607 and ends the
    /// connection.
    pub(in crate::connection) async fn find_passphrase(
        &mut self,
        name: UserName,
    ) -> Result<(), Ended> {
        let found = if let Verdict::Refused { log, .. } = self
            .shared
            .registrations
            .check(self.peer.ip(), Instant::now())
        {
            if log {
                info!(name = ?name, "passphrase login refused: over the rate limit for this address (further refusals for it are not logged for a minute)");
            }
            PassphraseLookup::OverRate
        } else {
            let looked = name.clone();
            match self
                .blocking(move |s| s.repo()?.passphrase_envelope(&looked))
                .await
            {
                Ok(Some((client_id, envelope))) => PassphraseLookup::Found {
                    client_id,
                    envelope: envelope.into(),
                },
                Ok(None) => {
                    info!(name = ?name, "passphrase login refused: no such client with a passphrase envelope");
                    PassphraseLookup::NotFound
                }
                Err(e) => {
                    error!(cause = %e, "looking up a passphrase envelope failed");
                    let answer = self.session.storage_failed();
                    self.reply(&answer).await?;
                    return Err(Ended::Storage(e));
                }
            }
        };
        if let PassphraseLookup::Found { client_id, .. } = &found {
            self.bind_client(*client_id);
        }
        let answer = self.session.passphrase_found(found, &mut self.rng)?;
        self.reply(&answer).await
    }

    /// Removes the envelope in `slot` unless append-only applies, the slot
    /// is empty, or it would leave the master key in no envelope the
    /// client can open without its RSA key; sends 1674 or 1675.
    pub(in crate::connection) async fn delete_key(
        &mut self,
        client_id: ClientId,
        slot: u8,
    ) -> Result<(), Ended> {
        let append_only = self.shared.config.append_only;
        match self
            .blocking(move |s| s.repo()?.delete_key(client_id, slot, append_only))
            .await
        {
            Ok(Ok(())) => {
                info!(slot, "key envelope removed");
                self.reply(&Response::Repo(RepoResponse::KeyDeleted { slot }))
                    .await
            }
            Ok(Err(reason)) => {
                let why = match reason {
                    KeptReason::APPEND_ONLY => "append-only",
                    KeptReason::LAST_WAY_IN => "it is the last way to the master key",
                    _ => "the slot is empty",
                };
                info!(slot, why, "key envelope kept");
                self.reply(&Response::Repo(RepoResponse::KeyKept { slot, reason }))
                    .await
            }
            Err(e) => {
                error!(cause = %e, "removing a key envelope failed");
                self.reply(&Response::GeneralError).await?;
                Err(Ended::Storage(e))
            }
        }
    }
}
