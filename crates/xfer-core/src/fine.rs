//! Finer matching inside the spans a light file's content-defined chunks missed
//! (`CAP_DELTA_FINE`): the receiver sums the basis bytes each span most likely replaces in small
//! fixed blocks (rsync's weak and strong sums), and the sender finds those blocks at any offset
//! within the span, so that a small change costs about its own bytes as data instead of the
//! whole chunks around it.

use std::collections::HashMap;
use std::fs::File;
use std::io;

use xfer_proto::{
    fine_block_count, fine_blocks, BlockSum, ByteRange, FineCopy, FineGap, MAX_FINE_BLOCK,
    MAX_FINE_GAP, MAX_FINE_SUMS, MIN_FINE_BLOCK,
};

use crate::RangeSet;

/// The block a receiver sums in first: an 8 KiB change then costs about 9 KiB of data, and
/// the sums of the 16 KiB chunks around it a few hundred bytes.
pub const FINE_BLOCK: u32 = 1024;
/// The average chunk a light file's signature is cut with where blocks are matched within the
/// spans it misses: a 2 MB file's signature is 32 chunks (640 bytes) instead of 128, so that a
/// connection's first flight of signatures fits TCP's initial window, and the data a change costs
/// stays about its own bytes.
pub const LIGHT_AVG_CHUNK: u32 = 64 * 1024;
/// How much longer than its span of the new file a gap's basis bytes may be (and 64 KiB more):
/// the old bytes around a change in place are as long as the new ones.
const OLD_PER_NEW: u64 = 2;
const OLD_SLACK: u64 = 64 * 1024;
/// Most basis bytes a gap of [`plan`] sums, which [`block_sums`] holds at once.
pub const MAX_OLD_LEN: u64 = MAX_FINE_GAP * OLD_PER_NEW + OLD_SLACK;

/// The weak sum of proto.md §5.14 over `block`: `a` the sum of its bytes, `b` the sum of each
/// byte times its distance from the block's end, both modulo 2^16; `a | b << 16`.
pub fn weak_sum(block: &[u8]) -> u32 {
    let (mut a, mut b) = (0u32, 0u32);
    let n = block.len() as u32;
    for (i, &x) in block.iter().enumerate() {
        a = a.wrapping_add(u32::from(x));
        b = b.wrapping_add((n - i as u32).wrapping_mul(u32::from(x)));
    }
    (a & 0xffff) | (b & 0xffff) << 16
}

/// The sums of one block.
pub fn block_sum(block: &[u8]) -> BlockSum {
    BlockSum {
        weak: weak_sum(block),
        strong: xxhash_rust::xxh3::xxh3_64(block),
    }
}

/// The weak sum of a window of `len` bytes, moved a byte at a time.
struct Rolling {
    a: u32,
    b: u32,
    len: u32,
}

impl Rolling {
    fn new(window: &[u8]) -> Self {
        let sum = weak_sum(window);
        Self {
            a: sum & 0xffff,
            b: sum >> 16,
            len: window.len() as u32,
        }
    }

    /// Moves the window on by one byte: `out` leaves it, `into` enters.
    fn roll(&mut self, out: u8, into: u8) {
        self.a = self
            .a
            .wrapping_sub(u32::from(out))
            .wrapping_add(u32::from(into));
        self.b = self
            .b
            .wrapping_sub(self.len.wrapping_mul(u32::from(out)))
            .wrapping_add(self.a);
    }

    fn sum(&self) -> u32 {
        (self.a & 0xffff) | (self.b & 0xffff) << 16
    }
}

/// The receiver's plan: for each span of the new file of `new_size` bytes that `covered` (the
/// bytes matched or already held) leaves, the basis bytes it most likely replaces, found from
/// the shift of the matched runs either side (`located`: each run's span in the new file and
/// where it starts in the basis, sorted). Spans longer than [`MAX_FINE_GAP`] go in pieces, and
/// the block doubles from [`FINE_BLOCK`] until the sums fit [`MAX_FINE_SUMS`]; gaps past that
/// are left out too. Returns the block length and the gaps.
pub fn plan(
    new_size: u64,
    basis_size: u64,
    covered: &RangeSet,
    located: &[(ByteRange, u64)],
) -> (u32, Vec<FineGap>) {
    let shift = |run: &(ByteRange, u64)| run.1 as i128 - run.0.start as i128;
    let mut gaps = Vec::new();
    for span in covered.missing(new_size) {
        let before = located.partition_point(|run| run.0.end <= span.start);
        let prev = before.checked_sub(1).map(|i| shift(&located[i]));
        let next = located[before..]
            .iter()
            .find(|run| run.0.start >= span.end)
            .map(shift);
        // Where a side has no match, it is taken to have the other side's shift.
        let lo_shift = prev.or(next).unwrap_or(0);
        let hi_shift = next.or(prev).unwrap_or(0);
        let clamp = |at: i128| at.clamp(0, i128::from(basis_size)) as u64;
        // A long span (changes close together) goes in pieces of at most MAX_FINE_GAP, all but
        // the last at the shift before it.
        let mut start = span.start;
        while start < span.end {
            let new = ByteRange::new(start, (start + MAX_FINE_GAP).min(span.end));
            start = new.end;
            let last = new.end == span.end;
            let (lo, hi) = (
                clamp(i128::from(new.start) + lo_shift),
                clamp(i128::from(new.end) + if last { hi_shift } else { lo_shift }),
            );
            if lo >= hi {
                continue;
            }
            let most = (new.len() * OLD_PER_NEW + OLD_SLACK).min(MAX_OLD_LEN);
            let old = match (hi - lo > most, prev.is_some() || !last) {
                (false, _) => ByteRange::new(lo, hi),
                (true, true) => ByteRange::new(lo, lo + most),
                (true, false) => ByteRange::new(hi - most, hi),
            };
            gaps.push(FineGap { new, old });
        }
    }
    let mut block = FINE_BLOCK;
    let sums = |block: u32, gaps: &[FineGap]| -> u64 {
        gaps.iter().map(|g| fine_block_count(g.old, block)).sum()
    };
    while sums(block, &gaps) > MAX_FINE_SUMS as u64 && block < MAX_FINE_BLOCK {
        block *= 2;
    }
    let mut total = 0;
    gaps.retain(|g| {
        total += fine_block_count(g.old, block);
        total <= MAX_FINE_SUMS as u64
    });
    gaps.retain(|g| fine_block_count(g.old, block) > 0);
    debug_assert!(block >= MIN_FINE_BLOCK);
    (block, gaps)
}

/// Reads the basis bytes of each gap of `gaps` from `file` and sums them in blocks of
/// `block_len` ([`fine_blocks`]), gap after gap, holding one gap's at once ([`MAX_OLD_LEN`]
/// for those of [`plan`]). Blocking.
///
/// # Errors
/// Read errors, or a basis shorter than a gap (it changed).
pub fn block_sums(file: &File, gaps: &[FineGap], block_len: u32) -> io::Result<Vec<BlockSum>> {
    let mut sums = Vec::new();
    let mut buf = Vec::new();
    for gap in gaps {
        buf.resize(gap.old.len() as usize, 0);
        std::os::unix::fs::FileExt::read_exact_at(file, &mut buf, gap.old.start)?;
        let len = block_len as usize;
        for at in fine_blocks(gap.old, block_len) {
            let from = (at - gap.old.start) as usize;
            sums.push(block_sum(&buf[from..from + len]));
        }
    }
    Ok(sums)
}

/// Finds the blocks of `gap` (their sums `sums`, in [`fine_blocks`] order) within `new`, the
/// new file's bytes of `gap.new`, at any offset, as rsync does: a window of `block_len` bytes
/// rolls through `new` and, where its weak sum and then its strong sum are a block's, the block
/// is taken and the window jumps past it. Consecutive blocks merge into one copy. Each copy
/// carries the XXH3-128 of its bytes, for the receiver to check.
pub fn find_blocks(new: &[u8], gap: &FineGap, block_len: u32, sums: &[BlockSum]) -> Vec<FineCopy> {
    let len = block_len as usize;
    let mut copies: Vec<FineCopy> = Vec::new();
    if new.len() < len || sums.is_empty() {
        return copies;
    }
    let mut by_weak: HashMap<u32, Vec<u64>> = HashMap::with_capacity(sums.len());
    for (old, sum) in fine_blocks(gap.old, block_len).zip(sums) {
        by_weak.entry(sum.weak).or_default().push(old);
    }
    let strong_of: HashMap<u64, BlockSum> = fine_blocks(gap.old, block_len)
        .zip(sums.iter().copied())
        .collect();
    // Weak sums present, folded to 16 bits: most windows are ruled out without a map lookup.
    let fold = |weak: u32| ((weak ^ weak >> 16) & 0xffff) as usize;
    let mut present = vec![false; 1 << 16];
    for sum in sums {
        present[fold(sum.weak)] = true;
    }
    let mut pos = 0;
    let mut rolling = Rolling::new(&new[..len]);
    // Runs found, as (offset in `new`, offset in the basis, length).
    let mut runs: Vec<(usize, u64, usize)> = Vec::new();
    while pos + len <= new.len() {
        let weak = rolling.sum();
        let candidates = match present[fold(weak)] {
            true => by_weak.get(&weak),
            false => None,
        };
        let found = candidates.and_then(|olds| {
            let strong = xxhash_rust::xxh3::xxh3_64(&new[pos..pos + len]);
            // The block right after the last one taken first: runs then merge.
            let after_last = runs.last().map(|&(n, o, _)| o + (pos - n) as u64);
            let mut candidates = olds.iter().filter(|old| strong_of[old].strong == strong);
            let first = candidates.clone().next().copied();
            candidates
                .find(|&&old| Some(old) == after_last)
                .copied()
                .or(first)
        });
        match found {
            Some(old) => {
                match runs.last_mut() {
                    Some((n, o, l)) if *n + *l == pos && *o + *l as u64 == old => *l += len,
                    _ => runs.push((pos, old, len)),
                }
                pos += len;
                if pos + len <= new.len() {
                    rolling = Rolling::new(&new[pos..pos + len]);
                }
            }
            None => {
                if pos + len < new.len() {
                    rolling.roll(new[pos], new[pos + len]);
                }
                pos += 1;
            }
        }
    }
    // Fewer than a block's bytes left after the last one taken: the span's last window, if it
    // is a block, supplies them (the last block of a gap ends with it, [`fine_blocks`]).
    let tail = new.len() - len;
    if pos > tail && pos < new.len() {
        let window = &new[tail..];
        let strong = xxhash_rust::xxh3::xxh3_64(window);
        let found = by_weak.get(&weak_sum(window)).and_then(|olds| {
            olds.iter()
                .find(|old| strong_of[old].strong == strong)
                .copied()
        });
        if let Some(old) = found {
            let skip = pos - tail;
            let (at, from) = (pos, old + skip as u64);
            match runs.last_mut() {
                Some((n, o, l)) if *n + *l == at && *o + *l as u64 == from => *l += len - skip,
                _ => runs.push((at, from, len - skip)),
            }
        }
    }
    for (at, old, run) in runs {
        copies.push(FineCopy {
            new: gap.new.start + at as u64,
            old,
            len: run as u32,
            hash: xxhash_rust::xxh3::xxh3_128(&new[at..at + run]).to_be_bytes(),
        });
    }
    copies
}

#[cfg(test)]
mod tests {
    use xfer_proto::{SigChunk, MIN_AVG_CHUNK};

    use super::*;
    use crate::delta::{cut_region, Basis, Cut};
    use crate::test_data::{file_with, pseudo_random};

    /// What a light file's delta of `new` against the basis `old` sends as data: chunks matched
    /// as a `DeltaPut` is, then, with `fine`, the blocks found within the spans missed. Builds
    /// the new file from the basis and that data to check every copy. Returns the literal bytes
    /// and the sums sent back.
    fn literal_of(old: &[u8], new: &[u8], fine: bool) -> (u64, usize) {
        literal_cut_with(old, new, fine, MIN_AVG_CHUNK)
    }

    /// As [`literal_of`], the chunks cut with `avg`.
    fn literal_cut_with(old: &[u8], new: &[u8], fine: bool, avg: u32) -> (u64, usize) {
        let size = new.len() as u64;
        let basis = Basis::open(file_with(old), avg).unwrap();
        let mut chunks: Vec<SigChunk> = Vec::new();
        cut_region(&file_with(new), ByteRange::new(0, size), avg, |c: Cut| {
            chunks.push(c.sig());
            true
        })
        .unwrap();
        let mut built = vec![0u8; new.len()];
        let mut covered = RangeSet::new();
        let mut located = Vec::new();
        basis
            .copy_batch_located(0, &chunks, |at, from, bytes| {
                let range = ByteRange::new(at, at + bytes.len() as u64);
                built[at as usize..range.end as usize].copy_from_slice(&bytes);
                covered.insert(range);
                located.push((range, from));
                true
            })
            .unwrap();
        let mut sums_sent = 0;
        if fine {
            let (block, gaps) = plan(size, old.len() as u64, &covered, &located);
            let sums = block_sums(&file_with(old), &gaps, block).unwrap();
            sums_sent = sums.len();
            let mut rest = &sums[..];
            for gap in &gaps {
                let (mine, tail) = rest.split_at(fine_block_count(gap.old, block) as usize);
                rest = tail;
                let bytes = &new[gap.new.start as usize..gap.new.end as usize];
                for copy in find_blocks(bytes, gap, block, mine) {
                    let (at, from, len) = (copy.new as usize, copy.old as usize, copy.len as usize);
                    let source = &old[from..from + len];
                    assert_eq!(xxhash_rust::xxh3::xxh3_128(source).to_be_bytes(), copy.hash);
                    built[at..at + len].copy_from_slice(source);
                    covered.insert(ByteRange::new(copy.new, copy.new + copy.len as u64));
                }
            }
        }
        let mut literal = 0;
        for range in covered.missing(size) {
            let (from, to) = (range.start as usize, range.end as usize);
            built[from..to].copy_from_slice(&new[from..to]);
            literal += range.len();
        }
        assert!(
            built == new,
            "the new file built from the basis and the data"
        );
        (literal, sums_sent)
    }

    #[test]
    fn the_weak_sum_is_the_one_proto_md_defines() {
        // 1024 bytes of 97: a = 97·1024 mod 2^16, b = 97·(1024·1025/2) mod 2^16.
        assert_eq!(weak_sum(&[97; 1024]), 33_792 | 49_664 << 16);
        assert_eq!(weak_sum(&[1, 2, 3]), 6 | (3 + 2 * 2 + 3) << 16);
    }

    #[test]
    fn the_rolling_sum_is_the_sum_of_each_window() {
        let data = pseudo_random(5000, 3);
        let mut rolling = Rolling::new(&data[..1024]);
        for at in 1..=data.len() - 1024 {
            rolling.roll(data[at - 1], data[at + 1023]);
            assert_eq!(rolling.sum(), weak_sum(&data[at..at + 1024]), "{at}");
        }
    }

    #[test]
    fn an_eight_kib_change_in_place_costs_about_its_own_bytes() {
        let old = pseudo_random(2 << 20, 21);
        let (mut all_chunked, mut all_fine) = (0, 0);
        for at in [0, 700_001, 1_300_000, (2 << 20) - 8192] {
            let mut new = old.clone();
            new[at..at + 8192].copy_from_slice(&pseudo_random(8192, at as u64));
            let (chunked, _) = literal_of(&old, &new, false);
            let (literal, sums) = literal_of(&old, &new, true);
            assert!(
                literal <= 8192 + 2 * u64::from(FINE_BLOCK),
                "{at}: {literal}"
            );
            // The sums sent back cost a small part of what they save.
            assert!(
                sums * 12 <= (chunked - literal) as usize / 8,
                "{sums} {chunked}"
            );
            (all_chunked, all_fine) = (all_chunked + chunked, all_fine + literal);
        }
        // Whole chunks of 16 KiB on average go around each change without the blocks.
        assert!(all_fine * 2 < all_chunked, "{all_fine} {all_chunked}");
    }

    #[test]
    fn with_blocks_a_light_file_loses_nothing_to_coarser_chunks() {
        let old = pseudo_random(2 << 20, 24);
        let mut new = old.clone();
        new[900_001..900_001 + 8192].copy_from_slice(&pseudo_random(8192, 25));
        for avg in [MIN_AVG_CHUNK, LIGHT_AVG_CHUNK] {
            let (literal, sums) = literal_cut_with(&old, &new, true, avg);
            assert!(
                literal <= 8192 + 2 * u64::from(FINE_BLOCK),
                "{avg}: {literal}"
            );
            // The sums back grow with the chunks missed, but stay well below the data saved.
            assert!(sums * 12 <= 4 * 1024, "{avg}: {sums}");
        }
    }

    #[test]
    fn changes_close_together_cost_about_their_own_bytes_in_coarse_chunks() {
        // 100 bytes changed every 50 000 in a 4 MiB light file: nearly every 64 KiB chunk
        // misses, and the spans run together beyond what one gap may hold.
        let old = pseudo_random(4 << 20, 26);
        let mut new = old.clone();
        let mut changes = 0;
        for at in (10_000..new.len() - 100).step_by(50_000) {
            new[at..at + 100].fill(0x5a);
            changes += 1;
        }
        let (literal, _) = literal_cut_with(&old, &new, true, LIGHT_AVG_CHUNK);
        // Each change and the blocks it touches (the blocks grow to fit the sums).
        assert!(
            literal <= changes * (100 + 2 * 4096),
            "{literal} for {changes}"
        );
    }

    #[test]
    fn insertions_removals_truncation_and_growth_stay_correct_and_small() {
        let old = pseudo_random(2 << 20, 22);
        let ins = pseudo_random(3000, 5);
        let mut inserted = old[..900_000].to_vec();
        inserted.extend(&ins);
        inserted.extend(&old[900_000..]);
        let mut removed = old[..900_000].to_vec();
        removed.extend(&old[905_000..]);
        let mut grown = old.clone();
        grown.extend(pseudo_random(10_000, 6));
        let truncated = old[..1_500_000].to_vec();
        let mut at_start = pseudo_random(500, 7);
        at_start.extend(&old[100..]);
        for (what, new, most) in [
            ("inserted", &inserted, 3000 + 2048),
            ("removed", &removed, 2048),
            ("grown", &grown, 10_000 + 1024),
            ("truncated", &truncated, 1024),
            ("replaced at the start", &at_start, 500 + 1024),
        ] {
            let (literal, _) = literal_of(&old, new, true);
            assert!(literal <= most, "{what}: {literal}");
        }
        // Nothing in common: everything is data, and nothing wrong is copied.
        let other = pseudo_random(1 << 20, 40);
        let (literal, _) = literal_of(&old, &other, true);
        assert_eq!(literal, other.len() as u64);
    }

    #[test]
    fn a_plan_keeps_within_its_bounds() {
        // Twelve long spans between matches: the block grows until the sums fit.
        let mib = 1 << 20;
        let mut covered = RangeSet::new();
        let mut located = Vec::new();
        for k in 0..12 {
            let run = ByteRange::new(k * 2 * mib + mib, (k + 1) * 2 * mib);
            covered.insert(run);
            located.push((run, run.start));
        }
        let (block, gaps) = plan(24 * mib, 24 * mib, &covered, &located);
        assert_eq!(gaps.len(), 12);
        let sums: u64 = gaps.iter().map(|g| fine_block_count(g.old, block)).sum();
        assert!(
            sums <= MAX_FINE_SUMS as u64 && block > FINE_BLOCK,
            "{block} {sums}"
        );
        assert!(gaps.iter().all(|g| g.old == g.new), "{gaps:?}");
        // One with nothing matched around it: the basis bytes are bounded.
        let (_, gaps) = plan(MAX_FINE_GAP, 64 << 20, &RangeSet::new(), &[]);
        assert!(gaps[0].old.len() <= MAX_OLD_LEN);
        // A span longer than a gap may be goes in pieces.
        let (_, gaps) = plan(3 * MAX_FINE_GAP + 5000, 64 << 20, &RangeSet::new(), &[]);
        assert_eq!(gaps.len(), 4);
        assert!(gaps
            .iter()
            .all(|g| g.new.len() <= MAX_FINE_GAP && g.old == g.new));
    }
}
