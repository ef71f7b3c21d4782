//! Whole-file digest, of one of two kinds ([`DigestKind`]): XXH3-128 over the file in order, or
//! (`CAP_BLOCK_DIGEST`) XXH3-128 over the XXH3-128 digests of its blocks of [`DIGEST_BLOCK`]
//! bytes. The sender computes it by reading its file; the receiver computes it over the bytes as
//! they reach their place on disk ([`Frontier`], [`Blocks`]) and compares the two before the final
//! rename, so a slip in offsets or resume bookkeeping cannot produce a wrong file unnoticed.

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

/// Bytes in a block of the block digest (proto.md §2.4). A block costs its receiver 16 bytes
/// while it waits to be combined, and at most one block is read back for a block whose pieces
/// arrived out of order within it: 1 MiB keeps both small (1.6 MB per 100 GiB; a run of a delta
/// spans ~0.5 MiB of read-back on average at each of its ends).
pub const DIGEST_BLOCK: u64 = 1 << 20;

/// In-progress block hashers a receiver keeps at once ([`Blocks`]); a block started beyond
/// them is read back once complete instead. Each is an XXH3 state of under 1 KiB.
pub const MAX_OPEN_BLOCKS: usize = 1024;

/// Bytes one receiver ([`Blocks`]) keeps of pieces written ahead of where their block's hasher
/// stands, to hash from memory once the gap before them is filled, instead of reading the block
/// back from the disk (a light file's delta fills each changed span last: the runs copied after
/// it were written first).
pub const MAX_HELD_AHEAD: usize = 4 << 20;
/// Bytes all the receivers of this process keep so, at most: past it, a block is read back.
pub const MAX_HELD_AHEAD_IN_PROCESS: usize = 64 << 20;

/// Bytes every [`Blocks`] of this process holds ahead (see [`MAX_HELD_AHEAD_IN_PROCESS`]).
static HELD_AHEAD: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A copy of a piece held ahead, counted in [`HELD_AHEAD`] for as long as it lives.
struct Held(Vec<u8>);

impl Held {
    /// A copy of `piece`, if the process has room for it.
    fn of(piece: &[u8]) -> Option<Self> {
        use std::sync::atomic::Ordering::Relaxed;
        let n = piece.len();
        HELD_AHEAD
            .fetch_update(Relaxed, Relaxed, |used| {
                (used + n <= MAX_HELD_AHEAD_IN_PROCESS).then_some(used + n)
            })
            .ok()
            .map(|_| Self(piece.to_vec()))
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        HELD_AHEAD.fetch_sub(self.0.len(), std::sync::atomic::Ordering::Relaxed);
    }
}

/// Which whole-file digest a session uses (proto.md §2.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DigestKind {
    /// XXH3-128 over the file in order: with a peer that lacks `CAP_BLOCK_DIGEST`.
    #[default]
    Sequential,
    /// XXH3-128 over the XXH3-128 digests of the file's blocks of [`DIGEST_BLOCK`] bytes, in
    /// order (`CAP_BLOCK_DIGEST`).
    Blocks,
}

impl DigestKind {
    /// The kind in force on a connection with these capabilities.
    pub fn of_capabilities(capabilities: u64) -> Self {
        if capabilities & xfer_proto::CAP_BLOCK_DIGEST != 0 {
            Self::Blocks
        } else {
            Self::Sequential
        }
    }
}

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
    digest_file_as(DigestKind::Sequential, file, size)
}

/// [`digest_file`] of the given kind.
///
/// # Errors
/// I/O errors, or a file shorter than `size`.
pub fn digest_file_as(kind: DigestKind, file: &File, size: u64) -> io::Result<Digest> {
    use std::os::unix::fs::MetadataExt;
    let meta = file.metadata()?;
    // A file shorter than `size` is read, and fails, as any other.
    let holes = if meta.blocks() * 512 < size && meta.len() >= size {
        RangeSet::from_ranges(crate::meta::holes_of(std::os::fd::AsFd::as_fd(file), size)?)
    } else {
        RangeSet::new()
    };
    let mut buf = Vec::new();
    let mut read =
        |pos, n, sink: &mut dyn FnMut(&[u8])| read_through_cache(file, pos, n, &mut buf, sink);
    match kind {
        DigestKind::Sequential => {
            let mut frontier = Frontier::default();
            let all = RangeSet::from_ranges([xfer_proto::ByteRange::new(0, size)]);
            frontier.catch_up_reading(&all, &holes, BUFFERED_READ_BLOCK, &mut read)?;
            Ok(frontier.digest())
        }
        DigestKind::Blocks => {
            let mut outer = Xxh3::new();
            for index in 0..block_count(size) {
                let range = block_range(index, size);
                let block = hash_span(
                    range.start,
                    range.end,
                    &holes,
                    BUFFERED_READ_BLOCK,
                    &mut read,
                )?;
                outer.update(&block);
            }
            Ok(outer.digest128().to_be_bytes())
        }
    }
}

/// Blocks of the block digest in a file of `size` bytes.
pub fn block_count(size: u64) -> u64 {
    size.div_ceil(DIGEST_BLOCK)
}

/// The bytes of block `index` in a file of `size` bytes (the last one short).
pub fn block_range(index: u64, size: u64) -> xfer_proto::ByteRange {
    let start = index * DIGEST_BLOCK;
    xfer_proto::ByteRange::new(start, size.min(start + DIGEST_BLOCK))
}

/// XXH3-128 of the bytes `[start, end)`, read by `read` in pieces of at most `block`, the
/// ranges of `zeros` hashed without being read.
///
/// # Errors
/// What `read` returns.
pub fn hash_span(
    start: u64,
    end: u64,
    zeros: &RangeSet,
    block: usize,
    read: &mut ReadBack<'_>,
) -> io::Result<Digest> {
    let mut hasher = Xxh3::new();
    let mut pos = start;
    hash_into(&mut hasher, &mut pos, end, zeros, block, read)?;
    Ok(hasher.digest128().to_be_bytes())
}

/// Feeds `hasher` the bytes from `*pos` to `end`, advancing `*pos`.
fn hash_into(
    hasher: &mut Xxh3,
    pos: &mut u64,
    end: u64,
    zeros: &RangeSet,
    block: usize,
    read: &mut ReadBack<'_>,
) -> io::Result<()> {
    while *pos < end {
        if let Some(z) = zeros.range_at(*pos) {
            let to = z.end.min(end);
            hash_zeros(hasher, to - *pos);
            *pos = to;
            continue;
        }
        let next_zeros = zeros
            .iter()
            .find(|z| z.start > *pos)
            .map_or(end, |z| z.start.min(end));
        let n = block.min((next_zeros - *pos) as usize);
        read(*pos, n, &mut |bytes| hasher.update(bytes))?;
        *pos += n as u64;
    }
    Ok(())
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
            hash_into(&mut self.hasher, &mut self.pos, r.end, zeros, block, read)?;
        }
        Ok(())
    }

    /// The digest of `[0, pos)`.
    pub fn digest(&self) -> Digest {
        self.hasher.digest128().to_be_bytes()
    }
}

/// The block digest ([`DigestKind::Blocks`]) computed over bytes that arrive in any order.
///
/// Each block is hashed from the bytes written into it: in order as they arrive, and a piece
/// that arrives ahead of the bytes before it is kept until they come (within
/// [`MAX_HELD_AHEAD`], and [`MAX_HELD_AHEAD_IN_PROCESS`] for the whole process). A block whose
/// pieces could not be kept so, or that was written before this process (a resume) or as a
/// hole, is read back once it is complete. Completed block digests are combined in block order;
/// those completed ahead of the first missing block wait as 16 bytes each.
///
/// Bounds: 16 bytes (plus a map entry) per block waiting ahead or 8 per block marked for read-back
/// (about 1.6 MB per 100 GiB of file at most), at most [`MAX_OPEN_BLOCKS`] in-progress hashers
/// (a block started beyond them is read back instead), and [`MAX_HELD_AHEAD`] bytes held ahead.
pub struct Blocks {
    size: u64,
    /// Blocks combined into `outer`: all of `[0, next)`.
    next: u64,
    outer: Xxh3,
    /// Digests of blocks complete beyond `next`.
    ahead: std::collections::BTreeMap<u64, Digest>,
    /// Blocks hashed as written so far.
    open: std::collections::HashMap<u64, Open>,
    /// Bytes of the pieces `open` holds ahead.
    held_ahead: usize,
    /// The most `held_ahead` may reach.
    max_held_ahead: usize,
    /// Blocks to read back once every byte of them is held.
    stale: std::collections::BTreeSet<u64>,
}

impl std::fmt::Debug for Blocks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blocks")
            .field("size", &self.size)
            .field("next", &self.next)
            .field("ahead", &self.ahead.len())
            .field("open", &self.open.len())
            .field("stale", &self.stale.len())
            .field("held_ahead", &self.held_ahead)
            .finish()
    }
}

/// A block being hashed as it is written.
#[derive(Default)]
struct Open {
    hasher: Box<Xxh3>,
    /// Bytes of the block hashed: all of `[0, seen)` from its start.
    seen: u64,
    /// Pieces written beyond `seen`, by their offset in the block, to hash once it reaches them.
    ahead: std::collections::BTreeMap<u64, Held>,
}

impl Open {
    /// Takes in `piece`, at `at` (at most `seen`) in the block; then the pieces held ahead that
    /// it reaches. Returns the bytes of those let go.
    fn hash_from(&mut self, at: u64, piece: &[u8]) -> usize {
        self.hash_in(at, piece);
        let mut freed = 0;
        while let Some(entry) = self.ahead.first_entry() {
            if *entry.key() > self.seen {
                break;
            }
            let (at, held) = entry.remove_entry();
            freed += held.0.len();
            self.hash_in(at, &held.0);
        }
        freed
    }

    /// Hashes what `piece`, at `at` (at most `seen`) in the block, has beyond `seen`.
    fn hash_in(&mut self, at: u64, piece: &[u8]) {
        let end = at + piece.len() as u64;
        if end > self.seen {
            self.hasher.update(&piece[(self.seen - at) as usize..]);
            self.seen = end;
        }
    }
}

/// Digests of the blocks a write covers whole, computed before the receiver takes its lock.
#[derive(Debug, Default)]
pub struct WholeBlocks(Vec<(u64, Digest)>);

impl WholeBlocks {
    /// Hashes the blocks of a file of `size` bytes that `bytes`, written at `offset`, covers
    /// whole.
    pub fn of(size: u64, offset: u64, bytes: &[u8]) -> Self {
        let end = offset + bytes.len() as u64;
        let first = offset.div_ceil(DIGEST_BLOCK);
        let mut out = Vec::new();
        for index in first..block_count(size) {
            let range = block_range(index, size);
            if range.end > end {
                break;
            }
            let piece = &bytes[(range.start - offset) as usize..(range.end - offset) as usize];
            out.push((index, xxhash_rust::xxh3::xxh3_128(piece).to_be_bytes()));
        }
        Self(out)
    }
}

impl Blocks {
    /// Nothing hashed yet, for a file of `size` bytes.
    pub fn new(size: u64) -> Self {
        Self::holding_ahead(size, MAX_HELD_AHEAD)
    }

    /// [`new`](Self::new) that holds at most `max` bytes of pieces ahead.
    pub fn holding_ahead(size: u64, max: usize) -> Self {
        Self {
            size,
            next: 0,
            outer: Xxh3::new(),
            ahead: std::collections::BTreeMap::new(),
            open: std::collections::HashMap::new(),
            held_ahead: 0,
            max_held_ahead: max,
            stale: std::collections::BTreeSet::new(),
        }
    }

    /// Stops hashing block `index` as written, letting go of what it held ahead.
    fn close(&mut self, index: u64) {
        if let Some(open) = self.open.remove(&index) {
            self.held_ahead -= open.ahead.values().map(|held| held.0.len()).sum::<usize>();
        }
    }

    /// Bytes combined so far (all of `[0, pos)`).
    pub fn pos(&self) -> u64 {
        self.size.min(self.next * DIGEST_BLOCK)
    }

    /// The whole file's digest, once every block is combined.
    pub fn digest(&self) -> Option<Digest> {
        (self.next == block_count(self.size)).then(|| self.outer.digest128().to_be_bytes())
    }

    /// Blocks not combined yet, in order.
    pub fn not_combined(&self) -> Vec<u64> {
        (self.next..block_count(self.size))
            .filter(|i| !self.ahead.contains_key(i))
            .collect()
    }

    /// Records the digest of block `index`.
    pub fn complete(&mut self, index: u64, digest: Digest) {
        self.close(index);
        self.stale.remove(&index);
        if index < self.next {
            return;
        }
        if index > self.next {
            self.ahead.insert(index, digest);
            return;
        }
        self.outer.update(&digest);
        self.next += 1;
        while let Some(d) = self.ahead.remove(&self.next) {
            self.outer.update(&d);
            self.next += 1;
        }
    }

    fn done(&self, index: u64) -> bool {
        index < self.next || self.ahead.contains_key(&index)
    }

    /// Marks the blocks `range` touches as to be read back once complete (bytes not in this
    /// process's memory: resumed, or holes).
    pub fn mark_stale(&mut self, range: xfer_proto::ByteRange) {
        if range.is_empty() {
            return;
        }
        for index in range.start / DIGEST_BLOCK..range.end.div_ceil(DIGEST_BLOCK) {
            if !self.done(index) {
                self.close(index);
                self.stale.insert(index);
            }
        }
    }

    /// Offers `bytes` just written at `offset`, with `whole`, the digests of the blocks it
    /// covers whole ([`WholeBlocks::of`]). Returns the blocks to read back now: marked stale and
    /// complete in `held` (which includes this write).
    pub fn feed(
        &mut self,
        offset: u64,
        bytes: &[u8],
        whole: WholeBlocks,
        held: &RangeSet,
    ) -> Vec<u64> {
        let end = offset + bytes.len() as u64;
        if bytes.is_empty() {
            return Vec::new();
        }
        let mut whole = whole.0.into_iter().peekable();
        let mut to_read = Vec::new();
        for index in offset / DIGEST_BLOCK..end.div_ceil(DIGEST_BLOCK) {
            if let Some(&(i, d)) = whole.peek() {
                if i == index {
                    whole.next();
                    self.complete(index, d);
                    continue;
                }
            }
            if self.done(index) {
                continue;
            }
            let block = block_range(index, self.size);
            let (start, stop) = (offset.max(block.start), end.min(block.end));
            let piece = &bytes[(start - offset) as usize..(stop - offset) as usize];
            if !self.stale.contains(&index) && self.take_in(index, start - block.start, piece) {
                if let Some(open) = self.open.get(&index) {
                    if open.seen == block.len() {
                        let digest = open.hasher.digest128().to_be_bytes();
                        self.complete(index, digest);
                    }
                }
                continue;
            }
            if held.contains(block) {
                self.stale.remove(&index);
                to_read.push(index);
            }
        }
        to_read
    }

    /// Hashes `piece`, at `at` in block `index`, or holds it until the bytes before it come;
    /// false (the block marked stale) where neither can be done within the bounds.
    fn take_in(&mut self, index: u64, at: u64, piece: &[u8]) -> bool {
        let room = self.open.contains_key(&index) || self.open.len() < MAX_OPEN_BLOCKS;
        if room {
            let open = self.open.entry(index).or_default();
            if at <= open.seen {
                self.held_ahead -= open.hash_from(at, piece);
                return true;
            }
            let n = piece.len();
            let longer = open.ahead.get(&at).is_none_or(|held| held.0.len() < n);
            if !longer {
                return true;
            }
            let copy = (self.held_ahead + n <= self.max_held_ahead)
                .then(|| Held::of(piece))
                .flatten();
            if let Some(copy) = copy {
                if let Some(replaced) = open.ahead.insert(at, copy) {
                    self.held_ahead -= replaced.0.len();
                }
                self.held_ahead += n;
                return true;
            }
        }
        self.close(index);
        self.stale.insert(index);
        false
    }

    /// Blocks marked stale that touch `within` and that `held` now covers whole: to read back
    /// (after a resume, or holes recorded).
    pub fn stale_and_held(&mut self, held: &RangeSet, within: xfer_proto::ByteRange) -> Vec<u64> {
        let blocks = within.start / DIGEST_BLOCK..within.end.div_ceil(DIGEST_BLOCK);
        let ready: Vec<u64> = self
            .stale
            .range(blocks)
            .copied()
            .filter(|&i| held.contains(block_range(i, self.size)))
            .collect();
        for i in &ready {
            self.stale.remove(i);
        }
        ready
    }

    /// Reads block `index` back by `read` (the ranges of `zeros` hashed without reading) and
    /// records it.
    ///
    /// # Errors
    /// What `read` returns.
    pub fn read_back(
        &mut self,
        index: u64,
        zeros: &RangeSet,
        block: usize,
        read: &mut ReadBack<'_>,
    ) -> io::Result<()> {
        let digest = self.hash_block(index, zeros, block, read)?;
        self.complete(index, digest);
        Ok(())
    }

    /// The digest of block `index` as `read` reads it.
    ///
    /// # Errors
    /// What `read` returns.
    pub fn hash_block(
        &self,
        index: u64,
        zeros: &RangeSet,
        block: usize,
        read: &mut ReadBack<'_>,
    ) -> io::Result<Digest> {
        let range = block_range(index, self.size);
        hash_span(range.start, range.end, zeros, block, read)
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

#[cfg(test)]
mod block_tests {
    use super::*;
    use xfer_proto::ByteRange;

    fn bytes(n: usize) -> Vec<u8> {
        (0..n as u64)
            .map(|i| (i.wrapping_mul(7) % 251) as u8)
            .collect()
    }

    /// The block digest of `data`, computed by the definition: XXH3-128 over the big-endian
    /// XXH3-128 digests of its 1 MiB blocks.
    fn by_definition(data: &[u8]) -> Digest {
        let mut outer = Vec::new();
        for block in data.chunks(DIGEST_BLOCK as usize) {
            outer.extend_from_slice(&xxhash_rust::xxh3::xxh3_128(block).to_be_bytes());
        }
        xxhash_rust::xxh3::xxh3_128(&outer).to_be_bytes()
    }

    /// Writes `data` into a fresh [`Blocks`] in the pieces `pieces` (in that order), reading
    /// back from `data` what it asks for; returns the digest and the bytes read back.
    fn receive(data: &[u8], pieces: &[(usize, usize)]) -> (Option<Digest>, u64) {
        receive_holding(data, pieces, MAX_HELD_AHEAD)
    }

    /// [`receive`] into a [`Blocks`] that holds at most `max` bytes ahead.
    fn receive_holding(
        data: &[u8],
        pieces: &[(usize, usize)],
        max: usize,
    ) -> (Option<Digest>, u64) {
        let size = data.len() as u64;
        let mut blocks = Blocks::holding_ahead(size, max);
        let mut held = RangeSet::new();
        let mut read_back = 0u64;
        let mut read = |pos: u64, n: usize, sink: &mut dyn FnMut(&[u8])| {
            read_back += n as u64;
            sink(&data[pos as usize..pos as usize + n]);
            Ok(())
        };
        for &(s, e) in pieces {
            held.insert(ByteRange::new(s as u64, e as u64));
            let whole = WholeBlocks::of(size, s as u64, &data[s..e]);
            for index in blocks.feed(s as u64, &data[s..e], whole, &held) {
                blocks
                    .read_back(index, &RangeSet::new(), 1 << 16, &mut read)
                    .unwrap();
            }
            // What is counted as held is what is held, within the bound.
            let kept: usize = blocks
                .open
                .values()
                .flat_map(|open| open.ahead.values())
                .map(|held| held.0.len())
                .sum();
            assert_eq!(blocks.held_ahead, kept);
            assert!(kept <= max);
        }
        if blocks.digest().is_some() {
            assert_eq!(blocks.held_ahead, 0, "held past the last block");
        }
        (blocks.digest(), read_back)
    }

    #[test]
    fn the_block_digest_is_xxh3_over_the_blocks_digests_and_matches_digest_file() {
        let dir = tempfile::tempdir().unwrap();
        for len in [0, 1, 1 << 20, (1 << 20) + 1, 5 * (1 << 20) / 2] {
            let data = bytes(len);
            let path = dir.path().join(format!("f{len}"));
            std::fs::write(&path, &data).unwrap();
            let file = File::open(&path).unwrap();
            let got = digest_file_as(DigestKind::Blocks, &file, len as u64).unwrap();
            assert_eq!(got, by_definition(&data), "{len} bytes");
            // Not the sequential digest, except where nothing distinguishes them.
            if len > 0 {
                assert_ne!(got, digest_file(&file, len as u64).unwrap(), "{len} bytes");
            }
        }
        // The test vector of proto.md §2.4: 2.5 MiB of `i * 7 mod 251`.
        let vector = by_definition(&bytes(5 * (1 << 20) / 2));
        let hex: String = vector.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "3023e65111b533d966792b94d0ab49b9");
        // A sparse file's holes hash as the zeros they read as.
        let sparse = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("sparse"))
            .unwrap();
        sparse.set_len(8 << 20).unwrap();
        sparse.write_all_at(&bytes(4096), 3 << 20).unwrap();
        let mut dense = vec![0u8; 8 << 20];
        dense[3 << 20..(3 << 20) + 4096].copy_from_slice(&bytes(4096));
        assert_eq!(
            digest_file_as(DigestKind::Blocks, &sparse, 8 << 20).unwrap(),
            by_definition(&dense)
        );
    }

    #[test]
    fn blocks_combine_in_order_whatever_order_they_complete_in() {
        let data = bytes(7 * (1 << 20) + 12345);
        let mib = 1usize << 20;
        // Whole blocks, last first: each waits as its digest until the first arrives.
        let mut pieces: Vec<(usize, usize)> = (0..8)
            .map(|i| (i * mib, data.len().min((i + 1) * mib)))
            .collect();
        pieces.reverse();
        let (digest, read_back) = receive(&data, &pieces);
        assert_eq!(digest, Some(by_definition(&data)));
        assert_eq!(read_back, 0);
        let mut wrong = data.clone();
        wrong[3 * mib + 5] ^= 1;
        assert_ne!(receive(&wrong, &pieces).0, Some(by_definition(&data)));
    }

    #[test]
    fn writes_in_order_within_each_block_are_hashed_from_memory_in_any_order_across_blocks() {
        let data = bytes(6 * (1 << 20));
        // Chunks of 1.5 MiB (not aligned to blocks), from two interleaved writers: every block
        // sees its pieces in order, from one chunk or two consecutive ones.
        let chunk = 3 << 19;
        let mut pieces: Vec<(usize, usize)> = (0..data.len())
            .step_by(chunk)
            .map(|s| (s, data.len().min(s + chunk)))
            .collect();
        let odd: Vec<_> = pieces.iter().copied().skip(1).step_by(2).collect();
        let even: Vec<_> = pieces.iter().copied().step_by(2).collect();
        pieces = odd.into_iter().chain(even).collect();
        let (digest, read_back) = receive(&data, &pieces);
        assert_eq!(digest, Some(by_definition(&data)));
        // A block's second half came before its first: those blocks alone are read back.
        assert!(read_back <= 4 << 20, "{read_back}");
        let in_order: Vec<(usize, usize)> = (0..data.len())
            .step_by(chunk)
            .map(|s| (s, data.len().min(s + chunk)))
            .collect();
        assert_eq!(receive(&data, &in_order), (Some(by_definition(&data)), 0));
    }

    #[test]
    fn a_block_written_in_pieces_out_of_order_is_hashed_from_the_pieces_held_ahead() {
        let data = bytes(3 << 20);
        let mib = 1usize << 20;
        let k = 1024;
        // Block 1 in four pieces, the last two first (as a light file's delta fills a changed
        // span after the runs copied around it); blocks 0 and 2 whole.
        let pieces = [
            (mib + 700 * k, 2 * mib),
            (mib + 500 * k, mib + 700 * k),
            (0, mib),
            (mib, mib + 300 * k),
            (2 * mib, 3 * mib),
            (mib + 300 * k, mib + 500 * k),
        ];
        assert_eq!(receive(&data, &pieces), (Some(by_definition(&data)), 0));
        // Held pieces that overlap, or written again (a chunk sent twice), hash once.
        let mut again = pieces.to_vec();
        again.insert(1, (mib + 600 * k, 2 * mib));
        again.insert(1, (mib + 700 * k, 2 * mib));
        again.push((mib, 2 * mib));
        assert_eq!(receive(&data, &again), (Some(by_definition(&data)), 0));
        let mut wrong = data.clone();
        wrong[mib + 800 * k] ^= 1;
        assert_ne!(receive(&wrong, &pieces).0, Some(by_definition(&data)));
    }

    #[test]
    fn pieces_in_any_order_with_resends_and_any_bound_give_the_digest_by_definition() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |below: usize| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % below as u64) as usize
        };
        for seed in 1..=150u64 {
            let size = 1 + next(7 << 19);
            let data = crate::test_data::pseudo_random(size, seed);
            // Cut at random offsets, shuffled, some ranges written again (a chunk resent).
            let mut cuts: Vec<usize> = (0..1 + next(40)).map(|_| next(size)).collect();
            cuts.extend([0, size]);
            cuts.sort_unstable();
            cuts.dedup();
            let mut pieces: Vec<(usize, usize)> = cuts.windows(2).map(|w| (w[0], w[1])).collect();
            for i in (1..pieces.len()).rev() {
                pieces.swap(i, next(i + 1));
            }
            for _ in 0..next(6) {
                let at = next(pieces.len() + 1);
                // Anywhere, or from where a piece starts and further (held anew, longer).
                let from = match next(2) {
                    0 => next(size),
                    _ => pieces[next(pieces.len())].0,
                };
                pieces.insert(at, (from, from + 1 + next(size - from)));
            }
            let max = [0, 64 << 10, 1 << 20, MAX_HELD_AHEAD][next(4)];
            let (digest, _) = receive_holding(&data, &pieces, max);
            assert_eq!(
                digest,
                Some(by_definition(&data)),
                "seed {seed}, {size} bytes, bound {max}, pieces {pieces:?}"
            );
        }
    }

    #[test]
    fn a_block_whose_pieces_ahead_exceed_the_bound_is_read_back_once_when_complete() {
        let data = bytes(3 << 20);
        let mib = 1usize << 20;
        let k = 1024;
        let pieces = [
            (mib + 700 * k, 2 * mib),
            (0, mib),
            (mib, mib + 300 * k),
            (2 * mib, 3 * mib),
            (mib + 300 * k, mib + 700 * k),
        ];
        // 324 KiB ahead, 200 KiB allowed: block 1 is read back, once.
        let (digest, read_back) = receive_holding(&data, &pieces, 200 * k);
        assert_eq!(
            (digest, read_back),
            (Some(by_definition(&data)), mib as u64)
        );
        // Written again (a chunk sent twice) after it was read back: nothing changes.
        let mut again = pieces.to_vec();
        again.push((mib, 2 * mib));
        assert_eq!(
            receive_holding(&data, &again, 200 * k),
            (Some(by_definition(&data)), mib as u64)
        );
        // Within the bound, nothing is.
        assert_eq!(
            receive_holding(&data, &pieces, 324 * k),
            (Some(by_definition(&data)), 0)
        );
        // What was held goes back to the process once the block is done or given up.
        let mut blocks = Blocks::holding_ahead(data.len() as u64, 324 * k);
        let mut held = RangeSet::new();
        held.insert(ByteRange::new((mib + 700 * k) as u64, 2 * mib as u64));
        let piece = &data[mib + 700 * k..2 * mib];
        blocks.feed((mib + 700 * k) as u64, piece, WholeBlocks::default(), &held);
        assert_eq!(blocks.held_ahead, 324 * k);
        blocks.mark_stale(ByteRange::new(mib as u64, (mib + 1) as u64));
        assert_eq!(blocks.held_ahead, 0);
    }

    #[test]
    fn resumed_and_hole_blocks_are_read_back_and_the_hashers_are_bounded() {
        let size = (MAX_OPEN_BLOCKS as u64 + 3) * DIGEST_BLOCK;
        let mut blocks = Blocks::new(size);
        let mut held = RangeSet::new();
        // The first 1.5 MiB held from before (a resume): block 0 is read back at once, block 1
        // once the rest of it is written, though that rest arrives in order.
        let resumed = ByteRange::new(0, 3 << 19);
        held.insert(resumed);
        blocks.mark_stale(resumed);
        assert_eq!(
            blocks.stale_and_held(&held, ByteRange::new(0, size)),
            vec![0]
        );
        let tail = ByteRange::new(3 << 19, 2 << 20);
        held.insert(tail);
        let piece = vec![0u8; tail.len() as usize];
        assert_eq!(
            blocks.feed(tail.start, &piece, WholeBlocks::default(), &held),
            vec![1]
        );
        // Starting more blocks than the bound: the hashers stop at it, the rest go stale.
        for index in 2..size / DIGEST_BLOCK {
            let at = ByteRange::new(index * DIGEST_BLOCK, index * DIGEST_BLOCK + 10);
            held.insert(at);
            assert!(blocks
                .feed(at.start, &[0; 10], WholeBlocks::default(), &held)
                .is_empty());
        }
        assert_eq!(blocks.open.len(), MAX_OPEN_BLOCKS);
        assert_eq!(blocks.stale.len(), 1);
    }
}
