//! Compressed chunks (`CAP_COMPRESSION`): a `DataZ` checked and decompressed within the
//! daemon's memory budget before it is written like any `Data`, `SetCompression`, and the
//! compression of the chunks this connection sends.

use std::os::fd::BorrowedFd;

use bytes::Bytes;
use tracing::warn;
use xfer_core::buffers::BufferPool;
use xfer_net::compress::Packed;
use xfer_net::{inflate, Compression, Compressor};
use xfer_proto::session::UploadId;
use xfer_proto::{ChunkRef, Data, DataZ, ErrorCode, Frame};

use super::{fatal, ConnError, Handler, Upload};

impl Handler {
    /// Decompresses a chunk and writes it. Its decompressed length was checked against the
    /// file and the chunk limit by the session before anything was allocated for it.
    pub(super) async fn data_compressed(
        &mut self,
        id: UploadId,
        z: DataZ,
    ) -> Result<(), ConnError> {
        self.shared
            .metrics
            .wire_bytes_received
            .add(z.payload.len() as u64);
        // The chunk before is written and acknowledged first: this connection then holds the
        // compressed frame and the buffer it expands into, never a third chunk, so it fits a
        // budget of two frames (`MIN_MAX_MEMORY`) however the others use theirs.
        self.finish_write().await?;
        if !z.crc_matches() {
            let Upload {
                name, crc_retries, ..
            } = self.session.upload(id)?;
            *crc_retries += 1;
            self.shared.metrics.crc_errors.inc();
            warn!(name = %name, offset = z.offset, "compressed chunk failed its CRC; asked again");
            let chunk = ChunkRef {
                transfer_id: z.transfer_id,
                offset: z.offset,
                len: z.raw_len,
            };
            self.writer.send(&Frame::Reject(chunk)).await?;
            return Ok(());
        }
        let reservation = self.shared.budget.reserve(z.raw_len as usize).await;
        // A buffer the budget kept from an earlier chunk where it has one (a fresh one costs a
        // page fault and a zeroed page per 4 KiB); the decompression overwrites all of it.
        let (buffer, reservation) = reservation.buffer(z.raw_len as usize);
        let data = inflate(z, buffer, move |b| {
            BufferPool::reserved_bytes(b, reservation)
        })
        .await
        .map_err(|e| fatal(ErrorCode::Protocol, e.to_string()))?;
        self.data(id, data).await
    }

    /// The client chose how what this connection sends is compressed.
    pub(super) fn set_compression(&mut self, mode: u8) {
        let mode = Compression::from_wire(mode).expect("the session checked the mode");
        self.compressor = None;
        self.compressor(mode);
    }

    /// The compressor of what this connection sends, made for `mode` if there is none yet.
    /// Under `auto` its probes measure what this connection's socket delivered (acknowledged
    /// by the client), not what was handed to it: on a long path a short probe would mostly
    /// measure the socket buffer filling, and off and on would look alike.
    pub(super) fn compressor(&mut self, mode: Compression) -> &Compressor {
        if self.compressor.is_none() {
            let meter = xfer_net::Delivered::new();
            self.counted = match (mode, self.socket) {
                // SAFETY: the socket stays open while the reader and writer live, as long as
                // the handler; the count keeps a descriptor of its own.
                (Compression::Auto, Some(fd)) => meter.count(unsafe { BorrowedFd::borrow_raw(fd) }),
                _ => None,
            };
            let delivered = self.counted.is_some().then_some(meter);
            self.compressor = Some(Compressor::new(mode, "download").with_delivered(delivered));
        }
        self.compressor.as_ref().expect("made above")
    }

    /// How this connection compresses what it sends: as the client asked, else the daemon's
    /// default; off for a client without `CAP_COMPRESSION`.
    pub(super) fn compression(&self) -> Compression {
        if self.session.capabilities() & xfer_proto::CAP_COMPRESSION == 0 {
            return Compression::Off;
        }
        self.compressor
            .as_ref()
            .map_or(self.shared.config.compress, Compressor::mode)
    }

    /// The frame that carries `payload`, the bytes at `offset` of download `transfer_id`, and
    /// `payload` itself, to be held until the frame is sent: its budget reservation then
    /// covers the compressed copy too (never larger), so the daemon's buffers stay within
    /// `max_memory` however it compresses.
    pub(super) async fn pack(
        &mut self,
        transfer_id: u64,
        offset: u64,
        payload: Bytes,
    ) -> (Frame, Bytes) {
        let reserved = payload.clone();
        let mode = self.compression();
        let packed = match mode {
            Compression::Off => {
                let wire = payload.len() as u64;
                Packed {
                    frame: Frame::Data(Data::new(transfer_id, offset, payload)),
                    raw: wire,
                    wire,
                }
            }
            _ => {
                let compressor = self.compressor(mode).clone();
                compressor.pack(transfer_id, offset, payload).await
            }
        };
        self.shared.metrics.wire_bytes_sent.add(packed.wire);
        (packed.frame, reserved)
    }
}
