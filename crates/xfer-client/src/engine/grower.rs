//! [`Grower`]: sizes an adaptive pool from the throughput it measures; no I/O, time comes in.

use std::time::{Duration, Instant};

/// How often the pool looks at its throughput.
pub(super) const TICK: Duration = Duration::from_millis(100);
/// Time a pool of a new size gets before it is measured: new connections do their handshake
/// and leave slow start. [`SETTLE_RTTS`] round trips, within these bounds. The upper bound is
/// past the 1.5 s of a 150 ms path: capped at 0.5 s (3 round trips there), a bbr pool was
/// measured while its new connections were still in startup, so each size looked slower than
/// it was and the next doubling faster, and a 2 GiB download grew to 64 connections.
const SETTLE: (Duration, Duration) = (Duration::from_millis(200), Duration::from_secs(2));
const SETTLE_RTTS: u32 = 10;
/// Settling time when the round-trip time is unknown.
const SETTLE_UNKNOWN: Duration = Duration::from_millis(500);
/// How long one measurement lasts: [`MEASURE_RTTS`] round trips, within these bounds. On a
/// 50 ms path that is the upper bound (a cubic stream needs seconds to reach its share); on
/// loopback and LAN paths a whole file can be moved in the time of one such measurement. The
/// lower bound keeps noise out: over 0.2 s on the 2-core loopback, 8 connections measured 10 %
/// faster than 4 by chance often enough to grow a pool to 16, which only costs CPU there.
const MEASURE: (Duration, Duration) = (Duration::from_millis(500), Duration::from_secs(1));
const MEASURE_RTTS: u32 = 20;
/// Round trips a connection added to the pool spends before it carries its share: connect,
/// handshake and open (4), then slow start towards its share of the path (about 6 from IW10 on
/// the emulated 150 ms, 1 Gbit/s path). There, a 128 MiB file grew from 8 to 16 connections
/// with 60-70 MiB left; the new ones were still starting when the last chunks left, and took
/// 4.6-5.0 s where a run that kept 8 took 3.8 s.
const JOIN_RTTS: u32 = 10;
/// Throughput gain over the best measured so far that makes the pool grow again.
const GAIN: f64 = 1.10;
/// A gain below this (but at least [`GAIN`]) is measured once more before the pool grows: on
/// a 2-core machine shared with other work, half-second measurements of a 1 Gbit/s LAN vary by
/// more than [`GAIN`], and an upload that measured its connections' delivered bytes grew to 16
/// or 64 connections there by chance, 13-47 % slower than 8. Where connections are the limit
/// (lossy long paths, per-connection caps), doubling them gains far more than this.
const CLEAR_GAIN: f64 = 1.5;
/// Measurements a size gets before a too-small gain stops the growth for good: one measurement
/// is a fraction of a second, and a stall of the machine or the disk in it (a loaded 2-core
/// machine, a receiver flushing) can hide a growth that pays; two in a row rarely both do.
const CHANCES: u32 = 2;
/// The pool goes back to its fastest size only if the last growth cost this much: right after
/// a growth, on a long lossy path, the new streams still compete with the old ones for the
/// link, and a dip then is no reason to close them (measured through the emulated 50 ms WAN:
/// a shrink from 16 to 8 there cost a third of the throughput).
const SHRINK_BELOW: f64 = 0.75;

/// Queue on the path, as a share of its round trip, that says its bottleneck is full: the queue
/// stands only while the bottleneck sends all the time, and more connections then only lengthen
/// it. Through the emulated 150 ms, 1 Gbit/s path with 0.1 % loss, 16 bbr connections carried
/// what the link moves with their round trips at 225-250 ms; doubled to 32 and 64 they carried
/// no more, and the queue overflowed: 157,000 segments dropped against 1,600 lost at random.
/// Streams that loss or their windows limit leave no queue, so they still grow.
const FULL_QUEUE_SHARE: f64 = 0.2;
/// The least queue that says a path is full, however short its round trip: on loopback and a
/// LAN a round trip grows by milliseconds when the machine is busy.
const FULL_QUEUE_FLOOR: Duration = Duration::from_millis(10);
/// A measurement whose second half moved this much more than its first was taken while the
/// connections were still starting: on the 150 ms path 16 bbr connections were measured at
/// 98 MiB/s over 1.5-2.5 s after they opened and carried 115 a second later, so 32 looked 12 %
/// faster and the pool grew on to 64.
const RAMP: f64 = 1.15;
/// Measurements a size may get again because it was still ramping; only on paths of
/// [`super::LONG_PATH`] or more, where starting takes seconds: on a LAN it takes
/// milliseconds, and halves of a measurement differ by chance there.
const RAMP_CHECKS: u32 = 2;

/// What [`Grower`] decides at a tick.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Step {
    /// Nothing to do yet.
    Wait,
    /// Throughput grew by [`GAIN`] or more (or this is the first measurement): add workers.
    Grow {
        from: usize,
        to: usize,
        rate: f64,
        best: Option<f64>,
        queue: Option<Duration>,
    },
    /// Throughput did not grow by enough (or the cap is reached): keep `size`, stop growing.
    Keep {
        size: usize,
        rate: f64,
        best: f64,
        queue: Option<Duration>,
    },
    /// A queue stands on the path ([`FULL_QUEUE_SHARE`]): its bottleneck carries all it can, so
    /// keep `size` and stop growing.
    Full {
        size: usize,
        rate: f64,
        queue: Duration,
    },
    /// The last growth made it clearly slower ([`SHRINK_BELOW`]): go back to the size that
    /// measured fastest.
    Shrink {
        from: usize,
        to: usize,
        rate: f64,
        best: f64,
        queue: Option<Duration>,
    },
}

/// Sizes an adaptive pool from throughput alone; no I/O, time comes in as `now`.
///
/// Each size gets [`SETTLE`] once all its workers are moving chunks, then its bytes are counted
/// for [`MEASURE`] (both scaled to the first connection's round-trip time). The first
/// measurement always doubles the pool (there is nothing to compare it with); later ones double
/// it again while throughput beats the best so far by [`GAIN`].
/// Growth stops at `max`, once the path is full (a queue stands on it), or for good once a size
/// measured [`CHANCES`] times in a row without gaining enough (at once if it measured clearly
/// slower). On a long path a measurement taken while the connections were still ramping up
/// ([`RAMP`]) is taken again before it counts, except the first, which doubles the pool at once
/// and counts as a floor only.
#[derive(Debug)]
pub(super) struct Grower {
    max: usize,
    /// Workers the pool has now.
    pub(super) size: usize,
    /// When the pool last changed or was last not ready: settling starts there.
    since: Instant,
    /// Start of the running measurement: when, and the meter then.
    mark: Option<(Instant, u64)>,
    /// The running measurement's middle: when, and the meter then.
    middle: Option<(Instant, u64)>,
    /// The queue readings of the running measurement: their sum and count.
    queued: (Duration, u32),
    /// The queue that says the path is full ([`FULL_QUEUE_SHARE`]).
    full_queue: Duration,
    /// Measurements the current size may still get again because it was ramping.
    ramp_checks: u32,
    /// [`RAMP_CHECKS`] on a long path, else none.
    ramp_checks_per_size: u32,
    /// The size that measured fastest, and its bytes per second.
    best: Option<(usize, f64)>,
    /// `best` was measured while its connections were still ramping up: a floor only.
    best_is_floor: bool,
    /// Measurements of the current size that did not gain enough.
    misses: u32,
    /// The last measurement gained, but less than [`CLEAR_GAIN`]: the next one decides.
    marginal: bool,
    /// Growth is over: the pool keeps its size.
    pub(super) done: bool,
    settle: Duration,
    measure: Duration,
    /// How long a connection added now takes to carry its share ([`JOIN_RTTS`]).
    join: Duration,
}

impl Grower {
    /// `rtt`: the path's round-trip time, if known (unknown: the longest timings).
    pub(super) fn new(size: usize, max: usize, now: Instant, rtt: Option<Duration>) -> Self {
        let scaled = |rtts: u32, (low, high): (Duration, Duration)| {
            rtt.map_or(high, |rtt| (rtt * rtts).clamp(low, high))
        };
        let long = rtt.is_some_and(|rtt| rtt >= super::LONG_PATH);
        let ramp_checks = if long { RAMP_CHECKS } else { 0 };
        Self {
            max,
            size,
            since: now,
            mark: None,
            middle: None,
            queued: (Duration::ZERO, 0),
            full_queue: rtt.map_or(FULL_QUEUE_FLOOR, |rtt| {
                rtt.mul_f64(FULL_QUEUE_SHARE).max(FULL_QUEUE_FLOOR)
            }),
            ramp_checks,
            ramp_checks_per_size: ramp_checks,
            best: None,
            best_is_floor: false,
            misses: 0,
            marginal: false,
            done: size >= max,
            settle: rtt.map_or(SETTLE_UNKNOWN, |_| scaled(SETTLE_RTTS, SETTLE)),
            measure: scaled(MEASURE_RTTS, MEASURE),
            join: rtt.map_or(Duration::ZERO, |rtt| rtt * JOIN_RTTS),
        }
    }

    /// `bytes`: what the pool's connections delivered so far (acknowledged by the peer or
    /// arrived from it; bytes written into socket buffers are not throughput); `queue`: how
    /// long their data waits in queues on the path now, if known; `ready`: every worker of the
    /// pool is moving chunks and the queue of work is not empty (a pool still connecting, or
    /// near its end, is not measured); `left`: the bytes still queued.
    pub(super) fn on_tick(
        &mut self,
        now: Instant,
        bytes: u64,
        queue: Option<Duration>,
        ready: bool,
        left: u64,
    ) -> Step {
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
                self.start_measuring(now, bytes);
            }
            return Step::Wait;
        };
        if let Some(queue) = queue {
            self.queued.0 += queue;
            self.queued.1 += 1;
        }
        let elapsed = now.duration_since(t0);
        if self.middle.is_none() && elapsed >= self.measure / 2 {
            self.middle = Some((now, bytes));
        }
        if elapsed < self.measure {
            return Step::Wait;
        }
        let rate = bytes.saturating_sub(b0) as f64 / elapsed.as_secs_f64();
        let ramping = self.ramp_checks > 0 && self.ramping(t0, b0, now, bytes);
        if ramping && self.best.is_some() {
            // Still starting: this rate is below what the size carries, and a baseline taken
            // from it would make the next doubling look like a gain.
            self.ramp_checks -= 1;
            self.start_measuring(now, bytes);
            return Step::Wait;
        }
        // The first measurement doubles the pool whatever it reads: measured again, it only put
        // the doubling off (through the 150 ms path by a second, until 16 connections filled
        // the link, and 16 more starting then overflowed its queue). Taken while ramping, its
        // figure is only a floor, which the next size must beat by [`CLEAR_GAIN`].
        let floor = ramping;
        let queue = (self.queued.1 > 0).then(|| self.queued.0 / self.queued.1);
        let best = self.best.map(|(_, r)| r);
        if let Some(queue) = queue.filter(|&q| q >= self.full_queue) {
            self.done = true;
            let (best_size, best_rate) = self.best.unwrap_or((self.size, rate));
            if rate < best_rate * SHRINK_BELOW && best_size < self.size {
                let from = self.size;
                self.size = best_size;
                return Step::Shrink {
                    from,
                    to: best_size,
                    rate,
                    best: best_rate,
                    queue: Some(queue),
                };
            }
            return Step::Full {
                size: self.size,
                rate,
                queue,
            };
        }
        let needed = if self.best_is_floor { CLEAR_GAIN } else { GAIN };
        if best.is_none_or(|b| rate >= b * needed) {
            let clear = best.is_none_or(|b| rate >= b * CLEAR_GAIN);
            if !clear && !std::mem::replace(&mut self.marginal, true) {
                self.start_measuring(now, bytes);
                return Step::Wait;
            }
            self.marginal = false;
            self.best = Some((self.size, rate));
            self.best_is_floor = floor;
            // New connections move little until they have joined and settled, and what is left
            // would be gone before they are measured: they would only take chunks into slow
            // starts and make the end of the transfer (a 128 MiB file on a 50 ms path grew
            // from 8 to 16 a second before its end).
            let horizon = (self.join + self.settle + self.measure).as_secs_f64();
            if self.size >= self.max || (left as f64) < rate * horizon {
                self.done = true;
                return Step::Keep {
                    size: self.size,
                    rate,
                    best: rate,
                    queue,
                };
            }
            let from = self.size;
            self.size = (from * 2).min(self.max);
            self.since = now;
            self.mark = None;
            self.misses = 0;
            self.ramp_checks = self.ramp_checks_per_size;
            return Step::Grow {
                from,
                to: self.size,
                rate,
                best,
                queue,
            };
        }
        self.marginal = false;
        let (best_size, best_rate) = self.best.unwrap_or((self.size, rate));
        let slower = rate < best_rate * SHRINK_BELOW && best_size < self.size;
        self.misses += 1;
        if !slower && self.misses < CHANCES {
            // Measured again at once: the pool settled already.
            self.start_measuring(now, bytes);
            return Step::Wait;
        }
        self.done = true;
        if slower {
            let from = self.size;
            self.size = best_size;
            Step::Shrink {
                from,
                to: best_size,
                rate,
                best: best_rate,
                queue,
            }
        } else {
            Step::Keep {
                size: self.size,
                rate,
                best: best_rate,
                queue,
            }
        }
    }

    fn start_measuring(&mut self, now: Instant, bytes: u64) {
        self.mark = Some((now, bytes));
        self.middle = None;
        self.queued = (Duration::ZERO, 0);
    }

    /// Whether the second half of the measurement from `(t0, b0)` to `(now, bytes)` moved
    /// [`RAMP`] times the rate of its first.
    fn ramping(&self, t0: Instant, b0: u64, now: Instant, bytes: u64) -> bool {
        let Some((t1, b1)) = self.middle else {
            return false;
        };
        let rate = |from: Instant, to: Instant, moved: u64| {
            moved as f64 / to.duration_since(from).as_secs_f64().max(f64::MIN_POSITIVE)
        };
        let first = rate(t0, t1, b1.saturating_sub(b0));
        let second = rate(t1, now, bytes.saturating_sub(b1));
        second > first * RAMP
    }
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
            match g.on_tick(now, bytes as u64, None, true, u64::MAX) {
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
                Step::Full { size, .. } => ('!', size),
                Step::Wait => ('?', 0),
            })
            .collect()
    }

    /// When a grower fed steady bytes takes its first measurement's mark.
    fn settled_after(rtt: Option<Duration>) -> Duration {
        let t0 = Instant::now();
        let mut g = Grower::new(8, 64, t0, rtt);
        let mut now = t0;
        while g.mark.is_none() {
            now += TICK;
            g.on_tick(now, 0, None, true, u64::MAX);
        }
        now - t0
    }

    #[test]
    fn settling_lasts_ten_round_trips_within_bounds() {
        let ms = Duration::from_millis;
        // A long path waits out its new connections' start (bbr's startup on 150 ms).
        assert_eq!(settled_after(Some(ms(150))), ms(1500));
        assert_eq!(settled_after(Some(ms(50))), ms(500));
        assert_eq!(settled_after(Some(ms(600))), ms(2000));
        // A LAN, and a path of unknown RTT, as before.
        assert_eq!(settled_after(Some(ms(1))), ms(200));
        assert_eq!(settled_after(None), ms(500));
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
    fn a_size_that_measures_too_slow_once_is_measured_again_before_the_growth_stops() {
        let t0 = Instant::now();
        let mut g = Grower::new(4, 64, t0, None);
        let (mut now, mut bytes, mut steps) = (t0, 0.0, Vec::new());
        // 4 and 8 connections as the link allows; at 16 a stall halves the first measurement
        // (not slower than 8 by enough to shrink), then 16 carry twice what 8 did.
        let mut rates = [1e6, 2e6, 2.1e6, 4e6, 4e6].into_iter();
        let mut rate = rates.next().unwrap();
        while !g.done {
            now += TICK;
            bytes += rate * TICK.as_secs_f64();
            let before = (g.mark, g.misses);
            let step = g.on_tick(now, bytes as u64, None, true, u64::MAX);
            let measured = step != Step::Wait || (g.misses > before.1);
            if measured {
                rate = rates.next().unwrap_or(rate);
            }
            if step != Step::Wait {
                steps.push(step);
            }
            assert!(now < t0 + Duration::from_secs(60), "never settles");
        }
        assert_eq!(
            sizes(&steps),
            [('+', 8), ('+', 16), ('+', 32), ('=', 32)],
            "{steps:?}"
        );
        // Two measurements that gain too little in a row stop it, as does one that is slower.
        assert_eq!(
            sizes(&check(4, 64, &[1e6, 2e6, 2.1e6])),
            [('+', 8), ('+', 16), ('=', 16)]
        );
    }

    #[test]
    fn a_small_gain_is_measured_again_before_the_pool_grows() {
        // One rate per measurement (not per decision).
        let per_measurement = |rates: &[f64]| {
            let t0 = Instant::now();
            let mut g = Grower::new(4, 16, t0, None);
            let (mut now, mut bytes, mut steps) = (t0, 0.0, Vec::new());
            let mut rates = rates.iter().copied();
            let mut rate = rates.next().unwrap();
            while !g.done {
                now += TICK;
                bytes += rate * TICK.as_secs_f64();
                let before = (g.misses, g.marginal);
                let step = g.on_tick(now, bytes as u64, None, true, u64::MAX);
                if step != Step::Wait || (g.misses, g.marginal) != before {
                    rate = rates.next().unwrap_or(rate);
                }
                if step != Step::Wait {
                    steps.push(step);
                }
                assert!(now < t0 + Duration::from_secs(60), "never settles");
            }
            sizes(&steps)
        };
        // 8 connections 20 % faster than 4, twice: it grows; once, then no faster than 4: not.
        assert_eq!(
            per_measurement(&[100e6, 120e6, 120e6, 125e6, 125e6]),
            [('+', 8), ('+', 16), ('=', 16)]
        );
        assert_eq!(
            per_measurement(&[100e6, 120e6, 100e6, 100e6]),
            [('+', 8), ('=', 8)]
        );
        // Twice as fast: at once.
        assert_eq!(
            per_measurement(&[100e6, 200e6, 200e6, 200e6]),
            [('+', 8), ('+', 16), ('=', 16)]
        );
    }

    #[test]
    fn a_pool_near_its_end_does_not_grow() {
        let t0 = Instant::now();
        let mut g = Grower::new(8, 64, t0, None);
        // 10 MB/s measured, settle and measure take 1.5 s: 15 MB must be left to grow.
        let mut step = Step::Wait;
        for i in 1..30 {
            step = g.on_tick(
                t0 + TICK * i,
                u64::from(i) * 1_000_000,
                None,
                true,
                14_000_000,
            );
            if step != Step::Wait {
                break;
            }
        }
        assert!(matches!(step, Step::Keep { size: 8, .. }), "{step:?}");
        assert!(g.done);
        let mut g = Grower::new(8, 64, t0, None);
        let step = (1..30)
            .map(|i| {
                g.on_tick(
                    t0 + TICK * i,
                    u64::from(i) * 1_000_000,
                    None,
                    true,
                    16_000_000,
                )
            })
            .find(|s| *s != Step::Wait);
        assert!(
            matches!(
                step,
                Some(Step::Grow {
                    from: 8,
                    to: 16,
                    ..
                })
            ),
            "{step:?}"
        );
    }

    #[test]
    fn on_a_long_path_what_is_left_must_also_repay_the_new_connections_start() {
        // 25 MB/s measured at 8 connections with 70 MB left (the 150 ms path's 128 MiB file):
        // settling 10 round trips (1.5 s) and measuring 1 s take 63 MB, joining 10 round trips
        // more (1.5 s) 38 MB.
        let t0 = Instant::now();
        let decide = |rtt: Duration, left: u64| {
            let mut g = Grower::new(8, 64, t0, Some(rtt));
            (1..100)
                .map(|i| g.on_tick(t0 + TICK * i, u64::from(i) * 2_500_000, None, true, left))
                .find(|s| *s != Step::Wait)
        };
        let far = Duration::from_millis(150);
        assert!(
            matches!(decide(far, 70_000_000), Some(Step::Keep { size: 8, .. })),
            "{:?}",
            decide(far, 70_000_000)
        );
        assert!(matches!(
            decide(far, 110_000_000),
            Some(Step::Grow { to: 16, .. })
        ));
        // On a LAN joining is quick: the same bytes left are worth growing for.
        let lan = Duration::from_micros(200);
        assert!(matches!(
            decide(lan, 20_000_000),
            Some(Step::Grow { to: 16, .. })
        ));
    }

    #[test]
    fn a_short_path_is_measured_in_fewer_round_trips_bounded() {
        let t0 = Instant::now();
        let lan = Grower::new(4, 16, t0, Some(Duration::from_micros(200)));
        assert_eq!((lan.settle, lan.measure), (SETTLE.0, MEASURE.0));
        let wan = Grower::new(4, 16, t0, Some(Duration::from_millis(50)));
        assert_eq!(
            (wan.settle, wan.measure),
            (Duration::from_millis(500), MEASURE.1)
        );
        let mid = Grower::new(4, 16, t0, Some(Duration::from_millis(30)));
        assert_eq!(
            (mid.settle, mid.measure),
            (Duration::from_millis(300), Duration::from_millis(600))
        );
        // On loopback the first decision comes after 0.7 s of moving chunks, not 1.5 s.
        let mut g = Grower::new(4, 16, t0, Some(Duration::from_micros(50)));
        let mut tick = |i: u32| g.on_tick(t0 + TICK * i, u64::from(i) << 27, None, true, u64::MAX);
        let first = (1..10).find(|&i| tick(i) != Step::Wait);
        assert_eq!(first, Some(7));
    }

    /// Drives a grower on a path of `rtt` whose pool of `size` connections moves `rate(size,
    /// t)` bytes per second at `t` after its size last changed, with its data queued on the path
    /// for `queue(size)`; returns the steps that were not `Wait`.
    fn drive(
        start: usize,
        rtt: Duration,
        rate: impl Fn(usize, Duration) -> f64,
        queue: impl Fn(usize) -> Option<Duration>,
    ) -> Vec<Step> {
        let t0 = Instant::now();
        let mut g = Grower::new(start, 64, t0, Some(rtt));
        let (mut now, mut changed, mut bytes, mut steps) = (t0, t0, 0.0, Vec::new());
        while !g.done {
            now += TICK;
            bytes += rate(g.size, now - changed) * TICK.as_secs_f64();
            let before = g.size;
            match g.on_tick(now, bytes as u64, queue(g.size), true, u64::MAX) {
                Step::Wait => {}
                step => steps.push(step),
            }
            if g.size != before {
                changed = now;
            }
            assert!(now < t0 + Duration::from_secs(60), "never settles");
        }
        steps
    }

    /// The emulated 150 ms, 1 Gbit/s path: what `size` bbr connections carry `t` after the pool
    /// reached that size, in MB/s: each starts from its initial window and needs about 2.5 s to
    /// carry its share; 16 or more fill the link's 120.
    fn far(size: usize, t: Duration) -> f64 {
        let full = (size as f64 * 7.5).min(120.0);
        1e6 * full * (t.as_secs_f64() / 2.5).clamp(0.3, 1.0)
    }

    #[test]
    fn a_baseline_measured_while_the_connections_ramp_up_does_not_double_the_pool_twice() {
        let far_rtt = Duration::from_millis(150);
        // Still ramping when first measured (1.5-2.5 s): the pool doubles at once, but 16's
        // figure is only a floor, and 32 carrying 1.4 times it are not worth doubling again
        // (it grew to 64 when 16 counted at what they moved while starting).
        let steps = drive(16, far_rtt, far, |_| None);
        assert_eq!(sizes(&steps), [('+', 32), ('=', 32)], "{steps:?}");
        let Step::Grow { rate, .. } = steps[0] else {
            unreachable!()
        };
        assert!(
            rate < 100e6,
            "16 measured again before the first doubling: {rate}"
        );
        // A size measured while ramping after a doubling is measured again before it counts:
        // 32 still starting read as slower than 16, and the pool went back.
        let late = |size: usize, t: Duration| match size {
            16 => 115e6,
            _ => 120e6 * (t.as_secs_f64() / 4.0).clamp(0.3, 1.0),
        };
        let steps = drive(16, far_rtt, late, |_| None);
        assert_eq!(sizes(&steps), [('+', 32), ('=', 32)], "{steps:?}");
        let Step::Keep { rate, .. } = steps[1] else {
            unreachable!()
        };
        assert!(rate > 110e6, "32 counted at {rate} while ramping");
        // On a LAN connections start in milliseconds: halves of a measurement that differ are
        // chance, and the decision is not put off.
        let lan = drive(4, Duration::from_micros(200), far, |_| None);
        let Step::Grow { from: 4, rate, .. } = lan[0] else {
            panic!("{lan:?}")
        };
        assert!(rate < 15e6, "4 measured again after they ramped up: {rate}");
    }

    #[test]
    fn a_queue_standing_on_the_path_stops_the_growth() {
        let ms = Duration::from_millis;
        let far_rtt = ms(150);
        // 16 bbr connections fill the 150 ms path and queue 75 ms in front of its bottleneck:
        // the pool keeps 16, without the doubling a first measurement otherwise makes.
        let queued = |_| Some(ms(75));
        let steps = drive(16, far_rtt, far, queued);
        assert_eq!(sizes(&steps), [('!', 16)], "{steps:?}");
        // Streams that loss limits leave no queue: they double while throughput follows.
        let loss_limited = |size: usize, _| size as f64 * 1e6;
        let steps = drive(8, far_rtt, loss_limited, |_| Some(ms(5)));
        assert_eq!(sizes(&steps), [('+', 16), ('+', 32), ('+', 64), ('=', 64)]);
        // The queue appears once the pool has grown: it stops there.
        let filled_at_16 = |size: usize| Some(if size >= 16 { ms(60) } else { ms(2) });
        let steps = drive(8, far_rtt, loss_limited, filled_at_16);
        assert_eq!(sizes(&steps), [('+', 16), ('!', 16)]);
        // On a LAN milliseconds of queue are the machine's load, not a full path.
        let lan = ms(1) / 5;
        let steps = drive(4, lan, loss_limited, |_| Some(ms(5)));
        assert_eq!(
            sizes(&steps),
            [('+', 8), ('+', 16), ('+', 32), ('+', 64), ('=', 64)]
        );
    }

    #[test]
    fn a_full_path_that_a_doubling_made_clearly_slower_goes_back() {
        let ms = Duration::from_millis;
        // On the 150 ms path 16 carried 100 MB/s with no queue; 32 overflow the bottleneck
        // and carry 60: back to 16.
        let rate = |size: usize, _| if size > 16 { 60e6 } else { 100e6 };
        let queue = |size: usize| Some(if size > 16 { ms(90) } else { ms(1) });
        let steps = drive(16, ms(150), rate, queue);
        assert_eq!(sizes(&steps), [('+', 32), ('-', 16)], "{steps:?}");
    }

    #[test]
    fn a_pool_that_is_not_ready_is_not_measured() {
        let t0 = Instant::now();
        let mut g = Grower::new(4, 16, t0, None);
        // Never ready (a worker still connecting): no decision however long it lasts.
        for i in 1..100 {
            let step = g.on_tick(t0 + TICK * i, u64::from(i) << 20, None, false, u64::MAX);
            assert_eq!(step, Step::Wait);
        }
        // At the cap already: nothing to do.
        assert!(Grower::new(4, 4, t0, None).done);
    }
}
