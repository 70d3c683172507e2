//! Hostile clients against the real binary on 127.0.0.1: every edge of the
//! legacy protocol, idle and slow connections, and 1,000 connections at
//! once. For each: the server answers as `docs/PROTOCOL.md` says or closes,
//! logs the cause against the peer's address, keeps serving a good client
//! in parallel, and its resident memory returns to within
//! [`MEMORY_SLACK_KIB`] of the baseline it had before the hostile phase.
//!
//! `BACKUP_LONG_TESTS=1` repeats the 1,000-connection rounds and runs more
//! slow connections at once.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use protocol::name::NAME_FIELD_LEN;
use protocol::wire::{RequestCode, RequestHeader, VERSION};
use protocol::{ClientId, FileName, Numbering, Request, RequestFrame, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;

use crate::harness::{
    alice_key, assert_metadata_matches_disk, assert_only_database_and_blobs, file, files_under,
    long_tests, open_files_limit, random_bytes, stored, temp_files, user, Binary, Client, Peer,
    STEP,
};

/// How far above its baseline the server's resident memory may stay once
/// the hostile connections are gone: a resource bound, generous enough for
/// allocator caching, far below what a leak per connection would add.
const MEMORY_SLACK_KIB: u64 = 64 * 1024;

/// Payload bytes the default limits allow in one send-file request.
const MAX_SEND_FILE_PAYLOAD: u32 = 267 + 1024 * 1024 + 64 * 1024;

/// Flags of the binary under test: short timeouts so that idle and slow
/// connections are cut within the test's time.
const TIMEOUT_FLAGS: [&str; 4] = ["--idle-timeout", "2", "--request-timeout", "2"];

fn header(client_id: ClientId, code: RequestCode, payload_len: u32) -> BytesMut {
    let mut b = BytesMut::new();
    RequestHeader {
        client_id,
        version: VERSION,
        code,
        payload_len,
    }
    .write(&mut b);
    b
}

fn name_field(name: &[u8]) -> BytesMut {
    let mut f = BytesMut::new();
    f.put_slice(name);
    f.resize(NAME_FIELD_LEN, 0);
    f
}

/// A raw send-file packet: any numbers, any content, no checks.
#[allow(clippy::too_many_arguments)]
fn raw_packet(
    client_id: ClientId,
    content_size: u32,
    orig_size: u32,
    packet: u16,
    total: u16,
    name: &[u8],
    content: &[u8],
) -> BytesMut {
    let field = if name.len() == NAME_FIELD_LEN {
        BytesMut::from(name)
    } else {
        name_field(name)
    };
    let len = u32::try_from(12 + NAME_FIELD_LEN + content.len()).unwrap();
    let mut b = header(client_id, RequestCode::SEND_FILE, len);
    b.put_u32_le(content_size);
    b.put_u32_le(orig_size);
    b.put_u16_le(packet);
    b.put_u16_le(total);
    b.put_slice(&field);
    b.put_slice(content);
    b
}

/// What a hostile connection must get.
#[derive(Debug)]
enum Expect {
    /// Exactly these answers, then the close.
    Closed(Vec<Response>),
}

/// One hostile case: its name, what the server must answer and the cause
/// it must log for the connection.
struct Outcome {
    case: &'static str,
    local: SocketAddr,
    answers: Vec<Response>,
    expect: Expect,
    cause: &'static str,
}

fn e1607() -> Expect {
    Expect::Closed(vec![Response::GeneralError])
}

/// Sends `raw` on a fresh connection and reads until the close.
async fn raw_case(
    addr: SocketAddr,
    case: &'static str,
    raw: BytesMut,
    expect: Expect,
    cause: &'static str,
) -> Outcome {
    let mut p = Peer::connect(addr).await;
    let local = p.local_addr();
    p.send_raw(&raw).await;
    Outcome {
        case,
        local,
        answers: p.closed().await,
        expect,
        cause,
    }
}

/// Registers (and exchanges keys) under a fresh name, sends what `raw`
/// makes of the session, and reads until the close.
async fn keyed_case(
    addr: SocketAddr,
    case: &'static str,
    raw: impl FnOnce(&Client) -> Vec<BytesMut>,
    expect: Expect,
    cause: &'static str,
) -> Outcome {
    let mut c = Client::register(addr, case, &alice_key(), Numbering::Modern).await;
    let local = c.peer.local_addr();
    for chunk in raw(&c) {
        // A write may fail once the server has closed: the answers tell.
        let _ = c.peer.framed.get_mut().write_all(&chunk).await;
    }
    Outcome {
        case,
        local,
        answers: c.peer.closed().await,
        expect,
        cause,
    }
}

/// Writes one byte a second (a header, then a name field) until the server
/// closes or `max_secs` pass; returns the answers read.
async fn slowloris(addr: SocketAddr, max_secs: usize) -> (SocketAddr, Vec<Response>) {
    let p = Peer::connect(addr).await;
    let local = p.local_addr();
    let mut raw = header(ClientId::default(), RequestCode::REGISTER, 255);
    raw.put_slice(&name_field(b"slow"));
    let (mut read, mut write) = p.framed.into_inner().into_split();
    let writer = tokio::spawn(async move {
        for b in raw.iter().take(max_secs) {
            if write.write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        write
    });
    let mut got = Vec::new();
    let _ = tokio::time::timeout(
        Duration::from_secs(max_secs as u64 + 5),
        read.read_to_end(&mut got),
    )
    .await;
    writer.abort();
    (local, decode_responses(&got))
}

/// Responses in `bytes` (all of them complete).
fn decode_responses(bytes: &[u8]) -> Vec<Response> {
    use tokio_util::codec::Decoder;
    let mut codec = protocol::ClientCodec::default();
    let mut buf = BytesMut::from(bytes);
    let mut out = Vec::new();
    while let Ok(Some(r)) = codec.decode(&mut buf) {
        out.push(r);
    }
    out
}

/// A file a client stored: its name and content.
type Stored = (FileName, Vec<u8>);

/// A well-behaved client that stores 64 KB files one after another until
/// told to stop; returns its id and what it stored.
fn good_client(
    addr: SocketAddr,
    name: &'static str,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(ClientId, Vec<Stored>)> {
    tokio::spawn(async move {
        let mut c = Client::register(addr, name, &alice_key(), Numbering::Classic).await;
        let mut stored = Vec::new();
        for i in 0..10_000u64 {
            if i > 0 && stop.load(Ordering::SeqCst) {
                break;
            }
            let name = format!("good-{i}.bin");
            let content = random_bytes(64 * 1024, 1000 + i);
            c.store(&name, &content, 16 * 1024).await;
            stored.push((file(&name), content));
        }
        (c.id, stored)
    })
}

/// Waits (bounded) until the server's resident memory is within the slack
/// of `baseline`; returns the last reading.
fn settle_memory(server: &Binary, baseline: u64) -> u64 {
    let mut rss = u64::MAX;
    for _ in 0..100 {
        rss = server.rss_kib().unwrap();
        if rss <= baseline + MEMORY_SLACK_KIB {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    rss
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn answers_or_closes_every_hostile_input_while_serving_a_good_client() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    let mut server = Binary::start(&data, &TIMEOUT_FLAGS);
    let addr = server.addr;

    // Warm up, then take the baseline.
    let mut warm = Client::register(addr, "warm-up", &alice_key(), Numbering::Modern).await;
    warm.store("warm.bin", &random_bytes(300_000, 1), 65_536)
        .await;
    drop(warm);
    let baseline = server.rss_kib().unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let good = good_client(addr, "good", Arc::clone(&stop));

    let nobody = ClientId([7; 16]);
    let mut cases: JoinSet<Outcome> = JoinSet::new();
    // Garbage after a valid header: a register whose name field is 255
    // bytes of high-bit garbage (no NUL).
    let mut raw = header(nobody, RequestCode::REGISTER, 255);
    raw.put_slice(
        &random_bytes(255, 2)
            .iter()
            .map(|b| b | 0x80)
            .collect::<Vec<_>>(),
    );
    cases.spawn(raw_case(
        addr,
        "garbage-payload",
        raw,
        e1607(),
        "no NUL terminator",
    ));
    // Garbage after a whole valid request: answered, then the garbage ends it.
    let mut raw = header(nobody, RequestCode::REGISTER, 255);
    raw.put_slice(&name_field(b"garbage-follows"));
    raw.put_slice(
        &random_bytes(64, 3)
            .iter()
            .map(|b| b | 0x80)
            .collect::<Vec<_>>(),
    );
    cases.spawn(async move {
        let mut o = raw_case(
            addr,
            "garbage-after-request",
            raw,
            e1607(),
            "unsupported protocol version",
        )
        .await;
        // The register itself was served first.
        match o.answers.first() {
            Some(Response::Registered { .. }) => {
                o.answers.remove(0);
            }
            other => panic!("garbage-after-request: register not answered: {other:?}"),
        }
        o
    });
    // Declared payload sizes with nothing following.
    for (case, code, len, cause) in [
        (
            "send-file-0",
            RequestCode::SEND_FILE,
            0,
            "declares a 0-byte payload",
        ),
        (
            "send-file-1",
            RequestCode::SEND_FILE,
            1,
            "declares a 1-byte payload",
        ),
        (
            "send-file-4gib",
            RequestCode::SEND_FILE,
            u32::MAX,
            "declares a 4294967295-byte payload",
        ),
        (
            "register-0",
            RequestCode::CLASSIC_REGISTER,
            0,
            "declares a 0-byte payload",
        ),
        (
            "register-1",
            RequestCode::REGISTER,
            1,
            "declares a 1-byte payload",
        ),
        (
            "crc-4gib",
            RequestCode::CLASSIC_CRC_OK,
            u32::MAX,
            "declares a 4294967295-byte payload",
        ),
        (
            "send-file-max-then-nothing",
            RequestCode::SEND_FILE,
            MAX_SEND_FILE_PAYLOAD,
            "request not completed",
        ),
    ] {
        cases.spawn(raw_case(
            addr,
            case,
            header(nobody, code, len),
            e1607(),
            cause,
        ));
    }
    // A name field of 255 bytes without a NUL, in a register.
    let mut raw = header(nobody, RequestCode::REGISTER, 255);
    raw.put_bytes(b'N', NAME_FIELD_LEN);
    cases.spawn(raw_case(
        addr,
        "register-name-255",
        raw,
        e1607(),
        "no NUL terminator",
    ));
    // Legacy codes out of order, with no session at all.
    cases.spawn(raw_case(
        addr,
        "file-without-session",
        raw_packet(nobody, 16, 5, 1, 1, b"f", &[0; 16]),
        e1607(),
        "is not allowed",
    ));
    let mut raw = header(nobody, RequestCode::CRC_OK, 255);
    raw.put_slice(&name_field(b"unknown"));
    cases.spawn(raw_case(
        addr,
        "verdict-without-session",
        raw,
        e1607(),
        "is not allowed",
    ));
    let mut raw = header(nobody, RequestCode::PUBLIC_KEY, 415);
    raw.put_slice(&name_field(b"keyless"));
    raw.put_bytes(0, 160);
    cases.spawn(raw_case(
        addr,
        "key-before-register",
        raw,
        e1607(),
        "is not allowed",
    ));
    // A file after register but before the key exchange.
    cases.spawn(async move {
        let mut p = Peer::connect(addr).await;
        let local = p.local_addr();
        p.send(RequestFrame {
            client_id: ClientId::default(),
            numbering: Numbering::Modern,
            request: Request::Register {
                name: user("keyless-sender"),
            },
        })
        .await;
        let Response::Registered { client_id } = p.recv().await else {
            panic!("file-before-key: register refused")
        };
        p.send_raw(&raw_packet(client_id, 16, 5, 1, 1, b"f", &[0; 16]))
            .await;
        Outcome {
            case: "file-before-key",
            local,
            answers: p.closed().await,
            expect: e1607(),
            cause: "is not allowed",
        }
    });
    // Keyed sessions: packet numbering, sizes and verdicts.
    let ct16 = |c: &Client| protocol::crypto::encrypt_all(&c.aes, b"0123456789a");
    cases.spawn(keyed_case(
        addr,
        "count-65535-one-sent",
        move |c| {
            let orig = 65_535 * 16 - 1;
            vec![raw_packet(
                c.id,
                65_535 * 16,
                orig,
                1,
                65_535,
                b"huge",
                &[0; 16],
            )]
        },
        e1607(),
        "idle for",
    ));
    cases.spawn(keyed_case(
        addr,
        "packet-out-of-order",
        |c| vec![raw_packet(c.id, 48, 40, 2, 3, b"f", &[0; 16])],
        e1607(),
        "packet 2 arrived where packet 1 was due",
    ));
    cases.spawn(keyed_case(
        addr,
        "packet-skipped",
        |c| {
            vec![
                raw_packet(c.id, 48, 40, 1, 3, b"f", &[0; 16]),
                raw_packet(c.id, 48, 40, 3, 3, b"f", &[0; 16]),
            ]
        },
        e1607(),
        "packet 3 arrived where packet 2 was due",
    ));
    cases.spawn(keyed_case(
        addr,
        "packet-repeated",
        |c| {
            vec![
                raw_packet(c.id, 48, 40, 1, 3, b"f", &[0; 16]),
                raw_packet(c.id, 48, 40, 1, 3, b"f", &[0; 16]),
            ]
        },
        e1607(),
        "packet 1 arrived where packet 2 was due",
    ));
    cases.spawn(keyed_case(
        addr,
        "packet-zero",
        // A first packet 0 starts an upload numbered from 0 (as some
        // deployed clients do, docs/PROTOCOL.md §9); after packet 1 it is
        // out of sequence.
        |c| {
            vec![
                raw_packet(c.id, 48, 40, 1, 3, b"f", &[0; 16]),
                raw_packet(c.id, 48, 40, 0, 3, b"f", &[0; 16]),
            ]
        },
        e1607(),
        "packet 0 arrived where packet 2 was due",
    ));
    cases.spawn(keyed_case(
        addr,
        "total-zero",
        |c| vec![raw_packet(c.id, 48, 40, 1, 0, b"f", &[0; 16])],
        e1607(),
        "packet 1 of 0 is out of range",
    ));
    cases.spawn(keyed_case(
        addr,
        "content-longer",
        |c| {
            vec![
                raw_packet(c.id, 16, 11, 1, 2, b"f", &[0; 16]),
                raw_packet(c.id, 16, 11, 2, 2, b"f", &[0; 16]),
            ]
        },
        e1607(),
        "more than the declared 16 bytes",
    ));
    cases.spawn(keyed_case(
        addr,
        "content-longer-in-one-packet",
        move |c| {
            // Not zeros: those would be padding, dropped (docs/PROTOCOL.md §9).
            let mut ct = ct16(c);
            ct.extend_from_slice(&[0xa5; 16]);
            vec![raw_packet(c.id, 16, 11, 1, 1, b"f", &ct)]
        },
        e1607(),
        "more than the declared 16 bytes",
    ));
    cases.spawn(keyed_case(
        addr,
        "content-shorter",
        |c| vec![raw_packet(c.id, 48, 40, 1, 1, b"f", &[0; 16])],
        e1607(),
        "last packet arrived after 16 of 48 bytes",
    ));
    cases.spawn(keyed_case(
        addr,
        "content-size-not-pkcs7",
        |c| vec![raw_packet(c.id, 17, 11, 1, 1, b"f", &[0; 17])],
        e1607(),
        "does not match 11 bytes of plaintext",
    ));
    cases.spawn(keyed_case(
        addr,
        "file-name-255",
        |c| vec![raw_packet(c.id, 16, 11, 1, 1, &[b'F'; 255], &[0; 16])],
        e1607(),
        "no NUL terminator",
    ));
    cases.spawn(keyed_case(
        addr,
        "verdict-for-unknown-file",
        |c| {
            let mut raw = header(c.id, RequestCode::CRC_OK, 255);
            raw.put_slice(&name_field(b"never-sent"));
            vec![raw]
        },
        e1607(),
        "is not allowed",
    ));
    cases.spawn(keyed_case(
        addr,
        "retry-for-unknown-file",
        |c| {
            let mut raw = header(c.id, RequestCode::CLASSIC_CRC_RETRY, 255);
            raw.put_slice(&name_field(b"never-sent"));
            vec![raw]
        },
        e1607(),
        "is not allowed",
    ));
    cases.spawn(keyed_case(
        addr,
        "abort-for-unknown-file",
        |c| {
            let mut raw = header(c.id, RequestCode::CRC_ABORT, 255);
            raw.put_slice(&name_field(b"never-sent"));
            vec![raw]
        },
        e1607(),
        "is not allowed",
    ));
    cases.spawn(keyed_case(
        addr,
        "verdict-for-another-file",
        move |c| {
            let mut raw = raw_packet(c.id, 16, 11, 1, 1, b"sent", &ct16(c));
            raw.extend_from_slice(&header(c.id, RequestCode::CRC_OK, 255));
            raw.put_slice(&name_field(b"other"));
            vec![raw]
        },
        e1607(),
        "verdict names",
    ));
    cases.spawn(keyed_case(
        addr,
        "register-when-keyed",
        |c| {
            let mut raw = header(c.id, RequestCode::CLASSIC_REGISTER, 255);
            raw.put_slice(&name_field(b"second-name"));
            vec![raw]
        },
        e1607(),
        "is not allowed",
    ));
    cases.spawn(keyed_case(
        addr,
        "reconnect-when-keyed",
        |c| {
            let mut raw = header(c.id, RequestCode::RECONNECT, 255);
            raw.put_slice(&name_field(c.name.as_bytes()));
            vec![raw]
        },
        e1607(),
        "is not allowed",
    ));
    cases.spawn(keyed_case(
        addr,
        "packet-while-verdict-due",
        move |c| {
            let ct = ct16(c);
            let mut raw = raw_packet(c.id, 16, 11, 1, 1, b"sent", &ct);
            raw.extend_from_slice(&raw_packet(c.id, 16, 11, 1, 1, b"sent", &ct));
            vec![raw]
        },
        e1607(),
        "is not allowed",
    ));
    cases.spawn(keyed_case(
        addr,
        "verdict-mid-upload",
        |c| {
            let mut raw = raw_packet(c.id, 48, 40, 1, 3, b"f", &[0; 16]);
            raw.extend_from_slice(&header(c.id, RequestCode::CRC_OK, 255));
            raw.put_slice(&name_field(b"f"));
            vec![raw]
        },
        e1607(),
        "is not allowed",
    ));
    // A public key after a reconnect: refused (§6.2), else anyone who
    // knows a client's id and name could take the account over.
    cases.spawn(async move {
        let first = Client::register(addr, "rekey", &alice_key(), Numbering::Modern).await;
        let id = first.id;
        drop(first);
        let mut again = Client::reconnect(addr, id, "rekey", &alice_key(), Numbering::Modern)
            .await
            .expect("reconnect");
        let local = again.peer.local_addr();
        let mut raw = header(id, RequestCode::PUBLIC_KEY, 415);
        raw.put_slice(&name_field(b"rekey"));
        raw.put_slice(
            &protocol::crypto::public_key_field(&again.key.public_key())
                .unwrap()
                .0,
        );
        again.peer.send_raw(&raw).await;
        Outcome {
            case: "key-after-reconnect",
            local,
            answers: again.peer.closed().await,
            expect: e1607(),
            cause: "is not allowed",
        }
    });
    cases.spawn(keyed_case(
        addr,
        "other-client-id",
        |_| vec![raw_packet(ClientId([9; 16]), 16, 11, 1, 1, b"f", &[0; 16])],
        e1607(),
        "does not match the session's",
    ));
    // A connection that says nothing.
    cases.spawn(async move {
        let mut p = Peer::connect(addr).await;
        Outcome {
            case: "idle",
            local: p.local_addr(),
            answers: p.closed().await,
            expect: e1607(),
            cause: "idle for",
        }
    });
    // Slowloris: one byte a second, several at once.
    let slow = if long_tests() { 200 } else { 20 };
    for _ in 0..slow {
        cases.spawn(async move {
            let (local, answers) = slowloris(addr, 20).await;
            Outcome {
                case: "slowloris",
                local,
                answers,
                expect: e1607(),
                cause: "request not completed",
            }
        });
    }

    let mut tried = 0;
    while let Some(o) = cases.join_next().await {
        let o = o.unwrap();
        tried += 1;
        let Expect::Closed(want) = &o.expect;
        // A 1603 may precede the close where a whole file arrived first.
        let answers: Vec<_> = o
            .answers
            .iter()
            .filter(|r| !matches!(r, Response::FileReceived { .. }))
            .cloned()
            .collect();
        assert_eq!(&answers, want, "{}: answers", o.case);
        assert!(
            server.logged_for(o.local, o.cause),
            "{}: no log line for peer={} containing {:?}; its lines:\n{}",
            o.case,
            o.local,
            o.cause,
            server.log_lines(&format!("peer={}", o.local)).join("\n")
        );
    }

    // Reconnect as an unknown id: 1606, and the connection stays usable.
    let mut p = Peer::connect(addr).await;
    p.send(RequestFrame {
        client_id: ClientId([0x42; 16]),
        numbering: Numbering::Classic,
        request: Request::Reconnect {
            name: user("ghost"),
        },
    })
    .await;
    assert!(matches!(p.recv().await, Response::ReconnectRejected { .. }));
    assert!(server.logged_for(p.local_addr(), "reconnect refused"));
    p.send(RequestFrame {
        client_id: ClientId::default(),
        numbering: Numbering::Classic,
        request: Request::Register {
            name: user("ghost"),
        },
    })
    .await;
    assert!(matches!(p.recv().await, Response::Registered { .. }));
    drop(p);
    tried += 1;

    stop.store(true, Ordering::SeqCst);
    let (good_id, good_files) = tokio::time::timeout(Duration::from_secs(60), good)
        .await
        .expect("the good client stalled")
        .unwrap();
    let peak = server.peak_rss_kib().unwrap();
    let after = settle_memory(&server, baseline);
    eprintln!(
        "hostile inputs: {tried} connections; good client stored {} files meanwhile; \
         RSS baseline {baseline} KiB, peak {peak} KiB, after {after} KiB",
        good_files.len()
    );
    assert!(
        after <= baseline + MEMORY_SLACK_KIB,
        "RSS {after} KiB stays above baseline {baseline} KiB + {MEMORY_SLACK_KIB} KiB"
    );
    assert!(server.is_running());
    let status = server.terminate();
    assert!(status.success(), "{status:?}");

    for (name, content) in &good_files {
        assert_eq!(stored(&data, good_id, name).as_ref(), Some(content));
    }
    assert!(temp_files(&data).is_empty());
    assert_only_database_and_blobs(&data);
    assert_metadata_matches_disk(&data);
    let outside: Vec<_> = files_under(root.path())
        .into_iter()
        .filter(|p| !p.starts_with("data"))
        .collect();
    assert!(outside.is_empty(), "{outside:?}");
}

/// Connections this test can open at once: 1,000, unless the open-files
/// limit (shared with the server, which inherits it) is too low.
fn thousand() -> usize {
    let limit = open_files_limit().unwrap_or(1024);
    let room = usize::try_from(limit.saturating_sub(200)).unwrap_or(usize::MAX);
    if room < 1000 {
        eprintln!(
            "open-files limit is {limit}: opening {room} connections instead of 1000 \
             (raise it with `ulimit -n 4096` to run the full count)"
        );
    }
    room.min(1000)
}

/// Opens `n` connections at once; each sends a reconnect for an unknown
/// id. Returns the connections that were answered 1606 (served) and the
/// count of those refused (1607 or closed without an answer).
async fn open_many(addr: SocketAddr, n: usize) -> (Vec<Peer>, usize) {
    let mut tasks = JoinSet::new();
    for i in 0..n {
        tasks.spawn(async move {
            let mut p = Peer::connect(addr).await;
            let ping = RequestFrame {
                client_id: ClientId([0xee; 16]),
                numbering: Numbering::Modern,
                request: Request::Reconnect {
                    name: user(&format!("crowd-{i}")),
                },
            };
            if futures::SinkExt::send(&mut p.framed, ping).await.is_err() {
                return (None, Vec::new());
            }
            match p.next().await {
                Some(Ok(Response::ReconnectRejected { .. })) => (Some(p), Vec::new()),
                Some(Ok(first)) => {
                    let mut all = vec![first];
                    all.extend(p.closed().await);
                    (None, all)
                }
                _ => (None, Vec::new()),
            }
        });
    }
    let mut held = Vec::new();
    let mut refused = 0;
    while let Some(r) = tasks.join_next().await {
        match r.unwrap() {
            (Some(p), _) => held.push(p),
            (None, answers) => {
                assert!(
                    answers.is_empty() || answers == vec![Response::GeneralError],
                    "a refused connection got {answers:?}"
                );
                refused += 1;
            }
        }
    }
    (held, refused)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_1000_connections_at_once_while_serving_a_good_client() {
    let n = thousand();
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().join("data");
    let cap = (n + 100).to_string();
    let server = Binary::start(&dir, &["--max-connections", &cap, "--idle-timeout", "60"]);
    let addr = server.addr;
    let mut warm = Client::register(addr, "warm-up", &alice_key(), Numbering::Modern).await;
    warm.store("warm.bin", &random_bytes(300_000, 1), 65_536)
        .await;
    drop(warm);
    let baseline = server.rss_kib().unwrap();
    let idle_fds = server.open_fds().unwrap();
    let rounds = if long_tests() { 5 } else { 1 };
    let mut held_max = 0;
    for round in 0..rounds {
        let (held, refused) = open_many(addr, n).await;
        assert_eq!(refused, 0, "round {round}: all {n} are within the cap");
        assert_eq!(held.len(), n);
        held_max = held_max.max(held.len());
        let fds = server.open_fds().unwrap();
        assert!(fds >= n, "the server holds {fds} descriptors");
        // A good client is served while all of them are open.
        let mut c = Client::register(
            addr,
            &format!("good-{round}"),
            &alice_key(),
            Numbering::Classic,
        )
        .await;
        let content = random_bytes(200_000, round);
        c.store("while-crowded.bin", &content, 32_768).await;
        drop(c);
        drop(held);
        // The server releases a slot when it has seen the close: the next
        // round may start only then, or it would meet the cap.
        let released = std::time::Instant::now();
        while server.open_fds().unwrap() > idle_fds + 10 {
            assert!(
                released.elapsed() < STEP,
                "round {round}: the server still holds {} descriptors",
                server.open_fds().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let peak = server.peak_rss_kib().unwrap();
    let after = settle_memory(&server, baseline);
    eprintln!(
        "{rounds} rounds of {held_max} connections held at once: \
         RSS baseline {baseline} KiB, peak {peak} KiB, after {after} KiB"
    );
    assert!(
        after <= baseline + MEMORY_SLACK_KIB,
        "RSS {after} KiB stays above baseline {baseline} KiB + {MEMORY_SLACK_KIB} KiB"
    );
    drop(server);
    assert_metadata_matches_disk(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_past_the_default_cap_when_1000_connect_at_once() {
    let n = thousand();
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().join("data");
    let server = Binary::start(&dir, &[]);
    let addr = server.addr;
    let baseline = server.rss_kib().unwrap();
    let cap = server::Config::DEFAULT_MAX_CONNECTIONS;
    let (held, refused) = open_many(addr, n).await;
    assert_eq!(held.len(), cap.min(n), "served up to the cap");
    assert_eq!(refused, n - cap.min(n), "refused past it");
    if n > cap {
        assert!(server.logged("at capacity"));
    }
    drop(held);
    // Slots free as the connections close: a good client gets in.
    let mut served = false;
    for _ in 0..100 {
        match Client::reconnect(
            addr,
            ClientId([1; 16]),
            "x",
            &alice_key(),
            Numbering::Modern,
        )
        .await
        {
            Err(Response::ReconnectRejected { .. }) => {
                served = true;
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    assert!(served, "a slot never freed");
    let mut c = Client::register(addr, "after-crowd", &alice_key(), Numbering::Modern).await;
    c.store("ok.bin", b"served after the crowd", 16).await;
    let after = settle_memory(&server, baseline);
    eprintln!("{n} at once against the default cap of {cap}: RSS baseline {baseline} KiB, after {after} KiB");
    assert!(after <= baseline + MEMORY_SLACK_KIB);
}
