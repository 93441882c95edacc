//! Group commit for callers: concurrent single calls (a start, a publish) share one write.
//!
//! A caller whose call finds no write in flight writes at once, alone: no added latency. Calls
//! that arrive while a write is on disk queue, and the next of them to get the write lock writes
//! every call queued so far in one transaction. Each caller's answer comes only after the write
//! that holds its items committed (G1), and answers each of its items in order.
//!
//! A write runs in a task of its own, so that a caller that gives up waiting (an HTTP client
//! that disconnects) cancels neither the write nor the answers of the callers it carries.
//!
//! When a shared write fails, no caller pays for another's input: an error worth retrying (the
//! database is away) is given to each caller as its own copy; any other error (a refusal) sends
//! each call to be written alone, so that only the call at fault gets it.

use std::future::Future;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use crate::store::StoreError;

/// One caller's items, and where its answer goes.
struct Pending<T, R> {
    items: Vec<T>,
    answer: oneshot::Sender<Result<Vec<R>, StoreError>>,
}

/// Concurrent calls of items `T`, each item answered by an `R`, written together by a writer
/// function (see the module docs).
pub(crate) struct Grouped<T, R> {
    queue: Mutex<Vec<Pending<T, R>>>,
    writing: Arc<tokio::sync::Mutex<()>>,
    /// The most items one write takes, unless a single call brings more.
    max_items: usize,
}

impl<T, R> std::fmt::Debug for Grouped<T, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grouped")
            .field("max_items", &self.max_items)
            .finish_non_exhaustive()
    }
}

impl<T, R> Grouped<T, R>
where
    T: Clone + Send + 'static,
    R: Send + 'static,
{
    /// Calls written together, at most `max_items` items a write (a single larger call is
    /// written alone).
    pub(crate) fn new(max_items: usize) -> Self {
        Self {
            queue: Mutex::new(Vec::new()),
            writing: Arc::new(tokio::sync::Mutex::new(())),
            max_items: max_items.max(1),
        }
    }

    /// Writes `items`, with whatever other calls are queued, through `write`, which takes the
    /// items of every call in the write, in order, and answers each. Returns this call's answers
    /// once they are durable.
    ///
    /// # Errors
    /// What `write` returned for this call's items (see the module docs).
    pub(crate) async fn call<W, Fut>(&self, items: Vec<T>, write: W) -> Result<Vec<R>, StoreError>
    where
        W: Fn(Vec<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<R>, StoreError>> + Send + 'static,
    {
        let (answer, mut answered) = oneshot::channel();
        self.lock_queue().push(Pending { items, answer });
        let write = Arc::new(write);
        loop {
            let lock = tokio::select! {
                biased;
                done = &mut answered => return done.unwrap_or_else(|_| Err(lost())),
                lock = self.writing.clone().lock_owned() => lock,
            };
            // Written meanwhile by the caller before us.
            if let Ok(done) = answered.try_recv() {
                return done;
            }
            let batch = self.take_batch();
            if !batch.is_empty() {
                let write = write.clone();
                // Its own task: cancelling this caller cancels neither the write nor the
                // answers of the callers in it; the write lock is held until it ends.
                let _ = tokio::spawn(async move {
                    write_batch(batch, write.as_ref()).await;
                    drop(lock);
                })
                .await;
            }
            // Ours was in the batch (answered now), or was past its limit: go again.
        }
    }

    fn lock_queue(&self) -> std::sync::MutexGuard<'_, Vec<Pending<T, R>>> {
        // A panic while the queue was held left it whole (pushes and drains only).
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The calls queued first, up to `max_items` items (at least one call).
    fn take_batch(&self) -> Vec<Pending<T, R>> {
        let mut queue = self.lock_queue();
        let mut items = 0;
        let mut n = 0;
        for pending in queue.iter() {
            if n > 0 && items + pending.items.len() > self.max_items {
                break;
            }
            items += pending.items.len();
            n += 1;
        }
        queue.drain(..n).collect()
    }
}

/// Writes `batch` in one call of `write` and answers each caller; see the module docs for a
/// failed shared write.
async fn write_batch<T, R, W, Fut>(batch: Vec<Pending<T, R>>, write: &W)
where
    T: Clone,
    W: Fn(Vec<T>) -> Fut,
    Fut: Future<Output = Result<Vec<R>, StoreError>>,
{
    if batch.len() == 1 {
        for Pending { items, answer } in batch {
            let _ = answer.send(write(items).await);
        }
        return;
    }
    let total: usize = batch.iter().map(|p| p.items.len()).sum();
    let all: Vec<T> = batch.iter().flat_map(|p| p.items.iter().cloned()).collect();
    match write(all).await {
        Ok(out) if out.len() == total => {
            let mut out = out.into_iter();
            for Pending { items, answer } in batch {
                let _ = answer.send(Ok(out.by_ref().take(items.len()).collect()));
            }
        }
        Ok(out) => {
            let why = format!("a grouped write answered {} items of {total}", out.len());
            for pending in batch {
                let _ = pending.answer.send(Err(StoreError::Corrupt(why.clone())));
            }
        }
        Err(e) if shared_error(&e).is_some() => {
            for pending in batch {
                if let Some(copy) = shared_error(&e) {
                    let _ = pending.answer.send(Err(copy));
                }
            }
        }
        Err(_) => {
            // Refused: each call alone, so that only the one at fault is refused.
            for Pending { items, answer } in batch {
                let _ = answer.send(write(items).await);
            }
        }
    }
}

/// A copy of a write's error for each caller in it, for errors worth retrying (the database is
/// away, or a test's injected fault); `None` for the others.
fn shared_error(e: &StoreError) -> Option<StoreError> {
    match e {
        StoreError::Unavailable(source) => Some(StoreError::Unavailable(sqlx::Error::Io(
            std::io::Error::other(source.to_string()),
        ))),
        StoreError::Injected(at) => Some(StoreError::Injected(at)),
        _ => None,
    }
}

/// The write holding a call ended without answering it (its task panicked).
fn lost() -> StoreError {
    StoreError::Unavailable(sqlx::Error::Io(std::io::Error::other(
        "the write holding this call ended without an answer",
    )))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    /// A writer that takes `pause` a write, answers each item with its double, records the size
    /// of every write, and refuses any write holding `refuse`.
    fn writer(
        pause: Duration,
        refuse: Option<u32>,
        sizes: Arc<Mutex<Vec<usize>>>,
    ) -> impl Fn(Vec<u32>) -> futures_util::future::BoxFuture<'static, Result<Vec<u32>, StoreError>>
           + Send
           + Sync
           + 'static {
        move |items: Vec<u32>| {
            let sizes = sizes.clone();
            Box::pin(async move {
                tokio::time::sleep(pause).await;
                sizes.lock().unwrap().push(items.len());
                if refuse.is_some_and(|r| items.contains(&r)) {
                    return Err(StoreError::Refused(format!("{refuse:?} is refused")));
                }
                Ok(items.iter().map(|i| i * 2).collect())
            })
        }
    }

    async fn call_all(
        grouped: &Arc<Grouped<u32, u32>>,
        n: u32,
        refuse: Option<u32>,
        sizes: &Arc<Mutex<Vec<usize>>>,
    ) -> Vec<(u32, Result<Vec<u32>, StoreError>)> {
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..n {
            let (grouped, sizes) = (grouped.clone(), sizes.clone());
            tasks.spawn(async move {
                let out = grouped
                    .call(vec![i], writer(Duration::from_millis(5), refuse, sizes))
                    .await;
                (i, out)
            });
        }
        let mut out = Vec::new();
        while let Some(done) = tasks.join_next().await {
            out.push(done.expect("task"));
        }
        out
    }

    #[tokio::test]
    async fn a_lone_call_is_written_at_once_and_alone() {
        let grouped = Grouped::new(100);
        let sizes = Arc::default();
        let out = grouped
            .call(vec![7], writer(Duration::ZERO, None, Arc::clone(&sizes)))
            .await
            .expect("written");
        assert_eq!(out, vec![14]);
        assert_eq!(*sizes.lock().unwrap(), vec![1]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_calls_share_writes_and_each_gets_its_own_answers() {
        let grouped = Arc::new(Grouped::new(1_000));
        let sizes = Arc::default();
        let out = call_all(&grouped, 200, None, &sizes).await;
        for (i, answer) in out {
            assert_eq!(answer.expect("written"), vec![i * 2]);
        }
        let sizes = sizes.lock().unwrap().clone();
        assert_eq!(sizes.iter().sum::<usize>(), 200, "every item written once");
        assert!(
            sizes.len() <= 20,
            "200 concurrent calls took {} writes: {sizes:?}",
            sizes.len()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_takes_at_most_its_limit_of_items() {
        let grouped = Arc::new(Grouped::new(8));
        let sizes = Arc::default();
        let out = call_all(&grouped, 100, None, &sizes).await;
        assert!(out.iter().all(|(_, a)| a.is_ok()));
        let sizes = sizes.lock().unwrap().clone();
        assert!(
            sizes.iter().any(|&s| s > 1),
            "no write was shared: {sizes:?}"
        );
        assert!(
            sizes.iter().all(|&s| s <= 8),
            "a write took more than 8: {sizes:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_call_fails_alone_and_the_calls_written_with_it_succeed() {
        let grouped = Arc::new(Grouped::new(1_000));
        let sizes = Arc::default();
        let out = call_all(&grouped, 100, Some(13), &sizes).await;
        for (i, answer) in out {
            match answer {
                Ok(doubled) => assert_eq!(doubled, vec![i * 2]),
                Err(e) => {
                    assert_eq!(i, 13, "call {i} failed: {e}");
                    assert!(e.is_refusal(), "{e}");
                }
            }
        }
        assert!(
            sizes.lock().unwrap().iter().any(|&s| s > 1),
            "the calls were never grouped, so the refusal was never shared"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_outage_reaches_every_caller_as_worth_retrying() {
        let grouped: Arc<Grouped<u32, u32>> = Arc::new(Grouped::new(1_000));
        let writes = Arc::new(AtomicUsize::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..50 {
            let (grouped, writes) = (grouped.clone(), writes.clone());
            tasks.spawn(async move {
                grouped
                    .call(vec![i], move |_items| {
                        let writes = writes.clone();
                        async move {
                            writes.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(5)).await;
                            Err::<Vec<u32>, _>(StoreError::Unavailable(sqlx::Error::PoolTimedOut))
                        }
                    })
                    .await
            });
        }
        while let Some(done) = tasks.join_next().await {
            let e = done.expect("task").expect_err("the database is away");
            assert!(e.is_retryable(), "{e}");
        }
        assert!(
            writes.load(Ordering::SeqCst) < 50,
            "the outage was not shared"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_caller_that_gives_up_does_not_cancel_the_write_it_leads() {
        let grouped = Arc::new(Grouped::new(1_000));
        let finished = Arc::new(AtomicUsize::new(0));
        let slow = {
            let finished = finished.clone();
            move |items: Vec<u32>| {
                let finished = finished.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    finished.fetch_add(items.len(), Ordering::SeqCst);
                    Ok(items)
                }
            }
        };
        let leader = {
            let (grouped, slow) = (grouped.clone(), slow.clone());
            tokio::spawn(async move { grouped.call(vec![1], slow).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        leader.abort();
        // The next call waits for the write in flight, then writes its own.
        let out = grouped.call(vec![2], slow).await.expect("written");
        assert_eq!(out, vec![2]);
        assert_eq!(
            finished.load(Ordering::SeqCst),
            2,
            "the write of the caller that gave up was cancelled"
        );
    }
}
