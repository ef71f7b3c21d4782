//! Load: 500 clients at once against a daemon serving 64 streams all finish, queued by its
//! semaphore, while its memory and file descriptors stay bounded and return near their baseline
//! afterwards; and a client told `server busy` retries until a stream is free.

use std::time::Duration;

use xfer_tests::process::{fd_limit, open_fds, rss_bytes, Peaks};
use xfer_tests::{
    journal_held, journal_path, random_file, sha256_file, wait_until, Daemon, Tree, XferRun,
};

const CLIENTS: u64 = 500;
const SIZE: u64 = 16 * 1024;
const MIB: u64 = 1024 * 1024;
const GUARD: Duration = Duration::from_secs(120);

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
    let (base_fds, base_rss) = (open_fds(pid), rss_bytes(pid));
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
                (fds, mem) = (open_fds(pid), rss_bytes(pid));
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
