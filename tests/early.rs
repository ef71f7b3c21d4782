//! Requests sent with `Auth` (`CAP_EARLY_AUTH`, proto.md §4.5) through the real binaries: a
//! download's first `OpenRead`, `xfer ls`'s `List` and `recv -r`'s listing reach a daemon with a
//! token before its `Welcome` (its debug log says which first request came so), and the
//! transfer is whole; a wrong token still fails with one line and leaves no file.

use std::fs;
use std::path::Path;
use std::time::Duration;

use xfer_tests::{random_file, run_xfer, sha256_file, Daemon, Tree, XferOutput};

/// Hang guard for one command of a few MiB (a guard, not a timing claim).
const GUARD: Duration = Duration::from_secs(120);
const TOKEN: &str = "early-token-3f9a";

/// Writes `token` to `DIR/NAME` and returns the path.
fn token_file(dir: &Path, name: &str, token: &str) -> String {
    let path = dir.join(name);
    fs::write(&path, format!("{token}\n")).unwrap();
    path.display().to_string()
}

/// A daemon with [`TOKEN`] that logs at debug which first request came with `Auth`.
fn token_daemon(tree: &Tree) -> Daemon {
    let token = token_file(tree.path(), "daemon-token", TOKEN);
    Daemon::start(
        &tree.root(),
        &["--token-file", &token, "--log-level", "xferd=debug"],
    )
}

/// `xfer ARGS… --token-file` with the right token.
fn with_token(tree: &Tree, args: &[&str]) -> XferOutput {
    let token = token_file(tree.path(), "client-token", TOKEN);
    run_xfer([args, &["--token-file", &token]].concat(), &[], GUARD)
}

/// Whether the daemon's log says a `request` came with `Auth`, or with the early proof behind
/// the `Hello` (`CAP_ZERO_RTT`): a connection of the command that started after another had
/// taught the client that the daemon takes early proofs sends its first request so, a round trip
/// sooner still.
fn came_with_auth(daemon: &Daemon, request: &str) -> bool {
    daemon.stderr().lines().any(|l| {
        (l.contains("the first request came with Auth")
            || l.contains("the first request came with the early proof"))
            && l.contains(request)
    })
}

/// Asserts the daemon logged `request` as a first request that came with `Auth` or the early
/// proof.
#[track_caller]
fn assert_came_with_auth(daemon: &Daemon, request: &str) {
    assert!(
        came_with_auth(daemon, request),
        "no {request} came with Auth or the early proof:\n{}",
        daemon.stderr()
    );
}

#[test]
fn a_download_sends_its_first_open_with_auth() {
    let tree = Tree::new();
    let daemon = token_daemon(&tree);
    let want = random_file(&tree.root().join("f.bin"), 3 << 20, 31);
    let out = tree.out("f.bin");
    let dest = out.to_str().unwrap();
    with_token(&tree, &["recv", "f.bin", &daemon.addr(), "-o", dest]).ok();
    assert_eq!(sha256_file(&out), want);
    assert_came_with_auth(&daemon, "OpenRead");
}

#[test]
fn a_download_with_a_wrong_token_fails_and_leaves_no_file() {
    let tree = Tree::new();
    let daemon = token_daemon(&tree);
    random_file(&tree.root().join("f.bin"), 1 << 20, 32);
    let wrong = token_file(tree.path(), "wrong-token", "not-the-token");
    let out = tree.out("f.bin");
    let dest = out.to_str().unwrap();
    let failed = run_xfer(
        [
            "recv",
            "f.bin",
            &daemon.addr(),
            "-o",
            dest,
            "--token-file",
            &wrong,
        ],
        &[],
        GUARD,
    );
    let line = failed.error_line();
    assert!(
        line.starts_with("xfer: authentication failed: wrong token"),
        "{line}"
    );
    let left: Vec<_> = fs::read_dir(out.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "the download left {left:?}");
    assert!(!came_with_auth(&daemon, "OpenRead"));
}

#[test]
fn ls_sends_its_list_with_auth() {
    let tree = Tree::new();
    let daemon = token_daemon(&tree);
    fs::write(tree.root().join("listed.txt"), b"x").unwrap();
    let out = with_token(&tree, &["ls", &daemon.addr()]).ok();
    assert!(out.stdout.contains("listed.txt"), "{}", out.stdout);
    assert_came_with_auth(&daemon, "List");
}

#[test]
fn a_tree_download_sends_its_listing_with_auth() {
    let tree = Tree::new();
    let daemon = token_daemon(&tree);
    fs::create_dir(tree.root().join("t")).unwrap();
    let want = random_file(&tree.root().join("t/a.bin"), 200_000, 33);
    fs::write(tree.root().join("t/b.txt"), b"small").unwrap();
    let out = tree.out("t");
    let dest = out.to_str().unwrap();
    with_token(&tree, &["recv", "-r", "t", &daemon.addr(), "-o", dest]).ok();
    assert_eq!(sha256_file(&out.join("a.bin")), want);
    assert_eq!(fs::read(out.join("b.txt")).unwrap(), b"small");
    assert_came_with_auth(&daemon, "ListTree");
}

/// `xfer ARGS… --token-file` with the right token and a config directory of its own, where the
/// client remembers the daemons that take early proofs.
fn remembering(tree: &Tree, args: &[&str]) -> XferOutput {
    let token = token_file(tree.path(), "client-token", TOKEN);
    let home = tree.path().join("config");
    let home = home.to_str().unwrap();
    run_xfer(
        [args, &["--token-file", &token]].concat(),
        &[("XDG_CONFIG_HOME", home)],
        GUARD,
    )
}

/// How many first requests `request` came with the early proof, by the daemon's log.
fn came_early(daemon: &Daemon, request: &str) -> usize {
    daemon
        .stderr()
        .lines()
        .filter(|l| {
            l.contains("the first request came with the early proof") && l.contains(request)
        })
        .count()
}

#[test]
fn a_second_download_sends_its_open_behind_the_hello() {
    let tree = Tree::new();
    let daemon = token_daemon(&tree);
    let want = random_file(&tree.root().join("f.bin"), 3 << 20, 34);
    let out = tree.out("f.bin");
    let dest = out.to_str().unwrap();
    remembering(&tree, &["recv", "f.bin", &daemon.addr(), "-o", dest]).ok();
    // The first connection learns; those the pool opens after it may already use it.
    let learnt = came_early(&daemon, "OpenRead");
    fs::remove_file(&out).unwrap();
    remembering(&tree, &["recv", "f.bin", &daemon.addr(), "-o", dest]).ok();
    assert_eq!(sha256_file(&out), want);
    assert!(
        came_early(&daemon, "OpenRead") > learnt,
        "{}",
        daemon.stderr()
    );
}

#[test]
fn a_second_ls_and_tree_upload_send_their_listing_behind_the_hello() {
    let tree = Tree::new();
    let daemon = token_daemon(&tree);
    fs::write(tree.root().join("listed.txt"), b"x").unwrap();
    remembering(&tree, &["ls", &daemon.addr()]).ok();
    let out = remembering(&tree, &["ls", &daemon.addr()]).ok();
    assert!(out.stdout.contains("listed.txt"), "{}", out.stdout);
    assert_eq!(came_early(&daemon, "List"), 1, "{}", daemon.stderr());
    let src = tree.path().join("to-send");
    fs::create_dir(&src).unwrap();
    let want = random_file(&src.join("a.bin"), 300_000, 35);
    fs::write(src.join("b.txt"), b"small").unwrap();
    let src = src.to_str().unwrap();
    // A tree's connections offer bits an `ls` did not: its first learns what they are granted.
    for dest in ["up", "up-again"] {
        remembering(&tree, &["send", "-r", src, &daemon.addr(), "--as", dest]).ok();
        assert_eq!(sha256_file(&tree.root().join(dest).join("a.bin")), want);
        assert_eq!(
            fs::read(tree.root().join(dest).join("b.txt")).unwrap(),
            b"small"
        );
    }
    assert_eq!(
        came_early(&daemon, "ListTreeMeta"),
        1,
        "{}",
        daemon.stderr()
    );
}

#[test]
fn a_wrong_token_still_fails_with_one_line_where_early_proofs_are_remembered() {
    let tree = Tree::new();
    let daemon = token_daemon(&tree);
    fs::write(tree.root().join("listed.txt"), b"x").unwrap();
    remembering(&tree, &["ls", &daemon.addr()]).ok();
    let wrong = token_file(tree.path(), "wrong-token", "not-the-token");
    let home = tree.path().join("config");
    let failed = run_xfer(
        ["ls", &daemon.addr(), "--token-file", &wrong],
        &[("XDG_CONFIG_HOME", home.to_str().unwrap())],
        GUARD,
    );
    let line = failed.error_line();
    assert!(
        line.starts_with("xfer: authentication failed: wrong token"),
        "{line}"
    );
}
