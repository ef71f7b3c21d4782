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

    pub(super) fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    pub(super) async fn throttle(&self, bytes: u64) {
        if let Some(l) = &self.limiter {
            l.acquire(bytes).await;
        }
    }
}
