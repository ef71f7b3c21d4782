//! [`Session`]: one TCP connection to a daemon, past the handshake.

use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use xfer_core::{FrameReader, FrameWriter};
use xfer_proto::{auth, Auth, ErrorCode, ErrorFrame, Frame, Hello, Welcome, PROTOCOL_VERSION};

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
    pub async fn connect(target: &Target, token: Option<&[u8]>) -> Result<Self, ClientError> {
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
                proof: Vec::new(),
            },
        };
        let mut nonce = vec![0u8; auth::NONCE_LEN];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut nonce);
        session
            .writer
            .send(&Frame::Hello(Hello {
                version: PROTOCOL_VERSION,
                min_version: 1,
                capabilities: 0,
                agent: AGENT.into(),
                nonce: nonce.clone(),
            }))
            .await?;
        let mut server_nonce = None;
        let welcome = match session.next().await.map_err(auth_failure)? {
            Frame::Challenge(challenge) => {
                let Some(token) = token else {
                    let _ = session
                        .send(&Frame::Error(ErrorFrame::new(ErrorCode::Auth, "no token")))
                        .await;
                    return Err(ClientError::Auth("the server requires a token".into()));
                };
                let proof = auth::client_proof(token, &nonce, &challenge.nonce);
                session.send(&Frame::Auth(Auth { proof })).await?;
                server_nonce = Some(challenge.nonce);
                session.next().await.map_err(auth_failure)?
            }
            other => other,
        };
        let Frame::Welcome(welcome) = welcome else {
            return Err(unexpected(welcome));
        };
        if let (Some(token), Some(server_nonce)) = (token, server_nonce) {
            if !auth::verify_server(token, &nonce, &server_nonce, &welcome.proof) {
                return Err(ClientError::Auth(
                    "the server could not prove it holds the token".into(),
                ));
            }
        }
        if !(1..=PROTOCOL_VERSION).contains(&welcome.version)
            || welcome.max_chunk_size < xfer_proto::MIN_CHUNK_SIZE
            || welcome.capabilities & !xfer_proto::CAP_AUTH != 0
        {
            return Err(ClientError::Unexpected("Welcome"));
        }
        session.welcome = welcome;
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

/// Rewords the server's `Auth` error so it says how to fix it.
fn auth_failure(e: ClientError) -> ClientError {
    match e {
        ClientError::Remote(frame) if frame.error_code() == Some(ErrorCode::Auth) => {
            ClientError::Auth("wrong token".into())
        }
        e => e,
    }
}

/// The error for a frame that does not belong where it arrived.
pub fn unexpected(frame: Frame) -> ClientError {
    ClientError::Unexpected(frame.frame_type().name())
}
