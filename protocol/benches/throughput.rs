//! Throughput of the per-byte work a file upload costs: cksum, AES-256-CBC
//! both ways through the streaming types, and the file-packet codecs.
//!
//! `cargo bench -p backup-protocol` prints MB/s for each (criterion's
//! `Throughput::Bytes`). Inputs are fed in 64 KiB pieces, as a file is read.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use protocol::crypto::{AesKey, CbcDecryptor, CbcEncryptor, BLOCK};
use protocol::{
    Cksum, ClientCodec, ClientId, FileName, FilePacket, Numbering, PacketHead, Request,
    RequestFrame, ServerCodec,
};
use tokio_util::codec::{Decoder, Encoder};

const MIB: usize = 1024 * 1024;
const SIZES: [usize; 2] = [MIB, 64 * MIB];
const PIECE: usize = 64 * 1024;

fn data(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x1234_5678;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

fn key() -> AesKey {
    AesKey::from_bytes([0x42; 32])
}

fn label(len: usize) -> String {
    format!("{} MiB", len / MIB)
}

fn cksum(c: &mut Criterion) {
    let mut group = c.benchmark_group("cksum");
    for len in SIZES {
        let input = data(len);
        group.throughput(Throughput::Bytes(len as u64));
        group.bench_with_input(
            BenchmarkId::from_parameter(label(len)),
            &input,
            |b, input| {
                b.iter(|| {
                    let mut c = Cksum::new();
                    for piece in input.chunks(PIECE) {
                        c.update(piece);
                    }
                    black_box(c.finish())
                })
            },
        );
    }
    group.finish();
}

fn encrypt(c: &mut Criterion) {
    let mut group = c.benchmark_group("aes256cbc_encrypt");
    for len in SIZES {
        let input = data(len);
        let mut out = BytesMut::with_capacity(len + BLOCK);
        group.throughput(Throughput::Bytes(len as u64));
        group.bench_with_input(
            BenchmarkId::from_parameter(label(len)),
            &input,
            |b, input| {
                b.iter(|| {
                    out.clear();
                    let mut e = CbcEncryptor::new(&key());
                    for piece in input.chunks(PIECE) {
                        e.update(piece, &mut out);
                    }
                    e.finish(&mut out);
                    black_box(out.len())
                })
            },
        );
    }
    group.finish();
}

fn decrypt(c: &mut Criterion) {
    let mut group = c.benchmark_group("aes256cbc_decrypt");
    for len in SIZES {
        let ct = protocol::crypto::encrypt_all(&key(), &data(len));
        let mut out = BytesMut::with_capacity(ct.len());
        group.throughput(Throughput::Bytes(len as u64));
        group.bench_with_input(BenchmarkId::from_parameter(label(len)), &ct, |b, ct| {
            b.iter(|| {
                out.clear();
                let mut d = CbcDecryptor::new(&key());
                for piece in ct.chunks(PIECE) {
                    d.update(piece, &mut out);
                }
                d.finish(&mut out).expect("valid padding");
                black_box(out.len())
            })
        });
    }
    group.finish();
}

fn file_packet() -> RequestFrame {
    RequestFrame {
        client_id: ClientId([7; 16]),
        numbering: Numbering::Modern,
        request: Request::SendFile(FilePacket {
            head: PacketHead {
                content_size: 64 * MIB as u64,
                orig_size: 64 * MIB as u64 - 1,
                packet: 1,
                total: 64,
                file: FileName::try_from("bench.bin").expect("valid name"),
            },
            content: Bytes::from(data(MIB)),
        }),
    }
}

fn codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("file_packet");
    let frame = file_packet();
    let mut wire = BytesMut::new();
    ClientCodec::default()
        .encode(&frame, &mut wire)
        .expect("encodes");
    let wire = wire.freeze();
    group.throughput(Throughput::Bytes(MIB as u64));
    group.bench_function("encode 1 MiB", |b| {
        let mut out = BytesMut::with_capacity(wire.len());
        let mut codec = ClientCodec::default();
        b.iter(|| {
            out.clear();
            codec.encode(&frame, &mut out).expect("encodes");
            black_box(out.len())
        })
    });
    group.bench_function("decode 1 MiB", |b| {
        let mut codec = ServerCodec::default();
        b.iter(|| {
            // A socket read lands the bytes in the decoder's buffer.
            let mut buf = BytesMut::with_capacity(wire.len());
            buf.extend_from_slice(&wire);
            black_box(codec.decode(&mut buf).expect("decodes").expect("whole"))
        })
    });
    group.finish();
}

/// The repository extension's per-chunk work, one 1 MiB chunk at a time,
/// beside the alternatives measured for `docs/SECURITY.md`: keyed BLAKE3
/// against HMAC-SHA-256 for ids, and AES-256-GCM sealing (what
/// `Sealer::seal_object` does, zstd attempt included) against opening.
fn repo(c: &mut Criterion) {
    use hmac::Mac;
    use protocol::repo::keys::MasterKey;
    use protocol::repo::seal::{Opener, Sealer};
    let master = MasterKey::from_bytes([7; 32]);
    let id_key = master.id_key();
    let chunk = data(MIB);
    let mut group = c.benchmark_group("repo");
    group.throughput(Throughput::Bytes(MIB as u64));
    group.bench_function("id keyed-blake3", |b| {
        b.iter(|| black_box(id_key.id(&chunk)))
    });
    group.bench_function("id hmac-sha256", |b| {
        b.iter(|| {
            let mut mac =
                <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(&[7; 32]).expect("any key");
            mac.update(&chunk);
            black_box(mac.finalize().into_bytes())
        })
    });
    let sealer = Sealer::new(&master.backup_key().seal, &mut rand::thread_rng());
    let id = id_key.id(&chunk);
    let mut sealed = Vec::with_capacity(MIB + 128);
    group.bench_function("seal (zstd attempt + aes-256-gcm)", |b| {
        b.iter(|| {
            sealed.clear();
            sealer.seal_object(&id, &chunk, &mut sealed);
            black_box(sealed.len())
        })
    });
    let mut opener = Opener::new(master.open_key());
    group.bench_function("open (aes-256-gcm + id check)", |b| {
        b.iter(|| {
            black_box(
                opener
                    .open_object(&id_key, &id, &sealed, MIB)
                    .expect("opens")
                    .len(),
            )
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(10);
    targets = cksum, encrypt, decrypt, codec, repo
}
criterion_main!(benches);
