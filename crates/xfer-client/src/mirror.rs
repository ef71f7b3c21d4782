//! Mirror copies: what `--delete`, `--exclude`/`--include`/`--exclude-from`, `--dry-run` and
//! `--itemize` add to a tree copy, the same for `send -r`, `recv -r` and `copy -r`. From the
//! source's listing and the receiver's, it decides what the copy creates, updates and removes,
//! and words each change as one itemize line.
//!
//! Removals come in two kinds. An entry whose type changed (a directory that became a file, a
//! file that became a link to a directory) is in the way of the new one: it goes, contents
//! first, before the copy. Everything else the source lacks goes only after every file and
//! link arrived, so a failed copy removes nothing. Excluded entries of the receiver are never
//! removed (unless `--delete-excluded`), nor the directories that hold them.
//!
//! Itemize format, one line per change, rsync's: an 11-character code, a space and the path
//! relative to the top of the tree (directories end in `/`, links show ` -> TARGET`):
//! - `>f+++++++++ PATH`: a file created; `cd+++++++++ PATH/` a directory; `cL+++++++++ PATH ->
//!   T` a link;
//! - `>f.st...... PATH`: a file updated, with `c` (content, under `--checksum`), `s` (size), `t`
//!   (mtime), `p` (permissions) in positions 3-6 for what differs, `.` for what does not;
//!   `cLc........ PATH -> T` a link whose target changed;
//! - `hf+++++++++ PATH => OTHER`: a hard link to the file OTHER created (a `Change` of a file
//!   whose `target` names the other name); `cD+++++++++ PATH` a device or special node;
//! - `*deleting   PATH`: an entry removed.

use foldhash::{HashMap, HashSet, HashSetExt};
use xfer_core::filter::ancestors;
pub use xfer_core::filter::{Filter, FilterError};
use xfer_core::tree::Unreadable;
use xfer_proto::{
    Change, ChangeAction, EntryKind, FilterRule, TreeEntry, CAP_DELETE, CHANGED_CONTENT,
    CHANGED_MODE, CHANGED_MTIME, CHANGED_SIZE,
};

/// How a tree copy mirrors: filters, deletion, dry run. The default copies everything and
/// removes nothing, as a plain `-r` copy does.
#[derive(Debug, Clone, Default)]
pub struct Mirror {
    /// Entries left out of the copy, and kept at the receiver by `delete`.
    pub filter: Filter,
    /// Remove from the receiving tree what the source lacks, once the copy succeeded.
    pub delete: bool,
    /// With `delete`: remove excluded entries of the receiver too.
    pub delete_excluded: bool,
    /// Change nothing: only say what would change.
    pub dry_run: bool,
}

impl Mirror {
    /// A mirror from the rules carried by `MirrorTo`.
    ///
    /// # Errors
    /// A pattern that is not a valid glob.
    pub fn from_wire(
        rules: &[FilterRule],
        delete: bool,
        delete_excluded: bool,
        dry_run: bool,
    ) -> Result<Self, FilterError> {
        Ok(Self {
            filter: Filter::new(rules.iter().map(|r| (r.include, r.pattern.clone())))?,
            delete,
            delete_excluded,
            dry_run,
        })
    }

    /// The filter rules as `MirrorTo` carries them.
    pub fn wire_rules(&self) -> Vec<FilterRule> {
        self.filter
            .rules()
            .iter()
            .map(|(include, pattern)| FilterRule {
                include: *include,
                pattern: pattern.clone(),
            })
            .collect()
    }

    /// True when this is a plain tree copy: nothing filtered, removed or held back.
    pub fn is_plain(&self) -> bool {
        self.filter.rules().is_empty() && !self.delete && !self.dry_run
    }

    /// Capability bits the connection that removes entries offers.
    pub(crate) fn offer(&self) -> u64 {
        if self.delete {
            CAP_DELETE
        } else {
            0
        }
    }

    /// The source's listing (with or without metadata) without the excluded entries.
    pub(crate) fn filter_source<E: Listed>(&self, entries: Vec<E>) -> Vec<E> {
        let out = self.filter.excluded_set(
            entries
                .iter()
                .map(|e| (e.entry().path.as_str(), e.entry().kind == EntryKind::Dir)),
        );
        if out.is_empty() {
            return entries;
        }
        entries
            .into_iter()
            .filter(|e| !out.contains(&e.entry().path))
            .collect()
    }

    /// What the source walk could not read, without what the filter leaves out anyway.
    pub(crate) fn filter_unreadable(&self, unreadable: Vec<Unreadable>) -> Vec<Unreadable> {
        if self.filter.is_empty() {
            return unreadable;
        }
        let excluded = |u: &Unreadable| {
            self.filter.excludes(&u.path, u.kind == EntryKind::Dir)
                || ancestors(&u.path).any(|dir| self.filter.excludes(dir, true))
        };
        unreadable.into_iter().filter(|u| !excluded(u)).collect()
    }

    /// What the receiver loses, from the (filtered) source listing and the receiver's listing.
    /// `unread` are the source's paths it could not read: a file left out, a directory listed
    /// without its contents. The receiver keeps what it holds there and below.
    pub(crate) fn removals(
        &self,
        source: &[TreeEntry],
        receiver: &[TreeEntry],
        unread: &[String],
    ) -> Removals {
        let mut removals = Removals::default();
        if !self.delete {
            return removals;
        }
        let source: HashMap<&str, &TreeEntry> =
            source.iter().map(|e| (e.path.as_str(), e)).collect();
        // Excluded entries stay, and so do the directories above them; so do what the source
        // could not read, since nothing says it is gone.
        let mut keep: HashSet<&str> = HashSet::new();
        if !unread.is_empty() {
            let unread: HashSet<&str> = unread.iter().map(String::as_str).collect();
            for e in receiver {
                let path = e.path.as_str();
                // The top (`""`) is no ancestor: a top left unread keeps everything.
                let unread_above = ancestors(path).chain([""]).any(|a| unread.contains(a));
                if unread.contains(path) || unread_above {
                    keep.insert(path);
                    keep.extend(ancestors(path));
                }
            }
        }
        if !self.delete_excluded {
            let excluded = self.filter.excluded_set(
                receiver
                    .iter()
                    .map(|e| (e.path.as_str(), e.kind == EntryKind::Dir)),
            );
            for e in receiver.iter().filter(|e| excluded.contains(&e.path)) {
                keep.insert(&e.path);
                keep.extend(ancestors(&e.path));
            }
        }
        let mut sorted: Vec<&TreeEntry> = receiver.iter().collect();
        sorted.sort_by(|a, b| a.path.cmp(&b.path));
        let mut replaced: HashSet<&str> = HashSet::new();
        for theirs in sorted {
            let path = theirs.path.as_str();
            if path.is_empty() || keep.contains(path) {
                continue;
            }
            if ancestors(path).any(|a| replaced.contains(a)) {
                removals.before.push(theirs.clone());
                continue;
            }
            match source.get(path) {
                None => removals.after.push(theirs.clone()),
                Some(ours) if in_the_way(ours.kind, theirs.kind) => {
                    replaced.insert(path);
                    removals.before.push(theirs.clone());
                }
                Some(_) => {}
            }
        }
        // Contents before the directory that holds them: a path sorts after its parent's.
        removals.before.sort_by(|a, b| b.path.cmp(&a.path));
        removals.after.sort_by(|a, b| b.path.cmp(&a.path));
        removals
    }
}

/// An entry of a listing, plain or with its metadata.
pub(crate) trait Listed {
    fn entry(&self) -> &TreeEntry;
}

impl Listed for TreeEntry {
    fn entry(&self) -> &TreeEntry {
        self
    }
}

impl Listed for xfer_proto::MetaEntry {
    fn entry(&self) -> &TreeEntry {
        &self.entry
    }
}

/// True when the receiver's entry of kind `theirs` must go before the source's of kind `ours`
/// can take its place (the tree requests replace a file by a directory, and anything but a
/// directory by a link, on their own).
fn in_the_way(ours: EntryKind, theirs: EntryKind) -> bool {
    use EntryKind::{Dir, File, Special, Symlink};
    matches!(
        (ours, theirs),
        (File, Dir | Symlink | Special) | (Dir, Symlink | Special) | (Symlink, Dir)
    )
}

/// What a mirror copy removes from the receiver, each list contents first.
#[derive(Debug, Default)]
pub(crate) struct Removals {
    /// Entries in the way of the source's entries of another type: removed before the copy.
    pub(crate) before: Vec<TreeEntry>,
    /// Entries the source lacks: removed once the copy succeeded.
    pub(crate) after: Vec<TreeEntry>,
}

impl Removals {
    /// The paths removed, for telling the source's entries that replace them.
    fn paths(&self) -> HashSet<&str> {
        self.before
            .iter()
            .chain(&self.after)
            .map(|e| e.path.as_str())
            .collect()
    }
}

/// Every change of a copy, removals first (contents first), then what is created or updated in
/// path order. `source` is the filtered source listing; `send` lists only what the copy sends
/// (links leading out of the tree and special files are not).
pub(crate) fn changes(
    source: &[TreeEntry],
    receiver: &HashMap<String, TreeEntry>,
    removals: &Removals,
    sent: impl Fn(&TreeEntry) -> bool,
) -> Vec<Change> {
    let gone = removals.paths();
    let mut out: Vec<Change> = removals
        .before
        .iter()
        .chain(&removals.after)
        .map(|e| change(ChangeAction::Delete, e, 0))
        .collect();
    out.sort_by(|a, b| b.path.cmp(&a.path));
    let mut made: Vec<Change> = Vec::new();
    for ours in source.iter().filter(|e| !e.path.is_empty() && sent(e)) {
        let theirs = receiver
            .get(&ours.path)
            .filter(|t| !gone.contains(t.path.as_str()));
        let Some(theirs) = theirs.filter(|t| t.kind == ours.kind) else {
            made.push(change(ChangeAction::Create, ours, 0));
            continue;
        };
        let differs = match ours.kind {
            EntryKind::File => {
                let mut d = 0;
                if ours.digest != theirs.digest {
                    d |= CHANGED_CONTENT;
                }
                if ours.size != theirs.size {
                    d |= CHANGED_SIZE;
                }
                if ours.mtime_ns != theirs.mtime_ns {
                    d |= CHANGED_MTIME;
                }
                if ours.mode & 0o777 != theirs.mode & 0o777 {
                    d |= CHANGED_MODE;
                }
                d
            }
            EntryKind::Symlink if ours.target != theirs.target => CHANGED_CONTENT,
            _ => 0,
        };
        if differs != 0 {
            made.push(change(ChangeAction::Update, ours, differs));
        }
    }
    made.sort_by(|a, b| a.path.cmp(&b.path));
    out.extend(made);
    out
}

fn change(action: ChangeAction, entry: &TreeEntry, differs: u32) -> Change {
    Change {
        action,
        kind: entry.kind,
        differs,
        path: entry.path.clone(),
        target: entry.target.clone(),
    }
}

/// The itemize line of a change (see the module documentation for the format).
pub fn itemize(change: &Change) -> String {
    let hard_link = change.kind == EntryKind::File
        && change.action == ChangeAction::Create
        && !change.target.is_empty();
    if hard_link {
        return format!("hf+++++++++ {} => {}", change.path, change.target);
    }
    let path = match change.kind {
        EntryKind::Dir => format!("{}/", change.path),
        EntryKind::Symlink if change.action != ChangeAction::Delete => {
            format!("{} -> {}", change.path, change.target)
        }
        _ => change.path.clone(),
    };
    let code = match (change.action, change.kind) {
        (ChangeAction::Delete, _) => "*deleting  ".to_string(),
        (ChangeAction::Create, kind) => format!("{}+++++++++", prefix(kind)),
        (ChangeAction::Update, kind) => {
            let flag = |bit: u32, c: char| if change.differs & bit != 0 { c } else { '.' };
            format!(
                "{}{}{}{}{}.....",
                prefix(kind),
                flag(CHANGED_CONTENT, 'c'),
                flag(CHANGED_SIZE, 's'),
                flag(CHANGED_MTIME, 't'),
                flag(CHANGED_MODE, 'p'),
            )
        }
    };
    format!("{code} {path}")
}

fn prefix(kind: EntryKind) -> &'static str {
    match kind {
        EntryKind::File => ">f",
        EntryKind::Dir => "cd",
        EntryKind::Symlink => "cL",
        EntryKind::Special => "cD",
    }
}

/// A change as `--json` prints it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ChangeLine {
    /// `create`, `update` or `delete`.
    pub action: &'static str,
    /// `file`, `dir`, `symlink` or `special`.
    pub kind: &'static str,
    /// Path relative to the top of the tree.
    pub path: String,
    /// The itemize line.
    pub itemize: String,
}

impl From<&Change> for ChangeLine {
    fn from(c: &Change) -> Self {
        Self {
            action: match c.action {
                ChangeAction::Create => "create",
                ChangeAction::Update => "update",
                ChangeAction::Delete => "delete",
            },
            kind: match c.kind {
                EntryKind::File => "file",
                EntryKind::Dir => "dir",
                EntryKind::Symlink => "symlink",
                EntryKind::Special => "special",
            },
            path: c.path.clone(),
            itemize: itemize(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, kind: EntryKind, size: u64) -> TreeEntry {
        TreeEntry {
            path: path.into(),
            kind,
            size,
            mtime_ns: 1,
            mode: 0o644,
            target: if kind == EntryKind::Symlink {
                "t".into()
            } else {
                String::new()
            },
            digest: Vec::new(),
        }
    }

    fn mirror(rules: &[(bool, &str)]) -> Mirror {
        Mirror {
            filter: Filter::new(rules.iter().map(|(i, p)| (*i, (*p).to_string()))).unwrap(),
            delete: true,
            ..Mirror::default()
        }
    }

    #[test]
    fn removals_spare_excluded_entries_and_their_directories() {
        use EntryKind::{Dir, File};
        let source = vec![entry("", Dir, 0), entry("kept", File, 1)];
        let receiver = vec![
            entry("", Dir, 0),
            entry("kept", File, 1),
            entry("gone", File, 1),
            entry("old", Dir, 0),
            entry("old/a.log", File, 1),
            entry("old/b", File, 1),
            entry("dead", Dir, 0),
            entry("dead/x", File, 1),
        ];
        let r = mirror(&[(false, "*.log")]).removals(&source, &receiver, &[]);
        let after: Vec<&str> = r.after.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(after, ["old/b", "gone", "dead/x", "dead"]);
        assert!(r.before.is_empty());
        let all = Mirror {
            delete_excluded: true,
            ..mirror(&[(false, "*.log")])
        };
        assert_eq!(all.removals(&source, &receiver, &[]).after.len(), 6);
        assert!(Mirror::default()
            .removals(&source, &receiver, &[])
            .after
            .is_empty());
    }

    #[test]
    fn removals_spare_what_the_source_could_not_read_and_what_is_below_it() {
        use EntryKind::{Dir, File};
        let source = vec![entry("", Dir, 0), entry("shut", Dir, 0), entry("d", Dir, 0)];
        let receiver = vec![
            entry("", Dir, 0),
            entry("shut", Dir, 0),
            entry("shut/deep", Dir, 0),
            entry("shut/deep/f", File, 1),
            entry("d", Dir, 0),
            entry("d/secret", File, 1),
            entry("d/secret2", File, 1),
            entry("gone", File, 1),
        ];
        let unread = ["shut".to_string(), "d/secret".to_string()];
        let r = mirror(&[]).removals(&source, &receiver, &unread);
        let after: Vec<&str> = r.after.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(after, ["gone", "d/secret2"]);
        // Nor when a filter leaves them out anyway: no warning either.
        let shut = |kind, path: &str| Unreadable {
            path: path.into(),
            kind,
            error: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        };
        let kept = mirror(&[(false, "d/")])
            .filter_unreadable(vec![shut(Dir, "shut"), shut(File, "d/secret")]);
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].path, "shut");
    }

    #[test]
    fn entries_of_another_type_go_before_the_copy_contents_first() {
        use EntryKind::{Dir, File, Symlink};
        let source = vec![
            entry("", Dir, 0),
            entry("was_dir", File, 1),
            entry("was_file", Dir, 0),
            entry("link", Symlink, 0),
        ];
        let receiver = vec![
            entry("", Dir, 0),
            entry("was_dir", Dir, 0),
            entry("was_dir/inner", Dir, 0),
            entry("was_dir/inner/f", File, 1),
            entry("was_file", File, 1),
            entry("link", Dir, 0),
        ];
        let r = mirror(&[]).removals(&source, &receiver, &[]);
        let before: Vec<&str> = r.before.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            before,
            ["was_dir/inner/f", "was_dir/inner", "was_dir", "link"]
        );
        assert!(r.after.is_empty());
        let map = receiver
            .iter()
            .map(|e| (e.path.clone(), e.clone()))
            .collect();
        let lines: Vec<String> = changes(&source, &map, &r, |_| true)
            .iter()
            .map(itemize)
            .collect();
        assert_eq!(
            lines,
            [
                "*deleting   was_dir/inner/f",
                "*deleting   was_dir/inner/",
                "*deleting   was_dir/",
                "*deleting   link/",
                "cL+++++++++ link -> t",
                ">f+++++++++ was_dir",
                "cd+++++++++ was_file/",
            ]
        );
    }

    #[test]
    fn updates_say_what_differs() {
        use EntryKind::File;
        let ours = TreeEntry {
            mtime_ns: 2,
            size: 5,
            ..entry("f", File, 0)
        };
        let receiver = HashMap::from_iter([("f".to_string(), entry("f", File, 1))]);
        let c = changes(&[ours], &receiver, &Removals::default(), |_| true);
        assert_eq!(c.iter().map(itemize).collect::<Vec<_>>(), [">f.st...... f"]);
    }

    #[test]
    fn excluded_source_entries_are_left_out_with_what_is_below_them() {
        use EntryKind::{Dir, File};
        let m = mirror(&[(false, "cache/")]);
        let kept = m.filter_source(vec![
            entry("", Dir, 0),
            entry("cache", Dir, 0),
            entry("cache/x", File, 1),
            entry("a", File, 1),
        ]);
        let kept: Vec<&str> = kept.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(kept, ["", "a"]);
    }
}
