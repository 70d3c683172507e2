//! The client against servers with the behaviours of deployed legacy servers
//! (silent after "CRC wrong", 1607 answers, 1606 without an id, pre-registered
//! legacy clients, the other request numbering, big-endian headers, a 1604
//! that declares 255 bytes, one `recv()` per request), imitated by a fake
//! server built on the protocol crate or, where the protocol crate cannot
//! write the bytes, by raw bytes; and a legacy server met in secure mode.

mod support;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use client::identity::IdentityStore;
use client::settings::{Options, PacketSize};
use client::{files, BackupItem, Client, Error, Outcome};
use protocol::crypto::public_key_field;
use protocol::wire::RequestKind;
use protocol::{Numbering, UserName};
use support::fake_server::{FakeServer, Quirks};
use support::real_server::RealServer;
use support::relay::Relay;
use support::{vector_keys, write_file, STEP};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn client(server: &str, identity_dir: &Path) -> Client {
    let mut options = Options::new(server);
    options.legacy = true;
    options.timeout = STEP;
    Client::new(options, IdentityStore::new(identity_dir))
}

fn items(paths: &[&Path]) -> Vec<BackupItem> {
    let listed = files::collect(&paths.iter().map(|p| p.to_path_buf()).collect::<Vec<_>>());
    assert!(listed.errors.is_empty(), "{:?}", listed.errors);
    listed.items
}

fn bob() -> UserName {
    UserName::try_from("bob").unwrap()
}

fn count(codes: &[u16], code: u16) -> usize {
    codes.iter().filter(|&&c| c == code).count()
}

/// Copies a legacy client's me.info and priv.key into `dir`.
fn copy_legacy_identity(who: &str, dir: &Path) {
    for f in ["me.info", "priv.key"] {
        std::fs::copy(vector_keys(who).join(f), dir.join(f)).unwrap();
    }
}

#[tokio::test]
async fn round_trips_files_and_reconnects_in_a_later_run() {
    let server = FakeServer::start(Quirks::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let data = write_file(&dir.path().join("a.bin"), 100_000, 1);
    let c = client(&server.server(), &dir.path().join("id"));
    let report = c
        .backup(items(&[&dir.path().join("a.bin")]), Some(&bob()))
        .await
        .unwrap();
    assert_eq!(report.exit_code(), 0, "{:?}", report.first_error());
    assert!(report.registered);
    let id = report.client_id.unwrap();
    assert_eq!(server.file(id, "a.bin").unwrap(), data);

    let again = client(&server.server(), &dir.path().join("id"));
    let report = again
        .backup(items(&[&dir.path().join("a.bin")]), None)
        .await
        .unwrap();
    assert_eq!(report.exit_code(), 0);
    assert!(!report.registered);
    assert_eq!(report.client_id, Some(id));
    assert_eq!(server.codes(), [1025, 1026, 1028, 1029, 1027, 1028, 1029]);
}

#[tokio::test]
async fn retries_a_request_answered_with_1607_then_succeeds() {
    let quirks = Quirks {
        general_errors: HashMap::from([(RequestKind::Register, 2)]),
        ..Quirks::default()
    };
    let server = FakeServer::start(quirks).await;
    let dir = tempfile::tempdir().unwrap();
    let identity = client(&server.server(), dir.path())
        .register(bob(), false)
        .await
        .unwrap();
    assert_eq!(count(&server.codes(), 1025), 3);
    assert!(server
        .state
        .lock()
        .unwrap()
        .clients
        .contains_key(&identity.client_id));
}

#[tokio::test]
async fn suggests_the_other_numbering_when_the_first_register_gets_only_1607() {
    let quirks = Quirks {
        general_errors: HashMap::from([(RequestKind::Register, 100)]),
        ..Quirks::default()
    };
    let server = FakeServer::start(quirks).await;
    let dir = tempfile::tempdir().unwrap();
    let err = client(&server.server(), dir.path())
        .register(bob(), false)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::OtherNumbering {
                times: 4,
                try_codes: 825,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(err.exit_code(), 4);
    let text = err.to_string();
    assert!(text.contains(&server.server()), "{text}");
    assert!(text.contains("--codes 825"), "{text}");
    assert!(!text.contains("disk space"), "{text}");
    assert_eq!(
        count(&server.codes(), 1025),
        4,
        "one request and three retries"
    );
    assert!(!dir.path().join("me.info").exists());
}

#[tokio::test]
async fn suggests_the_numbering_the_server_knows_for_register_and_reconnect() {
    // An 825 server met with 1025 codes: the register.
    let server = FakeServer::start(Quirks {
        numbering_only: Some(Numbering::Classic),
        ..Quirks::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let err = client(&server.server(), &dir.path().join("a"))
        .register(bob(), false)
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::OtherNumbering { try_codes: 825, .. }),
        "{err}"
    );
    // With the numbering suggested, it works.
    let mut options = Options::new(server.server());
    options.legacy = true;
    options.numbering = Numbering::Classic;
    options.timeout = STEP;
    Client::new(options, IdentityStore::new(dir.path().join("a")))
        .register(bob(), false)
        .await
        .unwrap();

    // A 1025 server met with 825 codes: the reconnect of a legacy client.
    let server = FakeServer::start(Quirks {
        numbering_only: Some(Numbering::Modern),
        ..Quirks::default()
    })
    .await;
    copy_legacy_identity("alice", dir.path());
    let mut options = Options::new(server.server());
    options.legacy = true;
    options.numbering = Numbering::Classic;
    options.timeout = STEP;
    let sample = vector_keys("alice").join("sample.bin");
    let err = Client::new(options, IdentityStore::new(dir.path()))
        .backup(items(&[&sample]), None)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::OtherNumbering {
                try_codes: 1025,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("--codes 1025"), "{err}");
    assert_eq!(server.codes(), [827, 827, 827, 827]);
}

#[tokio::test]
async fn blames_the_server_not_the_numbering_when_1607_follows_other_answers() {
    // 1606 to the reconnect, then 1607 to every registration.
    let server = FakeServer::start(Quirks {
        reject_without_id: true,
        general_errors: HashMap::from([(RequestKind::Register, 100)]),
        ..Quirks::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    copy_legacy_identity("alice", dir.path());
    write_file(&dir.path().join("f.txt"), 20, 6);
    let err = client(&server.server(), dir.path())
        .backup(items(&[&dir.path().join("f.txt")]), None)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::ServerFailed { times: 4, .. }), "{err}");
    assert!(err.to_string().contains("disk space"), "{err}");
    assert_eq!(err.exit_code(), 4);
    assert_eq!(server.codes(), [1027, 1025, 1025, 1025, 1025]);
}

/// A server that answers every request with `answer`, raw, recording the
/// first byte of each connection.
async fn raw_server(answer: Vec<u8>) -> (String, Arc<Mutex<Vec<u8>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let firsts = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&firsts);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let answer = answer.clone();
            let seen = Arc::clone(&seen);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                // A request is at least a 23-byte header.
                let mut got = 0;
                while got < 23 {
                    match stream.read(&mut buf[got..]).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got += n,
                    }
                }
                seen.lock().unwrap().push(buf[0]);
                let _ = stream.write_all(&answer).await;
                let _ = stream.shutdown().await;
                // Drain, so that the close is not a reset.
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
            });
        }
    });
    (addr, firsts)
}

#[tokio::test]
async fn says_a_big_endian_server_cannot_interoperate() {
    // 1607, and 1600 with an id, with code and size written big-endian.
    let mut registered = vec![3u8, 0x06, 0x40, 0, 0, 0, 16];
    registered.extend_from_slice(&[0x42; 16]);
    for (answer, code, swapped) in [
        (vec![3u8, 0x06, 0x47, 0, 0, 0, 0], 18182u16, 1607u16),
        (registered, 16390, 1600),
    ] {
        let (addr, _) = raw_server(answer).await;
        let dir = tempfile::tempdir().unwrap();
        let err = client(&addr, dir.path())
            .register(bob(), false)
            .await
            .unwrap_err();
        assert!(
            matches!(err, Error::BigEndian { code: c, swapped: s, .. } if c == code && s == swapped),
            "{err}"
        );
        let text = err.to_string();
        assert!(text.contains("big-endian"), "{text}");
        assert!(text.contains(&format!("{code}")), "{text}");
        assert!(text.contains(&format!("{swapped}")), "{text}");
        assert_eq!(err.exit_code(), 1);
    }
}

/// Keeps the notices of a run.
#[derive(Default)]
struct Notices(Mutex<Vec<String>>);

impl client::feedback::Feedback for Notices {
    fn notice(&self, message: &str) {
        self.0.lock().unwrap().push(message.to_owned());
    }
}

#[tokio::test]
async fn accepts_a_1604_declaring_255_bytes_with_our_id_and_says_so() {
    let server = FakeServer::start(Quirks {
        ack_declares: Some(255),
        ..Quirks::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let a = write_file(&dir.path().join("a.bin"), 3000, 11);
    let b = write_file(&dir.path().join("b.bin"), 10, 12);
    let notices = Arc::new(Notices::default());
    let mut options = Options::new(server.server());
    options.legacy = true;
    options.connections = 1;
    options.timeout = STEP;
    let c = Client::new(options, IdentityStore::new(dir.path().join("id")))
        .with_feedback(notices.clone());
    let report = c
        .backup(
            items(&[&dir.path().join("a.bin"), &dir.path().join("b.bin")]),
            Some(&bob()),
        )
        .await
        .unwrap();
    assert_eq!(report.exit_code(), 0, "{:?}", report.first_error());
    let id = report.client_id.unwrap();
    assert_eq!(server.file(id, "a.bin").unwrap(), a);
    assert_eq!(server.file(id, "b.bin").unwrap(), b);
    assert_eq!(server.codes(), [1025, 1026, 1028, 1029, 1028, 1029]);
    let said = notices.0.lock().unwrap().clone();
    let warnings: Vec<_> = said
        .iter()
        .filter(|n| n.contains("declaring 255 bytes"))
        .collect();
    assert_eq!(warnings.len(), 2, "one per file: {said:?}");

    // The same 1604 with another client's id is refused.
    let server = FakeServer::start(Quirks {
        ack_declares: Some(255),
        ack_wrong_id: true,
        ..Quirks::default()
    })
    .await;
    let report = client(&server.server(), &dir.path().join("id2"))
        .backup(items(&[&dir.path().join("a.bin")]), Some(&bob()))
        .await
        .unwrap();
    let err = report.first_error().unwrap();
    assert!(matches!(err, Error::Protocol { .. }), "{err}");
    assert_eq!(report.exit_code(), 1);
}

/// Backs up a 5000-byte file in 1024-byte packets to a server that reads
/// each request with one recv(), with `gap` between packets.
async fn backup_to_one_recv_server(
    gap: Option<Duration>,
) -> (FakeServer, client::RunReport, Vec<u8>) {
    let server = FakeServer::start(Quirks {
        one_recv_per_request: Some(Duration::from_millis(20)),
        ..Quirks::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let data = write_file(&dir.path().join("f.bin"), 5000, 13);
    let mut options = Options::new(server.server());
    options.legacy = true;
    options.packet_size = PacketSize::Fixed(1024);
    options.packet_gap = gap;
    options.timeout = Duration::from_secs(2);
    let report = Client::new(options, IdentityStore::new(dir.path().join("id")))
        .backup(items(&[&dir.path().join("f.bin")]), Some(&bob()))
        .await
        .unwrap();
    (server, report, data)
}

#[tokio::test]
async fn paces_packets_for_a_server_that_reads_each_request_with_one_recv() {
    let (server, report, data) = backup_to_one_recv_server(Some(Duration::from_millis(100))).await;
    assert_eq!(report.exit_code(), 0, "{:?}", report.first_error());
    assert_eq!(server.state.lock().unwrap().lost_bytes, 0);
    assert_eq!(
        server.state.lock().unwrap().packet_lens,
        [1024, 1024, 1024, 1024, 912]
    );
    assert_eq!(
        server.file(report.client_id.unwrap(), "f.bin").unwrap(),
        data
    );

    // Without the gap, the packets reach that server's one read together
    // and all but the first are lost.
    let (server, report, _) = backup_to_one_recv_server(None).await;
    assert_ne!(report.exit_code(), 0);
    assert!(server.state.lock().unwrap().lost_bytes > 0);
}

#[test]
fn packet_gap_needs_a_packet_size() {
    let parse = |args: &[&str]| <client::cli::Cli as clap::Parser>::try_parse_from(args);
    assert!(parse(&["backup-client", "--legacy", "--packet-gap", "50"]).is_err());
    let cli = parse(&[
        "backup-client",
        "--legacy",
        "--packet-size",
        "8192",
        "--packet-gap",
        "50",
    ])
    .unwrap();
    assert_eq!(cli.global.packet_gap, Some(50));
    let help = <client::cli::Cli as clap::CommandFactory>::command()
        .render_long_help()
        .to_string();
    assert!(help.contains("--packet-gap"), "{help}");
    assert!(help.contains("one recv()"), "{help}");
    assert!(
        help.contains("A legacy server needs --legacy"),
        "folder mode says so: {help}"
    );
}

#[tokio::test]
async fn resends_a_file_the_server_failed_to_store() {
    let server = FakeServer::start(Quirks {
        failed_uploads: 1,
        ..Quirks::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let data = write_file(&dir.path().join("f.bin"), 3000, 2);
    let c = client(&server.server(), &dir.path().join("id"));
    let report = c
        .backup(items(&[&dir.path().join("f.bin")]), Some(&bob()))
        .await
        .unwrap();
    assert_eq!(report.exit_code(), 0, "{:?}", report.first_error());
    assert!(
        matches!(report.files[0].outcome, Outcome::Stored { attempts: 1, .. }),
        "a 1607 is not a cksum attempt"
    );
    assert_eq!(count(&server.codes(), 1028), 2);
    assert_eq!(
        server.file(report.client_id.unwrap(), "f.bin").unwrap(),
        data
    );
}

#[tokio::test]
async fn gives_up_on_a_file_the_server_keeps_failing_to_store() {
    let server = FakeServer::start(Quirks {
        failed_uploads: 100,
        ..Quirks::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    write_file(&dir.path().join("f.bin"), 3000, 2);
    let c = client(&server.server(), &dir.path().join("id"));
    let report = c
        .backup(items(&[&dir.path().join("f.bin")]), Some(&bob()))
        .await
        .unwrap();
    let err = report.first_error().unwrap();
    assert!(matches!(err, Error::ServerFailed { times: 4, .. }), "{err}");
    assert!(err.to_string().contains("f.bin"), "{err}");
    assert_eq!(report.exit_code(), 4);
    assert_eq!(
        count(&server.codes(), 1028),
        4,
        "the file and three resends"
    );
    assert_eq!(
        count(&server.codes(), 1030),
        0,
        "a server failure is not a cksum mismatch"
    );
}

#[tokio::test]
async fn resends_after_a_mismatch_whether_or_not_the_server_acks_crc_wrong() {
    for silent in [false, true] {
        let server = FakeServer::start(Quirks {
            silent_after_crc_retry: silent,
            ..Quirks::default()
        })
        .await;
        let relay = Relay::start(server.addr, 1).await;
        let dir = tempfile::tempdir().unwrap();
        let data = write_file(&dir.path().join("f.bin"), 50_000, 3);
        let c = client(&relay.addr.to_string(), &dir.path().join("id"));
        let report = c
            .backup(items(&[&dir.path().join("f.bin")]), Some(&bob()))
            .await
            .unwrap();
        assert_eq!(
            report.exit_code(),
            0,
            "silent {silent}: {:?}",
            report.first_error()
        );
        assert!(matches!(
            report.files[0].outcome,
            Outcome::Stored { attempts: 2, .. }
        ));
        assert_eq!(
            server.codes(),
            [1025, 1026, 1028, 1030, 1028, 1029],
            "silent {silent}"
        );
        assert_eq!(
            server.file(report.client_id.unwrap(), "f.bin").unwrap(),
            data
        );
    }
}

#[tokio::test]
async fn gives_up_after_four_mismatches_and_reports_the_file() {
    let server = FakeServer::start(Quirks {
        silent_after_crc_retry: true,
        ..Quirks::default()
    })
    .await;
    let relay = Relay::start(server.addr, u32::MAX).await;
    let dir = tempfile::tempdir().unwrap();
    write_file(&dir.path().join("bad.bin"), 1000, 4);
    let good = write_file(&dir.path().join("good.bin"), 10, 5);
    let c = client(&relay.addr.to_string(), &dir.path().join("id"));
    let report = c
        .backup(items(&[&dir.path().join("bad.bin")]), Some(&bob()))
        .await
        .unwrap();
    let err = report.first_error().unwrap();
    assert!(
        matches!(err, Error::Verification { attempts: 4, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("bad.bin"), "{err}");
    assert_eq!(report.exit_code(), 5);
    let codes = server.codes();
    assert_eq!(
        (
            count(&codes, 1028),
            count(&codes, 1030),
            count(&codes, 1031)
        ),
        (4, 3, 1)
    );
    assert_eq!(server.file(report.client_id.unwrap(), "bad.bin"), None);
    assert_eq!(relay.flipped.load(std::sync::atomic::Ordering::SeqCst), 4);
    drop(relay);
    // The session survives a verification failure: the next run is fine.
    let c = client(&server.server(), &dir.path().join("id"));
    let report = c
        .backup(items(&[&dir.path().join("good.bin")]), None)
        .await
        .unwrap();
    assert_eq!(report.exit_code(), 0);
    assert_eq!(
        server.file(report.client_id.unwrap(), "good.bin").unwrap(),
        good
    );
}

#[tokio::test]
async fn reconnects_with_the_me_info_of_a_legacy_client() {
    let server = FakeServer::start(Quirks::default()).await;
    let dir = tempfile::tempdir().unwrap();
    copy_legacy_identity("alice", dir.path());
    let original = std::fs::read(dir.path().join("me.info")).unwrap();
    let alice = IdentityStore::new(dir.path()).load().unwrap().unwrap();
    server.preregister(
        alice.client_id,
        alice.name.clone(),
        public_key_field(&alice.key.public_key()).unwrap(),
    );

    let sample = vector_keys("alice").join("sample.bin");
    let c = client(&server.server(), dir.path());
    let report = c.backup(items(&[&sample]), None).await.unwrap();
    assert_eq!(report.exit_code(), 0, "{:?}", report.first_error());
    assert!(!report.registered);
    assert_eq!(report.client_id, Some(alice.client_id));
    assert_eq!(server.codes(), [1027, 1028, 1029]);
    assert_eq!(
        server.file(alice.client_id, "sample.bin").unwrap(),
        std::fs::read(&sample).unwrap()
    );
    assert_eq!(
        std::fs::read(dir.path().join("me.info")).unwrap(),
        original,
        "a reconnect leaves me.info alone"
    );
}

#[tokio::test]
async fn registers_anew_with_a_new_key_when_the_server_answers_1606_without_an_id() {
    let server = FakeServer::start(Quirks {
        reject_without_id: true,
        ..Quirks::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    copy_legacy_identity("alice", dir.path());
    let old = IdentityStore::new(dir.path()).load().unwrap().unwrap();
    let data = write_file(&dir.path().join("f.txt"), 20, 6);
    let c = client(&server.server(), dir.path());
    let report = c
        .backup(items(&[&dir.path().join("f.txt")]), None)
        .await
        .unwrap();
    assert_eq!(report.exit_code(), 0, "{:?}", report.first_error());
    assert!(report.registered);
    assert_eq!(server.codes(), [1027, 1025, 1026, 1028, 1029]);
    let new = IdentityStore::new(dir.path()).load().unwrap().unwrap();
    assert_eq!(new.name, old.name);
    assert_ne!(new.client_id, old.client_id);
    assert_ne!(new.key, old.key, "a new RSA pair");
    assert_eq!(report.client_id, Some(new.client_id));
    assert_eq!(server.file(new.client_id, "f.txt").unwrap(), data);
}

#[tokio::test]
async fn speaks_the_825_numbering_when_asked() {
    let server = FakeServer::start(Quirks::default()).await;
    let relay = Relay::start(server.addr, 1).await;
    let dir = tempfile::tempdir().unwrap();
    write_file(&dir.path().join("f.bin"), 100, 7);
    let mut options = Options::new(relay.addr.to_string());
    options.legacy = true;
    options.numbering = Numbering::Classic;
    options.timeout = STEP;
    let c = Client::new(options, IdentityStore::new(dir.path().join("id")));
    let report = c
        .backup(items(&[&dir.path().join("f.bin")]), Some(&bob()))
        .await
        .unwrap();
    assert_eq!(report.exit_code(), 0);
    assert_eq!(server.codes(), [825, 826, 828, 901, 828, 900]);
}

#[tokio::test]
async fn keeps_a_fixed_packet_size() {
    let server = FakeServer::start(Quirks::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let data = write_file(&dir.path().join("f.bin"), 5000, 8);
    let mut options = Options::new(server.server());
    options.legacy = true;
    options.packet_size = PacketSize::Fixed(1024);
    let c = Client::new(options, IdentityStore::new(dir.path().join("id")));
    let report = c
        .backup(items(&[&dir.path().join("f.bin")]), Some(&bob()))
        .await
        .unwrap();
    assert_eq!(report.exit_code(), 0);
    assert_eq!(
        server.state.lock().unwrap().packet_lens,
        [1024, 1024, 1024, 1024, 912]
    );
    assert_eq!(
        server.file(report.client_id.unwrap(), "f.bin").unwrap(),
        data
    );
}

#[tokio::test]
async fn refuses_files_too_large_for_the_legacy_fields_before_sending_them() {
    let server = FakeServer::start(Quirks::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let huge = dir.path().join("huge.bin");
    std::fs::File::create(&huge)
        .unwrap()
        .set_len(protocol::session::client::UploadPlan::MAX_FILE_SIZE + 1)
        .unwrap();
    let many = dir.path().join("many.bin");
    std::fs::File::create(&many)
        .unwrap()
        .set_len(1024 * 65535)
        .unwrap();
    let small = write_file(&dir.path().join("small.bin"), 10, 9);
    let mut options = Options::new(server.server());
    options.legacy = true;
    options.packet_size = PacketSize::Fixed(1024);
    let c = Client::new(options, IdentityStore::new(dir.path().join("id")));
    let report = c
        .backup(
            items(&[&huge, &many, &dir.path().join("small.bin")]),
            Some(&bob()),
        )
        .await
        .unwrap();
    assert!(matches!(
        report.files[0].outcome,
        Outcome::Failed(Error::TooLarge { .. })
    ));
    assert!(matches!(
        report.files[1].outcome,
        Outcome::Failed(Error::TooManyPackets {
            packet_size: 1024,
            ..
        })
    ));
    assert!(report.files[1]
        .error()
        .unwrap()
        .to_string()
        .contains("--packet-size"));
    assert!(report.files[2].is_stored());
    assert_eq!(report.exit_code(), 6);
    assert_eq!(
        server.state.lock().unwrap().packet_lens,
        [16],
        "only the small file was sent"
    );
    assert_eq!(
        server.file(report.client_id.unwrap(), "small.bin").unwrap(),
        small
    );
}

#[tokio::test]
async fn legacy_folder_registers_then_reconnects_through_the_cli() {
    let server = FakeServer::start(Quirks::default()).await;
    let folder = tempfile::tempdir().unwrap();
    let config = tempfile::tempdir().unwrap();
    let data = write_file(&folder.path().join("New_product_spec.docx"), 20_000, 10);
    std::fs::write(
        folder.path().join("transfer.info"),
        format!(
            "{}\nMichael Jackson\nNew_product_spec.docx\n",
            server.server()
        ),
    )
    .unwrap();
    let args = [
        "backup-client",
        "--quiet",
        "--legacy",
        "--config-dir",
        config.path().to_str().unwrap(),
    ];
    for run in 0..2 {
        let cli = <client::cli::Cli as clap::Parser>::try_parse_from(args).unwrap();
        assert_eq!(client::cli::run(cli, folder.path()).await, 0, "run {run}");
    }
    assert_eq!(server.codes(), [1025, 1026, 1028, 1029, 1027, 1028, 1029]);
    let me = IdentityStore::new(folder.path()).load().unwrap().unwrap();
    assert_eq!(me.name.to_string(), "Michael Jackson");
    assert_eq!(
        server.file(me.client_id, "New_product_spec.docx").unwrap(),
        data
    );
    #[cfg(unix)]
    for f in ["me.info", "priv.key"] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(folder.path().join(f))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{f}");
    }
    assert!(
        !config.path().join("me.info").exists(),
        "a legacy folder keeps its own identity"
    );
}

#[tokio::test]
async fn folder_mode_without_legacy_names_a_legacy_server_and_never_falls_back() {
    // A deployed server answers the TLS ClientHello, as a request it cannot
    // parse, with 1607.
    let (addr, firsts) = raw_server(vec![3, 0x47, 0x06, 0, 0, 0, 0]).await;
    let folder = tempfile::tempdir().unwrap();
    let config = tempfile::tempdir().unwrap();
    write_file(&folder.path().join("f.bin"), 100, 14);
    std::fs::write(
        folder.path().join("transfer.info"),
        format!("{addr}\nMichael Jackson\nf.bin\n"),
    )
    .unwrap();
    let args = [
        "backup-client",
        "--quiet",
        "--config-dir",
        config.path().to_str().unwrap(),
    ];
    let cli = <client::cli::Cli as clap::Parser>::try_parse_from(args).unwrap();
    assert_eq!(client::cli::run(cli, folder.path()).await, 2);
    assert_eq!(
        *firsts.lock().unwrap(),
        [0x16],
        "one connection, and only a TLS handshake on it"
    );
    assert!(!folder.path().join("me.info").exists());

    // What it says, against the deployed bytes and against our own
    // server's legacy listener.
    let real = RealServer::start().await;
    for server in [addr, real.addr.to_string()] {
        let dir = tempfile::tempdir().unwrap();
        let mut options = Options::new(server.clone());
        options.timeout = STEP;
        let err = Client::new(options, IdentityStore::new(dir.path()))
            .register(bob(), false)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::LegacyServer { .. }), "{server}: {err}");
        let text = err.to_string();
        assert!(text.contains("is a legacy (version 3) server"), "{text}");
        assert!(text.contains("--legacy"), "{text}");
        assert!(text.contains("insecure"), "{text}");
        assert_eq!(err.exit_code(), 2);
    }
}
