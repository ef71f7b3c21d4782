//! Helpers for the end-to-end suite: build and locate the real `xferd`/`xfer` binaries, run them as
//! child processes (always killed and reaped, also on panic), make seeded random files, hash them,
//! poll with bounded deadlines and read resume journals. Nothing here mocks a part of the system.
//!
//! # Layout
//! - [`bin`]: builds the binaries once per test process and returns their paths.
//! - [`Daemon`]: one `xferd` on `127.0.0.1:0` serving a root directory.
//! - [`XferRun`], [`xfer`], [`XferOutput`]: runs of the `xfer` client, in the background or to the end.
//! - [`Tree`]: a per-test temporary directory with `root/` (daemon), `src/` and `out/`.
//! - [`random_file`], [`sha256_file`], [`wait_until`], [`journal_held`], [`round_trip`].
#![warn(missing_docs)]

use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, OnceLock};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tempfile::TempDir;

pub mod proxy;

/// How long a daemon may take to print its address line before the test fails.
const STARTUP_DEADLINE: Duration = Duration::from_secs(60);
/// Longest an `xfer` run may take before it is killed and the test fails (a hang guard only).
const RUN_DEADLINE: Duration = Duration::from_secs(300);
/// Polling interval of [`wait_until`] and of process waits.
const POLL: Duration = Duration::from_millis(20);

// ---------------------------------------------------------------------------------------------
// Binaries
// ---------------------------------------------------------------------------------------------

/// Path of the binary `name` (`xferd` or `xfer`), built from this workspace.
///
/// The first call in a test process runs `$CARGO build --bins -p xferd -p xfer` in the profile
/// of the running test executable and into its target directory; `XFER_BIN_DIR` overrides the
/// whole thing with a directory holding prebuilt binaries.
///
/// # Panics
/// If the build fails (the panic message carries cargo's output) or the binary is missing.
pub fn bin(name: &str) -> PathBuf {
    // A failed build is remembered too, so that every test reports it without building again.
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let dir = DIR.get_or_init(|| match std::env::var_os("XFER_BIN_DIR") {
        Some(dir) => Ok(PathBuf::from(dir)),
        None => build_binaries(),
    });
    let dir = dir.as_ref().unwrap_or_else(|e| panic!("{e}"));
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "binary {} does not exist (check XFER_BIN_DIR or the build)",
        path.display()
    );
    path
}

/// Builds the binaries and returns `<target dir>/<profile>`, derived from the test executable
/// (`…/target/debug/deps/integration-HASH` → `…/target/debug`).
fn build_binaries() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable lives in <target>/<profile>/deps")
        .to_path_buf();
    let target_dir = profile_dir.parent().expect("target dir").to_path_buf();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    // `cargo test` sets these for the test process; build scripts that watch them (ring's
    // `rerun-if-env-changed=CARGO_PKG_NAME`, …) would otherwise rerun here and again in the next
    // `cargo` run from a shell, rebuilding ring, rustls and both binaries every time.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_MANIFEST_")
            || matches!(
                &*key,
                "CARGO_CRATE_NAME" | "CARGO_PRIMARY_PACKAGE" | "OUT_DIR"
            )
        {
            cmd.env_remove(&*key);
        }
    }
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "build",
            "--bins",
            "-p",
            "xferd",
            "-p",
            "xfer",
            "--target-dir",
        ])
        .arg(&target_dir);
    match profile_dir.file_name().and_then(OsStr::to_str) {
        Some("debug") => {}
        Some("release") => {
            cmd.arg("--release");
        }
        Some(other) => {
            cmd.args(["--profile", other]);
        }
        None => panic!("cannot tell the profile of {}", exe.display()),
    }
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run cargo build: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "building xferd and xfer failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(profile_dir)
}

// ---------------------------------------------------------------------------------------------
// Files
// ---------------------------------------------------------------------------------------------

/// A per-test temporary directory: `root/` served by the daemon, `src/` for sources, `out/` for
/// downloads. Removed when dropped.
pub struct Tree {
    dir: TempDir,
}

impl Tree {
    /// Creates the directory and its three subdirectories.
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("xfer-test-")
            .tempdir()
            .expect("tempdir");
        for sub in ["root", "src", "out"] {
            fs::create_dir(dir.path().join(sub)).expect("mkdir");
        }
        Self { dir }
    }

    /// The temporary directory itself.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The daemon's root.
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// `src/NAME`.
    pub fn src(&self, name: &str) -> PathBuf {
        self.dir.path().join("src").join(name)
    }

    /// `out/NAME`.
    pub fn out(&self, name: &str) -> PathBuf {
        self.dir.path().join("out").join(name)
    }
}

impl Default for Tree {
    fn default() -> Self {
        Self::new()
    }
}

/// SplitMix64: a tiny seeded generator, fast even in a debug build.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        let mut words = buf.chunks_exact_mut(8);
        for word in &mut words {
            word.copy_from_slice(&self.next().to_le_bytes());
        }
        let rest = words.into_remainder();
        let last = self.next().to_le_bytes();
        rest.copy_from_slice(&last[..rest.len()]);
    }
}

/// Writes `size` pseudo-random bytes from `seed` to `path` (creating parent directories) and
/// returns their SHA-256 in hex.
pub fn random_file(path: &Path, size: u64, seed: u64) -> String {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).expect("mkdir -p");
    }
    let mut file = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    let mut rng = SplitMix64(seed ^ 0x5eed_0000_0000_0000);
    let mut hasher = Sha256::new();
    let mut block = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        rng.fill(&mut block[..n]);
        hasher.update(&block[..n]);
        file.write_all(&block[..n]).expect("write");
        left -= n as u64;
    }
    file.sync_all().ok();
    hex(&hasher.finalize())
}

/// SHA-256 of a file's contents, in hex.
///
/// # Panics
/// If the file cannot be read.
pub fn sha256_file(path: &Path) -> String {
    try_sha256_file(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// SHA-256 of a file's contents in hex, or the error opening or reading it.
pub fn try_sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut block = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut block)?;
        if n == 0 {
            return Ok(hex(&hasher.finalize()));
        }
        hasher.update(&block[..n]);
    }
}

/// SHA-256 of a byte slice, in hex.
pub fn sha256_bytes(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `DIR/.NAME.xfer-part` for a final path `DIR/NAME`.
pub fn partial_path(final_path: &Path) -> PathBuf {
    final_path.with_file_name(xfer_core::partial_name(&leaf(final_path)))
}

/// `DIR/.NAME.xfer-state` for a final path `DIR/NAME`.
pub fn journal_path(final_path: &Path) -> PathBuf {
    final_path.with_file_name(xfer_core::journal_name(&leaf(final_path)))
}

fn leaf(path: &Path) -> String {
    path.file_name()
        .expect("a file name")
        .to_string_lossy()
        .into_owned()
}

/// Every entry below `dir`, as sorted `/`-separated relative paths (directories end in `/`).
pub fn list_tree(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let rel = path
                .strip_prefix(base)
                .expect("below base")
                .to_string_lossy()
                .into_owned();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                out.push(format!("{rel}/"));
                walk(base, &path, out);
            } else {
                out.push(rel);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

// ---------------------------------------------------------------------------------------------
// Polling
// ---------------------------------------------------------------------------------------------

/// Polls `cond` every 20 ms until it holds; panics with `what` once `deadline` has passed.
pub fn wait_until(deadline: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + deadline;
    loop {
        if cond() {
            return;
        }
        assert!(
            Instant::now() < end,
            "timed out after {deadline:?} waiting until {what}"
        );
        std::thread::sleep(POLL);
    }
}

/// Waits for `child` to exit, killing it and returning `None` if `deadline` passes first.
fn wait_bounded(child: &mut Child, deadline: Duration) -> Option<ExitStatus> {
    let end = Instant::now() + deadline;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() >= end {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(POLL);
    }
}

/// The last `max` bytes of a log file, for failure messages.
fn tail(path: &Path, max: usize) -> String {
    let text = fs::read(path).unwrap_or_default();
    let start = text.len().saturating_sub(max);
    String::from_utf8_lossy(&text[start..]).into_owned()
}

// ---------------------------------------------------------------------------------------------
// Daemon
// ---------------------------------------------------------------------------------------------

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
        let logs = tempfile::Builder::new()
            .prefix("xferd-log-")
            .tempdir()
            .expect("tempdir");
        let stderr = File::create(logs.path().join("stderr")).expect("log file");
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(bin("xferd"));
                c
            }
            None => Command::new(bin("xferd")),
        };
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

// ---------------------------------------------------------------------------------------------
// Client
// ---------------------------------------------------------------------------------------------

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
        let child = Command::new(bin("xfer"))
            .args(&args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("spawn xfer");
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
    pub fn wait(mut self) -> XferOutput {
        if self.status.is_none() {
            self.status = wait_bounded(&mut self.child, RUN_DEADLINE);
        }
        let Some(status) = self.status else {
            panic!(
                "`{}` still running after {RUN_DEADLINE:?}; killed. stderr:\n{}",
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

// ---------------------------------------------------------------------------------------------
// Journals
// ---------------------------------------------------------------------------------------------

/// Bytes the resume journal at `path` records as written (read with `xfer_core::journal`); 0 if
/// it does not exist or has no valid header yet.
///
/// # Panics
/// On I/O errors other than "not found".
pub fn journal_held(path: &Path) -> u64 {
    match xfer_core::journal::recorded_at(path) {
        Ok(found) => found.map_or(0, |(_, bytes)| bytes),
        Err(e) => panic!("read journal {}: {e}", path.display()),
    }
}

/// The ranges `[start, end)` of the chunk records in the journal at `path`, in journal order
/// (read with `xfer_core::journal`); empty if it does not exist or has no valid header.
///
/// # Panics
/// On I/O errors other than "not found".
pub fn journal_chunks(path: &Path) -> Vec<(u64, u64)> {
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => panic!("open journal {}: {e}", path.display()),
    };
    match xfer_core::journal::read(&mut file) {
        Ok(Some(contents)) => contents
            .chunks
            .iter()
            .map(|(range, _)| (range.start, range.end))
            .collect(),
        Ok(None) => Vec::new(),
        Err(e) => panic!("read journal {}: {e}", path.display()),
    }
}

/// Sets a file's modification time to `secs` after the epoch.
pub fn set_mtime(path: &Path, secs: u64) {
    File::options()
        .write(true)
        .open(path)
        .and_then(|f| f.set_modified(std::time::UNIX_EPOCH + Duration::from_secs(secs)))
        .unwrap_or_else(|e| panic!("set mtime of {}: {e}", path.display()));
}
