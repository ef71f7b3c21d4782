//! Crashes at random moments: a loop SIGKILLs the daemon or the client during uploads and
//! downloads, restarts what it killed and reruns until the transfer is done. Every file ends
//! byte-identical, the final name never holds a partial file, and what was sent twice stays
//! within one window of chunks per connection per interruption, as counted by the proxy.

use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use xfer_tests::{try_sha256_file, Daemon};

use xfer_tests::setup::{Setup, Way, CHUNK, CONNS, PACED};

const SIZE: u64 = 4 * 1024 * 1024;
/// The daemon runs with `--window 1`: one unacknowledged chunk per connection.
const WINDOW: u64 = 1;
const DAEMON_ARGS: &[&str] = &["--window", "1"];
/// [`PACED`], riding out a daemon's restart: ~0.5 s per file, so that kills land mid-transfer.
fn args() -> Vec<&'static str> {
    [PACED, &["--retry-deadline", "30"]].concat()
}
/// Interruptions the loop must inflict.
const INTERRUPTIONS: u64 = 20;
/// Iterations at most (a kill can miss when the run finishes first).
const MAX_ITERATIONS: u64 = 40;
/// Reruns after one interruption before the test fails.
const MAX_RERUNS: usize = 3;
const GUARD: Duration = Duration::from_secs(120);

#[derive(Clone, Copy, Debug)]
enum Victim {
    Daemon,
    Client,
}

/// Payload bytes that crossed the proxy in `way`'s data direction so far.
fn moved(s: &Setup, way: Way) -> u64 {
    s.proxy.stats().direction(way.data()).payload_bytes
}

/// Asserts the final name is absent or holds exactly `want`; returns whether it holds it.
#[track_caller]
fn final_name_is_whole(s: &Setup, way: Way, name: &str, want: &str, when: &str) -> bool {
    match try_sha256_file(&s.dest(way, name)) {
        Ok(seen) => {
            assert_eq!(
                seen, want,
                "{name}: the final name holds a partial file {when}"
            );
            true
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => panic!("{name}: {e}"),
    }
}

#[test]
fn random_sigkills_of_daemon_and_client_during_uploads_and_downloads() {
    let seed: u64 = rand::random();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut s = Setup::new(DAEMON_ARGS);
    let mut interruptions = 0u64;
    let mut resent_total = 0u64;
    let mut log = Vec::new();
    let mut i = 0u64;
    while interruptions < INTERRUPTIONS {
        assert!(
            i < MAX_ITERATIONS,
            "only {interruptions} of {i} kills landed mid-transfer (seed {seed})"
        );
        let way = if i.is_multiple_of(2) {
            Way::Upload
        } else {
            Way::Download
        };
        let victim = if (i / 2).is_multiple_of(2) {
            Victim::Daemon
        } else {
            Victim::Client
        };
        let name = format!("crash-{i}.bin");
        let want = s.file(way, &name, SIZE, 1000 + i);
        let before = moved(&s, way);
        // Anywhere from before the first byte to the last one.
        let target = rng.gen_range(0..=SIZE);
        let context =
            format!("iteration {i} ({way:?}, kill {victim:?} after {target} bytes, seed {seed})");

        let started = Instant::now();
        let mut client = s.start(way, &name, &args());
        let end = Instant::now() + GUARD;
        while client.is_running() && moved(&s, way) - before < target {
            assert!(Instant::now() < end, "{context}: no progress");
            std::thread::sleep(Duration::from_millis(2));
        }
        let interrupted = client.is_running();
        let killed_at = started.elapsed();
        match victim {
            Victim::Daemon => {
                s.daemon.kill();
                s.daemon = Daemon::start(&s.tree.root(), DAEMON_ARGS);
                s.proxy.set_upstream(s.daemon.socket_addr());
            }
            Victim::Client => client.kill(),
        }
        let mut whole = final_name_is_whole(&s, way, &name, &want, "after the kill");

        // A killed daemon is ridden out or not; a killed client is simply run again.
        let first = client.wait();
        let mut done = first.status.success();
        if !done && matches!(victim, Victim::Daemon) {
            first.error_line();
        }
        let mut reruns = 0;
        // A run killed after the receiver made the file final leaves nothing to resume (a rerun
        // would send it all again: see `faults::rerun_after_a_lost_commit_answer_sends_nothing_again`).
        while !done && !whole {
            assert!(reruns < MAX_RERUNS, "{context}: {reruns} reruns failed");
            let out = s.start(way, &name, &args()).wait();
            reruns += 1;
            done = out.status.success();
            if !done {
                out.error_line();
            }
            whole = final_name_is_whole(&s, way, &name, &want, "after a rerun");
        }
        s.check_received(way, &name, &want);

        let total = moved(&s, way) - before;
        assert!(
            total >= SIZE,
            "{context}: only {total} bytes crossed the proxy"
        );
        let resent = total - SIZE;
        let bound = u64::from(interrupted) * CONNS * WINDOW * CHUNK;
        assert!(
            resent <= bound,
            "{context}: {resent} bytes sent twice, above {bound}; log so far:\n{}",
            log.join("\n")
        );
        log.push(format!(
            "{context}: killed at {killed_at:?}, interrupted {interrupted}, reruns {reruns}, resent {resent}"
        ));
        interruptions += u64::from(interrupted);
        resent_total += resent;
        i += 1;
    }
    let bound = interruptions * CONNS * WINDOW * CHUNK;
    assert!(resent_total <= bound, "{resent_total} > {bound}");
    eprintln!(
        "{interruptions} interruptions in {i} iterations, {resent_total} bytes resent (bound {bound}):\n{}",
        log.join("\n")
    );
    s.daemon.assert_running();
}
