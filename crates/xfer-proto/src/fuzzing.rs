//! Entry points shared by the fuzz targets (`fuzz/`) and by the regression test that replays
//! their corpus in `cargo test`. Each must never panic, whatever the input.

use bytes::BytesMut;
use tokio_util::codec::Decoder;

use std::time::{Duration, Instant};

use crate::client::{ClientConfig, ClientSession, Step};
use crate::session::{Handshake, Phase, Request, ServerConfig, ServerSession};
use crate::{auth, Auth, Frame, FrameCodec, CAP_AUTH, CAP_TLS};

/// Decodes `data` as a stream of frames; every frame decoded must re-encode to a frame that
/// decodes equal to it.
pub fn decode_frames(data: &[u8]) {
    let mut codec = FrameCodec::default();
    let mut buf = BytesMut::from(data);
    while let Ok(Some(frame)) = codec.decode_eof(&mut buf) {
        // A packed listing is decompressed as a client would, within the limit.
        if let Frame::PackedTreeMetaListing(packed) = &frame {
            let _ = packed.unpack();
        }
        if let Frame::PackedPutFiles(p) | Frame::PackedFileData(p) = &frame {
            if p.check("packed").is_ok() {
                unpack(p, "packed", |_| true);
            }
        }
        let mut again = BytesMut::new();
        if frame.encode(&mut again).is_ok() {
            let back = FrameCodec::default().decode_eof(&mut again);
            assert_eq!(
                back.ok().flatten().as_ref(),
                Some(&frame),
                "re-encoding changed the frame"
            );
            assert!(again.is_empty(), "re-encoding left bytes over");
        }
    }
}

/// Feeds the frames in `data[1..]` to a [`ServerSession`] as a daemon would. Bit 0 of `data[0]`
/// gives the session a token; bit 1 makes the script answer a challenge correctly, so that
/// sessions with a token also reach the request phase; bit 2 makes the daemon require TLS.
/// `start` is when the connection was accepted (this crate reads no clock).
pub fn session_script(data: &[u8], start: Instant) {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let token: Option<&[u8]> = if flags & 1 != 0 {
        Some(b"fuzz-token")
    } else {
        None
    };
    let config = ServerConfig {
        token: token.map(Into::into),
        max_chunk: 1 << 16,
        max_open: 4,
        tls: flags & 4 != 0,
        window: 2,
        agent: "fuzz".into(),
        handshake_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(300),
        replay: Some(Default::default()),
    };
    let mut session: ServerSession<u64, ()> =
        ServerSession::new(config, vec![0x5a; auth::NONCE_LEN], 1_000_000, start);
    let mut codec = FrameCodec::default();
    let mut buf = BytesMut::from(rest);
    let mut client_nonce = Vec::new();
    while let Ok(Some(mut frame)) = codec.decode_eof(&mut buf) {
        if session.phase() != Phase::Ready {
            if flags & 2 != 0 && session.phase() == Phase::AwaitAuth {
                let token = token.expect("AwaitAuth only with a token");
                let proof = auth::client_proof(token, &client_nonce, session.nonce());
                frame = Frame::Auth(Auth { proof, grant: None });
            }
            // An early proof made right, at the time the script gives, so that the window and
            // the replay cache are reached too.
            if let (Frame::EarlyAuth(early), Some(token)) = (&mut frame, token) {
                if flags & 2 != 0 && session.phase() == Phase::AwaitAuth {
                    early.proof = auth::zero_rtt_proof(token, &client_nonce, early.time_ms);
                }
            }
            if let Frame::Hello(h) = &frame {
                client_nonce.clone_from(&h.nonce);
            }
            assert!(session.poll_timeout(start) <= start.checked_add(Duration::from_secs(10)));
            match session.handle_handshake(frame) {
                Ok(Handshake::Admitted) => {
                    assert_eq!(session.phase(), Phase::Ready);
                    let welcome = session.welcome();
                    let known = CAP_AUTH
                        | CAP_TLS
                        | crate::CAP_FEATURES
                        | crate::CAP_DELETE
                        | crate::CAP_MIRROR
                        | crate::CAP_TREE_SYNC
                        | crate::CAP_TREE_CLOSE
                        | crate::CAP_EARLY_AUTH
                        | crate::CAP_ZERO_RTT;
                    assert_eq!(welcome.capabilities & !known, 0);
                    // The idle timeout told behind the Welcome is the one the session keeps.
                    let told = welcome.capabilities & crate::CAP_IDLE_TIMEOUT != 0;
                    let frames = session.welcome_frames();
                    assert_eq!(frames[0], Frame::Welcome(welcome.clone()));
                    let idle = Frame::IdleTimeout(crate::IdleTimeout { millis: 300_000 });
                    assert_eq!(frames.get(1), told.then_some(&idle));
                    assert_eq!(frames.len(), 1 + usize::from(told));
                    // Early proofs are taken only where the server proved itself early.
                    if welcome.capabilities & crate::CAP_ZERO_RTT != 0 {
                        assert!(token.is_some() && session.is_early());
                    }
                }
                // An early challenge already proves the token and announces the Welcome.
                Ok(Handshake::EarlyChallenge(early)) => {
                    let token = token.expect("a challenge only with a token");
                    let proof = auth::server_proof(token, &client_nonce, session.nonce());
                    assert_eq!(early.welcome.proof, proof);
                    assert_eq!(early.welcome, session.welcome());
                    assert!(session.is_early());
                }
                // The daemon would switch to TLS here; the next frames stand for what it decrypts.
                Ok(
                    Handshake::StartTls
                    | Handshake::Challenge(_)
                    | Handshake::Next
                    | Handshake::EarlyRefused(_),
                ) => {}
                Ok(Handshake::PeerError(_)) | Err(_) => return,
            }
            continue;
        }
        let Ok(request) = session.handle_request(frame) else {
            return;
        };
        match request {
            Request::OpenWrite(req, _) => {
                session.open_upload(req.identity.size, 0);
            }
            Request::OpenRead(req) => {
                session.open_download(req.name.len() as u64, ());
            }
            Request::Data(id, data) => {
                let received = session
                    .upload(id)
                    .expect("a handle the session gave is open");
                *received += data.payload.len() as u64;
            }
            // What a compressed chunk expands to was checked before the daemon allocates it.
            Request::DataZ(id, z) => {
                assert!(z.raw_len <= 1 << 16, "DataZ above the chunk limit");
                assert!(z.payload.len() <= z.raw_len as usize);
                let received = session
                    .upload(id)
                    .expect("a handle the session gave is open");
                *received += u64::from(z.raw_len);
            }
            // Packed small files: the header was checked before anything is allocated.
            Request::PackedPutFiles(packed) => {
                assert!(packed.raw_len <= crate::MAX_PACKED_LEN);
                assert!(packed.zstd.len() < packed.raw_len as usize);
                unpack(&packed, "PackedPutFiles", crate::packed::packs_in_put_files);
            }
            Request::SetCompression(mode) => {
                assert!(matches!(mode, 0 | 1..=crate::MAX_COMPRESSION_LEVEL | 0xff));
            }
            Request::DeltaOpen(id, _) | Request::DeltaResume(id, _) => {
                session
                    .upload(id)
                    .expect("a handle the session gave is open");
            }
            Request::DeltaSig(id, sig) | Request::DeltaGuess(id, sig) => {
                session
                    .upload(id)
                    .expect("a handle the session gave is open");
                assert!(sig.chunks.len() <= crate::MAX_DELTA_CHUNKS);
                assert!(sig.chunks.iter().all(|c| c.len > 0));
            }
            // A whole signature, checked before the upload it opens is recorded.
            Request::DeltaPut(put) => {
                assert!(put.chunks.len() <= crate::MAX_DELTA_CHUNKS);
                let covered: u64 = put.chunks.iter().map(|c| u64::from(c.len)).sum();
                assert_eq!(covered, put.open.identity.size);
                session.open_upload(put.open.identity.size, 0);
            }
            // Runs to copy, checked against the upload before the daemon reads the basis.
            Request::DeltaCopy(id, copy) => {
                session
                    .upload(id)
                    .expect("a handle the session gave is open");
                assert!(copy.copies.len() <= crate::MAX_FINE_COPIES);
                assert!(copy.copies.iter().all(|c| c.len > 0
                    && u64::from(c.len) <= crate::MAX_FINE_GAP
                    && c.old.checked_add(u64::from(c.len)).is_some()));
            }
            // Refused only on a connection whose room is full; nothing is opened.
            Request::DeltaPutFull(_, max_open) => {
                assert_eq!((max_open, session.open_count()), (4, 4));
            }
            Request::ReadChunk(id, _) | Request::Digest(id) | Request::ReadSig(id, _) => {
                session
                    .download(id)
                    .expect("a handle the session gave is open");
            }
            Request::Commit(id, _) => {
                session
                    .close_upload(id)
                    .expect("a handle the session gave is open");
                assert!(session.upload(id).is_err(), "a closed upload stays closed");
            }
            // A tree's closing: bounded before the daemon waits on any of the names.
            Request::AwaitCommits(a) => assert!(a.names.len() <= crate::MAX_AWAITED),
            Request::Goodbye
            | Request::PeerError(_)
            | Request::CopyTo(_)
            | Request::MirrorTo(_) => return,
            _ => {}
        }
        assert!(session.open_count() <= 4, "open transfers beyond the limit");
    }
}

/// Unpacks `packed` (its header checked) as a receiver would: into exactly `raw_len` bytes,
/// every frame inside of a type `allowed` accepts.
fn unpack(packed: &crate::PackedFiles, kind: &'static str, allowed: fn(&Frame) -> bool) {
    if let Ok(frames) = packed.unpack(kind, vec![0; packed.raw_len as usize], allowed) {
        assert_eq!(frames.len(), packed.count as usize);
        assert!(frames.iter().all(allowed));
    }
}

/// `data[1..]` as the body of a packed small-file frame, `PackedPutFiles` if bit 0 of `data[0]`
/// is clear, else `PackedFileData`, decoded, checked and unpacked as a receiver would: bad
/// sizes, bombs, frames of other types must end in an error, never a panic nor an allocation
/// beyond [`crate::MAX_PACKED_LEN`].
pub fn unpack_files(data: &[u8]) {
    let Some((&flags, body)) = data.split_first() else {
        return;
    };
    let (ty, kind, allowed): (_, _, fn(&Frame) -> bool) = if flags & 1 == 0 {
        let ty = crate::FrameType::PackedPutFiles;
        (ty, "PackedPutFiles", crate::packed::packs_in_put_files)
    } else {
        let ty = crate::FrameType::PackedFileData;
        (ty, "PackedFileData", crate::packed::packs_in_file_data)
    };
    let mut frame = vec![ty as u8];
    frame.extend_from_slice(body);
    let Ok(Frame::PackedPutFiles(packed) | Frame::PackedFileData(packed)) =
        Frame::decode(bytes::Bytes::from(frame))
    else {
        return;
    };
    if packed.check(kind).is_ok() && packed.crc_matches() {
        unpack(&packed, kind, allowed);
    }
}

/// `data` both as a name's bytes, which must come back whole through [`crate::names::escape`]
/// and [`crate::names::unescape`] in their one wire form, and (where UTF-8) as a wire name from
/// a peer, which the checks must take without panicking, a canonical one coming back as it was.
pub fn names(data: &[u8]) {
    use crate::names::{display, escape, is_canonical, unescape};
    let wire = escape(data);
    assert_eq!(&*unescape(&wire), data, "escape then unescape");
    assert!(is_canonical(&wire), "escape gives the wire form");
    assert_eq!(
        wire.bytes().filter(|&b| b == b'/').count(),
        data.iter().filter(|&&b| b == b'/').count(),
        "escapes never stand for '/'"
    );
    if let Ok(name) = std::str::from_utf8(data) {
        let _ = display(name);
        if is_canonical(name) {
            assert_eq!(
                escape(&unescape(name)),
                name,
                "a canonical name comes back as it was"
            );
        }
    }
}

/// Feeds the frames in `data[1..]` to a [`ClientSession`] as the client would, as if a server
/// sent them. Bit 0 of `data[0]` gives the client a token; bit 1 makes it ask for TLS. Whatever
/// comes, only a `Welcome` within what the client offered is accepted.
pub fn client_script(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let config = ClientConfig {
        key: (flags & 1 != 0).then(|| b"fuzz-token".as_slice().into()),
        grant: None,
        tls: flags & 2 != 0,
        agent: "fuzz".into(),
        // Bit 2 offers the mirroring capabilities.
        offer: if flags & 4 != 0 {
            crate::CAP_DELETE | crate::CAP_MIRROR
        } else {
            0
        },
        // Bit 3 sends an early proof behind the Hello.
        early_proof_at: (flags & 8 != 0).then_some(1_000_000_000),
    };
    let mut client = ClientSession::new(config, vec![0xa5; auth::NONCE_LEN]);
    client.hello();
    let _ = client.early_auth();
    let mut codec = FrameCodec::default();
    let mut buf = BytesMut::from(rest);
    while let Ok(Some(frame)) = codec.decode_eof(&mut buf) {
        match client.handle_frame(frame) {
            Ok(Step::StartTls) => {
                client.hello();
                let _ = client.early_auth();
            }
            Ok(Step::Send(frame)) => assert!(matches!(frame, Frame::Auth(_))),
            // Only a server that proved the client's token gets its Auth early.
            Ok(Step::Early { auth, welcome }) => {
                assert!(matches!(auth, Frame::Auth(_)));
                assert!(flags & 1 != 0, "early without a token");
                assert!(welcome.max_chunk_size >= crate::MIN_CHUNK_SIZE);
                assert!(!client.is_done());
            }
            // Only a Welcome announcing its idle timeout, or an EarlyChallenge answering an early
            // proof, leaves the handshake open.
            Ok(Step::Next) => assert!(!client.is_done()),
            Ok(Step::Welcomed(welcome)) => {
                assert!((1..=crate::PROTOCOL_VERSION).contains(&welcome.version));
                assert!(welcome.max_chunk_size >= crate::MIN_CHUNK_SIZE);
                let early = if flags & 1 != 0 {
                    crate::CAP_EARLY_AUTH | crate::CAP_ZERO_RTT
                } else {
                    0
                };
                let mirroring = if flags & 4 != 0 {
                    crate::CAP_DELETE | crate::CAP_MIRROR
                } else {
                    0
                };
                let tls = if flags & 2 != 0 { CAP_TLS } else { 0 };
                let offered = CAP_AUTH | crate::CAP_FEATURES | early | mirroring | tls;
                assert_eq!(welcome.capabilities & !offered, 0);
                assert!(client.is_done());
                let told = welcome.capabilities & crate::CAP_IDLE_TIMEOUT != 0;
                assert_eq!(client.idle_timeout().is_some(), told);
            }
            Err(_) => assert!(client.is_done(), "a failed handshake stays failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    fn session_script_now(data: &[u8]) {
        super::session_script(data, std::time::Instant::now());
    }

    /// A corpus seed's script: the selector byte 0, then `frames` encoded one after the other.
    fn script(frames: impl IntoIterator<Item = crate::Frame>) -> Vec<u8> {
        let mut script = bytes::BytesMut::from(&[0u8][..]);
        for frame in frames {
            frame.encode(&mut script).unwrap();
        }
        script.to_vec()
    }

    /// The `Hello` that opens a corpus seed's script, offering `capabilities`.
    fn seed_hello(capabilities: u64) -> crate::Frame {
        crate::Frame::Hello(crate::Hello {
            version: 1,
            min_version: 1,
            capabilities,
            agent: "fuzz".into(),
            nonce: vec![1; 32],
        })
    }

    /// The script of a `session_script` corpus seed: a `Hello` offering
    /// `CAP_COMPRESSION`, an upload, `SetCompression`, a `DataZ` within the limits and one above.
    fn compressed_upload_script() -> Vec<u8> {
        use crate::*;
        let frames = [
            seed_hello(CAP_COMPRESSION),
            Frame::OpenWrite(OpenWrite {
                name: "z".into(),
                identity: FileIdentity {
                    size: 1 << 20,
                    mtime_ns: 0,
                },
                mode: 0o644,
                chunk_size: 1 << 16,
            }),
            Frame::SetCompression(SetCompression { mode: 3 }),
            Frame::DataZ(DataZ::new(1, 0, 64, bytes::Bytes::from_static(b"zstd"))),
            Frame::DataZ(DataZ::new(
                1,
                0,
                1 << 17,
                bytes::Bytes::from_static(b"zstd"),
            )),
        ];
        script(frames)
    }

    #[test]
    fn compressed_chunks_reach_the_session_within_their_limits() {
        session_script_now(&compressed_upload_script());
    }

    /// The script of a `session_script` corpus seed: a `Hello` offering `CAP_COMPRESSION` and
    /// `CAP_PACKED_FILES`, then a `PackedPutFiles` of two files.
    pub(crate) fn packed_files_script() -> Vec<u8> {
        use crate::*;
        let hello = seed_hello(CAP_COMPRESSION | CAP_PACKED_FILES);
        script([hello, Frame::PackedPutFiles(packed_put_files())])
    }

    /// The script of a `session_script` corpus seed: a `Hello` offering `CAP_COPY_DELTA`,
    /// `CopyMode` for a delta, then for the whole file, then a `CopyTo`.
    fn copy_mode_script() -> Vec<u8> {
        use crate::*;
        let mode = |delta| Frame::CopyMode(CopyMode { delta });
        let frames = [
            seed_hello(CAP_COPY_DELTA),
            mode(CopyDeltaMode::Delta),
            mode(CopyDeltaMode::WholeFile),
            Frame::CopyTo(CopyTo {
                source: "f".into(),
                recursive: false,
                host: "127.0.0.1".into(),
                port: 9,
                dest: "f".into(),
                connections: 2,
                chunk_size: 1 << 16,
                grant: None,
                tls: false,
                pin: None,
            }),
        ];
        script(frames)
    }

    #[test]
    fn copy_modes_reach_the_session() {
        session_script_now(&copy_mode_script());
    }

    /// The script of a `session_script` corpus seed: a `Hello` offering `CAP_DELTA` and
    /// `CAP_DELTA_PUT`, then one `DeltaPut` more than the session's room of four.
    fn delta_puts_beyond_the_room_script() -> Vec<u8> {
        use crate::*;
        let hello = seed_hello(CAP_DELTA | CAP_DELTA_PUT);
        let put = |name: &str| {
            Frame::DeltaPut(DeltaPut {
                open: OpenWrite {
                    name: name.into(),
                    identity: FileIdentity {
                        size: 100,
                        mtime_ns: 0,
                    },
                    mode: 0o644,
                    chunk_size: 1 << 16,
                },
                avg_chunk: 16384,
                chunks: vec![SigChunk {
                    len: 100,
                    hash: [7; 16],
                }],
            })
        };
        script(std::iter::once(hello).chain(["a", "b", "c", "d", "e"].map(put)))
    }

    #[test]
    fn a_delta_put_beyond_the_room_reaches_the_session() {
        session_script_now(&delta_puts_beyond_the_room_script());
    }

    /// The script of a `session_script` corpus seed: a `Hello` offering `CAP_BLOCK_DIGEST`, an
    /// upload of one chunk, and its `Commit` with a 16-byte digest (the block digest, §2.4).
    pub(crate) fn block_digest_commit_script() -> Vec<u8> {
        use crate::*;
        let payload = bytes::Bytes::from_static(b"one block");
        let frames = [
            seed_hello(CAP_BLOCK_DIGEST),
            Frame::OpenWrite(OpenWrite {
                name: "b".into(),
                identity: FileIdentity {
                    size: payload.len() as u64,
                    mtime_ns: 0,
                },
                mode: 0o644,
                chunk_size: 1 << 16,
            }),
            Frame::Data(Data::new(1, 0, payload)),
            Frame::Commit(Commit {
                transfer_id: 1,
                digest: vec![0x5a; 16],
            }),
        ];
        script(frames)
    }

    #[test]
    fn a_block_digest_commit_reaches_the_session() {
        session_script_now(&block_digest_commit_script());
    }

    /// The script of a `session_script` corpus seed: a `Hello` offering `CAP_DELTA`,
    /// `CAP_DELTA_PUT` and `CAP_BYTE_WINDOW`, a `DeltaPut`, then its literal data in three small
    /// `Data` frames sent at once, as a window counted by size lets them go.
    fn small_data_in_a_byte_window_script() -> Vec<u8> {
        use crate::*;
        let hello = seed_hello(CAP_DELTA | CAP_DELTA_PUT | CAP_BYTE_WINDOW);
        let put = Frame::DeltaPut(DeltaPut {
            open: OpenWrite {
                name: "w".into(),
                identity: FileIdentity {
                    size: 300,
                    mtime_ns: 0,
                },
                mode: 0o644,
                chunk_size: 1 << 16,
            },
            avg_chunk: 16384,
            chunks: vec![SigChunk {
                len: 300,
                hash: [7; 16],
            }],
        });
        let data = [0, 100, 200].map(|offset| {
            let payload = bytes::Bytes::from(vec![offset as u8; 100]);
            Frame::Data(Data::new(1, offset, payload))
        });
        script([hello, put].into_iter().chain(data))
    }

    #[test]
    fn small_data_in_a_byte_window_reaches_the_session() {
        session_script_now(&small_data_in_a_byte_window_script());
    }

    /// The script of a `session_script` corpus seed: a `Hello` offering `CAP_DELTA`,
    /// `CAP_DELTA_PUT` and `CAP_DELTA_FINE`, a `DeltaPut`, a `DeltaCopy` within the upload, then
    /// one reaching past it.
    pub(crate) fn delta_copies_script() -> Vec<u8> {
        use crate::*;
        let hello = seed_hello(CAP_DELTA | CAP_DELTA_PUT | CAP_DELTA_FINE);
        let put = Frame::DeltaPut(DeltaPut {
            open: OpenWrite {
                name: "f".into(),
                identity: FileIdentity {
                    size: 5000,
                    mtime_ns: 0,
                },
                mode: 0o644,
                chunk_size: 1 << 16,
            },
            avg_chunk: 16384,
            chunks: vec![SigChunk {
                len: 5000,
                hash: [7; 16],
            }],
        });
        let copy = |new, len| {
            Frame::DeltaCopy(DeltaCopy {
                transfer_id: 1,
                copies: vec![FineCopy {
                    new,
                    old: 1024,
                    len,
                    hash: [9; 16],
                }],
            })
        };
        script([hello, put, copy(0, 2048), copy(4000, 2048)])
    }

    #[test]
    fn delta_copies_reach_the_session_within_their_limits() {
        session_script_now(&delta_copies_script());
    }

    /// The script of a `client_script` corpus seed: a client without a token and a server's
    /// `Welcome` announcing its idle timeout (`CAP_IDLE_TIMEOUT`), then that `IdleTimeout`, then a
    /// second one, which comes after the handshake.
    pub(crate) fn idle_timeout_script() -> Vec<u8> {
        use crate::*;
        let welcome = Frame::Welcome(Welcome {
            version: 1,
            capabilities: CAP_IDLE_TIMEOUT | CAP_TREE_META,
            max_chunk_size: 1 << 20,
            window: 2,
            agent: "fuzz".into(),
            proof: Vec::new(),
        });
        let idle = Frame::IdleTimeout(IdleTimeout { millis: 300_000 });
        script([welcome, idle.clone(), idle])
    }

    /// The script of a `session_script` corpus seed: a `Hello` offering `CAP_IDLE_TIMEOUT`, then
    /// an `IdleTimeout` sent the wrong way, which the session refuses.
    pub(crate) fn idle_timeout_from_a_client_script() -> Vec<u8> {
        use crate::*;
        script([
            seed_hello(CAP_IDLE_TIMEOUT),
            Frame::IdleTimeout(IdleTimeout { millis: 1 }),
        ])
    }

    #[test]
    fn an_idle_timeout_reaches_the_client_behind_its_welcome() {
        super::client_script(&idle_timeout_script());
        session_script_now(&idle_timeout_from_a_client_script());
        // The corpus keeps both scripts as seeds.
        let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus");
        for (target, script) in [
            ("client_script", idle_timeout_script()),
            ("session_script", idle_timeout_from_a_client_script()),
        ] {
            let seeds = std::fs::read_dir(corpus.join(target)).expect("corpus directory");
            let kept = seeds.map(|e| std::fs::read(e.expect("corpus entry").path()).unwrap());
            assert!(kept.into_iter().any(|seed| seed == script), "{target}");
        }
    }

    /// The script of a `session_script` corpus seed: a session with a token whose client proves
    /// itself right (selector 3), a `Hello` offering `CAP_EARLY_AUTH` and `CAP_ZERO_RTT`, its
    /// `EarlyAuth` at the session's clock, a read-only `List`, then an `OpenWrite` before the
    /// `Auth` that would allow it.
    pub(crate) fn zero_rtt_script() -> Vec<u8> {
        use crate::*;
        let mut script = script([
            seed_hello(CAP_EARLY_AUTH | CAP_ZERO_RTT),
            Frame::EarlyAuth(EarlyAuth {
                time_ms: 1_000_000_000,
                proof: vec![0; 32],
            }),
            Frame::List(List { dir: "d".into() }),
            Frame::OpenWrite(OpenWrite {
                name: "f".into(),
                identity: FileIdentity {
                    size: 1,
                    mtime_ns: 0,
                },
                mode: 0o644,
                chunk_size: 1 << 16,
            }),
        ]);
        script[0] = 3;
        script
    }

    /// The script of a `client_script` corpus seed: a client holding the token that sent an
    /// early proof (selector 9), the server's `EarlyChallenge` proving the token and announcing
    /// `CAP_ZERO_RTT`, then `EarlyRefused`, then the `Welcome` announced.
    pub(crate) fn early_refused_script() -> Vec<u8> {
        use crate::*;
        let server_nonce = vec![0x5a; auth::NONCE_LEN];
        let welcome = Welcome {
            version: 1,
            capabilities: CAP_AUTH | CAP_EARLY_AUTH | CAP_ZERO_RTT | CAP_TREE_META,
            max_chunk_size: 1 << 20,
            window: 2,
            agent: "fuzz".into(),
            proof: auth::server_proof(b"fuzz-token", &[0xa5; auth::NONCE_LEN], &server_nonce),
        };
        let mut script = script([
            Frame::EarlyChallenge(EarlyChallenge {
                nonce: server_nonce,
                welcome: welcome.clone(),
            }),
            Frame::EarlyRefused(EarlyRefused {
                reason: "replay".into(),
            }),
            Frame::Welcome(welcome),
        ]);
        script[0] = 9;
        script
    }

    #[test]
    fn early_proofs_reach_both_sides() {
        session_script_now(&zero_rtt_script());
        super::client_script(&early_refused_script());
        let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus");
        for (target, script) in [
            ("session_script", zero_rtt_script()),
            ("client_script", early_refused_script()),
        ] {
            let seeds = std::fs::read_dir(corpus.join(target)).expect("corpus directory");
            let kept = seeds.map(|e| std::fs::read(e.expect("corpus entry").path()).unwrap());
            assert!(kept.into_iter().any(|seed| seed == script), "{target}");
        }
    }

    /// The script of a `session_script` corpus seed: a `Hello` offering `CAP_TREE_SYNC` and
    /// `CAP_TREE_CLOSE`, an `AwaitCommits` naming two uploads, then `Sync`.
    pub(crate) fn await_commits_script() -> Vec<u8> {
        use crate::*;
        let hello = seed_hello(CAP_TREE_SYNC | CAP_TREE_CLOSE);
        let wait = Frame::AwaitCommits(AwaitCommits {
            names: vec!["t/a".into(), "t/b".into()],
        });
        script([hello, wait, Frame::Sync])
    }

    #[test]
    fn a_tree_close_reaches_the_session_within_its_limits() {
        session_script_now(&await_commits_script());
    }

    /// Two small files packed, as the `packed-put-files` vector and the fuzz seeds hold them.
    pub(crate) fn packed_put_files() -> crate::PackedFiles {
        use crate::*;
        let put = |name: &str| {
            Frame::PutFile(PutFile {
                name: name.into(),
                mtime_ns: 0,
                mode: 0o644,
                crc32: crc32fast::hash(b"hello hello hello\n"),
                data: b"hello hello hello\n".to_vec(),
            })
        };
        let frames = [put("a.txt"), put("b.txt")];
        let raw = PackedFiles::encode_frames(&frames).unwrap();
        PackedFiles::new(2, &raw, zstd::bulk::compress(&raw, 19).unwrap())
    }

    #[test]
    fn packed_files_reach_the_session_within_their_limits() {
        session_script_now(&packed_files_script());
        let body = crate::frame::encode_body(&packed_put_files()).unwrap();
        super::unpack_files(&[&[0u8][..], &body].concat());
        super::unpack_files(&[&[1u8][..], &body].concat());
    }

    /// Replays every input the fuzzers kept (`fuzz/corpus/*`), so what they once found stays
    /// fixed without running a fuzzer.
    #[test]
    fn fuzz_corpus_replays() {
        let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus");
        let mut replayed = 0;
        for (target, run) in [
            ("decode_frame", super::decode_frames as fn(&[u8])),
            ("session_script", session_script_now as fn(&[u8])),
            ("client_script", super::client_script as fn(&[u8])),
            ("unpack_files", super::unpack_files as fn(&[u8])),
            ("names", super::names as fn(&[u8])),
        ] {
            for entry in std::fs::read_dir(corpus.join(target)).expect("corpus directory") {
                let path = entry.expect("corpus entry").path();
                run(&std::fs::read(&path).expect("corpus file"));
                replayed += 1;
            }
        }
        assert!(
            replayed >= 10,
            "only {replayed} corpus inputs found under {}",
            corpus.display()
        );
    }
}
