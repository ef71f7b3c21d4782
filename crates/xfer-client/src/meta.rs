//! What a tree copy keeps beyond bytes, mode and mtime, on the copier's side: which names of the
//! source are hard links to a file copied once, which device and special nodes are made, which
//! files travel with their holes, and the `SetMeta` requests (owner, attributes, mode, mtime)
//! that finish each entry, directories last and deepest first. Used with `CAP_TREE_META`; an
//! older daemon gets a tree copy without them and one warning.

use std::sync::Mutex;

use foldhash::{HashMap, HashMapExt, HashSet};
use xfer_proto::{EntryKind, Meta, MetaEntry, MetaSet, PutFile, PutFileMeta, SetMeta, TreeEntry};

use crate::tree::TreeSummary;

pub use xfer_proto::TreeOptions;

/// The metadata side of one tree copy: the source's listing with metadata, the receiver's, and
/// what they call for besides the files themselves.
#[derive(Debug, Default)]
pub(crate) struct MetaPlan {
    /// Source entries by path (the top is `""`).
    source: Vec<MetaEntry>,
    /// The receiver's entries by path.
    receiver: HashMap<String, MetaEntry>,
    /// Names to link to a file of the same link group: (name, existing), relative to the top.
    pub(crate) hard_links: Vec<(String, String)>,
    /// Device and special nodes to make (`--devices`, `--specials`, `-D`).
    pub(crate) nodes: Vec<MetaEntry>,
    /// Files with holes: they go through the chunked path, which skips holes.
    sparse: HashSet<String>,
    /// Every name of a link group but its first.
    later_names: HashSet<String>,
    keep: TreeOptions,
    /// Names (prefixed with the top) of the files stored with their metadata, or gone from
    /// the source before they were read: they get no `SetMeta`.
    finished: HashSet<String>,
}

/// The owners and attributes of a send's small files, for a daemon that stores them with the
/// files (`CAP_PUT_META`), and what it answered. Shared by the small-file connections.
#[derive(Debug)]
pub(crate) struct FileMetas {
    by_path: HashMap<String, Meta>,
    keep: TreeOptions,
    /// Names of the files stored with their metadata.
    finished: Mutex<HashSet<String>>,
    /// Answers that report something not kept, counted once the files are in.
    refused: Mutex<Vec<MetaSet>>,
}

impl FileMetas {
    /// `file`, of the source entry `path`, as the request that stores it: with its metadata
    /// when it is known (`named_acls`: the daemon takes ACLs with the names of their entries).
    pub(crate) fn put(&self, path: &str, file: PutFile, named_acls: bool) -> xfer_proto::Frame {
        let Some(meta) = self.by_path.get(path) else {
            return xfer_proto::Frame::PutFile(file);
        };
        let mut xattrs = self.keep.xattrs.then(|| meta.xattrs.clone());
        if !named_acls {
            for x in xattrs.iter_mut() {
                xfer_core::meta::xattrs_without_names(x);
            }
        }
        xfer_proto::Frame::PutFileMeta(PutFileMeta {
            file,
            uid: meta.uid,
            gid: meta.gid,
            user: meta.user.clone(),
            group: meta.group.clone(),
            numeric_ids: self.keep.numeric_ids,
            xattrs,
        })
    }

    /// Notes the daemon's answer to a file stored with its metadata.
    pub(crate) fn stored(&self, answer: MetaSet) {
        let flagged = answer.not_chowned || !answer.xattrs_refused.is_empty();
        self.finished
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(answer.name.clone());
        if flagged {
            self.refused
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(answer);
        }
    }
}

/// Names of `TreeEntry` lists, for the paths written in this run.
fn paths(entries: &[TreeEntry]) -> impl Iterator<Item = &str> {
    entries.iter().map(|e| e.path.as_str())
}

impl MetaPlan {
    /// Splits the source listing: hard-link names after the first of their group and nodes
    /// (those `keep` asks for) are taken out; the rest is returned for the usual plan, with the
    /// receiver's entries without their metadata.
    pub(crate) fn new(
        source: Vec<MetaEntry>,
        receiver: Vec<MetaEntry>,
        keep: TreeOptions,
        summary: &mut TreeSummary,
    ) -> (Self, Vec<TreeEntry>, HashMap<String, TreeEntry>) {
        let receiver: HashMap<String, MetaEntry> = receiver
            .into_iter()
            .map(|e| (e.entry.path.clone(), e))
            .collect();
        let plain_receiver = receiver
            .iter()
            .map(|(p, e)| (p.clone(), e.entry.clone()))
            .collect();
        let mut plan = Self {
            keep,
            ..Self::default()
        };
        // The first name of each link group seen; the listing is sorted, so it is the same
        // name every run.
        let mut leaders: HashMap<u64, String> = HashMap::new();
        let mut plain = Vec::with_capacity(source.len());
        for e in &source {
            let entry = &e.entry;
            match entry.kind {
                EntryKind::File if e.meta.link_group != 0 => {
                    if let Some(leader) = leaders.get(&e.meta.link_group) {
                        summary.files_total += 1;
                        summary.bytes_total += entry.size;
                        plan.hard_links.push((entry.path.clone(), leader.clone()));
                        plan.later_names.insert(entry.path.clone());
                        continue;
                    }
                    leaders.insert(e.meta.link_group, entry.path.clone());
                }
                EntryKind::Special if keep.wants(e.meta.st_mode) => {
                    let same = receiver.get(&entry.path).is_some_and(|r| {
                        r.meta.st_mode & 0o170000 == e.meta.st_mode & 0o170000
                            && r.meta.rdev == e.meta.rdev
                    });
                    if !same {
                        plan.nodes.push(e.clone());
                    }
                    continue;
                }
                _ => {}
            }
            if entry.kind == EntryKind::File
                && !e.meta.holes.is_empty()
                && e.meta.allocated < entry.size
            {
                plan.sparse.insert(entry.path.clone());
            }
            plain.push(entry.clone());
        }
        plan.source = source;
        plan.receiver = receiver;
        (plan, plain, plain_receiver)
    }

    /// The metadata of the files in `small` whose metadata was read, to be stored with them.
    pub(crate) fn file_metas(&self, small: &[TreeEntry]) -> FileMetas {
        let wanted: HashSet<&str> = small.iter().map(|e| e.path.as_str()).collect();
        let mut by_path = HashMap::with_capacity(wanted.len());
        by_path.extend(
            self.source
                .iter()
                .filter(|e| e.meta.st_mode != 0 && wanted.contains(e.entry.path.as_str()))
                .map(|e| (e.entry.path.clone(), e.meta.clone())),
        );
        FileMetas {
            by_path,
            keep: self.keep,
            finished: Mutex::default(),
            refused: Mutex::default(),
        }
    }

    /// Takes in what the daemon answered to the files stored with their metadata: they get no
    /// `SetMeta`, and what it could not keep is counted as a `SetMeta`'s answer would be.
    pub(crate) fn stored_with_files(&mut self, metas: &FileMetas, summary: &mut TreeSummary) {
        let finished =
            std::mem::take(&mut *metas.finished.lock().unwrap_or_else(|p| p.into_inner()));
        self.finished.extend(finished);
        let refused = std::mem::take(&mut *metas.refused.lock().unwrap_or_else(|p| p.into_inner()));
        let mut tally = Tally::default();
        for m in refused {
            tally.count(&m.name, m.not_chowned, &m.xattrs_refused, summary);
        }
    }

    /// Leaves out the source files that vanished before they were read (relative paths): no
    /// `SetMeta` for them, and no further name linked to them.
    pub(crate) fn vanished(&mut self, top: &str, vanished: &[String]) {
        let gone: HashSet<&str> = vanished.iter().map(String::as_str).collect();
        self.finished
            .extend(vanished.iter().map(|path| crate::tree::join(top, path)));
        self.hard_links
            .retain(|(_, existing)| !gone.contains(existing.as_str()));
    }

    /// Moves sparse files from the small-file path, which sends every byte, to the chunked one,
    /// which sends holes as `Zeros`.
    pub(crate) fn route_sparse(&self, small: &mut Vec<TreeEntry>, large: &mut Vec<TreeEntry>) {
        if self.sparse.is_empty() {
            return;
        }
        let (sparse, dense): (Vec<_>, Vec<_>) = std::mem::take(small)
            .into_iter()
            .partition(|e| self.sparse.contains(&e.path));
        *small = dense;
        large.extend(sparse);
    }

    /// The holes of the source file `path`, with the identity they were seen at.
    pub(crate) fn holes(
        &self,
        path: &str,
    ) -> Option<(xfer_proto::FileIdentity, Vec<xfer_proto::ByteRange>)> {
        if !self.sparse.contains(path) {
            return None;
        }
        let e = self.source.iter().find(|e| e.entry.path == path)?;
        Some((
            xfer_proto::FileIdentity {
                size: e.entry.size,
                mtime_ns: e.entry.mtime_ns,
            },
            e.meta.holes.clone(),
        ))
    }

    /// Drops the hard links the receiver already has: the name is in the same link group as
    /// its first name there, and that file was not replaced by this run. Counts the others.
    pub(crate) fn settle_hard_links(
        &mut self,
        written: &HashSet<String>,
        summary: &mut TreeSummary,
    ) {
        let receiver = &self.receiver;
        let group = |p: &str| receiver.get(p).map_or(0, |r| r.meta.link_group);
        self.hard_links.retain(|(name, existing)| {
            let linked =
                !written.contains(existing) && group(name) != 0 && group(name) == group(existing);
            if linked {
                summary.files_skipped += 1;
            }
            !linked
        });
        summary.hard_links += self.hard_links.len() as u64;
    }

    /// The entries this run writes: their metadata is set whatever the receiver had.
    /// Directories are among them: the copy made them writable and changed their mtimes.
    pub(crate) fn written([dirs, small, large, links]: [&[TreeEntry]; 4]) -> HashSet<String> {
        paths(dirs)
            .chain(paths(small))
            .chain(paths(large))
            .chain(paths(links))
            .map(str::to_string)
            .collect()
    }

    /// True when the receiver's entry already has the source's owner, mode, mtime and (when
    /// kept) attributes.
    fn matches(&self, src: &MetaEntry, dst: &MetaEntry) -> bool {
        let (s, d) = (&src.meta, &dst.meta);
        let by_name = !self.keep.numeric_ids;
        let owner = if by_name && !s.user.is_empty() {
            s.user == d.user
        } else {
            s.uid == d.uid
        };
        let group = if by_name && !s.group.is_empty() {
            s.group == d.group
        } else {
            s.gid == d.gid
        };
        src.entry.kind == dst.entry.kind
            && src.entry.mtime_ns == dst.entry.mtime_ns
            && (src.entry.kind == EntryKind::Symlink || src.entry.mode == dst.entry.mode)
            && owner
            && group
            && (!self.keep.xattrs || xfer_core::meta::xattrs_same(&s.xattrs, &d.xattrs, by_name))
    }

    /// The `SetMeta` requests that finish the copy, names prefixed with `top`: every entry
    /// but directories first, then directories deepest first (adding entries changed their
    /// mtimes). Entries left out of the copy, later names of a link group, and entries the
    /// receiver already has as they are get none.
    pub(crate) fn requests(&self, top: &str, written: &HashSet<String>) -> Vec<SetMeta> {
        let mut files = Vec::new();
        let mut dirs = Vec::new();
        for e in &self.source {
            let path = e.entry.path.as_str();
            let copied = match e.entry.kind {
                EntryKind::Special => {
                    self.nodes.iter().any(|n| n.entry.path == path)
                        || (self.keep.wants(e.meta.st_mode) && self.receiver.contains_key(path))
                }
                EntryKind::Symlink => {
                    !self.keep.safe_links
                        || xfer_core::tree::validate_link(path, &e.entry.target).is_ok()
                }
                _ => true,
            };
            // One name per inode is enough: the others share it. An entry whose metadata could
            // not be read (st_mode 0) keeps what the copy gave it.
            if !copied || self.later_names.contains(path) || e.meta.st_mode == 0 {
                continue;
            }
            let fresh = written.contains(path);
            if !fresh && self.receiver.get(path).is_some_and(|r| self.matches(e, r)) {
                continue;
            }
            let name = crate::tree::join(top, path);
            if self.finished.contains(&name) {
                continue;
            }
            let request = SetMeta {
                name,
                mode: e.entry.mode,
                mtime_ns: e.entry.mtime_ns,
                uid: e.meta.uid,
                gid: e.meta.gid,
                user: e.meta.user.clone(),
                group: e.meta.group.clone(),
                numeric_ids: self.keep.numeric_ids,
                xattrs: (self.keep.xattrs
                    && matches!(e.entry.kind, EntryKind::File | EntryKind::Dir))
                .then(|| e.meta.xattrs.clone()),
            };
            if e.entry.kind == EntryKind::Dir {
                dirs.push(request);
            } else {
                files.push(request);
            }
        }
        dirs.reverse();
        files.extend(dirs);
        files
    }
}

/// Counts what the receiver could not keep, warning once about refused attributes.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    warned: bool,
}

impl Tally {
    pub(crate) fn count(
        &mut self,
        name: &str,
        not_chowned: bool,
        xattrs_refused: &str,
        summary: &mut TreeSummary,
    ) {
        if not_chowned {
            summary.not_chowned += 1;
        }
        if !xattrs_refused.is_empty() {
            summary.xattrs_refused += 1;
            if !self.warned {
                self.warned = true;
                eprintln!(
                    "xfer: warning: the receiving filesystem refused extended attributes \
                     ({xattrs_refused}, first at {name}); the copy goes on without them"
                );
            }
        }
    }
}

/// Which special entries a tree copy makes.
trait WantsNode {
    /// True when a node of `st_mode`'s type is to be copied.
    fn wants(&self, st_mode: u32) -> bool;
}

impl WantsNode for TreeOptions {
    fn wants(&self, st_mode: u32) -> bool {
        match st_mode & 0o170000 {
            0o020000 | 0o060000 => self.devices,
            0o010000 | 0o140000 => self.specials,
            _ => false,
        }
    }
}

/// The one line an older daemon earns: the copy goes on without what it cannot keep.
pub(crate) fn warn_old_daemon(target: &crate::Target) {
    eprintln!(
        "xfer: warning: {target} runs an older xferd without CAP_TREE_META: owners, hard \
         links, attributes, holes and links leading out of the tree are not kept"
    );
}
