//! [`Tmpfs`]: a small filesystem mounted for one test, to run a disk full.

use std::path::Path;
use std::process::Command;

use tempfile::TempDir;

/// A tmpfs of a fixed size on a temporary directory; unmounted when dropped.
pub struct Tmpfs {
    dir: TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (`mount -o size=…`), or prints why not and returns `None` when
    /// the test lacks the privilege to mount (mounting needs root; CI runs as root).
    ///
    /// # Panics
    /// If `mount` fails for another reason.
    pub fn mount(size: &str) -> Option<Self> {
        let dir = tempfile::Builder::new()
            .prefix("xfer-tmpfs-")
            .tempdir()
            .expect("tempdir");
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipped: mounting a tmpfs needs root (EPERM)");
            return None;
        }
        let out = match Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
        {
            Ok(out) => out,
            Err(e) => {
                eprintln!("skipped: cannot run mount: {e}");
                return None;
            }
        };
        if !out.status.success() {
            let why = String::from_utf8_lossy(&out.stderr).into_owned();
            let lower = why.to_lowercase();
            if lower.contains("permission denied") || lower.contains("not permitted") {
                eprintln!("skipped: mounting a tmpfs is not permitted here (EPERM): {why}");
                return None;
            }
            panic!("mount -t tmpfs failed ({}): {why}", out.status);
        }
        Some(Self { dir })
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(self.dir.path())
            .status()
            .is_ok_and(|s| s.success());
        // Something may still hold a file open there (a daemon being killed): detach it.
        if !ok {
            let status = Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .status();
            if !status.as_ref().is_ok_and(|s| s.success()) {
                eprintln!("umount {} failed: {status:?}", self.dir.path().display());
            }
        }
    }
}
