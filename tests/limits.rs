//! Limits end to end, over real sockets against the real `xferd`: the handshake and idle
//! timeouts, connections per client address, transfers per connection, disk space reserved
//! before an upload is accepted, slow clients (slowloris) and a flood of garbage connections.
//! Frame sizes checked before buffering are in `malformed.rs`.

use std::fs;
use std::io::{ErrorKind, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::RngCore;
use xfer_proto::{ErrorCode, Frame, CAP_TLS};
use xfer_tests::{random_file, round_trip, wait_until, xfer, Daemon, Tree, XferRun};

use xfer_tests::process::{open_fds, rss_bytes};
use xfer_tests::raw::{
    encode, error_code, hello, list, nonce, open_read, open_write, read_some, RawConn,
};
use xfer_tests::tmpfs::Tmpfs;
use xfer_tests::Pki;

// ---------------------------------------------------------------------------------------------
// Timeouts
// ---------------------------------------------------------------------------------------------

/// How a connection stalls its handshake.
#[derive(Debug, Clone, Copy)]
enum Stall {
    /// Connects and sends nothing.
    Silent,
    /// Sends the first bytes of a `Hello`, then nothing.
    HalfHello,
    /// Sends `Hello`, receives `Challenge`, never sends `Auth`.
    NoAuth,
    /// Sends the TLS request, receives `StartTls`, never starts the TLS handshake.
    NoTlsHandshake,
}

/// Stalls a handshake as `stall` says and returns what the daemon sent before it closed.
fn stall(addr: SocketAddr, stall: Stall) -> (Vec<Frame>, Duration) {
    let mut conn = RawConn::connect(addr);
    let started = Instant::now();
    match stall {
        Stall::Silent => {}
        Stall::HalfHello => conn.send_bytes(&encode(&hello(0, nonce()))[..7]).unwrap(),
        Stall::NoAuth => {
            let answer = conn.request(&hello(0, nonce()));
            assert!(matches!(answer, Frame::Challenge(_)), "{answer:?}");
        }
        Stall::NoTlsHandshake => {
            let answer = conn.request(&hello(CAP_TLS, Vec::new()));
            assert_eq!(answer, Frame::StartTls);
        }
    }
    // `recv` fails the test if the daemon neither sends nor closes within its hang guard.
    let mut frames = Vec::new();
    while let Some(frame) = conn.recv() {
        frames.push(frame);
    }
    (frames, started.elapsed())
}

/// The daemon closes connections that do not finish their handshake within its handshake
/// timeout (10 s, fixed: `xferd` has no flag for it), whatever stage they stall in.
#[test]
fn handshake_timeout_closes_stalled_connections() {
    let tree = Tree::new();
    let token = tree.path().join("token");
    fs::write(&token, "limits-token\n").unwrap();
    let pki = Pki::new(&["127.0.0.1"]);
    // `--handshake-timeout` sets the limit (10 s by default).
    let limit = ["--handshake-timeout", "2"];
    let plain = Daemon::start(&tree.root(), &limit);
    let with_token = Daemon::start(
        &tree.root(),
        &["--token-file", token.to_str().unwrap(), limit[0], limit[1]],
    );
    let tls = pki.start_daemon(&tree.root(), &limit);
    let cases = [
        (plain.socket_addr(), Stall::Silent),
        (plain.socket_addr(), Stall::HalfHello),
        (with_token.socket_addr(), Stall::Silent),
        (with_token.socket_addr(), Stall::NoAuth),
        (tls.socket_addr(), Stall::Silent),
        (tls.socket_addr(), Stall::NoTlsHandshake),
    ];
    // All at once: the whole test takes one handshake timeout.
    let threads: Vec<_> = cases
        .iter()
        .map(|&(addr, how)| std::thread::spawn(move || (how, stall(addr, how))))
        .collect();
    for thread in threads {
        let (how, (frames, took)) = thread.join().expect("a stalled connection was not closed");
        eprintln!("handshake timeout: {how:?} closed after {took:?} with {frames:?}");
        match (how, frames.as_slice()) {
            // Inside the TLS handshake no plaintext frame may be sent.
            (Stall::NoTlsHandshake, []) => {}
            (Stall::NoTlsHandshake, other) => panic!("{how:?}: xferd sent {other:?}"),
            (_, []) => {}
            (_, [Frame::Error(e)]) => assert_eq!(e.error_code(), Some(ErrorCode::Protocol)),
            (_, other) => panic!("{how:?}: xferd sent {other:?}"),
        }
    }
    for mut daemon in [plain, with_token, tls] {
        daemon.assert_running();
    }
}

/// `--idle-timeout`: an established connection that stays silent is closed with an `Error`;
/// one that keeps sending requests is not, however long it lives.
#[test]
fn idle_timeout_closes_silent_connections_only() {
    let tree = Tree::new();
    let mut daemon = Daemon::start(&tree.root(), &["--idle-timeout", "2"]);
    let addr = daemon.socket_addr();
    let chatty = std::thread::spawn(move || {
        let mut conn = RawConn::connect(addr);
        conn.handshake(None);
        // Three idle periods' worth of requests, one every 100 ms.
        for _ in 0..60 {
            conn.assert_usable();
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let mut silent = RawConn::connect(addr);
    silent.handshake(None);
    let error = silent.expect_fatal(ErrorCode::Protocol, "an idle period of silence");
    assert!(error.message.contains("idle"), "{error:?}");
    chatty.join().expect("a busy connection was closed as idle");
    daemon.assert_running();
}

/// `--idle-timeout` counts silence, not slowness: a request whose bytes arrive one at a time
/// over more than three idle periods, as one large chunk does over a very slow link, is answered,
/// not cut off as idle.
#[test]
fn a_frame_still_arriving_is_not_idle() {
    let tree = Tree::new();
    let mut daemon = Daemon::start(&tree.root(), &["--idle-timeout", "1"]);
    let mut conn = RawConn::connect(daemon.socket_addr());
    conn.handshake(None);
    let request = encode(&list(""));
    let gap = Duration::from_millis(3_500 / request.len() as u64 + 1);
    for byte in &request {
        conn.send_bytes(std::slice::from_ref(byte))
            .expect("the daemon closed the connection while the request arrived");
        std::thread::sleep(gap);
    }
    match conn.recv() {
        Some(Frame::Listing(_)) => {}
        other => panic!("a request that arrived slowly was answered with {other:?}"),
    }
    conn.assert_usable();
    daemon.assert_running();
}

// ---------------------------------------------------------------------------------------------
// Counts
// ---------------------------------------------------------------------------------------------

/// `--max-conns-per-ip 4`: a fifth connection from the same address is told `Busy` before its
/// `Hello`; once one of the four closes, a new one is served.
#[test]
fn connections_per_address_are_capped() {
    let tree = Tree::new();
    let mut daemon = Daemon::start(&tree.root(), &["--max-conns-per-ip", "4"]);
    let addr = daemon.socket_addr();
    let mut held: Vec<RawConn> = (0..4)
        .map(|_| {
            let mut conn = RawConn::connect(addr);
            conn.handshake(None);
            conn
        })
        .collect();
    let mut fifth = RawConn::connect(addr);
    let error = fifth.expect_fatal(ErrorCode::Busy, "connecting a fifth time");
    assert!(error.message.contains("too many connections"), "{error:?}");
    for conn in &mut held {
        conn.assert_usable();
    }
    // The real client is refused the same way.
    let line = XferRun::spawn(["ls", &daemon.addr()]).wait().error_line();
    assert!(line.contains("busy"), "{line}");

    drop(held.pop());
    wait_until(Duration::from_secs(30), "a freed slot is served", || {
        let mut conn = RawConn::connect(addr);
        conn.send(&hello(0, nonce()));
        matches!(conn.recv(), Some(Frame::Welcome(_)))
    });
    daemon.assert_running();
}

/// A connection may hold 64 transfers open; the 65th request is refused with `TooLarge`, which
/// ends the connection.
#[test]
fn transfers_per_connection_are_capped() {
    let tree = Tree::new();
    fs::write(tree.root().join("f.txt"), b"some bytes").unwrap();
    let mut daemon = Daemon::start(&tree.root(), &[]);
    let mut conn = RawConn::connect(daemon.socket_addr());
    conn.handshake(None);
    for i in 0..64 {
        let answer = conn.request(&open_read("f.txt"));
        assert!(
            matches!(answer, Frame::ReadOpened(_)),
            "OpenRead #{i}: {answer:?}"
        );
    }
    conn.send(&open_read("f.txt"));
    conn.expect_fatal(ErrorCode::TooLarge, "OpenRead #64");
    // Uploads count the same way.
    let mut conn = RawConn::connect(daemon.socket_addr());
    conn.handshake(None);
    for i in 0..63 {
        let answer = conn.request(&open_read("f.txt"));
        assert!(
            matches!(answer, Frame::ReadOpened(_)),
            "OpenRead #{i}: {answer:?}"
        );
    }
    let answer = conn.request(&open_write("w.bin", 10));
    assert!(matches!(answer, Frame::WriteOpened(_)), "{answer:?}");
    conn.send(&open_write("w2.bin", 10));
    conn.expect_fatal(ErrorCode::TooLarge, "OpenWrite #65");
    daemon.assert_running();

    // `--max-transfers-per-conn` sets the cap.
    let mut small = Daemon::start(&tree.root(), &["--max-transfers-per-conn", "2"]);
    let mut conn = RawConn::connect(small.socket_addr());
    conn.handshake(None);
    for i in 0..2 {
        let answer = conn.request(&open_read("f.txt"));
        assert!(
            matches!(answer, Frame::ReadOpened(_)),
            "OpenRead #{i}: {answer:?}"
        );
    }
    conn.send(&open_read("f.txt"));
    conn.expect_fatal(
        ErrorCode::TooLarge,
        "OpenRead #2 with --max-transfers-per-conn 2",
    );
    small.assert_running();
}

// ---------------------------------------------------------------------------------------------
// Disk space
// ---------------------------------------------------------------------------------------------

fn free_bytes(dir: &Path) -> u64 {
    let st = rustix::fs::statvfs(dir).expect("statvfs");
    st.f_bavail * st.f_frsize
}

/// The daemon reserves an upload's space when it opens it: an upload larger than the free space
/// fails at once with `no space left on device`, before any data, and leaves no reservation.
#[test]
fn upload_larger_than_free_space_fails_before_any_data() {
    let tree = Tree::new();
    let Some(small) = Tmpfs::mount("16m") else {
        return;
    };
    let mut daemon = Daemon::start(small.path(), &[]);
    // Data, not holes: a sparse file gets space only for its data (tests/disk.rs).
    let src = tree.src("huge.bin");
    random_file(&src, 32 << 20, 20);
    let line = XferRun::send(&src, &daemon.addr(), "huge.bin", &[])
        .wait()
        .error_line();
    assert_eq!(line, "xfer: no space left on device");
    let log = daemon.stderr();
    assert!(
        log.contains("upload refused") && !log.contains("upload opened"),
        "the upload was not refused when opened:\n{log}"
    );
    // Raw: Error{NoSpace} answers OpenWrite and leaves the connection usable.
    let mut conn = RawConn::connect(daemon.socket_addr());
    conn.handshake(None);
    let code = error_code(conn.request(&open_write("raw.bin", 32 << 20)), "OpenWrite");
    assert_eq!(code, Some(ErrorCode::NoSpace));
    conn.assert_usable();
    drop(conn);
    assert!(
        free_bytes(small.path()) > 12 << 20,
        "refused uploads still hold space: {} bytes free",
        free_bytes(small.path())
    );
    // What fits still goes through.
    let fits = tree.src("fits.bin");
    random_file(&fits, 4 << 20, 21);
    round_trip(&daemon, &fits, "fits.bin", &tree.out("fits.bin"), &[]);
    daemon.assert_running();
}

// ---------------------------------------------------------------------------------------------
// Slow and hostile clients
// ---------------------------------------------------------------------------------------------

/// Connections that each send one byte of a `Hello` per second, reopened when the daemon
/// closes them, until stopped.
struct Slowloris {
    stop: mpsc::Sender<()>,
    thread: JoinHandle<usize>,
}

impl Slowloris {
    /// Opens `n` connections and returns once each has sent its first byte.
    fn start(addr: SocketAddr, n: usize) -> Self {
        let (stop, stopped) = mpsc::channel::<()>();
        let (ready_tx, ready) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            let bytes = encode(&hello(0, nonce()));
            let open = || {
                let stream = TcpStream::connect(addr).expect("slowloris connect");
                stream.set_nonblocking(true).unwrap();
                stream
            };
            let mut conns: Vec<(TcpStream, usize)> = (0..n).map(|_| (open(), 0)).collect();
            let mut reopened = 0;
            let mut block = [0u8; 1024];
            loop {
                for (stream, pos) in &mut conns {
                    // Anything from the daemon (its Error) or the close: it gave up on us.
                    let gone = !matches!(read_some(stream, &mut block), Err(e) if e.kind() == ErrorKind::WouldBlock);
                    if gone || stream.write_all(&bytes[*pos % bytes.len()..][..1]).is_err() {
                        *stream = open();
                        *pos = 0;
                        reopened += 1;
                    } else {
                        *pos += 1;
                    }
                }
                let _ = ready_tx.send(());
                match stopped.recv_timeout(Duration::from_secs(1)) {
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    _ => return reopened,
                }
            }
        });
        ready
            .recv_timeout(Duration::from_secs(60))
            .expect("slowloris connections open");
        Self { stop, thread }
    }

    /// Stops and closes every connection; returns how many the daemon had closed meanwhile.
    fn stop(self) -> usize {
        let _ = self.stop.send(());
        self.thread.join().expect("slowloris thread")
    }
}

/// Fifty connections dribbling one byte per second do not keep a well-behaved client from a
/// round trip of 16 MiB, nor from a listing.
#[test]
fn slowloris_does_not_starve_a_good_client() {
    let tree = Tree::new();
    let mut daemon = Daemon::start(&tree.root(), &[]);
    let slow = Slowloris::start(daemon.socket_addr(), 50);
    let src = tree.src("good.bin");
    random_file(&src, 16 << 20, 22);
    round_trip(
        &daemon,
        &src,
        "good.bin",
        &tree.out("good.bin"),
        &["-c", "4"],
    );
    let listing = xfer(["ls", &daemon.addr()]).ok();
    assert!(listing.stdout.contains("good.bin"), "{}", listing.stdout);
    let reopened = slow.stop();
    eprintln!("slowloris: the daemon closed {reopened} slow connections meanwhile");
    daemon.assert_running();
}

/// Ten thousand connections that each write 64 random bytes and close: afterwards the
/// daemon's descriptors and memory return near where they were, and it still serves.
#[test]
fn garbage_connection_flood_leaks_nothing() {
    const ATTEMPTS: usize = 10_000;
    const THREADS: usize = 4;
    /// Hang guard for the whole flood.
    const FLOOD_GUARD: Duration = Duration::from_secs(120);
    let tree = Tree::new();
    let mut daemon = Daemon::start(&tree.root(), &[]);
    let pid = daemon.pid();
    // Warm up (runtime and blocking threads, allocator arenas), then take the baseline.
    let src = tree.src("warm.bin");
    random_file(&src, 1 << 20, 23);
    round_trip(&daemon, &src, "warm.bin", &tree.out("warm.bin"), &[]);
    daemon.wait_idle(Duration::from_secs(30));
    let (fds_before, rss_before) = (open_fds(pid), rss_bytes(pid));

    let addr = daemon.socket_addr();
    let end = Instant::now() + FLOOD_GUARD;
    let threads: Vec<_> = (0..THREADS)
        .map(|_| {
            std::thread::spawn(move || {
                let mut rng = rand::thread_rng();
                let mut garbage = [0u8; 64];
                let (mut attempts, mut connected) = (0, 0);
                while attempts < ATTEMPTS / THREADS && Instant::now() < end {
                    attempts += 1;
                    if let Ok(mut stream) =
                        TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                    {
                        connected += 1;
                        rng.fill_bytes(&mut garbage);
                        let _ = stream.write_all(&garbage);
                    }
                }
                (attempts, connected)
            })
        })
        .collect();
    let (mut attempts, mut connected) = (0, 0);
    for thread in threads {
        let (a, c) = thread.join().expect("flood thread");
        attempts += a;
        connected += c;
    }
    assert_eq!(
        attempts, ATTEMPTS,
        "the flood did not finish within its guard of {FLOOD_GUARD:?}"
    );
    eprintln!("flood: {connected} of {attempts} connections were accepted");
    assert!(
        connected > ATTEMPTS / 2,
        "only {connected} connections got through"
    );
    daemon.assert_running();

    let settle = Instant::now() + Duration::from_secs(60);
    loop {
        let (fds, rss) = (open_fds(pid), rss_bytes(pid));
        if fds <= fds_before + 8 && rss <= rss_before + (32 << 20) {
            eprintln!("flood: fds {fds_before} -> {fds}, RSS {rss_before} -> {rss} bytes");
            break;
        }
        assert!(
            Instant::now() < settle,
            "after the flood: {fds} fds (baseline {fds_before}), RSS {rss} bytes \
             (baseline {rss_before}): not back near the baseline"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let src = tree.src("after.bin");
    random_file(&src, 1 << 20, 24);
    round_trip(&daemon, &src, "after.bin", &tree.out("after.bin"), &[]);
    daemon.assert_running();
}
