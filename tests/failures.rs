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
