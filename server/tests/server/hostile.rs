//! File names from the network are labels, never paths.

use bytes::{BufMut, BytesMut};
use protocol::name::NAME_FIELD_LEN;
use protocol::wire::{RequestCode, RequestHeader, VERSION};
use protocol::{FileName, Numbering, Request, Response};
use server::storage::Storage;

use crate::harness::{
    alice_key, assert_metadata_matches_disk, assert_only_database_and_blobs, config, file,
    files_under, Client, TestServer,
};

const HOSTILE: &[&str] = &[
    "../../etc/passwd",
    "../../../../../../../../../../tmp/escaped",
    "/etc/passwd",
    "/tmp/absolute",
    "C:\\Users\\x\\file.doc",
    "..\\..\\windows\\win.ini",
    "\\\\server\\share\\file",
    "dir/sub/file.txt",
    "a/../../b",
    "..",
    ".",
    "./",
    "~/.ssh/authorized_keys",
    "$HOME/x",
    "%APPDATA%\\x",
    "CON",
    "nul.txt",
    "file:stream:$DATA",
    "*?<>|\"",
    "clients",
    "blobs/../tmp",
    "backup.db",
    " leading and trailing ",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeps_hostile_names_inside_the_clients_folder() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    let outside = root.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("victim"), b"untouched").unwrap();
    let server = TestServer::start(config(&data)).await;
    let mut c = Client::register(server.addr, "mallory", &alice_key(), Numbering::Classic).await;

    let mut names: Vec<Vec<u8>> = HOSTILE.iter().map(|n| n.as_bytes().to_vec()).collect();
    names.push(vec![b'A'; 254]);
    names.push("ünïcödé/../../x".as_bytes().to_vec());
    names.push(vec![0xff, 0xfe, b'/', b'.', b'.']);
    for (i, raw) in names.iter().enumerate() {
        let name = FileName::new(raw.clone()).unwrap();
        let content = format!("content {i}").into_bytes();
        c.store_name(&name, &content).await;
    }

    // A name with a NUL inside: the field ends at the first NUL, so this
    // is the name "nul" whatever follows.
    let mut field = BytesMut::new();
    field.put_slice(b"nul\0/../../../../escape");
    field.resize(NAME_FIELD_LEN, 0);
    let plain = b"nul-content";
    let ct = protocol::crypto::encrypt_all(&c.aes, plain);
    let mut raw = BytesMut::new();
    RequestHeader {
        client_id: c.id,
        version: VERSION,
        code: RequestCode::of(protocol::wire::RequestKind::SendFile, Numbering::Classic),
        payload_len: u32::try_from(267 + ct.len()).unwrap(),
    }
    .write(&mut raw);
    raw.put_u32_le(u32::try_from(ct.len()).unwrap());
    raw.put_u32_le(u32::try_from(plain.len()).unwrap());
    raw.put_u16_le(1);
    raw.put_u16_le(1);
    raw.put_slice(&field);
    raw.put_slice(&ct);
    c.peer.send_raw(&raw).await;
    let Response::FileReceived { file: got, .. } = c.peer.recv().await else {
        panic!("1603 expected")
    };
    assert_eq!(got.as_bytes(), b"nul");
    c.peer.send(c.frame(Request::CrcOk { file: got })).await;
    assert!(matches!(c.peer.recv().await, Response::Ack { .. }));

    // A second client using the first one's folder name as a file name.
    let mut other = Client::register(server.addr, "trudy", &alice_key(), Numbering::Modern).await;
    let sneaky = format!("../{}/blobs/x", c.id.to_hex());
    other.store_name(&file(&sneaky), b"trudy's").await;
    server.stop().await.unwrap();

    // Nothing appeared outside the data directory.
    let mut outside_now = files_under(root.path());
    outside_now.retain(|p| !p.starts_with("data"));
    assert_eq!(
        outside_now,
        vec![std::path::PathBuf::from("outside/victim")]
    );
    assert_eq!(std::fs::read(outside.join("victim")).unwrap(), b"untouched");
    assert!(!std::path::Path::new("/tmp/escaped").exists());
    // Inside it, only the database and generated blob paths.
    assert_only_database_and_blobs(&data);
    assert_metadata_matches_disk(&data);
    // Every name is kept exactly as sent, with its own content.
    let storage = Storage::open_local(&data).unwrap();
    for (i, raw) in names.iter().enumerate() {
        let name = FileName::new(raw.clone()).unwrap();
        let content = storage.read_latest(c.id, &name).unwrap();
        assert_eq!(
            content,
            Some(format!("content {i}").into_bytes()),
            "{name:?}"
        );
    }
    assert_eq!(
        storage.read_latest(c.id, &file("nul")).unwrap().unwrap(),
        plain
    );
    assert_eq!(
        storage
            .read_latest(other.id, &file(&sneaky))
            .unwrap()
            .unwrap(),
        b"trudy's"
    );
    // Small files are kept in the database; each client's other blobs are
    // in its own folder.
    for v in storage.meta().all_versions().unwrap() {
        assert_eq!(
            v.blob.is_inline(),
            v.size <= server::storage::INLINE_MAX,
            "{}",
            v.blob
        );
        assert!(
            v.blob.is_inline()
                || v.blob
                    .0
                    .starts_with(&format!("clients/{}/blobs/", v.client.to_hex())),
            "{}",
            v.blob
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejects_a_name_field_without_terminator() {
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(config(data.path())).await;
    let mut c = Client::register(server.addr, "victor", &alice_key(), Numbering::Modern).await;
    let local = c.peer.local_addr();
    let mut raw = BytesMut::new();
    RequestHeader {
        client_id: c.id,
        version: VERSION,
        code: RequestCode::CRC_OK,
        payload_len: 255,
    }
    .write(&mut raw);
    raw.put_bytes(b'A', NAME_FIELD_LEN);
    c.peer.send_raw(&raw).await;
    c.peer.expect_1607_and_close().await;
    crate::harness::assert_logged(local, "no NUL terminator").await;
    server.stop().await.unwrap();
}

impl Client {
    /// Uploads under an arbitrary (already validated) name and confirms.
    async fn store_name(&mut self, name: &FileName, content: &[u8]) {
        match self.send_file(name, content, 1024).await {
            Response::FileReceived { file, cksum, .. } => {
                assert_eq!(&file, name);
                assert_eq!(cksum, protocol::Cksum::of(content));
            }
            other => panic!("upload of {name:?}: {other:?}"),
        }
        self.peer
            .send(self.frame(Request::CrcOk { file: name.clone() }))
            .await;
        assert!(matches!(self.peer.recv().await, Response::Ack { .. }));
    }
}
