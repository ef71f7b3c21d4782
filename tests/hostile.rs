//! Tools for the security and limits tests: a raw frame-level client that records every byte it
//! sends and receives, an `xfer` runner with a controlled environment and a hang guard, a relay
//! that records the bytes between a real client and a daemon, a test PKI made with `rcgen`, and
//! snapshots of a directory outside the daemon's root. Nothing here stands in for `xferd` or
//! `xfer`: they are always the real binaries.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::BytesMut;
use rand::RngCore;
use tokio_util::codec::Decoder;
use xfer_proto::{
    auth, Auth, ErrorCode, ErrorFrame, FileIdentity, Frame, FrameCodec, Hello, List, OpenRead,
    OpenWrite, Welcome, CAP_AUTH, PROTOCOL_VERSION,
};
use xfer_tests::{bin, sha256_file, XferOutput};

/// Hang guard for one read from the daemon: it must answer or close long before this (the
/// handshake timeout, the longest the daemon may legitimately stay silent here, is 10 s).
pub(crate) const READ_GUARD: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// Raw connections
// ---------------------------------------------------------------------------------------------

/// A fresh 32-byte nonce.
pub(crate) fn nonce() -> Vec<u8> {
    let mut nonce = vec![0u8; auth::NONCE_LEN];
    rand::thread_rng().fill_bytes(&mut nonce);
    nonce
}

/// A plaintext `Hello` with `capabilities` and `nonce`.
pub(crate) fn hello(capabilities: u64, nonce: Vec<u8>) -> Frame {
    Frame::Hello(Hello {
        version: PROTOCOL_VERSION,
        min_version: 1,
        capabilities,
        agent: "xfer-tests/hostile".into(),
        nonce,
    })
}

/// `GetFile` of `name` (up to 1 MiB).
pub(crate) fn get_file(name: &str) -> Frame {
    Frame::GetFile(xfer_proto::GetFile {
        name: name.into(),
        max_size: 1 << 20,
    })
}

/// `ListTree` of `dir`, without digests.
pub(crate) fn list_tree_frame(dir: &str) -> Frame {
    Frame::ListTree(xfer_proto::ListTree {
        dir: dir.into(),
        digests: false,
    })
}

/// `PutFile` of `name` holding `data`.
pub(crate) fn put_file(name: &str, data: &[u8]) -> Frame {
    Frame::PutFile(xfer_proto::PutFile {
        name: name.into(),
        mtime_ns: 1_000_000_000,
        mode: 0o644,
        crc32: xfer_proto::Data::new(0, 0, bytes::Bytes::copy_from_slice(data)).crc32,
        data: data.to_vec(),
    })
}

/// `MakeDir` of `name`.
pub(crate) fn make_dir(name: &str) -> Frame {
    Frame::MakeDir(xfer_proto::MakeDir {
        name: name.into(),
        mode: 0o755,
        mtime_ns: 1_000_000_000,
    })
}

/// `MakeLink` of `name` pointing to `target`.
pub(crate) fn make_link(name: &str, target: &str) -> Frame {
    Frame::MakeLink(xfer_proto::MakeLink {
        name: name.into(),
        target: target.into(),
    })
}

/// An `Auth` frame carrying `proof` (made with the token; no copy grant).
pub(crate) fn auth_frame(proof: Vec<u8>) -> Frame {
    Frame::Auth(Auth { proof, grant: None })
}

/// The whole encoded frame.
pub(crate) fn encode(frame: &Frame) -> Vec<u8> {
    let mut buf = BytesMut::new();
    frame.encode(&mut buf).expect("encode");
    buf.to_vec()
}

/// `OpenWrite` of `name` for a file of `size` bytes.
pub(crate) fn open_write(name: &str, size: u64) -> Frame {
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
pub(crate) fn open_read(name: &str) -> Frame {
    Frame::OpenRead(OpenRead {
        name: name.into(),
        have_identity: None,
        have: Vec::new(),
    })
}

/// `List` of `dir`.
pub(crate) fn list(dir: &str) -> Frame {
    Frame::List(List { dir: dir.into() })
}

/// One TCP connection speaking frames by hand. Every byte sent and received is kept.
pub(crate) struct RawConn {
    stream: TcpStream,
    buf: BytesMut,
    /// Everything written to the daemon.
    pub(crate) sent: Vec<u8>,
    /// Everything read from the daemon.
    pub(crate) received: Vec<u8>,
}

impl RawConn {
    /// Connects to `addr`; reads give up (and fail the test) after [`READ_GUARD`].
    pub(crate) fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).expect("connect to xferd");
        stream.set_read_timeout(Some(READ_GUARD)).unwrap();
        Self {
            stream,
            buf: BytesMut::new(),
            sent: Vec::new(),
            received: Vec::new(),
        }
    }

    /// Wraps an accepted connection (the test plays the server).
    pub(crate) fn accepted(stream: TcpStream) -> Self {
        stream.set_read_timeout(Some(READ_GUARD)).unwrap();
        Self {
            stream,
            buf: BytesMut::new(),
            sent: Vec::new(),
            received: Vec::new(),
        }
    }

    /// Reads everything the peer sends until it closes, without decoding it.
    pub(crate) fn drain(&mut self) {
        let mut block = [0u8; 64 * 1024];
        loop {
            match self.stream.read(&mut block) {
                Ok(n @ 1..) => self.received.extend_from_slice(&block[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Ok(0) | Err(_) => break,
            }
        }
    }

    /// Closes the sending side.
    pub(crate) fn shutdown_write(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Write);
    }

    /// Writes raw bytes; the daemon may already have closed, so errors are returned.
    pub(crate) fn send_bytes(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.sent.extend_from_slice(bytes);
        self.stream.write_all(bytes)
    }

    /// Writes one frame.
    #[track_caller]
    pub(crate) fn send(&mut self, frame: &Frame) {
        let bytes = encode(frame);
        self.send_bytes(&bytes)
            .unwrap_or_else(|e| panic!("sending {:?}: {e}", frame.frame_type()));
    }

    /// The next frame, or `None` once the daemon has closed (or reset) the connection.
    ///
    /// # Panics
    /// On bytes that are not a frame, a close inside a frame, or silence for [`READ_GUARD`].
    pub(crate) fn recv(&mut self) -> Option<Frame> {
        let mut codec = FrameCodec::default();
        let mut block = [0u8; 64 * 1024];
        loop {
            match codec.decode(&mut self.buf) {
                Ok(Some(frame)) => return Some(frame),
                Ok(None) => {}
                Err(e) => panic!("xferd sent bytes that are not a frame: {e}"),
            }
            match self.stream.read(&mut block) {
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
                // A signal for another thread of the test process can land here: read again.
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    panic!("xferd neither answered nor closed within {READ_GUARD:?}")
                }
                Err(e) => panic!("read from xferd: {e}"),
            }
        }
    }

    /// Sends `frame` and returns the answer.
    #[track_caller]
    pub(crate) fn request(&mut self, frame: &Frame) -> Frame {
        self.send(frame);
        let what = frame.frame_type();
        self.recv()
            .unwrap_or_else(|| panic!("xferd closed the connection after {what:?}"))
    }

    /// Asserts the daemon sends nothing more and closes.
    #[track_caller]
    pub(crate) fn expect_closed(&mut self, after: &str) {
        let next = self.recv();
        assert!(
            next.is_none(),
            "xferd sent {next:?} after {after} instead of closing"
        );
    }

    /// Asserts the next frame is `Error{code}` followed by the close; returns the error.
    #[track_caller]
    pub(crate) fn expect_fatal(&mut self, code: ErrorCode, after: &str) -> ErrorFrame {
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
    pub(crate) fn handshake(&mut self, token: Option<&[u8]>) -> Welcome {
        let client_nonce = nonce();
        let answer = self.request(&hello(0, client_nonce.clone()));
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
    pub(crate) fn assert_usable(&mut self) {
        let answer = self.request(&list(""));
        assert!(
            matches!(answer, Frame::Listing(_)),
            "List answered with {answer:?}"
        );
    }
}

/// The code of an `Error` answer; panics on any other answer.
#[track_caller]
pub(crate) fn error_code(answer: Frame, what: &str) -> Option<ErrorCode> {
    match answer {
        Frame::Error(error) => error.error_code(),
        other => panic!("{what}: xferd answered {other:?}, not an Error"),
    }
}

/// True if `needle` occurs in `haystack`.
pub(crate) fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

// ---------------------------------------------------------------------------------------------
// The xfer client with a controlled environment
// ---------------------------------------------------------------------------------------------

/// Runs `xfer ARGS…` with `XFER_TOKEN` removed from the environment and `env` added, and waits
/// at most `guard` for it (a hang guard: past it the client is killed and the test fails).
#[track_caller]
pub(crate) fn run_xfer<S: AsRef<std::ffi::OsStr>>(
    args: impl IntoIterator<Item = S>,
    env: &[(&str, &str)],
    guard: Duration,
) -> XferOutput {
    let args: Vec<OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let cmd = std::iter::once("xfer".to_owned())
        .chain(args.iter().map(|a| a.to_string_lossy().into_owned()))
        .collect::<Vec<_>>()
        .join(" ");
    let logs = tempfile::Builder::new()
        .prefix("xfer-log-")
        .tempdir()
        .expect("tempdir");
    let mut command = Command::new(bin("xfer"));
    command
        .args(&args)
        .env_remove("XFER_TOKEN")
        .stdin(Stdio::null())
        .stdout(File::create(logs.path().join("stdout")).expect("log file"))
        .stderr(File::create(logs.path().join("stderr")).expect("log file"));
    for (key, value) in env {
        command.env(key, value);
    }
    let mut child = command.spawn().expect("spawn xfer");
    let end = Instant::now() + guard;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() >= end {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "`{cmd}` still running after {guard:?} (a hang); killed. stderr:\n{}",
                String::from_utf8_lossy(&fs::read(logs.path().join("stderr")).unwrap_or_default())
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let read = |f: &str| {
        String::from_utf8_lossy(&fs::read(logs.path().join(f)).unwrap_or_default()).into_owned()
    };
    XferOutput {
        cmd,
        status,
        stdout: read("stdout"),
        stderr: read("stderr"),
    }
}

// ---------------------------------------------------------------------------------------------
// A recording relay
// ---------------------------------------------------------------------------------------------

/// The bytes of one relayed connection, each direction in order.
#[derive(Debug, Default, Clone)]
pub(crate) struct Captured {
    /// Client to daemon.
    pub(crate) up: Vec<u8>,
    /// Daemon to client.
    pub(crate) down: Vec<u8>,
}

type Connections = Arc<Mutex<Vec<Arc<Mutex<Captured>>>>>;

/// A TCP relay on `127.0.0.1:0` in front of `upstream` that records every byte it forwards:
/// what a real client and daemon put on the wire. Threads end when their connections do.
pub(crate) struct Tee {
    addr: SocketAddr,
    conns: Connections,
    stop: Arc<AtomicBool>,
}

impl Tee {
    /// Starts relaying to `upstream`.
    pub(crate) fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind relay");
        let addr = listener.local_addr().unwrap();
        let conns: Connections = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (conns2, stop2) = (Arc::clone(&conns), Arc::clone(&stop));
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                let captured = Arc::new(Mutex::new(Captured::default()));
                conns2.lock().unwrap().push(Arc::clone(&captured));
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let cap2 = Arc::clone(&captured);
                std::thread::spawn(move || pump(client, server, &captured, true));
                std::thread::spawn(move || pump(s2, c2, &cap2, false));
            }
        });
        Self { addr, conns, stop }
    }

    /// Where clients connect.
    pub(crate) fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// What each connection carried so far, in accept order.
    pub(crate) fn captured(&self) -> Vec<Captured> {
        self.conns
            .lock()
            .unwrap()
            .iter()
            .map(|c| c.lock().unwrap().clone())
            .collect()
    }
}

impl Drop for Tee {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, captured: &Mutex<Captured>, up: bool) {
    let mut block = [0u8; 64 * 1024];
    loop {
        match from.read(&mut block) {
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Ok(0) | Err(_) => break,
            Ok(n) => {
                {
                    let mut c = captured.lock().unwrap();
                    let dir = if up { &mut c.up } else { &mut c.down };
                    dir.extend_from_slice(&block[..n]);
                }
                if to.write_all(&block[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// Decodes the frames at the start of `bytes`; stops at the first incomplete or invalid frame
/// and returns the frames with the number of bytes they took.
pub(crate) fn leading_frames(bytes: &[u8], max: usize) -> (Vec<Frame>, usize) {
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

// ---------------------------------------------------------------------------------------------
// An impostor server
// ---------------------------------------------------------------------------------------------

/// A plaintext server on `127.0.0.1:0` that answers each connection with a script, then keeps
/// everything the client sends until it closes: what a real client does facing an attacker.
pub(crate) struct Impostor {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<Vec<u8>>>,
}

impl Impostor {
    /// Serves connections one at a time with `script` until [`finish`](Self::finish).
    pub(crate) fn start(script: impl Fn(&mut RawConn) + Send + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind impostor");
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for stream in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let mut conn = RawConn::accepted(stream);
                script(&mut conn);
                conn.drain();
                seen.push(conn.received);
            }
            seen
        });
        Self { addr, stop, thread }
    }

    /// Where clients connect.
    pub(crate) fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// Stops serving; returns the bytes each connection's client sent, in order.
    pub(crate) fn finish(self) -> Vec<Vec<u8>> {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        self.thread.join().expect("impostor thread")
    }
}

// ---------------------------------------------------------------------------------------------
// Test PKI
// ---------------------------------------------------------------------------------------------

/// A CA and a leaf certificate for `127.0.0.1` and `localhost` signed by it, plus an unrelated
/// second CA, written as PEM files into a temporary directory.
pub(crate) struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    /// Generates everything (a leaf for `names`, which is not a CA itself).
    pub(crate) fn new(names: &[&str]) -> Self {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
            KeyUsagePurpose,
        };
        let dir = tempfile::Builder::new()
            .prefix("xfer-pki-")
            .tempdir()
            .expect("tempdir");
        let make_ca = |cn: &str| {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.distinguished_name.push(DnType::CommonName, cn);
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let key = KeyPair::generate().unwrap();
            let cert = params.self_signed(&key).unwrap();
            (cert, key)
        };
        let (ca, ca_key) = make_ca("xfer test CA");
        let (other_ca, _) = make_ca("xfer unrelated CA");
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "xferd test server");
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = params.signed_by(&leaf_key, &ca, &ca_key).unwrap();
        fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        fs::write(dir.path().join("other-ca.pem"), other_ca.pem()).unwrap();
        fs::write(dir.path().join("cert.pem"), leaf.pem()).unwrap();
        fs::write(dir.path().join("key.pem"), leaf_key.serialize_pem()).unwrap();
        Self { dir }
    }

    /// The CA that signed the leaf.
    pub(crate) fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A CA that signed nothing the daemon presents.
    pub(crate) fn other_ca(&self) -> PathBuf {
        self.dir.path().join("other-ca.pem")
    }

    /// The daemon flags `--tls-cert CERT --tls-key KEY`.
    pub(crate) fn daemon_args(&self) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            self.dir.path().join("cert.pem").display().to_string(),
            "--tls-key".into(),
            self.dir.path().join("key.pem").display().to_string(),
        ]
    }
}

// ---------------------------------------------------------------------------------------------
// Outside the root
// ---------------------------------------------------------------------------------------------

/// What one entry below a directory looks like: kind, size, mtime and (for files) content hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EntryState {
    kind: &'static str,
    len: u64,
    mtime: SystemTime,
    sha256: Option<String>,
}

/// Every entry below `dir` (the directory itself included, as ""), without following symlinks.
pub(crate) fn snapshot(dir: &Path) -> BTreeMap<String, EntryState> {
    fn walk(base: &Path, path: &Path, out: &mut BTreeMap<String, EntryState>) {
        let meta = fs::symlink_metadata(path).expect("lstat");
        let kind = if meta.is_dir() {
            "dir"
        } else if meta.is_file() {
            "file"
        } else if meta.file_type().is_symlink() {
            "symlink"
        } else {
            "other"
        };
        let rel = path
            .strip_prefix(base)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        out.insert(
            rel,
            EntryState {
                kind,
                len: meta.len(),
                mtime: meta.modified().expect("mtime"),
                sha256: meta.is_file().then(|| sha256_file(path)),
            },
        );
        if meta.is_dir() {
            for entry in fs::read_dir(path).expect("read_dir") {
                walk(base, &entry.expect("entry").path(), out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// A directory beside the daemon's root holding a secret file and a subdirectory, which no
/// request may read, create, change or delete anything in.
pub(crate) struct Outside {
    dir: PathBuf,
    before: BTreeMap<String, EntryState>,
}

/// The content of `outside/secret.txt`.
pub(crate) const SECRET: &[u8] = b"outside the root: must never be served or changed\n";

impl Outside {
    /// Creates `DIR/outside/` with `secret.txt`, `sub/` and `sub/inner.txt`; records its state.
    pub(crate) fn new(parent: &Path) -> Self {
        let dir = parent.join("outside");
        fs::create_dir_all(dir.join("sub")).unwrap();
        fs::write(dir.join("secret.txt"), SECRET).unwrap();
        fs::write(dir.join("sub/inner.txt"), b"inner\n").unwrap();
        // Old mtimes, so that a change within the same clock tick still shows.
        for p in [dir.join("secret.txt"), dir.join("sub/inner.txt")] {
            File::options()
                .write(true)
                .open(&p)
                .unwrap()
                .set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000))
                .unwrap();
        }
        let before = snapshot(&dir);
        Self { dir, before }
    }

    /// The directory.
    pub(crate) fn path(&self) -> &Path {
        &self.dir
    }

    /// `outside/NAME`.
    pub(crate) fn join(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Panics unless everything is as it was when created.
    #[track_caller]
    pub(crate) fn assert_untouched(&self, after: &str) {
        let now = snapshot(&self.dir);
        assert_eq!(
            now, self.before,
            "after {after}: the directory outside the root changed"
        );
    }
}
