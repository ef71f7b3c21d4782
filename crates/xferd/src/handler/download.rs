//! Downloads: `OpenRead`, `ReadChunk` and `DigestRequest`.

use tracing::info;
use xfer_core::{CoreError, SourceFile};
use xfer_proto::session::DownloadId;
use xfer_proto::{
    ByteRange, ChunkRef, DigestReply, Frame, OpenRead, ProtoError, ReadOpened, ReadOpenedSparse,
};

use super::{fatal, ConnError, Download, Handler};
use crate::registry::blocking;

impl Handler {
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
        // A client that stops reading holds this chunk's share of the budget: not forever.
        let idle = self.shared.config.idle_timeout;
        match tokio::time::timeout(idle, self.writer.send(&data)).await {
            Ok(sent) => Ok(sent?),
            Err(_) => Err(ConnError::Proto(ProtoError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("client read nothing for {idle:?}"),
            )))),
        }
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
