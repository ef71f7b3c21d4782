//! [`RawConn`]: one TCP connection speaking frames by hand, for what the real client never
//! sends (malformed input, requests out of order, stolen credentials), and the frames it sends.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::Duration;

use bytes::BytesMut;
use rand::RngCore;
use tokio_util::codec::Decoder;
use xfer_proto::{
    auth, Auth, ErrorCode, ErrorFrame, FileIdentity, Frame, FrameCodec, Hello, List, OpenRead,
    OpenWrite, Welcome, CAP_AUTH, PROTOCOL_VERSION,
};

/// Hang guard for one read from the daemon: it must answer or close long before this (the
/// handshake timeout, the longest the daemon may legitimately stay silent here, is 10 s).
pub const READ_GUARD: Duration = Duration::from_secs(60);

/// A fresh 32-byte nonce.
pub fn nonce() -> Vec<u8> {
    let mut nonce = vec![0u8; auth::NONCE_LEN];
    rand::thread_rng().fill_bytes(&mut nonce);
    nonce
}

/// A plaintext `Hello` with `capabilities` and `nonce`.
pub fn hello(capabilities: u64, nonce: Vec<u8>) -> Frame {
    Frame::Hello(Hello {
        version: PROTOCOL_VERSION,
        min_version: 1,
        capabilities,
        agent: "xfer-tests/raw".into(),
        nonce,
    })
}

/// `GetFile` of `name` (up to 1 MiB).
pub fn get_file(name: &str) -> Frame {
    Frame::GetFile(xfer_proto::GetFile {
        name: name.into(),
        max_size: 1 << 20,
    })
}

/// `ListTree` of `dir`, without digests.
pub fn list_tree_frame(dir: &str) -> Frame {
    Frame::ListTree(xfer_proto::ListTree {
        dir: dir.into(),
        digests: false,
    })
}

/// `PutFile` of `name` holding `data`.
pub fn put_file(name: &str, data: &[u8]) -> Frame {
    Frame::PutFile(xfer_proto::PutFile {
        name: name.into(),
        mtime_ns: 1_000_000_000,
        mode: 0o644,
        crc32: xfer_proto::Data::new(0, 0, bytes::Bytes::copy_from_slice(data)).crc32,
        data: data.to_vec(),
    })
}

/// `MakeDir` of `name`.
pub fn make_dir(name: &str) -> Frame {
    Frame::MakeDir(xfer_proto::MakeDir {
        name: name.into(),
        mode: 0o755,
        mtime_ns: 1_000_000_000,
    })
}

/// `MakeLink` of `name` pointing to `target`.
pub fn make_link(name: &str, target: &str) -> Frame {
    Frame::MakeLink(xfer_proto::MakeLink {
        name: name.into(),
        target: target.into(),
    })
}

/// An `Auth` frame carrying `proof` (made with the token; no copy grant).
pub fn auth_frame(proof: Vec<u8>) -> Frame {
    Frame::Auth(Auth { proof, grant: None })
}

/// The whole encoded frame.
pub fn encode(frame: &Frame) -> Vec<u8> {
    let mut buf = BytesMut::new();
    frame.encode(&mut buf).expect("encode");
    buf.to_vec()
}

/// `OpenWrite` of `name` for a file of `size` bytes.
pub fn open_write(name: &str, size: u64) -> Frame {
    Frame::OpenWrite(OpenWrite {
        name: name.into(),
        identity: FileIdentity {
            size,
            mtime_ns: 1_000_000_000,
        },
        mode: 0o644,
        chunk_size: 64 * 1024,
    })
}

/// `OpenRead` of `name`.
pub fn open_read(name: &str) -> Frame {
    Frame::OpenRead(OpenRead {
        name: name.into(),
        have_identity: None,
        have: Vec::new(),
    })
}

/// `List` of `dir`.
pub fn list(dir: &str) -> Frame {
    Frame::List(List { dir: dir.into() })
}

/// One TCP connection speaking frames by hand. Every byte sent and received is kept.
pub struct RawConn {
    stream: TcpStream,
    buf: BytesMut,
    /// Everything written to the daemon.
    pub sent: Vec<u8>,
    /// Everything read from the daemon.
    pub received: Vec<u8>,
}

impl RawConn {
    /// Connects to `addr`; reads give up (and fail the test) after [`READ_GUARD`].
    pub fn connect(addr: SocketAddr) -> Self {
        Self::accepted(TcpStream::connect(addr).expect("connect to xferd"))
    }

    /// Connects to `addr` and runs [`handshake`](Self::handshake) with `token`.
    #[track_caller]
    pub fn handshaken(addr: SocketAddr, token: Option<&[u8]>) -> Self {
        let mut conn = Self::connect(addr);
        conn.handshake(token);
        conn
    }

    /// Wraps an accepted connection (the test plays the server).
    pub fn accepted(stream: TcpStream) -> Self {
        stream.set_read_timeout(Some(READ_GUARD)).unwrap();
        Self {
            stream,
            buf: BytesMut::new(),
            sent: Vec::new(),
            received: Vec::new(),
        }
    }

    /// The connection and the bytes read from it but not yet decoded, to read on without
    /// keeping a copy of everything (for large downloads).
    pub fn into_stream(self) -> (TcpStream, BytesMut) {
        (self.stream, self.buf)
    }

    /// Reads everything the peer sends until it closes, without decoding it.
    pub fn drain(&mut self) {
        let mut block = [0u8; 64 * 1024];
        while let Ok(n @ 1..) = read_some(&mut self.stream, &mut block) {
            self.received.extend_from_slice(&block[..n]);
        }
    }

    /// Closes the sending side.
    pub fn shutdown_write(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Write);
    }

    /// Writes raw bytes; the daemon may already have closed, so errors are returned.
    pub fn send_bytes(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.sent.extend_from_slice(bytes);
        self.stream.write_all(bytes)
    }

    /// Writes one frame.
    #[track_caller]
    pub fn send(&mut self, frame: &Frame) {
        let bytes = encode(frame);
        self.send_bytes(&bytes)
            .unwrap_or_else(|e| panic!("sending {:?}: {e}", frame.frame_type()));
    }

    /// The next frame, or `None` once the daemon has closed (or reset) the connection.
    ///
    /// # Panics
    /// On bytes that are not a frame, a close inside a frame, or silence for [`READ_GUARD`].
    pub fn recv(&mut self) -> Option<Frame> {
        let mut codec = FrameCodec::default();
        let mut block = [0u8; 64 * 1024];
        loop {
            match codec.decode(&mut self.buf) {
                Ok(Some(frame)) => return Some(frame),
                Ok(None) => {}
                Err(e) => panic!("xferd sent bytes that are not a frame: {e}"),
            }
            match read_some(&mut self.stream, &mut block) {
                Ok(0) => {
                    assert!(
                        self.buf.is_empty(),
                        "xferd closed the connection inside a frame"
                    );
                    return None;
                }
                Ok(n) => {
                    self.received.extend_from_slice(&block[..n]);
                    self.buf.extend_from_slice(&block[..n]);
                }
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return None,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    panic!("xferd neither answered nor closed within {READ_GUARD:?}")
                }
                Err(e) => panic!("read from xferd: {e}"),
            }
        }
    }

    /// Sends `frame` and returns the answer.
    #[track_caller]
    pub fn request(&mut self, frame: &Frame) -> Frame {
        self.send(frame);
        let what = frame.frame_type();
        self.recv()
            .unwrap_or_else(|| panic!("xferd closed the connection after {what:?}"))
    }

    /// Asserts the daemon sends nothing more and closes.
    #[track_caller]
    pub fn expect_closed(&mut self, after: &str) {
        let next = self.recv();
        assert!(
            next.is_none(),
            "xferd sent {next:?} after {after} instead of closing"
        );
    }

    /// Asserts the next frame is `Error{code}` followed by the close; returns the error.
    #[track_caller]
    pub fn expect_fatal(&mut self, code: ErrorCode, after: &str) -> ErrorFrame {
        let error = match self.recv() {
            Some(Frame::Error(error)) => error,
            other => panic!("after {after}: expected Error{{{code:?}}}, got {other:?}"),
        };
        assert_eq!(
            error.error_code(),
            Some(code),
            "after {after}: wrong error {error:?}"
        );
        self.expect_closed(&format!("Error{{{code:?}}}"));
        error
    }

    /// The whole handshake without TLS: `Hello`, then, with a token, `Challenge` and `Auth`.
    /// Checks the server's proof and returns its `Welcome`.
    #[track_caller]
    pub fn handshake(&mut self, token: Option<&[u8]>) -> Welcome {
        self.handshake_offering(token, 0)
    }

    /// [`handshake`](Self::handshake), offering the capability bits `capabilities`.
    #[track_caller]
    pub fn handshake_offering(&mut self, token: Option<&[u8]>, capabilities: u64) -> Welcome {
        let client_nonce = nonce();
        let answer = self.request(&hello(capabilities, client_nonce.clone()));
        let (welcome, server_nonce) = match (token, answer) {
            (None, Frame::Welcome(w)) => (w, None),
            (Some(token), Frame::Challenge(c)) => {
                let proof = auth::client_proof(token, &client_nonce, &c.nonce);
                match self.request(&auth_frame(proof)) {
                    Frame::Welcome(w) => (w, Some(c.nonce)),
                    other => panic!("xferd answered a right Auth with {other:?}"),
                }
            }
            (token, other) => panic!(
                "xferd answered Hello with {other:?} (test has a token: {})",
                token.is_some()
            ),
        };
        assert_eq!(welcome.version, PROTOCOL_VERSION, "{welcome:?}");
        if let (Some(token), Some(server_nonce)) = (token, server_nonce) {
            assert_ne!(welcome.capabilities & CAP_AUTH, 0, "CAP_AUTH not set");
            assert!(
                auth::verify_server(token, &client_nonce, &server_nonce, &welcome.proof),
                "the daemon's Welcome.proof is not the server proof"
            );
        }
        welcome
    }

    /// A `List` of the root still gets a `Listing`: the connection is usable.
    #[track_caller]
    pub fn assert_usable(&mut self) {
        let answer = self.request(&list(""));
        assert!(
            matches!(answer, Frame::Listing(_)),
            "List answered with {answer:?}"
        );
    }
}

/// One `read`, made again when a signal interrupts it: a socket read with a timeout is not
/// restarted after a signal handler (tokio installs one for SIGCHLD in the test process), and
/// that EINTR is no answer from the peer.
pub fn read_some(stream: &mut impl Read, block: &mut [u8]) -> io::Result<usize> {
    loop {
        match stream.read(block) {
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}

/// The code of an `Error` answer; panics on any other answer.
#[track_caller]
pub fn error_code(answer: Frame, what: &str) -> Option<ErrorCode> {
    match answer {
        Frame::Error(error) => error.error_code(),
        other => panic!("{what}: xferd answered {other:?}, not an Error"),
    }
}

/// True if `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// Decodes the frames at the start of `bytes`; stops at the first incomplete or invalid frame
/// and returns the frames with the number of bytes they took.
pub fn leading_frames(bytes: &[u8], max: usize) -> (Vec<Frame>, usize) {
    let mut buf = BytesMut::from(bytes);
    let mut codec = FrameCodec::default();
    let mut frames = Vec::new();
    while frames.len() < max {
        match codec.decode(&mut buf) {
            Ok(Some(frame)) => frames.push(frame),
            _ => break,
        }
    }
    let used = bytes.len() - buf.len();
    (frames, used)
}
