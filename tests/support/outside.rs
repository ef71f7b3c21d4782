//! [`Outside`]: a directory beside a daemon's root that no request may read or change, checked
//! against a snapshot taken when it was made.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::sha256_file;

/// What one entry below a directory looks like: kind, size, mtime and (for files) content hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryState {
    kind: &'static str,
    len: u64,
    mtime: SystemTime,
    sha256: Option<String>,
}

/// Every entry below `dir` (the directory itself included, as ""), without following symlinks.
pub fn snapshot(dir: &Path) -> BTreeMap<String, EntryState> {
    fn walk(base: &Path, path: &Path, out: &mut BTreeMap<String, EntryState>) {
        let meta = fs::symlink_metadata(path).expect("lstat");
        let kind = if meta.is_dir() {
            "dir"
        } else if meta.is_file() {
            "file"
        } else if meta.file_type().is_symlink() {
            "symlink"
        } else {
            "other"
        };
        let rel = path
            .strip_prefix(base)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        out.insert(
            rel,
            EntryState {
                kind,
                len: meta.len(),
                mtime: meta.modified().expect("mtime"),
                sha256: meta.is_file().then(|| sha256_file(path)),
            },
        );
        if meta.is_dir() {
            for entry in fs::read_dir(path).expect("read_dir") {
                walk(base, &entry.expect("entry").path(), out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// A directory beside the daemon's root holding a secret file and a subdirectory, which no
/// request may read, create, change or delete anything in.
pub struct Outside {
    dir: PathBuf,
    before: BTreeMap<String, EntryState>,
}

/// The content of `outside/secret.txt`.
pub const SECRET: &[u8] = b"outside the root: must never be served or changed\n";

impl Outside {
    /// Creates `DIR/outside/` with `secret.txt`, `sub/` and `sub/inner.txt`; records its state.
    pub fn new(parent: &Path) -> Self {
        let dir = parent.join("outside");
        fs::create_dir_all(dir.join("sub")).unwrap();
        fs::write(dir.join("secret.txt"), SECRET).unwrap();
        fs::write(dir.join("sub/inner.txt"), b"inner\n").unwrap();
        // Old mtimes, so that a change within the same clock tick still shows.
        for p in [dir.join("secret.txt"), dir.join("sub/inner.txt")] {
            File::options()
                .write(true)
                .open(&p)
                .unwrap()
                .set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000))
                .unwrap();
        }
        let before = snapshot(&dir);
        Self { dir, before }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// `outside/NAME`.
    pub fn join(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Panics unless everything is as it was when created.
    #[track_caller]
    pub fn assert_untouched(&self, after: &str) {
        let now = snapshot(&self.dir);
        assert_eq!(
            now, self.before,
            "after {after}: the directory outside the root changed"
        );
    }
}
