//! The transfer engine: chunks of one file handed out from a shared queue to several
//! connections, each keeping a bounded window in flight, with reconnects on transient failures.
//! Uploads and downloads share the queue, the retry loop and the accounting; they differ only
//! in what a worker does with a chunk.
//!
//! Without a fixed count the pool sizes itself (`Grower`): it starts with
//! [`ADAPTIVE_START`] connections, measures the bytes they move, and doubles while throughput
//! grows by 10 % or more, up to a cap. New workers take chunks from the same queue, so
//! nothing is sent twice or skipped; a pool that grew for nothing gives back the extra
//! connections once their chunks in flight are done.
//!
//! # Layout
//! - `queue`: the chunks still to move, shared by every connection.
//! - `pool`: one worker per connection, started and stopped as `grower` decides.
//! - `window`: the bounded window of requests in flight, the same both ways.
//! - `retry`: reconnect pacing, the one reconnect helper, and how often a commit is retried.
//! - `upload` and `download`: what each direction does with a chunk, and [`send`]/[`recv`].
//! - `delta`: whether a delta pays, and the exchange that lets the daemon copy from its old file.

mod delta;
mod download;
mod grower;
mod path_reports;
mod pool;
mod queue;
mod retry;
mod upload;
mod window;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub(crate) use delta::choose as choose_delta;
pub(crate) use delta::may_choose as may_choose_delta;
pub use delta::DeltaMode;
pub(crate) use delta::MIN_SMALL_DELTA;
pub use download::{recv, recv_with_holes};
pub(crate) use upload::send_file_sharing;
pub use upload::{send, send_file};

use crate::{Connector, Progress, Session};
use queue::Work;

/// Connections an adaptive pool starts with: on loopback and LAN links this many already
/// carry what the machine can move.
pub const ADAPTIVE_START: usize = 4;
/// Connections an adaptive pool starts with on a path of [`LONG_PATH`] or more: single cubic
/// streams there are loss-limited, and a pool that starts at 4 spends its first 3 s (two
/// measurements of 1.5 s) below what 16 carry.
pub const ADAPTIVE_START_LONG: usize = 8;
/// Round-trip time from which a path counts as long (a WAN, not a LAN).
pub const LONG_PATH: Duration = Duration::from_millis(10);
/// Connections a tree copy opens at once on a path of [`LONG_PATH`] or more (the first and its
/// spares). A new connection's first flights after its handshake are paced at what BBR makes
/// of 10 segments per round trip (820 KB/s each at 50 ms, read with `ss -ti`), and a tree's
/// first round trips are such flights on every connection: the literal data of the changed
/// files after their `DeltaPut`s' answers, the first small files. With 16 instead of 8, the tree
/// delta row (1,000 files, 50 changed, through the 50 ms profile) took 0.296 s instead of 0.316
/// with files of 64 KiB, 0.311 instead of 0.328 with 1 MiB and 0.321 instead of 0.332 with
/// 2 MiB (fastest of 5, alternated; bench/results/delta-2026-12-06-tree-connections.md), and
/// whole-file trees and the docs tree of `bench/compress.sh` took as long as before.
pub const TREE_START_LONG: usize = 16;
/// Connections an adaptive pool starts with on a path of [`FAR_PATH`] or more for a file of
/// [`FAR_START_SIZE`] or more. Through the emulated 150 ms, 1 Gbit/s path a 2 GiB file's pool
/// grew from 8 to 16 and 32 anyway, but its 8 first connections carried 0.85 of what 16 did
/// for the 3 s before the first growth (about 0.4 s of the transfer lost), and their slow start
/// from 8 initial windows took a round trip longer than from 16.
pub const ADAPTIVE_START_FAR: usize = 16;
/// Round-trip time from which a path counts as far: each connection needs a window of its
/// share of the link times the round trip, and through the emulated 150 ms, 1 Gbit/s path a
/// pool of 8 carried about 100 MB/s of the 121 the link moves.
pub const FAR_PATH: Duration = Duration::from_millis(100);
/// Smallest file that starts with more connections on a far path ([`ADAPTIVE_START_FAR_MEDIUM`],
/// from [`FAR_WIDE_END`] [`ADAPTIVE_START_FAR`]). Since the pool's connections open at once and
/// send their first request with `Auth`, 16 from the start carried a medium file faster than 8
/// through the emulated 150 ms, 1 Gbit/s path: 128 MiB at 43.0-45.8 MB/s against 35.7-39.1 (both
/// ways, 4 of 4 alternated pairs), 64 MiB at 25.6-28.3 against 22.8-24.0. A file of fewer chunks
/// than that is gone before they repay their start.
pub const FAR_START_SIZE: u64 = 64 << 20;
/// Connections an adaptive pool starts with on a far path for a file of [`FAR_START_SIZE`] or
/// more but less than [`FAR_WIDE_END`]. Each connection starts from the kernel's initial window
/// (10 segments) and at best doubles it per round trip, so twice the connections reach the
/// path's window one round trip sooner; a file this size is moved before the pool could grow
/// (its first measurement ends 2.5 s after the start on a 150 ms path), so its start is all the
/// pool it gets. Through the emulated 150 ms, 1 Gbit/s path with 0.1 % loss (loaded machine,
/// alternated with 16), 32 from the start filled the link about 0.1-0.3 s sooner and moved
/// 64 MiB in 2.45-2.60 s against 2.57-2.75, 128 MiB in 2.91-3.37 s against 3.06-3.44 and
/// 512 MiB in 6.38-6.46 s against 6.66-7.06, both ways (14 of 15 pairs). The pool still stops
/// growing where a queue stands on the path.
pub const ADAPTIVE_START_FAR_MEDIUM: usize = 32;
/// Smallest file that starts with [`ADAPTIVE_START_FAR`] again on a far path: a larger file lasts
/// long enough for the pool to grow by what it measures, and a 2 GiB file's 32 from the start
/// carried no more by 3-5 s than 16 while overflowing the emulated path's queue.
pub const FAR_WIDE_END: u64 = 1 << 30;
/// Congestion control a transfer picks by itself on a path of [`LONG_PATH`] or more when none is
/// set: through the emulated 50 ms path with 0.1 % loss, 16 cubic streams filled 30 % of the
/// link and 16 bbr streams 78 % (bbr reads loss as no signal of congestion; the price is that it
/// takes more than its share from cubic flows sharing a bottleneck, see GUIDE.md).
pub const LONG_PATH_CONGESTION: &str = "bbr";
/// Default cap of an adaptive pool. The pool only doubles while throughput still grows (on
/// long lossy paths each stream is loss-limited, so more keep adding), and a daemon that
/// turns or keeps an extra connection waiting stops the growth: its `--max-streams` and
/// `--max-conns-per-ip` (both 64 by default) bound the pool, not this.
pub const ADAPTIVE_MAX: usize = 64;
/// Bytes of chunk buffer the transfers of one process hold at once, whatever the pool's size:
/// every chunk read from the file (uploads) or from a connection (downloads) is reserved from
/// it first, and near this bound the queue cuts chunks to the pool's share of it (see
/// `queue`). Without it a pool of 64 connections holding a 4 MiB chunk each peaked at 240-278
/// MiB; 128 MiB leaves 2 MiB per connection at 64, still several times what one connection
/// keeps in flight on the long paths measured (1 Gbit/s, 150 ms: 300 KB each).
pub const CLIENT_MAX_MEMORY: usize = 128 << 20;

/// How many connections a transfer uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Connections {
    /// Exactly this many (`-c N`).
    Fixed(usize),
    /// Start with [`ADAPTIVE_START`] ([`ADAPTIVE_START_LONG`] on a long path; fewer if `max`
    /// is lower) and double while throughput grows, up to `max`.
    Adaptive {
        /// The most connections to use.
        max: usize,
    },
}

impl Connections {
    /// Connections to start with, the path unknown.
    pub fn initial(self) -> usize {
        self.initial_on(None)
    }

    /// Connections to open at once, before the path is known: as many as a long path starts
    /// with. Opened only once the first connection had measured the path, half of a long
    /// path's pool started its handshake (three round trips) and slow start that much later:
    /// through the emulated 50 ms path at 1 % loss, all 8 moved data about 0.1 s sooner when
    /// opened at once. On a short path the extra ones cost a handshake of well under a
    /// millisecond; the pool takes them as it grows, and closes the rest at the end. A far
    /// path's larger start for a large upload opens once the first TCP connect has measured
    /// the path, beside the first handshake: opened only after it, its extra 8 reached their
    /// share of the path half a second later. A download learns its size only once the file
    /// is open, and opens them then.
    pub fn opened_at_once(self) -> usize {
        self.initial_on(Some(LONG_PATH))
    }

    /// Connections to start with on a path of round-trip time `rtt`, if known.
    pub fn initial_on(self, rtt: Option<Duration>) -> usize {
        self.initial_for(rtt, 0)
    }

    /// Connections a tree copy keeps for its files on a path of round-trip time `rtt`, if
    /// known: [`TREE_START_LONG`] on a long one (fewer if `max` is lower), else as a pool
    /// starts.
    pub fn for_tree_on(self, rtt: Option<Duration>) -> usize {
        match (self, rtt) {
            (Self::Adaptive { max }, Some(rtt)) if rtt >= LONG_PATH => {
                TREE_START_LONG.min(max).max(1)
            }
            _ => self.initial_on(rtt),
        }
    }

    /// Connections to start with for a file of `size` bytes on a path of round-trip time
    /// `rtt`, if known: a large file on a far path starts with more.
    pub fn initial_for(self, rtt: Option<Duration>, size: u64) -> usize {
        match self {
            Self::Fixed(n) => n.max(1),
            Self::Adaptive { max } => {
                let start = match rtt {
                    Some(rtt) if rtt >= FAR_PATH && size >= FAR_WIDE_END => ADAPTIVE_START_FAR,
                    Some(rtt) if rtt >= FAR_PATH && size >= FAR_START_SIZE => {
                        ADAPTIVE_START_FAR_MEDIUM
                    }
                    Some(rtt) if rtt >= LONG_PATH => ADAPTIVE_START_LONG,
                    _ => ADAPTIVE_START,
                };
                start.min(max).max(1)
            }
        }
    }
}

/// How a transfer runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Parallel connections: a fixed count, or a pool that sizes itself.
    pub connections: Connections,
    /// Chunk size asked for (the server may lower it).
    pub chunk_size: u32,
    /// Bytes per second across all connections, if limited.
    pub bwlimit: Option<u64>,
    /// How long to keep reconnecting after a transient failure before giving up.
    pub retry_deadline: Duration,
    /// Where the bytes moved are reported.
    pub progress: Arc<dyn Progress>,
    /// Token and TLS settings for every connection.
    pub connector: Connector,
    /// What a tree copy keeps besides bytes (owners, attributes, links, special files).
    pub keep: crate::TreeOptions,
    /// Whether an upload goes as a delta against the file the daemon holds.
    pub delta: DeltaMode,
    /// Congestion control for the connections after the first when `connector.socket` sets
    /// none and the first one's round-trip time is at least `rtt` (`None`: the system's).
    pub long_path_congestion: Option<LongPathCongestion>,
}

/// The congestion control a transfer picks by itself on a long path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LongPathCongestion {
    /// The algorithm, e.g. [`LONG_PATH_CONGESTION`].
    pub name: String,
    /// Round-trip time from which a path counts as long for it ([`LONG_PATH`]).
    pub rtt: Duration,
}

impl Default for LongPathCongestion {
    fn default() -> Self {
        Self {
            name: LONG_PATH_CONGESTION.into(),
            rtt: LONG_PATH,
        }
    }
}

/// `opts` for the connections that follow `first`: on a long path with no congestion control
/// set, the one [`Options::long_path_congestion`] names, if this process may use it; if not, one
/// log line says so and the system's stays. `first` switches to it too: it carries its share of
/// the chunks, and under loss a cubic stream of them would be the transfer's tail (a 50 ms path
/// at 0.1 % loss moves about 1 MB/s on one). Also returns the congestion control to report.
fn path_policy(opts: &Options, first: &mut Session) -> (Options, Option<String>) {
    let mut opts = opts.clone();
    let reported = first.congestion.clone();
    let Some(policy) = opts.long_path_congestion.take() else {
        return (opts, reported);
    };
    let long = first.rtt.is_some_and(|rtt| rtt >= policy.rtt);
    if !long || opts.connector.socket.congestion.is_some() {
        return (opts, reported);
    }
    let wanted = xfer_net::SocketOptions {
        congestion: Some(policy.name.clone()),
        ..opts.connector.socket.clone()
    };
    match wanted.check("sndbuf", "rcvbuf") {
        Ok(()) => {
            tracing::debug!(congestion = %policy.name, rtt = ?first.rtt, "long path; using its congestion control");
            if let Err(e) = first.switch_congestion(&policy.name) {
                tracing::debug!(error = %e, "the first connection keeps its congestion control");
            }
            opts.connector.socket = wanted;
            (opts, Some(policy.name))
        }
        Err(e) => {
            // Once per process: a tree of large files would otherwise say it for each.
            static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
            if !SAID.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "long path, but {e}; keeping the system's congestion control ({})",
                    reported.as_deref().unwrap_or("unknown")
                );
            }
            (opts, reported)
        }
    }
}

/// What a finished transfer reports (`--json`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    /// Name on the server.
    pub name: String,
    /// Size of the file.
    pub bytes_total: u64,
    /// Payload bytes sent or received by this run (resends included).
    pub bytes_transferred: u64,
    /// What `bytes_transferred` took on the wire, compressed where it was.
    pub wire_bytes: u64,
    /// Bytes already held at the start, not sent again.
    pub resumed_bytes: u64,
    /// Wall-clock seconds of this run.
    pub seconds: f64,
    /// Connections used: the fixed count, or the most an adaptive pool had at once.
    pub connections: usize,
    /// `bytes_transferred` / `seconds`, in MiB/s.
    pub mbytes_per_sec: f64,
    /// Chunks sent again because their CRC did not match.
    pub crc_retries: u64,
    /// Chunks asked for (or sent) a second time on an idle connection at the end of the
    /// transfer because a slower one still held them; the first copy to land counted.
    pub duplicate_chunks: u64,
    /// TCP congestion control of the data connections, as the kernel reports it.
    pub congestion: Option<String>,
    /// The file went as a delta against the one the receiver held.
    pub delta: bool,
    /// Bytes sent as data (`bytes_transferred`).
    pub literal_bytes: u64,
    /// Bytes the receiver copied from the file it held instead of receiving them.
    pub matched_bytes: u64,
    /// Which way the file went (delta or whole file) and why, as `-v` says it; `None` where
    /// nothing had to move.
    #[serde(skip)]
    pub delta_reason: Option<String>,
}

/// The chunk size a transfer plans with: the one asked for, within what the daemon allows.
fn chunk_size(opts: &Options, session: &Session) -> u32 {
    chunk_size_for(opts.chunk_size, &session.welcome)
}

/// The chunk size `wanted` within what `welcome` allows.
fn chunk_size_for(wanted: u32, welcome: &xfer_proto::Welcome) -> u32 {
    wanted
        .min(welcome.max_chunk_size)
        .max(xfer_proto::MIN_CHUNK_SIZE)
}

/// Connections to report: the fixed count, or the most an adaptive pool had at once.
fn connections_used(opts: &Options, work: &Work) -> usize {
    match opts.connections {
        Connections::Fixed(n) => n,
        Connections::Adaptive { .. } => work.peak.load(Ordering::SeqCst).max(1),
    }
}

/// `opts` with a fresh delivered-bytes meter under `auto` compression (its probes measure by
/// it), and the process's memory budget ([`CLIENT_MAX_MEMORY`]) unless the caller set one. (A
/// pool that sizes itself reads what its own sockets delivered from the kernel.)
fn metered(opts: &Options) -> Options {
    static BUDGET: std::sync::OnceLock<xfer_core::MemoryBudget> = std::sync::OnceLock::new();
    let mut opts = opts.clone();
    opts.connector.delivered = delivered_meter(&opts);
    if opts.connector.memory.is_none() {
        let budget = BUDGET.get_or_init(|| xfer_core::MemoryBudget::new(CLIENT_MAX_MEMORY));
        opts.connector.memory = Some(budget.clone());
    }
    opts
}

/// A fresh meter of the bytes the connections of a transfer under `opts` deliver, where `auto`
/// compression measures by it: each transfer measures its own connections.
pub(crate) fn delivered_meter(opts: &Options) -> Option<xfer_net::Delivered> {
    let auto = opts.connector.compress.unwrap_or_default() == xfer_net::Compression::Auto;
    auto.then(xfer_net::Delivered::new)
}

/// What a transfer's [`Summary`] needs from its start.
struct Tally {
    name: String,
    size: u64,
    resumed: u64,
    started: Instant,
    congestion: Option<String>,
    delta: bool,
    matched: u64,
    /// The choice between a delta and the whole file, and why.
    why: Option<String>,
}

impl Tally {
    /// A transfer of `size` bytes of which `resumed` are held already: shown as done.
    fn start(
        opts: &Options,
        name: &str,
        size: u64,
        resumed: u64,
        started: Instant,
        congestion: Option<String>,
    ) -> Self {
        opts.progress.set_length(size);
        opts.progress.set_position(resumed);
        Self {
            name: name.to_string(),
            size,
            resumed,
            started,
            congestion,
            delta: false,
            matched: 0,
            why: None,
        }
    }

    /// The transfer is complete: the display ends and the summary is made.
    fn finish(self, work: &Work, opts: &Options) -> Summary {
        opts.progress.finish();
        let seconds = self.started.elapsed().as_secs_f64();
        let bytes_transferred = work.transferred.load(Ordering::Relaxed);
        Summary {
            name: self.name,
            bytes_total: self.size,
            bytes_transferred,
            wire_bytes: bytes_transferred,
            resumed_bytes: self.resumed,
            seconds,
            connections: connections_used(opts, work),
            mbytes_per_sec: bytes_transferred as f64 / seconds.max(1e-9) / (1024.0 * 1024.0),
            crc_retries: work.crc_retries.load(Ordering::Relaxed),
            duplicate_chunks: work.duplicates.load(Ordering::Relaxed),
            congestion: self.congestion,
            delta: self.delta,
            literal_bytes: bytes_transferred,
            matched_bytes: self.matched,
            delta_reason: self.why,
        }
    }
}

async fn close_all(sessions: Vec<(Session, u64)>) {
    for (s, _) in sessions {
        s.close().await;
    }
}

fn join_error(e: tokio::task::JoinError) -> xfer_core::CoreError {
    xfer_core::CoreError::io("digest task", std::io::Error::other(e.to_string()))
}

/// Options for unit tests: a fixed pool, no limit, progress counted.
#[cfg(test)]
pub(crate) fn test_options(progress: Arc<dyn Progress>) -> Options {
    Options {
        connections: Connections::Fixed(1),
        chunk_size: xfer_proto::MIN_CHUNK_SIZE,
        bwlimit: None,
        retry_deadline: Duration::from_secs(1),
        progress,
        connector: Connector::default(),
        keep: crate::TreeOptions::default(),
        delta: DeltaMode::Auto,
        long_path_congestion: None,
    }
}

/// A session over one end of an in-memory pipe, as if the daemon had welcomed it with
/// `window` and `max_chunk_size`; the other end is the daemon's.
#[cfg(test)]
fn test_session(window: u32, max_chunk_size: u32) -> (Session, tokio::io::DuplexStream) {
    let (ours, theirs) = tokio::io::duplex(1 << 20);
    let (read, write) = tokio::io::split(ours);
    let session = Session {
        reader: xfer_net::FrameReader::new(Box::new(read)),
        writer: xfer_net::FrameWriter::new(Box::new(write)),
        welcome: xfer_proto::Welcome {
            version: xfer_proto::PROTOCOL_VERSION,
            capabilities: 0,
            max_chunk_size,
            window,
            agent: "test".into(),
            proof: vec![],
        },
        congestion: None,
        rtt: None,
        idle_timeout: None,
        fd: None,
        first_sent: false,
        absent: None,
    };
    (session, theirs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_path_gets_its_congestion_control_unless_one_is_set_or_it_cannot_be_had() {
        let progress: Arc<dyn Progress> = Arc::new(crate::ProgressCounter::default());
        let mut opts = test_options(progress);
        let (mut first, _daemon) = test_session(2, 1 << 20);
        first.congestion = Some("cubic".into());
        let policy = |name: &str| {
            Some(LongPathCongestion {
                name: name.into(),
                rtt: LONG_PATH,
            })
        };
        let chosen = |opts: &Options, first: &mut Session| {
            let (opts, reported) = path_policy(opts, first);
            (opts.connector.socket.congestion, reported)
        };
        // reno is in every kernel, and allowed.
        opts.long_path_congestion = policy("reno");
        first.rtt = Some(Duration::from_millis(2));
        assert_eq!(chosen(&opts, &mut first), (None, Some("cubic".into())));
        first.rtt = Some(Duration::from_millis(50));
        let reno = Some("reno".to_string());
        assert_eq!(chosen(&opts, &mut first), (reno.clone(), reno.clone()));
        opts.long_path_congestion = policy("nosuchcc");
        assert_eq!(chosen(&opts, &mut first), (None, Some("cubic".into())));
        // `--congestion` wins.
        opts.long_path_congestion = policy("reno");
        opts.connector.socket.congestion = Some("cubic".into());
        assert_eq!(
            chosen(&opts, &mut first),
            (Some("cubic".into()), Some("cubic".into()))
        );
    }

    #[test]
    fn a_pool_starts_with_more_connections_on_a_long_path() {
        assert_eq!(Connections::Adaptive { max: 2 }.initial(), 2);
        let (lan, wan) = (Duration::from_micros(200), Duration::from_millis(50));
        assert_eq!(Connections::Adaptive { max: 16 }.initial_on(Some(lan)), 4);
        assert_eq!(Connections::Adaptive { max: 16 }.initial_on(Some(wan)), 8);
        assert_eq!(Connections::Adaptive { max: 6 }.initial_on(Some(wan)), 6);
        assert_eq!(Connections::Fixed(3).initial_on(Some(wan)), 3);
        assert_eq!(Connections::Fixed(3).initial(), 3);
        // Before the path is known, as many as a long path starts with are opened.
        assert_eq!(Connections::Adaptive { max: 16 }.opened_at_once(), 8);
        assert_eq!(Connections::Adaptive { max: 2 }.opened_at_once(), 2);
        assert_eq!(Connections::Fixed(3).opened_at_once(), 3);
    }

    #[test]
    fn a_tree_keeps_more_connections_on_a_long_path_unless_told_how_many() {
        let (lan, wan) = (Duration::from_micros(200), Duration::from_millis(50));
        let adaptive = Connections::Adaptive { max: 64 };
        assert_eq!(adaptive.for_tree_on(Some(wan)), TREE_START_LONG);
        assert_eq!(adaptive.for_tree_on(Some(lan)), ADAPTIVE_START);
        assert_eq!(adaptive.for_tree_on(None), ADAPTIVE_START);
        assert_eq!(Connections::Adaptive { max: 6 }.for_tree_on(Some(wan)), 6);
        assert_eq!(Connections::Fixed(3).for_tree_on(Some(wan)), 3);
    }

    #[test]
    fn a_large_file_on_a_far_path_starts_with_more_connections() {
        let (wan, far) = (Duration::from_millis(50), Duration::from_millis(150));
        let pool = Connections::Adaptive { max: 64 };
        // A medium file is gone before the pool could grow: it starts with all it gets.
        assert_eq!(pool.initial_for(Some(far), FAR_START_SIZE), 32);
        assert_eq!(pool.initial_for(Some(far), 128 << 20), 32);
        assert_eq!(pool.initial_for(Some(far), FAR_WIDE_END - 1), 32);
        // A large one grows from 16 by what it measures.
        assert_eq!(pool.initial_for(Some(far), FAR_WIDE_END), 16);
        assert_eq!(pool.initial_for(Some(far), 2 << 30), 16);
        // A smaller file, a nearer path, or an unknown one: as before.
        assert_eq!(pool.initial_for(Some(far), 16 << 20), 8);
        assert_eq!(pool.initial_for(Some(wan), 2 << 30), 8);
        assert_eq!(pool.initial_for(None, 2 << 30), 4);
        // Bounded by the cap, and `-c` is kept exactly.
        assert_eq!(
            Connections::Adaptive { max: 12 }.initial_for(Some(far), 2 << 30),
            12
        );
        assert_eq!(Connections::Fixed(3).initial_for(Some(far), 2 << 30), 3);
    }
}
