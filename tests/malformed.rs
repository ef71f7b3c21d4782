//! Malformed input over raw TCP: the daemon answers `Error{Protocol|TooLarge}` or closes, keeps
//! running and still serves good clients. Bad names through the real CLI create nothing.

use bytes::Bytes;
use xfer_proto::{Data, ErrorCode, Frame, FrameType, List, MAX_FRAME_LEN, PROTOCOL_VERSION};
use xfer_tests::raw::{encode, error_code, hello, open_read, open_write, RawConn};
use xfer_tests::{list_tree, random_file, round_trip, Daemon, Tree, XferRun};

/// Sends `bytes` (after a good handshake if `after_handshake`; then half-closes if `half_close`)
/// and checks the daemon answers with `Error{Protocol|TooLarge}` and closes, or just closes.
fn expect_rejected(daemon: &mut Daemon, after_handshake: bool, bytes: &[u8], half_close: bool) {
    let mut conn = if after_handshake {
        RawConn::handshaken(daemon.socket_addr(), None)
    } else {
        RawConn::connect(daemon.socket_addr())
    };
    // The daemon may close before it has read everything; that is an acceptable answer.
    let _ = conn.send_bytes(bytes);
    if half_close {
        conn.shutdown_write();
    }
    match conn.recv() {
        None => {}
        Some(Frame::Error(error)) => {
            assert!(
                matches!(
                    error.error_code(),
                    Some(ErrorCode::Protocol | ErrorCode::TooLarge)
                ),
                "xferd answered with {error:?}, not Protocol or TooLarge"
            );
            conn.expect_closed("a fatal Error");
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
    let mut conn = RawConn::connect(daemon.socket_addr());
    // Without a token the nonce is not used: an empty one is welcome too.
    match conn.request(&hello(0, Vec::new())) {
        Frame::Welcome(welcome) => assert_eq!(welcome.version, PROTOCOL_VERSION),
        other => panic!("xferd answered Hello with {other:?}"),
    }
    conn.send(&Frame::Goodbye);
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
    let hello = encode(&hello(0, Vec::new()));
    check_malformed(&hello[..hello.len() - 3], true);
}

#[test]
fn undecodable_body() {
    // A Hello whose agent string is not UTF-8: encode a good one, then spoil the agent's bytes.
    let mut bytes = encode(&hello(0, Vec::new()));
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

#[test]
fn bad_names_in_raw_requests_are_refused_with_bad_path() {
    let tree = Tree::new();
    let mut daemon = Daemon::start(&tree.root(), &[]);
    let mut conn = RawConn::handshaken(daemon.socket_addr(), None);
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
        for frame in [open_write(name, 10), open_read(name)] {
            let what = format!("{:?} of {name:?}", frame.frame_type());
            let code = error_code(conn.request(&frame), &what);
            assert_eq!(code, Some(ErrorCode::BadPath), "{what}");
        }
        conn.assert_usable();
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
    let mut conn = RawConn::handshaken(daemon.socket_addr(), None);
    for frame in [
        open_read("dirlink/secret.txt"),
        open_read("filelink"),
        open_write("dirlink/planted.bin", 10),
        open_write("dirlink/sub/planted.bin", 10),
        Frame::List(List {
            dir: "dirlink".into(),
        }),
    ] {
        let what = format!("{frame:?}");
        let code = error_code(conn.request(&frame), &what);
        assert!(
            code.is_some_and(ErrorCode::is_request_level),
            "{what}: {code:?}"
        );
        conn.assert_usable();
    }
    assert_eq!(list_tree(&tree.path().join("src")), ["secret.txt"]);
    daemon.assert_running();
}
