//! The handler over an in-memory pipe: the order of answers, batching, shutdown and the
//! handshake, with a real root on disk and no socket.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use tokio::io::{AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use xfer_net::{FrameReader, FrameWriter};
use xfer_proto::session::{Handshake, Request};
use xfer_proto::{
    auth, Auth, ChunkRef, Commit, Data, ErrorCode, FileIdentity, Frame, GetFile, Hello, OpenWrite,
    PutFile, Welcome, CAP_AUTH, PROTOCOL_VERSION,
};

use super::{new_session, serve, Handler, Transport};
use crate::{downloads, metrics, registry, Config, Shared};

const CHUNK: usize = 64 * 1024;
const PEER: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 1);

/// A daemon's shared state over a fresh root, as `run` makes it.
fn daemon(configure: impl FnOnce(&mut Config)) -> (tempfile::TempDir, Arc<Shared>) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::new(dir.path().to_path_buf()).unwrap();
    config.chunk_size = CHUNK as u32;
    configure(&mut config);
    let metrics = Arc::new(metrics::Metrics::default());
    let shared = Arc::new(Shared {
        streams: Arc::new(Semaphore::new(config.max_streams)),
        budget: xfer_core::MemoryBudget::new(config.max_memory as usize),
        config,
        registry: Arc::new(registry::Registry::with_metrics(Arc::clone(&metrics))),
        shutdown: tokio_util::sync::CancellationToken::new(),
        downloads: Arc::new(downloads::Downloads::new(Arc::clone(&metrics))),
        metrics,
        writeback: Arc::default(),
        replay: Arc::default(),
        per_address: Arc::default(),
    });
    (dir, shared)
}

/// The client's end of a connection being served.
struct Client {
    reader: FrameReader<ReadHalf<DuplexStream>>,
    /// Written through a `FrameWriter` per send, or raw.
    write: WriteHalf<DuplexStream>,
    served: JoinHandle<()>,
}

impl Client {
    fn connect(shared: &Arc<Shared>) -> Self {
        let (ours, theirs) = tokio::io::duplex(4 << 20);
        let served = tokio::spawn(serve(Arc::clone(shared), theirs, PEER));
        let (read, write) = tokio::io::split(ours);
        Self {
            reader: FrameReader::new(read),
            write,
            served,
        }
    }

    async fn send(&mut self, frame: Frame) {
        FrameWriter::new(&mut self.write)
            .send(&frame)
            .await
            .unwrap();
    }

    /// Sends `frames` in one write, as a pipelining client does.
    async fn send_all(&mut self, frames: &[Frame]) {
        FrameWriter::new(&mut self.write)
            .send_all(frames)
            .await
            .unwrap();
    }

    async fn next(&mut self) -> Frame {
        self.reader.read_frame().await.unwrap().expect("a frame")
    }

    /// The error frame that ends the connection, then its end.
    async fn closed_with(mut self) -> (ErrorCode, String) {
        let Frame::Error(e) = self.next().await else {
            panic!("want an error frame")
        };
        assert!(
            self.reader.read_frame().await.unwrap().is_none(),
            "nothing after the error frame"
        );
        // Half a pipe dropped is not closed: shut it, as a socket closes.
        self.write.shutdown().await.unwrap();
        self.served.await.unwrap();
        (e.error_code().unwrap(), e.message)
    }

    async fn hello(&mut self, nonce: Vec<u8>) {
        self.send(Frame::Hello(Hello {
            version: PROTOCOL_VERSION,
            min_version: 1,
            capabilities: 0,
            agent: "test".into(),
            nonce,
        }))
        .await;
    }

    async fn welcomed(shared: &Arc<Shared>) -> Self {
        let mut client = Self::connect(shared);
        client.hello(vec![]).await;
        let Frame::Welcome(_) = client.next().await else {
            panic!("want Welcome")
        };
        client
    }

    /// Opens an upload of `size` bytes as `name`; returns its transfer id.
    async fn open_write(&mut self, name: &str, size: u64) -> u64 {
        self.send(Frame::OpenWrite(OpenWrite {
            name: name.into(),
            identity: FileIdentity { size, mtime_ns: 0 },
            mode: 0o644,
            chunk_size: CHUNK as u32,
        }))
        .await;
        match self.next().await {
            Frame::WriteOpened(opened) => opened.transfer_id,
            other => panic!("want WriteOpened, got {other:?}"),
        }
    }

    /// Sends as `Data` the bytes of `new` that `held` leaves out, each chunk acknowledged.
    async fn send_missing(&mut self, id: u64, new: &[u8], held: &xfer_core::RangeSet) {
        for range in held.missing(new.len() as u64) {
            for chunk in xfer_core::split_into_chunks(&[range], CHUNK as u32) {
                let bytes = &new[chunk.start as usize..chunk.end as usize];
                let payload = Bytes::copy_from_slice(bytes);
                self.send(Frame::Data(Data::new(id, chunk.start, payload)))
                    .await;
                let Frame::Ack(_) = self.next().await else {
                    panic!("want Ack")
                };
            }
        }
    }

    /// Sends the `Commit` of upload `id` with the digest of the first `len` bytes of `file`.
    async fn send_commit_of(&mut self, id: u64, file: &std::fs::File, len: u64) {
        let digest = xfer_core::digest::digest_file(file, len).unwrap().to_vec();
        self.send(Frame::Commit(Commit {
            transfer_id: id,
            digest,
        }))
        .await;
    }

    async fn goodbye(mut self) {
        self.send(Frame::Goodbye).await;
        assert!(self.reader.read_frame().await.unwrap().is_none());
        self.served.await.unwrap();
    }
}

fn chunk_at(id: u64, offset: usize, bytes: &[u8]) -> Data {
    Data::new(
        id,
        offset as u64,
        Bytes::copy_from_slice(&bytes[offset..offset + CHUNK]),
    )
}

fn put_file(name: &str, data: &[u8]) -> Frame {
    Frame::PutFile(PutFile {
        name: name.into(),
        mtime_ns: 0,
        mode: 0o644,
        crc32: crc32fast::hash(data),
        data: data.to_vec(),
    })
}

fn get_file(name: &str) -> Frame {
    Frame::GetFile(GetFile {
        name: name.into(),
        max_size: 1 << 20,
    })
}

#[tokio::test]
async fn a_good_chunk_then_a_corrupt_one_are_answered_in_order() {
    let (dir, shared) = daemon(|_| {});
    let mut client = Client::welcomed(&shared).await;
    let bytes: Vec<u8> = (0..2 * CHUNK).map(|i| (i % 251) as u8).collect();
    let id = client.open_write("f", bytes.len() as u64).await;
    let good = chunk_at(id, 0, &bytes);
    let mut corrupt = chunk_at(id, CHUNK, &bytes);
    corrupt.crc32 ^= 1;
    // Back to back, so the corrupt chunk is read while the good one is still being written.
    client
        .send_all(&[Frame::Data(good), Frame::Data(corrupt)])
        .await;
    let at = |offset: usize| ChunkRef {
        transfer_id: id,
        offset: offset as u64,
        len: CHUNK as u32,
    };
    assert_eq!(client.next().await, Frame::Ack(at(0)));
    assert_eq!(client.next().await, Frame::Reject(at(CHUNK)));
    // Sent again, the chunk lands and the file commits whole.
    client.send(Frame::Data(chunk_at(id, CHUNK, &bytes))).await;
    assert_eq!(client.next().await, Frame::Ack(at(CHUNK)));
    client
        .send(Frame::Commit(Commit {
            transfer_id: id,
            digest: vec![],
        }))
        .await;
    let Frame::Committed(_) = client.next().await else {
        panic!("want Committed")
    };
    client.goodbye().await;
    assert_eq!(std::fs::read(dir.path().join("f")).unwrap(), bytes);
}

/// A handler the test drives by hand: `frames` arrive pipelined in one write behind a `Hello`
/// it has admitted. Returns it with the client's two ends: answers arrive on the first; the
/// second keeps the stream open.
async fn admitted_handler(
    shared: &Arc<Shared>,
    frames: &[Frame],
) -> (
    Handler,
    ReadHalf<DuplexStream>,
    FrameWriter<WriteHalf<DuplexStream>>,
) {
    let (ours, theirs) = tokio::io::duplex(1 << 20);
    let mut handler = Handler::new(
        Arc::clone(shared),
        PEER,
        new_session(shared),
        theirs.into_frames(),
    );
    let (read, write) = tokio::io::split(ours);
    let mut client = FrameWriter::new(write);
    let hello = Frame::Hello(Hello {
        version: 1,
        min_version: 1,
        capabilities: 0,
        agent: String::new(),
        nonce: vec![],
    });
    let pipelined: Vec<Frame> = std::iter::once(hello)
        .chain(frames.iter().cloned())
        .collect();
    client.send_all(&pipelined).await.unwrap();
    let hello = handler.reader.read_frame().await.unwrap().unwrap();
    assert!(matches!(
        handler.session.handle_handshake(hello),
        Ok(Handshake::Admitted)
    ));
    (handler, read, client)
}

#[tokio::test]
async fn buffered_small_file_requests_are_gathered_into_one_batch() {
    let (_dir, shared) = daemon(|_| {});
    // Three uploads and a download, pipelined in one write.
    let frames = [
        put_file("a", b"1"),
        put_file("b", b"22"),
        put_file("c", b"333"),
        get_file("a"),
    ];
    let (mut handler, _read, _client) = admitted_handler(&shared, &frames).await;
    let first = handler.reader.read_frame().await.unwrap().unwrap();
    let Ok(Request::PutFile(first)) = handler.session.handle_request(first) else {
        panic!("want PutFile")
    };
    let batch = handler
        .gather(
            first,
            |r| r.data.len(),
            |request| match request {
                Request::PutFile(req) => Ok(req),
                other => Err(Box::new(other)),
            },
        )
        .unwrap();
    let names: Vec<_> = batch.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["a", "b", "c"]);
    assert!(
        matches!(&handler.pending, Some(Request::GetFile(r)) if r.name == "a"),
        "the request of another kind is kept for next"
    );
}

#[tokio::test]
async fn buffered_directories_are_made_in_one_batch_and_answered_in_order() {
    let (dir, shared) = daemon(|_| {});
    let make_dir = |name: &str| {
        Frame::MakeDir(xfer_proto::MakeDir {
            name: name.into(),
            mode: 0o750,
            mtime_ns: 1_000_000_007,
        })
    };
    std::fs::write(dir.path().join("file"), b"in the way").unwrap();
    // A link or special file in the way is refused on its own; the others are made.
    std::os::unix::fs::symlink("elsewhere", dir.path().join("link")).unwrap();
    let frames = [
        make_dir("a"),
        make_dir("a/b"),
        make_dir("link"),
        make_dir("c"),
        get_file("file"),
    ];
    let (mut handler, read, _client) = admitted_handler(&shared, &frames).await;
    let first = handler.reader.read_frame().await.unwrap().unwrap();
    let Ok(Request::MakeDir(first)) = handler.session.handle_request(first) else {
        panic!("want MakeDir")
    };
    handler.make_dirs(first).await.unwrap();
    for made in ["a", "a/b", "c"] {
        let st = std::fs::metadata(dir.path().join(made)).unwrap();
        assert!(st.is_dir(), "{made}");
        let mode = std::os::unix::fs::PermissionsExt::mode(&st.permissions());
        assert_eq!(mode & 0o7777, 0o750, "{made}");
    }
    assert!(
        matches!(&handler.pending, Some(Request::GetFile(r)) if r.name == "file"),
        "the request of another kind is kept for next"
    );
    drop(handler);
    let mut answers = FrameReader::new(read);
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(answers.read_frame().await.unwrap().unwrap());
    }
    let done = |name: &str| Frame::Done(xfer_proto::Done { name: name.into() });
    assert_eq!(got[..2], [done("a"), done("a/b")]);
    let Frame::Error(e) = &got[2] else {
        panic!("want an error for the link in the way, got {:?}", got[2])
    };
    assert_eq!(e.error_code(), Some(ErrorCode::BadPath));
    assert_eq!(got[3], done("c"));
}

#[tokio::test]
async fn pipelined_small_files_are_answered_in_order() {
    let (dir, shared) = daemon(|_| {});
    let mut client = Client::welcomed(&shared).await;
    // A bad name in the middle is refused on its own; the files around it are stored.
    client
        .send_all(&[
            put_file("a", b"1"),
            put_file("../escape", b"2"),
            put_file("c", b"3"),
        ])
        .await;
    let done = |name: &str| Frame::Done(xfer_proto::Done { name: name.into() });
    assert_eq!(client.next().await, done("a"));
    let Frame::Error(e) = client.next().await else {
        panic!("want an error for the bad name")
    };
    assert_eq!(e.error_code(), Some(ErrorCode::BadPath));
    assert_eq!(client.next().await, done("c"));
    // And read back in order, a missing file answered in its place.
    client
        .send_all(&[get_file("c"), get_file("missing"), get_file("a")])
        .await;
    let data = |frame: Frame| match frame {
        Frame::FileData(f) => f.data,
        other => panic!("want FileData, got {other:?}"),
    };
    assert_eq!(data(client.next().await), b"3");
    let Frame::Error(e) = client.next().await else {
        panic!("want an error for the missing file")
    };
    assert_eq!(e.error_code(), Some(ErrorCode::NotFound));
    assert_eq!(data(client.next().await), b"1");
    client.goodbye().await;
    assert!(!dir.path().join("../escape").exists());
}

#[tokio::test]
async fn shutdown_while_a_chunk_arrives_ends_the_connection_cleanly() {
    let (dir, shared) = daemon(|_| {});
    let mut client = Client::welcomed(&shared).await;
    let bytes = vec![7u8; CHUNK];
    let id = client.open_write("f", CHUNK as u64).await;
    // Half a chunk: the header and some of the payload, the rest never sent.
    let data = chunk_at(id, 0, &bytes);
    client.write.write_all(&data.header()).await.unwrap();
    let half = &data.payload[..CHUNK / 2];
    client.write.write_all(half).await.unwrap();
    client.write.flush().await.unwrap();
    shared.shutdown.cancel();
    let (code, message) = client.closed_with().await;
    assert_eq!(code, ErrorCode::ShuttingDown);
    assert!(message.contains("resume"), "{message}");
    assert!(
        !dir.path().join("f").exists(),
        "nothing under the final name"
    );
}

#[tokio::test]
async fn a_request_before_hello_is_a_protocol_error() {
    let (_dir, shared) = daemon(|_| {});
    let mut client = Client::connect(&shared);
    client.send(get_file("a")).await;
    let (code, message) = client.closed_with().await;
    assert_eq!(code, ErrorCode::Protocol);
    assert!(message.contains("GetFile"), "{message}");
}

#[tokio::test]
async fn no_common_version_is_refused() {
    let (_dir, shared) = daemon(|_| {});
    let mut client = Client::connect(&shared);
    client
        .send(Frame::Hello(Hello {
            version: PROTOCOL_VERSION + 2,
            min_version: PROTOCOL_VERSION + 1,
            capabilities: 0,
            agent: String::new(),
            nonce: vec![],
        }))
        .await;
    let (code, _) = client.closed_with().await;
    assert_eq!(code, ErrorCode::Version);
}

#[tokio::test]
async fn a_wrong_token_is_refused_and_the_right_one_proven_both_ways() {
    let token: Arc<[u8]> = Arc::from(&b"s3cret"[..]);
    let (_dir, shared) = daemon(|c| c.token = Some(Arc::clone(&token)));
    let nonce = vec![5u8; auth::NONCE_LEN];
    for key in [&b"wrong"[..], &token[..]] {
        let mut client = Client::connect(&shared);
        client.hello(nonce.clone()).await;
        let Frame::Challenge(challenge) = client.next().await else {
            panic!("want Challenge")
        };
        let proof = auth::client_proof(key, &nonce, &challenge.nonce);
        client.send(Frame::Auth(Auth { proof, grant: None })).await;
        if key != &token[..] {
            let (code, _) = client.closed_with().await;
            assert_eq!(code, ErrorCode::Auth);
            continue;
        }
        let Frame::Welcome(Welcome {
            capabilities,
            proof,
            ..
        }) = client.next().await
        else {
            panic!("want Welcome")
        };
        assert_eq!(capabilities, CAP_AUTH);
        assert!(auth::verify_server(key, &nonce, &challenge.nonce, &proof));
        client.goodbye().await;
    }
}

#[tokio::test]
async fn a_client_that_leaves_before_hello_is_let_go() {
    let (_dir, shared) = daemon(|_| {});
    let mut client = Client::connect(&shared);
    client.write.shutdown().await.unwrap();
    let mut reader = client.reader;
    assert!(reader.read_frame().await.unwrap().is_none());
    client.served.await.unwrap();
}

#[tokio::test]
async fn a_download_is_served_by_the_handle_the_session_gave() {
    let (dir, shared) = daemon(|_| {});
    let bytes: Vec<u8> = (0..CHUNK + 10).map(|i| (i % 13) as u8).collect();
    std::fs::write(dir.path().join("d"), &bytes).unwrap();
    let mut client = Client::welcomed(&shared).await;
    client
        .send(Frame::OpenRead(xfer_proto::OpenRead {
            name: "d".into(),
            have_identity: None,
            have: vec![],
        }))
        .await;
    let Frame::ReadOpened(opened) = client.next().await else {
        panic!("want ReadOpened")
    };
    assert_eq!(opened.identity.size, bytes.len() as u64);
    let id = opened.transfer_id;
    let read = |offset: usize, len: usize| ChunkRef {
        transfer_id: id,
        offset: offset as u64,
        len: len as u32,
    };
    client
        .send_all(&[
            Frame::ReadChunk(read(0, CHUNK)),
            Frame::ReadChunk(read(CHUNK, 10)),
            Frame::DigestRequest(Commit {
                transfer_id: id,
                digest: vec![],
            }),
        ])
        .await;
    let mut received = Vec::new();
    for _ in 0..2 {
        let Frame::Data(data) = client.next().await else {
            panic!("want Data")
        };
        data.verify().unwrap();
        received.extend_from_slice(&data.payload);
    }
    assert_eq!(received, bytes);
    let Frame::DigestReply(reply) = client.next().await else {
        panic!("want DigestReply")
    };
    assert_eq!((reply.transfer_id, reply.digest.len()), (id, 16));
    // The download's handle is no upload's: data sent to it ends the connection.
    client
        .send(Frame::Data(Data::new(id, 0, Bytes::from_static(b"x"))))
        .await;
    let (code, message) = client.closed_with().await;
    assert_eq!(code, ErrorCode::Protocol);
    assert!(message.contains("not an open upload"), "{message}");
}

/// Bytes that cut into many distinct content-defined chunks.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[tokio::test]
async fn a_basis_rewritten_during_a_delta_gives_fewer_matches_never_wrong_bytes() {
    use xfer_core::delta::{cut_region, MIN_AVG_CHUNK};
    use xfer_proto::{ByteRange, DeltaOpen, DeltaSig, CAP_DELTA};

    let (dir, shared) = daemon(|_| {});
    let new = noise(1 << 20, 3);
    std::fs::write(dir.path().join("f"), &new).unwrap();
    let mut client = Client::connect(&shared);
    client
        .send(Frame::Hello(Hello {
            version: PROTOCOL_VERSION,
            min_version: 1,
            capabilities: CAP_DELTA,
            agent: "test".into(),
            nonce: vec![],
        }))
        .await;
    let Frame::Welcome(_) = client.next().await else {
        panic!("want Welcome")
    };
    let id = client.open_write("f", new.len() as u64).await;
    client
        .send(Frame::DeltaOpen(DeltaOpen { transfer_id: id }))
        .await;
    let Frame::DeltaIndex(index) = client.next().await else {
        panic!("want DeltaIndex")
    };
    assert_eq!(index.avg_chunk, MIN_AVG_CHUNK);

    // Indexed as `new`, the basis now holds other bytes in its second half.
    let mut rewritten = new.clone();
    rewritten[new.len() / 2..].copy_from_slice(&noise(new.len() / 2, 4));
    std::fs::write(dir.path().join("f"), &rewritten).unwrap();

    let sig_file = tempfile::tempfile().unwrap();
    std::os::unix::fs::FileExt::write_all_at(&sig_file, &new, 0).unwrap();
    let mut chunks = Vec::new();
    cut_region(
        &sig_file,
        ByteRange::new(0, new.len() as u64),
        MIN_AVG_CHUNK,
        |c| {
            chunks.push(c.sig());
            true
        },
    )
    .unwrap();
    client
        .send(Frame::DeltaSig(DeltaSig {
            transfer_id: id,
            offset: 0,
            chunks,
        }))
        .await;
    let Frame::DeltaMatch(found) = client.next().await else {
        panic!("want DeltaMatch")
    };
    let matched: u64 = found.matched.iter().map(ByteRange::len).sum();
    assert!(
        matched > 0 && matched <= new.len() as u64 / 2 + 4 * 65536,
        "{found:?}"
    );

    // What was not copied is sent; the file commits as `new`, its digest checked.
    let held = xfer_core::RangeSet::from_ranges(found.matched);
    client.send_missing(id, &new, &held).await;
    client.send_commit_of(id, &sig_file, new.len() as u64).await;
    let Frame::Committed(_) = client.next().await else {
        panic!("want Committed")
    };
    client.goodbye().await;
    assert_eq!(std::fs::read(dir.path().join("f")).unwrap(), new);
}

#[tokio::test]
async fn a_delta_without_the_capability_or_a_basis_is_refused() {
    let (_dir, shared) = daemon(|_| {});
    let mut client = Client::welcomed(&shared).await;
    let id = client.open_write("absent", 10).await;
    client
        .send(Frame::DeltaOpen(xfer_proto::DeltaOpen { transfer_id: id }))
        .await;
    let (code, _) = client.closed_with().await;
    assert_eq!(code, ErrorCode::Protocol);

    let mut client = Client::connect(&shared);
    client
        .send(Frame::Hello(Hello {
            version: PROTOCOL_VERSION,
            min_version: 1,
            capabilities: xfer_proto::CAP_DELTA,
            agent: "test".into(),
            nonce: vec![],
        }))
        .await;
    let Frame::Welcome(_) = client.next().await else {
        panic!("want Welcome")
    };
    let id = client.open_write("absent", 10).await;
    client
        .send(Frame::DeltaOpen(xfer_proto::DeltaOpen { transfer_id: id }))
        .await;
    let Frame::Error(e) = client.next().await else {
        panic!("want Error")
    };
    assert_eq!(e.error_code(), Some(ErrorCode::NotFound));
    // The upload goes on whole; a DeltaSig without an index ends the connection.
    client
        .send(Frame::DeltaSig(xfer_proto::DeltaSig {
            transfer_id: id,
            offset: 0,
            chunks: vec![xfer_proto::SigChunk {
                len: 10,
                hash: [0; 16],
            }],
        }))
        .await;
    let (code, _) = client.closed_with().await;
    assert_eq!(code, ErrorCode::Protocol);
}

#[tokio::test]
async fn auto_compression_of_what_a_connection_sends_counts_its_socket() {
    let (_dir, shared) = daemon(|_| {});
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let _client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (socket, _) = listener.accept().await.unwrap();
    let fd = socket.fd();
    let mut handler = Handler::new(
        Arc::clone(&shared),
        PEER,
        new_session(&shared),
        socket.into_frames(),
    );
    handler.socket = fd;
    handler.set_compression(xfer_net::Compression::Level(3).wire());
    assert!(handler.counted.is_none(), "a fixed level measures nothing");
    // Under auto the probes measure what the client acknowledged: the socket is counted.
    handler.set_compression(xfer_net::Compression::Auto.wire());
    assert!(handler.counted.is_some());
}

#[test]
fn the_window_counts_frames_or_with_the_byte_window_their_slots() {
    use super::window_breached;
    let chunk: u32 = 16 << 20;
    let whole = u64::from(chunk);
    // Counted in frames: two unanswered breach a window of one, never one of two.
    assert!(window_breached(1, None, 20_000, 20_000));
    assert!(!window_breached(2, None, whole, whole));
    // Counted by size: two light files' literal data fit a window of one, a whole chunk and
    // anything more do not, and two whole chunks fit a window of two.
    assert!(!window_breached(1, Some(chunk), 20_000, 20_000));
    assert!(window_breached(1, Some(chunk), whole, 20_000));
    assert!(window_breached(1, Some(chunk), whole / 2, whole / 2 + 1));
    assert!(!window_breached(1, Some(chunk), whole / 2, whole / 2));
    assert!(!window_breached(2, Some(chunk), whole, whole));
}

/// The early flight a client sends a daemon it has seen take early proofs: `Hello` offering
/// `CAP_ZERO_RTT`, `EarlyAuth` made with `key` now, and a `List` of the root.
fn early_flight(key: &[u8], nonce: &[u8]) -> Vec<Frame> {
    let time_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    vec![
        Frame::Hello(Hello {
            version: PROTOCOL_VERSION,
            min_version: 1,
            capabilities: xfer_proto::CAP_EARLY_AUTH | xfer_proto::CAP_ZERO_RTT,
            agent: "test".into(),
            nonce: nonce.to_vec(),
        }),
        Frame::EarlyAuth(xfer_proto::EarlyAuth {
            time_ms,
            proof: auth::zero_rtt_proof(key, nonce, time_ms),
        }),
        Frame::List(xfer_proto::List { dir: String::new() }),
    ]
}

#[tokio::test]
async fn an_early_proof_is_served_at_once_refused_when_replayed_and_fails_when_wrong() {
    let token: Arc<[u8]> = Arc::from(&b"s3cret"[..]);
    let (dir, shared) = daemon(|c| c.token = Some(Arc::clone(&token)));
    std::fs::write(dir.path().join("listed.txt"), b"x").unwrap();
    let nonce = vec![5u8; auth::NONCE_LEN];
    // Taken: the challenge, the Welcome and the listing, all before the client's Auth.
    let mut client = Client::connect(&shared);
    client.send_all(&early_flight(&token, &nonce)).await;
    let Frame::EarlyChallenge(challenge) = client.next().await else {
        panic!("want EarlyChallenge")
    };
    assert_eq!(
        client.next().await,
        Frame::Welcome(challenge.welcome.clone())
    );
    let Frame::Listing(listing) = client.next().await else {
        panic!("want the listing")
    };
    assert_eq!(listing.entries[0].name, "listed.txt");
    let proof = auth::client_proof(&token, &nonce, &challenge.nonce);
    client.send(Frame::Auth(Auth { proof, grant: None })).await;
    client.open_write("up.bin", 1).await;
    client.goodbye().await;
    assert_eq!(shared.metrics.early_proofs.accepted.get(), 1);
    // The same flight again: refused, its listing discarded, the challenge answered instead.
    let mut client = Client::connect(&shared);
    client.send_all(&early_flight(&token, &nonce)).await;
    let Frame::EarlyChallenge(challenge) = client.next().await else {
        panic!("want EarlyChallenge")
    };
    let Frame::EarlyRefused(refused) = client.next().await else {
        panic!("want EarlyRefused")
    };
    assert_eq!(refused.reason, "replay");
    let proof = auth::client_proof(&token, &nonce, &challenge.nonce);
    let list = Frame::List(xfer_proto::List { dir: String::new() });
    client
        .send_all(&[Frame::Auth(Auth { proof, grant: None }), list])
        .await;
    assert_eq!(client.next().await, Frame::Welcome(challenge.welcome));
    assert!(
        matches!(client.next().await, Frame::Listing(_)),
        "one listing only"
    );
    client.goodbye().await;
    assert_eq!(shared.metrics.early_proofs.replay.get(), 1);
    // A wrong token: refused as a wrong Auth is.
    let mut client = Client::connect(&shared);
    client
        .send_all(&early_flight(b"wrong", &[6u8; auth::NONCE_LEN]))
        .await;
    assert!(matches!(client.next().await, Frame::EarlyChallenge(_)));
    let (code, _) = client.closed_with().await;
    assert_eq!(code, ErrorCode::Auth);
    assert_eq!(shared.metrics.early_proofs.wrong.get(), 1);
}

#[tokio::test]
async fn a_light_file_is_answered_before_its_copies_are_written_and_commits_after_them() {
    use xfer_core::delta::{avg_chunk, cut_region};
    use xfer_proto::{ByteRange, DeltaPut, CAP_DELTA, CAP_DELTA_PUT};

    let (dir, shared) = daemon(|_| {});
    let old = noise(1 << 20, 5);
    let mut new = old.clone();
    new[300_000..308_192].copy_from_slice(&noise(8192, 6));
    std::fs::write(dir.path().join("light"), &old).unwrap();
    let new_file = tempfile::tempfile().unwrap();
    std::os::unix::fs::FileExt::write_all_at(&new_file, &new, 0).unwrap();
    let avg = avg_chunk(new.len() as u64);
    let mut chunks = Vec::new();
    cut_region(&new_file, ByteRange::new(0, new.len() as u64), avg, |c| {
        chunks.push(c.sig());
        true
    })
    .unwrap();

    let mut client = Client::connect(&shared);
    client
        .send(Frame::Hello(Hello {
            version: PROTOCOL_VERSION,
            min_version: 1,
            capabilities: CAP_DELTA | CAP_DELTA_PUT,
            agent: "test".into(),
            nonce: vec![],
        }))
        .await;
    let Frame::Welcome(_) = client.next().await else {
        panic!("want Welcome")
    };
    // No matched run reaches the disk until the gate is closed.
    let gate = super::delta::tests_gate::hold("light");
    client
        .send(Frame::DeltaPut(DeltaPut {
            open: OpenWrite {
                name: "light".into(),
                identity: FileIdentity {
                    size: new.len() as u64,
                    mtime_ns: 0,
                },
                mode: 0o644,
                chunk_size: CHUNK as u32,
            },
            avg_chunk: avg,
            chunks,
        }))
        .await;
    let Frame::WriteOpened(opened) = client.next().await else {
        panic!("want WriteOpened")
    };
    let id = opened.transfer_id;
    // Only a hang guard: answered after the copies, the match would never come.
    let Ok(Frame::DeltaMatch(found)) =
        tokio::time::timeout(std::time::Duration::from_secs(60), client.next()).await
    else {
        panic!("want DeltaMatch while the copies are held")
    };
    let held = xfer_core::RangeSet::from_ranges(found.matched);
    let missing = held.missing(new.len() as u64);
    assert!(!missing.is_empty() && held.total() > 0, "{missing:?}");

    // The literal data is written beside the held copies.
    client.send_missing(id, &new, &held).await;
    client.send_commit_of(id, &new_file, new.len() as u64).await;
    // The handler (on this thread) reads the commit and waits for the copies: no answer yet,
    // where a commit that did not wait would have answered that bytes are missing.
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    assert!(
        futures_util::FutureExt::now_or_never(client.next()).is_none(),
        "the commit was answered while its copies were held"
    );
    assert_eq!(
        std::fs::read(dir.path().join("light")).unwrap(),
        old,
        "the old file stays under the name until the commit"
    );
    gate.close();
    match client.next().await {
        Frame::Committed(_) => {}
        other => panic!("want Committed, got {other:?}"),
    }
    client.goodbye().await;
    assert_eq!(std::fs::read(dir.path().join("light")).unwrap(), new);
}

#[tokio::test]
async fn names_that_are_not_utf8_are_listed_escaped_only_to_a_client_that_takes_them() {
    use std::os::unix::ffi::OsStrExt;
    use xfer_proto::{List, ListTree, CAP_RAW_NAMES};

    let (dir, shared) = daemon(|_| {});
    let latin1 = std::ffi::OsStr::from_bytes(b"caf\xe9");
    std::fs::write(dir.path().join(latin1), b"x").unwrap();
    std::fs::write(dir.path().join("plain"), b"y").unwrap();
    let escaped = xfer_proto::names::escape(b"caf\xe9").into_owned();
    for (capabilities, want) in [
        (0, vec!["plain".to_string()]),
        (CAP_RAW_NAMES, vec![escaped.clone(), "plain".into()]),
    ] {
        let mut client = Client::connect(&shared);
        client
            .send(Frame::Hello(Hello {
                version: PROTOCOL_VERSION,
                min_version: 1,
                capabilities,
                agent: "test".into(),
                nonce: vec![],
            }))
            .await;
        let Frame::Welcome(welcome) = client.next().await else {
            panic!("want Welcome")
        };
        assert_eq!(welcome.capabilities & CAP_RAW_NAMES, capabilities);
        client.send(Frame::List(List { dir: String::new() })).await;
        let Frame::Listing(listing) = client.next().await else {
            panic!("want Listing")
        };
        let names: Vec<_> = listing.entries.iter().map(|e| e.name.clone()).collect();
        assert_eq!(names, want);
        let tree = ListTree {
            dir: String::new(),
            digests: false,
        };
        client.send(Frame::ListTree(tree)).await;
        let Frame::TreeListing(listing) = client.next().await else {
            panic!("want TreeListing")
        };
        let paths: Vec<_> = listing.entries.iter().map(|e| e.path.clone()).collect();
        assert_eq!(paths[1..], want[..]);
        client.goodbye().await;
    }
    // The escaped name opens the file it stands for.
    let mut client = Client::welcomed(&shared).await;
    let get = GetFile {
        name: escaped,
        max_size: 1 << 20,
    };
    client.send(Frame::GetFile(get)).await;
    let Frame::FileData(data) = client.next().await else {
        panic!("want FileData")
    };
    assert_eq!(&data.data[..], b"x");
    client.goodbye().await;
}
