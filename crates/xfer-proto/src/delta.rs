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
