//! TCP Fast Open through the real binaries, in a network namespace of the test's own whose
//! system allows it for servers (`net.ipv4.tcp_fastopen = 3`, as the package's sysctl file
//! sets it): once a client has connected, its later connections send their first flight with
//! the SYN (the namespace's own counters say how many), and a server that stops taking it costs
//! nothing but the round trip. The bytes are whole either way.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use xfer_tests::{random_file, run_xfer_in_net_of, sha256_file, Daemon, Tree};

/// Hang guard for one command of a few MiB (a guard, not a timing claim).
const GUARD: Duration = Duration::from_secs(120);

/// Runs `script` with `sh -c` in the network namespace of the process `pid`.
fn in_net_of(pid: u32, script: &str) {
    let status = Command::new("nsenter")
        .arg(format!("--net=/proc/{pid}/ns/net"))
        .args(["sh", "-c", script])
        .status()
        .expect("nsenter");
    assert!(status.success(), "{script}: {status}");
}

/// `TcpExt` counter `name` of the network namespace of the process `pid`.
fn tcp_counter(pid: u32, name: &str) -> u64 {
    let netstat = fs::read_to_string(format!("/proc/{pid}/net/netstat")).expect("netstat");
    let mut rows = netstat.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (rows.next().expect("names"), rows.next().expect("values"));
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == name)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {netstat}"))
}

/// `xfer send` of `src` as `name`, run in the daemon's namespace, with the token in `token`.
fn send(daemon: &Daemon, token: &Path, src: &Path, name: &str, extra: &[&str]) {
    let (token, src, addr) = (
        token.display().to_string(),
        src.display().to_string(),
        daemon.addr(),
    );
    let args = [
        &["send", "--token-file", &token][..],
        extra,
        &[&src, &addr, "--as", name],
    ]
    .concat();
    run_xfer_in_net_of(daemon.pid(), args, GUARD).ok();
}

#[test]
fn a_client_that_connected_before_sends_its_first_flight_with_the_syn() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: a network namespace of the test's own needs root");
        return;
    }
    let tree = Tree::new();
    let token = tree.path().join("token");
    fs::write(&token, "fast-open-token\n").unwrap();
    let wrapper = [
        "unshare",
        "--net",
        "sh",
        "-c",
        "ip link set lo up && echo 3 > /proc/sys/net/ipv4/tcp_fastopen && exec \"$0\" \"$@\"",
    ];
    let token_arg = token.display().to_string();
    let daemon = Daemon::start_under(
        &wrapper,
        "127.0.0.1:0",
        &tree.root(),
        &["--token-file", &token_arg],
    );
    let pid = daemon.pid();

    // The first connection asks for the cookie; the file's other connections already use it.
    let file = tree.src("big.bin");
    let want = random_file(&file, 24 << 20, 1);
    send(&daemon, &token, &file, "big.bin", &["-c", "4"]);
    assert_eq!(sha256_file(&tree.root().join("big.bin")), want);
    let dir = tree.src("t");
    fs::create_dir_all(&dir).unwrap();
    let sums: Vec<String> = (0..40)
        .map(|i| random_file(&dir.join(format!("f{i}")), 20_000 + i * 997, i))
        .collect();
    send(&daemon, &token, &dir, "t", &["-r"]);
    for (i, sum) in sums.iter().enumerate() {
        assert_eq!(&sha256_file(&tree.root().join(format!("t/f{i}"))), sum);
    }
    let taken = tcp_counter(pid, "TCPFastOpenPassive");
    assert!(taken >= 1, "no connection came with data in its SYN");
    assert_eq!(tcp_counter(pid, "TCPFastOpenActive"), taken);

    // The server side turned off: the client still holds the cookie and sends data with its
    // SYNs, which the daemon's kernel leaves for after the handshake.
    in_net_of(pid, "echo 1 > /proc/sys/net/ipv4/tcp_fastopen");
    let again = tree.src("again.bin");
    let want = random_file(&again, 3 << 20, 2);
    send(&daemon, &token, &again, "again.bin", &[]);
    assert_eq!(sha256_file(&tree.root().join("again.bin")), want);
    assert_eq!(tcp_counter(pid, "TCPFastOpenPassive"), taken);
}
