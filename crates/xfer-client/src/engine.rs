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

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::sync::watch;
use tokio::task::JoinSet;
use xfer_core::{split_into_chunks, PartialFile, RangeSet, Slot, SourceFile};
use xfer_proto::{
    ByteRange, ChunkRef, Commit, Data, ErrorCode, FileIdentity, Frame, OpenRead, OpenWrite,
};

use crate::session::unexpected;
use crate::{ClientError, Connector, Progress, RateLimiter, Session, Target};

/// Connections an adaptive pool starts with: on loopback and LAN links this many already
/// carry what the machine can move.
pub const ADAPTIVE_START: usize = 4;
/// Connections an adaptive pool starts with on a path of [`LONG_PATH`] or more: single cubic
/// streams there are loss-limited, and a pool that starts at 4 spends its first 3 s (two
/// measurements of 1.5 s) below what 16 carry.
pub const ADAPTIVE_START_LONG: usize = 8;
/// Round-trip time from which a path counts as long (a WAN, not a LAN).
pub const LONG_PATH: Duration = Duration::from_millis(10);
/// Default cap of an adaptive pool: on 50 ms links with loss, single cubic streams are
/// loss-limited and 16 carry about what the link does.
pub const ADAPTIVE_MAX: usize = 16;
/// How often the pool looks at its throughput.
const TICK: Duration = Duration::from_millis(100);
/// Time a pool of a new size gets before it is measured: new connections do their handshake
/// and leave slow start. [`SETTLE_RTTS`] round trips, within these bounds.
const SETTLE: (Duration, Duration) = (Duration::from_millis(200), Duration::from_millis(500));
const SETTLE_RTTS: u32 = 10;
/// How long one measurement lasts: [`MEASURE_RTTS`] round trips, within these bounds. On a
/// 50 ms path that is the upper bound (a cubic stream needs seconds to reach its share); on
/// loopback and LAN paths a whole file can be moved in the time of one such measurement. The
/// lower bound keeps noise out: over 0.2 s on the 2-core loopback, 8 connections measured 10 %
/// faster than 4 by chance often enough to grow a pool to 16, which only costs CPU there.
const MEASURE: (Duration, Duration) = (Duration::from_millis(500), Duration::from_secs(1));
const MEASURE_RTTS: u32 = 20;
/// Throughput gain over the best measured so far that makes the pool grow again.
const GAIN: f64 = 1.10;
/// The pool goes back to its fastest size only if the last growth cost this much: right after
/// a growth, on a long lossy path, the new streams still compete with the old ones for the
/// link, and a dip then is no reason to close them (measured through the emulated 50 ms WAN:
/// a shrink from 16 to 8 there cost a third of the throughput).
const SHRINK_BELOW: f64 = 0.75;

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

    /// Connections to start with on a path of round-trip time `rtt`, if known.
    pub fn initial_on(self, rtt: Option<Duration>) -> usize {
        match self {
            Self::Fixed(n) => n.max(1),
            Self::Adaptive { max } => {
                let long = rtt.is_some_and(|rtt| rtt >= LONG_PATH);
                let start = if long {
                    ADAPTIVE_START_LONG
                } else {
                    ADAPTIVE_START
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
    /// TCP congestion control of the data connections, as the kernel reports it.
    pub congestion: Option<String>,
}

/// Chunks still to move, shared by the workers of one transfer.
struct Work {
    queue: Mutex<VecDeque<ByteRange>>,
    /// Bytes queued or in flight: not yet acknowledged (uploads) or written (downloads).
    outstanding: AtomicU64,
    /// True once `outstanding` reaches zero: workers still connecting can stop.
    finished: watch::Sender<bool>,
    transferred: AtomicU64,
    crc_retries: AtomicU64,
    progress: Arc<dyn Progress>,
    limiter: Option<RateLimiter>,
    /// Bytes read and written on the transfer's connections: throughput, byte by byte.
    meter: Arc<AtomicU64>,
    /// Workers with an open transfer, moving chunks.
    active: AtomicUsize,
    /// The most workers that were active at once.
    peak: AtomicUsize,
    /// Workers the pool has too many: the next ones to look for a chunk stop instead.
    excess: AtomicUsize,
    /// An optional connection was turned away (a busy daemon): the pool stops growing.
    refused: AtomicBool,
}

/// A worker's place in [`Work::active`]; leaves it when dropped.
struct Pumping<'a>(&'a Work);

impl Drop for Pumping<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How a worker's run on one connection ended.
enum Pumped {
    /// Nothing left in the queue and nothing in flight.
    Drained,
    /// The pool shrank and this worker left it.
    Retired,
}

impl Work {
    fn new(chunks: Vec<ByteRange>, opts: &Options) -> Self {
        let work = Self {
            queue: Mutex::new(VecDeque::new()),
            outstanding: AtomicU64::new(0),
            finished: watch::Sender::new(true),
            transferred: AtomicU64::new(0),
            crc_retries: AtomicU64::new(0),
            progress: opts.progress.clone(),
            limiter: opts.bwlimit.map(RateLimiter::new),
            meter: opts.connector.meter.clone().unwrap_or_default(),
            active: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            excess: AtomicUsize::new(0),
            refused: AtomicBool::new(false),
        };
        work.add(chunks);
        work
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<ByteRange>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues new chunks to move.
    fn add(&self, chunks: Vec<ByteRange>) {
        let bytes: u64 = chunks.iter().map(ByteRange::len).sum();
        self.lock().extend(chunks);
        let total = self.outstanding.fetch_add(bytes, Ordering::SeqCst) + bytes;
        self.finished.send_replace(total == 0);
    }

    fn pop(&self) -> Option<ByteRange> {
        self.lock().pop_front()
    }

    /// The next chunk for a worker; `None` when the queue is empty, or when the pool has shrunk
    /// and this worker is one too many (then `retired` is set, for good).
    fn take(&self, retired: &mut bool) -> Option<ByteRange> {
        if *retired {
            return None;
        }
        let claimed = self
            .excess
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |e| e.checked_sub(1))
            .is_ok();
        if claimed {
            *retired = true;
            return None;
        }
        self.pop()
    }

    /// Counts a worker as active until the guard drops.
    fn pumping(&self) -> Pumping<'_> {
        let now = self.active.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        Pumping(self)
    }

    /// Puts chunks that were in flight on a failed connection back at the front.
    fn requeue(&self, chunks: impl DoubleEndedIterator<Item = ByteRange>) {
        let mut q = self.lock();
        for c in chunks.rev() {
            q.push_front(c);
        }
    }

    /// Marks `chunk` as moved for good.
    fn complete(&self, chunk: ByteRange) {
        self.progress.inc(chunk.len());
        if self.outstanding.fetch_sub(chunk.len(), Ordering::SeqCst) == chunk.len() {
            self.finished.send_replace(true);
        }
    }

    /// Resolves once every chunk is moved.
    async fn finished(&self) {
        let _ = self.finished.subscribe().wait_for(|done| *done).await;
    }

    fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    async fn throttle(&self, bytes: u64) {
        if let Some(l) = &self.limiter {
            l.acquire(bytes).await;
        }
    }
}

/// What differs between an upload and a download.
trait Direction: Send + Sync + 'static {
    /// Opens the transfer on a fresh session; returns its transfer id.
    fn open(
        &self,
        session: &mut Session,
    ) -> impl std::future::Future<Output = Result<u64, ClientError>> + Send;
    /// Moves chunks from the queue until it is empty (or the pool sheds this worker); on error,
    /// in-flight chunks are requeued.
    fn pump(
        &self,
        session: &mut Session,
        transfer_id: u64,
        work: &Work,
    ) -> impl std::future::Future<Output = Result<Pumped, ClientError>> + Send;
}

fn window(session: &Session) -> usize {
    (session.welcome.window as usize).clamp(1, 64)
}

/// Runs the workers over `work` until the queue is drained: a fixed number, or an adaptive pool
/// that [`Grower`] sizes. Each worker reconnects with exponential backoff and jitter after a
/// transient failure, until `retry_deadline`. Returns the sessions that finished cleanly (with
/// their transfer ids).
async fn drive<D: Direction>(
    target: &Target,
    dir: Arc<D>,
    work: Arc<Work>,
    first: (Session, u64),
    opts: &Options,
) -> Result<Vec<(Session, u64)>, ClientError> {
    type Joined = Result<Option<(Session, u64)>, ClientError>;
    let mut workers: JoinSet<Joined> = JoinSet::new();
    let spawn = |workers: &mut JoinSet<Joined>, first: Option<(Session, u64)>, optional: bool| {
        let (dir, work, target) = (Arc::clone(&dir), Arc::clone(&work), target.clone());
        let opts = opts.clone();
        workers.spawn(async move { worker(&target, &*dir, &work, first, optional, &opts).await });
    };
    work.excess.store(0, Ordering::SeqCst);
    let rtt = first.0.rtt;
    let start = opts.connections.initial_on(rtt);
    let adaptive = matches!(opts.connections, Connections::Adaptive { .. });
    let mut first = Some(first);
    for _ in 0..start {
        // An adaptive pool needs only its first connection: the others it starts with are as
        // optional as the ones it adds.
        let optional = adaptive && first.is_none();
        spawn(&mut workers, first.take(), optional);
    }
    let mut grower = match opts.connections {
        Connections::Adaptive { max } if max > start => {
            Some(Grower::new(start, max, Instant::now(), rtt))
        }
        _ => None,
    };
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut done = Vec::new();
    loop {
        let growing = grower.as_ref().is_some_and(|g| !g.done);
        let joined = tokio::select! {
            joined = workers.join_next() => joined,
            _ = tick.tick(), if growing => {
                let Some(g) = grower.as_mut() else { continue };
                if work.refused.load(Ordering::SeqCst) {
                    g.done = true;
                    tracing::debug!(
                        connections = work.active.load(Ordering::SeqCst),
                        "the server turned a connection away; the pool stops growing"
                    );
                    continue;
                }
                let ready = work.active.load(Ordering::SeqCst) == g.size && !work.is_empty();
                let step = g.on_tick(Instant::now(), work.meter.load(Ordering::Relaxed), ready);
                resize_pool(step, &work, |n| {
                    for _ in 0..n {
                        spawn(&mut workers, None, true);
                    }
                });
                continue;
            }
        };
        let Some(joined) = joined else { break };
        match joined {
            Ok(Ok(Some(session))) => done.push(session),
            Ok(Ok(None)) => {}
            Ok(Err(e)) => {
                workers.abort_all();
                return Err(e);
            }
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => {}
        }
    }
    Ok(done)
}

/// Carries out a [`Grower`] decision: `add(n)` starts `n` workers; a shrink marks workers as
/// excess, to stop once their chunks in flight are done. Logs each change with its rates.
fn resize_pool(step: Step, work: &Work, add: impl FnOnce(usize)) {
    const MIB: f64 = 1024.0 * 1024.0;
    let mib = |rate: f64| format!("{:.1}", rate / MIB);
    match step {
        Step::Wait => {}
        Step::Grow {
            from,
            to,
            rate,
            best,
        } => {
            tracing::debug!(
                from,
                to,
                mib_per_sec = %mib(rate),
                before_mib_per_sec = %best.map_or("-".into(), mib),
                "throughput grew; adding connections"
            );
            add(to - from);
        }
        Step::Keep { size, rate, best } => tracing::debug!(
            connections = size,
            mib_per_sec = %mib(rate),
            best_mib_per_sec = %mib(best),
            "throughput no longer grows; keeping the pool"
        ),
        Step::Shrink {
            from,
            to,
            rate,
            best,
        } => {
            tracing::debug!(
                from,
                to,
                mib_per_sec = %mib(rate),
                best_mib_per_sec = %mib(best),
                "more connections were slower; going back"
            );
            work.excess.fetch_add(from - to, Ordering::SeqCst);
        }
    }
}

/// What [`Grower`] decides at a tick.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Step {
    /// Nothing to do yet.
    Wait,
    /// Throughput grew by [`GAIN`] or more (or this is the first measurement): add workers.
    Grow {
        from: usize,
        to: usize,
        rate: f64,
        best: Option<f64>,
    },
    /// Throughput did not grow by enough (or the cap is reached): keep `size`, stop growing.
    Keep { size: usize, rate: f64, best: f64 },
    /// The last growth made it clearly slower ([`SHRINK_BELOW`]): go back to the size that
    /// measured fastest.
    Shrink {
        from: usize,
        to: usize,
        rate: f64,
        best: f64,
    },
}

/// Sizes an adaptive pool from throughput alone; no I/O, time comes in as `now`.
///
/// Each size gets [`SETTLE`] once all its workers are moving chunks, then its bytes are counted
/// for [`MEASURE`] (both scaled to the first connection's round-trip time). The first
/// measurement always doubles the pool (there is nothing to compare it with); later ones double
/// it again while throughput beats the best so far by [`GAIN`].
/// Growth stops at `max`, or for good at the first measurement that does not gain enough.
#[derive(Debug)]
struct Grower {
    max: usize,
    /// Workers the pool has now.
    size: usize,
    /// When the pool last changed or was last not ready: settling starts there.
    since: Instant,
    /// Start of the running measurement: when, and the meter then.
    mark: Option<(Instant, u64)>,
    /// The size that measured fastest, and its bytes per second.
    best: Option<(usize, f64)>,
    done: bool,
    settle: Duration,
    measure: Duration,
}

impl Grower {
    /// `rtt`: the path's round-trip time, if known (unknown: the longest timings).
    fn new(size: usize, max: usize, now: Instant, rtt: Option<Duration>) -> Self {
        let scaled = |rtts: u32, (low, high): (Duration, Duration)| {
            rtt.map_or(high, |rtt| (rtt * rtts).clamp(low, high))
        };
        Self {
            max,
            size,
            since: now,
            mark: None,
            best: None,
            done: size >= max,
            settle: scaled(SETTLE_RTTS, SETTLE),
            measure: scaled(MEASURE_RTTS, MEASURE),
        }
    }

    /// `bytes`: the meter now; `ready`: every worker of the pool is moving chunks and the
    /// queue is not empty (a pool still connecting, or near its end, is not measured).
    fn on_tick(&mut self, now: Instant, bytes: u64, ready: bool) -> Step {
        if self.done {
            return Step::Wait;
        }
        if !ready {
            self.since = now;
            self.mark = None;
            return Step::Wait;
        }
        let Some((t0, b0)) = self.mark else {
            if now.duration_since(self.since) >= self.settle {
                self.mark = Some((now, bytes));
            }
            return Step::Wait;
        };
        let elapsed = now.duration_since(t0);
        if elapsed < self.measure {
            return Step::Wait;
        }
        let rate = bytes.saturating_sub(b0) as f64 / elapsed.as_secs_f64();
        let best = self.best.map(|(_, r)| r);
        if best.is_none_or(|b| rate >= b * GAIN) {
            self.best = Some((self.size, rate));
            if self.size >= self.max {
                self.done = true;
                return Step::Keep {
                    size: self.size,
                    rate,
                    best: rate,
                };
            }
            let from = self.size;
            self.size = (from * 2).min(self.max);
            self.since = now;
            self.mark = None;
            return Step::Grow {
                from,
                to: self.size,
                rate,
                best,
            };
        }
        self.done = true;
        let (best_size, best_rate) = self.best.unwrap_or((self.size, rate));
        if rate < best_rate * SHRINK_BELOW && best_size < self.size {
            let from = self.size;
            self.size = best_size;
            Step::Shrink {
                from,
                to: best_size,
                rate,
                best: best_rate,
            }
        } else {
            Step::Keep {
                size: self.size,
                rate,
                best: best_rate,
            }
        }
    }
}

/// Reconnect pacing: exponential backoff with jitter, giving up once one outage (failures with
/// no successful reconnect between them) has lasted `deadline`.
struct Retry {
    deadline: Duration,
    since: Option<Instant>,
    backoff: Duration,
}

impl Retry {
    fn new(deadline: Duration) -> Self {
        Self {
            deadline,
            since: None,
            backoff: Duration::from_millis(100),
        }
    }

    /// A connection got through: the next failure starts a new outage.
    fn succeeded(&mut self) {
        self.since = None;
        self.backoff = Duration::from_millis(100);
    }

    /// After a failure: the delay before the next attempt, or the error to end with (a final
    /// one, or the last one once the outage has lasted past the deadline).
    fn after(&mut self, e: ClientError) -> Result<Duration, ClientError> {
        if !e.is_transient() {
            return Err(e);
        }
        let since = *self.since.get_or_insert_with(Instant::now);
        if since.elapsed() >= self.deadline {
            return Err(ClientError::GaveUp {
                last: Box::new(e),
                seconds: since.elapsed().as_secs_f64(),
            });
        }
        tracing::info!(error = %e, retry_in = ?self.backoff, "connection failed; reconnecting");
        let delay = self.backoff.mul_f64(rand::thread_rng().gen_range(0.5..1.5));
        self.backoff = (self.backoff * 2).min(Duration::from_secs(5));
        Ok(delay)
    }
}

/// Connects, retrying transient failures (a busy or restarting daemon) as [`Retry`] allows.
async fn connect_retrying(target: &Target, opts: &Options) -> Result<Session, ClientError> {
    let mut retry = Retry::new(opts.retry_deadline);
    loop {
        match Session::connect(target, &opts.connector).await {
            Ok(session) => return Ok(session),
            Err(e) if !e.is_transient_connect() => return Err(e),
            Err(e) => tokio::time::sleep(retry.after(e)?).await,
        }
    }
}

/// One worker: moves chunks over its connection, reconnecting after transient failures. An
/// `optional` worker (any but the first of an adaptive pool) whose first connection is turned
/// away leaves quietly and stops the pool from growing: the daemon is at one of its limits.
async fn worker<D: Direction>(
    target: &Target,
    dir: &D,
    work: &Work,
    mut session: Option<(Session, u64)>,
    optional: bool,
    opts: &Options,
) -> Result<Option<(Session, u64)>, ClientError> {
    let mut retry = Retry::new(opts.retry_deadline);
    let mut ever_connected = false;
    loop {
        if session.is_none() && work.is_empty() {
            return Ok(None);
        }
        let mut connected = false;
        let attempt = async {
            let (mut s, id) = match session.take() {
                Some(open) => open,
                None => {
                    let connect = async {
                        let mut s = Session::connect(target, &opts.connector).await?;
                        let id = dir.open(&mut s).await?;
                        Ok::<_, ClientError>((s, id))
                    };
                    // Other connections may finish the file while this one waits for a slot
                    // on a busy daemon; it must not hold the transfer up, nor its slot.
                    tokio::select! {
                        open = connect => open?,
                        () = work.finished() => return Ok(None),
                    }
                }
            };
            connected = true;
            let _pumping = work.pumping();
            match dir.pump(&mut s, id, work).await {
                Ok(Pumped::Drained) => Ok(Some((s, id))),
                Ok(Pumped::Retired) => {
                    s.close().await;
                    Ok(None)
                }
                Err(e) => Err(e),
            }
        };
        let outcome = attempt.await;
        if connected {
            ever_connected = true;
            retry.succeeded();
        }
        match outcome {
            Ok(open) => return Ok(open),
            // A busy daemon or a per-address limit, not a problem with the transfer itself.
            Err(e) if optional && !ever_connected && e.is_transient_connect() => {
                tracing::debug!(error = %e, "a connection was refused; leaving it out");
                work.refused.store(true, Ordering::SeqCst);
                return Ok(None);
            }
            Err(e) => {
                let delay = retry.after(e)?;
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = work.finished() => return Ok(None),
                }
            }
        }
    }
}

/// Connections to report: the fixed count, or the most an adaptive pool had at once.
fn connections_used(opts: &Options, work: &Work) -> usize {
    match opts.connections {
        Connections::Fixed(n) => n,
        Connections::Adaptive { .. } => work.peak.load(Ordering::SeqCst).max(1),
    }
}

/// `opts` with a fresh byte meter on its connections when the pool sizes itself: only then is
/// throughput measured, and a meter costs every write a look at `TCP_INFO`.
fn metered(opts: &Options) -> Options {
    let mut opts = opts.clone();
    if matches!(opts.connections, Connections::Adaptive { .. }) {
        opts.connector.meter = Some(Arc::default());
    }
    opts
}

fn make_summary(
    name: &str,
    size: u64,
    resumed: u64,
    work: &Work,
    started: Instant,
    connections: usize,
    congestion: Option<String>,
) -> Summary {
    let seconds = started.elapsed().as_secs_f64();
    let bytes_transferred = work.transferred.load(Ordering::Relaxed);
    Summary {
        name: name.to_string(),
        bytes_total: size,
        bytes_transferred,
        resumed_bytes: resumed,
        seconds,
        connections,
        mbytes_per_sec: bytes_transferred as f64 / seconds.max(1e-9) / (1024.0 * 1024.0),
        crc_retries: work.crc_retries.load(Ordering::Relaxed),
        congestion,
    }
}

async fn close_all(sessions: Vec<(Session, u64)>) {
    for (s, _) in sessions {
        s.close().await;
    }
}

// ---------------------------------------------------------------------------------------------
// Upload

struct Upload {
    source: SourceFile,
    request: OpenWrite,
}

impl Upload {
    async fn open_with_held(
        &self,
        session: &mut Session,
    ) -> Result<(u64, Vec<ByteRange>), ClientError> {
        session
            .send(&Frame::OpenWrite(self.request.clone()))
            .await?;
        match session.next().await? {
            Frame::WriteOpened(w) => Ok((w.transfer_id, w.held)),
            other => Err(unexpected(other)),
        }
    }
}

impl Direction for Upload {
    async fn open(&self, session: &mut Session) -> Result<u64, ClientError> {
        Ok(self.open_with_held(session).await?.0)
    }

    async fn pump(
        &self,
        session: &mut Session,
        transfer_id: u64,
        work: &Work,
    ) -> Result<Pumped, ClientError> {
        let window = window(session);
        let mut inflight: VecDeque<ByteRange> = VecDeque::with_capacity(window);
        let mut retired = false;
        let result = async {
            loop {
                while inflight.len() < window {
                    let Some(chunk) = work.take(&mut retired) else {
                        break;
                    };
                    inflight.push_back(chunk);
                    let payload = self.source.read(chunk).await?;
                    work.throttle(chunk.len()).await;
                    session
                        .send(&Frame::Data(Data::new(transfer_id, chunk.start, payload)))
                        .await?;
                    work.transferred.fetch_add(chunk.len(), Ordering::Relaxed);
                }
                if inflight.is_empty() {
                    return Ok(if retired {
                        Pumped::Retired
                    } else {
                        Pumped::Drained
                    });
                }
                let (c, rejected) = match session.next().await? {
                    Frame::Ack(c) => (c, false),
                    Frame::Reject(c) => (c, true),
                    other => return Err(unexpected(other)),
                };
                let chunk = take_inflight(&mut inflight, c)?;
                if rejected {
                    work.crc_retries.fetch_add(1, Ordering::Relaxed);
                    work.requeue(std::iter::once(chunk));
                } else {
                    work.complete(chunk);
                }
            }
        }
        .await;
        if result.is_err() {
            work.requeue(inflight.drain(..));
        }
        result
    }
}

fn take_inflight(
    inflight: &mut VecDeque<ByteRange>,
    c: ChunkRef,
) -> Result<ByteRange, ClientError> {
    let want = ByteRange::new(c.offset, c.offset + u64::from(c.len));
    let pos = inflight
        .iter()
        .position(|r| *r == want)
        .ok_or(ClientError::Unexpected("Ack"))?;
    Ok(inflight.remove(pos).expect("position is in range"))
}

/// Uploads `path` to `target` as `name`.
///
/// # Errors
/// Local file errors, connection failures past the retry deadline, or the server's refusal.
pub async fn send(
    path: &Path,
    target: &Target,
    name: &str,
    opts: &Options,
) -> Result<Summary, ClientError> {
    let file = std::fs::File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => xfer_core::CoreError::NotFound(path.display().to_string()),
        _ => xfer_core::CoreError::io(format!("opening {}", path.display()), e),
    })?;
    send_file(
        SourceFile::new(file, path.display().to_string())?,
        target,
        name,
        opts,
    )
    .await
}

/// Uploads an open file to `target` as `name` (see [`send`]).
///
/// # Errors
/// As [`send`].
pub async fn send_file(
    source: SourceFile,
    target: &Target,
    name: &str,
    opts: &Options,
) -> Result<Summary, ClientError> {
    let started = Instant::now();
    let opts = &metered(opts);
    let identity = source.identity();
    let mut session = connect_retrying(target, opts).await?;
    let congestion = session.congestion.clone();
    let chunk_size = opts
        .chunk_size
        .min(session.welcome.max_chunk_size)
        .max(xfer_proto::MIN_CHUNK_SIZE);
    let upload = Arc::new(Upload {
        request: OpenWrite {
            name: name.to_string(),
            identity,
            mode: source.mode(),
            chunk_size,
        },
        source,
    });
    let (mut id, mut held) = upload.open_with_held(&mut session).await?;
    let resumed = RangeSet::from_ranges(held.iter().copied()).total();
    opts.progress.set_length(identity.size);
    opts.progress.set_position(resumed);
    // The whole-file digest is read front to back beside the transfer, not after it.
    let digest = {
        let source = upload.source.clone();
        tokio::spawn(async move { source.digest().await })
    };
    let work = Arc::new(Work::new(Vec::new(), opts));
    let mut session = Some(session);
    // A commit can find bytes missing only if the daemon lost acknowledged chunks (it restarted
    // after a power loss); then the missing ranges are sent again, a bounded number of times.
    let mut digest = Some(digest);
    let mut digest_bytes = Vec::new();
    for _ in 0..3 {
        let missing = RangeSet::from_ranges(held.iter().copied()).missing(identity.size);
        work.add(split_into_chunks(&missing, chunk_size));
        let first = match session.take() {
            Some(s) => (s, id),
            None => {
                let mut s = Session::connect(target, &opts.connector).await?;
                let id = upload.open(&mut s).await?;
                (s, id)
            }
        };
        let mut sessions =
            drive(target, Arc::clone(&upload), Arc::clone(&work), first, opts).await?;
        let (mut s, sid) = match sessions.pop() {
            Some(open) => open,
            None => {
                let mut s = Session::connect(target, &opts.connector).await?;
                let id = upload.open(&mut s).await?;
                (s, id)
            }
        };
        close_all(sessions).await;
        if let Some(task) = digest.take() {
            let d = task
                .await
                .map_err(|e| ClientError::Local(join_error(e)))??;
            digest_bytes = d.to_vec();
        }
        upload.source.check_unchanged()?;
        let commit = Commit {
            transfer_id: sid,
            digest: digest_bytes.clone(),
        };
        let answer = match s.send(&Frame::Commit(commit)).await {
            Ok(()) => s.next().await,
            Err(e) => Err(e),
        };
        match answer {
            Ok(Frame::Committed(_)) => {
                s.close().await;
                opts.progress.finish();
                return Ok(make_summary(
                    name,
                    identity.size,
                    resumed,
                    &work,
                    started,
                    connections_used(opts, &work),
                    congestion,
                ));
            }
            Err(ClientError::Remote(e)) if e.error_code() == Some(ErrorCode::Incomplete) => {
                (id, held) = upload.open_with_held(&mut s).await?;
                session = Some(s);
            }
            // The connection died around the commit: whether or not it took effect, a new
            // connection finds out (a committed file is offered back as held) and commits again.
            Err(e) if e.is_transient() => {
                tracing::info!(error = %e, "connection lost during commit; asking again");
                let mut s = connect_retrying(target, opts).await?;
                (id, held) = upload.open_with_held(&mut s).await?;
                session = Some(s);
            }
            Ok(other) => return Err(unexpected(other)),
            Err(e) => return Err(e),
        }
    }
    Err(ClientError::Remote(xfer_proto::ErrorFrame::new(
        ErrorCode::Incomplete,
        "server kept losing data",
    )))
}

// ---------------------------------------------------------------------------------------------
// Download

struct Download {
    name: String,
    identity: FileIdentity,
    partial: Arc<PartialFile>,
    max_chunk: u32,
}

async fn open_read(
    session: &mut Session,
    request: &OpenRead,
) -> Result<(u64, FileIdentity, u32), ClientError> {
    session.send(&Frame::OpenRead(request.clone())).await?;
    match session.next().await? {
        Frame::ReadOpened(r) => Ok((r.transfer_id, r.identity, r.mode)),
        other => Err(unexpected(other)),
    }
}

impl Direction for Download {
    async fn open(&self, session: &mut Session) -> Result<u64, ClientError> {
        let request = OpenRead {
            name: self.name.clone(),
            have_identity: None,
            have: vec![],
        };
        let (id, identity, _) = open_read(session, &request).await?;
        if identity != self.identity {
            return Err(ClientError::Changed(self.name.clone()));
        }
        Ok(id)
    }

    async fn pump(
        &self,
        session: &mut Session,
        transfer_id: u64,
        work: &Work,
    ) -> Result<Pumped, ClientError> {
        let window = window(session);
        let max = session.welcome.max_chunk_size.min(self.max_chunk);
        let mut inflight: VecDeque<ByteRange> = VecDeque::with_capacity(window);
        let mut retired = false;
        let result = async {
            loop {
                while inflight.len() < window {
                    let Some(chunk) = work.take(&mut retired) else {
                        break;
                    };
                    if chunk.len() > u64::from(max) {
                        // The server serves smaller chunks than planned: split this one.
                        work.requeue(split_into_chunks(&[chunk], max).into_iter());
                        continue;
                    }
                    inflight.push_back(chunk);
                    work.throttle(chunk.len()).await;
                    let req = ChunkRef {
                        transfer_id,
                        offset: chunk.start,
                        len: chunk.len() as u32,
                    };
                    session.send(&Frame::ReadChunk(req)).await?;
                }
                let Some(&want) = inflight.front() else {
                    return Ok(if retired {
                        Pumped::Retired
                    } else {
                        Pumped::Drained
                    });
                };
                let data = match session.next().await? {
                    Frame::Data(d) => d,
                    other => return Err(unexpected(other)),
                };
                if data.transfer_id != transfer_id || data.range() != want {
                    return Err(ClientError::Unexpected("Data"));
                }
                inflight.pop_front();
                work.transferred.fetch_add(want.len(), Ordering::Relaxed);
                if data.verify().is_err() {
                    work.crc_retries.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(offset = want.start, "chunk failed its CRC; asking again");
                    work.requeue(std::iter::once(want));
                    continue;
                }
                if let Err(e) = self
                    .partial
                    .write(data.offset, data.payload, data.crc32)
                    .await
                {
                    inflight.push_front(want);
                    return Err(e.into());
                }
                work.complete(want);
            }
        }
        .await;
        if result.is_err() {
            work.requeue(inflight.drain(..));
        }
        result
    }
}

/// Downloads `name` from `target` into `dest` (a file path), through a partial file beside it.
///
/// # Errors
/// Local file errors, connection failures past the retry deadline, or the server's refusal.
pub async fn recv(
    target: &Target,
    name: &str,
    dest: &Path,
    opts: &Options,
) -> Result<Summary, ClientError> {
    let started = Instant::now();
    let opts = &metered(opts);
    let slot = local_slot(dest)?;
    let journal_path = dest.with_file_name(xfer_core::journal_name(&slot.leaf));
    let have = read_local_journal(&journal_path);
    let mut session = connect_retrying(target, opts).await?;
    let congestion = session.congestion.clone();
    let request = OpenRead {
        name: name.to_string(),
        have_identity: have.as_ref().map(|c| c.identity),
        have: have
            .as_ref()
            .map(|c| c.chunks.iter().map(|(r, _)| *r).collect())
            .unwrap_or_default(),
    };
    let (id, identity, mode) = open_read(&mut session, &request).await?;
    let partial = PartialFile::open(slot, identity).await?;
    let resumed = partial.resumed_bytes();
    let chunk_size = opts
        .chunk_size
        .min(session.welcome.max_chunk_size)
        .max(xfer_proto::MIN_CHUNK_SIZE);
    let missing = RangeSet::from_ranges(partial.held()).missing(identity.size);
    opts.progress.set_length(identity.size);
    opts.progress.set_position(resumed);
    let work = Arc::new(Work::new(split_into_chunks(&missing, chunk_size), opts));
    let download = Arc::new(Download {
        name: name.to_string(),
        identity,
        partial: Arc::clone(&partial),
        max_chunk: chunk_size,
    });
    let digest = tokio::spawn(remote_digest(
        target.clone(),
        opts.connector.clone(),
        name.to_string(),
        identity,
    ));
    let mut sessions = drive(
        target,
        Arc::clone(&download),
        Arc::clone(&work),
        (session, id),
        opts,
    )
    .await?;
    // The extra connection's answer, if it has one by now; otherwise (it is still waiting for a
    // stream slot on a busy daemon, or failed on the way) ask on a data connection, now free.
    let early = if digest.is_finished() {
        match digest
            .await
            .map_err(|e| ClientError::Local(join_error(e)))?
        {
            Ok(digest) => Some(digest),
            Err(e) if e.is_transient() => None,
            Err(e) => return Err(e),
        }
    } else {
        digest.abort();
        None
    };
    let digest = match early {
        Some(digest) => digest,
        None => {
            let (mut s, id) = match sessions.pop() {
                Some(open) => open,
                None => {
                    let mut s = Session::connect(target, &opts.connector).await?;
                    let id = download.open(&mut s).await?;
                    (s, id)
                }
            };
            let digest = digest_over(&mut s, id).await;
            s.close().await;
            digest?
        }
    };
    match partial.commit(mode, identity.mtime_ns, Some(digest)).await {
        Ok(_) => close_all(sessions).await,
        // The local file had the server's size and mtime but other bytes: fetch it all now.
        Err(xfer_core::CoreError::Incomplete { .. }) => {
            let missing = RangeSet::from_ranges(partial.held()).missing(identity.size);
            opts.progress.set_position(0);
            work.add(split_into_chunks(&missing, chunk_size));
            let first = match sessions.pop() {
                Some(open) => open,
                None => {
                    let mut s = connect_retrying(target, opts).await?;
                    let id = download.open(&mut s).await?;
                    (s, id)
                }
            };
            close_all(sessions).await;
            let again = drive(
                target,
                Arc::clone(&download),
                Arc::clone(&work),
                first,
                opts,
            )
            .await?;
            close_all(again).await;
            partial
                .commit(mode, identity.mtime_ns, Some(digest))
                .await?;
        }
        Err(e) => return Err(e.into()),
    }
    opts.progress.finish();
    Ok(make_summary(
        name,
        identity.size,
        resumed,
        &work,
        started,
        connections_used(opts, &work),
        congestion,
    ))
}

fn join_error(e: tokio::task::JoinError) -> xfer_core::CoreError {
    xfer_core::CoreError::io("digest task", std::io::Error::other(e.to_string()))
}

/// Asks the server for the whole-file digest of `name` on a connection of its own, so the
/// server reads the file beside the data connections rather than after them.
async fn remote_digest(
    target: Target,
    connector: Connector,
    name: String,
    identity: FileIdentity,
) -> Result<xfer_core::digest::Digest, ClientError> {
    let mut session = Session::connect(&target, &connector).await?;
    let request = OpenRead {
        name: name.clone(),
        have_identity: None,
        have: vec![],
    };
    let (id, now, _) = open_read(&mut session, &request).await?;
    if now != identity {
        return Err(ClientError::Changed(name));
    }
    let digest = digest_over(&mut session, id).await;
    session.close().await;
    digest
}

/// Asks for the digest of download `id` open on `session`.
async fn digest_over(
    session: &mut Session,
    id: u64,
) -> Result<xfer_core::digest::Digest, ClientError> {
    session
        .send(&Frame::DigestRequest(Commit {
            transfer_id: id,
            digest: vec![],
        }))
        .await?;
    match session.next().await? {
        Frame::DigestReply(c) if c.transfer_id == id => c
            .digest
            .as_slice()
            .try_into()
            .map_err(|_| ClientError::Unexpected("DigestReply")),
        other => Err(unexpected(other)),
    }
}

fn read_local_journal(path: &Path) -> Option<xfer_core::journal::Contents> {
    let mut f = std::fs::File::open(path).ok()?;
    xfer_core::journal::read(&mut f).ok().flatten()
}

fn local_slot(dest: &Path) -> Result<Slot, ClientError> {
    let leaf = dest
        .file_name()
        .and_then(|l| l.to_str())
        .ok_or_else(|| ClientError::Target(format!("bad output path {}", dest.display())))?;
    if xfer_core::is_reserved_name(leaf) {
        return Err(xfer_core::CoreError::BadPath(format!("reserved output name {leaf:?}")).into());
    }
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let dir = std::fs::File::open(parent).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            xfer_core::CoreError::NotFound(format!("output directory {}", parent.display()))
        }
        _ => xfer_core::CoreError::io(format!("opening {}", parent.display()), e),
    })?;
    Ok(Slot {
        dir: Arc::new(dir),
        leaf: leaf.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drives a grower through ticks at `rates` bytes per second, one per measured size, with
    /// every worker ready; returns the steps that were not `Wait`.
    fn check(start: usize, max: usize, rates: &[f64]) -> Vec<Step> {
        let t0 = Instant::now();
        let mut g = Grower::new(start, max, t0, None);
        let (mut now, mut bytes, mut steps) = (t0, 0.0, Vec::new());
        let mut rates = rates.iter().copied();
        let mut rate = rates.next().unwrap_or(0.0);
        while !g.done {
            now += TICK;
            bytes += rate * TICK.as_secs_f64();
            match g.on_tick(now, bytes as u64, true) {
                Step::Wait => {}
                step => {
                    steps.push(step);
                    rate = rates.next().unwrap_or(rate);
                }
            }
            assert!(now < t0 + Duration::from_secs(60), "never settles");
        }
        steps
    }

    fn sizes(steps: &[Step]) -> Vec<(char, usize)> {
        steps
            .iter()
            .map(|s| match *s {
                Step::Grow { to, .. } => ('+', to),
                Step::Keep { size, .. } => ('=', size),
                Step::Shrink { to, .. } => ('-', to),
                Step::Wait => ('?', 0),
            })
            .collect()
    }

    #[test]
    fn grows_while_throughput_follows_the_connections() {
        // Loss-limited streams: throughput in proportion to the connections, up to the cap.
        let steps = check(4, 16, &[4e6, 8e6, 16e6]);
        assert_eq!(sizes(&steps), [('+', 8), ('+', 16), ('=', 16)]);
    }

    #[test]
    fn stops_when_the_gain_is_small_and_goes_back_when_it_is_slower() {
        assert_eq!(sizes(&check(4, 16, &[100e6, 105e6])), [('+', 8), ('=', 8)]);
        assert_eq!(sizes(&check(4, 16, &[100e6, 70e6])), [('+', 8), ('-', 4)]);
        assert_eq!(
            sizes(&check(4, 16, &[10e6, 20e6, 14e6])),
            [('+', 8), ('+', 16), ('-', 8)]
        );
        // A dip right after growing (new streams competing with the old) keeps the pool.
        assert_eq!(sizes(&check(4, 16, &[100e6, 80e6])), [('+', 8), ('=', 8)]);
        assert_eq!(
            sizes(&check(4, 16, &[10e6, 20e6, 19e6])),
            [('+', 8), ('+', 16), ('=', 16)]
        );
    }

    #[test]
    fn a_short_path_is_measured_in_fewer_round_trips_bounded() {
        let t0 = Instant::now();
        let lan = Grower::new(4, 16, t0, Some(Duration::from_micros(200)));
        assert_eq!((lan.settle, lan.measure), (SETTLE.0, MEASURE.0));
        let wan = Grower::new(4, 16, t0, Some(Duration::from_millis(50)));
        assert_eq!((wan.settle, wan.measure), (SETTLE.1, MEASURE.1));
        let mid = Grower::new(4, 16, t0, Some(Duration::from_millis(30)));
        assert_eq!(
            (mid.settle, mid.measure),
            (Duration::from_millis(300), Duration::from_millis(600))
        );
        // On loopback the first decision comes after 0.7 s of moving chunks, not 1.5 s.
        let mut g = Grower::new(4, 16, t0, Some(Duration::from_micros(50)));
        let mut tick = |i: u32| g.on_tick(t0 + TICK * i, u64::from(i) << 27, true);
        let first = (1..10).find(|&i| tick(i) != Step::Wait);
        assert_eq!(first, Some(7));
    }

    #[test]
    fn a_pool_that_is_not_ready_is_not_measured() {
        let t0 = Instant::now();
        let mut g = Grower::new(4, 16, t0, None);
        // Never ready (a worker still connecting): no decision however long it lasts.
        for i in 1..100 {
            let step = g.on_tick(t0 + TICK * i, u64::from(i) << 20, false);
            assert_eq!(step, Step::Wait);
        }
        // At the cap already: nothing to do.
        assert!(Grower::new(4, 4, t0, None).done);
        assert_eq!(Connections::Adaptive { max: 2 }.initial(), 2);
        let (lan, wan) = (Duration::from_micros(200), Duration::from_millis(50));
        assert_eq!(Connections::Adaptive { max: 16 }.initial_on(Some(lan)), 4);
        assert_eq!(Connections::Adaptive { max: 16 }.initial_on(Some(wan)), 8);
        assert_eq!(Connections::Adaptive { max: 6 }.initial_on(Some(wan)), 6);
        assert_eq!(Connections::Fixed(3).initial_on(Some(wan)), 3);
        assert_eq!(Connections::Fixed(3).initial(), 3);
    }
}
