//! Compressed transfers (`--compress auto|off|LEVEL`): compressible, incompressible and mixed
//! files and trees (their small files packed in batches) both ways and through `xfer copy`,
//! resumed interruptions, and compressed frames a hostile client sends (bad sizes, a
//! decompression bomb, a bad CRC, the wrong frames inside a batch) refused while the daemon
//! keeps serving.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use xfer_proto::{
    ChunkRef, DataZ, ErrorCode, Frame, PackedFiles, CAP_COMPRESSION, CAP_PACKED_FILES,
    MAX_CHUNK_SIZE, MAX_PACKED_LEN,
};
use xfer_tests::metrics::{http_get, metrics_port, sample};
use xfer_tests::raw::{open_write, put_file, RawConn};
use xfer_tests::{
    journal_held, journal_path, list_tree, random_file, round_trip, run_xfer, sha256_file,
    wait_until, Daemon, Tree, XferRun,
};

const MIB: u64 = 1024 * 1024;
const GUARD: Duration = Duration::from_secs(180);

/// Writes `size` bytes of CSV-like text (compresses about 5:1 with zstd -1).
fn text_file(path: &Path, size: u64, seed: u64) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
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
    let (conn, _) = compressing_upload(daemon, "bad.csv", 64 * MIB);
    ends_the_connection(daemon, conn, Frame::DataZ(z), code, says);
}

/// Sends `frame` on `conn` and expects the connection to end with a fatal error of `code`
/// whose message holds `says`, while the daemon serves on.
#[track_caller]
fn ends_the_connection(
    daemon: &mut Daemon,
    mut conn: RawConn,
    frame: Frame,
    code: ErrorCode,
    says: &str,
) {
    let what = format!("a malformed {}", frame.frame_type().name());
    conn.send(&frame);
    let error = conn.expect_fatal(code, &what);
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

/// A documentation-like tree under `dir`: `pages` small text pages in a few directories, small
/// random files and small files that start as gzip does (already compressed: sent as they are),
/// a large text file and a large random one. Returns the bytes of its files.
fn docs_tree(dir: &Path, pages: u64) -> u64 {
    let mut bytes = 0;
    for i in 0..pages {
        let size = 2000 + (i * 7919) % 18_000;
        text_file(&dir.join(format!("d{}/page-{i}.html", i % 7)), size, i);
        bytes += size;
    }
    for i in 0..30 {
        let size = 4000 + i * 1200;
        random_file(&dir.join(format!("media/r{i}.bin")), size, 100 + i);
        bytes += size;
    }
    for i in 0..20 {
        let path = dir.join(format!("d{}/changelog-{i}.gz", i % 3));
        random_file(&path, 3000 + i * 500, 200 + i);
        let mut gz = std::fs::read(&path).unwrap();
        gz[..2].copy_from_slice(&[0x1f, 0x8b]);
        std::fs::write(&path, gz).unwrap();
        bytes += 3000 + i * 500;
    }
    text_file(&dir.join("big/log.csv"), 3 * MIB, 9);
    random_file(&dir.join("big/media.bin"), 2 * MIB, 10);
    bytes + 5 * MIB
}

/// `xfer ARGS` expected to succeed, with its `--json` summary.
fn xfer_json(args: &[&str]) -> xfer_tests::XferOutput {
    let mut all = args.to_vec();
    all.push("--json");
    run_xfer(all, &[], GUARD).ok()
}

/// The daemon's small-file counters for `direction`: file bytes and bytes on the wire.
fn small_file_bytes(daemon: &Daemon, direction: &str) -> (f64, f64) {
    let (_, _, body) = http_get(metrics_port(daemon), "/metrics");
    let labels = format!("{{direction=\"{direction}\"}}");
    let raw = sample(&body, &format!("xferd_small_file_bytes_total{labels}")).unwrap();
    let wire = sample(&body, &format!("xferd_small_file_wire_bytes_total{labels}")).unwrap();
    (raw, wire)
}

#[test]
fn small_files_of_trees_travel_packed_both_ways() {
    let tree = Tree::new();
    let mut daemon = Daemon::start(&tree.root(), &["--metrics", "127.0.0.1:0"]);
    let src = tree.src("docs");
    let bytes = docs_tree(&src, 240);
    let addr = daemon.addr();
    let mut sent = (0.0, 0.0);
    for mode in ["3", "off", "auto"] {
        let dest = format!("docs-{mode}");
        let src_arg = src.to_str().unwrap();
        let up = xfer_json(&[
            "send",
            "-r",
            "--compress",
            mode,
            src_arg,
            &addr,
            "--as",
            &dest,
        ]);
        assert_same_tree(&daemon.root().join(&dest), &src, mode);
        let back = tree.out(&dest);
        let back_arg = back.to_str().unwrap();
        let down = xfer_json(&[
            "recv",
            "-r",
            "--compress",
            mode,
            &dest,
            &addr,
            "-o",
            back_arg,
        ]);
        assert_same_tree(&back, &src, mode);
        for run in [&up, &down] {
            assert_eq!(run.json_u64("bytes_transferred"), bytes, "{}", run.json());
            let wire = run.json_u64("wire_bytes");
            match mode {
                // Text shrinks about 5:1; random and gzip files go as they are.
                "3" => assert!(wire < bytes * 2 / 3, "{wire} of {bytes}: {}", run.json()),
                "off" => assert_eq!(wire, bytes, "{}", run.json()),
                _ => assert!(wire <= bytes, "{}", run.json()),
            }
        }
        let (raw_in, wire_in) = small_file_bytes(&daemon, "received");
        let (raw_out, wire_out) = small_file_bytes(&daemon, "sent");
        let (raw, wire) = (raw_in + raw_out - sent.0, wire_in + wire_out - sent.1);
        sent = (raw_in + raw_out, wire_in + wire_out);
        match mode {
            "3" => assert!(
                wire < raw / 2.0,
                "small files: {wire} on the wire for {raw}"
            ),
            "off" => assert_eq!(wire, raw),
            _ => assert!(wire <= raw),
        }
    }
    daemon.assert_running();
}

#[test]
fn a_tree_copy_between_daemons_travels_packed() {
    let (src, dst) = (Tree::new(), Tree::new());
    let source = Daemon::start(&src.root(), &[]);
    let mut dest = Daemon::start(&dst.root(), &["--metrics", "127.0.0.1:0"]);
    docs_tree(&src.root().join("docs"), 120);
    for mode in ["3", "off", "auto"] {
        let from = format!("{}:docs", source.addr());
        let to = format!("{}:docs-{mode}", dest.addr());
        run_xfer(["copy", "-r", "--compress", mode, &from, &to], &[], GUARD).ok();
        assert_same_tree(
            &dst.root().join(format!("docs-{mode}")),
            &src.root().join("docs"),
            mode,
        );
        if mode == "3" {
            let (raw, wire) = small_file_bytes(&dest, "received");
            assert!(
                wire < raw / 2.0,
                "small files: {wire} on the wire for {raw}"
            );
        }
    }
    dest.assert_running();
}

#[test]
fn a_compressed_tree_copy_resumes_after_an_interruption() {
    let tree = Tree::new();
    let src = tree.src("docs");
    let bytes = docs_tree(&src, 400);
    text_file(&src.join("big/more.csv"), 24 * MIB, 11);
    let daemon = Daemon::start(&tree.root(), &[]);
    let remote = tree.root().join("docs");
    let journal = journal_path(&remote.join("big/more.csv"));
    let src_arg = src.to_str().unwrap();
    let addr = daemon.addr();
    // The limit counts the wire: compressed, the files still take a while.
    let slow = [
        "send",
        "-r",
        "--compress",
        "3",
        "--bwlimit",
        "512K",
        "--chunk-size",
        "256K",
        src_arg,
        &addr,
        "--as",
        "docs",
    ];
    let mut client = XferRun::spawn(slow);
    wait_until(GUARD, "some small files and part of a large one", || {
        assert!(
            client.is_running(),
            "the copy ended before it was interrupted"
        );
        let stored = list_tree(&remote)
            .iter()
            .filter(|p| p.contains("page-"))
            .count();
        stored > 0 && journal_held(&journal) >= MIB
    });
    client.kill();
    daemon.wait_idle(GUARD);
    assert!(!remote.join("big/more.csv").exists());

    let done = xfer_json(&[
        "send",
        "-r",
        "--compress",
        "3",
        "--chunk-size",
        "256K",
        src_arg,
        &addr,
        "--as",
        "docs",
    ]);
    let json = done.json();
    assert!(done.json_u64("files_skipped") > 0, "{json}");
    assert!(done.json_u64("resumed_bytes") >= MIB, "{json}");
    assert!(
        done.json_u64("bytes_transferred") < bytes + 24 * MIB,
        "{json}"
    );
    assert!(
        done.json_u64("wire_bytes") < done.json_u64("bytes_transferred") / 2,
        "{json}"
    );
    assert_same_tree(&remote, &src, "3, resumed");
}

/// `frames` packed as a client would, at level 3.
fn packed(frames: &[Frame]) -> PackedFiles {
    let raw = PackedFiles::encode_frames(frames).unwrap();
    PackedFiles::new(
        frames.len() as u32,
        &raw,
        zstd::bulk::compress(&raw, 3).unwrap(),
    )
}

/// Sends `packed` on a connection that negotiated packed small files and expects it to end with
/// a fatal error of `code` whose message holds `says`.
#[track_caller]
fn packed_refused(daemon: &mut Daemon, packed: PackedFiles, code: ErrorCode, says: &str) {
    let mut conn = RawConn::connect(daemon.socket_addr());
    let welcome = conn.handshake_offering(None, CAP_COMPRESSION | CAP_PACKED_FILES);
    assert_ne!(welcome.capabilities & CAP_PACKED_FILES, 0);
    ends_the_connection(daemon, conn, Frame::PackedPutFiles(packed), code, says);
}

#[test]
fn malformed_packed_small_files_are_refused_and_the_daemon_serves_on() {
    let tree = Tree::new();
    let mut daemon = Daemon::start(&tree.root(), &[]);
    let page = b"<p>the same markup again</p>\n".repeat(200);
    let good = [put_file("a.html", &page), put_file("b.html", &page)];

    // A bomb: 64 MiB of zeros announced as 4 KiB stops at 4 KiB.
    let zeros = zstd::bulk::compress(&vec![0; 64 << 20], 1).unwrap();
    let bomb = PackedFiles::new(1, &[0; 4096], zeros);
    packed_refused(&mut daemon, bomb, ErrorCode::Protocol, "zstd");
    // Above the limit: refused when decoded, before anything is allocated.
    let mut huge = packed(&good);
    huge.raw_len = MAX_PACKED_LEN + 1;
    packed_refused(&mut daemon, huge, ErrorCode::Protocol, "above the limit");
    // Damaged on the way: caught before decompression.
    let mut damaged = packed(&good);
    damaged.crc32 ^= 1;
    packed_refused(&mut daemon, damaged, ErrorCode::BadCrc, "CRC");
    // Fewer frames than announced, or a frame that is no PutFile.
    let mut short = packed(&good);
    short.count = 3;
    packed_refused(&mut daemon, short, ErrorCode::Protocol, "announced");
    let sync = packed(&[good[0].clone(), Frame::Sync]);
    packed_refused(&mut daemon, sync, ErrorCode::Protocol, "Sync inside");
    // A file inside whose own CRC is wrong: nothing of it is stored.
    let Frame::PutFile(mut bad) = put_file("bad.html", &page) else {
        unreachable!()
    };
    bad.crc32 ^= 1;
    let bad_crc = packed(&[Frame::PutFile(bad), good[0].clone()]);
    packed_refused(&mut daemon, bad_crc, ErrorCode::BadCrc, "bad.html");
    assert!(!daemon.root().join("bad.html").exists());

    // Without CAP_PACKED_FILES, a packed frame is out of place.
    let mut old = RawConn::connect(daemon.socket_addr());
    let welcome = old.handshake_offering(None, CAP_COMPRESSION);
    assert_eq!(welcome.capabilities & CAP_PACKED_FILES, 0);
    old.send(&Frame::PackedPutFiles(packed(&good)));
    old.expect_fatal(
        ErrorCode::Protocol,
        "PackedPutFiles without CAP_PACKED_FILES",
    );

    // A good batch is stored and answered file by file.
    let mut conn = RawConn::connect(daemon.socket_addr());
    conn.handshake_offering(None, CAP_COMPRESSION | CAP_PACKED_FILES);
    conn.send(&Frame::PackedPutFiles(packed(&good)));
    for name in ["a.html", "b.html"] {
        let answer = conn.recv().expect("an answer");
        assert_eq!(answer, Frame::Done(xfer_proto::Done { name: name.into() }));
        assert_eq!(std::fs::read(daemon.root().join(name)).unwrap(), page);
    }
    daemon.assert_running();
    let src = tree.src("after");
    docs_tree(&src, 20);
    let addr = daemon.addr();
    let src_arg = src.to_str().unwrap();
    run_xfer(["send", "-r", src_arg, &addr, "--as", "after"], &[], GUARD).ok();
    assert_same_tree(&daemon.root().join("after"), &src, "auto");
}
