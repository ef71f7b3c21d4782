//! [`Handler`]: one client connection, from `Hello` to close. A failure here ends this connection
//! only; the listener and every other connection carry on.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tracing::{debug, info, warn};
use xfer_core::{CoreError, FrameReader, FrameWriter, SourceFile};
use xfer_proto::{
    ByteRange, ChunkRef, Commit, Data, ErrorCode, ErrorFrame, Frame, Hello, Listing, OpenRead,
    OpenWrite, ProtoError, ReadOpened, Welcome, WriteOpened, MAX_LISTING_ENTRIES, PROTOCOL_VERSION,
};

use crate::registry::{blocking, Lease};
use crate::Shared;

/// Most transfers one connection may have open at once.
const MAX_OPEN_PER_CONNECTION: usize = 64;
const AGENT: &str = concat!("xferd/", env!("CARGO_PKG_VERSION"));

/// Why a connection ended early. Each variant is logged once, where the connection ends.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("{0}")]
    Proto(#[from] ProtoError),
    #[error("{}", .0)]
    Fatal(ErrorFrame),
    #[error("client disconnected without Goodbye")]
    PeerClosed,
}

fn fatal(code: ErrorCode, message: impl Into<String>) -> ConnError {
    ConnError::Fatal(ErrorFrame::new(code, message))
}

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

/// State of one connection after the handshake.
pub(crate) struct Handler {
    shared: Arc<Shared>,
    peer: SocketAddr,
    reader: FrameReader<OwnedReadHalf>,
    writer: FrameWriter<OwnedWriteHalf>,
    open: HashMap<u64, Open>,
    next_id: u64,
}

/// Serves one connection to its end; logs how it ended.
#[tracing::instrument(name = "conn", skip_all, fields(peer = %peer))]
pub(crate) async fn serve(shared: Arc<Shared>, socket: TcpStream, peer: SocketAddr) {
    let _ = socket.set_nodelay(true);
    let (read, write) = socket.into_split();
    let mut handler = Handler {
        shared,
        peer,
        reader: FrameReader::new(read),
        writer: FrameWriter::new(write),
        open: HashMap::new(),
        next_id: 1,
    };
    match handler.run().await {
        Ok(()) => {
            debug!("connection closed");
            return;
        }
        Err(err) => {
            let frame = match &err {
                ConnError::Proto(ProtoError::Io(_)) | ConnError::PeerClosed => None,
                ConnError::Proto(e) => Some(ErrorFrame::new(e.code(), e.to_string())),
                ConnError::Fatal(f) => Some(f.clone()),
            };
            match frame.as_ref().and_then(|f| f.error_code()) {
                Some(ErrorCode::Busy | ErrorCode::ShuttingDown) => {
                    info!(error = %err, "connection refused")
                }
                _ => warn!(error = %err, "connection ended with an error"),
            }
            if let Some(frame) = frame {
                close_with(&mut handler.reader, &mut handler.writer, frame).await;
            }
        }
    }
    handler.log_abandoned();
}

/// Tells a client it is over a limit, without reading its handshake, and closes.
pub(crate) async fn refuse_busy(socket: TcpStream, peer: SocketAddr, why: &str) {
    info!(%peer, "connection refused: {why}");
    let (read, write) = socket.into_split();
    let frame = ErrorFrame::new(ErrorCode::Busy, format!("server busy: {why}"));
    close_with(
        &mut FrameReader::new(read),
        &mut FrameWriter::new(write),
        frame,
    )
    .await;
}

impl Handler {
    async fn run(&mut self) -> Result<(), ConnError> {
        let shared = Arc::clone(&self.shared);
        let cfg = &shared.config;
        let hello = match timeout(cfg.handshake_timeout, self.reader.read_frame()).await {
            Err(_) => {
                return Err(fatal(
                    ErrorCode::Protocol,
                    "no Hello within the handshake timeout",
                ))
            }
            Ok(Ok(None)) => return Ok(()),
            Ok(Ok(Some(Frame::Hello(hello)))) => hello,
            Ok(Ok(Some(other))) => {
                return Err(fatal(
                    ErrorCode::Protocol,
                    format!("expected Hello, got {}", other.frame_type().name()),
                ))
            }
            Ok(Err(e)) => return Err(e.into()),
        };
        let version = negotiate(&hello)?;
        // Wait for a stream slot, but not forever, and not past shutdown.
        let shutdown = self.shared.shutdown.clone();
        let _permit = tokio::select! {
            permit = timeout(cfg.queue_timeout, Arc::clone(&self.shared.streams).acquire_owned()) => match permit {
                Ok(Ok(permit)) => permit,
                _ => return Err(fatal(
                    ErrorCode::Busy,
                    format!("server busy: all {} streams in use for {:?}; try again later", cfg.max_streams, cfg.queue_timeout),
                )),
            },
            () = shutdown.cancelled() => return Err(fatal(ErrorCode::ShuttingDown, "server shutting down")),
        };
        self.writer
            .send(&Frame::Welcome(Welcome {
                version,
                capabilities: 0,
                max_chunk_size: cfg.chunk_size,
                window: cfg.window,
                agent: AGENT.into(),
            }))
            .await?;
        debug!(agent = %hello.agent, "handshake done");
        loop {
            let frame = tokio::select! {
                biased;
                () = shutdown.cancelled() => return Err(fatal(ErrorCode::ShuttingDown, "server shutting down; rerun to resume")),
                frame = timeout(cfg.idle_timeout, self.reader.read_frame()) => match frame {
                    Err(_) => return Err(fatal(ErrorCode::Protocol, format!("idle for {:?}", cfg.idle_timeout))),
                    Ok(frame) => frame?,
                },
            };
            let Some(frame) = frame else {
                return Err(ConnError::PeerClosed);
            };
            // Frames are handled to completion: shutdown is only noticed between frames, so a
            // chunk is either written and acknowledged or not acknowledged at all.
            match frame {
                Frame::OpenWrite(req) => self.open_write(req).await?,
                Frame::Data(data) => self.data(data).await?,
                Frame::Commit(c) => self.commit(c).await?,
                Frame::OpenRead(req) => self.open_read(req).await?,
                Frame::ReadChunk(chunk) => self.read_chunk(chunk).await?,
                Frame::List(list) => self.list(&list.dir).await?,
                Frame::Goodbye => return Ok(()),
                other => {
                    return Err(fatal(
                        ErrorCode::Protocol,
                        format!(
                            "unexpected {} frame from a client",
                            other.frame_type().name()
                        ),
                    ))
                }
            }
        }
    }

    async fn reply_error(&mut self, code: ErrorCode, message: String) -> Result<(), ConnError> {
        self.writer
            .send(&Frame::Error(ErrorFrame {
                code: code as u16,
                message,
            }))
            .await?;
        Ok(())
    }

    fn new_id(&mut self) -> Result<u64, ConnError> {
        if self.open.len() >= MAX_OPEN_PER_CONNECTION {
            return Err(fatal(
                ErrorCode::TooLarge,
                "too many transfers open on one connection",
            ));
        }
        self.next_id += 1;
        Ok(self.next_id - 1)
    }

    async fn open_write(&mut self, req: OpenWrite) -> Result<(), ConnError> {
        if self.shared.config.read_only {
            return self
                .reply_error(
                    ErrorCode::ReadOnly,
                    "read-only server: uploads are disabled".into(),
                )
                .await;
        }
        if req.chunk_size > self.shared.config.chunk_size {
            return self
                .reply_error(
                    ErrorCode::TooLarge,
                    format!(
                        "chunk size {} above the limit {}",
                        req.chunk_size, self.shared.config.chunk_size
                    ),
                )
                .await;
        }
        let lease = match self
            .shared
            .registry
            .open(&self.shared.config.root, &req.name, req.identity)
            .await
        {
            Ok(lease) => lease,
            Err(e) => {
                info!(name = %req.name, error = %e, "upload refused");
                return self.reply_error(e.code(), e.to_string()).await;
            }
        };
        let id = self.new_id()?;
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
        let Some(Open::Write {
            lease,
            name,
            crc_retries,
            bytes,
            ..
        }) = self.open.get_mut(&data.transfer_id)
        else {
            return Err(fatal(
                ErrorCode::Protocol,
                format!("Data for unknown upload {}", data.transfer_id),
            ));
        };
        let chunk = ChunkRef {
            transfer_id: data.transfer_id,
            offset: data.offset,
            len: data.payload.len() as u32,
        };
        if data.verify().is_err() {
            *crc_retries += 1;
            warn!(name = %name, offset = data.offset, "chunk failed its CRC; asked again");
            self.writer.send(&Frame::Reject(chunk)).await?;
            return Ok(());
        }
        if let Err(e) = lease
            .partial
            .write(data.offset, data.payload, data.crc32)
            .await
        {
            let code = match e {
                CoreError::BadPath(_) => ErrorCode::Protocol,
                ref e => e.code(),
            };
            return Err(fatal(code, format!("{name}: {e}")));
        }
        *bytes += u64::from(chunk.len);
        self.writer.send(&Frame::Ack(chunk)).await?;
        Ok(())
    }

    async fn commit(&mut self, c: Commit) -> Result<(), ConnError> {
        let Some(Open::Write {
            lease, name, mode, ..
        }) = self.open.get(&c.transfer_id)
        else {
            return Err(fatal(
                ErrorCode::Protocol,
                format!("Commit for unknown upload {}", c.transfer_id),
            ));
        };
        let partial = Arc::clone(&lease.partial);
        let name = name.clone();
        if let Err(e) = partial.commit(*mode, partial.identity().mtime_ns).await {
            warn!(name = %name, error = %e, "commit failed");
            return self.reply_error(e.code(), e.to_string()).await;
        }
        let Some(Open::Write {
            lease, crc_retries, ..
        }) = self.open.remove(&c.transfer_id)
        else {
            unreachable!("checked above")
        };
        lease.retire();
        let size = partial.identity().size;
        let seconds = lease.started.elapsed().as_secs_f64();
        info!(
            name = %name,
            size,
            peer = %self.peer,
            seconds = format_args!("{seconds:.3}"),
            mib_per_sec = format_args!("{:.1}", (size - partial.resumed_bytes()) as f64 / seconds.max(1e-9) / 1048576.0),
            resumed_bytes = partial.resumed_bytes(),
            crc_retries,
            "upload complete"
        );
        self.writer.send(&Frame::Committed(c)).await?;
        Ok(())
    }

    async fn open_read(&mut self, req: OpenRead) -> Result<(), ConnError> {
        let (root, name) = (self.shared.config.root.clone(), req.name.clone());
        let opened = blocking(move || SourceFile::new(root.open_read(&name)?, name)).await;
        let source = match opened {
            Ok(source) => source,
            Err(e) => {
                info!(name = %req.name, error = %e, "download refused");
                return self.reply_error(e.code(), e.to_string()).await;
            }
        };
        let id = self.new_id()?;
        let identity = source.identity();
        let resumed: u64 = if req.have_identity == Some(identity) {
            req.have.iter().map(ByteRange::len).sum()
        } else {
            0
        };
        info!(name = %req.name, size = identity.size, resumed_bytes = resumed, transfer_id = id, "download opened");
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
        let max = self.shared.config.chunk_size;
        let Some(Open::Read {
            source,
            name,
            bytes,
        }) = self.open.get_mut(&chunk.transfer_id)
        else {
            return Err(fatal(
                ErrorCode::Protocol,
                format!("ReadChunk for unknown download {}", chunk.transfer_id),
            ));
        };
        let range = ByteRange::new(
            chunk.offset,
            chunk.offset.saturating_add(u64::from(chunk.len)),
        );
        if chunk.len > max || range.end > source.identity().size {
            return Err(fatal(
                ErrorCode::Protocol,
                format!(
                    "ReadChunk {}+{} outside {name} or above the chunk limit {max}",
                    chunk.offset, chunk.len
                ),
            ));
        }
        let payload = match source.check_unchanged() {
            Ok(()) => source.read(range).await,
            Err(e) => Err(e),
        };
        let payload = payload.map_err(|e| fatal(e.code(), e.to_string()))?;
        *bytes += payload.len() as u64;
        let data = Data::new(chunk.transfer_id, chunk.offset, payload);
        self.writer.send(&Frame::Data(data)).await?;
        Ok(())
    }

    async fn list(&mut self, dir: &str) -> Result<(), ConnError> {
        let root = self.shared.config.root.clone();
        let dir_owned = dir.to_string();
        let listed = tokio::task::spawn_blocking(move || root.list(&dir_owned))
            .await
            .map_err(|e| fatal(ErrorCode::Io, e.to_string()))?;
        let entries = match listed {
            Ok(entries) => entries,
            Err(e) => return self.reply_error(e.code(), e.to_string()).await,
        };
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
                    "upload left open by this connection; resumable"
                ),
                Open::Read { name, bytes, .. } => {
                    debug!(name = %name, sent = bytes, "download closed")
                }
            }
        }
    }
}

/// Sends a last error frame, then closes without resetting the connection: the write side is
/// shut first and unread input is drained briefly, so the peer gets to read the frame.
async fn close_with(
    reader: &mut FrameReader<OwnedReadHalf>,
    writer: &mut FrameWriter<OwnedWriteHalf>,
    frame: ErrorFrame,
) {
    let _ = timeout(std::time::Duration::from_secs(2), async {
        writer.send(&Frame::Error(frame)).await?;
        writer.shutdown().await?;
        let mut sink = [0u8; 16 * 1024];
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

fn negotiate(hello: &Hello) -> Result<u16, ConnError> {
    let version = hello.version.min(PROTOCOL_VERSION);
    if version < hello.min_version.max(1) {
        return Err(fatal(
            ErrorCode::Version,
            format!(
                "client speaks versions {}..={}, this daemon speaks 1..={PROTOCOL_VERSION}",
                hello.min_version, hello.version
            ),
        ));
    }
    Ok(version)
}
