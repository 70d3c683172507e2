//! Reconnect (1027): look the client up and send what the session answers
//! (1605 with a fresh key, or 1606) (`docs/PROTOCOL.md` §6.3).

use std::time::SystemTime;

use protocol::session::server::KnownClient;
use protocol::{ClientId, Response, UserName};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{error, info, warn};

use crate::connection::{Connection, Ended};

impl<R, W> Connection<R, W>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    /// Carries out [`protocol::session::server::Action::LookupClient`]. A
    /// storage failure is answered 1607 and the connection goes on.
    pub(in crate::connection) async fn reconnect(
        &mut self,
        client_id: ClientId,
        name: UserName,
    ) -> Result<(), Ended> {
        let found = match self.blocking(move |s| s.meta().client(client_id)).await {
            Ok(found) => found,
            Err(e) => {
                error!(cause = %e, "client lookup failed");
                let response = self.session.storage_failed();
                return self.reply(&response).await;
            }
        };
        self.own_quota = found.as_ref().map(|c| c.quota);
        let known = found.map(|c| KnownClient {
            name: c.name,
            public_key: c.public_key,
            secure_key: c.secure_key.map(bytes::Bytes::from),
        });
        let response = self.session.looked_up(known, &mut self.rng)?;
        if matches!(response, Response::Reconnected { .. }) {
            self.bind_client(client_id);
            info!(name = ?name, "reconnected; session key sent");
            let storage = self.shared.storage.clone();
            tokio::task::spawn_blocking(move || {
                if let Err(e) = storage.meta().touch(client_id, SystemTime::now()) {
                    warn!(cause = %e, "could not update last seen");
                }
            });
        } else {
            info!(%client_id, name = ?name, "reconnect refused: unknown id, other name or no public key");
        }
        self.reply(&response).await
    }
}
