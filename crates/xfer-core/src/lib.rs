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
/// directory so the final rename is atomic (for a long leaf, see [`reserved_name`]).
pub fn partial_name(leaf: &str) -> String {
    reserved_name(leaf, PARTIAL_SUFFIX)
}

/// Name of the resume journal of `leaf`: `.LEAF.xfer-state` (for a long leaf, see
/// [`reserved_name`]).
pub fn journal_name(leaf: &str) -> String {
    reserved_name(leaf, JOURNAL_SUFFIX)
}

/// Bytes of a component, the most a filesystem takes in one name.
const MAX_COMPONENT: usize = 255;
/// Wire bytes of a long leaf kept in its partial and journal names.
const KEPT_OF_LONG_LEAF: usize = 200;

/// `.LEAF` and `suffix`, or, where that would not fit in a component (a leaf of more than 243
/// bytes), the leaf's first 200 bytes, `~` and a hash of the whole leaf: every name a
/// filesystem takes has a partial and a journal it also takes, and the same leaf always gives
/// the same names, so that a resumed upload finds them again (proto.md §8.3).
fn reserved_name(leaf: &str, suffix: &str) -> String {
    let on_disk = xfer_proto::names::unescape(leaf).len();
    if 1 + on_disk + JOURNAL_SUFFIX.len() <= MAX_COMPONENT {
        return format!(".{leaf}{suffix}");
    }
    let mut cut = KEPT_OF_LONG_LEAF.min(leaf.len());
    while !leaf.is_char_boundary(cut) {
        cut -= 1;
    }
    let hash = xxhash_rust::xxh3::xxh3_64(leaf.as_bytes());
    format!(".{}~{hash:016x}{suffix}", &leaf[..cut])
}

/// True for names reserved for partial and journal files.
pub fn is_reserved_name(leaf: &str) -> bool {
    leaf.starts_with('.') && (leaf.ends_with(PARTIAL_SUFFIX) || leaf.ends_with(JOURNAL_SUFFIX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_leaf_a_filesystem_takes_has_partial_and_journal_names_it_takes_too() {
        assert_eq!(partial_name("f.iso"), ".f.iso.xfer-part");
        assert_eq!(journal_name("f.iso"), ".f.iso.xfer-state");
        let longest_kept = "k".repeat(243);
        assert_eq!(journal_name(&longest_kept).len(), 255);
        let (a, b) = ("a".repeat(255), format!("{}b", "a".repeat(254)));
        let latin1 = xfer_proto::names::escape(&[0xE9; 255]).into_owned();
        for leaf in [&a, &b, &"é".repeat(127), &latin1] {
            for name in [partial_name(leaf), journal_name(leaf)] {
                assert!(on_disk(&name).len() <= MAX_COMPONENT, "{name}");
                assert!(is_reserved_name(&name), "{name}");
            }
        }
        // The form proto.md §8.3 fixes, so that a resumed upload finds its journal again across
        // versions: the hash as Python's `xxhash.xxh3_64` computes it.
        let cut = "a".repeat(200);
        assert_eq!(
            journal_name(&a),
            format!(".{cut}~a582b761e1e78c49.xfer-state")
        );
        assert_eq!(
            partial_name(&b),
            format!(".{cut}~219985f6046a892a.xfer-part")
        );
        // Leaves that share the kept part still have names of their own.
        assert_ne!(partial_name(&a), partial_name(&b));
        assert_ne!(journal_name(&a), journal_name(&b));
    }
}
