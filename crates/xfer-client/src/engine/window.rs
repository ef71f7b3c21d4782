//! The window skeleton both directions share: [`pump`] keeps up to the daemon's window of
//! requests in flight on one connection ([`Window`]), matches each answer to its chunk by range,
//! and on failure puts every chunk still in flight back in the queue. [`Direction`] is what an
//! upload and a download fill in.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::Ordering;

use xfer_core::split_into_chunks;
use xfer_proto::{ByteRange, Frame};

use super::queue::{Room, Work};
use crate::session::unexpected;
use crate::{ClientError, Session};

/// Sleeps until `at` (a caller checks it is set).
async fn sleep_until(at: Option<tokio::time::Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at).await;
    }
}

/// Most requests in flight on one connection, whatever the daemon offers.
const MAX_WINDOW: usize = 64;

/// What differs between an upload and a download.
pub(super) trait Direction: Send + Sync + 'static {
    /// Opens the transfer on a fresh session; returns its transfer id.
    fn open(&self, session: &mut Session) -> impl Future<Output = Result<u64, ClientError>> + Send;
    /// Largest chunk one request may cover on `session`; larger ones are split and queued again.
    fn max_chunk(&self, session: &Session) -> u32;
    /// Sends the frame that carries (upload) or asks for (download) `chunk`.
    fn request(
        &self,
        session: &mut Session,
        transfer_id: u64,
        chunk: ByteRange,
        work: &Work,
    ) -> impl Future<Output = Result<(), ClientError>> + Send;
    /// Reads the next answer, takes its chunk out of `window` ([`Window::answered`]) and deals
    /// with it.
    fn answer(
        &self,
        session: &mut Session,
        transfer_id: u64,
        window: &mut Window,
        work: &Work,
    ) -> impl Future<Output = Result<Answer, ClientError>> + Send;
    /// How long the data waits in queues on its path, as the far end's sockets reported since
    /// the last call; `None` where this end's own sockets time it (the sender's do).
    fn reported_queue(&self) -> Option<std::time::Duration> {
        None
    }
}

/// What an answer meant for its chunk.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Answer {
    /// Moved for good: acknowledged (upload) or written (download).
    Moved(ByteRange),
    /// Its CRC did not match: to be moved again.
    Corrupt(ByteRange),
    /// A copy of a chunk another connection delivered first: dropped unwritten.
    Dropped(ByteRange),
}

/// How a worker's run on one connection ended.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Pumped {
    /// Every chunk of the transfer moved, and nothing in flight here.
    Drained,
    /// The pool shrank and this worker left it.
    Retired,
}

/// The chunks in flight on one connection, oldest first, bounded by the daemon's window.
#[derive(Debug)]
pub(super) struct Window {
    inflight: VecDeque<ByteRange>,
    capacity: usize,
}

impl Window {
    /// A window of `advertised` requests (the daemon's `Welcome.window`), within 1 and 64.
    pub(super) fn new(advertised: u32) -> Self {
        let capacity = (advertised as usize).clamp(1, MAX_WINDOW);
        Self {
            inflight: VecDeque::with_capacity(capacity),
            capacity,
        }
    }

    pub(super) fn has_room(&self) -> bool {
        self.inflight.len() < self.capacity
    }

    pub(super) fn is_empty(&self) -> bool {
        self.inflight.is_empty()
    }

    /// A request for `chunk` was sent.
    pub(super) fn push(&mut self, chunk: ByteRange) {
        debug_assert!(self.has_room());
        self.inflight.push_back(chunk);
    }

    /// Takes the chunk an answer for `range` is about out of the window. An answer for no chunk
    /// in flight breaks the protocol; `frame` names the answer for the error.
    pub(super) fn answered(
        &mut self,
        range: ByteRange,
        frame: &'static str,
    ) -> Result<ByteRange, ClientError> {
        let pos = self
            .inflight
            .iter()
            .position(|r| *r == range)
            .ok_or(ClientError::Unexpected(frame))?;
        Ok(self.inflight.remove(pos).expect("position is in range"))
    }

    /// Puts back a chunk whose answer came but could not be kept, so that it is queued again.
    pub(super) fn restore(&mut self, chunk: ByteRange) {
        self.inflight.push_front(chunk);
    }

    /// Empties the window, oldest first.
    fn drain(&mut self) -> impl DoubleEndedIterator<Item = ByteRange> + '_ {
        self.inflight.drain(..)
    }
}

/// Reads the daemon's answer to a chunk sent under the window, `Ack` or `Reject` (CRC
/// mismatch), and takes that chunk out of `window`.
pub(super) async fn acknowledged(
    session: &mut Session,
    window: &mut Window,
) -> Result<Answer, ClientError> {
    let (c, rejected) = match session.next().await? {
        Frame::Ack(c) => (c, false),
        Frame::Reject(c) => (c, true),
        other => return Err(unexpected(other)),
    };
    let chunk = window.answered(ByteRange::new(c.offset, c.offset + u64::from(c.len)), "Ack")?;
    Ok(if rejected {
        Answer::Corrupt(chunk)
    } else {
        Answer::Moved(chunk)
    })
}

/// How long a connection moves before its throughput counts (at least 4 round trips): its
/// first round trips are slow start.
const RATE_AFTER: std::time::Duration = std::time::Duration::from_millis(200);

/// Moves chunks from `work` over `session` until every chunk is moved (or the pool sheds this
/// worker); on error, every chunk in flight goes back to the queue. Once the queue is empty the
/// worker stays for the endgame: with nothing in flight it takes copies of chunks slower
/// connections still hold, and otherwise waits for one to come back.
pub(super) async fn pump<D: Direction>(
    dir: &D,
    session: &mut Session,
    transfer_id: u64,
    work: &Work,
) -> Result<Pumped, ClientError> {
    let mut window = Window::new(session.welcome.window);
    let max = dir.max_chunk(session);
    let mut retired = false;
    let mut changes = work.changes();
    // What this connection moves across the path, read from the kernel (a chunk's answer comes
    // only once all of it crossed: a slow connection's first chunk would be its tail before
    // it had any), for the queue to cut a slow one's last pieces finer.
    let started = tokio::time::Instant::now();
    let settled = session
        .rtt
        .map_or(RATE_AFTER, |rtt| (rtt * 4).max(RATE_AFTER));
    let own = xfer_net::Delivered::new();
    // SAFETY: `session` holds its socket open for the length of the call (the count keeps a
    // descriptor of its own).
    let _counted = session
        .fd
        .and_then(|fd| own.count(unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }));
    let result = async {
        loop {
            // Whatever changes from here on wakes the wait below.
            changes.borrow_and_update();
            while window.has_room() {
                let elapsed = started.elapsed();
                let room = Room {
                    idle: window.is_empty(),
                    window: window.capacity,
                    rate: (elapsed >= settled)
                        .then(|| own.read())
                        .flatten()
                        .map(|d| d.moved() as f64 / elapsed.as_secs_f64()),
                };
                let Some(chunk) = work.take(&mut retired, room) else {
                    break;
                };
                if chunk.len() > u64::from(max) {
                    // The server moves smaller chunks than planned: split this one.
                    work.split(chunk, split_into_chunks(&[chunk], max));
                    continue;
                }
                window.push(chunk);
                dir.request(session, transfer_id, chunk, work).await?;
            }
            if window.is_empty() {
                if retired {
                    return Ok(Pumped::Retired);
                }
                if work.is_finished() {
                    return Ok(Pumped::Drained);
                }
                // Other connections hold the last chunks: one may come back, or be slow enough
                // to copy, or the transfer ends.
                let slow = work.next_copy_at();
                tokio::select! {
                    _ = changes.changed() => {}
                    () = sleep_until(slow), if slow.is_some() => {}
                }
                continue;
            }
            match dir.answer(session, transfer_id, &mut window, work).await? {
                Answer::Moved(chunk) => work.complete(chunk),
                Answer::Corrupt(chunk) => {
                    work.crc_retries.fetch_add(1, Ordering::Relaxed);
                    work.release(std::iter::once(chunk));
                }
                Answer::Dropped(_) => {}
            }
        }
    }
    .await;
    if result.is_err() {
        work.release(window.drain());
    }
    result
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::io::DuplexStream;
    use xfer_net::{FrameReader, FrameWriter};
    use xfer_proto::ChunkRef;

    use super::super::{test_options, test_session};
    use super::*;
    use crate::ProgressCounter;

    /// The window skeleton alone: asks for each chunk with `ReadChunk`, takes `Ack` and
    /// `Reject` as answers as uploads do.
    struct Probe;

    impl Direction for Probe {
        async fn open(&self, _: &mut Session) -> Result<u64, ClientError> {
            Ok(7)
        }

        fn max_chunk(&self, session: &Session) -> u32 {
            session.welcome.max_chunk_size
        }

        async fn request(
            &self,
            session: &mut Session,
            transfer_id: u64,
            chunk: ByteRange,
            _: &Work,
        ) -> Result<(), ClientError> {
            let len = chunk.len() as u32;
            let req = ChunkRef {
                transfer_id,
                offset: chunk.start,
                len,
            };
            session.send(&Frame::ReadChunk(req)).await
        }

        async fn answer(
            &self,
            session: &mut Session,
            _: u64,
            window: &mut Window,
            _: &Work,
        ) -> Result<Answer, ClientError> {
            acknowledged(session, window).await
        }
    }

    /// The daemon's end of the pipe.
    struct Daemon {
        reader: FrameReader<tokio::io::ReadHalf<DuplexStream>>,
        writer: FrameWriter<tokio::io::WriteHalf<DuplexStream>>,
    }

    impl Daemon {
        fn new(io: DuplexStream) -> Self {
            let (read, write) = tokio::io::split(io);
            Self {
                reader: FrameReader::new(read),
                writer: FrameWriter::new(write),
            }
        }

        async fn request(&mut self) -> ChunkRef {
            match self.reader.read_frame().await.unwrap() {
                Some(Frame::ReadChunk(c)) => c,
                other => panic!("expected a request, got {other:?}"),
            }
        }

        /// True if the client sends nothing more until every task waits (time is paused, so
        /// this is the client blocked on an answer, not a clock running out).
        async fn client_waits(&mut self) -> bool {
            tokio::time::timeout(Duration::from_secs(60), self.reader.read_frame())
                .await
                .is_err()
        }
    }

    fn chunks(n: u64, len: u64) -> Vec<ByteRange> {
        (0..n).map(|i| range(i * len, (i + 1) * len)).collect()
    }

    fn range(start: u64, end: u64) -> ByteRange {
        ByteRange::new(start, end)
    }

    #[test]
    fn the_window_is_bounded_by_the_daemon_and_by_its_own_cap() {
        for (advertised, capacity) in [(0, 1), (1, 1), (2, 2), (64, 64), (1000, 64)] {
            let mut window = Window::new(advertised);
            let mut pushed = 0;
            while window.has_room() {
                window.push(range(pushed, pushed + 1));
                pushed += 1;
            }
            assert_eq!(pushed, capacity, "window {advertised}");
        }
    }

    #[test]
    fn answers_are_matched_by_range_in_any_order() {
        let mut window = Window::new(4);
        for i in 0..3 {
            window.push(range(i * 10, i * 10 + 10));
        }
        assert_eq!(
            window.answered(range(10, 20), "Ack").unwrap(),
            range(10, 20)
        );
        assert!(window.has_room());
        // An answer for nothing in flight, or for part of a chunk, breaks the protocol.
        assert!(matches!(
            window.answered(range(10, 20), "Ack"),
            Err(ClientError::Unexpected("Ack"))
        ));
        assert!(matches!(
            window.answered(range(0, 5), "Data"),
            Err(ClientError::Unexpected("Data"))
        ));
        assert_eq!(
            window.answered(range(20, 30), "Ack").unwrap(),
            range(20, 30)
        );
        window.restore(range(20, 30));
        let left: Vec<_> = window.drain().collect();
        assert_eq!(left, [range(20, 30), range(0, 10)]);
        assert!(window.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn at_most_the_window_is_in_flight_and_answers_may_come_in_any_order() {
        let progress = Arc::new(ProgressCounter::default());
        let work = Work::new(chunks(10, 100), &test_options(progress.clone()));
        let (mut session, theirs) = test_session(3, 1 << 20);
        let daemon = tokio::spawn(async move {
            let mut daemon = Daemon::new(theirs);
            let mut answered = 0;
            while answered < 10 {
                let batch = 3.min(10 - answered);
                let mut asked = Vec::new();
                for _ in 0..batch {
                    asked.push(daemon.request().await);
                }
                assert!(
                    daemon.client_waits().await,
                    "more than the window in flight"
                );
                // Newest first: the client matches answers by range, not by order.
                for c in asked.into_iter().rev() {
                    daemon.writer.send(&Frame::Ack(c)).await.unwrap();
                    answered += 1;
                }
            }
        });
        let pumped = pump(&Probe, &mut session, 7, &work).await.unwrap();
        daemon.await.unwrap();
        assert_eq!(pumped, Pumped::Drained);
        assert_eq!(progress.done(), 1000);
        assert!(work.is_finished());
    }

    #[tokio::test]
    async fn a_rejected_chunk_is_asked_for_again_and_counted() {
        let progress = Arc::new(ProgressCounter::default());
        let work = Work::new(chunks(3, 100), &test_options(progress.clone()));
        let (mut session, theirs) = test_session(1, 1 << 20);
        let daemon = tokio::spawn(async move {
            let mut daemon = Daemon::new(theirs);
            let mut seen = Vec::new();
            for i in 0..4 {
                let c = daemon.request().await;
                seen.push(c.offset);
                let answer = if i == 1 {
                    Frame::Reject(c)
                } else {
                    Frame::Ack(c)
                };
                daemon.writer.send(&answer).await.unwrap();
            }
            seen
        });
        assert_eq!(
            pump(&Probe, &mut session, 7, &work).await.unwrap(),
            Pumped::Drained
        );
        // The rejected chunk went back to the front of the queue.
        assert_eq!(daemon.await.unwrap(), [0, 100, 100, 200]);
        assert_eq!(work.crc_retries.load(Ordering::Relaxed), 1);
        assert_eq!(progress.done(), 300);
    }

    #[tokio::test]
    async fn a_failed_connection_puts_every_chunk_in_flight_back_in_the_queue() {
        let progress = Arc::new(ProgressCounter::default());
        let work = Work::new(chunks(6, 100), &test_options(progress.clone()));
        let (mut session, theirs) = test_session(4, 1 << 20);
        let daemon = tokio::spawn(async move {
            let mut daemon = Daemon::new(theirs);
            let mut asked = Vec::new();
            for _ in 0..4 {
                asked.push(daemon.request().await);
            }
            daemon.writer.send(&Frame::Ack(asked[1])).await.unwrap();
            // Then the connection drops.
        });
        let failed = pump(&Probe, &mut session, 7, &work).await;
        daemon.await.unwrap();
        assert!(failed.is_err());
        assert_eq!(progress.done(), 100);
        let mut retired = false;
        let busy = Room {
            idle: false,
            window: 1,
            rate: None,
        };
        let left: Vec<_> = std::iter::from_fn(|| work.take(&mut retired, busy)).collect();
        let mut expected = chunks(6, 100);
        expected.remove(1);
        assert_eq!(left, expected);
    }

    #[tokio::test]
    async fn chunks_larger_than_the_daemon_moves_are_split() {
        let progress = Arc::new(ProgressCounter::default());
        let work = Work::new(vec![range(0, 10_000)], &test_options(progress.clone()));
        let (mut session, theirs) = test_session(8, 4096);
        let daemon = tokio::spawn(async move {
            let mut daemon = Daemon::new(theirs);
            let mut lens = Vec::new();
            for _ in 0..3 {
                let c = daemon.request().await;
                lens.push(c.len);
                daemon.writer.send(&Frame::Ack(c)).await.unwrap();
            }
            lens
        });
        assert_eq!(
            pump(&Probe, &mut session, 7, &work).await.unwrap(),
            Pumped::Drained
        );
        assert_eq!(daemon.await.unwrap(), [4096, 4096, 1808]);
        assert_eq!(progress.done(), 10_000);
    }
}
