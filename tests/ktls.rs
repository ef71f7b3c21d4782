//! Kernel TLS through the real binaries: where the kernel offers the `tls` ULP, a TLS transfer
//! runs on it in both directions; where it does not, the daemon says once why, and rustls
//! carries the same transfer. Which of the two a machine can check is decided by its kernel:
//! the other test says it was skipped, and why.

use std::fs;

use xfer_tests::tofu::{tofu_daemon, TofuHome};
use xfer_tests::{random_file, sha256_file, Daemon, Tree};

/// What the daemon logs when a connection stays with rustls.
const FALLBACK: &str = "kernel TLS not used";

/// The ULPs the kernel has loaded (the `tls` module may also load on first use).
fn available_ulps() -> String {
    fs::read_to_string("/proc/sys/net/ipv4/tcp_available_ulp")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|e| format!("unreadable: {e}"))
}

fn kernel_offers_tls() -> bool {
    available_ulps().split_whitespace().any(|u| u == "tls")
}

/// Uploads and downloads a file of several chunks over pinned TLS on two connections, checks
/// both copies, and returns the daemon for its log.
fn tls_round_trip(tree: &Tree) -> Daemon {
    let home = TofuHome::new(&tree.path().join("config"));
    let daemon = tofu_daemon("127.0.0.1:0", &tree.root(), &tree.path().join("state"), &[]);
    let src = tree.src("a.bin");
    let want = random_file(&src, 20_000_000, 16);
    let addr = daemon.addr();
    let chunked = ["-c", "2", "--chunk-size", "1M"];
    let mut send = vec!["send", src.to_str().unwrap(), &addr, "--accept-new"];
    send.extend(chunked);
    home.xfer(send).ok();
    assert_eq!(sha256_file(&tree.root().join("a.bin")), want);
    let out = tree.out("a.bin");
    let mut recv = vec!["recv", "a.bin", &addr, "-o", out.to_str().unwrap(), "--tls"];
    recv.extend(chunked);
    home.xfer(recv).ok();
    assert_eq!(sha256_file(&out), want);
    daemon
}

#[test]
fn without_kernel_tls_rustls_carries_the_transfer_and_the_daemon_says_why() {
    if kernel_offers_tls() {
        eprintln!(
            "skipped: this kernel offers TLS (tcp_available_ulp: {}); the fallback is covered \
             by xfer-net's unit tests here",
            available_ulps()
        );
        return;
    }
    let tree = Tree::new();
    let daemon = tls_round_trip(&tree);
    let log = daemon.stderr();
    let said: Vec<&str> = log.lines().filter(|l| l.contains(FALLBACK)).collect();
    // Once, at info, with the reason; later connections only at debug.
    assert_eq!(said.len(), 1, "{log}");
    assert!(said[0].contains("INFO"), "{}", said[0]);
    assert!(said[0].contains("offers no TLS"), "{}", said[0]);
    assert!(said[0].contains("TCP_ULP"), "{}", said[0]);
}

#[test]
fn with_kernel_tls_the_transfer_runs_on_it() {
    if !kernel_offers_tls() {
        eprintln!(
            "skipped: this kernel offers no TLS ULP (tcp_available_ulp: {}); kernel TLS is \
             checked where CONFIG_TLS is on",
            available_ulps()
        );
        return;
    }
    let tree = Tree::new();
    let daemon = tls_round_trip(&tree);
    let log = daemon.stderr();
    assert!(!log.contains(FALLBACK), "{log}");
}
