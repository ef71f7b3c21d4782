//! A newcomer's mistakes end fast, in one actionable line: a port where nothing listens (for
//! every command), a host name that does not resolve, a wrong token, a missing local file. The
//! first connection of a command is never retried for a minute; retries belong to a transfer
//! that has started (`faults.rs`).

use std::time::Duration;

use xfer_tests::{closed_port, random_file, run_xfer, Daemon, Tree, XferOutput};

/// Hang guard: far shorter than the `--retry-deadline` the runs are given, so a client that
/// retries a first connection is caught, and far longer than a failing run takes.
const GUARD: Duration = Duration::from_secs(60);
/// Passed to every transfer so that a retrying first connection would outlast [`GUARD`].
const PATIENT: &str = "3600";

fn run(args: &[&str]) -> XferOutput {
    run_xfer(args, &[], GUARD)
}

/// The line names the address and says what to check.
#[track_caller]
fn assert_not_listening(out: &XferOutput, addr: &str) {
    let line = out.error_line();
    assert!(
        line.contains(&format!("cannot connect to {addr}: connection refused")),
        "{line}"
    );
    assert!(
        line.contains("is xferd running? is the port open?"),
        "{line}"
    );
}

#[test]
fn every_command_to_a_port_where_nothing_listens_fails_at_once() {
    let tree = Tree::new();
    let src = tree.src("a.bin");
    random_file(&src, 1000, 1);
    let addr = format!("127.0.0.1:{}", closed_port());
    let src = src.to_str().unwrap();
    let dir = tree.src("");
    let dir = dir.to_str().unwrap();
    let out = tree.out("a.bin");
    let out = out.to_str().unwrap();
    let dst = format!("127.0.0.1:{}:b.bin", closed_port());
    let from = format!("{addr}:a.bin");
    let runs: [&[&str]; 6] = [
        &["send", src, &addr, "--retry-deadline", PATIENT],
        &["send", "-r", dir, &addr, "--retry-deadline", PATIENT],
        &[
            "recv",
            "a.bin",
            &addr,
            "-o",
            out,
            "--retry-deadline",
            PATIENT,
        ],
        &[
            "recv",
            "-r",
            "dir",
            &addr,
            "-o",
            out,
            "--retry-deadline",
            PATIENT,
        ],
        &["ls", &addr],
        &["copy", &from, &dst],
    ];
    for args in runs {
        assert_not_listening(&run(args), &addr);
    }
    assert!(!tree.out("a.bin").exists());
}

#[test]
fn a_host_name_that_does_not_resolve_fails_with_one_line() {
    let tree = Tree::new();
    let src = tree.src("a.bin");
    random_file(&src, 1000, 2);
    let out = run(&["send", src.to_str().unwrap(), "no-such-host.invalid:9"]);
    let line = out.error_line();
    assert!(
        line.contains("cannot resolve no-such-host.invalid") && line.contains("check the host"),
        "{line}"
    );
}

#[test]
fn a_wrong_token_and_a_missing_token_say_how_to_give_the_right_one() {
    let tree = Tree::new();
    let token = tree.path().join("token");
    std::fs::write(&token, "right-token\n").unwrap();
    let daemon = Daemon::start(&tree.root(), &["--token-file", token.to_str().unwrap()]);
    let wrong = tree.path().join("wrong");
    std::fs::write(&wrong, "wrong-token\n").unwrap();
    let src = tree.src("a.bin");
    random_file(&src, 1000, 3);
    let addr = daemon.addr();
    let src = src.to_str().unwrap();
    let wrong = wrong.to_str().unwrap();
    for args in [
        &[
            "send",
            src,
            &addr,
            "--token-file",
            wrong,
            "--retry-deadline",
            PATIENT,
        ][..],
        &["ls", &addr, "--token-file", wrong],
        &["ls", &addr],
    ] {
        let line = run(args).error_line();
        assert!(line.contains("authentication failed"), "{line}");
        assert!(line.contains("XFER_TOKEN or --token-file"), "{line}");
    }
    assert!(!daemon.root().join("a.bin").exists());
}

#[test]
fn a_misspelt_local_file_or_a_file_given_to_r_fails_before_connecting() {
    let tree = Tree::new();
    let addr = format!("127.0.0.1:{}", closed_port());
    let missing = tree.src("typo.bin");
    let missing = missing.to_str().unwrap();
    for args in [
        &["send", missing, &addr][..],
        &["send", "-r", missing, &addr],
    ] {
        let line = run(args).error_line();
        assert!(line.contains("typo.bin"), "{line}");
        assert!(!line.contains("connect"), "{line}");
    }
    let file = tree.src("file.bin");
    random_file(&file, 10, 4);
    let line = run(&["send", "-r", file.to_str().unwrap(), &addr]).error_line();
    assert!(line.contains("is not a directory: drop -r"), "{line}");
}

/// A listener that accepts connections and never says a word: another service on the port, or
/// a hung daemon. Its connections are held open until the test process ends.
fn silent_listener() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming() {
            held.extend(conn.ok());
        }
    });
    addr
}

#[test]
fn every_command_to_a_daemon_that_never_answers_ends_naming_it() {
    let tree = Tree::new();
    let src = tree.src("a.bin");
    random_file(&src, 1000, 5);
    let addr = silent_listener();
    let dst = format!("127.0.0.1:{}:b.bin", closed_port());
    let from = format!("{addr}:a.bin");
    let [src, dir, out] =
        [src, tree.src(""), tree.out("a.bin")].map(|p| p.to_str().unwrap().to_owned());
    let runs: Vec<Vec<&str>> = vec![
        vec!["send", &src, &addr, "--retry-deadline", PATIENT],
        // The TLS handshake: the request for it is never answered.
        vec!["send", &src, &addr, "--tls", "--retry-deadline", PATIENT],
        vec!["send", "-r", &dir, &addr, "--retry-deadline", PATIENT],
        vec![
            "recv",
            "a.bin",
            &addr,
            "-o",
            &out,
            "--retry-deadline",
            PATIENT,
        ],
        vec![
            "recv",
            "-r",
            "d",
            &addr,
            "-o",
            &out,
            "--retry-deadline",
            PATIENT,
        ],
        vec!["ls", &addr],
        vec!["copy", &from, &dst],
    ];
    // Side by side: each waits out the handshake's timeout.
    let runs: Vec<_> = runs
        .into_iter()
        .map(|args| {
            let args: Vec<String> = args.into_iter().map(str::to_owned).collect();
            std::thread::spawn(move || run(&args.iter().map(String::as_str).collect::<Vec<_>>()))
        })
        .collect();
    for run in runs {
        let line = run.join().unwrap().error_line();
        assert!(
            line.contains(&format!("cannot connect to {addr}")),
            "{line}"
        );
        assert!(line.contains("no handshake answer"), "{line}");
    }
    assert!(!tree.out("a.bin").exists());
}

#[test]
fn a_misspelt_remote_name_is_named_in_one_line() {
    let tree = Tree::new();
    let daemon = Daemon::start(&tree.root(), &[]);
    let addr = daemon.addr();
    std::fs::create_dir_all(tree.path().join("other")).unwrap();
    let other = Daemon::start(&tree.path().join("other"), &[]);
    let out = tree.out("x");
    let out = out.to_str().unwrap();
    let from = format!("{addr}:typo.bin");
    let to = format!("{}:b.bin", other.addr());
    for args in [
        &[
            "recv",
            "typo.bin",
            &addr,
            "-o",
            out,
            "--retry-deadline",
            PATIENT,
        ][..],
        &[
            "recv",
            "-r",
            "typo.bin",
            &addr,
            "-o",
            out,
            "--retry-deadline",
            PATIENT,
        ],
        &["ls", &format!("{addr}:typo.bin")],
        &["copy", &from, &to],
    ] {
        let line = run(args).error_line();
        assert!(line.contains("typo.bin"), "{line}");
    }
    assert!(!tree.out("x").exists());
}

#[test]
fn a_wrong_token_or_a_refused_grant_fails_every_command_in_one_line() {
    let tree = Tree::new();
    let token = tree.path().join("token");
    std::fs::write(&token, "right-token\n").unwrap();
    let token = token.to_str().unwrap();
    let daemon = Daemon::start(&tree.root(), &["--token-file", token]);
    std::fs::create_dir_all(tree.path().join("other")).unwrap();
    let other = Daemon::start(&tree.path().join("other"), &["--token-file", token]);
    let wrong = tree.path().join("wrong");
    std::fs::write(&wrong, "wrong-token\n").unwrap();
    let wrong = wrong.to_str().unwrap();
    random_file(&tree.src("a.bin"), 1000, 6);
    random_file(&daemon.root().join("here.bin"), 1000, 7);
    let addr = daemon.addr();
    let [dir, out] = [tree.src(""), tree.out("o")].map(|p| p.to_str().unwrap().to_owned());
    let from = format!("{addr}:here.bin");
    let to = format!("{}:b.bin", other.addr());
    let t = "--token-file";
    for args in [
        &[
            "send",
            "-r",
            &dir,
            &addr,
            t,
            wrong,
            "--retry-deadline",
            PATIENT,
        ][..],
        &[
            "recv",
            "here.bin",
            &addr,
            "-o",
            &out,
            t,
            wrong,
            "--retry-deadline",
            PATIENT,
        ],
        &[
            "recv",
            "-r",
            "d",
            &addr,
            "-o",
            &out,
            t,
            wrong,
            "--retry-deadline",
            PATIENT,
        ],
        &[
            "copy",
            &from,
            &to,
            "--src-token-file",
            wrong,
            "--dst-token-file",
            token,
        ],
    ] {
        let line = run(args).error_line();
        assert!(line.contains("authentication failed"), "{line}");
    }
    // The destination refuses the grant the source was given: made from the wrong token.
    let line = run(&[
        "copy",
        &from,
        &to,
        "--src-token-file",
        token,
        "--dst-token-file",
        wrong,
    ])
    .error_line();
    assert!(line.contains("authentication failed"), "{line}");
    assert!(line.contains(&other.addr()), "{line}");
    assert!(!other.root().join("b.bin").exists());
}
