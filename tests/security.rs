//! Security end to end, over real sockets against the real binaries: token authentication
//! (including every extra connection, replay, and the token never on the wire), the refusal to
//! serve anonymously beyond loopback, `--read-only`, TLS (round trip, no plaintext fallback, no
//! downgrade), and confinement to the root (symlinks, special files, reserved names, a directory
//! swapped mid-upload), each checked against a snapshot of a directory outside the root.
//! Bad names as such (absolute, `..`, NUL, empty, too long, reserved) are in `malformed.rs`.

use std::fs;
use std::io::Read;
use std::os::unix::fs::{symlink, FileTypeExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use xfer_proto::{auth, Data, ErrorCode, ErrorFrame, Frame, Welcome, CAP_TLS};
use xfer_tests::{
    bin, list_tree, random_file, sha256_file, wait_until, Daemon, Tree, XferOutput, XferRun,
};

use xfer_tests::outside::{Outside, SECRET};
use xfer_tests::raw::{
    auth_frame, contains, error_code, get_file, hello, leading_frames, list, list_tree_frame,
    make_dir, make_link, nonce, open_read, open_write, put_file, RawConn,
};
use xfer_tests::relay::{Impostor, Tee};
use xfer_tests::{run_xfer, Pki};

/// A failure that needs no retry must end well within this (a hang guard, not a timing claim).
const FAIL_FAST: Duration = Duration::from_secs(30);
/// Hang guard for a successful transfer of a few MiB.
const TRANSFER: Duration = Duration::from_secs(120);
/// A token with enough structure to be found anywhere it leaks.
const TOKEN: &str = "tok-6f1e0c9a-secret-never-on-the-wire-52b7d3";

/// Writes `token` (with a trailing newline, as `echo` would) to `DIR/NAME` and returns the path.
fn token_file(dir: &Path, name: &str, token: &str) -> String {
    let path = dir.join(name);
    fs::write(&path, format!("{token}\n")).unwrap();
    path.display().to_string()
}

/// A daemon on `tree`'s root that requires [`TOKEN`] (from a token file), with `extra` flags.
fn token_daemon(tree: &Tree, extra: &[String]) -> Daemon {
    let token = token_file(tree.path(), "daemon-token", TOKEN);
    let mut args = vec!["--token-file", &token];
    args.extend(extra.iter().map(String::as_str));
    Daemon::start(&tree.root(), &args)
}

/// `xfer send SRC ADDR --as NAME EXTRA…` through [`run_xfer`]: with `env`, within `guard`.
fn send(
    src: &Path,
    addr: &str,
    name: &str,
    extra: &[&str],
    env: &[(&str, &str)],
    guard: Duration,
) -> XferOutput {
    let src = src.to_str().expect("a UTF-8 path");
    run_xfer(
        [&["send", src, addr, "--as", name], extra].concat(),
        env,
        guard,
    )
}

/// `xfer recv NAME ADDR -o OUT EXTRA…` through [`run_xfer`]: with `env`, within `guard`.
fn recv(
    name: &str,
    addr: &str,
    out: &Path,
    extra: &[&str],
    env: &[(&str, &str)],
    guard: Duration,
) -> XferOutput {
    let out = out.to_str().expect("a UTF-8 path");
    run_xfer(
        [&["recv", name, addr, "-o", out], extra].concat(),
        env,
        guard,
    )
}

/// Makes a FIFO at `path`.
fn mkfifo(path: &Path) {
    use rustix::fs::{mknodat, FileType, Mode, CWD};
    mknodat(CWD, path, FileType::Fifo, Mode::from_raw_mode(0o666), 0).expect("mkfifo");
}

/// Asserts `line` starts with `prefix`.
#[track_caller]
fn assert_starts(line: &str, prefix: &str) {
    assert!(
        line.starts_with(prefix),
        "expected a line starting with {prefix:?}, got {line:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Token authentication
// ---------------------------------------------------------------------------------------------

/// Anyone who can connect gets a proof made with the token, so a token too short to hold 128
/// random bits is named at start; a long one is not.
#[test]
fn a_short_token_is_warned_about_at_start() {
    let tree = Tree::new();
    let short = token_file(tree.path(), "short-token", "hunter2");
    let daemon = Daemon::start(&tree.root(), &["--token-file", &short]);
    assert!(
        daemon.stderr().contains("short enough to guess offline"),
        "no warning for a 7-byte token: {}",
        daemon.stderr()
    );
    let daemon = token_daemon(&tree, &[]);
    assert!(!daemon.stderr().contains("short enough to guess offline"));
}

#[test]
fn client_without_a_token_is_refused_at_once() {
    let tree = Tree::new();
    let daemon = token_daemon(&tree, &[]);
    let src = tree.src("a.bin");
    random_file(&src, 100_000, 1);
    let addr = daemon.addr();
    let out = tree.out("a.bin");
    let runs = [
        vec!["send", src.to_str().unwrap(), &addr, "--as", "a.bin"],
        vec!["recv", "a.bin", &addr, "-o", out.to_str().unwrap()],
        vec!["ls", &addr],
    ];
    for args in runs {
        let line = run_xfer(&args, &[], FAIL_FAST).error_line();
        assert_starts(
            &line,
            "xfer: authentication failed: the server requires a token; ",
        );
    }
    assert_eq!(list_tree(&tree.root()), Vec::<String>::new());
    assert!(!tree.out("a.bin").exists());
}

#[test]
fn wrong_token_is_refused_from_file_and_environment() {
    let tree = Tree::new();
    let daemon = token_daemon(&tree, &[]);
    let wrong = token_file(tree.path(), "wrong-token", "not-the-token");
    let src = tree.src("a.bin");
    random_file(&src, 100_000, 2);
    let addr = daemon.addr();
    let send = ["send", src.to_str().unwrap(), &addr, "--as", "a.bin"];
    let with_file: Vec<&str> = send
        .iter()
        .copied()
        .chain(["--token-file", &wrong])
        .collect();
    // A token that is a prefix of the right one is still wrong.
    let prefix = &TOKEN[..TOKEN.len() - 1];
    for (args, env) in [
        (with_file.clone(), vec![]),
        (send.to_vec(), vec![("XFER_TOKEN", "not-the-token")]),
        (send.to_vec(), vec![("XFER_TOKEN", prefix)]),
    ] {
        let out = run_xfer(&args, &env, FAIL_FAST);
        assert_starts(
            &out.error_line(),
            "xfer: authentication failed: wrong token; ",
        );
        assert!(
            !out.stderr.contains(TOKEN),
            "the token leaked: {}",
            out.stderr
        );
    }
    assert_eq!(list_tree(&tree.root()), Vec::<String>::new());
    assert!(
        !daemon.stderr().contains(TOKEN),
        "the daemon logged its token"
    );
}

/// A client that asks the daemon to prove itself first (`CAP_EARLY_AUTH`) gets the proof in
/// `EarlyChallenge` and sends `Auth` and its first request in one write, before any `Welcome`.
/// With the daemon's only stream slot taken, the request waits, unanswered, in the queue: once
/// the slot frees, the announced `Welcome` comes and then the request's answer. A wrong proof
/// sent the same way is refused with `Error{Auth}`, its request never answered.
#[test]
fn a_request_sent_with_auth_after_an_early_challenge_is_answered_after_welcome() {
    let tree = Tree::new();
    let daemon = token_daemon(&tree, &["--max-streams".into(), "1".into()]);
    let early = |proof: Option<&[u8]>| {
        let mut conn = RawConn::connect(daemon.socket_addr());
        let client_nonce = nonce();
        let answer = conn.request(&hello(xfer_proto::CAP_EARLY_AUTH, client_nonce.clone()));
        let Frame::EarlyChallenge(challenge) = answer else {
            panic!("xferd answered a Hello offering CAP_EARLY_AUTH with {answer:?}")
        };
        assert!(
            auth::verify_server(
                TOKEN.as_bytes(),
                &client_nonce,
                &challenge.nonce,
                &challenge.welcome.proof
            ),
            "the early proof is not the server proof"
        );
        let proof = proof.map_or_else(
            || auth::client_proof(TOKEN.as_bytes(), &client_nonce, &challenge.nonce),
            <[u8]>::to_vec,
        );
        let flight = [auth_frame(proof), list("")]
            .iter()
            .flat_map(xfer_tests::raw::encode)
            .collect::<Vec<u8>>();
        conn.send_bytes(&flight).unwrap();
        (conn, challenge.welcome)
    };
    let mut holder = RawConn::handshaken(daemon.socket_addr(), Some(TOKEN.as_bytes()));
    let (mut queued, announced) = early(None);
    holder.send(&Frame::Goodbye);
    holder.expect_closed("Goodbye");
    assert_eq!(queued.recv(), Some(Frame::Welcome(announced)));
    let answer = queued.recv();
    assert!(matches!(answer, Some(Frame::Listing(_))), "{answer:?}");
    queued.send(&Frame::Goodbye);
    queued.expect_closed("Goodbye");
    let (mut wrong, _) = early(Some(&[0; auth::PROOF_LEN]));
    wrong.expect_fatal(ErrorCode::Auth, "a wrong proof with a request behind it");
}

#[test]
fn right_token_round_trip_over_eight_connections() {
    let tree = Tree::new();
    let daemon = token_daemon(&tree, &[]);
    let client_token = token_file(tree.path(), "client-token", TOKEN);
    let src = tree.src("big.bin");
    let want = random_file(&src, 24 << 20, 3);
    let addr = daemon.addr();
    let out = tree.out("big.bin");
    // Upload with --token-file over 8 connections, download with XFER_TOKEN over 8.
    let eight = ["-c", "8", "--chunk-size", "1M"];
    let sent = send(
        &src,
        &addr,
        "big.bin",
        &[&eight[..], &["--json", "--token-file", &client_token]].concat(),
        &[],
        TRANSFER,
    )
    .ok();
    assert_eq!(sent.json_u64("connections"), 8);
    assert_eq!(sha256_file(&tree.root().join("big.bin")), want);
    recv(
        "big.bin",
        &addr,
        &out,
        &eight,
        &[("XFER_TOKEN", TOKEN)],
        TRANSFER,
    )
    .ok();
    assert_eq!(sha256_file(&out), want);
    let log = daemon.stderr();
    assert!(
        !log.contains("authentication failed") && !log.contains("before Auth"),
        "a connection of the transfer failed to authenticate:\n{log}"
    );
    assert!(!log.contains(TOKEN), "the daemon logged its token");
}

/// Every frame but `Auth` (or `Error`) after `Challenge` ends the connection; so do requests
/// before `Hello`, a `Hello` whose nonce is not 32 bytes, and proofs of the wrong length. A
/// `transfer_id` from another connection is no credential. Nothing is created or served.
#[test]
fn requests_without_authentication_are_refused() {
    let tree = Tree::new();
    fs::write(tree.root().join("served.txt"), b"only for token holders").unwrap();
    let mut daemon = token_daemon(&tree, &[]);
    let addr = daemon.socket_addr();

    // An authenticated connection opens an upload: transfer id 1 exists there.
    let mut good = RawConn::connect(addr);
    good.handshake(Some(TOKEN.as_bytes()));
    let answer = good.request(&open_write("legit.bin", 10));
    assert!(matches!(answer, Frame::WriteOpened(_)), "{answer:?}");

    let data = Frame::Data(Data::new(1, 0, Bytes::from_static(b"0123456789")));
    let after_challenge = [
        ("OpenWrite", open_write("planted.bin", 10)),
        ("OpenRead", open_read("served.txt")),
        ("List", list("")),
        ("Data for another connection's transfer", data.clone()),
        ("a second Hello", hello(0, nonce())),
    ];
    for (what, frame) in &after_challenge {
        let mut conn = RawConn::connect(addr);
        let challenge = conn.request(&hello(0, nonce()));
        assert!(matches!(challenge, Frame::Challenge(_)), "{challenge:?}");
        conn.send(frame);
        let error = match conn.recv() {
            Some(Frame::Error(e)) => e,
            other => panic!("{what} after Challenge: xferd answered {other:?}"),
        };
        assert!(
            matches!(
                error.error_code(),
                Some(ErrorCode::Protocol | ErrorCode::Auth)
            ),
            "{what} after Challenge: {error:?}"
        );
        conn.expect_closed(what);
        assert!(!contains(&conn.received, b"only for token holders"));
    }
    for (what, frame) in [
        ("OpenWrite", open_write("planted.bin", 10)),
        ("OpenRead", open_read("served.txt")),
        ("Data", data),
        ("Auth", auth_frame(vec![0; 32])),
    ] {
        let mut conn = RawConn::connect(addr);
        conn.send(&frame);
        conn.expect_fatal(ErrorCode::Protocol, &format!("{what} before Hello"));
    }

    // A Hello nonce other than 32 bytes fails even with a proof computed over it.
    for client_nonce in [Vec::new(), vec![7u8; 16], vec![7u8; 33]] {
        let mut conn = RawConn::connect(addr);
        let Frame::Challenge(c) = conn.request(&hello(0, client_nonce.clone())) else {
            panic!("no Challenge")
        };
        let proof = auth::client_proof(TOKEN.as_bytes(), &client_nonce, &c.nonce);
        conn.send(&auth_frame(proof));
        conn.expect_fatal(
            ErrorCode::Auth,
            &format!("Auth after a {}-byte nonce", client_nonce.len()),
        );
    }
    // Proofs of the wrong length, and the daemon's own proof reflected back.
    let client_nonce = nonce();
    for what in [
        "empty proof",
        "31-byte proof",
        "33-byte proof",
        "reflected server proof",
    ] {
        let mut conn = RawConn::connect(addr);
        let Frame::Challenge(c) = conn.request(&hello(0, client_nonce.clone())) else {
            panic!("no Challenge")
        };
        let right = auth::client_proof(TOKEN.as_bytes(), &client_nonce, &c.nonce);
        let proof = match what {
            "empty proof" => Vec::new(),
            "31-byte proof" => right[..31].to_vec(),
            "33-byte proof" => [right.as_slice(), &[0]].concat(),
            _ => auth::server_proof(TOKEN.as_bytes(), &client_nonce, &c.nonce),
        };
        conn.send(&auth_frame(proof));
        conn.expect_fatal(ErrorCode::Auth, what);
    }
    // A client without a token says so; the daemon closes without answering.
    let mut conn = RawConn::connect(addr);
    conn.request(&hello(0, nonce()));
    conn.send(&Frame::Error(ErrorFrame::new(ErrorCode::Auth, "no token")));
    conn.expect_closed("the client's Error{Auth}");

    good.assert_usable();
    assert_eq!(
        list_tree(&tree.root()),
        [
            ".legit.bin.xfer-part",
            ".legit.bin.xfer-state",
            "served.txt"
        ]
    );
    daemon.assert_running();
}

#[test]
fn recorded_auth_cannot_be_replayed() {
    let tree = Tree::new();
    fs::write(tree.root().join("served.txt"), b"only for token holders").unwrap();
    let daemon = token_daemon(&tree, &[]);

    // One real handshake, recorded: Hello(Nc), Challenge(Ns), Auth(proof), Welcome.
    let client_nonce = nonce();
    let mut first = RawConn::connect(daemon.socket_addr());
    let Frame::Challenge(challenge) = first.request(&hello(0, client_nonce.clone())) else {
        panic!("no Challenge")
    };
    let proof = auth::client_proof(TOKEN.as_bytes(), &client_nonce, &challenge.nonce);
    let answer = first.request(&auth_frame(proof.clone()));
    assert!(matches!(answer, Frame::Welcome(_)), "{answer:?}");
    first.assert_usable();

    // The same Hello and the same Auth on new connections: each gets a fresh nonce, so the
    // recorded proof is wrong there. The first connection stays open meanwhile.
    for attempt in 0..3 {
        let mut replay = RawConn::connect(daemon.socket_addr());
        let Frame::Challenge(again) = replay.request(&hello(0, client_nonce.clone())) else {
            panic!("no Challenge")
        };
        assert_ne!(
            again.nonce, challenge.nonce,
            "the daemon reused its challenge nonce"
        );
        assert_eq!(again.nonce.len(), auth::NONCE_LEN);
        replay.send(&auth_frame(proof.clone()));
        replay.expect_fatal(ErrorCode::Auth, &format!("replayed Auth #{attempt}"));
        assert!(!contains(&replay.received, b"only for token holders"));
    }
    first.assert_usable();
}

#[test]
fn token_never_crosses_the_wire() {
    let tree = Tree::new();
    let daemon = token_daemon(&tree, &[]);
    let client_token = token_file(tree.path(), "client-token", TOKEN);

    // A raw handshake: every byte each way.
    let mut raw = RawConn::connect(daemon.socket_addr());
    raw.handshake(Some(TOKEN.as_bytes()));
    raw.assert_usable();
    assert!(!raw.sent.is_empty() && !raw.received.is_empty());
    for (dir, bytes) in [("sent", &raw.sent), ("received", &raw.received)] {
        assert!(!contains(bytes, TOKEN.as_bytes()), "token in bytes {dir}");
    }

    // The real client, through a relay that records both directions of every connection.
    let tee = Tee::start(daemon.socket_addr());
    let src = tree.src("t.bin");
    let want = random_file(&src, 8 << 20, 4);
    let out = tree.out("t.bin");
    let relay = tee.addr();
    let common = [
        "-c",
        "8",
        "--chunk-size",
        "1M",
        "--token-file",
        &client_token,
    ];
    send(&src, &relay, "t.bin", &common, &[], TRANSFER).ok();
    recv("t.bin", &relay, &out, &common, &[], TRANSFER).ok();
    assert_eq!(sha256_file(&out), want);
    let captured = tee.captured();
    assert!(
        captured.len() >= 3,
        "only {} connections relayed",
        captured.len()
    );
    let hex: String = TOKEN.bytes().map(|b| format!("{b:02x}")).collect();
    for (i, c) in captured.iter().enumerate() {
        for (dir, bytes) in [("client to daemon", &c.up), ("daemon to client", &c.down)] {
            assert!(
                !contains(bytes, TOKEN.as_bytes()) && !contains(bytes, hex.as_bytes()),
                "connection {i}: the token crossed the wire {dir}"
            );
        }
        // Every connection authenticated: its first frames are Hello then Auth, or the early
        // proof behind the Hello once the command has seen the daemon take one.
        let (frames, _) = leading_frames(&c.up, 2);
        assert!(
            matches!(frames.as_slice(), [Frame::Hello(h), Frame::Auth(_) | Frame::EarlyAuth(_)] if h.nonce.len() == 32),
            "connection {i} did not authenticate: {frames:?}"
        );
    }
    assert!(
        !daemon.stderr().contains(TOKEN),
        "the daemon logged its token"
    );
}

#[test]
fn non_loopback_listen_needs_a_token_or_allow_anonymous() {
    let tree = Tree::new();
    // Refused: exits non-zero at once, naming both ways out.
    let mut child = Command::new(bin("xferd"))
        .args(["--listen", "0.0.0.0:0", "--root"])
        .arg(tree.root())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn xferd");
    let end = Instant::now() + FAIL_FAST;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= end {
            let _ = child.kill();
            let _ = child.wait();
            panic!("xferd --listen 0.0.0.0:0 without a token kept running");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(!status.success(), "xferd exited {status}");
    assert!(
        stderr.contains("--token-file") && stderr.contains("--allow-anonymous"),
        "the refusal should name --token-file and --allow-anonymous:\n{stderr}"
    );
    assert!(
        !stdout.contains("listening"),
        "it listened anyway: {stdout}"
    );

    // With --allow-anonymous (or a token) it binds. No traffic is sent to it.
    let mut anonymous = Daemon::start_on("0.0.0.0:0", &tree.root(), &["--allow-anonymous"]);
    assert!(anonymous.socket_addr().ip().is_unspecified());
    anonymous.assert_running();
    anonymous.kill();
    let daemon_token = token_file(tree.path(), "daemon-token", TOKEN);
    let mut with_token =
        Daemon::start_on("0.0.0.0:0", &tree.root(), &["--token-file", &daemon_token]);
    with_token.assert_running();
    with_token.kill();
}

#[test]
fn empty_token_files_are_refused() {
    let tree = Tree::new();
    let blank = token_file(tree.path(), "blank", " \t\r\n");
    let out = Command::new(bin("xferd"))
        .args(["--listen", "127.0.0.1:0", "--token-file", &blank, "--root"])
        .arg(tree.root())
        .stdin(Stdio::null())
        .output()
        .expect("run xferd");
    assert!(!out.status.success(), "xferd started with an empty token");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("listening"));

    let daemon = Daemon::start(&tree.root(), &[]);
    let args = ["ls", &daemon.addr(), "--token-file", &blank];
    let line = run_xfer(args, &[], FAIL_FAST).error_line();
    assert!(line.contains("empty"), "{line}");
}

#[test]
fn read_only_refuses_uploads_and_serves_downloads() {
    let tree = Tree::new();
    let want = random_file(&tree.root().join("pub/served.bin"), 2 << 20, 5);
    let daemon = Daemon::start(&tree.root(), &["--read-only"]);
    let src = tree.src("up.bin");
    random_file(&src, 100_000, 6);
    for name in ["up.bin", "pub/served.bin", "new/dir/up.bin"] {
        let line = XferRun::send(&src, &daemon.addr(), name, &[])
            .wait()
            .error_line();
        assert!(
            line.starts_with("xfer: ") && line.to_lowercase().contains("read-only"),
            "--as {name}: {line}"
        );
    }
    // The raw answer is the non-fatal Error{ReadOnly}: the connection stays usable.
    let mut conn = RawConn::handshaken(daemon.socket_addr(), None);
    let tree_requests = [
        open_write("raw.bin", 10),
        put_file("raw.txt", b"small"),
        make_dir("newdir"),
        make_link("link", "pub"),
    ];
    for frame in &tree_requests {
        let what = format!("{:?}", frame.frame_type());
        let code = error_code(conn.request(frame), &what);
        assert_eq!(code, Some(ErrorCode::ReadOnly), "{what}");
        conn.assert_usable();
    }

    XferRun::recv(
        "pub/served.bin",
        &daemon.addr(),
        &tree.out("served.bin"),
        &[],
    )
    .wait_ok();
    assert_eq!(sha256_file(&tree.out("served.bin")), want);
    assert_eq!(
        sha256_file(&tree.root().join("pub/served.bin")),
        want,
        "the served file changed"
    );
    assert_eq!(list_tree(&tree.root()), ["pub/", "pub/served.bin"]);
}

// ---------------------------------------------------------------------------------------------
// TLS
// ---------------------------------------------------------------------------------------------

#[test]
fn tls_round_trip_with_a_token() {
    let tree = Tree::new();
    let pki = Pki::new(&["127.0.0.1", "localhost"]);
    let daemon = token_daemon(&tree, &pki.daemon_args());
    let tee = Tee::start(daemon.socket_addr());
    let src = tree.src("tls.bin");
    let want = random_file(&src, 6 << 20, 7);
    let ca = pki.ca().display().to_string();
    let tls = ["--tls", "--ca", &ca, "-c", "3", "--chunk-size", "1M"];
    // Upload by IP address (checked against the iPAddress SAN), through the recording relay.
    let relay = tee.addr();
    send(
        &src,
        &relay,
        "tls.bin",
        &tls,
        &[("XFER_TOKEN", TOKEN)],
        TRANSFER,
    )
    .ok();
    assert_eq!(sha256_file(&tree.root().join("tls.bin")), want);
    // Download by DNS name (checked against the dNSName SAN).
    let host = format!("localhost:{}", daemon.socket_addr().port());
    let out = tree.out("tls.bin");
    recv(
        "tls.bin",
        &host,
        &out,
        &tls,
        &[("XFER_TOKEN", TOKEN)],
        TRANSFER,
    )
    .ok();
    assert_eq!(sha256_file(&out), want);

    // On the wire: a plaintext TLS request and StartTls, then only TLS records; neither the
    // token, nor the name, nor the file's bytes in the clear.
    let head = fs::read(&src).unwrap()[..4096].to_vec();
    let mut completed = 0;
    for (i, c) in tee.captured().iter().enumerate() {
        let (frames, used) = leading_frames(&c.up, 1);
        match frames.as_slice() {
            [Frame::Hello(h)] => assert!(h.capabilities & CAP_TLS != 0 && h.nonce.is_empty()),
            other => panic!("connection {i} began with {other:?}"),
        }
        let (answer, down_used) = leading_frames(&c.down, 1);
        assert_eq!(answer, [Frame::StartTls], "connection {i}");
        // What follows is TLS records (a connection may have been dropped before any).
        for (dir, next) in [("up", c.up.get(used)), ("down", c.down.get(down_used))] {
            assert!(
                next.is_none_or(|b| *b == 0x16),
                "connection {i} {dir}: no TLS handshake record after StartTls"
            );
        }
        completed += usize::from(c.up.len() > 64 * 1024 || c.down.len() > 64 * 1024);
        for bytes in [&c.up, &c.down] {
            assert!(!contains(bytes, TOKEN.as_bytes()));
            assert!(
                !contains(bytes, b"tls.bin"),
                "connection {i}: the name in clear"
            );
            assert!(
                !contains(bytes, &head),
                "connection {i}: file data in clear"
            );
        }
    }
    assert!(completed > 0, "no relayed connection carried the file");
}

/// A client without `--tls` is turned down in plaintext by a daemon with a certificate, and
/// asks again over TLS: the file arrives, verified against the CA.
#[test]
fn a_client_without_the_tls_flag_switches_to_tls_when_the_daemon_requires_it() {
    let tree = Tree::new();
    let pki = Pki::new(&["127.0.0.1", "localhost"]);
    let daemon = pki.start_daemon(&tree.root(), &[]);
    let src = tree.src("a.bin");
    let want = random_file(&src, 1000, 8);
    let ca = pki.ca().display().to_string();
    send(
        &src,
        &daemon.addr(),
        "a.bin",
        &["--ca", &ca],
        &[],
        FAIL_FAST,
    )
    .ok();
    assert_eq!(sha256_file(&tree.root().join("a.bin")), want);
    fs::remove_file(tree.root().join("a.bin")).unwrap();
    // The raw answer: Error{Protocol} in plaintext, then close.
    let mut conn = RawConn::connect(daemon.socket_addr());
    conn.send(&hello(0, nonce()));
    let error = conn.expect_fatal(ErrorCode::Protocol, "a plaintext Hello");
    assert!(error.message.contains("requires TLS"), "{error:?}");
    assert_eq!(list_tree(&tree.root()), Vec::<String>::new());
}

#[test]
fn tls_client_against_a_plain_daemon_fails_clearly() {
    let tree = Tree::new();
    let pki = Pki::new(&["127.0.0.1", "localhost"]);
    let daemon = Daemon::start(&tree.root(), &[]);
    let src = tree.src("a.bin");
    random_file(&src, 1000, 9);
    let ca = pki.ca().display().to_string();
    let out = send(
        &src,
        &daemon.addr(),
        "a.bin",
        &["--tls", "--ca", &ca],
        &[],
        FAIL_FAST,
    );
    let line = out.error_line();
    assert!(line.contains("does not offer TLS"), "{line}");
    assert_eq!(list_tree(&tree.root()), Vec::<String>::new());
}

/// A certificate the client cannot verify (unknown CA, or valid for another name) and has not
/// pinned is refused as an unknown host, and no connection ever carries a plaintext session.
#[test]
fn unverifiable_certificates_fail_without_plaintext_fallback() {
    let tree = Tree::new();
    let pki = Pki::new(&["127.0.0.1", "localhost"]);
    let daemon = pki.start_daemon(&tree.root(), &[]);
    let elsewhere = Pki::new(&["server.elsewhere.invalid"]);
    let tree2 = Tree::new();
    let misnamed = elsewhere.start_daemon(&tree2.root(), &[]);
    let src = tree.src("a.bin");
    random_file(&src, 100_000, 10);
    for (what, upstream, ca) in [
        ("unknown CA", &daemon, pki.other_ca()),
        ("certificate for another name", &misnamed, elsewhere.ca()),
    ] {
        let tee = Tee::start(upstream.socket_addr());
        let out = send(
            &src,
            &tee.addr(),
            "a.bin",
            &["--tls", "--ca", ca.to_str().unwrap()],
            &[("XFER_TOKEN", TOKEN)],
            FAIL_FAST,
        );
        let line = out.error_line();
        assert!(line.contains("is not a known host"), "{what}: {line}");
        let captured = tee.captured();
        assert!(!captured.is_empty(), "{what}: no connection");
        for (i, c) in captured.iter().enumerate() {
            let (frames, used) = leading_frames(&c.up, 2);
            assert!(
                matches!(frames.as_slice(), [Frame::Hello(h)] if h.capabilities & CAP_TLS != 0),
                "{what}, connection {i}: the client sent {frames:?} in plaintext"
            );
            let rest = &c.up[used..];
            assert!(
                rest.is_empty() || rest[0] == 0x16 || rest[0] == 0x15,
                "{what}, connection {i}: plaintext after the TLS request: {:?}",
                &rest[..rest.len().min(32)]
            );
            assert!(!contains(&c.up, b"a.bin"), "{what}: the name went out");
        }
    }
    assert_eq!(list_tree(&tree.root()), Vec::<String>::new());
    assert_eq!(list_tree(&tree2.root()), Vec::<String>::new());
}

/// An attacker answers the TLS request in plaintext (`Welcome`, `Challenge`, an `Error` that
/// invites a retry, or nothing): the client gives up and sends nothing more in plaintext.
#[test]
fn tls_request_answered_in_plaintext_is_not_downgraded() {
    let tree = Tree::new();
    let pki = Pki::new(&["127.0.0.1", "localhost"]);
    let src = tree.src("a.bin");
    random_file(&src, 10_000, 11);
    let ca = pki.ca().display().to_string();
    let welcome = Frame::Welcome(Welcome {
        version: 1,
        capabilities: CAP_TLS,
        max_chunk_size: 1 << 20,
        window: 2,
        agent: "impostor".into(),
        proof: Vec::new(),
    });
    let challenge = Frame::Challenge(xfer_proto::Challenge { nonce: nonce() });
    let error = Frame::Error(ErrorFrame::new(
        ErrorCode::Protocol,
        "TLS unavailable, retry without --tls",
    ));
    for answer in [Some(welcome), Some(challenge), Some(error), None] {
        let what = format!("answer {:?}", answer.as_ref().map(Frame::frame_type));
        let impostor = Impostor::start(move |conn| {
            // Read the TLS request, then answer it in plaintext (or just close).
            if conn.recv().is_some() {
                match &answer {
                    Some(frame) => conn.send(frame),
                    None => conn.shutdown_write(),
                }
            }
        });
        let out = send(
            &src,
            &impostor.addr(),
            "a.bin",
            &["--tls", "--ca", &ca],
            &[("XFER_TOKEN", TOKEN)],
            FAIL_FAST,
        );
        let line = out.error_line();
        let seen = impostor.finish();
        assert!(!seen.is_empty(), "{what}: the client never connected");
        for (i, got) in seen.iter().enumerate() {
            let (frames, used) = leading_frames(got, 2);
            assert!(
                matches!(frames.as_slice(), [Frame::Hello(h)] if h.capabilities & CAP_TLS != 0),
                "{what}, connection {i}: the client sent {frames:?}; it said {line:?}"
            );
            assert_eq!(
                used,
                got.len(),
                "{what}, connection {i}: the client sent more after the plaintext answer"
            );
        }
    }
}

/// A server that challenges the client but cannot prove it holds the token (it reflects the
/// client's own proof, or sends a wrong one) gets no request: the client stops after `Auth`.
#[test]
fn server_that_cannot_prove_the_token_gets_no_request() {
    let tree = Tree::new();
    let src = tree.src("a.bin");
    random_file(&src, 10_000, 16);
    for reflect in [true, false] {
        let impostor = Impostor::start(move |conn| {
            let Some(Frame::Hello(_)) = conn.recv() else {
                return;
            };
            conn.send(&Frame::Challenge(xfer_proto::Challenge { nonce: nonce() }));
            let Some(Frame::Auth(a)) = conn.recv() else {
                return;
            };
            let proof = if reflect { a.proof } else { vec![0x5a; 32] };
            conn.send(&Frame::Welcome(Welcome {
                version: 1,
                capabilities: xfer_proto::CAP_AUTH,
                max_chunk_size: 1 << 20,
                window: 2,
                agent: "impostor".into(),
                proof,
            }));
            // A request now would be a failure: take it and close, so the client ends.
            let _ = conn.recv();
            conn.shutdown_write();
        });
        let out = send(
            &src,
            &impostor.addr(),
            "a.bin",
            &[],
            &[("XFER_TOKEN", TOKEN)],
            FAIL_FAST,
        );
        let seen = impostor.finish();
        assert!(!seen.is_empty(), "the client never connected");
        for (i, got) in seen.iter().enumerate() {
            let (frames, used) = leading_frames(got, 8);
            assert_eq!(used, got.len(), "connection {i}: undecodable bytes");
            let requests: Vec<_> = frames
                .iter()
                .filter(|f| {
                    !matches!(
                        f,
                        Frame::Hello(_) | Frame::Auth(_) | Frame::Error(_) | Frame::Goodbye
                    )
                })
                .collect();
            assert!(
                requests.is_empty(),
                "reflect {reflect}, connection {i}: the client sent {requests:?} to an impostor"
            );
        }
        let line = out.error_line();
        assert_starts(
            &line,
            "xfer: authentication failed: the server could not prove it holds the token",
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The root cannot be escaped
// ---------------------------------------------------------------------------------------------

/// Asks `frame` on a fresh authenticated connection and returns the answer (`None`: closed).
fn ask(daemon: &Daemon, frame: &Frame) -> Option<Frame> {
    let mut conn = RawConn::handshaken(daemon.socket_addr(), None);
    conn.send(frame);
    let answer = conn.recv();
    if let Some(Frame::Error(e)) = &answer {
        if e.error_code().is_some_and(ErrorCode::is_request_level) {
            conn.assert_usable();
        }
    }
    answer
}

/// A request naming a path, as the tables below send it.
#[derive(Clone, Copy, Debug)]
enum Ask {
    OpenRead,
    OpenWrite,
    GetFile,
    PutFile,
    MakeDir,
    MakeLink,
    List,
    ListTree,
}

use Ask::*;

/// The requests that name a file or a directory to make.
const FILE_ASKS: &[Ask] = &[OpenRead, OpenWrite, GetFile, PutFile, MakeDir, MakeLink];
/// The requests that name a directory to list.
const DIR_ASKS: &[Ask] = &[List, ListTree];

impl Ask {
    /// The request for `name` (a write carries a few bytes, a link points to `x`).
    fn frame(self, name: &str) -> Frame {
        match self {
            OpenRead => open_read(name),
            OpenWrite => open_write(name, 5),
            GetFile => get_file(name),
            PutFile => put_file(name, b"evil"),
            MakeDir => make_dir(name),
            MakeLink => make_link(name, "x"),
            List => list(name),
            ListTree => list_tree_frame(name),
        }
    }
}

/// Each row's requests of each of its names, labelled `ASK "NAME"`, name by name.
fn requests(table: &[(&[Ask], &[&str])]) -> Vec<(String, Frame)> {
    let mut all = Vec::new();
    for (asks, names) in table {
        for name in *names {
            for ask in *asks {
                all.push((format!("{ask:?} {name:?}"), ask.frame(name)));
            }
        }
    }
    all
}

/// Runs every `(what, frame)` on its own connection and collects every answer that is not
/// `Error{BadPath}` (answers of the wrong kind are listed together, so one run shows all).
#[track_caller]
fn assert_all_bad_path(daemon: &mut Daemon, cases: &[(String, Frame)]) {
    let mut wrong = Vec::new();
    for (what, frame) in cases {
        match ask(daemon, frame) {
            Some(Frame::Error(e)) if e.error_code() == Some(ErrorCode::BadPath) => {}
            Some(Frame::Error(e)) => wrong.push(format!(
                "{what}: Error{{{:?}}} {:?}",
                e.error_code(),
                e.message
            )),
            other => wrong.push(format!("{what}: {other:?}")),
        }
        daemon.assert_running();
    }
    assert!(
        wrong.is_empty(),
        "expected Error{{BadPath}} for each; got:\n  {}",
        wrong.join("\n  ")
    );
}

/// Names that point at existing files and directories outside the root (the bad-name checks
/// in `malformed.rs` use names of files that do not exist) and components over 255 bytes.
/// (`List{dir = "/"}` is not among them: a server may strip trailing `/`, so it lists the root.)
#[test]
fn names_aimed_at_existing_outside_files_read_and_change_nothing() {
    let tree = Tree::new();
    let outside = Outside::new(tree.path());
    let mut daemon = Daemon::start(&tree.root(), &[]);
    let secret = outside.join("secret.txt").display().to_string();
    let dir = outside.path().display().to_string();
    let long_component = format!("d/{}/x", "c".repeat(256));
    let mut all = requests(&[
        (
            FILE_ASKS,
            &[
                &secret,
                "../outside/secret.txt",
                "sub/../../outside/secret.txt",
                "./../outside/secret.txt",
                "outside/../../outside/secret.txt",
                &long_component,
            ],
        ),
        (
            DIR_ASKS,
            &[
                &dir,
                "..",
                "../outside",
                "/etc",
                "../outside/sub",
                "a/../..",
            ],
        ),
    ]);
    // Links whose target leads out of the root.
    for target in [
        "../../outside",
        secret.as_str(),
        "/etc/passwd",
        "d/../../outside",
        "d/../..",
    ] {
        all.push((
            format!("MakeLink \"d/l\" -> {target:?}"),
            make_link("d/l", target),
        ));
    }
    assert_all_bad_path(&mut daemon, &all);
    // Through the real client too, both directions.
    let src = tree.src("evil.bin");
    random_file(&src, 1000, 12);
    for name in [secret.as_str(), "../outside/secret.txt"] {
        let line = XferRun::send(&src, &daemon.addr(), name, &[])
            .wait()
            .error_line();
        assert!(line.contains("bad path"), "send --as {name}: {line}");
        let out = tree.out("stolen.txt");
        let line = XferRun::recv(name, &daemon.addr(), &out, &[])
            .wait()
            .error_line();
        assert!(line.contains("bad path"), "recv {name}: {line}");
        assert!(!out.exists(), "recv {name} wrote {}", out.display());
    }
    outside.assert_untouched("names aimed outside");
    assert_eq!(list_tree(&tree.root()), Vec::<String>::new());
}

/// Symlinks inside the root that lead out (absolute, relative, through `..`, a loop) cannot be
/// read, listed, written through, or written over; one that stays inside is followed.
#[test]
fn symlinks_leading_out_are_neither_read_nor_written() {
    let tree = Tree::new();
    let outside = Outside::new(tree.path());
    let root = tree.root();
    symlink(outside.join("secret.txt"), root.join("abs-link")).unwrap();
    symlink("../outside/secret.txt", root.join("rel-link")).unwrap();
    symlink("..", root.join("up")).unwrap();
    symlink("../outside/sub", root.join("subdir-link")).unwrap();
    symlink("loop", root.join("loop")).unwrap();
    fs::create_dir(root.join("in")).unwrap();
    fs::write(root.join("in/ok.txt"), b"inside").unwrap();
    symlink("in/ok.txt", root.join("inner-link")).unwrap();
    let mut daemon = Daemon::start(&root, &[]);

    let all = requests(&[
        (
            &[OpenRead, GetFile],
            &[
                "abs-link",
                "rel-link",
                "up/outside/secret.txt",
                "subdir-link/inner.txt",
                "loop",
                "loop/x",
            ],
        ),
        (
            &[OpenWrite, PutFile],
            &[
                "abs-link",
                "rel-link",
                "loop",
                "up/outside/secret.txt",
                "up/outside/planted.bin",
                "subdir-link/inner.txt",
                "subdir-link/planted.bin",
                "subdir-link/new/planted.bin",
                "up/root/planted.bin",
            ],
        ),
        (
            &[MakeDir, MakeLink],
            &["up/outside/newdir", "subdir-link/newdir", "up/x"],
        ),
        (DIR_ASKS, &["up", "up/outside", "subdir-link", "loop"]),
    ]);
    assert_all_bad_path(&mut daemon, &all);

    // The real client, uploading over the links: refused, links untouched.
    let src = tree.src("evil.bin");
    random_file(&src, 50_000, 13);
    for name in ["abs-link", "rel-link", "subdir-link/inner.txt"] {
        let line = XferRun::send(&src, &daemon.addr(), name, &[])
            .wait()
            .error_line();
        assert!(
            line.contains("bad path") || line.contains("not a regular file"),
            "send --as {name}: {line}"
        );
    }
    for link in ["abs-link", "rel-link", "up", "subdir-link", "loop"] {
        assert!(
            fs::symlink_metadata(root.join(link))
                .unwrap()
                .file_type()
                .is_symlink(),
            "{link} was replaced"
        );
    }
    // A link that stays inside is followed.
    let mut conn = RawConn::handshaken(daemon.socket_addr(), None);
    let answer = conn.request(&open_read("inner-link"));
    assert!(matches!(answer, Frame::ReadOpened(_)), "{answer:?}");
    outside.assert_untouched("symlinks leading out");
}

/// The daemon holds the directory it writes into: a directory swapped for a symlink to the
/// outside while an upload runs does not redirect the upload's writes or its final rename.
#[test]
fn directory_swapped_for_a_symlink_mid_upload_stays_inside() {
    let tree = Tree::new();
    let outside = Outside::new(tree.path());
    let root = tree.root();
    fs::create_dir(root.join("d")).unwrap();
    let daemon = Daemon::start(&root, &[]);
    let src = tree.src("slow.bin");
    let want = random_file(&src, 3 << 20, 14);
    let run = XferRun::send(
        &src,
        &daemon.addr(),
        "d/slow.bin",
        &["-c", "1", "--chunk-size", "256K", "--bwlimit", "1M"],
    );
    let part = root.join("d/.slow.bin.xfer-part");
    wait_until(Duration::from_secs(60), "the upload has begun", || {
        part.exists()
    });
    fs::rename(root.join("d"), root.join("d.moved")).unwrap();
    symlink(outside.path(), root.join("d")).unwrap();
    let out = run.wait();
    eprintln!(
        "upload into a swapped directory: {} {}",
        out.status,
        out.stderr.trim()
    );
    outside.assert_untouched("swapping the upload's directory for a symlink");
    if out.status.success() {
        assert_eq!(sha256_file(&root.join("d.moved/slow.bin")), want);
    }
    assert!(!outside.join("slow.bin").exists());
}

/// FIFOs, sockets, device nodes and links to devices are neither served nor replaced, and
/// opening them does not hang the daemon.
#[test]
fn special_files_are_refused() {
    use rustix::fs::{mknodat, FileType, Mode, CWD};
    let tree = Tree::new();
    let outside = Outside::new(tree.path());
    let root = tree.root();
    mkfifo(&root.join("fifo"));
    let _socket = std::os::unix::net::UnixListener::bind(root.join("sock")).expect("bind");
    symlink("/dev/null", root.join("devnull-link")).unwrap();
    symlink("/dev/zero", root.join("devzero-link")).unwrap();
    let mut names = vec!["fifo", "sock", "devnull-link", "devzero-link"];
    for (name, minor) in [("null-dev", 3), ("zero-dev", 5)] {
        let dev = rustix::fs::makedev(1, minor);
        match mknodat(
            CWD,
            root.join(name),
            FileType::CharacterDevice,
            Mode::from_raw_mode(0o666),
            dev,
        ) {
            Ok(()) => names.push(name),
            Err(e) => {
                eprintln!("special_files_are_refused: skipping the device node {name}: mknod: {e}")
            }
        }
    }
    let mut daemon = Daemon::start(&root, &[]);
    let all = requests(&[(&[OpenRead, OpenWrite, GetFile, PutFile], &names)]);
    assert_all_bad_path(&mut daemon, &all);
    // They are not listed either, and are still what they were.
    let mut conn = RawConn::handshaken(daemon.socket_addr(), None);
    match conn.request(&list("")) {
        Frame::Listing(l) => assert!(l.entries.is_empty(), "listed {:?}", l.entries),
        other => panic!("List answered {other:?}"),
    }
    let kind = |name: &str| fs::symlink_metadata(root.join(name)).unwrap().file_type();
    assert!(kind("fifo").is_fifo());
    assert!(kind("sock").is_socket());
    for name in names.iter().filter(|n| n.ends_with("-dev")) {
        assert!(kind(name).is_char_device(), "{name} was replaced");
    }
    outside.assert_untouched("special files");
}

/// Partial and journal names planted as symlinks to the outside (or as a FIFO) do not redirect
/// an upload's writes: the daemon opens them with `O_NOFOLLOW` and refuses.
#[test]
fn planted_partial_and_journal_files_do_not_redirect_writes() {
    let tree = Tree::new();
    let outside = Outside::new(tree.path());
    let root = tree.root();
    symlink(outside.join("secret.txt"), root.join(".x.xfer-part")).unwrap();
    symlink("../outside/secret.txt", root.join(".y.xfer-state")).unwrap();
    fs::create_dir(root.join("d")).unwrap();
    symlink("../../outside/sub/inner.txt", root.join("d/.z.xfer-part")).unwrap();
    mkfifo(&root.join(".f.xfer-part"));
    let daemon = Daemon::start(&root, &[]);
    let src = tree.src("evil.bin");
    random_file(&src, 100_000, 15);
    for name in ["x", "y", "d/z", "f"] {
        let out = send(
            &src,
            &daemon.addr(),
            name,
            &["--retry-deadline", "5"],
            &[],
            FAIL_FAST,
        );
        out.error_line();
        assert!(!root.join(name).exists(), "{name} was committed");
    }
    outside.assert_untouched("uploads over planted partial and journal files");
    // Nor are they listed, read or written by name.
    let mut conn = RawConn::handshaken(daemon.socket_addr(), None);
    match conn.request(&list("")) {
        Frame::Listing(l) => {
            let names: Vec<_> = l.entries.iter().map(|e| e.name.as_str()).collect();
            assert_eq!(names, ["d"]);
        }
        other => panic!("List answered {other:?}"),
    }
    for name in [".x.xfer-part", ".y.xfer-state", "d/.z.xfer-part"] {
        let code = error_code(conn.request(&open_read(name)), name);
        assert_eq!(code, Some(ErrorCode::BadPath), "OpenRead {name}");
    }
    outside.assert_untouched("reading planted names");
    assert!(fs::symlink_metadata(root.join(".x.xfer-part"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(fs::read(outside.join("secret.txt")).unwrap(), SECRET);
}

// ---------------------------------------------------------------------------------------------
// Copy grants
// ---------------------------------------------------------------------------------------------

/// Authenticates `conn` with a copy grant for `scope` made from the token; returns the answer to
/// `Auth` (a `Welcome` whose proof is checked, or whatever else the daemon sent).
fn grant_handshake(conn: &mut RawConn, scope: &str, expires: u64) -> Option<Frame> {
    let grant = xfer_proto::Grant {
        scope: scope.into(),
        expires,
        nonce: nonce(),
    };
    let key = auth::grant_key(TOKEN.as_bytes(), &grant);
    let client_nonce = nonce();
    let Frame::Challenge(c) = conn.request(&hello(0, client_nonce.clone())) else {
        panic!("no Challenge")
    };
    let proof = auth::client_proof(&key, &client_nonce, &c.nonce);
    conn.send(&Frame::Auth(xfer_proto::Auth {
        proof,
        grant: Some(grant),
    }));
    let answer = conn.recv();
    if let Some(Frame::Welcome(w)) = &answer {
        assert!(auth::verify_server(&key, &client_nonce, &c.nonce, &w.proof));
    }
    answer
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A copy grant lets its bearer write under its scope and nowhere else in the root: not by a
/// name beside the scope, not by reading, and not through a symlink it creates inside the scope
/// that points elsewhere in the root.
#[test]
fn copy_grant_cannot_write_outside_its_scope() {
    let tree = Tree::new();
    let root = tree.root();
    // `root/outside/` is outside the grant's scope but inside the root: nothing may change there.
    let victim = Outside::new(&root);
    let mut daemon = token_daemon(&tree, &[]);
    let addr = daemon.socket_addr();
    let expires = unix_now() + 3600;

    // Writing under the scope works.
    let mut conn = RawConn::connect(addr);
    let answer = grant_handshake(&mut conn, "in/box", expires);
    assert!(matches!(answer, Some(Frame::Welcome(_))), "{answer:?}");
    let answer = conn.request(&put_file("in/box/ok.txt", b"allowed"));
    assert!(matches!(answer, Frame::Done(_)), "{answer:?}");
    assert_eq!(fs::read(root.join("in/box/ok.txt")).unwrap(), b"allowed");

    // Beside the scope, and reading, are refused (fatal Error{Auth}).
    for (what, frame) in [
        (
            "a sibling with the scope as prefix",
            put_file("in/boxer/x.txt", b"no"),
        ),
        ("the scope's parent", put_file("in/x.txt", b"no")),
        ("OpenRead", open_read("in/box/ok.txt")),
        ("List", list("")),
    ] {
        let mut conn = RawConn::connect(addr);
        grant_handshake(&mut conn, "in/box", expires);
        conn.send(&frame);
        conn.expect_fatal(ErrorCode::Auth, what);
    }
    // Grants that expired, or claim to live too long, or whose scope was altered, fail.
    for (what, scope, expires) in [
        ("expired", "in/box", unix_now() - 1),
        ("a year long", "in/box", unix_now() + 365 * 86_400),
    ] {
        let mut conn = RawConn::connect(addr);
        let answer = grant_handshake(&mut conn, scope, expires);
        assert!(
            matches!(&answer, Some(Frame::Error(e)) if e.error_code() == Some(ErrorCode::Auth)),
            "{what} grant: {answer:?}"
        );
    }

    // The escape: a link inside the scope to elsewhere in the root, then a write through it.
    let mut conn = RawConn::connect(addr);
    grant_handshake(&mut conn, "in/box", expires);
    conn.send(&make_link("in/box/x", "../../outside"));
    let link = conn.recv();
    let mut escaped = Vec::new();
    if matches!(link, Some(Frame::Done(_))) {
        for name in ["in/box/x/planted.txt", "in/box/x/secret.txt"] {
            let answer = conn.request(&put_file(name, b"written through a link"));
            escaped.push(format!("PutFile {name}: {answer:?}"));
            if !matches!(answer, Frame::Done(_)) {
                break;
            }
        }
    }
    daemon.assert_running();
    victim.assert_untouched(&format!(
        "MakeLink in/box/x -> ../../outside answered {link:?}; then {escaped:?}"
    ));
}
