//! One client connection, from `Hello` to close: frames are checked by the sans-IO
//! [`ServerSession`] and carried out here. A failure ends this connection only; the listener
//! and every other connection carry on.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::{timeout, timeout_at, Instant};
use tracing::{debug, info, warn};
use xfer_core::digest::DIGEST_LEN;
use xfer_core::{CoreError, FrameReader, FrameWriter, SourceFile};
use xfer_proto::session::{Phase, Request, ServerConfig, ServerSession, TransferKind};
use xfer_proto::{
    auth, ByteRange, Challenge, ChunkRef, Commit, CopyDone, CopyTo, Data, Done, ErrorCode,
    ErrorFrame, FileData, Frame, GetFile, ListTree, Listing, OpenRead, OpenWrite, Progress,
    ProtoError, PutFile, ReadOpened, TreeListing, Welcome, WriteOpened, MAX_LISTING_ENTRIES,
};

use crate::registry::{blocking, Lease};
use crate::Shared;

/// Largest file `GetFile` sends whole: well inside one control frame.
const MAX_SMALL_FILE: u64 = 1 << 20;
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
    #[error("client disconnected without Goodbye")]
    PeerClosed,
}

impl From<xfer_proto::session::SessionError> for ConnError {
    fn from(e: xfer_proto::session::SessionError) -> Self {
        fatal(e.code(), e.to_string())
    }
}

fn fatal(code: ErrorCode, message: impl Into<String>) -> ConnError {
    ConnError::Fatal(ErrorFrame::new(code, message))
}

/// A transfer open on this connection, with what it has moved so far.
enum Open {
    Write {
        lease: Lease,
        name: String,
        mode: u32,
        crc_retries: u64,
        bytes: u64,
    },
    Read {
        source: SourceFile,
        name: String,
        bytes: u64,
    },
}

struct Handler {
    shared: Arc<Shared>,
    peer: SocketAddr,
    session: ServerSession,
    /// When the handshake (including a TLS one) must be done.
    deadline: Instant,
    reader: Reader,
    writer: Writer,
    open: HashMap<u64, Open>,
    /// A request read while gathering a batch of small files, to be handled next.
    pending: Option<Request>,
    /// The chunk being written while the next one is read (acknowledged once written).
    write_behind: Option<WriteBehind>,
}

/// One chunk's write to disk, running beside the connection's reads: receiving chunk N+1
/// while chunk N goes to the page cache keeps a single connection streaming instead of
/// alternating between the socket and the disk.
struct WriteBehind {
    chunk: ChunkRef,
    task: tokio::task::JoinHandle<Result<(), CoreError>>,
}

type Written = (
    ChunkRef,
    Result<Result<(), CoreError>, tokio::task::JoinError>,
);

/// Waits for the write in `slot`, then empties it; never completes while there is none.
/// Cancel safe: dropped before the write is done, the write goes on and stays in `slot`.
async fn written(slot: &mut Option<WriteBehind>) -> Written {
    let Some(write) = slot else {
        return std::future::pending().await;
    };
    let result = (&mut write.task).await;
    let chunk = write.chunk;
    *slot = None;
    (chunk, result)
}

/// Serves one connection to its end; logs how it ended.
#[tracing::instrument(name = "conn", skip_all, fields(peer = %peer))]
pub(crate) async fn serve(shared: Arc<Shared>, socket: TcpStream, peer: SocketAddr) {
    let _ = socket.set_nodelay(true);
    let mut nonce = vec![0u8; auth::NONCE_LEN];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut nonce);
    let config = ServerConfig {
        token: shared.config.token.clone(),
        max_chunk: shared.config.chunk_size,
        max_open: shared.config.max_transfers_per_conn,
        tls: shared.config.tls.is_some(),
    };
    let now_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut session = ServerSession::new(config, nonce, now_unix);
    let deadline = Instant::now() + shared.config.handshake_timeout;
    let budget = shared.budget.clone();
    let (reader, writer) = match &shared.config.tls {
        None => {
            let (read, write) = socket.into_split();
            let reader = Reader::new(Box::new(read)).with_budget(budget);
            let writer: Writer = FrameWriter::new(Box::new(write));
            (reader, writer)
        }
        Some(acceptor) => match start_tls(&mut session, socket, acceptor, deadline, budget).await {
            Ok(halves) => halves,
            Err((err, socket)) => {
                let frame = report(&err);
                if let (Some(frame), Some(socket)) = (frame, socket) {
                    let (read, write) = socket.into_split();
                    close_with(
                        &mut FrameReader::new(Box::new(read)),
                        &mut FrameWriter::new(Box::new(write)),
                        frame,
                    )
                    .await;
                }
                return;
            }
        },
    };
    let mut handler = Handler {
        shared,
        peer,
        session,
        deadline,
        reader,
        writer,
        open: HashMap::new(),
        pending: None,
        write_behind: None,
    };
    let err = match handler.run().await {
        Ok(()) => {
            // Over TLS this sends close_notify, so the client sees a clean end.
            let _ = handler.writer.shutdown().await;
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
    if let Some(frame) = report(&err) {
        close_with(&mut handler.reader, &mut handler.writer, frame).await;
    }
    handler.log_abandoned();
    handler.end_downloads(false);
}

/// Logs how a connection ended and returns the error frame to send the client, if any.
fn report(err: &ConnError) -> Option<ErrorFrame> {
    let frame = match err {
        ConnError::Proto(ProtoError::Io(_)) | ConnError::PeerClosed => None,
        ConnError::Proto(e) => Some(ErrorFrame::new(e.code(), e.to_string())),
        ConnError::Fatal(f) => Some(f.clone()),
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

/// Reads the plaintext `Hello`, which must ask for TLS, answers `StartTls` and runs the TLS
/// handshake. On failure, returns the socket too while a plaintext error frame can still be sent.
async fn start_tls(
    session: &mut ServerSession,
    mut socket: TcpStream,
    acceptor: &crate::Tls,
    deadline: Instant,
    budget: xfer_core::MemoryBudget,
) -> Result<(Reader, Writer), (ConnError, Option<TcpStream>)> {
    // The client sends nothing after this Hello until it reads StartTls, so a reader borrowed
    // for one frame cannot swallow the start of the TLS handshake.
    let mut hello = FrameReader::new(&mut socket).with_budget(budget.clone());
    let frame = match timeout_at(deadline, hello.read_frame()).await {
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
        Reader::new(Box::new(read)).with_budget(budget),
        FrameWriter::new(Box::new(write)),
    ))
}

/// Tells a client it is over a limit, without reading its handshake, and closes.
pub(crate) async fn refuse_busy(socket: TcpStream, peer: SocketAddr, why: &str) {
    info!(%peer, "connection refused: {why}");
    let (read, write) = socket.into_split();
    let frame = ErrorFrame::new(ErrorCode::Busy, format!("server busy: {why}"));
    let mut reader: Reader = FrameReader::new(Box::new(read));
    let mut writer: Writer = FrameWriter::new(Box::new(write));
    close_with(&mut reader, &mut writer, frame).await;
}

impl Handler {
    async fn run(&mut self) -> Result<(), ConnError> {
        let shared = Arc::clone(&self.shared);
        let cfg = &shared.config;
        let deadline = self.deadline;
        let shutdown = shared.shutdown.clone();
        let handshake = tokio::select! {
            biased;
            () = shutdown.cancelled() => return Err(fatal(ErrorCode::ShuttingDown, "server shutting down")),
            handshake = self.handshake(deadline) => handshake?,
        };
        let Some((version, proof)) = handshake else {
            return Ok(());
        };
        // Wait for a stream slot, but not forever, not past shutdown, and not for a client that
        // has gone away meanwhile (its place in the queue would only delay the living).
        let _permit = tokio::select! {
            biased;
            () = shutdown.cancelled() => return Err(fatal(ErrorCode::ShuttingDown, "server shutting down")),
            early = self.reader.read_frame() => return match early {
                Ok(None) | Err(ProtoError::Io(_)) => Err(ConnError::PeerClosed),
                Ok(Some(f)) => Err(fatal(ErrorCode::Protocol, format!("{} before Welcome", f.frame_type().name()))),
                Err(e) => Err(e.into()),
            },
            permit = timeout(cfg.queue_timeout, shared.acquire_stream()) => match permit {
                Ok(Ok(permit)) => permit,
                _ => return Err(fatal(
                    ErrorCode::Busy,
                    format!("server busy: all {} streams in use for {:?}; try again later", cfg.max_streams, cfg.queue_timeout),
                )),
            },
        };
        let welcome = Welcome {
            version,
            capabilities: self.session.capabilities(),
            max_chunk_size: cfg.chunk_size,
            window: cfg.window,
            agent: AGENT.into(),
            proof,
        };
        self.writer.send(&Frame::Welcome(welcome)).await?;
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
                        (chunk, result) = written(&mut self.write_behind) => {
                            self.write_done(chunk, result).await?;
                            continue;
                        }
                        frame = timeout(cfg.idle_timeout, self.reader.read_frame()) => match frame {
                            Err(_) => return Err(fatal(ErrorCode::Protocol, format!("idle for {:?}", cfg.idle_timeout))),
                            Ok(frame) => frame?,
                        },
                    };
                    let Some(frame) = frame else {
                        return Err(ConnError::PeerClosed);
                    };
                    self.session.handle_frame(frame)?
                }
            };
            // A frame is handled to completion: shutdown is noticed only between frames, so a
            // chunk is either written and acknowledged or not acknowledged at all. Only chunks
            // are written behind; anything else waits for the chunk being written (a commit
            // must see every byte acknowledged before it).
            if !matches!(request, Request::Data(_)) {
                self.finish_write().await?;
            }
            match request {
                Request::OpenWrite(req) => self.open_write(req).await?,
                Request::Data(data) => self.data(data).await?,
                Request::Commit(c) => self.commit(c).await?,
                Request::Digest(id) => self.digest(id).await?,
                Request::OpenRead(req) => self.open_read(req).await?,
                Request::ReadChunk(chunk) => self.read_chunk(chunk).await?,
                Request::List(list) => self.list(&list.dir).await?,
                Request::ListTree(req) => self.list_tree(req).await?,
                Request::PutFile(req) => self.put_files(req).await?,
                Request::MakeDir(req) => {
                    self.tree_op(req.name.clone(), move |root| {
                        root.make_dir(&req.name, req.mode, req.mtime_ns)
                    })
                    .await?
                }
                Request::MakeLink(req) => {
                    self.tree_op(req.name.clone(), move |root| {
                        root.make_link(&req.name, &req.target)
                    })
                    .await?
                }
                Request::GetFile(req) => self.get_files(req).await?,
                Request::Sync => self.sync().await?,
                Request::CopyTo(req) => self.copy_to(req).await?,
                Request::Goodbye => return Ok(()),
                Request::PeerError(e) => {
                    info!(error = %e, "client reported an error");
                    return Err(ConnError::PeerClosed);
                }
                Request::Hello { .. } | Request::Authenticated { .. } | Request::StartTls => {
                    unreachable!("the session allows handshake frames only before Ready")
                }
            }
        }
    }

    /// Runs `Hello` (and `Challenge`/`Auth` when a token is set) to completion before
    /// `deadline`. Returns the version and the server's proof, or `None` if the client left
    /// before saying anything.
    async fn handshake(&mut self, deadline: Instant) -> Result<Option<(u16, Vec<u8>)>, ConnError> {
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

    /// The root as this session may use it: under a copy grant no symlink is followed, so a
    /// link inside the grant's scope cannot lead a write out of it.
    fn root(&self) -> xfer_core::Root {
        match self.session.scope() {
            Some(_) => self.shared.config.root.without_symlinks(),
            None => self.shared.config.root.clone(),
        }
    }

    /// Reads a handshake frame before `deadline`.
    async fn handshake_frame(&mut self, deadline: Instant) -> Result<Option<Frame>, ConnError> {
        match timeout_at(deadline, self.reader.read_frame()).await {
            Err(_) => Err(fatal(ErrorCode::Protocol, "handshake timed out")),
            Ok(frame) => Ok(frame?),
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

    async fn open_write(&mut self, req: OpenWrite) -> Result<(), ConnError> {
        if self.shared.config.read_only {
            return self
                .reply_error(ErrorCode::ReadOnly, READ_ONLY.into())
                .await;
        }
        let opened = self
            .shared
            .registry
            .open(&self.root(), &req.name, req.identity)
            .await;
        let lease = match opened {
            Ok(lease) => lease,
            Err(e) => {
                info!(name = %req.name, error = %e, "upload refused");
                return self.reply_error(e.code(), e.to_string()).await;
            }
        };
        let id = self.session.opened(TransferKind::Upload, req.identity.size);
        let held = lease.partial.held();
        info!(
            name = %req.name,
            size = req.identity.size,
            held = lease.partial.held_bytes(),
            transfer_id = id,
            "upload opened"
        );
        self.open.insert(
            id,
            Open::Write {
                lease,
                name: req.name,
                mode: req.mode,
                crc_retries: 0,
                bytes: 0,
            },
        );
        self.writer
            .send(&Frame::WriteOpened(WriteOpened {
                transfer_id: id,
                held,
            }))
            .await?;
        Ok(())
    }

    async fn data(&mut self, data: Data) -> Result<(), ConnError> {
        // One chunk is written behind at a time, and answers go out in the order the frames
        // came in: the chunk before this one is written and acknowledged first.
        self.finish_write().await?;
        let Some(Open::Write {
            lease,
            name,
            crc_retries,
            ..
        }) = self.open.get_mut(&data.transfer_id)
        else {
            unreachable!("the session checked the transfer id")
        };
        let chunk = ChunkRef {
            transfer_id: data.transfer_id,
            offset: data.offset,
            len: data.payload.len() as u32,
        };
        if data.verify().is_err() {
            *crc_retries += 1;
            self.shared.metrics.crc_errors.inc();
            warn!(name = %name, offset = data.offset, "chunk failed its CRC; asked again");
            self.writer.send(&Frame::Reject(chunk)).await?;
            return Ok(());
        }
        let partial = Arc::clone(&lease.partial);
        let task =
            tokio::spawn(async move { partial.write(data.offset, data.payload, data.crc32).await });
        self.write_behind = Some(WriteBehind { chunk, task });
        Ok(())
    }

    /// Waits for the chunk being written, if any, and acknowledges it.
    async fn finish_write(&mut self) -> Result<(), ConnError> {
        if self.write_behind.is_none() {
            return Ok(());
        }
        let (chunk, result) = written(&mut self.write_behind).await;
        self.write_done(chunk, result).await
    }

    /// A chunk's write ended: acknowledge it, or end the connection with the write's error.
    async fn write_done(
        &mut self,
        chunk: ChunkRef,
        result: Result<Result<(), CoreError>, tokio::task::JoinError>,
    ) -> Result<(), ConnError> {
        let Some(Open::Write { name, bytes, .. }) = self.open.get_mut(&chunk.transfer_id) else {
            unreachable!("a transfer stays open while a chunk of it is written")
        };
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(fatal(e.code(), format!("{name}: {e}"))),
            Err(e) => return Err(fatal(ErrorCode::Io, format!("{name}: disk task: {e}"))),
        }
        *bytes += u64::from(chunk.len);
        self.shared.metrics.bytes_received.add(u64::from(chunk.len));
        self.writer.send(&Frame::Ack(chunk)).await?;
        Ok(())
    }

    async fn commit(&mut self, c: Commit) -> Result<(), ConnError> {
        let id = c.transfer_id;
        let Some(Open::Write {
            lease, name, mode, ..
        }) = self.open.get(&id)
        else {
            unreachable!("the session checked the transfer id")
        };
        let partial = Arc::clone(&lease.partial);
        let name = name.clone();
        let expected = match <[u8; DIGEST_LEN]>::try_from(c.digest.as_slice()) {
            Ok(d) => Some(d),
            Err(_) if c.digest.is_empty() => None,
            Err(_) => return Err(fatal(ErrorCode::Protocol, "Commit digest is not 16 bytes")),
        };
        let digest = match partial
            .commit(*mode, partial.identity().mtime_ns, expected)
            .await
        {
            Ok(digest) => digest,
            Err(e) => {
                warn!(name = %name, error = %e, "commit failed");
                if matches!(e, CoreError::Corrupt(_)) {
                    self.shared.metrics.uploads.failed.inc();
                    // The partial is gone: forget the upload so the next attempt opens it anew.
                    if let Some(Open::Write { lease, .. }) = self.open.remove(&id) {
                        lease.retire();
                    }
                    self.session.closed(id);
                }
                return self.reply_error(e.code(), e.to_string()).await;
            }
        };
        let Some(Open::Write {
            lease, crc_retries, ..
        }) = self.open.remove(&id)
        else {
            unreachable!("checked above")
        };
        self.session.closed(id);
        lease.retire();
        self.shared.metrics.uploads.completed.inc();
        let size = partial.identity().size;
        let seconds = lease.started.elapsed().as_secs_f64();
        let moved = size - partial.resumed_bytes();
        info!(
            name = %name,
            size,
            peer = %self.peer,
            seconds = format_args!("{seconds:.3}"),
            mib_per_sec = format_args!("{:.1}", moved as f64 / seconds.max(1e-9) / 1048576.0),
            resumed_bytes = partial.resumed_bytes(),
            crc_retries,
            "upload complete"
        );
        let reply = Commit {
            transfer_id: id,
            digest: digest.to_vec(),
        };
        self.writer.send(&Frame::Committed(reply)).await?;
        Ok(())
    }

    async fn open_read(&mut self, req: OpenRead) -> Result<(), ConnError> {
        let (root, name) = (self.root(), req.name.clone());
        let source = match blocking(move || SourceFile::new(root.open_read(&name)?, name)).await {
            Ok(source) => source,
            Err(e) => {
                info!(name = %req.name, error = %e, "download refused");
                return self.reply_error(e.code(), e.to_string()).await;
            }
        };
        let identity = source.identity();
        let id = self.session.opened(TransferKind::Download, identity.size);
        let resumed: u64 = if req.have_identity == Some(identity) {
            req.have.iter().map(ByteRange::len).sum()
        } else {
            0
        };
        info!(name = %req.name, size = identity.size, resumed_bytes = resumed, transfer_id = id, "download opened");
        self.shared
            .downloads
            .opened(self.peer, &req.name, identity, resumed);
        let mode = source.mode();
        self.open.insert(
            id,
            Open::Read {
                source,
                name: req.name,
                bytes: 0,
            },
        );
        self.writer
            .send(&Frame::ReadOpened(ReadOpened {
                transfer_id: id,
                identity,
                mode,
            }))
            .await?;
        Ok(())
    }

    async fn read_chunk(&mut self, chunk: ChunkRef) -> Result<(), ConnError> {
        let Some(Open::Read { source, bytes, .. }) = self.open.get_mut(&chunk.transfer_id) else {
            unreachable!("the session checked the transfer id")
        };
        let range = ByteRange::new(chunk.offset, chunk.offset + u64::from(chunk.len));
        // The chunk is read only into bytes reserved from the daemon's budget; meanwhile this
        // connection reads no further requests.
        let reservation = self.shared.budget.reserve(chunk.len as usize).await;
        let payload = match source.check_unchanged() {
            Ok(()) => source.read_reserved(range, reservation).await,
            Err(e) => Err(e),
        };
        let payload = payload.map_err(|e: CoreError| fatal(e.code(), e.to_string()))?;
        *bytes += payload.len() as u64;
        self.shared.metrics.bytes_sent.add(payload.len() as u64);
        let data = Frame::Data(Data::new(chunk.transfer_id, chunk.offset, payload));
        // A client that stops reading holds this chunk's share of the budget: not forever.
        let idle = self.shared.config.idle_timeout;
        match timeout(idle, self.writer.send(&data)).await {
            Ok(sent) => Ok(sent?),
            Err(_) => Err(ConnError::Proto(ProtoError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("client read nothing for {idle:?}"),
            )))),
        }
    }

    async fn digest(&mut self, id: u64) -> Result<(), ConnError> {
        let Some(Open::Read { source, name, .. }) = self.open.get(&id) else {
            unreachable!("the session checked the transfer id")
        };
        let digest = match source.check_unchanged() {
            Ok(()) => source.digest().await,
            Err(e) => Err(e),
        };
        let digest = digest.map_err(|e| fatal(e.code(), e.to_string()))?;
        self.shared
            .downloads
            .digest_served(self.peer, name, source.identity());
        let reply = Commit {
            transfer_id: id,
            digest: digest.to_vec(),
        };
        self.writer.send(&Frame::DigestReply(reply)).await?;
        Ok(())
    }

    async fn list_tree(&mut self, req: ListTree) -> Result<(), ConnError> {
        let root = self.root();
        let dir = req.dir.clone();
        let entries = match blocking(move || root.walk(&dir, req.digests)).await {
            Ok(entries) => entries,
            Err(e) => return self.reply_error(e.code(), e.to_string()).await,
        };
        // Pages bounded by count and by bytes, so each stays far below the control-frame limit.
        let mut page = Vec::new();
        let mut page_bytes = 0;
        let total = entries.len();
        for (i, entry) in entries.into_iter().enumerate() {
            page_bytes += 64 + entry.path.len() + entry.target.len();
            page.push(entry);
            if page.len() == MAX_LISTING_ENTRIES || page_bytes > 1 << 20 || i + 1 == total {
                let more = i + 1 < total;
                let entries = std::mem::take(&mut page);
                page_bytes = 0;
                self.writer
                    .send(&Frame::TreeListing(TreeListing { entries, more }))
                    .await?;
            }
        }
        Ok(())
    }

    /// Runs one tree operation that changes the root, answering `Done` or an error.
    async fn tree_op(
        &mut self,
        name: String,
        op: impl FnOnce(&xfer_core::Root) -> xfer_core::Result<()> + Send + 'static,
    ) -> Result<(), ConnError> {
        if self.shared.config.read_only {
            return self
                .reply_error(ErrorCode::ReadOnly, READ_ONLY.into())
                .await;
        }
        if self.shared.registry.is_open(&name) {
            let message = format!("{name} is being uploaded by another client");
            return self.reply_error(ErrorCode::InUse, message).await;
        }
        let root = self.root();
        match blocking(move || op(&root)).await {
            Ok(()) => Ok(self.writer.send(&Frame::Done(Done { name })).await?),
            Err(e) => {
                info!(name = %name, error = %e, "tree request refused");
                self.reply_error(e.code(), e.to_string()).await
            }
        }
    }

    /// Stores `first` and the small files pipelined behind it that are already buffered, in one
    /// trip to the blocking pool, and answers them with one write: per file, the cost is the
    /// filesystem's alone. Each is answered (`Done` or a request-level error) in order.
    async fn put_files(&mut self, first: PutFile) -> Result<(), ConnError> {
        let mut batch = self.gather(
            first,
            |r| r.data.len(),
            |request| match request {
                Request::PutFile(req) => Ok(req),
                other => Err(Box::new(other)),
            },
        )?;
        // Bit errors in a control frame: the stream can no longer be trusted. The files before
        // it are stored and answered; the connection ends there.
        let mut end = None;
        if let Some(bad) = batch
            .iter()
            .position(|r| crc32fast::hash(&r.data) != r.crc32)
        {
            let message = format!("{}: data failed its CRC", batch[bad].name);
            end = Some(fatal(ErrorCode::BadCrc, message));
            batch.truncate(bad);
        }
        let outcomes: Vec<StoreOutcome> = if self.shared.config.read_only {
            let refusal = || Err((ErrorCode::ReadOnly, READ_ONLY.to_string()));
            batch.into_iter().map(|r| (r.name, refusal())).collect()
        } else {
            let (root, shared) = (self.root(), Arc::clone(&self.shared));
            blocking(move || Ok(store_small_files(&root, &shared, batch)))
                .await
                .unwrap_or_else(|e: CoreError| {
                    vec![(String::new(), Err((e.code(), e.to_string())))]
                })
        };
        let mut replies = Vec::with_capacity(outcomes.len());
        for (name, outcome) in outcomes {
            match outcome {
                Ok(()) => replies.push(Frame::Done(Done { name })),
                Err((code, message)) if code.is_request_level() => {
                    info!(name = %name, error = %message, "tree request refused");
                    replies.push(Frame::Error(ErrorFrame::new(code, message)));
                }
                Err((code, message)) => {
                    end = Some(fatal(code, message));
                    break;
                }
            }
        }
        self.writer.send_all(&replies).await?;
        end.map_or(Ok(()), Err)
    }

    /// Reads `first` and the `GetFile`s pipelined behind it that are already buffered, in one
    /// trip to the blocking pool per 8 MiB of answers, and answers them in order with one write.
    async fn get_files(&mut self, first: GetFile) -> Result<(), ConnError> {
        let mut batch = VecDeque::from(self.gather(
            first,
            |_| 0,
            |request| match request {
                Request::GetFile(req) => Ok(req),
                other => Err(Box::new(other)),
            },
        )?);
        while !batch.is_empty() {
            let root = self.root();
            // The answers are held in bytes reserved from the daemon's budget until sent.
            let most: u64 = batch
                .iter()
                .map(|r| u64::from(r.max_size).min(MAX_SMALL_FILE))
                .sum();
            let most = most.min((BATCH_BYTES as u64) + MAX_SMALL_FILE);
            let reservation = self.shared.budget.reserve(most as usize).await;
            let (replies, rest, end) = blocking(move || Ok(read_small_files(&root, batch)))
                .await
                .map_err(|e| fatal(e.code(), e.to_string()))?;
            batch = rest;
            self.writer.send_all(&replies).await?;
            drop(replies);
            drop(reservation);
            if let Some(e) = end {
                return Err(ConnError::Fatal(e));
            }
        }
        Ok(())
    }

    /// `first` and the requests of its kind already buffered behind it, up to
    /// `BATCH_FILES` of them and `BATCH_BYTES` as `size` counts; a request of another
    /// kind read meanwhile is kept to be handled next.
    fn gather<T>(
        &mut self,
        first: T,
        size: impl Fn(&T) -> usize,
        pick: impl Fn(Request) -> Result<T, Box<Request>>,
    ) -> Result<Vec<T>, ConnError> {
        let mut bytes = size(&first);
        let mut batch = vec![first];
        while batch.len() < BATCH_FILES && bytes < BATCH_BYTES {
            let Some(frame) = self.reader.buffered_frame()? else {
                break;
            };
            match pick(self.session.handle_frame(frame)?) {
                Ok(req) => {
                    bytes += size(&req);
                    batch.push(req);
                }
                Err(other) => {
                    self.pending = Some(*other);
                    break;
                }
            }
        }
        Ok(batch)
    }

    /// Pushes a file or tree to another daemon as its client, reporting progress to ours.
    async fn copy_to(&mut self, req: CopyTo) -> Result<(), ConnError> {
        let destination = xfer::Target {
            host: req.host.clone(),
            port: req.port,
        };
        info!(source = %req.source, destination = %destination, dest = %req.dest, "copy started");
        let progress = indicatif::ProgressBar::hidden();
        let (grant, key) = match req.grant {
            Some((grant, key)) => (Some(grant), Some(key.into())),
            None => (None, None),
        };
        let tls = if req.tls {
            match copy_trust(self.shared.config.copy_trust.clone()).await {
                Ok(connector) => Some(connector),
                Err(e) => {
                    warn!(destination = %destination, error = %e, "copy failed");
                    return self
                        .reply_error(ErrorCode::Io, format!("copy to {destination} failed: {e}"))
                        .await;
                }
            }
        } else {
            None
        };
        let opts = xfer::Options {
            connections: xfer::Connections::Fixed(req.connections.clamp(1, 64) as usize),
            chunk_size: req
                .chunk_size
                .clamp(xfer_proto::MIN_CHUNK_SIZE, xfer_proto::MAX_CHUNK_SIZE),
            bwlimit: None,
            retry_deadline: std::time::Duration::from_secs(60),
            progress: progress.clone(),
            connector: xfer::Connector {
                token: key,
                tls,
                grant,
                // This daemon's own settings: its copies are its connections.
                socket: self.shared.config.socket.clone(),
                meter: None,
            },
        };
        let root = self.root();
        let (source, dest, recursive) = (req.source, req.dest, req.recursive);
        let target = destination.clone();
        let mut task = tokio::spawn(async move {
            if recursive {
                let sub = blocking({
                    let (root, source) = (root.clone(), source.clone());
                    move || root.subroot(&source)
                })
                .await?;
                let s = xfer::send_tree_from(sub, &target, &dest, &opts, false).await?;
                Ok::<_, xfer::ClientError>(CopyDone {
                    files_total: s.files_total,
                    files_transferred: s.files_transferred,
                    files_skipped: s.files_skipped,
                    bytes_total: s.bytes_total,
                    bytes_transferred: s.bytes_transferred,
                    resumed_bytes: s.resumed_bytes,
                    millis: (s.seconds * 1000.0) as u64,
                })
            } else {
                let file =
                    blocking(move || SourceFile::new(root.open_read(&source)?, source)).await?;
                let s = xfer::send_file(file, &target, &dest, &opts).await?;
                Ok(CopyDone {
                    files_total: 1,
                    files_transferred: 1,
                    files_skipped: 0,
                    bytes_total: s.bytes_total,
                    bytes_transferred: s.bytes_transferred,
                    resumed_bytes: s.resumed_bytes,
                    millis: (s.seconds * 1000.0) as u64,
                })
            }
        });
        let shutdown = self.shared.shutdown.clone();
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(250));
        let outcome = loop {
            tokio::select! {
                outcome = &mut task => break outcome,
                () = shutdown.cancelled() => {
                    task.abort();
                    return Err(fatal(ErrorCode::ShuttingDown, "server shutting down; rerun the copy to resume"));
                }
                _ = tick.tick() => {
                    let p = Progress { bytes_done: progress.position(), bytes_total: progress.length().unwrap_or(0) };
                    if let Err(e) = self.writer.send(&Frame::Progress(p)).await {
                        // The client is gone: nobody would learn how the copy ends.
                        task.abort();
                        return Err(e.into());
                    }
                }
            }
        };
        match outcome {
            Ok(Ok(done)) => {
                info!(destination = %destination, bytes = done.bytes_transferred, millis = done.millis, "copy complete");
                Ok(self.writer.send(&Frame::CopyDone(done)).await?)
            }
            Ok(Err(e)) => {
                warn!(destination = %destination, error = %e, "copy failed");
                let code = match &e {
                    xfer::ClientError::Local(c) if c.code().is_request_level() => c.code(),
                    _ => ErrorCode::Io,
                };
                // The destination's certificate was checked here, against this daemon's trust
                // anchors, not the client's: say which, or the client's --ca looks to blame.
                let hint = match &e {
                    xfer::ClientError::Tls(_) => {
                        " (the source daemon trusts the CAs of its copy_ca, or else the system's)"
                    }
                    _ => "",
                };
                self.reply_error(code, format!("copy to {destination} failed: {e}{hint}"))
                    .await
            }
            Err(e) => Err(fatal(ErrorCode::Io, format!("copy task failed: {e}"))),
        }
    }

    async fn sync(&mut self) -> Result<(), ConnError> {
        let root = self.root();
        blocking(move || root.sync())
            .await
            .map_err(|e| fatal(e.code(), e.to_string()))?;
        Ok(self
            .writer
            .send(&Frame::Done(Done {
                name: String::new(),
            }))
            .await?)
    }

    async fn list(&mut self, dir: &str) -> Result<(), ConnError> {
        let (root, dir) = (self.root(), dir.to_string());
        let entries = match blocking(move || root.list(&dir)).await {
            Ok(entries) => entries,
            Err(e) => return self.reply_error(e.code(), e.to_string()).await,
        };
        // Names are at most 255 bytes, so a page of MAX_LISTING_ENTRIES stays far below the
        // control-frame limit.
        let mut pages = entries.chunks(MAX_LISTING_ENTRIES).peekable();
        if pages.peek().is_none() {
            return Ok(self
                .writer
                .send(&Frame::Listing(Listing {
                    entries: vec![],
                    more: false,
                }))
                .await?);
        }
        while let Some(page) = pages.next() {
            let more = pages.peek().is_some();
            self.writer
                .send(&Frame::Listing(Listing {
                    entries: page.to_vec(),
                    more,
                }))
                .await?;
        }
        Ok(())
    }

    /// Tells the download log that this connection's downloads ended (`clean`: with `Goodbye`).
    fn end_downloads(&self, clean: bool) {
        for open in self.open.values() {
            if let Open::Read {
                source,
                name,
                bytes,
                ..
            } = open
            {
                let identity = source.identity();
                self.shared
                    .downloads
                    .closed(self.peer, name, identity, *bytes, clean);
            }
        }
    }

    fn log_abandoned(&self) {
        for open in self.open.values() {
            match open {
                Open::Write {
                    lease, name, bytes, ..
                } => info!(
                    name = %name,
                    received = bytes,
                    held = lease.partial.held_bytes(),
                    size = lease.partial.identity().size,
                    "upload interrupted; resumable"
                ),
                Open::Read { name, bytes, .. } => {
                    info!(name = %name, sent = bytes, "download interrupted")
                }
            }
        }
    }
}

/// Sends a last error frame, then closes without resetting the connection: the write side is
/// shut first and unread input is drained briefly, so the peer gets to read the frame.
/// Small files a connection stores or reads in one trip to the blocking pool, at most.
const BATCH_FILES: usize = 64;
/// File bytes in one such batch, at most (beyond the file that starts it).
const BATCH_BYTES: usize = 8 << 20;
const READ_ONLY: &str = "read-only server: uploads are disabled";

/// Reads the small files `batch` asks for, in order, until the answers hold `BATCH_BYTES`;
/// returns the answers (`FileData` or a request-level error each), the requests left, and an
/// error that ends the connection (only errors about one request leave it usable).
fn read_small_files(
    root: &xfer_core::Root,
    mut batch: VecDeque<GetFile>,
) -> (Vec<Frame>, VecDeque<GetFile>, Option<ErrorFrame>) {
    let mut replies = Vec::with_capacity(batch.len());
    let mut bytes = 0;
    while bytes < BATCH_BYTES {
        let Some(req) = batch.pop_front() else { break };
        let max = u64::from(req.max_size).min(MAX_SMALL_FILE);
        replies.push(match root.read_small(&req.name, max) {
            Ok((identity, mode, data)) => {
                bytes += data.len();
                Frame::FileData(FileData {
                    identity,
                    mode,
                    crc32: crc32fast::hash(&data),
                    data,
                })
            }
            Err(e) if e.code().is_request_level() => {
                Frame::Error(ErrorFrame::new(e.code(), e.to_string()))
            }
            Err(e) => {
                return (
                    replies,
                    VecDeque::new(),
                    Some(ErrorFrame::new(e.code(), e.to_string())),
                )
            }
        });
    }
    (replies, batch, None)
}

/// A stored file's name, and the error it got if any.
type StoreOutcome = (String, Result<(), (ErrorCode, String)>);

/// Stores a batch of small files in order, stopping at the first error that ends the connection
/// (request-level errors, such as a directory in the way, do not stop it).
fn store_small_files(
    root: &xfer_core::Root,
    shared: &Shared,
    batch: Vec<PutFile>,
) -> Vec<StoreOutcome> {
    let mut dirs = xfer_core::DirCache::default();
    let mut outcomes = Vec::with_capacity(batch.len());
    for req in batch {
        let outcome = if shared.registry.is_open(&req.name) {
            let message = format!("{} is being uploaded by another client", req.name);
            Err((ErrorCode::InUse, message))
        } else {
            root.put_file(&mut dirs, &req.name, req.mtime_ns, req.mode, &req.data)
                .map_err(|e| (e.code(), e.to_string()))
        };
        let fatal = outcome
            .as_ref()
            .is_err_and(|(code, _)| !code.is_request_level());
        outcomes.push((req.name, outcome));
        if fatal {
            break;
        }
    }
    outcomes
}

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

/// The trust anchors for a copy over TLS: `copy_ca`'s, or the system's, read off the runtime.
async fn copy_trust(
    configured: Option<crate::CopyTrust>,
) -> Result<tokio_rustls::TlsConnector, xfer::ClientError> {
    if let Some(trust) = configured {
        return Ok(trust.0);
    }
    tokio::task::spawn_blocking(|| xfer::Connector::tls_trusting(None, crate::CopyTrust::FIX))
        .await
        .map_err(|e| xfer::ClientError::Target(format!("loading the system's CAs: {e}")))?
}
