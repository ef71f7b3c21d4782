//! File descriptors: the daemon raises its soft `RLIMIT_NOFILE` to the hard limit at start, and
//! fits the connections it accepts at once (`max_connections`) under what is left, saying so
//! when `max_streams` asks for more, so that no accept or open fails with `EMFILE` unannounced.

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
use tracing::{info, warn};

use crate::Config;

/// Descriptors kept for everything that is not a connection: the listener, the metrics
/// endpoint, logs, the runtime, and files opened briefly (journals, directories of a tree).
const RESERVED: u64 = 64;

/// Raises the soft limit on open files to the hard limit and logs both; returns the soft limit
/// now in force (`None`: unlimited).
pub fn raise_nofile_limit() -> Option<u64> {
    let Rlimit { current, maximum } = getrlimit(Resource::Nofile);
    if current != maximum {
        let raised = Rlimit {
            current: maximum,
            maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            warn!(soft = ?current, hard = ?maximum, error = %e, "cannot raise the open-file limit");
            return current;
        }
    }
    let soft = getrlimit(Resource::Nofile).current;
    info!(
        soft = %soft.map_or_else(|| "unlimited".to_string(), |n| n.to_string()),
        hard = %maximum.map_or_else(|| "unlimited".to_string(), |n| n.to_string()),
        "open-file limit (RLIMIT_NOFILE)"
    );
    soft
}

/// The soft limit on open files in force (`None`: unlimited).
pub fn soft_limit() -> Option<u64> {
    getrlimit(Resource::Nofile).current
}

/// Descriptors a configuration may hold at once: one socket per connection accepted, one open
/// file (or upload's partial file) per connection served, and [`RESERVED`].
pub fn needed(config: &Config) -> u64 {
    config.max_connections as u64 + config.max_streams as u64 + RESERVED
}

/// Fits `config` under an open-file limit of `limit`: when `max_streams` needs more than the
/// limit allows, logs it (naming the setting) and lowers `max_connections` to what the limit
/// holds with a file open beside every socket, so that a client past it waits in the listen
/// backlog instead of costing a descriptor the daemon lacks.
pub fn fit(config: &mut Config, limit: Option<u64>) {
    let Some(limit) = limit else { return };
    let needed = needed(config);
    if needed <= limit {
        return;
    }
    // Each connection accepted may come to be served, with a file open beside its socket.
    let room = (limit.saturating_sub(RESERVED) / 2).max(1);
    warn!(
        max_streams = config.max_streams,
        needed,
        limit,
        "max_streams (--max-streams) {} needs about {needed} open files, but RLIMIT_NOFILE \
         allows {limit}: accepting at most {room} connections at once; raise the limit \
         (LimitNOFILE= under systemd, ulimit -n) or lower max_streams",
        config.max_streams
    );
    config.max_connections = config.max_connections.min(room as usize).max(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limit_too_low_for_max_streams_lowers_the_connections_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::new(dir.path().to_path_buf()).unwrap();
        config.max_streams = 1000;
        config.max_connections = 4064;
        fit(&mut config, Some(1 << 20));
        assert_eq!(config.max_connections, 4064);
        fit(&mut config, Some(2048));
        assert_eq!(config.max_connections, (2048 - 64) / 2);
        fit(&mut config, None);
        assert_eq!(config.max_connections, (2048 - 64) / 2);
    }
}
