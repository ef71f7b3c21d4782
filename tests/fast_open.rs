//! TCP Fast Open through the real binaries, in a network namespace of the test's own whose
//! system allows it for servers (`net.ipv4.tcp_fastopen = 3`, as the package's sysctl file
//! sets it): once a client has connected, its later connections send their first flight with
//! the SYN (the namespace's own counters say how many), and a server that stops taking it costs
//! nothing but the round trip. The bytes are whole either way, and a daemon gone is still a
//! refused connect, though the client learns it only from its first write.

use std::fs::{self, File};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use xfer_tests::{enter_net, random_file, run_xfer_in_net, sha256_file, Daemon, Tree, XferOutput};

/// Hang guard for one command of a few MiB (a guard, not a timing claim).
const GUARD: Duration = Duration::from_secs(120);

/// A daemon (with the tree's token where `with_token`) in a network namespace of its own that
/// allows Fast Open for servers, and that namespace; `None` without root.
fn fast_open_daemon(tree: &Tree, with_token: bool) -> Option<(Daemon, File)> {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: a network namespace of the test's own needs root");
        return None;
    }
    let token = token(tree).display().to_string();
    let args: &[&str] = match with_token {
        true => &["--token-file", &token],
        false => &[],
    };
    if with_token {
        fs::write(&token, "fast-open-token\n").unwrap();
    }
    let wrapper = [
        "unshare",
        "--net",
        "sh",
        "-c",
        "ip link set lo up && echo 3 > /proc/sys/net/ipv4/tcp_fastopen && exec \"$0\" \"$@\"",
    ];
    let daemon = Daemon::start_under(&wrapper, "127.0.0.1:0", &tree.root(), args);
    let netns = File::open(format!("/proc/{}/ns/net", daemon.pid())).expect("its namespace");
    Some((daemon, netns))
}

fn token(tree: &Tree) -> std::path::PathBuf {
    tree.path().join("token")
}

/// Runs `sh -c script` in the network namespace `netns`.
fn in_net(netns: &File, script: &str) {
    let mut command = Command::new("sh");
    command.args(["-c", script]);
    enter_net(&mut command, netns);
    let status = command.status().expect("sh");
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

/// `xfer send` of `src` as `name` to `addr`, run in `netns`, with the tree's token if it has one.
fn send(
    netns: &File,
    tree: &Tree,
    addr: &str,
    src: &Path,
    name: &str,
    extra: &[&str],
) -> XferOutput {
    let (token, src) = (token(tree).display().to_string(), src.display().to_string());
    let with_token: &[&str] = match Path::new(&token).exists() {
        true => &["--token-file", &token],
        false => &[],
    };
    let args = [
        &["send"][..],
        with_token,
        extra,
        &[&src, addr, "--as", name],
    ]
    .concat();
    run_xfer_in_net(netns, args, GUARD)
}

#[test]
fn a_client_that_connected_before_sends_its_first_flight_with_the_syn() {
    let tree = Tree::new();
    let Some((daemon, netns)) = fast_open_daemon(&tree, true) else {
        return;
    };
    let (pid, addr) = (daemon.pid(), daemon.addr());

    // The first connection asks for the cookie; the file's other connections already use it.
    let file = tree.src("big.bin");
    let want = random_file(&file, 24 << 20, 1);
    send(&netns, &tree, &addr, &file, "big.bin", &["-c", "4"]).ok();
    assert_eq!(sha256_file(&tree.root().join("big.bin")), want);
    let dir = tree.src("t");
    fs::create_dir_all(&dir).unwrap();
    let sums: Vec<String> = (0..40)
        .map(|i| random_file(&dir.join(format!("f{i}")), 20_000 + i * 997, i))
        .collect();
    send(&netns, &tree, &addr, &dir, "t", &["-r"]).ok();
    for (i, sum) in sums.iter().enumerate() {
        assert_eq!(&sha256_file(&tree.root().join(format!("t/f{i}"))), sum);
    }
    let taken = tcp_counter(pid, "TCPFastOpenPassive");
    assert!(taken >= 1, "no connection came with data in its SYN");
    assert_eq!(tcp_counter(pid, "TCPFastOpenActive"), taken);

    // The server side turned off: the client still holds the cookie and sends data with its
    // SYNs, which the daemon's kernel leaves for after the handshake.
    in_net(&netns, "echo 1 > /proc/sys/net/ipv4/tcp_fastopen");
    let again = tree.src("again.bin");
    let want = random_file(&again, 3 << 20, 2);
    send(&netns, &tree, &addr, &again, "again.bin", &[]).ok();
    assert_eq!(sha256_file(&tree.root().join("again.bin")), want);
    assert_eq!(tcp_counter(pid, "TCPFastOpenPassive"), taken);
}

/// A client holding the cookie of a daemon that has gone away connects at once and writes its
/// `Hello` with the SYN, which is refused: still one line saying the connect was refused. (No
/// token: a client that sent an early proof would connect again without it, the usual way.)
#[test]
fn a_daemon_gone_is_a_refused_connect_with_fast_open_too() {
    let tree = Tree::new();
    let Some((mut daemon, netns)) = fast_open_daemon(&tree, false) else {
        return;
    };
    let (pid, addr) = (daemon.pid(), daemon.addr());
    let file = tree.src("f.bin");
    random_file(&file, 1 << 20, 3);
    send(&netns, &tree, &addr, &file, "a", &[]).ok();
    send(&netns, &tree, &addr, &file, "b", &[]).ok();
    assert!(tcp_counter(pid, "TCPFastOpenActive") >= 1);
    daemon.kill();
    let line = send(&netns, &tree, &addr, &file, "c", &[]).error_line();
    assert!(
        line.starts_with(&format!(
            "xfer: cannot connect to {addr}: connection refused"
        )),
        "{line}"
    );
}
