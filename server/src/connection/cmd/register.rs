//! Register (1025 legacy, 1025 with a key in secure mode): the per-source
//! rate limit, then storage (`docs/PROTOCOL.md` §6.1, §12.3).

use std::time::{Instant, SystemTime};

use protocol::session::server::RegisterOutcome;
use protocol::{ClientId, UserName};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{error, info, warn};

use crate::connection::register_limit::{Refusal, Verdict};
use crate::connection::{Connection, Ended};
use crate::storage::{QuotaSetting, Registration};

impl<R, W> Connection<R, W>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    /// Carries out a registration (legacy 1025, secure-mode 1025 with a
    /// key): the per-source rate limit first, then storage, where a name
    /// whose client never completed may be taken over after the grace
    /// period (`docs/PROTOCOL.md` §6.1, §12.3).
    pub(in crate::connection) async fn register(
        &mut self,
        client_id: ClientId,
        name: UserName,
        secure_key: Option<bytes::Bytes>,
    ) -> Result<(), Ended> {
        // Over the limit: "registration failed" (1601), which every
        // client understands, without touching storage (§6.1).
        if let Verdict::Refused { why, log } = self
            .shared
            .registrations
            .check(self.peer.ip(), Instant::now())
        {
            if log {
                match why {
                    Refusal::OverRate => {
                        info!(name = ?name, "registration refused: over the rate limit for this address (further refusals for it are not logged for a minute)")
                    }
                    Refusal::TableFull => {
                        warn!(name = ?name, "registration refused: too many addresses registering at once (further refusals are not logged for a minute)")
                    }
                }
            }
            let response = self
                .session
                .registered(RegisterOutcome::NameTaken, &mut self.rng)?;
            return self.reply(&response).await;
        }
        let n = name.clone();
        let grace = self.shared.config.registration_grace;
        let registration = self
            .blocking(move |s| {
                s.meta().register_client(
                    client_id,
                    &n,
                    secure_key.as_deref(),
                    SystemTime::now(),
                    Some(grace),
                )
            })
            .await;
        let outcome = match &registration {
            Ok(Registration::Created | Registration::Replaced { .. }) => RegisterOutcome::Created,
            Ok(Registration::NameTaken) => RegisterOutcome::NameTaken,
            Err(e) => {
                error!(cause = %e, "registration failed");
                RegisterOutcome::Failed
            }
        };
        let response = self.session.registered(outcome, &mut self.rng)?;
        if outcome == RegisterOutcome::Created {
            // A new client has no quota of its own.
            self.own_quota = Some(QuotaSetting::Inherit);
        }
        match registration {
            Ok(Registration::Created) => {
                self.bind_client(client_id);
                info!(name = ?name, "registered");
            }
            Ok(Registration::Replaced { stale }) => {
                self.bind_client(client_id);
                info!(name = ?name, %stale, "registered in place of a client that never completed its registration");
            }
            Ok(Registration::NameTaken) => {
                info!(name = ?name, "registration refused: name taken")
            }
            Err(_) => {}
        }
        self.reply(&response).await
    }
}
