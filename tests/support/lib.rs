//! Helpers for the end-to-end suite: build and locate the real `xferd`/`xfer` binaries, run them as
//! child processes (always killed and reaped, also on panic), make seeded random files, hash them,
//! poll with bounded deadlines, read resume journals, and speak to a daemon frame by frame. Nothing
//! here mocks a part of the system.
//!
//! # Layout
//! - [`bin`]: builds the binaries once per test process and returns their paths.
//! - [`Daemon`]: one `xferd` on `127.0.0.1:0` serving a root directory.
//! - [`XferRun`], [`xfer`], [`run_xfer`], [`XferOutput`]: runs of the `xfer` client, in the
//!   background or to the end.
//! - [`Tree`]: a per-test temporary directory with `root/` (daemon), `src/` and `out/`.
//! - [`random_file`], [`sha256_file`], [`wait_until`], [`journal_held`], [`round_trip`].
//! - [`raw`]: [`raw::RawConn`], a connection speaking frames by hand, and the frames it sends.
//! - [`setup`]: a daemon behind the fault-injecting [`proxy`], moving a file either way.
//! - [`relay`]: a relay recording real traffic, and an impostor server.
//! - [`tofu`]: trust on first use: a client's own `known_hosts`, a daemon's own certificate.
//! - [`Pki`], [`outside`], [`tmpfs`], [`process`]: certificates, a directory no request may
//!   touch, a small filesystem to fill, and a process's descriptors and memory.
#![warn(missing_docs)]

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

mod client;
mod daemon;
mod files;
pub mod metrics;
pub mod outside;
pub mod pki;
pub mod process;
pub mod proxy;
pub mod raw;
pub mod relay;
pub mod setup;
pub mod tmpfs;
pub mod tofu;

pub use client::{
    closed_port, enter_net, round_trip, run_xfer, run_xfer_in_net, xfer, XferOutput, XferRun,
};
pub use daemon::Daemon;
pub use files::{
    journal_chunks, journal_held, journal_path, list_tree, partial_path, random_file, set_mtime,
    sha256_bytes, sha256_file, try_sha256_file, Tree,
};
pub use pki::Pki;

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
