//! [`Daemon`]: one real `xferd` child process on `127.0.0.1`, killed and reaped when dropped.

use std::fs::{self, File};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use tempfile::TempDir;

use crate::{bin, tail, wait_bounded, wait_until};

/// How long a daemon may take to print its address line before the test fails.
const STARTUP_DEADLINE: Duration = Duration::from_secs(60);

/// A running `xferd` child process on `127.0.0.1:0`. Dropping it kills (SIGKILL) and reaps it.
pub struct Daemon {
    child: Child,
    addr: SocketAddr,
    root: PathBuf,
    logs: TempDir,
    exited: Option<ExitStatus>,
}

impl Daemon {
    /// Starts `xferd --listen 127.0.0.1:0 --root ROOT EXTRA…` and waits (bounded) for its
    /// `xferd listening on ADDR` line. Stderr goes to a log file shown when a test fails.
    ///
    /// # Panics
    /// If the daemon does not start or prints something else first.
    pub fn start(root: &Path, extra_args: &[&str]) -> Self {
        Self::start_on("127.0.0.1:0", root, extra_args)
    }

    /// Like [`Daemon::start`], listening on `listen` (e.g. the port of a daemon that was killed).
    pub fn start_on(listen: &str, root: &Path, extra_args: &[&str]) -> Self {
        Self::start_under(&[], listen, root, extra_args)
    }

    /// Like [`Daemon::start_on`], run by the command `wrapper` (e.g. `setpriv …` to drop
    /// privileges, or `unshare …` for a mount namespace), which ends by running the daemon's
    /// binary with the arguments that follow.
    pub fn start_under(wrapper: &[&str], listen: &str, root: &Path, extra_args: &[&str]) -> Self {
        let command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(bin("xferd"));
                c
            }
            None => Command::new(bin("xferd")),
        };
        Self::spawn(command, listen, root, extra_args)
    }

    /// Like [`Daemon::start`], with its open-file limit (`RLIMIT_NOFILE`) set to `soft` and
    /// `hard` from the start, as a shell's `ulimit -n` or systemd's `LimitNOFILE=` would.
    pub fn start_with_fd_limit(root: &Path, soft: u64, hard: u64, extra_args: &[&str]) -> Self {
        use std::os::unix::process::CommandExt;
        let mut command = Command::new(bin("xferd"));
        let limit = rustix::process::Rlimit {
            current: Some(soft),
            maximum: Some(hard),
        };
        // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            command.pre_exec(move || {
                rustix::process::setrlimit(rustix::process::Resource::Nofile, limit)
                    .map_err(std::io::Error::from)
            });
        }
        Self::spawn(command, "127.0.0.1:0", root, extra_args)
    }

    fn spawn(mut command: Command, listen: &str, root: &Path, extra_args: &[&str]) -> Self {
        let logs = tempfile::Builder::new()
            .prefix("xferd-log-")
            .tempdir()
            .expect("tempdir");
        let stderr = File::create(logs.path().join("stderr")).expect("log file");
        let mut child = command
            .arg("--listen")
            .arg(listen)
            .arg("--root")
            .arg(root)
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn xferd");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let first = lines.next();
            let _ = tx.send(first);
            // Keep draining so the daemon never blocks on (or fails writing to) its stdout.
            for _ in lines {}
        });
        let mut daemon = Self {
            child,
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            root: root.to_path_buf(),
            logs,
            exited: None,
        };
        let line = match rx.recv_timeout(STARTUP_DEADLINE) {
            Ok(Some(Ok(line))) => line,
            other => {
                daemon.kill();
                panic!(
                    "xferd did not print its address line ({other:?}); stderr:\n{}",
                    daemon.stderr()
                );
            }
        };
        let addr = line
            .strip_prefix("xferd listening on ")
            .and_then(|a| a.trim().parse().ok());
        match addr {
            Some(addr) => daemon.addr = addr,
            None => {
                daemon.kill();
                panic!(
                    "xferd's first stdout line is {line:?}, not `xferd listening on ADDR`; stderr:\n{}",
                    daemon.stderr()
                );
            }
        }
        daemon
    }

    /// `127.0.0.1:PORT`, as given to `xfer`.
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// The bound socket address.
    pub fn socket_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The daemon's process id (for `/proc/PID/…`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The directory it serves.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        if self.exited.is_some() {
            return false;
        }
        match self.child.try_wait().expect("try_wait") {
            Some(status) => {
                self.exited = Some(status);
                false
            }
            None => true,
        }
    }

    /// Panics (with the daemon's stderr) unless the daemon is still running.
    pub fn assert_running(&mut self) {
        if !self.is_running() {
            panic!(
                "xferd exited ({:?}); stderr:\n{}",
                self.exited,
                self.stderr()
            );
        }
    }

    /// SIGKILL by PID, then reap.
    pub fn kill(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            self.exited = Some(self.child.wait().expect("wait xferd"));
        }
    }

    /// SIGTERM by PID, then wait up to `deadline` for the exit status; kills and panics if the
    /// daemon is still running after that.
    pub fn terminate(&mut self, deadline: Duration) -> ExitStatus {
        if let Some(status) = self.exited {
            return status;
        }
        let pid = rustix::process::Pid::from_child(&self.child);
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("SIGTERM");
        match wait_bounded(&mut self.child, deadline) {
            Some(status) => {
                self.exited = Some(status);
                status
            }
            None => {
                self.exited = self.child.try_wait().ok().flatten();
                panic!(
                    "xferd still running {deadline:?} after SIGTERM; stderr:\n{}",
                    self.stderr()
                );
            }
        }
    }

    /// Waits (bounded by `deadline`) until the daemon has closed every connection: no socket on
    /// its port is `ESTABLISHED` or `CLOSE_WAIT`, as listed in `/proc/net/tcp`.
    pub fn wait_idle(&self, deadline: Duration) {
        let port = self.addr.port();
        wait_until(deadline, "xferd has closed all its connections", || {
            open_connections(port) == 0
        });
    }

    /// Everything the daemon wrote to stderr so far (its logs).
    pub fn stderr(&self) -> String {
        tail(&self.logs.path().join("stderr"), 64 * 1024)
    }
}

/// Sockets whose local port is `port` in state ESTABLISHED (01) or CLOSE_WAIT (08).
fn open_connections(port: u16) -> usize {
    let table = fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local_port = fields
                .get(1)
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            local_port == Some(port) && matches!(fields.get(3), Some(&"01" | &"08"))
        })
        .count()
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "--- xferd {} (root {}) stderr ---\n{}",
                self.addr,
                self.root.display(),
                tail(&self.logs.path().join("stderr"), 8 * 1024)
            );
        }
    }
}
