//! Delta uploads (`CAP_DELTA`): `DeltaOpen` indexes the file held under the upload's name,
//! and each `DeltaSig` copies the chunks that file still holds into the partial, recorded in
//! the journal like received chunks, so an interrupted delta resumes from what was copied.
//! For a download, `ReadSig` cuts the chunks of the file served, for the client to match.

use std::sync::Arc;

use futures_util::stream::{self, StreamExt};
use tracing::info;
use xfer_core::delta::{self, groups, Index, Piece};
use xfer_core::CoreError;
use xfer_proto::session::{DownloadId, UploadId};
use xfer_proto::{
    ByteRange, DeltaAgreed, DeltaIndex, DeltaMatch, DeltaSig, ErrorCode, Frame, ReadSig,
    MAX_DELTA_CHUNKS, MAX_RANGES,
};

use super::{fatal, ConnError, Download, Handler, Upload};
use crate::registry::blocking;

/// Groups of basis bytes one `DeltaSig` copies at once: enough to keep the cores and the disk
/// busy, each group holding at most `delta::MAX_COPY` bytes of the memory budget.
const MAX_PARALLEL_COPIES: usize = 4;

impl Handler {
    pub(super) async fn delta_open(&mut self, id: UploadId) -> Result<(), ConnError> {
        let Upload { lease, name, .. } = self.session.upload(id)?;
        let (new_size, name) = (lease.partial.identity().size, name.clone());
        let root = self.root();
        let basis = name.clone();
        let built = blocking(move || {
            let file = root.open_read(&basis)?;
            let (identity, _) = xfer_core::source::identity_of(&file)
                .map_err(|e| CoreError::io(format!("reading {basis}"), e))?;
            let avg = delta::avg_chunk(identity.size.max(new_size));
            Index::build(file, avg, delta::parallelism())
                .map_err(|e| CoreError::io(format!("indexing {basis}"), e))
        })
        .await;
        let index = match built {
            Ok(index) => Arc::new(index),
            Err(e) => {
                info!(name = %name, error = %e, "no basis for a delta");
                return self.reply_error(e.code(), e.to_string()).await;
            }
        };
        info!(name = %name, basis_size = index.identity().size, chunks = index.len(), "delta basis indexed");
        let reply = DeltaIndex {
            transfer_id: id.get(),
            basis: index.identity(),
            avg_chunk: index.avg_chunk(),
            chunks: index.len() as u64,
        };
        self.session.upload(id)?.basis = Some(index);
        self.writer.send(&Frame::DeltaIndex(reply)).await?;
        Ok(())
    }

    pub(super) async fn delta_resume(&mut self, id: UploadId) -> Result<(), ConnError> {
        let Upload { lease, .. } = self.session.upload(id)?;
        let mut agreed = lease.partial.agreed();
        // Spans are few (consecutive ones merge); past the limit the rest is compared again.
        agreed.truncate(MAX_RANGES);
        self.writer
            .send(&Frame::DeltaAgreed(DeltaAgreed {
                transfer_id: id.get(),
                agreed,
            }))
            .await?;
        Ok(())
    }

    pub(super) async fn delta_sig(&mut self, id: UploadId, sig: DeltaSig) -> Result<(), ConnError> {
        let Upload {
            lease, name, basis, ..
        } = self.session.upload(id)?;
        let Some(index) = basis.clone() else {
            return Err(fatal(ErrorCode::Protocol, "DeltaSig before DeltaIndex"));
        };
        let (partial, name) = (Arc::clone(&lease.partial), name.clone());
        let pieces = index.find(sig.offset, &sig.chunks);
        let budget = &self.shared.budget;
        // Groups of at most MAX_COPY bytes are read, checked and written on several cores at
        // once, each into bytes reserved from the daemon's budget.
        let copy_group = |group: &[Piece]| {
            let len: u64 = group.iter().map(|p| u64::from(p.len)).sum();
            let (index, group) = (Arc::clone(&index), group.to_vec());
            let (partial, name) = (Arc::clone(&partial), &name);
            async move {
                let _reservation = budget.reserve(len as usize).await;
                let runs = blocking(move || {
                    index
                        .read_verified(&group)
                        .map_err(|e| CoreError::io("reading the delta basis", e))
                })
                .await
                .map_err(|e| fatal(e.code(), format!("{name}: {e}")))?;
                let mut written = Vec::with_capacity(runs.len());
                for (offset, bytes) in runs {
                    let crc = crc32fast::hash(&bytes);
                    let range = ByteRange::new(offset, offset + bytes.len() as u64);
                    partial
                        .write(offset, bytes, crc)
                        .await
                        .map_err(|e| fatal(e.code(), format!("{name}: {e}")))?;
                    written.push(range);
                }
                Ok::<_, ConnError>(written)
            }
        };
        let mut copies = stream::iter(groups(&pieces))
            .map(copy_group)
            .buffered(delta::parallelism().clamp(2, MAX_PARALLEL_COPIES));
        let mut matched: Vec<ByteRange> = Vec::new();
        let mut copied = 0;
        while let Some(written) = copies.next().await {
            for range in written? {
                copied += range.len();
                match matched.last_mut() {
                    Some(last) if last.end == range.start => last.end = range.end,
                    _ => matched.push(range),
                }
            }
        }
        drop(copies);
        // Recorded once its matched chunks are: a resumed upload sends the rest as data
        // without comparing this span again.
        let span_len: u64 = sig.chunks.iter().map(|c| u64::from(c.len)).sum();
        partial
            .agree(ByteRange::new(sig.offset, sig.offset + span_len))
            .await
            .map_err(|e| fatal(e.code(), format!("{name}: {e}")))?;
        self.shared.metrics.delta_copied.add(copied);
        self.writer
            .send(&Frame::DeltaMatch(DeltaMatch {
                transfer_id: id.get(),
                offset: sig.offset,
                matched,
            }))
            .await?;
        Ok(())
    }
}

impl Handler {
    pub(super) async fn read_sig(&mut self, id: DownloadId, req: ReadSig) -> Result<(), ConnError> {
        let Download { source, name, .. } = self.session.download(id)?;
        let name = name.clone();
        // As for ReadChunk: a file that changed since it was opened ends the download.
        source
            .check_unchanged()
            .map_err(|e| fatal(e.code(), e.to_string()))?;
        let file = source.file();
        let region = ByteRange::new(req.offset, req.end);
        let cut = blocking(move || {
            let mut chunks = Vec::new();
            delta::cut_region(&file, region, req.avg_chunk, |cut| {
                chunks.push(cut.sig());
                chunks.len() < MAX_DELTA_CHUNKS
            })
            .map(|()| chunks)
            .map_err(|e| CoreError::io("cutting the file", e))
        })
        .await
        .map_err(|e| fatal(e.code(), format!("{name}: {e}")))?;
        self.writer
            .send(&Frame::DeltaSig(DeltaSig {
                transfer_id: id.get(),
                offset: req.offset,
                chunks: cut,
            }))
            .await?;
        Ok(())
    }
}
