//! The pool of connections of one transfer: [`drive`] runs a worker per connection over the
//! shared queue, a fixed number or as many as [`Grower`] finds useful, and each worker
//! reconnects after transient failures.

use std::os::fd::BorrowedFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use tokio_util::task::AbortOnDropHandle;
use xfer_net::Delivered;

use super::grower::{Grower, Step, TICK};
use super::queue::Work;
use super::retry::{connect_first, Retry, RECONNECTING};
use super::window::{pump, Direction, Pumped};
use super::{Connections, Options};
use crate::session::FirstFrames;
use crate::{ClientError, Session, Target};

/// Connections the pool will want, opened beside its first one: a worker about to connect
/// takes the next of them to be ready instead; those no worker takes are aborted (their
/// connections closed) when this is dropped. A failed one is left out: the worker connects by
/// itself then, and tells a daemon at its limits as any connection does.
#[derive(Default)]
pub(super) struct Early {
    connecting: tokio::sync::Mutex<JoinSet<Result<Ready, ClientError>>>,
    /// Connections started, the first one included.
    started: usize,
    /// The path's round-trip time, as the first connection measured it.
    rtt: Option<Duration>,
    /// Bytes of the file: a large file on a far path starts with more.
    size: u64,
    /// Opens the transfer on a connection once welcomed, when set ([`Early::open_ahead`]).
    ahead: Arc<Ahead>,
    /// The transfers opened ahead belong to an attempt that ended: workers open their own.
    expired: std::sync::atomic::AtomicBool,
}

/// An early connection once welcomed: with the transfer already open on it (its id), if it
/// was opened ahead.
pub(super) struct Ready {
    session: Session,
    opened: Option<u64>,
}

/// Opens a transfer on a welcomed connection: the connection and the transfer's id.
pub(super) type Opener = Arc<
    dyn Fn(Session) -> futures_util::future::BoxFuture<'static, Result<(Session, u64), ClientError>>
        + Send
        + Sync,
>;

/// What opens the transfer on early connections, once the transfer is known.
#[derive(Default)]
struct Ahead {
    opener: std::sync::OnceLock<Opener>,
    /// Taken by the first connection started beside the first one to be opened ahead: it runs
    /// this instead of `opener` (the upload's probe of its name, then the open).
    beside_first: std::sync::Mutex<Option<Opener>>,
    /// Connections started beside the first one still connecting: once none is left,
    /// `beside_first` is dropped unused, so that whoever waits on it learns there is none.
    beside_pending: std::sync::atomic::AtomicUsize,
    /// The frames that open the transfer, known before any connection is welcomed: the
    /// connections of the start and those the pool adds later send them with their `Auth`
    /// where the daemon proves itself early, and come welcomed with the transfer open.
    frames: std::sync::OnceLock<FirstFrames>,
    /// Reads what answered the open a connection sent with its handshake, when reading the
    /// transfer's id is not enough (a download checks the file is the one the first opened).
    answered: std::sync::OnceLock<Opener>,
    /// The probe of a delta (an upload's `List` of its name), known before any connection is
    /// welcomed: those started beside the first send it with their `Auth` and read its answer.
    probe: std::sync::OnceLock<FirstFrames>,
}

/// Counts a connection started beside the first one while it connects.
struct Beside(Arc<Ahead>);

impl Drop for Beside {
    fn drop(&mut self) {
        if self.0.beside_pending.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.drop_beside_first();
        }
    }
}

impl Ahead {
    /// The transfer `session` opened with its handshake, from the answer to that open.
    async fn read_answer(&self, mut session: Session) -> Result<(Session, u64), ClientError> {
        if let Some(answered) = self.answered.get() {
            return answered(session).await;
        }
        let id = opened_id(session.next().await?)?;
        Ok((session, id))
    }

    /// The opener for a connection; `beside_first` if it was started beside the first one.
    fn take(&self, beside_first: bool) -> Option<Opener> {
        let special = beside_first
            .then(|| {
                self.beside_first
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take()
            })
            .flatten();
        special.or_else(|| self.opener.get().cloned())
    }

    fn drop_beside_first(&self) {
        let unused = self
            .beside_first
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        drop(unused);
    }
}

/// How a transfer is opened with the handshake where the daemon proves itself early
/// (`CAP_EARLY_AUTH`): each open then goes with its connection's `Auth`, a round trip before
/// the `Welcome` it was encoded for.
pub(super) struct Opening {
    /// The first connection's open.
    pub(super) first: FirstFrames,
    /// The open of every other connection but those started beside the first (the start a
    /// path wants, those the pool adds as it grows, reconnections).
    pub(super) others: FirstFrames,
    /// Reads the answer to `others` (or to `first`, on a connection that became an early
    /// one); `None` reads the transfer's id only.
    pub(super) answered: Option<Opener>,
}

/// The transfer an answer to an open names.
fn opened_id(answer: xfer_proto::Frame) -> Result<u64, ClientError> {
    match answer {
        xfer_proto::Frame::WriteOpened(w) => Ok(w.transfer_id),
        xfer_proto::Frame::ReadOpened(r) => Ok(r.transfer_id),
        xfer_proto::Frame::ReadOpenedSparse(s) => Ok(s.opened.transfer_id),
        other => Err(crate::session::unexpected(other)),
    }
}

/// Opens `session`'s transfer with `open`, if there is one yet.
async fn open_with(session: Session, open: Option<Opener>) -> Result<Ready, ClientError> {
    match open {
        Some(open) => {
            let (session, id) = open(session).await?;
            Ok(Ready {
                session,
                opened: Some(id),
            })
        }
        None => Ok(Ready {
            session,
            opened: None,
        }),
    }
}

impl Early {
    /// Opens a transfer's first connection with the others its pool starts with on a long path
    /// (the path unknown yet) beside it, so that their handshakes overlap instead of following: on a 50 ms
    /// path with a token that is three round trips. The first connection to be welcomed is the
    /// transfer's first; the rest are early connections. As soon as the first TCP connect has
    /// measured the path's round trip, the connections `start_on` wants there (a far path's
    /// larger start for a large file) that are not connecting yet open too, beside the first
    /// one's handshake instead of after it: two round trips sooner (0.3 s through the emulated
    /// 150 ms path with a token). A download, whose size is not known yet, wants none.
    ///
    /// Only the first connection asks for TLS or a pin when the daemon wants them; the others
    /// try plain TCP only (nothing secret is sent before `Welcome`) and, turned down, are left
    /// out, so a user is never asked twice about one daemon. Where TLS is known to be needed,
    /// nothing opens beside the first, not even the far start once the path is measured.
    ///
    /// `opening.first`'s frames go as the first connection's first (with its `Auth` where the
    /// daemon proves itself early); the session returned says whether it is the one that sent
    /// them. `opening.others` go so on every connection started or added later, but those
    /// started beside the first: `probe`'s go so on those, whose answer their sessions keep
    /// (`absent`).
    ///
    /// # Errors
    /// As [`connect_first`]: the first connection's error, once no other was welcomed.
    pub(super) async fn connect_first(
        target: &Target,
        opts: &Options,
        start_on: impl FnOnce(Option<Duration>) -> usize,
        opening: Option<Opening>,
        probe: Option<FirstFrames>,
    ) -> Result<(Session, Self), ClientError> {
        let mut early = Self::default();
        let first = opening.map(|opening| {
            let _ = early.ahead.frames.set(opening.others);
            if let Some(answered) = opening.answered {
                let _ = early.ahead.answered.set(answered);
            }
            opening.first
        });
        if let Some(probe) = probe {
            let _ = early.ahead.probe.set(probe);
        }
        let connector = &opts.connector;
        let tls_known = connector.tls.is_some()
            || connector.tls_required
            || connector
                .tls_learned
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&target.to_string());
        let plain = crate::Connector {
            tls: None,
            trust: None,
            ..connector.clone()
        };
        if !tls_known {
            let beside = opts.connections.opened_at_once().saturating_sub(1);
            early.spawn(target, &plain, beside, true);
        }
        let (dialed, mut dial_rtt) = tokio::sync::oneshot::channel();
        let mut first = {
            let (target, opts) = (target.clone(), opts.clone());
            AbortOnDropHandle::new(tokio::spawn(async move {
                connect_first(&target, &opts, Some(dialed), first.as_ref()).await
            }))
        };
        let mut start_on = Some(start_on);
        // Where the first connection opens the transfer with its handshake, one welcomed
        // beside it first waits a round trip for it: the first comes with the open answered.
        let mut waiting: Option<(Ready, std::pin::Pin<Box<tokio::time::Sleep>>)> = None;
        let mut measured = None;
        let opens_first = early.ahead.frames.get().is_some();
        let beside = loop {
            tokio::select! {
                biased;
                first = &mut first => {
                    let first = first.map_err(|e| ClientError::Local(join_error(e)))?;
                    return match (first, waiting) {
                        (Ok(first), waiting) => {
                            if let Some((ready, _)) = waiting {
                                early.connecting.get_mut().spawn(async move { Ok(ready) });
                            }
                            Ok((first, early))
                        }
                        (Err(_), Some((ready, _))) => Ok((ready.session, early)),
                        (Err(e), None) => Err(e),
                    };
                }
                // Where TLS is known to be needed nothing opens beside the first, here either:
                // the start opens once it is welcomed (`top_up`).
                rtt = &mut dial_rtt, if start_on.is_some() && !tls_known => {
                    let (Ok(rtt), Some(start_on)) = (rtt, start_on.take()) else { continue };
                    measured = rtt;
                    // Beside a first connection that may yet ask for TLS, plain TCP only, as above.
                    early.start_up_to(target, &plain, start_on(rtt));
                }
                () = async { waiting.as_mut().expect("guarded").1.as_mut().await }, if waiting.is_some() => {
                    break waiting.take().expect("guarded").0.session;
                }
                Some(other) = early.connecting.get_mut().join_next(), if !early.connecting.get_mut().is_empty() && waiting.is_none() => {
                    let Ok(Ok(ready)) = other else { continue };
                    if opens_first {
                        let wait = measured.unwrap_or(Duration::from_millis(100));
                        waiting = Some((ready, Box::pin(tokio::time::sleep(wait))));
                        continue;
                    }
                    break ready.session;
                }
            }
        };
        // The first connection keeps connecting, as an early one; what it opened with its
        // handshake is its transfer, opened ahead.
        let ahead = Arc::clone(&early.ahead);
        early.connecting.get_mut().spawn(async move {
            let mut session = first
                .await
                .map_err(|e| ClientError::Local(join_error(e)))??;
            if !std::mem::take(&mut session.first_sent) {
                return Ok(Ready {
                    session,
                    opened: None,
                });
            }
            let (session, id) = ahead.read_answer(session).await?;
            Ok(Ready {
                session,
                opened: Some(id),
            })
        });
        Ok((beside, early))
    }

    /// Starts the connections a pool for `opts` starts with on a path of `rtt` for a file of
    /// `size` bytes that are not connecting yet (a long path starts with more, and a large
    /// file on a far path more still).
    pub(super) fn top_up(
        &mut self,
        target: &Target,
        opts: &Options,
        rtt: Option<Duration>,
        size: u64,
    ) {
        self.rtt = rtt;
        self.size = size;
        let wanted = opts.connections.initial_for(rtt, size);
        self.start_up_to(target, &opts.connector, wanted);
    }

    /// Starts connections with `connector` until `wanted` are started, the first included.
    fn start_up_to(&mut self, target: &Target, connector: &crate::Connector, wanted: usize) {
        let more = wanted.saturating_sub(self.started.max(1));
        self.spawn(target, connector, more, false);
    }

    /// Opens the transfer with `opener` on every early connection as soon as it is welcomed
    /// (those welcomed already at once), instead of when a worker takes it: the pool's opens
    /// then cross the path beside the first connection's instead of after it, a round trip
    /// sooner. The first connection started beside the first one runs `beside_first` instead,
    /// if given. Once an attempt ends, [`Early::expire`] makes workers open their own.
    pub(super) fn open_ahead(&mut self, opener: Opener, beside_first: Option<Opener>) {
        *self
            .ahead
            .beside_first
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = beside_first;
        let _ = self.ahead.opener.set(opener);
        let connecting = self.connecting.get_mut();
        let (mut welcomed, mut welcomed_ahead) = (Vec::new(), Vec::new());
        while let Some(done) = connecting.try_join_next() {
            match done {
                Ok(Ok(Ready {
                    session,
                    opened: None,
                })) => welcomed.push(session),
                // Opened just now, after the opener was set.
                Ok(Ok(ready)) => welcomed_ahead.push(ready),
                Ok(Err(e)) => tracing::debug!(error = %e, "an early connection failed"),
                Err(_) => {}
            }
        }
        for session in welcomed {
            // Welcomed before the opener was known: only the ones started beside the first
            // are welcomed this early, so the probe may go on any of them.
            let open = self.ahead.take(true);
            connecting.spawn(open_with(session, open));
        }
        for ready in welcomed_ahead {
            connecting.spawn(async move { Ok(ready) });
        }
        if self.ahead.beside_pending.load(Ordering::SeqCst) == 0 {
            self.ahead.drop_beside_first();
        }
    }

    /// The transfers opened ahead belong to an attempt that ended (the upload may have been
    /// dropped and opened anew): workers taking early connections from now on open their own.
    pub(super) fn expire(&self) {
        self.expired.store(true, Ordering::SeqCst);
    }

    fn spawn(
        &mut self,
        target: &Target,
        connector: &crate::Connector,
        n: usize,
        beside_first: bool,
    ) {
        for _ in 0..n {
            let (target, connector) = (target.clone(), connector.clone());
            let ahead = Arc::clone(&self.ahead);
            let beside = beside_first.then(|| {
                ahead.beside_pending.fetch_add(1, Ordering::SeqCst);
                Beside(Arc::clone(&ahead))
            });
            self.connecting.get_mut().spawn(async move {
                // Those started beside the first (one of which runs the probe of a delta) send
                // the probe with their Auth, the others the open.
                let frames = match beside_first {
                    true => ahead.probe.get(),
                    false => ahead.frames.get(),
                };
                let mut session =
                    Session::connect_sending(&target, &connector, 0, &mut None, frames).await;
                if let Ok(s) = session.as_mut() {
                    if beside_first && s.first_sent {
                        s.first_sent = false;
                        s.absent = Some(super::upload::absence_answer(s).await?);
                    }
                }
                let sent = session
                    .as_mut()
                    .is_ok_and(|s| std::mem::take(&mut s.first_sent));
                let open = (session.is_ok() && !sent)
                    .then(|| ahead.take(beside_first))
                    .flatten();
                drop(beside);
                let session = session?;
                if sent {
                    let (session, id) = ahead.read_answer(session).await?;
                    return Ok(Ready {
                        session,
                        opened: Some(id),
                    });
                }
                open_with(session, open).await
            });
        }
        self.started = self.started.max(1) + n;
    }

    /// A new connection made by a worker that found no early one (the pool grew past them, or
    /// one reconnects): with the transfer open on it, its id, where the open went with its
    /// `Auth` (the daemon proved itself early), a round trip sooner than after its `Welcome`.
    async fn connect(
        &self,
        target: &Target,
        connector: &crate::Connector,
    ) -> Result<(Session, Option<u64>), ClientError> {
        let frames = self.ahead.frames.get();
        let mut session = Session::connect_sending(target, connector, 0, &mut None, frames).await?;
        if !std::mem::take(&mut session.first_sent) {
            return Ok((session, None));
        }
        let (session, id) = self.ahead.read_answer(session).await?;
        Ok((session, Some(id)))
    }

    /// The next early connection to be welcomed; `None` once there are none left. Failed ones
    /// are passed over: more open at once than a short path's pool starts with, and a daemon
    /// at its per-address limit turns the surplus away first (a refusal is quicker than a
    /// welcome), so a starting worker taking a refusal for its own would leave the pool while
    /// welcomed connections wait unused. A worker that finds none connects by itself, and
    /// learns of the limit then.
    async fn take(&self) -> Option<(Session, Option<u64>)> {
        let mut connecting = self.connecting.lock().await;
        loop {
            match connecting.join_next().await? {
                Ok(Ok(Ready { session, opened })) => {
                    let opened = opened.filter(|_| !self.expired.load(Ordering::SeqCst));
                    return Some((session, opened));
                }
                Ok(Err(e)) => tracing::debug!(error = %e, "an early connection failed"),
                Err(_) => {}
            }
        }
    }
}

fn join_error(e: tokio::task::JoinError) -> xfer_core::CoreError {
    xfer_core::CoreError::io("connect task", std::io::Error::other(e.to_string()))
}

/// Runs the workers over `work` until the queue is drained: a fixed number, or an adaptive pool
/// that [`Grower`] sizes. The first worker moves chunks over `first` if given (a connection
/// with the transfer open); else it connects, as the others do. Each worker reconnects with exponential backoff and jitter after a
/// transient failure, until `retry_deadline`. Workers that connect take `early`'s connections
/// first. Returns the sessions that finished cleanly (with their transfer ids).
pub(super) async fn drive<D: Direction>(
    target: &Target,
    dir: Arc<D>,
    work: Arc<Work>,
    first: Option<(Session, u64)>,
    early: Arc<Early>,
    opts: &Options,
) -> Result<Vec<(Session, u64)>, ClientError> {
    type Joined = Result<Option<(Session, u64)>, ClientError>;
    let mut workers: JoinSet<Joined> = JoinSet::new();
    // What the pool's connections moved across the path, read from the kernel whenever the
    // grower looks: bytes the daemon acknowledged (uploads) or that arrived (downloads). Bytes
    // written are not bytes moved: a connection hands its socket a buffer's worth (megabytes) at
    // memory speed, then waits for acknowledgments, and a count kept at writes measured that
    // filling as throughput (through the emulated 50 ms path, 8 connections measured faster
    // than the link, and a pool of bbr connections grew to 64 on such noise while 16 moved as
    // much).
    let delivered = Arc::new(Delivered::new());
    let spawn = |workers: &mut JoinSet<Joined>, first: Option<(Session, u64)>, optional: bool| {
        let (dir, work, target) = (Arc::clone(&dir), Arc::clone(&work), target.clone());
        let (early, opts, delivered) = (Arc::clone(&early), opts.clone(), Arc::clone(&delivered));
        workers.spawn(async move {
            let pool = Pool {
                work: &work,
                early: &early,
                delivered: &delivered,
            };
            worker(&target, &*dir, pool, first, optional, &opts).await
        });
    };
    work.excess.store(0, Ordering::SeqCst);
    let rtt = first.as_ref().map_or(early.rtt, |(s, _)| s.rtt);
    let start = opts.connections.initial_for(rtt, early.size);
    let adaptive = matches!(opts.connections, Connections::Adaptive { .. });
    let mut first = first;
    for i in 0..start {
        // An adaptive pool needs only its first connection: the others it starts with are as
        // optional as the ones it adds.
        let optional = adaptive && i > 0;
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
                let moved = delivered.read().map_or(0, |d| d.moved());
                // A download's data is timed by the daemon that sends it (`PathReport`).
                let queue = dir.reported_queue().or_else(|| delivered.queue_delay());
                let step = g.on_tick(Instant::now(), moved, queue, ready, work.queued());
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
    let ms = |queue: Option<Duration>| queue.map_or("-".into(), |q| q.as_millis().to_string());
    match step {
        Step::Wait => {}
        Step::Grow {
            from,
            to,
            rate,
            best,
            queue,
        } => {
            tracing::debug!(
                from,
                to,
                mib_per_sec = %mib(rate),
                before_mib_per_sec = %best.map_or("-".into(), mib),
                queue_ms = %ms(queue),
                "throughput grew; adding connections"
            );
            add(to - from);
        }
        Step::Keep {
            size,
            rate,
            best,
            queue,
        } => tracing::debug!(
            connections = size,
            mib_per_sec = %mib(rate),
            best_mib_per_sec = %mib(best),
            queue_ms = %ms(queue),
            "throughput no longer grows; keeping the pool"
        ),
        Step::Full { size, rate, queue } => tracing::debug!(
            connections = size,
            mib_per_sec = %mib(rate),
            queue_ms = %ms(Some(queue)),
            "a queue stands on the path: it carries all it can; keeping the pool"
        ),
        Step::Shrink {
            from,
            to,
            rate,
            best,
            queue,
        } => {
            tracing::debug!(
                from,
                to,
                mib_per_sec = %mib(rate),
                best_mib_per_sec = %mib(best),
                queue_ms = %ms(queue),
                "more connections were slower; going back"
            );
            work.excess.fetch_add(from - to, Ordering::SeqCst);
        }
    }
}

/// What the workers of one pool share.
#[derive(Clone, Copy)]
struct Pool<'a> {
    work: &'a Work,
    early: &'a Early,
    delivered: &'a Delivered,
}

/// One worker: moves chunks over its connection, reconnecting after transient failures. An
/// `optional` worker (any but the first of an adaptive pool) whose first connection is turned
/// away leaves quietly and stops the pool from growing: the daemon is at one of its limits.
async fn worker<D: Direction>(
    target: &Target,
    dir: &D,
    pool: Pool<'_>,
    mut session: Option<(Session, u64)>,
    optional: bool,
    opts: &Options,
) -> Result<Option<(Session, u64)>, ClientError> {
    let Pool {
        work,
        early,
        delivered,
    } = pool;
    let mut retry = Retry::new(opts.retry_deadline);
    let mut ever_connected = false;
    let mut reconnecting = false;
    loop {
        if session.is_none() && work.is_idle() {
            return Ok(None);
        }
        let mut connected = false;
        let attempt = async {
            let (mut s, id) = match session.take() {
                Some(open) => open,
                None => {
                    let connect = async {
                        let (mut s, opened) = match early.take().await {
                            Some((mut s, opened)) => {
                                // It may have connected before the path's congestion control
                                // was chosen.
                                if let Some(name) = &opts.connector.socket.congestion {
                                    if let Err(e) = s.switch_congestion(name) {
                                        tracing::debug!(error = %e, "an early connection keeps its congestion control");
                                    }
                                }
                                (s, opened)
                            }
                            None => early.connect(target, &opts.connector).await?,
                        };
                        let id = match opened {
                            Some(id) => id,
                            None => dir.open(&mut s).await?,
                        };
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
            // SAFETY: `s` holds its socket open for the length of the call (the count keeps a
            // descriptor of its own).
            let _counted =
                s.fd.and_then(|fd| delivered.count(unsafe { BorrowedFd::borrow_raw(fd) }));
            // Once other connections moved every chunk, what this one still has in flight is
            // only copies: it is closed rather than waited for, so a slow connection never
            // holds up the end of the transfer.
            let pumped = tokio::select! {
                biased;
                pumped = pump(dir, &mut s, id, work) => pumped,
                () = work.finished() => {
                    tracing::debug!("every chunk moved elsewhere; closing a slow connection");
                    return Ok(None);
                }
            };
            match pumped {
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
            if std::mem::take(&mut reconnecting) {
                opts.progress.set_message(String::new());
            }
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
                let delay = retry.after(e, Instant::now())?;
                reconnecting = true;
                opts.progress.set_message(RECONNECTING.into());
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = work.finished() => return Ok(None),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_session;
    use super::*;

    /// An opener that answers every open with `id`, counting its calls.
    fn opener(id: u64, calls: &Arc<std::sync::atomic::AtomicUsize>) -> Opener {
        let calls = Arc::clone(calls);
        Arc::new(move |session: Session| {
            calls.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move { Ok((session, id)) })
        })
    }

    #[tokio::test]
    async fn a_connection_welcomed_before_the_transfer_is_known_is_opened_ahead() {
        let mut early = Early::default();
        let (session, _daemon) = test_session(2, 1 << 20);
        early.connecting.get_mut().spawn(async move {
            Ok(Ready {
                session,
                opened: None,
            })
        });
        // Welcomed: the task ends at its first poll, before the transfer is known.
        for _ in 0..16 {
            tokio::task::yield_now().await;
        }
        let (calls, probes) = Default::default();
        early.open_ahead(opener(7, &calls), Some(opener(9, &probes)));
        let (_, opened) = early.take().await.expect("the connection");
        // It was started beside the first one, so it ran the probe, and only that.
        assert_eq!(opened, Some(9));
        assert_eq!(probes.load(Ordering::SeqCst), 1);
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        assert!(early.take().await.is_none());
    }

    #[tokio::test]
    async fn with_no_connection_beside_the_first_the_probe_is_dropped_unused() {
        let mut early = Early::default();
        let (tx, mut rx) = tokio::sync::oneshot::channel::<bool>();
        let tx = std::sync::Mutex::new(Some(tx));
        let probe: Opener = Arc::new(move |session: Session| {
            let tx = tx.lock().unwrap().take();
            Box::pin(async move {
                let _ = tx.map(|tx| tx.send(true));
                Ok((session, 9))
            })
        });
        early.open_ahead(opener(7, &Default::default()), Some(probe));
        // Whoever waits on the probe's answer learns at once that none will come.
        assert_eq!(
            rx.try_recv(),
            Err(tokio::sync::oneshot::error::TryRecvError::Closed)
        );
    }

    /// A listener that accepts and never answers, and options for an adaptive pool to it.
    async fn silent_daemon() -> (tokio::net::TcpListener, Target, Options) {
        let (listener, target) = crate::session::fake_daemon().await;
        let mut opts = super::super::test_options(Arc::new(crate::ProgressCounter::default()));
        opts.connections = Connections::Adaptive { max: 64 };
        (listener, target, opts)
    }

    /// The rest of the start a path wants connects as soon as the first TCP connect has
    /// measured it, none waiting for the first handshake to finish (this listener answers
    /// none).
    #[tokio::test]
    async fn the_start_the_path_wants_connects_beside_the_first_handshake() {
        let (listener, target, opts) = silent_daemon().await;
        let wanted = 2 * opts.connections.opened_at_once();
        let (told, mut measured) = tokio::sync::oneshot::channel();
        let client = tokio::spawn(async move {
            let start_on = move |rtt: Option<Duration>| {
                let _ = told.send(rtt);
                wanted
            };
            let _ = Early::connect_first(&target, &opts, start_on, None, None).await;
        });
        let mut accepted = Vec::new();
        while accepted.len() < wanted {
            // A bound on a hang only, should fewer connect.
            let (socket, _) = tokio::time::timeout(Duration::from_secs(30), listener.accept())
                .await
                .expect("every connection the path wants connects at once")
                .unwrap();
            accepted.push(socket);
        }
        assert!(
            matches!(measured.try_recv(), Ok(Some(_))),
            "the round trip measured"
        );
        client.abort();
    }

    /// Where TLS is known to be needed nothing opens beside the first connection, not even
    /// once its TCP connect has measured the path: the start opens once it is welcomed.
    #[tokio::test]
    async fn with_tls_known_nothing_opens_beside_the_first_handshake() {
        use tokio::io::AsyncReadExt;
        let (listener, target, mut opts) = silent_daemon().await;
        opts.connector.tls_required = true;
        let asked = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let client = {
            let asked = Arc::clone(&asked);
            tokio::spawn(async move {
                let start_on = move |_| {
                    asked.store(true, Ordering::Relaxed);
                    16
                };
                Early::connect_first(&target, &opts, start_on, None, None)
                    .await
                    .err()
            })
        };
        let (mut socket, _) = listener.accept().await.unwrap();
        // The `Hello` has come, so the round trip was told before it (on this one-thread
        // runtime the client has taken it by now); the client gets no answer.
        let mut hello = [0u8; 4];
        socket.read_exact(&mut hello).await.unwrap();
        drop(socket);
        assert!(
            client.await.unwrap().is_some(),
            "the first connection failed"
        );
        assert!(!asked.load(Ordering::Relaxed));
        drop(listener);
    }

    /// A connection a worker makes for itself (the pool grew past its early ones, or one
    /// reconnects) sends the transfer's open with its `Auth` where the daemon proves itself
    /// early, before any `Welcome`, and comes back with the transfer open on it.
    #[tokio::test]
    async fn a_connection_the_pool_adds_sends_its_open_with_auth() {
        use xfer_proto::{Frame, Welcome, WriteOpened};
        let (listener, target) = crate::session::fake_daemon().await;
        let daemon = async move {
            let (mut reader, mut writer, welcome) =
                crate::session::early_challenged(listener).await;
            // No Welcome yet: what the client sends now it sent without waiting for one.
            let auth = reader.read_frame().await.unwrap();
            let open = reader.read_frame().await.unwrap();
            writer.send(&Frame::Welcome(welcome)).await.unwrap();
            let opened = WriteOpened {
                transfer_id: 42,
                held: vec![],
            };
            writer.send(&Frame::WriteOpened(opened)).await.unwrap();
            // Held open until the client has read the answer.
            let _ = reader.read_frame().await;
            (auth, open)
        };
        let early = Early::default();
        let open: FirstFrames =
            Arc::new(|_: &Welcome| vec![Frame::List(xfer_proto::List { dir: "d".into() })]);
        let _ = early.ahead.frames.set(open);
        let connector = crate::Connector {
            token: Some(b"tok".as_slice().into()),
            ..crate::Connector::default()
        };
        let client = async {
            let connected =
                tokio::time::timeout(Duration::from_secs(30), early.connect(&target, &connector))
                    .await
                    .expect("a hang guard only");
            connected.map(|(_, id)| id)
        };
        let ((auth, open), opened) = tokio::join!(daemon, client);
        assert!(matches!(auth, Some(Frame::Auth(_))), "{auth:?}");
        assert!(
            matches!(&open, Some(Frame::List(l)) if l.dir == "d"),
            "{open:?}"
        );
        assert_eq!(opened.unwrap(), Some(42));
    }

    #[tokio::test]
    async fn transfers_opened_ahead_are_not_used_once_expired() {
        let mut early = Early::default();
        let (session, _daemon) = test_session(2, 1 << 20);
        early.open_ahead(opener(7, &Default::default()), None);
        early
            .connecting
            .get_mut()
            .spawn(open_with(session, early.ahead.take(false)));
        early.expire();
        let (_, opened) = early.take().await.expect("the connection");
        assert_eq!(opened, None);
    }
}
