//! Uploads: `OpenWrite`, `Data` written behind the connection's reads, and `Commit`.

use std::sync::Arc;

use tracing::{info, warn};
use xfer_core::digest::DIGEST_LEN;
use xfer_core::CoreError;
use xfer_proto::session::UploadId;
use xfer_proto::{ByteRange, ChunkRef, Commit, Data, ErrorCode, Frame, OpenWrite, WriteOpened};

use super::{fatal, ConnError, Handler, Upload, READ_ONLY};

/// One chunk's write to disk, running beside the connection's reads: receiving chunk N+1
/// while chunk N goes to the page cache keeps a single connection streaming instead of
/// alternating between the socket and the disk.
pub(super) struct WriteBehind {
    pub(super) upload: UploadId,
    pub(super) chunk: ChunkRef,
    pub(super) task: tokio::task::JoinHandle<Result<(), CoreError>>,
}

pub(super) type Written = (
    UploadId,
    ChunkRef,
    Result<Result<(), CoreError>, tokio::task::JoinError>,
);

/// Waits for the write in `slot`, then empties it; never completes while there is none.
/// Cancel safe: dropped before the write is done, the write goes on and stays in `slot`.
pub(super) async fn written(slot: &mut Option<WriteBehind>) -> Written {
    let Some(write) = slot else {
        return std::future::pending().await;
    };
    let result = (&mut write.task).await;
    let (upload, chunk) = (write.upload, write.chunk);
    *slot = None;
    (upload, chunk, result)
}

impl Handler {
    /// `OpenWrite`, or `OpenWriteSparse` with the `holes` of the source; the upload opened, if
    /// it was (else the client was told why).
    pub(super) async fn open_write(
        &mut self,
        req: OpenWrite,
        holes: Vec<ByteRange>,
    ) -> Result<Option<UploadId>, ConnError> {
        if self.shared.config.read_only {
            self.reply_error(ErrorCode::ReadOnly, READ_ONLY.into())
                .await?;
            return Ok(None);
        }
        let opened = self
            .shared
            .registry
            .open(
                &self.root(),
                &req.name,
                req.identity,
                holes,
                self.digest_kind(),
            )
            .await;
        let lease = match opened {
            Ok(lease) => lease,
            Err(e) => {
                info!(name = %req.name, error = %e, "upload refused");
                self.reply_error(e.code(), e.to_string()).await?;
                return Ok(None);
            }
        };
        let held = lease.partial.held();
        let held_bytes = lease.partial.held_bytes();
        // A tree's connection (`CAP_TREE_SYNC`) ends with a `Sync` the client waits for: that
        // flush covers the file. A single file's upload is durable at `Committed`.
        let durability = match self.session.capabilities() & xfer_proto::CAP_TREE_SYNC {
            0 => xfer_core::Durability::Flushed,
            _ => xfer_core::Durability::AtSync,
        };
        let upload = Upload {
            lease,
            name: req.name.clone(),
            mode: req.mode,
            crc_retries: 0,
            bytes: 0,
            basis: None,
            durability,
        };
        let handle = self.session.open_upload(req.identity.size, upload);
        let id = handle.get();
        info!(
            name = %req.name,
            size = req.identity.size,
            held = held_bytes,
            transfer_id = id,
            "upload opened"
        );
        self.writer
            .send(&Frame::WriteOpened(WriteOpened {
                transfer_id: id,
                held,
            }))
            .await?;
        Ok(Some(handle))
    }

    pub(super) async fn data(&mut self, id: UploadId, data: Data) -> Result<(), ConnError> {
        // One chunk is written behind at a time, and answers go out in the order the frames
        // came in: the chunk before this one is written and acknowledged first.
        self.finish_write().await?;
        let Upload {
            lease,
            name,
            crc_retries,
            ..
        } = self.session.upload(id)?;
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
        self.write_behind = Some(WriteBehind {
            upload: id,
            chunk,
            task,
        });
        Ok(())
    }

    /// Waits for the chunk being written, if any, and acknowledges it.
    pub(super) async fn finish_write(&mut self) -> Result<(), ConnError> {
        if self.write_behind.is_none() {
            return Ok(());
        }
        let (upload, chunk, result) = written(&mut self.write_behind).await;
        self.write_done(upload, chunk, result).await
    }

    /// A chunk's write ended: acknowledge it, or end the connection with the write's error.
    pub(super) async fn write_done(
        &mut self,
        upload: UploadId,
        chunk: ChunkRef,
        result: Result<Result<(), CoreError>, tokio::task::JoinError>,
    ) -> Result<(), ConnError> {
        // Open still: every other request waits for the chunk being written.
        let Upload { name, bytes, .. } = self.session.upload(upload)?;
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

    pub(super) async fn commit(&mut self, id: UploadId, c: Commit) -> Result<(), ConnError> {
        // A light file's copies written behind its answer are part of what is committed; one
        // that failed ends the connection with its cause, nothing renamed.
        self.finish_copies(id).await?;
        let Upload {
            lease,
            name,
            mode,
            durability,
            ..
        } = self.session.upload(id)?;
        let (partial, name, mode) = (Arc::clone(&lease.partial), name.clone(), *mode);
        let durability = *durability;
        let expected = match <[u8; DIGEST_LEN]>::try_from(c.digest.as_slice()) {
            Ok(d) => Some(d),
            Err(_) if c.digest.is_empty() => None,
            Err(_) => return Err(fatal(ErrorCode::Protocol, "Commit digest is not 16 bytes")),
        };
        let digest = match partial
            .commit_as(
                mode,
                partial.identity().mtime_ns,
                expected,
                self.digest_kind(),
                durability,
            )
            .await
        {
            Ok(digest) => digest,
            Err(e) => {
                warn!(name = %name, error = %e, "commit failed");
                if matches!(e, CoreError::Corrupt(_)) {
                    self.shared.metrics.uploads.failed.inc();
                    // The partial is gone: forget the upload so the next attempt opens it anew.
                    self.session.close_upload(id)?.lease.retire();
                } else {
                    self.session.upload(id)?.lease.commit_failed();
                }
                return self.reply_error(e.code(), e.to_string()).await;
            }
        };
        let Upload {
            lease, crc_retries, ..
        } = self.session.close_upload(id)?;
        lease.retire();
        self.shared.metrics.uploads.completed.inc();
        if durability == xfer_core::Durability::AtSync {
            self.shared.metrics.commits_left_to_sync.inc();
        }
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
            transfer_id: id.get(),
            digest: digest.to_vec(),
        };
        self.writer.send(&Frame::Committed(reply)).await?;
        Ok(())
    }
}
