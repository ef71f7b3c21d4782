//! Runs of the real `xfer` client: [`XferRun`] in the background, [`xfer`] and [`run_xfer`] to
//! the end, [`XferOutput`] with the assertions of the one-line error contract.

use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::{bin, sha256_file, tail, wait_bounded, Daemon};

/// Longest an `xfer` run may take before it is killed and the test fails (a hang guard only).
const RUN_DEADLINE: Duration = Duration::from_secs(300);

/// How an `xfer` run ended.
#[derive(Debug)]
pub struct XferOutput {
    /// The command line, for messages.
    pub cmd: String,
    /// Exit status.
    pub status: ExitStatus,
    /// Everything on stdout.
    pub stdout: String,
    /// Everything on stderr.
    pub stderr: String,
}

impl XferOutput {
    /// Asserts exit status 0 and returns `self`.
    #[track_caller]
    pub fn ok(self) -> Self {
        assert!(
            self.status.success(),
            "`{}` failed ({}); stdout:\n{}\nstderr:\n{}",
            self.cmd,
            self.status,
            self.stdout,
            self.stderr
        );
        self
    }

    /// Asserts the failure contract: exit status 1 and exactly one stderr line, starting with
    /// `xfer: `. Returns that line.
    #[track_caller]
    pub fn error_line(&self) -> String {
        assert_eq!(
            self.status.code(),
            Some(1),
            "`{}` should exit 1; stdout:\n{}\nstderr:\n{}",
            self.cmd,
            self.stdout,
            self.stderr
        );
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert!(
            lines.len() == 1 && lines[0].starts_with("xfer: "),
            "`{}` should print exactly one `xfer: ` line on stderr, printed:\n{}",
            self.cmd,
            self.stderr
        );
        lines[0].to_owned()
    }

    /// The `--json` summary: stdout parsed as one JSON object.
    #[track_caller]
    pub fn json(&self) -> serde_json::Value {
        let value: serde_json::Value =
            serde_json::from_str(self.stdout.trim()).unwrap_or_else(|e| {
                panic!(
                    "`{}` stdout is not one JSON object ({e}):\n{}",
                    self.cmd, self.stdout
                )
            });
        assert!(value.is_object(), "`{}` printed {value}", self.cmd);
        value
    }

    /// Asserts the unsigned `fields` of the `--json` summary hold `want`, in that order; the
    /// message names the fields.
    #[track_caller]
    pub fn assert_json_u64s(&self, fields: &[&str], want: &[u64]) {
        let got: Vec<u64> = fields.iter().map(|field| self.json_u64(field)).collect();
        assert_eq!(
            got,
            want,
            "`{}`: ({}) in {}",
            self.cmd,
            fields.join(", "),
            self.json()
        );
    }

    /// An unsigned field of the `--json` summary.
    #[track_caller]
    pub fn json_u64(&self, field: &str) -> u64 {
        let json = self.json();
        json.get(field)
            .and_then(serde_json::Value::as_u64)
            .unwrap_or_else(|| panic!("`{}`: no unsigned field {field:?} in {json}", self.cmd))
    }
}

/// An `xfer` child process. Dropping it kills (SIGKILL) and reaps it.
pub struct XferRun {
    cmd: String,
    child: Child,
    logs: TempDir,
    status: Option<ExitStatus>,
}

impl XferRun {
    /// Starts `xfer ARGS…` with stdout and stderr captured to files.
    pub fn spawn<S: AsRef<OsStr>>(args: impl IntoIterator<Item = S>) -> Self {
        Self::spawn_with_env(args, &[])
    }

    /// Like [`XferRun::spawn`], with extra environment variables (e.g. `XFER_LOG`).
    pub fn spawn_with_env<S: AsRef<OsStr>>(
        args: impl IntoIterator<Item = S>,
        env: &[(&str, &str)],
    ) -> Self {
        Self::spawn_command(args, |command| {
            command.envs(env.iter().copied());
        })
    }

    /// Starts `WRAPPER… xfer ARGS…`, `wrapper` being a command that runs the client as another
    /// user (`setpriv --reuid=nobody …`), or nothing. That user may read the run's logs
    /// directory and write its config directory.
    pub fn spawn_under<S: AsRef<OsStr>>(
        wrapper: &[&str],
        args: impl IntoIterator<Item = S>,
    ) -> Self {
        Self::spawn_wrapped(wrapper, args, |_| ())
    }

    /// Starts `xfer ARGS…` after `configure` has set up its environment.
    fn spawn_command<S: AsRef<OsStr>>(
        args: impl IntoIterator<Item = S>,
        configure: impl FnOnce(&mut Command),
    ) -> Self {
        Self::spawn_wrapped(&[], args, configure)
    }

    fn spawn_wrapped<S: AsRef<OsStr>>(
        wrapper: &[&str],
        args: impl IntoIterator<Item = S>,
        configure: impl FnOnce(&mut Command),
    ) -> Self {
        let args: Vec<OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let cmd = std::iter::once("xfer".to_owned())
            .chain(args.iter().map(|a| a.to_string_lossy().into_owned()))
            .collect::<Vec<_>>()
            .join(" ");
        let logs = tempfile::Builder::new()
            .prefix("xfer-log-")
            .tempdir()
            .expect("tempdir");
        let stdout = File::create(logs.path().join("stdout")).expect("log file");
        let stderr = File::create(logs.path().join("stderr")).expect("log file");
        let mut command = match wrapper.split_first() {
            Some((program, wrapper_args)) => {
                use std::os::unix::fs::PermissionsExt;
                let open = |path: &Path, mode| {
                    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod")
                };
                open(logs.path(), 0o755);
                fs::create_dir(logs.path().join("config")).expect("config dir");
                open(&logs.path().join("config"), 0o777);
                let mut command = Command::new(program);
                command.args(wrapper_args).arg(bin("xfer"));
                command
            }
            None => Command::new(bin("xfer")),
        };
        command
            .args(&args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            // A config directory of each run's own unless the test names one: what the client
            // remembers of daemons (pins, early proofs) never reaches the next test's daemon,
            // which may listen on the same port.
            .env("XDG_CONFIG_HOME", logs.path().join("config"));
        configure(&mut command);
        let child = command.spawn().expect("spawn xfer");
        Self {
            cmd,
            child,
            logs,
            status: None,
        }
    }

    /// Starts `xfer send SRC ADDR --as NAME EXTRA…`.
    pub fn send(src: &Path, addr: &str, name: &str, extra: &[&str]) -> Self {
        let mut args: Vec<OsString> = vec!["send".into(), src.into(), addr.into()];
        args.extend(["--as".into(), name.into()]);
        args.extend(extra.iter().map(OsString::from));
        Self::spawn(args)
    }

    /// Starts `xfer recv NAME ADDR -o OUT EXTRA…`.
    pub fn recv(name: &str, addr: &str, out: &Path, extra: &[&str]) -> Self {
        let mut args: Vec<OsString> = vec!["recv".into(), name.into(), addr.into()];
        args.extend(["-o".into(), out.into()]);
        args.extend(extra.iter().map(OsString::from));
        Self::spawn(args)
    }

    /// What the process wrote to stderr so far.
    pub fn stderr_so_far(&self) -> String {
        String::from_utf8_lossy(&fs::read(self.logs.path().join("stderr")).unwrap_or_default())
            .into_owned()
    }

    /// The command line.
    pub fn cmd(&self) -> &str {
        &self.cmd
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        if self.status.is_some() {
            return false;
        }
        self.status = self.child.try_wait().expect("try_wait");
        self.status.is_none()
    }

    /// SIGKILL by PID, then reap.
    pub fn kill(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            self.status = Some(self.child.wait().expect("wait xfer"));
        }
    }

    /// Waits for the exit (killing the process and panicking after a generous hang guard).
    pub fn wait(self) -> XferOutput {
        self.wait_within(RUN_DEADLINE)
    }

    /// Waits at most `guard` for the exit: a hang guard, past which the client is killed and
    /// the test fails.
    pub fn wait_within(mut self, guard: Duration) -> XferOutput {
        if self.status.is_none() {
            self.status = wait_bounded(&mut self.child, guard);
        }
        let Some(status) = self.status else {
            panic!(
                "`{}` still running after {guard:?} (a hang); killed. stderr:\n{}",
                self.cmd,
                tail(&self.logs.path().join("stderr"), 8 * 1024)
            );
        };
        let read = |f: &str| {
            String::from_utf8_lossy(&fs::read(self.logs.path().join(f)).unwrap_or_default())
                .into_owned()
        };
        XferOutput {
            cmd: self.cmd.clone(),
            status,
            stdout: read("stdout"),
            stderr: read("stderr"),
        }
    }

    /// Waits for the exit and asserts success.
    #[track_caller]
    pub fn wait_ok(self) -> XferOutput {
        self.wait().ok()
    }
}

impl Drop for XferRun {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "--- `{}` stderr ---\n{}",
                self.cmd,
                tail(&self.logs.path().join("stderr"), 8 * 1024)
            );
        }
    }
}

/// Runs `xfer ARGS…` to the end.
pub fn xfer<S: AsRef<OsStr>>(args: impl IntoIterator<Item = S>) -> XferOutput {
    XferRun::spawn(args).wait()
}

/// Uploads `src` as `name`, downloads it to `out`, and asserts both succeed and all three copies
/// (source, file under the daemon root, download) have the same SHA-256.
#[track_caller]
pub fn round_trip(daemon: &Daemon, src: &Path, name: &str, out: &Path, extra: &[&str]) {
    let want = sha256_file(src);
    XferRun::send(src, &daemon.addr(), name, extra).wait_ok();
    assert_eq!(
        sha256_file(&daemon.root().join(name)),
        want,
        "uploaded {name} differs from its source"
    );
    XferRun::recv(name, &daemon.addr(), out, extra).wait_ok();
    assert_eq!(sha256_file(out), want, "downloaded {name} differs");
}

/// A port on 127.0.0.1 where nothing listens: bound, then closed again.
pub fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("local_addr").port()
}

/// Makes `command` run in the network namespace `netns` (an open `/proc/PID/ns/net`, which keeps
/// it alive; `setns` needs root), such as a daemon's started under `unshare --net`. `netns` must
/// stay open until the command is spawned.
pub fn enter_net(command: &mut Command, netns: &File) {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let fd = netns.as_raw_fd();
    // SAFETY: setns is async-signal-safe; the descriptor is open until the child is spawned.
    unsafe {
        command.pre_exec(move || match libc::setns(fd, libc::CLONE_NEWNET) {
            0 => Ok(()),
            _ => Err(std::io::Error::last_os_error()),
        });
    }
}

/// [`run_xfer`] without `env`, in the network namespace `netns` (see [`enter_net`]).
#[track_caller]
pub fn run_xfer_in_net<S: AsRef<OsStr>>(
    netns: &File,
    args: impl IntoIterator<Item = S>,
    guard: Duration,
) -> XferOutput {
    XferRun::spawn_command(args, |command| {
        command.env_remove("XFER_TOKEN");
        enter_net(command, netns);
    })
    .wait_within(guard)
}

/// Runs `xfer ARGS…` with `XFER_TOKEN` removed from the environment and `env` added, and waits
/// at most `guard` for it (a hang guard: past it the client is killed and the test fails).
#[track_caller]
pub fn run_xfer<S: AsRef<OsStr>>(
    args: impl IntoIterator<Item = S>,
    env: &[(&str, &str)],
    guard: Duration,
) -> XferOutput {
    XferRun::spawn_command(args, |command| {
        command.env_remove("XFER_TOKEN").envs(env.iter().copied());
    })
    .wait_within(guard)
}
