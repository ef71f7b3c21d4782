//! Bodies of the mirroring frames: `Delete` (remove one entry beneath the root), `MirrorTo` (a
//! tree copy to another daemon with filters, deletion or a dry run) and `Changes` (what such a
//! copy changed, or would change). Both need a capability negotiated in the handshake
//! (`CAP_DELETE`, `CAP_MIRROR`), so an older peer is never sent one.

use serde::{Deserialize, Serialize};

use crate::{CopyTo, EntryKind};

/// Client → server: remove the entry `name`, never following a symbolic link; a directory only
/// once it is empty. Needs `CAP_DELETE` in force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delete {
    /// The entry, relative to the root; never the root itself.
    pub name: String,
}

/// One filter pattern of a mirror copy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilterRule {
    /// True for `--include`, false for `--exclude`.
    pub include: bool,
    /// A gitignore-style glob.
    pub pattern: String,
}

/// Client → server: copy the tree `copy.source` to another daemon as `CopyTo` does, with
/// filters, deletion of what the source lacks, or only reporting what would change. Needs
/// `CAP_MIRROR` in force; answered like `CopyTo`, with `Changes` frames before `CopyDone`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MirrorTo {
    /// Where from and where to, as for `CopyTo`; `recursive` must be true.
    pub copy: CopyTo,
    /// Filter patterns, in the order given.
    pub rules: Vec<FilterRule>,
    /// Remove from the destination tree what the source lacks, once the copy succeeded.
    pub delete: bool,
    /// With `delete`: remove excluded entries too.
    pub delete_excluded: bool,
    /// Change nothing: only report what would change.
    pub dry_run: bool,
}

/// What happens to one entry of a mirror copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChangeAction {
    /// The destination lacks it.
    Create,
    /// The destination has a different version.
    Update,
    /// The destination has it and the source does not.
    Delete,
}

/// One entry changed (or to be changed) by a mirror copy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// What happens to it.
    pub action: ChangeAction,
    /// What it is (on the source for `Create` and `Update`, at the destination for `Delete`).
    pub kind: EntryKind,
    /// Which attributes differ, for `Update`: bits of `CHANGED_*`.
    pub differs: u32,
    /// Path relative to the top of the tree.
    pub path: String,
    /// A symbolic link's target; empty otherwise.
    pub target: String,
}

/// `Change::differs`: the contents (digests) differ.
pub const CHANGED_CONTENT: u32 = 1 << 0;
/// `Change::differs`: the sizes differ.
pub const CHANGED_SIZE: u32 = 1 << 1;
/// `Change::differs`: the modification times differ.
pub const CHANGED_MTIME: u32 = 1 << 2;
/// `Change::differs`: the permission bits differ.
pub const CHANGED_MODE: u32 = 1 << 3;

/// Server → client while a `MirrorTo` runs: a page of the changes it made or would make.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Changes {
    /// At most `MAX_LISTING_ENTRIES` changes.
    pub changes: Vec<Change>,
}
