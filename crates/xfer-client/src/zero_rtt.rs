//! [`ZeroRttMemory`]: the daemons seen taking early proofs (`CAP_ZERO_RTT`), kept in a small file
//! beside `known_hosts`, so that the next connection to one sends its proof and first read-only
//! requests behind its `Hello` instead of a round trip later. A daemon is remembered with the
//! capabilities its `Welcome` granted and what had been offered, from which the `Welcome` the
//! early requests are encoded for is predicted.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;

use xfer_proto::{Welcome, CAP_AUTH, CAP_EARLY_AUTH, CAP_TLS, CAP_ZERO_RTT};

/// Most daemons remembered; the least recently learnt give way.
const MAX_DAEMONS: usize = 256;

/// Bits a server sets on its own or that say how the connection runs, not what it grants.
const HANDSHAKE_BITS: u64 = CAP_AUTH | CAP_EARLY_AUTH | CAP_ZERO_RTT | CAP_TLS;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Daemon {
    /// The bits offered on the connections it was learnt from.
    offered: u64,
    /// Of those, the bits it granted.
    granted: u64,
    /// Learnt inside TLS: early proofs go to it only there.
    tls: bool,
    /// When it was learnt, in the order of this file: the oldest is forgotten first.
    order: u64,
}

/// The daemons that take early proofs, by `HOST:PORT`, in memory and in a file.
#[derive(Debug)]
pub struct ZeroRttMemory {
    path: Option<PathBuf>,
    daemons: Mutex<Option<HashMap<String, Daemon>>>,
}

impl ZeroRttMemory {
    /// Remembered in the file at `path` (`None`: for this process only).
    pub fn at(path: Option<PathBuf>) -> Self {
        Self {
            path,
            daemons: Mutex::new(None),
        }
    }

    /// `$XDG_CONFIG_HOME/xfer/zero_rtt`, else `~/.config/xfer/zero_rtt`; `None` without a home.
    pub fn default_path() -> Option<PathBuf> {
        let known = crate::trust::KnownHosts::default_path()?;
        Some(known.with_file_name("zero_rtt"))
    }

    fn with<T>(&self, f: impl FnOnce(&mut HashMap<String, Daemon>) -> T) -> T {
        let mut daemons = self
            .daemons
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let daemons = daemons.get_or_insert_with(|| self.load());
        f(daemons)
    }

    fn load(&self) -> HashMap<String, Daemon> {
        let Some(text) = self
            .path
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
        else {
            return HashMap::new();
        };
        let mut daemons = HashMap::new();
        for (order, line) in text.lines().enumerate() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [peer, offered, granted, tls] = fields[..] else {
                continue;
            };
            let hex = |s: &str| u64::from_str_radix(s, 16).ok();
            let (Some(offered), Some(granted)) = (hex(offered), hex(granted)) else {
                continue;
            };
            let daemon = Daemon {
                offered,
                granted,
                tls: tls == "tls",
                order: order as u64,
            };
            daemons.insert(peer.to_string(), daemon);
        }
        daemons
    }

    /// Writes the file whole, by rename, so that a reader never sees half of it; a failure
    /// costs only a round trip next time.
    fn save(&self, daemons: &HashMap<String, Daemon>) {
        let Some(path) = &self.path else { return };
        let mut lines: Vec<_> = daemons.iter().collect();
        lines.sort_by_key(|(_, d)| d.order);
        let mut text = String::new();
        for (peer, d) in lines {
            let tls = if d.tls { "tls" } else { "plain" };
            text.push_str(&format!("{peer} {:x} {:x} {tls}\n", d.offered, d.granted));
        }
        let written = (|| {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let tmp = path.with_extension(format!("tmp{}", std::process::id()));
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(text.as_bytes())?;
            std::fs::rename(&tmp, path)
        })();
        if let Err(e) = written {
            tracing::debug!(path = %path.display(), error = %e, "cannot remember daemons taking early proofs");
        }
    }

    /// The `Welcome` a connection to `peer` offering `offer` is predicted to get, where it is
    /// remembered taking early proofs over this transport and everything offered was offered
    /// before: what the first requests behind an early proof are encoded for.
    pub fn predict(&self, peer: &str, offer: u64, tls: bool) -> Option<u64> {
        self.with(|daemons| {
            let d = daemons.get(peer)?;
            let asked = offer & !HANDSHAKE_BITS;
            // Inside TLS the server confirms it in the Welcome too.
            let tls_bit = if tls { CAP_TLS } else { 0 };
            (d.tls == tls && asked & !d.offered == 0)
                .then_some(d.granted & asked | CAP_AUTH | CAP_EARLY_AUTH | CAP_ZERO_RTT | tls_bit)
        })
    }

    /// Learns from a `welcome` answering `offer`: remembered when it takes early proofs,
    /// forgotten when it no longer does.
    pub fn learn(&self, peer: &str, offer: u64, tls: bool, welcome: &Welcome) {
        if welcome.capabilities & CAP_ZERO_RTT == 0 {
            self.forget(peer);
            return;
        }
        let asked = offer & !HANDSHAKE_BITS;
        let granted = welcome.capabilities & asked;
        self.with(|daemons| {
            let next = daemons.values().map(|d| d.order + 1).max().unwrap_or(0);
            let old = daemons.get(peer).copied();
            let daemon = match old {
                // What this offer asked is known anew; what it did not ask, as before.
                Some(d) if d.tls == tls => Daemon {
                    offered: d.offered | asked,
                    granted: d.granted & !asked | granted,
                    tls,
                    order: d.order,
                },
                _ => Daemon {
                    offered: asked,
                    granted,
                    tls,
                    order: next,
                },
            };
            if old == Some(daemon) {
                return;
            }
            daemons.insert(peer.to_string(), daemon);
            while daemons.len() > MAX_DAEMONS {
                let oldest = daemons
                    .iter()
                    .min_by_key(|(_, d)| d.order)
                    .map(|(p, _)| p.clone());
                match oldest {
                    Some(p) => daemons.remove(&p),
                    None => break,
                };
            }
            self.save(daemons);
        });
    }

    /// Forgets `peer`: its next connection proves itself as to an unknown daemon.
    pub fn forget(&self, peer: &str) {
        self.with(|daemons| {
            if daemons.remove(peer).is_some() {
                self.save(daemons);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn welcome(capabilities: u64) -> Welcome {
        Welcome {
            version: 1,
            capabilities,
            max_chunk_size: 1 << 20,
            window: 4,
            agent: "xferd/test".into(),
            proof: Vec::new(),
        }
    }

    #[test]
    fn a_daemon_is_remembered_in_its_file_and_predicted_for_what_was_offered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cfg").join("zero_rtt");
        let memory = ZeroRttMemory::at(Some(path.clone()));
        let offer = xfer_proto::CAP_FEATURES | CAP_EARLY_AUTH | CAP_ZERO_RTT;
        let granted = xfer_proto::CAP_TREE_META | xfer_proto::CAP_COMPRESSION;
        memory.learn(
            "h:1",
            offer,
            false,
            &welcome(granted | CAP_AUTH | CAP_ZERO_RTT),
        );
        memory.learn("other:2", offer, false, &welcome(CAP_AUTH | CAP_EARLY_AUTH));
        let again = ZeroRttMemory::at(Some(path.clone()));
        let predicted = again.predict("h:1", offer, false).unwrap();
        assert_eq!(
            predicted,
            granted | CAP_AUTH | CAP_EARLY_AUTH | CAP_ZERO_RTT
        );
        assert_eq!(
            again.predict("h:1", offer, true),
            None,
            "learnt without TLS"
        );
        memory.learn(
            "t:3",
            offer | CAP_TLS,
            true,
            &welcome(CAP_AUTH | CAP_ZERO_RTT | CAP_TLS),
        );
        assert_eq!(
            memory.predict("t:3", offer | CAP_TLS, true),
            Some(CAP_AUTH | CAP_EARLY_AUTH | CAP_ZERO_RTT | CAP_TLS),
            "inside TLS the Welcome confirms it"
        );
        assert_eq!(
            again.predict("h:1", offer | xfer_proto::CAP_DELETE, false),
            None,
            "never offered: unknown"
        );
        assert_eq!(again.predict("other:2", offer, false), None);
        again.forget("h:1");
        assert_eq!(
            ZeroRttMemory::at(Some(path)).predict("h:1", offer, false),
            None
        );
    }

    #[test]
    fn the_file_stays_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("zero_rtt");
        let memory = ZeroRttMemory::at(Some(path.clone()));
        for n in 0..MAX_DAEMONS + 10 {
            memory.learn(&format!("h{n}:1"), 0, false, &welcome(CAP_ZERO_RTT));
        }
        let text = std::fs::read_to_string(path).unwrap();
        assert_eq!(text.lines().count(), MAX_DAEMONS);
        assert_eq!(
            memory.predict("h0:1", 0, false),
            None,
            "the oldest gave way"
        );
        assert!(memory
            .predict(&format!("h{}:1", MAX_DAEMONS + 9), 0, false)
            .is_some());
    }
}
