//! [`Work`]: the chunks of one transfer still to move, shared by every connection: handed out
//! front first, put back when a connection fails, added again when a commit finds bytes missing.
//!
//! Near the end of a transfer the queue hands out finer pieces, so that the last bytes spread
//! over every connection, and finer still to a connection slower than the others, so that its
//! last pieces land with theirs. Once it is empty, a connection with nothing in flight takes a copy of
//! a chunk that has been in flight on another one for [`SLOW`] times as long as chunks of its size
//! take (the endgame of download accelerators and BitTorrent): whichever copy lands first counts, and the
//! slow connection is closed once every chunk is moved rather than waited for.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use xfer_proto::ByteRange;

use super::Options;
use crate::{Progress, RateLimiter};

/// Smallest piece the queue cuts a chunk into near the end of a transfer: small enough that the
/// last bytes spread over a pool of 16, large enough that a connection with a window of 2 still
/// keeps a long path's share of the link busy (1 Gbit/s, 150 ms, 16 connections: about 1.2 MB
/// in flight each).
const TAPER_FLOOR: u64 = 1024 * 1024;
/// A connection moving less than this share of an even share of the pool's throughput gets
/// pieces cut in this proportion, no smaller: through the emulated 50 ms path at 1 % loss, bbr
/// connections of one pool moved from 0.15 to 1.9 times an even share for a whole transfer.
const MIN_PACE: f64 = 1.0 / 8.0;
/// Copies of one chunk in flight at most: the first one and one on an idle connection.
const MAX_COPIES: u32 = 2;
/// A chunk is copied once it has been in flight this many times as long as chunks of its size
/// take on average: then its connection is slow, not the chunk merely a little late (a copy of
/// every chunk still in flight at the end would cost bandwidth the last chunks need). Through
/// the emulated 50 ms path at 1 % loss, one connection of 8 often moves at a third of an even
/// share or less: at three times, its last chunk was never copied before it landed, a second
/// after the others'.
const SLOW: u32 = 2;
/// However fast chunks move, one is not copied before it is this late: on loopback and LAN
/// paths chunks take milliseconds, and a scheduling hiccup of a loaded machine is no slow
/// connection; what a copy could save there is less than the bytes it costs.
const LATE_FLOOR: Duration = Duration::from_millis(250);

/// A chunk handed out and not yet moved.
#[derive(Debug)]
struct Flight {
    range: ByteRange,
    /// When it was handed out.
    since: Instant,
    /// Copies asked for (download) or sent (upload) whose answer has not come.
    copies: u32,
    /// A copy arrived and is being written (downloads): later copies are dropped.
    landing: bool,
}

/// What the queue holds, under one lock.
#[derive(Debug, Default)]
struct State {
    queue: VecDeque<ByteRange>,
    /// Bytes in `queue`.
    queued: u64,
    /// Chunks handed out, oldest first.
    flights: Vec<Flight>,
    /// Seconds per byte a chunk takes from being handed out to being moved, on average
    /// (moving). Per byte: the last pieces are cut smaller than the chunks that set it.
    typical: Option<f64>,
    /// When the first chunk was handed out.
    first_taken: Option<Instant>,
    /// Bytes moved (first copies only) since then.
    moved: u64,
}

impl State {
    fn flight(&mut self, range: ByteRange) -> Option<&mut Flight> {
        self.flights.iter_mut().find(|f| f.range == range)
    }

    /// Chunks that may get another copy, with when they count as slow.
    fn copyable(&self) -> impl Iterator<Item = (usize, Instant)> + '_ {
        let typical = self.typical;
        self.flights
            .iter()
            .enumerate()
            .filter(|(_, f)| f.copies < MAX_COPIES && !f.landing)
            .filter_map(move |(i, f)| {
                typical.map(|t| {
                    let expected = Duration::from_secs_f64(t * f.range.len() as f64);
                    (i, f.since + (expected * SLOW).max(LATE_FLOOR))
                })
            })
    }

    /// Bytes per second the pool moved since its first chunk was handed out, if any.
    fn pool_rate(&self, now: Instant) -> Option<f64> {
        let secs = now.duration_since(self.first_taken?).as_secs_f64();
        (self.moved > 0 && secs > 0.0).then(|| self.moved as f64 / secs)
    }

    fn push_front(&mut self, range: ByteRange) {
        self.queued += range.len();
        self.queue.push_front(range);
    }

    /// One copy of `range` came back unmoved: once no copy is left, the range is queued again.
    fn release(&mut self, range: ByteRange) {
        let Some(pos) = self.flights.iter().position(|f| f.range == range) else {
            return;
        };
        let flight = &mut self.flights[pos];
        flight.copies = flight.copies.saturating_sub(1);
        if flight.copies == 0 && !flight.landing {
            self.flights.remove(pos);
            self.push_front(range);
        }
    }
}

/// Chunks still to move, shared by the workers of one transfer.
pub(super) struct Work {
    state: Mutex<State>,
    /// Bytes queued or in flight: not yet acknowledged (uploads) or written (downloads).
    outstanding: AtomicU64,
    /// True once `outstanding` reaches zero: workers still connecting can stop.
    finished: watch::Sender<bool>,
    /// Bumped whenever a chunk is handed out, moved or comes back: idle workers look again.
    changed: watch::Sender<u64>,
    pub(super) transferred: AtomicU64,
    pub(super) crc_retries: AtomicU64,
    /// Chunks asked for or sent a second time, on an idle connection, in the endgame.
    pub(super) duplicates: AtomicU64,
    progress: Arc<dyn Progress>,
    limiter: Option<RateLimiter>,
    /// Workers with an open transfer, moving chunks.
    pub(super) active: AtomicUsize,
    /// The most workers that were active at once.
    pub(super) peak: AtomicUsize,
    /// Workers the pool has too many: the next ones to look for a chunk stop instead.
    pub(super) excess: AtomicUsize,
    /// An optional connection was turned away (a busy daemon): the pool stops growing.
    pub(super) refused: AtomicBool,
    /// Holds ([`Work::hold`]) alive: chunks are still to come though none may be queued.
    holds: AtomicUsize,
    /// Bytes of chunk buffer the process may hold ([`Options`]' memory budget), if bounded:
    /// no chunk is handed out larger than a connection's share of it.
    memory: Option<u64>,
}

/// A transfer kept open for chunks still to come ([`Work::hold`]); lets it finish when dropped.
pub(super) struct Hold(Arc<Work>);

impl Drop for Hold {
    fn drop(&mut self) {
        self.0.holds.fetch_sub(1, Ordering::SeqCst);
        if self.0.outstanding.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.finished.send_replace(true);
        }
        self.0.bump();
    }
}

/// A worker's place in [`Work::active`]; leaves it when dropped.
pub(super) struct Pumping<'a>(&'a Work);

impl Drop for Pumping<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What a worker asking [`Work::take`] for a chunk has room for.
#[derive(Debug, Clone, Copy)]
pub(super) struct Room {
    /// The worker has nothing in flight: it may take a copy of a chunk another one holds.
    pub(super) idle: bool,
    /// Requests the worker keeps in flight.
    pub(super) window: usize,
    /// Bytes per second the worker's connection moved so far, once it has moved some.
    pub(super) rate: Option<f64>,
}

impl Work {
    pub(super) fn new(chunks: Vec<ByteRange>, opts: &Options) -> Self {
        let work = Self {
            state: Mutex::default(),
            outstanding: AtomicU64::new(0),
            finished: watch::Sender::new(true),
            changed: watch::Sender::new(0),
            transferred: AtomicU64::new(0),
            crc_retries: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            progress: opts.progress.clone(),
            limiter: opts.bwlimit.map(RateLimiter::new),
            active: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            excess: AtomicUsize::new(0),
            refused: AtomicBool::new(false),
            holds: AtomicUsize::new(0),
            memory: opts.connector.memory.as_ref().map(|b| b.total() as u64),
        };
        work.add(chunks);
        work
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Queues new chunks to move.
    pub(super) fn add(&self, chunks: Vec<ByteRange>) {
        let bytes: u64 = chunks.iter().map(ByteRange::len).sum();
        {
            let mut st = self.lock();
            st.queued += bytes;
            st.queue.extend(chunks);
        }
        let total = self.outstanding.fetch_add(bytes, Ordering::SeqCst) + bytes;
        self.finished.send_replace(total == 0);
        self.bump();
    }

    /// The next chunk for a worker with `room`: the queue's front (cut finer near the end), or
    /// once the queue is empty and the worker idle, a copy of the oldest chunk in flight on
    /// another connection. `None` when there is nothing to take, or when the pool has shrunk
    /// and this worker is one too many (then `retired` is set, for good).
    pub(super) fn take(&self, retired: &mut bool, room: Room) -> Option<ByteRange> {
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
        let workers = self.active.load(Ordering::SeqCst).max(1);
        let mut st = self.lock();
        let now = Instant::now();
        st.first_taken.get_or_insert(now);
        // This connection's throughput against an even share of the pool's: a slow one's last
        // pieces are cut in proportion, so that they land when the others' do instead of
        // being the transfer's tail.
        let pace = room
            .rate
            .zip(st.pool_rate(now))
            .map_or(1.0, |(rate, pool)| {
                (rate * workers as f64 / pool).clamp(MIN_PACE, 1.0)
            });
        let paced = |bytes: u64| (bytes as f64 * pace) as u64;
        let taken = match st.queue.pop_front() {
            Some(mut chunk) => {
                // The bytes left are shared by every connection's window: a chunk larger than
                // its share would leave the others idle while it crawls in on one.
                let share = st.queued / (workers * room.window.max(1)) as u64;
                let mut most = paced(share).max(paced(TAPER_FLOOR));
                if room.rate.is_none() {
                    // A connection not yet measured may be the slowest: its first chunks,
                    // whole, were the tail of a transfer (two 4 MiB chunks at 2 MB/s).
                    most = most.min(TAPER_FLOOR);
                }
                if let Some(memory) = self.memory {
                    // Each connection holds one chunk's buffer at a time (read, then written):
                    // a pool of any size stays within the budget, waiting on it never.
                    most = most.min((memory / workers as u64).max(TAPER_FLOOR));
                }
                if most < chunk.len() {
                    // Equal pieces, so that no sliver is left to travel alone.
                    let pieces = chunk.len().div_ceil(most);
                    let piece = chunk.len().div_ceil(pieces).next_multiple_of(4096);
                    let mut end = chunk.end;
                    while end - chunk.start > piece {
                        let start = chunk.start + (end - chunk.start - 1) / piece * piece;
                        st.queue.push_front(ByteRange::new(start, end));
                        end = start;
                    }
                    chunk = ByteRange::new(chunk.start, end);
                }
                st.queued -= chunk.len();
                st.flights.push(Flight {
                    range: chunk,
                    since: Instant::now(),
                    copies: 1,
                    landing: false,
                });
                Some(chunk)
            }
            None if room.idle => {
                let (i, _) = st.copyable().find(|&(_, slow)| slow <= now)?;
                let flight = &mut st.flights[i];
                flight.copies += 1;
                self.duplicates.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    offset = flight.range.start,
                    len = flight.range.len(),
                    "nothing left to hand out; a slow connection's chunk goes on this one too"
                );
                Some(flight.range)
            }
            None => None,
        };
        drop(st);
        if taken.is_some() {
            self.bump();
        }
        taken
    }

    /// Counts a worker as active until the guard drops.
    pub(super) fn pumping(&self) -> Pumping<'_> {
        let now = self.active.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        Pumping(self)
    }

    /// Copies of chunks that came back unmoved (a failed connection, a CRC mismatch): a chunk
    /// with no other copy in flight goes back to the front of the queue, in order.
    pub(super) fn release(&self, chunks: impl DoubleEndedIterator<Item = ByteRange>) {
        {
            let mut st = self.lock();
            for c in chunks.rev() {
                st.release(c);
            }
        }
        self.bump();
    }

    /// `chunk` was taken but is larger than the connection moves: `pieces` are queued instead.
    pub(super) fn split(&self, chunk: ByteRange, pieces: Vec<ByteRange>) {
        {
            let mut st = self.lock();
            if let Some(pos) = st.flights.iter().position(|f| f.range == chunk) {
                st.flights.remove(pos);
            }
            for p in pieces.into_iter().rev() {
                st.push_front(p);
            }
        }
        self.bump();
    }

    /// A copy of `chunk` arrived: true if it is the first, to be written; false if another copy
    /// is being written or was written already (this one is dropped).
    pub(super) fn claim(&self, chunk: ByteRange) -> bool {
        let mut st = self.lock();
        let Some(flight) = st.flight(chunk) else {
            return false;
        };
        flight.copies = flight.copies.saturating_sub(1);
        !std::mem::replace(&mut flight.landing, true)
    }

    /// The claimed copy of `chunk` could not be written: it counts as in flight again, for the
    /// caller to [`release`](Self::release).
    pub(super) fn unclaim(&self, chunk: ByteRange) {
        if let Some(flight) = self.lock().flight(chunk) {
            flight.landing = false;
            flight.copies += 1;
        }
    }

    /// Marks `chunk` as moved for good; a later copy of it changes nothing.
    pub(super) fn complete(&self, chunk: ByteRange) {
        let first = {
            let mut st = self.lock();
            let pos = st.flights.iter().position(|f| f.range == chunk);
            let flight = pos.map(|pos| st.flights.remove(pos));
            if let Some(f) = &flight {
                let took = f.since.elapsed().as_secs_f64() / f.range.len().max(1) as f64;
                st.typical = Some(st.typical.map_or(took, |t| (t * 7.0 + took) / 8.0));
                st.moved += f.range.len();
            }
            flight.is_some()
        };
        if first {
            self.progress.inc(chunk.len());
            if self.outstanding.fetch_sub(chunk.len(), Ordering::SeqCst) == chunk.len() {
                self.finished.send_replace(true);
            }
        }
        self.bump();
    }

    /// Keeps the transfer from finishing until the guard drops, though nothing is queued: more
    /// chunks are still to come (the literal data of a delta whose signatures are still being
    /// compared). Counts as one byte outstanding.
    pub(super) fn hold(self: &Arc<Self>) -> Hold {
        self.holds.fetch_add(1, Ordering::SeqCst);
        self.outstanding.fetch_add(1, Ordering::SeqCst);
        self.finished.send_replace(false);
        Hold(Arc::clone(self))
    }

    /// Resolves once every chunk is moved.
    pub(super) async fn finished(&self) {
        let _ = self.finished.subscribe().wait_for(|done| *done).await;
    }

    /// True once every chunk is moved.
    pub(super) fn is_finished(&self) -> bool {
        *self.finished.borrow()
    }

    /// When the oldest chunk that may get another copy counts as slow, if there is one.
    pub(super) fn next_copy_at(&self) -> Option<Instant> {
        self.lock().copyable().map(|(_, slow)| slow).min()
    }

    /// Wakes when a chunk is handed out, moved or comes back: what an idle worker waits for.
    pub(super) fn changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Bytes queued, not yet handed out.
    pub(super) fn queued(&self) -> u64 {
        self.lock().queued
    }

    pub(super) fn is_empty(&self) -> bool {
        self.lock().queue.is_empty()
    }

    /// True when nothing is queued and nothing more is to come: a connection not yet open
    /// has no reason to open.
    pub(super) fn is_idle(&self) -> bool {
        self.holds.load(Ordering::SeqCst) == 0 && self.is_empty()
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

    /// A worker with chunks in flight: it takes from the queue only.
    const BUSY: Room = Room {
        idle: false,
        window: 1,
        rate: None,
    };
    const IDLE: Room = Room {
        idle: true,
        window: 1,
        rate: None,
    };

    fn drain(work: &Work) -> Vec<ByteRange> {
        let mut retired = false;
        std::iter::from_fn(|| work.take(&mut retired, BUSY)).collect()
    }

    #[test]
    fn chunks_are_handed_out_front_first_and_failed_ones_come_back_first() {
        let work = Work::new(
            vec![range(0, 10), range(10, 20), range(20, 30), range(30, 40)],
            &test_options(Arc::new(ProgressCounter::default())),
        );
        let mut retired = false;
        let (a, b) = (work.take(&mut retired, BUSY), work.take(&mut retired, BUSY));
        assert_eq!((a, b), (Some(range(0, 10)), Some(range(10, 20))));
        // The connection carrying both failed: they go back, in their order, before the rest.
        work.release([range(0, 10), range(10, 20)].into_iter());
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

    #[tokio::test]
    async fn a_held_transfer_waits_for_chunks_still_to_come() {
        let work = Arc::new(Work::new(
            Vec::new(),
            &test_options(Arc::new(ProgressCounter::default())),
        ));
        assert!(work.is_finished() && work.is_idle());
        let hold = work.hold();
        // Nothing queued, yet connections still open for what is to come.
        assert!(!work.is_finished() && !work.is_idle());
        work.add(vec![range(0, 10)]);
        let chunks = drain(&work);
        work.complete(chunks[0]);
        assert!(!work.is_finished());
        drop(hold);
        work.finished().await;
        assert!(work.is_idle());
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
        assert_eq!(work.take(&mut first, BUSY), None);
        assert!(first);
        assert_eq!(work.take(&mut first, BUSY), None);
        assert_eq!(work.take(&mut second, BUSY), Some(range(0, 1)));
        assert!(!second);
        {
            let _a = work.pumping();
            let _b = work.pumping();
            assert_eq!(work.active.load(Ordering::SeqCst), 2);
        }
        assert_eq!(work.active.load(Ordering::SeqCst), 0);
        assert_eq!(work.peak.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_worker_copies_a_chunk_late_on_another_connection_and_it_counts_once() {
        let progress = Arc::new(ProgressCounter::default());
        let work = Work::new(
            vec![range(0, 10), range(10, 20), range(20, 30)],
            &test_options(progress.clone()),
        );
        assert_eq!(drain(&work).len(), 3);
        let mut retired = false;
        // Nothing moved yet: nothing to compare with, so nothing counts as late.
        assert_eq!(work.take(&mut retired, IDLE), None);
        assert_eq!(work.next_copy_at(), None);
        tokio::time::advance(Duration::from_secs(1)).await;
        work.complete(range(20, 30));
        // The others took as long as that one: not late yet.
        assert_eq!(work.take(&mut retired, IDLE), None);
        let late = work.next_copy_at().expect("chunks in flight");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(Instant::now(), late);
        // A worker with chunks of its own in flight takes no copies; idle ones do, oldest
        // first, one copy each.
        assert_eq!(work.take(&mut retired, BUSY), None);
        assert_eq!(work.take(&mut retired, IDLE), Some(range(0, 10)));
        assert_eq!(work.take(&mut retired, IDLE), Some(range(10, 20)));
        assert_eq!(
            work.take(&mut retired, IDLE),
            None,
            "every chunk has two copies"
        );
        assert_eq!(work.next_copy_at(), None);
        assert_eq!(work.duplicates.load(Ordering::Relaxed), 2);
        // The copy lands first; the slow original, when it comes, changes nothing.
        work.complete(range(0, 10));
        work.complete(range(0, 10));
        assert_eq!(progress.done(), 20);
        // The copy's connection failed: the original is still out, nothing is queued again.
        work.release(std::iter::once(range(10, 20)));
        assert!(work.is_empty());
        // Then the original's connection failed too: the chunk is queued again.
        work.release(std::iter::once(range(10, 20)));
        assert_eq!(drain(&work), [range(10, 20)]);
        work.complete(range(10, 20));
        assert!(work.is_finished());
        assert_eq!(progress.done(), 30);
    }

    #[tokio::test(start_paused = true)]
    async fn of_two_copies_arriving_only_the_first_is_written() {
        let work = Work::new(
            vec![range(0, 10), range(10, 20)],
            &test_options(Arc::new(ProgressCounter::default())),
        );
        let mut retired = false;
        assert_eq!(drain(&work).len(), 2);
        tokio::time::advance(Duration::from_secs(1)).await;
        work.complete(range(10, 20));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(work.take(&mut retired, IDLE), Some(range(0, 10)));
        assert!(work.claim(range(0, 10)));
        assert!(
            !work.claim(range(0, 10)),
            "a second copy while the first is written"
        );
        // The write failed: the chunk is in flight again, and queued once that copy is back.
        work.unclaim(range(0, 10));
        work.release(std::iter::once(range(0, 10)));
        assert_eq!(drain(&work), [range(0, 10)]);
        assert!(work.claim(range(0, 10)));
        work.complete(range(0, 10));
        assert!(
            !work.claim(range(0, 10)),
            "a copy of a chunk already written"
        );
        assert!(work.is_finished());
    }

    #[test]
    fn no_chunk_is_larger_than_a_connections_share_of_the_memory_budget() {
        const MIB: u64 = 1 << 20;
        let mut opts = test_options(Arc::new(ProgressCounter::default()));
        opts.connector.memory = Some(xfer_core::MemoryBudget::new(16 << 20));
        let work = Work::new(
            split_into_chunks(&[range(0, 256 * MIB)], 4 * MIB as u32),
            &opts,
        );
        let mut retired = false;
        let room = Room {
            idle: false,
            window: 2,
            // Measured already, and fast.
            rate: Some(f64::INFINITY),
        };
        // Two connections: whole 4 MiB chunks fit (8 MiB each).
        let pumping: Vec<_> = (0..2).map(|_| work.pumping()).collect();
        assert_eq!(
            work.take(&mut retired, room).map(|c| c.len()),
            Some(4 * MIB)
        );
        // Eight: 2 MiB each, so that eight chunks held at once stay within 16 MiB.
        let more: Vec<_> = (0..6).map(|_| work.pumping()).collect();
        let cut = work.take(&mut retired, room).unwrap();
        assert_eq!(cut, range(4 * MIB, 6 * MIB));
        // Sixty-four: never below the taper's floor (the budget's waits bound the rest).
        let most: Vec<_> = (0..56).map(|_| work.pumping()).collect();
        assert_eq!(work.take(&mut retired, room).unwrap().len(), MIB);
        drop((pumping, more, most));
    }

    #[test]
    fn the_last_bytes_are_cut_into_pieces_shared_by_every_window() {
        const MIB: u64 = 1 << 20;
        let work = Work::new(
            split_into_chunks(&[range(0, 64 * MIB)], 4 * MIB as u32),
            &test_options(Arc::new(ProgressCounter::default())),
        );
        for _ in 0..4 {
            std::mem::forget(work.pumping());
        }
        let room = Room {
            idle: false,
            window: 2,
            // Measured already, and fast.
            rate: Some(f64::INFINITY),
        };
        let mut retired = false;
        let taken: Vec<ByteRange> = std::iter::from_fn(|| work.take(&mut retired, room)).collect();
        let lens: Vec<u64> = taken.iter().map(|c| c.len()).collect();
        // Whole chunks while the rest fills every window twice over; then smaller pieces, never
        // below half the floor; every byte once, in order.
        assert_eq!(&lens[..8], [4 * MIB; 8], "{lens:?}");
        assert!(lens.iter().all(|&l| l >= MIB / 2), "{lens:?}");
        assert!(lens[lens.len() - 8..].iter().all(|&l| l <= MIB), "{lens:?}");
        assert!(taken.windows(2).all(|w| w[0].end == w[1].start));
        assert_eq!(taken.last().unwrap().end, 64 * MIB);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_connection_gets_pieces_cut_to_its_pace() {
        const MIB: u64 = 1 << 20;
        let work = Work::new(
            split_into_chunks(&[range(0, 40 * MIB)], 4 * MIB as u32),
            &test_options(Arc::new(ProgressCounter::default())),
        );
        let room = |rate: Option<f64>| Room {
            idle: false,
            window: 2,
            rate,
        };
        let mut retired = false;
        let first: Vec<_> = (0..8)
            .map(|_| work.take(&mut retired, room(Some(f64::INFINITY))).unwrap())
            .collect();
        assert!(first.iter().all(|c| c.len() == 4 * MIB));
        let _pumping: Vec<_> = (0..4).map(|_| work.pumping()).collect();
        tokio::time::advance(Duration::from_secs(1)).await;
        for chunk in &first[..4] {
            work.complete(*chunk);
        }
        // The pool moved 16 MiB/s, 4 MiB/s for each of its 4; the 8 MiB left go in pieces of
        // the floor, 1 MiB, to a connection moving an even share or more.
        let even = (4 * MIB) as f64;
        let mut len = |rate| work.take(&mut retired, room(Some(rate))).unwrap().len();
        assert_eq!(len(even), MIB);
        assert_eq!(len(2.0 * even), MIB);
        assert_eq!(len(even / 4.0), MIB / 4, "a slow one gets its pace of it");
        assert_eq!(len(even / 100.0), MIB / 8, "never below an eighth");
    }

    #[tokio::test(start_paused = true)]
    async fn a_small_piece_counts_as_late_for_its_size() {
        let work = Work::new(
            vec![range(0, 1000), range(1000, 1200)],
            &test_options(Arc::new(ProgressCounter::default())),
        );
        let mut retired = false;
        let whole = work.take(&mut retired, BUSY).unwrap();
        tokio::time::advance(Duration::from_secs(1)).await;
        work.complete(whole);
        let piece = work.take(&mut retired, BUSY).unwrap();
        let handed_out = Instant::now();
        // 1000 bytes took 1 s: 200 take 0.2 s, and are late at twice that.
        assert_eq!(
            work.next_copy_at(),
            Some(handed_out + Duration::from_millis(400))
        );
        tokio::time::advance(Duration::from_millis(400)).await;
        assert_eq!(work.take(&mut retired, IDLE), Some(piece));
    }

    #[test]
    fn a_connection_not_yet_measured_gets_no_more_than_the_floor() {
        const MIB: u64 = 1 << 20;
        let work = Work::new(
            split_into_chunks(&[range(0, 64 * MIB)], 4 * MIB as u32),
            &test_options(Arc::new(ProgressCounter::default())),
        );
        let mut retired = false;
        let room = |rate| Room {
            idle: false,
            window: 2,
            rate,
        };
        assert_eq!(work.take(&mut retired, room(None)).unwrap().len(), MIB);
        assert_eq!(
            work.take(&mut retired, room(Some(f64::INFINITY)))
                .unwrap()
                .len(),
            MIB,
            "the rest of the chunk cut for it comes first"
        );
        work.take(&mut retired, room(None));
        work.take(&mut retired, room(None));
        assert_eq!(
            work.take(&mut retired, room(Some(f64::INFINITY)))
                .unwrap()
                .len(),
            4 * MIB
        );
    }
}
