//! Public key (1026): store the client's key, then send the session key
//! wrapped for it (`docs/PROTOCOL.md` §6.2).

use std::time::SystemTime;

use protocol::message::PublicKeyField;
use protocol::{ClientId, Response};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{error, info};

use crate::connection::{Connection, Ended};

impl<R, W> Connection<R, W>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    /// Stores the key of [`protocol::session::server::Action::StoreKey`]
    /// and sends what the session answers (1602, or 1607 when storage
    /// failed).
    pub(in crate::connection) async fn store_key(
        &mut self,
        client_id: ClientId,
        key: PublicKeyField,
    ) -> Result<(), Ended> {
        let stored = match self
            .blocking(move |s| s.meta().set_public_key(client_id, &key, SystemTime::now()))
            .await
        {
            Ok(true) => true,
            Ok(false) => {
                error!("client is not in the metadata; public key not stored");
                false
            }
            Err(e) => {
                error!(cause = %e, "storing the public key failed");
                false
            }
        };
        let response = self.session.key_stored(stored, &mut self.rng)?;
        if matches!(response, Response::KeyAccepted { .. }) {
            info!("public key stored; session key sent");
        }
        self.reply(&response).await
    }
}
