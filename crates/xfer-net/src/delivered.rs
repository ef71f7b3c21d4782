//! [`Delivered`]: the bytes a group of connections (a client's pool) has had acknowledged by
//! its peer, read from the kernel (`TCP_INFO`) whenever asked, with the bytes still queued.
//!
//! Bytes handed to a socket are not bytes moved: a sender can hand a socket buffer's worth
//! (megabytes, a large share of a second on a 50 ms path) at memory speed, so a rate timed from
//! writes measures buffers filling. What the peer acknowledged is what the path delivered.
//! Measuring throughput from [`Delivered`] instead, with the bytes queued at a mark known, a
//! measurement can also start once everything handed before it has gone.

use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::AsyncWrite;

use crate::sockopt;

/// What a [`Delivered`] meter reads at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Delivery {
    /// Bytes acknowledged by the peer, over every connection tracked so far (those closed
    /// included); it never goes down.
    pub acked: u64,
    /// Bytes written to the open connections and not yet acknowledged: in flight, or still in
    /// the socket buffers. Once `acked` has grown by this much, everything written before this
    /// reading has been delivered.
    pub queued: u64,
    /// The longest smoothed round-trip time among the open connections, if the kernel says.
    pub rtt: Option<Duration>,
}

/// Acknowledged bytes of a group of sockets; clones share one meter. Each socket is counted
/// while the [`Tracked`] writer made for it lives.
#[derive(Debug, Clone, Default)]
pub struct Delivered {
    inner: Arc<Mutex<Sockets>>,
}

#[derive(Debug, Default)]
struct Sockets {
    /// Open sockets: a key, the descriptor, and its `tcpi_bytes_acked` when it was tracked.
    open: Vec<(u64, RawFd, u64)>,
    /// Bytes acknowledged on sockets no longer tracked.
    closed: u64,
    next_key: u64,
}

impl Delivered {
    /// A meter with no socket yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts the socket `fd` from now on, for as long as the returned writer (which wraps
    /// `inner`, the stream writing to that socket) lives. `inner` must keep the socket open.
    /// Where the kernel does not report acknowledged bytes, nothing is counted.
    pub fn track<W>(&self, fd: BorrowedFd<'_>, inner: W) -> Tracked<W> {
        let key = sockopt::bytes_acked(fd).map(|acked| {
            let mut sockets = self.lock();
            let key = sockets.next_key;
            sockets.next_key += 1;
            sockets.open.push((key, fd.as_raw_fd(), acked));
            key
        });
        Tracked {
            key,
            meter: self.clone(),
            inner,
        }
    }

    /// What the tracked sockets have delivered so far, and what they still hold; `None` before
    /// a socket was tracked (nothing to measure by yet).
    pub fn read(&self) -> Option<Delivery> {
        let sockets = self.lock();
        if sockets.next_key == 0 {
            return None;
        }
        let mut reading = Delivery {
            acked: sockets.closed,
            ..Delivery::default()
        };
        for &(_, fd, base) in &sockets.open {
            // SAFETY: a socket is in `open` only while the `Tracked` writer holding it open
            // lives; that writer's drop takes this lock to remove it first.
            let socket = unsafe { BorrowedFd::borrow_raw(fd) };
            if let Some(sending) = sockopt::sending(socket) {
                reading.acked += sending.acked.saturating_sub(base);
                reading.queued += sending.queued;
                reading.rtt = reading.rtt.max(sending.rtt);
            }
        }
        Some(reading)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Sockets> {
        // Numbers only: a state left by a panic is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stops counting the socket tracked as `key`, keeping what it delivered.
    fn untrack(&self, key: u64) {
        let mut sockets = self.lock();
        let Some(at) = sockets.open.iter().position(|&(k, _, _)| k == key) else {
            return;
        };
        let (_, fd, base) = sockets.open.swap_remove(at);
        // SAFETY: the `Tracked` writer being dropped still holds the socket open.
        let socket = unsafe { BorrowedFd::borrow_raw(fd) };
        if let Some(acked) = sockopt::bytes_acked(socket) {
            sockets.closed += acked.saturating_sub(base);
        }
    }
}

/// A writer whose socket a [`Delivered`] meter counts while it lives; it writes through to the
/// stream it wraps.
#[derive(Debug)]
pub struct Tracked<W> {
    key: Option<u64>,
    meter: Delivered,
    inner: W,
}

impl<W> Drop for Tracked<W> {
    fn drop(&mut self) {
        // Runs before `inner` (and the socket it may own) is dropped.
        if let Some(key) = self.key {
            self.meter.untrack(key);
        }
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Tracked<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn counts_what_the_peer_acknowledged_and_keeps_it_after_the_socket_goes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let reader = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut all = Vec::new();
            socket.read_to_end(&mut all).await.unwrap();
            all.len()
        });
        let meter = Delivered::new();
        assert_eq!(meter.read(), None, "nothing tracked yet");
        let socket = tokio::net::TcpStream::connect(addr).await.unwrap();
        let fd = socket.as_raw_fd();
        // SAFETY: `socket` is open; it moves into the writer tracked.
        let mut writer = meter.track(unsafe { BorrowedFd::borrow_raw(fd) }, socket);
        assert_eq!(meter.read().map(|r| r.acked), Some(0));
        writer.write_all(&vec![7; 1 << 20]).await.unwrap();
        writer.shutdown().await.unwrap();
        assert_eq!(reader.await.unwrap(), 1 << 20);
        // Everything written is either acknowledged or still queued (the FIN takes one more
        // sequence number).
        let reading = meter.read().unwrap();
        let counted = reading.acked + reading.queued;
        assert!((1 << 20..=(1 << 20) + 1).contains(&counted), "{reading:?}");
        drop(writer);
        let closed = meter.read().unwrap();
        assert!(
            closed.acked >= reading.acked,
            "{closed:?} after {reading:?}"
        );
        assert_eq!(closed.queued, 0);
        assert_eq!(closed.rtt, None, "no socket is open");
    }
}
