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
/// Growth stops at `max`, or for good once a size measured [`CHANCES`] times in a row without
/// gaining enough (at once if it measured clearly slower).
#[derive(Debug)]
pub(super) struct Grower {
    max: usize,
    /// Workers the pool has now.
    pub(super) size: usize,
    /// When the pool last changed or was last not ready: settling starts there.
    since: Instant,
    /// Start of the running measurement: when, and the meter then.
    mark: Option<(Instant, u64)>,
    /// The size that measured fastest, and its bytes per second.
    best: Option<(usize, f64)>,
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
        Self {
            max,
            size,
            since: now,
            mark: None,
            best: None,
            misses: 0,
            marginal: false,
            done: size >= max,
            settle: rtt.map_or(SETTLE_UNKNOWN, |_| scaled(SETTLE_RTTS, SETTLE)),
            measure: scaled(MEASURE_RTTS, MEASURE),
            join: rtt.map_or(Duration::ZERO, |rtt| rtt * JOIN_RTTS),
        }
    }

    /// `bytes`: what the pool's connections delivered so far (acknowledged by the peer or
    /// arrived from it; bytes written into socket buffers are not throughput); `ready`: every worker of the pool is moving chunks and the
    /// queue is not empty (a pool still connecting, or near its end, is not measured); `left`:
    /// the bytes still queued.
    pub(super) fn on_tick(&mut self, now: Instant, bytes: u64, ready: bool, left: u64) -> Step {
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
            let clear = best.is_none_or(|b| rate >= b * CLEAR_GAIN);
            if !clear && !std::mem::replace(&mut self.marginal, true) {
                self.mark = Some((now, bytes));
                return Step::Wait;
            }
            self.marginal = false;
            self.best = Some((self.size, rate));
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
                };
            }
            let from = self.size;
            self.size = (from * 2).min(self.max);
            self.since = now;
            self.mark = None;
            self.misses = 0;
            return Step::Grow {
                from,
                to: self.size,
                rate,
                best,
            };
        }
        self.marginal = false;
        let (best_size, best_rate) = self.best.unwrap_or((self.size, rate));
        let slower = rate < best_rate * SHRINK_BELOW && best_size < self.size;
        self.misses += 1;
        if !slower && self.misses < CHANCES {
            // Measured again at once: the pool settled already.
            self.mark = Some((now, bytes));
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
            match g.on_tick(now, bytes as u64, true, u64::MAX) {
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

    /// When a grower fed steady bytes takes its first measurement's mark.
    fn settled_after(rtt: Option<Duration>) -> Duration {
        let t0 = Instant::now();
        let mut g = Grower::new(8, 64, t0, rtt);
        let mut now = t0;
        while g.mark.is_none() {
            now += TICK;
            g.on_tick(now, 0, true, u64::MAX);
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
            let step = g.on_tick(now, bytes as u64, true, u64::MAX);
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
                let step = g.on_tick(now, bytes as u64, true, u64::MAX);
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
            step = g.on_tick(t0 + TICK * i, u64::from(i) * 1_000_000, true, 14_000_000);
            if step != Step::Wait {
                break;
            }
        }
        assert!(matches!(step, Step::Keep { size: 8, .. }), "{step:?}");
        assert!(g.done);
        let mut g = Grower::new(8, 64, t0, None);
        let step = (1..30)
            .map(|i| g.on_tick(t0 + TICK * i, u64::from(i) * 1_000_000, true, 16_000_000))
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
                .map(|i| g.on_tick(t0 + TICK * i, u64::from(i) * 2_500_000, true, left))
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
        let mut tick = |i: u32| g.on_tick(t0 + TICK * i, u64::from(i) << 27, true, u64::MAX);
        let first = (1..10).find(|&i| tick(i) != Step::Wait);
        assert_eq!(first, Some(7));
    }

    #[test]
    fn a_pool_that_is_not_ready_is_not_measured() {
        let t0 = Instant::now();
        let mut g = Grower::new(4, 16, t0, None);
        // Never ready (a worker still connecting): no decision however long it lasts.
        for i in 1..100 {
            let step = g.on_tick(t0 + TICK * i, u64::from(i) << 20, false, u64::MAX);
            assert_eq!(step, Step::Wait);
        }
        // At the cap already: nothing to do.
        assert!(Grower::new(4, 4, t0, None).done);
    }
}
