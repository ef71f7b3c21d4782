//! Framed transport over any `AsyncRead`/`AsyncWrite`: [`FrameReader`] and [`FrameWriter`].
//! Data payloads are written with one vectored write after their header, never copied.
//!
//! This module does not create sockets; callers hand it the halves of one.

use std::io::IoSlice;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::codec::Decoder;
use xfer_proto::{Frame, FrameCodec, ProtoError};

const INITIAL_READ_BUFFER: usize = 64 * 1024;

/// Reads whole frames from a byte stream.
#[derive(Debug)]
pub struct FrameReader<R> {
    io: R,
    buf: BytesMut,
    codec: FrameCodec,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Wraps a reader.
    pub fn new(io: R) -> Self {
        Self {
            io,
            buf: BytesMut::with_capacity(INITIAL_READ_BUFFER),
            codec: FrameCodec::default(),
        }
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
            if let Some(frame) = self.codec.decode(&mut self.buf)? {
                return Ok(Some(frame));
            }
            if self.buf.capacity() - self.buf.len() < 4096 {
                self.buf.reserve(INITIAL_READ_BUFFER);
            }
            if self.io.read_buf(&mut self.buf).await? == 0 {
                return self.codec.decode_eof(&mut self.buf);
            }
        }
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
        self.buf.clear();
        for frame in frames {
            if let Frame::Data(data) = frame {
                self.io.write_all(&self.buf).await?;
                self.buf.clear();
                let header = data.header();
                let (mut h, mut p) = (&header[..], &data.payload[..]);
                while !h.is_empty() || !p.is_empty() {
                    let n = self
                        .io
                        .write_vectored(&[IoSlice::new(h), IoSlice::new(p)])
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
        self.io.write_all(&self.buf).await?;
        // A TLS stream keeps the tail of a record buffered until flushed; the peer is waiting
        // for the whole frame. On plain TCP this does nothing.
        self.io.flush().await?;
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
}
