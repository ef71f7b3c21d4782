//! One client uploads a name while others download it: a download sees the old complete file,
//! the new complete file, or fails with one clean line, never a mix of both; and a name under
//! its first upload cannot be downloaded at all. (Two uploads of one name are covered by
//! `resume.rs` and `concurrency.rs`.)

use std::path::{Path, PathBuf};
use std::time::Duration;

use xfer_tests::{
    journal_held, journal_path, partial_path, random_file, set_mtime, sha256_file, wait_until,
    Daemon, Tree, XferRun,
};

const SIZE: u64 = 4 * 1024 * 1024;
const GUARD: Duration = Duration::from_secs(120);
/// ~2 s for the upload.
const UPLOAD: &[&str] = &["--bwlimit", "2M", "--chunk-size", "64K"];
/// ~1 s per download.
const DOWNLOAD: &[&str] = &["--bwlimit", "4M", "--chunk-size", "64K", "-c", "4"];

/// Starts `xfer send` of `src` as `name` and waits until its partial file exists.
fn start_upload(daemon: &Daemon, src: &Path, name: &str) -> XferRun {
    let mut upload = XferRun::send(src, &daemon.addr(), name, UPLOAD);
    let partial = partial_path(&daemon.root().join(name));
    wait_until(GUARD, "the upload is under way", || {
        assert!(upload.is_running(), "`{}` ended early", upload.cmd());
        partial.exists()
    });
    upload
}

/// A download in progress or finished: its run, its output, and whether the upload was still
/// running when it started.
struct Download {
    run: XferRun,
    out: PathBuf,
    during_upload: bool,
}

#[test]
fn downloads_during_a_replacing_upload_get_old_or_new_never_a_mix() {
    let tree = Tree::new();
    let served = tree.root().join("doc.bin");
    let old = random_file(&served, SIZE, 1);
    set_mtime(&served, 1_600_000_000);
    let src = tree.src("doc.bin");
    let new = random_file(&src, SIZE, 2);
    let daemon = Daemon::start(&tree.root(), &[]);

    // A chain of overlapping downloads: the next starts once the last has a third of the file,
    // so that one is always in progress, across the commit too.
    let mut upload = start_upload(&daemon, &src, "doc.bin");
    let mut started = 0;
    let mut start = |during_upload: bool| {
        started += 1;
        let out = tree.out(&format!("doc-{started}.bin"));
        let run = XferRun::recv("doc.bin", &daemon.addr(), &out, DOWNLOAD);
        Download {
            run,
            out,
            during_upload,
        }
    };
    let mut running = vec![start(true)];
    let mut finished = Vec::new();
    let mut uploading = true;
    wait_until(GUARD, "the upload and its downloads end", || {
        uploading = uploading && upload.is_running();
        let mut still = Vec::new();
        for mut d in running.drain(..) {
            if d.run.is_running() {
                still.push(d);
            } else {
                finished.push((d, !uploading));
            }
        }
        running = still;
        let last_has_a_third = running
            .last()
            .is_none_or(|d| journal_held(&journal_path(&d.out)) >= SIZE / 3);
        if uploading && last_has_a_third {
            running.push(start(true));
        }
        !uploading && running.is_empty()
    });
    upload.wait_ok();
    assert_eq!(sha256_file(&served), new);

    let (mut seen_old, mut seen_new, mut failed, mut across) = (0, 0, Vec::new(), 0);
    for (d, upload_over_at_end) in finished {
        let result = d.run.wait();
        across += u32::from(d.during_upload && upload_over_at_end);
        if result.status.success() {
            let got = sha256_file(&d.out);
            assert!(
                got == old || got == new,
                "`{}` produced a file that is neither the old nor the new content",
                result.cmd
            );
            if got == old {
                seen_old += 1;
            } else {
                seen_new += 1;
            }
        } else {
            failed.push(result.error_line());
            assert!(
                !d.out.exists(),
                "a failed download left {}",
                d.out.display()
            );
        }
    }
    eprintln!(
        "{started} downloads ({across} across the commit): {seen_old} old, {seen_new} new, failed: {failed:#?}"
    );
    let out = tree.out("doc-after.bin");
    XferRun::recv("doc.bin", &daemon.addr(), &out, &[]).wait_ok();
    assert_eq!(sha256_file(&out), new);
}

#[test]
fn a_name_under_its_first_upload_cannot_be_downloaded() {
    let tree = Tree::new();
    let src = tree.src("first.bin");
    let want = random_file(&src, SIZE, 3);
    let daemon = Daemon::start(&tree.root(), &[]);
    let upload = start_upload(&daemon, &src, "first.bin");
    let out = tree.out("first.bin");
    let line = XferRun::recv("first.bin", &daemon.addr(), &out, &[])
        .wait()
        .error_line();
    assert!(line.contains("no such file"), "{line}");
    assert!(!out.exists());
    upload.wait_ok();
    assert_eq!(sha256_file(&tree.root().join("first.bin")), want);
}
