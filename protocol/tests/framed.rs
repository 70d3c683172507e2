//! The codecs under `tokio_util::codec::FramedRead`, fed by a reader that
//! hands out the recorded sessions a few bytes at a time and blocks
//! (returns `Pending`) before every read: a "shotgun" test of the decoder's
//! state across reads.

use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use futures::StreamExt;
use protocol::codec::CodecError;
use protocol::wire::REQUEST_HEADER_LEN;
use protocol::{ClientCodec, ServerCodec};
use tokio::io::{AsyncRead, ReadBuf};
use tokio_util::codec::{Decoder, FramedRead};

/// A reader that returns `Pending` before every read and then at most the
/// next of `sizes` bytes (cycled).
struct Trickle {
    data: Vec<u8>,
    pos: usize,
    sizes: Vec<usize>,
    reads: usize,
    blocked: bool,
}

impl Trickle {
    fn new(data: &[u8], sizes: &[usize]) -> Self {
        assert!(sizes.iter().all(|&s| s > 0));
        Self {
            data: data.to_vec(),
            pos: 0,
            sizes: sizes.to_vec(),
            reads: 0,
            blocked: false,
        }
    }
}

impl AsyncRead for Trickle {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.blocked {
            this.blocked = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        this.blocked = false;
        let size = this.sizes[this.reads % this.sizes.len()];
        this.reads += 1;
        let n = size.min(this.data.len() - this.pos).min(buf.remaining());
        buf.put_slice(&this.data[this.pos..this.pos + n]);
        this.pos += n;
        Poll::Ready(Ok(()))
    }
}

/// Per session directory and connection: (name, c2s, s2c, c2s read sizes, s2c read sizes).
type Recorded = (String, Vec<u8>, Vec<u8>, Vec<usize>, Vec<usize>);

fn recorded() -> Vec<Recorded> {
    let mut dirs: Vec<PathBuf> =
        std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vectors"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.join("session.txt").is_file())
            .collect();
    dirs.sort();
    let mut out = Vec::new();
    for dir in dirs {
        for n in 1.. {
            let base = dir.join(format!("conn{n}"));
            let Ok(c2s) = std::fs::read(base.with_extension("c2s.bin")) else {
                break;
            };
            let s2c = std::fs::read(base.with_extension("s2c.bin")).unwrap();
            let chunks = std::fs::read_to_string(base.with_extension("chunks")).unwrap();
            let sizes = |dir: &str| -> Vec<usize> {
                chunks
                    .lines()
                    .map(|l| l.split_whitespace().collect::<Vec<_>>())
                    .filter(|f| f.get(1) == Some(&dir))
                    .map(|f| f[3].parse().unwrap())
                    .collect()
            };
            let name = format!("{}/conn{n}", dir.file_name().unwrap().to_string_lossy());
            out.push((name, c2s, s2c, sizes("c2s"), sizes("s2c")));
        }
    }
    assert!(!out.is_empty(), "no recorded sessions");
    out
}

/// Decodes `bytes` in one buffer.
fn one_shot<D: Decoder>(mut codec: D, bytes: &[u8]) -> Vec<D::Item>
where
    D::Error: std::fmt::Debug,
{
    let mut buf = BytesMut::from(bytes);
    let mut out = Vec::new();
    while let Some(item) = codec.decode(&mut buf).unwrap() {
        out.push(item);
    }
    assert!(buf.is_empty());
    out
}

/// Collects a `FramedRead` stream to its end, with a deadline.
async fn collect<D: Decoder<Error = CodecError> + Unpin>(
    framed: &mut FramedRead<Trickle, D>,
) -> Vec<Result<D::Item, CodecError>> {
    tokio::time::timeout(Duration::from_secs(60), async {
        let mut out = Vec::new();
        while let Some(item) = framed.next().await {
            out.push(item);
        }
        out
    })
    .await
    .expect("the stream ends in time")
}

const SPLITS: [&[usize]; 8] = [
    &[1],
    &[2],
    &[3],
    &[7],
    &[22, 1],
    &[23],
    &[254, 1, 5000],
    &[4096],
];

#[tokio::test]
async fn framed_read_decodes_every_session_identically_at_any_split() {
    for (name, c2s, s2c, c2s_reads, s2c_reads) in recorded() {
        let requests = one_shot(ServerCodec::default(), &c2s);
        let responses = one_shot(ClientCodec::default(), &s2c);
        let splits = SPLITS
            .iter()
            .map(|s| s.to_vec())
            .chain([c2s_reads.clone(), s2c_reads.clone()]);
        for sizes in splits {
            let sizes = if sizes.is_empty() { vec![1] } else { sizes };
            let mut framed = FramedRead::new(Trickle::new(&c2s, &sizes), ServerCodec::default());
            let got: Vec<_> = collect(&mut framed)
                .await
                .into_iter()
                .map(Result::unwrap)
                .collect();
            assert_eq!(got, requests, "{name}: requests read {sizes:?} at a time");

            let mut framed = FramedRead::new(Trickle::new(&s2c, &sizes), ClientCodec::default());
            let got: Vec<_> = collect(&mut framed)
                .await
                .into_iter()
                .map(Result::unwrap)
                .collect();
            assert_eq!(got, responses, "{name}: responses read {sizes:?} at a time");
        }
    }
}

#[tokio::test]
async fn framed_read_yields_an_error_and_ends_on_a_bad_version() {
    let (name, c2s, _, _, _) = recorded().remove(0);
    let first = one_shot(ServerCodec::default(), &c2s).remove(0);
    let first_len = {
        let mut buf = BytesMut::from(&c2s[..]);
        ServerCodec::default().decode(&mut buf).unwrap();
        c2s.len() - buf.len()
    };
    let mut corrupt = c2s.clone();
    corrupt[first_len + 16] = 4; // the second request's version byte
    for sizes in SPLITS {
        let mut framed = FramedRead::new(Trickle::new(&corrupt, sizes), ServerCodec::default());
        let got = collect(&mut framed).await;
        assert_eq!(got.len(), 2, "{name}: one request, one error, then the end");
        assert_eq!(got[0].as_ref().unwrap(), &first);
        assert!(
            matches!(
                got[1],
                Err(CodecError::Version {
                    got: 4,
                    expected: 3
                })
            ),
            "{name}: {:?}",
            got[1]
        );
        // The error was found in the header: the payload was never read.
        assert!(
            framed.get_ref().pos <= first_len + REQUEST_HEADER_LEN + sizes.iter().max().unwrap()
        );
    }
}

#[tokio::test]
async fn framed_read_yields_an_error_and_ends_on_an_oversized_declaration() {
    let (_, c2s, _, _, _) = recorded().remove(0);
    let mut hostile = c2s[..REQUEST_HEADER_LEN].to_vec();
    hostile[19..23].copy_from_slice(&u32::MAX.to_le_bytes());
    hostile.extend(std::iter::repeat_n(0u8, 100_000));
    for sizes in SPLITS {
        let mut framed = FramedRead::new(Trickle::new(&hostile, sizes), ServerCodec::default());
        let got = collect(&mut framed).await;
        assert_eq!(got.len(), 1);
        assert!(
            matches!(
                got[0],
                Err(CodecError::PayloadSize {
                    declared: u32::MAX,
                    ..
                })
            ),
            "{:?}",
            got[0]
        );
        assert!(framed.get_ref().pos <= REQUEST_HEADER_LEN + sizes.iter().max().unwrap());
        assert!(
            framed.read_buffer().capacity() <= 64 * 1024,
            "buffer grew to {}",
            framed.read_buffer().capacity()
        );
    }
}

#[tokio::test]
async fn framed_read_yields_an_error_when_the_stream_ends_mid_message() {
    for (name, c2s, s2c, _, _) in recorded() {
        let requests = one_shot(ServerCodec::default(), &c2s);
        let cut = c2s.len() - 1;
        for sizes in [&[1][..], &[4096]] {
            let mut framed =
                FramedRead::new(Trickle::new(&c2s[..cut], sizes), ServerCodec::default());
            let got = collect(&mut framed).await;
            assert_eq!(
                got.len(),
                requests.len(),
                "{name}: every whole request, then an error"
            );
            for (g, want) in got.iter().zip(&requests) {
                if let Ok(g) = g {
                    assert_eq!(g, want);
                }
            }
            assert!(got[..requests.len() - 1].iter().all(Result::is_ok));
            assert!(
                got.last().unwrap().is_err(),
                "{name}: a cut stream is an error"
            );
        }
        let responses = one_shot(ClientCodec::default(), &s2c);
        let mut framed = FramedRead::new(
            Trickle::new(&s2c[..s2c.len() - 1], &[3]),
            ClientCodec::default(),
        );
        let got = collect(&mut framed).await;
        assert_eq!(got.len(), responses.len(), "{name}");
        assert!(
            got.last().unwrap().is_err(),
            "{name}: a cut stream is an error"
        );
    }
}
