//! Network faults between `xfer` and `xferd`, injected by the test proxy: a connection cut in
//! the middle of a transfer, every connection cut now and then, a daemon unreachable for a
//! while or for good, a stalled or slow link, and bits flipped in chunk payloads or anywhere in
//! the stream. Each test drives the real binaries through [`Proxy`] and checks the final file's
//! SHA-256 against its source.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use xfer_proto::FrameType;
use xfer_tests::proxy::{Corruption, Direction};
use xfer_tests::setup::{wait_for_journal, Setup, Way};
use xfer_tests::setup::{CHUNK, CONNS, PACED};
use xfer_tests::{
    journal_chunks, journal_held, journal_path, partial_path, sha256_file, try_sha256_file,
    wait_until, XferOutput,
};

const SIZE: u64 = 8 * 1024 * 1024;
/// The daemon's default `--window`: chunks a connection may have unanswered.
const WINDOW: u64 = 2;
/// [`PACED`], with the `--json` summary: ~1 s for 8 MiB.
fn slow() -> Vec<&'static str> {
    [PACED, &["--json"]].concat()
}

/// Hang guard for the polls below.
const GUARD: Duration = Duration::from_secs(120);

#[track_caller]
fn assert_sent_at_most(out: &XferOutput, limit: u64) {
    let sent = out.json_u64("bytes_transferred");
    assert!(
        sent <= limit,
        "`{}` moved {sent} payload bytes, more than {limit}: {}",
        out.cmd,
        out.json()
    );
}

// ---------------------------------------------------------------------------------------------
// Dropped connections

/// One of the four connections is cut after 512 KiB: its chunks in flight go back to the queue,
/// and at most one window of chunks is sent twice.
fn check_one_connection_cut(way: Way, seed: u64) {
    let s = Setup::new(&[]);
    let want = s.file(way, "cut.bin", SIZE, seed);
    s.proxy.cut_after(512 * 1024, 1);
    let out = s.start(way, "cut.bin", &slow()).wait_ok();
    s.check_received(way, "cut.bin", &want);
    let stats = s.proxy.stats();
    assert_eq!(stats.cut, 1, "the proxy cut no connection: {stats:?}");
    let moved = stats.direction(way.data()).payload_bytes;
    assert!(
        moved <= SIZE + WINDOW * CHUNK,
        "{moved} payload bytes crossed the proxy for a {SIZE}-byte file and one cut: {stats:?}"
    );
    assert_sent_at_most(&out, SIZE + WINDOW * CHUNK);
}

#[test]
fn upload_survives_one_connection_cut_mid_transfer() {
    check_one_connection_cut(Way::Upload, 1);
}

#[test]
fn download_survives_one_connection_cut_mid_transfer() {
    check_one_connection_cut(Way::Download, 2);
}

/// Every connection is cut five times during the transfer (each time the receiver has
/// journaled another sixth of the file); the client reconnects each time and finishes, sending
/// at most a window per connection again per cut.
fn check_every_connection_cut_now_and_then(way: Way, seed: u64) {
    const CUTS: u64 = 5;
    let s = Setup::new(&[]);
    let want = s.file(way, "cuts.bin", SIZE, seed);
    let dest = s.dest(way, "cuts.bin");
    let mut client = s.start(way, "cuts.bin", &slow());
    for cut in 1..=CUTS {
        wait_for_journal(&dest, cut * SIZE / (CUTS + 1), &mut client);
        assert!(s.proxy.cut_all() > 0, "no connection open at cut {cut}");
    }
    let out = client.wait_ok();
    s.check_received(way, "cuts.bin", &want);
    assert_sent_at_most(&out, SIZE + CUTS * CONNS * WINDOW * CHUNK);
    let stats = s.proxy.stats();
    assert!(
        stats.accepted > CONNS,
        "the client never reconnected: {stats:?}"
    );
}

#[test]
fn upload_survives_every_connection_cut_now_and_then() {
    check_every_connection_cut_now_and_then(Way::Upload, 3);
}

#[test]
fn download_survives_every_connection_cut_now_and_then() {
    check_every_connection_cut_now_and_then(Way::Download, 4);
}

/// `--retry-deadline` bounds one outage, not the whole transfer: two cuts of every connection
/// further apart than the deadline, each healed at once, must not make the client give up.
#[test]
fn cuts_further_apart_than_the_retry_deadline_do_not_end_the_transfer() {
    let s = Setup::new(&[]);
    let want = s.file(Way::Upload, "apart.bin", SIZE, 5);
    let dest = s.dest(Way::Upload, "apart.bin");
    // 2 MiB/s: the 70% - 10% of the file between the cuts, less one window per connection
    // still in flight, takes about 2 s to send, twice the deadline.
    let args = &[
        "-c",
        "4",
        "--chunk-size",
        "64K",
        "--bwlimit",
        "2M",
        "--retry-deadline",
        "1",
        "--json",
    ];
    let mut client = s.start(Way::Upload, "apart.bin", args);
    wait_for_journal(&dest, SIZE / 10, &mut client);
    assert!(s.proxy.cut_all() > 0);
    wait_for_journal(&dest, SIZE * 7 / 10, &mut client);
    assert!(s.proxy.cut_all() > 0);
    client.wait_ok();
    s.check_received(Way::Upload, "apart.bin", &want);
}

/// While the daemon is unreachable the client keeps reconnecting; once it is back the transfer
/// completes.
#[test]
fn upload_rides_out_a_short_outage() {
    let s = Setup::new(&[]);
    let want = s.file(Way::Upload, "outage.bin", SIZE, 6);
    let dest = s.dest(Way::Upload, "outage.bin");
    let mut client = s.start(Way::Upload, "outage.bin", &slow());
    wait_for_journal(&dest, SIZE / 4, &mut client);
    s.proxy.set_unreachable(true);
    wait_until(GUARD, "the client has tried to reconnect 8 times", || {
        assert!(client.is_running(), "`{}` gave up", client.cmd());
        s.proxy.stats().refused >= 8
    });
    s.proxy.set_unreachable(false);
    let out = client.wait_ok();
    s.check_received(Way::Upload, "outage.bin", &want);
    assert_sent_at_most(&out, SIZE + CONNS * WINDOW * CHUNK);
}

/// Unreachable for longer than `--retry-deadline`: the client exits 1 with one line saying it
/// gave up and how to resume; the rerun sends only what the daemon does not hold.
fn check_unreachable_past_the_deadline(way: Way, seed: u64) {
    let s = Setup::new(&[]);
    let want = s.file(way, "gone.bin", SIZE, seed);
    let dest = s.dest(way, "gone.bin");
    let args = [PACED, &["--json", "--retry-deadline", "2"]].concat();
    let mut client = s.start(way, "gone.bin", &args);
    wait_for_journal(&dest, SIZE / 4, &mut client);
    s.proxy.set_unreachable(true);
    let out = client.wait();
    let line = out.error_line();
    assert!(
        line.contains("gave up") && line.contains("rerun to resume"),
        "unclear error after the retry deadline: {line}"
    );
    assert!(s.proxy.stats().refused > 0, "the client never tried again");
    assert!(
        !dest.exists(),
        "the final name exists after a failed transfer"
    );
    let held = journal_held(&journal_path(&dest));
    assert!(held >= SIZE / 4, "the resume state was lost ({held} bytes)");

    s.proxy.set_unreachable(false);
    let out = s.start(way, "gone.bin", &slow()).wait_ok();
    s.check_received(way, "gone.bin", &want);
    assert!(
        out.json_u64("resumed_bytes") >= held,
        "resumed less than the {held} bytes held: {}",
        out.json()
    );
    assert_sent_at_most(&out, SIZE - held + CONNS * WINDOW * CHUNK);
}

#[test]
fn upload_gives_up_after_the_retry_deadline_and_the_rerun_resumes() {
    check_unreachable_past_the_deadline(Way::Upload, 7);
}

#[test]
fn download_gives_up_after_the_retry_deadline_and_the_rerun_resumes() {
    check_unreachable_past_the_deadline(Way::Download, 8);
}

/// A connection that goes silent mid-chunk (the proxy holds its bytes both ways) is closed by
/// the daemon's idle timeout; its chunks move to other connections and the transfer completes.
fn check_stalled_connection(way: Way, seed: u64) {
    let s = Setup::new(&["--idle-timeout", "2"]);
    let want = s.file(way, "stall.bin", SIZE, seed);
    s.proxy.stall_after(300 * 1024, 1);
    let out = s.start(way, "stall.bin", &slow()).wait_ok();
    s.check_received(way, "stall.bin", &want);
    let stats = s.proxy.stats();
    assert_eq!(stats.stalled, 1, "no connection stalled: {stats:?}");
    assert_sent_at_most(&out, SIZE + WINDOW * CHUNK);
}

#[test]
fn upload_survives_a_stalled_connection() {
    check_stalled_connection(Way::Upload, 9);
}

#[test]
fn download_survives_a_stalled_connection() {
    check_stalled_connection(Way::Download, 10);
}

/// 20 ms each way on every connection: both directions still deliver identical files.
#[test]
fn delayed_link_round_trip() {
    let s = Setup::new(&[]);
    s.proxy.set_delay(Duration::from_millis(20));
    let up = s.file(Way::Upload, "slow-up.bin", SIZE / 2, 11);
    let down = s.file(Way::Download, "slow-down.bin", SIZE / 2, 12);
    let args = &["-c", "4", "--chunk-size", "64K"];
    let upload = s.start(Way::Upload, "slow-up.bin", args);
    let download = s.start(Way::Download, "slow-down.bin", args);
    upload.wait_ok();
    download.wait_ok();
    s.check_received(Way::Upload, "slow-up.bin", &up);
    s.check_received(Way::Download, "slow-down.bin", &down);
}

// ---------------------------------------------------------------------------------------------
// Commit

/// The connection carrying `Committed` back to the client is cut: the daemon stays reachable,
/// so the upload must still end in success (asking again on a new connection), and it must not
/// send the file a second time.
#[test]
fn upload_survives_its_commit_answer_being_cut() {
    let s = Setup::new(&[]);
    let want = s.file(Way::Upload, "commit.bin", SIZE / 2, 13);
    s.proxy
        .cut_at_frame(Direction::ToClient, FrameType::Committed, 1);
    let out = s
        .start(
            Way::Upload,
            "commit.bin",
            &["-c", "4", "--chunk-size", "64K", "--json"],
        )
        .wait();
    assert_eq!(s.proxy.stats().cut, 1, "the Committed frame was not cut");
    s.check_received(Way::Upload, "commit.bin", &want);
    let out = out.ok();
    assert_sent_at_most(&out, SIZE / 2 + CONNS * WINDOW * CHUNK);
}

/// A client that never heard `Committed` and gave up at once (`--retry-deadline 0`) is run
/// again, as a user would: the rerun sends (next to) nothing, since the daemon already holds
/// every byte under the final name.
#[test]
fn rerun_after_a_lost_commit_answer_sends_nothing_again() {
    let s = Setup::new(&[]);
    let want = s.file(Way::Upload, "again.bin", SIZE / 2, 14);
    s.proxy
        .cut_at_frame(Direction::ToClient, FrameType::Committed, 1);
    let args = &["-c", "4", "--chunk-size", "64K", "--json"];
    let first = s
        .start(
            Way::Upload,
            "again.bin",
            &[args, &["--retry-deadline", "0"][..]].concat(),
        )
        .wait();
    assert_eq!(s.proxy.stats().cut, 1, "the Committed frame was not cut");
    assert_eq!(sha256_file(&s.dest(Way::Upload, "again.bin")), want);
    if !first.status.success() {
        first.error_line();
    }
    let out = s.start(Way::Upload, "again.bin", args).wait_ok();
    s.check_received(Way::Upload, "again.bin", &want);
    assert_sent_at_most(&out, CONNS * WINDOW * CHUNK);
}

// ---------------------------------------------------------------------------------------------
// Corruption

/// Number of lines of `log` containing `needle`.
fn count_lines(log: &str, needle: &str) -> u64 {
    log.lines().filter(|l| l.contains(needle)).count() as u64
}

/// Every 7th chunk arrives with one bit flipped in its payload: each is refused by its CRC,
/// never written, asked again and counted, in the log and in `--json` as `crc_retries`.
fn check_flipped_payloads(way: Way, seed: u64) -> (Setup, XferOutput) {
    let s = Setup::new(&[]);
    let want = s.file(way, "flip.bin", SIZE, seed);
    s.proxy
        .set_corruption(way.data(), Corruption::Payloads { every: 7 });
    let args = &["-c", "4", "--chunk-size", "64K", "--json"];
    let out = s
        .start_with_env(way, "flip.bin", args, &[("XFER_LOG", "warn")])
        .wait_ok();
    s.check_received(way, "flip.bin", &want);
    let flipped = s.proxy.stats().direction(way.data()).flipped;
    assert!(
        flipped >= SIZE / CHUNK / 7,
        "only {flipped} chunks were damaged"
    );
    assert_eq!(
        out.json_u64("crc_retries"),
        flipped,
        "crc_retries differs from the {flipped} damaged chunks: {}",
        out.json()
    );
    assert_eq!(out.json_u64("bytes_transferred"), SIZE + flipped * CHUNK);
    (s, out)
}

#[test]
fn upload_chunks_with_flipped_bits_are_rejected_and_sent_again() {
    let (s, _) = check_flipped_payloads(Way::Upload, 15);
    let flipped = s.proxy.stats().to_server.flipped;
    let log = s.daemon.stderr();
    assert_eq!(
        count_lines(&log, "failed its CRC"),
        flipped,
        "the daemon's log does not show each of the {flipped} CRC failures:\n{log}"
    );
}

#[test]
fn download_chunks_with_flipped_bits_are_asked_again() {
    let (s, out) = check_flipped_payloads(Way::Download, 16);
    let flipped = s.proxy.stats().to_client.flipped;
    assert_eq!(
        count_lines(&out.stderr, "failed its CRC"),
        flipped,
        "the client's log does not show each of the {flipped} CRC failures:\n{}",
        out.stderr
    );
}

/// The chunk at 1 MiB is damaged every time it is sent: while the rest of the file arrives it
/// is never written (its bytes in the partial file stay as reserved, zero) nor journaled. Once
/// the link heals, it goes through and the file is complete.
#[test]
fn a_chunk_that_keeps_failing_its_crc_is_never_written() {
    const AT: u64 = 1024 * 1024;
    let s = Setup::new(&[]);
    let want = s.file(Way::Upload, "bad.bin", SIZE, 17);
    let dest = s.dest(Way::Upload, "bad.bin");
    s.proxy
        .set_corruption(Direction::ToServer, Corruption::PayloadAt { offset: AT });
    let mut client = s.start(Way::Upload, "bad.bin", &slow());
    wait_for_journal(&dest, SIZE - CHUNK, &mut client);
    wait_until(GUARD, "the bad chunk was refused 5 times", || {
        s.proxy.stats().to_server.flipped >= 5
    });
    let chunks = journal_chunks(&journal_path(&dest));
    assert!(
        chunks
            .iter()
            .all(|&(start, end)| end <= AT || start >= AT + CHUNK),
        "a record covers the damaged chunk: {chunks:?}"
    );
    let mut bytes = vec![0xffu8; CHUNK as usize];
    File::open(partial_path(&dest))
        .unwrap()
        .read_exact_at(&mut bytes, AT)
        .unwrap();
    assert!(
        bytes.iter().all(|&b| b == 0),
        "bytes of the damaged chunk were written to the partial file"
    );
    assert!(!dest.exists());

    s.proxy.set_corruption(Direction::ToServer, Corruption::Off);
    let out = client.wait_ok();
    s.check_received(Way::Upload, "bad.bin", &want);
    assert_eq!(
        out.json_u64("crc_retries"),
        s.proxy.stats().to_server.flipped,
        "{}",
        out.json()
    );
}

/// A damaged `Data` header sends an intact chunk (its CRC matches) to the wrong offset, 4 MiB
/// further. The client stops at the odd `Ack`; the rerun resumes from a journal that trusts the
/// misplaced chunk, so only the whole-file digest can tell: the commit is refused, the partial
/// discarded, and the next run sends the file again. The final name never holds the damage.
#[test]
fn a_chunk_sent_to_the_wrong_offset_is_caught_by_the_whole_file_digest() {
    let s = Setup::new(&[]);
    let want = s.file(Way::Upload, "moved.bin", SIZE, 20);
    let dest = s.dest(Way::Upload, "moved.bin");
    s.proxy
        .set_corruption(Direction::ToServer, Corruption::DataOffset { xor: 1 << 22 });
    // The first run is slow: the real chunk at 4 MiB is still ~2 s away when it stops.
    let mut args = &["-c", "4", "--chunk-size", "64K", "--bwlimit", "2M"][..];
    let mut failures = Vec::new();
    loop {
        let out = s.start(Way::Upload, "moved.bin", args).wait();
        if let Ok(seen) = try_sha256_file(&dest) {
            assert_eq!(
                seen, want,
                "the final name holds damaged content after `{}`",
                out.cmd
            );
        }
        if out.status.success() {
            break;
        }
        failures.push(out.error_line());
        assert!(failures.len() < 5, "5 runs failed: {failures:#?}");
        args = &["-c", "4", "--chunk-size", "64K"];
    }
    eprintln!("failed runs before success: {failures:#?}");
    s.check_received(Way::Upload, "moved.bin", &want);
    assert_eq!(
        s.proxy.stats().to_server.flipped,
        1,
        "not exactly one header was damaged"
    );
    assert!(
        failures.iter().any(|l| l.contains("checksum mismatch")),
        "the whole-file digest never refused the misplaced chunk: {failures:#?}"
    );
}

/// Bits flipped anywhere in the stream, headers included: runs may fail (one line each) and
/// are rerun, but the final name only ever holds the source's exact bytes, which the
/// whole-file digest guarantees even when a damaged header sent a chunk to the wrong offset.
fn check_random_flips(way: Way, seed: u64) {
    // The idle timeout rescues a connection whose damaged length prefix promised more bytes
    // than will ever come.
    let s = Setup::new(&["--idle-timeout", "3"]);
    let want = s.file(way, "noise.bin", SIZE, seed);
    let dest = s.dest(way, "noise.bin");
    for dir in [Direction::ToServer, Direction::ToClient] {
        s.proxy
            .set_corruption(dir, Corruption::Bytes { one_in: 512 * 1024 });
    }
    let args = &["-c", "4", "--chunk-size", "64K", "--retry-deadline", "20"];
    let mut runs = Vec::new();
    loop {
        let out = s.start(way, "noise.bin", args).wait();
        if let Ok(seen) = try_sha256_file(&dest) {
            assert_eq!(
                seen, want,
                "the final name holds damaged content after `{}`",
                out.cmd
            );
        }
        let ok = out.status.success();
        if !ok {
            runs.push(out.error_line());
        }
        if ok {
            break;
        }
        assert!(runs.len() < 10, "10 runs failed: {runs:#?}");
    }
    s.check_received(way, "noise.bin", &want);
    let flipped = s.proxy.stats().to_server.flipped + s.proxy.stats().to_client.flipped;
    assert!(flipped > 0, "no bit was flipped");
    eprintln!("{flipped} bits flipped; failed runs: {runs:#?}");
}

#[test]
fn upload_through_random_bit_flips_ends_identical() {
    check_random_flips(Way::Upload, 18);
}

#[test]
fn download_through_random_bit_flips_ends_identical() {
    check_random_flips(Way::Download, 19);
}

// ---------------------------------------------------------------------------------------------
// The tail

/// One of four connections stalls for good once its first chunks are in flight (the daemon's
/// idle timeout is far off): the other connections move its chunks at the end, the transfer
/// completes, and the stalled connection is closed rather than waited for.
fn check_stalled_connection_does_not_hold_the_end(way: Way, seed: u64) {
    let s = Setup::new(&["--idle-timeout", "86400"]);
    let want = s.file(way, "tail.bin", SIZE, seed);
    s.proxy.stall_after(300 * 1024, 1);
    let out = s
        .start(
            way,
            "tail.bin",
            &["-c", "4", "--chunk-size", "64K", "--json", "-v"],
        )
        .wait_ok();
    s.check_received(way, "tail.bin", &want);
    let stats = s.proxy.stats();
    assert_eq!(stats.stalled, 1, "no connection stalled: {stats:?}");
    let copies = out.json_u64("duplicate_chunks");
    assert!(
        (1..=WINDOW).contains(&copies),
        "the stalled connection's chunks were not moved elsewhere, or more was copied: {}",
        out.json()
    );
    assert_sent_at_most(&out, SIZE + 2 * WINDOW * CHUNK);
}

#[test]
fn upload_is_not_held_back_by_a_stalled_connection() {
    check_stalled_connection_does_not_hold_the_end(Way::Upload, 41);
}

#[test]
fn download_is_not_held_back_by_a_stalled_connection() {
    check_stalled_connection_does_not_hold_the_end(Way::Download, 42);
}
