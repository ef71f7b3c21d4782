//! Trust on first use and automatic TLS through the real binaries: a daemon started with
//! `--tls` alone makes its own certificate; `xfer` pins it with `--accept-new`, refuses it
//! without a terminal and without that flag, and refuses loudly a changed one, naming the
//! `known_hosts` line to remove; a daemon with a CA-signed certificate gets TLS without
//! `--tls`; `xferd --fingerprint` prints what clients pin.

use std::fs;

use xfer_tests::tofu::{fingerprint, tofu_daemon, TofuHome};
use xfer_tests::{random_file, sha256_file, Pki, Tree};

#[test]
fn first_use_with_accept_new_pins_the_certificate_and_tls_needs_no_flag() {
    let tree = Tree::new();
    let state = tree.path().join("state");
    let home = TofuHome::new(&tree.path().join("config"));
    let daemon = tofu_daemon("127.0.0.1:0", &tree.root(), &state, &[]);
    let src = tree.src("a.bin");
    let want = random_file(&src, 300_000, 1);
    let addr = daemon.addr();
    home.xfer(["send", src.to_str().unwrap(), &addr, "--accept-new"])
        .ok();
    assert_eq!(sha256_file(&tree.root().join("a.bin")), want);

    let printed = fingerprint(&["--state-dir", state.to_str().unwrap()]).unwrap();
    let pins = fs::read_to_string(home.known_hosts()).unwrap();
    assert_eq!(pins, format!("{addr} {printed}\n"));

    // Pinned: no flag needed any more, in either direction.
    let out = tree.out("a.bin");
    home.xfer(["recv", "a.bin", &addr, "-o", out.to_str().unwrap()])
        .ok();
    assert_eq!(sha256_file(&out), want);
    assert_eq!(fs::read_to_string(home.known_hosts()).unwrap(), pins);
}

#[test]
fn an_unknown_daemon_is_refused_without_a_terminal_with_how_to_accept_it() {
    let tree = Tree::new();
    let state = tree.path().join("state");
    let home = TofuHome::new(&tree.path().join("config"));
    let daemon = tofu_daemon("127.0.0.1:0", &tree.root(), &state, &[]);
    let src = tree.src("a.bin");
    random_file(&src, 1000, 2);
    let addr = daemon.addr();
    let printed = fingerprint(&["--state-dir", state.to_str().unwrap()]).unwrap();
    for args in [
        &["send", src.to_str().unwrap(), &addr][..],
        &["send", "--tls", src.to_str().unwrap(), &addr],
        &["ls", &addr],
    ] {
        let line = home.xfer(args).error_line();
        assert!(
            line.contains(&format!("{addr} is not a known host")),
            "{line}"
        );
        assert!(line.contains(&printed), "{line}");
        assert!(line.contains("--accept-new"), "{line}");
    }
    assert!(!home.known_hosts().exists());
    assert!(!tree.root().join("a.bin").exists());
}

#[test]
fn a_changed_certificate_is_refused_naming_the_line_to_remove() {
    let tree = Tree::new();
    let home = TofuHome::new(&tree.path().join("config"));
    let mut daemon = tofu_daemon("127.0.0.1:0", &tree.root(), &tree.path().join("old"), &[]);
    let addr = daemon.addr();
    let src = tree.src("a.bin");
    random_file(&src, 1000, 3);
    fs::create_dir_all(home.known_hosts().parent().unwrap()).unwrap();
    fs::write(home.known_hosts(), "# pins\nelsewhere:1 SHA256:00\n").unwrap();
    home.xfer(["ls", &addr, "--accept-new"]).ok();
    daemon.kill();

    // Same address, another key: an impostor as far as the client can tell.
    let _new = tofu_daemon(&addr, &tree.root(), &tree.path().join("new"), &[]);
    let known = home.known_hosts().display().to_string();
    for args in [
        &["send", src.to_str().unwrap(), &addr][..],
        &["send", src.to_str().unwrap(), &addr, "--accept-new"],
    ] {
        let line = home.xfer(args).error_line();
        assert!(
            line.contains(&format!("certificate of {addr} has CHANGED")),
            "{line}"
        );
        assert!(
            line.contains(&format!("remove line 3 of {known}")),
            "{line}"
        );
    }
    assert!(!tree.root().join("a.bin").exists());
}

#[test]
fn a_ca_signed_daemon_gets_tls_without_the_flag_and_pins_nothing() {
    let tree = Tree::new();
    let home = TofuHome::new(&tree.path().join("config"));
    let pki = Pki::new(&["127.0.0.1"]);
    let daemon = pki.start_daemon(&tree.root(), &[]);
    let src = tree.src("a.bin");
    let want = random_file(&src, 200_000, 4);
    let ca = pki.ca().display().to_string();
    home.xfer(["send", src.to_str().unwrap(), &daemon.addr(), "--ca", &ca])
        .ok();
    assert_eq!(sha256_file(&tree.root().join("a.bin")), want);
    assert!(
        !home.known_hosts().exists(),
        "a CA-signed daemon was pinned"
    );
    // A CA that signed nothing it presents, and no pin: refused.
    let other = pki.other_ca().display().to_string();
    let line = home
        .xfer(["ls", &daemon.addr(), "--ca", &other])
        .error_line();
    assert!(line.contains("is not a known host"), "{line}");
}

/// Two daemons with certificates of their own and tokens: `xfer copy --accept-new` pins both,
/// and the source, which trusts no CA that could vouch for the destination, reaches it by the
/// pin the client passed; a destination whose certificate changed is refused before the
/// source is asked anything.
#[test]
fn copy_runs_over_tls_pinned_on_both_legs() {
    let (a, b) = (Tree::new(), Tree::new());
    let home = TofuHome::new(&a.path().join("config"));
    let token = |tree: &Tree, t: &str| {
        let path = tree.path().join("token");
        fs::write(&path, t).unwrap();
        path.display().to_string()
    };
    let (src_token, dst_token) = (token(&a, "source-token-1"), token(&b, "dest-token-2"));
    let _src = tofu_daemon(
        "127.0.0.1:0",
        &a.root(),
        &a.path().join("state"),
        &["--token-file", &src_token],
    );
    let mut dst = tofu_daemon(
        "127.0.0.1:0",
        &b.root(),
        &b.path().join("state"),
        &["--token-file", &dst_token],
    );
    let want = random_file(&a.root().join("big.bin"), 3 << 20, 5);
    let (src_addr, dst_addr) = (_src.addr(), dst.addr());
    let from = format!("{src_addr}:big.bin");
    let to = format!("{dst_addr}:copied.bin");
    let copy = |extra: &[&str]| {
        let mut args = vec![
            "copy",
            "--src-token-file",
            &src_token,
            "--dst-token-file",
            &dst_token,
        ];
        args.extend_from_slice(extra);
        args.extend([from.as_str(), to.as_str()]);
        home.xfer(args)
    };
    copy(&["--accept-new"]).ok();
    assert_eq!(sha256_file(&b.root().join("copied.bin")), want);
    let pins = fs::read_to_string(home.known_hosts()).unwrap();
    for addr in [&src_addr, &dst_addr] {
        assert!(pins.contains(&format!("{addr} SHA256:")), "{pins}");
    }

    dst.kill();
    fs::remove_file(b.root().join("copied.bin")).unwrap();
    let _impostor = tofu_daemon(
        &dst_addr,
        &b.root(),
        &b.path().join("other"),
        &["--token-file", &dst_token],
    );
    let line = copy(&["--accept-new"]).error_line();
    assert!(
        line.contains(&format!("certificate of {dst_addr} has CHANGED")),
        "{line}"
    );
    assert!(!b.root().join("copied.bin").exists());
}

#[test]
fn the_fingerprint_command_prints_what_clients_pin() {
    let tree = Tree::new();
    let state = tree.path().join("state");
    let missing = fingerprint(&["--state-dir", state.to_str().unwrap()]).unwrap_err();
    assert!(
        missing.contains("no certificate in") && missing.contains("--tls"),
        "{missing}"
    );
    let daemon = tofu_daemon("127.0.0.1:0", &tree.root(), &state, &[]);
    let printed = fingerprint(&["--state-dir", state.to_str().unwrap()]).unwrap();
    assert!(
        printed.starts_with("SHA256:") && printed.len() == 7 + 64,
        "{printed}"
    );
    assert!(daemon.stderr().contains(&printed), "{}", daemon.stderr());
    use std::os::unix::fs::PermissionsExt;
    for f in ["cert.pem", "key.pem"] {
        let mode = fs::metadata(state.join(f)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{f}");
    }
    // The same identity on the next start.
    drop(daemon);
    let _again = tofu_daemon("127.0.0.1:0", &tree.root(), &state, &[]);
    assert_eq!(
        fingerprint(&["--state-dir", state.to_str().unwrap()]).unwrap(),
        printed
    );
}
