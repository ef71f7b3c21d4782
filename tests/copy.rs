//! Server-to-server copies (`xfer copy`) through the real binaries, two daemons on their own
//! ports, each with a token and a TLS certificate of its own CA: with `--tls` a file, a tree
//! and a `--from-list` fan-out arrive whole over TLS on both legs; a destination the source
//! daemon does not trust (its `--copy-ca`), and a source daemon without TLS, fail with one clear
//! line and leave nothing at the destination; a destination with a certificate is reached over
//! TLS without `--tls`. `--delta` moves only what changed against the destination's old version
//! and `--whole-file` all of it, as the source daemon reports back; a source daemon that cannot
//! be told either refuses the copy with one line.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use xfer_tests::metrics::{metrics_port, scrape};
use xfer_tests::{list_tree, random_file, sha256_file, Daemon, Tree, XferOutput};

use crate::tree::{assert_same, build_full_tree, expected, file_totals, snapshot};
use xfer_tests::{run_xfer, Pki};

/// Hang guard for one `xfer copy` run (a guard, not a timing claim).
const GUARD: Duration = Duration::from_secs(180);
const MIB: u64 = 1024 * 1024;

/// One daemon of a copy: its directory, its CA and certificate, its token file.
struct Side {
    tree: Tree,
    pki: Pki,
    token: PathBuf,
    daemon: Option<Daemon>,
}

impl Side {
    /// Makes the directory, a CA with a certificate for 127.0.0.1 and a token file; the daemon
    /// is started by [`Side::start`].
    fn new(token: &str) -> Self {
        let tree = Tree::new();
        let token_path = tree.path().join("token");
        fs::write(&token_path, format!("{token}\n")).unwrap();
        Self {
            tree,
            pki: Pki::new(&["127.0.0.1"]),
            token: token_path,
            daemon: None,
        }
    }

    /// Starts `xferd` with the token, with TLS if `tls`, and with `extra` flags.
    fn start(&mut self, tls: bool, extra: &[&str]) {
        let mut args = vec!["--token-file".to_string(), path_arg(&self.token)];
        if tls {
            args.extend(self.pki.daemon_args());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.daemon = Some(Daemon::start(&self.tree.root(), &args));
    }

    fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().expect("daemon started")
    }

    /// `127.0.0.1:PORT:NAME`, a copy endpoint on this daemon.
    fn at(&self, name: &str) -> String {
        format!("{}:{name}", self.daemon().addr())
    }

    /// Where `name` lies under this daemon's root.
    fn file(&self, name: &str) -> PathBuf {
        self.tree.root().join(name)
    }
}

fn path_arg(path: &Path) -> String {
    path.to_str().expect("UTF-8 path").to_owned()
}

/// A source and a destination daemon, both with TLS; the source trusts the destination's CA
/// for copies (`--copy-ca`), the client trusts the source's (`--ca`).
fn tls_pair() -> (Side, Side) {
    let mut dst = Side::new("dst-token-7c1d");
    dst.start(true, &["--metrics", "127.0.0.1:0"]);
    let mut src = Side::new("src-token-93ab");
    let copy_ca = path_arg(&dst.pki.ca());
    src.start(true, &["--copy-ca", &copy_ca]);
    (src, dst)
}

/// Uploads `side`'s daemon committed without a flush of their own, left to a tree's `Sync`.
fn left_to_sync(side: &Side) -> f64 {
    scrape(
        metrics_port(side.daemon()),
        &["xferd_commits_left_to_sync_total"],
    )[0]
}

/// `xfer copy --json --src-token-file … --dst-token-file … [--tls --ca SRC_CA] EXTRA…`.
fn copy(src: &Side, dst: &Side, tls: bool, extra: &[&str]) -> XferOutput {
    let mut args = vec![
        "copy".to_string(),
        "--json".into(),
        "--src-token-file".into(),
        path_arg(&src.token),
        "--dst-token-file".into(),
        path_arg(&dst.token),
    ];
    if tls {
        args.extend(["--tls".into(), "--ca".into(), path_arg(&src.pki.ca())]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    run_xfer(&args, &[], GUARD)
}

/// Asserts the `--json` summary's totals: `(copies, failed, files_total, files_transferred,
/// files_skipped, bytes_total, bytes_transferred)`, and that every result says `ok` as the
/// failure count implies.
#[track_caller]
fn assert_summary(out: &XferOutput, want: (u64, u64, u64, u64, u64, u64, u64)) {
    let (copies, failed, files_total, files_transferred, files_skipped, bytes_total, bytes) = want;
    out.assert_json_u64s(
        &[
            "copies",
            "failed",
            "files_total",
            "files_transferred",
            "files_skipped",
            "bytes_total",
            "bytes_transferred",
        ],
        &[
            copies,
            failed,
            files_total,
            files_transferred,
            files_skipped,
            bytes_total,
            bytes,
        ],
    );
    let json = out.json();
    let results = json["results"].as_array().expect("results");
    assert_eq!(results.len() as u64, copies, "{json}");
    let ok = results.iter().filter(|r| r["ok"] == true).count() as u64;
    assert_eq!(ok, copies - failed, "{json}");
}

#[test]
fn tls_copy_of_a_file_over_both_legs() {
    let (src, dst) = tls_pair();
    let size = 6 * MIB + 777;
    let want = random_file(&src.file("data/big.bin"), size, 51);
    let out = copy(
        &src,
        &dst,
        true,
        &[
            "-c",
            "3",
            "--chunk-size",
            "1M",
            &src.at("data/big.bin"),
            &dst.at("backups/big.bin"),
        ],
    )
    .ok();
    assert_summary(&out, (1, 0, 1, 1, 0, size, size));
    let result = &out.json()["results"][0];
    assert_eq!(result["src"], src.at("data/big.bin").as_str());
    assert_eq!(result["dst"], dst.at("backups/big.bin").as_str());
    assert!(result["error"].is_null(), "{result}");
    assert_eq!(sha256_file(&dst.file("backups/big.bin")), want);
    assert_eq!(list_tree(&dst.tree.root()), ["backups/", "backups/big.bin"]);
}

#[test]
fn tls_copy_of_a_tree_over_both_legs_and_its_rerun() {
    let (src, dst) = tls_pair();
    let top = src.file("t");
    build_full_tree(&top);
    // --safe-links: the links leading out are left out, as the expected tree has it.
    let want = expected(&top, &["escape", "docs/climb", "pipe"]);
    let (files, bytes) = file_totals(&want, &top);
    let args = [
        "-r",
        "--safe-links",
        "-c",
        "3",
        &src.at("t"),
        &dst.at("backup/t"),
    ];
    let out = copy(&src, &dst, true, &args).ok();
    assert_summary(&out, (1, 0, files, files, 0, bytes, bytes));
    assert_same(&snapshot(&dst.file("backup/t")), &want, "the copied tree");
    // The source daemon copies as a tree client does: its three files above 1 MiB leave their
    // flush to the tree's `Sync`.
    assert_eq!(left_to_sync(&dst), 3.0);
    // A rerun over TLS finds everything in place and moves nothing.
    let again = copy(&src, &dst, true, &args).ok();
    assert_summary(&again, (1, 0, files, 0, files, bytes, 0));
    assert_same(
        &snapshot(&dst.file("backup/t")),
        &want,
        "the tree after a rerun",
    );
}

#[test]
fn tls_copies_from_a_list_all_run_over_tls() {
    let (src, dst) = tls_pair();
    let sizes = [3 * MIB + 5, 200_000, 0];
    let mut list = String::from("# copies over TLS\n\n");
    let mut wants = Vec::new();
    for (i, size) in sizes.iter().enumerate() {
        let name = format!("in/f{i}.bin");
        wants.push(random_file(&src.file(&name), *size, 60 + i as u64));
        list.push_str(&format!(
            "{} {}\n",
            src.at(&name),
            dst.at(&format!("out/g{i}"))
        ));
    }
    let list_file = src.tree.path().join("copies.txt");
    fs::write(&list_file, list).unwrap();
    let total: u64 = sizes.iter().sum();
    let out = copy(
        &src,
        &dst,
        true,
        &["--from-list", &path_arg(&list_file), "--jobs", "2"],
    )
    .ok();
    assert_summary(&out, (3, 0, 3, 3, 0, total, total));
    for (i, want) in wants.iter().enumerate() {
        assert_eq!(&sha256_file(&dst.file(&format!("out/g{i}"))), want, "g{i}");
    }
    // Single files, each flushed at its commit.
    assert_eq!(left_to_sync(&dst), 0.0);
}

/// The source daemon checks the destination's certificate against its own `--copy-ca`, not the
/// client's `--ca`: a destination whose CA it does not trust gets nothing, not even a name.
#[test]
fn tls_copy_to_a_destination_the_source_does_not_trust_fails_clearly() {
    let mut dst = Side::new("dst-token-7c1d");
    dst.start(true, &[]);
    let mut src = Side::new("src-token-93ab");
    // Trusts its own CA only, which did not sign the destination's certificate.
    let copy_ca = path_arg(&src.pki.ca());
    src.start(true, &["--copy-ca", &copy_ca]);
    random_file(&src.file("a.bin"), 300_000, 52);
    let out = copy(&src, &dst, true, &[&src.at("a.bin"), &dst.at("a.bin")]);
    let line = out.error_line();
    assert!(
        line.contains("TLS handshake failed") && line.contains("copy_ca"),
        "{line}"
    );
    assert_summary(&out, (1, 1, 0, 0, 0, 0, 0));
    let error = out.json()["results"][0]["error"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(error.contains("TLS handshake failed"), "{error}");
    assert_eq!(list_tree(&dst.tree.root()), Vec::<String>::new());
    // Restarted trusting the destination's CA, the source carries out the same copy: the
    // refusal above was the trust anchors' doing and nothing else's.
    drop(src.daemon.take());
    let copy_ca = path_arg(&dst.pki.ca());
    src.start(true, &["--copy-ca", &copy_ca]);
    copy(&src, &dst, true, &[&src.at("a.bin"), &dst.at("a.bin")]).ok();
    assert_eq!(
        sha256_file(&dst.file("a.bin")),
        sha256_file(&src.file("a.bin"))
    );
}

#[test]
fn tls_copy_from_a_source_without_tls_fails_clearly() {
    let mut dst = Side::new("dst-token-7c1d");
    dst.start(true, &[]);
    let mut src = Side::new("src-token-93ab");
    src.start(false, &[]);
    random_file(&src.file("a.bin"), 1000, 53);
    let out = copy(&src, &dst, true, &[&src.at("a.bin"), &dst.at("a.bin")]);
    let line = out.error_line();
    assert!(line.contains("does not offer TLS"), "{line}");
    assert_summary(&out, (1, 1, 0, 0, 0, 0, 0));
    assert_eq!(list_tree(&dst.tree.root()), Vec::<String>::new());
}

/// A daemon with a certificate serves only TLS: a copy made without `--tls` reaches it over
/// TLS all the same (the source, itself without TLS, checks it against its `--copy-ca`).
#[test]
fn a_copy_without_the_tls_flag_reaches_a_tls_destination_over_tls() {
    let mut dst = Side::new("dst-token-7c1d");
    dst.start(true, &[]);
    let mut src = Side::new("src-token-93ab");
    let copy_ca = path_arg(&dst.pki.ca());
    src.start(false, &["--copy-ca", &copy_ca]);
    let want = random_file(&src.file("a.bin"), 1000, 54);
    copy(&src, &dst, false, &[&src.at("a.bin"), &dst.at("a.bin")]).ok();
    assert_eq!(sha256_file(&dst.file("a.bin")), want);
}

/// Without `--tls` on either side a copy still works as before: plain TCP on both legs.
#[test]
fn plain_copy_between_daemons_without_tls() {
    let mut dst = Side::new("dst-token-7c1d");
    dst.start(false, &[]);
    let mut src = Side::new("src-token-93ab");
    src.start(false, &[]);
    let size = 2 * MIB + 3;
    let want = random_file(&src.file("p.bin"), size, 55);
    let out = copy(&src, &dst, false, &[&src.at("p.bin"), &dst.at("q/p.bin")]).ok();
    assert_summary(&out, (1, 0, 1, 1, 0, size, size));
    assert_eq!(sha256_file(&dst.file("q/p.bin")), want);
}

/// Writes `len` seeded random bytes to `path` with a fixed mtime, the destination's old version.
fn old_version(path: &Path, len: usize, seed: u64) -> Vec<u8> {
    let mut bytes = vec![0; len];
    rand::RngCore::fill_bytes(
        &mut <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed),
        &mut bytes,
    );
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, &bytes).unwrap();
    xfer_tests::set_mtime(path, 1_700_000_000);
    bytes
}

/// `copy --delta` moves only what changed against the file the destination already holds, as
/// the source daemon reports back; `copy --whole-file` moves every byte of it again.
#[test]
fn copy_with_delta_moves_the_change_and_with_whole_file_everything() {
    let mut dst = Side::new("dst-token-7c1d");
    dst.start(false, &[]);
    let mut src = Side::new("src-token-93ab");
    src.start(false, &[]);
    let size = 4 * MIB as usize;
    let old = old_version(&dst.file("d.bin"), size, 61);
    let mut new = old.clone();
    new[MIB as usize..MIB as usize + 4000].fill(0xa5);
    fs::write(src.file("d.bin"), &new).unwrap();
    xfer_tests::set_mtime(&src.file("d.bin"), 1_800_000_000);
    let want = sha256_file(&src.file("d.bin"));
    let endpoints = [src.at("d.bin"), dst.at("d.bin")];

    let out = copy(
        &src,
        &dst,
        false,
        &["--delta", "-v", &endpoints[0], &endpoints[1]],
    )
    .ok();
    let json = out.json();
    let result = &json["results"][0];
    assert_eq!(result["delta"], true, "{json}");
    // `-v` says what the source daemon chose, and why.
    assert!(
        out.stderr.contains("d.bin: delta transfer: --delta"),
        "{}",
        out.stderr
    );
    let literal = result["literal_bytes"].as_u64().expect("literal_bytes");
    let matched = result["matched_bytes"].as_u64().expect("matched_bytes");
    // The changed 4000 bytes and the content-defined chunks around them, nothing like 4 MiB.
    assert!(literal > 0 && literal <= 256 * 1024, "{json}");
    assert!(literal + matched >= size as u64, "{json}");
    assert_eq!(
        result["bytes_transferred"].as_u64(),
        Some(literal),
        "{json}"
    );
    assert_eq!(sha256_file(&dst.file("d.bin")), want);

    // The old version again: forced whole, the same copy moves all of it.
    old_version(&dst.file("d.bin"), size, 61);
    let out = copy(
        &src,
        &dst,
        false,
        &["--whole-file", "-v", &endpoints[0], &endpoints[1]],
    )
    .ok();
    let json = out.json();
    let result = &json["results"][0];
    assert_eq!(result["delta"], false, "{json}");
    // Forced, not the automatic choice a loopback path would make too.
    assert!(
        out.stderr.contains("d.bin: whole file: --whole-file"),
        "{}",
        out.stderr
    );
    assert_eq!(
        result["literal_bytes"].as_u64(),
        Some(size as u64),
        "{json}"
    );
    assert_eq!(result["matched_bytes"].as_u64(), Some(0), "{json}");
    assert_eq!(sha256_file(&dst.file("d.bin")), want);

    // Left to choose, the source daemon takes the whole file on loopback and says why.
    old_version(&dst.file("d.bin"), size, 61);
    let out = copy(&src, &dst, false, &["-v", &endpoints[0], &endpoints[1]]).ok();
    assert_eq!(out.json()["results"][0]["delta"], false, "{}", out.json());
    assert!(
        out.stderr.contains("d.bin: whole file: a round trip of")
            && out.stderr.contains("fast path"),
        "{}",
        out.stderr
    );
    assert_eq!(sha256_file(&dst.file("d.bin")), want);
}

/// `--delta` and `--whole-file` contradict each other: refused before anything is sent.
#[test]
fn copy_refuses_delta_with_whole_file() {
    let out = run_xfer(
        [
            "copy",
            "--delta",
            "--whole-file",
            "127.0.0.1:1:a",
            "127.0.0.1:2:b",
        ],
        &[],
        GUARD,
    );
    assert!(!out.status.success(), "{}", out.stderr);
    assert!(out.stderr.contains("--whole-file"), "{}", out.stderr);
}

/// A source daemon from before `CAP_COPY_DELTA`: it welcomes every client with no capability
/// and records the type of every frame it is sent after the `Hello`.
fn daemon_without_copy_delta() -> (String, std::sync::Arc<std::sync::Mutex<Vec<u8>>>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = std::sync::Arc::clone(&seen);
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let mut len = [0u8; 4];
            while conn.read_exact(&mut len).is_ok() {
                let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
                if conn.read_exact(&mut body).is_err() {
                    break;
                }
                if body.first() != Some(&0x01) {
                    record.lock().unwrap().extend(body.first());
                    continue;
                }
                let welcome = xfer_proto::Frame::Welcome(xfer_proto::Welcome {
                    version: 1,
                    capabilities: 0,
                    max_chunk_size: xfer_proto::DEFAULT_CHUNK_SIZE,
                    window: 8,
                    agent: "xferd/old".into(),
                    proof: Vec::new(),
                });
                let mut out = bytes::BytesMut::new();
                welcome.encode(&mut out).unwrap();
                if conn.write_all(&out).is_err() {
                    break;
                }
            }
        }
    });
    (addr, seen)
}

/// A source daemon that cannot be told `--delta` or `--whole-file` is not asked to copy at all:
/// the client fails with one line naming it, rather than let it choose.
#[test]
fn copy_with_a_forced_mode_fails_clearly_against_a_daemon_that_cannot_be_told() {
    let (addr, seen) = daemon_without_copy_delta();
    for flag in ["--delta", "--whole-file"] {
        let from = format!("{addr}:d.bin");
        let out = run_xfer(["copy", flag, &from, "127.0.0.1:9:d.bin"], &[], GUARD);
        assert!(!out.status.success(), "{}", out.stderr);
        let line = out.error_line();
        assert!(
            line.contains("too old to be told") && line.contains(flag),
            "{line}"
        );
    }
    // Neither a CopyMode (0x77) nor a CopyTo (0x60) ever reached it.
    let seen = seen.lock().unwrap();
    assert!(!seen.iter().any(|t| [0x60, 0x77].contains(t)), "{seen:?}");
}
