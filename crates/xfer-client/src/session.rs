//! [`Session`]: one connection to a daemon, past its handshake; [`Connector`] makes them.

use std::path::Path;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::rustls;
use xfer_net::sockopt::{self, SocketOptions};
use xfer_net::tls::{ktls, TlsSocket};
use xfer_net::{FrameReader, FrameWriter};
use xfer_proto::client::{ClientConfig, ClientSession, HandshakeError, Step};
use xfer_proto::{auth, ErrorCode, Frame, Welcome};

use crate::{ClientError, Target};

const AGENT: &str = concat!("xfer/", env!("CARGO_PKG_VERSION"));

pub(crate) type Reader = FrameReader<Box<dyn AsyncRead + Send + Unpin>>;
/// The first frames to send on a connection, encoded for its `Welcome` (or for the one the
/// server announced in `EarlyChallenge`, when they go with `Auth`).
pub(crate) type FirstFrames = Arc<dyn Fn(&Welcome) -> Vec<Frame> + Send + Sync>;
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
    /// How long the daemon lets the connection sit idle before it closes it, as it told behind
    /// its `Welcome` (`CAP_IDLE_TIMEOUT`); `None` from a daemon that does not tell.
    pub idle_timeout: Option<std::time::Duration>,
    /// The socket beneath, owned by `reader` and `writer` (`None` for one that is not a socket).
    pub(crate) fd: Option<std::os::fd::RawFd>,
    /// The connect sent the frames it was given ([`FirstFrames`]): their answers come first.
    pub(crate) first_sent: bool,
    /// What a `List` of an upload's name sent with the handshake answered, already read:
    /// whether the daemon holds nothing under the name (the probe of a delta).
    pub(crate) absent: Option<bool>,
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
    /// TLS settings; `None` for plain TCP. With them, a connection runs over TLS when
    /// `tls_required` says so or the daemon turns plain TCP down (it holds a certificate).
    pub tls: Option<tokio_rustls::TlsConnector>,
    /// TLS settings made for each daemon from pins and CAs, when `tls` is `None`.
    pub trust: Option<Arc<crate::trust::PeerTls>>,
    /// Every connection over TLS, never plain (`--tls`, a copy asked for TLS).
    pub tls_required: bool,
    /// The daemons (`HOST:PORT`) that turned a plaintext `Hello` down: later connections to
    /// them ask for TLS straight away.
    pub tls_learned: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    /// A copy grant: then `token` holds the grant's derived key, not a token.
    pub grant: Option<xfer_proto::Grant>,
    /// Buffers and congestion control for every connection.
    pub socket: SocketOptions,
    /// Counts what the connections made delivered (acknowledged bytes), when set: what
    /// `auto` compression measures its probes by.
    pub delivered: Option<xfer_net::Delivered>,
    /// How chunks are compressed (`--compress`): what uploads send, and what each connection
    /// asks the daemon to send (`SetCompression`); `None` leaves downloads to the daemon's
    /// default and uploads to `auto`.
    pub compress: Option<xfer_net::Compression>,
    /// The bytes of chunk buffer every connection made shares (each large frame read is
    /// reserved from it first), when set: the engine bounds a whole process's transfers so.
    pub memory: Option<xfer_core::MemoryBudget>,
    /// Capability bits every connection made offers besides those its caller asks for: a
    /// tree's `CAP_TREE_SYNC`, so that its spare, pooled and reopened connections promise it
    /// as its first does.
    pub offer: u64,
    /// The daemons seen taking early proofs (`CAP_ZERO_RTT`): a connection to one sends its
    /// proof and its first read-only requests behind its `Hello`, a round trip sooner.
    pub zero_rtt: Option<Arc<crate::zero_rtt::ZeroRttMemory>>,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.tls.is_some())
            .field("tls_required", &self.tls_required)
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
        let roots = crate::trust::Trust::roots(ca)?
            .ok_or_else(|| ClientError::Trust(format!("no system CA certificates found; {fix}")))?;
        let mut config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        // Kernel TLS takes the keys over once the handshake is done.
        config.enable_secret_extraction = true;
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

/// How long a TCP connect may take before it counts as timed out: a host that drops SYNs
/// otherwise holds a command for the kernel's two minutes of retransmissions.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// How long a connected daemon may take to finish the handshake (TLS included): something that
/// accepts TCP but never answers (another service, a hung daemon) otherwise holds a command
/// forever.
pub(crate) const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Why a handshake failed: for good, or because a daemon did not take the early flight it was
/// sent (then it is connected to again without one).
enum Failed {
    Error(ClientError),
    EarlyFlight(String),
}

impl<E: Into<ClientError>> From<E> for Failed {
    fn from(e: E) -> Self {
        Self::Error(e.into())
    }
}

/// The error for a peer that accepted the connection but did not finish the handshake.
fn silent(target: &Target) -> ClientError {
    ClientError::Connect {
        addr: target.to_string(),
        reason: format!(
            "connected, but no handshake answer within {} s; is it xferd on that port?",
            HANDSHAKE_TIMEOUT.as_secs()
        ),
    }
}

/// Connects to `target`. With `fast_open`, where the kernel holds the daemon's TCP Fast Open
/// cookie, it returns at once and the SYN leaves with the first write (see [`tell_rtt`]).
async fn dial(
    target: &Target,
    options: &SocketOptions,
    fast_open: bool,
) -> Result<TcpStream, ClientError> {
    let addrs: Vec<_> = tokio::net::lookup_host((target.host.as_str(), target.port))
        .await
        .map_err(|e| {
            ClientError::Target(format!(
                "cannot resolve {}: {e}; check the host name",
                target.host
            ))
        })?
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
        if fast_open {
            if let Err(e) = sockopt::fast_open_connect(&socket) {
                tracing::debug!(error = %e, "no TCP Fast Open for this connection");
            }
        }
        let connected = tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(*addr))
            .await
            .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()));
        match connected {
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

/// Sends `dialed` the round trip `socket`'s handshake measured: at once where it is connected,
/// else (its SYN to go with the first write, TCP Fast Open) once the SYN is answered, which is
/// no later than a connect without Fast Open would have returned.
fn tell_rtt(socket: &TcpStream, dialed: tokio::sync::oneshot::Sender<Option<std::time::Duration>>) {
    if !sockopt::handshaking(socket) {
        let _ = dialed.send(sockopt::rtt(socket));
        return;
    }
    // A descriptor of its own: the connection may close before its SYN is answered.
    let Ok(socket) = std::os::fd::AsFd::as_fd(socket).try_clone_to_owned() else {
        let _ = dialed.send(None);
        return;
    };
    tokio::spawn(async move {
        let answered = sockopt::handshake_done(&socket, CONNECT_TIMEOUT).await;
        let rtt = sockopt::rtt(&socket).filter(|rtt| answered && !rtt.is_zero());
        let _ = dialed.send(rtt);
    });
}

/// `e` as the connect failure it is, where it says the daemon was never reached: with TCP Fast
/// Open a refused or unreachable connect shows only in the handshake's first frames. Applied to
/// what a handshake attempt fails with, and first of all to a read that fails behind an early
/// flight, which would otherwise count as a daemon that no longer takes early proofs.
fn unreached(target: &Target, e: ClientError) -> ClientError {
    use std::io::ErrorKind::{ConnectionRefused, HostUnreachable, NetworkUnreachable};
    match e {
        ClientError::Proto(xfer_proto::ProtoError::Io(e))
            if matches!(
                e.kind(),
                ConnectionRefused | HostUnreachable | NetworkUnreachable
            ) =>
        {
            ClientError::Connect {
                addr: target.to_string(),
                reason: describe_io(&e),
            }
        }
        e => e,
    }
}

/// Whether `e` is a first write that TCP Fast Open could not put in the SYN (see [`dial`]).
fn fast_open_fell_back(e: &ClientError) -> bool {
    let ClientError::Proto(xfer_proto::ProtoError::Io(e)) = e else {
        return false;
    };
    sockopt::fast_open_fell_back(e)
}

/// Asks for TLS in a plaintext `Hello`, waits for `StartTls`, and runs the TLS handshake.
async fn start_tls(
    mut socket: TcpStream,
    target: &Target,
    tls: &tokio_rustls::TlsConnector,
    delivered: Option<&xfer_net::Delivered>,
    handshake: &mut ClientSession,
) -> Result<(Reader, Writer), ClientError> {
    FrameWriter::new(&mut socket)
        .send(&handshake.hello())
        .await?;
    let Some(answer) = FrameReader::new(&mut socket).read_frame().await? else {
        // Not a TLS server (or an impostor): never worth retrying, never a reason to go plain.
        return Err(ClientError::Tls(
            "the server closed the connection instead of starting TLS".into(),
        ));
    };
    match handshake.handle_frame(answer) {
        Ok(Step::StartTls) => {}
        // The handshake answers a Hello asking for TLS with StartTls or an error.
        Ok(Step::Send(_) | Step::Early { .. } | Step::Next | Step::Welcomed(_)) => {
            return Err(ClientError::Tls("the server did not start TLS".into()))
        }
        Err(HandshakeError::Remote(e)) => return Err(ClientError::Remote(e)),
        Err(e) => return Err(handshake_failure(e)),
    }
    let name = rustls::pki_types::ServerName::try_from(target.host.clone())
        .map_err(|e| ClientError::Target(format!("bad TLS server name {}: {e}", target.host)))?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&socket);
    let socket = TlsSocket::new(socket);
    let stream = tls
        .connect(name, socket)
        .await
        .map_err(|e| match crate::trust::refusal(&e) {
            Some(unknown @ crate::trust::TrustError::Unknown { .. }) => {
                ClientError::UnknownHost(unknown.to_string())
            }
            Some(refused) => ClientError::Trust(refused.to_string()),
            None => ClientError::Tls(e.to_string()),
        })?;
    let enabled = ktls::enable(stream.into(), Some(fd)).map_err(xfer_proto::ProtoError::Io)?;
    Ok(match enabled {
        ktls::Enabled::Kernel(socket, early) => {
            let (read, write) = tokio::io::split(socket);
            (
                FrameReader::new(Box::new(ktls::KernelRead::new(read, early))),
                frame_writer(ktls::KernelWrite { inner: write, fd }, fd, delivered),
            )
        }
        ktls::Enabled::Userspace(stream, _) => {
            let (read, write) = tokio::io::split(*stream);
            (
                FrameReader::new(Box::new(read)),
                frame_writer(write, fd, delivered),
            )
        }
    })
}

/// The frame writer of a connection whose socket is `fd`, writing through `write` (which keeps
/// the socket open); `delivered` counts what it delivers, when set.
fn frame_writer(
    write: impl AsyncWrite + Send + Unpin + 'static,
    fd: std::os::fd::RawFd,
    delivered: Option<&xfer_net::Delivered>,
) -> Writer {
    let Some(delivered) = delivered else {
        return FrameWriter::new(Box::new(write));
    };
    // SAFETY: `write` keeps the socket open, and moves into the writer tracking it.
    let socket = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    FrameWriter::new(Box::new(delivered.track(socket, write)))
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
        Self::connect_telling_rtt(target, connector, offer, &mut None).await
    }

    /// [`Session::connect_offering`] that sends the round trip the TCP connect measured into
    /// `dialed` as soon as it is connected, before the handshake's round trips: what a tree
    /// decides its other connections by, which then open beside this one's handshake.
    pub(crate) async fn connect_telling_rtt(
        target: &Target,
        connector: &Connector,
        offer: u64,
        dialed: &mut Option<tokio::sync::oneshot::Sender<Option<std::time::Duration>>>,
    ) -> Result<Self, ClientError> {
        Self::connect_sending(target, connector, offer, dialed, None).await
    }

    /// [`Session::connect_telling_rtt`] that sends `first`'s frames as the connection's first:
    /// with `Auth`, without waiting for `Welcome`, where the server proves itself early
    /// (`CAP_EARLY_AUTH`), else right after `Welcome`. The session's `first_sent` says they went;
    /// their answers are the first frames to read.
    pub(crate) async fn connect_sending(
        target: &Target,
        connector: &Connector,
        offer: u64,
        dialed: &mut Option<tokio::sync::oneshot::Sender<Option<std::time::Duration>>>,
        first: Option<&FirstFrames>,
    ) -> Result<Self, ClientError> {
        Self::connect_over(None, target, connector, offer, dialed, first).await
    }

    /// Connects to `target` at once, and does the handshake only if `wanted` says so once it
    /// has answered: a connection opened on speculation, whose TCP connect overlaps another's
    /// until that one has measured the path. One not wanted is closed before its `Hello`, which
    /// the daemon takes as a client that said nothing: no handshake, no stream slot, logged at
    /// debug only; one still connecting then is given up at once. `None` for one not wanted.
    ///
    /// # Errors
    /// As [`Session::connect`].
    pub(crate) async fn connect_if(
        target: &Target,
        connector: &Connector,
        wanted: impl std::future::Future<Output = bool>,
    ) -> Result<Option<Self>, ClientError> {
        let dialing = dial(target, &connector.socket, true);
        tokio::pin!(dialing, wanted);
        let socket = tokio::select! {
            socket = &mut dialing => {
                let socket = socket?;
                if sockopt::handshaking(&socket) {
                    // TCP Fast Open: the `Hello` leaves with the SYN, a round trip sooner than
                    // after the connect; one not wanted then costs the daemon a handshake, given
                    // up where it is when the path is known.
                    let mut told = None;
                    let handshake =
                        Self::connect_over(Some(socket), target, connector, 0, &mut told, None);
                    tokio::pin!(handshake);
                    return tokio::select! {
                        go = &mut wanted => match go {
                            true => handshake.await.map(Some),
                            false => Ok(None),
                        },
                        session = &mut handshake => match (session, wanted.await) {
                            (Ok(session), true) => Ok(Some(session)),
                            (Ok(session), false) => {
                                session.close().await;
                                Ok(None)
                            }
                            (Err(e), true) => Err(e),
                            (Err(_), false) => Ok(None),
                        },
                    };
                }
                match wanted.await {
                    true => socket,
                    false => return Ok(None),
                }
            },
            go = &mut wanted => match go {
                true => dialing.await?,
                false => return Ok(None),
            },
        };
        Self::connect_over(Some(socket), target, connector, 0, &mut None, None)
            .await
            .map(Some)
    }

    /// [`Session::connect_sending`] whose first attempt goes over `socket` when one is given,
    /// already connected to `target`; one asked again for TLS dials anew.
    async fn connect_over(
        socket: Option<TcpStream>,
        target: &Target,
        connector: &Connector,
        offer: u64,
        dialed: &mut Option<tokio::sync::oneshot::Sender<Option<std::time::Duration>>>,
        first: Option<&FirstFrames>,
    ) -> Result<Self, ClientError> {
        let mut socket = socket;
        let connect = |tls, dialed: &mut Option<_>, socket: Option<TcpStream>| {
            let dialed = dialed.take();
            async move {
                let mut dialed = dialed;
                let socket = match socket {
                    Some(socket) => socket,
                    None => dial(target, &connector.socket, true).await?,
                };
                Self::connect_as(socket, target, connector, tls, offer, &mut dialed, first).await
            }
        };
        let tls = match (&connector.tls, &connector.trust) {
            (Some(tls), _) => tls.clone(),
            (None, Some(trust)) => trust.for_peer(&target.to_string())?,
            (None, None) => return connect(None, dialed, socket.take()).await,
        };
        let tls = &tls;
        let peer = target.to_string();
        let learned = || {
            connector
                .tls_learned
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        };
        if connector.tls_required || learned().contains(&peer) {
            return connect(Some(tls), dialed, socket.take()).await;
        }
        match connect(None, dialed, socket.take()).await {
            // A daemon with a certificate answers a plaintext Hello with Error{Protocol}
            // (proto.md §4.7), and nothing secret has been sent: ask again, for TLS.
            Err(ClientError::Remote(frame)) if frame.error_code() == Some(ErrorCode::Protocol) => {
                tracing::debug!(%target, "the daemon requires TLS; using it");
                learned().insert(peer);
                connect(Some(tls), dialed, socket.take()).await
            }
            other => other,
        }
    }

    /// [`Session::connect_offering`] over `socket`, connected to `target`, with TLS (`tls`) or
    /// plain TCP; the first to connect tells `dialed` its round trip.
    async fn connect_as(
        socket: TcpStream,
        target: &Target,
        connector: &Connector,
        tls: Option<&tokio_rustls::TlsConnector>,
        offer: u64,
        dialed: &mut Option<tokio::sync::oneshot::Sender<Option<std::time::Duration>>>,
        first: Option<&FirstFrames>,
    ) -> Result<Self, ClientError> {
        if let Some(dialed) = dialed.take() {
            tell_rtt(&socket, dialed);
        }
        let attempt = |socket: TcpStream, early| {
            // With Fast Open the connect returned before its SYN left: until the SYN is
            // answered the handshake is timed as a connect.
            let syn = sockopt::handshaking(&socket)
                .then(|| std::os::fd::AsFd::as_fd(&socket).try_clone_to_owned().ok())
                .flatten();
            let handshake = Self::handshake(socket, target, connector, tls, offer, first, early);
            async move {
                let answered = async {
                    match &syn {
                        Some(syn) => sockopt::handshake_done(syn, CONNECT_TIMEOUT).await,
                        None => true,
                    }
                };
                tokio::select! {
                    done = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake) => match done {
                        Ok(Err(Failed::Error(e))) => Err(Failed::Error(unreached(target, e))),
                        Ok(done) => done,
                        Err(_) => Err(Failed::Error(silent(target))),
                    },
                    false = answered => Err(Failed::Error(ClientError::Connect {
                        addr: target.to_string(),
                        reason: describe_io(&std::io::ErrorKind::TimedOut.into()),
                    })),
                }
            }
        };
        // The one attempt more each failure below allows.
        let again = |fast_open, early| async move {
            let socket = dial(target, &connector.socket, fast_open).await?;
            match attempt(socket, early).await {
                Ok(session) => Ok(session),
                Err(Failed::Error(e)) => Err(e),
                Err(Failed::EarlyFlight(reason)) => Err(ClientError::Connect {
                    addr: target.to_string(),
                    reason,
                }),
            }
        };
        match attempt(socket, true).await {
            Ok(session) => Ok(session),
            // The SYN that was to carry the first write went without it (the cookie dropped
            // meanwhile, or memory short), which the write reports as `EINPROGRESS`: connected
            // to again the usual way.
            Err(Failed::Error(e)) if fast_open_fell_back(&e) => {
                tracing::debug!(%target, "TCP Fast Open fell back; connecting again without it");
                again(false, true).await
            }
            Err(Failed::Error(e)) => Err(e),
            // A daemon remembered taking early proofs that no longer does (or an older one on
            // its port): forgotten, and connected to again as any daemon.
            Err(Failed::EarlyFlight(why)) => {
                tracing::debug!(%target, %why, "early proof not taken; connecting again without it");
                if let Some(memory) = &connector.zero_rtt {
                    memory.forget(&target.to_string());
                }
                again(true, false).await
            }
        }
    }

    /// The handshake over a connected `socket`: TLS if `tls`, then `Hello` to `Welcome`, and
    /// `first`'s frames (with `Auth` when the server proves itself early; behind the `Hello`
    /// with an early proof, where `early` allows and the daemon is remembered taking one).
    #[allow(clippy::too_many_arguments)]
    async fn handshake(
        socket: TcpStream,
        target: &Target,
        connector: &Connector,
        tls: Option<&tokio_rustls::TlsConnector>,
        offer: u64,
        first: Option<&FirstFrames>,
        early: bool,
    ) -> Result<Self, Failed> {
        let congestion = sockopt::congestion(&socket);
        let fd = std::os::fd::AsRawFd::as_raw_fd(&socket);
        let mut nonce = vec![0u8; auth::NONCE_LEN];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut nonce);
        let mut config = ClientConfig {
            key: connector.token.clone(),
            grant: connector.grant.clone(),
            tls: tls.is_some(),
            agent: AGENT.into(),
            offer: offer | connector.offer,
            early_proof_at: None,
        };
        let offered = ClientSession::new(config.clone(), Vec::new()).offered();
        let peer = target.to_string();
        let memory = connector
            .zero_rtt
            .as_ref()
            .filter(|_| connector.token.is_some() && connector.grant.is_none());
        let predicted = memory
            .filter(|_| early)
            .and_then(|m| m.predict(&peer, offered, tls.is_some()));
        if predicted.is_some() {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
            config.early_proof_at = now.ok().map(|d| d.as_millis() as u64);
        }
        let mut handshake = ClientSession::new(config, nonce);
        let (reader, writer) = match tls {
            Some(tls) => {
                let delivered = connector.delivered.as_ref();
                start_tls(socket, target, tls, delivered, &mut handshake).await?
            }
            None => {
                let (read, write) = socket.into_split();
                // The write half shares the stream, and so the socket `fd`, with the read half.
                let reader: Reader = FrameReader::new(Box::new(read));
                let writer = frame_writer(write, fd, connector.delivered.as_ref());
                (reader, writer)
            }
        };
        let reader = match &connector.memory {
            Some(budget) => reader.with_budget(budget.clone()),
            None => reader,
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
            idle_timeout: None,
            fd: Some(fd),
            first_sent: false,
            absent: None,
        };
        // What goes first once the Welcome is known: the compression wanted, then `first`.
        let opening = |welcome: &Welcome| {
            let mut frames = Vec::new();
            if let Some(mode) = connector.compress {
                if welcome.capabilities & xfer_proto::CAP_COMPRESSION != 0 {
                    let mode = xfer_proto::SetCompression { mode: mode.wire() };
                    frames.push(Frame::SetCompression(mode));
                }
            }
            if let Some(first) = first {
                frames.extend(first(welcome));
            }
            frames
        };
        let hello = handshake.hello();
        // Behind an early proof go only requests that a replay could at worst repeat, encoded
        // for the Welcome predicted, and no more than the daemon discards if it refuses it.
        let early_frames = predicted.and_then(|capabilities| {
            let welcome = Welcome {
                version: xfer_proto::PROTOCOL_VERSION,
                capabilities,
                max_chunk_size: xfer_proto::MIN_CHUNK_SIZE,
                window: 1,
                agent: String::new(),
                proof: Vec::new(),
            };
            let frames = opening(&welcome);
            let mut bytes = bytes::BytesMut::new();
            let fits = frames
                .iter()
                .all(|f| f.is_read_only() && f.encode(&mut bytes).is_ok())
                && bytes.len() <= xfer_proto::ZERO_RTT_DISCARD_MAX;
            fits.then_some(frames)
        });
        let early_auth = early_frames.as_ref().and_then(|_| handshake.early_auth());
        let early_sent = early_auth.is_some();
        match (early_auth, early_frames) {
            (Some(early_auth), Some(frames)) => {
                let flight: Vec<Frame> = [hello, early_auth].into_iter().chain(frames).collect();
                session.send_all(&flight).await?;
            }
            _ => session.send(&hello).await?,
        }
        // What tells a daemon that no longer takes the early proof from any other failure.
        let not_taken = |e: ClientError| match e {
            ClientError::Closed => Failed::EarlyFlight("the daemon closed the connection".into()),
            ClientError::Remote(frame) if frame.error_code() == Some(ErrorCode::Protocol) => {
                Failed::EarlyFlight(frame.to_string())
            }
            ClientError::Proto(xfer_proto::ProtoError::Io(e)) => Failed::EarlyFlight(e.to_string()),
            other => Failed::Error(other),
        };
        let failed = |e: ClientError| match unreached(target, e) {
            e @ ClientError::Connect { .. } => Failed::Error(e),
            e if early_sent => not_taken(e),
            e => Failed::Error(e),
        };
        let mut opened = early_sent;
        let mut refused = false;
        let welcome = loop {
            let Some(answer) = session
                .reader
                .read_frame()
                .await
                .map_err(|e| failed(e.into()))?
            else {
                return Err(failed(ClientError::Closed));
            };
            match handshake.handle_frame(answer) {
                Ok(Step::Send(frame)) => session.send(&frame).await?,
                // The server proved itself: Auth and the first requests leave in one write, a
                // round trip before the Welcome they were encoded for (again, where the early
                // proof was refused: the daemon discarded those that came with it).
                Ok(Step::Early { auth, welcome }) => {
                    if early_sent {
                        tracing::debug!(%target, "early proof refused: answering the challenge");
                        refused = true;
                    }
                    let frames: Vec<Frame> =
                        std::iter::once(auth).chain(opening(&welcome)).collect();
                    session.send_all(&frames).await?;
                    opened = true;
                }
                // The idle timeout came in the Welcome's write: no round trip.
                Ok(Step::Next) => {}
                Ok(Step::Welcomed(welcome)) => break welcome,
                // Only ever the answer to the plaintext Hello, handled by `start_tls`.
                Ok(Step::StartTls) => {
                    return Err(ClientError::Tls("the server started TLS twice".into()).into())
                }
                Err(HandshakeError::Remote(e)) => return Err(failed(ClientError::Remote(e))),
                Err(e) => {
                    if let Some(frame) = e.frame_to_send() {
                        let _ = session.send(&frame).await;
                    }
                    return Err(Failed::Error(handshake_failure(e)));
                }
            }
        };
        match handshake.take_late_auth() {
            // Taken: the requests that came with it are answered for the Welcome predicted,
            // which must be the one that came; its challenge's nonce is proven before anything
            // that is not read-only.
            Some(late_auth) => {
                // Forgotten by the caller: the connection made again learns it afresh.
                if predicted != Some(welcome.capabilities) {
                    return Err(Failed::EarlyFlight(
                        "its Welcome is not the one predicted".into(),
                    ));
                }
                session.send(&late_auth).await?;
            }
            // Welcomed with neither the early proof taken nor a challenge answered: a daemon
            // without a token now, whose answers to the early requests are not wanted.
            None if early_sent && !refused => {
                return Err(Failed::EarlyFlight("welcomed without a challenge".into()));
            }
            None => {}
        }
        if let Some(memory) = memory {
            memory.learn(&peer, offered, tls.is_some(), &welcome);
        }
        if !opened {
            let frames = opening(&welcome);
            if !frames.is_empty() {
                session.send_all(&frames).await?;
            }
        }
        session.first_sent = first.is_some();
        session.welcome = welcome;
        session.idle_timeout = handshake.idle_timeout();
        // SAFETY: `fd` is the socket the session's halves own; they are alive here.
        let socket = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        session.rtt = sockopt::rtt(socket);
        Ok(session)
    }

    /// Bounds what the connection holds written but not yet sent to about `bytes` (`0`: the
    /// system's default, no bound); see [`sockopt::limit_unsent`]. Best effort: a connection
    /// that is not a socket, or a kernel that refuses, keeps what it is given.
    pub(crate) fn limit_unsent(&self, bytes: u32) {
        let Some(fd) = self.fd else { return };
        // SAFETY: `fd` is the socket the session's halves own; they are alive with `self`.
        let socket = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        let _ = sockopt::limit_unsent(socket, bytes);
    }

    /// Switches the connection to congestion control `name` from now on (the first connection
    /// of a transfer, once its round trip showed a long path).
    ///
    /// # Errors
    /// The kernel lacks `name` or does not allow it to this process.
    pub(crate) fn switch_congestion(&mut self, name: &str) -> Result<(), sockopt::SocketError> {
        let Some(fd) = self.fd else { return Ok(()) };
        // SAFETY: `fd` is the socket the session's halves own; they are alive with `self`.
        let socket = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        sockopt::congestion_for_long_path(socket, name, std::time::Duration::ZERO)?;
        self.congestion = sockopt::congestion(socket);
        Ok(())
    }

    /// Whether the daemon at `target` serves TLS, its certificate checked as `connector`'s
    /// trust says (pinned the first time, as for any connection): a TLS request and the TLS
    /// handshake, then the connection is closed. `false` when it turns TLS down, unless
    /// `connector.tls_required`.
    ///
    /// # Errors
    /// `Connect`, `Trust`, `Tls`, or TLS refused when required.
    pub async fn serves_tls(target: &Target, connector: &Connector) -> Result<bool, ClientError> {
        let tls = match (&connector.tls, &connector.trust) {
            (Some(tls), _) => tls.clone(),
            (None, Some(trust)) => trust.for_peer(&target.to_string())?,
            (None, None) => return Ok(false),
        };
        let socket = dial(target, &connector.socket, false).await?;
        let config = ClientConfig {
            key: None,
            grant: None,
            tls: true,
            agent: AGENT.into(),
            offer: 0,
            early_proof_at: None,
        };
        let mut handshake = ClientSession::new(config, vec![0; auth::NONCE_LEN]);
        let started = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            start_tls(socket, target, &tls, None, &mut handshake),
        )
        .await
        .unwrap_or_else(|_| Err(silent(target)));
        match started {
            Ok((_, mut writer)) => {
                let _ = writer.shutdown().await;
                Ok(true)
            }
            Err(ClientError::Remote(frame))
                if frame.error_code() == Some(ErrorCode::Protocol) && !connector.tls_required =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
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

/// A failed handshake as the user reads it: token trouble says how to fix it.
fn handshake_failure(e: HandshakeError) -> ClientError {
    match e {
        // The server refused the client's proof, or proved a token other than the client's.
        HandshakeError::Remote(frame) if frame.error_code() == Some(ErrorCode::Auth) => {
            ClientError::Auth("wrong token".into())
        }
        HandshakeError::EarlyProof => ClientError::Auth("wrong token".into()),
        HandshakeError::Remote(frame) => ClientError::Remote(frame),
        HandshakeError::TokenRequired | HandshakeError::ServerProof => {
            ClientError::Auth(e.to_string())
        }
        HandshakeError::Unexpected { frame, .. } => ClientError::Unexpected(frame),
        HandshakeError::BadWelcome(_) => ClientError::Handshake(e),
    }
}

/// Refuses `names` (names or link targets) holding escapes of bytes that are not UTF-8 for a
/// daemon that would store the escapes as characters: one that did not grant `CAP_RAW_NAMES`
/// (proto.md §8.5). Every upload and tree copy asks before it sends such a name.
///
/// # Errors
/// `Unsupported`, naming the first such name as its bytes.
pub(crate) fn refuse_unspeakable<'a>(
    capabilities: u64,
    names: impl IntoIterator<Item = &'a str>,
) -> Result<(), ClientError> {
    if capabilities & xfer_proto::CAP_RAW_NAMES != 0 {
        return Ok(());
    }
    match names.into_iter().find(|n| xfer_proto::names::is_escaped(n)) {
        Some(name) => Err(ClientError::Unsupported(format!(
            "{}: not UTF-8, and the daemon predates names and link targets that are not \
             (upgrade xferd)",
            xfer_proto::names::display(name)
        ))),
        None => Ok(()),
    }
}

/// The error for a frame that does not belong where it arrived; an `Error` frame is the
/// remote's error.
pub fn unexpected(frame: Frame) -> ClientError {
    if let Frame::Error(e) = frame {
        return ClientError::Remote(e);
    }
    ClientError::Unexpected(frame.frame_type().name())
}

/// A listener on a loopback port for a test's fake daemon, and the target that reaches it.
#[cfg(test)]
pub(crate) async fn fake_daemon() -> (tokio::net::TcpListener, Target) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = Target {
        host: "127.0.0.1".into(),
        port: listener.local_addr().unwrap().port(),
    };
    (listener, target)
}

/// A test's fake daemon with the token `tok` that proves itself early: accepts one connection
/// on `listener`, reads its `Hello` and answers `EarlyChallenge`, then sends nothing more. Returns
/// the connection's halves and the `Welcome` the challenge announced.
#[cfg(test)]
pub(crate) async fn early_challenged(
    listener: tokio::net::TcpListener,
) -> (
    FrameReader<tokio::net::tcp::OwnedReadHalf>,
    FrameWriter<tokio::net::tcp::OwnedWriteHalf>,
    Welcome,
) {
    early_challenged_on(&listener).await
}

/// [`early_challenged`] for the next connection on `listener`, which stays open for more.
#[cfg(test)]
pub(crate) async fn early_challenged_on(
    listener: &tokio::net::TcpListener,
) -> (
    FrameReader<tokio::net::tcp::OwnedReadHalf>,
    FrameWriter<tokio::net::tcp::OwnedWriteHalf>,
    Welcome,
) {
    let (socket, _) = listener.accept().await.unwrap();
    let (read, write) = socket.into_split();
    let (mut reader, mut writer) = (FrameReader::new(read), FrameWriter::new(write));
    let Some(Frame::Hello(hello)) = reader.read_frame().await.unwrap() else {
        panic!("want Hello")
    };
    let server_nonce = vec![7; auth::NONCE_LEN];
    let welcome = Welcome {
        version: 1,
        capabilities: xfer_proto::CAP_AUTH | xfer_proto::CAP_EARLY_AUTH,
        max_chunk_size: 1 << 20,
        window: 4,
        agent: "xferd/test".into(),
        proof: auth::server_proof(b"tok", &hello.nonce, &server_nonce),
    };
    let early = xfer_proto::EarlyChallenge {
        nonce: server_nonce,
        welcome: welcome.clone(),
    };
    writer.send(&Frame::EarlyChallenge(early)).await.unwrap();
    (reader, writer, welcome)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// A name or link target that is not UTF-8 would be stored as its escapes by a daemon
    /// without `CAP_RAW_NAMES`: refused, named as its bytes; with the bit it goes.
    #[test]
    fn names_that_are_not_utf8_are_refused_to_a_daemon_that_cannot_store_them() {
        let latin1 = xfer_proto::names::escape(b"caf\xe9").into_owned();
        assert!(refuse_unspeakable(0, ["a", "", "b/c"]).is_ok());
        let e = refuse_unspeakable(0, ["a", "", &latin1, "b"]).unwrap_err();
        assert!(e.to_string().starts_with("caf\\xe9: not UTF-8"), "{e}");
        assert!(refuse_unspeakable(xfer_proto::CAP_RAW_NAMES, [latin1.as_str()]).is_ok());
    }

    /// A daemon that proves the token early gets the client's `Auth` and first request in one
    /// flight, before it has sent any `Welcome`: the round trip the early proof saves.
    #[tokio::test]
    async fn the_first_request_goes_with_auth_before_the_welcome() {
        let (listener, target) = fake_daemon().await;
        let daemon = async move {
            let (mut reader, _writer, _) = early_challenged(listener).await;
            // No Welcome yet: what the client sends now it sent without waiting for one.
            let auth = reader.read_frame().await.unwrap();
            let first = reader.read_frame().await.unwrap();
            (auth, first)
        };
        let connector = Connector {
            token: Some(b"tok".as_slice().into()),
            ..Connector::default()
        };
        let first: FirstFrames =
            Arc::new(|_: &Welcome| vec![Frame::List(xfer_proto::List { dir: "d".into() })]);
        let client = async {
            tokio::time::timeout(
                std::time::Duration::from_secs(5),
                Session::connect_sending(&target, &connector, 0, &mut None, Some(&first)),
            )
            .await
        };
        let ((auth, request), _) = tokio::join!(daemon, client);
        assert!(matches!(auth, Some(Frame::Auth(_))), "{auth:?}");
        assert!(
            matches!(&request, Some(Frame::List(l)) if l.dir == "d"),
            "{request:?}"
        );
    }

    /// A connector holding `tok` that remembers the fake daemon at `target` as taking early
    /// proofs, granted everything a plain connection offers.
    fn remembering(target: &Target) -> Connector {
        let memory = crate::zero_rtt::ZeroRttMemory::at(None);
        let offered =
            xfer_proto::CAP_FEATURES | xfer_proto::CAP_EARLY_AUTH | xfer_proto::CAP_ZERO_RTT;
        let welcome = Welcome {
            version: 1,
            capabilities: offered | xfer_proto::CAP_AUTH,
            max_chunk_size: 1 << 20,
            window: 4,
            agent: "xferd/test".into(),
            proof: Vec::new(),
        };
        memory.learn(&target.to_string(), offered, false, &welcome);
        Connector {
            token: Some(b"tok".as_slice().into()),
            zero_rtt: Some(Arc::new(memory)),
            ..Connector::default()
        }
    }

    fn list_first() -> FirstFrames {
        Arc::new(|_: &Welcome| vec![Frame::List(xfer_proto::List { dir: "d".into() })])
    }

    /// A daemon remembered taking early proofs gets the proof and the first request behind the
    /// `Hello`, before it has answered anything: the round trip the early proof saves.
    #[tokio::test]
    async fn a_remembered_daemon_gets_the_early_proof_and_request_behind_the_hello() {
        let (listener, target) = fake_daemon().await;
        let connector = remembering(&target);
        let daemon = async move {
            let (socket, _) = listener.accept().await.unwrap();
            let (read, _write) = socket.into_split();
            let mut reader = FrameReader::new(read);
            let mut flight = Vec::new();
            for _ in 0..3 {
                flight.push(reader.read_frame().await.unwrap());
            }
            flight
        };
        let (first, mut dialed) = (list_first(), None);
        let client = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            Session::connect_sending(&target, &connector, 0, &mut dialed, Some(&first)),
        );
        let (flight, _) = tokio::join!(daemon, client);
        assert!(matches!(flight[0], Some(Frame::Hello(_))), "{flight:?}");
        assert!(matches!(flight[1], Some(Frame::EarlyAuth(_))), "{flight:?}");
        assert!(
            matches!(&flight[2], Some(Frame::List(l)) if l.dir == "d"),
            "{flight:?}"
        );
    }

    /// A daemon remembered taking early proofs that treats frame 0x06 as a protocol error, as one
    /// predating it does, is forgotten and connected to again the usual way: no failure.
    #[tokio::test]
    async fn a_daemon_that_rejects_the_early_proof_is_connected_to_again_without_it() {
        let (listener, target) = fake_daemon().await;
        let connector = remembering(&target);
        let memory = Arc::clone(connector.zero_rtt.as_ref().unwrap());
        let daemon = async move {
            // As an old daemon: its EarlyChallenge, then the unknown frame is a protocol error.
            let (mut reader, mut writer, _) = early_challenged_on(&listener).await;
            let early = reader.read_frame().await.unwrap();
            let refusal = xfer_proto::ErrorFrame::new(ErrorCode::Protocol, "unknown frame 0x06");
            writer.send(&Frame::Error(refusal)).await.unwrap();
            drop((reader, writer));
            // Again, the usual way: Auth and the request, then the Welcome announced.
            let (mut reader, mut writer, welcome) = early_challenged(listener).await;
            let auth = reader.read_frame().await.unwrap();
            let request = reader.read_frame().await.unwrap();
            writer.send(&Frame::Welcome(welcome)).await.unwrap();
            (early, auth, request, writer)
        };
        let (first, mut dialed) = (list_first(), None);
        let client = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            Session::connect_sending(&target, &connector, 0, &mut dialed, Some(&first)),
        );
        let ((early, auth, request, _writer), connected) = tokio::join!(daemon, client);
        assert!(matches!(early, Some(Frame::EarlyAuth(_))), "{early:?}");
        assert!(matches!(auth, Some(Frame::Auth(_))), "{auth:?}");
        assert!(
            matches!(&request, Some(Frame::List(l)) if l.dir == "d"),
            "{request:?}"
        );
        let session = connected
            .expect("a hang guard only")
            .expect("connected again");
        assert!(session.first_sent);
        let offered =
            xfer_proto::CAP_FEATURES | xfer_proto::CAP_EARLY_AUTH | xfer_proto::CAP_ZERO_RTT;
        assert_eq!(
            memory.predict(&target.to_string(), offered, false),
            None,
            "forgotten"
        );
    }

    /// The round trip is told as soon as the TCP connect is done: before the `Hello` goes, so
    /// before any handshake round trip, other connections can open beside this one's.
    #[tokio::test]
    async fn the_round_trip_is_told_before_the_hello_goes() {
        let (listener, target) = fake_daemon().await;
        let (dialed, mut dial_rtt) = tokio::sync::oneshot::channel();
        let daemon = async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            // The first bytes of the `Hello`: the client has connected and written it.
            let mut hello_len = [0u8; 4];
            socket.read_exact(&mut hello_len).await.unwrap();
            let told = dial_rtt.try_recv();
            // Closing ends the client's handshake.
            drop(socket);
            told
        };
        let connector = Connector::default();
        let client = async {
            let mut dialed = Some(dialed);
            let connected = Session::connect_telling_rtt(&target, &connector, 0, &mut dialed).await;
            (connected.is_err(), dialed.is_none())
        };
        let (told, (failed, sent)) = tokio::join!(daemon, client);
        assert!(failed && sent, "the handshake failed, the sender was used");
        assert!(
            matches!(told, Ok(Some(_))),
            "no round trip told before the Hello: {told:?}"
        );
    }
}
