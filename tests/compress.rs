//! Compressed transfers (`--compress auto|off|LEVEL`): compressible, incompressible and mixed
//! files and trees both ways and through `xfer copy`, a resumed interruption, and compressed
//! frames a hostile client sends (bad sizes, a decompression bomb, a bad CRC) refused while the
//! daemon keeps serving.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use xfer_proto::{ChunkRef, DataZ, ErrorCode, Frame, CAP_COMPRESSION, MAX_CHUNK_SIZE};
use xfer_tests::metrics::{http_get, metrics_port, sample};
use xfer_tests::raw::{open_write, RawConn};
use xfer_tests::{
    journal_held, journal_path, list_tree, random_file, round_trip, run_xfer, sha256_file,
    wait_until, Daemon, Tree, XferRun,
};

const MIB: u64 = 1024 * 1024;
const GUARD: Duration = Duration::from_secs(180);

/// Writes `size` bytes of CSV-like text (compresses about 5:1 with zstd -1).
fn text_file(path: &Path, size: u64, seed: u64) {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let (mut written, mut row) = (0, seed);
    while written < size {
        row += 1;
        let line = format!(
            "{row},customer-{},{}.{:02},2026-12-{:02},{}\n",
            row % 9973,
            (row * 7919) % 100_000,
            row % 100,
            row % 28 + 1,
            ["paid", "open", "refunded"][(row % 3) as usize]
        );
        let line = &line.as_bytes()[..line.len().min((size - written) as usize)];
        out.write_all(line).unwrap();
        written += line.len() as u64;
    }
}

/// Writes 1 MiB blocks of text and random bytes in turn.
fn mixed_file(path: &Path, blocks: u64) {
    let dir = tempfile::tempdir().unwrap();
    let mut out = std::fs::File::create(path).unwrap();
    for block in 0..blocks {
        let part = dir.path().join("part");
        if block % 2 == 0 {
            text_file(&part, MIB, block);
        } else {
            random_file(&part, MIB, block);
        }
        out.write_all(&std::fs::read(&part).unwrap()).unwrap();
    }
}

/// Sends and receives `src` with `--compress MODE`; returns the `wire_bytes` of both runs.
#[track_caller]
fn both_ways(daemon: &Daemon, tree: &Tree, src: &Path, mode: &str) -> (u64, u64) {
    let name = format!("{}-{mode}", src.file_name().unwrap().to_str().unwrap());
    let want = sha256_file(src);
    let args = ["--compress", mode, "--json", "--chunk-size", "1M"];
    let up = XferRun::send(src, &daemon.addr(), &name, &args).wait_ok();
    assert_eq!(
        sha256_file(&daemon.root().join(&name)),
        want,
        "upload of {name}"
    );
    let out = tree.out(&name);
    let down = XferRun::recv(&name, &daemon.addr(), &out, &args).wait_ok();
    assert_eq!(sha256_file(&out), want, "download of {name}");
    for run in [&up, &down] {
        assert_eq!(
            run.json_u64("bytes_transferred"),
            run.json_u64("bytes_total")
        );
    }
    (up.json_u64("wire_bytes"), down.json_u64("wire_bytes"))
}

#[test]
fn files_move_intact_with_auto_off_and_a_level_both_ways() {
    let tree = Tree::new();
    let daemon = Daemon::start(&tree.root(), &[]);
    let (text, random, mixed) = (tree.src("t.csv"), tree.src("r.bin"), tree.src("m.bin"));
    text_file(&text, 8 * MIB, 1);
    random_file(&random, 4 * MIB, 2);
    mixed_file(&mixed, 6);

    // A fixed level compresses every chunk that shrinks, and only those.
    let (up, down) = both_ways(&daemon, &tree, &text, "3");
    assert!(
        up < 8 * MIB / 3 && down < 8 * MIB / 3,
        "text: {up} / {down} bytes on the wire"
    );
    assert_eq!(both_ways(&daemon, &tree, &random, "3"), (4 * MIB, 4 * MIB));
    let (up, down) = both_ways(&daemon, &tree, &mixed, "3");
    for wire in [up, down] {
        assert!(
            wire > 3 * MIB && wire < 4 * MIB,
            "mixed: {wire} bytes on the wire"
        );
    }
    // Off sends everything as it is.
    for src in [&text, &random, &mixed] {
        let size = std::fs::metadata(src).unwrap().len();
        assert_eq!(both_ways(&daemon, &tree, src, "off"), (size, size));
    }
    // Auto decides from timing, which a test cannot pin: the bytes arrive intact either way.
    for src in [&text, &random, &mixed] {
        both_ways(&daemon, &tree, src, "auto");
    }
}

#[test]
fn downloads_follow_the_daemon_default_unless_the_client_asks() {
    let tree = Tree::new();
    let daemon = Daemon::start(&tree.root(), &["--compress", "5"]);
    text_file(&tree.root().join("t.csv"), 4 * MIB, 3);
    let want = sha256_file(&tree.root().join("t.csv"));
    let recv = |daemon: &Daemon, out: &str, args: &[&str]| {
        let out = tree.out(out);
        let run = XferRun::recv("t.csv", &daemon.addr(), &out, args).wait_ok();
        assert_eq!(sha256_file(&out), want);
        run.json_u64("wire_bytes")
    };
    assert!(recv(&daemon, "default", &["--json"]) < MIB);
    let off = ["--json", "--compress", "off"];
    assert_eq!(recv(&daemon, "off", &off), 4 * MIB);

    let off_daemon = Daemon::start(&tree.root(), &["--compress", "off"]);
    assert_eq!(recv(&off_daemon, "plain", &["--json"]), 4 * MIB);
    let asked = ["--json", "--compress", "1"];
    assert!(recv(&off_daemon, "asked", &asked) < MIB);
}

/// Asserts `got` holds the entries of `want`, every file with the same content.
#[track_caller]
fn assert_same_tree(got: &Path, want: &Path, mode: &str) {
    let entries = list_tree(want);
    assert_eq!(list_tree(got), entries, "--compress {mode}");
    for entry in entries.iter().filter(|e| !e.ends_with('/')) {
        let (a, b) = (
            sha256_file(&got.join(entry)),
            sha256_file(&want.join(entry)),
        );
        assert_eq!(a, b, "{entry} with --compress {mode}");
    }
}

#[test]
fn trees_move_intact_compressed_both_ways() {
    let tree = Tree::new();
    let daemon = Daemon::start(&tree.root(), &[]);
    let src = tree.src("docs");
    std::fs::create_dir_all(src.join("big")).unwrap();
    text_file(&src.join("big/log.csv"), 6 * MIB, 4);
    random_file(&src.join("big/media.bin"), 3 * MIB, 5);
    mixed_file(&src.join("big/mixed.bin"), 4);
    for i in 0..40 {
        text_file(&src.join(format!("page-{i}.html")), 2000 + i * 300, i);
    }
    for mode in ["auto", "off", "3"] {
        let dest = format!("docs-{mode}");
        let (src_arg, addr) = (src.to_str().unwrap(), daemon.addr());
        let send = [
            "send",
            "-r",
            "--compress",
            mode,
            src_arg,
            &addr,
            "--as",
            &dest,
        ];
        run_xfer(send, &[], GUARD).ok();
        assert_same_tree(&daemon.root().join(&dest), &src, mode);
        let back = tree.out(&dest);
        let back_arg = back.to_str().unwrap();
        let recv = [
            "recv",
            "-r",
            "--compress",
            mode,
            &dest,
            &addr,
            "-o",
            back_arg,
        ];
        run_xfer(recv, &[], GUARD).ok();
        assert_same_tree(&back, &src, mode);
    }
}

#[test]
fn a_copy_between_daemons_travels_compressed() {
    let (src, dst) = (Tree::new(), Tree::new());
    let source = Daemon::start(&src.root(), &[]);
    let dest = Daemon::start(&dst.root(), &["--metrics", "127.0.0.1:0"]);
    text_file(&src.root().join("t.csv"), 8 * MIB, 6);
    random_file(&src.root().join("r.bin"), 2 * MIB, 7);
    for (name, mode) in [("t.csv", "3"), ("r.bin", "3"), ("t.csv", "off")] {
        let from = format!("{}:{name}", source.addr());
        let to = format!("{}:{mode}-{name}", dest.addr());
        run_xfer(["copy", "--compress", mode, &from, &to], &[], GUARD).ok();
        assert_eq!(
            sha256_file(&dst.root().join(format!("{mode}-{name}"))),
            sha256_file(&src.root().join(name))
        );
    }
    let (_, _, body) = http_get(metrics_port(&dest), "/metrics");
    let raw = sample(&body, "xferd_bytes_received_total").unwrap();
    let wire = sample(&body, "xferd_wire_bytes_received_total").unwrap();
    // 18 MiB arrived; the 8 MiB of text at level 3 took well under 2 MiB.
    assert_eq!(raw, (18 * MIB) as f64);
    assert!(wire < (12 * MIB) as f64, "{wire} wire bytes for {raw}");
}

#[test]
fn a_compressed_upload_resumes_after_the_daemon_is_killed() {
    let tree = Tree::new();
    let src = tree.src("up.csv");
    text_file(&src, 48 * MIB, 8);
    let want = sha256_file(&src);
    let dest = tree.root().join("up.csv");
    let journal = journal_path(&dest);
    let mut daemon = Daemon::start(&tree.root(), &[]);
    let slow = [
        "--bwlimit",
        "8M",
        "--chunk-size",
        "256K",
        "-c",
        "4",
        "--compress",
        "3",
    ];
    let mut client = XferRun::send(&src, &daemon.addr(), "up.csv", &slow);
    wait_until(GUARD, "a quarter is journaled", || {
        assert!(
            client.is_running(),
            "the upload ended before it was interrupted"
        );
        journal_held(&journal) >= 12 * MIB
    });
    daemon.kill();
    client.kill();
    let held = journal_held(&journal);
    assert!(!dest.exists());

    let daemon = Daemon::start(&tree.root(), &[]);
    let fast = [
        "--chunk-size",
        "256K",
        "-c",
        "4",
        "--compress",
        "3",
        "--json",
    ];
    let out = XferRun::send(&src, &daemon.addr(), "up.csv", &fast).wait_ok();
    assert!(out.json_u64("resumed_bytes") >= held, "{}", out.json());
    assert!(out.json_u64("wire_bytes") < out.json_u64("bytes_transferred") / 3);
    assert_eq!(sha256_file(&dest), want);
}

/// A connection that offered `CAP_COMPRESSION` with an upload of `size` bytes open.
fn compressing_upload(daemon: &Daemon, name: &str, size: u64) -> (RawConn, u64) {
    let mut conn = RawConn::connect(daemon.socket_addr());
    let welcome = conn.handshake_offering(None, CAP_COMPRESSION);
    assert_ne!(welcome.capabilities & CAP_COMPRESSION, 0);
    let answer = conn.request(&open_write(name, size));
    let Frame::WriteOpened(opened) = answer else {
        panic!("upload refused: {answer:?}");
    };
    (conn, opened.transfer_id)
}

/// Sends `z` and expects the connection to end with a fatal error of `code` whose message holds
/// `says`.
#[track_caller]
fn refused(daemon: &mut Daemon, z: DataZ, code: ErrorCode, says: &str) {
    let (mut conn, _) = compressing_upload(daemon, "bad.csv", 64 * MIB);
    conn.send(&Frame::DataZ(z));
    let error = conn.expect_fatal(code, "a malformed DataZ");
    assert!(error.message.contains(says), "{error:?}");
    daemon.assert_running();
}

#[test]
fn malformed_compressed_frames_are_refused_and_the_daemon_serves_on() {
    let tree = Tree::new();
    let mut daemon = Daemon::start(&tree.root(), &["--chunk-size", "1M"]);
    let zstd = |bytes: &[u8]| Bytes::from(zstd::bulk::compress(bytes, 1).unwrap());
    let text = b"id,name\n".repeat(4096);
    // A bomb: 16 MiB of zeros announced as 4 KiB stops at 4 KiB.
    let bomb = zstd(&vec![0; MAX_CHUNK_SIZE as usize]);
    refused(
        &mut daemon,
        DataZ::new(1, 0, 4096, bomb),
        ErrorCode::Protocol,
        "expands beyond",
    );
    // Fewer bytes than announced.
    let short = DataZ::new(1, 0, text.len() as u32 + 10, zstd(&text));
    refused(&mut daemon, short, ErrorCode::Protocol, "expands to");
    // Not zstd at all.
    let junk = DataZ::new(1, 0, 100, Bytes::from_static(b"not a zstd frame"));
    refused(&mut daemon, junk, ErrorCode::Protocol, "damaged");
    // Above the daemon's chunk limit, or above any chunk: refused before any allocation.
    let big = DataZ::new(1, 0, 2 * MIB as u32, zstd(b"x"));
    refused(&mut daemon, big, ErrorCode::TooLarge, "above the limit");
    let huge = DataZ::new(1, 0, MAX_CHUNK_SIZE + 1, zstd(b"x"));
    refused(
        &mut daemon,
        huge,
        ErrorCode::Protocol,
        "above the largest chunk",
    );
    // Beyond the file.
    let beyond = DataZ::new(1, 64 * MIB - 10, text.len() as u32, zstd(&text));
    refused(&mut daemon, beyond, ErrorCode::Protocol, "beyond the file");

    // A bad CRC is asked for again, and the connection goes on.
    let (mut conn, id) = compressing_upload(&daemon, "crc.csv", text.len() as u64);
    let mut damaged = DataZ::new(id, 0, text.len() as u32, zstd(&text));
    damaged.crc32 ^= 1;
    let chunk = ChunkRef {
        transfer_id: id,
        offset: 0,
        len: text.len() as u32,
    };
    assert_eq!(conn.request(&Frame::DataZ(damaged)), Frame::Reject(chunk));
    let good = DataZ::new(id, 0, text.len() as u32, zstd(&text));
    assert_eq!(conn.request(&Frame::DataZ(good)), Frame::Ack(chunk));

    // Without CAP_COMPRESSION, DataZ is out of place.
    let mut old = RawConn::handshaken(daemon.socket_addr(), None);
    old.send(&Frame::DataZ(DataZ::new(1, 0, 64, zstd(&[b'a'; 64]))));
    let error = old.expect_fatal(ErrorCode::Protocol, "DataZ without CAP_COMPRESSION");
    assert!(error.message.contains("CAP_COMPRESSION"), "{error:?}");

    daemon.assert_running();
    let src = tree.src("good.bin");
    random_file(&src, 300_000, 9);
    round_trip(
        &daemon,
        &src,
        "good.bin",
        &tree.out("good.bin"),
        &["--compress", "3"],
    );
}
