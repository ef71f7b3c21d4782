//! [`Progress`]: how a transfer reports the bytes it moves, to whoever shows them: a terminal
//! bar in the `xfer` command, progress frames in the daemon's copies, or nobody
//! ([`NoProgress`]). The library draws nothing itself.

use std::sync::atomic::{AtomicU64, Ordering};

/// Receives a transfer's progress. Called from every connection's task, so cheap and shared.
pub trait Progress: Send + Sync + std::fmt::Debug {
    /// The bytes the whole operation covers, resumed ones included.
    fn set_length(&self, bytes: u64);
    /// The bytes done so far, when that jumps: held at the start, or back to zero.
    fn set_position(&self, bytes: u64);
    /// `bytes` more are done.
    fn inc(&self, bytes: u64);
    /// A short status beside the bytes (`3/10 files`).
    fn set_message(&self, message: String) {
        let _ = message;
    }
    /// The operation ended: a display clears itself.
    fn finish(&self) {}
}

/// Progress nobody watches.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn set_length(&self, _: u64) {}
    fn set_position(&self, _: u64) {}
    fn inc(&self, _: u64) {}
}

/// Progress kept as two counters for another task to read: the daemon relays them to its
/// client as progress frames.
#[derive(Debug, Default)]
pub struct ProgressCounter {
    done: AtomicU64,
    total: AtomicU64,
}

impl ProgressCounter {
    /// Bytes done so far.
    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    /// Bytes the operation covers (0 until known).
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }
}

impl Progress for ProgressCounter {
    fn set_length(&self, bytes: u64) {
        self.total.store(bytes, Ordering::Relaxed);
    }

    fn set_position(&self, bytes: u64) {
        self.done.store(bytes, Ordering::Relaxed);
    }

    fn inc(&self, bytes: u64) {
        self.done.fetch_add(bytes, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_counter_follows_length_position_and_increments() {
        let counter = ProgressCounter::default();
        assert_eq!((counter.done(), counter.total()), (0, 0));
        counter.set_length(100);
        counter.set_position(40);
        counter.inc(10);
        counter.set_message("ignored".into());
        counter.finish();
        assert_eq!((counter.done(), counter.total()), (50, 100));
        counter.set_position(0);
        assert_eq!(counter.done(), 0);
    }
}
