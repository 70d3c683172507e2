//! `diff A B`: what changed between two snapshots, read from their trees.
//! A subtree with the same id in both is the same and is not opened, so a
//! diff costs in proportion to what changed.

use std::path::PathBuf;

use protocol::repo::message::ObjectId;
use protocol::repo::tree::{Entry, EntryKind};

use super::restore::parse_spec;
use crate::engine::Client;
use crate::error::Error;

/// One difference.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Change {
    /// `+` added, `-` removed, `M` content changed, `T` type changed,
    /// `U` mode or time changed only.
    pub what: &'static str,
    pub path: String,
}

fn kind_name(e: &Entry) -> &'static str {
    match e.kind {
        EntryKind::File { .. } => "file",
        EntryKind::Dir { .. } => "dir",
        EntryKind::Symlink { .. } => "symlink",
    }
}

impl Client {
    /// The changes from snapshot `a` to snapshot `b` (numbers or `latest`).
    ///
    /// # Errors
    /// When either snapshot does not exist or a tree cannot be read.
    pub async fn diff(&self, a: &str, b: &str) -> Result<(u64, u64, Vec<Change>), Error> {
        let (ia, _) = parse_spec(a);
        let (ib, _) = parse_spec(b);
        let (mut r, _) = self.reader().await?;
        let result = async {
            let sa = self.pick(&mut r, ia).await?;
            let sb = self.pick(&mut r, ib).await?;
            let mut out = Vec::new();
            let mut stack: Vec<(PathBuf, ObjectId, ObjectId)> =
                vec![(PathBuf::new(), sa.root, sb.root)];
            while let Some((at, ta, tb)) = stack.pop() {
                if ta == tb {
                    continue;
                }
                let shown = at.display().to_string();
                let ea = r.tree(ta, &shown).await?;
                let eb = r.tree(tb, &shown).await?;
                let (mut i, mut j) = (0, 0);
                while i < ea.len() || j < eb.len() {
                    let order = match (ea.get(i), eb.get(j)) {
                        (Some(x), Some(y)) => x.name.cmp(&y.name),
                        (Some(_), None) => std::cmp::Ordering::Less,
                        _ => std::cmp::Ordering::Greater,
                    };
                    let name_of = |e: &Entry| at.join(String::from_utf8_lossy(&e.name).as_ref());
                    match order {
                        std::cmp::Ordering::Less => {
                            if let Some(x) = ea.get(i) {
                                out.push(Change {
                                    what: "-",
                                    path: name_of(x).display().to_string(),
                                });
                            }
                            i += 1;
                        }
                        std::cmp::Ordering::Greater => {
                            if let Some(y) = eb.get(j) {
                                out.push(Change {
                                    what: "+",
                                    path: name_of(y).display().to_string(),
                                });
                            }
                            j += 1;
                        }
                        std::cmp::Ordering::Equal => {
                            if let (Some(x), Some(y)) = (ea.get(i), eb.get(j)) {
                                let path = name_of(x);
                                match (&x.kind, &y.kind) {
                                    (EntryKind::Dir { tree: a }, EntryKind::Dir { tree: b }) => {
                                        stack.push((path.clone(), *a, *b));
                                    }
                                    _ if kind_name(x) != kind_name(y) => {
                                        out.push(Change {
                                            what: "T",
                                            path: path.display().to_string(),
                                        });
                                    }
                                    (a, b) if a != b => {
                                        out.push(Change {
                                            what: "M",
                                            path: path.display().to_string(),
                                        });
                                    }
                                    _ if x.mode != y.mode
                                        || x.mtime_s != y.mtime_s
                                        || x.mtime_ns != y.mtime_ns =>
                                    {
                                        out.push(Change {
                                            what: "U",
                                            path: path.display().to_string(),
                                        });
                                    }
                                    _ => {}
                                }
                            }
                            i += 1;
                            j += 1;
                        }
                    }
                }
            }
            out.sort_by(|x, y| x.path.cmp(&y.path));
            Ok((sa.id, sb.id, out))
        }
        .await;
        r.remote.close().await;
        result
    }
}
