//! Delta transfer pieces both sides share: content-defined chunking (FastCDC) of a file in
//! regions cut in parallel, and the receiver's [`Basis`]: the file it already holds, matched
//! lazily, whose verified reads copy matching chunks into the new version.
//!
//! Chunk boundaries depend on content only, so data inserted or removed shifts the cut
//! points with it and every chunk after the change is found again; a region boundary is a
//! forced cut, costing at most a few chunks around it.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;

use bytes::Bytes;
use fastcdc::v2020::StreamCDC;
use xfer_proto::{ByteRange, FileIdentity, SigChunk};

use crate::buffers::BufferPool;
use crate::digest::{Blocks, Digest, DigestKind, Frontier, WholeBlocks};
use crate::direct::PAYLOAD_ALIGN;
use crate::RangeSet;

/// Smallest average chunk (below it signatures cost more than the finer matches save) and the
/// largest FastCDC allows.
pub use xfer_proto::{MAX_AVG_CHUNK, MIN_AVG_CHUNK};
/// Chunks a file is cut into on average, as a power of two: 2^20 keeps an index of a
/// 100 GiB file near a million entries.
pub const TARGET_CHUNKS_LOG2: u32 = 20;
/// Most chunks a [`Basis`] indexes (about 48 bytes each, so at most ~200 MiB); chunks past it
/// are not indexed and travel as literal data.
pub const MAX_INDEX_CHUNKS: usize = 1 << 22;
/// Smallest region cut on its own core.
pub const MIN_REGION: u64 = 64 * 1024 * 1024;
/// Most bytes copied from the basis by one read and one write.
pub const MAX_COPY: u64 = 4 * 1024 * 1024;
/// Copy buffers kept once written, shared by every [`Basis`] of the process and lent to the
/// reads of [`blocks_and_digest`] and [`blocks_of_region`]: a fresh buffer per copy costs a page
/// fault and a zeroed page per 4 KiB, measured at a fifth of the daemon's CPU in a delta, and a
/// third of it in a tree of light files, where each basis copies once. Enough for the copies a
/// few connections' `DeltaSig`s run at once; at most this many times [`MAX_COPY`] (and a page)
/// are held idle.
pub const SPARE_COPY_BUFFERS: usize = 8;

/// The copy buffers every [`Basis`] takes from (see [`SPARE_COPY_BUFFERS`]).
static COPY_BUFFERS: std::sync::LazyLock<BufferPool> =
    std::sync::LazyLock::new(|| BufferPool::new(SPARE_COPY_BUFFERS));

/// Frees the copy buffers every [`Basis`] shares (up to [`SPARE_COPY_BUFFERS`] times
/// [`MAX_COPY`]), so that a daemon gone quiet after deltas does not keep them resident.
pub fn drop_spare_copy_buffers() {
    COPY_BUFFERS.drop_spares();
}

/// The average chunk for a delta between files of at most `size` bytes: `size / 2^20`
/// rounded up to a power of two, within [`MIN_AVG_CHUNK`], [`MAX_AVG_CHUNK`].
pub fn avg_chunk(size: u64) -> u32 {
    let avg = (size >> TARGET_CHUNKS_LOG2).max(1).next_power_of_two();
    avg.clamp(u64::from(MIN_AVG_CHUNK), u64::from(MAX_AVG_CHUNK)) as u32
}

/// The regions of a file of `size` bytes cut independently, `parts` of them at most, none
/// shorter than [`MIN_REGION`] but the last.
pub fn regions(size: u64, parts: usize) -> Vec<ByteRange> {
    let parts = parts.max(1) as u64;
    let len = size.div_ceil(parts).max(MIN_REGION);
    (0..size.div_ceil(len).max(1))
        .map(|i| ByteRange::new(i * len, ((i + 1) * len).min(size)))
        .collect()
}

/// One content-defined chunk of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cut {
    /// Where it starts in the file.
    pub offset: u64,
    /// Its length.
    pub len: u32,
    /// XXH3-128 of its bytes.
    pub hash: u128,
}

impl Cut {
    /// The chunk as a `DeltaSig` carries it.
    pub fn sig(&self) -> SigChunk {
        SigChunk {
            len: self.len,
            hash: self.hash.to_be_bytes(),
        }
    }

    /// The bytes it covers.
    pub fn range(&self) -> ByteRange {
        ByteRange::new(self.offset, self.offset + u64::from(self.len))
    }
}

/// Positional reads of one region of a file, as a [`Read`].
struct RegionReader<'a> {
    file: &'a File,
    pos: u64,
    end: u64,
}

impl Read for RegionReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = (self.end - self.pos).min(buf.len() as u64) as usize;
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// Cuts `region` of `file` into chunks of `avg` bytes on average (¼ to 4×) and hands each to
/// `each` in file order; stops early when `each` returns false. Blocking.
///
/// # Errors
/// Read errors.
pub fn cut_region(
    file: &File,
    region: ByteRange,
    avg: u32,
    each: impl FnMut(Cut) -> bool,
) -> io::Result<()> {
    let reader = RegionReader {
        file,
        pos: region.start,
        end: region.end,
    };
    cut_reading(reader, region.start, avg, each).map(|_| ())
}

/// Cuts what `reader` reads, which starts at `start` of the file, as [`cut_region`] does.
/// Returns whether `each` took every chunk.
fn cut_reading(
    reader: impl Read,
    start: u64,
    avg: u32,
    mut each: impl FnMut(Cut) -> bool,
) -> io::Result<bool> {
    let avg = avg.clamp(MIN_AVG_CHUNK, MAX_AVG_CHUNK) as usize;
    for chunk in StreamCDC::new(reader, avg / 4, avg, avg * 4) {
        let chunk = chunk.map_err(|e| match e {
            fastcdc::v2020::Error::IoError(e) => e,
            other => io::Error::other(other.to_string()),
        })?;
        let cut = Cut {
            offset: start + chunk.offset,
            len: chunk.length as u32,
            hash: xxhash_rust::xxh3::xxh3_128(&chunk.data),
        };
        if !each(cut) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The digest of either kind of a file's bytes read front to back, kept by the same types
/// that keep it for bytes written in any order.
enum InOrder {
    Sequential(Box<Frontier>),
    Blocks(Box<Blocks>),
}

/// A [`Read`] that hands what it reads to a digest too.
struct Digesting<R> {
    inner: R,
    /// Bytes read so far, and the file's size.
    pos: u64,
    size: u64,
    digest: InOrder,
}

impl<'a> Digesting<RegionReader<'a>> {
    /// Reads the first `size` bytes of `file`, digesting them as `kind`.
    fn of(file: &'a File, size: u64, kind: DigestKind) -> Self {
        Self {
            inner: RegionReader {
                file,
                pos: 0,
                end: size,
            },
            pos: 0,
            size,
            digest: match kind {
                DigestKind::Sequential => InOrder::Sequential(Box::default()),
                DigestKind::Blocks => InOrder::Blocks(Box::new(Blocks::new(size))),
            },
        }
    }
}

impl<R> Digesting<R> {
    /// The digest of everything read, once all of it was, in order.
    fn digest(self) -> Digest {
        match self.digest {
            InOrder::Sequential(frontier) => frontier.digest(),
            InOrder::Blocks(blocks) => blocks
                .digest()
                .expect("every block of the file was read in order"),
        }
    }
}

impl<R: Read> Read for Digesting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let bytes = &buf[..n];
        match &mut self.digest {
            InOrder::Sequential(frontier) => frontier.feed(self.pos, bytes),
            InOrder::Blocks(blocks) => {
                let whole = WholeBlocks::of(self.size, self.pos, bytes);
                // In order from the first byte, no block is ever read back.
                let read_back = blocks.feed(self.pos, bytes, whole, &RangeSet::new());
                debug_assert!(read_back.is_empty());
            }
        }
        self.pos += n as u64;
        Ok(n)
    }
}

/// Cuts the first `size` bytes of `file` as [`cut_region`] does and takes their digest of
/// `kind` from the same reads (what [`crate::digest::digest_file_as`] gives a file without
/// holes): a tree's light file is read once for its signature and its commit, not twice.
/// `None` when `each` stopped the cut early. Blocking.
///
/// # Errors
/// Read errors, or a file shorter than `size`.
pub fn cut_and_digest(
    file: &File,
    size: u64,
    avg: u32,
    kind: DigestKind,
    each: impl FnMut(Cut) -> bool,
) -> io::Result<Option<Digest>> {
    let mut reader = Digesting::of(file, size, kind);
    if !cut_reading(&mut reader, 0, avg, each)? {
        return Ok(None);
    }
    if reader.pos < size {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(Some(reader.digest()))
}

/// Hashes the first `size` bytes of `file` in blocks of `len` bytes, as [`blocks_of_region`]
/// does for the whole file, and takes their digest of `kind` from the same reads, as
/// [`cut_and_digest`] does for a cut: a light file that kept its size, most likely changed in
/// place, is signed at the speed of hashing instead of that of a content-defined cut. `None`
/// when `each` stopped early. Blocking.
///
/// # Errors
/// Read errors, or a file shorter than `size`.
pub fn blocks_and_digest(
    file: &File,
    size: u64,
    len: u32,
    kind: DigestKind,
    mut each: impl FnMut(Cut) -> bool,
) -> io::Result<Option<Digest>> {
    let len = u64::from(len.max(1));
    let mut reader = Digesting::of(file, size, kind);
    let read_len = BLOCK_READ.div_ceil(len) * len;
    // A fresh buffer would fault in a zeroed page per 4 KiB read into it: as much CPU as
    // hashing the file (a tree's light files are read once each).
    let mut buf = COPY_BUFFERS.lend(read_len.min(size) as usize);
    let mut at = 0;
    while at < size {
        let want = (size - at).min(read_len) as usize;
        reader.read_exact(&mut buf[..want])?;
        for (i, block) in buf[..want].chunks(len as usize).enumerate() {
            let cut = Cut {
                offset: at + i as u64 * len,
                len: block.len() as u32,
                hash: xxhash_rust::xxh3::xxh3_128(block),
            };
            if !each(cut) {
                return Ok(None);
            }
        }
        at += want as u64;
    }
    Ok(Some(reader.digest()))
}

/// Bytes [`blocks_of_region`] reads at once (rounded up to whole blocks).
const BLOCK_READ: u64 = 4 * 1024 * 1024;

/// Hands `region` of `file` to `each` as consecutive blocks of `len` bytes at multiples of
/// `len` in the file (the first and last ones shorter where the region's edges fall between),
/// each with its XXH3-128, in file order; stops early when `each` returns false.
/// These are the chunks of a guess (`DeltaGuess`): hashing runs at several GB/s a core where
/// [`cut_region`]'s content-defined cut runs at about 1 GB/s, and a block that still lies where
/// it was needs no content-defined edge to be found. Blocking.
///
/// # Errors
/// Read errors.
pub fn blocks_of_region(
    file: &File,
    region: ByteRange,
    len: u32,
    mut each: impl FnMut(Cut) -> bool,
) -> io::Result<()> {
    let len = u64::from(len.max(1));
    let read_len = BLOCK_READ.div_ceil(len) * len;
    let mut buf = COPY_BUFFERS.lend(read_len.min(region.len()) as usize);
    let mut at = region.start;
    // Blocks on the file's grid of `len`: a match then lands at a page-aligned offset.
    let head = (len - at % len) % len;
    if head > 0 && at < region.end {
        let want = head.min(region.len()) as usize;
        let valid = read_up_to(file, &mut buf[..want], at)?;
        let cut = Cut {
            offset: at,
            len: valid as u32,
            hash: xxhash_rust::xxh3::xxh3_128(&buf[..valid]),
        };
        if valid < want || !each(cut) {
            return Ok(());
        }
        at += want as u64;
    }
    while at < region.end {
        let want = (region.end - at).min(read_len) as usize;
        let valid = read_up_to(file, &mut buf[..want], at)?;
        for (i, block) in buf[..valid].chunks(len as usize).enumerate() {
            let cut = Cut {
                offset: at + i as u64 * len,
                len: block.len() as u32,
                hash: xxhash_rust::xxh3::xxh3_128(block),
            };
            if !each(cut) {
                return Ok(());
            }
        }
        if valid < want {
            // The file ended early: it changed, which the sender's own checks report.
            break;
        }
        at += want as u64;
    }
    Ok(())
}

/// Where a chunk lies in the basis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Located {
    offset: u64,
    len: u32,
}

/// One chunk of the new file found in the basis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// Where it goes in the new file.
    pub new: u64,
    /// Where it lies in the basis.
    pub old: u64,
    /// Its length.
    pub len: u32,
    /// The hash the sender gave for it.
    pub hash: u128,
}

/// Misses in a row at the current shift before the basis is searched for them: a run of
/// changed bytes (rewritten in place) ends with a match at the same shift well before this
/// many chunks more often than not; data inserted or removed never does.
pub const LOOKUP_AFTER: usize = 4;
/// Least distance either side of where a missed chunk was expected that [`Basis`] cuts the
/// basis to search for it. The distance grows to [`REACH_PER_MISS`] times the bytes missed in a
/// row: an insertion of `n` bytes is found after cutting about `8n` bytes of the basis, a
/// removal of `n` bytes after `n / 4` bytes of the new file went as literal data, and an append
/// of `n` bytes cuts the last `3n` bytes of the basis in vain.
pub const MIN_WINDOW: u64 = 256 * 1024;
/// See [`MIN_WINDOW`].
pub const REACH_PER_MISS: u64 = 4;

/// The receiver's file (the *basis*) matched lazily: each chunk of the new file is first
/// checked where the previous match puts it (the same shift), by reading and hashing the basis
/// there; only chunks that miss several times in a row are searched for, in an index of the
/// basis cut around where they were expected. In place changes, insertions, removals and
/// appends thus read the basis about once, while the matching runs, instead of indexing it
/// whole before the first chunk is compared. Matching state follows the batches of one
/// upload in file order. Its index is bounded by [`MAX_INDEX_CHUNKS`].
#[derive(Debug)]
pub struct Basis {
    file: File,
    identity: FileIdentity,
    avg: u32,
    state: std::sync::Mutex<Lazy>,
    buffers: BufferPool,
}

/// What [`Basis`] learnt from the batches so far.
#[derive(Debug, Default)]
struct Lazy {
    /// Offset in the basis minus offset in the new file of the last match.
    shift: i64,
    /// Bytes missed in a row at `shift`.
    streak: u64,
    /// Misses of the current streak not yet searched for: (offset in the new file, chunk).
    pending: Vec<(u64, SigChunk)>,
    /// Parts of the basis cut into `map`.
    cut: RangeSet,
    map: HashMap<u128, Located>,
    /// Basis bytes read to check chunks at their shift, and cut to search for misses.
    probed: u64,
    searched: u64,
}

/// Where a run of matched bytes comes from before it is handed out: a slice of the current
/// read buffer, or bytes read for a chunk found by search.
enum Run {
    InBuffer { new: u64, from: usize, to: usize },
    Own { new: u64, old: u64, bytes: Bytes },
}

/// Where [`Basis`] looks for a chunk of the new file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lookup {
    /// Where the previous match puts it, then, after misses in a row, in the basis cut around.
    Search,
    /// Only where the previous match puts it.
    ShiftOnly,
}

/// The read buffer of [`Basis::copy_batch`]: basis bytes from `start`, `valid` of them read
/// into `buf` from `pad`, which puts them on a page boundary: a run matched at a page-aligned
/// offset of the new file (guessed blocks are) can then be written to the disk directly from
/// this buffer, around the page cache (`direct::DirectWriter`).
struct Window {
    start: u64,
    buf: Vec<u8>,
    pad: usize,
    valid: usize,
}

impl Window {
    fn bytes(&self, from: usize, to: usize) -> &[u8] {
        &self.buf[self.pad + from..self.pad + to]
    }
}

impl Basis {
    /// The basis `file`, to be matched against a new file cut with `avg`. Reads nothing.
    ///
    /// # Errors
    /// `fstat` errors.
    pub fn open(file: File, avg: u32) -> io::Result<Self> {
        Self::open_with(file, avg, COPY_BUFFERS.clone())
    }

    /// As [`Basis::open`], its copy buffers taken from `buffers`.
    fn open_with(file: File, avg: u32, buffers: BufferPool) -> io::Result<Self> {
        let (identity, _) = crate::source::identity_of(&file)?;
        Ok(Self {
            file,
            identity,
            avg,
            state: std::sync::Mutex::default(),
            buffers,
        })
    }

    /// The basis as it was when opened.
    pub fn identity(&self) -> FileIdentity {
        self.identity
    }

    /// The basis file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The average chunk both sides cut with.
    pub fn avg_chunk(&self) -> u32 {
        self.avg
    }

    /// Basis bytes read so far to check chunks where expected, and cut to search for misses.
    pub fn work(&self) -> (u64, u64) {
        let st = self.lock();
        (st.probed, st.searched)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lazy> {
        // A panic mid-batch leaves consistent-enough hints: every match is verified anyway.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Finds the chunks of a `DeltaSig` (the first at `offset`) the basis holds and hands each
    /// run of their bytes, verified against the sender's hashes, to `emit` as `(offset in the
    /// new file, bytes)`, in file order, runs at most [`MAX_COPY`] bytes (or one longer
    /// chunk). Stops early when `emit` returns false. A basis that changed since it was opened
    /// yields fewer bytes, never wrong ones. Blocking; batches of one upload go in file order.
    /// Returns the bytes of the basis it read (checked where expected, or cut to search).
    ///
    /// # Errors
    /// Read errors.
    pub fn copy_batch(
        &self,
        offset: u64,
        chunks: &[SigChunk],
        mut emit: impl FnMut(u64, Bytes) -> bool,
    ) -> io::Result<u64> {
        self.copy_found(offset, chunks, Lookup::Search, |new, _, bytes| {
            emit(new, bytes)
        })
    }

    /// As [`Basis::copy_batch`], each run handed out with where it lies in the basis:
    /// `(offset in the new file, offset in the basis, bytes)`.
    ///
    /// # Errors
    /// Read errors.
    pub fn copy_batch_located(
        &self,
        offset: u64,
        chunks: &[SigChunk],
        emit: impl FnMut(u64, u64, Bytes) -> bool,
    ) -> io::Result<u64> {
        self.copy_found(offset, chunks, Lookup::Search, emit)
    }

    /// As [`Basis::copy_batch`] for guessed chunks (a `DeltaGuess`: blocks the sender hashed
    /// without cutting by content): each is looked for only where the previous match puts it,
    /// never searched for, since no cut of the basis would hold it. A miss leaves the shift
    /// and the streak of misses as they were.
    ///
    /// # Errors
    /// Read errors.
    pub fn copy_guessed(
        &self,
        offset: u64,
        chunks: &[SigChunk],
        mut emit: impl FnMut(u64, Bytes) -> bool,
    ) -> io::Result<u64> {
        self.copy_found(offset, chunks, Lookup::ShiftOnly, |new, _, bytes| {
            emit(new, bytes)
        })
    }

    fn copy_found(
        &self,
        offset: u64,
        chunks: &[SigChunk],
        lookup: Lookup,
        mut emit: impl FnMut(u64, u64, Bytes) -> bool,
    ) -> io::Result<u64> {
        let mut st = self.lock();
        let work_before = st.probed + st.searched;
        let size = self.identity.size;
        let mut window: Option<Window> = None;
        let mut runs: Vec<Run> = Vec::new();
        let end = offset + chunks.iter().map(|c| u64::from(c.len)).sum::<u64>();
        let mut pos = offset;
        for chunk in chunks {
            let len = u64::from(chunk.len);
            let hash = u128::from_be_bytes(chunk.hash);
            let expected = pos as i64 + st.shift;
            let mut found = false;
            if expected >= 0 && expected as u64 + len <= size {
                let at = expected as u64;
                let covers = |w: &Window| at >= w.start && at + len <= w.start + w.valid as u64;
                if !window.as_ref().is_some_and(covers) {
                    if let Some(old) = window.take() {
                        if !self.hand_out(Some(old), &mut runs, &mut emit) {
                            return Ok(st.probed + st.searched - work_before);
                        }
                    }
                    // What is left of the batch at this shift, at most MAX_COPY at once with
                    // the page that aligns it.
                    let most = MAX_COPY - PAYLOAD_ALIGN as u64;
                    let want = (size - at).min((end - pos).min(most).max(len)) as usize;
                    let mut buf = self.buffers.take(want + PAYLOAD_ALIGN);
                    let pad = buf.as_ptr().align_offset(PAYLOAD_ALIGN);
                    let valid = read_up_to(&self.file, &mut buf[pad..pad + want], at)?;
                    st.probed += valid as u64;
                    window = Some(Window {
                        start: at,
                        buf,
                        pad,
                        valid,
                    });
                }
                let w = window.as_ref().filter(|w| covers(w));
                if let Some(w) = w {
                    let from = (at - w.start) as usize;
                    let to = from + len as usize;
                    if xxhash_rust::xxh3::xxh3_128(w.bytes(from, to)) == hash {
                        found = true;
                        match runs.last_mut() {
                            Some(Run::InBuffer {
                                new,
                                from: f,
                                to: t,
                            }) if *t == from && *new + (*t - *f) as u64 == pos => {
                                *t = to;
                            }
                            _ => runs.push(Run::InBuffer { new: pos, from, to }),
                        }
                    }
                }
            }
            if found {
                // What missed since the last match was changed in place: literal data.
                st.streak = 0;
                st.pending.clear();
            } else if lookup == Lookup::Search {
                st.streak += len;
                st.pending.push((pos, *chunk));
                if st.pending.len() >= LOOKUP_AFTER {
                    self.search(&mut st, &mut runs)?;
                }
            }
            pos += len;
        }
        // Misses at the end of a batch go as literal data, this batch's answer being final;
        // their streak goes on into the next batch, whose misses are searched for.
        st.pending.clear();
        let read = st.probed + st.searched - work_before;
        drop(st);
        self.hand_out(window, &mut runs, &mut emit);
        Ok(read)
    }

    /// Hands `runs` to `emit` in order, those in `window` as slices of its bytes; false when
    /// `emit` stopped.
    fn hand_out(
        &self,
        window: Option<Window>,
        runs: &mut Vec<Run>,
        emit: &mut impl FnMut(u64, u64, Bytes) -> bool,
    ) -> bool {
        let bytes = window.map(|w| (w.start, w.pad, self.buffers.bytes(w.buf)));
        for run in runs.drain(..) {
            let (new, old, bytes) = match run {
                Run::InBuffer { new, from, to } => match &bytes {
                    Some((start, pad, b)) => {
                        (new, start + from as u64, b.slice(pad + from..pad + to))
                    }
                    None => continue,
                },
                Run::Own { new, old, bytes } => (new, old, bytes),
            };
            if !emit(new, old, bytes) {
                return false;
            }
        }
        true
    }

    /// Reads `pieces` (each at most [`MAX_COPY`] bytes) from the basis and hands out those
    /// whose bytes still hash as given, as `(offset in the new file, bytes)`, at most
    /// [`MAX_COPY`] bytes read at once. Blocking.
    ///
    /// # Errors
    /// Read errors.
    pub fn copy_pieces(
        &self,
        pieces: &[Piece],
        mut emit: impl FnMut(u64, Bytes) -> bool,
    ) -> io::Result<u64> {
        let mut read = 0;
        let mut rest = pieces;
        while !rest.is_empty() {
            // A group of at most MAX_COPY bytes: what is held at once.
            let (mut n, mut bytes) = (0, 0);
            while n < rest.len() && (n == 0 || bytes + u64::from(rest[n].len) <= MAX_COPY) {
                bytes += u64::from(rest[n].len);
                n += 1;
            }
            let (group, tail) = rest.split_at(n);
            rest = tail;
            read += bytes;
            for (new, _, run) in read_verified(&self.file, &self.buffers, group)? {
                if !emit(new, run) {
                    return Ok(read);
                }
            }
        }
        Ok(read)
    }

    /// Searches the basis for the pending misses, cutting it around where each was expected
    /// (see [`MIN_WINDOW`]); found chunks are read, verified and queued on `runs`, and the last
    /// one found sets the shift the next chunks are checked at.
    fn search(&self, st: &mut Lazy, runs: &mut Vec<Run>) -> io::Result<()> {
        let size = self.identity.size;
        let reach = (REACH_PER_MISS * st.streak).max(MIN_WINDOW);
        let pending = std::mem::take(&mut st.pending);
        let mut pieces = Vec::new();
        for (new, chunk) in pending {
            let expected = new as i64 + st.shift;
            // Whole multiples of the least window, so that neighbouring searches share cuts.
            let lo = (expected - reach as i64).max(0) as u64 / MIN_WINDOW * MIN_WINDOW;
            let hi = (expected + reach as i64).max(0) as u64;
            let hi = hi.div_ceil(MIN_WINDOW).saturating_mul(MIN_WINDOW).min(size);
            self.cut_between(st, lo, hi)?;
            let hash = u128::from_be_bytes(chunk.hash);
            if let Some(at) = st.map.get(&hash).filter(|at| at.len == chunk.len) {
                pieces.push(Piece {
                    new,
                    old: at.offset,
                    len: chunk.len,
                    hash,
                });
            }
        }
        for (new, old, bytes) in read_verified(&self.file, &self.buffers, &pieces)? {
            runs.push(Run::Own { new, old, bytes });
        }
        if let Some(last) = pieces.last() {
            st.shift = last.old as i64 - last.new as i64;
            st.streak = 0;
        }
        Ok(())
    }

    /// Cuts the parts of the basis between `lo` and `hi` not cut yet into the index.
    fn cut_between(&self, st: &mut Lazy, lo: u64, hi: u64) -> io::Result<()> {
        if lo >= hi {
            return Ok(());
        }
        let mut gaps = Vec::new();
        let mut at = lo;
        for done in st.cut.iter() {
            if done.end <= at {
                continue;
            }
            if done.start >= hi {
                break;
            }
            if done.start > at {
                gaps.push(ByteRange::new(at, done.start));
            }
            at = done.end;
        }
        if at < hi {
            gaps.push(ByteRange::new(at, hi));
        }
        for gap in gaps {
            let map = &mut st.map;
            cut_region(&self.file, gap, self.avg, |c| {
                map.entry(c.hash).or_insert(Located {
                    offset: c.offset,
                    len: c.len,
                });
                map.len() < MAX_INDEX_CHUNKS
            })?;
            st.searched += gap.len();
            st.cut.insert(gap);
        }
        Ok(())
    }
}

/// Reads `pieces` from `file` and keeps the bytes whose hash still matches, as `(offset in the
/// new file, offset in the file, bytes)` runs of at most [`MAX_COPY`] bytes (or one longer piece), in buffers of
/// `buffers`. Pieces that follow each other in both files are read with one read. A file that
/// changed yields fewer bytes, never wrong ones. Blocking.
fn read_verified(
    file: &File,
    buffers: &BufferPool,
    pieces: &[Piece],
) -> io::Result<Vec<(u64, u64, Bytes)>> {
    let mut out: Vec<(u64, u64, Bytes)> = Vec::new();
    let mut rest = pieces;
    while let Some(first) = rest.first() {
        let mut len = u64::from(first.len);
        let mut n = 1;
        while let Some(next) = rest.get(n) {
            let joins = next.new == first.new + len
                && next.old == first.old + len
                && len + u64::from(next.len) <= MAX_COPY;
            if !joins {
                break;
            }
            len += u64::from(next.len);
            n += 1;
        }
        let (run, tail) = rest.split_at(n);
        rest = tail;
        let mut bytes = buffers.take(len as usize);
        let read = read_up_to(file, &mut bytes, first.old)?;
        // The pieces of the run whose bytes were read whole and still hash as the sender's.
        let good = |p: &Piece| {
            let at = (p.new - first.new) as usize;
            at + p.len as usize <= read
                && xxhash_rust::xxh3::xxh3_128(&bytes[at..at + p.len as usize]) == p.hash
        };
        let verdicts: Vec<bool> = run.iter().map(good).collect();
        let bytes = buffers.bytes(bytes);
        if verdicts.iter().all(|&ok| ok) {
            out.push((first.new, first.old, bytes));
            continue;
        }
        let mut k = 0;
        while k < run.len() {
            if !verdicts[k] {
                k += 1;
                continue;
            }
            let from = k;
            while k < run.len() && verdicts[k] {
                k += 1;
            }
            let at = (run[from].new - first.new) as usize;
            let to = (run[k - 1].new - first.new) as usize + run[k - 1].len as usize;
            out.push((run[from].new, run[from].old, bytes.slice(at..to)));
        }
    }
    Ok(out)
}

/// Reads into `buf` at `offset` until it is full or the file ends; the bytes read.
fn read_up_to(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_data::{file_with, pseudo_random};

    fn cuts(file: &File, size: u64, avg: u32) -> Vec<Cut> {
        let mut all = Vec::new();
        for region in regions(size, 4) {
            cut_region(file, region, avg, |c| {
                all.push(c);
                true
            })
            .unwrap();
        }
        all
    }

    /// Bytes of `new` the basis `old` supplies, in one batch.
    fn matched(old: &[u8], new: &[u8]) -> u64 {
        matched_lazily(old, new, usize::MAX).0
    }

    /// Bytes of `new` the basis `old` supplies lazily, fed in batches of `batch` chunks; the
    /// basis after, for its counters.
    fn matched_lazily(old: &[u8], new: &[u8], batch: usize) -> (u64, Basis) {
        let avg = MIN_AVG_CHUNK;
        let basis = Basis::open(file_with(old), avg).unwrap();
        let sig: Vec<Cut> = cuts(&file_with(new), new.len() as u64, avg);
        let mut found = 0;
        let mut last_end = 0;
        for group in sig.chunks(batch) {
            let chunks: Vec<SigChunk> = group.iter().map(Cut::sig).collect();
            let span = group[0].offset..group.last().unwrap().range().end;
            basis
                .copy_batch(group[0].offset, &chunks, |at, bytes| {
                    assert!(at >= last_end && at >= span.start, "out of order");
                    assert!(at + bytes.len() as u64 <= span.end);
                    assert_eq!(&new[at as usize..at as usize + bytes.len()], &bytes[..]);
                    last_end = at + bytes.len() as u64;
                    found += bytes.len() as u64;
                    true
                })
                .unwrap();
        }
        (found, basis)
    }

    #[test]
    fn lazily_an_in_place_change_costs_the_chunks_around_it_and_no_search_of_the_rest() {
        let old = pseudo_random(8 << 20, 2);
        let mut new = old.clone();
        for at in [500_000, 3_000_000, 6_100_000] {
            new[at..at + 100].fill(0xaa);
        }
        let (found, basis) = matched_lazily(&old, &new, 64);
        assert!(found >= new.len() as u64 - 3 * 5 * 64 * 1024, "{found}");
        assert!(found < new.len() as u64);
        let (probed, searched) = basis.work();
        assert!(probed <= new.len() as u64 + 3 * MAX_COPY, "{probed}");
        assert_eq!(
            searched, 0,
            "a run of misses ended by a match is not searched for"
        );
    }

    #[test]
    fn lazily_an_insertion_is_found_by_cutting_only_around_it() {
        let old = pseudo_random(16 << 20, 3);
        let mut new = old[..100_000].to_vec();
        new.extend(pseudo_random(300_000, 99));
        new.extend(&old[100_000..]);
        let (found, basis) = matched_lazily(&old, &new, 64);
        assert!(found >= old.len() as u64 - 8 * 64 * 1024, "{found}");
        let (_, searched) = basis.work();
        assert!(searched > 0 && searched <= 4 << 20, "{searched}");
    }

    #[test]
    fn lazily_a_removal_a_truncation_and_an_append_are_found() {
        let old = pseudo_random(8 << 20, 4);
        let mut new = old[..300_000].to_vec();
        new.extend(&old[1_300_000..7_000_000]);
        let (found, _) = matched_lazily(&old, &new, 64);
        // A quarter of what was removed goes as literal data before the search reaches it.
        let lost = 1_000_000 / REACH_PER_MISS + 6 * 64 * 1024;
        assert!(found >= new.len() as u64 - lost, "{found}");

        let mut grown = old.clone();
        grown.extend(pseudo_random(1 << 20, 8));
        let (found, basis) = matched_lazily(&old, &grown, 64);
        assert!(found >= old.len() as u64 - 4 * 64 * 1024, "{found}");
        assert!(basis.work().1 <= 4 << 20, "{:?}", basis.work());

        let (found, _) = matched_lazily(&old, &old[..5_000_000], 64);
        assert!(found >= 5_000_000 - 64 * 1024, "{found}");
    }

    #[test]
    fn lazily_a_basis_changed_after_opening_yields_no_wrong_bytes() {
        let old = pseudo_random(4 << 20, 5);
        let f = file_with(&old);
        let basis = Basis::open(f.try_clone().unwrap(), MIN_AVG_CHUNK).unwrap();
        f.write_all_at(&pseudo_random(1 << 20, 6), 1 << 20).unwrap();
        let sig: Vec<SigChunk> = cuts(&file_with(&old), old.len() as u64, MIN_AVG_CHUNK)
            .iter()
            .map(Cut::sig)
            .collect();
        let mut found = 0;
        basis
            .copy_batch(0, &sig, |at, bytes| {
                assert_eq!(&old[at as usize..at as usize + bytes.len()], &bytes[..]);
                found += bytes.len() as u64;
                true
            })
            .unwrap();
        assert!(
            found < old.len() as u64 - (1 << 20) + 2 * 64 * 1024,
            "{found}"
        );
        assert!(found > 2 << 20, "{found}");
    }

    #[test]
    fn blocks_cover_a_region_in_blocks_of_the_length_given() {
        let data = pseudo_random((1 << 20) + 1000, 9);
        let f = file_with(&data);
        let region = ByteRange::new(5, data.len() as u64);
        let mut all = Vec::new();
        blocks_of_region(&f, region, 1 << 14, |c| {
            all.push(c);
            true
        })
        .unwrap();
        assert_eq!(all.len(), 65);
        assert!(all.windows(2).all(|w| w[0].range().end == w[1].offset));
        assert_eq!((all[0].offset, all[0].len), (5, (1 << 14) - 5));
        assert!(all[1..64].iter().all(|c| c.len == 1 << 14));
        assert!(all[1..].iter().all(|c| c.offset % (1 << 14) == 0));
        assert_eq!(all[64].range().end, data.len() as u64);
        for c in &all {
            let bytes = &data[c.offset as usize..c.range().end as usize];
            assert_eq!(c.hash, xxhash_rust::xxh3::xxh3_128(bytes));
        }
    }

    /// Bytes of `new`, hashed in blocks, that a guess finds in `old` at the shift it starts
    /// with, and the basis after (for its counters).
    fn guessed(old: &[u8], new: &[u8]) -> (u64, Basis) {
        let basis = Basis::open(file_with(old), MIN_AVG_CHUNK).unwrap();
        let mut blocks = Vec::new();
        let region = ByteRange::new(0, new.len() as u64);
        blocks_of_region(&file_with(new), region, MIN_AVG_CHUNK, |c| {
            blocks.push(c.sig());
            true
        })
        .unwrap();
        let mut found = 0;
        basis
            .copy_guessed(0, &blocks, |at, bytes| {
                assert_eq!(&new[at as usize..at as usize + bytes.len()], &bytes[..]);
                // Blocks lie on the grid: their runs can go to the disk directly.
                assert_eq!(at % PAYLOAD_ALIGN as u64, 0);
                assert_eq!(bytes.as_ptr() as usize % PAYLOAD_ALIGN, 0);
                found += bytes.len() as u64;
                true
            })
            .unwrap();
        (found, basis)
    }

    #[test]
    fn a_guess_finds_what_stayed_in_place_and_never_searches() {
        let old = pseudo_random(4 << 20, 10);
        let mut new = old.clone();
        new[1_000_000..1_000_100].fill(0xaa);
        let (found, basis) = guessed(&old, &new);
        assert_eq!(found, new.len() as u64 - u64::from(MIN_AVG_CHUNK));
        // Everything after an insertion moved: a guess misses it, and does not search.
        let mut shifted = old[..1_000_000].to_vec();
        shifted.extend(pseudo_random(777, 11));
        shifted.extend(&old[1_000_000..]);
        let (found, basis_shifted) = guessed(&old, &shifted);
        assert!(found <= 1_000_000, "{found}");
        assert_eq!(basis.work().1, 0);
        assert_eq!(basis_shifted.work().1, 0, "a guess never cuts the basis");
    }

    #[test]
    fn a_guess_follows_the_shift_a_search_found() {
        let old = pseudo_random(4 << 20, 12);
        let mut new = pseudo_random(300_000, 13);
        new.extend(&old);
        let basis = Basis::open(file_with(&old), MIN_AVG_CHUNK).unwrap();
        // The first megabyte cut by content and searched for: the match sets the shift.
        let mut sig = Vec::new();
        cut_region(
            &file_with(&new),
            ByteRange::new(0, 1 << 20),
            MIN_AVG_CHUNK,
            |c| {
                sig.push(c.sig());
                true
            },
        )
        .unwrap();
        basis.copy_batch(0, &sig, |_, _| true).unwrap();
        let mut blocks = Vec::new();
        let rest = ByteRange::new(1 << 20, new.len() as u64);
        blocks_of_region(&file_with(&new), rest, MIN_AVG_CHUNK, |c| {
            blocks.push(c.sig());
            true
        })
        .unwrap();
        let mut found = 0;
        basis
            .copy_guessed(rest.start, &blocks, |at, bytes| {
                assert_eq!(&new[at as usize..at as usize + bytes.len()], &bytes[..]);
                found += bytes.len() as u64;
                true
            })
            .unwrap();
        assert_eq!(found, rest.len());
    }

    #[test]
    fn the_average_chunk_scales_with_the_file() {
        assert_eq!(avg_chunk(0), MIN_AVG_CHUNK);
        assert_eq!(avg_chunk(2 << 30), MIN_AVG_CHUNK);
        assert_eq!(avg_chunk(100 << 30), 128 * 1024);
        assert_eq!(avg_chunk(u64::MAX), MAX_AVG_CHUNK);
    }

    #[test]
    fn regions_cover_the_file_once() {
        assert_eq!(regions(0, 4), vec![ByteRange::new(0, 0)]);
        assert_eq!(regions(10, 4), vec![ByteRange::new(0, 10)]);
        let r = regions(1 << 30, 2);
        assert_eq!(
            r,
            vec![ByteRange::new(0, 1 << 29), ByteRange::new(1 << 29, 1 << 30)]
        );
        let r = regions((300 << 20) + 1, 8);
        assert_eq!(r.first().unwrap().start, 0);
        assert_eq!(r.last().unwrap().end, (300 << 20) + 1);
        assert!(r.windows(2).all(|w| w[0].end == w[1].start));
    }

    #[test]
    fn cuts_cover_a_region_and_stay_within_four_times_the_average() {
        let data = pseudo_random(1 << 20, 7);
        let f = file_with(&data);
        let all = cuts(&f, data.len() as u64, MIN_AVG_CHUNK);
        assert_eq!(all.first().unwrap().offset, 0);
        assert!(all.windows(2).all(|w| w[0].range().end == w[1].offset));
        assert_eq!(all.last().unwrap().range().end, data.len() as u64);
        assert!(all.iter().all(|c| c.len <= 4 * MIN_AVG_CHUNK));
        assert!(all.len() > 16, "{} chunks", all.len());
    }

    #[test]
    fn an_unchanged_file_is_found_whole() {
        let data = pseudo_random(1 << 20, 1);
        assert_eq!(matched(&data, &data), data.len() as u64);
    }

    #[test]
    fn an_in_place_change_costs_only_the_chunks_around_it() {
        let old = pseudo_random(1 << 20, 2);
        let mut new = old.clone();
        new[500_000..500_100].fill(0xaa);
        let found = matched(&old, &new);
        assert!(found >= new.len() as u64 - 5 * 64 * 1024, "{found}");
        assert!(found < new.len() as u64);
    }

    #[test]
    fn an_insertion_shifts_the_rest_and_it_is_still_found() {
        let old = pseudo_random(1 << 20, 3);
        let mut new = old[..1000].to_vec();
        new.extend(pseudo_random(7777, 99));
        new.extend(&old[1000..]);
        let found = matched(&old, &new);
        assert!(found >= old.len() as u64 - 3 * 64 * 1024, "{found}");
    }

    #[test]
    fn a_removal_and_a_truncation_are_found() {
        let old = pseudo_random(1 << 20, 4);
        let mut new = old[..300_000].to_vec();
        new.extend(&old[310_000..700_000]);
        let found = matched(&old, &new);
        assert!(found >= new.len() as u64 - 6 * 64 * 1024, "{found}");
    }

    #[test]
    fn copy_buffers_are_reused_once_written_by_the_next_basis_too() {
        let data = pseudo_random(1 << 20, 6);
        // A pool of the test's own: other tests take from the process's at the same time.
        let pool = BufferPool::new(SPARE_COPY_BUFFERS);
        let basis = Basis::open_with(file_with(&data), MIN_AVG_CHUNK, pool.clone()).unwrap();
        let sig: Vec<SigChunk> = cuts(&file_with(&data), data.len() as u64, MIN_AVG_CHUNK)
            .iter()
            .map(Cut::sig)
            .collect();
        let mut first = Vec::new();
        basis
            .copy_batch(0, &sig, |_, bytes| {
                first.push(bytes);
                true
            })
            .unwrap();
        assert_eq!(first.len(), 1, "one run: the whole file matched in order");
        let addr = first[0].as_ptr();
        assert_eq!(basis.buffers.spares(), 0);
        drop(first);
        // Counted, not only compared by address: a fresh allocation may land where the freed
        // one was.
        assert_eq!(basis.buffers.spares(), 1);
        // A tree's light files each open a basis of their own and copy once from it.
        drop(basis);
        let basis = Basis::open_with(file_with(&data), MIN_AVG_CHUNK, pool).unwrap();
        let mut again = Vec::new();
        basis
            .copy_batch(0, &sig, |_, bytes| {
                again.push(bytes);
                true
            })
            .unwrap();
        assert_eq!(basis.buffers.spares(), 0);
        assert_eq!(again[0].as_ptr(), addr);
        assert_eq!(&again[0][..], &data[..again[0].len()]);
    }

    #[test]
    fn a_cut_with_its_digest_reads_once_what_a_cut_and_a_digest_read_twice() {
        let block = crate::digest::DIGEST_BLOCK as usize;
        for len in [0, 1000, block, 2 * block + 12_345] {
            let data = pseudo_random(len, 8);
            let file = file_with(&data);
            for kind in [DigestKind::Sequential, DigestKind::Blocks] {
                let mut cut = Vec::new();
                let digest = cut_and_digest(&file, len as u64, MIN_AVG_CHUNK, kind, |c| {
                    cut.push(c);
                    true
                })
                .unwrap();
                let want = crate::digest::digest_file_as(kind, &file, len as u64).unwrap();
                assert_eq!(digest, Some(want), "{len} {kind:?}");
                assert_eq!(cut, cuts(&file, len as u64, MIN_AVG_CHUNK), "{len}");
            }
        }
        let short = file_with(&pseudo_random(1000, 9));
        let read = cut_and_digest(&short, 2000, MIN_AVG_CHUNK, DigestKind::Blocks, |_| true);
        assert_eq!(read.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn blocks_with_their_digest_are_the_blocks_and_the_digest_read_apart() {
        let block = crate::digest::DIGEST_BLOCK as usize;
        for len in [0, 1000, block, 2 * block + 12_345, 5 * block] {
            let data = pseudo_random(len, 10);
            let file = file_with(&data);
            let mut apart = Vec::new();
            let region = ByteRange::new(0, len as u64);
            blocks_of_region(&file, region, MIN_AVG_CHUNK, |c| {
                apart.push(c);
                true
            })
            .unwrap();
            for kind in [DigestKind::Sequential, DigestKind::Blocks] {
                let mut blocks = Vec::new();
                let digest = blocks_and_digest(&file, len as u64, MIN_AVG_CHUNK, kind, |c| {
                    blocks.push(c);
                    true
                })
                .unwrap();
                let want = crate::digest::digest_file_as(kind, &file, len as u64).unwrap();
                assert_eq!(digest, Some(want), "{len} {kind:?}");
                assert_eq!(blocks, apart, "{len}");
            }
        }
        let short = file_with(&pseudo_random(1000, 11));
        let read = blocks_and_digest(&short, 2000, MIN_AVG_CHUNK, DigestKind::Blocks, |_| true);
        assert_eq!(read.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        let stopped = blocks_and_digest(
            &file_with(&pseudo_random(1 << 20, 12)),
            1 << 20,
            4096,
            DigestKind::Blocks,
            |c| c.offset < 8192,
        );
        assert_eq!(stopped.unwrap(), None);
    }

    #[test]
    fn every_basis_takes_its_copy_buffers_from_one_pool() {
        let data = pseudo_random(4096, 7);
        let a = Basis::open(file_with(&data), MIN_AVG_CHUNK).unwrap();
        let b = Basis::open(file_with(&data), MIN_AVG_CHUNK).unwrap();
        assert!(a.buffers.same_pool(&b.buffers));
    }
}
