//! What lies beneath and beside a rustls session: [`TlsSocket`], the byte stream under it, and
//! kernel TLS ([`ktls`]), which takes the record layer off rustls once the handshake is done.
//!
//! rustls reads its input 4 KiB at a time: straight from a socket, that is four system calls
//! per 16 KiB record. [`TlsSocket`] reads the socket in large pieces and hands rustls its small
//! ones from memory. During the handshake it reads no byte past the end of the current record,
//! so that when the handshake is done nothing after it sits in a buffer: the kernel can then
//! take the connection over ([`ktls::enable`]).

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub mod ktls;

/// The size of [`TlsSocket`]'s read buffer once the handshake is done: about what the kernel
/// hands over per read on a busy connection.
pub const READ_BUFFER: usize = 256 * 1024;

/// A TLS record's header: type, version, length.
const RECORD_HEADER: usize = 5;

/// The stream beneath a TLS session: record by record during the handshake, then buffered.
#[derive(Debug)]
pub struct TlsSocket<S> {
    io: S,
    mode: Mode,
}

#[derive(Debug)]
enum Mode {
    /// Reading no further than the end of the current record.
    RecordExact {
        header: [u8; RECORD_HEADER],
        header_read: usize,
        body_left: usize,
    },
    /// Reading the socket `READ_BUFFER` bytes at a time.
    Buffered {
        buf: Box<[u8]>,
        start: usize,
        end: usize,
    },
}

impl<S> TlsSocket<S> {
    /// Wraps the socket a TLS handshake is about to run over.
    pub fn new(io: S) -> Self {
        Self {
            io,
            mode: Mode::RecordExact {
                header: [0; RECORD_HEADER],
                header_read: 0,
                body_left: 0,
            },
        }
    }

    /// Reads in large pieces from now on: call once the handshake is done and the connection
    /// stays with rustls.
    pub fn buffer_reads(&mut self) {
        if matches!(self.mode, Mode::RecordExact { .. }) {
            self.mode = Mode::Buffered {
                buf: vec![0; READ_BUFFER].into_boxed_slice(),
                start: 0,
                end: 0,
            };
        }
    }

    /// Whether every byte read from the socket ended a whole record: true during the handshake
    /// between records, which is when the kernel may take the stream over.
    pub fn at_record_boundary(&self) -> bool {
        match &self.mode {
            Mode::RecordExact {
                header_read,
                body_left,
                ..
            } => *header_read == 0 && *body_left == 0,
            Mode::Buffered { start, end, .. } => start == end,
        }
    }

    /// The socket.
    pub fn get_ref(&self) -> &S {
        &self.io
    }

    /// The socket, once nothing is left buffered ([`TlsSocket::at_record_boundary`]).
    pub fn into_inner(self) -> S {
        self.io
    }
}

/// Reads at most `limit` bytes from `io` into `buf`; returns how many.
fn poll_read_limited<S: AsyncRead + Unpin>(
    io: &mut S,
    cx: &mut Context<'_>,
    buf: &mut ReadBuf<'_>,
    limit: usize,
) -> Poll<io::Result<usize>> {
    let mut part = buf.take(limit);
    ready!(Pin::new(io).poll_read(cx, &mut part))?;
    let n = part.filled().len();
    // SAFETY: `part` is the unfilled tail of `buf`, and its first `n` bytes were just filled.
    unsafe { buf.assume_init(n) };
    buf.advance(n);
    Poll::Ready(Ok(n))
}

impl<S: AsyncRead + Unpin> AsyncRead for TlsSocket<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match &mut this.mode {
            Mode::RecordExact {
                header,
                header_read,
                body_left,
            } => {
                if *body_left > 0 {
                    let n = ready!(poll_read_limited(&mut this.io, cx, buf, *body_left))?;
                    *body_left -= n;
                    return Poll::Ready(Ok(()));
                }
                let before = buf.filled().len();
                let n = ready!(poll_read_limited(
                    &mut this.io,
                    cx,
                    buf,
                    RECORD_HEADER - *header_read
                ))?;
                header[*header_read..*header_read + n]
                    .copy_from_slice(&buf.filled()[before..before + n]);
                *header_read += n;
                if *header_read == RECORD_HEADER {
                    *header_read = 0;
                    *body_left = usize::from(u16::from_be_bytes([header[3], header[4]]));
                }
                Poll::Ready(Ok(()))
            }
            Mode::Buffered {
                buf: own,
                start,
                end,
            } => {
                if start == end {
                    let mut fill = ReadBuf::new(own);
                    ready!(Pin::new(&mut this.io).poll_read(cx, &mut fill))?;
                    *start = 0;
                    *end = fill.filled().len();
                }
                let n = (*end - *start).min(buf.remaining());
                buf.put_slice(&own[*start..*start + n]);
                *start += n;
                Poll::Ready(Ok(()))
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for TlsSocket<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn record(len: u16, fill: u8) -> Vec<u8> {
        let mut r = vec![23, 3, 3];
        r.extend_from_slice(&len.to_be_bytes());
        r.extend(std::iter::repeat_n(fill, usize::from(len)));
        r
    }

    #[tokio::test]
    async fn the_handshake_reads_stop_at_each_record_end() {
        let (mut a, b) = tokio::io::duplex(1 << 16);
        let mut wire = record(10, 1);
        wire.extend(record(3, 2));
        a.write_all(&wire).await.unwrap();
        let mut s = TlsSocket::new(b);
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while got.len() < 15 {
            let n = s.read(&mut buf).await.unwrap();
            got.extend_from_slice(&buf[..n]);
            assert!(got.len() <= 15, "read past the first record: {}", got.len());
        }
        assert!(s.at_record_boundary());
        // The next record is still in the pipe, not in a buffer of ours.
        s.buffer_reads();
        let n = s.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], &record(3, 2)[..]);
        assert!(s.at_record_boundary());
    }

    #[tokio::test]
    async fn buffered_reads_hand_over_everything_in_small_pieces() {
        let (mut a, b) = tokio::io::duplex(1 << 20);
        let data: Vec<u8> = (0..600_000u32).map(|i| (i % 251) as u8).collect();
        let writer = {
            let data = data.clone();
            tokio::spawn(async move {
                a.write_all(&data).await.unwrap();
            })
        };
        let mut s = TlsSocket::new(b);
        s.buffer_reads();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while got.len() < data.len() {
            let n = s.read(&mut buf).await.unwrap();
            assert_ne!(n, 0);
            got.extend_from_slice(&buf[..n]);
        }
        writer.await.unwrap();
        assert_eq!(got, data);
    }
}
