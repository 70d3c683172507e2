//! One run over several connections at once, for backup and restore alike:
//! a queue of items, the first worker over the connection already open, one
//! further connection opened (once) per further worker, and the results in
//! the order of the items.
//!
//! Every worker runs on the caller's task: the work per item is I/O and the
//! server's syncs, which is what several connections overlap; so the queue
//! is a `RefCell`, not a lock.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;

use futures::future::{join_all, Either};

use crate::error::Error;
use crate::feedback::Feedback;

/// A failure of one item (a file sent or restored), and whether its
/// connection can still be used (nothing, or a whole request sequence, was
/// sent).
#[derive(Debug)]
pub struct ItemFailure {
    pub error: Error,
    pub connection_usable: bool,
}

impl From<Error> for ItemFailure {
    /// A failure that ends the connection.
    fn from(error: Error) -> Self {
        Self {
            error,
            connection_usable: false,
        }
    }
}

/// The items of a run not yet taken by a connection, each with its index.
#[derive(Debug)]
pub struct Queue<T> {
    items: RefCell<VecDeque<(usize, T)>>,
}

impl<T> Queue<T> {
    /// A queue of `items`, indexed in their order.
    pub fn new(items: impl IntoIterator<Item = T>) -> Self {
        Self {
            items: RefCell::new(items.into_iter().enumerate().collect()),
        }
    }

    /// The next item and its index.
    pub fn take(&self) -> Option<(usize, T)> {
        self.items.borrow_mut().pop_front()
    }

    /// Items not yet taken.
    pub fn len(&self) -> usize {
        self.items.borrow().len()
    }

    /// Whether every item was taken.
    pub fn is_empty(&self) -> bool {
        self.items.borrow().is_empty()
    }

    /// The items no connection took.
    pub fn into_rest(self) -> Vec<(usize, T)> {
        self.items.into_inner().into()
    }
}

/// Runs `work` over `first` and over up to `connections - 1` further
/// connections (no more than there are items in `queue`), each opened once
/// by `open_extra` when its worker starts and items are left. A connection
/// that cannot be opened is reported ("going on with fewer") and leaves its
/// share to the others. `work` takes items from `queue` until it is empty
/// or the connection fails. Returns what the workers returned, by item
/// index; the items no worker took stay in `queue`.
pub async fn fan_out<C, T, R, OF, WF>(
    feedback: &dyn Feedback,
    server: &str,
    connections: u16,
    queue: &Queue<T>,
    first: C,
    open_extra: impl Fn() -> OF,
    work: impl Fn(C) -> WF,
) -> Vec<(usize, R)>
where
    OF: Future<Output = Result<C, Error>>,
    WF: Future<Output = Vec<(usize, R)>>,
{
    let extra = usize::from(connections.max(1))
        .min(queue.len())
        .saturating_sub(1);
    let (open_extra, work) = (&open_extra, &work);
    let mut workers = vec![Either::Left(work(first))];
    for n in 0..extra {
        workers.push(Either::Right(async move {
            if queue.is_empty() {
                return Vec::new();
            }
            match open_extra().await {
                Ok(conn) => work(conn).await,
                Err(e) => {
                    feedback.notice(&format!(
                        "could not open connection {} to {server} ({e}); going on with fewer",
                        n + 2
                    ));
                    Vec::new()
                }
            }
        }));
    }
    let mut done: Vec<(usize, R)> = join_all(workers).await.into_iter().flatten().collect();
    done.sort_by_key(|(i, _)| *i);
    done
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::feedback::Silent;
    use std::cell::Cell;

    /// A worker that takes items until the queue is empty (or `stop_at`).
    async fn drain(queue: &Queue<char>, conn: u32, stop_at: Option<char>) -> Vec<(usize, String)> {
        let mut done = Vec::new();
        while let Some((i, c)) = queue.take() {
            done.push((i, format!("{c}{conn}")));
            tokio::task::yield_now().await;
            if Some(c) == stop_at {
                break;
            }
        }
        done
    }

    #[tokio::test]
    async fn returns_results_in_item_order_over_every_connection() {
        let queue = Queue::new("abcdef".chars());
        let opened = Cell::new(1u32);
        let done = fan_out(
            &Silent,
            "s",
            3,
            &queue,
            1u32,
            || {
                opened.set(opened.get() + 1);
                let n = opened.get();
                async move { Ok(n) }
            },
            |conn| drain(&queue, conn, None),
        )
        .await;
        assert_eq!(opened.get(), 3, "two extra connections, each opened once");
        let indices: Vec<usize> = done.iter().map(|(i, _)| *i).collect();
        assert_eq!(indices, [0, 1, 2, 3, 4, 5]);
        assert!(queue.is_empty());
    }

    #[tokio::test]
    async fn goes_on_with_fewer_when_an_extra_connection_fails_and_leaves_the_rest() {
        let queue = Queue::new("abcd".chars());
        let done = fan_out(
            &Silent,
            "s",
            2,
            &queue,
            1u32,
            || async { Err(Error::Internal("refused".into())) },
            |conn| drain(&queue, conn, Some('b')),
        )
        .await;
        assert_eq!(done, [(0, "a1".to_string()), (1, "b1".to_string())]);
        assert_eq!(queue.into_rest(), [(2, 'c'), (3, 'd')]);
    }

    #[tokio::test]
    async fn opens_no_more_connections_than_items() {
        let queue = Queue::new("a".chars());
        let opened = Cell::new(0u32);
        fan_out(
            &Silent,
            "s",
            8,
            &queue,
            1u32,
            || {
                opened.set(opened.get() + 1);
                async { Ok(2) }
            },
            |conn| drain(&queue, conn, None),
        )
        .await;
        assert_eq!(opened.get(), 0);
    }
}
