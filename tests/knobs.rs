//! Tuning knobs end to end: `--congestion`, `--sndbuf` and `--rcvbuf` on both programs (an
//! algorithm the kernel lacks fails at start, in one line), and the number of connections
//! (`-c N` exactly, or a pool that grows while per-connection throughput is the limit).

use std::process::Command;

use xfer_tests::{bin, random_file, sha256_file, xfer, Daemon, Tree, XferRun};

#[test]
fn congestion_and_buffers_apply_and_are_reported() {
    let tree = Tree::new();
    let daemon = Daemon::start(
        &tree.root(),
        &["--congestion", "reno", "--sndbuf", "1M", "--rcvbuf", "1M"],
    );
    let src = tree.src("cc.bin");
    let want = random_file(&src, 3 << 20, 1);
    // reno is built into every Linux kernel; the buffers may be clamped, never refused.
    let knobs = [
        "--congestion",
        "reno",
        "--sndbuf",
        "4M",
        "--rcvbuf",
        "4M",
        "--json",
    ];
    let sent = XferRun::send(&src, &daemon.addr(), "cc.bin", &knobs).wait_ok();
    assert_eq!(sent.json()["congestion"], "reno", "{}", sent.stdout);
    assert_eq!(sha256_file(&daemon.root().join("cc.bin")), want);
    let out = tree.out("cc.bin");
    let got = XferRun::recv("cc.bin", &daemon.addr(), &out, &knobs).wait_ok();
    assert_eq!(got.json()["congestion"], "reno", "{}", got.stdout);
    assert_eq!(sha256_file(&out), want);
}

#[test]
fn an_unknown_congestion_control_is_a_one_line_error() {
    let tree = Tree::new();
    let daemon = Daemon::start(&tree.root(), &[]);
    let src = tree.src("x.bin");
    random_file(&src, 1000, 2);
    let run = XferRun::send(&src, &daemon.addr(), "x.bin", &["--congestion", "nosuchcc"]).wait();
    let line = run.error_line();
    assert!(
        line.starts_with(
            "xfer: congestion control \"nosuchcc\" is not available here (available: "
        ),
        "{line}"
    );
    assert!(line.contains("reno"), "{line}");
    assert!(!daemon.root().join("x.bin").exists());
    let bad = xfer([
        "send",
        "--sndbuf",
        "0",
        src.to_str().unwrap(),
        &daemon.addr(),
    ]);
    assert!(bad.error_line().contains("--sndbuf"), "{}", bad.stderr);
}

#[test]
fn xferd_refuses_an_unknown_congestion_control_at_start() {
    let tree = Tree::new();
    let run = |args: &[&str]| {
        let out = Command::new(bin("xferd"))
            .args(["--listen", "127.0.0.1:0", "--root"])
            .arg(tree.root())
            .args(args)
            .output()
            .expect("run xferd");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status, stdout, stderr)
    };
    for args in [
        &["--congestion", "nosuchcc"][..],
        &["--congestion", "nosuchcc", "--check-config"],
    ] {
        let (status, stdout, stderr) = run(args);
        assert!(!status.success(), "{args:?}: {stdout}{stderr}");
        assert!(!stdout.contains("listening"), "{stdout}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{stderr}");
        assert!(
            lines[0].starts_with("xferd: congestion control \"nosuchcc\" is not available here"),
            "{stderr}"
        );
    }
    let (status, stdout, stderr) =
        run(&["--congestion", "reno", "--sndbuf", "2M", "--check-config"]);
    assert!(status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("congestion = \"reno\""), "{stdout}");
    assert!(stdout.contains("sndbuf = \"2M\""), "{stdout}");
}
