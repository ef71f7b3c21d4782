//! [`PathReports`]: the queue a download's data waits in on its path, from the daemon's
//! `PathReport`s (`CAP_PATH_REPORT`). The client is the receiver there, and its own sockets time
//! only its requests: through the emulated 150 ms path, 16 bbr connections of a download had
//! their daemon's round trips at 215-230 ms, a queue of 70 ms that stops an upload's pool at 16,
//! while the client read none and the pool grew to 32 or 64, overflowing the path's queue.

use std::sync::Mutex;
use std::time::Duration;

use xfer_proto::PathReport;

/// The reports the connections of one download received since the pool last looked; shared by
/// its workers. Holds two sums and a minimum, whatever the number of reports.
#[derive(Debug, Default)]
pub(super) struct PathReports {
    inner: Mutex<Pending>,
}

#[derive(Debug, Default)]
struct Pending {
    /// Round trips reported since the last [`PathReports::take_queue`]: their sum and count.
    rtts: (Duration, u32),
    /// The least round trip any report gave: the path without a queue.
    base: Option<Duration>,
}

impl PathReports {
    /// Counts one report; a report without a round trip (0: the daemon's kernel did not say)
    /// counts for nothing.
    pub(super) fn record(&self, report: &PathReport) {
        let micros = |us: u32| (us > 0).then(|| Duration::from_micros(us.into()));
        let mut pending = self.lock();
        if let Some(least) = micros(report.min_rtt_us) {
            pending.base = Some(pending.base.map_or(least, |base| base.min(least)));
        }
        if let Some(rtt) = micros(report.rtt_us) {
            pending.rtts.0 += rtt;
            pending.rtts.1 += 1;
        }
    }

    /// How long the data waits in queues on its path: the mean round trip reported since the
    /// last call, over the least ever reported; `None` without a report since (or without a
    /// least round trip yet).
    pub(super) fn take_queue(&self) -> Option<Duration> {
        let mut pending = self.lock();
        let (sum, count) = std::mem::take(&mut pending.rtts);
        let base = pending.base?;
        (count > 0).then(|| (sum / count).saturating_sub(base))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        // Numbers only: a state left by a panic is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(rtt_ms: u32, min_ms: u32) -> PathReport {
        PathReport {
            rtt_us: rtt_ms * 1000,
            min_rtt_us: min_ms * 1000,
        }
    }

    #[test]
    fn the_queue_is_the_mean_reported_round_trip_over_the_least_one() {
        let ms = Duration::from_millis;
        let reports = PathReports::default();
        assert_eq!(reports.take_queue(), None, "nothing reported");
        reports.record(&report(215, 150));
        reports.record(&report(235, 151));
        assert_eq!(reports.take_queue(), Some(ms(75)));
        // Each look takes what came since the last one.
        assert_eq!(reports.take_queue(), None);
        // The least round trip stays: a connection that never saw the path empty reads its
        // queue against one that did.
        reports.record(&report(240, 195));
        assert_eq!(reports.take_queue(), Some(ms(90)));
        // A kernel that does not say is no report.
        reports.record(&report(0, 0));
        assert_eq!(reports.take_queue(), None);
    }

    /// The sizes a download's pool goes through on the emulated 150 ms path when each size of
    /// `size` connections carries `rate(size)` bytes a second and, with `reported`, the daemon
    /// reports its round trips as `rtt_ms(size)` (four reports a tick): what `pool::drive`
    /// gives the grower, the reports or the client's own reading, which on a download is none.
    fn download_sizes(
        rate: impl Fn(usize) -> f64,
        rtt_ms: impl Fn(usize) -> u32,
        reported: bool,
    ) -> Vec<(char, usize)> {
        use super::super::grower::{Grower, Step, TICK};
        let t0 = std::time::Instant::now();
        let mut grower = Grower::new(16, 64, t0, Some(Duration::from_millis(150)));
        let reports = PathReports::default();
        let (mut now, mut bytes, mut sizes) = (t0, 0.0, Vec::new());
        while !grower.done {
            now += TICK;
            bytes += rate(grower.size) * TICK.as_secs_f64();
            for _ in 0..4 {
                reports.record(&report(rtt_ms(grower.size), 150));
            }
            // Without the reports the grower has the client's own reading: none.
            let queue = reports.take_queue().filter(|_| reported);
            match grower.on_tick(now, bytes as u64, queue, true, u64::MAX) {
                Step::Wait => {}
                Step::Grow { to, .. } => sizes.push(('+', to)),
                Step::Keep { size, .. } => sizes.push(('=', size)),
                Step::Full { size, .. } => sizes.push(('!', size)),
                Step::Shrink { to, .. } => sizes.push(('-', to)),
            }
            assert!(now < t0 + Duration::from_secs(60), "never settles");
        }
        sizes
    }

    #[test]
    fn a_download_whose_daemon_reports_a_standing_queue_keeps_its_pool() {
        // 16 bbr connections fill the link and queue 70 ms in front of it; each doubling still
        // measured faster, as when 16 were measured while starting (the run that grew to 64).
        let rate = |size: usize| match size {
            16 => 60e6,
            32 => 100e6,
            _ => 120e6,
        };
        let queued = |size: usize| if size >= 16 { 220 } else { 152 };
        assert_eq!(
            download_sizes(rate, queued, false),
            [('+', 32), ('+', 64), ('=', 64)]
        );
        assert_eq!(download_sizes(rate, queued, true), [('!', 16)]);
        // Where loss limits the streams, the daemon's round trips stay near the path's: the
        // pool grows as throughput follows (the 50 ms path at 1 % loss needs it).
        let loss_limited = |size: usize| size as f64 * 2e6;
        let unqueued = |_| 153;
        assert_eq!(
            download_sizes(loss_limited, unqueued, true),
            [('+', 32), ('+', 64), ('=', 64)]
        );
    }
}
