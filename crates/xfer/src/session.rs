//! [`Session`]: one TCP connection to a daemon, past the handshake.

use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use xfer_core::{FrameReader, FrameWriter};
use xfer_proto::{Frame, Hello, Welcome, PROTOCOL_VERSION};

use crate::{ClientError, Target};

const AGENT: &str = concat!("xfer/", env!("CARGO_PKG_VERSION"));

/// A connection whose handshake is done.
#[derive(Debug)]
pub struct Session {
    /// Incoming frames.
    pub reader: FrameReader<OwnedReadHalf>,
    /// Outgoing frames.
    pub writer: FrameWriter<OwnedWriteHalf>,
    /// What the server said in its `Welcome`.
    pub welcome: Welcome,
}

fn describe_io(e: &std::io::Error) -> String {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionRefused => "connection refused".into(),
        TimedOut => "connection timed out".into(),
        HostUnreachable => "host unreachable".into(),
        NetworkUnreachable => "network unreachable".into(),
        _ => e.to_string(),
    }
}

impl Session {
    /// Connects to `target` and does the handshake.
    ///
    /// # Errors
    /// `Target` (name does not resolve), `Connect`, or the server's error (busy, version…).
    pub async fn connect(target: &Target) -> Result<Self, ClientError> {
        let addrs: Vec<_> = tokio::net::lookup_host((target.host.as_str(), target.port))
            .await
            .map_err(|e| ClientError::Target(format!("cannot resolve {}: {e}", target.host)))?
            .collect();
        let mut last = None;
        let mut socket = None;
        for addr in &addrs {
            match TcpStream::connect(addr).await {
                Ok(s) => {
                    socket = Some(s);
                    break;
                }
                Err(e) => {
                    last = Some(ClientError::Connect {
                        addr: target.to_string(),
                        reason: describe_io(&e),
                    })
                }
            }
        }
        let Some(socket) = socket else {
            return Err(last.unwrap_or_else(|| {
                ClientError::Target(format!("{} has no address", target.host))
            }));
        };
        socket.set_nodelay(true).ok();
        let (read, write) = socket.into_split();
        let mut session = Self {
            reader: FrameReader::new(read),
            writer: FrameWriter::new(write),
            welcome: Welcome {
                version: 0,
                capabilities: 0,
                max_chunk_size: 0,
                window: 0,
                agent: String::new(),
            },
        };
        session
            .writer
            .send(&Frame::Hello(Hello {
                version: PROTOCOL_VERSION,
                min_version: 1,
                capabilities: 0,
                agent: AGENT.into(),
            }))
            .await?;
        match session.next().await? {
            Frame::Welcome(w) => session.welcome = w,
            other => return Err(unexpected(other)),
        }
        Ok(session)
    }

    /// The next frame; a server `Error` frame becomes `ClientError::Remote`.
    ///
    /// # Errors
    /// `Closed` at end of stream, `Remote`, or protocol/I/O errors.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn next(&mut self) -> Result<Frame, ClientError> {
        match self.reader.read_frame().await? {
            None => Err(ClientError::Closed),
            Some(Frame::Error(e)) => Err(ClientError::Remote(e)),
            Some(frame) => Ok(frame),
        }
    }

    /// Sends a frame.
    ///
    /// # Errors
    /// I/O errors.
    pub async fn send(&mut self, frame: &Frame) -> Result<(), ClientError> {
        Ok(self.writer.send(frame).await?)
    }

    /// Says goodbye and closes, ignoring errors: the work on this connection is done.
    pub async fn close(mut self) {
        let _ = self.writer.send(&Frame::Goodbye).await;
        let _ = self.writer.shutdown().await;
    }
}

/// The error for a frame that does not belong where it arrived.
pub fn unexpected(frame: Frame) -> ClientError {
    ClientError::Unexpected(frame.frame_type().name())
}
