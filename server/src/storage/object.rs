//! Blobs in an object store: S3 or any S3-compatible service (through the
//! `object_store` crate), or `object_store`'s own in-memory store in tests.
//!
//! Keys are `PREFIX/clients/<client-hex>/blobs/<ordered-hex>` (without
//! `PREFIX/` when the prefix is empty): the [`BlobKey`] is the object's
//! path. The last part is 16 hex digits of the time and 16 random ones, so
//! two writes never pick the same key and no write ever replaces an object.
//!
//! * **Writes** stream: what [`BlobWriter::write`] is given is buffered up
//!   to [`PART_SIZE`] bytes; a blob that never fills a part is stored with
//!   one PUT by [`BlobWriter::finish`], a larger one becomes a multipart
//!   upload at its final key, one part sent while the next fills. Memory
//!   per write in progress is at most **two parts** (`2 × PART_SIZE` =
//!   16 MiB) plus the bytes of one `write` call. S3 needs parts of at least
//!   5 MiB (all but the last).
//! * **Finish** completes the upload (or does the single PUT): the object
//!   is then durable at its final key, which no metadata row references
//!   yet, so **publish** has nothing left to do and the
//!   [barrier](BlobStore::barrier) returns at once. A staged blob that is
//!   aborted is deleted.
//! * **Abort** aborts the multipart upload. A writer dropped without
//!   finish or abort aborts it in the background, as a best effort.
//! * **Reads** are GETs streamed a response chunk at a time;
//!   [`BlobStore::open_range`] is a ranged GET.
//! * **Orphans** (an object completed but never recorded, after a crash)
//!   are found by [`Storage::recover`](super::Storage::recover), which
//!   merges [`BlobStore::list`] (S3 lists in byte order of the key, which is
//!   the order the metadata sorts keys in) with the rows and deletes what
//!   no row references.
//! * **Incomplete multipart uploads** left by a crash cannot be listed
//!   through `object_store`, so [`BlobStore::recover`] cannot remove them
//!   and returns 0: they are invisible (never listed, never read) but are
//!   billed until removed. The remedy is a lifecycle rule on the bucket,
//!   `AbortIncompleteMultipartUpload` after a day (`docs/RELIABILITY.md`).
//!
//! The [`BlobStore`] interface is blocking and is called from blocking
//! threads; this store runs the async client on a small runtime of its
//! own and waits for each operation without entering that runtime, so a
//! call from any thread (even an async worker of another runtime, which
//! it would only hold up) cannot panic.
//!
//! Credentials come from the `AWS_*` environment variables; neither they
//! nor the client holding them are ever formatted: this store's `Debug`
//! shows the bucket, prefix and endpoint only.

use std::io::Read;
use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{GetOptions, GetRange, MultipartUpload, ObjectStore, PutPayload};
use protocol::ClientId;

use super::{BlobKey, BlobListing, BlobStore, BlobWriter, StagedBlob, StorageError};

/// Bytes buffered before a part is sent. S3 refuses parts under 5 MiB
/// (except the last); two of these per write in progress is the memory
/// bound of an upload.
pub const PART_SIZE: usize = 8 * 1024 * 1024;

/// Listing entries fetched ahead of the reader of [`BlobStore::list`] (S3
/// pages hold 1000).
const LIST_AHEAD: usize = 1000;

/// Where an S3 store keeps its blobs: `s3://BUCKET/PREFIX`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Location {
    pub bucket: String,
    /// Without leading or trailing `/`; may be empty.
    pub prefix: String,
}

impl S3Location {
    /// Parses `s3://BUCKET` or `s3://BUCKET/PREFIX`.
    ///
    /// # Errors
    /// When `url` is not of that form (the reason, as text).
    pub fn parse(url: &str) -> Result<Self, String> {
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| format!("{url:?} is not of the form s3://BUCKET/PREFIX"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let prefix = prefix.trim_matches('/');
        if bucket.is_empty() {
            return Err(format!("{url:?} names no bucket"));
        }
        if prefix
            .split('/')
            .any(|part| part == "." || part == ".." || (part.is_empty() && !prefix.is_empty()))
        {
            return Err(format!("{url:?}: the prefix has an empty, . or .. part"));
        }
        ObjectPath::parse(prefix).map_err(|e| format!("{url:?}: {e}"))?;
        Ok(Self {
            bucket: bucket.to_owned(),
            prefix: prefix.to_owned(),
        })
    }
}

impl std::fmt::Display for S3Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.prefix.is_empty() {
            write!(f, "s3://{}", self.bucket)
        } else {
            write!(f, "s3://{}/{}", self.bucket, self.prefix)
        }
    }
}

/// The runtime the async client runs on. Dropped with `shutdown_background`,
/// which (unlike dropping a runtime) is allowed on an async thread.
struct Driver {
    /// Taken only by `Drop`.
    runtime: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
}

impl Driver {
    fn new() -> Result<Self, StorageError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("blob-store")
            .enable_all()
            .build()
            .map_err(|e| StorageError::Unavailable {
                op: "start the object store client",
                source: e.into(),
            })?;
        Ok(Self {
            handle: runtime.handle().clone(),
            runtime: Some(runtime),
        })
    }

    fn handle(&self) -> &tokio::runtime::Handle {
        &self.handle
    }

    /// Runs `future` on this runtime and waits for it. The wait does not
    /// enter any runtime, so it may happen on any thread.
    fn run<T: Send + 'static>(
        &self,
        future: impl std::future::Future<Output = T> + Send + 'static,
    ) -> Result<T, StorageError> {
        let task = self.handle().spawn(future);
        futures::executor::block_on(task).map_err(|e| StorageError::Worker(e.to_string()))
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// How long `/readyz`'s probe of the bucket may take.
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

struct Shared {
    store: Arc<dyn ObjectStore>,
    driver: Driver,
    /// `PREFIX/clients` (or `clients`).
    root: String,
    /// What `Debug` shows: bucket, prefix and endpoint, never credentials.
    describe: String,
}

/// Blobs in an object store, shared by clones.
#[derive(Clone)]
pub struct ObjectBlobStore {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ObjectBlobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectBlobStore")
            .field("at", &self.shared.describe)
            .finish_non_exhaustive()
    }
}

/// Maps an `object_store` failure on `what`.
fn object_error(op: &'static str, what: &str, e: object_store::Error) -> StorageError {
    match e {
        object_store::Error::NotFound { .. } => StorageError::NotFound {
            op,
            what: what.to_owned(),
        },
        other => StorageError::Io {
            op,
            what: what.to_owned(),
            source: other.into(),
        },
    }
}

impl ObjectBlobStore {
    /// An S3 (or S3-compatible) store at `location`. `endpoint` is the
    /// service's URL (plain `http://` is allowed, for a local service, and
    /// requests then name the bucket in the path, as S3-compatible servers
    /// expect); without it, AWS S3 itself (or `AWS_ENDPOINT`). Credentials
    /// and the region (default `us-east-1`) come from the `AWS_*`
    /// environment variables. Nothing is sent until the first operation.
    ///
    /// # Errors
    /// When the client cannot be built from these settings.
    pub fn s3(location: &S3Location, endpoint: Option<&str>) -> Result<Self, StorageError> {
        let mut builder =
            object_store::aws::AmazonS3Builder::from_env().with_bucket_name(&location.bucket);
        if std::env::var_os("AWS_REGION").is_none()
            && std::env::var_os("AWS_DEFAULT_REGION").is_none()
        {
            builder = builder.with_region("us-east-1");
        }
        if let Some(endpoint) = endpoint {
            builder = builder
                .with_endpoint(endpoint)
                .with_allow_http(endpoint.starts_with("http://"))
                .with_virtual_hosted_style_request(false);
        }
        let store = builder.build().map_err(|e| StorageError::Unavailable {
            op: "configure the S3 client",
            source: e.into(),
        })?;
        let describe = match endpoint {
            Some(endpoint) => format!("{location} at {endpoint}"),
            None => location.to_string(),
        };
        Self::with_store(Arc::new(store), &location.prefix, describe)
    }

    /// A store over any `object_store` backend, keys under `prefix` (tests
    /// use the in-memory one).
    ///
    /// # Errors
    /// When the client's runtime cannot be started.
    pub fn with_store(
        store: Arc<dyn ObjectStore>,
        prefix: &str,
        describe: String,
    ) -> Result<Self, StorageError> {
        let prefix = prefix.trim_matches('/');
        let root = if prefix.is_empty() {
            "clients".to_owned()
        } else {
            format!("{prefix}/clients")
        };
        Ok(Self {
            shared: Arc::new(Shared {
                store,
                driver: Driver::new()?,
                root,
                describe,
            }),
        })
    }

    fn client_root(&self, client: ClientId) -> String {
        format!("{}/{}/", self.shared.root, client.to_hex())
    }

    /// The object path of `key`, if it is one of this store's.
    fn path(&self, key: &BlobKey) -> Result<ObjectPath, StorageError> {
        let bad = || StorageError::BadKey(key.0.clone());
        if !is_blob_key(&self.shared.root, key) {
            return Err(bad());
        }
        ObjectPath::parse(&key.0).map_err(|_| bad())
    }

    fn run<T: Send + 'static>(
        &self,
        future: impl std::future::Future<Output = T> + Send + 'static,
    ) -> Result<T, StorageError> {
        self.shared.driver.run(future)
    }

    fn delete_path(&self, path: ObjectPath) -> Result<(), StorageError> {
        let store = Arc::clone(&self.shared.store);
        let what = path.to_string();
        match self.run(async move { store.delete(&path).await })? {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(object_error("delete", &what, e)),
        }
    }

    /// Objects under `prefix`, in key order, fetched [`LIST_AHEAD`] ahead.
    fn list_under(&self, prefix: String) -> BlobListing<'_> {
        let (tx, rx) = tokio::sync::mpsc::channel(LIST_AHEAD);
        let store = Arc::clone(&self.shared.store);
        let what = prefix.clone();
        self.shared.driver.handle().spawn(async move {
            let mut stream = store.list(Some(&ObjectPath::from(prefix)));
            while let Some(item) = stream.next().await {
                let item = item
                    .map(|meta| (BlobKey(meta.location.to_string()), meta.size))
                    .map_err(|e| object_error("list", &what, e));
                let failed = item.is_err();
                // A closed channel: the reader stopped listening.
                if tx.send(item).await.is_err() || failed {
                    break;
                }
            }
        });
        Box::new(Listing {
            rx,
            root: self.shared.root.clone(),
        })
    }
}

/// Whether `key` is `ROOT/<client-hex>/blobs/<hex>`.
fn is_blob_key(root: &str, key: &BlobKey) -> bool {
    let Some(rest) = key.0.strip_prefix(root).and_then(|r| r.strip_prefix('/')) else {
        return false;
    };
    let mut parts = rest.split('/');
    matches!(
        (parts.next(), parts.next(), parts.next(), parts.next()),
        (Some(client), Some("blobs"), Some(name), None)
            if is_hex(client, 32) && is_hex(name, 32)
    )
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The receiving end of a listing. Objects under the prefix that are not
/// blobs of this store (put there by someone else) are passed over, so
/// recovery never takes them for orphans.
struct Listing {
    rx: tokio::sync::mpsc::Receiver<Result<(BlobKey, u64), StorageError>>,
    root: String,
}

impl Iterator for Listing {
    type Item = Result<(BlobKey, u64), StorageError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            // `block_on` of `futures` enters no runtime: safe on any thread.
            match futures::executor::block_on(self.rx.recv())? {
                Ok((key, _)) if !is_blob_key(&self.root, &key) => {}
                item => return Some(item),
            }
        }
    }
}

/// A write in progress.
struct ObjectWriter {
    store: ObjectBlobStore,
    path: ObjectPath,
    key: BlobKey,
    /// Bytes not yet sent, less than [`PART_SIZE`] between calls.
    buffer: Vec<u8>,
    /// The multipart upload, once a part has been sent.
    upload: Option<Box<dyn MultipartUpload>>,
    /// The part being sent.
    in_flight: Option<tokio::task::JoinHandle<object_store::Result<()>>>,
}

impl ObjectWriter {
    fn io_error(&self, op: &'static str, e: object_store::Error) -> StorageError {
        object_error(op, &self.key.0, e)
    }

    /// Waits for the part being sent.
    fn settle(&mut self) -> Result<(), StorageError> {
        if let Some(task) = self.in_flight.take() {
            futures::executor::block_on(task)
                .map_err(|e| StorageError::Worker(e.to_string()))?
                .map_err(|e| self.io_error("upload part of", e))?;
        }
        Ok(())
    }

    /// Sends the buffer as the next part (after the previous one is in),
    /// starting the multipart upload if this is the first.
    fn send_part(&mut self) -> Result<(), StorageError> {
        if self.upload.is_none() {
            let store = Arc::clone(&self.store.shared.store);
            let path = self.path.clone();
            let upload = self
                .store
                .run(async move { store.put_multipart(&path).await })?
                .map_err(|e| self.io_error("start upload of", e))?;
            self.upload = Some(upload);
        }
        self.settle()?;
        let part = PutPayload::from(Bytes::from(std::mem::take(&mut self.buffer)));
        if let Some(upload) = self.upload.as_mut() {
            let sending = upload.put_part(part);
            self.in_flight = Some(self.store.shared.driver.handle().spawn(sending));
        }
        Ok(())
    }

    fn abort_upload(&mut self) -> Result<(), StorageError> {
        // The part's own outcome no longer matters.
        let _ = self.settle();
        if let Some(mut upload) = self.upload.take() {
            self.store
                .run(async move { upload.abort().await })?
                .map_err(|e| self.io_error("abort upload of", e))?;
        }
        Ok(())
    }
}

impl BlobWriter for ObjectWriter {
    fn write(&mut self, mut bytes: &[u8]) -> Result<(), StorageError> {
        while !bytes.is_empty() {
            let room = PART_SIZE - self.buffer.len();
            let (now, later) = bytes.split_at(room.min(bytes.len()));
            self.buffer.extend_from_slice(now);
            bytes = later;
            if self.buffer.len() == PART_SIZE {
                self.send_part()?;
            }
        }
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> Result<Box<dyn StagedBlob>, StorageError> {
        let outcome = if self.upload.is_none() {
            let store = Arc::clone(&self.store.shared.store);
            let path = self.path.clone();
            let payload = PutPayload::from(Bytes::from(std::mem::take(&mut self.buffer)));
            self.store
                .run(async move { store.put(&path, payload).await.map(drop) })?
                .map_err(|e| self.io_error("put", e))
        } else {
            let sent = if self.buffer.is_empty() {
                self.settle()
            } else {
                self.send_part().and_then(|()| self.settle())
            };
            match (sent, self.upload.take()) {
                (Ok(()), Some(mut upload)) => self
                    .store
                    .run(async move {
                        let done = upload.complete().await.map(drop);
                        if done.is_err() {
                            // Best effort; a lifecycle rule removes what stays.
                            let _ = upload.abort().await;
                        }
                        done
                    })?
                    .map_err(|e| self.io_error("complete upload of", e)),
                (Err(e), upload) => {
                    self.upload = upload;
                    let _ = self.abort_upload();
                    Err(e)
                }
                (Ok(()), None) => Err(StorageError::Worker("upload vanished".into())),
            }
        };
        outcome?;
        Ok(Box::new(ObjectStaged {
            store: self.store.clone(),
            key: self.key.clone(),
        }))
    }

    fn abort(mut self: Box<Self>) -> Result<(), StorageError> {
        self.buffer = Vec::new();
        self.abort_upload()
    }
}

impl Drop for ObjectWriter {
    fn drop(&mut self) {
        // Neither finished nor aborted: abort in the background.
        if let Some(mut upload) = self.upload.take() {
            let in_flight = self.in_flight.take();
            self.store.shared.driver.handle().spawn(async move {
                if let Some(task) = in_flight {
                    let _ = task.await;
                }
                let _ = upload.abort().await;
            });
        }
    }
}

/// A completed object not yet referenced by a row.
struct ObjectStaged {
    store: ObjectBlobStore,
    key: BlobKey,
}

impl StagedBlob for ObjectStaged {
    fn key(&self) -> &BlobKey {
        &self.key
    }

    fn publish(self: Box<Self>) -> Result<BlobKey, StorageError> {
        Ok(self.key)
    }

    fn abort(self: Box<Self>) -> Result<(), StorageError> {
        self.store.delete(&self.key)
    }
}

/// A GET's body, a response chunk at a time.
struct ObjectReader {
    store: ObjectBlobStore,
    key: BlobKey,
    stream: Option<BoxStream<'static, object_store::Result<Bytes>>>,
    chunk: Bytes,
}

impl Read for ObjectReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.chunk.is_empty() {
            let Some(mut stream) = self.stream.take() else {
                return Ok(0);
            };
            let (stream, next) = self
                .store
                .run(async move {
                    let next = stream.next().await;
                    (stream, next)
                })
                .map_err(std::io::Error::other)?;
            match next {
                None => return Ok(0),
                Some(Err(e)) => {
                    return Err(std::io::Error::other(object_error("read", &self.key.0, e)))
                }
                Some(Ok(chunk)) => {
                    self.chunk = chunk;
                    self.stream = Some(stream);
                }
            }
        }
        let n = self.chunk.len().min(buf.len());
        buf[..n].copy_from_slice(&self.chunk.split_to(n));
        Ok(n)
    }
}

impl BlobStore for ObjectBlobStore {
    fn begin_write(&self, client: ClientId) -> Result<Box<dyn BlobWriter>, StorageError> {
        let key = BlobKey(format!(
            "{}blobs/{}",
            self.client_root(client),
            super::ordered_hex()
        ));
        let path = self.path(&key)?;
        Ok(Box::new(ObjectWriter {
            store: self.clone(),
            path,
            key,
            buffer: Vec::new(),
            upload: None,
            in_flight: None,
        }))
    }

    /// One listing request under the prefix (a page of at most one level),
    /// answered within [`PROBE_TIMEOUT`]: the bucket is reachable and the
    /// credentials are accepted.
    fn probe(&self) -> Result<(), StorageError> {
        let store = Arc::clone(&self.shared.store);
        let root = ObjectPath::from(self.shared.root.clone());
        let what = self.shared.root.clone();
        let listed = self.run(async move {
            tokio::time::timeout(PROBE_TIMEOUT, store.list_with_delimiter(Some(&root))).await
        })?;
        match listed {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(object_error("probe", &what, e)),
            Err(_) => Err(StorageError::Unavailable {
                op: "probe",
                source: format!("no answer within {PROBE_TIMEOUT:?}").into(),
            }),
        }
    }

    fn open(&self, key: &BlobKey) -> Result<Box<dyn Read + Send>, StorageError> {
        self.open_range(key, 0..u64::MAX)
    }

    fn open_range(
        &self,
        key: &BlobKey,
        range: Range<u64>,
    ) -> Result<Box<dyn Read + Send>, StorageError> {
        let path = self.path(key)?;
        let empty = || -> Box<dyn Read + Send> { Box::new(std::io::empty()) };
        if range.start >= range.end {
            return Ok(empty());
        }
        let options = GetOptions {
            range: Some(if range.end == u64::MAX {
                GetRange::Offset(range.start)
            } else {
                GetRange::Bounded(range.clone())
            }),
            ..GetOptions::default()
        };
        let options = if range.start == 0 && range.end == u64::MAX {
            GetOptions::default()
        } else {
            options
        };
        let store = Arc::clone(&self.shared.store);
        let start = range.start;
        let got = self.run(async move {
            match store.get_opts(&path, options).await {
                Ok(result) => Ok(Some(result.into_stream())),
                Err(e @ object_store::Error::NotFound { .. }) => Err(e),
                // A range that starts at or past the end is refused by S3;
                // an existing blob then reads as empty.
                Err(e) => match store.head(&path).await {
                    Ok(meta) if meta.size <= start => Ok(None),
                    Ok(_) => Err(e),
                    Err(head) => Err(head),
                },
            }
        })?;
        match got {
            Ok(Some(stream)) => Ok(Box::new(ObjectReader {
                store: self.clone(),
                key: key.clone(),
                stream: Some(stream),
                chunk: Bytes::new(),
            })),
            Ok(None) => Ok(empty()),
            Err(e) => Err(object_error("open", &key.0, e)),
        }
    }

    fn barrier(&self, keys: &[BlobKey]) -> Vec<Result<(), StorageError>> {
        // A completed upload or PUT is durable: only the keys are checked.
        keys.iter().map(|k| self.path(k).map(drop)).collect()
    }

    fn modified(&self, key: &BlobKey) -> Result<Option<std::time::SystemTime>, StorageError> {
        let path = self.path(key)?;
        let store = Arc::clone(&self.shared.store);
        match self.run(async move { store.head(&path).await })? {
            Ok(meta) => Ok(Some(meta.last_modified.into())),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(object_error("stat", &key.0, e)),
        }
    }

    fn delete(&self, key: &BlobKey) -> Result<(), StorageError> {
        let path = self.path(key)?;
        self.delete_path(path)
    }

    fn remove_client(&self, client: ClientId) -> Result<(), StorageError> {
        let prefix = self.client_root(client);
        let keys: Vec<BlobKey> = self
            .list_under(prefix.trim_end_matches('/').to_owned())
            .map(|item| item.map(|(key, _)| key))
            .collect::<Result<_, _>>()?;
        for key in keys {
            self.delete_path(ObjectPath::from(key.0))?;
        }
        Ok(())
    }

    fn recover(&self) -> Result<usize, StorageError> {
        // Incomplete multipart uploads cannot be listed through
        // `object_store`: a bucket lifecycle rule removes them (module doc).
        // Completed objects without a row are removed by the caller's
        // merge of `list` with the rows.
        Ok(0)
    }

    fn list(&self) -> Result<BlobListing<'_>, StorageError> {
        Ok(self.list_under(self.shared.root.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bucket_and_prefix() {
        let at = S3Location::parse("s3://bucket/some/prefix/").unwrap();
        assert_eq!(
            (at.bucket.as_str(), at.prefix.as_str()),
            ("bucket", "some/prefix")
        );
        assert_eq!(at.to_string(), "s3://bucket/some/prefix");
        let bare = S3Location::parse("s3://bucket").unwrap();
        assert_eq!(bare.prefix, "");
        assert_eq!(bare.to_string(), "s3://bucket");
        for bad in [
            "bucket/x",
            "s3://",
            "s3:///x",
            "s3://b/a//c",
            "s3://b/../c",
            "file:///x",
        ] {
            assert!(S3Location::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn keys_of_another_prefix_or_shape_are_refused() {
        let memory = Arc::new(object_store::memory::InMemory::new());
        let store = ObjectBlobStore::with_store(memory, "p", "memory".into()).unwrap();
        let w = store.begin_write(ClientId([1; 16])).unwrap();
        let key = w.finish().unwrap().publish().unwrap();
        assert!(key
            .0
            .starts_with(&format!("p/clients/{}/blobs/", ClientId([1; 16]).to_hex())));
        assert!(store.path(&key).is_ok());
        for bad in [
            key.0.replacen("p/", "q/", 1),
            format!("{}/x", key.0),
            key.0.replace("/blobs/", "/tmp/"),
            key.0.to_uppercase(),
        ] {
            assert!(matches!(
                store.path(&BlobKey(bad)),
                Err(StorageError::BadKey(_))
            ));
        }
    }

    #[test]
    fn neither_debug_nor_errors_show_the_credentials() {
        // A closed port on 127.0.0.1: every request fails at once.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let secret = "wJalrXUtnFEMI-a-very-secret-key";
        let s3 = object_store::aws::AmazonS3Builder::new()
            .with_bucket_name("b")
            .with_region("us-east-1")
            .with_endpoint(format!("http://127.0.0.1:{port}"))
            .with_allow_http(true)
            .with_access_key_id("AKIDEXAMPLEKEYID")
            .with_secret_access_key(secret)
            .with_retry(object_store::RetryConfig {
                max_retries: 0,
                ..Default::default()
            })
            .build()
            .unwrap();
        let store = ObjectBlobStore::with_store(Arc::new(s3), "p", "s3://b/p".into()).unwrap();
        let mut w = store.begin_write(ClientId([1; 16])).unwrap();
        w.write(b"x").unwrap();
        let Err(e) = w.finish() else {
            panic!("a put to a closed port succeeded")
        };
        let mut shown = format!("{store:?} {e} {e:?}");
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            shown.push_str(&format!(" {s} {s:?}"));
            source = s.source();
        }
        assert!(
            shown.contains("127.0.0.1") || shown.contains("s3://b/p"),
            "{shown}"
        );
        assert!(!shown.contains(secret), "{shown}");
        assert!(!shown.contains("AKIDEXAMPLEKEYID"), "{shown}");
    }
}
