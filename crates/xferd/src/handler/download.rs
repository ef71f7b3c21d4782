//! Downloads: `OpenRead`, `ReadChunk` and `DigestRequest`.

use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

use tracing::info;
use xfer_core::{CoreError, SourceFile};
use xfer_proto::session::DownloadId;
use xfer_proto::{
    ByteRange, ChunkRef, DigestReply, Frame, OpenRead, PathReport, ReadOpened, ReadOpenedSparse,
};

use super::{fatal, ConnError, Download, Handler};
use crate::registry::blocking;

/// Least time between two `PathReport`s of a connection: the client's pool looks at its path
/// every 100 ms, and a chunk takes longer than that to cross a path where the report matters.
const PATH_REPORT_EVERY: Duration = Duration::from_millis(100);

impl Handler {
    /// The `PathReport` to send before the next `Data` of a download: to a client that reads
    /// them (`CAP_PATH_REPORT`), at most one per [`PATH_REPORT_EVERY`]. The client receives the
    /// data, so only this end times the queue the data waits in on the path.
    fn path_report(&mut self) -> Option<PathReport> {
        if self.session.capabilities() & xfer_proto::CAP_PATH_REPORT == 0 {
            return None;
        }
        let now = Instant::now();
        if self
            .path_reported
            .is_some_and(|at| now.duration_since(at) < PATH_REPORT_EVERY)
        {
            return None;
        }
        // SAFETY: the socket stays open while the connection's reader and writer live.
        let socket = unsafe { BorrowedFd::borrow_raw(self.socket?) };
        let sending = xfer_net::sockopt::sending(socket)?;
        self.path_reported = Some(now);
        let micros = |rtt: Option<Duration>| {
            rtt.map_or(0, |rtt| u32::try_from(rtt.as_micros()).unwrap_or(u32::MAX))
        };
        Some(PathReport {
            rtt_us: micros(sending.rtt),
            min_rtt_us: micros(sending.min_rtt),
        })
    }

    pub(super) async fn open_read(&mut self, req: OpenRead) -> Result<(), ConnError> {
        let (root, name) = (self.root(), req.name.clone());
        let source = match blocking(move || SourceFile::new(root.open_read(&name)?, name)).await {
            Ok(source) => source,
            Err(e) => {
                info!(name = %req.name, error = %e, "download refused");
                return self.reply_error(e.code(), e.to_string()).await;
            }
        };
        let identity = source.identity();
        let resumed: u64 = if req.have_identity == Some(identity) {
            req.have.iter().map(ByteRange::len).sum()
        } else {
            0
        };
        let mode = source.mode();
        // A client that knows `ReadOpenedSparse` reserves no space for the holes.
        let holes = if self.session.capabilities() & xfer_proto::CAP_TREE_META_V2 != 0 {
            let source = source.clone();
            blocking(move || source.holes()).await.unwrap_or_default()
        } else {
            Vec::new()
        };
        let download = Download {
            source,
            name: req.name.clone(),
            bytes: 0,
        };
        let id = self.session.open_download(identity.size, download).get();
        info!(name = %req.name, size = identity.size, resumed_bytes = resumed, transfer_id = id, "download opened");
        self.shared
            .downloads
            .opened(self.peer, &req.name, identity, resumed);
        let opened = ReadOpened {
            transfer_id: id,
            identity,
            mode,
        };
        let answer = if holes.is_empty() {
            Frame::ReadOpened(opened)
        } else {
            Frame::ReadOpenedSparse(ReadOpenedSparse { opened, holes })
        };
        self.writer.send(&answer).await?;
        Ok(())
    }

    pub(super) async fn read_chunk(
        &mut self,
        id: DownloadId,
        chunk: ChunkRef,
    ) -> Result<(), ConnError> {
        let keeps_meta = self.keeps_meta();
        // The chunk is read only into bytes reserved from the daemon's budget; meanwhile this
        // connection reads no further requests.
        let reservation = self.shared.budget.reserve(chunk.len as usize).await;
        let Download { source, bytes, .. } = self.session.download(id)?;
        let range = ByteRange::new(chunk.offset, chunk.offset + u64::from(chunk.len));
        // A hole of a sparse file travels as its length alone, to a client that knows `Zeros`.
        if keeps_meta && source.is_hole(range) {
            self.writer.send(&Frame::Zeros(chunk)).await?;
            return Ok(());
        }
        let payload = match source.check_unchanged() {
            Ok(()) => source.read_reserved(range, reservation).await,
            Err(e) => Err(e),
        };
        let payload = payload.map_err(|e: CoreError| fatal(e.code(), e.to_string()))?;
        *bytes += payload.len() as u64;
        self.shared.metrics.bytes_sent.add(payload.len() as u64);
        let (data, _reserved) = self.pack(chunk.transfer_id, chunk.offset, payload).await;
        let frames = match self.path_report() {
            Some(report) => vec![Frame::PathReport(report), data],
            None => vec![data],
        };
        // A client that stops reading holds this chunk's share of the budget: not forever. One
        // that reads slowly keeps it as long as the chunk takes.
        let idle = self.shared.config.idle_timeout;
        Ok(self
            .writer
            .send_all_unless_stalled(&frames, Some(idle))
            .await?)
    }

    pub(super) async fn digest(&mut self, id: DownloadId) -> Result<(), ConnError> {
        let kind = self.digest_kind();
        let Download { source, name, .. } = self.session.download(id)?;
        let digest = match source.check_unchanged() {
            Ok(()) => source.digest_as(kind).await,
            Err(e) => Err(e),
        };
        let digest = digest.map_err(|e| fatal(e.code(), e.to_string()))?;
        self.shared
            .downloads
            .digest_served(self.peer, name, source.identity());
        let reply = DigestReply {
            transfer_id: id.get(),
            digest: digest.to_vec(),
        };
        self.writer.send(&Frame::DigestReply(reply)).await?;
        Ok(())
    }
}
