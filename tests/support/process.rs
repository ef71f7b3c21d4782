//! What a process holds, read from `/proc/PID/`: its open file descriptors and resident memory,
//! now ([`open_fds`], [`rss_bytes`]) or at their peak over a while ([`Peaks`]).

use std::fs;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Open file descriptors of process `pid`.
pub fn open_fds(pid: u32) -> u64 {
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
pub fn rss_bytes(pid: u32) -> u64 {
    status_kb(pid, "VmRSS:")
}

/// The soft limit on open files of process `pid`.
pub fn fd_limit(pid: u32) -> u64 {
    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).expect("read /proc/PID/limits");
    limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|soft| soft.parse().ok())
        .unwrap_or(u64::MAX)
}

/// Samples the peak fds and RSS of a process on a thread until stopped.
pub struct Peaks {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(u64, u64)>,
}

impl Peaks {
    /// Starts sampling process `pid` every 50 ms.
    pub fn watch(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let (mut fds, mut mem) = (0, 0);
            while !flag.load(Ordering::SeqCst) {
                fds = fds.max(open_fds(pid));
                mem = mem.max(rss_bytes(pid));
                std::thread::sleep(Duration::from_millis(50));
            }
            (fds, mem)
        });
        Self { stop, thread }
    }

    /// Peak (fds, RSS bytes) seen.
    pub fn stop(self) -> (u64, u64) {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().expect("sampler")
    }
}
