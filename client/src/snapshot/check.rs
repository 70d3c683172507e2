//! `check [SNAPSHOT...]`: whether the snapshots of this client still
//! restore, read with its keys (`docs/RELIABILITY.md`, Check).
//!
//! Three passes, each object read at most once however many snapshots
//! reference it:
//!
//! 1. **Structure.** Every snapshot's description is opened and every
//!    distinct tree under it fetched (in batches), opened (its tag, and
//!    that it hashes to its id) and parsed; the ids of the content chunks
//!    the trees name are collected, each once.
//! 2. **Content.** The server is asked whether it holds each chunk
//!    ("have", 1260). With `--read-data` (or a subset of it) each chosen
//!    chunk is fetched and opened as a restore opens it, on the blocking
//!    pool while the next batch is fetched.
//! 3. **Paths**, only when something is wrong: the snapshots are walked
//!    again, skipping every subtree found clean, to name each file whose
//!    chunk is missing or damaged and each directory whose listing is.
//!
//! When the server fails while reading an object (a pack missing or
//! shorter than its index on its disk: it answers 1607 and ends the
//! connection), that object is counted unreadable, the connection is made
//! again and the check goes on after it, up to [`MAX_SERVER_FAILURES`]
//! times; then the content not yet read is left unchecked.

use std::collections::{HashMap, HashSet};

use bytes::Bytes;
use protocol::repo::keys::IdKey;
use protocol::repo::message::{ObjectId, MAX_FETCH_IDS, MAX_OBJECT_BYTES};
use protocol::repo::seal::Opener;
use protocol::repo::tree::{decode_tree, Entry, EntryKind};
use protocol::session::repo::Fetched;

use super::chunk;
use super::idset::IdSet;
use super::remote::Remote;
use super::restore::{parse_spec, Reader};
use crate::engine::Client;
use crate::error::Error;

/// The most plaintext a tree or chunk may open to.
const MAX_PLAIN: usize = MAX_OBJECT_BYTES as usize;
/// Ids asked for in one fetch.
const FETCH_IDS: usize = 256;
const _: () = assert!(FETCH_IDS <= MAX_FETCH_IDS);
/// Plaintext bytes (estimated) of chunks asked for in one fetch.
const FETCH_BYTES: u64 = 32 << 20;
/// Server failures (1607 on a fetch) after which no more content is read.
pub const MAX_SERVER_FAILURES: u32 = 64;

/// What of the content `--read-data-subset` reads (restic's meanings).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Subset {
    /// Every chunk (`--read-data`, or `100%`).
    All,
    /// This percentage of the chunks, chosen at random.
    Percent(f64),
    /// Group `n` (from 1) of `of`, by object id: the chunks whose id,
    /// read as a number, is `n - 1` modulo `of`.
    Group { n: u64, of: u64 },
}

impl std::str::FromStr for Subset {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if let Some(p) = text.strip_suffix('%') {
            let p: f64 = p
                .trim()
                .parse()
                .map_err(|_| format!("\"{text}\" is not a percentage such as 5% or 0.5%"))?;
            if !(p > 0.0 && p <= 100.0) {
                return Err(format!(
                    "\"{text}\": the percentage must be over 0 and at most 100"
                ));
            }
            return Ok(if p >= 100.0 {
                Self::All
            } else {
                Self::Percent(p)
            });
        }
        if let Some((n, of)) = text.split_once('/') {
            let bad = || format!("\"{text}\" is not a group N/M such as 1/5");
            let n: u64 = n.trim().parse().map_err(|_| bad())?;
            let of: u64 = of.trim().parse().map_err(|_| bad())?;
            if n == 0 || of == 0 || n > of {
                return Err(format!(
                    "\"{text}\": the group N/M needs 1 <= N <= M (the N-th of M groups)"
                ));
            }
            return Ok(Self::Group { n, of });
        }
        Err(format!(
            "\"{text}\" is neither a percentage (5%) nor a group (N/M)"
        ))
    }
}

impl std::fmt::Display for Subset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::All => write!(f, "all"),
            Self::Percent(p) => write!(f, "{p}%"),
            Self::Group { n, of } => write!(f, "{n}/{of}"),
        }
    }
}

impl Subset {
    fn in_group(id: &ObjectId, n: u64, of: u64) -> bool {
        let mut head = [0u8; 8];
        head.copy_from_slice(id.0.get(..8).unwrap_or(&[0; 8]));
        u64::from_le_bytes(head) % of == n - 1
    }
}

/// One damaged path of one snapshot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Damage {
    pub snapshot: u64,
    /// The file or directory, as `ls` shows it; `/` for the snapshot's
    /// root.
    pub path: String,
    pub problem: String,
}

/// What a check found.
#[derive(Debug, Default, serde::Serialize)]
pub struct CheckSummary {
    /// Snapshots checked.
    pub snapshots: u64,
    /// Distinct trees read and parsed.
    pub trees: u64,
    /// Distinct content chunks the trees reference, each asked "have".
    pub objects: u64,
    /// What `--read-data(-subset)` read: `all`, `5%`, `1/4`; absent
    /// without it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_data: Option<String>,
    /// Chunks fetched (each then opened).
    pub objects_read: u64,
    /// Sealed bytes fetched: trees and chunks.
    pub bytes_read: u64,
    /// Chunks the server does not hold.
    pub missing_objects: u64,
    /// Chunks read that do not open (tag or id wrong), or that the server
    /// failed to read.
    pub damaged_objects: u64,
    /// Trees missing, unreadable, damaged or not parsing.
    pub damaged_trees: u64,
    /// Chosen chunks left unread after [`MAX_SERVER_FAILURES`].
    pub unchecked_objects: u64,
    /// Times the server failed while reading an object.
    pub server_failures: u32,
    /// The snapshots with damage, by number.
    pub damaged_snapshots: Vec<u64>,
    /// Each damaged path of each snapshot.
    pub damage: Vec<Damage>,
}

impl CheckSummary {
    /// Whether nothing was found damaged.
    pub fn is_clean(&self) -> bool {
        self.damage.is_empty()
    }
}

/// An answer to a fetch, with a server failure made one.
enum Got {
    Object(ObjectId, Bytes),
    Missing(ObjectId),
    /// The server failed while reading it.
    Unreadable(ObjectId),
}

impl From<Fetched> for Got {
    fn from(f: Fetched) -> Self {
        match f {
            Fetched::Object { id, sealed } => Self::Object(id, sealed),
            Fetched::Missing { id } => Self::Missing(id),
        }
    }
}

const UNREADABLE: &str = "the server failed while reading it (its pack may be missing, short or unreadable on the server's disk)";

/// The state of a content chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Held, per "have"; not read.
    Held,
    /// Read, and it opened.
    Sound,
    Missing,
    /// Read, and it did not open (why in `Checker::problems`), or the
    /// server failed reading it.
    Damaged,
}

/// The connection, made again after the server fails.
struct Conn<'a> {
    client: &'a Client,
    r: Reader,
    failures: u32,
    bytes: u64,
}

impl Conn<'_> {
    /// Fetches `ids` (at most [`FETCH_IDS`]), handing each answer to
    /// `each` in order. When the server fails while reading one, that one
    /// is handed as unreadable, the connection is made again and the
    /// fetch goes on after it. Returns how many ids were answered: fewer
    /// than asked once [`MAX_SERVER_FAILURES`] is reached.
    async fn fetch(&mut self, ids: &[ObjectId], mut each: impl FnMut(Got)) -> Result<usize, Error> {
        let mut rest = ids;
        let mut answered = 0;
        while !rest.is_empty() {
            if self.failures >= MAX_SERVER_FAILURES {
                return Ok(answered);
            }
            let mut done = 0usize;
            let result = async {
                let mut receiver = self.r.remote.fetch_begin(rest).await?;
                while let Some(f) = self.r.remote.fetch_next(&mut receiver).await? {
                    if let Fetched::Object { sealed, .. } = &f {
                        self.bytes += sealed.len() as u64;
                    }
                    done += 1;
                    each(f.into());
                }
                Ok::<(), Error>(())
            }
            .await;
            answered += done;
            match result {
                Ok(()) => return Ok(answered),
                Err(e @ Error::ServerFailed { .. }) => {
                    // The server answers in order and fails on the object
                    // it cannot read: the first one not answered.
                    let Some(&bad) = rest.get(done) else {
                        return Err(e);
                    };
                    tracing::debug!(object = ?bad, "the server failed while reading an object");
                    each(Got::Unreadable(bad));
                    answered += 1;
                    rest = rest.get(done + 1..).unwrap_or_default();
                    self.failures += 1;
                    self.reopen().await?;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(answered)
    }

    /// A new connection in place of the one the server ended.
    async fn reopen(&mut self) -> Result<(), Error> {
        let remote = match self.client.passphrase_login() {
            Some(login) => self.client.passphrase_remote(login).await?.0,
            None => Remote::new(
                self.client.reconnect_existing().await?,
                self.client.options().server.clone(),
            ),
        };
        let old = std::mem::replace(&mut self.r.remote, remote);
        old.close().await;
        Ok(())
    }
}

/// A snapshot to check: its number and root tree, once its description
/// opened.
struct Snap {
    id: u64,
    root: ObjectId,
}

/// What the passes learn.
struct Found {
    opener: Option<Opener>,
    id_key: IdKey,
    /// Distinct trees met, and those that are damaged, with why.
    trees: IdSet,
    bad_trees: HashMap<ObjectId, String>,
    /// Distinct chunks met, with an estimate of each one's size and its
    /// state.
    content: IdSet,
    estimates: Vec<u32>,
    states: Vec<State>,
    problems: HashMap<u32, String>,
    summary: CheckSummary,
}

impl Found {
    /// Opens and parses a fetched tree.
    fn open_tree(&mut self, got: Got) -> (ObjectId, Result<Vec<Entry>, String>) {
        match got {
            Got::Object(id, sealed) => {
                let Some(opener) = self.opener.as_mut() else {
                    return (id, Err("no opener".into()));
                };
                let entries = opener
                    .open_object(&self.id_key, &id, &sealed, MAX_PLAIN)
                    .map_err(|e| format!("its directory listing does not open ({e})"))
                    .and_then(|plain| {
                        decode_tree(&plain)
                            .map_err(|e| format!("its directory listing does not parse ({e})"))
                    });
                (id, entries)
            }
            Got::Missing(id) => (
                id,
                Err("its directory listing is missing on the server".into()),
            ),
            Got::Unreadable(id) => (id, Err(format!("its directory listing: {UNREADABLE}"))),
        }
    }

    /// Pass 1 for one fetched tree: its subtrees not met yet go on
    /// `stack`, its chunks into `content`.
    fn walked(&mut self, got: Got, stack: &mut Vec<ObjectId>) {
        let (id, entries) = self.open_tree(got);
        let entries = match entries {
            Ok(e) => e,
            Err(problem) => {
                self.bad_trees.insert(id, problem);
                return;
            }
        };
        self.summary.trees += 1;
        for e in entries {
            match e.kind {
                EntryKind::File { size, chunks } => {
                    let n = chunks.len().max(1) as u64;
                    let estimate = size.div_ceil(n).clamp(1, u64::from(chunk::MAX));
                    for c in chunks {
                        if self.content.insert(c) {
                            self.estimates
                                .push(u32::try_from(estimate).unwrap_or(chunk::MAX));
                            self.states.push(State::Held);
                        }
                    }
                }
                EntryKind::Dir { tree } => {
                    if self.trees.insert(tree) {
                        stack.push(tree);
                    }
                }
                EntryKind::Symlink { .. } => {}
            }
        }
    }

    fn set(&mut self, index: u32, state: State, problem: Option<String>) {
        if let Some(s) = self.states.get_mut(index as usize) {
            *s = state;
        }
        if let Some(p) = problem {
            self.problems.insert(index, p);
        }
    }

    /// Why chunk `id` is bad, if it is.
    fn chunk_problem(&self, id: &ObjectId) -> Option<String> {
        let i = self.content.position(id)?;
        match self.states.get(i as usize)? {
            State::Missing => Some("missing on the server".into()),
            State::Damaged => Some(
                self.problems
                    .get(&i)
                    .cloned()
                    .unwrap_or_else(|| "damaged".into()),
            ),
            State::Held | State::Sound => None,
        }
    }
}

/// What opening a batch of chunks found: per chunk, its index, state and
/// why it is damaged.
type Verdicts = Vec<(u32, State, Option<String>)>;

/// Opens the chunks of one fetched batch: its indices and answers.
fn verify(mut opener: Opener, id_key: IdKey, batch: Vec<(u32, Got)>) -> (Opener, Verdicts) {
    let out = batch
        .into_iter()
        .map(|(i, got)| match got {
            Got::Object(id, sealed) => match opener.open_object(&id_key, &id, &sealed, MAX_PLAIN) {
                Ok(_) => (i, State::Sound, None),
                Err(e) => (i, State::Damaged, Some(format!("does not open ({e})"))),
            },
            Got::Missing(_) => (i, State::Missing, None),
            Got::Unreadable(_) => (i, State::Damaged, Some(UNREADABLE.to_owned())),
        })
        .collect();
    (opener, out)
}

/// What a file's bad chunks say, at most three named.
fn file_problem(bad: &[(usize, String)], of: usize) -> String {
    let named: Vec<String> = bad
        .iter()
        .take(3)
        .map(|(i, p)| format!("chunk {}: {p}", i + 1))
        .collect();
    let more = if bad.len() > 3 {
        format!("; and {} more", bad.len() - 3)
    } else {
        String::new()
    };
    format!(
        "{} of its {of} chunk{} cannot be restored: {}{more}",
        bad.len(),
        if of == 1 { "" } else { "s" },
        named.join("; ")
    )
}

fn join(parent: &str, name: &[u8]) -> String {
    let name = String::from_utf8_lossy(name);
    if parent.is_empty() {
        name.into_owned()
    } else {
        format!("{parent}/{name}")
    }
}

struct Checker<'a> {
    conn: Conn<'a>,
    found: Found,
}

impl Checker<'_> {
    /// Pass 1: every distinct tree under `roots`.
    async fn structure(&mut self, roots: &[ObjectId]) -> Result<(), Error> {
        let mut stack: Vec<ObjectId> = Vec::new();
        for root in roots {
            if self.found.trees.insert(*root) {
                stack.push(*root);
            }
        }
        while !stack.is_empty() {
            let batch = stack.split_off(stack.len().saturating_sub(FETCH_IDS));
            let mut got = Vec::with_capacity(batch.len());
            let answered = self.conn.fetch(&batch, |g| got.push(g)).await?;
            for g in got {
                self.found.walked(g, &mut stack);
            }
            if answered < batch.len() {
                return Err(self.gave_up());
            }
        }
        Ok(())
    }

    fn gave_up(&self) -> Error {
        Error::ServerFailed {
            server: self.conn.client.options().server.clone(),
            request: "reading objects for the check".into(),
            times: u8::try_from(self.conn.failures).unwrap_or(u8::MAX),
        }
    }

    /// Pass 2: "have" for every chunk, then the chosen ones read.
    async fn content(&mut self, read: Option<Subset>) -> Result<(), Error> {
        let have = self
            .conn
            .r
            .remote
            .have(self.found.content.as_slice())
            .await?;
        let mut held = Vec::new();
        for (i, h) in have.into_iter().enumerate() {
            let i = u32::try_from(i).unwrap_or(u32::MAX);
            if h {
                held.push(i);
            } else {
                self.found.set(i, State::Missing, None);
            }
        }
        let Some(subset) = read else {
            return Ok(());
        };
        let chosen: Vec<u32> = match subset {
            Subset::All => held,
            Subset::Group { n, of } => held
                .into_iter()
                .filter(|i| {
                    self.found
                        .content
                        .as_slice()
                        .get(*i as usize)
                        .is_some_and(|id| Subset::in_group(id, n, of))
                })
                .collect(),
            Subset::Percent(p) => {
                let want = ((held.len() as f64) * p / 100.0).round() as usize;
                let want = want.clamp(usize::from(!held.is_empty()), held.len());
                let mut picked: Vec<usize> =
                    rand::seq::index::sample(&mut rand::thread_rng(), held.len(), want).into_vec();
                // In the order met, which is about the order stored.
                picked.sort_unstable();
                picked
                    .into_iter()
                    .filter_map(|k| held.get(k).copied())
                    .collect()
            }
        };
        self.read(&chosen).await
    }

    /// Fetches and opens the chunks `chosen` (indices into `content`),
    /// opening one batch while the next is fetched.
    async fn read(&mut self, chosen: &[u32]) -> Result<(), Error> {
        let mut job: Option<tokio::task::JoinHandle<_>> = None;
        let mut next = 0usize;
        while next < chosen.len() {
            let mut indices = Vec::new();
            let mut bytes = 0u64;
            while let Some(&i) = chosen.get(next) {
                let estimate =
                    u64::from(self.found.estimates.get(i as usize).copied().unwrap_or(0));
                if indices.len() == FETCH_IDS
                    || (!indices.is_empty() && bytes + estimate > FETCH_BYTES)
                {
                    break;
                }
                indices.push(i);
                bytes += estimate;
                next += 1;
            }
            let ids: Vec<ObjectId> = indices
                .iter()
                .filter_map(|i| self.found.content.as_slice().get(*i as usize).copied())
                .collect();
            let mut got = Vec::with_capacity(ids.len());
            let answered = self.conn.fetch(&ids, |g| got.push(g)).await?;
            self.found.summary.objects_read +=
                got.iter().filter(|g| matches!(g, Got::Object(..))).count() as u64;
            if let Some(j) = job.take() {
                self.settle(j).await?;
            }
            let opener = self
                .found
                .opener
                .take()
                .ok_or_else(|| Error::Internal("the check lost its opener".into()))?;
            let id_key = self.found.id_key.clone();
            let batch: Vec<(u32, Got)> = indices.iter().copied().zip(got).collect();
            job = Some(tokio::task::spawn_blocking(move || {
                verify(opener, id_key, batch)
            }));
            if answered < ids.len() {
                self.found.summary.unchecked_objects +=
                    (ids.len() - answered + chosen.len() - next) as u64;
                break;
            }
        }
        if let Some(j) = job.take() {
            self.settle(j).await?;
        }
        Ok(())
    }

    async fn settle(
        &mut self,
        job: tokio::task::JoinHandle<(Opener, Verdicts)>,
    ) -> Result<(), Error> {
        let (opener, results) = job
            .await
            .map_err(|e| Error::Internal(format!("check work stopped: {e}")))?;
        self.found.opener = Some(opener);
        for (i, state, problem) in results {
            self.found.set(i, state, problem);
        }
        Ok(())
    }

    /// One tree for pass 3, fetched again; `Err` with why it is damaged.
    async fn tree(&mut self, id: ObjectId) -> Result<Result<Vec<Entry>, String>, Error> {
        let mut got = None;
        let answered = self.conn.fetch(&[id], |g| got = Some(g)).await?;
        match got {
            Some(g) => Ok(self.found.open_tree(g).1),
            None if answered == 0 => Err(self.gave_up()),
            None => Err(Error::Internal("a fetch answered nothing".into())),
        }
    }

    /// Pass 3: names every damaged path of snapshot `snap`, skipping
    /// subtrees found clean (`clean`), and records them.
    async fn paths(&mut self, snap: &Snap, clean: &mut HashSet<ObjectId>) -> Result<(), Error> {
        struct Frame {
            id: ObjectId,
            path: String,
            entries: std::vec::IntoIter<Entry>,
            dirty: bool,
        }
        let mut out: Vec<Damage> = Vec::new();
        let mut report = |path: String, problem: String| {
            out.push(Damage {
                snapshot: snap.id,
                path: if path.is_empty() { "/".into() } else { path },
                problem,
            });
        };
        if clean.contains(&snap.root) {
            return Ok(());
        }
        let mut frames = Vec::new();
        let root = match self.found.bad_trees.get(&snap.root) {
            Some(p) => Err(p.clone()),
            None => self.tree(snap.root).await?,
        };
        match root {
            Ok(entries) => frames.push(Frame {
                id: snap.root,
                path: String::new(),
                entries: entries.into_iter(),
                dirty: false,
            }),
            Err(p) => {
                self.found.bad_trees.insert(snap.root, p.clone());
                report(
                    String::new(),
                    format!("{p}; nothing in the snapshot could be checked"),
                );
            }
        }
        while let Some(frame) = frames.last_mut() {
            let Some(e) = frame.entries.next() else {
                if let Some(done) = frames.pop() {
                    if done.dirty {
                        if let Some(parent) = frames.last_mut() {
                            parent.dirty = true;
                        }
                    } else {
                        clean.insert(done.id);
                    }
                }
                continue;
            };
            let path = join(&frame.path, &e.name);
            match e.kind {
                EntryKind::File { chunks, .. } => {
                    let bad: Vec<(usize, String)> = chunks
                        .iter()
                        .enumerate()
                        .filter_map(|(i, c)| self.found.chunk_problem(c).map(|p| (i, p)))
                        .collect();
                    if !bad.is_empty() {
                        frame.dirty = true;
                        report(path, file_problem(&bad, chunks.len()));
                    }
                }
                EntryKind::Dir { tree } => {
                    if clean.contains(&tree) {
                        continue;
                    }
                    let entries = match self.found.bad_trees.get(&tree) {
                        Some(p) => Err(p.clone()),
                        None => self.tree(tree).await?,
                    };
                    // `frame` was borrowed for `path`; look it up again.
                    match entries {
                        Ok(entries) => frames.push(Frame {
                            id: tree,
                            path,
                            entries: entries.into_iter(),
                            dirty: false,
                        }),
                        Err(p) => {
                            self.found.bad_trees.insert(tree, p.clone());
                            if let Some(f) = frames.last_mut() {
                                f.dirty = true;
                            }
                            report(path, format!("{p}; nothing under it could be checked"));
                        }
                    }
                }
                EntryKind::Symlink { .. } => {}
            }
        }
        self.found.summary.damage.extend(out);
        Ok(())
    }
}

impl Client {
    /// Checks the snapshots `specs` (numbers or `latest`; every snapshot
    /// of this client when empty), reading the content `read` chooses.
    ///
    /// # Errors
    /// When the server cannot be reached or refuses, a named snapshot does
    /// not exist, or the key cannot read (a backup-only key). Damage is
    /// not an error: it is in [`CheckSummary::damage`].
    pub async fn check(
        &self,
        specs: &[String],
        read: Option<Subset>,
    ) -> Result<CheckSummary, Error> {
        let (mut r, _) = match self.reader().await {
            // No snapshot was ever made: nothing to check.
            Err(Error::NoRepositoryKey) if specs.is_empty() => {
                return Ok(CheckSummary {
                    read_data: read.map(|s| s.to_string()),
                    ..CheckSummary::default()
                })
            }
            other => other?,
        };
        let listed = match r.remote.snapshots().await {
            Ok(l) => l,
            Err(e) => {
                r.remote.close().await;
                return Err(e);
            }
        };
        let mut entries = Vec::new();
        for spec in specs {
            let (id, _) = parse_spec(spec);
            let entry = match id {
                None => listed.last(),
                Some(id) => listed.iter().find(|s| s.id == id),
            };
            let Some(entry) = entry else {
                r.remote.close().await;
                return Err(Error::NoSnapshot {
                    server: self.options().server.clone(),
                    what: format!("snapshot {spec}"),
                });
            };
            if !entries
                .iter()
                .any(|e: &&protocol::repo::message::SnapshotEntry| e.id == entry.id)
            {
                entries.push(entry);
            }
        }
        if specs.is_empty() {
            entries = listed.iter().collect();
        }
        let mut summary = CheckSummary {
            read_data: read.map(|s| s.to_string()),
            ..CheckSummary::default()
        };
        let mut snaps = Vec::new();
        for entry in entries {
            summary.snapshots += 1;
            match r.describe(entry) {
                Ok(l) => snaps.push(Snap {
                    id: entry.id,
                    root: l.root,
                }),
                Err(e) => summary.damage.push(Damage {
                    snapshot: entry.id,
                    path: "/".into(),
                    problem: format!("its description does not open ({e})"),
                }),
            }
        }
        let found = Found {
            opener: Some(Opener::new(r.open_key.clone())),
            id_key: r.id_key.clone(),
            trees: IdSet::default(),
            bad_trees: HashMap::new(),
            content: IdSet::default(),
            estimates: Vec::new(),
            states: Vec::new(),
            problems: HashMap::new(),
            summary,
        };
        let mut checker = Checker {
            conn: Conn {
                client: self,
                r,
                failures: 0,
                bytes: 0,
            },
            found,
        };
        let result = checker.run(&snaps, read).await;
        let Checker { conn, found } = checker;
        conn.r.remote.close().await;
        result?;
        let mut summary = found.summary;
        summary.bytes_read = conn.bytes;
        summary.server_failures = conn.failures;
        summary.damaged_trees = found.bad_trees.len() as u64;
        for s in &found.states {
            match s {
                State::Missing => summary.missing_objects += 1,
                State::Damaged => summary.damaged_objects += 1,
                State::Held | State::Sound => {}
            }
        }
        summary
            .damage
            .sort_by(|a, b| (a.snapshot, &a.path).cmp(&(b.snapshot, &b.path)));
        summary.damaged_snapshots = summary.damage.iter().map(|d| d.snapshot).collect();
        summary.damaged_snapshots.dedup();
        Ok(summary)
    }
}

impl Checker<'_> {
    async fn run(&mut self, snaps: &[Snap], read: Option<Subset>) -> Result<(), Error> {
        let roots: Vec<ObjectId> = snaps.iter().map(|s| s.root).collect();
        self.structure(&roots).await?;
        self.found.summary.objects = self.found.content.len() as u64;
        self.content(read).await?;
        let damaged = !self.found.bad_trees.is_empty()
            || self
                .found
                .states
                .iter()
                .any(|s| matches!(s, State::Missing | State::Damaged));
        if damaged {
            let mut clean = HashSet::new();
            for snap in snaps {
                self.paths(snap, &mut clean).await?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_percentages_and_groups_as_restic_does() {
        assert_eq!("5%".parse::<Subset>(), Ok(Subset::Percent(5.0)));
        assert_eq!("0.5%".parse::<Subset>(), Ok(Subset::Percent(0.5)));
        assert_eq!("100%".parse::<Subset>(), Ok(Subset::All));
        assert_eq!("2/5".parse::<Subset>(), Ok(Subset::Group { n: 2, of: 5 }));
        for bad in ["0%", "101%", "-1%", "x%", "0/5", "6/5", "1/0", "5", ""] {
            assert!(bad.parse::<Subset>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_groups_of_a_split_cover_every_id_once() {
        let ids: Vec<ObjectId> = (0..1000u32)
            .map(|n| ObjectId(*blake3::hash(&n.to_le_bytes()).as_bytes()))
            .collect();
        let of = 7;
        let mut total = 0;
        for n in 1..=of {
            let in_group = ids.iter().filter(|id| Subset::in_group(id, n, of)).count();
            assert!(in_group > 0, "group {n} is empty");
            total += in_group;
        }
        assert_eq!(total, ids.len());
    }

    #[test]
    fn names_at_most_three_bad_chunks_of_a_file() {
        let bad: Vec<(usize, String)> = (0..5).map(|i| (i, "missing".to_owned())).collect();
        let text = file_problem(&bad, 9);
        assert!(text.starts_with("5 of its 9 chunks"), "{text}");
        assert!(
            text.contains("chunk 3: missing") && !text.contains("chunk 4"),
            "{text}"
        );
        assert!(text.ends_with("and 2 more"), "{text}");
    }
}
