//! [`FrameCodec`]: length-prefixed framing that rejects oversized frames before buffering them.

use bytes::{Buf, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::{Frame, FrameType, ProtoError, LEN_PREFIX, MAX_CONTROL_LEN, MAX_FRAME_LEN};

/// Splits a byte stream into [`Frame`]s and encodes frames back into bytes.
#[derive(Debug, Clone)]
pub struct FrameCodec {
    max_frame_len: u32,
}

impl Default for FrameCodec {
    fn default() -> Self {
        Self {
            max_frame_len: MAX_FRAME_LEN,
        }
    }
}

impl FrameCodec {
    /// A codec that refuses frames longer than `max_frame_len` (capped at [`MAX_FRAME_LEN`]).
    pub fn with_max_frame_len(max_frame_len: u32) -> Self {
        Self {
            max_frame_len: max_frame_len.min(MAX_FRAME_LEN),
        }
    }
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = ProtoError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, ProtoError> {
        if src.len() < LEN_PREFIX + 1 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]);
        if len == 0 {
            return Err(ProtoError::EmptyFrame);
        }
        // Limits are checked on the prefix and type byte alone, before any body is buffered.
        let ty = FrameType::from_u8(src[LEN_PREFIX])?;
        let max = if matches!(ty, FrameType::Data | FrameType::DataZ) {
            self.max_frame_len
        } else {
            1 + MAX_CONTROL_LEN
        };
        if len > max {
            return Err(ProtoError::FrameTooLarge { len, max });
        }
        let total = LEN_PREFIX + len as usize;
        if src.len() < total {
            // Room for the rest is the reader's choice (`FrameReader` reads large frames into
            // pooled buffers of their own).
            return Ok(None);
        }
        src.advance(LEN_PREFIX);
        Frame::decode(src.split_to(len as usize).freeze()).map(Some)
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, ProtoError> {
        match self.decode(src)? {
            Some(frame) => Ok(Some(frame)),
            None if src.is_empty() => Ok(None),
            None => Err(ProtoError::TruncatedStream {
                buffered: src.len(),
            }),
        }
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = ProtoError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), ProtoError> {
        frame.encode(dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::*;
    use bytes::{BufMut, Bytes};

    fn every_frame() -> Vec<Frame> {
        let identity = FileIdentity {
            size: 1 << 40,
            mtime_ns: -5,
        };
        vec![
            Frame::Hello(Hello {
                version: 1,
                min_version: 1,
                capabilities: 0xff,
                agent: "xfer/0".into(),
                nonce: vec![9; 32],
            }),
            Frame::Challenge(Challenge { nonce: vec![1; 32] }),
            Frame::PathReport(PathReport {
                rtt_us: 225_000,
                min_rtt_us: 150_000,
            }),
            Frame::IdleTimeout(IdleTimeout { millis: 300_000 }),
            Frame::EarlyAuth(EarlyAuth {
                time_ms: 1_700_000_000_000,
                proof: vec![5; 32],
            }),
            Frame::EarlyRefused(EarlyRefused {
                reason: "replay".into(),
            }),
            Frame::AwaitCommits(AwaitCommits {
                names: vec!["t/a".into(), "t/b".into()],
            }),
            Frame::EarlyChallenge(EarlyChallenge {
                nonce: vec![2; 32],
                welcome: Welcome {
                    version: 1,
                    capabilities: CAP_AUTH | CAP_EARLY_AUTH,
                    max_chunk_size: MAX_CHUNK_SIZE,
                    window: 4,
                    agent: "xferd/0".into(),
                    proof: vec![3; 32],
                },
            }),
            Frame::Auth(Auth {
                proof: vec![2; 32],
                grant: None,
            }),
            Frame::Auth(Auth {
                proof: vec![2; 32],
                grant: Some(Grant {
                    scope: "in".into(),
                    expires: 7,
                    nonce: vec![1; 32],
                }),
            }),
            Frame::CopyTo(CopyTo {
                source: "a".into(),
                recursive: true,
                host: "h".into(),
                port: 9,
                dest: "b".into(),
                connections: 4,
                chunk_size: 1 << 20,
                grant: None,
                tls: true,
                pin: Some([7; 32]),
            }),
            Frame::Progress(Progress {
                bytes_done: 1,
                bytes_total: 2,
            }),
            Frame::Delete(Delete {
                name: "t/gone".into(),
            }),
            Frame::MirrorTo(MirrorTo {
                copy: CopyTo {
                    source: "a".into(),
                    recursive: true,
                    host: "h".into(),
                    port: 9,
                    dest: "b".into(),
                    connections: 4,
                    chunk_size: 1 << 20,
                    grant: None,
                    tls: false,
                    pin: None,
                },
                options: TreeOptions::default(),
                rules: vec![FilterRule {
                    include: false,
                    pattern: "*.log".into(),
                }],
                delete: true,
                delete_excluded: false,
                dry_run: true,
            }),
            Frame::Changes(Changes {
                changes: vec![Change {
                    action: ChangeAction::Update,
                    kind: EntryKind::File,
                    differs: CHANGED_SIZE | CHANGED_MTIME,
                    path: "d/f".into(),
                    target: String::new(),
                }],
            }),
            Frame::CopyDone(CopyDone {
                files_total: 1,
                files_transferred: 1,
                files_skipped: 0,
                bytes_total: 3,
                bytes_transferred: 3,
                resumed_bytes: 0,
                millis: 5,
            }),
            Frame::StartTls,
            Frame::Welcome(Welcome {
                version: 1,
                capabilities: 0,
                max_chunk_size: MAX_CHUNK_SIZE,
                window: 4,
                agent: "xferd/0".into(),
                proof: vec![],
            }),
            Frame::OpenWrite(OpenWrite {
                name: "a/b.bin".into(),
                identity,
                mode: 0o644,
                chunk_size: 1024,
            }),
            Frame::WriteOpened(WriteOpened {
                transfer_id: 7,
                held: vec![ByteRange::new(0, 10), ByteRange::new(20, 30)],
            }),
            Frame::OpenRead(OpenRead {
                name: "x".into(),
                have_identity: Some(identity),
                have: vec![ByteRange::new(0, 1)],
            }),
            Frame::ReadOpened(ReadOpened {
                transfer_id: 1,
                identity,
                mode: 0o600,
            }),
            Frame::ReadChunk(ChunkRef {
                transfer_id: 1,
                offset: 4096,
                len: 4096,
            }),
            Frame::Data(Data::new(3, 99, Bytes::from_static(b"payload"))),
            Frame::Data(Data::new(3, 0, Bytes::new())),
            Frame::DataZ(DataZ::new(3, 99, 1000, Bytes::from_static(b"zstd"))),
            Frame::PackedPutFiles(PackedFiles {
                count: 1,
                raw_len: 100,
                crc32: 7,
                zstd: b"zstd".to_vec(),
            }),
            Frame::PackedFileData(PackedFiles {
                count: 2,
                raw_len: 200,
                crc32: 8,
                zstd: b"zstd".to_vec(),
            }),
            Frame::SetCompression(SetCompression {
                mode: COMPRESSION_AUTO,
            }),
            Frame::Ack(ChunkRef {
                transfer_id: 3,
                offset: 99,
                len: 7,
            }),
            Frame::Commit(Commit {
                transfer_id: 3,
                digest: vec![5; 16],
            }),
            Frame::DigestRequest(Commit {
                transfer_id: 3,
                digest: vec![],
            }),
            Frame::DigestReply(DigestReply {
                transfer_id: 3,
                digest: vec![6; 16],
            }),
            Frame::Committed(Commit {
                transfer_id: 3,
                digest: vec![],
            }),
            Frame::List(List { dir: String::new() }),
            Frame::Listing(Listing {
                entries: vec![ListEntry {
                    name: "f".into(),
                    size: 1,
                    mtime_ns: 2,
                    is_dir: false,
                }],
                more: true,
            }),
            Frame::ListTree(ListTree {
                dir: "d".into(),
                digests: true,
            }),
            Frame::TreeListing(TreeListing {
                entries: vec![TreeEntry {
                    path: "a/l".into(),
                    kind: EntryKind::Symlink,
                    size: 0,
                    mtime_ns: 3,
                    mode: 0o777,
                    target: "../b".into(),
                    digest: vec![],
                }],
                more: false,
            }),
            Frame::PutFile(PutFile {
                name: "s/f".into(),
                mtime_ns: 9,
                mode: 0o600,
                crc32: crc32fast::hash(b"tiny"),
                data: b"tiny".to_vec(),
            }),
            Frame::PutFileMeta(PutFileMeta {
                file: PutFile {
                    name: "s/g".into(),
                    mtime_ns: 9,
                    mode: 0o4755,
                    crc32: crc32fast::hash(b"tiny"),
                    data: b"tiny".to_vec(),
                },
                uid: 1000,
                gid: 100,
                user: "ann".into(),
                group: String::new(),
                numeric_ids: true,
                xattrs: None,
            }),
            Frame::MakeDir(MakeDir {
                name: "s".into(),
                mode: 0o755,
                mtime_ns: 1,
            }),
            Frame::MakeLink(MakeLink {
                name: "s/l".into(),
                target: "f".into(),
            }),
            Frame::GetFile(GetFile {
                name: "s/f".into(),
                max_size: 1 << 20,
            }),
            Frame::FileData(FileData {
                identity,
                mode: 0o644,
                crc32: 0,
                data: vec![1, 2],
            }),
            Frame::Sync,
            Frame::Done(Done { name: "s/f".into() }),
            Frame::Goodbye,
            Frame::Error(ErrorFrame::new(ErrorCode::NotFound, "nope")),
            Frame::Zeros(ChunkRef {
                transfer_id: 3,
                offset: 1 << 33,
                len: 4096,
            }),
            Frame::ListTreeMeta(ListTreeMeta {
                dir: String::new(),
                digests: true,
                xattrs: true,
            }),
            Frame::TreeMetaListing(TreeMetaListing {
                entries: vec![MetaEntry {
                    entry: TreeEntry {
                        path: "l".into(),
                        kind: EntryKind::Symlink,
                        size: 0,
                        mtime_ns: -1,
                        mode: 0o777,
                        target: "/etc".into(),
                        digest: vec![],
                    },
                    meta: Meta {
                        uid: 65534,
                        user: "nobody".into(),
                        holes: vec![ByteRange::new(0, 1 << 40)],
                        xattrs: vec![Xattr {
                            name: "system.posix_acl_access".into(),
                            value: vec![2, 0, 0, 0],
                        }],
                        ..Meta::default()
                    },
                }],
                more: true,
            }),
            Frame::SetMeta(SetMeta {
                name: "t/l".into(),
                mode: 0o7777,
                mtime_ns: i64::MIN,
                uid: u32::MAX,
                gid: 0,
                user: String::new(),
                group: "g".into(),
                numeric_ids: true,
                xattrs: None,
            }),
            Frame::MetaSet(MetaSet {
                name: "t/l".into(),
                not_chowned: false,
                xattrs_refused: "Operation not supported".into(),
            }),
            Frame::MakeHardLink(MakeHardLink {
                name: "b".into(),
                existing: "a".into(),
            }),
            Frame::MakeNode(MakeNode {
                name: "dev/null".into(),
                st_mode: 0o020666,
                rdev: 259,
            }),
            Frame::CopyDoneMeta(CopyDoneMeta {
                done: CopyDone {
                    files_total: 1,
                    files_transferred: 0,
                    files_skipped: 1,
                    bytes_total: 0,
                    bytes_transferred: 0,
                    resumed_bytes: 0,
                    millis: 0,
                },
                not_chowned: 0,
                xattrs_refused: 0,
                hard_links: 0,
                entries_skipped: 0,
            }),
        ]
    }

    /// A body that does not hold what its type needs: short, or not decodable.
    fn assert_malformed(err: &ProtoError) {
        assert!(
            matches!(
                err,
                ProtoError::Truncated { .. } | ProtoError::BadBody { .. }
            ),
            "{err}"
        );
    }

    fn decode_all(bytes: &[u8]) -> Result<Vec<Frame>, ProtoError> {
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        while let Some(frame) = codec.decode_eof(&mut buf)? {
            out.push(frame);
        }
        Ok(out)
    }

    #[test]
    fn every_frame_round_trips() {
        let frames = every_frame();
        let mut buf = BytesMut::new();
        for frame in &frames {
            FrameCodec::default()
                .encode(frame.clone(), &mut buf)
                .unwrap();
        }
        assert_eq!(decode_all(&buf).unwrap(), frames);
    }

    #[test]
    fn type_bytes_name_their_frames() {
        let known: Vec<_> = (0..=u8::MAX)
            .filter_map(|byte| FrameType::from_u8(byte).ok().map(|t| (byte, t)))
            .collect();
        assert_eq!(known.len(), 72);
        for (byte, ty) in known {
            assert_eq!(ty as u8, byte);
        }
        assert_eq!(FrameType::from_u8(0x22).unwrap(), FrameType::Reject);
        assert_eq!(FrameType::Reject.name(), "Reject");
        assert_eq!(FrameType::from_u8(0x7f).unwrap().name(), "Error");
    }

    #[test]
    fn every_frame_round_trips_byte_by_byte() {
        let mut wire = BytesMut::new();
        for frame in every_frame() {
            frame.encode(&mut wire).unwrap();
        }
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for byte in wire.iter() {
            buf.put_u8(*byte);
            while let Some(frame) = codec.decode(&mut buf).unwrap() {
                out.push(frame);
            }
        }
        assert_eq!(out, every_frame());
    }

    /// `PutFile`/`FileData` bytes are encoded in one piece (`serde_bytes`) and must stay exactly
    /// what a sequence of `u8` was: a length, then the bytes.
    #[test]
    fn file_bytes_encode_as_a_length_and_the_bytes() {
        let data: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
        let frame = Frame::PutFile(PutFile {
            name: "a".into(),
            mtime_ns: 5,
            mode: 0o644,
            crc32: 7,
            data: data.clone(),
        });
        let mut buf = BytesMut::new();
        frame.encode(&mut buf).unwrap();
        // Type; name length (u64, big-endian) and "a"; mtime; mode; CRC; data length; bytes.
        let mut want = vec![0x50];
        want.extend_from_slice(&1u64.to_be_bytes());
        want.push(b'a');
        want.extend_from_slice(&5i64.to_be_bytes());
        want.extend_from_slice(&0o644u32.to_be_bytes());
        want.extend_from_slice(&7u32.to_be_bytes());
        want.extend_from_slice(&300u64.to_be_bytes());
        want.extend_from_slice(&data);
        assert_eq!(&buf[4..], &want[..]);
    }

    #[test]
    fn oversized_length_is_rejected_before_buffering() {
        let mut buf = BytesMut::new();
        buf.put_u32(MAX_FRAME_LEN + 1);
        buf.put_u8(FrameType::Data as u8);
        let err = FrameCodec::default().decode(&mut buf).unwrap_err();
        assert!(matches!(err, ProtoError::FrameTooLarge { .. }), "{err}");
        assert!(
            buf.capacity() < 1024,
            "decoder reserved room for an oversized frame"
        );

        let mut buf = BytesMut::new();
        buf.put_u32(1 + MAX_CONTROL_LEN + 1);
        buf.put_u8(FrameType::Hello as u8);
        let err = FrameCodec::default().decode(&mut buf).unwrap_err();
        assert!(matches!(err, ProtoError::FrameTooLarge { .. }), "{err}");
    }

    #[test]
    fn oversized_control_bodies_are_not_encoded() {
        let frame = Frame::List(List {
            dir: "a".repeat(MAX_CONTROL_LEN as usize),
        });
        let mut buf = BytesMut::new();
        let err = frame.encode(&mut buf).unwrap_err();
        assert!(matches!(err, ProtoError::FrameTooLarge { .. }), "{err}");
        assert!(buf.is_empty());
    }

    #[test]
    fn unknown_type_is_rejected() {
        let err = decode_all(&[0, 0, 0, 1, 0x6f]).unwrap_err();
        assert!(matches!(err, ProtoError::UnknownType(0x6f)), "{err}");
    }

    #[test]
    fn empty_frame_is_rejected() {
        let err = decode_all(&[0, 0, 0, 0, 1]).unwrap_err();
        assert!(matches!(err, ProtoError::EmptyFrame), "{err}");
    }

    #[test]
    fn truncated_stream_is_rejected_at_eof() {
        let mut wire = BytesMut::new();
        Frame::Goodbye.encode(&mut wire).unwrap();
        Frame::Commit(Commit {
            transfer_id: 1,
            digest: vec![],
        })
        .encode(&mut wire)
        .unwrap();
        let cut = &wire[..wire.len() - 3];
        let err = decode_all(cut).unwrap_err();
        assert!(matches!(err, ProtoError::TruncatedStream { .. }), "{err}");
    }

    #[test]
    fn truncated_body_is_rejected() {
        // A Commit body is 8 bytes; give it 3.
        let err = decode_all(&[0, 0, 0, 4, FrameType::Commit as u8, 1, 2, 3]).unwrap_err();
        assert!(
            matches!(err, ProtoError::Truncated { kind: "Commit", .. }),
            "{err}"
        );
        let err = decode_all(&[0, 0, 0, 4, FrameType::Data as u8, 1, 2, 3]).unwrap_err();
        assert!(
            matches!(err, ProtoError::Truncated { kind: "Data", .. }),
            "{err}"
        );
    }

    #[test]
    fn bad_bodies_are_rejected() {
        // Trailing bytes after a valid Commit body (id and an empty digest: 16 bytes).
        let mut frame = vec![0, 0, 0, 18, FrameType::Commit as u8];
        frame.extend_from_slice(&[0; 17]);
        let err = decode_all(&frame).unwrap_err();
        assert!(
            matches!(err, ProtoError::BadBody { kind: "Commit", .. }),
            "{err}"
        );
        // A string that is not UTF-8.
        let mut body = BytesMut::new();
        body.put_u64(2);
        body.put_slice(&[0xff, 0xfe]);
        let mut frame = BytesMut::new();
        frame.put_u32(1 + body.len() as u32);
        frame.put_u8(FrameType::List as u8);
        frame.put_slice(&body);
        let err = decode_all(&frame).unwrap_err();
        assert!(
            matches!(err, ProtoError::BadBody { kind: "List", .. }),
            "{err}"
        );
        // Goodbye with a body.
        let err = decode_all(&[0, 0, 0, 2, FrameType::Goodbye as u8, 0]).unwrap_err();
        assert!(
            matches!(
                err,
                ProtoError::BadBody {
                    kind: "Goodbye",
                    ..
                }
            ),
            "{err}"
        );
        // Data whose header length disagrees with the frame length.
        let mut data = BytesMut::new();
        Frame::Data(Data::new(1, 0, Bytes::from_static(b"abc")))
            .encode(&mut data)
            .unwrap();
        data[LEN_AND_DATA_HEADER - 5] = 9;
        let err = decode_all(&data).unwrap_err();
        assert!(
            matches!(err, ProtoError::BadBody { kind: "Data", .. }),
            "{err}"
        );
    }

    #[test]
    fn string_length_beyond_body_is_truncated_not_allocated() {
        let mut frame = BytesMut::new();
        frame.put_u32(1 + 8);
        frame.put_u8(FrameType::List as u8);
        frame.put_u64(u64::MAX);
        let err = decode_all(&frame).unwrap_err();
        assert_malformed(&err);
    }

    /// A `DataZ` whose sizes are wrong is refused by the decoder, before anything is allocated
    /// for what it would expand to.
    #[test]
    fn dataz_sizes_are_checked_before_decompression() {
        let encode = |z: DataZ| {
            let mut buf = BytesMut::new();
            Frame::DataZ(z).encode(&mut buf).unwrap();
            buf
        };
        let bomb = encode(DataZ::new(
            1,
            0,
            MAX_CHUNK_SIZE + 1,
            Bytes::from_static(b"z"),
        ));
        let err = decode_all(&bomb).unwrap_err();
        assert!(err.to_string().contains("above the largest chunk"), "{err}");
        let grows = encode(DataZ::new(1, 0, 2, Bytes::from_static(b"abc")));
        let err = decode_all(&grows).unwrap_err();
        assert!(
            err.to_string().contains("3 compressed bytes for 2"),
            "{err}"
        );
        let overflows = encode(DataZ::new(1, u64::MAX, 2, Bytes::from_static(b"a")));
        assert!(decode_all(&overflows).is_err());
        let mut short = encode(DataZ::new(1, 0, 9, Bytes::from_static(b"abc")));
        short[LEN_AND_DATAZ_HEADER - 9] = 9;
        assert!(matches!(
            decode_all(&short).unwrap_err(),
            ProtoError::BadBody { kind: "DataZ", .. }
        ));
    }

    #[test]
    fn data_crc_is_checked() {
        let mut data = Data::new(1, 0, Bytes::from_static(b"hello"));
        data.verify().unwrap();
        data.crc32 ^= 1;
        assert!(matches!(
            data.verify(),
            Err(ProtoError::BadCrc { offset: 0 })
        ));
    }

    #[test]
    fn error_codes_round_trip() {
        for code in 1..=16u16 {
            let known = ErrorCode::from_u16(code).unwrap();
            assert_eq!(known as u16, code);
        }
        assert_eq!(ErrorCode::from_u16(999), None);
    }
}
