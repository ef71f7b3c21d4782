//! Deltas: a file the receiver already holds in another version moves as what changed, both
//! ways, for changes in place, insertions, truncation, growth and an unchanged file; the choice
//! is forced or made from the rate limit; an interrupted delta resumes from what it copied.

use std::time::Duration;

use rand::{RngCore, SeedableRng};
use xfer_tests::metrics::{metrics_port, scrape};
use xfer_tests::{
    journal_held, journal_path, partial_path, sha256_file, wait_until, Daemon, Tree, XferOutput,
    XferRun,
};

const MIB: usize = 1024 * 1024;
/// Hang guard for the polls below.
const GUARD: Duration = Duration::from_secs(120);

fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut bytes = vec![0; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut bytes);
    bytes
}

/// Waits until `journal` holds `bytes` while `client` still runs: a client that ended first
/// fails the test, since what it was to be caught in the middle of is over.
fn wait_journaled(client: &mut XferRun, journal: &std::path::Path, bytes: usize, what: &str) {
    wait_until(GUARD, what, || {
        let held = journal_held(journal);
        assert!(held >= bytes as u64 || client.is_running());
        held >= bytes as u64
    });
}

/// A delta slow enough (4 MB/s, small chunks, 2 connections) to be stopped while its literal
/// half still moves, reported with its reasons.
const SCRIBBLED_DELTA: [&str; 9] = [
    "--delta",
    "--json",
    "-v",
    "--bwlimit",
    "4M",
    "--chunk-size",
    "256K",
    "-c",
    "2",
];

/// Writes 4 KiB of other bytes into the copied second half of a `size`-byte partial file, as
/// another program would.
fn scribble_in_copied_half(partial: &std::path::Path, size: usize, seed: u64) {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(partial)
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &noise(4096, seed), (size * 3 / 4) as u64)
        .unwrap();
}

/// Uploads `old` whole, then `new` under the same name with `extra`; checks the daemon's file
/// is `new` byte for byte and returns the second run's output.
fn resend(old: &[u8], new: &[u8], extra: &[&str]) -> XferOutput {
    let tree = Tree::new();
    let src = tree.src("f.bin");
    let dest = tree.root().join("f.bin");
    let daemon = Daemon::start(&tree.root(), &[]);
    std::fs::write(&src, old).unwrap();
    XferRun::send(&src, &daemon.addr(), "f.bin", &["--whole-file"]).wait_ok();
    // A new mtime: the new version is another file to the daemon, whatever its content.
    std::fs::write(&src, new).unwrap();
    xfer_tests::set_mtime(&src, 1_800_000_000);
    let mut args = vec!["--json", "-c", "2"];
    args.extend_from_slice(extra);
    let out = XferRun::send(&src, &daemon.addr(), "f.bin", &args).wait_ok();
    assert_eq!(sha256_file(&dest), sha256_file(&src), "{}", out.json());
    assert!(!partial_path(&dest).exists() && !journal_path(&dest).exists());
    out
}

fn delta(out: &XferOutput) -> bool {
    out.json()["delta"]
        .as_bool()
        .unwrap_or_else(|| panic!("no delta in {}", out.json()))
}

/// `xfer send -r --json EXTRA SRC ADDR --as AS`'s arguments.
fn tree_send_args<'a>(
    src: &'a std::path::Path,
    addr: &'a str,
    to: &'a str,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut args = vec!["send", "-r", "--json"];
    args.extend_from_slice(extra);
    args.extend([src.to_str().unwrap(), addr, "--as", to]);
    args
}

/// `-v` said `file` went as a delta because `--delta` asked for one.
#[track_caller]
fn assert_forced_delta(out: &XferOutput, file: &str) {
    let told = |l: &str| l.contains("delta transfer: --delta") && l.contains(file);
    assert!(out.stderr.lines().any(told), "{file}: {}", out.stderr);
}

/// The run was a delta that sent at most `literal` bytes and copied the rest.
#[track_caller]
fn check_delta(out: &XferOutput, size: usize, literal: usize) {
    let json = out.json();
    assert!(delta(out), "{json}");
    let (sent, matched) = (out.json_u64("literal_bytes"), out.json_u64("matched_bytes"));
    assert_eq!(sent, out.json_u64("bytes_transferred"), "{json}");
    assert!(sent <= literal as u64, "sent {sent} > {literal}: {json}");
    assert!(sent + matched >= size as u64, "{json}");
}

#[test]
fn a_change_in_place_sends_little_more_than_the_change() {
    let old = noise(16 * MIB, 1);
    let mut new = old.clone();
    for (i, at) in [100_000, 5 * MIB, 11 * MIB + 7].into_iter().enumerate() {
        new[at..at + 4000].copy_from_slice(&noise(4000, 10 + i as u64));
    }
    let out = resend(&old, &new, &["--delta"]);
    check_delta(&out, new.len(), 3 * 5 * 64 * 1024);
}

#[test]
fn an_insertion_near_the_start_shifts_the_rest_and_it_is_still_found() {
    let old = noise(16 * MIB, 2);
    let mut new = old[..5000].to_vec();
    new.extend(noise(MIB, 20));
    new.extend(&old[5000..]);
    let out = resend(&old, &new, &["--delta"]);
    // The inserted bytes, and the chunks around the edges of the pieces cut by content where
    // the guesses missed.
    check_delta(&out, new.len(), MIB + 6 * 64 * 1024);
}

/// The daemon answers at once and finds the chunks where the previous match puts them: it
/// reads its old file about once for an insertion and changes in place, where indexing it whole
/// before copying read it twice.
#[test]
fn the_daemon_reads_its_old_file_about_once_for_an_insertion_and_changes_in_place() {
    let size = 32 * MIB;
    let old = noise(size, 12);
    let mut new = old[..5000].to_vec();
    new.extend(noise(256 * 1024, 120));
    new.extend(&old[5000..]);
    for (i, at) in [3 * MIB, 17 * MIB, 29 * MIB].into_iter().enumerate() {
        new[at..at + 4000].copy_from_slice(&noise(4000, 121 + i as u64));
    }
    let tree = Tree::new();
    let src = tree.src("f.bin");
    let dest = tree.root().join("f.bin");
    let daemon = Daemon::start(&tree.root(), &["--metrics", "127.0.0.1:0"]);
    std::fs::write(&src, &old).unwrap();
    XferRun::send(&src, &daemon.addr(), "f.bin", &["--whole-file"]).wait_ok();
    std::fs::write(&src, &new).unwrap();
    xfer_tests::set_mtime(&src, 1_800_000_000);
    let out = XferRun::send(&src, &daemon.addr(), "f.bin", &["--delta", "--json"]).wait_ok();
    assert_eq!(sha256_file(&dest), sha256_file(&src));
    check_delta(&out, new.len(), 256 * 1024 + 4 * 5 * 64 * 1024);
    let [read, copied] = scrape(
        metrics_port(&daemon),
        &[
            "xferd_delta_basis_read_bytes_total",
            "xferd_delta_copied_bytes_total",
        ],
    )[..] else {
        unreachable!()
    };
    assert!(
        copied >= (size - 4 * 5 * 64 * 1024) as f64,
        "copied {copied}"
    );
    assert!(read >= copied, "read {read} < copied {copied}");
    assert!(
        read <= size as f64 * 1.25,
        "read {read} bytes of a {size}-byte basis"
    );
}

#[test]
fn a_truncated_file_moves_nothing_but_its_last_chunk() {
    let old = noise(16 * MIB, 3);
    let new = old[..10 * MIB + 12345].to_vec();
    let out = resend(&old, &new, &["--delta"]);
    check_delta(&out, new.len(), 64 * 1024);
}

#[test]
fn a_grown_file_sends_what_was_appended() {
    let old = noise(16 * MIB, 4);
    let mut new = old.clone();
    new.extend(noise(MIB / 3, 40));
    let out = resend(&old, &new, &["--delta"]);
    check_delta(&out, new.len(), MIB / 3 + 64 * 1024);
}

#[test]
fn an_unchanged_file_with_a_new_mtime_moves_no_data() {
    let old = noise(8 * MIB, 5);
    let out = resend(&old, &old, &["--delta"]);
    check_delta(&out, old.len(), 0);
    assert_eq!(out.json_u64("literal_bytes"), 0);
    assert_eq!(out.json_u64("matched_bytes"), old.len() as u64);
}

#[test]
fn whole_file_forces_every_byte_to_move() {
    let old = noise(8 * MIB, 6);
    let out = resend(&old, &old, &["--whole-file", "--bwlimit", "100M"]);
    assert!(!delta(&out), "{}", out.json());
    assert_eq!(out.json_u64("literal_bytes"), old.len() as u64);
    assert_eq!(out.json_u64("matched_bytes"), 0);
}

#[test]
fn a_slow_rate_limit_makes_the_delta_the_choice() {
    let old = noise(8 * MIB, 7);
    let mut new = old.clone();
    new[MIB..MIB + 10].fill(0);
    let out = resend(&old, &new, &["--bwlimit", "100M", "-v"]);
    check_delta(&out, new.len(), 2 * 64 * 1024);
    assert!(
        out.stderr.contains("delta transfer: --bwlimit"),
        "-v does not say why: {}",
        out.stderr
    );
}

/// A new name goes whole even with `--delta`, and asks the daemon for no delta basis: a
/// connection opened beside the first asked whether the name holds anything while the first
/// opened the upload, so the data went at once instead of a round trip after the delta's own
/// question.
#[test]
fn a_new_name_goes_whole_without_the_delta_question() {
    let tree = Tree::new();
    let src = tree.src("new.bin");
    std::fs::write(&src, noise(2 * MIB, 9)).unwrap();
    let daemon = Daemon::start(&tree.root(), &[]);
    let out = XferRun::send(&src, &daemon.addr(), "new.bin", &["--delta", "--json"]).wait_ok();
    assert!(!delta(&out));
    assert_eq!(out.json_u64("literal_bytes"), 2 * MIB as u64);
    assert_eq!(sha256_file(&tree.root().join("new.bin")), sha256_file(&src));
    let log = daemon.stderr();
    assert!(log.contains("upload complete"), "{log}");
    assert!(
        !log.contains("no basis for a delta"),
        "the delta's question went: {log}"
    );
}

/// A delta whose literal half moves slowly is interrupted by `stop` once the copied half and
/// some literal data are journaled; the rerun resumes without sending what was held, nor
/// comparing signatures again: the daemon does not read its old file a second time.
fn check_delta_resumes_after(stop: impl FnOnce(&mut Daemon, &mut XferRun)) {
    let size = 32 * MIB;
    let tree = Tree::new();
    let src = tree.src("r.bin");
    let dest = tree.root().join("r.bin");
    let journal = journal_path(&dest);
    let old = noise(size, 9);
    let mut new = old[..size / 2].to_vec();
    new.extend(noise(size / 2, 90));

    let mut daemon = Daemon::start(&tree.root(), &[]);
    std::fs::write(&src, &old).unwrap();
    XferRun::send(&src, &daemon.addr(), "r.bin", &["--whole-file"]).wait_ok();
    std::fs::write(&src, &new).unwrap();
    let slow = [
        "--delta",
        "--bwlimit",
        "2M",
        "--chunk-size",
        "256K",
        "-c",
        "2",
    ];
    let mut client = XferRun::send(&src, &daemon.addr(), "r.bin", &slow);
    wait_journaled(
        &mut client,
        &journal,
        size / 2 + 2 * MIB,
        "the copied half and 2 MiB more are journaled",
    );
    stop(&mut daemon, &mut client);
    let held = journal_held(&journal);
    assert_eq!(
        sha256_file(&dest),
        xfer_tests::sha256_bytes(&old),
        "the old file stays"
    );

    let daemon = if daemon.is_running() {
        daemon
    } else {
        Daemon::start(&tree.root(), &[])
    };
    let indexed = |d: &Daemon| d.stderr().matches("delta basis opened").count();
    let indexed_before = indexed(&daemon);
    let fast = ["--delta", "--json", "--chunk-size", "256K", "-c", "2"];
    let out = XferRun::send(&src, &daemon.addr(), "r.bin", &fast).wait_ok();
    let json = out.json();
    assert!(delta(&out), "{json}");
    assert_eq!(
        indexed(&daemon),
        indexed_before,
        "the basis was indexed again"
    );
    assert!(out.json_u64("resumed_bytes") >= held, "{json}");
    assert!(
        out.json_u64("literal_bytes") <= size as u64 - held + 2 * 256 * 1024,
        "{json}"
    );
    assert_eq!(sha256_file(&dest), sha256_file(&src));
    assert!(!journal.exists() && !partial_path(&dest).exists());
}

/// The daemon's old file is rewritten while the literal data of a delta still moves: what it
/// copied was checked against the sender's hashes, the digest covers the rest, and the file
/// committed is the new version byte for byte.
#[test]
fn a_basis_rewritten_during_the_delta_never_lands_wrong() {
    let size = 16 * MIB;
    let tree = Tree::new();
    let src = tree.src("b.bin");
    let dest = tree.root().join("b.bin");
    let old = noise(size, 21);
    let mut new = old[..size / 2].to_vec();
    new.extend(noise(size / 2, 22));
    let daemon = Daemon::start(&tree.root(), &[]);
    std::fs::write(&src, &old).unwrap();
    XferRun::send(&src, &daemon.addr(), "b.bin", &["--whole-file"]).wait_ok();
    std::fs::write(&src, &new).unwrap();
    let slow = [
        "--delta",
        "--json",
        "--bwlimit",
        "4M",
        "--chunk-size",
        "256K",
        "-c",
        "2",
    ];
    let mut client = XferRun::send(&src, &daemon.addr(), "b.bin", &slow);
    let journal = journal_path(&dest);
    wait_journaled(
        &mut client,
        &journal,
        size / 2,
        "the copied half is journaled",
    );
    // Rewritten in place, as a program holding the old file open would.
    std::fs::write(&dest, noise(size, 23)).unwrap();
    let out = client.wait_ok();
    assert_eq!(sha256_file(&dest), sha256_file(&src), "{}", out.json());
    assert!(!journal.exists() && !partial_path(&dest).exists());
}

/// The flags of the run that resumes a stopped, scribbled delta: fast, and telling what it did.
const RESUME_FAST: [&str; 7] = ["--delta", "--json", "-v", "--chunk-size", "256K", "-c", "2"];

/// Runs `client` (a slow delta of a file of `size` bytes whose second half is copied from the
/// old file) until `journal` holds that half, kills it, runs `again()` (the same transfer) until
/// it has journaled 1 MiB more and kills that too; then another program writes into the copied
/// half of `partial` (`seed`). The second run's open rewrote the journal, so what the first one
/// wrote is covered by a barrier: a resume trusts it without checking its CRCs, and only the
/// whole-file digest's read-back can see the change.
fn stop_twice_and_scribble(
    mut client: XferRun,
    (journal, partial): (&std::path::Path, &std::path::Path),
    (size, seed): (usize, u64),
    again: impl FnOnce() -> XferRun,
) {
    let bytes = size / 2;
    wait_journaled(&mut client, journal, bytes, "the copied half is journaled");
    client.kill();
    let held = journal_held(journal) as usize;
    let mut client = again();
    wait_journaled(
        &mut client,
        journal,
        held + MIB,
        "the resumed run journals 1 MiB more",
    );
    client.kill();
    assert!(
        journal_held(journal) as usize > bytes,
        "the copied half is held"
    );
    scribble_in_copied_half(partial, size, seed);
}

/// Bytes of the daemon's partial file change on disk while a delta upload is stopped (its
/// client killed, after the copied half landed): the resumed run reads the held bytes back for
/// its whole-file digest, which does not match the client's; nothing is renamed into place, and
/// the client sends the whole file again in the same run. (Bytes changed while the transfer
/// writes them are hashed as written, from memory: proto.md §5.5.)
#[test]
fn an_upload_whose_partial_changes_while_stopped_is_caught_on_resume_and_sent_again_whole() {
    let size = 16 * MIB;
    let tree = Tree::new();
    let src = tree.src("p.bin");
    let dest = tree.root().join("p.bin");
    let old = noise(size, 51);
    // The first half is new (literal data, slow); the second is copied from the daemon's old
    // file at once.
    let mut new = noise(size / 2, 52);
    new.extend(&old[size / 2..]);
    let daemon = Daemon::start(&tree.root(), &[]);
    std::fs::write(&src, &old).unwrap();
    XferRun::send(&src, &daemon.addr(), "p.bin", &["--whole-file"]).wait_ok();
    std::fs::write(&src, &new).unwrap();
    xfer_tests::set_mtime(&src, 1_800_000_000);
    let (journal, partial) = (journal_path(&dest), partial_path(&dest));
    let run = || XferRun::send(&src, &daemon.addr(), "p.bin", &SCRIBBLED_DELTA);
    stop_twice_and_scribble(run(), (&journal, &partial), (size, 53), run);
    let out = XferRun::send(&src, &daemon.addr(), "p.bin", &RESUME_FAST).wait_ok();
    assert_eq!(sha256_file(&dest), sha256_file(&src), "{}", out.stderr);
    assert!(out.json_u64("resumed_bytes") > 0, "{}", out.json());
    assert!(
        out.stderr.contains("the delta did not add up"),
        "{}",
        out.stderr
    );
    assert!(!delta(&out), "{}", out.json());
    assert!(!journal.exists() && !partial.exists());
}

#[test]
fn a_delta_resumes_after_the_client_is_killed() {
    check_delta_resumes_after(|_, client| client.kill());
}

#[test]
fn a_delta_resumes_after_the_daemon_is_killed() {
    check_delta_resumes_after(|daemon, client| {
        daemon.kill();
        client.kill();
    });
}

#[test]
fn the_large_files_of_a_tree_copy_go_as_deltas() {
    let tree = Tree::new();
    let src = tree.src("t");
    std::fs::create_dir_all(&src).unwrap();
    let big: Vec<Vec<u8>> = (0..3).map(|i| noise(4 * MIB, 100 + i)).collect();
    for (i, bytes) in big.iter().enumerate() {
        std::fs::write(src.join(format!("big{i}")), bytes).unwrap();
    }
    std::fs::write(src.join("small"), b"small file").unwrap();
    let daemon = Daemon::start(&tree.root(), &[]);
    let addr = daemon.addr();
    let send = |extra: &[&str]| xfer_tests::xfer(tree_send_args(&src, &addr, "t", extra)).ok();
    send(&["--whole-file"]);
    // Two of the large files change a little; the third and the small one do not.
    for (i, old) in big.iter().take(2).enumerate() {
        let mut bytes = old.clone();
        bytes[MIB..MIB + 100].fill(i as u8);
        std::fs::write(src.join(format!("big{i}")), bytes).unwrap();
    }
    let out = send(&["--delta", "-v"]);
    let json = out.json();
    assert_eq!(out.json_u64("files_transferred"), 2, "{json}");
    // The tree says what its large files' deltas moved, and `-v` which file went how and why.
    assert_eq!(json["delta"], true, "{json}");
    assert_eq!(out.json_u64("delta_files"), 2, "{json}");
    assert_eq!(
        out.json_u64("literal_bytes"),
        out.json_u64("bytes_transferred"),
        "{json}"
    );
    assert!(
        out.json_u64("matched_bytes") >= 2 * (4 * MIB as u64 - 2 * 64 * 1024),
        "{json}"
    );
    for name in ["big0", "big1"] {
        assert_forced_delta(&out, name);
    }
    assert!(
        out.json_u64("bytes_transferred") <= 2 * 2 * 64 * 1024,
        "{json}"
    );
    for name in ["big0", "big1", "big2", "small"] {
        assert_eq!(
            sha256_file(&tree.root().join("t").join(name)),
            sha256_file(&src.join(name)),
            "{name}"
        );
    }
}

/// `count` light files of 2 MiB of noise (seeds from `seed`), `t/f00`, `t/f01`, … in the
/// test's sources.
struct LightTree {
    src: std::path::PathBuf,
    files: Vec<Vec<u8>>,
}

impl LightTree {
    fn new(tree: &Tree, count: u64, seed: u64) -> Self {
        let src = tree.src("t");
        std::fs::create_dir_all(&src).unwrap();
        let files: Vec<Vec<u8>> = (0..count).map(|i| noise(2 * MIB, seed + i)).collect();
        let light = Self { src, files };
        for (i, bytes) in light.files.iter().enumerate() {
            std::fs::write(light.path(i), bytes).unwrap();
        }
        light
    }

    fn path(&self, i: usize) -> std::path::PathBuf {
        self.src.join(format!("f{i:02}"))
    }

    /// `xfer send -r --json EXTRA t ADDR --as t`, which must succeed.
    fn send(&self, addr: &str, extra: &[&str]) -> XferOutput {
        xfer_tests::xfer(tree_send_args(&self.src, addr, "t", extra)).ok()
    }

    /// Rewrites `run` bytes in the middle of each of the first `changed` files.
    fn change_in_place(&self, changed: usize, run: usize) {
        for (i, old) in self.files.iter().take(changed).enumerate() {
            let mut bytes = old.clone();
            bytes[MIB..MIB + run].fill(i as u8);
            std::fs::write(self.path(i), bytes).unwrap();
        }
    }

    /// Asserts that every file arrived under `t/` in `root` as it is in the sources.
    fn assert_arrived(&self, root: &std::path::Path) {
        for i in 0..self.files.len() {
            let name = format!("f{i:02}");
            assert_eq!(
                sha256_file(&root.join("t").join(&name)),
                sha256_file(&self.path(i)),
                "{name}"
            );
        }
    }
}

/// A tree's light files (above the small-file size, a few chunks at most) changed at the
/// receiver move as deltas over the copy's open connection (`-c 1`: one), all at once: the
/// daemon accepts no other connection, where each file used to open its own.
#[test]
fn the_light_files_of_a_changed_tree_go_as_deltas_over_the_open_connection() {
    let tree = Tree::new();
    let light = LightTree::new(&tree, 12, 200);
    let daemon = Daemon::start(&tree.root(), &["--metrics", "127.0.0.1:0"]);
    let (addr, port) = (daemon.addr(), metrics_port(&daemon));
    light.send(&addr, &["--whole-file"]);
    let left_to_sync = || scrape(port, &["xferd_commits_left_to_sync_total"])[0];
    // Sent whole, each left its flush to the tree's closing `Sync` too (`CAP_TREE_SYNC`).
    let whole_left = left_to_sync();
    assert_eq!(whole_left, 12.0);
    // Ten of them change in place; two do not.
    light.change_in_place(10, 8192);
    let accepted = || scrape(port, &["xferd_connections_accepted_total"])[0];
    let before = accepted();
    let out = light.send(&addr, &["--delta", "-v", "-c", "1"]);
    let json = out.json();
    assert_eq!(accepted() - before, 1.0, "{json}");
    // Each commit left its flush to the tree's closing `Sync`.
    assert_eq!(left_to_sync() - whole_left, 10.0, "{json}");
    assert_eq!(out.json_u64("files_transferred"), 10, "{json}");
    assert_eq!(out.json_u64("delta_files"), 10, "{json}");
    assert!(
        out.json_u64("literal_bytes") <= 10 * 4 * 64 * 1024,
        "{json}"
    );
    assert!(
        out.json_u64("matched_bytes") >= 10 * (2 * MIB as u64 - 4 * 64 * 1024),
        "{json}"
    );
    assert_forced_delta(&out, "t/f03");
    light.assert_arrived(&tree.root());
}

/// A tree's changed small files (below the small-file size, which travel whole in batches)
/// move as deltas beside its light files where a delta pays for their sum: forced here
/// (`--delta`); on loopback, a fast path, they go whole by default. Files under 64 KiB, unchanged
/// files and new files are not deltas either way.
#[test]
fn a_trees_changed_small_files_go_as_deltas_where_their_sum_pays() {
    let tree = Tree::new();
    let src = tree.src("s");
    std::fs::create_dir_all(&src).unwrap();
    let path = |name: &str| src.join(name);
    let mut files: Vec<(String, Vec<u8>)> = (0..10)
        .map(|i| (format!("mid{i}"), noise(200 * 1024, 1200 + i)))
        .collect();
    files.push(("tiny".into(), noise(32 * 1024, 1300)));
    for (name, bytes) in &files {
        std::fs::write(path(name), bytes).unwrap();
    }
    let daemon = Daemon::start(&tree.root(), &[]);
    let addr = daemon.addr();
    let send = |extra: &[&str]| xfer_tests::xfer(tree_send_args(&src, &addr, "s", extra)).ok();
    let assert_arrived = |names: &[String]| {
        for name in names {
            let arrived = tree.root().join("s").join(name);
            assert_eq!(sha256_file(&arrived), sha256_file(&path(name)), "{name}");
        }
    };
    send(&["--whole-file"]);
    // Eight of the ten change in place, the tiny one too, and one file is new.
    let change = |files: &mut Vec<(String, Vec<u8>)>, seed: u64| {
        for (i, (name, bytes)) in files
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| *i < 8 || *i == 10)
        {
            let at = bytes.len() / 4 + i * 1000;
            bytes[at..at + 8192].copy_from_slice(&noise(8192, seed + i as u64));
            std::fs::write(path(name), &bytes).unwrap();
        }
    };
    change(&mut files, 1400);
    std::fs::write(path("new"), noise(150 * 1024, 1500)).unwrap();
    let names: Vec<String> = files
        .iter()
        .map(|(n, _)| n.clone())
        .chain(["new".into()])
        .collect();

    let out = send(&["--delta", "-v", "-c", "2"]);
    let json = out.json();
    assert_eq!(out.json_u64("files_transferred"), 10, "{json}");
    assert_eq!(out.json_u64("delta_files"), 8, "{json}");
    // Each change and the 1 KiB blocks either side, the tiny file and the new one whole.
    let most = 8 * (8192 + 4096) + 32 * 1024 + 150 * 1024;
    assert!(out.json_u64("literal_bytes") <= most, "{json}");
    assert!(
        out.json_u64("matched_bytes") >= 8 * (200 * 1024 - 8192 - 4096),
        "{json}"
    );
    assert_forced_delta(&out, "s/mid3");
    assert_arrived(&names);

    // By default, over loopback, the same changes go whole.
    change(&mut files, 1600);
    let out = send(&[]);
    let json = out.json();
    assert_eq!(out.json_u64("files_transferred"), 9, "{json}");
    assert_eq!(out.json_u64("delta_files"), 0, "{json}");
    assert_eq!(
        out.json_u64("literal_bytes"),
        8 * 200 * 1024 + 32 * 1024,
        "{json}"
    );
    assert_arrived(&names);
}

/// A small change costs a light file about its own bytes as literal data, not the whole
/// content-defined chunks around it: the daemon sums the basis around the spans the chunks
/// missed in small blocks (`CAP_DELTA_FINE`), and the client copies the blocks it finds there.
/// Changes in place, an insertion, a removal, a truncation and growth all arrive right.
#[test]
fn a_small_change_costs_a_light_file_about_its_own_bytes() {
    let tree = Tree::new();
    let light = LightTree::new(&tree, 8, 500);
    let daemon = Daemon::start(&tree.root(), &[]);
    let addr = daemon.addr();
    light.send(&addr, &["--whole-file"]);
    let mut changed: Vec<Vec<u8>> = light.files.clone();
    // 8 KiB rewritten in place, at an offset of its own in each of four files.
    for (i, bytes) in changed.iter_mut().take(4).enumerate() {
        let at = MIB / 2 + i * 77_777 + 333;
        bytes[at..at + 8192].copy_from_slice(&noise(8192, 900 + i as u64));
    }
    changed[4].splice(900_000..900_000, noise(3000, 950));
    changed[5].drain(700_000..705_000);
    changed[6].truncate(3 * MIB / 2);
    changed[7].extend(noise(10_000, 951));
    for (i, bytes) in changed.iter().enumerate() {
        std::fs::write(light.path(i), bytes).unwrap();
    }
    let out = light.send(&addr, &["--delta", "-c", "2"]);
    let json = out.json();
    assert_eq!(out.json_u64("delta_files"), 8, "{json}");
    // Each change and up to two 1 KiB blocks around it; whole chunks of 16 KiB on average
    // either side came to about 250 KB here.
    let most = 4 * (8192 + 2048) + (3000 + 2048) + 2048 + 1024 + (10_000 + 1024);
    assert!(out.json_u64("literal_bytes") <= most, "{json}");
    let total: u64 = changed.iter().map(|b| b.len() as u64).sum();
    assert_eq!(
        out.json_u64("literal_bytes") + out.json_u64("matched_bytes"),
        total,
        "{json}"
    );
    light.assert_arrived(&tree.root());
}

/// A light file that kept its size is signed in fixed blocks, found where they were: bytes that
/// moved within it (removed in one place, as many inserted further on), which those blocks
/// miss, are found again by the finer blocks of the span missed, and cost about the bytes
/// inserted, not the half megabyte that moved.
#[test]
fn bytes_moved_within_a_light_file_of_the_same_size_are_found_again() {
    let tree = Tree::new();
    let light = LightTree::new(&tree, 2, 700);
    let daemon = Daemon::start(&tree.root(), &[]);
    let addr = daemon.addr();
    light.send(&addr, &["--whole-file"]);
    let mut moved = light.files[0].clone();
    moved.drain(600_000..603_000);
    moved.splice(1_100_000..1_100_000, noise(3000, 701));
    assert_eq!(moved.len(), light.files[0].len());
    std::fs::write(light.path(0), &moved).unwrap();
    let out = light.send(&addr, &["--delta", "-c", "1"]);
    let json = out.json();
    assert_eq!(out.json_u64("delta_files"), 1, "{json}");
    // The bytes inserted, and a few 1 KiB blocks at the edges of what moved.
    assert!(out.json_u64("literal_bytes") <= 3000 + 8 * 1024, "{json}");
    assert_eq!(
        out.json_u64("literal_bytes") + out.json_u64("matched_bytes"),
        moved.len() as u64,
        "{json}"
    );
    light.assert_arrived(&tree.root());
}

/// A daemon with a window of one `Data` ends a connection on which a second arrives before
/// the first is answered (it sees this when they come one after the other, the first still
/// being written). The light files' literal data, two ranges of each file, keeps within that
/// window: every file goes as a delta over the one connection, none through the fallback's
/// connections of their own.
#[test]
fn the_light_files_literal_data_keeps_within_the_daemons_window() {
    let tree = Tree::new();
    let light = LightTree::new(&tree, 12, 400);
    let daemon = Daemon::start(&tree.root(), &["--window", "1", "--metrics", "127.0.0.1:0"]);
    let (addr, port) = (daemon.addr(), metrics_port(&daemon));
    light.send(&addr, &["--whole-file"]);
    // Two runs far apart in each file: two literal ranges, two `Data` one after the other.
    for (i, old) in light.files.iter().enumerate() {
        let mut bytes = old.clone();
        bytes[MIB / 4..MIB / 4 + 8192].fill(i as u8);
        bytes[7 * MIB / 4..7 * MIB / 4 + 8192].fill(i as u8);
        std::fs::write(light.path(i), bytes).unwrap();
    }
    let accepted = || scrape(port, &["xferd_connections_accepted_total"])[0];
    let before = accepted();
    let out = light.send(&addr, &["--delta", "-c", "1"]);
    let json = out.json();
    assert_eq!(accepted() - before, 1.0, "{json}");
    assert_eq!(out.json_u64("delta_files"), 12, "{json}");
    light.assert_arrived(&tree.root());
}

/// A daemon that allows two open transfers per connection refuses the `DeltaPut`s beyond them
/// (`Error{Busy}`) without ending the connection: the client keeps two open from then on and
/// sends the refused files again over the same connection, so every file goes as a delta there,
/// none through the fallback's connections of their own, and arrives whole and right.
#[test]
fn light_files_keep_within_the_daemons_transfers_per_connection() {
    let tree = Tree::new();
    let light = LightTree::new(&tree, 6, 300);
    let daemon = Daemon::start(
        &tree.root(),
        &["--max-transfers-per-conn", "2", "--metrics", "127.0.0.1:0"],
    );
    let (addr, port) = (daemon.addr(), metrics_port(&daemon));
    light.send(&addr, &["--whole-file", "-c", "1"]);
    light.change_in_place(6, 4096);
    let accepted = || scrape(port, &["xferd_connections_accepted_total"])[0];
    let before = accepted();
    let out = light.send(&addr, &["--delta", "-c", "1"]);
    let json = out.json();
    assert_eq!(accepted() - before, 1.0, "{json}");
    assert_eq!(out.json_u64("files_transferred"), 6, "{json}");
    assert_eq!(out.json_u64("delta_files"), 6, "{json}");
    assert!(out.json_u64("literal_bytes") <= 6 * 4 * 64 * 1024, "{json}");
    light.assert_arrived(&tree.root());
}

/// The daemon serves `new`; the client holds `old` at the output path (with another mtime) and
/// fetches with `extra`; checks the output is `new` and returns the run's output.
fn refetch(old: &[u8], new: &[u8], extra: &[&str]) -> XferOutput {
    let tree = Tree::new();
    std::fs::write(tree.root().join("g.bin"), new).unwrap();
    let out_path = tree.out("g.bin");
    std::fs::write(&out_path, old).unwrap();
    xfer_tests::set_mtime(&out_path, 1_600_000_000);
    let daemon = Daemon::start(&tree.root(), &[]);
    let mut args = vec!["--json", "-c", "2"];
    args.extend_from_slice(extra);
    let out = XferRun::recv("g.bin", &daemon.addr(), &out_path, &args).wait_ok();
    assert_eq!(
        sha256_file(&out_path),
        sha256_file(&tree.root().join("g.bin")),
        "{}",
        out.json()
    );
    assert!(!partial_path(&out_path).exists() && !journal_path(&out_path).exists());
    out
}

#[test]
fn a_download_fetches_only_what_changed_in_place_and_what_was_inserted() {
    let old = noise(16 * MIB, 11);
    let mut new = old[..3 * MIB].to_vec();
    new.extend(noise(100_000, 12));
    new.extend(&old[3 * MIB..]);
    new[9 * MIB..9 * MIB + 5000].copy_from_slice(&noise(5000, 13));
    let out = refetch(&old, &new, &["--delta"]);
    check_delta(&out, new.len(), 100_000 + 6 * 64 * 1024);
}

/// A download's client opens its own copy without indexing it first, and reads it about once
/// to find an insertion and changes in place, where indexing it whole before copying read it
/// twice.
#[test]
fn a_download_reads_the_local_file_about_once() {
    let size = 32 * MIB;
    let old = noise(size, 13);
    let mut new = old[..5000].to_vec();
    new.extend(noise(256 * 1024, 130));
    new.extend(&old[5000..]);
    for (i, at) in [3 * MIB, 17 * MIB, 29 * MIB].into_iter().enumerate() {
        new[at..at + 4000].copy_from_slice(&noise(4000, 131 + i as u64));
    }
    let tree = Tree::new();
    std::fs::write(tree.root().join("g.bin"), &new).unwrap();
    let out_path = tree.out("g.bin");
    std::fs::write(&out_path, &old).unwrap();
    xfer_tests::set_mtime(&out_path, 1_600_000_000);
    let daemon = Daemon::start(&tree.root(), &[]);
    let args = [
        "recv",
        "g.bin",
        &daemon.addr(),
        "-o",
        out_path.to_str().unwrap(),
        "--delta",
        "--json",
    ];
    let out = XferRun::spawn_with_env(args, &[("XFER_LOG", "xfer_client=debug")]).wait_ok();
    assert_eq!(
        sha256_file(&out_path),
        sha256_file(&tree.root().join("g.bin"))
    );
    check_delta(&out, new.len(), 256 * 1024 + 4 * 5 * 64 * 1024);
    let line = out
        .stderr
        .lines()
        .find(|l| l.contains("delta: bytes copied from the local file"))
        .unwrap_or_else(|| panic!("no delta line in:\n{}", out.stderr));
    // Without the colours the log may carry.
    let mut plain = String::new();
    let mut in_escape = false;
    for c in line.chars() {
        match c {
            '\x1b' => in_escape = true,
            'm' if in_escape => in_escape = false,
            c if !in_escape => plain.push(c),
            _ => {}
        }
    }
    let read: u64 = plain
        .split_once(" read=")
        .and_then(|(_, rest)| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no read= in {plain}"));
    assert!(
        read <= size as u64 * 5 / 4,
        "read {read} bytes of a {size}-byte local file"
    );
}

#[test]
fn a_download_of_an_unchanged_file_moves_no_data() {
    let old = noise(8 * MIB, 14);
    let out = refetch(&old, &old, &["--bwlimit", "100M"]);
    check_delta(&out, old.len(), 0);
    assert_eq!(out.json_u64("literal_bytes"), 0);
}

#[test]
fn a_download_of_a_truncated_or_grown_file_fetches_only_the_new_tail() {
    let old = noise(8 * MIB, 15);
    let out = refetch(&old, &old[..5 * MIB + 3], &["--delta"]);
    check_delta(&out, 5 * MIB + 3, 64 * 1024);
    let mut grown = old.clone();
    grown.extend(noise(MIB, 16));
    let out = refetch(&old, &grown, &["--delta"]);
    check_delta(&out, grown.len(), MIB + 64 * 1024);
    let out = refetch(&old, &grown, &["--whole-file"]);
    assert!(!delta(&out));
    assert_eq!(out.json_u64("literal_bytes"), grown.len() as u64);
}

#[test]
fn a_download_delta_resumes_after_the_client_is_killed() {
    let size = 32 * MIB;
    let tree = Tree::new();
    let old = noise(size, 17);
    let mut new = old[..size / 2].to_vec();
    new.extend(noise(size / 2, 18));
    std::fs::write(tree.root().join("r.bin"), &new).unwrap();
    let out_path = tree.out("r.bin");
    std::fs::write(&out_path, &old).unwrap();
    let journal = journal_path(&out_path);
    let daemon = Daemon::start(&tree.root(), &[]);
    let slow = [
        "--delta",
        "--bwlimit",
        "2M",
        "--chunk-size",
        "256K",
        "-c",
        "2",
    ];
    let mut client = XferRun::recv("r.bin", &daemon.addr(), &out_path, &slow);
    wait_journaled(
        &mut client,
        &journal,
        size / 2 + 2 * MIB,
        "the copied half and 2 MiB more are journaled",
    );
    client.kill();
    let held = journal_held(&journal);
    assert_eq!(
        sha256_file(&out_path),
        xfer_tests::sha256_bytes(&old),
        "the old file stays"
    );

    let fast = ["--delta", "--json", "--chunk-size", "256K", "-c", "2"];
    let out = XferRun::recv("r.bin", &daemon.addr(), &out_path, &fast).wait_ok();
    let json = out.json();
    assert!(out.json_u64("resumed_bytes") >= held, "{json}");
    assert!(
        out.json_u64("literal_bytes") <= size as u64 - held + 2 * 256 * 1024,
        "{json}"
    );
    assert_eq!(sha256_file(&out_path), xfer_tests::sha256_bytes(&new));
    assert!(!journal.exists() && !partial_path(&out_path).exists());
}

/// Bytes of a download's partial file change on disk while its delta is stopped (the client
/// killed, after the copied half landed): the resumed run reads the held bytes back for its
/// whole-file digest, which does not match the server's; nothing is renamed into place, and the
/// file is fetched once more, whole, in the same run, which `-v` tells.
#[test]
fn a_download_whose_partial_changes_while_stopped_is_caught_on_resume_and_fetched_again_whole() {
    let size = 16 * MIB;
    let tree = Tree::new();
    let old = noise(size, 41);
    // The first half is new (literal data, slow); the second is copied from the local file
    // at once.
    let mut new = noise(size / 2, 42);
    new.extend(&old[size / 2..]);
    std::fs::write(tree.root().join("c.bin"), &new).unwrap();
    let out_path = tree.out("c.bin");
    std::fs::write(&out_path, &old).unwrap();
    xfer_tests::set_mtime(&out_path, 1_600_000_000);
    let (journal, partial) = (journal_path(&out_path), partial_path(&out_path));
    let daemon = Daemon::start(&tree.root(), &[]);
    let run = || XferRun::recv("c.bin", &daemon.addr(), &out_path, &SCRIBBLED_DELTA);
    stop_twice_and_scribble(run(), (&journal, &partial), (size, 43), run);
    let out = XferRun::recv("c.bin", &daemon.addr(), &out_path, &RESUME_FAST).wait_ok();
    assert_eq!(
        sha256_file(&out_path),
        xfer_tests::sha256_bytes(&new),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr
            .contains("digest did not match the server's, its partial was discarded"),
        "{}",
        out.stderr
    );
    assert!(!delta(&out), "{}", out.json());
    assert!(!journal.exists() && !partial.exists());
}

/// Sets the mtime of the directory `path` to `secs` after the epoch.
fn set_dir_mtime(path: &std::path::Path, secs: u64) {
    let time = std::time::UNIX_EPOCH + Duration::from_secs(secs);
    std::fs::File::open(path)
        .and_then(|d| d.set_modified(time))
        .unwrap_or_else(|e| panic!("set mtime of {}: {e}", path.display()));
}

/// The mtime of `path` in nanoseconds since the epoch, as the filesystem holds it.
fn mtime_ns(path: &std::path::Path) -> u128 {
    let modified = std::fs::metadata(path).unwrap().modified().unwrap();
    modified
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// A tree whose changed files are all light closes with their last commits
/// (`CAP_TREE_CLOSE`): the closing (`AwaitCommits`, the `SetMeta`s, `Sync`) goes once the last
/// `Commit` is written on every connection, not after their answers, and the daemon carries it
/// out once those commits were. Each directory still ends with the source's mtime although its
/// files were renamed into it on other connections, and every file arrives whole with its own.
#[test]
fn a_tree_of_light_changes_closes_with_its_last_commits() {
    let tree = Tree::new();
    let src = tree.src("t");
    let dirs = ["d0", "d1", "d1/d2"];
    let mut files = Vec::new();
    for (d, dir) in dirs.iter().enumerate() {
        std::fs::create_dir_all(src.join(dir)).unwrap();
        for i in 0..4 {
            let path = src.join(dir).join(format!("f{i}"));
            std::fs::write(&path, noise(2 * MIB, 700 + (d * 4 + i) as u64)).unwrap();
            files.push(path);
        }
    }
    let daemon = Daemon::start(&tree.root(), &[]);
    let addr = daemon.addr();
    let send = |extra: &[&str], env: &[(&str, &str)]| {
        XferRun::spawn_with_env(tree_send_args(&src, &addr, "t", extra), env).wait_ok()
    };
    send(&["--whole-file"], &[]);
    // Every file changes in place, with a new mtime of its own; the directories keep theirs.
    for (k, path) in files.iter().enumerate() {
        let mut bytes = std::fs::read(path).unwrap();
        bytes[MIB..MIB + 4096].fill(k as u8);
        std::fs::write(path, bytes).unwrap();
        xfer_tests::set_mtime(path, 1_750_000_000 + k as u64);
    }
    for (k, dir) in ["", "d0", "d1", "d1/d2"].iter().enumerate() {
        set_dir_mtime(&src.join(dir), 1_600_000_000 + k as u64);
    }
    let out = send(
        &["--delta", "-c", "4"],
        &[("XFER_LOG", "xfer_client=debug")],
    );
    let json = out.json();
    assert_eq!(out.json_u64("delta_files"), files.len() as u64, "{json}");
    assert!(
        out.stderr.contains("closed with the last commits"),
        "{}",
        out.stderr
    );
    let dest = tree.root().join("t");
    for path in &files {
        let rel = path.strip_prefix(&src).unwrap();
        assert_eq!(sha256_file(&dest.join(rel)), sha256_file(path), "{rel:?}");
        assert_eq!(mtime_ns(&dest.join(rel)), mtime_ns(path), "{rel:?}");
    }
    for dir in ["", "d0", "d1", "d1/d2"] {
        assert_eq!(
            mtime_ns(&dest.join(dir)),
            mtime_ns(&src.join(dir)),
            "{dir:?}"
        );
    }
}

/// An `AwaitCommits` naming an upload whose `Commit` never comes (its connection stays open and
/// busy) is answered `Error{Incomplete}` once the daemon's idle timeout has passed, instead of
/// holding the connection and the tree's closing behind it for ever; the connection stays usable.
#[test]
fn an_awaited_commit_that_never_comes_is_refused_after_the_idle_timeout() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use xfer_proto::{AwaitCommits, ErrorCode, Frame, CAP_TREE_CLOSE, CAP_TREE_SYNC};
    use xfer_tests::raw::{open_write, RawConn};

    let tree = Tree::new();
    let daemon = Daemon::start(&tree.root(), &["--idle-timeout", "2"]);
    let mut uploading = RawConn::connect(daemon.socket_addr());
    uploading.handshake_offering(None, CAP_TREE_SYNC);
    let opened = uploading.request(&open_write("never-committed.bin", 10));
    assert!(matches!(opened, Frame::WriteOpened(_)), "{opened:?}");
    let mut closing = RawConn::connect(daemon.socket_addr());
    let welcome = closing.handshake_offering(None, CAP_TREE_SYNC | CAP_TREE_CLOSE);
    assert_ne!(welcome.capabilities & CAP_TREE_CLOSE, 0, "{welcome:?}");
    closing.send(&Frame::AwaitCommits(AwaitCommits {
        names: vec!["never-committed.bin".into()],
    }));
    // The upload's connection keeps asking meanwhile: neither idle nor gone, so its upload
    // stays open and unsettled.
    let done = std::sync::Arc::new(AtomicBool::new(false));
    let busy = std::thread::spawn({
        let done = std::sync::Arc::clone(&done);
        move || {
            while !done.load(Ordering::Relaxed) {
                uploading.assert_usable();
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    });
    let answer = closing.recv();
    done.store(true, Ordering::Relaxed);
    busy.join().unwrap();
    match answer {
        Some(Frame::Error(e)) => {
            assert_eq!(e.error_code(), Some(ErrorCode::Incomplete), "{e:?}");
            assert!(e.message.contains("not carried out"), "{e:?}");
        }
        other => panic!("AwaitCommits of an upload never committed answered {other:?}"),
    }
    closing.assert_usable();
}
