//! Framed transport over any `AsyncRead`/`AsyncWrite`: [`FrameReader`] and [`FrameWriter`].
//! Data payloads are written with one vectored write after their header, never copied.
//!
//! This module does not create sockets; callers hand it the halves of one.

use std::future::Future;
use std::io::IoSlice;
use std::pin::Pin;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::codec::Decoder;
use xfer_proto::{Frame, FrameCodec, FrameType, ProtoError, LEN_AND_DATA_HEADER, LEN_PREFIX};

use xfer_core::buffers::BufferPool;
use xfer_core::direct::PAYLOAD_ALIGN;
use xfer_core::{MemoryBudget, Reservation};

/// Frames longer than this are read into a buffer of their own; shorter ones are cut from the
/// reader's buffer, which never reads more than this at once.
const INITIAL_READ_BUFFER: usize = 64 * 1024;
/// What the reader's buffer starts with.
const SMALL_READ_BUFFER: usize = 8 * 1024;

/// Reads whole frames from a byte stream.
///
/// Small frames are cut from one growing buffer. A frame larger than 64 KiB (a chunk) is read
/// into a buffer of its own from a small per-reader pool, which its payload hands back once the
/// chunk is written and dropped: the memory is reused instead of faulted in afresh per chunk,
/// and bytes of the next frame never share (and so never have to be copied out of) a chunk's
/// allocation.
///
/// With a [`MemoryBudget`] ([`FrameReader::with_budget`]), a large frame's buffer is reserved
/// from it once the frame's length is known and before its body is read: while the budget is
/// spent, the reader waits without reading, and the sender is slowed by TCP. Such buffers go
/// back to the budget with their reservation when the payload is dropped, which frees them or
/// keeps them for the next chunk of any connection.
#[derive(Debug)]
pub struct FrameReader<R> {
    io: R,
    buf: BytesMut,
    codec: FrameCodec,
    large: Option<LargeFrame>,
    buffers: BufferPool,
    budget: Option<MemoryBudget>,
    /// The reservation being waited for, kept here so that a cancelled read keeps its place.
    reserving: Option<Reserving>,
    /// Bytes read from `io` so far: a frame still arriving shows here before it is whole.
    received: u64,
}

/// A large frame's body (type byte onwards) at `body[start..]`, `filled` bytes of it read.
#[derive(Debug)]
struct LargeFrame {
    body: Vec<u8>,
    start: usize,
    filled: usize,
    reservation: Option<Reservation>,
}

/// Where a large frame's body starts in its buffer so that a `Data` payload lands at a multiple
/// of [`PAYLOAD_ALIGN`]: the receiver can then write it to disk directly, around the page cache
/// ([`xfer_core::direct`]). Other frames start at the front.
fn body_start(buffer: &[u8], frame_type: u8) -> usize {
    if frame_type != FrameType::Data as u8 {
        return 0;
    }
    let payload_in_body = LEN_AND_DATA_HEADER - LEN_PREFIX;
    let payload_at = buffer.as_ptr() as usize + payload_in_body;
    payload_at.next_multiple_of(PAYLOAD_ALIGN) - payload_at
}

/// A pending [`MemoryBudget::reserve`].
struct Reserving(Pin<Box<dyn Future<Output = Reservation> + Send>>);

impl std::fmt::Debug for Reserving {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reserving(..)")
    }
}

/// Spare chunk buffers one reader keeps. A daemon connection has one chunk being written while
/// it reads the next; once written, that buffer is the one the chunk after is read into.
const SPARE_BUFFERS: usize = 1;

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Wraps a reader.
    pub fn new(io: R) -> Self {
        Self {
            io,
            buf: BytesMut::new(),
            codec: FrameCodec::default(),
            large: None,
            buffers: BufferPool::new(SPARE_BUFFERS),
            budget: None,
            reserving: None,
            received: 0,
        }
    }

    /// Bytes read from the peer so far, frames not yet whole included.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Whether the reader is waiting for memory from its budget: the wait is this side's, not
    /// the peer's.
    pub fn waiting_for_budget(&self) -> bool {
        self.reserving.is_some()
    }

    /// Reads every large frame into a buffer reserved from `budget` first.
    #[must_use]
    pub fn with_budget(mut self, budget: MemoryBudget) -> Self {
        self.budget = Some(budget);
        self.buffers = BufferPool::new(0);
        self
    }

    /// The next frame, or `None` when the peer closed cleanly between frames.
    ///
    /// # Errors
    /// A [`ProtoError`] for malformed input, a stream cut inside a frame, or an I/O error.
    ///
    /// # Cancel safety
    /// Cancel safe: partial input stays buffered for the next call.
    pub async fn read_frame(&mut self) -> Result<Option<Frame>, ProtoError> {
        loop {
            if let Some(large) = &mut self.large {
                while large.start + large.filled < large.body.len() {
                    let at = large.start + large.filled;
                    let n = eof_as_end(self.io.read(&mut large.body[at..]).await)?;
                    self.received += n as u64;
                    if n == 0 {
                        let buffered = LEN_PREFIX + large.filled;
                        self.large = None;
                        return Err(ProtoError::TruncatedStream { buffered });
                    }
                    large.filled += n;
                }
                let large = self.large.take().expect("checked above");
                let start = large.start;
                let body = match large.reservation {
                    Some(reservation) => BufferPool::reserved_bytes(large.body, reservation),
                    None => self.buffers.bytes(large.body),
                };
                return Frame::decode(body.slice(start..)).map(Some);
            }
            if let Some(frame) = self.codec.decode(&mut self.buf)? {
                return Ok(Some(frame));
            }
            if let Some(len) = self.large_len() {
                let reservation = match &self.budget {
                    None => None,
                    Some(budget) => {
                        let reserving = self.reserving.get_or_insert_with(|| {
                            Reserving(Box::pin(budget.reserve(len + PAYLOAD_ALIGN)))
                        });
                        let reservation = reserving.0.as_mut().await;
                        self.reserving = None;
                        Some(reservation)
                    }
                };
                self.start_large(len, reservation);
                continue;
            }
            if self.buf.capacity() - self.buf.len() < 4096 {
                // Grown by doubling as small frames pile up; a stream of chunks, each moved to
                // a buffer of its own, keeps it small (8 KiB, not 64 KiB, per connection).
                let grow = self
                    .buf
                    .capacity()
                    .clamp(SMALL_READ_BUFFER, INITIAL_READ_BUFFER);
                self.buf.reserve(grow);
            }
            let read = self
                .io
                .read_buf(&mut (&mut self.buf).limit(INITIAL_READ_BUFFER))
                .await;
            let n = eof_as_end(read)?;
            self.received += n as u64;
            if n == 0 {
                return self.codec.decode_eof(&mut self.buf);
            }
        }
    }

    /// The body length of a large frame whose length and type the decoder has accepted but
    /// which is not yet whole in the buffer.
    fn large_len(&self) -> Option<usize> {
        let prefix = self.buf.get(..=LEN_PREFIX)?;
        let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
        (len > INITIAL_READ_BUFFER).then_some(len)
    }

    /// Moves the large frame of `len` bytes at the front of the buffer into a buffer of its
    /// own (reserved from the budget, or pooled), which the rest is read into. The buffer has
    /// room to place a payload aligned ([`body_start`]).
    fn start_large(&mut self, len: usize, reservation: Option<Reservation>) {
        let room = len + PAYLOAD_ALIGN;
        let (mut body, reservation) = match reservation {
            Some(reservation) => {
                let (body, reservation) = reservation.buffer(room);
                (body, Some(reservation))
            }
            None => (self.buffers.take(room), None),
        };
        let start = body_start(&body, self.buf[LEN_PREFIX]);
        body.truncate(start + len);
        let have = self.buf.len() - LEN_PREFIX;
        body[start..start + have].copy_from_slice(&self.buf[LEN_PREFIX..]);
        self.buf.clear();
        self.large = Some(LargeFrame {
            body,
            start,
            filled: have,
            reservation,
        });
    }

    /// The next frame if it is already buffered whole; never waits for input. Lets a server
    /// gather requests a client pipelined and answer them together.
    ///
    /// # Errors
    /// A [`ProtoError`] for malformed input.
    pub fn buffered_frame(&mut self) -> Result<Option<Frame>, ProtoError> {
        self.codec.decode(&mut self.buf)
    }

    /// The underlying reader.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.io
    }
}

/// Writes frames to a byte stream.
#[derive(Debug)]
pub struct FrameWriter<W> {
    io: W,
    buf: BytesMut,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    /// Wraps a writer.
    pub fn new(io: W) -> Self {
        Self {
            io,
            buf: BytesMut::with_capacity(4096),
        }
    }

    /// Writes one frame completely.
    ///
    /// # Errors
    /// I/O errors, or a control body that cannot be encoded.
    ///
    /// # Cancel safety
    /// Not cancel safe: a cancelled call may leave half a frame on the stream.
    pub async fn send(&mut self, frame: &Frame) -> Result<(), ProtoError> {
        self.send_all(std::slice::from_ref(frame)).await
    }

    /// Writes frames completely, control frames gathered into one write, then flushes once.
    ///
    /// # Errors
    /// I/O errors, or a control body that cannot be encoded.
    ///
    /// # Cancel safety
    /// Not cancel safe: a cancelled call may leave half a frame on the stream.
    pub async fn send_all(&mut self, frames: &[Frame]) -> Result<(), ProtoError> {
        self.send_all_unless_stalled(frames, None).await
    }

    /// As [`Self::send_all`], but with `stall`, fails with an I/O error of kind `TimedOut` once
    /// the peer has taken no byte for that long. A slow reader that keeps reading is not
    /// stalled, however long a large frame takes it.
    ///
    /// # Errors
    /// As [`Self::send_all`], and the stall.
    ///
    /// # Cancel safety
    /// Not cancel safe: a cancelled call may leave half a frame on the stream.
    pub async fn send_all_unless_stalled(
        &mut self,
        frames: &[Frame],
        stall: Option<Duration>,
    ) -> Result<(), ProtoError> {
        self.buf.clear();
        for frame in frames {
            if let Some((header, payload)) = frame.raw_parts() {
                write_all_unless_stalled(&mut self.io, &self.buf, stall).await?;
                self.buf.clear();
                let (mut h, mut p) = (&header[..], &payload[..]);
                while !h.is_empty() || !p.is_empty() {
                    let n = unless_stalled(
                        stall,
                        self.io.write_vectored(&[IoSlice::new(h), IoSlice::new(p)]),
                    )
                    .await?;
                    if n == 0 {
                        return Err(std::io::Error::from(std::io::ErrorKind::WriteZero).into());
                    }
                    let from_header = n.min(h.len());
                    h = &h[from_header..];
                    p = &p[n - from_header..];
                }
            } else {
                frame.encode(&mut self.buf)?;
            }
        }
        write_all_unless_stalled(&mut self.io, &self.buf, stall).await?;
        // A TLS stream keeps the tail of a record buffered until flushed; the peer is waiting
        // for the whole frame. On plain TCP this does nothing.
        unless_stalled(stall, self.io.flush()).await?;
        Ok(())
    }

    /// Shuts the write side down (TCP FIN).
    ///
    /// # Errors
    /// I/O errors.
    pub async fn shutdown(&mut self) -> Result<(), ProtoError> {
        self.io.flush().await?;
        self.io.shutdown().await?;
        Ok(())
    }
}

/// A TLS peer that closes its socket without `close_notify` reads as `UnexpectedEof`. Frames are
/// length-prefixed, so the framing itself tells a clean end (at a frame boundary) from a cut one
/// (`TruncatedStream`): treat it as the end of the stream, like a plain TCP close.
/// `write_all`, each write bounded by `stall` (see [`unless_stalled`]).
async fn write_all_unless_stalled<W: AsyncWrite + Unpin>(
    io: &mut W,
    mut buf: &[u8],
    stall: Option<Duration>,
) -> std::io::Result<()> {
    while !buf.is_empty() {
        let n = unless_stalled(stall, io.write(buf)).await?;
        if n == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::WriteZero));
        }
        buf = &buf[n..];
    }
    Ok(())
}

/// One write, or a `TimedOut` error if it took nothing for `stall`.
async fn unless_stalled<T>(
    stall: Option<Duration>,
    write: impl Future<Output = std::io::Result<T>>,
) -> std::io::Result<T> {
    let Some(stall) = stall else {
        return write.await;
    };
    match tokio::time::timeout(stall, write).await {
        Ok(written) => written,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("the peer read nothing for {stall:?}"),
        )),
    }
}

fn eof_as_end(read: std::io::Result<usize>) -> std::io::Result<usize> {
    match read {
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(0),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use xfer_proto::{Commit, Data};

    #[tokio::test]
    async fn frames_cross_a_pipe() {
        let (a, b) = tokio::io::duplex(1024);
        let writer = tokio::spawn(async move {
            let mut w = FrameWriter::new(a);
            let big = Bytes::from(vec![7u8; 100_000]);
            w.send(&Frame::Data(Data::new(1, 5, big))).await.unwrap();
            w.send(&Frame::Commit(Commit {
                transfer_id: 1,
                digest: vec![],
            }))
            .await
            .unwrap();
            w.shutdown().await.unwrap();
        });
        let mut r = FrameReader::new(b);
        let Some(Frame::Data(d)) = r.read_frame().await.unwrap() else {
            panic!("want data")
        };
        assert_eq!((d.offset, d.payload.len()), (5, 100_000));
        d.verify().unwrap();
        assert_eq!(
            r.read_frame().await.unwrap(),
            Some(Frame::Commit(Commit {
                transfer_id: 1,
                digest: vec![]
            }))
        );
        assert_eq!(r.read_frame().await.unwrap(), None);
        writer.await.unwrap();
    }

    fn encoded(frame: &Frame) -> Vec<u8> {
        let mut wire = BytesMut::new();
        tokio_util::codec::Encoder::encode(&mut FrameCodec::default(), frame.clone(), &mut wire)
            .unwrap();
        wire.to_vec()
    }

    /// A socket whose TLS peer went away without `close_notify`.
    struct ClosedWithoutNotify;

    impl AsyncRead for ClosedWithoutNotify {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            _: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "peer closed connection without sending TLS close_notify",
            )))
        }
    }

    #[tokio::test]
    async fn a_tls_close_without_notify_ends_the_stream_only_at_a_frame_boundary() {
        let commit = Frame::Commit(Commit {
            transfer_id: 1,
            digest: vec![],
        });
        let whole = encoded(&commit);
        let mut r = FrameReader::new((&whole[..]).chain(ClosedWithoutNotify));
        assert_eq!(r.read_frame().await.unwrap(), Some(commit));
        assert_eq!(r.read_frame().await.unwrap(), None);

        for cut in [
            whole[..whole.len() - 1].to_vec(),
            encoded(&Frame::Data(Data::new(
                3,
                0,
                Bytes::from(vec![9u8; 200_000]),
            )))[..150_000]
                .to_vec(),
        ] {
            let mut r = FrameReader::new((&cut[..]).chain(ClosedWithoutNotify));
            let err = r.read_frame().await.unwrap_err();
            assert!(matches!(err, ProtoError::TruncatedStream { .. }), "{err}");
        }
    }

    #[tokio::test]
    async fn a_large_frame_survives_a_cancelled_read() {
        let data = Frame::Data(Data::new(3, 0, Bytes::from(vec![9u8; 200_000])));
        let wire = encoded(&data);
        let (mut a, b) = tokio::io::duplex(1 << 20);
        let mut r = FrameReader::new(b);
        a.write_all(&wire[..150_000]).await.unwrap();
        // The read takes what is there, then waits; dropping it there must lose nothing.
        tokio::select! {
            biased;
            f = r.read_frame() => panic!("frame before its last bytes: {f:?}"),
            () = std::future::ready(()) => {}
        }
        a.write_all(&wire[150_000..]).await.unwrap();
        assert_eq!(r.read_frame().await.unwrap(), Some(data));
    }

    /// A chunk's payload is received at an aligned address, so the receiver can write it to
    /// disk directly; other large frames and the bytes around are unchanged.
    #[tokio::test]
    async fn a_chunk_payload_lands_aligned_with_or_without_a_budget() {
        let data = Frame::Data(Data::new(3, 1 << 20, Bytes::from(vec![5u8; 300_000])));
        let other = Frame::Data(Data::new(3, 0, Bytes::from(vec![6u8; 70_000])));
        let mut wire = encoded(&data);
        wire.extend(encoded(&other));
        for budget in [None, Some(MemoryBudget::new(1 << 26))] {
            let mut r = FrameReader::new(&wire[..]);
            if let Some(budget) = budget {
                r = r.with_budget(budget);
            }
            for want in [&data, &other] {
                let got = r.read_frame().await.unwrap().unwrap();
                let Frame::Data(d) = &got else {
                    panic!("want data, got {got:?}")
                };
                assert_eq!(d.payload.as_ptr() as usize % PAYLOAD_ALIGN, 0);
                assert_eq!(&got, want);
                d.verify().unwrap();
            }
            assert_eq!(r.read_frame().await.unwrap(), None);
        }
    }

    #[tokio::test]
    async fn a_stream_cut_inside_a_large_frame_is_truncated() {
        let wire = encoded(&Frame::Data(Data::new(
            3,
            0,
            Bytes::from(vec![1u8; 100_000]),
        )));
        let (mut a, b) = tokio::io::duplex(1 << 20);
        a.write_all(&wire[..70_000]).await.unwrap();
        drop(a);
        let err = FrameReader::new(b).read_frame().await.unwrap_err();
        assert!(
            matches!(err, ProtoError::TruncatedStream { buffered: 70_000 }),
            "{err}"
        );
    }

    /// A frame that takes a slow reader longer than the stall limit still goes, as long as the
    /// reader keeps taking bytes; a reader that takes none stalls the writer out.
    #[tokio::test(start_paused = true)]
    async fn a_slow_reader_is_not_a_stalled_one() {
        let stall = Some(Duration::from_millis(100));
        let data = || Frame::Data(Data::new(1, 0, Bytes::from(vec![7u8; 64 * 1024])));
        let (a, mut b) = tokio::io::duplex(1024);
        let slow = tokio::spawn(async move {
            let mut block = [0u8; 1024];
            let mut total = 0;
            loop {
                tokio::time::sleep(Duration::from_millis(20)).await;
                match b.read(&mut block).await.unwrap() {
                    0 => return total,
                    n => total += n,
                }
            }
        });
        let mut w = FrameWriter::new(a);
        let started = tokio::time::Instant::now();
        w.send_all_unless_stalled(&[data()], stall).await.unwrap();
        assert!(
            started.elapsed() > Duration::from_secs(1),
            "the reader was not slow"
        );
        w.shutdown().await.unwrap();
        drop(w);
        assert!(slow.await.unwrap() > 64 * 1024);

        let (a, _b) = tokio::io::duplex(1024);
        let mut w = FrameWriter::new(a);
        let err = w
            .send_all_unless_stalled(&[data()], stall)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, ProtoError::Io(e) if e.kind() == std::io::ErrorKind::TimedOut),
            "{err}"
        );
    }

    /// What the reader has taken counts before a frame is whole: the daemon's idle timeout
    /// tells a frame still arriving from silence by it.
    #[tokio::test]
    async fn bytes_of_a_frame_still_arriving_are_counted() {
        let mut bytes = BytesMut::new();
        Frame::Data(Data::new(1, 0, Bytes::from(vec![3u8; 200_000])))
            .encode(&mut bytes)
            .unwrap();
        let half = bytes.len() / 2;
        // The pipe holds all of it: nothing waits for the reader.
        let (mut a, b) = tokio::io::duplex(bytes.len());
        let mut r = FrameReader::new(b);
        a.write_all(&bytes[..half]).await.unwrap();
        let read = tokio::time::timeout(Duration::from_millis(50), r.read_frame()).await;
        assert!(read.is_err(), "half a frame is not a frame");
        assert_eq!(r.received(), half as u64);
        a.write_all(&bytes[half..]).await.unwrap();
        assert!(matches!(
            r.read_frame().await.unwrap(),
            Some(Frame::Data(_))
        ));
        assert_eq!(r.received(), bytes.len() as u64);
    }
}
