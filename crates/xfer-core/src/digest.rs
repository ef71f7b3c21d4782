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
/// Bytes read back through the page cache at once: under the allocator's mmap threshold, so the
/// buffer of each catch-up comes from its free lists instead of fresh, faulted-in pages, and
/// stays in cache to be hashed.
pub(crate) const BUFFERED_READ_BLOCK: usize = 128 << 10;

/// Hands `sink` the `n` bytes at `offset` of `data`, read through the page cache into `buf` in
/// blocks of [`BUFFERED_READ_BLOCK`].
pub(crate) fn read_through_cache(
    data: &File,
    mut offset: u64,
    mut n: usize,
    buf: &mut Vec<u8>,
    sink: &mut dyn FnMut(&[u8]),
) -> io::Result<()> {
    while n > 0 {
        let len = n.min(BUFFERED_READ_BLOCK);
        buf.resize(len, 0);
        data.read_exact_at(buf, offset)?;
        sink(buf);
        offset += len as u64;
        n -= len;
    }
    Ok(())
}

/// A digest.
pub type Digest = [u8; DIGEST_LEN];

/// How [`Frontier::catch_up_reading`] reads: `read(pos, n, sink)` hands `sink` the `n` bytes at
/// `pos`.
pub type ReadBack<'a> = dyn FnMut(u64, usize, &mut dyn FnMut(&[u8])) -> io::Result<()> + 'a;

/// Digest of the first `size` bytes of `file`, read front to back. The holes of a sparse file
/// are hashed as the zeros they read as, without reading them: reading a hole costs the kernel
/// a page of zeros per page, far slower than hashing.
///
/// # Errors
/// I/O errors, or a file shorter than `size`.
pub fn digest_file(file: &File, size: u64) -> io::Result<Digest> {
    use std::os::unix::fs::MetadataExt;
    let meta = file.metadata()?;
    // A file shorter than `size` is read, and fails, as any other.
    let holes = if meta.blocks() * 512 < size && meta.len() >= size {
        RangeSet::from_ranges(crate::meta::holes_of(std::os::fd::AsFd::as_fd(file), size)?)
    } else {
        RangeSet::new()
    };
    let mut frontier = Frontier::default();
    let all = RangeSet::from_ranges([xfer_proto::ByteRange::new(0, size)]);
    frontier.catch_up_over(file, &all, &holes)?;
    Ok(frontier.digest())
}

/// Hashes `len` zero bytes.
fn hash_zeros(hasher: &mut Xxh3, len: u64) {
    static ZEROS: [u8; 1 << 16] = [0; 1 << 16];
    let mut left = len;
    while left > 0 {
        let n = ZEROS.len().min(left as usize);
        hasher.update(&ZEROS[..n]);
        left -= n as u64;
    }
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
        self.catch_up_over(data, held, &RangeSet::new())
    }

    /// [`Frontier::catch_up`], hashing the ranges of `zeros` (known to read as zeros: holes)
    /// without reading them.
    ///
    /// # Errors
    /// I/O errors reading `data`.
    pub fn catch_up_over(
        &mut self,
        data: &File,
        held: &RangeSet,
        zeros: &RangeSet,
    ) -> io::Result<()> {
        let mut buf = Vec::new();
        self.catch_up_reading(held, zeros, BUFFERED_READ_BLOCK, &mut |pos, n, sink| {
            read_through_cache(data, pos, n, &mut buf, sink)
        })
    }

    /// [`Frontier::catch_up_over`] with the bytes read by `read(pos, n, sink)`, which hands
    /// `sink` the `n` bytes at `pos`, in order (in pieces if it likes); `n` is at most `block`.
    ///
    /// # Errors
    /// What `read` returns.
    pub fn catch_up_reading(
        &mut self,
        held: &RangeSet,
        zeros: &RangeSet,
        block: usize,
        read: &mut ReadBack<'_>,
    ) -> io::Result<()> {
        while let Some(r) = held.range_at(self.pos) {
            while self.pos < r.end {
                if let Some(z) = zeros.range_at(self.pos) {
                    let end = z.end.min(r.end);
                    hash_zeros(&mut self.hasher, end - self.pos);
                    self.pos = end;
                    continue;
                }
                let next_zeros = zeros
                    .iter()
                    .find(|z| z.start > self.pos)
                    .map_or(r.end, |z| z.start.min(r.end));
                let n = block.min((next_zeros - self.pos) as usize);
                let hasher = &mut self.hasher;
                read(self.pos, n, &mut |bytes| hasher.update(bytes))?;
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

        // A sparse copy, its holes hashed without being read, has the same digest.
        let sparse_path = dir.path().join("sparse");
        let sparse = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&sparse_path)
            .unwrap();
        sparse.set_len(8 << 20).unwrap();
        sparse.write_all_at(&data[..4096], 4 << 20).unwrap();
        let mut dense = vec![0u8; 8 << 20];
        dense[4 << 20..(4 << 20) + 4096].copy_from_slice(&data[..4096]);
        std::fs::write(dir.path().join("dense"), &dense).unwrap();
        let dense = File::open(dir.path().join("dense")).unwrap();
        assert_eq!(
            digest_file(&sparse, 8 << 20).unwrap(),
            digest_file(&dense, 8 << 20).unwrap()
        );

        let mut other = data.clone();
        other[5] ^= 1;
        let mut frontier = Frontier::default();
        frontier.feed(0, &other);
        assert_ne!(frontier.digest(), whole);
    }
}
