//! Mirror copies through the real binaries (`send -r`, `recv -r`, `copy -r`): `--delete`
//! removes what the source lacks, with and without filters, sparing excluded entries; entries
//! whose type changed are replaced; nothing is removed when the copy failed; `--dry-run`
//! changes nothing on either side and reports exactly what a real run does; `--itemize` prints
//! one line per change; `--exclude-from` reads patterns from a file; and a daemon without
//! `--allow-delete`, or one running `--read-only`, refuses `--delete` in one line before
//! anything moves.

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;

use xfer_tests::{list_tree, xfer, Daemon, Tree, XferOutput, XferRun};

use crate::tree::{assert_same, snapshot};

/// A source tree `src/t`: files at two depths, a log file, a directory and a link.
fn source(tree: &Tree) -> std::path::PathBuf {
    let src = tree.src("t");
    fs::create_dir_all(src.join("d/e")).unwrap();
    fs::write(src.join("a"), b"a").unwrap();
    fs::write(src.join("d/b"), b"bb").unwrap();
    fs::write(src.join("d/e/c"), b"ccc").unwrap();
    fs::write(src.join("keep.log"), b"log").unwrap();
    std::os::unix::fs::symlink("d/b", src.join("ln")).unwrap();
    src
}

/// Plants at the destination `dir` what the source lacks: a stale file, a stale directory
/// with content, and a log file the filters exclude.
fn plant_stale(dir: &Path) {
    fs::create_dir_all(dir.join("old/deep")).unwrap();
    fs::write(dir.join("stale"), b"x").unwrap();
    fs::write(dir.join("old/deep/f"), b"x").unwrap();
    fs::write(dir.join("d/gone"), b"x").unwrap();
    fs::write(dir.join("only-here.log"), b"x").unwrap();
}

fn lines(out: &XferOutput) -> BTreeSet<String> {
    out.stdout.lines().map(str::to_string).collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| (*s).to_string()).collect()
}

/// The removals `plant_stale` calls for, as itemize lines.
const STALE: [&str; 5] = [
    "*deleting   stale",
    "*deleting   old/",
    "*deleting   old/deep/",
    "*deleting   old/deep/f",
    "*deleting   d/gone",
];

#[test]
fn send_delete_removes_what_the_source_lacks_and_spares_excluded_entries() {
    let tree = Tree::new();
    let src = source(&tree);
    let daemon = Daemon::start(&tree.root(), &["--allow-delete"]);
    XferRun::send(&src, &daemon.addr(), "t", &["-r"]).wait_ok();
    let dest = tree.root().join("t");
    plant_stale(&dest);
    fs::write(src.join("a"), b"changed").unwrap();

    let out = XferRun::send(
        &src,
        &daemon.addr(),
        "t",
        &["-r", "--delete", "--exclude", "*.log", "-i"],
    )
    .wait_ok();
    let mut want = STALE.to_vec();
    want.push(">f.st...... a");
    assert_eq!(lines(&out), set(&want), "itemize lines");
    // The excluded log at the destination survives; the source's log was not sent again.
    let got = list_tree(&dest);
    assert_eq!(
        got,
        [
            "a",
            "d/",
            "d/b",
            "d/e/",
            "d/e/c",
            "keep.log",
            "ln",
            "only-here.log"
        ]
    );
    assert_eq!(fs::read(dest.join("a")).unwrap(), b"changed");

    // Without filters, --delete takes the log too, and a rerun has nothing left to do.
    let out = XferRun::send(&src, &daemon.addr(), "t", &["-r", "--delete", "-i"]).wait_ok();
    assert_eq!(lines(&out), set(&["*deleting   only-here.log"]));
    let mut want = snapshot(&src);
    want.remove("");
    let mut got = snapshot(&dest);
    got.remove("");
    assert_same(&got, &want, "the mirrored tree");
    let out = XferRun::send(&src, &daemon.addr(), "t", &["-r", "--delete", "-i"]).wait_ok();
    assert_eq!(out.stdout, "", "a rerun changes nothing");
}

#[test]
fn recv_delete_removes_locally_with_patterns_from_a_file() {
    let tree = Tree::new();
    let src = source(&tree);
    let daemon = Daemon::start(&tree.root(), &[]);
    XferRun::send(&src, &daemon.addr(), "t", &["-r"]).wait_ok();
    let out_dir = tree.out("t");
    XferRun::recv("t", &daemon.addr(), &out_dir, &["-r"]).wait_ok();
    plant_stale(&out_dir);
    let patterns = tree.path().join("patterns");
    fs::write(&patterns, "# logs stay\n\n*.log\n").unwrap();

    // The daemon does not allow deletion: a recv deletes locally and needs no permission.
    let out = XferRun::recv(
        "t",
        &daemon.addr(),
        &out_dir,
        &[
            "-r",
            "--delete",
            "--exclude-from",
            patterns.to_str().unwrap(),
            "-i",
        ],
    )
    .wait_ok();
    assert_eq!(lines(&out), set(&STALE));
    assert_eq!(
        list_tree(&out_dir),
        [
            "a",
            "d/",
            "d/b",
            "d/e/",
            "d/e/c",
            "keep.log",
            "ln",
            "only-here.log"
        ]
    );
}

#[test]
fn copy_delete_between_daemons_spares_excluded_entries() {
    let tree = Tree::new();
    let src = source(&tree);
    let src_daemon = Daemon::start(&tree.root(), &[]);
    let dst_root = tree.path().join("dst");
    fs::create_dir(&dst_root).unwrap();
    let dst_daemon = Daemon::start(&dst_root, &["--allow-delete"]);
    XferRun::send(&src, &src_daemon.addr(), "t", &["-r"]).wait_ok();
    let copy = |extra: &[&str]| {
        let mut args = vec![
            "copy".to_string(),
            "-r".into(),
            format!("{}:t", src_daemon.addr()),
            format!("{}:m", dst_daemon.addr()),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        xfer(args)
    };
    copy(&[]).ok();
    plant_stale(&dst_root.join("m"));

    let dry = copy(&["--delete", "--exclude", "*.log", "-n"]).ok();
    assert_eq!(lines(&dry), set(&STALE), "dry run of copy -r");
    let out = copy(&["--delete", "--exclude", "*.log", "-i"]).ok();
    assert_eq!(lines(&out), set(&STALE));
    assert_eq!(
        list_tree(&dst_root.join("m")),
        [
            "a",
            "d/",
            "d/b",
            "d/e/",
            "d/e/c",
            "keep.log",
            "ln",
            "only-here.log"
        ]
    );
}

#[test]
fn entries_whose_type_changed_are_replaced_both_ways() {
    let tree = Tree::new();
    let src = source(&tree);
    let daemon = Daemon::start(&tree.root(), &["--allow-delete"]);
    XferRun::send(&src, &daemon.addr(), "t", &["-r"]).wait_ok();
    let out_dir = tree.out("t");
    XferRun::recv("t", &daemon.addr(), &out_dir, &["-r"]).wait_ok();
    // `a` becomes a directory, `d` (with content) a file, `ln` a directory.
    fs::remove_file(src.join("a")).unwrap();
    fs::create_dir(src.join("a")).unwrap();
    fs::write(src.join("a/in"), b"in").unwrap();
    fs::remove_dir_all(src.join("d")).unwrap();
    fs::write(src.join("d"), b"now a file").unwrap();
    fs::remove_file(src.join("ln")).unwrap();
    fs::create_dir(src.join("ln")).unwrap();

    XferRun::send(&src, &daemon.addr(), "t", &["-r", "--delete"]).wait_ok();
    let mut want = snapshot(&src);
    want.remove("");
    let mut got = snapshot(&tree.root().join("t"));
    got.remove("");
    assert_same(&got, &want, "the daemon's copy");

    XferRun::recv("t", &daemon.addr(), &out_dir, &["-r", "--delete"]).wait_ok();
    let mut got = snapshot(&out_dir);
    got.remove("");
    assert_same(&got, &want, "the received copy");
}

#[test]
fn delete_never_runs_when_the_copy_failed() {
    let tree = Tree::new();
    let src = source(&tree);
    let daemon = Daemon::start(&tree.root(), &["--allow-delete"]);
    XferRun::send(&src, &daemon.addr(), "t", &["-r"]).wait_ok();
    let dest = tree.root().join("t");
    plant_stale(&dest);
    // The source's file `blocked` meets an excluded directory of that name, which --delete
    // must not remove: storing the file fails, and so the copy does.
    fs::write(src.join("blocked"), b"file").unwrap();
    fs::create_dir(dest.join("blocked")).unwrap();
    fs::write(dest.join("blocked/inside"), b"x").unwrap();
    let before = snapshot(&dest);

    let out = XferRun::send(
        &src,
        &daemon.addr(),
        "t",
        &["-r", "--delete", "--exclude", "blocked/"],
    )
    .wait();
    let line = out.error_line();
    assert!(line.contains("blocked"), "{line}");
    for stale in ["stale", "old", "old/deep/f", "d/gone", "only-here.log"] {
        assert!(before.contains_key(stale));
        assert!(
            dest.join(stale).exists(),
            "{stale} was deleted by a failed copy"
        );
    }

    // The same on the receiving side of recv -r.
    let out_dir = tree.out("t");
    fs::create_dir_all(out_dir.join("blocked")).unwrap();
    fs::write(out_dir.join("blocked/inside"), b"x").unwrap();
    fs::write(out_dir.join("stale"), b"x").unwrap();
    fs::write(tree.root().join("t/blocked"), b"file").ok();
    fs::remove_dir_all(tree.root().join("t/blocked")).unwrap();
    fs::write(tree.root().join("t/blocked"), b"file").unwrap();
    let out = XferRun::recv(
        "t",
        &daemon.addr(),
        &out_dir,
        &["-r", "--delete", "--exclude", "blocked/"],
    )
    .wait();
    out.error_line();
    assert!(out_dir.join("stale").exists(), "deleted by a failed recv");
}

/// Every entry below `dir` with its content, mode and mtime (directories too).
fn state(dir: &Path) -> String {
    format!("{:?}", snapshot(dir))
}

#[test]
fn dry_run_changes_nothing_and_reports_what_a_real_run_does() {
    let tree = Tree::new();
    let src = source(&tree);
    let daemon = Daemon::start(&tree.root(), &["--allow-delete"]);
    XferRun::send(&src, &daemon.addr(), "t", &["-r"]).wait_ok();
    let dest = tree.root().join("t");
    let out_dir = tree.out("t");
    XferRun::recv("t", &daemon.addr(), &out_dir, &["-r"]).wait_ok();
    plant_stale(&dest);
    plant_stale(&out_dir);
    fs::write(src.join("a"), b"changed").unwrap();
    fs::write(src.join("new"), vec![7u8; 3 << 20]).unwrap();
    fs::create_dir(src.join("nd")).unwrap();

    let args = ["-r", "--delete", "--exclude", "*.log"];
    let want = {
        let mut w = STALE.to_vec();
        w.extend([">f.st...... a", ">f+++++++++ new", "cd+++++++++ nd/"]);
        set(&w)
    };
    let (dest_before, src_before) = (state(&dest), state(&src));
    let dry = |extra: &[&str]| {
        let mut a = args.to_vec();
        a.extend(extra);
        XferRun::send(&src, &daemon.addr(), "t", &a).wait_ok()
    };
    assert_eq!(lines(&dry(&["-n"])), want);
    let json = dry(&["--dry-run", "--json"]);
    let array: Vec<serde_json::Value> = serde_json::from_str(json.stdout.trim()).unwrap();
    let actions: BTreeSet<String> = array
        .iter()
        .map(|c| format!("{} {} {}", c["action"], c["kind"], c["path"]).replace('"', ""))
        .collect();
    assert!(actions.contains("create file new") && actions.contains("delete dir old"));
    assert_eq!(actions.len(), want.len());
    assert_eq!(
        state(&dest),
        dest_before,
        "a dry run changed the daemon's tree"
    );
    assert_eq!(state(&src), src_before);

    // The same for recv -r, into an existing tree and into none at all.
    fs::write(dest.join("a"), b"changed").unwrap();
    fs::write(out_dir.join("local-only"), b"x").unwrap();
    let out_before = state(&out_dir);
    let out = XferRun::recv("t", &daemon.addr(), &out_dir, &["-r", "-n", "--delete"]).wait_ok();
    assert!(lines(&out).contains(">f.st...... a"), "{}", out.stdout);
    assert!(lines(&out).contains("*deleting   local-only"));
    assert_eq!(
        state(&out_dir),
        out_before,
        "a dry run changed the local tree"
    );
    let fresh = tree.out("fresh");
    XferRun::recv("t", &daemon.addr(), &fresh, &["-r", "-n"]).wait_ok();
    assert!(!fresh.exists(), "a dry run created the receiving directory");

    // And the real run does exactly what the dry run says.
    let said = lines(&dry(&["-n"]));
    assert!(said.contains(">f..t...... a"), "{said:?}");
    let real = XferRun::send(&src, &daemon.addr(), "t", &[&args[..], &["-i"]].concat()).wait_ok();
    assert_eq!(lines(&real), said);
}

#[test]
fn delete_is_refused_by_a_daemon_that_does_not_allow_it() {
    for (flags, setting) in [
        (&[][..], "--allow-delete"),
        (&["--read-only", "--allow-delete"][..], "--read-only"),
    ] {
        let tree = Tree::new();
        let src = source(&tree);
        let dest = tree.root().join("t");
        fs::create_dir(&dest).unwrap();
        fs::write(dest.join("stale"), b"x").unwrap();
        let daemon = Daemon::start(&tree.root(), flags);
        let before = state(&dest);
        for extra in [&[][..], &["-n"][..]] {
            let mut args = vec!["-r", "--delete"];
            args.extend(extra);
            let out = XferRun::send(&src, &daemon.addr(), "t", &args).wait();
            let line = out.error_line();
            assert!(line.contains(setting), "{line}");
            assert_eq!(state(&dest), before, "something moved or went");
        }
        // copy -r to such a daemon fails the same way, through the source daemon.
        let other = tree.path().join("other");
        fs::create_dir_all(other.join("t")).unwrap();
        fs::write(other.join("t/new"), b"n").unwrap();
        let src_daemon = Daemon::start(&other, &[]);
        let out = xfer([
            "copy".to_string(),
            "-r".into(),
            "--delete".into(),
            format!("{}:t", src_daemon.addr()),
            format!("{}:t", daemon.addr()),
        ]);
        let line = out.error_line();
        assert!(line.contains(setting), "{line}");
        assert_eq!(state(&dest), before, "something moved or went");
    }
}

/// Runs what follows it as `nobody` when the tests run as root (root reads every file);
/// otherwise as the user running them, whom a mode of 0 shuts out as well.
fn unprivileged() -> &'static [&'static str] {
    match rustix::process::geteuid().is_root() {
        true => &[
            "setpriv",
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
        ],
        false => &[],
    }
}

/// A source file the client may not read, and a directory it may not list, are left out with
/// a warning each while the rest of the tree goes; `--delete` keeps what the receiver holds
/// in their place (nothing says it is gone), and the copy ends in one error line and exit 1.
/// The same from a daemon's `copy -r`, whose error names them.
#[test]
fn source_entries_that_cannot_be_read_are_left_out_kept_at_the_receiver_and_fail_the_copy() {
    use std::os::unix::fs::PermissionsExt;
    let chmod = |path: &Path, mode| fs::set_permissions(path, fs::Permissions::from_mode(mode));
    let tree = Tree::new();
    let src = source(&tree);
    fs::create_dir(src.join("locked")).unwrap();
    fs::write(src.join("locked/f"), b"in a directory shut later").unwrap();
    fs::write(src.join("secret"), b"readable at first").unwrap();
    for dir in [tree.path(), &tree.path().join("src")] {
        chmod(dir, 0o755).unwrap();
    }
    let daemon = Daemon::start(&tree.root(), &["--allow-delete"]);
    let addr = daemon.addr();
    let send = |extra: &[&str]| {
        let mut args = vec!["send", "-r", src.to_str().unwrap(), &addr, "--as", "t"];
        args.extend(extra);
        XferRun::spawn_under(unprivileged(), args).wait()
    };
    send(&[]).ok();
    let dest = tree.root().join("t");
    plant_stale(&dest);
    fs::write(src.join("a"), b"changed").unwrap();
    chmod(&src.join("secret"), 0o000).unwrap();
    chmod(&src.join("locked"), 0o300).unwrap();

    let dry = send(&["--delete", "-n"]);
    assert!(!dry.status.success());
    // The stale entries, the log no filter spares and `a`: not the two left out.
    assert_eq!(lines(&dry).len(), STALE.len() + 2, "{}", dry.stdout);
    let out = send(&["--delete", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    assert_eq!(
        out.stderr.lines().last().unwrap_or_default(),
        "xfer: 2 source entries could not be read and were left out (see the warnings above)"
    );
    for warning in [
        "xfer: warning: skipping secret: Permission denied (os error 13)",
        "xfer: warning: skipping what is in locked/: Permission denied (os error 13)",
    ] {
        assert!(out.stderr.contains(warning), "{}", out.stderr);
    }
    out.assert_json_u64s(
        &["entries_unreadable", "entries_deleted", "files_transferred"],
        &[2, STALE.len() as u64 + 1, 1],
    );
    // The rest went; what the source could not read is kept as it was.
    assert_eq!(fs::read(dest.join("a")).unwrap(), b"changed");
    assert_eq!(fs::read(dest.join("secret")).unwrap(), b"readable at first");
    assert_eq!(
        fs::read(dest.join("locked/f")).unwrap(),
        b"in a directory shut later"
    );
    assert_eq!(
        list_tree(&dest),
        ["a", "d/", "d/b", "d/e/", "d/e/c", "keep.log", "ln", "locked/", "locked/f", "secret"]
    );
    // Left out on purpose, it is no error.
    let excluded = send(&["--delete", "--exclude", "secret", "--exclude", "locked/"]).ok();
    assert_eq!(excluded.stderr, "");

    // A daemon copying a tree it cannot wholly read: the rest arrives, the error names them.
    let src_daemon =
        Daemon::start_under(unprivileged(), "127.0.0.1:0", &tree.path().join("src"), &[]);
    let dst_root = tree.path().join("dst");
    fs::create_dir(&dst_root).unwrap();
    let dst_daemon = Daemon::start(&dst_root, &[]);
    let copied = xfer([
        "copy".to_string(),
        "-r".into(),
        format!("{}:t", src_daemon.addr()),
        format!("{}:t", dst_daemon.addr()),
    ]);
    assert!(
        copied.error_line().ends_with(
            "2 source entries could not be read and were left out: \
             what is in locked/: Permission denied (os error 13); \
             secret: Permission denied (os error 13)"
        ),
        "{}",
        copied.stderr
    );
    assert_eq!(
        list_tree(&dst_root.join("t")),
        ["a", "d/", "d/b", "d/e/", "d/e/c", "keep.log", "ln", "locked/"]
    );
}
