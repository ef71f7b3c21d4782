//! Graceful shutdown: `SIGTERM` makes `xferd` stop accepting, finish or abort the chunks in
//! flight within its drain deadline, keep a resume state that matches the bytes on disk, and
//! exit 0; the client that was mid-transfer says so in one line and resumes on rerun against
//! the restarted daemon.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use xfer_tests::{journal_chunks, journal_held, journal_path, partial_path, wait_until, Daemon};

use xfer_tests::setup::{wait_for_journal, Setup, Way, CHUNK, CONNS, PACED};

const SIZE: u64 = 16 * 1024 * 1024;
const WINDOW: u64 = 2;
/// [`PACED`], giving up 2 s after the daemon is gone: ~2 s for 16 MiB.
fn slow() -> Vec<&'static str> {
    [PACED, &["--retry-deadline", "2"]].concat()
}
const FAST: &[&str] = &["-c", "4", "--chunk-size", "64K", "--json"];
const GUARD: Duration = Duration::from_secs(120);

/// Asserts that every range the journal at `journal` records holds, in `partial`, the bytes of
/// `source` at the same offsets.
#[track_caller]
fn assert_journal_matches(journal: &Path, partial: &Path, source: &Path) {
    let chunks = journal_chunks(journal);
    assert!(!chunks.is_empty(), "{} records nothing", journal.display());
    let (partial, source) = (File::open(partial).unwrap(), File::open(source).unwrap());
    for (start, end) in chunks {
        let len = (end - start) as usize;
        let (mut held, mut real) = (vec![0u8; len], vec![0u8; len]);
        partial.read_exact_at(&mut held, start).unwrap();
        source.read_exact_at(&mut real, start).unwrap();
        assert!(
            held == real,
            "the journal records [{start}, {end}) but the partial file holds other bytes there"
        );
    }
}

/// Checks the daemon exited 0 and says it drained within its deadline.
#[track_caller]
fn terminate(s: &mut Setup) {
    let status = s.daemon.terminate(GUARD);
    let log = s.daemon.stderr();
    assert!(
        status.success(),
        "xferd exited with {status} on SIGTERM:\n{log}"
    );
    assert!(
        log.contains("drained") && !log.contains("drain deadline hit"),
        "xferd did not drain its connections within its deadline:\n{log}"
    );
}

/// SIGTERM a quarter into the transfer, then check the state left behind and resume.
fn check_sigterm_mid_transfer(way: Way, seed: u64) {
    let mut s = Setup::new(&[]);
    let want = s.file(way, "term.bin", SIZE, seed);
    let dest = s.dest(way, "term.bin");
    let source = match way {
        Way::Upload => s.tree.src("term.bin"),
        Way::Download => s.tree.root().join("term.bin"),
    };
    // Straight to the daemon: the client sees the shutdown itself, and the restarted daemon
    // listens on the same port.
    let addr = s.daemon.addr();
    let mut client = s.start_direct(way, "term.bin", &slow());
    wait_for_journal(&dest, SIZE / 4, &mut client);
    terminate(&mut s);

    let line = client.wait().error_line();
    eprintln!("{line}");
    assert!(
        line.contains("rerun to resume"),
        "the client does not say how to go on: {line}"
    );
    assert!(
        !dest.exists(),
        "the final name exists after an interrupted transfer"
    );
    let journal = journal_path(&dest);
    let held = journal_held(&journal);
    assert_journal_matches(&journal, &partial_path(&dest), &source);

    s.daemon = Daemon::start_on(&addr, &s.tree.root(), &[]);
    let out = s.start_direct(way, "term.bin", FAST).wait_ok();
    s.check_received(way, "term.bin", &want);
    let json = out.json();
    assert!(
        out.json_u64("resumed_bytes") >= held,
        "resumed less than the {held} bytes journaled: {json}"
    );
    assert!(
        out.json_u64("bytes_transferred") <= SIZE - held + CONNS * WINDOW * CHUNK,
        "sent more than the missing bytes and a window per connection: {json}"
    );
}

#[test]
fn sigterm_mid_upload_keeps_resume_state_and_the_rerun_resumes() {
    check_sigterm_mid_transfer(Way::Upload, 1);
}

#[test]
fn sigterm_mid_download_keeps_resume_state_and_the_rerun_resumes() {
    check_sigterm_mid_transfer(Way::Download, 2);
}

/// A connection stalled in the middle of a chunk does not hold the shutdown up: the daemon
/// abandons that chunk, drains within its deadline and exits 0; the journal holds only whole,
/// correct chunks, and the rerun completes.
#[test]
fn sigterm_with_a_connection_stalled_mid_chunk_still_drains() {
    let mut s = Setup::new(&[]);
    let want = s.file(Way::Upload, "stuck.bin", SIZE, 3);
    let dest = s.dest(Way::Upload, "stuck.bin");
    // 300 KiB is not a frame boundary: the stall holds a chunk half-sent.
    s.proxy.stall_after(300 * 1024, 1);
    let mut client = s.start(Way::Upload, "stuck.bin", &slow());
    wait_for_journal(&dest, SIZE / 4, &mut client);
    wait_until(GUARD, "a connection is stalled", || {
        s.proxy.stats().stalled == 1
    });
    terminate(&mut s);
    client.wait().error_line();
    assert!(!dest.exists());
    assert_journal_matches(
        &journal_path(&dest),
        &partial_path(&dest),
        &s.tree.src("stuck.bin"),
    );

    s.daemon = Daemon::start(&s.tree.root(), &[]);
    s.proxy.set_upstream(s.daemon.socket_addr());
    s.start(Way::Upload, "stuck.bin", FAST).wait_ok();
    s.check_received(Way::Upload, "stuck.bin", &want);
}
