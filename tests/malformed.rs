//! Malformed input over raw TCP: the daemon answers `Error{Protocol|TooLarge}` or closes, keeps
//! running and still serves good clients. Bad names through the real CLI create nothing.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio_util::codec::Decoder;
use xfer_proto::{
    Data, ErrorCode, FileIdentity, Frame, FrameCodec, FrameType, Hello, List, OpenRead, OpenWrite,
    MAX_FRAME_LEN, PROTOCOL_VERSION,
};
use xfer_tests::{list_tree, random_file, round_trip, Daemon, Tree, XferRun};

/// Hang guard: the daemon must answer or close long before this.
const READ_GUARD: Duration = Duration::from_secs(60);

fn connect(daemon: &Daemon) -> TcpStream {
    let stream = TcpStream::connect(daemon.socket_addr()).expect("connect to xferd");
    stream.set_read_timeout(Some(READ_GUARD)).unwrap();
    stream
}

fn encode(frame: &Frame) -> Vec<u8> {
    let mut buf = BytesMut::new();
    frame.encode(&mut buf).expect("encode");
    buf.to_vec()
}

fn hello() -> Frame {
    Frame::Hello(Hello {
        version: PROTOCOL_VERSION,
        min_version: 1,
        capabilities: 0,
        agent: "xfer-tests".into(),
        nonce: Vec::new(),
    })
}

/// The next frame from the daemon, or `None` once it has closed the connection.
fn read_frame(stream: &mut TcpStream, buf: &mut BytesMut) -> Option<Frame> {
    let mut codec = FrameCodec::default();
    let mut block = [0u8; 16 * 1024];
    loop {
        match codec.decode(buf) {
            Ok(Some(frame)) => return Some(frame),
            Ok(None) => {}
            Err(e) => panic!("xferd sent bytes that are not a frame: {e}"),
        }
        match stream.read(&mut block) {
            Ok(0) => {
                assert!(buf.is_empty(), "xferd closed the connection inside a frame");
                return None;
            }
            Ok(n) => buf.extend_from_slice(&block[..n]),
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

fn handshake(stream: &mut TcpStream, buf: &mut BytesMut) {
    stream.write_all(&encode(&hello())).unwrap();
    match read_frame(stream, buf) {
        Some(Frame::Welcome(welcome)) => assert_eq!(welcome.version, PROTOCOL_VERSION),
        other => panic!("xferd answered Hello with {other:?}"),
    }
}

/// Sends `bytes` (after a good handshake if `after_handshake`; then half-closes if `half_close`)
/// and checks the daemon answers with `Error{Protocol|TooLarge}` and closes, or just closes.
fn expect_rejected(daemon: &mut Daemon, after_handshake: bool, bytes: &[u8], half_close: bool) {
    let mut stream = connect(daemon);
    let mut buf = BytesMut::new();
    if after_handshake {
        handshake(&mut stream, &mut buf);
    }
    // The daemon may close before it has read everything; that is an acceptable answer.
    let _ = stream.write_all(bytes);
    if half_close {
        let _ = stream.shutdown(Shutdown::Write);
    }
    match read_frame(&mut stream, &mut buf) {
        None => {}
        Some(Frame::Error(error)) => {
            assert!(
                matches!(
                    error.error_code(),
                    Some(ErrorCode::Protocol | ErrorCode::TooLarge)
                ),
                "xferd answered with {error:?}, not Protocol or TooLarge"
            );
            let next = read_frame(&mut stream, &mut buf);
            assert!(next.is_none(), "xferd sent {next:?} after a fatal Error");
        }
        Some(other) => panic!("xferd answered malformed input with {other:?}"),
    }
    daemon.assert_running();
}

/// Runs `bytes` before and after a handshake, then checks a real client still works.
fn check_malformed(bytes: &[u8], half_close: bool) {
    let tree = Tree::new();
    let mut daemon = Daemon::start(&tree.root(), &[]);
    expect_rejected(&mut daemon, false, bytes, half_close);
    expect_rejected(&mut daemon, true, bytes, half_close);
    still_serves(&tree, &daemon);
}

fn still_serves(tree: &Tree, daemon: &Daemon) {
    let src = tree.src("good.bin");
    random_file(&src, 300_000, 77);
    round_trip(daemon, &src, "good.bin", &tree.out("good.bin"), &[]);
}

#[test]
fn raw_handshake_is_welcomed() {
    let tree = Tree::new();
    let daemon = Daemon::start(&tree.root(), &[]);
    let mut stream = connect(&daemon);
    handshake(&mut stream, &mut BytesMut::new());
    stream.write_all(&encode(&Frame::Goodbye)).unwrap();
}

#[test]
fn oversized_length_prefix() {
    let mut bytes = (MAX_FRAME_LEN + 1).to_be_bytes().to_vec();
    bytes.push(FrameType::Data as u8);
    bytes.extend_from_slice(&[0; 64]);
    check_malformed(&bytes, false);
}

#[test]
fn oversized_control_frame() {
    let mut bytes = u32::MAX.to_be_bytes().to_vec();
    bytes.push(FrameType::Hello as u8);
    check_malformed(&bytes, false);
}

#[test]
fn zero_length_prefix() {
    check_malformed(&[0, 0, 0, 0, FrameType::Hello as u8], false);
}

#[test]
fn unknown_type_byte() {
    check_malformed(&[0, 0, 0, 1, 0x6f], false);
}

#[test]
fn truncated_body_then_close() {
    let hello = encode(&hello());
    check_malformed(&hello[..hello.len() - 3], true);
}

#[test]
fn undecodable_body() {
    // A Hello whose agent string is not UTF-8: encode a good one, then spoil the agent's bytes.
    let mut bytes = encode(&hello());
    let at = bytes
        .windows(b"xfer-tests".len())
        .position(|w| w == b"xfer-tests")
        .expect("agent bytes in the frame");
    bytes[at..at + 2].copy_from_slice(&[0xff, 0xfe]);
    check_malformed(&bytes, false);
}

#[test]
fn data_before_the_handshake() {
    let tree = Tree::new();
    let mut daemon = Daemon::start(&tree.root(), &[]);
    let data = encode(&Frame::Data(Data::new(1, 0, Bytes::from_static(b"early"))));
    expect_rejected(&mut daemon, false, &data, false);
    still_serves(&tree, &daemon);
    assert_eq!(list_tree(&tree.root()), ["good.bin"]);
}

#[test]
fn garbage_bytes() {
    let mut bytes = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
    let tree = Tree::new();
    random_file(&tree.path().join("noise"), 4096, 5);
    bytes.extend(std::fs::read(tree.path().join("noise")).unwrap());
    check_malformed(&bytes, false);
}

#[test]
fn bad_names_are_refused_and_create_nothing() {
    let tree = Tree::new();
    let mut daemon = Daemon::start(&tree.root(), &[]);
    let src = tree.src("b.bin");
    random_file(&src, 1000, 6);
    let absolute = tree.path().join("abs.bin");
    for name in [
        "../x",
        absolute.to_str().unwrap(),
        "a//b",
        ".x.xfer-part",
        "d/.x.xfer-state",
    ] {
        let line = XferRun::send(&src, &daemon.addr(), name, &[])
            .wait()
            .error_line();
        assert!(
            line.to_lowercase().contains("bad path"),
            "--as {name}: {line}"
        );
    }
    assert_eq!(list_tree(&tree.root()), Vec::<String>::new());
    assert_eq!(
        list_tree(tree.path()),
        ["out/", "root/", "src/", "src/b.bin"]
    );
    daemon.assert_running();
}

/// Sends one request on a handshaken connection and returns the answer.
fn request(stream: &mut TcpStream, buf: &mut BytesMut, frame: &Frame) -> Frame {
    stream.write_all(&encode(frame)).unwrap();
    read_frame(stream, buf).unwrap_or_else(|| panic!("xferd closed the connection after {frame:?}"))
}

fn open_write(name: &str) -> Frame {
    Frame::OpenWrite(OpenWrite {
        name: name.into(),
        identity: FileIdentity {
            size: 10,
            mtime_ns: 0,
        },
        mode: 0o644,
        chunk_size: 64 * 1024,
    })
}

fn open_read(name: &str) -> Frame {
    Frame::OpenRead(OpenRead {
        name: name.into(),
        have_identity: None,
        have: Vec::new(),
    })
}

/// The code of an `Error` answer; panics on any other answer.
#[track_caller]
fn error_code(answer: Frame, what: &str) -> Option<ErrorCode> {
    match answer {
        Frame::Error(error) => error.error_code(),
        other => panic!("{what}: xferd answered {other:?}, not an Error"),
    }
}

/// The connection is still usable: a listing of the root comes back.
fn assert_usable(stream: &mut TcpStream, buf: &mut BytesMut) {
    let answer = request(stream, buf, &Frame::List(List { dir: String::new() }));
    assert!(
        matches!(answer, Frame::Listing(_)),
        "List answered with {answer:?}"
    );
}

#[test]
fn bad_names_in_raw_requests_are_refused_with_bad_path() {
    let tree = Tree::new();
    let mut daemon = Daemon::start(&tree.root(), &[]);
    let mut stream = connect(&daemon);
    let mut buf = BytesMut::new();
    handshake(&mut stream, &mut buf);
    let absolute = tree.path().join("abs.bin").to_str().unwrap().to_owned();
    let long = "n".repeat(4097);
    for name in [
        "",
        "../x",
        "a/../../x",
        &absolute,
        "a//b",
        "a/./b",
        "a/",
        ".x.xfer-part",
        "d/.x.xfer-state",
        "nul\0byte",
        &long,
    ] {
        for frame in [open_write(name), open_read(name)] {
            let what = format!("{:?} of {name:?}", frame.frame_type());
            let code = error_code(request(&mut stream, &mut buf, &frame), &what);
            assert_eq!(code, Some(ErrorCode::BadPath), "{what}");
        }
        assert_usable(&mut stream, &mut buf);
    }
    assert_eq!(list_tree(&tree.root()), Vec::<String>::new());
    assert_eq!(list_tree(tree.path()), ["out/", "root/", "src/"]);
    daemon.assert_running();
}

#[test]
fn symlinks_out_of_the_root_are_not_followed() {
    let tree = Tree::new();
    std::fs::write(tree.src("secret.txt"), b"outside the root").unwrap();
    std::os::unix::fs::symlink(tree.path().join("src"), tree.root().join("dirlink")).unwrap();
    std::os::unix::fs::symlink(tree.src("secret.txt"), tree.root().join("filelink")).unwrap();
    let mut daemon = Daemon::start(&tree.root(), &[]);
    let mut stream = connect(&daemon);
    let mut buf = BytesMut::new();
    handshake(&mut stream, &mut buf);
    for frame in [
        open_read("dirlink/secret.txt"),
        open_read("filelink"),
        open_write("dirlink/planted.bin"),
        open_write("dirlink/sub/planted.bin"),
        Frame::List(List {
            dir: "dirlink".into(),
        }),
    ] {
        let what = format!("{frame:?}");
        let code = error_code(request(&mut stream, &mut buf, &frame), &what);
        assert!(
            code.is_some_and(ErrorCode::is_request_level),
            "{what}: {code:?}"
        );
        assert_usable(&mut stream, &mut buf);
    }
    assert_eq!(list_tree(&tree.path().join("src")), ["secret.txt"]);
    daemon.assert_running();
}

#[test]
fn answers_to_chunks_come_in_the_order_the_chunks_were_sent() {
    // The daemon writes a chunk while it reads the next; a chunk that fails its CRC right
    // behind a good one must still be answered after it (clients match answers by order).
    let tree = Tree::new();
    let mut daemon = Daemon::start(&tree.root(), &[]);
    let mut stream = connect(&daemon);
    let mut buf = BytesMut::new();
    handshake(&mut stream, &mut buf);
    let size = 2 << 20;
    let open = Frame::OpenWrite(OpenWrite {
        name: "ordered.bin".into(),
        identity: FileIdentity { size, mtime_ns: 0 },
        mode: 0o644,
        chunk_size: 1 << 20,
    });
    let id = match request(&mut stream, &mut buf, &open) {
        Frame::WriteOpened(opened) => opened.transfer_id,
        other => panic!("OpenWrite answered with {other:?}"),
    };
    let good = Data::new(id, 0, Bytes::from(vec![7u8; 1 << 20]));
    let mut bad = Data::new(id, 1 << 20, Bytes::from(vec![9u8; 1 << 20]));
    bad.crc32 ^= 1;
    let both = [encode(&Frame::Data(good)), encode(&Frame::Data(bad))].concat();
    stream.write_all(&both).unwrap();
    let answers = [
        read_frame(&mut stream, &mut buf),
        read_frame(&mut stream, &mut buf),
    ];
    match answers {
        [Some(Frame::Ack(a)), Some(Frame::Reject(r))] => {
            assert_eq!((a.offset, r.offset), (0, 1 << 20));
        }
        other => panic!("want Ack(0) then Reject(1 MiB), got {other:?}"),
    }
    daemon.assert_running();
}
