//! A small in-memory server built on `protocol::ServerCodec` and
//! `protocol::session::server::ServerSession`, with quirks of deployed legacy
//! servers that can be switched on, and a log of what it received.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use protocol::message::PublicKeyField;
use protocol::restore::FoundVersion;
use protocol::retrieval::{ListEntry, RetrievalResponse};
use protocol::session::server::{
    Action, DeleteOutcome, KnownClient, RegisterOutcome, RestoreStart, ServerConfig, ServerSession,
};
use protocol::wire::RequestKind;
use protocol::{
    Cksum, ClientId, CodecError, FileName, Numbering, Request, RequestFrame, Response, ServerCodec,
    UserName,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::{Decoder, Framed};

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
    /// Answer retrieval requests from this store; without one, answer them
    /// (and the proof of key that comes first, 1250) with 1607 like a
    /// legacy server.
    pub retrieval: Option<Stored>,
    /// Close the connection on a retrieval request or a proof (another
    /// legacy habit).
    pub close_on_retrieval: bool,
    /// Answer every proof of key with 1651 and close, as a server does that
    /// finds the proof wrong.
    pub refuse_proof: bool,
    /// Know only this request numbering: a request of the other is
    /// answered 1607, as a server answers a code it does not know.
    pub numbering_only: Option<Numbering>,
    /// Answer "CRC ok" with a 1604 whose header declares this payload size
    /// while carrying only the 16-byte id (one deployed server declares
    /// 255), with the id's first byte flipped when `ack_wrong_id`.
    pub ack_declares: Option<u32>,
    pub ack_wrong_id: bool,
    /// Read each request with one `read()` after this pause, as a server
    /// that calls `recv()` once per request: a request split by TCP is
    /// refused (the connection closes), and bytes that arrived after the
    /// request in the same read are lost.
    pub one_recv_per_request: Option<std::time::Duration>,
}

/// What the fake holds for retrieval (shared by every client).
#[derive(Debug, Clone)]
pub struct Stored {
    pub versions: Vec<StoredVersion>,
    /// Entries per list page (at most 256).
    pub page_size: usize,
    /// Ciphertext bytes per 1642 packet.
    pub packet: usize,
    /// Announce a cksum that differs from the content's.
    pub wrong_cksum: bool,
    /// Refuse deletes (1645).
    pub append_only: bool,
    /// Flip a bit in the last ciphertext block (bad padding or content).
    pub corrupt_last_block: bool,
    /// Send the 1641 and the first 1642 of a restore, then close.
    pub cut_restore: bool,
    /// Answer every list request with the cursor it carried (never ends).
    pub stuck_cursor: bool,
}

impl Default for Stored {
    fn default() -> Self {
        Self {
            versions: Vec::new(),
            page_size: 256,
            packet: 64 * 1024,
            wrong_cksum: false,
            append_only: false,
            corrupt_last_block: false,
            cut_restore: false,
            stuck_cursor: false,
        }
    }
}

/// One stored version.
#[derive(Debug, Clone)]
pub struct StoredVersion {
    pub name: String,
    pub version: u64,
    pub stored_at: u64,
    pub content: Vec<u8>,
}

impl Stored {
    /// Adds a version of `name`, numbered after every other.
    pub fn add(&mut self, name: &str, content: Vec<u8>) -> &mut Self {
        let version = self.versions.iter().map(|v| v.version).max().unwrap_or(0) + 1;
        self.versions.push(StoredVersion {
            name: name.to_owned(),
            version,
            stored_at: 1_700_000_000 + version,
            content,
        });
        self
    }
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
    /// Bytes a one-`recv()` server read past a request and so lost.
    pub lost_bytes: usize,
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

/// How the fake reads requests: framed, as the protocol wants, or with one
/// read per request.
enum Transport {
    Framed(Framed<TcpStream, ServerCodec>),
    OneRecv {
        stream: TcpStream,
        pause: std::time::Duration,
        state: Arc<Mutex<State>>,
    },
}

impl Transport {
    async fn next(&mut self) -> Option<Result<RequestFrame, CodecError>> {
        match self {
            Transport::Framed(framed) => framed.next().await,
            Transport::OneRecv {
                stream,
                pause,
                state,
            } => {
                tokio::time::sleep(*pause).await;
                let mut buf = vec![0u8; 4 << 20];
                let n = match stream.read(&mut buf).await {
                    Ok(0) => return None,
                    Ok(n) => n,
                    Err(e) => return Some(Err(e.into())),
                };
                let mut got = bytes::BytesMut::from(&buf[..n]);
                match ServerCodec::default().decode(&mut got) {
                    Ok(Some(frame)) => {
                        state.lock().unwrap().lost_bytes += got.len();
                        Some(Ok(frame))
                    }
                    // "unpack requires a buffer": the rest came in a later read.
                    Ok(None) => None,
                    Err(e) => Some(Err(e)),
                }
            }
        }
    }

    async fn send(&mut self, response: Response) -> Result<(), CodecError> {
        match self {
            Transport::Framed(framed) => framed.send(response).await,
            Transport::OneRecv { stream, .. } => {
                let mut out = bytes::BytesMut::new();
                tokio_util::codec::Encoder::encode(
                    &mut ServerCodec::default(),
                    response,
                    &mut out,
                )?;
                stream.write_all(&out).await?;
                Ok(())
            }
        }
    }

    async fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Transport::Framed(framed) => framed.get_mut().write_all(bytes).await,
            Transport::OneRecv { stream, .. } => stream.write_all(bytes).await,
        }
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
    let (silent, page, packet) = {
        let s = state.lock().unwrap();
        let stored = s.quirks.retrieval.as_ref();
        (
            s.quirks.silent_after_crc_retry,
            stored.map(|r| r.page_size),
            stored.map(|r| r.packet),
        )
    };
    let defaults = ServerConfig::default();
    let config = ServerConfig {
        reply_to_crc_retry: !silent,
        list_page: page.unwrap_or(defaults.list_page),
        restore_packet: packet.unwrap_or(defaults.restore_packet),
        ..defaults
    };
    let mut session = ServerSession::new(config);
    let one_recv = state.lock().unwrap().quirks.one_recv_per_request;
    let mut framed = match one_recv {
        Some(pause) => Transport::OneRecv {
            stream,
            pause,
            state: state.clone(),
        },
        None => Transport::Framed(Framed::new(stream, ServerCodec::default())),
    };
    let mut rng = rand::rngs::OsRng;
    let mut upload: Vec<u8> = Vec::new();
    while let Ok(Some(Ok(frame))) = tokio::time::timeout(super::STEP, framed.next()).await {
        let kind = frame.request.kind();
        let inject = {
            let mut s = state.lock().unwrap();
            s.codes.push(frame.header().code.0);
            let only = s.quirks.numbering_only;
            if let Request::SendFile(p) = &frame.request {
                s.packet_lens.push(p.content.len());
            }
            only.is_some_and(|n| n != frame.numbering)
                || s.quirks
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
        if kind == RequestKind::Prove {
            let (close, stored, refuse) = {
                let s = state.lock().unwrap();
                let q = &s.quirks;
                (q.close_on_retrieval, q.retrieval.is_some(), q.refuse_proof)
            };
            if close {
                return;
            }
            let answer = match (stored, refuse) {
                // A legacy server knows no 1250.
                (false, _) => Some(Response::GeneralError),
                (true, true) => Some(Response::NotAuthenticated),
                (true, false) => None,
            };
            if let Some(answer) = answer {
                let _ = framed.send(answer).await;
                return;
            }
        }
        let action = match session.handle(frame, &mut rng) {
            Ok(a) => a,
            Err(e) => {
                let _ = framed.send(e.answer()).await;
                return;
            }
        };
        let reply = match action {
            Action::Reply(r) => Some(r),
            Action::List { .. } | Action::FindVersion { .. } | Action::Delete { .. } => {
                let (close, stored) = {
                    let s = state.lock().unwrap();
                    (s.quirks.close_on_retrieval, s.quirks.retrieval.is_some())
                };
                if close {
                    return;
                }
                if !stored {
                    // A legacy server knows no retrieval codes (and goes on).
                    Some(session.storage_failed())
                } else {
                    for r in retrieve(&state, &mut session, &mut rng, action) {
                        // A 1607 after restore data marks a cut: hang up.
                        if r == Response::GeneralError {
                            return;
                        }
                        if framed.send(r).await.is_err() {
                            return;
                        }
                    }
                    None
                }
            }
            Action::Register {
                client_id, name, ..
            } => {
                let outcome = {
                    let mut s = state.lock().unwrap();
                    if s.clients.values().any(|(n, _)| *n == name) {
                        RegisterOutcome::NameTaken
                    } else {
                        s.clients.insert(client_id, (name, None));
                        RegisterOutcome::Created
                    }
                };
                session.registered(outcome, &mut rng).ok()
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
                        secure_key: None,
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
                let (declares, wrong_id) = {
                    let mut s = state.lock().unwrap();
                    s.files.insert((client_id, file.to_string()), content);
                    (s.quirks.ack_declares, s.quirks.ack_wrong_id)
                };
                match declares {
                    Some(declared) => {
                        // Version, code 1604, the declared size, then the id.
                        let mut raw = vec![3u8, 0x44, 0x06];
                        raw.extend_from_slice(&declared.to_le_bytes());
                        raw.extend_from_slice(&client_id.0);
                        if wrong_id {
                            raw[7] ^= 0xff;
                        }
                        if framed.send_raw(&raw).await.is_err() {
                            return;
                        }
                        None
                    }
                    None => Some(reply),
                }
            }
            Action::Discard { reply } => {
                upload.clear();
                reply
            }
            // This fake server predates the repository extension.
            Action::Repo(_) => Some(Response::GeneralError),
        };
        if let Some(r) = reply {
            if framed.send(r).await.is_err() {
                return;
            }
        }
    }
}

/// The answers to one retrieval action: storage is the fake's, the rules
/// (paging, the restore header and packets, the delete answers) are the
/// session's; quirks bend the answers afterwards.
fn retrieve(
    state: &Arc<Mutex<State>>,
    session: &mut ServerSession,
    rng: &mut rand::rngs::OsRng,
    action: Action,
) -> Vec<Response> {
    let mut s = state.lock().unwrap();
    let Some(stored) = s.quirks.retrieval.as_mut() else {
        return vec![Response::GeneralError];
    };
    match action {
        Action::List {
            all_versions,
            skip,
            limit,
            ..
        } => {
            let mut all = stored.versions.clone();
            all.sort_by(|a, b| (a.name.as_bytes(), a.version).cmp(&(b.name.as_bytes(), b.version)));
            if !all_versions {
                let mut latest: Vec<StoredVersion> = Vec::new();
                for v in all {
                    match latest.last_mut() {
                        Some(last) if last.name == v.name => *last = v,
                        _ => latest.push(v),
                    }
                }
                all = latest;
            }
            let entries = all
                .iter()
                .skip(usize::try_from(skip).unwrap())
                .take(limit)
                .map(|v| ListEntry {
                    version: v.version,
                    size: v.content.len() as u64,
                    stored_at: v.stored_at,
                    cksum: Cksum::of(&v.content),
                    file: FileName::try_from(v.name.as_str()).unwrap(),
                })
                .collect();
            let mut page = session.listed(entries).unwrap();
            if let Response::Retrieval(RetrievalResponse::ListPage { next_cursor, .. }) = &mut page
            {
                if stored.stuck_cursor {
                    *next_cursor = skip.max(1);
                }
            }
            vec![page]
        }
        Action::FindVersion { file, version, .. } => {
            let found = stored
                .versions
                .iter()
                .filter(|v| v.name.as_bytes() == file.as_bytes())
                .filter(|v| version == 0 || v.version == version)
                .max_by_key(|v| v.version)
                .cloned();
            let announced = found.as_ref().map(|v| FoundVersion {
                version: v.version,
                size: v.content.len() as u64,
                cksum: Cksum::of(&v.content) ^ u32::from(stored.wrong_cksum),
                file,
            });
            let mut sender = match session.found_version(announced, rng).unwrap() {
                RestoreStart::Answer(answer) => return vec![answer],
                RestoreStart::Send(sender) => sender,
            };
            let content = found.map(|v| v.content).unwrap_or_default();
            let mut out = vec![sender.begin()];
            out.extend(sender.plaintext(&content).unwrap());
            out.extend(sender.finish().unwrap());
            if stored.corrupt_last_block {
                if let Some(Response::Retrieval(RetrievalResponse::RestoreData { content })) =
                    out.last_mut()
                {
                    let mut flipped = content.to_vec();
                    if let Some(last) = flipped.last_mut() {
                        *last ^= 0x40;
                    }
                    *content = Bytes::from(flipped);
                }
            }
            if stored.cut_restore {
                out.truncate(2);
                // The shell closes the connection after these.
                out.push(Response::GeneralError);
            }
            out
        }
        Action::Delete { file, .. } => {
            let outcome = if stored.append_only {
                DeleteOutcome::Refused
            } else {
                let before = stored.versions.len();
                stored
                    .versions
                    .retain(|v| v.name.as_bytes() != file.as_bytes());
                match (before - stored.versions.len()) as u32 {
                    0 => DeleteOutcome::NotFound,
                    n => DeleteOutcome::Deleted(n),
                }
            };
            vec![session.deleted(outcome).unwrap()]
        }
        _ => Vec::new(),
    }
}
