//! The client side of every recorded legacy session, replayed against our
//! server. The key exchange is fresh, so each recorded attempt's ciphertext
//! is decrypted with the recorded AES key and re-encrypted, block for
//! block and without touching the padding, under the key our server sent.
//! Corrupted attempts therefore stay corrupted in exactly the same bytes.

use std::path::Path;
use std::time::SystemTime;

use aes::cipher::block_padding::NoPadding;
use aes::cipher::{BlockDecryptMut, BlockEncryptMut, KeyIvInit};
use bytes::{Bytes, BytesMut};
use protocol::crypto::{public_key_field, AesKey};
use protocol::keyfile::MeInfo;
use protocol::{ClientCodec, ClientId, FileName, Request, RequestFrame, Response, ServerCodec};
use server::storage::Storage;
use tokio_util::codec::Decoder;

use crate::harness::{config, me_info, stored, vectors_dir, Peer, TestServer};

fn decode_requests(bytes: &[u8]) -> Vec<RequestFrame> {
    let mut codec = ServerCodec::default();
    let mut buf = BytesMut::from(bytes);
    let mut out = Vec::new();
    while let Some(f) = codec.decode(&mut buf).unwrap() {
        out.push(f);
    }
    assert!(buf.is_empty(), "trailing bytes in the recording");
    out
}

fn decode_responses(bytes: &[u8]) -> Vec<Response> {
    let mut codec = ClientCodec::default();
    let mut buf = BytesMut::from(bytes);
    let mut out = Vec::new();
    while let Some(r) = codec.decode(&mut buf).unwrap() {
        out.push(r);
    }
    assert!(buf.is_empty(), "trailing bytes in the recording");
    out
}

/// AES-256-CBC with the legacy zero IV, whole blocks only, no padding.
fn recrypt(from: &AesKey, to: &AesKey, ciphertext: &[u8]) -> Vec<u8> {
    let iv = [0u8; 16];
    let mut buf = ciphertext.to_vec();
    cbc::Decryptor::<aes::Aes256>::new(from.as_bytes().into(), &iv.into())
        .decrypt_padded_mut::<NoPadding>(&mut buf)
        .unwrap();
    let len = buf.len();
    cbc::Encryptor::<aes::Aes256>::new(to.as_bytes().into(), &iv.into())
        .encrypt_padded_mut::<NoPadding>(&mut buf, len)
        .unwrap();
    buf
}

fn wrapped_key(r: &Response) -> Option<&Bytes> {
    match r {
        Response::KeyAccepted { wrapped_key, .. } | Response::Reconnected { wrapped_key, .. } => {
            Some(wrapped_key)
        }
        _ => None,
    }
}

/// Which requests the recorded server answered: every one but the packets
/// before the last of an upload.
fn answered(frame: &RequestFrame) -> bool {
    match &frame.request {
        Request::SendFile(p) => p.head.packet == p.head.total,
        _ => true,
    }
}

struct Replay {
    /// Our server's id for the client.
    client_id: Option<ClientId>,
    file: Option<FileName>,
}

/// Replays `vector`'s connection 1 as `owner` and checks every answer
/// against the recording. With `preseed`, the client is first put in the
/// metadata with its recorded id and public key (the recording starts
/// with a successful reconnect).
async fn replay(vector: &str, owner: &str, preseed: bool) -> (tempfile::TempDir, Replay) {
    let dir_path = vectors_dir().join(vector);
    let requests = decode_requests(&std::fs::read(dir_path.join("conn1.c2s.bin")).unwrap());
    let recorded = decode_responses(&std::fs::read(dir_path.join("conn1.s2c.bin")).unwrap());
    let me: MeInfo = me_info(owner);
    let mut rng = rand::thread_rng();

    let data = tempfile::tempdir().unwrap();
    if preseed {
        let storage = Storage::open_local(data.path()).unwrap();
        storage
            .meta()
            .register(me.client_id, &me.name, SystemTime::now())
            .unwrap();
        let field = public_key_field(&me.key.public_key()).unwrap();
        assert!(storage
            .meta()
            .set_public_key(me.client_id, &field, SystemTime::now())
            .unwrap());
    }
    let server = TestServer::start(config(data.path())).await;
    let mut peer = Peer::connect(server.addr).await;

    let mut next_recorded = recorded.iter();
    let mut recorded_key: Option<AesKey> = None;
    let mut our_key: Option<AesKey> = None;
    let mut recorded_id: Option<ClientId> = None;
    let mut our_id: Option<ClientId> = None;
    let mut attempt: Vec<RequestFrame> = Vec::new();
    let mut file = None;

    for mut frame in requests {
        // Header ids: the id the recorded server assigned becomes ours.
        if recorded_id == Some(frame.client_id) {
            frame.client_id = our_id.unwrap();
        }
        let expects_answer = answered(&frame);
        let to_send: Vec<RequestFrame> = match &frame.request {
            Request::SendFile(p) => {
                file = Some(p.head.file.clone());
                attempt.push(frame.clone());
                if !expects_answer {
                    continue;
                }
                // The whole attempt: re-encrypt its ciphertext, then cut it
                // exactly as recorded.
                let ciphertext: Vec<u8> = attempt
                    .iter()
                    .flat_map(|f| match &f.request {
                        Request::SendFile(p) => p.content.to_vec(),
                        _ => unreachable!(),
                    })
                    .collect();
                let fresh = recrypt(
                    recorded_key.as_ref().unwrap(),
                    our_key.as_ref().unwrap(),
                    &ciphertext,
                );
                let mut offset = 0;
                attempt
                    .drain(..)
                    .map(|mut f| {
                        if let Request::SendFile(p) = &mut f.request {
                            let len = p.content.len();
                            p.content = Bytes::copy_from_slice(&fresh[offset..offset + len]);
                            offset += len;
                        }
                        f
                    })
                    .collect()
            }
            _ => vec![frame.clone()],
        };
        for f in to_send {
            peer.send(f).await;
        }
        assert!(expects_answer);
        let want = next_recorded
            .next()
            .expect("the recording has an answer here");
        let got = peer.recv().await;
        assert_eq!(
            got.code(),
            want.code(),
            "answer to {:?}",
            frame.request.kind()
        );

        if let (
            Response::Registered { client_id: ours },
            Response::Registered { client_id: theirs },
        ) = (&got, want)
        {
            our_id = Some(*ours);
            recorded_id = Some(*theirs);
        }
        if let (Some(ours), Some(theirs)) = (wrapped_key(&got), wrapped_key(want)) {
            our_key = Some(me.key.unwrap_aes_key(&mut rng, ours).unwrap());
            recorded_key = Some(me.key.unwrap_aes_key(&mut rng, theirs).unwrap());
            if let Response::Reconnected { client_id, .. } = &got {
                assert_eq!(*client_id, me.client_id, "1605 carries the reconnecting id");
                our_id = Some(*client_id);
                recorded_id = Some(*client_id);
            }
        }
        match (&got, want) {
            (
                Response::FileReceived {
                    content_size,
                    file,
                    cksum,
                    ..
                },
                Response::FileReceived {
                    content_size: c2,
                    file: f2,
                    cksum: k2,
                    ..
                },
            ) => {
                // Same plaintext (corruption included) gives the same cksum.
                assert_eq!((content_size, file, cksum), (c2, f2, k2));
            }
            (Response::Ack { client_id }, _) | (Response::FileReceived { client_id, .. }, _) => {
                assert_eq!(Some(*client_id), our_id);
            }
            (Response::ReconnectRejected { client_id }, _) => {
                assert_eq!(
                    *client_id,
                    Some(frame.client_id),
                    "1606 echoes the header id"
                );
            }
            _ => {}
        }
    }
    assert!(
        next_recorded.next().is_none(),
        "the recording has answers we never got"
    );
    drop(peer);
    server.stop().await.unwrap();
    (
        data,
        Replay {
            client_id: our_id,
            file,
        },
    )
}

fn plaintext(owner: &str, name: &str) -> Vec<u8> {
    std::fs::read(vectors_dir().join("keys").join(owner).join(name)).unwrap()
}

fn stored_file(data: &Path, r: &Replay) -> Option<Vec<u8>> {
    stored(data, r.client_id.unwrap(), r.file.as_ref().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_first_registration_825() {
    let (data, r) = replay("reefjo-825-v3", "alice", false).await;
    assert_ne!(
        r.client_id,
        Some(me_info("alice").client_id),
        "the server assigns a new id"
    );
    assert_eq!(
        stored_file(data.path(), &r).unwrap(),
        plaintext("alice", "sample.bin")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_registration_1025() {
    let (data, r) = replay("renumbered-1025-from-reefjo", "carol", false).await;
    assert_eq!(
        stored_file(data.path(), &r).unwrap(),
        plaintext("carol", "small.bin")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_reconnect_825() {
    let (data, r) = replay("reefjo-825-v3-reconnect", "alice", true).await;
    assert_eq!(
        stored_file(data.path(), &r).unwrap(),
        plaintext("alice", "sample.bin")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_crc_retry_and_commits_the_good_resend() {
    let (data, r) = replay("reefjo-825-v3-crc-retry", "alice", true).await;
    assert_eq!(
        stored_file(data.path(), &r).unwrap(),
        plaintext("alice", "sample.bin")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_crc_abort_and_commits_nothing() {
    let (data, r) = replay("reefjo-825-v3-crc-abort", "alice", true).await;
    assert_eq!(stored_file(data.path(), &r), None);
    assert!(crate::harness::temp_files(data.path()).is_empty());
}
