//! The daemon's memory and file descriptors as a whole: many connections held to one buffer
//! budget (`--max-memory`) with every copy intact and RSS bounded by the budget, memory given
//! back after the burst, a client that stops reading holding up only itself, the buffer
//! metrics, and the open-file limit raised at start and named when `--max-streams` exceeds it.

use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use xfer_proto::{ChunkRef, Frame};
use xfer_tests::metrics::{metrics_port, scrape};
use xfer_tests::process::{fd_limit, open_fds, rss_bytes, Peaks};
use xfer_tests::raw::{open_read, RawConn};
use xfer_tests::{random_file, round_trip, sha256_file, wait_until, Daemon, Tree, XferRun};

const MIB: u64 = 1 << 20;
/// The smallest budget the daemon accepts: two of the largest frames.
const BUDGET: u64 = 34 * MIB;
const GUARD: Duration = Duration::from_secs(120);
/// Readers that stop reading in the budget test, and the chunk each asks for.
const SLOW_READERS: usize = 40;
const SLOW_CHUNK: u64 = 4 * MIB;

/// A daemon with a small budget and 1 MiB chunks, so that a few dozen connections ask for
/// several times the budget; the metrics endpoint on.
fn small_budget_daemon(tree: &Tree) -> Daemon {
    Daemon::start(
        &tree.root(),
        &[
            "--max-memory",
            "34M",
            "--chunk-size",
            "4M",
            "--max-streams",
            "256",
            "--max-conns-per-ip",
            "4096",
            "--queue-timeout",
            "300",
            "--metrics",
            "127.0.0.1:0",
        ],
    )
}

/// A connection that opens `name` for reading, asks for its first `chunks` chunks of `chunk`
/// bytes, and reads none of the answers (yet).
fn stuck_reader(daemon: &Daemon, name: &str, chunk: u64, chunks: u64) -> RawConn {
    let mut conn = RawConn::handshaken(daemon.socket_addr(), None);
    let Frame::ReadOpened(opened) = conn.request(&open_read(name)) else {
        panic!("no ReadOpened for {name}")
    };
    for i in 0..chunks {
        conn.send(&Frame::ReadChunk(ChunkRef {
            transfer_id: opened.transfer_id,
            offset: i * chunk,
            len: chunk as u32,
        }));
    }
    conn
}

/// Reads `chunks` `Data` frames from a [`stuck_reader`], checks each one's CRC, and returns the
/// sha256 of their payloads in order.
fn read_chunks(conn: RawConn, chunks: usize) -> String {
    use sha2::Digest;
    use std::io::Read;
    use tokio_util::codec::Decoder;
    let (mut stream, mut buf) = conn.into_stream();
    let mut codec = xfer_proto::FrameCodec::default();
    let mut hash = sha2::Sha256::new();
    let mut block = vec![0u8; 256 * 1024];
    let mut seen = 0;
    while seen < chunks {
        match codec.decode(&mut buf).expect("a frame") {
            Some(Frame::Data(data)) => {
                data.verify().expect("chunk CRC");
                hash.update(&data.payload);
                seen += 1;
            }
            Some(other) => panic!("expected Data, got {other:?}"),
            None => {
                let n = stream.read(&mut block).expect("read a chunk");
                assert!(n > 0, "xferd closed after {seen} chunks");
                buf.extend_from_slice(&block[..n]);
            }
        }
    }
    format!("{:x}", hash.finalize())
}

/// The largest `xferd_buffer_bytes` seen by scraping until stopped.
struct BufferPeak {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<f64>,
}

impl BufferPeak {
    fn watch(port: u16) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut peak: f64 = 0.0;
            while !flag.load(Ordering::SeqCst) {
                peak = peak.max(scrape(port, &["xferd_buffer_bytes"])[0]);
                std::thread::sleep(Duration::from_millis(20));
            }
            peak
        });
        Self { stop, thread }
    }

    fn stop(self) -> f64 {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().expect("metrics sampler")
    }
}

#[test]
fn many_connections_stay_within_the_budget_and_memory_goes_back() {
    const CLIENTS: u64 = 8;
    const CONNECTIONS: u64 = 8;
    const SIZE: u64 = 16 * MIB;
    let tree = Tree::new();
    let daemon = small_budget_daemon(&tree);
    let (pid, port) = (daemon.pid(), metrics_port(&daemon));
    let files: Vec<(String, String)> = (0..CLIENTS)
        .map(|i| {
            let name = format!("many-{i}.bin");
            let hash = random_file(&tree.src(&name), SIZE, 180 + i);
            (name, hash)
        })
        .collect();
    let args = ["-c", "8", "--chunk-size", "1M", "--retry-deadline", "300"];

    // Warm up (runtime threads, allocator arenas), then take the baseline.
    let warm = tree.src("warm.bin");
    random_file(&warm, 4 * MIB, 1);
    round_trip(&daemon, &warm, "warm.bin", &tree.out("warm.bin"), &args);
    daemon.wait_idle(GUARD);
    let base_rss = rss_bytes(pid);

    let (peaks, buffers) = (Peaks::watch(pid), BufferPeak::watch(port));
    let send =
        |(name, _): &(String, String)| XferRun::send(&tree.src(name), &daemon.addr(), name, &args);
    let uploads: Vec<XferRun> = files.iter().map(send).collect();
    uploads.into_iter().for_each(|run| {
        run.wait_ok();
    });
    let recv =
        |(name, _): &(String, String)| XferRun::recv(name, &daemon.addr(), &tree.out(name), &args);
    let downloads: Vec<XferRun> = files.iter().map(recv).collect();
    downloads.into_iter().for_each(|run| {
        run.wait_ok();
    });
    let (_, peak_rss) = peaks.stop();
    let peak_buffers = buffers.stop();

    for (name, hash) in &files {
        assert_eq!(&sha256_file(&tree.root().join(name)), hash, "upload {name}");
        assert_eq!(&sha256_file(&tree.out(name)), hash, "download {name}");
    }
    let budget = scrape(port, &["xferd_buffer_budget_bytes"])[0];
    eprintln!(
        "xferd: {} connections: baseline {} MiB RSS, peak {} MiB; buffers peak {} MiB of {} MiB",
        CLIENTS * CONNECTIONS,
        base_rss / MIB,
        peak_rss / MIB,
        peak_buffers as u64 / MIB,
        budget as u64 / MIB
    );
    assert_eq!(budget, BUDGET as f64);
    assert!(peak_buffers <= BUDGET as f64, "{peak_buffers} > {BUDGET}");

    // Readers that ask for every chunk of a file and read nothing until the budget is spent:
    // without a budget, each would hold the chunk it cannot send.
    let big = "slow.bin";
    let want = random_file(&tree.root().join(big), 4 * SLOW_CHUNK, 11);
    let peaks = Peaks::watch(pid);
    let slow: Vec<RawConn> = (0..SLOW_READERS)
        .map(|_| stuck_reader(&daemon, big, SLOW_CHUNK, 4))
        .collect();
    wait_until(GUARD, "the budget is spent and readers wait", || {
        let [held, waiting] = scrape(
            port,
            &[
                "xferd_buffer_bytes",
                "xferd_connections_waiting_for_buffers",
            ],
        )[..] else {
            unreachable!()
        };
        held > (BUDGET - SLOW_CHUNK) as f64 && waiting > 0.0
    });
    let readers: Vec<_> = slow
        .into_iter()
        .map(|conn| std::thread::spawn(move || read_chunks(conn, 4)))
        .collect();
    for reader in readers {
        assert_eq!(reader.join().expect("reader"), want, "a slow reader's copy");
    }
    let (_, peak_rss) = peaks.stop();
    // Chunks held at once without the budget: one per reader.
    let unbounded = SLOW_READERS as u64 * SLOW_CHUNK;
    let allowance = SLOW_READERS as u64 * 128 * 1024 + 32 * MIB;
    eprintln!(
        "xferd: {SLOW_READERS} slow readers: peak {} MiB RSS (baseline {} MiB, budget {} MiB, {} MiB without it)",
        peak_rss / MIB,
        base_rss / MIB,
        BUDGET / MIB,
        unbounded / MIB
    );
    assert!(BUDGET + allowance < unbounded, "the bound would not tell");
    assert!(
        peak_rss <= base_rss + BUDGET + allowance,
        "peak RSS {} MiB over baseline {} MiB + budget {} MiB + {} MiB",
        peak_rss / MIB,
        base_rss / MIB,
        BUDGET / MIB,
        allowance / MIB
    );

    // Memory goes back once the load is over.
    daemon.wait_idle(GUARD);
    assert_eq!(scrape(port, &["xferd_buffer_bytes"])[0], 0.0);
    let mut rss = 0;
    wait_until(
        Duration::from_secs(60),
        "xferd's RSS is back within 32 MiB of its baseline",
        || {
            rss = rss_bytes(pid);
            rss <= base_rss + 32 * MIB
        },
    );
}

#[test]
fn a_client_that_stops_reading_waits_alone() {
    const STUCK: usize = 8;
    let tree = Tree::new();
    let daemon = small_budget_daemon(&tree);
    let port = metrics_port(&daemon);
    let big = "big.bin";
    random_file(&tree.root().join(big), 64 * MIB, 7);

    // Each asks for every chunk of the file and reads none of them.
    let stuck: Vec<RawConn> = (0..STUCK)
        .map(|_| stuck_reader(&daemon, big, MIB, 64))
        .collect();
    // Once the socket buffers are full, each holds the one chunk it cannot send.
    wait_until(GUARD, "every stuck connection holds one chunk", || {
        scrape(port, &["xferd_buffer_bytes"])[0] == (STUCK as u64 * MIB) as f64
    });

    // The others move their files meanwhile, whole.
    let args = ["-c", "4", "--chunk-size", "1M"];
    let runs: Vec<(String, String, XferRun)> = (0..4)
        .map(|i| {
            let name = format!("other-{i}.bin");
            let hash = random_file(&tree.src(&name), 8 * MIB, 70 + i);
            let run = XferRun::send(&tree.src(&name), &daemon.addr(), &name, &args);
            (name, hash, run)
        })
        .collect();
    let reader = XferRun::recv(big, &daemon.addr(), &tree.out(big), &args);
    for (name, hash, run) in runs {
        run.wait_ok();
        assert_eq!(sha256_file(&tree.root().join(&name)), hash, "{name}");
    }
    reader.wait_ok();
    assert_eq!(
        sha256_file(&tree.out(big)),
        sha256_file(&tree.root().join(big))
    );

    // The stuck connections are still there, still holding their chunk, not cut off.
    let [open, held] = scrape(port, &["xferd_connections_open", "xferd_buffer_bytes"])[..] else {
        unreachable!()
    };
    assert!(open >= STUCK as f64, "only {open} connections open");
    assert_eq!(held, (STUCK as u64 * MIB) as f64);
    drop(stuck);
    wait_until(GUARD, "the stuck connections' chunks are freed", || {
        scrape(port, &["xferd_buffer_bytes"])[0] == 0.0
    });
}

#[test]
fn the_buffer_metrics_report_the_budget_its_use_and_waiters() {
    let tree = Tree::new();
    let daemon = small_budget_daemon(&tree);
    let port = metrics_port(&daemon);
    let series = [
        "xferd_buffer_budget_bytes",
        "xferd_buffer_bytes",
        "xferd_connections_waiting_for_buffers",
        "xferd_buffer_waits_total",
    ];
    assert_eq!(scrape(port, &series), [BUDGET as f64, 0.0, 0.0, 0.0]);

    // One connection more than the budget has chunks for, each with the one chunk it cannot
    // send (the socket buffers hold the rest, less than 16 MiB): the last one waits.
    let big = "m.bin";
    random_file(&tree.root().join(big), 16 * MIB, 3);
    let chunks = BUDGET / MIB;
    let stuck: Vec<RawConn> = (0..=chunks)
        .map(|_| stuck_reader(&daemon, big, MIB, 16))
        .collect();
    wait_until(
        GUARD,
        "the budget is spent and one connection waits",
        || {
            let [held, waiting, waits] = scrape(port, &series[1..])[..] else {
                unreachable!()
            };
            // Others may have waited on the way there, while chunks were still going out.
            (held, waiting) == (BUDGET as f64, 1.0) && waits >= 1.0
        },
    );
    drop(stuck);
    wait_until(GUARD, "the chunks are freed", || {
        scrape(port, &series[1..3]) == [0.0, 0.0]
    });
}

#[test]
fn a_budget_smaller_than_two_frames_is_refused_at_start() {
    let tree = Tree::new();
    let out = std::process::Command::new(xfer_tests::bin("xferd"))
        .args(["--listen", "127.0.0.1:0", "--max-memory", "16M", "--root"])
        .arg(tree.root())
        .output()
        .expect("run xferd");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("max_memory (--max-memory) must be at least 34M"),
        "{stderr}"
    );
}

#[test]
fn the_open_file_limit_is_raised_and_a_max_streams_beyond_it_is_named() {
    const LIMIT: u64 = 128;
    const CLIENTS: usize = 160;
    let tree = Tree::new();
    let daemon = Daemon::start_with_fd_limit(
        &tree.root(),
        64,
        LIMIT,
        &[
            "--max-streams",
            "100",
            "--max-conns-per-ip",
            "4096",
            "--metrics",
            "127.0.0.1:0",
        ],
    );
    let (pid, port) = (daemon.pid(), metrics_port(&daemon));
    assert_eq!(
        fd_limit(pid),
        LIMIT,
        "the soft limit is raised to the hard one"
    );
    let log = daemon.stderr();
    assert!(
        log.contains("open-file limit (RLIMIT_NOFILE)") && log.contains("soft=128 hard=128"),
        "{log}"
    );
    assert!(
        log.contains("max_streams (--max-streams) 100 needs about")
            && log.contains("RLIMIT_NOFILE allows 128"),
        "{log}"
    );

    // More clients than descriptors: those past what the limit holds wait in the backlog.
    let accepted = (LIMIT - 64) / 2;
    let clients: Vec<TcpStream> = (0..CLIENTS)
        .map(|_| TcpStream::connect(daemon.socket_addr()).expect("connect"))
        .collect();
    wait_until(GUARD, "the daemon accepted all it can hold", || {
        scrape(port, &["xferd_connections_accepted_total"])[0] >= accepted as f64
    });
    assert_eq!(
        scrape(port, &["xferd_connections_open"])[0],
        accepted as f64
    );
    assert!(open_fds(pid) < LIMIT);
    drop(clients);
    daemon.wait_idle(GUARD);
    let src = tree.src("after.bin");
    random_file(&src, MIB, 5);
    round_trip(&daemon, &src, "after.bin", &tree.out("after.bin"), &[]);
    let log = daemon.stderr();
    assert!(!log.contains("accept failed"), "{log}");
}
