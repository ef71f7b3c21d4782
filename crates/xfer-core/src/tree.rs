//! Directory trees beneath a [`Root`]: walking one (symlinks reported, never followed), and the
//! small operations a tree copy is made of — a whole small file, a directory, a link, a flush.
//! The daemon runs them for `send -r`, the client for `recv -r`: both ends use this one module.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustix::fs::{self as rfs, AtFlags, Mode, OFlags};
use rustix::io::Errno;
use xfer_proto::{EntryKind, FileIdentity, TreeEntry};

use crate::root::map_open_err;
use crate::{
    digest, is_reserved_name, on_disk, partial_name, validate_name, CoreError, Result, Root,
};

/// Deepest directory nesting a walk descends into.
const MAX_DEPTH: usize = 256;

/// `SystemTime` for nanoseconds since the Unix epoch.
pub fn system_time(mtime_ns: i64) -> SystemTime {
    if mtime_ns >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_nanos(mtime_ns as u64)
    } else {
        SystemTime::UNIX_EPOCH - Duration::from_nanos(mtime_ns.unsigned_abs())
    }
}

fn mtime_ns(st: &rfs::Stat) -> i64 {
    st.st_mtime * 1_000_000_000 + st.st_mtime_nsec as i64
}

fn join(dir: &str, leaf: &str) -> String {
    if dir.is_empty() {
        leaf.to_string()
    } else {
        format!("{dir}/{leaf}")
    }
}

/// Checks that a symlink at `name` pointing to `target` stays inside the root: relative, `..`
/// only as a leading run that never climbs above the root from the link's directory, and no
/// reserved partial/journal names. Links are created only in directories reached without
/// symlinks ([`Root::parent_slot_no_symlinks`]), so the link's depth is its name's depth.
///
/// # Errors
/// `BadPath` naming the rule broken.
pub fn validate_link(name: &str, target: &str) -> Result<()> {
    let bad = |why: &str| {
        Err(CoreError::BadPath(format!(
            "link {name:?} -> {target:?}: {why}"
        )))
    };
    if target.is_empty() || target.contains('\0') {
        return bad("empty target or NUL");
    }
    if target.starts_with('/') {
        return bad("absolute target");
    }
    // `..` only as a leading run: after a name it could climb out of a directory reached
    // through another link, which no check of this link alone can see.
    let mut depth = validate_name(name)?.len() as i64 - 1;
    let mut descended = false;
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." if descended => return bad("'..' after a name"),
            ".." => {
                depth -= 1;
                if depth < 0 {
                    return bad("target leads out of the tree");
                }
            }
            p if is_reserved_name(p) => return bad("target names a partial or journal file"),
            _ => descended = true,
        }
    }
    Ok(())
}

/// Parent directories opened while files are stored, by path: the small files of one directory
/// resolve it once. The daemon keeps one per batch of one connection, so a directory replaced
/// meanwhile is resolved afresh by the next batch; a client receiving a tree into its own
/// directory keeps one per connection. Bounded.
#[derive(Debug, Default)]
pub struct DirCache {
    dirs: HashMap<String, Arc<File>>,
    /// What a file this process creates in a directory starts with, by the directory's path:
    /// learned from the first file stored there with its metadata, so that the files after it
    /// need no `fstat` and no attribute list of their own.
    new_files: HashMap<String, NewFile>,
    /// Files stored with their metadata whose state had to be read (`fstat`, `flistxattr`).
    #[cfg(test)]
    probed: usize,
}

/// The state a new file starts with in one directory, for one mode asked at its creation.
///
/// The kernel decides it from this process's ids and umask and from the directory: its group
/// where it is set-group-ID, its default ACL (mode and inherited ACL), a security module's
/// label. For one directory (the same open handle) and one creation mode, each file gets the
/// same. It is kept only where the file came without attributes: no ACL was inherited and no
/// label given, which a name-dependent label rule could vary. A directory changed by someone
/// else between two files of one batch can be missed, as it could between a file's `fstat`
/// and its link.
#[derive(Debug, Clone, Copy)]
struct NewFile {
    created_mode: u32,
    now: crate::meta::Ownership,
}

impl DirCache {
    const MAX_DIRS: usize = 64;

    /// The path of the directory `name` goes into, and what a file created there with
    /// `created_mode` starts with, if known.
    fn new_file(&self, name: &str, created_mode: u32) -> Result<(String, Option<NewFile>)> {
        let parts = validate_name(name)?;
        let parent = parts[..parts.len() - 1].join("/");
        let known = self
            .new_files
            .get(&parent)
            .filter(|n| n.created_mode == created_mode)
            .copied();
        Ok((parent, known))
    }

    /// The directory `name` goes into (created if missing) and its last component.
    fn parent_of(&mut self, root: &Root, name: &str) -> Result<(Arc<File>, String)> {
        let parts = validate_name(name)?;
        let (leaf, parents) = parts.split_last().expect("validated names have a part");
        let parent = parents.join("/");
        if let Some(dir) = self.dirs.get(&parent) {
            return Ok((Arc::clone(dir), (*leaf).to_string()));
        }
        let slot = root.parent_slot(name, true)?;
        if self.dirs.len() >= Self::MAX_DIRS {
            self.dirs.clear();
            self.new_files.clear();
        }
        self.dirs.insert(parent, Arc::clone(&slot.dir));
        Ok((slot.dir, slot.leaf))
    }
}

/// The identity, mode and bytes of the open file `file`, at most `max` bytes; `Changed` if its
/// size moved while it was read.
fn read_whole(file: &File, name: &str, max: u64) -> Result<(FileIdentity, u32, Vec<u8>)> {
    let meta = file
        .metadata()
        .map_err(|e| CoreError::io(format!("stat {name:?}"), e))?;
    if !meta.is_file() {
        return Err(CoreError::NotRegular(name.to_string()));
    }
    if meta.len() > max {
        return Err(CoreError::TooLarge(format!(
            "{name} is {} bytes, above {max}",
            meta.len()
        )));
    }
    let identity = FileIdentity {
        size: meta.len(),
        mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
    };
    // One byte more than the size, so a file that grew is seen; a regular file's read comes
    // back short only at its end, so one read is usually all.
    let mut data = vec![0; identity.size as usize + 1];
    let mut got = 0;
    while got < data.len() {
        let n = file
            .read_at(&mut data[got..], got as u64)
            .map_err(|e| CoreError::io(format!("reading {name:?}"), e))?;
        got += n;
        if n == 0 || got < data.len() && n < data.len() - (got - n) {
            break;
        }
    }
    if got as u64 != identity.size {
        return Err(CoreError::Changed(name.to_string()));
    }
    data.truncate(got);
    Ok((identity, meta.permissions().mode() & 0o7777, data))
}

/// Only a regular file may be replaced by a stored file: never a directory, link or special.
fn check_replaceable(dir: BorrowedFd<'_>, leaf: &str, name: &str) -> Result<()> {
    match rfs::statat(dir, on_disk(leaf), AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) if rfs::FileType::from_raw_mode(st.st_mode) != rfs::FileType::RegularFile => {
            Err(CoreError::NotRegular(name.to_string()))
        }
        Ok(_) | Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(CoreError::io(format!("stat {name:?}"), e.into())),
    }
}

/// Permission bits of a file stored under its partial name: private until it is renamed.
const NAMED_MODE: u32 = 0o600;

/// How this process links an `O_TMPFILE` file into a directory, once found out.
static LINK_METHOD: AtomicU8 = AtomicU8::new(LINK_UNKNOWN);
const LINK_UNKNOWN: u8 = 0;
/// `linkat(fd, "", AT_EMPTY_PATH)`: root, or Linux 6.10+ for the file's opener.
const LINK_EMPTY_PATH: u8 = 1;
/// `linkat("/proc/self/fd/N", AT_SYMLINK_FOLLOW)`: needs /proc.
const LINK_PROC: u8 = 2;
/// Neither works: files are written under their partial name and renamed.
const LINK_NONE: u8 = 3;

fn unnamed_files_work() -> bool {
    LINK_METHOD.load(Ordering::Relaxed) != LINK_NONE
}

/// Gives the unnamed file `file` the name `leaf` in `dir`; `EEXIST` if the name is taken.
fn link_unnamed(file: &File, dir: BorrowedFd<'_>, leaf: &str) -> rustix::io::Result<()> {
    let by_empty_path = || rfs::linkat(file, "", dir, on_disk(leaf), AtFlags::EMPTY_PATH);
    let by_proc = || {
        let path = format!("/proc/self/fd/{}", file.as_raw_fd());
        rfs::linkat(
            rfs::CWD,
            path.as_str(),
            dir,
            on_disk(leaf),
            AtFlags::SYMLINK_FOLLOW,
        )
    };
    match LINK_METHOD.load(Ordering::Relaxed) {
        LINK_EMPTY_PATH => by_empty_path(),
        LINK_PROC => by_proc(),
        _ => {
            // Without the privilege, AT_EMPTY_PATH fails with ENOENT; without /proc, so does
            // the other way. A name that exists is EEXIST either way, and tells nothing yet.
            let found = match by_empty_path() {
                Err(Errno::NOENT | Errno::PERM) => match by_proc() {
                    Err(Errno::NOENT | Errno::PERM | Errno::ACCESS) => {
                        LINK_METHOD.store(LINK_NONE, Ordering::Relaxed);
                        return Err(Errno::OPNOTSUPP);
                    }
                    r => (r, LINK_PROC),
                },
                r => (r, LINK_EMPTY_PATH),
            };
            if found.0.is_ok() {
                LINK_METHOD.store(found.1, Ordering::Relaxed);
            }
            found.0
        }
    }
}

/// A walk's listing with what it left out because this process may not read it.
#[derive(Debug)]
pub struct Walked<T> {
    /// The entries, parents before children (see [`Root::walk`]).
    pub entries: Vec<T>,
    /// What was left out, by path.
    pub unreadable: Vec<Unreadable>,
}

/// An entry a walk could not read: a regular file (left out), or a directory (listed, but
/// not what is below it).
#[derive(Debug)]
pub struct Unreadable {
    /// Path below the walked directory.
    pub path: String,
    /// `File` or `Dir`.
    pub kind: EntryKind,
    /// Why, as the system said.
    pub error: std::io::Error,
}

/// Where a walk that leaves out what it is denied ([`Root::walk_readable`]) records `path`, and
/// the walk goes on (`Ok`); any other failure, or any failure of a walk that does not, ends the
/// walk with what it was `doing`.
fn leave_out(
    unreadable: Option<&mut Vec<Unreadable>>,
    (path, kind): (&str, EntryKind),
    e: Errno,
    doing: &str,
) -> Result<()> {
    match unreadable {
        Some(out) if matches!(e, Errno::ACCESS | Errno::PERM) => {
            out.push(Unreadable {
                path: path.to_string(),
                kind,
                error: e.into(),
            });
            Ok(())
        }
        _ => Err(CoreError::io(format!("{doing} {path:?}"), e.into())),
    }
}

/// The names in `dir`, sorted, without `.`, `..` and reserved names.
fn list_names(dir: &File) -> std::result::Result<Vec<String>, Errno> {
    let mut names: Vec<String> = Vec::new();
    for entry in rfs::Dir::read_from(dir)? {
        let entry = entry?;
        let name = xfer_proto::names::escape(entry.file_name().to_bytes());
        if name != "." && name != ".." && !is_reserved_name(&name) {
            names.push(name.into_owned());
        }
    }
    names.sort();
    Ok(names)
}

/// Who this process is, to tell from a file's mode whether it may read it.
struct Ids {
    uid: u32,
    gid: u32,
}

impl Ids {
    fn of_this_process() -> Self {
        Self {
            uid: rustix::process::geteuid().as_raw(),
            gid: rustix::process::getegid().as_raw(),
        }
    }

    /// `Ok` when this process may open the regular file `name` in `dir` for reading. The mode
    /// answers for most files without a system call; the kernel is asked (`faccessat` with
    /// the effective ids, which counts ACLs, supplementary groups and capabilities) only when
    /// the mode alone does not grant it.
    fn may_read(&self, dir: &File, name: &str, st: &rfs::Stat) -> std::result::Result<(), Errno> {
        let granted = if st.st_uid == self.uid {
            st.st_mode & 0o400 != 0
        } else if st.st_gid == self.gid {
            st.st_mode & 0o040 != 0
        } else {
            // Another user's file: readable by the group and by others, so by anyone but the
            // owner (an ACL denying a named user that is found when the file is opened).
            st.st_mode & 0o044 == 0o044
        };
        if granted {
            return Ok(());
        }
        rfs::accessat(dir, on_disk(name), rfs::Access::READ_OK, AtFlags::EACCESS)
    }
}

impl Root {
    /// Lists the tree under `dir` (empty: the whole root), parents before children, the top
    /// itself first with an empty path. Partial and journal files are left out; symlinks are
    /// listed with their target and not followed; devices, FIFOs and sockets are listed as
    /// `Special` so copiers can warn about them. With
    /// `digests`, every file's whole-file digest is computed (each file is read).
    ///
    /// # Errors
    /// `BadPath`/`NotFound` for `dir`, or I/O errors.
    pub fn walk(&self, dir: &str, digests: bool) -> Result<Vec<TreeEntry>> {
        let walked = self.walk_visiting(dir, digests, None, &mut |_, _, _, _| ())?;
        Ok(walked.into_iter().map(|(entry, ())| entry).collect())
    }

    /// [`Root::walk`] that leaves out what this process cannot read instead of failing: a
    /// regular file it may not open for reading, and what is below a directory it may not
    /// list (the directory itself is listed). Those come back beside the listing, for the
    /// caller to warn about and to keep from being removed where the tree is copied to.
    ///
    /// # Errors
    /// As [`Root::walk`], for any other failure.
    pub fn walk_readable(&self, dir: &str, digests: bool) -> Result<Walked<TreeEntry>> {
        let mut unreadable = Vec::new();
        let walked =
            self.walk_visiting(dir, digests, Some(&mut unreadable), &mut |_, _, _, _| ())?;
        Ok(Walked {
            entries: walked.into_iter().map(|(entry, ())| entry).collect(),
            unreadable,
        })
    }

    /// [`Root::walk`] that also hands each entry, as it is listed, to `visit` with its
    /// directory, its name there (`.` for the top) and the `stat` the walk made of it, and
    /// keeps what `visit` makes of it beside the entry: what more a caller wants of an entry
    /// costs no second lookup of its name. With `unreadable`, what this process cannot read
    /// is left out and recorded there (see [`Root::walk_readable`]) instead of failing the walk.
    pub(crate) fn walk_visiting<T>(
        &self,
        dir: &str,
        digests: bool,
        mut unreadable: Option<&mut Vec<Unreadable>>,
        visit: &mut dyn FnMut(BorrowedFd<'_>, &str, &rfs::Stat, &TreeEntry) -> T,
    ) -> Result<Vec<(TreeEntry, T)>> {
        let dir = dir.trim_end_matches('/');
        if !dir.is_empty() {
            validate_name(dir)?;
        }
        let top = self.open_dir(dir).map_err(|e| map_open_err(dir, e))?;
        let st = rfs::fstat(&top).map_err(|e| CoreError::io(format!("stat {dir:?}"), e.into()))?;
        let top_entry = TreeEntry {
            path: String::new(),
            kind: EntryKind::Dir,
            size: 0,
            mtime_ns: mtime_ns(&st),
            mode: st.st_mode & 0o7777,
            target: String::new(),
            digest: Vec::new(),
        };
        let top_visited = visit(top.as_fd(), ".", &st, &top_entry);
        let mut out = vec![(top_entry, top_visited)];
        let mut stack = vec![(top, String::new(), 0usize)];
        let ids = Ids::of_this_process();
        while let Some((fd, rel, depth)) = stack.pop() {
            let names = match list_names(&fd) {
                Ok(names) => names,
                Err(e) => {
                    // A top that cannot be listed is no tree to copy.
                    let out = unreadable.as_deref_mut().filter(|_| !rel.is_empty());
                    leave_out(out, (&rel, EntryKind::Dir), e, "listing")?;
                    continue;
                }
            };
            for name in names {
                let path = join(&rel, &name);
                let st = match rfs::statat(&fd, on_disk(&name), AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(st) => st,
                    // Gone since the directory was read: not in the tree any more.
                    Err(Errno::NOENT) => continue,
                    Err(e) => {
                        leave_out(
                            unreadable.as_deref_mut(),
                            (&path, EntryKind::File),
                            e,
                            "stat",
                        )?;
                        continue;
                    }
                };
                let mut entry = TreeEntry {
                    path: path.clone(),
                    kind: EntryKind::File,
                    size: 0,
                    mtime_ns: mtime_ns(&st),
                    mode: st.st_mode & 0o7777,
                    target: String::new(),
                    digest: Vec::new(),
                };
                match rfs::FileType::from_raw_mode(st.st_mode) {
                    rfs::FileType::RegularFile => {
                        entry.size = st.st_size as u64;
                        if digests {
                            let opened = rfs::openat(
                                &fd,
                                on_disk(&name),
                                OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                                Mode::empty(),
                            );
                            let file = match opened {
                                Ok(file) => File::from(file),
                                Err(Errno::NOENT) => continue,
                                Err(e) => {
                                    let file = (path.as_str(), EntryKind::File);
                                    leave_out(unreadable.as_deref_mut(), file, e, "opening")?;
                                    continue;
                                }
                            };
                            entry.digest = digest::digest_file(&file, entry.size)
                                .map_err(|e| CoreError::io(format!("reading {path:?}"), e))?
                                .to_vec();
                        } else if unreadable.is_some() {
                            match ids.may_read(&fd, &name, &st) {
                                Ok(()) => {}
                                Err(Errno::NOENT) => continue,
                                Err(e) => {
                                    let file = (path.as_str(), EntryKind::File);
                                    leave_out(unreadable.as_deref_mut(), file, e, "checking")?;
                                    continue;
                                }
                            }
                        }
                    }
                    rfs::FileType::Directory if depth < MAX_DEPTH => {
                        entry.kind = EntryKind::Dir;
                        let opened = rfs::openat(
                            &fd,
                            on_disk(&name),
                            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                            Mode::empty(),
                        );
                        match opened {
                            Ok(sub) => stack.push((File::from(sub), path.clone(), depth + 1)),
                            Err(Errno::NOENT) => continue,
                            // Listed, but not what is below it.
                            Err(e) => {
                                let dir = (path.as_str(), EntryKind::Dir);
                                leave_out(unreadable.as_deref_mut(), dir, e, "opening")?;
                            }
                        }
                    }
                    rfs::FileType::Symlink => {
                        entry.kind = EntryKind::Symlink;
                        let target =
                            rfs::readlinkat(&fd, on_disk(&name), Vec::new()).map_err(|e| {
                                CoreError::io(format!("reading link {path:?}"), e.into())
                            })?;
                        entry.target = xfer_proto::names::escape(target.as_bytes()).into_owned();
                    }
                    rfs::FileType::Directory => {
                        tracing::warn!(path = %path, "directory nested too deep; left out");
                        continue;
                    }
                    _ => entry.kind = EntryKind::Special,
                }
                let visited = visit(fd.as_fd(), &name, &st, &entry);
                out.push((entry, visited));
            }
        }
        // Parents before children, in a stable order.
        out.sort_by(|a, b| a.0.path.cmp(&b.0.path));
        if let Some(out) = unreadable {
            out.sort_by(|a, b| a.path.cmp(&b.path));
        }
        Ok(out)
    }

    /// Stores a whole small file: written complete, with its mode and mtime, into an unnamed
    /// file (`O_TMPFILE`) that is then linked under `name` — one directory entry made, none
    /// renamed, and nothing ever visible half written. A regular file already there is replaced
    /// atomically (linked at its partial name and renamed over it); filesystems without
    /// `O_TMPFILE` take that path for every file. Not flushed: [`Root::sync`] does that once
    /// for a whole tree. `dirs` keeps parent directories open across the files of one batch.
    ///
    /// # Errors
    /// `BadPath`, `NotRegular` (a directory or link is in the way), `NoSpace` or I/O errors.
    pub fn put_file(
        &self,
        dirs: &mut DirCache,
        name: &str,
        mtime_ns: i64,
        mode: u32,
        data: &[u8],
    ) -> Result<()> {
        self.store_small(dirs, name, data, 0o600, &mut |file, _| {
            file.set_permissions(std::fs::Permissions::from_mode(mode & 0o777))
                .and_then(|()| file.set_modified(system_time(mtime_ns)))
                .map_err(|e| CoreError::io(format!("writing {name:?}"), e))
        })
    }

    /// [`Root::put_file`] that also gives the file the owner, group and attributes of `meta`
    /// (then its mode and mtime, as [`Root::set_meta`] does) before it gets its name, so that
    /// it never appears without them. What could not be kept is reported, not an error.
    ///
    /// # Errors
    /// As [`Root::put_file`].
    pub fn put_file_meta(
        &self,
        dirs: &mut DirCache,
        data: &[u8],
        meta: &xfer_proto::SetMeta,
    ) -> Result<crate::meta::MetaOutcome> {
        use crate::meta::{apply_meta, read_xattrs, Ownership};
        let mut outcome = crate::meta::MetaOutcome::default();
        // Created with its permission bits (the umask permitting), so that most files need no
        // chmod; the unnamed file is reachable by no name meanwhile.
        let mode = meta.mode & 0o777;
        let (parent, known) = dirs.new_file(&meta.name, mode)?;
        let mut learned = None;
        self.store_small(dirs, &meta.name, data, mode, &mut |file, created_mode| {
            outcome = match known.filter(|k| k.created_mode == created_mode) {
                Some(known) => apply_meta(file, known.now, Some(&[]), meta)?,
                None => {
                    let st = rfs::fstat(file)
                        .map_err(|e| CoreError::io(format!("stat {:?}", meta.name), e.into()))?;
                    let now = Ownership::of(&st);
                    let have = read_xattrs(file.as_fd());
                    learned = match &have {
                        Ok(have) if have.is_empty() => Some(NewFile { created_mode, now }),
                        _ => None,
                    };
                    apply_meta(file, now, have.as_deref().ok(), meta)?
                }
            };
            Ok(())
        })?;
        match learned {
            Some(learned) => {
                #[cfg(test)]
                {
                    dirs.probed += 1;
                }
                if dirs.new_files.len() >= DirCache::MAX_DIRS {
                    dirs.new_files.clear();
                }
                dirs.new_files.insert(parent, learned);
            }
            #[cfg(test)]
            None if known.is_none() => dirs.probed += 1,
            None => {}
        }
        Ok(outcome)
    }

    /// Writes `data` into a new file for `name` (created with permission bits `mode`), lets
    /// `finish` set what it must on it (told the mode it was created with: a partial file
    /// stored by its name is created private), and gives it the name (see [`Root::put_file`]).
    fn store_small(
        &self,
        dirs: &mut DirCache,
        name: &str,
        data: &[u8],
        mode: u32,
        finish: &mut dyn FnMut(&File, u32) -> Result<()>,
    ) -> Result<()> {
        let ctx = |what: &str| format!("{what} {name:?}");
        let (dir, leaf) = dirs.parent_of(self, name)?;
        let dir = dir.as_fd();
        let unnamed = unnamed_files_work()
            .then(|| {
                rfs::openat(
                    dir,
                    ".",
                    OFlags::WRONLY | OFlags::TMPFILE | OFlags::CLOEXEC,
                    Mode::from_raw_mode(mode),
                )
            })
            .transpose();
        let (file, named) = match unnamed {
            Ok(Some(fd)) => (File::from(fd), false),
            Ok(None) | Err(Errno::OPNOTSUPP | Errno::ISDIR | Errno::INVAL) => {
                // Refuse what may not be replaced before creating anything.
                check_replaceable(dir, &leaf, name)?;
                let part = partial_name(&leaf);
                let flags = OFlags::WRONLY
                    | OFlags::CREATE
                    | OFlags::TRUNC
                    | OFlags::NOFOLLOW
                    | OFlags::CLOEXEC;
                let fd = rfs::openat(dir, on_disk(&part), flags, Mode::from_raw_mode(NAMED_MODE))
                    .map_err(|e| CoreError::io(ctx("creating"), e.into()))?;
                (File::from(fd), true)
            }
            Err(e) => return Err(CoreError::io(ctx("creating"), e.into())),
        };
        file.write_all_at(data, 0)
            .map_err(|e| CoreError::io(ctx("writing"), e))?;
        finish(&file, if named { NAMED_MODE } else { mode })?;
        if !named {
            match link_unnamed(&file, dir, &leaf) {
                Ok(()) => return Ok(()),
                Err(Errno::EXIST) => check_replaceable(dir, &leaf, name)?,
                // Found out just now that unnamed files cannot be linked here: store it named.
                Err(Errno::OPNOTSUPP) => return self.store_small(dirs, name, data, mode, finish),
                Err(e) => return Err(CoreError::io(ctx("linking"), e.into())),
            }
            let part = partial_name(&leaf);
            let _ = rfs::unlinkat(dir, on_disk(&part), AtFlags::empty());
            link_unnamed(&file, dir, &part).map_err(|e| CoreError::io(ctx("linking"), e.into()))?;
        }
        rfs::renameat(dir, on_disk(&partial_name(&leaf)), dir, on_disk(&leaf))
            .map_err(|e| CoreError::io(ctx("renaming"), e.into()))
    }

    /// Creates directory `name` (and missing parents) if needed and sets its mode and mtime. A
    /// regular file of that name is replaced (the source's file became a directory); a link or
    /// special file is not.
    ///
    /// # Errors
    /// `BadPath`, `NotRegular` (a link or special file has the name) or I/O errors.
    pub fn make_dir(&self, name: &str, mode: u32, mtime_ns: i64) -> Result<()> {
        let slot = self.parent_slot(name, true)?;
        let (dir, leaf) = (slot.dir.as_fd(), slot.leaf.as_str());
        let ctx = |what: &str| format!("{what} {name:?}");
        let mkdir = || match rfs::mkdirat(dir, on_disk(leaf), Mode::from_raw_mode(0o700)) {
            Ok(()) | Err(Errno::EXIST) => Ok(()),
            Err(e) => Err(CoreError::io(ctx("mkdir"), e.into())),
        };
        let open = || {
            rfs::openat(
                dir,
                on_disk(leaf),
                OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
        };
        mkdir()?;
        let fd = match open() {
            Err(Errno::NOTDIR) => {
                let st = rfs::statat(dir, on_disk(leaf), AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(|e| CoreError::io(ctx("stat"), e.into()))?;
                if rfs::FileType::from_raw_mode(st.st_mode) != rfs::FileType::RegularFile {
                    return Err(CoreError::NotRegular(name.to_string()));
                }
                rfs::unlinkat(dir, on_disk(leaf), AtFlags::empty())
                    .map_err(|e| CoreError::io(ctx("removing file in the way of"), e.into()))?;
                mkdir()?;
                open()
            }
            other => other,
        }
        .map_err(|e| match e {
            Errno::NOTDIR | Errno::LOOP => CoreError::NotRegular(name.to_string()),
            e => CoreError::io(ctx("opening"), e.into()),
        })?;
        let dir = File::from(fd);
        dir.set_permissions(std::fs::Permissions::from_mode(mode & 0o1777))
            .and_then(|()| dir.set_modified(system_time(mtime_ns)))
            .map_err(|e| CoreError::io(ctx("setting mode and mtime of"), e))
    }

    /// Creates (or atomically replaces) symlink `name` -> `target`, after checking the target
    /// stays inside the root ([`validate_link`]). A directory in the way is an error.
    ///
    /// # Errors
    /// `BadPath`, `NotRegular` or I/O errors.
    pub fn make_link(&self, name: &str, target: &str) -> Result<()> {
        validate_link(name, target)?;
        self.make_link_verbatim(name, target)
    }

    /// Creates (or atomically replaces) symlink `name` -> `target` whatever the target says:
    /// absolute, leading out of the tree or nowhere. Storing a link follows none; a name a peer
    /// later sends is still resolved beneath the root, so no such link leads a write out.
    ///
    /// # Errors
    /// `BadPath` (empty target, NUL, longer than `PATH_MAX`), `NotRegular` or I/O errors.
    pub fn make_link_verbatim(&self, name: &str, target: &str) -> Result<()> {
        if target.is_empty() || target.contains('\0') || target.len() >= 4096 {
            return Err(CoreError::BadPath(format!(
                "link {name:?}: empty, NUL or overlong target"
            )));
        }
        let slot = self.parent_slot_no_symlinks(name, true)?;
        let dir = slot.dir.as_fd();
        if let Ok(st) = rfs::statat(dir, on_disk(&slot.leaf), AtFlags::SYMLINK_NOFOLLOW) {
            if rfs::FileType::from_raw_mode(st.st_mode) == rfs::FileType::Directory {
                return Err(CoreError::NotRegular(name.to_string()));
            }
        }
        let part = partial_name(&slot.leaf);
        let _ = rfs::unlinkat(dir, on_disk(&part), AtFlags::empty());
        let ctx = |what: &str| format!("{what} {name:?}");
        rfs::symlinkat(on_disk(target), dir, on_disk(&part))
            .map_err(|e| CoreError::io(ctx("creating link"), e.into()))?;
        rfs::renameat(dir, on_disk(&part), dir, on_disk(&slot.leaf))
            .map_err(|e| CoreError::io(ctx("renaming link"), e.into()))
    }

    /// Reads a whole small file: its identity, mode and bytes.
    ///
    /// # Errors
    /// `NotFound`, `BadPath`, `NotRegular`, `TooLarge` (above `max`), `Changed` or I/O errors.
    pub fn read_small(&self, name: &str, max: u64) -> Result<(FileIdentity, u32, Vec<u8>)> {
        read_whole(&self.open_read(name)?, name, max)
    }

    /// [`Root::read_small`] for a name a walk of this root has just listed as a regular file:
    /// opened once (non-blocking, no controlling terminal, no final symlink), and its type
    /// checked after opening rather than before, which saves a tree sender two system calls
    /// per file. Names from a peer go through [`Root::read_small`].
    ///
    /// # Errors
    /// As [`Root::read_small`].
    pub fn read_listed_small(&self, name: &str, max: u64) -> Result<(FileIdentity, u32, Vec<u8>)> {
        validate_name(name)?;
        let flags = OFlags::RDONLY | OFlags::NOCTTY | OFlags::NONBLOCK | OFlags::NOFOLLOW;
        let fd = self
            .open_beneath(name, flags, Mode::empty())
            .map_err(|e| match e {
                Errno::NXIO | Errno::LOOP => CoreError::Changed(name.to_string()),
                e => map_open_err(name, e),
            })?;
        read_whole(&File::from(fd), name, max)
    }

    /// Flushes the root's filesystem (`syncfs`): everything stored so far is durable.
    ///
    /// # Errors
    /// I/O errors.
    pub fn sync(&self) -> Result<()> {
        let root = self.open_dir("").map_err(|e| map_open_err("", e))?;
        rfs::syncfs(&root).map_err(|e| CoreError::io("syncfs", e.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn links_must_stay_inside() {
        assert!(validate_link("a/l", "../b").is_ok());
        assert!(validate_link("a/b/l", "../../c/d").is_ok());
        assert!(validate_link("a/l", "../../b").is_err());
        assert!(validate_link("l", "..").is_err());
        assert!(validate_link("l", "/etc/passwd").is_err());
        assert!(validate_link("l", "").is_err());
        assert!(validate_link("x/y", "a/..").is_err(), "'..' after a name");
        assert!(validate_link("l", ".w.xfer-part").is_err());
    }

    #[test]
    fn tree_operations_round_trip_through_walk() {
        let tmp = tempfile::tempdir().unwrap();
        let root = Root::open(tmp.path()).unwrap();
        root.make_dir("t", 0o750, 1_000_000_000).unwrap();
        root.make_dir("t/empty", 0o700, 2_000_000_000).unwrap();
        root.put_file(
            &mut DirCache::default(),
            "t/sub/f.txt",
            3_000_000_000,
            0o640,
            b"hello",
        )
        .unwrap();
        root.make_link("t/sub/l", "f.txt").unwrap();
        root.make_link("t/sub/l", "../empty").unwrap(); // replaced atomically
        assert!(root.make_link("t/bad", "../../x").is_err());
        assert!(matches!(
            root.make_dir("t/sub/l", 0o755, 0),
            Err(CoreError::NotRegular(_))
        ));
        root.make_dir("t", 0o750, 1_000_000_000).unwrap(); // idempotent; mtime set again
        root.sync().unwrap();
        let entries = root.walk("t", true).unwrap();
        let summary: Vec<_> = entries
            .iter()
            .map(|e| (e.path.as_str(), e.kind, e.size, e.mode, e.target.as_str()))
            .collect();
        assert_eq!(
            summary,
            vec![
                ("", EntryKind::Dir, 0, 0o750, ""),
                ("empty", EntryKind::Dir, 0, 0o700, ""),
                ("sub", EntryKind::Dir, 0, 0o755, ""),
                ("sub/f.txt", EntryKind::File, 5, 0o640, ""),
                ("sub/l", EntryKind::Symlink, 0, 0o777, "../empty"),
            ]
        );
        assert_eq!(entries[0].mtime_ns, 1_000_000_000);
        assert_eq!(entries[3].mtime_ns, 3_000_000_000);
        assert_eq!(entries[3].digest.len(), 16);
        let (identity, mode, data) = root.read_small("t/sub/f.txt", 10).unwrap();
        assert_eq!(
            (identity.size, mode, data.as_slice()),
            (5, 0o640, &b"hello"[..])
        );
        assert!(matches!(
            root.read_small("t/sub/f.txt", 4),
            Err(CoreError::TooLarge(_))
        ));
        assert!(!tmp.path().join("t/sub/.f.txt.xfer-part").exists());
    }

    #[test]
    fn stored_files_replace_files_only_and_files_give_way_to_directories() {
        let tmp = tempfile::tempdir().unwrap();
        let root = Root::open(tmp.path()).unwrap();
        let mut dirs = DirCache::default();
        for (i, data) in [&b"one"[..], b"second"].into_iter().enumerate() {
            root.put_file(&mut dirs, "d/f", i as i64, 0o640, data)
                .unwrap();
            assert_eq!(std::fs::read(tmp.path().join("d/f")).unwrap(), data);
        }
        root.make_dir("d/sub", 0o755, 0).unwrap();
        root.make_link("d/l", "f").unwrap();
        for name in ["d/sub", "d/l"] {
            assert!(
                matches!(
                    root.put_file(&mut dirs, name, 0, 0o644, b"x"),
                    Err(CoreError::NotRegular(_))
                ),
                "{name}"
            );
        }
        assert_eq!(
            std::fs::read_link(tmp.path().join("d/l")).unwrap(),
            Path::new("f")
        );
        // The source's file became a directory: the file gives way; a link does not.
        root.make_dir("d/f", 0o750, 0).unwrap();
        assert!(tmp.path().join("d/f").is_dir());
        assert!(matches!(
            root.make_dir("d/l", 0o755, 0),
            Err(CoreError::NotRegular(_))
        ));
        let left: Vec<_> = std::fs::read_dir(tmp.path().join("d"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(left.iter().all(|n| !n.starts_with('.')), "{left:?}");
    }

    #[test]
    fn a_file_stored_with_its_metadata_gets_it_before_its_name() {
        let tmp = tempfile::tempdir().unwrap();
        let root = Root::open(tmp.path()).unwrap();
        let mut dirs = DirCache::default();
        let st = rfs::stat(tmp.path()).unwrap();
        for data in [&b"first"[..], b"replaced"] {
            let meta = xfer_proto::SetMeta {
                name: "d/f".into(),
                mode: 0o2750,
                mtime_ns: 1_500_000_000_000_000_007,
                uid: st.st_uid,
                gid: st.st_gid,
                user: String::new(),
                group: String::new(),
                numeric_ids: true,
                xattrs: Some(vec![xfer_proto::Xattr {
                    name: "user.k".into(),
                    value: data.to_vec(),
                }]),
            };
            let outcome = root.put_file_meta(&mut dirs, data, &meta).unwrap();
            assert!(!outcome.not_chowned);
            let path = tmp.path().join("d/f");
            assert_eq!(std::fs::read(&path).unwrap(), data);
            let got = rfs::stat(&path).unwrap();
            assert_eq!(got.st_mode & 0o7777, 0o2750);
            assert_eq!(mtime_ns(&got), meta.mtime_ns);
            // A filesystem without user attributes says so in the outcome instead.
            if outcome.xattrs_refused.is_none() {
                let file = File::open(&path).unwrap();
                let read = crate::meta::read_xattrs(file.as_fd()).unwrap();
                assert_eq!(read, meta.xattrs.clone().unwrap());
            }
        }
    }

    /// A small file of `name` with mode 0o644, to be given `gid` and no attributes.
    fn plain_meta(name: &str, uid: u32, gid: u32) -> xfer_proto::SetMeta {
        xfer_proto::SetMeta {
            name: name.into(),
            mode: 0o644,
            mtime_ns: 1_500_000_000_000_000_007,
            uid,
            gid,
            user: String::new(),
            group: String::new(),
            numeric_ids: true,
            xattrs: Some(vec![]),
        }
    }

    #[test]
    fn the_files_of_one_directory_read_what_new_files_start_with_once() {
        let tmp = tempfile::tempdir().unwrap();
        let root = Root::open(tmp.path()).unwrap();
        let mut dirs = DirCache::default();
        let st = rfs::stat(tmp.path()).unwrap();
        for dir in ["a", "b"] {
            for i in 0..10 {
                let meta = plain_meta(&format!("{dir}/f{i}"), st.st_uid, st.st_gid);
                root.put_file_meta(&mut dirs, b"bytes", &meta).unwrap();
            }
        }
        assert_eq!(dirs.probed, 2, "one fstat and attribute list per directory");
        // Another mode at creation starts another way: read again, once.
        for i in 0..3 {
            let meta = xfer_proto::SetMeta {
                mode: 0o600,
                ..plain_meta(&format!("a/g{i}"), st.st_uid, st.st_gid)
            };
            root.put_file_meta(&mut dirs, b"bytes", &meta).unwrap();
            let got = rfs::stat(tmp.path().join(&meta.name)).unwrap();
            assert_eq!(got.st_mode & 0o7777, 0o600);
        }
        assert_eq!(dirs.probed, 3);
    }

    #[test]
    fn a_set_group_id_directory_gives_its_group_to_every_file_unless_another_is_asked() {
        if !rustix::process::geteuid().is_root() {
            return; // giving a directory a group not ours takes root
        }
        let tmp = tempfile::tempdir().unwrap();
        let root = Root::open(tmp.path()).unwrap();
        let st = rfs::stat(tmp.path()).unwrap();
        let other = st.st_gid + 4242;
        let shared = tmp.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        rfs::chown(&shared, None, Some(rfs::Gid::from_raw(other))).unwrap();
        rfs::chmod(&shared, Mode::from_raw_mode(0o2775)).unwrap();
        let mut dirs = DirCache::default();
        // Alternately the directory's group (no chown needed) and ours (a chown each time,
        // the second file's too, though the first taught what a new file starts with).
        for i in 0..6 {
            let gid = if i % 2 == 0 { other } else { st.st_gid };
            let meta = plain_meta(&format!("shared/f{i}"), st.st_uid, gid);
            root.put_file_meta(&mut dirs, b"bytes", &meta).unwrap();
            let got = rfs::stat(tmp.path().join(&meta.name)).unwrap();
            assert_eq!(got.st_gid, gid, "file {i}");
            assert_eq!(got.st_mode & 0o7777, 0o644, "file {i}");
        }
        assert_eq!(dirs.probed, 1);
    }

    #[test]
    fn a_default_acl_is_read_and_removed_on_every_file_that_asks_for_none() {
        let tmp = tempfile::tempdir().unwrap();
        let root = Root::open(tmp.path()).unwrap();
        let inherit = tmp.path().join("inherit");
        std::fs::create_dir(&inherit).unwrap();
        let set = std::process::Command::new("setfacl")
            .args(["-d", "-m", "u:nobody:r"])
            .arg(&inherit)
            .status();
        if !set.is_ok_and(|s| s.success()) {
            return; // no setfacl, or a filesystem without ACLs
        }
        let st = rfs::stat(tmp.path()).unwrap();
        let mut dirs = DirCache::default();
        for i in 0..4 {
            let meta = plain_meta(&format!("inherit/f{i}"), st.st_uid, st.st_gid);
            let outcome = root.put_file_meta(&mut dirs, b"bytes", &meta).unwrap();
            assert_eq!(outcome.xattrs_refused, None);
            let file = File::open(tmp.path().join(&meta.name)).unwrap();
            let left = crate::meta::read_xattrs(file.as_fd()).unwrap();
            assert_eq!(left, vec![], "file {i} keeps the ACL it inherited");
            let got = rfs::fstat(&file).unwrap();
            assert_eq!(got.st_mode & 0o7777, 0o644, "file {i}");
        }
        assert_eq!(dirs.probed, 4, "what a file inherits is read for each");
    }

    #[test]
    fn a_stored_file_gets_its_mode_whatever_the_umask_or_an_owner_change_did() {
        let tmp = tempfile::tempdir().unwrap();
        let root = Root::open(tmp.path()).unwrap();
        let mut dirs = DirCache::default();
        let st = rfs::stat(tmp.path()).unwrap();
        // Root may give the file another owner, which clears set-id bits.
        let uid = match rustix::process::geteuid().is_root() {
            true => st.st_uid + 1,
            false => st.st_uid,
        };
        // 0o666 and 0o777 lose bits to a usual umask when created; set-id bits are never
        // given at creation.
        let modes = [0o644, 0o666, 0o777, 0o600, 0o4755, 0o2711, 0o1644];
        for (i, (mode, uid)) in modes
            .into_iter()
            .flat_map(|mode| [(mode, st.st_uid), (mode, uid)])
            .enumerate()
        {
            let meta = xfer_proto::SetMeta {
                name: format!("d/f{i}"),
                mode,
                mtime_ns: 1_500_000_000_000_000_007,
                uid,
                gid: st.st_gid,
                user: String::new(),
                group: String::new(),
                numeric_ids: true,
                xattrs: Some(vec![]),
            };
            root.put_file_meta(&mut dirs, b"bytes", &meta).unwrap();
            let got = rfs::stat(tmp.path().join(&meta.name)).unwrap();
            assert_eq!(got.st_mode & 0o7777, mode, "{mode:o}");
            assert_eq!(mtime_ns(&got), meta.mtime_ns);
            // Given back to the first owner, with its mode unchanged: the change of owner
            // cleared the set-id bits, which must come back.
            let back = xfer_proto::SetMeta {
                uid: st.st_uid,
                ..meta
            };
            root.set_meta(&back).unwrap();
            let got = rfs::stat(tmp.path().join(&back.name)).unwrap();
            assert_eq!(got.st_mode & 0o7777, mode, "{mode:o} after chown");
        }
    }
}
