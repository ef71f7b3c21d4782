//! What a tree copy keeps besides bytes (`send -r`, `recv -r`, `copy -r` through the real
//! binaries): owners and groups (as root, and under an unprivileged receiver that counts what it
//! could not chown), hard links (bytes sent once; a link whose other name lies outside the copy),
//! symlinks stored as they are, whatever they point at, and never followed by the daemon, mtimes
//! of links and directories, sparse files with their holes (`st_blocks` against the source; a
//! lone `send` or `recv` of one too), extended attributes and ACLs (`--no-xattrs`; one warning
//! where the filesystem refuses them), and devices and special files with `-D`. Each copy is
//! checked with `rsync -aHAX --dry-run --itemize-changes --checksum`, which must find no
//! difference, and run again to show that nothing moves.

use std::fs::{self, File};
use std::os::unix::fs::{symlink, FileExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use rustix::fs::{self as rfs, AtFlags};
use xfer_tests::{bin, random_file, sha256_file, Daemon, Tree, XferOutput, XferRun};

const MIB: u64 = 1024 * 1024;
/// `nobody` and `nogroup` on Debian.
const NOBODY: u32 = 65534;
/// Ids no user or group has: they can only travel as numbers.
const LOST_UID: u32 = 4242;
const LOST_GID: u32 = 4343;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

fn chown(path: &Path, uid: u32, gid: u32) {
    rfs::chownat(
        rfs::CWD,
        path,
        Some(rfs::Uid::from_raw(uid)),
        Some(rfs::Gid::from_raw(gid)),
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
}

fn set_mtime(path: &Path, secs: i64) {
    let time = rfs::Timespec {
        tv_sec: secs,
        tv_nsec: 123_456_789,
    };
    let times = rfs::Timestamps {
        last_access: time,
        last_modification: time,
    };
    rfs::utimensat(rfs::CWD, path, &times, AtFlags::SYMLINK_NOFOLLOW)
        .unwrap_or_else(|e| panic!("utimensat {}: {e}", path.display()));
}

fn set_xattr(path: &Path, name: &str, value: &[u8]) {
    rfs::setxattr(path, name, value, rfs::XattrFlags::empty())
        .unwrap_or_else(|e| panic!("setxattr {name} on {}: {e}", path.display()));
}

fn xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 64 * 1024];
    rfs::lgetxattr(path, name, &mut buf[..])
        .ok()
        .map(|n| buf[..n].to_vec())
}

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A file of `size` bytes whose only data is `data` at each offset of `at`; the rest are holes.
fn sparse_file(path: &Path, size: u64, at: &[u64], data: &[u8]) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let f = File::create(path).unwrap();
    f.set_len(size).unwrap();
    for offset in at {
        f.write_all_at(data, *offset).unwrap();
    }
}

/// Blocks `path` occupies on disk.
fn blocks(path: &Path) -> u64 {
    fs::symlink_metadata(path).unwrap().blocks()
}

/// 512-byte blocks a copy may hold beyond its data: one 4 KiB extent-tree block, which ext4
/// allocates once a file's extents (fallocate, then holes punched) outgrow the inode.
const EXTENT_TREE_BLOCKS: u64 = 8;

/// Asserts `copy` allocates no more than `data_blocks` plus extent-tree metadata: its holes are
/// holes, not zeros written to disk.
fn assert_holes_kept(copy: &Path, data_blocks: u64) {
    let held = blocks(copy);
    assert!(
        held <= data_blocks + EXTENT_TREE_BLOCKS,
        "{}: {held} blocks allocated, the data needs {data_blocks}",
        copy.display()
    );
}

/// Asserts rsync finds `dst` the same as `src` (content, perms, owners, times, links, hard
/// links, ACLs, attributes, devices and specials).
#[track_caller]
fn assert_rsync_same(src: &Path, dst: &Path) {
    let out = Command::new("rsync")
        .args(["-aHAX", "--dry-run", "--itemize-changes", "--checksum"])
        .arg(format!("{}/", src.display()))
        .arg(format!("{}/", dst.display()))
        .output()
        .expect("rsync (apt-get install rsync)");
    assert!(
        out.status.success(),
        "rsync failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let diff = String::from_utf8_lossy(&out.stdout);
    assert!(
        diff.trim().is_empty(),
        "rsync -aHAX sees {} differ from {}:\n{diff}",
        dst.display(),
        src.display()
    );
}

#[track_caller]
fn assert_json(out: &XferOutput, field: &str, want: u64) {
    assert_eq!(out.json_u64(field), want, "{field}: {}", out.stdout);
}

/// A copy of an unchanged tree moves no data.
#[track_caller]
fn assert_nothing_moved(out: &XferOutput) {
    assert_json(out, "files_transferred", 0);
    assert_json(out, "bytes_transferred", 0);
}

fn send_tree(src: &Path, addr: &str, name: &str, extra: &[&str]) -> XferOutput {
    let args = [&["-r", "--json"][..], extra].concat();
    XferRun::send(src, addr, name, &args).wait()
}

fn recv_tree(name: &str, addr: &str, out: &Path, extra: &[&str]) -> XferOutput {
    let args = [&["-r", "--json"][..], extra].concat();
    XferRun::recv(name, addr, out, &args).wait()
}

fn copy_tree(from: &str, to: &str, extra: &[&str]) -> XferOutput {
    let args = [&["copy", "-r", "--json"][..], extra, &[from, to]].concat();
    XferRun::spawn(args).wait()
}

/// The first result of an `xfer copy --json` summary.
#[track_caller]
fn copy_result(out: &XferOutput, field: &str) -> u64 {
    out.json()["results"][0][field]
        .as_u64()
        .unwrap_or_else(|| panic!("no {field} in {}", out.stdout))
}

/// What [`build_rich_tree`] made: the copied top and the bytes its distinct files hold as data.
struct Rich {
    top: PathBuf,
    data_bytes: u64,
}

/// A tree with everything `rsync -aHAX` keeps, under `base/t` (and a sibling `base/outside`
/// holding the other name of one hard link): owners by name and by bare number, a set-uid file,
/// a hard-link group of three names, symlinks to `/etc`, `..` and above the tree with old
/// mtimes, sparse files (large, small, all hole), user attributes, an access and a default ACL,
/// a FIFO and a socket. Directory mtimes are set last.
fn build_rich_tree(base: &Path) -> Rich {
    let top = base.join("t");
    let mut data_bytes = 0;
    for (name, size, seed) in [
        ("plain", 10_000, 1),
        ("docs/readme", 2_000, 2),
        ("big", 3 * MIB + 5, 3),
    ] {
        random_file(&top.join(name), size, seed);
        data_bytes += size;
    }
    chown(&top.join("docs/readme"), NOBODY, NOBODY);
    chown(&top.join("big"), LOST_UID, LOST_GID);
    fs::set_permissions(top.join("big"), fs::Permissions::from_mode(0o4755)).unwrap();
    // Three names of one file: its bytes travel once.
    random_file(&top.join("linked/one"), 50_000, 4);
    data_bytes += 50_000;
    fs::hard_link(top.join("linked/one"), top.join("linked/two")).unwrap();
    fs::hard_link(top.join("linked/one"), top.join("docs/three")).unwrap();
    // A file whose other name is outside the copied tree: copied as a file of its own.
    random_file(&base.join("outside/shared"), 3_000, 5);
    data_bytes += 3_000;
    fs::hard_link(base.join("outside/shared"), top.join("shared")).unwrap();
    // Links, whatever they point at, with mtimes of their own and an owner.
    for (name, target) in [
        ("etc", "/etc"),
        ("passwd", "/etc/passwd"),
        ("up", ".."),
        ("docs/above", "../../.."),
        ("docs/to-readme", "readme"),
    ] {
        symlink(target, top.join(name)).unwrap();
        set_mtime(&top.join(name), 1_000_000_000);
    }
    chown(&top.join("docs/to-readme"), NOBODY, NOBODY);
    // Sparse: a large file with two islands of data (one not block-aligned), a small one with
    // data at its start, and one all hole.
    sparse_file(
        &top.join("sparse/vm.img"),
        64 * MIB,
        &[0, 40 * MIB + 100],
        &[7u8; 5000],
    );
    sparse_file(&top.join("sparse/small"), 512 * 1024, &[0], &[9u8; 4096]);
    sparse_file(&top.join("sparse/hole"), 300 * 1024, &[], &[]);
    // What travels of a sparse file is its data blocks, as the filesystem keeps them.
    for name in ["sparse/vm.img", "sparse/small"] {
        data_bytes += blocks(&top.join(name)) * 512;
    }
    // Attributes and ACLs.
    set_xattr(&top.join("plain"), "user.color", b"blue");
    set_xattr(&top.join("docs"), "user.purpose", b"documentation");
    // ACL entries travel by name; an id without a name by number.
    run(
        "setfacl",
        &[
            "-m",
            &format!("u:nobody:rw,u:{LOST_UID}:r,g:{LOST_GID}:w"),
            top.join("plain").to_str().unwrap(),
        ],
    );
    run(
        "setfacl",
        &["-m", "g:nogroup:rx", top.join("docs").to_str().unwrap()],
    );
    run(
        "setfacl",
        &["-d", "-m", "u:nobody:r", top.join("docs").to_str().unwrap()],
    );
    // Specials, kept only with -D; outside the directory with a default ACL.
    rfs::mknodat(
        rfs::CWD,
        top.join("fifo"),
        rfs::FileType::Fifo,
        rfs::Mode::from_raw_mode(0o640),
        0,
    )
    .unwrap();
    std::os::unix::net::UnixListener::bind(top.join("socket")).unwrap();
    for (i, dir) in ["sparse", "linked", "docs", ""].iter().enumerate() {
        set_mtime(&top.join(dir), 1_200_000_000 + i as i64);
    }
    Rich { top, data_bytes }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn a_tree_comes_out_as_rsync_makes_it_both_ways_and_by_copy() {
    if !is_root() {
        eprintln!("skipped: owners can only be given as root");
        return;
    }
    let tree = Tree::new();
    let rich = build_rich_tree(&tree.path().join("src"));
    let daemon = Daemon::start(&tree.root(), &[]);
    let other_root = tree.path().join("other-root");
    fs::create_dir_all(&other_root).unwrap();
    let other = Daemon::start(&other_root, &[]);

    // send -r: the daemon's copy.
    let sent = send_tree(&rich.top, &daemon.addr(), "t", &["-D"]).ok();
    assert_rsync_same(&rich.top, &tree.root().join("t"));
    assert_json(&sent, "bytes_transferred", rich.data_bytes);
    assert_json(&sent, "hard_links", 2);
    assert_json(&sent, "not_chowned", 0);
    assert_json(&sent, "entries_skipped", 0);
    let copy = tree.root().join("t");
    let inode = |p: &str| fs::metadata(copy.join(p)).unwrap().ino();
    assert_eq!(inode("linked/one"), inode("linked/two"));
    assert_eq!(inode("linked/one"), inode("docs/three"));
    assert_eq!(fs::metadata(copy.join("shared")).unwrap().nlink(), 1);
    assert_eq!(fs::read_link(copy.join("etc")).unwrap(), Path::new("/etc"));
    assert_eq!(fs::metadata(copy.join("big")).unwrap().uid(), LOST_UID);
    for name in ["sparse/vm.img", "sparse/small", "sparse/hole"] {
        assert_holes_kept(&copy.join(name), blocks(&rich.top.join(name)));
        assert_eq!(
            sha256_file(&copy.join(name)),
            sha256_file(&rich.top.join(name))
        );
    }
    assert_nothing_moved(&send_tree(&rich.top, &daemon.addr(), "t", &["-D"]).ok());
    // By number, owners and ACL entries come out the same on one machine.
    send_tree(
        &rich.top,
        &daemon.addr(),
        "numeric",
        &["-D", "--numeric-ids"],
    )
    .ok();
    assert_rsync_same(&rich.top, &tree.root().join("numeric"));
    let numeric = send_tree(
        &rich.top,
        &daemon.addr(),
        "numeric",
        &["-D", "--numeric-ids"],
    );
    assert_nothing_moved(&numeric.ok());

    // recv -r: a local copy of the daemon's.
    let out = tree.out("t");
    let got = recv_tree("t", &daemon.addr(), &out, &["-D"]).ok();
    assert_rsync_same(&rich.top, &out);
    assert_json(&got, "bytes_transferred", rich.data_bytes);
    assert_json(&got, "hard_links", 2);
    for name in ["sparse/vm.img", "sparse/small", "sparse/hole"] {
        assert_holes_kept(&out.join(name), blocks(&rich.top.join(name)));
    }
    assert_nothing_moved(&recv_tree("t", &daemon.addr(), &out, &["-D"]).ok());

    // copy -r: from one daemon to the other.
    let (from, to) = (
        format!("{}:t", daemon.addr()),
        format!("{}:t2", other.addr()),
    );
    let copied = copy_tree(&from, &to, &["-D"]).ok();
    assert_rsync_same(&rich.top, &other_root.join("t2"));
    assert_eq!(copy_result(&copied, "bytes_transferred"), rich.data_bytes);
    assert_eq!(copy_result(&copied, "hard_links"), 2);
    let again = copy_tree(&from, &to, &["-D"]).ok();
    assert_eq!(
        copy_result(&again, "bytes_transferred"),
        0,
        "{}",
        again.stdout
    );
}

#[test]
fn specials_only_when_asked_for_and_no_xattrs_leaves_attributes_out() {
    let tree = Tree::new();
    let src = tree.src("t");
    random_file(&src.join("f"), 100, 1);
    set_xattr(&src.join("f"), "user.k", b"v");
    rfs::mknodat(
        rfs::CWD,
        src.join("fifo"),
        rfs::FileType::Fifo,
        rfs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    let daemon = Daemon::start(&tree.root(), &[]);
    let sent = send_tree(&src, &daemon.addr(), "t", &["--no-xattrs"]).ok();
    assert_json(&sent, "entries_skipped", 1);
    assert!(
        sent.stderr.contains("xfer: warning: skipping fifo"),
        "{}",
        sent.stderr
    );
    assert!(!tree.root().join("t/fifo").exists());
    assert_eq!(xattr(&tree.root().join("t/f"), "user.k"), None);
    let out = tree.out("t");
    recv_tree("t", &daemon.addr(), &out, &[]).ok();
    assert_eq!(xattr(&out.join("f"), "user.k"), None);
    // Without --no-xattrs the attribute comes along; --specials makes the FIFO (--devices
    // alone would not).
    let devices = send_tree(&src, &daemon.addr(), "t", &["--devices"]).ok();
    assert_json(&devices, "entries_skipped", 1);
    assert_eq!(
        xattr(&tree.root().join("t/f"), "user.k").as_deref(),
        Some(&b"v"[..])
    );
    let specials = send_tree(&src, &daemon.addr(), "t", &["--specials"]).ok();
    assert_json(&specials, "entries_skipped", 0);
    let fifo = fs::symlink_metadata(tree.root().join("t/fifo")).unwrap();
    assert!(fifo.file_type().is_fifo());
    // A second run finds the FIFO in place and leaves it alone.
    let again = send_tree(&src, &daemon.addr(), "t", &["--specials"]).ok();
    assert_json(&again, "entries_skipped", 0);
    let kept = fs::symlink_metadata(tree.root().join("t/fifo")).unwrap();
    assert_eq!(kept.ino(), fifo.ino(), "the FIFO was made again");
}

/// A daemon without the privilege to chown keeps its own user, finishes the copy and counts
/// the entries it could not give their owner; so does a client receiving as an ordinary user.
/// Devices need the privilege too: left out with a warning; a FIFO is made.
#[test]
fn an_unprivileged_receiver_keeps_its_own_user_and_counts_what_it_could_not_chown() {
    if !is_root() {
        eprintln!("skipped: dropping privileges needs root to start from");
        return;
    }
    let tree = Tree::new();
    // nobody must reach the daemon's root and the client's output.
    fs::set_permissions(tree.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let src = tree.src("t");
    random_file(&src.join("mine"), 1000, 1);
    random_file(&src.join("sub/root-owned"), 1000, 2);
    chown(&src.join("mine"), NOBODY, NOBODY);
    rfs::mknodat(
        rfs::CWD,
        src.join("fifo"),
        rfs::FileType::Fifo,
        rfs::Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
    rfs::mknodat(
        rfs::CWD,
        src.join("null"),
        rfs::FileType::CharacterDevice,
        rfs::Mode::from_raw_mode(0o666),
        rfs::makedev(1, 3),
    )
    .unwrap();
    fs::set_permissions(tree.path().join("src"), fs::Permissions::from_mode(0o755)).unwrap();
    let root = tree.root();
    chown(&root, NOBODY, NOBODY);
    let drop = [
        "setpriv",
        "--reuid=nobody",
        "--regid=nogroup",
        "--clear-groups",
    ];
    let daemon = Daemon::start_under(&drop, "127.0.0.1:0", &root, &[]);

    let sent = send_tree(&src, &daemon.addr(), "t", &["-D"]).ok();
    // Root-owned: the top, sub, sub/root-owned and the FIFO; "mine" is nobody's already.
    assert_json(&sent, "not_chowned", 4);
    assert_json(&sent, "entries_skipped", 1);
    assert!(sent.stderr.contains("skipping null"), "{}", sent.stderr);
    for name in ["", "mine", "sub/root-owned", "fifo"] {
        assert_eq!(
            fs::symlink_metadata(root.join("t").join(name))
                .unwrap()
                .uid(),
            NOBODY,
            "{name}"
        );
    }
    assert!(fs::symlink_metadata(root.join("t/fifo"))
        .unwrap()
        .file_type()
        .is_fifo());
    assert!(!root.join("t/null").exists());
    assert_eq!(
        sha256_file(&root.join("t/sub/root-owned")),
        sha256_file(&src.join("sub/root-owned"))
    );

    // A client receiving as nobody from a privileged daemon.
    let privileged_root = tree.path().join("privileged");
    fs::create_dir_all(&privileged_root).unwrap();
    let privileged = Daemon::start(&privileged_root, &[]);
    send_tree(&src, &privileged.addr(), "t", &[]).ok();
    let out = tree.path().join("nobody-out");
    fs::create_dir_all(&out).unwrap();
    chown(&out, NOBODY, NOBODY);
    let got = Command::new(drop[0])
        .args(&drop[1..])
        .arg(bin("xfer"))
        .env("HOME", "/nonexistent")
        .args(["recv", "-r", "--json", "t", &privileged.addr(), "-o"])
        .arg(out.join("t"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&got.stdout);
    assert!(
        got.status.success(),
        "{}",
        String::from_utf8_lossy(&got.stderr)
    );
    let json: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    // The top, sub and sub/root-owned are root's; "mine" is nobody's already.
    assert_eq!(json["not_chowned"], 3, "{stdout}");
    assert_eq!(
        fs::metadata(out.join("t/sub/root-owned")).unwrap().uid(),
        NOBODY
    );
}

/// Links are stored as they are: to `/etc`, to a file in it, to `..` and above the tree's top.
/// The daemon never follows one when it resolves a name: writing or reading through them is
/// refused, and nothing outside its root changes.
#[test]
fn links_to_etc_and_dotdot_are_stored_verbatim_and_never_followed_by_the_daemon() {
    let tree = Tree::new();
    let src = tree.src("t");
    random_file(&src.join("sub/f"), 100, 1);
    for (name, target) in [
        ("etc", "/etc"),
        ("passwd", "/etc/passwd"),
        ("parent", ".."),
        ("sub/out", "../.."),
        ("sub/far", "../../../../.."),
    ] {
        symlink(target, src.join(name)).unwrap();
    }
    let root = tree.root();
    let daemon = Daemon::start(&root, &[]);
    let passwd = (
        fs::metadata("/etc/passwd").unwrap().mtime(),
        sha256_file(Path::new("/etc/passwd")),
    );
    let etc_mtime = fs::metadata("/etc").unwrap().mtime();

    send_tree(&src, &daemon.addr(), "t", &[]).ok();
    for (name, target) in [
        ("etc", "/etc"),
        ("passwd", "/etc/passwd"),
        ("parent", ".."),
        ("sub/out", "../.."),
        ("sub/far", "../../../../.."),
    ] {
        assert_eq!(
            fs::read_link(root.join("t").join(name)).unwrap(),
            Path::new(target),
            "{name}"
        );
    }
    let out = tree.out("t");
    recv_tree("t", &daemon.addr(), &out, &[]).ok();
    assert_rsync_same(&src, &out);

    let file = tree.path().join("payload");
    fs::write(&file, b"must not land outside the root\n").unwrap();
    let small_tree = tree.path().join("small-tree");
    random_file(&small_tree.join("x"), 10, 2);
    // `t/sub/out` leads to the root itself: what goes through it stays beneath the root. The
    // others lead out, or are links to replace with something else.
    let writes = [
        "t/etc/xfer-escape",
        "t/passwd",
        "t/sub/far/tmp/xfer-escape",
        "t/parent/../../xfer-escape",
    ];
    for name in writes {
        let put = XferRun::send(&file, &daemon.addr(), name, &[]).wait();
        assert!(!put.status.success(), "send --as {name} succeeded");
        let put_tree = send_tree(&small_tree, &daemon.addr(), name, &[]);
        assert!(!put_tree.status.success(), "send -r --as {name} succeeded");
    }
    for name in ["t/passwd", "t/etc/passwd", "t/sub/far/etc/passwd"] {
        let read = XferRun::recv(name, &daemon.addr(), &tree.out("read"), &[]).wait();
        assert!(!read.status.success(), "recv {name} succeeded");
    }
    let read_tree = recv_tree("t/etc", &daemon.addr(), &tree.out("etc"), &[]);
    assert!(!read_tree.status.success(), "recv -r t/etc succeeded");
    assert!(!tree.out("read").exists() && !tree.out("etc").join("passwd").exists());
    assert!(!Path::new("/etc/xfer-escape").exists());
    assert!(!Path::new("/tmp/xfer-escape").exists());
    assert_eq!(fs::metadata("/etc").unwrap().mtime(), etc_mtime);
    assert_eq!(
        (
            fs::metadata("/etc/passwd").unwrap().mtime(),
            sha256_file(Path::new("/etc/passwd"))
        ),
        passwd
    );
    assert!(!tree.path().join("xfer-escape").exists());
    // The links are still links: not replaced by what was sent through them.
    assert!(fs::symlink_metadata(root.join("t/passwd"))
        .unwrap()
        .file_type()
        .is_symlink());

    // --safe-links leaves out what leads out of the tree, as before.
    let safe = send_tree(&src, &daemon.addr(), "safe", &["--safe-links"]).ok();
    assert_json(&safe, "entries_skipped", 5);
    assert_eq!(fs::read_dir(root.join("safe")).unwrap().count(), 1);
}

/// Where the receiving filesystem has no extended attributes (ramfs), the copy goes on without
/// them: one warning for the whole tree, and a count.
#[test]
fn a_filesystem_refusing_attributes_gets_one_warning() {
    if !is_root() {
        eprintln!("skipped: mounting a ramfs needs root");
        return;
    }
    let tree = Tree::new();
    let src = tree.src("t");
    for i in 0..3 {
        let f = src.join(format!("f{i}"));
        random_file(&f, 100, i);
        set_xattr(&f, "user.n", b"x");
    }
    let root = tree.root();
    let script = format!(
        "mount -t ramfs none {} && exec \"$0\" \"$@\"",
        root.display()
    );
    // A mount namespace of its own: the ramfs goes away with the daemon.
    let wrapper = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        &script,
    ];
    let daemon = Daemon::start_under(&wrapper, "127.0.0.1:0", &root, &[]);
    let sent = send_tree(&src, &daemon.addr(), "t", &[]).ok();
    assert_json(&sent, "xattrs_refused", 3);
    assert_json(&sent, "files_transferred", 3);
    let warnings: Vec<_> = sent
        .stderr
        .lines()
        .filter(|l| l.contains("extended attributes"))
        .collect();
    assert_eq!(warnings.len(), 1, "{}", sent.stderr);
    assert!(warnings[0].starts_with("xfer: warning:"), "{}", warnings[0]);
}

/// Outside trees too: `send` of a sparse file sends its holes as `Zeros`, and a daemon names
/// them when a `recv` opens the file, so neither side fills a hole and only the data travels.
#[test]
fn a_sparse_file_sent_and_received_alone_keeps_its_holes() {
    let tree = Tree::new();
    let src = tree.src("vm.img");
    sparse_file(&src, 64 * MIB, &[8 * MIB], &[5u8; 4096]);
    let daemon = Daemon::start(&tree.root(), &[]);
    let sent = XferRun::send(&src, &daemon.addr(), "vm.img", &["--json"]).wait_ok();
    assert_json(&sent, "bytes_transferred", blocks(&src) * 512);
    assert_holes_kept(&tree.root().join("vm.img"), blocks(&src));
    let out = tree.out("vm.img");
    let got = XferRun::recv(
        "vm.img",
        &daemon.addr(),
        &out,
        &["--json", "--chunk-size", "1M"],
    )
    .wait_ok();
    // Not even the rest of the chunk holding the data is asked for.
    assert_json(&got, "bytes_transferred", blocks(&src) * 512);
    assert_holes_kept(&out, blocks(&src));
    assert_eq!(sha256_file(&out), sha256_file(&src));
}

/// `--delete` with metadata, all three ways: hard links stay links (the dry run names them as
/// such), an excluded name of a link group leaves its other name a file of its own, stale
/// entries go, and a rerun changes nothing.
#[test]
fn delete_keeps_hard_links_and_the_dry_run_names_them() {
    let base = tempfile::tempdir().unwrap();
    let src = base.path().join("t");
    fs::create_dir_all(src.join("d")).unwrap();
    fs::write(src.join("a"), b"shared bytes").unwrap();
    fs::hard_link(src.join("a"), src.join("d/b")).unwrap();
    fs::write(src.join("x.tmp"), b"left out").unwrap();
    fs::hard_link(src.join("x.tmp"), src.join("y")).unwrap();
    let root = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(root.path(), &["--allow-delete"]);
    let addr = daemon.addr();
    send_tree(&src, &addr, "t", &[]).ok();
    let dest = root.path().join("t");
    fs::write(dest.join("stale"), b"x").unwrap();

    let mirror = ["--delete", "--exclude", "*.tmp", "-i"];
    let dry = XferRun::send(&src, &addr, "t", &[&["-r", "-n"][..], &mirror].concat()).wait_ok();
    assert!(dry.stdout.contains("*deleting   stale"), "{}", dry.stdout);
    assert!(dest.join("stale").exists(), "a dry run removes nothing");
    let out = XferRun::send(&src, &addr, "t", &[&["-r"][..], &mirror].concat()).wait_ok();
    assert!(out.stdout.contains("*deleting   stale"), "{}", out.stdout);
    assert!(dest.join("stale").symlink_metadata().is_err());
    let ino = |p: &Path| fs::metadata(p).unwrap().ino();
    assert_eq!(
        ino(&dest.join("a")),
        ino(&dest.join("d/b")),
        "still one file"
    );
    assert!(
        dest.join("x.tmp").exists(),
        "excluded entries are never deleted"
    );
    assert_eq!(fs::read(dest.join("y")).unwrap(), b"left out");
    let again = XferRun::send(&src, &addr, "t", &[&["-r"][..], &mirror].concat()).wait_ok();
    assert_eq!(again.stdout, "", "a rerun changes nothing");

    // A fresh receiver's dry run names the link as one.
    let out_dir = base.path().join("out");
    let dry = XferRun::recv("t", &addr, &out_dir, &["-r", "-n", "--delete", "-i"]).wait_ok();
    assert!(
        dry.stdout.contains("hf+++++++++ d/b => a"),
        "{}",
        dry.stdout
    );
    assert!(!out_dir.exists(), "a dry run creates nothing");
    recv_tree("t", &addr, &out_dir, &["--delete"]).ok();
    assert_eq!(ino(&out_dir.join("a")), ino(&out_dir.join("d/b")));
    let stray = out_dir.join("stray");
    fs::write(&stray, b"x").unwrap();
    recv_tree("t", &addr, &out_dir, &["--delete"]).ok();
    assert!(
        stray.symlink_metadata().is_err(),
        "recv --delete removes it"
    );
    assert_eq!(ino(&out_dir.join("a")), ino(&out_dir.join("d/b")));

    // Between daemons: one MirrorTo carries the options and the deletion.
    let root2 = tempfile::tempdir().unwrap();
    let dst = Daemon::start(root2.path(), &["--allow-delete"]);
    let from = format!("{addr}:t");
    let to = format!("{}:t", dst.addr());
    copy_tree(&from, &to, &[]).ok();
    let dest2 = root2.path().join("t");
    fs::write(dest2.join("stale"), b"x").unwrap();
    let out = copy_tree(&from, &to, &["--delete", "-i"]).ok();
    assert!(out.stdout.contains("*deleting   stale"), "{}", out.stdout);
    assert_eq!(
        copy_result(&out, "hard_links"),
        0,
        "already linked: {}",
        out.stdout
    );
    assert!(dest2.join("stale").symlink_metadata().is_err());
    assert_eq!(ino(&dest2.join("a")), ino(&dest2.join("d/b")));
}
