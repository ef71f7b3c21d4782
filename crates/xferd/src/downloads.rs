//! [`Downloads`]: the downloads in progress, by client address, name and file identity, so that
//! the connections carrying one download (its data connections and the one asking for the
//! digest) end as one logged transfer with totals, the way an upload ends in "upload complete".
//!
//! A download is complete when its digest was served and every one of its connections ended with
//! `Goodbye`; it failed when any of them broke off. Either way it is logged and counted once, when
//! its last connection ends.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tracing::info;
use xfer_proto::FileIdentity;

use crate::metrics::Metrics;

#[derive(Debug, PartialEq, Eq, Hash)]
struct Key {
    ip: IpAddr,
    name: String,
    identity: FileIdentity,
}

#[derive(Debug)]
struct Entry {
    peer: SocketAddr,
    legs: usize,
    started: Instant,
    resumed: u64,
    sent: u64,
    digest_served: bool,
    broken: bool,
}

/// Downloads with at least one connection open.
#[derive(Debug)]
pub(crate) struct Downloads {
    map: Mutex<HashMap<Key, Entry>>,
    metrics: Arc<Metrics>,
}

impl Downloads {
    pub(crate) fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            map: Mutex::default(),
            metrics,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Entry>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn key(peer: SocketAddr, name: &str, identity: FileIdentity) -> Key {
        Key {
            ip: peer.ip(),
            name: name.to_string(),
            identity,
        }
    }

    /// A connection opened `name` for reading; `resumed` bytes are already held by the client.
    pub(crate) fn opened(
        &self,
        peer: SocketAddr,
        name: &str,
        identity: FileIdentity,
        resumed: u64,
    ) {
        let mut map = self.lock();
        let entry = map
            .entry(Self::key(peer, name, identity))
            .or_insert_with(|| {
                self.metrics.downloads.active.inc();
                Entry {
                    peer,
                    legs: 0,
                    started: Instant::now(),
                    resumed: 0,
                    sent: 0,
                    digest_served: false,
                    broken: false,
                }
            });
        entry.legs += 1;
        if entry.resumed == 0 && resumed > 0 {
            self.metrics.downloads.resumed.inc();
        }
        entry.resumed = entry.resumed.max(resumed);
    }

    /// The whole-file digest of `name` was sent to the client.
    pub(crate) fn digest_served(&self, peer: SocketAddr, name: &str, identity: FileIdentity) {
        if let Some(entry) = self.lock().get_mut(&Self::key(peer, name, identity)) {
            entry.digest_served = true;
        }
    }

    /// A connection that had `name` open ended, after sending `sent` payload bytes of it;
    /// `clean` when it ended with `Goodbye`. The last one logs the download's end.
    pub(crate) fn closed(
        &self,
        peer: SocketAddr,
        name: &str,
        identity: FileIdentity,
        sent: u64,
        clean: bool,
    ) {
        let key = Self::key(peer, name, identity);
        let mut map = self.lock();
        let Some(entry) = map.get_mut(&key) else {
            return;
        };
        entry.legs -= 1;
        entry.sent += sent;
        entry.broken |= !clean;
        if entry.legs > 0 {
            return;
        }
        let Some(entry) = map.remove(&key) else {
            return;
        };
        drop(map);
        let downloads = &self.metrics.downloads;
        downloads.active.dec();
        let seconds = entry.started.elapsed().as_secs_f64();
        let rate = entry.sent as f64 / seconds.max(1e-9) / 1048576.0;
        if entry.digest_served && !entry.broken {
            downloads.completed.inc();
            info!(
                name = %key.name,
                size = identity.size,
                peer = %entry.peer,
                seconds = format_args!("{seconds:.3}"),
                mib_per_sec = format_args!("{rate:.1}"),
                resumed_bytes = entry.resumed,
                sent = entry.sent,
                "download complete"
            );
        } else {
            downloads.failed.inc();
            info!(
                name = %key.name,
                size = identity.size,
                peer = %entry.peer,
                seconds = format_args!("{seconds:.3}"),
                resumed_bytes = entry.resumed,
                sent = entry.sent,
                "download ended before completing; resumable"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: FileIdentity = FileIdentity {
        size: 100,
        mtime_ns: 1,
    };

    fn peer(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn legs_of_one_download_count_once() {
        let m = Arc::new(Metrics::default());
        let d = Downloads::new(Arc::clone(&m));
        d.opened(peer(1), "f", ID, 40);
        d.opened(peer(2), "f", ID, 0);
        assert_eq!(m.downloads.active.get(), 1);
        assert_eq!(m.downloads.resumed.get(), 1);
        d.digest_served(peer(2), "f", ID);
        d.closed(peer(2), "f", ID, 0, true);
        assert_eq!(
            m.downloads.completed.get(),
            0,
            "one connection is still open"
        );
        d.closed(peer(1), "f", ID, 60, true);
        assert_eq!(m.downloads.active.get(), 0);
        assert_eq!(m.downloads.completed.get(), 1);
        assert_eq!(m.downloads.failed.get(), 0);
    }

    #[test]
    fn a_broken_leg_or_no_digest_fails_the_download() {
        let m = Arc::new(Metrics::default());
        let d = Downloads::new(Arc::clone(&m));
        d.opened(peer(1), "f", ID, 0);
        d.digest_served(peer(1), "f", ID);
        d.opened(peer(2), "f", ID, 0);
        d.closed(peer(2), "f", ID, 10, false);
        d.closed(peer(1), "f", ID, 10, true);
        d.opened(peer(1), "g", ID, 0);
        d.closed(peer(1), "g", ID, 100, true);
        assert_eq!(m.downloads.failed.get(), 2);
        assert_eq!(m.downloads.completed.get(), 0);
        assert_eq!(m.downloads.active.get(), 0);
    }
}
