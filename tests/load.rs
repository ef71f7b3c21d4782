//! Load: 500 clients at once against a daemon serving 64 streams all finish, queued by its
//! semaphore, while its memory and file descriptors stay bounded and return near their baseline
//! afterwards; and a client told `server busy` retries until a stream is free.

use std::fs;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use xfer_tests::{
    journal_held, journal_path, random_file, sha256_file, wait_until, Daemon, Tree, XferRun,
};

const CLIENTS: u64 = 500;
const SIZE: u64 = 16 * 1024;
const MIB: u64 = 1024 * 1024;
const GUARD: Duration = Duration::from_secs(120);

/// Open file descriptors of process `pid`.
fn open_fds(pid: u32) -> u64 {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read /proc/PID/fd")
        .count() as u64
}

/// A `kB` field of `/proc/PID/status`, in bytes.
fn status_kb(pid: u32, field: &str) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        * 1024
}

/// Resident memory of process `pid`, in bytes.
fn rss(pid: u32) -> u64 {
    status_kb(pid, "VmRSS:")
}

/// The soft limit on open files of process `pid`.
fn fd_limit(pid: u32) -> u64 {
    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).expect("read /proc/PID/limits");
    limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|soft| soft.parse().ok())
        .unwrap_or(u64::MAX)
}

/// Samples the peak fds and RSS of `pid` on a thread until the returned guard is stopped.
struct Peaks {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(u64, u64)>,
}

impl Peaks {
    fn watch(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let (mut fds, mut mem) = (0, 0);
            while !flag.load(Ordering::SeqCst) {
                fds = fds.max(open_fds(pid));
                mem = mem.max(rss(pid));
                std::thread::sleep(Duration::from_millis(50));
            }
            (fds, mem)
        });
        Self { stop, thread }
    }

    /// Peak (fds, RSS bytes) seen.
    fn stop(self) -> (u64, u64) {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().expect("sampler")
    }
}

#[test]
fn five_hundred_concurrent_uploads_through_sixty_four_streams() {
    let tree = Tree::new();
    // Every client comes from 127.0.0.1: lift the per-address cap so the stream semaphore, not
    // the cap, is what queues them; and let them wait in the queue as long as it takes.
    let daemon = Daemon::start(
        &tree.root(),
        &[
            "--max-streams",
            "64",
            "--max-conns-per-ip",
            "4096",
            "--queue-timeout",
            "300",
        ],
    );
    let pid = daemon.pid();
    let files: Vec<(String, String)> = (0..CLIENTS)
        .map(|i| {
            let name = format!("load-{i}.bin");
            let hash = random_file(&tree.src(&name), SIZE, 10_000 + i);
            (name, hash)
        })
        .collect();

    // Warm up (runtime threads, allocator arenas), then take the baseline.
    let (warm, _) = &files[0];
    XferRun::send(&tree.src(warm), &daemon.addr(), warm, &[]).wait_ok();
    XferRun::recv(warm, &daemon.addr(), &tree.out(warm), &[]).wait_ok();
    daemon.wait_idle(GUARD);
    let (base_fds, base_rss) = (open_fds(pid), rss(pid));
    let limit = fd_limit(pid);

    let peaks = Peaks::watch(pid);
    let runs: Vec<XferRun> = files
        .iter()
        .map(|(name, _)| {
            XferRun::send(
                &tree.src(name),
                &daemon.addr(),
                name,
                &["--retry-deadline", "300"],
            )
        })
        .collect();
    let failed: Vec<String> = runs
        .into_iter()
        .map(XferRun::wait)
        .filter(|out| !out.status.success())
        .map(|out| format!("`{}`: {}", out.cmd, out.stderr.trim()))
        .collect();
    let (peak_fds, peak_rss) = peaks.stop();
    assert!(
        failed.is_empty(),
        "{} of {CLIENTS} clients failed, e.g. {:#?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    for (name, hash) in &files {
        assert_eq!(&sha256_file(&tree.root().join(name)), hash, "{name}");
    }
    eprintln!(
        "xferd: baseline {base_fds} fds / {} MiB RSS, peak {peak_fds} fds / {} MiB, fd limit {limit}",
        base_rss / MIB,
        peak_rss / MIB
    );
    let log = daemon.stderr();
    assert!(
        !log.contains("accept failed") && peak_fds + 64 < limit,
        "xferd came near its fd limit {limit} (peak {peak_fds}):\n{log}"
    );
    assert!(
        peak_rss <= base_rss + 256 * MIB,
        "xferd's RSS went from {} MiB to {} MiB for {CLIENTS} clients of {SIZE} bytes",
        base_rss / MIB,
        peak_rss / MIB
    );

    // Back near the baseline once every connection is closed (tokio frees lazily: poll).
    daemon.wait_idle(GUARD);
    let (mut fds, mut mem) = (0, 0);
    let settled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_until(
            Duration::from_secs(60),
            "xferd is back near its baseline",
            || {
                (fds, mem) = (open_fds(pid), rss(pid));
                fds <= base_fds + 8 && mem <= base_rss + 64 * MIB
            },
        )
    }));
    assert!(
        settled.is_ok(),
        "xferd holds {fds} fds (baseline {base_fds}) and {} MiB (baseline {} MiB) after the load",
        mem / MIB,
        base_rss / MIB
    );
}

/// With its only stream taken and a 1 s queue timeout, the daemon answers `server busy`; the
/// client retries with backoff (within `--retry-deadline`) and succeeds once the stream is free.
#[test]
fn a_client_told_server_busy_retries_until_a_stream_is_free() {
    let tree = Tree::new();
    let daemon = Daemon::start(
        &tree.root(),
        &["--max-streams", "1", "--queue-timeout", "1"],
    );
    let slow_src = tree.src("holder.bin");
    let slow_want = random_file(&slow_src, 4 * MIB, 1);
    // ~4 s on the one stream.
    let mut holder = XferRun::send(
        &slow_src,
        &daemon.addr(),
        "holder.bin",
        &["-c", "1", "--chunk-size", "64K", "--bwlimit", "1M"],
    );
    wait_until(GUARD, "the holder has the stream", || {
        assert!(holder.is_running(), "`{}` ended early", holder.cmd());
        journal_held(&journal_path(&tree.root().join("holder.bin"))) > 0
    });
    let src = tree.src("waiter.bin");
    let want = random_file(&src, SIZE, 2);
    let out = XferRun::send(
        &src,
        &daemon.addr(),
        "waiter.bin",
        &["--retry-deadline", "60"],
    )
    .wait();
    holder.wait_ok();
    assert!(
        daemon.stderr().contains("busy"),
        "the daemon never reported being busy:\n{}",
        daemon.stderr()
    );
    out.ok();
    assert_eq!(sha256_file(&tree.root().join("waiter.bin")), want);
    assert_eq!(sha256_file(&tree.root().join("holder.bin")), slow_want);
}
