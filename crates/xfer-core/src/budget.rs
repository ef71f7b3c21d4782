//! [`MemoryBudget`]: one bound on the chunk and frame buffers of a whole process, shared by
//! every connection, handed out first come, first served.
//!
//! A buffer is reserved before it is allocated and released after it is freed, so the bytes
//! allocated never exceed the budget. A connection that cannot reserve waits (and so stops
//! reading its socket: TCP slows its sender down); waiters are served in the order they
//! arrived, because tokio's semaphore is fair.

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Bytes of buffer a process may hold at once, shared by every clone.
#[derive(Debug, Clone)]
pub struct MemoryBudget {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    permits: Arc<Semaphore>,
    total: usize,
    /// Reservations waiting for bytes right now.
    waiting: AtomicUsize,
    /// Reservations that had to wait, since the start.
    waits: AtomicU64,
    /// Bytes handed back since the start (buffers freed).
    released: AtomicU64,
}

/// Bytes reserved from a [`MemoryBudget`]; handed back when dropped.
#[derive(Debug)]
pub struct Reservation {
    permit: Option<OwnedSemaphorePermit>,
    inner: Arc<Inner>,
}

impl MemoryBudget {
    /// A budget of `total` bytes (at most tokio's semaphore limit, about 2^61).
    pub fn new(total: usize) -> Self {
        let total = total.clamp(1, Semaphore::MAX_PERMITS);
        Self {
            inner: Arc::new(Inner {
                permits: Arc::new(Semaphore::new(total)),
                total,
                waiting: AtomicUsize::new(0),
                waits: AtomicU64::new(0),
                released: AtomicU64::new(0),
            }),
        }
    }

    /// The budget's size in bytes.
    pub fn total(&self) -> usize {
        self.inner.total
    }

    /// Bytes reserved now.
    pub fn in_use(&self) -> usize {
        self.inner.total - self.inner.permits.available_permits()
    }

    /// Reservations waiting for bytes now.
    pub fn waiting(&self) -> usize {
        self.inner.waiting.load(Ordering::Relaxed)
    }

    /// Reservations that had to wait for bytes, since the budget was made.
    pub fn waits(&self) -> u64 {
        self.inner.waits.load(Ordering::Relaxed)
    }

    /// Bytes handed back since the budget was made; a change means buffers were freed.
    pub fn released(&self) -> u64 {
        self.inner.released.load(Ordering::Relaxed)
    }

    /// Reserves `len` bytes, waiting behind every earlier reservation until they are free.
    /// A request larger than the whole budget gets the whole budget (once everything else is
    /// back), so it still makes progress; callers refuse such sizes up front.
    ///
    /// The future owns its place in the queue: keep it (not the call) across `select!` loops,
    /// or a waiter that is polled again rejoins at the back.
    ///
    /// # Cancel safety
    /// Dropping the future leaves the queue and gives back nothing it did not get.
    pub fn reserve(&self, len: usize) -> impl Future<Output = Reservation> + Send + 'static {
        let inner = Arc::clone(&self.inner);
        let want = len.min(inner.total);
        async move {
            let permit = match Arc::clone(&inner.permits).try_acquire_many_owned(permits(want)) {
                Ok(permit) => permit,
                Err(_) => {
                    let _waiting = Waiting::new(&inner);
                    Arc::clone(&inner.permits)
                        .acquire_many_owned(permits(want))
                        .await
                        .expect("the budget's semaphore is never closed")
                }
            };
            Reservation {
                permit: Some(permit),
                inner,
            }
        }
    }
}

/// Bytes as semaphore permits: a frame is far below 4 GiB, and the budget clamps the rest.
fn permits(bytes: usize) -> u32 {
    u32::try_from(bytes).unwrap_or(u32::MAX)
}

impl Reservation {
    /// Bytes this reservation holds.
    pub fn len(&self) -> usize {
        self.permit
            .as_ref()
            .map_or(0, OwnedSemaphorePermit::num_permits)
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(permit) = self.permit.take() {
            let len = permit.num_permits() as u64;
            drop(permit);
            self.inner.released.fetch_add(len, Ordering::Relaxed);
        }
    }
}

/// Counts one waiting reservation while alive (also when the wait is cancelled).
struct Waiting<'a>(&'a Inner);

impl<'a> Waiting<'a> {
    fn new(inner: &'a Inner) -> Self {
        inner.waits.fetch_add(1, Ordering::Relaxed);
        inner.waiting.fetch_add(1, Ordering::Relaxed);
        Self(inner)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reservations_are_bounded_and_given_back_on_drop() {
        let budget = MemoryBudget::new(100);
        let a = budget.reserve(60).await;
        assert_eq!((budget.in_use(), a.len()), (60, 60));
        let mut b = Box::pin(budget.reserve(60));
        assert!(futures_poll_once(&mut b).is_none(), "60 + 60 > 100");
        assert_eq!(budget.waiting(), 1);
        drop(a);
        let b = b.await;
        assert_eq!((budget.in_use(), budget.waiting(), b.len()), (60, 0, 60));
        assert_eq!(budget.waits(), 1);
        drop(b);
        assert_eq!((budget.in_use(), budget.released()), (0, 120));
    }

    #[tokio::test]
    async fn waiters_are_served_in_turn() {
        let budget = MemoryBudget::new(10);
        let held = budget.reserve(10).await;
        // A large request first, then a small one: the small one does not overtake it.
        let mut large = Box::pin(budget.reserve(8));
        let mut small = Box::pin(budget.reserve(2));
        assert!(futures_poll_once(&mut large).is_none());
        assert!(futures_poll_once(&mut small).is_none());
        drop(held);
        let large = large.await;
        let small = small.await;
        assert_eq!((large.len(), small.len(), budget.in_use()), (8, 2, 10));
    }

    #[tokio::test]
    async fn a_request_larger_than_the_budget_gets_all_of_it() {
        let budget = MemoryBudget::new(10);
        let all = budget.reserve(1000).await;
        assert_eq!(all.len(), 10);
    }

    #[tokio::test]
    async fn a_cancelled_wait_leaves_the_count() {
        let budget = MemoryBudget::new(10);
        let _held = budget.reserve(10).await;
        let mut waiting = Box::pin(budget.reserve(1));
        assert!(futures_poll_once(&mut waiting).is_none());
        assert_eq!(budget.waiting(), 1);
        drop(waiting);
        assert_eq!((budget.waiting(), budget.in_use()), (0, 10));
    }

    /// Polls a future once with a no-op waker.
    fn futures_poll_once<F: Future + Unpin>(f: &mut F) -> Option<F::Output> {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match std::pin::Pin::new(f).poll(&mut cx) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        }
    }
}
