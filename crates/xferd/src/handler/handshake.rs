//! The handshake: TLS when the daemon has a certificate, then `Hello`, and `Challenge`/`Auth`
//! when a token is set (`EarlyChallenge`/`Auth` when the client asked the daemon to prove itself
//! first). The session decides every step and holds the deadline; this module
//! reads and writes.

use tracing::{debug, info};
use xfer_net::tls::{ktls, TlsSocket};
use xfer_net::{FrameReader, FrameWriter};
use xfer_proto::session::{Handshake, ZeroRtt};
use xfer_proto::{ErrorCode, Frame, ProtoError};

use super::{fatal, within, ConnError, Handler, Reader, Session, Transport, Writer};

/// Reads the plaintext `Hello`, which must ask for TLS, answers `StartTls` and runs the TLS
/// handshake. On failure, returns the stream too while a plaintext error frame can still be sent.
/// `None` if the client left before saying anything, as a client's spare connection does when
/// the path turns out short (the same as without TLS: no error).
pub(super) async fn start_tls<S: Transport>(
    session: &mut Session,
    mut socket: S,
    acceptor: &crate::Tls,
    budget: &xfer_core::MemoryBudget,
) -> Result<Option<(Reader, Writer)>, (ConnError, Option<S>)> {
    // The handshake's deadline, fixed when the connection was accepted.
    let deadline = session.poll_timeout(std::time::Instant::now());
    // The client sends nothing after this Hello until it reads StartTls, so a reader borrowed
    // for one frame cannot swallow the start of the TLS handshake.
    let mut hello = FrameReader::new(&mut socket).with_budget(budget.clone());
    let frame = match within(deadline, hello.read_frame()).await {
        None => return Err((session.timed_out().into(), Some(socket))),
        Some(Err(e)) => return Err((e.into(), Some(socket))),
        Some(Ok(None)) => return Ok(None),
        Some(Ok(Some(frame))) => frame,
    };
    match session.handle_handshake(frame) {
        Ok(Handshake::StartTls) => {}
        Ok(Handshake::PeerError(_)) => return Err((ConnError::PeerClosed, None)),
        // A daemon with a certificate answers a plaintext Hello with StartTls or an error.
        Ok(
            Handshake::Challenge(_)
            | Handshake::EarlyChallenge(_)
            | Handshake::Admitted
            | Handshake::Next
            | Handshake::EarlyRefused(_),
        ) => {
            let err = fatal(ErrorCode::Protocol, "TLS was not negotiated");
            return Err((err, Some(socket)));
        }
        Err(e) => return Err((e.into(), Some(socket))),
    }
    if let Err(e) = FrameWriter::new(&mut socket).send(&Frame::StartTls).await {
        return Err((e.into(), None));
    }
    let fd = socket.fd();
    let tls = match within(deadline, acceptor.0.accept(TlsSocket::new(socket))).await {
        None => return Err((fatal(ErrorCode::Protocol, "TLS handshake timed out"), None)),
        Some(Err(e)) => return Err((ProtoError::Io(e).into(), None)),
        Some(Ok(tls)) => tls,
    };
    match ktls::enable(tls.into(), fd) {
        Err(e) => Err((ProtoError::Io(e).into(), None)),
        Ok(ktls::Enabled::Kernel(socket, early)) => {
            let (read, write) = tokio::io::split(socket);
            let fd = fd.expect("the kernel took a socket");
            Ok(Some((
                FrameReader::new(Box::new(ktls::KernelRead::new(read, early))),
                FrameWriter::new(Box::new(ktls::KernelWrite { inner: write, fd })),
            )))
        }
        Ok(ktls::Enabled::Userspace(tls, _)) => {
            let (read, write) = tokio::io::split(*tls);
            Ok(Some((
                FrameReader::new(Box::new(read)),
                FrameWriter::new(Box::new(write)),
            )))
        }
    }
}

impl Handler {
    /// Runs `Hello` (and `Challenge`/`Auth` when a token is set) to completion before the
    /// session's deadline. Returns false if the client left before saying anything.
    pub(super) async fn handshake(&mut self) -> Result<bool, ConnError> {
        let mut challenged = false;
        loop {
            let deadline = self.session.poll_timeout(std::time::Instant::now());
            let Some(frame) = within(deadline, self.reader.read_frame()).await else {
                return Err(self.session.timed_out().into());
            };
            let Some(frame) = frame? else {
                return if challenged {
                    Err(ConnError::PeerClosed)
                } else {
                    Ok(false)
                };
            };
            let early_proof = matches!(frame, Frame::EarlyAuth(_));
            let handled = self.session.handle_handshake(frame);
            if early_proof {
                let proofs = &self.shared.metrics.early_proofs;
                match (&handled, self.session.zero_rtt()) {
                    (Err(_), _) => proofs.wrong.inc(),
                    (Ok(_), ZeroRtt::Accepted { .. }) => proofs.accepted.inc(),
                    (Ok(_), ZeroRtt::Refused { why, .. }) => proofs.refused(why).inc(),
                    (Ok(_), ZeroRtt::None) => {}
                }
            }
            match handled? {
                Handshake::Next => {}
                Handshake::EarlyRefused(refused) => {
                    debug!(why = %refused.reason, "early proof refused: the client answers the challenge");
                    self.writer.send(&Frame::EarlyRefused(refused)).await?;
                }
                Handshake::Challenge(challenge) => {
                    debug!(agent = %self.session.client_agent(), "hello");
                    challenged = true;
                    self.writer.send(&Frame::Challenge(challenge)).await?;
                }
                Handshake::EarlyChallenge(challenge) => {
                    debug!(agent = %self.session.client_agent(), "hello, answered early");
                    challenged = true;
                    self.writer.send(&Frame::EarlyChallenge(challenge)).await?;
                }
                Handshake::Admitted => {
                    if !challenged {
                        debug!(agent = %self.session.client_agent(), "hello");
                    }
                    return Ok(true);
                }
                Handshake::PeerError(e) => {
                    info!(error = %e, "client gave up during the handshake");
                    return Err(ConnError::PeerClosed);
                }
                // Inside TLS, or without a certificate, a Hello never asks for TLS again.
                Handshake::StartTls => {
                    return Err(fatal(ErrorCode::Protocol, "TLS asked for twice"));
                }
            }
        }
    }
}
