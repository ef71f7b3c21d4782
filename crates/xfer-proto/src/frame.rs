//! Frame types and their bodies: serde structs for control frames, a fixed header for data.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::meta::{
    CopyDoneMeta, ListTreeMeta, MakeHardLink, MakeNode, MetaSet, SetMeta, TreeMetaListing,
};
use crate::{ErrorCode, ProtoError, MAX_CONTROL_LEN};

/// Bytes of the fixed `Data` header after the type byte: transfer id, offset, length, CRC32.
pub const DATA_HEADER_LEN: usize = 8 + 8 + 4 + 4;

/// The one bincode configuration used for every control body (big-endian, fixed-width ints).
fn wire() -> impl bincode::config::Config {
    bincode::config::standard()
        .with_big_endian()
        .with_fixed_int_encoding()
        .with_limit::<{ MAX_CONTROL_LEN as usize }>()
}

/// A half-open byte range `[start, end)` of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ByteRange {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

impl ByteRange {
    /// `[start, end)`.
    pub fn new(start: u64, end: u64) -> Self {
        Self { start, end }
    }

    /// Number of bytes covered.
    pub fn len(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }

    /// True when the range covers nothing.
    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }
}

/// What identifies one version of a file: a resume is only valid against the same identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FileIdentity {
    /// Size in bytes.
    pub size: u64,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
}

/// Client → server, first frame on every connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Highest protocol version the client speaks.
    pub version: u16,
    /// Lowest protocol version the client still speaks.
    pub min_version: u16,
    /// Capability bits the client supports (`CAP_*`).
    pub capabilities: u64,
    /// Free-form software name and version, for logs.
    pub agent: String,
    /// Fresh random bytes (`NONCE_LEN`), always sent; used if the server challenges.
    pub nonce: Vec<u8>,
}

/// Server → client, when the server requires a token: prove you know it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Challenge {
    /// Fresh random bytes (`NONCE_LEN`).
    pub nonce: Vec<u8>,
}

/// Server → client, in place of `Challenge` when the client offered `CAP_EARLY_AUTH` and
/// proves itself with the token: the challenge, and the `Welcome` the server will send once the
/// client's proof checks, its `proof` the server's already, so that the client checks the
/// server and encodes its first request before `Welcome` comes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EarlyChallenge {
    /// Fresh random bytes (`NONCE_LEN`).
    pub nonce: Vec<u8>,
    /// The `Welcome` to come after `Auth`, field for field.
    pub welcome: Welcome,
}

/// Client → server, right behind a `Hello` offering `CAP_ZERO_RTT` to a server known to take it,
/// in the same flight, instead of waiting for the `EarlyChallenge` to send `Auth`: a proof of the
/// token made without the server's nonce, fresh by the client's clock, so that the read-only
/// requests behind it are answered a round trip sooner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EarlyAuth {
    /// The client's wall clock when it made the proof, ms since the Unix epoch.
    pub time_ms: u64,
    /// `auth::zero_rtt_proof(token, hello.nonce, time_ms)`.
    pub proof: Vec<u8>,
}

/// Server → client, right after the `EarlyChallenge` when it did not take the `EarlyAuth` behind
/// the `Hello` (its time out of the window, its nonce seen, no room to remember it): the client
/// answers the challenge with `Auth` and sends its first requests again, since those it sent
/// behind the early proof are discarded, unanswered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EarlyRefused {
    /// Why, for logs: `skew`, `replay` or `full`.
    pub reason: String,
}

/// Client → server answer to `Challenge` (or `EarlyChallenge`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Auth {
    /// `auth::client_proof(key, hello.nonce, challenge.nonce)`, where the key is the token, or
    /// the grant's derived key when `grant` is set.
    pub proof: Vec<u8>,
    /// Present when the client holds a copy grant instead of the token.
    pub grant: Option<Grant>,
}

/// A credential for one server-to-server copy: it lets its bearer write under `scope` until
/// `expires`, and nothing else. Its key is `auth::grant_key(token, grant)`; the token itself
/// never leaves the client that made the grant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// The name the bearer may write: it and everything below it.
    pub scope: String,
    /// Unix time (seconds) after which the grant is void.
    pub expires: u64,
    /// Fresh random bytes (`NONCE_LEN`), so no two grants share a key.
    pub nonce: Vec<u8>,
}

/// Client → server: push `source` to another daemon (server-to-server copy).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyTo {
    /// File or tree to copy, relative to this server's root.
    pub source: String,
    /// Copy a directory tree.
    pub recursive: bool,
    /// Destination daemon's host name or address.
    pub host: String,
    /// Destination daemon's port.
    pub port: u16,
    /// Name on the destination.
    pub dest: String,
    /// Connections to use.
    pub connections: u32,
    /// Chunk size to use.
    pub chunk_size: u32,
    /// Grant for the destination, with its derived key; `None` if it needs no token.
    pub grant: Option<(Grant, Vec<u8>)>,
    /// Reach the destination over TLS, verifying its certificate for `host`; never fall back
    /// to plain TCP.
    pub tls: bool,
    /// With `tls`: the SHA-256 of the destination's certificate (DER) as the client pinned it;
    /// the source accepts that certificate and no other. `None`: the source's CAs decide.
    pub pin: Option<[u8; 32]>,
}

/// Server → client while a copy runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Bytes moved so far.
    pub bytes_done: u64,
    /// Bytes to move in all.
    pub bytes_total: u64,
}

/// Server → client: the copy finished.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyDone {
    /// Regular files in the source (1 for a single file).
    pub files_total: u64,
    /// Files whose bytes moved.
    pub files_transferred: u64,
    /// Files already identical at the destination.
    pub files_skipped: u64,
    /// Bytes of the source.
    pub bytes_total: u64,
    /// Bytes moved.
    pub bytes_transferred: u64,
    /// Bytes the destination already held from an interrupted copy.
    pub resumed_bytes: u64,
    /// Milliseconds the copy took.
    pub millis: u64,
}

/// Whether a copy's transfer tries a delta against what the destination already holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CopyDeltaMode {
    /// The source daemon decides, as `xfer send` does without a flag.
    #[default]
    Auto,
    /// Never (`--whole-file`).
    WholeFile,
    /// Always try one (`--delta`).
    Delta,
}

/// Client → server (`CAP_COPY_DELTA`): how the next `CopyTo` or `MirrorTo` on this connection
/// chooses between a delta and the whole file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyMode {
    /// The choice.
    pub delta: CopyDeltaMode,
}

/// Server → client (`CAP_COPY_DELTA`), right before the `CopyDone` of a single-file copy: what
/// its transfer moved as literal data and what it took from the destination's old file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyDelta {
    /// The transfer ran as a delta.
    pub delta: bool,
    /// Bytes sent as data.
    pub literal_bytes: u64,
    /// Bytes the destination copied from its old file.
    pub matched_bytes: u64,
}

/// Server → client (`CAP_COPY_REASON`), right before the `CopyDelta` of a single-file copy:
/// which way the source server's upload went and why, in the words of its client's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyReason {
    /// One line of UTF-8, at most [`MAX_COPY_REASON`](crate::MAX_COPY_REASON) bytes.
    pub reason: String,
}

/// Server → client (`CAP_PATH_REPORT`), before a `Data` answering `ReadChunk`: how the
/// server's socket of this connection sees the path its data takes, from the kernel's
/// round-trip timing of that data. Not answered. A value the kernel does not give is 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathReport {
    /// Smoothed round-trip time, microseconds.
    pub rtt_us: u32,
    /// Least round-trip time the connection has seen, microseconds: the path without a queue.
    pub min_rtt_us: u32,
}

/// Server → client (`CAP_IDLE_TIMEOUT`), right behind `Welcome`: how long the server lets the
/// connection sit without a frame from the client before it closes it, fixed for the life of
/// the connection, so that a client knows whether a connection it left idle is still open
/// instead of guessing. Not answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdleTimeout {
    /// The idle timeout, milliseconds.
    pub millis: u64,
}

/// Server → client answer to `Hello` (or to `Auth`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// Version chosen for this connection.
    pub version: u16,
    /// Capability bits in force: the intersection of both sides'.
    pub capabilities: u64,
    /// Largest chunk (data payload) the server accepts or sends.
    pub max_chunk_size: u32,
    /// Most `Data` frames (uploads) or `ReadChunk` requests (downloads) a client may have
    /// unanswered on this connection.
    pub window: u32,
    /// Free-form software name and version, for logs.
    pub agent: String,
    /// After authentication, `auth::server_proof(token, hello.nonce, challenge.nonce)`; else empty.
    pub proof: Vec<u8>,
}

/// Client → server: start or join the upload of `name`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenWrite {
    /// Destination, `/`-separated, relative to the server's root.
    pub name: String,
    /// Identity of the source file; resume state is kept per identity.
    pub identity: FileIdentity,
    /// Unix permission bits to give the final file (masked to 0o777).
    pub mode: u32,
    /// Chunk size the client will send in.
    pub chunk_size: u32,
}

/// Server → client: the upload is open.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteOpened {
    /// Handle for this upload on this connection.
    pub transfer_id: u64,
    /// Ranges the server already holds durably for this identity, sorted, disjoint.
    pub held: Vec<ByteRange>,
}

/// Client → server: open `name` for download.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenRead {
    /// File, `/`-separated, relative to the server's root.
    pub name: String,
    /// Identity of the client's partial copy, if it has one.
    pub have_identity: Option<FileIdentity>,
    /// Ranges the client already holds for `have_identity` (informational: for logs).
    pub have: Vec<ByteRange>,
}

/// Server → client: the download is open.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadOpened {
    /// Handle for this download on this connection.
    pub transfer_id: u64,
    /// Identity of the file as opened.
    pub identity: FileIdentity,
    /// Unix permission bits of the file.
    pub mode: u32,
}

/// A chunk of a transfer: `ReadChunk` requests it, `Ack` confirms it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    /// Transfer handle.
    pub transfer_id: u64,
    /// Offset in the file.
    pub offset: u64,
    /// Length in bytes.
    pub len: u32,
}

/// A payload: bytes `[offset, offset + payload.len())` of a transfer, with their CRC32.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Data {
    /// Transfer handle.
    pub transfer_id: u64,
    /// Offset in the file.
    pub offset: u64,
    /// CRC32 (IEEE) of `payload`.
    pub crc32: u32,
    /// The bytes.
    pub payload: Bytes,
}

impl Data {
    /// A data frame for `payload` at `offset`, with its CRC computed.
    pub fn new(transfer_id: u64, offset: u64, payload: Bytes) -> Self {
        let crc32 = crc32fast::hash(&payload);
        Self {
            transfer_id,
            offset,
            crc32,
            payload,
        }
    }

    /// Checks the payload against its CRC.
    ///
    /// # Errors
    /// [`ProtoError::BadCrc`] when they differ.
    pub fn verify(&self) -> Result<(), ProtoError> {
        if crc32fast::hash(&self.payload) == self.crc32 {
            Ok(())
        } else {
            Err(ProtoError::BadCrc {
                offset: self.offset,
            })
        }
    }

    /// The range this frame covers.
    pub fn range(&self) -> ByteRange {
        ByteRange::new(self.offset, self.offset + self.payload.len() as u64)
    }

    /// Length prefix, type byte and fixed header; the payload follows on the wire.
    pub fn header(&self) -> [u8; LEN_AND_DATA_HEADER] {
        let mut out = [0u8; LEN_AND_DATA_HEADER];
        let mut b = &mut out[..];
        b.put_u32((1 + DATA_HEADER_LEN + self.payload.len()) as u32);
        b.put_u8(FrameType::Data as u8);
        b.put_u64(self.transfer_id);
        b.put_u64(self.offset);
        b.put_u32(self.payload.len() as u32);
        b.put_u32(self.crc32);
        out
    }
}

/// Length prefix + type byte + data header: what precedes a payload on the wire.
pub const LEN_AND_DATA_HEADER: usize = crate::LEN_PREFIX + 1 + DATA_HEADER_LEN;

/// Bytes of the fixed `DataZ` header after the type byte: the `Data` header and `raw_len`.
pub const DATAZ_HEADER_LEN: usize = DATA_HEADER_LEN + 4;

/// Length prefix + type byte + `DataZ` header.
pub const LEN_AND_DATAZ_HEADER: usize = crate::LEN_PREFIX + 1 + DATAZ_HEADER_LEN;

/// A compressed payload (`CAP_COMPRESSION`): bytes `[offset, offset + raw_len)` of a transfer
/// as one zstd frame. `crc32` covers the compressed bytes, so damage is caught before they
/// are decompressed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataZ {
    /// Transfer handle.
    pub transfer_id: u64,
    /// Offset in the file.
    pub offset: u64,
    /// CRC32 (IEEE) of `payload`, the compressed bytes.
    pub crc32: u32,
    /// Length of the file range once decompressed.
    pub raw_len: u32,
    /// One zstd frame.
    pub payload: Bytes,
}

impl DataZ {
    /// A compressed frame for the range `[offset, offset + raw_len)`, with its CRC computed.
    pub fn new(transfer_id: u64, offset: u64, raw_len: u32, payload: Bytes) -> Self {
        Self {
            transfer_id,
            offset,
            crc32: crc32fast::hash(&payload),
            raw_len,
            payload,
        }
    }

    /// The file range this frame covers once decompressed.
    pub fn range(&self) -> ByteRange {
        ByteRange::new(self.offset, self.offset + u64::from(self.raw_len))
    }

    /// Whether the compressed bytes match their CRC.
    pub fn crc_matches(&self) -> bool {
        crc32fast::hash(&self.payload) == self.crc32
    }

    /// Length prefix, type byte and fixed header; the payload follows on the wire.
    pub fn header(&self) -> [u8; LEN_AND_DATAZ_HEADER] {
        let mut out = [0u8; LEN_AND_DATAZ_HEADER];
        let mut b = &mut out[..];
        b.put_u32((1 + DATAZ_HEADER_LEN + self.payload.len()) as u32);
        b.put_u8(FrameType::DataZ as u8);
        b.put_u64(self.transfer_id);
        b.put_u64(self.offset);
        b.put_u32(self.payload.len() as u32);
        b.put_u32(self.crc32);
        b.put_u32(self.raw_len);
        out
    }
}

/// Client → server (`CAP_COMPRESSION`): how the server compresses what it sends on this
/// connection from now on (`Data` answering `ReadChunk`, and the copies it carries out).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetCompression {
    /// [`COMPRESSION_OFF`], [`COMPRESSION_AUTO`], or a zstd level in
    /// 1..=[`MAX_COMPRESSION_LEVEL`].
    pub mode: u8,
}

/// `SetCompression.mode`: send every chunk as it is.
pub const COMPRESSION_OFF: u8 = 0;
/// `SetCompression.mode`: the sender decides per chunk from what it measures.
pub const COMPRESSION_AUTO: u8 = 0xff;
/// Highest zstd level `SetCompression.mode` may name.
pub const MAX_COMPRESSION_LEVEL: u8 = 22;

/// A transfer and a whole-file digest: the body of `Commit` and `Committed` (uploads) and of
/// `DigestRequest` (downloads, digest empty).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Commit {
    /// Transfer handle.
    pub transfer_id: u64,
    /// XXH3-128 of the whole file in order (16 bytes, big-endian); empty in `DigestRequest`.
    pub digest: Vec<u8>,
}

/// Server → client answer to `DigestRequest`: a download's whole-file digest. Encoded as
/// [`Commit`] is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DigestReply {
    /// Transfer handle.
    pub transfer_id: u64,
    /// XXH3-128 of the whole file in order (16 bytes, big-endian).
    pub digest: Vec<u8>,
}

/// Client → server: list a directory under the root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct List {
    /// Directory, `/`-separated, relative to the root; empty for the root itself.
    pub dir: String,
}

/// One file or directory in a `Listing`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListEntry {
    /// Name within the listed directory.
    pub name: String,
    /// Size in bytes (0 for directories).
    pub size: u64,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    /// True for a directory.
    pub is_dir: bool,
}

/// Server → client: part of a directory listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listing {
    /// Up to `MAX_LISTING_ENTRIES` entries.
    pub entries: Vec<ListEntry>,
    /// True when more `Listing` frames follow.
    pub more: bool,
}

/// Kind of a tree entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link (copied as a link, never followed).
    Symlink,
    /// A device, FIFO or socket: listed so the copier can warn; never copied.
    Special,
}

/// One entry of a directory tree, named relative to the tree's top.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeEntry {
    /// `/`-separated path below the top of the tree; empty for the top itself.
    pub path: String,
    /// What it is.
    pub kind: EntryKind,
    /// Size in bytes (files only).
    pub size: u64,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    /// Unix permission bits.
    pub mode: u32,
    /// Link target (symlinks only).
    pub target: String,
    /// Whole-file digest (files, when asked for).
    pub digest: Vec<u8>,
}

/// Client → server: list the tree under `dir`, recursively.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListTree {
    /// Top of the tree, relative to the root; empty for the root.
    pub dir: String,
    /// Compute each file's whole-file digest (reads every file).
    pub digests: bool,
}

/// Server → client: part of a tree listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeListing {
    /// Entries, parents before their children.
    pub entries: Vec<TreeEntry>,
    /// True when more `TreeListing` frames follow.
    pub more: bool,
}

/// Client → server: a whole small file, metadata and bytes together.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutFile {
    /// Destination, relative to the root.
    pub name: String,
    /// Modification time to set, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    /// Unix permission bits to set.
    pub mode: u32,
    /// CRC32 of `data`.
    pub crc32: u32,
    /// The file's bytes (at most `MAX_CONTROL_LEN` minus the rest of the body). Encoded as
    /// bytes rather than a sequence of `u8`: the same wire format, copied in one piece.
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

/// Client → server: create a directory (and missing parents) and set its mode and mtime.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MakeDir {
    /// Directory, relative to the root.
    pub name: String,
    /// Unix permission bits.
    pub mode: u32,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
}

/// Client → server: create (or replace) a symbolic link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MakeLink {
    /// Link, relative to the root.
    pub name: String,
    /// Relative target; it must stay inside the root when resolved from the link's directory.
    pub target: String,
}

/// Client → server: send a whole small file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetFile {
    /// File, relative to the root.
    pub name: String,
    /// Largest size to send whole; a larger file is refused with `TooLarge`.
    pub max_size: u32,
}

/// Server → client answer to `GetFile`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileData {
    /// The file's identity as read.
    pub identity: FileIdentity,
    /// Unix permission bits.
    pub mode: u32,
    /// CRC32 of `data`.
    pub crc32: u32,
    /// The bytes (encoded in one piece, as `PutFile::data`).
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

/// Server → client: the tree request (`PutFile`, `MakeDir`, `MakeLink`, `Sync`) named is done.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Done {
    /// The request's name (empty for `Sync`).
    pub name: String,
}

/// Client → server (`CAP_TREE_CLOSE`): carry out the frames after this one on the connection
/// only once no upload of these names is open on the server without its `Commit` carried out,
/// on whichever connection it was opened. A tree's closing (`SetMeta`s of its directories,
/// `Sync`) then goes with its last commits instead of a round trip after their answers.
/// Answered `Done` (its name empty) once that holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AwaitCommits {
    /// Destination names, relative to the root, each of an upload whose `Commit` the client
    /// sent; at most [`crate::MAX_AWAITED`].
    pub names: Vec<String>,
}

/// Either direction: the request failed; see `code`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorFrame {
    /// An [`ErrorCode`] value; unknown values must be treated as fatal.
    pub code: u16,
    /// Human-readable reason, one line.
    pub message: String,
}

impl ErrorFrame {
    /// An error frame with `code` and `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code: code as u16,
            message: message.into(),
        }
    }

    /// The code, if this implementation knows it.
    pub fn error_code(&self) -> Option<ErrorCode> {
        ErrorCode::from_u16(self.code)
    }
}

impl std::fmt::Display for ErrorFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Messages are written to stand alone ("no such file: a.bin"); the code's description
        // fills in when the peer sent none.
        match self.error_code() {
            _ if !self.message.is_empty() => f.write_str(&self.message),
            Some(code) => f.write_str(code.describe()),
            None => write!(f, "error code {}", self.code),
        }
    }
}

/// The one table of frames: for each, its type byte, its body and what it is for. `Name(Body)`
/// is a control frame whose body is encoded with bincode, `Name[Body]` one with a fixed header
/// of its own (`Data`), and a bare `Name` a frame without a body. From it come [`FrameType`],
/// [`Frame`], and the type byte, name, encoding and decoding of every frame.
macro_rules! frame_types {
    {$(
        $(#[$doc:meta])*
        $name:ident $(($body:ty))? $([$raw:ty])? = $byte:literal,
    )*} => {
        /// Type byte of each frame (see `proto.md`, "Frames").
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[repr(u8)]
        pub enum FrameType {
            $( $(#[$doc])* $name = $byte, )*
        }

        impl FrameType {
            /// The type for a type byte.
            ///
            /// # Errors
            /// [`ProtoError::UnknownType`] for a byte that names no frame.
            pub fn from_u8(byte: u8) -> Result<Self, ProtoError> {
                match byte {
                    $( $byte => Ok(Self::$name), )*
                    other => Err(ProtoError::UnknownType(other)),
                }
            }

            /// Name used in errors and logs.
            pub fn name(self) -> &'static str {
                match self {
                    $( Self::$name => stringify!($name), )*
                }
            }
        }

        /// Every frame of the protocol.
        #[derive(Debug, Clone, PartialEq, Eq)]
        #[allow(missing_docs)] // each variant is documented on its type byte
        pub enum Frame {
            $( $name $(($body))? $(($raw))?, )*
        }

        impl Frame {
            /// The frame's type byte.
            pub fn frame_type(&self) -> FrameType {
                match self {
                    $( Self::$name { .. } => FrameType::$name, )*
                }
            }

            /// Appends the encoded body of a control frame to `dst` (nothing for a frame
            /// without one); `None`, appending nothing, for a frame with a header of its own.
            fn control_body_into(&self, dst: &mut BytesMut) -> Option<Result<(), String>> {
                match self {
                    $(
                        Self::$name $((frame_types!(@bind body $body)))? $((frame_types!(@bind body $raw)))?
                            => frame_types!(@encode body, dst $(control $body)? $(raw $raw)?),
                    )*
                }
            }

            /// The frame of type `ty` with `body`.
            fn from_body(ty: FrameType, body: Bytes) -> Result<Self, ProtoError> {
                Ok(match ty {
                    $(
                        FrameType::$name
                            => frame_types!(@decode $name, ty, body $(control $body)? $(raw $raw)?),
                    )*
                })
            }
        }
    };
    (@bind $b:ident $t:ty) => { $b };
    (@encode $b:ident, $dst:ident) => {{
        let _ = $dst;
        Some(Ok(()))
    }};
    (@encode $b:ident, $dst:ident control $t:ty) => { Some(encode_body_into($b, $dst)) };
    (@encode $b:ident, $dst:ident raw $t:ty) => {{
        let _ = ($b, $dst);
        None
    }};
    (@decode $name:ident, $ty:ident, $b:ident) => {
        if $b.is_empty() {
            Self::$name
        } else {
            return Err(ProtoError::BadBody {
                kind: $ty.name(),
                reason: "non-empty".into(),
            });
        }
    };
    (@decode $name:ident, $ty:ident, $b:ident control $t:ty) => {
        Self::$name(decode_body($ty, &$b)?)
    };
    (@decode $name:ident, $ty:ident, $b:ident raw $t:ty) => {
        Self::$name(<$t>::decode_raw($b)?)
    };
}

frame_types! {
    /// [`Hello`]
    Hello(Hello) = 0x01,
    /// [`Welcome`]
    Welcome(Welcome) = 0x02,
    /// [`Challenge`]
    Challenge(Challenge) = 0x03,
    /// [`Auth`]
    Auth(Auth) = 0x04,
    /// [`EarlyChallenge`] (`CAP_EARLY_AUTH`)
    EarlyChallenge(EarlyChallenge) = 0x65,
    /// [`EarlyAuth`]: right behind a `Hello` offering `CAP_ZERO_RTT`
    EarlyAuth(EarlyAuth) = 0x06,
    /// [`EarlyRefused`]: the `EarlyAuth` was not taken; answer the `EarlyChallenge` with `Auth`
    EarlyRefused(EarlyRefused) = 0x07,
    /// [`IdleTimeout`]: right behind `Welcome` (`CAP_IDLE_TIMEOUT`)
    IdleTimeout(IdleTimeout) = 0x68,
    /// No body: server → client answer to a `Hello` offering `CAP_TLS`; both sides now run a
    /// TLS handshake on the connection, and the client starts again with `Hello` inside it.
    StartTls = 0x05,
    /// [`OpenWrite`]
    OpenWrite(OpenWrite) = 0x10,
    /// [`WriteOpened`]
    WriteOpened(WriteOpened) = 0x11,
    /// [`OpenRead`]
    OpenRead(OpenRead) = 0x12,
    /// [`ReadOpened`]
    ReadOpened(ReadOpened) = 0x13,
    /// [`ChunkRef`] asking for data
    ReadChunk(ChunkRef) = 0x14,
    /// [`Commit`] asking for the whole-file digest of a download (its digest empty)
    DigestRequest(Commit) = 0x15,
    /// [`DigestReply`]: the whole-file digest of a download
    DigestReply(DigestReply) = 0x16,
    /// [`Data`]
    Data[Data] = 0x20,
    /// [`ChunkRef`] confirming data is written and recorded
    Ack(ChunkRef) = 0x21,
    /// [`ChunkRef`] refusing data whose CRC did not match: send it again
    Reject(ChunkRef) = 0x22,
    /// [`DataZ`]: a compressed chunk (`CAP_COMPRESSION`)
    DataZ[DataZ] = 0x23,
    /// [`SetCompression`]: how the server compresses what it sends (`CAP_COMPRESSION`)
    SetCompression(SetCompression) = 0x24,
    /// [`ChunkRef`]: the range is all zeros, a hole (`CAP_TREE_META`)
    Zeros(ChunkRef) = 0x2f,
    /// [`Commit`]: every byte is acknowledged; check the digest and make the file final
    Commit(Commit) = 0x30,
    /// [`Commit`] confirming the file is final, with the receiver's digest
    Committed(Commit) = 0x31,
    /// [`List`]
    List(List) = 0x40,
    /// [`Listing`]
    Listing(Listing) = 0x41,
    /// [`ListTree`]
    ListTree(ListTree) = 0x42,
    /// [`TreeListing`]
    TreeListing(TreeListing) = 0x43,
    /// [`ListTreeMeta`]
    ListTreeMeta(ListTreeMeta) = 0x4e,
    /// [`TreeMetaListing`]
    TreeMetaListing(TreeMetaListing) = 0x4f,
    /// [`PackedTreeMetaListing`](crate::PackedTreeMetaListing): a `TreeMetaListing`,
    /// compressed (`CAP_PACKED_LISTING`)
    PackedTreeMetaListing(crate::PackedTreeMetaListing) = 0x44,
    /// [`OpenWriteSparse`](crate::OpenWriteSparse): `OpenWrite` of a file with holes
    /// (`CAP_TREE_META_V2`)
    OpenWriteSparse(crate::OpenWriteSparse) = 0x45,
    /// [`ReadOpenedSparse`](crate::ReadOpenedSparse): `ReadOpened` of a file with holes
    /// (`CAP_TREE_META_V2`)
    ReadOpenedSparse(crate::ReadOpenedSparse) = 0x46,
    /// [`PutFileMeta`](crate::PutFileMeta): a `PutFile` with its owner and attributes
    /// (`CAP_PUT_META`)
    PutFileMeta(crate::PutFileMeta) = 0x47,
    /// [`PutFile`]
    PutFile(PutFile) = 0x50,
    /// [`MakeDir`]
    MakeDir(MakeDir) = 0x51,
    /// [`MakeLink`]
    MakeLink(MakeLink) = 0x52,
    /// [`GetFile`]
    GetFile(GetFile) = 0x53,
    /// [`FileData`]
    FileData(FileData) = 0x54,
    /// [`PackedFiles`](crate::PackedFiles) holding `PutFile` frames (`CAP_PACKED_FILES`)
    PackedPutFiles(crate::PackedFiles) = 0x58,
    /// [`PackedFiles`](crate::PackedFiles) holding answers to `GetFile` (`CAP_PACKED_FILES`)
    PackedFileData(crate::PackedFiles) = 0x59,
    /// No body: flush everything written under the root to stable storage
    Sync = 0x55,
    /// [`Done`]
    Done(Done) = 0x56,
    /// [`MakeNode`]
    MakeNode(MakeNode) = 0x5c,
    /// [`MakeHardLink`]
    MakeHardLink(MakeHardLink) = 0x5d,
    /// [`MetaSet`]
    MetaSet(MetaSet) = 0x5e,
    /// [`SetMeta`]
    SetMeta(SetMeta) = 0x5f,
    /// [`CopyTo`]
    CopyTo(CopyTo) = 0x60,
    /// [`Progress`]
    Progress(Progress) = 0x61,
    /// [`CopyDone`]
    CopyDone(CopyDone) = 0x62,
    /// [`Delete`](crate::Delete): remove one entry (needs `CAP_DELETE`)
    Delete(crate::Delete) = 0x57,
    /// [`MirrorTo`](crate::MirrorTo): a tree copy with filters or deletion (needs `CAP_MIRROR`)
    MirrorTo(crate::MirrorTo) = 0x63,
    /// [`Changes`](crate::Changes): what a `MirrorTo` changed
    Changes(crate::Changes) = 0x64,
    /// [`CopyDoneMeta`]
    CopyDoneMeta(CopyDoneMeta) = 0x6e,
    /// [`AwaitCommits`]: what follows waits for these uploads' commits (`CAP_TREE_CLOSE`)
    AwaitCommits(AwaitCommits) = 0x6a,
    /// [`DeltaOpen`](crate::DeltaOpen): index the basis of a delta upload (`CAP_DELTA`)
    DeltaOpen(crate::DeltaOpen) = 0x70,
    /// [`DeltaIndex`](crate::DeltaIndex): the basis is indexed
    DeltaIndex(crate::DeltaIndex) = 0x71,
    /// [`DeltaSig`](crate::DeltaSig): chunks of the new file
    DeltaSig(crate::DeltaSig) = 0x72,
    /// [`DeltaMatch`](crate::DeltaMatch): the chunks copied from the basis
    DeltaMatch(crate::DeltaMatch) = 0x73,
    /// [`ReadSig`](crate::ReadSig): chunks of a download's file, answered by `DeltaSig`
    ReadSig(crate::ReadSig) = 0x74,
    /// [`DeltaResume`](crate::DeltaResume): which spans of a delta were answered
    /// (`CAP_DELTA_PIPELINE`)
    DeltaResume(crate::DeltaResume) = 0x75,
    /// [`DeltaAgreed`](crate::DeltaAgreed): the spans answered so far
    DeltaAgreed(crate::DeltaAgreed) = 0x76,
    /// [`CopyMode`]: delta or whole file for the next copy (`CAP_COPY_DELTA`)
    CopyMode(CopyMode) = 0x77,
    /// [`DeltaPut`](crate::DeltaPut): open a light file's upload with its whole signature
    /// (`CAP_DELTA_PUT`)
    DeltaPut(crate::DeltaPut) = 0x7a,
    /// [`DeltaBlocks`](crate::DeltaBlocks): the basis around a `DeltaPut`'s unmatched spans,
    /// summed in blocks (`CAP_DELTA_FINE`)
    DeltaBlocks(crate::DeltaBlocks) = 0x66,
    /// [`DeltaCopy`](crate::DeltaCopy): runs of the basis to copy, found within those spans
    /// (`CAP_DELTA_FINE`)
    DeltaCopy(crate::DeltaCopy) = 0x67,
    /// [`CopyDelta`]: what a single-file copy's delta moved (`CAP_COPY_DELTA`)
    CopyDelta(CopyDelta) = 0x78,
    /// [`CopyReason`]: why a single-file copy went as a delta or whole (`CAP_COPY_REASON`)
    CopyReason(CopyReason) = 0x79,
    /// [`PathReport`]: how the server's socket sees the path (`CAP_PATH_REPORT`)
    PathReport(PathReport) = 0x7b,
    /// [`DeltaSig`](crate::DeltaSig)'s body, guessed chunks: looked for only where the
    /// previous match puts them (`CAP_DELTA_GUESS`)
    DeltaGuess(crate::DeltaSig) = 0x7d,
    /// No body: the sender closes the connection cleanly.
    Goodbye = 0x7e,
    /// [`ErrorFrame`]
    Error(ErrorFrame) = 0x7f,
}

impl Frame {
    /// True for the client frames that change nothing on the server but what it sends on this
    /// connection: the only ones a client may send behind an `EarlyAuth`, before the server's
    /// nonce is proven, so that a replayed early flight can at worst repeat a read (proto.md
    /// §4.5, *Zero round trip*).
    pub fn is_read_only(&self) -> bool {
        matches!(
            self,
            Self::List(_)
                | Self::ListTree(_)
                | Self::ListTreeMeta(_)
                | Self::OpenRead(_)
                | Self::ReadChunk(_)
                | Self::DigestRequest(_)
                | Self::ReadSig(_)
                | Self::GetFile(_)
                | Self::SetCompression(_)
        )
    }

    /// Appends the whole frame (length prefix, type, body) to `dst`.
    ///
    /// # Errors
    /// [`ProtoError::BadBody`] if a control body cannot be encoded, [`ProtoError::FrameTooLarge`]
    /// if it exceeds `MAX_CONTROL_LEN`.
    pub fn encode(&self, dst: &mut BytesMut) -> Result<(), ProtoError> {
        // The body is encoded in place, behind a length prefix filled in once it is known: a
        // body encoded apart grew by doubling and was copied again, twice or more per byte of
        // a small file's data, a tree sender's largest cost after reading and compressing.
        let start = dst.len();
        let header = crate::LEN_PREFIX + 1;
        dst.reserve(header);
        dst.put_u32(0);
        dst.put_u8(self.frame_type() as u8);
        let Some(body) = self.control_body_into(dst) else {
            dst.truncate(start);
            let (header, payload) = self.raw_parts().expect("a frame without a control body");
            dst.reserve(header.len() + payload.len());
            dst.put_slice(&header);
            dst.put_slice(payload);
            return Ok(());
        };
        let len = dst.len() - start - header;
        let refused = match body {
            Err(reason) => Some(ProtoError::BadBody {
                kind: self.frame_type().name(),
                reason,
            }),
            Ok(()) if len > MAX_CONTROL_LEN as usize => Some(ProtoError::FrameTooLarge {
                len: len as u32,
                max: MAX_CONTROL_LEN,
            }),
            Ok(()) => None,
        };
        if let Some(error) = refused {
            dst.truncate(start);
            return Err(error);
        }
        dst[start..start + crate::LEN_PREFIX].copy_from_slice(&(1 + len as u32).to_be_bytes());
        Ok(())
    }

    /// For `Data` and `DataZ`, the bytes before the payload (length prefix included) and the
    /// payload, so that a writer sends the payload without copying it.
    pub fn raw_parts(&self) -> Option<(Vec<u8>, &Bytes)> {
        match self {
            Self::Data(d) => Some((d.header().to_vec(), &d.payload)),
            Self::DataZ(z) => Some((z.header().to_vec(), &z.payload)),
            _ => None,
        }
    }

    /// Decodes one frame from its type byte and body (the length prefix already removed). A
    /// `Data` payload is a slice of `frame`, not a copy.
    ///
    /// # Errors
    /// A typed [`ProtoError`] for an unknown type, a truncated body or an undecodable body.
    pub fn decode(mut frame: Bytes) -> Result<Self, ProtoError> {
        if frame.is_empty() {
            return Err(ProtoError::EmptyFrame);
        }
        let ty = FrameType::from_u8(frame.get_u8())?;
        let frame = Self::from_body(ty, frame)?;
        // What a packed frame expands to is checked before anything is allocated for it.
        if let Self::PackedPutFiles(p) | Self::PackedFileData(p) = &frame {
            p.check(ty.name())?;
        }
        Ok(frame)
    }
}

pub(crate) fn encode_body<T: Serialize>(body: &T) -> Result<Vec<u8>, String> {
    bincode::serde::encode_to_vec(body, wire()).map_err(|e| e.to_string())
}

/// [`encode_body`] appended to `dst`.
fn encode_body_into<T: Serialize>(body: &T, dst: &mut BytesMut) -> Result<(), String> {
    bincode::serde::encode_into_writer(body, Appender(dst), wire()).map_err(|e| e.to_string())
}

/// Bincode's writer appending to a `BytesMut`.
struct Appender<'a>(&'a mut BytesMut);

impl bincode::enc::write::Writer for Appender<'_> {
    fn write(&mut self, bytes: &[u8]) -> Result<(), bincode::error::EncodeError> {
        self.0.extend_from_slice(bytes);
        Ok(())
    }
}

pub(crate) fn decode_body<T: serde::de::DeserializeOwned>(
    ty: FrameType,
    body: &[u8],
) -> Result<T, ProtoError> {
    let kind = ty.name();
    if body.len() > MAX_CONTROL_LEN as usize {
        return Err(ProtoError::FrameTooLarge {
            len: body.len() as u32,
            max: MAX_CONTROL_LEN,
        });
    }
    match bincode::serde::decode_from_slice(body, wire()) {
        Ok((value, used)) if used == body.len() => Ok(value),
        Ok((_, used)) => Err(ProtoError::BadBody {
            kind,
            reason: format!("{} trailing bytes", body.len() - used),
        }),
        Err(bincode::error::DecodeError::UnexpectedEnd { .. }) => Err(ProtoError::Truncated {
            kind,
            len: body.len(),
        }),
        Err(e) => Err(ProtoError::BadBody {
            kind,
            reason: e.to_string(),
        }),
    }
}

impl Data {
    fn decode_raw(body: Bytes) -> Result<Self, ProtoError> {
        decode_data(body)
    }
}

impl DataZ {
    fn decode_raw(mut body: Bytes) -> Result<Self, ProtoError> {
        let bad = |reason: String| ProtoError::BadBody {
            kind: "DataZ",
            reason,
        };
        if body.len() < DATAZ_HEADER_LEN {
            return Err(ProtoError::Truncated {
                kind: "DataZ",
                len: body.len(),
            });
        }
        let transfer_id = body.get_u64();
        let offset = body.get_u64();
        let len = body.get_u32();
        let crc32 = body.get_u32();
        let raw_len = body.get_u32();
        if len as usize != body.len() {
            return Err(bad(format!(
                "header says {len} payload bytes, frame holds {}",
                body.len()
            )));
        }
        // Limits on what the payload expands to are checked here, before anything is
        // allocated for it; a payload never expands less than it shrank.
        if raw_len > crate::MAX_CHUNK_SIZE {
            return Err(bad(format!(
                "decompressed size {raw_len} above the largest chunk"
            )));
        }
        if len > raw_len {
            return Err(bad(format!(
                "{len} compressed bytes for {raw_len} decompressed"
            )));
        }
        if offset.checked_add(u64::from(raw_len)).is_none() {
            return Err(bad("offset overflows".into()));
        }
        Ok(Self {
            transfer_id,
            offset,
            crc32,
            raw_len,
            payload: body,
        })
    }
}

fn decode_data(mut body: Bytes) -> Result<Data, ProtoError> {
    if body.len() < DATA_HEADER_LEN {
        return Err(ProtoError::Truncated {
            kind: "Data",
            len: body.len(),
        });
    }
    let transfer_id = body.get_u64();
    let offset = body.get_u64();
    let len = body.get_u32();
    let crc32 = body.get_u32();
    if len as usize != body.len() {
        return Err(ProtoError::BadBody {
            kind: "Data",
            reason: format!(
                "header says {len} payload bytes, frame holds {}",
                body.len()
            ),
        });
    }
    if offset.checked_add(u64::from(len)).is_none() {
        return Err(ProtoError::BadBody {
            kind: "Data",
            reason: "offset overflows".into(),
        });
    }
    Ok(Data {
        transfer_id,
        offset,
        crc32,
        payload: body,
    })
}
