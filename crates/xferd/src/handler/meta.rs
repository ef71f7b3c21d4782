//! The daemon's side of what a tree copy keeps beyond bytes (`CAP_TREE_META`): listings with
//! owners, link groups, attributes and holes; owners, attributes, mode and mtime set per entry;
//! holes of an upload recorded without being written.

use std::sync::Arc;

use tracing::info;
use xfer_proto::session::{Request, UploadId};
use xfer_proto::{
    ByteRange, ChunkRef, ErrorCode, ErrorFrame, Frame, ListTreeMeta, MetaSet,
    PackedTreeMetaListing, SetMeta, TreeMetaListing, MAX_LISTING_ENTRIES,
};

use super::{fatal, ConnError, Handler, Upload, READ_ONLY};
use crate::registry::blocking;

/// Listing bytes per page, at most (far below the control-frame limit).
const PAGE_BYTES: usize = 1 << 20;

impl Handler {
    /// True when this connection negotiated `CAP_TREE_META`.
    pub(super) fn keeps_meta(&self) -> bool {
        self.session.capabilities() & xfer_proto::CAP_TREE_META != 0
    }

    pub(super) async fn list_tree_meta(&mut self, req: ListTreeMeta) -> Result<(), ConnError> {
        let (root, started) = (self.root(), std::time::Instant::now());
        let dir = req.dir.clone();
        let walked = blocking(move || root.walk_meta(&dir, req.digests, req.xattrs)).await;
        let walked_in = started.elapsed();
        let mut entries = match walked {
            Ok(entries) => entries,
            Err(e) => return self.reply_error(e.code(), e.to_string()).await,
        };
        self.drop_unspeakable(&mut entries, |e| {
            [e.entry.path.as_str(), e.entry.target.as_str()]
        });
        // A client that predates named ACLs is sent the kernel's values, ids as they are.
        if self.session.capabilities() & xfer_proto::CAP_TREE_META_V2 == 0 {
            for e in &mut entries {
                xfer_core::meta::xattrs_without_names(&mut e.meta.xattrs);
            }
        }
        let packed = self.session.capabilities() & xfer_proto::CAP_PACKED_LISTING != 0;
        // Pages bounded by count and by bytes (attributes can be large: 64 KiB each at most).
        let mut page = Vec::new();
        let mut page_bytes = 0;
        let total = entries.len();
        for (i, entry) in entries.into_iter().enumerate() {
            page_bytes += 128
                + entry.entry.path.len()
                + entry.entry.target.len()
                + entry.meta.user.len()
                + entry.meta.group.len()
                + entry.meta.holes.len() * 16
                + entry
                    .meta
                    .xattrs
                    .iter()
                    .map(|x| 16 + x.name.len() + x.value.len())
                    .sum::<usize>();
            page.push(entry);
            if page.len() == MAX_LISTING_ENTRIES || page_bytes > PAGE_BYTES || i + 1 == total {
                let more = i + 1 < total;
                let entries = std::mem::take(&mut page);
                page_bytes = 0;
                let listing = TreeMetaListing { entries, more };
                let frame = if packed {
                    // Compressing a page takes milliseconds of CPU: off the runtime's workers.
                    let packed =
                        tokio::task::spawn_blocking(move || PackedTreeMetaListing::pack(&listing))
                            .await
                            .map_err(|e| fatal(ErrorCode::Io, e.to_string()))?
                            .map_err(|e| fatal(ErrorCode::TooLarge, e.to_string()))?;
                    Frame::PackedTreeMetaListing(packed)
                } else {
                    Frame::TreeMetaListing(listing)
                };
                self.writer.send(&frame).await?;
            }
        }
        tracing::debug!(entries = total, ?walked_in, elapsed = ?started.elapsed(), "tree listed");
        Ok(())
    }

    /// Sets the metadata of `first` and of the `SetMeta`s already buffered behind it, in one
    /// trip to the blocking pool, and answers them in order with one write.
    pub(super) async fn set_metas(&mut self, first: SetMeta) -> Result<(), ConnError> {
        let batch = self.gather(
            first,
            |r| r.xattrs.as_ref().map_or(0, Vec::len),
            |request| match request {
                Request::SetMeta(req) => Ok(req),
                other => Err(Box::new(other)),
            },
        )?;
        let replies: Vec<Frame> = if self.shared.config.read_only {
            batch
                .iter()
                .map(|_| Frame::Error(ErrorFrame::new(ErrorCode::ReadOnly, READ_ONLY)))
                .collect()
        } else {
            let (root, shared) = (self.root(), Arc::clone(&self.shared));
            blocking(move || {
                Ok(batch
                    .into_iter()
                    .map(|req| {
                        if shared.registry.is_open(&req.name) {
                            let message =
                                format!("{} is being uploaded by another client", req.name);
                            return Frame::Error(ErrorFrame::new(ErrorCode::InUse, message));
                        }
                        match root.set_meta(&req) {
                            Ok(outcome) => Frame::MetaSet(MetaSet {
                                name: req.name,
                                not_chowned: outcome.not_chowned,
                                xattrs_refused: outcome.xattrs_refused.unwrap_or_default(),
                            }),
                            Err(e) => {
                                info!(name = %req.name, error = %e, "metadata refused");
                                Frame::Error(ErrorFrame::new(e.code(), e.to_string()))
                            }
                        }
                    })
                    .collect())
            })
            .await
            .map_err(|e: xfer_core::CoreError| fatal(e.code(), e.to_string()))?
        };
        if let Some(Frame::Error(e)) = replies
            .iter()
            .find(|r| matches!(r, Frame::Error(e) if !e.error_code().is_some_and(ErrorCode::is_request_level)))
        {
            return Err(ConnError::Fatal(e.clone()));
        }
        self.writer.send_all(&replies).await?;
        Ok(())
    }

    /// A hole of an upload: recorded as held zeros, not written, and acknowledged.
    pub(super) async fn zeros(&mut self, id: UploadId, chunk: ChunkRef) -> Result<(), ConnError> {
        let Upload { lease, name, .. } = self.session.upload(id)?;
        let range = ByteRange::new(chunk.offset, chunk.offset + u64::from(chunk.len));
        let partial = Arc::clone(&lease.partial);
        let name = name.clone();
        partial
            .write_zeros(range)
            .await
            .map_err(|e| fatal(e.code(), format!("{name}: {e}")))?;
        self.writer.send(&Frame::Ack(chunk)).await?;
        Ok(())
    }
}
