//! One client connection, from `Hello` to close: frames are checked by the sans-IO
//! [`ServerSession`], which also holds the connection's open transfers, and carried out here.
//! A failure ends this connection only; the listener and every other connection carry on.
//!
//! This module is the connection's loop and how it ends; each kind of request is carried out
//! in its own: `handshake`, `upload`, `delta`, `download`, `tree` and `copy`.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::{timeout, timeout_at, Instant};
use tracing::{debug, info, warn};
use xfer_core::SourceFile;
use xfer_net::{FrameReader, FrameWriter};
use xfer_proto::session::{Phase, Request, ServerConfig, ServerSession, ZeroRtt};
use xfer_proto::{auth, ErrorCode, ErrorFrame, Frame, ProtoError};

use crate::registry::Lease;
use crate::Shared;

mod compress;
mod copy;
mod delta;
mod download;
mod handshake;
mod meta;
mod tree;
mod upload;

#[cfg(test)]
mod tests;

use handshake::start_tls;
use upload::{written, WriteBehind};

const AGENT: &str = concat!("xferd/", env!("CARGO_PKG_VERSION"));

type Reader = FrameReader<Box<dyn AsyncRead + Send + Unpin>>;
type Writer = FrameWriter<Box<dyn AsyncWrite + Send + Unpin>>;

/// Why a connection ended early. Each is logged once, where the connection ends.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error(transparent)]
    Proto(#[from] ProtoError),
    #[error("{}", .0)]
    Fatal(ErrorFrame),
    /// The session refused a frame: `frame` tells the client, the cause goes to the log.
    #[error("{cause}")]
    Session {
        cause: xfer_proto::session::SessionError,
        frame: ErrorFrame,
    },
    #[error("client disconnected without Goodbye")]
    PeerClosed,
}

impl From<xfer_proto::session::SessionError> for ConnError {
    fn from(cause: xfer_proto::session::SessionError) -> Self {
        let frame = ErrorFrame::new(cause.code(), cause.wire_message());
        Self::Session { cause, frame }
    }
}

fn fatal(code: ErrorCode, message: impl Into<String>) -> ConnError {
    ConnError::Fatal(ErrorFrame::new(code, message))
}

/// What a connection keeps for an upload open in its session.
struct Upload {
    lease: Lease,
    name: String,
    mode: u32,
    crc_retries: u64,
    /// Bytes received and acknowledged on this connection.
    bytes: u64,
    /// The file held under the name, matched lazily, once a `DeltaOpen` opened it.
    basis: Option<Arc<xfer_core::delta::Basis>>,
    /// When its commit is durable: a light file's (`DeltaPut`) at the tree's `Sync` where the
    /// client speaks `CAP_DELTA_PUT_SYNC`.
    durability: xfer_core::Durability,
}

/// What a connection keeps for a download open in its session.
struct Download {
    source: SourceFile,
    name: String,
    /// Bytes sent on this connection.
    bytes: u64,
}

/// The protocol state of a connection, open transfers included.
type Session = ServerSession<Upload, Download>;

/// `fut`, unless `deadline` comes first (then `None`).
async fn within<F: std::future::Future>(
    deadline: Option<std::time::Instant>,
    fut: F,
) -> Option<F::Output> {
    match deadline {
        Some(deadline) => timeout_at(Instant::from_std(deadline), fut).await.ok(),
        None => Some(fut.await),
    }
}

/// The next frame, unless the peer stays idle past the session's deadline (then `None`). A
/// frame still arriving is not idleness: over a slow link one large chunk may take longer than
/// the idle timeout. So while the connection is ready, each time bytes came in since the
/// deadline was set (or this side was the one waiting, for memory), it is set again from now.
async fn read_unless_idle(
    reader: &mut Reader,
    session: &Session,
) -> Option<Result<Option<Frame>, ProtoError>> {
    loop {
        let received = reader.received();
        let deadline = session.poll_timeout(std::time::Instant::now());
        match within(deadline, reader.read_frame()).await {
            Some(frame) => return Some(frame),
            None if session.phase() == Phase::Ready
                && (reader.received() > received || reader.waiting_for_budget()) =>
            {
                continue
            }
            None => return None,
        }
    }
}

struct Handler {
    shared: Arc<Shared>,
    peer: SocketAddr,
    /// The protocol state, and the transfers open on this connection.
    session: Session,
    reader: Reader,
    writer: Writer,
    /// A request read while gathering a batch of small files, to be handled next.
    pending: Option<Request>,
    /// The chunk being written while the next one is read (acknowledged once written).
    write_behind: Option<WriteBehind>,
    /// Light files' matched runs being written behind their `DeltaMatch`: what needs them on
    /// disk (a commit) waits for its upload's first.
    copies: Vec<delta::Copies>,
    /// How the chunks this connection sends are compressed, once it sent one or the client
    /// said (`SetCompression`).
    compressor: Option<xfer_net::Compressor>,
    /// The connection's socket, open while `reader` and `writer` live; `None` for a stream
    /// that is not one (tests).
    socket: Option<std::os::fd::RawFd>,
    /// The socket counted by the delivered-bytes meter `auto` compression measures by, while
    /// it does.
    counted: Option<xfer_net::delivered::Counted>,
    /// How the next copy this connection asks for chooses between a delta and the whole file
    /// (`CopyMode`).
    copy_delta: xfer_proto::CopyDeltaMode,
    /// When this connection last sent a `PathReport` (`CAP_PATH_REPORT`).
    path_reported: Option<std::time::Instant>,
}

/// A byte stream a connection is served over: a TCP socket in the daemon, one end of an
/// in-memory pipe in tests.
pub(crate) trait Transport: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// The stream as a frame reader and writer that can be used at once.
    fn into_frames(self) -> (Reader, Writer)
    where
        Self: Sized,
    {
        let (read, write) = tokio::io::split(self);
        (
            FrameReader::new(Box::new(read)),
            FrameWriter::new(Box::new(write)),
        )
    }

    /// The socket beneath, for kernel TLS; `None` for a stream that is not one.
    fn fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
}

impl Transport for TcpStream {
    fn fd(&self) -> Option<std::os::fd::RawFd> {
        Some(std::os::fd::AsRawFd::as_raw_fd(self))
    }

    /// Owned halves: reading and writing share no lock.
    fn into_frames(self) -> (Reader, Writer) {
        let (read, write) = self.into_split();
        (
            FrameReader::new(Box::new(read)),
            FrameWriter::new(Box::new(write)),
        )
    }
}

#[cfg(test)]
impl Transport for tokio::io::DuplexStream {}

/// Serves one connection to its end; logs how it ended. `peer` names the client in logs and
/// in the download log.
#[tracing::instrument(name = "conn", skip_all, fields(peer = %peer))]
pub(crate) async fn serve(shared: Arc<Shared>, stream: impl Transport, peer: SocketAddr) {
    let mut session = new_session(&shared);
    let socket = stream.fd();
    let (reader, writer) = match &shared.config.tls {
        None => stream.into_frames(),
        Some(acceptor) => match start_tls(&mut session, stream, acceptor, &shared.budget).await {
            Ok(Some(halves)) => halves,
            Ok(None) => return debug!("connection closed before its hello"),
            Err((err, stream)) => {
                let frame = report(&err);
                if let (Some(frame), Some(stream)) = (frame, stream) {
                    let (mut reader, mut writer) = stream.into_frames();
                    close_with(&mut reader, &mut writer, frame).await;
                }
                return;
            }
        },
    };
    // Every large frame is read into bytes reserved from the daemon's budget.
    let reader = reader.with_budget(shared.budget.clone());
    let mut handler = Handler::new(shared, peer, session, (reader, writer));
    handler.socket = socket;
    let err = match handler.run().await {
        Ok(()) => {
            // Over TLS this sends close_notify, so the client sees a clean end.
            let _ = handler.writer.shutdown().await;
            handler.settle_copies().await;
            handler.end_downloads(true);
            return debug!("connection closed");
        }
        Err(err) => err,
    };
    // A chunk still being written lands (unacknowledged: the client sends it again) before
    // the transfer is logged.
    if let Some(write) = handler.write_behind.take() {
        let _ = write.task.await;
    }
    // So do copies still being written, their span agreed: a resume need not send it again.
    handler.settle_copies().await;
    if let Some(frame) = report(&err) {
        close_with(&mut handler.reader, &mut handler.writer, frame).await;
    }
    handler.log_abandoned();
    handler.end_downloads(false);
}

/// A session for a connection accepted now, with a fresh nonce.
fn new_session(shared: &Shared) -> Session {
    let mut nonce = vec![0u8; auth::NONCE_LEN];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut nonce);
    let config = ServerConfig {
        token: shared.config.token.clone(),
        max_chunk: shared.config.chunk_size,
        max_open: shared.config.max_transfers_per_conn,
        tls: shared.config.tls.is_some(),
        window: shared.config.window,
        agent: AGENT.into(),
        handshake_timeout: shared.config.handshake_timeout,
        idle_timeout: shared.config.idle_timeout,
        replay: Some(Arc::clone(&shared.replay)),
    };
    let now_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    ServerSession::new(config, nonce, now_unix, std::time::Instant::now())
}

/// Logs how a connection ended and returns the error frame to send the client, if any.
fn report(err: &ConnError) -> Option<ErrorFrame> {
    let frame = match err {
        ConnError::Proto(ProtoError::Io(_)) | ConnError::PeerClosed => None,
        ConnError::Proto(e) => Some(ErrorFrame::new(e.code(), e.to_string())),
        ConnError::Fatal(frame) | ConnError::Session { frame, .. } => Some(frame.clone()),
    };
    match frame.as_ref().and_then(ErrorFrame::error_code) {
        _ if matches!(err, ConnError::PeerClosed) => info!("{err}"),
        Some(ErrorCode::Busy | ErrorCode::ShuttingDown) => {
            info!(error = %err, "connection refused")
        }
        _ => warn!(error = %err, "connection ended with an error"),
    }
    frame
}

/// Tells a client it is over a limit, without reading its handshake, and closes.
pub(crate) async fn refuse_busy(stream: impl Transport, peer: SocketAddr, why: &str) {
    info!(%peer, "connection refused: {why}");
    let frame = ErrorFrame::new(ErrorCode::Busy, format!("server busy: {why}"));
    let (mut reader, mut writer) = stream.into_frames();
    close_with(&mut reader, &mut writer, frame).await;
}

impl Handler {
    fn new(
        shared: Arc<Shared>,
        peer: SocketAddr,
        session: Session,
        (reader, writer): (Reader, Writer),
    ) -> Self {
        Self {
            shared,
            peer,
            session,
            reader,
            writer,
            pending: None,
            write_behind: None,
            copies: Vec::new(),
            compressor: None,
            socket: None,
            counted: None,
            copy_delta: xfer_proto::CopyDeltaMode::Auto,
            path_reported: None,
        }
    }

    async fn run(&mut self) -> Result<(), ConnError> {
        let shared = Arc::clone(&self.shared);
        let cfg = &shared.config;
        let shutdown = shared.shutdown.clone();
        let admitted = tokio::select! {
            biased;
            () = shutdown.cancelled() => return Err(fatal(ErrorCode::ShuttingDown, "server shutting down")),
            admitted = self.handshake() => admitted?,
        };
        if !admitted {
            return Ok(());
        }
        // A client that will delete learns now, before anything moves, if it may not.
        if self.session.capabilities() & xfer_proto::CAP_DELETE != 0 {
            if let Some(refusal) = crate::mirror::delete_refusal(cfg) {
                return Err(fatal(ErrorCode::ReadOnly, refusal));
            }
        }
        // Wait for a stream slot, but not forever, not past shutdown, and not for a client that
        // has gone away meanwhile (its place in the queue would only delay the living). A client
        // answered early sends its first request with `Auth`: that one frame waits here,
        // unread beyond, for the Welcome to go first.
        let busy = || {
            fatal(
                ErrorCode::Busy,
                format!(
                    "server busy: all {} streams in use for {:?}; try again later",
                    cfg.max_streams, cfg.queue_timeout
                ),
            )
        };
        let early = self.session.is_early();
        let mut first = None;
        let permit = timeout_at(Instant::now() + cfg.queue_timeout, shared.acquire_stream());
        tokio::pin!(permit);
        let _permit = loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return Err(fatal(ErrorCode::ShuttingDown, "server shutting down")),
                frame = self.reader.read_frame(), if first.is_none() => match frame {
                    Ok(None) | Err(ProtoError::Io(_)) => return Err(ConnError::PeerClosed),
                    Ok(Some(f)) if early => first = Some(f),
                    Ok(Some(f)) => return Err(fatal(ErrorCode::Protocol, format!("{} before Welcome", f.frame_type().name()))),
                    Err(e) => return Err(e.into()),
                },
                permit = &mut permit => match permit {
                    Ok(Ok(permit)) => break permit,
                    _ => return Err(busy()),
                },
            }
        };
        // The idle timeout, where told, goes in the Welcome's write: it costs no round trip, and
        // it is this connection's for good (a reload never changes an open connection's).
        self.writer.send_all(&self.session.welcome_frames()).await?;
        if let Some(frame) = first {
            // What a client saved a round trip on: said so that it can be seen.
            if matches!(self.session.zero_rtt(), ZeroRtt::Accepted { .. }) {
                debug!(
                    request = frame.frame_type().name(),
                    "the first request came with the early proof"
                );
            } else {
                debug!(
                    request = frame.frame_type().name(),
                    "the first request came with Auth"
                );
            }
            let request = self.session.handle_request(frame)?;
            self.check_window(&request)?;
            self.pending = Some(request);
        }
        loop {
            let request = match self.pending.take() {
                Some(request) => request,
                None => {
                    let frame = tokio::select! {
                        biased;
                        () = shutdown.cancelled() => {
                            self.finish_write().await?;
                            return Err(fatal(ErrorCode::ShuttingDown, "server shutting down; rerun to resume"));
                        }
                        (upload, chunk, result) = written(&mut self.write_behind) => {
                            self.write_done(upload, chunk, result).await?;
                            continue;
                        }
                        frame = read_unless_idle(&mut self.reader, &self.session) => match frame {
                            None => return Err(self.session.timed_out().into()),
                            Some(frame) => frame?,
                        },
                    };
                    let Some(frame) = frame else {
                        return Err(ConnError::PeerClosed);
                    };
                    let request = self.session.handle_request(frame)?;
                    self.check_window(&request)?;
                    request
                }
            };
            // A frame is handled to completion: shutdown is noticed only between frames, so a
            // chunk is either written and acknowledged or not acknowledged at all. Only chunks
            // are written behind; anything else waits for the chunk being written (a commit
            // must see every byte acknowledged before it).
            if !matches!(request, Request::Data(..)) {
                self.finish_write().await?;
            }
            match request {
                Request::OpenWrite(req, holes) => {
                    self.open_write(req, holes).await?;
                }
                Request::Data(id, data) => {
                    let wire = data.payload.len() as u64;
                    self.shared.metrics.wire_bytes_received.add(wire);
                    self.data(id, data).await?;
                }
                Request::DataZ(id, z) => self.data_compressed(id, z).await?,
                Request::SetCompression(mode) => self.set_compression(mode),
                Request::CopyMode(mode) => self.copy_delta = mode,
                Request::Skip => {}
                Request::Commit(id, c) => self.commit(id, c).await?,
                Request::DeltaOpen(id, _) => self.delta_open(id).await?,
                Request::DeltaResume(id, _) => self.delta_resume(id).await?,
                Request::DeltaSig(id, sig) => self.delta_sig(id, sig, false).await?,
                Request::DeltaGuess(id, sig) => self.delta_sig(id, sig, true).await?,
                Request::DeltaCopy(id, copy) => self.delta_copy(id, copy).await?,
                Request::DeltaPut(put) => self.delta_put(put).await?,
                Request::DeltaPutFull(name, max) => {
                    debug!(%name, max, "light upload refused: the connection's transfers are all open");
                    let message =
                        format!("{name}: {max} transfers already open on this connection");
                    self.writer
                        .send(&Frame::Error(ErrorFrame::new(ErrorCode::Busy, message)))
                        .await?;
                }
                Request::ReadSig(id, req) => self.read_sig(id, req).await?,
                Request::Digest(id) => self.digest(id).await?,
                Request::OpenRead(req) => self.open_read(req).await?,
                Request::ReadChunk(id, chunk) => self.read_chunk(id, chunk).await?,
                Request::List(list) => self.list(&list.dir).await?,
                Request::ListTree(req) => self.list_tree(req).await?,
                Request::PutFile(req) => self.put_files(tree::SmallFile::Plain(req)).await?,
                Request::PutFileMeta(req) => self.put_files(tree::SmallFile::WithMeta(req)).await?,
                Request::PackedPutFiles(packed) => self.packed_put_files(packed).await?,
                Request::MakeDir(req) => self.make_dirs(req).await?,
                Request::MakeLink(req) => {
                    // With CAP_TREE_META links are stored as they are; without, as before.
                    let verbatim = self.keeps_meta();
                    self.tree_op(req.name.clone(), move |root| match verbatim {
                        true => root.make_link_verbatim(&req.name, &req.target),
                        false => root.make_link(&req.name, &req.target),
                    })
                    .await?
                }
                Request::Zeros(id, chunk) => self.zeros(id, chunk).await?,
                Request::ListTreeMeta(req) => self.list_tree_meta(req).await?,
                Request::SetMeta(req) => self.set_metas(req).await?,
                Request::MakeHardLink(req) => {
                    self.tree_op(req.name.clone(), move |root| {
                        root.make_hard_link(&req.name, &req.existing)
                    })
                    .await?
                }
                Request::MakeNode(req) => {
                    self.tree_op(req.name.clone(), move |root| {
                        root.make_node(&req.name, req.st_mode, req.rdev)
                    })
                    .await?
                }
                Request::GetFile(req) => self.get_files(req).await?,
                Request::Sync => self.sync().await?,
                Request::AwaitCommits(req) => self.await_commits(&req.names).await?,
                Request::CopyTo(req) => self.copy_to(req, None).await?,
                Request::Delete(req) => {
                    // Checked at the handshake; a reload since then does not widen it.
                    if let Some(refusal) = crate::mirror::delete_refusal(cfg) {
                        self.reply_error(ErrorCode::ReadOnly, refusal).await?;
                        continue;
                    }
                    self.tree_op(req.name.clone(), move |root| {
                        root.remove_entry(&req.name).map(drop)
                    })
                    .await?
                }
                Request::MirrorTo(req) => match crate::mirror::mirror_of(&req) {
                    Ok(mirror) => self.copy_to(req.copy, Some((req.options, mirror))).await?,
                    Err(message) => {
                        // A refused copy uses up its `CopyMode` as a failed one does.
                        self.copy_delta = xfer_proto::CopyDeltaMode::Auto;
                        self.reply_error(ErrorCode::BadPath, message).await?
                    }
                },
                Request::Goodbye => return Ok(()),
                Request::PeerError(e) => {
                    info!(error = %e, "client reported an error");
                    return Err(ConnError::PeerClosed);
                }
            }
        }
    }

    /// A streamed frame read while the chunk before it is still being written behind, its
    /// `Ack` not sent: the client sent it with both unanswered, which a window of one frame
    /// forbids, or with `CAP_BYTE_WINDOW` one of fewer slots than the two take (proto.md §5.11
    /// lets a server end the connection for it). Only this is ever seen, since every other
    /// frame is answered before the next is read.
    fn check_window(&self, request: &Request) -> Result<(), ConnError> {
        let next = match request {
            Request::Data(_, data) => data.payload.len() as u64,
            Request::DataZ(_, z) => u64::from(z.raw_len),
            Request::Zeros(_, chunk) => u64::from(chunk.len),
            _ => return Ok(()),
        };
        let Some(behind) = &self.write_behind else {
            return Ok(());
        };
        let window = self.shared.config.window;
        let by_size = self.session.capabilities() & xfer_proto::CAP_BYTE_WINDOW != 0;
        let max_chunk = by_size.then_some(self.shared.config.chunk_size);
        if window_breached(window, max_chunk, u64::from(behind.chunk.len), next) {
            let unit = match by_size {
                true => "slots",
                false => "Data",
            };
            return Err(fatal(
                ErrorCode::Protocol,
                format!("more {unit} unanswered than the window of {window} allows"),
            ));
        }
        Ok(())
    }

    /// The whole-file digest this connection's `Commit`, `Committed` and `DigestReply` carry.
    fn digest_kind(&self) -> xfer_core::digest::DigestKind {
        xfer_core::digest::DigestKind::of_capabilities(self.session.capabilities())
    }

    /// The root as this session may use it: under a copy grant no symlink is followed, so a
    /// link inside the grant's scope cannot lead a write out of it.
    fn root(&self) -> xfer_core::Root {
        match self.session.scope() {
            Some(_) => self.shared.config.root.without_symlinks(),
            None => self.shared.config.root.clone(),
        }
    }

    /// Answers a request with an error. Errors about the request leave the connection usable;
    /// any other code (I/O, limits) ends it, as `proto.md` requires.
    async fn reply_error(&mut self, code: ErrorCode, message: String) -> Result<(), ConnError> {
        if !code.is_request_level() {
            return Err(fatal(code, message));
        }
        self.writer
            .send(&Frame::Error(ErrorFrame::new(code, message)))
            .await?;
        Ok(())
    }

    /// Tells the download log that this connection's downloads ended (`clean`: with `Goodbye`).
    fn end_downloads(&self, clean: bool) {
        for Download {
            source,
            name,
            bytes,
        } in self.session.downloads()
        {
            let identity = source.identity();
            self.shared
                .downloads
                .closed(self.peer, name, identity, *bytes, clean);
        }
    }

    fn log_abandoned(&self) {
        for Upload {
            lease, name, bytes, ..
        } in self.session.uploads()
        {
            info!(
                name = %name,
                received = bytes,
                held = lease.partial.held_bytes(),
                size = lease.partial.identity().size,
                "upload interrupted; resumable"
            );
        }
        for Download { name, bytes, .. } in self.session.downloads() {
            info!(name = %name, sent = bytes, "download interrupted");
        }
    }
}

const READ_ONLY: &str = "read-only server: uploads are disabled";

/// Sends a last error frame, then closes without resetting the connection: the write side is
/// shut first and unread input is drained briefly, so the peer gets to read the frame.
async fn close_with(reader: &mut Reader, writer: &mut Writer, frame: ErrorFrame) {
    let _ = timeout(std::time::Duration::from_secs(2), async {
        writer.send(&Frame::Error(frame)).await?;
        writer.shutdown().await?;
        // On the heap: an array here would sit in every connection's task from its start.
        let mut sink = vec![0u8; 16 * 1024];
        let mut drained = 0usize;
        while drained < (1 << 20) {
            match tokio::io::AsyncReadExt::read(reader.get_mut(), &mut sink).await? {
                0 => break,
                n => drained += n,
            }
        }
        Ok::<_, ProtoError>(())
    })
    .await;
}

/// Whether two streamed frames unanswered at once, of `behind` and `next` bytes, exceed a
/// window of `window`: counted in frames, or with `CAP_BYTE_WINDOW` (`max_chunk` given) in
/// slots of `max_chunk` (proto.md §5.11).
fn window_breached(window: u32, max_chunk: Option<u32>, behind: u64, next: u64) -> bool {
    match max_chunk {
        None => window < 2,
        Some(max_chunk) => {
            let slots = xfer_proto::window_slots(behind, max_chunk)
                + xfer_proto::window_slots(next, max_chunk);
            u64::from(slots) > u64::from(window) * u64::from(xfer_proto::WINDOW_SLOTS)
        }
    }
}
