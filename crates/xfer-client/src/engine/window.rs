//! The window skeleton both directions share: [`pump`] keeps up to the daemon's window of
//! requests in flight on one connection ([`Window`]), matches each answer to its chunk by range,
//! and on failure puts every chunk still in flight back in the queue. [`Direction`] is what an
//! upload and a download fill in.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::Ordering;

use xfer_core::split_into_chunks;
use xfer_proto::ByteRange;

use super::queue::Work;
use crate::{ClientError, Session};

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
}

/// What an answer meant for its chunk.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Answer {
    /// Moved for good: acknowledged (upload) or written (download).
    Moved(ByteRange),
    /// Its CRC did not match: to be moved again.
    Corrupt(ByteRange),
}

/// How a worker's run on one connection ended.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Pumped {
    /// Nothing left in the queue and nothing in flight.
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

/// Moves chunks from `work` over `session` until the queue is empty (or the pool sheds this
/// worker); on error, every chunk in flight goes back to the front of the queue.
pub(super) async fn pump<D: Direction>(
    dir: &D,
    session: &mut Session,
    transfer_id: u64,
    work: &Work,
) -> Result<Pumped, ClientError> {
    let mut window = Window::new(session.welcome.window);
    let max = dir.max_chunk(session);
    let mut retired = false;
    let result = async {
        loop {
            while window.has_room() {
                let Some(chunk) = work.take(&mut retired) else {
                    break;
                };
                if chunk.len() > u64::from(max) {
                    // The server moves smaller chunks than planned: split this one.
                    work.requeue(split_into_chunks(&[chunk], max).into_iter());
                    continue;
                }
                window.push(chunk);
                work.throttle(chunk.len()).await;
                dir.request(session, transfer_id, chunk, work).await?;
            }
            if window.is_empty() {
                return Ok(if retired {
                    Pumped::Retired
                } else {
                    Pumped::Drained
                });
            }
            match dir.answer(session, transfer_id, &mut window, work).await? {
                Answer::Moved(chunk) => work.complete(chunk),
                Answer::Corrupt(chunk) => {
                    work.crc_retries.fetch_add(1, Ordering::Relaxed);
                    work.requeue(std::iter::once(chunk));
                }
            }
        }
    }
    .await;
    if result.is_err() {
        work.requeue(window.drain());
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
