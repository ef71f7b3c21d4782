//! Interrupted transfers resume: an upload whose daemon is SIGKILLed or SIGTERMed, a download
//! whose client is SIGKILLed. Changed sources or served files start over, and partial bytes that
//! no longer match their journal record are sent again.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::time::Duration;

use xfer_tests::{
    journal_chunks, journal_held, journal_path, list_tree, partial_path, random_file, set_mtime,
    sha256_file, wait_until, Daemon, Tree, XferOutput, XferRun,
};

const SIZE: u64 = 64 * 1024 * 1024;
const CHUNK: u64 = 256 * 1024;
const CONNS: u64 = 4;
/// Slow enough (~8 s for 64 MiB) that the run can be interrupted part way.
const SLOW: &[&str] = &["--bwlimit", "8M", "--chunk-size", "256K", "-c", "4"];
/// The same run at full speed, with the summary.
const FAST: &[&str] = &["--chunk-size", "256K", "-c", "4", "--json"];
/// Hang guard for the polls below.
const GUARD: Duration = Duration::from_secs(120);

/// Polls the journal at `journal` until it holds at least a quarter of `size` bytes.
fn wait_for_a_quarter(journal: &Path, size: u64, run: &mut XferRun) {
    wait_until(GUARD, "the journal holds 25% of the file", || {
        let held = journal_held(journal);
        assert!(
            held >= size / 4 || run.is_running(),
            "`{}` ended before 25% was journaled (is --bwlimit honoured?)",
            run.cmd()
        );
        held >= size / 4
    });
}

/// The resumed run skipped at least what the journal held and sent no more than the rest plus
/// one window of chunks that were in flight.
#[track_caller]
fn check_resumed(out: &XferOutput, size: u64, held: u64) {
    let json = out.json();
    assert_eq!(out.json_u64("bytes_total"), size, "{json}");
    assert!(
        out.json_u64("resumed_bytes") >= held,
        "resumed less than the {held} bytes journaled: {json}"
    );
    assert!(
        out.json_u64("bytes_transferred") <= size - held + CONNS * CHUNK,
        "sent more than the {} bytes missing plus {CONNS} chunks: {json}",
        size - held
    );
}

/// Starts a slow upload, lets `stop` end the daemon once a quarter is journaled, then restarts
/// the daemon on the same root and checks the rerun resumes from what the journal held.
fn check_upload_resumes_after(stop: impl FnOnce(&mut Daemon)) {
    check_upload_of_resumes_after("up.bin", stop);
}

/// [`check_upload_resumes_after`] for an upload stored as `name`.
fn check_upload_of_resumes_after(name: &str, stop: impl FnOnce(&mut Daemon)) {
    let tree = Tree::new();
    let src = tree.src("up.bin");
    let want = random_file(&src, SIZE, 1);
    let dest = tree.root().join(name);
    let journal = journal_path(&dest);

    let mut daemon = Daemon::start(&tree.root(), &[]);
    let mut client = XferRun::send(&src, &daemon.addr(), name, SLOW);
    wait_for_a_quarter(&journal, SIZE, &mut client);
    stop(&mut daemon);
    let held = journal_held(&journal);
    assert!(
        !dest.exists(),
        "the final name exists before the upload finished"
    );
    // The client would keep retrying the dead address; only the daemon's state matters here.
    client.kill();

    let daemon = Daemon::start(&tree.root(), &[]);
    let out = XferRun::send(&src, &daemon.addr(), name, FAST).wait_ok();
    check_resumed(&out, SIZE, held);
    assert_eq!(sha256_file(&dest), want);
    assert!(!journal.exists() && !partial_path(&dest).exists());
}

#[test]
fn upload_resumes_after_the_daemon_is_killed() {
    check_upload_resumes_after(Daemon::kill);
}

/// A name of 255 bytes, the most a component holds, whose partial and journal cannot be named
/// `.NAME.xfer-part` and `.NAME.xfer-state`: they take a shortened form, found again on resume.
#[test]
fn upload_of_a_name_of_255_bytes_resumes_after_the_daemon_is_killed() {
    check_upload_of_resumes_after(&"n".repeat(255), Daemon::kill);
}

#[test]
fn upload_resumes_after_the_daemon_is_terminated() {
    check_upload_resumes_after(|daemon| {
        let status = daemon.terminate(GUARD);
        assert!(
            status.success(),
            "xferd exited with {status} on SIGTERM; stderr:\n{}",
            daemon.stderr()
        );
    });
}

#[test]
fn download_resumes_after_the_client_is_killed() {
    let tree = Tree::new();
    let want = random_file(&tree.root().join("down.bin"), SIZE, 2);
    let out_path = tree.out("down.bin");
    let journal = journal_path(&out_path);

    let daemon = Daemon::start(&tree.root(), &[]);
    let mut client = XferRun::recv("down.bin", &daemon.addr(), &out_path, SLOW);
    wait_for_a_quarter(&journal, SIZE, &mut client);
    client.kill();
    let held = journal_held(&journal);
    assert!(
        !out_path.exists(),
        "the output exists before the download finished"
    );

    let out = XferRun::recv("down.bin", &daemon.addr(), &out_path, FAST).wait_ok();
    check_resumed(&out, SIZE, held);
    assert_eq!(sha256_file(&out_path), want);
    assert!(!journal.exists() && !partial_path(&out_path).exists());
}

/// Interrupts an upload by killing its client, lets `change` rewrite the source (returning the
/// new size and SHA-256), then checks the rerun starts over and delivers the new content.
fn check_upload_of_a_changed_source(change: impl FnOnce(&Path) -> (u64, String)) {
    let size = SIZE / 2;
    let tree = Tree::new();
    let src = tree.src("changing.bin");
    random_file(&src, size, 3);
    set_mtime(&src, 1_600_000_000);
    let dest = tree.root().join("changing.bin");
    let journal = journal_path(&dest);

    let daemon = Daemon::start(&tree.root(), &[]);
    let mut client = XferRun::send(&src, &daemon.addr(), "changing.bin", SLOW);
    wait_for_a_quarter(&journal, size, &mut client);
    client.kill();
    assert!(!dest.exists());
    daemon.wait_idle(GUARD);

    let (new_size, want) = change(&src);
    let out = XferRun::send(&src, &daemon.addr(), "changing.bin", FAST).wait_ok();
    let json = out.json();
    assert_eq!(out.json_u64("resumed_bytes"), 0, "{json}");
    assert_eq!(out.json_u64("bytes_total"), new_size, "{json}");
    assert_eq!(out.json_u64("bytes_transferred"), new_size, "{json}");
    assert_eq!(
        sha256_file(&dest),
        want,
        "the daemon kept bytes of the old source"
    );
    assert!(!journal.exists() && !partial_path(&dest).exists());
}

#[test]
fn upload_of_a_source_with_new_content_and_mtime_starts_over() {
    check_upload_of_a_changed_source(|src| {
        let size = src.metadata().unwrap().len();
        let want = random_file(src, size, 4);
        set_mtime(src, 1_700_000_000);
        (size, want)
    });
}

#[test]
fn upload_of_a_source_with_a_new_size_starts_over() {
    check_upload_of_a_changed_source(|src| {
        let size = src.metadata().unwrap().len() + 4096 + 7;
        (size, random_file(src, size, 5))
    });
}

#[test]
fn download_of_a_changed_file_starts_over() {
    let tree = Tree::new();
    let served = tree.root().join("moving.bin");
    random_file(&served, SIZE / 2, 6);
    set_mtime(&served, 1_600_000_000);
    let out_path = tree.out("moving.bin");
    let journal = journal_path(&out_path);

    let daemon = Daemon::start(&tree.root(), &[]);
    let mut client = XferRun::recv("moving.bin", &daemon.addr(), &out_path, SLOW);
    wait_for_a_quarter(&journal, SIZE / 2, &mut client);
    client.kill();

    let want = random_file(&served, SIZE / 2, 7);
    set_mtime(&served, 1_700_000_000);
    let out = XferRun::recv("moving.bin", &daemon.addr(), &out_path, FAST).wait_ok();
    let json = out.json();
    assert_eq!(out.json_u64("resumed_bytes"), 0, "{json}");
    assert_eq!(
        sha256_file(&out_path),
        want,
        "the client kept bytes of the old file"
    );
    assert!(!journal.exists() && !partial_path(&out_path).exists());
}

#[test]
fn corrupted_partial_bytes_are_sent_again() {
    let tree = Tree::new();
    let src = tree.src("rot.bin");
    let want = random_file(&src, SIZE, 8);
    let dest = tree.root().join("rot.bin");
    let journal = journal_path(&dest);

    let mut daemon = Daemon::start(&tree.root(), &[]);
    let mut client = XferRun::send(&src, &daemon.addr(), "rot.bin", SLOW);
    wait_for_a_quarter(&journal, SIZE, &mut client);
    daemon.kill();
    client.kill();
    let held = journal_held(&journal);
    // Damage one journaled chunk behind the daemon's back (as a lost page would).
    let (start, end) = journal_chunks(&journal)[0];
    let mut partial = File::options()
        .write(true)
        .open(partial_path(&dest))
        .unwrap();
    partial
        .seek(SeekFrom::Start(start + (end - start) / 2))
        .unwrap();
    partial.write_all(b"bit rot").unwrap();
    drop(partial);

    let daemon = Daemon::start(&tree.root(), &[]);
    let out = XferRun::send(&src, &daemon.addr(), "rot.bin", FAST).wait_ok();
    let json = out.json();
    assert!(
        out.json_u64("resumed_bytes") <= held - (end - start),
        "the damaged chunk was trusted: {json}"
    );
    assert_eq!(
        sha256_file(&dest),
        want,
        "the damaged bytes reached the final file"
    );
    assert!(!journal.exists() && !partial_path(&dest).exists());
}

#[test]
fn a_running_upload_rides_out_a_daemon_restart_on_the_same_port() {
    let tree = Tree::new();
    let src = tree.src("ride.bin");
    let want = random_file(&src, SIZE / 2, 9);
    let dest = tree.root().join("ride.bin");
    let journal = journal_path(&dest);

    let mut daemon = Daemon::start(&tree.root(), &[]);
    let addr = daemon.addr();
    let mut client = XferRun::send(&src, &addr, "ride.bin", SLOW);
    wait_for_a_quarter(&journal, SIZE / 2, &mut client);
    daemon.kill();
    let _daemon = Daemon::start_on(&addr, &tree.root(), &[]);
    client.wait_ok();
    assert_eq!(sha256_file(&dest), want);
}

#[test]
fn two_clients_uploading_the_same_file_both_succeed() {
    let tree = Tree::new();
    let src = tree.src("twice.bin");
    let want = random_file(&src, SIZE / 4, 10);
    let daemon = Daemon::start(&tree.root(), &[]);
    let args = &["--bwlimit", "8M", "--chunk-size", "256K"];
    let first = XferRun::send(&src, &daemon.addr(), "twice.bin", args);
    let second = XferRun::send(&src, &daemon.addr(), "twice.bin", args);
    let (first, second) = (first.wait(), second.wait());
    assert_eq!(sha256_file(&tree.root().join("twice.bin")), want);
    assert_eq!(list_tree(&tree.root()), ["twice.bin"]);
    first.ok();
    second.ok();
}
