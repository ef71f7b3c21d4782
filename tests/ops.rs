//! Operating the daemon: the Prometheus endpoint scraped over HTTP, `SIGHUP` reloads of the
//! configuration file while a transfer runs (and never for a connection already welcomed), and
//! socket activation (a listener passed the systemd way, `LISTEN_FDS`/`LISTEN_PID`).

use std::fs::{self, File};
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use xfer_proto::{ErrorCode, Frame, CAP_IDLE_TIMEOUT};
use xfer_tests::metrics::{http_get, metrics_port, sample};
use xfer_tests::raw::RawConn;
use xfer_tests::{
    bin, journal_held, journal_path, random_file, round_trip, sha256_file, wait_until, xfer,
    Daemon, Tree, XferRun,
};

#[test]
fn metrics_endpoint_counts_a_round_trip() {
    let tree = Tree::new();
    let daemon = Daemon::start(
        &tree.root(),
        &["--metrics", "127.0.0.1:0", "--chunk-size", "64K"],
    );
    // Bound before the daemon prints its address line, and logged with the port it got.
    let port = metrics_port(&daemon);
    let size = 3 * 1024 * 1024 + 17;
    let src = tree.src("m.bin");
    random_file(&src, size, 9);
    let args = ["-c", "2", "--chunk-size", "64K"];
    round_trip(&daemon, &src, "m.bin", &tree.out("m.bin"), &args);

    let (status, headers, _) = http_get(port, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(
        headers
            .to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{headers}"
    );
    // A download ends (and is counted) when the daemon has seen its last connection close.
    let mut body = String::new();
    wait_until(Duration::from_secs(10), "the download is counted", || {
        body = http_get(port, "/metrics").2;
        sample(
            &body,
            r#"xferd_transfers_completed_total{direction="download"}"#,
        ) == Some(1.0)
            && sample(&body, "xferd_connections_open") == Some(0.0)
    });
    let get = |series: &str| {
        sample(&body, series).unwrap_or_else(|| panic!("no sample {series} in:\n{body}"))
    };
    assert_eq!(get("xferd_bytes_received_total"), size as f64);
    assert!(get("xferd_bytes_sent_total") >= size as f64);
    assert_eq!(
        get(r#"xferd_transfers_completed_total{direction="upload"}"#),
        1.0
    );
    assert_eq!(get(r#"xferd_transfers_active{direction="upload"}"#), 0.0);
    assert_eq!(get(r#"xferd_transfers_active{direction="download"}"#), 0.0);
    assert_eq!(
        get(r#"xferd_transfers_failed_total{direction="upload"}"#),
        0.0
    );
    assert_eq!(get("xferd_crc_errors_total"), 0.0);
    assert_eq!(get("xferd_connections_waiting"), 0.0);
    assert_eq!(get("xferd_streams_max"), 64.0);
    assert!(get("xferd_connections_accepted_total") >= 4.0);
    for family in ["xferd_bytes_received_total", "xferd_resumes_total"] {
        assert!(body.contains(&format!("# TYPE {family} counter")), "{body}");
    }
    assert!(http_get(port, "/nothing").0.starts_with("HTTP/1.1 404"));
    let log = daemon.stderr();
    assert!(log.contains("upload complete"), "{log}");
    assert!(log.contains("download complete"), "{log}");
}

fn write_config(path: &Path, text: &str) {
    fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

fn send_hup(daemon: &Daemon) {
    let pid = rustix::process::Pid::from_raw(daemon.pid() as i32).expect("a pid");
    rustix::process::kill_process(pid, rustix::process::Signal::HUP).expect("SIGHUP");
}

/// Waits until the daemon has logged `what` `n` times.
fn wait_for_log(daemon: &Daemon, what: &str, n: usize) {
    wait_until(Duration::from_secs(20), what, || {
        daemon.stderr().matches(what).count() >= n
    });
}

#[test]
fn sighup_switches_the_token_without_dropping_a_running_transfer() {
    let tree = Tree::new();
    let (token_a, token_b) = (tree.path().join("a.token"), tree.path().join("b.token"));
    fs::write(&token_a, "token-A-0123456789\n").unwrap();
    fs::write(&token_b, "token-B-9876543210\n").unwrap();
    let config = tree.path().join("xferd.toml");
    write_config(&config, "token_file = \"a.token\"\n");
    let config_arg = config.to_str().unwrap();
    let daemon = Daemon::start(
        &tree.root(),
        &["--config", config_arg, "--chunk-size", "256K"],
    );
    let addr = daemon.addr();
    let (a, b) = (token_a.to_str().unwrap(), token_b.to_str().unwrap());

    // About four seconds at 4 MiB/s: long enough to reload in the middle of it.
    let src = tree.src("slow.bin");
    let want = random_file(&src, 16 * 1024 * 1024, 5);
    let args = [
        "-c",
        "2",
        "--chunk-size",
        "256K",
        "--bwlimit",
        "4M",
        "--token-file",
        a,
    ];
    let mut running = XferRun::send(&src, &addr, "slow.bin", &args);
    let journal = journal_path(&tree.root().join("slow.bin"));
    wait_until(Duration::from_secs(30), "the upload has started", || {
        journal_held(&journal) > 0
    });

    write_config(&config, "token_file = \"b.token\"\n");
    send_hup(&daemon);
    wait_for_log(&daemon, "configuration reloaded", 1);
    assert!(
        running.is_running(),
        "the upload should still be running across the reload"
    );
    let log = daemon.stderr();
    assert!(log.contains("token: changed"), "{log}");
    assert!(
        !log.contains("token-A") && !log.contains("token-B"),
        "{log}"
    );

    xfer(["ls", &addr, "--token-file", b]).ok();
    let refused = xfer(["ls", &addr, "--token-file", a]);
    assert!(
        refused.error_line().contains("authentication failed"),
        "{}",
        refused.stderr
    );

    running.wait_ok();
    assert_eq!(sha256_file(&tree.root().join("slow.bin")), want);
    let log = daemon.stderr();
    assert!(!log.contains("interrupted"), "{log}");
}

#[test]
fn sighup_applies_limits_and_ignores_a_broken_file() {
    let tree = Tree::new();
    let config = tree.path().join("xferd.toml");
    write_config(&config, "max_streams = 4\n");
    let config_arg = config.to_str().unwrap();
    let daemon = Daemon::start(&tree.root(), &["--config", config_arg]);
    let addr = daemon.addr();
    let src = tree.src("f.bin");
    random_file(&src, 100_000, 1);

    // An unknown key: logged, and the running configuration stays.
    write_config(&config, "max_streams = 4\nread_onyl = true\n");
    send_hup(&daemon);
    wait_for_log(&daemon, "reload failed", 1);
    let log = daemon.stderr();
    assert!(
        log.contains("read_onyl"),
        "the log should name the bad key:\n{log}"
    );
    XferRun::send(&src, &addr, "f.bin", &[]).wait_ok();

    write_config(
        &config,
        "max_streams = 2\nread_only = true\nidle_timeout = 60\n",
    );
    send_hup(&daemon);
    wait_for_log(&daemon, "configuration reloaded", 1);
    let log = daemon.stderr();
    for change in [
        "max_streams: 4 -> 2",
        "read_only: false -> true",
        "idle_timeout: 300s -> 60s",
    ] {
        assert!(log.contains(change), "no {change:?} in:\n{log}");
    }
    let refused = XferRun::send(&src, &addr, "g.bin", &[]).wait();
    assert!(
        refused.error_line().contains("read-only"),
        "{}",
        refused.stderr
    );
    let out = tree.out("f.bin");
    XferRun::recv("f.bin", &addr, &out, &["-c", "4"]).wait_ok();
    assert_eq!(sha256_file(&out), sha256_file(&src));
}

/// An `xferd` started the way systemd starts a socket-activated service.
struct Activated {
    child: Child,
    stderr: std::path::PathBuf,
    _logs: tempfile::TempDir,
}

impl Drop for Activated {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = fs::read_to_string(&self.stderr).unwrap_or_default();
            eprintln!("--- activated xferd stderr ---\n{log}");
        }
    }
}

#[test]
fn socket_activation_serves_the_passed_listener() {
    let tree = Tree::new();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let stderr = logs.path().join("stderr");
    // The listener arrives as stdin; the shell moves it to fd 3 and execs xferd under its own
    // PID, which is what LISTEN_PID must name. The --listen address is one this machine cannot
    // bind: it must be ignored in favour of the passed socket.
    let child = Command::new("/bin/sh")
        .arg("-c")
        .arg(r#"export LISTEN_PID=$$ LISTEN_FDS=1; exec "$0" "$@" 3<&0 0</dev/null"#)
        .arg(bin("xferd"))
        .args(["--listen", "192.0.2.1:1", "--root"])
        .arg(tree.root())
        .stdin(Stdio::from(std::os::fd::OwnedFd::from(listener)))
        .stdout(Stdio::piped())
        .stderr(File::create(&stderr).unwrap())
        .spawn()
        .expect("spawn sh");
    let mut daemon = Activated {
        child,
        stderr,
        _logs: logs,
    };
    let stdout = daemon.child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), format!("xferd listening on {addr}"));

    let src = tree.src("s.bin");
    let want = random_file(&src, 1_000_000, 3);
    let host = addr.to_string();
    XferRun::send(&src, &host, "s.bin", &["-c", "3"]).wait_ok();
    let out = tree.out("s.bin");
    XferRun::recv("s.bin", &host, &out, &["-c", "3"]).wait_ok();
    assert_eq!(sha256_file(&out), want);
    let log = fs::read_to_string(&daemon.stderr).unwrap();
    assert!(
        log.contains("serving the socket passed by systemd"),
        "{log}"
    );
}

#[test]
fn check_config_prints_effective_settings_and_names_bad_keys() {
    let tree = Tree::new();
    let token = tree.path().join("token");
    fs::write(&token, "never-print-me\n").unwrap();
    let config = tree.path().join("xferd.toml");
    write_config(
        &config,
        "listen = \"0.0.0.0:9000\"\nroot = \"root\"\ntoken_file = \"token\"\nmax_streams = 8\n",
    );
    let run = |args: &[&str]| {
        Command::new(bin("xferd"))
            .args(args)
            .output()
            .expect("run xferd")
    };
    let config_arg = config.to_str().unwrap();
    let ok = run(&["--config", config_arg, "--check-config", "--window", "4"]);
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(
        ok.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(stdout.contains("max_streams = 8"), "{stdout}");
    assert!(
        stdout.contains("window = 4"),
        "the flag overrides: {stdout}"
    );
    assert!(stdout.contains("listen = \"0.0.0.0:9000\""), "{stdout}");
    assert!(!stdout.contains("never-print-me"), "{stdout}");

    write_config(&config, "max_streams = 8\nchunksize = \"4M\"\n");
    let bad = run(&["--config", config_arg, "--check-config"]);
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("chunksize"), "{stderr}");

    // copy_ca is checked like every file the settings name: readable, and holding a CA.
    let pki = xfer_tests::Pki::new(&["127.0.0.1"]);
    write_config(&config, &format!("copy_ca = {:?}\n", pki.ca().display()));
    let ok = run(&["--config", config_arg, "--check-config"]);
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(ok.status.success(), "{stdout}");
    assert!(stdout.contains("copy_ca = "), "{stdout}");
    write_config(&config, "copy_ca = \"no-such-ca.pem\"\n");
    let bad = run(&["--config", config_arg, "--check-config"]);
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains("copy_ca") && stderr.contains("no-such-ca.pem"),
        "{stderr}"
    );
}

/// The idle timeout a daemon tells a client behind its `Welcome` is the one that connection
/// keeps: a reload shortening it applies to connections welcomed after it, which are told the
/// new value and closed by it, never to one welcomed before, which outlives them idle.
#[test]
fn sighup_never_changes_the_idle_timeout_told_to_a_welcomed_connection() {
    let tree = Tree::new();
    let config = tree.path().join("xferd.toml");
    write_config(&config, "idle_timeout = 300\n");
    let daemon = Daemon::start(&tree.root(), &["--config", config.to_str().unwrap()]);
    let told = |conn: &mut RawConn| {
        let welcome = conn.handshake_offering(None, CAP_IDLE_TIMEOUT);
        assert_ne!(welcome.capabilities & CAP_IDLE_TIMEOUT, 0, "{welcome:?}");
        match conn.recv() {
            Some(Frame::IdleTimeout(told)) => told.millis,
            other => panic!("want IdleTimeout behind the Welcome, got {other:?}"),
        }
    };
    let mut before = RawConn::connect(daemon.socket_addr());
    assert_eq!(told(&mut before), 300_000);

    write_config(&config, "idle_timeout = 1\n");
    send_hup(&daemon);
    wait_for_log(&daemon, "configuration reloaded", 1);
    let mut after = RawConn::connect(daemon.socket_addr());
    assert_eq!(told(&mut after), 1_000);
    // Closed once idle for the second it was told; the one welcomed before has idled longer.
    after.expect_fatal(ErrorCode::Protocol, "a second without a frame");
    before.assert_usable();
}
