//! Files of a test: the per-test [`Tree`], seeded random files, SHA-256 digests, listings, the
//! names of partial files and journals, and what a journal records.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tempfile::TempDir;

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
