//! The disk layer shared by the daemon and the client: byte-range bookkeeping, the resume
//! journal, positional reads and writes, names resolved beneath a root.
//!
//! # Layout
//! - [`buffers`]: [`buffers::BufferPool`], chunk buffers reused instead of freed.
//! - [`budget`]: [`MemoryBudget`], one bound on the buffers of a whole process.
//! - [`ranges`]: [`RangeSet`] and chunk splitting.
//! - [`delta`]: content-defined chunking and the receiver's index of the file it holds.
//! - [`digest`]: the whole-file digest both sides compare before the final rename.
//! - [`direct`]: received chunks written around the page cache where they are aligned.
//! - [`journal`]: the on-disk resume journal format.
//! - [`meta`]: owners, hard-link groups, attributes, holes and special nodes of tree entries.
//! - [`acl`]: POSIX ACL values, carried with the names of their entries.
//! - [`partial`]: [`PartialFile`], the receiving side (write at offset, journal, atomic rename).
//! - [`source`]: [`SourceFile`], the sending side (positional reads).
//! - [`root`]: [`Root`], names resolved beneath a directory by the kernel.
//! - [`tree`]: walking a tree and the small operations a tree copy is made of.
//! - [`filter`]: [`Filter`], the `--include`/`--exclude` patterns of a mirror copy.
//! - [`remove`]: removing one entry beneath a root for `--delete`, never through a link.
//!
//! Invariants: no socket is created here; blocking file I/O runs on tokio's blocking pool, never
//! on a runtime worker; no file is ever held whole in memory.
#![warn(missing_docs)]

pub mod acl;
pub mod budget;
pub mod buffers;
pub mod delta;
pub mod digest;
pub mod direct;
pub mod error;
pub mod filter;
pub mod fine;
pub mod journal;
pub mod meta;
pub mod partial;
pub mod ranges;
pub mod remove;
pub mod root;
pub mod source;
#[cfg(test)]
mod test_data;
pub mod tree;
pub mod writeback;

pub use budget::{MemoryBudget, Reservation};
pub use error::{CoreError, Result};
pub use filter::Filter;
pub use partial::{Durability, PartialFile};
pub use ranges::{split_into_chunks, RangeSet};
pub use root::{on_disk, validate_name, Root, Slot};
pub use source::SourceFile;
pub use tree::DirCache;
pub use writeback::Writeback;

const PARTIAL_SUFFIX: &str = ".xfer-part";
const JOURNAL_SUFFIX: &str = ".xfer-state";

/// The CPUs this process may use, asked of the system once: each asking reads the cgroup's CPU
/// quota from its files (a cost measured on every `DeltaPut` of a tree's light files).
pub fn cores() -> usize {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Name of the partial file that receives `leaf`: `.LEAF.xfer-part`, hidden, in the same
/// directory so the final rename is atomic.
pub fn partial_name(leaf: &str) -> String {
    format!(".{leaf}{PARTIAL_SUFFIX}")
}

/// Name of the resume journal of `leaf`: `.LEAF.xfer-state`.
pub fn journal_name(leaf: &str) -> String {
    format!(".{leaf}{JOURNAL_SUFFIX}")
}

/// True for names reserved for partial and journal files.
pub fn is_reserved_name(leaf: &str) -> bool {
    leaf.starts_with('.') && (leaf.ends_with(PARTIAL_SUFFIX) || leaf.ends_with(JOURNAL_SUFFIX))
}
