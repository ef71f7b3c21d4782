//! [`Session`]: one connection to a daemon, past its handshake; [`Connector`] makes them.

use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::rustls;
use xfer_core::{FrameReader, FrameWriter};
use xfer_proto::{
    auth, Auth, ErrorCode, ErrorFrame, Frame, Hello, Welcome, CAP_AUTH, CAP_TLS, PROTOCOL_VERSION,
};

use crate::sockopt::SocketOptions;
use crate::{ClientError, Target};

const AGENT: &str = concat!("xfer/", env!("CARGO_PKG_VERSION"));

pub(crate) type Reader = FrameReader<Box<dyn AsyncRead + Send + Unpin>>;
pub(crate) type Writer = FrameWriter<Box<dyn AsyncWrite + Send + Unpin>>;

/// A connection whose handshake is done.
pub struct Session {
    /// Incoming frames.
    pub reader: Reader,
    /// Outgoing frames.
    pub writer: Writer,
    /// What the server said in its `Welcome`.
    pub welcome: Welcome,
    /// The congestion control algorithm of the connection, if the kernel says.
    pub congestion: Option<String>,
    /// The connection's smoothed round-trip time once the handshake is done, if the kernel says.
    pub rtt: Option<std::time::Duration>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("welcome", &self.welcome)
            .finish_non_exhaustive()
    }
}

/// How to open sessions: the token to prove and whether to insist on TLS.
#[derive(Clone, Default)]
pub struct Connector {
    /// Shared secret, if the server requires one.
    pub token: Option<Arc<[u8]>>,
    /// TLS settings; `None` for plain TCP.
    pub tls: Option<tokio_rustls::TlsConnector>,
    /// A copy grant: then `token` holds the grant's derived key, not a token.
    pub grant: Option<xfer_proto::Grant>,
    /// Buffers and congestion control for every connection.
    pub socket: SocketOptions,
    /// Counts every byte read or written on the connections made, when set: the engine's
    /// measure of throughput, finer than whole chunks.
    pub meter: Option<Arc<AtomicU64>>,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.tls.is_some())
            .field("socket", &self.socket)
            .finish_non_exhaustive()
    }
}

impl Connector {
    /// TLS settings trusting the certificates in `ca` (PEM), or the system's roots.
    ///
    /// # Errors
    /// `ca` cannot be read or holds no certificate; no system roots are found.
    pub fn tls(ca: Option<&Path>) -> Result<tokio_rustls::TlsConnector, ClientError> {
        Self::tls_trusting(ca, "pass --ca FILE")
    }

    /// [`Connector::tls`] for a program whose way of naming a CA file is not `--ca`: `fix` says
    /// what to do when the system has no roots (the daemon names its `copy_ca` setting).
    ///
    /// # Errors
    /// As [`Connector::tls`].
    pub fn tls_trusting(
        ca: Option<&Path>,
        fix: &str,
    ) -> Result<tokio_rustls::TlsConnector, ClientError> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::CertificateDer;
        let bad = |why: String| ClientError::Target(why);
        let mut roots = rustls::RootCertStore::empty();
        match ca {
            Some(ca) => {
                let certs = CertificateDer::pem_file_iter(ca)
                    .and_then(Iterator::collect::<Result<Vec<_>, _>>)
                    .map_err(|e| {
                        bad(format!(
                            "reading CA certificates from {}: {e}",
                            ca.display()
                        ))
                    })?;
                let (added, _) = roots.add_parsable_certificates(certs);
                if added == 0 {
                    return Err(bad(format!("no CA certificate in {}", ca.display())));
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                roots.add_parsable_certificates(found.certs);
                if roots.is_empty() {
                    return Err(bad(format!("no system CA certificates found; {fix}")));
                }
            }
        }
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
    }
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

async fn dial(target: &Target, options: &SocketOptions) -> Result<TcpStream, ClientError> {
    let addrs: Vec<_> = tokio::net::lookup_host((target.host.as_str(), target.port))
        .await
        .map_err(|e| ClientError::Target(format!("cannot resolve {}: {e}", target.host)))?
        .collect();
    let mut last = ClientError::Target(format!("{} has no address", target.host));
    for addr in &addrs {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        };
        // Buffers before connect, so that the window scale in the SYN allows for them.
        let socket = socket.map_err(|e| ClientError::Connect {
            addr: target.to_string(),
            reason: describe_io(&e),
        })?;
        options.apply(&socket)?;
        match socket.connect(*addr).await {
            Ok(socket) => {
                socket.set_nodelay(true).ok();
                return Ok(socket);
            }
            Err(e) => {
                last = ClientError::Connect {
                    addr: target.to_string(),
                    reason: describe_io(&e),
                }
            }
        }
    }
    Err(last)
}

/// A byte stream that counts what crosses the network through it, both ways, into a shared
/// counter: bytes read as they are read, bytes written once the peer has acknowledged them
/// (`TCP_INFO`). Counting writes as they are handed to the kernel would count socket buffers
/// filling up as throughput: on a slow lossy path that is seconds' worth, and a pool sized
/// from it shrinks when it should grow.
struct Metered<S> {
    inner: S,
    meter: Option<Arc<AtomicU64>>,
    /// The socket beneath, and the bytes of it acknowledged when last looked at.
    acked: Option<(std::os::fd::RawFd, u64)>,
}

impl<S> Metered<S> {
    /// Wraps `inner`, which owns (or shares) the socket `fd`.
    fn new(inner: S, meter: Option<Arc<AtomicU64>>, fd: std::os::fd::RawFd) -> Self {
        // SAFETY: `inner` keeps the socket open; it is only looked at here.
        let socket = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        let acked = crate::sockopt::bytes_acked(socket).map(|n| (fd, n));
        Self {
            inner,
            meter,
            acked,
        }
    }

    fn count(&self, n: usize) {
        if let Some(meter) = &self.meter {
            meter.fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    /// Counts what a write (`polled`) moved: what the peer acknowledged since the last look,
    /// where the kernel tells; else the bytes written.
    fn count_written(&mut self, polled: &Poll<std::io::Result<usize>>) {
        if self.meter.is_none() {
            return;
        }
        let written = match polled {
            Poll::Ready(Ok(n)) => *n,
            _ => 0,
        };
        let Some((fd, before)) = self.acked else {
            return self.count(written);
        };
        // SAFETY: the socket is owned by `inner` (or the stream it is half of), open for as
        // long as this wrapper lives.
        let socket = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        if let Some(now) = crate::sockopt::bytes_acked(socket) {
            self.acked = Some((fd, now));
            self.count(now.saturating_sub(before) as usize);
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.count(n);
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.count_written(&polled);
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.count_written(&polled);
        polled
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

/// Asks for TLS in a plaintext `Hello`, waits for `StartTls`, and runs the TLS handshake.
async fn start_tls(
    mut socket: TcpStream,
    target: &Target,
    tls: &tokio_rustls::TlsConnector,
    meter: Option<Arc<AtomicU64>>,
) -> Result<(Reader, Writer), ClientError> {
    let hello = Hello {
        version: PROTOCOL_VERSION,
        min_version: 1,
        capabilities: CAP_TLS,
        agent: AGENT.into(),
        nonce: Vec::new(),
    };
    FrameWriter::new(&mut socket)
        .send(&Frame::Hello(hello))
        .await?;
    match FrameReader::new(&mut socket).read_frame().await? {
        Some(Frame::StartTls) => {}
        Some(Frame::Error(e)) => return Err(ClientError::Remote(e)),
        Some(other) => return Err(unexpected(other)),
        // Not a TLS server (or an impostor): never worth retrying, never a reason to go plain.
        None => {
            return Err(ClientError::Tls(
                "the server closed the connection instead of starting TLS".into(),
            ))
        }
    }
    let name = rustls::pki_types::ServerName::try_from(target.host.clone())
        .map_err(|e| ClientError::Target(format!("bad TLS server name {}: {e}", target.host)))?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&socket);
    let socket = Metered::new(socket, meter, fd);
    let stream = tls
        .connect(name, socket)
        .await
        .map_err(|e| ClientError::Tls(e.to_string()))?;
    let (read, write) = tokio::io::split(stream);
    Ok((
        FrameReader::new(Box::new(read)),
        FrameWriter::new(Box::new(write)),
    ))
}

impl Session {
    /// Connects to `target` and does the handshake: TLS first if `connector` asks for it, then
    /// `Hello`, the token challenge if the server sends one, and `Welcome`.
    ///
    /// # Errors
    /// `Target` (name does not resolve), `Connect`, `Tls`, `Auth`, or the server's error.
    pub async fn connect(target: &Target, connector: &Connector) -> Result<Self, ClientError> {
        Self::connect_offering(target, connector, 0).await
    }

    /// [`Session::connect`], offering the capability bits `offer` (`CAP_DELETE`, `CAP_MIRROR`)
    /// in `Hello`; whether the server took them is in `welcome.capabilities`.
    ///
    /// # Errors
    /// As [`Session::connect`].
    pub async fn connect_offering(
        target: &Target,
        connector: &Connector,
        offer: u64,
    ) -> Result<Self, ClientError> {
        let socket = dial(target, &connector.socket).await?;
        let congestion = crate::sockopt::congestion(&socket);
        let fd = std::os::fd::AsRawFd::as_raw_fd(&socket);
        let meter = connector.meter.clone();
        let (reader, writer) = match &connector.tls {
            Some(tls) => start_tls(socket, target, tls, meter).await?,
            None => {
                let (read, write) = socket.into_split();
                let read = Metered {
                    inner: read,
                    meter: meter.clone(),
                    acked: None,
                };
                // The write half shares the stream, and so the socket `fd`, with the read half.
                let write = Metered::new(write, meter, fd);
                let reader: Reader = FrameReader::new(Box::new(read));
                let writer: Writer = FrameWriter::new(Box::new(write));
                (reader, writer)
            }
        };
        let mut session = Self {
            reader,
            writer,
            welcome: Welcome {
                version: 0,
                capabilities: 0,
                max_chunk_size: 0,
                window: 0,
                agent: String::new(),
                proof: Vec::new(),
            },
            congestion,
            rtt: None,
        };
        let token = connector.token.as_deref();
        let mut nonce = vec![0u8; auth::NONCE_LEN];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut nonce);
        let capabilities = offer | if connector.tls.is_some() { CAP_TLS } else { 0 };
        session
            .writer
            .send(&Frame::Hello(Hello {
                version: PROTOCOL_VERSION,
                min_version: 1,
                capabilities,
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
                let grant = connector.grant.clone();
                session.send(&Frame::Auth(Auth { proof, grant })).await?;
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
            || welcome.capabilities & !(CAP_AUTH | capabilities) != 0
        {
            return Err(ClientError::Unexpected("Welcome"));
        }
        session.welcome = welcome;
        // SAFETY: `fd` is the socket the session's halves own; they are alive here.
        let socket = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        session.rtt = crate::sockopt::rtt(socket);
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
        next_frame(&mut self.reader).await
    }

    /// Sends a frame.
    ///
    /// # Errors
    /// I/O errors.
    pub async fn send(&mut self, frame: &Frame) -> Result<(), ClientError> {
        Ok(self.writer.send(frame).await?)
    }

    /// Sends frames with one write (control frames gathered) and one flush.
    ///
    /// # Errors
    /// I/O errors.
    pub async fn send_all(&mut self, frames: &[Frame]) -> Result<(), ClientError> {
        Ok(self.writer.send_all(frames).await?)
    }

    /// Says goodbye and closes, ignoring errors: the work on this connection is done.
    pub async fn close(mut self) {
        let _ = self.writer.send(&Frame::Goodbye).await;
        let _ = self.writer.shutdown().await;
    }
}

/// The next frame from `reader`; a server `Error` frame becomes `ClientError::Remote` (what
/// [`Session::next`] does, for a caller that reads and writes the session side by side).
///
/// # Errors
/// `Closed` at end of stream, `Remote`, or protocol/I/O errors.
pub(crate) async fn next_frame(reader: &mut Reader) -> Result<Frame, ClientError> {
    match reader.read_frame().await? {
        None => Err(ClientError::Closed),
        Some(Frame::Error(e)) => Err(ClientError::Remote(e)),
        Some(frame) => Ok(frame),
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
