//! Prove (1250): the session checked the proof; the shell records the
//! completed registration before the 1650 goes out (`docs/PROTOCOL.md`
//! §11.5, §12.3).

use std::time::SystemTime;

use protocol::{ClientId, Response};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{error, info};

use crate::connection::{Connection, Ended};

impl<R, W> Connection<R, W>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    /// Sends `response`, the session's answer to a proof (1650), after
    /// recording the completion.
    pub(in crate::connection) async fn proved(
        &mut self,
        client_id: ClientId,
        response: Response,
    ) -> Result<(), Ended> {
        self.bind_client(client_id);
        self.record_completion(client_id).await?;
        if self.session.read_only() {
            info!("client logged in with its passphrase: it may only read");
        } else {
            info!("client proved its key");
        }
        self.reply(&response).await
    }

    /// Records that `client_id` completed its registration by proving its
    /// key, before the 1650 goes out: from then on its name is never
    /// registrable again (§12.3). A storage failure, or a registration
    /// replaced meanwhile (the grace period ran out while the client was
    /// connected), is answered 1607 and ends the connection.
    async fn record_completion(&mut self, client_id: ClientId) -> Result<(), Ended> {
        match self
            .blocking(move |s| s.meta().complete(client_id, SystemTime::now()))
            .await
        {
            Ok(true) => Ok(()),
            Ok(false) => Err(Ended::Replaced),
            Err(e) => {
                error!(cause = %e, "recording the completed registration failed");
                self.reply(&Response::GeneralError).await?;
                Err(Ended::Storage(e))
            }
        }
    }
}
