//! [`Proxy`]: a fault-injecting TCP proxy for the end-to-end suite. It sits between `xfer` and
//! `xferd` on `127.0.0.1:0`, forwards bytes both ways on its own tokio runtime, and can be told at
//! any time to cut connections (all of them now, or the first ones that reach a byte count or
//! carry a given frame), stall them, delay them, cap the rate of each, flip bits in the stream,
//! or refuse new ones.
//!
//! It knows just enough of the wire format (`proto.md` §3.1, §4.4) to count `Data` payload bytes
//! in each direction and to flip bits inside payloads only; every fault is applied to real
//! sockets and nothing of the programs under test is replaced.
//!
//! Counters ([`Stats`]) count what was actually written to the far side, so they measure what
//! each program really received.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use xfer_proto::FrameType;

/// Largest read forwarded as one piece.
const READ_BUF: usize = 64 * 1024;
/// Pieces buffered per direction between reading and writing (this bounds a stalled or delayed
/// connection's memory to about 1 MiB per direction).
const PIPE_DEPTH: usize = 16;
/// How long the proxy tries to reach the daemon for a new connection before dropping it.
const UPSTREAM_CONNECT_DEADLINE: Duration = Duration::from_secs(5);

/// Which way bytes flow through the proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// From `xfer` to `xferd`.
    ToServer,
    /// From `xferd` to `xfer`.
    ToClient,
}

impl Direction {
    fn index(self) -> usize {
        match self {
            Self::ToServer => 0,
            Self::ToClient => 1,
        }
    }
}

/// How the proxy damages the bytes it forwards in one direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Corruption {
    /// Forward bytes unchanged.
    #[default]
    Off,
    /// Flip one random bit in about one byte out of `one_in`, anywhere in the stream: frame
    /// headers and control frames included.
    Bytes {
        /// Mean distance in bytes between two flipped bytes.
        one_in: u64,
    },
    /// Flip one random bit in the payload of every `every`-th `Data` frame (counted over all
    /// connections), so that only the payload CRC can notice.
    Payloads {
        /// Period, in `Data` frames with a non-empty payload.
        every: u64,
    },
    /// Flip one random bit in the payload of every `Data` frame whose file offset is `offset`.
    PayloadAt {
        /// File offset of the chunk to damage each time it passes.
        offset: u64,
    },
    /// XOR the file offset in the header of the next `Data` frame with `xor`, once (then the
    /// direction goes back to `Off`): an intact payload with a matching CRC, sent to the wrong
    /// place.
    DataOffset {
        /// Bits to flip in the 64-bit offset.
        xor: u64,
    },
}

/// Counters of one direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirectionStats {
    /// Bytes written to the far side.
    pub bytes: u64,
    /// `Data` payload bytes among them.
    pub payload_bytes: u64,
    /// `Data` frames whose header was forwarded.
    pub data_frames: u64,
    /// Bits flipped.
    pub flipped: u64,
}

/// A snapshot of the proxy's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Connections accepted and forwarded to the daemon.
    pub accepted: u64,
    /// Connections accepted and dropped at once while the daemon was made unreachable.
    pub refused: u64,
    /// Connections cut by a fault (reset on both sides).
    pub cut: u64,
    /// Connections stalled by a fault.
    pub stalled: u64,
    /// Connections open now.
    pub live: u64,
    /// From `xfer` to `xferd`.
    pub to_server: DirectionStats,
    /// From `xferd` to `xfer`.
    pub to_client: DirectionStats,
}

impl Stats {
    /// The counters of one direction.
    pub fn direction(&self, dir: Direction) -> DirectionStats {
        match dir {
            Direction::ToServer => self.to_server,
            Direction::ToClient => self.to_client,
        }
    }
}

/// A fault that fires on the first `remaining` connections meeting its condition.
#[derive(Clone, Copy, Debug)]
struct Budget {
    bytes: u64,
    remaining: u64,
}

#[derive(Clone, Copy, Debug)]
struct FrameTrigger {
    dir: Direction,
    frame: u8,
    remaining: u64,
}

#[derive(Debug, Default)]
struct Settings {
    unreachable: bool,
    delay: Duration,
    /// Bytes per second each connection may forward in each direction.
    rate: Option<u64>,
    corruption: [Corruption; 2],
    cut_after: Option<Budget>,
    stall_after: Option<Budget>,
    cut_at_frame: Option<FrameTrigger>,
}

#[derive(Debug, Default)]
struct DirCounters {
    bytes: AtomicU64,
    payload_bytes: AtomicU64,
    data_frames: AtomicU64,
    flipped: AtomicU64,
    /// `Data` frames with a payload seen, for `Corruption::Payloads`.
    payload_frames: AtomicU64,
}

impl DirCounters {
    fn snapshot(&self) -> DirectionStats {
        DirectionStats {
            bytes: self.bytes.load(Ordering::SeqCst),
            payload_bytes: self.payload_bytes.load(Ordering::SeqCst),
            data_frames: self.data_frames.load(Ordering::SeqCst),
            flipped: self.flipped.load(Ordering::SeqCst),
        }
    }
}

#[derive(Debug)]
struct Shared {
    upstream: Mutex<SocketAddr>,
    settings: Mutex<Settings>,
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
    accepted: AtomicU64,
    refused: AtomicU64,
    cut: AtomicU64,
    stalled: AtomicU64,
    dirs: [DirCounters; 2],
}

impl Shared {
    fn settings(&self) -> MutexGuard<'_, Settings> {
        self.settings.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn conns(&self) -> MutexGuard<'_, HashMap<u64, Arc<Conn>>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One proxied connection's controls.
#[derive(Debug, Default)]
struct Conn {
    /// Cancelled to cut the connection (both sockets are reset).
    cut: CancellationToken,
    /// Set once the connection stalls: nothing more is forwarded either way.
    stalled: AtomicBool,
    /// Bytes forwarded, both directions together.
    forwarded: AtomicU64,
}

impl Conn {
    fn is_stalled(&self) -> bool {
        self.stalled.load(Ordering::SeqCst)
    }
}

/// A fault-injecting TCP proxy on `127.0.0.1:0` in front of one daemon address. Dropping it stops
/// its runtime, which closes every connection it holds.
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Proxy {
    /// Starts a proxy forwarding every connection it accepts to `upstream`.
    ///
    /// # Panics
    /// If the runtime cannot start or `127.0.0.1:0` cannot be bound.
    pub fn start(upstream: SocketAddr) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("proxy")
            .enable_all()
            .build()
            .expect("proxy runtime");
        let listener = runtime
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let shared = Arc::new(Shared {
            upstream: Mutex::new(upstream),
            settings: Mutex::default(),
            conns: Mutex::default(),
            accepted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            cut: AtomicU64::new(0),
            stalled: AtomicU64::new(0),
            dirs: Default::default(),
        });
        runtime.spawn(accept_loop(listener, Arc::clone(&shared)));
        Self {
            addr,
            shared,
            runtime: Some(runtime),
        }
    }

    /// `127.0.0.1:PORT`, as given to `xfer` instead of the daemon's address.
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// Sends new connections to `upstream` from now on (a daemon restarted on another port).
    pub fn set_upstream(&self, upstream: SocketAddr) {
        *self
            .shared
            .upstream
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = upstream;
    }

    /// Cuts every open connection now (reset on both sides); returns how many were open.
    pub fn cut_all(&self) -> usize {
        let conns: Vec<Arc<Conn>> = self.shared.conns().values().cloned().collect();
        for conn in &conns {
            conn.cut.cancel();
        }
        conns.len()
    }

    /// Cuts the first `connections` connections whose forwarded bytes (both directions
    /// together) reach `bytes`, right after their `bytes`-th byte.
    pub fn cut_after(&self, bytes: u64, connections: u64) {
        self.shared.settings().cut_after = Some(Budget {
            bytes,
            remaining: connections,
        });
    }

    /// Stalls the first `connections` connections whose forwarded bytes reach `bytes`: from
    /// their `bytes`-th byte on nothing more is forwarded either way, and the connection stays
    /// open until one of its ends closes it (then the other end is reset).
    pub fn stall_after(&self, bytes: u64, connections: u64) {
        self.shared.settings().stall_after = Some(Budget {
            bytes,
            remaining: connections,
        });
    }

    /// Cuts the connection on which the next `times` frames of type `frame` travel in `dir`:
    /// the frame's length prefix may pass, its type byte and body do not.
    pub fn cut_at_frame(&self, dir: Direction, frame: FrameType, times: u64) {
        self.shared.settings().cut_at_frame = Some(FrameTrigger {
            dir,
            frame: frame as u8,
            remaining: times,
        });
    }

    /// Holds every piece of data read, in both directions, for `delay` before writing it on.
    pub fn set_delay(&self, delay: Duration) {
        self.shared.settings().delay = delay;
    }

    /// Caps every connection, in each direction, at `bytes_per_sec` (a token bucket per
    /// connection and direction, one read of at most 64 KiB deep); `None` lifts the cap. A
    /// link where each connection is slow but more connections carry more.
    pub fn set_rate_limit(&self, bytes_per_sec: Option<u64>) {
        self.shared.settings().rate = bytes_per_sec;
    }

    /// Damages bytes flowing in `dir` as `corruption` says, from now on.
    pub fn set_corruption(&self, dir: Direction, corruption: Corruption) {
        self.shared.settings().corruption[dir.index()] = corruption;
    }

    /// While `on`, the daemon is unreachable: every open connection is cut, and new connections
    /// are accepted and reset at once, before a byte reaches the daemon.
    pub fn set_unreachable(&self, on: bool) {
        self.shared.settings().unreachable = on;
        if on {
            self.cut_all();
        }
    }

    /// The counters now.
    pub fn stats(&self) -> Stats {
        let s = &self.shared;
        Stats {
            accepted: s.accepted.load(Ordering::SeqCst),
            refused: s.refused.load(Ordering::SeqCst),
            cut: s.cut.load(Ordering::SeqCst),
            stalled: s.stalled.load(Ordering::SeqCst),
            live: s.conns().len() as u64,
            to_server: s.dirs[0].snapshot(),
            to_client: s.dirs[1].snapshot(),
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut next_id = 0u64;
    loop {
        let Ok((client, _)) = listener.accept().await else {
            // EMFILE and the like: wait for connections to end.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        if shared.settings().unreachable {
            shared.refused.fetch_add(1, Ordering::SeqCst);
            let _ = client.set_zero_linger();
            drop(client);
            continue;
        }
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        let id = next_id;
        next_id += 1;
        let conn = Arc::new(Conn::default());
        shared.conns().insert(id, Arc::clone(&conn));
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            serve(&shared, &conn, client).await;
            shared.conns().remove(&id);
        });
    }
}

/// Connects to the daemon and forwards both ways until both directions are closed, or resets
/// both sockets when the connection is cut or a side fails.
async fn serve(shared: &Shared, conn: &Conn, mut client: TcpStream) {
    let _ = client.set_nodelay(true);
    let upstream_addr = *shared.upstream.lock().unwrap_or_else(|p| p.into_inner());
    let connect =
        tokio::time::timeout(UPSTREAM_CONNECT_DEADLINE, TcpStream::connect(upstream_addr));
    let upstream = tokio::select! {
        () = conn.cut.cancelled() => None,
        connected = connect => connected.ok().and_then(Result::ok),
    };
    let Some(mut upstream) = upstream else {
        // The client sees its connection reset, as if the daemon were gone.
        let _ = client.set_zero_linger();
        return;
    };
    let _ = upstream.set_nodelay(true);
    let clean = {
        let (client_read, client_write) = client.split();
        let (upstream_read, upstream_write) = upstream.split();
        let to_server = pipe(
            client_read,
            upstream_write,
            Direction::ToServer,
            shared,
            conn,
        );
        let to_client = pipe(
            upstream_read,
            client_write,
            Direction::ToClient,
            shared,
            conn,
        );
        tokio::select! {
            () = conn.cut.cancelled() => false,
            forwarded = async { tokio::try_join!(to_server, to_client) } => forwarded.is_ok(),
        }
    };
    if !clean {
        if conn.cut.is_cancelled() {
            shared.cut.fetch_add(1, Ordering::SeqCst);
        }
        let _ = client.set_zero_linger();
        let _ = upstream.set_zero_linger();
    }
}

/// What happens to a connection once a piece has been written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Then {
    Continue,
    Cut,
    Stall,
}

/// A piece ready to be written: how much of it, what it holds, and what follows.
#[derive(Debug)]
struct Piece {
    len: usize,
    scanned: Scanned,
    then: Then,
}

/// Forwards one direction: a reader fills a bounded queue, a writer applies the faults and
/// writes on. Ends with `Ok` once the source is at its end and the sink is shut down; a read or
/// write error (or the end of a stalled connection) ends it with `Err`.
async fn pipe(
    mut from: tokio::net::tcp::ReadHalf<'_>,
    mut to: tokio::net::tcp::WriteHalf<'_>,
    dir: Direction,
    shared: &Shared,
    conn: &Conn,
) -> io::Result<()> {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(PIPE_DEPTH);
    let reader = async move {
        let mut buf = vec![0u8; READ_BUF];
        loop {
            let n = from.read(&mut buf).await?;
            if n == 0 {
                if conn.is_stalled() {
                    return Err(io::Error::other("one end closed a stalled connection"));
                }
                return Ok(());
            }
            if tx.send((Instant::now(), buf[..n].to_vec())).await.is_err() {
                return Ok(());
            }
        }
    };
    let writer = async move {
        let mut scanner = Scanner::default();
        // When the bucket holds enough for the next piece; idle time earns no credit.
        let mut paced = Instant::now();
        while let Some((read_at, mut data)) = rx.recv().await {
            let delay = shared.settings().delay;
            if !delay.is_zero() {
                tokio::time::sleep_until(read_at + delay).await;
            }
            if conn.is_stalled() {
                std::future::pending::<()>().await;
            }
            let piece = process(shared, conn, dir, &mut scanner, &mut data);
            let rate = shared.settings().rate;
            if let Some(rate) = rate.filter(|r| *r > 0) {
                paced = paced.max(Instant::now());
                tokio::time::sleep_until(paced).await;
                paced += Duration::from_secs_f64(piece.len as f64 / rate as f64);
            }
            to.write_all(&data[..piece.len]).await?;
            let counters = &shared.dirs[dir.index()];
            counters.bytes.fetch_add(piece.len as u64, Ordering::SeqCst);
            counters
                .payload_bytes
                .fetch_add(piece.scanned.payload, Ordering::SeqCst);
            counters
                .data_frames
                .fetch_add(piece.scanned.frames, Ordering::SeqCst);
            counters
                .flipped
                .fetch_add(piece.scanned.flips, Ordering::SeqCst);
            conn.forwarded.fetch_add(piece.len as u64, Ordering::SeqCst);
            match piece.then {
                Then::Continue => {}
                Then::Cut => {
                    conn.cut.cancel();
                    std::future::pending::<()>().await;
                }
                Then::Stall => {
                    if !conn.stalled.swap(true, Ordering::SeqCst) {
                        shared.stalled.fetch_add(1, Ordering::SeqCst);
                    }
                    std::future::pending::<()>().await;
                }
            }
        }
        to.shutdown().await
    };
    tokio::try_join!(reader, writer).map(|_| ())
}

/// Decides what of `data` is written and damages it as the settings say.
fn process(
    shared: &Shared,
    conn: &Conn,
    dir: Direction,
    scanner: &mut Scanner,
    data: &mut [u8],
) -> Piece {
    let mut settings = shared.settings();
    let forwarded = conn.forwarded.load(Ordering::SeqCst);
    let mut len = data.len();
    let mut then = Then::Continue;
    // A byte threshold crossed by this piece: forward up to it exactly.
    let crossing = |budget: &mut Option<Budget>| match budget {
        Some(b) if b.remaining > 0 && forwarded < b.bytes && forwarded + len as u64 >= b.bytes => {
            b.remaining -= 1;
            Some((b.bytes - forwarded) as usize)
        }
        _ => None,
    };
    if let Some(upto) = crossing(&mut settings.cut_after) {
        (len, then) = (upto, Then::Cut);
    } else if let Some(upto) = crossing(&mut settings.stall_after) {
        (len, then) = (upto, Then::Stall);
    }
    let corruption = settings.corruption[dir.index()];
    let raw_flips = match corruption {
        Corruption::Bytes { one_in } => scanner.flip_bytes(&mut data[..len], one_in),
        _ => 0,
    };
    let trigger = settings
        .cut_at_frame
        .as_mut()
        .filter(|t| t.dir == dir && t.remaining > 0);
    let payload_frames = &shared.dirs[dir.index()].payload_frames;
    let mut scanned = scanner.scan(&mut data[..len], corruption, trigger, payload_frames);
    scanned.flips += raw_flips;
    if scanned.offset_damaged {
        settings.corruption[dir.index()] = Corruption::Off;
    }
    if let Some(stop) = scanned.stop {
        (len, then) = (stop, Then::Cut);
    }
    Piece { len, scanned, then }
}

/// Where a direction's byte stream is in the frame structure of `proto.md` §3.1.
#[derive(Debug)]
enum ScanState {
    /// Reading the 4-byte length and the type byte.
    Head { buf: [u8; 5], got: usize },
    /// Reading the 24-byte `Data` header; `body` counts the header and the payload, and
    /// `xor` is applied to its offset field on the way through.
    DataHeader {
        buf: [u8; 24],
        got: usize,
        body: u64,
        xor: u64,
    },
    /// Inside a `Data` payload, with the position of the byte to damage, if any.
    Payload { left: u64, flip_at: Option<u64> },
    /// Inside the body of another frame.
    Skip { left: u64 },
}

impl Default for ScanState {
    fn default() -> Self {
        Self::Head {
            buf: [0; 5],
            got: 0,
        }
    }
}

/// What a scan found in one piece.
#[derive(Debug, Default)]
struct Scanned {
    payload: u64,
    frames: u64,
    flips: u64,
    /// Where the piece must end because a triggering frame starts there.
    stop: Option<usize>,
    /// A `Corruption::DataOffset` was applied.
    offset_damaged: bool,
}

/// Follows the frames of one direction of one connection. Garbage (a stream already damaged)
/// only makes it count nonsense; it never panics.
#[derive(Debug, Default)]
struct Scanner {
    state: ScanState,
    /// Bytes until the next raw flip, for `Corruption::Bytes`.
    raw_countdown: Option<u64>,
}

const DATA: u8 = FrameType::Data as u8;
const DATA_HEADER: usize = 24;

impl Scanner {
    /// Flips one bit in about one byte out of `one_in`; returns the number flipped.
    fn flip_bytes(&mut self, data: &mut [u8], one_in: u64) -> u64 {
        let mut rng = rand::thread_rng();
        let span = one_in.max(1) * 2;
        let mut at = *self
            .raw_countdown
            .get_or_insert_with(|| rng.gen_range(0..span));
        let mut flips = 0;
        while at < data.len() as u64 {
            data[at as usize] ^= 1 << rng.gen_range(0..8);
            flips += 1;
            at += rng.gen_range(1..=span);
        }
        self.raw_countdown = Some(at - data.len() as u64);
        flips
    }

    fn scan(
        &mut self,
        data: &mut [u8],
        corruption: Corruption,
        mut trigger: Option<&mut FrameTrigger>,
        payload_frames: &AtomicU64,
    ) -> Scanned {
        let mut out = Scanned::default();
        let mut i = 0;
        while i < data.len() {
            let rest = data.len() - i;
            let next = match &mut self.state {
                ScanState::Head { buf, got } => {
                    buf[*got] = data[i];
                    *got += 1;
                    i += 1;
                    if *got < buf.len() {
                        continue;
                    }
                    let len = u64::from(u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]));
                    let frame = buf[4];
                    if let Some(t) = trigger.as_deref_mut().filter(|t| t.frame == frame) {
                        t.remaining -= 1;
                        out.stop = Some(i - 1);
                        return out;
                    }
                    let body = len.saturating_sub(1);
                    if frame == DATA && body >= DATA_HEADER as u64 {
                        let xor = match corruption {
                            Corruption::DataOffset { xor } if !out.offset_damaged => {
                                out.offset_damaged = true;
                                out.flips += u64::from(xor.count_ones());
                                xor
                            }
                            _ => 0,
                        };
                        ScanState::DataHeader {
                            buf: [0; DATA_HEADER],
                            got: 0,
                            body,
                            xor,
                        }
                    } else if body == 0 {
                        ScanState::default()
                    } else {
                        ScanState::Skip { left: body }
                    }
                }
                ScanState::DataHeader {
                    buf,
                    got,
                    body,
                    xor,
                } => {
                    let take = (DATA_HEADER - *got).min(rest);
                    // The offset is body bytes 8..16, big-endian.
                    let xor = xor.to_be_bytes();
                    for k in 0..take {
                        if let Some(x) = (*got + k).checked_sub(8).and_then(|b| xor.get(b)) {
                            data[i + k] ^= x;
                        }
                    }
                    buf[*got..*got + take].copy_from_slice(&data[i..i + take]);
                    *got += take;
                    i += take;
                    if *got < DATA_HEADER {
                        continue;
                    }
                    out.frames += 1;
                    let offset = u64::from_be_bytes(buf[8..16].try_into().expect("8 bytes"));
                    let left = *body - DATA_HEADER as u64;
                    if left == 0 {
                        ScanState::default()
                    } else {
                        let nth = payload_frames.fetch_add(1, Ordering::SeqCst);
                        let damage = match corruption {
                            Corruption::Payloads { every } => {
                                nth % every.max(1) == every.max(1) - 1
                            }
                            Corruption::PayloadAt { offset: at } => at == offset,
                            Corruption::Off
                            | Corruption::Bytes { .. }
                            | Corruption::DataOffset { .. } => false,
                        };
                        let flip_at = damage.then(|| rand::thread_rng().gen_range(0..left));
                        ScanState::Payload { left, flip_at }
                    }
                }
                ScanState::Payload { left, flip_at } => {
                    let take = (*left).min(rest as u64);
                    if let Some(at) = *flip_at {
                        if at < take {
                            data[i + at as usize] ^= 1 << rand::thread_rng().gen_range(0..8);
                            out.flips += 1;
                            *flip_at = None;
                        } else {
                            *flip_at = Some(at - take);
                        }
                    }
                    out.payload += take;
                    *left -= take;
                    i += take as usize;
                    if *left > 0 {
                        continue;
                    }
                    ScanState::default()
                }
                ScanState::Skip { left } => {
                    let take = (*left).min(rest as u64);
                    *left -= take;
                    i += take as usize;
                    if *left > 0 {
                        continue;
                    }
                    ScanState::default()
                }
            };
            self.state = next;
        }
        out
    }
}
