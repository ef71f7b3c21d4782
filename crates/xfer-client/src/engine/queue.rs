//! [`Work`]: the chunks of one transfer still to move, shared by every connection: handed out
//! front first, put back when a connection fails, added again when a commit finds bytes missing.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use xfer_proto::ByteRange;

use super::Options;
use crate::{Progress, RateLimiter};

/// Chunks still to move, shared by the workers of one transfer.
pub(super) struct Work {
    queue: Mutex<VecDeque<ByteRange>>,
    /// Bytes queued or in flight: not yet acknowledged (uploads) or written (downloads).
    outstanding: AtomicU64,
    /// True once `outstanding` reaches zero: workers still connecting can stop.
    finished: watch::Sender<bool>,
    pub(super) transferred: AtomicU64,
    pub(super) crc_retries: AtomicU64,
    progress: Arc<dyn Progress>,
    limiter: Option<RateLimiter>,
    /// Bytes read and written on the transfer's connections: throughput, byte by byte.
    pub(super) meter: Arc<AtomicU64>,
    /// Workers with an open transfer, moving chunks.
    pub(super) active: AtomicUsize,
    /// The most workers that were active at once.
    pub(super) peak: AtomicUsize,
    /// Workers the pool has too many: the next ones to look for a chunk stop instead.
    pub(super) excess: AtomicUsize,
    /// An optional connection was turned away (a busy daemon): the pool stops growing.
    pub(super) refused: AtomicBool,
}

/// A worker's place in [`Work::active`]; leaves it when dropped.
pub(super) struct Pumping<'a>(&'a Work);

impl Drop for Pumping<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Work {
    pub(super) fn new(chunks: Vec<ByteRange>, opts: &Options) -> Self {
        let work = Self {
            queue: Mutex::new(VecDeque::new()),
            outstanding: AtomicU64::new(0),
            finished: watch::Sender::new(true),
            transferred: AtomicU64::new(0),
            crc_retries: AtomicU64::new(0),
            progress: opts.progress.clone(),
            limiter: opts.bwlimit.map(RateLimiter::new),
            meter: opts.connector.meter.clone().unwrap_or_default(),
            active: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            excess: AtomicUsize::new(0),
            refused: AtomicBool::new(false),
        };
        work.add(chunks);
        work
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<ByteRange>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues new chunks to move.
    pub(super) fn add(&self, chunks: Vec<ByteRange>) {
        let bytes: u64 = chunks.iter().map(ByteRange::len).sum();
        self.lock().extend(chunks);
        let total = self.outstanding.fetch_add(bytes, Ordering::SeqCst) + bytes;
        self.finished.send_replace(total == 0);
    }

    fn pop(&self) -> Option<ByteRange> {
        self.lock().pop_front()
    }

    /// The next chunk for a worker; `None` when the queue is empty, or when the pool has shrunk
    /// and this worker is one too many (then `retired` is set, for good).
    pub(super) fn take(&self, retired: &mut bool) -> Option<ByteRange> {
        if *retired {
            return None;
        }
        let claimed = self
            .excess
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |e| e.checked_sub(1))
            .is_ok();
        if claimed {
            *retired = true;
            return None;
        }
        self.pop()
    }

    /// Counts a worker as active until the guard drops.
    pub(super) fn pumping(&self) -> Pumping<'_> {
        let now = self.active.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        Pumping(self)
    }

    /// Puts chunks that were in flight on a failed connection back at the front.
    pub(super) fn requeue(&self, chunks: impl DoubleEndedIterator<Item = ByteRange>) {
        let mut q = self.lock();
        for c in chunks.rev() {
            q.push_front(c);
        }
    }

    /// Marks `chunk` as moved for good.
    pub(super) fn complete(&self, chunk: ByteRange) {
        self.progress.inc(chunk.len());
        if self.outstanding.fetch_sub(chunk.len(), Ordering::SeqCst) == chunk.len() {
            self.finished.send_replace(true);
        }
    }

    /// Resolves once every chunk is moved.
    pub(super) async fn finished(&self) {
        let _ = self.finished.subscribe().wait_for(|done| *done).await;
    }

    /// True once every chunk is moved.
    #[cfg(test)]
    pub(super) fn is_finished(&self) -> bool {
        *self.finished.borrow()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    pub(super) async fn throttle(&self, bytes: u64) {
        if let Some(l) = &self.limiter {
            l.acquire(bytes).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use xfer_core::{split_into_chunks, RangeSet};

    use super::super::test_options;
    use super::*;
    use crate::ProgressCounter;

    fn range(start: u64, end: u64) -> ByteRange {
        ByteRange::new(start, end)
    }

    fn drain(work: &Work) -> Vec<ByteRange> {
        let mut retired = false;
        std::iter::from_fn(|| work.take(&mut retired)).collect()
    }

    #[test]
    fn chunks_are_handed_out_front_first_and_failed_ones_come_back_first() {
        let work = Work::new(
            vec![range(0, 10), range(10, 20), range(20, 30), range(30, 40)],
            &test_options(Arc::new(ProgressCounter::default())),
        );
        let mut retired = false;
        let (a, b) = (work.take(&mut retired), work.take(&mut retired));
        assert_eq!((a, b), (Some(range(0, 10)), Some(range(10, 20))));
        // The connection carrying both failed: they go back, in their order, before the rest.
        work.requeue([range(0, 10), range(10, 20)].into_iter());
        assert_eq!(
            drain(&work),
            [range(0, 10), range(10, 20), range(20, 30), range(30, 40)]
        );
        assert!(work.is_empty());
    }

    #[tokio::test]
    async fn the_transfer_finishes_when_every_byte_is_moved_and_again_after_more_are_added() {
        let progress = Arc::new(ProgressCounter::default());
        let work = Work::new(
            vec![range(0, 10), range(10, 30)],
            &test_options(progress.clone()),
        );
        assert!(!work.is_finished());
        let chunks = drain(&work);
        // Taken is not moved: a chunk in flight still holds the transfer open.
        assert!(work.is_empty() && !work.is_finished());
        work.complete(chunks[0]);
        assert_eq!(progress.done(), 10);
        assert!(!work.is_finished());
        work.complete(chunks[1]);
        assert_eq!(progress.done(), 30);
        work.finished().await;
        // A commit that finds bytes missing queues them again: the transfer is open again.
        work.add(vec![range(5, 6)]);
        assert!(!work.is_finished());
        assert_eq!(drain(&work), [range(5, 6)]);
    }

    #[test]
    fn a_resumed_transfer_queues_only_the_bytes_not_held() {
        let held = RangeSet::from_ranges([range(0, 4096), range(8192, 10000)]);
        let missing = held.missing(20000);
        let work = Work::new(
            split_into_chunks(&missing, 4096),
            &test_options(Arc::new(ProgressCounter::default())),
        );
        let chunks = drain(&work);
        assert_eq!(chunks.first(), Some(&range(4096, 8192)));
        assert_eq!(
            chunks.iter().map(ByteRange::len).sum::<u64>(),
            20000 - 4096 - 1808
        );
        let overlaps_held = |c: &ByteRange| held.iter().any(|h| h.start < c.end && c.start < h.end);
        assert!(!chunks.iter().any(overlaps_held));
        assert_eq!(work.outstanding.load(Ordering::SeqCst), 20000 - 4096 - 1808);
    }

    #[test]
    fn a_shrinking_pool_retires_as_many_workers_as_it_has_too_many() {
        let work = Work::new(
            vec![range(0, 1), range(1, 2), range(2, 3)],
            &test_options(Arc::new(ProgressCounter::default())),
        );
        work.excess.store(1, Ordering::SeqCst);
        let (mut first, mut second) = (false, false);
        // The first worker to look retires for good; the next one keeps taking chunks.
        assert_eq!(work.take(&mut first), None);
        assert!(first);
        assert_eq!(work.take(&mut first), None);
        assert_eq!(work.take(&mut second), Some(range(0, 1)));
        assert!(!second);
        {
            let _a = work.pumping();
            let _b = work.pumping();
            assert_eq!(work.active.load(Ordering::SeqCst), 2);
        }
        assert_eq!(work.active.load(Ordering::SeqCst), 0);
        assert_eq!(work.peak.load(Ordering::SeqCst), 2);
    }
}
