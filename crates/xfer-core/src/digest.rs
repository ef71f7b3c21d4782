//! Whole-file digest (XXH3-128 over the file in order). The sender computes it by reading its
//! file front to back; the receiver computes it over the bytes as they reach their place on disk
//! ([`Frontier`]) and compares the two before the final rename, so a slip in offsets or resume
//! bookkeeping cannot produce a wrong file unnoticed.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use xxhash_rust::xxh3::Xxh3;

use crate::RangeSet;

/// Bytes in a digest.
pub const DIGEST_LEN: usize = 16;
const READ_BLOCK: usize = 1 << 20;

/// A digest.
pub type Digest = [u8; DIGEST_LEN];

/// Digest of the first `size` bytes of `file`, read front to back.
///
/// # Errors
/// I/O errors, or a file shorter than `size`.
pub fn digest_file(file: &File, size: u64) -> io::Result<Digest> {
    let mut hasher = Xxh3::new();
    let mut buf = vec![0u8; READ_BLOCK];
    let mut pos = 0;
    while pos < size {
        let n = READ_BLOCK.min((size - pos) as usize);
        file.read_exact_at(&mut buf[..n], pos)?;
        hasher.update(&buf[..n]);
        pos += n as u64;
    }
    Ok(hasher.digest128().to_be_bytes())
}

/// A digest computed in file order over bytes that arrive in any order: bytes at the frontier
/// are hashed as they come; bytes that arrived ahead of it are read back from disk once the
/// frontier reaches them.
#[derive(Clone)]
pub struct Frontier {
    hasher: Xxh3,
    pos: u64,
}

impl std::fmt::Debug for Frontier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Frontier")
            .field("pos", &self.pos)
            .finish_non_exhaustive()
    }
}

impl Default for Frontier {
    fn default() -> Self {
        Self {
            hasher: Xxh3::new(),
            pos: 0,
        }
    }
}

impl Frontier {
    /// Bytes hashed so far (all of `[0, pos)`).
    pub fn pos(&self) -> u64 {
        self.pos
    }

    /// Offers bytes just written at `offset`; they are hashed if they reach the frontier.
    pub fn feed(&mut self, offset: u64, bytes: &[u8]) {
        let end = offset + bytes.len() as u64;
        if offset <= self.pos && end > self.pos {
            self.hasher.update(&bytes[(self.pos - offset) as usize..]);
            self.pos = end;
        }
    }

    /// Advances through bytes already on disk in `data` while `held` covers the frontier.
    ///
    /// # Errors
    /// I/O errors reading `data`.
    pub fn catch_up(&mut self, data: &File, held: &RangeSet) -> io::Result<()> {
        let mut buf = Vec::new();
        while let Some(r) = held.range_at(self.pos) {
            while self.pos < r.end {
                let n = READ_BLOCK.min((r.end - self.pos) as usize);
                buf.resize(n, 0);
                data.read_exact_at(&mut buf, self.pos)?;
                self.hasher.update(&buf);
                self.pos += n as u64;
            }
        }
        Ok(())
    }

    /// The digest of `[0, pos)`.
    pub fn digest(&self) -> Digest {
        self.hasher.digest128().to_be_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use xfer_proto::ByteRange;

    #[test]
    fn frontier_matches_the_file_digest_whatever_the_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let file = File::open(&path).unwrap();
        let whole = digest_file(&file, data.len() as u64).unwrap();

        let chunks = [
            (2_000_000, 3_000_000),
            (0, 1_000_000),
            (1_500_000, 2_000_000),
            (1_000_000, 1_500_000),
        ];
        let mut held = RangeSet::new();
        let mut frontier = Frontier::default();
        for (s, e) in chunks {
            held.insert(ByteRange::new(s, e));
            frontier.feed(s, &data[s as usize..e as usize]);
            frontier.catch_up(&file, &held).unwrap();
        }
        assert_eq!(frontier.pos(), data.len() as u64);
        assert_eq!(frontier.digest(), whole);

        let mut other = data.clone();
        other[5] ^= 1;
        let mut frontier = Frontier::default();
        frontier.feed(0, &other);
        assert_ne!(frontier.digest(), whole);
    }
}
