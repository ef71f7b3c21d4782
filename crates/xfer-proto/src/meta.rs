//! Bodies of the frames that carry what a tree copy keeps beyond bytes, mode and mtime: owner
//! and group, hard-link groups, extended attributes (POSIX ACLs among them), holes of sparse
//! files, device and special files. In force only with [`crate::CAP_TREE_META`].

use serde::{Deserialize, Serialize};

use crate::{ByteRange, CopyDone, OpenWrite, ProtoError, TreeEntry};

/// Most holes one listing entry carries: a file with more is described by its largest ones.
pub const MAX_HOLES: usize = 1024;

/// Client → server, with [`crate::CAP_TREE_META_V2`] in force: an [`OpenWrite`] of a file with
/// holes. A new partial gets disk space only for the bytes outside `holes`, so a sparse file
/// larger than the free space still lands; the holes travel as `Zeros` as before.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenWriteSparse {
    /// The upload, exactly as `OpenWrite` would open it.
    pub open: OpenWrite,
    /// Holes of the source file, sorted, disjoint, within its size; at most [`MAX_HOLES`].
    pub holes: Vec<ByteRange>,
}

/// Server → client, with [`crate::CAP_TREE_META_V2`] in force: the answer to `OpenRead` for a
/// file with holes, so the client reserves space only for the bytes between them and asks for
/// none of the holes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadOpenedSparse {
    /// The download, exactly as `ReadOpened` would give it.
    pub opened: crate::ReadOpened,
    /// Holes of the file as opened, sorted, disjoint, within its size; at most [`MAX_HOLES`].
    pub holes: Vec<ByteRange>,
}

/// One extended attribute: its full name (`user.x`, `system.posix_acl_access`, …) and value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Xattr {
    /// Namespace-qualified name.
    pub name: String,
    /// Raw value (for ACLs, the kernel's `posix_acl_xattr` encoding).
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
}

/// What an entry carries besides [`TreeEntry`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// Owner's user id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// Owner's user name, empty when the id has none.
    pub user: String,
    /// Group name, empty when the id has none.
    pub group: String,
    /// Non-zero for a file with more than one name in the tree: every entry of one inode
    /// carries the same value, unique within the listing.
    pub link_group: u64,
    /// File type and permission bits as `st_mode` gives them (`S_IFMT` included), for
    /// devices, FIFOs and sockets.
    pub st_mode: u32,
    /// Device number of a block or character device.
    pub rdev: u64,
    /// Bytes the file occupies on disk (`st_blocks * 512`).
    pub allocated: u64,
    /// Holes of a sparse file (found with `SEEK_HOLE`/`SEEK_DATA`), sorted, disjoint; at most
    /// [`MAX_HOLES`].
    pub holes: Vec<ByteRange>,
    /// Extended attributes, sorted by name; empty when not asked for.
    pub xattrs: Vec<Xattr>,
}

/// One entry of a [`TreeMetaListing`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaEntry {
    /// Path, kind, size, mtime, mode, link target and digest, as in `TreeListing`.
    pub entry: TreeEntry,
    /// Owner, group, link group, attributes, holes.
    pub meta: Meta,
}

/// Client → server: list the tree under `dir` with each entry's [`Meta`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListTreeMeta {
    /// Top of the tree, relative to the root; empty for the root.
    pub dir: String,
    /// Compute each file's whole-file digest (reads every file).
    pub digests: bool,
    /// Include extended attributes.
    pub xattrs: bool,
}

/// Server → client: part of a tree listing with metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeMetaListing {
    /// Entries, parents before their children.
    pub entries: Vec<MetaEntry>,
    /// True when more `TreeMetaListing` frames follow.
    pub more: bool,
}

/// Server → client, with [`crate::CAP_PACKED_LISTING`] in force: a [`TreeMetaListing`] page
/// whose body is one zstd frame. A listing's bytes repeat (owners, sizes, path prefixes), and
/// over a long path every one of them costs time in slow start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackedTreeMetaListing {
    /// A zstd frame holding the body of a `TreeMetaListing` frame.
    #[serde(with = "serde_bytes")]
    pub zstd: Vec<u8>,
}

/// zstd level of a packed listing: fast, and most of the gain is had by then.
const PACK_LEVEL: i32 = 3;

impl PackedTreeMetaListing {
    /// Compresses `page`.
    ///
    /// # Errors
    /// [`ProtoError::BadBody`] if the page cannot be encoded or compressed.
    pub fn pack(page: &TreeMetaListing) -> Result<Self, ProtoError> {
        let bad = |reason: String| ProtoError::BadBody {
            kind: "PackedTreeMetaListing",
            reason,
        };
        let body = crate::frame::encode_body(page).map_err(bad)?;
        let zstd = zstd::bulk::compress(&body, PACK_LEVEL).map_err(|e| bad(e.to_string()))?;
        Ok(Self { zstd })
    }

    /// The page: decompressed into at most `MAX_CONTROL_LEN` bytes, then decoded as a
    /// `TreeMetaListing` body.
    ///
    /// # Errors
    /// [`ProtoError::BadBody`] if it does not decompress within the limit or is no valid body.
    pub fn unpack(&self) -> Result<TreeMetaListing, ProtoError> {
        let body =
            zstd::bulk::decompress(&self.zstd, crate::MAX_CONTROL_LEN as usize).map_err(|e| {
                ProtoError::BadBody {
                    kind: "PackedTreeMetaListing",
                    reason: format!("zstd: {e}"),
                }
            })?;
        crate::frame::decode_body(crate::frame::FrameType::TreeMetaListing, &body)
    }
}

/// Client → server: give the existing entry `name` its owner, attributes, mode and mtime, in
/// that order (a change of owner clears set-id bits), never following a final symlink.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetMeta {
    /// Entry, relative to the root.
    pub name: String,
    /// Permission bits (`0o7777`); ignored for a symlink.
    pub mode: u32,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    /// Owner's user id on the sender.
    pub uid: u32,
    /// Group id on the sender.
    pub gid: u32,
    /// Owner's user name on the sender; the receiver uses its own id for that name unless
    /// `numeric_ids` (or the name is empty or unknown to it).
    pub user: String,
    /// Group name on the sender, as `user`.
    pub group: String,
    /// Keep the ids as numbers, not mapped by name.
    pub numeric_ids: bool,
    /// The entry's complete attribute set, which replaces the one it has; `None` leaves its
    /// attributes alone.
    pub xattrs: Option<Vec<Xattr>>,
}

/// Client → server, with [`crate::CAP_PUT_META`] in force: a small file stored as `PutFile`
/// stores it, given its owner, group and attributes before it gets its name, as a `SetMeta`
/// would give them afterwards; answered by [`MetaSet`]. A tree's small files then need no
/// `SetMeta` of their own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutFileMeta {
    /// The file; its `mode` is applied whole (`0o7777`), after the owner.
    pub file: crate::PutFile,
    /// Owner's user id on the sender.
    pub uid: u32,
    /// Group id on the sender.
    pub gid: u32,
    /// Owner's user name on the sender, as in [`SetMeta`].
    pub user: String,
    /// Group name on the sender, as in [`SetMeta`].
    pub group: String,
    /// Keep the ids as numbers, not mapped by name.
    pub numeric_ids: bool,
    /// The file's complete attribute set; `None` leaves those the new file has.
    pub xattrs: Option<Vec<Xattr>>,
}

impl PutFileMeta {
    /// The `SetMeta` that gives the stored file what this request carries besides its bytes.
    pub fn set_meta(&self) -> SetMeta {
        SetMeta {
            name: self.file.name.clone(),
            mode: self.file.mode,
            mtime_ns: self.file.mtime_ns,
            uid: self.uid,
            gid: self.gid,
            user: self.user.clone(),
            group: self.group.clone(),
            numeric_ids: self.numeric_ids,
            xattrs: self.xattrs.clone(),
        }
    }
}

/// Server → client answer to [`SetMeta`]: what could not be kept (the request still succeeds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaSet {
    /// The request's name.
    pub name: String,
    /// The receiver lacks the privilege to give the entry its owner or group.
    pub not_chowned: bool,
    /// The receiving filesystem refused the attributes; the reason, else empty.
    pub xattrs_refused: String,
}

/// Client → server: make `name` another name of the file `existing` (both relative to the
/// root; neither resolved through a symlink).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MakeHardLink {
    /// New name.
    pub name: String,
    /// A regular file the tree copy already stored.
    pub existing: String,
}

/// Client → server: create a device, FIFO or socket node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MakeNode {
    /// Node, relative to the root.
    pub name: String,
    /// `st_mode`: `S_IFCHR`, `S_IFBLK`, `S_IFIFO` or `S_IFSOCK` with permission bits.
    pub st_mode: u32,
    /// Device number (devices only).
    pub rdev: u64,
}

/// What a tree copy keeps, for a server-to-server copy ([`MirrorTo`](crate::MirrorTo)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeOptions {
    /// Keep ids as numbers (`--numeric-ids`).
    pub numeric_ids: bool,
    /// Leave out links that lead out of the tree (`--safe-links`).
    pub safe_links: bool,
    /// Copy extended attributes and ACLs (not `--no-xattrs`).
    pub xattrs: bool,
    /// Copy device files (`--devices`, `-D`).
    pub devices: bool,
    /// Copy FIFOs and sockets (`--specials`, `-D`).
    pub specials: bool,
}

impl Default for TreeOptions {
    fn default() -> Self {
        Self {
            numeric_ids: false,
            safe_links: false,
            xattrs: true,
            devices: false,
            specials: false,
        }
    }
}

/// Server → client: a [`MirrorTo`](crate::MirrorTo) finished (after its `Changes` frames).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyDoneMeta {
    /// The counts of `CopyDone`.
    pub done: CopyDone,
    /// Entries the destination could not give their owner or group.
    pub not_chowned: u64,
    /// Entries whose attributes the destination's filesystem refused.
    pub xattrs_refused: u64,
    /// Names stored as hard links to a file already copied.
    pub hard_links: u64,
    /// Entries left out (special files, unsafe links).
    pub entries_skipped: u64,
}
