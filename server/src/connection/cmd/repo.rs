//! The repository extension (`docs/PROTOCOL.md` §13), requests 1260-1268.

use protocol::session::server::RepoAction;
use protocol::Response;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::info;

use crate::connection::{Connection, Ended};

impl<R, W> Connection<R, W>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    /// Carries out a repository action. Not served yet: answered 1607.
    pub(in crate::connection) async fn repo(&mut self, action: RepoAction) -> Result<(), Ended> {
        info!(
            ?action,
            "repository request refused: not served by this server"
        );
        let answer = self.session.storage_failed();
        self.reply(&answer).await?;
        let _: Response = answer;
        Ok(())
    }
}
