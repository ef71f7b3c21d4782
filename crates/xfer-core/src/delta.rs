//! Delta transfer pieces both sides share: content-defined chunking (FastCDC) of a file in
//! regions cut in parallel, the receiver's [`Index`] of the file it already holds, and the
//! verified reads that copy matching chunks from it into the new version.
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

/// Smallest average chunk (below it signatures cost more than the finer matches save) and the
/// largest FastCDC allows.
pub use xfer_proto::{MAX_AVG_CHUNK, MIN_AVG_CHUNK};
/// Chunks a file is cut into on average, as a power of two: 2^20 keeps an index of a
/// 100 GiB file near a million entries.
pub const TARGET_CHUNKS_LOG2: u32 = 20;
/// Most chunks an [`Index`] keeps (about 48 bytes each, so at most ~200 MiB); chunks past it
/// are not indexed and travel as literal data.
pub const MAX_INDEX_CHUNKS: usize = 1 << 22;
/// Smallest region cut on its own core.
pub const MIN_REGION: u64 = 64 * 1024 * 1024;
/// Most bytes copied from the basis by one read and one write.
pub const MAX_COPY: u64 = 4 * 1024 * 1024;
/// Copy buffers an [`Index`] keeps once written: a fresh buffer per copy costs a page fault and
/// a zeroed page per 4 KiB, measured at a fifth of the daemon's CPU in a delta. Enough for the
/// copies one `DeltaSig` runs at once.
pub const SPARE_COPY_BUFFERS: usize = 4;

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

/// The cores to cut on.
pub fn parallelism() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
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
    mut each: impl FnMut(Cut) -> bool,
) -> io::Result<()> {
    let avg = avg.clamp(MIN_AVG_CHUNK, MAX_AVG_CHUNK) as usize;
    let reader = RegionReader {
        file,
        pos: region.start,
        end: region.end,
    };
    for chunk in StreamCDC::new(reader, avg / 4, avg, avg * 4) {
        let chunk = chunk.map_err(|e| match e {
            fastcdc::v2020::Error::IoError(e) => e,
            other => io::Error::other(other.to_string()),
        })?;
        let cut = Cut {
            offset: region.start + chunk.offset,
            len: chunk.length as u32,
            hash: xxhash_rust::xxh3::xxh3_128(&chunk.data),
        };
        if !each(cut) {
            break;
        }
    }
    Ok(())
}

/// Where a chunk lies in the basis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Located {
    offset: u64,
    len: u32,
}

/// The receiver's index of the file it holds (the *basis*): chunk hash to where the chunk
/// lies. Bounded by [`MAX_INDEX_CHUNKS`].
#[derive(Debug)]
pub struct Index {
    file: File,
    identity: FileIdentity,
    avg: u32,
    map: HashMap<u128, Located>,
    buffers: BufferPool,
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

impl Index {
    /// Indexes `file` cut with `avg`, its regions on up to `parts` threads. Blocking.
    ///
    /// # Errors
    /// Read errors.
    pub fn build(file: File, avg: u32, parts: usize) -> io::Result<Self> {
        let (identity, _) = crate::source::identity_of(&file)?;
        let regions = regions(identity.size, parts);
        let cut: Vec<io::Result<Vec<Cut>>> = std::thread::scope(|scope| {
            let file = &file;
            let tasks: Vec<_> = regions
                .iter()
                .map(|&region| {
                    scope.spawn(move || {
                        let mut cuts = Vec::new();
                        cut_region(file, region, avg, |cut| {
                            cuts.push(cut);
                            cuts.len() < MAX_INDEX_CHUNKS
                        })
                        .map(|()| cuts)
                    })
                })
                .collect();
            tasks
                .into_iter()
                .map(|t| t.join().unwrap_or_else(|_| Err(io::Error::other("panic"))))
                .collect()
        });
        let mut map = HashMap::new();
        for cuts in cut {
            for c in cuts? {
                if map.len() >= MAX_INDEX_CHUNKS {
                    break;
                }
                map.entry(c.hash).or_insert(Located {
                    offset: c.offset,
                    len: c.len,
                });
            }
        }
        Ok(Self {
            file,
            identity,
            avg,
            map,
            buffers: BufferPool::new(SPARE_COPY_BUFFERS),
        })
    }

    /// The basis as it was when indexed.
    pub fn identity(&self) -> FileIdentity {
        self.identity
    }

    /// The average chunk it was cut with.
    pub fn avg_chunk(&self) -> u32 {
        self.avg
    }

    /// Chunks indexed.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when nothing is indexed (an empty basis).
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The chunks of a `DeltaSig` (the first at `offset`) the basis holds, in file order.
    pub fn find(&self, offset: u64, chunks: &[SigChunk]) -> Vec<Piece> {
        let mut pos = offset;
        let mut found = Vec::new();
        for chunk in chunks {
            let hash = u128::from_be_bytes(chunk.hash);
            if let Some(at) = self.map.get(&hash).filter(|at| at.len == chunk.len) {
                found.push(Piece {
                    new: pos,
                    old: at.offset,
                    len: chunk.len,
                    hash,
                });
            }
            pos += u64::from(chunk.len);
        }
        found
    }

    /// Reads `pieces` from the basis and keeps the bytes whose hash still matches, as
    /// `(offset in the new file, bytes)` runs of at most [`MAX_COPY`] bytes (or one longer
    /// piece), in buffers handed back to the index once dropped. Pieces that follow each other
    /// in both files are read with one read. A basis that changed since it was indexed yields
    /// fewer bytes, never wrong ones. Blocking.
    ///
    /// # Errors
    /// Read errors.
    pub fn read_verified(&self, pieces: &[Piece]) -> io::Result<Vec<(u64, Bytes)>> {
        let mut out: Vec<(u64, Bytes)> = Vec::new();
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
            let mut bytes = self.buffers.take(len as usize);
            let read = read_up_to(&self.file, &mut bytes, first.old)?;
            // The pieces of the run whose bytes were read whole and still hash as the sender's.
            let good = |p: &Piece| {
                let at = (p.new - first.new) as usize;
                at + p.len as usize <= read
                    && xxhash_rust::xxh3::xxh3_128(&bytes[at..at + p.len as usize]) == p.hash
            };
            let verdicts: Vec<bool> = run.iter().map(good).collect();
            let bytes = self.buffers.bytes(bytes);
            if verdicts.iter().all(|&ok| ok) {
                out.push((first.new, bytes));
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
                out.push((run[from].new, bytes.slice(at..to)));
            }
        }
        Ok(out)
    }
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

/// `pieces` in groups of at most [`MAX_COPY`] bytes (a longer piece alone),
/// so what is read at once stays bounded.
pub fn groups(pieces: &[Piece]) -> impl Iterator<Item = &[Piece]> {
    let mut rest = pieces;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut total = 0;
        let mut n = 0;
        while n < rest.len() && (n == 0 || total + u64::from(rest[n].len) <= MAX_COPY) {
            total += u64::from(rest[n].len);
            n += 1;
        }
        let (group, tail) = rest.split_at(n);
        rest = tail;
        Some(group)
    })
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn file_with(content: &[u8]) -> File {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(content).unwrap();
        f
    }

    fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

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

    /// Bytes of `new` the basis `old` supplies through the index.
    fn matched(old: &[u8], new: &[u8]) -> u64 {
        let avg = MIN_AVG_CHUNK;
        let index = Index::build(file_with(old), avg, 4).unwrap();
        let new_file = file_with(new);
        let sig: Vec<SigChunk> = cuts(&new_file, new.len() as u64, avg)
            .iter()
            .map(Cut::sig)
            .collect();
        let pieces = index.find(0, &sig);
        let runs = index.read_verified(&pieces).unwrap();
        for (at, bytes) in &runs {
            assert_eq!(&new[*at as usize..*at as usize + bytes.len()], &bytes[..]);
        }
        runs.iter().map(|(_, b)| b.len() as u64).sum()
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
    fn copy_buffers_are_reused_once_written() {
        let data = pseudo_random(1 << 20, 6);
        let index = Index::build(file_with(&data), MIN_AVG_CHUNK, 1).unwrap();
        let sig: Vec<SigChunk> = cuts(&file_with(&data), data.len() as u64, MIN_AVG_CHUNK)
            .iter()
            .map(Cut::sig)
            .collect();
        let pieces = index.find(0, &sig);
        let first = index.read_verified(&pieces).unwrap();
        assert_eq!(first.len(), 1, "one run: the whole file matched in order");
        let addr = first[0].1.as_ptr();
        assert_eq!(index.buffers.spares(), 0);
        drop(first);
        // Counted, not only compared by address: a fresh allocation may land where the freed
        // one was.
        assert_eq!(index.buffers.spares(), 1);
        let again = index.read_verified(&pieces).unwrap();
        assert_eq!(index.buffers.spares(), 0);
        assert_eq!(again[0].1.as_ptr(), addr);
        assert_eq!(&again[0].1[..], &data[..again[0].1.len()]);
    }

    #[test]
    fn a_basis_changed_after_indexing_yields_no_wrong_bytes() {
        let old = pseudo_random(1 << 20, 5);
        let mut f = file_with(&old);
        let index = Index::build(f.try_clone().unwrap(), MIN_AVG_CHUNK, 2).unwrap();
        let new_file = file_with(&old);
        let sig: Vec<SigChunk> = cuts(&new_file, old.len() as u64, MIN_AVG_CHUNK)
            .iter()
            .map(Cut::sig)
            .collect();
        f.write_all_at(&[0x55; 4096], 200_000).unwrap();
        f.flush().unwrap();
        let runs = index.read_verified(&index.find(0, &sig)).unwrap();
        let found: u64 = runs.iter().map(|(_, b)| b.len() as u64).sum();
        assert!(found < old.len() as u64);
        for (at, bytes) in &runs {
            assert_eq!(&old[*at as usize..*at as usize + bytes.len()], &bytes[..]);
            assert!(bytes.len() as u64 <= MAX_COPY);
        }
    }
}
