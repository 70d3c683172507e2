//! The protocol crate against real recorded sessions (`tests/vectors/`).
//!
//! Each session directory holds the bytes a legacy client and a legacy server
//! exchanged on 127.0.0.1 (`connN.c2s.bin`, `connN.s2c.bin`), the sizes of the
//! reads that carried them (`connN.chunks`), and a walk-through
//! (`session.txt`) whose facts (message codes, AES keys, cksums, plaintext
//! checks) the tests read rather than repeat. The client keys and the files
//! sent are under `tests/vectors/keys/<user name>/`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use bytes::BytesMut;
use protocol::crypto::{self, AesKey, CbcDecryptor, CbcEncryptor};
use protocol::keyfile::{parse_priv_key, MeInfo};
use protocol::message::PublicKeyField;
use protocol::reassembly::Reassembler;
use protocol::session::server::{
    Action, KnownClient, RegisterOutcome, ServerConfig, ServerSession,
};
use protocol::wire::RequestCode;
use protocol::{
    Cksum, ClientCodec, ClientId, FileName, Limits, Numbering, Request, RequestFrame, Response,
    ServerCodec, UserName,
};
use rand::SeedableRng;
use tokio_util::codec::{Decoder, Encoder};

const VECTORS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vectors");

/// One recorded TCP connection.
struct Conn {
    c2s: Vec<u8>,
    s2c: Vec<u8>,
    /// What the client actually sent, where the relay rewrote bytes.
    c2s_orig: Option<Vec<u8>>,
    /// The reads, in order: (client to server?, offset, length).
    chunks: Vec<(bool, usize, usize)>,
}

/// One recorded session directory.
struct Session {
    name: String,
    text: String,
    conns: Vec<Conn>,
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn parse_chunks(text: &str) -> Vec<(bool, usize, usize)> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(fields.len(), 4, "chunk line {line:?}");
            let c2s = match fields[1] {
                "c2s" => true,
                "s2c" => false,
                other => panic!("unknown direction {other:?}"),
            };
            (c2s, fields[2].parse().unwrap(), fields[3].parse().unwrap())
        })
        .collect()
}

/// Every session directory under `tests/vectors`, sorted by name.
fn sessions() -> Vec<Session> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(VECTORS)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("session.txt").is_file())
        .collect();
    dirs.sort();
    assert!(!dirs.is_empty(), "no session directories under {VECTORS}");
    dirs.iter()
        .map(|dir| {
            let mut conns = Vec::new();
            for n in 1.. {
                let base = dir.join(format!("conn{n}"));
                let c2s = base.with_extension("c2s.bin");
                if !c2s.is_file() {
                    break;
                }
                let orig = base.with_extension("c2s.orig.bin");
                conns.push(Conn {
                    c2s: read(&c2s),
                    s2c: read(&base.with_extension("s2c.bin")),
                    c2s_orig: orig.is_file().then(|| read(&orig)),
                    chunks: parse_chunks(
                        &String::from_utf8(read(&base.with_extension("chunks"))).unwrap(),
                    ),
                });
            }
            assert!(!conns.is_empty(), "{} has no connections", dir.display());
            Session {
                name: dir.file_name().unwrap().to_string_lossy().into_owned(),
                text: String::from_utf8(read(&dir.join("session.txt"))).unwrap(),
                conns,
            }
        })
        .collect()
}

// ---- small readers of session.txt -------------------------------------------------

/// The decimal number that follows `key` in `line`.
fn number_after(line: &str, key: &str) -> u64 {
    let start = line
        .find(key)
        .unwrap_or_else(|| panic!("{key:?} not in {line:?}"))
        + key.len();
    let digits: String = line[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("no number after {key:?} in {line:?}"))
}

/// The text that follows `key` in `line`, up to the next space or `;`.
fn word_after<'a>(line: &'a str, key: &str) -> &'a str {
    let start = line
        .find(key)
        .unwrap_or_else(|| panic!("{key:?} not in {line:?}"))
        + key.len();
    line[start..].split([' ', ';', ',']).next().unwrap()
}

/// The codes of the messages whose lines start with `prefix`
/// (`C->S REQUEST` or `S->C RESPONSE`), in order.
fn recorded_codes(text: &str, prefix: &str) -> Vec<u16> {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .map(|l| u16::try_from(number_after(l, "code=")).unwrap())
        .collect()
}

/// Per connection: (c2s bytes, requests, s2c bytes, responses), from the
/// `===== connN: ...` lines.
fn recorded_totals(text: &str) -> Vec<(usize, usize, usize, usize)> {
    text.lines()
        .filter(|l| l.starts_with("===== conn"))
        .map(|l| {
            let (c2s, s2c) = l.split_once(", s2c").unwrap();
            (
                number_after(c2s, "c2s ") as usize,
                number_after(c2s, "bytes in ") as usize,
                number_after(s2c, " ") as usize,
                number_after(s2c, "bytes in ") as usize,
            )
        })
        .collect()
}

/// The AES keys `AES key #i`, in order.
fn recorded_aes_keys(text: &str) -> Vec<[u8; 32]> {
    text.lines()
        .filter(|l| l.starts_with("AES key #"))
        .map(|l| {
            let hex = word_after(l, "= ");
            let mut key = [0u8; 32];
            hex::decode_to_slice(hex, &mut key).unwrap();
            key
        })
        .collect()
}

/// One `file attempt #i` paragraph of session.txt.
#[derive(Debug, PartialEq, Eq)]
struct Attempt {
    packets: usize,
    ciphertext: usize,
    pkcs7_ok: bool,
    plaintext: usize,
    cksum: u32,
    /// `plaintext == original file: True`.
    matches_original: bool,
}

fn boolean(word: &str) -> bool {
    match word {
        "True" => true,
        "False" => false,
        other => panic!("not a boolean: {other:?}"),
    }
}

fn recorded_attempts(text: &str) -> Vec<Attempt> {
    let lines: Vec<&str> = text.lines().collect();
    lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.starts_with("file attempt #"))
        .map(|(i, l)| {
            let check = lines[i + 1];
            Attempt {
                packets: number_after(l, ": ") as usize,
                ciphertext: number_after(l, "ciphertext ") as usize,
                pkcs7_ok: boolean(word_after(l, "PKCS7 ok=")),
                plaintext: number_after(l, "plaintext ") as usize,
                cksum: u32::try_from(number_after(l, "cksum=")).unwrap(),
                matches_original: boolean(word_after(check, "plaintext == original file: ")),
            }
        })
        .collect()
}

fn recorded_server_cksums(text: &str) -> Vec<u32> {
    let line = text
        .lines()
        .find(|l| l.starts_with("server-reported cksums:"))
        .expect("server-reported cksums line");
    let list = line.split_once('[').unwrap().1.trim_end_matches(']');
    list.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse().unwrap())
        .collect()
}

// ---- decoding helpers -------------------------------------------------------------

/// Decodes a whole byte stream, asserting that nothing is left over.
fn decode_stream<D: Decoder>(mut codec: D, bytes: &[u8]) -> Vec<D::Item>
where
    D::Error: std::fmt::Debug,
{
    let mut buf = BytesMut::from(bytes);
    let mut out = Vec::new();
    while let Some(item) = codec.decode(&mut buf).unwrap() {
        out.push(item);
    }
    assert!(
        buf.is_empty(),
        "{} bytes left over after the last message",
        buf.len()
    );
    out
}

fn requests(bytes: &[u8]) -> Vec<RequestFrame> {
    decode_stream(ServerCodec::default(), bytes)
}

fn responses(bytes: &[u8]) -> Vec<Response> {
    decode_stream(ClientCodec::default(), bytes)
}

fn request_code(frame: &RequestFrame) -> u16 {
    RequestCode::of(frame.request.kind(), frame.numbering).0
}

/// Every request and every response of a session, connections in order.
fn all_messages(session: &Session) -> (Vec<RequestFrame>, Vec<Response>) {
    let mut reqs = Vec::new();
    let mut resps = Vec::new();
    for conn in &session.conns {
        reqs.extend(requests(&conn.c2s));
        resps.extend(responses(&conn.s2c));
    }
    (reqs, resps)
}

/// The user the session speaks for: the name of its first register or
/// reconnect request.
fn user_name(reqs: &[RequestFrame]) -> UserName {
    reqs.iter()
        .find_map(|f| match &f.request {
            Request::Register { name } | Request::Reconnect { name } => Some(name.clone()),
            _ => None,
        })
        .expect("a register or reconnect request")
}

fn key_dir(user: &UserName) -> PathBuf {
    Path::new(VECTORS).join("keys").join(user.to_string())
}

fn me_info(user: &UserName) -> MeInfo {
    let text = String::from_utf8(read(&key_dir(user).join("me.info"))).unwrap();
    MeInfo::parse(&text).unwrap()
}

/// The file the client sent, from the user's key directory.
fn original_file(user: &UserName, file: &FileName) -> Vec<u8> {
    read(&key_dir(user).join(file.to_string()))
}

fn rng() -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(2024)
}

/// The wrapped keys the server sent (1602 and 1605), in order.
fn wrapped_keys(resps: &[Response]) -> Vec<&[u8]> {
    resps
        .iter()
        .filter_map(|r| match r {
            Response::KeyAccepted { wrapped_key, .. }
            | Response::Reconnected { wrapped_key, .. } => Some(&wrapped_key[..]),
            _ => None,
        })
        .collect()
}

/// What one upload attempt decrypted to.
struct Decrypted {
    file: FileName,
    packets: usize,
    ciphertext: Vec<u8>,
    pkcs7_ok: bool,
    plaintext: Vec<u8>,
    cksum: u32,
}

/// Reassembles the send-file requests into attempts and streams each one
/// through the decryptor and the cksum, packet by packet.
fn decrypt_attempts(reqs: &[RequestFrame], key: &AesKey) -> Vec<Decrypted> {
    let mut reassembler = Reassembler::new(Limits::default());
    let mut out = Vec::new();
    let mut current: Option<(Decrypted, CbcDecryptor, Cksum)> = None;
    for frame in reqs {
        let Request::SendFile(packet) = &frame.request else {
            continue;
        };
        let file = packet.head.file.clone();
        let slice = reassembler
            .push(packet.clone())
            .expect("recorded packets reassemble");
        if slice.first {
            assert!(current.is_none());
            let d = Decrypted {
                file,
                packets: 0,
                ciphertext: Vec::new(),
                pkcs7_ok: false,
                plaintext: Vec::new(),
                cksum: 0,
            };
            current = Some((d, CbcDecryptor::new(key), Cksum::new()));
        }
        let (d, decryptor, cksum) = current.as_mut().expect("an attempt in progress");
        d.packets += 1;
        d.ciphertext.extend_from_slice(&slice.content);
        let mut plain = BytesMut::new();
        decryptor.update(&slice.content, &mut plain);
        cksum.update(&plain);
        d.plaintext.extend_from_slice(&plain);
        if slice.last {
            let (mut d, decryptor, mut cksum) = current.take().unwrap();
            let mut tail = BytesMut::new();
            d.pkcs7_ok = decryptor.finish(&mut tail).is_ok();
            cksum.update(&tail);
            d.plaintext.extend_from_slice(&tail);
            d.cksum = cksum.finish();
            out.push(d);
        }
    }
    assert!(current.is_none(), "an upload attempt was left incomplete");
    out
}

/// The session's AES key, recovered from the server's wrapped key with the
/// client's private key.
fn recovered_key(user: &UserName, resps: &[Response]) -> AesKey {
    let wrapped = wrapped_keys(resps);
    assert_eq!(wrapped.len(), 1, "one key exchange per session");
    me_info(user)
        .key
        .unwrap_aes_key(&mut rng(), wrapped[0])
        .expect("wrapped key unwraps")
}

// ---- tests ------------------------------------------------------------------------

#[test]
fn decodes_every_recorded_message_with_the_codecs() {
    for session in sessions() {
        let totals = recorded_totals(&session.text);
        assert_eq!(totals.len(), session.conns.len(), "{}", session.name);
        let mut req_codes = Vec::new();
        let mut resp_codes = Vec::new();
        for (conn, (c2s_len, n_req, s2c_len, n_resp)) in session.conns.iter().zip(totals) {
            assert_eq!(
                (conn.c2s.len(), conn.s2c.len()),
                (c2s_len, s2c_len),
                "{}",
                session.name
            );
            let reqs = requests(&conn.c2s);
            let resps = responses(&conn.s2c);
            assert_eq!(
                (reqs.len(), resps.len()),
                (n_req, n_resp),
                "{}",
                session.name
            );
            req_codes.extend(reqs.iter().map(request_code));
            resp_codes.extend(resps.iter().map(|r| r.code().0));
        }
        assert_eq!(
            req_codes,
            recorded_codes(&session.text, "C->S REQUEST"),
            "{}",
            session.name
        );
        assert_eq!(
            resp_codes,
            recorded_codes(&session.text, "S->C RESPONSE"),
            "{}",
            session.name
        );
    }
}

#[test]
fn round_trips_every_recorded_message_byte_for_byte() {
    for session in sessions() {
        for conn in &session.conns {
            let mut c2s = BytesMut::new();
            let mut client = ClientCodec::default();
            for frame in requests(&conn.c2s) {
                client.encode(&frame, &mut c2s).unwrap();
            }
            assert!(
                c2s[..] == conn.c2s[..],
                "{}: re-encoded requests differ",
                session.name
            );

            let mut s2c = BytesMut::new();
            let mut server = ServerCodec::default();
            for response in responses(&conn.s2c) {
                server.encode(&response, &mut s2c).unwrap();
            }
            assert!(
                s2c[..] == conn.s2c[..],
                "{}: re-encoded responses differ",
                session.name
            );
        }
    }
}

#[test]
fn decodes_the_same_when_fed_in_the_recorded_read_sizes() {
    for session in sessions() {
        for conn in &session.conns {
            let mut server = ServerCodec::default();
            let mut client = ClientCodec::default();
            let (mut c2s_buf, mut s2c_buf) = (BytesMut::new(), BytesMut::new());
            let (mut reqs, mut resps) = (Vec::new(), Vec::new());
            let (mut c2s_at, mut s2c_at) = (0, 0);
            for &(c2s, offset, len) in &conn.chunks {
                if c2s {
                    assert_eq!(offset, c2s_at, "{}: c2s reads are contiguous", session.name);
                    c2s_at += len;
                    c2s_buf.extend_from_slice(&conn.c2s[offset..offset + len]);
                    while let Some(f) = server.decode(&mut c2s_buf).unwrap() {
                        reqs.push(f);
                    }
                } else {
                    assert_eq!(offset, s2c_at, "{}: s2c reads are contiguous", session.name);
                    s2c_at += len;
                    s2c_buf.extend_from_slice(&conn.s2c[offset..offset + len]);
                    while let Some(r) = client.decode(&mut s2c_buf).unwrap() {
                        resps.push(r);
                    }
                }
            }
            assert_eq!(
                (c2s_at, s2c_at),
                (conn.c2s.len(), conn.s2c.len()),
                "{}: reads cover the bytes",
                session.name
            );
            assert!(c2s_buf.is_empty() && s2c_buf.is_empty());
            assert_eq!(reqs, requests(&conn.c2s), "{}", session.name);
            assert_eq!(resps, responses(&conn.s2c), "{}", session.name);
        }
    }
}

#[test]
fn key_files_belong_to_the_recorded_client() {
    for session in sessions() {
        let (reqs, resps) = all_messages(&session);
        let user = user_name(&reqs);
        let me = me_info(&user);
        assert_eq!(me.name, user, "{}", session.name);
        let priv_key = parse_priv_key(&read(&key_dir(&user).join("priv.key"))).unwrap();
        assert_eq!(
            priv_key, me.key,
            "{}: priv.key and me.info hold the same key",
            session.name
        );
        // The public key on the wire is the one of the client's private key.
        for frame in &reqs {
            if let Request::PublicKey { key, .. } = &frame.request {
                assert_eq!(
                    crypto::public_key_field(&me.key.public_key()).unwrap(),
                    *key,
                    "{}",
                    session.name
                );
                assert_eq!(
                    crypto::parse_public_key(key).unwrap(),
                    me.key.public_key(),
                    "{}",
                    session.name
                );
            }
        }
        // The id in me.info is the one the server assigned, or the one the
        // client reconnected with.
        let registered = resps.iter().find_map(|r| match r {
            Response::Registered { client_id } => Some(*client_id),
            _ => None,
        });
        match registered {
            Some(id) => assert_eq!(id, me.client_id, "{}", session.name),
            None => assert!(
                reqs.iter()
                    .any(|f| matches!(f.request, Request::Reconnect { .. })
                        && f.client_id == me.client_id),
                "{}: reconnects as the id in me.info",
                session.name
            ),
        }
    }
}

#[test]
fn recovers_the_recorded_aes_key_with_the_client_private_key() {
    for session in sessions() {
        let (reqs, resps) = all_messages(&session);
        let me = me_info(&user_name(&reqs));
        let recorded = recorded_aes_keys(&session.text);
        let wrapped = wrapped_keys(&resps);
        assert!(!wrapped.is_empty(), "{}: a key exchange", session.name);
        assert_eq!(wrapped.len(), recorded.len(), "{}", session.name);
        for (wrapped, recorded) in wrapped.iter().zip(recorded) {
            let key = me.key.unwrap_aes_key(&mut rng(), wrapped).unwrap();
            assert_eq!(key.as_bytes(), &recorded, "{}", session.name);
        }
    }
}

#[test]
fn decrypts_every_file_attempt_to_the_reported_cksum() {
    for session in sessions() {
        let (reqs, resps) = all_messages(&session);
        let user = user_name(&reqs);
        let key = recovered_key(&user, &resps);
        let attempts = decrypt_attempts(&reqs, &key);
        let recorded = recorded_attempts(&session.text);
        assert_eq!(attempts.len(), recorded.len(), "{}", session.name);
        for (got, want) in attempts.iter().zip(&recorded) {
            let original = original_file(&user, &got.file);
            let summary = Attempt {
                packets: got.packets,
                ciphertext: got.ciphertext.len(),
                pkcs7_ok: got.pkcs7_ok,
                plaintext: got.plaintext.len(),
                cksum: got.cksum,
                matches_original: got.plaintext == original,
            };
            assert_eq!(&summary, want, "{}", session.name);
            // The streaming pipeline agrees with the one-shot functions.
            assert_eq!(got.cksum, Cksum::of(&got.plaintext), "{}", session.name);
            if got.pkcs7_ok {
                assert_eq!(
                    crypto::decrypt_all(&key, &got.ciphertext).unwrap()[..],
                    got.plaintext[..]
                );
            }
        }
        let server_cksums: Vec<u32> = resps
            .iter()
            .filter_map(|r| match r {
                Response::FileReceived { cksum, .. } => Some(*cksum),
                _ => None,
            })
            .collect();
        assert_eq!(
            server_cksums,
            recorded_server_cksums(&session.text),
            "{}",
            session.name
        );
        let ours: Vec<u32> = attempts.iter().map(|a| a.cksum).collect();
        assert_eq!(
            ours, server_cksums,
            "{}: our cksums equal the server's",
            session.name
        );
    }
}

#[test]
fn every_attempt_the_client_actually_sent_decrypts_to_the_original_file() {
    let mut checked = 0;
    for session in sessions() {
        let (reqs, resps) = all_messages(&session);
        let user = user_name(&reqs);
        let key = recovered_key(&user, &resps);
        for conn in &session.conns {
            let Some(orig) = &conn.c2s_orig else { continue };
            for attempt in decrypt_attempts(&requests(orig), &key) {
                assert!(attempt.pkcs7_ok, "{}", session.name);
                assert!(
                    attempt.plaintext == original_file(&user, &attempt.file),
                    "{}",
                    session.name
                );
                assert_eq!(
                    attempt.cksum,
                    Cksum::of(&original_file(&user, &attempt.file))
                );
                checked += 1;
            }
        }
    }
    assert!(checked > 0, "no .orig.bin with an upload");
}

#[test]
fn renumbered_session_decodes_like_its_classic_original() {
    let mut renumbered = 0;
    for session in sessions() {
        for conn in &session.conns {
            let Some(orig) = &conn.c2s_orig else { continue };
            let modern = requests(&conn.c2s);
            let classic = requests(orig);
            if modern
                .iter()
                .map(|f| f.numbering)
                .eq(classic.iter().map(|f| f.numbering))
            {
                continue; // a relay that corrupted content, not one that renumbered
            }
            renumbered += 1;
            assert!(
                modern.iter().all(|f| f.numbering == Numbering::Modern),
                "{}",
                session.name
            );
            assert!(
                classic.iter().all(|f| f.numbering == Numbering::Classic),
                "{}",
                session.name
            );
            let as_modern: Vec<RequestFrame> = classic
                .iter()
                .cloned()
                .map(|f| RequestFrame {
                    numbering: Numbering::Modern,
                    ..f
                })
                .collect();
            assert_eq!(as_modern, modern, "{}", session.name);
            // And the classic messages, renumbered by the encoder, are the
            // recorded modern bytes.
            let mut out = BytesMut::new();
            for frame in &as_modern {
                ClientCodec::default().encode(frame, &mut out).unwrap();
            }
            assert!(out[..] == conn.c2s[..], "{}", session.name);
        }
    }
    assert!(renumbered > 0, "no renumbered session found");
}

/// An in-memory storage that answers the server machine's actions.
#[derive(Default)]
struct FakeStorage {
    clients: HashMap<ClientId, (UserName, Option<PublicKeyField>)>,
    temp: Vec<u8>,
    files: HashMap<(ClientId, FileName), Vec<u8>>,
}

/// Decrypts every block of `ct` under `old` without unpadding and encrypts
/// the blocks again under `new`, so that a corrupted attempt stays exactly
/// as corrupted.
fn reencrypt(ct: &[u8], old: &AesKey, new: &AesKey) -> Vec<u8> {
    assert_eq!(ct.len() % crypto::BLOCK, 0);
    let mut raw = BytesMut::new();
    let mut decryptor = CbcDecryptor::new(old);
    decryptor.update(ct, &mut raw);
    // One more block releases the held-back last block; it is then dropped.
    decryptor.update(&[0u8; crypto::BLOCK], &mut raw);
    assert_eq!(raw.len(), ct.len());
    let mut out = BytesMut::new();
    CbcEncryptor::new(new).update(&raw, &mut out);
    assert_eq!(out.len(), ct.len());
    out.to_vec()
}

/// Feeds the session's requests to a [`ServerSession`] over [`FakeStorage`],
/// re-encrypting each upload under the key the machine hands out, and
/// returns the responses and the storage.
fn replay(session: &Session) -> (Vec<Response>, FakeStorage) {
    let (reqs, recorded_resps) = all_messages(session);
    let user = user_name(&reqs);
    let me = me_info(&user);
    let recorded_key = recovered_key(&user, &recorded_resps);
    let mut storage = FakeStorage::default();
    // A session that registers is the one that created the client; any other
    // is a later session of a client the server already knows.
    if !reqs
        .iter()
        .any(|f| matches!(f.request, Request::Register { .. }))
    {
        let key = crypto::public_key_field(&me.key.public_key()).unwrap();
        storage
            .clients
            .insert(me.client_id, (me.name.clone(), Some(key)));
    }
    let recorded_id = recorded_resps.iter().find_map(|r| match r {
        Response::Registered { client_id } => Some(*client_id),
        _ => None,
    });

    let mut rng = rng();
    let mut server = ServerSession::new(ServerConfig::default());
    let mut out = Vec::new();
    let mut assigned: Option<ClientId> = None;
    let mut fresh_key: Option<AesKey> = None;
    let mut reencrypted: HashMap<usize, Vec<u8>> = HashMap::new();
    for (i, frame) in reqs.iter().enumerate() {
        let mut frame = frame.clone();
        if let (Some(recorded), Some(assigned)) = (recorded_id, assigned) {
            if frame.client_id == recorded {
                frame.client_id = assigned;
            }
        }
        if let Request::SendFile(packet) = &mut frame.request {
            if packet.head.packet == 1 {
                // Re-encrypt this whole attempt under the fresh key.
                let total = packet.head.total as usize;
                let slices: Vec<&[u8]> = reqs[i..i + total]
                    .iter()
                    .map(|f| match &f.request {
                        Request::SendFile(p) => &p.content[..],
                        other => panic!("{}: {other:?} inside an upload", session.name),
                    })
                    .collect();
                let ct = reencrypt(
                    &slices.concat(),
                    &recorded_key,
                    fresh_key.as_ref().expect("a key before files"),
                );
                let mut at = 0;
                for (j, slice) in slices.iter().enumerate() {
                    reencrypted.insert(i + j, ct[at..at + slice.len()].to_vec());
                    at += slice.len();
                }
            }
            packet.content = reencrypted.remove(&i).expect("re-encrypted content").into();
        }
        let action = server
            .handle(frame, &mut rng)
            .unwrap_or_else(|e| panic!("{}: request {i}: {e}", session.name));
        match action {
            Action::Reply(r) => out.push(r),
            Action::List { .. } | Action::FindVersion { .. } | Action::Delete { .. } => {
                panic!("{}: no retrieval in a legacy session", session.name)
            }
            Action::Repo(action) => {
                panic!(
                    "{}: no repository request in a legacy session: {action:?}",
                    session.name
                )
            }
            Action::Register {
                client_id, name, ..
            } => {
                let taken = storage.clients.values().any(|(n, _)| *n == name);
                let outcome = if taken {
                    RegisterOutcome::NameTaken
                } else {
                    RegisterOutcome::Created
                };
                if !taken {
                    storage.clients.insert(client_id, (name, None));
                    assigned = Some(client_id);
                }
                out.push(server.registered(outcome, &mut rng).unwrap());
            }
            Action::StoreKey { client_id, key, .. } => {
                let stored = match storage.clients.get_mut(&client_id) {
                    Some(entry) => {
                        entry.1 = Some(key);
                        true
                    }
                    None => false,
                };
                let response = server.key_stored(stored, &mut rng).unwrap();
                if let Response::KeyAccepted { wrapped_key, .. } = &response {
                    fresh_key = Some(me.key.unwrap_aes_key(&mut rng, wrapped_key).unwrap());
                }
                out.push(response);
            }
            Action::LookupClient { client_id, .. } => {
                let found = storage
                    .clients
                    .get(&client_id)
                    .map(|(name, key)| KnownClient {
                        name: name.clone(),
                        public_key: key.clone(),
                        secure_key: None,
                    });
                let response = server.looked_up(found, &mut rng).unwrap();
                if let Response::Reconnected { wrapped_key, .. } = &response {
                    fresh_key = Some(me.key.unwrap_aes_key(&mut rng, wrapped_key).unwrap());
                }
                out.push(response);
            }
            Action::Write {
                start,
                plaintext,
                done,
            } => {
                if start.is_some() {
                    storage.temp.clear();
                }
                storage.temp.extend_from_slice(&plaintext);
                out.extend(done);
            }
            Action::Commit {
                client_id,
                file,
                size,
                cksum,
                reply,
            } => {
                assert_eq!(size, storage.temp.len() as u64);
                assert_eq!(cksum, Cksum::of(&storage.temp));
                storage
                    .files
                    .insert((client_id, file), std::mem::take(&mut storage.temp));
                out.push(reply);
            }
            Action::Discard { reply } => {
                storage.temp.clear();
                out.extend(reply);
            }
        }
    }
    (out, storage)
}

#[test]
fn server_session_answers_every_recorded_session_as_recorded() {
    for session in sessions() {
        let (reqs, recorded) = all_messages(&session);
        let (replayed, storage) = replay(&session);
        let codes = |rs: &[Response]| rs.iter().map(|r| r.code().0).collect::<Vec<_>>();
        assert_eq!(codes(&replayed), codes(&recorded), "{}", session.name);
        let cksums = |rs: &[Response]| {
            rs.iter()
                .filter_map(|r| match r {
                    Response::FileReceived {
                        content_size,
                        file,
                        cksum,
                        ..
                    } => Some((*content_size, file.clone(), *cksum)),
                    _ => None,
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(cksums(&replayed), cksums(&recorded), "{}", session.name);
        // A file the client confirmed is stored exactly; one it gave up on is not.
        let user = user_name(&reqs);
        let confirmed: Vec<&FileName> = reqs
            .iter()
            .filter_map(|f| match &f.request {
                Request::CrcOk { file } => Some(file),
                _ => None,
            })
            .collect();
        assert_eq!(storage.files.len(), confirmed.len(), "{}", session.name);
        for file in confirmed {
            let stored = storage
                .files
                .iter()
                .find(|((_, f), _)| f == file)
                .map(|(_, data)| data);
            assert!(
                stored == Some(&original_file(&user, file)),
                "{}: {file} stored intact",
                session.name
            );
        }
    }
}
