//! The handshake: TLS when the daemon has a certificate, then `Hello`, and `Challenge`/`Auth`
//! when a token is set.

use tokio::time::{timeout_at, Instant};
use tracing::{debug, info};
use xfer_core::{FrameReader, FrameWriter};
use xfer_proto::session::{Phase, Request, ServerSession};
use xfer_proto::{Challenge, ErrorCode, Frame, ProtoError};

use super::{fatal, ConnError, Handler, Reader, Transport, Writer};

/// Reads the plaintext `Hello`, which must ask for TLS, answers `StartTls` and runs the TLS
/// handshake. On failure, returns the stream too while a plaintext error frame can still be sent.
pub(super) async fn start_tls<S: Transport>(
    session: &mut ServerSession,
    mut socket: S,
    acceptor: &crate::Tls,
    deadline: Instant,
) -> Result<(Reader, Writer), (ConnError, Option<S>)> {
    // The client sends nothing after this Hello until it reads StartTls, so a reader borrowed
    // for one frame cannot swallow the start of the TLS handshake.
    let frame = match timeout_at(deadline, FrameReader::new(&mut socket).read_frame()).await {
        Err(_) => {
            return Err((
                fatal(ErrorCode::Protocol, "handshake timed out"),
                Some(socket),
            ))
        }
        Ok(Err(e)) => return Err((e.into(), Some(socket))),
        Ok(Ok(None)) => return Err((ConnError::PeerClosed, None)),
        Ok(Ok(Some(frame))) => frame,
    };
    match session.handle_frame(frame) {
        Ok(Request::StartTls) => {}
        Ok(Request::PeerError(_)) => return Err((ConnError::PeerClosed, None)),
        Ok(_) => unreachable!("with TLS required, the first frame accepted asks for TLS"),
        Err(e) => return Err((e.into(), Some(socket))),
    }
    if let Err(e) = FrameWriter::new(&mut socket).send(&Frame::StartTls).await {
        return Err((e.into(), None));
    }
    let tls = match timeout_at(deadline, acceptor.0.accept(socket)).await {
        Err(_) => return Err((fatal(ErrorCode::Protocol, "TLS handshake timed out"), None)),
        Ok(Err(e)) => return Err((ProtoError::Io(e).into(), None)),
        Ok(Ok(tls)) => tls,
    };
    let (read, write) = tokio::io::split(tls);
    Ok((
        FrameReader::new(Box::new(read)),
        FrameWriter::new(Box::new(write)),
    ))
}

impl Handler {
    /// Runs `Hello` (and `Challenge`/`Auth` when a token is set) to completion before
    /// `deadline`. Returns the version and the server's proof, or `None` if the client left
    /// before saying anything.
    pub(super) async fn handshake(
        &mut self,
        deadline: Instant,
    ) -> Result<Option<(u16, Vec<u8>)>, ConnError> {
        let mut version = None;
        loop {
            let Some(frame) = self.handshake_frame(deadline).await? else {
                return match version {
                    None => Ok(None),
                    Some(_) => Err(ConnError::PeerClosed),
                };
            };
            match self.session.handle_frame(frame)? {
                Request::Hello { version: v, hello } => {
                    debug!(agent = %hello.agent, "hello");
                    if self.session.phase() == Phase::Ready {
                        return Ok(Some((v, Vec::new())));
                    }
                    version = Some(v);
                    let challenge = Challenge {
                        nonce: self.session.nonce().to_vec(),
                    };
                    self.writer.send(&Frame::Challenge(challenge)).await?;
                }
                Request::Authenticated { proof } => {
                    return Ok(Some((version.expect("Auth follows Hello"), proof)))
                }
                Request::PeerError(e) => {
                    info!(error = %e, "client gave up during the handshake");
                    return Err(ConnError::PeerClosed);
                }
                _ => unreachable!("the session allows only handshake frames here"),
            }
        }
    }

    /// Reads a handshake frame before `deadline`.
    async fn handshake_frame(&mut self, deadline: Instant) -> Result<Option<Frame>, ConnError> {
        match timeout_at(deadline, self.reader.read_frame()).await {
            Err(_) => Err(fatal(ErrorCode::Protocol, "handshake timed out")),
            Ok(frame) => Ok(frame?),
        }
    }
}
