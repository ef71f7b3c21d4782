//! Bodies of the delta frames (`CAP_DELTA`, proto.md §5.13): the sender streams the
//! content-defined chunks of its new file, and the receiver answers which of them it copied
//! from the file it already holds under the name; for a download, the client asks for the
//! chunks of the server's file with `ReadSig` and copies from its own copy.

use serde::{Deserialize, Serialize};

use crate::{ByteRange, FileIdentity, OpenWrite};

/// Most chunks one `DeltaSig` may carry (20 bytes each: well within `MAX_CONTROL_LEN`).
pub const MAX_DELTA_CHUNKS: usize = 16384;
/// Smallest average chunk a delta cuts with.
pub const MIN_AVG_CHUNK: u32 = 16 * 1024;
/// Largest average chunk a delta cuts with.
pub const MAX_AVG_CHUNK: u32 = 4 * 1024 * 1024;

/// Client → server: index the file held under an open upload's name as the basis of a delta.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeltaOpen {
    /// The upload.
    pub transfer_id: u64,
}

/// Server → client: the basis is indexed; chunk the new file with `avg_chunk`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeltaIndex {
    /// The upload.
    pub transfer_id: u64,
    /// Identity of the file held under the name.
    pub basis: FileIdentity,
    /// Average chunk size both sides cut with (a power of two; minimum ¼, maximum 4×).
    pub avg_chunk: u32,
    /// Chunks of the basis in the index.
    pub chunks: u64,
}

/// One content-defined chunk of the new file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SigChunk {
    /// Bytes in the chunk.
    pub len: u32,
    /// XXH3-128 of those bytes, big-endian.
    pub hash: [u8; 16],
}

/// Client → server: consecutive chunks of the new file, the first at `offset`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeltaSig {
    /// The upload.
    pub transfer_id: u64,
    /// Where the first chunk starts in the new file.
    pub offset: u64,
    /// The chunks, in file order, at most [`MAX_DELTA_CHUNKS`].
    pub chunks: Vec<SigChunk>,
}

/// Client → server: the chunks of a download's file from `offset`, cut as a region ending at
/// `end`; answered with a `DeltaSig`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadSig {
    /// The download.
    pub transfer_id: u64,
    /// Where the first chunk starts.
    pub offset: u64,
    /// Where the region ends.
    pub end: u64,
    /// Average chunk size to cut with.
    pub avg_chunk: u32,
}

/// Server → client: the ranges of a `DeltaSig` now held, copied from the basis.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeltaMatch {
    /// The upload.
    pub transfer_id: u64,
    /// Echoes `DeltaSig.offset`.
    pub offset: u64,
    /// Sorted, disjoint, within the `DeltaSig`'s span.
    pub matched: Vec<ByteRange>,
}

/// Client → server (`CAP_DELTA_PIPELINE`): which spans of a resumed delta upload were already
/// answered; answered with `DeltaAgreed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeltaResume {
    /// The upload.
    pub transfer_id: u64,
}

/// Server → client: the spans of the new file some `DeltaMatch` of this upload answered for,
/// on any connection, kept with the partial file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeltaAgreed {
    /// The upload.
    pub transfer_id: u64,
    /// Sorted, disjoint, at most `MAX_RANGES`.
    pub agreed: Vec<ByteRange>,
}

/// Client → server (`CAP_DELTA_PUT`): open the upload `open` and match the whole signature of
/// the new file against the file held under its name, in one pipelined request: a light file's
/// `OpenWrite`, `DeltaOpen` and `DeltaSig` without a round trip between them. Answered with
/// `WriteOpened`, then `DeltaMatch` (offset 0) or a non-fatal `Error` when there is no basis;
/// or with one `Error` when the upload could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeltaPut {
    /// The upload, as `OpenWrite` asks for it.
    pub open: OpenWrite,
    /// Average chunk size the chunks were cut with (a power of two within
    /// [`MIN_AVG_CHUNK`]..=[`MAX_AVG_CHUNK`]).
    pub avg_chunk: u32,
    /// Every chunk of the new file, in order from offset 0, at most [`MAX_DELTA_CHUNKS`]; their
    /// lengths add up to `open.identity.size`.
    pub chunks: Vec<SigChunk>,
}

/// Shortest block a `DeltaBlocks` sums the basis in (`CAP_DELTA_FINE`).
pub const MIN_FINE_BLOCK: u32 = 256;
/// Longest block a `DeltaBlocks` sums the basis in.
pub const MAX_FINE_BLOCK: u32 = 64 * 1024;
/// Most block sums one `DeltaBlocks` carries (12 bytes each: 96 KiB at most).
pub const MAX_FINE_SUMS: usize = 8192;
/// Longest span of the new file a `FineGap` names, and longest `FineCopy`: what the client
/// reads at once to look for the gap's blocks.
pub const MAX_FINE_GAP: u64 = 1024 * 1024;
/// Most copies one `DeltaCopy` carries (36 bytes each).
pub const MAX_FINE_COPIES: usize = 4096;

/// The rsync-style sums of one block of the basis: a rolling weak sum to find it at any
/// offset of the new file, and a strong one to confirm it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockSum {
    /// The rolling sum of proto.md §5.14: `a | b << 16`.
    pub weak: u32,
    /// XXH3-64 of the block.
    pub strong: u64,
}

/// A span of the new file no chunk matched, and the bytes of the basis it most likely replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FineGap {
    /// The span of the new file, at most [`MAX_FINE_GAP`] bytes.
    pub new: ByteRange,
    /// The basis bytes summed, in the blocks [`fine_blocks`] gives.
    pub old: ByteRange,
}

/// Server → client (`CAP_DELTA_FINE`), after a `DeltaPut`'s `DeltaMatch`: the basis bytes
/// around each span the match left, summed in fixed blocks, for the client to find within the
/// span (rsync's matching, where a whole content-defined chunk would otherwise go as data).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeltaBlocks {
    /// The upload.
    pub transfer_id: u64,
    /// Bytes in each block: a power of two within [`MIN_FINE_BLOCK`]..=[`MAX_FINE_BLOCK`].
    pub block_len: u32,
    /// Sorted, disjoint by `new`, within the upload.
    pub gaps: Vec<FineGap>,
    /// The sums of every gap's blocks, gap after gap, at most [`MAX_FINE_SUMS`].
    pub sums: Vec<BlockSum>,
}

/// One run of the new file to copy from the basis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FineCopy {
    /// Where it goes in the new file.
    pub new: u64,
    /// Where it lies in the basis.
    pub old: u64,
    /// Its length, at most [`MAX_FINE_GAP`].
    pub len: u32,
    /// XXH3-128 of the new file's bytes there, big-endian: the server copies only bytes that
    /// still hash so.
    pub hash: [u8; 16],
}

/// Client → server (`CAP_DELTA_FINE`): copy these runs of the basis into an upload opened by
/// `DeltaPut`. Not answered: a run whose bytes no longer hash as given is left out, and the
/// commit finds the upload short of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeltaCopy {
    /// The upload.
    pub transfer_id: u64,
    /// At most [`MAX_FINE_COPIES`].
    pub copies: Vec<FineCopy>,
}

/// Where the blocks of `old` start, in order: every `block_len` bytes from `old.start`, the last
/// one ending at `old.end` (overlapping the one before where the length is not a multiple);
/// none when `old` is shorter than a block.
pub fn fine_blocks(old: ByteRange, block_len: u32) -> impl Iterator<Item = u64> {
    let len = u64::from(block_len.max(1));
    (0..fine_block_count(old, block_len)).map(move |i| (old.start + i * len).min(old.end - len))
}

/// How many blocks [`fine_blocks`] gives.
pub fn fine_block_count(old: ByteRange, block_len: u32) -> u64 {
    let len = u64::from(block_len.max(1));
    match old.len() < len {
        true => 0,
        false => old.len().div_ceil(len),
    }
}

impl DeltaBlocks {
    /// Whether the frame is sound for an upload of `size` bytes: a valid block length, gaps
    /// sorted, disjoint and within the upload, none longer than [`MAX_FINE_GAP`], and one sum per
    /// block of their `old` ranges. The error says what is wrong.
    pub fn check(&self, size: u64) -> Result<(), &'static str> {
        let len = self.block_len;
        if !len.is_power_of_two() || !(MIN_FINE_BLOCK..=MAX_FINE_BLOCK).contains(&len) {
            return Err("DeltaBlocks with a bad block_len");
        }
        if self.sums.len() > MAX_FINE_SUMS {
            return Err("DeltaBlocks with too many sums");
        }
        let (mut end, mut blocks) = (0, 0u64);
        for gap in &self.gaps {
            let new_ok = gap.new.start >= end && gap.new.start < gap.new.end && gap.new.end <= size;
            if !new_ok || gap.new.len() > MAX_FINE_GAP || gap.old.start > gap.old.end {
                return Err("DeltaBlocks with gaps out of order or too long");
            }
            end = gap.new.end;
            blocks = blocks.saturating_add(fine_block_count(gap.old, len));
        }
        if blocks != self.sums.len() as u64 {
            return Err("DeltaBlocks with sums that do not match its gaps");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fine_blocks_cover_the_range_the_last_one_ending_with_it() {
        let starts: Vec<u64> = fine_blocks(ByteRange::new(100, 2600), 1024).collect();
        assert_eq!(starts, vec![100, 1124, 1576]);
        let exact: Vec<u64> = fine_blocks(ByteRange::new(0, 2048), 1024).collect();
        assert_eq!(exact, vec![0, 1024]);
        assert_eq!(fine_blocks(ByteRange::new(0, 1023), 1024).count(), 0);
        assert_eq!(fine_blocks(ByteRange::new(5, 5), 1024).count(), 0);
    }

    #[test]
    fn delta_blocks_are_checked_against_their_gaps() {
        let sum = BlockSum { weak: 1, strong: 2 };
        let gap = |new: (u64, u64), old: (u64, u64)| FineGap {
            new: ByteRange::new(new.0, new.1),
            old: ByteRange::new(old.0, old.1),
        };
        let mut blocks = DeltaBlocks {
            transfer_id: 1,
            block_len: 1024,
            gaps: vec![gap((0, 3000), (0, 3000)), gap((5000, 6000), (5000, 5500))],
            sums: vec![sum; 3],
        };
        assert_eq!(blocks.check(10_000), Ok(()));
        assert!(blocks.check(5999).is_err(), "a gap beyond the upload");
        blocks.sums.push(sum);
        assert!(blocks.check(10_000).is_err(), "a sum too many");
        blocks.sums.pop();
        blocks.gaps.swap(0, 1);
        assert!(blocks.check(10_000).is_err(), "gaps out of order");
        blocks.gaps.swap(0, 1);
        blocks.block_len = 1000;
        assert!(blocks.check(10_000).is_err(), "not a power of two");
        blocks.block_len = 1024;
        blocks.gaps[1] = gap((5000, 5000 + MAX_FINE_GAP + 1), (0, 0));
        assert!(blocks.check(u64::MAX).is_err(), "a gap too long");
    }
}
