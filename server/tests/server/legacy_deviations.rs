//! The deviations of deployed legacy clients that the legacy listener
//! absorbs (`docs/PROTOCOL.md` §9), each reproduced byte for byte by a peer
//! that writes its packets by hand; and the same bytes refused with
//! `--strict-legacy`.

use bytes::{BufMut, BytesMut};
use protocol::crypto::{encrypt_all, pkcs7_len};
use protocol::name::NAME_FIELD_LEN;
use protocol::wire::{RequestCode, RequestHeader, VERSION};
use protocol::{Cksum, Leniency, Numbering, Request, Response};

use crate::harness::{
    alice_key, assert_logged, config, file, random_bytes, stored, Client, TestServer,
};

/// How a client numbers and pads its packets.
#[derive(Clone, Copy)]
struct Habit {
    /// The number of the first packet (1 per the protocol, 0 for some).
    first: u16,
    /// Pad the last packet with zeros to this many bytes.
    pad_to: Option<usize>,
}

const SPEC: Habit = Habit {
    first: 1,
    pad_to: None,
};
/// inbar360 and idogut3: 1024-byte chunks, the last zero-padded.
const PADDED: Habit = Habit {
    first: 1,
    pad_to: Some(1024),
};
/// yotamgershi, idogut3: packets numbered 0..total-1.
const FROM_ZERO: Habit = Habit {
    first: 0,
    pad_to: None,
};

/// The 1028 packets of an upload of `content` under `c`'s key, as a client
/// with `habit` writes them: each the 23-byte header, the 267-byte packet
/// head (content size, original size, packet number, total, name) and the
/// content, all little-endian, assembled here by hand rather than by our
/// encoder.
fn raw_packets(
    c: &Client,
    name: &str,
    content: &[u8],
    chunk: usize,
    habit: Habit,
) -> Vec<BytesMut> {
    let ct = encrypt_all(&c.aes, content);
    let chunks: Vec<&[u8]> = ct.chunks(chunk).collect();
    let total = u16::try_from(chunks.len()).unwrap();
    let mut field = [0u8; NAME_FIELD_LEN];
    field[..name.len()].copy_from_slice(name.as_bytes());
    chunks
        .iter()
        .enumerate()
        .map(|(i, slice)| {
            let mut body = slice.to_vec();
            if let (Some(pad), true) = (habit.pad_to, i + 1 == chunks.len()) {
                body.resize(pad, 0);
            }
            let mut out = BytesMut::new();
            RequestHeader {
                client_id: c.id,
                version: VERSION,
                code: RequestCode::SEND_FILE,
                payload_len: u32::try_from(12 + NAME_FIELD_LEN + body.len()).unwrap(),
            }
            .write(&mut out);
            out.put_u32_le(u32::try_from(ct.len()).unwrap());
            out.put_u32_le(u32::try_from(content.len()).unwrap());
            out.put_u16_le(habit.first + u16::try_from(i).unwrap());
            out.put_u16_le(total);
            out.put_slice(&field);
            out.put_slice(&body);
            out
        })
        .collect()
}

/// Sends the packets; expects the 1603 with our cksum and the real content
/// size, confirms it and expects 1604.
async fn upload_and_confirm(c: &mut Client, name: &str, content: &[u8], packets: &[BytesMut]) {
    for p in packets {
        c.peer.send_raw(p).await;
    }
    match c.peer.recv().await {
        Response::FileReceived {
            content_size,
            cksum,
            file: got,
            ..
        } => {
            assert_eq!(got, file(name));
            assert_eq!(content_size, pkcs7_len(content.len() as u64));
            assert_eq!(cksum, Cksum::of(content), "{name}");
        }
        other => panic!("upload of {name}: {other:?}"),
    }
    c.peer
        .send(c.frame(Request::CrcOk { file: file(name) }))
        .await;
    assert_eq!(c.peer.recv().await, Response::Ack { client_id: c.id });
}

#[tokio::test]
async fn accepts_uploads_numbered_from_zero_or_zero_padded_and_stores_the_content() {
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(config(data.path())).await;
    let mut c = Client::register(server.addr, "deployed", &alice_key(), Numbering::Modern).await;
    // 3000 bytes: 3008 of ciphertext, in 1024-byte chunks the last is 960.
    let cases = [
        ("from-zero.bin", random_bytes(3000, 1), FROM_ZERO),
        ("padded.bin", random_bytes(3000, 2), PADDED),
        (
            "both.bin",
            random_bytes(3000, 3),
            Habit {
                first: 0,
                pad_to: Some(1024),
            },
        ),
        // A single packet numbered 0 (of 1), padded.
        (
            "one.bin",
            random_bytes(100, 4),
            Habit {
                first: 0,
                pad_to: Some(1024),
            },
        ),
    ];
    for (name, content, habit) in &cases {
        let packets = raw_packets(&c, name, content, 1024, *habit);
        upload_and_confirm(&mut c, name, content, &packets).await;
    }
    let id = c.id;
    drop(c);
    server.stop().await.unwrap();
    for (name, content, _) in &cases {
        assert_eq!(
            stored(data.path(), id, &file(name)).as_deref(),
            Some(&content[..]),
            "{name}: the padding is dropped, never decrypted"
        );
    }
}

#[tokio::test]
async fn refuses_a_mix_of_numberings_and_non_zero_bytes_past_the_content_size() {
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(config(data.path())).await;

    // Packet 0, then the 1-based numbers 2 and 3.
    let mut c = Client::register(server.addr, "mixer", &alice_key(), Numbering::Modern).await;
    let local = c.peer.local_addr();
    let content = random_bytes(3000, 5);
    let zero = raw_packets(&c, "m.bin", &content, 1024, FROM_ZERO);
    let one = raw_packets(&c, "m.bin", &content, 1024, SPEC);
    c.peer.send_raw(&zero[0]).await;
    c.peer.send_raw(&one[1]).await;
    c.peer.expect_1607_and_close().await;
    assert_logged(local, "packet 2 arrived where packet 1 was due").await;

    // The last packet padded, but with a non-zero byte in the padding.
    let mut c = Client::register(server.addr, "junk", &alice_key(), Numbering::Modern).await;
    let local = c.peer.local_addr();
    let mut packets = raw_packets(&c, "j.bin", &content, 1024, PADDED);
    let last = packets.last_mut().unwrap();
    let end = last.len() - 1;
    last[end] = 0x01;
    for p in &packets {
        c.peer.send_raw(p).await;
    }
    c.peer.expect_1607_and_close().await;
    assert_logged(local, "more than the declared 3008 bytes").await;

    server.stop().await.unwrap();
}

#[tokio::test]
async fn answers_a_repeated_crc_ok_with_1604_again_and_carries_on() {
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(config(data.path())).await;
    let mut c = Client::register(server.addr, "insistent", &alice_key(), Numbering::Classic).await;
    let content = random_bytes(5000, 6);
    c.store("r.bin", &content, 1024).await;
    // The client resends 900 until it gets what it expects (a 1603).
    for _ in 0..3 {
        c.peer
            .send(c.frame(Request::CrcOk {
                file: file("r.bin"),
            }))
            .await;
        assert_eq!(c.peer.recv().await, Response::Ack { client_id: c.id });
    }
    // The session is still good.
    let next = random_bytes(100, 7);
    c.store("s.bin", &next, 1024).await;
    let id = c.id;
    drop(c);
    server.stop().await.unwrap();
    assert_eq!(stored(data.path(), id, &file("r.bin")).unwrap(), content);
    assert_eq!(stored(data.path(), id, &file("s.bin")).unwrap(), next);
}

#[tokio::test]
async fn strict_legacy_refuses_each_deviation_with_1607() {
    let data = tempfile::tempdir().unwrap();
    let mut cfg = config(data.path());
    cfg.leniency = Leniency::STRICT;
    let server = TestServer::start(cfg).await;
    let content = random_bytes(3000, 8);

    let mut c = Client::register(server.addr, "zero", &alice_key(), Numbering::Modern).await;
    let local = c.peer.local_addr();
    let packets = raw_packets(&c, "z.bin", &content, 1024, FROM_ZERO);
    c.peer.send_raw(&packets[0]).await;
    c.peer.expect_1607_and_close().await;
    assert_logged(local, "packet 0 arrived where packet 1 was due").await;

    let mut c = Client::register(server.addr, "pad", &alice_key(), Numbering::Modern).await;
    let local = c.peer.local_addr();
    for p in &raw_packets(&c, "p.bin", &content, 1024, PADDED) {
        c.peer.send_raw(p).await;
    }
    c.peer.expect_1607_and_close().await;
    assert_logged(local, "more than the declared 3008 bytes").await;

    let mut c = Client::register(server.addr, "again", &alice_key(), Numbering::Modern).await;
    let local = c.peer.local_addr();
    c.store("a.bin", &content, 1024).await;
    c.peer
        .send(c.frame(Request::CrcOk {
            file: file("a.bin"),
        }))
        .await;
    c.peer.expect_1607_and_close().await;
    assert_logged(local, "protocol violation").await;

    // The protocol as written still passes byte for byte.
    let mut c = Client::register(server.addr, "spec", &alice_key(), Numbering::Modern).await;
    let packets = raw_packets(&c, "s.bin", &content, 1024, SPEC);
    upload_and_confirm(&mut c, "s.bin", &content, &packets).await;

    server.stop().await.unwrap();
}
