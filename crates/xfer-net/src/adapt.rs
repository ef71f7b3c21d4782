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

/// Bytes of a chunk compressed to tell whether it shrinks.
pub const SAMPLE_LEN: usize = 64 * 1024;
/// A chunk (or sample) whose compressed size is above this fraction of its size goes raw.
pub const INCOMPRESSIBLE: f64 = 0.9;
/// Most chunks skipped without a sample after incompressible ones.
pub const MAX_SKIP: u32 = 64;
/// How long each probe runs: several round trips on a 50 ms path, short enough that the
/// losing side costs little.
pub const PROBE: Duration = Duration::from_millis(400);
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
    /// Raw bytes per second measured with compression off.
    pub off_rate: f64,
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
}

impl Adapt {
    /// A policy whose first probe starts with the first chunk, off first: a transfer too short
    /// to be measured goes as it would without compression. `cpus` is the parallelism
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
        }
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
        let since = *self.since.get_or_insert(now);
        let elapsed = now.saturating_duration_since(since);
        let on = matches!(
            self.phase,
            Phase::Probe { on: true } | Phase::Keep { on: true }
        );
        if on {
            self.adjust_level(elapsed);
        }
        let length = match self.phase {
            Phase::Probe { .. } => PROBE,
            Phase::Keep { .. } => self.stretch,
        };
        let ceiling = self.compress_ceiling();
        // A phase that moved nothing measured nothing: it goes on until it has.
        if (elapsed < length && ceiling.is_none()) || self.raw == 0 {
            return;
        }
        let mut rate = self.raw as f64 / elapsed.as_secs_f64().max(f64::MIN_POSITIVE);
        if let Some(ceiling) = ceiling {
            rate = rate.min(ceiling);
        }
        if on {
            self.on_rate = Some(rate);
            if self.raw > 0 {
                self.ratio = self.wire as f64 / self.raw as f64;
            }
        } else {
            self.off_rate = Some(rate);
        }
        self.phase = match (self.phase, self.off_rate, self.on_rate) {
            (Phase::Keep { on }, _, _) => Phase::Probe { on: !on },
            (Phase::Probe { .. }, Some(off_rate), Some(on_rate)) => {
                let keep = on_rate > off_rate * MARGIN;
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
                    on_rate,
                    ratio: self.ratio,
                });
                Phase::Keep { on: keep }
            }
            (Phase::Probe { on }, _, _) => Phase::Probe { on: !on },
        };
        self.since = Some(now);
        self.raw = 0;
        self.wire = 0;
        self.compressing = Duration::ZERO;
        self.shrunk = 0;
        self.chunks_at_level = 0;
    }

    /// During a probe with compression on, the most raw bytes per second all the CPUs could
    /// compress at the rate measured so far, once that already falls short of the off side:
    /// the probe has its answer and ends, so that a fast link (loopback) pays for a few
    /// chunks, not for a whole probe.
    fn compress_ceiling(&self) -> Option<f64> {
        let off_rate = self.off_rate?;
        if self.phase != (Phase::Probe { on: true })
            || self.shrunk < 2
            || self.compressing.is_zero()
        {
            return None;
        }
        let ceiling = self.raw as f64 / self.compressing.as_secs_f64() * self.cpus;
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
        assert_eq!(compressed, 2, "the on probe ends after two chunks");
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
