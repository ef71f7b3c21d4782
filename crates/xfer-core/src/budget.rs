//! [`MemoryBudget`]: one bound on the chunk and frame buffers of a whole process, shared by
//! every connection, handed out first come, first served.
//!
//! A buffer is reserved before it is allocated and released after it is freed, so the bytes
//! allocated never exceed the budget. A connection that cannot reserve waits (and so stops
//! reading its socket: TCP slows its sender down); waiters are served in the order they
//! arrived, because tokio's semaphore is fair.
//!
//! A freed chunk buffer may be kept, still reserved, for the next reservation it fits
//! ([`Reservation::buffer`], [`Reservation::recycle`]): a fresh buffer costs a page fault and a
//! zeroed page per 4 KiB, which was a fifth of a receiver's CPU. Spares never make anyone wait:
//! a reservation that would wait frees them first, and none is kept while one waits.

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

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
    /// Bytes handed back since the start (buffers freed, or kept as spares).
    released: AtomicU64,
    /// Freed buffers kept with their reservations, at most [`SPARE_BUFFERS`].
    spares: Mutex<Vec<Spare>>,
    /// Bytes the spares hold reserved; changed under the `spares` lock.
    spare_bytes: AtomicUsize,
}

/// Spare buffers a budget keeps: enough for the chunks a few connections have between being
/// written (or sent) and the next being read, few enough that what a burst leaves is small.
const SPARE_BUFFERS: usize = 8;
/// Buffers smaller than this are freed, not kept: the allocator serves them without faults.
const MIN_SPARE: usize = 256 * 1024;

/// A freed buffer and the bytes reserved for it (at least its capacity).
#[derive(Debug)]
struct Spare {
    buf: Vec<u8>,
    permit: OwnedSemaphorePermit,
}

impl Inner {
    fn lock_spares(&self) -> std::sync::MutexGuard<'_, Vec<Spare>> {
        // A panic while holding the lock leaves a plain list behind; keep going with it.
        self.spares.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Frees every spare buffer and hands its bytes back.
    fn drop_spares(&self) {
        let spares = {
            let mut list = self.lock_spares();
            self.spare_bytes.store(0, Ordering::Relaxed);
            std::mem::take(&mut *list)
        };
        for Spare { buf, permit } in spares {
            // Freed first, then released: the budget never counts less than is allocated.
            drop(buf);
            drop(permit);
        }
    }
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
                spares: Mutex::default(),
                spare_bytes: AtomicUsize::new(0),
            }),
        }
    }

    /// The budget's size in bytes.
    pub fn total(&self) -> usize {
        self.inner.total
    }

    /// Bytes reserved now by buffers in use (the spares' bytes are [`MemoryBudget::spare_bytes`]).
    pub fn in_use(&self) -> usize {
        // Read apart from each other: saturating, as a spare may change in between.
        (self.inner.total - self.inner.permits.available_permits())
            .saturating_sub(self.spare_bytes())
    }

    /// Bytes reserved now by spare buffers kept for reuse.
    pub fn spare_bytes(&self) -> usize {
        self.inner.spare_bytes.load(Ordering::Relaxed)
    }

    /// Reservations waiting for bytes now.
    pub fn waiting(&self) -> usize {
        self.inner.waiting.load(Ordering::Relaxed)
    }

    /// Reservations that had to wait for bytes, since the budget was made.
    pub fn waits(&self) -> u64 {
        self.inner.waits.load(Ordering::Relaxed)
    }

    /// Bytes handed back since the budget was made; a change means buffers were freed or kept
    /// as spares.
    pub fn released(&self) -> u64 {
        self.inner.released.load(Ordering::Relaxed)
    }

    /// Frees the spare buffers kept for reuse: once the process goes quiet, their memory is
    /// better back with the system.
    pub fn drop_spares(&self) {
        self.inner.drop_spares();
    }

    /// Spare buffers kept now.
    pub fn spares(&self) -> usize {
        self.inner.lock_spares().len()
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
                    // Counted as waiting before the spares go: none is kept from now on.
                    let _waiting = Waiting::new(&inner);
                    inner.drop_spares();
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

    /// `len` of the bytes this reservation holds (all of them, if fewer), split off into a
    /// reservation of their own: one reservation taken at once for two buffers, so that
    /// neither is waited for while the other is held.
    pub fn split(&mut self, len: usize) -> Self {
        let permit = self
            .permit
            .as_mut()
            .and_then(|p| p.split(len.min(p.num_permits())));
        Self {
            permit,
            inner: Arc::clone(&self.inner),
        }
    }

    /// A buffer of `len` bytes (at most this reservation's) and what pays for it: a spare the
    /// budget kept, with its own reservation (this one is handed back), or else a fresh one,
    /// zeroed, with this reservation. A spare's content is left over from its last use.
    pub fn buffer(self, len: usize) -> (Vec<u8>, Self) {
        let spare = {
            let mut spares = self.inner.lock_spares();
            // Only a spare no more than twice the size: a small frame does not hold a large
            // buffer's bytes.
            let fits = spares
                .iter()
                .position(|s| s.buf.capacity() >= len && s.buf.capacity() / 2 <= len);
            let spare = fits.map(|i| spares.swap_remove(i));
            if let Some(spare) = &spare {
                self.inner
                    .spare_bytes
                    .fetch_sub(spare.permit.num_permits(), Ordering::Relaxed);
            }
            spare
        };
        match spare {
            Some(Spare { mut buf, permit }) => {
                let reservation = Self {
                    permit: Some(permit),
                    inner: Arc::clone(&self.inner),
                };
                // Within its capacity: no allocation, and zeros only past its old length.
                buf.resize(len, 0);
                (buf, reservation)
            }
            // Allocated zeroed: fresh pages from the kernel, no memset.
            None => (vec![0; len], self),
        }
    }

    /// Frees `buf` (allocated under this reservation) and hands the reservation back, or keeps
    /// both as a spare for [`Reservation::buffer`] while nobody waits for bytes.
    pub fn recycle(mut self, buf: Vec<u8>) {
        let Some(permit) = self.permit.take() else {
            return;
        };
        let len = permit.num_permits() as u64;
        let keep = buf.capacity() >= MIN_SPARE && buf.capacity() <= permit.num_permits();
        let mut spares = self.inner.lock_spares();
        // Read under the lock a waiter takes to empty the list (after counting itself): a
        // spare is either seen and freed by it, or not kept.
        if keep && self.inner.waiting.load(Ordering::SeqCst) == 0 {
            // The oldest spare gives way: buffers of a kind no longer used (a tree's large
            // files, done) must not keep out those of the work going on (its small files).
            if spares.len() >= SPARE_BUFFERS {
                let oldest = spares.remove(0);
                self.inner
                    .spare_bytes
                    .fetch_sub(oldest.permit.num_permits(), Ordering::Relaxed);
            }
            self.inner
                .spare_bytes
                .fetch_add(permit.num_permits(), Ordering::Relaxed);
            spares.push(Spare { buf, permit });
        } else {
            drop(spares);
            drop(buf);
            drop(permit);
        }
        self.inner.released.fetch_add(len, Ordering::Relaxed);
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
        inner.waiting.fetch_add(1, Ordering::SeqCst);
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
    async fn a_split_reservation_gives_each_part_back_on_its_own() {
        let budget = MemoryBudget::new(100);
        let mut whole = budget.reserve(100).await;
        let part = whole.split(40);
        assert_eq!((whole.len(), part.len()), (60, 40));
        assert_eq!(budget.in_use(), 100);
        drop(part);
        assert_eq!(budget.in_use(), 60);
        // More than it holds splits off all of it.
        let rest = whole.split(1000);
        assert_eq!((whole.len(), rest.len()), (0, 60));
        drop(rest);
        assert_eq!(budget.in_use(), 0);
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

    const CHUNK: usize = 1 << 20;

    #[tokio::test]
    async fn a_recycled_buffer_is_reused_with_its_reservation() {
        let budget = MemoryBudget::new(4 * CHUNK);
        let (buf, held) = budget.reserve(CHUNK).await.buffer(CHUNK);
        held.recycle(buf);
        // Kept, and still reserved: the budget never counts less than is allocated.
        assert_eq!(
            (budget.spares(), budget.spare_bytes(), budget.in_use()),
            (1, CHUNK, 0)
        );
        let (buf, held) = budget.reserve(CHUNK).await.buffer(CHUNK);
        // The spare was taken and the new reservation handed back in its place.
        assert_eq!((budget.spares(), budget.in_use()), (0, CHUNK));
        assert_eq!((buf.len(), held.len()), (CHUNK, CHUNK));
        // A smaller buffer fits in a spare at most twice its size; a larger one never does.
        held.recycle(buf);
        let (small, small_held) = budget.reserve(CHUNK / 2).await.buffer(CHUNK / 2);
        assert_eq!(
            (budget.spares(), small.len(), small_held.len()),
            (0, CHUNK / 2, CHUNK)
        );
        small_held.recycle(small);
        let (large, large_held) = budget.reserve(2 * CHUNK).await.buffer(2 * CHUNK);
        assert_eq!((budget.spares(), large.len()), (1, 2 * CHUNK));
        drop((large, large_held));
        budget.drop_spares();
        assert_eq!(
            (budget.spares(), budget.spare_bytes(), budget.in_use()),
            (0, 0, 0)
        );
    }

    #[tokio::test]
    async fn spares_never_make_a_reservation_wait() {
        let budget = MemoryBudget::new(2 * CHUNK);
        let (a, a_held) = budget.reserve(CHUNK).await.buffer(CHUNK);
        let (b, b_held) = budget.reserve(CHUNK).await.buffer(CHUNK);
        a_held.recycle(a);
        // The whole budget is held, half of it by a spare: a reservation frees the spare
        // instead of waiting for it.
        let mut next = Box::pin(budget.reserve(CHUNK));
        let next = futures_poll_once(&mut next).expect("the spare was freed for it");
        assert_eq!((budget.spares(), budget.in_use()), (0, 2 * CHUNK));
        // While one waits, a freed buffer is not kept: it goes to the waiter.
        let mut waiter = Box::pin(budget.reserve(CHUNK));
        assert!(futures_poll_once(&mut waiter).is_none());
        b_held.recycle(b);
        assert_eq!(budget.spares(), 0);
        let waited = waiter.await;
        assert_eq!((waited.len(), budget.in_use()), (CHUNK, 2 * CHUNK));
        drop((next, waited));
    }

    #[test]
    fn spares_are_bounded() {
        let budget = MemoryBudget::new(2 * SPARE_BUFFERS * CHUNK);
        let held: Vec<_> = (0..2 * SPARE_BUFFERS)
            .map(|_| {
                let mut r = Box::pin(budget.reserve(CHUNK));
                futures_poll_once(&mut r).expect("room").buffer(CHUNK)
            })
            .collect();
        for (buf, reservation) in held {
            reservation.recycle(buf);
        }
        assert_eq!(budget.spares(), SPARE_BUFFERS);
        assert_eq!(budget.spare_bytes(), SPARE_BUFFERS * CHUNK);
        assert_eq!(budget.in_use(), 0);
    }

    #[test]
    fn the_newest_buffers_are_kept_and_the_oldest_give_way() {
        const SMALL: usize = MIN_SPARE;
        let budget = MemoryBudget::new(SPARE_BUFFERS * CHUNK + SMALL);
        let take = |len: usize| {
            let mut r = Box::pin(budget.reserve(len));
            futures_poll_once(&mut r).expect("room").buffer(len)
        };
        // Spares of one size fill the list; a buffer of another size recycled after them is
        // kept and found again.
        let large: Vec<_> = (0..SPARE_BUFFERS).map(|_| take(CHUNK)).collect();
        for (buf, reservation) in large {
            reservation.recycle(buf);
        }
        let (small, reservation) = take(SMALL);
        let kept = small.as_ptr();
        reservation.recycle(small);
        assert_eq!(budget.spares(), SPARE_BUFFERS);
        assert_eq!(budget.spare_bytes(), (SPARE_BUFFERS - 1) * CHUNK + SMALL);
        let (again, _reservation) = take(SMALL);
        assert_eq!(again.as_ptr(), kept, "the small buffer was kept");
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
