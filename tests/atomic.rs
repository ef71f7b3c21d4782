//! Transfers become visible atomically: the final name never shows a partial file, a
//! replacement keeps the old content under the name until the new file is complete, and a
//! download of a file rewritten midway never yields a mix of old and new bytes.

use std::fs;
use std::io::ErrorKind;
use std::path::Path;
use std::time::Duration;

use xfer_tests::{
    journal_held, journal_path, partial_path, random_file, set_mtime, sha256_file, try_sha256_file,
    wait_until, Daemon, Tree, XferRun,
};

/// ~2 s for a 4 MiB file.
const SLOW: &[&str] = &["--bwlimit", "2M", "--chunk-size", "64K"];
const SIZE: u64 = 4 * 1024 * 1024;
const GUARD: Duration = Duration::from_secs(120);

/// SHA-256 of the file at the final name, or `None` if there is none.
fn final_content(path: &Path) -> Option<String> {
    match try_sha256_file(path) {
        Ok(hash) => Some(hash),
        Err(e) if e.kind() == ErrorKind::NotFound => None,
        Err(e) => panic!("read {}: {e}", path.display()),
    }
}

/// Runs a slow upload of `src` to `name` and, at every poll, passes what the final name holds
/// to `check`: first until the partial file shows the upload is under way, then until the client
/// exits. Then checks the upload succeeded with the source's content and left no partial file.
fn watch_slow_upload(
    daemon: &Daemon,
    src: &Path,
    name: &str,
    mut check: impl FnMut(Option<String>),
) {
    let dest = daemon.root().join(name);
    let mut client = XferRun::send(src, &daemon.addr(), name, SLOW);
    wait_until(GUARD, "the partial file appears", || {
        check(final_content(&dest));
        assert!(
            client.is_running(),
            "`{}` ended before it was observed",
            client.cmd()
        );
        partial_path(&dest).exists()
    });
    wait_until(GUARD, "the upload ends", || {
        let running = client.is_running();
        check(final_content(&dest));
        !running
    });
    client.wait_ok();
    assert_eq!(sha256_file(&dest), sha256_file(src));
    assert!(!partial_path(&dest).exists() && !journal_path(&dest).exists());
}

#[test]
fn first_upload_never_shows_a_partial_file_under_the_final_name() {
    let tree = Tree::new();
    let daemon = Daemon::start(&tree.root(), &[]);
    let src = tree.src("fresh.bin");
    let new = random_file(&src, SIZE, 9);
    watch_slow_upload(&daemon, &src, "fresh.bin", |seen| {
        if let Some(seen) = seen {
            assert_eq!(seen, new, "the final name shows an incomplete file");
        }
    });
}

#[test]
fn replacement_keeps_the_old_content_until_the_new_is_complete() {
    let tree = Tree::new();
    let old = random_file(&tree.root().join("data.bin"), 1024 * 1024, 8);
    let src = tree.src("data.bin");
    let new = random_file(&src, SIZE, 9);
    let daemon = Daemon::start(&tree.root(), &[]);
    let mut replaced = false;
    watch_slow_upload(&daemon, &src, "data.bin", |seen| {
        let seen = seen.expect("the final name vanished during a replacement");
        if seen == new {
            replaced = true;
        } else {
            assert_eq!(
                seen, old,
                "the final name holds neither the old nor the new file"
            );
            assert!(!replaced, "the old content came back after the new one");
        }
    });
}

#[test]
fn download_of_a_file_rewritten_midway_never_yields_a_mix() {
    let tree = Tree::new();
    let served = tree.root().join("rewritten.bin");
    let old = random_file(&served, 4 * SIZE, 10);
    set_mtime(&served, 1_600_000_000);
    let new = random_file(&tree.src("new.bin"), 4 * SIZE, 11);
    let daemon = Daemon::start(&tree.root(), &[]);
    let out_path = tree.out("rewritten.bin");
    let mut client = XferRun::recv(
        "rewritten.bin",
        &daemon.addr(),
        &out_path,
        &["--bwlimit", "8M", "--chunk-size", "64K"],
    );
    wait_until(GUARD, "a quarter is downloaded", || {
        assert!(client.is_running(), "`{}` ended early", client.cmd());
        journal_held(&journal_path(&out_path)) >= SIZE
    });
    // Rewrite in place (same inode, same size), then give it a new mtime.
    fs::write(&served, fs::read(tree.src("new.bin")).unwrap()).unwrap();
    set_mtime(&served, 1_700_000_000);
    let out = client.wait();
    if out.status.success() {
        assert_eq!(
            sha256_file(&out_path),
            new,
            "`{}` succeeded with mixed content",
            out.cmd
        );
    } else {
        out.error_line();
        assert!(
            !out_path.exists(),
            "a failed download left {}",
            out_path.display()
        );
    }
    XferRun::recv("rewritten.bin", &daemon.addr(), &out_path, &[]).wait_ok();
    assert_eq!(sha256_file(&out_path), new);
    assert_ne!(old, new);
}
