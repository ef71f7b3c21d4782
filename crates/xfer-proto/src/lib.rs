//! The xfer wire protocol, without any I/O: frame types, the length-prefixed codec and limits.
//!
//! `proto.md` at the repository root is the normative description; this crate implements it.
//!
//! # Layout
//! - [`frame`]: every frame type and its body encoding (bincode for control, fixed header for data).
//! - [`codec`]: [`FrameCodec`], a `tokio_util::codec` decoder/encoder that checks limits first.
//! - [`auth`]: token challenge–response proofs (HMAC-SHA256).
//! - [`delta`]: bodies of the delta frames (`CAP_DELTA`).
//! - [`meta`]: bodies of the frames that carry owners, hard links, attributes and holes.
//! - [`packed`]: the body of the frames that carry a tree's small files compressed in batches.
//! - [`names`]: names that are not UTF-8, escaped on the wire and back (`CAP_RAW_NAMES`).
//! - [`session`]: [`session::ServerSession`], the daemon side of a connection as a state machine.
//! - [`client`]: [`client::ClientSession`], the client side of the handshake as a state machine.
//! - [`error`]: [`ProtoError`] for malformed input and [`ErrorCode`] for error frames.
//!
//! Invariant: nothing here opens a socket, touches the filesystem or reads a clock.
#![warn(missing_docs)]

pub mod auth;
pub mod client;
pub mod codec;
pub mod delta;
pub mod error;
pub mod frame;
#[doc(hidden)]
pub mod fuzzing;
pub mod meta;
pub mod mirror;
pub mod names;
pub mod packed;
pub mod replay;
pub mod session;

pub use codec::FrameCodec;
pub use delta::*;
pub use error::{ErrorCode, ProtoError};
pub use frame::*;
pub use meta::*;
pub use mirror::*;
pub use packed::{PackedFiles, MAX_PACKED_FRAMES, MAX_PACKED_LEN};

/// Version spoken by this implementation; carried in `Hello` and `Welcome`.
pub const PROTOCOL_VERSION: u16 = 1;
/// Capability bit: the connection was authenticated with a shared token.
pub const CAP_AUTH: u64 = 1 << 0;
/// Capability bit: in `Hello`, the client asks for TLS; in `Welcome`, the session runs over TLS.
pub const CAP_TLS: u64 = 1 << 1;
/// Capability bit: chunks may travel zstd-compressed (`DataZ`, `SetCompression`).
pub const CAP_COMPRESSION: u64 = 1 << 2;
/// Capability bit: in `Hello`, the client will send `Delete`; in `Welcome`, the server allows
/// deletion (a server that does not answers such a `Hello` with `Error{ReadOnly}`).
pub const CAP_DELETE: u64 = 1 << 3;
/// Capability bit: in `Hello`, the client may send `MirrorTo`; in `Welcome`, the server knows it.
pub const CAP_MIRROR: u64 = 1 << 4;
/// Capability bit: tree copies keep owners, hard links, attributes, holes and special files
/// (the `meta` frames, `Zeros`, link targets stored verbatim).
pub const CAP_TREE_META: u64 = 1 << 5;
/// Capability bit: uploads may be sent as a delta against the file the server holds
/// (`DeltaOpen`, `DeltaSig`).
pub const CAP_DELTA: u64 = 1 << 6;
/// Capability bit: tree listings with metadata travel zstd-compressed (`PackedTreeMetaListing`).
pub const CAP_PACKED_LISTING: u64 = 1 << 7;
/// Capability bit: the small files of a tree may travel zstd-compressed in batches
/// (`PackedPutFiles`, `PackedFileData`), under the connection's compression mode.
pub const CAP_PACKED_FILES: u64 = 1 << 8;
/// Capability bit: with `CAP_DELTA`, `DeltaSig` is a pipelined request: the signature of a
/// file streams without a round trip per batch.
pub const CAP_DELTA_PIPELINE: u64 = 1 << 9;
/// Capability bit: tree metadata, second revision: a file with holes is opened with its holes
/// named (`OpenWriteSparse`, `ReadOpenedSparse`), so the receiver reserves space only for the
/// bytes between them, and ACL attributes travel with the names of their entries.
pub const CAP_TREE_META_V2: u64 = 1 << 10;
/// Capability bit: a copy can be told whether to try a delta (`CopyMode` before `CopyTo` or
/// `MirrorTo`), and a single-file copy reports what its delta moved (`CopyDelta` before
/// `CopyDone`).
pub const CAP_COPY_DELTA: u64 = 1 << 11;
/// Capability bit: with `CAP_COPY_DELTA`, a single-file copy also says why its upload went as a
/// delta or whole (`CopyReason` before `CopyDelta`).
pub const CAP_COPY_REASON: u64 = 1 << 12;
/// Most bytes of a `CopyReason`: one line of a log.
pub const MAX_COPY_REASON: usize = 512;
/// Capability bit: with `CAP_DELTA`, `ReadSig` is a pipelined request: a download's delta asks
/// for the next pieces of the server's signature without a round trip each.
pub const CAP_READ_SIG_PIPELINE: u64 = 1 << 13;
/// Capability bit: with `CAP_TREE_META`, a small file may be stored with its owner and
/// attributes in one request (`PutFileMeta`), alone or packed.
pub const CAP_PUT_META: u64 = 1 << 14;
/// Capability bit: with `CAP_DELTA`, a light file's delta upload may open with its whole
/// signature in one pipelined request (`DeltaPut`), and `Commit` is a pipelined request: a tree's
/// changed files move as deltas in two round trips, all of them at once.
pub const CAP_DELTA_PUT: u64 = 1 << 15;
/// Capability bit: with `CAP_DELTA` and `CAP_DELTA_PIPELINE`, an upload's delta may send
/// guessed chunks (`DeltaGuess`): blocks the server looks for only where the previous match
/// puts them, so the client hashes what did not move instead of cutting it by content.
pub const CAP_DELTA_GUESS: u64 = 1 << 16;
/// Capability bit: the whole-file digest (`Commit`, `Committed`, `DigestReply`) is the block
/// digest, XXH3-128 over the XXH3-128 digests of the file's 1 MiB blocks (proto.md §2.4), which
/// a receiver computes as bytes land in any order.
pub const CAP_BLOCK_DIGEST: u64 = 1 << 17;
/// Capability bit: the window counts streamed frames by their size, in [`WINDOW_SLOTS`]
/// slots per `Welcome.window` unit ([`window_slots`]), so that a light file's few KiB of
/// literal data do not wait behind a count sized for whole chunks.
pub const CAP_BYTE_WINDOW: u64 = 1 << 18;
/// Capability bit: offered by a client that proves itself with the token (not a grant), so
/// that the server proves itself first, in `EarlyChallenge` with everything `Welcome` will
/// say, and the client's first request goes with its `Auth` instead of a round trip after it.
/// Not in [`CAP_FEATURES`]: a client offers it only when it holds the token, and a server sets
/// it in `Welcome` only when it sent `EarlyChallenge`.
pub const CAP_EARLY_AUTH: u64 = 1 << 19;
/// Capability bit: with `CAP_DELTA_PUT`, the commit of an upload opened by `DeltaPut` is
/// durable once a `Sync` sent after its `Committed` is answered, as a tree's small files are,
/// instead of at `Committed`: a client that offers it sends `DeltaPut` only for files of a tree
/// it ends with `Sync`, so a tree's light files cost the receiver no flush each.
pub const CAP_DELTA_PUT_SYNC: u64 = 1 << 20;
/// Capability bit: with `CAP_DELTA_PUT`, the server follows a `DeltaPut`'s `DeltaMatch` with
/// `DeltaBlocks`, the basis around each span left unmatched summed in small fixed blocks, and the
/// client copies the blocks it finds within those spans with `DeltaCopy`: a small change costs
/// about its own bytes as data instead of the whole chunks around it.
pub const CAP_DELTA_FINE: u64 = 1 << 21;
/// Capability bit: the server reports how its sending socket sees the path (`PathReport`)
/// before some of the `Data` answering `ReadChunk`: on a download the client is the receiver,
/// and its own sockets do not time the queue its data waits in.
pub const CAP_PATH_REPORT: u64 = 1 << 23;
/// Capability bit: every upload this connection opens belongs to a tree that the client ends
/// with `Sync` and waits for, so the server commits it durable at that `Sync`, as a tree's
/// small files, instead of flushing each at `Committed`. Not in [`CAP_FEATURES`]: a client
/// offers it only on a tree copy's connections, never for a single file.
pub const CAP_TREE_SYNC: u64 = 1 << 24;
/// Capability bit: the server follows `Welcome` with `IdleTimeout`, how long it lets the
/// connection sit idle: a client that kept a connection aside knows, rather than guesses,
/// whether it is still open.
pub const CAP_IDLE_TIMEOUT: u64 = 1 << 25;
/// Capability bit: the server carries out `AwaitCommits`, which holds the frames after it on
/// the connection until the uploads it names have had their `Commit` carried out on any
/// connection, so that a tree's closing goes with its last commits. Not in [`CAP_FEATURES`]: a
/// client offers it only on a tree copy's connections, as `CAP_TREE_SYNC`.
pub const CAP_TREE_CLOSE: u64 = 1 << 26;
/// Capability bit: with `CAP_EARLY_AUTH`, in `Hello`, the client may send `EarlyAuth` behind it;
/// in `Welcome` (and the `EarlyChallenge`'s), the server takes an `EarlyAuth`, the client's proof
/// made without the server's nonce, and answers the read-only requests behind it without waiting
/// for `Auth` (proto.md §4.5, *Zero round trip*). Not in [`CAP_FEATURES`]: offered only with
/// `CAP_EARLY_AUTH`.
pub const CAP_ZERO_RTT: u64 = 1 << 27;
/// Capability bit: names and link targets may stand for bytes that are not UTF-8, escaped as
/// [`names`] does (proto.md §8.5): the server maps them back to those bytes on its disk and
/// escapes such names in what it lists, where without the bit it leaves them out.
pub const CAP_RAW_NAMES: u64 = 1 << 28;
/// How far (ms) an `EarlyAuth`'s time may lie from the server's clock, either way; the server
/// keeps each nonce it took until that time plus this has passed.
pub const ZERO_RTT_WINDOW_MS: u64 = 30_000;
/// Most nonces of taken early proofs a server keeps; when full, it refuses early proofs.
pub const ZERO_RTT_REPLAY_MAX: usize = 16_384;
/// Most bytes (frames whole, with their length prefix) of requests a server discards after
/// refusing an early proof, before the client's `Auth`; more is a protocol error.
pub const ZERO_RTT_DISCARD_MAX: usize = 256 * 1024;
/// Most names one `AwaitCommits` carries.
pub const MAX_AWAITED: usize = 4096;
/// With `CAP_BYTE_WINDOW`, the slots each unit of `Welcome.window` holds: a frame of a whole
/// chunk (`max_chunk_size` bytes) takes them all.
pub const WINDOW_SLOTS: u32 = 64;

/// The window slots (`CAP_BYTE_WINDOW`) a streamed frame of `len` bytes takes on a connection
/// whose `max_chunk_size` is `max_chunk`: `⌈WINDOW_SLOTS·len / max_chunk⌉`, at least 1 and at
/// most [`WINDOW_SLOTS`] (proto.md §5.11).
pub fn window_slots(len: u64, max_chunk: u32) -> u32 {
    let max_chunk = u64::from(max_chunk.max(1));
    let slots = u64::from(WINDOW_SLOTS)
        .saturating_mul(len)
        .div_ceil(max_chunk);
    slots.clamp(1, u64::from(WINDOW_SLOTS)) as u32
}
/// The feature bits this implementation speaks: a client offers them all, a server grants
/// those the client offered (`CAP_PACKED_FILES` only with `CAP_COMPRESSION`, `CAP_PUT_META`
/// only with `CAP_TREE_META`).
pub const CAP_FEATURES: u64 = CAP_TREE_META
    | CAP_COMPRESSION
    | CAP_DELTA
    | CAP_DELTA_PIPELINE
    | CAP_PACKED_LISTING
    | CAP_PACKED_FILES
    | CAP_TREE_META_V2
    | CAP_PUT_META
    | CAP_COPY_DELTA
    | CAP_COPY_REASON
    | CAP_READ_SIG_PIPELINE
    | CAP_DELTA_PUT
    | CAP_DELTA_GUESS
    | CAP_BLOCK_DIGEST
    | CAP_BYTE_WINDOW
    | CAP_DELTA_PUT_SYNC
    | CAP_DELTA_FINE
    | CAP_PATH_REPORT
    | CAP_IDLE_TIMEOUT
    | CAP_RAW_NAMES;
/// Port used when a host is given without one.
pub const DEFAULT_PORT: u16 = 8888;
/// Largest payload a single `Data` frame may carry, and so the largest chunk size.
pub const MAX_CHUNK_SIZE: u32 = 16 * 1024 * 1024;
/// Smallest chunk size a peer may ask for.
pub const MIN_CHUNK_SIZE: u32 = 4 * 1024;
/// Chunk size used when neither side asks for another.
pub const DEFAULT_CHUNK_SIZE: u32 = 4 * 1024 * 1024;
/// Largest body of a control (non-`Data`) frame.
pub const MAX_CONTROL_LEN: u32 = 4 * 1024 * 1024;
/// Largest value of the length prefix: type byte, data header and a full chunk.
pub const MAX_FRAME_LEN: u32 = 1 + DATA_HEADER_LEN as u32 + MAX_CHUNK_SIZE;
/// Bytes of the length prefix.
pub const LEN_PREFIX: usize = 4;
/// Longest name (UTF-8 bytes) accepted in any request.
pub const MAX_NAME_LEN: usize = 4096;
/// Most ranges a single range list may carry.
pub const MAX_RANGES: usize = 65536;
/// Most entries in one `Listing` frame; longer listings span several frames.
pub const MAX_LISTING_ENTRIES: usize = 4096;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_takes_its_share_of_a_chunk_in_window_slots() {
        let chunk = 16 << 20;
        // A whole chunk takes a frame's worth, as the window counted in frames did.
        assert_eq!(window_slots(u64::from(chunk), chunk), WINDOW_SLOTS);
        // A light file's literal data takes one slot; anything takes at least one.
        assert_eq!(window_slots(25_000, chunk), 1);
        assert_eq!(window_slots(0, chunk), 1);
        assert_eq!(window_slots(256 << 10, chunk), 1);
        assert_eq!(window_slots((256 << 10) + 1, chunk), 2);
        assert_eq!(window_slots(u64::from(chunk) / 2, chunk), 32);
        // Never more than a frame's worth, whatever the length claims.
        assert_eq!(window_slots(u64::MAX, chunk), WINDOW_SLOTS);
        assert_eq!(window_slots(5, 0), WINDOW_SLOTS);
    }
}
