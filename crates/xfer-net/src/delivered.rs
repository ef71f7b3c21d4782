//! [`Delivered`]: the bytes a group of connections (a client's pool, or one daemon connection)
//! has moved across the path, read from the kernel (`TCP_INFO`) whenever asked: what their
//! peers acknowledged and what arrived from them, with the bytes still queued and the round trip.
//!
//! Bytes handed to a socket are not bytes moved: a sender can hand a socket buffer's worth
//! (megabytes, a large share of a second on a 50 ms path) at memory speed, so a rate timed from
//! writes measures buffers filling. What the peer acknowledged is what the path delivered.
//! Measuring throughput from [`Delivered`] instead, with the bytes queued at a mark known, a
//! measurement can also start once everything handed before it has gone. `auto` compression
//! measures its probes by it, and the client's pool its growth.

use std::os::fd::{BorrowedFd, OwnedFd};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::AsyncWrite;

use crate::sockopt;

/// What a [`Delivered`] meter reads at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Delivery {
    /// Bytes acknowledged by the peer, over every connection counted so far (those no longer
    /// counted included); it never goes down.
    pub acked: u64,
    /// Bytes that arrived from the peer, over every connection counted so far; it never goes
    /// down.
    pub received: u64,
    /// Bytes written to the connections counted now and not yet acknowledged: in flight, or
    /// still in the socket buffers. Once `acked` has grown by this much, everything written
    /// before this reading has been delivered.
    pub queued: u64,
    /// The longest smoothed round-trip time among the connections counted now, if the kernel
    /// says.
    pub rtt: Option<Duration>,
}

impl Delivery {
    /// Bytes moved across the path both ways: acknowledged (sent) and received.
    pub fn moved(&self) -> u64 {
        self.acked + self.received
    }
}

/// Bytes moved by a group of sockets; clones share one meter. Each socket is counted while the
/// [`Counted`] guard made for it lives.
#[derive(Debug, Clone, Default)]
pub struct Delivered {
    inner: Arc<Mutex<Sockets>>,
}

#[derive(Debug, Default)]
struct Sockets {
    /// Sockets counted now: a key, a descriptor of its own on the socket (so it is never read
    /// after its connection closed it, nor another socket given the same number), and what the
    /// socket had moved when counting began.
    open: Vec<(u64, OwnedFd, Moved)>,
    /// What sockets no longer counted moved while they were.
    closed: Moved,
    /// Sockets counted so far.
    next_key: u64,
    /// The least round trip any socket counted so far has seen: the path without a queue.
    base_rtt: Option<Duration>,
}

/// Bytes acknowledged and received.
#[derive(Debug, Clone, Copy, Default)]
struct Moved {
    acked: u64,
    received: u64,
}

impl Moved {
    fn since(now: sockopt::Sending, base: Self) -> Self {
        Self {
            acked: now.acked.saturating_sub(base.acked),
            received: now.received.saturating_sub(base.received),
        }
    }

    fn add(&mut self, other: Self) {
        self.acked += other.acked;
        self.received += other.received;
    }
}

impl Delivered {
    /// A meter with no socket yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts what the connection on `socket` moves from now until the returned guard drops;
    /// `None` where the kernel does not say (nothing is counted then). The guard keeps a
    /// duplicate of the descriptor: the socket stays open until both are closed.
    pub fn count(&self, socket: BorrowedFd<'_>) -> Option<Counted> {
        let socket = socket.try_clone_to_owned().ok()?;
        let now = sockopt::sending(&socket)?;
        let base = Moved {
            acked: now.acked,
            received: now.received,
        };
        let mut sockets = self.lock();
        let key = sockets.next_key;
        sockets.next_key += 1;
        sockets.open.push((key, socket, base));
        Some(Counted {
            meter: self.clone(),
            key,
        })
    }

    /// `inner`, the stream writing to `socket`, as a writer whose socket this meter counts for
    /// as long as it lives.
    pub fn track<W>(&self, socket: BorrowedFd<'_>, inner: W) -> Tracked<W> {
        Tracked {
            _counted: self.count(socket),
            inner,
        }
    }

    /// What the sockets counted so far have moved, and what those counted now still hold;
    /// `None` before a socket was counted (nothing to measure by yet).
    pub fn read(&self) -> Option<Delivery> {
        let sockets = self.lock();
        if sockets.next_key == 0 {
            return None;
        }
        let mut moved = sockets.closed;
        let mut reading = Delivery::default();
        for (_, socket, base) in &sockets.open {
            if let Some(now) = sockopt::sending(socket) {
                moved.add(Moved::since(now, *base));
                reading.queued += now.queued;
                reading.rtt = reading.rtt.max(now.rtt);
            }
        }
        reading.acked = moved.acked;
        reading.received = moved.received;
        Some(reading)
    }

    /// How long the data these sockets send waits in queues on its path: the mean round trip of
    /// the sockets counted now that sent more than they received, over the least round trip
    /// any counted socket has seen (the path without a queue). A queue that stands means the
    /// bottleneck is busy all the time: more connections would only lengthen it. Only a sender
    /// times the data's path: a receiver's round trips (`tcpi_rtt` of its few requests, which
    /// the peer may hold for a delayed acknowledgment, or `tcpi_rcv_rtt`) also count the pauses
    /// of its sender, and through a proxy that paced each connection they read as a queue of
    /// tens of milliseconds. `None` while no sender's round trip is known.
    pub fn queue_delay(&self) -> Option<Duration> {
        let mut sockets = self.lock();
        let mut base = sockets.base_rtt;
        let mut rtts = Vec::with_capacity(sockets.open.len());
        for (_, socket, start) in &sockets.open {
            let Some(now) = sockopt::sending(socket) else {
                continue;
            };
            base = least(base, now.min_rtt);
            let moved = Moved::since(now, *start);
            if moved.acked > moved.received {
                rtts.extend(now.rtt);
            }
        }
        sockets.base_rtt = base;
        queue_over(base?, &rtts)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Sockets> {
        // Numbers only: a state left by a panic is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn least(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The mean of `rtts` beyond `base`; `None` without a round trip.
fn queue_over(base: Duration, rtts: &[Duration]) -> Option<Duration> {
    let count = u32::try_from(rtts.len()).ok().filter(|&n| n > 0)?;
    let mean = rtts.iter().sum::<Duration>() / count;
    Some(mean.saturating_sub(base))
}

/// A socket a [`Delivered`] meter counts; when dropped, what it moved stays in the meter's
/// readings and its descriptor of the socket is closed.
#[derive(Debug)]
pub struct Counted {
    meter: Delivered,
    key: u64,
}

impl Drop for Counted {
    fn drop(&mut self) {
        let mut sockets = self.meter.lock();
        if let Some(at) = sockets.open.iter().position(|(key, ..)| *key == self.key) {
            let (_, socket, base) = sockets.open.swap_remove(at);
            if let Some(now) = sockopt::sending(&socket) {
                sockets.closed.add(Moved::since(now, base));
            }
        }
    }
}

/// A writer whose socket a [`Delivered`] meter counts while it lives; it writes through to the
/// stream it wraps.
#[derive(Debug)]
pub struct Tracked<W> {
    _counted: Option<Counted>,
    inner: W,
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
    use std::io::{Read, Write};
    use std::os::fd::AsFd;
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
        let fd = socket.as_fd().try_clone_to_owned().unwrap();
        let mut writer = meter.track(fd.as_fd(), socket);
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

    #[test]
    fn the_queue_is_the_mean_round_trip_beyond_the_least_one_seen() {
        let ms = Duration::from_millis;
        assert_eq!(queue_over(ms(150), &[]), None);
        assert_eq!(queue_over(ms(150), &[ms(200), ms(260)]), Some(ms(80)));
        // Round trips below the path's least (a connection's smoothing lags) are no queue.
        assert_eq!(queue_over(ms(150), &[ms(140)]), Some(Duration::ZERO));
        assert_eq!(least(None, Some(ms(3))), Some(ms(3)));
        assert_eq!(least(Some(ms(2)), Some(ms(3))), Some(ms(2)));
    }

    #[test]
    fn only_a_socket_that_sent_more_than_it_received_reads_the_queue() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut ours = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut theirs, _) = listener.accept().unwrap();
        let meter = Delivered::new();
        assert_eq!(meter.queue_delay(), None, "no socket counted");
        let _counted = meter.count(ours.as_fd());
        let mut got = [0; 1000];
        // Receiving only: no round trip of the data's path is known here.
        theirs.write_all(&[1; 1000]).unwrap();
        ours.read_exact(&mut got).unwrap();
        assert_eq!(meter.queue_delay(), None);
        ours.write_all(&[7; 4000]).unwrap();
        let mut sent = [0; 4000];
        theirs.read_exact(&mut sent).unwrap();
        theirs.write_all(&got[..10]).unwrap();
        ours.read_exact(&mut got[..10]).unwrap();
        // Loopback queues nothing worth a round trip of a WAN.
        let queue = meter
            .queue_delay()
            .expect("Linux times a sender's round trips");
        assert!(queue < Duration::from_secs(1), "{queue:?}");
    }

    #[test]
    fn counts_what_crossed_both_ways_while_a_socket_is_counted_and_keeps_it() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut ours = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut theirs, _) = listener.accept().unwrap();
        // The peer reads what is sent, then answers: its answer acknowledges every byte sent.
        let peer = std::thread::spawn(move || {
            let mut got = vec![0; 1 << 20];
            theirs.read_exact(&mut got).unwrap();
            theirs.write_all(&[1; 1000]).unwrap();
            theirs
        });
        let meter = Delivered::new();
        let counted = meter.count(ours.as_fd());
        assert!(counted.is_some(), "Linux reports what a TCP socket moved");
        assert_eq!(meter.read().map(|r| r.moved()), Some(0));
        ours.write_all(&vec![7; 1 << 20]).unwrap();
        let mut answer = [0; 1000];
        ours.read_exact(&mut answer).unwrap();
        let reading = meter.read().unwrap();
        assert_eq!((reading.acked, reading.received), (1 << 20, 1000));
        // No longer counted: what it moved stays, what it moves next is not added.
        drop(counted);
        let mut theirs = peer.join().unwrap();
        theirs.write_all(&[2; 500]).unwrap();
        ours.read_exact(&mut answer[..500]).unwrap();
        let reading = meter.read().unwrap();
        assert_eq!((reading.acked, reading.received), (1 << 20, 1000));
    }
}
