//! Trust on first use through the real binaries: [`TofuHome`], a client's own config
//! directory (where `known_hosts` lives), and [`tofu_daemon`] / [`fingerprint`] for a daemon
//! that made its own certificate in a state directory.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::{bin, run_xfer, Daemon, XferOutput};

/// Hang guard of one client run (a guard, not a timing claim).
const GUARD: Duration = Duration::from_secs(120);

/// A client's `XDG_CONFIG_HOME`, so that each test has a `known_hosts` of its own.
pub struct TofuHome {
    dir: PathBuf,
}

impl TofuHome {
    /// Uses `dir` (made if missing) as the config home.
    pub fn new(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).expect("config home");
        Self {
            dir: dir.to_path_buf(),
        }
    }

    /// The pins file `xfer` keeps there.
    pub fn known_hosts(&self) -> PathBuf {
        self.dir.join("xfer").join("known_hosts")
    }

    /// Runs `xfer ARGS…` (no terminal: stdin is null) with this config home and no token.
    pub fn xfer<S: AsRef<OsStr>>(&self, args: impl IntoIterator<Item = S>) -> XferOutput {
        let home = self.dir.display().to_string();
        run_xfer(args, &[("XDG_CONFIG_HOME", &home)], GUARD)
    }
}

/// Starts `xferd --tls --state-dir STATE` on `listen` over `root`: its certificate is the one
/// it made (or finds) in `state`.
pub fn tofu_daemon(listen: &str, root: &Path, state: &Path, extra: &[&str]) -> Daemon {
    let state = state.display().to_string();
    let mut args = vec!["--tls", "--state-dir", &state];
    args.extend_from_slice(extra);
    Daemon::start_on(listen, root, &args)
}

/// `xferd --fingerprint ARGS…`: its stdout line on success, else its stderr.
pub fn fingerprint(args: &[&str]) -> Result<String, String> {
    let out = Command::new(bin("xferd"))
        .arg("--fingerprint")
        .args(args)
        .env_remove("STATE_DIRECTORY")
        .output()
        .expect("run xferd --fingerprint");
    let text = |b: &[u8]| String::from_utf8_lossy(b).trim().to_string();
    if out.status.success() {
        Ok(text(&out.stdout))
    } else {
        Err(text(&out.stderr))
    }
}
