//! The body of the packed small-file frames (`CAP_PACKED_FILES`, proto.md §6.12): a run of
//! `PutFile` requests (`PackedPutFiles`) or of answers to `GetFile` (`PackedFileData`) as one
//! zstd frame. Small files of a tree share most of their bytes (markup, licences, headers),
//! which a frame per file cannot exploit and a batch can.
//!
//! Checks come in the order a receiver can afford them: [`PackedFiles::check`] on the header
//! alone, before anything is allocated for the content; [`PackedFiles::crc_matches`] on the
//! bytes as received, before they are decompressed; [`PackedFiles::unpack`] into a buffer of
//! exactly `raw_len` bytes, then frame by frame.

use bytes::{Buf, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::{Frame, FrameType, ProtoError, LEN_PREFIX, MAX_CONTROL_LEN};

/// Largest `raw_len`: what the frames of one packed frame add up to, length prefixes included.
pub const MAX_PACKED_LEN: u32 = 8 * 1024 * 1024;
/// Most frames one packed frame holds.
pub const MAX_PACKED_FRAMES: u32 = 4096;

/// Frames, encoded as on the wire one after the other, compressed as one zstd frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackedFiles {
    /// Frames inside: at least 1, at most [`MAX_PACKED_FRAMES`].
    pub count: u32,
    /// Bytes `zstd` decompresses to: more than `zstd` holds, at most [`MAX_PACKED_LEN`].
    pub raw_len: u32,
    /// CRC-32 of `zstd`, the bytes as sent.
    pub crc32: u32,
    /// One zstd frame.
    #[serde(with = "serde_bytes")]
    pub zstd: Vec<u8>,
}

impl PackedFiles {
    /// Frames already encoded back to back (`raw`, `count` of them) and their compressed form,
    /// with its CRC.
    pub fn new(count: u32, raw: &[u8], zstd: Vec<u8>) -> Self {
        Self {
            count,
            raw_len: raw.len() as u32,
            crc32: crc32fast::hash(&zstd),
            zstd,
        }
    }

    /// `frames` encoded back to back, as [`PackedFiles::new`] takes them.
    ///
    /// # Errors
    /// As [`Frame::encode`].
    pub fn encode_frames(frames: &[Frame]) -> Result<BytesMut, ProtoError> {
        let mut raw = BytesMut::new();
        Self::encode_frames_into(frames, &mut raw)?;
        Ok(raw)
    }

    /// [`PackedFiles::encode_frames`] into `raw`, emptied first: a sender that packs batch
    /// after batch into one buffer writes into pages it already touched, where a fresh buffer
    /// per batch cost a page fault and a zeroed page per 4 KiB.
    ///
    /// # Errors
    /// As [`Frame::encode`].
    pub fn encode_frames_into(frames: &[Frame], raw: &mut BytesMut) -> Result<(), ProtoError> {
        raw.clear();
        // Room for all of them at once: growing by doubling copied a batch's bytes again.
        raw.reserve(frames.iter().map(encoded_estimate).sum());
        for frame in frames {
            frame.encode(raw)?;
        }
        Ok(())
    }

    /// Checks the header against the limits, before anything is allocated for the content.
    ///
    /// # Errors
    /// [`ProtoError::BadBody`] naming the limit broken.
    pub fn check(&self, kind: &'static str) -> Result<(), ProtoError> {
        let bad = |reason: String| Err(ProtoError::BadBody { kind, reason });
        if self.count == 0 || self.count > MAX_PACKED_FRAMES {
            return bad(format!(
                "{} frames, not 1 to {MAX_PACKED_FRAMES}",
                self.count
            ));
        }
        if self.raw_len > MAX_PACKED_LEN {
            return bad(format!(
                "decompressed size {} above the limit of {MAX_PACKED_LEN}",
                self.raw_len
            ));
        }
        if self.zstd.len() >= self.raw_len as usize {
            return bad(format!(
                "{} compressed bytes for {} decompressed",
                self.zstd.len(),
                self.raw_len
            ));
        }
        // Every frame takes its length prefix and type byte.
        if u64::from(self.count) * (LEN_PREFIX as u64 + 1) > u64::from(self.raw_len) {
            return bad(format!(
                "{} frames cannot fit in {} bytes",
                self.count, self.raw_len
            ));
        }
        Ok(())
    }

    /// Whether `zstd` matches its CRC.
    pub fn crc_matches(&self) -> bool {
        crc32fast::hash(&self.zstd) == self.crc32
    }

    /// The frames inside, decompressed into `buffer` (room for exactly `raw_len` bytes, which
    /// the caller reserved after [`PackedFiles::check`]: `Vec::with_capacity`, so that nothing
    /// is zeroed first; what it holds is dropped), each of a type `allowed` accepts. The CRC
    /// must already have been checked.
    ///
    /// # Errors
    /// [`ProtoError::BadBody`] if the content is not one zstd frame of exactly `raw_len` bytes
    /// (a decompression bomb stops at the buffer's end), or not `count` whole frames of
    /// allowed types; the error of a frame that does not decode.
    pub fn unpack(
        &self,
        kind: &'static str,
        mut buffer: Vec<u8>,
        allowed: impl Fn(&Frame) -> bool,
    ) -> Result<Vec<Frame>, ProtoError> {
        self.unpack_reusing(kind, &mut buffer, allowed)
    }

    /// [`PackedFiles::unpack`] that leaves the allocation of `buffer` in it afterwards (the
    /// frames copy what they keep), so that a receiver decompresses the next batch into pages
    /// it already touched: a fresh buffer per batch cost a page fault and a zeroed page per
    /// 4 KiB, a tenth of a daemon's CPU storing a tree of small files.
    ///
    /// # Errors
    /// As [`PackedFiles::unpack`].
    pub fn unpack_reusing(
        &self,
        kind: &'static str,
        buffer: &mut Vec<u8>,
        allowed: impl Fn(&Frame) -> bool,
    ) -> Result<Vec<Frame>, ProtoError> {
        let bad = |reason: String| ProtoError::BadBody { kind, reason };
        buffer.clear();
        buffer.reserve_exact(self.raw_len as usize);
        // zstd writes into the spare capacity and never past it, so a frame that expands beyond
        // `raw_len` fails here, whatever capacity the allocator rounded up to.
        let room = self.raw_len as usize;
        let got = with_decompressor(|d| {
            d.decompress_to_buffer(&self.zstd[..], buffer)
                .and_then(|n| match n <= room {
                    true => Ok(n),
                    false => Err(std::io::Error::other("output above the announced size")),
                })
        })
        .map_err(|e| bad(format!("zstd: {e} (announced {} bytes)", self.raw_len)))?;
        if got != room {
            return Err(bad(format!("expands to {got} bytes, not {}", self.raw_len)));
        }
        let whole = Bytes::from(std::mem::take(buffer));
        let decoded = self.decode_frames(kind, whole.clone(), allowed);
        // Every frame copied what it keeps: nothing else holds the bytes now.
        if let Ok(unique) = whole.try_into_mut() {
            *buffer = unique.into();
        }
        decoded
    }

    /// The `count` frames `raw` holds, each of a type `allowed` accepts.
    fn decode_frames(
        &self,
        kind: &'static str,
        mut raw: Bytes,
        allowed: impl Fn(&Frame) -> bool,
    ) -> Result<Vec<Frame>, ProtoError> {
        let bad = |reason: String| ProtoError::BadBody { kind, reason };
        let mut frames = Vec::with_capacity(self.count as usize);
        while raw.has_remaining() {
            if frames.len() == self.count as usize || raw.remaining() < LEN_PREFIX {
                return Err(bad("bytes after the last frame".into()));
            }
            let len = raw.get_u32() as usize;
            if len == 0 || len > 1 + MAX_CONTROL_LEN as usize || len > raw.remaining() {
                return Err(bad(format!("inner frame of {len} bytes")));
            }
            let frame = Frame::decode(raw.split_to(len))?;
            if !allowed(&frame) {
                let name = frame.frame_type().name();
                return Err(bad(format!("{name} inside")));
            }
            frames.push(frame);
        }
        if frames.len() != self.count as usize {
            return Err(bad(format!(
                "{} frames inside, {} announced",
                frames.len(),
                self.count
            )));
        }
        Ok(frames)
    }
}

/// About the bytes `frame` encodes to inside a packed frame: its file bytes and name, and room
/// for the rest of the header.
fn encoded_estimate(frame: &Frame) -> usize {
    const HEADER: usize = 128;
    HEADER
        + match frame {
            Frame::PutFile(f) => f.data.len() + f.name.len(),
            Frame::PutFileMeta(m) => m.file.data.len() + 2 * m.file.name.len(),
            Frame::FileData(f) => f.data.len(),
            _ => 0,
        }
}

/// Runs `f` with this thread's zstd decompression context, made once: a fresh one per packed
/// frame cost its allocation and the page faults of its first use, for every batch of files.
fn with_decompressor<T>(
    f: impl FnOnce(&mut zstd::bulk::Decompressor<'static>) -> std::io::Result<T>,
) -> std::io::Result<T> {
    thread_local! {
        static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        let decompressor = match &mut *slot {
            Some(d) => d,
            empty => empty.insert(zstd::bulk::Decompressor::new()?),
        };
        f(decompressor)
    })
}

/// Whether `frame` may travel inside a `PackedPutFiles` (a `PutFileMeta` only where
/// `CAP_PUT_META` is in force, which the session checks as for one sent alone).
pub fn packs_in_put_files(frame: &Frame) -> bool {
    matches!(frame, Frame::PutFile(_) | Frame::PutFileMeta(_))
}

/// Whether `frame` may travel inside a `PackedFileData`: a `FileData`, or an `Error` that
/// answers one `GetFile` and leaves the connection open.
pub fn packs_in_file_data(frame: &Frame) -> bool {
    match frame {
        Frame::FileData(_) => true,
        Frame::Error(e) => e
            .error_code()
            .is_some_and(crate::ErrorCode::is_request_level),
        _ => false,
    }
}

/// The type of packed frame that carries frames of `ty`, if any.
pub fn packed_type(ty: FrameType) -> Option<FrameType> {
    match ty {
        FrameType::PutFile | FrameType::PutFileMeta => Some(FrameType::PackedPutFiles),
        FrameType::FileData => Some(FrameType::PackedFileData),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ErrorCode, ErrorFrame, FileData, FileIdentity, PutFile};

    fn put(name: &str, data: &[u8]) -> Frame {
        Frame::PutFile(PutFile {
            name: name.into(),
            mtime_ns: 1,
            mode: 0o644,
            crc32: crc32fast::hash(data),
            data: data.to_vec(),
        })
    }

    fn pack(frames: &[Frame]) -> PackedFiles {
        let raw = PackedFiles::encode_frames(frames).unwrap();
        PackedFiles::new(
            frames.len() as u32,
            &raw,
            zstd::bulk::compress(&raw, 3).unwrap(),
        )
    }

    fn unpack(p: &PackedFiles) -> Result<Vec<Frame>, ProtoError> {
        p.check("PackedPutFiles")?;
        p.unpack(
            "PackedPutFiles",
            Vec::with_capacity(p.raw_len as usize),
            packs_in_put_files,
        )
    }

    #[test]
    fn unpacks_into_room_not_zeroed_and_again_after_a_bomb() {
        let page = b"<p>a page of markup</p>\n".repeat(40);
        let frames: Vec<Frame> = (0..8).map(|i| put(&format!("p{i}.html"), &page)).collect();
        let good = pack(&frames);
        let bomb = PackedFiles {
            count: 1,
            raw_len: 4096,
            crc32: 0,
            zstd: zstd::bulk::compress(&vec![0u8; 1 << 20], 1).unwrap(),
        };
        // The thread's decompression context is used again after it stopped a bomb; a buffer
        // holding bytes already is emptied first.
        for _ in 0..2 {
            assert_eq!(unpack(&good).unwrap(), frames);
            assert!(unpack(&bomb).unwrap_err().to_string().contains("zstd"));
        }
        let used = vec![7; 10];
        let again = good.unpack("PackedPutFiles", used, packs_in_put_files);
        assert_eq!(again.unwrap(), frames);
    }

    #[test]
    fn a_reused_buffer_keeps_its_allocation_from_batch_to_batch() {
        let page = b"<p>a page of markup</p>\n".repeat(400);
        let frames: Vec<Frame> = (0..8).map(|i| put(&format!("p{i}.html"), &page)).collect();
        let p = pack(&frames);
        let mut buffer = Vec::with_capacity(p.raw_len as usize);
        let first = buffer.as_ptr();
        for _ in 0..3 {
            let got = p.unpack_reusing("PackedPutFiles", &mut buffer, packs_in_put_files);
            assert_eq!(got.unwrap(), frames);
            assert_eq!(
                buffer.as_ptr(),
                first,
                "the same allocation, not a fresh one"
            );
            assert!(buffer.capacity() >= p.raw_len as usize);
        }
    }

    #[test]
    fn frames_round_trip() {
        let page = b"<html><body>the same markup again and again</body></html>\n".repeat(50);
        let frames: Vec<Frame> = (0..20).map(|i| put(&format!("p{i}.html"), &page)).collect();
        let p = pack(&frames);
        assert!(p.crc_matches());
        assert!(p.zstd.len() * 20 < p.raw_len as usize);
        assert_eq!(unpack(&p).unwrap(), frames);
    }

    #[test]
    fn a_frame_of_another_type_is_refused() {
        let page = b"abc".repeat(100);
        let p = pack(&[
            put("a", &page),
            Frame::Done(crate::Done { name: "a".into() }),
        ]);
        let err = unpack(&p).unwrap_err().to_string();
        assert!(err.contains("Done inside"), "{err}");
        let answers = [
            Frame::FileData(FileData {
                identity: FileIdentity {
                    size: 300,
                    mtime_ns: 1,
                },
                mode: 0o644,
                crc32: crc32fast::hash(&page),
                data: page.clone(),
            }),
            Frame::Error(ErrorFrame::new(ErrorCode::NotFound, "gone")),
        ];
        assert!(answers.iter().all(packs_in_file_data));
        assert!(!packs_in_file_data(&Frame::Error(ErrorFrame::new(
            ErrorCode::Io,
            "disk"
        ))));
    }

    #[test]
    fn counts_and_sizes_that_do_not_add_up_are_refused() {
        let page = b"abc".repeat(100);
        let mut p = pack(&[put("a", &page), put("b", &page)]);
        p.count = 3;
        assert!(unpack(&p).unwrap_err().to_string().contains("announced"));
        p.count = 1;
        assert!(unpack(&p)
            .unwrap_err()
            .to_string()
            .contains("after the last"));
        p.count = 0;
        assert!(unpack(&p).unwrap_err().to_string().contains("frames, not"));
        let mut short = pack(&[put("a", &page)]);
        short.raw_len += 7;
        assert!(unpack(&short)
            .unwrap_err()
            .to_string()
            .contains("expands to"));
    }

    #[test]
    fn a_bomb_stops_at_the_announced_size() {
        let zeros = vec![0u8; 64 << 20];
        let p = PackedFiles {
            count: 1,
            raw_len: 4096,
            crc32: 0,
            zstd: zstd::bulk::compress(&zeros, 1).unwrap(),
        };
        assert!(unpack(&p).unwrap_err().to_string().contains("zstd"));
        let huge = PackedFiles {
            raw_len: MAX_PACKED_LEN + 1,
            ..p
        };
        assert!(unpack(&huge)
            .unwrap_err()
            .to_string()
            .contains("above the limit"));
    }
}
