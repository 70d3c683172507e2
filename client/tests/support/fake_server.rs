//! A small in-memory server built on `protocol::ServerCodec` and
//! `protocol::session::server::ServerSession`, with quirks of deployed legacy
//! servers that can be switched on, and a log of what it received.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use futures::{SinkExt, StreamExt};
use protocol::message::PublicKeyField;
use protocol::session::server::{
    Action, KnownClient, RegisterOutcome, ServerConfig, ServerSession,
};
use protocol::wire::RequestKind;
use protocol::{ClientId, Request, Response, ServerCodec, UserName};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::Framed;

/// Behaviours of deployed servers to imitate.
#[derive(Debug, Clone, Default)]
pub struct Quirks {
    /// Answer "CRC wrong, will resend" with 1604 (most servers) or not at all.
    pub silent_after_crc_retry: bool,
    /// Answer 1607 to this many requests of each kind before handling one.
    pub general_errors: HashMap<RequestKind, u32>,
    /// Answer 1607 instead of 1603 to this many complete uploads.
    pub failed_uploads: u32,
    /// Send 1606 with an empty payload.
    pub reject_without_id: bool,
}

/// What the server holds and saw.
#[derive(Debug, Default)]
pub struct State {
    pub clients: HashMap<ClientId, (UserName, Option<PublicKeyField>)>,
    /// Committed files by client and name.
    pub files: HashMap<(ClientId, String), Vec<u8>>,
    /// Every request code received, in order.
    pub codes: Vec<u16>,
    /// Content length of every file packet received.
    pub packet_lens: Vec<usize>,
    pub connections: u32,
    pub quirks: Quirks,
}

/// A running fake server.
pub struct FakeServer {
    pub addr: SocketAddr,
    pub state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeServer {
    /// Starts on 127.0.0.1 with an ephemeral port.
    pub async fn start(quirks: Quirks) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State {
            quirks,
            ..State::default()
        }));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                shared.lock().unwrap().connections += 1;
                tokio::spawn(serve(stream, shared.clone()));
            }
        });
        Self { addr, state, task }
    }

    /// `HOST:PORT` for the client.
    pub fn server(&self) -> String {
        self.addr.to_string()
    }

    /// Records a client as if it had registered and sent its key.
    pub fn preregister(&self, id: ClientId, name: UserName, key: PublicKeyField) {
        self.state
            .lock()
            .unwrap()
            .clients
            .insert(id, (name, Some(key)));
    }

    /// A committed file.
    pub fn file(&self, id: ClientId, name: &str) -> Option<Vec<u8>> {
        self.state
            .lock()
            .unwrap()
            .files
            .get(&(id, name.to_owned()))
            .cloned()
    }

    /// The request codes received so far.
    pub fn codes(&self) -> Vec<u16> {
        self.state.lock().unwrap().codes.clone()
    }
}

fn take_quirk(counter: &mut u32) -> bool {
    if *counter > 0 {
        *counter -= 1;
        true
    } else {
        false
    }
}

async fn serve(stream: TcpStream, state: Arc<Mutex<State>>) {
    let silent = state.lock().unwrap().quirks.silent_after_crc_retry;
    let config = ServerConfig {
        reply_to_crc_retry: !silent,
        ..ServerConfig::default()
    };
    let mut session = ServerSession::new(config);
    let mut framed = Framed::new(stream, ServerCodec::default());
    let mut rng = rand::rngs::OsRng;
    let mut upload: Vec<u8> = Vec::new();
    while let Ok(Some(Ok(frame))) = tokio::time::timeout(super::STEP, framed.next()).await {
        let kind = frame.request.kind();
        let inject = {
            let mut s = state.lock().unwrap();
            s.codes.push(frame.header().code.0);
            if let Request::SendFile(p) = &frame.request {
                s.packet_lens.push(p.content.len());
            }
            s.quirks
                .general_errors
                .get_mut(&kind)
                .is_some_and(take_quirk)
        };
        if inject {
            if framed.send(Response::GeneralError).await.is_err() {
                return;
            }
            continue;
        }
        let action = match session.handle(frame, &mut rng) {
            Ok(a) => a,
            Err(_) => {
                let _ = framed.send(Response::GeneralError).await;
                return;
            }
        };
        let reply = match action {
            Action::Reply(r) => Some(r),
            // A legacy server knows no retrieval codes.
            Action::Retrieve { .. } => Some(Response::GeneralError),
            Action::Register { client_id, name } => {
                let outcome = {
                    let mut s = state.lock().unwrap();
                    if s.clients.values().any(|(n, _)| *n == name) {
                        RegisterOutcome::NameTaken
                    } else {
                        s.clients.insert(client_id, (name, None));
                        RegisterOutcome::Created
                    }
                };
                session.registered(outcome).ok()
            }
            Action::StoreKey { client_id, key, .. } => {
                if let Some(c) = state.lock().unwrap().clients.get_mut(&client_id) {
                    c.1 = Some(key);
                }
                session.key_stored(true, &mut rng).ok()
            }
            Action::LookupClient { client_id, .. } => {
                let found = state
                    .lock()
                    .unwrap()
                    .clients
                    .get(&client_id)
                    .map(|(name, key)| KnownClient {
                        name: name.clone(),
                        public_key: key.clone(),
                    });
                let reply = session.looked_up(found, &mut rng).ok();
                let without_id = state.lock().unwrap().quirks.reject_without_id;
                match reply {
                    Some(Response::ReconnectRejected { .. }) if without_id => {
                        Some(Response::ReconnectRejected { client_id: None })
                    }
                    other => other,
                }
            }
            Action::Write {
                start,
                plaintext,
                done,
            } => {
                if start.is_some() {
                    upload.clear();
                }
                upload.extend_from_slice(&plaintext);
                match done {
                    Some(done) => {
                        let fail = take_quirk(&mut state.lock().unwrap().quirks.failed_uploads);
                        if fail {
                            upload.clear();
                            Some(session.storage_failed())
                        } else {
                            Some(done)
                        }
                    }
                    None => None,
                }
            }
            Action::Commit {
                client_id,
                file,
                reply,
                ..
            } => {
                let content = std::mem::take(&mut upload);
                state
                    .lock()
                    .unwrap()
                    .files
                    .insert((client_id, file.to_string()), content);
                Some(reply)
            }
            Action::Discard { reply } => {
                upload.clear();
                reply
            }
        };
        if let Some(r) = reply {
            if framed.send(r).await.is_err() {
                return;
            }
        }
    }
}
