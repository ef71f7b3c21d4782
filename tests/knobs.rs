//! Tuning knobs end to end: `--congestion`, `--sndbuf` and `--rcvbuf` on both programs (an
//! algorithm the kernel lacks fails at start, in one line), and the number of connections
//! (`-c N` exactly, or a pool that grows while per-connection throughput is the limit), and
//! `--no-direct-io`, which keeps received files in the page cache.

use std::process::Command;

use xfer_tests::proxy::Proxy;
use xfer_tests::{bin, random_file, sha256_file, xfer, Daemon, Tree, XferRun};

/// The rate each connection gets through the proxy in the pool tests: slow enough that the pool
/// measures twice before a few MiB are through, so that only a growing pool finishes in time.
const PER_CONNECTION: u64 = 256 << 10;
/// Small chunks keep a connection's bytes in flight (window × chunk) far below a second's worth.
const CHUNK: &str = "64K";

#[test]
fn congestion_and_buffers_apply_and_are_reported() {
    let tree = Tree::new();
    let daemon = Daemon::start(
        &tree.root(),
        &["--congestion", "reno", "--sndbuf", "1M", "--rcvbuf", "1M"],
    );
    let src = tree.src("cc.bin");
    let want = random_file(&src, 3 << 20, 1);
    // reno is built into every Linux kernel; the buffers may be clamped, never refused.
    let knobs = [
        "--congestion",
        "reno",
        "--sndbuf",
        "4M",
        "--rcvbuf",
        "4M",
        "--json",
    ];
    let sent = XferRun::send(&src, &daemon.addr(), "cc.bin", &knobs).wait_ok();
    assert_eq!(sent.json()["congestion"], "reno", "{}", sent.stdout);
    assert_eq!(sha256_file(&daemon.root().join("cc.bin")), want);
    let out = tree.out("cc.bin");
    let got = XferRun::recv("cc.bin", &daemon.addr(), &out, &knobs).wait_ok();
    assert_eq!(got.json()["congestion"], "reno", "{}", got.stdout);
    assert_eq!(sha256_file(&out), want);
}

/// The congestion control a transfer picks by itself on a long path is one the kernel does not
/// have (a path counts as long from 0 ms here): one log line says so, and the transfer runs
/// with the system's, both ways.
#[test]
fn a_long_path_congestion_control_that_cannot_be_had_falls_back_in_one_line() {
    let tree = Tree::new();
    let daemon = Daemon::start(&tree.root(), &[]);
    let src = tree.src("lp.bin");
    let want = random_file(&src, 3 << 20, 3);
    let policy = [
        "--long-path-congestion",
        "nosuchcc",
        "--long-path-rtt",
        "0",
        "--json",
        "-v",
    ];
    let system = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control").unwrap();
    let out = tree.out("lp.bin");
    for run in [
        XferRun::send(&src, &daemon.addr(), "lp.bin", &policy).wait_ok(),
        XferRun::recv("lp.bin", &daemon.addr(), &out, &policy).wait_ok(),
    ] {
        let said: Vec<&str> = run
            .stderr
            .lines()
            .filter(|l| l.contains("keeping the system's congestion control"))
            .collect();
        assert_eq!(said.len(), 1, "{}", run.stderr);
        assert!(
            said[0].contains("\"nosuchcc\" is not available here"),
            "{}",
            said[0]
        );
        assert_eq!(run.json()["congestion"], system.trim(), "{}", run.stdout);
    }
    assert_eq!(sha256_file(&daemon.root().join("lp.bin")), want);
    assert_eq!(sha256_file(&out), want);
    // Chosen, and allowed: reno is in every kernel's allowed list.
    let reno = [
        "--long-path-congestion",
        "reno",
        "--long-path-rtt",
        "0",
        "--json",
    ];
    let run = XferRun::send(&src, &daemon.addr(), "lp2.bin", &reno).wait_ok();
    assert_eq!(run.json()["congestion"], "reno", "{}", run.stdout);
    assert_eq!(sha256_file(&daemon.root().join("lp2.bin")), want);
}

#[test]
fn an_unknown_congestion_control_is_a_one_line_error() {
    let tree = Tree::new();
    let daemon = Daemon::start(&tree.root(), &[]);
    let src = tree.src("x.bin");
    random_file(&src, 1000, 2);
    let run = XferRun::send(&src, &daemon.addr(), "x.bin", &["--congestion", "nosuchcc"]).wait();
    let line = run.error_line();
    assert!(
        line.starts_with(
            "xfer: congestion control \"nosuchcc\" is not available here (available: "
        ),
        "{line}"
    );
    assert!(line.contains("reno"), "{line}");
    assert!(!daemon.root().join("x.bin").exists());
    let bad = xfer([
        "send",
        "--sndbuf",
        "0",
        src.to_str().unwrap(),
        &daemon.addr(),
    ]);
    assert!(bad.error_line().contains("--sndbuf"), "{}", bad.stderr);
}

#[test]
fn xferd_refuses_an_unknown_congestion_control_at_start() {
    let tree = Tree::new();
    let run = |args: &[&str]| {
        let out = Command::new(bin("xferd"))
            .args(["--listen", "127.0.0.1:0", "--root"])
            .arg(tree.root())
            .args(args)
            .output()
            .expect("run xferd");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status, stdout, stderr)
    };
    for args in [
        &["--congestion", "nosuchcc"][..],
        &["--congestion", "nosuchcc", "--check-config"],
    ] {
        let (status, stdout, stderr) = run(args);
        assert!(!status.success(), "{args:?}: {stdout}{stderr}");
        assert!(!stdout.contains("listening"), "{stdout}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{stderr}");
        assert!(
            lines[0].starts_with("xferd: congestion control \"nosuchcc\" is not available here"),
            "{stderr}"
        );
    }
    let (status, stdout, stderr) =
        run(&["--congestion", "reno", "--sndbuf", "2M", "--check-config"]);
    assert!(status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("congestion = \"reno\""), "{stdout}");
    assert!(stdout.contains("sndbuf = \"2M\""), "{stdout}");
}

/// A daemon behind a proxy that caps every connection at [`PER_CONNECTION`].
fn capped(tree: &Tree, daemon_args: &[&str]) -> (Daemon, Proxy) {
    let daemon = Daemon::start(&tree.root(), daemon_args);
    let proxy = Proxy::start(daemon.socket_addr());
    proxy.set_rate_limit(Some(PER_CONNECTION));
    (daemon, proxy)
}

#[test]
fn without_c_the_pool_grows_while_each_connection_is_the_limit_upload() {
    let tree = Tree::new();
    let (daemon, proxy) = capped(&tree, &[]);
    let src = tree.src("grow.bin");
    let want = random_file(&src, 8 << 20, 3);
    let args = ["--chunk-size", CHUNK, "--json", "-v"];
    let sent = XferRun::send(&src, &proxy.addr(), "grow.bin", &args).wait_ok();
    assert_eq!(sha256_file(&daemon.root().join("grow.bin")), want);
    // 4 at first; the first doubling is a probe; a second one happens only because 8
    // connections measured faster than 4.
    let used = sent.json_u64("connections");
    assert!(used > 8, "{} {}", sent.stdout, sent.stderr);
    assert!(
        sent.stderr.contains("adding connections"),
        "{}",
        sent.stderr
    );
    assert!(proxy.stats().accepted >= used, "{:?}", proxy.stats());
}

#[test]
fn without_c_the_pool_grows_while_each_connection_is_the_limit_download() {
    let tree = Tree::new();
    let (daemon, proxy) = capped(&tree, &[]);
    let want = random_file(&daemon.root().join("grow.bin"), 8 << 20, 4);
    let out = tree.out("grow.bin");
    let args = ["--chunk-size", CHUNK, "--json", "-v"];
    let got = XferRun::recv("grow.bin", &proxy.addr(), &out, &args).wait_ok();
    assert_eq!(sha256_file(&out), want);
    let used = got.json_u64("connections");
    assert!(used > 8, "{} {}", got.stdout, got.stderr);
    // The client receives: the queue its pool weighs is the one the daemon's sockets report
    // (`PathReport`), and the proxy's cap leaves none standing.
    let log = without_colours(&got.stderr);
    let grew = log
        .lines()
        .find(|line| line.contains("adding connections"))
        .unwrap_or_else(|| panic!("{log}"));
    let queue = grew.split("queue_ms=").nth(1).unwrap_or_default();
    assert!(
        queue.starts_with(|c: char| c.is_ascii_digit()),
        "no queue known: {grew}"
    );
}

#[test]
fn a_busy_daemon_stops_the_pool_from_growing_instead_of_failing_it() {
    let tree = Tree::new();
    // Six connections from one address: the doubling to 8 gets two refusals.
    let (daemon, proxy) = capped(&tree, &["--max-conns-per-ip", "6"]);
    let src = tree.src("busy.bin");
    let want = random_file(&src, 3 << 20, 5);
    let args = ["--chunk-size", CHUNK, "--json"];
    let sent = XferRun::send(&src, &proxy.addr(), "busy.bin", &args).wait_ok();
    assert_eq!(sha256_file(&daemon.root().join("busy.bin")), want);
    let used = sent.json_u64("connections");
    assert!((5..=6).contains(&used), "{} {}", sent.stdout, sent.stderr);

    // Three from one address: the fourth connection the pool starts with is turned away too.
    let tree = Tree::new();
    let (daemon, proxy) = capped(&tree, &["--max-conns-per-ip", "3"]);
    let src = tree.src("three.bin");
    let want = random_file(&src, 1 << 20, 7);
    let sent = XferRun::send(&src, &proxy.addr(), "three.bin", &args).wait_ok();
    assert_eq!(sha256_file(&daemon.root().join("three.bin")), want);
    assert_eq!(sent.json_u64("connections"), 3, "{}", sent.stdout);
}

#[test]
fn without_c_the_pool_grows_past_16_within_the_daemons_stream_limit() {
    let tree = Tree::new();
    // 20 streams served at once; a 21st connection waits 1 s, then is told the daemon is busy.
    let (daemon, proxy) = capped(&tree, &["--max-streams", "20", "--queue-timeout", "1"]);
    let src = tree.src("wide.bin");
    // At 256 KiB/s a connection, 16 connections move 4 MiB/s: far below what this machine
    // carries under any load, so every doubling up to the daemon's limit measures faster.
    let want = random_file(&src, 24 << 20, 8);
    let args = ["--chunk-size", CHUNK, "--json", "-v"];
    let sent = XferRun::send(&src, &proxy.addr(), "wide.bin", &args).wait_ok();
    assert_eq!(sha256_file(&daemon.root().join("wide.bin")), want);
    let log = without_colours(&sent.stderr);
    assert!(log.contains("from=16 to=32"), "{log}");
    let used = sent.json_u64("connections");
    assert!((17..=20).contains(&used), "{} {}", sent.stdout, sent.stderr);
}

#[test]
fn the_first_connection_moves_chunks_while_the_rest_of_the_pool_waits_to_connect() {
    let tree = Tree::new();
    // One stream served at once, and the others kept waiting for longer than the client run's
    // guard: the file arrives only if chunks flow on the first connection before the rest of
    // the pool has connected.
    let daemon = Daemon::start(
        &tree.root(),
        &["--max-streams", "1", "--queue-timeout", "3600"],
    );
    let src = tree.src("first.bin");
    let want = random_file(&src, 4 << 20, 9);
    let args = ["--chunk-size", CHUNK, "--json"];
    let sent = XferRun::send(&src, &daemon.addr(), "first.bin", &args).wait_ok();
    assert_eq!(sha256_file(&daemon.root().join("first.bin")), want);
    assert_eq!(sent.json_u64("connections"), 1, "{}", sent.stdout);
}

#[test]
fn the_first_connection_of_a_download_moves_chunks_while_the_rest_of_the_pool_waits_to_connect() {
    let tree = Tree::new();
    // As for uploads: one stream served at once, the others kept waiting past the run's guard.
    let daemon = Daemon::start(
        &tree.root(),
        &["--max-streams", "1", "--queue-timeout", "3600"],
    );
    let want = random_file(&daemon.root().join("first.bin"), 4 << 20, 10);
    let out = tree.out("first.bin");
    let args = ["--chunk-size", CHUNK, "--json"];
    let got = XferRun::recv("first.bin", &daemon.addr(), &out, &args).wait_ok();
    assert_eq!(sha256_file(&out), want);
    assert_eq!(got.json_u64("connections"), 1, "{}", got.stdout);
}

#[test]
fn a_connection_stalled_in_its_handshake_does_not_hold_up_the_start() {
    let tree = Tree::new();
    let daemon = Daemon::start(&tree.root(), &[]);
    let proxy = Proxy::start(daemon.socket_addr());
    // The first connection to send a byte gets no further: the pool's others open beside it,
    // and the transfer starts on whichever is welcomed first (one after another, it would wait
    // for the stalled handshake to time out, then fail).
    proxy.stall_after(1, 1);
    let src = tree.src("stall.bin");
    let want = random_file(&src, 2 << 20, 11);
    let sent = XferRun::send(&src, &proxy.addr(), "stall.bin", &["--json"]).wait_ok();
    assert_eq!(sha256_file(&daemon.root().join("stall.bin")), want);
    assert!(proxy.stats().stalled >= 1, "{:?}", proxy.stats());
    assert!(sent.json()["seconds"].as_f64().is_some(), "{}", sent.stdout);
}

/// `text` without its terminal colour sequences (`ESC [ ... m`): `-v` logs are coloured.
fn without_colours(text: &str) -> String {
    let mut plain = String::with_capacity(text.len());
    let mut in_sequence = false;
    for c in text.chars() {
        match (in_sequence, c) {
            (false, '\x1b') => in_sequence = true,
            (false, c) => plain.push(c),
            (true, 'm') => in_sequence = false,
            (true, _) => {}
        }
    }
    plain
}

#[test]
fn with_c_exactly_that_many_connections_are_used() {
    let tree = Tree::new();
    let (daemon, proxy) = capped(&tree, &[]);
    let src = tree.src("three.bin");
    // Long enough (2 s at 3 x 256 KiB/s) for an adaptive pool to have grown.
    let want = random_file(&src, 3 << 19, 6);
    let args = ["-c", "3", "--chunk-size", CHUNK, "--json"];
    let sent = XferRun::send(&src, &proxy.addr(), "three.bin", &args).wait_ok();
    assert_eq!(sha256_file(&daemon.root().join("three.bin")), want);
    assert_eq!(sent.json_u64("connections"), 3, "{}", sent.stdout);
    assert_eq!(proxy.stats().accepted, 3, "{:?}", proxy.stats());
}

/// Pages of `path` in the page cache, and the file's pages in all (`mincore` of a mapping).
fn resident_pages(path: &std::path::Path) -> (usize, usize) {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path).expect("open received file");
    let len = usize::try_from(file.metadata().expect("stat").len()).expect("fits");
    let page = 4096;
    let pages = len.div_ceil(page);
    let mut vec = vec![0u8; pages];
    // SAFETY: a read-only shared mapping of a file we hold open, inspected with mincore into a
    // vector of one byte per page, then unmapped; no byte of the mapping is touched.
    unsafe {
        let addr = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        );
        assert_ne!(addr, libc::MAP_FAILED, "mmap {}", path.display());
        let rc = libc::mincore(addr, len, vec.as_mut_ptr());
        libc::munmap(addr, len);
        assert_eq!(rc, 0, "mincore {}", path.display());
    }
    (vec.iter().filter(|b| **b & 1 == 1).count(), pages)
}

/// Whether files in `dir` can be written directly (tmpfs cannot): the same check xferd makes.
fn offers_direct_io(dir: &std::path::Path) -> bool {
    use std::os::fd::AsFd;
    let probe = dir.join("direct-probe");
    let data = std::fs::File::create(&probe).expect("probe file");
    let dirfd = std::fs::File::open(dir).expect("open dir");
    let offered = xfer_core::direct::DirectWriter::open(dirfd.as_fd(), "direct-probe", &data);
    std::fs::remove_file(&probe).expect("remove probe");
    offered.is_some()
}

#[test]
fn received_files_skip_the_page_cache_unless_no_direct_io() {
    let tree = Tree::new();
    if !offers_direct_io(tree.path()) {
        eprintln!("skipped: the temporary directory's filesystem offers no direct I/O");
        return;
    }
    let around = Daemon::start(&tree.root(), &[]);
    let kept_root = tree.path().join("kept");
    std::fs::create_dir(&kept_root).expect("mkdir");
    let through = Daemon::start(&kept_root, &["--no-direct-io"]);
    // Several chunks and a ragged tail, well under the write-behind window.
    let src = tree.src("f.bin");
    let want = random_file(&src, (8 << 20) + 1000, 3);
    // Looked at before the file is read for its digest, which would bring it into the cache.
    let cached = |path: &std::path::Path| {
        let (resident, pages) = resident_pages(path);
        eprintln!("{}: {resident} of {pages} pages cached", path.display());
        assert_eq!(sha256_file(path), want);
        resident * 4 > pages * 3
    };

    XferRun::send(&src, &around.addr(), "f.bin", &["--chunk-size", "1M"]).wait_ok();
    assert!(
        !cached(&tree.root().join("f.bin")),
        "an upload stayed in the cache"
    );
    XferRun::send(&src, &through.addr(), "f.bin", &["--chunk-size", "1M"]).wait_ok();
    assert!(
        cached(&kept_root.join("f.bin")),
        "--no-direct-io dropped an upload"
    );

    let (plain, kept) = (tree.out("plain.bin"), tree.out("kept.bin"));
    XferRun::recv("f.bin", &around.addr(), &plain, &["--chunk-size", "1M"]).wait_ok();
    assert!(!cached(&plain), "a download stayed in the cache");
    let no_direct = ["--chunk-size", "1M", "--no-direct-io"];
    XferRun::recv("f.bin", &around.addr(), &kept, &no_direct).wait_ok();
    assert!(cached(&kept), "recv --no-direct-io dropped a download");
}
