//! [`ReplayCache`]: the nonces of the early proofs a server took (`CAP_ZERO_RTT`), each kept until
//! its proof's time is out of the window, so that a recorded early flight is not taken twice.
//! Bounded: when full of nonces still in the window, it refuses rather than grows.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::ZERO_RTT_WINDOW_MS;

/// Why an early proof was not taken (a fallback to the challenge, never a failure).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Its time lies more than the window from the server's clock.
    Skew,
    /// Its nonce was taken already within the window.
    Replay,
    /// The cache holds its bound of nonces still in the window.
    Full,
    /// Not offered as the protocol wants it (a nonce of the wrong length).
    Malformed,
}

impl Refusal {
    /// A short name for logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Self::Skew => "skew",
            Self::Replay => "replay",
            Self::Full => "full",
            Self::Malformed => "malformed",
        }
    }
}

#[derive(Debug, Default)]
struct Nonces {
    /// Nonce → the time (ms since the epoch) after which it may be forgotten.
    until: HashMap<Vec<u8>, u64>,
    /// The earliest of `until`'s times: no sweep pays before it has passed.
    earliest: u64,
}

/// The nonces of early proofs taken, shared by every connection of a server.
#[derive(Debug)]
pub struct ReplayCache {
    nonces: Mutex<Nonces>,
    max: usize,
}

impl Default for ReplayCache {
    fn default() -> Self {
        Self::with_capacity(crate::ZERO_RTT_REPLAY_MAX)
    }
}

impl ReplayCache {
    /// A cache of at most `max` nonces.
    pub fn with_capacity(max: usize) -> Self {
        Self {
            nonces: Mutex::new(Nonces::default()),
            max,
        }
    }

    /// Nonces held now.
    pub fn len(&self) -> usize {
        self.lock().until.len()
    }

    /// True when no nonce is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Nonces> {
        self.nonces
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes the early proof of `nonce` made at `time_ms` (whose MAC already checked) if its
    /// time is within the window of `now_ms` and the nonce is new; records the nonce then.
    ///
    /// # Errors
    /// The [`Refusal`]: the server falls back to its challenge.
    pub fn admit(&self, nonce: &[u8], time_ms: u64, now_ms: u64) -> Result<(), Refusal> {
        if time_ms.abs_diff(now_ms) > ZERO_RTT_WINDOW_MS {
            return Err(Refusal::Skew);
        }
        let mut nonces = self.lock();
        if nonces.until.contains_key(nonce) {
            return Err(Refusal::Replay);
        }
        if nonces.until.len() >= self.max && now_ms > nonces.earliest {
            nonces.until.retain(|_, until| *until >= now_ms);
            nonces.earliest = nonces.until.values().copied().min().unwrap_or(0);
        }
        if nonces.until.len() >= self.max {
            return Err(Refusal::Full);
        }
        // Within the window, a replay is taken only while now ≤ time + W: kept that long.
        let until = time_ms.saturating_add(ZERO_RTT_WINDOW_MS);
        nonces.earliest = if nonces.until.is_empty() {
            until
        } else {
            nonces.earliest.min(until)
        };
        nonces.until.insert(nonce.to_vec(), until);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nonce_is_taken_once_within_the_window() {
        let cache = ReplayCache::with_capacity(4);
        let now = 1_000_000;
        assert_eq!(cache.admit(&[1; 32], now, now), Ok(()));
        assert_eq!(cache.admit(&[1; 32], now, now + 5), Err(Refusal::Replay));
        assert_eq!(
            cache.admit(&[2; 32], now - ZERO_RTT_WINDOW_MS - 1, now),
            Err(Refusal::Skew)
        );
        assert_eq!(
            cache.admit(&[2; 32], now + ZERO_RTT_WINDOW_MS + 1, now),
            Err(Refusal::Skew)
        );
        assert_eq!(cache.admit(&[2; 32], now + ZERO_RTT_WINDOW_MS, now), Ok(()));
    }

    #[test]
    fn the_bound_holds_and_frees_what_the_window_left() {
        let cache = ReplayCache::with_capacity(3);
        let now = 1_000_000;
        for n in 0..3u8 {
            assert_eq!(cache.admit(&[n; 32], now, now), Ok(()));
        }
        assert_eq!(cache.admit(&[9; 32], now, now + 1), Err(Refusal::Full));
        assert_eq!(cache.len(), 3, "full: refused, not grown");
        // Once their window has passed, the old nonces make room.
        let later = now + ZERO_RTT_WINDOW_MS + 1;
        assert_eq!(cache.admit(&[9; 32], later, later), Ok(()));
        assert_eq!(cache.len(), 1);
    }
}
