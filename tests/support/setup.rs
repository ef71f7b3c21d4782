//! [`Setup`]: a daemon on its own [`Tree`] behind a fault-injecting [`Proxy`], and a file moved
//! either [`Way`] through it, for the tests of network faults, crashes and shutdown.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::proxy::{Direction, Proxy};
use crate::{
    journal_held, journal_path, partial_path, random_file, sha256_file, wait_until, Daemon, Tree,
    XferRun,
};

/// Chunk size of [`PACED`] runs.
pub const CHUNK: u64 = 64 * 1024;
/// Connections of [`PACED`] runs.
pub const CONNS: u64 = 4;
/// Client flags for [`CONNS`] connections moving [`CHUNK`]-sized chunks at 8 MiB/s in all: slow
/// enough that a fault lands while chunks are in flight.
pub const PACED: &[&str] = &["-c", "4", "--chunk-size", "64K", "--bwlimit", "8M"];

/// Hang guard for [`wait_for_journal`].
const GUARD: Duration = Duration::from_secs(120);

/// Which way a test moves its file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Way {
    /// `xfer send`: from the test's `src/` to the daemon's root.
    Upload,
    /// `xfer recv`: from the daemon's root to the test's `out/`.
    Download,
}

impl Way {
    /// The direction the chunks travel through the proxy.
    pub fn data(self) -> Direction {
        match self {
            Self::Upload => Direction::ToServer,
            Self::Download => Direction::ToClient,
        }
    }
}

/// A daemon on its own tree with a proxy in front of it.
pub struct Setup {
    /// The test's directories.
    pub tree: Tree,
    /// The daemon serving `tree.root()`.
    pub daemon: Daemon,
    /// The proxy in front of the daemon.
    pub proxy: Proxy,
}

impl Setup {
    /// Starts `xferd DAEMON_ARGS…` on a fresh tree, and a proxy in front of it.
    pub fn new(daemon_args: &[&str]) -> Self {
        let tree = Tree::new();
        let daemon = Daemon::start(&tree.root(), daemon_args);
        let proxy = Proxy::start(daemon.socket_addr());
        Self {
            tree,
            daemon,
            proxy,
        }
    }

    /// Creates the file `name` on the sending side; returns its SHA-256.
    pub fn file(&self, way: Way, name: &str, size: u64, seed: u64) -> String {
        match way {
            Way::Upload => random_file(&self.tree.src(name), size, seed),
            Way::Download => random_file(&self.tree.root().join(name), size, seed),
        }
    }

    /// Where `name` ends up on the receiving side.
    pub fn dest(&self, way: Way, name: &str) -> PathBuf {
        match way {
            Way::Upload => self.tree.root().join(name),
            Way::Download => self.tree.out(name),
        }
    }

    /// Starts moving `name` through the proxy.
    pub fn start(&self, way: Way, name: &str, args: &[&str]) -> XferRun {
        self.start_with_env(way, name, args, &[])
    }

    /// Starts moving `name` through the proxy, with extra environment variables.
    pub fn start_with_env(
        &self,
        way: Way,
        name: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> XferRun {
        self.start_at(&self.proxy.addr(), way, name, args, env)
    }

    /// Starts moving `name` straight to the daemon, past the proxy.
    pub fn start_direct(&self, way: Way, name: &str, args: &[&str]) -> XferRun {
        self.start_at(&self.daemon.addr(), way, name, args, &[])
    }

    fn start_at(
        &self,
        addr: &str,
        way: Way,
        name: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> XferRun {
        let mut argv: Vec<OsString> = match way {
            Way::Upload => {
                let src = self.tree.src(name);
                vec![
                    "send".into(),
                    src.into(),
                    addr.into(),
                    "--as".into(),
                    name.into(),
                ]
            }
            Way::Download => {
                let dest = self.dest(way, name);
                vec![
                    "recv".into(),
                    name.into(),
                    addr.into(),
                    "-o".into(),
                    dest.into(),
                ]
            }
        };
        argv.extend(args.iter().map(Into::into));
        XferRun::spawn_with_env(argv, env)
    }

    /// Asserts the received file is `want` and no partial or journal is left beside it.
    #[track_caller]
    pub fn check_received(&self, way: Way, name: &str, want: &str) {
        let dest = self.dest(way, name);
        assert_eq!(
            sha256_file(&dest),
            want,
            "{} differs from its source",
            dest.display()
        );
        assert!(
            !partial_path(&dest).exists() && !journal_path(&dest).exists(),
            "a partial file or journal is left beside {}",
            dest.display()
        );
    }
}

/// Polls (bounded) until the receiver's journal for `dest` holds `bytes`; panics if `run` ends
/// first, since the fault would then not land mid-transfer.
pub fn wait_for_journal(dest: &Path, bytes: u64, run: &mut XferRun) {
    let journal = journal_path(dest);
    wait_until(GUARD, &format!("{bytes} bytes are journaled"), || {
        let held = journal_held(&journal);
        assert!(
            held >= bytes || run.is_running(),
            "`{}` ended before {bytes} bytes were journaled",
            run.cmd()
        );
        held >= bytes
    });
}
