//! [`RateLimiter`]: a token bucket shared by every connection of a transfer (`--bwlimit`).

use std::time::{Duration, Instant};

use tokio::sync::Mutex;

/// Limits bytes per second across all callers.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl RateLimiter {
    /// `bytes_per_sec` sustained, with bursts of up to a tenth of a second.
    pub fn new(bytes_per_sec: u64) -> Self {
        let rate = bytes_per_sec.max(1) as f64;
        Self {
            rate,
            burst: rate / 10.0,
            state: Mutex::new((0.0, Instant::now())),
        }
    }

    /// Waits until `bytes` may be sent.
    ///
    /// # Cancel safety
    /// Cancelling after the lock was taken still counts the bytes as sent.
    pub async fn acquire(&self, bytes: u64) {
        let wait = {
            let mut st = self.state.lock().await;
            let now = Instant::now();
            let (avail, last) = *st;
            let avail = (avail + now.duration_since(last).as_secs_f64() * self.rate)
                .min(self.burst)
                - bytes as f64;
            *st = (avail, now);
            if avail < 0.0 {
                Duration::from_secs_f64(-avail / self.rate)
            } else {
                Duration::ZERO
            }
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}
