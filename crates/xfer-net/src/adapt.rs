//! [`Adapt`], the `auto` compression policy as a state machine fed what a sender measures
//! (bytes, times) and the time, so that it can be tested without a clock or a network.
//!
//! Two questions, answered separately:
//! - *Does compressing pay on this link?* Asked by measurement, not by a model: the sender
//!   alternates short probes with compression off and on, compares the raw bytes per second
//!   each moved, and keeps the faster for a longer stretch (which doubles while the answer
//!   stays the same), then probes the other side again. Only end-to-end throughput counts, so
//!   a fast link (loopback), a CPU already busy, or a `--bwlimit` are all judged by what they
//!   do, and `auto` settles on off where compressing would slow the transfer.
//!
//!   Moved means delivered: a sender with a [`Delivery`] meter (the bytes its peer
//!   acknowledged) measures each phase from the moment everything queued before it has been
//!   acknowledged, and converts the wire bytes delivered since into raw bytes by the phase's
//!   own wire/raw ratio. Bytes handed to a socket would measure its buffer filling: on a 50 ms
//!   path a short probe is mostly that, and off and on look alike. A sender without a meter
//!   times the raw bytes it hands over. On a far path where the first, compressing probe
//!   shrank the data to a third and the compressor was not the limit, the off probe is left
//!   out until the decision is probed again ([`SHRINKS_FAR`]).
//! - *Does this data shrink?* While compressing, each chunk's first [`SAMPLE_LEN`] bytes are
//!   compressed at level 1 first; data that does not shrink ([`INCOMPRESSIBLE`]) goes raw and
//!   the next chunks are skipped without a sample, for a stretch that doubles up to
//!   [`MAX_SKIP`] chunks while the data stays incompressible.
//!
//! The level moves as `zstd --adapt` moves it: up while compressing keeps the CPU idle most
//! of the time (the link is the limit), down when compressing takes most of it. The CPUs are
//! the machine's, not only this process's: where the machine is busy (the receiver or other
//! work on the same host), a higher level would slow the transfer down, so it never climbs
//! past [`BUSY_MACHINE`].

use std::time::{Duration, Instant};

use crate::delivered::Delivery;

/// Bytes of a chunk compressed to tell whether it shrinks.
pub const SAMPLE_LEN: usize = 64 * 1024;
/// A chunk (or sample) whose compressed size is above this fraction of its size goes raw.
pub const INCOMPRESSIBLE: f64 = 0.9;
/// Most chunks skipped without a sample after incompressible ones.
pub const MAX_SKIP: u32 = 64;
/// How long each probe measures at least: several round trips on a 50 ms path, short enough
/// that the losing side costs little.
pub const PROBE: Duration = Duration::from_millis(400);
/// Round trips a probe measures at least, on a path longer than [`PROBE`] allows for: a
/// measurement of a few round trips is mostly their noise.
pub const PROBE_RTTS: u32 = 8;
/// Round trips the first probe measures at least before it may hand over to the second early
/// (see [`Adapt`]'s `pending`).
pub const COVER_AFTER_RTTS: u32 = 2;
/// A probe that trails the other side's rate after measuring this long, and
/// [`COVER_AFTER_RTTS`] round trips, ends there (see [`Adapt`]'s `losing`): a few chunks on
/// loopback.
pub const LOSING_AFTER: Duration = Duration::from_millis(50);
/// A path whose round trip is at least this long starts its first probe with compression on
/// (see [`Adapt::new`]).
pub const FAR_PATH: Duration = Duration::from_millis(10);
/// The longest a phase waits for what was queued before it to be delivered before it measures
/// anyway (a connection closed with bytes queued never delivers them).
pub const MAX_DRAIN: Duration = Duration::from_secs(2);
/// The first stretch a decision is kept for; it doubles while probes confirm it.
pub const FIRST_STRETCH: Duration = Duration::from_secs(2);
/// The first stretch after a decisive probe (one side at least [`DECISIVE`] times the other):
/// each probe of the losing side costs a share of [`PROBE`], which must stay small.
pub const DECISIVE_STRETCH: Duration = Duration::from_secs(8);
/// How much faster one side must be for a probe to count as decisive.
pub const DECISIVE: f64 = 1.5;
/// Share of the machine's CPU time busy (all processes) above which the level goes down and
/// below which only it may go up.
pub const BUSY_MACHINE: f64 = 0.85;
/// The longest stretch a decision is kept for before it is probed again.
pub const MAX_STRETCH: Duration = Duration::from_secs(16);
/// Compression must beat off by this factor to be chosen: noise must not switch it on.
pub const MARGIN: f64 = 1.05;
/// Highest level `auto` climbs to; above it zstd slows far faster than it shrinks.
pub const MAX_AUTO_LEVEL: i32 = 9;
/// How much a far path's first, compressing probe must shrink the data (raw bytes per wire
/// byte) for an off probe to be left out while the CPUs idle (see [`Adapt`]'s
/// `off_probe_needless`).
pub const SHRINKS_FAR: f64 = 3.0;
/// Share of the CPUs spent compressing below which the level goes up, and above which
/// (doubled) it goes down.
const IDLE_SHARE: f64 = 0.3;
/// Chunks between two level decisions.
const LEVEL_EVERY: u32 = 8;

/// What to do with the next chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// Send it as it is.
    Raw,
    /// Compress it at `level`, after a sample if `sample` says so.
    Compress {
        /// zstd level.
        level: i32,
        /// Compress a sample at level 1 first, and send raw if it does not shrink.
        sample: bool,
    },
}

/// What one chunk cost and gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    /// Bytes of the file it covers.
    pub raw: u64,
    /// Bytes on the wire (its payload).
    pub wire: u64,
    /// Time spent compressing it (sample included).
    pub compress: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Measuring with compression off or on, to compare with the other side.
    Probe { on: bool },
    /// Keeping the faster side for a stretch.
    Keep { on: bool },
}

/// A decision `auto` made, for `-v` and logs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    /// Compressing from now on.
    pub on: bool,
    /// The level used when compressing.
    pub level: i32,
    /// Raw bytes per second measured with compression off; where the off probe was left out
    /// (`off_probed` false), the wire bytes per second the path took while compressing.
    pub off_rate: f64,
    /// Whether an off probe measured `off_rate`.
    pub off_probed: bool,
    /// Raw bytes per second measured with compression on.
    pub on_rate: f64,
    /// Wire bytes per raw byte while compressing (1 when nothing shrank).
    pub ratio: f64,
}

/// The `auto` policy of one sender (a connection, or a pool of them).
#[derive(Debug)]
pub struct Adapt {
    phase: Phase,
    /// When the phase began; `None` until the first chunk, so that connecting and opening
    /// the transfer do not count against the first probe.
    since: Option<Instant>,
    raw: u64,
    wire: u64,
    compressing: Duration,
    /// Chunks of this phase that shrank.
    shrunk: u32,
    off_rate: Option<f64>,
    on_rate: Option<f64>,
    ratio: f64,
    stretch: Duration,
    level: i32,
    chunks_at_level: u32,
    skip: u32,
    backoff: u32,
    cpus: f64,
    last: Option<Decision>,
    /// The machine's CPU ticks (busy, total) when the level was last decided, and the latest.
    machine: Option<((u64, u64), (u64, u64))>,
    /// The latest reading of the sender's delivered-bytes meter, when it has one.
    delivery: Option<Delivery>,
    /// The meter's `acked` once everything queued when this phase began is delivered.
    drain_to: Option<u64>,
    /// Start of this phase's measurement of delivered bytes: when, and the meter's `acked` and
    /// the phase's raw bytes handed over then.
    window: Option<(Instant, u64, u64)>,
    /// The first probe's measurement, once it handed over to the second early: what it queued
    /// keeps the path busy until it has measured long enough, so the chunks after it would
    /// only be delivered after its measurement, and may as well be the second probe's. It
    /// ends when the second probe's window opens (the first one's bytes are all delivered).
    pending: Option<Pending>,
    /// The first probe compressed (a far path) and has not been measured again: it ran while
    /// the connections were still in slow start, so it may lose only once measured again.
    first_on_unconfirmed: bool,
    /// Raw bytes of this phase's chunks that went through the compressor: the pace
    /// [`Adapt::compress_ceiling`] measures (not the raw chunks sent beside them).
    raw_compressed: u64,
    /// A chunk is being compressed to time the compressor, the others meanwhile going raw (see
    /// [`Adapt::choose`]).
    pacing: bool,
}

/// A measurement of delivered bytes still running after its phase handed over.
#[derive(Debug, Clone, Copy)]
struct Pending {
    on: bool,
    start: Instant,
    acked: u64,
    /// Wire bytes per raw byte of the phase.
    ratio: f64,
}

impl Adapt {
    /// A policy whose first probe starts with the first chunk, off first: a transfer too short
    /// to be measured goes as it would without compression. Over a path of [`FAR_PATH`] or
    /// more (known from the meter's round trip by the first chunk), on first: there the link
    /// is likely the limit, and an off probe that trails decisively ends after a few round
    /// trips ([`Adapt`]'s `losing`), while an off probe first runs its whole length, all of it
    /// raw (the docs tree's first second through 50 ms). `cpus` is the parallelism
    /// compression may use.
    pub fn new(cpus: usize) -> Self {
        Self {
            phase: Phase::Probe { on: false },
            since: None,
            raw: 0,
            wire: 0,
            compressing: Duration::ZERO,
            shrunk: 0,
            off_rate: None,
            on_rate: None,
            ratio: 1.0,
            stretch: FIRST_STRETCH,
            level: 1,
            chunks_at_level: 0,
            skip: 0,
            backoff: 1,
            cpus: cpus.max(1) as f64,
            last: None,
            machine: None,
            delivery: None,
            drain_to: None,
            window: None,
            pending: None,
            first_on_unconfirmed: false,
            pacing: false,
            raw_compressed: 0,
        }
    }

    /// What the sender's connections have delivered so far (a [`crate::Delivered`] reading),
    /// given before [`Adapt::choose`]: from the first one on, phases are measured in
    /// delivered bytes.
    pub fn delivered(&mut self, reading: Delivery) {
        self.delivery = Some(reading);
    }

    /// The machine's CPU ticks so far, busy and in all (as `/proc/stat` counts them): how busy
    /// the machine was between two level decisions bounds the level.
    pub fn machine_ticks(&mut self, busy: u64, total: u64) {
        let now = (busy, total);
        match &mut self.machine {
            Some((_, latest)) => *latest = now,
            None => self.machine = Some((now, now)),
        }
    }

    /// Share of the machine's CPU time that was busy since the last level decision, once known.
    fn machine_busy(&self) -> Option<f64> {
        let ((busy0, total0), (busy1, total1)) = self.machine?;
        let total = total1.checked_sub(total0).filter(|&t| t > 0)?;
        Some(busy1.saturating_sub(busy0) as f64 / total as f64)
    }

    /// What to do with the next chunk at `now`.
    pub fn choose(&mut self, now: Instant) -> Choice {
        self.advance(now);
        let on = match self.phase {
            Phase::Probe { on } | Phase::Keep { on } => on,
        };
        if !on {
            return Choice::Raw;
        }
        if self.skip > 0 {
            self.skip -= 1;
            return Choice::Raw;
        }
        // On a short path, an on probe after off compresses one chunk first, the others going
        // raw meanwhile: its time tells whether the CPUs could compress as fast as off moved
        // ([`Adapt::compress_ceiling`]), and a path faster than that (loopback) then pays for
        // one compressed chunk instead of one on every connection.
        if self.times_the_compressor_first() {
            if self.pacing {
                return Choice::Raw;
            }
            self.pacing = true;
        }
        Choice::Compress {
            level: self.level,
            sample: true,
        }
    }

    /// The chunk turned out not to shrink: skip the next ones without a sample for a while.
    pub fn incompressible(&mut self) {
        self.skip = self.backoff;
        self.backoff = (self.backoff * 2).min(MAX_SKIP);
    }

    /// A chunk went out.
    pub fn sent(&mut self, sent: Sent) {
        self.raw += sent.raw;
        self.wire += sent.wire;
        self.compressing += sent.compress;
        if !sent.compress.is_zero() {
            self.pacing = false;
            self.raw_compressed += sent.raw;
        }
        if sent.wire < sent.raw {
            self.shrunk += 1;
            self.backoff = 1;
            self.chunks_at_level += 1;
        }
    }

    /// The last decision taken, once one was: whether the caller should report it is its own
    /// business (it compares with what it reported before).
    pub fn decision(&self) -> Option<Decision> {
        self.last
    }

    fn advance(&mut self, now: Instant) {
        let far = self
            .delivery
            .and_then(|d| d.rtt)
            .is_some_and(|rtt| rtt >= FAR_PATH);
        if far && self.since.is_none() && self.phase == (Phase::Probe { on: false }) {
            self.phase = Phase::Probe { on: true };
            self.first_on_unconfirmed = true;
        }
        let since = *self.since.get_or_insert(now);
        let elapsed = now.saturating_duration_since(since);
        let on = matches!(
            self.phase,
            Phase::Probe { on: true } | Phase::Keep { on: true }
        );
        if on {
            self.adjust_level(elapsed);
        }
        self.watch_delivery(now, elapsed);
        let ceiling = self.compress_ceiling(now);
        let measured = self.measuring(now, since);
        let covered = measured.is_some_and(|m| self.queued_covers(m));
        let ends = match self.phase {
            Phase::Probe { .. } => {
                covered
                    || measured
                        .is_some_and(|m| m >= self.probe_length() || self.losing(now, since, m))
            }
            Phase::Keep { .. } => elapsed >= self.stretch,
        };
        // A phase that moved nothing measured nothing: it goes on until it has.
        if (!ends && ceiling.is_none()) || self.raw == 0 {
            return;
        }
        let ratio = self.wire as f64 / self.raw as f64;
        if let Some(on_rate) = self.off_probe_needless(now, since, ratio) {
            self.ratio = ratio;
            // Measured early, maybe in slow start: an off probe that beats it later has it
            // measured again before it counts (`first_on_unconfirmed`).
            self.on_rate = Some(on_rate);
            self.stretch = DECISIVE_STRETCH;
            self.last = Some(Decision {
                on: true,
                level: self.level,
                off_rate: on_rate * ratio,
                off_probed: false,
                on_rate,
                ratio,
            });
            self.begin(Phase::Keep { on: true }, now);
            return;
        }
        if let (true, None, Some((start, acked, _))) = (covered, ceiling, self.window) {
            self.pending = Some(Pending {
                on,
                start,
                acked,
                ratio,
            });
            self.begin(Phase::Probe { on: !on }, now);
            return;
        }
        let rate = match (self.rate(now, since, ratio), ceiling) {
            (Some(rate), Some(ceiling)) => Some(rate.min(ceiling)),
            (rate, ceiling) => rate.or(ceiling),
        };
        if on {
            self.ratio = ratio;
            self.on_rate = rate.or(self.on_rate);
        } else {
            self.off_rate = rate.or(self.off_rate);
        }
        if ceiling.is_some() && self.off_rate.is_none() {
            // Ended on off's rate so far: it stands for the whole measurement.
            self.off_rate = self.off_rate_so_far(now);
            self.pending = None;
        }
        self.phase = match (self.phase, self.off_rate, self.on_rate) {
            (Phase::Keep { on }, _, _) => Phase::Probe { on: !on },
            // A first on probe that shrank the data but lost is measured again, the
            // connections now past their slow start, before it counts.
            (Phase::Probe { .. }, Some(off_rate), Some(on_rate))
                if self.first_on_unconfirmed
                    && on_rate <= off_rate * MARGIN
                    && self.ratio * MARGIN < 1.0 =>
            {
                self.first_on_unconfirmed = false;
                self.on_rate = None;
                Phase::Probe { on: true }
            }
            (Phase::Probe { .. }, Some(off_rate), Some(on_rate)) => {
                self.first_on_unconfirmed = false;
                // Where nothing shrank, compressing cannot have been faster: what looked so
                // was noise (or the first probe's slow start).
                let keep = on_rate > off_rate * MARGIN && self.ratio * MARGIN < 1.0;
                let decisive = on_rate.max(off_rate) >= on_rate.min(off_rate) * DECISIVE;
                if self.last.is_some_and(|d| d.on == keep) {
                    self.stretch = (self.stretch * 2).min(MAX_STRETCH);
                } else if decisive {
                    self.stretch = DECISIVE_STRETCH;
                } else {
                    self.stretch = FIRST_STRETCH;
                }
                self.last = Some(Decision {
                    on: keep,
                    level: self.level,
                    off_rate,
                    off_probed: true,
                    on_rate,
                    ratio: self.ratio,
                });
                Phase::Keep { on: keep }
            }
            (Phase::Probe { on }, _, _) => Phase::Probe { on: !on },
        };
        self.begin(self.phase, now);
    }

    /// Whether this probe times the compressor on one chunk before compressing on every
    /// connection: an on probe over a short path (below [`FAR_PATH`]; a far one is limited by
    /// its link) after off was measured (or is being, see [`Adapt::off_rate_so_far`]), nothing
    /// compressed yet. The raw chunks sent meanwhile count in its measurement: a few, against a
    /// probe's length.
    fn times_the_compressor_first(&self) -> bool {
        let near = self
            .delivery
            .and_then(|d| d.rtt)
            .is_some_and(|rtt| rtt < FAR_PATH);
        let off = self.off_rate.is_some() || self.pending.is_some_and(|p| !p.on);
        near && self.phase == (Phase::Probe { on: true }) && off && self.compressing.is_zero()
    }

    /// Off's rate, or while its measurement is still pending (what it queued not all delivered
    /// yet), the rate its bytes were delivered at so far.
    fn off_rate_so_far(&self, now: Instant) -> Option<f64> {
        self.off_rate.or_else(|| {
            let pending = self.pending.filter(|p| !p.on)?;
            let reading = self.delivery?;
            let time = now.saturating_duration_since(pending.start).as_secs_f64();
            let delivered = reading.acked.saturating_sub(pending.acked) as f64;
            (time > 0.0 && delivered > 0.0).then(|| delivered / pending.ratio / time)
        })
    }

    /// Starts `phase` at `now`.
    fn begin(&mut self, phase: Phase, now: Instant) {
        self.pacing = false;
        self.raw_compressed = 0;
        self.phase = phase;
        self.since = Some(now);
        self.raw = 0;
        self.wire = 0;
        self.compressing = Duration::ZERO;
        self.shrunk = 0;
        self.chunks_at_level = 0;
        // What is queued now belongs to the phase that ended: the next one measures after it.
        self.drain_to = self.delivery.map(|d| d.acked + d.queued);
        self.window = None;
    }

    /// The first probe's rate, when it compressed over a far path and already shows that an
    /// off probe cannot win: the data shrank to a third or less ([`SHRINKS_FAR`]), and the
    /// CPUs could have compressed [`DECISIVE`] times what was delivered, so the compressor was
    /// not what limited it. Sent raw, the same path would have to carry three times the wire
    /// bytes it took. The off probe is then left out: measuring it would queue a second's worth
    /// of raw data on a deep path (50 MB of the docs tree through 50 ms) before its answer.
    /// The decision is probed again, off, after [`DECISIVE_STRETCH`], as any other is.
    fn off_probe_needless(&self, now: Instant, since: Instant, ratio: f64) -> Option<f64> {
        let first = self.off_rate.is_none() && self.on_rate.is_none() && self.pending.is_none();
        let far = self
            .delivery
            .and_then(|d| d.rtt)
            .is_some_and(|rtt| rtt >= FAR_PATH);
        let on_first = self.phase == (Phase::Probe { on: true }) && first && far;
        if !on_first || ratio * SHRINKS_FAR > 1.0 || self.compressing.is_zero() {
            return None;
        }
        let ceiling = self.raw as f64 / self.compressing.as_secs_f64() * self.cpus;
        self.rate(now, since, ratio)
            .filter(|&rate| ceiling >= rate * DECISIVE)
    }

    /// Opens this phase's measurement of delivered bytes once what was queued before it has
    /// been delivered (or it waited [`MAX_DRAIN`] for that).
    fn watch_delivery(&mut self, now: Instant, elapsed: Duration) {
        let Some(reading) = self.delivery else { return };
        let drain_to = *self.drain_to.get_or_insert(reading.acked + reading.queued);
        if self.window.is_none() && (reading.acked >= drain_to || elapsed >= MAX_DRAIN) {
            self.window = Some((now, reading.acked, self.raw));
            if let Some(pending) = self.pending.take() {
                let time = now.saturating_duration_since(pending.start).as_secs_f64();
                let delivered = reading.acked.saturating_sub(pending.acked) as f64;
                let rate = (time > 0.0).then(|| delivered / pending.ratio / time);
                if pending.on {
                    self.on_rate = rate.or(self.on_rate);
                    self.ratio = pending.ratio;
                } else {
                    self.off_rate = rate.or(self.off_rate);
                }
            }
        }
    }

    /// Whether the first probe, having measured for `measured`, already queued enough to keep
    /// the path busy until it has measured a probe's length, at the pace delivered so far:
    /// then it hands over to the second probe early. On a long path with deep socket buffers
    /// the first probe hands over seconds' worth at once; without this, it would go on adding
    /// to them for its whole length, and the transfer would carry all of that as it chose first.
    fn queued_covers(&self, measured: Duration) -> bool {
        let first = self.off_rate.is_none() && self.on_rate.is_none() && self.pending.is_none();
        let (Some(reading), Some((_, acked, _))) = (self.delivery, self.window) else {
            return false;
        };
        let Some(rtt) = reading.rtt else { return false };
        let delivered = reading.acked.saturating_sub(acked) as f64;
        if !first || measured < rtt * COVER_AFTER_RTTS || delivered == 0.0 {
            return false;
        }
        let pace = delivered / measured.as_secs_f64();
        let left = self.probe_length().saturating_sub(measured).as_secs_f64();
        reading.queued as f64 >= pace * left
    }

    /// Whether this probe, having measured for `measured` ([`LOSING_AFTER`] and a few round
    /// trips at least), already trails the other side: it has its answer and ends. An on probe
    /// ends once behind off by more than noise ([`MARGIN`]): it cannot go on to win by that
    /// margin, and on a path faster than the compressor (loopback) a whole probe of it cost a
    /// fifth of a short file's time. An off probe ends only once [`DECISIVE`]ly behind, so
    /// that noise does not keep compression on.
    fn losing(&self, now: Instant, since: Instant, measured: Duration) -> bool {
        let Phase::Probe { on } = self.phase else {
            return false;
        };
        let (other, behind) = match on {
            true => (self.off_rate, MARGIN),
            false => (self.on_rate, DECISIVE),
        };
        let Some(other) = other else { return false };
        let rtt = self.delivery.and_then(|d| d.rtt).unwrap_or_default();
        if measured < LOSING_AFTER.max(rtt * COVER_AFTER_RTTS) || self.raw == 0 {
            return false;
        }
        let ratio = self.wire as f64 / self.raw as f64;
        self.rate(now, since, ratio)
            .is_some_and(|rate| rate * behind < other)
    }

    /// How long this phase has measured: since its bytes began to be delivered, with a meter;
    /// since it began, without. `None`: not yet.
    fn measuring(&self, now: Instant, since: Instant) -> Option<Duration> {
        match (self.delivery, self.window) {
            (None, _) => Some(now.saturating_duration_since(since)),
            (Some(_), Some((start, _, _))) => Some(now.saturating_duration_since(start)),
            (Some(_), None) => None,
        }
    }

    /// How long a probe measures: [`PROBE`], or [`PROBE_RTTS`] round trips of a longer path.
    fn probe_length(&self) -> Duration {
        let rtt = self.delivery.and_then(|d| d.rtt).unwrap_or_default();
        PROBE.max(rtt * PROBE_RTTS)
    }

    /// Raw bytes per second this phase moved. With a meter: over its window, the wire bytes
    /// delivered as raw bytes at the phase's `ratio` (wire per raw), or the raw bytes handed
    /// over if fewer. Delivered bytes can run ahead of the sender for a while (buffers filled
    /// before the window drain at the link's pace, even when compressing limits the sender),
    /// handed ones only while the buffers fill (when the link is the limit): the lower is the
    /// rate the sender keeps. Without a meter: the raw bytes handed over in the whole phase.
    /// `None` when it has not measured for any time.
    fn rate(&self, now: Instant, since: Instant, ratio: f64) -> Option<f64> {
        let (start, bytes) = match (self.delivery, self.window) {
            (None, _) => (since, self.raw as f64),
            (Some(reading), Some((start, acked, raw))) => {
                let delivered = reading.acked.saturating_sub(acked) as f64;
                let handed = self.raw.saturating_sub(raw) as f64;
                (
                    start,
                    (delivered / ratio.max(f64::MIN_POSITIVE)).min(handed),
                )
            }
            (Some(_), None) => return None,
        };
        let time = now.saturating_duration_since(start).as_secs_f64();
        (time > 0.0).then(|| bytes / time)
    }

    /// During a probe with compression on, the most raw bytes per second all the CPUs could
    /// compress at the rate measured so far, once that already falls short of the off side:
    /// the probe has its answer and ends, so that a fast link (loopback) pays for a few
    /// chunks, not for a whole probe.
    fn compress_ceiling(&self, now: Instant) -> Option<f64> {
        let off_rate = self.off_rate_so_far(now)?;
        if self.phase != (Phase::Probe { on: true })
            || self.shrunk < 1
            || self.compressing.is_zero()
        {
            return None;
        }
        let ceiling = self.raw_compressed as f64 / self.compressing.as_secs_f64() * self.cpus;
        (ceiling < off_rate * MARGIN).then_some(ceiling)
    }

    fn adjust_level(&mut self, elapsed: Duration) {
        if self.chunks_at_level < LEVEL_EVERY || elapsed.is_zero() {
            return;
        }
        let share = self.compressing.as_secs_f64() / (elapsed.as_secs_f64() * self.cpus);
        let busy = self.machine_busy().unwrap_or(0.0);
        if share < IDLE_SHARE && busy < BUSY_MACHINE && self.level < MAX_AUTO_LEVEL {
            self.level += 1;
        } else if (share > 2.0 * IDLE_SHARE || busy > BUSY_MACHINE) && self.level > 1 {
            self.level -= 1;
        } else {
            return;
        }
        self.chunks_at_level = 0;
        if let Some((start, latest)) = &mut self.machine {
            *start = *latest;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// Runs `adapt` for `time` sending 1 MiB chunks at `off` raw bytes per second uncompressed
    /// and `on` compressed (shrinking to `ratio`), compression costing `cost` per chunk.
    fn run(adapt: &mut Adapt, start: Instant, time: Duration, off: f64, on: f64) -> Instant {
        let mut now = start;
        while now < start + time {
            let choice = adapt.choose(now);
            let (rate, wire) = match choice {
                Choice::Raw => (off, MIB),
                Choice::Compress { .. } => (on, MIB / 4),
            };
            now += Duration::from_secs_f64(MIB as f64 / rate);
            adapt.sent(Sent {
                raw: MIB,
                wire,
                compress: Duration::from_millis(1),
            });
        }
        now
    }

    /// A sender over a path: chunks of 1 MiB are compressed (one CPU at `cpu` raw bytes per
    /// second, shrinking to `shrink`), then handed to socket buffers holding `buffer` bytes,
    /// which the path delivers at `link` wire bytes per second after `rtt`'s worth of
    /// acknowledgement delay. `metered`: the sender reads what was delivered before each chunk.
    #[derive(Clone)]
    struct Path {
        link: f64,
        buffer: f64,
        cpu: f64,
        shrink: f64,
        rtt: Duration,
        metered: bool,
        now: Instant,
        /// Wire bytes handed to the sockets, and delivered (acknowledged).
        handed: f64,
        acked: f64,
        /// Raw bytes sent compressed.
        compressed: f64,
    }

    impl Path {
        fn new(link: f64, buffer: f64, cpu: f64, shrink: f64, metered: bool) -> Self {
            Self {
                link,
                buffer,
                cpu,
                shrink,
                rtt: Duration::from_millis(50),
                metered,
                now: Instant::now(),
                handed: 0.0,
                acked: 0.0,
                compressed: 0.0,
            }
        }

        fn wait(&mut self, time: f64) {
            self.now += Duration::from_secs_f64(time);
            self.acked = (self.acked + self.link * time).min(self.handed);
        }

        /// What `adapt` chooses for the first chunk over this path.
        fn first_choice(&mut self, adapt: &mut Adapt) -> Choice {
            if self.metered {
                adapt.delivered(Delivery {
                    rtt: Some(self.rtt),
                    ..Delivery::default()
                });
            }
            adapt.choose(self.now)
        }

        /// Sends chunks until `adapt` has taken `decisions` decisions, or for `time`.
        fn run(&mut self, adapt: &mut Adapt, time: Duration) {
            let end = self.now + time;
            while self.now < end {
                if self.metered {
                    adapt.delivered(Delivery {
                        acked: self.acked as u64,
                        queued: (self.handed - self.acked) as u64,
                        rtt: Some(self.rtt),
                        ..Delivery::default()
                    });
                }
                let (wire, compress) = match adapt.choose(self.now) {
                    Choice::Raw => (MIB as f64, 0.0),
                    Choice::Compress { .. } => {
                        self.compressed += MIB as f64;
                        (MIB as f64 * self.shrink, MIB as f64 / self.cpu)
                    }
                };
                self.wait(compress);
                let room = self.buffer - (self.handed - self.acked);
                if wire > room {
                    self.wait((wire - room) / self.link);
                }
                self.handed += wire;
                adapt.sent(Sent {
                    raw: MIB,
                    wire: wire as u64,
                    compress: Duration::from_secs_f64(compress),
                });
            }
        }
    }

    /// The first decision `auto` takes over `path`.
    fn first_decision(path: &mut Path) -> Decision {
        let mut adapt = Adapt::new(1);
        while adapt.decision().is_none() {
            path.run(&mut adapt, Duration::from_millis(100));
        }
        adapt.decision().unwrap()
    }

    #[test]
    fn deep_socket_buffers_do_not_hide_a_slow_link() {
        // 60 MB/s of link, 64 MiB of socket buffers (16 connections of 4 MiB), a CPU that
        // compresses 150 MB/s to a quarter: compressed, 150 MB/s is delivered, raw 60 MB/s.
        let decision = first_decision(&mut Path::new(60e6, 64.0 * MIB as f64, 150e6, 0.25, true));
        assert!(decision.on, "{decision:?}");
        let within = |rate: f64, truth: f64| (rate / truth - 1.0).abs() < 0.1;
        assert!(within(decision.off_rate, 60e6), "{decision:?}");
        assert!(within(decision.on_rate, 150e6), "{decision:?}");
    }

    #[test]
    fn the_first_probe_hands_over_once_its_queue_covers_its_measurement() {
        let buffer = 64.0 * MIB as f64;
        let mut path = Path::new(60e6, buffer, 150e6, 0.25, true);
        let mut adapt = Adapt::new(1);
        let mut raw_first = 0.0;
        while adapt.decision().is_none() {
            if let Choice::Raw = adapt.choose(path.now) {
                raw_first = path.handed;
            }
            path.run(&mut adapt, Duration::from_millis(10));
        }
        let decision = adapt.decision().unwrap();
        assert!(decision.on, "{decision:?}");
        assert!((decision.off_rate / 60e6 - 1.0).abs() < 0.1, "{decision:?}");
        // The buffers' worth and two round trips of the link, not the whole probe's length.
        assert!(
            raw_first <= buffer + 60e6 * 0.15,
            "{raw_first} raw bytes first"
        );
    }

    #[test]
    fn a_far_path_probes_compression_first_and_sends_less_raw() {
        // 60 MB/s of link 50 ms away, a CPU compressing 150 MB/s to a quarter.
        let mut path = Path::new(60e6, 16.0 * MIB as f64, 150e6, 0.25, true);
        let mut adapt = Adapt::new(1);
        let first = path.clone().first_choice(&mut adapt);
        assert!(matches!(first, Choice::Compress { .. }), "{first:?}");
        while adapt.decision().is_none() {
            path.run(&mut adapt, Duration::from_millis(10));
        }
        let decision = adapt.decision().unwrap();
        assert!(decision.on, "{decision:?}");
        assert!((decision.ratio - 0.25).abs() < 0.01, "{decision:?}");
        // Raw: the off probe's few round trips, not a whole probe first.
        let raw = path.handed - path.compressed * 0.25;
        assert!(raw < 60e6 * PROBE.as_secs_f64(), "{} MB raw", raw / 1e6);

        // Loopback-like: off first, as ever.
        let mut near = Path::new(500e6, 4.0 * MIB as f64, 400e6, 0.25, true);
        near.rtt = Duration::from_micros(50);
        assert_eq!(near.first_choice(&mut Adapt::new(1)), Choice::Raw);
    }

    #[test]
    fn a_far_path_whose_compressor_idles_keeps_compressing_without_an_off_probe() {
        // 60 MB/s of link 50 ms away; two CPUs compressing 1 GB/s each to a quarter, idle
        // most of the time: the link is the limit, and raw could move a quarter as much.
        let mut path = Path::new(60e6, 16.0 * MIB as f64, 1e9, 0.25, true);
        let mut adapt = Adapt::new(2);
        while adapt.decision().is_none() {
            path.run(&mut adapt, Duration::from_millis(10));
        }
        let decision = adapt.decision().unwrap();
        assert!(decision.on, "{decision:?}");
        assert_eq!(
            path.handed,
            path.compressed * 0.25,
            "nothing went raw: {decision:?}"
        );
        assert_eq!(adapt.stretch, DECISIVE_STRETCH);
        // The decision is probed again with compression off after its stretch, as any other.
        let mut raw = false;
        let end = path.now + DECISIVE_STRETCH * 2;
        while path.now < end && !raw {
            raw = adapt.choose(path.now) == Choice::Raw;
            path.run(&mut adapt, Duration::from_millis(10));
        }
        assert!(raw, "an off probe follows the stretch");

        // Data that shrinks by less than a third still probes off first.
        let mut path = Path::new(60e6, 16.0 * MIB as f64, 1e9, 0.5, true);
        let mut adapt = Adapt::new(2);
        while adapt.decision().is_none() {
            path.run(&mut adapt, Duration::from_millis(10));
        }
        assert!(path.handed > path.compressed * 0.5, "an off probe ran");
    }

    #[test]
    fn a_first_on_probe_that_lost_is_measured_again_before_it_counts() {
        let start = Instant::now();
        let mut adapt = Adapt::new(2);
        let far = Delivery {
            rtt: Some(Duration::from_millis(50)),
            ..Delivery::default()
        };
        let mut now = start;
        let mut on_probes = 0;
        let mut was_on = false;
        // No meter reading after the first (the round trip): each side's rate is what it hands over. The
        // first on probe (slow start) moves 30 MB/s, off 50 MB/s, every later on 200 MB/s.
        adapt.delivered(far);
        while adapt.decision().is_none() {
            let choice = adapt.choose(now);
            adapt.delivery = None;
            let on = matches!(choice, Choice::Compress { .. });
            on_probes += usize::from(on && !was_on);
            was_on = on;
            let rate = match (on, on_probes) {
                (false, _) => 50e6,
                (true, 1) => 30e6,
                (true, _) => 200e6,
            };
            now += Duration::from_secs_f64(MIB as f64 / rate);
            let wire = if on { MIB / 4 } else { MIB };
            adapt.sent(Sent {
                raw: MIB,
                wire,
                compress: Duration::ZERO,
            });
        }
        let decision = adapt.decision().unwrap();
        assert_eq!(on_probes, 2, "{decision:?}");
        assert!(decision.on, "{decision:?}");
    }

    #[test]
    fn rates_handed_to_deep_buffers_are_what_misled_it() {
        // The same path timed by what is handed to the sockets: the off probe fills the
        // buffers at memory speed and looks faster than compressing can be.
        let decision = first_decision(&mut Path::new(60e6, 64.0 * MIB as f64, 150e6, 0.25, false));
        assert!(!decision.on, "{decision:?}");
        assert!(decision.off_rate > 150e6, "{decision:?}");
    }

    #[test]
    fn a_fast_link_with_deep_buffers_turns_compression_off() {
        // Loopback-like: 2 GB/s of link, a CPU compressing 400 MB/s.
        let decision = first_decision(&mut Path::new(2e9, 16.0 * MIB as f64, 400e6, 0.25, true));
        assert!(!decision.on, "{decision:?}");
    }

    #[test]
    fn a_loopback_path_turns_compression_off_after_a_share_of_a_probe() {
        // Loopback-like: the receiver takes 500 MB/s, round trips of 50 µs, shallow buffers;
        // each of two CPUs compresses 400 MB/s to a quarter. The two could compress faster than
        // the path moves, so only what the on probe measures ends it: the sender compressing on
        // one CPU moves 400 MB/s, less than off.
        let mut path = Path::new(500e6, 4.0 * MIB as f64, 400e6, 0.25, true);
        path.rtt = Duration::from_micros(50);
        let mut adapt = Adapt::new(2);
        while adapt.decision().is_none() {
            path.run(&mut adapt, Duration::from_millis(1));
        }
        let decision = adapt.decision().unwrap();
        assert!(!decision.on, "{decision:?}");
        // A whole probe would have compressed 160 MB of the file.
        let whole_probe = 400e6 * PROBE.as_secs_f64();
        assert!(
            path.compressed < whole_probe / 2.0,
            "{} MB compressed",
            path.compressed / 1e6
        );
    }

    /// On loopback the compressor is timed on one chunk before every connection compresses:
    /// the others go raw meanwhile, and once that chunk shows the CPUs cannot compress as fast
    /// as off moved, the probe ends.
    #[test]
    fn a_short_path_times_the_compressor_on_one_chunk_first() {
        let mut path = Path::new(1.2e9, 4.0 * MIB as f64, 400e6, 0.25, true);
        path.rtt = Duration::from_micros(50);
        let mut adapt = Adapt::new(2);
        while adapt.phase != (Phase::Probe { on: true }) {
            path.run(&mut adapt, Duration::from_millis(1));
        }
        // The on probe as it starts, nothing compressed yet.
        adapt.begin(Phase::Probe { on: true }, path.now);
        // Four connections ask at once: one compresses, three go raw.
        let choices: Vec<Choice> = (0..4).map(|_| adapt.choose(path.now)).collect();
        assert!(matches!(choices[0], Choice::Compress { .. }), "{choices:?}");
        assert!(
            choices[1..].iter().all(|c| *c == Choice::Raw),
            "{choices:?}"
        );
        // The raw chunks go first; the compressed one took 2.5 ms for 1 MiB: two CPUs,
        // 840 MB/s at most, below the 1.2 GB/s off moved (the raw chunks do not count in that
        // pace). Once off's measurement is in, the probe ends on it.
        for _ in 1..4 {
            adapt.sent(Sent {
                raw: MIB,
                wire: MIB,
                compress: Duration::ZERO,
            });
        }
        adapt.sent(Sent {
            raw: MIB,
            wire: MIB / 4,
            compress: Duration::from_micros(2500),
        });
        let compressed_before = path.compressed;
        while adapt.decision().is_none() {
            path.run(&mut adapt, Duration::from_millis(1));
        }
        assert!(!adapt.decision().unwrap().on);
        let more = path.compressed - compressed_before;
        assert!(more <= MIB as f64, "{more} more bytes compressed");
        // A far path compresses on every connection at once.
        let mut far = Adapt::new(2);
        far.off_rate = Some(60e6);
        far.phase = Phase::Probe { on: true };
        far.delivered(Delivery {
            rtt: Some(Duration::from_millis(50)),
            ..Delivery::default()
        });
        assert!(!far.times_the_compressor_first());
    }

    #[test]
    fn an_off_probe_far_behind_compressing_ends_early() {
        // 60 MB/s of link; compressed to a quarter at 400 MB/s, 240 MB/s of raw bytes arrive.
        let mut path = Path::new(60e6, 16.0 * MIB as f64, 400e6, 0.25, true);
        let mut adapt = Adapt::new(1);
        while adapt.decision().is_none() {
            path.run(&mut adapt, Duration::from_millis(10));
        }
        assert!(adapt.decision().unwrap().on);
        // The decision is probed again with compression off: how long does that measure?
        let mut opened = None;
        loop {
            path.run(&mut adapt, Duration::from_millis(1));
            match (adapt.phase, adapt.window) {
                (Phase::Probe { on: false }, Some((start, ..))) => {
                    opened.get_or_insert(start);
                }
                (Phase::Keep { .. }, _) if opened.is_some() => break,
                _ => {}
            }
        }
        let measured = path.now - opened.unwrap();
        assert!(measured < PROBE / 2, "measured off for {measured:?}");
        assert!(adapt.decision().unwrap().on);
    }

    #[test]
    fn incompressible_data_measured_delivered_stays_off() {
        // Nothing shrinks: both sides deliver the link's rate, and off is kept.
        let mut path = Path::new(60e6, 32.0 * MIB as f64, 150e6, 1.0, true);
        let mut adapt = Adapt::new(1);
        path.run(&mut adapt, Duration::from_secs(20));
        let decision = adapt.decision().unwrap();
        assert!(!decision.on, "{decision:?}");
    }

    #[test]
    fn data_that_does_not_shrink_stays_off_however_the_probes_measure() {
        let start = Instant::now();
        let mut adapt = Adapt::new(2);
        let mut now = start;
        // Off measures 50 MB/s, on 80 MB/s (a first probe in slow start), nothing shrinks.
        while adapt.decision().is_none() {
            let rate = match adapt.choose(now) {
                Choice::Raw => 50e6,
                Choice::Compress { .. } => 80e6,
            };
            now += Duration::from_secs_f64(MIB as f64 / rate);
            adapt.sent(Sent {
                raw: MIB,
                wire: MIB,
                compress: Duration::ZERO,
            });
        }
        let decision = adapt.decision().unwrap();
        assert!(
            decision.on_rate > decision.off_rate * DECISIVE,
            "{decision:?}"
        );
        assert!(!decision.on, "{decision:?}");
    }

    #[test]
    fn a_probe_measures_only_after_what_was_queued_before_it_is_delivered() {
        // A receiver that is the limit: it takes 100 MB/s of raw bytes, and 100 MB/s of raw
        // bytes when compressed too (2.5 MB of wire per 100 ms: decompressing costs it). No
        // round trip known: the first probe runs its whole length.
        let start = Instant::now();
        let mut adapt = Adapt::new(1);
        let mut reading = Delivery::default();
        let mut now = start;
        // The off probe: 20 MB handed and 10 MB delivered per 100 ms; 40 MB queued at its end.
        for step in 1..=4 {
            adapt.delivered(reading);
            assert_eq!(adapt.choose(now), Choice::Raw);
            adapt.sent(Sent {
                raw: 20_000_000,
                wire: 20_000_000,
                compress: Duration::ZERO,
            });
            now += Duration::from_millis(100);
            reading.acked += 10_000_000;
            reading.queued = step * 10_000_000;
        }
        adapt.delivered(reading);
        assert!(matches!(adapt.choose(now), Choice::Compress { .. }));
        assert_eq!(adapt.off_rate, Some(100e6));
        // The on probe hands 40 MB (10 MB of wire) per 100 ms. The 40 MB of raw bytes queued
        // are delivered first, then compressed ones at 2.5 MB per 100 ms.
        let mut queued_raw = reading.queued;
        for _ in 0..20 {
            adapt.sent(Sent {
                raw: 40_000_000,
                wire: 10_000_000,
                compress: Duration::from_millis(1),
            });
            now += Duration::from_millis(100);
            let delivered = if queued_raw > 0 {
                queued_raw -= 10_000_000;
                10_000_000
            } else {
                2_500_000
            };
            reading.acked += delivered;
            reading.queued += 10_000_000 - delivered;
            adapt.delivered(reading);
            adapt.choose(now);
        }
        let decision = adapt.decision().expect("decided");
        // Counted from the probe's start, the raw bytes drained would have counted four times
        // over: 400 MB/s, and compression on.
        assert_eq!(decision.on_rate, 100e6);
        assert!(!decision.on, "{decision:?}");
    }

    #[test]
    fn a_long_path_probes_for_several_round_trips() {
        let mut adapt = Adapt::new(1);
        let start = Instant::now();
        let mut reading = Delivery {
            acked: 0,
            queued: 0,
            rtt: Some(Duration::from_millis(200)),
            ..Delivery::default()
        };
        let mut now = start;
        while adapt.off_rate.is_none() {
            adapt.delivered(reading);
            adapt.choose(now);
            adapt.sent(Sent {
                raw: MIB,
                wire: MIB,
                compress: Duration::ZERO,
            });
            now += Duration::from_millis(10);
            reading.acked += MIB;
        }
        assert!(now - start >= Duration::from_millis(200) * PROBE_RTTS);
    }

    #[test]
    fn a_drain_that_never_ends_does_not_hold_the_probe() {
        let mut adapt = Adapt::new(1);
        let start = Instant::now();
        // Bytes queued on a connection that then went away are never acknowledged.
        let reading = Delivery {
            acked: 0,
            queued: 100 * MIB,
            ..Delivery::default()
        };
        let mut now = start;
        while adapt.off_rate.is_none() && now < start + Duration::from_secs(10) {
            adapt.delivered(reading);
            adapt.choose(now);
            adapt.sent(Sent {
                raw: MIB,
                wire: MIB,
                compress: Duration::ZERO,
            });
            now += Duration::from_millis(10);
        }
        assert!(now - start <= MAX_DRAIN + PROBE + Duration::from_millis(20));
    }

    #[test]
    fn a_slow_link_keeps_compression_on() {
        let start = Instant::now();
        let mut adapt = Adapt::new(2);
        run(&mut adapt, start, Duration::from_secs(10), 60e6, 200e6);
        let d = adapt.decision().expect("decided");
        assert!(d.on, "{d:?}");
        assert!(d.ratio < 0.3);
        assert!(adapt.level > 1, "the idle CPU raises the level");
    }

    #[test]
    fn a_fast_link_turns_compression_off() {
        let start = Instant::now();
        let mut adapt = Adapt::new(2);
        run(&mut adapt, start, Duration::from_secs(10), 2e9, 500e6);
        assert!(!adapt.decision().expect("decided").on);
    }

    #[test]
    fn a_probe_ends_early_when_the_cpus_cannot_compress_as_fast_as_off_moves() {
        let start = Instant::now();
        let mut adapt = Adapt::new(2);
        let mut now = start;
        let mut compressed = 0;
        // Off moves 2 GB/s; one CPU compresses 400 MB/s, two at most 800 MB/s.
        while adapt.decision().is_none() {
            let wire = match adapt.choose(now) {
                Choice::Raw => {
                    now += Duration::from_secs_f64(MIB as f64 / 2e9);
                    MIB
                }
                Choice::Compress { .. } => {
                    compressed += 1;
                    now += Duration::from_secs_f64(MIB as f64 / 400e6);
                    MIB / 4
                }
            };
            adapt.sent(Sent {
                raw: MIB,
                wire,
                compress: Duration::from_secs_f64(MIB as f64 / 400e6),
            });
        }
        assert!(!adapt.decision().unwrap().on);
        assert_eq!(compressed, 1, "the on probe ends after one chunk");
    }

    #[test]
    fn equal_rates_stay_off() {
        let start = Instant::now();
        let mut adapt = Adapt::new(2);
        run(&mut adapt, start, Duration::from_secs(10), 100e6, 102e6);
        assert!(!adapt.decision().expect("decided").on);
    }

    #[test]
    fn a_decision_is_probed_again_when_the_link_changes() {
        let start = Instant::now();
        let mut adapt = Adapt::new(2);
        let now = run(&mut adapt, start, Duration::from_secs(5), 2e9, 500e6);
        assert!(!adapt.decision().unwrap().on);
        run(&mut adapt, now, Duration::from_secs(40), 50e6, 200e6);
        assert!(adapt.decision().unwrap().on);
    }

    #[test]
    fn incompressible_data_is_skipped_for_longer_and_longer() {
        let start = Instant::now();
        let mut adapt = Adapt::new(2);
        adapt.phase = Phase::Keep { on: true };
        let mut samples = 0;
        for _ in 0..200 {
            if let Choice::Compress { sample: true, .. } = adapt.choose(start) {
                samples += 1;
                adapt.incompressible();
            }
            adapt.sent(Sent {
                raw: MIB,
                wire: MIB,
                compress: Duration::ZERO,
            });
        }
        // 1, 2, 4 … 64 chunks skipped after each failed sample, then 64 each time.
        assert!(samples <= 9, "{samples} samples of 200 chunks");
        assert!(samples >= 3);
    }

    #[test]
    fn a_busy_machine_keeps_the_level_down() {
        let start = Instant::now();
        let mut adapt = Adapt::new(2);
        adapt.phase = Phase::Keep { on: true };
        adapt.stretch = MAX_STRETCH;
        adapt.level = 3;
        let mut now = start;
        let mut ticks = 0;
        for _ in 0..64 {
            adapt.choose(now);
            now += Duration::from_millis(10);
            // This process compresses little; others keep the machine busy.
            ticks += 10;
            adapt.machine_ticks(ticks * 95 / 100, ticks);
            adapt.sent(Sent {
                raw: MIB,
                wire: MIB / 3,
                compress: Duration::from_millis(1),
            });
        }
        assert_eq!(adapt.level, 1);
    }

    #[test]
    fn a_decisive_probe_is_kept_longer() {
        let start = Instant::now();
        let mut adapt = Adapt::new(2);
        run(&mut adapt, start, Duration::from_secs(2), 30e6, 120e6);
        assert!(adapt.decision().expect("decided").on);
        assert_eq!(adapt.stretch, DECISIVE_STRETCH);
    }

    #[test]
    fn a_busy_cpu_lowers_the_level() {
        let start = Instant::now();
        let mut adapt = Adapt::new(1);
        adapt.phase = Phase::Keep { on: true };
        adapt.level = 5;
        let mut now = start;
        for _ in 0..64 {
            adapt.choose(now);
            now += Duration::from_millis(10);
            adapt.sent(Sent {
                raw: MIB,
                wire: MIB / 3,
                compress: Duration::from_millis(9),
            });
        }
        assert!(adapt.level < 5);
    }
}
