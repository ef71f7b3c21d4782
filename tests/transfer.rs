//! Round trips through the real binaries (sizes around a chunk boundary, parallel connections, a
//! large file, nested names), `xfer ls`, the `--json` summary and the one-line error contract.

use std::fs::{self, File};
use std::time::{Duration, SystemTime};

use xfer_tests::{
    closed_port, journal_held, journal_path, list_tree, random_file, round_trip, sha256_file,
    wait_until, xfer, Daemon, Tree, XferRun,
};

const CHUNK: u64 = 64 * 1024;

/// Sends and receives files of 0, 1, chunk−1, chunk and chunk+1 bytes with `-c conns`.
fn check_sizes_around_a_chunk(conns: &str) {
    let tree = Tree::new();
    let daemon = Daemon::start(&tree.root(), &["--chunk-size", "64K"]);
    for (i, size) in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1].into_iter().enumerate() {
        let name = format!("f{size}.bin");
        let src = tree.src(&name);
        random_file(&src, size, i as u64);
        let out = tree.out(&name);
        round_trip(
            &daemon,
            &src,
            &name,
            &out,
            &["-c", conns, "--chunk-size", "64K"],
        );
    }
}

#[test]
fn sizes_around_a_chunk_one_connection() {
    check_sizes_around_a_chunk("1");
}

#[test]
fn sizes_around_a_chunk_four_connections() {
    check_sizes_around_a_chunk("4");
}

#[test]
fn sizes_around_a_chunk_sixteen_connections() {
    check_sizes_around_a_chunk("16");
}

#[test]
fn large_random_file_round_trip() {
    let tree = Tree::new();
    let daemon = Daemon::start(&tree.root(), &[]);
    let size = 200 * 1024 * 1024 + 12_345;
    let src = tree.src("large.bin");
    let want = random_file(&src, size, 42);
    XferRun::send(&src, &daemon.addr(), "large.bin", &["-c", "4"]).wait_ok();
    assert_eq!(sha256_file(&daemon.root().join("large.bin")), want);
    let out = tree.out("large.bin");
    XferRun::recv("large.bin", &daemon.addr(), &out, &["-c", "16"]).wait_ok();
    assert_eq!(sha256_file(&out), want);
}

#[test]
fn nested_name_creates_directories() {
    let tree = Tree::new();
    let daemon = Daemon::start(&tree.root(), &[]);
    let src = tree.src("n.bin");
    random_file(&src, 100_000, 7);
    round_trip(&daemon, &src, "sub/dir/name.bin", &tree.out("n.bin"), &[]);
    assert!(tree.root().join("sub/dir").is_dir());
}

/// The `SIZE<TAB>MTIME<TAB>NAME` line for `name` in `xfer ls` output, split in its fields.
fn ls_entry(listing: &str, name: &str) -> Option<(String, String)> {
    listing.lines().find_map(|line| {
        let fields: Vec<&str> = line.split('\t').collect();
        (fields.len() == 3 && fields[2] == name)
            .then(|| (fields[0].to_owned(), fields[1].to_owned()))
    })
}

#[test]
fn ls_shows_sizes_and_mtimes_and_hides_partial_files() {
    let tree = Tree::new();
    let daemon = Daemon::start(&tree.root(), &[]);
    let src = tree.src("listed.bin");
    random_file(&src, 123_456, 3);
    // 2021-02-03T04:05:06Z: the upload keeps the source's mtime.
    let mtime = SystemTime::UNIX_EPOCH + Duration::from_secs(1_612_325_106);
    File::options()
        .write(true)
        .open(&src)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    XferRun::send(&src, &daemon.addr(), "listed.bin", &[]).wait_ok();
    XferRun::send(&src, &daemon.addr(), "sub/inner.bin", &[]).wait_ok();
    // Leftovers of an unfinished upload, as the daemon names them.
    fs::write(tree.root().join(".stray.bin.xfer-part"), b"partial").unwrap();
    fs::write(tree.root().join(".stray.bin.xfer-state"), b"journal").unwrap();

    let out = xfer(["ls", &daemon.addr()]).ok();
    assert_eq!(
        ls_entry(&out.stdout, "listed.bin"),
        Some(("123456".into(), "2021-02-03T04:05:06Z".into())),
        "`xfer ls` output:\n{}",
        out.stdout
    );
    assert_eq!(
        ls_entry(&out.stdout, "sub/").map(|e| e.0),
        Some("0".into()),
        "`xfer ls` output:\n{}",
        out.stdout
    );
    assert!(
        !out.stdout.contains("xfer-part")
            && !out.stdout.contains("xfer-state")
            && !out.stdout.contains("stray"),
        "`xfer ls` shows partial files:\n{}",
        out.stdout
    );
    assert_eq!(
        out.stdout.lines().count(),
        2,
        "`xfer ls` output:\n{}",
        out.stdout
    );

    let out = xfer(["ls", &daemon.addr(), "sub"]).ok();
    assert_eq!(
        ls_entry(&out.stdout, "inner.bin").map(|e| e.0),
        Some("123456".into()),
        "`xfer ls ADDR sub` output:\n{}",
        out.stdout
    );
}

#[test]
fn json_summary_of_a_fresh_send() {
    let tree = Tree::new();
    let daemon = Daemon::start(&tree.root(), &[]);
    let src = tree.src("j.bin");
    let size = 3 * 1024 * 1024 + 5;
    random_file(&src, size, 11);
    let out = XferRun::send(&src, &daemon.addr(), "j.bin", &["--json"]).wait_ok();
    let json = out.json();
    for field in [
        "name",
        "bytes_total",
        "bytes_transferred",
        "resumed_bytes",
        "seconds",
        "connections",
        "mbytes_per_sec",
        "crc_retries",
    ] {
        assert!(json.get(field).is_some(), "no {field:?} in {json}");
    }
    assert_eq!(out.json_u64("bytes_total"), size, "{json}");
    assert_eq!(out.json_u64("bytes_transferred"), size, "{json}");
    assert_eq!(out.json_u64("resumed_bytes"), 0, "{json}");
    assert!(
        json["seconds"].is_number() && json["mbytes_per_sec"].is_number(),
        "{json}"
    );
}

#[test]
fn recv_of_a_missing_name_fails_with_one_line() {
    let tree = Tree::new();
    let daemon = Daemon::start(&tree.root(), &[]);
    let out = XferRun::recv("no-such-file.bin", &daemon.addr(), &tree.out("x"), &[]).wait();
    let line = out.error_line();
    assert!(line.contains("no-such-file.bin"), "{line}");
    assert!(!tree.out("x").exists());
}

#[test]
fn connection_refused_fails_with_one_line() {
    let tree = Tree::new();
    let src = tree.src("r.bin");
    random_file(&src, 10, 1);
    let addr = format!("127.0.0.1:{}", closed_port());
    let line = XferRun::send(&src, &addr, "r.bin", &[]).wait().error_line();
    assert!(line.to_lowercase().contains("refused"), "{line}");
}

#[test]
fn send_of_a_missing_local_file_fails_with_one_line() {
    let tree = Tree::new();
    let daemon = Daemon::start(&tree.root(), &[]);
    let src = tree.src("missing.bin");
    let line = XferRun::send(&src, &daemon.addr(), "m.bin", &[])
        .wait()
        .error_line();
    assert!(line.contains("missing.bin"), "{line}");
    assert_eq!(list_tree(&tree.root()), Vec::<String>::new());
}

#[test]
fn a_dns_name_and_quiet_mode_work() {
    let tree = Tree::new();
    let daemon = Daemon::start(&tree.root(), &[]);
    let src = tree.src("q.bin");
    random_file(&src, 70_000, 12);
    let addr = format!("localhost:{}", daemon.socket_addr().port());
    let out = XferRun::send(&src, &addr, "q.bin", &["-q"]).wait_ok();
    assert_eq!((out.stdout.as_str(), out.stderr.as_str()), ("", ""));
    let out = XferRun::recv("q.bin", &addr, &tree.out("q.bin"), &["-q"]).wait_ok();
    assert_eq!((out.stdout.as_str(), out.stderr.as_str()), ("", ""));
    assert_eq!(sha256_file(&tree.out("q.bin")), sha256_file(&src));
}

#[test]
fn ls_hides_an_upload_in_progress() {
    let tree = Tree::new();
    let daemon = Daemon::start(&tree.root(), &[]);
    let src = tree.src("slow.bin");
    random_file(&src, 4 * 1024 * 1024, 13);
    let mut slow = XferRun::send(
        &src,
        &daemon.addr(),
        "slow.bin",
        &["--bwlimit", "2M", "--chunk-size", "64K"],
    );
    let journal = journal_path(&tree.root().join("slow.bin"));
    wait_until(Duration::from_secs(120), "the upload is under way", || {
        assert!(slow.is_running(), "`{}` ended early", slow.cmd());
        journal_held(&journal) > 0
    });
    let out = xfer(["ls", &daemon.addr()]).ok();
    assert_eq!(out.stdout, "", "`xfer ls` during an upload");
    slow.kill();
}

#[test]
fn recv_of_a_directory_fails_with_one_line() {
    let tree = Tree::new();
    fs::create_dir(tree.root().join("adir")).unwrap();
    let daemon = Daemon::start(&tree.root(), &[]);
    let out = XferRun::recv("adir", &daemon.addr(), &tree.out("adir"), &[]).wait();
    let line = out.error_line();
    assert!(line.contains("adir"), "{line}");
    assert_eq!(list_tree(&tree.path().join("out")), Vec::<String>::new());
}

/// The whole-file digest a `Commit` carries is of the kind the connection negotiated (proto.md
/// §2.4): the sequential digest with a client that does not offer `CAP_BLOCK_DIGEST`, exactly as
/// before the bit, and the block digest with one that does; the other kind is refused as
/// `Corrupt` and nothing is renamed into place. The chunks go last first, so the daemon holds
/// them ahead of any in-order position.
#[test]
fn a_commit_digest_is_of_the_kind_the_connection_negotiated() {
    use xfer_core::digest::{digest_file_as, DigestKind};
    use xfer_proto::{Commit, Data, ErrorCode, Frame, CAP_BLOCK_DIGEST};
    use xfer_tests::raw::{error_code, open_write, RawConn};

    let tree = Tree::new();
    let daemon = Daemon::start(&tree.root(), &[]);
    let src = tree.src("kinds.bin");
    random_file(&src, 5 * 512 * 1024 + 77, 31);
    let data = fs::read(&src).unwrap();
    let size = data.len() as u64;
    let digest = |kind| digest_file_as(kind, &File::open(&src).unwrap(), size).unwrap();
    let upload = |caps: u64, name: &str, digest: [u8; 16]| {
        let mut conn = RawConn::connect(daemon.socket_addr());
        let welcome = conn.handshake_offering(None, caps);
        assert_eq!(
            welcome.capabilities & CAP_BLOCK_DIGEST,
            caps & CAP_BLOCK_DIGEST
        );
        let Frame::WriteOpened(opened) = conn.request(&open_write(name, size)) else {
            panic!("upload refused");
        };
        let id = opened.transfer_id;
        let starts: Vec<u64> = (0..size).step_by(CHUNK as usize).collect();
        for &start in starts.iter().rev() {
            let end = size.min(start + CHUNK) as usize;
            let chunk = bytes::Bytes::copy_from_slice(&data[start as usize..end]);
            let answer = conn.request(&Frame::Data(Data::new(id, start, chunk)));
            assert!(matches!(answer, Frame::Ack(_)), "{answer:?}");
        }
        let commit = Commit {
            transfer_id: id,
            digest: digest.to_vec(),
        };
        conn.request(&Frame::Commit(commit))
    };
    for (caps, kind, other) in [
        (0, DigestKind::Sequential, DigestKind::Blocks),
        (CAP_BLOCK_DIGEST, DigestKind::Blocks, DigestKind::Sequential),
    ] {
        let name = format!("kinds-{caps}.bin");
        let refused = upload(caps, &name, digest(other));
        assert_eq!(
            error_code(refused, "Commit"),
            Some(ErrorCode::Corrupt),
            "{kind:?}"
        );
        assert!(!tree.root().join(&name).exists());
        let Frame::Committed(done) = upload(caps, &name, digest(kind)) else {
            panic!("{kind:?}: not committed");
        };
        assert_eq!(done.digest, digest(kind).to_vec());
        assert_eq!(sha256_file(&tree.root().join(&name)), sha256_file(&src));
    }
}
