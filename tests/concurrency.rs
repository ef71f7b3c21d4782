//! Many clients at once against a daemon with few stream slots: all of them finish, all files
//! are intact; a different file cannot join an upload in progress under the same name.

use std::time::Duration;

use xfer_tests::{
    journal_held, journal_path, random_file, sha256_file, wait_until, Daemon, Tree, XferRun,
};

const CLIENTS: u64 = 16;
const SIZE: u64 = 1024 * 1024;
/// ~2 s for 4 MiB, in chunks small enough that progress shows in the journal.
const SLOW: &[&str] = &["--bwlimit", "2M", "--chunk-size", "64K"];

#[test]
fn sixteen_concurrent_uploads_through_four_streams() {
    let tree = Tree::new();
    let daemon = Daemon::start(&tree.root(), &["--max-streams", "4"]);
    let files: Vec<(String, String)> = (0..CLIENTS)
        .map(|i| {
            let name = format!("c{i}.bin");
            let hash = random_file(&tree.src(&name), SIZE, 100 + i);
            (name, hash)
        })
        .collect();
    let runs: Vec<XferRun> = files
        .iter()
        .map(|(name, _)| XferRun::send(&tree.src(name), &daemon.addr(), name, &[]))
        .collect();
    for run in runs {
        run.wait_ok();
    }
    for (name, hash) in &files {
        assert_eq!(&sha256_file(&tree.root().join(name)), hash, "{name}");
    }
}

#[test]
fn sixteen_concurrent_downloads_through_four_streams() {
    let tree = Tree::new();
    let files: Vec<(String, String)> = (0..CLIENTS)
        .map(|i| {
            let name = format!("d{i}.bin");
            let hash = random_file(&tree.root().join(&name), SIZE, 200 + i);
            (name, hash)
        })
        .collect();
    let daemon = Daemon::start(&tree.root(), &["--max-streams", "4"]);
    let runs: Vec<XferRun> = files
        .iter()
        .map(|(name, _)| XferRun::recv(name, &daemon.addr(), &tree.out(name), &[]))
        .collect();
    for run in runs {
        run.wait_ok();
    }
    for (name, hash) in &files {
        assert_eq!(&sha256_file(&tree.out(name)), hash, "{name}");
    }
}

#[test]
fn a_different_file_cannot_join_an_upload_in_progress() {
    let tree = Tree::new();
    let daemon = Daemon::start(&tree.root(), &[]);
    let first = tree.src("first.bin");
    let want = random_file(&first, 4 * SIZE, 1);
    let second = tree.src("second.bin");
    random_file(&second, SIZE, 2);
    let dest = tree.root().join("same.bin");

    let mut slow = XferRun::send(&first, &daemon.addr(), "same.bin", SLOW);
    wait_until(
        Duration::from_secs(120),
        "the first upload is under way",
        || {
            assert!(slow.is_running(), "`{}` ended early", slow.cmd());
            journal_held(&journal_path(&dest)) > 0
        },
    );
    let line = XferRun::send(&second, &daemon.addr(), "same.bin", &[])
        .wait()
        .error_line();
    assert!(line.contains("same.bin"), "{line}");
    slow.wait_ok();
    assert_eq!(sha256_file(&dest), want);
}
