//! A `ClientSession` and a `ServerSession` wired together in memory, as
//! quinn-proto's tests pair its endpoints: every request and response is
//! encoded with the codecs, the byte stream is cut at proptest-chosen points
//! and decoded on the other side. The test plays both shells, with a
//! `HashMap` for the server's storage; no sockets, no runtime.
//!
//! One run: register (after an injected registration failure), upload
//! (a corrupted packet and a resend, an injected storage failure, a file
//! given up after the last attempt, a file the quota refuses at its commit), reconnect on a new connection, the
//! proof before retrieval (`docs/PROTOCOL.md` §11.5), a list of several
//! pages, restore of every file, and delete.

use std::collections::HashMap;
use std::sync::OnceLock;

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use protocol::crypto::{self, CbcDecryptor, PrivateKey};
use protocol::message::PublicKeyField;
use protocol::restore::FoundVersion;
use protocol::retrieval::{ListEntry, ListFlags};
use protocol::secure::{SECURE_RSA_BITS, SECURE_RSA_EXPONENT};
use protocol::session::client::{ClientEvent, ClientSession, ServerErrorStep, Verdict};
use protocol::session::server::{
    Action, DeleteOutcome, KnownClient, RegisterOutcome, RestoreStart, ServerConfig, ServerSession,
};
use protocol::session::MAX_SEND_ATTEMPTS;
use protocol::upload::{Packetizer, UploadPlan};
use protocol::{
    Cksum, ClientCodec, ClientId, Dialect, FileName, Limits, Numbering, RequestFrame, Response,
    ServerCodec, UserName,
};
use rand::rngs::StdRng;
use rand::SeedableRng;
use tokio_util::codec::{Decoder, Encoder};

/// Failure seeds, replayed first (see `proptest-regressions/README.md`).
const REGRESSIONS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../proptest-regressions/pair.txt"
);

/// Entries per list page, small so that a few files take several pages.
const PAGE: usize = 2;

/// The client's key for `dialect`, made once (a secure-mode key is large).
fn client_key(dialect: Dialect) -> PrivateKey {
    static LEGACY: OnceLock<PrivateKey> = OnceLock::new();
    static SECURE: OnceLock<PrivateKey> = OnceLock::new();
    let mut rng = StdRng::seed_from_u64(7);
    match dialect {
        Dialect::Legacy => LEGACY.get_or_init(|| PrivateKey::generate_legacy(&mut rng).unwrap()),
        Dialect::Secure => SECURE.get_or_init(|| {
            PrivateKey::generate(&mut rng, SECURE_RSA_BITS, SECURE_RSA_EXPONENT).unwrap()
        }),
    }
    .clone()
}

/// The TLS channel binding of the fake secure connection: any 32 bytes
/// that both sides agree on.
const BINDING: [u8; 32] = [0x5b; 32];

/// A client session for `dialect`.
fn client(dialect: Dialect, name: &UserName, id: Option<ClientId>) -> ClientSession {
    let key = client_key(dialect);
    match dialect {
        Dialect::Legacy => ClientSession::new(name.clone(), key, id, Numbering::Modern),
        Dialect::Secure => ClientSession::secure(name.clone(), key, id, BINDING),
    }
}

/// The server's storage.
#[derive(Default)]
struct Store {
    /// Name, legacy key field, secure-mode key (DER).
    clients: HashMap<ClientId, (UserName, Option<PublicKeyField>, Option<Bytes>)>,
    /// Versions by client and name, oldest first.
    files: HashMap<(ClientId, FileName), Vec<Vec<u8>>>,
    /// The upload being received.
    upload: Vec<u8>,
}

/// Failures the server's shell reports instead of success, once each.
#[derive(Debug, Clone, Default)]
struct Faults {
    register: bool,
    write: bool,
    /// The client's quota refuses the next commit.
    quota: bool,
}

/// Two sessions and the wire between them.
struct Pair {
    client: ClientSession,
    server: ServerSession,
    client_codec: ClientCodec,
    server_codec: ServerCodec,
    /// Bytes in flight towards each side, not yet decoded.
    to_server: BytesMut,
    to_client: BytesMut,
    /// Sizes of the pieces the byte streams are cut into, used in turn.
    splits: Vec<usize>,
    next_split: usize,
    rng: StdRng,
    /// Answers the client reads later (the 1604 to "will resend").
    held: Vec<Response>,
}

impl Pair {
    fn connect(client: ClientSession, splits: &[usize], seed: u64) -> Self {
        let dialect = client.dialect();
        let limits = Limits::default();
        let config = ServerConfig {
            list_page: PAGE,
            restore_packet: 64,
            ..ServerConfig::default()
        };
        Self {
            client,
            server: match dialect {
                Dialect::Legacy => ServerSession::new(config),
                Dialect::Secure => ServerSession::secure(config, BINDING),
            },
            client_codec: ClientCodec::with_dialect(limits, dialect),
            server_codec: ServerCodec::with_dialect(limits, dialect),
            to_server: BytesMut::new(),
            to_client: BytesMut::new(),
            splits: splits.to_vec(),
            next_split: 0,
            rng: StdRng::seed_from_u64(seed),
            held: Vec::new(),
        }
    }

    fn split(&mut self) -> usize {
        let n = self.splits[self.next_split % self.splits.len()];
        self.next_split += 1;
        n
    }

    /// Moves `encoded` into `decoder`'s buffer in pieces, decoding after
    /// each; a piece never yields a frame before its last byte arrived.
    fn carry<D: Decoder>(
        &mut self,
        encoded: BytesMut,
        to_client: bool,
        decoder: impl Fn(&mut Self) -> &mut D,
    ) -> Vec<D::Item>
    where
        D::Error: std::fmt::Debug,
    {
        let mut out = Vec::new();
        let mut rest = encoded;
        while !rest.is_empty() {
            let n = self.split().min(rest.len());
            let piece = rest.split_to(n);
            let mut buf = if to_client {
                std::mem::take(&mut self.to_client)
            } else {
                std::mem::take(&mut self.to_server)
            };
            buf.extend_from_slice(&piece);
            while let Some(item) = decoder(self).decode(&mut buf).expect("a valid stream") {
                out.push(item);
            }
            if to_client {
                self.to_client = buf;
            } else {
                self.to_server = buf;
            }
        }
        out
    }

    /// Sends `frame` to the server, lets it act as the shell says, and
    /// returns the client's events for the answers.
    fn send(
        &mut self,
        frame: RequestFrame,
        store: &mut Store,
        faults: &mut Faults,
    ) -> Vec<ClientEvent> {
        let responses = self.send_raw(frame, store, faults);
        self.deliver(responses)
    }

    /// Sends `frame` and returns the answers as the client decoded them,
    /// not yet handed to its session.
    fn send_raw(
        &mut self,
        frame: RequestFrame,
        store: &mut Store,
        faults: &mut Faults,
    ) -> Vec<Response> {
        let mut wire = BytesMut::new();
        self.client_codec.encode(frame, &mut wire).unwrap();
        let frames = self.carry(wire, false, |p| &mut p.server_codec);
        let mut answers = Vec::new();
        for frame in frames {
            let action = self
                .server
                .handle(frame, &mut self.rng)
                .expect("a request the session allows");
            answers.extend(self.act(action, store, faults));
        }
        let mut wire = BytesMut::new();
        for answer in answers {
            self.server_codec.encode(answer, &mut wire).unwrap();
        }
        self.carry(wire, true, |p| &mut p.client_codec)
    }

    /// Hands decoded answers to the client session.
    fn deliver(&mut self, responses: Vec<Response>) -> Vec<ClientEvent> {
        responses
            .into_iter()
            .map(|r| {
                let code = r.code();
                self.client
                    .handle(r, &mut self.rng)
                    .unwrap_or_else(|e| panic!("the client refused {code}: {e}"))
            })
            .collect()
    }

    /// The server's shell: carries out `action` against `store`.
    fn act(&mut self, action: Action, store: &mut Store, faults: &mut Faults) -> Vec<Response> {
        let s = &mut self.server;
        let rng = &mut self.rng;
        match action {
            Action::Reply(r) => vec![r],
            Action::Repo(action) => panic!("the pair speaks no repository request: {action:?}"),
            Action::Register {
                client_id,
                name,
                secure_key,
            } => {
                let outcome = if std::mem::take(&mut faults.register) {
                    RegisterOutcome::Failed
                } else if store.clients.values().any(|(n, _, _)| *n == name) {
                    RegisterOutcome::NameTaken
                } else {
                    store.clients.insert(client_id, (name, None, secure_key));
                    RegisterOutcome::Created
                };
                vec![s.registered(outcome, rng).unwrap()]
            }
            Action::StoreKey { client_id, key, .. } => {
                let stored = match store.clients.get_mut(&client_id) {
                    Some(c) => {
                        c.1 = Some(key);
                        true
                    }
                    None => false,
                };
                vec![s.key_stored(stored, rng).unwrap()]
            }
            Action::LookupClient { client_id, .. } => {
                let found = store
                    .clients
                    .get(&client_id)
                    .map(|(name, key, secure_key)| KnownClient {
                        name: name.clone(),
                        public_key: key.clone(),
                        secure_key: secure_key.clone(),
                    });
                vec![s.looked_up(found, rng).unwrap()]
            }
            Action::Write {
                start,
                plaintext,
                done,
            } => {
                if start.is_some() {
                    store.upload.clear();
                }
                store.upload.extend_from_slice(&plaintext);
                match done {
                    Some(_) if std::mem::take(&mut faults.write) => {
                        store.upload.clear();
                        vec![s.storage_failed()]
                    }
                    Some(done) => vec![done],
                    None => Vec::new(),
                }
            }
            Action::Commit {
                client_id,
                file,
                size,
                cksum,
                reply,
            } => {
                let content = std::mem::take(&mut store.upload);
                assert_eq!((content.len() as u64, Cksum::of(&content)), (size, cksum));
                if std::mem::take(&mut faults.quota) {
                    return vec![s.quota_refused(QUOTA_STORED, QUOTA, size)];
                }
                store
                    .files
                    .entry((client_id, file))
                    .or_default()
                    .push(content);
                vec![reply]
            }
            Action::Discard { reply } => {
                store.upload.clear();
                reply.into_iter().collect()
            }
            Action::List {
                client_id,
                all_versions,
                skip,
                limit,
            } => {
                let entries = listing(store, client_id, all_versions)
                    .into_iter()
                    .skip(usize::try_from(skip).unwrap())
                    .take(limit)
                    .collect();
                vec![s.listed(entries).unwrap()]
            }
            Action::FindVersion {
                client_id,
                file,
                version,
            } => {
                let versions = store.files.get(&(client_id, file.clone()));
                let index = match version {
                    0 => versions.map(|v| v.len()),
                    n => Some(usize::try_from(n).unwrap()),
                };
                let content = versions
                    .zip(index)
                    .and_then(|(v, i)| v.get(i.checked_sub(1)?))
                    .cloned();
                let found = content.as_ref().map(|c| FoundVersion {
                    version: index.unwrap() as u64,
                    size: c.len() as u64,
                    cksum: Cksum::of(c),
                    file,
                });
                match s.found_version(found, rng).unwrap() {
                    RestoreStart::Answer(answer) => vec![answer],
                    RestoreStart::Send(mut sender) => {
                        let content = content.unwrap();
                        let mut out = vec![sender.begin()];
                        for chunk in content.chunks(37) {
                            out.extend(sender.plaintext(chunk).unwrap());
                        }
                        out.extend(sender.finish().unwrap());
                        out
                    }
                }
            }
            Action::Delete { client_id, file } => {
                let outcome = match store.files.remove(&(client_id, file)) {
                    Some(v) => DeleteOutcome::Deleted(v.len() as u32),
                    None => DeleteOutcome::NotFound,
                };
                vec![s.deleted(outcome).unwrap()]
            }
        }
    }

    fn only(events: Vec<ClientEvent>) -> ClientEvent {
        assert_eq!(events.len(), 1, "{events:?}");
        events.into_iter().next().unwrap()
    }

    /// One attempt at `plain`; `corrupt` flips a bit of the first packet's
    /// ciphertext on its way. Returns the verdict and its reply.
    fn attempt(
        &mut self,
        plan: &UploadPlan,
        plain: &[u8],
        corrupt: bool,
        store: &mut Store,
        faults: &mut Faults,
    ) -> ClientEvent {
        let id = self.client.client_id().unwrap();
        let key = self.client.aes_key().unwrap().clone();
        let mut packets = Packetizer::new(plan.clone(), id, Numbering::Modern);
        packets
            .buffer()
            .extend_from_slice(&crypto::encrypt_all(&key, plain));
        let mut frames: Vec<RequestFrame> = std::iter::from_fn(|| packets.next_full()).collect();
        frames.extend(packets.last());
        // (An empty file's only block is padding: flipping a bit there
        // leaves no plaintext, whose cksum matches; the server then refuses
        // the "CRC ok", a case the session's own tests cover.)
        if corrupt && !plain.is_empty() {
            if let protocol::Request::SendFile(p) = &mut frames[0].request {
                let mut content = p.content.to_vec();
                content[0] ^= 1;
                p.content = content.into();
            }
        }
        self.client.file_sent(plan, Cksum::of(plain));
        // The 1604 to an earlier "will resend" is read once the resend is out.
        let held = std::mem::take(&mut self.held);
        let mut events = self.deliver(held);
        for frame in frames {
            events.extend(self.send(frame, store, faults));
        }
        let last = events.pop().expect("an answer to the last packet");
        assert!(
            events
                .iter()
                .all(|e| matches!(e, ClientEvent::RetryAcknowledged)),
            "{events:?}"
        );
        last
    }

    /// Uploads `plain` as `name`, the first `corrupted` attempts with a
    /// corrupted packet. Returns whether the file was committed.
    fn upload(
        &mut self,
        name: &str,
        plain: &[u8],
        corrupted: u8,
        store: &mut Store,
        faults: &mut Faults,
    ) -> bool {
        let file = FileName::try_from(name).unwrap();
        let plan = UploadPlan::new(file, plain.len() as u64, 64, 64 * 1024).unwrap();
        self.client.begin_file();
        let mut tries = 0u8;
        loop {
            let event = self.attempt(&plan, plain, tries < corrupted, store, faults);
            let (verdict, reply) = match event {
                // A storage failure does not count as an attempt: repeat it.
                ClientEvent::ServerError(ServerErrorStep::Resend { .. }) => continue,
                ClientEvent::Verdict { verdict, reply } => (verdict, reply),
                other => panic!("no verdict: {other:?}"),
            };
            tries += 1;
            if let Verdict::Retry { attempt } = verdict {
                assert_eq!(attempt, tries);
                self.held = self.send_raw(reply, store, faults);
                continue;
            }
            let answer = self.send(reply, store, faults);
            match verdict {
                Verdict::Match => {
                    assert!(matches!(Self::only(answer), ClientEvent::Done));
                    return true;
                }
                Verdict::Retry { .. } => unreachable!("handled above"),
                Verdict::GiveUp => {
                    assert_eq!(tries, MAX_SEND_ATTEMPTS);
                    assert!(matches!(Self::only(answer), ClientEvent::Done));
                    return false;
                }
            }
        }
    }

    /// Uploads `plain` as `name` while the client's quota refuses its
    /// commit: secure mode hears 1682 with the figures, the legacy
    /// listener 1607; nothing is stored, and the connection goes on.
    fn upload_refused(&mut self, name: &str, plain: &[u8], store: &mut Store, faults: &mut Faults) {
        let file = FileName::try_from(name).unwrap();
        let plan = UploadPlan::new(file.clone(), plain.len() as u64, 64, 64 * 1024).unwrap();
        self.client.begin_file();
        let ClientEvent::Verdict {
            verdict: Verdict::Match,
            reply,
        } = self.attempt(&plan, plain, false, store, faults)
        else {
            panic!("no match");
        };
        faults.quota = true;
        let answer = Self::only(self.send(reply, store, faults));
        match self.client.dialect() {
            Dialect::Secure => assert!(
                matches!(
                    answer,
                    ClientEvent::QuotaExceeded { stored: QUOTA_STORED, quota: QUOTA, size }
                        if size == plain.len() as u64
                ),
                "{answer:?}"
            ),
            Dialect::Legacy => assert!(
                matches!(
                    answer,
                    ClientEvent::ServerError(ServerErrorStep::Resend { .. })
                ),
                "{answer:?}"
            ),
        }
        let id = self.client.client_id().unwrap();
        assert!(!store.files.contains_key(&(id, file)));
    }
}

/// What the fake quota refusal says the client stores, and its quota.
const QUOTA_STORED: u64 = 1_000;
const QUOTA: u64 = 1_024;

/// The list order: by name, then version; the latest of each name unless
/// `all_versions`.
fn listing(store: &Store, client: ClientId, all_versions: bool) -> Vec<ListEntry> {
    let mut names: Vec<&FileName> = store
        .files
        .keys()
        .filter(|(c, _)| *c == client)
        .map(|(_, f)| f)
        .collect();
    names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    let mut out = Vec::new();
    for name in names {
        let versions = &store.files[&(client, name.clone())];
        let first = if all_versions { 0 } else { versions.len() - 1 };
        for (i, content) in versions.iter().enumerate().skip(first) {
            out.push(ListEntry {
                version: i as u64 + 1,
                size: content.len() as u64,
                stored_at: 0,
                cksum: Cksum::of(content),
                file: name.clone(),
            });
        }
    }
    out
}

/// Answers the client's events until its key is ready: the public key
/// after a legacy registration, the proof in secure mode.
fn until_keyed(pair: &mut Pair, event: ClientEvent, store: &mut Store, faults: &mut Faults) {
    let next = match event {
        ClientEvent::KeyReady => return,
        ClientEvent::Registered(_) => pair.client.public_key_request().unwrap(),
        ClientEvent::Prove { reply } => reply,
        other => panic!("no key exchange: {other:?}"),
    };
    let event = Pair::only(pair.send(next, store, faults));
    until_keyed(pair, event, store, faults);
}

fn run(
    dialect: Dialect,
    sizes: &[usize],
    splits: &[usize],
    corrupted: u8,
    faults: Faults,
    seed: u64,
) {
    let mut store = Store::default();
    let mut faults = faults;
    let name = UserName::try_from("pat").unwrap();

    // Register (a failed registration is answered 1607 and may be repeated).
    let mut pair = Pair::connect(client(dialect, &name, None), splits, seed);
    let event = loop {
        let frame = pair.client.register_request().unwrap();
        match Pair::only(pair.send(frame, &mut store, &mut faults)) {
            ClientEvent::ServerError(ServerErrorStep::Resend { .. }) => continue,
            event => break event,
        }
    };
    until_keyed(&mut pair, event, &mut store, &mut faults);
    let id = pair.client.client_id().unwrap();

    // Upload: one file resent after corrupted attempts, one given up on,
    // then the others.
    let contents: Vec<(String, Vec<u8>)> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| (format!("f{i}"), (0..n).map(|b| (b * 7 + i) as u8).collect()))
        .collect();
    let (first, rest) = contents.split_first().unwrap();
    assert!(pair.upload(&first.0, &first.1, corrupted, &mut store, &mut faults));
    assert!(!pair.upload(
        "lost",
        b"never stored",
        MAX_SEND_ATTEMPTS,
        &mut store,
        &mut faults
    ));
    // One refused by the quota at its commit; the connection goes on.
    pair.upload_refused("over", &first.1, &mut store, &mut faults);
    for (file, plain) in rest {
        assert!(pair.upload(file, plain, 0, &mut store, &mut faults));
    }
    assert!(!store
        .files
        .contains_key(&(id, FileName::try_from("lost").unwrap())));

    // Reconnect on a new connection; on the legacy listener retrieval
    // needs the proof first (secure mode proved the key in the exchange).
    let mut pair = Pair::connect(client(dialect, &name, Some(id)), splits, seed ^ 1);
    let frame = pair.client.reconnect_request();
    let event = Pair::only(pair.send(frame, &mut store, &mut faults));
    until_keyed(&mut pair, event, &mut store, &mut faults);
    if let Some(frame) = pair.client.retrieval_proof_request().unwrap() {
        assert!(matches!(
            Pair::only(pair.send(frame, &mut store, &mut faults)),
            ClientEvent::RetrievalAllowed
        ));
    }

    // List in pages of PAGE.
    let mut listed = Vec::new();
    let mut cursor = 0;
    let mut pages = 0;
    loop {
        let frame = pair.client.list_request(ListFlags::LATEST, cursor);
        let ClientEvent::ListPage {
            next_cursor,
            entries,
        } = Pair::only(pair.send(frame, &mut store, &mut faults))
        else {
            panic!("no list page");
        };
        pages += 1;
        assert!(entries.len() <= PAGE);
        listed.extend(entries.into_iter().map(|e| e.file.to_string()));
        if next_cursor == 0 {
            break;
        }
        assert_eq!(next_cursor, cursor + PAGE as u64);
        cursor = next_cursor;
    }
    let mut names: Vec<String> = contents.iter().map(|(n, _)| n.clone()).collect();
    names.sort();
    assert_eq!(listed, names);
    assert_eq!(pages, names.len().div_ceil(PAGE).max(1));

    // Restore every file under this connection's key.
    let key = pair.client.aes_key().unwrap().clone();
    for (file, plain) in &contents {
        let frame = pair
            .client
            .restore_request(0, FileName::try_from(file.as_str()).unwrap());
        let mut events = pair.send(frame, &mut store, &mut faults).into_iter();
        let Some(ClientEvent::RestoreBegin(begin)) = events.next() else {
            panic!("no 1641");
        };
        assert_eq!(
            (begin.size, begin.cksum),
            (plain.len() as u64, Cksum::of(plain))
        );
        let mut decryptor = CbcDecryptor::with_iv(&key, &begin.iv);
        let mut out = BytesMut::new();
        let mut remaining = u64::MAX;
        for event in events {
            let ClientEvent::RestoreData {
                content,
                remaining: left,
            } = event
            else {
                panic!("not restore data: {event:?}");
            };
            decryptor.update(&content, &mut out);
            remaining = left;
        }
        assert_eq!(remaining, 0);
        decryptor.finish(&mut out).unwrap();
        assert_eq!(&out[..], &plain[..]);
        assert!(!pair.client.restoring());
    }

    // Delete, then the name is gone.
    let victim = FileName::try_from(first.0.as_str()).unwrap();
    let frame = pair.client.delete_request(victim.clone());
    assert!(matches!(
        Pair::only(pair.send(frame, &mut store, &mut faults)),
        ClientEvent::Deleted { versions: 1 }
    ));
    let frame = pair.client.delete_request(victim.clone());
    assert!(matches!(
        Pair::only(pair.send(frame, &mut store, &mut faults)),
        ClientEvent::NotFound
    ));
    let frame = pair.client.restore_request(0, victim);
    assert!(matches!(
        Pair::only(pair.send(frame, &mut store, &mut faults)),
        ClientEvent::NotFound
    ));
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 32,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(REGRESSIONS))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn round_trips_a_legacy_session_under_any_split_and_injected_failures(
        sizes in prop::collection::vec(0usize..400, 1..6),
        splits in prop::collection::vec(1usize..80, 1..6),
        corrupted in 0u8..MAX_SEND_ATTEMPTS,
        register in any::<bool>(),
        write in any::<bool>(),
        seed in any::<u64>(),
    ) {
        run(Dialect::Legacy, &sizes, &splits, corrupted, Faults { register, write, quota: false }, seed);
    }

    #[test]
    fn round_trips_a_secure_session_under_any_split_and_injected_failures(
        sizes in prop::collection::vec(0usize..400, 1..6),
        splits in prop::collection::vec(1usize..80, 1..6),
        corrupted in 0u8..MAX_SEND_ATTEMPTS,
        register in any::<bool>(),
        write in any::<bool>(),
        seed in any::<u64>(),
    ) {
        run(Dialect::Secure, &sizes, &splits, corrupted, Faults { register, write, quota: false }, seed);
    }
}
