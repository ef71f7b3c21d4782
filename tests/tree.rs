//! Directory trees (`send -r`, `recv -r`) through the real binaries: content, modes, mtimes
//! (directories too), empty directories and inner links survive a round trip; with
//! `--safe-links`, links leading out are left out with a warning, as special files are; reruns
//! of an unchanged tree move no data; `--checksum` catches a change that keeps size and mtime; an interrupted copy resumes; and a
//! symlink planted in the daemon's root is never followed, for reading or for writing; a deep
//! pipeline of long names over one connection moves intact both ways.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use xfer_tests::metrics::{metrics_port, scrape};
use xfer_tests::{
    journal_held, journal_path, list_tree, random_file, sha256_file, wait_until, xfer, Daemon, Pki,
    Tree, XferOutput, XferRun,
};

/// Hang guard for the polls below.
const GUARD: Duration = Duration::from_secs(60);
const MIB: u64 = 1024 * 1024;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// What a tree entry looks like, as compared between source and copies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Node {
    File {
        sha256: String,
        mode: u32,
        mtime_ns: i64,
    },
    Dir {
        mode: u32,
        mtime_ns: i64,
    },
    Link {
        target: String,
    },
    Other,
}

/// Every entry below `dir` (the top itself as `""`), by `/`-separated relative path. Links are
/// read, never followed.
pub(crate) fn snapshot(dir: &Path) -> BTreeMap<String, Node> {
    fn node(path: &Path) -> Node {
        let meta = fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let mode = meta.permissions().mode() & 0o7777;
        let mtime_ns = meta.mtime() * 1_000_000_000 + meta.mtime_nsec();
        let kind = meta.file_type();
        if kind.is_symlink() {
            let target = fs::read_link(path).expect("readlink");
            Node::Link {
                target: exact(target.as_os_str()),
            }
        } else if kind.is_dir() {
            Node::Dir { mode, mtime_ns }
        } else if kind.is_file() {
            Node::File {
                sha256: sha256_file(path),
                mode,
                mtime_ns,
            }
        } else {
            Node::Other
        }
    }
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<String, Node>) {
        for entry in fs::read_dir(dir).expect("read_dir") {
            let path = entry.expect("dir entry").path();
            let rel = exact(path.strip_prefix(base).expect("below base").as_os_str());
            let n = node(&path);
            let is_dir = matches!(n, Node::Dir { .. });
            out.insert(rel, n);
            if is_dir {
                walk(base, &path, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    out.insert(String::new(), node(dir));
    walk(dir, dir, &mut out);
    out
}

/// A path as a key that tells every name apart: itself when UTF-8, else its bytes escaped
/// (never the lossy form, under which two different names compare equal).
fn exact(path: &OsStr) -> String {
    match path.to_str() {
        Some(s) => s.to_string(),
        None => format!("bytes:{}", path.as_bytes().escape_ascii()),
    }
}

/// `snapshot(src)` without the entries a tree copy leaves out.
pub(crate) fn expected(src: &Path, left_out: &[&str]) -> BTreeMap<String, Node> {
    let mut want = snapshot(src);
    for name in left_out {
        assert!(
            want.remove(*name).is_some(),
            "{name} is not in the source tree"
        );
    }
    want
}

/// Asserts two snapshots are equal, naming the first entries that differ.
#[track_caller]
pub(crate) fn assert_same(got: &BTreeMap<String, Node>, want: &BTreeMap<String, Node>, what: &str) {
    let mut diffs = Vec::new();
    for (path, w) in want {
        match got.get(path) {
            Some(g) if g == w => {}
            Some(g) => diffs.push(format!("{path:?}: got {g:?}, want {w:?}")),
            None => diffs.push(format!("{path:?}: missing, want {w:?}")),
        }
    }
    for (path, g) in got {
        if !want.contains_key(path) {
            diffs.push(format!("{path:?}: unexpected {g:?}"));
        }
    }
    assert!(
        diffs.is_empty(),
        "{what} differs from its source in {} entries, e.g.:\n{}",
        diffs.len(),
        diffs
            .iter()
            .take(12)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Sets the mtime of a file or directory to `secs.nanos` after the epoch.
fn set_mtime_ns(path: &Path, secs: u64, nanos: u32) {
    let time = SystemTime::UNIX_EPOCH + Duration::new(secs, nanos);
    let file = if path.is_dir() {
        File::open(path)
    } else {
        File::options().write(true).open(path)
    };
    file.and_then(|f| f.set_modified(time))
        .unwrap_or_else(|e| panic!("set mtime of {}: {e}", path.display()));
}

fn set_mode(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

fn mkfifo(path: &Path) {
    rustix::fs::mknodat(
        rustix::fs::CWD,
        path,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap_or_else(|e| panic!("mkfifo {}: {e}", path.display()));
}

/// `xfer send -r SRC ADDR --as DEST EXTRA…`.
fn send_tree(src: &Path, addr: &str, dest: &str, extra: &[&str]) -> XferRun {
    let mut args: Vec<OsString> = vec!["send".into(), "-r".into(), src.into(), addr.into()];
    args.extend(["--as".into(), dest.into()]);
    args.extend(extra.iter().map(OsString::from));
    XferRun::spawn(args)
}

/// `xfer recv -r NAME ADDR -o OUT EXTRA…`.
fn recv_tree(name: &str, addr: &str, out: &Path, extra: &[&str]) -> XferRun {
    let mut args: Vec<OsString> = vec!["recv".into(), "-r".into(), name.into(), addr.into()];
    args.extend(["-o".into(), out.into()]);
    args.extend(extra.iter().map(OsString::from));
    XferRun::spawn(args)
}

/// Asserts the `--json` summary of a tree copy: `(files_total, files_transferred,
/// files_skipped, bytes_total, bytes_transferred)`.
#[track_caller]
fn assert_counts(out: &XferOutput, want: (u64, u64, u64, u64, u64)) {
    let (files_total, files_transferred, files_skipped, bytes_total, bytes) = want;
    out.assert_json_u64s(
        &[
            "files_total",
            "files_transferred",
            "files_skipped",
            "bytes_total",
            "bytes_transferred",
        ],
        &[
            files_total,
            files_transferred,
            files_skipped,
            bytes_total,
            bytes,
        ],
    );
}

/// Asserts every entry under the daemon's `root` lies in `dest` (or is one of its parents), and
/// that no partial or journal file was left behind.
#[track_caller]
fn assert_root_holds_only(root: &Path, dest: &str) {
    let parents: Vec<String> = dest
        .split('/')
        .scan(String::new(), |acc, part| {
            acc.push_str(part);
            acc.push('/');
            Some(acc.clone())
        })
        .collect();
    for entry in list_tree(root) {
        assert!(
            parents.contains(&entry) || entry.starts_with(&format!("{dest}/")),
            "the daemon's root holds {entry:?}, outside {dest:?}"
        );
        assert!(
            !entry.contains(".xfer-"),
            "left behind in the daemon's root: {entry:?}"
        );
    }
}

/// Regular files in a source tree: (count, bytes).
pub(crate) fn file_totals(tree: &BTreeMap<String, Node>, src: &Path) -> (u64, u64) {
    tree.iter()
        .filter(|(_, n)| matches!(n, Node::File { .. }))
        .fold((0, 0), |(n, b), (p, _)| {
            (n + 1, b + fs::metadata(src.join(p)).unwrap().len())
        })
}

/// The full source tree of the round-trip tests, under `src` (which must not exist): nested
/// and empty directories, files of 0, 1, 4 KiB, 1 MiB, 1 MiB + 1 bytes (whole-file path) and
/// 3 MiB-ish (chunked path), modes 0600/0640/0755, explicit mtimes with nanoseconds, a link
/// inside the tree, two links leading out and a FIFO. Returns the entries a copy leaves out.
pub(crate) fn build_full_tree(src: &Path) -> Vec<&'static str> {
    let files: &[(&str, u64, u32)] = &[
        ("zero", 0, 0o644),
        ("one", 1, 0o600),
        ("docs/page.txt", 4096, 0o640),
        ("docs/deep/nested/exact.bin", MIB, 0o600),
        ("docs/deep/over.bin", MIB + 1, 0o644),
        ("bin/tool", 4096 + 7, 0o755),
        ("big/a.bin", 3 * MIB, 0o644),
        ("big/b.bin", 3 * MIB + 12_345, 0o600),
    ];
    for (i, (name, size, mode)) in files.iter().enumerate() {
        let path = src.join(name);
        random_file(&path, *size, 100 + i as u64);
        set_mode(&path, *mode);
        set_mtime_ns(
            &path,
            1_500_000_000 + i as u64 * 86_400,
            123_456_789 * (i as u32 % 7 + 1),
        );
    }
    fs::create_dir_all(src.join("empty")).unwrap();
    symlink("docs/page.txt", src.join("to-page")).unwrap();
    symlink("../one", src.join("docs/up")).unwrap();
    symlink("/etc/passwd", src.join("escape")).unwrap();
    // Climbs above the tree top (and the tree's parent): left out.
    symlink("../../../outside", src.join("docs/climb")).unwrap();
    mkfifo(&src.join("pipe"));
    // Directories last, children before parents: adding entries changes a directory's mtime.
    let dirs: &[(&str, u32)] = &[
        ("docs/deep/nested", 0o700),
        ("docs/deep", 0o750),
        ("docs", 0o755),
        ("bin", 0o711),
        ("big", 0o770),
        ("empty", 0o705),
        ("", 0o750),
    ];
    for (i, (dir, mode)) in dirs.iter().enumerate() {
        let path = src.join(dir);
        set_mode(&path, *mode);
        set_mtime_ns(
            &path,
            1_400_000_000 + i as u64 * 3_600,
            987_654_321 - i as u32,
        );
    }
    vec!["escape", "docs/climb", "pipe"]
}

/// Asserts `stderr` has a warning line naming each of `names`.
#[track_caller]
fn assert_warned(out: &XferOutput, names: &[&str]) {
    for name in names {
        assert!(
            out.stderr
                .lines()
                .any(|l| l.starts_with("xfer: warning:") && l.contains(name)),
            "`{}` printed no warning about {name}; stderr:\n{}",
            out.cmd,
            out.stderr
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn tree_round_trip_keeps_content_modes_mtimes_and_inner_links() {
    let tree = Tree::new();
    let src = tree.src("t");
    let left_out = build_full_tree(&src);
    let want = expected(&src, &left_out);
    let (files, bytes) = file_totals(&want, &src);
    assert_eq!(files, 8);
    let daemon = Daemon::start(&tree.root(), &[]);

    let sent = send_tree(
        &src,
        &daemon.addr(),
        "backup/t",
        &["--json", "--safe-links"],
    )
    .wait_ok();
    assert_counts(&sent, (files, files, 0, bytes, bytes));
    assert_eq!(sent.json_u64("entries_skipped"), 3, "{}", sent.stdout);
    assert_warned(&sent, &left_out);
    assert_same(
        &snapshot(&tree.root().join("backup/t")),
        &want,
        "the daemon's copy",
    );
    assert_root_holds_only(&tree.root(), "backup/t");
    assert!(!tree.root().join("backup/t/escape").exists());

    let out = tree.out("t");
    let got = recv_tree(
        "backup/t",
        &daemon.addr(),
        &out,
        &["--json", "--safe-links", "-c", "3"],
    )
    .wait_ok();
    assert_counts(&got, (files, files, 0, bytes, bytes));
    assert_same(&snapshot(&out), &want, "the downloaded copy");
    assert!(fs::symlink_metadata(out.join("to-page"))
        .unwrap()
        .file_type()
        .is_symlink());
}

/// A small and a large file removed at the source after the walk listed them, before they
/// were read (the daemon held in SIGSTOP meanwhile, so that nothing has moved yet), are left
/// out with a warning each while the rest arrives; the copy succeeds, and counts them.
#[test]
fn files_that_vanish_after_the_listing_are_left_out_with_a_warning() {
    let tree = Tree::new();
    let src = tree.src("t");
    random_file(&src.join("a"), 1000, 1);
    random_file(&src.join("d/b"), 2000, 2);
    random_file(&src.join("gone-small"), 3000, 3);
    random_file(&src.join("gone-large"), 3 * MIB, 4);
    let kept = random_file(&src.join("kept-large"), 3 * MIB, 5);
    let daemon = Daemon::start(&tree.root(), &[]);
    let signal = |signal| {
        let pid = rustix::process::Pid::from_raw(daemon.pid() as i32).unwrap();
        rustix::process::kill_process(pid, signal).unwrap();
    };
    signal(rustix::process::Signal::STOP);
    let run = send_tree(&src, &daemon.addr(), "t", &["--json", "-v"]);
    wait_until(GUARD, "the source walked", || {
        run.stderr_so_far().contains("source walk ended")
    });
    fs::remove_file(src.join("gone-small")).unwrap();
    fs::remove_file(src.join("gone-large")).unwrap();
    signal(rustix::process::Signal::CONT);
    let out = run.wait_ok();
    for gone in ["gone-small", "gone-large"] {
        let warning = format!("xfer: warning: skipping {gone}: it vanished during the copy");
        assert!(out.stderr.contains(&warning), "{}", out.stderr);
    }
    out.assert_json_u64s(&["entries_vanished", "files_transferred"], &[2, 3]);
    let dest = tree.root().join("t");
    assert_eq!(list_tree(&dest), ["a", "d/", "d/b", "kept-large"]);
    assert_eq!(sha256_file(&dest.join("kept-large")), kept);
    assert_root_holds_only(&tree.root(), "t");
    let again = send_tree(&src, &daemon.addr(), "t", &["--json"]).wait_ok();
    again.assert_json_u64s(&["entries_vanished", "files_transferred"], &[0, 0]);
}

/// The same for a download: a small file removed at the daemon after its listing, before the
/// client's turn for it came (`--bwlimit` holds the 200 files before it back about 2 s), is
/// left out with a warning while the rest arrives.
#[test]
fn a_file_that_vanishes_at_the_daemon_after_the_listing_is_left_out_of_a_download() {
    let tree = Tree::new();
    let top = tree.root().join("t");
    for i in 0..200 {
        random_file(&top.join(format!("f{i:03}")), 10_000, i);
    }
    random_file(&top.join("zz-gone"), 1000, 1000);
    let daemon = Daemon::start(&tree.root(), &[]);
    let out = tree.out("t");
    let run = recv_tree(
        "t",
        &daemon.addr(),
        &out,
        &["--json", "-v", "--bwlimit", "1M"],
    );
    wait_until(GUARD, "the source listed", || {
        run.stderr_so_far().contains("source listed")
    });
    fs::remove_file(top.join("zz-gone")).unwrap();
    let got = run.wait_ok();
    let warning = "xfer: warning: skipping zz-gone: it vanished during the copy";
    assert!(got.stderr.contains(warning), "{}", got.stderr);
    got.assert_json_u64s(&["entries_vanished", "files_transferred"], &[1, 200]);
    assert_eq!(list_tree(&out).len(), 200);
    assert!(!out.join("zz-gone").exists());
}

#[test]
fn rerun_of_an_unchanged_tree_moves_no_data_either_way() {
    let tree = Tree::new();
    let src = tree.src("t");
    let left_out = build_full_tree(&src);
    let want = expected(&src, &left_out);
    let (files, bytes) = file_totals(&want, &src);
    let daemon = Daemon::start(&tree.root(), &[]);
    let out = tree.out("t");

    send_tree(&src, &daemon.addr(), "t", &["--json", "--safe-links"]).wait_ok();
    recv_tree("t", &daemon.addr(), &out, &["--json", "--safe-links"]).wait_ok();
    for checksum in [&[][..], &["--checksum"][..]] {
        let args = [&["--json", "--safe-links"][..], checksum].concat();
        let again = send_tree(&src, &daemon.addr(), "t", &args).wait_ok();
        assert_counts(&again, (files, 0, files, bytes, 0));
        assert_eq!(again.json_u64("resumed_bytes"), 0, "{}", again.stdout);
        let again = recv_tree("t", &daemon.addr(), &out, &args).wait_ok();
        assert_counts(&again, (files, 0, files, bytes, 0));
    }
    // Reruns leave both copies exactly as they were, directory mtimes included.
    assert_same(
        &snapshot(&tree.root().join("t")),
        &want,
        "the daemon's copy after reruns",
    );
    assert_same(&snapshot(&out), &want, "the downloaded copy after reruns");
}

/// Overwrites `path` with other bytes of the same size and puts its mtime back.
fn change_keeping_size_and_mtime(path: &Path, seed: u64) -> String {
    let meta = fs::metadata(path).unwrap();
    let mtime = meta.modified().unwrap();
    let sha = random_file(path, meta.len(), seed);
    File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    assert_eq!(fs::metadata(path).unwrap().len(), meta.len());
    sha
}

#[test]
fn checksum_sends_a_change_that_keeps_size_and_mtime() {
    let tree = Tree::new();
    let src = tree.src("t");
    let small = random_file(&src.join("a/small.txt"), 10_000, 1);
    random_file(&src.join("a/other.txt"), 5_000, 2);
    let large = random_file(&src.join("b/large.bin"), 3 * MIB, 3);
    set_mtime_ns(&src.join("a/small.txt"), 1_600_000_000, 5);
    set_mtime_ns(&src.join("b/large.bin"), 1_600_000_000, 7);
    let total = 10_000 + 5_000 + 3 * MIB;
    let daemon = Daemon::start(&tree.root(), &[]);
    let remote = tree.root().join("t");
    send_tree(&src, &daemon.addr(), "t", &[]).wait_ok();

    let new_small = change_keeping_size_and_mtime(&src.join("a/small.txt"), 11);
    let new_large = change_keeping_size_and_mtime(&src.join("b/large.bin"), 13);
    // Without --checksum, size and mtime decide: the change goes unnoticed (documented).
    let plain = send_tree(&src, &daemon.addr(), "t", &["--json"]).wait_ok();
    assert_counts(&plain, (3, 0, 3, total, 0));
    assert_eq!(sha256_file(&remote.join("a/small.txt")), small);
    assert_eq!(sha256_file(&remote.join("b/large.bin")), large);

    let summed = send_tree(&src, &daemon.addr(), "t", &["--json", "--checksum"]).wait_ok();
    assert_counts(&summed, (3, 2, 1, total, 10_000 + 3 * MIB));
    assert_same(
        &snapshot(&remote),
        &snapshot(&src),
        "the daemon's copy after --checksum",
    );
    assert_eq!(sha256_file(&remote.join("a/small.txt")), new_small);
    assert_eq!(sha256_file(&remote.join("b/large.bin")), new_large);

    // The same on the way back: a local copy changed in place is put right by --checksum only.
    let out = tree.out("t");
    recv_tree("t", &daemon.addr(), &out, &[]).wait_ok();
    change_keeping_size_and_mtime(&out.join("a/other.txt"), 17);
    change_keeping_size_and_mtime(&out.join("b/large.bin"), 19);
    let plain = recv_tree("t", &daemon.addr(), &out, &["--json"]).wait_ok();
    assert_counts(&plain, (3, 0, 3, total, 0));
    let summed = recv_tree("t", &daemon.addr(), &out, &["--json", "--checksum"]).wait_ok();
    assert_counts(&summed, (3, 2, 1, total, 5_000 + 3 * MIB));
    assert_same(
        &snapshot(&out),
        &snapshot(&src),
        "the downloaded copy after --checksum",
    );
}

#[test]
fn interrupted_tree_copy_resumes() {
    const SMALL_FILES: u64 = 300;
    const LARGE: u64 = 16 * MIB;
    let tree = Tree::new();
    let src = tree.src("t");
    let mut bytes = 0;
    for i in 0..SMALL_FILES {
        let size = 1024 + (i * 7919) % (32 * 1024);
        random_file(&src.join(format!("d{}/f{i:03}", i % 10)), size, 1000 + i);
        bytes += size;
    }
    random_file(&src.join("m/large.bin"), LARGE, 7);
    bytes += LARGE;
    let want = snapshot(&src);
    let daemon = Daemon::start(&tree.root(), &[]);
    let remote = tree.root().join("t");
    let journal = journal_path(&remote.join("m/large.bin"));

    let mut slow = send_tree(
        &src,
        &daemon.addr(),
        "t",
        &["--bwlimit", "2M", "--chunk-size", "256K"],
    );
    wait_until(
        GUARD,
        "some files and part of the large one are on the daemon",
        || {
            assert!(
                slow.is_running(),
                "`{}` ended before it was interrupted",
                slow.cmd()
            );
            let stored = list_tree(&remote)
                .iter()
                .filter(|p| p.contains("/f"))
                .count();
            stored > 0 && journal_held(&journal) >= 2 * MIB
        },
    );
    slow.kill();
    assert!(
        !remote.join("m/large.bin").exists(),
        "the large file was complete before the kill"
    );
    daemon.wait_idle(GUARD);

    let done = send_tree(
        &src,
        &daemon.addr(),
        "t",
        &["--json", "--chunk-size", "256K"],
    )
    .wait_ok();
    let json = done.json();
    let total = SMALL_FILES + 1;
    assert_eq!(done.json_u64("files_total"), total, "{json}");
    assert_eq!(done.json_u64("bytes_total"), bytes, "{json}");
    assert!(
        done.json_u64("files_skipped") > 0,
        "nothing was kept from the first run: {json}"
    );
    assert_eq!(
        done.json_u64("files_skipped") + done.json_u64("files_transferred"),
        total,
        "{json}"
    );
    assert!(
        done.json_u64("resumed_bytes") >= 2 * MIB,
        "the large file started over: {json}"
    );
    assert!(done.json_u64("bytes_transferred") < bytes, "{json}");
    assert_same(&snapshot(&remote), &want, "the resumed copy");
    assert_root_holds_only(&tree.root(), "t");
}

/// Every regular file below `dir` whose content is `secret` (following nothing).
fn files_holding(dir: &Path, secret: &[u8]) -> Vec<String> {
    snapshot(dir)
        .into_iter()
        .filter(|(p, n)| matches!(n, Node::File { .. }) && fs::read(dir.join(p)).unwrap() == secret)
        .map(|(p, _)| p)
        .collect()
}

#[test]
fn links_planted_in_the_root_are_never_followed() {
    const SECRET: &[u8] = b"outside the daemon's root\n";
    let tree = Tree::new();
    let outside = tree.path().join("outside");
    fs::create_dir_all(outside.join("sub")).unwrap();
    fs::write(outside.join("secret"), SECRET).unwrap();
    fs::write(outside.join("sub/secret"), SECRET).unwrap();
    let before = snapshot(&outside);
    let root = tree.root();
    // A top-level name leading out, and links inside a served tree leading out three ways.
    symlink(&outside, root.join("evil")).unwrap();
    fs::create_dir_all(root.join("shared/docs")).unwrap();
    fs::write(root.join("shared/docs/readme"), b"served\n").unwrap();
    symlink(&outside, root.join("shared/dir-link")).unwrap();
    symlink(outside.join("secret"), root.join("shared/file-link")).unwrap();
    symlink("../../outside", root.join("shared/docs/relative-link")).unwrap();
    let daemon = Daemon::start(&root, &[]);

    // recv -r of the link itself: refused, nothing written locally.
    let evil_out = tree.out("evil");
    let refused = recv_tree("evil", &daemon.addr(), &evil_out, &[]).wait();
    let line = refused.error_line();
    assert!(line.contains("outside the root"), "{line}");
    assert!(files_holding(&tree.path().join("out"), SECRET).is_empty());

    // recv -r --safe-links of a tree holding links that lead out: they are left out, with a
    // warning (without it they are copied as links, which tests/mirror_meta.rs covers).
    let shared_out = tree.out("shared");
    let got = recv_tree(
        "shared",
        &daemon.addr(),
        &shared_out,
        &["--json", "--safe-links"],
    )
    .wait_ok();
    assert_warned(&got, &["dir-link", "file-link", "relative-link"]);
    assert_eq!(got.json_u64("files_total"), 1, "{}", got.stdout);
    assert_eq!(list_tree(&shared_out), ["docs/", "docs/readme"]);
    assert!(files_holding(&tree.path().join("out"), SECRET).is_empty());

    // recv -r of a name below the planted directory link: refused too.
    let refused = recv_tree("shared/dir-link", &daemon.addr(), &tree.out("below"), &[]).wait();
    let line = refused.error_line();
    assert!(line.contains("outside the root"), "{line}");
    assert!(files_holding(&tree.path().join("out"), SECRET).is_empty());

    // send -r cannot write through them: not as the top name, not through a planted directory
    // link, not over a planted file link (whole-file and chunked paths).
    let through_dir = tree.src("through-dir");
    random_file(&through_dir.join("dir-link/small"), 100, 1);
    random_file(&through_dir.join("dir-link/large.bin"), 2 * MIB, 2);
    random_file(&through_dir.join("dir-link/sub/secret"), 10, 3);
    let over_small = tree.src("over-small");
    random_file(&over_small.join("file-link"), 100, 4);
    let over_large = tree.src("over-large");
    random_file(&over_large.join("file-link"), 2 * MIB, 5);
    let into_dir = tree.src("into-dir");
    random_file(&into_dir.join("secret"), 2 * MIB, 6);
    random_file(&into_dir.join("sub/secret"), 10, 7);
    let cases = [
        (&through_dir, "evil", "evil"),
        (&through_dir, "shared", "shared/dir-link"),
        (&over_small, "shared", "shared/file-link"),
        (&over_large, "shared", "shared/file-link"),
        (&into_dir, "shared/dir-link", "shared/dir-link"),
    ];
    for (src, dest, planted) in cases {
        let out = send_tree(src, &daemon.addr(), dest, &[]).wait();
        assert_eq!(
            snapshot(&outside),
            before,
            "`{}` wrote outside the root",
            out.cmd
        );
        // Either refused, or the link itself was replaced: never written through.
        let is_link = fs::symlink_metadata(root.join(planted))
            .unwrap()
            .file_type()
            .is_symlink();
        assert!(
            !(out.status.success() && is_link),
            "`{}` succeeded and {planted} is still a link; stderr:\n{}",
            out.cmd,
            out.stderr
        );
    }
    assert!(list_tree(&outside)
        .iter()
        .all(|p| ["secret", "sub/", "sub/secret"].contains(&p.as_str())));
}

/// With `--safe-links`, links that lead out of the tree by a little are left out as surely as
/// `/etc/passwd`: one
/// level above the top (`sib -> ../other`, `docs/climb -> ../../other`), or through another link
/// (`a -> .` is fine, but `a/..` is the top's parent, not the top). Both directions: `send -r`
/// from a local tree, and `recv -r` of the same links planted in the daemon's root.
#[test]
fn links_leading_just_out_of_the_tree_are_left_out() {
    let escaping = ["sib", "docs/climb", "up", "docs/up"];
    let plant = |top: &Path| {
        random_file(&top.join("docs/f"), 10, 1);
        symlink("../other", top.join("sib")).unwrap();
        symlink("../../other", top.join("docs/climb")).unwrap();
        symlink(".", top.join("a")).unwrap();
        symlink("a/..", top.join("up")).unwrap();
        symlink("../a/../other", top.join("docs/up")).unwrap();
    };
    let tree = Tree::new();
    let src = tree.src("t");
    plant(&src);
    fs::create_dir_all(tree.root().join("other")).unwrap();
    fs::write(tree.root().join("other/data"), b"another tree\n").unwrap();
    let daemon = Daemon::start(&tree.root(), &[]);

    let sent = send_tree(&src, &daemon.addr(), "t", &["--json", "--safe-links"]).wait_ok();
    assert_warned(&sent, &escaping);
    assert_eq!(sent.json_u64("entries_skipped"), 4, "{}", sent.stdout);
    assert_eq!(list_tree(&tree.root().join("t")), ["a", "docs/", "docs/f"]);

    plant(&tree.root().join("planted"));
    let out = tree.out("planted");
    let got = recv_tree("planted", &daemon.addr(), &out, &["--json", "--safe-links"]).wait_ok();
    assert_warned(&got, &escaping);
    assert_eq!(list_tree(&out), ["a", "docs/", "docs/f"]);
}

/// `--bwlimit` is "bytes per second across all connections": it must pace the whole-file path
/// of a tree as it paces the chunked one.
#[test]
fn bwlimit_paces_the_small_files_of_a_tree() {
    let tree = Tree::new();
    let src = tree.src("t");
    for i in 0..48 {
        random_file(&src.join(format!("f{i:02}")), 64 * 1024, i);
    }
    let daemon = Daemon::start(&tree.root(), &[]);
    let started = Instant::now();
    send_tree(&src, &daemon.addr(), "t", &["--bwlimit", "1M"]).wait_ok();
    let up = started.elapsed();
    let started = Instant::now();
    recv_tree("t", &daemon.addr(), &tree.out("t"), &["--bwlimit", "1M"]).wait_ok();
    let down = started.elapsed();
    // 3 MiB at 1 MiB/s: well over 2 s each way, whatever burst the limiter allows.
    assert!(
        up >= Duration::from_secs(2),
        "3 MiB sent in {up:?} at --bwlimit 1M"
    );
    assert!(
        down >= Duration::from_secs(2),
        "3 MiB received in {down:?} at --bwlimit 1M"
    );
}

/// "Modes and mtimes are kept": a file whose mode changed (and nothing else) must get the new
/// mode on a rerun, or a file made private at the source stays readable in the copy.
#[test]
fn rerun_applies_a_mode_change() {
    let tree = Tree::new();
    let src = tree.src("t");
    random_file(&src.join("private.txt"), 100, 1);
    set_mode(&src.join("private.txt"), 0o644);
    let daemon = Daemon::start(&tree.root(), &[]);
    let out = tree.out("t");
    send_tree(&src, &daemon.addr(), "t", &[]).wait_ok();
    recv_tree("t", &daemon.addr(), &out, &[]).wait_ok();
    set_mode(&src.join("private.txt"), 0o600);
    send_tree(&src, &daemon.addr(), "t", &[]).wait_ok();
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(
        mode(&tree.root().join("t/private.txt")),
        0o600,
        "send -r kept the old mode"
    );
    recv_tree("t", &daemon.addr(), &out, &[]).wait_ok();
    assert_eq!(
        mode(&out.join("private.txt")),
        0o600,
        "recv -r kept the old mode"
    );
}

/// A source file that became a directory replaces the old copy, both ways; a directory that
/// became a file is refused with one line naming it, and the directory is kept.
#[test]
fn rerun_after_a_file_became_a_directory_and_back() {
    let tree = Tree::new();
    let src = tree.src("t");
    random_file(&src.join("was-file"), 100, 1);
    random_file(&src.join("was-dir/inner"), 100, 2);
    let mut daemon = Daemon::start(&tree.root(), &[]);
    let out = tree.out("t");
    send_tree(&src, &daemon.addr(), "t", &[]).wait_ok();
    recv_tree("t", &daemon.addr(), &out, &[]).wait_ok();

    fs::remove_file(src.join("was-file")).unwrap();
    let inside = random_file(&src.join("was-file/now-inside"), 5000, 3);
    send_tree(&src, &daemon.addr(), "t", &[]).wait_ok();
    recv_tree("t", &daemon.addr(), &out, &[]).wait_ok();
    for copy in [tree.root().join("t"), out.clone()] {
        assert_eq!(
            sha256_file(&copy.join("was-file/now-inside")),
            inside,
            "{}",
            copy.display()
        );
    }

    fs::remove_dir_all(src.join("was-dir")).unwrap();
    random_file(&src.join("was-dir"), 100, 4);
    let line = send_tree(&src, &daemon.addr(), "t", &[])
        .wait()
        .error_line();
    assert!(
        line.starts_with("xfer: ") && line.contains("was-dir"),
        "send -r: {line}"
    );
    assert!(tree.root().join("t/was-dir/inner").is_file());
    daemon.assert_running();
}

#[test]
fn a_deep_pipeline_of_long_names_moves_both_ways_over_one_connection() {
    // 3,000 files with 200-byte names over one connection: up to 1,024 requests in flight at
    // a time (a quarter MiB of requests alone), written while the answers are read.
    let tree = Tree::new();
    let src = tree.src("deep");
    fs::create_dir_all(&src).unwrap();
    let mut bytes = 0;
    for i in 0..3000u64 {
        let name = format!("{i:05}-{}", "n".repeat(194));
        let size = 4096 + (i % 7) * 1024;
        random_file(&src.join(name), size, i);
        bytes += size;
    }
    let daemon = Daemon::start(&tree.root(), &[]);
    let want = snapshot(&src);

    let sent = send_tree(&src, &daemon.addr(), "deep", &["--json", "-c", "1"]).wait_ok();
    assert_counts(&sent, (3000, 3000, 0, bytes, bytes));
    assert_same(
        &snapshot(&tree.root().join("deep")),
        &want,
        "the daemon's copy",
    );

    let out = tree.out("deep");
    let got = recv_tree("deep", &daemon.addr(), &out, &["--json", "-c", "1"]).wait_ok();
    assert_counts(&got, (3000, 3000, 0, bytes, bytes));
    assert_same(&snapshot(&out), &want, "the downloaded copy");
}

/// A tree of more small files than go over the control connection: the directories the
/// receiver lacks are made alongside the files (the daemon makes a file's missing parents),
/// and come out with their own modes and mtimes, the empty and the read-only ones too; a file
/// the receiver holds where the source has a directory is replaced before any file goes in.
#[test]
fn a_large_tree_makes_its_new_directories_alongside_its_files() {
    let tree = Tree::new();
    let src = tree.src("t");
    let mut dirs = Vec::new();
    for i in 0..40u64 {
        let dir = format!("d{i:02}/sub{}/leaf", i % 3);
        for j in 0..30u64 {
            random_file(&src.join(format!("{dir}/f{j:02}")), 200 + j, i * 100 + j);
        }
        dirs.push(dir);
    }
    random_file(&src.join("was-file/inside"), 300, 1);
    fs::create_dir_all(src.join("empty/too")).unwrap();
    random_file(&src.join("read-only/kept"), 300, 2);
    // Directories last, children before parents: adding entries changes a directory's mtime.
    dirs.extend(["empty/too", "empty", "read-only", "was-file"].map(String::from));
    dirs.extend((0..40).map(|i| format!("d{i:02}/sub{}", i % 3)));
    dirs.extend((0..40).map(|i| format!("d{i:02}")));
    for (i, dir) in dirs.iter().enumerate() {
        let mode = if dir == "read-only" { 0o555 } else { 0o750 };
        set_mode(&src.join(dir), mode);
        set_mtime_ns(&src.join(dir), 1_600_000_000 + i as u64, 7);
    }
    let want = expected(&src, &[]);
    let (files, _) = file_totals(&want, &src);
    assert!(files > 1024, "{files} files go over the control connection");
    random_file(&tree.root().join("t/was-file"), 100, 3);
    let daemon = Daemon::start(&tree.root(), &[]);

    send_tree(&src, &daemon.addr(), "t", &[]).wait_ok();
    assert_same(
        &snapshot(&tree.root().join("t")),
        &want,
        "the daemon's copy",
    );
}

/// A tree of more small files than go over the control connection alone: the control
/// connection makes the new directories, then moves small files beside the others, and closes
/// the tree (directory modes and times, the flush) itself, still open, instead of a connection
/// opened again for it, which over a long path costs the handshake's round trips.
#[test]
fn a_large_tree_is_closed_over_the_connection_that_made_its_directories() {
    let tree = Tree::new();
    let src = tree.src("t");
    for i in 0..1100u64 {
        random_file(&src.join(format!("d{:02}/f{i:04}", i % 20)), 300 + i, i);
    }
    let (_, accepted) = connections_of_tree(&tree, &src, &[], &["-c", "1"]);
    // The control connection and the one small-file connection of `-c 1`, and no third.
    assert_eq!(accepted, 2.0);
}

/// A tree's control connection left idle far longer than the half second a client may assume
/// of any daemon, while a large file paced by `--bwlimit` takes seconds to go over another,
/// closes the tree all the same against a daemon whose idle timeout (the default 300 s) it was
/// told: no connection is opened again for the close.
#[test]
fn a_trees_control_connection_idle_for_seconds_still_closes_it() {
    let tree = Tree::new();
    let src = tree.src("t");
    paced_tree(&src);
    let (_, accepted) = connections_of_tree(&tree, &src, &[], PACED);
    // The control connection, the small files' one and the large file's, and no fourth.
    assert_eq!(accepted, 3.0);
}

/// Against a daemon whose idle timeout is short (`--idle-timeout 1`), the same tree's control
/// connection idles past it and the daemon closes it: told so, the client opens one again for
/// the close, and the tree arrives whole.
#[test]
fn a_trees_control_connection_closed_for_idleness_is_opened_again_for_its_close() {
    let tree = Tree::new();
    let src = tree.src("t");
    paced_tree(&src);
    let (daemon, accepted) = connections_of_tree(&tree, &src, &["--idle-timeout", "1"], PACED);
    assert_eq!(accepted, 4.0, "the control connection opened again");
    let log = daemon.stderr();
    assert!(log.contains("idle for 1s"), "{log}");
}

/// Sends the tree `src` as `t` with `send_args` to a daemon started with metrics and
/// `daemon_args`, checks the daemon's copy is the source, and returns the daemon and the
/// connections it accepted.
fn connections_of_tree(
    tree: &Tree,
    src: &Path,
    daemon_args: &[&str],
    send_args: &[&str],
) -> (Daemon, f64) {
    let want = expected(src, &[]);
    let args = [&["--metrics", "127.0.0.1:0"], daemon_args].concat();
    let daemon = Daemon::start(&tree.root(), &args);
    let port = metrics_port(&daemon);
    send_tree(src, &daemon.addr(), "t", send_args).wait_ok();
    let accepted = scrape(port, &["xferd_connections_accepted_total"])[0];
    assert_same(
        &snapshot(&tree.root().join("t")),
        &want,
        "the daemon's copy",
    );
    (daemon, accepted)
}

/// One connection for the small files and a pace that keeps the large file of [`paced_tree`]
/// going for three seconds at least, all of them after the control connection's last answer.
/// Its chunks are small enough that one arrives well within a second even paced: the daemon
/// counts a connection waiting for the rest of a frame as idle.
const PACED: &[&str] = &["-c", "1", "--bwlimit", "4M", "--chunk-size", "256K"];

/// A tree of small files in a few directories and one 12 MiB file: at [`PACED`]'s 4 MiB/s the
/// small files are long done, and the control connection idle, while the large one goes.
fn paced_tree(src: &Path) {
    for i in 0..40u64 {
        random_file(&src.join(format!("d{}/f{i:02}", i % 4)), 500 + i, i);
    }
    random_file(&src.join("large"), 12 * MIB, 99);
}

/// A tree copy dials its spare connections beside its first, before the path is known, and
/// where the path turns out short closes them before their `Hello`. A daemon with TLS, which
/// reads a plaintext `Hello` first, takes such a connection as a client that said nothing, as
/// one without TLS does: nothing in its log at its default level, no disconnection reported,
/// and a tree copy beside it arrives whole.
#[test]
fn a_connection_closed_before_its_hello_leaves_nothing_in_a_tls_daemons_log() {
    let tree = Tree::new();
    let src = tree.src("t");
    for i in 0..4u64 {
        random_file(&src.join(format!("f{i}")), 64 * 1024 + i, i);
    }
    let want = expected(&src, &[]);
    let pki = Pki::new(&["127.0.0.1"]);
    let daemon = pki.start_daemon(&tree.root(), &[]);
    let ca = pki.ca().display().to_string();

    for _ in 0..3 {
        drop(std::net::TcpStream::connect(daemon.socket_addr()).unwrap());
    }
    send_tree(&src, &daemon.addr(), "t", &["--tls", "--ca", &ca]).wait_ok();
    assert_same(
        &snapshot(&tree.root().join("t")),
        &want,
        "the daemon's copy",
    );
    daemon.wait_idle(GUARD);
    let log = daemon.stderr();
    assert!(!log.contains("without Goodbye"), "{log}");
}

/// A tree's files above the small-file size, light (one connection each) and large (a pool of
/// their own), commit without a flush of their own, as its small files do: the tree's closing
/// `Sync`, which the client waits for, makes them durable (`CAP_TREE_SYNC`).
#[test]
fn a_trees_large_files_leave_their_flush_to_its_closing_sync() {
    let tree = Tree::new();
    let src = tree.src("t");
    random_file(&src.join("big"), 20 * MIB, 1);
    for i in 0..3u64 {
        random_file(&src.join(format!("d/mid{i}")), 2 * MIB + i, 10 + i);
    }
    random_file(&src.join("d/small"), 1000, 20);
    let want = expected(&src, &[]);
    let daemon = Daemon::start(&tree.root(), &["--metrics", "127.0.0.1:0"]);
    let port = metrics_port(&daemon);

    send_tree(&src, &daemon.addr(), "t", &["-c", "3"]).wait_ok();
    let left_to_sync = scrape(port, &["xferd_commits_left_to_sync_total"])[0];
    assert_eq!(left_to_sync, 4.0, "the big file and the three light ones");
    assert_same(
        &snapshot(&tree.root().join("t")),
        &want,
        "the daemon's copy",
    );
}

/// A single file's upload promises no `Sync` after it: the daemon flushes it before it answers
/// `Committed`, whatever the size and however many connections carry it.
#[test]
fn a_single_file_send_is_flushed_at_its_commit() {
    let tree = Tree::new();
    let daemon = Daemon::start(&tree.root(), &["--metrics", "127.0.0.1:0"]);
    let port = metrics_port(&daemon);
    for (i, size) in [2 * MIB, 20 * MIB].into_iter().enumerate() {
        let name = format!("f{i}");
        let path = tree.src(&name);
        let sha = random_file(&path, size, 30 + i as u64);
        let args = [
            "send",
            path.to_str().unwrap(),
            &daemon.addr(),
            "--as",
            &name,
        ];
        XferRun::spawn(args).wait_ok();
        assert_eq!(sha256_file(&tree.root().join(&name)), sha);
    }
    let left_to_sync = scrape(port, &["xferd_commits_left_to_sync_total"])[0];
    assert_eq!(left_to_sync, 0.0);
}

/// Names from an old Latin-1 system, which are not UTF-8, arrive byte for byte every way a tree
/// travels (a small and a large file, a directory, a link and its target, and a name that holds
/// one of the code points escapes are made of); a rerun moves nothing; one such file alone goes
/// and comes back under its name, and `xfer ls` prints that name as its bytes.
#[test]
fn names_that_are_not_utf8_arrive_byte_for_byte_every_way() {
    let raw = |b: &[u8]| OsStr::from_bytes(b).to_owned();
    let tree = Tree::new();
    let src = tree.src("latin1");
    random_file(&src.join(raw(b"caf\xe9/men\xfa.txt")), 10_000, 1);
    random_file(&src.join(raw(b"gro\xdf.bin")), 3 * MIB, 2);
    random_file(&src.join("x\u{10FF80}y"), 100, 3);
    fs::write(src.join("plain.txt"), b"ascii").unwrap();
    symlink(raw(b"caf\xe9/men\xfa.txt"), src.join(raw(b"l\xeen"))).unwrap();
    let want = snapshot(&src);
    assert!(want.contains_key("bytes:caf\\xe9/men\\xfa.txt"), "{want:?}");
    let daemon = Daemon::start(&tree.root(), &["--allow-delete"]);

    let sent = send_tree(&src, &daemon.addr(), "t", &["--json"]).wait_ok();
    assert_eq!(sent.json_u64("files_transferred"), 4, "{}", sent.stdout);
    assert_same(
        &snapshot(&tree.root().join("t")),
        &want,
        "the daemon's copy",
    );
    let again = send_tree(&src, &daemon.addr(), "t", &["--json"]).wait_ok();
    assert_eq!(again.json_u64("bytes_transferred"), 0, "{}", again.stdout);

    let out = tree.out("t");
    recv_tree("t", &daemon.addr(), &out, &["--json"]).wait_ok();
    assert_same(&snapshot(&out), &want, "the downloaded copy");

    // A name only the receiver holds goes with --delete, whatever its bytes.
    fs::write(tree.root().join("t").join(raw(b"stale\xff")), b"old").unwrap();
    send_tree(&src, &daemon.addr(), "t", &["--delete"]).wait_ok();
    assert_same(
        &snapshot(&tree.root().join("t")),
        &want,
        "the mirrored copy",
    );

    let other = Tree::new();
    let second = Daemon::start(&other.root(), &[]);
    let from = format!("{}:t", daemon.addr());
    xfer(["copy", "-r", from.as_str(), second.addr().as_str()]).ok();
    assert_same(
        &snapshot(&other.root().join("t")),
        &want,
        "the copy between daemons",
    );

    let one = src.join(raw(b"gro\xdf.bin"));
    xfer([
        OsString::from("send"),
        one.clone().into(),
        daemon.addr().into(),
    ])
    .ok();
    let stored = tree.root().join(raw(b"gro\xdf.bin"));
    assert_eq!(sha256_file(&stored), sha256_file(&one));
    let listed = std::process::Command::new(xfer_tests::bin("xfer"))
        .args(["ls".into(), daemon.addr()])
        .output()
        .unwrap();
    assert!(
        listed.stdout.windows(8).any(|w| w == b"gro\xdf.bin"),
        "{}",
        listed.stdout.escape_ascii()
    );
    let fetched = tree.out("one");
    fs::create_dir_all(&fetched).unwrap();
    let mut recv = vec![
        OsString::from("recv"),
        raw(b"gro\xdf.bin"),
        daemon.addr().into(),
    ];
    recv.extend(["-o".into(), fetched.clone().into_os_string()]);
    xfer(recv).ok();
    assert_eq!(
        sha256_file(&fetched.join(raw(b"gro\xdf.bin"))),
        sha256_file(&one)
    );
}

/// Names of 244 to 255 bytes, whose partial and journal would not fit as `.NAME.xfer-part`,
/// copy every way: a small file stored and then replaced, a large one in chunks, a directory.
#[test]
fn names_of_up_to_255_bytes_copy_both_ways_and_replace() {
    let long = |c: &str, n: usize| c.repeat(n);
    let tree = Tree::new();
    let src = tree.src("long");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join(long("s", 255)), b"small").unwrap();
    random_file(&src.join(long("d", 250)).join(long("L", 244)), 3 * MIB, 7);
    let daemon = Daemon::start(&tree.root(), &[]);

    send_tree(&src, &daemon.addr(), "t", &[]).wait_ok();
    assert_same(
        &snapshot(&tree.root().join("t")),
        &snapshot(&src),
        "the daemon's copy",
    );
    // Replaced: stored beside the old file under its partial name, then renamed over it.
    fs::write(src.join(long("s", 255)), b"changed, and longer").unwrap();
    random_file(&src.join(long("d", 250)).join(long("L", 244)), 3 * MIB, 8);
    send_tree(&src, &daemon.addr(), "t", &[]).wait_ok();
    assert_same(
        &snapshot(&tree.root().join("t")),
        &snapshot(&src),
        "the replaced copy",
    );

    let out = tree.out("t");
    recv_tree("t", &daemon.addr(), &out, &[]).wait_ok();
    assert_same(&snapshot(&out), &snapshot(&src), "the downloaded copy");
}
